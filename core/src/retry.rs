//! Every retry decision of the three queues, in one place: for deliveries,
//! the endpoint's policy (backoff with jitter) and what each response or
//! error means; for jobs, the retry schedule (`job_next`). An inbound item
//! whose handler fails is not retried: it is archived as `failed` until
//! someone reactivates it, so there is nothing to decide for it here.

use std::time::{Duration, SystemTime};

use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Per-endpoint retry policy. Defaults follow Standard Webhooks practice:
/// 60 s, doubling, capped at 24 h, 10 attempts in all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    /// Seconds before the second attempt.
    pub initial_delay: f64,
    pub multiplier: f64,
    /// Upper bound in seconds for any computed delay (and for `Retry-After`).
    pub max_delay: f64,
    /// Fraction of the delay added or removed at random, 0 to 1.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_attempts: 10, initial_delay: 60.0, multiplier: 2.0, max_delay: 86_400.0, jitter: 0.2 }
    }
}

pub const POLICY_KEYS: &[&str] = &["max_attempts", "initial_delay", "multiplier", "max_delay", "jitter"];

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PolicyError {
    #[error("retry policy must be a JSON object")]
    NotAnObject,
    #[error("unknown retry policy key \"{0}\"")]
    UnknownKey(String),
    #[error("retry policy key \"{key}\" {problem}")]
    BadValue { key: &'static str, problem: &'static str },
}

impl RetryPolicy {
    /// Parses a user-supplied policy; missing keys take the defaults.
    pub fn from_json(value: &Value) -> Result<RetryPolicy, PolicyError> {
        let map = match value {
            Value::Null => return Ok(RetryPolicy::default()),
            Value::Object(map) => map,
            _ => return Err(PolicyError::NotAnObject),
        };
        if let Some(key) = map.keys().find(|k| !POLICY_KEYS.contains(&k.as_str())) {
            return Err(PolicyError::UnknownKey(key.clone()));
        }
        let num = |key: &'static str| -> Result<Option<f64>, PolicyError> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Number(n)) => Ok(n.as_f64()),
                Some(_) => Err(PolicyError::BadValue { key, problem: "must be a number" }),
            }
        };
        let d = RetryPolicy::default();
        let policy = RetryPolicy {
            max_attempts: match num("max_attempts")? {
                None => d.max_attempts,
                Some(n) if n >= 1.0 && n <= 100.0 && n.fract() == 0.0 => n as u32,
                Some(_) => {
                    return Err(PolicyError::BadValue {
                        key: "max_attempts",
                        problem: "must be a whole number from 1 to 100",
                    })
                }
            },
            initial_delay: num("initial_delay")?.unwrap_or(d.initial_delay),
            multiplier: num("multiplier")?.unwrap_or(d.multiplier),
            max_delay: num("max_delay")?.unwrap_or(d.max_delay),
            jitter: num("jitter")?.unwrap_or(d.jitter),
        };
        if !(0.0..=86_400.0 * 7.0).contains(&policy.initial_delay) {
            return Err(PolicyError::BadValue {
                key: "initial_delay",
                problem: "must be between 0 and 604800 seconds",
            });
        }
        if !(1.0..=100.0).contains(&policy.multiplier) {
            return Err(PolicyError::BadValue { key: "multiplier", problem: "must be between 1 and 100" });
        }
        if !(policy.initial_delay..=86_400.0 * 30.0).contains(&policy.max_delay) {
            return Err(PolicyError::BadValue {
                key: "max_delay",
                problem: "must be at least initial_delay and at most 30 days",
            });
        }
        if !(0.0..=1.0).contains(&policy.jitter) {
            return Err(PolicyError::BadValue { key: "jitter", problem: "must be between 0 and 1" });
        }
        Ok(policy)
    }

    /// Delay before the next attempt, after `attempts_made` (at least 1) attempts.
    pub fn backoff(&self, attempts_made: u32, rng: &mut impl Rng) -> Duration {
        let exponent = attempts_made.saturating_sub(1).min(64) as i32;
        let base = (self.initial_delay * self.multiplier.powi(exponent)).min(self.max_delay);
        let spread = if self.jitter > 0.0 { rng.gen_range(-self.jitter..=self.jitter) } else { 0.0 };
        Duration::from_secs_f64((base * (1.0 + spread)).clamp(0.0, self.max_delay))
    }
}

