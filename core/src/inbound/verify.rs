//! Verifying inbound webhook requests: Standard Webhooks signatures, an
//! HMAC-SHA256 digest header (GitHub's X-Hub-Signature-256), or a shared
//! secret header (Zoho's X-Zoho-Webhook-Secret). Comparisons run in constant
//! time; no error message repeats a secret or a signature.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::outbound::signature::{self, constant_time_eq};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    StandardWebhooks,
    HmacSha256,
    SharedSecret,
    None,
}

impl Mode {
    pub fn parse(text: &str) -> Option<Mode> {
        match text {
            "standard-webhooks" => Some(Mode::StandardWebhooks),
            "hmac-sha256" => Some(Mode::HmacSha256),
            "shared-secret" => Some(Mode::SharedSecret),
            "none" => Some(Mode::None),
            _ => None,
        }
    }
}

/// How a source verifies its requests. (No Debug: it holds the secret.)
#[derive(Clone)]
pub struct Rule {
    pub mode: Mode,
    pub secret: Vec<u8>,
    /// Lower-case header name: the digest (hmac-sha256) or the secret (shared-secret).
    pub header: Option<String>,
    /// Seconds a standard-webhooks timestamp may be off.
    pub tolerance_s: i64,
}

/// Why a request was refused; the text is what the sender and the
/// rejection record see.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Refusal {
    #[error("missing header {0}")]
    MissingHeader(String),
    #[error("webhook-timestamp is not a number of seconds")]
    BadTimestamp,
    #[error("webhook-timestamp is outside the tolerance (replayed or clock skew)")]
    Stale,
    #[error("invalid signature")]
    BadSignature,
    #[error("invalid secret")]
    BadSecret,
}

impl Rule {
    /// A Standard Webhooks secret (`whsec_…`) is the base64 of its key; for the
    /// other modes the secret is used exactly as written, as their senders do.
    pub fn new(mode: Mode, secret: &str, header: Option<String>, tolerance_s: i64) -> Rule {
        let secret = match mode {
            Mode::StandardWebhooks => signature::decode_secret(secret).unwrap_or_else(|_| secret.as_bytes().to_vec()),
            _ => secret.as_bytes().to_vec(),
        };
        Rule { mode, secret, header, tolerance_s }
    }
}

