//! Delivery-log routes (HTTP side): account scope, id and query parsing, and the JSON views of
//! the lists (per account, per webhook), one delivery with its request and every attempt, and
//! the manual retry. The rules are in [`domain::deliveries`](crate::domain::deliveries).

use http::StatusCode;
use serde_json::{json, Value};

use super::{json_response, list_response, ApiResult, Call};
use crate::domain::deliveries as domain;
use crate::domain::{Refusal, Services};
use crate::ids::{AccountId, DeliveryId, WebhookId};
use crate::model::{rfc3339, AttemptRecord, DeliveryRecord};

pub fn summary(d: &DeliveryRecord) -> Value {
    json!({
        "id": d.id.to_string(),
        "webhook_id": d.id.webhook.to_string(),
        "event_id": d.event_id.as_str(),
        "event": d.event,
        "status": d.status.as_str(),
        "attempt_count": d.attempt_count,
        "response_code": d.response_code,
        "response_time_ms": d.response_time_ms,
        "created_at": rfc3339(d.id.created_ms()),
        "updated_at": rfc3339(d.updated_ms),
        "next_attempt_at": d.next_attempt_ms.map(rfc3339),
        "note": d.note,
    })
}

fn attempt_view(a: &AttemptRecord) -> Value {
    let headers: serde_json::Map<String, Value> = a
        .response_headers
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    json!({
        "number": a.number,
        "at": rfc3339(a.at_ms),
        "response_code": a.response_code,
        "response_time_ms": a.response_time_ms,
        "response_headers": headers,
        "response_body": a.response_body,
        "error": a.error,
    })
}

fn page_response(state: &Services, account: &AccountId, q: domain::LogQuery) -> ApiResult {
    let page = domain::list_deliveries(state, account, &q)?;
    Ok(list_response(
        page.items.iter().map(summary).collect(),
        page.next_cursor.map(|c| c.to_string()),
    ))
}

pub fn list(state: &Services, call: Call, account_raw: &str) -> ApiResult {
    let account = call.caller.scope(state, account_raw)?;
    let q = domain::query_from_params(state, &account, None, &call.query())?;
    page_response(state, &account, q)
}

pub fn list_for_webhook(state: &Services, call: Call, account_raw: &str, raw: &str) -> ApiResult {
    let account = call.caller.scope(state, account_raw)?;
    let id = WebhookId::parse(raw)
        .filter(|id| crate::domain::webhooks::get_webhook(state, &account, *id).is_ok())
        .ok_or_else(|| Refusal::not_found("webhook_not_found", format!("no webhook {raw:?}")))?;
    let q = domain::query_from_params(state, &account, Some(id), &call.query())?;
    page_response(state, &account, q)
}

fn ids(
    state: &Services,
    call: &Call,
    account_raw: &str,
    raw: &str,
) -> Result<(AccountId, DeliveryId), Refusal> {
    let account = call.caller.scope(state, account_raw)?;
    let id = DeliveryId::parse(raw)
        .ok_or_else(|| Refusal::not_found("delivery_not_found", format!("no delivery {raw:?}")))?;
    Ok((account, id))
}

pub fn get(state: &Services, call: Call, account_raw: &str, raw: &str) -> ApiResult {
    let (account, id) = ids(state, &call, account_raw, raw)?;
    let detail = domain::get_delivery(state, &account, id)?;
    let headers: serde_json::Map<String, Value> = detail
        .request_headers
        .into_iter()
        .map(|(k, v)| (k, json!(v)))
        .collect();
    let mut out = summary(&detail.record);
    out["request"] = json!({ "headers": headers, "body": detail.body });
    out["attempts"] = Value::Array(detail.attempts.iter().map(attempt_view).collect());
    out["attempts_omitted"] = json!(detail.attempts_omitted);
    Ok(json_response(StatusCode::OK, &out))
}

pub async fn retry(state: &Services, call: Call, account_raw: &str, raw: &str) -> ApiResult {
    let (account, id) = ids(state, &call, account_raw, raw)?;
    let record = domain::retry_delivery(state, &account, id).await?;
    Ok(json_response(
        StatusCode::ACCEPTED,
        &json!({ "id": record.id.to_string(), "status": record.status.as_str() }),
    ))
}
