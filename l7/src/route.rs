//! Route application: which VirtualService and route a request takes (or
//! the default route), where a route destination leads (Service, port,
//! subset endpoints, DestinationRule policy), what a Service port speaks,
//! and what a route does to a request before it goes upstream (direct
//! responses and redirects, faults, path and authority rewrites, header
//! operations). The matching itself is `skiff_core::routing`'s.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use skiff_core::{
    model::{ServiceInfo, ServicePort, Snapshot, Workload},
    routing::{self, AbortStatus, HttpRoute, RequestInfo, RouteDest, VirtualService},
};
use tracing::warn;

use crate::{
    body::{full, Body},
    errors::{grpc_code, Failure},
};

/// Whether a Service port speaks HTTP (Istio's protocol selection:
/// `appProtocol`, else the port name's prefix).
pub fn port_protocol(p: &ServicePort) -> &'static str {
    let from = |s: &str| {
        let s = s.to_ascii_lowercase();
        if s == "grpc" || s.starts_with("grpc-") || s == "http2" || s.starts_with("http2-") || s == "kubernetes.io/h2c" {
            Some("http2")
        } else if s == "http" || s.starts_with("http-") {
            Some("http")
        } else if s == "tcp" || s.starts_with("tcp-") {
            Some("tcp")
        } else {
            None
        }
    };
    p.app_protocol.as_deref().and_then(from).or_else(|| p.name.as_deref().and_then(from)).unwrap_or("tcp")
}

/// The route a request takes at a waypoint (see [`select`]).
#[derive(Debug)]
pub struct Selected<'s> {
    /// The VirtualService that applies, if one does.
    pub vs: Option<&'s VirtualService>,
    /// The index of its `http` route that matched.
    pub index: Option<usize>,
    /// The route (its matches for the mesh); None when a VirtualService
    /// applies but no route matches. Without a VirtualService, the
    /// default route.
    pub route: Option<HttpRoute>,
}

/// The VirtualService that applies to `svc` at a waypoint in `proxy_ns`
/// (exported to it; the Service's own namespace's first, then the oldest)
/// and the route it gives the request: None when a VirtualService applies
/// but no route matches. Without a VirtualService, the default route.
pub fn select<'s>(snap: &'s Snapshot, svc: &ServiceInfo, info: &RequestInfo<'_>, proxy_ns: &str) -> Selected<'s> {
    // Only VirtualServices with HTTP routes make one (as Istio builds
    // virtual hosts): one with only `tcp` routes leaves HTTP to the default.
    let vs = snap
        .virtual_services
        .iter()
        .filter(|v| !v.http.is_empty() && v.applies_to(&svc.name, &svc.namespace, proxy_ns))
        .min_by_key(|v| v.precedence(&svc.namespace));
    match vs {
        // Only its matches for the mesh: a rewrite looks at those.
        Some(vs) => {
            let index = vs.route_index_at(info, &routing::Bind::Mesh);
            Selected { vs: Some(vs), index, route: index.map(|i| vs.http[i].at(&routing::Bind::Mesh, &vs.gateways)) }
        }
        None => Selected { vs: None, index: None, route: Some(default_route(svc)) },
    }
}

/// Where a TCP stream to `svc`'s `port` (at the address `dst`) goes at a
/// waypoint: the destination the first matching `tcp` route of the
/// VirtualService that applies to `svc` picks (by weight, with `roll`
/// uniform in `0..total weight`) and the namespace its short hosts
/// resolve in; without one, the Service itself.
pub fn select_tcp(snap: &Snapshot, svc: &ServiceInfo, port: u16, dst: std::net::IpAddr, proxy_ns: &str, roll: &mut fastrand::Rng) -> (RouteDest, String) {
    if let Some((vs, i)) = tcp_route(snap, svc, port, dst, proxy_ns) {
        let r = &vs.tcp[i];
        if let Some(d) = routing::pick_weighted(&r.destinations, roll.u32(..routing::total_weight(&r.destinations).max(1))) {
            return (d.clone(), vs.namespace.clone());
        }
    }
    (RouteDest { host: svc.hostname(), subset: None, port: Some(port), weight: 100, ..Default::default() }, svc.namespace.clone())
}

/// The VirtualService whose `tcp` route takes a stream to `svc`'s `port`
/// (at `dst`) at a waypoint in `proxy_ns`, and that route's index.
pub fn tcp_route<'s>(snap: &'s Snapshot, svc: &ServiceInfo, port: u16, dst: std::net::IpAddr, proxy_ns: &str) -> Option<(&'s VirtualService, usize)> {
    let vs = snap
        .virtual_services
        .iter()
        .filter(|v| !v.tcp.is_empty() && v.applies_to(&svc.name, &svc.namespace, proxy_ns))
        .min_by_key(|v| v.precedence(&svc.namespace))?;
    let r = vs.l4_route(&routing::Bind::Mesh, port, dst, false, None)?;
    Some((vs, vs.tcp.iter().position(|x| std::ptr::eq(x, r))?))
}

/// Everything to the Service itself, nothing else done.
pub fn default_route(svc: &ServiceInfo) -> HttpRoute {
    HttpRoute {
        destinations: vec![RouteDest { host: svc.hostname(), subset: None, port: None, weight: 100, ..Default::default() }],
        ..Default::default()
    }
}

/// A route destination's Service, port, ready endpoints (of the subset)
/// and traffic policy.
pub struct Resolved<'s> {
    pub svc: ServiceInfo,
    pub port: ServicePort,
    pub endpoints: Vec<Endpoint<'s>>,
    pub policy: routing::TrafficPolicy,
}

