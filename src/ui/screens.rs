//! The dashboard's screens: for each signed-in route, read the form or query, call the
//! domain function `/v1` uses (`crate::domain`), and answer a page or a redirect.
//!
//! Requests enter as [`Req`] (session checked, CSRF checked for POSTs); account screens live
//! under `/ui/a/{account}/…` and are scoped like the API (an account's session reaches only its
//! own account; the operator reaches all). Every POST that succeeds answers `303` to a page
//! (with a one-shot notice), except the two that show a secret once (a new account's API key,
//! a regenerated signing secret), which render it with `Cache-Control: no-store`.
//!
//! The Add Webhook steps carry their fields in hidden inputs, so no half-made webhook is
//! stored. Step 3 shows a secret minted by `signing::new_secret`, which the domain function
//! then uses through `CreateWebhook.secret` (never read from JSON) after checking it has the
//! minted shape.

use http::StatusCode;

use super::charts;
use super::pages::{self, *};
use super::{assets, html, redirect, refusal_page, Page, Req, UiState};
use crate::domain::caller::Caller;
use crate::domain::{self, accounts as acc, deliveries as dlv, stats as st, webhooks as wh};
use crate::domain::{Refusal, Services};
use crate::ids::{AccountId, DeliveryId, WebhookId};
use crate::model::{
    event_family, rfc3339, DeliveryOrder, DeliveryStatus, SignatureScheme, Webhook, WebhookStatus,
};
use crate::signing;
use crate::stats::{self, Bucket, Window};

/// Rows of the Deliveries tab per page.
const DELIVERIES_PER_PAGE: usize = 25;

fn not_found() -> Page {
    super::error_page(
        StatusCode::NOT_FOUND,
        "There is nothing here, or it is not yours to see.",
    )
}

fn bad_method() -> Page {
    super::error_page(
        StatusCode::METHOD_NOT_ALLOWED,
        "That method is not allowed here.",
    )
}

/// What the guide calls the family's group of events.
fn group_legend(family: &str) -> &'static str {
    match family {
        "visitor" => "Visitor Events",
        "screening" => "Security Events",
        "emergency" => "Emergency Events",
        "document" => "Document Events",
        "delivery" => "Delivery Events",
        _ => "System Events",
    }
}

const GROUP_ORDER: [&str; 6] = [
    "Visitor Events",
    "Security Events",
    "Emergency Events",
    "Document Events",
    "Delivery Events",
    "System Events",
];

fn dom_id(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// The catalog as the guide's groups, with `selected` (exact names, `family.*`) checked.
fn event_groups(catalog: &[String], selected: &[String]) -> Vec<EventGroup> {
    let mut groups: Vec<EventGroup> = GROUP_ORDER
        .iter()
        .map(|legend| EventGroup {
            legend: legend.to_string(),
            dom_id: dom_id(legend),
            families: Vec::new(),
            events: Vec::new(),
        })
        .collect();
    for event in catalog {
        let family = event_family(event);
        let legend = group_legend(family);
        let Some(group) = groups.iter_mut().find(|g| g.legend == legend) else {
            continue;
        };
        let wildcard = format!("{family}.*");
        if !group.families.iter().any(|f| f.value == wildcard) {
            group.families.push(EventBox {
                checked: selected.contains(&wildcard),
                label: format!("All {family} events"),
                hint: format!("{family}.*, including event types added later"),
                dom_id: format!("ev-{}", dom_id(&wildcard)),
                value: wildcard.clone(),
            });
        }
        group.events.push(EventBox {
            value: event.clone(),
            label: event.clone(),
            hint: crate::catalog::describe(event).description,
            checked: selected.contains(event),
            dom_id: format!("ev-{}", dom_id(event)),
        });
    }
    groups.retain(|g| !g.events.is_empty());
    groups
}

fn status_view(h: &Webhook) -> (String, &'static str) {
    match h.status {
        WebhookStatus::Active => ("Active".into(), "ok"),
        WebhookStatus::Paused => ("Paused".into(), "paused"),
        WebhookStatus::Disabled => (
            match &h.disabled_reason {
                Some(r) => format!("Disabled: {r}"),
                None => "Disabled".into(),
            },
            "bad",
        ),
    }
}

fn delivery_status(s: DeliveryStatus) -> (&'static str, &'static str) {
    match s {
        DeliveryStatus::Pending => ("Pending", "paused"),
        DeliveryStatus::Delivered => ("Delivered", "ok"),
        DeliveryStatus::Retrying => ("Retrying", "warn"),
        DeliveryStatus::Failed => ("Failed", "bad"),
    }
}

/// `2025-01-15 09:30:00 UTC`.
fn when(ms: u64) -> String {
    let t = rfc3339(ms - ms % 1000);
    t.trim_end_matches('Z').replacen('T', " ", 1) + " UTC"
}

fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The signed-in page frame.
struct Ctx<'a> {
    state: &'a Services,
    ui: &'a UiState,
    req: &'a Req,
}

impl Ctx<'_> {
    fn chrome(&self, title: &str, crumbs: Vec<(String, String)>) -> Chrome {
        let who = match &self.req.session.caller {
            Caller::Admin => "Operator".to_string(),
            Caller::Account(a) => self
                .state
                .registry
                .account(a)
                .map_or_else(|| a.as_str().to_string(), |acc| acc.name),
        };
        Chrome {
            title: title.to_string(),
            css: assets::css_path(),
            js: assets::js_path(),
            csrf: self.req.session.csrf.clone(),
            who,
            is_admin: self.req.session.caller == Caller::Admin,
            notice: self.ui.sessions.take_notice(&self.req.session_id),
            crumbs,
        }
    }

    fn notice(&self, text: impl Into<String>) {
        self.ui.sessions.set_notice(&self.req.session_id, text);
    }

    /// Crumbs of an account's screens: the operator's way back to the account list first.
    fn account_crumbs(&self, account: &AccountId, name: &str) -> Vec<(String, String)> {
        let mut crumbs = Vec::new();
        if self.req.session.caller == Caller::Admin {
            crumbs.push(("/ui/accounts".to_string(), "Accounts".to_string()));
        }
        crumbs.push((
            format!("/ui/a/{}/webhooks", urlencode(account.as_str())),
            format!("{name} · Webhooks"),
        ));
        crumbs
    }
}

pub async fn route(ui: &UiState, req: Req) -> Page {
    let state = &*ui.services;
    let segs: Vec<String> = req.segs.clone();
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    let get = req.method == http::Method::GET;
    let ctx = Ctx {
        state,
        ui,
        req: &req,
    };
    let result: Result<Page, Refusal> = match (get, s.as_slice()) {
        (true, []) => Ok(match &req.session.caller {
            Caller::Admin => redirect("/ui/accounts"),
            Caller::Account(a) => redirect(&format!("/ui/a/{}/webhooks", urlencode(a.as_str()))),
        }),
        (false, ["logout"]) => Ok(super::logout(ui, &req.session_id)),
        (true, ["accounts"]) => admin(&ctx).and_then(|_| accounts_page(&ctx, None, "", "", "")),
        (false, ["accounts"]) => match admin(&ctx) {
            Ok(()) => create_account(&ctx).await,
            Err(e) => Err(e),
        },
        (true, ["admin", "overview"]) => match admin(&ctx) {
            Ok(()) => overview_page(&ctx).await,
            Err(e) => Err(e),
        },
        (true, ["accounts", a]) => admin(&ctx).and_then(|_| account_page(&ctx, a)),
        (true, ["accounts", a, "plan"]) => admin(&ctx).and_then(|_| confirm_plan(&ctx, a)),
        (false, ["accounts", a, "plan"]) => match admin(&ctx) {
            Ok(()) => change_plan(&ctx, a).await,
            Err(e) => Err(e),
        },
        (true, ["accounts", a, "api-key"]) => admin(&ctx).and_then(|_| confirm_rotate_key(&ctx, a)),
        (false, ["accounts", a, "api-key"]) => match admin(&ctx) {
            Ok(()) => rotate_key(&ctx, a).await,
            Err(e) => Err(e),
        },
        (true, ["accounts", a, "delete"]) => {
            admin(&ctx).and_then(|_| confirm_delete_account(&ctx, a))
        }
        (false, ["accounts", a, "delete"]) => match admin(&ctx) {
            Ok(()) => delete_account(&ctx, a).await,
            Err(e) => Err(e),
        },
        (_, ["a", a, rest @ ..]) => match req.session.caller.scope(state, a) {
            Ok(account) => account_screen(&ctx, &account, get, rest).await,
            Err(_) => return not_found(),
        },
        _ => return not_found(),
    };
    match result {
        Ok(page) => page,
        Err(e) if e.status == StatusCode::NOT_FOUND => not_found(),
        Err(e) => refusal_page(&e),
    }
}

