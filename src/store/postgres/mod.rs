//! The PostgreSQL backend (`storage.backend = "postgres"`, issue 22): the engine's storage in a
//! database several kyberhook nodes can share. [`connect`] reaches the database (URL, TLS,
//! one-line errors), [`schema`] creates and upgrades its tables (the first node to start does
//! it; newer schemas are refused), and [`store::PgStore`] is the engine's [`crate::store::Storage`]
//! on them.
//!
//! In: the validated [`Config`] (`storage.postgres_url` or `KYBERHOOK_POSTGRES_URL`,
//! `storage.postgres_ca_file`, `cluster.node_name`). Out: a line for `check-config`
//! ([`check`]), an open [`PgStore`] for `serve`, or a [`PgError`] whose
//! [`PgError::exit_code`] says whose the problem is: 2 for the operator (bad URL, refused
//! credentials, no such database, an untrusted certificate, a newer schema, another secrets
//! key), 75 (EX_TEMPFAIL, as for a failing disk) when the database cannot be reached now, 1
//! for anything else.
//!
//! **One node at a time, for now.** Nodes do not yet divide the work between them (the
//! partition leases of [`ownership`] are built and tested, not yet driven by the engine):
//! the node holding the serve lease
//! ([`lease`]) serves, and a second node on the same database waits for it, taking over when
//! the first one's session ends (a crash), it stops, or its lease expires: a warm standby.

pub mod connect;
pub mod lease;
pub mod ownership;
pub mod schema;
pub mod store;

use crate::config::{Backend, Config};

pub use connect::Target;
pub use schema::{Migrated, Server};
pub use store::PgStore;

/// Why the PostgreSQL backend cannot go on, in one line (never the URL's password).
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The operator's to fix: exit code 2.
    #[error("{0}")]
    Config(String),
    /// The database cannot be reached now (refused, timed out, starting, full): exit 75, a
    /// supervisor's restart may succeed.
    #[error("{0}")]
    Unreachable(String),
    /// Anything else the database answered: exit 1.
    #[error("{0}")]
    Failed(String),
}

impl PgError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            PgError::Config(_) => 2,
            PgError::Unreachable(_) => crate::EXIT_STORAGE_FAILED as u8,
            PgError::Failed(_) => 1,
        }
    }
}

/// Whether `config` asks for this backend.
pub fn is_selected(config: &Config) -> bool {
    config.storage.backend == Backend::Postgres
}

/// `check-config` for this backend: connects and reads the schema version, changing nothing.
/// The line to print when the database is reachable and its schema usable by this build.
pub async fn check(config: &Config) -> Result<String, PgError> {
    let target = Target::from_config(config)?;
    let client = target.connect().await?;
    let server_version: String = client
        .query_one("SHOW server_version", &[])
        .await
        .map_err(|e| connect::classify(&e, &target.shown))?
        .get(0);
    let schema = match schema::installed_version(&client, &target.shown).await? {
        Some(v) if v == schema::CURRENT => format!("kyberhook schema version {v}"),
        Some(v) => format!(
            "kyberhook schema version {v} (the next `kyberhook serve` upgrades it to {})",
            schema::CURRENT
        ),
        None => "no kyberhook schema yet (the first `kyberhook serve` creates it)".to_string(),
    };
    Ok(format!(
        "config ok; the database at {} is reachable (PostgreSQL {server_version}); {schema}",
        target.shown
    ))
}
