//! The engines under test: their config (built as a TOML table from the bench's flags) and
//! their start and shutdown on the engine's own runtime. Each engine gets a fresh temp data
//! dir, listens on 127.0.0.1:0 and may deliver to 127.0.0.0/8 (the receivers).
//!
//! Three shapes: the main engine of the classic phases (`max_in_flight_per_webhook = 256` as
//! the figures in the README were measured), the retention phase's (the same, plus a short
//! `storage.retention`), and the flow and isolation phases' engines, which keep the defaults
//! except the plan and the allowlist (issue 20's table), plus `--set` overrides.

use std::net::SocketAddr;
use std::time::Duration;

use kyberhook::config::Config;
use kyberhook::Engine;
use toml::{Table, Value};

use crate::client::ADMIN;
use crate::options::Opts;
use crate::receiver::Pki;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// The classic phases: 1024 slots, 256 per webhook.
    Classic,
    /// `storage.retention` of this many seconds, otherwise classic.
    Retention(u64),
    /// The defaults (flow, isolation).
    Defaults,
}

/// One running engine and its data dir (removed when dropped).
pub struct BenchEngine {
    engine: Engine,
    pub data: tempfile::TempDir,
    rt: tokio::runtime::Handle,
}

fn set(t: &mut Table, section: &str, key: &str, v: impl Into<Value>) {
    let s = t
        .entry(section.to_string())
        .or_insert_with(|| Value::Table(Table::new()));
    if let Value::Table(s) = s {
        s.insert(key.to_string(), v.into());
    }
}

/// The engine's config for `shape`; `extra` are `(section, key, TOML value)` set last.
pub fn config(
    opts: &Opts,
    pki: Option<&Pki>,
    data: &std::path::Path,
    shape: Shape,
    extra: &[(String, String, String)],
) -> Config {
    let text = config_text(opts, pki, data, shape, extra);
    Config::from_toml(&text, "load bench").unwrap_or_else(|e| {
        eprintln!("load bench: engine config: {e}");
        std::process::exit(2)
    })
}

/// The same as a config file's text (the cluster phase's node processes read it).
pub fn config_text(
    opts: &Opts,
    pki: Option<&Pki>,
    data: &std::path::Path,
    shape: Shape,
    extra: &[(String, String, String)],
) -> String {
    let mut t = Table::new();
    set(&mut t, "server", "listen", "127.0.0.1:0");
    set(&mut t, "metrics", "listen", "127.0.0.1:0");
    set(&mut t, "storage", "path", data.display().to_string());
    set(&mut t, "storage", "fsync", opts.fsync);
    set(&mut t, "auth", "admin_token", ADMIN);
    set(
        &mut t,
        "delivery",
        "private_network_allowlist",
        vec![Value::from("127.0.0.0/8")],
    );
    match pki {
        Some(p) => set(
            &mut t,
            "delivery",
            "extra_ca_files",
            vec![Value::from(p.ca_file.display().to_string())],
        ),
        None => set(&mut t, "delivery", "require_https", false),
    }
    if shape != Shape::Defaults {
        set(&mut t, "delivery", "max_in_flight", 1024);
        set(&mut t, "delivery", "max_in_flight_per_webhook", 256);
    }
    if let Shape::Retention(s) = shape {
        set(&mut t, "storage", "retention", format!("{s}s"));
    }
    if let Some(q) = opts.quota {
        set(&mut t, "delivery", "max_scheduled_per_account", q as i64);
    }
    if let Some(l) = &opts.max_lag {
        set(&mut t, "delivery", "max_lag", l.as_str());
    }
    let mut plan = Table::new();
    plan.insert("events_per_second".into(), Value::from(0));
    let mut plans = Table::new();
    plans.insert("bench".into(), Value::Table(plan));
    t.insert("plans".into(), Value::Table(plans));
    // The engine's own log (stderr), e.g. BENCH_LOG=warn to see why requests failed.
    set(
        &mut t,
        "log",
        "level",
        std::env::var("BENCH_LOG").unwrap_or_else(|_| "off".into()),
    );
    let overrides = if shape == Shape::Defaults {
        opts.engine_set.iter().chain(extra)
    } else {
        [].iter().chain(extra)
    };
    for (section, key, value) in overrides {
        // A bare word that is not TOML (`--set delivery.max_lag=0s`) is taken as a string.
        let v = format!("v = {value}")
            .parse::<Table>()
            .ok()
            .and_then(|mut v| v.remove("v"))
            .unwrap_or_else(|| Value::from(value.as_str()));
        set(&mut t, section, key, v);
    }
    toml::to_string(&t).expect("a TOML table serialises")
}

impl BenchEngine {
    /// Starts an engine of `shape` on `rt`.
    pub async fn start(
        rt: &tokio::runtime::Handle,
        opts: &Opts,
        pki: Option<&Pki>,
        shape: Shape,
        extra: &[(String, String, String)],
    ) -> BenchEngine {
        let data = tempfile::tempdir().expect("data dir");
        let mut extra = extra.to_vec();
        if let (true, Some(base)) = (opts.postgres, &opts.postgres_url) {
            let url = crate::postgres::fresh_database(base).await;
            extra.push(("storage".into(), "backend".into(), "\"postgres\"".into()));
            extra.push(("storage".into(), "postgres_url".into(), format!("{url:?}")));
        }
        let config = config(opts, pki, data.path(), shape, &extra);
        let engine = rt
            .spawn(Engine::start(config))
            .await
            .expect("engine task")
            .unwrap_or_else(|e| panic!("engine start: {e}"));
        BenchEngine {
            engine,
            data,
            rt: rt.clone(),
        }
    }

    pub fn api(&self) -> SocketAddr {
        self.engine.api_addr()
    }

    pub fn metrics(&self) -> SocketAddr {
        self.engine.metrics_addr()
    }

    /// Shuts the engine down (at most 60 s); whether it finished in time. The data dir goes
    /// when the returned value is dropped.
    pub async fn shutdown(self) -> (bool, tempfile::TempDir) {
        let engine = self.engine;
        let stopped = self
            .rt
            .spawn(async move {
                tokio::time::timeout(Duration::from_secs(60), engine.shutdown())
                    .await
                    .is_ok()
            })
            .await
            .unwrap_or(false);
        (stopped, self.data)
    }
}