fn admin(ctx: &Ctx) -> Result<(), Refusal> {
    ctx.req
        .session
        .caller
        .require_admin()
        .map_err(|_| Refusal::not_found("not_found", "no such page"))
}

// ---- operator screens -----------------------------------------------------------------

fn accounts_page(
    ctx: &Ctx,
    error: Option<String>,
    name: &str,
    id: &str,
    plan: &str,
) -> Result<Page, Refusal> {
    let rows = acc::list_accounts(ctx.state)?
        .into_iter()
        .map(|a| AccountRow {
            open_href: format!("/ui/a/{}/webhooks", urlencode(a.id.as_str())),
            delete_href: format!("/ui/accounts/{}/delete", urlencode(a.id.as_str())),
            manage_href: format!("/ui/accounts/{}", urlencode(a.id.as_str())),
            name: a.name,
            id: a.id.as_str().to_string(),
            plan: a.plan,
            created: when(a.created_ms),
        })
        .collect();
    let plans = ctx
        .state
        .config
        .plans
        .keys()
        .map(|p| Opt {
            value: p.clone(),
            label: p.clone(),
            selected: p == plan,
        })
        .collect();
    let status = form_status(error.is_some());
    let page = AccountsPage {
        c: ctx.chrome("Accounts", Vec::new()),
        rows,
        plans,
        form_name: name.to_string(),
        form_id: id.to_string(),
        error,
    };
    Ok(html(status, pages::render(&page)))
}

async fn create_account(ctx: &Ctx<'_>) -> Result<Page, Refusal> {
    let name = ctx.req.field("name").unwrap_or("").to_string();
    let id = ctx.req.field("id").unwrap_or("").trim().to_string();
    let plan = ctx.req.field("plan").unwrap_or("").to_string();
    let body = acc::CreateAccount {
        name: name.clone(),
        plan: plan.clone(),
        id: (!id.is_empty()).then(|| id.clone()),
    };
    match acc::create_account(ctx.state, body).await {
        Ok((account, api_key)) => {
            let page = AccountCreatedPage {
                c: ctx.chrome(
                    "Account created",
                    vec![("/ui/accounts".into(), "Accounts".into())],
                ),
                open_href: format!("/ui/a/{}/webhooks", urlencode(account.id.as_str())),
                name: account.name,
                id: account.id.as_str().to_string(),
                plan: account.plan,
                api_key,
            };
            Ok(html(StatusCode::CREATED, pages::render(&page)))
        }
        Err(e) if e.status.is_client_error() => {
            accounts_page(ctx, Some(e.message), &name, &id, &plan)
        }
        Err(e) => Err(e),
    }
}

fn confirm_delete_account(ctx: &Ctx, raw: &str) -> Result<Page, Refusal> {
    let id = ctx.req.session.caller.scope(ctx.state, raw)?;
    let account = acc::get_account(ctx.state, &id)?;
    let page = ConfirmPage {
        c: ctx.chrome(
            "Delete account",
            vec![("/ui/accounts".into(), "Accounts".into())],
        ),
        heading: format!("Delete the account {}?", account.name),
        message: "Its webhooks, its events and all of its delivery history are deleted too. \
                  Its API key stops working at once. This cannot be undone."
            .into(),
        detail: Some(format!("Account ID: {}", id.as_str())),
        grace: false,
        hidden: Vec::new(),
        action: format!("/ui/accounts/{}/delete", urlencode(id.as_str())),
        button: "Delete Account".into(),
        cancel_href: "/ui/accounts".into(),
    };
    Ok(html(StatusCode::OK, pages::render(&page)))
}

async fn delete_account(ctx: &Ctx<'_>, raw: &str) -> Result<Page, Refusal> {
    let id = ctx.req.session.caller.scope(ctx.state, raw)?;
    let account = acc::get_account(ctx.state, &id)?;
    acc::delete_account(ctx.state, &id).await?;
    ctx.notice(format!("The account {} was deleted.", account.name));
    Ok(redirect("/ui/accounts"))
}

/// `1.5 GiB`.
fn bytes_text(n: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} bytes")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `3 d 4 h`, `5 h 2 min`, `40 s`.
fn duration_text(secs: u64) -> String {
    let (d, h, m) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60);
    if d > 0 {
        format!("{d} d {h} h")
    } else if h > 0 {
        format!("{h} h {m} min")
    } else if m > 0 {
        format!("{m} min {} s", secs % 60)
    } else {
        format!("{secs} s")
    }
}

fn backlog_rows(rows: &[st::AccountBacklog], quota: u64) -> Vec<BacklogRow> {
    rows.iter()
        .map(|a| BacklogRow {
            name: a.name.clone(),
            id: a.id.as_str().to_string(),
            href: format!("/ui/accounts/{}", urlencode(a.id.as_str())),
            plan: a.plan.clone(),
            waiting: a.waiting,
            over: a.waiting >= quota,
        })
        .collect()
}

async fn overview_page(ctx: &Ctx<'_>) -> Result<Page, Refusal> {
    let o = st::overview(ctx.state).await?;
    let labels: Vec<String> = o
        .minutes
        .iter()
        .map(|m| rfc3339(m.minute * 60_000)[11..16].to_string())
        .collect();
    let per_second = |f: fn(&stats::live::Minute) -> u64| -> Vec<Option<f64>> {
        o.minutes
            .iter()
            .map(|m| Some((f(m) as f64 / 60.0 * 100.0).round() / 100.0))
            .collect()
    };
    let total_events: u64 = o.minutes.iter().map(|m| m.events).sum();
    let total_attempts: u64 = o.minutes.iter().map(|m| m.delivered + m.failed).sum();
    let rates = charts::lines(
        "chart-rates",
        "Events and deliveries per second, last hour",
        format!(
            "Per minute over the last hour: {total_events} events ingested and {total_attempts} delivery attempts in all; now {:.2} events and {:.2} deliveries per second. The table below lists each minute.",
            o.events_per_second(),
            o.deliveries_per_second()
        ),
        &labels,
        10,
        &[
            charts::Series {
                class: "s-events",
                key: "events",
                label: "Events per second".into(),
                values: per_second(|m| m.events),
            },
            charts::Series {
                class: "s-attempts",
                key: "attempts",
                label: "Deliveries per second".into(),
                values: per_second(|m| m.delivered + m.failed),
            },
        ],
    );
    let max_lag = o.minutes.iter().map(|m| m.lag_ms).max().unwrap_or(0);
    let lag = charts::lines(
        "chart-lag",
        "Delivery lag, last hour",
        format!(
            "The largest delivery lag sampled each minute, in milliseconds; the largest in the hour was {max_lag} ms, now {} ms.",
            o.lag_ms
        ),
        &labels,
        10,
        &[charts::Series {
            class: "s-lag",
            key: "lag_ms",
            label: "Lag (ms)".into(),
            values: o.minutes.iter().map(|m| Some(m.lag_ms as f64)).collect(),
        }],
    );
    let max_waiting = o.minutes.iter().map(|m| m.waiting).max().unwrap_or(0);
    let waiting = charts::lines(
        "chart-waiting",
        "Deliveries waiting, last hour",
        format!(
            "Deliveries waiting for an attempt at the end of each minute; at most {max_waiting} in the hour, {} now.",
            o.backlog_total
        ),
        &labels,
        10,
        &[charts::Series {
            class: "s-waiting",
            key: "waiting",
            label: "Waiting".into(),
            values: o.minutes.iter().map(|m| Some(m.waiting as f64)).collect(),
        }],
    );
    let figures = vec![
        Figure {
            id: "fig-events",
            label: "Events per second",
            value: format!("{:.2}", o.events_per_second()),
        },
        Figure {
            id: "fig-deliveries",
            label: "Deliveries per second",
            value: format!("{:.2}", o.deliveries_per_second()),
        },
        Figure {
            id: "fig-lag",
            label: "Delivery lag",
            value: format!("{} ms", o.lag_ms),
        },
        Figure {
            id: "fig-backlog",
            label: "Deliveries waiting",
            value: o.backlog_total.to_string(),
        },
        Figure {
            id: "fig-store",
            label: "Store size",
            value: bytes_text(o.store_bytes),
        },
        Figure {
            id: "fig-disk",
            label: "Free disk",
            value: match (o.disk_free_bytes, o.disk_total_bytes) {
                (Some(free), Some(total)) => {
                    format!("{} of {}", bytes_text(free), bytes_text(total))
                }
                _ => "unknown".into(),
            },
        },
        Figure {
            id: "fig-version",
            label: "Version",
            value: o.version.to_string(),
        },
        Figure {
            id: "fig-uptime",
            label: "Uptime",
            value: duration_text(o.uptime_secs()),
        },
    ];
    let webhooks = ["Active", "Paused", "Disabled"]
        .iter()
        .zip(o.webhooks)
        .zip(["fig-active", "fig-paused", "fig-disabled"])
        .map(|((label, n), id)| Figure {
            id,
            label,
            value: n.to_string(),
        })
        .collect();
    let page = OverviewPage {
        c: ctx.chrome("Overview", Vec::new()),
        figures,
        webhooks,
        rates,
        lag,
        waiting,
        minutes: o
            .minutes
            .iter()
            .rev()
            .map(|m| MinuteRow {
                start: rfc3339(m.minute * 60_000)[11..16].to_string(),
                events: m.events,
                delivered: m.delivered,
                failed: m.failed,
                lag_ms: m.lag_ms,
                waiting: m.waiting,
            })
            .collect(),
        top: backlog_rows(&o.backlog_top, o.backlog_quota),
        over: backlog_rows(&o.over_quota, o.backlog_quota),
        quota: o.backlog_quota,
    };
    Ok(html(StatusCode::OK, pages::render(&page)))
}

