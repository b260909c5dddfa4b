//! Istio `Gateway`: the servers a mesh-edge proxy (Skiff's ingress
//! gateway) opens, read and validated object by object, and the pure
//! decisions the gateway takes with them: which Gateways select a gateway
//! pod, which port each server listens on, which server a request's host
//! reaches, and which VirtualServices route it there.
//!
//! What each field does is in ARCHITECTURE.md ("Gateway: how Skiff reads
//! Istio's fields"); `tests/conformance.rs` checks that table.

use std::collections::BTreeMap;

use crate::{
    k8s,
    routing::{specificity, Bind, HttpMatch, HttpRoute, L4Route, RequestInfo, StrMatch, VirtualService},
};

type FieldError = (String, String);

/// A Gateway server's protocol (Istio's names, case-insensitive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    GrpcWeb,
    Https,
    Tls,
    Tcp,
    Mongo,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Protocol> {
        Some(match s.to_ascii_uppercase().as_str() {
            "HTTP" => Protocol::Http,
            "HTTP2" => Protocol::Http2,
            "GRPC" => Protocol::Grpc,
            "GRPC-WEB" => Protocol::GrpcWeb,
            "HTTPS" => Protocol::Https,
            "TLS" => Protocol::Tls,
            "TCP" => Protocol::Tcp,
            "MONGO" => Protocol::Mongo,
            _ => return None,
        })
    }

    /// Plaintext HTTP of some version (HTTP/1.1, HTTP/2 prior knowledge,
    /// gRPC): served by the gateway's HTTP engine without TLS.
    pub fn is_plain_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2 | Protocol::Grpc | Protocol::GrpcWeb)
    }
}

/// `servers[].tls.mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    Passthrough,
    Simple,
    Mutual,
    AutoPassthrough,
    IstioMutual,
    OptionalMutual,
}

/// `minProtocolVersion` / `maxProtocolVersion`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    Auto,
    V1_0,
    V1_1,
    V1_2,
    V1_3,
}

impl TlsVersion {
    fn parse(s: &str) -> Option<TlsVersion> {
        Some(match s {
            "TLS_AUTO" => TlsVersion::Auto,
            "TLSV1_0" => TlsVersion::V1_0,
            "TLSV1_1" => TlsVersion::V1_1,
            "TLSV1_2" => TlsVersion::V1_2,
            "TLSV1_3" => TlsVersion::V1_3,
            _ => return None,
        })
    }
}

/// A server's TLS settings.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerTls {
    pub mode: TlsMode,
    /// The Secret (in the gateway pod's namespace) holding the key and
    /// certificate (and, for MUTUAL, the client CA).
    pub credential_name: Option<String>,
    pub subject_alt_names: Vec<String>,
    pub min_version: TlsVersion,
    pub max_version: TlsVersion,
}

/// `hosts[]`: a host pattern and the namespaces whose VirtualServices may
/// bind it (`ns/host`; `*/host` any; `./host` the Gateway's; a bare host
/// is `*/host`).
#[derive(Clone, Debug, PartialEq)]
pub struct HostSel {
    /// None: any namespace.
    pub namespace: Option<String>,
    /// Lower-case: `*`, `*.suffix` or a name.
    pub host: String,
}

/// One server of a Gateway.
#[derive(Clone, Debug, PartialEq)]
pub struct Server {
    /// Its position in `spec.servers`, for messages.
    pub index: usize,
    /// `port.number`: the gateway's Service port (see [`listen_port`]).
    pub number: u16,
    pub port_name: String,
    pub protocol: Protocol,
    pub hosts: Vec<HostSel>,
    /// `tls.httpsRedirect` on a plaintext server: every request gets a 301
    /// to `https://`.
    pub https_redirect: bool,
    pub tls: Option<ServerTls>,
    pub name: Option<String>,
    /// Why this server is not opened (a protocol or TLS mode Skiff does not
    /// serve yet): the Gateway is taken, this server is reported and left
    /// closed, never opened as something else.
    pub not_served: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Gateway {
    pub namespace: String,
    pub name: String,
    /// Labels of the gateway pods that open its servers (all gateway pods
    /// when empty).
    pub selector: BTreeMap<String, String>,
    pub servers: Vec<Server>,
    /// `metadata.creationTimestamp`: of two Gateways claiming one port and
    /// host, the older wins.
    pub created: Option<String>,
}

impl Gateway {
    /// Where a VirtualService's `gateways` names this Gateway.
    pub fn bind(&self) -> Bind {
        Bind::Gateway { namespace: self.namespace.clone(), name: self.name.clone() }
    }

