//! Istio's `Telemetry` (its `tracing`) and the tracing providers of the
//! mesh config (`extensionProviders`, `defaultProviders.tracing`): what a
//! waypoint or gateway reads to decide where its spans go, how many new
//! traces it samples and what tags it adds.
//!
//! Scope, as Istio's reference says: a Telemetry in the root namespace
//! without a selector is the mesh's default; one in a namespace without a
//! selector, that namespace's; one with `targetRefs` naming a waypoint
//! (kind Gateway, group `gateway.networking.k8s.io`, same namespace), that
//! waypoint's; one with a `selector`, the pods it selects (Istio ignores
//! selectors for waypoints: they use `targetRefs`). The more specific
//! overrides the less, field by field: `providers`,
//! `randomSamplingPercentage`, `disableSpanReporting` and `match` when
//! set; `customTags`, when set, replaces the parent's whole.

use std::collections::BTreeMap;

use crate::k8s;

type FieldError = (String, String);

/// Most `customTags` one tracing rule may set.
pub const MAX_CUSTOM_TAGS: usize = 64;

/// Which spans a proxy records (`tracing[].match.mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    #[default]
    ClientAndServer,
    Client,
    Server,
}

/// A `customTags` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tag {
    Literal(String),
    /// An environment variable of the proxy, or the default.
    Environment { name: String, default: Option<String> },
    /// A request header, or the default.
    Header { name: String, default: Option<String> },
}

/// One Telemetry's tracing, as far as it sets anything.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TracingRule {
    pub mode: Option<Mode>,
    pub providers: Option<Vec<String>>,
    pub sampling: Option<f64>,
    pub disable_reporting: Option<bool>,
    pub custom_tags: Option<Vec<(String, Tag)>>,
}

impl TracingRule {
    /// `more` (more specific) over `self`.
    fn overridden_by(mut self, more: &TracingRule) -> TracingRule {
        if more.mode.is_some() {
            self.mode = more.mode;
        }
        if more.providers.is_some() {
            self.providers.clone_from(&more.providers);
        }
        if more.sampling.is_some() {
            self.sampling = more.sampling;
        }
        if more.disable_reporting.is_some() {
            self.disable_reporting = more.disable_reporting;
        }
        if more.custom_tags.is_some() {
            self.custom_tags.clone_from(&more.custom_tags);
        }
        self
    }
}

/// A Telemetry object, read.
#[derive(Clone, Debug, PartialEq)]
pub struct TelemetryPolicy {
    pub namespace: String,
    pub name: String,
    /// `selector.matchLabels`.
    pub selector: Option<BTreeMap<String, String>>,
    /// Waypoints (Gateways of its namespace) named by `targetRefs`.
    pub target_gateways: Vec<String>,
    /// None: no `tracing` (the object says nothing about it).
    pub tracing: Option<TracingRule>,
}

impl TelemetryPolicy {
    fn namespace_wide(&self) -> bool {
        self.selector.is_none() && self.target_gateways.is_empty()
    }
}

