//! Endpoint authentication: none, HTTP basic, bearer token, an API key in
//! a named header, or an OAuth2 credential of the endpoint's integration
//! (whose current access token the claim puts in as a bearer token). Stored
//! where only `ihub_admin` reads it; turned into one request header at send
//! time.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Auth {
    None,
    Basic {
        username: String,
        password: String,
    },
    Bearer {
        token: String,
    },
    ApiKey {
        header: String,
        value: String,
    },
    /// The OAuth2 credential of this name (`ihub.create_oauth2`): no secret
    /// here, only which credential's access token to send.
    #[serde(rename = "oauth2")]
    OAuth2 {
        credential: String,
    },
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AuthError {
    #[error("auth must be a JSON object with a \"type\" of none, basic, bearer, api_key or oauth2")]
    Shape,
    #[error("auth type \"{0}\" is not supported")]
    UnknownType(String),
    #[error("auth of type \"{kind}\" needs {needs}")]
    Missing { kind: &'static str, needs: &'static str },
    #[error("\"{0}\" is not a valid HTTP header name")]
    HeaderName(String),
}

pub const AUTH_HINT: &str = r#"Use {"type":"none"}, {"type":"basic","username":"…","password":"…"}, {"type":"bearer","token":"…"}, {"type":"api_key","header":"X-API-Key","value":"…"} or {"type":"oauth2","credential":"<name given to ihub.create_oauth2>"}."#;

impl Auth {
    /// Parses user input. Errors name the problem but never repeat a value.
    pub fn from_json(value: &Value) -> Result<Auth, AuthError> {
        let map = match value {
            Value::Null => return Ok(Auth::None),
            Value::Object(map) => map,
            _ => return Err(AuthError::Shape),
        };
        let kind = map.get("type").and_then(Value::as_str).ok_or(AuthError::Shape)?;
        let text = |key: &str| map.get(key).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string);
        let allowed: &[&str] = match kind {
            "none" => &["type"],
            "basic" => &["type", "username", "password"],
            "bearer" => &["type", "token"],
            "api_key" | "api-key" | "apikey" => &["type", "header", "value"],
            "oauth2" => &["type", "credential"],
            other => return Err(AuthError::UnknownType(other.chars().take(40).collect())),
        };
        if map.keys().any(|k| !allowed.contains(&k.as_str())) {
            return Err(AuthError::Shape);
        }
        Ok(match kind {
            "none" => Auth::None,
            "basic" => match (text("username"), text("password")) {
                (Some(username), Some(password)) => Auth::Basic { username, password },
                _ => return Err(AuthError::Missing { kind: "basic", needs: "\"username\" and \"password\"" }),
            },
            "bearer" => Auth::Bearer {
                token: text("token").ok_or(AuthError::Missing { kind: "bearer", needs: "a \"token\"" })?,
            },
            "oauth2" => Auth::OAuth2 {
                credential: text("credential").ok_or(AuthError::Missing {
                    kind: "oauth2",
                    needs: "a \"credential\": the name of one of the integration's OAuth2 credentials",
                })?,
            },
            _ => {
                let (Some(header), Some(value)) = (text("header"), text("value")) else {
                    return Err(AuthError::Missing { kind: "api_key", needs: "a \"header\" name and a \"value\"" });
                };
                if reqwest::header::HeaderName::from_bytes(header.as_bytes()).is_err() {
                    return Err(AuthError::HeaderName(header));
                }
                Auth::ApiKey { header, value }
            }
        })
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Auth::None => "none",
            Auth::Basic { .. } => "basic",
            Auth::Bearer { .. } => "bearer",
            Auth::ApiKey { .. } => "api_key",
            Auth::OAuth2 { .. } => "oauth2",
        }
    }

    /// The header that carries the credential, if any. An OAuth2 credential
    /// has none of its own: the claim sends its access token as `Bearer`.
    pub fn header(&self) -> Option<(String, String)> {
        match self {
            Auth::None | Auth::OAuth2 { .. } => None,
            Auth::Basic { username, password } => {
                Some(("authorization".into(), format!("Basic {}", B64.encode(format!("{username}:{password}")))))
            }
            Auth::Bearer { token } => Some(("authorization".into(), format!("Bearer {token}"))),
            Auth::ApiKey { header, value } => Some((header.to_ascii_lowercase(), value.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_kind_becomes_its_header() {
        let basic = Auth::from_json(&json!({"type":"basic","username":"Aladdin","password":"open sesame"})).unwrap();
        assert_eq!(basic.header().unwrap().1, "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
        let bearer = Auth::from_json(&json!({"type":"bearer","token":"t0k"})).unwrap();
        assert_eq!(bearer.header(), Some(("authorization".into(), "Bearer t0k".into())));
        let key = Auth::from_json(&json!({"type":"api_key","header":"X-API-Key","value":"v"})).unwrap();
        assert_eq!(key.header(), Some(("x-api-key".into(), "v".into())));
        assert_eq!(Auth::from_json(&json!({"type":"none"})).unwrap().header(), None);
        assert_eq!(Auth::from_json(&Value::Null).unwrap(), Auth::None);
        let oauth2 = Auth::from_json(&json!({"type":"oauth2","credential":"crm"})).unwrap();
        assert_eq!(oauth2, Auth::OAuth2 { credential: "crm".into() });
        assert_eq!(oauth2.header(), None);
        assert_eq!(serde_json::to_value(&oauth2).unwrap(), json!({"type":"oauth2","credential":"crm"}));
        assert!(matches!(Auth::from_json(&json!({"type":"oauth2"})), Err(AuthError::Missing { .. })));
    }

    #[test]
    fn invalid_auth_is_named_without_values() {
        assert_eq!(Auth::from_json(&json!("bearer")), Err(AuthError::Shape));
        assert_eq!(Auth::from_json(&json!({"type":"oauth9"})), Err(AuthError::UnknownType("oauth9".into())));
        let e = Auth::from_json(&json!({"type":"basic","username":"u"})).unwrap_err();
        assert!(matches!(e, AuthError::Missing { .. }));
        let e = Auth::from_json(&json!({"type":"bearer","token":"s3cret","extra":1})).unwrap_err();
        assert!(!e.to_string().contains("s3cret"));
        assert!(matches!(
            Auth::from_json(&json!({"type":"api_key","header":"bad header","value":"v"})),
            Err(AuthError::HeaderName(_))
        ));
    }
}
