//! The phases. Each takes the run's [`Ctx`] (options, receivers, the engine it measures),
//! sets up its own account, webhooks and receiver path, drives load, and returns a result
//! whose `report` method puts its figures into the one [`crate::report::Report`].

pub mod cluster;
pub mod fanout;
pub mod flow;
pub mod isolation;
pub mod lag;
pub mod latency;
pub mod retention;
pub mod rps;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::client::api_json;
use crate::engine::BenchEngine;
use crate::options::Opts;
use crate::receiver::{PathId, Pki, Receivers};

/// What every phase works with.
#[derive(Clone)]
pub struct Ctx {
    pub opts: Arc<Opts>,
    pub recv: Arc<Receivers>,
    pub pki: Option<Arc<Pki>>,
    pub engine_rt: tokio::runtime::Handle,
    /// The engine this phase measures.
    pub api: SocketAddr,
    pub metrics: SocketAddr,
}

impl Ctx {
    /// The same run, measuring `engine`.
    pub fn on(&self, engine: &BenchEngine) -> Ctx {
        Ctx {
            api: engine.api(),
            metrics: engine.metrics(),
            ..self.clone()
        }
    }
}

pub const BATCH_SIZE: usize = 100;

/// The event type of the ceiling probe: a priority type (`delivery.priority_events` defaults
/// to `emergency.*`), which the push-back never holds.
pub const PROBE_EVENT: &str = "emergency.lockdown_activated";

/// About 200 bytes of `data`, the same for every event.
const DATA: &str = r#"{"visitor":{"id":"vis_01HQ3K8Z2M","name":"Ada Lovelace","email":"ada@example.com","company":"Analytical Engines Ltd"},"location":{"id":"loc_42","name":"HQ Lobby"},"host":{"id":"usr_7","name":"Charles Babbage"},"badge":"B-1042"}"#;

/// An event of `account` as the classic phases send it (~330 bytes).
pub fn event_json(account: &str) -> Value {
    json!({
        "account_id": account,
        "event": "visitor.checked_in",
        "data": serde_json::from_str::<Value>(DATA).expect("valid sample data"),
    })
}

/// The same event padded (a `note` in `data`) to a request body of `bytes` bytes.
pub fn event_of_size(account: &str, bytes: usize) -> Value {
    let mut v = event_json(account);
    v["data"]["note"] = json!("");
    let short = bytes.saturating_sub(v.to_string().len());
    v["data"]["note"] = json!("x".repeat(short));
    v
}

pub fn body(v: &Value) -> Bytes {
    Bytes::from(v.to_string())
}

pub async fn create_account(ctx: &Ctx, id: &str) {
    api_json(
        ctx.api,
        Method::POST,
        "/v1/accounts",
        Some(json!({"name": id, "plan": "bench", "id": id})),
        StatusCode::CREATED,
    )
    .await;
}

/// `count` webhooks of `account` at hooks `first..first+count` of `path`; their ids.
pub async fn create_webhooks(
    ctx: &Ctx,
    account: &str,
    path: PathId,
    first: usize,
    count: usize,
) -> Vec<String> {
    let mut ids = Vec::with_capacity(count);
    for hook in first..first + count {
        let v = api_json(
            ctx.api,
            Method::POST,
            &format!("/v1/accounts/{account}/webhooks"),
            Some(json!({
                "name": format!("bench {path:?}/{hook}"),
                "url": ctx.recv.url(path, hook),
                // The priority type is for the lag phases' ceiling probe (`lag::ceiling_probe`).
                "events": ["visitor.checked_in", PROBE_EVENT],
            })),
            StatusCode::CREATED,
        )
        .await;
        ids.push(v["id"].as_str().unwrap_or_default().to_string());
    }
    ids
}
