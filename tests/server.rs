//! Tests that stop workers, crash the server or change its settings. They
//! take a lock so that they run one at a time.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use pg_ihub_e2e::*;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every one of `rows` rows must reach the receiver at least once and every
/// delivery end delivered.
fn assert_all_arrived(hub: &mut Hub, rx: &Receiver, s: &Setup, rows: i64) {
    let states = hub.wait_settled(&s.endpoint, rows, Duration::from_secs(90));
    assert!(states.iter().all(|s| s == "delivered"), "{states:?}");
    assert_eq!(distinct_row_ids(rx) as i64, rows, "some rows never arrived");
}

/// 600 rows on their way to a receiver that takes 400 ms per request, with
/// the first already arrived: batches are in flight.
fn bulk_in_flight(hub: &mut Hub) -> (Receiver, Setup) {
    let rx = Receiver::start();
    rx.script(|_, _| Reply::delayed(200, Duration::from_millis(400)));
    let s = hub.setup(&rx.url("/"), "");
    hub.subscribe_and_insert(&s, 600);
    assert!(rx.wait_for(1, Duration::from_secs(20)), "sending started");
    (rx, s)
}

#[test]
fn terminating_dispatchers_mid_batch_loses_nothing() {
    let _g = serial();
    let mut hub = hub();
    let (rx, s) = bulk_in_flight(&mut hub);
    let terminated: i64 = hub
        .one("SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM ihub.workers WHERE kind = 'dispatcher') t");
    assert!(terminated >= 1);
    assert_all_arrived(&mut hub, &rx, &s, 600);
    // The workers came back by themselves.
    assert!(hub.wait_true("SELECT count(*) >= 1 FROM ihub.workers WHERE kind = 'dispatcher'", Duration::from_secs(20)));
}

#[test]
fn an_immediate_shutdown_mid_batch_loses_nothing() {
    let _g = serial();
    let mut hub = hub();
    let (rx, s) = bulk_in_flight(&mut hub);
    drop(hub);
    let cluster = Cluster::from_env();
    cluster.crash_and_restart();
    let mut hub = pg_ihub_e2e::hub();
    assert_all_arrived(&mut hub, &rx, &s, 600);
}

#[test]
fn the_environment_setting_decides_between_test_and_active() {
    let _g = serial();
    let mut hub = hub();
    let name = unique("stage");
    hub.exec("ALTER SYSTEM SET ihub.environment = 'staging'");
    hub.exec("SELECT pg_reload_conf()");
    std::thread::sleep(Duration::from_millis(300));
    hub = pg_ihub_e2e::hub();
    hub.exec(&format!("SELECT ihub.create_integration('{name}')"));
    let state: String = hub.one(&format!("SELECT ihub.enable_integration('{name}')"));
    hub.exec("ALTER SYSTEM RESET ihub.environment");
    hub.exec("SELECT pg_reload_conf()");
    assert_eq!(state, "test");
    std::thread::sleep(Duration::from_millis(300));
    let mut hub = pg_ihub_e2e::hub();
    let state: String = hub.one(&format!("SELECT ihub.enable_integration('{name}')"));
    assert_eq!(state, "active");
}

/// A second, small cluster without shared_preload_libraries.
struct Unpreloaded {
    cluster: Cluster,
}

impl Unpreloaded {
    fn start() -> Unpreloaded {
        let base = Cluster::from_env();
        let dir = base.pgdata.with_file_name("unpreloaded");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pgdata = dir.join("data");
        let mut cluster = base.clone();
        cluster.pgdata = pgdata.clone();
        cluster.logfile = dir.join("postgres.log");
        cluster.port = base.port + 1;
        cluster.dbname = "postgres".into();
        let _ = std::process::Command::new("chown").args(["-R", "postgres", &dir.to_string_lossy()]).status();
        cluster.run_as_postgres("initdb", &["-D", &pgdata.to_string_lossy(), "-A", "trust", "-U", "postgres"]);
        let conf =
            format!("port = {}\nunix_socket_directories = '{}'\nlisten_addresses = ''\n", cluster.port, cluster.host);
        let conf_path: PathBuf = pgdata.join("postgresql.auto.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let _ = std::process::Command::new("chown").args(["postgres", &conf_path.to_string_lossy()]).status();
        cluster.start();
        Unpreloaded { cluster }
    }
}

impl Drop for Unpreloaded {
    fn drop(&mut self) {
        let data = self.cluster.pgdata.to_string_lossy().to_string();
        self.cluster.run_as_postgres("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"]);
    }
}

#[test]
fn without_preloading_the_extension_installs_and_says_what_is_missing() {
    let _g = serial();
    let server = Unpreloaded::start();
    let mut db = server.cluster.connect_wait(Duration::from_secs(30));
    db.batch_execute(
        "CREATE EXTENSION pg_ihub;
         CREATE TABLE t (id int PRIMARY KEY);
         SELECT ihub.create_integration('it');
         SELECT ihub.create_endpoint('it', 'ep', 'https://hooks.example.com/x');",
    )
    .unwrap_or_else(|e| panic!("configuration works without the workers: {}", describe(&e)));
    for call in [
        "SELECT ihub.subscribe('t', 'ep')",
        "SELECT ihub.http_request('ep', '{}')",
        "SELECT ihub.enable_integration('it')",
    ] {
        let err = db.batch_execute(call).expect_err(call);
        let db_err = err.as_db_error().unwrap();
        assert!(db_err.message().contains("shared_preload_libraries"), "{call}: {}", db_err.message());
        assert!(db_err.hint().unwrap_or("").contains("shared_preload_libraries"), "{call}: no hint");
    }
    // Nothing half-made.
    let subs: i64 = db.query_one("SELECT count(*) FROM ihub.subscription", &[]).unwrap().get(0);
    assert_eq!(subs, 0);
}

/// CPU seconds a process has used (user + system), from /proc.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[test]
fn idle_dispatchers_sleep_instead_of_polling() {
    let _g = serial();
    let mut hub = hub();
    let pids: Vec<i32> = hub
        .db
        .query("SELECT pid FROM ihub.workers WHERE kind = 'dispatcher'", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!pids.is_empty());
    std::thread::sleep(Duration::from_millis(500));
    let before: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
    std::thread::sleep(Duration::from_secs(3));
    let used: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - before;
    // A spinning worker burns a core (3 s here); a sleeping one next to nothing.
    assert!(used < 0.3, "dispatchers used {used:.2} CPU seconds in 3 s of idleness");
}
