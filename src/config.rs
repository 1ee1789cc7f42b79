//! Configuration: the `config.toml` of the contract, parsed once at start-up, validated, and
//! shared read-only (`Arc<Config>`) by every stage of the pipeline.
//!
//! Enters as TOML text (a file, or the default compiled in from the repository's `config.toml`)
//! plus the `KYBERHOOK_ADMIN_TOKEN` environment override; leaves as a typed [`Config`] with
//! durations, addresses and CIDRs already parsed. Unknown keys and wrong types are refused with a
//! one-line [`ConfigError`] that names the file, line and key, which `main` turns into exit code 2.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

/// The repository's `config.toml`, the documented default.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../config.toml");

/// The admin token earlier versions shipped in `config.toml`: known to everyone, so refused
/// wherever it is given (and it is shorter than [`MIN_ADMIN_TOKEN_CHARS`] anyway).
pub const FORMER_DEFAULT_ADMIN_TOKEN: &str = "change-me";

/// The shortest admin token accepted: 32 characters, so that a token guessed at the API's
/// refusal rate (see `api::guard`) stays out of reach.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 32;

/// The 21 event types of the KyberAccess webhook guide: the default `events.catalog`.
pub const DEFAULT_EVENT_CATALOG: [&str; 21] = [
    "visitor.checked_in",
    "visitor.checked_out",
    "visitor.denied",
    "visitor.pre_registered",
    "visitor.pre_registration_cancelled",
    "visitor.updated",
    "visitor.deleted",
    "screening.watchlist_hit",
    "screening.bolo_alert",
    "screening.cleared",
    "emergency.lockdown_activated",
    "emergency.lockdown_deactivated",
    "emergency.evacuation_activated",
    "document.nda_signed",
    "document.nda_declined",
    "delivery.received",
    "delivery.picked_up",
    "delivery.notified",
    "user.login",
    "user.login_failed",
    "settings.updated",
];

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

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub metrics: MetricsConfig,
    pub storage: StorageConfig,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "d_listen")]
    pub listen: SocketAddr,
    #[serde(default = "d_max_body")]
    pub max_body_bytes: usize,
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Events that may wait in the write-ahead queue; beyond it ingest answers 503.
    #[serde(default = "d_ingest_queue")]
    pub ingest_queue: usize,
    /// How long a client may take to send its request head (slowloris bound).
    #[serde(default = "d_header_timeout", deserialize_with = "de_duration")]
    pub header_read_timeout: Duration,
    /// How long a client may take to send a whole request body (after its head); past it the
    /// request is answered 408 and the connection closed.
    #[serde(default = "d_body_timeout", deserialize_with = "de_duration")]
    pub body_read_timeout: Duration,
    /// How long a client may leave an answer unread (no byte of it accepted) before the
    /// connection is cut off: a stalled reader must not pin a backup or a response buffer.
    #[serde(default = "d_send_timeout", deserialize_with = "de_duration")]
    pub send_timeout: Duration,
    /// Host names the API answers to besides the listen address, `localhost` and loopback
    /// literals; any other `Host` gets 421 (DNS rebinding).
    #[serde(default, deserialize_with = "de_hosts")]
    pub public_hosts: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    #[serde(default = "d_metrics_listen")]
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    #[serde(default = "d_storage_path")]
    pub path: PathBuf,
    #[serde(default = "d_retention", deserialize_with = "de_duration")]
    pub retention: Duration,
    /// Make every acknowledged write power-safe (fdatasync after sled's flush). Only turn off
    /// for throw-away benchmarks.
    #[serde(default = "d_true")]
    pub fsync: bool,
    /// sled's page cache in bytes: an integer, or a string with a unit (`"64MiB"`).
    #[serde(default = "d_cache_size", deserialize_with = "de_bytes")]
    pub cache_size: u64,
    /// A file holding the key that seals webhook secrets (64 hex digits or base64 of 32
    /// bytes). `KYBERHOOK_SECRETS_KEY` wins when set; with neither, the key is `secrets.key`
    /// in the data dir, generated on first start.
    #[serde(default)]
    pub secrets_key_file: Option<PathBuf>,
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
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    #[serde(default = "d_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
    #[serde(default = "d_retry_schedule", deserialize_with = "de_durations")]
    pub retry_schedule: Vec<Duration>,
    #[serde(default = "d_auto_disable")]
    pub auto_disable_after: u32,
    #[serde(default = "d_true")]
    pub require_https: bool,
    #[serde(default)]
    pub extra_ca_files: Vec<PathBuf>,
    #[serde(default, deserialize_with = "de_cidrs")]
    pub private_network_allowlist: Vec<IpNet>,
    #[serde(default = "d_max_in_flight")]
    pub max_in_flight: usize,
    /// The ceiling of each webhook's adaptive concurrency limit (see `dispatch::concurrency`):
    /// a safety bound, not the operating point — each limit starts at 64 and grows only while
    /// its endpoint keeps up.
    #[serde(default = "d_max_in_flight_per_webhook")]
    pub max_in_flight_per_webhook: usize,
    /// Bytes of an endpoint's response body kept in the delivery log.
    #[serde(default = "d_max_response_body")]
    pub max_response_body_bytes: usize,
    /// Deliveries that may wait for a future attempt before ingest answers 503.
    #[serde(default = "d_max_scheduled")]
    pub max_scheduled: usize,
    /// Deliveries of one account that may wait for an attempt before that account's ingest
    /// answers 429 (see `backlog`).
    #[serde(default = "d_max_scheduled_per_account")]
    pub max_scheduled_per_account: u64,
    /// Test sends one account may run at once (more get 429), so that its tests cannot take
    /// the engine's in-flight slots from other accounts' deliveries.
    #[serde(default = "d_max_test_sends_per_account")]
    pub max_test_sends_per_account: usize,
    /// Event types whose deliveries go ahead of the account's other queued deliveries: exact
    /// names, `family.*` or `*` (see [`Config::is_priority`]).
    #[serde(default = "d_priority_events")]
    pub priority_events: Vec<String>,
    /// Push-back ([`crate::pushback`]): while deliveries lag further than this behind ingest,
    /// new events (other than `priority_events`) are held before they are committed. 0: off.
    #[serde(default = "d_max_lag", deserialize_with = "de_duration")]
    pub max_lag: Duration,
    /// The longest an event is held for `max_lag`; then it is refused with 503.
    #[serde(default = "d_max_lag_hold", deserialize_with = "de_duration")]
    pub max_lag_hold: Duration,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// `None`: unlimited.
    #[serde(default)]
    pub max_webhooks: Option<u32>,
    /// Deliveries per second to the account's endpoints, all webhooks together. 0: unlimited.
    pub events_per_second: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    #[serde(default = "d_catalog")]
    pub catalog: Vec<String>,
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
    #[serde(default = "d_log_format")]
    pub format: LogFormat,
    /// A `RUST_LOG`-style filter; the `RUST_LOG` environment variable wins when set.
    /// Whitespace around each comma-separated directive is dropped (see [`trim_directives`]).
    #[serde(default = "d_log_level", deserialize_with = "de_log_filter")]
    pub level: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "d_server")]
    server: ServerConfig,
    #[serde(default = "d_metrics")]
    metrics: MetricsConfig,
    #[serde(default = "d_storage")]
    storage: StorageConfig,
    #[serde(default = "d_auth")]
    auth: AuthConfig,
    #[serde(default = "d_delivery")]
    delivery: DeliveryConfig,
    #[serde(default)]
    plans: BTreeMap<String, Plan>,
    #[serde(default = "d_events")]
    events: EventsConfig,
    #[serde(default = "d_log")]
    log: LogConfig,
}

