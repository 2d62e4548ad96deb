//! A token bucket per source: `rate` requests a second on average, up to
//! `burst` at once. Refused requests learn when to come back.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub fn new(burst: u32, now: Instant) -> Bucket {
        Bucket { tokens: burst as f64, last: now }
    }

    /// Takes a token, or says how long until one is available.
    pub fn take(&mut self, rate: f64, burst: u32, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate).min(burst as f64);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate.max(f64::MIN_POSITIVE)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(3, t0);
        assert!((0..3).all(|_| b.take(2.0, 3, t0).is_ok()), "the burst passes");
        let wait = b.take(2.0, 3, t0).unwrap_err();
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500), "{wait:?}");
        assert!(b.take(2.0, 3, t0 + Duration::from_millis(500)).is_ok(), "one token after 1/rate seconds");
        assert!(b.take(2.0, 3, t0 + Duration::from_millis(500)).is_err());
        assert!((0..3).all(|_| b.take(2.0, 3, t0 + Duration::from_secs(60)).is_ok()), "refills up to the burst");
        assert!(b.take(2.0, 3, t0 + Duration::from_secs(60)).is_err());
    }
}
