//! VirtualService and DestinationRule: validated domain types and the pure
//! functions the waypoint routes with (matching, weighted choice, fault
//! decisions). Randomness is passed in, so every decision is testable.

use std::{collections::BTreeMap, time::Duration};

use crate::k8s;

/// A compiled regular expression that compares by its pattern.
#[derive(Clone, Debug)]
pub struct Regex(pub regex::Regex);

impl PartialEq for Regex {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

/// Istio's StringMatch.
#[derive(Clone, Debug, PartialEq)]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    /// Full match (RE2 semantics, anchored), as Envoy applies it.
    Regex(Regex),
    /// `{}` in a header or query parameter match: present, any value.
    Present,
}

impl StrMatch {
    pub fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(e) => v == e,
            StrMatch::Prefix(p) => v.starts_with(p.as_str()),
            StrMatch::Regex(r) => r.0.is_match(v),
            StrMatch::Present => true,
        }
    }

    fn matches_ci(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(e) => v.eq_ignore_ascii_case(e),
            StrMatch::Prefix(p) => v.as_bytes().get(..p.len()).is_some_and(|b| b.eq_ignore_ascii_case(p.as_bytes())),
            StrMatch::Regex(r) => r.0.is_match(v),
            StrMatch::Present => true,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct HttpMatch {
    pub uri: Option<StrMatch>,
    /// Matched against `http`: a waypoint receives plaintext HTTP (inside
    /// HBONE).
    pub scheme: Option<StrMatch>,
    pub authority: Option<StrMatch>,
    pub method: Option<StrMatch>,
    pub headers: Vec<(String, StrMatch)>,
    pub query_params: Vec<(String, StrMatch)>,
    pub without_headers: Vec<(String, StrMatch)>,
    pub port: Option<u16>,
    pub ignore_uri_case: bool,
    /// `match[].gateways`: where this match applies; None inherits the
    /// VirtualService's `gateways`.
    pub gateways: Option<Vec<Bind>>,
}

/// Where a VirtualService (or one of its matches) applies: `mesh` (every
/// waypoint) or one Gateway.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Bind {
    Mesh,
    Gateway { namespace: String, name: String },
}

impl Bind {
    /// A `gateways` entry, as Istio resolves it: `mesh`; `namespace/name`;
    /// a short name, in the VirtualService's namespace; the legacy
    /// `name.namespace.svc.cluster.local` (its first two labels).
    pub fn parse(entry: &str, vs_namespace: &str) -> Result<Bind, String> {
        if entry == "mesh" {
            return Ok(Bind::Mesh);
        }
        let (namespace, name) = match entry.split_once('/') {
            Some((ns, name)) => (ns.to_owned(), name.to_owned()),
            None => match entry.split_once('.') {
                Some((name, rest)) => (rest.split('.').next().unwrap_or_default().to_owned(), name.to_owned()),
                None => (vs_namespace.to_owned(), entry.to_owned()),
            },
        };
        let ok = |s: &str| is_dns1123_label(s) || (s.len() <= 253 && s.split('.').all(is_dns1123_label));
        if namespace == "." || namespace == "*" {
            return Err(format!("{entry:?}: the namespace of a Gateway must be named (not `{namespace}`)"));
        }
        if !ok(&namespace) || !ok(&name) {
            return Err(format!("{entry:?} is not a Gateway name (`name`, `namespace/name`) nor `mesh`"));
        }
        Ok(Bind::Gateway { namespace, name })
    }
}

