//! Validated domain types built from Kubernetes objects.
//!
//! Conversion happens once, here; the data path never sees wire types.
//! Validation is per object: an object that fails is refused on its own,
//! naming the object and the field, and the last accepted version of that
//! object keeps serving (security objects with none fail closed); every
//! other object is unaffected.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
    path::PathBuf,
    str::FromStr,
};

use crate::k8s::{self, IntOrString, Object};

/// A pod, as the mesh sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Stable identity of the pod: `metadata.uid`, or `namespace/name`.
    pub uid: String,
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Workload (Deployment) name, derived as Kubernetes does from the owner
    /// ReplicaSet; the pod name for bare pods.
    pub workload_name: String,
    /// `spec.serviceAccountName`, `default` when unset.
    pub service_account: String,
    pub node: Option<String>,
    pub ip: Option<Ipv4Addr>,
    pub labels: BTreeMap<String, String>,
    pub host_network: bool,
    /// `status.phase`.
    pub phase: Option<String>,
    /// Where the pod's network namespace is (local mesh only).
    pub netns_path: Option<PathBuf>,
    /// Named container ports, for Services whose `targetPort` is a name.
    pub named_ports: BTreeMap<String, u16>,
}

impl Workload {
    /// Succeeded or Failed.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase.as_deref(), Some("Succeeded" | "Failed"))
    }

    /// Running with an IP: may receive traffic as a Service endpoint.
    pub fn is_ready(&self) -> bool {
        self.ip.is_some() && self.phase.as_deref() == Some("Running")
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target_port: TargetPort,
    pub app_protocol: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub cluster_ip: Option<Ipv4Addr>,
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePort>,
    /// A ServiceEntry's host seen as a Service (at its waypoint): the
    /// entry's name. `name` is then the host itself (a Service's name is a
    /// DNS label, never dotted; see [`crate::routing::host_matches`]).
    pub entry: Option<String>,
}

impl ServiceInfo {
    /// `name.namespace.svc.cluster.local`; a ServiceEntry's host as it is.
    pub fn hostname(&self) -> String {
        if self.entry.is_some() {
            return self.name.clone();
        }
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }

    /// One host of a ServiceEntry as a Service: its ports with their
    /// protocols (as `appProtocol`) and target ports, no selector, no
    /// cluster IP.
    pub fn from_entry(e: &crate::egress::ServiceEntry, host: &str) -> ServiceInfo {
        ServiceInfo {
            namespace: e.namespace.clone(),
            name: host.to_owned(),
            labels: e.labels.clone(),
            annotations: BTreeMap::new(),
            cluster_ip: None,
            selector: BTreeMap::new(),
            ports: e
                .ports
                .iter()
                .map(|p| ServicePort {
                    name: Some(p.name.clone()),
                    port: p.number,
                    target_port: TargetPort::Number(p.target_port.unwrap_or(p.number)),
                    app_protocol: p.protocol.as_ref().map(|x| x.to_ascii_lowercase()),
                })
                .collect(),
            entry: Some(e.name.clone()),
        }
    }

    fn selects(&self, w: &Workload) -> bool {
        !self.selector.is_empty()
            && w.namespace == self.namespace
            && self.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
    }
}

/// One consistent view of the cluster.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub namespaces: BTreeMap<String, NamespaceInfo>,
    /// Keyed by [`Workload::uid`].
    pub workloads: BTreeMap<String, Workload>,
    /// Keyed by `namespace/name`.
    pub services: BTreeMap<String, ServiceInfo>,
    pub peer_authentications: Vec<crate::policy::PeerAuthn>,
    pub authorization_policies: Vec<crate::policy::AuthzPolicy>,
    pub virtual_services: Vec<crate::routing::VirtualService>,
    pub destination_rules: Vec<crate::routing::DestinationRule>,
    pub gateways: Vec<crate::gateway::Gateway>,
    pub service_entries: Vec<crate::egress::ServiceEntry>,
    /// Istio's mesh config (ConfigMap `istio`, key `mesh`), by namespace
    /// (ztunnel reads its root namespace's).
    pub mesh_configs: BTreeMap<String, crate::egress::MeshConfig>,
    /// Telemetry objects (their tracing: waypoints and gateways).
    pub telemetries: Vec<crate::telemetry_api::TelemetryPolicy>,
    /// Secrets, by `namespace/name`: only the ingress gateway's source
    /// passes any (those of its own namespace).
    pub secrets: BTreeMap<String, SecretData>,
    /// Ports kubelet probes (liveness, readiness, startup: httpGet,
    /// tcpSocket, grpc), by [`Workload::uid`]; named ports resolved.
    pub probe_ports: BTreeMap<String, std::collections::BTreeSet<u16>>,
    /// Objects refused, each on its own, with what serves instead.
    pub rejected: Vec<Rejection>,
    /// Objects taken with a documented fail-closed reading (an
    /// AuthorizationPolicy rule with a field Skiff cannot evaluate).
    pub warnings: Vec<ModelError>,
}

/// A Secret's keys and decoded values. Its `Debug` names the keys only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretData {
    pub namespace: String,
    pub name: String,
    pub data: BTreeMap<String, Vec<u8>>,
}

impl fmt::Debug for SecretData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret {}/{} (keys {:?})", self.namespace, self.name, self.data.keys().collect::<Vec<_>>())
    }
}

/// One object that failed validation.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ModelError {
    /// Where the object came from (file and document, or API path).
    pub origin: String,
    /// `Kind namespace/name`.
    pub object: String,
    /// The field at fault, as a path (`status.podIP`).
    pub field: String,
    pub message: String,
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: field `{}`: {}", self.origin, self.object, self.field, self.message)
    }
}

/// Which object a rejection is about.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct ObjectKey {
    pub kind: &'static str,
    /// Empty for cluster-scoped kinds.
    pub namespace: String,
    pub name: String,
}

/// What serves in place of a refused object.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Instead {
    /// The version accepted before keeps serving.
    Previous,
    /// A security object with no accepted version: a stand-in that fails
    /// closed (what it does).
    FailClosed(&'static str),
    /// Nothing: there was no accepted version.
    Nothing,
    /// Another object (the first definition, the first owner of an address).
    Other,
}

impl fmt::Display for Instead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Instead::Previous => f.write_str("the last accepted version keeps serving"),
            Instead::FailClosed(what) => write!(f, "fails closed: {what}"),
            Instead::Nothing => f.write_str("not in force (no accepted version)"),
            Instead::Other => f.write_str("the other object stays in force"),
        }
    }
}

/// An object Skiff refused, why, and what serves instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub error: ModelError,
    pub key: ObjectKey,
    pub instead: Instead,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}; {}", self.error, self.instead)
    }
}

impl Rejection {
    /// For the admin port and `skiff analyze -o json`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "origin": self.error.origin, "object": self.error.object, "kind": self.key.kind,
            "namespace": self.key.namespace, "name": self.key.name, "field": self.error.field,
            "reason": self.error.message, "instead": self.instead.to_string(),
        })
    }
}

/// Logs each refused object and each fail-closed reading once per version
/// of the problem (not at every snapshot), and says when one is resolved.
#[derive(Debug, Default)]
pub struct RejectionLog {
    seen: BTreeSet<String>,
}

impl RejectionLog {
    pub fn report(&mut self, snap: &Snapshot) {
        let mut now = BTreeSet::new();
        for r in &snap.rejected {
            let line = r.to_string();
            if !self.seen.contains(&line) {
                tracing::error!(origin = %r.error.origin, object = %r.error.object, field = %r.error.field,
                    reason = %r.error.message, instead = %r.instead, "config object refused");
            }
            now.insert(line);
        }
        for w in &snap.warnings {
            let line = format!("warning: {w}");
            if !self.seen.contains(&line) {
                tracing::warn!(origin = %w.origin, object = %w.object, field = %w.field, reason = %w.message,
                    "config object taken with a fail-closed reading");
            }
            now.insert(line);
        }
        for gone in self.seen.difference(&now) {
            tracing::info!(problem = %gone, "config problem resolved");
        }
        self.seen = now;
    }
}

