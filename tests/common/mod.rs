//! Helpers for the end-to-end suites: a connection to the test cluster and
//! a fresh integration, endpoint and table per test, so that tests can run
//! side by side.

use std::time::{Duration, Instant};

pub use pg_ihub_testkit::cluster::Cluster;
pub use pg_ihub_testkit::crm::{self, Crm};
pub use pg_ihub_testkit::receiver::{Received, Receiver, Reply};
use postgres::Client;

/// The server's message for a database error, not just "db error".
pub fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => e.to_string(),
    }
}

/// The error message (and hint) a statement fails with, on any connection.
pub fn error_of(client: &mut Client, sql: &str) -> String {
    match client.batch_execute(sql) {
        Ok(()) => panic!("expected an error from: {sql}"),
        Err(e) => {
            let db = e.as_db_error().unwrap_or_else(|| panic!("not a database error: {e}"));
            format!("{} HINT: {}", db.message(), db.hint().unwrap_or(""))
        }
    }
}

pub struct Hub {
    pub db: Client,
    pub cluster: Cluster,
}

/// A short unique name for this test's objects.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:08x}", rand::random::<u32>())
}

pub fn hub() -> Hub {
    let cluster = Cluster::from_env();
    let db = cluster.connect_wait(Duration::from_secs(30));
    Hub { db, cluster }
}

/// Fast retries for tests: 0.2 s, doubling, no jitter.
pub const FAST_RETRY: &str = r#"{"initial_delay": 0.2, "multiplier": 2, "jitter": 0, "max_attempts": 5}"#;

pub struct Setup {
    pub integration: String,
    pub endpoint: String,
    pub table: String,
    pub secret: String,
}

