//! Which pods are captured: one pure function, so the rules can be read and
//! tested in one place.
//!
//! The rules, in order:
//! 1. only pods scheduled on this node;
//! 2. never `hostNetwork` pods (their netns is the node's);
//! 3. never the mesh's own namespace or `kube-system`;
//! 4. never pods that already run an Istio sidecar;
//! 5. a pod labelled `skiff.dev/dataplane-mode=none` (or
//!    `istio.io/dataplane-mode=none`) opts out;
//! 6. a pod labelled `...=ambient` opts in, whatever its namespace says;
//! 7. otherwise the namespace's label decides;
//! 8. only pods with an IP that have not finished (Succeeded/Failed).

use std::{collections::BTreeMap, fmt};

use crate::{
    model::Workload, DATAPLANE_AMBIENT, DATAPLANE_NONE, LABEL_DATAPLANE_MODE, LABEL_ISTIO_DATAPLANE_MODE,
    MESH_NAMESPACE,
};

/// Why a pod is not captured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipReason {
    OtherNode,
    HostNetwork,
    SystemNamespace,
    SidecarInjected,
    Waypoint,
    PodOptOut,
    NamespaceNotEnrolled,
    NoPodIp,
    Finished,
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SkipReason::OtherNode => "scheduled on another node",
            SkipReason::HostNetwork => "hostNetwork pod",
            SkipReason::SystemNamespace => "system namespace (skiff-system, kube-system)",
            SkipReason::SidecarInjected => "pod already has an Istio sidecar",
            SkipReason::Waypoint => "waypoint pod (terminates HBONE itself)",
            SkipReason::PodOptOut => "pod label dataplane-mode=none",
            SkipReason::NamespaceNotEnrolled => "namespace not labelled dataplane-mode=ambient",
            SkipReason::NoPodIp => "pod has no IP yet",
            SkipReason::Finished => "pod has finished",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Enroll,
    Skip(SkipReason),
}

fn mode(labels: &BTreeMap<String, String>) -> Option<&str> {
    labels
        .get(LABEL_DATAPLANE_MODE)
        .or_else(|| labels.get(LABEL_ISTIO_DATAPLANE_MODE))
        .map(String::as_str)
}

/// Decides whether `pod` is captured on `node`, given its namespace's labels
/// (`None` when the Namespace object is unknown).
pub fn decide(node: &str, namespace_labels: Option<&BTreeMap<String, String>>, pod: &Workload) -> Decision {
    use SkipReason::*;
    if pod.node.as_deref() != Some(node) {
        return Decision::Skip(OtherNode);
    }
    if pod.host_network {
        return Decision::Skip(HostNetwork);
    }
    if pod.namespace == MESH_NAMESPACE || pod.namespace == "kube-system" {
        return Decision::Skip(SystemNamespace);
    }
    // The sidecar injector labels every pod it injects this way.
    if pod.labels.get("security.istio.io/tlsMode").map(String::as_str) == Some("istio") {
        return Decision::Skip(SidecarInjected);
    }
    // A waypoint's pods run as the service account named like it (what
    // ztunnels select them by): a pod that only carries the label is not
    // one, and is captured like any other.
    if pod.labels.get(crate::LABEL_GATEWAY_NAME).is_some_and(|gw| *gw == pod.service_account) {
        return Decision::Skip(Waypoint);
    }
    match mode(&pod.labels) {
        Some(DATAPLANE_NONE) => return Decision::Skip(PodOptOut),
        Some(DATAPLANE_AMBIENT) => {}
        _ => {
            if namespace_labels.and_then(mode) != Some(DATAPLANE_AMBIENT) {
                return Decision::Skip(NamespaceNotEnrolled);
            }
        }
    }
    if pod.is_finished() {
        return Decision::Skip(Finished);
    }
    if pod.ip.is_none() {
        return Decision::Skip(NoPodIp);
    }
    Decision::Enroll
}

