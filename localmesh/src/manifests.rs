//! Reading a user's manifests directory into the pods, services and
//! namespaces the local mesh runs: Deployments become pods, pods are placed
//! on nodes, pods and Services get addresses.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _};
use skiff_core::k8s::{self, Container, Object, ObjectMeta, OwnerReference, PodSpec};

/// A pod to run, after expansion and placement.
#[derive(Clone, Debug)]
pub struct PlannedPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub owner: Option<OwnerReference>,
    pub spec: PodSpec,
    /// Index into the node list.
    pub node: usize,
    pub host_network: bool,
}

#[derive(Clone, Debug)]
pub struct PlannedService {
    pub object: k8s::Service,
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
}

#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// Namespace name → labels.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub pods: Vec<PlannedPod>,
    pub services: Vec<PlannedService>,
    /// Istio objects (PeerAuthentication, AuthorizationPolicy,
    /// VirtualService, DestinationRule), passed to the mesh as they are.
    pub policies: Vec<Object>,
}

fn short_hash(s: &str) -> String {
    // FNV-1a: stable across runs, like a pod-template hash.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..10).map(|i| ALPHABET[((h >> (i * 6)) % ALPHABET.len() as u64) as usize] as char).collect()
}

fn check_containers(what: &str, field: &str, containers: &[Container]) -> anyhow::Result<()> {
    if containers.is_empty() {
        bail!("{what}: `{field}` has no containers");
    }
    for (i, c) in containers.iter().enumerate() {
        if c.command.is_empty() {
            bail!(
                "{what}: `{field}[{i}].command` is required: the local mesh runs each container's command on the host \
                 (images are not pulled), e.g. command: [\"skiff-demo-app\", \"echo-server\", \"--port\", \"8080\"]"
            );
        }
    }
    Ok(())
}

fn node_index(nodes: &[String], what: &str, name: &Option<String>, next: &mut usize) -> anyhow::Result<usize> {
    match name {
        Some(n) => nodes
            .iter()
            .position(|x| x == n)
            .with_context(|| format!("{what}: `spec.nodeName: {n}` is not a node of the local mesh ({})", nodes.join(", "))),
        None => {
            let i = *next % nodes.len();
            *next += 1;
            Ok(i)
        }
    }
}

fn ns_of(meta: &ObjectMeta) -> String {
    meta.namespace.clone().unwrap_or_else(|| "default".into())
}

