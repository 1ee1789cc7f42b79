//! Delivery-log rules: which filters a query may use (the webhook must be the account's, the
//! event must be in the catalog), one delivery with the request exactly as sent and every
//! attempt, and the manual retry (only while the webhook is active). Filters enter as query
//! parameters (the API's and the dashboard's forms use the same names); records leave as
//! [`DeliveryRecord`] / [`DeliveryDetail`].

use http::StatusCode;

use super::{paging, Refusal, Services};
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

/// A delivery-log query: the store's filters, plus the exact delivery id, which is looked up
/// rather than scanned for.
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    pub store: DeliveryQuery,
    pub delivery_id: Option<DeliveryId>,
    /// An `event_id` or `delivery_id` that names nothing of the account: nothing matches.
    pub matches_nothing: bool,
}

impl std::ops::Deref for LogQuery {
    type Target = DeliveryQuery;
    fn deref(&self) -> &DeliveryQuery {
        &self.store
    }
}

/// Builds the query of a delivery list from its parameters (`limit`, `cursor`, `status`,
/// `event`, `since`, `until`, `event_id`, `delivery_id`, and `webhook_id` unless the list is
/// already one webhook's). Unknown parameters and bad values are 400s; another account's
/// webhook is a 404. `event_id` and `delivery_id` are exact: an id that names nothing of the
/// account matches nothing (an empty list, not an error).
pub fn query_from_params(
    state: &Services,
    account: &AccountId,
    webhook: Option<WebhookId>,
    params: &[(String, String)],
) -> Result<LogQuery, Refusal> {
    let allowed: &[&str] = if webhook.is_some() {
        &[
            "status",
            "event",
            "since",
            "until",
            "event_id",
            "delivery_id",
        ]
    } else {
        &[
            "webhook_id",
            "status",
            "event",
            "since",
            "until",
            "event_id",
            "delivery_id",
        ]
    };
    let page = paging(params, allowed)?;
    let mut out = LogQuery::default();
    let mut q = DeliveryQuery {
        webhook,
        limit: page.limit,
        ..Default::default()
    };
    if let Some(c) = page.cursor {
        q.cursor = Some(DeliveryId::parse(&c).ok_or_else(|| {
            Refusal::bad_request("invalid_cursor", "cursor is not one this API gave")
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
                        Refusal::not_found("webhook_not_found", format!("no webhook {v:?}"))
                    })?;
                q.webhook = Some(id);
            }
            "status" => {
                q.status = Some(DeliveryStatus::parse(v).ok_or_else(|| {
                    Refusal::bad_request(
                        "invalid_query",
                        "status must be one of pending, delivered, retrying, failed",
                    )
                })?)
            }
            "event" => {
                if !state.registry.is_cataloged(v) {
                    return Err(Refusal::bad_request(
                        "invalid_query",
                        format!("event {v:?} is not in the catalog"),
                    ));
                }
                q.event = Some(v.clone());
            }
            "since" | "until" => {
                let ms = parse_rfc3339(v).ok_or_else(|| {
                    Refusal::bad_request(
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
            "event_id" => {
                let id = v.trim();
                if id.is_empty() || id.len() > 255 {
                    return Err(Refusal::bad_request(
                        "invalid_query",
                        "event_id must be 1 to 255 characters",
                    ));
                }
                match state.store.event_seq(account, id)? {
                    Some(seq) => q.event_seq = Some(seq),
                    None => out.matches_nothing = true,
                }
            }
            "delivery_id" => {
                match DeliveryId::parse(v.trim()) {
                    Some(id) => out.delivery_id = Some(id),
                    // Not an id this API gives: it names nothing.
                    None if v.trim().starts_with("dlv_") => out.matches_nothing = true,
                    None => {
                        return Err(Refusal::bad_request(
                            "invalid_query",
                            "delivery_id must be a delivery id like dlv_…",
                        ))
                    }
                }
            }
            _ => {}
        }
    }
    out.store = q;
    Ok(out)
}

/// Whether a record passes the query's filters (for the exact `delivery_id` lookup, which
/// does not go through the store's scan).
fn matches(q: &DeliveryQuery, r: &DeliveryRecord) -> bool {
    let created = r.id.created_ms();
    q.webhook.map_or(true, |w| r.id.webhook == w)
        && q.status.map_or(true, |s| s == r.status)
        && q.event.as_ref().map_or(true, |e| *e == r.event)
        && q.since_ms.map_or(true, |s| created >= s)
        && q.until_ms.map_or(true, |u| created <= u)
        && q.event_seq.map_or(true, |seq| r.id.seq == seq)
        && q.cursor.map_or(true, |c| r.id.to_bytes() < c.to_bytes())
}

/// One page of the account's delivery log, newest first.
pub fn list_deliveries(
    state: &Services,
    account: &AccountId,
    q: &LogQuery,
) -> Result<DeliveryPage, Refusal> {
    if q.matches_nothing {
        return Ok(DeliveryPage {
            items: Vec::new(),
            next_cursor: None,
        });
    }
    if let Some(id) = q.delivery_id {
        let items = state
            .store
            .get_delivery(id)?
            .filter(|r| r.account_id == *account && matches(&q.store, r))
            .into_iter()
            .collect();
        return Ok(DeliveryPage {
            items,
            next_cursor: None,
        });
    }
    Ok(state.store.list_deliveries(account, &q.store)?)
}

/// The delivery `id` of `account` (another account's delivery is not found).
pub fn get_record(
    state: &Services,
    account: &AccountId,
    id: DeliveryId,
) -> Result<DeliveryRecord, Refusal> {
    state
        .store
        .get_delivery(id)?
        .filter(|d| d.account_id == *account)
        .ok_or_else(|| {
            Refusal::not_found(
                "delivery_not_found",
                format!("no delivery {:?}", id.to_string()),
            )
        })
}

/// How many times [`get_delivery`] re-reads a held delivery whose attempt is being written
/// (2 ms apart).
const HELD_WRITE_WAITS: u32 = 250;

pub fn get_delivery(
    state: &Services,
    account: &AccountId,
    id: DeliveryId,
) -> Result<DeliveryDetail, Refusal> {
    let (record, attempts) = read_settled(
        || state.store.is_held(id),
        || {
            let record = get_record(state, account, id)?;
            let attempts = state.store.attempts(record.id)?;
            Ok((record, attempts))
        },
        || std::thread::sleep(std::time::Duration::from_millis(2)),
    )?;
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

/// Reads a delivery's record with its attempts, the two agreeing.
///
/// A delivery the writer holds shows its new state before that state's attempt is written
/// (readers never see an older state than the stored one): until the write lands, which takes
/// a few milliseconds, the record names an attempt the store does not have yet. So a short list
/// of attempts is taken as it is only when the delivery was not held before the record was read
/// nor after the attempts were: asked only after, a record read while held could be released
/// (its write landed) in between and be shown with the attempts read before that write. A stored
/// record always has its attempts: they are written before it, or in its transaction.
fn read_settled(
    is_held: impl Fn() -> bool,
    mut read: impl FnMut() -> Result<(DeliveryRecord, Vec<AttemptRecord>), Refusal>,
    mut pause: impl FnMut(),
) -> Result<(DeliveryRecord, Vec<AttemptRecord>), Refusal> {
    let mut tries = 0;
    loop {
        let was_held = is_held();
        let (record, attempts) = read()?;
        let complete = attempts.len() >= crate::history::attempts_kept(record.attempt_count);
        if complete || tries == HELD_WRITE_WAITS || (!was_held && !is_held()) {
            return Ok((record, attempts));
        }
        tries += 1;
        pause();
    }
}

/// Schedules one more attempt now. Refused (409) unless the webhook is active.
pub async fn retry_delivery(
    state: &Services,
    account: &AccountId,
    id: DeliveryId,
) -> Result<DeliveryRecord, Refusal> {
    let record = get_record(state, account, id)?;
    let hook = state.registry.hook(record.id.webhook).ok_or_else(|| {
        Refusal::not_found(
            "webhook_not_found",
            "the delivery's webhook no longer exists",
        )
    })?;
    if hook.hook.status != WebhookStatus::Active {
        return Err(Refusal::new(
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
        .map_err(|l| Refusal::too_many("retry_rate_limited", l.to_string(), l.retry_after_secs))?;
    // The delivery writer applies it, so an attempt's outcome cannot overwrite it; during an
    // attempt it runs once the attempt has ended.
    let record = state
        .deliverer
        .deliveries
        .retry(record.id, account.clone())
        .await?
        .ok_or_else(|| {
            Refusal::not_found(
                "delivery_not_found",
                format!("no delivery {:?}", id.to_string()),
            )
        })?;
    state.ingest.sync().await?;
    Ok(record)
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};

    use super::*;
    use crate::ids::{EventId, WebhookId};

    fn pending() -> DeliveryRecord {
        DeliveryRecord {
            id: DeliveryId {
                seq: 1,
                webhook: WebhookId(1),
            },
            account_id: AccountId::parse("acc_1").unwrap(),
            event_id: EventId::from_seq(1),
            event: "user.login".into(),
            status: DeliveryStatus::Pending,
            attempt_count: 0,
            response_code: None,
            response_time_ms: None,
            updated_ms: 0,
            next_attempt_ms: Some(0),
            note: None,
            is_test: false,
        }
    }

    fn attempt() -> AttemptRecord {
        AttemptRecord {
            number: 1,
            at_ms: 0,
            response_code: Some(200),
            response_time_ms: 3,
            response_headers: vec![],
            response_body: String::new(),
            error: None,
            timestamp: 0,
            signature: "v1,sig".into(),
        }
    }

    /// The writer's side, scripted: the delivery is held in its delivered state, and its write
    /// lands (attempt stored, hold released) right after a reader has read the attempts.
    struct Writer {
        held: Cell<bool>,
        stored_attempts: RefCell<Vec<AttemptRecord>>,
        reads: Cell<u32>,
    }

    impl Writer {
        fn read(&self, delivered: &DeliveryRecord) -> (DeliveryRecord, Vec<AttemptRecord>) {
            self.reads.set(self.reads.get() + 1);
            let record = delivered.clone();
            let attempts = self.stored_attempts.borrow().clone();
            if self.held.get() {
                self.stored_attempts.borrow_mut().push(attempt());
                self.held.set(false);
            }
            (record, attempts)
        }
    }

    #[test]
    fn a_record_read_while_held_is_never_shown_with_attempts_read_before_its_write() {
        let mut delivered = pending();
        delivered.status = DeliveryStatus::Delivered;
        delivered.attempt_count = 1;
        delivered.next_attempt_ms = None;
        let writer = Writer {
            held: Cell::new(true),
            stored_attempts: RefCell::new(vec![]),
            reads: Cell::new(0),
        };
        let (record, attempts) =
            read_settled(|| writer.held.get(), || Ok(writer.read(&delivered)), || {}).unwrap();
        assert_eq!(record.status, DeliveryStatus::Delivered);
        assert_eq!(attempts.len(), 1, "the delivered record's attempt is shown");
        assert_eq!(writer.reads.get(), 2, "read again once the write landed");
    }

    /// How many reads `read_settled` makes of a record naming one attempt while the store has
    /// none, with the delivery `held` (or not) throughout, and how many attempts it shows.
    fn reads_with_no_attempt_stored(held: bool) -> (u32, usize) {
        let mut r = pending();
        r.attempt_count = 1;
        let reads = Cell::new(0);
        let (_, attempts) = read_settled(
            || held,
            || {
                reads.set(reads.get() + 1);
                Ok((r.clone(), vec![]))
            },
            || {},
        )
        .unwrap();
        (reads.get(), attempts.len())
    }

    #[test]
    fn a_stored_record_with_fewer_attempts_than_kept_is_taken_at_once() {
        // Not held at all: what the store has is the truth (attempts written before the
        // record), so there is nothing to wait for.
        assert_eq!(reads_with_no_attempt_stored(false), (1, 0));
    }

    #[test]
    fn a_delivery_held_for_good_is_read_a_bounded_number_of_times() {
        assert_eq!(
            reads_with_no_attempt_stored(true),
            (HELD_WRITE_WAITS + 1, 0)
        );
    }
}
