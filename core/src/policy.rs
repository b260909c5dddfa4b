//! PeerAuthentication and L4 AuthorizationPolicy: validated domain types and
//! the pure functions that decide, following Istio's documented semantics.
//!
//! AuthorizationPolicy, as ztunnel (L4) enforces it:
//! - applicable policies: those in the root namespace without a selector
//!   (every workload), in the root namespace with a matching selector, in
//!   the workload's namespace without a selector, or with a matching
//!   selector; policies with `targetRefs` bind to waypoints, not workloads;
//! - any matching DENY (or CUSTOM, which Skiff cannot delegate: it fails
//!   closed) denies; then, if any ALLOW policy applies, one must match;
//!   with no ALLOW policy everything is allowed; AUDIT never changes the
//!   decision;
//! - a policy with no `rules` matches nothing (an ALLOW policy with no rules
//!   therefore allows nothing), while `rules: [{}]` matches everything;
//! - a rule matches when any `from` matches (or there is none), any `to`
//!   matches (or there is none) and every `when` matches;
//! - L7-only attributes (methods, paths, hosts, request principals, request
//!   headers…) cannot be checked on a TCP connection: in an ALLOW rule they
//!   make the rule not match; in a DENY rule they are treated as matching —
//!   both fail closed, as Istio's ztunnel does.

use std::{
    collections::BTreeMap,
    net::IpAddr,
};

use crate::k8s;

/// Mutual TLS mode of PeerAuthentication.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum MtlsMode {
    Unset,
    Disable,
    Permissive,
    Strict,
}

