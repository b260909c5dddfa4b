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
    /// VirtualService, DestinationRule, Gateway), passed to the mesh as they are.
    pub policies: Vec<Object>,
    /// Secrets (the ingress gateway's certificates), passed on as they are.
    pub secrets: Vec<Object>,
    /// `spec.meshConfig.outboundTrafficPolicy.mode` of an IstioOperator
    /// (ztunnel's `--outbound-traffic-policy`).
    pub outbound_traffic_policy: Option<String>,
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

/// The ingress gateway every local mesh runs unless told not to, as
/// Istio's default profile installs one: `istio-ingressgateway` in
/// `istio-system`, a `LoadBalancer` Service on 80 and 443.
pub const INGRESS_GATEWAY: &str = include_str!("ingress-gateway.yaml");

/// Whether the user's manifests turn the default ingress gateway off, as
/// Istio users do: an `IstioOperator` whose `profile` installs none
/// (`minimal`, `empty`, `ambient`, `remote`) or whose
/// `components.ingressGateways` entry `istio-ingressgateway` has
/// `enabled: false`.
pub fn operator_disables_ingress_gateway(op: &serde_json::Value) -> bool {
    let spec = &op["spec"];
    let profile_off = matches!(spec["profile"].as_str(), Some("minimal" | "empty" | "ambient" | "remote"));
    let entry = spec["components"]["ingressGateways"]
        .as_array()
        .and_then(|a| a.iter().find(|g| g["name"].as_str().is_none_or(|n| n == "istio-ingressgateway")));
    match entry.and_then(|g| g["enabled"].as_bool()) {
        Some(enabled) => !enabled,
        None => profile_off,
    }
}

