//! `skiff dashboard`: a web page, served locally, with the mesh's live
//! service graph — workloads grouped by app and version, edges with
//! request rate, error rate and p99 latency, a padlock on mutual-TLS
//! edges, the split of weighted routes, ingress and egress as nodes,
//! warnings for refused config and denied traffic — from every ztunnel's,
//! waypoint's and gateway's metrics (scraped every 2 s in their network
//! namespaces) and the cluster's config. Clicking an edge shows its
//! figures and `skiff explain` of it. The page polls; no reload.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use skiff_core::model::Snapshot;

/// One sample of a Prometheus text exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus text format (comments skipped; a malformed line
/// is skipped, never fatal).
pub fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => (&line[..i], &line[i..]),
            None => continue,
        };
        let mut labels = BTreeMap::new();
        let rest = if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            let mut end = None;
            let (mut key, mut val, mut in_val, mut esc) = (String::new(), String::new(), false, false);
            while let Some((i, c)) = chars.next() {
                if in_val {
                    match (c, esc) {
                        ('\\', false) => esc = true,
                        ('"', false) => {
                            labels.insert(std::mem::take(&mut key), std::mem::take(&mut val));
                            in_val = false;
                        }
                        ('n', true) => {
                            val.push('\n');
                            esc = false;
                        }
                        (c, _) => {
                            val.push(c);
                            esc = false;
                        }
                    }
                } else {
                    match c {
                        '}' => {
                            end = Some(i);
                            break;
                        }
                        '=' => {
                            if chars.next().map(|(_, c)| c) != Some('"') {
                                break;
                            }
                            in_val = true;
                        }
                        ',' | ' ' => {}
                        c => key.push(c),
                    }
                }
            }
            match end {
                Some(i) => &body[i + 1..],
                None => continue,
            }
        } else {
            rest
        };
        let Some(value) = rest.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) else { continue };
        out.push(Sample { name: name.to_owned(), labels, value });
    }
    out
}

/// A node of the graph: a workload's app and version in a namespace, or
/// the mesh's edges (ingress, egress).
fn node_id(ns: &str, app: &str, version: &str) -> String {
    format!("{ns}/{app}/{version}")
}

#[derive(Default, Clone)]
struct EdgeAcc {
    protocol: &'static str,
    requests: f64,
    errors: f64,
    denied: f64,
    mtls: bool,
    service: String,
    service_namespace: String,
    /// Histogram buckets (le → count), for p99.
    buckets: BTreeMap<String, f64>,
    /// A source workload (pod owner) name, for `explain`.
    source_workload: String,
}

