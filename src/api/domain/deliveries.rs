//! Delivery-log rules: which filters a query may use (the webhook must be the account's, the
//! event must be in the catalog), one delivery with the request exactly as sent and every
//! attempt, and the manual retry (only while the webhook is active). Filters enter as query
//! parameters (the API's and the dashboard's forms use the same names); records leave as
//! [`DeliveryRecord`] / [`DeliveryDetail`].

use http::StatusCode;

use crate::api::{paging, ApiError, AppState};
use crate::ids::{AccountId, DeliveryId, WebhookId};
use crate::model::{parse_rfc3339, AttemptRecord, DeliveryRecord, DeliveryStatus, WebhookStatus};
use crate::store::{DeliveryPage, DeliveryQuery};

/// One delivery with what was sent and what came back.
#[derive(Debug, Clone)]
pub struct DeliveryDetail {
    pub record: DeliveryRecord,
    /// The request headers as the latest attempt sent them (timestamp and signature differ
    /// per attempt; without an attempt they are left out).
    pub request_headers: Vec<(String, String)>,
    /// The payload, byte for byte (lossy only if it is not UTF-8).
    pub body: Option<String>,
    /// The first attempt and the latest ones (see `history`).
    pub attempts: Vec<AttemptRecord>,
    /// Attempts made but no longer stored: `attempt_count` minus those kept.
    pub attempts_omitted: u32,
}

/// Builds the query of a delivery list from its parameters (`limit`, `cursor`, `status`,
/// `event`, `since`, `until`, and `webhook_id` unless the list is already one webhook's).
/// Unknown parameters and bad values are 400s; another account's webhook is a 404.
pub fn query_from_params(
    state: &AppState,
    account: &AccountId,
    webhook: Option<WebhookId>,
    params: &[(String, String)],
) -> Result<DeliveryQuery, ApiError> {
    let allowed: &[&str] = if webhook.is_some() {
        &["status", "event", "since", "until"]
    } else {
        &["webhook_id", "status", "event", "since", "until"]
    };
    let page = paging(params, allowed)?;
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
    for (k, v) in params {
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

/// One page of the account's delivery log, newest first.
pub fn list_deliveries(
    state: &AppState,
    account: &AccountId,
    q: &DeliveryQuery,
) -> Result<DeliveryPage, ApiError> {
    Ok(state.store.list_deliveries(account, q)?)
}

/// The delivery `id` of `account` (another account's delivery is not found).
pub fn get_record(
    state: &AppState,
    account: &AccountId,
    id: DeliveryId,
) -> Result<DeliveryRecord, ApiError> {
    state
        .store
        .get_delivery(id)?
        .filter(|d| d.account_id == *account)
        .ok_or_else(|| {
            ApiError::not_found(
                "delivery_not_found",
                format!("no delivery {:?}", id.to_string()),
            )
        })
}

pub fn get_delivery(
    state: &AppState,
    account: &AccountId,
    id: DeliveryId,
) -> Result<DeliveryDetail, ApiError> {
    let record = get_record(state, account, id)?;
    let attempts = state.store.attempts(record.id)?;
    let body = state
        .store
        .get_event(record.id.seq)?
        .map(|e| String::from_utf8_lossy(&e.body).into_owned());
    let last = attempts.last();
    let request_headers = crate::signing::recorded_headers(
        &record.event,
        record.id,
        last.map(|a| (a.timestamp, a.signature.as_str())),
    );
    Ok(DeliveryDetail {
        attempts_omitted: crate::history::attempts_omitted(record.attempt_count, attempts.len()),
        record,
        request_headers,
        body,
        attempts,
    })
}

/// Schedules one more attempt now. Refused (409) unless the webhook is active.
pub async fn retry_delivery(
    state: &AppState,
    account: &AccountId,
    id: DeliveryId,
) -> Result<DeliveryRecord, ApiError> {
    let record = get_record(state, account, id)?;
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
    state
        .manual_retries
        .check(account, record.id)
        .map_err(|l| ApiError::too_many("retry_rate_limited", l.to_string(), l.retry_after_secs))?;
    // The delivery writer applies it, so an attempt's outcome cannot overwrite it; during an
    // attempt it runs once the attempt has ended.
    let record = state
        .deliverer
        .deliveries
        .retry(record.id, account.clone())
        .await?
        .ok_or_else(|| {
            ApiError::not_found(
                "delivery_not_found",
                format!("no delivery {:?}", id.to_string()),
            )
        })?;
    state.ingest.sync().await?;
    Ok(record)
}