/// Where one request (or stream) can go.
#[derive(Clone, Copy, Debug)]
pub enum Endpoint<'s> {
    /// A ready pod and the port on it: HBONE to its ztunnel when it is in
    /// the mesh, plain TCP otherwise.
    Pod(&'s Workload, u16),
    /// A ServiceEntry's endpoint, outside the mesh: plain TCP.
    External(SocketAddrV4),
    /// A Service's waypoint (a ready replica), for the ingress gateway
    /// when the Service asks for it (`istio.io/ingress-use-waypoint`):
    /// HBONE to the waypoint with the Service's address as the target.
    Waypoint(&'s Workload, SocketAddrV4),
}

impl<'s> Endpoint<'s> {
    pub fn addr(&self) -> SocketAddrV4 {
        match self {
            Endpoint::Pod(w, port) => SocketAddrV4::new(w.ip.expect("ready endpoints have an IP"), *port),
            Endpoint::External(a) => *a,
            // Per replica (load balancing, outlier detection).
            Endpoint::Waypoint(w, target) => SocketAddrV4::new(w.ip.expect("ready waypoints have an IP"), target.port()),
        }
    }

    /// Where HBONE to this endpoint goes and what it asks for: a pod (its
    /// ztunnel, the pod's address) or a waypoint (itself, the Service's
    /// address); None for an endpoint outside the mesh.
    pub fn hbone(&self) -> Option<(&'s Workload, SocketAddrV4)> {
        match self {
            Endpoint::Pod(w, _) => Some((w, self.addr())),
            Endpoint::Waypoint(w, target) => Some((w, *target)),
            Endpoint::External(_) => None,
        }
    }

    pub fn workload(&self) -> Option<&'s Workload> {
        match self {
            Endpoint::Pod(w, _) => Some(w),
            // The waypoint picks the pod.
            Endpoint::External(_) | Endpoint::Waypoint(..) => None,
        }
    }
}

/// What a destination is resolved against besides the cluster view: the
/// addresses of ServiceEntries' names as last resolved (DNS entries), and
/// the address the client dialled (a NONE entry's endpoint: Istio's
/// original-destination cluster).
#[derive(Clone, Copy, Default)]
pub struct Outside<'a> {
    pub names: Option<&'a HashMap<String, Vec<Ipv4Addr>>>,
    pub original_dst: Option<SocketAddrV4>,
    /// The proxy is an ingress gateway: a Service that asks for it is
    /// reached through its waypoint.
    pub ingress: bool,
}

/// `istio.io/ingress-use-waypoint: "true"` on the Service or its
/// namespace: ingress gateways send its traffic to its waypoint (Istio's
/// ambient), instead of straight to its pods.
pub fn ingress_uses_waypoint(snap: &Snapshot, svc: &ServiceInfo) -> bool {
    const LABEL: &str = "istio.io/ingress-use-waypoint";
    match svc.labels.get(LABEL) {
        Some(v) => v == "true",
        None => snap.namespace_labels(&svc.namespace).and_then(|l| l.get(LABEL)).is_some_and(|v| v == "true"),
    }
}

/// A route destination → its Service, port, ready endpoints (of the
/// subset) and traffic policy. A host that is no Service is looked up
/// among the ServiceEntries exported to the proxy's namespace (its
/// endpoints: STATIC addresses, DNS names as resolved, or for NONE the
/// address the client dialled).
/// `client_ns` is the namespace of the proxy that sends (the waypoint's):
/// its DestinationRules come first (see [`routing::destination_rule_for`]).
pub fn resolve<'s>(snap: &'s Snapshot, dest: &RouteDest, host_ns: &str, client_ns: &str, default_port: u16, outside: Outside<'_>) -> Result<Resolved<'s>, Failure> {
    let want_port = dest.port.unwrap_or(default_port);
    let Some(dsvc) = snap.services.values().find(|s| routing::host_matches(&dest.host, host_ns, &s.name, &s.namespace)) else {
        return resolve_entry(snap, dest, client_ns, want_port, outside);
    };
    let dport = match dsvc.ports.iter().find(|p| p.port == want_port) {
        Some(p) => p,
        // Istio: a destination's port may be left out only when the
        // Service has a single one.
        None if dsvc.ports.len() == 1 => &dsvc.ports[0],
        None => {
            warn!(service = %dsvc.hostname(), port = want_port, "the route's destination names no port, and the Service has several, none of them that one");
            return Err(Failure::NoHealthyUpstream);
        }
    };
    let (subset_labels, policy) = subset_and_policy(snap, dest, dsvc, dport.port, client_ns)?;
    if let (true, Some(vip)) = (outside.ingress && ingress_uses_waypoint(snap, dsvc), dsvc.cluster_ip) {
        match snap.waypoint_for(dsvc) {
            Some(Ok(pods)) => {
                let target = SocketAddrV4::new(vip, dport.port);
                let eps = pods.into_iter().map(|w| Endpoint::Waypoint(w, target)).collect();
                return Ok(Resolved { svc: dsvc.clone(), port: dport.clone(), endpoints: eps, policy });
            }
            // Never around it: the waypoint's policy would be skipped.
            Some(Err(name)) => {
                warn!(service = %dsvc.hostname(), waypoint = %name, "the Service asks ingress to use its waypoint, which has no ready pod");
                return Err(Failure::NoHealthyUpstream);
            }
            None => {}
        }
    }
    let eps: Vec<Endpoint<'s>> = snap
        .endpoints(dsvc, dport)
        .into_iter()
        .filter(|(w, _)| subset_labels.as_ref().is_none_or(|l| l.iter().all(|(k, v)| w.labels.get(k) == Some(v))))
        .map(|(w, p)| Endpoint::Pod(w, p))
        .collect();
    if eps.is_empty() {
        return Err(Failure::NoHealthyUpstream);
    }
    Ok(Resolved { svc: dsvc.clone(), port: dport.clone(), endpoints: eps, policy })
}