fn account_crumb() -> Vec<(String, String)> {
    vec![("/ui/accounts".into(), "Accounts".into())]
}

fn account_page(ctx: &Ctx, raw: &str) -> Result<Page, Refusal> {
    let id = ctx.req.session.caller.scope(ctx.state, raw)?;
    let account = acc::get_account(ctx.state, &id)?;
    let href = format!("/ui/accounts/{}", urlencode(id.as_str()));
    let usage = acc::plan_usage(ctx.state, &id);
    let page = AccountPage {
        c: ctx.chrome(&account.name, account_crumb()),
        plans: ctx
            .state
            .config
            .plans
            .keys()
            .map(|p| Opt {
                value: p.clone(),
                label: p.clone(),
                selected: *p == account.plan,
            })
            .collect(),
        name: account.name,
        id: id.as_str().to_string(),
        plan: account.plan,
        created: when(account.created_ms),
        webhooks: usage.webhooks,
        waiting: ctx.state.registry.backlog().waiting(&id),
        plan_action: format!("{href}/plan"),
        rotate_href: format!("{href}/api-key"),
        open_href: format!("/ui/a/{}/webhooks", urlencode(id.as_str())),
    };
    Ok(html(StatusCode::OK, pages::render(&page)))
}

/// What a plan allows, in words.
fn plan_terms(ctx: &Ctx, plan: &str) -> String {
    match ctx.state.config.plans.get(plan) {
        Some(p) => format!(
            "{}: {} webhooks, {} events per second",
            plan,
            p.max_webhooks
                .map_or_else(|| "unlimited".to_string(), |m| m.to_string()),
            p.events_per_second
        ),
        None => plan.to_string(),
    }
}

fn confirm_plan(ctx: &Ctx, raw: &str) -> Result<Page, Refusal> {
    let id = ctx.req.session.caller.scope(ctx.state, raw)?;
    let account = acc::get_account(ctx.state, &id)?;
    let plan = ctx.req.param("plan").unwrap_or("").to_string();
    if !ctx.state.config.plans.contains_key(&plan) {
        return Err(Refusal::bad_request(
            "invalid_plan",
            format!("there is no plan {plan:?}"),
        ));
    }
    let href = format!("/ui/accounts/{}", urlencode(id.as_str()));
    let page = ConfirmPage {
        c: ctx.chrome("Change plan", account_crumb()),
        heading: format!(
            "Change the plan of {} from {} to {plan}?",
            account.name, account.plan
        ),
        message: "The new plan's limits apply at once: its webhook maximum to the next webhook                   created, its events per second to the next deliveries."
            .into(),
        detail: Some(format!(
            "Now {}. After the change {}.",
            plan_terms(ctx, &account.plan),
            plan_terms(ctx, &plan)
        )),
        grace: false,
        hidden: vec![("plan".into(), plan.clone())],
        action: format!("{href}/plan"),
        button: "Change Plan".into(),
        cancel_href: href,
    };
    Ok(html(StatusCode::OK, pages::render(&page)))
}

async fn change_plan(ctx: &Ctx<'_>, raw: &str) -> Result<Page, Refusal> {
    let id = ctx.req.session.caller.scope(ctx.state, raw)?;
    let plan = ctx.req.field("plan").unwrap_or("").to_string();
    let account = acc::update_account(
        ctx.state,
        &id,
        acc::UpdateAccount {
            name: None,
            plan: Some(plan),
        },
    )
    .await?;
    ctx.notice(format!(
        "{} is on the {} plan now.",
        account.name, account.plan
    ));
    Ok(redirect(&format!(
        "/ui/accounts/{}",
        urlencode(id.as_str())
    )))
}

fn confirm_rotate_key(ctx: &Ctx, raw: &str) -> Result<Page, Refusal> {
    let id = ctx.req.session.caller.scope(ctx.state, raw)?;
    let account = acc::get_account(ctx.state, &id)?;
    let href = format!("/ui/accounts/{}", urlencode(id.as_str()));
    let page = ConfirmPage {
        c: ctx.chrome("Rotate API key", account_crumb()),
        heading: format!("Rotate the API key of {}?", account.name),
        message: "The current key stops working at once, for the API and the dashboard (its                   sessions end). The new key is shown once."
            .into(),
        detail: Some(format!("Account ID: {}", id.as_str())),
        grace: false,
        hidden: Vec::new(),
        action: format!("{href}/api-key"),
        button: "Rotate API Key".into(),
        cancel_href: href,
    };
    Ok(html(StatusCode::OK, pages::render(&page)))
}

async fn rotate_key(ctx: &Ctx<'_>, raw: &str) -> Result<Page, Refusal> {
    let id = ctx.req.session.caller.scope(ctx.state, raw)?;
    let account = acc::get_account(ctx.state, &id)?;
    let api_key = acc::rotate_api_key(ctx.state, &id).await?;
    let page = ApiKeyPage {
        c: ctx.chrome("New API key", account_crumb()),
        name: account.name,
        api_key,
        back_href: format!("/ui/accounts/{}", urlencode(id.as_str())),
    };
    Ok(html(StatusCode::OK, pages::render(&page)))
}

// ---- account screens ------------------------------------------------------------------

