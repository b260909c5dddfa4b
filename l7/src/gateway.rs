//! The ingress gateway's front: the listeners of the Gateway servers that
//! select this gateway's pod, opened and closed as the Gateways change,
//! and the downstream HTTP connections they take, each served by the same
//! request pipeline as a waypoint's streams (`server`). Requests leave
//! over HBONE with the gateway's own identity.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{error, info, warn};

use crate::server::{Entry, Proxy, StreamCtx};

/// Downstream connections held open at once by one gateway (all its
/// listeners); past it a new connection is closed at once.
pub const MAX_CONNECTIONS: usize = 16384;

/// How often listeners that could not be opened are tried again.
const RETRY: Duration = Duration::from_secs(5);

/// Gets the gateway's certificate, then opens and closes its listeners to
/// follow the Gateways that select its pod, until the proxy drains
/// (listeners close; open connections finish as `Drain` allows).
pub async fn serve(proxy: Arc<Proxy>, max_connections: usize) -> Result<(), skiff_hbone::certs::CertError> {
    proxy.ensure_certificate().await?;
    info!("gateway serving: certificate ready, listening for the Gateways that select this pod");
    let mut cluster = proxy.cluster();
    let mut open: BTreeMap<u16, JoinHandle<()>> = BTreeMap::new();
    let mut logged: BTreeMap<u16, String> = BTreeMap::new();
    let held = Arc::new(AtomicUsize::new(0));
    let draining = proxy.drain.stopping();
    tokio::pin!(draining);
    loop {
        let snap = cluster.borrow_and_update().clone();
        let want = wanted(&proxy, &snap);
        open.retain(|port, task| {
            let keep = want.contains_key(port);
            if !keep {
                task.abort();
                info!(port, "gateway listener closed: no Gateway server on it any more (open connections finish)");
                logged.remove(port);
            }
            keep
        });
        for (port, servers) in &want {
            if open.contains_key(port) {
                continue;
            }
            match std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, *port)).and_then(|l| {
                l.set_nonblocking(true)?;
                TcpListener::from_std(l)
            }) {
                Ok(l) => {
                    info!(port, servers = %servers, "gateway listening");
                    logged.remove(port);
                    open.insert(*port, tokio::spawn(accept_loop(proxy.clone(), l, *port, held.clone(), max_connections)));
                }
                Err(e) => {
                    // Once per port and cause, then retried quietly.
                    let what = e.to_string();
                    if logged.get(port) != Some(&what) {
                        error!(port, servers = %servers, error = %what, "cannot listen for these Gateway servers; they are not served until the port can be opened (retried every 5 s)");
                        logged.insert(*port, what);
                    }
                }
            }
        }
        tokio::select! {
            r = cluster.changed() => if r.is_err() { break },
            _ = tokio::time::sleep(RETRY), if open.len() < want.len() => {}
            _ = &mut draining => break,
        }
    }
    for (_, task) in open {
        task.abort();
    }
    Ok(())
}

/// The ports to listen on, each with the servers it carries (for logs):
/// `Gateway ns/name server[i] (port number → listening port, hosts)`.
fn wanted(proxy: &Proxy, snap: &skiff_core::model::Snapshot) -> BTreeMap<u16, String> {
    let mut out: BTreeMap<u16, String> = BTreeMap::new();
    let Some(pod) = proxy.own_pod(snap) else { return out };
    for o in snap.gateway_servers(pod) {
        let hosts: Vec<String> = o.server.hosts.iter().map(|h| format!("{}/{}", h.namespace.as_deref().unwrap_or("*"), h.host)).collect();
        let line = format!("Gateway {}/{} servers[{}] (port {} → {}, hosts {})", o.gateway.namespace, o.gateway.name, o.server.index, o.server.number, o.port, hosts.join(","));
        let e = out.entry(o.port).or_default();
        if !e.is_empty() {
            e.push_str("; ");
        }
        e.push_str(&line);
    }
    out
}

/// Takes connections on one listener; each is served as HTTP/1.1 or
/// HTTP/2 (prior knowledge) by the request pipeline.
async fn accept_loop(proxy: Arc<Proxy>, listener: TcpListener, port: u16, held: Arc<AtomicUsize>, max: usize) {
    let mut refused_since_log = 0u64;
    let mut last_log = tokio::time::Instant::now() - Duration::from_secs(60);
    loop {
        let (tcp, peer) = skiff_hbone::transport::accept(&listener, "gateway").await;
        if held.fetch_add(1, Ordering::AcqRel) >= max {
            held.fetch_sub(1, Ordering::AcqRel);
            proxy.metrics.admission_refused.with_label_values(&["gateway_connections"]).inc();
            refused_since_log += 1;
            if last_log.elapsed() >= Duration::from_secs(10) {
                warn!(port, %peer, max_connections = max, refused = refused_since_log, "gateway connection refused: too many open");
                refused_since_log = 0;
                last_log = tokio::time::Instant::now();
            }
            drop(tcp);
            continue;
        }
        let _ = tcp.set_nodelay(true);
        let (proxy, held) = (proxy.clone(), held.clone());
        tokio::spawn(async move {
            let _tracked = proxy.drain.track();
            let ctx = Arc::new(StreamCtx { entry: Entry::Gateway { port, scheme: "http" }, peer, peer_id: None });
            proxy.serve_http_ctx(ctx, tcp).await;
            held.fetch_sub(1, Ordering::AcqRel);
        });
    }
}
