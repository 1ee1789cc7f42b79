//! Ingest routes (HTTP side): admin scope, bounded body reads, JSON parsing of one event or a
//! batch, the views of their outcome, and the event catalog. The rules (capacity, validation,
//! building, durable commit) are in [`domain::events`](crate::domain::events); the 202 is sent
//! only once the commit that holds the events is durable.

use http::StatusCode;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::{json_response, parse_json, ApiResult, Call};
use crate::domain::events as domain;
use crate::domain::{Refusal, Services};
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
    domain::check_capacity(state)?;
    let bytes = call.bytes(state).await?;
    let input: EventInput = parse_json(&bytes)?;
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
    domain::check_capacity(state)?;
    let bytes = call.bytes(state).await?;
    let batch: Batch = parse_json(&bytes)?;
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