impl std::fmt::Display for Bind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bind::Mesh => f.write_str("mesh"),
            Bind::Gateway { namespace, name } => write!(f, "{namespace}/{name}"),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouteDest {
    /// As written (short name, namespace-qualified or FQDN).
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<u16>,
    pub weight: u32,
    /// This destination's own header operations (`route[].headers`),
    /// applied when it is picked, before the route's.
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeaderOps {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum AbortStatus {
    Http(u16),
    /// gRPC status name or number.
    Grpc(String),
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fault {
    /// Delay and the percentage of requests it applies to.
    pub delay: Option<(Duration, f64)>,
    pub abort: Option<(AbortStatus, f64)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Retries {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub retry_on: Vec<String>,
    /// `retryIgnorePreviousHosts` (Istio's default: true): a retry goes to
    /// an endpoint not tried yet for this request, while there is one.
    pub ignore_previous_hosts: bool,
}

impl Retries {
    /// What Istio applies to a route that sets no `retries`: 2 retries on
    /// connection failures, refused streams and 503.
    pub fn istio_default() -> Retries {
        Retries {
            attempts: 2,
            per_try_timeout: None,
            retry_on: ["connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"]
                .map(String::from)
                .to_vec(),
            ignore_previous_hosts: true,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct HttpRoute {
    pub name: Option<String>,
    /// Empty: matches every request.
    pub matches: Vec<HttpMatch>,
    pub destinations: Vec<RouteDest>,
    pub rewrite_uri: Option<String>,
    /// `rewrite.uriRegexRewrite`: every match of the pattern in the path
    /// (not the query) replaced, `${N}` for capture group N.
    pub rewrite_regex: Option<(Regex, String)>,
    pub rewrite_authority: Option<String>,
    pub fault: Option<Fault>,
    pub timeout: Option<Duration>,
    pub retries: Option<Retries>,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    pub direct_response: Option<(u16, Vec<u8>)>,
    pub redirect: Option<Redirect>,
    /// Where to send copies of the request (`mirror` or `mirrors`), each
    /// for its share (percent).
    pub mirrors: Vec<(RouteDest, f64)>,
    pub cors: Option<Cors>,
}

/// `corsPolicy`, as Envoy's CORS filter applies it.
#[derive(Clone, Debug, PartialEq)]
pub struct Cors {
    /// Origins allowed (`Present` for a `*` in the deprecated `allowOrigin`).
    pub origins: Vec<StrMatch>,
    pub methods: Vec<String>,
    pub headers: Vec<String>,
    pub expose: Vec<String>,
    pub max_age: Option<Duration>,
    pub credentials: bool,
    /// `unmatchedPreflights: FORWARD` (the default): a preflight from an
    /// origin not allowed goes upstream; `IGNORE`: answered without CORS
    /// headers.
    pub forward_unmatched_preflights: bool,
}

/// `HTTPRedirect`: what replaces each part of the request's URL.
#[derive(Clone, Debug, PartialEq)]
pub struct Redirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub code: u16,
    /// `http` or `https`; None keeps the request's.
    pub scheme: Option<String>,
    pub port: RedirectPort,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RedirectPort {
    /// The request's authority's port, if it has one.
    Keep,
    Fixed(u16),
    /// `derivePort: FROM_PROTOCOL_DEFAULT`: 80 for http, 443 for https.
    FromProtocolDefault,
    /// `derivePort: FROM_REQUEST_PORT`: the port the request came in on.
    FromRequestPort,
}

impl Redirect {
    /// The Location for a request with `scheme`, `authority` (host and
    /// maybe port), `path` (with its query), received on `port`, as Envoy
    /// writes it: the query is kept unless `uri` has one; a port that is
    /// the scheme's default is left out, and so is the request's port when
    /// the scheme changes and it was the old scheme's default.
    pub fn location(&self, scheme: &str, authority: &str, path: &str, port: u16) -> String {
        let new_scheme = self.scheme.as_deref().unwrap_or(scheme);
        let authority = self.authority.as_deref().unwrap_or(authority);
        // The host, and the port written in the authority, if any
        // (`[v6]:port` keeps its brackets).
        let (host, written) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !p.is_empty() && (!h.contains(':') || h.ends_with(']')) => {
                (h, p.parse::<u16>().ok())
            }
            _ => (authority, None),
        };
        let default_of = |s: &str| if s == "https" { 443 } else { 80 };
        let default = default_of(new_scheme);
        let port = match self.port {
            RedirectPort::Keep if new_scheme != scheme && written == Some(default_of(scheme)) => None,
            RedirectPort::Keep => written,
            RedirectPort::Fixed(p) => Some(p),
            RedirectPort::FromProtocolDefault => Some(default),
            RedirectPort::FromRequestPort => Some(port),
        };
        let path = match &self.uri {
            Some(u) if u.contains('?') => u.clone(),
            Some(u) => match path.split_once('?') {
                Some((_, q)) => format!("{u}?{q}"),
                None => u.clone(),
            },
            None => path.to_owned(),
        };
        match port {
            Some(p) if p != default => format!("{new_scheme}://{host}:{p}{path}"),
            _ => format!("{new_scheme}://{host}{path}"),
        }
    }
}

/// An RFC 9110 token (header names, methods, cookie names): one or more
/// of the `tchar` characters.
fn is_http_token(v: &str) -> bool {
    !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Whether `a` can stand as an authority (`host`, `host:port`,
/// `[v6]:port`) in a Location: no userinfo, path or spaces.
pub fn is_authority(a: &str) -> bool {
    !a.is_empty() && a.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b))
}

/// Envoy's regex_rewrite substitution (RE2's: `\0`-`\9` a capture
/// group, `\\` a backslash) in the `regex` crate's replacement syntax
/// (`${N}`, `$$`). A group the pattern does not have, or another escape,
/// is refused (Envoy refuses such a config too).
fn regex_substitution(rewrite: &str, groups: usize) -> Result<String, String> {
    let mut out = String::with_capacity(rewrite.len());
    let mut chars = rewrite.chars();
    while let Some(c) = chars.next() {
        match c {
            '$' => out.push_str("$$"),
            '\\' => match chars.next() {
                Some('\\') => out.push('\\'),
                Some(d) if d.is_ascii_digit() => {
                    let n = d.to_digit(10).unwrap_or(0) as usize;
                    if n >= groups {
                        return Err(format!("\\{n}: the pattern has {} capture group(s)", groups.saturating_sub(1)));
                    }
                    out.push_str(&format!("${{{n}}}"));
                }
                other => return Err(format!("`\\{}` is not \\0-\\9 or \\\\", other.map(String::from).unwrap_or_default())),
            },
            c => out.push(c),
        }
    }
    Ok(out)
}

#[derive(Clone, Debug, PartialEq)]
pub struct VirtualService {
    pub namespace: String,
    pub name: String,
    pub hosts: Vec<String>,
    pub http: Vec<HttpRoute>,
    /// `tcp` routes: opaque TCP, by port and destination address.
    pub tcp: Vec<L4Route>,
    /// `tls` routes: TLS passed through, by SNI (each match has
    /// `sni_hosts`).
    pub tls: Vec<L4Route>,
    /// `skiff.dev/local-rate-limit.<route name>` annotations, by route name.
    pub route_rate_limits: BTreeMap<String, RateLimit>,
    /// Applies to mesh traffic (waypoints): `gateways` empty or naming
    /// `mesh`, or some match naming `mesh`.
    pub mesh: bool,
    /// `gateways`, resolved (empty in the object: `[mesh]`). A match's own
    /// `gateways` overrides it for that match.
    pub gateways: Vec<Bind>,
    /// Which proxies' namespaces see it (`exportTo`).
    pub export_to: ExportTo,
    /// `metadata.creationTimestamp` (RFC 3339): among VirtualServices for
    /// one host, the oldest applies (Istio), then by name.
    pub created: Option<String>,
}

/// A `tcp` or `tls` route: its matches (none: every connection where the
/// VirtualService applies) and weighted destinations.
#[derive(Clone, Debug, PartialEq)]
pub struct L4Route {
    pub matches: Vec<L4Match>,
    pub destinations: Vec<RouteDest>,
}

/// Istio `L4MatchAttributes` / `TLSMatchAttributes`: every condition set
/// must hold.
#[derive(Clone, Debug, PartialEq)]
pub struct L4Match {
    /// The port the client addressed (a gateway server's number).
    pub port: Option<u16>,
    /// Its own `gateways`, overriding the VirtualService's.
    pub gateways: Option<Vec<Bind>>,
    /// TLS: the SNI must be one of these (`*.suffix` allowed).
    pub sni_hosts: Vec<String>,
    /// The address the client connected to must be in one of these.
    pub destination_subnets: Vec<crate::policy::Cidr>,
}

impl L4Match {
    /// Whether the match's conditions other than SNI hold for a connection
    /// arriving at `at` on `port` for the address `dst`; `top`: the
    /// VirtualService's `gateways`.
    fn holds(&self, at: &Bind, top: &[Bind], port: u16, dst: std::net::IpAddr) -> bool {
        self.gateways.as_deref().unwrap_or(top).contains(at)
            && self.port.is_none_or(|p| p == port)
            && (self.destination_subnets.is_empty() || self.destination_subnets.iter().any(|c| c.contains(dst)))
    }
}

impl L4Route {
    /// Whether the route takes a connection arriving at `at` on `port`
    /// (for the address `dst`, with `sni` for TLS); `top`: the
    /// VirtualService's `gateways`.
    pub fn matches_at(&self, at: &Bind, top: &[Bind], port: u16, dst: std::net::IpAddr, sni: Option<&str>) -> bool {
        if self.matches.is_empty() {
            return top.contains(at);
        }
        self.matches.iter().any(|m| {
            m.holds(at, top, port, dst) && (m.sni_hosts.is_empty() || sni.is_some_and(|n| m.sni_hosts.iter().any(|h| sni_matches(h, n))))
        })
    }
}

impl L4Route {
    /// A `tls` route for `sni`: how specifically its most specific
    /// `sniHosts` entry of a match that holds takes the name (0 exact,
    /// then the longer `*.` suffix, `*` last), as Envoy picks among
    /// Istio's filter chains; None: no match holds.
    pub fn sni_rank(&self, at: &Bind, top: &[Bind], port: u16, dst: std::net::IpAddr, sni: &str) -> Option<(u8, usize)> {
        self.matches
            .iter()
            .filter(|m| m.holds(at, top, port, dst))
            .flat_map(|m| &m.sni_hosts)
            .filter(|h| sni_matches(h, sni))
            .map(|h| specificity(h))
            .min()
    }
}

/// Whether an SNI name is taken by a `sniHosts` entry (exact, or a
/// `*.suffix` wildcard, `*` all), case-insensitively.
pub fn sni_matches(pattern: &str, sni: &str) -> bool {
    wildcard_matches(pattern, &sni.trim_end_matches('.').to_ascii_lowercase())
}

/// Whether `host` (lower-case, no trailing dot) is taken by a host
/// pattern: exact, `*.suffix` (at least one label before the suffix), or
/// `*` — Envoy's domain matching, which Istio's gateways and TLS routes
/// use.
pub fn wildcard_matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        None => pattern == host,
    }
}

/// How specific a matching pattern is (lower is more): an exact name,
/// then the longest suffix, then `*` — Envoy's order of virtual hosts and
/// filter chains.
pub fn specificity(pattern: &str) -> (u8, usize) {
    match pattern {
        "*" => (2, 0),
        p if p.starts_with('*') => (1, usize::MAX - p.len()),
        _ => (0, 0),
    }
}

impl VirtualService {
    /// The first `tcp` route, or with `tls` the first `tls` route (by
    /// `sni`; none without one), that takes a connection arriving at `at`
    /// on `port` to `dst`.
    pub fn l4_route(&self, at: &Bind, port: u16, dst: std::net::IpAddr, tls: bool, sni: Option<&str>) -> Option<&L4Route> {
        let routes = if tls { &self.tls } else { &self.tcp };
        routes.iter().find(|r| r.matches_at(at, &self.gateways, port, dst, sni))
    }

    /// The order in which VirtualServices for one Service are tried: the
    /// Service's own namespace first, then the oldest (objects without a
    /// creation time, as in a manifests directory, after those with one),
    /// then by name.
    pub fn precedence(&self, svc_namespace: &str) -> (bool, bool, Option<String>, String) {
        (self.namespace != svc_namespace, self.created.is_none(), self.created.clone(), self.name.clone())
    }
}

/// Annotation on a Service: a local rate limit for all its requests through
/// the waypoint. Value: `<requests>/<s|m|h>`, e.g. `100/s`.
pub const ANNOTATION_RATE_LIMIT: &str = "skiff.dev/local-rate-limit";

/// A token bucket: `requests` tokens, refilled evenly over `per`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    pub requests: u32,
    pub per: Duration,
}

impl RateLimit {
    /// Parses `100/s`, `5/m`, `1000/h`.
    pub fn parse(s: &str) -> Option<RateLimit> {
        let (n, unit) = s.trim().split_once('/')?;
        let requests: u32 = n.trim().parse().ok().filter(|n| *n > 0)?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return None,
        };
        Some(RateLimit { requests, per })
    }
}

/// Token bucket state: `tokens` at `at`. Pure: the caller keeps the state
/// and passes the time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bucket {
    pub tokens: f64,
    pub at: std::time::Instant,
}

/// Takes one token if there is one; returns whether the request may pass.
pub fn take_token(limit: &RateLimit, b: &mut Bucket, now: std::time::Instant) -> bool {
    let rate = limit.requests as f64 / limit.per.as_secs_f64();
    let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
    b.tokens = (b.tokens + elapsed * rate).min(limit.requests as f64);
    b.at = now;
    if b.tokens >= 1.0 {
        b.tokens -= 1.0;
        true
    } else {
        false
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoadBalancer {
    #[default]
    RoundRobin,
    LeastRequest,
    Random,
}

/// Limits that make a destination answer 503 (flag UO) instead of queueing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConnectionPool {
    pub max_connections: Option<u32>,
    pub http1_max_pending_requests: Option<u32>,
    pub http2_max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub max_retries: Option<u32>,
}

impl ConnectionPool {
    /// Concurrent requests allowed to the destination: for HTTP/1.1,
    /// connections plus the pending queue; for HTTP/2, max requests.
    pub fn max_in_flight(&self, h2: bool) -> Option<u32> {
        if h2 {
            return self.http2_max_requests;
        }
        match (self.max_connections, self.http1_max_pending_requests) {
            (None, None) => None,
            (c, p) => Some(c.unwrap_or(1024).saturating_add(p.unwrap_or(1024))),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct OutlierDetection {
    pub consecutive_5xx: Option<u32>,
    pub consecutive_gateway: Option<u32>,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

/// `loadBalancer.consistentHash`: what a request's endpoint is chosen by.
/// Requests with the same key go to the same endpoint while it is healthy
/// (rendezvous hashing: when endpoints come or go, only the keys of those
/// endpoints move).
#[derive(Clone, Debug, PartialEq)]
pub enum HashKey {
    Header(String),
    /// A cookie; when it is absent and `ttl` is set, the proxy makes one
    /// (a session cookie for a zero `ttl`) and sets it on the response.
    Cookie { name: String, path: Option<String>, ttl: Option<Duration>, attributes: Vec<(String, Option<String>)> },
    SourceIp,
    QueryParameter(String),
}

/// A DestinationRule's `tls` (Istio `ClientTLSSettings`): what the proxy
/// speaks to the destination's endpoints, inside HBONE for a pod in the
/// mesh, over plain TCP for one outside it or a ServiceEntry's endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClientTls {
    pub mode: TlsMode,
    /// `caCertificates`: a PEM file the proxy reads. With neither it nor
    /// `credential_name`, the system's root certificates (Istio: "the OS
    /// CA certificates").
    pub ca_certificates: Option<String>,
    /// `credentialName`: a Secret in the proxy's own namespace (`cacert`
    /// or `ca.crt`; for MUTUAL also `cert`/`key` or `tls.crt`/`tls.key`).
    pub credential_name: Option<String>,
    /// `clientCertificate` and `privateKey` (MUTUAL without a
    /// credentialName): PEM files the proxy reads.
    pub client_certificate: Option<String>,
    pub private_key: Option<String>,
    /// The server certificate must carry one of these; empty: the SNI
    /// name (Istio's automatic SAN validation).
    pub subject_alt_names: Vec<String>,
    /// Empty: the upstream request's host (Istio's automatic SNI).
    pub sni: Option<String>,
    pub insecure_skip_verify: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TlsMode {
    /// Plain bytes (inside HBONE for a pod in the mesh).
    Disable,
    /// TLS origination: the proxy verifies the server.
    Simple,
    /// TLS origination with the proxy's client certificate.
    Mutual,
    /// The mesh's own mutual TLS: HBONE, as without a `tls` (to an
    /// endpoint outside the mesh: plain, as Istio falls back).
    IstioMutual,
}

impl ClientTls {
    /// Whether the proxy originates TLS (SIMPLE or MUTUAL).
    pub fn originates(&self) -> bool {
        matches!(self.mode, TlsMode::Simple | TlsMode::Mutual)
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrafficPolicy {
    /// `tls`, where it says to originate TLS or speak plaintext; None:
    /// the mesh's mutual TLS (HBONE).
    pub tls: Option<ClientTls>,
    pub load_balancer: LoadBalancer,
    /// Set: the endpoint is chosen by this key (`load_balancer` is then
    /// only used when a request has no key).
    pub hash: Option<HashKey>,
    pub connection_pool: ConnectionPool,
    pub outlier: Option<OutlierDetection>,
    /// `portLevelSettings`: per Service port, over this policy.
    pub ports: BTreeMap<u16, TrafficPolicy>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct DestinationRule {
    pub namespace: String,
    pub name: String,
    pub host: String,
    /// Subset name → pod labels.
    pub subsets: BTreeMap<String, BTreeMap<String, String>>,
    pub traffic_policy: TrafficPolicy,
    /// Per-subset policies (whole replacement of the top-level one, as Istio
    /// merges per field: here the subset's set fields win).
    pub subset_policies: BTreeMap<String, TrafficPolicy>,
    /// Which proxies' namespaces see it (`exportTo`).
    pub export_to: ExportTo,
    /// `metadata.creationTimestamp`: several rules for one host in one
    /// namespace merge oldest first.
    pub created: Option<String>,
    /// The `trafficPolicy` and subsets' policies as written, for merging.
    pub spec_policy: Option<k8s::TrafficPolicySpec>,
    pub spec_subset_policies: BTreeMap<String, k8s::TrafficPolicySpec>,
}

/// `exportTo` of a VirtualService or DestinationRule: the namespaces whose
/// proxies (here: waypoints) see the object. Istio's default, with no
/// `exportTo` and no mesh-wide default set, is every namespace.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum ExportTo {
    #[default]
    All,
    /// `.` (resolved to the object's own namespace) and namespace names.
    Namespaces(std::collections::BTreeSet<String>),
}

impl ExportTo {
    /// Reads `exportTo` as Istio validates it (`validateExportTo`): `.`,
    /// `*` or a namespace name (a DNS-1123 label); no duplicate (`.` and
    /// the object's own namespace count as one); `*` alone; `~` (no one)
    /// is for ServiceEntries only.
    pub fn parse(entries: &[String], own_ns: &str) -> Result<ExportTo, FieldError> {
        if entries.is_empty() {
            return Ok(ExportTo::All);
        }
        let mut set = std::collections::BTreeSet::new();
        for (i, e) in entries.iter().enumerate() {
            let field = format!("spec.exportTo[{i}]");
            let key = match e.as_str() {
                "*" => "*".to_owned(),
                "." => own_ns.to_owned(),
                "~" => return Err((field, "`~` (export to no one) is only allowed on a ServiceEntry".into())),
                ns if is_dns1123_label(ns) => ns.to_owned(),
                other => return Err((field, format!("{other:?} is not `.`, `*` or a namespace name"))),
            };
            if !set.insert(key) {
                return Err((field, format!("{e:?} is listed twice (`.` is the object's own namespace, {own_ns:?})")));
            }
        }
        if set.contains("*") {
            if set.len() > 1 {
                return Err(("spec.exportTo".into(), "`*` exports to every namespace: it cannot be listed with others".into()));
            }
            return Ok(ExportTo::All);
        }
        Ok(ExportTo::Namespaces(set))
    }

    /// Whether a proxy in namespace `ns` sees the object.
    pub fn visible_to(&self, ns: &str) -> bool {
        match self {
            ExportTo::All => true,
            ExportTo::Namespaces(set) => set.contains(ns),
        }
    }
}

/// A DNS-1123 label (a Kubernetes namespace name): 1–63 of `a-z0-9-`,
/// starting and ending alphanumeric.
fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl DestinationRule {
    /// The policy in force for a subset (or the whole host) on a port:
    /// subset over host, port-level over both.
    pub fn policy_for(&self, subset: Option<&str>, port: u16) -> &TrafficPolicy {
        let p = subset.and_then(|s| self.subset_policies.get(s)).unwrap_or(&self.traffic_policy);
        p.ports.get(&port).unwrap_or(p)
    }
}

/// The host of a canonical authority (`host[:port]`, `[v6]:port`): without
/// its port.
pub fn host_of(authority: &str) -> &str {
    match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && (!h.starts_with('[') || h.ends_with(']')) => h,
        _ => authority,
    }
}

/// What routing looks at in a request (header names lower-case).
#[derive(Clone, Debug, Default)]
pub struct RequestInfo<'a> {
    pub method: &'a str,
    /// Path and query, as sent.
    pub path: &'a str,
    pub authority: &'a str,
    pub headers: &'a [(String, String)],
    pub port: u16,
    /// `http` or `https` (empty: `http`, what a waypoint receives inside
    /// HBONE).
    pub scheme: &'a str,
}

impl RequestInfo<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn query(&self, name: &str) -> Option<&str> {
        let q = self.path.split_once('?')?.1;
        q.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then_some(v)
        })
    }
}

impl HttpMatch {
    pub fn matches(&self, r: &RequestInfo<'_>) -> bool {
        let scheme = if r.scheme.is_empty() { "http" } else { r.scheme };
        if self.scheme.as_ref().is_some_and(|s| !s.matches(scheme)) {
            return false;
        }
        let path_only = r.path.split('?').next().unwrap_or("");
        if let Some(m) = &self.uri {
            let ok = if self.ignore_uri_case { m.matches_ci(path_only) } else { m.matches(path_only) };
            if !ok {
                return false;
            }
        }
        if self.authority.as_ref().is_some_and(|m| !m.matches(r.authority)) {
            return false;
        }
        if self.method.as_ref().is_some_and(|m| !m.matches(r.method)) {
            return false;
        }
        if self.port.is_some_and(|p| p != r.port) {
            return false;
        }
        if !self.headers.iter().all(|(k, m)| r.header(k).is_some_and(|v| m.matches(v))) {
            return false;
        }
        if !self.query_params.iter().all(|(k, m)| r.query(k).is_some_and(|v| m.matches(v))) {
            return false;
        }
        // withoutHeaders: the request must not have a matching header.
        !self.without_headers.iter().any(|(k, m)| r.header(k).is_some_and(|v| m.matches(v)))
    }
}

impl HttpRoute {
    /// The route as it applies at `at`: only the matches that apply there
    /// (what rewrites look at). `top`: the VirtualService's `gateways`.
    pub fn at(&self, at: &Bind, top: &[Bind]) -> HttpRoute {
        let mut r = self.clone();
        r.matches.retain(|m| m.gateways.as_deref().unwrap_or(top).contains(at));
        r
    }

    /// Whether the route takes the request where it arrived (`at`): a
    /// route without matches wherever the VirtualService (`top`) applies;
    /// one with matches when a match that applies there matches it.
    pub fn matches_at(&self, r: &RequestInfo<'_>, at: &Bind, top: &[Bind]) -> bool {
        if self.matches.is_empty() {
            return top.contains(at);
        }
        self.matches.iter().any(|m| m.gateways.as_deref().unwrap_or(top).contains(at) && m.matches(r))
    }
}

impl VirtualService {
    /// The first `http` route (in order) taking the request, for mesh
    /// traffic (at a waypoint).
    pub fn route(&self, r: &RequestInfo<'_>) -> Option<&HttpRoute> {
        self.route_at(r, &Bind::Mesh)
    }

    /// The first `http` route (in order) taking the request that arrived
    /// at `at` (the mesh, or a Gateway).
    pub fn route_at(&self, r: &RequestInfo<'_>, at: &Bind) -> Option<&HttpRoute> {
        self.route_index_at(r, at).map(|i| &self.http[i])
    }

    /// [`Self::route_at`]'s index in `http`.
    pub fn route_index_at(&self, r: &RequestInfo<'_>, at: &Bind) -> Option<usize> {
        self.http.iter().position(|h| h.matches_at(r, at, &self.gateways))
    }

    /// Whether it applies at `at` at all: its `gateways` name it, or one of
    /// its matches' does.
    pub fn binds(&self, at: &Bind) -> bool {
        let l4 = self.tcp.iter().chain(&self.tls).flat_map(|r| &r.matches).any(|m| m.gateways.as_ref().is_some_and(|g| g.contains(at)));
        self.gateways.contains(at) || l4 || self.http.iter().flat_map(|h| &h.matches).any(|m| m.gateways.as_ref().is_some_and(|g| g.contains(at)))
    }

    /// Whether this VirtualService applies, at a waypoint in `proxy_ns`,
    /// to the Service `name.namespace`: bound to the mesh, exported to the
    /// waypoint's namespace, and its `hosts` name the Service.
    pub fn applies_to(&self, name: &str, namespace: &str, proxy_ns: &str) -> bool {
        self.mesh && self.export_to.visible_to(proxy_ns) && self.hosts.iter().any(|h| host_matches(h, &self.namespace, name, namespace))
    }
}

/// Istio's root namespace (mesh-wide configuration) by default.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// The DestinationRule that applies to the Service `name.namespace` for a
/// proxy in `client_ns`, as Istio looks it up: among the rules exported to
/// the proxy's namespace, the proxy's namespace first, then the Service's
/// own, then the root namespace; within one, an exact host before a
/// wildcard (the longer wildcard first). A DestinationRule in another
/// tenant's namespace never applies.
///
/// Several rules for one host in that namespace are merged as Istio merges
/// them (oldest first, by name without a creation time): subsets of later
/// rules with new names are added; the top-level traffic policy is the
/// first rule's that has one.
pub fn destination_rule_for<'a>(drs: &'a [DestinationRule], name: &str, namespace: &str, client_ns: &str) -> Option<std::borrow::Cow<'a, DestinationRule>> {
    let rank = |dr: &DestinationRule| {
        let tier = if dr.namespace == client_ns {
            0
        } else if dr.namespace == namespace {
            1
        } else {
            2
        };
        // Exact before wildcard; among wildcards the longer suffix.
        let specificity = if dr.host.starts_with('*') { usize::MAX - dr.host.len() } else { 0 };
        (tier, specificity)
    };
    let candidates: Vec<&DestinationRule> =
        drs.iter()
            .filter(|dr| [client_ns, namespace, DEFAULT_ROOT_NAMESPACE].contains(&dr.namespace.as_str()))
            .filter(|dr| dr.export_to.visible_to(client_ns) && host_matches(&dr.host, &dr.namespace, name, namespace))
            .collect();
    let best = candidates.iter().map(|dr| (rank(dr), dr.namespace.as_str())).min()?;
    let mut group: Vec<&DestinationRule> = candidates.into_iter().filter(|dr| (rank(dr), dr.namespace.as_str()) == best).collect();
    group.sort_by(|a, b| (a.created.is_none(), &a.created, &a.name).cmp(&(b.created.is_none(), &b.created, &b.name)));
    match group.as_slice() {
        [one] => Some(std::borrow::Cow::Borrowed(*one)),
        _ => Some(std::borrow::Cow::Owned(merge_destination_rules(&group))),
    }
}

/// Istio's merge of several DestinationRules for one host (oldest first):
/// the first rule, plus the subsets of the others whose names are new;
/// the first top-level traffic policy set wins. Subset policies are taken
/// over the merged top-level one.
fn merge_destination_rules(group: &[&DestinationRule]) -> DestinationRule {
    let mut out = group[0].clone();
    for d in &group[1..] {
        for (subset, labels) in &d.subsets {
            if !out.subsets.contains_key(subset) {
                out.subsets.insert(subset.clone(), labels.clone());
                if let Some(spec) = d.spec_subset_policies.get(subset) {
                    out.spec_subset_policies.insert(subset.clone(), spec.clone());
                }
            }
        }
        if out.spec_policy.is_none() && d.spec_policy.is_some() {
            out.spec_policy = d.spec_policy.clone();
        }
    }
    // Each part was validated when its rule was taken: these convert.
    out.traffic_policy = traffic_policy("spec.trafficPolicy", out.spec_policy.as_ref(), &TrafficPolicy::default()).unwrap_or_default();
    out.subset_policies = out
        .spec_subset_policies
        .iter()
        .filter_map(|(n, spec)| Some((n.clone(), traffic_policy("spec.subsets", Some(spec), &out.traffic_policy).ok()?)))
        .collect();
    out
}

/// Whether `host` (as written in an object in `obj_ns`) names the Service
/// `name.namespace`: short names resolve in the object's namespace;
/// `name.ns`, `name.ns.svc`, FQDNs and `*` / `*.suffix` wildcards work.
///
/// DNS names compare case-insensitively: hosts are lowercased when a
/// VirtualService or DestinationRule is read, and Service names are
/// lowercase, so nothing is lowercased here, per request.
pub fn host_matches(host: &str, obj_ns: &str, name: &str, namespace: &str) -> bool {
    if host == "*" {
        return true;
    }
    // A dotted name is a ServiceEntry's host (a Service's name is a DNS
    // label): matched as written, or by a `*.suffix` wildcard.
    if name.contains('.') {
        return wildcard_matches(host, name);
    }
    let fqdn = format!("{name}.{namespace}.svc.cluster.local");
    if let Some(suffix) = host.strip_prefix('*') {
        return fqdn.ends_with(suffix);
    }
    let full = match host.matches('.').count() {
        0 => format!("{host}.{obj_ns}.svc.cluster.local"),
        1 => format!("{host}.svc.cluster.local"),
        2 if host.ends_with(".svc") => format!("{host}.cluster.local"),
        _ => host.to_owned(),
    };
    full == fqdn
}

/// The sum of the destinations' weights (relative weights: the roll for
/// [`pick_weighted`] is uniform in `0..total_weight`).
pub fn total_weight(dests: &[RouteDest]) -> u32 {
    dests.iter().map(|d| d.weight).sum()
}

/// Weighted choice: `roll` in `0..total_weight(dests)` (uniform) picks the
/// destination whose cumulative weight range holds it. Weights are
/// relative (Istio: they need not add to 100).
pub fn pick_weighted(dests: &[RouteDest], roll: u32) -> Option<&RouteDest> {
    let mut acc = 0;
    for d in dests {
        acc += d.weight;
        if roll < acc {
            return Some(d);
        }
    }
    dests.last()
}

/// What a route's fault does to one request.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultDecision {
    pub delay: Option<Duration>,
    pub abort: Option<AbortStatus>,
}