    /// Whether it selects a gateway pod with these labels (Istio: Gateways
    /// in every namespace select gateway pods in every namespace).
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') && !s.starts_with('-') && !s.ends_with('-')
}

/// A host pattern as Istio validates a Gateway's (`*`, `*.suffix`, or a
/// DNS name of labels), lower-cased.
fn host_pattern(h: &str) -> Option<String> {
    let h = h.to_ascii_lowercase();
    if h == "*" {
        return Some(h);
    }
    let rest = h.strip_prefix("*.").unwrap_or(&h);
    (rest.len() <= 253 && rest.split('.').all(is_dns_label)).then_some(h)
}

/// Validates and converts a Gateway; the error names the field (Istio's
/// validation where Istio refuses, Skiff's where it cannot serve a field
/// at all). Servers Skiff does not open yet are kept with `not_served`.
/// The second value: what Istio takes with a warning (a setting that has
/// no effect), each naming its field.
pub fn gateway_from(gw: &k8s::Gateway) -> Result<(Gateway, Vec<FieldError>), FieldError> {
    let namespace = gw.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = gw.metadata.name.clone().unwrap_or_default();
    let mut warnings = Vec::new();
    if gw.spec.servers.is_empty() {
        return Err(("spec.servers".into(), "a Gateway needs at least one server".into()));
    }
    let mut servers = Vec::new();
    let mut port_names: BTreeMap<String, usize> = BTreeMap::new();
    for (i, s) in gw.spec.servers.iter().enumerate() {
        let f = |x: &str| format!("spec.servers[{i}].{x}");
        let Some(port) = &s.port else { return Err((f("port"), "required".into())) };
        let number = u16::try_from(port.number).ok().filter(|n| *n > 0).ok_or_else(|| (f("port.number"), format!("{} is not a port (1-65535)", port.number)))?;
        let protocol = Protocol::parse(&port.protocol)
            .ok_or_else(|| (f("port.protocol"), format!("{:?} is not one of HTTP, HTTPS, GRPC, GRPC-WEB, HTTP2, MONGO, TCP, TLS", port.protocol)))?;
        if port.name.is_empty() {
            return Err((f("port.name"), "required".into()));
        }
        if let Some(j) = port_names.insert(port.name.clone(), i) {
            return Err((f("port.name"), format!("{:?} is also the port name of spec.servers[{j}]: port names must be unique", port.name)));
        }
        if port.target_port.is_some() {
            return Err((f("port.targetPort"), "has no effect on Gateways (Istio's validation): the listening port is the targetPort of the gateway Service's port numbered like the server".into()));
        }
        if s.bind.as_deref().is_some_and(|b| !b.is_empty()) {
            return Err((f("bind"), "refused: not implemented (the gateway listens on all its addresses)".into()));
        }
        if s.default_endpoint.as_deref().is_some_and(|d| !d.is_empty()) {
            return Err((f("defaultEndpoint"), "refused: not implemented in Istio either".into()));
        }
        if s.hosts.is_empty() {
            return Err((f("hosts"), "a server needs at least one host".into()));
        }
        let mut hosts = Vec::new();
        for (j, h) in s.hosts.iter().enumerate() {
            let field = f(&format!("hosts[{j}]"));
            let (ns, host) = match h.split_once('/') {
                Some((ns, host)) => (Some(ns), host),
                None => (None, h.as_str()),
            };
            let namespace = match ns {
                None | Some("*") => None,
                Some(".") => Some(namespace.clone()),
                Some(n) if is_dns_label(n) => Some(n.to_owned()),
                Some(n) => return Err((field, format!("{n:?} is not `*`, `.` or a namespace name"))),
            };
            if host != "*" && !host.contains('.') {
                return Err((field, format!("{host:?}: short names (not fully qualified) are not allowed")));
            }
            let host = host_pattern(host).ok_or_else(|| (field.clone(), format!("{host:?} is not a host name, `*` or `*.suffix`")))?;
            hosts.push(HostSel { namespace, host });
        }
        let tls_protocol = matches!(protocol, Protocol::Https | Protocol::Tls);
        let https_redirect = s.tls.as_ref().is_some_and(|t| t.https_redirect);
        let tls = match &s.tls {
            None if tls_protocol => return Err((f("tls"), "required: HTTPS and TLS servers need TLS settings".into())),
            None => None,
            Some(t) if tls_protocol => Some(server_tls(&f("tls"), t, &mut warnings)?),
            Some(t) => {
                // A plaintext server: only httpsRedirect (with the default
                // mode, PASSTHROUGH, and no certificate) is a setting there.
                let plain = k8s::ServerTls { https_redirect: t.https_redirect, mode: t.mode.clone().filter(|m| m == "PASSTHROUGH"), ..Default::default() };
                if *t != plain {
                    return Err((f("tls"), "a plaintext server cannot have TLS settings other than httpsRedirect".into()));
                }
                if https_redirect && !protocol.is_plain_http() {
                    warnings.push((f("tls.httpsRedirect"), "no effect: only HTTP servers redirect to HTTPS".into()));
                }
                None
            }
        };
        let not_served = match (protocol, &tls) {
            (p, _) if p.is_plain_http() => None,
            (Protocol::Https | Protocol::Tls | Protocol::Tcp, _) => None,
            _ => Some("MONGO servers are not served: this server stays closed".to_owned()),
        };
        if let Some(why) = &not_served {
            warnings.push((format!("spec.servers[{i}]"), why.clone()));
        }
        let https_redirect = https_redirect && protocol.is_plain_http();
        servers.push(Server { index: i, number, port_name: port.name.clone(), protocol, hosts, https_redirect, tls, name: s.name.clone(), not_served });
    }
    let g = Gateway { namespace, name, selector: gw.spec.selector.clone(), servers, created: gw.metadata.creation_timestamp.clone() };
    Ok((g, warnings))
}

/// `servers[].tls` of an HTTPS or TLS server. The mode is PASSTHROUGH
/// when not set (Istio's default).
fn server_tls(field: &str, t: &k8s::ServerTls, warnings: &mut Vec<FieldError>) -> Result<ServerTls, FieldError> {
    let f = |x: &str| format!("{field}.{x}");
    for (set, name, why) in [
        (t.server_certificate.is_some(), "serverCertificate", "certificates come from a Secret (credentialName), not from files in the gateway pod"),
        (t.private_key.is_some(), "privateKey", "certificates come from a Secret (credentialName), not from files in the gateway pod"),
        (t.ca_certificates.is_some(), "caCertificates", "client CAs come from a Secret (credentialName), not from files in the gateway pod"),
        (t.ca_crl.is_some(), "caCrl", "certificate revocation lists are not implemented"),
        (!t.credential_names.is_empty(), "credentialNames", "several certificates for one server are not implemented (use credentialName)"),
        (!t.tls_certificates.is_empty(), "tlsCertificates", "certificates come from a Secret (credentialName)"),
        (t.ca_cert_credential_name.is_some(), "caCertCredentialName", "a client CA from its own Secret is not implemented (the `<credentialName>-cacert` Secret or the CA keys of credentialName's)"),
        (t.insecure_skip_verify.is_some(), "insecureSkipVerify", "not implemented"),
        (!t.verify_certificate_spki.is_empty(), "verifyCertificateSpki", "pinning client certificates is not implemented"),
        (!t.verify_certificate_hash.is_empty(), "verifyCertificateHash", "pinning client certificates is not implemented"),
        (!t.cipher_suites.is_empty(), "cipherSuites", "choosing cipher suites is not implemented (rustls's defaults apply)"),
    ] {
        if set {
            return Err((f(name), format!("refused: {why}")));
        }
    }
    let version = |name: &str, v: &Option<String>| -> Result<TlsVersion, FieldError> {
        match v.as_deref() {
            None => Ok(TlsVersion::Auto),
            Some(s) => TlsVersion::parse(s).ok_or_else(|| (f(name), format!("{s:?} is not one of TLS_AUTO, TLSV1_0, TLSV1_1, TLSV1_2, TLSV1_3"))),
        }
    };
    let min_version = version("minProtocolVersion", &t.min_protocol_version)?;
    let max_version = version("maxProtocolVersion", &t.max_protocol_version)?;
    if min_version != TlsVersion::Auto && max_version != TlsVersion::Auto && min_version > max_version {
        return Err((f("minProtocolVersion"), "is above maxProtocolVersion: no version would be left".into()));
    }
    let mode = match t.mode.as_deref().unwrap_or("PASSTHROUGH") {
        "PASSTHROUGH" => TlsMode::Passthrough,
        "SIMPLE" => TlsMode::Simple,
        "MUTUAL" => TlsMode::Mutual,
        "AUTO_PASSTHROUGH" => return Err((f("mode"), "refused: AUTO_PASSTHROUGH is for east-west gateways (SNI-routed mesh traffic), not implemented".into())),
        "ISTIO_MUTUAL" => return Err((f("mode"), "refused: ISTIO_MUTUAL at a gateway (mesh certificates towards clients) is not implemented".into())),
        "OPTIONAL_MUTUAL" => return Err((f("mode"), "refused: OPTIONAL_MUTUAL is not implemented".into())),
        other => return Err((f("mode"), format!("{other:?} is not one of PASSTHROUGH, SIMPLE, MUTUAL, AUTO_PASSTHROUGH, ISTIO_MUTUAL, OPTIONAL_MUTUAL"))),
    };
    let terminating = matches!(mode, TlsMode::Simple | TlsMode::Mutual);
    if terminating && t.credential_name.as_deref().is_none_or(str::is_empty) {
        return Err((f("credentialName"), "required: SIMPLE and MUTUAL take their certificate from a Secret".into()));
    }
    if !terminating && t.credential_name.is_some() {
        warnings.push((f("credentialName"), "no effect: PASSTHROUGH does not use certificates".into()));
    }
    if t.https_redirect {
        warnings.push((f("httpsRedirect"), "no effect: only HTTP servers redirect to HTTPS".into()));
    }
    if mode != TlsMode::Mutual && !t.subject_alt_names.is_empty() {
        return Err((f("subjectAltNames"), "only checked on client certificates, i.e. with mode MUTUAL".into()));
    }
    Ok(ServerTls { mode, credential_name: t.credential_name.clone(), subject_alt_names: t.subject_alt_names.clone(), min_version, max_version })
}

/// Whether a request's host (lower-case, without port) matches a host
/// pattern as Envoy matches a virtual host's domains: `*` any, `*.suffix`
/// a non-empty name ending in `.suffix`, otherwise equal.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    crate::routing::wildcard_matches(pattern, host)
}

