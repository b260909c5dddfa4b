//! `skiff explain`: every decision the mesh takes for one connection or
//! request, in order, with the object and rule that made it.
//!
//! Each step calls the function the data path calls for that decision —
//! enrollment (`enroll::decide`), ztunnel's outbound decision
//! (`outbound::decide`), PeerAuthentication (`policy::mtls_decision`),
//! ztunnel's and the waypoint's AuthorizationPolicy
//! (`policy::authorize_workload`, `l7::authz`), the waypoint's route
//! (`l7::route::select`, `tcp_route`, `resolve`) — on the same cluster
//! view, so what it prints is what the mesh does, not a second reading of
//! the config. Random choices (weights, fault percentages, round robin)
//! are shown as the shares they are.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddrV4, ToSocketAddrs as _},
};

use serde::Serialize;
use skiff_core::{
    egress::OutboundPolicy,
    enroll,
    model::{ServiceInfo, ServicePort, Snapshot, Workload},
    outbound::{self, Destination, Next},
    policy::{self, AuthzDecision, ConnInfo, MtlsMode},
    routing::{self, HttpRoute, RequestInfo, RouteDest, StrMatch},
};
use skiff_ebpf_common::MESH_PORTS;
use skiff_hbone::identity::Identity;
use skiff_l7::route;

/// Where the traffic starts.
#[derive(Clone, Debug, PartialEq)]
pub enum From {
    /// `namespace/pod`.
    Pod(String, String),
    /// `namespace/sa/SERVICE_ACCOUNT`: a pod of that namespace running as
    /// that service account.
    ServiceAccount(String, String),
    /// An address (a pod's, or outside the cluster).
    Ip(Ipv4Addr),
}

/// Where it goes.
#[derive(Clone, Debug, PartialEq)]
pub enum To {
    /// `name[.namespace[.svc[.cluster.local]]][:port]`, or a ServiceEntry
    /// host.
    Host(String, Option<u16>),
    /// `namespace/pod:port`.
    Pod(String, String, u16),
    /// `a.b.c.d:port`.
    Addr(SocketAddrV4),
}

/// What is asked: a connection, or an HTTP request on it.
#[derive(Clone, Debug)]
pub struct Ask {
    pub from: From,
    pub to: To,
    /// Path (and query) of the request; `/` when only a host was given.
    pub path: String,
    pub method: String,
    /// `name: value` as given with `-H`.
    pub headers: Vec<(String, String)>,
    pub trust_domain: String,
    pub root_namespace: String,
    /// The outbound traffic policy when the mesh config sets none.
    pub outbound_policy: OutboundPolicy,
    /// Where that comes from, for the step that uses it.
    pub outbound_policy_from: String,
}

/// Parses `--from`.
pub fn parse_from(s: &str) -> Result<From, String> {
    if let Ok(ip) = s.parse::<Ipv4Addr>() {
        return Ok(From::Ip(ip));
    }
    let parts: Vec<&str> = s.split('/').collect();
    match parts.as_slice() {
        [ns, "sa", sa] if !ns.is_empty() && !sa.is_empty() => Ok(From::ServiceAccount((*ns).into(), (*sa).into())),
        [ns, pod] if !ns.is_empty() && !pod.is_empty() => Ok(From::Pod((*ns).into(), (*pod).into())),
        _ => Err(format!("--from {s:?}: expected NAMESPACE/POD, NAMESPACE/sa/SERVICE_ACCOUNT or an IPv4 address")),
    }
}

/// Parses `--to`: returns the destination and the request path (from a
/// URL; `/` otherwise).
pub fn parse_to(s: &str) -> Result<(To, String), String> {
    let bad = |why: &str| format!("--to {s:?}: {why}; expected SERVICE[.NAMESPACE][:PORT], NAMESPACE/POD:PORT, A.B.C.D:PORT or http://HOST[:PORT]/PATH");
    let port_of = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| bad("the port is not 1-65535"));
    if let Some(rest) = s.strip_prefix("http://") {
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_owned()),
            None => (rest, "/".to_owned()),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h, port_of(p)?),
            None => (hostport, 80),
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let to = match host.parse::<Ipv4Addr>() {
            Ok(ip) => To::Addr(SocketAddrV4::new(ip, port)),
            Err(_) => To::Host(host.to_ascii_lowercase(), Some(port)),
        };
        return Ok((to, path));
    }
    if s.contains("://") {
        return Err(bad("only http:// URLs (HTTPS is opaque to the mesh: explain its host and port instead)"));
    }
    if let Ok(a) = s.parse::<SocketAddrV4>() {
        return Ok((To::Addr(a), "/".into()));
    }
    if s.parse::<Ipv4Addr>().is_ok() {
        return Err(bad("an address needs a port"));
    }
    if let Some((ns, rest)) = s.split_once('/') {
        let (pod, port) = rest.rsplit_once(':').ok_or_else(|| bad("a pod needs a port"))?;
        if ns.is_empty() || pod.is_empty() {
            return Err(bad("empty namespace or pod"));
        }
        return Ok((To::Pod(ns.into(), pod.into(), port_of(port)?), "/".into()));
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(port_of(p)?)),
        None => (s, None),
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok((To::Host(host.to_ascii_lowercase(), port), "/".into()))
}

/// The fields of one access-log line, text (`key=value`, values with
/// spaces quoted) or JSON (one object, fields by name).
fn log_fields(line: &str) -> HashMap<String, String> {
    let line = line.trim();
    if let Ok(serde_json::Value::Object(m)) = serde_json::from_str::<serde_json::Value>(line) {
        return m.into_iter().map(|(k, v)| (k, v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string()))).collect();
    }
    let mut out = HashMap::new();
    let mut rest = line;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].rsplit(' ').next().unwrap_or("").to_owned();
        let after = &rest[eq + 1..];
        let (value, next) = match after.strip_prefix('"') {
            Some(q) => {
                let mut end = q.len();
                let mut escaped = false;
                for (i, c) in q.char_indices() {
                    match c {
                        '\\' if !escaped => escaped = true,
                        '"' if !escaped => {
                            end = i;
                            break;
                        }
                        _ => escaped = false,
                    }
                }
                (q[..end].replace("\\\"", "\""), q.get(end + 1..).unwrap_or(""))
            }
            None => {
                let end = after.find(' ').unwrap_or(after.len());
                (after[..end].to_owned(), &after[end..])
            }
        };
        if !key.is_empty() {
            out.insert(key, value);
        }
        rest = next;
    }
    out
}