async fn account_screen(
    ctx: &Ctx<'_>,
    account: &AccountId,
    get: bool,
    rest: &[&str],
) -> Result<Page, Refusal> {
    let base = format!("/ui/a/{}", urlencode(account.as_str()));
    let hook_id = |raw: &str| WebhookId::parse(raw).ok_or_else(|| wh::not_found(raw));
    match (get, rest) {
        (true, ["webhooks"]) => webhooks_home(ctx, account, &base),
        (true, ["webhooks", "new"]) => step1(ctx, account, &base, Default::default()),
        (false, ["webhooks", "new"]) => step1_submit(ctx, account, &base),
        (false, ["webhooks", "new", "events"]) => step2_submit(ctx, account, &base),
        (false, ["webhooks", "new", "security"]) => step3_submit(ctx, account, &base).await,
        (true, ["webhooks", w]) => webhook_page(ctx, account, &base, hook_id(w)?),
        (true, ["webhooks", w, "edit"]) => edit_page(ctx, account, &base, hook_id(w)?),
        (false, ["webhooks", w, "edit"]) => edit_submit(ctx, account, &base, hook_id(w)?).await,
        (false, ["webhooks", w, "status"]) => toggle(ctx, account, &base, hook_id(w)?).await,
        (true, ["webhooks", w, "delete"]) => confirm_delete(ctx, account, &base, hook_id(w)?),
        (false, ["webhooks", w, "delete"]) => delete(ctx, account, &base, hook_id(w)?).await,
        (true, ["webhooks", w, "secret"]) => show_secret(ctx, account, &base, hook_id(w)?),
        (true, ["webhooks", w, "secret", "regenerate"]) => {
            confirm_regenerate(ctx, account, &base, hook_id(w)?)
        }
        (false, ["webhooks", w, "secret", "regenerate"]) => {
            regenerate(ctx, account, &base, hook_id(w)?).await
        }
        (false, ["webhooks", w, "test"]) => send_test(ctx, account, &base, hook_id(w)?).await,
        (true, ["webhooks", w, "deliveries"]) => deliveries(ctx, account, &base, hook_id(w)?),
        (true, ["deliveries", d]) => delivery(ctx, account, &base, d),
        (false, ["deliveries", d, "retry"]) => retry(ctx, account, &base, d).await,
        (_, ["webhooks", ..] | ["deliveries", ..]) => Ok(bad_method()),
        _ => Ok(not_found()),
    }
}

/// A webhook whose oldest waiting delivery has waited this long is "Lagging".
const LAGGING_AFTER_MS: u64 = 2_000;

/// Marks a webhook whose latest attempts fail ("Failing"), or that is behind ("Lagging":
/// deliveries have waited for its endpoint for 2 s or more, it is working off retries of the
/// last two hours, or its p95 response time is a quarter of `delivery.timeout` or more).
fn health_flag(
    h: &Webhook,
    slots: &crate::dispatch::HookView,
    buckets: &[Bucket],
    timeout_ms: u64,
) -> Option<(&'static str, &'static str, String)> {
    if h.status != WebhookStatus::Active {
        return None;
    }
    if h.consecutive_failures > 0 {
        return Some((
            "bad",
            "Failing",
            format!("the last {} attempts failed", h.consecutive_failures),
        ));
    }
    // Deliveries due now that wait behind the endpoint's concurrency limit.
    if let Some(ms) = slots.oldest_waiting_ms.filter(|ms| *ms >= LAGGING_AFTER_MS) {
        return Some((
            "warn",
            "Lagging",
            format!(
                "{} deliveries wait for the endpoint, the oldest for {:.1} s",
                slots.waiting,
                ms as f64 / 1000.0
            ),
        ));
    }
    let recent = &buckets[buckets.len().saturating_sub(2)..];
    let retrying: u64 = recent.iter().map(|b| b.retrying).sum();
    if retrying > 0 {
        return Some((
            "warn",
            "Lagging",
            format!("{retrying} attempts failed and were retried in the last two hours"),
        ));
    }
    let slow = recent.iter().filter_map(|b| b.p95_ms).max();
    match slow {
        Some(p95) if p95 >= timeout_ms / 4 => Some((
            "warn",
            "Lagging",
            format!("slow endpoint: p95 response time {p95} ms"),
        )),
        _ => None,
    }
}

fn toggle_of(h: &Webhook) -> (bool, &'static str, &'static str, bool) {
    match h.status {
        WebhookStatus::Active => (false, "Pause", "paused", true),
        WebhookStatus::Paused => (true, "Resume", "active", true),
        // A disabled webhook is re-enabled from its page ("Resume" sets it active).
        WebhookStatus::Disabled => (true, "Resume", "active", true),
    }
}

fn webhooks_home(ctx: &Ctx, account: &AccountId, base: &str) -> Result<Page, Refusal> {
    let acct = acc::get_account(ctx.state, account)?;
    let mut hooks = ctx.state.store.webhooks_of(account)?;
    hooks.sort_by_key(|h| (h.created_ms, h.id));
    let timeout_ms = ctx.state.config.delivery.timeout.as_millis() as u64;
    let mut rows = Vec::with_capacity(hooks.len());
    for h in &hooks {
        let buckets = st::webhook_stats(ctx.state, account, h.id, Window::Day)?;
        rows.push((h, buckets));
    }
    let rows = rows
        .into_iter()
        .map(|(h, buckets)| {
            let (status_text, status_class) = status_view(h);
            let (paused, toggle_label, toggle_to, can_toggle) = toggle_of(h);
            let href = format!("{base}/webhooks/{}", h.id);
            let rate = stats::success_rate(&buckets);
            let flag = health_flag(h, &ctx.state.deliverer.slots_of(h), &buckets, timeout_ms);
            let attempts: Vec<u64> = buckets.iter().map(Bucket::attempts).collect();
            let bad: Vec<u64> = buckets.iter().map(|b| b.retrying + b.failed).collect();
            let spark = charts::sparkline(
                &attempts,
                &bad,
                format!(
                    "Attempts per hour, last 24 hours: {} in all, {} failed or retrying",
                    attempts.iter().sum::<u64>(),
                    bad.iter().sum::<u64>()
                ),
            );
            WebhookRow {
                rate: rate.map_or_else(|| "—".to_string(), |r| format!("{r:.1} %")),
                spark,
                flag,
                name: h.name.clone(),
                url: h.url.clone(),
                events: h.events.join(", "),
                status_text,
                status_class,
                edit_href: format!("{href}/edit"),
                delete_href: format!("{href}/delete"),
                status_action: format!("{href}/status"),
                href,
                paused,
                toggle_label,
                toggle_to,
                can_toggle,
            }
        })
        .collect();
    let usage = acc::plan_usage(ctx.state, account);
    let page = WebhooksPage {
        c: ctx.chrome(
            &format!("{} · Webhooks", acct.name),
            if ctx.req.session.caller == Caller::Admin {
                vec![("/ui/accounts".into(), "Accounts".into())]
            } else {
                Vec::new()
            },
        ),
        account_name: acct.name,
        base: base.to_string(),
        rows,
        at_limit: usage.at_limit(),
        plan: PlanView {
            name: usage.plan.clone(),
            used: usage.webhooks,
            allowed: usage
                .max_webhooks
                .map_or_else(|| "unlimited".to_string(), |m| m.to_string()),
            events_per_second: if usage.events_per_second == 0 {
                "unlimited".into()
            } else {
                usage.events_per_second.to_string()
            },
        },
    };
    Ok(html(StatusCode::OK, pages::render(&page)))
}

struct Step1Values {
    name: String,
    url: String,
    description: String,
}

impl Default for Step1Values {
    fn default() -> Self {
        Step1Values {
            name: String::new(),
            url: "https://".into(),
            description: String::new(),
        }
    }
}

fn step1(ctx: &Ctx, account: &AccountId, base: &str, v: Step1Values) -> Result<Page, Refusal> {
    step1_page(ctx, account, base, v, FieldErrors::default())
}

fn step1_page(
    ctx: &Ctx,
    account: &AccountId,
    base: &str,
    v: Step1Values,
    errors: FieldErrors,
) -> Result<Page, Refusal> {
    let acct = acc::get_account(ctx.state, account)?;
    let status = form_status(errors.any());
    let page = Step1Page {
        c: ctx.chrome("Add Webhook", ctx.account_crumbs(account, &acct.name)),
        base: base.to_string(),
        name: v.name,
        url: v.url,
        description: v.description,
        errors,
        require_https: ctx.state.config.delivery.require_https,
    };
    Ok(html(status, pages::render(&page)))
}

/// Step 1's fields from a form, with an error per field that the domain rules refuse.
fn check_step1(ctx: &Ctx) -> (Step1Values, FieldErrors) {
    let v = Step1Values {
        name: ctx.req.field("name").unwrap_or("").to_string(),
        url: ctx.req.field("url").unwrap_or("").trim().to_string(),
        description: ctx.req.field("description").unwrap_or("").to_string(),
    };
    let errors = FieldErrors {
        name: domain::check_name(&v.name).err().map(|e| e.message),
        url: wh::check_url(ctx.state, &v.url).err().map(|e| e.message),
        description: wh::check_description(Some(v.description.clone()))
            .err()
            .map(|e| e.message),
    };
    (v, errors)
}

