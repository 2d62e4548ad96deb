//! `make bench`: measures, against the bench cluster (pg_ihub preloaded,
//! default durability settings) and an in-process receiver on loopback:
//!
//! 1. throughput: 20,000 committed row changes delivered, per second;
//! 2. latency from commit to receipt at a steady 500 changes/s (p50, p99);
//! 3. writer overhead: a 200,000-row INSERT ... SELECT into a subscribed
//!    table against the same insert into an unsubscribed one;
//! 4. single-row writes to a subscribed table from 4 pgbench clients while
//!    the rows are delivered, against the run's reference (plain tps);
//! 5. a retry storm: 20,000 requests to a receiver that refuses
//!    connections, retried in waves; dispatcher rounds (calls of
//!    ihub._claim, from pg_stat_user_functions), CPU and log entries per wave;
//! 6. the claim with 100 endpoints, none and then half of them with open
//!    circuits;
//!
//! then jobs, logs and statistics, and inbound webhooks (`inbound.rs`).

mod inbound;
mod machine;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use pg_ihub_testkit::cluster::Cluster;
use pg_ihub_testkit::receiver::Receiver;

fn main() {
    let cluster = Cluster::from_env();
    let mut db = cluster.connect_wait(Duration::from_secs(30));
    let receiver = Receiver::start_on(0, 2, true);
    let mut workers: i64 = 0;
    for _ in 0..100 {
        workers = db.query_one("SELECT count(*) FROM ihub.workers WHERE kind = 'dispatcher'", &[]).unwrap().get(0);
        if workers > 0 {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    // IHUB_BENCH_PARTS=outbound,jobs,logs,inbound runs some parts only
    // (single: the single-row writes of outbound alone).
    let parts = std::env::var("IHUB_BENCH_PARTS").unwrap_or_else(|_| "outbound,storm,jobs,logs,inbound".into());
    let part = |name: &str| parts.split(',').any(|p| p.trim() == name);

    if part("outbound") {
        let batch: String = db.query_one("SHOW ihub.batch_size", &[]).unwrap().get(0);
        println!(
            "pg_ihub benchmark: {workers} dispatcher workers, batch size {batch}, receiver on {}",
            receiver.url("/")
        );
        setup(&mut db, &receiver);
        // First, while the dispatchers are idle: it measures the writer alone.
        writer_overhead(&mut db, 200_000);
        let rows = std::env::var("IHUB_BENCH_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
        let unordered = throughput(&cluster, &mut db, &receiver, rows);
        ordered_throughput(&cluster, &mut db, &receiver, rows, 1000, unordered);
        latency(&cluster, &receiver, 500, Duration::from_secs(10));
        single_row_writes(&cluster, &mut db, &receiver, Duration::from_secs(10));
        println!();
    } else if part("single") {
        // The single-row part alone, for profiling it.
        setup(&mut db, &receiver);
        single_row_writes(&cluster, &mut db, &receiver, Duration::from_secs(10));
        println!();
    }

    if part("storm") {
        between_parts(&mut db);
        retry_storm(&cluster, &mut db, 20_000, 3);
        circuit_claim_time(&mut db);
        println!();
    }

    if part("jobs") {
        between_parts(&mut db);
        jobs_throughput(&mut db, 50_000);
        jobs_latency(&cluster, &mut db, 200, Duration::from_secs(5));
        for backlog in [10_000, 1_000_000] {
            claim_time(&mut db, backlog);
        }
        println!();
    }

    if part("logs") {
        between_parts(&mut db);
        if !part("outbound") {
            setup(&mut db, &receiver);
        }
        log_writes(&cluster, 4, Duration::from_secs(5));
        cleanup_time(&mut db, 1_000_000);
        stats_time(&mut db, 1_000_000);
        println!();
    }

    if !part("inbound") {
        return;
    }
    between_parts(&mut db);
    inbound::setup(&mut db);
    let listen = std::env::var("IHUB_LISTEN").unwrap_or_else(|_| "127.0.0.1:8491".into());
    inbound::accept_rate(&listen, 64, Duration::from_secs(10), true);
    inbound::process_rate(&mut db);
    inbound::accept_rate(&listen, 64, Duration::from_secs(5), false);
}

/// Each part starts clean, as pgbench vacuums before a run: what the last
/// part left to vacuum (a million rolled-back capture rows, 100,000 settled
/// deliveries, a million deleted log entries) was vacuumed while the next
/// was measured, on the same two cores (a retry-storm wave: 1.80 s of CPU
/// alone, 2.81-2.91 s after the outbound part). Only the tables with dead
/// rows: the next part's own tables stay as that part would find them.
fn between_parts(db: &mut postgres::Client) {
    let started = Instant::now();
    let tables: Vec<String> = db
        .query("SELECT format('%I.%I', schemaname, relname) FROM pg_stat_user_tables WHERE n_dead_tup > 0", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for table in &tables {
        db.batch_execute(&format!("VACUUM (ANALYZE) {table}")).unwrap();
    }
    db.batch_execute("CHECKPOINT").unwrap();
    println!(
        "(between parts: VACUUM (ANALYZE) of {} tables with dead rows, and CHECKPOINT, {:.1} s)",
        tables.len(),
        started.elapsed().as_secs_f64()
    );
}

/// `ihub.log` calls, each its own transaction, from several clients.
fn log_writes(cluster: &Cluster, clients: usize, length: Duration) {
    let handles: Vec<_> = (0..clients)
        .map(|n| {
            let cluster = cluster.clone();
            thread::spawn(move || {
                let mut c = cluster.connect();
                let stmt = c
                    .prepare(
                        "SELECT ihub.log('info', 'order ' || $1 || ' synced', jsonb_build_object('client', $2::int))",
                    )
                    .unwrap();
                let start = Instant::now();
                let mut count = 0u64;
                while start.elapsed() < length {
                    c.execute(&stmt, &[&(count as i64).to_string(), &(n as i32)]).unwrap();
                    count += 1;
                }
                count
            })
        })
        .collect();
    let total: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    println!(
        "logs: {total} ihub.log calls from {clients} clients (one transaction each) in {:.0} s -> {:.0} writes/s{}",
        length.as_secs_f64(),
        total as f64 / length.as_secs_f64(),
        machine::ratio(total as f64 / length.as_secs_f64())
    );
}

/// `ihub.cleanup()` with `rows` expired info entries: first in a daily
/// partition of their own (dropped whole), then in the default partition
/// (deleted in batches).
fn cleanup_time(db: &mut postgres::Client, rows: i32) {
    db.batch_execute(
        "SELECT ihub.set_retention('info', '14 days');
         CREATE TABLE IF NOT EXISTS ihub.log_entry_info_20200101 PARTITION OF ihub.log_entry_info
             FOR VALUES FROM ('2020-01-01 00:00+00') TO ('2020-01-02 00:00+00');",
    )
    .unwrap();
    for (label, at) in
        [("in their own daily partition", "2020-01-01 12:00+00"), ("in the default partition", "2020-02-01 12:00+00")]
    {
        db.execute(
            "INSERT INTO ihub.log_entry (level, message, details, logged_at)
             SELECT 'info', 'order ' || g || ' synced', jsonb_build_object('n', g), $2::text::timestamptz FROM generate_series(1, $1) g",
            &[&rows, &at],
        )
        .unwrap();
        db.batch_execute("CHECKPOINT").unwrap();
        let start = Instant::now();
        let removed: i64 = db.query_one("SELECT sum(removed)::bigint FROM ihub.cleanup()", &[]).unwrap().get(0);
        println!("cleanup: {removed} expired log entries {label} removed in {:.2} s", start.elapsed().as_secs_f64());
    }
}

/// `ihub.endpoint_stats` over a month holding `attempts` attempts.
fn stats_time(db: &mut postgres::Client, attempts: i32) {
    db.execute(
        "INSERT INTO ihub.delivery_attempt (delivery_id, attempt, started_at, duration_ms, request_headers, response_status, error_category)
         SELECT -g, 1, now() - (g % 720) * interval '1 hour', (g % 200)::float8, '{}', 200, 'ok' FROM generate_series(1, $1) g",
        &[&attempts],
    )
    .unwrap();
    // The counters the dispatchers would have rolled up for those attempts.
    db.execute(
        "INSERT INTO ihub.endpoint_hourly (endpoint_id, hour, worker, attempts, delivered, latency)
         SELECT (SELECT id FROM ihub.endpoint WHERE name = 'bench-hook'), date_trunc('hour', now()) - h * interval '1 hour', 0,
                count(*), count(*), ihub._histogram(array_agg(a.duration_ms))
         FROM ihub.delivery_attempt a, LATERAL (SELECT (extract(epoch FROM date_trunc('hour', now()) - date_trunc('hour', a.started_at)) / 3600)::int AS h) x
         WHERE a.delivery_id < 0
         GROUP BY h
         ON CONFLICT (endpoint_id, hour, worker) DO UPDATE
             SET attempts = ihub.endpoint_hourly.attempts + EXCLUDED.attempts,
                 delivered = ihub.endpoint_hourly.delivered + EXCLUDED.delivered,
                 latency = ihub._histogram_add(ihub.endpoint_hourly.latency, EXCLUDED.latency)",
        &[],
    )
    .unwrap();
    let mut times = Vec::new();
    for _ in 0..20 {
        let start = Instant::now();
        db.query("SELECT * FROM ihub.endpoint_stats(now() - interval '31 days')", &[]).unwrap();
        times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "endpoint_stats over {attempts} attempts (30 days): median {:.2} ms (rolled-up hourly counters)",
        times[times.len() / 2]
    );
}

fn jobs_setup(db: &mut postgres::Client) {
    db.batch_execute(
        "CREATE OR REPLACE FUNCTION bench_noop(args jsonb) RETURNS void LANGUAGE sql AS $$ SELECT $$;
         DELETE FROM ihub.job;",
    )
    .unwrap();
}

fn wait_jobs_done(db: &mut postgres::Client, timeout: Duration) {
    wait_until_none(
        db,
        "ihub.job WHERE state IN ('pending', 'retry')",
        "ihub.job WHERE state = 'running'",
        "jobs",
        timeout,
        Duration::from_millis(10),
    );
}

/// 50,000 trivial jobs queued in one transaction; time from its commit
/// until the last one is done.
fn jobs_throughput(db: &mut postgres::Client, n: i32) {
    jobs_setup(db);
    let workers: i64 = db.query_one("SELECT count(*) FROM ihub.workers WHERE kind = 'job worker'", &[]).unwrap().get(0);
    db.execute("SELECT ihub.enqueue('bench_noop(jsonb)') FROM generate_series(1, $1)", &[&n]).unwrap();
    let start = Instant::now();
    wait_jobs_done(db, Duration::from_secs(600));
    let took = start.elapsed().as_secs_f64();
    println!(
        "jobs: {n} trivial jobs on {workers} job workers in {took:.2} s -> {:.0} jobs/s{}",
        n as f64 / took,
        machine::ratio(n as f64 / took)
    );
}

/// Single jobs queued at a steady rate; latency from the enqueue's commit
/// (seen by the client) to the job's start (recorded by the worker).
fn jobs_latency(cluster: &Cluster, db: &mut postgres::Client, rate: u32, length: Duration) {
    jobs_setup(db);
    let mut c = cluster.connect();
    let stmt = c.prepare("SELECT ihub.enqueue('bench_noop(jsonb)')").unwrap();
    let mut committed: Vec<(i64, f64)> = Vec::new();
    let start = Instant::now();
    let total = (rate as f64 * length.as_secs_f64()) as u32;
    for i in 0..total {
        let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        let id: i64 = c.query_one(&stmt, &[]).unwrap().get(0);
        let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        committed.push((id, at));
    }
    wait_jobs_done(db, Duration::from_secs(60));
    let started: HashMap<i64, f64> = db
        .query("SELECT id, extract(epoch FROM started_at)::float8 FROM ihub.job", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut latencies: Vec<f64> =
        committed.iter().filter_map(|(id, at)| started.get(id).map(|s| ((s - at) * 1000.0).max(0.0))).collect();
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "job latency at {rate} jobs/s ({} jobs): enqueue commit -> start p50 {:.1} ms, p99 {:.1} ms",
        latencies.len(),
        pct(0.5),
        pct(0.99)
    );
}

/// How long a dispatcher's claim of 500 takes with 10,000 due deliveries to
/// 100 endpoints, with no circuit open and then with 50 open (whose
/// deliveries it must pass over). All in one transaction that is rolled
/// back, each claim undone by a savepoint: the dispatchers never see them.
fn circuit_claim_time(db: &mut postgres::Client) {
    let mut tx = db.transaction().unwrap();
    tx.batch_execute(
        "SELECT ihub.create_integration('bench_circuits');
         SELECT ihub.create_endpoint('bench_circuits', 'bench_cb_' || g, 'http://127.0.0.1:9/') FROM generate_series(1, 100) g;
         SELECT ihub.enable_integration('bench_circuits');
         INSERT INTO ihub.delivery (event_id, endpoint_id, event_type, payload, run_at)
         SELECT 'evt_' || g, e.id, 'bench', '{}', now() - interval '1 hour' + g * interval '1 ms'
         FROM generate_series(1, 10000) g
         JOIN ihub.endpoint e ON e.name = 'bench_cb_' || (g % 100 + 1);
         ANALYZE ihub.delivery;",
    )
    .unwrap();
    let time = |tx: &mut postgres::Transaction, open: usize| {
        let mut times = Vec::new();
        let mut claimed: i64 = 0;
        for _ in 0..50 {
            tx.batch_execute("SAVEPOINT claim").unwrap();
            let start = Instant::now();
            claimed = tx.query_one("SELECT count(*) FROM ihub._claim(0, 500, 10000, 1)", &[]).unwrap().get(0);
            times.push(start.elapsed().as_secs_f64() * 1000.0);
            tx.batch_execute("ROLLBACK TO SAVEPOINT claim").unwrap();
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "claim of 500 from 10000 due over 100 endpoints, {open:>2} circuits open: median {:.2} ms, p99 {:.2} ms ({claimed} claimed)",
            times[times.len() / 2],
            times[(times.len() as f64 * 0.99) as usize]
        );
    };
    time(&mut tx, 0);
    tx.batch_execute(
        "INSERT INTO ihub.endpoint_state (endpoint_id, state, failures, opened_at, retry_at)
         SELECT id, 'open', 5, now(), now() + interval '1 hour' FROM ihub.endpoint
         WHERE name LIKE 'bench\\_cb\\_%' AND substr(name, 10)::int % 2 = 0",
    )
    .unwrap();
    time(&mut tx, 50);
    tx.rollback().unwrap();
}

/// How long claiming the next job takes with a backlog of `backlog` due
/// jobs: the claim query, run and rolled back 200 times.
fn claim_time(db: &mut postgres::Client, backlog: i32) {
    jobs_setup(db);
    db.execute(
        "INSERT INTO ihub.job (fn, args, run_as, run_at, priority)
         SELECT 'bench_noop(jsonb)', '{}', 'postgres', now() - interval '1 second', g % 10
         FROM generate_series(1, $1) g",
        &[&backlog],
    )
    .unwrap();
    db.batch_execute("ANALYZE ihub.job").unwrap();
    let mut times = Vec::new();
    for _ in 0..200 {
        let mut tx = db.transaction().unwrap();
        let start = Instant::now();
        tx.query("SELECT * FROM ihub._claim_job(0, 1000)", &[]).unwrap();
        times.push(start.elapsed().as_secs_f64() * 1000.0);
        tx.rollback().unwrap();
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "claim with {backlog:>9} jobs pending: median {:.2} ms, p99 {:.2} ms",
        times[times.len() / 2],
        times[(times.len() as f64 * 0.99) as usize]
    );
    db.batch_execute("DELETE FROM ihub.job").unwrap();
}

fn setup(db: &mut postgres::Client, receiver: &Receiver) {
    db.batch_execute(&format!(
        "SELECT ihub.disable_integration(name) FROM ihub.integrations WHERE name = 'bench';
         SELECT ihub.delete_integration(name) FROM ihub.integrations WHERE name = 'bench';
         DROP TABLE IF EXISTS bench_orders, bench_plain;
         CREATE TABLE bench_orders (id bigserial PRIMARY KEY, customer text NOT NULL, amount numeric(12,2) NOT NULL,
                                    status text NOT NULL DEFAULT 'new', created_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE bench_plain (LIKE bench_orders INCLUDING ALL);
         SELECT ihub.create_integration('bench');
         SELECT ihub.create_endpoint('bench', 'bench-hook', '{}');
         SELECT ihub.subscribe('bench_orders', 'bench-hook', events => '{{insert}}');
         SELECT ihub.enable_integration('bench');",
        receiver.url("/bench")
    ))
    .expect("bench setup");
}

fn wait_arrivals(receiver: &Receiver, n: usize, timeout: Duration) {
    assert!(receiver.wait_for(n, timeout), "only {} of {n} deliveries arrived", receiver.count());
}

/// Returns the deliveries per second (all received).
fn throughput(cluster: &Cluster, db: &mut postgres::Client, receiver: &Receiver, n: usize) -> f64 {
    let before = receiver.count();
    let wal_before = machine::wal_bytes(db);
    let cpu_before = machine::cluster_cpu_seconds(cluster);
    // Committed in transactions of 1,000 rows, as a busy application would.
    let start = Instant::now();
    for chunk in 0..n / 1000 {
        db.execute(
            "INSERT INTO bench_orders (customer, amount) SELECT 'c' || g, g FROM generate_series($1::int, $1::int + 999) g",
            &[&((chunk * 1000) as i32)],
        )
        .unwrap();
    }
    let committed = start.elapsed();
    wait_arrivals(receiver, before + n, Duration::from_secs(300));
    let arrived = start.elapsed();
    wait_delivered(db, Duration::from_secs(300), Duration::from_millis(10));
    let settled = start.elapsed();
    let cpu = machine::cluster_cpu_seconds(cluster) - cpu_before;
    let wal = machine::wal_bytes(db) - wal_before;
    println!();
    println!("throughput: {n} row changes committed in {:.2} s", committed.as_secs_f64());
    println!(
        "  all received after   {:.2} s  -> {:>8.0} deliveries/s{}",
        arrived.as_secs_f64(),
        n as f64 / arrived.as_secs_f64(),
        machine::ratio(n as f64 / arrived.as_secs_f64())
    );
    println!(
        "  all recorded after   {:.2} s  -> {:>8.0} deliveries/s (state done, attempt on record){}",
        settled.as_secs_f64(),
        n as f64 / settled.as_secs_f64(),
        machine::ratio(n as f64 / settled.as_secs_f64())
    );
    println!(
        "  CPU of all server processes: {:.2} s -> {:.0} us per delivery (writes, capture, route, send, settle)",
        cpu,
        cpu * 1e6 / n as f64
    );
    println!("  WAL {:.0} bytes per delivery (the same)", wal as f64 / n as f64);
    n as f64 / arrived.as_secs_f64()
}

/// The same changes to an endpoint ordered by key (`ordering_key => '{k}'`),
/// `keys` keys, each transaction of 1,000 rows touching every key once: at
/// most one delivery of a key in flight, so a key's 20 deliveries go one
/// after another while the keys go in parallel.
fn ordered_throughput(
    cluster: &Cluster,
    db: &mut postgres::Client,
    receiver: &Receiver,
    n: usize,
    keys: i32,
    unordered: f64,
) {
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS bench_keyed;
         CREATE TABLE bench_keyed (id bigserial PRIMARY KEY, k int NOT NULL, customer text NOT NULL,
                                   amount numeric(12,2) NOT NULL, status text NOT NULL DEFAULT 'new',
                                   created_at timestamptz NOT NULL DEFAULT now());
         SELECT ihub.create_endpoint('bench', 'bench-ordered', '{}', ordering => 'key');
         SELECT ihub.subscribe('bench_keyed', 'bench-ordered', events => '{{insert}}', ordering_key => '{{k}}');",
        receiver.url("/bench")
    ))
    .expect("ordered setup");
    let before = receiver.count();
    let cpu_before = machine::cluster_cpu_seconds(cluster);
    let start = Instant::now();
    for chunk in 0..n / 1000 {
        db.execute(
            "INSERT INTO bench_keyed (k, customer, amount)
             SELECT g % $2, 'c' || g, g FROM generate_series($1::int, $1::int + 999) g",
            &[&((chunk * 1000) as i32), &keys],
        )
        .unwrap();
    }
    wait_arrivals(receiver, before + n, Duration::from_secs(300));
    let arrived = start.elapsed();
    wait_delivered(db, Duration::from_secs(300), Duration::from_millis(10));
    let cpu = machine::cluster_cpu_seconds(cluster) - cpu_before;
    let rate = n as f64 / arrived.as_secs_f64();
    println!(
        "ordered by key ({keys} keys): all received after {:.2} s -> {:>8.0} deliveries/s{}, {:.2} of unordered \
         (target >= 0.7); {:.0} us CPU per delivery",
        arrived.as_secs_f64(),
        rate,
        machine::ratio(rate),
        rate / unordered,
        cpu * 1e6 / n as f64
    );
}

/// `n` requests to an endpoint whose receiver refuses connections, each
/// tried `attempts` times: the retries come due in waves spread by the
/// policy's jitter (20 % of a 10 s delay, then of 20 s).
fn retry_storm(cluster: &Cluster, db: &mut postgres::Client, n: i32, attempts: i32) {
    db.batch_execute(&format!(
        "SELECT ihub.create_integration('bench') WHERE NOT EXISTS (SELECT 1 FROM ihub.integrations WHERE name = 'bench');
         SELECT ihub.enable_integration('bench');
         SELECT ihub.create_endpoint('bench', 'bench-refuse', 'http://127.0.0.1:9/refused',
             retry => '{{\"initial_delay\": 10, \"multiplier\": 2, \"jitter\": 0.2, \"max_attempts\": {attempts}}}');
         SELECT pg_stat_reset();"
    ))
    .expect("storm setup");
    let logged = |db: &mut postgres::Client| -> i64 {
        db.query_one("SELECT count(*) FROM ihub.logs WHERE details ->> 'endpoint' = 'bench-refuse'", &[])
            .unwrap()
            .get(0)
    };
    let (claims_before, logged_before) = (claims(db), logged(db));
    let cpu_before = machine::cluster_cpu_seconds(cluster);
    let start = Instant::now();
    db.execute(
        "SELECT ihub.http_request('bench-refuse', jsonb_build_object('n', g)) FROM generate_series(1, $1) g",
        &[&n],
    )
    .unwrap();
    // Nothing else is open meanwhile: the storm ends when no delivery is.
    // Every 100 ms: polling every 10 ms through the running index's dead
    // entries cost half a second of the CPU measured per wave (perf), as
    // did counting the storm's deliveries through the view every 200 ms.
    wait_delivered(db, Duration::from_secs(300), Duration::from_millis(100));
    let took = start.elapsed();
    // Function statistics reach the collector when a backend goes idle.
    thread::sleep(Duration::from_millis(1500));
    let cpu = machine::cluster_cpu_seconds(cluster) - cpu_before;
    let rounds = claims(db) - claims_before;
    let logs = logged(db) - logged_before;
    println!(
        "retry storm: {n} requests to a refusing receiver, {attempts} attempts each, all dead after {:.1} s",
        took.as_secs_f64()
    );
    println!(
        "  per attempt wave: {:.0} dispatcher rounds, {:.2} s CPU of all server processes, {:.0} log entries",
        rounds as f64 / attempts as f64,
        cpu / attempts as f64,
        logs as f64 / attempts as f64
    );
}

/// Dispatcher rounds so far: calls of ihub._claim (track_functions = 'pl'),
/// as the statistics collector has them.
fn claims(db: &mut postgres::Client) -> i64 {
    db.query_one(
        "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_user_functions WHERE schemaname = 'ihub' AND funcname = '_claim'",
        &[],
    )
    .unwrap()
    .get(0)
}

/// Single-row inserts into the subscribed table from 4 pgbench clients, as
/// the reference does into a plain one, while the dispatchers deliver them;
/// then how long the queue takes to drain.
fn single_row_writes(cluster: &Cluster, db: &mut postgres::Client, receiver: &Receiver, length: Duration) {
    let before_rows: i64 = db.query_one("SELECT count(*) FROM bench_orders", &[]).unwrap().get(0);
    let before = receiver.count();
    let script = std::env::temp_dir().join("pg_ihub_bench_subscribed.sql");
    std::fs::write(&script, "INSERT INTO bench_orders (customer, amount) VALUES ('c', 1);\n").unwrap();
    let claims_before = claims(db);
    let wal_before = machine::wal_bytes(db);
    let cpu_before = machine::cluster_cpu_seconds(cluster);
    let out = std::process::Command::new(cluster.bindir.join("pgbench"))
        .args(["-n", "-c", "4", "-j", "2", "-T", &length.as_secs().to_string()])
        .args(["-h", &cluster.host, "-p", &cluster.port.to_string(), "-U", "postgres", "-f"])
        .arg(&script)
        .arg(&cluster.dbname)
        .output()
        .expect("pgbench runs");
    let ended = Instant::now();
    let tps: f64 = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("tps = ").and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse().ok()))
        .unwrap_or_else(|| panic!("pgbench: {}", String::from_utf8_lossy(&out.stderr)));
    let after_rows: i64 = db.query_one("SELECT count(*) FROM bench_orders", &[]).unwrap().get(0);
    let n = (after_rows - before_rows) as usize;
    wait_arrivals(receiver, before + n, Duration::from_secs(300));
    let drained = ended.elapsed();
    let cpu = machine::cluster_cpu_seconds(cluster) - cpu_before;
    let wal = machine::wal_bytes(db) - wal_before;
    // Function statistics reach the collector when a backend goes idle.
    thread::sleep(Duration::from_millis(1500));
    let rounds = claims(db) - claims_before;
    println!();
    println!(
        "single-row writes to the subscribed table, 4 clients (pgbench, {} s), delivered meanwhile:",
        length.as_secs()
    );
    println!(
        "  {tps:.0} tps{}; plain tps / subscribed tps = {}",
        machine::ratio(tps),
        machine::plain_tps().map_or("?".into(), |p| format!("{:.2}x", p / tps))
    );
    println!("  the last of {n} deliveries arrived {:.2} s after the writes ended", drained.as_secs_f64());
    println!(
        "  {rounds} dispatcher rounds, {:.1} deliveries per round; WAL {:.0} bytes per row written and delivered",
        n as f64 / rounds.max(1) as f64,
        wal as f64 / n.max(1) as f64
    );
    println!(
        "  CPU of all server processes: {:.2} s -> {:.0} us per row written and delivered",
        cpu,
        cpu * 1e6 / n.max(1) as f64
    );
}

/// Waits until no delivery is queued or running (called once all have
/// arrived, so all are routed): each is recorded, attempt included.
fn wait_delivered(db: &mut postgres::Client, timeout: Duration, every: Duration) {
    let (due, running) = ("ihub.delivery WHERE state IN ('pending', 'retry')", "ihub.delivery WHERE state = 'running'");
    wait_until_none(db, due, running, "deliveries", timeout, every);
}

/// Waits until neither `FROM due` nor `FROM running` has a row. EXISTS on
/// the queues' partial indexes every 10 ms: a count over the whole table
/// every few milliseconds took up to 29 % of the machine's CPU from the
/// workers it measures (perf), and was part of the CPU measured per item.
/// Prepared once: planned anew at every poll, it cost the retry storm's
/// 3,700 polls 0.6 s of the CPU measured (perf).
pub fn wait_until_none(
    db: &mut postgres::Client,
    due: &str,
    running: &str,
    what: &str,
    timeout: Duration,
    every: Duration,
) {
    let deadline = Instant::now() + timeout;
    let query =
        db.prepare(&format!("SELECT EXISTS (SELECT 1 FROM {due}) OR EXISTS (SELECT 1 FROM {running})")).unwrap();
    while db.query_one(&query, &[]).unwrap().get::<_, bool>(0) {
        assert!(Instant::now() < deadline, "{what} still open");
        thread::sleep(every);
    }
}

/// Single-row transactions from 4 clients at `rate` in all; latency is from
/// the client seeing COMMIT succeed to the receiver seeing the request.
fn latency(cluster: &Cluster, receiver: &Receiver, rate: u32, length: Duration) {
    let before = receiver.count();
    let clients = 4;
    let committed: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
    let per_client = Duration::from_secs_f64(clients as f64 / rate as f64);
    let total = (rate as f64 * length.as_secs_f64()) as usize;
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let cluster = cluster.clone();
            let committed = committed.clone();
            thread::spawn(move || {
                let mut c = cluster.connect();
                let stmt =
                    c.prepare("INSERT INTO bench_orders (customer, amount) VALUES ('steady', 1) RETURNING id").unwrap();
                let start = Instant::now();
                for i in 0..total / clients {
                    let due = start + per_client * i as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        thread::sleep(wait);
                    }
                    let id: i64 = c.query_one(&stmt, &[]).unwrap().get(0);
                    committed.lock().unwrap().insert(id, Instant::now());
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    wait_arrivals(receiver, before + total, Duration::from_secs(60));
    let committed = committed.lock().unwrap();
    let mut latencies: Vec<f64> = receiver
        .received()
        .iter()
        .skip(before)
        .filter_map(|r| {
            let id = r.json()["data"]["id"].as_i64()?;
            let at = committed.get(&id)?;
            Some(r.at.saturating_duration_since(*at).as_secs_f64() * 1000.0)
        })
        .collect();
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    println!();
    println!("latency at a steady {rate} changes/s ({} single-row commits from {clients} clients):", latencies.len());
    println!("  commit -> receipt   p50 {:.1} ms   p99 {:.1} ms   max {:.1} ms", pct(0.5), pct(0.99), pct(1.0));
}

/// Each insert runs in a transaction that is rolled back, so that the
/// dispatchers have nothing to do while the next one is timed, and after a
/// checkpoint, so that no run pays for another's dirty buffers.
fn writer_overhead(db: &mut postgres::Client, rows: i32) {
    let mut time = |table: &str| -> f64 {
        db.batch_execute("CHECKPOINT").unwrap();
        let mut tx = db.transaction().unwrap();
        let start = Instant::now();
        tx.execute(
            &format!(
                "INSERT INTO {table} (customer, amount) SELECT 'customer ' || g, g * 1.5 FROM generate_series(1, $1) g"
            ),
            &[&rows],
        )
        .unwrap();
        let took = start.elapsed().as_secs_f64();
        tx.rollback().unwrap();
        took
    };
    let (mut plain, mut subscribed) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        plain.push(time("bench_plain"));
        subscribed.push(time("bench_orders"));
    }
    plain.sort_by(|a, b| a.partial_cmp(b).unwrap());
    subscribed.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (p, s) = (plain[2], subscribed[2]);
    println!();
    println!("writer overhead: INSERT ... SELECT of {rows} rows, median of 5");
    println!("  not subscribed  {:.0} ms", p * 1000.0);
    println!("  subscribed      {:.0} ms   ratio {:.2}x", s * 1000.0, s / p);
}
