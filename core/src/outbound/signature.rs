//! Standard Webhooks signatures (<https://www.standardwebhooks.com>):
//! `v1,<base64 HMAC-SHA256 over "id.timestamp.body">`, keyed by a `whsec_` secret,
//! and `v1a,<base64 ed25519 signature of the same>`, keyed by a `whsk_` secret
//! key (the 32-byte seed, or seed and public key as libsodium keeps them), whose
//! `whpk_` public key receivers verify with.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

const PREFIX: &str = "whsec_";
const SECRET_KEY_PREFIX: &str = "whsk_";
const PUBLIC_KEY_PREFIX: &str = "whpk_";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SecretError {
    #[error("a webhook secret must start with \"whsec_\"")]
    MissingPrefix,
    #[error("the part of the secret after \"whsec_\" is not valid base64")]
    NotBase64,
    #[error("the secret key must be between 24 and 64 bytes long, it has {0}")]
    BadLength(usize),
    #[error("an endpoint's signing secret must start with \"whsec_\" (HMAC, v1) or \"whsk_\" (ed25519, v1a)")]
    MissingKeyPrefix,
    #[error("the part of the key after \"{0}\" is not valid base64")]
    KeyNotBase64(&'static str),
    #[error("an ed25519 secret key is 32 bytes (or 64: the key and its public key), it has {0}")]
    BadKeyLength(usize),
    #[error("the second half of the 64-byte ed25519 secret key is not its public key")]
    MismatchedPublicKey,
    #[error("an ed25519 public key must start with \"whpk_\" and be 32 bytes of base64")]
    BadPublicKey,
}

/// A key an endpoint signs with: HMAC (v1) or ed25519 (v1a).
pub enum SigningKey {
    Hmac(Vec<u8>),
    Ed25519(ed25519_dalek::SigningKey),
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

/// Decodes an endpoint's signing secret, `whsec_…` or `whsk_…`; errors never
/// repeat it.
pub fn decode_signing_key(secret: &str) -> Result<SigningKey, SecretError> {
    let Some(encoded) = secret.strip_prefix(SECRET_KEY_PREFIX) else {
        return match decode_secret(secret) {
            Err(SecretError::MissingPrefix) => Err(SecretError::MissingKeyPrefix),
            other => other.map(SigningKey::Hmac),
        };
    };
    let bytes = B64.decode(encoded).map_err(|_| SecretError::KeyNotBase64(SECRET_KEY_PREFIX))?;
    let seed: [u8; 32] = match bytes.len() {
        32 | 64 => bytes[..32].try_into().expect("32 bytes"),
        n => return Err(SecretError::BadKeyLength(n)),
    };
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    if bytes.len() == 64 && key.verifying_key().as_bytes()[..] != bytes[32..] {
        return Err(SecretError::MismatchedPublicKey);
    }
    Ok(SigningKey::Ed25519(key))
}

/// A new random ed25519 secret key, `whsk_<base64 of the 32-byte seed>`.
pub fn generate_ed25519_key() -> String {
    let mut seed = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut seed);
    format!("{SECRET_KEY_PREFIX}{}", B64.encode(seed))
}

/// The `whpk_` public key of a `whsk_` secret key; None for an HMAC secret
/// (it has none) or one that does not decode.
pub fn public_key(secret: &str) -> Option<String> {
    match decode_signing_key(secret) {
        Ok(SigningKey::Ed25519(key)) => {
            Some(format!("{PUBLIC_KEY_PREFIX}{}", B64.encode(key.verifying_key().as_bytes())))
        }
        _ => None,
    }
}

fn decode_public_key(public: &str) -> Result<ed25519_dalek::VerifyingKey, SecretError> {
    let bytes = public
        .strip_prefix(PUBLIC_KEY_PREFIX)
        .and_then(|e| B64.decode(e).ok())
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or(SecretError::BadPublicKey)?;
    ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|_| SecretError::BadPublicKey)
}

/// The content both schemes sign: `id.timestamp.body`.
fn signed_content(id: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    let mut content = Vec::with_capacity(id.len() + body.len() + 24);
    content.extend_from_slice(id.as_bytes());
    content.push(b'.');
    content.extend_from_slice(timestamp.to_string().as_bytes());
    content.push(b'.');
    content.extend_from_slice(body);
    content
}

