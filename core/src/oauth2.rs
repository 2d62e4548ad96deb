//! OAuth2 clients for endpoints (RFC 6749): the token requests of the
//! `refresh_token`, `client_credentials` and `authorization_code` grants,
//! reading what the token endpoint answers, when a token is refreshed, and
//! the authorization URL a person opens. Errors never repeat a secret: the
//! client secret, refresh token, code and tokens are scrubbed from every
//! message, whatever the token endpoint echoes.

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::Value;

use crate::outbound::mask::mask_text;
use crate::outbound::sender::{describe, guarded_client};
use crate::outbound::target::{check_url, AllowList};

/// How the client authenticates to the token endpoint: in the form body
/// (`client_id`, `client_secret`), as most providers document, or with HTTP
/// Basic (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    Post,
    Basic,
}

impl ClientAuth {
    pub fn parse(text: &str) -> Option<ClientAuth> {
        match text {
            "post" => Some(ClientAuth::Post),
            "basic" => Some(ClientAuth::Basic),
            _ => None,
        }
    }
}

/// A client as registered with the provider.
#[derive(Debug, Clone)]
pub struct Client {
    pub token_url: String,
    pub client_id: String,
    pub client_secret: String,
    pub scope: Option<String>,
    pub client_auth: ClientAuth,
}

/// What to ask the token endpoint for.
#[derive(Debug, Clone)]
pub enum Grant {
    RefreshToken(String),
    ClientCredentials,
    AuthorizationCode { code: String, redirect_uri: String },
}

/// A token endpoint's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    pub access_token: String,
    /// Seconds the access token lives, when the endpoint says.
    pub expires_in: Option<u64>,
    /// A new refresh token (rotation), when the endpoint sends one.
    pub refresh_token: Option<String>,
    pub scope: Option<String>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum TokenError {
    /// The endpoint refused (RFC 6749 §5.2), e.g. `invalid_grant`.
    #[error("the token endpoint answered HTTP {status}{}", describe_refusal(.error, .description))]
    Refused { status: u16, error: Option<String>, description: Option<String> },
    #[error("the token endpoint answered HTTP {0} without a JSON token response")]
    NotJson(u16),
    #[error("the token endpoint's answer has no access_token")]
    NoAccessToken,
    #[error("the token endpoint issued a \"{0}\" token; only bearer tokens can be sent")]
    TokenType(String),
    #[error("{0}")]
    Transport(String),
}

