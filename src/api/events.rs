//! Ingest routes (HTTP side): admin scope, bounded body reads, JSON parsing of one event or a
//! batch, the views of their outcome, and the event catalog. The rules (capacity, validation,
//! building, durable commit) are in [`domain::events`](crate::domain::events); the 202 is sent
//! only once the commit that holds the events is durable.

use http::StatusCode;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::{json_response, parse_json, relay, ApiResult, Call};
use crate::domain::events as domain;
use crate::domain::{Refusal, Services};
use crate::ids::AccountId;
use crate::ingest::EventInput;

/// The configured catalog with each type's family, description and example `data` (whose
/// key order is kept: serialised straight from the catalog, not through a `Value`).
pub fn event_types(state: &Services) -> ApiResult {
    #[derive(serde::Serialize)]
    struct Catalog<'a> {
        data: Vec<crate::catalog::EventType<'a>>,
    }
    Ok(json_response(
        StatusCode::OK,
        &Catalog {
            data: crate::catalog::describe_all(state.registry.catalog()),
        },
    ))
}

pub async fn ingest_one(state: &Services, call: Call) -> ApiResult {
    let started = std::time::Instant::now();
    call.caller.require_admin()?;
    let head = relay::head(state, &call);
    if head.is_none() {
        domain::check_capacity(state)?;
    }
    let bytes = call.bytes(state).await?;
    let input: EventInput = parse_json(&bytes)?;
    if let Some(head) = &head {
        // Dividing the work: the node serving the account commits its event.
        if let Some(account) = AccountId::parse(&input.account_id) {
            match relay::elsewhere(state, &account, head.relayed) {
                Some(Ok(owner)) => {
                    return relay::send_bytes(state, &owner, &head.request, bytes, head.peer).await
                }
                Some(Err(refusal)) => return Err(refusal),
                None => {}
            }
        }
        domain::check_capacity(state)?;
    }
    let id = domain::ingest_one(state, &input).await?;
    metrics::histogram!("kyberhook_ingest_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    Ok(json_response(StatusCode::ACCEPTED, &json!({ "id": id })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch<'a> {
    #[serde(borrow)]
    pub events: Vec<&'a RawValue>,
}

pub async fn ingest_batch(state: &Services, call: Call) -> ApiResult {
    let started = std::time::Instant::now();
    call.caller.require_admin()?;
    let head = relay::head(state, &call);
    if head.is_none() {
        domain::check_capacity(state)?;
    }
    let bytes = call.bytes(state).await?;
    let batch: Batch = parse_json(&bytes)?;
    if let Some(head) = head {
        return ingest_batch_divided(state, head, batch, started).await;
    }
    let items = batch
        .events
        .iter()
        .map(|raw| {
            serde_json::from_str::<EventInput>(raw.get())
                .map_err(|e| Refusal::bad_request("invalid_request", format!("invalid event: {e}")))
        })
        .collect();
    let outcomes = domain::ingest_batch(state, items).await?;
    metrics::histogram!("kyberhook_ingest_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    let results: Vec<Value> = outcomes
        .into_iter()
        .map(|outcome| match outcome {
            Ok(id) => json!({ "id": id }),
            Err(e) => json!({ "error": { "code": e.code, "message": e.message } }),
        })
        .collect();
    Ok(json_response(
        StatusCode::ACCEPTED,
        &json!({ "results": results }),
    ))
}

/// An event of a batch as the router reads it first: only its account.
#[derive(Deserialize)]
struct AccountOf {
    #[serde(default)]
    account_id: Option<String>,
}

/// `POST /v1/events/batch` when nodes divide the work: the events of accounts this node serves
/// are committed here, the others go to their nodes in one batch per node, and the results
/// are put back in the order of the request. A share that cannot be relayed (no node takes
/// it right now) gets `not_here` for each of its events: the producer sends those again.
async fn ingest_batch_divided(
    state: &Services,
    head: relay::Head,
    batch: Batch<'_>,
    started: std::time::Instant,
) -> ApiResult {
    if batch.events.len() > domain::MAX_BATCH_EVENTS {
        return Err(Refusal::bad_request(
            "batch_too_large",
            format!("a batch holds at most {} events", domain::MAX_BATCH_EVENTS),
        ));
    }
    let n = batch.events.len();
    let mut results: Vec<Option<Value>> = vec![None; n];
    let mut here: Vec<usize> = Vec::new();
    let mut there: Vec<(crate::placement::Owner, Vec<usize>)> = Vec::new();
    for (i, raw) in batch.events.iter().enumerate() {
        let account = serde_json::from_str::<AccountOf>(raw.get())
            .ok()
            .and_then(|a| a.account_id)
            .and_then(|a| AccountId::parse(&a));
        match account.and_then(|a| relay::elsewhere(state, &a, head.relayed)) {
            // Not an account (the local validation says why), or served here.
            None => here.push(i),
            Some(Ok(owner)) => match there.iter_mut().find(|(o, _)| *o == owner) {
                Some((_, list)) => list.push(i),
                None => there.push((owner, vec![i])),
            },
            Some(Err(refusal)) => results[i] = Some(error_item(refusal.code, &refusal.message)),
        }
    }
    for (owner, indices) in &there {
        let events: Vec<&RawValue> = indices.iter().map(|i| batch.events[*i]).collect();
        let body = serde_json::to_vec(&json!({ "events": events })).unwrap_or_default();
        let answer = relay::send_bytes(state, owner, &head.request, body.into(), head.peer).await;
        let shares: Vec<Value> = match answer {
            Ok(resp) => {
                use http_body_util::BodyExt;
                let status = resp.status();
                let body: Option<Value> = match resp.into_body().collect().await {
                    Ok(b) => serde_json::from_slice(&b.to_bytes()).ok(),
                    Err(_) => None,
                };
                if status == StatusCode::ACCEPTED {
                    body.and_then(|v| v.get("results").and_then(|r| r.as_array()).cloned())
                        .unwrap_or_default()
                } else {
                    // The whole share was refused there (a 429, a 503): each event says so.
                    let error = body.and_then(|v| v.get("error").cloned()).unwrap_or_else(|| {
                        json!({"code": "not_here", "message": format!("node {:?} answered {status}", owner.name)})
                    });
                    vec![json!({ "error": error }); indices.len()]
                }
            }
            Err(refusal) => vec![error_item(refusal.code, &refusal.message); indices.len()],
        };
        for (k, i) in indices.iter().enumerate() {
            results[*i] = Some(shares.get(k).cloned().unwrap_or_else(|| {
                error_item("not_here", "the serving node gave no result for this event")
            }));
        }
    }
    if !here.is_empty() {
        let items = here
            .iter()
            .map(|i| {
                serde_json::from_str::<EventInput>(batch.events[*i].get()).map_err(|e| {
                    Refusal::bad_request("invalid_request", format!("invalid event: {e}"))
                })
            })
            .collect();
        let local = match domain::check_capacity(state) {
            Ok(()) => domain::ingest_batch(state, items).await,
            Err(e) => Err(e),
        };
        match local {
            Ok(outcomes) => {
                for (i, outcome) in here.iter().zip(outcomes) {
                    results[*i] = Some(match outcome {
                        Ok(id) => json!({ "id": id }),
                        Err(e) => error_item(e.code, &e.message),
                    });
                }
            }
            // Nothing went elsewhere: the refusal is the batch's, as on one node.
            Err(refusal) if there.is_empty() => return Err(refusal),
            Err(refusal) => {
                for i in &here {
                    results[*i] = Some(error_item(refusal.code, &refusal.message));
                }
            }
        }
    }
    metrics::histogram!("kyberhook_ingest_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    let results: Vec<Value> = results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| error_item("internal", "no result")))
        .collect();
    Ok(json_response(
        StatusCode::ACCEPTED,
        &json!({ "results": results }),
    ))
}

fn error_item(code: &str, message: &str) -> Value {
    json!({ "error": { "code": code, "message": message } })
}
