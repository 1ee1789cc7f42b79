//! Configuration: the `config.toml` of the contract, parsed once at start-up, validated, and
//! shared read-only (`Arc<Config>`) by every stage of the pipeline.
//!
//! Enters as TOML text (a file, or nothing) plus the `KYBERHOOK_ADMIN_TOKEN` environment
//! override. The text is laid over the built-in defaults ([`DEFAULTS_TOML`], compiled in from
//! `src/config/defaults.toml`, the one place a default is written), key by key, then read into
//! typed sections; each section validates its own keys, and [`Config`] the rules that span
//! sections. Leaves as a typed [`Config`] with durations, addresses and CIDRs already parsed.
//! Unknown keys, wrong types and refused values give a one-line [`ConfigError`] that names the
//! file, line and key, which `main` turns into exit code 2.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

/// The built-in defaults: every key of every section with its default (keys unset by default
/// are commented out there). `events.catalog` is the exception: its default is
/// [`DEFAULT_EVENT_CATALOG`], filled in by [`defaults`].
pub const DEFAULTS_TOML: &str = include_str!("config/defaults.toml");

/// The admin token earlier versions shipped in `config.toml`: known to everyone, so refused
/// wherever it is given (and it is shorter than [`MIN_ADMIN_TOKEN_CHARS`] anyway).
pub const FORMER_DEFAULT_ADMIN_TOKEN: &str = "change-me";

/// The shortest admin token accepted: 32 characters, so that a token guessed at the API's
/// refusal rate (see `api::guard`) stays out of reach.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 32;

/// The 21 event types of the KyberAccess webhook guide: the default `events.catalog`. The names
/// live in the event table of [`crate::catalog`].
pub const DEFAULT_EVENT_CATALOG: [&str; 21] = crate::catalog::GUIDE_EVENT_TYPES;

/// Where error messages say the built-in defaults came from.
const BUILT_IN: &str = "built-in defaults";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read config file: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Parse {
        path: String,
        line: usize,
        message: String,
    },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: String,
        key: String,
        message: String,
    },
}

/// A value a section refuses: the key inside the section, and why (one line). [`Config`] adds
/// the section and the file.
#[derive(Debug)]
struct Invalid {
    key: String,
    message: String,
}

fn refuse(key: &str, message: impl Into<String>) -> Result<(), Invalid> {
    Err(Invalid {
        key: key.to_string(),
        message: message.into(),
    })
}

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub metrics: MetricsConfig,
    pub storage: StorageConfig,
    pub cluster: ClusterConfig,
    pub auth: AuthConfig,
    pub delivery: DeliveryConfig,
    pub plans: BTreeMap<String, Plan>,
    pub events: EventsConfig,
    pub log: LogConfig,
    /// Not read from the file: the dashboard's session and sign-in limits are product rules;
    /// tests shorten them.
    pub ui: UiLimits,
}

/// The dashboard's session lifetimes and failed-sign-in limit.
#[derive(Debug, Clone)]
pub struct UiLimits {
    /// A session unused this long ends.
    pub session_idle: Duration,
    /// A session ends this long after sign-in, however busy.
    pub session_absolute: Duration,
    /// Sign-in attempts one client address may make per minute.
    pub login_attempts_per_minute: u32,
}

impl Default for UiLimits {
    fn default() -> Self {
        UiLimits {
            session_idle: Duration::from_secs(30 * 60),
            session_absolute: Duration::from_secs(12 * 3600),
            login_attempts_per_minute: 10,
        }
    }
}

// The section structs carry no defaults of their own: every key reaches them from the file or
// from DEFAULTS_TOML (an `Option` key left out of both is `None`, unset). A key missing from
// both is a "missing field" error on every start, which the unit tests catch first.

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Events that may wait in the write-ahead queue; beyond it ingest answers 503.
    pub ingest_queue: usize,
    /// How long a client may take to send its request head (slowloris bound).
    #[serde(deserialize_with = "de_duration")]
    pub header_read_timeout: Duration,
    /// How long a client may take to send a whole request body (after its head); past it the
    /// request is answered 408 and the connection closed.
    #[serde(deserialize_with = "de_duration")]
    pub body_read_timeout: Duration,
    /// How long a client may leave an answer unread (no byte of it accepted) before the
    /// connection is cut off: a stalled reader must not pin a backup or a response buffer.
    #[serde(deserialize_with = "de_duration")]
    pub send_timeout: Duration,
    /// Host names the API answers to besides the listen address, `localhost` and loopback
    /// literals; any other `Host` gets 421 (DNS rebinding).
    #[serde(deserialize_with = "de_hosts")]
    pub public_hosts: Vec<String>,
}

impl ServerConfig {
    fn validate(&self) -> Result<(), Invalid> {
        if self.max_body_bytes < 1024 {
            return refuse("max_body_bytes", "must be at least 1024");
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return refuse(
                "tls_cert",
                "server.tls_cert and server.tls_key must be set together",
            );
        }
        if self.header_read_timeout.is_zero() {
            return refuse("header_read_timeout", "must be greater than zero");
        }
        if self.body_read_timeout.is_zero() {
            return refuse("body_read_timeout", "must be greater than zero");
        }
        if self.send_timeout.is_zero() {
            return refuse("send_timeout", "must be greater than zero");
        }
        if self.ingest_queue == 0 {
            return refuse("ingest_queue", "must be at least 1");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
}

impl MetricsConfig {
    fn validate(&self) -> Result<(), Invalid> {
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    pub path: PathBuf,
    #[serde(deserialize_with = "de_duration")]
    pub retention: Duration,
    /// Make every acknowledged write power-safe (fdatasync after sled's flush). Only turn off
    /// for throw-away benchmarks.
    pub fsync: bool,
    /// sled's page cache in bytes: an integer, or a string with a unit (`"64MiB"`).
    #[serde(deserialize_with = "de_bytes")]
    pub cache_size: u64,
    /// A file holding the key that seals webhook secrets (64 hex digits or base64 of 32
    /// bytes). `KYBERHOOK_SECRETS_KEY` wins when set; with neither, the key is `secrets.key`
    /// in the data dir, generated on first start.
    pub secrets_key_file: Option<PathBuf>,
    /// Where the engine keeps its state: the embedded sled store under `path`, or a shared
    /// PostgreSQL database (`postgres_url`) that several nodes use together.
    pub backend: Backend,
    /// The PostgreSQL database of `backend = "postgres"`: a `postgres://` URL or a libpq
    /// `key=value` string. `KYBERHOOK_POSTGRES_URL` wins when set (and not empty).
    pub postgres_url: Option<PostgresUrl>,
    /// A PEM CA bundle trusted for the database's TLS certificate, besides the system roots.
    pub postgres_ca_file: Option<PathBuf>,
}

/// `storage.backend`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sled,
    Postgres,
}

/// `storage.postgres_url`: it may hold a password, so its `Debug` shows only where it points.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct PostgresUrl {
    text: String,
    /// Whether it came from [`POSTGRES_URL_ENV`] (error messages name the variable).
    #[serde(skip)]
    from_env: bool,
}

impl PostgresUrl {
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Where the value came from, for messages: the key or the environment variable.
    pub fn origin(&self) -> &'static str {
        if self.from_env {
            POSTGRES_URL_ENV
        } else {
            "storage.postgres_url"
        }
    }
}