fn empty<T: for<'de> Deserialize<'de>>() -> T {
    toml::from_str("").expect("every key of an empty section has a default")
}
fn d_server() -> ServerConfig {
    empty()
}
fn d_metrics() -> MetricsConfig {
    empty()
}
fn d_storage() -> StorageConfig {
    empty()
}
fn d_auth() -> AuthConfig {
    empty()
}
fn d_delivery() -> DeliveryConfig {
    empty()
}
fn d_events() -> EventsConfig {
    empty()
}
fn d_log() -> LogConfig {
    empty()
}
fn d_listen() -> SocketAddr {
    "127.0.0.1:8080".parse().expect("static")
}
fn d_metrics_listen() -> SocketAddr {
    "127.0.0.1:9464".parse().expect("static")
}
fn d_max_body() -> usize {
    1 << 20
}
fn d_ingest_queue() -> usize {
    65_536
}
fn d_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn d_body_timeout() -> Duration {
    Duration::from_secs(30)
}
fn d_send_timeout() -> Duration {
    Duration::from_secs(30)
}
fn d_storage_path() -> PathBuf {
    PathBuf::from("data")
}
fn d_retention() -> Duration {
    Duration::from_secs(30 * 86_400)
}
fn d_cache_size() -> u64 {
    crate::store::DEFAULT_CACHE_BYTES
}
fn d_true() -> bool {
    true
}
fn d_timeout() -> Duration {
    Duration::from_secs(30)
}
fn d_retry_schedule() -> Vec<Duration> {
    [60, 300, 1800, 7200, 43_200]
        .into_iter()
        .map(Duration::from_secs)
        .collect()
}
fn d_auto_disable() -> u32 {
    100
}
fn d_max_in_flight() -> usize {
    1024
}
fn d_max_in_flight_per_webhook() -> usize {
    512
}
fn d_max_response_body() -> usize {
    64 * 1024
}
fn d_max_lag() -> Duration {
    Duration::from_millis(50)
}
fn d_max_lag_hold() -> Duration {
    Duration::from_secs(5)
}
fn d_max_scheduled() -> usize {
    5_000_000
}
fn d_max_scheduled_per_account() -> u64 {
    // A fifth of the engine-wide default: five accounts must be stuck at once before ingest
    // answers 503 for everybody.
    1_000_000
}
fn d_max_test_sends_per_account() -> usize {
    2
}
fn d_priority_events() -> Vec<String> {
    vec!["emergency.*".into(), "screening.*".into()]
}
fn d_catalog() -> Vec<String> {
    DEFAULT_EVENT_CATALOG
        .iter()
        .map(|s| s.to_string())
        .collect()
}
fn d_log_format() -> LogFormat {
    LogFormat::Text
}
fn d_log_level() -> String {
    "info".into()
}

