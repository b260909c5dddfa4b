//! `/events`: this process's access events (`skiff_core::logging::events`)
//! as a stream of JSON lines, for `skiff observe`. The first line says the
//! stream is live (`{"event":"subscribed",…}`); a reader that falls behind
//! loses the oldest events and gets `{"event":"dropped","count":N}` in
//! their place. Nothing here ever makes the data path wait: events are
//! published into a bounded ring whatever the readers do.

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Body, Frame};
use tokio::sync::{broadcast::error::RecvError, mpsc};

/// The response body: lines as they come.
pub struct EventsBody(mpsc::Receiver<Bytes>);

impl Body for EventsBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|line| line.map(|b| Ok(Frame::data(b))))
    }
}

/// The answer to `GET /events` on an admin port: the stream, or 503 when
/// [`skiff_core::logging::EVENTS_READERS`] already read.
pub fn response(proxy: String) -> http::Response<http_body_util::combinators::BoxBody<Bytes, Infallible>> {
    use http_body_util::BodyExt as _;
    let r = match subscribe(proxy) {
        Some(body) => http::Response::builder().header("content-type", "application/x-ndjson").body(body.boxed()),
        None => http::Response::builder()
            .status(http::StatusCode::SERVICE_UNAVAILABLE)
            .header("content-type", "text/plain")
            .body(http_body_util::Full::new(Bytes::from(format!("too many /events readers (at most {})\n", skiff_core::logging::EVENTS_READERS))).boxed()),
    };
    r.expect("a constant status and header")
}

/// Subscribes to the access events of this process, as `proxy` (what the
/// reader is told it is reading: `ztunnel node-1`, `waypoint shop/waypoint`).
/// Must be called inside a Tokio runtime.
/// None when [`skiff_core::logging::EVENTS_READERS`] already read.
pub fn subscribe(proxy: String) -> Option<EventsBody> {
    let mut reader = skiff_core::logging::read_events()?;
    // A few lines in flight to the socket; the rest wait in the ring,
    // where the oldest are dropped for this reader alone.
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let hello = serde_json::json!({"event": "subscribed", "proxy": proxy, "buffer": skiff_core::logging::EVENTS_BUFFER});
        if tx.send(Bytes::from(format!("{hello}\n"))).await.is_err() {
            return;
        }
        loop {
            let line = tokio::select! {
                e = reader.rx.recv() => match e {
                    Ok(line) => format!("{line}\n"),
                    Err(RecvError::Lagged(n)) => format!("{}\n", serde_json::json!({"event": "dropped", "count": n, "proxy": proxy})),
                    Err(RecvError::Closed) => return,
                },
                // The reader left while nothing happened.
                _ = tx.closed() => return,
            };
            if tx.send(Bytes::from(line)).await.is_err() {
                return;
            }
        }
    });
    Some(EventsBody(rx))
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;

    /// A reader that does not keep up loses the oldest events and is told
    /// how many; every event is either delivered or counted as dropped,
    /// and the publisher never waits.
    #[tokio::test]
    async fn a_slow_reader_is_told_how_many_events_it_lost() {
        let mut body = super::subscribe("test".into()).expect("a reader");
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(String::from_utf8_lossy(&first).contains(r#""event":"subscribed""#));
        let sent = 3 * skiff_core::logging::EVENTS_BUFFER;
        let started = std::time::Instant::now();
        for i in 0..sent {
            skiff_core::logging::publish_event(&format!(r#"{{"n":{i}}}"#));
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "publishing never waits for the reader");
        let (mut delivered, mut dropped, mut last) = (0u64, 0u64, None);
        while delivered + dropped < sent as u64 {
            let frame = tokio::time::timeout(std::time::Duration::from_secs(5), body.frame()).await.expect("more lines").unwrap().unwrap();
            let line: serde_json::Value = serde_json::from_slice(&frame.into_data().unwrap()).unwrap();
            match line["event"].as_str() {
                Some("dropped") => dropped += line["count"].as_u64().unwrap(),
                _ => {
                    let n = line["n"].as_u64().unwrap();
                    assert!(last.is_none_or(|l| n > l), "in order");
                    last = Some(n);
                    delivered += 1;
                }
            }
        }
        assert!(dropped > 0, "the reader fell behind");
        // Readers are bounded: the ninth is refused while eight read.
        let more: Vec<_> = (1..skiff_core::logging::EVENTS_READERS).map(|_| super::subscribe("more".into()).expect("room")).collect();
        assert!(super::subscribe("one too many".into()).is_none());
        drop(more);
        drop(body);
        assert_eq!(last, Some(sent as u64 - 1), "the newest events are kept");
    }
}
