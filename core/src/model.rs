//! Validated domain types built from Kubernetes objects.
//!
//! Conversion happens once, here; the data path never sees wire types. A
//! snapshot that fails validation is rejected whole, with every error naming
//! the object and the field, so the caller keeps serving the last good one.

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
}

impl ServiceInfo {
    /// `name.namespace.svc.cluster.local`.
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
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
    /// Ports kubelet probes (liveness, readiness, startup: httpGet,
    /// tcpSocket, grpc), by [`Workload::uid`]; named ports resolved.
    pub probe_ports: BTreeMap<String, std::collections::BTreeSet<u16>>,
}

/// One object that failed validation.
#[derive(Clone, Debug, PartialEq, Eq)]
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

fn parse_ip(
    raw: Option<&str>,
    origin: &str,
    object: &str,
    field: &str,
    errors: &mut Vec<ModelError>,
) -> Option<Ipv4Addr> {
    let raw = raw.filter(|s| !s.is_empty() && *s != "None")?;
    match Ipv4Addr::from_str(raw) {
        Ok(ip) => Some(ip),
        Err(_) => {
            errors.push(ModelError {
                origin: origin.to_owned(),
                object: object.to_owned(),
                field: field.to_owned(),
                message: format!("{raw:?} is not an IPv4 address"),
            });
            None
        }
    }
}

