//! Where ztunnel sends a connection a captured pod opens: one pure
//! function, [`decide`], that ztunnel's outbound handler acts on and that
//! `skiff explain` prints, so the explanation is the data path's own
//! decision, not a second reading of the config.
//!
//! In order:
//! 1. loopback, the unspecified address and the pod's own mesh ports are
//!    no destination (refused, `NR`);
//! 2. a Service's ClusterIP and port: the Service; a pod's address: the
//!    pod; otherwise the ServiceEntry exported to the pod's namespace that
//!    takes the address, else outside the registry (Istio's
//!    PassthroughCluster, or its BlackHoleCluster under `REGISTRY_ONLY`);
//! 3. a Service or ServiceEntry that asks for a waypoint
//!    (`istio.io/use-waypoint` on it or its namespace) goes to the
//!    waypoint's ready replicas, which apply L7 and pick the endpoint; a
//!    waypoint with no ready replica refuses (`UH`), never a bypass;
//! 4. otherwise a Service goes to one of its ready endpoints (`UH` when it
//!    has none), anything else to the address itself (a ServiceEntry's:
//!    the endpoint it names).

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use crate::{
    egress::{self, EgressTarget, OutboundPolicy},
    model::{ServiceInfo, ServicePort, Snapshot, Workload},
};

/// What the address a pod dialled is.
#[derive(Clone, Debug)]
pub enum Destination<'s> {
    /// Loopback, unspecified, or one of the pod's own mesh ports.
    NoDestination,
    /// A Service, by its ClusterIP and port.
    Service(&'s ServiceInfo, &'s ServicePort),
    /// A pod's own address (a registered workload).
    Pod(&'s Workload),
    /// An address a ServiceEntry takes.
    Entry(EgressTarget<'s>),
    /// Outside the registry, let through (`ALLOW_ANY`: Istio's
    /// PassthroughCluster).
    Passthrough,
    /// Outside the registry, refused (`REGISTRY_ONLY`: Istio's
    /// BlackHoleCluster).
    BlackHole,
}

/// Why ztunnel refuses an outbound connection itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Not a destination (`NR`).
    NoRoute,
    /// A Service with no ready endpoint (`UH`).
    NoEndpoints,
    /// The destination's waypoint, by name, has no ready replica (`UH`).
    WaypointNotReady(String),
    /// `REGISTRY_ONLY` and not in the registry (`NR`).
    RegistryOnly,
}

/// Where it goes.
#[derive(Clone, Debug)]
pub enum Next<'s> {
    Refused(Refused),
    /// HBONE to one of the waypoint's ready replicas, asking for the
    /// address the pod dialled.
    Waypoint { name: String, namespace: String, replicas: Vec<&'s Workload> },
    /// One of these endpoints (ztunnel balances over them, round robin):
    /// HBONE when the endpoint is a captured pod, plain TCP otherwise.
    Endpoints(Vec<SocketAddrV4>),
}

/// ztunnel's decision for one outbound connection.
#[derive(Clone, Debug)]
pub struct Decision<'s> {
    pub destination: Destination<'s>,
    pub next: Next<'s>,
}

impl Decision<'_> {
    /// `(name, namespace)` of the destination Service, for metrics and logs;
    /// for an address outside Services, the ServiceEntry's host and
    /// namespace or Istio's cluster name (None for a pod's address).
    pub fn service(&self) -> Option<(String, String)> {
        match &self.destination {
            Destination::Service(s, _) => Some((s.name.clone(), s.namespace.clone())),
            Destination::Entry(e) => Some((e.host.to_owned(), e.entry.namespace.clone())),
            Destination::Passthrough => Some(("PassthroughCluster".into(), "unknown".into())),
            Destination::BlackHole => Some(("BlackHoleCluster".into(), "unknown".into())),
            Destination::NoDestination | Destination::Pod(_) => None,
        }
    }
}

/// What the connection came from and what the node knows besides the
/// cluster view.
#[derive(Clone, Copy, Debug)]
pub struct From<'a> {
    /// The pod's namespace (which ServiceEntries it sees).
    pub namespace: &'a str,
    /// The pod's address.
    pub ip: Ipv4Addr,
    /// Ports ztunnel itself listens on in every pod.
    pub mesh_ports: &'a [u16],
    /// The outbound traffic policy in force ([`outbound_policy`]).
    pub policy: OutboundPolicy,
    /// Addresses of ServiceEntries' DNS names, as last resolved.
    pub resolved: &'a HashMap<String, Vec<Ipv4Addr>>,
}

/// The outbound traffic policy in force: Istio's mesh config in the root
/// namespace (ConfigMap `istio`) when it sets one, else `default`.
pub fn outbound_policy(snap: &Snapshot, root_namespace: &str, default: OutboundPolicy) -> OutboundPolicy {
    snap.mesh_configs.get(root_namespace).and_then(|m| m.outbound_policy).unwrap_or(default)
}

