//! A small CRM on 127.0.0.1 for the demo and the sync tests: what an
//! integration built on pg_ihub talks to.
//!
//! - `POST /oauth/token`: OAuth2 (RFC 6749) with the `refresh_token`,
//!   `client_credentials` and `authorization_code` grants; access tokens
//!   expire quickly, refresh tokens rotate (each is good once).
//! - `GET /oauth/authorize`: sends the browser back to the redirect URI
//!   with a code and the state, as a provider does once a person agrees.
//! - `GET /contacts?cursor=&limit=`: pages of contacts, with `next_cursor`
//!   and a `Link: <…>; rel="next"` header; `GET`/`PATCH /contacts/<id>`,
//!   `POST /contacts`. All need a valid bearer token.
//! - `POST /hooks/ihub`: the CRM's "incoming events" hook, which takes
//!   pg_ihub's row-change events as they are (bearer token required): the
//!   event's `data` creates or updates the contact with that email.
//! - `POST /admin/contacts[/<id>]` (no auth): a person edits a contact in
//!   the CRM; the CRM sends a Standard Webhooks-signed `contact.updated`
//!   (or `contact.created`) webhook to its webhook URL. Changes made through
//!   the API or the hook send none. `GET /admin/contacts` lists them all.
//!
//! Tests script failures (`fail_next`), revoke tokens, and read what was
//! asked (`requests`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};

use crate::verify::sign;

/// The CRM's client registration.
pub const CLIENT_ID: &str = "pg-ihub-demo";
pub const CLIENT_SECRET: &str = "crm-client-secret-7f3a";

/// One request the CRM answered.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    /// Path and query.
    pub path: String,
    pub status: u16,
    /// The bearer token it carried, if any.
    pub token: Option<String>,
    pub body: String,
}

#[derive(Default)]
struct Tokens {
    /// Access token -> when it expires.
    access: HashMap<String, Instant>,
    /// Refresh tokens still good.
    refresh: HashSet<String>,
    /// Authorization codes -> the redirect URI they were issued for.
    codes: HashMap<String, String>,
    next: u64,
    /// Grants answered, by grant type.
    grants: HashMap<String, usize>,
}

struct State {
    contacts: Mutex<BTreeMap<String, Value>>,
    next_id: Mutex<u64>,
    tokens: Mutex<Tokens>,
    lifetime: Mutex<Duration>,
    /// (path prefix, status, times left): answer these instead.
    failures: Mutex<Vec<(String, u16, usize)>>,
    webhook: Mutex<Option<(String, String)>>,
    seen: Mutex<Vec<Seen>>,
    page_size: usize,
    addr: Mutex<Option<SocketAddr>>,
}

pub struct Crm {
    pub addr: SocketAddr,
    state: Arc<State>,
    _runtime: tokio::runtime::Runtime,
}