/// Edges by (source node, destination node), from one scrape of every
/// source.
fn edges(samples: &[Sample], proxies: &BTreeSet<(String, String)>) -> BTreeMap<(String, String), EdgeAcc> {
    let mut out: BTreeMap<(String, String), EdgeAcc> = BTreeMap::new();
    let mut proxy_mtls = BTreeSet::new();
    let l = |s: &Sample, k: &str| s.labels.get(k).cloned().unwrap_or_default();
    for s in samples {
        let http = matches!(s.name.as_str(), "istio_requests_total" | "istio_request_duration_milliseconds_bucket");
        let tcp = s.name == "istio_tcp_connections_opened_total";
        if !http && !tcp {
            continue;
        }
        let reporter = l(s, "reporter");
        // HTTP: the waypoint's view (it knows the pod it chose) and the
        // gateway's (reporter source). TCP: the destination's ztunnel,
        // except streams a waypoint or gateway opens (their requests are
        // counted there); and ztunnel's source view of what leaves the
        // mesh.
        let src_ns = l(s, "source_workload_namespace");
        let src_wl = l(s, "source_workload");
        let egress_dst = matches!(l(s, "destination_service_name").as_str(), "PassthroughCluster" | "BlackHoleCluster")
            || (l(s, "destination_workload") == "unknown" && l(s, "destination_service").contains('.') && !l(s, "destination_service").ends_with(".svc.cluster.local"));
        let take = match (http, reporter.as_str()) {
            (true, "waypoint") | (true, "source") => true,
            // A TCP stream through a waypoint, as the waypoint saw it.
            (false, "waypoint") => true,
            (false, "destination") => !proxies.contains(&(src_ns.clone(), src_wl.clone())),
            (false, "source") => egress_dst,
            _ => false,
        };
        // A proxy's stream as the destination's ztunnel saw it: not an
        // edge, but whether the proxy's hop to that pod was mutual TLS (a
        // gateway's own series, reporter source, cannot say: Istio labels
        // them `unknown`).
        let proxy_stream = tcp && reporter == "destination" && !take;
        if !take && !proxy_stream {
            continue;
        }
        let src = if src_wl == "unknown" {
            "outside/unknown/-".to_owned()
        } else {
            node_id(&src_ns, &l(s, "source_canonical_service"), &l(s, "source_canonical_revision"))
        };
        let dst = if egress_dst {
            format!("egress/{}/-", l(s, "destination_service"))
        } else if l(s, "destination_workload") == "unknown" {
            // Refused before a pod was chosen (denied, no route): the
            // Service itself.
            node_id(&l(s, "destination_service_namespace"), &l(s, "destination_service_name"), "-")
        } else {
            node_id(&l(s, "destination_workload_namespace"), &l(s, "destination_canonical_service"), &l(s, "destination_canonical_revision"))
        };
        if dst.starts_with("unknown/") {
            continue;
        }
        if proxy_stream {
            if l(s, "connection_security_policy") == "mutual_tls" {
                proxy_mtls.insert((src, dst));
            }
            continue;
        }
        let e = out.entry((src, dst)).or_default();
        e.protocol = if http { "http" } else { "tcp" };
        e.service = l(s, "destination_service_name");
        e.service_namespace = l(s, "destination_service_namespace");
        e.source_workload = format!("{src_ns}/{src_wl}");
        if l(s, "connection_security_policy") == "mutual_tls" {
            e.mtls = true;
        }
        match s.name.as_str() {
            "istio_request_duration_milliseconds_bucket" => *e.buckets.entry(l(s, "le")).or_default() += s.value,
            _ => {
                e.requests += s.value;
                let code: u16 = l(s, "response_code").parse().unwrap_or(0);
                let flags = l(s, "response_flags");
                // A 403 at a waypoint or gateway: its policy, or the
                // application's own (the two look alike in metrics).
                if code == 403 || flags.split(',').any(|f| f == "UAEX") {
                    e.denied += s.value;
                }
                if code >= 500 || (tcp && flags != "-" && !flags.is_empty()) {
                    e.errors += s.value;
                }
            }
        }
    }
    for (k, e) in out.iter_mut() {
        if proxy_mtls.contains(k) {
            e.mtls = true;
        }
    }
    out
}

/// The 99th percentile from cumulative buckets (`le` → count), as
/// Prometheus' histogram_quantile interpolates.
fn p99(buckets: &BTreeMap<String, f64>) -> Option<f64> {
    let mut b: Vec<(f64, f64)> = buckets.iter().filter_map(|(le, c)| Some((if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? }, *c))).collect();
    b.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = b.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = 0.99 * total;
    let (mut prev_le, mut prev_c) = (0.0, 0.0);
    for (le, c) in b {
        if c >= rank {
            if le.is_infinite() {
                return Some(prev_le);
            }
            return Some(prev_le + (le - prev_le) * ((rank - prev_c) / (c - prev_c).max(f64::MIN_POSITIVE)));
        }
        (prev_le, prev_c) = (le, c);
    }
    None
}

/// Configured weights of weighted routes: (service namespace, service,
/// version, the Gateway (namespace, name) the route is bound to, or None
/// for `mesh`) → percent. A route splits only the requests of the proxies
/// its VirtualService binds to: the gateways serving that Gateway, or
/// (`mesh`) the waypoints; plain L4 traffic between pods is not split by
/// it.
type SplitKey = (String, String, String, Option<(String, String)>);

