//! A minimal HTTP/1.1 client (hyper `client::conn::http1` on one keep-alive connection), the
//! set-up calls to the engine's API, and the `/metrics` page. Everything the bench sends goes
//! through here, to 127.0.0.1 only.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

pub const ADMIN: &str = "bench-admin-token-0123456789abcdef";
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub type Sender = SendRequest<Full<Bytes>>;

pub async fn connect(addr: SocketAddr) -> Result<Sender, String> {
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// An answer: status, `Retry-After` in seconds if given, body.
pub struct Answer {
    pub status: StatusCode,
    pub retry_after: Option<u64>,
    pub body: Bytes,
}

pub async fn send(sender: &mut Sender, req: Request<Full<Bytes>>) -> Result<Answer, String> {
    let fut = async {
        sender.ready().await.map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>(Answer {
            status,
            retry_after,
            body,
        })
    };
    tokio::time::timeout(REQUEST_TIMEOUT, fut)
        .await
        .map_err(|_| "request timed out".to_string())?
}

pub fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<Bytes>,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("authorization", format!("Bearer {ADMIN}"));
    if body.is_some() {
        b = b.header("content-type", "application/json");
    }
    b.body(Full::new(body.unwrap_or_default()))
        .expect("a request from valid parts")
}

/// One request on a fresh connection (set-up calls, control calls and metric scrapes).
pub async fn once(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<Bytes>,
) -> (StatusCode, Bytes) {
    let mut s = connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let a = send(&mut s, request(addr, method, path, body))
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    (a.status, a.body)
}

/// An API call that must answer `want`; its JSON body.
pub async fn api_json(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<Value>,
    want: StatusCode,
) -> Value {
    let body = body.map(|v| Bytes::from(v.to_string()));
    let (status, bytes) = once(addr, method, path, body).await;
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    assert_eq!(status, want, "{path}: {v}");
    v
}

/// One scrape of the engine's `/metrics` page.
#[derive(Debug, Clone, Default)]
pub struct Scrape(String);

impl Scrape {
    pub async fn get(addr: SocketAddr) -> Scrape {
        let (_, body) = once(addr, Method::GET, "/metrics", None).await;
        Scrape(String::from_utf8_lossy(&body).into_owned())
    }

    /// Sum over the series of `name` whose labels contain `filter` (if given).
    pub fn sum(&self, name: &str, filter: Option<&str>) -> f64 {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .filter(|(series, _)| {
                let (n, labels) = match series.find('{') {
                    Some(i) => (&series[..i], &series[i..]),
                    None => (*series, ""),
                };
                n == name && filter.map_or(true, |f| labels.contains(f))
            })
            .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
            .sum()
    }
}
