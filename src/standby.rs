//! A standby's front door: while a node waits for the PostgreSQL lease (another node serves),
//! it still answers on `server.listen` by forwarding every request — API, dashboard, health —
//! to the serving node's `cluster.advertise` URL, so that clients and a load balancer can use
//! any node. When the node takes the lease it stops forwarding, closes the listener, and the
//! engine opens it again as itself.
//!
//! In: the config (listener, TLS, the database to read the lease holder from, CAs to trust
//! the holder's URL with: the system roots plus `delivery.extra_ca_files`). Out: each request
//! forwarded as it came (method, path, query, headers but the hop-by-hop ones — `Host`
//! included, so the serving node's host allowlist and the dashboard's same-origin check see
//! what the client sent — body streamed), `x-forwarded-for` and `x-kyberhook-forwarded-by`
//! added (a request that already has the latter is refused, never forwarded in a loop), and the holder's answer
//! streamed back with `x-kyberhook-forwarded-by` naming this node. When the holder cannot be
//! connected to (it just died) or no node holds the lease for a moment (a takeover), a request
//! whose body is small enough to keep (up to [`KEEP_BODY`]) waits up to [`REROUTE_WINDOW`] for
//! the next holder — this node itself, once its engine opens the address — and goes there: the
//! client sees a slower answer instead of a refusal, since a request that never connected was
//! never seen. A request that did reach the holder and got no answer (it died meanwhile) may
//! have been acted on, so it is sent again only if that changes nothing ([`replay_safe`]: a
//! read, or events that all carry the producer's own `id`). Otherwise (no holder by then, it set no
//! `cluster.advertise`, a larger or streamed body, a request perhaps seen) the answer is `503
//! standby` with `Retry-After: 1`.
//!
//! The serving node counts its per-address limits (failed sign-ins, bearer guessing) for the
//! client the standby names in a signed header ([`forwarded`]), not for the standby; and it
//! must accept the host names clients use for the standby (`server.public_hosts`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::edge::forwarded::{self, ForwardKey, FORWARDED_BY, HOP_BY_HOP};
use crate::edge::{self, ClientAddr, Handler, Timeouts};
use crate::store::postgres::connect::Target;
use crate::StartError;

/// How often the standby reads who holds the lease.
const LOOKUP_EVERY: Duration = Duration::from_millis(500);

/// How long a forwarded request may take before the standby answers 503 itself.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a request that could not reach a holder waits for the next one (a takeover after a
/// crash takes well under a second).
const REROUTE_WINDOW: Duration = Duration::from_secs(5);

/// Bodies up to this size (by `Content-Length`) are read before forwarding, so that they can be
/// sent again to the next holder; an event is far smaller.
const KEEP_BODY: u64 = 1 << 20;

/// The node requests go to, as last read from the database.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Holder {
    name: String,
    /// `cluster.advertise` of the holder, if it set one.
    base: Option<Uri>,
}

#[derive(Clone)]
struct Forward {
    holder: watch::Receiver<Option<Holder>>,
    /// Asks the lookup to read the holder now instead of at its next turn.
    look_now: Arc<Notify>,
    client: Client<HttpsConnector<HttpConnector>, Body>,
    me: HeaderValue,
    /// This node's own `cluster.advertise`: forwarded to only once the standby stops (this
    /// node took the lease and its engine is opening the same address).
    own: Option<Uri>,
    stopping: watch::Receiver<bool>,
    /// Signs the client's address for the serving node ([`forwarded`]).
    client_key: Option<Arc<ForwardKey>>,
}

type Body = Either<Incoming, Full<Bytes>>;

