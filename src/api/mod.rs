//! The HTTP API of the contract: routing, authentication, request parsing and JSON views.
//!
//! A request enters from `server` as a hyper request; [`handle`] matches its method and path
//! to one handler (`accounts`, `webhooks`, `events`, `deliveries`), authenticates the bearer
//! token (admin token, or an account's API key that only reaches its own account), reads and
//! strictly parses the JSON body within `server.max_body_bytes`, and calls the domain function
//! of the route ([`crate::domain`]: every business rule, shared with the dashboard). Every answer — including every error, as [`ApiError`] — is
//! JSON; bad input is a 4xx, never a 500 or a dropped connection. [`ROUTES`] is the one list of
//! what is served; `docs/openapi.json` (served at `GET /v1/openapi.json`) documents each entry.

mod accounts;
pub mod admin;
mod deliveries;
pub mod error;
mod events;
pub mod guard;
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
use http_body_util::{BodyExt, Full, Limited};
use serde::de::DeserializeOwned;

pub use crate::domain::caller::{is_admin_token, Caller};
pub use error::ApiError;

use crate::config::Config;
use crate::dispatch::Deliverer;
use crate::ingest::Ingest;
use crate::registry::Registry;
use crate::scheduler::SchedulerHandle;
use crate::signing;
use crate::store::Store;

/// What every handler can reach.
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Arc<Store>,
    pub registry: Arc<Registry>,
    pub ingest: Ingest,
    pub deliverer: Arc<Deliverer>,
    pub scheduler: SchedulerHandle,
    /// Rate limits of `POST …/deliveries/{id}/retry`.
    pub manual_retries: crate::manual_retry::ManualRetryLimits,
    /// The dashboard's sessions and sign-in limiter.
    pub ui: crate::ui::UiState,
    /// Failed bearer authentications per client address.
    pub auth_guard: guard::AuthGuard,
}

pub type ApiResult = Result<Response<Full<Bytes>>, ApiError>;

/// The API's response body: one buffer, or a stream (a backup, [`admin::backup`]).
pub type ApiBody = http_body_util::Either<Full<Bytes>, admin::Streamed>;

/// The client address of a request (set by `server`; loopback for requests built in tests).
pub fn client_ip<B>(req: &Request<B>) -> std::net::IpAddr {
    req.extensions()
        .get::<crate::server::ClientAddr>()
        .map_or(std::net::IpAddr::from([127, 0, 0, 1]), |a| a.0.ip())
}

/// Who the bearer token names. A wrong token counts against the client address; an address
/// over its limit gets 429 for every token it has not used successfully before ([`guard`]).
fn authenticate<B>(state: &AppState, req: &Request<B>) -> Result<Caller, ApiError> {
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
        .ok_or_else(ApiError::unauthorized)?;
    let found = Caller::resolve(state, token).map(|caller| {
        let credential = match caller {
            Caller::Admin => guard::Credential::Admin,
            Caller::Account(_) => guard::Credential::Account(signing::hash_api_key(token)),
        };
        (caller, credential)
    });
    let credential = found.as_ref().map(|(_, c)| *c);
    match (state.auth_guard.verdict(client_ip(req), credential), found) {
        (guard::Verdict::Serve, Some((caller, _))) => Ok(caller),
        (guard::Verdict::Limited(wait), _) => Err(ApiError::too_many(
            "too_many_failed_authentications",
            format!("too many wrong bearer tokens from this address; try again in {wait} seconds"),
            wait,
        )),
        _ => Err(ApiError::unauthorized()),
    }
}

/// 421 for a request whose `Host` is not ours (DNS rebinding, see `server::hosts`), before
/// anything else looks at it: JSON on the API, a page on the dashboard.
fn misdirected<B>(state: &AppState, req: &Request<B>) -> Option<Response<Full<Bytes>>> {
    let local = req
        .extensions()
        .get::<crate::server::LocalAddr>()
        .map(|a| a.0.ip());
    let server = &state.config.server;
    let hosts = crate::server::hosts::HostAllowlist::new(server.listen, &server.public_hosts);
    if hosts.admits(req, local) {
        return None;
    }
    let error = ApiError::new(
        StatusCode::MISDIRECTED_REQUEST,
        "misdirected_request",
        "this server does not answer to that Host; use its address, localhost, or a name in \
         server.public_hosts",
    );
    let path = req.uri().path();
    Some(if path == "/ui" || path.starts_with("/ui/") {
        crate::ui::api_error_page(&error)
    } else {
        error_response(&error)
    })
}

/// A request with its body still unread, and what the router learned about it.
pub struct Call {
    pub req: Request<hyper::body::Incoming>,
    pub caller: Caller,
}

impl Call {
    /// Reads the whole body (bounded) and parses it as strict JSON.
    pub async fn json<T: DeserializeOwned>(self, state: &AppState) -> Result<T, ApiError> {
        let bytes = self.bytes(state).await?;
        parse_json::<T>(&bytes)
    }

