//! Reaching the database: `storage.postgres_url` parsed and checked, TLS set up, one
//! connection opened, and every failure turned into a one-line [`PgError`] that says whose it
//! is to fix.
//!
//! The URL is a `postgres://` (or `postgresql://`) URL or a libpq `key=value` string, as
//! tokio-postgres reads them. libpq's `sslmode=verify-ca` and `verify-full` are taken as
//! `require`: rustls always verifies the server's chain (system roots plus
//! `storage.postgres_ca_file`) and its host name, whatever the mode, so every mode that uses TLS
//! is libpq's `verify-full`. `prefer` (the default) uses TLS when the server offers it and
//! plaintext when it does not; a certificate that does not verify is refused, never
//! downgraded. Unix-socket hosts (`host=/run/postgresql`) never use TLS. Nothing here ever
//! prints the URL: it may hold a password ([`describe`] names host, port, database and user).
//!
//! Defaults the URL does not set: `connect_timeout` 5 s, `application_name` `kyberhook`, TCP
//! keepalives after 30 s idle. The whole connect (TCP, TLS, authentication) is bounded by
//! [`CONNECT_DEADLINE`] more than the timeout, so a server that accepts and then says nothing
//! cannot hang a start.

use std::path::Path;
use std::time::Duration;

use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::PgError;
use crate::config::Config;

/// The connect timeout when the URL gives none.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How much longer than the connect timeout TLS and authentication may take.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(5);

/// Parses `storage.postgres_url` (after mapping libpq's `verify-ca`/`verify-full` to
/// `require`). The error is one line and never quotes the text (it may hold a password).
pub fn parse_url(text: &str) -> Result<tokio_postgres::Config, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("is empty".into());
    }
    let is_url = text.starts_with("postgres://") || text.starts_with("postgresql://");
    if !is_url && !text.contains('=') {
        return Err(
            "is not a PostgreSQL URL (postgres://USER@HOST:PORT/DATABASE) or a libpq key=value string"
                .into(),
        );
    }
    let config: tokio_postgres::Config =
        normalise_sslmode(text, is_url)
            .parse()
            .map_err(|e: tokio_postgres::Error| {
                let cause = std::error::Error::source(&e)
                    .map(|c| format!(": {c}"))
                    .unwrap_or_default();
                format!("is not a usable PostgreSQL URL ({e}{cause})")
            })?;
    if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
        return Err("names no host (postgres://USER@HOST/DATABASE)".into());
    }
    Ok(config)
}

/// `sslmode=verify-ca|verify-full` → `sslmode=require`, only where `sslmode` is a parameter
/// (the query of a URL, a `key=value` pair), never inside a password.
fn normalise_sslmode(text: &str, is_url: bool) -> String {
    let map = |pair: &str| -> String {
        match pair {
            "sslmode=verify-ca" | "sslmode=verify-full" => "sslmode=require".to_string(),
            other => other.to_string(),
        }
    };
    if is_url {
        match text.split_once('?') {
            Some((base, query)) => {
                let query: Vec<String> = query.split('&').map(map).collect();
                format!("{base}?{}", query.join("&"))
            }
            None => text.to_string(),
        }
    } else {
        // A quoted value may hold spaces; `sslmode` values never do, so splitting on spaces
        // only ever rewrites a whole `sslmode=…` token.
        text.split(' ').map(map).collect::<Vec<_>>().join(" ")
    }
}

/// Where a config points, for messages: `HOST:PORT/DATABASE as USER`, no password.
pub fn describe(config: &tokio_postgres::Config) -> String {
    let ports = config.get_ports();
    let mut hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports
                .get(i)
                .or_else(|| ports.first())
                .copied()
                .unwrap_or(5432);
            match host {
                Host::Tcp(name) if name.contains(':') => format!("[{name}]:{port}"),
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(path) => format!("{}:{port}", path.display()),
            }
        })
        .collect();
    if hosts.is_empty() {
        hosts = config
            .get_hostaddrs()
            .iter()
            .map(|a| format!("{a}:{}", ports.first().copied().unwrap_or(5432)))
            .collect();
    }
    let user = config.get_user().unwrap_or("(OS user)");
    let db = config.get_dbname().unwrap_or(user);
    format!("{}/{db} as {user}", hosts.join(","))
}