fn splits(snap: &Snapshot) -> BTreeMap<SplitKey, f64> {
    let mut out = BTreeMap::new();
    for vs in &snap.virtual_services {
        let mut at: Vec<Option<(String, String)>> = vs
            .gateways
            .iter()
            .filter_map(|b| match b {
                skiff_core::routing::Bind::Gateway { namespace, name } => Some(Some((namespace.clone(), name.clone()))),
                skiff_core::routing::Bind::Mesh => None,
            })
            .collect();
        if vs.mesh {
            at.push(None);
        }
        for r in &vs.http {
            if r.destinations.len() < 2 {
                continue;
            }
            let total = skiff_core::routing::total_weight(&r.destinations).max(1);
            for d in &r.destinations {
                let Some(svc) = snap.services.values().find(|s| skiff_core::routing::host_matches(&d.host, &vs.namespace, &s.name, &s.namespace)) else { continue };
                let Some(subset) = &d.subset else { continue };
                let Some(dr) = skiff_core::routing::destination_rule_for(&snap.destination_rules, &svc.name, &svc.namespace, &svc.namespace) else { continue };
                let Some(labels) = dr.subsets.get(subset) else { continue };
                let version = labels.get("version").cloned().unwrap_or_else(|| subset.clone());
                let percent = f64::from(d.weight) * 100.0 / f64::from(total);
                for bind in &at {
                    out.entry((svc.namespace.clone(), svc.name.clone(), version.clone(), bind.clone())).or_insert(percent);
                }
            }
        }
    }
    out
}

/// Per edge, at one scrape: requests, errors, and the duration buckets.
type Counts = BTreeMap<(String, String), (f64, f64, BTreeMap<String, f64>)>;

/// How far back rates, error rates and p99 look.
const WINDOW: Duration = Duration::from_secs(60);

struct State {
    /// The last graph served.
    graph: Value,
    /// Complete scrapes (every proxy answered) of the last [`WINDOW`],
    /// oldest first: rates are the change since the oldest.
    window: std::collections::VecDeque<(Instant, Counts)>,
}

/// Where the dashboard reads the cluster (the objects, not the traffic).
pub enum View {
    /// The running local mesh (its work directory): its files, and its
    /// proxies to scrape.
    Mesh(std::path::PathBuf),
    /// The Kubernetes API, watched as the mesh's processes watch it; and,
    /// to scrape the proxies without a Prometheus server, the cluster
    /// reached by pod port-forward.
    Kube(Mutex<(Box<dyn skiff_core::source::ConfigSource>, Arc<Snapshot>)>, Option<Box<crate::reach::Mesh>>),
}

impl View {
    /// The Kubernetes API at `url` (else KUBECONFIG or in-cluster): its
    /// first complete view within 30 s. `scrape`: the proxies' metrics are
    /// read through pod port-forwards.
    pub fn kube(url: Option<String>, scrape: bool) -> Result<View, String> {
        let cluster = if scrape { Some(Box::new(crate::reach::Mesh::open(None, true, url.clone())?)) } else { None };
        let choice = skiff_kube_source::SourceChoice::from_args(None, true, url).map_err(|e| e.to_string())?;
        let mut source = choice.mesh_config_in(skiff_core::routing::DEFAULT_ROOT_NAMESPACE).open().map_err(|e| format!("the Kubernetes API: {}", skiff_core::report(&e)))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let first = loop {
            match source.poll(Duration::from_millis(500)) {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() < deadline => {}
                Ok(None) => return Err("the Kubernetes API gave no complete view of the cluster within 30 s".into()),
                Err(e) => return Err(format!("the Kubernetes API: {}", e.report())),
            }
        };
        Ok(View::Kube(Mutex::new((source, first)), cluster))
    }

    /// The cluster now.
    fn snapshot(&self) -> Result<Arc<Snapshot>, String> {
        match self {
            View::Mesh(work) => skiff_core::source::LocalDirSource::analyze(&work.join("cluster")).map(Arc::new).map_err(|e| e.report()),
            View::Kube(k, _) => {
                let mut k = k.lock().expect("lock");
                if let Ok(Some(s)) = k.0.poll(Duration::from_millis(1)) {
                    k.1 = s;
                }
                Ok(k.1.clone())
            }
        }
    }

