//! The delivery state machine: every transition of a delivery, as pure functions over typed
//! stages. Nothing here reads or writes the store (except [`admit`]'s one read, kept apart
//! from its pure decision, [`admission`]); the delivery writer (`writer.rs`) calls these on
//! the record it holds in its drain and applies the [`Step`] each returns — the record to
//! store, the schedule entry it leaves, the wheel entry to arm.
//!
//! | transition | from | to | function |
//! |---|---|---|---|
//! | create | — | `pending`, due at its token (a test send: no token) | [`created`] |
//! | admit | due entry | attempting ([`InFlight`]), [`Stopped`] or stale | [`admission`] |
//! | settle | attempting | `delivered` / `retrying` / `failed` / retry queued | [`settle`] |
//! | pause, disable | due entry of a webhook not active | `failed`, noted | [`stop`] |
//! | manual retry | any | `retrying` (`pending` stays), due now | [`retry_by_hand`] |
//! | recover | `failed` in a window | `retrying`, due now, noted | [`recover`] |
//! | 410 Gone | another open delivery of the webhook | `failed`, noted | [`end_gone`] |
//! | delete | any | removed with its webhook or account | the writer's `Forget` |
//!
//! An attempt whose delivery was deleted while it ran writes nothing: [`Settled::Gone`].
//!
//! A delivery's status and next-attempt time are set in one place, [`enter`], and always
//! together: a record is open (`pending`/`retrying`) exactly when it carries a token, the
//! time its next attempt is due, which is also what tells its current schedule entry from
//! superseded ones. A test send, attempted at once without a schedule entry, is the one open
//! record without a token. (`grep -rnE '\.(status|next_attempt_ms) = ' src` finds no other
//! assignment outside tests.)
//!
//! Settling an outcome decides the next attempt's time: the retry schedule's delay, raised to
//! what a `429` or `503` asks for in `Retry-After` (capped at a day, [`MAX_RETRY_AFTER_MS`]);
//! a `410 Gone` fails the delivery at once and has the writer end the webhook's other open
//! deliveries ([`end_gone`]). A manual retry or a recover gets a new token, due now and later
//! than any the delivery had ([`retry_token`]), so no earlier entry can pass for it.

use std::sync::Arc;

use crate::config::Config;
use crate::ids::DeliveryId;
use crate::model::{AttemptRecord, DeliveryRecord, DeliveryStatus, EventRecord, WebhookStatus};
use crate::partition::Shares;
use crate::registry::{HookEntry, Registry};
use crate::store::{Storage, StoreError};

// ---- stages ----

/// What a due schedule entry turned out to be when its attempt was about to start.
pub enum Admission {
    /// The record still carries the entry's token and the webhook is active: attempt it.
    Start(InFlight),
    /// The webhook stopped taking deliveries (paused, disabled): end the delivery.
    Stopped(Stopped),
    /// Superseded (attempted, retried by hand, ended) or deleted: nothing to do.
    Stale,
}

/// A delivery whose attempt is starting: the record as stored and the webhook as current at
/// that moment — a URL change or secret rotation made before it applies, none made after.
pub struct InFlight {
    pub record: DeliveryRecord,
    pub hook: Arc<HookEntry>,
    /// The schedule entry's token (`None` for a test send, which has no entry).
    pub(super) token: Option<u64>,
}

impl InFlight {
    /// The attempt a test send makes: it has no schedule entry.
    pub fn test(record: DeliveryRecord, hook: Arc<HookEntry>) -> InFlight {
        InFlight {
            record,
            hook,
            token: None,
        }
    }

    /// The number of the attempt being made.
    pub fn number(&self) -> u32 {
        self.record.attempt_count + 1
    }
}

/// A due delivery whose webhook is no longer active.
pub struct Stopped {
    pub(super) id: DeliveryId,
    pub(super) token: u64,
    pub(super) status: WebhookStatus,
}

/// What an attempt's outcome made of the delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Delivered,
    /// Another attempt is scheduled at this unix ms.
    Retrying {
        next_ms: u64,
    },
    /// No further attempt (schedule exhausted, or a test send).
    Failed,
    /// A manual retry was asked for while the attempt ran: it runs next, at this token.
    RetryQueued {
        next_ms: u64,
    },
    /// The delivery or its webhook was deleted while the attempt ran: nothing was written.
    Gone,
}

