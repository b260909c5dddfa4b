//! The response body type every step of the engine answers with: an
//! upstream's streamed body or a buffered one (synthetic, direct or
//! redirect responses).

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// `body`, with its request's metrics and access-log line recorded when
/// it ends or is dropped (a client that goes away mid-body: what was
/// sent), with the bytes of its data frames and its trailers' gRPC status.
pub fn counted(body: Body, done: crate::metrics::Completion) -> Body {
    Counted { inner: body, done: Some(done), sent: 0 }.boxed()
}

struct Counted {
    inner: Body,
    done: Option<crate::metrics::Completion>,
    sent: u64,
}

impl Counted {
    /// Records the request, once.
    fn record(&mut self) {
        if let Some(done) = self.done.take() {
            done.record(self.sent);
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.record();
    }
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.sent += d.len() as u64;
                } else if let Some(t) = frame.trailers_ref() {
                    if let Some(done) = self.done.as_mut() {
                        done.trailers(t);
                    }
                }
            }
            // The end: recorded now rather than whenever the connection
            // lets go of the body.
            std::task::Poll::Ready(None) => self.record(),
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A complete, in-memory body.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A downstream connection's I/O that notes when a byte last moved
/// (milliseconds after `born`), for the idle timeout.
pub struct Activity<I> {
    inner: I,
    last: std::sync::Arc<std::sync::atomic::AtomicU64>,
    born: std::time::Instant,
}

impl<I> Activity<I> {
    pub fn new(inner: I, last: std::sync::Arc<std::sync::atomic::AtomicU64>, born: std::time::Instant) -> Self {
        Activity { inner, last, born }
    }

    fn touch(&self) {
        self.last.store(self.born.elapsed().as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Activity<I> {
    fn poll_read(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Activity<I> {
    fn poll_write(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A TCP stream's client side, its bytes counted in its metrics (read:
/// from the client; written: to it).
pub struct Metered<I> {
    inner: I,
    conn: Option<crate::metrics::TcpConn>,
}

impl<I> Metered<I> {
    pub fn new(inner: I, conn: Option<crate::metrics::TcpConn>) -> Self {
        Metered { inner, conn }
    }
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Metered<I> {
    fn poll_read(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if let (Some(c), true) = (self.conn.as_mut(), n > 0) {
            c.received(n as u64);
        }
        r
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Metered<I> {
    fn poll_write(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let (Some(c), std::task::Poll::Ready(Ok(n))) = (self.conn.as_mut(), &r) {
            c.sent(*n as u64);
        }
        r
    }

    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