impl Snapshot {
    /// Refused objects by (kind, namespace), for the
    /// `skiff_config_rejected_objects` gauge.
    pub fn rejected_counts(&self) -> BTreeMap<(&'static str, String), i64> {
        let mut out = BTreeMap::new();
        for r in &self.rejected {
            *out.entry((r.key.kind, r.key.namespace.clone())).or_insert(0) += 1;
        }
        out
    }
}

/// The kinds the model holds, by name (`""` for others).
fn kind_name(kind: &str) -> &'static str {
    match kind {
        "Namespace" => "Namespace",
        "Pod" => "Pod",
        "Service" => "Service",
        "PeerAuthentication" => "PeerAuthentication",
        "AuthorizationPolicy" => "AuthorizationPolicy",
        "VirtualService" => "VirtualService",
        "DestinationRule" => "DestinationRule",
        "Gateway" => "Gateway",
        "Secret" => "Secret",
        "ServiceEntry" => "ServiceEntry",
        "Telemetry" => "Telemetry",
        "ConfigMap" => "ConfigMap",
        _ => "",
    }
}

/// Every validation error of a rejected snapshot.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{} invalid object(s): {}", .0.len(), .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
pub struct ModelErrors(pub Vec<ModelError>);

fn workload_name(pod: &k8s::Pod, name: &str) -> String {
    for owner in &pod.metadata.owner_references {
        match owner.kind.as_str() {
            // Deployment-owned ReplicaSets are named <deployment>-<hash>.
            "ReplicaSet" => {
                return match owner.name.rsplit_once('-') {
                    Some((deploy, hash)) if !deploy.is_empty() && !hash.is_empty() => deploy.to_owned(),
                    _ => owner.name.clone(),
                }
            }
            "StatefulSet" | "DaemonSet" | "Job" | "Deployment" => return owner.name.clone(),
            _ => {}
        }
    }
    name.to_owned()
}

/// An optional IPv4 address field (`None`, empty or absent: no address).
/// The IPv4 address among a primary address and its per-family list
/// (`podIP`/`podIPs`, `clusterIP`/`clusterIPs`): every entry must be an IP
/// address (IPv4 or IPv6); the data path carries IPv4, so the first IPv4
/// one is taken. `Ok((None, Some(v6)))` when there is only IPv6: the
/// object is kept without an address (it affects nothing else) and the
/// caller reports it.
fn parse_ip<'a>(primary: Option<&'a str>, all: impl Iterator<Item = &'a str>, field: &str, list_field: &str) -> Result<(Option<Ipv4Addr>, Option<String>), (String, String)> {
    let set = |s: &&str| !s.is_empty() && *s != "None";
    let mut v4 = None;
    let mut v6 = None;
    let entries = primary.filter(set).map(|p| (field.to_owned(), p)).into_iter();
    for (f, raw) in entries.chain(all.filter(set).enumerate().map(|(i, a)| (format!("{list_field}[{i}]"), a))) {
        match std::net::IpAddr::from_str(raw) {
            Ok(std::net::IpAddr::V4(a)) => v4 = v4.or(Some(a)),
            Ok(std::net::IpAddr::V6(_)) => v6 = v6.or(Some(raw.to_owned())),
            Err(_) => return Err((f, format!("{raw:?} is not an IP address"))),
        }
    }
    Ok((v4, if v4.is_none() { v6 } else { None }))
}

/// What a fail-closed stand-in is built from: the object as written (its
/// selector, targets and action), for the security kinds; nothing for the
/// others.
fn stand_in_input(obj: &Object) -> serde_json::Value {
    match obj {
        Object::Invalid(o) => o.raw.clone(),
        Object::PeerAuthentication(o) => serde_json::to_value(o).unwrap_or_default(),
        Object::AuthorizationPolicy(o) => serde_json::to_value(o).unwrap_or_default(),
        _ => serde_json::Value::Null,
    }
}

/// Owners that share an address with another: each `(key, address, the
/// others' names)`. Which of them really holds the address is unknown, so
/// every one is refused.
fn shared_addresses(owners: impl Iterator<Item = (String, Ipv4Addr, String)>) -> Vec<(String, Ipv4Addr, String)> {
    let mut by_ip: BTreeMap<Ipv4Addr, Vec<(String, String)>> = BTreeMap::new();
    for (key, ip, name) in owners {
        by_ip.entry(ip).or_default().push((key, name));
    }
    let mut out = Vec::new();
    for (ip, owners) in by_ip.into_iter().filter(|(_, o)| o.len() > 1) {
        for (i, (key, _)) in owners.iter().enumerate() {
            let others: Vec<&str> = owners.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, (_, n))| n.as_str()).collect();
            out.push((key.clone(), ip, others.join(", ")));
        }
    }
    out
}

impl Snapshot {
    /// Builds a snapshot from parsed objects, each with its origin, and
    /// fails if any object is refused (tests, offline checks). Kinds the
    /// model does not hold (Deployments, unknown kinds) are ignored.
    pub fn from_objects(objects: Vec<(String, Object)>) -> Result<Snapshot, ModelErrors> {
        let snap = Snapshot::build(objects, None);
        if snap.rejected.is_empty() {
            Ok(snap)
        } else {
            Err(ModelErrors(snap.rejected.iter().map(|r| r.error.clone()).collect()))
        }
    }