/// The request's host: the (canonical) authority without its port,
/// lower-case, no trailing dot.
pub fn request_host(authority: &str) -> String {
    let host = crate::routing::host_of(authority);
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}

/// A VirtualService host at a gateway: short names (no dot) are the
/// VirtualService namespace's Services, as Istio resolves them.
fn vs_host(h: &str, vs_namespace: &str) -> String {
    if h != "*" && !h.contains('.') {
        format!("{h}.{vs_namespace}.svc.cluster.local")
    } else {
        h.to_owned()
    }
}

/// A server as one gateway pod opens it (see `Snapshot::gateway_servers`).
#[derive(Clone, Debug, PartialEq)]
pub struct Opened<'s> {
    pub gateway: &'s Gateway,
    pub server: &'s Server,
    /// The port it listens on.
    pub port: u16,
}

/// What the gateway does with a request arriving on one listening port.
#[derive(Debug, PartialEq)]
pub enum Decision<'s> {
    /// No server on this port takes the host: 404.
    NoServer,
    /// The server redirects plaintext to HTTPS: 301.
    HttpsRedirect,
    /// Routed by these VirtualServices' routes, in order (several
    /// VirtualServices for one host at a gateway merge, oldest first), at
    /// this Gateway; empty: none is bound for the host (404).
    Route { at: Bind, server: &'s Server, virtual_services: Vec<&'s VirtualService> },
}

