//! What keeps the server bounded whatever clients do: a connection limit, header and body read timeouts, a
//! write-stall timeout for clients that stop reading, and a graceful shutdown with a deadline.
//!
//! axum's own `serve` gives hyper no timer, so hyper's header read timeout never fires there and a half-sent
//! request holds its connection (and a graceful shutdown) forever. This accept loop drives hyper's HTTP/1
//! connections itself.
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;

/// The limits `serve` runs under (`trt-diff serve --help` names the flags).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Time for a request's head (request line and headers), counted from the first moment the connection waits
    /// for one: an idle keep-alive connection is closed after it too.
    pub header_timeout: Duration,
    /// Time for a request's whole body once its head arrived.
    pub body_timeout: Duration,
    /// How long a write may wait on a client that stopped reading before its connection is dropped.
    pub write_timeout: Duration,
    /// Open connections at most; the ones beyond get a 503 and are closed.
    pub max_connections: usize,
    /// After SIGINT/SIGTERM: time given to requests in progress before the server stops anyway.
    pub shutdown_grace: Duration,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
}

/// Connection counters for `/metrics`.
#[derive(Default)]
pub struct ConnCounters {
    pub open: AtomicU64,
    pub accepted: AtomicU64,
    pub refused: AtomicU64,
    pub timed_out: AtomicU64,
    /// Requests refused by `read_body` (408, 413): counted as requests and errors in /metrics.
    pub bad_bodies: AtomicU64,
}

/// State of the `read_body` middleware.
pub struct BodyGuard {
    pub limits: Arc<Limits>,
    pub counters: Arc<ConnCounters>,
}

/// A socket whose writes fail once they have waited `limit` on a client that does not read.
struct StallGuard {
    io: TcpStream,
    limit: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl StallGuard {
    fn on_pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let limit = self.limit;
        let d = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if d.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading",
            )));
        }
        Poll::Pending
    }
    fn done<T>(&mut self, r: io::Result<T>) -> Poll<io::Result<T>> {
        self.stalled = None;
        Poll::Ready(r)
    }
}

impl AsyncRead for StallGuard {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for StallGuard {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        match Pin::new(&mut me.io).poll_write(cx, buf) {
            Poll::Ready(r) => me.done(r),
            Poll::Pending => me.on_pending(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        match Pin::new(&mut me.io).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => me.done(r),
            Poll::Pending => me.on_pending(cx),
        }
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        match Pin::new(&mut me.io).poll_flush(cx) {
            Poll::Ready(r) => me.done(r),
            Poll::Pending => me.on_pending(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        match Pin::new(&mut me.io).poll_shutdown(cx) {
            Poll::Ready(r) => me.done(r),
            Poll::Pending => me.on_pending(cx),
        }
    }
}

fn json_error(status: StatusCode, message: String) -> Response {
    super::error(status, "invalid_request_error", message)
}

/// Middleware: reads the whole body within `body_timeout` (408 otherwise) and at most `max_body_bytes` (413).
pub async fn read_body(State(guard): State<Arc<BodyGuard>>, req: Request, next: Next) -> Response {
    let limits = &guard.limits;
    let bad = || guard.counters.bad_bodies.fetch_add(1, Ordering::Relaxed);
    let max = limits.max_body_bytes;
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        bad();
        return json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is over the limit of {} KiB; send a shorter prompt",
                max / 1024
            ),
        );
    }
    let (parts, body) = req.into_parts();
    let bytes = match tokio::time::timeout(limits.body_timeout, axum::body::to_bytes(body, max))
        .await
    {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            bad();
            return json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body is over the limit of {} KiB (or was cut off); send a shorter prompt",
                    max / 1024
                ),
            );
        }
        Err(_) => {
            bad();
            let mut r = json_error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s (--body-timeout)",
                    limits.body_timeout.as_secs_f64()
                ),
            );
            r.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            return r;
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// Answers a connection over the limit with a 503 and closes it (within one second whatever the client does).
async fn refuse(mut stream: TcpStream) {
    use tokio::io::AsyncWriteExt;
    let body = r#"{"error":{"message":"too many open connections; retry later","type":"server_error","code":"server_busy"}}"#;
    let msg = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(msg.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting, asks every connection to finish
/// its request in progress and close, and returns after at most `limits.shutdown_grace` (the connections still
/// open then are dropped).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Arc<Limits>,
    counters: Arc<ConnCounters>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            _ = &mut shutdown => break,
            // Reap finished connection tasks so the set does not grow.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of fds and the like: wait a little rather than spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            tasks.spawn(refuse(stream));
            continue;
        };
        counters.accepted.fetch_add(1, Ordering::Relaxed);
        counters.open.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(StallGuard {
            io: stream,
            limit: limits.write_timeout,
            stalled: None,
        });
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut stop = stop_rx.clone();
        let (limits, counters) = (limits.clone(), counters.clone());
        tasks.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(true);
            let conn = builder.serve_connection(io, service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                    conn.as_mut().graceful_shutdown();
                    conn.as_mut().await
                }
            };
            if let Err(e) = result
                && e.is_timeout()
            {
                counters.timed_out.fetch_add(1, Ordering::Relaxed);
            }
            counters.open.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let open = tasks.len();
    if open > 0 {
        tracing::info!(
            "waiting up to {} s for {open} connection(s)",
            limits.shutdown_grace.as_secs_f64()
        );
    }
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "{} connection(s) still open after the {} s grace period: closing them",
            tasks.len(),
            limits.shutdown_grace.as_secs_f64()
        );
        tasks.abort_all();
    }
    Ok(())
}