/// Reads every manifest under `dir` and plans the mesh on `nodes`.
pub fn plan(dir: &Path, nodes: &[String]) -> anyhow::Result<Plan> {
    let mut files: Vec<PathBuf> = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading manifests directory {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if matches!(p.extension().and_then(|x| x.to_str()), Some("yaml" | "yml" | "json")) {
                files.push(p);
            }
        }
    }
    files.sort();
    if files.is_empty() {
        bail!("no manifests (*.yaml, *.yml, *.json) in {}", dir.display());
    }
    let mut plan = Plan::default();
    plan.namespaces.insert("default".into(), BTreeMap::new());
    let mut next_node = 0usize;
    let mut next_vip = 10u32;
    let mut seen = std::collections::BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        let objects = k8s::parse_documents(&text).map_err(|e| anyhow::anyhow!("{}: {}", f.display(), skiff_core::report(&e)))?;
        for obj in objects {
            let what = format!("{}: {}", f.display(), obj.describe());
            if !matches!(obj, Object::Other { .. }) && !seen.insert(obj.describe()) {
                bail!("{what}: defined more than once");
            }
            match obj {
                Object::Namespace(ns) => {
                    let name = ns.metadata.name.clone().with_context(|| format!("{what}: `metadata.name` is required"))?;
                    plan.namespaces.insert(name, ns.metadata.labels);
                }
                Object::Pod(pod) => {
                    let name = pod.metadata.name.clone().with_context(|| format!("{what}: `metadata.name` is required"))?;
                    check_containers(&what, "spec.containers", &pod.spec.containers)?;
                    let namespace = ns_of(&pod.metadata);
                    let node = node_index(nodes, &what, &pod.spec.node_name, &mut next_node)?;
                    plan.pods.push(PlannedPod {
                        uid: format!("uid-{namespace}-{name}"),
                        namespace,
                        name,
                        labels: pod.metadata.labels,
                        owner: None,
                        host_network: pod.spec.host_network.unwrap_or(false),
                        spec: pod.spec,
                        node,
                    });
                }
                Object::Deployment(d) => {
                    let name = d.metadata.name.clone().with_context(|| format!("{what}: `metadata.name` is required"))?;
                    let spec = &d.spec.template.spec;
                    check_containers(&what, "spec.template.spec.containers", &spec.containers)?;
                    let namespace = ns_of(&d.metadata);
                    let replicas = d.spec.replicas.unwrap_or(1);
                    if replicas > 64 {
                        bail!("{what}: `spec.replicas: {replicas}` is more than the local mesh runs (64)");
                    }
                    let rs = format!("{name}-{}", short_hash(&format!("{namespace}/{name}")));
                    for r in 0..replicas {
                        let suffix: String = short_hash(&format!("{rs}/{r}")).chars().take(5).collect();
                        let pod_name = format!("{rs}-{suffix}");
                        let node = node_index(nodes, &what, &spec.node_name, &mut next_node)?;
                        plan.pods.push(PlannedPod {
                            uid: format!("uid-{namespace}-{pod_name}"),
                            namespace: namespace.clone(),
                            name: pod_name,
                            labels: d.spec.template.metadata.labels.clone(),
                            owner: Some(OwnerReference { kind: "ReplicaSet".into(), name: rs.clone() }),
                            host_network: spec.host_network.unwrap_or(false),
                            spec: spec.clone(),
                            node,
                        });
                    }
                }
                Object::Service(svc) => {
                    let name = svc.metadata.name.clone().with_context(|| format!("{what}: `metadata.name` is required"))?;
                    let namespace = ns_of(&svc.metadata);
                    let cluster_ip = match svc.spec.cluster_ip.as_deref() {
                        None | Some("") => {
                            next_vip += 1;
                            Ipv4Addr::new(10, 96, (next_vip >> 8) as u8, next_vip as u8)
                        }
                        Some(ip) => {
                            let ip: Ipv4Addr =
                                ip.parse().with_context(|| format!("{what}: `spec.clusterIP: {ip}` is not an IPv4 address"))?;
                            if ip.octets()[0..2] != [10, 96] {
                                bail!("{what}: `spec.clusterIP: {ip}` is outside the local mesh's service range 10.96.0.0/16");
                            }
                            ip
                        }
                    };
                    if svc.spec.ports.is_empty() {
                        bail!("{what}: `spec.ports` is empty");
                    }
                    plan.services.push(PlannedService { object: svc, namespace, name, cluster_ip });
                }
                Object::PeerAuthentication(_)
                | Object::AuthorizationPolicy(_)
                | Object::VirtualService(_)
                | Object::DestinationRule(_) => plan.policies.push(obj),
                // An Istio object Skiff refuses is passed on as written:
                // node-agent and ztunnel refuse it on their own (and report
                // it) while everything else runs.
                Object::Invalid(ref o)
                    if matches!(o.kind.as_str(), "PeerAuthentication" | "AuthorizationPolicy" | "VirtualService" | "DestinationRule") =>
                {
                    plan.policies.push(obj)
                }
                Object::Invalid(o) => bail!("{what}: field `{}`: {}", o.field, o.message),
                Object::Other { kind, .. } => {
                    tracing::info!(file = %f.display(), %kind, "kind not used by the local mesh; ignored");
                }
            }
        }
    }
    for p in &plan.pods {
        plan.namespaces.entry(p.namespace.clone()).or_default();
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployments_expand_and_spread_over_nodes() {
        // Removed however the test ends.
        let tmp = tempfile::Builder::new().prefix("skiff-plan-").tempdir().unwrap();
        let d = tmp.path();
        std::fs::write(
            d.join("app.yaml"),
            r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 3
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: c, command: [sleep, "100"]}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, ports: [{port: 80}]}
"#,
        )
        .unwrap();
        let nodes = vec!["node-1".to_string(), "node-2".to_string()];
        let p = plan(d, &nodes).unwrap();
        assert_eq!(p.pods.len(), 3);
        assert_eq!(p.pods.iter().map(|p| p.node).collect::<Vec<_>>(), vec![0, 1, 0]);
        assert!(p.pods.iter().all(|p| p.name.starts_with("web-") && p.owner.is_some()));
        assert_eq!(p.services[0].cluster_ip.octets()[0..2], [10, 96]);
        assert!(p.namespaces.contains_key("shop"));

        std::fs::write(
            d.join("bad.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: nginx}]}\n",
        )
        .unwrap();
        let err = plan(d, &nodes).unwrap_err().to_string();
        assert!(err.contains("bad.yaml") && err.contains("Pod p") && err.contains("spec.containers[0].command"), "{err}");
    }
}
