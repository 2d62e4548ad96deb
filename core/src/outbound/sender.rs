//! Sends a batch of signed webhook requests concurrently on the caller's
//! (single-threaded) tokio runtime and reports one attempt record per request.
//! Also what custom request headers may be, and how every HTTP client of the
//! extension is configured ([`client_builder`]: no proxy from the
//! environment, only `ihub.http_proxy`).

use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::stream::StreamExt;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

use super::auth::Auth;
use super::mask::mask_request_headers;
use super::signature::signature_header;
use super::target::{check_url, AllowList, TargetError};
use crate::retry::{parse_retry_after, Outcome};

/// One request to make, as claimed from the queue.
#[derive(Debug, Clone)]
pub struct Request {
    pub delivery_id: i64,
    pub event_id: String,
    pub method: String,
    pub url: String,
    /// Endpoint headers, then per-delivery headers; later entries win.
    pub headers: Vec<CustomHeader>,
    pub auth: Auth,
    pub secrets: Vec<String>,
    pub body: String,
    pub timeout: Duration,
    pub test_mode: bool,
    /// Bytes of the response body to read, when not the sender's limit (a
    /// request whose response goes to a handler reads all of it, up to
    /// `ihub.max_response_size`).
    pub body_limit: Option<usize>,
    /// Why it must not be sent (its OAuth2 credential has no valid access
    /// token): the attempt fails with this, to be retried.
    pub not_sendable: Option<String>,
}

/// What one attempt did, ready to be recorded.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub delivery_id: i64,
    pub started_at: SystemTime,
    pub duration: Duration,
    /// Request headers as sent, with credentials, secret custom headers and
    /// the signature masked.
    pub request_headers: Vec<(String, String)>,
    pub outcome: Outcome,
    pub status: Option<u16>,
    pub response_headers: Vec<(String, String)>,
    pub response_body: Option<String>,
    /// The body was longer than the limit and was cut there.
    pub response_truncated: bool,
    pub error: Option<String>,
}

/// Headers a custom header may not set: the HTTP client sets them (framing,
/// connection handling, the proxy's credentials), or pg_ihub does (the
/// Standard Webhooks headers; any other `webhook-*` name is refused too).
pub const RESERVED_HEADERS: &[&str] = &[
    "host",
    "connection",
    "expect",
    "transfer-encoding",
    "content-length",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-authorization",
    "proxy-connection",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
];

/// Whether a custom header may not have this name (any case).
pub fn is_reserved_header(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    RESERVED_HEADERS.contains(&lower.as_str()) || lower.starts_with("webhook-")
}

/// A custom request header (an endpoint's `headers`, or those of one
/// `ihub.http_request`). Its value is secret, and masked wherever it is shown,
/// unless it was given as `{"value": "…", "secret": false}`.
#[derive(Debug, Clone, PartialEq)]
pub struct CustomHeader {
    pub name: String,
    pub value: String,
    pub secret: bool,
}

impl CustomHeader {
    pub fn secret(name: &str, value: &str) -> CustomHeader {
        CustomHeader { name: name.into(), value: value.into(), secret: true }
    }
}

/// What is wrong with custom headers. Never repeats a value (it may be a credential).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HeaderError {
    #[error("headers must be a JSON object")]
    NotAnObject,
    #[error("\"{0}\" is not a valid header name")]
    Name(String),
    #[error("header \"{0}\" is reserved: pg_ihub or its HTTP client sets it")]
    Reserved(String),
    #[error(
        "the value of \"{0}\" must be a string without control characters, or {{\"value\": \"…\", \"secret\": false}}"
    )]
    Value(String),
    #[error("header \"{name}\" has an unknown key \"{key}\"; only \"value\" and \"secret\" are allowed")]
    UnknownKey { name: String, key: String },
    #[error("\"secret\" of header \"{0}\" must be true or false")]
    Secret(String),
}

impl HeaderError {
    pub fn hint(&self) -> String {
        match self {
            HeaderError::Reserved(name) => format!(
                "Remove \"{name}\". Host, Connection, Content-Length, Transfer-Encoding, Expect, Keep-Alive, TE, Trailer, \
                 Upgrade and Proxy-* are set by the HTTP client (a proxy is set with ihub.http_proxy), and \
                 webhook-id, webhook-timestamp and webhook-signature by pg_ihub's signing."
            ),
            _ => r#"Pass a JSON object of header names to values. A string value is secret and masked in every view; {"value": "…", "secret": false} is shown. E.g. {"X-Api-Key": "k-123", "X-Tenant": {"value": "acme", "secret": false}}."#.into(),
        }
    }
}