/// Decides a request's faults; `delay_roll` and `abort_roll` are uniform
/// in [0, 100).
pub fn fault_decision(f: &Fault, delay_roll: f64, abort_roll: f64) -> FaultDecision {
    FaultDecision {
        delay: f.delay.as_ref().and_then(|(d, pct)| (delay_roll < *pct).then_some(*d)),
        abort: f.abort.as_ref().and_then(|(s, pct)| (abort_roll < *pct).then(|| s.clone())),
    }
}

/// Parses a protobuf-style duration: `1.5s`, `100ms`, `2m`, `1h`, `250us`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = s.find(|c: char| c.is_ascii_alphabetic()).map(|i| s.split_at(i))?;
    let n: f64 = num.parse().ok().filter(|n: &f64| *n >= 0.0 && n.is_finite())?;
    let secs = match unit {
        "h" => n * 3600.0,
        "m" => n * 60.0,
        "s" => n,
        "ms" => n / 1e3,
        "us" | "µs" => n / 1e6,
        "ns" => n / 1e9,
        _ => return None,
    };
    // Bounded: a year is longer than any timeout anyone means, and keeps
    // `Instant + duration` from overflowing.
    Duration::try_from_secs_f64(secs).ok().filter(|d| *d <= Duration::from_secs(365 * 24 * 3600))
}

type FieldError = (String, String);

fn str_match(field: &str, m: &k8s::StringMatchSpec) -> Result<StrMatch, FieldError> {
    match (&m.exact, &m.prefix, &m.regex) {
        (Some(e), None, None) => Ok(StrMatch::Exact(e.clone())),
        (None, Some(p), None) => Ok(StrMatch::Prefix(p.clone())),
        (None, None, Some(r)) => regex::Regex::new(&format!("^(?:{r})$"))
            .map(|re| StrMatch::Regex(Regex(re)))
            .map_err(|e| (format!("{field}.regex"), format!("invalid regex: {e}"))),
        _ => Err((field.to_owned(), "exactly one of exact, prefix, regex".into())),
    }
}

/// A header or query parameter match: `{}` (no exact, prefix or regex)
/// checks that it is present (Istio HTTPMatchRequest.headers: "To provide
/// an empty value, use {}"; Envoy's present_match).
fn present_or_str_match(field: &str, m: &k8s::StringMatchSpec) -> Result<StrMatch, FieldError> {
    if m.exact.is_none() && m.prefix.is_none() && m.regex.is_none() {
        return Ok(StrMatch::Present);
    }
    str_match(field, m)
}

fn duration(field: &str, s: &Option<String>) -> Result<Option<Duration>, FieldError> {
    s.as_deref()
        .map(|v| parse_duration(v).ok_or_else(|| (field.to_owned(), format!("{v:?} is not a duration (e.g. 1.5s, 100ms)"))))
        .transpose()
}

/// `retryOn` values Skiff honours (Envoy's, as Istio passes them on):
/// HTTP conditions, gRPC status names and HTTP status codes.
const RETRY_ON: &[&str] = &[
    "5xx", "gateway-error", "reset", "connect-failure", "retriable-4xx", "refused-stream", "retriable-status-codes",
    "cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable",
];

/// Each comma-separated `retryOn` value must be one Skiff honours: Envoy
/// values it does not implement and unknown values are refused, not
/// ignored.
fn retry_on_valid(field: &str, on: &str) -> Result<(), FieldError> {
    for v in on.split(',').map(str::trim).filter(|v| !v.is_empty()) {
        let code = v.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c));
        if !code && !RETRY_ON.contains(&v) {
            let why = match v {
                "envoy-ratelimited" | "retriable-headers" | "http3-post-connect-failure" | "reset-before-request" => "not supported by Skiff",
                _ => "not a retryOn value",
            };
            return Err((field.to_owned(), format!("{v:?}: {why} (supported: {}, or an HTTP status code)", RETRY_ON.join(", "))));
        }
    }
    Ok(())
}

/// A percentage field; `absent` is what its absence means (Istio: 0 for a
/// fault's delay and abort — no request is faulted — and 100 for
/// `mirrorPercentage`).
fn percent(field: &str, p: &Option<k8s::Percent>, legacy: Option<u32>, absent: f64) -> Result<f64, FieldError> {
    let v = match (p, legacy) {
        (Some(p), _) => p.value,
        (None, Some(l)) => l as f64,
        (None, None) => absent,
    };
    if !(0.0..=100.0).contains(&v) {
        return Err((field.to_owned(), format!("{v} is not a percentage (0-100)")));
    }
    Ok(v)
}

/// Header operations, checked as Envoy would take them: names are HTTP
/// tokens (so no pseudo-headers), values carry no control characters, and
/// `%` starts an Envoy substitution (`%DOWNSTREAM_REMOTE_ADDRESS%`), which
/// Skiff does not evaluate: a value with one is refused rather than sent
/// as written; `%%` is a literal `%`, as in Envoy.
fn header_ops(field: &str, h: &Option<k8s::HeaderOperations>) -> Result<HeaderOps, FieldError> {
    let Some(h) = h else { return Ok(HeaderOps::default()) };
    let name = |f: String, k: &str| -> Result<String, FieldError> {
        // A token without `%` (an Envoy substitution).
        if !is_http_token(k) || k.contains('%') {
            return Err((f, format!("{k:?} is not an HTTP header name")));
        }
        Ok(k.to_ascii_lowercase())
    };
    let value = |f: String, v: &str| -> Result<String, FieldError> {
        if v.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err((f, format!("{v:?}: control characters are not allowed in a header value")));
        }
        let unescaped = v.replace("%%", "");
        if unescaped.contains('%') {
            return Err((f, format!("{v:?}: Envoy substitutions (`%...%`) are not evaluated by Skiff; write `%%` for a literal `%`")));
        }
        Ok(v.replace("%%", "%"))
    };
    let pairs = |op: &str, m: &BTreeMap<String, String>| -> Result<Vec<(String, String)>, FieldError> {
        m.iter().map(|(k, v)| Ok((name(format!("{field}.{op}"), k)?, value(format!("{field}.{op}.{k}"), v)?))).collect()
    };
    Ok(HeaderOps {
        set: pairs("set", &h.set)?,
        add: pairs("add", &h.add)?,
        remove: h.remove.iter().enumerate().map(|(i, k)| name(format!("{field}.remove[{i}]"), k)).collect::<Result<_, _>>()?,
    })
}

fn kv_matches(field: &str, m: &BTreeMap<String, k8s::StringMatchSpec>) -> Result<Vec<(String, StrMatch)>, FieldError> {
    m.iter().map(|(k, v)| Ok((k.to_ascii_lowercase(), present_or_str_match(&format!("{field}.{k}"), v)?))).collect()
}