fn step1_submit(ctx: &Ctx, account: &AccountId, base: &str) -> Result<Page, Refusal> {
    let (v, errors) = check_step1(ctx);
    if errors.any() {
        return step1_page(ctx, account, base, v, errors);
    }
    step2_page(ctx, account, base, v, &[], None)
}

fn step2_page(
    ctx: &Ctx,
    account: &AccountId,
    base: &str,
    v: Step1Values,
    selected: &[String],
    error: Option<String>,
) -> Result<Page, Refusal> {
    let acct = acc::get_account(ctx.state, account)?;
    let status = form_status(error.is_some());
    let page = Step2Page {
        c: ctx.chrome("Add Webhook", ctx.account_crumbs(account, &acct.name)),
        base: base.to_string(),
        name: v.name,
        url: v.url,
        description: v.description,
        everything: selected.iter().any(|e| e == "*"),
        groups: event_groups(ctx.state.registry.catalog(), selected),
        error,
    };
    Ok(html(status, pages::render(&page)))
}

fn step2_submit(ctx: &Ctx, account: &AccountId, base: &str) -> Result<Page, Refusal> {
    let (v, errors) = check_step1(ctx);
    if errors.any() {
        return step1_page(ctx, account, base, v, errors);
    }
    let selected = ctx.req.fields("events");
    let events = match wh::check_events(ctx.state, selected.clone()) {
        Ok(e) => e,
        Err(e) => {
            let msg = if selected.is_empty() {
                "Choose at least one event.".to_string()
            } else {
                e.message
            };
            return step2_page(ctx, account, base, v, &selected, Some(msg));
        }
    };
    step3_page(
        ctx,
        account,
        base,
        v,
        events,
        signing::new_secret(),
        String::new(),
        None,
    )
}

#[allow(clippy::too_many_arguments)]
fn step3_page(
    ctx: &Ctx,
    account: &AccountId,
    base: &str,
    v: Step1Values,
    events: Vec<String>,
    secret: String,
    ip_allowlist: String,
    error: Option<String>,
) -> Result<Page, Refusal> {
    let acct = acc::get_account(ctx.state, account)?;
    let status = form_status(error.is_some());
    let page = Step3Page {
        c: ctx.chrome("Add Webhook", ctx.account_crumbs(account, &acct.name)),
        base: base.to_string(),
        name: v.name,
        url: v.url,
        description: v.description,
        events,
        secret,
        ip_allowlist,
        // Kept when the page is shown again with an error.
        fifo: ctx.req.field("ordering") == Some("fifo"),
        standard: ctx.req.field("signature_scheme") == Some("standard-webhooks"),
        max_concurrency: ctx.req.field("max_concurrency").unwrap_or("").to_string(),
        error,
    };
    Ok(html(status, pages::render(&page)))
}

fn split_list(text: &str) -> Vec<String> {
    text.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

async fn step3_submit(ctx: &Ctx<'_>, account: &AccountId, base: &str) -> Result<Page, Refusal> {
    let (v, errors) = check_step1(ctx);
    if errors.any() {
        return step1_page(ctx, account, base, v, errors);
    }
    let events = ctx.req.fields("events");
    if let Err(e) = wh::check_events(ctx.state, events.clone()) {
        return step2_page(ctx, account, base, v, &events, Some(e.message));
    }
    let secret = ctx.req.field("secret").unwrap_or("").to_string();
    let allowlist_text = ctx.req.field("ip_allowlist").unwrap_or("").to_string();
    let body = wh::CreateWebhook {
        name: v.name.clone(),
        url: v.url.clone(),
        description: Some(v.description.clone()),
        events: events.clone(),
        ip_allowlist: split_list(&allowlist_text),
        signature_scheme: ctx.req.field("signature_scheme").map(str::to_string),
        ordering: ctx.req.field("ordering").map(str::to_string),
        max_concurrency: concurrency_field(ctx),
        secret: Some(secret.clone()),
    };
    match wh::create_webhook(ctx.state, account, body).await {
        Ok(hook) => {
            ctx.notice(format!("The webhook {} was created.", hook.name));
            Ok(redirect(&format!("{base}/webhooks/{}", hook.id)))
        }
        Err(e) if e.status.is_client_error() => {
            // A refused secret is not offered again: a weak one would only be refused again.
            let secret = if crate::secrets::check_supplied_secret(&secret).is_ok() {
                secret
            } else {
                signing::new_secret()
            };
            step3_page(
                ctx,
                account,
                base,
                v,
                events,
                secret,
                allowlist_text,
                Some(e.message),
            )
        }
        Err(e) => Err(e),
    }
}

fn scheme_label(scheme: SignatureScheme) -> &'static str {
    match scheme {
        SignatureScheme::KyberAccess => "KyberAccess (X-KyberAccess-Signature, the guide's)",
        SignatureScheme::StandardWebhooks => "Standard Webhooks (webhook-signature)",
    }
}

/// The "Max Concurrent Requests" field: empty is no cap; anything that is not a number is
/// passed on as 0, which the rule refuses with its own message.
fn concurrency_field(ctx: &Ctx) -> Option<u64> {
    let text = ctx.req.field("max_concurrency").unwrap_or("").trim();
    (!text.is_empty()).then(|| text.parse().unwrap_or(0))
}

fn hook_view(state: &Services, base: &str, h: &Webhook) -> HookView {
    let (status_text, status_class) = status_view(h);
    let slots = state.deliverer.slots_of(h);
    let concurrency = match h.max_concurrency {
        Some(cap) => format!(
            "up to {} requests at once now (adapts to the endpoint; your cap: {cap})",
            slots.limit
        ),
        None => format!(
            "up to {} requests at once now (adapts to the endpoint; no cap set)",
            slots.limit
        ),
    };
    let backlog = match slots.oldest_waiting_ms {
        Some(ms) if slots.waiting > 0 => format!(
            "{} deliveries wait for a slot; the oldest for {:.1} s",
            slots.waiting,
            ms as f64 / 1000.0
        ),
        _ => String::new(),
    };
    HookView {
        id: h.id.to_string(),
        name: h.name.clone(),
        url: h.url.clone(),
        description: h.description.clone().unwrap_or_default(),
        events: h.events.clone(),
        ip_allowlist: h.ip_allowlist.clone(),
        status_text,
        status_class,
        failures: h.consecutive_failures,
        ordering: match h.ordering {
            DeliveryOrder::Unordered => "As they come due (none)",
            DeliveryOrder::Fifo => "One at a time, in event order (fifo)",
        },
        scheme: scheme_label(h.signature_scheme),
        concurrency,
        backlog,
        created: when(h.created_ms),
        updated: when(h.updated_ms),
        href: format!("{base}/webhooks/{}", h.id),
    }
}

/// `2025-01-15 09:00 UTC` (hourly) or `2025-01-15` (daily): a bucket's start in the table.
fn bucket_when(ms: u64, window: Window) -> String {
    let t = rfc3339(ms);
    match window {
        Window::Day => format!("{} {} UTC", &t[..10], &t[11..16]),
        Window::Week => t[..10].to_string(),
    }
}

/// A bucket's axis label: `09:00` or `01-15`.
fn bucket_axis(ms: u64, window: Window) -> String {
    let t = rfc3339(ms);
    match window {
        Window::Day => t[11..16].to_string(),
        Window::Week => t[5..10].to_string(),
    }
}

fn ms_text(v: Option<u64>) -> String {
    v.map_or_else(|| "—".to_string(), |v| format!("{v} ms"))
}

