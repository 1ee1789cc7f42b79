//! The API listener's router: one listener, two front ends that share the port but nothing
//! else (the JSON API authenticates a bearer token, the dashboard a session cookie).
//!
//! A request enters from [`serve`](super::serve). A `Host` the engine does not answer to is
//! refused first, 421, before any front end authenticates anything ([`hosts`](super::hosts));
//! the refusal is still rendered by the front end the path belongs to, so `/v1` gets JSON and
//! `/ui` a page. Then the path decides: `/ui`, `/ui/…` and `GET /` go to the dashboard,
//! everything else to the API. The router holds both as [`Frontend`]s, so the edge depends on
//! neither: the engine builds the two handlers and the router at start. On a PostgreSQL node
//! the client a standby forwards for, when it proves it ([`forwarded`]), replaces the
//! connection's address for the per-address limits.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Method, Request, Response};
use http_body_util::Either;
use hyper::body::Incoming;

use super::forwarded::{self, ForwardKey};
use super::hosts::HostAllowlist;
use super::{ClientAddr, Handler, LocalAddr};
use crate::config::ServerConfig;

/// A front end behind the [`Router`]: a [`Handler`] that also renders the 421 of a request
/// whose `Host` is not ours, in its own format.
pub trait Frontend: Handler {
    /// 421 Misdirected Request, with [`MISDIRECTED`] for people.
    fn misdirected(&self) -> Response<Self::Body>;
}

/// What a front end tells a client whose `Host` is refused.
pub const MISDIRECTED: &str = "this server does not answer to that Host; use its address, \
                               localhost, or a name in server.public_hosts";

/// Splits the API listener's requests between the API and the dashboard.
pub struct Router<A, U> {
    api: A,
    ui: U,
    /// The names and addresses the listener answers to (shared: the router is cloned per
    /// connection).
    hosts: Arc<Hosts>,
    /// Set on a PostgreSQL node: the client a standby names is believed ([`forwarded`]).
    forward_key: Option<Arc<ForwardKey>>,
}

struct Hosts {
    listen: SocketAddr,
    public: Vec<String>,
}

impl<A: Frontend, U: Frontend> Router<A, U> {
    pub fn new(api: A, ui: U, server: &ServerConfig, forward_key: Option<ForwardKey>) -> Self {
        Router {
            api,
            ui,
            hosts: Arc::new(Hosts {
                listen: server.listen,
                public: server.public_hosts.clone(),
            }),
            forward_key: forward_key.map(Arc::new),
        }
    }
}

// Not derived: a derive would ask `Hosts` to be `Clone` too, and cloning the `Arc` is enough.
impl<A: Clone, U: Clone> Clone for Router<A, U> {
    fn clone(&self) -> Self {
        Router {
            api: self.api.clone(),
            ui: self.ui.clone(),
            hosts: self.hosts.clone(),
            forward_key: self.forward_key.clone(),
        }
    }
}

/// Whether a request belongs to the dashboard: its pages, and the site root it redirects.
fn is_dashboard<B>(req: &Request<B>) -> bool {
    let path = req.uri().path();
    path == "/ui" || path.starts_with("/ui/") || (path == "/" && req.method() == Method::GET)
}

impl<A: Frontend, U: Frontend> Handler for Router<A, U> {
    type Body = Either<A::Body, U::Body>;

    async fn call(&self, mut req: Request<Incoming>) -> Response<Self::Body> {
        // Only a standby of this cluster may name the client; anyone else's header is dropped.
        if let Some(named) = req.headers_mut().remove(forwarded::HEADER) {
            let key = self.forward_key.as_deref();
            if let Some(ip) = key.and_then(|k| k.verify(named.as_bytes(), forwarded::unix_now_s()))
            {
                req.extensions_mut()
                    .insert(ClientAddr(SocketAddr::new(ip, 0)));
            }
        }
        let local = req.extensions().get::<LocalAddr>().map(|a| a.0.ip());
        let hosts = HostAllowlist::new(self.hosts.listen, &self.hosts.public);
        // Only a `/ui` path gets the dashboard's page: `GET /` is a redirect, not a page, and a
        // foreign Host there gets the API's JSON like every other path.
        let ui_path = {
            let path = req.uri().path();
            path == "/ui" || path.starts_with("/ui/")
        };
        if !hosts.admits(&req, local) {
            metrics::counter!("kyberhook_api_requests_total", "route" => "misdirected", "status" => "421")
                .increment(1);
            return if ui_path {
                self.ui.misdirected().map(Either::Right)
            } else {
                self.api.misdirected().map(Either::Left)
            };
        }
        if is_dashboard(&req) {
            self.ui.call(req).await.map(Either::Right)
        } else {
            self.api.call(req).await.map(Either::Left)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_dashboard;
    use http::{Method, Request};

    fn req(method: Method, uri: &str) -> Request<()> {
        Request::builder().method(method).uri(uri).body(()).unwrap()
    }

    #[test]
    fn the_dashboard_gets_its_prefix_and_the_root_s_get_and_the_api_the_rest() {
        for (method, uri) in [
            (Method::GET, "/ui"),
            (Method::GET, "/ui/"),
            (Method::POST, "/ui/login"),
            (Method::GET, "/ui/a/acc_1/webhooks?x=1"),
            (Method::GET, "/"),
        ] {
            assert!(is_dashboard(&req(method.clone(), uri)), "{method} {uri}");
        }
        for (method, uri) in [
            (Method::POST, "/"),
            (Method::GET, "/uix"),
            (Method::GET, "/v1/ui"),
            (Method::GET, "/healthz"),
            (Method::POST, "/v1/events"),
        ] {
            assert!(!is_dashboard(&req(method.clone(), uri)), "{method} {uri}");
        }
    }
}
