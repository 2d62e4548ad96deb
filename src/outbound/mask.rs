//! Masking of secrets in headers before they are stored or shown.

pub const MASK: &str = "********";

/// Names whose whole value is a credential.
const EXACT: &[&str] = &["authorization", "proxy-authorization", "cookie", "set-cookie", "key", "sig", "signature_key"];
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
            whsec: regex::Regex::new(r"whsec_[A-Za-z0-9+/=]+").unwrap(),
            masked_value: format!("$1$2{MASK}"),
            masked_auth: format!("$1 {MASK}"),
            masked_whsec: format!("whsec_{MASK}"),
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
    fn secrets_in_free_text_are_masked() {
        let m = mask_text(
            "got 401 with Authorization: Bearer abc.def-123 and password=hunter2, api_key: \"k-99\" token=t0k whsec_MfKQ9r8Gw== for user ada",
        );
        for secret in ["abc.def-123", "hunter2", "k-99", "t0k", "MfKQ9r8Gw"] {
            assert!(!m.contains(secret), "{secret} left in {m}");
        }
        assert!(m.contains("got 401") && m.contains("user ada") && m.contains("password="), "{m}");
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