/// `--why-denied LINE`: the source and destination (and for a request,
/// its method and path) of the connection or request an access-log line
/// records, as `(from, to, path, method)`.
pub fn from_access_log(line: &str) -> Result<(From, To, String, Option<String>), String> {
    let f = log_fields(line);
    let get = |k: &str| f.get(k).map(String::as_str).filter(|v| !v.is_empty() && *v != "-");
    let src: SocketAddrV4 = get("src.addr")
        .and_then(|a| a.parse().ok())
        .ok_or("--why-denied: the line has no src.addr (paste one access-log line of ztunnel or a waypoint)")?;
    let from = From::Ip(*src.ip());
    if let (Some(method), Some(path)) = (get("method"), get("path")) {
        let host = get("dst.service").ok_or("--why-denied: the request line has no dst.service")?;
        return Ok((from, To::Host(host.to_owned(), None), path.to_owned(), Some(method.to_owned())));
    }
    let dst: SocketAddrV4 = get("dst.addr").and_then(|a| a.parse().ok()).ok_or("--why-denied: the line has no dst.addr")?;
    Ok((from, To::Addr(dst), "/".to_owned(), None))
}

/// One decision.
#[derive(Clone, Debug, Serialize)]
pub struct Step {
    /// What was decided: `source`, `destination`, `outbound`, `waypoint`,
    /// `policy`, `route`, …
    pub step: &'static str,
    /// Who decided: `ztunnel on NODE`, `waypoint NS/NAME`, `kube-proxy`.
    pub at: String,
    /// The decision, in one sentence.
    pub decision: String,
    /// The object and rule that made it (`Kind ns/name` and where in it),
    /// when one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// The outcome.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Delivered to the destination.
    Allowed,
    /// Refused by policy (AuthorizationPolicy, PeerAuthentication, the
    /// outbound traffic policy).
    Denied,
    /// Refused for lack of a route or endpoint, or answered by the mesh
    /// itself (fault abort, direct response, redirect).
    Refused,
    /// Some requests are delivered and some are not (a fault for a share,
    /// endpoints that differ).
    Partly,
}

#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    pub steps: Vec<Step>,
    pub outcome: Outcome,
    /// Why, in one sentence.
    pub verdict: String,
}

struct Out {
    steps: Vec<Step>,
}

impl Out {
    fn push(&mut self, step: &'static str, at: impl Into<String>, decision: impl Into<String>, by: Option<String>) {
        self.steps.push(Step { step, at: at.into(), decision: decision.into(), by });
    }

    fn done(self, outcome: Outcome, verdict: impl Into<String>) -> Explanation {
        Explanation { steps: self.steps, outcome, verdict: verdict.into() }
    }
}

/// The source as the mesh sees it.
struct Src<'s> {
    pod: Option<&'s Workload>,
    namespace: String,
    service_account: String,
    ip: Option<Ipv4Addr>,
    captured: bool,
    /// The source is a waypoint's pod (its own HBONE, not captured).
    waypoint: bool,
    /// The source is a gateway's pod (it serves Gateway servers; its own
    /// HBONE, not captured).
    gateway: bool,
}

impl Src<'_> {
    fn identity(&self, td: &str) -> Identity {
        Identity::new(td, &self.namespace, &self.service_account)
    }
}

/// Explains `ask` against the cluster view `snap`.
/// The routes of the VirtualServices bound to the Gateways gateway pod `w`
/// serves that send to the Service at `orig`, with their weights.
fn gateway_routes(snap: &Snapshot, w: &Workload, orig: SocketAddrV4) -> String {
    let svc = snap.service_by_vip(*orig.ip(), orig.port());
    let gateways: Vec<(String, String)> = snap.gateway_servers(w).iter().map(|o| (o.gateway.namespace.clone(), o.gateway.name.clone())).collect();
    let mut routes = Vec::new();
    for vs in &snap.virtual_services {
        let bound = vs.gateways.iter().any(|b| matches!(b, skiff_core::routing::Bind::Gateway { namespace, name } if gateways.contains(&(namespace.clone(), name.clone()))));
        if !bound {
            continue;
        }
        for (i, r) in vs.http.iter().enumerate() {
            let total = skiff_core::routing::total_weight(&r.destinations).max(1);
            let to: Vec<String> = r
                .destinations
                .iter()
                .filter(|d| svc.is_some_and(|(s, _)| skiff_core::routing::host_matches(&d.host, &vs.namespace, &s.name, &s.namespace)))
                .map(|d| format!("{}{} {:.0}%", d.host, d.subset.as_ref().map(|s| format!(" subset {s}")).unwrap_or_default(), f64::from(d.weight) * 100.0 / f64::from(total)))
                .collect();
            if !to.is_empty() {
                routes.push(format!("VirtualService {}/{} http[{i}]: {}", vs.namespace, vs.name, to.join(", ")));
            }
        }
    }
    if routes.is_empty() { "no VirtualService bound to its Gateways routes to this Service".to_owned() } else { routes.join("; ") }
}

