//! Masking of secrets in headers before they are stored or shown.

pub const MASK: &str = "********";

/// Names whose whole value is a credential. The providers' signature
/// headers are among them: GitHub's, Shopify's and Twilio's sign no
/// timestamp, so whoever reads one (a viewer of ihub.inbound_items) could
/// send the request again under a new delivery id.
const EXACT: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "key",
    "sig",
    "signature_key",
    "x-hub-signature",
    "x-hub-signature-256",
    "x-shopify-hmac-sha256",
    "x-twilio-signature",
    "stripe-signature",
    "x-slack-signature",
    "svix-signature",
];
/// Parts of names whose values are credentials; also what `mask_text` looks for.
const PARTS: &[&str] = &[
    "token",
    "secret",
    "password",
    "passwd",
    "pwd",
    "api-key",
    "apikey",
    "api_key",
    "session",
    "credential",
    "private",
];

/// Names (header, setting or query parameter) whose values are credentials.
pub fn is_sensitive_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    EXACT.contains(&lower.as_str()) || PARTS.iter().any(|p| lower.contains(p))
}

/// Header names whose values are credentials; `extra` adds names known to
/// carry one (an endpoint's API-key header).
pub fn is_sensitive_header(name: &str, extra: &[String]) -> bool {
    is_sensitive_name(name) || extra.iter().any(|e| e.eq_ignore_ascii_case(name))
}

/// A JSON value with the values of sensitive keys masked, at any depth.
pub fn mask_json(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let v =
                        if is_sensitive_name(&k) && !v.is_null() { Value::String(MASK.into()) } else { mask_json(v) };
                    (k, v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(mask_json).collect()),
        other => other,
    }
}

/// A URL with the values of sensitive query parameters masked.
pub fn mask_url(raw: &str) -> String {
    let Some((base, rest)) = raw.split_once('?') else {
        return raw.to_string();
    };
    let (query, fragment) = match rest.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (rest, None),
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if is_sensitive_name(k) => format!("{k}={MASK}"),
            _ => pair.to_string(),
        })
        .collect();
    let mut out = format!("{base}?{}", query.join("&"));
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

/// Free text (a log message) with credentials masked, by the same names as
/// headers and settings: whole `Authorization:`/`Cookie:` values, `Bearer …`
/// and `Basic …`, `key=value` or `key: value` pairs whose key looks secret,
/// and Standard Webhooks secrets.
pub fn mask_text(text: &str) -> String {
    use std::sync::OnceLock;
    struct Patterns {
        cookie: regex::Regex,
        authorization: regex::Regex,
        auth: regex::Regex,
        pair: regex::Regex,
        whsec: regex::Regex,
        masked_value: String,
        masked_auth: String,
        masked_whsec: String,
    }
    static PATTERNS: OnceLock<Patterns> = OnceLock::new();
    let p = PATTERNS.get_or_init(|| {
        let words = PARTS.iter().map(|w| regex::escape(w)).collect::<Vec<_>>().join("|");
        Patterns {
            // A cookie header's value runs to the end of the line; an
            // Authorization value is a scheme and a credential.
            cookie: regex::Regex::new(r#"(?i)\b((?:set-)?cookie)(["']?\s*[:=]\s*["']?)([^\r\n"']+)"#).unwrap(),
            authorization: regex::Regex::new(
                r#"(?i)\b((?:proxy-)?authorization)(["']?\s*[:=]\s*["']?)([^\s"']+(?:[ \t]+[^\s"',;]+)?)"#,
            )
            .unwrap(),
            auth: regex::Regex::new(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{6,}").unwrap(),
            pair: regex::Regex::new(&format!(
                r#"(?i)\b([a-z0-9_-]*(?:{words})[a-z0-9_-]*)(["']?\s*[:=]\s*["']?)([^\s"'&,;]+)"#
            ))
            .unwrap(),
            // Signing secrets: HMAC (whsec_) and ed25519 (whsk_); whpk_ public keys stay.
            whsec: regex::Regex::new(r"(whsec|whsk)_[A-Za-z0-9+/=]+").unwrap(),
            masked_value: format!("$1$2{MASK}"),
            masked_auth: format!("$1 {MASK}"),
            masked_whsec: format!("${{1}}_{MASK}"),
        }
    });
    let text = p.cookie.replace_all(text, p.masked_value.as_str());
    let text = p.authorization.replace_all(&text, p.masked_value.as_str());
    let text = p.auth.replace_all(&text, p.masked_auth.as_str());
    let text = p.pair.replace_all(&text, p.masked_value.as_str());
    p.whsec.replace_all(&text, p.masked_whsec.as_str()).into_owned()
}

/// Returns the headers with credential values replaced by [`MASK`].
pub fn mask_headers(headers: &[(String, String)], extra: &[String]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| {
            let v = if is_sensitive_header(k, extra) { MASK.to_string() } else { v.clone() };
            (k.clone(), v)
        })
        .collect()
}

/// A `webhook-signature` value with each signature masked and its version
/// kept (`v1,********`): the signature is computed with the endpoint's
/// secret, and whoever holds it can replay the message.
pub fn mask_signature(value: &str) -> String {
    value
        .split(' ')
        .filter(|s| !s.is_empty())
        .map(|sig| match sig.split_once(',') {
            Some((version, _)) => format!("{version},{MASK}"),
            None => MASK.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Request headers of a delivery attempt as recorded: credential-looking
/// names, the `secret` names (secret custom headers, the auth header) and the
/// signature masked.
pub fn mask_request_headers(headers: &[(String, String)], secret: &[String]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| {
            let v = if k.eq_ignore_ascii_case("webhook-signature") {
                mask_signature(v)
            } else if is_sensitive_header(k, secret) {
                MASK.to_string()
            } else {
                v.clone()
            };
            (k.clone(), v)
        })
        .collect()
}

/// A custom header value in the form that views may show,
/// `{"value": "…", "secret": false}`: its value.
fn shown_value(value: &serde_json::Value) -> Option<&str> {
    let form = value.as_object()?;
    if form.len() == 2 && form.get("secret")?.as_bool() == Some(false) {
        form.get("value")?.as_str()
    } else {
        None
    }
}

/// An endpoint's (or a request's) custom headers for views: every value is
/// masked except those given as `{"value": "…", "secret": false}`, shown as
/// their plain value.
pub fn mask_endpoint_headers(headers: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match headers {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let v = Value::String(shown_value(&v).unwrap_or(MASK).to_string());
                    (k, v)
                })
                .collect(),
        ),
        _ => Value::Null,
    }
}

