//! The dashboard's pages: askama templates (`templates/*.html`, compiled into the binary)
//! and the plain view structs they read. Every value is escaped by askama's HTML escaper;
//! nothing here is marked safe. Data enters as views built by `screens`; it leaves as HTML.

use askama::Template;
use http::StatusCode;

use super::assets;
use super::charts::{LineChart, Sparkline, StackedChart};

/// What every page's frame shows.
pub struct Chrome {
    pub title: String,
    pub css: String,
    pub js: String,
    pub csrf: String,
    /// Who is signed in ("" on the sign-in and error pages).
    pub who: String,
    pub is_admin: bool,
    pub notice: Option<String>,
    /// Links above the heading: (href, label).
    pub crumbs: Vec<(String, String)>,
}

impl Chrome {
    pub fn bare(title: &str) -> Chrome {
        Chrome {
            title: title.to_string(),
            css: assets::css_path(),
            js: assets::js_path(),
            csrf: String::new(),
            who: String::new(),
            is_admin: false,
            notice: None,
            crumbs: Vec::new(),
        }
    }
}

/// Renders a template; a template error (which would be a bug) becomes a plain message.
pub fn render<T: Template>(t: &T) -> String {
    t.render().unwrap_or_else(|e| {
        tracing::error!(error = %e, "a dashboard template failed to render");
        "<!doctype html><title>Error</title><p>This page could not be shown.</p>".to_string()
    })
}

#[derive(Template)]
#[template(path = "login.html")]
pub struct LoginPage<'a> {
    pub c: Chrome,
    pub error: Option<&'a str>,
}

pub fn login(error: Option<&str>) -> String {
    render(&LoginPage {
        c: Chrome::bare("Sign in"),
        error,
    })
}

#[derive(Template)]
#[template(path = "error.html")]
pub struct ErrorPage<'a> {
    pub c: Chrome,
    pub status: u16,
    pub reason: &'a str,
    pub message: &'a str,
}

pub fn error(status: StatusCode, message: &str) -> String {
    let reason = status.canonical_reason().unwrap_or("Error");
    render(&ErrorPage {
        c: Chrome::bare(reason),
        status: status.as_u16(),
        reason,
        message,
    })
}

/// An option of a `<select>`.
pub struct Opt {
    pub value: String,
    pub label: String,
    pub selected: bool,
}

// ---- operator -------------------------------------------------------------------------

pub struct AccountRow {
    pub name: String,
    pub id: String,
    pub plan: String,
    pub created: String,
    pub open_href: String,
    pub delete_href: String,
    pub manage_href: String,
}

#[derive(Template)]
#[template(path = "accounts.html")]
pub struct AccountsPage {
    pub c: Chrome,
    pub rows: Vec<AccountRow>,
    pub plans: Vec<Opt>,
    pub form_name: String,
    pub form_id: String,
    pub error: Option<String>,
}

/// A figure of the operator overview: label, value, and an element id for tests.
pub struct Figure {
    pub id: &'static str,
    pub label: &'static str,
    pub value: String,
}

pub struct MinuteRow {
    pub start: String,
    pub events: u64,
    pub delivered: u64,
    pub failed: u64,
    pub lag_ms: u64,
    pub waiting: u64,
}

pub struct BacklogRow {
    pub name: String,
    pub id: String,
    pub href: String,
    pub plan: String,
    pub waiting: u64,
    pub over: bool,
}

#[derive(Template)]
#[template(path = "overview.html")]
pub struct OverviewPage {
    pub c: Chrome,
    pub figures: Vec<Figure>,
    pub webhooks: Vec<Figure>,
    pub rates: LineChart,
    pub lag: LineChart,
    pub waiting: LineChart,
    pub minutes: Vec<MinuteRow>,
    pub top: Vec<BacklogRow>,
    pub over: Vec<BacklogRow>,
    pub quota: u64,
}

#[derive(Template)]
#[template(path = "account.html")]
pub struct AccountPage {
    pub c: Chrome,
    pub name: String,
    pub id: String,
    pub plan: String,
    pub created: String,
    pub webhooks: usize,
    pub waiting: u64,
    pub plans: Vec<Opt>,
    pub plan_action: String,
    pub rotate_href: String,
    pub open_href: String,
}

