//! What the figures are measured against: the reference the run measured
//! first (plain single-row inserts, `bench/run` passes it in), and the CPU
//! the cluster's processes used, from /proc.

use std::path::Path;
use std::process::Command;

use pg_ihub_testkit::cluster::Cluster;

/// The reference of this run: plain single-row inserts per second, 4 clients.
pub fn plain_tps() -> Option<f64> {
    std::env::var("IHUB_BENCH_PLAIN_TPS").ok().and_then(|v| v.parse().ok()).filter(|v: &f64| *v > 0.0)
}

/// "  (0.42x plain)" when the reference is known.
pub fn ratio(per_second: f64) -> String {
    plain_tps().map_or(String::new(), |plain| format!("  ({:.2}x plain tps)", per_second / plain))
}

/// Bytes of WAL the cluster has written so far: with default durability
/// every commit waits for its WAL to reach the disk, so WAL per item is
/// what single-row writers share with the dispatchers.
pub fn wal_bytes(db: &mut postgres::Client) -> i64 {
    db.query_one("SELECT (pg_current_wal_insert_lsn() - '0/0')::bigint", &[]).unwrap().get(0)
}

/// CPU seconds (user + system) used so far by the postmaster and every
/// process it started: backends, pg_ihub's workers, the checkpointer, ...
/// Processes that ended since are not counted, so measure across steps
/// whose processes stay (the workers and the bench's own connections).
pub fn cluster_cpu_seconds(cluster: &Cluster) -> f64 {
    let postmaster: u32 = std::fs::read_to_string(cluster.pgdata.join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.trim().parse().ok()))
        .unwrap_or(0);
    let ticks = clock_ticks();
    let mut total = 0u64;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")) else {
            continue;
        };
        // Fields after the command name, which is in parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ppid: u32 = fields.get(1).and_then(|f| f.parse().ok()).unwrap_or(0);
        if pid != postmaster && ppid != postmaster {
            continue;
        }
        let utime: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0);
        let stime: u64 = fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
        total += utime + stime;
    }
    total as f64 / ticks
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}