impl std::fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match crate::store::postgres::connect::parse_url(&self.text) {
            Ok(parsed) => write!(
                f,
                "PostgresUrl({})",
                crate::store::postgres::connect::describe(&parsed)
            ),
            Err(_) => f.write_str("PostgresUrl(<unparsable>)"),
        }
    }
}

/// The environment variable that replaces `storage.postgres_url`.
pub const POSTGRES_URL_ENV: &str = "KYBERHOOK_POSTGRES_URL";

impl StorageConfig {
    fn validate(&self) -> Result<(), Invalid> {
        if self.retention.is_zero() {
            return refuse("retention", "must be greater than zero");
        }
        if self.cache_size < 1 << 20 {
            return refuse("cache_size", "must be at least 1MiB");
        }
        if let Some(url) = &self.postgres_url {
            if let Err(why) = crate::store::postgres::connect::parse_url(url.as_str()) {
                let key = if url.from_env {
                    format!("postgres_url (from {POSTGRES_URL_ENV})")
                } else {
                    "postgres_url".to_string()
                };
                return refuse(&key, why);
            }
        }
        if self.backend == Backend::Postgres && self.postgres_url.is_none() {
            return refuse(
                "postgres_url",
                format!(
                    "must be set when storage.backend = \"postgres\" (a URL like \"postgres://kyberhook@db.example.com/kyberhook\", or {POSTGRES_URL_ENV})"
                ),
            );
        }
        Ok(())
    }
}

/// `[cluster]`: how this node is known to the others sharing a PostgreSQL backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's name in `GET /v1/admin/cluster` and the logs; unset: the host name.
    pub node_name: Option<String>,
    /// The base URL other nodes reach this one's API on (`http://10.0.0.5:8080`), if set.
    pub advertise: Option<String>,
    /// How long the serving node's lease on the database lasts unrenewed: a node that stops
    /// renewing (hung, cut off) is taken over this long after its last renewal, and stops
    /// writing by then itself. Renewed every fifth of it.
    #[serde(deserialize_with = "de_duration")]
    pub lease: Duration,
    /// Whether nodes divide the partitions of accounts (each runs the deliveries of its own)
    /// rather than one serving and the others standing by (`crate::handover`).
    pub divide_work: bool,
}

impl ClusterConfig {
    /// The longest node name accepted.
    pub const MAX_NODE_NAME: usize = 64;

    fn validate(&self) -> Result<(), Invalid> {
        if let Some(name) = &self.node_name {
            if !crate::ids::is_safe_token(name, Self::MAX_NODE_NAME) {
                return refuse(
                    "node_name",
                    format!(
                        "{name:?} is not a node name: 1 to {} characters of A-Z a-z 0-9 _ . -",
                        Self::MAX_NODE_NAME
                    ),
                );
            }
        }
        if let Some(url) = &self.advertise {
            if let Err(why) = parse_advertise(url) {
                return refuse("advertise", why);
            }
        }
        if self.lease < Duration::from_secs(1) || self.lease > Duration::from_secs(300) {
            return refuse(
                "lease",
                format!(
                    "{} is out of range: from 1s to 300s",
                    humantime::format_duration(self.lease)
                ),
            );
        }
        Ok(())
    }

    /// `node_name`, else the host name (else `kyberhook`, on a host without one).
    pub fn node_name(&self) -> String {
        if let Some(name) = &self.node_name {
            return name.clone();
        }
        let uname = rustix::system::uname();
        let host = uname.nodename().to_string_lossy();
        let host: String = host
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
            .take(Self::MAX_NODE_NAME)
            .collect();
        if host.is_empty() {
            "kyberhook".to_string()
        } else {
            host
        }
    }
}