#[derive(Template)]
#[template(path = "api_key.html")]
pub struct ApiKeyPage {
    pub c: Chrome,
    pub name: String,
    pub api_key: String,
    pub back_href: String,
}

#[derive(Template)]
#[template(path = "account_created.html")]
pub struct AccountCreatedPage {
    pub c: Chrome,
    pub name: String,
    pub id: String,
    pub plan: String,
    pub api_key: String,
    pub open_href: String,
}

// ---- shared ---------------------------------------------------------------------------

#[derive(Template)]
#[template(path = "confirm.html")]
pub struct ConfirmPage {
    pub c: Chrome,
    pub heading: String,
    pub message: String,
    pub detail: Option<String>,
    /// Offer the rotation grace period (Regenerate Secret).
    pub grace: bool,
    /// Hidden form fields the confirmed POST carries.
    pub hidden: Vec<(String, String)>,
    pub action: String,
    pub button: String,
    pub cancel_href: String,
}

#[derive(Template)]
#[template(path = "secret.html")]
pub struct SecretPage {
    pub c: Chrome,
    pub heading: String,
    pub note: String,
    pub secret: String,
    pub back_href: String,
}

// ---- webhooks -------------------------------------------------------------------------

pub struct WebhookRow {
    pub name: String,
    pub url: String,
    pub events: String,
    pub status_text: String,
    pub status_class: &'static str,
    pub href: String,
    pub edit_href: String,
    pub delete_href: String,
    pub status_action: String,
    /// The toggle: pressed while paused.
    pub paused: bool,
    pub toggle_label: &'static str,
    pub toggle_to: &'static str,
    pub can_toggle: bool,
    /// Attempts that succeeded in the last 24 hours ("—" without attempts).
    pub rate: String,
    pub spark: Sparkline,
    /// A failing or lagging webhook's mark: (class, short text, explanation).
    pub flag: Option<(&'static str, &'static str, String)>,
}

pub struct PlanView {
    pub name: String,
    pub used: usize,
    pub allowed: String,
    pub events_per_second: String,
}

#[derive(Template)]
#[template(path = "webhooks.html")]
pub struct WebhooksPage {
    pub c: Chrome,
    pub account_name: String,
    pub base: String,
    pub rows: Vec<WebhookRow>,
    pub plan: PlanView,
    pub at_limit: bool,
}

#[derive(Default)]
pub struct FieldErrors {
    pub name: Option<String>,
    pub url: Option<String>,
    pub description: Option<String>,
}

impl FieldErrors {
    pub fn any(&self) -> bool {
        self.name.is_some() || self.url.is_some() || self.description.is_some()
    }
}

#[derive(Template)]
#[template(path = "new_step1.html")]
pub struct Step1Page {
    pub c: Chrome,
    pub base: String,
    pub name: String,
    pub url: String,
    pub description: String,
    pub errors: FieldErrors,
    pub require_https: bool,
}

pub struct EventBox {
    pub value: String,
    pub label: String,
    pub hint: String,
    pub checked: bool,
    pub dom_id: String,
}

pub struct EventGroup {
    pub legend: String,
    pub dom_id: String,
    /// The "All …" boxes (`family.*`), one per family in the group.
    pub families: Vec<EventBox>,
    pub events: Vec<EventBox>,
}

#[derive(Template)]
#[template(path = "new_step2.html")]
pub struct Step2Page {
    pub c: Chrome,
    pub base: String,
    pub name: String,
    pub url: String,
    pub description: String,
    pub everything: bool,
    pub groups: Vec<EventGroup>,
    pub error: Option<String>,
}

#[derive(Template)]
#[template(path = "new_step3.html")]
pub struct Step3Page {
    pub c: Chrome,
    pub base: String,
    pub name: String,
    pub url: String,
    pub description: String,
    pub events: Vec<String>,
    pub secret: String,
    pub ip_allowlist: String,
    /// Whether the ordering select shows "fifo".
    pub fifo: bool,
    /// Whether the signature scheme select shows Standard Webhooks.
    pub standard: bool,
    /// The "Max Concurrent Requests" field as submitted (empty: no cap).
    pub max_concurrency: String,
    pub error: Option<String>,
}