pub fn explain(snap: &Snapshot, ask: &Ask) -> Result<Explanation, String> {
    let mut out = Out { steps: Vec::new() };
    let src = source(snap, ask, &mut out)?;
    let (orig, host) = destination(snap, ask, &src, &mut out)?;
    let resolved = resolve_names(snap, &host);
    let at_src = match src.pod.and_then(|p| p.node.as_deref()) {
        Some(n) => format!("ztunnel on {n}"),
        None => "ztunnel".to_owned(),
    };
    // A waypoint's or gateway's own connections: HBONE as its identity,
    // straight to the endpoint it picked (a request's L7 decisions at a
    // waypoint are explained from the request's own client; a gateway's
    // routes are named for this Service).
    let proxy_hop = match (src.waypoint, src.gateway, src.pod) {
        (true, _, _) => Some((
            format!("waypoint {}/{}", src.namespace, src.service_account),
            "the source is a waypoint: it sends over HBONE as its own identity to the endpoint it picked (its L7 decisions for the request are explained from the request's own client)".to_owned(),
        )),
        (false, true, Some(w)) => Some((
            format!("gateway {}/{}", w.namespace, w.name),
            format!(
                "the source is a gateway: it picks the endpoint by its Gateway's servers and the VirtualServices bound to them ({}), and sends over HBONE as its own identity",
                gateway_routes(snap, w, orig)
            ),
        )),
        _ => None,
    };
    if let Some((at, why)) = proxy_hop {
        let eps: Vec<SocketAddrV4> = match snap.service_by_vip(*orig.ip(), orig.port()) {
            Some((svc, port)) => snap.endpoint_addrs(svc, port),
            None => vec![orig],
        };
        out.push("outbound", &at, why, None);
        let peer = Peer { ip: src.ip, identity: Some(src.identity(&ask.trust_domain)) };
        return deliver(snap, ask, &at, &peer, &eps, out);
    }
    if !src.captured {
        return uncaptured(snap, ask, &src, orig, out);
    }
    let from = outbound::From {
        namespace: &src.namespace,
        ip: src.ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
        mesh_ports: &MESH_PORTS,
        policy: outbound::outbound_policy(snap, &ask.root_namespace, ask.outbound_policy),
        resolved: &resolved,
    };
    let d = outbound::decide(snap, from, orig);
    let what = describe_destination(&d.destination);
    let by = match &d.destination {
        Destination::BlackHole | Destination::Passthrough => Some(policy_source(snap, ask)),
        _ => None,
    };
    out.push("outbound", &at_src, format!("{orig} is {what}"), by);
    match d.next {
        Next::Refused(r) => {
            let (outcome, why, by) = match &r {
                outbound::Refused::NoRoute => (Outcome::Refused, "not a destination: the connection is closed (flag NR)".to_owned(), None),
                outbound::Refused::NoEndpoints => (Outcome::Refused, "the Service has no ready endpoint: refused (flag UH)".to_owned(), None),
                outbound::Refused::RegistryOnly => (
                    Outcome::Denied,
                    "outside the registry under REGISTRY_ONLY: refused (flag NR, Istio's BlackHoleCluster)".to_owned(),
                    Some(policy_source(snap, ask)),
                ),
                outbound::Refused::WaypointNotReady(name) => (
                    Outcome::Refused,
                    format!("its waypoint {name} has no ready replica: refused, never sent around it (flag UH)"),
                    waypoint_label(snap, &d.destination),
                ),
            };
            out.push("outbound", &at_src, why.clone(), by);
            Ok(out.done(outcome, why))
        }
        Next::Waypoint { name, namespace, replicas } => {
            let names: Vec<String> = replicas.iter().map(|w| format!("{} ({})", w.name, w.ip.map(|i| i.to_string()).unwrap_or_default())).collect();
            out.push(
                "waypoint",
                &at_src,
                format!("HBONE (mTLS, as {}) to waypoint {namespace}/{name}, one of {} ready replica(s): {}", src.identity(&ask.trust_domain), replicas.len(), names.join(", ")),
                waypoint_label(snap, &d.destination),
            );
            at_waypoint(snap, ask, &src, orig, &d.destination, &namespace, &name, &resolved, out)
        }
        Next::Endpoints(eps) => {
            if eps.len() > 1 {
                out.push("endpoints", &at_src, format!("one of {} ready endpoints, round robin", eps.len()), None);
            }
            let peer = Peer { ip: src.ip, identity: Some(src.identity(&ask.trust_domain)) };
            deliver(snap, ask, &at_src, &peer, &eps, out)
        }
    }
}

/// A source outside the mesh (not captured): nothing applies on its side;
/// a ClusterIP goes to an endpoint by kube-proxy.
fn uncaptured(snap: &Snapshot, ask: &Ask, src: &Src<'_>, orig: SocketAddrV4, mut out: Out) -> Result<Explanation, String> {
    let eps: Vec<SocketAddrV4> = match snap.service_by_vip(*orig.ip(), orig.port()) {
        Some((svc, port)) => {
            let eps = snap.endpoint_addrs(svc, port);
            let mut note = format!("not captured: kube-proxy sends it to one of {} endpoint(s) of Service {}/{}", eps.len(), svc.namespace, svc.name);
            if snap.waypoint_name_for(svc).is_some() {
                note.push_str(" directly; the Service's waypoint sees only traffic from captured pods");
            }
            out.push("outbound", "kube-proxy", note, None);
            if eps.is_empty() {
                return Ok(out.done(Outcome::Refused, "the Service has no ready endpoint: the connection is refused"));
            }
            eps
        }
        None => {
            out.push("outbound", "-", format!("not captured: {orig} is dialled directly, in plaintext"), None);
            vec![orig]
        }
    };
    let peer = Peer { ip: src.ip, identity: None };
    deliver(snap, ask, "kube-proxy", &peer, &eps, out)
}

/// Who arrives at the destination's ztunnel: an address, and an identity
/// when over HBONE.
struct Peer {
    ip: Option<Ipv4Addr>,
    identity: Option<Identity>,
}

/// The last hop to each endpoint, and the outcome over all of them.
fn deliver(snap: &Snapshot, ask: &Ask, at: &str, peer: &Peer, eps: &[SocketAddrV4], mut out: Out) -> Result<Explanation, String> {
    let mut outcomes = Vec::new();
    for ep in eps {
        let (outcome, why) = arrive(snap, ask, at, peer, *ep, &mut out);
        outcomes.push((outcome, why));
    }
    Ok(combine(out, outcomes))
}

fn combine(out: Out, outcomes: Vec<(Outcome, String)>) -> Explanation {
    let allowed = outcomes.iter().filter(|(o, _)| *o == Outcome::Allowed).count();
    if allowed == outcomes.len() {
        let why = match outcomes.len() {
            1 => outcomes.into_iter().next().map(|(_, w)| w).unwrap_or_default(),
            n => format!("delivered to whichever of the {n} endpoints above is picked; each accepts it"),
        };
        return out.done(Outcome::Allowed, why);
    }
    if allowed == 0 {
        let first = outcomes.iter().find(|(o, _)| *o == Outcome::Denied).or(outcomes.first()).cloned();
        let (o, why) = first.unwrap_or((Outcome::Refused, "no endpoint".into()));
        let same = outcomes.iter().all(|(x, _)| *x == o);
        return out.done(if same { o } else { Outcome::Partly }, why);
    }
    out.done(Outcome::Partly, format!("{allowed} of {} endpoints accept it; see each endpoint's step", outcomes.len()))
}