/// Reads a Telemetry; the error names the field Skiff refuses.
pub fn telemetry_from(t: &k8s::Telemetry) -> Result<TelemetryPolicy, FieldError> {
    let namespace = t.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = t.metadata.name.clone().unwrap_or_default();
    let spec = &t.spec;
    let refuse = |f: &str, m: &str| Err((format!("spec.{f}"), m.to_owned()));
    if spec.metrics.is_some() {
        return refuse("metrics", "Skiff's metrics are Istio's standard set with every standard label; metric overrides and providers are not supported");
    }
    if spec.access_logging.is_some() {
        return refuse("accessLogging", "Skiff's proxies write one access line per request and connection to their log; access-log providers, filters and formats are not supported");
    }
    if spec.target_ref.is_some() {
        return refuse("targetRef", "deprecated in Istio: use targetRefs");
    }
    if spec.selector.is_some() && !spec.target_refs.is_empty() {
        return refuse("targetRefs", "at most one of selector and targetRefs may be set (Istio's validation)");
    }
    let mut target_gateways = Vec::new();
    for (i, r) in spec.target_refs.iter().enumerate() {
        if r.kind != "Gateway" {
            return refuse(&format!("targetRefs[{i}].kind"), "only kind Gateway (group gateway.networking.k8s.io, a waypoint) is supported, as in Istio");
        }
        if r.group.as_deref() != Some("gateway.networking.k8s.io") {
            return refuse(&format!("targetRefs[{i}].group"), "a Gateway target is in group gateway.networking.k8s.io");
        }
        if r.namespace.as_deref().is_some_and(|n| n != namespace) {
            return refuse(&format!("targetRefs[{i}].namespace"), "a target must be in the Telemetry's own namespace");
        }
        if r.name.is_empty() {
            return refuse(&format!("targetRefs[{i}].name"), "a target needs a name");
        }
        target_gateways.push(r.name.clone());
    }
    if spec.tracing.len() > 1 {
        return refuse("tracing[1]", "Skiff reads one tracing entry per Telemetry (the proxies of a scope share one tracing configuration)");
    }
    let tracing = match spec.tracing.first() {
        None => None,
        Some(tr) => {
            let at = |f: &str| format!("tracing[0].{f}");
            let mode = match tr.match_.as_ref().and_then(|m| m.mode.as_deref()) {
                None => None,
                Some("CLIENT_AND_SERVER") => Some(Mode::ClientAndServer),
                Some("CLIENT") => Some(Mode::Client),
                Some("SERVER") => Some(Mode::Server),
                Some(other) => return refuse(&at("match.mode"), &format!("{other:?} is not CLIENT_AND_SERVER, CLIENT or SERVER")),
            };
            if tr.providers.len() > 1 {
                return refuse(&at("providers[1]"), "only a single provider can be given in a tracing rule (Istio's reference)");
            }
            if tr.providers.first().is_some_and(|p| p.name.is_empty()) {
                return refuse(&at("providers[0].name"), "a provider needs a name");
            }
            let providers = (!tr.providers.is_empty()).then(|| tr.providers.iter().map(|p| p.name.clone()).collect());
            if let Some(p) = tr.random_sampling_percentage {
                if !(0.0..=100.0).contains(&p) || p.is_nan() {
                    return refuse(&at("randomSamplingPercentage"), &format!("{p} is not a percentage from 0 to 100"));
                }
            }
            if tr.custom_tags.len() > MAX_CUSTOM_TAGS {
                return refuse(&at("customTags"), &format!("{} tags; Skiff takes up to {MAX_CUSTOM_TAGS} (each is copied onto every span)", tr.custom_tags.len()));
            }
            let mut tags = Vec::new();
            for (k, v) in &tr.custom_tags {
                let f = at(&format!("customTags.{k}"));
                let tag = match (&v.literal, &v.environment, &v.header) {
                    (Some(l), None, None) if !l.value.is_empty() => Tag::Literal(l.value.clone()),
                    (Some(_), None, None) => return refuse(&format!("{f}.literal.value"), "a literal tag needs a value"),
                    (None, Some(e), None) if !e.name.is_empty() => Tag::Environment { name: e.name.clone(), default: e.default_value.clone() },
                    (None, None, Some(h)) if !h.name.is_empty() && h.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)) => {
                        Tag::Header { name: h.name.to_ascii_lowercase(), default: h.default_value.clone() }
                    }
                    (None, Some(_), None) => return refuse(&format!("{f}.environment.name"), "an environment tag needs a variable name"),
                    (None, None, Some(_)) => return refuse(&format!("{f}.header.name"), "a header tag needs a valid header name"),
                    _ => return refuse(&f, "a custom tag is exactly one of literal, environment or header"),
                };
                tags.push((k.clone(), tag));
            }
            Some(TracingRule {
                mode,
                providers,
                sampling: tr.random_sampling_percentage,
                disable_reporting: tr.disable_span_reporting,
                custom_tags: (!tags.is_empty()).then_some(tags),
            })
        }
    };
    Ok(TelemetryPolicy { namespace, name, selector: spec.selector.as_ref().map(|s| s.match_labels.clone()), target_gateways, tracing })
}

/// What a proxy is, for choosing its Telemetry.
pub struct ProxyScope<'a> {
    pub namespace: &'a str,
    /// The waypoint's name (what `targetRefs` name), if it is one.
    pub waypoint: Option<&'a str>,
    /// Its pod's labels (what a `selector` matches; not for waypoints).
    pub labels: Option<&'a BTreeMap<String, String>>,
}