/// Validates custom headers as given by a user, and reads them.
pub fn check_headers(headers: &Value) -> Result<Vec<CustomHeader>, HeaderError> {
    let Value::Object(map) = headers else {
        return Err(HeaderError::NotAnObject);
    };
    let mut out = Vec::with_capacity(map.len());
    for (name, value) in map {
        if HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(HeaderError::Name(name.chars().take(100).collect()));
        }
        if is_reserved_header(name) {
            return Err(HeaderError::Reserved(name.clone()));
        }
        let valid = |v: &Value| v.as_str().filter(|s| HeaderValue::from_str(s).is_ok()).map(str::to_string);
        let header = match value {
            Value::Object(form) => {
                if let Some(key) = form.keys().find(|k| !matches!(k.as_str(), "value" | "secret")) {
                    return Err(HeaderError::UnknownKey { name: name.clone(), key: key.chars().take(100).collect() });
                }
                let value = form.get("value").and_then(valid).ok_or_else(|| HeaderError::Value(name.clone()))?;
                let secret = match form.get("secret") {
                    None => true,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => return Err(HeaderError::Secret(name.clone())),
                };
                CustomHeader { name: name.clone(), value, secret }
            }
            other => CustomHeader::secret(name, &valid(other).ok_or_else(|| HeaderError::Value(name.clone()))?),
        };
        out.push(header);
    }
    Ok(out)
}

/// Reads stored custom headers for sending, leniently: entries that would not
/// pass [`check_headers`] now (stored by an older version) are skipped, or,
/// when reserved, left for the sender to drop. Anything unclear is secret.
pub fn headers_from_json(headers: &Value) -> Vec<CustomHeader> {
    let Value::Object(map) = headers else {
        return Vec::new();
    };
    map.iter()
        .filter_map(|(name, value)| match value {
            Value::String(v) => Some(CustomHeader::secret(name, v)),
            Value::Object(form) => Some(CustomHeader {
                name: name.clone(),
                value: form.get("value")?.as_str()?.to_string(),
                secret: form.get("secret").and_then(Value::as_bool).unwrap_or(true),
            }),
            _ => None,
        })
        .collect()
}

/// A proxy URL for `ihub.http_proxy`: http or https, a host, nothing past the port.
pub fn parse_proxy(text: &str) -> Result<Option<reqwest::Proxy>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let invalid = || "ihub.http_proxy is not a valid proxy URL (http://host:port or https://host:port)".to_string();
    let url = url::Url::parse(text).map_err(|_| invalid())?;
    if !matches!(url.scheme(), "http" | "https")
        || url.host_str().is_none_or(str::is_empty)
        || !matches!(url.path(), "" | "/")
        || url.query().is_some()
        || url.fragment().is_some()
    {
        return Err(invalid());
    }
    reqwest::Proxy::all(url).map(Some).map_err(|_| invalid())
}

/// The start of every reqwest client pg_ihub builds: proxies named in the
/// server's environment (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY) are ignored,
/// since a proxy's upstream connection escapes the resolver guard; only the
/// proxy named by `ihub.http_proxy` (the text passed here) is used.
pub fn client_builder(proxy: &str) -> Result<reqwest::ClientBuilder, String> {
    let builder = reqwest::Client::builder().no_proxy();
    Ok(match parse_proxy(proxy)? {
        Some(p) => builder.proxy(p),
        None => builder,
    })
}

/// A client that connects only where `allow` permits (names are resolved
/// through [`GuardedResolver`]), through `proxy` (`ihub.http_proxy`) or
/// directly, follows no redirect and keeps up to `idle` idle connections
/// per host. With an invalid proxy URL it connects directly and the reason
/// comes back too: the caller must then send nothing.
pub fn guarded_client(
    allow: &Arc<AllowList>,
    proxy: &str,
    user_agent: &str,
    idle: usize,
) -> (reqwest::Client, Option<String>) {
    let proxy_host = url::Url::parse(proxy.trim()).ok().and_then(|u| u.host_str().map(str::to_ascii_lowercase));
    let (builder, unusable) = match client_builder(proxy) {
        Ok(builder) => (builder, None),
        Err(reason) => (client_builder("").expect("no proxy is valid"), Some(reason)),
    };
    let client = builder
        .user_agent(user_agent)
        // A redirect could lead to an address the allow-list refuses; the
        // receiver's 3xx is recorded as a failure instead.
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(Arc::new(GuardedResolver { allow: allow.clone(), proxy_host }))
        .pool_idle_timeout(Duration::from_secs(30))
        // Idle connections hold descriptors too.
        .pool_max_idle_per_host(idle.max(1))
        .tcp_nodelay(true)
        .build()
        .expect("a reqwest client with static settings builds");
    (client, unusable)
}