/// The server (of those open on one port) that takes a request for
/// `host`, then the VirtualServices that route it: bound to that server's
/// Gateway (`gateways`, or a match's), exported to the gateway's
/// namespace, with a host the server admits (its namespace filter and
/// host pattern) matching the request's, the most specific host first.
pub fn decide<'s>(virtual_services: &'s [VirtualService], open: &[Opened<'s>], port: u16, host: &str, gateway_ns: &str) -> Decision<'s> {
    let Some(o) = server_for_host(open, port, host) else { return Decision::NoServer };
    if o.server.https_redirect {
        return Decision::HttpsRedirect;
    }
    let at = o.gateway.bind();
    // Each bound VirtualService's best host for the request: as Istio, the
    // intersection of one of its hosts with a server host that admits its
    // namespace, both matching the request's host; the more specific of the
    // two is that virtual host's name.
    let mut candidates: Vec<((u8, usize), String, &VirtualService)> = virtual_services
        .iter()
        .filter(|v| !v.http.is_empty() && v.binds(&at) && v.export_to.visible_to(gateway_ns))
        .filter_map(|v| {
            let admitted = o.server.hosts.iter().filter(|sel| sel.namespace.as_ref().is_none_or(|n| *n == v.namespace) && host_matches(&sel.host, host));
            admitted
                .flat_map(|sel| {
                    v.hosts.iter().map(|h| vs_host(h, &v.namespace)).filter(|h| host_matches(h, host)).map(move |h| {
                        let (a, b) = ((specificity(&h), h), (specificity(&sel.host), sel.host.clone()));
                        if a.0 <= b.0 { a } else { b }
                    })
                })
                .min()
                .map(|(sp, h)| (sp, h, v))
        })
        .collect();
    let Some(top) = candidates.iter().map(|(s, h, _)| (*s, h.clone())).min() else {
        return Decision::Route { at, server: o.server, virtual_services: vec![] };
    };
    candidates.retain(|(s, h, _)| (*s, h) == (top.0, &top.1));
    candidates.sort_by_key(|(_, _, v)| gateway_order(v, gateway_ns));
    Decision::Route { at, server: o.server, virtual_services: candidates.into_iter().map(|(_, _, v)| v).collect() }
}

/// Istio's order for VirtualServices at a gateway: those exported to the
/// gateway's namespace alone, then to it by name, then to all; within
/// each, oldest first, then by name and namespace.
fn gateway_order(v: &VirtualService, gateway_ns: &str) -> (u8, bool, Option<String>, String, String) {
    let group = match &v.export_to {
        crate::routing::ExportTo::Namespaces(set) if set.len() == 1 && set.contains(gateway_ns) => 0,
        crate::routing::ExportTo::Namespaces(_) => 1,
        crate::routing::ExportTo::All => 2,
    };
    (group, v.created.is_none(), v.created.clone(), v.name.clone(), v.namespace.clone())
}

/// The route a connection takes at a TCP server, a TLS server that
/// terminates it (`tcp` routes), or a TLS server that passes it through
/// (`tls` routes by the ClientHello's `sni`): among the
/// VirtualServices bound to the server's Gateway and exported to the
/// gateway's namespace, with a host the server admits (its namespace
/// filter; for TLS, a host matching the SNI), in Istio's order for a
/// gateway, the first `tcp` (or `tls`) route whose match holds. `port` is
/// the server's number (what clients address), `local` the address the
/// client connected to.
pub fn route_l4<'s>(virtual_services: &'s [VirtualService], o: &Opened<'s>, sni: Option<&str>, local: std::net::IpAddr, gateway_ns: &str) -> Option<(&'s VirtualService, &'s L4Route)> {
    let at = o.gateway.bind();
    let sni = sni.map(|n| n.trim_end_matches('.').to_ascii_lowercase()).filter(|_| o.server.tls.as_ref().is_some_and(|t| t.mode == TlsMode::Passthrough));
    let admits = |v: &VirtualService| {
        o.server.hosts.iter().filter(|sel| sel.namespace.as_ref().is_none_or(|n| *n == v.namespace)).any(|sel| {
            v.hosts.iter().map(|h| vs_host(h, &v.namespace)).any(|h| match &sni {
                Some(name) => host_matches(&h, name) && host_matches(&sel.host, name),
                None => hosts_intersect(&h, &sel.host),
            })
        })
    };
    let mut bound: Vec<&VirtualService> = virtual_services.iter().filter(|v| v.binds(&at) && v.export_to.visible_to(gateway_ns) && admits(v)).collect();
    bound.sort_by_key(|v| gateway_order(v, gateway_ns));
    // A server that passes TLS through routes by `tls` routes (and needs
    // an SNI); a TCP server, or a TLS server that terminates, by `tcp`.
    let passthrough = o.server.tls.as_ref().is_some_and(|t| t.mode == TlsMode::Passthrough);
    match (passthrough, sni.as_deref()) {
        // By SNI: the most specific `sniHosts` across every bound
        // VirtualService (Envoy's filter-chain choice), the first in
        // order among equals.
        (true, Some(name)) => bound
            .into_iter()
            .flat_map(|v| v.tls.iter().map(move |r| (v, r)))
            .filter_map(|(v, r)| r.sni_rank(&at, &v.gateways, o.server.number, local, name).map(|rank| (rank, v, r)))
            .enumerate()
            .min_by_key(|(i, (rank, _, _))| (*rank, *i))
            .map(|(_, (_, v, r))| (v, r)),
        (true, None) => None,
        (false, _) => bound.into_iter().find_map(|v| v.l4_route(&at, o.server.number, local, false, None).map(|r| (v, r))),
    }
}