/// Istio CorsPolicy (validateCORSPolicy): origins as StringMatch
/// (`allowOrigins`, or the deprecated exact `allowOrigin`, `*` meaning
/// any), methods and header names as HTTP tokens (`*` allowed), `maxAge`
/// in whole seconds, `unmatchedPreflights` FORWARD or IGNORE.
fn cors_policy(field: &str, c: &k8s::CorsPolicySpec) -> Result<Cors, FieldError> {
    let token = |f: String, v: &str| -> Result<String, FieldError> {
        if !is_http_token(v) {
            return Err((f, format!("{v:?} is not an HTTP token")));
        }
        Ok(v.to_owned())
    };
    let list = |name: &str, l: &[String]| -> Result<Vec<String>, FieldError> {
        l.iter().enumerate().map(|(i, v)| token(format!("{field}.{name}[{i}]"), v)).collect()
    };
    let origins = if !c.allow_origins.is_empty() {
        c.allow_origins.iter().enumerate().map(|(i, m)| str_match(&format!("{field}.allowOrigins[{i}]"), m)).collect::<Result<Vec<_>, _>>()?
    } else {
        c.allow_origin.iter().map(|o| if o == "*" { StrMatch::Present } else { StrMatch::Exact(o.clone()) }).collect()
    };
    let max_age = duration(&format!("{field}.maxAge"), &c.max_age)?;
    if max_age.is_some_and(|d| d.subsec_nanos() != 0) {
        return Err((format!("{field}.maxAge"), "whole seconds only (Istio's validation)".into()));
    }
    let forward_unmatched_preflights = match c.unmatched_preflights.as_deref() {
        None | Some("UNSPECIFIED") | Some("FORWARD") => true,
        Some("IGNORE") => false,
        Some(o) => return Err((format!("{field}.unmatchedPreflights"), format!("{o:?}: FORWARD or IGNORE"))),
    };
    Ok(Cors {
        origins,
        methods: list("allowMethods", &c.allow_methods)?,
        headers: list("allowHeaders", &c.allow_headers)?,
        expose: list("exposeHeaders", &c.expose_headers)?,
        max_age,
        credentials: c.allow_credentials == Some(true),
        forward_unmatched_preflights,
    })
}

/// Validates and converts a VirtualService; the error names the field.
pub fn virtual_service_from(vs: &k8s::VirtualService) -> Result<VirtualService, FieldError> {
    let namespace = vs.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = vs.metadata.name.clone().unwrap_or_default();
    if vs.spec.hosts.is_empty() {
        return Err(("spec.hosts".into(), "at least one host is required".into()));
    }
    // `gateways`: empty means `mesh`; a VirtualService (or a match) bound
    // only to Gateways never applies to mesh traffic (Istio
    // VirtualService.gateways, HTTPMatchRequest.gateways).
    let binds = |field: &str, list: &[String]| -> Result<Vec<Bind>, FieldError> {
        let mut out = Vec::new();
        for (i, g) in list.iter().enumerate() {
            let b = Bind::parse(g, &namespace).map_err(|m| (format!("{field}[{i}]"), m))?;
            if !out.contains(&b) {
                out.push(b);
            }
        }
        Ok(out)
    };
    let gateways = if vs.spec.gateways.is_empty() { vec![Bind::Mesh] } else { binds("spec.gateways", &vs.spec.gateways)? };
    let top_mesh = gateways.contains(&Bind::Mesh);
    for (i, h) in vs.spec.hosts.iter().enumerate() {
        // A wildcard is `*` or a leading `*.` label (Istio's host syntax).
        let wildcard_ok = h == "*" || (h.starts_with("*.") && !h[1..].contains('*'));
        if h.contains('*') && !wildcard_ok {
            return Err((format!("spec.hosts[{i}]"), format!("{h:?}: a wildcard host is `*` or starts with `*.`")));
        }
    }
    let mut http = Vec::new();
    let mut mesh_match = false;
    for (i, h) in vs.spec.http.iter().enumerate() {
        let f = |s: &str| format!("spec.http[{i}].{s}");
        let mut matches = Vec::new();
        for (j, m) in h.matches.iter().enumerate() {
            let g = |s: &str| format!("spec.http[{i}].match[{j}].{s}");
            let own = if m.gateways.is_empty() { None } else { Some(binds(&g("gateways"), &m.gateways)?) };
            mesh_match |= own.as_ref().is_some_and(|o| o.contains(&Bind::Mesh));
            matches.push(HttpMatch {
                gateways: own,
                uri: m.uri.as_ref().map(|u| str_match(&g("uri"), u)).transpose()?,
                scheme: m.scheme.as_ref().map(|u| str_match(&g("scheme"), u)).transpose()?,
                authority: m.authority.as_ref().map(|u| str_match(&g("authority"), u)).transpose()?,
                method: m.method.as_ref().map(|u| str_match(&g("method"), u)).transpose()?,
                headers: kv_matches(&g("headers"), &m.headers)?,
                query_params: kv_matches(&g("queryParams"), &m.query_params)?,
                without_headers: kv_matches(&g("withoutHeaders"), &m.without_headers)?,
                port: m.port,
                ignore_uri_case: m.ignore_uri_case,
            });
        }
        let mut destinations = Vec::new();
        let explicit = h.route.iter().any(|d| d.weight.is_some());
        for (j, d) in h.route.iter().enumerate() {
            let w = d.weight.unwrap_or(0);
            let Ok(w) = u32::try_from(w) else {
                return Err((format!("spec.http[{i}].route[{j}].weight"), format!("{w} is not a weight (0 or more)")));
            };
            if d.destination.host.is_empty() {
                return Err((format!("spec.http[{i}].route[{j}].destination.host"), "required".into()));
            }
            let headers = d.headers.clone().unwrap_or_default();
            let hf = |op: &str| format!("spec.http[{i}].route[{j}].headers.{op}");
            destinations.push(RouteDest {
                host: d.destination.host.to_ascii_lowercase(),
                subset: d.destination.subset.clone(),
                port: d.destination.port.as_ref().map(|p| p.number),
                weight: w,
                request_headers: header_ops(&hf("request"), &headers.request)?,
                response_headers: header_ops(&hf("response"), &headers.response)?,
            });
        }
        if destinations.len() == 1 && !explicit {
            destinations[0].weight = 100;
        } else if !destinations.is_empty() {
            // Relative weights: only a zero total is invalid (Istio's
            // validation, "total destination weight = 0").
            let sum: u64 = destinations.iter().map(|d| u64::from(d.weight)).sum();
            if sum > u64::from(u32::MAX) {
                return Err((f("route"), format!("the weights add to {sum}, more than {}", u32::MAX)));
            }
            if sum == 0 {
                return Err((f("route"), "the weights add to 0: no destination would get traffic".into()));
            }
        }
        if destinations.is_empty() && h.direct_response.is_none() && h.redirect.is_none() {
            return Err((f("route"), "a route needs destinations, a redirect or a directResponse".into()));
        }
        let fault = match &h.fault {
            None => None,
            Some(fl) => {
                let delay = match &fl.delay {
                    None => None,
                    Some(d) => {
                        let dur = duration(&f("fault.delay.fixedDelay"), &d.fixed_delay)?
                            .ok_or_else(|| (f("fault.delay.fixedDelay"), "required".into()))?;
                        Some((dur, percent(&f("fault.delay.percentage"), &d.percentage, d.percent, 0.0)?))
                    }
                };
                let abort = match &fl.abort {
                    None => None,
                    Some(a) => {
                        let status = match (a.http_status, &a.grpc_status) {
                            (Some(s), None) if (200..=599).contains(&s) => AbortStatus::Http(s),
                            (Some(s), None) => return Err((f("fault.abort.httpStatus"), format!("{s} is not an HTTP status"))),
                            (None, Some(g)) => AbortStatus::Grpc(g.clone()),
                            _ => return Err((f("fault.abort"), "exactly one of httpStatus, grpcStatus".into())),
                        };
                        Some((status, percent(&f("fault.abort.percentage"), &a.percentage, None, 0.0)?))
                    }
                };
                Some(Fault { delay, abort })
            }
        };
        if let Some(on) = h.retries.as_ref().and_then(|r| r.retry_on.as_deref()) {
            retry_on_valid(&f("retries.retryOn"), on)?;
        }
        let retries = match &h.retries {
            None => None,
            Some(r) => Some(Retries {
                attempts: r.attempts.unwrap_or(0),
                per_try_timeout: duration(&f("retries.perTryTimeout"), &r.per_try_timeout)?,
                retry_on: r
                    .retry_on
                    .as_deref()
                    .unwrap_or("connect-failure,refused-stream,unavailable,cancelled,503")
                    .split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect(),
                ignore_previous_hosts: r.retry_ignore_previous_hosts.unwrap_or(true),
            }),
        };
        // Istio validateHTTPDirectResponse: a status Envoy accepts (Istio
        // passes 0-600 on; Envoy refuses what is not 100-599), a body
        // under 1 MB, as a string or base64 bytes.
        let direct_response = match &h.direct_response {
            None => None,
            Some(d) => {
                if !(100..=599).contains(&d.status) {
                    return Err((f("directResponse.status"), format!("{} is not an HTTP status (100-599)", d.status)));
                }
                let body = match d.body.as_ref().map(|b| (&b.string, &b.bytes)) {
                    None | Some((None, None)) => Vec::new(),
                    Some((Some(s), None)) => s.clone().into_bytes(),
                    Some((None, Some(b))) => {
                        use base64::Engine;
                        base64::engine::general_purpose::STANDARD
                            .decode(b)
                            .map_err(|e| (f("directResponse.body.bytes"), format!("not base64: {e}")))?
                    }
                    Some((Some(_), Some(_))) => return Err((f("directResponse.body"), "one of string, bytes".into())),
                };
                if body.len() >= 1 << 20 {
                    return Err((f("directResponse.body"), format!("{} bytes; Istio allows less than 1 MB", body.len())));
                }
                Some((d.status, body))
            }
        };
        // Istio validateHTTPRedirect: something to redirect to, a 3xx code
        // (Envoy has 301, 302, 303, 307 and 308), scheme http or https,
        // `port` or `derivePort` (one of).
        let redirect = match &h.redirect {
            None => None,
            Some(r) => {
                if r.uri.is_none() && r.authority.is_none() && r.scheme.is_none() && r.port.is_none() && r.derive_port.is_none() {
                    return Err((f("redirect"), "a redirect needs a uri, authority, scheme or port".into()));
                }
                let code = r.redirect_code.unwrap_or(301);
                if ![301, 302, 303, 307, 308].contains(&code) {
                    return Err((f("redirect.redirectCode"), format!("{code}: one of 301, 302, 303, 307, 308")));
                }
                if let Some(u) = r.uri.as_deref().filter(|u| !u.starts_with('/') || u.bytes().any(|b| b <= b' ' || b == 0x7f)) {
                    return Err((f("redirect.uri"), format!("{u:?}: a path starting with `/`, without spaces or control characters")));
                }
                if let Some(a) = r.authority.as_deref().filter(|a| !is_authority(a)) {
                    return Err((f("redirect.authority"), format!("{a:?}: a host or host:port")));
                }
                if let Some(s) = r.scheme.as_deref().filter(|s| !["http", "https"].contains(s)) {
                    return Err((f("redirect.scheme"), format!("{s:?}: http or https")));
                }
                let port = match (r.port, r.derive_port.as_deref()) {
                    (None, None) => RedirectPort::Keep,
                    (Some(p), None) => match u16::try_from(p) {
                        Ok(p) if p > 0 => RedirectPort::Fixed(p),
                        _ => return Err((f("redirect.port"), format!("{p} is not a port"))),
                    },
                    (None, Some("FROM_PROTOCOL_DEFAULT")) => RedirectPort::FromProtocolDefault,
                    (None, Some("FROM_REQUEST_PORT")) => RedirectPort::FromRequestPort,
                    (None, Some(o)) => return Err((f("redirect.derivePort"), format!("{o:?}: FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT"))),
                    (Some(_), Some(_)) => return Err((f("redirect"), "one of port, derivePort".into())),
                };
                Some(Redirect { uri: r.uri.clone(), authority: r.authority.clone(), code, scheme: r.scheme.clone(), port })
            }
        };
        // Istio HTTPRewrite: `uri` or `uriRegexRewrite`, not both; the
        // regex is RE2 and its substitution takes `\N` capture groups.
        let rewrite_regex = match h.rewrite.as_ref().and_then(|r| r.uri_regex_rewrite.as_ref()) {
            None => None,
            Some(rr) => {
                if h.rewrite.as_ref().is_some_and(|r| r.uri.is_some()) {
                    return Err((f("rewrite"), "one of uri, uriRegexRewrite".into()));
                }
                let (Some(pattern), Some(rewrite)) = (&rr.pattern, &rr.rewrite) else {
                    return Err((f("rewrite.uriRegexRewrite"), "needs match and rewrite".into()));
                };
                let re = regex::Regex::new(pattern).map_err(|e| (f("rewrite.uriRegexRewrite.match"), format!("invalid regex: {e}")))?;
                let with = regex_substitution(rewrite, re.captures_len()).map_err(|e| (f("rewrite.uriRegexRewrite.rewrite"), e))?;
                Some((Regex(re), with))
            }
        };
        // `mirror` (with `mirrorPercentage`) or `mirrors`, not both
        // (Istio's validation); a mirror without a percentage gets every
        // request.
        let mirror_dest = |d: &k8s::Destination| RouteDest {
            host: d.host.to_ascii_lowercase(),
            subset: d.subset.clone(),
            port: d.port.as_ref().map(|p| p.number),
            weight: 100,
            ..Default::default()
        };
        if h.mirror.is_some() && !h.mirrors.is_empty() {
            return Err((f("mirrors"), "one of mirror, mirrors".into()));
        }
        let mut mirrors = Vec::new();
        if let Some(m) = &h.mirror {
            mirrors.push((mirror_dest(m), percent(&f("mirrorPercentage"), &h.mirror_percentage, h.mirror_percent, 100.0)?));
        }
        for (j, m) in h.mirrors.iter().enumerate() {
            if m.destination.host.is_empty() {
                return Err((f(&format!("mirrors[{j}].destination.host")), "required".into()));
            }
            mirrors.push((mirror_dest(&m.destination), percent(&f(&format!("mirrors[{j}].percentage")), &m.percentage, None, 100.0)?));
        }
        let cors = h.cors_policy.as_ref().map(|c| cors_policy(&f("corsPolicy"), c)).transpose()?;
        let headers = h.headers.clone().unwrap_or_default();
        http.push(HttpRoute {
            name: h.name.clone(),
            matches,
            destinations,
            rewrite_uri: h.rewrite.as_ref().and_then(|r| r.uri.clone()),
            rewrite_regex,
            rewrite_authority: h.rewrite.as_ref().and_then(|r| r.authority.clone()),
            fault,
            // `timeout: 0s` disables the timeout (Istio: "default is
            // disabled"; Envoy reads 0 as no timeout).
            timeout: duration(&f("timeout"), &h.timeout)?.filter(|t| !t.is_zero()),
            retries,
            request_headers: header_ops(&f("headers.request"), &headers.request)?,
            response_headers: header_ops(&f("headers.response"), &headers.response)?,
            direct_response,
            redirect,
            mirrors,
            cors,
        });
    }
    let mut route_rate_limits = BTreeMap::new();
    for (k, v) in &vs.metadata.annotations {
        if let Some(route) = k.strip_prefix(&format!("{ANNOTATION_RATE_LIMIT}.")) {
            let limit = RateLimit::parse(v)
                .ok_or_else(|| (format!("metadata.annotations[{k}]"), format!("{v:?} is not <requests>/<s|m|h>, e.g. 100/s")))?;
            if !http.iter().any(|h| h.name.as_deref() == Some(route)) {
                return Err((format!("metadata.annotations[{k}]"), format!("no http route named {route:?}")));
            }
            route_rate_limits.insert(route.to_owned(), limit);
        }
    }
    // `tcp` and `tls` routes (Istio validateTCPRoute / validateTLSRoute:
    // destinations required; a TLS match needs `sniHosts`, each within
    // the VirtualService's hosts).
    let l4_match = |field: String, port: Option<i64>, gateways: &[String], subnets: &[String]| -> Result<L4MatchParts, FieldError> {
        let port = port
            .map(|p| u16::try_from(p).ok().filter(|p| *p > 0).ok_or_else(|| (format!("{field}.port"), format!("{p} is not a port (1-65535)"))))
            .transpose()?;
        let own = if gateways.is_empty() { None } else { Some(binds(&format!("{field}.gateways"), gateways)?) };
        let mut cidrs = Vec::new();
        for (k, c) in subnets.iter().enumerate() {
            cidrs.push(crate::policy::Cidr::parse(c).ok_or_else(|| (format!("{field}.destinationSubnets[{k}]"), format!("{c:?} is not an IP address or CIDR")))?);
        }
        Ok((port, own, cidrs))
    };
    let mut tcp = Vec::new();
    for (i, r) in vs.spec.tcp.iter().enumerate() {
        let mut matches = Vec::new();
        for (j, m) in r.matches.iter().enumerate() {
            let (port, gateways, destination_subnets) = l4_match(format!("spec.tcp[{i}].match[{j}]"), m.port, &m.gateways, &m.destination_subnets)?;
            mesh_match |= gateways.as_ref().is_some_and(|g| g.contains(&Bind::Mesh));
            matches.push(L4Match { port, gateways, sni_hosts: Vec::new(), destination_subnets });
        }
        tcp.push(L4Route { matches, destinations: l4_destinations(&format!("spec.tcp[{i}]"), &r.route)? });
    }
    let vs_hosts: Vec<String> = vs.spec.hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
    let mut tls = Vec::new();
    for (i, r) in vs.spec.tls.iter().enumerate() {
        if r.matches.is_empty() {
            return Err((format!("spec.tls[{i}].match"), "required: a TLS route matches by sniHosts (Istio's validation)".into()));
        }
        let mut matches = Vec::new();
        for (j, m) in r.matches.iter().enumerate() {
            let field = format!("spec.tls[{i}].match[{j}]");
            let (port, gateways, destination_subnets) = l4_match(field.clone(), m.port, &m.gateways, &m.destination_subnets)?;
            let bound_to_mesh = gateways.as_deref().unwrap_or(&gateways_top(&vs.spec.gateways)).contains(&Bind::Mesh);
            if bound_to_mesh {
                return Err((format!("{field}.gateways"), "refused: TLS routes (by SNI) apply at gateways only in Skiff, not at waypoints (mesh); bind the route to a Gateway".into()));
            }
            if m.sni_hosts.is_empty() {
                return Err((format!("{field}.sniHosts"), "required (Istio's validation)".into()));
            }
            let mut sni_hosts = Vec::new();
            for (k, h) in m.sni_hosts.iter().enumerate() {
                let h = h.to_ascii_lowercase();
                // Istio's wildcard-domain syntax: `*`, or `*.` then labels.
                let labels = h.strip_prefix("*.").unwrap_or(&h);
                if h != "*" && !labels.split('.').all(is_dns1123_label) {
                    return Err((format!("{field}.sniHosts[{k}]"), format!("{h:?} is not a host name, `*.suffix` or `*`")));
                }
                // Within the VirtualService's hosts (Istio: "is not a
                // compatible subset of any of the virtual service hosts").
                let within = vs_hosts.iter().any(|v| v == "*" || *v == h || v.strip_prefix('*').is_some_and(|suffix| h.ends_with(suffix) && h.len() > suffix.len()));
                if !within {
                    return Err((format!("{field}.sniHosts[{k}]"), format!("{h:?} is not within the VirtualService's hosts (Istio's validation)")));
                }
                sni_hosts.push(h);
            }
            matches.push(L4Match { port, gateways, sni_hosts, destination_subnets });
        }
        tls.push(L4Route { matches, destinations: l4_destinations(&format!("spec.tls[{i}]"), &r.route)? });
    }
    let mesh = top_mesh || mesh_match;
    // Checked once `mesh` is known: a match bound to the mesh binds it too.
    if mesh && vs.spec.hosts.iter().any(|h| h == "*") {
        return Err(("spec.hosts".into(), "`*` is not allowed for a VirtualService bound to the mesh".into()));
    }
    let hosts = vs.spec.hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
    let export_to = ExportTo::parse(&vs.spec.export_to, &namespace)?;
    Ok(VirtualService { namespace, name, hosts, http, tcp, tls, route_rate_limits, mesh, gateways, export_to, created: vs.metadata.creation_timestamp.clone() })
}