/// How often `send_all` calls its `tick` while requests are in flight.
pub const TICK: Duration = Duration::from_millis(5);

/// Reusable sender: one connection pool for the worker's lifetime.
pub struct Sender {
    client: reqwest::Client,
    allow: Arc<AllowList>,
    body_limit: usize,
    /// Requests in flight at most; each holds a socket (a file descriptor).
    concurrency: usize,
    /// Why nothing can be sent (an invalid `ihub.http_proxy`): every attempt
    /// fails with this, to be retried, rather than bypass the proxy.
    unusable: Option<String>,
}

#[derive(Debug)]
struct Blocked(String);
impl std::fmt::Display for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} resolves only to private, loopback or link-local addresses", self.0)
    }
}
impl StdError for Blocked {}

/// Resolves names and drops restricted addresses, so that a public-looking
/// name pointing at an internal address is refused too. With a proxy, the
/// only name resolved here is the proxy's own, which the superuser chose and
/// which is therefore not filtered.
struct GuardedResolver {
    allow: Arc<AllowList>,
    proxy_host: Option<String>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.allow.clone();
        let host = name.as_str().to_string();
        let trusted = self.proxy_host.as_deref().is_some_and(|p| p.eq_ignore_ascii_case(&host));
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let ok = if trusted { addrs.collect() } else { guard(&host, addrs, &allow) };
            if ok.is_empty() {
                return Err(Box::new(Blocked(host)) as Box<dyn StdError + Send + Sync>);
            }
            Ok(Box::new(ok.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The resolved addresses a request may connect to: all of them when the
/// name is allow-listed, else those [`AllowList::allows_ip`] allows, the
/// check literal addresses in URLs get.
fn guard(host: &str, addrs: impl Iterator<Item = SocketAddr>, allow: &AllowList) -> Vec<SocketAddr> {
    let by_name = allow.allows_name(host);
    addrs.filter(|a| by_name || allow.allows_ip(a.ip())).collect()
}

impl Sender {
    /// A sender that connects directly (no proxy).
    pub fn new(allow: AllowList, body_limit: usize, concurrency: usize, user_agent: &str) -> Sender {
        Sender::with_proxy(allow, body_limit, concurrency, user_agent, "")
    }

    /// A sender that connects through `proxy` (`ihub.http_proxy`; empty:
    /// directly). An invalid proxy URL gives a sender whose every attempt
    /// fails with the reason, to be retried once the setting is fixed.
    pub fn with_proxy(
        allow: AllowList,
        body_limit: usize,
        concurrency: usize,
        user_agent: &str,
        proxy: &str,
    ) -> Sender {
        let allow = Arc::new(allow);
        let (client, unusable) = guarded_client(&allow, proxy, user_agent, concurrency);
        Sender { client, allow, body_limit, concurrency: concurrency.max(1), unusable }
    }

    /// Why this sender cannot send (an invalid `ihub.http_proxy`), if so.
    pub fn unusable(&self) -> Option<&str> {
        self.unusable.as_deref()
    }

    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Sends the requests, at most `concurrency` at a time, calling `tick`
    /// every `TICK` while they are in flight. Returns early, with only the
    /// finished attempts, when `tick` answers true (shutdown); the
    /// unfinished deliveries keep their lease and are claimed again later.
    pub async fn send_all(&self, requests: Vec<Request>, mut tick: impl FnMut() -> bool) -> Vec<Attempt> {
        // A dispatcher's runtime only runs inside this call, so connections
        // that servers closed while it slept still look reusable in the pool
        // and the next request on one fails. Yielding lets the runtime poll
        // its sockets and the connection tasks see those closes first.
        for _ in 0..2 {
            tokio::task::yield_now().await;
        }
        let total = requests.len();
        let mut pending = futures_util::stream::iter(requests.into_iter().map(|r| self.send_one(r)))
            .buffer_unordered(self.concurrency);
        let mut done = Vec::with_capacity(total);
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                next = pending.next() => match next {
                    Some(attempt) => done.push(attempt),
                    None => break,
                },
                _ = ticks.tick() => if tick() { break },
            }
        }
        done
    }

    async fn send_one(&self, req: Request) -> Attempt {
        let started_at = SystemTime::now();
        let clock = Instant::now();
        let timestamp = started_at.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        let body = if req.method == "GET" { String::new() } else { req.body };

        let mut headers: Vec<(String, String)> = vec![("content-type".into(), "application/json".into())];
        // Names whose values the attempt record masks: secret custom headers
        // and the auth header (besides credential-looking names).
        let mut secret: Vec<String> = Vec::new();
        let mut set = |k: String, v: String, is_secret: bool| {
            // Reserved names are refused when headers are stored; rows stored
            // before that (or an api_key auth header) are dropped here.
            if is_reserved_header(&k) {
                return;
            }
            headers.retain(|(name, _)| *name != k);
            secret.retain(|name| *name != k);
            if is_secret {
                secret.push(k.clone());
            }
            headers.push((k, v));
        };
        for h in req.headers {
            set(h.name.to_ascii_lowercase(), h.value, h.secret);
        }
        if let Some((k, v)) = req.auth.header() {
            set(k.to_ascii_lowercase(), v, true);
        }
        headers.push(("webhook-id".into(), req.event_id.clone()));
        headers.push(("webhook-timestamp".into(), timestamp.to_string()));
        headers.push((
            "webhook-signature".into(),
            signature_header(&req.secrets, &req.event_id, timestamp, body.as_bytes()),
        ));

        let mut attempt = Attempt {
            delivery_id: req.delivery_id,
            started_at,
            duration: Duration::ZERO,
            request_headers: mask_request_headers(&headers, &secret),
            outcome: Outcome::NotSent,
            status: None,
            response_headers: Vec::new(),
            response_body: None,
            response_truncated: false,
            error: None,
        };
        if req.test_mode {
            return attempt;
        }
        if let Some(reason) = &req.not_sendable {
            attempt.outcome = Outcome::Connection;
            attempt.error = Some(format!("not sent: {reason}"));
            return attempt;
        }
        if let Some(reason) = &self.unusable {
            attempt.outcome = Outcome::Connection;
            attempt.error = Some(format!("not sent: {reason}"));
            return attempt;
        }
        let limit = req.body_limit.unwrap_or(self.body_limit);
        match self.exchange(&req.method, &req.url, headers, body, req.timeout, limit).await {
            Ok((status, response_headers, (response_body, truncated), retry_after)) => {
                attempt.outcome = Outcome::Status { status, retry_after };
                attempt.status = Some(status);
                attempt.response_headers = response_headers;
                attempt.response_body = Some(response_body);
                attempt.response_truncated = truncated;
                if !(200..300).contains(&status) {
                    attempt.error = Some(format!("receiver answered HTTP {status}"));
                }
            }
            Err((outcome, message)) => {
                attempt.outcome = outcome;
                attempt.error = Some(message);
            }
        }
        attempt.duration = clock.elapsed();
        attempt
    }

    #[allow(clippy::type_complexity)]
    async fn exchange(
        &self,
        method: &str,
        url: &str,
        headers: Vec<(String, String)>,
        body: String,
        timeout: Duration,
        limit: usize,
    ) -> Result<(u16, Vec<(String, String)>, (String, bool), Option<Duration>), (Outcome, String)> {
        // Literal addresses never reach the resolver, so they are checked here.
        check_url(url, &self.allow).map_err(|e| match e {
            TargetError::Restricted(_) => (Outcome::Blocked, e.to_string()),
            _ => (Outcome::Invalid, e.to_string()),
        })?;
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|_| (Outcome::Invalid, format!("invalid method {method}")))?;
        let mut map = HeaderMap::with_capacity(headers.len());
        for (k, v) in &headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| (Outcome::Invalid, format!("invalid header name {k:?}")))?;
            let value =
                HeaderValue::from_str(v).map_err(|_| (Outcome::Invalid, format!("invalid value for header {k:?}")))?;
            map.append(name, value);
        }
        let mut response =
            self.client.request(method, url).headers(map).body(body).timeout(timeout).send().await.map_err(describe)?;
        let status = response.status().as_u16();
        let response_headers: Vec<(String, String)> = response
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let mut body = Vec::new();
        let mut truncated = false;
        while body.len() <= limit {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) => break,
                // The status is what counts; a body cut short is recorded as far as it came.
                Err(e) if e.is_timeout() => {
                    return Err((Outcome::Timeout, "timed out reading the response body".into()))
                }
                Err(_) => break,
            }
        }
        if body.len() > limit {
            body.truncate(limit);
            truncated = true;
        }
        Ok((status, response_headers, (String::from_utf8_lossy(&body).into_owned(), truncated), retry_after))
    }
}

