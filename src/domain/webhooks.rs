//! Webhook rules: field validation (the HTTPS rule, events against the catalog, CIDR
//! allowlists), the plan's webhook limit, pause/resume semantics, deletion with its history,
//! signing-secret rotation (with a grace period during which both secrets sign), the signature
//! scheme, the delivery ordering (`none` or `fifo`), and the test send (one real attempt with a
//! sample payload).
//! Bodies enter as [`CreateWebhook`] / [`UpdateWebhook`]; webhooks leave as [`Webhook`].

use http::StatusCode;
use serde::Deserialize;

use super::accounts::plan_usage;
use super::{check_name, Paging, Refusal, Services};
use crate::clock;
use crate::config::parse_cidr;
use crate::delivery::Settled;
use crate::ids::{AccountId, DeliveryId, WebhookId};
use crate::model::{
    now_ms, rfc3339, AttemptRecord, DeliveryOrder, DeliveryRecord, SignatureScheme, Subscription,
    Webhook, WebhookStatus,
};
use crate::signing;

const MAX_URL_LEN: usize = 2048;
const MAX_EVENTS: usize = 100;
const MAX_CIDRS: usize = 100;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhook {
    pub name: String,
    pub url: String,
    #[serde(default)]
    pub description: Option<String>,
    pub events: Vec<String>,
    #[serde(default)]
    pub ip_allowlist: Vec<String>,
    /// `"kyberaccess"` (default) or `"standard-webhooks"`.
    #[serde(default)]
    pub signature_scheme: Option<String>,
    /// `"none"` (default) or `"fifo"`: one attempt at a time, in event order.
    #[serde(default)]
    pub ordering: Option<String>,
    /// The customer's cap on attempts in flight (null or absent: none).
    #[serde(default)]
    pub max_concurrency: Option<u64>,
    /// A secret minted earlier by [`signing::new_secret`]: the dashboard shows it before
    /// "Create Webhook". Never read from a JSON body (the API always mints it here).
    #[serde(skip)]
    pub secret: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UpdateWebhook {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub events: Option<Vec<String>>,
    #[serde(default)]
    pub ip_allowlist: Option<Vec<String>>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub signature_scheme: Option<String>,
    /// Applies to attempts not yet started.
    #[serde(default)]
    pub ordering: Option<String>,
    /// Absent: unchanged; null: no cap; a number: the new cap.
    #[serde(default, deserialize_with = "present")]
    pub max_concurrency: Option<Option<u64>>,
}

/// Tells a field that is present but null (`Some(None)`) from one that is absent (`None`,
/// through `#[serde(default)]`).
fn present<'de, D, T>(de: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(de).map(Some)
}

/// The most a customer may ask for; the engine's own ceiling
/// (`delivery.max_in_flight_per_webhook`) applies on top.
pub const MAX_CONCURRENCY: u64 = 10_000;

/// A customer's `max_concurrency`: 1 to [`MAX_CONCURRENCY`].
pub fn check_max_concurrency(n: u64) -> Result<u32, Refusal> {
    if (1..=MAX_CONCURRENCY).contains(&n) {
        Ok(n as u32)
    } else {
        Err(Refusal::bad_request(
            "invalid_max_concurrency",
            format!("max_concurrency must be from 1 to {MAX_CONCURRENCY}, or null for no cap"),
        ))
    }
}

/// The optional body of a secret rotation.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RotateSecret {
    /// How long the old secret keeps signing (`"24h"`, `"0s"` … `"7d"`); default 24 h.
    #[serde(default)]
    pub grace_period: Option<String>,
}

/// The body of a recover: the window in which the deliveries to re-send ended `failed`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoverRequest {
    /// RFC 3339, inclusive.
    pub since: String,
    /// RFC 3339, exclusive; default now.
    #[serde(default)]
    pub until: Option<String>,
}