impl TokenError {
    /// Whether trying again later can help: the endpoint could not be
    /// reached or failed; a refusal of the grant needs a person.
    pub fn transient(&self) -> bool {
        match self {
            TokenError::Transport(_) => true,
            TokenError::Refused { status, .. } | TokenError::NotJson(status) => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

fn describe_refusal(error: &Option<String>, description: &Option<String>) -> String {
    match (error, description) {
        (Some(e), Some(d)) => format!(": {e} ({d})"),
        (Some(e), None) => format!(": {e}"),
        _ => String::new(),
    }
}

/// Token responses are small; a larger one is not read past this.
const RESPONSE_LIMIT: usize = 64 * 1024;
/// Error texts from the endpoint are kept to this many characters.
const TEXT_LIMIT: usize = 200;

/// The form of a token request, and the Basic credentials when the client
/// authenticates that way.
pub fn token_form(client: &Client, grant: &Grant) -> (String, Option<String>) {
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    match grant {
        Grant::RefreshToken(token) => {
            form.append_pair("grant_type", "refresh_token");
            form.append_pair("refresh_token", token);
        }
        Grant::ClientCredentials => {
            form.append_pair("grant_type", "client_credentials");
        }
        Grant::AuthorizationCode { code, redirect_uri } => {
            form.append_pair("grant_type", "authorization_code");
            form.append_pair("code", code);
            form.append_pair("redirect_uri", redirect_uri);
        }
    }
    if let Some(scope) = client.scope.as_deref().filter(|s| !s.is_empty()) {
        if !matches!(grant, Grant::AuthorizationCode { .. }) {
            form.append_pair("scope", scope);
        }
    }
    let basic = match client.client_auth {
        ClientAuth::Post => {
            form.append_pair("client_id", &client.client_id);
            form.append_pair("client_secret", &client.client_secret);
            None
        }
        ClientAuth::Basic => {
            // RFC 6749 §2.3.1: each part form-encoded first.
            let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            Some(format!("Basic {}", B64.encode(format!("{}:{}", enc(&client.client_id), enc(&client.client_secret)))))
        }
    };
    (form.finish(), basic)
}

/// Reads a token endpoint's answer.
pub fn parse_token_response(status: u16, body: &str) -> Result<Tokens, TokenError> {
    let json: Option<Value> = serde_json::from_str(body).ok();
    let text = |v: &Value, key: &str| -> Option<String> {
        v.get(key).and_then(Value::as_str).filter(|s| !s.is_empty()).map(|s| s.chars().take(TEXT_LIMIT).collect())
    };
    if !(200..300).contains(&status) {
        return Err(match json {
            Some(v) => {
                TokenError::Refused { status, error: text(&v, "error"), description: text(&v, "error_description") }
            }
            None => TokenError::Refused { status, error: None, description: None },
        });
    }
    let Some(v) = json.filter(Value::is_object) else {
        return Err(TokenError::NotJson(status));
    };
    let access_token = v.get("access_token").and_then(Value::as_str).filter(|s| !s.is_empty());
    let Some(access_token) = access_token else {
        return Err(TokenError::NoAccessToken);
    };
    if let Some(kind) = v.get("token_type").and_then(Value::as_str) {
        if !kind.eq_ignore_ascii_case("bearer") {
            return Err(TokenError::TokenType(kind.chars().take(40).collect()));
        }
    }
    // Some providers send expires_in as a string.
    let expires_in = match v.get("expires_in") {
        Some(Value::Number(n)) => n.as_u64().or_else(|| n.as_f64().map(|f| f.max(0.0) as u64)),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    }
    .map(|s: u64| s.min(MAX_EXPIRES_IN));
    Ok(Tokens {
        access_token: access_token.to_string(),
        expires_in,
        refresh_token: v.get("refresh_token").and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string),
        scope: text(&v, "scope"),
    })
}

/// Seconds after it was issued when an access token living `expires_in`
/// seconds is refreshed: a quarter of its life early, at most five minutes.
pub fn refresh_after(expires_in: u64) -> f64 {
    let life = expires_in as f64;
    life - (life / 4.0).min(300.0)
}

/// Longest token life taken from a token endpoint (ten years): a larger
/// `expires_in` would not fit a timestamp.
pub const MAX_EXPIRES_IN: u64 = 10 * 365 * 86_400;

/// What a `401` to an OAuth2 access token means for a delivery.
#[derive(Debug, PartialEq, Eq)]
pub enum Unauthorized {
    /// The first 401: ask for a new token, and send again once it is there.
    RefreshAndRetry,
    /// The token it refused last time is still the current one (no new one
    /// yet): wait for it, as for any failure worth retrying.
    WaitForToken,
    /// A new token was refused too: the receiver means it.
    Final,
}

/// `refused`: the token version the receiver answered 401 to last time, if
/// any; `sent`: the version sent now; `refusing`: a receiver of this
/// credential refused a new token lately (no new one is asked for then).
pub fn after_401(refused: Option<i32>, sent: i32, refusing: bool) -> Unauthorized {
    match refused {
        _ if refusing => Unauthorized::Final,
        None => Unauthorized::RefreshAndRetry,
        Some(v) if v == sent => Unauthorized::WaitForToken,
        Some(_) => Unauthorized::Final,
    }
}

/// The URL a person opens to let this client act for them (RFC 6749 §4.1.1).
pub fn authorize_url(
    authorize_url: &str,
    client_id: &str,
    redirect_uri: &str,
    scope: Option<&str>,
    state: &str,
) -> Result<String, String> {
    let mut url = url::Url::parse(authorize_url).map_err(|_| "authorize_url is not a valid URL".to_string())?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("authorize_url must be an http or https URL".into());
    }
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("response_type", "code");
        q.append_pair("client_id", client_id);
        q.append_pair("redirect_uri", redirect_uri);
        if let Some(scope) = scope.filter(|s| !s.is_empty()) {
            q.append_pair("scope", scope);
        }
        q.append_pair("state", state);
    }
    Ok(url.into())
}

