//! OAuth2 token requests (`sql/oauth2.sql`): the maintenance worker asks
//! the token endpoints of credentials that are due (`ihub._oauth2_due`) and
//! stores what they issue; the listener exchanges authorization codes the
//! same way. HTTP goes through `pg_ihub_core::oauth2::TokenClient`, with
//! the private-host allow-list and `ihub.http_proxy` of every outbound
//! request; no SPI runs while a request is in flight.

use std::time::Duration;

use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};

use crate::error::IhubError;
use crate::runtime::backend::{column, in_transaction, nullable};
use crate::settings;
use pg_ihub_core::oauth2::{self, ClientAuth, Grant, TokenClient, TokenError, Tokens};

/// Credentials asked for in one go; more wait for the next round.
const DUE_BATCH: i32 = 20;

/// A fresh random state for an authorization URL (32 bytes, hex).
#[pg_extern(name = "_oauth2_new_state", volatile)]
fn new_state() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The authorization URL (`pg_ihub_core::oauth2::authorize_url`).
#[pg_extern(name = "_oauth2_authorize_link", immutable)]
fn authorize_link(
    authorize_url: &str,
    client_id: &str,
    redirect_uri: &str,
    scope: Option<&str>,
    state: &str,
) -> String {
    oauth2::authorize_url(authorize_url, client_id, redirect_uri, scope, state)
        .unwrap_or_else(|e| IhubError::AuthorizeUrl(e).raise())
}

pub fn token_client() -> TokenClient {
    TokenClient::new(
        crate::outbound::functions::worker_allow_list(),
        &settings::http_proxy(),
        concat!("pg_ihub/", env!("CARGO_PKG_VERSION")),
    )
}

pub fn request_timeout() -> Duration {
    Duration::from_millis(settings::DEFAULT_TIMEOUT_MS.get().max(1) as u64)
}

/// What `ihub._oauth2_store` takes for tokens just issued.
pub fn stored(tokens: &Tokens) -> Value {
    json!({
        "access_token": tokens.access_token,
        "refresh_token": tokens.refresh_token,
        "expires_in": tokens.expires_in,
        // At least a second on: a token issued to expire at once must not
        // have the worker ask again in a tight loop.
        "refresh_in": tokens.expires_in.map(|s| oauth2::refresh_after(s).max(1.0)),
    })
}

/// Stores the outcome of a token request for credential `id`, asked while
/// its token version was `version`, in a transaction of its own.
pub fn record(id: i64, version: i32, outcome: &Result<Tokens, TokenError>) {
    in_transaction("store OAuth2 tokens", || match outcome {
        Ok(tokens) => {
            Spi::run_with_args("SELECT ihub._oauth2_store($1, $2)", &[id.into(), JsonB(stored(tokens)).into()])
                .unwrap_or_else(|e| error!("ihub._oauth2_store: {e}"))
        }
        Err(e) => Spi::run_with_args(
            "SELECT ihub._oauth2_failed($1, $2, $3)",
            &[id.into(), version.into(), e.to_string().into()],
        )
        .unwrap_or_else(|e| error!("ihub._oauth2_failed: {e}")),
    });
}

/// A credential's id and token version when it was leased.
type Leased = (i64, i32);
/// What to ask a token endpoint.
type Ask = (oauth2::Client, Grant);

/// Asks for new tokens for every credential that is due, a batch at a time:
/// read (and leased) in one transaction, asked with no transaction open,
/// each outcome stored in its own. Returns how many were asked.
pub fn refresh_due(runtime: &tokio::runtime::Runtime, tokens: &TokenClient) -> usize {
    let due: Vec<(Leased, Ask)> = in_transaction("OAuth2 credentials due", || {
        Spi::connect_mut(|client| {
            client
                .update(
                    "SELECT id, grant_type, token_url, client_id, client_secret, refresh_token, scope, client_auth, version \
                     FROM ihub._oauth2_due($1)",
                    None,
                    &[DUE_BATCH.into()],
                )
                .unwrap_or_else(|e| error!("ihub._oauth2_due: {e}"))
                .filter_map(|row| {
                    // (_oauth2_due returns no refresh_token grant without a refresh token.)
                    let grant = match column::<String>(&row, 2, "grant_type").as_str() {
                        "client_credentials" => Grant::ClientCredentials,
                        _ => Grant::RefreshToken(nullable::<String>(&row, 6, "refresh_token")?),
                    };
                    let client = oauth2::Client {
                        token_url: column(&row, 3, "token_url"),
                        client_id: column(&row, 4, "client_id"),
                        client_secret: column(&row, 5, "client_secret"),
                        scope: nullable(&row, 7, "scope"),
                        client_auth: ClientAuth::parse(&column::<String>(&row, 8, "client_auth")).unwrap_or(ClientAuth::Post),
                    };
                    Some(((column(&row, 1, "id"), column(&row, 9, "version")), (client, grant)))
                })
                .collect()
        })
    })
    .unwrap_or_default();
    let (ids, requests): (Vec<Leased>, Vec<Ask>) = due.into_iter().unzip();
    // At once: one slow token endpoint must not hold up the others.
    let outcomes = runtime.block_on(tokens.request_all(&requests, request_timeout()));
    for ((id, version), outcome) in ids.iter().zip(&outcomes) {
        record(*id, *version, outcome);
    }
    ids.len()
}

/// Seconds until the next credential is due, if any is.
pub fn next_due() -> Option<Duration> {
    let secs =
        in_transaction("next OAuth2 refresh", || Spi::get_one::<f64>("SELECT ihub._oauth2_next_due()").ok().flatten())
            .flatten()?;
    Some(Duration::from_secs_f64(secs.clamp(0.0, 86_400.0)))
}
