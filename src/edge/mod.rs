//! The HTTP edge: accepts connections for the API listener (plain or rustls TLS) and for
//! `/metrics`, hands each request to a [`Handler`], and shuts both down gracefully. It knows
//! neither the API nor the dashboard: [`router::Router`] splits the API listener's requests by
//! path between two handlers the engine builds at start (`/ui…` and `GET /` to the dashboard,
//! the rest to the JSON API), after refusing a `Host` that is not ours ([`hosts`]).
//!
//! A connection permit is taken before each accept (at most `MAX_CONNECTIONS` open at once),
//! every connection is served by hyper's (1.x) HTTP/1.1 server with a bound on the request head
//! size and on the time to read it (slowloris), and each request carries its peer and local
//! addresses as extensions ([`ClientAddr`], [`LocalAddr`]). A front end reads a body with
//! [`read_body`], which bounds its size (`server.max_body_bytes`, 413) and the time to read it
//! (`server.body_read_timeout`, 408); a 408 or 413 carries `Connection: close`. Every accepted
//! TCP stream is wrapped (below TLS) for a lingering close ([`linger`], for at most the body
//! timeout or 5 s, whichever is less), so that an answer given before the request's body was
//! read reaches a client that sends its whole body before reading; the same wrapper cuts off a
//! client that stops reading (`server.send_timeout`). On shutdown the accept loop stops, open
//! connections finish the request they are serving, and the call returns once they are closed
//! or the drain deadline passes.

pub mod forwarded;
pub mod hosts;
pub mod linger;
pub mod router;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::config::ServerConfig;
use linger::Lingering;

const MAX_CONNECTIONS: usize = 16_384;
const MAX_HEAD_BYTES: usize = 64 * 1024;
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("server.tls_cert/server.tls_key: {0}")]
    Config(String),
}