/// At one endpoint: a captured pod's ztunnel (HBONE or plaintext inbound),
/// a pod outside the mesh, or an address outside the cluster.
fn arrive(snap: &Snapshot, ask: &Ask, at: &str, peer: &Peer, ep: SocketAddrV4, out: &mut Out) -> (Outcome, String) {
    let Some(w) = snap.workload_by_ip(*ep.ip()) else {
        let why = format!("leaves the mesh to {ep} (no pod has that address): delivered as the app sent it");
        out.push("endpoint", at, why.clone(), None);
        return (Outcome::Allowed, why);
    };
    let node = w.node.as_deref().unwrap_or("?");
    let at_dst = format!("ztunnel on {node}");
    let name = format!("{}/{} ({ep})", w.namespace, w.name);
    if !outbound::captured(snap, w) {
        let why = format!("{name} is not captured: delivered in plaintext, nothing of the mesh applies at the destination");
        out.push("endpoint", at, why.clone(), None);
        return (Outcome::Allowed, why);
    }
    let dst_identity = Identity::new(&ask.trust_domain, &w.namespace, &w.service_account);
    let conn = ConnInfo {
        src_ip: IpAddr::V4(peer.ip.unwrap_or(Ipv4Addr::UNSPECIFIED)),
        principal: peer.identity.as_ref().map(Identity::principal),
        src_namespace: peer.identity.as_ref().map(|i| i.namespace.clone()),
        dst_ip: IpAddr::V4(*ep.ip()),
        dst_port: ep.port(),
    };
    match &peer.identity {
        Some(id) => out.push("endpoint", at, format!("HBONE (mTLS) to {name}: {id} → {dst_identity}"), None),
        None => {
            out.push("endpoint", at, format!("plaintext to {name}, captured by its ztunnel"), None);
            let m = policy::mtls_decision(&snap.peer_authentications, &ask.root_namespace, &w.namespace, &w.labels, ep.port());
            let by = m.policy.map(|p| format!("PeerAuthentication {}/{} ({})", p.namespace, p.name, mtls_level(m.level, ep.port())));
            if m.mode == MtlsMode::Strict {
                let why = format!("plaintext refused at {name}: PeerAuthentication is STRICT (mutual TLS required)");
                out.push("mtls", &at_dst, why.clone(), by);
                return (Outcome::Denied, why);
            }
            out.push("mtls", &at_dst, format!("{}: plaintext accepted", m.mode.as_str()), by.or(Some("no PeerAuthentication: PERMISSIVE by default".into())));
        }
    }
    let d = policy::authorize_workload(&snap.authorization_policies, &ask.root_namespace, &w.namespace, &w.labels, &conn);
    push_authz(out, "L4 policy", &at_dst, &d);
    if d.allowed {
        (Outcome::Allowed, format!("delivered to {name}"))
    } else {
        (Outcome::Denied, format!("denied at {name}: {}", d.reason))
    }
}

fn mtls_level(level: &str, port: u16) -> String {
    match level {
        "port" => format!("portLevelMtls {port}"),
        "workload" => "selects the workload".into(),
        "namespace" => "namespace-wide".into(),
        "mesh" => "mesh-wide, in the root namespace".into(),
        other => other.into(),
    }
}

fn authz_text(d: &AuthzDecision) -> String {
    format!("{}: {}", if d.allowed { "allowed" } else { "denied" }, d.reason)
}

fn push_authz(out: &mut Out, step: &'static str, at: &str, d: &AuthzDecision) {
    let by = d.policy.as_ref().map(|p| match d.rule {
        Some(r) => format!("AuthorizationPolicy {p} rules[{r}]"),
        None => format!("AuthorizationPolicy {p}"),
    });
    let mut text = authz_text(d);
    if !d.audited.is_empty() {
        text.push_str(&format!(" (audited by {})", d.audited.join(", ")));
    }
    out.push(step, at, text, by);
}

