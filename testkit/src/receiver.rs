//! A webhook receiver on 127.0.0.1 with scripted replies.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use crate::verify::verify;

/// What the receiver does with a request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// Answer with this status (and headers) after `delay`.
    Status { status: u16, headers: Vec<(String, String)>, delay: Duration },
    /// Never answer (the sender must time out).
    Hang,
    /// Close the connection without answering.
    HangUp,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply::Status { status, headers: Vec::new(), delay: Duration::ZERO }
    }
    pub fn delayed(status: u16, delay: Duration) -> Reply {
        Reply::Status { status, headers: Vec::new(), delay }
    }
    pub fn with_header(status: u16, name: &str, value: &str) -> Reply {
        Reply::Status { status, headers: vec![(name.into(), value.into())], delay: Duration::ZERO }
    }
}

/// One request as received.
#[derive(Clone, Debug)]
pub struct Received {
    pub at: Instant,
    pub at_wall: SystemTime,
    pub method: String,
    pub path: String,
    /// Header names in lower case.
    pub headers: HashMap<String, String>,
    pub body: Bytes,
    /// Whether the Standard Webhooks signature verified against the secret
    /// given with [`Receiver::expect_secret`]; None when no secret was given.
    pub signature_valid: Option<bool>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

type Script = Box<dyn Fn(&Received, usize) -> Reply + Send + Sync>;

struct State {
    received: Mutex<Vec<Received>>,
    arrived: Condvar,
    script: Mutex<Arc<Script>>,
    secrets: Mutex<Vec<String>>,
    keep: bool,
}

pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<State>,
    _runtime: tokio::runtime::Runtime,
}

impl Receiver {
    /// A receiver answering 200 to everything, keeping every request.
    pub fn start() -> Receiver {
        Receiver::start_on(0, 2, true)
    }

    /// `port` 0 picks a free one; `keep` false only counts requests (for benchmarks).
    pub fn start_on(port: u16, threads: usize, keep: bool) -> Receiver {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let listener =
            runtime.block_on(tokio::net::TcpListener::bind(("127.0.0.1", port))).expect("bind a loopback port");
        let addr = listener.local_addr().expect("local address");
        let state = Arc::new(State {
            received: Mutex::new(Vec::new()),
            arrived: Condvar::new(),
            script: Mutex::new(Arc::new(Box::new(|_: &Received, _| Reply::status(200)))),
            secrets: Mutex::new(Vec::new()),
            keep,
        });
        let accept_state = state.clone();
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let state = accept_state.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(state.clone(), req));
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        Receiver { addr, state, _runtime: runtime }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Sets how to answer; the closure gets the request and its ordinal (0-based).
    pub fn script(&self, f: impl Fn(&Received, usize) -> Reply + Send + Sync + 'static) {
        *self.state.script.lock().unwrap() = Arc::new(Box::new(f));
    }

    /// Verify signatures against these secrets from now on.
    pub fn expect_secret(&self, secret: &str) {
        self.state.secrets.lock().unwrap().push(secret.to_string());
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.state.received.lock().unwrap().len()
    }

    /// Drops the requests kept so far, so that a long run (the soak test,
    /// which records what it needs in its script) keeps its memory flat.
    /// Counting starts again from 0, and so do the script's ordinals.
    pub fn forget(&self) {
        self.state.received.lock().unwrap().clear();
    }

    /// Waits until at least `n` requests arrived; false on timeout.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut got = self.state.received.lock().unwrap();
        while got.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            got = self.state.arrived.wait_timeout(got, left).unwrap().0;
        }
        true
    }
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let method = req.method().to_string();
    let path = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
    let headers: HashMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let secrets = state.secrets.lock().unwrap().clone();
    let signature_valid = if secrets.is_empty() {
        None
    } else {
        let get = |h: &str| headers.get(h).map(String::as_str).unwrap_or("");
        Some(
            secrets
                .iter()
                .any(|s| verify(s, get("webhook-id"), get("webhook-timestamp"), get("webhook-signature"), &body)),
        )
    };
    let received = Received {
        at: Instant::now(),
        at_wall: SystemTime::now(),
        method,
        path,
        headers,
        body: if state.keep { body } else { Bytes::new() },
        signature_valid,
    };
    let script = state.script.lock().unwrap().clone();
    let ordinal = {
        let mut all = state.received.lock().unwrap();
        all.push(received.clone());
        state.arrived.notify_all();
        all.len() - 1
    };
    let verdict = match signature_valid {
        None => "unchecked",
        Some(true) => "valid",
        Some(false) => "invalid",
    };
    match script(&received, ordinal) {
        Reply::Status { status, headers, delay } => {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let mut response = Response::builder().status(status).header("content-type", "application/json");
            for (k, v) in headers {
                response = response.header(k, v);
            }
            Ok(response
                .body(Full::new(Bytes::from(format!("{{\"signature\":\"{verdict}\"}}"))))
                .expect("a valid response"))
        }
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Err(std::io::Error::other("hung"))
        }
        // Returning an error makes hyper close the connection unanswered.
        Reply::HangUp => Err(std::io::Error::other("hang up")),
    }
}