/// Decides where a connection from a captured pod to `dst` (the address
/// it dialled) goes. See the module documentation for the order.
pub fn decide<'s>(snap: &'s Snapshot, from: From<'_>, dst: SocketAddrV4) -> Decision<'s> {
    let ip = *dst.ip();
    if ip.is_loopback() || ip.is_unspecified() || (ip == from.ip && from.mesh_ports.contains(&dst.port())) {
        return Decision { destination: Destination::NoDestination, next: Next::Refused(Refused::NoRoute) };
    }
    if let Some((svc, port)) = snap.service_by_vip(ip, dst.port()) {
        let destination = Destination::Service(svc, port);
        let next = match snap.waypoint_for(svc) {
            Some(wp) => waypoint(wp, &svc.namespace),
            None => {
                let eps = snap.endpoint_addrs(svc, port);
                if eps.is_empty() { Next::Refused(Refused::NoEndpoints) } else { Next::Endpoints(eps) }
            }
        };
        return Decision { destination, next };
    }
    if let Some(w) = snap.workload_by_ip(ip) {
        return Decision { destination: Destination::Pod(w), next: Next::Endpoints(vec![dst]) };
    }
    match egress::lookup(&snap.service_entries, from.namespace, dst, from.resolved) {
        Some(e) => {
            let next = match snap.waypoint_for_entry(e.entry) {
                Some(wp) => waypoint(wp, &e.entry.namespace),
                None => Next::Endpoints(vec![e.target]),
            };
            Decision { destination: Destination::Entry(e), next }
        }
        None if from.policy == OutboundPolicy::RegistryOnly => {
            Decision { destination: Destination::BlackHole, next: Next::Refused(Refused::RegistryOnly) }
        }
        None => Decision { destination: Destination::Passthrough, next: Next::Endpoints(vec![dst]) },
    }
}

/// Whether `w` is captured on its node (so its ztunnel terminates HBONE
/// for it): [`crate::enroll::decide`] on the pod's own node.
pub fn captured(snap: &Snapshot, w: &Workload) -> bool {
    let Some(node) = w.node.as_deref() else { return false };
    crate::enroll::decide(node, snap.namespace_labels(&w.namespace), w) == crate::enroll::Decision::Enroll
}

fn waypoint<'s>(wp: Result<Vec<&'s Workload>, String>, namespace: &str) -> Next<'s> {
    match wp {
        Ok(replicas) => {
            let name = replicas[0].service_account.clone();
            Next::Waypoint { name, namespace: namespace.to_owned(), replicas }
        }
        Err(name) => Next::Refused(Refused::WaypointNotReady(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::parse_documents;

    fn snapshot(yaml: &str) -> Snapshot {
        Snapshot::from_objects(parse_documents(yaml).unwrap().into_iter().map(|o| ("t.yaml".to_owned(), o)).collect()).unwrap()
    }

    const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: app, uid: a, labels: {app: a}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {phase: Running, podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: app, uid: b, labels: {app: b}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {phase: Running, podIP: 10.0.0.2}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: app}
spec: {clusterIP: 10.96.0.2, selector: {app: b}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: app}
spec: {clusterIP: 10.96.0.3, selector: {app: nobody}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: waypointed, namespace: app, labels: {istio.io/use-waypoint: wp}}
spec: {clusterIP: 10.96.0.4, selector: {app: b}, ports: [{port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: app}
spec: {hosts: [ext.example.com], addresses: [192.0.2.0/24], resolution: STATIC, ports: [{number: 443, name: tls, protocol: TLS}], endpoints: [{address: 198.51.100.7}]}
"#;

    fn from<'a>(policy: OutboundPolicy, resolved: &'a HashMap<String, Vec<Ipv4Addr>>) -> From<'a> {
        From { namespace: "app", ip: "10.0.0.1".parse().unwrap(), mesh_ports: &[15001, 15006, 15008], policy, resolved }
    }

    /// Each row: the address dialled, what it is, where it goes.
    #[test]
    fn outbound_decisions() {
        let snap = snapshot(CLUSTER);
        let none = HashMap::new();
        let rows: &[(&str, OutboundPolicy, &str, &str)] = &[
            ("127.0.0.1:80", OutboundPolicy::AllowAny, "none", "refused NoRoute"),
            ("10.0.0.1:15008", OutboundPolicy::AllowAny, "none", "refused NoRoute"),
            ("10.96.0.2:80", OutboundPolicy::AllowAny, "service app/b", "endpoints [10.0.0.2:8080]"),
            ("10.96.0.3:80", OutboundPolicy::AllowAny, "service app/empty", "refused NoEndpoints"),
            // The waypoint has no pod: refused, never straight to b.
            ("10.96.0.4:80", OutboundPolicy::AllowAny, "service app/waypointed", "refused WaypointNotReady(\"wp\")"),
            ("10.0.0.2:8080", OutboundPolicy::AllowAny, "pod app/b", "endpoints [10.0.0.2:8080]"),
            ("192.0.2.9:443", OutboundPolicy::AllowAny, "entry app/ext", "endpoints [198.51.100.7:443]"),
            ("203.0.113.1:443", OutboundPolicy::AllowAny, "passthrough", "endpoints [203.0.113.1:443]"),
            ("203.0.113.1:443", OutboundPolicy::RegistryOnly, "blackhole", "refused RegistryOnly"),
        ];
        for (dst, policy, what, next) in rows {
            let d = decide(&snap, from(*policy, &none), dst.parse().unwrap());
            let got_what = match &d.destination {
                Destination::NoDestination => "none".to_owned(),
                Destination::Service(s, _) => format!("service {}/{}", s.namespace, s.name),
                Destination::Pod(w) => format!("pod {}/{}", w.namespace, w.name),
                Destination::Entry(e) => format!("entry {}/{}", e.entry.namespace, e.entry.name),
                Destination::Passthrough => "passthrough".into(),
                Destination::BlackHole => "blackhole".into(),
            };
            let got_next = match &d.next {
                Next::Refused(r) => format!("refused {r:?}"),
                Next::Waypoint { name, .. } => format!("waypoint {name}"),
                Next::Endpoints(e) => format!("endpoints {e:?}"),
            };
            assert_eq!((got_what.as_str(), got_next.as_str()), (*what, *next), "{dst} under {policy:?}");
        }
    }
}
