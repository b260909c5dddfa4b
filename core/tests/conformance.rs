//! Istio conformance tables: every field of VirtualService,
//! DestinationRule, PeerAuthentication and AuthorizationPolicy as Istio's
//! reference defines it (the `networking.istio.io/v1` and
//! `security.istio.io/v1` schemas), each with Skiff's reading:
//!
//! - `H`, honoured: at least one case below asserts the decision Istio
//!   documents for it (a routing decision, a policy decision, a traffic
//!   policy value, or a refusal Istio's validation makes), citing the
//!   reference section it encodes;
//! - `D`, honoured with a difference written down in ARCHITECTURE.md: a
//!   case asserts what Skiff does instead;
//! - `R`, refused: the object is refused naming the field (or a refused
//!   field above it), never read as if the field were absent. Each is
//!   probed by setting that one field on an otherwise valid object.
//!
//! A field missing from a list, a list entry without a case, or an
//! ARCHITECTURE.md table that disagrees with a list fails a test here.
//!
//! The contents of `subsets[].trafficPolicy` and of
//! `trafficPolicy.portLevelSettings[]` are those of `trafficPolicy`; their
//! cases are about how they merge, not each field again.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use skiff_core::{egress, gateway, k8s};
use skiff_core::model::Snapshot;
use skiff_core::policy::{self, AuthzPolicy, ConnInfo, L7Attrs, MtlsMode, PeerAuthn};
use skiff_core::routing::{self, AbortStatus, DestinationRule, HashKey, LoadBalancer, RequestInfo, TlsMode, VirtualService};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Reading {
    /// Honoured as Istio documents it.
    H,
    /// Honoured with a documented difference.
    D,
    /// Refused aloud.
    R,
}
use Reading::*;

/// One case: the fields it covers, the Istio reference section, the
/// object's `spec` (flow YAML) and either a check of what Skiff made of it
/// or the field path a refusal must name.
struct Case<T> {
    fields: &'static [&'static str],
    cite: &'static str,
    spec: &'static str,
    expect: Result<fn(&T), &'static str>,
}

fn ok<T>(f: fn(&T)) -> Result<fn(&T), &'static str> {
    Ok(f)
}

const VS: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService";
const DR: &str = "apiVersion: networking.istio.io/v1\nkind: DestinationRule";
const PA: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication";
const AP: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy";

/// The object `shop/<name>` of `header`'s kind with `spec`, through the
/// mesh's reading: the manifest parser and the per-object snapshot build.
fn build(header: &str, spec: &str) -> Snapshot {
    let text = format!("{header}\nmetadata: {{name: conformance, namespace: shop}}\nspec: {spec}\n");
    let objects = k8s::parse_documents(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
    Snapshot::build(objects.into_iter().map(|o| ("conformance.yaml".to_owned(), o)).collect(), None)
}

/// What the snapshot took, or the field its refusal names.
fn taken<T: Clone>(s: &Snapshot, list: impl Fn(&Snapshot) -> Option<&T>) -> Result<T, String> {
    match s.rejected.first() {
        Some(r) => Err(r.error.field.clone()),
        None => Ok(list(s).expect("taken").clone()),
    }
}

fn run<T: Clone>(kind: &str, header: &str, cases: &[Case<T>], list: impl Fn(&Snapshot) -> Option<&T>) {
    for c in cases {
        let got = taken(&build(header, c.spec), &list);
        match (&c.expect, got) {
            (Ok(check), Ok(t)) => check(&t),
            (Ok(_), Err(field)) => panic!("{kind} {:?} ({}): refused at {field}: {}", c.fields, c.cite, c.spec),
            (Err(want), Err(field)) => assert_eq!(&field, want, "{kind} {:?} ({}): {}", c.fields, c.cite, c.spec),
            (Err(want), Ok(_)) => panic!("{kind} {:?} ({}): taken, but Istio refuses it at {want}: {}", c.fields, c.cite, c.spec),
        }
    }
}

/// Every `H`/`D` field has a case that takes the object; every field a
/// case names is in the list; every `R` field refuses, naming itself or a
/// refused field above it.
fn complete<T>(kind: &str, header: &str, fields: &[(&str, Reading)], cases: &[Case<T>], base: Value) {
    let readings: BTreeMap<&str, Reading> = fields.iter().copied().collect();
    assert_eq!(readings.len(), fields.len(), "{kind}: a field listed twice");
    for c in cases {
        for f in c.fields {
            match readings.get(f) {
                Some(H | D) => {}
                Some(R) => panic!("{kind}: a case covers {f}, listed as refused"),
                None => panic!("{kind}: a case names {f}, not a field of Istio's {kind}"),
            }
        }
    }
    for (f, r) in fields {
        match r {
            H | D => assert!(
                cases.iter().any(|c| c.expect.is_ok() && c.fields.contains(f)),
                "{kind}.{f}: listed as honoured, but no case shows what it does"
            ),
            R => {
                let field = probe(header, base.clone(), f);
                let at = field.strip_prefix("spec.").unwrap_or(&field).replace("[0]", "[]");
                let covers = *f == at || (f.starts_with(&at) && matches!(f.as_bytes()[at.len()], b'.' | b'['));
                assert!(covers && readings.get(at.as_str()) == Some(&R), "{kind}.{f}: refused at {field}, not at a refused field");
            }
        }
    }
}

/// Sets the field `path` (`a[].b.c`; `[]` is the first element) to a
/// non-empty placeholder on `base` and returns the field the refusal names.
fn probe(header: &str, mut base: Value, path: &str) -> String {
    let mut at = &mut base;
    let segments: Vec<&str> = path.split('.').collect();
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        let (key, array) = match seg.strip_suffix("[]") {
            Some(k) => (k, true),
            None => (*seg, false),
        };
        let obj = at.as_object_mut().unwrap_or_else(|| panic!("{path}: {key} is under a non-object"));
        if last {
            obj.insert(key.to_owned(), json!("placeholder"));
            break;
        }
        let entry = obj.entry(key.to_owned()).or_insert_with(|| if array { json!([{}]) } else { json!({}) });
        at = if array { &mut entry.as_array_mut().expect("an array")[0] } else { entry };
    }
    let (api, kind) = header.split_once('\n').expect("a header");
    let object = json!({
        "apiVersion": api.trim_start_matches("apiVersion: "),
        "kind": kind.trim_start_matches("kind: "),
        "metadata": {"name": "probe", "namespace": "shop"},
        "spec": base,
    });
    let obj = k8s::parse_object(&object).unwrap_or_else(|e| panic!("{path}: {e}"));
    let s = Snapshot::build(vec![("probe.yaml".to_owned(), obj)], None);
    match s.rejected.first() {
        Some(r) => r.error.field.clone(),
        None => panic!("{path}: set on {object}, and the object was taken"),
    }
}

/// ARCHITECTURE.md's table under `heading`: each row's field paths (the
/// backticked words of its first column) and whether it says "refused".
fn docs_table(heading: &str) -> Vec<(Vec<String>, bool)> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let start = doc.find(heading).unwrap_or_else(|| panic!("ARCHITECTURE.md has no {heading:?}"));
    let rows = doc[start..].lines().skip_while(|l| !l.starts_with('|')).take_while(|l| l.starts_with('|')).skip(2);
    rows.map(|row| {
        let cols: Vec<&str> = row.split('|').collect();
        let paths = cols[1].split('`').skip(1).step_by(2).map(str::to_owned).collect();
        (paths, cols[2].trim_start().starts_with("refused"))
    })
    .collect()
}

/// Every field is in the table (in its own row or under a field above it;
/// the most specific row counts), a row says "refused" exactly for the
/// refused fields, and the table names no field Istio does not have.
fn docs_agree(kind: &str, heading: &str, fields: &[(&str, Reading)]) {
    let table = docs_table(heading);
    let readings: BTreeMap<&str, Reading> = fields.iter().copied().collect();
    for (paths, _) in &table {
        for p in paths {
            assert!(readings.contains_key(p.as_str()), "ARCHITECTURE.md's {kind} table names `{p}`, not a field of Istio's {kind}");
        }
    }
    for (f, r) in fields {
        let row = table
            .iter()
            .flat_map(|(paths, refused)| paths.iter().map(move |p| (p, *refused)))
            .filter(|(p, _)| *f == p.as_str() || (f.starts_with(p.as_str()) && matches!(f.as_bytes()[p.len()], b'.' | b'[')))
            .max_by_key(|(p, _)| p.len());
        let Some((p, refused)) = row else { panic!("ARCHITECTURE.md's {kind} table does not cover `{f}`") };
        assert_eq!(refused, *r == R, "ARCHITECTURE.md's {kind} row `{p}` and the code disagree on whether `{f}` is refused");
    }
}

// ---------------------------------------------------------------------
// VirtualService

#[rustfmt::skip]
const VIRTUAL_SERVICE: &[(&str, Reading)] = &[
    ("exportTo", H), ("gateways", H), ("hosts", H),
    ("http", H), ("http[].name", H),
    ("http[].corsPolicy", H), ("http[].corsPolicy.allowCredentials", H), ("http[].corsPolicy.allowHeaders", H),
    ("http[].corsPolicy.allowMethods", H), ("http[].corsPolicy.allowOrigin", H), ("http[].corsPolicy.allowOrigins", H),
    ("http[].corsPolicy.allowOrigins[].exact", H), ("http[].corsPolicy.allowOrigins[].prefix", H),
    ("http[].corsPolicy.allowOrigins[].regex", H), ("http[].corsPolicy.exposeHeaders", H), ("http[].corsPolicy.maxAge", H),
    ("http[].corsPolicy.unmatchedPreflights", H),
    ("http[].delegate", R), ("http[].delegate.name", R), ("http[].delegate.namespace", R),
    ("http[].directResponse", H), ("http[].directResponse.status", H), ("http[].directResponse.body", H),
    ("http[].directResponse.body.string", H), ("http[].directResponse.body.bytes", H),
    ("http[].fault", H), ("http[].fault.abort", H), ("http[].fault.abort.grpcStatus", H), ("http[].fault.abort.http2Error", R),
    ("http[].fault.abort.httpStatus", H), ("http[].fault.abort.percentage", H), ("http[].fault.abort.percentage.value", H),
    ("http[].fault.delay", H), ("http[].fault.delay.exponentialDelay", R), ("http[].fault.delay.fixedDelay", H),
    ("http[].fault.delay.percent", H), ("http[].fault.delay.percentage", H), ("http[].fault.delay.percentage.value", H),
    ("http[].headers", H), ("http[].headers.request", H), ("http[].headers.request.add", H), ("http[].headers.request.remove", H),
    ("http[].headers.request.set", H), ("http[].headers.response", H), ("http[].headers.response.add", H),
    ("http[].headers.response.remove", H), ("http[].headers.response.set", H),
    ("http[].match", H), ("http[].match[].name", H),
    ("http[].match[].uri", H), ("http[].match[].uri.exact", H), ("http[].match[].uri.prefix", H), ("http[].match[].uri.regex", H),
    ("http[].match[].method", H), ("http[].match[].method.exact", H), ("http[].match[].method.prefix", H),
    ("http[].match[].method.regex", H),
    ("http[].match[].authority", H), ("http[].match[].authority.exact", H), ("http[].match[].authority.prefix", H),
    ("http[].match[].authority.regex", H),
    ("http[].match[].scheme", H), ("http[].match[].scheme.exact", H), ("http[].match[].scheme.prefix", H),
    ("http[].match[].scheme.regex", H),
    ("http[].match[].headers", H), ("http[].match[].queryParams", H), ("http[].match[].withoutHeaders", H),
    ("http[].match[].port", H), ("http[].match[].gateways", H), ("http[].match[].ignoreUriCase", H),
    ("http[].match[].sourceLabels", R), ("http[].match[].sourceNamespace", R), ("http[].match[].statPrefix", D),
    ("http[].mirror", H), ("http[].mirror.host", H), ("http[].mirror.port", H), ("http[].mirror.port.number", H),
    ("http[].mirror.subset", H), ("http[].mirrorPercent", H), ("http[].mirrorPercentage", H), ("http[].mirrorPercentage.value", H),
    ("http[].mirror_percent", R),
    ("http[].mirrors", H), ("http[].mirrors[].destination", H), ("http[].mirrors[].destination.host", H),
    ("http[].mirrors[].destination.port", H), ("http[].mirrors[].destination.port.number", H),
    ("http[].mirrors[].destination.subset", H), ("http[].mirrors[].percentage", H), ("http[].mirrors[].percentage.value", H),
    ("http[].redirect", H), ("http[].redirect.authority", H), ("http[].redirect.uri", H), ("http[].redirect.redirectCode", H),
    ("http[].redirect.derivePort", H), ("http[].redirect.port", H), ("http[].redirect.prefixRewrite", R),
    ("http[].redirect.scheme", H),
    ("http[].retries", H), ("http[].retries.attempts", H), ("http[].retries.perTryTimeout", H), ("http[].retries.retryOn", H),
    ("http[].retries.backoff", R), ("http[].retries.retryIgnorePreviousHosts", H), ("http[].retries.retryRemoteLocalities", R),
    ("http[].rewrite", H), ("http[].rewrite.authority", H), ("http[].rewrite.uri", H),
    ("http[].rewrite.uriRegexRewrite", H), ("http[].rewrite.uriRegexRewrite.match", H), ("http[].rewrite.uriRegexRewrite.rewrite", H),
    ("http[].route", H), ("http[].route[].destination", H), ("http[].route[].destination.host", H),
    ("http[].route[].destination.port", H), ("http[].route[].destination.port.number", H), ("http[].route[].destination.subset", H),
    ("http[].route[].headers", H), ("http[].route[].headers.request", H), ("http[].route[].headers.request.add", H),
    ("http[].route[].headers.request.remove", H), ("http[].route[].headers.request.set", H), ("http[].route[].headers.response", H),
    ("http[].route[].headers.response.add", H), ("http[].route[].headers.response.remove", H),
    ("http[].route[].headers.response.set", H), ("http[].route[].weight", H),
    ("http[].timeout", H),
    ("tcp", H), ("tcp[].match", H), ("tcp[].match[].port", H), ("tcp[].match[].gateways", H),
    ("tcp[].match[].destinationSubnets", H), ("tcp[].match[].sourceLabels", R), ("tcp[].match[].sourceNamespace", R),
    ("tcp[].route", H), ("tcp[].route[].destination", H), ("tcp[].route[].destination.host", H),
    ("tcp[].route[].destination.subset", H), ("tcp[].route[].destination.port", H), ("tcp[].route[].destination.port.number", H),
    ("tcp[].route[].weight", H),
    ("tls", D), ("tls[].match", D), ("tls[].match[].sniHosts", H), ("tls[].match[].port", H), ("tls[].match[].gateways", D),
    ("tls[].match[].destinationSubnets", H), ("tls[].match[].sourceLabels", R), ("tls[].match[].sourceNamespace", R),
    ("tls[].route", H), ("tls[].route[].destination", H), ("tls[].route[].destination.host", H),
    ("tls[].route[].destination.subset", H), ("tls[].route[].destination.port", H), ("tls[].route[].destination.port.number", H),
    ("tls[].route[].weight", H),
];

/// The route a request takes, by route name.
fn routed(v: &VirtualService, method: &str, authority: &str, path: &str, headers: &[(&str, &str)], port: u16) -> Option<String> {
    let headers: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let r = RequestInfo { method, path, authority, headers: &headers, port, scheme: "http" };
    v.route(&r).map(|h| h.name.clone().unwrap_or_default())
}