/// Everything needed to open connections to the configured database.
#[derive(Clone)]
pub struct Target {
    pub config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    /// [`describe`] of `config`.
    pub shown: String,
    /// How long a session of this node may sit idle inside a transaction before PostgreSQL
    /// ends it (`idle_in_transaction_session_timeout`; `None`: the server's setting).
    idle_in_transaction: Option<Duration>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Target({})", self.shown)
    }
}

impl Target {
    /// The database of a config whose `storage.backend` is `postgres` (validated, so the URL
    /// is there and parses). Reads the CA bundle: an unreadable one is the operator's to fix.
    pub fn from_config(config: &Config) -> Result<Target, PgError> {
        let url = config
            .storage
            .postgres_url
            .as_ref()
            .ok_or_else(|| PgError::Config("storage.postgres_url is not set".into()))?;
        let mut pg = parse_url(url.as_str())
            .map_err(|why| PgError::Config(format!("{}: {why}", url.origin())))?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        if pg.get_application_name().is_none() {
            pg.application_name("kyberhook");
        }
        if pg.get_keepalives() && pg.get_keepalives_idle() > Duration::from_secs(30) {
            pg.keepalives_idle(Duration::from_secs(30));
        }
        let mut target = Target::new(pg, config.storage.postgres_ca_file.as_deref())?;
        // A node stopped (SIGSTOP, a VM pause) in the middle of a write holds its fence's row
        // lock for as long as it stays stopped, and the lock blocks the takeover that would
        // fence it; a standby stopped in its lease check blocks every write of the holder the
        // same way. PostgreSQL ends such a session once it has been idle in its transaction
        // for a lease: its locks go, and what it had not committed never commits.
        target.idle_in_transaction = Some(config.cluster.lease);
        Ok(target)
    }

    /// A target from a parsed config and an optional CA bundle.
    pub fn new(config: tokio_postgres::Config, ca_file: Option<&Path>) -> Result<Target, PgError> {
        let extra: Vec<std::path::PathBuf> = ca_file.map(Path::to_path_buf).into_iter().collect();
        let tls = crate::dispatch::client::tls_client_config(&extra)
            .map_err(|e| PgError::Config(format!("storage.postgres_ca_file: {e}")))?;
        Ok(Target {
            shown: describe(&config),
            config,
            tls: MakeRustlsConnect::new(tls),
            idle_in_transaction: None,
        })
    }

    /// Opens one connection; its I/O runs on a spawned task that ends when the [`Client`] is
    /// dropped. Bounded by the connect timeout plus [`CONNECT_DEADLINE`].
    pub async fn connect(&self) -> Result<Client, PgError> {
        let deadline = self
            .config
            .get_connect_timeout()
            .copied()
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT)
            + CONNECT_DEADLINE;
        let connecting = self.config.connect(self.tls.clone());
        let (client, connection) = match tokio::time::timeout(deadline, connecting).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return Err(classify(&e, &self.shown)),
            Err(_) => {
                return Err(PgError::Unreachable(format!(
                    "cannot reach the database at {}: no answer within {} s",
                    self.shown,
                    deadline.as_secs()
                )))
            }
        };
        let shown = self.shown.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(database = %shown, error = %chain(&e), "database connection ended");
            }
        });
        // No JIT: the engine's statements are short lookups and batch writes, but on small
        // tables the planner has no statistics for yet (kh_lease, kh_partition, UNNEST
        // inputs) their estimates pass jit_above_cost, and a query that runs in 0.2 ms was
        // compiled for 220 ms first (measured: GET /v1/admin/cluster, the idempotency check).
        let mut setup = String::from("SET jit = off");
        if let Some(idle) = self.idle_in_transaction {
            let ms = idle.as_millis().clamp(1, i32::MAX as u128);
            setup.push_str(&format!("; SET idle_in_transaction_session_timeout = {ms}"));
        }
        client
            .batch_execute(&setup)
            .await
            .map_err(|e| classify(&e, &self.shown))?;
        Ok(client)
    }
}

/// An error and its causes in one line (`a: b: c`), each text once.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cause = Some(e);
    while let Some(c) = cause {
        let text = match c.downcast_ref::<tokio_postgres::error::DbError>() {
            Some(db) => format!("{} ({})", db.message(), db.code().code()),
            None => c.to_string(),
        };
        let text = text.replace('\n', " ");
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cause = c.source();
    }
    parts.join(": ")
}

/// The rustls error inside a failed connect, if TLS is what failed.
fn tls_failure<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(tls) = c.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // io::Error's `source` skips the error it wraps; tokio-rustls puts rustls's there.
        if let Some(inner) = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(inner);
        }
        cause = c.source();
    }
    None
}