pub struct HookView {
    pub id: String,
    pub name: String,
    pub url: String,
    pub description: String,
    pub events: Vec<String>,
    pub ip_allowlist: Vec<String>,
    pub status_text: String,
    pub status_class: &'static str,
    pub failures: u32,
    /// How deliveries are ordered, in words.
    pub ordering: &'static str,
    /// How requests are signed, in words.
    pub scheme: &'static str,
    /// The adaptive limit now, and the customer's cap, in words.
    pub concurrency: String,
    /// What waits behind the limit, in words (empty: nothing).
    pub backlog: String,
    pub created: String,
    pub updated: String,
    pub href: String,
}

pub struct TestView {
    pub event: String,
    pub ok: bool,
    pub code: String,
    pub time: String,
    pub body: String,
    pub error: Option<String>,
    pub delivery_href: String,
}

/// One bucket of the health table (the chart's numbers, for screen readers and copying).
pub struct HealthRow {
    pub start: String,
    pub delivered: u64,
    pub retrying: u64,
    pub failed: u64,
    pub p50: String,
    pub p95: String,
}

/// The webhook's delivery health over a window.
pub struct HealthView {
    /// "last 24 hours" or "last 7 days".
    pub window_label: &'static str,
    pub is_week: bool,
    pub day_href: String,
    pub week_href: String,
    /// One sentence: healthy, or since when not.
    pub verdict: String,
    pub verdict_class: &'static str,
    pub outcomes: StackedChart,
    pub latency: LineChart,
    pub rows: Vec<HealthRow>,
    pub delivered: u64,
    pub retrying: u64,
    pub failed: u64,
}

#[derive(Template)]
#[template(path = "webhook.html")]
pub struct WebhookPage {
    pub c: Chrome,
    pub hook: HookView,
    pub health: HealthView,
    pub paused: bool,
    pub toggle_label: &'static str,
    pub toggle_to: &'static str,
    pub can_toggle: bool,
    pub event_types: Vec<Opt>,
    pub test: Option<TestView>,
}

#[derive(Template)]
#[template(path = "webhook_edit.html")]
pub struct EditPage {
    pub c: Chrome,
    pub hook_href: String,
    pub name: String,
    pub url: String,
    pub description: String,
    pub everything: bool,
    pub groups: Vec<EventGroup>,
    pub ip_allowlist: String,
    /// Whether the ordering select shows "fifo".
    pub fifo: bool,
    /// Whether the signature scheme select shows Standard Webhooks.
    pub standard: bool,
    /// The "Max Concurrent Requests" field (empty: no cap).
    pub max_concurrency: String,
    pub errors: FieldErrors,
    pub error: Option<String>,
}

// ---- deliveries -----------------------------------------------------------------------

pub struct DeliveryRow {
    pub href: String,
    pub event: String,
    pub timestamp: String,
    pub code: String,
    pub time: String,
    pub status_text: &'static str,
    pub status_class: &'static str,
    pub test: bool,
}

#[derive(Template)]
#[template(path = "deliveries.html")]
pub struct DeliveriesPage {
    pub c: Chrome,
    pub hook_name: String,
    pub hook_href: String,
    pub action: String,
    pub rows: Vec<DeliveryRow>,
    pub statuses: Vec<Opt>,
    pub events: Vec<Opt>,
    pub since: String,
    pub until: String,
    pub event_id: String,
    pub delivery_id: String,
    pub next_href: Option<String>,
    pub first_href: Option<String>,
    pub error: Option<String>,
}

pub struct AttemptView {
    pub number: u32,
    pub at: String,
    pub code: String,
    pub time: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub error: Option<String>,
}

#[derive(Template)]
#[template(path = "delivery.html")]
pub struct DeliveryPage {
    pub c: Chrome,
    pub id: String,
    pub event: String,
    pub event_id: String,
    pub hook_name: String,
    pub hook_href: String,
    pub status_text: &'static str,
    pub status_class: &'static str,
    pub created: String,
    pub next_attempt: Option<String>,
    pub note: Option<String>,
    pub test: bool,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub attempts: Vec<AttemptView>,
    /// Attempts made but no longer stored (only the first and the latest are kept).
    pub attempts_omitted: u32,
    pub retry_action: String,
}