/// How a new delivery's first attempt is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstAttempt {
    /// By a schedule entry due at this unix ms (its token).
    Due(u64),
    /// At once, by the test tool, with no schedule entry and no retry.
    TestSend,
}

/// What the writer applies after a transition changed a record, besides storing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub(crate) struct Step {
    /// The token the record carried before: its schedule entry is removed once the new state
    /// is written (unless the token did not change).
    pub old_due: Option<u64>,
    /// The wheel entry to arm once the new state is written.
    pub wake: Option<Wake>,
}

/// A wheel entry: the record's token, and when the attempt is due (a manual retry's token can
/// lie ahead of now, yet it is due now).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Wake {
    pub token: u64,
    pub at: u64,
}

/// The state a transition leaves a delivery in.
#[derive(Debug, Clone, Copy)]
enum To {
    Pending { due: Option<u64> },
    Retrying { due: u64 },
    Delivered,
    Failed,
}

impl To {
    fn fields(self) -> (DeliveryStatus, Option<u64>) {
        match self {
            To::Pending { due } => (DeliveryStatus::Pending, due),
            To::Retrying { due } => (DeliveryStatus::Retrying, Some(due)),
            To::Delivered => (DeliveryStatus::Delivered, None),
            To::Failed => (DeliveryStatus::Failed, None),
        }
    }
}

/// The one place a delivery's status and next-attempt time change, always together.
fn enter(record: &mut DeliveryRecord, to: To) {
    let (status, next) = to.fields();
    record.status = status;
    record.next_attempt_ms = next;
}

// ---- transitions ----

/// A new delivery of `event`: `pending`, its first attempt made as `first` says.
pub fn created(
    id: DeliveryId,
    event: &EventRecord,
    now: u64,
    first: FirstAttempt,
) -> DeliveryRecord {
    let (status, next_attempt_ms) = match first {
        FirstAttempt::Due(due) => To::Pending { due: Some(due) },
        FirstAttempt::TestSend => To::Pending { due: None },
    }
    .fields();
    DeliveryRecord {
        id,
        account_id: event.account_id.clone(),
        event_id: event.id.clone(),
        event: event.event.clone(),
        status,
        attempt_count: 0,
        response_code: None,
        response_time_ms: None,
        updated_ms: now,
        next_attempt_ms,
        note: None,
        is_test: first == FirstAttempt::TestSend,
    }
}

impl DeliveryRecord {
    /// A new delivery due now, or a test send's ([`created`]).
    pub fn new(id: DeliveryId, event: &EventRecord, now: u64, is_test: bool) -> Self {
        let first = if is_test {
            FirstAttempt::TestSend
        } else {
            FirstAttempt::Due(now)
        };
        created(id, event, now, first)
    }
}

/// Checks a due entry against the stored record and the registry. Called when the attempt is
/// about to start (not when the entry was queued), so that a pause, delete, URL change or
/// rotation made while it waited applies to it.
///
/// An account whose partition this node does not serve (handed over, or never its own) is
/// stale here: its owner runs its deliveries from the stored schedule.
pub fn admit(
    store: &dyn Storage,
    registry: &Registry,
    shares: &Shares,
    id: DeliveryId,
    token: u64,
) -> Result<Admission, StoreError> {
    let record = store
        .get_delivery(id)?
        .filter(|r| shares.serves(&r.account_id));
    Ok(admission(record, token, || registry.hook(id.webhook)))
}

/// [`admit`]'s decision over the record as stored and the webhook as current (looked up only
/// for a record that still carries the token).
pub(crate) fn admission(
    record: Option<DeliveryRecord>,
    token: u64,
    hook: impl FnOnce() -> Option<Arc<HookEntry>>,
) -> Admission {
    let Some(record) = record.filter(|r| r.next_attempt_ms == Some(token) && r.status.is_open())
    else {
        return Admission::Stale;
    };
    let Some(hook) = hook() else {
        return Admission::Stale;
    };
    if hook.hook.status != WebhookStatus::Active {
        return Admission::Stopped(Stopped {
            id: record.id,
            token,
            status: hook.hook.status,
        });
    }
    Admission::Start(InFlight {
        record,
        hook,
        token: Some(token),
    })
}