/// Whether pods in namespace `name` with these labels are captured (unless
/// a pod opts out): the namespace-level part of [`decide`].
pub fn namespace_enrolled(name: &str, labels: &BTreeMap<String, String>) -> bool {
    name != MESH_NAMESPACE && name != "kube-system" && mode(labels) == Some(DATAPLANE_AMBIENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use SkipReason::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn pod(ns: &str, node: &str, pod_labels: &[(&str, &str)], host_network: bool, ip: bool, phase: &str) -> Workload {
        Workload {
            uid: format!("{ns}/p"),
            namespace: ns.into(),
            name: "p".into(),
            workload_name: "p".into(),
            service_account: "default".into(),
            node: Some(node.into()),
            ip: ip.then(|| "10.244.1.2".parse().unwrap()),
            labels: labels(pod_labels),
            host_network,
            phase: Some(phase.into()),
            netns_path: None,
            named_ports: BTreeMap::new(),
        }
    }

    #[test]
    fn enrollment_table() {
        let ambient = labels(&[("skiff.dev/dataplane-mode", "ambient")]);
        let istio_ambient = labels(&[("istio.io/dataplane-mode", "ambient")]);
        let ns_none = labels(&[("skiff.dev/dataplane-mode", "none")]);
        let plain = labels(&[("team", "a")]);
        let sidecar = [("security.istio.io/tlsMode", "istio")];
        #[rustfmt::skip]
        let cases: Vec<(&str, Option<&BTreeMap<String, String>>, Workload, Decision)> = vec![
            ("labelled namespace", Some(&ambient), pod("a", "n1", &[], false, true, "Running"), Decision::Enroll),
            ("istio label accepted", Some(&istio_ambient), pod("a", "n1", &[], false, true, "Running"), Decision::Enroll),
            ("pending pod with IP", Some(&ambient), pod("a", "n1", &[], false, true, "Pending"), Decision::Enroll),
            ("namespace not labelled", Some(&plain), pod("a", "n1", &[], false, true, "Running"), Decision::Skip(NamespaceNotEnrolled)),
            ("namespace label none", Some(&ns_none), pod("a", "n1", &[], false, true, "Running"), Decision::Skip(NamespaceNotEnrolled)),
            ("unknown namespace", None, pod("a", "n1", &[], false, true, "Running"), Decision::Skip(NamespaceNotEnrolled)),
            ("pod opt-out", Some(&ambient), pod("a", "n1", &[("skiff.dev/dataplane-mode", "none")], false, true, "Running"), Decision::Skip(PodOptOut)),
            ("istio pod opt-out", Some(&ambient), pod("a", "n1", &[("istio.io/dataplane-mode", "none")], false, true, "Running"), Decision::Skip(PodOptOut)),
            ("pod opt-in", Some(&plain), pod("a", "n1", &[("skiff.dev/dataplane-mode", "ambient")], false, true, "Running"), Decision::Enroll),
            ("hostNetwork wins over labels", Some(&ambient), pod("a", "n1", &[("skiff.dev/dataplane-mode", "ambient")], true, true, "Running"), Decision::Skip(HostNetwork)),
            ("other node", Some(&ambient), pod("a", "n2", &[], false, true, "Running"), Decision::Skip(OtherNode)),
            ("mesh namespace", Some(&ambient), pod("skiff-system", "n1", &[], false, true, "Running"), Decision::Skip(SystemNamespace)),
            ("kube-system", Some(&ambient), pod("kube-system", "n1", &[], false, true, "Running"), Decision::Skip(SystemNamespace)),
            ("sidecar pod", Some(&ambient), pod("a", "n1", &sidecar, false, true, "Running"), Decision::Skip(SidecarInjected)),
            ("waypoint pod", Some(&ambient), Workload { service_account: "wp".into(), ..pod("a", "n1", &[("gateway.networking.k8s.io/gateway-name", "wp")], false, true, "Running") }, Decision::Skip(Waypoint)),
            ("labelled as a waypoint, another service account", Some(&ambient), pod("a", "n1", &[("gateway.networking.k8s.io/gateway-name", "wp")], false, true, "Running"), Decision::Enroll),
            ("no IP yet", Some(&ambient), pod("a", "n1", &[], false, false, "Pending"), Decision::Skip(NoPodIp)),
            ("succeeded", Some(&ambient), pod("a", "n1", &[], false, true, "Succeeded"), Decision::Skip(Finished)),
            ("failed", Some(&ambient), pod("a", "n1", &[], false, true, "Failed"), Decision::Skip(Finished)),
        ];
        for (name, ns, p, want) in cases {
            assert_eq!(decide("n1", ns, &p), want, "case: {name}");
        }
    }
}
