//! Webhook routes (HTTP side): account scope, id and body parsing, and the JSON views of
//! create, list, read, update (including pause/resume), delete, signing-secret read and
//! rotation, and the test tool. The rules are in [`domain::webhooks`](crate::domain::webhooks).

use http::StatusCode;
use serde_json::{json, Value};

use super::{empty_response, json_response, list_response, ApiResult, Call};
use crate::domain::webhooks as domain;
pub use crate::domain::webhooks::{
    CreateWebhook, RecoverRequest, RotateSecret, TestRequest, UpdateWebhook,
};
use crate::domain::{paging, Refusal, Services};
use crate::ids::{AccountId, WebhookId};
use crate::model::{now_ms, rfc3339, Webhook};

/// A webhook as the API shows it, with its delivery slots as they are now: the adaptive
/// `concurrency_limit` and the `backlog` waiting behind it.
pub fn view(state: &Services, h: &Webhook) -> Value {
    let slots = state.deliverer.slots_of(h);
    json!({
        "id": h.id.to_string(),
        "account_id": h.account_id.as_str(),
        "name": h.name,
        "url": h.url,
        "description": h.description,
        "events": h.events,
        "ip_allowlist": h.ip_allowlist,
        "status": h.status.as_str(),
        "disabled_reason": h.disabled_reason,
        "consecutive_failures": h.consecutive_failures,
        "signature_scheme": h.signature_scheme.as_str(),
        "ordering": h.ordering.as_str(),
        "max_concurrency": h.max_concurrency,
        "concurrency_limit": slots.limit,
        "backlog": {
            "waiting": slots.waiting,
            "oldest_waiting_ms": slots.oldest_waiting_ms,
        },
        "secret_rotation_ends_at": rotation_ends_at(h),
        "created_at": rfc3339(h.created_ms),
        "updated_at": rfc3339(h.updated_ms),
    })
}

/// When the running rotation grace ends (null when none runs).
fn rotation_ends_at(h: &Webhook) -> Option<String> {
    h.rotation_grace_ends(now_ms()).map(rfc3339)
}

/// The account the caller may reach and the webhook id the path names.
fn ids(
    state: &Services,
    call: &Call,
    account_raw: &str,
    raw: &str,
) -> Result<(AccountId, WebhookId), Refusal> {
    let account = call.caller.scope(state, account_raw)?;
    let id = WebhookId::parse(raw).ok_or_else(|| domain::not_found(raw))?;
    Ok((account, id))
}

pub async fn create(state: &Services, call: Call, account_raw: &str) -> ApiResult {
    let account = call.caller.scope(state, account_raw)?;
    let body: CreateWebhook = call.json(state).await?;
    let hook = domain::create_webhook(state, &account, body).await?;
    let mut out = view(state, &hook);
    out["secret"] = json!(hook.secret);
    Ok(json_response(StatusCode::CREATED, &out))
}

pub fn list(state: &Services, call: Call, account_raw: &str) -> ApiResult {
    let account = call.caller.scope(state, account_raw)?;
    let page = paging(&call.query(), &[])?;
    let (hooks, next) = domain::list_webhooks(state, &account, &page)?;
    Ok(list_response(
        hooks.iter().map(|h| view(state, h)).collect(),
        next,
    ))
}

pub fn get(state: &Services, call: Call, account_raw: &str, raw: &str) -> ApiResult {
    let (account, id) = ids(state, &call, account_raw, raw)?;
    let hook = domain::get_webhook(state, &account, id)?;
    Ok(json_response(StatusCode::OK, &view(state, &hook)))
}

pub fn secret(state: &Services, call: Call, account_raw: &str, raw: &str) -> ApiResult {
    let (account, id) = ids(state, &call, account_raw, raw)?;
    let hook = domain::get_webhook(state, &account, id)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "secret": hook.secret }),
    ))
}

pub async fn rotate_secret(
    state: &Services,
    call: Call,
    account_raw: &str,
    raw: &str,
) -> ApiResult {
    let (account, id) = ids(state, &call, account_raw, raw)?;
    // The body is optional: an empty one asks for the default grace.
    let bytes = call.bytes(state).await?;
    let body: RotateSecret = if bytes.iter().all(u8::is_ascii_whitespace) {
        RotateSecret::default()
    } else {
        super::parse_json(&bytes)?
    };
    let grace = domain::check_grace_period(body.grace_period.as_deref())?;
    let hook = domain::rotate_secret(state, &account, id, grace).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "secret": hook.secret, "secret_rotation_ends_at": rotation_ends_at(&hook) }),
    ))
}

pub async fn recover(state: &Services, call: Call, account_raw: &str, raw: &str) -> ApiResult {
    let (account, id) = ids(state, &call, account_raw, raw)?;
    // An unknown webhook is a 404 before the body is looked at.
    domain::get_webhook(state, &account, id)?;
    let body: RecoverRequest = call.json(state).await?;
    let n = domain::recover_webhook(state, &account, id, &body).await?;
    Ok(json_response(
        StatusCode::ACCEPTED,
        &json!({ "recovered": n }),
    ))
}

pub async fn update(state: &Services, call: Call, account_raw: &str, raw: &str) -> ApiResult {
    let (account, id) = ids(state, &call, account_raw, raw)?;
    let body: UpdateWebhook = call.json(state).await?;
    let hook = domain::update_webhook(state, &account, id, body).await?;
    Ok(json_response(StatusCode::OK, &view(state, &hook)))
}

pub async fn delete(state: &Services, call: Call, account_raw: &str, raw: &str) -> ApiResult {
    let (account, id) = ids(state, &call, account_raw, raw)?;
    domain::delete_webhook(state, &account, id).await?;
    Ok(empty_response(StatusCode::NO_CONTENT))
}

pub async fn test(state: &Services, call: Call, account_raw: &str, raw: &str) -> ApiResult {
    let (account, id) = ids(state, &call, account_raw, raw)?;
    // An unknown webhook is a 404 before the body is looked at.
    domain::get_webhook(state, &account, id)?;
    let body: TestRequest = call.json(state).await?;
    let outcome = domain::test_webhook(state, &account, id, &body.event).await?;
    let attempt = &outcome.attempt;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "delivery_id": outcome.delivery_id.to_string(),
            "status": outcome.status,
            "response_code": attempt.response_code,
            "response_time_ms": attempt.response_time_ms,
            "response_body": attempt.response_body,
            "error": attempt.error,
        }),
    ))
}