/// A manual retry's token: due now, and later than any token the delivery had, so that no
/// earlier entry can pass for it.
pub fn retry_token(now: u64, old: Option<u64>) -> u64 {
    now.max(old.map_or(0, |d| d + 1))
}

/// Applies an attempt's outcome to `record` (as currently stored) and decides the next step:
/// this is where the time of the next attempt is decided.
///
/// `token` is what the record carried when the attempt started; if it changed meanwhile, a
/// manual retry came in, and it stands: the retry's attempt runs next whatever this one did.
pub(crate) fn settle(
    record: &mut DeliveryRecord,
    token: Option<u64>,
    attempt: &AttemptRecord,
    success: bool,
    config: &Config,
    now: u64,
) -> (Settled, Step) {
    let old_due = record.next_attempt_ms;
    let unscheduled = Step {
        old_due,
        wake: None,
    };
    record.attempt_count = record.attempt_count.max(attempt.number);
    record.response_code = attempt.response_code;
    record.response_time_ms = Some(attempt.response_time_ms);
    record.updated_ms = now;
    if record.next_attempt_ms != token {
        if let (true, Some(next_ms)) = (record.status.is_open(), record.next_attempt_ms) {
            return (Settled::RetryQueued { next_ms }, unscheduled);
        }
    }
    record.note = None;
    if success {
        enter(record, To::Delivered);
        return (Settled::Delivered, unscheduled);
    }
    if endpoint_gone(attempt, record.is_test) {
        enter(record, To::Failed);
        record.note = Some(GONE_NOTE.to_string());
        return (Settled::Failed, unscheduled);
    }
    let Some(delay) = (!record.is_test)
        .then(|| config.retry_delay(attempt.number))
        .flatten()
    else {
        enter(record, To::Failed);
        return (Settled::Failed, unscheduled);
    };
    let scheduled = delay.as_millis() as u64;
    let mut wait = scheduled;
    if let Some(asked) = retry_after_ms(attempt, now) {
        // Never earlier than the schedule (a receiver cannot make us hammer it), never later
        // than a day (a typo cannot park a delivery past retention).
        wait = scheduled.max(asked.min(MAX_RETRY_AFTER_MS));
        if wait > scheduled {
            record.note = Some(format!(
                "the endpoint answered {} with Retry-After: next attempt in {} s instead of {} s",
                attempt.response_code.unwrap_or_default(),
                wait.div_ceil(1000),
                scheduled.div_ceil(1000),
            ));
        }
    }
    let next_ms = now + wait;
    enter(record, To::Retrying { due: next_ms });
    let wake = Wake {
        token: next_ms,
        at: next_ms,
    };
    (
        Settled::Retrying { next_ms },
        Step {
            old_due,
            wake: Some(wake),
        },
    )
}

/// Ends a due delivery whose webhook was paused or disabled when its attempt came due. `None`:
/// it changed meanwhile (retried by hand, ended), so the stop no longer applies.
pub(crate) fn stop(record: &mut DeliveryRecord, stopped: &Stopped, now: u64) -> Option<Step> {
    if record.next_attempt_ms != Some(stopped.token) || !record.status.is_open() {
        return None;
    }
    Some(end_failed(
        record,
        format!(
            "not attempted: the webhook was {} when the attempt came due; retry it by hand once the webhook is active",
            stopped.status.as_str()
        ),
        now,
    ))
}

/// Ends an open delivery of a webhook whose endpoint answered `410 Gone` to another one (an
/// attempt still in flight settles on its own when it ends).
pub(crate) fn end_gone(record: &mut DeliveryRecord, now: u64) -> Step {
    end_failed(record, GONE_OPEN_NOTE.to_string(), now)
}

/// A manual retry: a new attempt, due now, whatever the delivery's state.
pub(crate) fn retry_by_hand(record: &mut DeliveryRecord, now: u64) -> Step {
    reopen(record, None, now)
}

