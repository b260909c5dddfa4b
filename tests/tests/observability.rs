//! Observability with the tools users keep (issue 15): a real Prometheus
//! server (Debian's `prometheus`, in the local mesh's fabric netns, as a
//! cluster's monitoring would sit) scrapes every Skiff process of the mesh
//! — ztunnel and node-agent on each node, the waypoint, the ingress
//! gateway. After HTTP through the waypoint (two versions, a failing
//! Service, gRPC) and TCP through ztunnel alone, the test runs the PromQL
//! of Kiali's graph and Istio's Grafana dashboards and checks the answers;
//! runs every query of Skiff's own dashboards (deploy/monitoring) and
//! checks each returns data; and compares the exact label sets of one
//! request through a waypoint and one connection through ambient L4 with
//! Istio's reference ("Istio Standard Metrics", Labels).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use skiff_e2e::*;

const WAIT: Duration = Duration::from_secs(60);

/// Istio's standard request labels (istio.io, "Istio Standard Metrics",
/// Labels): every one on `istio_requests_total`,
/// `istio_request_duration_milliseconds`, `istio_request_bytes`,
/// `istio_response_bytes`. Prometheus stores no empty label, so
/// `grpc_response_status` (empty for a request that is not gRPC, as
/// Istio's proxies leave it) shows on gRPC requests only.
const ISTIO_REQUEST_LABELS: &[&str] = &[
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];

/// Istio's TCP metrics carry the same labels less the two a byte stream
/// has none of: `response_code` and `grpc_response_status`.
fn istio_tcp_labels() -> BTreeSet<&'static str> {
    ISTIO_REQUEST_LABELS.iter().copied().filter(|l| !matches!(*l, "response_code" | "grpc_response_status")).collect()
}

/// Labels Prometheus adds to every series it scrapes.
const SCRAPE_LABELS: &[&str] = &["__name__", "job", "instance"];

/// Debian's prometheus, or None (skipped; a failure under CI).
fn prometheus_bin() -> Option<PathBuf> {
    let found = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"].iter().map(PathBuf::from).find(|p| p.exists());
    if found.is_none() {
        let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0");
        assert!(!ci, "Debian's prometheus is not installed: run `cargo xtask setup` (as root)");
        eprintln!("SKIPPED: Debian's prometheus is not installed (run `cargo xtask setup` as root)");
    }
    found
}

