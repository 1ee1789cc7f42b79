//! The dashboard: the guide's Settings → Webhooks screens, served under `/ui/` on the API
//! listener as server-rendered HTML.
//!
//! A request enters from the edge's router ([`crate::edge::router`]), through [`UiHandler`],
//! when its path starts with `/ui` (or is `GET /`, which redirects here). This module owns the
//! web plumbing — routing, sign-in and its per-address limit, the session cookie, CSRF (a
//! per-session token in every form plus refusing cross-site `Origin` / `Sec-Fetch-Site`), form
//! bodies, and the security headers every answer carries — and hands each screen to
//! [`screens`], which calls the same domain functions as `/v1` ([`crate::domain`]; a refused
//! call becomes an error page, [`refusal_page`]) and renders
//! the askama templates of [`pages`] (compiled into the binary, escaping everything). Static
//! CSS/JS of our own are compiled in too ([`assets`]). Nothing changes state on a GET.
//!
//! The router hands `/ui…` here before any bearer check, so the two front ends share a port
//! but not their authentication (`/v1` never reads the cookie). Sign-in takes the admin token
//! or an account's API key, behind a per-address governor limit checked before the key is
//! looked at. Every POST is checked in two steps: a cross-site `Origin` / `Sec-Fetch-Site` is
//! refused first, then the form's `_csrf` is compared with the session's token in constant
//! time. Form bodies are bounded.

mod assets;
mod charts;
mod pages;
mod screens;
pub mod session;

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::config::Config;
use crate::domain::caller::Caller;
use crate::domain::{Refusal, Services};
use crate::edge::{self, client_ip, router};
use crate::signing;
pub use session::Sessions;

/// The session cookie's name.
pub const COOKIE: &str = "kh_session";

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The dashboard's state: the domain's services, sessions and the sign-in limiter.
pub struct UiState {
    pub services: Arc<Services>,
    pub sessions: Sessions,
    /// Sign-in attempts per client address (every attempt counts, so a guesser is slowed
    /// whether or not it is told which attempts failed).
    login_limiter: DefaultKeyedRateLimiter<IpAddr>,
}

impl UiState {
    /// The dashboard's state; sessions are kept in (and reloaded from) the services' store.
    pub fn new(services: Arc<Services>) -> Self {
        let config = &services.config;
        let per_minute =
            NonZeroU32::new(config.ui.login_attempts_per_minute.max(1)).unwrap_or(NonZeroU32::MIN);
        UiState {
            sessions: Sessions::persistent(&config.ui, services.store.clone()),
            login_limiter: RateLimiter::keyed(Quota::per_minute(per_minute)),
            services,
        }
    }
}

/// The dashboard as the edge sees it: a [`Handler`](edge::Handler) for the router.
#[derive(Clone)]
pub struct UiHandler(pub Arc<UiState>);

impl UiHandler {
    pub fn new(services: Arc<Services>) -> Self {
        UiHandler(Arc::new(UiState::new(services)))
    }
}

impl edge::Handler for UiHandler {
    type Body = Full<Bytes>;

    async fn call(&self, req: Request<Incoming>) -> Page {
        let started = Instant::now();
        // The API's request metrics count the dashboard too (one listener): by prefix only, so
        // the label's cardinality stays bounded.
        let route = if req.uri().path() == "/" { "/" } else { "/ui" };
        let response = handle(&self.0, req).await;
        let status = response.status().as_u16().to_string();
        metrics::counter!("kyberhook_api_requests_total", "route" => route, "status" => status)
            .increment(1);
        metrics::histogram!("kyberhook_api_request_duration_seconds", "route" => route)
            .record(started.elapsed().as_secs_f64());
        response
    }
}

impl router::Frontend for UiHandler {
    fn misdirected(&self) -> Page {
        error_page(StatusCode::MISDIRECTED_REQUEST, router::MISDIRECTED)
    }
}

pub type Page = Response<Full<Bytes>>;