impl Crm {
    /// A CRM on a free port (0) or `port`, whose access tokens live
    /// `lifetime`, serving pages of `page_size` contacts.
    pub fn start_on(port: u16, lifetime: Duration, page_size: usize) -> Crm {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
        let listener =
            runtime.block_on(tokio::net::TcpListener::bind(("127.0.0.1", port))).expect("bind a loopback port");
        let addr = listener.local_addr().expect("local address");
        let state = Arc::new(State {
            contacts: Mutex::new(BTreeMap::new()),
            next_id: Mutex::new(1),
            tokens: Mutex::new(Tokens::default()),
            lifetime: Mutex::new(lifetime),
            failures: Mutex::new(Vec::new()),
            webhook: Mutex::new(None),
            seen: Mutex::new(Vec::new()),
            page_size: page_size.max(1),
            addr: Mutex::new(Some(addr)),
        });
        let accept_state = state.clone();
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let state = accept_state.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(state.clone(), req));
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        Crm { addr, state, _runtime: runtime }
    }

    pub fn start(lifetime: Duration, page_size: usize) -> Crm {
        Crm::start_on(0, lifetime, page_size)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Where edits made in the CRM send their webhooks, signed with `secret` (whsec_…).
    pub fn send_webhooks_to(&self, url: &str, secret: &str) {
        *self.state.webhook.lock().unwrap() = Some((url.to_string(), secret.to_string()));
    }

    /// Adds contacts as if they had always been there (no webhook).
    pub fn seed(&self, contacts: &[Value]) {
        for c in contacts {
            create(&self.state, c.clone());
        }
    }

    pub fn contacts(&self) -> Vec<Value> {
        self.state.contacts.lock().unwrap().values().cloned().collect()
    }

    pub fn contact(&self, id: &str) -> Option<Value> {
        self.state.contacts.lock().unwrap().get(id).cloned()
    }

    /// A person edits (or, with `id` None, creates) a contact in the CRM:
    /// the webhook is sent before this returns. Returns the contact.
    pub fn edit(&self, id: Option<&str>, fields: Value) -> Value {
        admin_edit(&self.state, id, fields)
    }

    /// The next `times` requests whose path and query start with `prefix` get `status`.
    pub fn fail_next(&self, prefix: &str, status: u16, times: usize) {
        self.state.failures.lock().unwrap().push((prefix.to_string(), status, times));
    }

    /// Forgets every access token (as a provider revoking them would):
    /// the next API request with one gets 401.
    pub fn revoke_access_tokens(&self) {
        self.state.tokens.lock().unwrap().access.clear();
    }

    /// An authorization code for `redirect_uri`, as /oauth/authorize gives.
    pub fn issue_code(&self, redirect_uri: &str) -> String {
        let mut t = self.state.tokens.lock().unwrap();
        let code = next_token(&mut t, "code");
        t.codes.insert(code.clone(), redirect_uri.to_string());
        code
    }

    /// A refresh token good for one refresh.
    pub fn issue_refresh_token(&self) -> String {
        let mut t = self.state.tokens.lock().unwrap();
        let token = next_token(&mut t, "rt");
        t.refresh.insert(token.clone());
        token
    }

    /// Whether this refresh token would be accepted now.
    pub fn refresh_token_valid(&self, token: &str) -> bool {
        self.state.tokens.lock().unwrap().refresh.contains(token)
    }

    /// Grants answered with tokens, of this grant type.
    pub fn grants(&self, grant_type: &str) -> usize {
        self.state.tokens.lock().unwrap().grants.get(grant_type).copied().unwrap_or(0)
    }

    pub fn set_token_lifetime(&self, lifetime: Duration) {
        *self.state.lifetime.lock().unwrap() = lifetime;
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }
}

fn next_token(t: &mut Tokens, kind: &str) -> String {
    t.next += 1;
    format!("{kind}-{}-{:016x}", t.next, rand_u64())
}

