//! Skiff's shared core, used by node-agent, ztunnel and the local mesh.
//!
//! - [`k8s`]: the few Kubernetes wire types Skiff reads, parsed from YAML.
//! - [`model`]: validated domain types (workloads, namespaces, services) and
//!   the conversion from wire types, with errors that name object and field.
//! - [`enroll`]: the enrollment decision, a pure function.
//! - [`source`]: config sources behind one interface; the local one reads a
//!   directory of manifests.
//! - [`zds`]: the node-agent → ztunnel protocol over a Unix socket.
//! - [`netns`]: running code inside another network namespace.
//! - [`egress`]: Istio ServiceEntries and the outbound traffic policy, and
//!   where a connection to an address outside the cluster goes.
//! - [`gateway`]: Istio Gateways, and the ingress gateway's decisions
//!   (servers, listening ports, VirtualServices bound to a Gateway).
//! - [`logging`]: every process's logger (`SKIFF_LOG`, `--log-format`).
//! - [`series`]: which metric label sets name workloads or Services that
//!   are gone (pruned by ztunnel and the waypoint).

pub mod egress;
pub mod enroll;
pub mod gateway;
pub mod http1;
pub mod k8s;
pub mod logging;
pub mod model;
pub mod netns;
pub mod outbound;
pub mod policy;
pub mod routing;
pub mod series;
pub mod telemetry;
pub mod telemetry_api;
pub mod source;
pub mod zds;

/// Namespace label (and pod label) that opts in to ambient capture.
pub const LABEL_DATAPLANE_MODE: &str = "skiff.dev/dataplane-mode";
/// Istio's spelling of the same label, accepted as well.
pub const LABEL_ISTIO_DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// Value of the dataplane-mode label that enrolls.
pub const DATAPLANE_AMBIENT: &str = "ambient";
/// Value of the dataplane-mode pod label that opts one pod out.
pub const DATAPLANE_NONE: &str = "none";
/// The mesh's own namespace: never captured.
pub const MESH_NAMESPACE: &str = "skiff-system";
/// Label (on a Service or Namespace) naming the waypoint its traffic goes through.
pub const LABEL_USE_WAYPOINT: &str = "istio.io/use-waypoint";
/// Skiff's spelling of the same label.
pub const LABEL_SKIFF_USE_WAYPOINT: &str = "skiff.dev/use-waypoint";
/// Label on waypoint pods: the waypoint (Gateway) name.
pub const LABEL_GATEWAY_NAME: &str = "gateway.networking.k8s.io/gateway-name";
/// Pod or namespace label choosing the capture mechanism of an enrolled
/// pod: eBPF unless it says `iptables`.
pub const LABEL_CAPTURE: &str = "skiff.dev/capture";
/// Value of [`LABEL_CAPTURE`] that captures with iptables REDIRECT/DNAT.
pub const CAPTURE_IPTABLES: &str = "iptables";
/// Pod annotation written by the local mesh: path of the pod's netns.
pub const ANNOTATION_LOCAL_NETNS: &str = "local.skiff.dev/netns";

/// An error and its chain of causes on one line (`a: b: c`), for logs.
pub fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Raises this process's soft limit on open files (`RLIMIT_NOFILE`) to its
/// hard limit: a proxy holds a descriptor or two per connection, and the
/// usual soft default of 1024 would refuse connections long before the
/// machine runs short. Returns the soft limit before and after.
pub fn raise_open_file_limit() -> std::io::Result<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok((soft, hard.max(soft)))
}

/// [`raise_open_file_limit`] at a process's start, logged.
pub fn raise_open_file_limit_logged() {
    match raise_open_file_limit() {
        Ok((before, after)) => tracing::info!(before, after, "open-file limit (RLIMIT_NOFILE soft) raised to the hard limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit; connections past it will be refused"),
    }
}