/// Adds the headers every dashboard answer carries.
fn secured(mut r: Page, no_store: bool) -> Page {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if no_store {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

/// An HTML page. Pages are never cached: any of them may show a secret or tenant data.
pub fn html(status: StatusCode, body: String) -> Page {
    let r = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid");
    secured(r, true)
}

/// `303 See Other`: the answer to every successful form POST (and to a GET needing sign-in).
/// A location that is not a local path (see [`local_path`]) is a 400, never a panic.
pub fn redirect(location: &str) -> Page {
    let Some(value) = local_path(location).and_then(|l| HeaderValue::from_str(l).ok()) else {
        return error_page(
            StatusCode::BAD_REQUEST,
            "That is not a page of this dashboard.",
        );
    };
    let r = Response::builder()
        .status(StatusCode::SEE_OTHER)
        .header(header::LOCATION, value)
        .body(Full::new(Bytes::new()))
        .expect("static response parts are valid");
    secured(r, true)
}

/// `path` when it is a path on this server: starts with one `/`, no scheme or host (`//`,
/// `/\`), and only printable ASCII — CR/LF would split the `Location` header, and anything
/// else is not what a form of ours sends.
pub fn local_path(path: &str) -> Option<&str> {
    let local = path.starts_with('/')
        && !path.starts_with("//")
        && !path.starts_with("/\\")
        && !path.contains('\\')
        && path.bytes().all(|b| b.is_ascii_graphic());
    local.then_some(path)
}

fn error_page(status: StatusCode, message: &str) -> Page {
    html(status, pages::error(status, message))
}

/// A refused or failed request as a page (the API renders the same refusal as JSON).
pub fn refusal_page(e: &Refusal) -> Page {
    if e.status.is_server_error() && e.status != StatusCode::SERVICE_UNAVAILABLE {
        tracing::error!(code = e.code, message = %e.message, "dashboard request failed");
    }
    error_page(e.status, &e.message)
}

/// A request that passed sign-in (and, for a POST, the CSRF checks).
pub struct Req {
    pub method: Method,
    /// The path's segments after `/ui`.
    pub segs: Vec<String>,
    pub query: Vec<(String, String)>,
    /// The form fields of a POST (`application/x-www-form-urlencoded`).
    pub form: Vec<(String, String)>,
    pub session: session::Session,
    pub session_id: String,
}

impl Req {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn fields(&self, name: &str) -> Vec<String> {
        self.form
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn session_cookie<B>(req: &Request<B>) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
        .filter(|v| !v.is_empty())
}

/// Refuses a request a browser marks as coming from another site: `Sec-Fetch-Site` other
/// than same-origin/none or, from a browser that does not send it, an `Origin` that is not
/// this server (`null` included). Our `Referrer-Policy: same-origin` keeps the referrer, and
/// with it a real `Origin`, on same-origin requests — under `no-referrer` browsers send
/// `Origin: null` even on same-origin form posts, which refused every POST of a browser
/// without `Sec-Fetch-Site`. (A client sending neither, such as curl, still needs the form's
/// CSRF token.)
fn cross_site<B>(config: &Config, req: &Request<B>) -> bool {
    let headers = req.headers();
    if let Some(site) = headers.get("sec-fetch-site") {
        return !matches!(site.to_str(), Ok("same-origin" | "none"));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let scheme = if config.server.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        let expected = host.map(|h| format!("{scheme}://{h}"));
        return origin.to_str().ok() != expected.as_deref();
    }
    false
}

fn forbidden_cross_site() -> Page {
    error_page(
        StatusCode::FORBIDDEN,
        "This form was sent from another site, so it was refused and nothing changed.",
    )
}

/// Reads a form body (`application/x-www-form-urlencoded`) within the edge's limits.
async fn read_form(
    state: &Services,
    req: Request<Incoming>,
) -> Result<Vec<(String, String)>, Refusal> {
    let bytes = edge::read_body(req, &state.config.server).await?;
    Ok(form_urlencoded::parse(&bytes).into_owned().collect())
}

/// Serves one `/ui` request (or `GET /`). Never fails: every problem becomes a page with a
/// 4xx/5xx.
pub async fn handle(ui: &UiState, req: Request<Incoming>) -> Page {
    let state = &*ui.services;
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    if path == "/ui" || path == "/" {
        return redirect("/ui/");
    }
    let segs: Vec<String> = path
        .trim_start_matches("/ui/")
        .trim_end_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect();
    let seg_refs: Vec<&str> = segs.iter().map(String::as_str).collect();

    // No session needed: assets and the sign-in screen.
    match (&method, seg_refs.as_slice()) {
        (&Method::GET, ["static", version, file]) => return assets::serve(version, file),
        (&Method::GET, ["login"]) => {
            if let Some(id) = session_cookie(&req) {
                if ui.sessions.lookup(&id, &state.registry).is_some() {
                    return redirect("/ui/");
                }
            }
            return html(StatusCode::OK, pages::login(None));
        }
        (&Method::POST, ["login"]) => return login(ui, req).await,
        (_, ["static", ..] | ["login"]) => {
            return error_page(
                StatusCode::METHOD_NOT_ALLOWED,
                "That method is not allowed here.",
            )
        }
        _ => {}
    }

    let session_id = session_cookie(&req);
    let session = session_id
        .as_deref()
        .and_then(|id| ui.sessions.lookup(id, &state.registry));
    let (Some(session), Some(session_id)) = (session, session_id) else {
        // A POST without a live session changes nothing; the browser is sent to sign in.
        return redirect("/ui/login");
    };
    // Dividing the work: a change to an account is made by the node serving it (the session
    // is in the store, so that node knows it). Pages that only read are served here.
    let req = if method == Method::POST {
        match relay_change(state, &seg_refs, req).await {
            Ok(page) => return page,
            Err(req) => req,
        }
    } else {
        req
    };
    let query: Vec<(String, String)> = req
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let form = match method {
        Method::GET => Vec::new(),
        Method::POST => {
            if cross_site(&state.config, &req) {
                return forbidden_cross_site();
            }
            let form = match read_form(state, req).await {
                Ok(f) => f,
                Err(e) => return refusal_page(&e),
            };
            let token = form
                .iter()
                .find(|(k, _)| k == "_csrf")
                .map(|(_, v)| v.as_str())
                .unwrap_or("");
            if !signing::constant_time_eq(token, &session.csrf) {
                return error_page(
                    StatusCode::FORBIDDEN,
                    "This form has expired or did not come from this dashboard; nothing changed. \
                     Reload the page and try again.",
                );
            }
            form
        }
        _ => {
            return error_page(
                StatusCode::METHOD_NOT_ALLOWED,
                "That method is not allowed here.",
            )
        }
    };
    let r = Req {
        method,
        segs,
        query,
        form,
        session,
        session_id,
    };
    screens::route(ui, r).await
}

/// Relays a dashboard change to the node serving its account; gives the request back when
/// this node serves it (one node alone, or the account is its own, or another node relayed
/// it here).
async fn relay_change(
    state: &crate::domain::Services,
    segs: &[&str],
    req: Request<Incoming>,
) -> Result<Page, Request<Incoming>> {
    use crate::placement::{Route, FORWARDED_BY};
    let Some(placement) = state.placement.as_ref() else {
        return Err(req);
    };
    let account = match segs {
        ["accounts" | "a", a, ..] => crate::ids::AccountId::parse(a),
        _ => None,
    };
    let Some(account) = account else {
        return Err(req);
    };
    if req.headers().contains_key(FORWARDED_BY) {
        return Err(req);
    }
    let owner = match placement.route(&account) {
        Route::Here => return Err(req),
        Route::There(owner) => owner,
        Route::Nobody(why) => {
            return Ok(error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("{why}. Nothing changed; try again in a moment."),
            ))
        }
    };
    let peer = req
        .extensions()
        .get::<crate::edge::ClientAddr>()
        .map(|a| a.0);
    let (parts, body) = req.into_parts();
    Ok(
        match placement
            .relay(&owner, parts, http_body_util::Either::Left(body), peer)
            .await
        {
            Ok((status, headers, bytes)) => {
                let mut r = Response::new(Full::new(bytes));
                *r.status_mut() = status;
                *r.headers_mut() = headers;
                r
            }
            Err(why) => error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "The node serving this account did not answer ({why}); nothing may have changed: check, then try again."
                ),
            ),
        },
    )
}

