//! The outbound HTTPS client: one POST per attempt, over pooled keep-alive connections.
//!
//! In: a URL, the webhook's address policy, headers and the body bytes. Out: an
//! [`AttemptOutcome`] — status, headers, the start of the body, elapsed time, or the error
//! text of a refusal, TLS failure, connection failure or timeout. Built on hyper-util's pooled
//! client over hyper-rustls (ring provider; TLS 1.2 minimum; system roots plus
//! `delivery.extra_ca_files`; SNI from the URL host). Host names are resolved by
//! [`GuardedResolver`], which drops every address the policy refuses, so the connector only
//! ever connects to an address that was checked. Redirects are never followed.
//!
//! The error text of an outcome is shown to the tenant (delivery log, test tool), so a refusal
//! or a failed lookup is reported as [`NOT_ALLOWED`] or [`UNRESOLVABLE`] only: what the host
//! resolved to and the resolver's own message would let a tenant map the internal network. That
//! detail goes to the operator's log, with the delivery id.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use ipnet::IpNet;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::netguard::{AddressPolicy, Refusal};
use crate::ids::DeliveryId;

/// What a tenant is told when the guard refuses every address of the host (or its literal one).
pub const NOT_ALLOWED: &str = "destination is not allowed";
/// What a tenant is told when the host name has no address.
pub const UNRESOLVABLE: &str = "host cannot be resolved";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{path}: cannot read CA bundle: {message}")]
    CaFile { path: PathBuf, message: String },
    #[error("TLS set-up failed: {0}")]
    Tls(String),
}

/// Resolves a host and keeps only the addresses the policy allows; if none is left the
/// connection fails with the first refusal.
#[derive(Clone)]
pub struct GuardedResolver {
    policy: Arc<AddressPolicy>,
}

/// The resolver's errors. They travel inside hyper's connect error, where [`Failure::from_client`]
/// finds them again; their text is for the operator's log.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("refused to connect to {host}: {refusal}")]
    Refused { host: String, refusal: Refusal },
    #[error("cannot resolve {host}: {source}")]
    Lookup {
        host: String,
        source: std::io::Error,
    },
    #[error("cannot resolve {host}: no address")]
    NoAddress { host: String },
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let lookup: Result<Vec<SocketAddr>, _> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map(Iterator::collect);
            let resolved = match lookup {
                Ok(addrs) => addrs,
                Err(source) => return Err(Box::new(ResolveError::Lookup { host, source }) as _),
            };
            let mut first_refusal = None;
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|a| match policy.check(a.ip()) {
                    Ok(()) => true,
                    Err(refusal) => {
                        first_refusal.get_or_insert(refusal);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let error = match first_refusal {
                    Some(refusal) => ResolveError::Refused { host, refusal },
                    None => ResolveError::NoAddress { host },
                };
                return Err(Box::new(error) as BoxError);
            }
            Ok(allowed.into_iter())
        })
    }
}

type HttpClient = Client<HttpsConnector<HttpConnector<GuardedResolver>>, Full<Bytes>>;

/// What one attempt got back.
#[derive(Debug, Clone, Default)]
pub struct AttemptOutcome {
    pub status: Option<u16>,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub error: Option<String>,
    pub elapsed: Duration,
}

