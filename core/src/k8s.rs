//! The subset of Kubernetes objects Skiff reads, as they appear in YAML.
//!
//! Unknown fields are ignored (manifests carry much more than the mesh
//! needs); the fields that are read are typed, so a wrong type is an error
//! naming the field.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owner_references: Vec<OwnerReference>,
    /// RFC 3339, as the API server sets it (orders objects oldest first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OwnerReference {
    pub kind: String,
    pub name: String,
}

/// A parsed manifest document.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Deployment(Deployment),
    Service(Service),
    PeerAuthentication(PeerAuthentication),
    AuthorizationPolicy(AuthorizationPolicy),
    VirtualService(VirtualService),
    DestinationRule(DestinationRule),
    Gateway(Gateway),
    ServiceEntry(ServiceEntry),
    /// `telemetry.istio.io` Telemetry: its `tracing` is read by waypoints
    /// and gateways.
    Telemetry(Telemetry),
    /// Only `istio` (Istio's mesh config, key `mesh`) is read, by ztunnel,
    /// in its root namespace.
    ConfigMap(ConfigMap),
    /// Read only by the ingress gateway, in its own namespace (the sources
    /// drop every other Secret before the model sees it).
    Secret(Secret),
    /// A kind Skiff does not read (ConfigMap, Istio kinds not yet supported…).
    Other { api_version: String, kind: String },
    /// An object of a kind Skiff reads that it cannot take: a field of the
    /// wrong shape, or (Istio kinds) a field Skiff does not know. It is
    /// refused on its own; the rest of the config is unaffected.
    Invalid(InvalidObject),
}