/// Verifies a request. `header` looks a header up by lower-case name.
pub fn verify<'a>(
    rule: &Rule,
    header: impl Fn(&str) -> Option<&'a str>,
    body: &[u8],
    now_s: i64,
) -> Result<(), Refusal> {
    let need = |name: &str| header(name).ok_or_else(|| Refusal::MissingHeader(name.to_string()));
    match rule.mode {
        Mode::None => Ok(()),
        Mode::StandardWebhooks => {
            let id = need("webhook-id")?;
            let ts_text = need("webhook-timestamp")?;
            let sigs = need("webhook-signature")?;
            let ts: i64 = ts_text.trim().parse().map_err(|_| Refusal::BadTimestamp)?;
            // abs_diff: a timestamp near i64::MIN must not overflow into "fresh".
            if now_s.abs_diff(ts) > rule.tolerance_s.max(0) as u64 {
                return Err(Refusal::Stale);
            }
            let expected = signature::sign_with_key(&rule.secret, id, ts, body);
            if sigs.split(' ').filter(|s| !s.is_empty()).any(|s| constant_time_eq(s.as_bytes(), expected.as_bytes())) {
                Ok(())
            } else {
                Err(Refusal::BadSignature)
            }
        }
        Mode::HmacSha256 => {
            let name = rule.header.as_deref().unwrap_or("x-hub-signature-256");
            let given = need(name)?.trim();
            let given = given.strip_prefix("sha256=").unwrap_or(given);
            let mut mac = Hmac::<Sha256>::new_from_slice(&rule.secret).expect("any key length");
            mac.update(body);
            let digest = mac.finalize().into_bytes();
            let hex_ok =
                given.len() == 64 && constant_time_eq(given.to_ascii_lowercase().as_bytes(), hex(&digest).as_bytes());
            let b64_ok = B64.decode(given).is_ok_and(|raw| constant_time_eq(&raw, &digest));
            if hex_ok || b64_ok {
                Ok(())
            } else {
                Err(Refusal::BadSignature)
            }
        }
        Mode::SharedSecret => {
            let name = rule.header.as_deref().unwrap_or("x-webhook-secret");
            if constant_time_eq(need(name)?.as_bytes(), &rule.secret) {
                Ok(())
            } else {
                Err(Refusal::BadSecret)
            }
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex SHA-256 of a body: the de-duplication key when a request carries no
/// id, and what a rejection record keeps instead of the body.
pub fn body_hash(body: &[u8]) -> String {
    hex(&Sha256::digest(body))
}

/// The de-duplication key of a request: the Standard Webhooks `webhook-id`,
/// else the source's id header, else `sha256:` and the body's hash. The one
/// computation for the listener and `ihub.receive`; `header` looks up a
/// request header by its lower-case name.
pub fn dedup_key<'a>(
    mode: Mode,
    id_header: Option<&str>,
    header: impl Fn(&str) -> Option<&'a str>,
    body: &[u8],
) -> String {
    match mode {
        Mode::StandardWebhooks => header("webhook-id"),
        _ => None,
    }
    .or_else(|| id_header.and_then(|name| header(&name.to_ascii_lowercase())))
    // A sender's id may be any length: long ones are stored hashed.
    .map(crate::inbound::bounds::bounded_key)
    .unwrap_or_else(|| format!("sha256:{}", body_hash(body)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn the_dedup_key_prefers_the_webhook_id_then_the_id_header_then_the_body() {
        let headers = HashMap::from([("webhook-id", "msg_1"), ("x-request-id", "req-9")]);
        let get = |name: &str| headers.get(name).copied();
        assert_eq!(dedup_key(Mode::StandardWebhooks, Some("X-Request-Id"), get, b"{}"), "msg_1");
        assert_eq!(dedup_key(Mode::SharedSecret, Some("X-Request-Id"), get, b"{}"), "req-9");
        assert_eq!(
            dedup_key(Mode::SharedSecret, None, get, b"{}"),
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        assert_eq!(
            dedup_key(Mode::StandardWebhooks, Some("x-missing"), |_| None, b"{}"),
            dedup_key(Mode::None, None, get, b"{}")
        );
        let long = "i".repeat(5000);
        let key = dedup_key(Mode::StandardWebhooks, None, |_| Some(long.as_str()), b"{}");
        assert_eq!((key.len(), &key[..7]), (71, "sha256:"), "long ids are hashed");
    }

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TS: i64 = 1614265330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;

    fn rule(mode: Mode, secret: &str, header: Option<&str>) -> Rule {
        Rule::new(mode, secret, header.map(str::to_string), 300)
    }

    fn check(rule: &Rule, headers: &[(&str, &str)], body: &[u8], now: i64) -> Result<(), Refusal> {
        let map: HashMap<String, String> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        verify(rule, |n| map.get(n).map(String::as_str), body, now)
    }

    #[test]
    fn standard_webhooks_vector_and_its_failures() {
        let r = rule(Mode::StandardWebhooks, SECRET, None);
        let sig = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        let ok = [("webhook-id", ID), ("webhook-timestamp", "1614265330"), ("webhook-signature", sig)];
        assert_eq!(check(&r, &ok, BODY, TS + 10), Ok(()));
        let rotated = format!("v1,bm9wZQ== {sig}");
        assert_eq!(
            check(&r, &[ok[0], ok[1], ("webhook-signature", &rotated)], BODY, TS),
            Ok(()),
            "any of several signatures"
        );
        assert_eq!(check(&r, &ok, br#"{"test": 1}"#, TS), Err(Refusal::BadSignature));
        assert_eq!(check(&r, &ok, BODY, TS + 301), Err(Refusal::Stale));
        assert_eq!(check(&r, &ok, BODY, TS - 301), Err(Refusal::Stale));
        assert_eq!(check(&r, &ok[..2], BODY, TS), Err(Refusal::MissingHeader("webhook-signature".into())));
        assert_eq!(check(&r, &[ok[0], ("webhook-timestamp", "soon"), ok[2]], BODY, TS), Err(Refusal::BadTimestamp));
        let ancient = i64::MIN.to_string();
        assert_eq!(check(&r, &[ok[0], ("webhook-timestamp", &ancient), ok[2]], BODY, TS), Err(Refusal::Stale));
    }

    #[test]
    fn hmac_digest_in_hex_or_base64_with_or_without_prefix() {
        // GitHub's documented example: secret "It's a Secret to Everybody", body "Hello, World!".
        let r = rule(Mode::HmacSha256, "It's a Secret to Everybody", Some("x-hub-signature-256"));
        let hex_sig = "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        let body = b"Hello, World!";
        assert_eq!(check(&r, &[("x-hub-signature-256", &format!("sha256={hex_sig}"))], body, 0), Ok(()));
        assert_eq!(check(&r, &[("x-hub-signature-256", &hex_sig.to_uppercase())], body, 0), Ok(()));
        let b64 = B64
            .encode((0..32).map(|i| u8::from_str_radix(&hex_sig[i * 2..i * 2 + 2], 16).unwrap()).collect::<Vec<_>>());
        assert_eq!(check(&r, &[("x-hub-signature-256", &b64)], body, 0), Ok(()));
        assert_eq!(check(&r, &[("x-hub-signature-256", "sha256=00")], body, 0), Err(Refusal::BadSignature));
        assert_eq!(check(&r, &[], body, 0), Err(Refusal::MissingHeader("x-hub-signature-256".into())));
    }

    #[test]
    fn shared_secret_header_must_match() {
        let r = rule(Mode::SharedSecret, "zoho-s3cret", Some("x-zoho-webhook-secret"));
        assert_eq!(check(&r, &[("x-zoho-webhook-secret", "zoho-s3cret")], b"x", 0), Ok(()));
        assert_eq!(check(&r, &[("x-zoho-webhook-secret", "zoho-s3cre")], b"x", 0), Err(Refusal::BadSecret));
        let refusal = check(&r, &[("x-zoho-webhook-secret", "wrong")], b"x", 0).unwrap_err().to_string();
        assert!(!refusal.contains("zoho-s3cret") && !refusal.contains("wrong"));
        assert_eq!(check(&rule(Mode::None, "", None), &[], b"x", 0), Ok(()));
        // A secret that looks like a Standard Webhooks one is still compared as written.
        let r = rule(Mode::SharedSecret, SECRET, Some("x-key"));
        assert_eq!(check(&r, &[("x-key", SECRET)], b"x", 0), Ok(()));
    }

    #[test]
    fn body_hashes_are_hex_sha256() {
        assert_eq!(body_hash(b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }
}
