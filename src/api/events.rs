//! Ingest routes: one event, a batch of events, and the event catalog.
//!
//! Each event is validated and built here (on the async workers), then submitted to the group
//! committer in `ingest`; the 202 is sent only once the commit that holds it is durable.

use http::StatusCode;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::{json_response, parse_json, ApiError, ApiResult, AppState, Call};
use crate::ingest::{Accepted, EventInput, Rejection};

/// Most events one batch request may carry.
pub const MAX_BATCH_EVENTS: usize = 1000;

pub fn event_types(state: &AppState) -> ApiResult {
    Ok(json_response(
        StatusCode::OK,
        &json!({ "data": state.registry.catalog() }),
    ))
}

fn rejection_error(r: &Rejection) -> ApiError {
    let (status, code) = match r {
        Rejection::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
        Rejection::UnknownAccount(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unknown_account"),
        Rejection::UnknownEventType(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unknown_event_type"),
    };
    ApiError::new(status, code, r.to_string())
}

/// Refuses new events while more deliveries wait than the engine is configured to hold.
fn check_capacity(state: &AppState) -> Result<(), ApiError> {
    let waiting = state.scheduler.scheduled();
    if waiting > state.config.delivery.max_scheduled {
        return Err(ApiError::busy(format!(
            "{waiting} deliveries are waiting (delivery.max_scheduled); retry shortly"
        )));
    }
    Ok(())
}

pub async fn ingest_one(state: &AppState, call: Call) -> ApiResult {
    let started = std::time::Instant::now();
    call.caller.require_admin()?;
    check_capacity(state)?;
    let bytes = call.bytes(state).await?;
    let input: EventInput = parse_json(&bytes)?;
    let record = state
        .ingest
        .prepare(&input)
        .map_err(|r| rejection_error(&r))?;
    let accepted = state.ingest.submit(vec![record]).await?;
    let id = accepted
        .first()
        .map(|a| a.id().as_str().to_string())
        .ok_or_else(|| ApiError::internal("the committer returned no result"))?;
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

pub async fn ingest_batch(state: &AppState, call: Call) -> ApiResult {
    let started = std::time::Instant::now();
    call.caller.require_admin()?;
    check_capacity(state)?;
    let bytes = call.bytes(state).await?;
    let batch: Batch = parse_json(&bytes)?;
    if batch.events.len() > MAX_BATCH_EVENTS {
        return Err(ApiError::bad_request(
            "batch_too_large",
            format!("a batch holds at most {MAX_BATCH_EVENTS} events"),
        ));
    }
    // Per item: a prepared record (index into `records`) or an error.
    let mut slots: Vec<Result<usize, Value>> = Vec::with_capacity(batch.events.len());
    let mut records = Vec::with_capacity(batch.events.len());
    for raw in &batch.events {
        let prepared = serde_json::from_str::<EventInput>(raw.get())
            .map_err(|e| ApiError::bad_request("invalid_request", format!("invalid event: {e}")))
            .and_then(|input| {
                state
                    .ingest
                    .prepare(&input)
                    .map_err(|r| rejection_error(&r))
            });
        slots.push(match prepared {
            Ok(record) => {
                records.push(record);
                Ok(records.len() - 1)
            }
            Err(e) => Err(json!({ "error": { "code": e.code, "message": e.message } })),
        });
    }
    let accepted: Vec<Accepted> = state.ingest.submit(records).await?;
    metrics::histogram!("kyberhook_ingest_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    let results: Vec<Value> = slots
        .into_iter()
        .map(|slot| match slot {
            Ok(i) => json!({ "id": accepted.get(i).map(|a| a.id().as_str()) }),
            Err(e) => e,
        })
        .collect();
    Ok(json_response(
        StatusCode::ACCEPTED,
        &json!({ "results": results }),
    ))
}