/// Whether the webhook is healthy over the window and, if not, since which bucket.
fn verdict(buckets: &[Bucket], window: Window) -> (String, &'static str) {
    let total: u64 = buckets.iter().map(Bucket::attempts).sum();
    if total == 0 {
        return (
            format!("No attempts in the {}.", window_label(window)),
            "paused",
        );
    }
    let bad = |b: &Bucket| b.retrying + b.failed > 0;
    let with_attempts: Vec<&Bucket> = buckets.iter().filter(|b| b.attempts() > 0).collect();
    let rate = stats::success_rate(buckets).unwrap_or(0.0);
    match with_attempts.last() {
        Some(last) if bad(last) => {
            let since = with_attempts
                .iter()
                .rev()
                .take_while(|b| bad(b))
                .last()
                .map_or(last.start_ms, |b| b.start_ms);
            (
                format!(
                    "Failing since {}: {} of {total} attempts in the {} succeeded ({rate:.1} %).",
                    bucket_when(since, window),
                    buckets.iter().map(|b| b.delivered).sum::<u64>(),
                    window_label(window),
                ),
                "bad",
            )
        }
        _ => (
            format!(
                "Healthy now: {rate:.1} % of {total} attempts in the {} succeeded.",
                window_label(window)
            ),
            if rate >= 99.0 { "ok" } else { "warn" },
        ),
    }
}

fn window_label(window: Window) -> &'static str {
    match window {
        Window::Day => "last 24 hours",
        Window::Week => "last 7 days",
    }
}

/// The health section of a webhook's page: both charts and their table.
fn health_view(href: &str, buckets: &[Bucket], window: Window) -> HealthView {
    let labels: Vec<String> = buckets
        .iter()
        .map(|b| bucket_axis(b.start_ms, window))
        .collect();
    let every = if window == Window::Day { 3 } else { 1 };
    let (delivered, retrying, failed) = buckets.iter().fold((0, 0, 0), |(d, r, f), b| {
        (d + b.delivered, r + b.retrying, f + b.failed)
    });
    let series = |f: fn(&Bucket) -> u64| buckets.iter().map(|b| Some(f(b) as f64)).collect();
    let outcomes = charts::stacked(
        "chart-outcomes",
        &format!("Attempts by outcome, {}", window_label(window)),
        format!(
            "{delivered} delivered, {retrying} retrying and {failed} failed in the {}, per {}; the table below lists each {}.",
            window_label(window),
            if window == Window::Day { "hour" } else { "day" },
            if window == Window::Day { "hour" } else { "day" },
        ),
        &labels,
        every,
        &[
            charts::Series {
                class: "s-delivered",
                key: "delivered",
                label: "Delivered".into(),
                values: series(|b| b.delivered),
            },
            charts::Series {
                class: "s-retrying",
                key: "retrying",
                label: "Retrying".into(),
                values: series(|b| b.retrying),
            },
            charts::Series {
                class: "s-failed",
                key: "failed",
                label: "Failed".into(),
                values: series(|b| b.failed),
            },
        ],
        buckets
            .iter()
            .map(|b| {
                format!(
                    "{}: {} delivered, {} retrying, {} failed",
                    bucket_when(b.start_ms, window),
                    b.delivered,
                    b.retrying,
                    b.failed
                )
            })
            .collect(),
    );
    let p95_max = buckets.iter().filter_map(|b| b.p95_ms).max();
    let latency = charts::lines(
        "chart-latency",
        &format!("Endpoint response time, {}", window_label(window)),
        match p95_max {
            Some(max) => format!(
                "Median (p50) and 95th percentile (p95) response time in milliseconds per {}; the slowest p95 was {max} ms. The table below lists each value.",
                if window == Window::Day { "hour" } else { "day" }
            ),
            None => "No response times: no attempt in this window.".to_string(),
        },
        &labels,
        every,
        &[
            charts::Series {
                class: "s-p50",
                key: "p50_ms",
                label: "p50 (ms)".into(),
                values: buckets.iter().map(|b| b.p50_ms.map(|v| v as f64)).collect(),
            },
            charts::Series {
                class: "s-p95",
                key: "p95_ms",
                label: "p95 (ms)".into(),
                values: buckets.iter().map(|b| b.p95_ms.map(|v| v as f64)).collect(),
            },
        ],
    );
    let (verdict, verdict_class) = verdict(buckets, window);
    HealthView {
        window_label: window_label(window),
        is_week: window == Window::Week,
        day_href: format!("{href}?window=24h#health-h"),
        week_href: format!("{href}?window=7d#health-h"),
        verdict,
        verdict_class,
        outcomes,
        latency,
        rows: buckets
            .iter()
            .map(|b| HealthRow {
                start: bucket_when(b.start_ms, window),
                delivered: b.delivered,
                retrying: b.retrying,
                failed: b.failed,
                p50: ms_text(b.p50_ms),
                p95: ms_text(b.p95_ms),
            })
            .collect(),
        delivered,
        retrying,
        failed,
    }
}

fn webhook_page(
    ctx: &Ctx,
    account: &AccountId,
    base: &str,
    id: WebhookId,
) -> Result<Page, Refusal> {
    let acct = acc::get_account(ctx.state, account)?;
    let hook = wh::get_webhook(ctx.state, account, id)?;
    let window = st::parse_window(ctx.req.param("window"))?;
    let buckets = st::webhook_stats(ctx.state, account, id, window)?;
    let health = health_view(&format!("{base}/webhooks/{id}"), &buckets, window);
    // The result of a test send: `?test=dlv_…`, a delivery of this webhook.
    let test = ctx
        .req
        .param("test")
        .and_then(DeliveryId::parse)
        .filter(|d| d.webhook == id)
        .and_then(|d| dlv::get_delivery(ctx.state, account, d).ok())
        .map(|d| {
            let last = d.attempts.last();
            TestView {
                event: d.record.event.clone(),
                ok: d.record.status == DeliveryStatus::Delivered,
                code: last
                    .and_then(|a| a.response_code)
                    .map_or_else(|| "none".into(), |c| c.to_string()),
                time: last.map_or_else(String::new, |a| format!("{} ms", a.response_time_ms)),
                body: last.map(|a| a.response_body.clone()).unwrap_or_default(),
                error: last.and_then(|a| a.error.clone()),
                delivery_href: format!("{base}/deliveries/{}", d.record.id),
            }
        });
    let chosen = test.as_ref().map(|t| t.event.clone());
    let event_types = ctx
        .state
        .registry
        .catalog()
        .iter()
        .map(|e| Opt {
            value: e.clone(),
            label: e.clone(),
            selected: Some(e) == chosen.as_ref(),
        })
        .collect();
    let (paused, toggle_label, toggle_to, can_toggle) = toggle_of(&hook);
    let page = WebhookPage {
        c: ctx.chrome(&hook.name, ctx.account_crumbs(account, &acct.name)),
        hook: hook_view(ctx.state, base, &hook),
        health,
        paused,
        toggle_label,
        toggle_to,
        can_toggle,
        event_types,
        test,
    };
    Ok(html(StatusCode::OK, pages::render(&page)))
}

fn edit_page(ctx: &Ctx, account: &AccountId, base: &str, id: WebhookId) -> Result<Page, Refusal> {
    let hook = wh::get_webhook(ctx.state, account, id)?;
    render_edit(
        ctx,
        account,
        base,
        &hook,
        Step1Values {
            name: hook.name.clone(),
            url: hook.url.clone(),
            description: hook.description.clone().unwrap_or_default(),
        },
        &hook.events,
        hook.ip_allowlist.join("\n"),
        FieldErrors::default(),
        None,
    )
}

#[allow(clippy::too_many_arguments)]
fn render_edit(
    ctx: &Ctx,
    account: &AccountId,
    base: &str,
    hook: &Webhook,
    v: Step1Values,
    events: &[String],
    ip_allowlist: String,
    errors: FieldErrors,
    error: Option<String>,
) -> Result<Page, Refusal> {
    let acct = acc::get_account(ctx.state, account)?;
    let status = form_status(errors.any() || error.is_some());
    let hook_href = format!("{base}/webhooks/{}", hook.id);
    let mut crumbs = ctx.account_crumbs(account, &acct.name);
    crumbs.push((hook_href.clone(), hook.name.clone()));
    let page = EditPage {
        c: ctx.chrome(&format!("Edit {}", hook.name), crumbs),
        hook_href,
        name: v.name,
        url: v.url,
        description: v.description,
        everything: events.iter().any(|e| e == "*"),
        groups: event_groups(ctx.state.registry.catalog(), events),
        ip_allowlist,
        // What was submitted when the form is shown again, else the stored value.
        fifo: ctx
            .req
            .field("ordering")
            .map_or(hook.ordering == DeliveryOrder::Fifo, |o| o == "fifo"),
        standard: ctx.req.field("signature_scheme").map_or(
            hook.signature_scheme == SignatureScheme::StandardWebhooks,
            |o| o == "standard-webhooks",
        ),
        max_concurrency: ctx.req.field("max_concurrency").map_or_else(
            || {
                hook.max_concurrency
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            },
            str::to_string,
        ),
        errors,
        error,
    };
    Ok(html(status, pages::render(&page)))
}