/// Re-sends every delivery of the webhook that ended `failed` in the window (same delivery
/// ids, a new attempt each, paced by the plan's rate like any delivery) and answers how many.
/// A window longer than `storage.retention` is refused: what ended before it is purged.
pub async fn recover_webhook(
    state: &Services,
    account: &AccountId,
    id: WebhookId,
    body: &RecoverRequest,
) -> Result<usize, Refusal> {
    let hook = get_webhook(state, account, id)?;
    let stamp = |field: &str, text: &str| {
        crate::model::parse_rfc3339(text).ok_or_else(|| {
            Refusal::bad_request(
                "invalid_timestamp",
                format!(
                    "{field} must be an RFC 3339 time like \"2026-01-31T09:00:00Z\", not {text:?}"
                ),
            )
        })
    };
    let now = now_ms();
    let since = stamp("since", &body.since)?;
    let until = match &body.until {
        Some(t) => stamp("until", t)?,
        None => now,
    };
    if since >= until {
        return Err(Refusal::bad_request(
            "invalid_recover_window",
            "since must be earlier than until",
        ));
    }
    let retention = state.config.storage.retention;
    if u128::from(until - since) > retention.as_millis() {
        return Err(Refusal::bad_request(
            "recover_window_too_long",
            format!(
                "the window is longer than the retention ({}); deliveries older than that are purged",
                humantime::format_duration(retention)
            ),
        ));
    }
    if hook.status != WebhookStatus::Active {
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            "webhook_not_active",
            format!(
                "the webhook is {}; set it active before recovering",
                hook.status.as_str()
            ),
        ));
    }
    let n = state.deliverer.deliveries.recover(id, since, until).await?;
    state.ingest.sync().await?;
    Ok(n)
}

/// The grace period of a rotation when none is asked for.
pub const DEFAULT_ROTATION_GRACE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// The longest grace period a rotation may ask for.
pub const MAX_ROTATION_GRACE: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

pub fn check_signature_scheme(text: &str) -> Result<SignatureScheme, Refusal> {
    SignatureScheme::parse(text).ok_or_else(|| {
        Refusal::bad_request(
            "invalid_signature_scheme",
            format!("signature_scheme {text:?} is not \"kyberaccess\" or \"standard-webhooks\""),
        )
    })
}

pub fn check_ordering(text: &str) -> Result<DeliveryOrder, Refusal> {
    DeliveryOrder::parse(text).ok_or_else(|| {
        Refusal::bad_request(
            "invalid_ordering",
            format!("ordering {text:?} is not \"none\" or \"fifo\""),
        )
    })
}

/// A rotation's grace period: a duration string from 0 to 7 days.
pub fn check_grace_period(text: Option<&str>) -> Result<std::time::Duration, Refusal> {
    let Some(text) = text else {
        return Ok(DEFAULT_ROTATION_GRACE);
    };
    let bad = |why: String| Refusal::bad_request("invalid_grace_period", why);
    let grace = crate::config::parse_duration(text)
        .map_err(|e| bad(format!("grace_period {text:?}: {e}")))?;
    if grace > MAX_ROTATION_GRACE {
        return Err(bad(format!("grace_period {text:?} is longer than 7 days")));
    }
    Ok(grace)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestRequest {
    pub event: String,
}

/// What a test send came to.
#[derive(Debug, Clone)]
pub struct TestOutcome {
    pub delivery_id: DeliveryId,
    /// The delivery's status after the attempt (`delivered` or `failed`).
    pub status: &'static str,
    pub attempt: AttemptRecord,
}

pub fn check_description(d: Option<String>) -> Result<Option<String>, Refusal> {
    match d {
        Some(d) if d.chars().count() > 1000 => Err(Refusal::bad_request(
            "invalid_description",
            "description must be at most 1000 characters",
        )),
        Some(d) if d.is_empty() => Ok(None),
        other => Ok(other),
    }
}

/// The HTTPS rule: an absolute `https://` URL (or `http://` when `delivery.require_https` is
/// off) with a host and no credentials.
pub fn check_url(state: &Services, url: &str) -> Result<String, Refusal> {
    let bad = |why: &str| Refusal::bad_request("invalid_url", format!("url {url:?}: {why}"));
    if url.len() > MAX_URL_LEN {
        return Err(bad(&format!("longer than {MAX_URL_LEN} characters")));
    }
    let uri: http::Uri = url.parse().map_err(|_| bad("not a valid URL"))?;
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") if !state.config.delivery.require_https => {}
        Some("http") => return Err(bad("must use https:// (delivery.require_https)")),
        _ => return Err(bad("must be an absolute https:// URL")),
    }
    let authority = uri.authority().ok_or_else(|| bad("has no host"))?;
    if authority.as_str().contains('@') {
        return Err(bad("must not contain credentials"));
    }
    if authority.host().is_empty() {
        return Err(bad("has no host"));
    }
    Ok(url.to_string())
}

