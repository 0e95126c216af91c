//! The byte stream under a Modbus client context: [`Transport`] notes what tokio-modbus does
//! not report ([`Seen`]), [`Closed`] stands in while a new connection opens.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context as TaskContext, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the transport saw of the current request, to tell failures apart where tokio-modbus
/// cannot: its TCP client reports a closed connection as `io::Error::last_os_error()`, whose
/// kind says nothing, and its RTU client skips a frame that fails its CRC and waits on, so a
/// corrupted answer ends as a timeout.
#[derive(Debug, Default)]
pub(super) struct Seen {
    /// The other end closed the stream.
    pub(super) eof: AtomicBool,
    /// Bytes read since the last request was written.
    pub(super) answer_bytes: AtomicUsize,
}

/// Gives a byte stream the `Debug` that tokio-modbus's TCP client asks for, and notes what
/// it [`Seen`].
pub(super) struct Transport<Io> {
    pub(super) io: Io,
    pub(super) seen: Arc<Seen>,
}

impl<Io> std::fmt::Debug for Transport<Io> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Transport")
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for Transport<Io> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) {
            let read = buf.filled().len() - before;
            if read == 0 && buf.remaining() > 0 {
                self.seen.eof.store(true, Ordering::Relaxed);
            }
            self.seen.answer_bytes.fetch_add(read, Ordering::Relaxed);
        }
        poll
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Transport<Io> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.seen.answer_bytes.store(0, Ordering::Relaxed);
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A stream that is always at its end: the context's placeholder while a new connection opens.
pub(super) struct Closed;

impl AsyncRead for Closed {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Closed {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
        _: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Err(std::io::ErrorKind::NotConnected.into()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
