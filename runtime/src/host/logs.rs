//! Capture of a guest's stdout and stderr, drained after every task.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Bytes kept per stream per task; the rest is dropped with a marker, never
/// failing the guest.
pub(crate) const LOG_CAPACITY: usize = 64 * 1024;

/// One captured stream. Clones share the buffer.
#[derive(Clone, Default)]
pub(crate) struct LogPipe {
    inner: Arc<Mutex<Captured>>,
}

#[derive(Default)]
struct Captured {
    bytes: Vec<u8>,
    dropped: usize,
}

impl LogPipe {
    /// Takes what was written since the last call.
    pub(crate) fn take(&self) -> Vec<u8> {
        let mut inner = self.inner.lock().unwrap();
        let mut bytes = std::mem::take(&mut inner.bytes);
        if inner.dropped > 0 {
            bytes.extend_from_slice(format!("\n[{} bytes of output dropped]\n", inner.dropped).as_bytes());
            inner.dropped = 0;
        }
        bytes
    }

    fn append(&self, buf: &[u8]) {
        let mut inner = self.inner.lock().unwrap();
        let room = LOG_CAPACITY.saturating_sub(inner.bytes.len());
        let kept = buf.len().min(room);
        inner.bytes.extend_from_slice(&buf[..kept]);
        inner.dropped += buf.len() - kept;
    }
}

impl IsTerminal for LogPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Pollable for LogPipe {
    async fn ready(&mut self) {}
}

impl OutputStream for LogPipe {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(LOG_CAPACITY)
    }
}

impl tokio::io::AsyncWrite for LogPipe {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.append(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_drains_and_reports_dropped_bytes() {
        let pipe = LogPipe::default();
        pipe.append(b"hello\n");
        assert_eq!(pipe.take(), b"hello\n");
        assert!(pipe.take().is_empty());
        pipe.append(&vec![b'x'; LOG_CAPACITY + 10]);
        let taken = pipe.take();
        assert!(String::from_utf8_lossy(&taken).contains("[10 bytes of output dropped]"));
    }
}