pub fn check_events(state: &Services, events: Vec<String>) -> Result<Vec<String>, Refusal> {
    if events.is_empty() {
        return Err(Refusal::bad_request(
            "invalid_events",
            "events must name at least one event type",
        ));
    }
    if events.len() > MAX_EVENTS {
        return Err(Refusal::bad_request(
            "invalid_events",
            format!("at most {MAX_EVENTS} event entries"),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(events.len());
    for e in events {
        if Subscription::parse(&e, state.registry.catalog()).is_none() {
            return Err(Refusal::bad_request(
                "invalid_events",
                format!("{e:?} is not an event type, a family wildcard like \"emergency.*\", or \"*\" (see GET /v1/event-types)"),
            ));
        }
        if !out.contains(&e) {
            out.push(e);
        }
    }
    Ok(out)
}

pub fn check_cidrs(list: Vec<String>) -> Result<Vec<String>, Refusal> {
    if list.len() > MAX_CIDRS {
        return Err(Refusal::bad_request(
            "invalid_ip_allowlist",
            format!("at most {MAX_CIDRS} entries"),
        ));
    }
    for c in &list {
        parse_cidr(c).map_err(|e| Refusal::bad_request("invalid_ip_allowlist", e))?;
    }
    Ok(list)
}

pub fn not_found(id: &str) -> Refusal {
    Refusal::not_found("webhook_not_found", format!("no webhook {id:?}"))
}

/// The webhook `id` of `account` (another account's webhook is not found).
pub fn get_webhook(
    state: &Services,
    account: &AccountId,
    id: WebhookId,
) -> Result<Webhook, Refusal> {
    state
        .store
        .get_webhook(account, id)?
        .ok_or_else(|| not_found(&id.to_string()))
}

pub async fn create_webhook(
    state: &Services,
    account: &AccountId,
    body: CreateWebhook,
) -> Result<Webhook, Refusal> {
    let name = check_name(&body.name)?;
    let url = check_url(state, &body.url)?;
    let description = check_description(body.description)?;
    let events = check_events(state, body.events)?;
    let ip_allowlist = check_cidrs(body.ip_allowlist)?;
    let signature_scheme = body
        .signature_scheme
        .as_deref()
        .map(check_signature_scheme)
        .transpose()?
        .unwrap_or_default();
    let ordering = body
        .ordering
        .as_deref()
        .map(check_ordering)
        .transpose()?
        .unwrap_or_default();
    let max_concurrency = body
        .max_concurrency
        .map(check_max_concurrency)
        .transpose()?;
    let secret = match body.secret {
        Some(s) => {
            crate::secrets::check_supplied_secret(&s)
                .map_err(|e| Refusal::bad_request("invalid_secret", e.to_string()))?;
            s
        }
        None => signing::new_secret(),
    };
    let hook = {
        let _writes = state.registry.write_lock();
        let usage = plan_usage(state, account);
        if let (true, Some(max)) = (usage.at_limit(), usage.max_webhooks) {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "plan_limit_reached",
                format!("the {} plan allows at most {max} webhooks", usage.plan),
            ));
        }
        // Lists are newest first by (created_ms, id), and ids are random: keep created_ms
        // strictly increasing within the account so that webhooks created in the same
        // millisecond still list in creation order.
        let now = now_ms().max(state.registry.newest_hook_created_ms(account) + 1);
        let mut id = WebhookId::generate();
        while state.registry.hook(id).is_some() {
            id = WebhookId::generate();
        }
        let hook = Webhook {
            id,
            account_id: account.clone(),
            name,
            url,
            description,
            events,
            ip_allowlist,
            status: WebhookStatus::Active,
            disabled_reason: None,
            consecutive_failures: 0,
            secret,
            created_ms: now,
            updated_ms: now,
            signature_scheme,
            previous_secret: None,
            rotation_ends_ms: None,
            ordering,
            max_concurrency,
        };
        state.store.put_webhook(&hook)?;
        state.registry.upsert_hook(hook.clone());
        hook
    };
    state.ingest.sync().await?;
    Ok(hook)
}

/// One page of the account's webhooks, newest first, and the cursor of the next page.
pub fn list_webhooks(
    state: &Services,
    account: &AccountId,
    page: &Paging,
) -> Result<(Vec<Webhook>, Option<String>), Refusal> {
    let mut hooks = state.store.webhooks_of(account)?;
    hooks.sort_by_key(|h| std::cmp::Reverse((h.created_ms, h.id)));
    // The cursor is the sort key of the last item shown, `{created_ms}.{webhook id}`, so a page
    // continues after it even if that webhook was deleted in the meantime.
    let start = match &page.cursor {
        Some(c) => {
            let key = c
                .split_once('.')
                .and_then(|(ms, id)| Some((ms.parse::<u64>().ok()?, WebhookId::parse(id)?)))
                .ok_or_else(|| {
                    Refusal::bad_request("invalid_cursor", "cursor is not one this API gave")
                })?;
            hooks
                .iter()
                .position(|h| (h.created_ms, h.id) < key)
                .unwrap_or(hooks.len())
        }
        None => 0,
    };
    let more = hooks.len() - start > page.limit;
    let taken: Vec<Webhook> = hooks.into_iter().skip(start).take(page.limit).collect();
    let next = more
        .then(|| taken.last().map(|h| format!("{}.{}", h.created_ms, h.id)))
        .flatten();
    Ok((taken, next))
}

/// Read-modify-write of one webhook under the registry's write lock, then durable.
async fn modify(
    state: &Services,
    account: &AccountId,
    id: WebhookId,
    change: impl FnOnce(&mut Webhook) -> Result<(), Refusal>,
) -> Result<Webhook, Refusal> {
    let hook = {
        let _writes = state.registry.write_lock();
        let mut hook = get_webhook(state, account, id)?;
        change(&mut hook)?;
        hook.updated_ms = now_ms();
        // A secret whose rotation grace is over is not kept any longer than it must be.
        if hook.previous_secret_at(hook.updated_ms).is_none() {
            hook.previous_secret = None;
            hook.rotation_ends_ms = None;
        }
        state.store.put_webhook(&hook)?;
        state.registry.upsert_hook(hook.clone());
        hook
    };
    state.ingest.sync().await?;
    Ok(hook)
}

/// Replaces the signing secret and returns the webhook with the new one. For `grace`, the
/// replaced secret keeps signing the primary signature and the new one signs the `-Next`
/// signature; a rotation during a grace replaces the secret the previous rotation returned
/// (the one before it stops signing at once).
pub async fn rotate_secret(
    state: &Services,
    account: &AccountId,
    id: WebhookId,
    grace: std::time::Duration,
) -> Result<Webhook, Refusal> {
    modify(state, account, id, |h| {
        let old = std::mem::replace(&mut h.secret, signing::new_secret());
        if grace.is_zero() {
            h.previous_secret = None;
            h.rotation_ends_ms = None;
        } else {
            h.previous_secret = Some(old);
            h.rotation_ends_ms = Some(now_ms() + grace.as_millis() as u64);
        }
        Ok(())
    })
    .await
}

/// Changes the given fields. Pause semantics: `"paused"` stops deliveries (they wait);
/// `"active"` resumes, and also clears an automatic disable with its failure count.
pub async fn update_webhook(
    state: &Services,
    account: &AccountId,
    id: WebhookId,
    body: UpdateWebhook,
) -> Result<Webhook, Refusal> {
    let name = body.name.as_deref().map(check_name).transpose()?;
    let url = body
        .url
        .as_deref()
        .map(|u| check_url(state, u))
        .transpose()?;
    let description = body
        .description
        .map(|d| check_description(Some(d)))
        .transpose()?;
    let events = body.events.map(|e| check_events(state, e)).transpose()?;
    let ip_allowlist = body.ip_allowlist.map(check_cidrs).transpose()?;
    let signature_scheme = body
        .signature_scheme
        .as_deref()
        .map(check_signature_scheme)
        .transpose()?;
    let ordering = body.ordering.as_deref().map(check_ordering).transpose()?;
    let max_concurrency = match body.max_concurrency {
        None => None,
        Some(None) => Some(None),
        Some(Some(n)) => Some(Some(check_max_concurrency(n)?)),
    };
    let status = match body.status.as_deref() {
        None => None,
        Some("active") => Some(WebhookStatus::Active),
        Some("paused") => Some(WebhookStatus::Paused),
        Some(other) => {
            return Err(Refusal::bad_request(
                "invalid_status",
                format!("status {other:?} cannot be set; use \"active\" or \"paused\""),
            ))
        }
    };
    modify(state, account, id, |h| {
        if let Some(v) = name {
            h.name = v;
        }
        if let Some(v) = url {
            h.url = v;
        }
        if let Some(v) = description {
            h.description = v;
        }
        if let Some(v) = events {
            h.events = v;
        }
        if let Some(v) = ip_allowlist {
            h.ip_allowlist = v;
        }
        if let Some(v) = signature_scheme {
            h.signature_scheme = v;
        }
        if let Some(v) = ordering {
            h.ordering = v;
        }
        if let Some(v) = max_concurrency {
            h.max_concurrency = v;
        }
        match status {
            Some(WebhookStatus::Active) => {
                h.status = WebhookStatus::Active;
                h.disabled_reason = None;
                h.consecutive_failures = 0;
            }
            Some(s) => h.status = s,
            None => {}
        }
        Ok(())
    })
    .await
}

/// Deletes the webhook and its delivery history.
pub async fn delete_webhook(
    state: &Services,
    account: &AccountId,
    id: WebhookId,
) -> Result<(), Refusal> {
    let hook = get_webhook(state, account, id)?;
    {
        let _writes = state.registry.write_lock();
        state.registry.remove_hook(account, hook.id);
    }
    state.deliverer.deliveries.forget_webhook(hook).await?;
    {
        // A registry follower that read the store before the delete reached it may have put
        // the webhook back meanwhile; from now on no read of the store has it.
        let _writes = state.registry.write_lock();
        state.registry.remove_hook(account, id);
    }
    state.ingest.sync().await?;
    Ok(())
}

/// The test tool: one real, signed attempt of `event`'s catalog example to the webhook, now, whatever
/// its status; recorded as a test delivery and never retried.
pub async fn test_webhook(
    state: &Services,
    account: &AccountId,
    id: WebhookId,
    event: &str,
) -> Result<TestOutcome, Refusal> {
    if !state.registry.is_cataloged(event) {
        return Err(Refusal::bad_request(
            "unknown_event_type",
            format!("event type {event:?} is not in the catalog (GET /v1/event-types)"),
        ));
    }
    state
        .registry
        .hook(id)
        .filter(|h| h.hook.account_id == *account)
        .ok_or_else(|| not_found(&id.to_string()))?;
    // Refused before anything is stored: one account's test sends cannot fill the engine.
    let permit = state.deliverer.test_permit(account)?;
    // Stored through the group committer like any event (it gives the sequence number the
    // delivery id is made of), but never fanned out.
    let stored = state
        .ingest
        .submit_test(
            account.clone(),
            event,
            &rfc3339(now_ms()),
            crate::catalog::example_data(event),
        )
        .await?
        .map_err(|r| Refusal::bad_request("invalid_request", r.to_string()))?;
    let delivery_id = DeliveryId {
        seq: stored.seq,
        webhook: id,
    };
    let record = DeliveryRecord::new(delivery_id, &stored, clock::now_ms(), true);
    // Through the webhook's slots, like its deliveries (ahead of those waiting).
    let (attempt, settled) = state
        .deliverer
        .test_send(&permit, record, bytes::Bytes::from(stored.body))
        .await?;
    let status = match settled {
        Settled::Delivered => "delivered",
        _ => "failed",
    };
    Ok(TestOutcome {
        delivery_id,
        status,
        attempt,
    })
}