impl MtlsMode {
    fn parse(s: Option<&str>) -> Result<MtlsMode, String> {
        match s {
            None | Some("UNSET") | Some("") => Ok(MtlsMode::Unset),
            Some("DISABLE") => Ok(MtlsMode::Disable),
            Some("PERMISSIVE") => Ok(MtlsMode::Permissive),
            Some("STRICT") => Ok(MtlsMode::Strict),
            Some(other) => Err(format!("{other:?} is not one of UNSET, DISABLE, PERMISSIVE, STRICT")),
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            MtlsMode::Unset => "UNSET",
            MtlsMode::Disable => "DISABLE",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Strict => "STRICT",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PeerAuthn {
    pub namespace: String,
    pub name: String,
    /// `None`: namespace-wide (or mesh-wide in the root namespace).
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: MtlsMode,
    pub port_modes: BTreeMap<u16, MtlsMode>,
    /// A stand-in for a PeerAuthentication Skiff refused: STRICT for what
    /// it covers, whatever else applies (never the looser mode).
    pub fail_closed: bool,
    /// `metadata.creationTimestamp`: among several at one level, the
    /// oldest applies.
    pub created: Option<String>,
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The mTLS mode in force for a workload's `port`: workload-level (port
/// level first) over namespace-level over mesh-level, each `UNSET` deferring
/// to the next; PERMISSIVE when nothing says otherwise. Among several
/// policies at one level the oldest wins, as in Istio (by name when there
/// is no creation time, as in a manifests directory).
pub fn effective_mtls(
    policies: &[PeerAuthn],
    root_namespace: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    port: u16,
) -> MtlsMode {
    mtls_decision(policies, root_namespace, namespace, labels, port).mode
}

/// Which PeerAuthentication set the mode in force, and at what level.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MtlsDecision<'a> {
    pub mode: MtlsMode,
    /// The deciding PeerAuthentication (None: no policy says anything,
    /// PERMISSIVE by default).
    pub policy: Option<&'a PeerAuthn>,
    /// `port N`, `workload`, `namespace`, `mesh`, or `refused object`
    /// (a PeerAuthentication Skiff refused stands in as STRICT).
    pub level: &'static str,
}

/// [`effective_mtls`], with the policy and level that decided.
pub fn mtls_decision<'a>(
    policies: &'a [PeerAuthn],
    root_namespace: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    port: u16,
) -> MtlsDecision<'a> {
    // A refused PeerAuthentication that covers this workload (its own
    // namespace's, or the root namespace's mesh-wide) leaves STRICT in
    // force, whatever else applies.
    let refused_covers = |p: &&PeerAuthn| {
        p.fail_closed
            && (p.namespace == namespace || (p.namespace == root_namespace && p.selector.is_none()))
            && p.selector.as_ref().is_none_or(|s| selects(s, labels))
    };
    if let Some(p) = policies.iter().find(refused_covers) {
        return MtlsDecision { mode: MtlsMode::Strict, policy: Some(p), level: "refused object" };
    }
    let first = |f: &dyn Fn(&PeerAuthn) -> bool| -> Option<&'a PeerAuthn> {
        policies.iter().filter(|p| f(p)).min_by(|a, b| (a.created.is_none(), &a.created, &a.name).cmp(&(b.created.is_none(), &b.created, &b.name)))
    };
    let workload = first(&|p| p.namespace == namespace && p.selector.as_ref().is_some_and(|s| selects(s, labels)));
    let ns = first(&|p| p.namespace == namespace && p.selector.is_none());
    let mesh = first(&|p| p.namespace == root_namespace && p.selector.is_none());
    let chain = [
        workload.and_then(|w| w.port_modes.get(&port).map(|m| (*m, w, "port"))),
        workload.map(|w| (w.mode, w, "workload")),
        ns.map(|n| (n.mode, n, "namespace")),
        mesh.map(|m| (m.mode, m, "mesh")),
    ];
    match chain.into_iter().flatten().find(|(m, _, _)| *m != MtlsMode::Unset) {
        Some((mode, p, level)) => MtlsDecision { mode, policy: Some(p), level },
        None => MtlsDecision { mode: MtlsMode::Permissive, policy: None, level: "default" },
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Action {
    Allow,
    Deny,
    Audit,
    Custom,
}

/// A string match: exact, `prefix*`, `*suffix`, or `*` (any non-empty).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StrMatch(pub String);

impl StrMatch {
    /// A path match: as [`StrMatch::matches`], or, when the pattern holds
    /// the template operators `{*}` or `{**}`, a path template (Istio
    /// AuthorizationPolicy `Operation.paths`, matched as Envoy's URI
    /// templates: `{*}` is one path segment, non-empty; `{**}` is zero or
    /// more segments, `/` included; literals between them match as written).
    pub fn matches_path(&self, path: &str) -> bool {
        match template(&self.0) {
            Some(Ok(tokens)) => template_matches(&tokens, path),
            // Refused at conversion; never matches if one slipped through.
            Some(Err(_)) => false,
            None => self.matches(path),
        }
    }

    /// Whether a path pattern is a valid template (or no template at all).
    fn valid_path_template(p: &str) -> Result<(), String> {
        match template(p) {
            Some(Err(e)) => Err(format!("{p:?}: {e}")),
            _ => Ok(()),
        }
    }

    /// Case-insensitive [`StrMatch::matches`] (hosts), without allocating.
    pub fn matches_ignore_case(&self, v: &str) -> bool {
        self.matches_by(v, str::eq_ignore_ascii_case)
    }

    pub fn matches(&self, v: &str) -> bool {
        self.matches_by(v, |a, b| a == b)
    }

    /// The match, with `eq` comparing the literal part.
    fn matches_by(&self, v: &str, eq: impl Fn(&str, &str) -> bool) -> bool {
        let p = self.0.as_str();
        if p == "*" {
            return !v.is_empty();
        }
        if let Some(prefix) = p.strip_suffix('*') {
            return v.get(..prefix.len()).is_some_and(|head| eq(head, prefix));
        }
        if let Some(suffix) = p.strip_prefix('*') {
            return v.len().checked_sub(suffix.len()).and_then(|at| v.get(at..)).is_some_and(|tail| eq(tail, suffix));
        }
        eq(p, v)
    }
}

/// A piece of a path template.
#[derive(Debug, PartialEq)]
enum Tok<'a> {
    Lit(&'a str),
    /// `{*}`: one or more characters other than `/`.
    One,
    /// `{**}`: zero or more characters, `/` included.
    Many,
}

/// `None`: not a template (no `{*}`/`{**}` operator); otherwise the
/// tokens, or why it is not a valid one: a `*` or brace outside an
/// operator, an operator after `{**}`, or a template not starting with `/`.
fn template(p: &str) -> Option<Result<Vec<Tok<'_>>, &'static str>> {
    if !p.contains("{*") {
        return None;
    }
    let mut tokens = Vec::new();
    let mut rest = p;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("{**}") {
            tokens.push(Tok::Many);
            rest = r;
        } else if let Some(r) = rest.strip_prefix("{*}") {
            tokens.push(Tok::One);
            rest = r;
        } else {
            let end = rest.find('{').unwrap_or(rest.len()).max(1);
            let lit = &rest[..end];
            if lit.contains(['*', '{', '}']) {
                return Some(Err("`*` and braces are allowed only as the operators `{*}` and `{**}`"));
            }
            tokens.push(Tok::Lit(lit));
            rest = &rest[end..];
        }
    }
    if let Some(i) = tokens.iter().position(|t| *t == Tok::Many) {
        if tokens[i + 1..].iter().any(|t| !matches!(t, Tok::Lit(_))) {
            return Some(Err("no operator may follow `{**}`"));
        }
    }
    if !p.starts_with('/') {
        return Some(Err("a path template starts with `/`"));
    }
    Some(Ok(tokens))
}

fn template_matches(tokens: &[Tok<'_>], path: &str) -> bool {
    match tokens.split_first() {
        None => path.is_empty(),
        Some((Tok::Lit(l), rest)) => path.strip_prefix(l).is_some_and(|p| template_matches(rest, p)),
        Some((Tok::One, rest)) => {
            let seg = path.find('/').unwrap_or(path.len());
            (1..=seg).any(|n| template_matches(rest, &path[n..]))
        }
        Some((Tok::Many, rest)) => (0..=path.len()).filter(|n| path.is_char_boundary(*n)).any(|n| template_matches(rest, &path[n..])),
    }
}

/// An IPv4 or IPv6 CIDR (a bare address is a /32 or /128). The data path
/// carries IPv4: an IPv6 block never contains a peer's address, so in an
/// ALLOW's `ipBlocks` it allows no one and in `notIpBlocks` it excludes no
/// one, as Istio reads it for an IPv4 peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            // Digits only: no sign, no spaces.
            Some(l) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => l.parse().ok()?,
            Some(_) => return None,
            None => max,
        };
        (len <= max).then_some(Cidr { addr, len })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(ip) & mask == u32::from(net) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.len)).unwrap_or(0);
                u128::from(ip) & mask == u128::from(net) & mask
            }
            _ => false,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Source {
    pub principals: Vec<StrMatch>,
    pub not_principals: Vec<StrMatch>,
    pub namespaces: Vec<StrMatch>,
    pub not_namespaces: Vec<StrMatch>,
    /// `(namespace, service account)` of the peer's identity.
    pub service_accounts: Vec<(String, String)>,
    pub not_service_accounts: Vec<(String, String)>,
    pub ip_blocks: Vec<Cidr>,
    pub not_ip_blocks: Vec<Cidr>,
    pub remote_ip_blocks: Vec<Cidr>,
    pub not_remote_ip_blocks: Vec<Cidr>,
    /// requestPrincipals / notRequestPrincipals (JWT): L7 only.
    pub has_l7: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Operation {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    /// hosts, methods, paths and their negations: L7 only.
    pub has_l7: bool,
    pub hosts: Vec<StrMatch>,
    pub not_hosts: Vec<StrMatch>,
    pub methods: Vec<StrMatch>,
    pub not_methods: Vec<StrMatch>,
    pub paths: Vec<StrMatch>,
    pub not_paths: Vec<StrMatch>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum ConditionKey {
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationIp,
    DestinationPort,
    /// request.*, connection.sni, … — not checkable at L4.
    L7(String),
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Condition {
    pub key: ConditionKey,
    pub values: Vec<String>,
    pub not_values: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
    /// Field paths in the rule Skiff cannot evaluate anywhere (fields it
    /// does not know): an ALLOW rule with any never matches; a DENY rule
    /// matches on what can be evaluated (Istio's fail-closed rule).
    pub unsupported: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AuthzPolicy {
    pub namespace: String,
    pub name: String,
    pub selector: Option<BTreeMap<String, String>>,
    /// Bound to a waypoint (targetRefs): not enforced by ztunnel.
    pub targets_waypoint: bool,
    /// `targetRefs` as (kind, name).
    pub target_refs: Vec<(String, String)>,
    pub action: Action,
    /// Empty: the policy matches nothing.
    pub rules: Vec<Rule>,
}

impl AuthzPolicy {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the policy binds to this workload.
    pub fn applies_to(&self, root_namespace: &str, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        if self.targets_waypoint {
            return false;
        }
        let ns_ok = self.namespace == namespace || self.namespace == root_namespace;
        ns_ok && self.selector.as_ref().is_none_or(|s| selects(s, labels))
    }
}

/// What is known about a connection at L4.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    pub src_ip: IpAddr,
    /// Peer principal (`td/ns/NS/sa/SA`) when the connection is mTLS.
    pub principal: Option<String>,
    /// Peer namespace, from its identity.
    pub src_namespace: Option<String>,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
}

/// The request attributes a waypoint knows (header names lower-case).
#[derive(Clone, Debug)]
pub struct L7Attrs<'a> {
    pub method: &'a str,
    /// Path without the query string.
    pub path: &'a str,
    /// Host (authority) without the port.
    pub host: &'a str,
    pub headers: &'a [(String, String)],
}

fn any_str(list: &[StrMatch], v: Option<&str>) -> bool {
    v.is_some_and(|v| list.iter().any(|m| m.matches(v)))
}

fn any_cidr(list: &[Cidr], ip: IpAddr) -> bool {
    list.iter().any(|c| c.contains(ip))
}

/// `(namespace, service account)` of a principal `td/ns/NS/sa/SA`.
fn ns_sa(principal: &str) -> Option<(&str, &str)> {
    let mut parts = principal.split('/');
    let (_td, ns_kw, ns, sa_kw, sa) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    (ns_kw == "ns" && sa_kw == "sa" && parts.next().is_none()).then_some((ns, sa))
}

fn any_sa(list: &[(String, String)], principal: Option<&str>) -> bool {
    principal.and_then(ns_sa).is_some_and(|(ns, sa)| list.iter().any(|(n, s)| n == ns && s == sa))
}

impl Source {
    fn matches(&self, c: &ConnInfo) -> bool {
        (self.service_accounts.is_empty() || any_sa(&self.service_accounts, c.principal.as_deref()))
            && (self.not_service_accounts.is_empty() || !any_sa(&self.not_service_accounts, c.principal.as_deref()))
            && (self.principals.is_empty() || any_str(&self.principals, c.principal.as_deref()))
            && (self.not_principals.is_empty() || !any_str(&self.not_principals, c.principal.as_deref()))
            && (self.namespaces.is_empty() || any_str(&self.namespaces, c.src_namespace.as_deref()))
            && (self.not_namespaces.is_empty() || !any_str(&self.not_namespaces, c.src_namespace.as_deref()))
            && (self.ip_blocks.is_empty() || any_cidr(&self.ip_blocks, c.src_ip))
            && (self.not_ip_blocks.is_empty() || !any_cidr(&self.not_ip_blocks, c.src_ip))
            && (self.remote_ip_blocks.is_empty() || any_cidr(&self.remote_ip_blocks, c.src_ip))
            && (self.not_remote_ip_blocks.is_empty() || !any_cidr(&self.not_remote_ip_blocks, c.src_ip))
    }
}

impl Operation {
    fn matches(&self, c: &ConnInfo, l7: Option<&L7Attrs<'_>>) -> bool {
        let l4 = (self.ports.is_empty() || self.ports.contains(&c.dst_port))
            && (self.not_ports.is_empty() || !self.not_ports.contains(&c.dst_port));
        let Some(r) = l7 else { return l4 };
        let field = |yes: &[StrMatch], no: &[StrMatch], m: &dyn Fn(&StrMatch) -> bool| {
            (yes.is_empty() || yes.iter().any(m)) && (no.is_empty() || !no.iter().any(m))
        };
        l4 && field(&self.methods, &self.not_methods, &|m| m.matches(r.method))
            && field(&self.paths, &self.not_paths, &|m| m.matches_path(r.path))
            && field(&self.hosts, &self.not_hosts, &|m| m.matches_ignore_case(r.host))
    }
}

impl Condition {
    fn matches(&self, c: &ConnInfo, l7: Option<&L7Attrs<'_>>) -> bool {
        let value: Option<String> = match &self.key {
            ConditionKey::SourceIp | ConditionKey::RemoteIp => Some(c.src_ip.to_string()),
            ConditionKey::SourceNamespace => c.src_namespace.clone(),
            ConditionKey::SourcePrincipal => c.principal.clone(),
            ConditionKey::DestinationIp => Some(c.dst_ip.to_string()),
            ConditionKey::DestinationPort => Some(c.dst_port.to_string()),
            ConditionKey::L7(k) => match (l7, k.strip_prefix("request.headers[").and_then(|h| h.strip_suffix(']'))) {
                // A waypoint can check request headers.
                (Some(r), Some(name)) => {
                    let name = name.to_ascii_lowercase();
                    r.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone())
                }
                // At L4, or an attribute even the waypoint cannot see:
                // the caller fails closed (see Rule::matches).
                _ => return true,
            },
        };
        let is_ip = matches!(self.key, ConditionKey::SourceIp | ConditionKey::RemoteIp | ConditionKey::DestinationIp);
        let hit = |list: &[String]| {
            list.iter().any(|p| match (&value, is_ip) {
                (Some(v), true) => Cidr::parse(p).is_some_and(|cidr| v.parse().is_ok_and(|ip| cidr.contains(ip))),
                (Some(v), false) => StrMatch(p.clone()).matches(v),
                (None, _) => false,
            })
        };
        (self.values.is_empty() || hit(&self.values)) && (self.not_values.is_empty() || !hit(&self.not_values))
    }
}

impl Rule {
    fn has_l7(&self) -> bool {
        self.from.iter().any(|f| f.has_l7)
            || self.to.iter().any(|t| t.has_l7)
            || self.when.iter().any(|w| matches!(w.key, ConditionKey::L7(_)))
    }

    /// Attributes even a waypoint cannot check (JWT request principals,
    /// `when` keys other than request headers and the L4 ones).
    fn has_unsupported(&self) -> bool {
        self.from.iter().any(|f| f.has_l7)
            || self.when.iter().any(|w| matches!(&w.key, ConditionKey::L7(k) if !k.starts_with("request.headers[")))
    }

    /// Whether the rule matches, for a policy with `action`; `l7` is the
    /// request when evaluated at a waypoint.
    fn matches(&self, action: Action, c: &ConnInfo, l7: Option<&L7Attrs<'_>>) -> bool {
        let unknowable = !self.unsupported.is_empty() || if l7.is_some() { self.has_unsupported() } else { self.has_l7() };
        if unknowable && action == Action::Allow {
            // Cannot prove the rule holds: an ALLOW rule never matches.
            return false;
        }
        (self.from.is_empty() || self.from.iter().any(|f| f.matches(c)))
            && (self.to.is_empty() || self.to.iter().any(|t| t.matches(c, l7)))
            && self.when.iter().all(|w| w.matches(c, l7))
    }
}

impl AuthzPolicy {
    /// Whether some rule uses attributes only a waypoint can check.
    pub fn has_l7(&self) -> bool {
        self.rules.iter().any(Rule::has_l7)
    }

    pub fn matches(&self, c: &ConnInfo) -> bool {
        self.matching_rule(c, None).is_some()
    }

    pub fn matches_l7(&self, c: &ConnInfo, r: &L7Attrs<'_>) -> bool {
        self.matching_rule(c, Some(r)).is_some()
    }

    /// The index of the first rule that matches (`l7`: the request, at a
    /// waypoint).
    pub fn matching_rule(&self, c: &ConnInfo, l7: Option<&L7Attrs<'_>>) -> Option<usize> {
        self.rules.iter().position(|r| r.matches(self.action, c, l7))
    }

    /// Whether the policy binds to the waypoint `name` in `namespace` (or to
    /// the Service or ServiceEntry `service` there, as `(kind, name)`)
    /// through `targetRefs`.
    pub fn targets(&self, namespace: &str, waypoint: &str, service: (&str, &str)) -> bool {
        self.namespace == namespace
            && self.target_refs.iter().any(|(kind, n)| (kind == "Gateway" && n == waypoint) || (kind == service.0 && n == service.1))
    }
}

/// The outcome, with the policy that decided and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthzDecision {
    pub allowed: bool,
    /// `namespace/name` of the deciding policy, if one decided.
    pub policy: Option<String>,
    /// The index of the deciding policy's rule that matched (in `rules`).
    pub rule: Option<usize>,
    pub reason: &'static str,
    /// AUDIT policies that matched.
    pub audited: Vec<String>,
}