    /// Builds a snapshot object by object: an object that cannot be taken
    /// is refused on its own (listed in [`Snapshot::rejected`]) and the rest
    /// is served. In its place, the version of it accepted in `previous`
    /// keeps serving; with none, a security object fails closed
    /// (a PeerAuthentication reads as STRICT, an ALLOW AuthorizationPolicy
    /// allows nothing, a DENY one denies everything, each for the workloads
    /// it selects — all of the namespace when its selector cannot be read)
    /// and any other object is absent.
    pub fn build(objects: Vec<(String, Object)>, previous: Option<&Snapshot>) -> Snapshot {
        let mut snap = Snapshot::default();
        let mut seen = BTreeSet::new();
        for (origin, obj) in objects {
            let object = obj.describe();
            let err = |field: &str, message: String| ModelError {
                origin: origin.clone(),
                object: object.clone(),
                field: field.to_owned(),
                message,
            };
            let (kind, meta_ns, meta_name) = match &obj {
                Object::Namespace(o) => ("Namespace", None, o.metadata.name.clone()),
                Object::Pod(o) => ("Pod", o.metadata.namespace.clone(), o.metadata.name.clone()),
                Object::Service(o) => ("Service", o.metadata.namespace.clone(), o.metadata.name.clone()),
                Object::PeerAuthentication(o) => ("PeerAuthentication", o.metadata.namespace.clone(), o.metadata.name.clone()),
                Object::AuthorizationPolicy(o) => ("AuthorizationPolicy", o.metadata.namespace.clone(), o.metadata.name.clone()),
                Object::VirtualService(o) => ("VirtualService", o.metadata.namespace.clone(), o.metadata.name.clone()),
                Object::DestinationRule(o) => ("DestinationRule", o.metadata.namespace.clone(), o.metadata.name.clone()),
                Object::Gateway(o) => ("Gateway", o.metadata.namespace.clone(), o.metadata.name.clone()),
                Object::Secret(o) => ("Secret", o.metadata.namespace.clone(), o.metadata.name.clone()),
                Object::ServiceEntry(o) => ("ServiceEntry", o.metadata.namespace.clone(), o.metadata.name.clone()),
                Object::Telemetry(o) => ("Telemetry", o.metadata.namespace.clone(), o.metadata.name.clone()),
                // Only Istio's mesh config is read.
                Object::ConfigMap(o) if o.metadata.name.as_deref() != Some(crate::egress::MESH_CONFIG_MAP) => continue,
                Object::ConfigMap(o) => ("ConfigMap", o.metadata.namespace.clone(), o.metadata.name.clone()),
                Object::Invalid(o) if o.kind == "ConfigMap" && o.name != crate::egress::MESH_CONFIG_MAP => continue,
                Object::Invalid(o) => (kind_name(&o.kind), o.namespace.clone(), Some(o.name.clone())),
                Object::Deployment(_) | Object::Other { .. } => continue,
            };
            if kind.is_empty() {
                // Invalid objects of kinds the model does not hold (a
                // Deployment): the local mesh's business.
                continue;
            }
            let key = ObjectKey {
                kind,
                namespace: if kind == "Namespace" { String::new() } else { meta_ns.unwrap_or_else(|| "default".into()) },
                name: meta_name.clone().unwrap_or_default(),
            };
            let Some(name) = meta_name.filter(|n| !n.is_empty()) else {
                // Nothing identifies it; a security object still fails
                // closed under a name of its own.
                let key = ObjectKey { name: "<unnamed>".into(), ..key };
                let instead = snap.stand_in(&key, &stand_in_input(&obj), None);
                snap.rejected.push(Rejection { error: err("metadata.name", "required".into()), key, instead });
                continue;
            };
            if !seen.insert(object.clone()) {
                // The first definition stays; this one is refused.
                snap.rejected.push(Rejection { error: err("metadata.name", "defined more than once".into()), key, instead: Instead::Other });
                continue;
            }
            let Err(refused) = snap.accept(&obj, name, &origin, &object) else { continue };
            let instead = snap.stand_in(&key, &stand_in_input(&obj), previous);
            snap.rejected.push(Rejection { error: refused, key, instead });
        }
        // Addresses identify workloads and Services: two live owners of one
        // address would make identity and routing ambiguous.
        let pods = snap
            .workloads
            .values()
            .filter(|w| !w.host_network && !w.is_finished())
            .filter_map(|w| Some((w.uid.clone(), w.ip?, format!("pod {}/{}", w.namespace, w.name))));
        for (uid, ip, others) in shared_addresses(pods) {
            if let Some(w) = snap.workloads.remove(&uid) {
                snap.probe_ports.remove(&uid);
                snap.rejected.push(Rejection {
                    error: ModelError {
                        origin: "cluster".into(),
                        object: format!("Pod {}/{}", w.namespace, w.name),
                        field: "status.podIP".into(),
                        message: format!("{ip} is also the IP of {others}"),
                    },
                    key: ObjectKey { kind: "Pod", namespace: w.namespace, name: w.name },
                    instead: Instead::Other,
                });
            }
        }
        let services = snap.services.iter().filter_map(|(k, s)| Some((k.clone(), s.cluster_ip?, k.clone())));
        for (k, ip, others) in shared_addresses(services) {
            if let Some(s) = snap.services.remove(&k) {
                snap.rejected.push(Rejection {
                    error: ModelError {
                        origin: "cluster".into(),
                        object: format!("Service {}/{}", s.namespace, s.name),
                        field: "spec.clusterIP".into(),
                        message: format!("{ip} is also the ClusterIP of {others}"),
                    },
                    key: ObjectKey { kind: "Service", namespace: s.namespace, name: s.name },
                    instead: Instead::Other,
                });
            }
        }
        snap
    }