/// The plans of the guide; `[plans.NAME]` in the file replaces or adds one.
pub fn default_plans() -> BTreeMap<String, Plan> {
    let mut plans = BTreeMap::new();
    plans.insert(
        "starter".into(),
        Plan {
            max_webhooks: Some(3),
            events_per_second: 10,
        },
    );
    plans.insert(
        "professional".into(),
        Plan {
            max_webhooks: Some(10),
            events_per_second: 50,
        },
    );
    plans.insert(
        "enterprise".into(),
        Plan {
            max_webhooks: None,
            events_per_second: 200,
        },
    );
    plans
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
    /// The repository's default configuration.
    pub fn default_config() -> Config {
        Config::from_toml(DEFAULT_CONFIG_TOML, "config.toml (built-in)")
            .expect("the shipped config.toml is valid")
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

    /// The built-in default with the environment override, validated: what `serve` runs on
    /// without a config file.
    pub fn load_default() -> Result<Config, ConfigError> {
        Config::from_toml_and_env(DEFAULT_CONFIG_TOML, "config.toml (built-in)")
    }

    /// The override is applied before validation, so a short token in the file is fine when
    /// `KYBERHOOK_ADMIN_TOKEN` replaces it (and a short one in the environment is refused).
    fn from_toml_and_env(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let mut config = Config::parse(text, origin)?;
        if let Ok(token) = std::env::var(ADMIN_TOKEN_ENV) {
            config.auth.admin_token = Some(token);
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
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let start = e.span().map_or(0, |s| s.start.min(text.len()));
            let line = text[..start].matches('\n').count() + 1;
            let message = e.message().replace('\n', " ").trim().to_string();
            let message = match key_at(text, start) {
                Some(key) if !message.contains(&key) => format!("{key}: {message}"),
                _ => message,
            };
            ConfigError::Parse {
                path: origin.to_string(),
                line,
                message,
            }
        })?;
        let mut plans = default_plans();
        plans.extend(raw.plans);
        let config = Config {
            server: raw.server,
            metrics: raw.metrics,
            storage: raw.storage,
            auth: raw.auth,
            delivery: raw.delivery,
            plans,
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

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, message: &str| ConfigError::Invalid {
            path: origin.to_string(),
            key: key.to_string(),
            message: message.to_string(),
        };
        if let Some(token) = &self.auth.admin_token {
            check_admin_token(token).map_err(|message| bad("auth.admin_token", &message))?;
        }
        if self.server.send_timeout.is_zero() {
            return Err(bad("server.send_timeout", "must be greater than zero"));
        }
        if self.server.max_body_bytes < 1024 {
            return Err(bad("server.max_body_bytes", "must be at least 1024"));
        }
        if self.server.tls_cert.is_some() != self.server.tls_key.is_some() {
            return Err(bad(
                "server.tls_cert",
                "server.tls_cert and server.tls_key must be set together",
            ));
        }
        if self.server.header_read_timeout.is_zero() {
            return Err(bad(
                "server.header_read_timeout",
                "must be greater than zero",
            ));
        }
        if self.delivery.max_lag_hold.is_zero()
            || self.delivery.max_lag_hold > Duration::from_secs(60)
        {
            return Err(bad(
                "delivery.max_lag_hold",
                "must be between 1ms and 60s (a held request still waits for its answer)",
            ));
        }
        if self.server.body_read_timeout.is_zero() {
            return Err(bad("server.body_read_timeout", "must be greater than zero"));
        }
        if self.server.ingest_queue == 0 {
            return Err(bad("server.ingest_queue", "must be at least 1"));
        }
        if self.delivery.timeout.is_zero() {
            return Err(bad("delivery.timeout", "must be greater than zero"));
        }
        if self.delivery.max_in_flight == 0 {
            return Err(bad("delivery.max_in_flight", "must be at least 1"));
        }
        if self.delivery.max_in_flight_per_webhook == 0 {
            return Err(bad(
                "delivery.max_in_flight_per_webhook",
                "must be at least 1",
            ));
        }
        if self.delivery.max_scheduled_per_account == 0 {
            return Err(bad(
                "delivery.max_scheduled_per_account",
                "must be at least 1",
            ));
        }
        if self.delivery.max_test_sends_per_account == 0 {
            return Err(bad(
                "delivery.max_test_sends_per_account",
                "must be at least 1",
            ));
        }
        for p in &self.delivery.priority_events {
            // Not checked against the catalog: the default names families an operator's
            // catalog may leave out, and a pattern matching nothing is harmless.
            let name = p.strip_suffix(".*").unwrap_or(p);
            if p != "*"
                && (name.is_empty() || name.contains('*') || name.contains(char::is_whitespace))
            {
                return Err(bad(
                    "delivery.priority_events",
                    &format!("{p:?} is not an event type, a family wildcard like \"emergency.*\", or \"*\""),
                ));
            }
        }
        if self.delivery.auto_disable_after == 0 {
            return Err(bad("delivery.auto_disable_after", "must be at least 1"));
        }
        if self.delivery.retry_schedule.len() > 100 {
            return Err(bad("delivery.retry_schedule", "at most 100 retries"));
        }
        if self.events.catalog.is_empty() {
            return Err(bad("events.catalog", "must name at least one event type"));
        }
        for name in &self.events.catalog {
            if !crate::model::is_valid_event_name(name) {
                return Err(bad(
                    "events.catalog",
                    &format!("{name:?} is not an event name like \"family.action\""),
                ));
            }
        }
        for (name, plan) in &self.plans {
            if !crate::ids::is_safe_token(name, 32) {
                return Err(bad(
                    &format!("plans.{name}"),
                    "plan names are [A-Za-z0-9_-]",
                ));
            }
            let _ = plan;
        }
        if self.storage.retention.is_zero() {
            return Err(bad("storage.retention", "must be greater than zero"));
        }
        if self.storage.cache_size < 1 << 20 {
            return Err(bad("storage.cache_size", "must be at least 1MiB"));
        }
        if log_filter(&self.log.level).is_err() {
            return Err(bad("log.level", "is not a valid filter (e.g. \"info\")"));
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
        assert_eq!(c.server.listen, d_listen());
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
        // The shipped config names no token: one is generated into the data dir at start.
        assert_eq!(Config::default_config().auth.admin_token, None);
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

    #[test]
    fn unreadable_file_names_the_file() {
        let err = Config::load(Path::new("/nonexistent/kh.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/nonexistent/kh.toml:"), "{err}");
    }
}
