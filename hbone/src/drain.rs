//! Graceful shutdown: stop accepting, let open connections finish up to a
//! deadline, then close what is left.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use tokio::sync::{watch, Notify};

/// Shared drain state.
#[derive(Clone)]
pub struct Drain {
    stop_tx: Arc<watch::Sender<bool>>,
    active: Arc<AtomicUsize>,
    idle: Arc<Notify>,
}

/// Held by each open connection; dropping it marks the connection done.
pub struct ConnGuard {
    drain: Drain,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.drain.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.drain.idle.notify_waiters();
        }
    }
}

impl Drain {
    pub fn new() -> Drain {
        let (stop_tx, _) = watch::channel(false);
        Drain { stop_tx: Arc::new(stop_tx), active: Arc::new(AtomicUsize::new(0)), idle: Arc::new(Notify::new()) }
    }

    /// Registers an open connection.
    pub fn track(&self) -> ConnGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        ConnGuard { drain: self.clone() }
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// A receiver that turns true when draining starts. A receiver made
    /// after the start sees no change: use [`Self::stopping`] unless the
    /// receiver exists before the drain can start.
    pub fn signal(&self) -> watch::Receiver<bool> {
        self.stop_tx.subscribe()
    }

    /// Resolves once draining has started — at once if it already has.
    pub fn stopping(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.stop_tx.subscribe();
        async move {
            let _ = rx.wait_for(|draining| *draining).await;
        }
    }

    /// Starts draining and waits until no connection is open or `deadline`
    /// passes. Returns the number still open.
    pub async fn drain(&self, deadline: std::time::Duration) -> usize {
        let _ = self.stop_tx.send(true);
        let wait = async {
            loop {
                let idle = self.idle.notified();
                if self.active() == 0 {
                    return;
                }
                idle.await;
            }
        };
        let _ = tokio::time::timeout(deadline, wait).await;
        self.active()
    }
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_late_subscriber_still_sees_the_drain() {
        let d = Drain::new();
        let guard = d.track();
        let early = d.stopping();
        let draining = tokio::spawn({
            let d = d.clone();
            async move { d.drain(std::time::Duration::from_secs(5)).await }
        });
        tokio::time::timeout(std::time::Duration::from_secs(1), early).await.expect("the early waiter wakes");
        // Made after the drain started: resolves at once.
        tokio::time::timeout(std::time::Duration::from_secs(1), d.stopping()).await.expect("a late waiter resolves at once");
        drop(guard);
        assert_eq!(draining.await.unwrap(), 0, "nothing open once the guard is gone");
    }
}