async fn edit_submit(
    ctx: &Ctx<'_>,
    account: &AccountId,
    base: &str,
    id: WebhookId,
) -> Result<Page, Refusal> {
    let hook = wh::get_webhook(ctx.state, account, id)?;
    let (v, errors) = check_step1(ctx);
    let events = ctx.req.fields("events");
    let allowlist_text = ctx.req.field("ip_allowlist").unwrap_or("").to_string();
    if errors.any() {
        return render_edit(
            ctx,
            account,
            base,
            &hook,
            v,
            &events,
            allowlist_text,
            errors,
            None,
        );
    }
    let body = wh::UpdateWebhook {
        name: Some(v.name.clone()),
        url: Some(v.url.clone()),
        description: Some(v.description.clone()),
        events: Some(events.clone()),
        ip_allowlist: Some(split_list(&allowlist_text)),
        ordering: ctx.req.field("ordering").map(str::to_string),
        signature_scheme: ctx.req.field("signature_scheme").map(str::to_string),
        // An empty field lifts the cap.
        max_concurrency: Some(concurrency_field(ctx)),
        ..Default::default()
    };
    match wh::update_webhook(ctx.state, account, id, body).await {
        Ok(h) => {
            ctx.notice(format!("Changes to {} were saved.", h.name));
            Ok(redirect(&format!("{base}/webhooks/{}", h.id)))
        }
        Err(e) if e.status.is_client_error() => {
            let msg = if events.is_empty() {
                "Choose at least one event.".to_string()
            } else {
                e.message
            };
            render_edit(
                ctx,
                account,
                base,
                &hook,
                v,
                &events,
                allowlist_text,
                FieldErrors::default(),
                Some(msg),
            )
        }
        Err(e) => Err(e),
    }
}

/// Where a form asked to go back to: a local path inside this account's screens. Anything
/// else (another account's screens, a URL, CR/LF) is refused with 400 before the action runs.
fn back_to(ctx: &Ctx, base: &str, fallback: String) -> Result<String, Refusal> {
    match ctx.req.field("back") {
        None | Some("") => Ok(fallback),
        Some(b)
            if super::local_path(b).is_some()
                && b.starts_with(&format!("{base}/"))
                && !b.contains("//") =>
        {
            Ok(b.to_string())
        }
        Some(_) => Err(Refusal::bad_request(
            "invalid_back",
            "The page to go back to is not one of this account's pages; nothing changed.",
        )),
    }
}

async fn toggle(
    ctx: &Ctx<'_>,
    account: &AccountId,
    base: &str,
    id: WebhookId,
) -> Result<Page, Refusal> {
    let to = ctx.req.field("status").unwrap_or("").to_string();
    let back = back_to(ctx, base, format!("{base}/webhooks"))?;
    let body = wh::UpdateWebhook {
        status: Some(to),
        ..Default::default()
    };
    let hook = wh::update_webhook(ctx.state, account, id, body).await?;
    ctx.notice(match hook.status {
        WebhookStatus::Paused => format!(
            "{} is paused: no deliveries are made until you resume it.",
            hook.name
        ),
        _ => format!("{} is active again.", hook.name),
    });
    Ok(redirect(&back))
}

fn confirm_delete(
    ctx: &Ctx,
    account: &AccountId,
    base: &str,
    id: WebhookId,
) -> Result<Page, Refusal> {
    let acct = acc::get_account(ctx.state, account)?;
    let hook = wh::get_webhook(ctx.state, account, id)?;
    let page = ConfirmPage {
        c: ctx.chrome("Delete webhook", ctx.account_crumbs(account, &acct.name)),
        heading: format!("Delete the webhook {}?", hook.name),
        message: "All delivery history for this webhook is also deleted. This cannot be undone."
            .into(),
        detail: Some(format!("Endpoint URL: {}", hook.url)),
        grace: false,
        hidden: Vec::new(),
        action: format!("{base}/webhooks/{}/delete", hook.id),
        button: "Delete Webhook".into(),
        cancel_href: format!("{base}/webhooks"),
    };
    Ok(html(StatusCode::OK, pages::render(&page)))
}

async fn delete(
    ctx: &Ctx<'_>,
    account: &AccountId,
    base: &str,
    id: WebhookId,
) -> Result<Page, Refusal> {
    let hook = wh::get_webhook(ctx.state, account, id)?;
    wh::delete_webhook(ctx.state, account, id).await?;
    ctx.notice(format!(
        "The webhook {} and its delivery history were deleted.",
        hook.name
    ));
    Ok(redirect(&format!("{base}/webhooks")))
}

fn show_secret(ctx: &Ctx, account: &AccountId, base: &str, id: WebhookId) -> Result<Page, Refusal> {
    let acct = acc::get_account(ctx.state, account)?;
    let hook = wh::get_webhook(ctx.state, account, id)?;
    let href = format!("{base}/webhooks/{}", hook.id);
    let mut crumbs = ctx.account_crumbs(account, &acct.name);
    crumbs.push((href.clone(), hook.name.clone()));
    let page = SecretPage {
        c: ctx.chrome("Signing Secret", crumbs),
        heading: format!("Signing Secret of {}", hook.name),
        note: "Use it to verify the X-KyberAccess-Signature of every request. Keep it private."
            .into(),
        secret: hook.secret,
        back_href: href,
    };
    Ok(html(StatusCode::OK, pages::render(&page)))
}

fn confirm_regenerate(
    ctx: &Ctx,
    account: &AccountId,
    base: &str,
    id: WebhookId,
) -> Result<Page, Refusal> {
    let acct = acc::get_account(ctx.state, account)?;
    let hook = wh::get_webhook(ctx.state, account, id)?;
    let href = format!("{base}/webhooks/{}", hook.id);
    let page = ConfirmPage {
        c: ctx.chrome("Regenerate Secret", ctx.account_crumbs(account, &acct.name)),
        heading: format!("Regenerate the signing secret of {}?", hook.name),
        message: "Requests are signed with the new secret from now on; your endpoint must use \
                  it to verify them. The new secret is shown once."
            .into(),
        detail: None,
        grace: true,
        hidden: Vec::new(),
        action: format!("{href}/secret/regenerate"),
        button: "Regenerate Secret".into(),
        cancel_href: href,
    };
    Ok(html(StatusCode::OK, pages::render(&page)))
}

async fn regenerate(
    ctx: &Ctx<'_>,
    account: &AccountId,
    base: &str,
    id: WebhookId,
) -> Result<Page, Refusal> {
    let acct = acc::get_account(ctx.state, account)?;
    let grace = wh::check_grace_period(ctx.req.field("grace_period"))?;
    let hook = wh::rotate_secret(ctx.state, account, id, grace).await?;
    let secret = hook.secret.clone();
    let href = format!("{base}/webhooks/{}", hook.id);
    let mut crumbs = ctx.account_crumbs(account, &acct.name);
    crumbs.push((href.clone(), hook.name.clone()));
    let page = SecretPage {
        c: ctx.chrome("New Signing Secret", crumbs),
        heading: format!("New signing secret of {}", hook.name),
        note: if grace.is_zero() {
            "Copy it now and update your endpoint: requests are signed with it from now on."
                .to_string()
        } else {
            format!(
                "Copy it now and update your endpoint. For the next {}, requests carry both \
                 signatures: the old secret's in X-KyberAccess-Signature and this one's in \
                 X-KyberAccess-Signature-Next.",
                humantime::format_duration(grace)
            )
        },
        secret,
        back_href: href,
    };
    Ok(html(StatusCode::OK, pages::render(&page)))
}