impl Snapshot {
    /// Builds a snapshot from parsed objects, each with its origin. Kinds the
    /// model does not hold (Deployments, unknown kinds) are ignored.
    pub fn from_objects(objects: Vec<(String, Object)>) -> Result<Snapshot, ModelErrors> {
        let mut snap = Snapshot::default();
        let mut errors = Vec::new();
        let mut seen = BTreeSet::new();
        for (origin, obj) in objects {
            let object = obj.describe();
            let err = |field: &str, message: String| ModelError {
                origin: origin.clone(),
                object: object.clone(),
                field: field.to_owned(),
                message,
            };
            let meta = match &obj {
                Object::Namespace(o) => &o.metadata,
                Object::Pod(o) => &o.metadata,
                Object::Service(o) => &o.metadata,
                Object::PeerAuthentication(o) => &o.metadata,
                Object::AuthorizationPolicy(o) => &o.metadata,
                Object::VirtualService(o) => &o.metadata,
                Object::DestinationRule(o) => &o.metadata,
                Object::Deployment(_) | Object::Other { .. } => continue,
            };
            let Some(name) = meta.name.clone().filter(|n| !n.is_empty()) else {
                errors.push(err("metadata.name", "required".into()));
                continue;
            };
            if !seen.insert(object.clone()) {
                errors.push(err("metadata.name", "defined more than once".into()));
                continue;
            }
            match obj {
                Object::Namespace(ns) => {
                    snap.namespaces.insert(name.clone(), NamespaceInfo { name, labels: ns.metadata.labels });
                }
                Object::Pod(pod) => {
                    let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
                    let ip = parse_ip(pod.status.pod_ip.as_deref(), &origin, &object, "status.podIP", &mut errors);
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
                        workload_name: workload_name(&pod, &name),
                        service_account: pod
                            .spec
                            .service_account_name
                            .clone()
                            .filter(|s| !s.is_empty())
                            .unwrap_or_else(|| "default".into()),
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
                    if snap.workloads.contains_key(&w.uid) {
                        errors.push(err("metadata.uid", format!("uid {:?} is used by another pod", w.uid)));
                        continue;
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
                        snap.probe_ports.insert(w.uid.clone(), probes);
                    }
                    snap.workloads.insert(w.uid.clone(), w);
                }
                Object::Service(svc) => {
                    let namespace = svc.metadata.namespace.clone().unwrap_or_else(|| "default".into());
                    let cluster_ip =
                        parse_ip(svc.spec.cluster_ip.as_deref(), &origin, &object, "spec.clusterIP", &mut errors);
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
                                Err(_) => {
                                    errors.push(err(&format!("spec.ports[{i}].targetPort"), "empty".into()));
                                    continue;
                                }
                            },
                        };
                        if p.port == 0 {
                            errors.push(err(&format!("spec.ports[{i}].port"), "must be 1-65535".into()));
                            continue;
                        }
                        ports.push(ServicePort {
                            name: p.name.clone(),
                            port: p.port,
                            target_port,
                            app_protocol: p.app_protocol.clone(),
                        });
                    }
                    if let Some(v) = svc.metadata.annotations.get(crate::routing::ANNOTATION_RATE_LIMIT) {
                        if crate::routing::RateLimit::parse(v).is_none() {
                            errors.push(err(
                                &format!("metadata.annotations[{}]", crate::routing::ANNOTATION_RATE_LIMIT),
                                format!("{v:?} is not <requests>/<s|m|h>, e.g. 100/s"),
                            ));
                            continue;
                        }
                    }
                    let key = format!("{namespace}/{name}");
                    snap.services.insert(
                        key,
                        ServiceInfo { namespace, name, labels: svc.metadata.labels.clone(), annotations: svc.metadata.annotations.clone(), cluster_ip, selector: svc.spec.selector, ports },
                    );
                }
                Object::PeerAuthentication(pa) => match crate::policy::peer_authn_from(&pa) {
                    Ok(p) => snap.peer_authentications.push(p),
                    Err((field, message)) => errors.push(err(&field, message)),
                },
                Object::AuthorizationPolicy(ap) => match crate::policy::authz_from(&ap) {
                    Ok(p) => snap.authorization_policies.push(p),
                    Err((field, message)) => errors.push(err(&field, message)),
                },
                Object::VirtualService(v) => match crate::routing::virtual_service_from(&v) {
                    Ok(v) => snap.virtual_services.push(v),
                    Err((field, message)) => errors.push(err(&field, message)),
                },
                Object::DestinationRule(d) => match crate::routing::destination_rule_from(&d) {
                    Ok(d) => snap.destination_rules.push(d),
                    Err((field, message)) => errors.push(err(&field, message)),
                },
                Object::Deployment(_) | Object::Other { .. } => {}
            }
        }
        // Addresses identify workloads and Services: two live owners of one
        // address would make identity and routing ambiguous.
        let mut ips: BTreeMap<Ipv4Addr, &Workload> = BTreeMap::new();
        for w in snap.workloads.values().filter(|w| !w.host_network && !w.is_finished()) {
            if let Some(ip) = w.ip {
                if let Some(other) = ips.insert(ip, w) {
                    errors.push(ModelError {
                        origin: "cluster".into(),
                        object: format!("Pod {}/{}", w.namespace, w.name),
                        field: "status.podIP".into(),
                        message: format!("{ip} is also the IP of pod {}/{}", other.namespace, other.name),
                    });
                }
            }
        }
        let mut vips: BTreeMap<Ipv4Addr, &ServiceInfo> = BTreeMap::new();
        for s in snap.services.values() {
            if let Some(ip) = s.cluster_ip {
                if let Some(other) = vips.insert(ip, s) {
                    errors.push(ModelError {
                        origin: "cluster".into(),
                        object: format!("Service {}/{}", s.namespace, s.name),
                        field: "spec.clusterIP".into(),
                        message: format!("{ip} is also the ClusterIP of {}/{}", other.namespace, other.name),
                    });
                }
            }
        }
        if errors.is_empty() {
            Ok(snap)
        } else {
            Err(ModelErrors(errors))
        }
    }

    /// Labels of a namespace (empty for a namespace with no object).
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

    /// The waypoint a Service's traffic goes through: the Service's
    /// `istio.io/use-waypoint` (or `skiff.dev/use-waypoint`) label, else its
    /// namespace's; `none` opts out. Returns a ready waypoint pod of that
    /// name in the Service's namespace, or the name when none is ready.
    pub fn waypoint_for(&self, svc: &ServiceInfo) -> Option<Result<&Workload, String>> {
        let label = |l: &BTreeMap<String, String>| {
            l.get(crate::LABEL_USE_WAYPOINT).or_else(|| l.get(crate::LABEL_SKIFF_USE_WAYPOINT)).cloned()
        };
        let name = label(&svc.labels).or_else(|| self.namespace_labels(&svc.namespace).and_then(label))?;
        if name == "none" || name.is_empty() {
            return None;
        }
        let found = self
            .workloads
            .values()
            .filter(|w| {
                w.namespace == svc.namespace && w.is_ready() && w.labels.get(crate::LABEL_GATEWAY_NAME) == Some(&name)
            })
            .min_by_key(|w| w.ip);
        Some(found.ok_or(name))
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

    #[test]
    fn duplicate_objects_are_rejected() {
        let err = snap("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n").unwrap_err();
        assert!(err.0[0].message.contains("more than once"));
    }
}