/// What a provider sends a person back to the callback with (RFC 6749
/// §4.1.2): a code and the state, or an error.
#[derive(Debug, Default, PartialEq)]
pub struct Callback {
    pub code: Option<String>,
    pub state: Option<String>,
    pub error: Option<String>,
}

/// Reads a callback's query string; the first of a repeated parameter counts.
pub fn callback_params(query: &str) -> Callback {
    let mut out = Callback::default();
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        let slot = match k.as_ref() {
            "code" => &mut out.code,
            "state" => &mut out.state,
            "error" => &mut out.error,
            _ => continue,
        };
        if slot.is_none() && !v.is_empty() {
            *slot = Some(v.chars().take(2048).collect());
        }
    }
    out
}

/// `message` with every secret in `secrets` replaced, and whatever else
/// looks like a credential masked.
pub fn scrub(message: &str, secrets: &[&str]) -> String {
    let mut out = message.to_string();
    for secret in secrets.iter().filter(|s| s.len() >= 4) {
        out = out.replace(secret, "********");
    }
    mask_text(&out)
}

/// Makes token requests, connecting only where the private-host allow-list
/// permits and through `ihub.http_proxy`, like the dispatchers.
pub struct TokenClient {
    client: reqwest::Client,
    allow: Arc<AllowList>,
    unusable: Option<String>,
}

impl TokenClient {
    pub fn new(allow: AllowList, proxy: &str, user_agent: &str) -> TokenClient {
        let allow = Arc::new(allow);
        let (client, unusable) = guarded_client(&allow, proxy, user_agent, 2);
        TokenClient { client, allow, unusable }
    }

    /// Asks the token endpoint for tokens. Errors are scrubbed of the
    /// client secret and of the grant's secrets.
    pub async fn request(&self, client: &Client, grant: &Grant, timeout: Duration) -> Result<Tokens, TokenError> {
        let secrets: Vec<&str> = {
            let mut s = vec![client.client_secret.as_str()];
            match grant {
                Grant::RefreshToken(t) => s.push(t),
                Grant::AuthorizationCode { code, .. } => s.push(code),
                Grant::ClientCredentials => {}
            }
            s
        };
        let scrubbed = |e: TokenError| match e {
            TokenError::Refused { status, error, description } => TokenError::Refused {
                status,
                error: error.map(|t| scrub(&t, &secrets)),
                description: description.map(|t| scrub(&t, &secrets)),
            },
            TokenError::Transport(t) => TokenError::Transport(scrub(&t, &secrets)),
            other => other,
        };
        self.exchange(client, grant, timeout).await.map_err(scrubbed)
    }

    /// Several requests at once (a batch of due credentials), answers in order.
    pub async fn request_all(
        &self,
        requests: &[(Client, Grant)],
        timeout: Duration,
    ) -> Vec<Result<Tokens, TokenError>> {
        futures_util::future::join_all(requests.iter().map(|(c, g)| self.request(c, g, timeout))).await
    }

