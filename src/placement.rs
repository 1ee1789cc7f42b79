//! Where a request about an account is served when nodes divide the work
//! (`cluster.divide_work`): here, if this node serves the account's partition, else at the
//! owner's `cluster.advertise`, which [`Placement`] reads from the database (`kh_partition`
//! joined to `kh_node`) every [`LOOKUP_EVERY`]. The API relays such requests there
//! (`api::relay`): everything under `/v1/accounts/{id}`, and the events of `POST /v1/events`
//! and `/v1/events/batch` (a batch is split by owner), so that each account's deliveries,
//! webhooks and delivery log are changed by one node. Account creation, the admin routes and
//! the dashboard are served by whichever node is asked.
//!
//! In: the account a request is about. Out: [`Route`], and for a relayed request the owner's
//! answer (status, headers, body). A request goes through one relay at most: one that
//! carries [`FORWARDED_BY`] is served here whatever the owner (if this node cannot, the client
//! is told to retry), so two nodes that briefly disagree on an owner never loop.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;

use crate::config::Config;
pub use crate::edge::forwarded::FORWARDED_BY;
use crate::edge::forwarded::{self, ForwardKey, HOP_BY_HOP};
use crate::ids::AccountId;
use crate::partition::{partition_of, Shares, PARTITIONS};
use crate::store::postgres::connect::Target;
use crate::StartError;

/// How often the owners of the partitions are read.
pub const LOOKUP_EVERY: Duration = Duration::from_millis(250);

/// How long a relayed request may take before the relaying node answers 503 itself.
const RELAY_TIMEOUT: Duration = Duration::from_secs(60);

/// A node that owns a partition, as the database names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub name: String,
    node: i64,
    /// Its `cluster.advertise`, if it set one.
    pub base: Option<Uri>,
}

/// Where a request about an account goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This node serves the account.
    Here,
    /// Another node does, at this address.
    There(Owner),
    /// No node can take it right now (a hand-over in progress, or an owner without
    /// `cluster.advertise`): the client retries, with this reason.
    Nobody(String),
}

/// Request body a relay sends: the client's stream, or bytes already read.
pub type RelayBody = Either<Incoming, Full<Bytes>>;

/// This node's view of who owns which partition, and its client to the others.
pub struct Placement {
    shares: Arc<Shares>,
    me: i64,
    name: HeaderValue,
    owners: RwLock<Vec<Option<Owner>>>,
    client: Client<HttpsConnector<HttpConnector>, RelayBody>,
    client_key: Option<Arc<ForwardKey>>,
}

impl Placement {
    /// Builds the placement of node `me` (its `kh_node` id) and starts the lookup, which runs
    /// until `stop` turns true.
    pub fn start(
        config: &Config,
        shares: Arc<Shares>,
        me: i64,
        stop: watch::Receiver<bool>,
    ) -> Result<(Arc<Placement>, tokio::task::JoinHandle<()>), StartError> {
        let target = Target::from_config(config).map_err(|e| StartError::Config(e.to_string()))?;
        let connector = node_connector(config)?;
        let name = config.cluster.node_name();
        let placement = Arc::new(Placement {
            shares,
            me,
            name: HeaderValue::from_str(&name).unwrap_or(HeaderValue::from_static("node")),
            owners: RwLock::new(vec![None; usize::from(PARTITIONS)]),
            client: Client::builder(TokioExecutor::new()).build(connector),
            client_key: ForwardKey::load(config).map(Arc::new),
        });
        let task = tokio::spawn(look_up(target, Arc::downgrade(&placement), stop));
        Ok((placement, task))
    }

    /// Where a request about `account` goes.
    pub fn route(&self, account: &AccountId) -> Route {
        let p = partition_of(account);
        if self.shares.serves_partition(p) {
            return Route::Here;
        }
        // Held but not served: its work is loading (just taken over) or it is being handed
        // over. The owners read from the database may be older than that (another node's,
        // perhaps one that is hung): never relay there.
        if self.shares.epoch(p).is_some() {
            return Route::Nobody(
                "this account's partition is moving between nodes; retry in a moment".into(),
            );
        }
        let owner = self.owners.read().unwrap_or_else(|e| e.into_inner())[p.index()].clone();
        match owner {
            // This node still owns it in the database: it is handing it over.
            Some(o) if o.node == self.me => {
                Route::Nobody("this account's partition is being handed over between nodes".into())
            }
            Some(o) if o.base.is_none() => Route::Nobody(format!(
                "this account is served by node {:?}, which sets no cluster.advertise to forward to: send the request to it directly",
                o.name
            )),
            Some(o) => Route::There(o),
            None => Route::Nobody("no node serves this account's partition right now".into()),
        }
    }