/// At the waypoint: L4 policy and a `tcp` route for a TCP port; L7
/// policy, the route, what it does and where it sends for HTTP.
#[allow(clippy::too_many_arguments)]
fn at_waypoint(
    snap: &Snapshot,
    ask: &Ask,
    src: &Src<'_>,
    orig: SocketAddrV4,
    dest: &Destination<'_>,
    wp_ns: &str,
    wp_name: &str,
    resolved: &HashMap<String, Vec<Ipv4Addr>>,
    mut out: Out,
) -> Result<Explanation, String> {
    let at = format!("waypoint {wp_ns}/{wp_name}");
    let (svc, port): (ServiceInfo, ServicePort) = match dest {
        Destination::Service(s, p) => ((*s).clone(), (*p).clone()),
        Destination::Entry(e) => {
            let svc = ServiceInfo::from_entry(e.entry, e.host);
            let Some(p) = svc.ports.iter().find(|p| p.port == orig.port()).cloned() else {
                return Err(format!("ServiceEntry {}/{} has no port {}", e.entry.namespace, e.entry.name, orig.port()));
            };
            (svc, p)
        }
        _ => return Err("a waypoint serves Services and ServiceEntries only".into()),
    };
    let src_id = src.identity(&ask.trust_domain);
    let src_ip = IpAddr::V4(src.ip.unwrap_or(Ipv4Addr::UNSPECIFIED));
    let policies = skiff_l7::authz::bound(snap, wp_ns, wp_name, &svc);
    let wp_identity = Identity::new(&ask.trust_domain, wp_ns, wp_name);
    let waypoint_peer = |out: &mut Out, eps: Vec<SocketAddrV4>| {
        let ip = snap.waypoint_pods(wp_ns, wp_name).first().and_then(|w| w.ip);
        let peer = Peer { ip, identity: Some(wp_identity.clone()) };
        eps.into_iter().map(|ep| arrive(snap, ask, &at, &peer, ep, out)).collect::<Vec<_>>()
    };
    if route::port_protocol(&port) == "tcp" {
        out.push("protocol", &at, format!("port {} speaks TCP (by its name or appProtocol): L4 only", port.port), None);
        let d = skiff_l7::authz::decide_stream(&policies, src_ip, Some(&src_id), orig);
        push_authz(&mut out, "L4 policy", &at, &d);
        if !d.allowed {
            let why = format!("denied at the waypoint: {}", d.reason);
            return Ok(out.done(Outcome::Denied, why));
        }
        let dests: Vec<(RouteDest, String)> = match route::tcp_route(snap, &svc, port.port, IpAddr::V4(*orig.ip()), wp_ns) {
            Some((vs, i)) => {
                out.push("route", &at, format!("tcp route: {}", weights(&vs.tcp[i].destinations)), Some(format!("VirtualService {}/{} tcp[{i}]", vs.namespace, vs.name)));
                vs.tcp[i].destinations.iter().map(|d| (d.clone(), vs.namespace.clone())).collect()
            }
            None => {
                out.push("route", &at, format!("no tcp route: to {} itself", svc.hostname()), None);
                vec![(RouteDest { host: svc.hostname(), port: Some(port.port), weight: 100, ..Default::default() }, svc.namespace.clone())]
            }
        };
        let mut outcomes = Vec::new();
        for (d, host_ns) in dests.iter().filter(|(d, _)| d.weight > 0 || dests.len() == 1) {
            match endpoints_of(snap, &at, d, host_ns, wp_ns, port.port, orig, resolved, &mut out) {
                Ok(eps) => outcomes.extend(waypoint_peer(&mut out, eps)),
                Err(why) => outcomes.push((Outcome::Refused, why)),
            }
        }
        return Ok(combine(out, outcomes));
    }
    // HTTP: the request as the waypoint reads it.
    let mut headers = http::HeaderMap::new();
    for (k, v) in &ask.headers {
        let name = http::HeaderName::from_bytes(k.as_bytes()).map_err(|_| format!("-H {k:?}: not a header name"))?;
        let value = http::HeaderValue::from_str(v).map_err(|_| format!("-H {k}: the value is not a header value"))?;
        headers.append(name, value);
    }
    let joined = skiff_l7::normalize::joined_headers(&headers);
    let Some(path) = skiff_l7::normalize::normalize_path(&ask.path) else {
        let why = format!("path {:?} cannot be normalized safely: 400", ask.path);
        out.push("request", &at, why.clone(), None);
        return Ok(out.done(Outcome::Refused, why));
    };
    let authority = match dest {
        Destination::Service(s, p) if p.port == 80 => format!("{}.{}", s.name, s.namespace),
        Destination::Service(s, p) => format!("{}.{}:{}", s.name, s.namespace, p.port),
        _ => svc.name.clone(),
    };
    let authority = match &ask.to {
        To::Host(h, Some(p)) if *p != 80 => format!("{h}:{p}"),
        To::Host(h, _) => h.clone(),
        _ => authority,
    };
    let info = RequestInfo { method: &ask.method, path: &path, authority: &authority, headers: &joined, port: port.port, scheme: "http" };
    out.push("request", &at, format!("port {} speaks HTTP: {} {} (Host {authority})", port.port, ask.method, path), None);
    let dst_ip = svc.cluster_ip.unwrap_or(*orig.ip());
    let d = skiff_l7::authz::decide_request(&policies, src_ip, Some(&src_id), dst_ip, &info);
    if policies.is_empty() {
        out.push("L7 policy", &at, "allowed: no AuthorizationPolicy is bound to the waypoint or the Service", None);
    } else {
        push_authz(&mut out, "L7 policy", &at, &d);
    }
    if !d.allowed {
        let why = format!("denied at the waypoint with 403: {}", d.reason);
        return Ok(out.done(Outcome::Denied, why));
    }
    let sel = route::select(snap, &svc, &info, wp_ns);
    let Some(r) = sel.route else {
        let vs = sel.vs.map(|v| format!("VirtualService {}/{}", v.namespace, v.name));
        let why = "no route of the VirtualService matches the request: 404 (flag NR)".to_owned();
        out.push("route", &at, why.clone(), vs);
        return Ok(out.done(Outcome::Refused, why));
    };
    let host_ns = sel.vs.map(|v| v.namespace.clone()).unwrap_or_else(|| svc.namespace.clone());
    match (sel.vs, sel.index) {
        (Some(vs), Some(i)) => {
            let m = matched(&vs.http[i], &info);
            let name = r.name.as_deref().map(|n| format!(" {n:?}")).unwrap_or_default();
            out.push("route", &at, format!("http[{i}]{name} takes it{m}"), Some(format!("VirtualService {}/{} http[{i}]", vs.namespace, vs.name)));
        }
        _ => out.push("route", &at, format!("no VirtualService for {}: the default route, to the Service itself", svc.hostname()), None),
    }
    if let Some((status, _)) = &r.direct_response {
        let why = format!("answered by the waypoint: directResponse {status}");
        out.push("route", &at, why.clone(), None);
        return Ok(out.done(Outcome::Refused, why));
    }
    if let Some(rd) = &r.redirect {
        let why = format!("answered by the waypoint: redirect {} to {}", rd.code, rd.location("http", &authority, &path, port.port));
        out.push("route", &at, why.clone(), None);
        return Ok(out.done(Outcome::Refused, why));
    }
    let mut partly_aborted = None;
    if let Some(f) = &r.fault {
        if let Some((d, pct)) = f.delay {
            out.push("fault", &at, format!("delay {} ms for {pct}% of requests", d.as_millis()), None);
        }
        if let Some((status, pct)) = &f.abort {
            let status = match status {
                routing::AbortStatus::Http(s) => format!("HTTP {s}"),
                routing::AbortStatus::Grpc(g) => format!("gRPC status {g}"),
            };
            out.push("fault", &at, format!("abort with {status} for {pct}% of requests (flag FI)"), None);
            if *pct >= 100.0 {
                let why = format!("aborted by the route's fault with {status}");
                return Ok(out.done(Outcome::Refused, why));
            }
            if *pct > 0.0 {
                partly_aborted = Some(format!("{pct}% of requests are aborted by the route's fault with {status}"));
            }
        }
    }
    let retries = r.retries.clone().unwrap_or_else(routing::Retries::istio_default);
    let per_try = retries.per_try_timeout.map(|t| format!(", {} ms per try", t.as_millis())).unwrap_or_default();
    let retry_src = if r.retries.is_some() { "the route's" } else { "Istio's default" };
    out.push(
        "retries",
        &at,
        format!("{retry_src}: up to {} retr{} on {}{per_try}", retries.attempts, if retries.attempts == 1 { "y" } else { "ies" }, retries.retry_on.join(",")),
        None,
    );
    out.push(
        "timeout",
        &at,
        match r.timeout {
            Some(t) => format!("{} ms for the whole request, retries included", t.as_millis()),
            None => "none (Istio's default for HTTP routes)".to_owned(),
        },
        None,
    );
    out.push("destinations", &at, weights(&r.destinations), None);
    let mut outcomes = Vec::new();
    for d in &r.destinations {
        if d.weight == 0 && r.destinations.len() > 1 {
            continue;
        }
        match endpoints_of(snap, &at, d, &host_ns, wp_ns, port.port, orig, resolved, &mut out) {
            Ok(eps) => outcomes.extend(waypoint_peer(&mut out, eps)),
            Err(why) => outcomes.push((Outcome::Refused, why)),
        }
    }
    let mut e = combine(out, outcomes);
    if let (Some(why), Outcome::Allowed) = (partly_aborted, &e.outcome) {
        e.outcome = Outcome::Partly;
        e.verdict = why;
    }
    Ok(e)
}

