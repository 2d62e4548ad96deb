//! Inbound webhooks against a real cluster: real HTTP requests to the
//! listener worker, real processor workers calling SQL handlers. Each test
//! makes its own integration, source and handler, so they run side by side.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use pg_ihub_e2e::*;
use pg_ihub_testkit::verify::{hmac_hex, sign};
use reqwest::blocking::Response;
use reqwest::StatusCode;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// An enabled integration and a handler `<p>_handle` that records each
/// item's `n` in `<p>_seen` (in processing order) and fails for `"fail": true`
/// while `<p>_flag.fail` is set.
struct Kit {
    p: String,
    integration: String,
}

fn kit(hub: &mut Hub) -> Kit {
    let p = unique("in");
    let integration = unique("it");
    hub.exec(&format!(
        "CREATE TABLE {p}_seen (seq serial, n int, item bigint, at timestamptz DEFAULT clock_timestamp());
         CREATE TABLE {p}_flag (fail boolean);
         INSERT INTO {p}_flag VALUES (true);
         CREATE FUNCTION {p}_handle(item ihub.inbound_items) RETURNS jsonb LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO {p}_seen (n, item) VALUES ((item.payload->>'n')::int, item.id);
             IF (item.payload->>'fail')::boolean AND (SELECT fail FROM {p}_flag) THEN
                 RAISE EXCEPTION 'cannot handle %', item.payload->>'n';
             END IF;
             RETURN jsonb_build_object('n', item.payload->'n');
         END $$;
         SELECT ihub.create_integration('{integration}');
         SELECT ihub.enable_integration('{integration}');"
    ));
    Kit { p, integration }
}

impl Kit {
    /// Creates a source with extra `create_source` arguments; returns its URL.
    fn source(&self, hub: &mut Hub, name: &str, args: &str) -> String {
        hub.exec(&format!(
            "SELECT ihub.create_source('{i}', '{name}', '{p}_handle(ihub.inbound_items)' {args})",
            i = self.integration,
            p = self.p
        ));
        listener_url(&format!("/webhooks/{}/{name}", self.integration))
    }

