//! A receiver's own Standard Webhooks verification, written independently
//! of the extension's signing code so that each checks the other.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// True when any `v1,` entry of `header` is the HMAC of `id.timestamp.body`.
pub fn verify(secret: &str, id: &str, timestamp: &str, header: &str, body: &[u8]) -> bool {
    let Some(key) = secret.strip_prefix("whsec_").and_then(|k| STANDARD.decode(k).ok()) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("any key length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let expected = mac.finalize().into_bytes();
    header.split(' ').filter_map(|s| s.strip_prefix("v1,")).filter_map(|s| STANDARD.decode(s).ok()).any(|sig| {
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("any key length");
        mac.update(format!("{id}.{timestamp}.").as_bytes());
        mac.update(body);
        // verify_slice compares in constant time.
        sig.len() == expected.len() && mac.verify_slice(&sig).is_ok()
    })
}

/// True when any `v1a,` entry of `header` is an ed25519 signature of
/// `id.timestamp.body` by the `whpk_` public key: ed25519-dalek's strict
/// verification, not the extension's code.
pub fn verify_v1a(public_key: &str, id: &str, timestamp: &str, header: &str, body: &[u8]) -> bool {
    let Some(key) = public_key
        .strip_prefix("whpk_")
        .and_then(|k| STANDARD.decode(k).ok())
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .and_then(|k| ed25519_dalek::VerifyingKey::from_bytes(&k).ok())
    else {
        return false;
    };
    let message = [format!("{id}.{timestamp}.").as_bytes(), body].concat();
    header
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1a,"))
        .filter_map(|s| STANDARD.decode(s).ok())
        .filter_map(|s| ed25519_dalek::Signature::from_slice(&s).ok())
        .any(|sig| key.verify_strict(&message, &sig).is_ok())
}

/// A Standard Webhooks `webhook-signature` value, as a sender computes it.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> String {
    let key = secret
        .strip_prefix("whsec_")
        .and_then(|k| STANDARD.decode(k).ok())
        .unwrap_or_else(|| secret.as_bytes().to_vec());
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("any key length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// Hex HMAC-SHA256 of a body, as GitHub sends in X-Hub-Signature-256.
pub fn hmac_hex(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn standard_webhooks_vector() {
        assert!(super::verify(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            "v1,bm9wZQ== v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            br#"{"test": 2432232314}"#,
        ));
        assert!(!super::verify(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265331",
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            br#"{"test": 2432232314}"#,
        ));
    }
}