    /// Sends the request (`parts`, `body`) to `owner` and reads its answer. `peer` is the
    /// client's address, which the owner counts its per-address limits for.
    pub async fn relay(
        &self,
        owner: &Owner,
        mut parts: http::request::Parts,
        body: RelayBody,
        peer: Option<SocketAddr>,
    ) -> Result<(StatusCode, HeaderMap, Bytes), String> {
        let base = owner
            .base
            .as_ref()
            .ok_or_else(|| format!("node {:?} sets no cluster.advertise", owner.name))?;
        for h in HOP_BY_HOP {
            parts.headers.remove(h);
        }
        parts.headers.insert(FORWARDED_BY, self.name.clone());
        parts.headers.remove(forwarded::HEADER);
        if let Some(peer) = peer {
            if let Ok(v) = HeaderValue::from_str(&peer.ip().to_string()) {
                parts.headers.append("x-forwarded-for", v);
            }
            if let Some(key) = &self.client_key {
                parts.headers.insert(
                    forwarded::HEADER,
                    key.sign(peer.ip(), forwarded::unix_now_s()),
                );
            }
        }
        // A body of a known length goes with its length (the stream's hint says so).
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri: Uri = format!(
            "{}://{}{path}",
            base.scheme_str().unwrap_or("http"),
            base.authority().map_or("", |a| a.as_str())
        )
        .parse()
        .map_err(|e| format!("cannot relay {path:?}: {e}"))?;
        let mut req = Request::new(body);
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = parts.headers;
        let resp = tokio::time::timeout(RELAY_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| {
                format!(
                    "node {:?} did not answer within {} s",
                    owner.name,
                    RELAY_TIMEOUT.as_secs()
                )
            })?
            .map_err(|e| format!("node {:?} at {base} did not answer: {e}", owner.name))?;
        let (mut parts, body) = resp.into_parts();
        let bytes = body
            .collect()
            .await
            .map_err(|e| format!("node {:?} cut its answer short: {e}", owner.name))?
            .to_bytes();
        for h in HOP_BY_HOP {
            parts.headers.remove(h);
        }
        parts.headers.remove(http::header::CONTENT_LENGTH);
        parts.headers.remove(http::header::TRANSFER_ENCODING);
        parts.headers.insert(FORWARDED_BY, self.name.clone());
        metrics::counter!("kyberhook_relayed_requests_total").increment(1);
        Ok((parts.status, parts.headers, bytes))
    }
}

/// How a node connects to another's `cluster.advertise` (to relay or forward a request): HTTP
/// or HTTPS, trusting the system roots plus `delivery.extra_ca_files`.
pub fn node_connector(config: &Config) -> Result<HttpsConnector<HttpConnector>, StartError> {
    let roots = crate::dispatch::client::tls_client_config(&config.delivery.extra_ca_files)
        .map_err(|e| StartError::Config(format!("delivery.extra_ca_files: {e}")))?;
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(roots)
        .https_or_http()
        .enable_http1()
        .build())
}

/// Reads the owner of every partition every [`LOOKUP_EVERY`] until `stop` (or the placement
/// is gone), reconnecting as needed.
async fn look_up(
    target: Target,
    placement: std::sync::Weak<Placement>,
    mut stop: watch::Receiver<bool>,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    loop {
        if client.as_ref().map_or(true, |c| c.is_closed()) {
            client = target.connect().await.ok();
        }
        if let (Some(c), Some(p)) = (&client, placement.upgrade()) {
            match owners_now(c).await {
                Ok(now) => *p.owners.write().unwrap_or_else(|e| e.into_inner()) = now,
                Err(e) => {
                    tracing::debug!(error = %e, "reading the partitions' owners failed");
                    client = None;
                }
            }
        } else if placement.strong_count() == 0 {
            return;
        }
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(LOOKUP_EVERY) => {}
        }
    }
}

async fn owners_now(
    c: &tokio_postgres::Client,
) -> Result<Vec<Option<Owner>>, tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT p.partition_id, n.node_id, n.name, n.advertise
             FROM kh_partition p JOIN kh_node n ON n.node_id = p.owner",
            &[],
        )
        .await?;
    let mut owners = vec![None; usize::from(PARTITIONS)];
    for r in rows {
        let p: i16 = r.get(0);
        if let Some(slot) = usize::try_from(p).ok().and_then(|i| owners.get_mut(i)) {
            *slot = Some(Owner {
                node: r.get(1),
                name: r.get(2),
                base: r
                    .get::<_, Option<String>>(3)
                    .and_then(|a| crate::config::parse_advertise(&a).ok()),
            });
        }
    }
    Ok(owners)
}
