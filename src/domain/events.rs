//! Ingest rules: the engine-wide backlog refusal (503), the push-back while deliveries lag (hold, then 503), the per-account backlog quota (429), validating and building each event, and the
//! batch's per-item outcome. Events enter as [`EventInput`] (already parsed JSON); they leave
//! as the accepted event ids once the commit that holds them is durable.

use http::StatusCode;

use super::{Refusal, Services};
use crate::backlog::BacklogFull;
use crate::ids::AccountId;
use crate::ingest::{Accepted, EventInput, PendingEvent, Rejection};

/// Most events one batch request may carry.
pub const MAX_BATCH_EVENTS: usize = 1000;

pub fn rejection_error(r: &Rejection) -> Refusal {
    let (status, code) = match r {
        Rejection::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
        Rejection::UnknownAccount(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unknown_account"),
        Rejection::UnknownEventType(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unknown_event_type"),
    };
    Refusal::new(status, code, r.to_string())
}

/// Refuses new events while more deliveries wait than the engine is configured to hold.
pub fn check_capacity(state: &Services) -> Result<(), Refusal> {
    let waiting = state.scheduler.scheduled();
    if waiting > state.config.delivery.max_scheduled {
        return Err(Refusal::busy(format!(
            "{waiting} deliveries are waiting (delivery.max_scheduled); retry shortly"
        )));
    }
    Ok(())
}

/// Push-back ([`crate::pushback`]): while deliveries lag more than `delivery.max_lag` behind
/// ingest, holds a request (before anything is committed) until they catch up, for at most
/// `delivery.max_lag_hold`, then refuses it with 503 `deliveries_lagging`. A request whose
/// events are all `delivery.priority_events` is never held.
pub async fn hold_while_lagging(state: &Services, events: &[PendingEvent]) -> Result<(), Refusal> {
    let d = &state.config.delivery;
    if !events.is_empty()
        && events
            .iter()
            .all(|e| state.config.is_priority(e.event_type()))
    {
        return Ok(());
    }
    let mut accounts: Vec<&AccountId> = Vec::with_capacity(1);
    for e in events {
        if !accounts.contains(&e.account_id()) {
            accounts.push(e.account_id());
        }
    }
    state
        .scheduler
        .lag()
        .hold(&accounts, d.max_lag, d.max_lag_hold)
        .await
        .map_err(|lagging| Refusal::lagging(lagging.to_string()))
}

/// Refuses a request if any of its events' accounts has `delivery.max_scheduled_per_account`
/// deliveries or more waiting (429): the whole request, so nothing is half-accepted.
pub fn check_backlog(state: &Services, events: &[PendingEvent]) -> Result<(), Refusal> {
    let mut checked: Option<&AccountId> = None;
    for e in events {
        let account = e.account_id();
        if checked == Some(account) {
            continue;
        }
        if let Err(full) = state.registry.backlog().check(account) {
            return Err(backlog_full(state, &full));
        }
        checked = Some(account);
    }
    Ok(())
}

fn backlog_full(state: &Services, full: &BacklogFull) -> Refusal {
    // An estimate of when room comes back: the excess at the account's plan rate, within a
    // minute (an endpoint that is down drains nothing, but asking again costs little).
    let per_second = state
        .registry
        .plan_of(&full.account)
        .and_then(|p| state.config.plans.get(&p).map(|p| p.events_per_second))
        .filter(|r| *r > 0)
        .unwrap_or(u32::MAX);
    let excess = full.waiting.saturating_sub(full.quota) + 1;
    let secs = excess.div_ceil(u64::from(per_second)).clamp(1, 60) as u32;
    Refusal::too_many("account_backlog_full", full.to_string(), secs)
}

/// Validates and builds one event (on the calling worker, before the committer sees it).
pub fn prepare(state: &Services, input: &EventInput) -> Result<PendingEvent, Refusal> {
    state.ingest.prepare(input).map_err(|r| rejection_error(&r))
}

/// Stores one event durably; returns its id.
pub async fn ingest_one(state: &Services, input: &EventInput<'_>) -> Result<String, Refusal> {
    let record = prepare(state, input)?;
    hold_while_lagging(state, std::slice::from_ref(&record)).await?;
    check_backlog(state, std::slice::from_ref(&record))?;
    let accepted = state.ingest.submit(vec![record]).await?;
    accepted
        .first()
        .map(|a| a.id().as_str().to_string())
        .ok_or_else(|| Refusal::internal("the committer returned no result"))
}

/// Stores every valid event of a batch in one commit; per item (already parsed, or the parse
/// error), its id or why it was refused.
pub async fn ingest_batch(
    state: &Services,
    items: Vec<Result<EventInput<'_>, Refusal>>,
) -> Result<Vec<Result<String, Refusal>>, Refusal> {
    if items.len() > MAX_BATCH_EVENTS {
        return Err(Refusal::bad_request(
            "batch_too_large",
            format!("a batch holds at most {MAX_BATCH_EVENTS} events"),
        ));
    }
    // Per item: a prepared record (index into `records`) or an error.
    let mut slots: Vec<Result<usize, Refusal>> = Vec::with_capacity(items.len());
    let mut records = Vec::with_capacity(items.len());
    for item in items {
        slots.push(item.and_then(|input| prepare(state, &input)).map(|record| {
            records.push(record);
            records.len() - 1
        }));
    }
    hold_while_lagging(state, &records).await?;
    check_backlog(state, &records)?;
    let accepted: Vec<Accepted> = state.ingest.submit(records).await?;
    Ok(slots
        .into_iter()
        .map(|slot| {
            slot.and_then(|i| {
                accepted
                    .get(i)
                    .map(|a| a.id().as_str().to_string())
                    .ok_or_else(|| Refusal::internal("the committer returned no result"))
            })
        })
        .collect())
}