/// Whether `record` is one a recover over `[since_ms, until_ms)` re-sends: it ended `failed`
/// (its last change) in the window, and is not a test send.
pub(crate) fn recoverable(record: &DeliveryRecord, since_ms: u64, until_ms: u64) -> bool {
    record.status == DeliveryStatus::Failed
        && !record.is_test
        && (since_ms..until_ms).contains(&record.updated_ms)
}

/// A recover's re-send of a [`recoverable`] delivery: a new attempt, due now, noted.
pub(crate) fn recover(record: &mut DeliveryRecord, now: u64) -> Step {
    reopen(record, Some(RECOVER_NOTE.to_string()), now)
}

/// Gives a delivery a new token, due now ([`retry_token`]): a pending one stays pending (it
/// was never attempted), any other is retrying.
fn reopen(record: &mut DeliveryRecord, note: Option<String>, now: u64) -> Step {
    let old_due = record.next_attempt_ms;
    let token = retry_token(now, old_due);
    let to = if record.status == DeliveryStatus::Pending {
        To::Pending { due: Some(token) }
    } else {
        To::Retrying { due: token }
    };
    enter(record, to);
    record.note = note;
    record.updated_ms = now;
    Step {
        old_due,
        wake: Some(Wake { token, at: now }),
    }
}

/// Ends a delivery `failed` for a reason other than an endpoint's answer.
fn end_failed(record: &mut DeliveryRecord, note: String, now: u64) -> Step {
    let old_due = record.next_attempt_ms;
    enter(record, To::Failed);
    record.note = Some(note);
    record.updated_ms = now;
    Step {
        old_due,
        wake: None,
    }
}

/// The longest wait a `Retry-After` can ask for.
pub const MAX_RETRY_AFTER_MS: u64 = 24 * 3600 * 1000;

/// The note on a delivery that a `410 Gone` ended.
const GONE_NOTE: &str = "the endpoint answered 410 Gone: the webhook was disabled";

/// The note on the open deliveries a `410 Gone` to another delivery ended.
const GONE_OPEN_NOTE: &str =
    "not attempted: the endpoint answered 410 Gone to another delivery and the webhook was disabled; retry it by hand once the webhook is enabled again";

/// The note on a delivery a recover re-sent.
const RECOVER_NOTE: &str = "re-sent by a recover";

/// Whether an attempt's answer says the endpoint is gone for good (`410 Gone`). A test send's
/// 410 is shown to whoever ran it and changes nothing.
pub(crate) fn endpoint_gone(attempt: &AttemptRecord, is_test: bool) -> bool {
    !is_test && attempt.response_code == Some(410)
}