fn refuse(message: String) -> Response<Body> {
    metrics::counter!("kyberhook_standby_requests_total", "outcome" => "refused").increment(1);
    let body = serde_json::json!({"error": {"code": "standby", "message": message}});
    let mut r = Response::new(Either::Right(Full::new(Bytes::from(body.to_string()))));
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

impl Handler for Forward {
    type Body = Body;

    async fn call(&self, req: Request<Incoming>) -> Response<Body> {
        let peer = req.extensions().get::<ClientAddr>().map(|a| a.0);
        let (mut parts, body) = req.into_parts();
        // A request goes through one standby at most: never round a loop of them.
        if parts.headers.contains_key(FORWARDED_BY) {
            return refuse(
                "this node is a standby too and does not forward a forwarded request; retry shortly"
                    .into(),
            );
        }
        for h in HOP_BY_HOP {
            parts.headers.remove(h);
        }
        parts.headers.insert(FORWARDED_BY, self.me.clone());
        if let Some(v) = peer.and_then(|p| HeaderValue::from_str(&p.ip().to_string()).ok()) {
            parts.headers.append("x-forwarded-for", v);
        }
        // The serving node counts its per-address limits for this client, not for this node.
        parts.headers.remove(forwarded::HEADER);
        if let (Some(key), Some(peer)) = (&self.client_key, peer) {
            parts.headers.insert(
                forwarded::HEADER,
                key.sign(peer.ip(), forwarded::unix_now_s()),
            );
        }
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        // A small body is kept, so that the request can go to the next holder if this one
        // cannot be reached; anything else is streamed, once.
        let small = body.size_hint().exact().is_some_and(|n| n <= KEEP_BODY);
        let (mut kept, mut stream) = (None, None);
        if small {
            match body.collect().await {
                Ok(b) => kept = Some(b.to_bytes()),
                Err(e) => return refuse(format!("cannot read the request body: {e}")),
            }
        } else {
            stream = Some(body);
        }
        let deadline = tokio::time::Instant::now() + REROUTE_WINDOW;
        let mut holder_rx = self.holder.clone();
        loop {
            let mut holder = holder_rx.borrow_and_update().clone();
            if *self.stopping.borrow() {
                // The standby stops because this node took the lease: its engine is opening
                // this address (the lookup has ended and no longer says so).
                holder = self.own.clone().map(|own| Holder {
                    name: self.me.to_str().unwrap_or("this node").to_string(),
                    base: Some(own),
                });
            }
            let can_wait = kept.is_some() && tokio::time::Instant::now() < deadline;
            let Some(holder) = holder else {
                if can_wait && self.wait_a_little(&mut holder_rx, deadline).await {
                    continue;
                }
                return refuse(
                    "this node is a standby and no node serves from the database right now; retry shortly"
                        .into(),
                );
            };
            if holder.base.is_some() && holder.base == self.own && !*self.stopping.borrow() {
                // This node took the lease and hands its address to its engine in a moment.
                if can_wait && self.wait_a_little(&mut holder_rx, deadline).await {
                    continue;
                }
                return refuse("this node is taking over; retry shortly".into());
            }
            let Some(base) = holder.base.clone() else {
                return refuse(format!(
                    "this node is a standby; the serving node {:?} sets no cluster.advertise to forward to: send requests to it directly",
                    holder.name
                ));
            };
            let uri = match format!(
                "{}://{}{path}",
                base.scheme_str().unwrap_or("http"),
                base.authority().map_or("", |a| a.as_str())
            )
            .parse::<Uri>()
            {
                Ok(u) => u,
                Err(e) => return refuse(format!("cannot forward {path:?}: {e}")),
            };
            let body = match (&kept, stream.take()) {
                (Some(b), _) => Either::Right(Full::new(b.clone())),
                (None, Some(s)) => Either::Left(s),
                (None, None) => return refuse("the request body was already sent".into()),
            };
            let mut req = Request::new(body);
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = uri;
            *req.version_mut() = parts.version;
            *req.headers_mut() = parts.headers.clone();
            match tokio::time::timeout(FORWARD_TIMEOUT, self.client.request(req)).await {
                Ok(Ok(resp)) => {
                    let (mut parts, body) = resp.into_parts();
                    for h in HOP_BY_HOP {
                        parts.headers.remove(h);
                    }
                    parts.headers.insert(FORWARDED_BY, self.me.clone());
                    metrics::counter!("kyberhook_standby_requests_total", "outcome" => "forwarded")
                        .increment(1);
                    return Response::from_parts(parts, Either::Left(body));
                }
                // Never connected, so never seen: it may go to whoever holds the lease next.
                Ok(Err(e)) if e.is_connect() && can_wait => {
                    if self.wait_a_little(&mut holder_rx, deadline).await {
                        continue;
                    }
                    return refuse(format!(
                        "this node is a standby and the serving node {:?} at {base} did not answer: {e}",
                        holder.name
                    ));
                }
                // Perhaps seen, but sending it again changes nothing: a read, or events that
                // all carry the producer's own id (the next holder answers an id it already
                // has with its 202 and makes no second delivery).
                Ok(Err(_)) if can_wait && replay_safe(&parts, kept.as_deref()) => {
                    if self.wait_a_little(&mut holder_rx, deadline).await {
                        continue;
                    }
                    return refuse(format!(
                        "this node is a standby and the serving node {:?} at {base} did not answer",
                        holder.name
                    ));
                }
                Ok(Err(e)) => {
                    // Perhaps seen: the holder may have acted on it before it died, so the
                    // client decides (a producer-chosen event id makes its retry exact).
                    return refuse(format!(
                        "this node is a standby and the serving node {:?} at {base} did not answer: {e}",
                        holder.name
                    ));
                }
                Err(_) => {
                    return refuse(format!(
                    "this node is a standby and the serving node {:?} did not answer within {} s",
                    holder.name,
                    FORWARD_TIMEOUT.as_secs()
                ))
                }
            }
        }
    }
}

/// Whether a request the holder may have acted on can be sent again with the same effect: a
/// read, or `POST /v1/events` / `/v1/events/batch` whose every event names its own `id`
/// (ingest is idempotent on a producer's id). A create, change or delete is not: its second
/// answer could differ (a second account, a 404), so the client decides.
fn replay_safe(parts: &http::request::Parts, body: Option<&[u8]>) -> bool {
    if matches!(parts.method, http::Method::GET | http::Method::HEAD) {
        return true;
    }
    let (Some(body), true) = (body, parts.method == http::Method::POST) else {
        return false;
    };
    let has_id = |e: &serde_json::Value| {
        e.get("id")
            .and_then(|v| v.as_str())
            .is_some_and(|s| !s.is_empty())
    };
    match parts.uri.path() {
        "/v1/events" => serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| has_id(&v)),
        "/v1/events/batch" => serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| {
            v.get("events")
                .and_then(|e| e.as_array())
                .is_some_and(|events| !events.is_empty() && events.iter().all(has_id))
        }),
        _ => false,
    }
}