impl AuthzDecision {
    /// As access lines give it: `deny (ns/name rule 1: reason)`, `allow
    /// (reason)`.
    pub fn access_text(&self) -> String {
        let verdict = if self.allowed { "allow" } else { "deny" };
        match (&self.policy, self.rule) {
            (Some(p), Some(r)) => format!("{verdict} ({p} rule {r}: {})", self.reason),
            (Some(p), None) => format!("{verdict} ({p}: {})", self.reason),
            (None, _) => format!("{verdict} ({})", self.reason),
        }
    }
}

/// Decides a connection against the policies that apply to its destination.
pub fn evaluate(policies: &[&AuthzPolicy], c: &ConnInfo) -> AuthzDecision {
    decide(policies, &|p: &AuthzPolicy| p.matching_rule(c, None))
}

/// Decides a request at a waypoint (L7 attributes known).
pub fn evaluate_l7(policies: &[&AuthzPolicy], c: &ConnInfo, r: &L7Attrs<'_>) -> AuthzDecision {
    decide(policies, &|p: &AuthzPolicy| p.matching_rule(c, Some(r)))
}

/// The policies ztunnel enforces for a workload (those selecting it in its
/// namespace, and the root namespace's; never those bound to a waypoint)
/// and the decision for `c`, a connection arriving at it.
pub fn authorize_workload(
    policies: &[AuthzPolicy],
    root_namespace: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    c: &ConnInfo,
) -> AuthzDecision {
    let applicable: Vec<&AuthzPolicy> = policies.iter().filter(|p| p.applies_to(root_namespace, namespace, labels)).collect();
    evaluate(&applicable, c)
}

fn decide(policies: &[&AuthzPolicy], matching: &dyn Fn(&AuthzPolicy) -> Option<usize>) -> AuthzDecision {
    let audited: Vec<String> =
        policies.iter().filter(|p| p.action == Action::Audit && matching(p).is_some()).map(|p| p.key()).collect();
    for p in policies.iter().filter(|p| matches!(p.action, Action::Deny | Action::Custom)) {
        if let Some(rule) = matching(p) {
            let reason = if p.action == Action::Custom { "CUSTOM policy matched (not supported at L4: denied)" } else { "DENY policy matched" };
            return AuthzDecision { allowed: false, policy: Some(p.key()), rule: Some(rule), reason, audited };
        }
    }
    let allows: Vec<&&AuthzPolicy> = policies.iter().filter(|p| p.action == Action::Allow).collect();
    if allows.is_empty() {
        return AuthzDecision { allowed: true, policy: None, rule: None, reason: "no ALLOW policy applies", audited };
    }
    match allows.iter().find_map(|p| matching(p).map(|r| (p, r))) {
        Some((p, rule)) => AuthzDecision { allowed: true, policy: Some(p.key()), rule: Some(rule), reason: "ALLOW policy matched", audited },
        None => AuthzDecision { allowed: false, policy: None, rule: None, reason: "no ALLOW policy matched", audited },
    }
}

/// Converts wire PeerAuthentication; errors name the field.
pub fn peer_authn_from(pa: &k8s::PeerAuthentication) -> Result<PeerAuthn, (String, String)> {
    let namespace = pa.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = pa.metadata.name.clone().unwrap_or_default();
    let mode = MtlsMode::parse(pa.spec.mtls.as_ref().and_then(|m| m.mode.as_deref()))
        .map_err(|e| ("spec.mtls.mode".to_owned(), e))?;
    let mut port_modes = BTreeMap::new();
    for (k, v) in &pa.spec.port_level_mtls {
        let port = k.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| ("spec.portLevelMtls".to_owned(), format!("key {k:?} is not a port")))?;
        let m = MtlsMode::parse(v.mode.as_deref()).map_err(|e| (format!("spec.portLevelMtls.{port}.mode"), e))?;
        port_modes.insert(port, m);
    }
    let selector = pa.spec.selector.as_ref().map(|s| s.match_labels.clone()).filter(|s| !s.is_empty());
    if selector.is_none() && !port_modes.is_empty() {
        return Err(("spec.portLevelMtls".into(), "requires spec.selector (port-level settings apply to selected workloads only)".into()));
    }
    Ok(PeerAuthn { namespace, name, selector, mode, port_modes, fail_closed: false, created: pa.metadata.creation_timestamp.clone() })
}

