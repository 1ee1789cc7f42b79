//! Statistics rules: a webhook's delivery health over a window (only the account's own
//! webhooks), and the operator's overview of the engine, read from the owners of each figure —
//! the store (statistics, size, the last hour), the registry (accounts, webhook statuses, the
//! backlog counts and quota) and the scheduler (the delivery lag) — never recomputed here.
//! Both front ends (`GET …/stats`, `GET /v1/admin/stats`, and the dashboard's charts) call
//! these, so the numbers they show are the same.

use super::{Refusal, Services};
use crate::clock;
use crate::ids::{AccountId, WebhookId};
use crate::stats::{self, live::Minute, Bucket, Window};

/// The `window` query parameter (default `24h`).
pub fn parse_window(raw: Option<&str>) -> Result<Window, Refusal> {
    match raw {
        None | Some("") => Ok(Window::Day),
        Some(w) => Window::parse(w)
            .ok_or_else(|| Refusal::bad_request("invalid_query", "window must be 24h or 7d")),
    }
}

/// A webhook's buckets over `window`, oldest first, at the engine clock's now.
pub fn webhook_stats(
    state: &Services,
    account: &AccountId,
    id: WebhookId,
    window: Window,
) -> Result<Vec<Bucket>, Refusal> {
    super::webhooks::get_webhook(state, account, id)?;
    let now = clock::now_ms();
    let hourly = state.store.webhook_stats(id, window.first_hour(now))?;
    Ok(stats::window_buckets(&hourly, window, now))
}

/// An account and how many of its deliveries wait for an attempt.
#[derive(Debug, Clone)]
pub struct AccountBacklog {
    pub id: AccountId,
    pub name: String,
    pub plan: String,
    pub waiting: u64,
}

/// The operator's overview of the engine.
#[derive(Debug, Clone)]
pub struct Overview {
    pub version: &'static str,
    pub now_ms: u64,
    pub started_ms: u64,
    /// The last hour, per minute (the minute in progress last).
    pub minutes: Vec<Minute>,
    /// The engine's delivery lag now, in ms, and per stage.
    pub lag_ms: u64,
    pub lag_stages: [(&'static str, u64); 4],
    /// Deliveries waiting for an attempt, all accounts together.
    pub backlog_total: u64,
    /// `delivery.max_scheduled_per_account`.
    pub backlog_quota: u64,
    /// The accounts with the most waiting, most first (at most ten, none with nothing waiting).
    pub backlog_top: Vec<AccountBacklog>,
    /// Accounts at or over the backlog quota (their ingest gets 429).
    pub over_quota: Vec<AccountBacklog>,
    pub store_bytes: u64,
    pub disk_free_bytes: Option<u64>,
    pub disk_total_bytes: Option<u64>,
    /// Webhooks by status: active, paused, disabled.
    pub webhooks: [usize; 3],
}

impl Overview {
    pub fn uptime_secs(&self) -> u64 {
        self.now_ms.saturating_sub(self.started_ms) / 1000
    }

    /// Events per second over the last complete minute.
    pub fn events_per_second(&self) -> f64 {
        self.last_complete().map_or(0.0, |m| m.events as f64 / 60.0)
    }

    /// Attempts per second over the last complete minute.
    pub fn deliveries_per_second(&self) -> f64 {
        self.last_complete()
            .map_or(0.0, |m| (m.delivered + m.failed) as f64 / 60.0)
    }

    fn last_complete(&self) -> Option<&Minute> {
        self.minutes.iter().rev().nth(1)
    }
}

/// Free and total bytes of the file system holding `path` (`None` where it cannot be read).
fn disk_space(path: &std::path::Path) -> (Option<u64>, Option<u64>) {
    match rustix::fs::statvfs(path) {
        Ok(s) => (
            Some(s.f_bavail.saturating_mul(s.f_frsize)),
            Some(s.f_blocks.saturating_mul(s.f_frsize)),
        ),
        Err(_) => (None, None),
    }
}

/// The nodes sharing this engine's store: the store's view (PostgreSQL), or this node alone,
/// holding the one partition of a store of its own. Read on a blocking thread.
pub async fn cluster(state: &Services) -> Result<crate::store::ClusterView, Refusal> {
    let store = state.store.clone();
    let shared = tokio::task::spawn_blocking(move || store.cluster()).await??;
    Ok(shared.unwrap_or_else(|| crate::store::ClusterView {
        backend: "sled",
        partitions: 1,
        nodes: vec![crate::store::NodeView {
            name: state.config.cluster.node_name(),
            advertise: state.config.cluster.advertise.clone(),
            partitions: 1,
            last_seen_ms: clock::now_ms(),
            serving: true,
        }],
    }))
}

/// The overview now. The store's size and the file system are read on a blocking thread.
pub async fn overview(state: &Services) -> Result<Overview, Refusal> {
    let store = state.store.clone();
    let path = state.config.storage.path.clone();
    let (store_bytes, (disk_free_bytes, disk_total_bytes)) =
        tokio::task::spawn_blocking(move || (store.size_on_disk(), disk_space(&path))).await?;
    let now = clock::now_ms();
    let backlog = state.registry.backlog();
    let quota = backlog.quota();
    let mut accounts: Vec<AccountBacklog> = super::accounts::list_accounts(state)?
        .into_iter()
        .map(|a| AccountBacklog {
            waiting: backlog.waiting(&a.id),
            id: a.id,
            name: a.name,
            plan: a.plan,
        })
        .collect();
    let backlog_total = accounts.iter().map(|a| a.waiting).sum();
    accounts.sort_by(|a, b| b.waiting.cmp(&a.waiting).then_with(|| a.id.cmp(&b.id)));
    let over_quota = accounts
        .iter()
        .filter(|a| backlog.check(&a.id).is_err())
        .cloned()
        .collect();
    let backlog_top = accounts
        .into_iter()
        .filter(|a| a.waiting > 0)
        .take(10)
        .collect();
    let lag = state.scheduler.lag();
    Ok(Overview {
        version: env!("CARGO_PKG_VERSION"),
        now_ms: now,
        started_ms: state.store.live().started_ms(),
        minutes: state.store.live().last_hour(now),
        lag_ms: lag.current(now),
        lag_stages: lag.stages(now),
        backlog_total,
        backlog_quota: quota,
        backlog_top,
        over_quota,
        store_bytes,
        disk_free_bytes,
        disk_total_bytes,
        webhooks: state.registry.hook_status_counts(),
    })
}