/// The subset's labels (None: all endpoints) and the traffic policy of the
/// DestinationRule for `svc` at `port`.
fn subset_and_policy(
    snap: &Snapshot,
    dest: &RouteDest,
    svc: &ServiceInfo,
    port: u16,
    client_ns: &str,
) -> Result<(Option<std::collections::BTreeMap<String, String>>, routing::TrafficPolicy), Failure> {
    let dr = routing::destination_rule_for(&snap.destination_rules, &svc.name, &svc.namespace, client_ns);
    let subset_labels = dest.subset.as_ref().and_then(|sub| dr.as_ref().and_then(|dr| dr.subsets.get(sub).cloned()));
    if dest.subset.is_some() && subset_labels.is_none() {
        warn!(subset = ?dest.subset, service = %svc.hostname(), "route names a subset no DestinationRule defines");
        return Err(Failure::NoHealthyUpstream);
    }
    let policy = dr.map(|dr| dr.policy_for(dest.subset.as_deref(), port).clone()).unwrap_or_default();
    Ok((subset_labels, policy))
}

/// [`resolve`] for a host of a ServiceEntry exported to `client_ns` (its
/// namespace's first, then the oldest, as ztunnel picks).
fn resolve_entry<'s>(snap: &'s Snapshot, dest: &RouteDest, client_ns: &str, want_port: u16, outside: Outside<'_>) -> Result<Resolved<'s>, Failure> {
    let host = dest.host.to_ascii_lowercase();
    let e = skiff_core::egress::visible_in_order(&snap.service_entries, client_ns)
        .into_iter()
        .find(|e| e.hosts.iter().any(|h| routing::host_matches(h, &e.namespace, &host, &e.namespace)))
        .ok_or(Failure::NoHealthyUpstream)?;
    let svc = ServiceInfo::from_entry(e, &host);
    let dport = svc.ports.iter().find(|p| p.port == want_port).or_else(|| svc.ports.first()).ok_or(Failure::NoHealthyUpstream)?.clone();
    let (subset_labels, policy) = subset_and_policy(snap, dest, &svc, dport.port, client_ns)?;
    let se_port = e.ports.iter().find(|p| p.number == dport.port).expect("the entry's own port");
    let port_of = |ep: Option<&skiff_core::egress::SeEndpoint>| {
        se_port.target_port.or_else(|| ep.and_then(|ep| ep.ports.get(&se_port.name).copied())).unwrap_or(se_port.number)
    };
    let names = |n: &str| outside.names.and_then(|m| m.get(n)).cloned().unwrap_or_default();
    let mut eps = Vec::new();
    use skiff_core::egress::Resolution;
    // NONE: the address the client dialled, when this entry is one that
    // takes it (not an address dialled for another destination).
    let empty = HashMap::new();
    let takes = |dst: SocketAddrV4| skiff_core::egress::lookup(std::slice::from_ref(e), &e.namespace, dst, outside.names.unwrap_or(&empty)).is_some();
    match e.resolution {
        Resolution::None => match outside.original_dst {
            Some(dst) if !takes(dst) => warn!(host = %host, dialled = %dst, "the route's ServiceEntry (resolution NONE) does not take the address the client dialled: nothing to send to"),
            Some(dst) if subset_labels.is_none() => eps.push(Endpoint::External(SocketAddrV4::new(*dst.ip(), port_of(None)))),
            Some(_) => warn!(subset = ?dest.subset, host = %host, "a subset of a ServiceEntry with resolution NONE: it has no endpoints to choose from"),
            None => warn!(host = %host, "a ServiceEntry with resolution NONE reached other than by its address: no original destination to send to"),
        },
        Resolution::Static | Resolution::Dns if !e.endpoints.is_empty() => {
            for ep in e.endpoints.iter().filter(|ep| subset_labels.as_ref().is_none_or(|l| l.iter().all(|(k, v)| ep.labels.get(k) == Some(v)))) {
                let ips = match ep.address.parse::<Ipv4Addr>() {
                    Ok(a) => vec![a],
                    Err(_) => names(&ep.address),
                };
                eps.extend(ips.into_iter().map(|ip| Endpoint::External(SocketAddrV4::new(ip, port_of(Some(ep))))));
            }
        }
        Resolution::Static => {}
        Resolution::Dns => {
            if subset_labels.is_none() {
                eps.extend(names(&host).into_iter().map(|ip| Endpoint::External(SocketAddrV4::new(ip, port_of(None)))));
            }
        }
    }
    // Never into the cluster or the proxy's own host: a name that
    // resolves (or an address dialled) to loopback, link-local (cloud
    // metadata), multicast or broadcast, or to a pod or Service of the
    // cluster (reached over plain TCP, it would skip HBONE and policy).
    eps.retain(|ep| {
        let a = ep.addr();
        let ip = *a.ip();
        let bad = ip.is_loopback() || ip.is_link_local() || ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() || snap.workload_by_ip(ip).is_some() || snap.service_by_vip(ip, a.port()).is_some() || snap.services.values().any(|s| s.cluster_ip == Some(ip));
        if bad {
            warn!(host = %host, endpoint = %a, "a ServiceEntry's endpoint is loopback, link-local, multicast, or a pod or Service of the cluster: not used");
        }
        !bad
    });
    if eps.is_empty() {
        return Err(Failure::NoHealthyUpstream);
    }
    Ok(Resolved { svc, port: dport, endpoints: eps, policy })
}

/// The answer a route gives without any upstream: its direct response,
/// else its redirect (what it does not replace of the request's URL —
/// `http`, `authority`, `path`, the port the request came in on — kept).
pub fn local_response(route: &HttpRoute, scheme: &str, authority: &str, path: &str, port: u16) -> Option<Response<Body>> {
    if let Some((status, body)) = &route.direct_response {
        let mut r = Response::new(full(body.clone()));
        *r.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
        return Some(r);
    }
    if let Some(redirect) = &route.redirect {
        // The request's authority goes into the Location: it must be one
        // (no userinfo or path smuggled in).
        if redirect.authority.is_none() && !routing::is_authority(authority) {
            let mut r = Response::new(full("bad request: Host is not an authority\n"));
            *r.status_mut() = StatusCode::BAD_REQUEST;
            return Some(r);
        }
        // `http` at a waypoint (plaintext inside HBONE); the listener's
        // scheme at the gateway.
        let loc = redirect.location(scheme, authority, path, port);
        let mut r = Response::new(full(""));
        *r.status_mut() = StatusCode::from_u16(redirect.code).unwrap_or(StatusCode::MOVED_PERMANENTLY);
        if let Ok(v) = HeaderValue::from_str(&loc) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        return Some(r);
    }
    None
}