/// Reads every manifest under `dir` and plans the mesh on `nodes`; with
/// `ingress_gateway`, adds the default ingress gateway
/// ([`INGRESS_GATEWAY`]) unless the manifests turn it off or define their
/// own `istio-system/istio-ingressgateway`.
pub fn plan(dir: &Path, nodes: &[String], ingress_gateway: bool) -> anyhow::Result<Plan> {
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
    let mut docs: Vec<(PathBuf, Vec<Object>)> = Vec::new();
    let mut gateway_off = !ingress_gateway;
    for f in files {
        let text = std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        let objects = k8s::parse_documents(&text).map_err(|e| anyhow::anyhow!("{}: {}", f.display(), skiff_core::report(&e)))?;
        if objects.iter().any(|o| matches!(o, Object::Other { kind, .. } if kind == "IstioOperator")) {
            let values = k8s::documents_as_json(&text).map_err(|e| anyhow::anyhow!("{}: {}", f.display(), skiff_core::report(&e)))?;
            for op in values.iter().filter(|v| v["kind"] == "IstioOperator") {
                if operator_disables_ingress_gateway(op) {
                    tracing::info!(file = %f.display(), "IstioOperator turns the ingress gateway off: the local mesh runs none");
                    gateway_off = true;
                }
                if let Some(mode) = op["spec"]["meshConfig"]["outboundTrafficPolicy"]["mode"].as_str() {
                    if !matches!(mode, "ALLOW_ANY" | "REGISTRY_ONLY") {
                        bail!("{}: IstioOperator `spec.meshConfig.outboundTrafficPolicy.mode: {mode}` is not ALLOW_ANY or REGISTRY_ONLY", f.display());
                    }
                    plan.outbound_traffic_policy = Some(mode.to_owned());
                }
            }
        }
        docs.push((f, objects));
    }
    let own_gateway = docs.iter().flat_map(|(_, o)| o).any(|o| {
        let d = o.describe();
        d == "Deployment istio-system/istio-ingressgateway" || d == "Service istio-system/istio-ingressgateway" || d == "Pod istio-system/istio-ingressgateway"
    });
    if !gateway_off && !own_gateway {
        let objects = k8s::parse_documents(INGRESS_GATEWAY).expect("the embedded ingress gateway parses");
        docs.push((PathBuf::from("<default ingress gateway>"), objects));
    }
    for (f, objects) in docs {
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
                | Object::DestinationRule(_)
                | Object::Gateway(_)
                | Object::ServiceEntry(_)
                | Object::Telemetry(_)
                | Object::ConfigMap(_) => plan.policies.push(obj),
                Object::Secret(_) => plan.secrets.push(obj),
                // An Istio object Skiff refuses is passed on as written:
                // node-agent and ztunnel refuse it on their own (and report
                // it) while everything else runs.
                Object::Invalid(ref o)
                    if matches!(o.kind.as_str(), "PeerAuthentication" | "AuthorizationPolicy" | "VirtualService" | "DestinationRule" | "Gateway" | "ServiceEntry" | "Telemetry" | "ConfigMap") =>
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
        let p = plan(d, &nodes, false).unwrap();
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
        let err = plan(d, &nodes, false).unwrap_err().to_string();
        assert!(err.contains("bad.yaml") && err.contains("Pod p") && err.contains("spec.containers[0].command"), "{err}");
    }

    /// The default ingress gateway: there unless an IstioOperator turns it
    /// off (profile or component) or the manifests bring their own.
    #[test]
    fn default_ingress_gateway_and_how_to_turn_it_off() {
        let nodes = vec!["node-1".to_string()];
        let gateway_pods = |extra: &str| {
            let tmp = tempfile::Builder::new().prefix("skiff-plan-").tempdir().unwrap();
            std::fs::write(tmp.path().join("app.yaml"), format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec: {{containers: [{{name: c, command: [sleep, \"1\"]}}]}}\n{extra}")).unwrap();
            let p = plan(tmp.path(), &nodes, true).unwrap();
            let svc = p.services.iter().any(|s| s.namespace == "istio-system" && s.name == "istio-ingressgateway");
            (p.pods.iter().filter(|p| p.namespace == "istio-system").count(), svc)
        };
        assert_eq!(gateway_pods(""), (1, true));
        let default = k8s::parse_documents(INGRESS_GATEWAY).unwrap();
        let svc = default.iter().find_map(|o| if let Object::Service(s) = o { Some(s) } else { None }).unwrap();
        assert_eq!(svc.spec.type_.as_deref(), Some("LoadBalancer"));
        let v = serde_json::to_value(svc).unwrap();
        assert_eq!(v["spec"]["type"], "LoadBalancer", "{v}");
        let op = |spec: &str| format!("---\napiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nmetadata: {{name: mesh, namespace: istio-system}}\nspec: {spec}\n");
        assert_eq!(gateway_pods(&op("{profile: ambient}")), (0, false));
        assert_eq!(gateway_pods(&op("{components: {ingressGateways: [{name: istio-ingressgateway, enabled: false}]}}")), (0, false));
        assert_eq!(gateway_pods(&op("{profile: minimal, components: {ingressGateways: [{name: istio-ingressgateway, enabled: true}]}}")), (1, true));
        assert_eq!(gateway_pods(&op("{profile: default}")), (1, true));
        let own = "---\napiVersion: v1\nkind: Service\nmetadata: {name: istio-ingressgateway, namespace: istio-system}\nspec: {selector: {app: mine}, ports: [{port: 80}]}\n";
        assert_eq!(gateway_pods(own), (0, true), "the user's own replaces the default whole");
        // meshConfig.outboundTrafficPolicy becomes ztunnel's flag.
        let tmp = tempfile::Builder::new().prefix("skiff-plan-").tempdir().unwrap();
        std::fs::write(tmp.path().join("op.yaml"), op("{meshConfig: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}}")).unwrap();
        assert_eq!(plan(tmp.path(), &nodes, false).unwrap().outbound_traffic_policy.as_deref(), Some("REGISTRY_ONLY"));
        std::fs::write(tmp.path().join("op.yaml"), op("{meshConfig: {outboundTrafficPolicy: {mode: REGISTRY}}}")).unwrap();
        assert!(plan(tmp.path(), &nodes, false).unwrap_err().to_string().contains("outboundTrafficPolicy.mode"));
    }
}