/// `cluster.advertise`: an `http://` or `https://` URL with a host (and a port if not the
/// scheme's), nothing after it but an optional `/`.
pub fn parse_advertise(text: &str) -> Result<http::Uri, String> {
    let bad = || {
        format!(
            "{text:?} is not a base URL like \"http://10.0.0.5:8080\" (http or https, a host, an optional port, no path)"
        )
    };
    let uri: http::Uri = text.parse().map_err(|_| bad())?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    let path_ok = matches!(uri.path(), "" | "/") && uri.query().is_none();
    let host_ok = uri.host().is_some_and(|h| !h.is_empty());
    let no_userinfo = !uri.authority().is_some_and(|a| a.as_str().contains('@'));
    if scheme_ok && path_ok && host_ok && no_userinfo {
        Ok(uri)
    } else {
        Err(bad())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `None` until resolved: with no token in the file, the environment or
    /// `admin_token_file`, the engine generates one into the data dir at start
    /// ([`crate::admin_token`]).
    #[serde(default)]
    pub admin_token: Option<String>,
    /// A file holding the admin token (surrounding whitespace ignored), read at start; it
    /// replaces `admin_token`, so the token stays out of a world-readable config (the Debian
    /// package generates `/etc/kyberhook/admin-token`). `KYBERHOOK_ADMIN_TOKEN` wins over both.
    pub admin_token_file: Option<PathBuf>,
}

impl AuthConfig {
    fn validate(&self) -> Result<(), Invalid> {
        match &self.admin_token {
            Some(token) => check_admin_token(token).or_else(|m| refuse("admin_token", &m)),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
    #[serde(deserialize_with = "de_durations")]
    pub retry_schedule: Vec<Duration>,
    pub auto_disable_after: u32,
    pub require_https: bool,
    pub extra_ca_files: Vec<PathBuf>,
    #[serde(deserialize_with = "de_cidrs")]
    pub private_network_allowlist: Vec<IpNet>,
    pub max_in_flight: usize,
    /// The ceiling of each webhook's adaptive concurrency limit (see `dispatch::concurrency`):
    /// a safety bound, not the operating point — each limit starts at 64 and grows only while
    /// its endpoint keeps up.
    pub max_in_flight_per_webhook: usize,
    /// Bytes of an endpoint's response body kept in the delivery log.
    pub max_response_body_bytes: usize,
    /// Deliveries that may wait for a future attempt before ingest answers 503.
    pub max_scheduled: usize,
    /// Deliveries of one account that may wait for an attempt before that account's ingest
    /// answers 429 (see `backlog`).
    pub max_scheduled_per_account: u64,
    /// Test sends one account may run at once (more get 429), so that its tests cannot take
    /// the engine's in-flight slots from other accounts' deliveries.
    pub max_test_sends_per_account: usize,
    /// Event types whose deliveries go ahead of the account's other queued deliveries: exact
    /// names, `family.*` or `*` (see [`Config::is_priority`]).
    pub priority_events: Vec<String>,
    /// Push-back ([`crate::pushback`]): while deliveries lag further than this behind ingest,
    /// new events (other than `priority_events`) are held before they are committed. 0: off.
    #[serde(deserialize_with = "de_duration")]
    pub max_lag: Duration,
    /// The longest an event is held for `max_lag`; then it is refused with 503.
    #[serde(deserialize_with = "de_duration")]
    pub max_lag_hold: Duration,
}

impl DeliveryConfig {
    fn validate(&self) -> Result<(), Invalid> {
        if self.max_lag_hold.is_zero() || self.max_lag_hold > Duration::from_secs(60) {
            return refuse(
                "max_lag_hold",
                "must be between 1ms and 60s (a held request still waits for its answer)",
            );
        }
        if self.timeout.is_zero() {
            return refuse("timeout", "must be greater than zero");
        }
        if self.max_in_flight == 0 {
            return refuse("max_in_flight", "must be at least 1");
        }
        if self.max_in_flight_per_webhook == 0 {
            return refuse("max_in_flight_per_webhook", "must be at least 1");
        }
        if self.max_scheduled_per_account == 0 {
            return refuse("max_scheduled_per_account", "must be at least 1");
        }
        if self.max_test_sends_per_account == 0 {
            return refuse("max_test_sends_per_account", "must be at least 1");
        }
        for p in &self.priority_events {
            // Not checked against the catalog: the default names families an operator's
            // catalog may leave out, and a pattern matching nothing is harmless.
            let name = p.strip_suffix(".*").unwrap_or(p);
            if p != "*"
                && (name.is_empty() || name.contains('*') || name.contains(char::is_whitespace))
            {
                return refuse(
                    "priority_events",
                    format!("{p:?} is not an event type, a family wildcard like \"emergency.*\", or \"*\""),
                );
            }
        }
        if self.auto_disable_after == 0 {
            return refuse("auto_disable_after", "must be at least 1");
        }
        if self.retry_schedule.len() > 100 {
            return refuse("retry_schedule", "at most 100 retries");
        }
        Ok(())
    }
}

/// One plan (`[plans.NAME]`); an operator's plan replaces the built-in one of that name whole.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// `None`: unlimited.
    pub max_webhooks: Option<u32>,
    /// Deliveries per second to the account's endpoints, all webhooks together. 0: unlimited.
    pub events_per_second: u32,
}

/// The plans: their names (the map's keys) are ids that accounts store.
fn validate_plans(plans: &BTreeMap<String, Plan>) -> Result<(), Invalid> {
    for name in plans.keys() {
        if !crate::ids::is_safe_token(name, 32) {
            return refuse(name, "plan names are [A-Za-z0-9_-]");
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    pub catalog: Vec<String>,
}

impl EventsConfig {
    fn validate(&self) -> Result<(), Invalid> {
        if self.catalog.is_empty() {
            return refuse("catalog", "must name at least one event type");
        }
        for name in &self.catalog {
            if !crate::model::is_valid_event_name(name) {
                return refuse(
                    "catalog",
                    format!("{name:?} is not an event name like \"family.action\""),
                );
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `RUST_LOG`-style filter; the `RUST_LOG` environment variable wins when set.
    /// Whitespace around each comma-separated directive is dropped (see [`trim_directives`]).
    #[serde(deserialize_with = "de_log_filter")]
    pub level: String,
}

impl LogConfig {
    fn validate(&self) -> Result<(), Invalid> {
        if log_filter(&self.level).is_err() {
            return refuse("level", "is not a valid filter (e.g. \"info\")");
        }
        Ok(())
    }
}

/// The file's shape: one field per section.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: ServerConfig,
    metrics: MetricsConfig,
    storage: StorageConfig,
    cluster: ClusterConfig,
    auth: AuthConfig,
    delivery: DeliveryConfig,
    plans: BTreeMap<String, Plan>,
    events: EventsConfig,
    log: LogConfig,
}

/// [`DEFAULTS_TOML`] parsed, with `events.catalog` filled in from [`DEFAULT_EVENT_CATALOG`].
fn defaults() -> &'static toml_edit::Table {
    static DEFAULTS: OnceLock<toml_edit::Table> = OnceLock::new();
    DEFAULTS.get_or_init(|| {
        let mut table = toml_edit::ImDocument::parse(DEFAULTS_TOML)
            .expect("src/config/defaults.toml is valid TOML (tested)")
            .into_table();
        let catalog: toml_edit::Array = DEFAULT_EVENT_CATALOG.iter().copied().collect();
        table["events"]["catalog"] = toml_edit::value(catalog);
        table
    })
}

/// Lays `file` over the defaults: each section the file leaves out comes whole from the
/// defaults, and each key it leaves out of a section it has. A key it sets replaces the default
/// whole (an array, a plan), so `[plans.starter]` must give the plan's every required key.
/// Whatever the file holds keeps its position in the file's text for error messages.
fn lay_over_defaults(file: &mut toml_edit::Table) {
    for (section, default) in defaults().iter() {
        let Some(mine) = file.get_mut(section) else {
            file.insert(section, default.clone());
            continue;
        };
        // A section that is not a table (`server = 5`) is left for deserialization to refuse.
        if let (Some(mine), Some(default)) = (mine.as_table_like_mut(), default.as_table_like()) {
            for (key, value) in default.iter() {
                if !mine.contains_key(key) {
                    mine.insert(key, value.clone());
                }
            }
        }
    }
}

/// Parses a duration with a unit: `500ms`, `30s`, `5m`, `2h`, `30d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("duration {text:?} has no unit (use ms, s, m, h or d)"))?;
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("duration {text:?} does not start with a number"))?;
    let ms_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "duration {text:?} has unknown unit {unit:?} (use ms, s, m, h or d)"
            ))
        }
    };
    n.checked_mul(ms_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("duration {text:?} is too large"))
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

