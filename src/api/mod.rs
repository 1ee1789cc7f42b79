//! The HTTP API of the contract: routing, authentication, request parsing and JSON views.
//!
//! A request enters from the edge's router ([`crate::edge::router`]) as a hyper request, through
//! [`ApiHandler`]; [`handle`] matches its method and path segments (a hand-written match, no
//! router crate) to one handler (`accounts`, `webhooks`, `events`, `deliveries`, `stats`),
//! authenticates the bearer token (admin token, or an account's API key that only reaches its
//! own account; [`Caller::resolve`]; wrong tokens are counted per client address by
//! [`guard`]), reads the body with the edge's bounded reader and parses it as strict JSON
//! (unknown fields are 400s), and calls the domain function of the route ([`crate::domain`]).
//! Each route is two halves: the handler here does HTTP only (bearer scope, path ids, query
//! and body parsing, the JSON view), the domain function holds every business rule (plan
//! limits, the HTTPS rule, pause semantics, the test send, retry) and is shared with the
//! dashboard, so no rule is written twice. Every
//! answer — including every error, a domain [`Refusal`] rendered by [`error_response`] — is
//! JSON; bad input is a 4xx, never a 500 or a dropped connection. [`ROUTES`] is the one list of
//! what is served; `docs/openapi.json` (served at `GET /v1/openapi.json`) documents each entry.

mod accounts;
pub mod admin;
mod deliveries;
mod events;
pub mod guard;
pub mod relay;
pub mod stats;
mod webhooks;

/// The request bodies the API parses, for tools outside the crate (the fuzz targets).
pub mod bodies {
    pub use super::accounts::{CreateAccount, UpdateAccount};
    pub use super::events::Batch;
    pub use super::webhooks::{CreateWebhook, TestRequest, UpdateWebhook};
}

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::de::DeserializeOwned;

use crate::domain::caller::Caller;
use crate::domain::{Refusal, Services};
use crate::edge::{self, client_ip, router};
use crate::signing;

/// What the API's handlers reach: the domain's services, and the API's own guard.
pub struct ApiState {
    pub services: Arc<Services>,
    /// Failed bearer authentications per client address.
    pub auth_guard: guard::AuthGuard,
}

/// The API as the edge sees it: a [`Handler`](edge::Handler) for the router.
#[derive(Clone)]
pub struct ApiHandler(pub Arc<ApiState>);

impl ApiHandler {
    pub fn new(services: Arc<Services>) -> Self {
        ApiHandler(Arc::new(ApiState {
            services,
            auth_guard: guard::AuthGuard::default(),
        }))
    }
}

impl edge::Handler for ApiHandler {
    type Body = ApiBody;

    async fn call(&self, req: Request<Incoming>) -> Response<ApiBody> {
        handle_streaming(self.0.clone(), req).await
    }
}

impl router::Frontend for ApiHandler {
    fn misdirected(&self) -> Response<ApiBody> {
        let refusal = Refusal::new(
            StatusCode::MISDIRECTED_REQUEST,
            "misdirected_request",
            router::MISDIRECTED,
        );
        error_response(&refusal).map(http_body_util::Either::Left)
    }
}

pub type ApiResult = Result<Response<Full<Bytes>>, Refusal>;

/// The API's response body: one buffer, or a stream (a backup, [`admin::backup`]).
pub type ApiBody = http_body_util::Either<Full<Bytes>, admin::Streamed>;

/// Who the bearer token names. A wrong token counts against the client address; an address
/// over its limit gets 429 for every token it has not used successfully before ([`guard`]).
fn authenticate<B>(state: &ApiState, req: &Request<B>) -> Result<Caller, Refusal> {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(Refusal::unauthorized)?;
    let found = Caller::resolve(&state.services, token).map(|caller| {
        let credential = match caller {
            Caller::Admin => guard::Credential::Admin,
            Caller::Account(_) => guard::Credential::Account(signing::hash_api_key(token)),
        };
        (caller, credential)
    });
    let credential = found.as_ref().map(|(_, c)| *c);
    match (state.auth_guard.verdict(client_ip(req), credential), found) {
        (guard::Verdict::Serve, Some((caller, _))) => Ok(caller),
        (guard::Verdict::Limited(wait), _) => Err(Refusal::too_many(
            "too_many_failed_authentications",
            format!("too many wrong bearer tokens from this address; try again in {wait} seconds"),
            wait,
        )),
        _ => Err(Refusal::unauthorized()),
    }
}

