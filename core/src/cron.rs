//! Five-field cron expressions (or nicknames such as `@daily`), in UTC.

use chrono::{DateTime, Utc};
use croner::parser::{CronParser, Seconds};
use croner::Cron;

/// Parses a five-field cron expression (or a nickname such as @daily).
pub fn parse_cron(expr: &str) -> Result<Cron, String> {
    CronParser::builder().seconds(Seconds::Disallowed).build().parse(expr.trim()).map_err(|e| e.to_string())
}

/// The first time strictly after `after` that matches `cron`.
pub fn next_after(cron: &Cron, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    cron.find_next_occurrence(&after, false).ok()
}

/// The last time at or before `before` that matches `cron`.
pub fn last_at_or_before(cron: &Cron, before: DateTime<Utc>) -> Option<DateTime<Utc>> {
    cron.find_previous_occurrence(&before, true).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn five_fields_and_nicknames_parse_six_fields_do_not() {
        let at = Utc.with_ymd_and_hms(2026, 11, 25, 12, 3, 0).unwrap();
        let next = |e: &str| next_after(&parse_cron(e).unwrap(), at).unwrap();
        assert_eq!(next("*/5 * * * *"), Utc.with_ymd_and_hms(2026, 11, 25, 12, 5, 0).unwrap());
        assert_eq!(next("0 3 * * *"), Utc.with_ymd_and_hms(2026, 11, 26, 3, 0, 0).unwrap());
        assert_eq!(next("@daily"), Utc.with_ymd_and_hms(2026, 11, 26, 0, 0, 0).unwrap());
        assert!(parse_cron("* * * * * *").is_err(), "seconds are not part of a five-field expression");
        assert!(parse_cron("61 * * * *").is_err());
        assert!(parse_cron("every minute").is_err());
    }

    #[test]
    fn the_previous_match_includes_the_instant_itself() {
        let at = Utc.with_ymd_and_hms(2026, 11, 25, 3, 0, 0).unwrap();
        let cron = parse_cron("0 3 * * *").unwrap();
        assert_eq!(last_at_or_before(&cron, at), Some(at));
        assert_eq!(next_after(&cron, at), Some(Utc.with_ymd_and_hms(2026, 11, 26, 3, 0, 0).unwrap()));
    }
}