impl Forward {
    /// Waits until the lookup reports a change (asked to look at once) or 50 ms pass; whether
    /// there is time left before `deadline` to try again.
    async fn wait_a_little(
        &self,
        rx: &mut watch::Receiver<Option<Holder>>,
        deadline: tokio::time::Instant,
    ) -> bool {
        self.look_now.notify_one();
        let until = (tokio::time::Instant::now() + Duration::from_millis(50)).min(deadline);
        // Once the lookup has ended (the standby stops), only the pause remains.
        if let Ok(Err(_)) = tokio::time::timeout_at(until, rx.changed()).await {
            tokio::time::sleep_until(until).await;
        }
        tokio::time::Instant::now() < deadline
    }
}

/// A standby's forwarding listener and its lookup of the lease holder.
pub struct Standby {
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    pub addr: SocketAddr,
}

impl Standby {
    /// Binds `server.listen` and forwards until [`Standby::stop`].
    pub async fn start(config: &Config) -> Result<Standby, StartError> {
        let target = Target::from_config(config).map_err(|e| StartError::Config(e.to_string()))?;
        let listener = edge::bind(config.server.listen, "server.listen").await?;
        let metrics_listener = edge::bind(config.metrics.listen, "metrics.listen").await?;
        let addr = listener
            .local_addr()
            .map_err(|e| StartError::Other(e.to_string()))?;
        let metrics_addr = metrics_listener
            .local_addr()
            .map_err(|e| StartError::Other(e.to_string()))?;
        let prometheus = crate::metrics::install();
        metrics::gauge!("kyberhook_serving").set(0.0);
        let tls = edge::server_tls(&config.server)?;
        let connector = crate::placement::node_connector(config)?;
        let me = config.cluster.node_name();
        let (shutdown, shutdown_rx) = watch::channel(false);
        // The first answer already knows where to forward.
        let client = target.connect().await.ok();
        let mut first = None;
        if let Some(c) = &client {
            first = holder_now(c).await.ok().flatten();
        }
        let (holder_tx, holder_rx) = watch::channel(first);
        let look_now = Arc::new(Notify::new());
        let forward = Forward {
            holder: holder_rx,
            look_now: look_now.clone(),
            client: Client::builder(TokioExecutor::new()).build(connector),
            me: HeaderValue::from_str(&me).unwrap_or(HeaderValue::from_static("standby")),
            own: config
                .cluster
                .advertise
                .as_deref()
                .and_then(|a| crate::config::parse_advertise(a).ok()),
            stopping: shutdown_rx.clone(),
            client_key: ForwardKey::load(config).map(Arc::new),
        };
        let lookup = tokio::spawn(look_up_holder(
            target,
            client,
            holder_tx,
            look_now,
            shutdown_rx.clone(),
        ));
        let serve_metrics = tokio::spawn(edge::serve(
            metrics_listener,
            None,
            crate::metrics::StandbyMetricsHandler { prometheus },
            Timeouts::from_config(&config.server),
            shutdown_rx.clone(),
        ));
        let serve = tokio::spawn(edge::serve(
            listener,
            tls,
            forward,
            Timeouts::from_config(&config.server),
            shutdown_rx,
        ));
        tracing::info!(standby_api = %addr, standby_metrics = %metrics_addr, node = %me, "listening as a standby: requests are forwarded to the serving node");
        Ok(Standby {
            shutdown,
            tasks: vec![lookup, serve, serve_metrics],
            addr,
        })
    }

