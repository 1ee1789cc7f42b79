//! Lingering close: the connection's socket, which on shutdown reads and discards what the
//! client still sends (bounded in bytes and time) before it is closed.
//!
//! A server that closes a TCP socket with unread data in its receive buffer makes the kernel
//! send a reset, and the reset destroys the answer the client has not read yet. That is what
//! happens whenever the engine answers before reading a whole request body — a 413 over
//! `server.max_body_bytes`, a 401 before the body is looked at — and the client is one that
//! sends its whole body before it reads (Python's `urllib`/`requests`, Java's
//! `HttpURLConnection`): it gets a broken pipe instead of the answer. hyper calls
//! `poll_shutdown` once the last response is written; [`Lingering`] then shuts the write side
//! (the client sees the end of the answer), and reads and discards until the client closes too,
//! [`MAX_BYTES`] have been discarded, the linger time has passed, or the engine shuts down
//! (so that a client holding its socket open cannot delay the drain) — the scheme of nginx's
//! `lingering_close`. Reads and writes before that pass straight through, except that a
//! client which accepts no byte of an answer for the send timeout (`server.send_timeout`) is
//! cut off with an error: otherwise a reader that stops — say in the middle of a streamed
//! backup — holds the connection, what was queued for it, and whatever feeds it, forever.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Sleep;

/// At most this much of an unwanted body is read and thrown away before the socket is closed.
pub const MAX_BYTES: usize = 16 << 20;
/// The longest a closing connection lingers (shortened to `server.body_read_timeout`).
pub const MAX_TIME: Duration = Duration::from_secs(5);

type Stop = Pin<Box<dyn Future<Output = ()> + Send>>;

enum State {
    Open,
    Draining {
        deadline: Pin<Box<Sleep>>,
        stop: Stop,
        discarded: usize,
    },
    Closed,
}

/// A connection's stream (TCP, below TLS) that lingers on shutdown.
pub struct Lingering<S> {
    inner: S,
    linger: Duration,
    /// The engine's shutdown signal: lingering ends when it turns true.
    engine_shutdown: watch::Receiver<bool>,
    state: State,
    send_timeout: Option<Duration>,
    /// Running while writes make no progress; reset by every byte the client accepts.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> Lingering<S> {
    pub fn new(inner: S, linger: Duration, engine_shutdown: watch::Receiver<bool>) -> Self {
        Lingering {
            inner,
            linger,
            engine_shutdown,
            state: State::Open,
            send_timeout: None,
            stalled: None,
        }
    }

    /// Cuts the connection off when a write makes no progress for `timeout`.
    pub fn with_send_timeout(mut self, timeout: Duration) -> Self {
        self.send_timeout = Some(timeout);
        self
    }

    /// Passes a write's outcome on, timing how long writes stay pending.
    fn watch_progress<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Pending => {
                let Some(timeout) = self.send_timeout else {
                    return Poll::Pending;
                };
                let stalled = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if stalled.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client read nothing of the answer within server.send_timeout",
                    )));
                }
                Poll::Pending
            }
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Lingering<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Lingering<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch_progress(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch_progress(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch_progress(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Open => {
                    ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
                    let mut engine_shutdown = this.engine_shutdown.clone();
                    this.state = State::Draining {
                        deadline: Box::pin(tokio::time::sleep(this.linger)),
                        // A closed channel means the engine is gone: stop as well.
                        stop: Box::pin(async move {
                            let _ = engine_shutdown.wait_for(|stopping| *stopping).await;
                        }),
                        discarded: 0,
                    };
                }
                State::Draining {
                    deadline,
                    stop,
                    discarded,
                } => {
                    if deadline.as_mut().poll(cx).is_ready() || stop.as_mut().poll(cx).is_ready() {
                        this.state = State::Closed;
                        continue;
                    }
                    let mut scratch = [0u8; 8192];
                    let mut buf = ReadBuf::new(&mut scratch);
                    match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                            *discarded += buf.filled().len();
                            if *discarded >= MAX_BYTES {
                                this.state = State::Closed;
                            }
                        }
                        // The client closed (or broke) its side: nothing left to protect.
                        Poll::Ready(_) => this.state = State::Closed,
                    }
                }
                State::Closed => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn shutdown_discards_until_the_peer_closes() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (_engine, running) = watch::channel(false);
        let mut server = Lingering::new(server, Duration::from_secs(5), running);
        let (mut client_rx, mut client_tx) = tokio::io::split(client);
        let writer = tokio::spawn(async move {
            // More than the pipe holds: only a server that reads lets this finish.
            client_tx.write_all(&vec![7u8; 1 << 20]).await.unwrap();
            client_tx.shutdown().await.unwrap();
        });
        server.write_all(b"answer").await.unwrap();
        server.shutdown().await.unwrap();
        writer.await.unwrap();
        let mut got = Vec::new();
        client_rx.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"answer");
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_gives_up_after_the_linger_time() {
        let (_client, server) = tokio::io::duplex(1024);
        let (_engine, running) = watch::channel(false);
        let mut server = Lingering::new(server, Duration::from_millis(300), running);
        let started = tokio::time::Instant::now();
        server.shutdown().await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_gives_up_when_the_engine_stops() {
        let (_client, server) = tokio::io::duplex(1024);
        let (engine, running) = watch::channel(false);
        let mut server = Lingering::new(server, Duration::from_secs(5), running);
        let started = tokio::time::Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            engine.send_replace(true);
        });
        server.shutdown().await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_reads_nothing_is_cut_off_and_a_slow_one_is_not() {
        let (client, server) = tokio::io::duplex(1024);
        let (_engine, running) = watch::channel(false);
        let mut server = Lingering::new(server, Duration::from_secs(5), running)
            .with_send_timeout(Duration::from_secs(30));
        let (mut client_rx, _client_tx) = tokio::io::split(client);
        let reader = tokio::spawn(async move {
            // Reads a little every 20 s for a while, then stops reading.
            let mut buf = [0u8; 512];
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                client_rx.read_exact(&mut buf).await.unwrap();
            }
            client_rx
        });
        let started = tokio::time::Instant::now();
        let chunk = [1u8; 256];
        let err = loop {
            if let Err(e) = server.write_all(&chunk).await {
                break e;
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // Five reads 20 s apart kept it going; then 30 s without progress ended it.
        assert!(
            started.elapsed() >= Duration::from_secs(130),
            "{:?}",
            started.elapsed()
        );
        assert!(
            started.elapsed() <= Duration::from_secs(131),
            "{:?}",
            started.elapsed()
        );
        drop(reader.await.unwrap());
    }

    #[tokio::test]
    async fn shutdown_gives_up_after_max_bytes() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (_engine, running) = watch::channel(false);
        let mut server = Lingering::new(server, Duration::from_secs(3600), running);
        let (_client_rx, mut client_tx) = tokio::io::split(client);
        // A client that never stops sending.
        let _writer = tokio::spawn(async move {
            let chunk = vec![0u8; 64 * 1024];
            while client_tx.write_all(&chunk).await.is_ok() {}
        });
        tokio::time::timeout(Duration::from_secs(30), server.shutdown())
            .await
            .expect("stopped discarding after MAX_BYTES")
            .unwrap();
    }
}