/// The route a request takes among the VirtualServices merged for its
/// host at a gateway (see [`decide`]): their routes in order, except that
/// catch-all routes (no condition but a `/` prefix or an all-matching
/// regex) go after all others, as Istio merges a gateway's virtual hosts;
/// a VirtualService's routes after its own first catch-all are dropped.
pub fn route<'s>(vss: &[&'s VirtualService], r: &RequestInfo<'_>, at: &Bind) -> Option<(&'s VirtualService, &'s HttpRoute)> {
    // Within one VirtualService, routes after its first catch-all are never
    // reached; across them, catch-alls go last (Istio's merge).
    let mut first = Vec::new();
    let mut last = Vec::new();
    for v in vss {
        for h in v.http.iter().filter(|h| applies_at(h, at, &v.gateways)) {
            if catch_all(h, at, &v.gateways) {
                last.push((*v, h));
                break;
            }
            first.push((*v, h));
        }
    }
    first.into_iter().chain(last).find(|(v, h)| h.matches_at(r, at, &v.gateways))
}

/// Whether a route can take requests arriving at `at` at all.
fn applies_at(h: &HttpRoute, at: &Bind, top: &[Bind]) -> bool {
    if h.matches.is_empty() {
        top.contains(at)
    } else {
        h.matches.iter().any(|m| m.gateways.as_deref().unwrap_or(top).contains(at))
    }
}

/// A route that takes every request where it applies.
fn catch_all(h: &HttpRoute, at: &Bind, top: &[Bind]) -> bool {
    let all = |m: &HttpMatch| {
        let uri_all = match &m.uri {
            None => true,
            Some(StrMatch::Prefix(p)) => p == "/",
            Some(StrMatch::Regex(re)) => re.0.as_str() == "^(?:.*)$",
            Some(_) => false,
        };
        uri_all
            && m.scheme.is_none()
            && m.authority.is_none()
            && m.method.is_none()
            && m.headers.is_empty()
            && m.query_params.is_empty()
            && m.without_headers.is_empty()
            && m.port.is_none()
    };
    h.matches.is_empty() || h.matches.iter().any(|m| m.gateways.as_deref().unwrap_or(top).contains(at) && all(m))
}

/// Which server (of the TLS servers open on one port) a TLS connection is
/// for, by the SNI of its ClientHello: the server with the most specific
/// host matching it (exact, then the longest `*.` suffix, then `*`);
/// without SNI, a server whose hosts include `*` (as Envoy's filter chain
/// without server names). None: the handshake is refused.
pub fn pick_by_sni<'a, K>(servers: &'a [(K, &Server)], sni: Option<&str>) -> Option<&'a K> {
    match sni.map(|s| s.trim_end_matches('.').to_ascii_lowercase()) {
        Some(name) => servers
            .iter()
            .filter_map(|(k, s)| s.hosts.iter().filter(|h| host_matches(&h.host, &name)).map(|h| specificity(&h.host)).min().map(|sp| (sp, k)))
            .min_by_key(|(sp, _)| *sp)
            .map(|(_, k)| k),
        None => servers.iter().find(|(_, s)| s.hosts.iter().any(|h| h.host == "*")).map(|(k, _)| k),
    }
}

/// A server's certificate, key and (for MUTUAL) client CA, as PEM, read
/// from its `credentialName` Secret the ways Istio reads one.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub cert_chain: Vec<u8>,
    pub key: Vec<u8>,
    pub client_ca: Option<Vec<u8>>,
}

/// The credential of `name` in the gateway's namespace (`secret` looks a
/// Secret's data up by name), in the layouts Istio accepts: `cert` and
/// `key` (generic), else `tls.crt` and `tls.key` (`kubernetes.io/tls`);
/// with `client_ca`, the CA from the Secret `<name>-cacert` (`cacert`,
/// else `ca.crt`), else from the same Secret (`cacert`, else `ca.crt`).
/// The error says what is wrong, naming Secret and keys.
pub fn credential<'a>(
    secret: impl Fn(&str) -> Option<&'a BTreeMap<String, Vec<u8>>>,
    namespace: &str,
    name: &str,
    client_ca: bool,
) -> Result<Credential, String> {
    let data = secret(name).ok_or_else(|| format!("Secret {namespace}/{name} does not exist (or is not readable by the gateway)"))?;
    let pair = |c: &str, k: &str| match (data.get(c), data.get(k)) {
        (Some(cv), Some(kv)) if !cv.is_empty() && !kv.is_empty() => Some(Ok((cv.clone(), kv.clone()))),
        (Some(_), Some(_)) => Some(Err(format!("Secret {namespace}/{name}: keys {c:?} and {k:?} are there but empty"))),
        _ => None,
    };
    let (cert_chain, key) = match pair("cert", "key").or_else(|| pair("tls.crt", "tls.key")) {
        Some(r) => r?,
        None => {
            return Err(format!(
                "Secret {namespace}/{name} has neither `cert` and `key` nor `tls.crt` and `tls.key`; it has {:?}",
                data.keys().collect::<Vec<_>>()
            ))
        }
    };
    let client_ca = if client_ca {
        let found = credential_ca(&secret, namespace, name, data)?;
        Some(found.map(|(ca, _)| ca).ok_or_else(|| format!("MUTUAL needs a client CA: neither Secret {namespace}/{name}-cacert nor `cacert`/`ca.crt` in {namespace}/{name}"))?)
    } else {
        None
    };
    Ok(Credential { cert_chain, key, client_ca })
}

