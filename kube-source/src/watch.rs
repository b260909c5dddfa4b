//! The async side of a config source for the proxies (ztunnel, the
//! waypoint): a thread that polls any [`ConfigSource`] and publishes each
//! accepted snapshot on a `tokio::sync::watch` channel, and the rule that
//! nothing is served before the first complete, valid snapshot.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use skiff_core::{model::Snapshot, source::ConfigSource};
use tokio::sync::watch;
use tracing::{error, info, warn};

/// Why [`watch_cluster`] could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The polling thread could not be started.
    #[error("starting the config thread")]
    Thread(#[source] std::io::Error),
    /// The source ended before delivering its first config.
    #[error("the config source stopped before delivering a config")]
    Stopped,
}

/// Polls the config source (a manifests directory or the Kubernetes API) on
/// a thread and publishes each accepted snapshot. Rejected configs are
/// logged; the last good one stays.
///
/// Returns only once the source has delivered its first complete, valid
/// snapshot: until then nothing may be decided from an empty view of the
/// cluster (no PeerAuthentication reads as PERMISSIVE, no policy as allow),
/// so the caller starts serving only after it. Meanwhile captured
/// connections find no listener and are refused (fail closed).
pub async fn watch_cluster(mut source: Box<dyn ConfigSource>) -> Result<watch::Receiver<Arc<Snapshot>>, WatchError> {
    let (tx, mut rx) = watch::channel(Arc::new(Snapshot::default()));
    std::thread::Builder::new()
        .name("config".into())
        .spawn(move || {
            let mut rejections = skiff_core::model::RejectionLog::default();
            loop {
            match source.poll(Duration::from_millis(500)) {
                Ok(Some(s)) => {
                    rejections.report(&s);
                    if tx.send(s).is_err() {
                        return;
                    }
                }
                Ok(None) => {}
                Err(e) => error!(error = %e.report(), "config source unreadable; keeping the last good config"),
            }
            }
        })
    .map_err(WatchError::Thread)?;
    let started = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.changed()).await {
            Ok(Ok(())) => {
                rx.borrow_and_update();
                info!(waited_ms = started.elapsed().as_millis() as u64, "first complete config received");
                return Ok(rx);
            }
            Ok(Err(_)) => return Err(WatchError::Stopped),
            Err(_) => warn!(
                waited_s = started.elapsed().as_secs(),
                "no complete, valid config yet: not serving until there is one (captured connections are refused meanwhile)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_core::source::SourceError;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Nothing for a while, then a rejected config, then a good one.
    struct Slow(Arc<AtomicUsize>);

    impl ConfigSource for Slow {
        fn poll(&mut self, timeout: Duration) -> Result<Option<Arc<Snapshot>>, SourceError> {
            std::thread::sleep(timeout.min(Duration::from_millis(20)));
            match self.0.fetch_add(1, Ordering::SeqCst) {
                0..=4 => Ok(None),
                5 => Err(SourceError::Invalid(skiff_core::model::ModelErrors(Vec::new()))),
                6 => {
                    let mut s = Snapshot::default();
                    s.namespaces.insert("ready".into(), skiff_core::model::NamespaceInfo { name: "ready".into(), labels: Default::default() });
                    Ok(Some(Arc::new(s)))
                }
                _ => Ok(None),
            }
        }
    }

    #[tokio::test]
    async fn serving_waits_for_the_first_complete_config() {
        let polls = Arc::new(AtomicUsize::new(0));
        let rx = watch_cluster(Box::new(Slow(polls.clone()))).await.unwrap();
        assert!(polls.load(Ordering::SeqCst) >= 7, "returned before the source delivered a config");
        assert!(rx.borrow().namespaces.contains_key("ready"), "returned with the empty placeholder");
    }
}