    fn seen(&self, hub: &mut Hub) -> Vec<i32> {
        hub.db
            .query(&format!("SELECT n FROM {}_seen ORDER BY seq", self.p), &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    fn wait_seen(&self, hub: &mut Hub, count: usize) -> Vec<i32> {
        let ok = hub.wait_true(&format!("SELECT count(*) >= {count} FROM {}_seen", self.p), WAIT);
        let seen = self.seen(hub);
        assert!(ok, "only {seen:?} processed, expected {count}");
        seen
    }

    /// Reasons of the source's recorded rejections, oldest first, once `count` are there.
    fn rejections(&self, hub: &mut Hub, source: &str, count: usize) -> Vec<String> {
        let q = format!(
            "SELECT reason FROM ihub.inbound_rejections WHERE integration = '{}' AND source = '{source}' ORDER BY id",
            self.integration
        );
        hub.wait_true(&format!("SELECT count(*) >= {count} FROM ({q}) r"), WAIT);
        hub.db.query(&q, &[]).unwrap().iter().map(|r| r.get(0)).collect()
    }

    fn items(&self, hub: &mut Hub, source: &str) -> i64 {
        hub.one(&format!(
            "SELECT count(*) FROM ihub.inbound_items WHERE integration = '{}' AND source = '{source}'",
            self.integration
        ))
    }
}

/// POSTs a Standard Webhooks request signed with `secret`.
fn post_signed(url: &str, secret: &str, id: &str, timestamp: i64, body: &str) -> Response {
    http()
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", sign(secret, id, timestamp, body.as_bytes()))
        .body(body.to_string())
        .send()
        .expect("the listener answers")
}

fn status_and_json(r: Response) -> (StatusCode, Value) {
    let status = r.status();
    (status, r.json().unwrap_or(Value::Null))
}

fn item_id(r: Response) -> i64 {
    let (status, body) = status_and_json(r);
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    body["id"].as_i64().unwrap_or_else(|| panic!("no id in {body}"))
}

#[test]
fn signed_requests_are_accepted_and_processed_in_execution_time_order() {
    let mut hub = hub();
    let k = kit(&mut hub);
    let url = k.source(&mut hub, "orders", &format!(", secret => '{SECRET}'"));
    // Sent 1, 2, 3 but due 3, 2, 1: processing follows the execution time.
    let mut ids = Vec::new();
    for (n, delay) in [(1, 1.6), (2, 0.8), (3, 0.0)] {
        let body = json!({ "n": n }).to_string();
        let id = unique("msg");
        ids.push(item_id(post_signed(&format!("{url}?delay={delay}"), SECRET, &id, now_s(), &body)));
    }
    assert_eq!(k.wait_seen(&mut hub, 3), vec![3, 2, 1]);
    // The answer's id is the item's; the handler's result is kept with it.
    let stored: Vec<(i64, String, String)> = hub
        .db
        .query(
            &format!(
                "SELECT id, state, result::text FROM ihub.inbound_items WHERE integration = '{}' ORDER BY id",
                k.integration
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        stored,
        vec![
            (ids[0], "done".into(), r#"{"n": 1}"#.into()),
            (ids[1], "done".into(), r#"{"n": 2}"#.into()),
            (ids[2], "done".into(), r#"{"n": 3}"#.into())
        ]
    );
    // Delayed items waited for their time.
    let waited: bool = hub.one(&format!(
        "SELECT bool_and(finished_at >= run_at) AND max(run_at) - min(run_at) > interval '1.2 s' \
         FROM ihub.inbound_items WHERE integration = '{}'",
        k.integration
    ));
    assert!(waited);
}

#[test]
fn standard_webhooks_accepts_good_and_refuses_bad_stale_and_unsigned_requests() {
    let mut hub = hub();
    let k = kit(&mut hub);
    let url = k.source(&mut hub, "sw", &format!(", secret => '{SECRET}', tolerance => '1 minute'"));
    let body = r#"{"n": 1}"#;
    assert_eq!(post_signed(&url, SECRET, &unique("m"), now_s(), body).status(), StatusCode::ACCEPTED);
    // Several signatures (a key rotation): one good one is enough.
    let id = unique("m");
    let ts = now_s();
    let both = format!("v1,bm9wZQ== {}", sign(SECRET, &id, ts, body.as_bytes()));
    let r = http()
        .post(&url)
        .header("webhook-id", &id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", both)
        .body(body)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);

    let other = "whsec_dGhpcyBpcyBub3QgdGhlIHNlY3JldA==";
    let (status, answer) = status_and_json(post_signed(&url, other, &unique("m"), now_s(), body));
    assert_eq!((status, answer["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("invalid signature")));
    let (status, answer) = status_and_json(post_signed(&url, SECRET, &unique("m"), now_s() - 3600, body));
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(answer["error"].as_str().unwrap().contains("tolerance"), "{answer}");
    // A body changed after signing.
    let id = unique("m");
    let r = http()
        .post(&url)
        .header("webhook-id", &id)
        .header("webhook-timestamp", now_s().to_string())
        .header("webhook-signature", sign(SECRET, &id, now_s(), body.as_bytes()))
        .body(r#"{"n": 2}"#)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let (status, answer) = status_and_json(http().post(&url).body(body).send().unwrap());
    assert_eq!((status, answer["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("missing header webhook-id")));

    let reasons = k.rejections(&mut hub, "sw", 4);
    assert_eq!(
        reasons,
        vec![
            "invalid signature",
            "webhook-timestamp is outside the tolerance (replayed or clock skew)",
            "invalid signature",
            "missing header webhook-id"
        ]
    );
    let recorded: bool = hub.one(&format!(
        "SELECT bool_and(remote_addr = '127.0.0.1' AND body_sha256 ~ '^[0-9a-f]{{64}}$') FROM ihub.inbound_rejections \
         WHERE integration = '{}'",
        k.integration
    ));
    assert!(recorded, "rejections keep the remote address and body hash");
    assert_eq!(k.wait_seen(&mut hub, 2), vec![1, 1]);
    assert_eq!(k.items(&mut hub, "sw"), 2, "refused requests are never queued");
}

#[test]
fn hmac_sha256_accepts_hex_and_base64_digests_and_refuses_bad_or_missing_ones() {
    let mut hub = hub();
    let k = kit(&mut hub);
    let secret = "gh-secret-0123";
    let url = k.source(&mut hub, "gh", &format!(", 'hmac-sha256', '{secret}', 'X-Hub-Signature-256'"));
    let body = r#"{"n": 7}"#;
    let post = |sig: Option<String>| {
        let mut r = http().post(&url).header("content-type", "application/json").body(body);
        if let Some(sig) = sig {
            r = r.header("X-Hub-Signature-256", sig);
        }
        r.send().unwrap().status()
    };
    let hex = hmac_hex(secret, body.as_bytes());
    assert_eq!(post(Some(format!("sha256={hex}"))), StatusCode::ACCEPTED);
    let raw: Vec<u8> = (0..32).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
    // Same body again: accepted as a duplicate (de-duplicated by body hash).
    assert_eq!(post(Some(b64)), StatusCode::OK);
    assert_eq!(post(Some(format!("sha256={}", hmac_hex("wrong", body.as_bytes())))), StatusCode::UNAUTHORIZED);
    assert_eq!(post(None), StatusCode::UNAUTHORIZED);
    assert_eq!(k.rejections(&mut hub, "gh", 2), vec!["invalid signature", "missing header x-hub-signature-256"]);
    assert_eq!(k.wait_seen(&mut hub, 1), vec![7]);
}

#[test]
fn shared_secret_accepts_the_secret_and_never_stores_it() {
    let mut hub = hub();
    let k = kit(&mut hub);
    let secret = "zoho-s3cret-value";
    let url = k.source(&mut hub, "zoho", &format!(", 'shared-secret', '{secret}', 'X-Zoho-Webhook-Secret'"));
    let post = |value: Option<&str>, n: i32| {
        let mut r = http().post(&url).header("content-type", "application/json").body(format!(r#"{{"n": {n}}}"#));
        if let Some(v) = value {
            r = r.header("X-Zoho-Webhook-Secret", v);
        }
        r.send().unwrap().status()
    };
    assert_eq!(post(Some(secret), 1), StatusCode::ACCEPTED);
    assert_eq!(post(Some("zoho-s3cret-valuX"), 2), StatusCode::UNAUTHORIZED);
    assert_eq!(post(None, 3), StatusCode::UNAUTHORIZED);
    assert_eq!(k.rejections(&mut hub, "zoho", 2), vec!["invalid secret", "missing header x-zoho-webhook-secret"]);
    assert_eq!(k.wait_seen(&mut hub, 1), vec![1]);
    // Neither the right secret nor a wrong guess is kept anywhere.
    let leaks: i64 = hub.one(
        "SELECT (SELECT count(*) FROM ihub.inbound_items WHERE headers::text LIKE '%s3cret%') + \
                (SELECT count(*) FROM ihub.inbound_rejections WHERE headers::text LIKE '%s3cret%') + \
                (SELECT count(*) FROM ihub.logs WHERE message LIKE '%s3cret%' OR details::text LIKE '%s3cret%')",
    );
    assert_eq!(leaks, 0);
    let masked: String = hub.one(&format!(
        "SELECT headers->>'x-zoho-webhook-secret' FROM ihub.inbound_rejections WHERE integration = '{}' \
         AND headers ? 'x-zoho-webhook-secret'",
        k.integration
    ));
    assert_eq!(masked, "********");
}

#[test]
fn an_unverified_source_takes_anything_and_drops_repeated_bodies() {
    let mut hub = hub();
    let k = kit(&mut hub);
    let url = k.source(&mut hub, "open", ", 'none', id_header => 'X-Delivery'");
    let post = |delivery: &str, n: i32| {
        http().post(&url).header("x-delivery", delivery).body(format!(r#"{{"n": {n}}}"#)).send().unwrap()
    };
    let first = item_id(post("d-1", 1));
    let (status, again) = status_and_json(post("d-1", 2));
    assert_eq!((status, again["id"].as_i64(), again["duplicate"].as_bool()), (StatusCode::OK, Some(first), Some(true)));
    item_id(post("d-2", 3));
    assert_eq!(k.wait_seen(&mut hub, 2), vec![1, 3]);
}

#[test]
fn a_repeated_webhook_id_is_answered_with_the_first_item_and_queued_once() {
    let mut hub = hub();
    let k = kit(&mut hub);
    let url = k.source(&mut hub, "dup", &format!(", secret => '{SECRET}'"));
    let id = unique("msg");
    let first = item_id(post_signed(&url, SECRET, &id, now_s(), r#"{"n": 1}"#));
    // A retry by the sender, signed again later: same id, same answer.
    for _ in 0..3 {
        let (status, again) = status_and_json(post_signed(&url, SECRET, &id, now_s(), r#"{"n": 1}"#));
        assert_eq!((status, again["id"].as_i64()), (StatusCode::OK, Some(first)));
    }
    assert_eq!(k.wait_seen(&mut hub, 1), vec![1]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(k.items(&mut hub, "dup"), 1);
    assert_eq!(k.seen(&mut hub), vec![1], "processed once");
}

#[test]
fn oversized_bodies_are_refused_with_413_declared_or_streamed() {
    let mut hub = hub();
    let k = kit(&mut hub);
    let url = k.source(&mut hub, "big", ", 'none'");
    let limit: i64 = hub.one("SELECT pg_size_bytes(current_setting('ihub.max_body_size'))");
    let big = vec![b'x'; limit as usize + 1];
    let (status, answer) = status_and_json(http().post(&url).body(big.clone()).send().unwrap());
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("ihub.max_body_size"));
    // Chunked, with no Content-Length: cut off when it passes the limit.
    let chunks = big.chunks(64 * 1024).map(|c| Ok::<_, std::io::Error>(c.to_vec())).collect::<Vec<_>>();
    let streamed = reqwest::blocking::Body::new(ChunkReader::new(chunks));
    assert_eq!(http().post(&url).body(streamed).send().unwrap().status(), StatusCode::PAYLOAD_TOO_LARGE);
    // A body right at the limit is fine.
    let fits = http().post(&url).body(vec![b' '; limit as usize]).send().unwrap();
    assert_eq!(fits.status(), StatusCode::ACCEPTED);
    assert_eq!(k.items(&mut hub, "big"), 1);
}

/// A reader over chunks, so that reqwest sends the body chunked.
struct ChunkReader {
    chunks: std::vec::IntoIter<std::io::Result<Vec<u8>>>,
    current: std::io::Cursor<Vec<u8>>,
}

impl ChunkReader {
    fn new(chunks: Vec<std::io::Result<Vec<u8>>>) -> ChunkReader {
        ChunkReader { chunks: chunks.into_iter(), current: std::io::Cursor::new(Vec::new()) }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let n = self.current.read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            match self.chunks.next() {
                Some(chunk) => self.current = std::io::Cursor::new(chunk?),
                None => return Ok(0),
            }
        }
    }
}

/// Writes raw bytes to the listener and returns what it answers (if anything).
fn raw_exchange(bytes: &[u8]) -> String {
    let address = std::env::var("IHUB_LISTEN").unwrap_or_else(|_| "127.0.0.1:8490".into());
    let mut socket = TcpStream::connect(address).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = socket.write_all(bytes);
    let _ = socket.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    let _ = socket.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn malformed_http_and_garbage_leave_the_listener_serving() {
    let mut hub = hub();
    let k = kit(&mut hub);
    let url = k.source(&mut hub, "raw", ", 'none'");
    let path = format!("/webhooks/{}/raw", k.integration);
    let post = |rest: &[u8]| [format!("POST {path} HTTP/1.1\r\n").as_bytes(), rest].concat();
    let garbage: Vec<u8> = (0..4096).map(|_| rand::random::<u8>()).collect();
    let answers = [
        raw_exchange(&garbage),
        raw_exchange(b"NOT HTTP AT ALL\r\n\r\n"),
        raw_exchange(&post(b"Host: x\r\nContent-Length: nope\r\n\r\n")),
        raw_exchange(&post(b"Host: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")),
        raw_exchange(&post(b"Host: x\r\nContent-Length: 100\r\n\r\nshort")),
        raw_exchange(&post(b"Ho")),
    ];
    for answer in &answers[1..4] {
        assert!(answer.starts_with("HTTP/1.1 400"), "malformed request answered: {answer:?}");
    }
    // A cut-off request, or a socket dropped without a byte.
    drop(TcpStream::connect(std::env::var("IHUB_LISTEN").unwrap_or_else(|_| "127.0.0.1:8490".into())).unwrap());

    let (status, answer) = status_and_json(http().post(format!("{url}?delay=soon")).body("{}").send().unwrap());
    assert_eq!(
        (status, answer["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("delay must be a number of seconds"))
    );
    let (status, _) =
        status_and_json(http().post(&url).header("x-odd", &b"caf\xc3\xa9"[..]).body("{}").send().unwrap());
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Still serving, and still queueing.
    item_id(http().post(&url).body(r#"{"n": 5}"#).send().unwrap());
    assert_eq!(k.wait_seen(&mut hub, 1), vec![5]);
    assert!(hub.one::<bool>("SELECT count(*) = 1 FROM ihub.workers WHERE kind = 'listener'"));
}

#[test]
fn unknown_paths_methods_and_disabled_integrations_are_answered_plainly() {
    let mut hub = hub();
    let k = kit(&mut hub);
    let url = k.source(&mut hub, "src", ", 'none'");
    let client = http();
    let status = |r: reqwest::Result<Response>| r.unwrap().status();
    assert_eq!(
        status(client.post(listener_url(&format!("/webhooks/{}/nope", k.integration))).body("{}").send()),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        status(client.post(listener_url("/webhooks/no_such_integration/src")).body("{}").send()),
        StatusCode::NOT_FOUND
    );
    assert_eq!(status(client.post(listener_url("/elsewhere")).send()), StatusCode::NOT_FOUND);
    assert_eq!(status(client.get(&url).send()), StatusCode::METHOD_NOT_ALLOWED);

    let health = client.get(listener_url("/healthz")).send().unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let health: Value = health.json().unwrap();
    assert!(health.get("status").is_some(), "{health}");

    // A source created a moment ago is found at once.
    let fresh = k.source(&mut hub, "fresh", ", 'none'");
    assert_eq!(status(client.post(&fresh).body("{}").send()), StatusCode::ACCEPTED);

    hub.exec(&format!("SELECT ihub.disable_integration('{}')", k.integration));
    // Changes reach the listener at commit: no stale answers in between.
    assert_eq!(status(client.post(&url).body("{}").send()), StatusCode::SERVICE_UNAVAILABLE);
    hub.exec(&format!("SELECT ihub.enable_integration('{}')", k.integration));
    assert_eq!(status(client.post(&url).body(r#"{"again": 1}"#).send()), StatusCode::ACCEPTED);
}

#[test]
fn a_source_created_again_is_served_with_its_new_secret_at_once() {
    let mut hub = hub();
    let k = kit(&mut hub);
    let url = k.source(&mut hub, "again", &format!(", secret => '{SECRET}'"));
    item_id(post_signed(&url, SECRET, &unique("m"), now_s(), r#"{"n": 1}"#));
    assert_eq!(k.wait_seen(&mut hub, 1), vec![1]);
    let other = "whsec_dGhpcyBpcyB0aGUgbmV3IHNlY3JldCBrZXk=";
    hub.exec(&format!(
        "SELECT ihub.drop_source('{i}', 'again');
         SELECT ihub.create_source('{i}', 'again', '{p}_handle(ihub.inbound_items)', secret => '{other}');",
        i = k.integration,
        p = k.p
    ));
    item_id(post_signed(&url, other, &unique("m"), now_s(), r#"{"n": 2}"#));
    assert_eq!(post_signed(&url, SECRET, &unique("m"), now_s(), r#"{"n": 3}"#).status(), StatusCode::UNAUTHORIZED);
    assert_eq!(k.wait_seen(&mut hub, 2), vec![1, 2]);
    // A secret changed in place applies at once too.
    hub.exec(&format!(
        "UPDATE ihub.inbound_secret SET secret = '{SECRET}' WHERE source_id = \
           (SELECT id FROM ihub.inbound_sources WHERE integration = '{}' AND name = 'again')",
        k.integration
    ));
    item_id(post_signed(&url, SECRET, &unique("m"), now_s(), r#"{"n": 4}"#));
}

#[test]
fn a_failed_item_is_archived_and_processed_when_reactivated() {
    let mut hub = hub();
    let k = kit(&mut hub);
    let url = k.source(&mut hub, "flaky", ", 'none'");
    let bad = item_id(http().post(&url).body(r#"{"n": 1, "fail": true}"#).send().unwrap());
    let good = item_id(http().post(&url).body(r#"{"n": 2}"#).send().unwrap());
    assert!(hub.wait_true(&format!("SELECT state = 'done' FROM ihub.inbound_items WHERE id = {good}"), WAIT));
    assert!(hub.wait_true(&format!("SELECT count(*) = 1 FROM ihub.inbound_failed WHERE id = {bad}"), WAIT));
    let error: String = hub.one(&format!("SELECT error FROM ihub.inbound_failed WHERE id = {bad}"));
    assert_eq!(error, "cannot handle 1");
    // The failed attempt's writes were rolled back; the item stays archived.
    assert_eq!(k.seen(&mut hub), vec![2]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(hub.one::<String>(&format!("SELECT state FROM ihub.inbound_items WHERE id = {bad}")), "failed");
    assert_eq!(
        hub.one::<i64>(&format!("SELECT count(*) FROM ihub.logs WHERE inbound_item = {bad} AND level = 'error'")),
        1
    );

    hub.exec(&format!("UPDATE {}_flag SET fail = false", k.p));
    assert_eq!(hub.one::<i64>(&format!("SELECT ihub.reactivate_inbound(ARRAY[{bad}])")), 1);
    assert!(hub.wait_true(&format!("SELECT state = 'done' FROM ihub.inbound_items WHERE id = {bad}"), WAIT));
    assert_eq!(k.seen(&mut hub), vec![2, 1]);
    let (attempts, reactivated): (i32, i32) = {
        let r = hub
            .db
            .query_one(&format!("SELECT attempts, reactivated FROM ihub.inbound_items WHERE id = {bad}"), &[])
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((attempts, reactivated), (2, 1));
}

#[test]
fn items_with_one_ordering_key_are_processed_in_arrival_order() {
    let mut hub = hub();
    let k = kit(&mut hub);
    let url = k.source(&mut hub, "keyed", ", 'none', ordering_key => 'header:X-Customer'");
    let post = |customer: &str, n: i32, delay: f64| {
        item_id(
            http()
                .post(format!("{url}?delay={delay}"))
                .header("x-customer", customer)
                .body(format!(r#"{{"n": {n}}}"#))
                .send()
                .unwrap(),
        )
    };
    // Customer a's first item is due later than its second: the second waits.
    post("a", 1, 1.0);
    post("a", 2, 0.0);
    post("b", 3, 0.0);
    let seen = k.wait_seen(&mut hub, 3);
    assert_eq!(seen, vec![3, 1, 2]);
}

/// Processors handle due items whose handlers run as one role in one
/// transaction (issue 11), each in a subtransaction: a failing item is
/// rolled back and archived alone, the others commit.
#[test]
fn items_share_a_transaction_and_a_failing_one_is_archived_alone() {
    let mut hub = hub();
    let k = kit(&mut hub);
    let p = &k.p;
    hub.exec(&format!(
        "CREATE TABLE {p}_tx (n int, txid bigint);
         CREATE FUNCTION {p}_tx(item ihub.inbound_items) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO {p}_tx VALUES ((item.payload->>'n')::int, txid_current());
             IF (item.payload->>'fail')::boolean THEN
                 RAISE EXCEPTION 'cannot handle %', item.payload->>'n';
             END IF;
         END $$;
         SELECT ihub.create_source('{i}', 'tx', '{p}_tx(ihub.inbound_items)', 'none');",
        i = k.integration
    ));
    // Queued in one transaction: due together.
    let ids: Vec<i64> = {
        let mut tx = hub.db.transaction().unwrap();
        let ids = (1..=5)
            .map(|n| {
                let body = format!(r#"{{"n": {n}, "fail": {}}}"#, n == 3);
                tx.query_one(
                    &format!("SELECT ihub.receive('{}', 'tx', '{{}}', convert_to('{body}', 'UTF8'))", k.integration),
                    &[],
                )
                .unwrap()
                .get(0)
            })
            .collect();
        tx.commit().unwrap();
        ids
    };
    let open = format!(
        "SELECT count(*) = 0 FROM ihub.inbound_item WHERE id = ANY('{{{}}}'::bigint[]) AND state IN ('pending', 'running')",
        ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")
    );
    assert!(hub.wait_true(&open, WAIT), "items still open");
    let rows: Vec<(i32, i64)> = hub
        .db
        .query(&format!("SELECT n, txid FROM {p}_tx ORDER BY n"), &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let handled: Vec<i32> = rows.iter().map(|r| r.0).collect();
    assert_eq!(handled, [1, 2, 4, 5], "the failed item's insert rolled back alone");
    let txids: std::collections::HashSet<i64> = rows.iter().map(|r| r.1).collect();
    assert!(txids.len() < rows.len(), "every item had a transaction of its own: {rows:?}");
    let error: String = hub.one(&format!("SELECT error FROM ihub.inbound_failed WHERE id = {}", ids[2]));
    assert!(error.contains("cannot handle 3"), "{error}");
}

#[test]
fn an_item_whose_handler_was_dropped_fails_naming_it_and_frees_its_ordering_key() {
    let mut hub = hub();
    let k = kit(&mut hub);
    let p = &k.p;
    hub.exec(&format!(
        "CREATE FUNCTION {p}_gone(item ihub.inbound_items) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{{}}'::jsonb $$;
         SELECT ihub.create_source('{i}', 'gone', '{p}_gone(ihub.inbound_items)', 'none',
                                   ordering_key => 'header:X-Customer');",
        i = k.integration
    ));
    // Two items with one ordering key, queued and the handler dropped in one
    // transaction: the handler is gone before any processor sees them.
    let ids: Vec<i64> = {
        let mut tx = hub.db.transaction().unwrap();
        let ids = (1..=2)
            .map(|n| {
                tx.query_one(
                    &format!(
                        "SELECT ihub.receive('{}', 'gone', '{{\"X-Customer\": \"c1\"}}', convert_to('{{\"n\": {n}}}', 'UTF8'))",
                        k.integration
                    ),
                    &[],
                )
                .unwrap()
                .get(0)
            })
            .collect();
        tx.batch_execute(&format!("DROP FUNCTION {p}_gone(ihub.inbound_items)")).unwrap();
        tx.commit().unwrap();
        ids
    };
    // Both end archived as failed, the second after the first: the first
    // does not hold the ordering key.
    for id in &ids {
        assert!(
            hub.wait_true(&format!("SELECT count(*) = 1 FROM ihub.inbound_failed WHERE id = {id}"), WAIT),
            "item {id} is {}",
            hub.one::<String>(&format!("SELECT state FROM ihub.inbound_items WHERE id = {id}"))
        );
        let error: String = hub.one(&format!("SELECT error FROM ihub.inbound_failed WHERE id = {id}"));
        assert!(error.contains(&format!("{p}_gone(ihub.inbound_items)")), "the error names the handler: {error}");
    }
    // The processors go on with other sources' items.
    let url = k.source(&mut hub, "fine", ", 'none'");
    item_id(http().post(&url).body(r#"{"n": 7}"#).send().unwrap());
    assert_eq!(k.wait_seen(&mut hub, 1), vec![7]);
}

#[test]
fn a_handler_can_fan_out_to_jobs_and_logs_in_its_transaction() {
    let mut hub = hub();
    let k = kit(&mut hub);
    let p = &k.p;
    hub.exec(&format!(
        "CREATE TABLE {p}_jobs (n int);
         CREATE FUNCTION {p}_job(args jsonb) RETURNS void LANGUAGE sql AS $$ INSERT INTO {p}_jobs VALUES ((args->>'n')::int) $$;
         CREATE FUNCTION {p}_fan(item ihub.inbound_items) RETURNS jsonb LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM ihub.log('info', 'order ' || (item.payload->>'n'), item.payload, item.integration);
             RETURN jsonb_build_object('job', ihub.enqueue('{p}_job(jsonb)', item.payload));
         END $$;
         SELECT ihub.create_source('{i}', 'fan', '{p}_fan(ihub.inbound_items)', 'none');",
        i = k.integration
    ));
    let id = item_id(
        http().post(listener_url(&format!("/webhooks/{}/fan", k.integration))).body(r#"{"n": 42}"#).send().unwrap(),
    );
    assert!(hub.wait_true(&format!("SELECT count(*) = 1 FROM {p}_jobs WHERE n = 42"), WAIT), "the job ran");
    let job: i64 = hub.one(&format!("SELECT (result->>'job')::bigint FROM ihub.inbound_items WHERE id = {id}"));
    assert_eq!(hub.one::<String>(&format!("SELECT state FROM ihub.jobs WHERE id = {job}")), "done");
    assert_eq!(
        hub.one::<i64>(&format!(
            "SELECT count(*) FROM ihub.logs WHERE integration = '{}' AND message = 'order 42'",
            k.integration
        )),
        1
    );
}

#[test]
fn receive_from_sql_verifies_dedups_and_queues_like_the_listener() {
    let mut hub = hub();
    let k = kit(&mut hub);
    let url = k.source(&mut hub, "both", &format!(", secret => '{SECRET}'"));
    let body = r#"{"n": 9}"#;
    let id = unique("msg");
    let ts = now_s();
    let headers = json!({
        "Webhook-Id": id,
        "Webhook-Timestamp": ts.to_string(),
        "Webhook-Signature": sign(SECRET, &id, ts, body.as_bytes()),
        "Content-Type": "application/json",
    });
    let receive =
        format!("SELECT ihub.receive('{}', 'both', '{headers}', convert_to('{body}', 'UTF8'))", k.integration);
    let first: i64 = hub.one(&receive);
    assert_eq!(hub.one::<i64>(&receive), first, "a duplicate gets the first id");
    // The same request over HTTP is a duplicate of the SQL one.
    let (status, answer) = status_and_json(post_signed(&url, SECRET, &id, ts, body));
    assert_eq!((status, answer["id"].as_i64()), (StatusCode::OK, Some(first)));
    assert_eq!(k.wait_seen(&mut hub, 1), vec![9]);

    let forged = headers.to_string().replace(&id, "msg_forged");
    let refused: Option<i64> =
        hub.one(&format!("SELECT ihub.receive('{}', 'both', '{forged}', convert_to('{body}', 'UTF8'))", k.integration));
    assert_eq!(refused, None);
    assert_eq!(k.rejections(&mut hub, "both", 1), vec!["invalid signature"]);
    assert_eq!(k.items(&mut hub, "both"), 1);
}

/// Random letters and digits: long enough and varied enough that Postgres
/// cannot compress them under the btree limit (2704 bytes an index row).
fn incompressible(len: usize) -> String {
    use rand::Rng;
    rand::thread_rng().sample_iter(&rand::distributions::Alphanumeric).take(len).map(char::from).collect()
}

#[test]
fn one_request_with_an_oversized_key_fails_nothing_else_in_its_batch() {
    let mut hub = hub();
    let k = kit(&mut hub);
    let url = k.source(&mut hub, "keys", ", 'none', id_header => 'X-Delivery', ordering_key => 'header:X-Customer'");
    let long_customer = incompressible(12_000);
    let long_delivery = incompressible(12_000);
    // Eight senders at once, so that their requests share the listener's
    // batches; two of them send keys far over the btree limit.
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (url, long_customer, long_delivery) = (url.clone(), long_customer.clone(), long_delivery.clone());
            std::thread::spawn(move || {
                let client = http();
                (0..25)
                    .map(|i| {
                        let n = t * 100 + i;
                        let (customer, delivery) = match t {
                            0 => (long_customer.clone(), unique("d")),
                            1 => (format!("c{n}"), format!("{long_delivery}{n}")),
                            _ => (format!("c{n}"), unique("d")),
                        };
                        let r = client
                            .post(&url)
                            .header("x-customer", customer)
                            .header("x-delivery", delivery)
                            .body(format!(r#"{{"n": {n}}}"#))
                            .send()
                            .unwrap();
                        (n, r.status())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let answers: Vec<(i32, StatusCode)> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let refused: Vec<_> = answers.iter().filter(|(_, s)| *s != StatusCode::ACCEPTED).collect();
    assert!(refused.is_empty(), "not accepted: {refused:?}");
    assert_eq!(k.wait_seen(&mut hub, 200).len(), 200);
    // Long keys are stored hashed, short ones as they are.
    let keys: Vec<(i32, i32)> = hub
        .db
        .query(
            &format!(
                "SELECT max(length(ordering_key)), max(length(dedup_key)) FROM ihub.inbound_items \
                 WHERE integration = '{}'",
                k.integration
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(keys, vec![(71, 71)], "sha256: and 64 hex digits at most");
    let hashed: i64 = hub.one(&format!(
        "SELECT count(DISTINCT ordering_key) FROM ihub.inbound_items WHERE integration = '{}' AND ordering_key LIKE 'sha256:%'",
        k.integration
    ));
    assert_eq!(hashed, 1, "one long customer key, one hash");
    // A hashed delivery id still finds its duplicate.
    let again = http()
        .post(&url)
        .header("x-customer", "c1")
        .header("x-delivery", format!("{long_delivery}100"))
        .body(r#"{"n": 100}"#)
        .send()
        .unwrap();
    assert_eq!(again.status(), StatusCode::OK, "a duplicate");
}

#[test]
fn rejections_are_kept_for_their_own_retention() {
    let mut hub = hub();
    let reason = unique("old");
    hub.exec(&format!(
        "INSERT INTO ihub.inbound_rejection (received_at, reason) VALUES
             (now() - interval '8 days', '{reason}-8d'), (now() - interval '1 day', '{reason}-1d')"
    ));
    assert_eq!(hub.one::<String>("SELECT keep::text FROM ihub.retention_settings WHERE kind = 'rejections'"), "7 days");
    hub.exec("SELECT ihub.cleanup()");
    let left: Vec<String> = hub
        .db
        .query(&format!("SELECT reason FROM ihub.inbound_rejections WHERE reason LIKE '{reason}%'"), &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, vec![format!("{reason}-1d")]);
}

#[test]
fn a_source_with_failed_items_is_not_dropped_with_them() {
    let mut hub = hub();
    let k = kit(&mut hub);
    let url = k.source(&mut hub, "keepfailed", ", 'none'");
    let bad = item_id(http().post(&url).body(r#"{"n": 1, "fail": true}"#).send().unwrap());
    assert!(hub.wait_true(&format!("SELECT count(*) = 1 FROM ihub.inbound_failed WHERE id = {bad}"), WAIT));
    let error = hub.error(&format!("SELECT ihub.drop_source('{}', 'keepfailed')", k.integration));
    assert!(error.contains("failed item"), "{error}");
    assert!(error.contains("ihub.inbound_failed") && error.contains("ihub.reactivate_inbound"), "{error}");
    assert_eq!(hub.one::<i64>(&format!("SELECT count(*) FROM ihub.inbound_failed WHERE id = {bad}")), 1);
    assert!(hub.one::<bool>(&format!(
        "SELECT count(*) = 1 FROM ihub.inbound_sources WHERE integration = '{}' AND name = 'keepfailed'",
        k.integration
    )));
    // Once it is processed, the source goes with its processed items.
    hub.exec(&format!("UPDATE {}_flag SET fail = false", k.p));
    hub.exec(&format!("SELECT ihub.reactivate_inbound(ARRAY[{bad}])"));
    assert!(hub.wait_true(&format!("SELECT state = 'done' FROM ihub.inbound_items WHERE id = {bad}"), WAIT));
    hub.exec(&format!("SELECT ihub.drop_source('{}', 'keepfailed')", k.integration));
    assert_eq!(k.items(&mut hub, "keepfailed"), 0);
}

/// Signs a request as `provider` does, with the provider's own npm library
/// (tests/presets/sign.mjs); returns its headers.
fn provider_headers(provider: &str, secret: &str, body: &str, url: &str, id: &str) -> Vec<(String, String)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/presets");
    let input = json!({"provider": provider, "secret": secret, "body": body, "url": url, "id": id,
                       "timestamp": now_s()});
    let out = std::process::Command::new("node")
        .arg(format!("{dir}/sign.mjs"))
        .arg(input.to_string())
        .current_dir(dir)
        .output()
        .expect("node runs (tests/run installs tests/presets with npm ci)");
    assert!(out.status.success(), "sign.mjs {provider}: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["headers"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect()
}

fn post_with(url: &str, headers: &[(String, String)], body: &str) -> Response {
    let mut req = http().post(url).body(body.to_string());
    for (k, v) in headers {
        req = req.header(k, v);
    }
    req.send().unwrap()
}

/// Each preset accepts a request signed by its provider's official library,
/// answers the same delivery again as a duplicate (by the provider's id:
/// Stripe's event id, GitHub's delivery, Shopify's webhook id, Twilio's
/// idempotency token, Svix's id; Slack's by the body), and refuses it with
/// a changed body. Twilio's form post becomes payload fields, and its
/// source answers with its fixed TwiML response.
#[test]
fn presets_verify_requests_signed_by_the_providers_libraries() {
    let mut hub = hub();
    let k = kit(&mut hub);
    let cases = [
        ("stripe", "whsec_stripe_test_secret", r#"{"id":"evt_1N","type":"charge.succeeded","n":1}"#),
        ("github", "It's a Secret to Everybody", r#"{"action":"opened","n":2}"#),
        ("shopify", "shpss_test_secret", r#"{"id":820982911946154500,"n":3}"#),
        ("slack", "8f742231b10e8888abcd99yyyzzz85a5", r#"{"type":"event_callback","n":4}"#),
        ("svix", SECRET, r#"{"type":"invoice.paid","n":5}"#),
        ("twilio", "twilio_auth_token", "MessageSid=SM123&From=%2B15551234567&Body=hi+there&n=6"),
    ];
    for (i, (provider, secret, body)) in cases.iter().enumerate() {
        let response = if *provider == "twilio" {
            r#", response => '{"status": 200, "content_type": "text/xml", "body": "<Response/>"}'"#
        } else {
            ""
        };
        let url =
            k.source(&mut hub, provider, &format!(", verify => '{provider}', secret => $s${secret}$s${response}"));
        let headers = provider_headers(provider, secret, body, &url, &format!("{provider}-delivery-{i}"));

        let first = post_with(&url, &headers, body);
        let status = first.status();
        let text = first.text().unwrap();
        if *provider == "twilio" {
            assert_eq!((status, text.as_str()), (StatusCode::OK, "<Response/>"), "twilio's fixed response");
        } else {
            assert_eq!(status, StatusCode::ACCEPTED, "{provider}: {text}");
        }
        let again = post_with(&url, &headers, body);
        let again_status = again.status();
        let again_text = again.text().unwrap();
        if *provider != "twilio" {
            assert!(
                again_status == StatusCode::OK && again_text.contains("\"duplicate\":true"),
                "{provider}: {again_text}"
            );
        }
        let tampered = body.replace(&format!("{}", i + 1), "99");
        let refused = post_with(&url, &headers, &tampered);
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED, "{provider} with a changed body");
    }
    assert_eq!(k.wait_seen(&mut hub, 6), vec![1, 2, 3, 4, 5, 6]);
    // Processed once each: the repeats were duplicates (Twilio's too).
    assert_eq!(
        hub.one::<i64>(&format!("SELECT count(*) FROM ihub.inbound_items WHERE integration = '{}'", k.integration)),
        6
    );
    let twilio: String = hub.one(&format!(
        "SELECT payload::text FROM ihub.inbound_items WHERE integration = '{}' AND source = 'twilio'",
        k.integration
    ));
    let twilio: Value = serde_json::from_str(&twilio).unwrap();
    // Stored signatures are masked: GitHub's signs no timestamp, so a viewer
    // could otherwise post the request again under a new delivery id.
    let stored: String = hub.one(&format!(
        "SELECT headers ->> 'x-hub-signature-256' FROM ihub.inbound_items WHERE integration = '{}' AND source = 'github'",
        k.integration
    ));
    assert_eq!(stored, "********");
    assert_eq!(twilio, json!({"MessageSid": "SM123", "From": "+15551234567", "Body": "hi there", "n": "6"}));
}

/// Slack checks an events URL with a signed url_verification request: the
/// listener answers its challenge at once and queues nothing. Unsigned, it
/// is refused like any request.
#[test]
fn slack_url_verification_is_answered_with_its_challenge() {
    let mut hub = hub();
    let k = kit(&mut hub);
    let secret = "8f742231b10e8888abcd99yyyzzz85a5";
    let url = k.source(&mut hub, "slack", &format!(", verify => 'slack', secret => '{secret}'"));
    let body = r#"{"token":"Jhj5dZrVaK7ZwHHjRyZWjbDl","challenge":"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P","type":"url_verification"}"#;
    let headers = provider_headers("slack", secret, body, &url, "");
    let r = post_with(&url, &headers, body);
    assert_eq!(r.status(), StatusCode::OK);
    let answer: Value = r.json().unwrap();
    assert_eq!(answer, json!({"challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"}));
    assert_eq!(post_with(&url, &[], body).status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        hub.one::<i64>(&format!("SELECT count(*) FROM ihub.inbound_items WHERE integration = '{}'", k.integration)),
        0
    );
}