/// The CA (PEM) of credential `name`, as Istio reads one: from the Secret
/// `<name>-cacert` when it exists (`cacert`, else `ca.crt`; it must have
/// one), else from `data`, the credential's own Secret; with the name of
/// the Secret it came from. None: neither has one.
pub fn credential_ca<'a>(
    secret: impl Fn(&str) -> Option<&'a BTreeMap<String, Vec<u8>>>,
    namespace: &str,
    name: &str,
    data: &BTreeMap<String, Vec<u8>>,
) -> Result<Option<(Vec<u8>, String)>, String> {
    let ca_of = |d: &BTreeMap<String, Vec<u8>>| d.get("cacert").or_else(|| d.get("ca.crt")).filter(|v| !v.is_empty()).cloned();
    let separate = format!("{name}-cacert");
    Ok(match secret(&separate) {
        Some(d) => Some((ca_of(d).ok_or_else(|| format!("Secret {namespace}/{separate} has no `cacert` (or `ca.crt`)"))?, separate)),
        None => ca_of(data).map(|ca| (ca, name.to_owned())),
    })
}

/// The server (of those open on `port`) whose hosts take `host` most
/// specifically: exact, then the longest `*.` suffix, then `*`.
pub fn server_for_host<'a, 's>(open: &'a [Opened<'s>], port: u16, host: &str) -> Option<&'a Opened<'s>> {
    open.iter()
        .filter(|o| o.port == port)
        .filter_map(|o| o.server.hosts.iter().filter(|h| host_matches(&h.host, host)).map(|h| specificity(&h.host)).min().map(|s| (s, o)))
        .min_by_key(|(s, _)| *s)
        .map(|(_, o)| o)
}

