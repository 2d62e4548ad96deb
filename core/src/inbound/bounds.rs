//! Bounds on what untrusted requests can make the listener keep: keys short
//! enough for a btree index, rejection headers cut to a bounded size,
//! connections per remote address, and how often a cache miss may reload.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Keys (ordering key, de-duplication key) longer than this many bytes are
/// stored as `sha256:` and the hex of their SHA-256, 71 bytes: far under the
/// btree limit (2704 bytes an index row). `ihub._ordering_key` applies the
/// same rule in SQL.
pub const MAX_KEY_BYTES: usize = 256;

/// The key as stored: itself when short enough, else its hash.
pub fn bounded_key(key: &str) -> String {
    if key.len() <= MAX_KEY_BYTES {
        return key.to_string();
    }
    let digest = Sha256::digest(key.as_bytes());
    let mut out = String::with_capacity(71);
    out.push_str("sha256:");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Bytes of one header value kept with a rejected request.
pub const REJECTION_VALUE_BYTES: usize = 512;
/// Bytes of header names and values kept with a rejected request, in all.
pub const REJECTION_HEADER_BYTES: usize = 8192;

/// Headers of a rejected request as recorded: each value cut to `max_value`
/// bytes (its full length noted), names to 128 bytes, and no more headers
/// once `max_total` bytes are kept; how many were left out is noted under
/// `x-ihub-omitted-headers`.
pub fn bounded_headers(headers: &[(String, String)], max_value: usize, max_total: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut total = 0;
    let mut omitted = 0;
    for (name, value) in headers {
        let name = cut(name, 128);
        let value = if value.len() > max_value {
            format!("{}... ({} bytes)", cut(value, max_value), value.len())
        } else {
            value.clone()
        };
        if total + name.len() + value.len() > max_total {
            omitted += 1;
            continue;
        }
        total += name.len() + value.len();
        out.push((name, value));
    }
    if omitted > 0 {
        out.push(("x-ihub-omitted-headers".to_string(), omitted.to_string()));
    }
    out
}

/// At most `max` bytes of `text`, cut at a character boundary.
fn cut(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// Open connections per remote address.
#[derive(Debug, Default)]
pub struct Connections<K: Hash + Eq> {
    open: HashMap<K, usize>,
}

impl<K: Hash + Eq> Connections<K> {
    pub fn new() -> Self {
        Connections { open: HashMap::new() }
    }

    /// Counts a new connection from `from`, unless `limit` are open already.
    pub fn try_open(&mut self, from: K, limit: usize) -> bool {
        let n = self.open.entry(from).or_insert(0);
        if *n >= limit {
            return false;
        }
        *n += 1;
        true
    }

    /// A connection from `from` ended.
    pub fn close(&mut self, from: &K) {
        if let Some(n) = self.open.get_mut(from) {
            *n -= 1;
            if *n == 0 {
                self.open.remove(from);
            }
        }
    }

    /// Open connections from `from`.
    pub fn open(&self, from: &K) -> usize {
        self.open.get(from).copied().unwrap_or(0)
    }

    /// Addresses with open connections (the map never outgrows them).
    pub fn addresses(&self) -> usize {
        self.open.len()
    }
}

/// Lets something happen at most once per interval.
#[derive(Debug, Default)]
pub struct Throttle {
    last: Option<Instant>,
}

impl Throttle {
    /// True (and counted) when the last allowed time is at least `interval` ago.
    pub fn allow(&mut self, now: Instant, interval: Duration) -> bool {
        if self.last.is_some_and(|t| now.saturating_duration_since(t) < interval) {
            return false;
        }
        self.last = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_keys_stay_long_ones_are_hashed() {
        assert_eq!(bounded_key("customer-42"), "customer-42");
        let exact = "k".repeat(MAX_KEY_BYTES);
        assert_eq!(bounded_key(&exact), exact);
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        let hashed = bounded_key(&long);
        assert_eq!(hashed.len(), 71);
        assert!(hashed.starts_with("sha256:"), "{hashed}");
        assert_eq!(hashed, bounded_key(&long), "the same key, the same hash");
        assert_ne!(hashed, bounded_key(&"k".repeat(MAX_KEY_BYTES + 2)));
        // sha256 of 'abc', as Postgres's encode(sha256('abc'), 'hex').
        assert_eq!(bounded_key(&"abc".repeat(100))[7..].len(), 64,);
        assert_eq!(
            bounded_key(&format!("{}", "é".repeat(200))),
            format!("sha256:{}", {
                let d = Sha256::digest("é".repeat(200).as_bytes());
                d.iter().map(|b| format!("{b:02x}")).collect::<String>()
            })
        );
    }

    #[test]
    fn rejection_headers_are_bounded() {
        let headers: Vec<(String, String)> = vec![
            ("webhook-id".into(), "msg_1".into()),
            ("x-junk".into(), "x".repeat(300_000)),
            ("x-".to_string() + &"n".repeat(1000), "v".into()),
        ];
        let kept = bounded_headers(&headers, 512, 8192);
        assert_eq!(kept[0], ("webhook-id".into(), "msg_1".into()));
        assert_eq!(kept[1].1, format!("{}... (300000 bytes)", "x".repeat(512)));
        assert_eq!(kept[2].0.len(), 128);
        let many: Vec<(String, String)> = (0..1000).map(|i| (format!("x-h{i}"), "y".repeat(400))).collect();
        let kept = bounded_headers(&many, 512, 8192);
        let size: usize = kept.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(size <= 8192 + 64, "{size}");
        assert_eq!(kept.last().unwrap().0, "x-ihub-omitted-headers");
        assert_eq!(kept.last().unwrap().1, (1000 - (kept.len() - 1)).to_string());
        // Cut at a character boundary.
        let kept = bounded_headers(&[("a".into(), "é".repeat(400))], 513, 8192);
        assert!(kept[0].1.starts_with(&"é".repeat(256)));
    }

    #[test]
    fn connections_are_counted_per_address() {
        let mut c = Connections::new();
        assert!(c.try_open("a", 2));
        assert!(c.try_open("a", 2));
        assert!(!c.try_open("a", 2), "the third from a is refused");
        assert!(c.try_open("b", 2), "others are not");
        c.close(&"a");
        assert_eq!(c.open(&"a"), 1);
        assert!(c.try_open("a", 2));
        c.close(&"a");
        c.close(&"a");
        c.close(&"b");
        assert_eq!(c.addresses(), 0, "closed addresses are forgotten");
        c.close(&"z");
        assert_eq!(c.open(&"z"), 0);
    }

    #[test]
    fn the_throttle_allows_once_per_interval() {
        let t0 = Instant::now();
        let mut t = Throttle::default();
        let every = Duration::from_millis(500);
        assert!(t.allow(t0, every));
        assert!(!t.allow(t0 + Duration::from_millis(100), every));
        assert!(!t.allow(t0 + Duration::from_millis(499), every));
        assert!(t.allow(t0 + every, every));
        assert!(!t.allow(t0 + every, every));
    }
}