    /// ztunnel's `--outbound-traffic-policy` where it can be read.
    fn outbound_policy(&self) -> skiff_core::egress::OutboundPolicy {
        match self {
            View::Mesh(work) => skiff_core::egress::OutboundPolicy::parse(&crate::mesh::ztunnel_flag(&work.join("cluster"), "--outbound-traffic-policy").unwrap_or_default()).unwrap_or_default(),
            View::Kube(..) => Default::default(),
        }
    }
}

/// The series the graph is made of.
const GRAPH_SERIES: [&str; 3] = ["istio_requests_total", "istio_request_duration_milliseconds_bucket", "istio_tcp_connections_opened_total"];

/// The graph's series as a Prometheus server has them now (`url`:
/// `http://HOST:PORT`, the server's HTTP API), as samples.
fn from_prometheus(url: &str) -> Result<Vec<Sample>, String> {
    let base = url.strip_prefix("http://").ok_or_else(|| format!("--prometheus {url}: only http:// URLs"))?.trim_end_matches('/');
    let (hostport, prefix) = base.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((base, String::new()));
    let mut out = Vec::new();
    for name in GRAPH_SERIES {
        let body = http_get(hostport, &format!("{prefix}/api/v1/query?query={name}"))?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("Prometheus at {url}: {e}"))?;
        if v["status"] != "success" {
            return Err(format!("Prometheus at {url}: {}", v["error"]));
        }
        for r in v["data"]["result"].as_array().into_iter().flatten() {
            let labels: BTreeMap<String, String> =
                r["metric"].as_object().into_iter().flatten().filter(|(k, _)| *k != "__name__").map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned())).collect();
            let Some(value) = r["value"].get(1).and_then(Value::as_str).and_then(|v| v.parse::<f64>().ok()) else { continue };
            out.push(Sample { name: name.to_owned(), labels, value });
        }
    }
    Ok(out)
}

/// GET `path` from `hostport` over plain HTTP/1.1; the body of a 200.
fn http_get(hostport: &str, path: &str) -> Result<String, String> {
    use std::net::ToSocketAddrs as _;
    let addr = hostport.to_socket_addrs().map_err(|e| format!("{hostport}: {e}"))?.next().ok_or_else(|| format!("{hostport}: no address"))?;
    let (status, body) = skiff_core::http1::get(addr, hostport, path, Duration::from_secs(10)).map_err(|e| format!("{hostport}: {e}"))?;
    if status != 200 {
        return Err(format!("{hostport}{path}: status {status}"));
    }
    Ok(body)
}

