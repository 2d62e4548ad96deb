//! Verifying inbound webhook requests: Standard Webhooks signatures, an
//! HMAC-SHA256 digest header (GitHub's X-Hub-Signature-256), a shared
//! secret header (Zoho's X-Zoho-Webhook-Secret), and the schemes of the
//! providers people use (presets: Stripe, GitHub, Shopify, Slack, Twilio,
//! Svix), each with its de-duplication key and, for Slack, its handshake.
//! Comparisons run in constant time; no error message repeats a secret or a
//! signature.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::outbound::signature::{self, constant_time_eq};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    StandardWebhooks,
    HmacSha256,
    SharedSecret,
    None,
    Stripe,
    Github,
    Shopify,
    Slack,
    Twilio,
    Svix,
}

/// The pseudo-header a verifier reads the request's full URL from (Twilio
/// signs it): the listener adds it, `ihub.receive` callers pass it.
pub const URL_HEADER: &str = ":url";

impl Mode {
    pub fn parse(text: &str) -> Option<Mode> {
        match text {
            "standard-webhooks" => Some(Mode::StandardWebhooks),
            "hmac-sha256" => Some(Mode::HmacSha256),
            "shared-secret" => Some(Mode::SharedSecret),
            "none" => Some(Mode::None),
            "stripe" => Some(Mode::Stripe),
            "github" => Some(Mode::Github),
            "shopify" => Some(Mode::Shopify),
            "slack" => Some(Mode::Slack),
            "twilio" => Some(Mode::Twilio),
            "svix" => Some(Mode::Svix),
            _ => None,
        }
    }

