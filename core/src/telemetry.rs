//! Who a metric names: the workload labels Istio's standard metrics carry
//! for each end of a connection or request, taken from the same pod labels
//! Istio takes them from.
//!
//! Istio's reference ("Istio Standard Metrics", Labels) names, for each of
//! source and destination: workload, workload namespace, principal, app,
//! version, canonical service, canonical revision and cluster, each
//! `unknown` when the information is missing. The canonical service and
//! revision follow Istio's "Canonical Service" labels
//! (`service.istio.io/canonical-name`, then `app.kubernetes.io/name`, then
//! `app`, then the workload's name; `service.istio.io/canonical-revision`,
//! then `app.kubernetes.io/version`, then `version`, then `latest`).

use std::collections::BTreeMap;

use crate::{model::Workload, series::NamedAt};

/// The cluster every workload of a Skiff mesh is in: Skiff is one cluster,
/// and this is Istio's default cluster ID (its `CLUSTER_ID`).
pub const CLUSTER_ID: &str = "Kubernetes";

/// The per-end label names, in the order [`Peer::values`] gives them;
/// `source_` or `destination_` goes in front of each.
pub const PEER_LABELS: [&str; 8] = ["workload", "workload_namespace", "principal", "app", "version", "canonical_service", "canonical_revision", "cluster"];

/// One end of a connection or request, as its metric labels name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub workload: String,
    pub namespace: String,
    pub principal: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub cluster: String,
}

impl Peer {
    /// Nothing known (a client or server outside the mesh).
    pub fn unknown() -> Peer {
        let u = || "unknown".to_owned();
        Peer { workload: u(), namespace: u(), principal: u(), app: u(), version: u(), canonical_service: u(), canonical_revision: u(), cluster: u() }
    }

    /// A workload of the mesh: its (Deployment) name, namespace, pod
    /// labels and SPIFFE principal.
    pub fn of(workload: &str, namespace: &str, labels: &BTreeMap<String, String>, principal: String) -> Peer {
        Peer {
            workload: workload.to_owned(),
            namespace: namespace.to_owned(),
            principal,
            app: app(labels).unwrap_or("unknown").to_owned(),
            version: version(labels).unwrap_or("unknown").to_owned(),
            canonical_service: canonical_service(labels, workload).to_owned(),
            canonical_revision: canonical_revision(labels).to_owned(),
            cluster: CLUSTER_ID.to_owned(),
        }
    }

    /// A pod of the cluster, with the identity of its service account in
    /// `trust_domain`.
    pub fn of_workload(w: &Workload, trust_domain: &str) -> Peer {
        Peer::of(&w.workload_name, &w.namespace, &w.labels, format!("spiffe://{trust_domain}/ns/{}/sa/{}", w.namespace, w.service_account))
    }

    /// The label values, in [`PEER_LABELS`] order.
    pub fn values(&self) -> [&str; 8] {
        [
            &self.workload,
            &self.namespace,
            &self.principal,
            &self.app,
            &self.version,
            &self.canonical_service,
            &self.canonical_revision,
            &self.cluster,
        ]
    }
}

/// Istio's standard TCP labels, in the order [`tcp_values`] gives them:
/// the reporter, the source's and the destination's [`Peer`] labels, the
/// destination Service, then the connection's.
pub const TCP_LABELS: [&str; 23] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

/// Istio's standard request labels: the TCP ones, then `response_code`
/// and `grpc_response_status` (so a workload or Service is at the same
/// position in both, see [`WORKLOADS_AT`]).
pub const REQUEST_LABELS: [&str; 25] = {
    let mut out = [""; 25];
    let mut i = 0;
    while i < 23 {
        out[i] = TCP_LABELS[i];
        i += 1;
    }
    out[23] = "response_code";
    out[24] = "grpc_response_status";
    out
};

/// Where a series of [`TCP_LABELS`] or [`REQUEST_LABELS`] names a
/// workload (source, destination), for pruning the series of those that
/// left.
pub const WORKLOADS_AT: [NamedAt; 2] = [NamedAt { namespace: 2, name: 1 }, NamedAt { namespace: 10, name: 9 }];

/// Where such a series names its destination Service.
pub const SERVICES_AT: [NamedAt; 1] = [NamedAt { namespace: 19, name: 18 }];

/// The destination Service of a series: host, name, namespace.
pub struct ServiceLabels<'a> {
    pub host: &'a str,
    pub name: &'a str,
    pub namespace: &'a str,
}

/// The values of [`TCP_LABELS`].
pub fn tcp_values<'a>(reporter: &'a str, source: &'a Peer, destination: &'a Peer, service: ServiceLabels<'a>, protocol: &'a str, flags: &'a str, security: &'a str) -> [&'a str; 23] {
    let (s, d) = (source.values(), destination.values());
    [
        reporter,
        s[0],
        s[1],
        s[2],
        s[3],
        s[4],
        s[5],
        s[6],
        s[7],
        d[0],
        d[1],
        d[2],
        d[3],
        d[4],
        d[5],
        d[6],
        d[7],
        service.host,
        service.name,
        service.namespace,
        protocol,
        flags,
        security,
    ]
}

/// The values of [`REQUEST_LABELS`]: `tcp` (from [`tcp_values`]), the
/// response code and the gRPC status.
pub fn request_values<'a>(tcp: [&'a str; 23], code: &'a str, grpc_status: &'a str) -> [&'a str; 25] {
    let mut out = [""; 25];
    out[..23].copy_from_slice(&tcp);
    out[23] = code;
    out[24] = grpc_status;
    out
}

fn first<'a>(labels: &'a BTreeMap<String, String>, keys: &[&str]) -> Option<&'a str> {
    keys.iter().find_map(|k| labels.get(*k).map(String::as_str).filter(|v| !v.is_empty()))
}

