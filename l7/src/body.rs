//! The response body type every step of the engine answers with: an
//! upstream's streamed body or a buffered one (synthetic, direct or
//! redirect responses).

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// `body`, with the bytes of its data frames observed in `size` when it
/// ends or is dropped (a client that goes away mid-body: what was sent).
pub fn counted(body: Body, size: prometheus::Histogram) -> Body {
    Counted { inner: body, size, sent: 0 }.boxed()
}

struct Counted {
    inner: Body,
    size: prometheus::Histogram,
    sent: u64,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.size.observe(self.sent as f64);
    }
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &r {
            if let Some(d) = frame.data_ref() {
                self.sent += d.len() as u64;
            }
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