/// Turns a reqwest error into an outcome and a message without the URL
/// (which may carry a token in its query string).
pub(crate) fn describe(err: reqwest::Error) -> (Outcome, String) {
    let mut source: Option<&(dyn StdError + 'static)> = err.source();
    let mut root = None;
    while let Some(e) = source {
        if let Some(b) = e.downcast_ref::<Blocked>() {
            return (Outcome::Blocked, b.to_string());
        }
        root = Some(e.to_string());
        source = e.source();
    }
    let outcome = if err.is_timeout() {
        Outcome::Timeout
    } else if err.is_builder() {
        Outcome::Invalid
    } else {
        Outcome::Connection
    };
    let head = if err.is_timeout() {
        "request timed out"
    } else if err.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    let message = match root {
        Some(root) if !err.is_timeout() => format!("{head}: {root}"),
        _ => head.to_string(),
    };
    (outcome, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    fn request(url: String) -> Request {
        Request {
            delivery_id: 1,
            event_id: "evt_1".into(),
            method: "POST".into(),
            url,
            headers: vec![CustomHeader::secret("X-Extra", "1")],
            auth: Auth::Bearer { token: "sekrit".into() },
            secrets: vec!["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()],
            body: "{\"a\":1}".into(),
            timeout: Duration::from_millis(500),
            test_mode: false,
            body_limit: None,
            not_sendable: None,
        }
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
    }

    /// A one-shot raw TCP server answering `reply`, returning the request it saw.
    fn serve_once(reply: &'static str) -> (String, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
            let mut buf = vec![0u8; 8192];
            let mut seen = Vec::new();
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
                if seen.windows(7).any(|w| w == b"{\"a\":1}") {
                    break;
                }
            }
            s.write_all(reply.as_bytes()).unwrap();
            String::from_utf8_lossy(&seen).into_owned()
        });
        (url, handle)
    }

    fn loopback() -> AllowList {
        AllowList::parse("127.0.0.0/8").unwrap()
    }

    #[test]
    fn sends_signed_request_and_masks_the_record() {
        let (url, server) = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
        let sender = Sender::new(loopback(), 1024, 8, "pg_ihub-test");
        let attempts = run(sender.send_all(vec![request(url)], || false));
        let seen = server.join().unwrap().to_ascii_lowercase();
        assert!(seen.contains("webhook-id: evt_1"));
        assert!(seen.contains("webhook-signature: v1,"));
        assert!(seen.contains("authorization: bearer sekrit"));
        let a = &attempts[0];
        assert_eq!(a.status, Some(200));
        assert_eq!(a.response_body.as_deref(), Some("ok"));
        let auth = a.request_headers.iter().find(|(k, _)| k == "authorization").unwrap();
        assert_eq!(auth.1, crate::outbound::mask::MASK);
        let recorded = |name: &str| a.request_headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        assert_eq!(recorded("webhook-signature"), Some("v1,********"));
        assert_eq!(recorded("x-extra"), Some(crate::outbound::mask::MASK));
        assert_eq!(recorded("webhook-id"), Some("evt_1"));
    }

    #[test]
    fn custom_headers_are_sent_secret_ones_masked_and_reserved_ones_dropped() {
        let (url, server) = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        let sender = Sender::new(loopback(), 1024, 8, "t");
        let mut r = request(url);
        // As stored rows may hold them: from before validation, or lenient JSON.
        r.headers = headers_from_json(&serde_json::json!({
            "X-Functions-Key": "fk-secret",
            "Ocp-Apim-Subscription-Key": {"value": "apim-secret", "secret": true},
            "X-Trace": {"value": "trace-1", "secret": false},
            "Host": "evil.example",
            "Transfer-Encoding": "chunked",
            "Content-Length": "1",
            "Proxy-Authorization": "Basic eA==",
            "Webhook-Signature": "v1,forged",
            "Connection": "close",
        }));
        r.auth = Auth::ApiKey { header: "Upgrade".into(), value: "h2c".into() };
        let a = run(sender.send_all(vec![r], || false)).remove(0);
        assert_eq!(a.status, Some(200), "{:?}", a.error);
        let seen = server.join().unwrap().to_ascii_lowercase();
        assert!(seen.contains("x-functions-key: fk-secret"), "{seen}");
        assert!(seen.contains("ocp-apim-subscription-key: apim-secret"), "{seen}");
        assert!(seen.contains("x-trace: trace-1"), "{seen}");
        for dropped in [
            "evil.example",
            "transfer-encoding",
            "content-length: 1\r",
            "proxy-authorization",
            "v1,forged",
            "upgrade",
            "connection: close",
        ] {
            assert!(!seen.contains(dropped), "{dropped} sent: {seen}");
        }
        let recorded: std::collections::HashMap<_, _> = a.request_headers.iter().cloned().collect();
        assert_eq!(recorded["x-functions-key"], crate::outbound::mask::MASK);
        assert_eq!(recorded["ocp-apim-subscription-key"], crate::outbound::mask::MASK);
        assert_eq!(recorded["x-trace"], "trace-1");
        assert!(recorded["webhook-signature"].starts_with("v1,") && !recorded.contains_key("host"));
        let text = format!("{:?}", a.request_headers);
        assert!(!text.contains("fk-secret") && !text.contains("apim-secret"), "{text}");
    }

    #[test]
    fn header_forms_are_validated() {
        use serde_json::json;
        let ok = check_headers(&json!({
            "X-Key": "k",
            "X-Secret": {"value": "s", "secret": true},
            "X-Shown": {"value": "v", "secret": false},
            "X-Default": {"value": "d"},
        }))
        .unwrap();
        let secret: Vec<(&str, bool)> = ok.iter().map(|h| (h.name.as_str(), h.secret)).collect();
        assert_eq!(secret, vec![("X-Default", true), ("X-Key", true), ("X-Secret", true), ("X-Shown", false)]);
        assert_eq!(check_headers(&json!([])), Err(HeaderError::NotAnObject));
        assert_eq!(check_headers(&json!({"bad name": "x"})), Err(HeaderError::Name("bad name".into())));
        assert_eq!(check_headers(&json!({"X-A": 1})), Err(HeaderError::Value("X-A".into())));
        assert_eq!(check_headers(&json!({"X-A": "a\nb"})), Err(HeaderError::Value("X-A".into())));
        assert_eq!(check_headers(&json!({"X-A": {"secret": false}})), Err(HeaderError::Value("X-A".into())));
        assert_eq!(check_headers(&json!({"X-A": {"value": 5}})), Err(HeaderError::Value("X-A".into())));
        assert_eq!(
            check_headers(&json!({"X-A": {"value": "v", "secret": "no"}})),
            Err(HeaderError::Secret("X-A".into()))
        );
        assert_eq!(
            check_headers(&json!({"X-A": {"value": "v", "public": true}})),
            Err(HeaderError::UnknownKey { name: "X-A".into(), key: "public".into() })
        );
        for name in RESERVED_HEADERS.iter().copied().chain(["HOST", "Content-Length", "Webhook-Id", "webhook-other"]) {
            let e = check_headers(&json!({ name: "x" })).unwrap_err();
            assert_eq!(e, HeaderError::Reserved(name.into()));
            assert!(e.to_string().contains(name) && e.to_string().contains("reserved"), "{e}");
            assert!(e.hint().contains(name), "{}", e.hint());
            // The safe form does not get around it.
            assert!(check_headers(&json!({ name: {"value": "x", "secret": false} })).is_err());
        }
        // Errors never repeat a value.
        let e = check_headers(&json!({"X-A": {"value": "hunter2", "secret": "hunter2"}})).unwrap_err();
        assert!(!e.to_string().contains("hunter2") && !e.hint().contains("hunter2"));
    }

    #[test]
    fn stored_headers_are_read_leniently_and_secret_by_default() {
        let h = headers_from_json(&serde_json::json!({
            "A": "1",
            "B": {"value": "2", "secret": false},
            "C": {"value": "3", "secret": "odd"},
            "D": 4,
            "E": {"secret": false},
        }));
        assert_eq!(
            h,
            vec![
                CustomHeader::secret("A", "1"),
                CustomHeader { name: "B".into(), value: "2".into(), secret: false },
                CustomHeader::secret("C", "3"),
            ]
        );
        assert!(headers_from_json(&serde_json::Value::Null).is_empty());
    }

    #[test]
    fn the_resolver_guard_applies_the_url_check() {
        let addrs = |list: &[&str]| list.iter().map(|a| a.parse::<SocketAddr>().unwrap()).collect::<Vec<_>>();
        let resolved = addrs(&[
            "[::ffff:127.0.0.1]:0",
            "[::ffff:0:a9fe:a9fe]:0",
            "[64:ff9b::a00:1]:0",
            "[2002:7f00:1::]:0",
            "[fec0::1]:0",
            "[2001:0:4136:e378:8000:63bf:80ff:fffe]:0",
            "[::ffff:8.8.8.8]:0",
            "8.8.4.4:0",
        ]);
        let kept = guard("x.example", resolved.clone().into_iter(), &AllowList::default());
        assert_eq!(kept, addrs(&["[::ffff:8.8.8.8]:0", "8.8.4.4:0"]));
        let kept = guard("x.example", resolved.clone().into_iter(), &loopback());
        assert_eq!(kept, addrs(&["[::ffff:127.0.0.1]:0", "[2002:7f00:1::]:0", "[::ffff:8.8.8.8]:0", "8.8.4.4:0"]));
        let by_name = AllowList::parse("x.example").unwrap();
        assert_eq!(guard("X.example", resolved.clone().into_iter(), &by_name).len(), resolved.len());
    }

    #[test]
    fn proxies_come_only_from_the_setting() {
        assert!(parse_proxy("").unwrap().is_none());
        assert!(parse_proxy("  ").unwrap().is_none());
        assert!(parse_proxy("http://proxy.internal:3128").unwrap().is_some());
        assert!(parse_proxy("https://u:p@proxy.internal:3128/").unwrap().is_some());
        for bad in
            ["proxy:3128", "ftp://proxy:21", "http://proxy:3128/path", "http://:3128", "http://p:1?x=1", "nonsense"]
        {
            assert!(parse_proxy(bad).is_err(), "{bad}");
        }
        // An environment proxy is ignored: the request goes straight to the
        // receiver although HTTP_PROXY/ALL_PROXY name a closed port. (Read
        // when the client is built, so the variables are set just for that.)
        let (url, server) = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        std::env::set_var("HTTP_PROXY", "http://127.0.0.1:9");
        std::env::set_var("ALL_PROXY", "http://127.0.0.1:9");
        let sender = Sender::new(loopback(), 1024, 8, "t");
        std::env::remove_var("HTTP_PROXY");
        std::env::remove_var("ALL_PROXY");
        let a = run(sender.send_all(vec![request(url)], || false)).remove(0);
        assert_eq!((a.status, a.error), (Some(200), None));
        server.join().unwrap();
    }

    #[test]
    fn the_configured_proxy_is_used() {
        // The proxy sees the absolute URL; the target name is its to resolve,
        // and the proxy's own (loopback) address is not filtered.
        let (proxy, server) = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        let proxy = proxy.trim_end_matches("/hook").to_string();
        let sender = Sender::with_proxy(AllowList::default(), 1024, 8, "t", &proxy);
        assert!(sender.unusable().is_none());
        let a = run(sender.send_all(vec![request("http://hooks.example.com/in".into())], || false)).remove(0);
        assert_eq!(a.status, Some(200), "{:?}", a.error);
        let seen = server.join().unwrap();
        assert!(seen.starts_with("POST http://hooks.example.com/in HTTP/1.1"), "{seen}");
        // Literal private targets are still refused before the proxy is asked.
        let b = run(sender.send_all(vec![request("http://[::ffff:127.0.0.1]/".into())], || false)).remove(0);
        assert_eq!(b.outcome, Outcome::Blocked);
    }

    #[test]
    fn an_invalid_proxy_sends_nothing() {
        let sender = Sender::with_proxy(loopback(), 1024, 8, "t", "ftp://proxy:21");
        assert!(sender.unusable().unwrap().contains("ihub.http_proxy"));
        let a = run(sender.send_all(vec![request("http://127.0.0.1:9/".into())], || false)).remove(0);
        assert_eq!(a.outcome, Outcome::Connection);
        assert!(a.error.unwrap().contains("ihub.http_proxy"));
    }

    /// Reads one request (up to its `{"a":1}` body) from a connection.
    fn read_request(s: &mut std::net::TcpStream) {
        let mut buf = vec![0u8; 8192];
        let mut seen = Vec::new();
        while !seen.windows(7).any(|w| w == b"{\"a\":1}") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "connection closed mid-request");
            seen.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn a_kept_alive_connection_the_server_closed_while_idle_is_not_reused() {
        // As a dispatcher does: one runtime, driven only while a batch is
        // sent. The server answers keep-alive, closes the connection while the
        // sender is idle, then waits for a new one.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let (closed_tx, closed_rx) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || {
            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
            let (mut first, _) = listener.accept().unwrap();
            read_request(&mut first);
            first.write_all(ok).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            drop(first);
            closed_tx.send(()).unwrap();
            let (mut second, _) = listener.accept().unwrap();
            read_request(&mut second);
            second.write_all(ok).unwrap();
        });
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let sender = Sender::new(loopback(), 1024, 8, "t");
        let first = runtime.block_on(sender.send_all(vec![request(url.clone())], || false)).remove(0);
        assert_eq!(first.status, Some(200));
        closed_rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(50)); // the FIN has arrived
        let second = runtime.block_on(sender.send_all(vec![request(url)], || false)).remove(0);
        assert_eq!((second.status, second.error), (Some(200), None));
        server.join().unwrap();
    }

    #[test]
    fn retry_after_is_read_from_503() {
        let (url, server) = serve_once("HTTP/1.1 503 Unavailable\r\nretry-after: 7\r\ncontent-length: 0\r\n\r\n");
        let sender = Sender::new(loopback(), 1024, 8, "t");
        let a = run(sender.send_all(vec![request(url)], || false)).remove(0);
        server.join().unwrap();
        assert_eq!(a.outcome, Outcome::Status { status: 503, retry_after: Some(Duration::from_secs(7)) });
    }

    #[test]
    fn refused_connection_and_blocked_hosts_are_told_apart() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let sender = Sender::new(loopback(), 1024, 8, "t");
        let a = run(sender.send_all(vec![request(format!("http://127.0.0.1:{port}/"))], || false)).remove(0);
        assert_eq!(a.outcome, Outcome::Connection);
        assert!(!a.error.unwrap().contains("sekrit"));
        let strict = Sender::new(AllowList::default(), 1024, 8, "t");
        let b = run(strict.send_all(vec![request(format!("http://127.0.0.1:{port}/"))], || false)).remove(0);
        assert_eq!(b.outcome, Outcome::Blocked);
        let c = run(strict.send_all(vec![request(format!("http://localhost:{port}/"))], || false)).remove(0);
        assert_eq!(c.outcome, Outcome::Blocked);
    }

    #[test]
    fn a_silent_receiver_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let sender = Sender::new(loopback(), 1024, 8, "t");
        let mut r = request(url);
        r.timeout = Duration::from_millis(200);
        let a = run(sender.send_all(vec![r], || false)).remove(0);
        assert_eq!(a.outcome, Outcome::Timeout);
        drop(listener);
    }

    #[test]
    fn concurrency_is_bounded() {
        // A receiver that accepts and never answers: each request holds a connection.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let sender = Sender::new(loopback(), 1024, 3, "t");
        let requests: Vec<Request> = (0..10)
            .map(|i| Request { delivery_id: i, timeout: Duration::from_millis(300), ..request(url.clone()) })
            .collect();
        let accepted = std::thread::spawn(move || {
            listener.set_nonblocking(true).unwrap();
            let mut held = Vec::new();
            let deadline = std::time::Instant::now() + Duration::from_millis(250);
            while std::time::Instant::now() < deadline {
                if let Ok((s, _)) = listener.accept() {
                    held.push(s);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            held.len()
        });
        let attempts = run(sender.send_all(requests, || false));
        assert_eq!(attempts.len(), 10);
        assert_eq!(accepted.join().unwrap(), 3, "only 3 connections at once");
    }

    #[test]
    fn test_mode_signs_without_sending() {
        let sender = Sender::new(AllowList::default(), 1024, 8, "t");
        let mut r = request("http://192.0.2.1/never".into());
        r.test_mode = true;
        let a = run(sender.send_all(vec![r], || false)).remove(0);
        assert_eq!(a.outcome, Outcome::NotSent);
        assert!(a.request_headers.iter().any(|(k, v)| k == "webhook-signature" && v.starts_with("v1,")));
    }
}