/// The route's fault on one request: an injected delay is waited out
/// (flag DI), an injected abort is the failure to answer with. The rolls
/// are uniform in [0, 100).
pub async fn inject_fault(f: &routing::Fault, delay_roll: f64, abort_roll: f64, flags: &mut Vec<&'static str>) -> Result<(), Failure> {
    let d = routing::fault_decision(f, delay_roll, abort_roll);
    if let Some(delay) = d.delay {
        tokio::time::sleep(delay).await;
        flags.push("DI");
    }
    match d.abort {
        Some(AbortStatus::Http(s)) => Err(Failure::FaultAbort(s)),
        Some(AbortStatus::Grpc(g)) => Err(Failure::GrpcFaultAbort(grpc_code(&g))),
        None => Ok(()),
    }
}

/// A percentage roll (fault and mirror percentages): uniform in [0, 100),
/// in steps of 1/10,000.
pub fn percent_roll(rng: &mut fastrand::Rng) -> f64 {
    rng.u64(..1_000_000) as f64 / 10_000.0
}

/// The path after the route's `rewrite.uri`: a prefix match's prefix is
/// replaced; an exact, regex or no match replaces the whole path and keeps
/// the query string.
pub fn rewrite_path(route: &HttpRoute, path: &str) -> Option<String> {
    if let Some((re, with)) = &route.rewrite_regex {
        // Envoy's regex_rewrite: every match in the path, not the query.
        let (p, query) = match path.split_once('?') {
            Some((p, q)) => (p, format!("?{q}")),
            None => (path, String::new()),
        };
        let rewritten = re.0.replace_all(p, with.as_str());
        let slash = if rewritten.starts_with('/') { "" } else { "/" };
        return Some(format!("{slash}{rewritten}{query}"));
    }
    let uri = route.rewrite_uri.as_ref()?;
    let rest = route
        .matches
        .iter()
        .find_map(|m| match &m.uri {
            Some(routing::StrMatch::Prefix(p)) if path.starts_with(p.as_str()) => Some(&path[p.len()..]),
            _ => None,
        })
        .unwrap_or("");
    let query = path.split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
    Some(if rest.is_empty() {
        format!("{uri}{query}")
    } else {
        format!("{}{}", uri.trim_end_matches('/'), if rest.starts_with('/') || rest.starts_with('?') { rest.to_owned() } else { format!("/{rest}") })
    })
}

/// What the route does to the request going upstream: the normalized
/// path (rewritten, if the route says so), the authority rewrite, the
/// request header operations. Returns the rewritten path, for the access
/// log; a rewrite that does not make a valid path (a regex rewrite can
/// make anything) of at most 16 KiB is a bad request, never sent on
/// un-rewritten.
pub fn apply_to_request(parts: &mut http::request::Parts, route: &HttpRoute, path: &str) -> Result<Option<String>, Failure> {
    if let Ok(u) = path.parse() {
        parts.uri = u;
    }
    let rewritten = rewrite_path(route, path);
    if let Some(new) = &rewritten {
        match new.parse() {
            Ok(u) if new.len() <= 16 * 1024 => parts.uri = u,
            _ => {
                warn!(path, rewritten = %new, "the route's rewrite does not make a valid path: 400");
                return Err(Failure::BadRequest);
            }
        }
    }
    if let Some(a) = &route.rewrite_authority {
        if let Ok(v) = HeaderValue::from_str(a) {
            parts.headers.insert(header::HOST, v);
        }
    }
    apply_header_ops(&mut parts.headers, &route.request_headers);
    Ok(rewritten)
}

/// A route's header operations, in Istio's order: remove, set, add.
pub fn apply_header_ops(h: &mut HeaderMap, ops: &routing::HeaderOps) {
    for k in &ops.remove {
        h.remove(k.as_str());
    }
    for (k, v) in &ops.set {
        if let (Ok(k), Ok(v)) = (header::HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_bytes(v.as_bytes())) {
            h.insert(k, v);
        }
    }
    for (k, v) in &ops.add {
        if let (Ok(k), Ok(v)) = (header::HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_bytes(v.as_bytes())) {
            h.append(k, v);
        }
    }
}

/// What a route's CORS policy does with a request.
#[derive(Debug)]
pub enum CorsAction {
    /// Not a CORS request, or an origin not allowed: on as usual.
    Pass,
    /// A preflight answered here (200).
    Answer(Response<Body>),
    /// An allowed cross-origin request: on as usual, these set on the
    /// response.
    Decorate(Vec<(String, String)>),
}

/// Envoy's CORS filter for a route's `corsPolicy`: a request with an
/// `Origin` the policy allows gets `access-control-allow-origin` (that
/// origin), `-allow-credentials` and `-expose-headers`; a preflight
/// (`OPTIONS` with `access-control-request-method`) from it is answered
/// here with the allowed methods, headers and max age. A preflight from
/// another origin goes upstream (`unmatchedPreflights: FORWARD`) or is
/// answered without CORS headers (`IGNORE`).
pub fn cors(policy: &routing::Cors, method: &http::Method, headers: &HeaderMap) -> CorsAction {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else { return CorsAction::Pass };
    let allowed = policy.origins.iter().any(|m| m.matches(origin));
    let preflight = method == http::Method::OPTIONS && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut set = Vec::new();
    if allowed {
        set.push(("access-control-allow-origin".to_owned(), origin.to_owned()));
        if policy.credentials {
            set.push(("access-control-allow-credentials".to_owned(), "true".to_owned()));
        }
    }
    match (preflight, allowed) {
        (true, true) => {
            if !policy.methods.is_empty() {
                set.push(("access-control-allow-methods".to_owned(), policy.methods.join(",")));
            }
            if !policy.headers.is_empty() {
                set.push(("access-control-allow-headers".to_owned(), policy.headers.join(",")));
            }
            if let Some(age) = policy.max_age {
                set.push(("access-control-max-age".to_owned(), age.as_secs().to_string()));
            }
            let mut r = Response::new(full(""));
            for (k, v) in set {
                if let (Ok(k), Ok(v)) = (header::HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(&v)) {
                    r.headers_mut().insert(k, v);
                }
            }
            CorsAction::Answer(r)
        }
        (true, false) if !policy.forward_unmatched_preflights => CorsAction::Answer(Response::new(full(""))),
        (false, true) => {
            if !policy.expose.is_empty() {
                set.push(("access-control-expose-headers".to_owned(), policy.expose.join(",")));
            }
            CorsAction::Decorate(set)
        }
        _ => CorsAction::Pass,
    }
}