fn str_matches(field: &str, list: &[String]) -> Result<Vec<StrMatch>, (String, String)> {
    list.iter()
        .map(|s| {
            if s.is_empty() {
                Err((field.to_owned(), "empty value".to_owned()))
            } else {
                Ok(StrMatch(s.clone()))
            }
        })
        .collect()
}

fn cidrs(field: &str, list: &[String]) -> Result<Vec<Cidr>, (String, String)> {
    list.iter()
        .map(|s| Cidr::parse(s).ok_or_else(|| (field.to_owned(), format!("{s:?} is not an IP address or CIDR"))))
        .collect()
}

fn ports(field: &str, list: &[String]) -> Result<Vec<u16>, (String, String)> {
    list.iter()
        .map(|s| s.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| (field.to_owned(), format!("{s:?} is not a port"))))
        .collect()
}

/// `serviceAccounts` / `notServiceAccounts`: `namespace/name`, no
/// wildcards, at most 16 of at most 320 characters, and not together with
/// principals or namespaces (Istio's CRD validation of `Source`).
fn service_accounts(field: &str, list: &[String], s: &k8s::AuthzSource) -> Result<Vec<(String, String)>, (String, String)> {
    if list.is_empty() {
        return Ok(Vec::new());
    }
    if [&s.principals, &s.not_principals, &s.namespaces, &s.not_namespaces].iter().any(|l| !l.is_empty()) {
        return Err((field.to_owned(), "cannot be set together with principals or namespaces (or their negations)".into()));
    }
    if list.len() > 16 {
        return Err((field.to_owned(), format!("{} entries; at most 16", list.len())));
    }
    list.iter()
        .map(|v| {
            let bad = |why: &str| (field.to_owned(), format!("{v:?}: {why}"));
            if v.len() > 320 {
                return Err(bad("longer than 320 characters"));
            }
            if v.contains('*') {
                return Err(bad("wildcards are not allowed"));
            }
            match v.split_once('/') {
                Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => Ok((ns.to_owned(), sa.to_owned())),
                _ => Err(bad("not <namespace>/<service account>")),
            }
        })
        .collect()
}

