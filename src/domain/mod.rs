//! The domain layer: every business rule of accounts, webhooks, deliveries and events, written
//! once and called by both front ends — the JSON `/v1` handlers and the dashboard, which are
//! siblings over this module and which it knows nothing about.
//!
//! Data enters already authenticated and scoped: a typed [`AccountId`](crate::ids::AccountId)
//! the caller may reach, typed resource ids, and the request bodies as plain structs. It leaves
//! as model values ([`Webhook`](crate::model::Webhook), [`DeliveryRecord`](crate::model::DeliveryRecord), …)
//! or a [`Refusal`] carrying the contract's status and code; turning those into JSON (or
//! HTML) is the caller's job. Writes go through the store under the registry's write lock and
//! are made durable (`ingest.sync`) before a function returns. Every function takes the engine's
//! parts as one [`Services`], which the engine builds once at start and shares with both front
//! ends.

pub mod accounts;
pub mod caller;
pub mod deliveries;
pub mod events;
pub mod refusal;
pub mod stats;
pub mod webhooks;

use std::sync::Arc;

pub use refusal::Refusal;

use crate::config::Config;
use crate::dispatch::Deliverer;
use crate::ingest::Ingest;
use crate::registry::Registry;
use crate::scheduler::SchedulerHandle;
use crate::store::Storage;

/// What every domain function can reach: the engine's parts, and nothing of HTTP (no sessions,
/// no sign-in limits — those belong to the front end that has them).
pub struct Services {
    pub config: Arc<Config>,
    pub store: Arc<dyn Storage>,
    pub registry: Arc<Registry>,
    pub ingest: Ingest,
    pub deliverer: Arc<Deliverer>,
    pub scheduler: SchedulerHandle,
    /// Rate limits of `POST …/deliveries/{id}/retry`.
    pub manual_retries: crate::manual_retry::ManualRetryLimits,
    /// Dividing the work: which node serves which account (`None`: this node serves all).
    pub placement: Option<Arc<crate::placement::Placement>>,
}

/// A display name: 1 to 200 characters after trimming (accounts and webhooks).
pub fn check_name(name: &str) -> Result<String, Refusal> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(Refusal::bad_request(
            "invalid_name",
            "name must be 1 to 200 characters",
        ));
    }
    Ok(name.to_string())
}

/// `limit` and `cursor` of a list.
pub struct Paging {
    pub limit: usize,
    pub cursor: Option<String>,
}

/// Parses the list parameters (the API's query string, the dashboard's filters); anything not
/// in `allowed` (besides limit and cursor) is refused, so a typo in a filter is a 400 rather
/// than an unfiltered list.
pub fn paging(params: &[(String, String)], allowed: &[&str]) -> Result<Paging, Refusal> {
    let mut paging = Paging {
        limit: 50,
        cursor: None,
    };
    let mut seen: Vec<&str> = Vec::new();
    for (k, v) in params {
        if seen.contains(&k.as_str()) {
            return Err(Refusal::bad_request(
                "invalid_query",
                format!("query parameter {k:?} is given twice"),
            ));
        }
        seen.push(k);
        match k.as_str() {
            "limit" => {
                paging.limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| {
                        Refusal::bad_request(
                            "invalid_query",
                            "limit must be a whole number from 1 to 1000",
                        )
                    })?
            }
            "cursor" => paging.cursor = Some(v.clone()),
            other if allowed.contains(&other) => {}
            other => {
                return Err(Refusal::bad_request(
                    "invalid_query",
                    format!("unknown query parameter {other:?}"),
                ))
            }
        }
    }
    Ok(paging)
}