fn get(v: &VirtualService, path: &str) -> Option<String> {
    routed(v, "GET", "reviews", path, &[], 80)
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn at(g: &str) -> routing::Bind {
    routing::Bind::Gateway { namespace: "shop".into(), name: g.into() }
}

fn ip(a: &str) -> std::net::IpAddr {
    a.parse().unwrap()
}

#[rustfmt::skip]
fn virtual_service_cases() -> Vec<Case<VirtualService>> {
    vec![
        Case { fields: &["tcp", "tcp[].match", "tcp[].match[].port", "tcp[].match[].gateways", "tcp[].match[].destinationSubnets",
                "tcp[].route", "tcp[].route[].destination", "tcp[].route[].destination.host", "tcp[].route[].destination.subset",
                "tcp[].route[].destination.port", "tcp[].route[].destination.port.number", "tcp[].route[].weight"],
            cite: "TCPRoute: the first route whose L4MatchAttributes (port, gateways, destinationSubnets) all hold; weighted RouteDestinations",
            spec: "{hosts: ['*'], gateways: [edge], tcp: [{match: [{port: 31400, destinationSubnets: [10.0.0.0/8]}], route: [{destination: {host: db, subset: v1, port: {number: 5432}}, weight: 80}, {destination: {host: db, subset: v2}, weight: 20}]}, \
                   {match: [{port: 31401, gateways: [other]}], route: [{destination: {host: cache}}]}]}",
            expect: ok(|v| {
                let r = v.l4_route(&at("edge"), 31400, ip("10.1.2.3"), false, None).expect("port and subnet");
                assert_eq!((r.destinations[0].port, r.destinations[0].weight, r.destinations[1].weight), (Some(5432), 80, 20));
                assert!(v.l4_route(&at("edge"), 31400, ip("192.168.0.1"), false, None).is_none(), "outside the subnets");
                assert!(v.l4_route(&at("edge"), 31401, ip("10.1.2.3"), false, None).is_none(), "the match's own gateways");
                assert_eq!(v.l4_route(&at("other"), 31401, ip("10.1.2.3"), false, None).unwrap().destinations[0].weight, 100, "one destination takes all");
                assert!(!v.mesh);
            }) },
        Case { fields: &["tcp[].match[].port"], cite: "L4MatchAttributes.port: 1-65535",
            spec: "{hosts: ['*'], gateways: [edge], tcp: [{match: [{port: 0}], route: [{destination: {host: db}}]}]}", expect: Err("spec.tcp[0].match[0].port") },
        Case { fields: &["tcp[].route"], cite: "validateTCPRoute: a route needs destinations",
            spec: "{hosts: ['*'], gateways: [edge], tcp: [{match: [{port: 1}]}]}", expect: Err("spec.tcp[0].route") },
        Case { fields: &["tls", "tls[].match", "tls[].match[].sniHosts", "tls[].match[].port", "tls[].route", "tls[].route[].destination",
                "tls[].route[].destination.host", "tls[].route[].weight", "tls[].route[].destination.port", "tls[].route[].destination.port.number",
                "tls[].route[].destination.subset", "tls[].match[].destinationSubnets", "tls[].match[].gateways"],
            cite: "TLSRoute at a gateway: TLSMatchAttributes sniHosts (wildcards), port; passed through unterminated",
            spec: "{hosts: ['*.example.com'], gateways: [edge], tls: [{match: [{port: 443, sniHosts: [a.example.com], destinationSubnets: [0.0.0.0/0], gateways: [edge]}], route: [{destination: {host: a, subset: v1, port: {number: 8443}}, weight: 1}]}, \
                   {match: [{sniHosts: ['*.example.com']}], route: [{destination: {host: any}}]}]}",
            expect: ok(|v| {
                assert_eq!(v.l4_route(&at("edge"), 443, ip("10.0.0.1"), true, Some("A.example.com")).unwrap().destinations[0].host, "a");
                assert_eq!(v.l4_route(&at("edge"), 443, ip("10.0.0.1"), true, Some("b.example.com")).unwrap().destinations[0].host, "any");
                assert!(v.l4_route(&at("edge"), 443, ip("10.0.0.1"), true, Some("example.com")).is_none(), "`*.` needs a label");
                assert!(v.l4_route(&at("edge"), 443, ip("10.0.0.1"), true, None).is_none(), "no SNI: no TLS route");
            }) },
        Case { fields: &["tls[].match[].sniHosts"], cite: "validateTLSRoute: sniHosts required",
            spec: "{hosts: [a.example.com], gateways: [edge], tls: [{match: [{port: 443}], route: [{destination: {host: a}}]}]}", expect: Err("spec.tls[0].match[0].sniHosts") },
        Case { fields: &["tls[].match[].sniHosts"], cite: "validateTLSRoute: an sniHost must be within the VirtualService's hosts",
            spec: "{hosts: [a.example.com], gateways: [edge], tls: [{match: [{sniHosts: [b.example.com]}], route: [{destination: {host: a}}]}]}", expect: Err("spec.tls[0].match[0].sniHosts[0]") },
        Case { fields: &["tls[].match"], cite: "validateTLSRoute: a TLS route needs a match",
            spec: "{hosts: [a.example.com], gateways: [edge], tls: [{route: [{destination: {host: a}}]}]}", expect: Err("spec.tls[0].match") },
        Case { fields: &["tls[].match[].gateways"], cite: "TLS routes by SNI at waypoints (mesh) are not implemented: refused, naming the match",
            spec: "{hosts: [a.example.com], tls: [{match: [{sniHosts: [a.example.com]}], route: [{destination: {host: a}}]}]}", expect: Err("spec.tls[0].match[0].gateways") },
        Case { fields: &["hosts"], cite: "VirtualService.hosts: short names resolve in the VirtualService's namespace; FQDNs and `*.` wildcard prefixes",
            spec: "{hosts: [reviews, \"*.other.svc.cluster.local\"], http: [{route: [{destination: {host: reviews}}]}]}",
            expect: ok(|v| {
                assert!(v.applies_to("reviews", "shop", "shop"));
                assert!(v.applies_to("ratings", "other", "shop"), "the wildcard");
                assert!(!v.applies_to("ratings", "shop", "shop"));
                assert!(!v.applies_to("reviews", "third", "shop"), "a short name is the VirtualService's namespace's");
            }) },
        Case { fields: &["hosts"], cite: "VirtualService.hosts: `*` is only for gateways (a mesh-bound VirtualService cannot use it)",
            spec: "{hosts: [\"*\"], http: [{route: [{destination: {host: reviews}}]}]}", expect: Err("spec.hosts") },
        Case { fields: &["gateways"], cite: "VirtualService.gateways: without `mesh`, the routes apply at those gateways only",
            spec: "{hosts: [reviews], gateways: [shop/edge], http: [{route: [{destination: {host: reviews}}]}]}",
            expect: ok(|v| assert!(!v.mesh && !v.applies_to("reviews", "shop", "shop"))) },
        Case { fields: &["gateways"], cite: "VirtualService.gateways: `mesh` applies to every sidecar (here: waypoint)",
            spec: "{hosts: [reviews], gateways: [edge, mesh], http: [{route: [{destination: {host: reviews}}]}]}",
            expect: ok(|v| assert!(v.mesh && v.applies_to("reviews", "shop", "shop"))) },
        Case { fields: &["exportTo"], cite: "VirtualService.exportTo: `.` exports to the VirtualService's own namespace only",
            spec: "{hosts: [reviews], exportTo: [\".\"], http: [{route: [{destination: {host: reviews}}]}]}",
            expect: ok(|v| assert!(v.applies_to("reviews", "shop", "shop") && !v.applies_to("reviews", "shop", "other"))) },
        Case { fields: &["exportTo"], cite: "VirtualService.exportTo: `*` cannot be listed with other values (Istio's validation)",
            spec: "{hosts: [reviews], exportTo: [\"*\", a], http: [{route: [{destination: {host: reviews}}]}]}", expect: Err("spec.exportTo") },
        Case { fields: &["http", "http[].name", "http[].match", "http[].match[].name", "http[].match[].uri", "http[].match[].uri.exact",
                "http[].match[].uri.prefix", "http[].match[].uri.regex"],
            cite: "HTTPRoute: rules are tried in order and the first match wins; HTTPMatchRequest.uri; StringMatch exact, prefix, regex (RE2, whole value)",
            spec: "{hosts: [reviews], http: [{name: exact, match: [{name: m, uri: {exact: /a}}], route: [{destination: {host: reviews}}]}, \
                   {name: prefix, match: [{uri: {prefix: /api}}], route: [{destination: {host: reviews}}]}, \
                   {name: regex, match: [{uri: {regex: \"/v[0-9]+/.*\"}}], route: [{destination: {host: reviews}}]}, \
                   {name: rest, route: [{destination: {host: reviews}}]}]}",
            expect: ok(|v| {
                for (path, want) in [("/a", "exact"), ("/a/b", "rest"), ("/api/x", "prefix"), ("/v2/x", "regex"), ("/xv2/x", "rest")] {
                    assert_eq!(get(v, path).as_deref(), Some(want), "{path}");
                }
            }) },
        Case { fields: &["http[].match[].method", "http[].match[].method.exact", "http[].match[].method.prefix", "http[].match[].method.regex"],
            cite: "HTTPMatchRequest.method: StringMatch on the method",
            spec: "{hosts: [reviews], http: [{name: get, match: [{method: {exact: GET}}], route: [{destination: {host: reviews}}]}, \
                   {name: p, match: [{method: {prefix: P}}], route: [{destination: {host: reviews}}]}, \
                   {name: del, match: [{method: {regex: \"DEL.*\"}}], route: [{destination: {host: reviews}}]}]}",
            expect: ok(|v| {
                for (m, want) in [("GET", Some("get")), ("POST", Some("p")), ("PUT", Some("p")), ("DELETE", Some("del")), ("HEAD", None)] {
                    assert_eq!(routed(v, m, "reviews", "/", &[], 80).as_deref(), want, "{m}");
                }
            }) },
        Case { fields: &["http[].match[].authority", "http[].match[].authority.exact", "http[].match[].authority.prefix", "http[].match[].authority.regex"],
            cite: "HTTPMatchRequest.authority: StringMatch on the Host/:authority",
            spec: "{hosts: [reviews], http: [{name: e, match: [{authority: {exact: reviews.example}}], route: [{destination: {host: reviews}}]}, \
                   {name: p, match: [{authority: {prefix: api.}}], route: [{destination: {host: reviews}}]}, \
                   {name: r, match: [{authority: {regex: \"v[0-9]\\\\.reviews\"}}], route: [{destination: {host: reviews}}]}]}",
            expect: ok(|v| {
                for (a, want) in [("reviews.example", Some("e")), ("api.reviews", Some("p")), ("v2.reviews", Some("r")), ("other", None)] {
                    assert_eq!(routed(v, "GET", a, "/", &[], 80).as_deref(), want, "{a}");
                }
            }) },
        Case { fields: &["http[].match[].headers", "http[].match[].queryParams", "http[].match[].withoutHeaders", "http[].match[].port",
                "http[].match[].ignoreUriCase"],
            cite: "HTTPMatchRequest: headers (an empty match means the header is present), queryParams, withoutHeaders, port, ignoreUriCase",
            spec: "{hosts: [reviews], http: [{name: user, match: [{headers: {x-user: {exact: jason}}}], route: [{destination: {host: reviews}}]}, \
                   {name: present, match: [{headers: {x-debug: {}}}], route: [{destination: {host: reviews}}]}, \
                   {name: query, match: [{queryParams: {beta: {exact: \"1\"}}}], route: [{destination: {host: reviews}}]}, \
                   {name: without, match: [{uri: {prefix: /w}, withoutHeaders: {x-block: {exact: \"1\"}}}], route: [{destination: {host: reviews}}]}, \
                   {name: port, match: [{port: 9080}], route: [{destination: {host: reviews}}]}, \
                   {name: ci, match: [{uri: {exact: /Legacy}, ignoreUriCase: true}], route: [{destination: {host: reviews}}]}]}",
            expect: ok(|v| {
                let r = |path: &str, headers: &[(&str, &str)], port: u16| routed(v, "GET", "reviews", path, headers, port);
                assert_eq!(r("/", &[("x-user", "jason")], 80).as_deref(), Some("user"));
                assert_eq!(r("/", &[("x-user", "json")], 80), None);
                assert_eq!(r("/", &[("x-debug", "")], 80).as_deref(), Some("present"));
                assert_eq!(r("/p?beta=1", &[], 80).as_deref(), Some("query"));
                assert_eq!(r("/w", &[], 80).as_deref(), Some("without"));
                assert_eq!(r("/w", &[("x-block", "1")], 80), None);
                assert_eq!(r("/", &[], 9080).as_deref(), Some("port"));
                assert_eq!(r("/LEGACY", &[], 80).as_deref(), Some("ci"));
            }) },
        Case { fields: &["http[].match[].scheme", "http[].match[].scheme.exact", "http[].match[].scheme.prefix", "http[].match[].scheme.regex"],
            cite: "HTTPMatchRequest.scheme: the URI scheme; a waypoint receives plaintext HTTP (inside HBONE), so `http`",
            spec: "{hosts: [reviews], http: [{name: https, match: [{scheme: {exact: https}}], route: [{destination: {host: reviews}}]}, \
                   {name: http, match: [{scheme: {prefix: ht}}, {scheme: {regex: \"h.*\"}}], route: [{destination: {host: reviews}}]}]}",
            expect: ok(|v| assert_eq!(get(v, "/").as_deref(), Some("http"))) },
        Case { fields: &["http[].match[].statPrefix"], cite: "HTTPMatchRequest.statPrefix: names Envoy's route statistics; taken, no effect (Skiff has no per-route statistics)",
            spec: "{hosts: [reviews], http: [{name: s, match: [{uri: {prefix: /}, statPrefix: reviews-root}], route: [{destination: {host: reviews}}]}]}",
            expect: ok(|v| assert_eq!(get(v, "/x").as_deref(), Some("s"))) },
        Case { fields: &["http[].match[].gateways"],
            cite: "HTTPMatchRequest.gateways: overrides the VirtualService's gateways for this match",
            spec: "{hosts: [reviews], gateways: [edge], http: [{name: edge-only, match: [{uri: {prefix: /}}], route: [{destination: {host: reviews}}]}, \
                   {name: mesh, match: [{gateways: [mesh], uri: {prefix: /m}}], route: [{destination: {host: reviews}}]}]}",
            expect: ok(|v| {
                assert!(v.mesh);
                assert_eq!(get(v, "/m").as_deref(), Some("mesh"));
                assert_eq!(get(v, "/x"), None, "the gateway-only route does not apply in the mesh");
            }) },
        Case { fields: &["http[].route", "http[].route[].destination", "http[].route[].destination.host", "http[].route[].destination.subset",
                "http[].route[].destination.port", "http[].route[].destination.port.number", "http[].route[].weight"],
            cite: "HTTPRouteDestination: destination host, subset, port; weights are relative (the share is weight / sum)",
            spec: "{hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: v1, port: {number: 9080}}, weight: 1}, \
                   {destination: {host: reviews.shop.svc.cluster.local, subset: v2}, weight: 3}]}]}",
            expect: ok(|v| {
                let d = &v.http[0].destinations;
                assert_eq!((d[0].host.as_str(), d[0].subset.as_deref(), d[0].port), ("reviews", Some("v1"), Some(9080)));
                assert_eq!(routing::total_weight(d), 4);
                let picks: Vec<_> = (0..4).map(|roll| routing::pick_weighted(d, roll).unwrap().subset.clone().unwrap()).collect();
                assert_eq!(picks, ["v1", "v2", "v2", "v2"]);
            }) },
        Case { fields: &["http[].route[].weight"], cite: "HTTPRouteDestination.weight: Istio's validation refuses a total of 0",
            spec: "{hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: a}, weight: 0}, {destination: {host: reviews, subset: b}, weight: 0}]}]}",
            expect: Err("spec.http[0].route") },
        Case { fields: &["http[].route[].headers", "http[].route[].headers.request", "http[].route[].headers.request.set",
                "http[].route[].headers.request.add", "http[].route[].headers.request.remove", "http[].route[].headers.response",
                "http[].route[].headers.response.set", "http[].route[].headers.response.add", "http[].route[].headers.response.remove"],
            cite: "HTTPRouteDestination.headers: header operations when this destination is picked",
            spec: "{hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: v1}, weight: 1, headers: {request: {set: {x-s: a}, add: {x-a: b}, remove: [x-r]}, \
                   response: {set: {x-rs: c}, add: {x-ra: d}, remove: [x-rr]}}}, {destination: {host: reviews, subset: v2}, weight: 1}]}]}",
            expect: ok(|v| {
                let d = &v.http[0].destinations;
                assert_eq!((d[0].request_headers.set.clone(), d[0].request_headers.add.clone()), (pairs(&[("x-s", "a")]), pairs(&[("x-a", "b")])));
                assert_eq!(d[0].request_headers.remove, ["x-r"]);
                assert_eq!((d[0].response_headers.set.clone(), d[0].response_headers.add.clone()), (pairs(&[("x-rs", "c")]), pairs(&[("x-ra", "d")])));
                assert_eq!(d[0].response_headers.remove, ["x-rr"]);
                assert_eq!(d[1].request_headers, routing::HeaderOps::default());
            }) },
        Case { fields: &["http[].headers", "http[].headers.request", "http[].headers.request.set", "http[].headers.request.add",
                "http[].headers.request.remove", "http[].headers.response", "http[].headers.response.set", "http[].headers.response.add",
                "http[].headers.response.remove"],
            cite: "Headers: request and response operations for the route (names case-insensitive)",
            spec: "{hosts: [reviews], http: [{headers: {request: {set: {X-S: a}, add: {x-a: b}, remove: [x-r]}, response: {set: {x-rs: c}, add: {x-ra: d}, remove: [Server]}}, \
                   route: [{destination: {host: reviews}}]}]}",
            expect: ok(|v| {
                let r = &v.http[0];
                assert_eq!((r.request_headers.set.clone(), r.request_headers.add.clone()), (pairs(&[("x-s", "a")]), pairs(&[("x-a", "b")])));
                assert_eq!(r.request_headers.remove, ["x-r"]);
                assert_eq!((r.response_headers.set.clone(), r.response_headers.add.clone()), (pairs(&[("x-rs", "c")]), pairs(&[("x-ra", "d")])));
                assert_eq!(r.response_headers.remove, ["server"]);
            }) },
        Case { fields: &["http[].redirect", "http[].redirect.uri", "http[].redirect.authority", "http[].redirect.redirectCode"],
            cite: "HTTPRedirect: uri, authority, redirectCode",
            spec: "{hosts: [reviews], http: [{redirect: {uri: /new, authority: example.com, redirectCode: 302}}]}",
            expect: ok(|v| {
                let r = v.http[0].redirect.as_ref().unwrap();
                assert_eq!((r.uri.as_deref(), r.authority.as_deref(), r.code), (Some("/new"), Some("example.com"), 302));
                assert_eq!(r.location("http", "reviews:9080", "/old", 9080), "http://example.com/new");
            }) },
        Case { fields: &["http[].redirect.scheme", "http[].redirect.port"],
            cite: "HTTPRedirect.scheme (http or https) and port replace theirs in the URL",
            spec: "{hosts: [reviews], http: [{redirect: {scheme: https, port: 8443}}]}",
            expect: ok(|v| assert_eq!(v.http[0].redirect.as_ref().unwrap().location("http", "reviews", "/a?b", 80), "https://reviews:8443/a?b")) },
        Case { fields: &["http[].redirect.derivePort"],
            cite: "HTTPRedirect.derivePort: FROM_PROTOCOL_DEFAULT (80 for http, 443 for https), FROM_REQUEST_PORT",
            spec: "{hosts: [reviews], http: [{name: d, match: [{uri: {prefix: /d}}], redirect: {scheme: https, derivePort: FROM_PROTOCOL_DEFAULT}}, \
                   {name: r, redirect: {derivePort: FROM_REQUEST_PORT}}]}",
            expect: ok(|v| {
                assert_eq!(v.http[0].redirect.as_ref().unwrap().location("http", "reviews:9080", "/d", 9080), "https://reviews/d");
                assert_eq!(v.http[1].redirect.as_ref().unwrap().location("http", "reviews", "/x", 9080), "http://reviews:9080/x");
            }) },
        Case { fields: &["http[].redirect.uri"], cite: "HTTPRedirect.uri: a path (Envoy's path_redirect); one without a leading `/` would change the host",
            spec: "{hosts: [reviews], http: [{redirect: {uri: v2}}]}", expect: Err("spec.http[0].redirect.uri") },
        Case { fields: &["http[].redirect.scheme"], cite: "HTTPRedirect.scheme: Istio's validation allows http and https",
            spec: "{hosts: [reviews], http: [{redirect: {scheme: ftp}}]}", expect: Err("spec.http[0].redirect.scheme") },
        Case { fields: &["http[].redirect.port", "http[].redirect.derivePort"], cite: "HTTPRedirect: port and derivePort are one of (redirect_port)",
            spec: "{hosts: [reviews], http: [{redirect: {port: 8080, derivePort: FROM_REQUEST_PORT}}]}", expect: Err("spec.http[0].redirect") },
        Case { fields: &["http[].redirect"], cite: "HTTPRedirect.redirectCode: 301 by default",
            spec: "{hosts: [reviews], http: [{redirect: {uri: /new}}]}",
            expect: ok(|v| assert_eq!(v.http[0].redirect.as_ref().unwrap().code, 301)) },
        Case { fields: &["http[].redirect.redirectCode"], cite: "HTTPRedirect.redirectCode: 3xx (Istio's validation) that Envoy can send (301, 302, 303, 307, 308)",
            spec: "{hosts: [reviews], http: [{redirect: {uri: /new, redirectCode: 200}}]}", expect: Err("spec.http[0].redirect.redirectCode") },
        Case { fields: &["http[].directResponse", "http[].directResponse.status", "http[].directResponse.body", "http[].directResponse.body.string"],
            cite: "HTTPDirectResponse: status and a string body",
            spec: "{hosts: [reviews], http: [{directResponse: {status: 418, body: {string: teapot}}}]}",
            expect: ok(|v| assert_eq!(v.http[0].direct_response, Some((418, b"teapot".to_vec())))) },
        Case { fields: &["http[].directResponse.body.bytes"], cite: "HTTPBody.bytes: the body as bytes (base64 in YAML)",
            spec: "{hosts: [reviews], http: [{directResponse: {status: 503, body: {bytes: AAEC/w==}}}]}",
            expect: ok(|v| assert_eq!(v.http[0].direct_response, Some((503, vec![0, 1, 2, 255])))) },
        Case { fields: &["http[].directResponse.status"], cite: "HTTPDirectResponse.status: an HTTP status Envoy can send",
            spec: "{hosts: [reviews], http: [{directResponse: {status: 0}}]}", expect: Err("spec.http[0].directResponse.status") },
        Case { fields: &["http[].rewrite", "http[].rewrite.uri", "http[].rewrite.authority"],
            cite: "HTTPRewrite: uri (the matched prefix replaced) and authority",
            spec: "{hosts: [reviews], http: [{match: [{uri: {prefix: /old}}], rewrite: {uri: /v2, authority: backend}, route: [{destination: {host: reviews}}]}]}",
            expect: ok(|v| assert_eq!((v.http[0].rewrite_uri.as_deref(), v.http[0].rewrite_authority.as_deref()), (Some("/v2"), Some("backend")))) },
        Case { fields: &["http[].rewrite.uriRegexRewrite", "http[].rewrite.uriRegexRewrite.match", "http[].rewrite.uriRegexRewrite.rewrite"],
            cite: "RegexRewrite: an RE2 match on the path and its substitution, `\\N` for capture group N",
            spec: "{hosts: [reviews], http: [{rewrite: {uriRegexRewrite: {match: \"^/service/([^/]+)(/.*)$\", rewrite: \"\\\\2/instance/\\\\1\"}}, route: [{destination: {host: reviews}}]}]}",
            expect: ok(|v| {
                let (re, with) = v.http[0].rewrite_regex.clone().unwrap();
                assert_eq!(re.0.replace_all("/service/foo/v1/api", with.as_str()), "/v1/api/instance/foo");
            }) },
        Case { fields: &["http[].rewrite.uriRegexRewrite.rewrite"], cite: "RegexRewrite.rewrite: a capture group the pattern does not have is refused (as Envoy refuses it)",
            spec: "{hosts: [reviews], http: [{rewrite: {uriRegexRewrite: {match: \"^/(a)\", rewrite: '/\\2'}}, route: [{destination: {host: reviews}}]}]}",
            expect: Err("spec.http[0].rewrite.uriRegexRewrite.rewrite") },
        Case { fields: &["http[].rewrite.uriRegexRewrite"], cite: "HTTPRewrite: one of uri, uriRegexRewrite (Istio's validation)",
            spec: "{hosts: [reviews], http: [{rewrite: {uri: /x, uriRegexRewrite: {match: a, rewrite: b}}, route: [{destination: {host: reviews}}]}]}",
            expect: Err("spec.http[0].rewrite") },
        Case { fields: &["http[].corsPolicy", "http[].corsPolicy.allowOrigins", "http[].corsPolicy.allowOrigins[].exact", "http[].corsPolicy.allowOrigins[].prefix",
                "http[].corsPolicy.allowOrigins[].regex", "http[].corsPolicy.allowMethods", "http[].corsPolicy.allowHeaders", "http[].corsPolicy.exposeHeaders",
                "http[].corsPolicy.maxAge", "http[].corsPolicy.allowCredentials", "http[].corsPolicy.unmatchedPreflights"],
            cite: "CorsPolicy: allowOrigins (StringMatch), allowMethods, allowHeaders, exposeHeaders, maxAge, allowCredentials, unmatchedPreflights",
            spec: "{hosts: [reviews], http: [{corsPolicy: {allowOrigins: [{exact: \"https://a.example\"}, {prefix: \"https://dev.\"}, {regex: \"https://.*[.]test\"}], \
                   allowMethods: [GET, POST], allowHeaders: [x-token], exposeHeaders: [x-trace], maxAge: 24h, allowCredentials: true, unmatchedPreflights: IGNORE}, \
                   route: [{destination: {host: reviews}}]}]}",
            expect: ok(|v| {
                let c = v.http[0].cors.as_ref().unwrap();
                let allowed = |o: &str| c.origins.iter().any(|m| m.matches(o));
                assert!(allowed("https://a.example") && allowed("https://dev.x") && allowed("https://b.test") && !allowed("https://evil.example"));
                assert_eq!((c.methods.clone(), c.headers.clone(), c.expose.clone()), (vec!["GET".to_owned(), "POST".to_owned()], vec!["x-token".to_owned()], vec!["x-trace".to_owned()]));
                assert_eq!((c.max_age, c.credentials, c.forward_unmatched_preflights), (Some(Duration::from_secs(86400)), true, false));
            }) },
        Case { fields: &["http[].corsPolicy.allowOrigin", "http[].corsPolicy.unmatchedPreflights"],
            cite: "CorsPolicy.allowOrigin (deprecated): exact origins, `*` any; unmatchedPreflights FORWARD by default",
            spec: "{hosts: [reviews], http: [{corsPolicy: {allowOrigin: [\"*\"]}, route: [{destination: {host: reviews}}]}]}",
            expect: ok(|v| {
                let c = v.http[0].cors.as_ref().unwrap();
                assert!(c.origins.iter().any(|m| m.matches("https://anything")) && c.forward_unmatched_preflights);
            }) },
        Case { fields: &["http[].corsPolicy.maxAge"], cite: "CorsPolicy.maxAge: whole seconds (Istio's validation)",
            spec: "{hosts: [reviews], http: [{corsPolicy: {allowOrigin: [x], maxAge: 1.5s}, route: [{destination: {host: reviews}}]}]}",
            expect: Err("spec.http[0].corsPolicy.maxAge") },
        Case { fields: &["http[].timeout"], cite: "HTTPRoute.timeout: a duration; 0s (and absent) disables it",
            spec: "{hosts: [reviews], http: [{name: a, match: [{uri: {prefix: /a}}], timeout: 2s, route: [{destination: {host: reviews}}]}, \
                   {name: b, timeout: 0s, route: [{destination: {host: reviews}}]}]}",
            expect: ok(|v| assert_eq!((v.http[0].timeout, v.http[1].timeout), (Some(Duration::from_secs(2)), None))) },
        Case { fields: &["http[].retries", "http[].retries.attempts", "http[].retries.perTryTimeout", "http[].retries.retryOn"],
            cite: "HTTPRetry: attempts, perTryTimeout, retryOn (Envoy's x-envoy-retry-on and x-envoy-retry-grpc-on values)",
            spec: "{hosts: [reviews], http: [{retries: {attempts: 3, perTryTimeout: 2s, retryOn: \"5xx,gateway-error,unavailable\"}, route: [{destination: {host: reviews}}]}]}",
            expect: ok(|v| {
                let r = v.http[0].retries.as_ref().unwrap();
                assert_eq!((r.attempts, r.per_try_timeout), (3, Some(Duration::from_secs(2))));
                assert_eq!(r.retry_on, ["5xx", "gateway-error", "unavailable"]);
            }) },
        Case { fields: &["http[].retries.retryIgnorePreviousHosts"],
            cite: "HTTPRetry.retryIgnorePreviousHosts: retries go to endpoints not tried yet; true by default",
            spec: "{hosts: [reviews], http: [{name: a, match: [{uri: {prefix: /a}}], retries: {attempts: 2, retryIgnorePreviousHosts: false}, route: [{destination: {host: reviews}}]}, \
                   {name: b, retries: {attempts: 2}, route: [{destination: {host: reviews}}]}]}",
            expect: ok(|v| {
                let ignore = |i: usize| v.http[i].retries.as_ref().unwrap().ignore_previous_hosts;
                assert_eq!((ignore(0), ignore(1), routing::Retries::istio_default().ignore_previous_hosts), (false, true, true));
            }) },
        Case { fields: &["http[].retries.retryOn"], cite: "HTTPRetry.retryOn: a value Envoy does not know is refused",
            spec: "{hosts: [reviews], http: [{retries: {attempts: 2, retryOn: 5xx-ish}, route: [{destination: {host: reviews}}]}]}",
            expect: Err("spec.http[0].retries.retryOn") },
        Case { fields: &["http[].fault", "http[].fault.delay", "http[].fault.delay.fixedDelay", "http[].fault.delay.percentage",
                "http[].fault.delay.percentage.value", "http[].fault.abort", "http[].fault.abort.httpStatus", "http[].fault.abort.percentage",
                "http[].fault.abort.percentage.value"],
            cite: "HTTPFaultInjection: delay (fixedDelay, percentage) and abort (httpStatus, percentage) of requests",
            spec: "{hosts: [reviews], http: [{fault: {delay: {fixedDelay: 5s, percentage: {value: 10}}, abort: {httpStatus: 503, percentage: {value: 20.5}}}, \
                   route: [{destination: {host: reviews}}]}]}",
            expect: ok(|v| {
                let f = v.http[0].fault.as_ref().unwrap();
                assert_eq!(f.delay, Some((Duration::from_secs(5), 10.0)));
                assert_eq!(f.abort, Some((AbortStatus::Http(503), 20.5)));
            }) },
        Case { fields: &["http[].fault.delay.percentage", "http[].fault.abort.percentage"],
            cite: "HTTPFaultInjection: without a percentage no request is faulted",
            spec: "{hosts: [reviews], http: [{fault: {delay: {fixedDelay: 5s}, abort: {httpStatus: 503}}, route: [{destination: {host: reviews}}]}]}",
            expect: ok(|v| {
                let f = v.http[0].fault.as_ref().unwrap();
                assert_eq!(routing::fault_decision(f, 0.0, 0.0), routing::FaultDecision { delay: None, abort: None });
            }) },
        Case { fields: &["http[].fault.delay.percent"], cite: "HTTPFaultInjection.Delay.percent: the deprecated integer percentage",
            spec: "{hosts: [reviews], http: [{fault: {delay: {fixedDelay: 1s, percent: 30}}, route: [{destination: {host: reviews}}]}]}",
            expect: ok(|v| assert_eq!(v.http[0].fault.as_ref().unwrap().delay, Some((Duration::from_secs(1), 30.0)))) },
        Case { fields: &["http[].fault.abort.grpcStatus"], cite: "HTTPFaultInjection.Abort.grpcStatus: a gRPC status for gRPC requests",
            spec: "{hosts: [reviews], http: [{fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}, route: [{destination: {host: reviews}}]}]}",
            expect: ok(|v| assert_eq!(v.http[0].fault.as_ref().unwrap().abort, Some((AbortStatus::Grpc("UNAVAILABLE".into()), 100.0)))) },
        Case { fields: &["http[].mirror", "http[].mirror.host", "http[].mirror.subset", "http[].mirror.port", "http[].mirror.port.number",
                "http[].mirrorPercentage", "http[].mirrorPercentage.value"],
            cite: "HTTPRoute.mirror and mirrorPercentage: a copy of the share of requests, its response discarded",
            spec: "{hosts: [reviews], http: [{mirror: {host: reviews, subset: shadow, port: {number: 9080}}, mirrorPercentage: {value: 25}, \
                   route: [{destination: {host: reviews}}]}]}",
            expect: ok(|v| {
                let (d, pct) = v.http[0].mirrors[0].clone();
                assert_eq!((d.host.as_str(), d.subset.as_deref(), d.port, pct), ("reviews", Some("shadow"), Some(9080), 25.0));
            }) },
        Case { fields: &["http[].mirror", "http[].mirrorPercent"],
            cite: "HTTPRoute.mirrorPercent (deprecated integer); without either, every request is mirrored",
            spec: "{hosts: [reviews], http: [{name: a, match: [{uri: {prefix: /a}}], mirror: {host: reviews}, mirrorPercent: 40, route: [{destination: {host: reviews}}]}, \
                   {name: b, mirror: {host: reviews}, route: [{destination: {host: reviews}}]}]}",
            expect: ok(|v| assert_eq!((v.http[0].mirrors[0].1, v.http[1].mirrors[0].1), (40.0, 100.0))) },
        Case { fields: &["http[].mirrors", "http[].mirrors[].destination", "http[].mirrors[].destination.host", "http[].mirrors[].destination.subset",
                "http[].mirrors[].destination.port", "http[].mirrors[].destination.port.number", "http[].mirrors[].percentage",
                "http[].mirrors[].percentage.value"],
            cite: "HTTPMirrorPolicy: several mirrors, each with its destination and percentage (absent: every request)",
            spec: "{hosts: [reviews], http: [{mirrors: [{destination: {host: a, subset: s, port: {number: 81}}, percentage: {value: 5}}, {destination: {host: b}}], \
                   route: [{destination: {host: reviews}}]}]}",
            expect: ok(|v| {
                let m = &v.http[0].mirrors;
                assert_eq!((m[0].0.host.as_str(), m[0].0.subset.as_deref(), m[0].0.port, m[0].1), ("a", Some("s"), Some(81), 5.0));
                assert_eq!((m[1].0.host.as_str(), m[1].1), ("b", 100.0));
            }) },
        Case { fields: &["http[].mirrors"], cite: "HTTPRoute: one of mirror, mirrors (Istio's validation)",
            spec: "{hosts: [reviews], http: [{mirror: {host: a}, mirrors: [{destination: {host: b}}], route: [{destination: {host: reviews}}]}]}",
            expect: Err("spec.http[0].mirrors") },
    ]
}

#[test]
fn virtual_service_fields_read_as_istio_documents() {
    let cases = virtual_service_cases();
    run("VirtualService", VS, &cases, |s| s.virtual_services.first());
    let base = json!({"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]});
    complete("VirtualService", VS, VIRTUAL_SERVICE, &cases, base);
}

#[test]
fn docs_table_agrees_with_the_virtual_service_readings() {
    docs_agree("VirtualService", "### VirtualService: how Skiff reads Istio's fields", VIRTUAL_SERVICE);
}

// ---------------------------------------------------------------------
// DestinationRule

#[rustfmt::skip]
const DESTINATION_RULE: &[(&str, Reading)] = &[
    ("exportTo", H), ("host", H),
    ("subsets", H), ("subsets[].labels", H), ("subsets[].name", H), ("subsets[].trafficPolicy", H),
    ("trafficPolicy", H),
    ("trafficPolicy.connectionPool", H), ("trafficPolicy.connectionPool.http", H),
    ("trafficPolicy.connectionPool.http.h2UpgradePolicy", R), ("trafficPolicy.connectionPool.http.http1MaxPendingRequests", H),
    ("trafficPolicy.connectionPool.http.http2KeepAlive", R), ("trafficPolicy.connectionPool.http.http2KeepAlive.interval", R),
    ("trafficPolicy.connectionPool.http.http2KeepAlive.timeout", R), ("trafficPolicy.connectionPool.http.http2MaxRequests", H),
    ("trafficPolicy.connectionPool.http.idleTimeout", R), ("trafficPolicy.connectionPool.http.maxConcurrentStreams", R),
    ("trafficPolicy.connectionPool.http.maxRequestsPerConnection", H), ("trafficPolicy.connectionPool.http.maxRetries", H),
    ("trafficPolicy.connectionPool.http.useClientProtocol", R),
    ("trafficPolicy.connectionPool.tcp", H), ("trafficPolicy.connectionPool.tcp.connectTimeout", R),
    ("trafficPolicy.connectionPool.tcp.idleTimeout", R), ("trafficPolicy.connectionPool.tcp.maxConnectionDuration", R),
    ("trafficPolicy.connectionPool.tcp.maxConnections", H), ("trafficPolicy.connectionPool.tcp.tcpKeepalive", R),
    ("trafficPolicy.connectionPool.tcp.tcpKeepalive.interval", R), ("trafficPolicy.connectionPool.tcp.tcpKeepalive.probes", R),
    ("trafficPolicy.connectionPool.tcp.tcpKeepalive.time", R),
    ("trafficPolicy.loadBalancer", H), ("trafficPolicy.loadBalancer.simple", H),
    ("trafficPolicy.loadBalancer.consistentHash", H), ("trafficPolicy.loadBalancer.consistentHash.httpCookie", H),
    ("trafficPolicy.loadBalancer.consistentHash.httpCookie.attributes", H),
    ("trafficPolicy.loadBalancer.consistentHash.httpCookie.attributes[].name", H),
    ("trafficPolicy.loadBalancer.consistentHash.httpCookie.attributes[].value", H),
    ("trafficPolicy.loadBalancer.consistentHash.httpCookie.name", H), ("trafficPolicy.loadBalancer.consistentHash.httpCookie.path", H),
    ("trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl", H), ("trafficPolicy.loadBalancer.consistentHash.httpHeaderName", H),
    ("trafficPolicy.loadBalancer.consistentHash.httpQueryParameterName", H), ("trafficPolicy.loadBalancer.consistentHash.maglev", D),
    ("trafficPolicy.loadBalancer.consistentHash.maglev.tableSize", D),
    ("trafficPolicy.loadBalancer.consistentHash.minimumRingSize", D), ("trafficPolicy.loadBalancer.consistentHash.ringHash", D),
    ("trafficPolicy.loadBalancer.consistentHash.ringHash.minimumRingSize", D),
    ("trafficPolicy.loadBalancer.consistentHash.useSourceIp", H),
    ("trafficPolicy.loadBalancer.localityLbSetting", R), ("trafficPolicy.loadBalancer.localityLbSetting.distribute", R),
    ("trafficPolicy.loadBalancer.localityLbSetting.distribute[].from", R),
    ("trafficPolicy.loadBalancer.localityLbSetting.distribute[].to", R), ("trafficPolicy.loadBalancer.localityLbSetting.enabled", R),
    ("trafficPolicy.loadBalancer.localityLbSetting.failover", R), ("trafficPolicy.loadBalancer.localityLbSetting.failover[].from", R),
    ("trafficPolicy.loadBalancer.localityLbSetting.failover[].to", R),
    ("trafficPolicy.loadBalancer.localityLbSetting.failoverPriority", R),
    ("trafficPolicy.loadBalancer.warmup", R), ("trafficPolicy.loadBalancer.warmup.aggression", R),
    ("trafficPolicy.loadBalancer.warmup.duration", R), ("trafficPolicy.loadBalancer.warmup.minimumPercent", R),
    ("trafficPolicy.loadBalancer.warmupDurationSecs", R),
    ("trafficPolicy.outlierDetection", H), ("trafficPolicy.outlierDetection.baseEjectionTime", H),
    ("trafficPolicy.outlierDetection.consecutive5xxErrors", H), ("trafficPolicy.outlierDetection.consecutiveErrors", R),
    ("trafficPolicy.outlierDetection.consecutiveGatewayErrors", H),
    ("trafficPolicy.outlierDetection.consecutiveLocalOriginFailures", R), ("trafficPolicy.outlierDetection.interval", D),
    ("trafficPolicy.outlierDetection.maxEjectionPercent", H), ("trafficPolicy.outlierDetection.minHealthPercent", R),
    ("trafficPolicy.outlierDetection.splitExternalLocalOriginErrors", R),
    ("trafficPolicy.portLevelSettings", H), ("trafficPolicy.portLevelSettings[].connectionPool", H),
    ("trafficPolicy.portLevelSettings[].loadBalancer", H), ("trafficPolicy.portLevelSettings[].outlierDetection", H),
    ("trafficPolicy.portLevelSettings[].port", H), ("trafficPolicy.portLevelSettings[].port.number", H),
    ("trafficPolicy.portLevelSettings[].tls", D),
    ("trafficPolicy.proxyProtocol", R), ("trafficPolicy.proxyProtocol.version", R),
    ("trafficPolicy.retryBudget", R), ("trafficPolicy.retryBudget.budgetInterval", R),
    ("trafficPolicy.retryBudget.minRetryConcurrency", R), ("trafficPolicy.retryBudget.percent", R),
    ("trafficPolicy.tls", D), ("trafficPolicy.tls.caCertificates", H), ("trafficPolicy.tls.caCrl", R),
    ("trafficPolicy.tls.clientCertificate", H), ("trafficPolicy.tls.credentialName", D), ("trafficPolicy.tls.insecureSkipVerify", H),
    ("trafficPolicy.tls.mode", D), ("trafficPolicy.tls.privateKey", H), ("trafficPolicy.tls.sni", D),
    ("trafficPolicy.tls.subjectAltNames", H),
    ("trafficPolicy.tunnel", R), ("trafficPolicy.tunnel.protocol", R), ("trafficPolicy.tunnel.targetHost", R),
    ("trafficPolicy.tunnel.targetPort", R),
    ("workloadSelector", R), ("workloadSelector.matchLabels", R),
];

#[rustfmt::skip]
fn destination_rule_cases() -> Vec<Case<DestinationRule>> {
    vec![
        Case { fields: &["host", "subsets", "subsets[].name", "subsets[].labels"],
            cite: "DestinationRule.host (short names in the rule's namespace), Subset name and labels",
            spec: "{host: reviews, subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]}",
            expect: ok(|d| {
                assert!(routing::destination_rule_for(std::slice::from_ref(d), "reviews", "shop", "shop").is_some());
                assert!(routing::destination_rule_for(std::slice::from_ref(d), "reviews", "other", "shop").is_none());
                assert_eq!(d.subsets["v2"], BTreeMap::from([("version".to_owned(), "v2".to_owned())]));
            }) },
        Case { fields: &["subsets[].name"], cite: "Subset.name: Istio's validation refuses a duplicate subset name",
            spec: "{host: reviews, subsets: [{name: v1, labels: {version: v1}}, {name: v1, labels: {version: v2}}]}", expect: Err("spec.subsets[1].name") },
        Case { fields: &["exportTo"], cite: "DestinationRule.exportTo: `.` only for proxies in the rule's namespace",
            spec: "{host: reviews, exportTo: [\".\"]}",
            expect: ok(|d| {
                assert!(routing::destination_rule_for(std::slice::from_ref(d), "reviews", "shop", "shop").is_some());
                assert!(routing::destination_rule_for(std::slice::from_ref(d), "reviews", "shop", "waypoints").is_none());
            }) },
        Case { fields: &["trafficPolicy", "trafficPolicy.loadBalancer", "trafficPolicy.loadBalancer.simple"],
            cite: "LoadBalancerSettings.simple: LEAST_REQUEST (LEAST_CONN is its deprecated name), RANDOM, ROUND_ROBIN",
            spec: "{host: reviews, trafficPolicy: {loadBalancer: {simple: LEAST_CONN}}}",
            expect: ok(|d| assert_eq!(d.policy_for(None, 80).load_balancer, LoadBalancer::LeastRequest)) },
        Case { fields: &["trafficPolicy.loadBalancer.simple"], cite: "LoadBalancerSettings.simple PASSTHROUGH: Skiff does not forward to the original address",
            spec: "{host: reviews, trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}}", expect: Err("spec.trafficPolicy.loadBalancer.simple") },
        Case { fields: &["trafficPolicy.loadBalancer.consistentHash", "trafficPolicy.loadBalancer.consistentHash.httpHeaderName"],
            cite: "ConsistentHashLB.httpHeaderName: requests with one header value go to one endpoint",
            spec: "{host: reviews, trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: X-User}}}}",
            expect: ok(|d| assert_eq!(d.policy_for(None, 80).hash, Some(HashKey::Header("x-user".into())))) },
        Case { fields: &["trafficPolicy.loadBalancer.consistentHash.httpCookie", "trafficPolicy.loadBalancer.consistentHash.httpCookie.name",
                "trafficPolicy.loadBalancer.consistentHash.httpCookie.path", "trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl",
                "trafficPolicy.loadBalancer.consistentHash.httpCookie.attributes", "trafficPolicy.loadBalancer.consistentHash.httpCookie.attributes[].name",
                "trafficPolicy.loadBalancer.consistentHash.httpCookie.attributes[].value"],
            cite: "ConsistentHashLB.HTTPCookie: name, path, ttl (the cookie is made when absent and ttl is set), attributes",
            spec: "{host: reviews, trafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: session, path: /, ttl: 0s, attributes: [{name: SameSite, value: Strict}, {name: Secure}]}}}}}",
            expect: ok(|d| assert_eq!(d.policy_for(None, 80).hash, Some(HashKey::Cookie {
                name: "session".into(), path: Some("/".into()), ttl: Some(Duration::ZERO),
                attributes: vec![("SameSite".into(), Some("Strict".into())), ("Secure".into(), None)],
            }))) },
        Case { fields: &["trafficPolicy.loadBalancer.consistentHash.httpCookie.name"], cite: "HTTPCookie.name: a cookie name (RFC 6265 token)",
            spec: "{host: reviews, trafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: \"a=b\", ttl: 10s}}}}}",
            expect: Err("spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.name") },
        Case { fields: &["trafficPolicy.loadBalancer.consistentHash.useSourceIp"], cite: "ConsistentHashLB.useSourceIp: by the client's address",
            spec: "{host: reviews, trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true}}}}",
            expect: ok(|d| assert_eq!(d.policy_for(None, 80).hash, Some(HashKey::SourceIp))) },
        Case { fields: &["trafficPolicy.loadBalancer.consistentHash.httpQueryParameterName", "trafficPolicy.loadBalancer.consistentHash.ringHash",
                "trafficPolicy.loadBalancer.consistentHash.ringHash.minimumRingSize"],
            cite: "ConsistentHashLB.httpQueryParameterName; ringHash.minimumRingSize sizes Envoy's ring (no effect here: rendezvous hashing)",
            spec: "{host: reviews, trafficPolicy: {loadBalancer: {consistentHash: {httpQueryParameterName: user, ringHash: {minimumRingSize: 1024}}}}}",
            expect: ok(|d| assert_eq!(d.policy_for(None, 80).hash, Some(HashKey::QueryParameter("user".into())))) },
        Case { fields: &["trafficPolicy.loadBalancer.consistentHash.maglev", "trafficPolicy.loadBalancer.consistentHash.maglev.tableSize",
                "trafficPolicy.loadBalancer.consistentHash.minimumRingSize"],
            cite: "ConsistentHashLB maglev.tableSize and the deprecated minimumRingSize: table sizes, no effect here",
            spec: "{host: reviews, trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 65537}, minimumRingSize: 8}}}}",
            expect: ok(|d| assert_eq!(d.policy_for(None, 80).hash, Some(HashKey::SourceIp))) },
        Case { fields: &["trafficPolicy.loadBalancer.consistentHash"], cite: "ConsistentHashLB: exactly one hash key",
            spec: "{host: reviews, trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true, httpHeaderName: x}}}}",
            expect: Err("spec.trafficPolicy.loadBalancer.consistentHash") },
        Case { fields: &["trafficPolicy.loadBalancer", "trafficPolicy.loadBalancer.consistentHash"], cite: "LoadBalancerSettings: one of simple, consistentHash",
            spec: "{host: reviews, trafficPolicy: {loadBalancer: {simple: RANDOM, consistentHash: {useSourceIp: true}}}}",
            expect: Err("spec.trafficPolicy.loadBalancer") },
        Case { fields: &["subsets[].trafficPolicy", "trafficPolicy.loadBalancer.consistentHash"],
            cite: "TrafficPolicy merge: a subset's loadBalancer replaces the rule's whole (a simple one ends the hashing)",
            spec: "{host: reviews, trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true}}}, subsets: [{name: v1, labels: {version: v1}, trafficPolicy: {loadBalancer: {simple: RANDOM}}}]}",
            expect: ok(|d| {
                assert_eq!(d.policy_for(None, 80).hash, Some(HashKey::SourceIp));
                assert_eq!((d.policy_for(Some("v1"), 80).hash.clone(), d.policy_for(Some("v1"), 80).load_balancer), (None, LoadBalancer::Random));
            }) },
        Case { fields: &["trafficPolicy.connectionPool", "trafficPolicy.connectionPool.tcp", "trafficPolicy.connectionPool.tcp.maxConnections",
                "trafficPolicy.connectionPool.http", "trafficPolicy.connectionPool.http.http1MaxPendingRequests",
                "trafficPolicy.connectionPool.http.http2MaxRequests", "trafficPolicy.connectionPool.http.maxRequestsPerConnection",
                "trafficPolicy.connectionPool.http.maxRetries"],
            cite: "ConnectionPoolSettings: TCP maxConnections, HTTP http1MaxPendingRequests, http2MaxRequests, maxRequestsPerConnection, maxRetries",
            spec: "{host: reviews, trafficPolicy: {connectionPool: {tcp: {maxConnections: 10}, http: {http1MaxPendingRequests: 5, http2MaxRequests: 20, \
                   maxRequestsPerConnection: 100, maxRetries: 2}}}}",
            expect: ok(|d| {
                let c = &d.policy_for(None, 80).connection_pool;
                assert_eq!((c.max_connections, c.http1_max_pending_requests, c.http2_max_requests), (Some(10), Some(5), Some(20)));
                assert_eq!((c.max_requests_per_connection, c.max_retries), (Some(100), Some(2)));
                assert_eq!((c.max_in_flight(false), c.max_in_flight(true)), (Some(15), Some(20)));
            }) },
        Case { fields: &["trafficPolicy.outlierDetection", "trafficPolicy.outlierDetection.consecutive5xxErrors",
                "trafficPolicy.outlierDetection.consecutiveGatewayErrors", "trafficPolicy.outlierDetection.interval",
                "trafficPolicy.outlierDetection.baseEjectionTime", "trafficPolicy.outlierDetection.maxEjectionPercent"],
            cite: "OutlierDetection: consecutive5xxErrors (0 disables), consecutiveGatewayErrors, interval, baseEjectionTime, maxEjectionPercent",
            spec: "{host: reviews, trafficPolicy: {outlierDetection: {consecutive5xxErrors: 0, consecutiveGatewayErrors: 3, interval: 5s, baseEjectionTime: 1m, maxEjectionPercent: 50}}}",
            expect: ok(|d| {
                let o = d.policy_for(None, 80).outlier.clone().unwrap();
                assert_eq!((o.consecutive_5xx, o.consecutive_gateway), (None, Some(3)));
                assert_eq!((o.interval, o.base_ejection_time, o.max_ejection_percent), (Duration::from_secs(5), Duration::from_secs(60), 50));
            }) },
        Case { fields: &["trafficPolicy.outlierDetection"], cite: "OutlierDetection defaults: 5 consecutive 5xx, 10s interval, 30s ejection, 10% ejected",
            spec: "{host: reviews, trafficPolicy: {outlierDetection: {}}}",
            expect: ok(|d| {
                let o = d.policy_for(None, 80).outlier.clone().unwrap();
                assert_eq!((o.consecutive_5xx, o.interval, o.base_ejection_time, o.max_ejection_percent), (Some(5), Duration::from_secs(10), Duration::from_secs(30), 10));
            }) },
        Case { fields: &["trafficPolicy.outlierDetection.maxEjectionPercent"], cite: "OutlierDetection.maxEjectionPercent: Istio's validation refuses over 100",
            spec: "{host: reviews, trafficPolicy: {outlierDetection: {maxEjectionPercent: 101}}}", expect: Err("spec.trafficPolicy.outlierDetection.maxEjectionPercent") },
        Case { fields: &["trafficPolicy.portLevelSettings", "trafficPolicy.portLevelSettings[].port", "trafficPolicy.portLevelSettings[].port.number",
                "trafficPolicy.portLevelSettings[].loadBalancer", "trafficPolicy.portLevelSettings[].connectionPool",
                "trafficPolicy.portLevelSettings[].outlierDetection"],
            cite: "TrafficPolicy.portLevelSettings: per-port settings override the destination-level ones (each sub-object replaced whole)",
            spec: "{host: reviews, trafficPolicy: {loadBalancer: {simple: RANDOM}, connectionPool: {tcp: {maxConnections: 10}, http: {http2MaxRequests: 7}}, \
                   portLevelSettings: [{port: {number: 9080}, loadBalancer: {simple: LEAST_REQUEST}, connectionPool: {tcp: {maxConnections: 3}}, outlierDetection: {consecutiveGatewayErrors: 2}}]}}",
            expect: ok(|d| {
                let (p80, p9080) = (d.policy_for(None, 80), d.policy_for(None, 9080));
                assert_eq!((p80.load_balancer, p80.connection_pool.max_connections, p80.outlier.is_none()), (LoadBalancer::Random, Some(10), true));
                assert_eq!((p9080.load_balancer, p9080.connection_pool.max_connections), (LoadBalancer::LeastRequest, Some(3)));
                assert_eq!(p9080.connection_pool.http2_max_requests, None, "the port's connectionPool replaces the whole of the parent's");
                assert_eq!(p9080.outlier.as_ref().unwrap().consecutive_gateway, Some(2));
            }) },
        Case { fields: &["trafficPolicy.tls", "trafficPolicy.tls.mode", "trafficPolicy.portLevelSettings[].tls"],
            cite: "ClientTLSSettings.mode ISTIO_MUTUAL: Istio's mutual TLS, which mesh traffic always gets (HBONE)",
            spec: "{host: reviews, trafficPolicy: {tls: {mode: ISTIO_MUTUAL}, portLevelSettings: [{port: {number: 9080}, tls: {mode: ISTIO_MUTUAL}}]}, \
                   subsets: [{name: v1, labels: {version: v1}, trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}}]}",
            expect: ok(|d| assert_eq!(d.subsets.len(), 1)) },
        Case { fields: &["trafficPolicy.tls", "trafficPolicy.tls.mode", "trafficPolicy.portLevelSettings[].tls"],
            cite: "ClientTLSSettings.mode SIMPLE: originate TLS; a port's settings replace the rule's, tls included (Istio's MergeTrafficPolicy)",
            spec: "{host: api.example.com, trafficPolicy: {tls: {mode: SIMPLE}, portLevelSettings: [{port: {number: 8080}, loadBalancer: {simple: RANDOM}}]}}",
            expect: ok(|d| {
                let tls = d.policy_for(None, 80).tls.as_ref().expect("tls");
                assert!(tls.mode == TlsMode::Simple && tls.originates() && tls.sni.is_none() && tls.ca_certificates.is_none());
                assert_eq!(d.policy_for(None, 8080).tls, None, "the port's settings omit tls: none");
            }) },
        Case { fields: &["trafficPolicy.tls.mode"], cite: "ClientTLSSettings.mode DISABLE (the default): no TLS from the proxy (inside HBONE to a pod in the mesh)",
            spec: "{host: reviews, trafficPolicy: {tls: {mode: DISABLE}}}",
            expect: ok(|d| assert!(!d.policy_for(None, 80).tls.as_ref().unwrap().originates())) },
        Case { fields: &["trafficPolicy.tls.mode"], cite: "ClientTLSSettings.mode: DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL",
            spec: "{host: reviews, trafficPolicy: {tls: {mode: STRICT}}}", expect: Err("spec.trafficPolicy.tls.mode") },
        Case { fields: &["trafficPolicy.tls.caCertificates", "trafficPolicy.tls.subjectAltNames", "trafficPolicy.tls.sni"],
            cite: "ClientTLSSettings: caCertificates (a file), subjectAltNames (one must be in the server's certificate), sni",
            spec: "{host: api.example.com, trafficPolicy: {tls: {mode: SIMPLE, caCertificates: /etc/ca.pem, subjectAltNames: [api.example.com], sni: API.example.com}}}",
            expect: ok(|d| {
                let tls = d.policy_for(None, 443).tls.clone().unwrap();
                assert_eq!((tls.ca_certificates.as_deref(), tls.subject_alt_names.as_slice(), tls.sni.as_deref()),
                    (Some("/etc/ca.pem"), &["api.example.com".to_owned()][..], Some("api.example.com")));
            }) },
        Case { fields: &["trafficPolicy.tls.sni"], cite: "ClientTLSSettings.sni: a host name",
            spec: "{host: api.example.com, trafficPolicy: {tls: {mode: SIMPLE, sni: 'a b'}}}", expect: Err("spec.trafficPolicy.tls.sni") },
        Case { fields: &["trafficPolicy.tls.clientCertificate", "trafficPolicy.tls.privateKey"],
            cite: "ClientTLSSettings MUTUAL: clientCertificate and privateKey, files the proxy reads",
            spec: "{host: api.example.com, trafficPolicy: {tls: {mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem}}}",
            expect: ok(|d| {
                let tls = d.policy_for(None, 443).tls.clone().unwrap();
                assert_eq!((tls.mode, tls.client_certificate.as_deref(), tls.private_key.as_deref()), (TlsMode::Mutual, Some("/c.pem"), Some("/k.pem")));
            }) },
        Case { fields: &["trafficPolicy.tls.privateKey"], cite: "validateTLS: client certificate and private key required for MUTUAL without credentialName",
            spec: "{host: api.example.com, trafficPolicy: {tls: {mode: MUTUAL, clientCertificate: /c.pem}}}", expect: Err("spec.trafficPolicy.tls.privateKey") },
        Case { fields: &["trafficPolicy.tls.credentialName"],
            cite: "ClientTLSSettings.credentialName: a Secret in the proxy's namespace (cacert / ca.crt; for MUTUAL cert/key or tls.crt/tls.key)",
            spec: "{host: api.example.com, trafficPolicy: {tls: {mode: MUTUAL, credentialName: api-client}}}",
            expect: ok(|d| assert_eq!(d.policy_for(None, 443).tls.as_ref().unwrap().credential_name.as_deref(), Some("api-client"))) },
        Case { fields: &["trafficPolicy.tls.credentialName"], cite: "validateTLS: no certificate files together with credentialName",
            spec: "{host: api.example.com, trafficPolicy: {tls: {mode: SIMPLE, credentialName: c, caCertificates: /ca.pem}}}",
            expect: Err("spec.trafficPolicy.tls.caCertificates") },
        Case { fields: &["trafficPolicy.tls.insecureSkipVerify"], cite: "ClientTLSSettings.insecureSkipVerify: neither the CA nor the names are checked",
            spec: "{host: api.example.com, trafficPolicy: {tls: {mode: SIMPLE, insecureSkipVerify: true}}}",
            expect: ok(|d| assert!(d.policy_for(None, 443).tls.as_ref().unwrap().insecure_skip_verify)) },
        Case { fields: &["trafficPolicy.tls.insecureSkipVerify"], cite: "validateTLS: insecureSkipVerify excludes caCertificates, credentialName (SIMPLE) and subjectAltNames",
            spec: "{host: api.example.com, trafficPolicy: {tls: {mode: SIMPLE, insecureSkipVerify: true, subjectAltNames: [a.example.com]}}}",
            expect: Err("spec.trafficPolicy.tls.insecureSkipVerify") },
        Case { fields: &["trafficPolicy.tls.sni"], cite: "ISTIO_MUTUAL uses the mesh's own names and certificates: what it would override is refused",
            spec: "{host: reviews, trafficPolicy: {tls: {mode: ISTIO_MUTUAL, sni: reviews.example}}}", expect: Err("spec.trafficPolicy.tls.sni") },
        Case { fields: &["trafficPolicy.portLevelSettings[].port.number"], cite: "PortSelector.number: 1-65535",
            spec: "{host: reviews, trafficPolicy: {portLevelSettings: [{port: {number: 0}, loadBalancer: {simple: RANDOM}}]}}",
            expect: Err("spec.trafficPolicy.portLevelSettings[0].port.number") },
        Case { fields: &["subsets[].trafficPolicy"],
            cite: "Subset.trafficPolicy: overrides the DestinationRule's for that subset, each sub-object whole; port-level settings still apply",
            spec: "{host: reviews, trafficPolicy: {loadBalancer: {simple: RANDOM}, connectionPool: {tcp: {maxConnections: 10}, http: {http2MaxRequests: 7}}}, \
                   subsets: [{name: v1, labels: {version: v1}, trafficPolicy: {connectionPool: {tcp: {maxConnections: 1}}}}, {name: v2, labels: {version: v2}}]}",
            expect: ok(|d| {
                let v1 = d.policy_for(Some("v1"), 80);
                assert_eq!((v1.load_balancer, v1.connection_pool.max_connections, v1.connection_pool.http2_max_requests), (LoadBalancer::Random, Some(1), None));
                assert_eq!(d.policy_for(Some("v2"), 80).connection_pool.max_connections, Some(10), "a subset without a policy has the rule's");
            }) },
    ]
}

#[test]
fn destination_rule_fields_read_as_istio_documents() {
    let cases = destination_rule_cases();
    run("DestinationRule", DR, &cases, |s| s.destination_rules.first());
    let base = json!({"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}],
        "trafficPolicy": {"portLevelSettings": [{"port": {"number": 9080}}]}});
    complete("DestinationRule", DR, DESTINATION_RULE, &cases, base);
}

#[test]
fn docs_table_agrees_with_the_destination_rule_readings() {
    docs_agree("DestinationRule", "### DestinationRule: how Skiff reads Istio's fields", DESTINATION_RULE);
}

// ---------------------------------------------------------------------
// PeerAuthentication

#[rustfmt::skip]
const PEER_AUTHENTICATION: &[(&str, Reading)] = &[
    ("mtls", H), ("mtls.mode", H), ("portLevelMtls", H), ("portLevelMtls.<port>.mode", H), ("selector", H), ("selector.matchLabels", H),
];

fn mode(p: &PeerAuthn, labels: &[(&str, &str)], port: u16) -> MtlsMode {
    let labels: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    policy::effective_mtls(std::slice::from_ref(p), "istio-system", "shop", &labels, port)
}

#[rustfmt::skip]
fn peer_authentication_cases() -> Vec<Case<PeerAuthn>> {
    vec![
        Case { fields: &["mtls", "mtls.mode"], cite: "PeerAuthentication.MutualTLS.Mode STRICT, namespace-wide without a selector",
            spec: "{mtls: {mode: STRICT}}",
            expect: ok(|p| assert_eq!((mode(p, &[], 80), mode(p, &[("app", "db")], 5432)), (MtlsMode::Strict, MtlsMode::Strict))) },
        Case { fields: &["mtls.mode"], cite: "MutualTLS.Mode UNSET (and absent) inherits from the parent; PERMISSIVE when nothing is set",
            spec: "{mtls: {mode: UNSET}}", expect: ok(|p| assert_eq!(mode(p, &[], 80), MtlsMode::Permissive)) },
        Case { fields: &["mtls.mode"], cite: "MutualTLS.Mode: the enum's names only (STRICT, not strict)",
            spec: "{mtls: {mode: strict}}", expect: Err("spec.mtls.mode") },
        Case { fields: &["selector", "selector.matchLabels", "mtls.mode"], cite: "PeerAuthentication.selector: only the selected workloads",
            spec: "{selector: {matchLabels: {app: db}}, mtls: {mode: DISABLE}}",
            expect: ok(|p| assert_eq!((mode(p, &[("app", "db")], 80), mode(p, &[("app", "web")], 80)), (MtlsMode::Disable, MtlsMode::Permissive))) },
        Case { fields: &["portLevelMtls", "portLevelMtls.<port>.mode"], cite: "PeerAuthentication.portLevelMtls: per-port mode for the selected workloads",
            spec: "{selector: {matchLabels: {app: db}}, mtls: {mode: STRICT}, portLevelMtls: {\"5432\": {mode: PERMISSIVE}}}",
            expect: ok(|p| {
                assert_eq!(mode(p, &[("app", "db")], 5432), MtlsMode::Permissive);
                assert_eq!(mode(p, &[("app", "db")], 80), MtlsMode::Strict);
            }) },
        Case { fields: &["portLevelMtls"], cite: "PeerAuthentication.portLevelMtls: Istio's validation requires a selector",
            spec: "{mtls: {mode: STRICT}, portLevelMtls: {\"5432\": {mode: PERMISSIVE}}}", expect: Err("spec.portLevelMtls") },
    ]
}

#[test]
fn peer_authentication_fields_read_as_istio_documents() {
    let cases = peer_authentication_cases();
    // A refused PeerAuthentication leaves a STRICT stand-in; `taken`
    // reports the refusal first.
    run("PeerAuthentication", PA, &cases, |s| s.peer_authentications.first());
    complete("PeerAuthentication", PA, PEER_AUTHENTICATION, &cases, json!({}));
}

#[test]
fn docs_table_agrees_with_the_peer_authentication_readings() {
    docs_agree("PeerAuthentication", "### PeerAuthentication: how Skiff reads Istio's fields", PEER_AUTHENTICATION);
}

// ---------------------------------------------------------------------
// AuthorizationPolicy (its docs table is checked in skiff-core's
// policy.rs against the wire types).

#[rustfmt::skip]
const AUTHORIZATION_POLICY: &[(&str, Reading)] = &[
    ("action", H), ("provider", D), ("provider.name", D),
    ("rules", H), ("rules[].from", H), ("rules[].from[].source", H),
    ("rules[].from[].source.principals", H), ("rules[].from[].source.notPrincipals", H),
    ("rules[].from[].source.namespaces", H), ("rules[].from[].source.notNamespaces", H),
    ("rules[].from[].source.ipBlocks", H), ("rules[].from[].source.notIpBlocks", H),
    ("rules[].from[].source.remoteIpBlocks", D), ("rules[].from[].source.notRemoteIpBlocks", D),
    ("rules[].from[].source.serviceAccounts", H), ("rules[].from[].source.notServiceAccounts", H),
    ("rules[].from[].source.requestPrincipals", D), ("rules[].from[].source.notRequestPrincipals", D),
    ("rules[].from[].source.trustDomains", D), ("rules[].from[].source.notTrustDomains", D),
    ("rules[].to", H), ("rules[].to[].operation", H),
    ("rules[].to[].operation.hosts", H), ("rules[].to[].operation.notHosts", H),
    ("rules[].to[].operation.methods", H), ("rules[].to[].operation.notMethods", H),
    ("rules[].to[].operation.paths", H), ("rules[].to[].operation.notPaths", H),
    ("rules[].to[].operation.ports", H), ("rules[].to[].operation.notPorts", H),
    ("rules[].when", H), ("rules[].when[].key", H), ("rules[].when[].values", H), ("rules[].when[].notValues", H),
    ("selector", H), ("selector.matchLabels", H),
    ("targetRef", H), ("targetRef.group", H), ("targetRef.kind", H), ("targetRef.name", H), ("targetRef.namespace", H),
    ("targetRefs", H), ("targetRefs[].group", H), ("targetRefs[].kind", H), ("targetRefs[].name", H), ("targetRefs[].namespace", H),
];

const WEB: &str = "cluster.local/ns/front/sa/web";

fn conn(src: &str, principal: Option<&str>, port: u16) -> ConnInfo {
    ConnInfo {
        src_ip: src.parse().unwrap(),
        principal: principal.map(str::to_owned),
        src_namespace: principal.and_then(|p| p.split('/').nth(2)).map(str::to_owned),
        dst_ip: "10.244.0.9".parse().unwrap(),
        dst_port: port,
    }
}

/// Whether the policy alone allows the connection at L4.
fn allows(p: &AuthzPolicy, c: &ConnInfo) -> bool {
    policy::evaluate(&[p], c).allowed
}

/// Whether the policy alone allows the request at a waypoint.
fn allows_l7(p: &AuthzPolicy, method: &str, host: &str, path: &str, headers: &[(&str, &str)]) -> bool {
    let headers = pairs(headers);
    let r = L7Attrs { method, path, host, headers: &headers };
    policy::evaluate_l7(&[p], &conn("10.244.1.5", Some(WEB), 8080), &r).allowed
}

#[rustfmt::skip]
fn authorization_policy_cases() -> Vec<Case<AuthzPolicy>> {
    vec![
        Case { fields: &["action", "rules", "rules[].from", "rules[].from[].source", "rules[].from[].source.principals"],
            cite: "AuthorizationPolicy ALLOW (the default action); Source.principals: peer identities, mTLS required",
            spec: "{rules: [{from: [{source: {principals: [\"cluster.local/ns/front/sa/web\"]}}]}]}",
            expect: ok(|p| {
                assert!(allows(p, &conn("10.244.1.5", Some(WEB), 80)));
                assert!(!allows(p, &conn("10.244.1.5", Some("cluster.local/ns/front/sa/other"), 80)));
                assert!(!allows(p, &conn("10.244.1.5", None, 80)), "plaintext has no principal");
            }) },
        Case { fields: &["rules"], cite: "AuthorizationPolicy.rules: an ALLOW policy without rules matches nothing (denies all it applies to)",
            spec: "{}", expect: ok(|p| assert!(!allows(p, &conn("10.244.1.5", Some(WEB), 80)))) },
        Case { fields: &["rules"], cite: "Rule: an empty rule matches every request",
            spec: "{rules: [{}]}", expect: ok(|p| assert!(allows(p, &conn("10.244.1.5", None, 80)))) },
        Case { fields: &["rules[].from[].source"], cite: "Rule.From.source: Istio's validation refuses an empty source",
            spec: "{rules: [{from: [{}]}]}", expect: Err("spec.rules[0].from[0].source") },
        Case { fields: &["action", "rules[].from[].source.notPrincipals"], cite: "AuthorizationPolicy DENY; Source.notPrincipals",
            spec: "{action: DENY, rules: [{from: [{source: {notPrincipals: [\"cluster.local/ns/front/*\"]}}]}]}",
            expect: ok(|p| {
                assert!(allows(p, &conn("10.244.1.5", Some(WEB), 80)));
                assert!(!allows(p, &conn("10.244.1.5", Some("cluster.local/ns/back/sa/x"), 80)));
            }) },
        Case { fields: &["rules[].from[].source.namespaces", "rules[].from[].source.notNamespaces"],
            cite: "Source.namespaces / notNamespaces: the peer identity's namespace (mTLS required)",
            spec: "{rules: [{from: [{source: {namespaces: [\"fr*\"], notNamespaces: [frozen]}}]}]}",
            expect: ok(|p| {
                assert!(allows(p, &conn("10.244.1.5", Some(WEB), 80)));
                assert!(!allows(p, &conn("10.244.1.5", Some("cluster.local/ns/frozen/sa/x"), 80)));
                assert!(!allows(p, &conn("10.244.1.5", None, 80)));
            }) },
        Case { fields: &["rules[].from[].source.ipBlocks", "rules[].from[].source.notIpBlocks"],
            cite: "Source.ipBlocks / notIpBlocks: single IPs or CIDRs, IPv4 or IPv6, of the peer address",
            spec: "{rules: [{from: [{source: {ipBlocks: [10.244.0.0/16, \"fd00::/8\"], notIpBlocks: [10.244.9.9]}}]}]}",
            expect: ok(|p| {
                assert!(allows(p, &conn("10.244.1.5", None, 80)));
                assert!(!allows(p, &conn("10.244.9.9", None, 80)));
                assert!(!allows(p, &conn("10.1.0.1", None, 80)));
            }) },
        Case { fields: &["rules[].from[].source.remoteIpBlocks", "rules[].from[].source.notRemoteIpBlocks"],
            cite: "Source.remoteIpBlocks: the original client address (X-Forwarded-For); Skiff reads the peer address",
            spec: "{rules: [{from: [{source: {remoteIpBlocks: [10.244.0.0/16], notRemoteIpBlocks: [10.244.9.9]}}]}]}",
            expect: ok(|p| assert!(allows(p, &conn("10.244.1.5", None, 80)) && !allows(p, &conn("10.244.9.9", None, 80)))) },
        Case { fields: &["rules[].from[].source.serviceAccounts", "rules[].from[].source.notServiceAccounts"],
            cite: "Source.serviceAccounts / notServiceAccounts: `namespace/name` of the peer's service account",
            spec: "{rules: [{from: [{source: {serviceAccounts: [front/web, front/api], notServiceAccounts: [front/api]}}]}]}",
            expect: ok(|p| {
                assert!(allows(p, &conn("10.244.1.5", Some(WEB), 80)));
                assert!(!allows(p, &conn("10.244.1.5", Some("cluster.local/ns/front/sa/api"), 80)));
                assert!(!allows(p, &conn("10.244.1.5", Some("cluster.local/ns/other/sa/web"), 80)));
            }) },
        Case { fields: &["rules[].from[].source.serviceAccounts"], cite: "Source.serviceAccounts: not with principals or namespaces (Istio's CRD validation)",
            spec: "{rules: [{from: [{source: {serviceAccounts: [front/web], namespaces: [front]}}]}]}", expect: Err("spec.rules[0].from[0].source.serviceAccounts") },
        Case { fields: &["rules[].from[].source.requestPrincipals", "rules[].from[].source.notRequestPrincipals",
                "rules[].from[].source.trustDomains", "rules[].from[].source.notTrustDomains"],
            cite: "AuthorizationPolicy: a rule using an attribute the proxy cannot evaluate never matches in ALLOW",
            spec: "{rules: [{from: [{source: {principals: [\"*\"], requestPrincipals: [\"*\"], notRequestPrincipals: [x], trustDomains: [cluster.local], notTrustDomains: [x]}}]}]}",
            expect: ok(|p| assert!(!allows(p, &conn("10.244.1.5", Some(WEB), 80)))) },
        Case { fields: &["rules[].from[].source.requestPrincipals", "rules[].from[].source.trustDomains"],
            cite: "AuthorizationPolicy: ... and in DENY matches on the attributes it can evaluate",
            spec: "{action: DENY, rules: [{from: [{source: {namespaces: [front], requestPrincipals: [\"*\"], trustDomains: [td]}}]}]}",
            expect: ok(|p| {
                assert!(!allows(p, &conn("10.244.1.5", Some(WEB), 80)));
                assert!(allows(p, &conn("10.244.1.5", Some("cluster.local/ns/back/sa/x"), 80)));
            }) },
        Case { fields: &["rules[].to", "rules[].to[].operation", "rules[].to[].operation.ports", "rules[].to[].operation.notPorts"],
            cite: "Operation.ports / notPorts: the destination port",
            spec: "{rules: [{to: [{operation: {ports: [\"8080\", \"9090\"], notPorts: [\"9090\"]}}]}]}",
            expect: ok(|p| {
                assert!(allows(p, &conn("10.244.1.5", None, 8080)));
                assert!(!allows(p, &conn("10.244.1.5", None, 9090)));
            }) },
        Case { fields: &["rules[].to[].operation.hosts", "rules[].to[].operation.notHosts", "rules[].to[].operation.methods",
                "rules[].to[].operation.notMethods", "rules[].to[].operation.paths", "rules[].to[].operation.notPaths"],
            cite: "Operation hosts (case-insensitive), methods, paths (`{*}`/`{**}` templates) and their negations, at a waypoint",
            spec: "{rules: [{to: [{operation: {hosts: [\"Reviews*\"], notHosts: [reviews.internal], methods: [GET, POST], notMethods: [POST], \
                   paths: [\"/api/{*}/items\", \"/public*\"], notPaths: [/public/secret]}}]}]}",
            expect: ok(|p| {
                assert!(allows_l7(p, "GET", "reviews.shop", "/api/v1/items", &[]));
                assert!(allows_l7(p, "GET", "REVIEWS", "/public/x", &[]));
                assert!(!allows_l7(p, "GET", "reviews.internal", "/public/x", &[]));
                assert!(!allows_l7(p, "POST", "reviews", "/public/x", &[]));
                assert!(!allows_l7(p, "GET", "reviews", "/api/v1/v2/items", &[]), "{{*}} is one segment");
                assert!(!allows_l7(p, "GET", "reviews", "/public/secret", &[]));
            }) },
        Case { fields: &["rules[].to[].operation.paths"], cite: "Operation: at ztunnel (L4) an ALLOW rule with paths never matches",
            spec: "{rules: [{to: [{operation: {paths: [\"/x\"]}}]}]}",
            expect: ok(|p| assert!(!allows(p, &conn("10.244.1.5", Some(WEB), 80)))) },
        Case { fields: &["rules[].when", "rules[].when[].key", "rules[].when[].values", "rules[].when[].notValues"],
            cite: "Condition: key with values and/or notValues (Authorization Policy Conditions)",
            spec: "{rules: [{when: [{key: source.namespace, values: [front, back], notValues: [back]}, {key: \"request.headers[x-team]\", values: [blue]}]}]}",
            expect: ok(|p| {
                assert!(allows_l7(p, "GET", "reviews", "/", &[("x-team", "blue")]));
                assert!(!allows_l7(p, "GET", "reviews", "/", &[("x-team", "red")]));
            }) },
        Case { fields: &["rules[].when[].key"], cite: "Condition: a key needs values or notValues (Istio's validation)",
            spec: "{rules: [{when: [{key: source.namespace}]}]}", expect: Err("spec.rules[0].when[0]") },
        Case { fields: &["action"], cite: "AuthorizationPolicy.Action AUDIT: changes no decision",
            spec: "{action: AUDIT, rules: [{}]}",
            expect: ok(|p| {
                let d = policy::evaluate(&[p], &conn("10.244.1.5", None, 80));
                assert!(d.allowed && d.audited == ["shop/conformance"]);
            }) },
        Case { fields: &["action", "provider", "provider.name"],
            cite: "AuthorizationPolicy CUSTOM with provider: no external authorizer in Skiff, so what it matches is denied",
            spec: "{action: CUSTOM, provider: {name: ext-authz}, rules: [{to: [{operation: {ports: [\"8080\"]}}]}]}",
            expect: ok(|p| {
                assert!(!allows(p, &conn("10.244.1.5", Some(WEB), 8080)));
                assert!(allows(p, &conn("10.244.1.5", Some(WEB), 80)));
            }) },
        Case { fields: &["provider"], cite: "AuthorizationPolicy.provider: only with action CUSTOM",
            spec: "{provider: {name: ext-authz}, rules: [{}]}", expect: Err("spec.provider") },
        Case { fields: &["selector", "selector.matchLabels"], cite: "AuthorizationPolicy.selector: the workloads it applies to",
            spec: "{selector: {matchLabels: {app: db}}, rules: [{}]}",
            expect: ok(|p| {
                let labels = |app: &str| BTreeMap::from([("app".to_owned(), app.to_owned())]);
                assert!(p.applies_to("istio-system", "shop", &labels("db")));
                assert!(!p.applies_to("istio-system", "shop", &labels("web")));
                assert!(!p.applies_to("istio-system", "other", &labels("db")));
            }) },
        Case { fields: &["targetRefs", "targetRefs[].group", "targetRefs[].kind", "targetRefs[].name"],
            cite: "AuthorizationPolicy.targetRefs: a waypoint (Gateway, gateway.networking.k8s.io), a Service (core) or a ServiceEntry (networking.istio.io; Istio ambient egress)",
            spec: "{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}, {kind: Service, name: reviews}, {kind: ServiceEntry, group: networking.istio.io, name: api}], rules: [{}]}",
            expect: ok(|p| {
                assert!(p.targets("shop", "waypoint", ("Service", "x")) && p.targets("shop", "other", ("Service", "reviews")));
                assert!(p.targets("shop", "other", ("ServiceEntry", "api")) && !p.targets("shop", "other", ("Service", "api")));
                assert!(!p.targets("shop", "other", ("ServiceEntry", "reviews")), "a Service's name is not an entry's");
                assert!(!p.targets("shop", "other", ("Service", "x")) && !p.targets("other", "waypoint", ("Service", "x")));
                assert!(!p.applies_to("istio-system", "shop", &BTreeMap::new()), "not enforced by ztunnel");
            }) },
        Case { fields: &["targetRefs[].group"], cite: "PolicyTargetReference: a ServiceEntry is in group networking.istio.io (Istio's validation)",
            spec: "{targetRefs: [{kind: ServiceEntry, name: api}], rules: [{}]}", expect: Err("spec.targetRefs[0].group") },
        Case { fields: &["targetRef", "targetRef.group", "targetRef.kind", "targetRef.name"], cite: "AuthorizationPolicy.targetRef (one target)",
            spec: "{targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}, rules: [{}]}",
            expect: ok(|p| assert!(p.targets("shop", "waypoint", ("Service", "x")))) },
        Case { fields: &["targetRefs[].group"], cite: "PolicyTargetReference: a Gateway is in group gateway.networking.k8s.io (Istio's validation)",
            spec: "{targetRefs: [{kind: Gateway, name: waypoint}], rules: [{}]}", expect: Err("spec.targetRefs[0].group") },
        Case { fields: &["targetRefs[].namespace"], cite: "PolicyTargetReference.namespace: cross-namespace targets are refused (Istio's validation)",
            spec: "{targetRefs: [{kind: Service, name: reviews, namespace: shop}], rules: [{}]}", expect: Err("spec.targetRefs[0].namespace") },
        Case { fields: &["targetRefs[].namespace", "targetRef.namespace"], cite: "PolicyTargetReference.namespace: absent means the policy's namespace",
            spec: "{targetRef: {kind: Service, name: reviews}, rules: [{}]}", expect: ok(|p| assert!(p.targets("shop", "x", ("Service", "reviews")))) },
        Case { fields: &["targetRef.namespace"], cite: "PolicyTargetReference.namespace: refused when set",
            spec: "{targetRef: {kind: Service, name: reviews, namespace: other}, rules: [{}]}", expect: Err("spec.targetRef.namespace") },
    ]
}

#[test]
fn authorization_policy_fields_read_as_istio_documents() {
    let cases = authorization_policy_cases();
    run("AuthorizationPolicy", AP, &cases, |s| s.authorization_policies.first());
    complete("AuthorizationPolicy", AP, AUTHORIZATION_POLICY, &cases, json!({}));
}

// ---------------------------------------------------------------------
// Gateway

const GW: &str = "apiVersion: networking.istio.io/v1\nkind: Gateway";

#[rustfmt::skip]
const GATEWAY: &[(&str, Reading)] = &[
    ("selector", H), ("servers", H), ("servers[].name", D),
    ("servers[].port", H), ("servers[].port.number", H), ("servers[].port.name", H), ("servers[].port.protocol", D),
    ("servers[].port.targetPort", R), ("servers[].bind", R), ("servers[].defaultEndpoint", R),
    ("servers[].hosts", H),
    ("servers[].tls", H), ("servers[].tls.httpsRedirect", H), ("servers[].tls.mode", D), ("servers[].tls.credentialName", D),
    ("servers[].tls.subjectAltNames", D), ("servers[].tls.minProtocolVersion", D), ("servers[].tls.maxProtocolVersion", D),
    ("servers[].tls.serverCertificate", R), ("servers[].tls.privateKey", R), ("servers[].tls.caCertificates", R),
    ("servers[].tls.caCrl", R), ("servers[].tls.credentialNames", R), ("servers[].tls.tlsCertificates", R),
    ("servers[].tls.caCertCredentialName", R), ("servers[].tls.insecureSkipVerify", R),
    ("servers[].tls.verifyCertificateSpki", R), ("servers[].tls.verifyCertificateHash", R), ("servers[].tls.cipherSuites", R),
];

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[rustfmt::skip]
fn gateway_cases() -> Vec<Case<gateway::Gateway>> {
    vec![
        Case { fields: &["selector"], cite: "Gateway.selector: the gateway pods with these labels, in every namespace (PILOT_SCOPE_GATEWAY_TO_NAMESPACE is off by default)",
            spec: "{selector: {istio: ingressgateway}, servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [\"*\"]}]}",
            expect: ok(|g| {
                assert!(g.selects(&labels(&[("istio", "ingressgateway"), ("app", "x")])));
                assert!(!g.selects(&labels(&[("istio", "eastwestgateway")])));
            }) },
        Case { fields: &["selector"], cite: "Gateway.selector: none selects every gateway pod",
            spec: "{servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [\"*\"]}]}",
            expect: ok(|g| assert!(g.selects(&labels(&[])))) },
        Case { fields: &["servers", "servers[].port", "servers[].port.number", "servers[].port.name", "servers[].port.protocol", "servers[].hosts"],
            cite: "Server, Port: number, name, protocol (case-insensitive); hosts `ns/host` (`.` the Gateway's namespace, `*` or none any)",
            spec: "{servers: [{port: {number: 8080, name: http-alt, protocol: http}, hosts: [\"./a.example.com\", \"*/b.example.com\", \"shop/*.example.org\", c.example.com]}]}",
            expect: ok(|g| {
                let s = &g.servers[0];
                assert_eq!((s.number, s.port_name.as_str(), s.protocol), (8080, "http-alt", gateway::Protocol::Http));
                let hosts: Vec<(Option<&str>, &str)> = s.hosts.iter().map(|h| (h.namespace.as_deref(), h.host.as_str())).collect();
                assert_eq!(hosts, [(Some("shop"), "a.example.com"), (None, "b.example.com"), (Some("shop"), "*.example.org"), (None, "c.example.com")]);
            }) },
        Case { fields: &["servers"], cite: "Istio's validation: a Gateway must have at least one server",
            spec: "{selector: {istio: ingressgateway}}", expect: Err("spec.servers") },
        Case { fields: &["servers[].hosts"], cite: "Istio's validation: short names (not fully qualified) are not allowed in a Gateway's hosts",
            spec: "{servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [reviews]}]}", expect: Err("spec.servers[0].hosts[0]") },
        Case { fields: &["servers[].hosts"], cite: "Istio's validation: a server must contain at least one host",
            spec: "{servers: [{port: {number: 80, name: http, protocol: HTTP}}]}", expect: Err("spec.servers[0].hosts") },
        Case { fields: &["servers[].port.name"], cite: "Istio's validation: port names in servers must be unique",
            spec: "{servers: [{port: {number: 80, name: web, protocol: HTTP}, hosts: [\"*\"]}, {port: {number: 81, name: web, protocol: HTTP}, hosts: [\"*\"]}]}",
            expect: Err("spec.servers[1].port.name") },
        Case { fields: &["servers[].port.protocol"], cite: "Port.protocol: one of HTTP, HTTPS, GRPC, GRPC-WEB, HTTP2, MONGO, TCP, TLS",
            spec: "{servers: [{port: {number: 80, name: http, protocol: HTTP3}, hosts: [\"*\"]}]}", expect: Err("spec.servers[0].port.protocol") },
        Case { fields: &["servers[].port.protocol", "servers[].name"], cite: "Port.protocol TCP (routed by VirtualService tcp routes), MONGO taken, not served (the server stays closed, reported); Server.name: taken",
            spec: "{servers: [{name: web-tcp, port: {number: 9000, name: tcp, protocol: TCP}, hosts: [\"*\"]}, {port: {number: 27017, name: mongo, protocol: MONGO}, hosts: [\"*\"]}]}",
            expect: ok(|g| assert!(g.servers[0].not_served.is_none() && g.servers[1].not_served.is_some() && g.servers[0].name.as_deref() == Some("web-tcp"))) },
        Case { fields: &["servers[].tls", "servers[].tls.httpsRedirect"], cite: "ServerTLSSettings.httpsRedirect: an HTTP server answers every request with a 301 to https",
            spec: "{servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [\"*\"], tls: {httpsRedirect: true}}]}",
            expect: ok(|g| assert!(g.servers[0].https_redirect && g.servers[0].tls.is_none())) },
        Case { fields: &["servers[].tls"], cite: "Istio's validation: an HTTPS or TLS server must have TLS settings",
            spec: "{servers: [{port: {number: 443, name: https, protocol: HTTPS}, hosts: [\"*\"]}]}", expect: Err("spec.servers[0].tls") },
        Case { fields: &["servers[].tls"], cite: "Istio's validation: a plaintext HTTP server cannot have TLS settings (but httpsRedirect)",
            spec: "{servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [\"*\"], tls: {mode: SIMPLE, credentialName: c}}]}", expect: Err("spec.servers[0].tls") },
        Case { fields: &["servers[].tls.mode", "servers[].tls.credentialName", "servers[].tls.subjectAltNames", "servers[].tls.minProtocolVersion", "servers[].tls.maxProtocolVersion"],
            cite: "ServerTLSSettings: mode MUTUAL, credentialName (a Secret in the gateway's namespace), subjectAltNames of client certificates, protocol versions",
            spec: "{servers: [{port: {number: 443, name: https, protocol: HTTPS}, hosts: [\"*\"], tls: {mode: MUTUAL, credentialName: shop-cert, subjectAltNames: [client.example.com], minProtocolVersion: TLSV1_2, maxProtocolVersion: TLSV1_3}}]}",
            expect: ok(|g| {
                let t = g.servers[0].tls.as_ref().unwrap();
                assert_eq!((t.mode, t.credential_name.as_deref(), t.min_version, t.max_version),
                    (gateway::TlsMode::Mutual, Some("shop-cert"), gateway::TlsVersion::V1_2, gateway::TlsVersion::V1_3));
                assert_eq!(t.subject_alt_names, ["client.example.com"]);
            }) },
        Case { fields: &["servers[].tls.mode"], cite: "ServerTLSSettings.mode: PASSTHROUGH when not set",
            spec: "{servers: [{port: {number: 443, name: tls, protocol: TLS}, hosts: [\"*\"], tls: {}}]}",
            expect: ok(|g| assert_eq!(g.servers[0].tls.as_ref().unwrap().mode, gateway::TlsMode::Passthrough)) },
        Case { fields: &["servers[].tls.credentialName"], cite: "Istio's validation: SIMPLE and MUTUAL need a certificate (Skiff: from credentialName)",
            spec: "{servers: [{port: {number: 443, name: https, protocol: HTTPS}, hosts: [\"*\"], tls: {mode: SIMPLE}}]}", expect: Err("spec.servers[0].tls.credentialName") },
        Case { fields: &["servers[].tls.mode"], cite: "ServerTLSSettings.mode ISTIO_MUTUAL, AUTO_PASSTHROUGH, OPTIONAL_MUTUAL: not implemented, refused",
            spec: "{servers: [{port: {number: 443, name: https, protocol: HTTPS}, hosts: [\"*\"], tls: {mode: ISTIO_MUTUAL}}]}", expect: Err("spec.servers[0].tls.mode") },
        Case { fields: &["servers[].tls.minProtocolVersion"], cite: "ServerTLSSettings.TLSProtocol: TLS_AUTO, TLSV1_0 .. TLSV1_3",
            spec: "{servers: [{port: {number: 443, name: https, protocol: HTTPS}, hosts: [\"*\"], tls: {mode: SIMPLE, credentialName: c, minProtocolVersion: TLS1_2}}]}",
            expect: Err("spec.servers[0].tls.minProtocolVersion") },
    ]
}

#[test]
fn gateway_fields_read_as_istio_documents() {
    let cases = gateway_cases();
    run("Gateway", GW, &cases, |s| s.gateways.first());
    let base = json!({"servers": [{"port": {"number": 443, "name": "https", "protocol": "HTTPS"}, "hosts": ["*"], "tls": {"mode": "SIMPLE", "credentialName": "c"}}]});
    complete("Gateway", GW, GATEWAY, &cases, base);
}

#[test]
fn docs_table_agrees_with_the_gateway_readings() {
    docs_agree("Gateway", "### Gateway: how Skiff reads Istio's fields", GATEWAY);
}

// ---------------------------------------------------------------------
// ServiceEntry

const SE: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry";

#[rustfmt::skip]
const SERVICE_ENTRY: &[(&str, Reading)] = &[
    ("hosts", H), ("addresses", H), ("ports", H), ("ports[].number", H), ("ports[].name", H), ("ports[].protocol", D),
    ("ports[].targetPort", H), ("location", D), ("resolution", H), ("exportTo", H),
    ("endpoints", H), ("endpoints[].address", H), ("endpoints[].ports", H), ("endpoints[].labels", D),
    ("endpoints[].network", R), ("endpoints[].locality", R), ("endpoints[].weight", R), ("endpoints[].serviceAccount", R),
    ("workloadSelector", R), ("subjectAltNames", R),
];

fn reach(e: &egress::ServiceEntry, ns: &str, dst: &str, resolved: &[(&str, &str)]) -> Option<(String, String)> {
    let resolved: std::collections::HashMap<String, Vec<std::net::Ipv4Addr>> =
        resolved.iter().map(|(h, ip)| (h.to_string(), vec![ip.parse().unwrap()])).collect();
    let entries = [e.clone()];
    egress::lookup(&entries, ns, dst.parse().unwrap(), &resolved).map(|t| (t.host.to_owned(), t.target.to_string()))
}

#[rustfmt::skip]
fn service_entry_cases() -> Vec<Case<egress::ServiceEntry>> {
    vec![
        Case { fields: &["hosts", "ports", "ports[].number", "ports[].name", "ports[].protocol", "resolution"],
            cite: "ServiceEntry.hosts, ports, resolution DNS: connections to the addresses its hosts resolve to, on its ports, are in the registry (named by the host)",
            spec: "{hosts: [api.example.com], ports: [{number: 443, name: https, protocol: TLS}], resolution: DNS}",
            expect: ok(|e| {
                assert_eq!(reach(e, "app", "198.51.100.7:443", &[("api.example.com", "198.51.100.7")]), Some(("api.example.com".into(), "198.51.100.7:443".into())));
                assert_eq!(reach(e, "app", "198.51.100.7:80", &[("api.example.com", "198.51.100.7")]), None, "another port");
                assert_eq!(reach(e, "app", "198.51.100.8:443", &[("api.example.com", "198.51.100.7")]), None, "another address");
            }) },
        Case { fields: &["addresses", "location", "resolution"], cite: "ServiceEntry.addresses with resolution NONE: connections to those addresses go where they were sent; location MESH_EXTERNAL",
            spec: "{hosts: [db.example.com], addresses: [192.0.2.0/24], ports: [{number: 5432, name: pg}], location: MESH_EXTERNAL, resolution: NONE}",
            expect: ok(|e| {
                assert!(!e.internal);
                assert_eq!(reach(e, "app", "192.0.2.7:5432", &[]), Some(("db.example.com".into(), "192.0.2.7:5432".into())));
                assert_eq!(reach(e, "app", "192.0.3.7:5432", &[]), None);
            }) },
        Case { fields: &["resolution", "endpoints", "endpoints[].address", "endpoints[].ports", "endpoints[].labels", "ports[].targetPort"],
            cite: "ServiceEntry.resolution STATIC and endpoints (WorkloadEntry address, ports by port name); Port.targetPort",
            spec: "{hosts: [pg.example.com], addresses: [240.1.1.1], ports: [{number: 5432, name: pg}, {number: 80, name: http, targetPort: 8080}], resolution: STATIC, endpoints: [{address: 203.0.113.9, ports: {pg: 6432}, labels: {v: a}}]}",
            expect: ok(|e| {
                assert_eq!(reach(e, "app", "240.1.1.1:5432", &[]), Some(("pg.example.com".into(), "203.0.113.9:6432".into())), "the VIP goes to the endpoint, its named port");
                assert_eq!(reach(e, "app", "203.0.113.9:80", &[]), Some(("pg.example.com".into(), "203.0.113.9:8080".into())), "targetPort");
                assert_eq!(e.endpoints[0].labels.get("v").map(String::as_str), Some("a"));
            }) },
        Case { fields: &["location"], cite: "ServiceEntry.location MESH_INTERNAL: taken (the address decides HBONE or plain TCP)",
            spec: "{hosts: [legacy.internal], ports: [{number: 80, name: http}], location: MESH_INTERNAL}", expect: ok(|e| assert!(e.internal)) },
        Case { fields: &["exportTo"], cite: "ServiceEntry.exportTo: `.` only the entry's namespace; `~` no one",
            spec: "{hosts: [a.example.com], addresses: [192.0.2.1], ports: [{number: 80, name: http}], exportTo: [\".\"]}",
            expect: ok(|e| {
                assert!(reach(e, "shop", "192.0.2.1:80", &[]).is_some());
                assert!(reach(e, "app", "192.0.2.1:80", &[]).is_none());
            }) },
        Case { fields: &["hosts"], cite: "Istio's validation: hosts are required", spec: "{ports: [{number: 80, name: http}]}", expect: Err("spec.hosts") },
        Case { fields: &["endpoints"], cite: "Istio's validation: STATIC needs endpoints",
            spec: "{hosts: [a.example.com], ports: [{number: 80, name: http}], resolution: STATIC}", expect: Err("spec.endpoints") },
        Case { fields: &["endpoints[].address"], cite: "Istio's validation: NONE takes no endpoints",
            spec: "{hosts: [a.example.com], ports: [{number: 80, name: http}], endpoints: [{address: 192.0.2.1}]}", expect: Err("spec.endpoints[0].address") },
        Case { fields: &["ports[].name"], cite: "Istio's validation: a port needs a name",
            spec: "{hosts: [a.example.com], ports: [{number: 80}]}", expect: Err("spec.ports[0].name") },
        Case { fields: &["resolution"], cite: "ServiceEntry.Resolution: NONE, STATIC, DNS, DNS_ROUND_ROBIN",
            spec: "{hosts: [a.example.com], ports: [{number: 80, name: http}], resolution: MAGIC}", expect: Err("spec.resolution") },
    ]
}

#[test]
fn service_entry_fields_read_as_istio_documents() {
    let cases = service_entry_cases();
    run("ServiceEntry", SE, &cases, |s| s.service_entries.first());
    let base = json!({"hosts": ["a.example.com"], "ports": [{"number": 80, "name": "http"}], "resolution": "STATIC", "endpoints": [{"address": "192.0.2.1"}]});
    complete("ServiceEntry", SE, SERVICE_ENTRY, &cases, base);
}

#[test]
fn docs_table_agrees_with_the_service_entry_readings() {
    docs_agree("ServiceEntry", "### ServiceEntry: how Skiff reads Istio's fields", SERVICE_ENTRY);
}

// ---------------------------------------------------------------------
// Telemetry

const TM: &str = "apiVersion: telemetry.istio.io/v1\nkind: Telemetry";

#[rustfmt::skip]
const TELEMETRY: &[(&str, Reading)] = &[
    ("selector", H), ("selector.matchLabels", H), ("targetRef", R),
    ("targetRefs", H), ("targetRefs[].group", H), ("targetRefs[].kind", H), ("targetRefs[].name", H), ("targetRefs[].namespace", H),
    ("tracing", H), ("tracing[].match", H), ("tracing[].match.mode", H), ("tracing[].providers", H), ("tracing[].providers[].name", H),
    ("tracing[].randomSamplingPercentage", H), ("tracing[].disableSpanReporting", H), ("tracing[].customTags", H),
    ("tracing[].useRequestIdForTraceSampling", D),
    ("metrics", R), ("accessLogging", R),
];

fn scoped(t: &skiff_core::telemetry_api::TelemetryPolicy, waypoint: Option<&str>, labels: &[(&str, &str)]) -> Option<skiff_core::telemetry_api::TracingRule> {
    let l: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let scope = skiff_core::telemetry_api::ProxyScope { namespace: "shop", waypoint, labels: Some(&l) };
    skiff_core::telemetry_api::tracing_for(std::slice::from_ref(t), "istio-system", &scope).0
}

#[rustfmt::skip]
fn telemetry_cases() -> Vec<Case<skiff_core::telemetry_api::TelemetryPolicy>> {
    use skiff_core::telemetry_api::{Mode, Tag};
    vec![
        Case { fields: &["selector", "selector.matchLabels", "tracing", "tracing[].match", "tracing[].match.mode", "tracing[].providers", "tracing[].providers[].name",
                "tracing[].randomSamplingPercentage", "tracing[].disableSpanReporting", "tracing[].customTags"],
            cite: "Telemetry.selector (the workloads it applies to); Tracing: match.mode, providers (one), randomSamplingPercentage (0-100, new traces only), disableSpanReporting, customTags (literal, environment, header)",
            spec: "{selector: {matchLabels: {app: edge}}, tracing: [{match: {mode: SERVER}, providers: [{name: otel}], randomSamplingPercentage: 5.5, disableSpanReporting: true, customTags: {team: {literal: {value: a}}, home: {environment: {name: HOME, defaultValue: x}}, user: {header: {name: X-User, defaultValue: anon}}}}]}",
            expect: ok(|t| {
                let r = scoped(t, None, &[("app", "edge")]).expect("selected");
                assert_eq!((r.mode, r.providers.as_deref(), r.sampling, r.disable_reporting), (Some(Mode::Server), Some(&["otel".to_owned()][..]), Some(5.5), Some(true)));
                let tags = r.custom_tags.unwrap();
                assert!(tags.contains(&("team".into(), Tag::Literal("a".into()))));
                assert!(tags.contains(&("home".into(), Tag::Environment { name: "HOME".into(), default: Some("x".into()) })));
                assert!(tags.contains(&("user".into(), Tag::Header { name: "x-user".into(), default: Some("anon".into()) })));
                assert!(scoped(t, None, &[("app", "other")]).is_none(), "a pod it does not select");
                assert!(scoped(t, Some("waypoint"), &[("app", "edge")]).is_none(), "Istio ignores selectors for waypoints");
            }) },
        Case { fields: &["targetRefs", "targetRefs[].group", "targetRefs[].kind", "targetRefs[].name", "targetRefs[].namespace", "tracing"],
            cite: "Telemetry.targetRefs: kind Gateway, group gateway.networking.k8s.io, in the same namespace (waypoints are chosen so)",
            spec: "{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint, namespace: shop}], tracing: [{randomSamplingPercentage: 100}]}",
            expect: ok(|t| {
                assert_eq!(scoped(t, Some("waypoint"), &[]).and_then(|r| r.sampling), Some(100.0));
                assert!(scoped(t, Some("other"), &[]).is_none());
            }) },
        Case { fields: &["tracing[].useRequestIdForTraceSampling"], cite: "Tracing.useRequestIdForTraceSampling: taken; Skiff decides on the trace id (the same decision at every proxy), never on x-request-id",
            spec: "{tracing: [{useRequestIdForTraceSampling: false, randomSamplingPercentage: 1}]}",
            expect: ok(|t| assert_eq!(scoped(t, None, &[]).and_then(|r| r.sampling), Some(1.0))) },
        Case { fields: &["targetRefs[].kind"], cite: "Telemetry.targetRefs: only kind Gateway is supported", spec: "{targetRefs: [{kind: Service, name: reviews}], tracing: [{}]}", expect: Err("spec.targetRefs[0].kind") },
        Case { fields: &["targetRefs[].group"], cite: "PolicyTargetReference: a Gateway is in group gateway.networking.k8s.io", spec: "{targetRefs: [{kind: Gateway, name: waypoint}], tracing: [{}]}", expect: Err("spec.targetRefs[0].group") },
        Case { fields: &["targetRefs[].namespace"], cite: "Telemetry.targetRefs: in the same namespace",
            spec: "{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint, namespace: other}], tracing: [{}]}", expect: Err("spec.targetRefs[0].namespace") },
        Case { fields: &["targetRefs", "selector"], cite: "Telemetry: at most one of selector and targetRefs",
            spec: "{selector: {matchLabels: {a: b}}, targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]}", expect: Err("spec.targetRefs") },
        Case { fields: &["tracing"], cite: "one tracing entry per Telemetry (Skiff)", spec: "{tracing: [{}, {}]}", expect: Err("spec.tracing[1]") },
        Case { fields: &["tracing[].providers"], cite: "Tracing.providers: only a single provider in a rule", spec: "{tracing: [{providers: [{name: a}, {name: b}]}]}", expect: Err("spec.tracing[0].providers[1]") },
        Case { fields: &["tracing[].randomSamplingPercentage"], cite: "Tracing.randomSamplingPercentage: 0.00-100.00", spec: "{tracing: [{randomSamplingPercentage: 101}]}", expect: Err("spec.tracing[0].randomSamplingPercentage") },
        Case { fields: &["tracing[].match.mode"], cite: "WorkloadMode: CLIENT_AND_SERVER, CLIENT, SERVER", spec: "{tracing: [{match: {mode: BOTH}}]}", expect: Err("spec.tracing[0].match.mode") },
        Case { fields: &["tracing[].customTags"], cite: "CustomTag: one of literal, environment, header",
            spec: "{tracing: [{customTags: {x: {literal: {value: a}, header: {name: b}}}}]}", expect: Err("spec.tracing[0].customTags.x") },
    ]
}

#[test]
fn telemetry_fields_read_as_istio_documents() {
    let cases = telemetry_cases();
    run("Telemetry", TM, &cases, |s| s.telemetries.first());
    complete("Telemetry", TM, TELEMETRY, &cases, json!({"tracing": [{}]}));
}

#[test]
fn docs_table_agrees_with_the_telemetry_readings() {
    docs_agree("Telemetry", "### Telemetry: how Skiff reads Istio's fields", TELEMETRY);
}