    async fn exchange(&self, client: &Client, grant: &Grant, timeout: Duration) -> Result<Tokens, TokenError> {
        if let Some(reason) = &self.unusable {
            return Err(TokenError::Transport(format!("not sent: {reason}")));
        }
        check_url(&client.token_url, &self.allow).map_err(|e| TokenError::Transport(e.to_string()))?;
        let (form, basic) = token_form(client, grant);
        let mut request = self
            .client
            .post(&client.token_url)
            .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(form)
            .timeout(timeout);
        if let Some(basic) = basic {
            request = request.header(reqwest::header::AUTHORIZATION, basic);
        }
        let mut response = request.send().await.map_err(|e| TokenError::Transport(describe(e).1))?;
        let status = response.status().as_u16();
        let mut body = Vec::new();
        while body.len() <= RESPONSE_LIMIT {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) => break,
                Err(e) => return Err(TokenError::Transport(describe(e).1)),
            }
        }
        parse_token_response(status, &String::from_utf8_lossy(&body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    fn client(auth: ClientAuth) -> Client {
        Client {
            token_url: "http://127.0.0.1:1/token".into(),
            client_id: "app 1".into(),
            client_secret: "s3cr3t:x".into(),
            scope: Some("contacts.read contacts.write".into()),
            client_auth: auth,
        }
    }

    #[test]
    fn token_forms_carry_the_grant_and_the_client() {
        let (form, basic) = token_form(&client(ClientAuth::Post), &Grant::RefreshToken("rt/1".into()));
        assert_eq!(
            form,
            "grant_type=refresh_token&refresh_token=rt%2F1&scope=contacts.read+contacts.write&client_id=app+1&client_secret=s3cr3t%3Ax"
        );
        assert_eq!(basic, None);
        let (form, basic) = token_form(&client(ClientAuth::Basic), &Grant::ClientCredentials);
        assert_eq!(form, "grant_type=client_credentials&scope=contacts.read+contacts.write");
        // "app+1:s3cr3t%3Ax", as RFC 6749 2.3.1 encodes them.
        assert_eq!(basic.as_deref(), Some("Basic YXBwKzE6czNjcjN0JTNBeA=="));
        let code = Grant::AuthorizationCode { code: "c0de".into(), redirect_uri: "https://h/cb/x".into() };
        let (form, _) = token_form(&client(ClientAuth::Post), &code);
        assert!(form
            .starts_with("grant_type=authorization_code&code=c0de&redirect_uri=https%3A%2F%2Fh%2Fcb%2Fx&client_id="));
    }

    #[test]
    fn token_responses_are_read_and_refusals_named() {
        let ok = parse_token_response(
            200,
            &json!({"access_token": "at", "token_type": "Bearer", "expires_in": 3600, "refresh_token": "rt2"})
                .to_string(),
        )
        .unwrap();
        assert_eq!(ok.access_token, "at");
        assert_eq!(ok.expires_in, Some(3600));
        assert_eq!(ok.refresh_token.as_deref(), Some("rt2"));
        let s = parse_token_response(200, r#"{"access_token":"at","expires_in":"60"}"#).unwrap();
        assert_eq!((s.expires_in, s.refresh_token), (Some(60), None));
        assert_eq!(parse_token_response(200, r#"{"token_type":"bearer"}"#), Err(TokenError::NoAccessToken));
        assert_eq!(parse_token_response(200, "<html>"), Err(TokenError::NotJson(200)));
        assert!(matches!(
            parse_token_response(200, r#"{"access_token":"a","token_type":"mac"}"#),
            Err(TokenError::TokenType(_))
        ));
        let refused =
            parse_token_response(400, r#"{"error":"invalid_grant","error_description":"expired"}"#).unwrap_err();
        assert_eq!(refused.to_string(), "the token endpoint answered HTTP 400: invalid_grant (expired)");
        assert!(!refused.transient());
        assert!(parse_token_response(503, "busy").unwrap_err().transient());
    }

    #[test]
    fn tokens_are_refreshed_a_quarter_early_at_most_five_minutes() {
        assert_eq!(refresh_after(3), 2.25);
        assert_eq!(refresh_after(60), 45.0);
        assert_eq!(refresh_after(3600), 3300.0);
        assert_eq!(refresh_after(0), 0.0);
        let huge = parse_token_response(200, r#"{"access_token":"a","expires_in":18446744073709551615}"#).unwrap();
        assert_eq!(huge.expires_in, Some(MAX_EXPIRES_IN));
    }

    #[test]
    fn a_401_refreshes_once_then_waits_then_is_final() {
        assert_eq!(after_401(None, 3, false), Unauthorized::RefreshAndRetry);
        assert_eq!(after_401(Some(3), 3, false), Unauthorized::WaitForToken);
        assert_eq!(after_401(Some(3), 4, false), Unauthorized::Final);
        assert_eq!(after_401(None, 3, true), Unauthorized::Final, "refusing lately: no new token asked for");
    }

    #[test]
    fn authorize_urls_carry_client_redirect_scope_and_state() {
        let url = authorize_url(
            "https://crm.example/oauth/authorize?prompt=consent",
            "app",
            "https://h/cb",
            Some("a b"),
            "st",
        )
        .unwrap();
        assert_eq!(
            url,
            "https://crm.example/oauth/authorize?prompt=consent&response_type=code&client_id=app&redirect_uri=https%3A%2F%2Fh%2Fcb&scope=a+b&state=st"
        );
        assert!(authorize_url("not a url", "a", "b", None, "s").is_err());
        assert!(authorize_url("ftp://x/", "a", "b", None, "s").is_err());
    }

    #[test]
    fn callbacks_carry_a_code_and_state_or_an_error() {
        let c = callback_params("code=a%2Fb&state=s1&state=s2&x=1");
        assert_eq!(c, Callback { code: Some("a/b".into()), state: Some("s1".into()), error: None });
        let e = callback_params("error=access_denied&state=s");
        assert_eq!(e.error.as_deref(), Some("access_denied"));
        assert_eq!(callback_params(""), Callback::default());
    }

    #[test]
    fn scrub_removes_known_secrets_and_credentials() {
        let text = scrub("bad refresh token rt-12345 for client s3cr3t, Bearer abc.def", &["rt-12345", "s3cr3t"]);
        assert!(!text.contains("rt-12345") && !text.contains("s3cr3t") && !text.contains("abc.def"), "{text}");
    }

    /// A one-shot token endpoint answering `reply`; returns the request it saw.
    fn token_endpoint(reply: &'static str) -> (String, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
            let mut buf = vec![0u8; 8192];
            let mut seen = Vec::new();
            // Until the headers and as many body bytes as content-length says.
            let complete = |seen: &[u8]| {
                let text = String::from_utf8_lossy(seen);
                let Some((head, body)) = text.split_once("\r\n\r\n") else { return false };
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|n| n.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                body.len() >= length
            };
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
                if complete(&seen) {
                    break;
                }
            }
            s.write_all(reply.as_bytes()).unwrap();
            String::from_utf8_lossy(&seen).into_owned()
        });
        (url, handle)
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
    }

    #[test]
    fn a_refresh_posts_the_form_and_reads_the_tokens() {
        let body = r#"{"access_token":"new-at","token_type":"bearer","expires_in":120,"refresh_token":"rt-2"}"#;
        let reply: &'static str = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        );
        let (url, seen) = token_endpoint(reply);
        let tokens = TokenClient::new(AllowList::parse("127.0.0.0/8").unwrap(), "", "t");
        let c = Client { token_url: url, ..client(ClientAuth::Post) };
        let got = run(tokens.request(&c, &Grant::RefreshToken("rt-1".into()), Duration::from_secs(2))).unwrap();
        assert_eq!(got.access_token, "new-at");
        assert_eq!(got.refresh_token.as_deref(), Some("rt-2"));
        let seen = seen.join().unwrap();
        assert!(seen.starts_with("POST /token "), "{seen}");
        assert!(seen.contains("content-type: application/x-www-form-urlencoded"), "{seen}");
        assert!(seen.contains("grant_type=refresh_token&refresh_token=rt-1"), "{seen}");
    }

    #[test]
    fn a_refused_grant_is_reported_without_its_secrets() {
        let body = r#"{"error":"invalid_grant","error_description":"refresh token rt-1 was revoked"}"#;
        let reply: &'static str = Box::leak(
            format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        );
        let (url, _seen) = token_endpoint(reply);
        let tokens = TokenClient::new(AllowList::parse("127.0.0.0/8").unwrap(), "", "t");
        let c = Client { token_url: url, ..client(ClientAuth::Basic) };
        let err = run(tokens.request(&c, &Grant::RefreshToken("rt-1".into()), Duration::from_secs(2))).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("invalid_grant") && !text.contains("rt-1"), "{text}");
    }

    #[test]
    fn a_token_url_on_a_refused_address_is_not_asked() {
        let tokens = TokenClient::new(AllowList::default(), "", "t");
        let c = Client { token_url: "http://127.0.0.1:9/token".into(), ..client(ClientAuth::Post) };
        let err = run(tokens.request(&c, &Grant::ClientCredentials, Duration::from_secs(1))).unwrap_err();
        assert!(matches!(err, TokenError::Transport(_)), "{err}");
    }
}