    /// Takes one object into the snapshot, or says why not (the first
    /// problem, naming the field).
    fn accept(&mut self, obj: &Object, name: String, origin: &str, object: &str) -> Result<(), ModelError> {
        let err = |field: &str, message: String| ModelError {
            origin: origin.to_owned(),
            object: object.to_owned(),
            field: field.to_owned(),
            message,
        };
        // The IPv4 address; an IPv6-only object is kept without one and
        // reported (IPv6 is not carried yet).
        let mut ipv6_only = |primary: Option<&str>, all: Vec<&str>, field: &str, list: &str| -> Result<Option<Ipv4Addr>, ModelError> {
            let (v4, v6) = parse_ip(primary, all.into_iter(), field, list).map_err(|(f, m)| err(&f, m))?;
            if let Some(v6) = v6 {
                self.warnings.push(err(field, format!("{v6}: IPv6 is not carried by Skiff yet; the object is kept without an address")));
            }
            Ok(v4)
        };
        match obj {
            Object::Namespace(ns) => {
                self.namespaces.insert(name.clone(), NamespaceInfo { name, labels: ns.metadata.labels.clone() });
            }
            Object::Pod(pod) => {
                let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
                let ip = ipv6_only(pod.status.pod_ip.as_deref(), pod.status.pod_ips.iter().map(|p| p.ip.as_str()).collect(), "status.podIP", "status.podIPs")?;
                let mut named_ports = BTreeMap::new();
                for c in &pod.spec.containers {
                    for p in &c.ports {
                        if let Some(n) = &p.name {
                            named_ports.insert(n.clone(), p.container_port);
                        }
                    }
                }
                let w = Workload {
                    uid: pod.metadata.uid.clone().unwrap_or_else(|| format!("{namespace}/{name}")),
                    workload_name: workload_name(pod, &name),
                    service_account: pod.spec.service_account_name.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| "default".into()),
                    node: pod.spec.node_name.clone(),
                    ip,
                    labels: pod.metadata.labels.clone(),
                    host_network: pod.spec.host_network.unwrap_or(false),
                    phase: pod.status.phase.clone(),
                    netns_path: pod.metadata.annotations.get(crate::ANNOTATION_LOCAL_NETNS).map(PathBuf::from),
                    named_ports,
                    namespace,
                    name,
                };
                if self.workloads.contains_key(&w.uid) {
                    return Err(err("metadata.uid", format!("uid {:?} is used by another pod", w.uid)));
                }
                if let Some(gw) = w.labels.get(crate::LABEL_GATEWAY_NAME).filter(|gw| **gw != w.service_account) {
                    self.warnings.push(err(
                        &format!("metadata.labels[{}]", crate::LABEL_GATEWAY_NAME),
                        format!(
                            "labelled as waypoint {gw:?} but runs as service account {:?}: a waypoint's pods run as the service account named like it, so this pod is not taken for the waypoint (no traffic, no waypoint certificate)",
                            w.service_account
                        ),
                    ));
                }
                let probes: std::collections::BTreeSet<u16> = pod
                    .spec
                    .containers
                    .iter()
                    .flat_map(|c| [&c.liveness_probe, &c.readiness_probe, &c.startup_probe])
                    .flatten()
                    .flat_map(|p| [&p.http_get, &p.tcp_socket, &p.grpc])
                    .flatten()
                    .filter_map(|t| match t.port.as_ref()? {
                        crate::k8s::IntOrString::Int(n) => Some(*n),
                        crate::k8s::IntOrString::String(name) => w.named_ports.get(name).copied(),
                    })
                    .collect();
                if !probes.is_empty() {
                    self.probe_ports.insert(w.uid.clone(), probes);
                }
                self.workloads.insert(w.uid.clone(), w);
            }
            Object::Service(svc) => {
                let namespace = svc.metadata.namespace.clone().unwrap_or_else(|| "default".into());
                // A DNS-1035 label, as Kubernetes requires: a dotted name
                // would read as a ServiceEntry's host.
                if name.is_empty() || name.len() > 63 || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
                    return Err(err("metadata.name", format!("{name:?} is not a Service name (a DNS-1035 label: lower-case letters, digits, '-')")));
                }
                let cluster_ip = ipv6_only(svc.spec.cluster_ip.as_deref(), svc.spec.cluster_ips.iter().map(String::as_str).collect(), "spec.clusterIP", "spec.clusterIPs")?;
                let mut ports = Vec::new();
                for (i, p) in svc.spec.ports.iter().enumerate() {
                    if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
                        continue;
                    }
                    let target_port = match &p.target_port {
                        None => TargetPort::Number(p.port),
                        Some(IntOrString::Int(n)) => TargetPort::Number(*n),
                        Some(IntOrString::String(s)) => match s.parse::<u16>() {
                            Ok(n) => TargetPort::Number(n),
                            Err(_) if !s.is_empty() => TargetPort::Name(s.clone()),
                            Err(_) => return Err(err(&format!("spec.ports[{i}].targetPort"), "empty".into())),
                        },
                    };
                    if p.port == 0 {
                        return Err(err(&format!("spec.ports[{i}].port"), "must be 1-65535".into()));
                    }
                    ports.push(ServicePort { name: p.name.clone(), port: p.port, target_port, app_protocol: p.app_protocol.clone() });
                }
                if let Some(v) = svc.metadata.annotations.get(crate::routing::ANNOTATION_RATE_LIMIT) {
                    if crate::routing::RateLimit::parse(v).is_none() {
                        return Err(err(
                            &format!("metadata.annotations[{}]", crate::routing::ANNOTATION_RATE_LIMIT),
                            format!("{v:?} is not <requests>/<s|m|h>, e.g. 100/s"),
                        ));
                    }
                }
                let key = format!("{namespace}/{name}");
                self.services.insert(
                    key,
                    ServiceInfo {
                        namespace,
                        name,
                        labels: svc.metadata.labels.clone(),
                        annotations: svc.metadata.annotations.clone(),
                        cluster_ip,
                        selector: svc.spec.selector.clone(),
                        ports,
                        entry: None,
                    },
                );
            }
            Object::PeerAuthentication(pa) => {
                let p = crate::policy::peer_authn_from(pa).map_err(|(f, m)| err(&f, m))?;
                self.peer_authentications.push(p);
            }
            Object::AuthorizationPolicy(ap) => {
                let p = crate::policy::authz_from(ap).map_err(|(f, m)| err(&f, m))?;
                for r in &p.rules {
                    for field in &r.unsupported {
                        self.warnings.push(err(
                            field,
                            match p.action {
                                crate::policy::Action::Allow => "not a field Skiff can evaluate: this ALLOW rule never matches (fail closed)".into(),
                                _ => "not a field Skiff can evaluate: the rule matches on its other fields (fail closed)".into(),
                            },
                        ));
                    }
                }
                self.authorization_policies.push(p);
            }
            Object::VirtualService(v) => {
                let v = crate::routing::virtual_service_from(v).map_err(|(f, m)| err(&f, m))?;
                self.virtual_services.push(v);
            }
            Object::DestinationRule(d) => {
                let d = crate::routing::destination_rule_from(d).map_err(|(f, m)| err(&f, m))?;
                self.destination_rules.push(d);
            }
            Object::Gateway(g) => {
                let (g, warnings) = crate::gateway::gateway_from(g).map_err(|(f, m)| err(&f, m))?;
                self.warnings.extend(warnings.into_iter().map(|(f, m)| err(&f, m)));
                self.gateways.push(g);
            }
            Object::ConfigMap(cm) => {
                let namespace = cm.metadata.namespace.clone().unwrap_or_else(|| "default".into());
                let text = cm.data.get(crate::egress::MESH_CONFIG_KEY).map(String::as_str).unwrap_or("");
                let mc = crate::egress::mesh_config_from(text).map_err(|(f, m)| err(&f, m))?;
                if !mc.not_read.is_empty() {
                    self.warnings.push(err(
                        &format!("data.{}", crate::egress::MESH_CONFIG_KEY),
                        format!("Skiff reads outboundTrafficPolicy, extensionProviders (tracing: zipkin, opentelemetry over http) and defaultProviders.tracing from the mesh config; these fields are not read: {}", mc.not_read.join(", ")),
                    ));
                }
                self.mesh_configs.insert(namespace, mc);
            }
            Object::ServiceEntry(e) => {
                let e = crate::egress::service_entry_from(e).map_err(|(f, m)| err(&f, m))?;
                self.service_entries.push(e);
            }
            Object::Telemetry(t) => {
                let t = crate::telemetry_api::telemetry_from(t).map_err(|(f, m)| err(&f, m))?;
                self.telemetries.push(t);
            }
            Object::Secret(sec) => {
                use base64::Engine as _;
                let namespace = sec.metadata.namespace.clone().unwrap_or_else(|| "default".into());
                let mut data = BTreeMap::new();
                for (k, v) in &sec.data {
                    // The API's encoding; manifests may wrap long values.
                    let compact: String = v.chars().filter(|c| !c.is_ascii_whitespace()).collect();
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(compact)
                        .map_err(|e| err(&format!("data[{k}]"), format!("not base64: {e}")))?;
                    data.insert(k.clone(), bytes);
                }
                for (k, v) in &sec.string_data {
                    data.insert(k.clone(), v.clone().into_bytes());
                }
                self.secrets.insert(format!("{namespace}/{name}"), SecretData { namespace, name, data });
            }
            Object::Invalid(o) => return Err(err(&o.field, o.message.clone())),
            Object::Deployment(_) | Object::Other { .. } => {}
        }
        Ok(())
    }

    /// What serves in place of a refused object: its version in `previous`,
    /// or for security kinds a fail-closed stand-in, or nothing.
    fn stand_in(&mut self, key: &ObjectKey, raw: &serde_json::Value, previous: Option<&Snapshot>) -> Instead {
        let same = |ns: &str, name: &str| ns == key.namespace && name == key.name;
        if let Some(prev) = previous {
            // Security objects are never carried over (the last version
            // may be looser than the one refused: a stand-in fails closed
            // instead); nor are Pods and Services, whose addresses may
            // since belong to someone else.
            let carried = match key.kind {
                "Namespace" => prev.namespaces.get(&key.name).cloned().map(|n| self.namespaces.insert(n.name.clone(), n)).is_some(),
                "VirtualService" => prev.virtual_services.iter().find(|p| same(&p.namespace, &p.name)).cloned().map(|p| self.virtual_services.push(p)).is_some(),
                "DestinationRule" => prev.destination_rules.iter().find(|p| same(&p.namespace, &p.name)).cloned().map(|p| self.destination_rules.push(p)).is_some(),
                "Gateway" => prev.gateways.iter().find(|p| same(&p.namespace, &p.name)).cloned().map(|p| self.gateways.push(p)).is_some(),
                "ServiceEntry" => prev.service_entries.iter().find(|p| same(&p.namespace, &p.name)).cloned().map(|p| self.service_entries.push(p)).is_some(),
                "Telemetry" => prev.telemetries.iter().find(|p| same(&p.namespace, &p.name)).cloned().map(|p| self.telemetries.push(p)).is_some(),
                "ConfigMap" => prev.mesh_configs.get(&key.namespace).cloned().map(|p| self.mesh_configs.insert(key.namespace.clone(), p)).is_some(),
                "Secret" => {
                    let k = format!("{}/{}", key.namespace, key.name);
                    prev.secrets.get(&k).cloned().map(|p| self.secrets.insert(k, p)).is_some()
                }
                _ => false,
            };
            if carried {
                return Instead::Previous;
            }
        }
        let spec = raw.get("spec").cloned().unwrap_or_default();
        // matchLabels as a string map, or None (all of the namespace) when
        // absent or unreadable: the wider scope is the stricter one.
        let selector = spec
            .get("selector")
            .and_then(|s| s.get("matchLabels"))
            .and_then(|m| serde_json::from_value::<BTreeMap<String, String>>(m.clone()).ok())
            .filter(|m| !m.is_empty());
        match key.kind {
            "ConfigMap" => {
                // A mesh config that cannot be read may be the one that
                // locks egress down: REGISTRY_ONLY until it is fixed.
                self.mesh_configs.insert(
                    key.namespace.clone(),
                    crate::egress::MeshConfig { outbound_policy: Some(crate::egress::OutboundPolicy::RegistryOnly), ..Default::default() },
                );
                Instead::FailClosed("outboundTrafficPolicy REGISTRY_ONLY")
            }
            "PeerAuthentication" => {
                self.peer_authentications.push(crate::policy::PeerAuthn {
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    selector,
                    mode: crate::policy::MtlsMode::Strict,
                    port_modes: BTreeMap::new(),
                    fail_closed: true,
                    created: None,
                });
                Instead::FailClosed("STRICT for the workloads it selects")
            }
            "AuthorizationPolicy" => {
                use crate::policy::{Action, AuthzPolicy, Rule};
                let action = spec.get("action").and_then(|a| a.as_str()).unwrap_or("ALLOW");
                let (action, rules, what) = match action {
                    "AUDIT" => return Instead::Nothing,
                    "ALLOW" => (Action::Allow, vec![], "an ALLOW policy that allows nothing"),
                    _ => (Action::Deny, vec![Rule::default()], "a DENY policy that denies everything"),
                };
                // Bound to a waypoint or Service when targetRefs can be read;
                // otherwise enforced namespace-wide by ztunnel.
                let refs: Vec<(String, String)> = spec
                    .get("targetRefs")
                    .and_then(|r| r.as_array().cloned())
                    .or_else(|| spec.get("targetRef").map(|r| vec![r.clone()]))
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|r| Some((r.get("kind")?.as_str()?.to_owned(), r.get("name")?.as_str()?.to_owned())))
                    .collect();
                let base = AuthzPolicy {
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    selector,
                    targets_waypoint: false,
                    target_refs: vec![],
                    action,
                    rules,
                };
                // Where it was meant to apply: its targets (the waypoint
                // enforces it), its selector or, when it has targets that
                // cannot be read or a selector too, namespace-wide at
                // ztunnel as well.
                if !refs.is_empty() {
                    self.authorization_policies.push(AuthzPolicy { selector: None, targets_waypoint: true, target_refs: refs.clone(), ..base.clone() });
                }
                // A target of a kind no waypoint here matches by name
                // (GatewayClass, ServiceEntry, …) or a target that cannot be
                // read: the stand-in also holds namespace-wide (mesh-wide in
                // the root namespace) at ztunnel, so it binds somewhere.
                let raw_refs = spec.get("targetRefs").and_then(|r| r.as_array().map(Vec::len)).unwrap_or(0) + usize::from(spec.get("targetRef").is_some());
                let unbound = refs.len() < raw_refs || refs.iter().any(|(kind, _)| kind != "Gateway" && kind != "Service");
                if refs.is_empty() || unbound || spec.get("selector").is_some() {
                    self.authorization_policies.push(base);
                }
                Instead::FailClosed(what)
            }
            _ => Instead::Nothing,
        }
    }

    /// Labels of a namespace (empty for a namespace with no object).
    /// The port a gateway pod listens on for a Gateway server numbered
    /// `number`: as Istio, the `targetPort` of that port of a Service
    /// selecting the pod (a named target resolved on the pod), else the
    /// number itself.
    pub fn gateway_listen_port(&self, pod: &Workload, number: u16) -> u16 {
        for svc in self.services_of(pod) {
            if let Some(p) = svc.ports.iter().find(|p| p.port == number) {
                match &p.target_port {
                    TargetPort::Number(n) => return *n,
                    TargetPort::Name(name) => {
                        if let Some(n) = pod.named_ports.get(name) {
                            return *n;
                        }
                    }
                }
            }
        }
        number
    }

    /// The Gateway servers a gateway pod opens: those of the Gateways
    /// selecting it, that Skiff serves, each on its listening port; older
    /// Gateways first.
    pub fn gateway_servers(&self, pod: &Workload) -> Vec<crate::gateway::Opened<'_>> {
        let mut gws: Vec<&crate::gateway::Gateway> = self.gateways.iter().filter(|g| g.selects(&pod.labels)).collect();
        gws.sort_by_key(|g| (g.created.is_none(), g.created.clone(), g.namespace.clone(), g.name.clone()));
        gws.into_iter()
            .flat_map(|g| g.servers.iter().filter(|s| s.not_served.is_none()).map(move |s| (g, s)))
            .map(|(gateway, server)| crate::gateway::Opened { gateway, server, port: self.gateway_listen_port(pod, server.number) })
            .collect()
    }

    pub fn namespace_labels(&self, ns: &str) -> Option<&BTreeMap<String, String>> {
        self.namespaces.get(ns).map(|n| &n.labels)
    }

    /// The live pod with this IP (finished pods may still report an IP that
    /// has since been reused).
    pub fn workload_by_ip(&self, ip: Ipv4Addr) -> Option<&Workload> {
        self.workloads.values().find(|w| w.ip == Some(ip) && !w.host_network && !w.is_finished())
    }

    /// The Service (and port) whose ClusterIP and port are `ip:port`.
    pub fn service_by_vip(&self, ip: Ipv4Addr, port: u16) -> Option<(&ServiceInfo, &ServicePort)> {
        self.services.values().find_map(|s| {
            if s.cluster_ip != Some(ip) {
                return None;
            }
            s.ports.iter().find(|p| p.port == port).map(|p| (s, p))
        })
    }

    /// Ready endpoints of a Service port: each pod with the port to dial.
    pub fn endpoints(&self, svc: &ServiceInfo, port: &ServicePort) -> Vec<(&Workload, u16)> {
        let mut out: Vec<(&Workload, u16)> = self
            .workloads
            .values()
            .filter(|w| w.is_ready() && svc.selects(w))
            .filter_map(|w| {
                let target = match &port.target_port {
                    TargetPort::Number(n) => *n,
                    TargetPort::Name(name) => *w.named_ports.get(name)?,
                };
                Some((w, target))
            })
            .collect();
        out.sort_by_key(|(w, _)| (w.ip, w.uid.clone()));
        out
    }

    /// [`Self::endpoints`] as the addresses to dial.
    pub fn endpoint_addrs(&self, svc: &ServiceInfo, port: &ServicePort) -> Vec<std::net::SocketAddrV4> {
        self.endpoints(svc, port).into_iter().filter_map(|(w, p)| Some(std::net::SocketAddrV4::new(w.ip?, p))).collect()
    }

    /// The waypoint a Service's traffic goes through: the Service's
    /// `istio.io/use-waypoint` (or `skiff.dev/use-waypoint`) label, else its
    /// namespace's; `none` opts out. Returns that waypoint's ready pods in
    /// the Service's namespace ([`Self::waypoint_pods`]), or the name when
    /// none is ready.
    pub fn waypoint_for(&self, svc: &ServiceInfo) -> Option<Result<Vec<&Workload>, String>> {
        Some(self.ready_waypoint(&svc.namespace, self.waypoint_name_for(svc)?))
    }

    /// Waypoint `name`'s ready pods in `namespace`, or its name when none is.
    fn ready_waypoint(&self, namespace: &str, name: String) -> Result<Vec<&Workload>, String> {
        let pods = self.waypoint_pods(namespace, &name);
        if pods.is_empty() { Err(name) } else { Ok(pods) }
    }

    /// The waypoint a Service asks for (its own label, else its
    /// namespace's), unless `none`.
    pub fn waypoint_name_for(&self, svc: &ServiceInfo) -> Option<String> {
        self.waypoint_name_by(&svc.labels, &svc.namespace)
    }

    /// The waypoint a ServiceEntry's traffic goes through, as for a
    /// Service: its own `istio.io/use-waypoint` label, else its
    /// namespace's (Istio's ambient egress puts the entries in a namespace
    /// enrolled to a waypoint).
    pub fn waypoint_name_for_entry(&self, e: &crate::egress::ServiceEntry) -> Option<String> {
        self.waypoint_name_by(&e.labels, &e.namespace)
    }

    /// What asks for a ServiceEntry's waypoint when the entry has none, so
    /// it does not happen: DestinationRules that originate TLS for one of
    /// its hosts (ztunnel passes the app's bytes as they are) and
    /// AuthorizationPolicies whose `targetRefs` name it (nothing enforces
    /// them). Each as (object, what), for a warning.
    pub fn entry_config_without_waypoint(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for e in self.service_entries.iter().filter(|e| self.waypoint_name_for_entry(e).is_none()) {
            for dr in &self.destination_rules {
                let policies = std::iter::once(&dr.traffic_policy).chain(dr.subset_policies.values());
                let originates = policies.flat_map(|p| std::iter::once(p).chain(p.ports.values())).any(|p| p.tls.as_ref().is_some_and(|t| t.originates()));
                if originates && e.hosts.iter().any(|h| crate::routing::host_matches(&dr.host, &dr.namespace, h, &e.namespace)) {
                    out.push((
                        format!("DestinationRule {}/{}", dr.namespace, dr.name),
                        format!("originates TLS for ServiceEntry {}/{}, which has no waypoint (istio.io/use-waypoint): only a waypoint originates TLS; its traffic leaves as the app sends it", e.namespace, e.name),
                    ));
                }
            }
            for p in self.authorization_policies.iter().filter(|p| p.namespace == e.namespace && p.target_refs.iter().any(|(k, n)| k == "ServiceEntry" && *n == e.name)) {
                out.push((
                    format!("AuthorizationPolicy {}", p.key()),
                    format!("targets ServiceEntry {}/{}, which has no waypoint (istio.io/use-waypoint): nothing enforces it", e.namespace, e.name),
                ));
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// [`Self::waypoint_for`] for a ServiceEntry.
    pub fn waypoint_for_entry(&self, e: &crate::egress::ServiceEntry) -> Option<Result<Vec<&Workload>, String>> {
        Some(self.ready_waypoint(&e.namespace, self.waypoint_name_for_entry(e)?))
    }

    /// The ServiceEntry a Service view of one of its hosts came from
    /// ([`ServiceInfo::from_entry`]); None for a Service.
    pub fn entry_of(&self, svc: &ServiceInfo) -> Option<&crate::egress::ServiceEntry> {
        let name = svc.entry.as_ref()?;
        self.service_entries.iter().find(|e| e.namespace == svc.namespace && &e.name == name)
    }

    fn waypoint_name_by(&self, labels: &BTreeMap<String, String>, namespace: &str) -> Option<String> {
        let label = |l: &BTreeMap<String, String>| {
            l.get(crate::LABEL_USE_WAYPOINT).or_else(|| l.get(crate::LABEL_SKIFF_USE_WAYPOINT)).cloned()
        };
        let name = label(labels).or_else(|| self.namespace_labels(namespace).and_then(label))?;
        (name != "none" && !name.is_empty()).then_some(name)
    }

    /// The ready pods of waypoint `name` in `namespace`, by IP: labelled
    /// with the gateway name *and* running as the waypoint's own service
    /// account, named like it (as Istio's generated waypoints and Skiff's
    /// template do). A pod that only carries the label — anyone who can
    /// create a pod can add it — is not one (the snapshot warns about it).
    pub fn waypoint_pods(&self, namespace: &str, name: &str) -> Vec<&Workload> {
        let mut pods: Vec<&Workload> = self
            .workloads
            .values()
            .filter(|w| {
                w.namespace == namespace
                    && w.is_ready()
                    && w.labels.get(crate::LABEL_GATEWAY_NAME).is_some_and(|l| l == name)
                    && w.service_account == name
            })
            .collect();
        pods.sort_by_key(|w| w.ip);
        pods
    }

    /// Services that select a workload, for metrics labels.
    pub fn services_of<'a>(&'a self, w: &'a Workload) -> impl Iterator<Item = &'a ServiceInfo> + 'a {
        self.services.values().filter(move |s| s.selects(w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::parse_documents;

    fn snap(text: &str) -> Result<Snapshot, ModelErrors> {
        let objs = parse_documents(text).unwrap().into_iter().map(|o| ("test.yaml".to_owned(), o)).collect();
        Snapshot::from_objects(objs)
    }

    /// A DestinationRule that originates TLS for, or a policy that
    /// targets, a ServiceEntry without a waypoint is named (nothing would
    /// do what it asks); with the namespace's waypoint, nothing is.
    #[test]
    fn config_that_needs_a_service_entrys_waypoint_is_named_when_it_has_none() {
        let yaml = |ns_labels: &str| {
            format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: egress, labels: {ns_labels}}}\n---\n\
                 apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: api, namespace: egress}}\nspec: {{hosts: [api.example.com], ports: [{{number: 80, name: http}}], resolution: DNS}}\n---\n\
                 apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: api-tls, namespace: egress}}\nspec: {{host: api.example.com, trafficPolicy: {{portLevelSettings: [{{port: {{number: 80}}, tls: {{mode: SIMPLE}}}}]}}}}\n---\n\
                 apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: plain, namespace: egress}}\nspec: {{host: other.example.com, trafficPolicy: {{tls: {{mode: SIMPLE}}}}}}\n---\n\
                 apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: api, namespace: egress}}\nspec: {{targetRefs: [{{kind: ServiceEntry, group: networking.istio.io, name: api}}]}}\n"
            )
        };
        let none = snap(&yaml("{}")).unwrap().entry_config_without_waypoint();
        let objects: Vec<&str> = none.iter().map(|(o, _)| o.as_str()).collect();
        assert_eq!(objects, ["AuthorizationPolicy egress/api", "DestinationRule egress/api-tls"], "{none:?}");
        assert!(snap(&yaml("{istio.io/use-waypoint: waypoint}")).unwrap().entry_config_without_waypoint().is_empty());
    }

    /// Issue 13 item 8: the waypoint was "the lowest-IP ready pod with the
    /// gateway-name label", so any pod labelled so (anyone who can create a
    /// pod can) on a lower IP took its traffic. Now only pods running as
    /// the waypoint's own service account count, all of them (balanced by
    /// ztunnel), and the labelled impostor is named in a warning.
    #[test]
    fn a_waypoint_is_its_labelled_pods_running_as_its_service_account() {
        let s = snap(
            r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{port: 9080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: rogue, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
spec: {serviceAccountName: default, containers: [{name: c}]}
status: {phase: Running, podIP: 10.244.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint-a, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
spec: {serviceAccountName: waypoint, containers: [{name: c}]}
status: {phase: Running, podIP: 10.244.2.7}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint-b, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
spec: {serviceAccountName: waypoint, containers: [{name: c}]}
status: {phase: Running, podIP: 10.244.2.5}
"#,
        )
        .unwrap();
        let svc = s.services.values().next().unwrap();
        let pods: Vec<&str> = s.waypoint_for(svc).unwrap().unwrap().iter().map(|w| w.name.as_str()).collect();
        assert_eq!(pods, ["waypoint-b", "waypoint-a"], "both replicas, by IP, and never the impostor");
        assert!(
            s.warnings.iter().any(|w| w.to_string().contains("labelled as waypoint \"waypoint\" but runs as service account \"default\"")),
            "{:?}",
            s.warnings
        );
    }

    #[test]
    fn probe_ports_are_collected_with_named_ports_resolved() {
        let s = snap(r#"
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: a, uid: u1}
spec:
  containers:
  - name: c
    ports: [{name: http, containerPort: 8080}]
    readinessProbe: {httpGet: {path: /ready, port: http}}
    livenessProbe: {tcpSocket: {port: 9000}}
  - name: d
    startupProbe: {grpc: {port: 7000}}
    livenessProbe: {exec: {command: [true]}}
status: {phase: Running, podIP: 10.244.1.5}
---
apiVersion: v1
kind: Pod
metadata: {name: q, namespace: a, uid: u2}
spec: {containers: [{name: c}]}
status: {phase: Running, podIP: 10.244.1.6}
"#)
        .unwrap();
        assert_eq!(s.probe_ports.get("u1").map(|p| p.iter().copied().collect::<Vec<_>>()), Some(vec![7000, 8080, 9000]));
        assert!(!s.probe_ports.contains_key("u2"));
    }

    const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web-7d4b9c-abcde
  namespace: shop
  labels: {app: web}
  ownerReferences: [{kind: ReplicaSet, name: web-7d4b9c}]
spec:
  serviceAccountName: web-sa
  containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]
status: {phase: Running, podIP: 10.244.1.5}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 9090}]}]}
status: {phase: Pending, podIP: 10.244.1.6}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{port: 80, targetPort: http}]
"#;

    #[test]
    fn workload_fields_and_defaults() {
        let s = snap(PODS).unwrap();
        let w = &s.workloads["shop/web-7d4b9c-abcde"];
        assert_eq!(w.workload_name, "web");
        assert_eq!(w.service_account, "web-sa");
        assert_eq!(s.workloads["shop/web-2"].service_account, "default");
        assert_eq!(s.workloads["shop/web-2"].workload_name, "web-2");
    }

    #[test]
    fn service_endpoints_resolve_named_ports_and_skip_unready() {
        let s = snap(PODS).unwrap();
        let (svc, port) = s.service_by_vip("10.96.0.10".parse().unwrap(), 80).unwrap();
        let eps = s.endpoints(svc, port);
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].0.name, "web-7d4b9c-abcde");
        assert_eq!(eps[0].1, 8080);
        assert!(s.service_by_vip("10.96.0.10".parse().unwrap(), 81).is_none());
    }

    #[test]
    fn bad_ip_names_object_and_field() {
        let err = snap("apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a}\nstatus: {podIP: 10.0.0.300}\n")
            .unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert_eq!(err.0[0].object, "Pod a/p");
        assert_eq!(err.0[0].field, "status.podIP");
        assert!(err.to_string().contains("test.yaml"));
    }

    /// Istio's mesh config (ConfigMap `istio`, key `mesh`): its
    /// outboundTrafficPolicy is read, other fields are reported, other
    /// ConfigMaps are not read at all, and one that cannot be read fails
    /// closed (REGISTRY_ONLY).
    #[test]
    fn mesh_config_is_read_from_the_istio_config_map() {
        use crate::egress::OutboundPolicy;
        let cm = |ns: &str, name: &str, mesh: &str| format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}, namespace: {ns}}}\ndata:\n  mesh: |\n    {mesh}\n");
        let s = build(&format!("{}---\n{}", cm("istio-system", "istio", "outboundTrafficPolicy: {mode: REGISTRY_ONLY}"), cm("istio-system", "other", "not: [yaml")), None);
        assert!(s.rejected.is_empty(), "{:?}", s.rejected);
        assert_eq!(s.mesh_configs["istio-system"].outbound_policy, Some(OutboundPolicy::RegistryOnly));
        let s = build(&cm("istio-system", "istio", "{accessLogFile: /dev/stdout, outboundTrafficPolicy: {mode: ALLOW_ANY}}"), None);
        assert_eq!(s.mesh_configs["istio-system"].outbound_policy, Some(OutboundPolicy::AllowAny));
        assert!(s.warnings.iter().any(|w| w.message.contains("accessLogFile")), "{:?}", s.warnings);
        let s = build(&cm("istio-system", "istio", "outboundTrafficPolicy: {mode: REGISTRY_ONLYY}"), None);
        assert_eq!(s.rejected[0].error.field, "data.mesh.outboundTrafficPolicy.mode");
        assert_eq!(s.mesh_configs["istio-system"].outbound_policy, Some(OutboundPolicy::RegistryOnly), "fails closed");
    }

    fn build(text: &str, previous: Option<&Snapshot>) -> Snapshot {
        let objs = parse_documents(text).unwrap().into_iter().map(|o| ("test.yaml".to_owned(), o)).collect();
        Snapshot::build(objs, previous)
    }

    const TENANTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: a}
