//! An endpoint's circuit breaker policy, as `create_endpoint(…, circuit =>)`
//! and `alter_endpoint` take it. The breaker itself runs in SQL (the claim
//! skips endpoints whose circuit is open, the settle counts outcomes), so
//! that it holds across every dispatcher; this is the policy's parsing.

use serde::Serialize;
use serde_json::Value;

pub const CIRCUIT_KEYS: &[&str] = &["failures", "failure_rate", "window", "min_requests", "cooldown"];

pub const CIRCUIT_HINT: &str =
    "Pass true for the defaults, false to turn the breaker off, or a JSON object with any of \
     failures, failure_rate, window, min_requests, cooldown, e.g. {\"failures\": 5, \"cooldown\": 30} (seconds).";

/// When the circuit opens, and for how long.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CircuitPolicy {
    /// Consecutive failed attempts (5xx, timeouts, refused or dropped
    /// connections) that open the circuit.
    pub failures: u32,
    /// Share of failed attempts within `window` that opens it (with at least
    /// `min_requests` attempts), or none.
    pub failure_rate: Option<f64>,
    /// Seconds.
    pub window: f64,
    pub min_requests: u32,
    /// Seconds the circuit stays open before a probe is sent.
    pub cooldown: f64,
}

impl Default for CircuitPolicy {
    fn default() -> Self {
        CircuitPolicy { failures: 5, failure_rate: None, window: 60.0, min_requests: 20, cooldown: 30.0 }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CircuitError {
    #[error("circuit must be true, false or a JSON object")]
    NotAnObject,
    #[error("unknown circuit key \"{0}\"")]
    UnknownKey(String),
    #[error("circuit key \"{key}\" {problem}")]
    BadValue { key: &'static str, problem: &'static str },
}

impl CircuitPolicy {
    /// Parses a user-supplied policy: `true` or an object (missing keys take
    /// the defaults) turns the breaker on, `false` or null leaves it off.
    pub fn from_json(value: &Value) -> Result<Option<CircuitPolicy>, CircuitError> {
        let map = match value {
            Value::Null | Value::Bool(false) => return Ok(None),
            Value::Bool(true) => return Ok(Some(CircuitPolicy::default())),
            Value::Object(map) => map,
            _ => return Err(CircuitError::NotAnObject),
        };
        if let Some(key) = map.keys().find(|k| !CIRCUIT_KEYS.contains(&k.as_str())) {
            return Err(CircuitError::UnknownKey(key.clone()));
        }
        let num = |key: &'static str| -> Result<Option<f64>, CircuitError> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Number(n)) => Ok(n.as_f64()),
                Some(_) => Err(CircuitError::BadValue { key, problem: "must be a number" }),
            }
        };
        let whole = |key: &'static str, default: u32| -> Result<u32, CircuitError> {
            match num(key)? {
                None => Ok(default),
                Some(n) if (1.0..=1_000_000.0).contains(&n) && n.fract() == 0.0 => Ok(n as u32),
                Some(_) => Err(CircuitError::BadValue { key, problem: "must be a whole number from 1 to 1000000" }),
            }
        };
        let seconds = |key: &'static str, default: f64| -> Result<f64, CircuitError> {
            match num(key)? {
                None => Ok(default),
                Some(n) if n > 0.0 && n <= 86_400.0 => Ok(n),
                Some(_) => {
                    Err(CircuitError::BadValue { key, problem: "must be more than 0 and at most 86400 seconds" })
                }
            }
        };
        let d = CircuitPolicy::default();
        let failure_rate = match num("failure_rate")? {
            None => None,
            Some(r) if r > 0.0 && r <= 1.0 => Some(r),
            Some(_) => {
                return Err(CircuitError::BadValue {
                    key: "failure_rate",
                    problem: "must be more than 0 and at most 1",
                })
            }
        };
        Ok(Some(CircuitPolicy {
            failures: whole("failures", d.failures)?,
            failure_rate,
            window: seconds("window", d.window)?,
            min_requests: whole("min_requests", d.min_requests)?,
            cooldown: seconds("cooldown", d.cooldown)?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn true_means_the_defaults_and_false_or_null_means_off() {
        assert_eq!(CircuitPolicy::from_json(&json!(true)), Ok(Some(CircuitPolicy::default())));
        assert_eq!(CircuitPolicy::from_json(&json!(false)), Ok(None));
        assert_eq!(CircuitPolicy::from_json(&Value::Null), Ok(None));
    }

    #[test]
    fn missing_keys_take_the_defaults() {
        let p = CircuitPolicy::from_json(&json!({"failures": 3, "failure_rate": 0.5})).unwrap().unwrap();
        assert_eq!(p, CircuitPolicy { failures: 3, failure_rate: Some(0.5), ..CircuitPolicy::default() });
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!({"failures": 3, "failure_rate": 0.5, "window": 60.0, "min_requests": 20, "cooldown": 30.0})
        );
    }

    #[test]
    fn bad_policies_say_which_key_and_why() {
        assert_eq!(CircuitPolicy::from_json(&json!([1])), Err(CircuitError::NotAnObject));
        assert_eq!(CircuitPolicy::from_json(&json!({"failure": 3})), Err(CircuitError::UnknownKey("failure".into())));
        for (policy, key) in [
            (json!({"failures": 0}), "failures"),
            (json!({"failures": 2.5}), "failures"),
            (json!({"failures": "5"}), "failures"),
            (json!({"failure_rate": 0}), "failure_rate"),
            (json!({"failure_rate": 1.5}), "failure_rate"),
            (json!({"cooldown": 0}), "cooldown"),
            (json!({"window": 100000}), "window"),
            (json!({"min_requests": -1}), "min_requests"),
        ] {
            assert!(
                matches!(CircuitPolicy::from_json(&policy), Err(CircuitError::BadValue { key: k, .. }) if k == key),
                "{policy}"
            );
        }
    }
}