    /// The header a preset takes its de-duplication key from (Stripe's is
    /// the event id in the body).
    fn id_header(self) -> Option<&'static str> {
        match self {
            Mode::StandardWebhooks => Some("webhook-id"),
            Mode::Github => Some("x-github-delivery"),
            Mode::Shopify => Some("x-shopify-webhook-id"),
            Mode::Twilio => Some("i-twilio-idempotency-token"),
            Mode::Svix => Some("svix-id"),
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
    #[error("{0} has no timestamp or no signature")]
    Malformed(&'static str),
}

impl Rule {
    /// A Standard Webhooks secret (`whsec_…`) is the base64 of its key; for the
    /// other modes the secret is used exactly as written, as their senders do.
    pub fn new(mode: Mode, secret: &str, header: Option<String>, tolerance_s: i64) -> Rule {
        // Svix secrets are Standard Webhooks ones; Stripe's whsec_ secrets
        // are keys as written.
        let secret = match mode {
            Mode::StandardWebhooks | Mode::Svix => {
                signature::decode_secret(secret).unwrap_or_else(|_| secret.as_bytes().to_vec())
            }
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
        Mode::StandardWebhooks | Mode::Svix => {
            let prefix = if rule.mode == Mode::Svix { "svix" } else { "webhook" };
            let id = need(&format!("{prefix}-id"))?;
            let ts = timestamp(need(&format!("{prefix}-timestamp"))?, rule, now_s)?;
            let sigs = need(&format!("{prefix}-signature"))?;
            let expected = signature::sign_with_key(&rule.secret, id, ts, body);
            if sigs.split(' ').filter(|s| !s.is_empty()).any(|s| constant_time_eq(s.as_bytes(), expected.as_bytes())) {
                Ok(())
            } else {
                Err(Refusal::BadSignature)
            }
        }
        // Stripe-Signature: t=<ts>,v1=<hex HMAC of "t.body">[,v1=…][,v0=…]
        Mode::Stripe => {
            let given = need("stripe-signature")?;
            let parts = given.split(',').filter_map(|p| p.trim().split_once('='));
            let (mut t, mut v1) = (None, Vec::new());
            for (k, v) in parts {
                match k {
                    "t" => t = Some(v),
                    "v1" => v1.push(v),
                    _ => {}
                }
            }
            let (Some(t), false) = (t, v1.is_empty()) else {
                return Err(Refusal::Malformed("stripe-signature"));
            };
            let ts = timestamp(t, rule, now_s)?;
            let expected = hex(&hmac_sha256(&rule.secret, &[ts.to_string().as_bytes(), b".", body]));
            hex_match(v1.into_iter(), &expected)
        }
        Mode::Github => {
            let given = need("x-hub-signature-256")?.trim();
            let expected = format!("sha256={}", hex(&hmac_sha256(&rule.secret, &[body])));
            hex_match(std::iter::once(given), &expected)
        }
        Mode::Shopify => {
            let given = B64.decode(need("x-shopify-hmac-sha256")?.trim()).map_err(|_| Refusal::BadSignature)?;
            if constant_time_eq(&given, &hmac_sha256(&rule.secret, &[body])) {
                Ok(())
            } else {
                Err(Refusal::BadSignature)
            }
        }
        // X-Slack-Signature: v0=<hex HMAC of "v0:ts:body">
        Mode::Slack => {
            let ts = timestamp(need("x-slack-request-timestamp")?, rule, now_s)?;
            let given = need("x-slack-signature")?.trim();
            let expected =
                format!("v0={}", hex(&hmac_sha256(&rule.secret, &[b"v0:", ts.to_string().as_bytes(), b":", body])));
            hex_match(std::iter::once(given), &expected)
        }
        // X-Twilio-Signature: base64 HMAC-SHA1 of the full URL, then each form
        // parameter's name and value, sorted by name.
        Mode::Twilio => {
            let given = B64.decode(need("x-twilio-signature")?.trim()).map_err(|_| Refusal::BadSignature)?;
            let url = need(URL_HEADER)?;
            let mut params: Vec<(String, String)> =
                url::form_urlencoded::parse(body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
            params.sort();
            let mut mac = Hmac::<Sha1>::new_from_slice(&rule.secret).expect("any key length");
            mac.update(url.as_bytes());
            for (k, v) in &params {
                mac.update(k.as_bytes());
                mac.update(v.as_bytes());
            }
            // verify_slice compares in constant time.
            mac.verify_slice(&given).map_err(|_| Refusal::BadSignature)
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

/// A signed timestamp, within the source's tolerance of now.
fn timestamp(text: &str, rule: &Rule, now_s: i64) -> Result<i64, Refusal> {
    let ts: i64 = text.trim().parse().map_err(|_| Refusal::BadTimestamp)?;
    // abs_diff: a timestamp near i64::MIN must not overflow into "fresh".
    if now_s.abs_diff(ts) > rule.tolerance_s.max(0) as u64 {
        return Err(Refusal::Stale);
    }
    Ok(ts)
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().to_vec()
}

/// Whether any candidate is the expected lower-case hex text (in constant
/// time per candidate; case-insensitive, as the providers' libraries are).
fn hex_match<'a>(mut candidates: impl Iterator<Item = &'a str>, expected: &str) -> Result<(), Refusal> {
    if candidates.any(|c| constant_time_eq(c.trim().to_ascii_lowercase().as_bytes(), expected.as_bytes())) {
        Ok(())
    } else {
        Err(Refusal::BadSignature)
    }
}

/// What a preset answers at once instead of queueing: Slack's
/// `url_verification` request (after its signature was verified) gets its
/// challenge back. Returns the content type and the body.
pub fn handshake(mode: Mode, body: &[u8]) -> Option<(&'static str, String)> {
    if mode != Mode::Slack {
        return None;
    }
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    if value.get("type")?.as_str()? != "url_verification" {
        return None;
    }
    let challenge = value.get("challenge")?.as_str()?;
    Some(("application/json", serde_json::json!({ "challenge": challenge }).to_string()))
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
    let stripe_event = || -> Option<String> {
        let value: serde_json::Value = serde_json::from_slice(body).ok()?;
        value.get("id")?.as_str().map(str::to_string)
    };
    match mode {
        Mode::Stripe => stripe_event(),
        _ => mode.id_header().and_then(&header).map(str::to_string),
    }
    .or_else(|| id_header.and_then(|name| header(&name.to_ascii_lowercase())).map(str::to_string))
    // A sender's id may be any length: long ones are stored hashed.
    .map(|key| crate::inbound::bounds::bounded_key(&key))
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

    /// Slack's documented example request (api.slack.com, "Verifying
    /// requests from Slack").
    #[test]
    fn slack_signatures_and_the_url_verification_handshake() {
        let r = rule(Mode::Slack, "8f742231b10e8888abcd99yyyzzz85a5", None);
        let body = b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
        let ok = [
            ("x-slack-request-timestamp", "1531420618"),
            ("x-slack-signature", "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"),
        ];
        assert_eq!(check(&r, &ok, body, 1531420618), Ok(()));
        assert_eq!(check(&r, &ok, body, 1531420618 + 301), Err(Refusal::Stale));
        assert_eq!(check(&r, &ok, b"token=other", 1531420618), Err(Refusal::BadSignature));
        assert_eq!(
            handshake(Mode::Slack, br#"{"token":"t","challenge":"3eZbrw1aB","type":"url_verification"}"#),
            Some(("application/json", r#"{"challenge":"3eZbrw1aB"}"#.to_string()))
        );
        assert_eq!(handshake(Mode::Slack, br#"{"type":"event_callback"}"#), None);
        assert_eq!(handshake(Mode::Github, br#"{"type":"url_verification","challenge":"x"}"#), None);
    }

    /// Twilio's documented example (twilio.com, "Webhooks security").
    #[test]
    fn twilio_signs_the_url_and_the_sorted_form_parameters() {
        let r = rule(Mode::Twilio, "12345", None);
        let body = b"CallSid=CA1234567890ABCDE&Caller=%2B12349013030&Digits=1234&From=%2B12349013030&To=%2B18005551212";
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        let ok = [(URL_HEADER, url), ("x-twilio-signature", "0/KCTR6DLpKmkAf8muzZqo1nDgQ=")];
        assert_eq!(check(&r, &ok, body, 0), Ok(()));
        assert_eq!(
            check(&r, &[(URL_HEADER, "https://other.example.com/"), ok[1]], body, 0),
            Err(Refusal::BadSignature)
        );
        assert_eq!(check(&r, &ok, b"Digits=9", 0), Err(Refusal::BadSignature));
    }

    #[test]
    fn stripe_github_shopify_and_svix_and_their_dedup_keys() {
        let secret = "whsec_test_secret";
        let body = br#"{"id":"evt_1","type":"charge.succeeded"}"#;
        let sig = hex(&hmac_sha256(secret.as_bytes(), &[b"1700000000.", body]));
        let r = rule(Mode::Stripe, secret, None);
        let header = format!("t=1700000000,v1=0000,v1={sig},v0=abc");
        assert_eq!(check(&r, &[("stripe-signature", &header)], body, 1700000100), Ok(()), "any v1");
        assert_eq!(check(&r, &[("stripe-signature", "v1=00")], body, 0), Err(Refusal::Malformed("stripe-signature")));
        assert_eq!(check(&r, &[("stripe-signature", &header)], body, 1700000400), Err(Refusal::Stale));
        assert_eq!(dedup_key(Mode::Stripe, None, |_| None, body), "evt_1");

        let r = rule(Mode::Github, "It's a Secret to Everybody", None);
        let ok = [("x-hub-signature-256", "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17")];
        assert_eq!(check(&r, &ok, b"Hello, World!", 0), Ok(()));
        assert_eq!(check(&r, &ok, b"Hello", 0), Err(Refusal::BadSignature));
        let headers = std::collections::HashMap::from([("x-github-delivery", "d-1"), ("x-shopify-webhook-id", "s-1")]);
        assert_eq!(dedup_key(Mode::Github, None, |n| headers.get(n).copied(), b""), "d-1");
        assert_eq!(dedup_key(Mode::Shopify, None, |n| headers.get(n).copied(), b""), "s-1");

        let r = rule(Mode::Shopify, "shpss", None);
        let good = B64.encode(hmac_sha256(b"shpss", &[b"{}"]));
        assert_eq!(check(&r, &[("x-shopify-hmac-sha256", &good)], b"{}", 0), Ok(()));
        assert_eq!(check(&r, &[("x-shopify-hmac-sha256", "AAAA")], b"{}", 0), Err(Refusal::BadSignature));

        // Svix: the Standard Webhooks vector under svix-* names.
        let r = rule(Mode::Svix, SECRET, None);
        let ok = [
            ("svix-id", ID),
            ("svix-timestamp", "1614265330"),
            ("svix-signature", "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="),
        ];
        assert_eq!(check(&r, &ok, BODY, TS), Ok(()));
        assert_eq!(check(&r, &ok[..2], BODY, TS), Err(Refusal::MissingHeader("svix-signature".into())));
        let headers = std::collections::HashMap::from([("svix-id", ID)]);
        assert_eq!(dedup_key(Mode::Svix, None, |n| headers.get(n).copied(), BODY), ID);
    }

    #[test]
    fn body_hashes_are_hex_sha256() {
        assert_eq!(body_hash(b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }
}