/// Converts wire AuthorizationPolicy; errors name the field.
pub fn authz_from(ap: &k8s::AuthorizationPolicy) -> Result<AuthzPolicy, (String, String)> {
    let namespace = ap.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = ap.metadata.name.clone().unwrap_or_default();
    let action = match ap.spec.action.as_deref() {
        None | Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        Some("AUDIT") => Action::Audit,
        Some("CUSTOM") => Action::Custom,
        Some(o) => return Err(("spec.action".into(), format!("{o:?} is not one of ALLOW, DENY, AUDIT, CUSTOM"))),
    };
    let targets_waypoint = !ap.spec.target_refs.is_empty() || ap.spec.target_ref.is_some();
    let mut target_refs = Vec::new();
    // Istio PolicyTargetReference: `group` and `kind` name the target's
    // type, `name` it, `namespace` (if set) must be the policy's own.
    let refs = ap.spec.target_refs.iter().enumerate().map(|(i, r)| (format!("spec.targetRefs[{i}]"), r));
    for (f, r) in refs.chain(ap.spec.target_ref.iter().map(|r| ("spec.targetRef".to_owned(), r))) {
        let Some(obj) = r.as_object() else { return Err((f, "not an object".into())) };
        if let Some(k) = obj.keys().find(|k| !["group", "kind", "name", "namespace"].contains(&k.as_str())) {
            return Err((format!("{f}.{k}"), "not a field of a policy target reference (group, kind, name, namespace)".into()));
        }
        let get = |k: &str| obj.get(k).and_then(|v| v.as_str()).filter(|v| !v.is_empty()).map(str::to_owned);
        let (Some(kind), Some(target)) = (get("kind"), get("name")) else {
            return Err((f, "needs kind and name".into()));
        };
        // Istio's validation: an empty group is `core`; no namespace.
        let group = get("group").unwrap_or_else(|| "core".into());
        let want = match kind.as_str() {
            "Gateway" => "gateway.networking.k8s.io",
            "Service" => "core",
            "ServiceEntry" => "networking.istio.io",
            _ => return Err((format!("{f}.kind"), format!("{kind:?}: Skiff binds policies to a waypoint (Gateway), a Service or a ServiceEntry"))),
        };
        if group != want {
            return Err((format!("{f}.group"), format!("{group:?}: a {kind} target is in group {want:?}")));
        }
        if obj.contains_key("namespace") {
            return Err((format!("{f}.namespace"), "must not be set (Istio: cross-namespace targets are not supported)".into()));
        }
        target_refs.push((kind, target));
    }
    if targets_waypoint && ap.spec.selector.is_some() {
        return Err(("spec.selector".into(), "cannot be set together with targetRefs".into()));
    }
    if let Some(k) = ap.spec.unknown.keys().next() {
        return Err((format!("spec.{k}"), "not a field of AuthorizationPolicy (Istio security/v1 AuthorizationPolicy)".into()));
    }
    if ap.spec.provider.is_some() && action != Action::Custom {
        return Err(("spec.provider".into(), "only with action CUSTOM".into()));
    }
    let mut rules = Vec::new();
    for (i, r) in ap.spec.rules.iter().flatten().enumerate() {
        let mut rule = Rule::default();
        let unknown = |path: String, fields: &BTreeMap<String, serde_json::Value>, out: &mut Vec<String>| {
            out.extend(fields.keys().map(|k| format!("{path}.{k}")));
        };
        unknown(format!("spec.rules[{i}]"), &r.unknown, &mut rule.unsupported);
        for (j, f) in r.from.iter().enumerate() {
            unknown(format!("spec.rules[{i}].from[{j}]"), &f.unknown, &mut rule.unsupported);
            let p = |n: &str| format!("spec.rules[{i}].from[{j}].source.{n}");
            // Istio: `from.source` must be set and not empty.
            let Some(s) = &f.source else {
                return Err((format!("spec.rules[{i}].from[{j}].source"), "required".into()));
            };
            unknown(format!("spec.rules[{i}].from[{j}].source"), &s.unknown, &mut rule.unsupported);
            let lists = [
                &s.principals, &s.not_principals, &s.request_principals, &s.not_request_principals, &s.namespaces,
                &s.not_namespaces, &s.service_accounts, &s.not_service_accounts, &s.ip_blocks, &s.not_ip_blocks,
                &s.remote_ip_blocks, &s.not_remote_ip_blocks,
            ];
            if lists.iter().all(|l| l.is_empty()) && s.unknown.is_empty() {
                return Err((format!("spec.rules[{i}].from[{j}].source"), "must not be empty".into()));
            }
            rule.from.push(Source {
                principals: str_matches(&p("principals"), &s.principals)?,
                not_principals: str_matches(&p("notPrincipals"), &s.not_principals)?,
                namespaces: str_matches(&p("namespaces"), &s.namespaces)?,
                not_namespaces: str_matches(&p("notNamespaces"), &s.not_namespaces)?,
                service_accounts: service_accounts(&p("serviceAccounts"), &s.service_accounts, s)?,
                not_service_accounts: service_accounts(&p("notServiceAccounts"), &s.not_service_accounts, s)?,
                ip_blocks: cidrs(&p("ipBlocks"), &s.ip_blocks)?,
                not_ip_blocks: cidrs(&p("notIpBlocks"), &s.not_ip_blocks)?,
                remote_ip_blocks: cidrs(&p("remoteIpBlocks"), &s.remote_ip_blocks)?,
                not_remote_ip_blocks: cidrs(&p("notRemoteIpBlocks"), &s.not_remote_ip_blocks)?,
                has_l7: !s.request_principals.is_empty() || !s.not_request_principals.is_empty(),
            });
        }
        for (j, t) in r.to.iter().enumerate() {
            unknown(format!("spec.rules[{i}].to[{j}]"), &t.unknown, &mut rule.unsupported);
            let p = |n: &str| format!("spec.rules[{i}].to[{j}].operation.{n}");
            // Istio: `to.operation` must be set and not empty.
            let Some(o) = &t.operation else {
                return Err((format!("spec.rules[{i}].to[{j}].operation"), "required".into()));
            };
            unknown(format!("spec.rules[{i}].to[{j}].operation"), &o.unknown, &mut rule.unsupported);
            let lists = [&o.hosts, &o.not_hosts, &o.ports, &o.not_ports, &o.methods, &o.not_methods, &o.paths, &o.not_paths];
            if lists.iter().all(|l| l.is_empty()) && o.unknown.is_empty() {
                return Err((format!("spec.rules[{i}].to[{j}].operation"), "must not be empty".into()));
            }
            for (field, list) in [("paths", &o.paths), ("notPaths", &o.not_paths)] {
                for (k, v) in list.iter().enumerate() {
                    StrMatch::valid_path_template(v).map_err(|e| (format!("{}[{k}]", p(field)), e))?;
                }
            }
            rule.to.push(Operation {
                ports: ports(&p("ports"), &o.ports)?,
                not_ports: ports(&p("notPorts"), &o.not_ports)?,
                has_l7: [&o.hosts, &o.not_hosts, &o.methods, &o.not_methods, &o.paths, &o.not_paths]
                    .iter()
                    .any(|v| !v.is_empty()),
                hosts: str_matches(&p("hosts"), &o.hosts)?,
                not_hosts: str_matches(&p("notHosts"), &o.not_hosts)?,
                methods: str_matches(&p("methods"), &o.methods)?,
                not_methods: str_matches(&p("notMethods"), &o.not_methods)?,
                paths: str_matches(&p("paths"), &o.paths)?,
                not_paths: str_matches(&p("notPaths"), &o.not_paths)?,
            });
        }
        for (j, w) in r.when.iter().enumerate() {
            unknown(format!("spec.rules[{i}].when[{j}]"), &w.unknown, &mut rule.unsupported);
            let key = match w.key.as_str() {
                "source.ip" => ConditionKey::SourceIp,
                "remote.ip" => ConditionKey::RemoteIp,
                "source.namespace" => ConditionKey::SourceNamespace,
                "source.principal" => ConditionKey::SourcePrincipal,
                "destination.ip" => ConditionKey::DestinationIp,
                "destination.port" => ConditionKey::DestinationPort,
                "" => return Err((format!("spec.rules[{i}].when[{j}].key"), "required".into())),
                other => ConditionKey::L7(other.to_owned()),
            };
            if w.values.is_empty() && w.not_values.is_empty() {
                return Err((format!("spec.rules[{i}].when[{j}]"), "needs values or notValues".into()));
            }
            // A typo in an address or port must not silently never match
            // (a DENY would fail open).
            for (field, list) in [("values", &w.values), ("notValues", &w.not_values)] {
                let p = format!("spec.rules[{i}].when[{j}].{field}");
                match key {
                    ConditionKey::SourceIp | ConditionKey::RemoteIp | ConditionKey::DestinationIp => {
                        cidrs(&p, list)?;
                    }
                    ConditionKey::DestinationPort => {
                        ports(&p, list)?;
                    }
                    _ => {}
                }
            }
            rule.when.push(Condition { key, values: w.values.clone(), not_values: w.not_values.clone() });
        }
        rules.push(rule);
    }
    let selector = ap.spec.selector.as_ref().map(|s| s.match_labels.clone()).filter(|s| !s.is_empty());
    Ok(AuthzPolicy { namespace, name, selector, targets_waypoint, target_refs, action, rules })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> AuthzPolicy {
        let objs = k8s::parse_documents(yaml).unwrap();
        match &objs[0] {
            k8s::Object::AuthorizationPolicy(ap) => authz_from(ap).unwrap(),
            o => panic!("{o:?}"),
        }
    }

    fn conn(src: &str, principal: Option<&str>, port: u16) -> ConnInfo {
        ConnInfo {
            src_ip: src.parse().unwrap(),
            principal: principal.map(|p| format!("cluster.local/ns/{p}")),
            src_namespace: principal.map(|p| p.split('/').next().unwrap().to_owned()),
            dst_ip: "10.0.0.9".parse().unwrap(),
            dst_port: port,
        }
    }

    const HDR: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: app}\nspec:\n";

    #[test]
    fn authorization_semantics_table() {
        let allow_ns = policy(&format!("{HDR}  action: ALLOW\n  rules: [{{from: [{{source: {{namespaces: [frontend]}}}}]}}]\n"));
        let allow_principal = policy(&format!(
            "{HDR}  rules: [{{from: [{{source: {{principals: [cluster.local/ns/frontend/sa/web]}}}}]}}]\n"
        ));
        let deny_port = policy(&format!("{HDR}  action: DENY\n  rules: [{{to: [{{operation: {{ports: [\"9000\"]}}}}]}}]\n"));
        let allow_all = policy(&format!("{HDR}  action: ALLOW\n  rules: [{{}}]\n"));
        let allow_nothing = policy(&format!("{HDR}  action: ALLOW\n"));
        let deny_no_rules = policy(&format!("{HDR}  action: DENY\n"));
        let allow_ip = policy(&format!("{HDR}  rules: [{{from: [{{source: {{ipBlocks: [10.244.1.0/24]}}}}]}}]\n"));
        let deny_not_ip = policy(&format!("{HDR}  action: DENY\n  rules: [{{from: [{{source: {{notIpBlocks: [10.244.0.0/16]}}}}]}}]\n"));
        let allow_l7 = policy(&format!("{HDR}  rules: [{{to: [{{operation: {{methods: [GET]}}}}]}}]\n"));
        let deny_l7 = policy(&format!("{HDR}  action: DENY\n  rules: [{{to: [{{operation: {{paths: [/admin], ports: [\"8080\"]}}}}]}}]\n"));
        let audit_all = policy(&format!("{HDR}  action: AUDIT\n  rules: [{{}}]\n"));
        let allow_when = policy(&format!(
            "{HDR}  rules: [{{when: [{{key: source.namespace, values: [front*]}}, {{key: destination.port, notValues: [\"22\"]}}]}}]\n"
        ));
        let deny_plaintext = policy(&format!("{HDR}  action: DENY\n  rules: [{{from: [{{source: {{notPrincipals: [\"*\"]}}}}]}}]\n"));

        let web = conn("10.244.1.5", Some("frontend/sa/web"), 8080);
        let other_sa = conn("10.244.1.6", Some("frontend/sa/batch"), 8080);
        let other_ns = conn("10.244.2.5", Some("backend/sa/api"), 8080);
        let plaintext = conn("10.244.1.7", None, 8080);
        let web_9000 = conn("10.244.1.5", Some("frontend/sa/web"), 9000);
        let outside = conn("192.0.2.1", None, 8080);

        #[rustfmt::skip]
        let cases: Vec<(&str, Vec<&AuthzPolicy>, &ConnInfo, bool)> = vec![
            ("no policies: allowed", vec![], &web, true),
            ("ALLOW by namespace: match", vec![&allow_ns], &web, true),
            ("ALLOW by namespace: other ns", vec![&allow_ns], &other_ns, false),
            ("ALLOW by namespace: plaintext has no namespace", vec![&allow_ns], &plaintext, false),
            ("ALLOW by principal: match", vec![&allow_principal], &web, true),
            ("ALLOW by principal: other SA", vec![&allow_principal], &other_sa, false),
            ("DENY by port: denied port", vec![&deny_port], &web_9000, false),
            ("DENY by port: other port", vec![&deny_port], &web, true),
            ("DENY beats ALLOW", vec![&allow_all, &deny_port], &web_9000, false),
            ("ALLOW all with rules: [{}]", vec![&allow_all], &plaintext, true),
            ("ALLOW without rules allows nothing", vec![&allow_nothing], &web, false),
            ("DENY without rules denies nothing", vec![&deny_no_rules], &web, true),
            ("ipBlocks: inside", vec![&allow_ip], &plaintext, true),
            ("ipBlocks: outside", vec![&allow_ip], &other_ns, false),
            ("notIpBlocks DENY: outside the mesh range", vec![&deny_not_ip], &outside, false),
            ("notIpBlocks DENY: inside", vec![&deny_not_ip], &web, true),
            ("L7 ALLOW rule never matches at L4", vec![&allow_l7], &web, false),
            ("L7 DENY rule matches on its L4 part", vec![&deny_l7], &web, false),
            ("L7 DENY rule: L4 part does not match", vec![&deny_l7], &web_9000, true),
            ("AUDIT alone changes nothing", vec![&audit_all], &web, true),
            ("AUDIT does not rescue a failed ALLOW", vec![&audit_all, &allow_ns], &other_ns, false),
            ("when: namespace glob and notValues", vec![&allow_when], &web, true),
            ("when: namespace mismatch", vec![&allow_when], &other_ns, false),
            ("notPrincipals * denies plaintext", vec![&deny_plaintext], &plaintext, false),
            ("notPrincipals * keeps mTLS", vec![&deny_plaintext], &web, true),
            ("one of two ALLOW policies suffices", vec![&allow_ns, &allow_ip], &plaintext, true),
        ];
        for (name, ps, c, want) in cases {
            let d = evaluate(&ps, c);
            assert_eq!(d.allowed, want, "case {name}: {d:?}");
        }
        let d = evaluate(&[&audit_all, &allow_ns], &web);
        assert_eq!(d.audited, vec!["app/p".to_owned()]);
        assert_eq!(d.policy.as_deref(), Some("app/p"));
    }

    /// Istio reference, AuthorizationPolicy: `Source` (serviceAccounts,
    /// principals), `Rule` ("a match occurs when at least one source, one
    /// operation and all conditions match"), and the fail-closed rule for
    /// what cannot be evaluated: an ALLOW rule never matches, a DENY rule
    /// matches on what can be evaluated. Fields Skiff does not know (a typo,
    /// a newer field) are such attributes: never an empty source that
    /// matches every peer.
    #[test]
    fn unknown_or_unevaluable_attributes_never_widen_an_allow() {
        let allow_sa = policy(&format!("{HDR}  rules: [{{from: [{{source: {{serviceAccounts: [frontend/web]}}}}]}}]\n"));
        let not_sa = policy(&format!("{HDR}  action: DENY\n  rules: [{{from: [{{source: {{notServiceAccounts: [frontend/web]}}}}]}}]\n"));
        // `principal` (a typo of principals) and `trustDomains` (not an
        // Istio field) are unknown.
        let allow_typo = policy(&format!("{HDR}  rules: [{{from: [{{source: {{principal: [cluster.local/ns/frontend/sa/web]}}}}]}}]\n"));
        let allow_unknown_and_known = policy(&format!(
            "{HDR}  rules: [{{from: [{{source: {{namespaces: [frontend], trustDomains: [cluster.local]}}}}]}}]\n"
        ));
        let deny_typo = policy(&format!("{HDR}  action: DENY\n  rules: [{{from: [{{source: {{principal: [x]}}}}]}}]\n"));
        let deny_typo_and_port = policy(&format!(
            "{HDR}  action: DENY\n  rules: [{{from: [{{source: {{namespaces: [backend], nameSpaces: [x]}}}}], to: [{{operation: {{ports: [\"9000\"]}}}}]}}]\n"
        ));
        let allow_unknown_rule_field = policy(&format!("{HDR}  rules: [{{form: [{{source: {{namespaces: [frontend]}}}}]}}]\n"));
        let allow_unknown_when_field = policy(&format!(
            "{HDR}  rules: [{{when: [{{key: source.namespace, values: [frontend], notvalues: [x]}}]}}]\n"
        ));
        let allow_jwt = policy(&format!("{HDR}  rules: [{{from: [{{source: {{requestPrincipals: [\"*\"]}}}}]}}]\n"));
        let allow_ns = policy(&format!("{HDR}  rules: [{{from: [{{source: {{namespaces: [frontend]}}}}]}}]\n"));

        let web = conn("10.244.1.5", Some("frontend/sa/web"), 8080);
        let other_sa = conn("10.244.1.6", Some("frontend/sa/batch"), 8080);
        let other_ns = conn("10.244.2.5", Some("backend/sa/api"), 8080);
        let other_ns_9000 = conn("10.244.2.5", Some("backend/sa/api"), 9000);
        let plaintext = conn("10.244.1.7", None, 8080);

        #[rustfmt::skip]
        let cases: Vec<(&str, &AuthzPolicy, &ConnInfo, bool)> = vec![
            ("serviceAccounts: that account", &allow_sa, &web, true),
            ("serviceAccounts: another account of the namespace", &allow_sa, &other_sa, false),
            ("serviceAccounts: plaintext has no account", &allow_sa, &plaintext, false),
            ("notServiceAccounts DENY: another account denied", &not_sa, &other_sa, false),
            ("notServiceAccounts DENY: that account passes", &not_sa, &web, true),
            ("unknown source field: ALLOW never matches", &allow_typo, &web, false),
            ("unknown source field: ALLOW never matches plaintext", &allow_typo, &plaintext, false),
            ("unknown beside a known field: ALLOW never matches", &allow_unknown_and_known, &web, false),
            ("unknown source field: DENY matches on the rest (all)", &deny_typo, &web, false),
            ("DENY: known namespace and port still decide", &deny_typo_and_port, &other_ns_9000, false),
            ("DENY: known port does not match", &deny_typo_and_port, &other_ns, true),
            ("unknown rule field: ALLOW never matches", &allow_unknown_rule_field, &web, false),
            ("unknown condition field: ALLOW never matches", &allow_unknown_when_field, &web, false),
            ("requestPrincipals (JWT) at L4: ALLOW never matches", &allow_jwt, &web, false),
            ("control: the same ALLOW without unknowns matches", &allow_ns, &web, true),
        ];
        for (name, p, c, want) in cases {
            assert_eq!(evaluate(&[p], c).allowed, want, "case {name}");
        }
        assert_eq!(allow_typo.rules[0].unsupported, vec!["spec.rules[0].from[0].source.principal"]);
        assert_eq!(allow_unknown_rule_field.rules[0].unsupported, vec!["spec.rules[0].form"]);
    }

    /// Istio's validation of AuthorizationPolicy: an empty or missing
    /// `from.source` / `to.operation` is invalid, `serviceAccounts` follows
    /// the CRD's rules (namespace/name, no wildcard, at most 16, not with
    /// principals or namespaces), path templates are whole segments with
    /// `{**}` last, unknown spec fields and `provider` without CUSTOM are
    /// refused. Each refusal names the field.
    #[test]
    fn invalid_authorization_policies_are_refused_naming_the_field() {
        let bad = |rules: &str| match &k8s::parse_documents(&format!("{HDR}{rules}")).unwrap()[0] {
            k8s::Object::AuthorizationPolicy(ap) => authz_from(ap).unwrap_err(),
            o => panic!("{o:?}"),
        };
        #[rustfmt::skip]
        let cases: &[(&str, &str, &str)] = &[
            ("  rules: [{from: [{source: {}}]}]\n", "spec.rules[0].from[0].source", "must not be empty"),
            ("  rules: [{from: [{}]}]\n", "spec.rules[0].from[0].source", "required"),
            ("  rules: [{to: [{operation: {}}]}]\n", "spec.rules[0].to[0].operation", "must not be empty"),
            ("  rules: [{to: [{}]}]\n", "spec.rules[0].to[0].operation", "required"),
            ("  rules: [{from: [{source: {serviceAccounts: [web]}}]}]\n", "spec.rules[0].from[0].source.serviceAccounts", "not <namespace>/<service account>"),
            ("  rules: [{from: [{source: {serviceAccounts: [\"app/*\"]}}]}]\n", "spec.rules[0].from[0].source.serviceAccounts", "wildcards"),
            ("  rules: [{from: [{source: {serviceAccounts: [app/web], namespaces: [app]}}]}]\n", "spec.rules[0].from[0].source.serviceAccounts", "together with principals or namespaces"),
            ("  rules: [{from: [{source: {notServiceAccounts: [app/web], notPrincipals: [x]}}]}]\n", "spec.rules[0].from[0].source.notServiceAccounts", "together"),
            ("  rules: [{to: [{operation: {paths: [\"/a/{**}/{*}\"]}}]}]\n", "spec.rules[0].to[0].operation.paths[0]", "no operator may follow"),
            ("  rules: [{to: [{operation: {notPaths: [\"/{*}/admin*\"]}}]}]\n", "spec.rules[0].to[0].operation.notPaths[0]", "only as the operators"),
            ("  rule: [{}]\n", "spec.rule", "not a field"),
            ("  action: ALLOW\n  provider: {name: ext}\n", "spec.provider", "only with action CUSTOM"),
        ];
        for (rules, field, why) in cases {
            let (f, m) = bad(rules);
            assert_eq!(&f, field, "{rules}: {m}");
            assert!(m.contains(why), "{rules}: {m}");
        }
        let many: Vec<String> = (0..17).map(|i| format!("app/sa{i}")).collect();
        let (f, m) = bad(&format!("  rules: [{{from: [{{source: {{serviceAccounts: [{}]}}}}]}}]\n", many.join(", ")));
        assert_eq!((f.as_str(), m.contains("at most 16")), ("spec.rules[0].from[0].source.serviceAccounts", true));
    }

    /// Istio reference, AuthorizationPolicy `Operation.paths`: path
    /// templates, `{*}` one segment, `{**}` one or more (last operator);
    /// `Operation.hosts`: "The match is case-insensitive".
    #[test]
    fn path_templates_and_case_insensitive_hosts() {
        #[rustfmt::skip]
        let cases: &[(&str, &str, bool)] = &[
            ("/api/{*}/orders", "/api/v1/orders", true),
            ("/api/{*}/orders", "/api/v1/v2/orders", false),
            ("/api/{*}/orders", "/api//orders", false),
            ("/api/{*}", "/api/", false),
            ("/api/{**}", "/api/a/b/c", true),
            ("/api/{**}", "/api/a", true),
            // `{**}` is zero or more segments (Envoy's `**`): the empty
            // remainder matches, so `/admin/{**}` covers `/admin/`.
            ("/api/{**}", "/api/", true),
            ("/api/{**}", "/api", false),
            ("/{**}", "/", true),
            ("/{**}.mpd", "/a/b/c.mpd", true),
            ("/{**}.mpd", "/a/b/c.mp4", false),
            ("/files/{*}.pdf", "/files/x.pdf", true),
            ("/files/{*}.pdf", "/files/a/x.pdf", false),
            ("/{*}/admin/{**}", "/x/admin/users/1", true),
            ("/{*}/admin/{**}", "/x/public/users/1", false),
            ("/admin*", "/admin/x", true),
            ("/admin", "/admin", true),
        ];
        for (pattern, path, want) in cases {
            assert_eq!(StrMatch((*pattern).into()).matches_path(path), *want, "{pattern} vs {path}");
        }
        let deny_tpl = policy(&format!("{HDR}  action: DENY\n  rules: [{{to: [{{operation: {{paths: [\"/users/{{*}}/secrets\"]}}}}]}}]\n"));
        let allow_host = policy(&format!("{HDR}  rules: [{{to: [{{operation: {{hosts: [Shop.Example.COM]}}}}]}}]\n"));
        let web = conn("10.244.1.5", Some("frontend/sa/web"), 8080);
        let req = |path: &'static str, host: &'static str| L7Attrs { method: "GET", path, host, headers: &[] };
        assert!(!evaluate_l7(&[&deny_tpl], &web, &req("/users/42/secrets", "a")).allowed, "a DENY with a path template matches");
        assert!(evaluate_l7(&[&deny_tpl], &web, &req("/users/42/public", "a")).allowed);
        assert!(evaluate_l7(&[&allow_host], &web, &req("/", "shop.example.com")).allowed, "hosts match case-insensitively");
        assert!(!evaluate_l7(&[&allow_host], &web, &req("/", "other.example.com")).allowed);
    }

    /// ARCHITECTURE.md's AuthorizationPolicy table names every field of
    /// the wire types (`notX` through its `X` row's "negation"), and only
    /// fields that exist: the table cannot drift from the code.
    /// Istio Source.ipBlocks: "single IP (e.g. 203.0.113.4) or CIDR (e.g.
    /// 203.0.113.0/24)", IPv4 or IPv6. The peer here is IPv4: an IPv6
    /// block never contains it.
    #[test]
    fn cidrs_of_both_families() {
        #[rustfmt::skip]
        let cases: &[(&str, &[(&str, bool)])] = &[
            ("10.1.0.0/16", &[("10.1.2.3", true), ("10.2.0.1", false)]),
            ("10.1.2.3", &[("10.1.2.3", true), ("10.1.2.4", false)]),
            ("0.0.0.0/0", &[("192.0.2.1", true), ("2001:db8::1", false)]),
            ("2001:db8::/32", &[("2001:db8:1::1", true), ("2001:db9::1", false), ("10.0.0.1", false)]),
            ("::/0", &[("2001:db8::1", true), ("10.0.0.1", false)]),
            ("fd00::1", &[("fd00::1", true), ("fd00::2", false)]),
        ];
        for (cidr, ips) in cases {
            let c = Cidr::parse(cidr).unwrap_or_else(|| panic!("{cidr} parses"));
            for (ip, want) in ips.iter() {
                assert_eq!(c.contains(ip.parse().unwrap()), *want, "{cidr} contains {ip}");
            }
        }
        for bad in ["10.0.0.0/33", "fd00::/129", "10.0.0.0/", "10.0.0.0/+8", "10.0.0", "fd00::/ 8", "host"] {
            assert_eq!(Cidr::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn docs_table_names_every_authorization_policy_field() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../ARCHITECTURE.md")).unwrap();
        let start = doc.find("### AuthorizationPolicy: how Skiff reads Istio's fields").expect("the table's heading");
        let rows: Vec<&str> = doc[start..].lines().skip_while(|l| !l.starts_with('|')).take_while(|l| l.starts_with('|')).skip(2).collect();
        let mut names = BTreeMap::new(); // name -> its row mentions negation
        for row in &rows {
            let first = row.split('|').nth(1).unwrap_or("");
            // Rows about `when[]` key names (`source.ip` …) name attributes, not fields.
            if first.contains("keys") || first.contains("request.headers") {
                continue;
            }
            let negation = first.contains("negation");
            for tick in first.split('`').skip(1).step_by(2) {
                for part in tick.replace("[]", "").replace("(s)", ",s").split(['.', ',']) {
                    let part = part.trim();
                    if part == "s" {
                        names.insert("targetRefs".to_owned(), negation);
                    } else if !part.is_empty() && part.chars().all(|c| c.is_ascii_alphabetic()) {
                        names.insert(part.to_owned(), negation);
                    }
                }
            }
        }
        let keys = |v: serde_json::Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
        let spec = k8s::AuthorizationPolicySpec {
            target_refs: vec![serde_json::json!({})],
            target_ref: Some(serde_json::json!({})),
            provider: Some(serde_json::json!({})),
            ..Default::default()
        };
        let mut wire = keys(serde_json::to_value(&spec).unwrap());
        wire.extend(keys(serde_json::to_value(k8s::AuthzRule::default()).unwrap()));
        wire.extend(keys(serde_json::to_value(k8s::AuthzFrom::default()).unwrap()));
        wire.extend(keys(serde_json::to_value(k8s::AuthzTo::default()).unwrap()));
        wire.extend(keys(serde_json::to_value(k8s::AuthzSource::default()).unwrap()));
        wire.extend(keys(serde_json::to_value(k8s::AuthzOperation::default()).unwrap()));
        wire.extend(keys(serde_json::to_value(k8s::AuthzCondition::default()).unwrap()));
        assert!(wire.len() >= 30, "{wire:?}");
        for w in &wire {
            let positive = w.strip_prefix("not").map(|p| p[..1].to_ascii_lowercase() + &p[1..]);
            let named = names.contains_key(w) || positive.as_ref().is_some_and(|p| names.get(p) == Some(&true));
            assert!(named, "ARCHITECTURE.md's AuthorizationPolicy table does not name `{w}`");
        }
        for n in names.keys() {
            assert!(wire.contains(n), "the table names `{n}`, which is not an AuthorizationPolicy field");
        }
    }

    #[test]
    fn l7_rules_at_the_waypoint() {
        let allow_get_public = policy(&format!("{HDR}  rules: [{{to: [{{operation: {{methods: [GET], paths: [/public*]}}}}]}}]\n"));
        let deny_post_admin = policy(&format!("{HDR}  action: DENY\n  rules: [{{to: [{{operation: {{methods: [POST], paths: [/admin]}}}}]}}]\n"));
        let allow_header = policy(&format!("{HDR}  rules: [{{when: [{{key: \"request.headers[x-team]\", values: [blue]}}]}}]\n"));
        let jwt = policy(&format!("{HDR}  rules: [{{from: [{{source: {{requestPrincipals: [\"*\"]}}}}]}}]\n"));
        let c = conn("10.244.1.5", Some("frontend/sa/web"), 8080);
        let none: Vec<(String, String)> = vec![];
        let blue = vec![("x-team".to_owned(), "blue".to_owned())];
        let req = |method: &'static str, path: &'static str, headers: &[(String, String)]| {
            (method, path, headers.to_vec())
        };
        #[rustfmt::skip]
        let cases: Vec<(&str, Vec<&AuthzPolicy>, (&str, &str, Vec<(String, String)>), bool)> = vec![
            ("GET /public allowed", vec![&allow_get_public], req("GET", "/public/x", &none), true),
            ("POST /public not allowed", vec![&allow_get_public], req("POST", "/public/x", &none), false),
            ("GET /private not allowed", vec![&allow_get_public], req("GET", "/private", &none), false),
            ("POST /admin denied", vec![&deny_post_admin], req("POST", "/admin", &none), false),
            ("GET /admin passes the DENY", vec![&deny_post_admin], req("GET", "/admin", &none), true),
            ("header condition met", vec![&allow_header], req("GET", "/", &blue), true),
            ("header condition missing", vec![&allow_header], req("GET", "/", &none), false),
            ("JWT principals cannot be checked: ALLOW fails closed", vec![&jwt], req("GET", "/", &none), false),
        ];
        for (name, ps, (method, path, headers), want) in cases {
            let r = L7Attrs { method, path, host: "reviews", headers: &headers };
            assert_eq!(evaluate_l7(&ps, &c, &r).allowed, want, "case {name}");
        }
    }

    #[test]
    fn policy_scope() {
        let labels: BTreeMap<String, String> = [("app".to_owned(), "web".to_owned())].into();
        let p = |ns: &str, sel: Option<&str>, waypoint: bool| AuthzPolicy {
            namespace: ns.into(),
            name: "x".into(),
            selector: sel.map(|v| [("app".to_owned(), v.to_owned())].into()),
            targets_waypoint: waypoint,
            target_refs: vec![],
            action: Action::Allow,
            rules: vec![],
        };
        assert!(p("app", None, false).applies_to("istio-system", "app", &labels));
        assert!(p("istio-system", None, false).applies_to("istio-system", "app", &labels));
        assert!(p("istio-system", Some("web"), false).applies_to("istio-system", "app", &labels));
        assert!(!p("istio-system", Some("db"), false).applies_to("istio-system", "app", &labels));
        assert!(p("app", Some("web"), false).applies_to("istio-system", "app", &labels));
        assert!(!p("other", None, false).applies_to("istio-system", "app", &labels));
        assert!(!p("app", None, true).applies_to("istio-system", "app", &labels));
    }

    #[test]
    fn invalid_policies_name_the_field() {
        let bad = |yaml: &str| match &k8s::parse_documents(yaml).unwrap()[0] {
            k8s::Object::AuthorizationPolicy(ap) => authz_from(ap).unwrap_err(),
            o => panic!("{o:?}"),
        };
        assert_eq!(bad(&format!("{HDR}  action: MAYBE\n")).0, "spec.action");
        assert_eq!(bad(&format!("{HDR}  rules: [{{from: [{{source: {{ipBlocks: [10.0.0.0/33]}}}}]}}]\n")).0, "spec.rules[0].from[0].source.ipBlocks");
        assert_eq!(bad(&format!("{HDR}  rules: [{{to: [{{operation: {{ports: [http]}}}}]}}]\n")).0, "spec.rules[0].to[0].operation.ports");
        assert_eq!(bad(&format!("{HDR}  rules: [{{when: [{{key: source.ip, values: [10.1.0.0/33]}}]}}]\n")).0, "spec.rules[0].when[0].values");
        assert_eq!(bad(&format!("{HDR}  rules: [{{when: [{{key: destination.port, notValues: [ssh]}}]}}]\n")).0, "spec.rules[0].when[0].notValues");
    }

    /// Port-level keys come as YAML integers or strings; both name the port.
    #[test]
    fn port_level_mtls_keys_are_ports_written_as_numbers_or_strings() {
        let read = |ports: &str| {
            let yaml = format!(
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: p, namespace: app}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  portLevelMtls: {ports}\n"
            );
            match &k8s::parse_documents(&yaml).unwrap()[0] {
                k8s::Object::PeerAuthentication(o) => peer_authn_from(o),
                o => panic!("{o:?}"),
            }
        };
        let got = read("{8080: {mode: DISABLE}, \"9090\": {mode: STRICT}}").unwrap();
        assert_eq!(got.port_modes.into_iter().collect::<Vec<_>>(), vec![(8080, MtlsMode::Disable), (9090, MtlsMode::Strict)]);
        assert_eq!(read("{http: {mode: DISABLE}}").unwrap_err().0, "spec.portLevelMtls");
        assert_eq!(read("{0: {mode: DISABLE}}").unwrap_err().0, "spec.portLevelMtls");
        assert_eq!(read("{8080: {mode: MAYBE}}").unwrap_err().0, "spec.portLevelMtls.8080.mode");
    }

    fn pa(ns: &str, name: &str, sel: Option<&str>, mode: MtlsMode, ports: &[(u16, MtlsMode)]) -> PeerAuthn {
        PeerAuthn {
            namespace: ns.into(),
            name: name.into(),
            selector: sel.map(|v| [("app".to_owned(), v.to_owned())].into()),
            mode,
            port_modes: ports.iter().copied().collect(),
            fail_closed: false,
            created: None,
        }
    }

    /// Istio reference, PeerAuthentication: "workload-specific policies
    /// override namespace-wide ones, which override the mesh-wide one in
    /// the root namespace"; `portLevelMtls` overrides the workload's mode on
    /// its port; UNSET inherits from the parent; PERMISSIVE when nothing is
    /// set; among several at one level the oldest applies.
    #[test]
    fn peer_authentication_inheritance() {
        use MtlsMode::*;
        let labels: BTreeMap<String, String> = [("app".to_owned(), "web".to_owned())].into();
        let root = "istio-system";
        #[rustfmt::skip]
        let cases: Vec<(&str, Vec<PeerAuthn>, u16, MtlsMode)> = vec![
            ("nothing: PERMISSIVE", vec![], 80, Permissive),
            ("mesh STRICT", vec![pa(root, "m", None, Strict, &[])], 80, Strict),
            ("namespace overrides mesh", vec![pa(root, "m", None, Strict, &[]), pa("app", "n", None, Permissive, &[])], 80, Permissive),
            ("namespace UNSET inherits mesh", vec![pa(root, "m", None, Strict, &[]), pa("app", "n", None, Unset, &[])], 80, Strict),
            ("workload overrides namespace", vec![pa("app", "n", None, Strict, &[]), pa("app", "w", Some("web"), Disable, &[])], 80, Disable),
            ("workload UNSET inherits namespace", vec![pa("app", "n", None, Strict, &[]), pa("app", "w", Some("web"), Unset, &[])], 80, Strict),
            ("non-matching selector ignored", vec![pa("app", "n", None, Strict, &[]), pa("app", "w", Some("db"), Disable, &[])], 80, Strict),
            ("port level wins on its port", vec![pa("app", "w", Some("web"), Strict, &[(8080, Permissive)])], 8080, Permissive),
            ("port level: other port", vec![pa("app", "w", Some("web"), Strict, &[(8080, Permissive)])], 80, Strict),
            ("port level UNSET inherits", vec![pa("app", "n", None, Strict, &[]), pa("app", "w", Some("web"), Unset, &[(8080, Unset)])], 8080, Strict),
            ("other namespace's policy ignored", vec![pa("other", "n", None, Strict, &[])], 80, Permissive),
            ("all UNSET: PERMISSIVE", vec![pa(root, "m", None, Unset, &[])], 80, Permissive),
            ("two at one level: the oldest wins, not the first name",
                vec![PeerAuthn { created: Some("2026-02-01T00:00:00Z".into()), ..pa("app", "a", None, Permissive, &[]) },
                     PeerAuthn { created: Some("2025-01-01T00:00:00Z".into()), ..pa("app", "z", None, Strict, &[]) }], 80, Strict),
            ("no creation times: by name", vec![pa("app", "b", None, Permissive, &[]), pa("app", "a", None, Strict, &[])], 80, Strict),
        ];
        for (name, ps, port, want) in cases {
            assert_eq!(effective_mtls(&ps, root, "app", &labels, port), want, "case {name}");
        }
    }
}