/// A route destination's ready endpoints, through `route::resolve` (the
/// waypoint's own): the Service, the subset's pods, the DestinationRule.
#[allow(clippy::too_many_arguments)]
fn endpoints_of(
    snap: &Snapshot,
    at: &str,
    d: &RouteDest,
    host_ns: &str,
    wp_ns: &str,
    default_port: u16,
    orig: SocketAddrV4,
    resolved: &HashMap<String, Vec<Ipv4Addr>>,
    out: &mut Out,
) -> Result<Vec<SocketAddrV4>, String> {
    let outside = route::Outside { names: Some(resolved), original_dst: Some(orig), ingress: false };
    let subset = d.subset.as_deref().map(|s| format!(" subset {s}")).unwrap_or_default();
    match route::resolve(snap, d, host_ns, wp_ns, default_port, outside) {
        Ok(r) => {
            let dr = routing::destination_rule_for(&snap.destination_rules, &r.svc.name, &r.svc.namespace, wp_ns)
                .map(|dr| format!("DestinationRule {}/{}", dr.namespace, dr.name));
            let eps: Vec<SocketAddrV4> = r.endpoints.iter().map(|e| e.addr()).collect();
            let names: Vec<String> = r
                .endpoints
                .iter()
                .map(|e| match e.workload() {
                    Some(w) => format!("{} ({})", w.name, e.addr()),
                    None => e.addr().to_string(),
                })
                .collect();
            out.push("endpoints", at, format!("{}{subset} port {}: {}", r.svc.hostname(), r.port.port, names.join(", ")), dr);
            Ok(eps)
        }
        Err(f) => {
            let (status, flag, text) = f.response();
            let why = format!("{}{subset}: {text}: {} (flag {flag})", d.host, status.as_u16());
            out.push("endpoints", at, why.clone(), None);
            Err(why)
        }
    }
}