/// One header entry for one key: `v1,<sig>` or `v1a,<sig>`.
pub fn sign(key: &SigningKey, id: &str, timestamp: i64, body: &[u8]) -> String {
    match key {
        SigningKey::Hmac(key) => sign_with_key(key, id, timestamp, body),
        SigningKey::Ed25519(key) => {
            use ed25519_dalek::Signer;
            format!("v1a,{}", B64.encode(key.sign(&signed_content(id, timestamp, body)).to_bytes()))
        }
    }
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
/// space-separated, so receivers holding either key during a rotation verify
/// (and, with a `whsec_` and a `whsk_` secret, either scheme). Secrets that
/// do not decode are skipped (they were validated when stored).
pub fn signature_header(secrets: &[String], id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .filter_map(|s| decode_signing_key(s).ok())
        .map(|key| sign(&key, id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Verifies a `webhook-signature` header against one key: a `whsec_` secret
/// (v1, compared in constant time per candidate) or a `whpk_` public key
/// (v1a). Used by the demo receiver, the tests and `ihub.verify_signature`.
pub fn verify(secret: &str, header: &str, id: &str, timestamp: i64, body: &[u8]) -> bool {
    if secret.starts_with(PUBLIC_KEY_PREFIX) {
        let Ok(public) = decode_public_key(secret) else {
            return false;
        };
        let content = signed_content(id, timestamp, body);
        return header.split(' ').filter_map(|c| c.strip_prefix("v1a,")).any(|sig| {
            B64.decode(sig)
                .ok()
                .and_then(|b| ed25519_dalek::Signature::from_slice(&b).ok())
                .is_some_and(|sig| public.verify_strict(&content, &sig).is_ok())
        });
    }
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

    /// RFC 8032, test 2: the seed, its public key and the signature of one
    /// byte (0x72), so that v1a is plain ed25519 over id.timestamp.body.
    #[test]
    fn v1a_is_ed25519_of_the_signed_content() {
        let seed = "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb";
        let public = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c";
        let hex = |h: &str| {
            (0..h.len()).step_by(2).map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap()).collect::<Vec<_>>()
        };
        let secret = format!("whsk_{}", B64.encode(hex(seed)));
        let whpk = format!("whpk_{}", B64.encode(hex(public)));
        assert_eq!(public_key(&secret).as_deref(), Some(whpk.as_str()));
        // The same key in libsodium's 64-byte form.
        let long = format!("whsk_{}", B64.encode([hex(seed), hex(public)].concat()));
        assert_eq!(public_key(&long).as_deref(), Some(whpk.as_str()));
        let header = signature_header(&[secret.clone()], ID, TS, BODY);
        assert!(header.starts_with("v1a,"), "{header}");
        assert_eq!(B64.decode(&header[4..]).unwrap().len(), 64);
        assert!(verify(&whpk, &header, ID, TS, BODY));
        assert!(!verify(&whpk, &header, ID, TS + 1, BODY));
        assert!(!verify(&public_key(&generate_ed25519_key()).unwrap(), &header, ID, TS, BODY));
        // Both schemes during a switch from v1 to v1a, each verifiable.
        let both = signature_header(&[secret, SECRET.into()], ID, TS, BODY);
        assert!(verify(&whpk, &both, ID, TS, BODY) && verify(SECRET, &both, ID, TS, BODY));
    }

    #[test]
    fn bad_keys_are_named_without_echoing_them() {
        let err = |s: &str| decode_signing_key(s).err().unwrap();
        assert_eq!(err("sk_hunter2"), SecretError::MissingKeyPrefix);
        assert_eq!(err("whsk_***"), SecretError::KeyNotBase64("whsk_"));
        assert_eq!(err("whsk_AAAA"), SecretError::BadKeyLength(3));
        assert_eq!(err(&format!("whsk_{}", B64.encode([7u8; 64]))), SecretError::MismatchedPublicKey);
        assert!(matches!(decode_signing_key(SECRET), Ok(SigningKey::Hmac(_))));
        assert!(public_key(SECRET).is_none());
        assert!(!err("whsk_hunter2!").to_string().contains("hunter2"));
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