/// The tracing that applies to a proxy: the root namespace's, then its
/// namespace's, then its own, each overriding what it sets. None: no
/// Telemetry with `tracing` applies. With several at one level (which
/// Istio's reference calls invalid) the first by name wins; the rest are
/// in the returned list of ignored objects, for a warning.
pub fn tracing_for(policies: &[TelemetryPolicy], root_namespace: &str, proxy: &ProxyScope<'_>) -> (Option<TracingRule>, Vec<String>) {
    let mut ignored = Vec::new();
    let mut level = |keep: &dyn Fn(&TelemetryPolicy) -> bool| -> Option<TracingRule> {
        let mut found: Vec<&TelemetryPolicy> = policies.iter().filter(|p| p.tracing.is_some() && keep(p)).collect();
        found.sort_by(|a, b| a.name.cmp(&b.name));
        ignored.extend(found.iter().skip(1).map(|p| format!("{}/{}", p.namespace, p.name)));
        found.first().and_then(|p| p.tracing.clone())
    };
    let root = level(&|p| p.namespace == root_namespace && p.namespace_wide());
    let namespace = if proxy.namespace == root_namespace { None } else { level(&|p| p.namespace == proxy.namespace && p.namespace_wide()) };
    let own = level(&|p| {
        p.namespace == proxy.namespace
            && match proxy.waypoint {
                Some(w) => p.target_gateways.iter().any(|g| g == w),
                None => p.selector.as_ref().is_some_and(|sel| proxy.labels.is_some_and(|l| sel.iter().all(|(k, v)| l.get(k) == Some(v)))),
            }
    });
    let merged = [root, namespace, own].into_iter().flatten().reduce(|acc, more| acc.overridden_by(&more));
    (merged, ignored)
}

/// A tracing provider of the mesh config (`extensionProviders[]`).
#[derive(Clone, Debug, PartialEq)]
pub enum Provider {
    /// Zipkin v2 JSON to `http://service:port{path}`.
    Zipkin { url: String },
    /// OTLP over HTTP/protobuf to `http://service:port{path}`.
    OtlpHttp { url: String },
    /// A provider Skiff does not export to (OTLP over gRPC, SkyWalking,
    /// Datadog…), with why.
    Unsupported(String),
}

/// The tracing providers of a mesh config, by name, and the fields of
/// them Skiff does not read (for a warning).
pub fn providers_from(v: &serde_json::Value, field: &str) -> (BTreeMap<String, Provider>, Vec<String>) {
    let mut out = BTreeMap::new();
    let mut not_read = Vec::new();
    for (i, p) in v.as_array().into_iter().flatten().enumerate() {
        let Some(obj) = p.as_object() else { continue };
        let Some(name) = obj.get("name").and_then(|n| n.as_str()) else {
            not_read.push(format!("{field}[{i}] (no name)"));
            continue;
        };
        let kinds: Vec<&String> = obj.keys().filter(|k| *k != "name").collect();
        let [kind] = kinds.as_slice() else {
            out.insert(name.to_owned(), Provider::Unsupported(format!("{} provider kinds", kinds.len())));
            continue;
        };
        let conf = &obj[kind.as_str()];
        let host = conf.get("service").and_then(|s| s.as_str()).map(|s| s.rsplit('/').next().unwrap_or(s).to_owned());
        let port = conf.get("port").and_then(|p| p.as_u64()).filter(|p| (1..=65535).contains(p));
        let mut extra = |known: &[&str]| {
            for k in conf.as_object().into_iter().flat_map(|o| o.keys()) {
                if !known.contains(&k.as_str()) {
                    not_read.push(format!("{field}[{i}].{kind}.{k}"));
                }
            }
        };
        let provider = match (kind.as_str(), host, port) {
            ("zipkin", Some(h), Some(port)) => {
                extra(&["service", "port", "path"]);
                let path = rooted(conf.get("path").and_then(|p| p.as_str()).unwrap_or("/api/v2/spans"));
                Provider::Zipkin { url: format!("http://{h}:{port}{path}") }
            }
            ("opentelemetry", Some(h), Some(port)) => match conf.get("http") {
                Some(http) => {
                    extra(&["service", "port", "http"]);
                    for k in http.as_object().into_iter().flat_map(|o| o.keys()) {
                        if k != "path" {
                            not_read.push(format!("{field}[{i}].opentelemetry.http.{k}"));
                        }
                    }
                    let path = rooted(http.get("path").and_then(|p| p.as_str()).unwrap_or("/v1/traces"));
                    Provider::OtlpHttp { url: format!("http://{h}:{port}{path}") }
                }
                None => Provider::Unsupported("OTLP over gRPC: Skiff exports OTLP over HTTP (set opentelemetry.http)".into()),
            },
            ("zipkin" | "opentelemetry", _, _) => Provider::Unsupported("no service, or no port from 1 to 65535".into()),
            (other, _, _) => Provider::Unsupported(format!("{other} is not a tracing provider Skiff exports to (zipkin, opentelemetry with http)")),
        };
        out.insert(name.to_owned(), provider);
    }
    (out, not_read)
}