/// `app`, else `app.kubernetes.io/name`.
pub fn app(labels: &BTreeMap<String, String>) -> Option<&str> {
    first(labels, &["app", "app.kubernetes.io/name"])
}

/// `version`, else `app.kubernetes.io/version`.
pub fn version(labels: &BTreeMap<String, String>) -> Option<&str> {
    first(labels, &["version", "app.kubernetes.io/version"])
}

/// Istio's canonical service: the labels in its order, else the
/// workload's name.
pub fn canonical_service<'a>(labels: &'a BTreeMap<String, String>, workload: &'a str) -> &'a str {
    first(labels, &["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"]).unwrap_or(workload)
}

/// Istio's canonical revision: the labels in its order, else `latest`.
pub fn canonical_revision(labels: &BTreeMap<String, String>) -> &str {
    first(labels, &["service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"]).unwrap_or("latest")
}

/// The standard process metrics every Prometheus client library exports
/// (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
/// `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`,
/// `process_start_time_seconds`), read from `/proc/self` now, in the text
/// format: what resource dashboards chart for each Skiff process. A value
/// that cannot be read is left out.
pub fn process_metrics() -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mut put = |name: &str, kind: &str, help: &str, v: Option<f64>| {
        if let Some(v) = v {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        }
    };
    // SAFETY: sysconf only reads a constant of the system.
    #[allow(unsafe_code)]
    let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    // Fields after the command name (which may hold spaces), from field 3.
    let fields: Vec<&str> = stat.as_deref().and_then(|s| s.rsplit_once(") ")).map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    let cpu = match (field(14), field(15)) {
        (Some(u), Some(s)) if ticks > 0 => Some((u + s) / ticks as f64),
        _ => None,
    };
    put("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.", cpu);
    put("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", field(24).map(|p| p * page as f64));
    put("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", field(23));
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| s.lines().find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok()));
    put(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        match (boot, field(22)) {
            (Some(b), Some(t)) if ticks > 0 => Some(b + t / ticks as f64),
            _ => None,
        },
    );
    put("process_open_fds", "gauge", "Number of open file descriptors.", std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as f64));
    let max = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Max open files")).and_then(|l| l.split_whitespace().nth(3)?.parse::<f64>().ok()));
    put("process_max_fds", "gauge", "Maximum number of open file descriptors.", max);
    // Istio's build metric: which component at which version (`skiff
    // check` compares them across a node and the mesh).
    let component: String = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "unknown".into())
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' })
        .collect();
    let _ = writeln!(
        out,
        "# HELP istio_build Istio component build info\n# TYPE istio_build gauge\nistio_build{{component=\"{}\",tag=\"{}\"}} 1",
        component,
        BUILD_TAG
    );
    out
}

/// This build's version, as `istio_build`'s `tag`.
pub const BUILD_TAG: &str = env!("CARGO_PKG_VERSION");

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// Istio's `pkg/kube/labels.CanonicalService` (documented fallbacks)
    /// and "Istio Standard Metrics" (Labels): the first label
    /// present wins, in this order; `unknown` for a missing app or version.
    #[test]
    fn canonical_service_and_revision_follow_istios_label_order() {
        // (labels, canonical service, canonical revision, app, version)
        type Row<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str, &'a str, &'a str);
        let table: &[Row] = &[
            (&[], "reviews-v1", "latest", "unknown", "unknown"),
            (&[("app", "reviews"), ("version", "v2")], "reviews", "v2", "reviews", "v2"),
            (&[("app.kubernetes.io/name", "rev"), ("app.kubernetes.io/version", "1.2"), ("app", "reviews"), ("version", "v2")], "rev", "1.2", "reviews", "v2"),
            (
                &[("service.istio.io/canonical-name", "canon"), ("service.istio.io/canonical-revision", "r7"), ("app", "reviews"), ("app.kubernetes.io/name", "rev")],
                "canon",
                "r7",
                "reviews",
                "unknown",
            ),
            (&[("app.kubernetes.io/name", "rev"), ("app.kubernetes.io/version", "1.2")], "rev", "1.2", "rev", "1.2"),
            // An empty value is no value.
            (&[("app", ""), ("version", "")], "reviews-v1", "latest", "unknown", "unknown"),
        ];
        for (kv, service, revision, app, version) in table {
            let p = Peer::of("reviews-v1", "shop", &labels(kv), "spiffe://cluster.local/ns/shop/sa/reviews".into());
            assert_eq!((p.canonical_service.as_str(), p.canonical_revision.as_str()), (*service, *revision), "{kv:?}");
            assert_eq!((p.app.as_str(), p.version.as_str()), (*app, *version), "{kv:?}");
            assert_eq!(p.cluster, "Kubernetes");
        }
        assert!(Peer::unknown().values().iter().all(|v| *v == "unknown"));
    }

    #[test]
    fn process_metrics_are_read_from_proc() {
        let text = process_metrics();
        let value = |name: &str| -> f64 {
            let line = text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("no {name} in\n{text}"));
            line.rsplit_once(' ').unwrap().1.parse().unwrap()
        };
        assert!(value("process_resident_memory_bytes") > 1e5, "{text}");
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_max_fds") >= value("process_open_fds"));
        let started = value("process_start_time_seconds");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(started <= now + 1.0 && started > now - 86400.0, "started {started}, now {now}");
        assert!(text.contains("# TYPE process_cpu_seconds_total counter"));
        assert!(text.lines().any(|l| l.starts_with("istio_build{component=\"") && l.ends_with(&format!(",tag=\"{BUILD_TAG}\"}} 1"))), "{text}");
    }
}