async fn send_test(
    ctx: &Ctx<'_>,
    account: &AccountId,
    base: &str,
    id: WebhookId,
) -> Result<Page, Refusal> {
    let event = ctx.req.field("event").unwrap_or("").to_string();
    let outcome = wh::test_webhook(ctx.state, account, id, &event).await?;
    Ok(redirect(&format!(
        "{base}/webhooks/{id}?test={}#test-result",
        outcome.delivery_id
    )))
}

/// The Deliveries tab's filters, as the API's query parameters: empty fields are left out,
/// and the form's `datetime-local` times (UTC) become RFC 3339.
fn delivery_params(query: &[(String, String)]) -> Vec<(String, String)> {
    query
        .iter()
        .filter(|(k, v)| {
            !v.is_empty()
                && matches!(
                    k.as_str(),
                    "status" | "event" | "since" | "until" | "event_id" | "delivery_id" | "cursor"
                )
        })
        .map(|(k, v)| {
            let v = match k.as_str() {
                "since" | "until" if v.len() == 16 => format!("{v}:00Z"),
                "since" | "until" if v.len() == 19 => format!("{v}Z"),
                _ => v.clone(),
            };
            (k.clone(), v)
        })
        .chain(std::iter::once((
            "limit".to_string(),
            DELIVERIES_PER_PAGE.to_string(),
        )))
        .collect()
}

fn deliveries(ctx: &Ctx, account: &AccountId, base: &str, id: WebhookId) -> Result<Page, Refusal> {
    let acct = acc::get_account(ctx.state, account)?;
    let hook = wh::get_webhook(ctx.state, account, id)?;
    let hook_href = format!("{base}/webhooks/{}", hook.id);
    let action = format!("{hook_href}/deliveries");
    let q = ctx.req.query.as_slice();
    let value = |k: &str| {
        q.iter()
            .find(|(key, _)| key == k)
            .map_or_else(String::new, |(_, v)| v.clone())
    };
    let (status_f, event_f, since, until, event_id, delivery_id) = (
        value("status"),
        value("event"),
        value("since"),
        value("until"),
        value("event_id").trim().to_string(),
        value("delivery_id").trim().to_string(),
    );
    let (rows, next, error) =
        match dlv::query_from_params(ctx.state, account, Some(id), &delivery_params(q))
            .and_then(|query| dlv::list_deliveries(ctx.state, account, &query))
        {
            Ok(page) => {
                let rows = page
                    .items
                    .iter()
                    .map(|d| {
                        let (status_text, status_class) = delivery_status(d.status);
                        DeliveryRow {
                            href: format!("{base}/deliveries/{}", d.id),
                            event: d.event.clone(),
                            timestamp: when(d.id.created_ms()),
                            code: d
                                .response_code
                                .map_or_else(|| "—".into(), |c| c.to_string()),
                            time: d
                                .response_time_ms
                                .map_or_else(|| "—".into(), |t| format!("{t} ms")),
                            status_text,
                            status_class,
                            test: d.is_test,
                        }
                    })
                    .collect();
                (rows, page.next_cursor, None)
            }
            Err(e) => (Vec::new(), None, Some(e.message)),
        };
    let filters: String = [
        ("status", &status_f),
        ("event", &event_f),
        ("since", &since),
        ("until", &until),
        ("event_id", &event_id),
        ("delivery_id", &delivery_id),
    ]
    .iter()
    .filter(|(_, v)| !v.is_empty())
    .map(|(k, v)| format!("&{k}={}", urlencode(v)))
    .collect();
    let next_href = next.map(|c| format!("{action}?cursor={c}{filters}"));
    let first_href = ctx
        .req
        .param("cursor")
        .map(|_| format!("{action}?{}", filters.trim_start_matches('&')));
    let mut statuses = vec![Opt {
        value: String::new(),
        label: "Any status".into(),
        selected: status_f.is_empty(),
    }];
    for (v, l) in [
        ("delivered", "Delivered"),
        ("retrying", "Retrying"),
        ("failed", "Failed"),
        ("pending", "Pending"),
    ] {
        statuses.push(Opt {
            value: v.into(),
            label: l.into(),
            selected: status_f == v,
        });
    }
    let mut events = vec![Opt {
        value: String::new(),
        label: "Any event".into(),
        selected: event_f.is_empty(),
    }];
    events.extend(ctx.state.registry.catalog().iter().map(|e| Opt {
        value: e.clone(),
        label: e.clone(),
        selected: *e == event_f,
    }));
    let mut crumbs = ctx.account_crumbs(account, &acct.name);
    crumbs.push((hook_href.clone(), hook.name.clone()));
    let status = if error.is_some() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    let page = DeliveriesPage {
        c: ctx.chrome(&format!("{} · Deliveries", hook.name), crumbs),
        hook_name: hook.name,
        hook_href,
        action,
        rows,
        statuses,
        events,
        since,
        until,
        event_id,
        delivery_id,
        next_href,
        first_href,
        error,
    };
    Ok(html(status, pages::render(&page)))
}

fn delivery_id(raw: &str) -> Result<DeliveryId, Refusal> {
    DeliveryId::parse(raw)
        .ok_or_else(|| Refusal::not_found("delivery_not_found", format!("no delivery {raw:?}")))
}

fn delivery(ctx: &Ctx, account: &AccountId, base: &str, raw: &str) -> Result<Page, Refusal> {
    let acct = acc::get_account(ctx.state, account)?;
    let d = dlv::get_delivery(ctx.state, account, delivery_id(raw)?)?;
    let hook = wh::get_webhook(ctx.state, account, d.record.id.webhook).ok();
    let hook_href = format!("{base}/webhooks/{}", d.record.id.webhook);
    let hook_name = hook.map_or_else(|| d.record.id.webhook.to_string(), |h| h.name);
    let mut crumbs = ctx.account_crumbs(account, &acct.name);
    crumbs.push((hook_href.clone(), hook_name.clone()));
    crumbs.push((format!("{hook_href}/deliveries"), "Deliveries".into()));
    let (status_text, status_class) = delivery_status(d.record.status);
    let attempts = d
        .attempts
        .iter()
        .map(|a| AttemptView {
            number: a.number,
            at: when(a.at_ms),
            code: a
                .response_code
                .map_or_else(|| "none".into(), |c| c.to_string()),
            time: format!("{} ms", a.response_time_ms),
            headers: a.response_headers.clone(),
            body: a.response_body.clone(),
            error: a.error.clone(),
        })
        .collect();
    let page = DeliveryPage {
        c: ctx.chrome(&format!("Delivery {}", d.record.event), crumbs),
        id: d.record.id.to_string(),
        event: d.record.event.clone(),
        event_id: d.record.event_id.as_str().to_string(),
        hook_name,
        hook_href,
        status_text,
        status_class,
        created: when(d.record.id.created_ms()),
        next_attempt: d.record.next_attempt_ms.map(when),
        note: d.record.note.clone(),
        test: d.record.is_test,
        headers: d.request_headers,
        body: d.body.unwrap_or_default(),
        attempts,
        attempts_omitted: d.attempts_omitted,
        retry_action: format!("{base}/deliveries/{}/retry", d.record.id),
    };
    Ok(html(StatusCode::OK, pages::render(&page)))
}

async fn retry(ctx: &Ctx<'_>, account: &AccountId, base: &str, raw: &str) -> Result<Page, Refusal> {
    let id = delivery_id(raw)?;
    match dlv::retry_delivery(ctx.state, account, id).await {
        Ok(_) => ctx.notice("A new attempt was scheduled now."),
        // Refusals the customer can act on (webhook not active, retry rate limits).
        Err(e) if e.status.is_client_error() && e.status != StatusCode::NOT_FOUND => {
            ctx.notice(format!("Not retried: {}.", e.message))
        }
        Err(e) => return Err(e),
    }
    Ok(redirect(&format!("{base}/deliveries/{id}")))
}

/// A form page shown again with its errors is a 422, so that scripts and tests can tell a
/// refused submission from a fresh form.
fn form_status(refused: bool) -> StatusCode {
    if refused {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    }
}