/// Parses a size: bytes without a unit, or with `B`, `KiB`, `MiB`, `GiB` (`"64MiB"`).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("size {text:?} does not start with a number"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        other => {
            return Err(format!(
                "size {text:?} has unknown unit {other:?} (use B, KiB, MiB or GiB)"
            ))
        }
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

fn de_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Bytes(n) => Ok(n),
        Size::Text(t) => parse_bytes(&t).map_err(serde::de::Error::custom),
    }
}

fn de_durations<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    let texts = Vec::<String>::deserialize(d)?;
    texts
        .iter()
        .map(|t| parse_duration(t).map_err(serde::de::Error::custom))
        .collect()
}

fn de_log_filter<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    String::deserialize(d).map(|text| trim_directives(&text))
}

/// `"info, kyberhook=debug"` -> `"info,kyberhook=debug"`. tracing-subscriber's `EnvFilter`
/// does not trim its directives (tokio-rs/tracing#2452): it walks the trimmed text but slices
/// the untrimmed one, so `" hyper=warn"` is refused and a leading space before a multi-byte
/// character panics (found by `fuzz/` target `config`).
pub fn trim_directives(filter: &str) -> String {
    filter
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect::<Vec<_>>()
        .join(",")
}

/// A `RUST_LOG`-style filter as the engine uses it (`log.level`, `RUST_LOG`): directives trimmed
/// ([`trim_directives`]), and field values matched literally rather than as regular expressions.
/// tracing-subscriber compiles such a regex into a dense DFA, which took 27 s for a 200-byte
/// `log.level` (found by `fuzz/` target `config`); its docs advise turning regexes off for
/// untrusted input.
pub fn log_filter(
    directives: &str,
) -> Result<tracing_subscriber::EnvFilter, tracing_subscriber::filter::ParseError> {
    tracing_subscriber::EnvFilter::builder()
        .with_regex(false)
        .parse(trim_directives(directives))
}

/// The environment variable that replaces `auth.admin_token`.
pub const ADMIN_TOKEN_ENV: &str = "KYBERHOOK_ADMIN_TOKEN";

/// Refuses an admin token that is known or short enough to guess: the former default, anything
/// under [`MIN_ADMIN_TOKEN_CHARS`], and whitespace inside (it could not be sent in a header).
pub fn check_admin_token(token: &str) -> Result<(), String> {
    if token == FORMER_DEFAULT_ADMIN_TOKEN {
        return Err(format!(
            "{FORMER_DEFAULT_ADMIN_TOKEN:?} is known to everyone and refused; remove the key to have one generated into the data dir, or set a random token of at least {MIN_ADMIN_TOKEN_CHARS} characters (or {ADMIN_TOKEN_ENV})"
        ));
    }
    if token.chars().count() < MIN_ADMIN_TOKEN_CHARS {
        return Err(format!(
            "must be at least {MIN_ADMIN_TOKEN_CHARS} characters (this one has {}); remove the key to have one generated into the data dir (or set {ADMIN_TOKEN_ENV})",
            token.chars().count()
        ));
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain spaces or control characters".into());
    }
    Ok(())
}

fn de_hosts<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let texts = Vec::<String>::deserialize(d)?;
    texts
        .iter()
        .map(|t| parse_host_name(t).map_err(serde::de::Error::custom))
        .collect()
}

/// A DNS name for `server.public_hosts`, lowercased: letters, digits, `-` and `.`, no port.
pub fn parse_host_name(text: &str) -> Result<String, String> {
    let name = text.trim().trim_end_matches('.').to_ascii_lowercase();
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if valid {
        Ok(name)
    } else {
        Err(format!(
            "{text:?} is not a host name like \"hooks.example.com\" (no scheme, port or path)"
        ))
    }
}

fn de_cidrs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    let texts = Vec::<String>::deserialize(d)?;
    texts
        .iter()
        .map(|t| parse_cidr(t).map_err(serde::de::Error::custom))
        .collect()
}

/// A CIDR (`10.0.0.0/8`) or a bare address (taken as a /32 or /128).
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    text.parse::<std::net::IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{text:?} is not a CIDR (e.g. \"10.0.0.0/8\") or an IP address"))
}

/// The dotted key (`storage.retention`) of the `key = value` line holding byte `offset`.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next()?;
    let key = line.split_once('=')?.0.trim();
    if key.is_empty() || key.starts_with('[') || key.starts_with('#') {
        return None;
    }
    let section = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && !l.starts_with("[["))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    Some(match section {
        Some(s) => format!("{s}.{key}"),
        None => key.to_string(),
    })
}

impl Config {
    /// The built-in defaults, as a file that sets nothing gets them.
    pub fn default_config() -> Config {
        Config::from_toml("", BUILT_IN).expect("the built-in defaults are valid (tested)")
    }