/// A rustls acceptor for the API from PEM files.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsSetupError> {
    let file_err = |path: &Path, message: String| TlsSetupError::File {
        path: path.display().to_string(),
        message,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| file_err(cert, format!("cannot read certificates: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(cert, "no certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| file_err(key, format!("cannot read private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsSetupError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsSetupError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The peer address of the connection a request came on (a request extension).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub std::net::SocketAddr);

/// The client address of a request (loopback for a request built without [`serve`], as in
/// tests): what the API's failed-authentication guard and the dashboard's sign-in limit count.
pub fn client_ip<B>(req: &Request<B>) -> std::net::IpAddr {
    req.extensions()
        .get::<ClientAddr>()
        .map_or(std::net::IpAddr::from([127, 0, 0, 1]), |a| a.0.ip())
}

/// The engine's own address of the connection a request came on (a request extension): on a
/// wildcard listener, the one address of the machine the client used ([`hosts`]).
#[derive(Debug, Clone, Copy)]
pub struct LocalAddr(pub std::net::SocketAddr);

/// What browsers are told on every answer over TLS: use HTTPS only for this host for a year,
/// so that a network attacker cannot downgrade a later visit to plain HTTP.
const HSTS: &str = "max-age=31536000";

/// Something that answers requests: the API, the dashboard, the [`router::Router`] over both,
/// or the metrics page.
pub trait Handler: Clone + Send + Sync + 'static {
    /// The response body: one buffer for most answers, a stream for a backup.
    type Body: hyper::body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + 'static;

    fn call(
        &self,
        req: Request<Incoming>,
    ) -> impl std::future::Future<Output = Response<Self::Body>> + Send;
}

/// How long a connection may take over the parts of a request, and linger when it closes.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// `server.header_read_timeout`: the request head, and the idle time between requests.
    pub header_read: Duration,
    /// How long a closing connection reads and discards what the client still sends.
    pub linger: Duration,
    /// `server.send_timeout`: how long an answer may go unread before the connection is cut.
    pub send: Duration,
}

impl Timeouts {
    pub fn from_config(server: &ServerConfig) -> Timeouts {
        Timeouts {
            header_read: server.header_read_timeout,
            // No longer than the engine would have waited for a whole body.
            linger: server.body_read_timeout.min(linger::MAX_TIME),
            send: server.send_timeout,
        }
    }
}

/// A 408 or 413 leaves the request's body unread, so the connection cannot carry another
/// request; saying so lets the client stop sending and not reuse it.
fn close_after_unread_body<B>(response: &mut Response<B>) {
    if matches!(
        response.status(),
        StatusCode::REQUEST_TIMEOUT | StatusCode::PAYLOAD_TOO_LARGE
    ) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

/// Serves `listener` until `shutdown` turns true, then drains.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: H,
    timeouts: Timeouts,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = shutdown.changed() => break,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok();
        let stream = Lingering::new(stream, timeouts.linger, shutdown.clone())
            .with_send_timeout(timeouts.send);
        let tls_on = tls.is_some();
        let handler = handler.clone();
        let builder = {
            let mut b = http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(timeouts.header_read)
                .max_buf_size(MAX_HEAD_BYTES)
                // One write per response (head and body copied into one buffer) instead of a
                // vectored write of queued pieces: responses are small, and the load bench
                // measured single-event ingest 59 k -> 67 k/s with it.
                .writev(false)
                .keep_alive(true);
            b
        };
        let service = service_fn(move |mut req: Request<Incoming>| {
            let handler = handler.clone();
            // The dashboard limits failed sign-ins per client address.
            req.extensions_mut().insert(ClientAddr(peer));
            if let Some(local) = local {
                req.extensions_mut().insert(LocalAddr(local));
            }
            async move {
                let mut response = handler.call(req).await;
                close_after_unread_body(&mut response);
                if tls_on {
                    response.headers_mut().insert(
                        header::STRICT_TRANSPORT_SECURITY,
                        HeaderValue::from_static(HSTS),
                    );
                }
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        match &tls {
            None => {
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                let watched = graceful.watch(conn);
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Err(e) = watched.await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let graceful_watch = graceful.watcher();
                tokio::spawn(async move {
                    let _permit = permit;
                    let tls_stream =
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        };
                    let conn = builder.serve_connection(TokioIo::new(tls_stream), service);
                    if let Err(e) = graceful_watch.watch(conn).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_DEADLINE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain deadline; closing them");
    }
}

/// Binds a listener, naming the address on failure.
/// The API listener's TLS, if `server.tls_cert` and `server.tls_key` are set.
pub fn server_tls(
    server: &crate::config::ServerConfig,
) -> Result<Option<TlsAcceptor>, crate::StartError> {
    match (&server.tls_cert, &server.tls_key) {
        (Some(cert), Some(key)) => tls_acceptor(cert, key)
            .map(Some)
            .map_err(|e| crate::StartError::Config(e.to_string())),
        _ => Ok(None),
    }
}

/// An address in use is asked again for up to [`BIND_RETRY`]: a standby that just took the
/// lease closed its forwarding listener on the same address a moment before.
pub async fn bind(addr: SocketAddr, key: &str) -> Result<TcpListener, crate::StartError> {
    let deadline = tokio::time::Instant::now() + BIND_RETRY;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && addr.port() != 0
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                return Err(crate::StartError::Config(format!(
                    "{key} = \"{addr}\": cannot listen: {e}"
                )))
            }
        }
    }
}

/// How long [`bind`] asks again for an address in use.
const BIND_RETRY: Duration = Duration::from_secs(1);

/// Why a request body could not be read; each front end renders it in its own format.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request bodies are limited to {limit} bytes (server.max_body_bytes)")]
    TooLarge { limit: usize },
    #[error("the request body did not arrive within {} ms (server.body_read_timeout)", .after.as_millis())]
    TimedOut { after: Duration },
    #[error("could not read the request body: {0}")]
    Unreadable(String),
}

/// Reads a request's whole body, at most `server.max_body_bytes` of it (a `Content-Length`
/// over the limit is refused before any byte is read) within `server.body_read_timeout`.
pub async fn read_body(req: Request<Incoming>, server: &ServerConfig) -> Result<Bytes, BodyError> {
    let limit = server.max_body_bytes;
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(BodyError::TooLarge { limit });
        }
    }
    // One deadline for the whole body, not per read: a client trickling a byte now and then
    // would otherwise hold its connection and buffer indefinitely. Dropping the read frees what
    // was buffered; the connection then closes (see `close_after_unread_body`).
    let deadline = server.body_read_timeout;
    let read = Limited::new(req.into_body(), limit).collect();
    let Ok(read) = tokio::time::timeout(deadline, read).await else {
        return Err(BodyError::TimedOut { after: deadline });
    };
    match read {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(BodyError::TooLarge { limit })
        }
        Err(e) => Err(BodyError::Unreadable(e.to_string())),
    }
}
