//! The dashboard's screens: for each signed-in route, read the form or query, call the
//! domain function `/v1` uses (`api::domain`), and answer a page or a redirect.
//!
//! Requests enter as [`Req`] (session checked, CSRF checked for POSTs); account screens live
//! under `/ui/a/{account}/…` and are scoped like the API (an account's session reaches only its
//! own account; the operator reaches all). Every POST that succeeds answers `303` to a page
//! (with a one-shot notice), except the two that show a secret once (a new account's API key,
//! a regenerated signing secret), which render it with `Cache-Control: no-store`.

use http::StatusCode;

use super::pages::{self, *};
use super::{api_error_page, assets, html, redirect, Page, Req};
use crate::api::domain::{self, accounts as acc, deliveries as dlv, webhooks as wh};
use crate::api::{ApiError, AppState, Caller};
use crate::ids::{AccountId, DeliveryId, WebhookId};
use crate::model::{event_family, rfc3339, DeliveryOrder, DeliveryStatus, Webhook, WebhookStatus};
use crate::signing;

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
    state: &'a AppState,
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
            notice: self.state.ui.sessions.take_notice(&self.req.session_id),
            crumbs,
        }
    }

    fn notice(&self, text: impl Into<String>) {
        self.state
            .ui
            .sessions
            .set_notice(&self.req.session_id, text);
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

pub async fn route(state: &AppState, req: Req) -> Page {
    let segs: Vec<String> = req.segs.clone();
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    let get = req.method == http::Method::GET;
    let ctx = Ctx { state, req: &req };
    let result: Result<Page, ApiError> = match (get, s.as_slice()) {
        (true, []) => Ok(match &req.session.caller {
            Caller::Admin => redirect("/ui/accounts"),
            Caller::Account(a) => redirect(&format!("/ui/a/{}/webhooks", urlencode(a.as_str()))),
        }),
        (false, ["logout"]) => Ok(super::logout(state, &req.session_id)),
        (true, ["accounts"]) => admin(&ctx).and_then(|_| accounts_page(&ctx, None, "", "", "")),
        (false, ["accounts"]) => match admin(&ctx) {
            Ok(()) => create_account(&ctx).await,
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
        Err(e) => api_error_page(&e),
    }
}

fn admin(ctx: &Ctx) -> Result<(), ApiError> {
    ctx.req
        .session
        .caller
        .require_admin()
        .map_err(|_| ApiError::not_found("not_found", "no such page"))
}

// ---- operator screens -----------------------------------------------------------------

fn accounts_page(
    ctx: &Ctx,
    error: Option<String>,
    name: &str,
    id: &str,
    plan: &str,
) -> Result<Page, ApiError> {
    let rows = acc::list_accounts(ctx.state)?
        .into_iter()
        .map(|a| AccountRow {
            open_href: format!("/ui/a/{}/webhooks", urlencode(a.id.as_str())),
            delete_href: format!("/ui/accounts/{}/delete", urlencode(a.id.as_str())),
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

async fn create_account(ctx: &Ctx<'_>) -> Result<Page, ApiError> {
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

fn confirm_delete_account(ctx: &Ctx, raw: &str) -> Result<Page, ApiError> {
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
        action: format!("/ui/accounts/{}/delete", urlencode(id.as_str())),
        button: "Delete Account".into(),
        cancel_href: "/ui/accounts".into(),
    };
    Ok(html(StatusCode::OK, pages::render(&page)))
}

async fn delete_account(ctx: &Ctx<'_>, raw: &str) -> Result<Page, ApiError> {
    let id = ctx.req.session.caller.scope(ctx.state, raw)?;
    let account = acc::get_account(ctx.state, &id)?;
    acc::delete_account(ctx.state, &id).await?;
    ctx.notice(format!("The account {} was deleted.", account.name));
    Ok(redirect("/ui/accounts"))
}

// ---- account screens ------------------------------------------------------------------

async fn account_screen(
    ctx: &Ctx<'_>,
    account: &AccountId,
    get: bool,
    rest: &[&str],
) -> Result<Page, ApiError> {
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

fn toggle_of(h: &Webhook) -> (bool, &'static str, &'static str, bool) {
    match h.status {
        WebhookStatus::Active => (false, "Pause", "paused", true),
        WebhookStatus::Paused => (true, "Resume", "active", true),
        // A disabled webhook is re-enabled from its page ("Resume" sets it active).
        WebhookStatus::Disabled => (true, "Resume", "active", true),
    }
}

fn webhooks_home(ctx: &Ctx, account: &AccountId, base: &str) -> Result<Page, ApiError> {
    let acct = acc::get_account(ctx.state, account)?;
    let mut hooks = ctx.state.store.webhooks_of(account)?;
    hooks.sort_by_key(|h| (h.created_ms, h.id));
    let rows = hooks
        .iter()
        .map(|h| {
            let (status_text, status_class) = status_view(h);
            let (paused, toggle_label, toggle_to, can_toggle) = toggle_of(h);
            let href = format!("{base}/webhooks/{}", h.id);
            WebhookRow {
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

fn step1(ctx: &Ctx, account: &AccountId, base: &str, v: Step1Values) -> Result<Page, ApiError> {
    step1_page(ctx, account, base, v, FieldErrors::default())
}

fn step1_page(
    ctx: &Ctx,
    account: &AccountId,
    base: &str,
    v: Step1Values,
    errors: FieldErrors,
) -> Result<Page, ApiError> {
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

fn step1_submit(ctx: &Ctx, account: &AccountId, base: &str) -> Result<Page, ApiError> {
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
) -> Result<Page, ApiError> {
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

fn step2_submit(ctx: &Ctx, account: &AccountId, base: &str) -> Result<Page, ApiError> {
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
) -> Result<Page, ApiError> {
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

async fn step3_submit(ctx: &Ctx<'_>, account: &AccountId, base: &str) -> Result<Page, ApiError> {
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
        signature_scheme: None,
        ordering: ctx.req.field("ordering").map(str::to_string),
        max_concurrency: None,
        secret: Some(secret.clone()),
    };
    match wh::create_webhook(ctx.state, account, body).await {
        Ok(hook) => {
            ctx.notice(format!("The webhook {} was created.", hook.name));
            Ok(redirect(&format!("{base}/webhooks/{}", hook.id)))
        }
        Err(e) if e.status.is_client_error() => {
            let secret = if signing::is_minted_secret(&secret) {
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

fn hook_view(base: &str, h: &Webhook) -> HookView {
    let (status_text, status_class) = status_view(h);
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
        created: when(h.created_ms),
        updated: when(h.updated_ms),
        href: format!("{base}/webhooks/{}", h.id),
    }
}

fn webhook_page(
    ctx: &Ctx,
    account: &AccountId,
    base: &str,
    id: WebhookId,
) -> Result<Page, ApiError> {
    let acct = acc::get_account(ctx.state, account)?;
    let hook = wh::get_webhook(ctx.state, account, id)?;
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
        hook: hook_view(base, &hook),
        paused,
        toggle_label,
        toggle_to,
        can_toggle,
        event_types,
        test,
    };
    Ok(html(StatusCode::OK, pages::render(&page)))
}

fn edit_page(ctx: &Ctx, account: &AccountId, base: &str, id: WebhookId) -> Result<Page, ApiError> {
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
) -> Result<Page, ApiError> {
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
) -> Result<Page, ApiError> {
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

/// Where a form asked to go back to: only a path inside this account's screens.
fn back_to(ctx: &Ctx, base: &str, fallback: String) -> String {
    match ctx.req.field("back") {
        Some(b) if b.starts_with(&format!("{base}/")) && !b.contains("//") => b.to_string(),
        _ => fallback,
    }
}

async fn toggle(
    ctx: &Ctx<'_>,
    account: &AccountId,
    base: &str,
    id: WebhookId,
) -> Result<Page, ApiError> {
    let to = ctx.req.field("status").unwrap_or("").to_string();
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
    Ok(redirect(&back_to(ctx, base, format!("{base}/webhooks"))))
}

fn confirm_delete(
    ctx: &Ctx,
    account: &AccountId,
    base: &str,
    id: WebhookId,
) -> Result<Page, ApiError> {
    let acct = acc::get_account(ctx.state, account)?;
    let hook = wh::get_webhook(ctx.state, account, id)?;
    let page = ConfirmPage {
        c: ctx.chrome("Delete webhook", ctx.account_crumbs(account, &acct.name)),
        heading: format!("Delete the webhook {}?", hook.name),
        message: "All delivery history for this webhook is also deleted. This cannot be undone."
            .into(),
        detail: Some(format!("Endpoint URL: {}", hook.url)),
        grace: false,
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
) -> Result<Page, ApiError> {
    let hook = wh::get_webhook(ctx.state, account, id)?;
    wh::delete_webhook(ctx.state, account, id).await?;
    ctx.notice(format!(
        "The webhook {} and its delivery history were deleted.",
        hook.name
    ));
    Ok(redirect(&format!("{base}/webhooks")))
}

fn show_secret(
    ctx: &Ctx,
    account: &AccountId,
    base: &str,
    id: WebhookId,
) -> Result<Page, ApiError> {
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
) -> Result<Page, ApiError> {
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
) -> Result<Page, ApiError> {
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
) -> Result<Page, ApiError> {
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
                    "status" | "event" | "since" | "until" | "cursor"
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

fn deliveries(ctx: &Ctx, account: &AccountId, base: &str, id: WebhookId) -> Result<Page, ApiError> {
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
    let (status_f, event_f, since, until) = (
        value("status"),
        value("event"),
        value("since"),
        value("until"),
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
        next_href,
        first_href,
        error,
    };
    Ok(html(status, pages::render(&page)))
}

fn delivery_id(raw: &str) -> Result<DeliveryId, ApiError> {
    DeliveryId::parse(raw)
        .ok_or_else(|| ApiError::not_found("delivery_not_found", format!("no delivery {raw:?}")))
}

fn delivery(ctx: &Ctx, account: &AccountId, base: &str, raw: &str) -> Result<Page, ApiError> {
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

async fn retry(
    ctx: &Ctx<'_>,
    account: &AccountId,
    base: &str,
    raw: &str,
) -> Result<Page, ApiError> {
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
