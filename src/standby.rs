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
//! what the client sent — body streamed), `x-forwarded-for` added, and the holder's answer
//! streamed back with `x-kyberhook-forwarded-by` naming this node. Without a holder to
//! forward to (none yet, or it set no `cluster.advertise`, or it cannot be reached) the answer
//! is `503 standby` with `Retry-After: 1`.
//!
//! The serving node sees forwarded requests as coming from the standby's address, so its
//! per-address limits (failed sign-ins, bearer guessing) count a standby's clients together;
//! and it must accept the host names clients use for the standby (`server.public_hosts`).

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::edge::{self, ClientAddr, Handler, Timeouts};
use crate::store::postgres::connect::Target;
use crate::StartError;

/// How often the standby reads who holds the lease.
const LOOKUP_EVERY: Duration = Duration::from_millis(500);

/// How long a forwarded request may take before the standby answers 503 itself.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(60);

/// Headers that belong to one connection, not to the request (RFC 9110 7.6.1).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
];

/// The node requests go to, as last read from the database.
#[derive(Debug, Clone)]
struct Holder {
    name: String,
    /// `cluster.advertise` of the holder, if it set one.
    base: Option<Uri>,
}

#[derive(Clone)]
struct Forward {
    holder: Arc<RwLock<Option<Holder>>>,
    client: Client<HttpsConnector<HttpConnector>, Incoming>,
    me: HeaderValue,
}

type Body = Either<Incoming, Full<Bytes>>;

fn refuse(message: String) -> Response<Body> {
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

    async fn call(&self, mut req: Request<Incoming>) -> Response<Body> {
        let holder = self
            .holder
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(holder) = holder else {
            return refuse(
                "this node is a standby and no node serves from the database right now; retry shortly"
                    .into(),
            );
        };
        let Some(base) = holder.base else {
            return refuse(format!(
                "this node is a standby; the serving node {:?} sets no cluster.advertise to forward to: send requests to it directly",
                holder.name
            ));
        };
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
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
        let peer = req.extensions().get::<ClientAddr>().map(|a| a.0);
        *req.uri_mut() = uri;
        let headers = req.headers_mut();
        for h in HOP_BY_HOP {
            headers.remove(h);
        }
        if let Some(v) = peer.and_then(|p| HeaderValue::from_str(&p.ip().to_string()).ok()) {
            headers.append("x-forwarded-for", v);
        }
        match tokio::time::timeout(FORWARD_TIMEOUT, self.client.request(req)).await {
            Ok(Ok(resp)) => {
                let (mut parts, body) = resp.into_parts();
                for h in HOP_BY_HOP {
                    parts.headers.remove(h);
                }
                parts
                    .headers
                    .insert("x-kyberhook-forwarded-by", self.me.clone());
                Response::from_parts(parts, Either::Left(body))
            }
            Ok(Err(e)) => refuse(format!(
                "this node is a standby and the serving node {:?} at {base} did not answer: {e}",
                holder.name
            )),
            Err(_) => refuse(format!(
                "this node is a standby and the serving node {:?} did not answer within {} s",
                holder.name,
                FORWARD_TIMEOUT.as_secs()
            )),
        }
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
        let addr = listener
            .local_addr()
            .map_err(|e| StartError::Other(e.to_string()))?;
        let tls = edge::server_tls(&config.server)?;
        let roots = crate::dispatch::client::tls_client_config(&config.delivery.extra_ca_files)
            .map_err(|e| StartError::Config(format!("delivery.extra_ca_files: {e}")))?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(roots)
            .https_or_http()
            .enable_http1()
            .build();
        let me = config.cluster.node_name();
        let forward = Forward {
            holder: Arc::default(),
            client: Client::builder(TokioExecutor::new()).build(connector),
            me: HeaderValue::from_str(&me).unwrap_or(HeaderValue::from_static("standby")),
        };
        // The first answer already knows where to forward.
        let client = target.connect().await.ok();
        if let Some(c) = &client {
            if let Ok(found) = holder_now(c).await {
                *forward.holder.write().unwrap_or_else(|p| p.into_inner()) = found;
            }
        }
        let (shutdown, shutdown_rx) = watch::channel(false);
        let lookup = tokio::spawn(look_up_holder(
            target,
            client,
            forward.holder.clone(),
            shutdown_rx.clone(),
        ));
        let serve = tokio::spawn(edge::serve(
            listener,
            tls,
            forward,
            Timeouts::from_config(&config.server),
            shutdown_rx,
        ));
        tracing::info!(standby_api = %addr, node = %me, "listening as a standby: requests are forwarded to the serving node");
        Ok(Standby {
            shutdown,
            tasks: vec![lookup, serve],
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

/// Reads who holds the lease every [`LOOKUP_EVERY`] (reconnecting as needed).
async fn look_up_holder(
    target: Target,
    mut client: Option<tokio_postgres::Client>,
    holder: Arc<RwLock<Option<Holder>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            () = tokio::time::sleep(LOOKUP_EVERY) => {}
        }
        if client.as_ref().map_or(true, |c| c.is_closed()) {
            client = target.connect().await.ok();
        }
        if let Some(c) = &client {
            if let Ok(now) = holder_now(c).await {
                *holder.write().unwrap_or_else(|p| p.into_inner()) = now;
            }
        }
    }
}