---
apiVersion: v1
kind: Namespace
metadata: {name: b}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: a, annotations: {skiff.dev/local-rate-limit: "lots"}}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: a}
spec:
  hosts: [web]
  http: [{route: [{destination: {host: web}}], delegate: {name: other}}]
---
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: b, uid: ub}
spec: {containers: [{name: c}]}
status: {phase: Running, podIP: 10.244.1.5}
"#;

    /// One tenant's bad objects refuse only themselves: the other
    /// namespace's pod is in the snapshot, and each refusal names the
    /// object and the field.
    #[test]
    fn a_bad_object_refuses_only_itself() {
        let s = build(TENANTS, None);
        assert!(s.workloads.contains_key("ub") && s.namespaces.contains_key("a") && s.namespaces.contains_key("b"));
        assert!(s.services.is_empty() && s.virtual_services.is_empty());
        let got: Vec<(&str, &str, &str)> =
            s.rejected.iter().map(|r| (r.error.object.as_str(), r.error.field.as_str(), r.key.kind)).collect();
        assert_eq!(
            got,
            vec![
                ("Service a/web", "metadata.annotations[skiff.dev/local-rate-limit]", "Service"),
                ("VirtualService a/web", "spec.http[0].delegate", "VirtualService"),
            ]
        );
        assert!(s.rejected.iter().all(|r| r.instead == Instead::Nothing));
        assert_eq!(s.rejected_counts().get(&("VirtualService", "a".to_owned())), Some(&1));
    }

    /// The last accepted version of a refused routing object keeps
    /// serving; a refused Service does not (its address may since be
    /// another's).
    #[test]
    fn the_last_accepted_version_keeps_serving() {
        let good = TENANTS.replace("\"lots\"", "\"10/s\"").replace(", delegate: {name: other}", "");
        let first = build(&good, None);
        assert!(first.rejected.is_empty(), "{:?}", first.rejected);
        let second = build(TENANTS, Some(&first));
        assert!(second.services.is_empty());
        assert_eq!(second.virtual_services, first.virtual_services);
        let instead: Vec<(&str, &Instead)> = second.rejected.iter().map(|r| (r.key.kind, &r.instead)).collect();
        assert_eq!(instead, vec![("Service", &Instead::Nothing), ("VirtualService", &Instead::Previous)]);
        // A third version still refused: still the first one serving.
        let third = build(TENANTS, Some(&second));
        assert_eq!(third.virtual_services, first.virtual_services);
    }

    /// Security objects with no accepted version fail closed: a
    /// PeerAuthentication reads as STRICT, an ALLOW policy allows nothing,
    /// a DENY policy denies everything (for what they select; the whole
    /// namespace when the selector cannot be read), AUDIT is dropped.
    #[test]
    fn refused_security_objects_without_a_previous_version_fail_closed() {
        use crate::policy::{self, Action, MtlsMode};
        let s = build(
            r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: pa, namespace: a}
spec: {selector: {matchLabels: {app: web}}, mtls: {mode: PERMISSIVE}, portLevelMtls: {http: {mode: DISABLE}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: pa2, namespace: b}
spec: {selector: {matchLabels: [oops]}, mtls: {mode: DISABLE}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: a}
spec: {selector: {matchLabels: {app: web}}, rules: [{from: [{source: {}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny, namespace: a}
spec: {action: DENY, rules: [{to: [{operation: {ports: [ssh]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: a}
spec: {action: AUDIT, rules: [{to: [{}]}]}
"#,
            None,
        );
        assert_eq!(s.rejected.len(), 5, "{:?}", s.rejected);
        let web: BTreeMap<String, String> = [("app".to_owned(), "web".to_owned())].into();
        let other: BTreeMap<String, String> = [("app".to_owned(), "db".to_owned())].into();
        assert_eq!(policy::effective_mtls(&s.peer_authentications, "istio-system", "a", &web, 80), MtlsMode::Strict);
        assert_eq!(policy::effective_mtls(&s.peer_authentications, "istio-system", "a", &other, 80), MtlsMode::Permissive, "only what it selects");
        assert_eq!(policy::effective_mtls(&s.peer_authentications, "istio-system", "b", &other, 80), MtlsMode::Strict, "unreadable selector: the whole namespace");
        let conn = policy::ConnInfo {
            src_ip: "10.244.1.9".parse().unwrap(),
            principal: Some("cluster.local/ns/a/sa/x".into()),
            src_namespace: Some("a".into()),
            dst_ip: "10.244.1.5".parse().unwrap(),
            dst_port: 80,
        };
        let allow = s.authorization_policies.iter().find(|p| p.name == "allow").unwrap();
        let deny = s.authorization_policies.iter().find(|p| p.name == "deny").unwrap();
        assert_eq!((allow.action, deny.action), (Action::Allow, Action::Deny));
        assert!(!policy::evaluate(&[allow], &conn).allowed, "an unreadable ALLOW allows nothing");
        assert!(!policy::evaluate(&[deny], &conn).allowed, "an unreadable DENY denies everything");
        assert!(deny.applies_to("istio-system", "a", &other), "namespace-wide without a selector");
        assert!(!s.authorization_policies.iter().any(|p| p.name == "audit"));
    }

    /// A refused AuthorizationPolicy whose target no waypoint matches by
    /// name (a GatewayClass) still fails closed: its stand-in holds at
    /// ztunnel too, namespace-wide (here the root namespace: mesh-wide).
    #[test]
    fn a_refused_policy_with_an_unsupported_target_kind_still_binds() {
        let s = build(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: istio-system}\nspec: {action: DENY, targetRefs: [{group: gateway.networking.k8s.io, kind: GatewayClass, name: istio-waypoint}], rules: [{}]}\n",
            None,
        );
        assert_eq!(s.rejected[0].error.field, "spec.targetRefs[0].kind");
        let everywhere = s.authorization_policies.iter().find(|p| !p.targets_waypoint).expect("a namespace-wide stand-in");
        assert!(everywhere.applies_to("istio-system", "shop", &BTreeMap::new()), "mesh-wide from the root namespace");
        assert_eq!(everywhere.action, crate::policy::Action::Deny);
    }

    /// Dual-stack clusters: `podIPs` / `clusterIPs` carry one address per
    /// family. The IPv4 one is used whichever comes first; an IPv6-only
    /// Pod or Service is kept without an address and reported as a
    /// warning, and holds back nothing else; a value that is no IP address
    /// at all refuses that object alone, naming the entry.
    #[test]
    fn dual_stack_addresses_take_the_ipv4_one_and_ipv6_only_affects_itself() {
        let svc = |name: &str, spec: &str| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: a}}\nspec: {{{spec}, ports: [{{port: 80}}]}}\n---\n");
        let pod = |name: &str, status: &str| format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: a, uid: {name}}}\nspec: {{containers: [{{name: c}}]}}\nstatus: {{phase: Running, {status}}}\n---\n");
        let text = [
            svc("v6first", "clusterIP: \"fd00::10\", clusterIPs: [\"fd00::10\", 10.96.0.10]"),
            svc("v6only", "clusterIP: \"fd00::11\", clusterIPs: [\"fd00::11\"]"),
            svc("bad", "clusterIP: 10.96.0.12, clusterIPs: [10.96.0.12, \"fd00::zz\"]"),
            svc("v4", "clusterIP: 10.96.0.13"),
            pod("p6first", "podIP: \"fd00::5\", podIPs: [{ip: \"fd00::5\"}, {ip: 10.244.0.5}]"),
            pod("p6only", "podIP: \"fd00::6\", podIPs: [{ip: \"fd00::6\"}]"),
        ]
        .concat();
        let s = build(&text, None);
        let vip = |n: &str| s.services.get(&format!("a/{n}")).map(|x| x.cluster_ip);
        assert_eq!(vip("v6first"), Some(Some("10.96.0.10".parse().unwrap())));
        assert_eq!(vip("v6only"), Some(None), "kept, without an address");
        assert_eq!(vip("bad"), None, "refused");
        assert_eq!(vip("v4"), Some(Some("10.96.0.13".parse().unwrap())));
        let refused: Vec<(&str, &str)> = s.rejected.iter().map(|r| (r.error.object.as_str(), r.error.field.as_str())).collect();
        assert_eq!(refused, [("Service a/bad", "spec.clusterIPs[1]")]);
        assert_eq!(s.workloads.get("p6first").and_then(|w| w.ip), Some("10.244.0.5".parse().unwrap()));
        assert_eq!(s.workloads.get("p6only").map(|w| w.ip), Some(None));
        let warned: Vec<&str> = s.warnings.iter().map(|w| w.object.as_str()).collect();
        assert_eq!(warned, ["Service a/v6only", "Pod a/p6only"]);
    }

    /// Security objects fail closed even when an earlier version was
    /// accepted (it may be looser than the refused one), and in the cases
    /// a reviewer found open: a misspelt selector or top-level key, an
    /// unknown field in a port-level mode, a policy without a name, a
    /// policy with both a selector and targets, a refused PeerAuthentication
    /// next to a looser one of the same namespace.
    #[test]
    fn refused_security_objects_fail_closed_in_every_case() {
        use crate::policy::{self, MtlsMode};
        const HDR: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n";
        let first = build(&format!("{HDR}metadata: {{name: p, namespace: a}}\nspec: {{rules: [{{from: [{{source: {{namespaces: [x, partner]}}}}]}}]}}\n"), None);
        assert!(first.rejected.is_empty());
        let second = build(&format!("{HDR}metadata: {{name: p, namespace: a}}\nspec: {{rules: [{{from: [{{source: {{namespaces: [x], ipBlocks: [\"10.0.0.0/33\"]}}}}]}}]}}\n"), Some(&first));
        assert_eq!(second.rejected[0].instead, Instead::FailClosed("an ALLOW policy that allows nothing"));
        assert!(second.authorization_policies[0].rules.is_empty(), "not the looser previous version");

        let s = build(
            &format!(
                "{HDR}metadata: {{name: typo, namespace: a}}\nspec: {{selector: {{matchLabel: {{app: web}}}}, rules: [{{}}]}}\n---\n\
                 {HDR}metadata: {{generateName: d-, namespace: a}}\nspec: {{action: DENY, rules: [{{}}]}}\n---\n\
                 {HDR}metadata: {{name: both, namespace: a}}\nspec: {{action: DENY, selector: {{matchLabels: {{app: db}}}}, targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: wp}}], rules: [{{to: [{{}}]}}]}}\n---\n\
                 apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: z-strict, namespace: b}}\nsepc: {{mtls: {{mode: STRICT}}}}\n---\n\
                 apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: a-permissive, namespace: b}}\nspec: {{mtls: {{mode: PERMISSIVE}}}}\n---\n\
                 apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: port, namespace: c}}\nspec: {{selector: {{matchLabels: {{app: db}}}}, portLevelMtls: {{\"5432\": {{Mode: STRICT}}}}}}\n"
            ),
            None,
        );
        let fields: Vec<(&str, &str)> = s.rejected.iter().map(|r| (r.error.object.as_str(), r.error.field.as_str())).collect();
        assert_eq!(
            fields,
            vec![
                ("AuthorizationPolicy a/typo", "spec.selector.matchLabel"),
                ("AuthorizationPolicy a/<unnamed>", "metadata.name"),
                ("AuthorizationPolicy a/both", "spec.selector"),
                ("PeerAuthentication b/z-strict", "sepc"),
                ("PeerAuthentication c/port", "spec.portLevelMtls.5432.Mode"),
            ]
        );
        let any: BTreeMap<String, String> = BTreeMap::new();
        let db: BTreeMap<String, String> = [("app".to_owned(), "db".to_owned())].into();
        // The refused STRICT wins over a looser sibling that sorts first.
        assert_eq!(policy::effective_mtls(&s.peer_authentications, "istio-system", "b", &any, 80), MtlsMode::Strict);
        assert_eq!(policy::effective_mtls(&s.peer_authentications, "istio-system", "c", &db, 5432), MtlsMode::Strict);
        let by_name = |n: &str| s.authorization_policies.iter().filter(|p| p.name == n).collect::<Vec<_>>();
        assert!(by_name("typo")[0].selector.is_none(), "an unreadable selector: the whole namespace");
        assert_eq!(by_name("<unnamed>").len(), 1, "an unnamed DENY still stands in");
        let both = by_name("both");
        assert_eq!(both.len(), 2, "waypoint-bound and selector-bound stand-ins");
        assert!(both.iter().any(|p| p.targets_waypoint) && both.iter().any(|p| p.selector.as_ref() == Some(&db)));
    }

    #[test]
    fn both_owners_of_one_address_are_refused() {
        let s = build(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p1, namespace: a, uid: u1}\nstatus: {phase: Running, podIP: 10.244.1.5}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p2, namespace: a, uid: u2}\nstatus: {phase: Running, podIP: 10.244.1.5}\n",
            None,
        );
        assert!(s.workloads.is_empty(), "{:?}", s.workloads.keys());
        let refused: BTreeSet<&str> = s.rejected.iter().map(|r| r.error.object.as_str()).collect();
        assert_eq!(refused, BTreeSet::from(["Pod a/p1", "Pod a/p2"]));
    }

    #[test]
    fn duplicate_objects_are_rejected() {
        let err = snap("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n").unwrap_err();
        assert!(err.0[0].message.contains("more than once"));
    }
}
