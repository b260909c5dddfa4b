//! Egress: Istio `ServiceEntry` (destinations outside the cluster's
//! Services added to the mesh's registry) and the outbound traffic policy
//! (`ALLOW_ANY`, `REGISTRY_ONLY`), read and validated object by object,
//! and the pure decision ztunnel takes for a connection to an address
//! that is neither a Service nor a pod: which ServiceEntry (if any) it
//! reaches, and where it goes.
//!
//! What each field does is in ARCHITECTURE.md ("ServiceEntry: how Skiff
//! reads Istio's fields"); `tests/conformance.rs` checks that table.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
};

use crate::{
    k8s,
    policy::Cidr,
    routing::ExportTo,
};

type FieldError = (String, String);

/// Istio's `outboundTrafficPolicy.mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutboundPolicy {
    /// Any destination (Istio's default).
    #[default]
    AllowAny,
    /// Only Services, pods and ServiceEntries; anything else is refused.
    RegistryOnly,
}

impl OutboundPolicy {
    pub fn parse(s: &str) -> Option<OutboundPolicy> {
        match s {
            "ALLOW_ANY" => Some(OutboundPolicy::AllowAny),
            "REGISTRY_ONLY" => Some(OutboundPolicy::RegistryOnly),
            _ => None,
        }
    }
}

/// Istio's mesh config (the `mesh` key of the ConfigMap `istio` in the
/// root namespace), as far as Skiff reads it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeshConfig {
    /// `outboundTrafficPolicy.mode`; None when not set.
    pub outbound_policy: Option<OutboundPolicy>,
    /// `extensionProviders`: the tracing providers, by name.
    pub tracing_providers: BTreeMap<String, crate::telemetry_api::Provider>,
    /// `defaultProviders.tracing`.
    pub default_tracing: Vec<String>,
    /// Top-level fields of the mesh config Skiff does not read (reported).
    pub not_read: Vec<String>,
}

/// The name of Istio's mesh config ConfigMap, and its key.
pub const MESH_CONFIG_MAP: &str = "istio";
pub const MESH_CONFIG_KEY: &str = "mesh";