/// A URL path starting with `/` (a path without one would run into the
/// port, or with `@` change the host).
fn rooted(path: &str) -> String {
    if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(ns: &str, name: &str, yaml: &str) -> TelemetryPolicy {
        let text = format!("apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {yaml}\n");
        let objs = k8s::parse_documents(&text).unwrap();
        let k8s::Object::Telemetry(t) = &objs[0] else { panic!("{:?}", objs[0]) };
        telemetry_from(t).unwrap()
    }

    /// Istio's Telemetry reference ("Scope, Inheritance, and Overrides";
    /// `Tracing`): root, then namespace, then workload; each set field
    /// overrides; `customTags` replace as a whole; waypoints are chosen by
    /// `targetRefs`, other proxies by `selector`.
    #[test]
    fn tracing_is_inherited_and_overridden_field_by_field() {
        let ps = vec![
            policy("istio-system", "mesh-default", "{tracing: [{providers: [{name: otel}], randomSamplingPercentage: 10, customTags: {team: {literal: {value: mesh}}}}]}"),
            policy("shop", "ns", "{tracing: [{randomSamplingPercentage: 50}]}"),
            policy("shop", "wp", "{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}], tracing: [{disableSpanReporting: true, customTags: {who: {header: {name: X-User}}}}]}"),
            policy("shop", "pods", "{selector: {matchLabels: {app: edge}}, tracing: [{match: {mode: SERVER}, randomSamplingPercentage: 0}]}"),
            policy("other", "metrics-only", "{}"),
        ];
        let at = |ns: &str, waypoint: Option<&str>, labels: &[(&str, &str)]| {
            let l: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            tracing_for(&ps, "istio-system", &ProxyScope { namespace: ns, waypoint, labels: Some(&l) }).0
        };
        // The namespace overrides the sampling, keeps the mesh's provider and tags.
        let r = at("shop", Some("other-waypoint"), &[]).unwrap();
        assert_eq!((r.providers.as_deref(), r.sampling, r.disable_reporting), (Some(&["otel".to_owned()][..]), Some(50.0), None));
        assert_eq!(r.custom_tags, Some(vec![("team".into(), Tag::Literal("mesh".into()))]));
        // The waypoint's own: reporting off, its tags replace the mesh's.
        let r = at("shop", Some("waypoint"), &[("app", "edge")]).unwrap();
        assert_eq!((r.sampling, r.disable_reporting), (Some(50.0), Some(true)));
        assert_eq!(r.custom_tags, Some(vec![("who".into(), Tag::Header { name: "x-user".into(), default: None })]), "header names in lower case");
        assert_eq!(r.mode, None, "a selector never applies to a waypoint");
        // A pod selected by labels (the ingress gateway).
        let r = at("shop", None, &[("app", "edge")]).unwrap();
        assert_eq!((r.mode, r.sampling), (Some(Mode::Server), Some(0.0)));
        // Only the mesh's default elsewhere; nothing without any.
        assert_eq!(at("other", None, &[]).unwrap().sampling, Some(10.0));
        assert_eq!(tracing_for(&ps[3..], "istio-system", &ProxyScope { namespace: "other", waypoint: None, labels: None }).0, None);
        // Two namespace-wide objects: the first by name, the other named.
        let two = vec![policy("shop", "b", "{tracing: [{randomSamplingPercentage: 1}]}"), policy("shop", "a", "{tracing: [{randomSamplingPercentage: 2}]}")];
        let (r, ignored) = tracing_for(&two, "istio-system", &ProxyScope { namespace: "shop", waypoint: None, labels: None });
        assert_eq!((r.unwrap().sampling, ignored), (Some(2.0), vec!["shop/b".to_owned()]));
    }

    #[test]
    fn mesh_config_tracing_providers_become_collector_urls() {
        let v = serde_json::json!([
            {"name": "otel", "opentelemetry": {"service": "observability/otel-collector.observability.svc.cluster.local", "port": 4318, "http": {"path": "v1/traces", "timeout": "5s"}}},
            {"name": "otel-grpc", "opentelemetry": {"service": "otel.observability.svc.cluster.local", "port": 4317}},
            {"name": "zipkin", "zipkin": {"service": "zipkin.istio-system.svc.cluster.local", "port": 9411, "maxTagLength": 256}},
            {"name": "authz", "envoyExtAuthzHttp": {"service": "authz.foo", "port": 9000}},
        ]);
        let (p, not_read) = providers_from(&v, "extensionProviders");
        assert_eq!(p["otel"], Provider::OtlpHttp { url: "http://otel-collector.observability.svc.cluster.local:4318/v1/traces".into() });
        assert_eq!(p["zipkin"], Provider::Zipkin { url: "http://zipkin.istio-system.svc.cluster.local:9411/api/v2/spans".into() });
        assert!(matches!(&p["otel-grpc"], Provider::Unsupported(w) if w.contains("gRPC")));
        assert!(matches!(&p["authz"], Provider::Unsupported(_)));
        assert_eq!(not_read, vec!["extensionProviders[0].opentelemetry.http.timeout".to_owned(), "extensionProviders[2].zipkin.maxTagLength".to_owned()]);
    }
}