    /// Reads a config file, applies the environment override, then validates the result.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Config::from_toml_and_env(&text, &shown)
    }

    /// The built-in defaults with the environment override, validated: what `serve` runs on
    /// without a config file.
    pub fn load_default() -> Result<Config, ConfigError> {
        Config::from_toml_and_env("", BUILT_IN)
    }

    /// The override is applied before validation, so a short token in the file is fine when
    /// `KYBERHOOK_ADMIN_TOKEN` replaces it (and a short one in the environment is refused).
    fn from_toml_and_env(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let mut config = Config::parse(text, origin)?;
        if let Ok(token) = std::env::var(ADMIN_TOKEN_ENV) {
            config.auth.admin_token = Some(token);
        }
        // Empty counts as unset: an `EnvironmentFile` line left blank must not hide the file's.
        if let Some(url) = std::env::var(POSTGRES_URL_ENV)
            .ok()
            .filter(|u| !u.is_empty())
        {
            config.storage.postgres_url = Some(PostgresUrl {
                text: url,
                from_env: true,
            });
        }
        config.validate(origin)?;
        Ok(config)
    }

    /// Parses and validates TOML text; `origin` names the file in error messages.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config = Config::parse(text, origin)?;
        config.validate(origin)?;
        Ok(config)
    }

    fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let located = |span: Option<Range<usize>>, message: &str| {
            // Spans come from the file's text (defaults never fail); clamped all the same, so a
            // stray one cannot slice inside a character.
            let mut start = span.map_or(0, |s| s.start.min(text.len()));
            while !text.is_char_boundary(start) {
                start -= 1;
            }
            let line = text[..start].matches('\n').count() + 1;
            let message = message.replace('\n', " ").trim().to_string();
            let message = match key_at(text, start) {
                Some(key) if !message.contains(&key) => format!("{key}: {message}"),
                _ => message,
            };
            ConfigError::Parse {
                path: origin.to_string(),
                line,
                message,
            }
        };
        let mut table = toml_edit::ImDocument::parse(text)
            .map_err(|e| located(e.span(), e.message()))?
            .into_table();
        lay_over_defaults(&mut table);
        let raw: RawConfig = toml_edit::de::from_document(toml_edit::DocumentMut::from(table))
            .map_err(|e| located(e.span(), e.message()))?;
        let config = Config {
            server: raw.server,
            metrics: raw.metrics,
            storage: raw.storage,
            cluster: raw.cluster,
            auth: raw.auth,
            delivery: raw.delivery,
            plans: raw.plans,
            events: raw.events,
            log: raw.log,
            ui: UiLimits::default(),
        };
        // The token file is read here, so the environment override and validation see it.
        config.with_admin_token_file(origin)
    }

    /// Reads `auth.admin_token_file`, if set, into `auth.admin_token`.
    fn with_admin_token_file(mut self, origin: &str) -> Result<Config, ConfigError> {
        let Some(path) = &self.auth.admin_token_file else {
            return Ok(self);
        };
        let bad = |message: String| ConfigError::Invalid {
            path: origin.to_string(),
            key: "auth.admin_token_file".to_string(),
            message,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
        let token = text.trim();
        if token.is_empty() || token.contains(char::is_whitespace) {
            return Err(bad(format!(
                "{} must hold one token (no spaces inside)",
                path.display()
            )));
        }
        self.auth.admin_token = Some(token.to_string());
        Ok(self)
    }

    /// Each section's own checks, then the rules that span sections.
    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let sections = [
            ("auth", self.auth.validate()),
            ("server", self.server.validate()),
            ("metrics", self.metrics.validate()),
            ("storage", self.storage.validate()),
            ("cluster", self.cluster.validate()),
            ("delivery", self.delivery.validate()),
            ("plans", validate_plans(&self.plans)),
            ("events", self.events.validate()),
            ("log", self.log.validate()),
        ];
        for (section, checked) in sections {
            if let Err(Invalid { key, message }) = checked {
                return Err(ConfigError::Invalid {
                    path: origin.to_string(),
                    key: format!("{section}.{key}"),
                    message,
                });
            }
        }
        Ok(())
    }

    /// Whether deliveries of `event` jump the account's queue (`delivery.priority_events`).
    pub fn is_priority(&self, event: &str) -> bool {
        self.delivery.priority_events.iter().any(|p| {
            p == "*"
                || p == event
                || p.strip_suffix(".*")
                    .is_some_and(|family| crate::model::event_family(event) == family)
        })
    }

    /// The retry delay after failed attempt number `attempt` (1-based), or `None` when the
    /// schedule is exhausted.
    pub fn retry_delay(&self, attempt: u32) -> Option<Duration> {
        let idx = usize::try_from(attempt).ok()?.checked_sub(1)?;
        self.delivery.retry_schedule.get(idx).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, "test.toml")
    }

    #[test]
    fn shipped_default_is_valid_and_matches_the_contract() {
        let c = Config::default_config();
        assert_eq!(c.server.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.server.max_body_bytes, 1_048_576);
        assert_eq!(c.metrics.listen.port(), 9464);
        assert_eq!(c.storage.path, PathBuf::from("data"));
        assert_eq!(c.storage.retention, Duration::from_secs(30 * 86_400));
        assert_eq!(c.delivery.max_scheduled_per_account, 1_000_000);
        assert_eq!(c.delivery.timeout, Duration::from_secs(30));
        assert_eq!(c.server.body_read_timeout, Duration::from_secs(30));
        assert_eq!(
            c.delivery.retry_schedule,
            vec![
                Duration::from_secs(60),
                Duration::from_secs(300),
                Duration::from_secs(1800),
                Duration::from_secs(7200),
                Duration::from_secs(43_200)
            ]
        );
        assert_eq!(c.delivery.auto_disable_after, 100);
        assert!(c.delivery.require_https);
        assert_eq!(c.delivery.max_in_flight, 1024);
        assert_eq!(c.plans["starter"].max_webhooks, Some(3));
        assert_eq!(c.plans["professional"].events_per_second, 50);
        assert_eq!(c.plans["enterprise"].max_webhooks, None);
        assert_eq!(c.events.catalog.len(), 21);
    }

    #[test]
    fn the_admin_token_file_replaces_the_token_and_bad_files_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("admin-token");
        std::fs::write(&file, "  a-secret-from-the-file-0123456789abcdef\n").unwrap();
        let toml = format!(
            "[auth]\nadmin_token = \"in-the-config\"\nadmin_token_file = {:?}\n",
            file.display().to_string()
        );
        assert_eq!(
            parse(&toml).unwrap().auth.admin_token.as_deref(),
            Some("a-secret-from-the-file-0123456789abcdef")
        );

        std::fs::write(&file, "two tokens\n").unwrap();
        let err = parse(&toml).unwrap_err().to_string();
        assert!(err.contains("auth.admin_token_file"), "{err}");
        std::fs::write(&file, "short").unwrap();
        let err = parse(&toml).unwrap_err().to_string();
        assert!(err.contains("auth.admin_token"), "{err}");
        std::fs::remove_file(&file).unwrap();
        let err = parse(&toml).unwrap_err().to_string();
        assert!(
            err.contains("auth.admin_token_file") && err.contains("cannot read"),
            "{err}"
        );
    }

    #[test]
    fn empty_file_gives_contract_defaults() {
        let c = parse("").unwrap();
        assert_eq!(
            c.auth.admin_token, None,
            "generated into the data dir at start"
        );
        assert_eq!(c.plans.len(), 3);
        assert_eq!(c.events.catalog.len(), 21);
        assert_eq!(c.retry_delay(1), Some(Duration::from_secs(60)));
        assert_eq!(c.retry_delay(5), Some(Duration::from_secs(43_200)));
        assert_eq!(c.retry_delay(6), None);
        assert_eq!(c.retry_delay(0), None);
    }

    #[test]
    fn durations_take_every_unit_and_refuse_others() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(
            parse_duration("30d").unwrap(),
            Duration::from_secs(2_592_000)
        );
        for bad in [
            "",
            "10",
            "ms",
            "1w",
            "1.5s",
            "-1s",
            "1 s x",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn log_level_is_trimmed_and_matches_fields_literally() {
        let c = parse("[log]\nlevel = \" info, kyberhook=debug ,, hyper=warn \"\n").unwrap();
        assert_eq!(c.log.level, "info,kyberhook=debug,hyper=warn");
        // Both used to panic inside tracing-subscriber (a slice inside 'Δ').
        let err = parse("[log]\nlevel = \"info, xΔ[\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("log.level"), "{err}");
        let c = parse("[log]\nlevel = \" xΔ=warn\"\n").unwrap();
        assert_eq!(c.log.level, "xΔ=warn");
        // Field values are matched literally, not compiled as regexes: this one (from the
        // fuzzer, file fuzz/regressions/config/log-level-regex-dfa.toml) took 5 s to refuse.
        let slow = concat!(
            "[log]\nlevel = \"   [ yle filt U w{RS=BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB",
            "...............................................................",
            "BBBBBBBBBBBBBBBBBBBBBB<BBBBBBBBBBBBBBBBBBBBBBBBBBBlevel5=========",
            "level===========`w{}}hen s \"\n"
        );
        let started = std::time::Instant::now();
        let err = parse(slow).unwrap_err().to_string();
        assert!(err.contains("log.level"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn unknown_key_names_the_key_and_line() {
        let err = parse("[server]\nlisten = \"127.0.0.1:1\"\nlissten = 3\n").unwrap_err();
        let line = err.to_string();
        assert!(line.starts_with("test.toml:3:"), "{line}");
        assert!(line.contains("lissten"), "{line}");
        assert!(!line.contains('\n'));
        let err = parse("[nope]\n").unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn priority_events_match_names_families_and_everything() {
        let c = Config::default_config();
        assert!(c.is_priority("emergency.lockdown_activated"));
        assert!(c.is_priority("screening.watchlist_hit"));
        assert!(!c.is_priority("visitor.checked_in"));
        assert!(!c.is_priority("emergencyx.a"));
        let c = Config::from_toml(
            "[delivery]\npriority_events = [\"visitor.checked_in\"]\n[auth]\nadmin_token = \"unit-test-token-0123456789abcdefghij\"\n",
            "t",
        )
        .unwrap();
        assert!(c.is_priority("visitor.checked_in"));
        assert!(!c.is_priority("emergency.lockdown_activated"));
    }

    #[test]
    fn wrong_types_and_bad_values_are_refused() {
        let cases = [
            ("[server]\nlisten = 8080\n", "test.toml:2"),
            ("[server]\nlisten = \"not an address\"\n", "test.toml:2"),
            ("[delivery]\ntimeout = \"30 parsecs\"\n", "delivery.timeout"),
            ("[storage]\nretention = \"30 days\"\n", "storage.retention"),
            ("[delivery]\nretry_schedule = [\"1m\", 5]\n", "test.toml:2"),
            (
                "[delivery]\nprivate_network_allowlist = [\"10.0.0.0/33\"]\n",
                "CIDR",
            ),
            ("[delivery]\nmax_in_flight = 0\n", "delivery.max_in_flight"),
            (
                "[delivery]\npriority_events = [\"emergency*\"]\n",
                "delivery.priority_events",
            ),
            (
                "[delivery]\npriority_events = [\".*\"]\n",
                "delivery.priority_events",
            ),
            ("[delivery]\npriority_events = \"x.*\"\n", "test.toml:2"),
            (
                "[delivery]\nmax_scheduled_per_account = 0\n",
                "delivery.max_scheduled_per_account",
            ),
            (
                "[server]\nbody_read_timeout = \"0s\"\n",
                "server.body_read_timeout",
            ),
            (
                "[server]\nbody_read_timeout = \"soon\"\n",
                "server.body_read_timeout",
            ),
            ("[plans.gold]\nmax_webhooks = 5\n", "events_per_second"),
            ("[auth]\nadmin_token = \"x\"\n", "auth.admin_token"),
            ("[events]\ncatalog = []\n", "events.catalog"),
            ("[log]\nformat = \"xml\"\n", "test.toml:2"),
            ("[server]\ntls_cert = \"a.pem\"\n", "tls_key"),
            ("[storage]\ncache_size = \"64 MB\"\n", "storage.cache_size"),
            ("[storage]\ncache_size = 1000\n", "storage.cache_size"),
            ("[storage]\ncache_size = \"-1MiB\"\n", "storage.cache_size"),
            ("[storage]\ncache_size = true\n", "test.toml:2"),
        ];
        for (text, needle) in cases {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains(needle), "{text:?} gave {err:?}");
            assert!(!err.contains('\n'), "{err:?}");
        }
    }

    #[test]
    fn the_postgres_backend_needs_a_usable_url_and_cluster_keys_are_checked() {
        let c = Config::default_config();
        assert_eq!(c.storage.backend, Backend::Sled);
        assert!(c.storage.postgres_url.is_none() && c.storage.postgres_ca_file.is_none());
        assert!(c.cluster.node_name.is_none() && c.cluster.advertise.is_none());
        assert!(!c.cluster.node_name().is_empty(), "the host name");
        let c = parse(
            "[storage]\nbackend = \"postgres\"\npostgres_url = \"postgres://kh@db/kh\"\n[cluster]\nnode_name = \"node-1\"\nadvertise = \"https://10.0.0.5:8080/\"\n",
        )
        .unwrap();
        assert_eq!(c.storage.backend, Backend::Postgres);
        assert_eq!(
            c.storage.postgres_url.unwrap().origin(),
            "storage.postgres_url"
        );
        assert_eq!(c.cluster.node_name(), "node-1");
        // A URL alone does not switch the backend.
        let c = parse("[storage]\npostgres_url = \"postgres://kh@db/kh\"\n").unwrap();
        assert_eq!(c.storage.backend, Backend::Sled);
        let cases = [
            (
                "[storage]\nbackend = \"postgres\"\n",
                "storage.postgres_url: must be set",
            ),
            ("[storage]\nbackend = \"mysql\"\n", "test.toml:2"),
            ("[storage]\nbackend = \"mysql\"\n", "postgres"),
            ("[storage]\nbackend = 1\n", "test.toml:2"),
            (
                "[storage]\npostgres_url = \"mysql://kh:s3cret@db/kh\"\n",
                "storage.postgres_url",
            ),
            (
                "[storage]\npostgres_url = \"postgres://kh:s3cret@db/kh?sslmode=maybe\"\n",
                "storage.postgres_url",
            ),
            ("[cluster]\nnode_name = \"a b\"\n", "cluster.node_name"),
            ("[cluster]\nnode_name = \"\"\n", "cluster.node_name"),
            (
                "[cluster]\nadvertise = \"10.0.0.5:8080\"\n",
                "cluster.advertise",
            ),
            (
                "[cluster]\nadvertise = \"ftp://h:1\"\n",
                "cluster.advertise",
            ),
            (
                "[cluster]\nadvertise = \"http://h:1/path\"\n",
                "cluster.advertise",
            ),
            (
                "[cluster]\nadvertise = \"http://u:p@h:1\"\n",
                "cluster.advertise",
            ),
            ("[cluster]\nnodename = \"x\"\n", "nodename"),
        ];
        for (text, needle) in cases {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains(needle), "{text:?} gave {err:?}");
            assert!(!err.contains('\n'), "{err:?}");
            assert!(!err.contains("s3cret"), "{err:?} quotes the password");
        }
    }

    #[test]
    fn cache_size_takes_bytes_or_a_unit() {
        assert_eq!(Config::default_config().storage.cache_size, 64 << 20);
        assert_eq!(parse("").unwrap().storage.cache_size, 64 << 20);
        let c = parse("[storage]\ncache_size = \"256MiB\"\n").unwrap();
        assert_eq!(c.storage.cache_size, 256 << 20);
        let c = parse("[storage]\ncache_size = 8388608\n").unwrap();
        assert_eq!(c.storage.cache_size, 8 << 20);
        assert_eq!(parse_bytes("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("512KiB").unwrap(), 512 << 10);
        assert!(parse_bytes("99999999999GiB").is_err());
    }

    #[test]
    fn change_me_and_short_admin_tokens_are_refused_everywhere() {
        for listen in ["127.0.0.1:8080", "[::1]:8080", "0.0.0.0:8080"] {
            for token in ["change-me", "eight-ch", &"x".repeat(31)] {
                let err = parse(&format!(
                    "[server]\nlisten = \"{listen}\"\n[auth]\nadmin_token = \"{token}\"\n"
                ))
                .unwrap_err()
                .to_string();
                assert!(err.contains("auth.admin_token"), "{listen} {token}: {err}");
                assert!(!err.contains('\n'), "{err}");
            }
            let c = parse(&format!(
                "[server]\nlisten = \"{listen}\"\n[auth]\nadmin_token = \"{}\"\n",
                "x".repeat(32)
            ))
            .unwrap();
            assert_eq!(c.auth.admin_token.map(|t| t.len()), Some(32));
        }
        // The defaults and the shipped config name no token: one is generated into the data
        // dir at start.
        assert_eq!(Config::default_config().auth.admin_token, None);
        assert_eq!(parse("").unwrap().auth.admin_token, None);
    }

    #[test]
    fn public_hosts_are_host_names() {
        let c =
            parse("[server]\npublic_hosts = [\"Hooks.Example.com.\", \"localhost\"]\n").unwrap();
        assert_eq!(
            c.server.public_hosts,
            vec!["hooks.example.com", "localhost"]
        );
        for bad in [
            "https://hooks.example.com",
            "hooks.example.com:443",
            "a b",
            "",
            "x/y",
        ] {
            let err = parse(&format!("[server]\npublic_hosts = [\"{bad}\"]\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("public_hosts") || err.contains("host name"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn plans_merge_over_the_defaults() {
        let c = parse(
            "[plans.starter]\nmax_webhooks = 1\nevents_per_second = 5\n[plans.bench]\nevents_per_second = 0\n",
        )
        .unwrap();
        assert_eq!(c.plans["starter"].max_webhooks, Some(1));
        assert_eq!(c.plans["starter"].events_per_second, 5);
        assert_eq!(c.plans["bench"].max_webhooks, None);
        assert_eq!(c.plans["enterprise"].events_per_second, 200);
    }

    #[test]
    fn cidrs_accept_bare_addresses() {
        let c =
            parse("[delivery]\nprivate_network_allowlist = [\"127.0.0.0/8\", \"::1\"]\n").unwrap();
        assert_eq!(c.delivery.private_network_allowlist.len(), 2);
        assert!(c.delivery.private_network_allowlist[1]
            .contains(&"::1".parse::<std::net::IpAddr>().unwrap()));
    }

    /// The field names a section struct accepts (what its `deny_unknown_fields` allows): serde
    /// hands them to `deserialize_struct`, where this deserializer takes them and stops.
    fn fields_of<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
        use serde::de::{Error, Visitor};
        struct Fields<'a>(&'a mut &'static [&'static str]);
        impl<'de> Deserializer<'de> for Fields<'_> {
            type Error = serde::de::value::Error;
            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
                Err(Error::custom("not a struct"))
            }
            fn deserialize_struct<V: Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Self::Error> {
                *self.0 = fields;
                Err(Error::custom("fields taken"))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
                identifier ignored_any
            }
        }
        let mut fields: &'static [&'static str] = &[];
        let _ = T::deserialize(Fields(&mut fields));
        assert!(
            !fields.is_empty(),
            "{} is a struct",
            std::any::type_name::<T>()
        );
        fields
    }

    /// Every section and the keys its struct accepts (`plans.*` stands for each plan).
    fn schema() -> Vec<(&'static str, &'static [&'static str])> {
        let sections = vec![
            ("server", fields_of::<ServerConfig>()),
            ("metrics", fields_of::<MetricsConfig>()),
            ("storage", fields_of::<StorageConfig>()),
            ("cluster", fields_of::<ClusterConfig>()),
            ("auth", fields_of::<AuthConfig>()),
            ("delivery", fields_of::<DeliveryConfig>()),
            ("plans.*", fields_of::<Plan>()),
            ("events", fields_of::<EventsConfig>()),
            ("log", fields_of::<LogConfig>()),
        ];
        let names: Vec<&str> = sections
            .iter()
            .map(|(s, _)| s.trim_end_matches(".*"))
            .collect();
        assert_eq!(names, fields_of::<RawConfig>(), "every section is listed");
        sections
    }

    /// The keys a TOML text mentions, as (section, key, set): `set` for `key = value` lines,
    /// not for the commented `# key = value` lines that document a key left unset. Sections of
    /// plans come out as `plans.*`.
    fn mentioned_keys(text: &str) -> Vec<(String, String, bool)> {
        let mut section = String::new();
        let mut keys = Vec::new();
        for line in text.lines().map(str::trim) {
            if let Some(header) = line.strip_prefix('[') {
                let name = header.split(']').next().unwrap_or_default().trim();
                section = match name.strip_prefix("plans.") {
                    Some(_) => "plans.*".to_string(),
                    None => name.to_string(),
                };
                continue;
            }
            let (commented, body) = match line.strip_prefix('#') {
                Some(rest) => (true, rest.trim_start()),
                None => (false, line),
            };
            let Some((key, _)) = body.split_once('=') else {
                continue;
            };
            let key = key.trim();
            if !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                keys.push((section.clone(), key.to_string(), !commented));
            }
        }
        keys
    }

    #[test]
    fn every_key_has_its_default_in_one_place_and_a_line_in_config_toml() {
        let shipped = include_str!("../config.toml");
        let schema = schema();
        for (file, text) in [
            ("src/config/defaults.toml", DEFAULTS_TOML),
            ("config.toml", shipped),
        ] {
            let mentioned = mentioned_keys(text);
            // Every key the file mentions, set or commented, is a real key...
            for (section, key, _) in &mentioned {
                let known = schema
                    .iter()
                    .any(|(s, fields)| s == section && fields.contains(&key.as_str()));
                assert!(
                    known,
                    "{file} mentions {section}.{key}, which is not a config key"
                );
            }
            // ...and every key is mentioned: set to its default, or documented as unset.
            for (section, fields) in &schema {
                for field in fields.iter() {
                    assert!(
                        mentioned.iter().any(|(s, k, _)| s == section && k == field),
                        "{file} does not mention {section}.{field}"
                    );
                }
            }
        }
        // Only `Option` keys (nothing when unset) and the catalog (filled in from
        // src/catalog.rs) are left unset in the defaults.
        let unset: Vec<String> = mentioned_keys(DEFAULTS_TOML)
            .into_iter()
            .filter(|(_, _, set)| !set)
            .map(|(s, k, _)| format!("{s}.{k}"))
            .collect();
        assert_eq!(
            unset,
            [
                "server.tls_cert",
                "server.tls_key",
                "storage.secrets_key_file",
                "storage.postgres_url",
                "storage.postgres_ca_file",
                "cluster.node_name",
                "cluster.advertise",
                "auth.admin_token",
                "auth.admin_token_file",
                "events.catalog"
            ]
        );
        let c = Config::default_config();
        assert!(c.server.tls_cert.is_none() && c.server.tls_key.is_none());
        assert!(c.storage.secrets_key_file.is_none() && c.auth.admin_token_file.is_none());
    }

    #[test]
    fn the_shipped_config_toml_states_the_built_in_defaults() {
        let shipped = include_str!("../config.toml");
        let builtin = format!("{:?}", Config::default_config());
        let doc = toml_edit::ImDocument::parse(shipped).expect("config.toml parses");
        let mut stated = 0;
        // One key at a time, so that a difference names the key.
        for (section, item) in doc.as_table().iter() {
            let table = item.as_table().expect("config.toml has [sections]");
            for (key, value) in table.iter() {
                let alone = match value {
                    toml_edit::Item::Table(plan) => format!("[{section}.{key}]\n{plan}"),
                    _ => format!("[{section}]\n{key} = {}", value.to_string().trim()),
                };
                let got = Config::from_toml(&alone, "config.toml")
                    .unwrap_or_else(|e| panic!("config.toml {section}.{key}: {e}"));
                // Not assert_eq!: the whole Config twice would bury the key's name.
                assert!(
                    format!("{got:?}") == builtin,
                    "config.toml states {section}.{key} = {}, which is not the built-in default \
                     (src/config/defaults.toml)",
                    value.to_string().trim()
                );
                stated += 1;
            }
        }
        assert!(
            stated > 30,
            "config.toml states the defaults ({stated} keys)"
        );
    }

    #[test]
    fn the_defaults_agree_with_the_constants_that_mirror_them() {
        let c = Config::default_config();
        assert_eq!(c.auth.admin_token, None);
        assert_eq!(
            c.storage.cache_size,
            crate::store::embedded::DEFAULT_CACHE_BYTES
        );
        assert_eq!(c.events.catalog, DEFAULT_EVENT_CATALOG);
        assert_eq!(DEFAULT_EVENT_CATALOG[0], "visitor.checked_in");
        assert_eq!(DEFAULT_EVENT_CATALOG[20], "settings.updated");
    }

    #[test]
    fn a_section_given_in_part_keeps_the_other_defaults() {
        let defaults = Config::default_config();
        for text in [
            "[server]\nlisten = \"127.0.0.1:1\"\n",
            "server = { listen = \"127.0.0.1:1\" }\n",
            "server.listen = \"127.0.0.1:1\"\n",
        ] {
            let c = parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!(c.server.listen.port(), 1, "{text:?}");
            assert_eq!(c.server.max_body_bytes, defaults.server.max_body_bytes);
            assert_eq!(
                c.server.body_read_timeout,
                defaults.server.body_read_timeout
            );
            assert_eq!(
                format!("{:?}", c.delivery),
                format!("{:?}", defaults.delivery)
            );
        }
        // An array replaces the default whole; errors in an inline section still name the line.
        let c = parse("[delivery]\nretry_schedule = [\"1s\"]\n").unwrap();
        assert_eq!(c.delivery.retry_schedule, [Duration::from_secs(1)]);
        assert_eq!(c.delivery.timeout, defaults.delivery.timeout);
        let err = parse("\nserver = { listen = 8080 }\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.toml:2:"), "{err}");
        let err = parse("server = 5\n").unwrap_err().to_string();
        assert!(err.starts_with("test.toml:1:"), "{err}");
    }

    #[test]
    fn unreadable_file_names_the_file() {
        let err = Config::load(Path::new("/nonexistent/kh.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/nonexistent/kh.toml:"), "{err}");
    }
}