/// Reads the mesh config text (YAML); the error names the field.
pub fn mesh_config_from(text: &str) -> Result<MeshConfig, FieldError> {
    let field = format!("data.{MESH_CONFIG_KEY}");
    let docs = k8s::documents_as_json(text).map_err(|e| (field.clone(), format!("not YAML: {}", crate::report(&e))))?;
    let v = docs.into_iter().next().unwrap_or(serde_json::Value::Null);
    if !(v.is_object() || v.is_null()) {
        return Err((field, "not a mapping".into()));
    }
    let mut out = MeshConfig::default();
    if let Some(obj) = v.as_object() {
        for (k, val) in obj {
            if k == "extensionProviders" {
                let (providers, not_read) = crate::telemetry_api::providers_from(val, k);
                out.tracing_providers = providers;
                out.not_read.extend(not_read);
                continue;
            }
            if k == "defaultProviders" {
                for (kind, names) in val.as_object().into_iter().flatten() {
                    match (kind.as_str(), names.as_array()) {
                        ("tracing", Some(names)) => out.default_tracing = names.iter().filter_map(|n| n.as_str().map(str::to_owned)).collect(),
                        _ => out.not_read.push(format!("defaultProviders.{kind}")),
                    }
                }
                continue;
            }
            if k != "outboundTrafficPolicy" {
                out.not_read.push(k.clone());
                continue;
            }
            let mode = &val["mode"];
            let f = format!("{field}.outboundTrafficPolicy.mode");
            out.outbound_policy = match mode {
                serde_json::Value::Null => None,
                serde_json::Value::String(m) => Some(OutboundPolicy::parse(m).ok_or_else(|| (f.clone(), format!("{m:?} is not ALLOW_ANY or REGISTRY_ONLY")))?),
                other => return Err((f, format!("{other} is not ALLOW_ANY or REGISTRY_ONLY"))),
            };
        }
    }
    Ok(out)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Connections go to the address the application asked for.
    None,
    /// To the endpoints' addresses.
    Static,
    /// To the addresses the hosts (or endpoints' names) resolve to.
    Dns,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SePort {
    pub number: u16,
    pub name: String,
    pub protocol: Option<String>,
    pub target_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SeEndpoint {
    /// An IP address (STATIC, or DNS given an address) or a host name (DNS).
    pub address: String,
    /// Port name → port on this endpoint.
    pub ports: BTreeMap<String, u16>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServiceEntry {
    pub namespace: String,
    pub name: String,
    /// Its labels: `istio.io/use-waypoint` sends its traffic through a
    /// waypoint (`Snapshot::waypoint_name_for_entry`).
    pub labels: BTreeMap<String, String>,
    /// Lower-case; `*.suffix` wildcards allowed.
    pub hosts: Vec<String>,
    pub addresses: Vec<Cidr>,
    pub ports: Vec<SePort>,
    /// `location: MESH_INTERNAL` (else MESH_EXTERNAL).
    pub internal: bool,
    pub resolution: Resolution,
    pub endpoints: Vec<SeEndpoint>,
    pub export_to: ExportTo,
    /// `metadata.creationTimestamp`: among entries claiming one address,
    /// the client's namespace's first, then the oldest.
    pub created: Option<String>,
}

impl ServiceEntry {
    /// NONE without `addresses` takes any address on its ports only when
    /// they are plain TCP (Istio matches HTTP ports by Host and TLS ports
    /// by SNI, which ztunnel does not see): otherwise it takes the
    /// addresses its hosts resolve to, as a DNS entry does.
    fn any_address_on_port(&self) -> bool {
        self.resolution == Resolution::None
            && self.addresses.is_empty()
            && self.ports.iter().all(|p| p.protocol.as_deref().is_some_and(|pr| pr.eq_ignore_ascii_case("TCP")))
    }

    /// Whether its hosts are resolved to find the addresses it takes.
    fn resolves_hosts(&self) -> bool {
        (self.resolution == Resolution::Dns && self.endpoints.is_empty())
            || (self.resolution == Resolution::None && self.addresses.is_empty() && !self.any_address_on_port())
    }
}

/// Where a connection to an unregistered address goes when a ServiceEntry
/// takes it.
#[derive(Clone, Debug, PartialEq)]
pub struct EgressTarget<'a> {
    pub entry: &'a ServiceEntry,
    /// The address to connect to.
    pub target: SocketAddrV4,
    /// The name metrics and logs give it (`destination_service`): the
    /// host whose resolved addresses took `dst`, else the entry's first.
    pub host: &'a str,
}

fn is_dns_name(h: &str) -> bool {
    let rest = h.strip_prefix("*.").unwrap_or(h);
    !rest.is_empty() && rest.len() <= 253 && rest.split('.').all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

/// Validates and converts a ServiceEntry; the error names the field.
pub fn service_entry_from(se: &k8s::ServiceEntry) -> Result<ServiceEntry, FieldError> {
    let namespace = se.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = se.metadata.name.clone().unwrap_or_default();
    let spec = &se.spec;
    if spec.hosts.is_empty() {
        return Err(("spec.hosts".into(), "at least one host is required".into()));
    }
    let mut hosts = Vec::new();
    for (i, h) in spec.hosts.iter().enumerate() {
        if h == "*" || !is_dns_name(h) {
            return Err((format!("spec.hosts[{i}]"), format!("{h:?} is not a host name or `*.suffix` (`*` alone is not allowed)")));
        }
        // A single label would read as a Service's short name wherever
        // hosts are matched (a waypoint's routes, DestinationRules).
        if !h.contains('.') {
            return Err((format!("spec.hosts[{i}]"), format!("{h:?}: a ServiceEntry's host must be fully qualified (a short name reads as a Service's)")));
        }
        hosts.push(h.to_ascii_lowercase());
    }
    let mut addresses = Vec::new();
    for (i, a) in spec.addresses.iter().enumerate() {
        let c = Cidr::parse(a).ok_or_else(|| (format!("spec.addresses[{i}]"), format!("{a:?} is not an IP address or CIDR")))?;
        if !c.addr.is_ipv4() {
            return Err((format!("spec.addresses[{i}]"), format!("{a:?}: IPv6 is not carried by Skiff yet")));
        }
        addresses.push(c);
    }
    if spec.ports.is_empty() {
        return Err(("spec.ports".into(), "at least one port is required".into()));
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let f = |x: &str| format!("spec.ports[{i}].{x}");
        let number = u16::try_from(p.number).ok().filter(|n| *n > 0).ok_or_else(|| (f("number"), format!("{} is not a port", p.number)))?;
        if p.name.is_empty() {
            return Err((f("name"), "required".into()));
        }
        if ports.iter().any(|q: &SePort| q.number == number) {
            return Err((f("number"), format!("port {number} is listed twice")));
        }
        if let Some(proto) = &p.protocol {
            if !matches!(proto.to_ascii_uppercase().as_str(), "HTTP" | "HTTPS" | "HTTP2" | "GRPC" | "GRPC-WEB" | "TCP" | "TLS" | "MONGO" | "MYSQL" | "REDIS") {
                return Err((f("protocol"), format!("{proto:?} is not a protocol Istio knows")));
            }
        }
        let target_port = p.target_port.map(|t| u16::try_from(t).ok().filter(|n| *n > 0).ok_or_else(|| (f("targetPort"), format!("{t} is not a port")))).transpose()?;
        ports.push(SePort { number, name: p.name.clone(), protocol: p.protocol.clone(), target_port });
    }
    let internal = match spec.location.as_deref() {
        None | Some("MESH_EXTERNAL") => false,
        Some("MESH_INTERNAL") => true,
        Some(o) => return Err(("spec.location".into(), format!("{o:?} is not MESH_EXTERNAL or MESH_INTERNAL"))),
    };
    let resolution = match spec.resolution.as_deref() {
        None | Some("NONE") => Resolution::None,
        Some("STATIC") => Resolution::Static,
        Some("DNS") | Some("DNS_ROUND_ROBIN") => Resolution::Dns,
        Some(o) => return Err(("spec.resolution".into(), format!("{o:?} is not NONE, STATIC, DNS or DNS_ROUND_ROBIN"))),
    };
    if spec.workload_selector.is_some() {
        return Err(("spec.workloadSelector".into(), "refused: pods as a ServiceEntry's endpoints are not implemented".into()));
    }
    if !spec.subject_alt_names.is_empty() {
        return Err(("spec.subjectAltNames".into(), "refused: mutual TLS to a ServiceEntry's endpoints is not implemented".into()));
    }
    let mut endpoints = Vec::new();
    for (i, e) in spec.endpoints.iter().enumerate() {
        let f = |x: &str| format!("spec.endpoints[{i}].{x}");
        for (set, field) in [(e.network.is_some(), "network"), (e.service_account.is_some(), "serviceAccount"), (e.weight.is_some(), "weight"), (e.locality.is_some(), "locality")] {
            if set {
                return Err((f(field), "refused: not implemented".into()));
            }
        }
        let is_ip = e.address.parse::<Ipv4Addr>().is_ok();
        match resolution {
            Resolution::None => return Err((f("address"), "resolution NONE takes no endpoints (Istio's validation)".into())),
            Resolution::Static if !is_ip => return Err((f("address"), format!("{:?}: STATIC endpoints are IPv4 addresses", e.address))),
            Resolution::Dns if !is_ip && !is_dns_name(&e.address) => return Err((f("address"), format!("{:?} is not an address or a host name", e.address))),
            _ => {}
        }
        let mut ports_map = BTreeMap::new();
        for (k, v) in &e.ports {
            let n = u16::try_from(*v).ok().filter(|n| *n > 0).ok_or_else(|| (f(&format!("ports[{k}]")), format!("{v} is not a port")))?;
            ports_map.insert(k.clone(), n);
        }
        endpoints.push(SeEndpoint { address: e.address.clone(), ports: ports_map, labels: e.labels.clone() });
    }
    if resolution == Resolution::Static && endpoints.is_empty() {
        return Err(("spec.endpoints".into(), "resolution STATIC needs endpoints (Istio's validation)".into()));
    }
    if resolution == Resolution::Dns && endpoints.is_empty() && hosts.iter().any(|h| h.starts_with('*')) {
        return Err(("spec.hosts".into(), "resolution DNS without endpoints resolves the hosts: a wildcard cannot be resolved (Istio's validation)".into()));
    }
    // Names ztunnel resolves are absolute: a single label would go through
    // ztunnel's own DNS search path, not the pod's.
    if resolution == Resolution::Dns && endpoints.is_empty() {
        if let Some((i, h)) = hosts.iter().enumerate().find(|(_, h)| !h.contains('.')) {
            return Err((format!("spec.hosts[{i}]"), format!("{h:?}: a host ztunnel resolves must be fully qualified")));
        }
    }
    let export_to = parse_export_to(&spec.export_to, &namespace)?;
    Ok(ServiceEntry {
        namespace,
        name,
        labels: se.metadata.labels.clone(),
        hosts,
        addresses,
        ports,
        internal,
        resolution,
        endpoints,
        export_to,
        created: se.metadata.creation_timestamp.clone(),
    })
}

/// `exportTo`, where a ServiceEntry may also say `~` (no one).
fn parse_export_to(entries: &[String], own_ns: &str) -> Result<ExportTo, FieldError> {
    if entries.len() == 1 && entries[0] == "~" {
        return Ok(ExportTo::Namespaces(Default::default()));
    }
    ExportTo::parse(entries, own_ns)
}

/// Host names ztunnel resolves: the hosts of DNS entries without
/// endpoints and of NONE entries it must match by name (see
/// `any_address_on_port`), DNS endpoints' names; never wildcards.
pub fn names_to_resolve(entries: &[ServiceEntry]) -> Vec<String> {
    let mut out: Vec<String> = entries
        .iter()
        .flat_map(|e| {
            if e.resolves_hosts() {
                e.hosts.clone()
            } else if e.resolution == Resolution::Dns {
                e.endpoints.iter().filter(|p| p.address.parse::<Ipv4Addr>().is_err()).map(|p| p.address.clone()).collect()
            } else {
                Vec::new()
            }
        })
        .filter(|h| !h.starts_with('*'))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The entries exported to `client_ns`, in the order that picks among
/// several: the client's namespace's first, then the oldest (then by
/// namespace and name).
pub fn visible_in_order<'a>(entries: &'a [ServiceEntry], client_ns: &str) -> Vec<&'a ServiceEntry> {
    let mut visible: Vec<&ServiceEntry> = entries.iter().filter(|e| e.export_to.visible_to(client_ns)).collect();
    visible.sort_by_key(|e| (e.namespace != client_ns, e.created.is_none(), e.created.clone(), e.namespace.clone(), e.name.clone()));
    visible
}

/// The ServiceEntry a connection from a pod in `client_ns` to `dst` (an
/// address that is neither a Service nor a pod) reaches, and where it
/// goes; None: it is outside the registry. `resolved`: the addresses of
/// DNS names ([`names_to_resolve`]) as last resolved.
///
/// - `addresses` (a VIP or CIDR) with the port: STATIC and DNS entries
///   send it to an endpoint (the first; DNS: the first resolved address),
///   NONE to `dst` itself;
/// - STATIC: `dst` is an endpoint's address;
/// - DNS: `dst` is an address a host or endpoint resolved to;
/// - NONE without `addresses`: any address on the port when its ports
///   are TCP (Istio's reading); otherwise the addresses its hosts resolve
///   to (Istio matches such ports by Host or SNI, which ztunnel does not
///   see: by address is the closest it can do without opening the port
///   to every address).
///
/// The port goes to `targetPort`, else the endpoint's port of that name,
/// else the same number. Among several entries, the client's namespace's
/// first, then the oldest (then by namespace and name).
pub fn lookup<'a>(entries: &'a [ServiceEntry], client_ns: &str, dst: SocketAddrV4, resolved: &HashMap<String, Vec<Ipv4Addr>>) -> Option<EgressTarget<'a>> {
    let ip = IpAddr::V4(*dst.ip());
    visible_in_order(entries, client_ns).into_iter().find_map(|e| {
        let port = e.ports.iter().find(|p| p.number == dst.port())?;
        let endpoint_port = |ep: Option<&SeEndpoint>| port.target_port.or_else(|| ep.and_then(|ep| ep.ports.get(&port.name).copied())).unwrap_or(port.number);
        let endpoint_ips = |ep: &SeEndpoint| -> Vec<Ipv4Addr> {
            match ep.address.parse::<Ipv4Addr>() {
                Ok(a) => vec![a],
                Err(_) => resolved.get(&ep.address).cloned().unwrap_or_default(),
            }
        };
        let host_ips = || e.hosts.iter().flat_map(|h| resolved.get(h).cloned().unwrap_or_default()).collect::<Vec<_>>();
        // The host a resolved address belongs to names the destination;
        // otherwise the first.
        let mut host = e.hosts[0].as_str();
        let target = if e.addresses.iter().any(|c| c.contains(ip)) {
            match e.resolution {
                Resolution::None => SocketAddrV4::new(*dst.ip(), endpoint_port(None)),
                _ => match e.endpoints.first() {
                    Some(ep) => SocketAddrV4::new(*endpoint_ips(ep).first()?, endpoint_port(Some(ep))),
                    None => SocketAddrV4::new(*host_ips().first()?, endpoint_port(None)),
                },
            }
        } else {
            match e.resolution {
                Resolution::None if e.any_address_on_port() => SocketAddrV4::new(*dst.ip(), endpoint_port(None)),
                Resolution::None if e.addresses.is_empty() => {
                    host = e.hosts.iter().find(|h| resolved.get(*h).is_some_and(|v| v.contains(dst.ip())))?;
                    SocketAddrV4::new(*dst.ip(), endpoint_port(None))
                }
                Resolution::None => return None,
                Resolution::Static | Resolution::Dns if !e.endpoints.is_empty() => {
                    let ep = e.endpoints.iter().find(|ep| endpoint_ips(ep).contains(dst.ip()))?;
                    SocketAddrV4::new(*dst.ip(), endpoint_port(Some(ep)))
                }
                Resolution::Static => return None,
                Resolution::Dns => {
                    host = e.hosts.iter().find(|h| resolved.get(*h).is_some_and(|v| v.contains(dst.ip())))?;
                    SocketAddrV4::new(*dst.ip(), endpoint_port(None))
                }
            }
        };
        Some(EgressTarget { entry: e, target, host })
    })
}

