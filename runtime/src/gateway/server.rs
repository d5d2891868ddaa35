//! The node's HTTP/1 server: the API's router on hyper connections, with a
//! limit on how long a client may take to send a request's head (a client
//! that trickles it in would otherwise hold its connection forever) and to
//! take the next bytes of its response, and a graceful stop: no new
//! connections, and open ones close once their request in progress is
//! answered.

use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::IdleTimer;

/// How long a client may take to send a request line and headers; also
/// how long an idle keep-alive connection stays open.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Most bytes of a request's line and headers (431 past it; hyper's own
/// limit, without this, is its whole read buffer, ~400 KiB).
const MAX_HEAD: usize = 128 * 1024;
/// How long a client may leave the response unread (its connection's
/// buffers full) before the connection is closed.
const WRITE_IDLE: Duration = Duration::from_secs(60);

/// Serves `router` on `listener` until `stop` turns true, then until every
/// open connection has answered its request in progress.
pub(crate) async fn serve(listener: TcpListener, router: axum::Router, stop: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    let mut stopping = stop.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopping.wait_for(|stop| *stop) => break,
            Some(_) = connections.join_next() => continue,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            // The client gave up before its connection was taken.
            Err(e) if matches!(e.kind(), ConnectionAborted | ConnectionReset | ConnectionRefused) => continue,
            Err(e) => {
                // Out of file descriptors, say: wait for some to close.
                tracing::warn!("failed to accept a connection: {e}; trying again in 1s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stopping.wait_for(|stop| *stop) => break,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let mut stop = stop.clone();
        connections.spawn(async move {
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_header_size(MAX_HEAD)
                .serve_connection(TokioIo::new(WriteDeadline::new(stream, WRITE_IDLE)), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                _ = stop.wait_for(|stop| *stop) => connection.as_mut().graceful_shutdown(),
            }
            let _ = connection.await;
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// A connection whose writes fail once one has waited `idle` for the client
/// to make room: a client that stops reading its response would otherwise
/// hold the connection, and what is buffered for it, forever.
struct WriteDeadline<S> {
    inner: S,
    idle: IdleTimer,
}

impl<S> WriteDeadline<S> {
    fn new(inner: S, idle: Duration) -> Self {
        Self { inner, idle: IdleTimer::new(idle) }
    }

    /// Passes on `polled`, or the timeout once a write has waited `idle`.
    fn watch<T>(&mut self, polled: Poll<std::io::Result<T>>, cx: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        if !self.idle.ran_out(polled.is_ready(), cx) {
            return polled;
        }
        let idle = crate::config::format_duration(self.idle.after());
        let message = format!("the client read nothing more of its response for {idle}");
        Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, message)))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(polled, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(polled, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test]
    async fn a_client_that_stops_reading_fails_the_write_and_one_that_reads_does_not() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut conn = WriteDeadline::new(near, Duration::from_secs(2));
        // Read slowly but steadily, well past the idle time in all.
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 1024];
            while got < 8 * 1024 {
                tokio::time::sleep(Duration::from_millis(250)).await;
                got += far.read(&mut buf).await.unwrap();
            }
            far
        });
        conn.write_all(&[7u8; 8 * 1024]).await.expect("a reading client is written to");
        let far = reader.await.unwrap();
        // Now it reads no more: the write waits out the idle time and fails.
        let error = conn.write_all(&[7u8; 4 * 1024]).await.expect_err("a client that reads nothing fails the write");
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(error.to_string(), "the client read nothing more of its response for 2s");
        drop(far);
    }
}