/// A request with its body still unread, and what the router learned about it.
pub struct Call {
    pub req: Request<hyper::body::Incoming>,
    pub caller: Caller,
}

impl Call {
    /// Reads the whole body (bounded, see [`edge::read_body`]) and parses it as strict JSON.
    pub async fn json<T: DeserializeOwned>(self, state: &Services) -> Result<T, Refusal> {
        let bytes = self.bytes(state).await?;
        parse_json::<T>(&bytes)
    }

    pub async fn bytes(self, state: &Services) -> Result<Bytes, Refusal> {
        Ok(edge::read_body(self.req, &state.config.server).await?)
    }

    pub fn query(&self) -> Vec<(String, String)> {
        self.req
            .uri()
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default()
    }
}

/// Strict JSON: unknown fields, wrong types and trailing data are 400s naming the problem.
pub fn parse_json<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, Refusal> {
    if bytes.is_empty() {
        return Err(Refusal::bad_request(
            "invalid_json",
            "the request needs a JSON body",
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        let code = match e.classify() {
            serde_json::error::Category::Data => "invalid_request",
            _ => "invalid_json",
        };
        Refusal::bad_request(code, format!("invalid request body: {e}"))
    })
}

pub fn json_response<T: serde::Serialize + ?Sized>(
    status: StatusCode,
    value: &T,
) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).expect("serialising a JSON view cannot fail");
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

pub fn empty_response(status: StatusCode) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::new()))
        .expect("static response parts are valid")
}