/// An object refused at parse time, with what is known of it.
#[derive(Clone, Debug, PartialEq)]
pub struct InvalidObject {
    pub api_version: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    /// The field at fault, as a path (`spec.gateways`).
    pub field: String,
    pub message: String,
    /// The object as written: passed on as is (the local mesh's state
    /// files), and read for what a fail-closed stand-in needs (selector,
    /// action).
    pub raw: serde_json::Value,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Namespace {
    pub metadata: ObjectMeta,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_network: Option<bool>,
    #[serde(default)]
    pub containers: Vec<Container>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness_probe: Option<Probe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<Probe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_probe: Option<Probe>,
}

/// A container probe: only where it connects matters to the mesh (kubelet
/// probes are let through to these ports under STRICT mTLS).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<ProbeTarget>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<ProbeTarget>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<ProbeTarget>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProbeTarget {
    /// A number, or a container port's name (gRPC probes take a number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<IntOrString>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    pub name: String,
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub container_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, rename = "podIP", skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    /// Every address of the pod, one per family (dual-stack).
    #[serde(default, rename = "podIPs", skip_serializing_if = "Vec::is_empty")]
    pub pod_ips: Vec<PodIp>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct PodIp {
    pub ip: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Deployment {
    pub metadata: ObjectMeta,
    pub spec: DeploymentSpec,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentSpec {
    #[serde(default)]
    pub replicas: Option<u32>,
    pub template: PodTemplate,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplate {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: PodSpec,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceSpec,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// `ClusterIP` (the default), `LoadBalancer`, `NodePort`,
    /// `ExternalName`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    #[serde(default, rename = "clusterIP", skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<String>,
    /// Every ClusterIP, one per family (dual-stack); the first is `clusterIP`.
    #[serde(default, rename = "clusterIPs", skip_serializing_if = "Vec::is_empty")]
    pub cluster_ips: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<IntOrString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum IntOrString {
    Int(u16),
    String(String),
}

/// `security.istio.io` PeerAuthentication.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthentication {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub mtls: Option<MtlsSpec>,
    /// Keys are ports (YAML allows them as numbers or strings; both are
    /// read as their text).
    #[serde(default)]
    pub port_level_mtls: BTreeMap<String, MtlsSpec>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MtlsSpec {
    #[serde(default)]
    pub mode: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// `security.istio.io` AuthorizationPolicy.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<serde_json::Value>,
    #[serde(default)]
    pub action: Option<String>,
    /// CUSTOM's extension provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<serde_json::Value>,
    /// `None`: no `rules` field at all.
    #[serde(default)]
    pub rules: Option<Vec<AuthzRule>>,
    /// Fields Skiff does not know (typos, newer Istio fields): kept so the
    /// conversion can refuse them aloud instead of reading them as absent.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuthzRule {
    #[serde(default)]
    pub from: Vec<AuthzFrom>,
    #[serde(default)]
    pub to: Vec<AuthzTo>,
    #[serde(default)]
    pub when: Vec<AuthzCondition>,
    /// Fields Skiff does not know (typos, newer Istio fields): kept so the
    /// conversion can refuse them aloud instead of reading them as absent.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuthzFrom {
    /// `None`: no `source` (invalid, as in Istio).
    #[serde(default)]
    pub source: Option<AuthzSource>,
    /// Fields Skiff does not know (typos, newer Istio fields): kept so the
    /// conversion can refuse them aloud instead of reading them as absent.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuthzSource {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// `namespace/name` of the peer's service account.
    #[serde(default)]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
    /// Fields Skiff does not know (typos, newer Istio fields): kept so the
    /// conversion can refuse them aloud instead of reading them as absent.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuthzTo {
    /// `None`: no `operation` (invalid, as in Istio).
    #[serde(default)]
    pub operation: Option<AuthzOperation>,
    /// Fields Skiff does not know (typos, newer Istio fields): kept so the
    /// conversion can refuse them aloud instead of reading them as absent.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuthzOperation {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
    /// Fields Skiff does not know (typos, newer Istio fields): kept so the
    /// conversion can refuse them aloud instead of reading them as absent.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuthzCondition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
    /// Fields Skiff does not know (typos, newer Istio fields): kept so the
    /// conversion can refuse them aloud instead of reading them as absent.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// `networking.istio.io` VirtualService (the fields Skiff reads).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VirtualService {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: VirtualServiceSpec,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Where it applies: Gateway names and `mesh` (every sidecar and
    /// waypoint). Empty: `mesh` only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    /// Istio `TCPRoute`s: opaque TCP, by port (and address).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<TcpRoute>,
    /// Istio `TLSRoute`s: TLS passed through unterminated, by SNI.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tls: Vec<TlsRoute>,
    /// Namespaces whose proxies see it: `.` its own, `*` all (the
    /// default when empty), or namespace names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TcpRoute {
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<L4MatchSpec>,
    #[serde(default)]
    pub route: Vec<L4RouteDestination>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TlsRoute {
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<TlsMatchSpec>,
    #[serde(default)]
    pub route: Vec<L4RouteDestination>,
}

/// Istio `L4MatchAttributes` (what Skiff reads of it; `sourceLabels` and
/// `sourceNamespace` are refused as unknown).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct L4MatchSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_subnets: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
}

/// Istio `TLSMatchAttributes` (as [`L4MatchSpec`], with `sniHosts`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TlsMatchSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sni_hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_subnets: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
}

/// Istio `RouteDestination`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct L4RouteDestination {
    pub destination: Destination,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatchRequest>,
    #[serde(default)]
    pub route: Vec<HttpRouteDestination>,
    #[serde(default)]
    pub rewrite: Option<HttpRewrite>,
    #[serde(default)]
    pub fault: Option<HttpFault>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub retries: Option<HttpRetry>,
    #[serde(default)]
    pub headers: Option<Headers>,
    #[serde(default)]
    pub direct_response: Option<DirectResponse>,
    #[serde(default)]
    pub redirect: Option<HttpRedirect>,
    #[serde(default)]
    pub mirror: Option<Destination>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<MirrorPolicy>,
    #[serde(default)]
    pub cors_policy: Option<CorsPolicySpec>,
    #[serde(default)]
    pub mirror_percentage: Option<Percent>,
    /// Deprecated integer form.
    #[serde(default)]
    pub mirror_percent: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StringMatchSpec {
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatchRequest {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub uri: Option<StringMatchSpec>,
    #[serde(default)]
    pub authority: Option<StringMatchSpec>,
    #[serde(default)]
    pub method: Option<StringMatchSpec>,
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatchSpec>,
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatchSpec>,
    #[serde(default)]
    pub without_headers: BTreeMap<String, StringMatchSpec>,
    /// Narrows where this match applies (overrides the VirtualService's
    /// `gateways`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub ignore_uri_case: bool,
    #[serde(default)]
    pub scheme: Option<StringMatchSpec>,
    /// Names the route's statistics in Envoy; Skiff has none per route.
    #[serde(default)]
    pub stat_prefix: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteDestination {
    pub destination: Destination,
    #[serde(default)]
    pub weight: Option<i64>,
    #[serde(default)]
    pub headers: Option<Headers>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    pub host: String,
    #[serde(default)]
    pub subset: Option<String>,
    #[serde(default)]
    pub port: Option<PortSelector>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PortSelector {
    pub number: u16,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRewrite {
    #[serde(default)]
    pub uri: Option<String>,
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default)]
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RegexRewrite {
    #[serde(default, rename = "match")]
    pub pattern: Option<String>,
    #[serde(default)]
    pub rewrite: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CorsPolicySpec {
    #[serde(default)]
    pub allow_origins: Vec<StringMatchSpec>,
    /// Deprecated: exact origins.
    #[serde(default)]
    pub allow_origin: Vec<String>,
    #[serde(default)]
    pub allow_methods: Vec<String>,
    #[serde(default)]
    pub allow_headers: Vec<String>,
    #[serde(default)]
    pub expose_headers: Vec<String>,
    #[serde(default)]
    pub max_age: Option<String>,
    #[serde(default)]
    pub allow_credentials: Option<bool>,
    /// `FORWARD` (the default) or `IGNORE`.
    #[serde(default)]
    pub unmatched_preflights: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MirrorPolicy {
    pub destination: Destination,
    #[serde(default)]
    pub percentage: Option<Percent>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Percent {
    pub value: f64,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpFault {
    #[serde(default)]
    pub delay: Option<FaultDelay>,
    #[serde(default)]
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    #[serde(default)]
    pub fixed_delay: Option<String>,
    #[serde(default)]
    pub percentage: Option<Percent>,
    /// Deprecated integer percentage.
    #[serde(default)]
    pub percent: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    #[serde(default)]
    pub http_status: Option<u16>,
    #[serde(default)]
    pub grpc_status: Option<String>,
    #[serde(default)]
    pub percentage: Option<Percent>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRetry {
    #[serde(default)]
    pub attempts: Option<u32>,
    #[serde(default)]
    pub per_try_timeout: Option<String>,
    #[serde(default)]
    pub retry_on: Option<String>,
    #[serde(default)]
    pub retry_ignore_previous_hosts: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Headers {
    #[serde(default)]
    pub request: Option<HeaderOperations>,
    #[serde(default)]
    pub response: Option<HeaderOperations>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HeaderOperations {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DirectResponse {
    pub status: u16,
    #[serde(default)]
    pub body: Option<DirectBody>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DirectBody {
    #[serde(default)]
    pub string: Option<String>,
    /// Base64, as protobuf `bytes` read from JSON or YAML.
    #[serde(default)]
    pub bytes: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRedirect {
    #[serde(default)]
    pub uri: Option<String>,
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default)]
    pub redirect_code: Option<u16>,
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub port: Option<u32>,
    /// `FROM_PROTOCOL_DEFAULT` or `FROM_REQUEST_PORT`.
    #[serde(default)]
    pub derive_port: Option<String>,
}

/// `networking.istio.io` DestinationRule (the fields Skiff reads).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRule {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: DestinationRuleSpec,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    pub host: String,
    #[serde(default)]
    pub subsets: Vec<Subset>,
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicySpec>,
    /// As VirtualService `exportTo`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSpec>,
    #[serde(default)]
    pub connection_pool: Option<ConnectionPoolSpec>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicySpec>,
    #[serde(default)]
    pub tls: Option<Box<ClientTlsSpec>>,
}

/// Istio `ClientTLSSettings` (see `routing::ClientTls` for how each field
/// is read).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClientTlsSpec {
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificates: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insecure_skip_verify: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_crl: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PortTrafficPolicySpec {
    pub port: PortSelector,
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSpec>,
    #[serde(default)]
    pub connection_pool: Option<ConnectionPoolSpec>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    #[serde(default)]
    pub tls: Option<Box<ClientTlsSpec>>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerSpec {
    #[serde(default)]
    pub simple: Option<String>,
    #[serde(default)]
    pub consistent_hash: Option<ConsistentHashSpec>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConsistentHashSpec {
    #[serde(default)]
    pub http_header_name: Option<String>,
    #[serde(default)]
    pub http_cookie: Option<HttpCookieSpec>,
    #[serde(default)]
    pub use_source_ip: Option<bool>,
    #[serde(default)]
    pub http_query_parameter_name: Option<String>,
    #[serde(default)]
    pub ring_hash: Option<RingHashSpec>,
    #[serde(default)]
    pub maglev: Option<MaglevSpec>,
    /// Deprecated: `ringHash.minimumRingSize`.
    #[serde(default)]
    pub minimum_ring_size: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpCookieSpec {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub ttl: Option<String>,
    #[serde(default)]
    pub attributes: Vec<CookieAttribute>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CookieAttribute {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RingHashSpec {
    #[serde(default)]
    pub minimum_ring_size: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MaglevSpec {
    #[serde(default)]
    pub table_size: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPoolSpec {
    #[serde(default)]
    pub tcp: Option<TcpPoolSpec>,
    #[serde(default)]
    pub http: Option<HttpPoolSpec>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TcpPoolSpec {
    #[serde(default)]
    pub max_connections: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpPoolSpec {
    #[serde(default)]
    pub http1_max_pending_requests: Option<u32>,
    #[serde(default)]
    pub http2_max_requests: Option<u32>,
    #[serde(default)]
    pub max_requests_per_connection: Option<u32>,
    #[serde(default)]
    pub max_retries: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetectionSpec {
    #[serde(default)]
    pub consecutive5xx_errors: Option<u32>,
    #[serde(default)]
    pub consecutive_gateway_errors: Option<u32>,
    #[serde(default)]
    pub interval: Option<String>,
    #[serde(default)]
    pub base_ejection_time: Option<String>,
    #[serde(default)]
    pub max_ejection_percent: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicySpec>,
}

/// `networking.istio.io` ServiceEntry: a destination outside the
/// cluster's Services (an external API, a database by address) added to
/// the mesh's registry. Every field of Istio's ServiceEntry and its
/// `WorkloadEntry` endpoints is here; the model refuses what Skiff does
/// not honour.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntry {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceEntrySpec,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ServiceEntryPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<WorkloadEntrySpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntryPort {
    #[serde(default)]
    pub number: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntrySpec {
    #[serde(default)]
    pub address: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

/// `telemetry.istio.io` Telemetry (v1, v1alpha1). Every field of Istio's
/// Telemetry is here; the model refuses what Skiff does not honour.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Telemetry {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: TelemetrySpec,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TelemetrySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tracing: Vec<TracingSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_logging: Option<serde_json::Value>,
}

/// Istio's `PolicyTargetReference`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TracingSpec {
    #[serde(rename = "match", default, skip_serializing_if = "Option::is_none")]
    pub match_: Option<TracingSelector>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<ProviderRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub random_sampling_percentage: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disable_span_reporting: Option<bool>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub custom_tags: BTreeMap<String, CustomTagSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_request_id_for_trace_sampling: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TracingSelector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProviderRef {
    #[serde(default)]
    pub name: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CustomTagSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub literal: Option<LiteralTag>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<NamedTag>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<NamedTag>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LiteralTag {
    #[serde(default)]
    pub value: String,
}

/// An environment variable's or a request header's name, and a default.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NamedTag {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_value: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMap {
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub data: BTreeMap<String, String>,
}

/// A Secret: `data` (base64, as the API serves it) and `stringData`
/// (plain text, as manifests may write it).
#[derive(Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Secret {
    pub metadata: ObjectMeta,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub data: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub string_data: BTreeMap<String, String>,
}

/// Never prints the values: logs and test failures must not leak keys.
impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("metadata", &self.metadata)
            .field("type", &self.type_)
            .field("keys", &self.data.keys().chain(self.string_data.keys()).collect::<Vec<_>>())
            .finish()
    }
}

/// `networking.istio.io` Gateway: the servers a mesh-edge proxy (the
/// ingress gateway) opens, and which gateway pods open them. Every field
/// of Istio's `Gateway`, `Server`, `Port` and `ServerTLSSettings` is here,
/// so none is dropped unseen; the model refuses or disables what Skiff
/// does not serve.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Gateway {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: GatewaySpec,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    #[serde(default)]
    pub servers: Vec<GatewayServer>,
    /// Labels of the gateway pods that open these servers.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayServer {
    #[serde(default)]
    pub port: Option<GatewayPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind: Option<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTls>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayPort {
    #[serde(default)]
    pub number: u32,
    #[serde(default)]
    pub protocol: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServerTls {
    #[serde(default)]
    pub https_redirect: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_certificate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificates: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_crl: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credential_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tls_certificates: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verify_certificate_spki: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verify_certificate_hash: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_protocol_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_protocol_version: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cipher_suites: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert_credential_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insecure_skip_verify: Option<bool>,
}

/// Why a manifest document could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The text is not YAML.
    #[error("document {index}: not valid YAML")]
    Yaml {
        index: usize,
        #[source]
        source: Box<serde_saphyr::Error>,
    },
    /// `apiVersion` or `kind` is missing.
    #[error("document {index}: missing `apiVersion` or `kind`")]
    MissingKind { index: usize },
    /// A field Skiff reads has the wrong shape.
    #[error("document {index} ({kind} {name:?}): field `{path}`")]
    Field {
        index: usize,
        kind: String,
        name: String,
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Parses a (possibly multi-document) YAML text. Empty documents are skipped
/// (and not counted in the document index of errors); `List` objects are
/// flattened.
///
/// Each document is read into a JSON value first (Kubernetes objects are
/// JSON; the API source hands over the same), then typed.
pub fn parse_documents(text: &str) -> Result<Vec<Object>, ParseError> {
    let mut out = Vec::new();
    let mut bytes = text.as_bytes();
    for (index, value) in serde_saphyr::read::<_, serde_json::Value>(&mut bytes).enumerate() {
        let value = value.map_err(|source| ParseError::Yaml { index, source: Box::new(source) })?;
        if value.is_null() {
            continue;
        }
        parse_value(index, &value, &mut out)?;
    }
    Ok(out)
}

/// The documents of a YAML text as JSON values (empty documents skipped),
/// for kinds read as written rather than typed (the local mesh's
/// `IstioOperator`).
pub fn documents_as_json(text: &str) -> Result<Vec<serde_json::Value>, ParseError> {
    let mut bytes = text.as_bytes();
    let mut out = Vec::new();
    for (index, value) in serde_saphyr::read::<_, serde_json::Value>(&mut bytes).enumerate() {
        let value = value.map_err(|source| ParseError::Yaml { index, source: Box::new(source) })?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// Parses one object (as served by the Kubernetes API, with `apiVersion`
/// and `kind` set), with the same typing and errors as a manifest document.
pub fn parse_object(value: &serde_json::Value) -> Result<Object, ParseError> {
    let mut out = Vec::with_capacity(1);
    parse_value(0, value, &mut out)?;
    match out.len() {
        1 => Ok(out.remove(0)),
        // A `List` object: not something a single API object can be.
        _ => Err(ParseError::MissingKind { index: 0 }),
    }
}

fn parse_value(index: usize, value: &serde_json::Value, out: &mut Vec<Object>) -> Result<(), ParseError> {
    let api_version = value.get("apiVersion").and_then(|v| v.as_str()).map(str::to_owned);
    let kind = value.get("kind").and_then(|v| v.as_str()).map(str::to_owned);
    let (Some(api_version), Some(kind)) = (api_version, kind) else {
        return Err(ParseError::MissingKind { index });
    };
    if kind == "List" || kind.ends_with("List") {
        if let Some(items) = value.get("items").and_then(|v| v.as_array()) {
            for item in items {
                parse_value(index, item, out)?;
            }
            return Ok(());
        }
    }
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name").or_else(|| m.get("generateName")))
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_owned();
    let namespace = value.get("metadata").and_then(|m| m.get("namespace")).and_then(|v| v.as_str()).map(str::to_owned);
    // The object as written is copied only when it is refused.
    let invalid = |field: String, message: String| {
        Object::Invalid(InvalidObject {
            api_version: api_version.clone(),
            kind: kind.clone(),
            namespace: namespace.clone(),
            name: name.clone(),
            field,
            message,
            raw: value.clone(),
        })
    };
    // A field of the wrong shape refuses this object only.
    let field = |e: serde_path_to_error::Error<serde_json::Error>| invalid(e.path().to_string(), e.into_inner().to_string());
    let core = api_version == "v1";
    let apps = api_version == "apps/v1";
    let security = matches!(api_version.as_str(), "security.istio.io/v1" | "security.istio.io/v1beta1");
    let telemetry = matches!(api_version.as_str(), "telemetry.istio.io/v1" | "telemetry.istio.io/v1alpha1");
    let networking = matches!(
        api_version.as_str(),
        "networking.istio.io/v1" | "networking.istio.io/v1beta1" | "networking.istio.io/v1alpha3"
    );
    // Istio kinds: a field the typed form drops is a field Skiff does not
    // know; it is refused aloud, never read as absent.
    fn istio<T: serde::de::DeserializeOwned + Serialize>(
        value: &serde_json::Value,
        wrap: fn(T) -> Object,
        field: &dyn Fn(serde_path_to_error::Error<serde_json::Error>) -> Object,
        invalid: &dyn Fn(String, String) -> Object,
    ) -> Object {
        if let Some(k) = value.as_object().and_then(|o| o.keys().find(|k| !["apiVersion", "kind", "metadata", "spec", "status"].contains(&k.as_str()))) {
            return invalid(k.clone(), "not a top-level field of a Kubernetes object (a misspelt `spec`?)".into());
        }
        match typed::<T>(value) {
            Err(e) => field(e),
            Ok(t) => {
                let back = serde_json::to_value(&t).ok().and_then(|v| v.get("spec").cloned()).unwrap_or_default();
                let mut dropped = Vec::new();
                dropped_fields(value.get("spec").unwrap_or(&serde_json::Value::Null), &back, "spec", &mut dropped);
                match dropped.into_iter().next() {
                    Some(path) => invalid(path, "not a field Skiff supports (refused rather than ignored)".into()),
                    None => wrap(t),
                }
            }
        }
    }
    let typed_or = |r: Result<Object, serde_path_to_error::Error<serde_json::Error>>| r.unwrap_or_else(&field);
    let obj = match kind.as_str() {
        "Namespace" if core => typed_or(typed(value).map(Object::Namespace)),
        "Pod" if core => typed_or(typed(value).map(Object::Pod)),
        "Service" if core => typed_or(typed(value).map(Object::Service)),
        "Deployment" if apps => typed_or(typed(value).map(Object::Deployment)),
        "PeerAuthentication" if security => istio(value, Object::PeerAuthentication, &field, &invalid),
        // AuthorizationPolicy: unknown fields inside rules are kept (and
        // fail closed there: an ALLOW rule never matches), so the check
        // refuses only unknown fields elsewhere (a `selector` typo would
        // otherwise widen the policy to the whole namespace).
        "AuthorizationPolicy" if security => istio(value, Object::AuthorizationPolicy, &field, &invalid),
        "VirtualService" if networking => istio(value, Object::VirtualService, &field, &invalid),
        "DestinationRule" if networking => istio(value, Object::DestinationRule, &field, &invalid),
        "Gateway" if networking => istio(value, Object::Gateway, &field, &invalid),
        "ServiceEntry" if networking => istio(value, Object::ServiceEntry, &field, &invalid),
        "Telemetry" if telemetry => istio(value, Object::Telemetry, &field, &invalid),
        "Secret" if core => typed_or(typed(value).map(Object::Secret)),
        "ConfigMap" if core => typed_or(typed(value).map(Object::ConfigMap)),
        _ => Object::Other { api_version, kind },
    };
    out.push(obj);
    Ok(())
}

/// Paths of the fields in `raw` that `typed` (the same object read into a
/// typed form and written back) does not have: the fields the typed form
/// does not know. Empty values (`null`, `[]`, `{}`) are not counted.
fn dropped_fields(raw: &serde_json::Value, typed: &serde_json::Value, path: &str, out: &mut Vec<String>) {
    use serde_json::Value;
    let empty = |v: &Value| match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    };
    match (raw, typed) {
        (Value::Object(r), Value::Object(t)) => {
            for (k, v) in r {
                match t.get(k) {
                    None if !empty(v) => out.push(format!("{path}.{k}")),
                    None => {}
                    Some(tv) => dropped_fields(v, tv, &format!("{path}.{k}"), out),
                }
            }
        }
        (Value::Array(r), Value::Array(t)) => {
            for (i, (rv, tv)) in r.iter().zip(t).enumerate() {
                dropped_fields(rv, tv, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Reads a typed object from the JSON value, by reference: the value stays
/// for a refusal's record of the object as written.
fn typed<T: serde::de::DeserializeOwned>(value: &serde_json::Value) -> Result<T, serde_path_to_error::Error<serde_json::Error>> {
    serde_path_to_error::deserialize(value)
}

impl Object {
    /// `Kind namespace/name`, for messages.
    pub fn describe(&self) -> String {
        let (kind, meta) = match self {
            Object::Namespace(o) => ("Namespace", &o.metadata),
            Object::Pod(o) => ("Pod", &o.metadata),
            Object::Deployment(o) => ("Deployment", &o.metadata),
            Object::Service(o) => ("Service", &o.metadata),
            Object::PeerAuthentication(o) => ("PeerAuthentication", &o.metadata),
            Object::AuthorizationPolicy(o) => ("AuthorizationPolicy", &o.metadata),
            Object::VirtualService(o) => ("VirtualService", &o.metadata),
            Object::DestinationRule(o) => ("DestinationRule", &o.metadata),
            Object::Gateway(o) => ("Gateway", &o.metadata),
            Object::ServiceEntry(o) => ("ServiceEntry", &o.metadata),
            Object::Telemetry(o) => ("Telemetry", &o.metadata),
            Object::Secret(o) => ("Secret", &o.metadata),
            Object::ConfigMap(o) => ("ConfigMap", &o.metadata),
            Object::Other { kind, .. } => return kind.clone(),
            Object::Invalid(o) => {
                return match &o.namespace {
                    Some(ns) => format!("{} {ns}/{}", o.kind, o.name),
                    None => format!("{} {}", o.kind, o.name),
                }
            }
        };
        let name = meta.name.as_deref().unwrap_or("<unnamed>");
        match &meta.namespace {
            Some(ns) => format!("{kind} {ns}/{name}"),
            None => format!("{kind} {name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_multi_document_yaml_and_skips_unknown_kinds() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n  labels:\n    skiff.dev/dataplane-mode: ambient\n---\n---\napiVersion: v1\nkind: LimitRange\nmetadata: {name: x}\n";
        let objs = parse_documents(text).unwrap();
        assert_eq!(objs.len(), 2);
        match &objs[0] {
            Object::Namespace(ns) => assert_eq!(ns.metadata.labels["skiff.dev/dataplane-mode"], "ambient"),
            o => panic!("unexpected {o:?}"),
        }
        assert!(matches!(&objs[1], Object::Other { kind, .. } if kind == "LimitRange"));
    }

    #[test]
    fn wrong_field_type_refuses_that_object_only_naming_the_field() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports:\n  - port: eighty\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n";
        let objs = parse_documents(text).unwrap();
        match &objs[0] {
            Object::Invalid(o) => {
                assert_eq!((o.kind.as_str(), o.name.as_str(), o.field.as_str()), ("Service", "web", "spec.ports[0].port"));
                assert!(o.message.contains("eighty"), "{o:?}");
            }
            o => panic!("{o:?}"),
        }
        assert!(matches!(&objs[1], Object::Namespace(_)), "the next document is read");
    }

    /// Istio kinds: a field the typed reading does not know is refused with
    /// its path, never read as absent (VirtualService, DestinationRule,
    /// PeerAuthentication); empty values are not counted.
    #[test]
    fn unknown_istio_fields_are_refused_naming_the_path() {
        let one = |text: &str| parse_documents(text).unwrap().remove(0);
        #[rustfmt::skip]
        let cases: &[(&str, Option<&str>)] = &[
            ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v, namespace: a}\nspec: {hosts: [r], exportTo: [\".\"], hostz: [r]}\n", Some("spec.hostz")),
            ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v, namespace: a}\nspec: {hosts: [r], http: [{route: [{destination: {host: r}}], corsPolicy: {allowOrigins: [{exact: x}], allowOrigns: [x]}}]}\n", Some("spec.http[0].corsPolicy.allowOrigns")),
            ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v, namespace: a}\nspec: {hosts: [r], tcp: []}\n", None),
            ("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d, namespace: a}\nspec: {host: r, trafficPolicy: {tls: {mode: SIMPLE, snii: r.example}}}\n", Some("spec.trafficPolicy.tls.snii")),
            ("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: a}\nspec: {mtls: {mode: STRICT, strict: true}}\n", Some("spec.mtls.strict")),
            ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v, namespace: a}\nspec: {hosts: [r], gateways: [mesh]}\n", None),
        ];
        for (text, want) in cases {
            match (one(text), want) {
                (Object::Invalid(o), Some(field)) => assert_eq!(&o.field, field, "{text}"),
                (Object::Invalid(o), None) => panic!("refused {text}: {o:?}"),
                (o, Some(field)) => panic!("{field} not refused: {o:?}"),
                (_, None) => {}
            }
        }
    }

    #[test]
    fn missing_kind_is_an_error() {
        assert!(matches!(parse_documents("metadata: {name: x}\n"), Err(ParseError::MissingKind { index: 0 })));
    }
}