/// Whether two host patterns have a name in common.
pub fn hosts_intersect(a: &str, b: &str) -> bool {
    match (a.strip_prefix('*'), b.strip_prefix('*')) {
        (Some(""), _) | (_, Some("")) => true,
        (Some(x), Some(y)) => x.ends_with(y) || y.ends_with(x),
        (Some(_), None) => host_matches(a, b),
        (None, Some(_)) => host_matches(b, a),
        (None, None) => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw(spec: &str) -> Result<Gateway, FieldError> {
        let text = format!("apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: edge, namespace: istio-system}}\nspec:\n{spec}");
        match k8s::parse_documents(&text).unwrap().remove(0) {
            k8s::Object::Gateway(g) => gateway_from(&g).map(|(g, _)| g),
            k8s::Object::Invalid(o) => Err((o.field, o.message)),
            other => panic!("{other:?}"),
        }
    }

    /// Istio's Gateway validation (pilot/pkg/config/validation:
    /// validateServer, validateServerPort, validateTLSOptions) and Skiff's
    /// refusals, each naming the field.
    #[test]
    fn validation_table() {
        #[rustfmt::skip]
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("a plain HTTP server", "  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [\"*\"]}]\n", None),
            ("protocol is case-insensitive", "  servers: [{port: {number: 80, name: http, protocol: http}, hosts: [\"*\"]}]\n", None),
            ("no servers", "  selector: {istio: ingressgateway}\n", Some("spec.servers")),
            ("no hosts", "  servers: [{port: {number: 80, name: http, protocol: HTTP}}]\n", Some("spec.servers[0].hosts")),
            ("no port", "  servers: [{hosts: [a.com]}]\n", Some("spec.servers[0].port")),
            ("port 0", "  servers: [{port: {number: 0, name: http, protocol: HTTP}, hosts: [a.com]}]\n", Some("spec.servers[0].port.number")),
            ("port too big", "  servers: [{port: {number: 70000, name: http, protocol: HTTP}, hosts: [a.com]}]\n", Some("spec.servers[0].port.number")),
            ("bad protocol", "  servers: [{port: {number: 80, name: http, protocol: HTTP3}, hosts: [a.com]}]\n", Some("spec.servers[0].port.protocol")),
            ("no port name", "  servers: [{port: {number: 80, protocol: HTTP}, hosts: [a.com]}]\n", Some("spec.servers[0].port.name")),
            ("duplicate port names", "  servers:\n  - {port: {number: 80, name: p, protocol: HTTP}, hosts: [a.com]}\n  - {port: {number: 81, name: p, protocol: HTTP}, hosts: [a.com]}\n", Some("spec.servers[1].port.name")),
            ("bad host", "  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [\"a.*.com\"]}]\n", Some("spec.servers[0].hosts[0]")),
            ("bad host namespace", "  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [\"Bad_NS/a.com\"]}]\n", Some("spec.servers[0].hosts[0]")),
            ("ns/host forms", "  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [\"./a.com\", \"*/b.com\", \"shop/*.c.com\", \"*\"]}]\n", None),
            ("HTTPS without tls", "  servers: [{port: {number: 443, name: https, protocol: HTTPS}, hosts: [a.com]}]\n", Some("spec.servers[0].tls")),
            ("HTTP with tls mode", "  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [a.com], tls: {mode: SIMPLE, credentialName: c}}]\n", Some("spec.servers[0].tls")),
            ("HTTP, httpsRedirect, PASSTHROUGH", "  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [a.com], tls: {httpsRedirect: true, mode: PASSTHROUGH}}]\n", None),
            ("short host", "  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [reviews]}]\n", Some("spec.servers[0].hosts[0]")),
            ("HTTPS without mode is PASSTHROUGH", "  servers: [{port: {number: 443, name: https, protocol: HTTPS}, hosts: [a.com], tls: {credentialName: c}}]\n", None),
            ("httpsRedirect on HTTP", "  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [a.com], tls: {httpsRedirect: true}}]\n", None),
            ("SIMPLE without credentialName", "  servers: [{port: {number: 443, name: https, protocol: HTTPS}, hosts: [a.com], tls: {mode: SIMPLE}}]\n", Some("spec.servers[0].tls.credentialName")),
            ("SIMPLE with a file", "  servers: [{port: {number: 443, name: https, protocol: HTTPS}, hosts: [a.com], tls: {mode: SIMPLE, serverCertificate: /etc/c.pem, privateKey: /etc/k.pem}}]\n", Some("spec.servers[0].tls.serverCertificate")),
            ("min above max", "  servers: [{port: {number: 443, name: https, protocol: HTTPS}, hosts: [a.com], tls: {mode: SIMPLE, credentialName: c, minProtocolVersion: TLSV1_3, maxProtocolVersion: TLSV1_2}}]\n", Some("spec.servers[0].tls.minProtocolVersion")),
            ("bad version", "  servers: [{port: {number: 443, name: https, protocol: HTTPS}, hosts: [a.com], tls: {mode: SIMPLE, credentialName: c, minProtocolVersion: TLS1_2}}]\n", Some("spec.servers[0].tls.minProtocolVersion")),
            ("SANs without MUTUAL", "  servers: [{port: {number: 443, name: https, protocol: HTTPS}, hosts: [a.com], tls: {mode: SIMPLE, credentialName: c, subjectAltNames: [x]}}]\n", Some("spec.servers[0].tls.subjectAltNames")),
            ("ISTIO_MUTUAL", "  servers: [{port: {number: 443, name: https, protocol: HTTPS}, hosts: [a.com], tls: {mode: ISTIO_MUTUAL}}]\n", Some("spec.servers[0].tls.mode")),
            ("bind", "  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [a.com], bind: 10.0.0.1}]\n", Some("spec.servers[0].bind")),
            ("unknown field", "  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [a.com], hostz: [b]}]\n", Some("spec.servers[0].hostz")),
        ];
        for (what, spec, want) in cases {
            match (gw(spec), want) {
                (Ok(_), None) => {}
                (Err((field, _)), Some(w)) => assert_eq!(&field, w, "{what}"),
                (Ok(g), Some(w)) => panic!("{what}: taken ({g:?}), want refused at {w}"),
                (Err(e), None) => panic!("{what}: refused: {e:?}"),
            }
        }
        // Namespace forms resolve: `.` is the Gateway's, `*` and bare any.
        let g = gw("  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [\"./a.com\", \"*/B.com\", \"shop/*.c.com\", \"d.com\"]}]\n").unwrap();
        let hosts: Vec<(Option<&str>, &str)> = g.servers[0].hosts.iter().map(|h| (h.namespace.as_deref(), h.host.as_str())).collect();
        assert_eq!(hosts, [(Some("istio-system"), "a.com"), (None, "b.com"), (Some("shop"), "*.c.com"), (None, "d.com")]);
        // A server Skiff does not open is kept and marked, not refused.
        let g = gw("  servers:\n  - {port: {number: 80, name: http, protocol: HTTP}, hosts: [a.com]}\n  - {port: {number: 443, name: https, protocol: HTTPS}, hosts: [a.com], tls: {mode: SIMPLE, credentialName: c}}\n  - {port: {number: 9443, name: tls, protocol: TLS}, hosts: [a.com], tls: {mode: PASSTHROUGH}}\n  - {port: {number: 27017, name: mongo, protocol: MONGO}, hosts: [a.com]}\n").unwrap();
        assert!(g.servers[..3].iter().all(|s| s.not_served.is_none()) && g.servers[3].not_served.is_some());
    }

    /// Envoy's virtual-host domain matching, which Istio's gateway routes
    /// use: exact, then the longest `*.` suffix, then `*`.
    #[test]
    fn host_matching_and_intersection() {
        for (p, h, want) in [
            ("*", "a.com", true),
            ("*.a.com", "b.a.com", true),
            ("*.a.com", "c.b.a.com", true),
            ("*.a.com", "a.com", false),
            ("a.com", "a.com", true),
            ("a.com", "b.com", false),
        ] {
            assert_eq!(host_matches(p, h), want, "{p} {h}");
        }
        for (a, b, want) in [("*", "x.com", true), ("*.com", "*.x.com", true), ("*.x.com", "y.x.com", true), ("*.x.com", "x.com", false), ("a.com", "b.com", false)] {
            assert_eq!(hosts_intersect(a, b), want, "{a} {b}");
            assert_eq!(hosts_intersect(b, a), want, "{b} {a}");
        }
        for (a, want) in [("Example.COM:8443", "example.com"), ("example.com.", "example.com"), ("example.com", "example.com"), ("[::1]:80", "[::1]"), ("[::1]", "[::1]")] {
            assert_eq!(request_host(a), want, "{a}");
        }
    }

    /// Istio's credential Secret layouts (secure ingress task, "Key
    /// formats"; pilot's kube secret reader): `cert`/`key` before
    /// `tls.crt`/`tls.key`; the client CA from `<name>-cacert` before the
    /// Secret's own `cacert`/`ca.crt`.
    #[test]
    fn credentials_from_secrets_in_both_layouts() {
        let secrets: BTreeMap<String, BTreeMap<String, Vec<u8>>> = [
            ("generic", vec![("cert", "C1"), ("key", "K1"), ("cacert", "CA1")]),
            ("tls", vec![("tls.crt", "C2"), ("tls.key", "K2"), ("ca.crt", "CA2")]),
            ("both", vec![("cert", "C3"), ("key", "K3"), ("tls.crt", "C4"), ("tls.key", "K4")]),
            ("split", vec![("cert", "C5"), ("key", "K5")]),
            ("split-cacert", vec![("cacert", "CA5")]),
            ("empty", vec![("tls.crt", ""), ("tls.key", "K")]),
            ("wrong", vec![("certificate", "C"), ("private", "K")]),
            ("nocacert", vec![("cert", "C"), ("key", "K")]),
            ("badsplit", vec![("cert", "C"), ("key", "K")]),
            ("badsplit-cacert", vec![("ca", "X")]),
        ]
        .into_iter()
        .map(|(n, kv)| (n.to_owned(), kv.into_iter().map(|(k, v)| (k.to_owned(), v.as_bytes().to_vec())).collect()))
        .collect();
        let get = |n: &str| secrets.get(n);
        let ok = |name: &str, ca: bool| {
            let c = credential(get, "istio-system", name, ca).unwrap_or_else(|e| panic!("{name}: {e}"));
            let s = |v: &[u8]| String::from_utf8(v.to_vec()).unwrap();
            (s(&c.cert_chain), s(&c.key), c.client_ca.as_deref().map(s))
        };
        assert_eq!(ok("generic", false), ("C1".into(), "K1".into(), None));
        assert_eq!(ok("generic", true), ("C1".into(), "K1".into(), Some("CA1".into())));
        assert_eq!(ok("tls", true), ("C2".into(), "K2".into(), Some("CA2".into())));
        assert_eq!(ok("both", false), ("C3".into(), "K3".into(), None), "cert/key first");
        assert_eq!(ok("split", true), ("C5".into(), "K5".into(), Some("CA5".into())), "<name>-cacert");
        for (name, ca, want) in [
            ("missing", false, "does not exist"),
            ("empty", false, "empty"),
            ("wrong", false, "neither `cert` and `key` nor `tls.crt` and `tls.key`"),
            ("nocacert", true, "MUTUAL needs a client CA"),
            ("badsplit", true, "badsplit-cacert has no `cacert`"),
        ] {
            let e = credential(get, "istio-system", name, ca).err().unwrap_or_else(|| panic!("{name}: taken"));
            assert!(e.contains(want) && e.contains("istio-system/"), "{name}: {e}");
        }
    }

    /// Envoy's filter-chain match on SNI as Istio builds it from server
    /// hosts; no SNI only reaches a server for `*`.
    #[test]
    fn tls_servers_by_sni() {
        let g = gw("  servers:\n  - {port: {number: 443, name: a, protocol: HTTPS}, hosts: [a.example.com], tls: {mode: SIMPLE, credentialName: a}}\n  - {port: {number: 443, name: w, protocol: HTTPS}, hosts: [\"*.example.com\"], tls: {mode: SIMPLE, credentialName: w}}\n  - {port: {number: 443, name: any, protocol: HTTPS}, hosts: [\"*\"], tls: {mode: SIMPLE, credentialName: any}}\n").unwrap();
        let servers: Vec<(&str, &Server)> = g.servers.iter().map(|s| (s.port_name.as_str(), s)).collect();
        for (sni, want) in [(Some("a.example.com"), Some("a")), (Some("A.Example.com."), Some("a")), (Some("b.example.com"), Some("w")), (Some("x.org"), Some("any")), (None, Some("any"))] {
            assert_eq!(pick_by_sni(&servers, sni).copied(), want, "{sni:?}");
        }
        assert_eq!(pick_by_sni(&servers[..2], None), None, "no SNI and no `*` server");
        assert_eq!(pick_by_sni(&servers[..1], Some("b.example.com")), None);
    }

    #[test]
    fn gateway_refs_resolve_like_istio() {
        for (entry, want) in [
            ("mesh", Ok(Bind::Mesh)),
            ("edge", Ok(Bind::Gateway { namespace: "shop".into(), name: "edge".into() })),
            ("istio-system/edge", Ok(Bind::Gateway { namespace: "istio-system".into(), name: "edge".into() })),
            ("edge.istio-system.svc.cluster.local", Ok(Bind::Gateway { namespace: "istio-system".into(), name: "edge".into() })),
        ] {
            assert_eq!(Bind::parse(entry, "shop"), want, "{entry}");
        }
        for bad in ["./edge", "*/edge", "Bad/edge", "ns/"] {
            assert!(Bind::parse(bad, "shop").is_err(), "{bad}");
        }
    }
}