impl AttemptOutcome {
    pub fn is_success(&self) -> bool {
        self.error.is_none() && self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

/// Why an attempt got no answer: `shown` is for the tenant, `detail` (which may name addresses
/// or quote the resolver) for the operator's log only.
struct Failure {
    shown: String,
    detail: Option<String>,
}

impl Failure {
    fn shown(text: impl Into<String>) -> Failure {
        Failure {
            shown: text.into(),
            detail: None,
        }
    }

    /// A client error, with the guard's refusal or a failed lookup found among its causes.
    fn from_client(e: &(dyn std::error::Error + 'static)) -> Failure {
        let mut cause = Some(e);
        while let Some(c) = cause {
            if let Some(resolve) = c.downcast_ref::<ResolveError>() {
                let shown = match resolve {
                    ResolveError::Refused { .. } => NOT_ALLOWED,
                    ResolveError::Lookup { .. } | ResolveError::NoAddress { .. } => UNRESOLVABLE,
                };
                return Failure {
                    shown: shown.into(),
                    detail: Some(resolve.to_string()),
                };
            }
            cause = c.source();
        }
        Failure::shown(error_chain(e))
    }
}

/// The TLS client set-up of every outgoing connection the engine makes (webhook endpoints, the
/// PostgreSQL backend): the ring provider, TLS 1.3 and 1.2, the system roots plus the PEM CA
/// bundles `extra_ca_files` (each must hold at least one certificate).
pub fn tls_client_config(extra_ca_files: &[PathBuf]) -> Result<rustls::ClientConfig, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    for path in extra_ca_files {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| ClientError::CaFile {
                path: path.clone(),
                message: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(ClientError::CaFile {
                path: path.clone(),
                message: "no certificate in the file".into(),
            });
        }
        for cert in certs {
            roots.add(cert).map_err(|e| ClientError::CaFile {
                path: path.clone(),
                message: e.to_string(),
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

pub struct Outbound {
    tls: Arc<rustls::ClientConfig>,
    private_allowlist: Vec<IpNet>,
    timeout: Duration,
    max_body: usize,
    allow_http: bool,
    max_idle: usize,
    /// One pooled client per distinct `ip_allowlist` (almost always just the empty one), since
    /// a pooled connection must only be reused by webhooks whose policy admitted it.
    clients: Mutex<HashMap<Vec<IpNet>, HttpClient>>,
}

impl Outbound {
    pub fn new(
        extra_ca_files: &[PathBuf],
        private_allowlist: Vec<IpNet>,
        timeout: Duration,
        max_body: usize,
        allow_http: bool,
        max_idle: usize,
    ) -> Result<Outbound, ClientError> {
        let tls = tls_client_config(extra_ca_files)?;
        Ok(Outbound {
            tls: Arc::new(tls),
            private_allowlist,
            timeout,
            max_body,
            allow_http,
            max_idle,
            clients: Mutex::new(HashMap::new()),
        })
    }

    fn client_for(&self, pin: &[IpNet]) -> HttpClient {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients
            .entry(pin.to_vec())
            .or_insert_with(|| {
                let resolver = GuardedResolver {
                    policy: Arc::new(AddressPolicy {
                        private_allowlist: self.private_allowlist.clone(),
                        pin: pin.to_vec(),
                    }),
                };
                let mut http = HttpConnector::new_with_resolver(resolver);
                http.enforce_http(false);
                http.set_nodelay(true);
                http.set_connect_timeout(Some(self.timeout));
                let builder =
                    hyper_rustls::HttpsConnectorBuilder::new().with_tls_config((*self.tls).clone());
                let https = if self.allow_http {
                    builder.https_or_http().enable_http1().wrap_connector(http)
                } else {
                    builder.https_only().enable_http1().wrap_connector(http)
                };
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(90))
                    // Keep as many idle connections as attempts can be in flight: closing the
                    // surplus after a burst means a TLS handshake each for the next burst.
                    .pool_max_idle_per_host(self.max_idle)
                    .build(https)
            })
            .clone()
    }

    /// Forgets pooled clients of allowlists no webhook uses any more.
    pub fn prune(&self, keep: &[Vec<IpNet>]) {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients.retain(|k, _| k.is_empty() || keep.contains(k));
    }

    /// POSTs `body` to `url` and reports what came back, within the attempt timeout. A refused
    /// destination or a failed lookup is logged with `delivery` and its detail.
    pub async fn post(
        &self,
        delivery: DeliveryId,
        url: &str,
        pin: &[IpNet],
        headers: Vec<(HeaderName, HeaderValue)>,
        body: Bytes,
    ) -> AttemptOutcome {
        let started = Instant::now();
        let mut outcome = match self.post_inner(url, pin, headers, body).await {
            Ok(o) => o,
            Err(failure) => {
                if let Some(detail) = &failure.detail {
                    tracing::warn!(%delivery, %detail, "attempt not made: {}", failure.shown);
                }
                AttemptOutcome {
                    error: Some(failure.shown),
                    ..Default::default()
                }
            }
        };
        outcome.elapsed = started.elapsed();
        outcome
    }

    async fn post_inner(
        &self,
        url: &str,
        pin: &[IpNet],
        headers: Vec<(HeaderName, HeaderValue)>,
        body: Bytes,
    ) -> Result<AttemptOutcome, Failure> {
        let uri: Uri = url
            .parse()
            .map_err(|e| Failure::shown(format!("invalid URL: {e}")))?;
        let host = uri
            .host()
            .ok_or_else(|| Failure::shown("URL has no host"))?;
        // Literal addresses never reach the resolver, so they are checked here.
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = literal.parse::<IpAddr>() {
            let policy = AddressPolicy {
                private_allowlist: self.private_allowlist.clone(),
                pin: pin.to_vec(),
            };
            policy.check(ip).map_err(|refusal| Failure {
                shown: NOT_ALLOWED.into(),
                detail: Some(format!("refused to connect to {host}: {refusal}")),
            })?;
        }
        let mut request = Request::post(uri);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| Failure::shown(format!("cannot build request: {e}")))?;
        let client = self.client_for(pin);
        let exchange = async {
            let response = client
                .request(request)
                .await
                .map_err(|e| Failure::from_client(&e))?;
            let status = response.status().as_u16();
            let headers = crate::history::cap_headers(response.headers().iter().map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            }));
            let mut body = response.into_body();
            let mut kept: Vec<u8> = Vec::new();
            while kept.len() < self.max_body {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            let room = self.max_body - kept.len();
                            kept.extend_from_slice(&data[..data.len().min(room)]);
                        }
                    }
                    Some(Err(e)) => {
                        return Err(Failure::shown(format!(
                            "reading the response body failed: {}",
                            error_chain(&e)
                        )))
                    }
                    None => break,
                }
            }
            Ok(AttemptOutcome {
                status: Some(status),
                headers,
                body: String::from_utf8_lossy(&kept).into_owned(),
                error: None,
                elapsed: Duration::ZERO,
            })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => {
                let mut outcome = result?;
                if let Some(status) = outcome.status.filter(|s| (300..400).contains(s)) {
                    outcome.error = Some(format!("redirect ({status}) not followed"));
                }
                Ok(outcome)
            }
            Err(_) => Err(Failure::shown(format!(
                "timed out after {} ms",
                self.timeout.as_millis()
            ))),
        }
    }
}

/// An error and its causes on one line, without repeating a cause that says the same.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}