/// `host[ subset] N%` for each destination, by share of the total weight.
fn weights(dests: &[RouteDest]) -> String {
    let total = routing::total_weight(dests).max(1);
    dests
        .iter()
        .map(|d| {
            let subset = d.subset.as_deref().map(|s| format!(" subset {s}")).unwrap_or_default();
            let port = d.port.map(|p| format!(":{p}")).unwrap_or_default();
            let pct = if dests.len() == 1 { 100.0 } else { f64::from(d.weight) * 100.0 / f64::from(total) };
            format!("{}{port}{subset} {}%", d.host, (pct * 10.0).round() / 10.0)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Which of a route's matches took the request, in words.
fn matched(r: &HttpRoute, info: &RequestInfo<'_>) -> String {
    if r.matches.is_empty() {
        return " (it has no match: every request)".into();
    }
    let Some((i, m)) = r.matches.iter().enumerate().find(|(_, m)| m.matches(info)) else {
        return String::new();
    };
    let s = |m: &StrMatch| match m {
        StrMatch::Exact(v) => format!("exact {v:?}"),
        StrMatch::Prefix(v) => format!("prefix {v:?}"),
        StrMatch::Regex(r) => format!("regex {:?}", r.0.as_str()),
        StrMatch::Present => "present".into(),
    };
    let mut parts = Vec::new();
    if let Some(u) = &m.uri {
        parts.push(format!("uri {}", s(u)));
    }
    if let Some(x) = &m.method {
        parts.push(format!("method {}", s(x)));
    }
    if let Some(x) = &m.authority {
        parts.push(format!("authority {}", s(x)));
    }
    for (k, v) in &m.headers {
        parts.push(format!("header {k} {}", s(v)));
    }
    for (k, v) in &m.without_headers {
        parts.push(format!("without header {k} {}", s(v)));
    }
    for (k, v) in &m.query_params {
        parts.push(format!("query {k} {}", s(v)));
    }
    if let Some(p) = m.port {
        parts.push(format!("port {p}"));
    }
    format!(" by match[{i}]: {}", if parts.is_empty() { "every request".to_owned() } else { parts.join(", ") })
}

fn describe_destination(d: &Destination<'_>) -> String {
    match d {
        Destination::NoDestination => "loopback or a mesh port: no destination".into(),
        Destination::Service(s, p) => format!("Service {}/{} port {}", s.namespace, s.name, p.port),
        Destination::Pod(w) => format!("pod {}/{}", w.namespace, w.name),
        Destination::Entry(e) => format!("{} of ServiceEntry {}/{}, to {}", e.host, e.entry.namespace, e.entry.name, e.target),
        Destination::Passthrough => "outside the registry (no Service, pod or ServiceEntry): let through, ALLOW_ANY (Istio's PassthroughCluster)".into(),
        Destination::BlackHole => "outside the registry (no Service, pod or ServiceEntry)".into(),
    }
}

/// Where the outbound traffic policy in force comes from.
fn policy_source(snap: &Snapshot, ask: &Ask) -> String {
    match snap.mesh_configs.get(&ask.root_namespace).and_then(|m| m.outbound_policy) {
        Some(_) => format!("ConfigMap {}/istio mesh.outboundTrafficPolicy.mode", ask.root_namespace),
        None => ask.outbound_policy_from.clone(),
    }
}

/// Which label sends a Service's or ServiceEntry's traffic to a waypoint.
fn waypoint_label(snap: &Snapshot, d: &Destination<'_>) -> Option<String> {
    let (kind, ns, name, labels) = match d {
        Destination::Service(s, _) => ("Service", &s.namespace, &s.name, &s.labels),
        Destination::Entry(e) => ("ServiceEntry", &e.entry.namespace, &e.entry.name, &e.entry.labels),
        _ => return None,
    };
    let key = |l: &std::collections::BTreeMap<String, String>| {
        [skiff_core::LABEL_USE_WAYPOINT, skiff_core::LABEL_SKIFF_USE_WAYPOINT].into_iter().find(|k| l.contains_key(*k))
    };
    match key(labels) {
        Some(k) => Some(format!("{kind} {ns}/{name} label {k}")),
        None => snap.namespace_labels(ns).and_then(key).map(|k| format!("Namespace {ns} label {k}")),
    }
}

/// The source: a pod (captured or not, and by which rule) or an address.
fn source<'s>(snap: &'s Snapshot, ask: &Ask, out: &mut Out) -> Result<Src<'s>, String> {
    let pod = match &ask.from {
        From::Pod(ns, name) => Some(pod_named(snap, ns, name).ok_or_else(|| format!("--from {ns}/{name}: no such pod{}", pods_hint(snap, ns)))?),
        From::ServiceAccount(ns, sa) => snap.workloads.values().find(|w| &w.namespace == ns && &w.service_account == sa && w.is_ready()),
        From::Ip(ip) => snap.workload_by_ip(*ip),
    };
    if let Some(w) = pod {
        let node = w.node.as_deref().unwrap_or("");
        let decision = enroll::decide(node, snap.namespace_labels(&w.namespace), w);
        let captured = decision == enroll::Decision::Enroll;
        let why = match decision {
            enroll::Decision::Enroll => enrolled_by(snap, w),
            enroll::Decision::Skip(r) => format!("not captured: {r}"),
        };
        let id = Identity::new(&ask.trust_domain, &w.namespace, &w.service_account);
        out.push(
            "source",
            if node.is_empty() { "node-agent".to_owned() } else { format!("node-agent on {node}") },
            format!("pod {}/{} ({}), identity {id}; {why}", w.namespace, w.name, w.ip.map(|i| i.to_string()).unwrap_or_else(|| "no IP".into())),
            None,
        );
        let waypoint = decision == enroll::Decision::Skip(enroll::SkipReason::Waypoint);
        let gateway = !waypoint && !snap.gateway_servers(w).is_empty();
        return Ok(Src { pod: Some(w), namespace: w.namespace.clone(), service_account: w.service_account.clone(), ip: w.ip, captured, waypoint, gateway });
    }
    match &ask.from {
        From::ServiceAccount(ns, sa) => {
            // No pod runs as it: a pod that would, by its namespace's label.
            let captured = snap.namespace_labels(ns).is_some_and(|l| enroll::namespace_enrolled(ns, l));
            let id = Identity::new(&ask.trust_domain, ns, sa);
            out.push(
                "source",
                "node-agent",
                format!(
                    "no running pod of {ns} runs as {sa}: explained for one that would (no address: ipBlocks rules cannot match it), identity {id}; {}",
                    if captured { "captured, by its namespace's label" } else { "not captured: namespace not labelled dataplane-mode=ambient" }
                ),
                None,
            );
            Ok(Src { pod: None, namespace: ns.clone(), service_account: sa.clone(), ip: None, captured, waypoint: false, gateway: false })
        }
        From::Ip(ip) => {
            out.push("source", "-", format!("{ip} is no pod's address: outside the mesh, not captured, no identity"), None);
            Ok(Src { pod: None, namespace: String::new(), service_account: String::new(), ip: Some(*ip), captured: false, waypoint: false, gateway: false })
        }
        From::Pod(..) => unreachable!("a pod source was found or refused above"),
    }
}

/// Which label enrolled a captured pod.
fn enrolled_by(snap: &Snapshot, w: &Workload) -> String {
    for k in [skiff_core::LABEL_DATAPLANE_MODE, skiff_core::LABEL_ISTIO_DATAPLANE_MODE] {
        if w.labels.get(k).map(String::as_str) == Some(skiff_core::DATAPLANE_AMBIENT) {
            return format!("captured: pod label {k}=ambient");
        }
    }
    let labels = snap.namespace_labels(&w.namespace);
    for k in [skiff_core::LABEL_DATAPLANE_MODE, skiff_core::LABEL_ISTIO_DATAPLANE_MODE] {
        if labels.and_then(|l| l.get(k)).is_some() {
            return format!("captured: Namespace {} label {k}=ambient", w.namespace);
        }
    }
    "captured".into()
}

/// The pod `name` in `ns`, else a ready pod of the workload (Deployment)
/// of that name.
fn pod_named<'s>(snap: &'s Snapshot, ns: &str, name: &str) -> Option<&'s Workload> {
    let in_ns = || snap.workloads.values().filter(move |w| w.namespace == ns);
    in_ns().find(|w| w.name == name).or_else(|| in_ns().filter(|w| w.is_ready()).find(|w| w.workload_name == name))
}

fn pods_hint(snap: &Snapshot, ns: &str) -> String {
    let names: Vec<&str> = snap.workloads.values().filter(|w| w.namespace == ns).map(|w| w.name.as_str()).take(8).collect();
    if names.is_empty() {
        format!(" (namespace {ns} has no pods)")
    } else {
        format!(" (pods in {ns}: {})", names.join(", "))
    }
}

