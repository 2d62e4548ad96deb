//! Standard Webhooks signatures (<https://www.standardwebhooks.com>):
//! `v1,<base64 HMAC-SHA256 over "id.timestamp.body">`, keyed by a `whsec_` secret.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

const PREFIX: &str = "whsec_";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SecretError {
    #[error("a webhook secret must start with \"whsec_\"")]
    MissingPrefix,
    #[error("the part of the secret after \"whsec_\" is not valid base64")]
    NotBase64,
    #[error("the secret key must be between 24 and 64 bytes long, it has {0}")]
    BadLength(usize),
}

/// A new random secret: 32 bytes, as the Standard Webhooks libraries make them.
pub fn generate_secret() -> String {
    let mut key = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    format!("{PREFIX}{}", B64.encode(key))
}

/// Decodes `whsec_<base64>` into key bytes; the error never repeats the secret.
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, SecretError> {
    let encoded = secret.strip_prefix(PREFIX).ok_or(SecretError::MissingPrefix)?;
    let key = B64.decode(encoded).map_err(|_| SecretError::NotBase64)?;
    if !(24..=64).contains(&key.len()) {
        return Err(SecretError::BadLength(key.len()));
    }
    Ok(key)
}

/// One `v1,<sig>` entry for one key.
pub fn sign_with_key(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
}

/// The `webhook-signature` header value: one signature per valid secret,
/// space-separated, so receivers holding either key during a rotation verify.
/// Secrets that do not decode are skipped (they were validated when stored).
pub fn signature_header(secrets: &[String], id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .filter_map(|s| decode_secret(s).ok())
        .map(|key| sign_with_key(&key, id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Verifies a `webhook-signature` header against one secret, in constant time
/// per candidate. Used by the demo receiver, the tests and `ihub.verify_signature`.
pub fn verify(secret: &str, header: &str, id: &str, timestamp: i64, body: &[u8]) -> bool {
    let Ok(key) = decode_secret(secret) else {
        return false;
    };
    let expected = sign_with_key(&key, id, timestamp, body);
    header
        .split(' ')
        .filter(|candidate| !candidate.is_empty())
        .any(|candidate| constant_time_eq(candidate.as_bytes(), expected.as_bytes()))
}

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    // The published Standard Webhooks test vector: reproducing it is what says a
    // receiver's stock library accepts what we send.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TS: i64 = 1614265330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const EXPECTED: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn reproduces_the_standard_webhooks_vector() {
        assert_eq!(signature_header(&[SECRET.into()], ID, TS, BODY), EXPECTED);
    }

    #[test]
    fn verifies_the_vector_and_rejects_tampering() {
        assert!(verify(SECRET, EXPECTED, ID, TS, BODY));
        assert!(!verify(SECRET, EXPECTED, ID, TS + 1, BODY));
        assert!(!verify(SECRET, EXPECTED, "msg_other", TS, BODY));
        assert!(!verify(SECRET, EXPECTED, ID, TS, br#"{"test": 1}"#));
    }

    #[test]
    fn rotation_signs_with_every_key_and_either_verifies() {
        let new = generate_secret();
        let header = signature_header(&[new.clone(), SECRET.into()], ID, TS, BODY);
        assert_eq!(header.split(' ').count(), 2);
        assert!(verify(SECRET, &header, ID, TS, BODY));
        assert!(verify(&new, &header, ID, TS, BODY));
        assert!(!verify(&generate_secret(), &header, ID, TS, BODY));
    }

    #[test]
    fn generated_secrets_decode_to_32_bytes() {
        let s = generate_secret();
        assert!(s.starts_with("whsec_"));
        assert_eq!(decode_secret(&s).unwrap().len(), 32);
        assert_ne!(s, generate_secret());
    }

    #[test]
    fn bad_secrets_are_named_without_echoing_them() {
        assert_eq!(decode_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), Err(SecretError::MissingPrefix));
        assert_eq!(decode_secret("whsec_***"), Err(SecretError::NotBase64));
        assert_eq!(decode_secret("whsec_AAAA"), Err(SecretError::BadLength(3)));
        let msg = decode_secret("whsec_hunter2!").unwrap_err().to_string();
        assert!(!msg.contains("hunter2"));
    }
}
