//! `ihub.*` settings. Worker counts and databases are read once at server
//! start (postmaster context); the rest reload on SIGHUP.

use std::ffi::CStr;

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};

#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Environment {
    #[name = c"production"]
    Production,
    #[name = c"staging"]
    Staging,
}

pub static DATABASES: GucSetting<Option<std::ffi::CString>> =
    GucSetting::<Option<std::ffi::CString>>::new(Some(c"postgres"));
pub static DISPATCH_WORKERS: GucSetting<i32> = GucSetting::<i32>::new(2);
pub static JOB_WORKERS: GucSetting<i32> = GucSetting::<i32>::new(2);
pub static LISTEN_ADDRESS: GucSetting<Option<std::ffi::CString>> =
    GucSetting::<Option<std::ffi::CString>>::new(Some(c"127.0.0.1:8470"));
pub static ENDPOINT_DISABLE_AFTER_S: GucSetting<i32> = GucSetting::<i32>::new(5 * 86_400);
pub static INBOUND_PROCESSORS: GucSetting<i32> = GucSetting::<i32>::new(1);
pub static INBOUND_BATCH: GucSetting<i32> = GucSetting::<i32>::new(100);
pub static INBOUND_ITEMS_PER_TRANSACTION: GucSetting<i32> = GucSetting::<i32>::new(50);
pub static INBOUND_RATE_LIMIT: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static INBOUND_BURST: GucSetting<i32> = GucSetting::<i32>::new(100);
pub static INBOUND_REQUEST_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(30_000);
pub static INBOUND_MAX_CONNECTIONS: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static MAX_JOBS_PER_RUN: GucSetting<i32> = GucSetting::<i32>::new(100);
// 100, not 20: fewer commits per job; 50,000 trivial jobs ran at 14,900 and
// 17,500/s against 12,500-14,000/s with 20 (make bench, same hour; the 50 ms
// batch budget bounds how long a batch holds its jobs' effects either way).
pub static JOBS_PER_TRANSACTION: GucSetting<i32> = GucSetting::<i32>::new(100);
pub static MAX_RUNTIME_SECONDS: GucSetting<i32> = GucSetting::<i32>::new(60);
pub static JOB_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(3_600_000);
pub static JOB_BACKOFF_CAP_S: GucSetting<i32> = GucSetting::<i32>::new(86_400);
pub static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(500);
pub static MAX_CONCURRENCY: GucSetting<i32> = GucSetting::<i32>::new(64);
pub static POLL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(10_000);
// 15 ms: 4 clients writing single rows got 1.59-1.77x slower instead of
// 2.04-2.38x (8 ms: 1.93x; 25-40 ms: 1.62-1.71x; make bench). Above 20 ms
// commits wake an idle peer (registry::GATHER_MS).
pub static DISPATCH_GATHER_MS: GucSetting<i32> = GucSetting::<i32>::new(15);
pub static DEFAULT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(10_000);
pub static MAX_BODY_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);
pub static RESPONSE_BODY_LIMIT: GucSetting<i32> = GucSetting::<i32>::new(4096);
pub static MAX_RESPONSE_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);
pub static ALLOW_PRIVATE_HOSTS: GucSetting<Option<std::ffi::CString>> =
    GucSetting::<Option<std::ffi::CString>>::new(None);
pub static HTTP_PROXY: GucSetting<Option<std::ffi::CString>> = GucSetting::<Option<std::ffi::CString>>::new(None);
pub static HEALTH_TOKEN: GucSetting<Option<std::ffi::CString>> = GucSetting::<Option<std::ffi::CString>>::new(None);
pub static ENVIRONMENT: GucSetting<Environment> = GucSetting::<Environment>::new(Environment::Production);
pub static LOG_MIN_LEVEL: GucSetting<Option<std::ffi::CString>> =
    GucSetting::<Option<std::ffi::CString>>::new(Some(c"info"));
pub static CLEANUP_INTERVAL_S: GucSetting<i32> = GucSetting::<i32>::new(86_400);
pub static HEALTH_QUEUE_AGE_S: GucSetting<i32> = GucSetting::<i32>::new(300);
pub static HEALTH_QUEUE_DEPTH: GucSetting<i32> = GucSetting::<i32>::new(10_000);
pub static INBOUND_MAX_CONNECTIONS_PER_ADDRESS: GucSetting<i32> = GucSetting::<i32>::new(100);
pub static INBOUND_HEADER_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(10_000);
/// The integrations whose sync the current transaction is (loop
/// prevention): set only through ihub.syncing() and by workers running a
/// handler or job of an integration, never by SET (superuser context).
pub static SYNCING: GucSetting<Option<std::ffi::CString>> = GucSetting::<Option<std::ffi::CString>>::new(None);

/// Defines the settings. Postmaster-context ones can only be defined while
/// shared_preload_libraries is processed (later it is a FATAL error), so a
/// session that loads the library on demand gets only the others.
pub fn init(preloading: bool) {
    if preloading {
        define_postmaster_settings();
    }
    define_reloadable_settings();
}

