//! Sends a batch of signed webhook requests concurrently on the caller's
//! (single-threaded) tokio runtime and reports one attempt record per request.

use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::stream::StreamExt;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use super::auth::Auth;
use super::mask::mask_headers;
use super::retry::{parse_retry_after, Outcome};
use super::signature::signature_header;
use super::target::{check_url, AllowList, TargetError};

/// One request to make, as claimed from the queue.
#[derive(Debug, Clone)]
pub struct Request {
    pub delivery_id: i64,
    pub event_id: String,
    pub method: String,
    pub url: String,
    /// Endpoint headers, then per-delivery headers; later entries win.
    pub headers: Vec<(String, String)>,
    pub auth: Auth,
    pub secrets: Vec<String>,
    pub body: String,
    pub timeout: Duration,
    pub test_mode: bool,
}

/// What one attempt did, ready to be recorded.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub delivery_id: i64,
    pub started_at: SystemTime,
    pub duration: Duration,
    /// Request headers as sent, credentials masked.
    pub request_headers: Vec<(String, String)>,
    pub outcome: Outcome,
    pub status: Option<u16>,
    pub response_headers: Vec<(String, String)>,
    pub response_body: Option<String>,
    pub error: Option<String>,
}

/// Reusable sender: one connection pool for the worker's lifetime.
pub struct Sender {
    client: reqwest::Client,
    allow: Arc<AllowList>,
    body_limit: usize,
    /// Requests in flight at most; each holds a socket (a file descriptor).
    concurrency: usize,
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
/// name pointing at an internal address is refused too.
struct GuardedResolver {
    allow: Arc<AllowList>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.allow.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let by_name = allow.allows_name(&host);
            let ok: Vec<SocketAddr> = addrs.filter(|a| by_name || allow.allows_ip(a.ip())).collect();
            if ok.is_empty() {
                return Err(Box::new(Blocked(host)) as Box<dyn StdError + Send + Sync>);
            }
            Ok(Box::new(ok.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

impl Sender {
    pub fn new(allow: AllowList, body_limit: usize, concurrency: usize, user_agent: &str) -> Sender {
        let allow = Arc::new(allow);
        let client = reqwest::Client::builder()
            .user_agent(user_agent)
            // A redirect could lead to an address the allow-list refuses; the
            // receiver's 3xx is recorded as a failure instead.
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(GuardedResolver { allow: allow.clone() }))
            .pool_idle_timeout(Duration::from_secs(30))
            // Idle connections hold descriptors too.
            .pool_max_idle_per_host(concurrency.max(1))
            .tcp_nodelay(true)
            .build()
            .expect("a reqwest client with static settings builds");
        Sender { client, allow, body_limit, concurrency: concurrency.max(1) }
    }

    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Sends the requests, at most `concurrency` at a time. Returns early,
    /// with only the finished attempts, when `stop` turns true (checked every
    /// 100 ms); the unfinished deliveries keep their lease and are claimed
    /// again later.
    pub async fn send_all(&self, requests: Vec<Request>, stop: impl Fn() -> bool) -> Vec<Attempt> {
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
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                next = pending.next() => match next {
                    Some(attempt) => done.push(attempt),
                    None => break,
                },
                _ = tick.tick() => if stop() { break },
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
        for (k, v) in req.headers {
            let k = k.to_ascii_lowercase();
            headers.retain(|(name, _)| *name != k);
            headers.push((k, v));
        }
        let mut sensitive = Vec::new();
        if let Some((k, v)) = req.auth.header() {
            headers.retain(|(name, _)| *name != k);
            sensitive.push(k.clone());
            headers.push((k, v));
        }
        headers.retain(|(name, _)| !name.starts_with("webhook-"));
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
            request_headers: mask_headers(&headers, &sensitive),
            outcome: Outcome::NotSent,
            status: None,
            response_headers: Vec::new(),
            response_body: None,
            error: None,
        };
        if req.test_mode {
            return attempt;
        }
        match self.exchange(&req.method, &req.url, headers, body, req.timeout).await {
            Ok((status, response_headers, response_body, retry_after)) => {
                attempt.outcome = Outcome::Status { status, retry_after };
                attempt.status = Some(status);
                attempt.response_headers = response_headers;
                attempt.response_body = Some(response_body);
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
    ) -> Result<(u16, Vec<(String, String)>, String, Option<Duration>), (Outcome, String)> {
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
        while body.len() < self.body_limit {
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
        body.truncate(self.body_limit);
        Ok((status, response_headers, String::from_utf8_lossy(&body).into_owned(), retry_after))
    }
}

/// Turns a reqwest error into an outcome and a message without the URL
/// (which may carry a token in its query string).
fn describe(err: reqwest::Error) -> (Outcome, String) {
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
            headers: vec![("X-Extra".into(), "1".into())],
            auth: Auth::Bearer { token: "sekrit".into() },
            secrets: vec!["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()],
            body: "{\"a\":1}".into(),
            timeout: Duration::from_millis(500),
            test_mode: false,
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