/// A `tcp` or `tls` match's port, own `gateways` and `destinationSubnets`.
type L4MatchParts = (Option<u16>, Option<Vec<Bind>>, Vec<crate::policy::Cidr>);

/// `gateways` as written, with `mesh` for an empty list (for the
/// validation of a route's matches).
fn gateways_top(list: &[String]) -> Vec<Bind> {
    if list.is_empty() {
        return vec![Bind::Mesh];
    }
    list.iter().filter_map(|g| Bind::parse(g, "").ok()).collect()
}

/// A `tcp` or `tls` route's destinations (Istio `RouteDestination`),
/// weighted as an `http` route's: one without a weight takes all; several
/// are relative, not all zero.
fn l4_destinations(field: &str, route: &[k8s::L4RouteDestination]) -> Result<Vec<RouteDest>, FieldError> {
    if route.is_empty() {
        return Err((format!("{field}.route"), "required: at least one destination (Istio's validation)".into()));
    }
    let explicit = route.iter().any(|d| d.weight.is_some());
    let mut out = Vec::new();
    for (j, d) in route.iter().enumerate() {
        let w = d.weight.unwrap_or(0);
        let Ok(w) = u32::try_from(w) else {
            return Err((format!("{field}.route[{j}].weight"), format!("{w} is not a weight (0 or more)")));
        };
        if d.destination.host.is_empty() {
            return Err((format!("{field}.route[{j}].destination.host"), "required".into()));
        }
        out.push(RouteDest {
            host: d.destination.host.to_ascii_lowercase(),
            subset: d.destination.subset.clone(),
            port: d.destination.port.as_ref().map(|p| p.number),
            weight: w,
            ..Default::default()
        });
    }
    if out.len() == 1 && !explicit {
        out[0].weight = 100;
    } else {
        let sum: u64 = out.iter().map(|d| u64::from(d.weight)).sum();
        if sum == 0 || sum > u64::from(u32::MAX) {
            return Err((format!("{field}.route"), format!("the weights add to {sum}: not a split that sends traffic")));
        }
    }
    Ok(out)
}

/// Validates and converts a DestinationRule.
pub fn destination_rule_from(dr: &k8s::DestinationRule) -> Result<DestinationRule, FieldError> {
    let namespace = dr.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = dr.metadata.name.clone().unwrap_or_default();
    if dr.spec.host.is_empty() {
        return Err(("spec.host".into(), "required".into()));
    }
    let top = traffic_policy("spec.trafficPolicy", dr.spec.traffic_policy.as_ref(), &TrafficPolicy::default())?;
    let mut subsets = BTreeMap::new();
    let mut subset_policies = BTreeMap::new();
    for (i, s) in dr.spec.subsets.iter().enumerate() {
        if s.name.is_empty() {
            return Err((format!("spec.subsets[{i}].name"), "required".into()));
        }
        if subsets.insert(s.name.clone(), s.labels.clone()).is_some() {
            return Err((format!("spec.subsets[{i}].name"), format!("subset {:?} defined twice", s.name)));
        }
        if let Some(p) = &s.traffic_policy {
            subset_policies.insert(s.name.clone(), traffic_policy(&format!("spec.subsets[{i}].trafficPolicy"), Some(p), &top)?);
        }
    }
    let export_to = ExportTo::parse(&dr.spec.export_to, &namespace)?;
    let spec_subset_policies = dr.spec.subsets.iter().filter_map(|s| Some((s.name.clone(), s.traffic_policy.clone()?))).collect();
    Ok(DestinationRule {
        namespace,
        name,
        host: dr.spec.host.to_ascii_lowercase(),
        subsets,
        traffic_policy: top,
        subset_policies,
        export_to,
        created: dr.metadata.creation_timestamp.clone(),
        spec_policy: dr.spec.traffic_policy.clone(),
        spec_subset_policies,
    })
}

/// `tls` (Istio `ClientTLSSettings`), with Istio's validation
/// (`validateTLS`): with `credentialName`, no file paths; MUTUAL without
/// one needs `clientCertificate` and `privateKey`; `insecureSkipVerify`
/// excludes what would verify. `caCrl` is refused (not implemented).
fn client_tls(field: &str, tls: Option<&k8s::ClientTlsSpec>) -> Result<Option<ClientTls>, FieldError> {
    let Some(t) = tls else { return Ok(None) };
    let f = |x: &str| format!("{field}.tls.{x}");
    let mode = match t.mode.as_deref() {
        None | Some("DISABLE") => TlsMode::Disable,
        Some("SIMPLE") => TlsMode::Simple,
        Some("MUTUAL") => TlsMode::Mutual,
        Some("ISTIO_MUTUAL") => TlsMode::IstioMutual,
        Some(o) => return Err((f("mode"), format!("{o:?} is not one of DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL"))),
    };
    let nonempty = |o: &Option<String>| o.clone().filter(|v| !v.is_empty());
    let out = ClientTls {
        mode,
        ca_certificates: nonempty(&t.ca_certificates),
        credential_name: nonempty(&t.credential_name),
        client_certificate: nonempty(&t.client_certificate),
        private_key: nonempty(&t.private_key),
        subject_alt_names: t.subject_alt_names.clone(),
        sni: nonempty(&t.sni).map(|s| s.to_ascii_lowercase()),
        insecure_skip_verify: t.insecure_skip_verify.unwrap_or(false),
    };
    if nonempty(&t.ca_crl).is_some() {
        return Err((f("caCrl"), "refused: certificate revocation lists are not implemented".into()));
    }
    if !out.originates() {
        // What only TLS origination reads, set where none is done.
        let set = [
            (out.ca_certificates.is_some(), "caCertificates"),
            (out.credential_name.is_some(), "credentialName"),
            (out.client_certificate.is_some(), "clientCertificate"),
            (out.private_key.is_some(), "privateKey"),
            (!out.subject_alt_names.is_empty(), "subjectAltNames"),
            (out.sni.is_some(), "sni"),
            (out.insecure_skip_verify, "insecureSkipVerify"),
        ];
        if let Some((_, name)) = set.iter().find(|(s, _)| *s) {
            let why = match mode {
                TlsMode::IstioMutual => "the mesh's own certificates and names are used for ISTIO_MUTUAL (HBONE)",
                _ => "DISABLE originates no TLS",
            };
            return Err((f(name), format!("refused: {why}")));
        }
        return Ok(Some(out));
    }
    if out.credential_name.is_some() {
        if let Some((_, name)) = [(out.client_certificate.is_some(), "clientCertificate"), (out.private_key.is_some(), "privateKey"), (out.ca_certificates.is_some(), "caCertificates")]
            .iter()
            .find(|(s, _)| *s)
        {
            return Err((f(name), "cannot be set together with credentialName (Istio's validation)".into()));
        }
    } else if mode == TlsMode::Mutual {
        for (v, name) in [(&out.client_certificate, "clientCertificate"), (&out.private_key, "privateKey")] {
            if v.is_none() {
                return Err((f(name), "required for MUTUAL without a credentialName (Istio's validation)".into()));
            }
        }
    }
    if mode == TlsMode::Simple && (out.client_certificate.is_some() || out.private_key.is_some()) {
        let name = if out.client_certificate.is_some() { "clientCertificate" } else { "privateKey" };
        return Err((f(name), "refused: SIMPLE presents no client certificate (use MUTUAL)".into()));
    }
    if out.insecure_skip_verify && (out.ca_certificates.is_some() || !out.subject_alt_names.is_empty() || (mode == TlsMode::Simple && out.credential_name.is_some())) {
        return Err((f("insecureSkipVerify"), "cannot be set together with caCertificates, subjectAltNames or (SIMPLE) credentialName (Istio's validation)".into()));
    }
    for (k, n) in out.subject_alt_names.iter().enumerate() {
        if n.parse::<std::net::IpAddr>().is_err() && !n.to_ascii_lowercase().split('.').all(is_dns1123_label) {
            return Err((f(&format!("subjectAltNames[{k}]")), format!("{n:?} is not a DNS name or an IP address")));
        }
    }
    if let Some(sni) = &out.sni {
        if sni.parse::<std::net::IpAddr>().is_err() && !sni.split('.').all(is_dns1123_label) {
            return Err((f("sni"), format!("{sni:?} is not a host name")));
        }
    }
    Ok(Some(out))
}

