//! The PostgreSQL backend (`storage.backend = "postgres"`, issue 22): several kyberhook nodes
//! sharing one database. This is its foundation — reaching the database ([`connect`]: URL,
//! TLS, one-line errors) and its schema ([`schema`]: the tables, created by the first node to
//! start, refused when newer than this build). The engine does not run on it yet: `serve`
//! connects and migrates, then stops with [`PgError::NotInThisBuild`] (exit 2) until the
//! storage trait the engine is being moved behind has a PostgreSQL implementation.
//!
//! In: the validated [`Config`] (`storage.postgres_url` or `KYBERHOOK_POSTGRES_URL`,
//! `storage.postgres_ca_file`, `cluster.node_name`). Out: a line for `check-config`
//! ([`check`]), a migrated schema for `serve` ([`prepare`]), or a [`PgError`] whose
//! [`PgError::exit_code`] says whose the problem is: 2 for the operator (bad URL, refused
//! credentials, no such database, an untrusted certificate, a newer schema), 75 (EX_TEMPFAIL,
//! as for a failing disk) when the database cannot be reached now, 1 for anything else.

pub mod connect;
pub mod schema;

use crate::config::{Backend, Config};

pub use connect::Target;
pub use schema::{Migrated, Server};

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
    /// `serve` on this backend, whose delivery engine is not built yet: exit 2.
    #[error("storage.backend = \"postgres\": the database at {0} is ready (kyberhook schema version {CURRENT}), but the PostgreSQL backend's delivery engine is not in this build yet (issue 22); serve with storage.backend = \"sled\" meanwhile", CURRENT = schema::CURRENT)]
    NotInThisBuild(String),
}

impl PgError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            PgError::Config(_) | PgError::NotInThisBuild(_) => 2,
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

/// What `serve` does on this backend for now: connect, bring the schema to
/// [`schema::CURRENT`] (or refuse a newer one), log what was done, and answer
/// [`PgError::NotInThisBuild`].
pub async fn prepare(config: &Config) -> Result<(Target, Migrated), PgError> {
    let target = Target::from_config(config)?;
    let mut client = target.connect().await?;
    let node = config.cluster.node_name();
    let (migrated, server) = schema::migrate(&mut client, &node, &target.shown).await?;
    let done = match migrated {
        Migrated::Created => "created".to_string(),
        Migrated::Upgraded(from) => format!("upgraded from version {from}"),
        Migrated::UpToDate => "up to date".to_string(),
    };
    tracing::info!(
        database = %target.shown,
        node = %node,
        server = ?server,
        version = schema::CURRENT,
        "kyberhook schema {done}"
    );
    Ok((target, migrated))
}

/// `serve` with `storage.backend = "postgres"` in this build: [`prepare`], then the honest
/// refusal. Always an error; its exit code is the process's.
pub async fn serve(config: &Config) -> PgError {
    match prepare(config).await {
        Ok((target, _)) => PgError::NotInThisBuild(target.shown),
        Err(e) => e,
    }
}
