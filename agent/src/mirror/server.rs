//! The HTTP server under the mirror (and the health endpoints), with the limits a server that any pod on the node
//! may reach needs: a cap on open connections (accepting stops at the cap), a deadline for each request's headers
//! that also closes idle keep-alive connections, small per-connection read buffers, HTTP/2 with few concurrent
//! streams and small windows, and a response whose client reads nothing for `stall_timeout` is dropped (its
//! buffered chunk freed). What a response may hold in memory is bounded separately (`resolver/body.rs`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

/// Largest request head (and HTTP/1 read buffer) accepted: OCI requests are a line and a few headers (a bearer
/// token can be a few KiB).
const MAX_HEAD: usize = 64 << 10;
/// Concurrent HTTP/2 streams per connection.
const MAX_STREAMS: u32 = 32;
/// HTTP/2 flow-control windows: what a client may have us buffer for it.
const STREAM_WINDOW: u32 = 256 << 10;
const CONNECTION_WINDOW: u32 = 1 << 20;

/// The limits of one server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once; accepting pauses at the cap.
    pub max_connections: usize,
    /// A request's headers must arrive within this (counted from when the connection is ready for one, so an
    /// idle keep-alive connection is closed after it too).
    pub header_timeout: Duration,
    /// A response the client reads nothing of for this long is dropped.
    pub stall_timeout: Duration,
}

/// Serves `app` on `listener` within `limits` until `stop`, then lets open connections finish their responses
/// (the caller bounds that wait) and returns once they have.
pub async fn serve(listener: TcpListener, app: Router, limits: Limits, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let conns = TaskTracker::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).max_buf_size(MAX_HEAD);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buf_size(STREAM_WINDOW as usize)
        .max_header_list_size(MAX_HEAD as u32)
        .keep_alive_interval(limits.header_timeout)
        .keep_alive_timeout(limits.header_timeout);
    let builder = Arc::new(builder);
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("the connection semaphore is never closed"),
            () = stop.cancelled() => break,
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "accepting a client connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        // Headers and small bodies go out at once (no waiting for the client's delayed ACK).
        let _ = tcp.set_nodelay(true);
        let io = TokioIo::new(StallGuard::new(tcp, limits.stall_timeout));
        let service = TowerToHyperService::new(app.clone().map_request(|r: http::Request<Incoming>| r.map(Body::new)));
        let (builder, stop) = (builder.clone(), stop.clone());
        conns.spawn(async move {
            let _slot = slot;
            let conn = builder.serve_connection_with_upgrades(io, service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "client connection ended with an error");
            }
        });
    }
    conns.close();
    conns.wait().await;
}

/// A connection whose writes may wait for the client for at most `stall`: a client that reads nothing for that
/// long gets its connection closed (freeing what its response had buffered).
#[derive(Debug)]
struct StallGuard<T> {
    io: T,
    stall: Duration,
    /// Running while a write waits for the client.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> StallGuard<T> {
    fn new(io: T, stall: Duration) -> Self {
        Self { io, stall, deadline: None }
    }

    /// Turns a write's `Pending` into an error once the client has read nothing for `stall`.
    fn waiting<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let stall = self.stall;
        let deadline = self.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {stall:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progressed<R>(&mut self, r: Poll<io::Result<R>>, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        match r {
            Poll::Pending => self.waiting(cx),
            r => {
                self.deadline = None;
                r
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StallGuard<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StallGuard<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.progressed(r, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.progressed(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.progressed(r, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_never_reads_fails_after_the_stall_timeout() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut guarded = StallGuard::new(a, Duration::from_secs(5));
        // Fills the pipe, then waits for a reader that never comes.
        let started = tokio::time::Instant::now();
        let err = guarded.write_all(&[0u8; 8192]).await.expect_err("the peer never reads");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_secs(5));
        // A reader that keeps up is never cut off, however long the transfer takes.
        let (a, b2) = tokio::io::duplex(1024);
        let mut guarded = StallGuard::new(a, Duration::from_secs(5));
        let reader = tokio::spawn(async move {
            let mut b2 = b2;
            let mut buf = [0u8; 512];
            let mut total = 0;
            while total < 64 << 10 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                total += b2.read(&mut buf).await.expect("reads");
            }
        });
        guarded.write_all(&vec![1u8; 64 << 10]).await.expect("a slow but steady reader is served");
        reader.await.expect("the reader finished");
        let _ = b.read(&mut [0u8; 1]).await;
    }
}