    pub async fn bytes(self, state: &AppState) -> Result<Bytes, ApiError> {
        let limit = state.config.server.max_body_bytes;
        let too_large = || {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("request bodies are limited to {limit} bytes (server.max_body_bytes)"),
            )
        };
        if let Some(len) = self
            .req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            if len > limit as u64 {
                return Err(too_large());
            }
        }
        // One deadline for the whole body, not per read: a client trickling a byte now and
        // then would otherwise hold its connection and buffer indefinitely. Dropping the read
        // frees what was buffered; the connection then closes (see `server`).
        let deadline = state.config.server.body_read_timeout;
        let read = Limited::new(self.req.into_body(), limit).collect();
        let Ok(read) = tokio::time::timeout(deadline, read).await else {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within {} ms (server.body_read_timeout)",
                    deadline.as_millis()
                ),
            ));
        };
        match read {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(e)
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                Err(too_large())
            }
            Err(e) => Err(ApiError::bad_request(
                "invalid_body",
                format!("could not read the request body: {e}"),
            )),
        }
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
pub fn parse_json<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_json",
            "the request needs a JSON body",
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        let code = match e.classify() {
            serde_json::error::Category::Data => "invalid_request",
            _ => "invalid_json",
        };
        ApiError::bad_request(code, format!("invalid request body: {e}"))
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

pub fn error_response(e: &ApiError) -> Response<Full<Bytes>> {
    let mut builder = Response::builder()
        .status(e.status)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(secs) = e.retry_after {
        builder = builder.header(header::RETRY_AFTER, secs.to_string());
    }
    builder
        .body(Full::new(Bytes::from(e.body())))
        .expect("static response parts are valid")
}

/// Serves one request of the API listener: the streamed backup route, or [`handle`].
pub async fn handle_streaming(
    state: Arc<AppState>,
    req: Request<hyper::body::Incoming>,
) -> Response<ApiBody> {
    if let Some(refused) = misdirected(&state, &req) {
        metrics::counter!("kyberhook_api_requests_total", "route" => "misdirected", "status" => "421")
            .increment(1);
        return refused.map(http_body_util::Either::Left);
    }
    if admin::is_backup_route(req.uri().path()) {
        return admin::backup(state, req).await;
    }
    handle(state, req).await.map(http_body_util::Either::Left)
}

/// Serves one request. Never fails: every error is rendered as the contract's JSON error.
pub async fn handle(
    state: Arc<AppState>,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
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

async fn route(
    state: &Arc<AppState>,
    req: Request<hyper::body::Incoming>,
) -> (&'static str, ApiResult) {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    use Method as M;

    // The dashboard: its own sign-in, sessions and HTML answers; `/v1` never sees its cookie.
    if path == "/ui" || path.starts_with("/ui/") {
        return ("/ui", Ok(crate::ui::handle(state, req).await));
    }
    if path == "/" && method == M::GET {
        return ("/", Ok(crate::ui::redirect("/ui/")));
    }

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
            let (status, text) = if state.store.health().is_err() {
                (StatusCode::SERVICE_UNAVAILABLE, "storage_failed")
            } else if state.scheduler.is_ready() {
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
                Err(ApiError::new(
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
            Err(ApiError::not_found(
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
    let s = state.as_ref();
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
        (&M::GET, ["v1", "accounts", a, "deliveries"]) => deliveries::list(s, call, a),
        (&M::GET, ["v1", "accounts", a, "deliveries", d]) => deliveries::get(s, call, a, d),
        (&M::POST, ["v1", "accounts", a, "deliveries", d, "retry"]) => {
            deliveries::retry(s, call, a, d).await
        }
        // A ROUTES entry without an arm; tests/openapi.rs finds it.
        _ => Err(method_not_allowed(&method, &path)),
    };
    (label, result)
}

/// Every route the API serves, as (method, path pattern). The router refuses anything else
/// before dispatching (404 for an unknown path, 405 for a method the path does not serve),
/// metrics label requests by the pattern (bounded cardinality: never the raw path), and
/// `tests/openapi.rs` checks `docs/openapi.json` against this table both ways and probes
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

fn method_not_allowed(method: &Method, path: &str) -> ApiError {
    ApiError::new(
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

/// `limit` and `cursor` of a list route.
pub struct Paging {
    pub limit: usize,
    pub cursor: Option<String>,
}

/// Parses the list query parameters; anything not in `allowed` (besides limit and cursor) is
/// refused, so a typo in a filter is a 400 rather than an unfiltered list.
pub fn paging(params: &[(String, String)], allowed: &[&str]) -> Result<Paging, ApiError> {
    let mut paging = Paging {
        limit: 50,
        cursor: None,
    };
    let mut seen: Vec<&str> = Vec::new();
    for (k, v) in params {
        if seen.contains(&k.as_str()) {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("query parameter {k:?} is given twice"),
            ));
        }
        seen.push(k);
        match k.as_str() {
            "limit" => {
                paging.limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "invalid_query",
                            "limit must be a whole number from 1 to 1000",
                        )
                    })?
            }
            "cursor" => paging.cursor = Some(v.clone()),
            other if allowed.contains(&other) => {}
            other => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("unknown query parameter {other:?}"),
                ))
            }
        }
    }
    Ok(paging)
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
