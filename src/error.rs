//! Errors raised to SQL callers. Each says what is wrong and, in its hint,
//! what to do; none repeats a secret.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

use pg_ihub_core::outbound::auth::{AuthError, AUTH_HINT};
use pg_ihub_core::outbound::circuit::{CircuitError, CIRCUIT_HINT};
use pg_ihub_core::outbound::request_url::{QueryError, QUERY_HINT};
use pg_ihub_core::outbound::sender::HeaderError;
use pg_ihub_core::outbound::signature::SecretError;
use pg_ihub_core::outbound::target::TargetError;
use pg_ihub_core::retry::{PolicyError, POLICY_KEYS};

#[derive(Debug, thiserror::Error)]
pub enum IhubError {
    #[error("pg_ihub is not loaded through shared_preload_libraries, so its background workers are not running")]
    NotPreloaded,
    #[error("pg_ihub's background workers do not serve database \"{0}\"")]
    DatabaseNotServed(String),
    #[error("invalid endpoint URL: {0}")]
    Url(#[from] TargetError),
    #[error("invalid retry policy: {0}")]
    Retry(#[from] PolicyError),
    #[error("invalid auth: {0}")]
    Auth(#[from] AuthError),
    #[error("invalid circuit breaker: {0}")]
    Circuit(#[from] CircuitError),
    #[error("invalid secret: {0}")]
    Secret(#[from] SecretError),
    #[error("invalid headers: {0}")]
    Headers(#[from] HeaderError),
    #[error("invalid condition: {0}")]
    Condition(String),
    #[error("setting ihub.allow_private_hosts is invalid: {0}")]
    AllowList(TargetError),
    #[error("invalid query: {0}")]
    Query(#[from] QueryError),
    #[error("invalid authorize_url: {0}")]
    AuthorizeUrl(String),
}

pub type Result<T> = std::result::Result<T, IhubError>;

impl IhubError {
    fn hint(&self) -> String {
        match self {
            IhubError::NotPreloaded => {
                "Add pg_ihub to shared_preload_libraries in postgresql.conf and restart PostgreSQL.".into()
            }
            IhubError::DatabaseNotServed(_) => {
                "Add this database to ihub.databases in postgresql.conf and restart PostgreSQL.".into()
            }
            IhubError::Url(TargetError::Restricted(_)) => {
                "To allow it, list the host or its range in ihub.allow_private_hosts (postgresql.conf) and reload.".into()
            }
            IhubError::Url(_) => "Use an absolute http:// or https:// URL, e.g. https://hooks.example.com/orders.".into(),
            IhubError::Retry(_) => format!(
                "Pass a JSON object with any of {}, e.g. {{\"max_attempts\": 5, \"initial_delay\": 30}} (delays in seconds).",
                POLICY_KEYS.join(", ")
            ),
            IhubError::Auth(_) => AUTH_HINT.into(),
            IhubError::Circuit(_) => CIRCUIT_HINT.into(),
            IhubError::Secret(_) => {
                "Pass NULL to have one generated, or a Standard Webhooks secret: \"whsec_\" followed by base64 of 24 to 64 random bytes.".into()
            }
            IhubError::Headers(e) => e.hint(),
            IhubError::Condition(_) => {
                "Write one SQL boolean expression over new and old, e.g. new.amount > 100 AND old.status <> new.status.".into()
            }
            IhubError::AllowList(_) => "Use comma-separated host names, addresses or CIDR ranges, e.g. 127.0.0.1/32, ::1, localhost.".into(),
            IhubError::Query(_) => QUERY_HINT.into(),
            IhubError::AuthorizeUrl(_) => {
                "Use the provider's authorization endpoint, e.g. https://accounts.example.com/oauth/v2/auth.".into()
            }
        }
    }

    fn code(&self) -> PgSqlErrorCode {
        match self {
            IhubError::NotPreloaded | IhubError::DatabaseNotServed(_) => {
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
            }
            IhubError::AllowList(_) => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            IhubError::Condition(_) => PgSqlErrorCode::ERRCODE_SYNTAX_ERROR,
            _ => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        }
    }

    pub fn raise(self) -> ! {
        ErrorReport::new(self.code(), self.to_string(), "pg_ihub").set_hint(self.hint()).report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

/// Unwraps or raises the error to the SQL caller.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T, E: Into<IhubError>> OrRaise<T> for std::result::Result<T, E> {
    fn or_raise(self) -> T {
        self.unwrap_or_else(|e| e.into().raise())
    }
}
