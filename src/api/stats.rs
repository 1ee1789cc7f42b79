//! Statistics routes (HTTP side): `GET /v1/accounts/{id}/webhooks/{id}/stats?window=24h|7d`
//! (account scope) and `GET /v1/admin/stats` (admin token), as JSON views of what
//! [`domain::stats`](crate::domain::stats) reads. The dashboard's charts show the same values.

use http::StatusCode;
use serde_json::{json, Value};

use super::{json_response, ApiResult, Call};
use crate::domain::stats as domain;
use crate::domain::{paging, Refusal, Services};
use crate::ids::WebhookId;
use crate::model::rfc3339;
use crate::stats::Bucket;

pub fn bucket_view(b: &Bucket) -> Value {
    json!({
        "start": rfc3339(b.start_ms),
        "delivered": b.delivered,
        "retrying": b.retrying,
        "failed": b.failed,
        "p50_ms": b.p50_ms,
        "p95_ms": b.p95_ms,
    })
}

/// `GET …/webhooks/{webhook_id}/stats`.
pub fn webhook(state: &Services, call: Call, account_raw: &str, raw: &str) -> ApiResult {
    let account = call.caller.scope(state, account_raw)?;
    let id = WebhookId::parse(raw).ok_or_else(|| crate::domain::webhooks::not_found(raw))?;
    let params = call.query();
    // Strict like the listings: an unknown parameter is a 400, not ignored.
    let page = paging(&params, &["window"])?;
    if page.cursor.is_some() || params.iter().any(|(k, _)| k == "limit") {
        return Err(Refusal::bad_request(
            "invalid_query",
            "statistics take only the window parameter",
        ));
    }
    let window = domain::parse_window(
        params
            .iter()
            .find(|(k, _)| k == "window")
            .map(|(_, v)| v.as_str()),
    )?;
    let buckets = domain::webhook_stats(state, &account, id, window)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "window": window.as_str(),
            "buckets": buckets.iter().map(bucket_view).collect::<Vec<_>>(),
        }),
    ))
}

fn backlog_view(a: &domain::AccountBacklog) -> Value {
    json!({ "account_id": a.id.as_str(), "name": a.name, "plan": a.plan, "waiting": a.waiting })
}

/// The JSON of the operator overview.
pub fn overview_view(o: &domain::Overview) -> Value {
    let stages: serde_json::Map<String, Value> = o
        .lag_stages
        .iter()
        .map(|(stage, ms)| (stage.to_string(), json!(ms)))
        .collect();
    json!({
        "version": o.version,
        "started_at": rfc3339(o.started_ms),
        "uptime_seconds": o.uptime_secs(),
        "events_per_second": o.events_per_second(),
        "deliveries_per_second": o.deliveries_per_second(),
        "delivery_lag_ms": o.lag_ms,
        "delivery_lag_stages_ms": stages,
        "backlog": {
            "total": o.backlog_total,
            "quota_per_account": o.backlog_quota,
            "top_accounts": o.backlog_top.iter().map(backlog_view).collect::<Vec<_>>(),
        },
        "accounts_over_quota": o.over_quota.iter().map(backlog_view).collect::<Vec<_>>(),
        "storage": {
            "store_bytes": o.store_bytes,
            "disk_free_bytes": o.disk_free_bytes,
            "disk_total_bytes": o.disk_total_bytes,
        },
        "webhooks": {
            "active": o.webhooks[0],
            "paused": o.webhooks[1],
            "disabled": o.webhooks[2],
        },
        "last_hour": o.minutes.iter().map(|m| json!({
            "start": rfc3339(m.minute * 60_000),
            "events": m.events,
            "delivered": m.delivered,
            "failed": m.failed,
            "delivery_lag_ms": m.lag_ms,
            "waiting": m.waiting,
        })).collect::<Vec<_>>(),
    })
}

/// Refuses any query parameter (the admin views take none).
fn no_query(call: &Call) -> Result<(), Refusal> {
    match call.query().first() {
        Some((k, _)) => Err(Refusal::bad_request(
            "invalid_query",
            format!("unknown query parameter {k:?}"),
        )),
        None => Ok(()),
    }
}

/// `GET /v1/admin/cluster`: the nodes sharing the store and the partition count.
pub async fn cluster(state: &Services, call: Call) -> ApiResult {
    call.caller.require_admin()?;
    no_query(&call)?;
    let c = domain::cluster(state).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "backend": c.backend,
            "partitions": c.partitions,
            "nodes": c.nodes.iter().map(|n| json!({
                "name": n.name,
                "advertise": n.advertise,
                "partitions": n.partitions,
                "serving": n.serving,
                "last_seen": rfc3339(n.last_seen_ms),
            })).collect::<Vec<_>>(),
        }),
    ))
}

/// `GET /v1/admin/stats`.
pub async fn admin(state: &Services, call: Call) -> ApiResult {
    call.caller.require_admin()?;
    no_query(&call)?;
    let o = domain::overview(state).await?;
    Ok(json_response(StatusCode::OK, &overview_view(&o)))
}