/// A Prometheus server in the mesh's fabric netns, on 127.0.0.1:9090
/// there; stopped and its data removed however the test ends.
struct Prometheus {
    child: Child,
    netns: String,
    dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(mesh: &LocalMesh, bin: &Path, jobs: &[(&str, Vec<String>)]) -> Prometheus {
        let (netns, _) = mesh.observer().expect("an observer address on the fabric");
        let dir = tempfile::Builder::new().prefix("skiff-prometheus-").tempdir().unwrap();
        let mut config = String::from("global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\nscrape_configs:\n");
        for (job, targets) in jobs {
            let list: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
            config.push_str(&format!("- job_name: {job}\n  static_configs: [{{targets: [{}]}}]\n", list.join(", ")));
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, &config).unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{netns}"))
            .arg("--")
            .arg(bin)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .args(["--web.listen-address=127.0.0.1:9090", "--log.level=warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting prometheus");
        Prometheus { child, netns, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// GET on Prometheus' HTTP API: its `data`.
    fn api(&self, mesh: &LocalMesh, path: &str) -> Value {
        let (status, body) = mesh.netns_http_get(&self.netns, 9090, path).unwrap_or_else(|e| panic!("prometheus {path}: {e:#}\n{}", self.log()));
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("prometheus {path}: {e}: {body}"));
        assert_eq!((status, v["status"].as_str()), (200, Some("success")), "{path}: {body}");
        v["data"].clone()
    }

    /// An instant query's result vector.
    fn query(&self, mesh: &LocalMesh, q: &str) -> Vec<Value> {
        let data = self.api(mesh, &format!("/api/v1/query?query={}", encode(q)));
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// The label sets of the series matching `selector`.
    fn series(&self, mesh: &LocalMesh, selector: &str) -> Vec<BTreeMap<String, String>> {
        let data = self.api(mesh, &format!("/api/v1/series?match%5B%5D={}", encode(selector)));
        data.as_array().unwrap().iter().map(|s| serde_json::from_value(s.clone()).unwrap()).collect()
    }
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn value(sample: &Value) -> f64 {
    sample["value"][1].as_str().unwrap().parse().unwrap()
}

fn metric<'a>(sample: &'a Value, label: &str) -> &'a str {
    sample["metric"][label].as_str().unwrap_or("")
}

/// `count` requests from the client pod; their status codes.
fn load(mesh: &LocalMesh, url: &str, count: usize) -> Value {
    let n = count.to_string();
    let out = mesh.exec(mesh.pod("shop", "client"), &["skiff-demo-app", "http-load", "--url", url, "--count", &n], Duration::from_secs(120)).unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert!(v.get("error").is_none(), "load failed: {v}");
    v["codes"].clone()
}

fn grpc_call(mesh: &LocalMesh) -> Value {
    let out = mesh
        .exec(mesh.pod("shop", "client"), &["skiff-grpc-probe", "client", "--url", "http://grpc-echo:9090/skiff.Echo/Say", "--message", "hi"], Duration::from_secs(30))
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Every PromQL expression of the Grafana dashboards in
/// deploy/monitoring/dashboards, by dashboard and panel title.
fn dashboard_queries() -> Vec<(String, String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("deploy/monitoring/dashboards");
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for f in files {
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let title = d["title"].as_str().unwrap().to_owned();
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                out.push((title.clone(), p["title"].as_str().unwrap().to_owned(), t["expr"].as_str().unwrap().to_owned()));
            }
        }
    }
    out
}

/// A dashboard expression as Grafana sends it with every variable on
/// "All" (its `allValue` `.*`) and a rate interval of a minute.
fn as_grafana_sends(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m").replace("$namespace", ".*").replace("$workload", ".*")
}

#[test]
fn dashboards_are_valid_grafana_json_with_promql_targets() {
    let queries = dashboard_queries();
    let titles: BTreeSet<&str> = queries.iter().map(|(d, _, _)| d.as_str()).collect();
    for want in ["Skiff / Mesh overview", "Skiff / Workload", "Skiff / ztunnel and waypoint resources", "Skiff / Node capture"] {
        assert!(titles.contains(want), "no dashboard {want:?}: {titles:?}");
    }
    for (d, p, e) in &queries {
        assert!(!e.trim().is_empty(), "{d} / {p}: an empty query");
        assert_eq!(e.matches('(').count(), e.matches(')').count(), "{d} / {p}: unbalanced parentheses in {e}");
    }
}

#[test]
fn prometheus_scrapes_every_process_and_istios_queries_answer() {
    let Some(bin) = prometheus_bin() else { return };
    // The cluster served from the (fake) Kubernetes API: the mesh's
    // processes and the dashboard below read it as in a cluster.
    let Some(mesh) = mesh_with("manifests/observability", |o| o.kube_api = true) else { return };
    for (pod, port) in [("reviews-v1", 8080), ("reviews-v2", 8080), ("broken", 8080), ("grpc-echo", 50051), ("tcp-echo", 9000)] {
        wait_listening_on(mesh.pod("shop", pod), port);
    }
    let node_ips: Vec<String> = mesh.nodes.iter().map(|n| n.ip.to_string()).collect();
    let pod_target = |ns: &str, name: &str| mesh.pods_of(ns, name).iter().map(|p| format!("{}:15020", p.ip)).collect::<Vec<_>>();
    let jobs = [
        ("ztunnel", node_ips.iter().map(|ip| format!("{ip}:15020")).collect()),
        ("skiff-node-agent", node_ips.iter().map(|ip| format!("{ip}:15022")).collect()),
        ("waypoint", pod_target("shop", "waypoint")),
        ("ingress-gateway", pod_target("istio-system", "istio-ingressgateway")),
    ];
    let expected_targets: usize = jobs.iter().map(|(_, t)| t.len()).sum();
    assert_eq!(expected_targets, 6, "two ztunnels, two node-agents, the waypoint and the gateway: {jobs:?}");
    let prom = Prometheus::start(&mesh, &bin, &jobs);
    eventually(WAIT, "prometheus ready", || mesh.netns_http_get(&prom.netns, 9090, "/-/ready").ok().filter(|(s, _)| *s == 200).map(|_| ()));
    // Every process scraped.
    eventually(WAIT, "every target up", || {
        let up = prom.query(&mesh, "up == 1");
        (up.len() == expected_targets).then_some(())
    });
    // Traffic in two rounds a few scrapes apart, so every counter grows
    // while Prometheus watches (rate() needs two samples of a series).
    let reviews_pod_v2 = mesh.pod("shop", "reviews-v2").ip;
    for round in 0..2 {
        eventually(WAIT, "requests through the waypoint", || {
            let codes = load(&mesh, "http://reviews:9080/", 20);
            (codes["200"].as_u64() == Some(20)).then_some(())
        });
        let broken = load(&mesh, "http://broken/", 5);
        assert_eq!(broken["503"].as_u64(), Some(5), "{broken}");
        let g = grpc_call(&mesh);
        assert_eq!(g["grpc_status"], "0", "{g}");
        // A TCP Service behind the waypoint.
        let r = eventually(WAIT, "TCP through the waypoint", || Some(client(&mesh, mesh.pod("shop", "client"), "tcp-echo.shop:9000", "hello-tcp")).filter(|r| r.ok));
        assert!(r.reply.contains("hello-tcp"), "{r:?}");
        // Ambient L4 only: to a pod address (no waypoint), across nodes.
        let direct = load(&mesh, &format!("http://{reviews_pod_v2}:8080/"), 10);
        assert_eq!(direct["200"].as_u64(), Some(10), "{direct}");
        if round == 0 {
            std::thread::sleep(Duration::from_secs(4));
        }
    }
    std::thread::sleep(Duration::from_secs(4));

    // Kiali's graph (versioned app graph): request rates between
    // workloads by canonical service and revision, waypoint-reported.
    let graph = prom.query(
        &mesh,
        "sum(rate(istio_requests_total{reporter=~\"waypoint|destination\",source_workload_namespace=\"shop\"}[1m])) by (source_workload_namespace,source_workload,source_canonical_service,source_canonical_revision,destination_service_namespace,destination_service_name,destination_workload,destination_canonical_service,destination_canonical_revision,request_protocol,response_code,grpc_response_status,response_flags) > 0",
    );
    let edge = |dst: &str| graph.iter().find(|s| metric(s, "source_workload") == "client" && metric(s, "destination_workload") == dst && metric(s, "response_code") == "200");
    let v1 = edge("reviews-v1").unwrap_or_else(|| panic!("no client → reviews-v1 edge: {graph:?}"));
    assert_eq!((metric(v1, "destination_canonical_service"), metric(v1, "destination_canonical_revision")), ("reviews", "1.0"), "{v1}");
    assert_eq!((metric(v1, "source_canonical_service"), metric(v1, "source_canonical_revision")), ("client", "v1"), "{v1}");
    let v2 = edge("reviews-v2").unwrap_or_else(|| panic!("no client → reviews-v2 edge: {graph:?}"));
    assert_eq!((metric(v2, "destination_canonical_service"), metric(v2, "destination_canonical_revision")), ("reviews-canon", "r2"), "{v2}");
    let grpc = edge("grpc-echo").unwrap_or_else(|| panic!("no client → grpc-echo edge: {graph:?}"));
    assert_eq!((metric(grpc, "request_protocol"), metric(grpc, "grpc_response_status")), ("grpc", "0"), "{grpc}");

    // Istio's workload dashboard: incoming requests by source and version.
    let by_version = prom.query(
        &mesh,
        "round(sum(rate(istio_requests_total{reporter=~\"waypoint|destination\",destination_service_name=\"reviews\"}[1m])) by (source_workload, source_workload_namespace, destination_version, response_code), 0.001)",
    );
    let versions: BTreeSet<&str> = by_version.iter().filter(|s| metric(s, "source_workload") == "client" && value(s) > 0.0).map(|s| metric(s, "destination_version")).collect();
    assert_eq!(versions, BTreeSet::from(["v1", "v2"]), "{by_version:?}");

    // Error rate by service (Istio's service dashboard, Kiali's health):
    // every request to `broken` failed, none to `reviews`.
    let errors = |svc: &str| {
        let q = format!(
            "sum(rate(istio_requests_total{{reporter=\"waypoint\",destination_service_name=\"{svc}\",response_code=~\"5..\"}}[1m])) / sum(rate(istio_requests_total{{reporter=\"waypoint\",destination_service_name=\"{svc}\"}}[1m]))"
        );
        prom.query(&mesh, &q)
    };
    let broken = errors("broken");
    assert_eq!(broken.len(), 1, "{broken:?}");
    assert_eq!(value(&broken[0]), 1.0, "{broken:?}");
    let reviews = prom.query(&mesh, "sum(rate(istio_requests_total{reporter=\"waypoint\",destination_service_name=\"reviews\",response_code=~\"5..\"}[1m]))");
    assert!(reviews.iter().all(|s| value(s) == 0.0), "reviews failed nothing: {reviews:?}");

    // p99 latency from the histogram (Istio's dashboards): a real number
    // of milliseconds, under the test's own bound on a request.
    let p99 = prom.query(&mesh, "histogram_quantile(0.99, sum(rate(istio_request_duration_milliseconds_bucket{reporter=\"waypoint\",destination_service_name=\"reviews\"}[1m])) by (le))");
    assert_eq!(p99.len(), 1, "{p99:?}");
    let ms = value(&p99[0]);
    assert!(ms > 0.0 && ms <= 10_000.0, "p99 {ms} ms");

    // TCP bytes by connection_security_policy (Istio's TCP panels): the
    // ambient L4 connections were mutual TLS between ztunnels.
    let tcp = prom.query(&mesh, "sum(rate(istio_tcp_sent_bytes_total{reporter=\"destination\"}[1m])) by (connection_security_policy)");
    let mtls = tcp.iter().find(|s| metric(s, "connection_security_policy") == "mutual_tls").unwrap_or_else(|| panic!("{tcp:?}"));
    assert!(value(mtls) > 0.0, "{tcp:?}");
    let received = prom.query(&mesh, "sum(rate(istio_tcp_received_bytes_total{reporter=\"destination\",destination_workload=\"reviews-v2\",source_workload=\"client\"}[1m]))");
    assert!(received.first().is_some_and(|s| value(s) > 0.0), "{received:?}");

    // Every query of Skiff's own dashboards returns data.
    let mut empty = Vec::new();
    for (d, p, e) in dashboard_queries() {
        let q = as_grafana_sends(&e);
        if prom.query(&mesh, &q).is_empty() {
            empty.push(format!("{d} / {p}: {q}"));
        }
    }
    assert!(empty.is_empty(), "dashboard queries without data:\n{}", empty.join("\n"));

    // Label parity with Istio's reference. A request through the
    // waypoint: every standard label, and the values Istio would give.
    let strip = |set: &BTreeMap<String, String>| -> BTreeMap<String, String> { set.iter().filter(|(k, _)| !SCRAPE_LABELS.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect() };
    let http = prom.series(&mesh, "istio_requests_total{reporter=\"waypoint\",destination_workload=\"reviews-v1\",response_code=\"200\"}");
    assert_eq!(http.len(), 1, "{http:?}");
    let want: BTreeMap<String, String> = [
        ("reporter", "waypoint"),
        ("source_workload", "client"),
        ("source_workload_namespace", "shop"),
        ("source_principal", "spiffe://cluster.local/ns/shop/sa/client"),
        ("source_app", "client"),
        ("source_version", "v1"),
        ("source_canonical_service", "client"),
        ("source_canonical_revision", "v1"),
        ("source_cluster", "Kubernetes"),
        ("destination_workload", "reviews-v1"),
        ("destination_workload_namespace", "shop"),
        ("destination_principal", "spiffe://cluster.local/ns/shop/sa/reviews"),
        ("destination_app", "reviews"),
        ("destination_version", "v1"),
        ("destination_service", "reviews.shop.svc.cluster.local"),
        ("destination_service_name", "reviews"),
        ("destination_service_namespace", "shop"),
        ("destination_canonical_service", "reviews"),
        ("destination_canonical_revision", "1.0"),
        ("destination_cluster", "Kubernetes"),
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("response_flags", "-"),
        ("connection_security_policy", "mutual_tls"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(strip(&http[0]), want, "the waypoint's labels of one HTTP request");
    let names = |set: &BTreeMap<String, String>| -> BTreeSet<String> { strip(set).into_keys().collect() };
    let request_labels: BTreeSet<String> = ISTIO_REQUEST_LABELS.iter().map(|s| s.to_string()).collect();
    let grpc = prom.series(&mesh, "istio_requests_total{reporter=\"waypoint\",destination_service_name=\"grpc-echo\"}");
    assert!(!grpc.is_empty());
    for s in &grpc {
        assert_eq!(names(s), request_labels, "a gRPC request has every label of Istio's table: {s:?}");
    }
    for h in ["istio_request_duration_milliseconds_count", "istio_request_bytes_count", "istio_response_bytes_count"] {
        let s = prom.series(&mesh, &format!("{h}{{reporter=\"waypoint\",destination_service_name=\"grpc-echo\"}}"));
        assert!(s.iter().all(|s| names(s) == request_labels), "{h}: {s:?}");
    }
    // A connection through ambient L4, as each ztunnel reports it.
    let tcp_labels: BTreeSet<String> = istio_tcp_labels().into_iter().map(str::to_owned).collect();
    for (reporter, metric) in [
        ("source", "istio_tcp_connections_opened_total"),
        ("destination", "istio_tcp_connections_opened_total"),
        ("destination", "istio_tcp_connections_closed_total"),
        ("destination", "istio_tcp_sent_bytes_total"),
        ("source", "istio_tcp_received_bytes_total"),
    ] {
        let s = prom.series(&mesh, &format!("{metric}{{reporter=\"{reporter}\",source_workload=\"client\",destination_workload=\"reviews-v2\"}}"));
        assert!(!s.is_empty(), "{metric} reporter={reporter}: no series");
        for set in &s {
            assert_eq!(names(set), tcp_labels, "{metric} reporter={reporter}: {set:?}");
            assert_eq!(set["connection_security_policy"], "mutual_tls", "{set:?}");
            assert_eq!((set["destination_canonical_service"].as_str(), set["destination_canonical_revision"].as_str()), ("reviews-canon", "r2"), "{set:?}");
            assert_eq!((set["source_cluster"].as_str(), set["destination_cluster"].as_str(), set["request_protocol"].as_str()), ("Kubernetes", "Kubernetes", "tcp"));
        }
    }
    // A TCP stream through the waypoint: the same TCP labels, reported by
    // the waypoint.
    let at_waypoint = prom.series(&mesh, "istio_tcp_connections_opened_total{reporter=\"waypoint\",destination_service_name=\"tcp-echo\"}");
    assert_eq!(at_waypoint.len(), 1, "{at_waypoint:?}");
    let s = &at_waypoint[0];
    assert_eq!(names(s), tcp_labels, "{s:?}");
    assert_eq!(
        (s["source_workload"].as_str(), s["destination_workload"].as_str(), s["connection_security_policy"].as_str(), s["response_flags"].as_str()),
        ("client", "tcp-echo", "mutual_tls", "-"),
        "{s:?}"
    );
    let bytes = prom.query(&mesh, "sum(istio_tcp_received_bytes_total{reporter=\"waypoint\",destination_service_name=\"tcp-echo\"})");
    assert!(bytes.first().is_some_and(|b| value(b) >= 2.0 * "hello-tcp".len() as f64), "{bytes:?}");

    // skiff dashboard as for a cluster: the series from this Prometheus
    // server, the objects from the Kubernetes API (run where both listen,
    // in the fabric netns); no local mesh files.
    let kube_url = mesh.kube_api().unwrap().url();
    let (_dash, port) = skiff_dashboard(Some(&prom.netns), &["--prometheus", "http://127.0.0.1:9090", "--kube-url", &kube_url]);
    let graph = eventually(WAIT, "the dashboard's graph from Prometheus", || {
        let (status, body) = mesh.netns_http_get(&prom.netns, port, "/api/graph").ok()?;
        let g: Value = serde_json::from_str(&body).ok()?;
        (status == 200 && g["edges"].as_array().is_some_and(|e| e.iter().any(|e| e["protocol"] == "http"))).then_some(g)
    });
    let edges = graph["edges"].as_array().unwrap();
    let edge = |protocol: &str, target: &str| edges.iter().any(|e| e["protocol"] == protocol && e["target"].as_str().unwrap_or("").starts_with(target) && e["mtls"] == true);
    assert!(edge("http", "shop/reviews/1.0"), "requests through the waypoint: {graph:#}");
    assert!(edge("tcp", "shop/reviews-canon/r2"), "ambient L4 to a pod: {graph:#}");
    assert!(edge("tcp", "shop/tcp-echo/"), "a TCP stream through the waypoint: {graph:#}");
    assert!(edges.iter().any(|e| e["protocol"] == "http" && e["error_rate"].as_f64() == Some(1.0)), "the always-failing Service: {graph:#}");
    assert!(graph["warnings"].as_array().unwrap().iter().all(|w| w["kind"] != "scrape"), "{graph:#}");
    // An edge's explanation, from the API's objects.
    let id = edges.iter().find(|e| e["protocol"] == "http" && e["target"].as_str().unwrap_or("").starts_with("shop/reviews/")).unwrap()["id"].as_str().unwrap().to_owned();
    let (_, body) = mesh.netns_http_get(&prom.netns, port, &format!("/api/explain?edge={}", encode(&id))).unwrap();
    let x: Value = serde_json::from_str(&body).unwrap();
    assert!(x["explanation"]["steps"].as_array().is_some_and(|s| s.iter().any(|s| s["step"] == "waypoint")), "{x:#}");

    // Each TCP stream through the waypoint has its access line (and so an
    // event for `skiff observe`): who, to which pod, bytes, the policy
    // decision; a stream the waypoint's policy refuses has one too, with
    // UAEX and the policy and rule, and is counted.
    let wp = mesh.pod("shop", "waypoint");
    let stream_line = |flags: &str| {
        let flags = format!("response_flags={flags}");
        eventually(WAIT, "the waypoint's stream access line", || {
            std::fs::read_to_string(&wp.log).ok()?.lines().find(|l| l.contains("stream complete") && l.contains("dst.service=tcp-echo.shop.svc.cluster.local") && l.contains(&flags)).map(str::to_owned)
        })
    };
    let line = stream_line("-");
    assert!(line.contains("src.workload=client") && line.contains("dst.workload=tcp-echo") && line.contains("bytes_received=9") && line.contains("policy=-"), "{line}");
    mesh.apply(
        "deny-tcp-echo",
        Some("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-tcp-echo, namespace: shop}\nspec:\n  targetRefs: [{kind: Service, group: \"\", name: tcp-echo}]\n  action: DENY\n  rules: [{from: [{source: {namespaces: [shop]}}]}]\n"),
    )
    .unwrap();
    eventually(WAIT, "the stream refused by the waypoint", || Some(client(&mesh, mesh.pod("shop", "client"), "tcp-echo.shop:9000", "refused")).filter(|r| !r.reply.contains("refused")));
    let line = stream_line("UAEX");
    assert!(line.contains("src.workload=client") && line.contains("policy=deny (shop/no-tcp-echo rule 0: DENY policy matched)"), "{line}");
    let (_, metrics) = mesh.netns_http_get(&wp.netns, 15020, "/metrics").unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("istio_tcp_connections_opened_total{") && l.contains("reporter=\"waypoint\"") && l.contains("response_flags=\"UAEX\"") && l.contains("destination_service_name=\"tcp-echo\"")),
        "the refusal is counted"
    );
}