/// What happened when a request was sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The receiver answered with this status; `retry_after` is the parsed header.
    Status {
        status: u16,
        retry_after: Option<Duration>,
    },
    Timeout,
    /// Could not connect, or the connection dropped before an answer.
    Connection,
    /// The target address is not allowed (private range not on the allow-list).
    Blocked,
    /// The request could not be built (bad header value, say): retrying cannot help.
    Invalid,
    /// Test mode: signed and recorded, not sent.
    NotSent,
}

/// The verdict on one attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    Delivered,
    /// Worth another try; `after` overrides the backoff (`Retry-After`).
    Retry {
        after: Option<Duration>,
    },
    /// Permanent failure: no retry.
    Fail,
    /// 410 Gone: fail and disable the endpoint.
    Gone,
}

pub fn classify(outcome: &Outcome) -> Verdict {
    match outcome {
        Outcome::NotSent => Verdict::Delivered,
        Outcome::Status { status, retry_after } => match status {
            200..=299 => Verdict::Delivered,
            410 => Verdict::Gone,
            429 | 503 => Verdict::Retry { after: *retry_after },
            500..=599 => Verdict::Retry { after: None },
            // 1xx/3xx (redirects are not followed) and the other 4xx: the receiver
            // rejected the request itself, so sending it again cannot succeed.
            _ => Verdict::Fail,
        },
        Outcome::Timeout | Outcome::Connection => Verdict::Retry { after: None },
        Outcome::Blocked | Outcome::Invalid => Verdict::Fail,
    }
}

/// Short category stored with each attempt, for filtering and statistics.
pub fn category(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Status { status: 200..=299, .. } => "ok",
        Outcome::Status { status: 429, .. } => "rate_limited",
        Outcome::Status { status: 400..=499, .. } => "http_4xx",
        Outcome::Status { status: 500..=599, .. } => "http_5xx",
        Outcome::Status { .. } => "http_other",
        Outcome::Timeout => "timeout",
        Outcome::Connection => "connection",
        Outcome::Blocked => "blocked",
        Outcome::Invalid => "invalid_request",
        Outcome::NotSent => "test_mode",
    }
}

/// The delivery's next state after an attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Next {
    Delivered,
    Retry { at: SystemTime },
    Failed,
    Dead,
}

/// Decides what follows an attempt. `attempts_made` counts this one.
pub fn decide(policy: &RetryPolicy, verdict: Verdict, attempts_made: u32, now: SystemTime, rng: &mut impl Rng) -> Next {
    match verdict {
        Verdict::Delivered => Next::Delivered,
        Verdict::Fail | Verdict::Gone => Next::Failed,
        Verdict::Retry { .. } if attempts_made >= policy.max_attempts => Next::Dead,
        Verdict::Retry { after } => {
            let max = Duration::from_secs_f64(policy.max_delay);
            let delay = match after {
                Some(after) => after.min(max),
                None => policy.backoff(attempts_made, rng),
            };
            Next::Retry { at: now + delay }
        }
    }
}

/// What a job's failed attempt leads to, and what deciding it needs.
#[derive(Debug, Clone, PartialEq)]
pub struct JobAttempt {
    /// Attempts made in the current budget (since the last `retry_job`), this one included.
    pub attempts: u32,
    pub max_attempts: u32,
    /// `ihub.cancel_job` was called while it ran.
    pub cancel_requested: bool,
    /// The delay after attempt 1, 2, ...; the last step repeats.
    pub schedule: Vec<Duration>,
}

/// A job's next state after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum JobNext {
    Cancelled,
    Failed,
    Retry { after: Duration },
}

