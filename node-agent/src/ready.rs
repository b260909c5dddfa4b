//! node-agent's HTTP endpoint (`--readiness-addr`, 15022): `GET
//! /healthz/ready` answers 200 once capture is installed and the first
//! reconcile with a complete view of the cluster is done, 503 before (the
//! DaemonSet's readiness therefore says "capture is in place on this
//! node"); `GET /metrics` answers the Prometheus exposition `metrics`
//! makes at each scrape.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

/// Makes the `/metrics` page.
pub type Exposition = Arc<dyn Fn() -> String + Send + Sync>;

/// Serves readiness and metrics on `addr` from a background thread.
pub fn serve(addr: SocketAddr, ready: Arc<AtomicBool>, metrics: Exposition) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    thread::Builder::new().name("readiness".into()).spawn(move || {
        for conn in listener.incoming().flatten() {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 1024];
            let n = (&conn).read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = match path {
                "/healthz/ready" if ready.load(Ordering::Relaxed) => ("200 OK", "ready\n".to_owned()),
                "/healthz/ready" => ("503 Service Unavailable", "not ready: capture not installed or first reconcile not done\n".to_owned()),
                "/metrics" => ("200 OK", metrics()),
                _ => ("404 Not Found", "not found: try /healthz/ready or /metrics\n".to_owned()),
            };
            let _ = write!(
                &conn,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    })?;
    Ok(local)
}

/// The exposition of node-agent's counters and the kernel's (read from the
/// pinned maps under `pin_dir`; a failed read is itself reported, as
/// `skiff_node_capture_readable 0`).
pub fn exposition(m: &crate::agent::AgentMetrics, pin_dir: &std::path::Path) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    metric("skiff_node_enrollments_total", "counter", "Pods whose capture was set up.", &[(String::new(), get(&m.enrollments))]);
    metric("skiff_node_enroll_failures_total", "counter", "Attempts to enroll a pod that failed (retried; the reason is logged).", &[(String::new(), get(&m.enroll_failures))]);
    metric("skiff_node_releases_total", "counter", "Pods whose capture was removed.", &[(String::new(), get(&m.releases))]);
    metric("skiff_node_reconciles_total", "counter", "Reconciles with a complete view of the cluster.", &[(String::new(), get(&m.reconciles))]);
    metric("skiff_node_config_errors_total", "counter", "Times the config source could not be read (the last good config stays in force).", &[(String::new(), get(&m.config_errors))]);
    metric("skiff_node_ztunnel_refusals_total", "counter", "Requests ztunnel refused.", &[(String::new(), get(&m.ztunnel_refusals))]);
    metric("skiff_config_rejected_objects", "gauge", "Objects of the current config refused by validation.", &[(String::new(), get(&m.rejected_objects))]);
    match crate::bpf::inspect(pin_dir) {
        Ok(state) => {
            metric("skiff_node_capture_readable", "gauge", "Whether the pinned capture maps could be read.", &[(String::new(), 1)]);
            metric("skiff_node_enrolled_pods", "gauge", "Pods enrolled in capture on this node (the kernel's map).", &[(String::new(), state.enrolled.len() as u64)]);
            let events: Vec<(String, u64)> = state.stats.iter().map(|(k, v)| (format!("{{event=\"{k}\"}}"), *v)).collect();
            metric(
                "skiff_node_capture_events_total",
                "counter",
                "The capture programs' counters: connects captured, original destinations answered, inbound redirects, and refusals by reason.",
                &events,
            );
            let entries: Vec<(String, u64)> = state.maps.iter().map(|(k, f)| (format!("{{map=\"{k}\"}}"), f.entries as u64)).collect();
            let capacity: Vec<(String, u64)> = state.maps.iter().map(|(k, f)| (format!("{{map=\"{k}\"}}"), u64::from(f.max_entries))).collect();
            metric("skiff_node_capture_map_entries", "gauge", "Entries in the bounded capture maps.", &entries);
            metric("skiff_node_capture_map_capacity", "gauge", "The bounded capture maps' sizes.", &capacity);
        }
        Err(e) => {
            tracing::debug!(error = %skiff_core::report(&e), "metrics: the pinned capture maps cannot be read");
            metric("skiff_node_capture_readable", "gauge", "Whether the pinned capture maps could be read.", &[(String::new(), 0)]);
        }
    }
    out.push_str(&skiff_core::telemetry::process_metrics());
    out
}