/// One refresh: scrape (or ask Prometheus), and the graph.
fn refresh(view: &View, state: &Mutex<State>, prometheus: Option<&str>) -> Result<(), String> {
    let snap = view.snapshot()?;
    let mut samples = Vec::new();
    let mut unreachable = Vec::new();
    match prometheus {
        Some(url) => match from_prometheus(url) {
            Ok(s) => samples = s,
            Err(e) => unreachable.push(e),
        },
        None => {
            let local;
            let mesh = match view {
                View::Mesh(work) => {
                    local = crate::reach::Mesh::Local(work.clone());
                    &local
                }
                View::Kube(_, Some(cluster)) => cluster,
                View::Kube(_, None) => return Err("no Prometheus server and no way to scrape the proxies".into()),
            };
            for (what, place) in mesh.proxies(&snap, true)? {
                match mesh.get(&place, 15020, "/metrics") {
                    Ok(text) => samples.extend(parse(&text)),
                    Err(e) => unreachable.push(format!("{what}: metrics not reachable: {e}")),
                }
            }
        }
    }
    // Workloads whose own traffic is counted as requests (waypoints and
    // gateways): their TCP streams to pods are not edges of their own.
    let proxies: BTreeSet<(String, String)> = snap
        .workloads
        .values()
        .filter(|w| w.labels.get(skiff_core::LABEL_GATEWAY_NAME).is_some_and(|g| *g == w.service_account) || !snap.gateway_servers(w).is_empty())
        .map(|w| (w.namespace.clone(), w.workload_name.clone()))
        .collect();
    // The Gateways each gateway serves, by its graph name (namespace/app,
    // as the metrics' canonical service names it) and by workload.
    let mut served: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for w in snap.workloads.values() {
        let gws: Vec<(String, String)> = snap.gateway_servers(w).iter().map(|o| (o.gateway.namespace.clone(), o.gateway.name.clone())).collect();
        if gws.is_empty() {
            continue;
        }
        let names = [Some(&w.workload_name), w.labels.get("service.istio.io/canonical-name"), w.labels.get("app.kubernetes.io/name"), w.labels.get("app")];
        for n in names.into_iter().flatten() {
            served.entry(format!("{}/{n}", w.namespace)).or_default().extend(gws.iter().cloned());
        }
    }
    let edges = edges(&samples, &proxies);
    let splits = splits(&snap);
    let now = Instant::now();
    let mut st = state.lock().expect("lock");
    while st.window.front().is_some_and(|(at, _)| now.duration_since(*at) > WINDOW) {
        st.window.pop_front();
    }
    let oldest = st.window.front().cloned();
    let mut nodes: BTreeMap<String, Value> = BTreeMap::new();
    let mut edge_list = Vec::new();
    let mut warnings: Vec<Value> = snap.rejected.iter().map(|r| json!({"kind": "config", "text": r.to_string()})).collect();
    warnings.extend(unreachable.iter().map(|u| json!({"kind": "scrape", "text": u})));
    let mut counts = Counts::new();
    for ((src, dst), e) in &edges {
        counts.insert((src.clone(), dst.clone()), (e.requests, e.errors, e.buckets.clone()));
        // Over the window when there was traffic in it; else since the
        // proxies started (said so).
        let before = oldest.as_ref().and_then(|(at, c)| c.get(&(src.clone(), dst.clone())).map(|v| (*at, v.clone())));
        let (rps, window_requests, window_errors, window_buckets, span) = match &before {
            Some((at, (r0, e0, b0))) => {
                let dt = now.duration_since(*at).as_secs_f64().max(0.001);
                let b: BTreeMap<String, f64> = e.buckets.iter().map(|(k, v)| (k.clone(), (v - b0.get(k).copied().unwrap_or(0.0)).max(0.0))).collect();
                (Some(((e.requests - r0) / dt).max(0.0)), (e.requests - r0).max(0.0), (e.errors - e0).max(0.0), b, dt)
            }
            // New in the window: its series started at zero within it.
            None if oldest.is_some() => {
                let dt = now.duration_since(oldest.as_ref().expect("some").0).as_secs_f64().max(0.001);
                (Some(e.requests / dt), e.requests, e.errors, e.buckets.clone(), dt)
            }
            None => (None, 0.0, 0.0, BTreeMap::new(), 0.0),
        };
        let recent = window_requests > 0.0;
        let (error_rate, p99_ms, over) = if recent {
            (window_errors / window_requests, p99(&window_buckets), format!("the last {} s", span.round()))
        } else {
            (if e.requests > 0.0 { e.errors / e.requests } else { 0.0 }, p99(&e.buckets), "since the proxies started".to_owned())
        };
        for id in [src, dst] {
            let mut parts = id.splitn(3, '/');
            let (ns, app, version) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let kind = if ns == "egress" {
                "egress"
            } else if ns == "outside" || served.contains_key(&format!("{ns}/{app}")) {
                "ingress"
            } else if version == "-" {
                "service"
            } else {
                "workload"
            };
            nodes.entry(id.clone()).or_insert_with(|| json!({"id": id, "namespace": ns, "app": app, "version": version, "kind": kind}));
        }
        let dst_version = dst.rsplit('/').next().unwrap_or("");
        let key = |bind: Option<(String, String)>| (e.service_namespace.clone(), e.service.clone(), dst_version.to_owned(), bind);
        let split = match src.rsplit_once('/').and_then(|(ns_app, _)| served.get(ns_app)) {
            // From a gateway: a route bound to a Gateway it serves.
            Some(gws) => gws.iter().find_map(|g| splits.get(&key(Some(g.clone()))).copied()),
            // Requests through a waypoint: a `mesh` route.
            None if e.protocol == "http" => splits.get(&key(None)).copied(),
            None => None,
        };
        let id = format!("{src}->{dst}");
        edge_list.push(json!({
            "id": id, "source": src, "target": dst, "protocol": e.protocol,
            "total": e.requests, "rps": rps, "error_rate": error_rate, "p99_ms": p99_ms, "over": over,
            "mtls": e.mtls, "split_percent": split,
            "service": format!("{}.{}", e.service, e.service_namespace), "denied": e.denied,
            "source_workload": e.source_workload,
        }));
        if e.denied > 0.0 {
            warnings.push(json!({"kind": "denied", "text": format!("{} denied from {src} to {dst}", e.denied), "edge": id}));
        }
    }
    // A scrape some proxy missed would read as a drop and then a jump.
    if unreachable.is_empty() {
        st.window.push_back((now, counts));
    }
    st.graph = json!({"nodes": nodes.into_values().collect::<Vec<_>>(), "edges": edge_list, "warnings": warnings, "updated_unix_ms": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)});
    Ok(())
}