/// Headers as stored (name to string; older rows or other callers may hold
/// the custom header forms) for views: credential-looking names and `extra`
/// masked; an object value is masked unless it is the shown form.
pub fn mask_stored_headers(headers: serde_json::Value, extra: &[String]) -> serde_json::Value {
    use serde_json::Value;
    match headers {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let v = match v {
                        _ if is_sensitive_header(&k, extra) => Value::String(MASK.into()),
                        Value::Object(_) => Value::String(shown_value(&v).unwrap_or(MASK).to_string()),
                        other => other,
                    };
                    (k, v)
                })
                .collect(),
        ),
        _ => Value::Null,
    }
}

/// Request headers of a stored delivery attempt for views: as
/// [`mask_stored_headers`], and also the signature and every header that
/// `custom` (the endpoint's and the request's custom headers) does not show.
/// Attempts recorded by 0.1.0 kept both in clear.
pub fn mask_attempt_headers(headers: serde_json::Value, custom: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    let secret: Vec<String> = custom
        .as_object()
        .map(|m| m.iter().filter(|(_, v)| shown_value(v).is_none()).map(|(k, _)| k.to_ascii_lowercase()).collect())
        .unwrap_or_default();
    match mask_stored_headers(headers, &secret) {
        Value::Object(mut map) => {
            for (k, v) in map.iter_mut() {
                if k.eq_ignore_ascii_case("webhook-signature") {
                    if let Value::String(s) = v {
                        *s = mask_signature(s);
                    }
                }
            }
            Value::Object(map)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_masked_and_the_rest_kept() {
        let h = vec![
            ("Authorization".to_string(), "Bearer abc".to_string()),
            ("X-Api-Key".to_string(), "k".to_string()),
            ("X-Custom-Auth".to_string(), "c".to_string()),
            ("X-Shop-Token".to_string(), "t".to_string()),
            ("content-type".to_string(), "application/json".to_string()),
            ("webhook-id".to_string(), "evt_1".to_string()),
        ];
        let m = mask_headers(&h, &["x-custom-auth".to_string()]);
        let values: Vec<&str> = m.iter().map(|(_, v)| v.as_str()).collect();
        assert_eq!(values, vec![MASK, MASK, MASK, MASK, "application/json", "evt_1"]);
    }

    #[test]
    fn endpoint_headers_are_all_masked_unless_shown() {
        let h = serde_json::json!({
            "X-Functions-Key": "fk",
            "Ocp-Apim-Subscription-Key": {"value": "apim", "secret": true},
            "X-Trace": {"value": "abc", "secret": false},
            "X-Tenant": "acme",
            "X-Odd": {"value": "v", "secret": false, "extra": 1},
        });
        assert_eq!(
            mask_endpoint_headers(h),
            serde_json::json!({
                "X-Functions-Key": MASK, "Ocp-Apim-Subscription-Key": MASK, "X-Trace": "abc",
                "X-Tenant": MASK, "X-Odd": MASK,
            })
        );
        assert_eq!(mask_endpoint_headers(serde_json::json!("x")), serde_json::Value::Null);
    }

    #[test]
    fn stored_headers_keep_name_based_masking() {
        // Inbound request headers: only credential-looking names and the extra one.
        let h = serde_json::json!({
            "authorization": "Bearer a", "x-zoho-webhook-secret": "z", "x-hook-sig": "s",
            "content-type": "application/json", "webhook-signature": "v1,abc",
            "x-shown": {"value": "v", "secret": false}, "x-hidden": {"value": "h"},
        });
        assert_eq!(
            mask_stored_headers(h, &["x-hook-sig".to_string()]),
            serde_json::json!({
                "authorization": MASK, "x-zoho-webhook-secret": MASK, "x-hook-sig": MASK,
                "content-type": "application/json", "webhook-signature": "v1,abc",
                "x-shown": "v", "x-hidden": MASK,
            })
        );
    }

    #[test]
    fn attempt_headers_mask_the_signature_and_secret_custom_headers() {
        assert_eq!(mask_signature("v1,abc= v1,def="), format!("v1,{MASK} v1,{MASK}"));
        assert_eq!(mask_signature("garbage"), MASK);
        assert_eq!(mask_signature(&mask_signature("v1,abc")), format!("v1,{MASK}"));
        let sent = vec![
            ("content-type".to_string(), "application/json".to_string()),
            ("x-functions-key".to_string(), "fk".to_string()),
            ("x-trace".to_string(), "abc".to_string()),
            ("x-api-key".to_string(), "k".to_string()),
            ("webhook-id".to_string(), "evt_1".to_string()),
            ("webhook-signature".to_string(), "v1,sig=".to_string()),
        ];
        let m = mask_request_headers(&sent, &["x-functions-key".to_string()]);
        let values: Vec<&str> = m.iter().map(|(_, v)| v.as_str()).collect();
        assert_eq!(values, vec!["application/json", MASK, "abc", MASK, "evt_1", "v1,********"]);
        // As recorded by 0.1.0: in clear, masked for views by the endpoint's headers.
        let recorded = serde_json::json!({
            "content-type": "application/json", "x-functions-key": "fk", "x-trace": "abc",
            "webhook-id": "evt_1", "webhook-signature": "v1,sig= v1,old=",
        });
        let custom = serde_json::json!({"X-Functions-Key": "fk", "X-Trace": {"value": "abc", "secret": false}});
        assert_eq!(
            mask_attempt_headers(recorded, &custom),
            serde_json::json!({
                "content-type": "application/json", "x-functions-key": MASK, "x-trace": "abc",
                "webhook-id": "evt_1", "webhook-signature": format!("v1,{MASK} v1,{MASK}"),
            })
        );
    }

    #[test]
    fn provider_signature_headers_are_masked() {
        for name in ["X-Hub-Signature-256", "x-shopify-hmac-sha256", "X-Twilio-Signature", "Stripe-Signature"] {
            assert!(is_sensitive_name(name), "{name}");
        }
        assert!(!is_sensitive_name("webhook-id") && !is_sensitive_name("x-github-delivery"));
    }

    #[test]
    fn secrets_in_free_text_are_masked() {
        let m = mask_text(
            "got 401 with Authorization: Bearer abc.def-123 and password=hunter2, api_key: \"k-99\" token=t0k whsec_MfKQ9r8Gw== whsk_TWZLUTlyOEdL for user ada",
        );
        for secret in ["abc.def-123", "hunter2", "k-99", "t0k", "MfKQ9r8Gw", "TWZLUTlyOEdL"] {
            assert!(!m.contains(secret), "{secret} left in {m}");
        }
        assert!(
            m.contains("got 401") && m.contains("user ada") && m.contains("password=") && m.contains("whsk_"),
            "{m}"
        );
        assert_eq!(mask_text("nothing to hide here"), "nothing to hide here");
        // Header lines that header masking hides are hidden in text too.
        let m = mask_text(
            "sent Cookie: session=abc123; theme=dark\nAuthorization: Token ghp_abcdef123\nX-Session-Id: s-42 ok",
        );
        for secret in ["abc123", "ghp_abcdef123", "s-42"] {
            assert!(!m.contains(secret), "{secret} left in {m}");
        }
        assert!(m.ends_with(" ok"), "{m}");
    }

    #[test]
    fn settings_and_urls_are_masked_at_any_depth() {
        let v =
            serde_json::json!({"base_url": "https://x", "api_key": "k", "oauth": {"client_secret": "s", "scope": "a"}});
        assert_eq!(
            mask_json(v),
            serde_json::json!({"base_url": "https://x", "api_key": MASK, "oauth": {"client_secret": MASK, "scope": "a"}})
        );
        assert_eq!(mask_url("https://h/p?token=abc&page=2"), format!("https://h/p?token={MASK}&page=2"));
        assert_eq!(mask_url("https://h/p"), "https://h/p");
    }
}