/// The address the source dials, and the host name it used (for a
/// ServiceEntry's DNS name).
fn destination(snap: &Snapshot, ask: &Ask, src: &Src<'_>, out: &mut Out) -> Result<(SocketAddrV4, Option<String>), String> {
    let client_ns = if src.namespace.is_empty() { "default" } else { src.namespace.as_str() };
    match &ask.to {
        To::Addr(a) => {
            let what = match (snap.service_by_vip(*a.ip(), a.port()), snap.workload_by_ip(*a.ip())) {
                (Some((s, _)), _) => format!("the ClusterIP of Service {}/{}", s.namespace, s.name),
                (None, Some(w)) => format!("the address of pod {}/{}", w.namespace, w.name),
                _ => "no Service's or pod's address".into(),
            };
            out.push("destination", "-", format!("{a}: {what}"), None);
            Ok((*a, None))
        }
        To::Pod(ns, name, port) => {
            let w = pod_named(snap, ns, name).ok_or_else(|| format!("--to {ns}/{name}: no such pod{}", pods_hint(snap, ns)))?;
            let ip = w.ip.ok_or_else(|| format!("--to {ns}/{name}: the pod has no IP"))?;
            let a = SocketAddrV4::new(ip, *port);
            out.push("destination", "-", format!("pod {ns}/{name} at {a}"), None);
            Ok((a, None))
        }
        To::Host(host, port) => {
            if let Some(svc) = service_named(snap, host, client_ns) {
                let p = match port {
                    Some(p) => svc.ports.iter().find(|x| x.port == *p).ok_or_else(|| {
                        format!("--to {host}: Service {}/{} has no port {p} (ports: {})", svc.namespace, svc.name, ports_of(svc))
                    })?,
                    None if svc.ports.len() == 1 => &svc.ports[0],
                    None => return Err(format!("--to {host}: Service {}/{} has several ports ({}): name one", svc.namespace, svc.name, ports_of(svc))),
                };
                let ip = svc.cluster_ip.ok_or_else(|| format!("--to {host}: Service {}/{} has no ClusterIP (headless): name a pod", svc.namespace, svc.name))?;
                let a = SocketAddrV4::new(ip, p.port);
                out.push(
                    "destination",
                    "-",
                    format!("{host} is Service {}/{} port {} ({}), ClusterIP {ip}", svc.namespace, svc.name, p.port, route::port_protocol(p)),
                    None,
                );
                return Ok((a, None));
            }
            // A ServiceEntry's host: the address the pod would dial.
            let entry = skiff_core::egress::visible_in_order(&snap.service_entries, client_ns)
                .into_iter()
                .find(|e| e.hosts.iter().any(|h| routing::wildcard_matches(h, host) || h == host));
            let port = port.or_else(|| entry.filter(|e| e.ports.len() == 1).map(|e| e.ports[0].number)).unwrap_or(80);
            let addr = match entry {
                Some(e) => e
                    .addresses
                    .iter()
                    .find_map(|c| match c.addr {
                        IpAddr::V4(ip) => Some(ip),
                        IpAddr::V6(_) => None,
                    })
                    .or_else(|| e.endpoints.iter().find_map(|ep| ep.address.parse::<Ipv4Addr>().ok()))
                    .or_else(|| lookup_host(host)),
                None => lookup_host(host),
            };
            let Some(ip) = addr else {
                return Err(format!(
                    "--to {host}: no Service {host:?} in {client_ns} (or named with its namespace), no ServiceEntry host, and the name does not resolve here"
                ));
            };
            let a = SocketAddrV4::new(ip, port);
            let what = match entry {
                Some(e) => format!("a host of ServiceEntry {}/{}; taken as dialled at {a} (the entry's first address or endpoint, else this machine's DNS: a pod dials what its own DNS answers)", e.namespace, e.name),
                None => format!("no Service or ServiceEntry; resolves to {ip}"),
            };
            out.push("destination", "-", format!("{host}: {what}"), None);
            Ok((a, Some(host.clone())))
        }
    }
}

fn ports_of(svc: &ServiceInfo) -> String {
    svc.ports.iter().map(|p| p.port.to_string()).collect::<Vec<_>>().join(", ")
}

/// The Service a name reaches from a pod in `client_ns`, as the pod's
/// resolver finds it: `name`, `name.ns`, `name.ns.svc`,
/// `name.ns.svc.cluster.local`.
fn service_named<'s>(snap: &'s Snapshot, host: &str, client_ns: &str) -> Option<&'s ServiceInfo> {
    let h = host.strip_suffix(".cluster.local").unwrap_or(host);
    let h = h.strip_suffix(".svc").unwrap_or(h);
    let (name, ns) = match h.split_once('.') {
        Some((n, ns)) if !ns.contains('.') => (n, ns),
        Some(_) => return None,
        None => (h, client_ns),
    };
    snap.services.get(&format!("{ns}/{name}")).filter(|s| s.entry.is_none())
}

/// The IPv4 addresses `host` resolves to on this machine.
fn v4_addrs(host: &str) -> Vec<Ipv4Addr> {
    (host, 0)
        .to_socket_addrs()
        .map(|addrs| {
            addrs
                .filter_map(|a| match a.ip() {
                    IpAddr::V4(ip) => Some(ip),
                    IpAddr::V6(_) => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

fn lookup_host(host: &str) -> Option<Ipv4Addr> {
    v4_addrs(host).first().copied()
}

/// DNS ServiceEntries' names resolved as ztunnel would see them (the
/// host dialled, and every name the entries resolve).
fn resolve_names(snap: &Snapshot, host: &Option<String>) -> HashMap<String, Vec<Ipv4Addr>> {
    let mut names = skiff_core::egress::names_to_resolve(&snap.service_entries);
    names.extend(host.iter().cloned());
    names
        .into_iter()
        .filter_map(|n| {
            let ips = v4_addrs(&n);
            (!ips.is_empty()).then_some((n, ips))
        })
        .collect()
}

/// The explanation as text: one numbered line per step, the object and
/// rule under it, and the verdict.
pub fn render(e: &Explanation) -> String {
    let mut s = String::new();
    for (i, st) in e.steps.iter().enumerate() {
        s.push_str(&format!("{:>2}. {:<12} [{}] {}\n", i + 1, st.step, st.at, st.decision));
        if let Some(by) = &st.by {
            s.push_str(&format!("    {:<12} by {by}\n", ""));
        }
    }
    s.push_str(&format!("verdict: {} — {}\n", format!("{:?}", e.outcome).to_uppercase(), e.verdict));
    s
}