fn define_postmaster_settings() {
    GucRegistry::define_string_guc(
        c"ihub.databases",
        c"Databases served by pg_ihub's background workers (comma-separated).",
        c"Each listed database gets its own dispatcher workers; the extension must be created in it. Requires a restart.",
        &DATABASES,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"ihub.dispatch_workers",
        c"Dispatcher workers per database.",
        c"Each claims batches of deliveries with FOR UPDATE SKIP LOCKED and sends them concurrently. Requires a restart.",
        &DISPATCH_WORKERS,
        0,
        32,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"ihub.listen_address",
        c"Address the inbound webhook listener serves HTTP on (host:port); empty turns it off.",
        c"One listener for the server, serving the first database in ihub.databases. Requires a restart.",
        &LISTEN_ADDRESS,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"ihub.inbound_processors",
        c"Inbound processor workers per database.",
        c"Each calls the handlers of queued inbound items, one item at a time. Requires a restart.",
        &INBOUND_PROCESSORS,
        0,
        64,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"ihub.job_workers",
        c"Job workers per database.",
        c"Each runs one background job at a time, in its own transaction. Requires a restart.",
        &JOB_WORKERS,
        0,
        64,
        GucContext::Postmaster,
        GucFlags::default(),
    );
}

fn define_reloadable_settings() {
    GucRegistry::define_int_guc(
        c"ihub.inbound_items_per_transaction",
        c"Due inbound items whose handlers run as one role that a processor claims together and handles in one transaction, each in a subtransaction (1: a transaction per item).",
        c"One commit for them all instead of one per item. An item's effects become visible when its transaction commits, at most about 50 ms after it began unless a handler runs longer.",
        &INBOUND_ITEMS_PER_TRANSACTION,
        1,
        1000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"ihub.inbound_batch",
        c"Inbound items a processor handles before it yields.",
        c"",
        &INBOUND_BATCH,
        1,
        100_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"ihub.inbound_rate_limit",
        c"Requests per second the listener accepts per source (0: no limit); more get 429 with Retry-After.",
        c"",
        &INBOUND_RATE_LIMIT,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"ihub.inbound_burst",
        c"Requests a source may send at once above ihub.inbound_rate_limit.",
        c"",
        &INBOUND_BURST,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"ihub.inbound_request_timeout",
        c"How long the listener waits for a request to arrive whole and be committed.",
        c"",
        &INBOUND_REQUEST_TIMEOUT_MS,
        100,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"ihub.inbound_max_connections",
        c"Connections the listener serves at once; more are answered 503 and closed.",
        c"Read when the listener starts: change it, then terminate the listener (the postmaster restarts it).",
        &INBOUND_MAX_CONNECTIONS,
        1,
        100_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"ihub.jobs_per_transaction",
        c"Due jobs of one role a job worker claims together and runs in one transaction, each in a subtransaction (1: a transaction per job).",
        c"One commit per batch instead of one per job. A job's effects become visible when its batch commits, at most about 50 ms after the batch began unless a job runs longer.",
        &JOBS_PER_TRANSACTION,
        1,
        1000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"ihub.max_jobs_per_run",
        c"Jobs a job worker runs before it yields (rescue checks, settings reload).",
        c"",
        &MAX_JOBS_PER_RUN,
        1,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"ihub.max_runtime_seconds",
        c"Seconds a job worker keeps taking jobs before it yields.",
        c"",
        &MAX_RUNTIME_SECONDS,
        1,
        86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"ihub.job_timeout",
        c"How long a job may run unless enqueued with its own timeout; it is then stopped and retried.",
        c"",
        &JOB_TIMEOUT_MS,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"ihub.job_backoff_cap",
        c"Longest delay between two attempts of a job.",
        c"",
        &JOB_BACKOFF_CAP_S,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"ihub.max_concurrency",
        c"Requests a dispatcher has in flight at most.",
        c"Each holds a connection, and so a file descriptor of the server process; read at worker start.",
        &MAX_CONCURRENCY,
        1,
        1000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"ihub.batch_size",
        c"Deliveries a dispatcher claims and sends at once.",
        c"",
        &BATCH_SIZE,
        1,
        10_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"ihub.poll_interval",
        c"Longest a dispatcher sleeps when nothing wakes it.",
        c"Workers are woken at commit by the transactions that enqueue; this fallback also bounds how late an expired lease is noticed.",
        &POLL_INTERVAL_MS,
        100,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"ihub.dispatch_gather",
        c"How long a busy dispatcher gathers commits before its next round (0: go on at once).",
        c"Applies only after two rounds in a row of at least 8 changes, at 1,000 a second or more, with more committed meanwhile: rounds get larger and cheaper while writers are busy, and a change waits up to this long. Quiet traffic is sent at once.",
        &DISPATCH_GATHER_MS,
        0,
        1000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"ihub.default_timeout",
        c"Request timeout for endpoints created without timeout_ms.",
        c"",
        &DEFAULT_TIMEOUT_MS,
        1,
        300_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"ihub.max_body_size",
        c"Largest request body pg_ihub sends (ihub.http_request) or accepts (inbound webhooks, ihub.receive).",
        c"",
        &MAX_BODY_SIZE,
        1024,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_int_guc(
        c"ihub.max_response_size",
        c"Largest response body handed to a response handler (ihub.http_request(..., on_response => ...)).",
        c"A longer body is cut there, and the handler's error says so. A dispatcher's batch holds 32 MB of such requests at most.",
        &MAX_RESPONSE_SIZE,
        1024,
        64 * 1024 * 1024,
        GucContext::Sighup,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_int_guc(
        c"ihub.response_body_limit",
        c"Bytes of each response body kept in ihub.delivery_attempts.",
        c"",
        &RESPONSE_BODY_LIMIT,
        0,
        1024 * 1024,
        GucContext::Sighup,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_string_guc(
        c"ihub.syncing",
        c"Integrations whose sync the current transaction is (comma-separated): its writes are not sent back to them.",
        c"Set for the transaction by ihub.syncing(integration), and for inbound handlers and jobs of an integration by the \
          workers. Only superusers can SET it.",
        &SYNCING,
        GucContext::Suset,
        GucFlags::DISALLOW_IN_FILE,
    );
    GucRegistry::define_string_guc(
        c"ihub.allow_private_hosts",
        c"Private, loopback or link-local hosts endpoints may use (comma-separated names, addresses or CIDR ranges).",
        c"By default such addresses are refused so that webhook URLs cannot reach the server's own network. '*' allows all.",
        &ALLOW_PRIVATE_HOSTS,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"ihub.http_proxy",
        c"Proxy for outbound requests (http://host:port or https://host:port); empty connects directly.",
        c"Proxies named in the server's environment (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY) are never used. Through a proxy, \
          URLs with a literal address are still checked against ihub.allow_private_hosts, but host names are resolved by \
          the proxy: the resolver guard does not apply to the proxy's own upstream connections, so the proxy must refuse \
          private addresses itself. An invalid value makes every request fail (and be retried) until it is fixed. Only \
          superusers can read it, as it may carry credentials.",
        &HTTP_PROXY,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"ihub.health_token",
        c"Bearer token for the detailed answer of the listener's GET /healthz; empty: no detail over HTTP.",
        c"Without an Authorization: Bearer header carrying this token, /healthz answers only the overall status \
          (ok, warning or critical; 503 when critical). Only superusers can read it.",
        &HEALTH_TOKEN,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"ihub.log_min_level",
        c"Lowest level logged for entries without an integration, and for integrations without their own setting.",
        c"debug, info, warning, error or critical. Per integration: ihub.set_log_level.",
        &LOG_MIN_LEVEL,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"ihub.cleanup_interval",
        c"How often the maintenance worker runs the retention cleanup.",
        c"",
        &CLEANUP_INTERVAL_S,
        60,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"ihub.health_queue_age",
        c"ihub.health warns when the oldest due item of a queue waits this long (critical at four times).",
        c"",
        &HEALTH_QUEUE_AGE_S,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"ihub.health_queue_depth",
        c"ihub.health warns when this many items of a queue are due (critical at ten times).",
        c"",
        &HEALTH_QUEUE_DEPTH,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"ihub.environment",
        c"production or staging: enabled integrations become 'active' or 'test'.",
        c"",
        &ENVIRONMENT,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"ihub.inbound_max_connections_per_address",
        c"Connections the listener serves at once from one remote address; more are answered 503 and closed.",
        c"Behind a reverse proxy every connection comes from the proxy's address: raise it to ihub.inbound_max_connections there.",
        &INBOUND_MAX_CONNECTIONS_PER_ADDRESS,
        1,
        100_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"ihub.endpoint_disable_after",
        c"An endpoint whose attempts have all failed for this long is disabled, with the reason recorded.",
        c"Counted from the first failed attempt after the last delivered one; 0 never disables. ihub.enable_endpoint starts it again.",
        &ENDPOINT_DISABLE_AFTER_S,
        0,
        365 * 86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"ihub.inbound_header_timeout",
        c"How long the listener waits for a request's headers on a connection before closing it.",
        c"Idle connections are closed after it; the body then has ihub.inbound_request_timeout. Applies to new connections.",
        &INBOUND_HEADER_TIMEOUT_MS,
        100,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
}

pub fn string_setting(setting: &GucSetting<Option<std::ffi::CString>>) -> String {
    setting.get().as_deref().map(CStr::to_string_lossy).map(|s| s.into_owned()).unwrap_or_default()
}

pub fn databases() -> Vec<String> {
    string_setting(&DATABASES).split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
}

pub fn listen_address() -> String {
    string_setting(&LISTEN_ADDRESS).trim().to_string()
}

pub fn allow_private_hosts() -> String {
    string_setting(&ALLOW_PRIVATE_HOSTS)
}

pub fn http_proxy() -> String {
    string_setting(&HTTP_PROXY).trim().to_string()
}

/// The integrations the current transaction syncs (ihub.syncing).
pub fn syncing() -> String {
    string_setting(&SYNCING)
}

pub fn health_token() -> String {
    string_setting(&HEALTH_TOKEN).trim().to_string()
}
