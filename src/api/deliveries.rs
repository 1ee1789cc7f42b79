//! Delivery-log routes: lists (per account, per webhook) with filters and cursors, one
//! delivery with its request and every attempt, and the manual retry.

use http::StatusCode;
use serde_json::{json, Value};

use super::{json_response, list_response, paging, ApiError, ApiResult, AppState, Call};
use crate::clock;
use crate::dispatch::request_headers;
use crate::ids::{AccountId, DeliveryId, WebhookId};
use crate::model::{
    parse_rfc3339, rfc3339, AttemptRecord, DeliveryRecord, DeliveryStatus, WebhookStatus,
};
use crate::store::DeliveryQuery;

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

fn query(
    state: &AppState,
    call: &Call,
    account: &AccountId,
    webhook: Option<WebhookId>,
) -> Result<DeliveryQuery, ApiError> {
    let params = call.query();
    let allowed: &[&str] = if webhook.is_some() {
        &["status", "event", "since", "until"]
    } else {
        &["webhook_id", "status", "event", "since", "until"]
    };
    let page = paging(&params, allowed)?;
    let mut q = DeliveryQuery {
        webhook,
        limit: page.limit,
        ..Default::default()
    };
    if let Some(c) = page.cursor {
        q.cursor = Some(DeliveryId::parse(&c).ok_or_else(|| {
            ApiError::bad_request("invalid_cursor", "cursor is not one this API gave")
        })?);
    }
    for (k, v) in &params {
        match k.as_str() {
            "webhook_id" => {
                let id = WebhookId::parse(v)
                    .filter(|id| {
                        state
                            .registry
                            .hook(*id)
                            .is_some_and(|h| h.hook.account_id == *account)
                    })
                    .ok_or_else(|| {
                        ApiError::not_found("webhook_not_found", format!("no webhook {v:?}"))
                    })?;
                q.webhook = Some(id);
            }
            "status" => {
                q.status = Some(DeliveryStatus::parse(v).ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_query",
                        "status must be one of pending, delivered, retrying, failed",
                    )
                })?)
            }
            "event" => {
                if !state.registry.is_cataloged(v) {
                    return Err(ApiError::bad_request(
                        "invalid_query",
                        format!("event {v:?} is not in the catalog"),
                    ));
                }
                q.event = Some(v.clone());
            }
            "since" | "until" => {
                let ms = parse_rfc3339(v).ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_query",
                        format!("{k} must be an RFC 3339 time like 2025-01-15T09:30:00Z"),
                    )
                })?;
                if k == "since" {
                    q.since_ms = Some(ms);
                } else {
                    q.until_ms = Some(ms);
                }
            }
            _ => {}
        }
    }
    Ok(q)
}

fn page_response(state: &AppState, account: &AccountId, q: DeliveryQuery) -> ApiResult {
    let page = state.store.list_deliveries(account, &q)?;
    Ok(list_response(
        page.items.iter().map(summary).collect(),
        page.next_cursor.map(|c| c.to_string()),
    ))
}

pub fn list(state: &AppState, call: Call, account_raw: &str) -> ApiResult {
    let account = call.caller.scope(state, account_raw)?;
    let q = query(state, &call, &account, None)?;
    page_response(state, &account, q)
}

pub fn list_for_webhook(state: &AppState, call: Call, account_raw: &str, raw: &str) -> ApiResult {
    let account = call.caller.scope(state, account_raw)?;
    let id = WebhookId::parse(raw)
        .filter(|id| {
            state
                .store
                .get_webhook(&account, *id)
                .ok()
                .flatten()
                .is_some()
        })
        .ok_or_else(|| ApiError::not_found("webhook_not_found", format!("no webhook {raw:?}")))?;
    let q = query(state, &call, &account, Some(id))?;
    page_response(state, &account, q)
}

fn load(state: &AppState, account: &AccountId, raw: &str) -> Result<DeliveryRecord, ApiError> {
    let missing = || ApiError::not_found("delivery_not_found", format!("no delivery {raw:?}"));
    let id = DeliveryId::parse(raw).ok_or_else(missing)?;
    state
        .store
        .get_delivery(id)?
        .filter(|d| d.account_id == *account)
        .ok_or_else(missing)
}

pub fn get(state: &AppState, call: Call, account_raw: &str, raw: &str) -> ApiResult {
    let account = call.caller.scope(state, account_raw)?;
    let record = load(state, &account, raw)?;
    let attempts = state.store.attempts(record.id)?;
    let body = state
        .store
        .get_event(record.id.seq)?
        .map(|e| String::from_utf8_lossy(&e.body).into_owned());
    // The request as the latest attempt sent it (timestamp and signature differ per attempt).
    let last = attempts.last();
    let headers: serde_json::Map<String, Value> = request_headers(
        &record.event,
        record.id,
        last.map_or(0, |a| a.timestamp),
        last.map_or("", |a| a.signature.as_str()),
    )
    .into_iter()
    .filter(|(k, _)| last.is_some() || !k.ends_with("timestamp") && !k.ends_with("signature"))
    .map(|(k, v)| (k.to_string(), json!(v)))
    .collect();
    let mut out = summary(&record);
    out["request"] = json!({ "headers": headers, "body": body });
    out["attempts"] = Value::Array(attempts.iter().map(attempt_view).collect());
    Ok(json_response(StatusCode::OK, &out))
}

pub async fn retry(state: &AppState, call: Call, account_raw: &str, raw: &str) -> ApiResult {
    let account = call.caller.scope(state, account_raw)?;
    let mut record = load(state, &account, raw)?;
    let hook = state.registry.hook(record.id.webhook).ok_or_else(|| {
        ApiError::not_found(
            "webhook_not_found",
            "the delivery's webhook no longer exists",
        )
    })?;
    if hook.hook.status != WebhookStatus::Active {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "webhook_not_active",
            format!(
                "the webhook is {}; set it active before retrying",
                hook.hook.status.as_str()
            ),
        ));
    }
    let now = clock::now_ms();
    let old_due = record.next_attempt_ms;
    // A token no earlier entry can hold, so exactly this retry fires.
    let token = now.max(old_due.map_or(0, |d| d + 1));
    record.next_attempt_ms = Some(token);
    if record.status != DeliveryStatus::Pending {
        record.status = DeliveryStatus::Retrying;
    }
    record.note = None;
    record.updated_ms = now;
    state.store.update_delivery(&record, old_due)?;
    state.ingest.sync().await?;
    state.scheduler.schedule(record.id, token, now);
    Ok(json_response(
        StatusCode::ACCEPTED,
        &json!({ "id": record.id.to_string(), "status": record.status.as_str() }),
    ))
}
