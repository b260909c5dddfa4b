//! Skiff ztunnel: one per node. Receives enrolled pods' network namespaces
//! from node-agent, opens listeners inside each (15001 outbound, 15006
//! inbound), and proxies every captured connection, counting it with Istio's
//! metrics and logging it.

pub mod admin;
pub mod certs;
pub mod hbone;
pub mod drain;
pub mod identity;
pub mod metrics;
pub mod proxy;
pub mod signer_client;
pub mod sock;
pub mod transport;
pub mod zds_server;

use std::{sync::Arc, time::Duration};

use skiff_core::{model::Snapshot, source::ConfigSource};
use tokio::sync::watch;
use tracing::error;

/// Polls the config source (a manifests directory or the Kubernetes API) on
/// a thread and publishes each accepted snapshot. Rejected configs are
/// logged; the last good one stays.
pub fn watch_cluster(mut source: Box<dyn ConfigSource>) -> watch::Receiver<Arc<Snapshot>> {
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    std::thread::Builder::new()
        .name("config".into())
        .spawn(move || {
            loop {
                match source.poll(Duration::from_millis(500)) {
                    Ok(Some(s)) => {
                        if tx.send(s).is_err() {
                            return;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => error!(error = %e.report(), "config rejected; keeping the last good config"),
                }
            }
        })
        .expect("spawn config thread");
    rx
}
