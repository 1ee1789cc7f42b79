//! Operator routes that do not fit the JSON request/response shape: `POST /v1/admin/backup`
//! streams a consistent snapshot of the store.
//!
//! The request enters from [`super::handle_streaming`] before the JSON router (its answer is a
//! stream, not one buffer). After the admin check, the snapshot starts at once (so a second
//! backup gets its 409 before any byte is sent), a blocking thread writes the stream
//! (`store::embedded::backup`) into a bounded channel of 8 × 64 KiB chunks, and the response
//! body reads that channel: a slow client slows the backup, never the engine's memory. A
//! client that goes away ends the backup and its change tracking.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Either;
use hyper::body::{Frame, Incoming};
use tokio::sync::mpsc;

use super::{authenticate, error_response, ApiBody, ApiState};
use crate::domain::Refusal;
use crate::store::embedded::backup::BackupError;

/// The route's path.
pub const BACKUP_PATH: &str = "/v1/admin/backup";
/// The media type of a backup stream.
pub const BACKUP_CONTENT_TYPE: &str = "application/vnd.kyberhook.backup";
/// Chunks in flight between the backup thread and the client.
const CHUNKS_IN_FLIGHT: usize = 8;
const CHUNK_BYTES: usize = 64 << 10;

/// A response body fed by a channel; an `Err` item aborts the response (the client sees a
/// truncated stream, which the backup's trailer makes detectable).
pub struct Streamed(mpsc::Receiver<io::Result<Bytes>>);

impl hyper::body::Body for Streamed {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|item| item.map(|r| r.map(Frame::data)))
    }
}

/// Whether a path is the backup route (the JSON router never sees it).
pub fn is_backup_route(path: &str) -> bool {
    path.trim_end_matches('/') == BACKUP_PATH
}

/// `POST /v1/admin/backup`.
pub async fn backup(state: Arc<ApiState>, req: Request<Incoming>) -> Response<ApiBody> {
    let started = Instant::now();
    let response = match start_backup(&state, &req).await {
        Ok(body) => Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, BACKUP_CONTENT_TYPE)
            .header(
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"kyberhook.backup\"",
            )
            .body(Either::Right(body))
            .expect("static response parts are valid"),
        Err(e) => error_response(&e).map(Either::Left),
    };
    let status = response.status().as_u16().to_string();
    metrics::counter!("kyberhook_api_requests_total", "route" => BACKUP_PATH, "status" => status)
        .increment(1);
    metrics::histogram!("kyberhook_api_request_duration_seconds", "route" => BACKUP_PATH)
        .record(started.elapsed().as_secs_f64());
    response
}

async fn start_backup(state: &ApiState, req: &Request<Incoming>) -> Result<Streamed, Refusal> {
    if req.method() != Method::POST {
        return Err(Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{} is not allowed on {BACKUP_PATH}", req.method()),
        ));
    }
    authenticate(state, req)?.require_admin()?;
    // The route takes no options: a body is input it would silently ignore.
    let has_body = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() != b"0")
        || req.headers().contains_key(header::TRANSFER_ENCODING);
    if has_body {
        return Err(Refusal::bad_request(
            "invalid_request",
            format!("POST {BACKUP_PATH} takes no request body"),
        ));
    }
    // Closing the write gate waits for writes in progress: not on an async worker.
    let store = state.services.store.clone();
    let begun = tokio::task::spawn_blocking(move || store.begin_backup())
        .await
        .map_err(|e| Refusal::internal(e.to_string()))?;
    let snapshot = begun.map_err(|e| match e {
        BackupError::InProgress => Refusal::new(
            StatusCode::CONFLICT,
            "backup_in_progress",
            "a backup is already running; try again when it has finished",
        ),
        BackupError::NotThisBackend(why) => {
            Refusal::new(StatusCode::CONFLICT, "backup_not_available", why)
        }
        other => Refusal::internal(other.to_string()),
    })?;
    let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut out = ChannelWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(CHUNK_BYTES),
        };
        match snapshot.write_to(&mut out) {
            Ok(summary) => tracing::info!(
                records = summary.records,
                rounds = summary.rounds,
                held_keys = summary.held_keys,
                seconds = started.elapsed().as_secs_f64(),
                "backup streamed"
            ),
            Err(BackupError::Write(e)) => {
                tracing::warn!(error = %e, "backup abandoned: the client went away")
            }
            Err(e) => {
                tracing::error!(error = %e, "backup failed");
                let _ = tx.blocking_send(Err(io::Error::other(e.to_string())));
            }
        }
    });
    Ok(Streamed(rx))
}

/// Hands a blocking writer's bytes to the response body in chunks, waiting for room.
struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_BYTES));
        self.tx
            .blocking_send(Ok(Bytes::from(chunk)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
    }
}

impl io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK_BYTES {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}