impl Hub {
    pub fn exec(&mut self, sql: &str) {
        self.db.batch_execute(sql).unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)));
    }

    pub fn one<T: for<'a> postgres::types::FromSql<'a>>(&mut self, sql: &str) -> T {
        self.db.query_one(sql, &[]).unwrap_or_else(|e| panic!("{sql}: {}", describe(&e))).get(0)
    }

    /// The error message (and hint) a statement fails with.
    pub fn error(&mut self, sql: &str) -> String {
        error_of(&mut self.db, sql)
    }

    /// An `orders`-like table, an enabled integration and an endpoint pointing
    /// at `url`, created with extra `create_endpoint` arguments.
    pub fn setup(&mut self, url: &str, endpoint_args: &str) -> Setup {
        let integration = unique("it");
        let endpoint = unique("ep");
        let table = unique("orders");
        self.exec(&format!(
            "CREATE TABLE {table} (id bigserial PRIMARY KEY, customer text NOT NULL, amount numeric(12,2) NOT NULL, \
               status text NOT NULL DEFAULT 'new', note text);
             SELECT ihub.create_integration('{integration}', tenant => 'acme');
             SELECT ihub.create_endpoint('{integration}', '{endpoint}', '{url}' {endpoint_args});
             SELECT ihub.enable_integration('{integration}');"
        ));
        let secret: String =
            self.one(&format!("SELECT secret FROM ihub.endpoint_secrets WHERE endpoint = '{endpoint}' AND signing"));
        Setup { integration, endpoint, table, secret }
    }

    /// Subscribes the endpoint to inserts and inserts `rows` rows in one statement.
    pub fn subscribe_and_insert(&mut self, s: &Setup, rows: i64) {
        self.exec(&format!(
            "SELECT ihub.subscribe('{t}', '{e}', events => '{{insert}}');
             INSERT INTO {t} (customer, amount) SELECT 'c' || g, g FROM generate_series(1, {rows}) g;",
            t = s.table,
            e = s.endpoint
        ));
    }

    pub fn delivery_states(&mut self, endpoint: &str) -> Vec<String> {
        self.db
            .query(&format!("SELECT state FROM ihub.deliveries WHERE endpoint = '{endpoint}' ORDER BY id"), &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Polls until `query` returns true.
    pub fn wait_true(&mut self, query: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(row) = self.db.query_one(query, &[]) {
                if row.get::<_, Option<bool>>(0) == Some(true) {
                    return true;
                }
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every delivery of the endpoint has left pending/running/retry.
    pub fn wait_settled(&mut self, endpoint: &str, expected: i64, timeout: Duration) -> Vec<String> {
        let ok = self.wait_true(
            &format!(
                "SELECT count(*) = {expected} AND bool_and(state NOT IN ('pending', 'running', 'retry')) \
                 FROM ihub.deliveries WHERE endpoint = '{endpoint}'"
            ),
            timeout,
        );
        let states = self.delivery_states(endpoint);
        assert!(ok, "deliveries of {endpoint} did not settle: {states:?}");
        states
    }
}

/// The distinct row ids (`data.id`) the receiver has seen.
pub fn distinct_row_ids(rx: &Receiver) -> usize {
    let mut ids: Vec<i64> = rx.received().iter().filter_map(|r| r.json()["data"]["id"].as_i64()).collect();
    ids.sort_unstable();
    ids.dedup();
    ids.len()
}

/// The inbound listener of the test cluster (IHUB_LISTEN, host:port).
pub fn listener_url(path: &str) -> String {
    format!("http://{}{}", std::env::var("IHUB_LISTEN").unwrap_or_else(|_| "127.0.0.1:8490".into()), path)
}

/// A blocking HTTP client for the listener, once the listener accepts
/// connections (it starts a moment after the server, and again after a crash).
pub fn http() -> reqwest::blocking::Client {
    let address = listener_url("").trim_start_matches("http://").to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&address).is_err() {
        assert!(Instant::now() < deadline, "the listener on {address} does not accept connections");
        std::thread::sleep(Duration::from_millis(100));
    }
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

pub fn now_s() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A test's roles, all non-superusers: `<p>_dev` (ihub_developer, may create
/// tables in public), `<p>_dev2` (another developer), `<p>_viewer` (ihub_viewer) and `<p>_admin`
/// (ihub_admin), with a connection as the developer. `{p}` in the SQL given
/// to its methods is replaced by the prefix.
pub struct Team {
    pub hub: Hub,
    pub p: String,
    pub dev: Client,
}

pub fn team(prefix: &str) -> Team {
    let mut hub = hub();
    let p = unique(prefix);
    hub.exec(&format!(
        // One at a time: concurrent GRANTs on one schema collide.
        "BEGIN; SELECT pg_advisory_xact_lock(84708471);
         CREATE ROLE {p}_dev LOGIN IN ROLE ihub_developer;
         CREATE ROLE {p}_dev2 LOGIN IN ROLE ihub_developer;
         CREATE ROLE {p}_viewer LOGIN IN ROLE ihub_viewer;
         CREATE ROLE {p}_admin LOGIN IN ROLE ihub_admin;
         GRANT CREATE ON SCHEMA public TO {p}_dev;
         COMMIT;"
    ));
    let dev = hub.cluster.connect_as(&format!("{p}_dev"), &hub.cluster.dbname);
    Team { hub, p, dev }
}

impl Team {
    /// Disables and deletes integration `{p}` (and so its OAuth2
    /// credentials) when the guard goes, even when the test fails: a
    /// credential whose test token endpoint is gone would fail its token
    /// requests and make `ihub.health()` critical for the tests after.
    pub fn delete_integration_at_end(&self) -> IntegrationGuard {
        IntegrationGuard { cluster: self.hub.cluster.clone(), name: self.p.clone() }
    }

    pub fn sql(&self, sql: &str) -> String {
        sql.replace("{p}", &self.p)
    }

    /// A connection as `<p>_<who>`.
    pub fn connect(&self, who: &str) -> Client {
        self.hub.cluster.connect_as(&format!("{}_{who}", self.p), &self.hub.cluster.dbname)
    }

    pub fn exec(&mut self, sql: &str) {
        let sql = self.sql(sql);
        self.dev.batch_execute(&sql).unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)));
    }

    pub fn one<T: for<'a> postgres::types::FromSql<'a>>(&mut self, sql: &str) -> T {
        let sql = self.sql(sql);
        self.dev.query_one(&sql, &[]).unwrap_or_else(|e| panic!("{sql}: {}", describe(&e))).get(0)
    }

    pub fn error(&mut self, sql: &str) -> String {
        let sql = self.sql(sql);
        error_of(&mut self.dev, &sql)
    }

    /// Polls (as the superuser) until `query` returns true.
    pub fn wait_true(&mut self, query: &str, timeout: Duration) -> bool {
        let sql = self.sql(query);
        self.hub.wait_true(&sql, timeout)
    }

    /// As the superuser.
    pub fn su<T: for<'a> postgres::types::FromSql<'a>>(&mut self, sql: &str) -> T {
        let sql = self.sql(sql);
        self.hub.one(&sql)
    }
}

/// SQL that gives integration `integration` an OAuth2 credential `name` for
/// the test CRM (`grant`: client_credentials, or refresh_token with
/// `refresh_token`), and an endpoint `endpoint` to the CRM's API using it,
/// with fast retries.
pub fn crm_sql(
    crm: &Crm,
    integration: &str,
    name: &str,
    endpoint: &str,
    grant: &str,
    refresh_token: Option<&str>,
) -> String {
    let refresh = refresh_token.map(|t| format!("'{t}'")).unwrap_or_else(|| "NULL".into());
    format!(
        "SELECT ihub.create_oauth2('{integration}', '{name}', '{token}', '{id}', '{secret}', refresh_token => {refresh},
                                   \"grant\" => '{grant}', authorize_url => '{authorize}');
         SELECT ihub.create_endpoint('{integration}', '{endpoint}', '{api}',
                                     auth => '{{\"type\": \"oauth2\", \"credential\": \"{name}\"}}', retry => '{FAST_RETRY}');",
        token = crm.url("/oauth/token"),
        authorize = crm.url("/oauth/authorize"),
        api = crm.url(""),
        id = crm::CLIENT_ID,
        secret = crm::CLIENT_SECRET,
    )
}

pub struct IntegrationGuard {
    cluster: Cluster,
    name: String,
}

impl Drop for IntegrationGuard {
    fn drop(&mut self) {
        let mut db = self.cluster.connect();
        let _ = db.batch_execute(&format!(
            "SELECT ihub.disable_integration(name), ihub.delete_integration(name) FROM ihub.integrations WHERE name = '{}'",
            self.name
        ));
    }
}