fn percent_decode(s: &str) -> String {
    // Path segments use the same escapes as query strings, minus '+'.
    let plus_safe = s.replace('+', "%2B");
    form_urlencoded::parse(format!("x={plus_safe}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

async fn login(ui: &UiState, req: Request<Incoming>) -> Page {
    let state = &*ui.services;
    if cross_site(&state.config, &req) {
        return forbidden_cross_site();
    }
    if let Err(not_until) = ui.login_limiter.check_key(&client_ip(&req)) {
        let wait = not_until
            .wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ))
            .as_secs()
            + 1;
        let mut r = html(
            StatusCode::TOO_MANY_REQUESTS,
            pages::login(Some(&format!(
                "Too many sign-in attempts from this address. Try again in {wait} seconds."
            ))),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(wait));
        return r;
    }
    if ui.login_limiter.len() > 10_000 {
        ui.login_limiter.retain_recent();
    }
    let previous_session = session_cookie(&req);
    // Not signed in yet: the form is read with no caller at all; the key in it decides.
    let form = match read_form(state, req).await {
        Ok(f) => f,
        Err(e) => return refusal_page(&e),
    };
    let token = form
        .iter()
        .find(|(k, _)| k == "key")
        .map(|(_, v)| v.trim())
        .unwrap_or("");
    let caller = if token.is_empty() {
        None
    } else {
        Caller::resolve(state, token)
    };
    let Some(caller) = caller else {
        return html(
            StatusCode::UNAUTHORIZED,
            pages::login(Some(
                "That key was not accepted. Use your account's API key, or the admin token.",
            )),
        );
    };
    // A new sign-in ends this browser's previous session: one browser, one live session.
    if let Some(previous) = &previous_session {
        ui.sessions.remove(previous);
    }
    let id = ui.sessions.create(caller, &state.registry);
    let secure = if state.config.server.tls_cert.is_some() {
        "; Secure"
    } else {
        ""
    };
    let mut r = redirect("/ui/");
    let cookie = format!("{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/ui{secure}");
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).expect("hex and fixed text are a valid header"),
    );
    r
}

/// Ends the session and clears the cookie.
pub fn logout(ui: &UiState, session_id: &str) -> Page {
    let state = &*ui.services;
    ui.sessions.remove(session_id);
    let secure = if state.config.server.tls_cert.is_some() {
        "; Secure"
    } else {
        ""
    };
    let mut r = redirect("/ui/login");
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&format!(
            "{COOKIE}=; HttpOnly; SameSite=Strict; Path=/ui; Max-Age=0{secure}"
        ))
        .expect("fixed text is a valid header"),
    );
    r
}