    /// Stops forwarding and closes the listener (requests in flight finish in the
    /// background).
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        // The accept loop drops its listener as soon as it sees the signal; the drain of
        // open connections after that need not be waited for.
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_millis(200), t).await;
        }
    }
}

/// Who holds the lease now, and the URL it advertises.
async fn holder_now(c: &tokio_postgres::Client) -> Result<Option<Holder>, tokio_postgres::Error> {
    let row = c
        .query_opt(
            "SELECT n.name, n.advertise FROM kh_lease l JOIN kh_node n ON n.node_id = l.owner
             WHERE l.id = 1 AND l.expires_at > now()",
            &[],
        )
        .await?;
    Ok(row.map(|r| Holder {
        name: r.get(0),
        base: r
            .get::<_, Option<String>>(1)
            .and_then(|a| crate::config::parse_advertise(&a).ok()),
    }))
}

/// Reads who holds the lease every [`LOOKUP_EVERY`], or at once when asked (reconnecting as
/// needed); receivers hear only of changes.
async fn look_up_holder(
    target: Target,
    mut client: Option<tokio_postgres::Client>,
    holder: watch::Sender<Option<Holder>>,
    look_now: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            () = tokio::time::sleep(LOOKUP_EVERY) => {}
            () = look_now.notified() => {}
        }
        if client.as_ref().map_or(true, |c| c.is_closed()) {
            client = target.connect().await.ok();
        }
        if let Some(c) = &client {
            if let Ok(now) = holder_now(c).await {
                holder.send_if_modified(|h| {
                    let changed = *h != now;
                    *h = now;
                    changed
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::replay_safe;

    fn parts(method: &str, path: &str) -> http::request::Parts {
        let (parts, ()) = http::Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .expect("request")
            .into_parts();
        parts
    }

    #[test]
    fn reads_and_events_with_their_own_ids_are_sent_again_nothing_else() {
        let one = br#"{"id":"ka-1","account_id":"acc_1","event":"visitor.checked_in","data":{}}"#;
        let minted = br#"{"account_id":"acc_1","event":"visitor.checked_in","data":{}}"#;
        let batch = br#"{"events":[{"id":"a","event":"x"},{"id":"b","event":"x"}]}"#;
        let half = br#"{"events":[{"id":"a","event":"x"},{"event":"x"}]}"#;
        assert!(replay_safe(
            &parts("GET", "/v1/accounts/acc_1/deliveries"),
            None
        ));
        assert!(replay_safe(&parts("HEAD", "/healthz"), None));
        assert!(replay_safe(&parts("POST", "/v1/events"), Some(one)));
        assert!(replay_safe(&parts("POST", "/v1/events/batch"), Some(batch)));
        // A minted id would be minted twice: two events.
        assert!(!replay_safe(&parts("POST", "/v1/events"), Some(minted)));
        assert!(!replay_safe(&parts("POST", "/v1/events/batch"), Some(half)));
        assert!(!replay_safe(
            &parts("POST", "/v1/events/batch"),
            Some(br#"{"events":[]}"#)
        ));
        assert!(!replay_safe(
            &parts("POST", "/v1/events"),
            Some(br#"{"id":""}"#)
        ));
        assert!(!replay_safe(
            &parts("POST", "/v1/events"),
            Some(b"not json")
        ));
        // A body not kept (streamed) cannot be sent again at all.
        assert!(!replay_safe(&parts("POST", "/v1/events"), None));
        // Creates, changes and deletes answer differently the second time.
        assert!(!replay_safe(&parts("POST", "/v1/accounts"), Some(one)));
        assert!(!replay_safe(&parts("DELETE", "/v1/accounts/acc_1"), None));
        assert!(!replay_safe(
            &parts("PATCH", "/v1/accounts/acc_1"),
            Some(b"{}")
        ));
    }
}