/// Entries of different namespaces that claim one address (their
/// `addresses` overlap, or they list one STATIC endpoint): reported, as
/// the client's namespace's entry wins for its pods and the oldest for
/// others.
pub fn overlaps(entries: &[ServiceEntry]) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for (i, a) in entries.iter().enumerate() {
        for b in &entries[i + 1..] {
            if a.namespace == b.namespace {
                continue;
            }
            let shared_port = a.ports.iter().any(|p| b.ports.iter().any(|q| q.number == p.number));
            let cidr_overlap = a.addresses.iter().any(|x| b.addresses.iter().any(|y| x.contains(y.addr) || y.contains(x.addr)));
            let ep_overlap = a.endpoints.iter().any(|x| b.endpoints.iter().any(|y| x.address == y.address));
            if shared_port && (cidr_overlap || ep_overlap) {
                out.push((format!("{}/{}", a.namespace, a.name), format!("{}/{}", b.namespace, b.name), "claim the same address and port".to_owned()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn se(spec: &str) -> Result<ServiceEntry, FieldError> {
        let text = format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: ext, namespace: shop}}\nspec:\n{spec}");
        match k8s::parse_documents(&text).unwrap().remove(0) {
            k8s::Object::ServiceEntry(s) => service_entry_from(&s),
            k8s::Object::Invalid(o) => Err((o.field, o.message)),
            other => panic!("{other:?}"),
        }
    }

    /// Istio's ServiceEntry validation (pilot's ValidateServiceEntry) and
    /// Skiff's refusals, each naming the field.
    #[test]
    fn validation_table() {
        #[rustfmt::skip]
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("DNS", "  hosts: [api.example.com]\n  ports: [{number: 443, name: https, protocol: TLS}]\n  resolution: DNS\n", None),
            ("no hosts", "  ports: [{number: 443, name: https}]\n", Some("spec.hosts")),
            ("host *", "  hosts: [\"*\"]\n  ports: [{number: 443, name: https}]\n", Some("spec.hosts[0]")),
            ("no ports", "  hosts: [a.example.com]\n", Some("spec.ports")),
            ("port name", "  hosts: [a.example.com]\n  ports: [{number: 443}]\n", Some("spec.ports[0].name")),
            ("STATIC without endpoints", "  hosts: [a.example.com]\n  ports: [{number: 80, name: http}]\n  resolution: STATIC\n", Some("spec.endpoints")),
            ("STATIC with a name", "  hosts: [a.example.com]\n  ports: [{number: 80, name: http}]\n  resolution: STATIC\n  endpoints: [{address: b.example.com}]\n", Some("spec.endpoints[0].address")),
            ("NONE with endpoints", "  hosts: [a.example.com]\n  ports: [{number: 80, name: http}]\n  endpoints: [{address: 10.1.1.1}]\n", Some("spec.endpoints[0].address")),
            ("DNS with a wildcard and no endpoints", "  hosts: [\"*.example.com\"]\n  ports: [{number: 80, name: http}]\n  resolution: DNS\n", Some("spec.hosts")),
            ("bad address", "  hosts: [a.example.com]\n  addresses: [10.0.0.300]\n  ports: [{number: 80, name: http}]\n", Some("spec.addresses[0]")),
            ("bad location", "  hosts: [a.example.com]\n  ports: [{number: 80, name: http}]\n  location: OUTSIDE\n", Some("spec.location")),
            ("workloadSelector", "  hosts: [a.example.com]\n  ports: [{number: 80, name: http}]\n  workloadSelector: {labels: {app: x}}\n", Some("spec.workloadSelector")),
            ("exportTo ~", "  hosts: [a.example.com]\n  ports: [{number: 80, name: http}]\n  exportTo: [\"~\"]\n", None),
        ];
        for (what, spec, want) in cases {
            match (se(spec), want) {
                (Ok(_), None) => {}
                (Err((field, _)), Some(w)) => assert_eq!(&field, w, "{what}"),
                (Ok(s), Some(w)) => panic!("{what}: taken ({s:?}), want refused at {w}"),
                (Err(e), None) => panic!("{what}: refused: {e:?}"),
            }
        }
    }

    /// Which ServiceEntry an unregistered address reaches (Istio
    /// ServiceEntry `addresses`, `resolution`, `endpoints`, `ports`,
    /// `exportTo`).
    #[test]
    fn lookup_by_address_resolution_and_port() {
        let entries = vec![
            se("  hosts: [vip.example.com]\n  addresses: [240.0.0.1]\n  ports: [{number: 80, name: http, targetPort: 8080}]\n  resolution: STATIC\n  endpoints: [{address: 203.0.113.5}]\n").unwrap(),
            se("  hosts: [static.example.com]\n  ports: [{number: 5432, name: pg}]\n  resolution: STATIC\n  endpoints: [{address: 203.0.113.9, ports: {pg: 6432}}]\n").unwrap(),
            se("  hosts: [api.example.com]\n  ports: [{number: 443, name: https}]\n  resolution: DNS\n").unwrap(),
            se("  hosts: [any.example.com]\n  ports: [{number: 9999, name: tcp, protocol: TCP}]\n").unwrap(),
            se("  hosts: [stripe.example.com]\n  ports: [{number: 8443, name: tls, protocol: TLS}]\n").unwrap(),
            se("  hosts: [private.example.com]\n  ports: [{number: 7000, name: tcp, protocol: TCP}]\n  exportTo: [\".\"]\n").unwrap(),
        ];
        let resolved: HashMap<String, Vec<Ipv4Addr>> =
            [("api.example.com".to_owned(), vec!["198.51.100.7".parse().unwrap()]), ("stripe.example.com".to_owned(), vec!["198.51.100.9".parse().unwrap()])].into();
        let go = |ns: &str, dst: &str| lookup(&entries, ns, dst.parse().unwrap(), &resolved).map(|t| (t.host.to_owned(), t.target.to_string()));
        let want = |h: &str, t: &str| Some((h.to_owned(), t.to_owned()));
        assert_eq!(go("app", "240.0.0.1:80"), want("vip.example.com", "203.0.113.5:8080"), "a VIP: to the endpoint, targetPort");
        assert_eq!(go("app", "240.0.0.1:81"), None, "not one of its ports");
        assert_eq!(go("app", "203.0.113.9:5432"), want("static.example.com", "203.0.113.9:6432"), "STATIC endpoint, its named port");
        assert_eq!(go("app", "203.0.113.10:5432"), None, "not an endpoint");
        assert_eq!(go("app", "198.51.100.7:443"), want("api.example.com", "198.51.100.7:443"), "DNS: a resolved address");
        assert_eq!(go("app", "198.51.100.8:443"), None, "DNS: another address");
        assert_eq!(go("app", "192.0.2.1:9999"), want("any.example.com", "192.0.2.1:9999"), "NONE without addresses, TCP: any address on the port");
        assert_eq!(go("app", "192.0.2.1:8443"), None, "NONE without addresses, TLS: not any address (Istio would check the SNI)");
        assert_eq!(go("app", "198.51.100.9:8443"), want("stripe.example.com", "198.51.100.9:8443"), "... but the addresses its hosts resolve to");
        assert_eq!(go("shop", "192.0.2.1:7000"), want("private.example.com", "192.0.2.1:7000"));
        assert_eq!(go("app", "192.0.2.1:7000"), None, "exportTo: . hides it from other namespaces");
        assert_eq!(names_to_resolve(&entries), ["api.example.com", "stripe.example.com"]);
    }
}
