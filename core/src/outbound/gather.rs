//! When a dispatcher gathers commits before its next round instead of going
//! on at once: only while writers are busy, so that each round's fixed cost
//! is paid for many changes, and quiet traffic is never held back.

use std::time::Duration;

/// A round that took at least this many deliveries, at [`BUSY_RATE`] or
/// more since the round before began, is a busy one.
pub const BUSY_ROUND: usize = 8;
/// Deliveries per second; see [`BUSY_ROUND`].
pub const BUSY_RATE: f64 = 1000.0;

/// Busy rounds in a row. Two are needed: a count alone kept 500 commits/s
/// gathering once a stall had made a round of 8 (each 15 ms wait gathered
/// about 8 again; commit-to-receipt p99 18-82 ms instead of 3.5), and with
/// the rate but one round, the catch-up after each stall still waited (p99
/// 14-19 ms in 2 runs of 3; make bench).
#[derive(Debug, Default)]
pub struct Gather {
    busy_rounds: u32,
}

impl Gather {
    /// Records a round that took `count` deliveries, `since_last_round`
    /// after the round before began, and says whether writers are busy: the
    /// next round then waits (if more was committed meanwhile).
    pub fn busy_after(&mut self, count: usize, since_last_round: Duration) -> bool {
        let busy = count >= BUSY_ROUND && count as f64 >= BUSY_RATE * since_last_round.as_secs_f64();
        self.busy_rounds = if busy { self.busy_rounds.saturating_add(1) } else { 0 };
        self.busy_rounds >= 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn busy_writers_are_two_large_fast_rounds_in_a_row() {
        let mut g = Gather::default();
        assert!(!g.busy_after(16, 4 * MS), "one busy round is not enough");
        assert!(g.busy_after(16, 4 * MS));
        assert!(g.busy_after(70, 15 * MS), "gathering keeps gathering while the rate holds");
    }

    #[test]
    fn small_or_slow_rounds_are_not_busy_and_start_the_count_again() {
        let mut g = Gather::default();
        // 500 commits/s after a 16 ms stall: 8 changes, but at 500 a second.
        assert!(!g.busy_after(8, 16 * MS));
        assert!(!g.busy_after(8, 16 * MS));
        // Few changes, however fast.
        g.busy_after(16, 4 * MS);
        assert!(!g.busy_after(2, MS));
        assert!(!g.busy_after(16, 4 * MS), "the count started again");
        assert!(g.busy_after(16, 4 * MS));
        // A round that took nothing.
        assert!(!g.busy_after(0, MS));
    }
}