/// How long a `429` or `503` answer asks us to wait (RFC 9110 `Retry-After`: delay-seconds or
/// an HTTP date, relative to `now`). `None` for other answers or an unreadable value.
pub fn retry_after_ms(attempt: &AttemptRecord, now: u64) -> Option<u64> {
    if !matches!(attempt.response_code, Some(429 | 503)) {
        return None;
    }
    let value = attempt
        .response_headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
        .map(|(_, v)| v.trim())?;
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Absurdly long digit strings saturate (and are clamped to a day by the caller).
        return Some(
            value
                .parse::<u64>()
                .unwrap_or(u64::MAX)
                .saturating_mul(1000),
        );
    }
    let at = httpdate::parse_http_date(value).ok()?;
    let at_ms = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as u64;
    Some(at_ms.saturating_sub(now))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{AccountId, EventId, WebhookId};
    use crate::model::Webhook;

    fn config() -> Config {
        Config::from_toml(
            "[delivery]\nretry_schedule = [\"1s\", \"2s\"]\n[auth]\nadmin_token = \"unit-test-token-0123456789abcdefghij\"\n",
            "t",
        )
        .unwrap()
    }

    const ID: DeliveryId = DeliveryId {
        seq: 1,
        webhook: WebhookId(1),
    };

    fn event() -> EventRecord {
        EventRecord {
            seq: 1,
            id: EventId::from_seq(1),
            account_id: AccountId::parse("acc_1").unwrap(),
            event: "user.login".into(),
            body: b"{}".to_vec(),
        }
    }

    /// A fan-out delivery, moved into `status` with token `next` (the states transitions
    /// start from, without running the transitions that lead there).
    fn record(next: Option<u64>, status: DeliveryStatus) -> DeliveryRecord {
        let mut r = created(ID, &event(), 0, FirstAttempt::Due(0));
        r.status = status;
        r.next_attempt_ms = next;
        r
    }

    /// The record's invariant: open exactly when it carries a token (a test send: never one).
    fn consistent(r: &DeliveryRecord) -> bool {
        if r.is_test {
            r.next_attempt_ms.is_none() || r.status.is_open()
        } else {
            r.status.is_open() == r.next_attempt_ms.is_some()
        }
    }

    fn attempt(number: u32) -> AttemptRecord {
        AttemptRecord {
            number,
            at_ms: 0,
            response_code: Some(500),
            response_time_ms: 3,
            response_headers: vec![],
            response_body: String::new(),
            error: None,
            timestamp: 0,
            signature: String::new(),
        }
    }

    fn answered(code: u16, retry_after: &str) -> AttemptRecord {
        let mut a = attempt(1);
        a.response_code = Some(code);
        a.response_headers = vec![("Retry-After".into(), retry_after.into())];
        a
    }

    fn hook(status: WebhookStatus) -> Arc<HookEntry> {
        Arc::new(HookEntry {
            hook: Webhook {
                id: ID.webhook,
                account_id: AccountId::parse("acc_1").unwrap(),
                name: "h".into(),
                url: "https://example.com/".into(),
                description: None,
                events: vec!["*".into()],
                ip_allowlist: vec![],
                status,
                disabled_reason: None,
                consecutive_failures: 0,
                secret: "whsec_x".into(),
                created_ms: 0,
                updated_ms: 0,
                signature_scheme: Default::default(),
                previous_secret: None,
                rotation_ends_ms: None,
                ordering: Default::default(),
                max_concurrency: None,
            },
            ip_allowlist: vec![],
        })
    }

    // ---- create ----

    #[test]
    fn a_created_delivery_is_pending_and_due_at_its_token() {
        let r = created(ID, &event(), 500, FirstAttempt::Due(420));
        assert_eq!(
            (r.status, r.next_attempt_ms, r.updated_ms, r.is_test),
            (DeliveryStatus::Pending, Some(420), 500, false)
        );
        assert_eq!((r.attempt_count, r.note.as_deref()), (0, None));
        assert!(consistent(&r));
        assert_eq!(
            DeliveryRecord::new(ID, &event(), 500, false).next_attempt_ms,
            Some(500)
        );
    }

    #[test]
    fn a_test_send_is_created_pending_without_a_schedule_entry() {
        let r = created(ID, &event(), 500, FirstAttempt::TestSend);
        assert_eq!(
            (r.status, r.next_attempt_ms, r.is_test),
            (DeliveryStatus::Pending, None, true)
        );
        assert!(consistent(&r));
        assert_eq!(DeliveryRecord::new(ID, &event(), 500, true), r);
    }

    // ---- admit ----

    #[test]
    fn a_due_entry_that_still_matches_its_record_starts_an_attempt() {
        let r = record(Some(10), DeliveryStatus::Retrying);
        let Admission::Start(flight) =
            admission(Some(r.clone()), 10, || Some(hook(WebhookStatus::Active)))
        else {
            panic!("not started");
        };
        assert_eq!((flight.record, flight.token), (r, Some(10)));
    }

    #[test]
    fn a_superseded_ended_or_deleted_entry_is_stale() {
        let stale = |r: Option<DeliveryRecord>, hook_exists: bool| {
            let looked_up = std::cell::Cell::new(false);
            let a = admission(r, 10, || {
                looked_up.set(true);
                hook_exists.then(|| hook(WebhookStatus::Active))
            });
            (matches!(a, Admission::Stale), looked_up.get())
        };
        // Retried by hand meanwhile (a later token): the webhook is not even looked up.
        assert_eq!(
            stale(Some(record(Some(11), DeliveryStatus::Retrying)), true),
            (true, false)
        );
        // Ended (a record that ended has no token, but an entry never matches an ended one).
        assert_eq!(
            stale(Some(record(Some(10), DeliveryStatus::Failed)), true),
            (true, false)
        );
        // The delivery, or its webhook, was deleted.
        assert_eq!(stale(None, true), (true, false));
        assert_eq!(
            stale(Some(record(Some(10), DeliveryStatus::Pending)), false),
            (true, true)
        );
    }

    #[test]
    fn a_due_entry_of_a_paused_or_disabled_webhook_is_stopped() {
        for status in [WebhookStatus::Paused, WebhookStatus::Disabled] {
            let r = record(Some(10), DeliveryStatus::Pending);
            let Admission::Stopped(s) = admission(Some(r), 10, || Some(hook(status))) else {
                panic!("{status:?}: not stopped");
            };
            assert_eq!((s.id, s.token, s.status), (ID, 10, status));
        }
    }

    // ---- settle ----

    #[test]
    fn a_success_delivers_and_removes_the_entry() {
        let c = config();
        let mut r = record(Some(10), DeliveryStatus::Pending);
        r.note = Some("old".into());
        let mut ok = attempt(1);
        ok.response_code = Some(200);
        let (settled, step) = settle(&mut r, Some(10), &ok, true, &c, 100);
        assert_eq!(settled, Settled::Delivered);
        assert_eq!(
            step,
            Step {
                old_due: Some(10),
                wake: None
            }
        );
        assert_eq!(
            (
                r.status,
                r.next_attempt_ms,
                r.response_code,
                r.note.as_deref()
            ),
            (DeliveryStatus::Delivered, None, Some(200), None)
        );
        assert_eq!((r.attempt_count, r.updated_ms), (1, 100));
        assert!(consistent(&r));
    }

    #[test]
    fn a_failure_follows_the_schedule_then_fails() {
        let c = config();
        let mut r = record(Some(10), DeliveryStatus::Pending);
        let (settled, step) = settle(&mut r, Some(10), &attempt(1), false, &c, 100);
        assert_eq!(settled, Settled::Retrying { next_ms: 1_100 });
        assert_eq!(
            step,
            Step {
                old_due: Some(10),
                wake: Some(Wake {
                    token: 1_100,
                    at: 1_100
                })
            }
        );
        assert_eq!(r.next_attempt_ms, Some(1_100));
        assert_eq!(r.status, DeliveryStatus::Retrying);
        assert!(consistent(&r));
        let _ = settle(&mut r, Some(1_100), &attempt(2), false, &c, 2_000);
        assert_eq!(r.next_attempt_ms, Some(4_000));
        let (settled, step) = settle(&mut r, Some(4_000), &attempt(3), false, &c, 5_000);
        assert_eq!(settled, Settled::Failed);
        assert_eq!(step.old_due, Some(4_000));
        assert_eq!(step.wake, None);
        assert_eq!(
            (r.status, r.next_attempt_ms),
            (DeliveryStatus::Failed, None)
        );
        assert_eq!(r.attempt_count, 3);
        assert!(consistent(&r));
    }

    #[test]
    fn a_manual_retry_during_the_attempt_stands_whatever_the_outcome() {
        let c = config();
        for success in [false, true] {
            let mut r = record(Some(10), DeliveryStatus::Pending);
            // The retry came in while attempt 1 (token 10) was in flight.
            let _ = retry_by_hand(&mut r, 50);
            let (settled, step) = settle(&mut r, Some(10), &attempt(1), success, &c, 100);
            assert_eq!(settled, Settled::RetryQueued { next_ms: 50 });
            // Its entry stays; nothing new is armed (the retry armed its own).
            assert_eq!(
                step,
                Step {
                    old_due: Some(50),
                    wake: None
                }
            );
            assert_eq!(r.next_attempt_ms, Some(50));
            assert!(r.status.is_open());
            assert_eq!(r.attempt_count, 1);
            assert!(consistent(&r));
        }
    }

    #[test]
    fn retry_after_is_clamped_between_the_schedule_and_a_day() {
        let c = config();
        let next = |a: &AttemptRecord| {
            let mut r = record(Some(10), DeliveryStatus::Pending);
            match settle(&mut r, Some(10), a, false, &c, 1_000_000).0 {
                Settled::Retrying { next_ms } => next_ms - 1_000_000,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(next(&answered(503, "120")), 120_000);
        assert_eq!(
            next(&answered(429, "0")),
            1_000,
            "the schedule is the floor"
        );
        assert_eq!(
            next(&answered(429, "9999999999999999999999")),
            MAX_RETRY_AFTER_MS
        );
        assert_eq!(next(&answered(500, "120")), 1_000, "only 429 and 503 ask");
        assert_eq!(next(&answered(503, "soon")), 1_000, "unreadable: ignored");
        // An HTTP date, relative to the engine's now.
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000 + 90);
        assert_eq!(next(&answered(503, &httpdate::fmt_http_date(at))), 90_000);
        // A date in the past asks for nothing.
        let past = std::time::UNIX_EPOCH + std::time::Duration::from_secs(10);
        assert_eq!(next(&answered(503, &httpdate::fmt_http_date(past))), 1_000);
    }

    #[test]
    fn a_longer_retry_after_is_noted_on_the_delivery() {
        let c = config();
        let mut r = record(Some(10), DeliveryStatus::Pending);
        let _ = settle(&mut r, Some(10), &answered(503, "120"), false, &c, 0);
        assert!(r
            .note
            .as_deref()
            .unwrap()
            .contains("in 120 s instead of 1 s"));
    }

    #[test]
    fn a_410_ends_the_delivery_at_once_and_a_test_send_s_410_changes_nothing() {
        let c = config();
        let mut r = record(Some(10), DeliveryStatus::Pending);
        let (settled, step) = settle(&mut r, Some(10), &answered(410, ""), false, &c, 100);
        assert_eq!(settled, Settled::Failed);
        assert_eq!(step.wake, None);
        assert!(r.note.as_deref().unwrap().contains("410 Gone"));
        assert!(consistent(&r));
        assert!(endpoint_gone(&answered(410, ""), false));
        assert!(!endpoint_gone(&answered(410, ""), true));
        assert!(!endpoint_gone(&answered(404, ""), false));
    }

    #[test]
    fn a_test_send_is_never_retried() {
        let c = config();
        let mut r = created(ID, &event(), 0, FirstAttempt::TestSend);
        let (settled, step) = settle(&mut r, None, &attempt(1), false, &c, 100);
        assert_eq!(settled, Settled::Failed);
        assert_eq!(
            step,
            Step {
                old_due: None,
                wake: None
            }
        );
        assert!(consistent(&r));
    }

    // ---- pause, disable ----

    #[test]
    fn a_stop_ends_the_delivery_failed_and_names_the_webhook_s_state() {
        let mut r = record(Some(10), DeliveryStatus::Retrying);
        let stopped = Stopped {
            id: ID,
            token: 10,
            status: WebhookStatus::Paused,
        };
        let step = stop(&mut r, &stopped, 70).expect("applies");
        assert_eq!(
            step,
            Step {
                old_due: Some(10),
                wake: None
            }
        );
        assert_eq!(
            (r.status, r.next_attempt_ms, r.updated_ms),
            (DeliveryStatus::Failed, None, 70)
        );
        assert!(r
            .note
            .as_deref()
            .unwrap()
            .contains("the webhook was paused"));
        assert!(consistent(&r));
    }

    #[test]
    fn a_stop_no_longer_applies_to_a_delivery_that_changed_meanwhile() {
        let stopped = Stopped {
            id: ID,
            token: 10,
            status: WebhookStatus::Disabled,
        };
        for r in [
            record(Some(11), DeliveryStatus::Retrying),
            record(None, DeliveryStatus::Delivered),
        ] {
            let mut changed = r.clone();
            assert_eq!(stop(&mut changed, &stopped, 70), None);
            assert_eq!(changed, r, "untouched");
        }
    }

    // ---- manual retry ----

    #[test]
    fn retry_tokens_are_never_earlier_than_an_old_one() {
        assert_eq!(retry_token(100, None), 100);
        assert_eq!(retry_token(100, Some(40)), 100);
        assert_eq!(retry_token(100, Some(100)), 101);
        assert_eq!(retry_token(100, Some(5_000)), 5_001);
    }

    #[test]
    fn a_manual_retry_reopens_an_ended_delivery_due_now() {
        for ended in [DeliveryStatus::Failed, DeliveryStatus::Delivered] {
            let mut r = record(None, ended);
            r.note = Some("not attempted: …".into());
            let step = retry_by_hand(&mut r, 300);
            assert_eq!(
                step,
                Step {
                    old_due: None,
                    wake: Some(Wake {
                        token: 300,
                        at: 300
                    })
                }
            );
            assert_eq!(
                (r.status, r.next_attempt_ms, r.note.as_deref(), r.updated_ms),
                (DeliveryStatus::Retrying, Some(300), None, 300)
            );
            assert!(consistent(&r));
        }
    }

    #[test]
    fn a_manual_retry_of_an_open_delivery_supersedes_its_entry_and_a_pending_one_stays_pending() {
        let mut r = record(Some(5_000), DeliveryStatus::Pending);
        let step = retry_by_hand(&mut r, 300);
        // A token later than the old one, yet due now.
        assert_eq!(
            step,
            Step {
                old_due: Some(5_000),
                wake: Some(Wake {
                    token: 5_001,
                    at: 300
                })
            }
        );
        assert_eq!(
            (r.status, r.next_attempt_ms),
            (DeliveryStatus::Pending, Some(5_001))
        );
        let mut r = record(Some(40), DeliveryStatus::Retrying);
        let _ = retry_by_hand(&mut r, 300);
        assert_eq!(
            (r.status, r.next_attempt_ms),
            (DeliveryStatus::Retrying, Some(300))
        );
        assert!(consistent(&r));
    }

    // ---- recover ----

    #[test]
    fn a_recover_takes_deliveries_that_ended_failed_in_its_window_and_not_test_sends() {
        let at = |status, updated_ms, is_test| {
            let mut r = record(None, status);
            r.updated_ms = updated_ms;
            r.is_test = is_test;
            r
        };
        assert!(recoverable(
            &at(DeliveryStatus::Failed, 100, false),
            100,
            200
        ));
        assert!(
            !recoverable(&at(DeliveryStatus::Failed, 200, false), 100, 200),
            "end excluded"
        );
        assert!(!recoverable(
            &at(DeliveryStatus::Failed, 99, false),
            100,
            200
        ));
        assert!(!recoverable(
            &at(DeliveryStatus::Failed, 150, true),
            100,
            200
        ));
        assert!(!recoverable(
            &at(DeliveryStatus::Delivered, 150, false),
            100,
            200
        ));
        let mut open = at(DeliveryStatus::Retrying, 150, false);
        open.next_attempt_ms = Some(900);
        assert!(!recoverable(&open, 100, 200));
    }

    #[test]
    fn a_recover_re_sends_a_failed_delivery_due_now_with_a_note() {
        let mut r = record(None, DeliveryStatus::Failed);
        r.note = Some("old".into());
        let step = recover(&mut r, 300);
        assert_eq!(
            step,
            Step {
                old_due: None,
                wake: Some(Wake {
                    token: 300,
                    at: 300
                })
            }
        );
        assert_eq!(
            (r.status, r.next_attempt_ms, r.note.as_deref(), r.updated_ms),
            (DeliveryStatus::Retrying, Some(300), Some(RECOVER_NOTE), 300)
        );
        assert!(consistent(&r));
    }

    // ---- 410 Gone ----

    #[test]
    fn a_410_to_another_delivery_ends_an_open_one_failed_with_a_note() {
        for (status, due) in [
            (DeliveryStatus::Pending, 10),
            (DeliveryStatus::Retrying, 4_000),
        ] {
            let mut r = record(Some(due), status);
            let step = end_gone(&mut r, 90);
            assert_eq!(
                step,
                Step {
                    old_due: Some(due),
                    wake: None
                }
            );
            assert_eq!(
                (r.status, r.next_attempt_ms, r.note.as_deref(), r.updated_ms),
                (DeliveryStatus::Failed, None, Some(GONE_OPEN_NOTE), 90)
            );
            assert!(consistent(&r));
        }
    }
}