/// A refusal as the contract's JSON error: `{"error": {"code", "message"}}`, with its status and
/// any `Retry-After`.
pub fn error_response(e: &Refusal) -> Response<Full<Bytes>> {
    let mut builder = Response::builder()
        .status(e.status)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(secs) = e.retry_after {
        builder = builder.header(header::RETRY_AFTER, secs.to_string());
    }
    let body = serde_json::to_vec(&serde_json::json!({
        "error": { "code": e.code, "message": e.message }
    }))
    .expect("serialising a JSON value cannot fail");
    builder
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// Serves one request of the API listener: the streamed backup route, or [`handle`].
pub async fn handle_streaming(state: Arc<ApiState>, req: Request<Incoming>) -> Response<ApiBody> {
    if admin::is_backup_route(req.uri().path()) {
        return admin::backup(state, req).await;
    }
    handle(state, req).await.map(http_body_util::Either::Left)
}

/// Serves one request. Never fails: every error is rendered as the contract's JSON error.
pub async fn handle(state: Arc<ApiState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let (route, result) = route(&state, req).await;
    let response = match result {
        Ok(r) => r,
        Err(e) => {
            if e.status.is_server_error() && e.status != StatusCode::SERVICE_UNAVAILABLE {
                tracing::error!(route, code = e.code, message = %e.message, "request failed");
            }
            error_response(&e)
        }
    };
    let status = response.status().as_u16().to_string();
    metrics::counter!("kyberhook_api_requests_total", "route" => route, "status" => status)
        .increment(1);
    metrics::histogram!("kyberhook_api_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

async fn route(state: &ApiState, req: Request<Incoming>) -> (&'static str, ApiResult) {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    use Method as M;

    // Unauthenticated probes.
    match (&method, segs.as_slice()) {
        (&M::GET, ["healthz"]) => {
            return (
                "/healthz",
                Ok(json_response(
                    StatusCode::OK,
                    &serde_json::json!({"status": "ok"}),
                )),
            )
        }
        (&M::GET, ["readyz"]) => {
            // A store that cannot write is not ready, whatever else is (it is about to exit).
            let (status, text) = if state.services.store.health().is_err() {
                (StatusCode::SERVICE_UNAVAILABLE, "storage_failed")
            } else if state.services.scheduler.is_ready() {
                (StatusCode::OK, "ready")
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "recovering")
            };
            return (
                "/readyz",
                Ok(json_response(status, &serde_json::json!({"status": text}))),
            );
        }
        (_, [probe @ ("healthz" | "readyz")]) => {
            let label = if *probe == "healthz" {
                "/healthz"
            } else {
                "/readyz"
            };
            return (
                label,
                Err(Refusal::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!("{method} is not allowed on {path}"),
                )),
            );
        }
        _ => {}
    }

    let (label, method_served) = route_label(&method, &segs);
    if label == "unknown" {
        return (
            label,
            Err(Refusal::not_found(
                "not_found",
                format!("no route {method} {path}"),
            )),
        );
    }
    let caller = match authenticate(state, &req) {
        Ok(c) => c,
        Err(e) => return (label, Err(e)),
    };
    if !method_served {
        return (label, Err(method_not_allowed(&method, &path)));
    }
    let call = Call { req, caller };
    let s = &*state.services;
    // Dividing the work: an account's requests are served by the node that serves it.
    let call = match segs.as_slice() {
        ["v1", "accounts", a, ..] if s.placement.is_some() => {
            match relay::account_route(s, a, call).await {
                Ok(relayed) => return (label, relayed),
                Err(call) => call,
            }
        }
        _ => call,
    };
    let result = match (&method, segs.as_slice()) {
        (&M::GET, ["v1", "openapi.json"]) => Ok(openapi_response()),
        (&M::GET, ["v1", "event-types"]) => events::event_types(s),
        (&M::POST, ["v1", "events"]) => events::ingest_one(s, call).await,
        (&M::POST, ["v1", "events", "batch"]) => events::ingest_batch(s, call).await,

        (&M::POST, ["v1", "accounts"]) => accounts::create(s, call).await,
        (&M::GET, ["v1", "accounts", a]) => accounts::get(s, call, a),
        (&M::PATCH, ["v1", "accounts", a]) => accounts::update(s, call, a).await,
        (&M::DELETE, ["v1", "accounts", a]) => accounts::delete(s, call, a).await,
        (&M::POST, ["v1", "accounts", a, "api-key"]) => accounts::rotate_key(s, call, a).await,

        (&M::POST, ["v1", "accounts", a, "webhooks"]) => webhooks::create(s, call, a).await,
        (&M::GET, ["v1", "accounts", a, "webhooks"]) => webhooks::list(s, call, a),
        (&M::GET, ["v1", "accounts", a, "webhooks", w]) => webhooks::get(s, call, a, w),
        (&M::PATCH, ["v1", "accounts", a, "webhooks", w]) => webhooks::update(s, call, a, w).await,
        (&M::DELETE, ["v1", "accounts", a, "webhooks", w]) => webhooks::delete(s, call, a, w).await,
        (&M::GET, ["v1", "accounts", a, "webhooks", w, "secret"]) => {
            webhooks::secret(s, call, a, w)
        }
        (&M::POST, ["v1", "accounts", a, "webhooks", w, "secret", "rotate"]) => {
            webhooks::rotate_secret(s, call, a, w).await
        }
        (&M::POST, ["v1", "accounts", a, "webhooks", w, "recover"]) => {
            webhooks::recover(s, call, a, w).await
        }
        (&M::POST, ["v1", "accounts", a, "webhooks", w, "test"]) => {
            webhooks::test(s, call, a, w).await
        }
        (&M::GET, ["v1", "accounts", a, "webhooks", w, "deliveries"]) => {
            deliveries::list_for_webhook(s, call, a, w)
        }
        (&M::GET, ["v1", "accounts", a, "webhooks", w, "stats"]) => stats::webhook(s, call, a, w),
        (&M::GET, ["v1", "admin", "stats"]) => stats::admin(s, call).await,
        (&M::GET, ["v1", "admin", "cluster"]) => stats::cluster(s, call).await,
        (&M::GET, ["v1", "accounts", a, "deliveries"]) => deliveries::list(s, call, a),
        (&M::GET, ["v1", "accounts", a, "deliveries", d]) => deliveries::get(s, call, a, d),
        (&M::POST, ["v1", "accounts", a, "deliveries", d, "retry"]) => {
            deliveries::retry(s, call, a, d).await
        }
        // A ROUTES entry without an arm; tests/it/openapi.rs finds it.
        _ => Err(method_not_allowed(&method, &path)),
    };
    (label, result)
}

/// Every route the API serves, as (method, path pattern). The router refuses anything else
/// before dispatching (404 for an unknown path, 405 for a method the path does not serve),
/// metrics label requests by the pattern (bounded cardinality: never the raw path), and
/// `tests/it/openapi.rs` checks `docs/openapi.json` against this table both ways and probes
/// every entry on a real server. A new route needs a line here, an arm in `route`, and its
/// entry in `docs/openapi.json`. (`/healthz` and `/readyz` are answered before the table is
/// consulted; they are listed for the document.)
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/events"),
    ("POST", "/v1/events/batch"),
    ("GET", "/v1/event-types"),
    ("GET", "/v1/openapi.json"),
    ("POST", "/v1/accounts"),
    ("GET", "/v1/accounts/{account_id}"),
    ("PATCH", "/v1/accounts/{account_id}"),
    ("DELETE", "/v1/accounts/{account_id}"),
    ("POST", "/v1/accounts/{account_id}/api-key"),
    ("POST", "/v1/accounts/{account_id}/webhooks"),
    ("GET", "/v1/accounts/{account_id}/webhooks"),
    ("GET", "/v1/accounts/{account_id}/webhooks/{webhook_id}"),
    ("PATCH", "/v1/accounts/{account_id}/webhooks/{webhook_id}"),
    ("DELETE", "/v1/accounts/{account_id}/webhooks/{webhook_id}"),
    (
        "GET",
        "/v1/accounts/{account_id}/webhooks/{webhook_id}/secret",
    ),
    (
        "POST",
        "/v1/accounts/{account_id}/webhooks/{webhook_id}/secret/rotate",
    ),
    (
        "POST",
        "/v1/accounts/{account_id}/webhooks/{webhook_id}/test",
    ),
    (
        "POST",
        "/v1/accounts/{account_id}/webhooks/{webhook_id}/recover",
    ),
    (
        "GET",
        "/v1/accounts/{account_id}/webhooks/{webhook_id}/deliveries",
    ),
    (
        "GET",
        "/v1/accounts/{account_id}/webhooks/{webhook_id}/stats",
    ),
    ("GET", "/v1/accounts/{account_id}/deliveries"),
    ("GET", "/v1/accounts/{account_id}/deliveries/{delivery_id}"),
    (
        "POST",
        "/v1/accounts/{account_id}/deliveries/{delivery_id}/retry",
    ),
    // Streamed: matched by `handle_streaming` before the JSON router.
    ("POST", "/v1/admin/backup"),
    ("GET", "/v1/admin/stats"),
    ("GET", "/v1/admin/cluster"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
];

/// Whether `segs` (a path split at `/`, without the leading empty one) fits `pattern`; a
/// `{name}` segment of the pattern fits any one segment.
fn fits(pattern: &str, segs: &[&str]) -> bool {
    let mut want = pattern.split('/').skip(1);
    let mut have = segs.iter();
    loop {
        match (want.next(), have.next()) {
            (None, None) => return true,
            (Some(w), Some(h)) if w.starts_with('{') || w == *h => {}
            _ => return false,
        }
    }
}

/// The pattern of [`ROUTES`] the path fits ("unknown" if none), and whether `method` is
/// served on it.
fn route_label(method: &Method, segs: &[&str]) -> (&'static str, bool) {
    let mut label = "unknown";
    for (m, pattern) in ROUTES {
        if fits(pattern, segs) {
            if *m == method.as_str() {
                return (pattern, true);
            }
            label = pattern;
        }
    }
    (label, false)
}

fn method_not_allowed(method: &Method, path: &str) -> Refusal {
    Refusal::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {path}"),
    )
}

/// The API's OpenAPI 3.1 document, kept in the repository and compiled in.
pub const OPENAPI_JSON: &str = include_str!("../../docs/openapi.json");

fn openapi_response() -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(OPENAPI_JSON.as_bytes())))
        .expect("static response parts are valid")
}

pub fn list_response(
    data: Vec<serde_json::Value>,
    next_cursor: Option<String>,
) -> Response<Full<Bytes>> {
    json_response(
        StatusCode::OK,
        &serde_json::json!({ "data": data, "next_cursor": next_cursor }),
    )
}