/// `explain` of an edge: its source workload to its Service.
fn explain_edge(view: &View, graph: &Value, id: &str) -> Value {
    let Some(e) = graph["edges"].as_array().and_then(|a| a.iter().find(|e| e["id"] == id)) else {
        return json!({"error": format!("no edge {id}")});
    };
    let snap = match view.snapshot() {
        Ok(s) => s,
        Err(e) => return json!({"error": e}),
    };
    let from = e["source_workload"].as_str().unwrap_or("");
    let (svc, ns) = e["service"].as_str().unwrap_or("").split_once('.').unwrap_or(("", ""));
    let Some(service) = snap.services.get(&format!("{ns}/{svc}")) else {
        return json!({"error": format!("{svc}.{ns} is not a Service: nothing to explain")});
    };
    // The first port of the edge's protocol.
    let http = e["protocol"] == "http";
    let Some(port) = service.ports.iter().find(|p| (skiff_l7::route::port_protocol(p) != "tcp") == http).or(service.ports.first()) else {
        return json!({"error": "the Service has no port"});
    };
    let to = if e["protocol"] == "http" { format!("http://{svc}.{ns}:{}/", port.port) } else { format!("{svc}.{ns}:{}", port.port) };
    let (Ok(f), Ok((t, path))) = (crate::explain::parse_from(from), crate::explain::parse_to(&to)) else {
        return json!({"error": format!("cannot explain {from} -> {to}")});
    };
    let ask = crate::explain::Ask {
        from: f,
        to: t,
        path,
        method: "GET".into(),
        headers: Vec::new(),
        trust_domain: "cluster.local".into(),
        root_namespace: skiff_core::routing::DEFAULT_ROOT_NAMESPACE.into(),
        outbound_policy: view.outbound_policy(),
        outbound_policy_from: "ztunnel's --outbound-traffic-policy".into(),
    };
    match crate::explain::explain(&snap, &ask) {
        Ok(x) => json!({"from": from, "to": to, "explanation": x}),
        Err(why) => json!({"error": why}),
    }
}

const PAGE: &str = include_str!("dashboard.html");

fn respond(mut s: &TcpStream, status: &str, ctype: &str, body: &[u8]) {
    let head = format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n", body.len());
    let _ = s.write_all(head.as_bytes()).and_then(|_| s.write_all(body));
}

/// Connections served at once; more wait in the listen queue.
const MAX_CONNECTIONS: usize = 32;