/// A stable 64-bit hash of a consistent-hash key.
pub fn key_hash(key: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

/// The request's consistent-hash key under `policy` (Istio
/// ConsistentHashLB: a header, a cookie, the client's address or a query
/// parameter), hashed; and the `Set-Cookie` to send back when the cookie
/// was absent and the policy has a `ttl`, so the client's next requests
/// carry it (`Max-Age` left out for a zero `ttl`: a session cookie).
pub fn request_hash(
    policy: &routing::TrafficPolicy,
    headers: &HeaderMap,
    path: &str,
    peer: std::net::IpAddr,
    rng: &mut fastrand::Rng,
) -> (Option<u64>, Option<HeaderValue>) {
    let Some(key) = &policy.hash else { return (None, None) };
    match key {
        routing::HashKey::Header(name) => {
            let v: Vec<&[u8]> = headers.get_all(name.as_str()).iter().map(HeaderValue::as_bytes).collect();
            ((!v.is_empty()).then(|| key_hash(&v.join(&b","[..]))), None)
        }
        routing::HashKey::SourceIp => (Some(key_hash(peer.to_string().as_bytes())), None),
        routing::HashKey::QueryParameter(q) => {
            let query = path.split_once('?').map(|(_, q)| q).unwrap_or("");
            let v = query.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k == q).then_some(v)
            });
            (v.map(|v| key_hash(v.as_bytes())), None)
        }
        routing::HashKey::Cookie { name, path: cookie_path, ttl, attributes } => {
            let found = headers.get_all(header::COOKIE).iter().map(|v| String::from_utf8_lossy(v.as_bytes())).find_map(|line| {
                line.split(';').find_map(|pair| {
                    let (k, v) = pair.trim().split_once('=')?;
                    (k == name).then(|| v.trim_matches('"').to_owned())
                })
            });
            if let Some(v) = found {
                return (Some(key_hash(v.as_bytes())), None);
            }
            let Some(ttl) = ttl else { return (None, None) };
            let value = format!("{:016x}", rng.u64(..));
            let mut cookie = format!("{name}=\"{value}\"");
            // Whole seconds, as Envoy: under one second is a session cookie.
            if ttl.as_secs() > 0 {
                cookie.push_str(&format!("; Max-Age={}", ttl.as_secs()));
            }
            if let Some(p) = cookie_path {
                cookie.push_str(&format!("; Path={p}"));
            }
            cookie.push_str("; HttpOnly");
            for (k, v) in attributes {
                match v {
                    Some(v) => cookie.push_str(&format!("; {k}={v}")),
                    None => cookie.push_str(&format!("; {k}")),
                }
            }
            (Some(key_hash(value.as_bytes())), HeaderValue::from_str(&cookie).ok())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use routing::{HttpMatch, StrMatch};
    use skiff_core::model::TargetPort;

    /// The cluster view of `yaml`, every object taken.
    fn snapshot(yaml: &str) -> Snapshot {
        let objects = skiff_core::k8s::parse_documents(yaml).unwrap();
        let snap = Snapshot::build(objects.into_iter().map(|o| ("t.yaml".to_owned(), o)).collect(), None);
        assert!(snap.rejected.is_empty(), "{:?}", snap.rejected);
        snap
    }

    /// Istio ambient's `istio.io/ingress-use-waypoint` (on the Service or
    /// its namespace): the ingress gateway reaches the Service through its
    /// waypoint, the Service's address as the target; a waypoint proxy
    /// (not ingress) and unlabelled Services go to the pods; a waypoint
    /// with no ready pod fails the request, never bypasses it.
    #[test]
    fn ingress_uses_the_waypoint_when_the_service_asks() {
        let yaml = |label: &str, waypoint_ready: bool| {
            format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{istio.io/use-waypoint: waypoint}}}}\n---\n\
                 apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: shop, labels: {{{label}}}}}\nspec: {{clusterIP: 10.96.0.9, selector: {{app: reviews}}, ports: [{{name: http, port: 9080, targetPort: 8080}}]}}\n---\n\
                 apiVersion: v1\nkind: Pod\nmetadata: {{name: reviews-1, namespace: shop, labels: {{app: reviews}}}}\nspec: {{containers: [{{name: c}}]}}\nstatus: {{phase: Running, podIP: 10.244.1.5}}\n---\n\
                 apiVersion: v1\nkind: Pod\nmetadata: {{name: waypoint-1, namespace: shop, labels: {{gateway.networking.k8s.io/gateway-name: waypoint}}}}\nspec: {{serviceAccountName: waypoint, containers: [{{name: c}}]}}\nstatus: {{phase: {}, podIP: 10.244.2.7}}\n",
                if waypoint_ready { "Running" } else { "Pending" }
            )
        };
        let dest = RouteDest { host: "reviews".into(), ..Default::default() };
        let at = |snap: &Snapshot, ingress: bool| -> Result<Vec<SocketAddrV4>, Failure> {
            resolve(snap, &dest, "shop", "istio-system", 9080, Outside { names: None, original_dst: None, ingress })
                .map(|r| r.endpoints.iter().map(|e| match e {
                    Endpoint::Waypoint(w, target) => {
                        assert_eq!(*target, "10.96.0.9:9080".parse().unwrap(), "the Service's address is the target");
                        SocketAddrV4::new(w.ip.unwrap(), 15008)
                    }
                    other => other.addr(),
                }).collect())
        };
        let labelled = snapshot(&yaml("istio.io/ingress-use-waypoint: \"true\"", true));
        assert_eq!(at(&labelled, true).unwrap(), vec!["10.244.2.7:15008".parse().unwrap()], "the gateway goes to the waypoint");
        assert_eq!(at(&labelled, false).unwrap(), vec!["10.244.1.5:8080".parse().unwrap()], "a waypoint goes to the pods");
        let plain = snapshot(&yaml("app: reviews", true));
        assert_eq!(at(&plain, true).unwrap(), vec!["10.244.1.5:8080".parse().unwrap()], "no label: straight to the pods, as in Istio");
        let down = snapshot(&yaml("istio.io/ingress-use-waypoint: \"true\"", false));
        assert!(matches!(at(&down, true), Err(Failure::NoHealthyUpstream)), "no ready waypoint: refused, not bypassed");
    }

    /// A VirtualService with only `tcp` routes makes no HTTP route (the
    /// default route stays), and one with only `http` routes does not hide
    /// another's `tcp` routes.
    #[test]
    fn http_and_tcp_routes_come_from_virtual_services_that_have_them() {
        let snap = snapshot(
            r#"
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {ports: [{name: http, port: 80}, {name: tcp, port: 5432}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: a-tcp-only, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {hosts: [db], tcp: [{match: [{port: 5432}], route: [{destination: {host: db-replica}}]}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: b-http-only, namespace: shop, creationTimestamp: "2025-01-01T00:00:00Z"}
spec: {hosts: [db], http: [{route: [{destination: {host: db-http}}]}]}
"#,
        );
        let svc = snap.services.get("shop/db").unwrap();
        let headers = Vec::new();
        let info = RequestInfo { method: "GET", path: "/", authority: "db", headers: &headers, port: 80, scheme: "http" };
        let Selected { vs, route, .. } = select(&snap, svc, &info, "shop");
        assert_eq!((vs.unwrap().name.as_str(), route.unwrap().destinations[0].host.as_str()), ("b-http-only", "db-http"));
        let (dest, _) = select_tcp(&snap, svc, 5432, "10.0.0.1".parse().unwrap(), "shop", &mut fastrand::Rng::with_seed(1));
        assert_eq!(dest.host, "db-replica", "the older http-only VirtualService does not hide the tcp routes");
        let (dest, _) = select_tcp(&snap, svc, 80, "10.0.0.1".parse().unwrap(), "shop", &mut fastrand::Rng::with_seed(1));
        assert_eq!(dest.host, "db.shop.svc.cluster.local", "no tcp route for the port: the Service itself");
    }

    /// A ServiceEntry's endpoints at a waypoint: STATIC addresses, DNS
    /// names as resolved, NONE the dialled address when the entry takes
    /// it; never loopback, link-local (cloud metadata) or a pod of the
    /// cluster, whatever a name resolves to.
    #[test]
    fn service_entry_endpoints_and_what_is_never_one() {
        let snap = snapshot(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: app}
spec: {containers: [{name: c}]}
status: {podIP: 10.244.1.5, phase: Running, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: egress}
spec: {hosts: [api.example.com], ports: [{number: 80, name: http, protocol: HTTP, targetPort: 443}], resolution: DNS}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: fixed, namespace: egress}
spec: {hosts: [fixed.example.com], ports: [{number: 80, name: http}], resolution: STATIC, endpoints: [{address: 192.0.2.7, labels: {v: a}}, {address: 192.0.2.8, labels: {v: b}}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: any, namespace: egress}
spec: {hosts: [any.example.com], addresses: [198.51.100.0/24], ports: [{number: 80, name: http}], resolution: NONE}
"#,
        );
        let dest = |host: &str| RouteDest { host: host.into(), weight: 100, ..Default::default() };
        let addrs = |r: Result<Resolved<'_>, Failure>| r.map(|r| r.endpoints.iter().map(|e| e.addr().to_string()).collect::<Vec<_>>());
        let names = |ips: &[&str]| HashMap::from([("api.example.com".to_owned(), ips.iter().map(|i| i.parse().unwrap()).collect::<Vec<Ipv4Addr>>())]);
        fn at<'a>(n: &'a HashMap<String, Vec<Ipv4Addr>>, dst: Option<&str>) -> Outside<'a> {
            Outside { names: Some(n), original_dst: dst.map(|d| d.parse().unwrap()), ingress: false }
        }
        let ok = names(&["203.0.113.9"]);
        assert_eq!(addrs(resolve(&snap, &dest("api.example.com"), "app", "egress", 80, at(&ok, None))).unwrap(), ["203.0.113.9:443"], "DNS, to the targetPort");
        assert_eq!(addrs(resolve(&snap, &dest("fixed.example.com"), "app", "egress", 80, at(&ok, None))).unwrap(), ["192.0.2.7:80", "192.0.2.8:80"]);
        assert_eq!(addrs(resolve(&snap, &dest("any.example.com"), "app", "egress", 80, at(&ok, Some("198.51.100.4:80")))).unwrap(), ["198.51.100.4:80"], "NONE: the dialled address");
        assert!(resolve(&snap, &dest("any.example.com"), "app", "egress", 80, at(&ok, Some("203.0.113.1:80"))).is_err(), "NONE: an address the entry does not take");
        assert!(resolve(&snap, &dest("any.example.com"), "app", "egress", 80, at(&ok, None)).is_err(), "NONE without a dialled address");
        for bad in ["127.0.0.1", "169.254.169.254", "10.244.1.5", "224.0.0.1"] {
            let n = names(&[bad]);
            assert!(resolve(&snap, &dest("api.example.com"), "app", "egress", 80, at(&n, None)).is_err(), "{bad} is never an endpoint");
        }
    }

    #[test]
    fn port_protocol_from_app_protocol_then_name() {
        #[rustfmt::skip]
        let cases = [
            (Some("grpc"), None, "http2"),
            (Some("kubernetes.io/h2c"), None, "http2"),
            (None, Some("http2-api"), "http2"),
            (None, Some("http-web"), "http"),
            (Some("HTTP"), Some("tcp"), "http"),
            (Some("mongo"), Some("http"), "http"),
            (None, Some("tcp-db"), "tcp"),
            (None, Some("redis"), "tcp"),
            (None, None, "tcp"),
        ];
        for (app, name, want) in cases {
            let p = ServicePort { name: name.map(String::from), port: 80, target_port: TargetPort::Number(80), app_protocol: app.map(String::from) };
            assert_eq!(port_protocol(&p), want, "{app:?} {name:?}");
        }
    }

    /// Istio HTTPRedirect: `uri`, `authority`, `scheme` and `port` or
    /// `derivePort` each replace their part of the URL; what they leave is
    /// the request's (scheme http at a waypoint). A scheme's default port
    /// is left out of the Location, as Envoy writes it.
    #[test]
    fn redirect_locations() {
        use skiff_core::routing::{Redirect, RedirectPort};
        let r = |uri: Option<&str>, authority: Option<&str>, scheme: Option<&str>, port: RedirectPort| Redirect {
            uri: uri.map(String::from),
            authority: authority.map(String::from),
            code: 301,
            scheme: scheme.map(String::from),
            port,
        };
        #[rustfmt::skip]
        let cases = [
            (r(Some("/new"), None, None, RedirectPort::Keep), "reviews", "http://reviews/new?q=1"),
            (r(Some("/new?x=2"), None, None, RedirectPort::Keep), "reviews", "http://reviews/new?x=2"),
            (r(None, None, Some("https"), RedirectPort::Keep), "reviews:80", "https://reviews/old?q=1"),
            (r(None, Some("example.com"), None, RedirectPort::Keep), "reviews:9080", "http://example.com/old?q=1"),
            (r(None, None, None, RedirectPort::Keep), "reviews:9080", "http://reviews:9080/old?q=1"),
            (r(None, None, Some("https"), RedirectPort::Keep), "reviews", "https://reviews/old?q=1"),
            (r(None, None, Some("https"), RedirectPort::FromProtocolDefault), "reviews:9080", "https://reviews/old?q=1"),
            (r(None, None, None, RedirectPort::FromProtocolDefault), "reviews:9080", "http://reviews/old?q=1"),
            (r(None, None, None, RedirectPort::FromRequestPort), "reviews", "http://reviews:9080/old?q=1"),
            (r(None, None, Some("https"), RedirectPort::Fixed(8443)), "reviews:9080", "https://reviews:8443/old?q=1"),
            (r(None, None, None, RedirectPort::Fixed(80)), "reviews:9080", "http://reviews/old?q=1"),
            (r(None, Some("[fd00::1]:8080"), None, RedirectPort::Fixed(81)), "reviews", "http://[fd00::1]:81/old?q=1"),
        ];
        for (redirect, authority, want) in cases {
            let route = HttpRoute { redirect: Some(redirect.clone()), ..Default::default() };
            let resp = local_response(&route, "http", authority, "/old?q=1", 9080).unwrap();
            assert_eq!(resp.status(), 301);
            assert_eq!(resp.headers()[header::LOCATION], want, "{redirect:?} from {authority}");
        }
        // A Host that is not an authority never reaches a Location.
        let route = HttpRoute { redirect: Some(r(Some("/new"), None, None, RedirectPort::Keep)), ..Default::default() };
        for bad in ["a@evil.example", "evil.example/x", "a b", ""] {
            assert_eq!(local_response(&route, "http", bad, "/", 80).unwrap().status(), 400, "{bad:?}");
        }
    }

    /// Istio HTTPRewrite.uriRegexRewrite (Envoy regex_rewrite): every
    /// match in the path replaced, `\N` capture groups, query kept.
    #[test]
    fn regex_rewrites() {
        let route = |pattern: &str, with: &str| {
            let v = format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r, namespace: s}}\nspec: {{hosts: [r], http: [{{rewrite: {{uriRegexRewrite: {{match: \"{pattern}\", rewrite: \"{with}\"}}}}, route: [{{destination: {{host: r}}}}]}}]}}\n");
            match &skiff_core::k8s::parse_documents(&v).unwrap()[0] {
                skiff_core::k8s::Object::VirtualService(v) => skiff_core::routing::virtual_service_from(v).unwrap().http.remove(0),
                o => panic!("{o:?}"),
            }
        };
        #[rustfmt::skip]
        let cases = [
            ("^/service/([^/]+)(/.*)$", "\\\\2/instance/\\\\1", "/service/foo/v1/api?x=1", "/v1/api/instance/foo?x=1"),
            ("/old/", "/new/", "/old/a/old/b", "/new/a/new/b"),
            ("^/v1", "/price$", "/v1/x", "/price$/x"),
            ("^/nomatch", "/x", "/path", "/path"),
        ];
        for (pattern, with, path, want) in cases {
            assert_eq!(rewrite_path(&route(pattern, with), path).as_deref(), Some(want), "{pattern} -> {with} on {path}");
        }
    }

    #[test]
    fn rewrites_replace_the_matched_prefix_or_the_whole_path() {
        let route = |m: Option<StrMatch>, rewrite: Option<&str>| HttpRoute {
            matches: vec![HttpMatch { uri: m, ..Default::default() }],
            rewrite_uri: rewrite.map(String::from),
            ..Default::default()
        };
        let prefix = |p: &str| Some(StrMatch::Prefix(p.into()));
        #[rustfmt::skip]
        let cases = [
            (prefix("/api"), Some("/v2"), "/api/items?x=1", Some("/v2/items?x=1")),
            (prefix("/api"), Some("/v2"), "/api?q", Some("/v2?q")),
            (prefix("/api"), Some("/"), "/api", Some("/")),
            (prefix("/api"), Some("/v2/"), "/apiary", Some("/v2/ary")),
            (prefix("/api/"), Some("/"), "/api/x", Some("/x")),
            (Some(StrMatch::Exact("/login".into())), Some("/auth/login"), "/login?next=/", Some("/auth/login?next=/")),
            (None, Some("/new"), "/old/path?k=v", Some("/new?k=v")),
            (prefix("/api"), None, "/api/x", None),
        ];
        for (m, rewrite, path, want) in cases {
            assert_eq!(rewrite_path(&route(m, rewrite), path).as_deref(), want, "{rewrite:?} {path}");
        }
    }

    /// Istio ConsistentHashLB keys: a header, a cookie (made when absent
    /// and a `ttl` is set; a session cookie for `0s`), the client's
    /// address, a query parameter. A request without its key has none.
    #[test]
    fn consistent_hash_keys() {
        let policy = |key: routing::HashKey| routing::TrafficPolicy { hash: Some(key), ..Default::default() };
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_static("jason"));
        h.append(header::COOKIE, HeaderValue::from_static("a=1; session=\"abc\""));
        let peer: std::net::IpAddr = "10.244.1.5".parse().unwrap();
        let mut rng = fastrand::Rng::with_seed(7);
        let mut hash = |p: &routing::TrafficPolicy, h: &HeaderMap, path: &str| request_hash(p, h, path, peer, &mut rng);
        let header = policy(routing::HashKey::Header("x-user".into()));
        assert_eq!(hash(&header, &h, "/").0, Some(key_hash(b"jason")));
        assert_eq!(hash(&header, &HeaderMap::new(), "/"), (None, None));
        let cookie = |ttl: Option<std::time::Duration>| {
            policy(routing::HashKey::Cookie { name: "session".into(), path: Some("/".into()), ttl, attributes: vec![("SameSite".into(), Some("Strict".into()))] })
        };
        assert_eq!(hash(&cookie(None), &h, "/").0, Some(key_hash(b"abc")));
        assert_eq!(hash(&cookie(None), &HeaderMap::new(), "/"), (None, None), "no ttl: no cookie made");
        let (made, set) = hash(&cookie(Some(std::time::Duration::from_secs(60))), &HeaderMap::new(), "/");
        let set = set.unwrap().to_str().unwrap().to_owned();
        let value = set.strip_prefix("session=\"").and_then(|r| r.split('"').next()).unwrap().to_owned();
        assert_eq!(made, Some(key_hash(value.as_bytes())), "the made cookie is this request's key");
        assert!(set.ends_with("; Max-Age=60; Path=/; HttpOnly; SameSite=Strict"), "{set}");
        let (_, session) = hash(&cookie(Some(std::time::Duration::ZERO)), &HeaderMap::new(), "/");
        assert!(!session.unwrap().to_str().unwrap().contains("Max-Age"), "a zero ttl makes a session cookie");
        assert_eq!(hash(&policy(routing::HashKey::SourceIp), &h, "/").0, Some(key_hash(b"10.244.1.5")));
        let query = policy(routing::HashKey::QueryParameter("user".into()));
        assert_eq!(hash(&query, &h, "/p?a=1&user=ann").0, Some(key_hash(b"ann")));
        assert_eq!(hash(&query, &h, "/p?a=1").0, None);
    }

    /// Istio CorsPolicy, as Envoy's CORS filter applies it.
    #[test]
    fn cors_preflights_and_decorations() {
        let policy = |forward: bool| routing::Cors {
            origins: vec![StrMatch::Exact("https://app.example".into()), StrMatch::Prefix("https://dev.".into())],
            methods: vec!["GET".into(), "POST".into()],
            headers: vec!["x-token".into()],
            expose: vec!["x-trace".into()],
            max_age: Some(std::time::Duration::from_secs(600)),
            credentials: true,
            forward_unmatched_preflights: forward,
        };
        let req = |origin: Option<&str>, preflight: bool| {
            let mut h = HeaderMap::new();
            if let Some(o) = origin {
                h.insert(header::ORIGIN, HeaderValue::from_str(o).unwrap());
            }
            if preflight {
                h.insert(header::ACCESS_CONTROL_REQUEST_METHOD, HeaderValue::from_static("POST"));
            }
            h
        };
        let options = http::Method::OPTIONS;
        match cors(&policy(true), &options, &req(Some("https://app.example"), true)) {
            CorsAction::Answer(r) => {
                assert_eq!(r.status(), 200);
                let h = r.headers();
                assert_eq!(h["access-control-allow-origin"], "https://app.example");
                assert_eq!(h["access-control-allow-methods"], "GET,POST");
                assert_eq!(h["access-control-allow-headers"], "x-token");
                assert_eq!(h["access-control-max-age"], "600");
                assert_eq!(h["access-control-allow-credentials"], "true");
            }
            o => panic!("{o:?}"),
        }
        match cors(&policy(true), &http::Method::GET, &req(Some("https://dev.example"), false)) {
            CorsAction::Decorate(set) => assert_eq!(
                set,
                [("access-control-allow-origin", "https://dev.example"), ("access-control-allow-credentials", "true"), ("access-control-expose-headers", "x-trace")]
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
            ),
            o => panic!("{o:?}"),
        }
        assert!(matches!(cors(&policy(true), &options, &req(Some("https://evil.example"), true)), CorsAction::Pass), "FORWARD");
        match cors(&policy(false), &options, &req(Some("https://evil.example"), true)) {
            CorsAction::Answer(r) => assert!(r.headers().get("access-control-allow-origin").is_none()),
            o => panic!("IGNORE: {o:?}"),
        }
        assert!(matches!(cors(&policy(true), &http::Method::GET, &req(Some("https://evil.example"), false)), CorsAction::Pass));
        assert!(matches!(cors(&policy(true), &options, &req(None, true)), CorsAction::Pass), "no Origin: not CORS");
    }
}