/// Whose a failed connect or statement is to fix: the operator's ([`PgError::Config`]: wrong
/// credentials, no such database, an untrusted certificate, missing privileges), a passing
/// condition's ([`PgError::Unreachable`]: refused, timed out, the server starting or out of
/// connections), or neither ([`PgError::Failed`]).
pub fn classify(e: &tokio_postgres::Error, target: &str) -> PgError {
    if let Some(db) = e.as_db_error() {
        let text = format!("{} ({})", db.message(), db.code().code());
        let code = db.code();
        let operator = [
            SqlState::INVALID_PASSWORD,
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            SqlState::INVALID_CATALOG_NAME,
            SqlState::INSUFFICIENT_PRIVILEGE,
            SqlState::INVALID_SCHEMA_NAME,
            SqlState::READ_ONLY_SQL_TRANSACTION,
        ];
        let passing = code.code().starts_with("08")
            || [
                SqlState::TOO_MANY_CONNECTIONS,
                SqlState::CANNOT_CONNECT_NOW,
                SqlState::ADMIN_SHUTDOWN,
                SqlState::CRASH_SHUTDOWN,
            ]
            .contains(code);
        return if operator.contains(code) {
            PgError::Config(format!(
                "the database at {target} refused kyberhook: {text}"
            ))
        } else if passing {
            PgError::Unreachable(format!("the database at {target} is not available: {text}"))
        } else {
            PgError::Failed(format!("the database at {target}: {text}"))
        };
    }
    if let Some(tls) = tls_failure(e) {
        return PgError::Config(format!(
            "TLS to the database at {target} failed: {tls} (trust its CA with storage.postgres_ca_file, or put sslmode=disable in the URL for a connection that needs no TLS)"
        ));
    }
    let text = chain(e);
    // tokio-postgres's error kinds are private; their texts are the stable part of the API.
    let top = e.to_string();
    if top.starts_with("error performing TLS handshake")
        || top.starts_with("invalid configuration")
        || top.starts_with("authentication error")
    {
        return PgError::Config(format!("cannot use the database at {target}: {text}"));
    }
    PgError::Unreachable(format!("cannot reach the database at {target}: {text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_key_value_strings_parse_and_bad_ones_say_why_without_quoting() {
        let c = parse_url("postgres://kh:s3cret@db.example.com:6543/hooks?sslmode=verify-full")
            .unwrap();
        assert_eq!(c.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        assert_eq!(describe(&c), "db.example.com:6543/hooks as kh");
        let c = parse_url("host=/run/postgresql user=kh dbname=x sslmode=verify-ca").unwrap();
        assert_eq!(c.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        assert_eq!(describe(&c), "/run/postgresql:5432/x as kh");
        let c = parse_url("postgresql://kh@[::1]/db").unwrap();
        assert_eq!(describe(&c), "[::1]:5432/db as kh");
        assert_eq!(
            parse_url("postgres://kh@h/db").unwrap().get_ssl_mode(),
            tokio_postgres::config::SslMode::Prefer
        );
        // A password that merely contains the text stays as it is.
        let c = parse_url("postgres://kh:sslmode=verify-full@h/db").unwrap();
        assert_eq!(c.get_password(), Some(&b"sslmode=verify-full"[..]));
        for bad in [
            "",
            "   ",
            "mysql://kh:s3cret@h/db",
            "db.example.com",
            "postgres://kh:s3cret@h/db?sslmode=sometimes",
            "postgres://kh:s3cret@h:notaport/db",
            "postgres://kh:s3cret@h/db?nonsense=1",
            "postgres:///db?user=kh&password=s3cret",
        ] {
            let why = parse_url(bad).expect_err(bad);
            assert!(!why.contains('\n'), "{bad:?}: {why}");
            assert!(
                !why.contains("s3cret"),
                "{bad:?} quoted the password: {why}"
            );
        }
    }

    #[test]
    fn debug_of_a_target_and_a_config_url_hide_the_password() {
        let c = crate::config::Config::from_toml(
            "[storage]\nbackend = \"postgres\"\npostgres_url = \"postgres://kh:s3cret@h/db\"\n",
            "t",
        )
        .unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("PostgresUrl(h:5432/db as kh)"), "{shown}");
        let target = Target::from_config(&c).unwrap();
        assert!(!format!("{target:?}").contains("s3cret"));
        assert_eq!(
            target.config.get_connect_timeout(),
            Some(&DEFAULT_CONNECT_TIMEOUT)
        );
    }
}