/// Converts a trafficPolicy over `base` (defaults for a DestinationRule's
/// own, the DestinationRule's for a subset), as Istio merges them:
/// - each sub-object this level sets (`loadBalancer`, `connectionPool`,
///   `outlierDetection`) replaces the base's whole, on every port (a
///   subset's settings override the destination's port-level ones too);
/// - a `portLevelSettings` entry replaces everything for its port: what it
///   omits takes defaults, not the level's settings.
fn traffic_policy(field: &str, p: Option<&k8s::TrafficPolicySpec>, base: &TrafficPolicy) -> Result<TrafficPolicy, FieldError> {
    let mut out = base.clone();
    let Some(p) = p else { return Ok(out) };
    // A `tls` at this level replaces the inherited one (on every port, as
    // the other sub-objects do).
    if let Some(tls) = client_tls(field, p.tls.as_deref())? {
        out.tls = Some(tls.clone());
        for port_policy in out.ports.values_mut() {
            port_policy.tls = Some(tls.clone());
        }
    }
    apply_policy_fields(field, &mut out, p.load_balancer.as_ref(), p.connection_pool.as_ref(), p.outlier_detection.as_ref())?;
    for port_policy in out.ports.values_mut() {
        apply_policy_fields(field, port_policy, p.load_balancer.as_ref(), p.connection_pool.as_ref(), p.outlier_detection.as_ref())?;
    }
    for (i, pl) in p.port_level_settings.iter().enumerate() {
        let f = format!("{field}.portLevelSettings[{i}]");
        if pl.port.number == 0 {
            return Err((format!("{f}.port.number"), "must be 1-65535".into()));
        }
        let mut port_policy = TrafficPolicy { tls: client_tls(&f, pl.tls.as_deref())?, ..Default::default() };
        apply_policy_fields(&f, &mut port_policy, pl.load_balancer.as_ref(), pl.connection_pool.as_ref(), pl.outlier_detection.as_ref())?;
        out.ports.insert(pl.port.number, port_policy);
    }
    Ok(out)
}

/// Istio ConsistentHashLB: exactly one key (header, cookie, source IP or
/// query parameter); the ring and Maglev sizes tune Envoy's tables and
/// have no effect here (rendezvous hashing needs no table).
fn hash_key(field: &str, c: &k8s::ConsistentHashSpec) -> Result<HashKey, FieldError> {
    let mut keys = Vec::new();
    if let Some(h) = &c.http_header_name {
        if !is_http_token(h) {
            return Err((format!("{field}.httpHeaderName"), format!("{h:?} is not an HTTP header name")));
        }
        keys.push(HashKey::Header(h.to_ascii_lowercase()));
    }
    if let Some(ck) = &c.http_cookie {
        if ck.name.is_empty() {
            return Err((format!("{field}.httpCookie.name"), "required".into()));
        }
        // Cookie syntax (RFC 6265): token names; path and attribute
        // values without `;` or control characters.
        let av = |v: &str| v.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b';');
        if !is_http_token(&ck.name) {
            return Err((format!("{field}.httpCookie.name"), format!("{:?} is not a cookie name", ck.name)));
        }
        if let Some(p) = ck.path.as_deref().filter(|p| !av(p)) {
            return Err((format!("{field}.httpCookie.path"), format!("{p:?}: no `;` or control characters")));
        }
        for (i, a) in ck.attributes.iter().enumerate() {
            if !is_http_token(&a.name) || a.value.as_deref().is_some_and(|v| !av(v)) {
                return Err((format!("{field}.httpCookie.attributes[{i}]"), format!("{:?}={:?} is not a cookie attribute", a.name, a.value)));
            }
        }
        let ttl = duration(&format!("{field}.httpCookie.ttl"), &ck.ttl)?;
        let attributes = ck.attributes.iter().map(|a| (a.name.clone(), a.value.clone())).collect();
        keys.push(HashKey::Cookie { name: ck.name.clone(), path: ck.path.clone(), ttl, attributes });
    }
    if c.use_source_ip == Some(true) {
        keys.push(HashKey::SourceIp);
    }
    if let Some(q) = &c.http_query_parameter_name {
        if q.is_empty() {
            return Err((format!("{field}.httpQueryParameterName"), "empty".into()));
        }
        keys.push(HashKey::QueryParameter(q.clone()));
    }
    if c.ring_hash.is_some() && c.maglev.is_some() {
        return Err((field.to_owned(), "one of ringHash, maglev".into()));
    }
    match keys.len() {
        1 => Ok(keys.remove(0)),
        0 => Err((field.to_owned(), "a key is required: httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName".into())),
        _ => Err((field.to_owned(), "only one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName".into())),
    }
}

