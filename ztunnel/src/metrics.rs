//! Prometheus metrics, with Istio's names and labels so existing dashboards
//! and alerts work unchanged.

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
pub use skiff_core::telemetry::Peer;

pub use skiff_core::telemetry::TCP_LABELS;

/// Label values of one connection. Every value comes from a bounded set
/// (workloads, services, a few fixed strings); unknown peers are "unknown".
#[derive(Clone, Debug)]
pub struct ConnLabels {
    pub reporter: &'static str,
    pub source: Peer,
    pub destination: Peer,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    /// Envoy-style response flags: `-` for none, `UF` upstream connection
    /// failure, `UH` no healthy upstream, `NR` no route.
    pub response_flags: &'static str,
    pub security_policy: &'static str,
}

impl ConnLabels {
    pub fn values(&self) -> [&str; 23] {
        let service = skiff_core::telemetry::ServiceLabels { host: &self.destination_service, name: &self.destination_service_name, namespace: &self.destination_service_namespace };
        skiff_core::telemetry::tcp_values(self.reporter, &self.source, &self.destination, service, "tcp", self.response_flags, self.security_policy)
    }
}

pub struct Metrics {
    pub registry: Registry,
    /// Every label set of the connection metrics, and when a connection
    /// last used it: what `prune` may remove once its workloads are gone.
    series: skiff_core::series::SeriesUse,
    opened: IntCounterVec,
    closed: IntCounterVec,
    sent: IntCounterVec,
    received: IntCounterVec,
    /// Pods ztunnel currently proxies for.
    pub workloads: IntGauge,
    /// Connections currently open through this ztunnel.
    pub active_connections: IntGauge,
    /// HBONE connections refused at the TLS or identity check.
    pub hbone_refused: prometheus::IntCounter,
    /// HBONE connections over an admission bound, by bound.
    pub hbone_admission_refused: IntCounterVec,
    /// HBONE connections open, by direction (set when scraped).
    pub hbone_connections: prometheus::IntGaugeVec,
    /// Inbound HBONE handshakes in progress (set when scraped).
    pub hbone_handshakes: IntGauge,
    /// Accepted HBONE handshakes by negotiated cipher suite and key exchange.
    pub tls_handshakes: IntCounterVec,
    /// Plaintext connections from the node itself (kubelet probes) let
    /// past STRICT and policy.
    pub node_probes: prometheus::IntCounter,
    /// Outbound connections refused by REGISTRY_ONLY.
    pub egress_refused: prometheus::IntCounter,
    /// `skiff_config_rejected_objects{kind,namespace}`.
    config_rejected: prometheus::IntGaugeVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registry.register(Box::new(c.clone())).expect("metric registered once");
    c
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let opened = counter(&registry, "istio_tcp_connections_opened_total", "TCP connections opened", &TCP_LABELS);
        let closed = counter(&registry, "istio_tcp_connections_closed_total", "TCP connections closed", &TCP_LABELS);
        let sent = counter(
            &registry,
            "istio_tcp_sent_bytes_total",
            "Bytes sent in the response direction (server to client)",
            &TCP_LABELS,
        );
        let received = counter(
            &registry,
            "istio_tcp_received_bytes_total",
            "Bytes received in the request direction (client to server)",
            &TCP_LABELS,
        );
        let workloads = IntGauge::new("skiff_ztunnel_workloads", "Pods this ztunnel proxies for").expect("valid");
        registry.register(Box::new(workloads.clone())).expect("metric registered once");
        let active_connections =
            IntGauge::new("skiff_ztunnel_active_connections", "Connections open through this ztunnel").expect("valid");
        registry.register(Box::new(active_connections.clone())).expect("metric registered once");
        let hbone_refused = prometheus::IntCounter::new(
            "skiff_ztunnel_hbone_refused_total",
            "HBONE connections refused: bad or foreign certificate, expired, identity mismatch",
        )
        .expect("valid");
        registry.register(Box::new(hbone_refused.clone())).expect("metric registered once");
        let hbone_admission_refused = counter(
            &registry,
            "skiff_hbone_admission_refused_total",
            "HBONE connections closed unserved because an admission bound was reached (see --hbone-max-*), by bound",
            &["reason"],
        );
        let hbone_connections = prometheus::IntGaugeVec::new(
            Opts::new("skiff_hbone_connections", "HBONE connections open: inbound (accepted, authenticated) and outbound (pooled)"),
            &["direction"],
        )
        .expect("valid");
        registry.register(Box::new(hbone_connections.clone())).expect("metric registered once");
        let hbone_handshakes = IntGauge::new("skiff_hbone_handshakes_in_progress", "Inbound HBONE connections not yet authenticated").expect("valid");
        registry.register(Box::new(hbone_handshakes.clone())).expect("metric registered once");
        let tls_handshakes = counter(
            &registry,
            "skiff_ztunnel_tls_handshakes_total",
            "HBONE TLS handshakes accepted, by negotiated cipher suite and key exchange group",
            &["cipher_suite", "kx_group"],
        );
        let node_probes = prometheus::IntCounter::new(
            "skiff_ztunnel_node_probe_connections_total",
            "Plaintext connections from the node's own addresses (kubelet health probes) delivered without mTLS or policy",
        )
        .expect("valid");
        registry.register(Box::new(node_probes.clone())).expect("metric registered once");
        let egress_refused = prometheus::IntCounter::new(
            "skiff_ztunnel_egress_refused_total",
            "Outbound connections refused under outboundTrafficPolicy REGISTRY_ONLY: the destination was not a Service, pod or ServiceEntry",
        )
        .expect("valid");
        registry.register(Box::new(egress_refused.clone())).expect("metric registered once");
        let config_rejected = prometheus::IntGaugeVec::new(
            Opts::new("skiff_config_rejected_objects", "Config objects refused (each on its own; see the log and /config_dump), by kind and namespace"),
            &["kind", "namespace"],
        )
        .expect("valid");
        registry.register(Box::new(config_rejected.clone())).expect("metric registered once");
        // Every bound's series from the start, at 0: a dashboard shows "none
        // refused" rather than no data.
        for r in skiff_hbone::limits::Refused::ALL {
            hbone_admission_refused.with_label_values(&[r.as_str()]);
        }
        Metrics {
            registry,
            series: Default::default(),
            opened,
            closed,
            sent,
            received,
            workloads,
            active_connections,
            hbone_refused,
            hbone_admission_refused,
            hbone_connections,
            hbone_handshakes,
            tls_handshakes,
            node_probes,
            egress_refused,
            config_rejected,
        }
    }

    /// Sets `skiff_config_rejected_objects` from a snapshot.
    pub fn set_rejected(&self, snap: &skiff_core::model::Snapshot) {
        self.config_rejected.reset();
        for ((kind, namespace), n) in snap.rejected_counts() {
            self.config_rejected.with_label_values(&[kind, namespace.as_str()]).set(n);
        }
    }

    /// Counters of one connection, resolved once so the data path only adds.
    pub fn connection(&self, labels: &ConnLabels) -> ConnCounters {
        let v = labels.values();
        self.series.record(&v);
        ConnCounters {
            opened: self.opened.with_label_values(&v),
            closed: self.closed.with_label_values(&v),
            sent: self.sent.with_label_values(&v),
            received: self.received.with_label_values(&v),
        }
    }

    /// Removes the connection metrics' label sets that name a workload or
    /// Service no longer in `snap` and that no connection has used for
    /// `grace` (so the last counts are scraped first). Without this, every
    /// short-lived workload (a Job, a CronJob run) would leave series
    /// behind for the life of the process. Returns how many were removed.
    pub fn prune(&self, snap: &skiff_core::model::Snapshot, grace: std::time::Duration) -> usize {
        use skiff_core::telemetry::{SERVICES_AT, WORKLOADS_AT};
        let gone = self.series.take_gone(snap, grace, &WORKLOADS_AT, &SERVICES_AT);
        for v in &gone {
            let values: Vec<&str> = v.iter().map(String::as_str).collect();
            for vec in [&self.opened, &self.closed, &self.sent, &self.received] {
                let _ = vec.remove_label_values(&values);
            }
        }
        gone.len()
    }

    /// Label sets of the connection metrics now.
    pub fn series(&self) -> usize {
        self.series.len()
    }

    /// Counts an open connection until the guard drops (also when the
    /// connection's task is aborted).
    pub fn open_connection(&self) -> ActiveGuard {
        self.active_connections.inc();
        ActiveGuard(self.active_connections.clone())
    }

    /// Text exposition format.
    pub fn render(&self) -> String {
        render(&self.registry) + &skiff_core::telemetry::process_metrics()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// See [`Metrics::open_connection`].
pub struct ActiveGuard(IntGauge);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A registry in Prometheus' text exposition format.
pub fn render(registry: &Registry) -> String {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    let _ = prometheus::TextEncoder::new().encode(&registry.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

#[derive(Clone)]
pub struct ConnCounters {
    pub opened: prometheus::IntCounter,
    pub closed: prometheus::IntCounter,
    /// Server → client bytes.
    pub sent: prometheus::IntCounter,
    /// Client → server bytes.
    pub received: prometheus::IntCounter,
}
