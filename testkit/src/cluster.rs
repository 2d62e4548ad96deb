//! The PostgreSQL cluster tests run against, described by environment
//! variables that `tests/run` sets, and helpers to restart it.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct Cluster {
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub pgdata: PathBuf,
    pub bindir: PathBuf,
    pub logfile: PathBuf,
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn running_as_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

impl Cluster {
    /// IHUB_PGHOST, IHUB_PGPORT, IHUB_PGDATABASE, IHUB_PGDATA, IHUB_PGBIN.
    pub fn from_env() -> Cluster {
        let pgdata = PathBuf::from(env("IHUB_PGDATA", "target/ihub-test/pgdata"));
        Cluster {
            host: env("IHUB_PGHOST", "/tmp"),
            port: env("IHUB_PGPORT", "5497").parse().expect("IHUB_PGPORT is a port"),
            dbname: env("IHUB_PGDATABASE", "ihub_test"),
            logfile: pgdata.with_file_name("postgres.log"),
            pgdata,
            bindir: PathBuf::from(env("IHUB_PGBIN", "/usr/lib/postgresql/15/bin")),
        }
    }

    pub fn conninfo(&self) -> String {
        self.conninfo_as("postgres", &self.dbname)
    }

    /// As another role (the test cluster trusts local connections), to another database.
    pub fn conninfo_as(&self, user: &str, dbname: &str) -> String {
        format!("host={} port={} dbname={dbname} user={user}", self.host, self.port)
    }

    pub fn connect(&self) -> postgres::Client {
        self.connect_as("postgres", &self.dbname)
    }

    pub fn connect_as(&self, user: &str, dbname: &str) -> postgres::Client {
        postgres::Client::connect(&self.conninfo_as(user, dbname), postgres::NoTls)
            .unwrap_or_else(|e| panic!("connect to the test cluster as {user}: {e}"))
    }

    /// Connects, retrying while the server starts.
    pub fn connect_wait(&self, timeout: Duration) -> postgres::Client {
        let deadline = Instant::now() + timeout;
        loop {
            match postgres::Client::connect(&self.conninfo(), postgres::NoTls) {
                Ok(c) => return c,
                Err(e) if Instant::now() > deadline => panic!("cluster did not come back: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Runs a server binary (pg_ctl, initdb) as the postgres user when we are root.
    pub fn run_as_postgres(&self, program: &str, args: &[&str]) -> std::process::Output {
        let path = self.bindir.join(program);
        let output = if running_as_root() {
            Command::new("runuser").args(["-u", "postgres", "--"]).arg(&path).args(args).output()
        } else {
            Command::new(&path).args(args).output()
        }
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
        assert!(
            output.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    /// Simulates a crash: immediate shutdown (no checkpoint), then start.
    pub fn crash_and_restart(&self) {
        let data = self.pgdata.to_string_lossy().to_string();
        self.run_as_postgres("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
        self.start();
    }

    pub fn start(&self) {
        let data = self.pgdata.to_string_lossy().to_string();
        let log = self.logfile.to_string_lossy().to_string();
        self.run_as_postgres("pg_ctl", &["-D", &data, "-l", &log, "-w", "-t", "60", "start"]);
    }

    /// The server log, to check that no secret was written to it.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.logfile).unwrap_or_default()
    }
}