/// When a schedule is empty.
const JOB_DEFAULT_DELAY: Duration = Duration::from_secs(300);

/// Decides what follows a job's failed attempt: cancelled if that was
/// asked for, failed when the budget is spent, else a retry after the delay
/// `ihub.retry_later` asked for or the schedule's step, capped by `cap`.
pub fn job_next(attempt: &JobAttempt, retry_after: Option<Duration>, cap: Duration) -> JobNext {
    if attempt.cancel_requested {
        return JobNext::Cancelled;
    }
    if attempt.attempts >= attempt.max_attempts {
        return JobNext::Failed;
    }
    let step = attempt.attempts.clamp(1, attempt.schedule.len().max(1) as u32) as usize - 1;
    let scheduled = attempt.schedule.get(step).copied().unwrap_or(JOB_DEFAULT_DELAY);
    JobNext::Retry { after: retry_after.unwrap_or(scheduled).min(cap) }
}

/// Parses `Retry-After`: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod job_tests {
    use super::*;

    fn attempt(attempts: u32) -> JobAttempt {
        let minutes = |m: u64| Duration::from_secs(m * 60);
        JobAttempt {
            attempts,
            max_attempts: 5,
            cancel_requested: false,
            schedule: vec![minutes(5), minutes(15), minutes(60), minutes(180)],
        }
    }

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn a_failed_job_follows_its_schedule_and_the_last_step_repeats() {
        let after = |a: &JobAttempt| match job_next(a, None, DAY) {
            JobNext::Retry { after } => after.as_secs() / 60,
            other => panic!("{other:?}"),
        };
        assert_eq!(after(&attempt(1)), 5);
        assert_eq!(after(&attempt(2)), 15);
        assert_eq!(after(&attempt(4)), 180);
        let long = JobAttempt { max_attempts: 10, ..attempt(9) };
        assert_eq!(after(&long), 180, "the last step repeats");
        let empty = JobAttempt { schedule: vec![], ..attempt(1) };
        assert_eq!(after(&empty), 5, "an empty schedule waits five minutes");
    }

    #[test]
    fn retry_later_cancellation_budget_and_cap_decide_first() {
        assert_eq!(job_next(&attempt(5), None, DAY), JobNext::Failed, "five of five attempts made");
        let cancelled = JobAttempt { cancel_requested: true, ..attempt(1) };
        assert_eq!(job_next(&cancelled, Some(Duration::from_secs(1)), DAY), JobNext::Cancelled);
        assert_eq!(
            job_next(&attempt(1), Some(Duration::from_secs(30)), DAY),
            JobNext::Retry { after: Duration::from_secs(30) }
        );
        let two_days = JobAttempt { schedule: vec![DAY * 2], ..attempt(1) };
        assert_eq!(job_next(&two_days, None, DAY), JobNext::Retry { after: DAY }, "capped");
        assert_eq!(
            job_next(&attempt(1), Some(DAY * 3), DAY),
            JobNext::Retry { after: DAY },
            "retry_later is capped too"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use serde_json::json;

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    #[test]
    fn default_backoff_doubles_from_a_minute_and_caps_at_a_day() {
        let p = RetryPolicy { jitter: 0.0, ..RetryPolicy::default() };
        let secs: Vec<u64> = (1..=12).map(|n| p.backoff(n, &mut rng()).as_secs()).collect();
        assert_eq!(secs, vec![60, 120, 240, 480, 960, 1920, 3840, 7680, 15360, 30720, 61440, 86400]);
    }

    #[test]
    fn jitter_stays_within_its_fraction() {
        let p = RetryPolicy { jitter: 0.2, ..RetryPolicy::default() };
        let mut r = rng();
        let delays: Vec<f64> = (0..200).map(|_| p.backoff(2, &mut r).as_secs_f64()).collect();
        assert!(delays.iter().all(|d| (96.0..=144.0).contains(d)));
        assert!(delays.iter().any(|d| (*d - 120.0).abs() > 1.0), "jitter must vary the delay");
    }

    #[test]
    fn policy_parses_partial_objects_and_rejects_nonsense() {
        let p = RetryPolicy::from_json(&json!({"max_attempts": 3, "initial_delay": 0.5})).unwrap();
        assert_eq!((p.max_attempts, p.initial_delay, p.multiplier), (3, 0.5, 2.0));
        assert_eq!(RetryPolicy::from_json(&Value::Null).unwrap(), RetryPolicy::default());
        assert_eq!(RetryPolicy::from_json(&json!({"tries": 3})), Err(PolicyError::UnknownKey("tries".into())));
        assert!(RetryPolicy::from_json(&json!({"max_attempts": 0})).is_err());
        assert!(RetryPolicy::from_json(&json!({"max_attempts": 2.5})).is_err());
        assert!(RetryPolicy::from_json(&json!({"multiplier": "2"})).is_err());
        assert!(RetryPolicy::from_json(&json!({"jitter": 3})).is_err());
        assert!(RetryPolicy::from_json(&json!({"initial_delay": 10, "max_delay": 5})).is_err());
        assert_eq!(RetryPolicy::from_json(&json!([1])), Err(PolicyError::NotAnObject));
    }

    #[test]
    fn statuses_and_errors_classify_as_the_standard_says() {
        let status = |s| classify(&Outcome::Status { status: s, retry_after: None });
        assert_eq!(status(200), Verdict::Delivered);
        assert_eq!(status(204), Verdict::Delivered);
        assert_eq!(status(500), Verdict::Retry { after: None });
        assert_eq!(status(502), Verdict::Retry { after: None });
        assert_eq!(status(429), Verdict::Retry { after: None });
        assert_eq!(status(400), Verdict::Fail);
        assert_eq!(status(404), Verdict::Fail);
        assert_eq!(status(301), Verdict::Fail);
        assert_eq!(status(410), Verdict::Gone);
        assert_eq!(classify(&Outcome::Timeout), Verdict::Retry { after: None });
        assert_eq!(classify(&Outcome::Connection), Verdict::Retry { after: None });
        assert_eq!(classify(&Outcome::Blocked), Verdict::Fail);
        let after = Some(Duration::from_secs(7));
        assert_eq!(classify(&Outcome::Status { status: 503, retry_after: after }), Verdict::Retry { after });
        assert_eq!(classify(&Outcome::Status { status: 429, retry_after: after }), Verdict::Retry { after });
    }

    #[test]
    fn retries_until_the_budget_is_spent_then_dead() {
        let p = RetryPolicy { max_attempts: 3, jitter: 0.0, ..RetryPolicy::default() };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let retry = Verdict::Retry { after: None };
        assert_eq!(decide(&p, retry, 1, now, &mut rng()), Next::Retry { at: now + Duration::from_secs(60) });
        assert_eq!(decide(&p, retry, 2, now, &mut rng()), Next::Retry { at: now + Duration::from_secs(120) });
        assert_eq!(decide(&p, retry, 3, now, &mut rng()), Next::Dead);
        assert_eq!(decide(&p, Verdict::Fail, 1, now, &mut rng()), Next::Failed);
        assert_eq!(decide(&p, Verdict::Gone, 1, now, &mut rng()), Next::Failed);
        assert_eq!(decide(&p, Verdict::Delivered, 3, now, &mut rng()), Next::Delivered);
    }

    #[test]
    fn retry_after_overrides_backoff_but_not_the_cap() {
        let p = RetryPolicy { max_delay: 100.0, jitter: 0.0, ..RetryPolicy::default() };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let v = |s| Verdict::Retry { after: Some(Duration::from_secs(s)) };
        assert_eq!(decide(&p, v(5), 1, now, &mut rng()), Next::Retry { at: now + Duration::from_secs(5) });
        assert_eq!(decide(&p, v(5000), 1, now, &mut rng()), Next::Retry { at: now + Duration::from_secs(100) });
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 3 ", now), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:29:00 GMT", now), Some(Duration::from_secs(60)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