fn serve_one(s: TcpStream, view: &View, state: &Mutex<State>, hosts: &[String]) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
    // The request head: at most 16 KiB, read to its end.
    let mut r = BufReader::new((&s).take(16 * 1024));
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    let mut host = None;
    loop {
        let mut h = String::new();
        match r.read_line(&mut h) {
            Ok(0) | Err(_) => return,
            Ok(_) if h == "\r\n" || h == "\n" => break,
            Ok(_) => {
                if let Some((k, v)) = h.split_once(':') {
                    if k.eq_ignore_ascii_case("host") {
                        host = Some(v.trim().to_owned());
                    }
                }
            }
        }
    }
    // Only this machine's names for the address it listens on: a web page
    // elsewhere cannot read the graph by pointing its own name here (DNS
    // rebinding).
    if !hosts.is_empty() && !host.as_ref().is_some_and(|h| hosts.contains(h)) {
        respond(&s, "421 Misdirected Request", "text/plain", b"this dashboard answers to its own address only\n");
        return;
    }
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    match path {
        "/" => respond(&s, "200 OK", "text/html; charset=utf-8", PAGE.as_bytes()),
        "/api/graph" => {
            let g = state.lock().expect("lock").graph.to_string();
            respond(&s, "200 OK", "application/json", g.as_bytes());
        }
        "/api/explain" => {
            let id = query.split('&').find_map(|kv| kv.strip_prefix("edge=")).map(percent_decode).unwrap_or_default();
            let graph = state.lock().expect("lock").graph.clone();
            respond(&s, "200 OK", "application/json", explain_edge(view, &graph, &id).to_string().as_bytes());
        }
        _ => respond(&s, "404 Not Found", "text/plain", b"not found\n"),
    }
}

fn percent_decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Serves the dashboard on `listen` until interrupted; prints its URL.
/// With `prometheus`, the series come from that server instead of the
/// proxies.
pub fn run(view: View, listen: &str, prometheus: Option<String>) -> Result<(), String> {
    let view = Arc::new(view);
    let state = Arc::new(Mutex::new(State { graph: json!({"nodes": [], "edges": [], "warnings": []}), window: Default::default() }));
    refresh(&view, &state, prometheus.as_deref())?;
    let listener = TcpListener::bind(listen).map_err(|e| format!("--listen {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    // On loopback, the Host a browser sends must be one of this address's
    // names; elsewhere (the operator chose to expose it) any.
    let hosts: Vec<String> = if addr.ip().is_loopback() {
        vec![addr.to_string(), format!("localhost:{}", addr.port()), addr.ip().to_string(), "localhost".into()]
    } else {
        eprintln!("skiff dashboard: listening on {addr}, not loopback: anyone who reaches it sees the mesh's graph (there is no login)");
        Vec::new()
    };
    println!("skiff dashboard: http://{addr}/");
    let _ = std::io::stdout().flush();
    {
        let (view, state) = (view.clone(), state.clone());
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_secs(2));
            if let Err(e) = refresh(&view, &state, prometheus.as_deref()) {
                eprintln!("skiff dashboard: {e}");
            }
        });
    }
    let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hosts = Arc::new(hosts);
    for s in listener.incoming() {
        let s = match s {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors or the like: wait, never spin.
                eprintln!("skiff dashboard: accept: {e}");
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        while busy.load(std::sync::atomic::Ordering::Acquire) >= MAX_CONNECTIONS {
            std::thread::sleep(Duration::from_millis(10));
        }
        busy.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let (view, state, busy, hosts) = (view.clone(), state.clone(), busy.clone(), hosts.clone());
        std::thread::spawn(move || {
            serve_one(s, &view, &state, &hosts);
            busy.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_and_p99() {
        let text = "# HELP x y\nistio_requests_total{reporter=\"waypoint\",a=\"q\\\"uote\"} 3\nup 1\nbad{x=\"1\" oops\nh_bucket{le=\"10\"} 90\nh_bucket{le=\"100\"} 100\nh_bucket{le=\"+Inf\"} 100\n";
        let s = parse(text);
        assert_eq!(s.len(), 5, "{s:?}");
        assert_eq!(s[0].labels["a"], "q\"uote");
        assert_eq!((s[1].name.as_str(), s[1].value), ("up", 1.0));
        let b: BTreeMap<String, f64> = s[2..].iter().map(|x| (x.labels["le"].clone(), x.value)).collect();
        // 99 of 100 falls 9/10 of the way through the (10, 100] bucket.
        assert!((p99(&b).unwrap() - 91.0).abs() < 1e-9, "{:?}", p99(&b));
        assert_eq!(percent_decode("a%2Fb%3E%3Ec+d%"), "a/b>>c d%");
    }
}