fn apply_policy_fields(
    field: &str,
    out: &mut TrafficPolicy,
    lb: Option<&k8s::LoadBalancerSpec>,
    pool: Option<&k8s::ConnectionPoolSpec>,
    outlier: Option<&k8s::OutlierDetectionSpec>,
) -> Result<(), FieldError> {
    if let Some(lb) = lb {
        // A loadBalancer replaces the inherited one whole; `simple` and
        // `consistentHash` are one of (Istio's LoadBalancerSettings).
        let f = |s: &str| format!("{field}.loadBalancer.{s}");
        if lb.simple.is_some() && lb.consistent_hash.is_some() {
            return Err((format!("{field}.loadBalancer"), "one of simple, consistentHash".into()));
        }
        out.load_balancer = match lb.simple.as_deref() {
            None | Some("ROUND_ROBIN") | Some("UNSPECIFIED") => LoadBalancer::RoundRobin,
            Some("LEAST_REQUEST") | Some("LEAST_CONN") => LoadBalancer::LeastRequest,
            Some("RANDOM") => LoadBalancer::Random,
            Some(o) => return Err((f("simple"), format!("{o:?} is not one of ROUND_ROBIN, LEAST_REQUEST, RANDOM"))),
        };
        out.hash = lb.consistent_hash.as_ref().map(|c| hash_key(&f("consistentHash"), c)).transpose()?;
    }
    if let Some(cp) = pool {
        // A connectionPool replaces the inherited one whole (Istio merges
        // traffic policies per sub-object): what it omits takes defaults.
        let c = &mut out.connection_pool;
        *c = Default::default();
        if let Some(t) = &cp.tcp {
            c.max_connections = t.max_connections;
        }
        if let Some(h) = &cp.http {
            c.http1_max_pending_requests = h.http1_max_pending_requests;
            c.http2_max_requests = h.http2_max_requests;
            c.max_requests_per_connection = h.max_requests_per_connection;
            c.max_retries = h.max_retries;
        }
    }
    if let Some(o) = outlier {
        let dur = |f: &str, v: &Option<String>, d: Duration| -> Result<Duration, FieldError> {
            Ok(duration(&format!("{field}.outlierDetection.{f}"), v)?.unwrap_or(d))
        };
        let pct = o.max_ejection_percent.unwrap_or(10);
        if pct > 100 {
            return Err((format!("{field}.outlierDetection.maxEjectionPercent"), format!("{pct} is over 100")));
        }
        out.outlier = Some(OutlierDetection {
            consecutive_5xx: Some(o.consecutive5xx_errors.unwrap_or(5)).filter(|n| *n > 0),
            consecutive_gateway: o.consecutive_gateway_errors.filter(|n| *n > 0),
            interval: dur("interval", &o.interval, Duration::from_secs(10))?,
            base_ejection_time: dur("baseEjectionTime", &o.base_ejection_time, Duration::from_secs(30))?,
            max_ejection_percent: pct,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vs(yaml: &str) -> Result<VirtualService, FieldError> {
        let text = format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r, namespace: shop}}\nspec:\n{yaml}");
        match &k8s::parse_documents(&text).unwrap()[0] {
            k8s::Object::VirtualService(v) => virtual_service_from(v),
            o => panic!("{o:?}"),
        }
    }

    fn hdrs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// Istio reference, VirtualService `gateways`: "The reserved word mesh
    /// is used to imply all the sidecars in the mesh. When this field is
    /// omitted, the default gateway (mesh) will be used"; HTTPMatchRequest
    /// `gateways` overrides it per match. A VirtualService (or match) bound
    /// only to Gateways never applies to mesh traffic; `hosts: ["*"]` is
    /// refused for one bound to the mesh (Istio's validation).
    #[test]
    fn gateways_binding_for_mesh_traffic() {
        let route = "  http: [{route: [{destination: {host: reviews}}]}]\n";
        #[rustfmt::skip]
        let cases: &[(&str, &str, bool)] = &[
            ("no gateways: mesh", "  hosts: [reviews]\n", true),
            ("gateways [mesh]", "  hosts: [reviews]\n  gateways: [mesh]\n", true),
            ("gateways [gw, mesh]", "  hosts: [reviews]\n  gateways: [my-gateway, mesh]\n", true),
            ("gateways [gw] only", "  hosts: [reviews]\n  gateways: [my-gateway]\n", false),
            ("gateways [ns/gw] only, hosts *", "  hosts: [\"*\"]\n  gateways: [istio-system/my-gateway]\n", false),
        ];
        for (name, spec, mesh) in cases {
            let v = vs(&format!("{spec}{route}")).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            assert_eq!(v.mesh, *mesh, "{name}");
            assert_eq!(v.applies_to("reviews", "shop", "shop"), *mesh, "{name}: applies at a waypoint");
        }
        let err = vs(&format!("  hosts: [\"*\"]\n{route}")).unwrap_err();
        assert_eq!(err.0, "spec.hosts");
        // Bound to the mesh through a match: still refused.
        let err = vs("  hosts: [\"*\"]\n  gateways: [gw]\n  http: [{match: [{gateways: [mesh], uri: {prefix: /}}], route: [{destination: {host: reviews}}]}]\n").unwrap_err();
        assert_eq!(err.0, "spec.hosts");
        // Wildcards are `*` or `*.suffix`.
        assert_eq!(vs(&format!("  hosts: [\"*l\"]\n{route}")).unwrap_err().0, "spec.hosts[0]");
        assert_eq!(vs(&format!("  hosts: [\"a.*.local\"]\n{route}")).unwrap_err().0, "spec.hosts[0]");
        assert!(vs(&format!("  hosts: [\"*.shop.svc.cluster.local\"]\n{route}")).is_ok());
        // Weights that overflow are refused, not wrapped.
        let big = "  hosts: [r]\n  http:\n  - route:\n    - {destination: {host: r, subset: a}, weight: 4294967295}\n    - {destination: {host: r, subset: b}, weight: 1}\n";
        assert_eq!(vs(big).unwrap_err().0, "spec.http[0].route");
        assert_eq!(vs("  hosts: [r]\n  http:\n  - route:\n    - {destination: {host: r}, weight: 4294967296}\n").unwrap_err().0, "spec.http[0].route[0].weight");
        // Per-match gateways: a match for a Gateway only is not a mesh match;
        // a route left without mesh matches does not apply to the mesh.
        let v = vs(r#"  hosts: [reviews]
  gateways: [my-gateway]
  http:
  - match: [{uri: {prefix: /gw}}]
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /both}, gateways: [mesh]}, {uri: {prefix: /only-gw}}]
    route: [{destination: {host: reviews, subset: v2}}]
"#)
        .unwrap();
        assert!(v.mesh);
        let info = |path| RequestInfo { method: "GET", path, authority: "reviews", headers: &[], port: 80, scheme: "http" };
        assert!(v.route(&info("/both/x")).is_some());
        assert!(v.route(&info("/only-gw")).is_none());
        assert!(v.route(&info("/gw")).is_none());
        // At the Gateway: the VirtualService's gateways, except where a match
        // names its own.
        let gw = Bind::Gateway { namespace: "shop".into(), name: "my-gateway".into() };
        assert!(v.binds(&gw));
        let subset = |p| v.route_at(&info(p), &gw).and_then(|r| r.destinations[0].subset.clone());
        assert_eq!(subset("/gw").as_deref(), Some("v1"));
        assert_eq!(subset("/only-gw").as_deref(), Some("v2"));
        assert_eq!(subset("/both"), None, "that match is for the mesh only");
        let other = Bind::Gateway { namespace: "other".into(), name: "my-gateway".into() };
        assert!(!v.binds(&other) && v.route_at(&info("/gw"), &other).is_none());
        // Host names compare case-insensitively.
        let v = vs(&format!("  hosts: [Reviews.Shop.svc.cluster.local]\n{route}")).unwrap();
        assert!(v.applies_to("reviews", "shop", "shop"));
    }

    #[test]
    fn route_matching_table() {
        let v = vs(r#"  hosts: [reviews]
  http:
  - name: mobile
    match: [{headers: {user-agent: {regex: ".*Mobile.*"}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - name: api
    match: [{uri: {prefix: /api/}, method: {exact: GET}}, {uri: {exact: /legacy}, ignoreUriCase: true}]
    route: [{destination: {host: reviews, subset: v1}}]
  - name: beta
    match: [{queryParams: {beta: {exact: "1"}}, withoutHeaders: {x-block: {exact: "yes"}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - name: port
    match: [{port: 9080}]
    route: [{destination: {host: reviews, subset: v1}}]
"#)
        .unwrap();
        let ua = hdrs(&[("user-agent", "Foo Mobile Safari")]);
        let block = hdrs(&[("x-block", "yes")]);
        let none = hdrs(&[]);
        let only_mobile = hdrs(&[("user-agent", "Mobile")]);
        #[rustfmt::skip]
        let cases: Vec<(&str, &str, &str, &[(String, String)], u16, Option<&str>)> = vec![
            ("regex header", "GET", "/", &ua, 80, Some("mobile")),
            ("regex covers the whole value", "GET", "/", &only_mobile, 80, Some("mobile")),
            ("prefix and method", "GET", "/api/items?x=1", &none, 80, Some("api")),
            ("method mismatch", "POST", "/api/items", &none, 80, None),
            ("ignoreUriCase exact", "PUT", "/LEGACY", &none, 80, Some("api")),
            ("query param", "GET", "/p?beta=1", &none, 80, Some("beta")),
            ("withoutHeaders excludes", "GET", "/p?beta=1", &block, 80, None),
            ("port match", "GET", "/other", &none, 9080, Some("port")),
            ("no match", "GET", "/other", &none, 80, None),
        ];
        for (name, method, path, headers, port, want) in cases {
            let r = RequestInfo { method, path, authority: "reviews", headers, port, scheme: "http" };
            assert_eq!(v.route(&r).and_then(|h| h.name.as_deref()), want, "case {name}");
        }
    }

    #[test]
    fn regexes_are_anchored_like_envoy() {
        let m = str_match("f", &k8s::StringMatchSpec { regex: Some("Mobile".into()), ..Default::default() }).unwrap();
        assert!(m.matches("Mobile"));
        assert!(!m.matches("Foo Mobile"), "a regex must match the whole value");
    }

    #[test]
    fn weighted_selection_follows_cumulative_weights() {
        let v = vs("  hosts: [r]\n  http:\n  - route:\n    - {destination: {host: r, subset: v1}, weight: 90}\n    - {destination: {host: r, subset: v2}, weight: 10}\n").unwrap();
        let d = &v.http[0].destinations;
        assert_eq!(pick_weighted(d, 0).unwrap().subset.as_deref(), Some("v1"));
        assert_eq!(pick_weighted(d, 89).unwrap().subset.as_deref(), Some("v1"));
        assert_eq!(pick_weighted(d, 90).unwrap().subset.as_deref(), Some("v2"));
        assert_eq!(pick_weighted(d, 99).unwrap().subset.as_deref(), Some("v2"));
        // A seeded generator over many rolls lands near 10 %.
        let mut x: u64 = 42;
        let mut v2 = 0;
        for _ in 0..10_000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            if pick_weighted(d, ((x >> 33) % 100) as u32).unwrap().subset.as_deref() == Some("v2") {
                v2 += 1;
            }
        }
        assert!((900..1100).contains(&v2), "{v2}");
    }

    #[test]
    fn fault_decisions_by_roll() {
        let f = Fault { delay: Some((Duration::from_millis(300), 50.0)), abort: Some((AbortStatus::Http(503), 10.0)) };
        assert_eq!(fault_decision(&f, 49.9, 10.0), FaultDecision { delay: Some(Duration::from_millis(300)), abort: None });
        assert_eq!(fault_decision(&f, 50.0, 9.99), FaultDecision { delay: None, abort: Some(AbortStatus::Http(503)) });
        assert_eq!(fault_decision(&Fault::default(), 0.0, 0.0), FaultDecision { delay: None, abort: None });
    }

    /// Istio VirtualService HTTPRouteDestination.weight: weights are
    /// relative; a roll uniform in 0..total picks in proportion.
    #[test]
    fn relative_weights_split_in_proportion() {
        let v = vs("  hosts: [r]\n  http:\n  - route:\n    - {destination: {host: r, subset: v1}, weight: 1}\n    - {destination: {host: r, subset: v2}, weight: 3}\n").unwrap();
        let d = &v.http[0].destinations;
        assert_eq!(total_weight(d), 4);
        let picks: Vec<String> = (0..4).map(|roll| pick_weighted(d, roll).unwrap().subset.clone().unwrap()).collect();
        assert_eq!(picks, ["v1", "v2", "v2", "v2"]);
    }

    /// Istio VirtualService: a fault's delay or abort without a percentage
    /// faults no request (Istio translates the absent percentage to 0%);
    /// `mirrorPercentage` absent mirrors everything; `timeout: 0s` means no
    /// timeout.
    #[test]
    fn absent_percentages_and_zero_timeout_follow_istio() {
        let v = vs("  hosts: [r]\n  http:\n  - fault: {delay: {fixedDelay: 1s}, abort: {httpStatus: 503}}\n    timeout: 0s\n    mirror: {host: r, subset: shadow}\n    route: [{destination: {host: r}}]\n").unwrap();
        let r = &v.http[0];
        let f = r.fault.as_ref().unwrap();
        assert_eq!((f.delay.as_ref().unwrap().1, f.abort.as_ref().unwrap().1), (0.0, 0.0));
        assert_eq!(fault_decision(f, 0.0, 0.0), FaultDecision { delay: None, abort: None }, "no request faulted");
        assert_eq!(r.mirrors[0].1, 100.0);
        assert_eq!(r.timeout, None, "0s: no timeout");
        let v = vs("  hosts: [r]\n  http:\n  - timeout: 2s\n    route: [{destination: {host: r}}]\n").unwrap();
        assert_eq!(v.http[0].timeout, Some(Duration::from_secs(2)));
    }

    /// Istio's DestinationRule lookup for a proxy: its own namespace, then
    /// the Service's, then the root namespace; exact hosts before
    /// wildcards. Another tenant's rule never overrides the Service's own.
    #[test]
    fn destination_rule_precedence() {
        let dr = |ns: &str, name: &str, host: &str| {
            let text = format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{host: \"{host}\"}}\n");
            match &k8s::parse_documents(&text).unwrap()[0] {
                k8s::Object::DestinationRule(d) => destination_rule_from(d).unwrap(),
                o => panic!("{o:?}"),
            }
        };
        let own = dr("shop", "a-own", "reviews");
        let other = dr("evil", "a-other", "reviews.shop.svc.cluster.local");
        let root = dr("istio-system", "a-root", "reviews.shop.svc.cluster.local");
        let wildcard = dr("shop", "0-wild", "*.shop.svc.cluster.local");
        let wp = dr("waypoint-ns", "z-wp", "reviews.shop.svc.cluster.local");
        let pick = |drs: &[DestinationRule], client: &str| destination_rule_for(drs, "reviews", "shop", client).map(|d| d.name.clone());
        #[rustfmt::skip]
        let cases: Vec<(&str, Vec<DestinationRule>, &str, Option<&str>)> = vec![
            ("the Service's own beats another namespace's", vec![other.clone(), own.clone()], "shop", Some("a-own")),
            ("the Service's own beats the root namespace's", vec![root.clone(), own.clone()], "shop", Some("a-own")),
            ("root namespace before another tenant's", vec![other.clone(), root.clone()], "shop", Some("a-root")),
            ("another tenant's never applies", vec![other.clone()], "shop", None),
            ("the client's namespace first", vec![own.clone(), wp.clone()], "waypoint-ns", Some("z-wp")),
            ("exact before wildcard in one namespace", vec![wildcard.clone(), own.clone()], "shop", Some("a-own")),
            ("a wildcard alone applies", vec![wildcard.clone()], "shop", Some("0-wild")),
            ("nothing matches", vec![dr("shop", "x", "ratings")], "shop", None),
        ];
        for (name, drs, client, want) in cases {
            assert_eq!(pick(&drs, client).as_deref(), want, "{name}");
        }
    }

    /// Istio HTTPRouteDestination.headers: header operations for one
    /// destination, applied when it is picked; Istio Headers: names and
    /// values as Envoy takes them. A value with an Envoy substitution is
    /// refused (Skiff would send it literally), `%%` is a literal `%`.
    #[test]
    fn per_destination_headers_and_header_validation() {
        let v = vs("  hosts: [r]\n  http:\n  - headers: {request: {set: {X-Route: r}}}\n    route:\n    - destination: {host: r, subset: v1}\n      weight: 1\n      headers: {request: {set: {X-Dest: v1, x-pct: \"50%%\"}, remove: [X-Drop]}, response: {add: {x-served-by: v1}}}\n    - {destination: {host: r, subset: v2}, weight: 1}\n").unwrap();
        let d = &v.http[0].destinations;
        assert_eq!(d[0].request_headers.set, [("x-dest".to_owned(), "v1".to_owned()), ("x-pct".to_owned(), "50%".to_owned())]);
        assert_eq!(d[0].request_headers.remove, ["x-drop"]);
        assert_eq!(d[0].response_headers.add, [("x-served-by".to_owned(), "v1".to_owned())]);
        assert_eq!(d[1].request_headers, HeaderOps::default(), "v2 has none of v1's");
        assert_eq!(v.http[0].request_headers.set, [("x-route".to_owned(), "r".to_owned())]);
        #[rustfmt::skip]
        let refused: &[(&str, &str)] = &[
            ("headers: {request: {set: {\"bad name\": x}}}", "spec.http[0].headers.request.set"),
            ("headers: {request: {set: {\":authority\": x}}}", "spec.http[0].headers.request.set"),
            ("headers: {response: {add: {x-ip: \"%DOWNSTREAM_REMOTE_ADDRESS%\"}}}", "spec.http[0].headers.response.add.x-ip"),
            ("headers: {request: {remove: [\"\"]}}", "spec.http[0].headers.request.remove[0]"),
            ("headers: {request: {set: {x-a: \"a\\nb\"}}}", "spec.http[0].headers.request.set.x-a"),
        ];
        for (headers, field) in refused {
            let got = vs(&format!("  hosts: [r]\n  http:\n  - {headers}\n    route: [{{destination: {{host: r}}}}]\n")).map(|_| ()).unwrap_err();
            assert_eq!(got.0, *field, "{headers}: {got:?}");
        }
        let got = vs("  hosts: [r]\n  http:\n  - route: [{destination: {host: r}, headers: {request: {set: {x: \"%START_TIME%\"}}}}]\n").map(|_| ()).unwrap_err();
        assert_eq!(got.0, "spec.http[0].route[0].headers.request.set.x");
    }

    /// Istio VirtualService.exportTo / DestinationRule.exportTo: `.` is the
    /// object's own namespace, `*` every namespace (also the default),
    /// names list namespaces; only proxies (waypoints) in those namespaces
    /// see the object. Istio's validation refuses duplicates, `*` with
    /// others, `~` outside ServiceEntry and names that are not namespaces.
    #[test]
    fn export_to_scopes_virtual_services_and_destination_rules() {
        let vs_with = |export: &str| vs(&format!("  hosts: [reviews]\n  exportTo: {export}\n  http: [{{route: [{{destination: {{host: reviews}}}}]}}]\n"));
        #[rustfmt::skip]
        let visible: Vec<(&str, &str, &[(&str, bool)])> = vec![
            ("absent: every namespace", "[]", &[("shop", true), ("other", true)]),
            ("`.`: its own namespace", "[\".\"]", &[("shop", true), ("other", false)]),
            ("`*`: every namespace", "[\"*\"]", &[("shop", true), ("other", true)]),
            ("names", "[other, third]", &[("shop", false), ("other", true), ("third", true)]),
            ("`.` and a name", "[\".\", other]", &[("shop", true), ("other", true), ("third", false)]),
        ];
        for (case, export, want) in visible {
            let v = vs_with(export).unwrap_or_else(|e| panic!("{case}: {e:?}"));
            for (proxy_ns, seen) in want.iter() {
                assert_eq!(v.applies_to("reviews", "shop", proxy_ns), *seen, "{case}: a waypoint in {proxy_ns}");
            }
        }
        #[rustfmt::skip]
        let refused: Vec<(&str, &str, &str)> = vec![
            ("duplicate", "[a, a]", "spec.exportTo[1]"),
            ("`.` and the own namespace", "[\".\", shop]", "spec.exportTo[1]"),
            ("`*` with others", "[\"*\", a]", "spec.exportTo"),
            ("`~` outside a ServiceEntry", "[\"~\"]", "spec.exportTo[0]"),
            ("not a namespace name", "[Shop_1]", "spec.exportTo[0]"),
        ];
        for (case, export, field) in refused {
            assert_eq!(vs_with(export).map(|_| ()).unwrap_err().0, field, "{case}");
        }
        let dr = |ns: &str, name: &str, export: &str| {
            let text = format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{host: reviews.shop.svc.cluster.local, exportTo: {export}}}\n");
            match &k8s::parse_documents(&text).unwrap()[0] {
                k8s::Object::DestinationRule(d) => destination_rule_from(d).unwrap(),
                o => panic!("{o:?}"),
            }
        };
        // A private rule in the waypoint's namespace applies there only; a
        // rule exported elsewhere is skipped for the next in line.
        let drs = vec![dr("wp", "private", "[\".\"]"), dr("shop", "own", "[\"*\"]"), dr("team", "other", "[team]")];
        let pick = |client: &str| destination_rule_for(&drs, "reviews", "shop", client).map(|d| d.name.clone());
        assert_eq!(pick("wp").as_deref(), Some("private"));
        assert_eq!(pick("elsewhere").as_deref(), Some("own"));
        assert_eq!(pick("team").as_deref(), Some("other"), "the waypoint's own namespace first");
        let drs = vec![dr("shop", "own", "[\".\"]"), dr("istio-system", "root", "[]")];
        let pick = |client: &str| destination_rule_for(&drs, "reviews", "shop", client).map(|d| d.name.clone());
        assert_eq!(pick("wp").as_deref(), Some("root"), "`.` in shop is not seen from wp");
        assert_eq!(pick("shop").as_deref(), Some("own"));
    }

    /// Istio merges DestinationRules for one host in one namespace (oldest
    /// first): later rules add subsets with new names; the top-level
    /// traffic policy is the first one set; a subset's policy is taken over
    /// the merged top-level one. Rules elsewhere are not merged in.
    #[test]
    fn destination_rules_for_one_host_merge_as_istio_merges_them() {
        let dr = |ns: &str, name: &str, created: &str, spec: &str| {
            let text = format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: {ns}, creationTimestamp: \"{created}\"}}\nspec: {spec}\n");
            match &k8s::parse_documents(&text).unwrap()[0] {
                k8s::Object::DestinationRule(d) => destination_rule_from(d).unwrap(),
                o => panic!("{o:?}"),
            }
        };
        let subsets = dr("shop", "z-subsets", "2026-01-01T00:00:00Z", "{host: reviews, subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}, trafficPolicy: {connectionPool: {tcp: {maxConnections: 2}}}}]}");
        let sticky = dr("shop", "a-sticky", "2026-02-01T00:00:00Z", "{host: reviews.shop.svc.cluster.local, trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}, subsets: [{name: v1, labels: {version: other}}, {name: v3, labels: {version: v3}}]}");
        let later = dr("shop", "later", "2026-03-01T00:00:00Z", "{host: reviews, trafficPolicy: {loadBalancer: {simple: RANDOM}}}");
        let elsewhere = dr("other", "x", "2025-01-01T00:00:00Z", "{host: reviews.shop.svc.cluster.local, subsets: [{name: v9, labels: {version: v9}}]}");
        let drs = vec![sticky, later, subsets, elsewhere];
        let m = destination_rule_for(&drs, "reviews", "shop", "shop").unwrap();
        assert_eq!(m.name, "z-subsets", "named after the oldest");
        assert_eq!(m.subsets.keys().collect::<Vec<_>>(), ["v1", "v2", "v3"], "v9 is another namespace's");
        assert_eq!(m.subsets["v1"]["version"], "v1", "the oldest rule's v1");
        assert_eq!(m.traffic_policy.hash, Some(HashKey::Header("x-user".into())), "the first top-level policy set (a-sticky's, older than later's)");
        let v2 = m.policy_for(Some("v2"), 80);
        assert_eq!((v2.connection_pool.max_connections, v2.hash.clone()), (Some(2), Some(HashKey::Header("x-user".into()))));
        let only = vec![drs[2].clone()];
        assert!(matches!(destination_rule_for(&only, "reviews", "shop", "shop"), Some(std::borrow::Cow::Borrowed(_))), "one rule: no copy");
    }

    /// Istio: among VirtualServices for one host, the oldest (creation
    /// time) applies; Skiff keeps the Service's own namespace first and
    /// falls back to the name when there is no creation time.
    #[test]
    fn virtual_service_precedence_is_oldest_first() {
        let at = |ns: &str, name: &str, created: Option<&str>| {
            let meta = match created {
                Some(t) => format!("{{name: {name}, namespace: {ns}, creationTimestamp: \"{t}\"}}"),
                None => format!("{{name: {name}, namespace: {ns}}}"),
            };
            let text = format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {meta}\nspec: {{hosts: [reviews.shop.svc.cluster.local], http: [{{route: [{{destination: {{host: reviews}}}}]}}]}}\n");
            match &k8s::parse_documents(&text).unwrap()[0] {
                k8s::Object::VirtualService(v) => virtual_service_from(v).unwrap(),
                o => panic!("{o:?}"),
            }
        };
        let first = |vs: Vec<VirtualService>| vs.into_iter().min_by_key(|v| v.precedence("shop")).unwrap().name;
        assert_eq!(first(vec![at("shop", "a", Some("2026-02-01T00:00:00Z")), at("shop", "z", Some("2025-01-01T00:00:00Z"))]), "z", "oldest first, not by name");
        assert_eq!(first(vec![at("other", "old", Some("2020-01-01T00:00:00Z")), at("shop", "new", Some("2026-01-01T00:00:00Z"))]), "new", "the Service's namespace first");
        assert_eq!(first(vec![at("shop", "b", None), at("shop", "a", None)]), "a", "no creation time: by name");
        assert_eq!(first(vec![at("shop", "a", None), at("shop", "b", Some("2026-01-01T00:00:00Z"))]), "b");
    }

    #[test]
    fn validation_table() {
        #[rustfmt::skip]
        let cases: Vec<(&str, &str, Option<&str>)> = vec![
            // Istio VirtualService HTTPRouteDestination.weight: relative
            // weights; only a zero total is invalid.
            ("weights add to 90 (relative)", "  hosts: [r]\n  http:\n  - route:\n    - {destination: {host: r, subset: v1}, weight: 80}\n    - {destination: {host: r, subset: v2}, weight: 10}\n", None),
            ("weights 1/1 (relative)", "  hosts: [r]\n  http:\n  - route:\n    - {destination: {host: r, subset: v1}, weight: 1}\n    - {destination: {host: r, subset: v2}, weight: 1}\n", None),
            ("weights 0/0", "  hosts: [r]\n  http:\n  - route:\n    - {destination: {host: r, subset: v1}, weight: 0}\n    - {destination: {host: r, subset: v2}, weight: 0}\n", Some("spec.http[0].route")),
            ("two destinations without weights", "  hosts: [r]\n  http:\n  - route:\n    - {destination: {host: r, subset: v1}}\n    - {destination: {host: r, subset: v2}}\n", Some("spec.http[0].route")),
            ("single destination, no weight", "  hosts: [r]\n  http:\n  - route: [{destination: {host: r}}]\n", None),
            ("no hosts", "  http:\n  - route: [{destination: {host: r}}]\n", Some("spec.hosts")),
            ("bad regex", "  hosts: [r]\n  http:\n  - match: [{uri: {regex: \"(\"}}]\n    route: [{destination: {host: r}}]\n", Some("spec.http[0].match[0].uri.regex")),
            ("two kinds in one match", "  hosts: [r]\n  http:\n  - match: [{uri: {exact: /a, prefix: /b}}]\n    route: [{destination: {host: r}}]\n", Some("spec.http[0].match[0].uri")),
            ("bad timeout", "  hosts: [r]\n  http:\n  - timeout: soon\n    route: [{destination: {host: r}}]\n", Some("spec.http[0].timeout")),
            ("abort status", "  hosts: [r]\n  http:\n  - fault: {abort: {httpStatus: 99}}\n    route: [{destination: {host: r}}]\n", Some("spec.http[0].fault.abort.httpStatus")),
            ("percentage", "  hosts: [r]\n  http:\n  - fault: {delay: {fixedDelay: 1s, percentage: {value: 120}}}\n    route: [{destination: {host: r}}]\n", Some("spec.http[0].fault.delay.percentage")),
            ("no destination", "  hosts: [r]\n  http:\n  - name: x\n", Some("spec.http[0].route")),
            // Istio HTTPRetry.retryOn: Envoy's retry conditions, gRPC status
            // names and status codes; anything else is refused, not ignored.
            ("retryOn values", "  hosts: [r]\n  http:\n  - retries: {attempts: 2, retryOn: \"5xx,retriable-4xx,unavailable,503\"}\n    route: [{destination: {host: r}}]\n", None),
            ("retryOn typo", "  hosts: [r]\n  http:\n  - retries: {attempts: 2, retryOn: \"5xx,conect-failure\"}\n    route: [{destination: {host: r}}]\n", Some("spec.http[0].retries.retryOn")),
            ("retryOn unsupported", "  hosts: [r]\n  http:\n  - retries: {attempts: 2, retryOn: retriable-headers}\n    route: [{destination: {host: r}}]\n", Some("spec.http[0].retries.retryOn")),
        ];
        for (name, yaml, want) in cases {
            let got = vs(yaml).err().map(|e| e.0);
            assert_eq!(got.as_deref(), want, "case {name}");
        }
        let err = vs("  hosts: [r]\n  http:\n  - route:\n    - {destination: {host: r}, weight: 0}\n    - {destination: {host: r}, weight: 0}\n").unwrap_err();
        assert!(err.1.contains("add to 0"), "{err:?}");
    }

    #[test]
    fn hosts_resolve_like_istio() {
        for (host, want) in [
            ("reviews", true),
            ("reviews.shop", true),
            ("reviews.shop.svc", true),
            ("reviews.shop.svc.cluster.local", true),
            ("*", true),
            ("*.shop.svc.cluster.local", true),
            ("reviews.other", false),
            ("ratings", false),
        ] {
            assert_eq!(host_matches(host, "shop", "reviews", "shop"), want, "{host}");
        }
    }

    /// Istio reference, DestinationRule `Subset.trafficPolicy` and
    /// `TrafficPolicy.portLevelSettings` ("default values will be applied
    /// to fields omitted in port-level traffic policies"), as istiod merges
    /// them: per sub-object for subsets, wholesale for port-level settings.
    #[test]
    fn destination_rule_policies_merge_as_istio() {
        let text = "apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: r, namespace: shop}\nspec:\n  host: reviews\n  trafficPolicy:\n    connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}\n    outlierDetection: {consecutive5xxErrors: 3, baseEjectionTime: 2s, maxEjectionPercent: 100}\n  subsets:\n  - {name: v1, labels: {version: v1}, trafficPolicy: {loadBalancer: {simple: RANDOM}}}\n  - {name: v2, labels: {version: v2}}\n";
        let dr = match &k8s::parse_documents(text).unwrap()[0] {
            k8s::Object::DestinationRule(d) => destination_rule_from(d).unwrap(),
            o => panic!("{o:?}"),
        };
        assert_eq!(dr.traffic_policy.connection_pool.max_in_flight(false), Some(2));
        let v1 = dr.policy_for(Some("v1"), 80);
        assert_eq!(v1.load_balancer, LoadBalancer::Random);
        assert_eq!(v1.connection_pool.max_connections, Some(1), "subset inherits unset fields");
        assert_eq!(dr.policy_for(Some("v2"), 80).load_balancer, LoadBalancer::RoundRobin);
        let o = dr.traffic_policy.outlier.as_ref().unwrap();
        assert_eq!((o.consecutive_5xx, o.base_ejection_time, o.max_ejection_percent), (Some(3), Duration::from_secs(2), 100));
        let ported = text.replace(
            "    outlierDetection:",
            "    portLevelSettings: [{port: {number: 9080}, loadBalancer: {simple: LEAST_REQUEST}, connectionPool: {tcp: {maxConnections: 7}}}]\n    outlierDetection:",
        );
        let dr2 = match &k8s::parse_documents(&ported).unwrap()[0] {
            k8s::Object::DestinationRule(d) => destination_rule_from(d).unwrap(),
            o => panic!("{o:?}"),
        };
        let p = dr2.policy_for(Some("v2"), 9080);
        assert_eq!(p.load_balancer, LoadBalancer::LeastRequest);
        assert_eq!(p.connection_pool.max_connections, Some(7));
        assert_eq!(p.connection_pool.http1_max_pending_requests, None, "port level replaces the rest: defaults, not inherited");
        assert!(p.outlier.is_none(), "the destination's outlierDetection is not inherited by a port-level policy");
        assert_eq!(dr2.policy_for(Some("v2"), 80).load_balancer, LoadBalancer::RoundRobin);
        let v1_9080 = dr2.policy_for(Some("v1"), 9080);
        assert_eq!(v1_9080.load_balancer, LoadBalancer::Random, "the subset's loadBalancer overrides the destination's port level");
        assert_eq!(v1_9080.connection_pool.max_connections, Some(7), "what the subset does not set comes from the port level");
        // A subset's connectionPool replaces the destination's whole.
        let pooled = text.replace("trafficPolicy: {loadBalancer: {simple: RANDOM}}", "trafficPolicy: {connectionPool: {http: {http2MaxRequests: 9}}}");
        let dr3 = match &k8s::parse_documents(&pooled).unwrap()[0] {
            k8s::Object::DestinationRule(d) => destination_rule_from(d).unwrap(),
            o => panic!("{o:?}"),
        };
        let v1 = &dr3.policy_for(Some("v1"), 80).connection_pool;
        assert_eq!((v1.http2_max_requests, v1.max_connections, v1.http1_max_pending_requests), (Some(9), None, None));
        let bad = text.replace("RANDOM", "FASTEST");
        let err = match &k8s::parse_documents(&bad).unwrap()[0] {
            k8s::Object::DestinationRule(d) => destination_rule_from(d).unwrap_err(),
            o => panic!("{o:?}"),
        };
        assert_eq!(err.0, "spec.subsets[0].trafficPolicy.loadBalancer.simple");
    }

    #[test]
    fn token_bucket() {
        let l = RateLimit::parse("2/s").unwrap();
        assert_eq!(RateLimit::parse("0/s"), None);
        assert_eq!(RateLimit::parse("5/day"), None);
        let t0 = std::time::Instant::now();
        let mut b = Bucket { tokens: 2.0, at: t0 };
        assert!(take_token(&l, &mut b, t0));
        assert!(take_token(&l, &mut b, t0));
        assert!(!take_token(&l, &mut b, t0), "the burst is the bucket size");
        assert!(take_token(&l, &mut b, t0 + Duration::from_millis(500)), "refills at 2 per second");
        assert!(!take_token(&l, &mut b, t0 + Duration::from_millis(600)));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("100ms"), Some(Duration::from_millis(100)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("99999999999999999999s"), None, "absurd durations are rejected, not a panic");
    }
}