fn rand_u64() -> u64 {
    // No rand dependency: the clock's nanoseconds are unique enough here.
    let n = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn now_s() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn create(state: &State, mut fields: Value) -> Value {
    let id = {
        let mut next = state.next_id.lock().unwrap();
        let id = format!("c_{}", *next);
        *next += 1;
        id
    };
    if let Value::Object(map) = &mut fields {
        map.insert("id".into(), json!(id));
        map.insert("updated_at".into(), json!(now_s()));
    }
    state.contacts.lock().unwrap().insert(id, fields.clone());
    fields
}

fn update(state: &State, id: &str, fields: &Value) -> Option<Value> {
    let mut contacts = state.contacts.lock().unwrap();
    let contact = contacts.get_mut(id)?;
    if let (Value::Object(c), Value::Object(f)) = (&mut *contact, fields) {
        for (k, v) in f {
            if k != "id" {
                c.insert(k.clone(), v.clone());
            }
        }
        c.insert("updated_at".into(), json!(now_s()));
    }
    Some(contact.clone())
}

fn admin_edit(state: &State, id: Option<&str>, fields: Value) -> Value {
    let (contact, event) = match id {
        Some(id) => (update(state, id, &fields).unwrap_or(Value::Null), "contact.updated"),
        None => (create(state, fields), "contact.created"),
    };
    if !contact.is_null() {
        send_webhook(state, event, &contact);
    }
    contact
}

/// Posts a signed webhook and waits for the answer (plain HTTP/1.1).
fn send_webhook(state: &State, event: &str, contact: &Value) {
    let Some((url, secret)) = state.webhook.lock().unwrap().clone() else { return };
    let Some(rest) = url.strip_prefix("http://") else { return };
    let (host, path) =
        rest.split_once('/').map(|(h, p)| (h.to_string(), format!("/{p}"))).unwrap_or((rest.into(), "/".into()));
    let id = format!("msg_{:016x}", rand_u64());
    let ts = now_s();
    let body = json!({"type": event, "timestamp": ts, "data": contact}).to_string();
    let signature = sign(&secret, &id, ts, body.as_bytes());
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         webhook-id: {id}\r\nwebhook-timestamp: {ts}\r\nwebhook-signature: {signature}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    if let Ok(mut stream) = std::net::TcpStream::connect(&host) {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = stream.write_all(request.as_bytes());
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
    }
}

type Answer = Result<Response<Full<Bytes>>, std::io::Error>;

fn answer(status: u16, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid response")
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Answer {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let token = header("authorization").and_then(|a| a.strip_prefix("Bearer ").map(str::to_string));
    let basic = header("authorization").and_then(|a| a.strip_prefix("Basic ").map(str::to_string));
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let body_text = String::from_utf8_lossy(&body).into_owned();
    let full = if query.is_empty() { path.clone() } else { format!("{path}?{query}") };
    let scripted = {
        let mut failures = state.failures.lock().unwrap();
        let hit = failures.iter_mut().find(|(prefix, _, left)| *left > 0 && full.starts_with(prefix.as_str()));
        hit.map(|(_, status, left)| {
            *left -= 1;
            *status
        })
    };
    let response = match scripted {
        Some(status) => answer(status, json!({"error": "scripted failure"})),
        None => route(&state, &method, &path, &query, token.as_deref(), basic.as_deref(), &body_text).await,
    };
    state.seen.lock().unwrap().push(Seen {
        method: method.to_string(),
        path: if query.is_empty() { path } else { format!("{path}?{query}") },
        status: response.status().as_u16(),
        token,
        body: body_text,
    });
    Ok(response)
}

fn form(text: &str) -> HashMap<String, String> {
    text.split('&').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (decode(k), decode(v))).collect()
}

fn decode(s: &str) -> String {
    let bytes = s.replace('+', " ").into_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&String::from_utf8_lossy(&bytes[i + 1..i + 3]), 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn authorized(state: &State, token: Option<&str>) -> bool {
    let tokens = state.tokens.lock().unwrap();
    token.and_then(|t| tokens.access.get(t)).is_some_and(|expires| *expires > Instant::now())
}

async fn route(
    state: &Arc<State>,
    method: &Method,
    path: &str,
    query: &str,
    token: Option<&str>,
    basic: Option<&str>,
    body: &str,
) -> Response<Full<Bytes>> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (&Method::POST, ["oauth", "token"]) => token_endpoint(state, basic, body),
        (&Method::GET, ["oauth", "authorize"]) => {
            let q = form(query);
            let (Some(redirect), Some(state_param)) = (q.get("redirect_uri"), q.get("state")) else {
                return answer(400, json!({"error": "invalid_request"}));
            };
            if q.get("client_id").map(String::as_str) != Some(CLIENT_ID) {
                return answer(400, json!({"error": "unauthorized_client"}));
            }
            let code = {
                let mut t = state.tokens.lock().unwrap();
                let code = next_token(&mut t, "code");
                t.codes.insert(code.clone(), redirect.clone());
                code
            };
            let sep = if redirect.contains('?') { '&' } else { '?' };
            let location = format!("{redirect}{sep}code={code}&state={}", url_encode(state_param));
            Response::builder().status(302).header("location", location).body(Full::new(Bytes::new())).unwrap()
        }
        (&Method::POST, ["admin", "contacts"]) | (&Method::POST, ["admin", "contacts", _]) => {
            let Ok(fields) = serde_json::from_str::<Value>(body) else {
                return answer(400, json!({"error": "body must be JSON"}));
            };
            let id = segments.get(2).map(|s| s.to_string());
            let state = state.clone();
            let contact = tokio::task::spawn_blocking(move || admin_edit(&state, id.as_deref(), fields))
                .await
                .unwrap_or(Value::Null);
            if contact.is_null() {
                answer(404, json!({"error": "no such contact"}))
            } else {
                answer(200, contact)
            }
        }
        (&Method::GET, ["admin", "contacts"]) => {
            answer(200, Value::Array(state.contacts.lock().unwrap().values().cloned().collect()))
        }
        (_, ["contacts", ..]) | (_, ["hooks", ..]) if !authorized(state, token) => {
            answer(401, json!({"error": "invalid_token"}))
        }
        (&Method::POST, ["hooks", "ihub"]) => {
            let Ok(event) = serde_json::from_str::<Value>(body) else {
                return answer(400, json!({"error": "body must be JSON"}));
            };
            let Some(Value::Object(data)) = event.get("data").cloned() else {
                return answer(200, json!({"ignored": "no data"}));
            };
            let mut fields = Map::new();
            for key in ["name", "email", "status", "country", "loyalty"] {
                if let Some(v) = data.get(key).filter(|v| !v.is_null()) {
                    fields.insert(key.into(), v.clone());
                }
            }
            let email = fields.get("email").cloned();
            let existing = email.and_then(|e| {
                state
                    .contacts
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|(_, c)| c.get("email") == Some(&e))
                    .map(|(id, _)| id.clone())
            });
            let contact = match existing {
                Some(id) => update(state, &id, &Value::Object(fields)).unwrap_or(Value::Null),
                None => create(state, Value::Object(fields)),
            };
            answer(200, contact)
        }
        (&Method::GET, ["contacts"]) => {
            let q = form(query);
            let start: usize = q.get("cursor").and_then(|c| c.parse().ok()).unwrap_or(0);
            let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(state.page_size).clamp(1, 100);
            let contacts: Vec<Value> = state.contacts.lock().unwrap().values().cloned().collect();
            let page: Vec<Value> = contacts.iter().skip(start).take(limit).cloned().collect();
            let next = (start + limit < contacts.len()).then(|| (start + limit).to_string());
            let mut response = answer(200, json!({"data": page, "next_cursor": next}));
            if let (Some(next), Some(addr)) = (&next, *state.addr.lock().unwrap()) {
                let link = format!("<http://{addr}/contacts?cursor={next}&limit={limit}>; rel=\"next\"");
                response.headers_mut().insert("link", link.parse().unwrap());
            }
            response
        }
        (&Method::GET, ["contacts", id]) => match state.contacts.lock().unwrap().get(*id) {
            Some(c) => answer(200, c.clone()),
            None => answer(404, json!({"error": "no such contact"})),
        },
        (&Method::POST, ["contacts"]) => match serde_json::from_str::<Value>(body) {
            Ok(fields @ Value::Object(_)) => answer(201, create(state, fields)),
            _ => answer(400, json!({"error": "body must be a JSON object"})),
        },
        (&Method::PATCH, ["contacts", id]) => match serde_json::from_str::<Value>(body) {
            Ok(fields @ Value::Object(_)) => match update(state, id, &fields) {
                Some(c) => answer(200, c),
                None => answer(404, json!({"error": "no such contact"})),
            },
            _ => answer(400, json!({"error": "body must be a JSON object"})),
        },
        _ => answer(404, json!({"error": "no such path"})),
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// RFC 6749 §3.2: the client authenticates in the form or with Basic.
fn token_endpoint(state: &State, basic: Option<&str>, body: &str) -> Response<Full<Bytes>> {
    let f = form(body);
    let (id, secret) = match basic.and_then(|b| STANDARD.decode(b).ok()).and_then(|b| String::from_utf8(b).ok()) {
        Some(pair) => match pair.split_once(':') {
            Some((i, s)) => (decode(i), decode(s)),
            None => (String::new(), String::new()),
        },
        None => (f.get("client_id").cloned().unwrap_or_default(), f.get("client_secret").cloned().unwrap_or_default()),
    };
    if id != CLIENT_ID || secret != CLIENT_SECRET {
        return answer(401, json!({"error": "invalid_client"}));
    }
    let grant = f.get("grant_type").cloned().unwrap_or_default();
    let lifetime = *state.lifetime.lock().unwrap();
    let mut t = state.tokens.lock().unwrap();
    let refresh = match grant.as_str() {
        "refresh_token" => {
            let given = f.get("refresh_token").cloned().unwrap_or_default();
            if !t.refresh.remove(&given) {
                return answer(
                    400,
                    json!({"error": "invalid_grant", "error_description": "unknown or used refresh token"}),
                );
            }
            Some(next_token(&mut t, "rt"))
        }
        "authorization_code" => {
            let code = f.get("code").cloned().unwrap_or_default();
            match t.codes.remove(&code) {
                Some(redirect) if Some(&redirect) == f.get("redirect_uri") => Some(next_token(&mut t, "rt")),
                _ => {
                    return answer(
                        400,
                        json!({"error": "invalid_grant", "error_description": "unknown code or redirect_uri"}),
                    )
                }
            }
        }
        "client_credentials" => None,
        _ => return answer(400, json!({"error": "unsupported_grant_type"})),
    };
    let access = next_token(&mut t, "at");
    t.access.insert(access.clone(), Instant::now() + lifetime);
    if let Some(r) = &refresh {
        t.refresh.insert(r.clone());
    }
    *t.grants.entry(grant).or_default() += 1;
    let mut out = Map::new();
    out.insert("access_token".into(), json!(access));
    out.insert("token_type".into(), json!("Bearer"));
    out.insert("expires_in".into(), json!(lifetime.as_secs()));
    if let Some(r) = refresh {
        out.insert("refresh_token".into(), json!(r));
    }
    answer(200, Value::Object(out))
}
