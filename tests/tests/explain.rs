//! `skiff explain` against a running local mesh (issue 16, item 4): for
//! each case it must give the decision the data path gives, and name the
//! object and rule that made it. Every case is also sent for real, so an
//! explanation that drifts from what the mesh does fails here.

use std::{process::Command, time::Duration};

use skiff_e2e::*;

const WAIT: Duration = Duration::from_secs(20);

/// `skiff explain --mesh <this run> ARGS`.
fn skiff_explain(mesh: &LocalMesh, args: &[&str]) -> std::process::Output {
    Command::new(bin_dir().join("skiff")).arg("explain").arg("--mesh").arg(&mesh.work_dir).args(args).output().unwrap()
}

/// `skiff explain --mesh <this run> ARGS -o json`.
fn explain(mesh: &LocalMesh, args: &[&str]) -> serde_json::Value {
    let mut with_json = args.to_vec();
    with_json.extend(["-o", "json"]);
    let out = skiff_explain(mesh, &with_json);
    assert!(out.status.success(), "skiff explain {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `skiff observe` running, its event lines as they come.
struct Observe {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Observe {
    /// Starts it and waits until it watches both nodes' ztunnels and the
    /// waypoint.
    fn start(mesh: &LocalMesh, args: &[&str]) -> Observe {
        let mut cmd = Command::new(bin_dir().join("skiff"));
        cmd.args(["observe", "--mesh"]).arg(&mesh.work_dir).args(args);
        Observe::spawn(cmd)
    }

    /// Starts `cmd` (a `skiff observe`) and waits as [`Observe::start`].
    fn spawn(mut cmd: Command) -> Observe {
        use std::io::BufRead as _;
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        for out in [Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>, Box::new(child.stderr.take().unwrap())] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send(l).is_err() {
                        return;
                    }
                }
            });
        }
        let o = Observe { child, lines };
        let mut watching = Vec::new();
        while watching.len() < 3 {
            let l = o.lines.recv_timeout(WAIT).expect("skiff observe subscribes");
            for what in ["ztunnel node-1", "ztunnel node-2", "waypoint shop/waypoint"] {
                if l == format!("# watching {what}") {
                    watching.push(what);
                }
            }
        }
        o
    }

    /// The next event line (status lines skipped) within `within`.
    fn next(&mut self, within: Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + within;
        loop {
            let l = self.lines.recv_timeout(deadline.checked_duration_since(std::time::Instant::now())?).ok()?;
            if !l.starts_with('#') {
                return Some(l);
            }
        }
    }
}

impl Drop for Observe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The step named `step` whose `by` (or decision) contains `what`.
fn has_step(e: &serde_json::Value, step: &str, what: &str) -> bool {
    e["steps"].as_array().unwrap().iter().any(|s| {
        s["step"] == step && (s["by"].as_str().is_some_and(|b| b.contains(what)) || s["decision"].as_str().is_some_and(|d| d.contains(what)))
    })
}

fn outcome(e: &serde_json::Value) -> &str {
    e["outcome"].as_str().unwrap()
}

/// HTTP status codes of `count` requests from shop/client.
fn codes(mesh: &LocalMesh, url: &str, headers: &[&str], count: usize) -> serde_json::Value {
    let count = count.to_string();
    let mut argv = vec!["skiff-demo-app", "http-load", "--url", url, "--count", &count];
    for h in headers {
        argv.extend(["--header", h]);
    }
    let out = mesh.exec(mesh.pod("shop", "client"), &argv, Duration::from_secs(120)).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    v
}

#[test]
fn explain_names_the_decision_and_the_rule_the_data_path_applies() {
    let Some(mut mesh) = mesh("manifests/explain") else { return };
    for (ns, p) in [("shop", "reviews-v1"), ("shop", "reviews-v2"), ("secure", "db")] {
        wait_listening(mesh.pod(ns, p));
    }
    let wp = mesh.pod("shop", "waypoint");
    eventually(WAIT, "waypoint serving", || std::fs::read_to_string(&wp.log).ok().filter(|l| l.contains("waypoint serving")).map(|_| ()));

    // A weighted route: 90/10 between the subsets, by the VirtualService's
    // third route.
    let e = explain(&mesh, &["--from", "shop/client", "--to", "http://reviews:9080/api/x"]);
    assert_eq!(outcome(&e), "allowed", "{e:#}");
    assert!(has_step(&e, "source", "captured: Namespace shop label istio.io/dataplane-mode=ambient"), "{e:#}");
    assert!(has_step(&e, "waypoint", "Namespace shop label istio.io/use-waypoint"), "{e:#}");
    assert!(has_step(&e, "route", "VirtualService shop/reviews http[2]"), "{e:#}");
    assert!(has_step(&e, "route", "uri prefix \"/api\""), "{e:#}");
    assert!(has_step(&e, "destinations", "reviews subset v1 90%, reviews subset v2 10%"), "{e:#}");
    assert!(has_step(&e, "endpoints", "DestinationRule shop/reviews"), "{e:#}");
    assert!(has_step(&e, "retries", "Istio's default: up to 2 retries"), "{e:#}");
    let split = codes(&mesh, "http://reviews:9080/api/x", &[], 40);
    assert_eq!(split["codes"]["200"], 40, "{split}");
    let v2 = split["versions"]["v2"].as_u64().unwrap_or(0);
    assert!(v2 < 15, "about 10% to v2: {split}");
    // The client's ztunnel sent those to the waypoint: the destination is
    // the Service's namespace (the waypoint picks the pod).
    let to_shop = [("reporter", "source"), ("source_workload", "client"), ("destination_service_name", "reviews"), ("destination_workload_namespace", "shop")];
    eventually(WAIT, "the client's connections to the waypoint counted", || (mesh.metric(0, "istio_tcp_connections_opened_total", &to_shop).unwrap() > 0.0).then_some(()));

    // A header route: end-user jason goes to v2 only.
    let e = explain(&mesh, &["--from", "shop/client", "--to", "http://reviews:9080/api/x", "-H", "end-user: jason"]);
    assert_eq!(outcome(&e), "allowed", "{e:#}");
    assert!(has_step(&e, "route", "VirtualService shop/reviews http[0]"), "{e:#}");
    assert!(has_step(&e, "route", "header end-user exact \"jason\""), "{e:#}");
    assert!(has_step(&e, "endpoints", "reviews-v2") && !has_step(&e, "endpoints", "reviews-v1"), "{e:#}");
    let jason = codes(&mesh, "http://reviews:9080/api/x", &["end-user: jason"], 10);
    assert_eq!(jason["versions"]["v2"], 10, "{jason}");

    // A fault: every /fault request is aborted with 418.
    let e = explain(&mesh, &["--from", "shop/client", "--to", "http://reviews:9080/fault"]);
    assert_eq!(outcome(&e), "refused", "{e:#}");
    assert!(has_step(&e, "route", "VirtualService shop/reviews http[1]"), "{e:#}");
    assert!(has_step(&e, "fault", "abort with HTTP 418 for 100% of requests"), "{e:#}");
    assert_eq!(codes(&mesh, "http://reviews:9080/fault", &[], 3)["codes"]["418"], 3);

    // No route matches: 404 from the waypoint.
    let e = explain(&mesh, &["--from", "shop/client", "--to", "http://reviews:9080/nowhere"]);
    assert_eq!(outcome(&e), "refused", "{e:#}");
    assert!(has_step(&e, "route", "no route of the VirtualService matches") && has_step(&e, "route", "VirtualService shop/reviews"), "{e:#}");
    assert_eq!(codes(&mesh, "http://reviews:9080/nowhere", &[], 2)["codes"]["404"], 2);

    // A waypoint's own hop: HBONE as the waypoint, policy at the pod.
    let e = explain(&mesh, &["--from", "shop/waypoint", "--to", "shop/reviews-v1:8080"]);
    assert_eq!(outcome(&e), "allowed", "{e:#}");
    assert!(has_step(&e, "endpoint", "spiffe://cluster.local/ns/shop/sa/waypoint → spiffe://cluster.local/ns/shop/sa/reviews"), "{e:#}");

    // L4, allowed: shop/client → secure/db, by allow-shop's first rule.
    let e = explain(&mesh, &["--from", "shop/client", "--to", "db.secure:5432"]);
    assert_eq!(outcome(&e), "allowed", "{e:#}");
    assert!(has_step(&e, "L4 policy", "AuthorizationPolicy secure/allow-shop rules[0]"), "{e:#}");
    assert!(has_step(&e, "endpoint", "HBONE (mTLS) to secure/db"), "{e:#}");
    let r = client(&mesh, mesh.pod("shop", "client"), "db.secure:5432", "from-client");
    assert!(r.ok && r.reply.ends_with("from-client"), "{r:?}");

    // L4, denied: shop/other by deny-other's second rule.
    let e = explain(&mesh, &["--from", "shop/other", "--to", "db.secure:5432"]);
    assert_eq!(outcome(&e), "denied", "{e:#}");
    assert!(has_step(&e, "L4 policy", "AuthorizationPolicy secure/deny-other rules[1]"), "{e:#}");
    let r = client(&mesh, mesh.pod("shop", "other"), "db.secure:5432", "from-other");
    assert!(!r.ok || r.reply.is_empty(), "the data path must deny it too: {r:?}");

    // --why-denied, from the refusal's own access-log line (db is on
    // node-2): the same decision, the same rule.
    let line = eventually(WAIT, "the refusal's access-log line", || {
        std::fs::read_to_string(&mesh.nodes[1].ztunnel_log)
            .ok()?
            .lines()
            .find(|l| l.contains("connection complete") && l.contains("direction=\"inbound\"") && l.contains("src.workload=other") && l.contains("UAEX"))
            .map(str::to_owned)
    });
    assert!(line.contains("secure/deny-other rule 1"), "the log line names the rule: {line}");
    let e = explain(&mesh, &["--why-denied", &line]);
    assert_eq!(outcome(&e), "denied", "{line}\n{e:#}");
    assert!(has_step(&e, "source", "pod shop/other"), "{e:#}");
    assert!(has_step(&e, "L4 policy", "AuthorizationPolicy secure/deny-other rules[1]"), "{e:#}");
    // And from the waypoint's line for a request no route took.
    let line = std::fs::read_to_string(&mesh.pod("shop", "waypoint").log)
        .unwrap()
        .lines()
        .find(|l| l.contains("request complete") && l.contains("path=/nowhere"))
        .map(str::to_owned)
        .expect("the waypoint logged the 404");
    let e = explain(&mesh, &["--why-denied", &line]);
    assert_eq!(outcome(&e), "refused", "{line}\n{e:#}");
    assert!(has_step(&e, "route", "no route of the VirtualService matches"), "{e:#}");

    // skiff observe: the denial shows within a second of it happening.
    let mut observe = Observe::start(&mesh, &["--verdict", "deny", "--protocol", "tcp", "-o", "json"]);
    let r = client(&mesh, mesh.pod("shop", "other"), "db.secure:5432", "watched");
    let denied_at = std::time::Instant::now();
    assert!(!r.ok || r.reply.is_empty(), "{r:?}");
    let line = observe.next(Duration::from_secs(1)).expect("the denial within a second");
    let took = denied_at.elapsed();
    let e: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!((e["proxy"].as_str(), e["src.workload"].as_str()), (Some("ztunnel node-2"), Some("other")), "{e}");
    assert!(e["policy"].as_str().unwrap().contains("secure/deny-other rule 1"), "{e}");
    eprintln!("observe: the denial arrived {took:?} after the client saw it");
    drop(observe);
    // The same, as text.
    let mut observe = Observe::start(&mesh, &["--verdict", "deny", "--pod", "other"]);
    client(&mesh, mesh.pod("shop", "other"), "db.secure:5432", "watched");
    let line = observe.next(Duration::from_secs(1)).expect("the denial within a second");
    assert!(line.contains("[ztunnel node-2] DENY tcp shop/other -> secure/db 10.244.2.12:5432 flags=UAEX policy=deny (secure/deny-other rule 1"), "{line}");
    eprintln!("observe: {line}");
    drop(observe);
    // Requests at the waypoint, as text.
    let mut observe = Observe::start(&mesh, &["--protocol", "http", "--namespace", "shop"]);
    assert_eq!(codes(&mesh, "http://reviews:9080/api/x", &["end-user: jason"], 1)["codes"]["200"], 1);
    let line = observe.next(Duration::from_secs(2)).expect("the request");
    assert!(line.contains("[waypoint shop/waypoint] ALLOW http shop/client -> shop/reviews-v2") && line.contains("GET /api/x 200") && line.contains("route=shop/reviews http[0]"), "{line}");
    eprintln!("observe: {line}");
    drop(observe);

    // STRICT refuses plaintext from a pod outside the mesh.
    let e = explain(&mesh, &["--from", "legacy/client", "--to", "db.secure:5432"]);
    assert_eq!(outcome(&e), "denied", "{e:#}");
    assert!(has_step(&e, "source", "not captured: namespace not labelled"), "{e:#}");
    assert!(has_step(&e, "mtls", "PeerAuthentication secure/strict (namespace-wide)"), "{e:#}");
    let r = client(&mesh, mesh.pod("legacy", "client"), "db.secure:5432", "from-legacy");
    assert!(!r.ok || r.reply.is_empty(), "the data path must refuse it too: {r:?}");

    // Egress: an address outside the registry, under REGISTRY_ONLY.
    let outside = format!("{}:80", skiff_localmesh::mesh::OUTSIDE_HOSTS[1].0);
    let e = explain(&mesh, &["--from", "shop/client", "--to", &outside]);
    assert_eq!(outcome(&e), "denied", "{e:#}");
    assert!(has_step(&e, "outbound", "ConfigMap istio-system/istio mesh.outboundTrafficPolicy.mode"), "{e:#}");
    let before = metric_all(&mesh, "skiff_ztunnel_egress_refused_total", &[]);
    let r = client(&mesh, mesh.pod("shop", "client"), &outside, "out");
    assert!(!r.ok || r.reply.is_empty(), "{r:?}");
    eventually(WAIT, "the refusal counted", || (metric_all(&mesh, "skiff_ztunnel_egress_refused_total", &[]) > before).then_some(()));

    // Text output: numbered steps, the rule under each, a verdict.
    let out = skiff_explain(&mesh, &["--from", "shop/other", "--to", "db.secure:5432"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l.contains("by AuthorizationPolicy secure/deny-other rules[1]")), "{text}");
    assert!(text.lines().last().is_some_and(|l| l.starts_with("verdict: DENIED")), "{text}");
    // A pod that does not exist: exit 2, naming it and the pods there are.
    let out = skiff_explain(&mesh, &["--from", "shop/nope", "--to", "db.secure:5432"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("shop/nope: no such pod") && err.contains("client"), "{err}");

    // skiff config: what each ztunnel holds, by pod name.
    let work = mesh.work_dir.clone();
    let config = |what: &str, out: &str| Command::new(bin_dir().join("skiff")).args(["config", what, "-o", out, "--mesh"]).arg(&work).output().unwrap();
    let out = config("workloads", "table");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let row = |text: &str, node: &str, ns: &str, pod: &str| text.lines().any(|l| l.split_whitespace().take(3).collect::<Vec<_>>() == [node, ns, pod]);
    for (node, ns, pod) in [("node-1", "shop", "client"), ("node-1", "shop", "other"), ("node-1", "shop", "reviews-v1"), ("node-2", "shop", "reviews-v2"), ("node-2", "secure", "db")] {
        assert!(row(&text, node, ns, pod), "{node} {ns}/{pod} enrolled:\n{text}");
    }
    assert!(!text.contains("legacy") && !text.lines().any(|l| l.contains(" waypoint ")), "neither the plain pod nor the waypoint is enrolled:\n{text}");
    assert!(text.contains("spiffe://cluster.local/ns/secure/sa/db"), "{text}");
    let v: serde_json::Value = serde_json::from_slice(&config("policies", "json").stdout).unwrap();
    let names: Vec<&str> = v["nodes"][0]["authorization_policies"].as_array().unwrap().iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(names, ["secure/allow-shop", "secure/deny-other"], "{v:#}");
    let certs = String::from_utf8_lossy(&config("certs", "yaml").stdout).into_owned();
    assert!(certs.contains("identity: spiffe://cluster.local/ns/shop/sa/client"), "{certs}");
    // ... and what each waypoint holds: its Services and their routes.
    let out = config("services", "table");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("waypoint shop/waypoint") && l.contains("reviews.shop.svc.cluster.local") && l.contains("9080/http") && l.contains("shop/reviews")),
        "{text}"
    );
    let out = config("routes", "table");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l.contains("shop/reviews http[2] \"split\"") && l.contains("reviews subset v1 90%, reviews subset v2 10%")), "{text}");
    assert!(text.lines().any(|l| l.contains("http[0] \"jason\"") && l.contains("reviews subset v2 100%")), "{text}");

    // The log filter still changes at run time (it now filters the log
    // output only; events are published whatever it says).
    let log = |i: usize| std::fs::read_to_string(&mesh.nodes[i].ztunnel_log).unwrap();
    assert!(!log(0).contains(" DEBUG "), "info by default");
    let (code, body) = mesh.node_http_get(0, 15000, "/logging?level=debug").unwrap();
    assert_eq!(code, 200, "{body}");
    let r = client(&mesh, mesh.pod("shop", "client"), "db.secure:5432", "after-debug");
    assert!(r.ok, "{r:?}");
    eventually(WAIT, "debug lines after /logging?level=debug", || log(0).contains(" DEBUG ").then_some(()));

    // A node whose ztunnel is down: named, exit 1.
    mesh.stop_ztunnel(1);
    let out = config("workloads", "table");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.lines().any(|l| l.starts_with("node-2: ztunnel not reachable")), "{text}");
    assert!(row(&text, "node-1", "shop", "client") && !row(&text, "node-2", "secure", "db"), "the other node still answers:\n{text}");
}

/// `skiff explain --kube-url`: the cluster read from the Kubernetes API
/// (the local mesh's fake API server, in the fabric netns where it
/// listens), through the same source the mesh's processes use; the same
/// decisions as from the local mesh's files. And `check`, `config` and
/// `observe --kube-url`: each node's node-agent and ztunnel (the
/// skiff-node pods) and the waypoint reached through the API server's pod
/// port-forward, over WebSocket, as `kubectl port-forward` reaches them.
#[test]
fn explain_check_config_observe_through_the_kubernetes_api() {
    let Some(mut mesh) = mesh_with("manifests/explain", |o| o.kube_api = true) else { return };
    let url = mesh.kube_api().expect("kube mode").url();
    let (fabric, _) = mesh.observer().unwrap();
    let explain = |args: &[&str]| -> serde_json::Value {
        let out = Command::new("ip")
            .args(["netns", "exec", &fabric])
            .arg(bin_dir().join("skiff"))
            .args(["explain", "--kube-url", &url, "-o", "json"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let e = explain(&["--from", "shop/other", "--to", "db.secure:5432"]);
    assert_eq!(outcome(&e), "denied", "{e:#}");
    assert!(has_step(&e, "L4 policy", "AuthorizationPolicy secure/deny-other rules[1]"), "{e:#}");
    let e = explain(&["--from", "shop/client", "--to", "http://reviews:9080/api/x"]);
    assert_eq!(outcome(&e), "allowed", "{e:#}");
    assert!(has_step(&e, "route", "VirtualService shop/reviews http[2]"), "{e:#}");
    // The mesh config (REGISTRY_ONLY) comes from the API too.
    let outside = format!("{}:80", skiff_localmesh::mesh::OUTSIDE_HOSTS[1].0);
    let e = explain(&["--from", "shop/client", "--to", &outside]);
    assert_eq!(outcome(&e), "denied", "{e:#}");

    // check, config and observe through the API server.
    let skiff = |args: &[&str]| -> (Option<i32>, String) {
        let out = Command::new("ip").args(["netns", "exec", &fabric]).arg(bin_dir().join("skiff")).args(args).args(["--kube-url", &url]).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let (code, text) = eventually(WAIT, "a healthy check through the API", || {
        let (code, text) = skiff(&["check"]);
        (code == Some(0)).then_some((code, text))
    });
    assert_eq!(code, Some(0), "{text}");
    for node in ["node-1", "node-2"] {
        for what in ["node-agent", "ztunnel", "enrolled pods", "certificates"] {
            assert!(text.lines().any(|l| l.starts_with(&format!("OK   {node} {what}: "))), "no OK for {node} {what}:\n{text}");
        }
    }
    eprintln!("skiff check --kube-url:\n{text}");
    let (code, text) = skiff(&["config", "workloads", "-o", "json"]);
    assert_eq!(code, Some(0), "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let enrolled: Vec<String> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|n| n["workloads"].as_array().unwrap().iter().map(|w| format!("{}/{}", w["namespace"].as_str().unwrap(), w["name"].as_str().unwrap())))
        .collect();
    for pod in ["shop/client", "shop/other", "secure/db"] {
        assert!(enrolled.iter().any(|e| e == pod), "{pod} not listed: {enrolled:?}");
    }
    let (code, text) = skiff(&["config", "routes"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("waypoint shop/waypoint") && text.contains("shop/reviews"), "{text}");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &fabric]).arg(bin_dir().join("skiff")).args(["observe", "--kube-url", &url, "--verdict", "deny", "--pod", "other"]);
    let mut observe = Observe::spawn(cmd);
    client(&mesh, mesh.pod("shop", "other"), "db.secure:5432", "watched");
    let line = observe.next(Duration::from_secs(2)).expect("the denial, through the API server");
    assert!(line.contains("[ztunnel node-2] DENY tcp shop/other -> secure/db 10.244.2.12:5432 flags=UAEX policy=deny (secure/deny-other rule 1"), "{line}");
    drop(observe);
    // The dashboard for a cluster without Prometheus: the proxies'
    // metrics by port-forward too. The denial above is an edge.
    let (dash, port) = skiff_dashboard(Some(&fabric), &["--kube-url", &url]);
    let graph = eventually(WAIT, "the dashboard's graph, scraped by port-forward", || {
        let (status, body) = mesh.netns_http_get(&fabric, port, "/api/graph").ok()?;
        let g: serde_json::Value = serde_json::from_str(&body).ok()?;
        (status == 200 && g["edges"].as_array().is_some_and(|e| e.iter().any(|e| e["source"] == "shop/other/latest" && e["target"].as_str().is_some_and(|t| t.starts_with("secure/db/"))))).then_some(g)
    });
    assert!(graph["warnings"].as_array().unwrap().iter().all(|w| w["kind"] != "scrape"), "every proxy scraped: {graph:#}");
    drop(dash);
    let forwards = mesh.kube_api().unwrap().requests().into_iter().filter(|r| r.verb == "create" && r.resource == "pods/portforward").count();
    assert!(forwards > 0, "the proxies were reached by pod port-forward");
    // The fake checks no credentials, so its port-forward is not served to
    // pods, which reach it over the network (from one outside the mesh:
    // this mesh's egress policy is REGISTRY_ONLY).
    let from_pod = mesh
        .exec(mesh.pod("legacy", "client"), &["skiff-demo-app", "http-get", &format!("{url}/api/v1/namespaces/skiff-system/pods/skiff-node-node-1/portforward?ports=15000")], Duration::from_secs(10))
        .unwrap();
    assert!(!from_pod.status.success() && String::from_utf8_lossy(&from_pod.stderr).contains("HTTP 403"), "{}{}", String::from_utf8_lossy(&from_pod.stdout), String::from_utf8_lossy(&from_pod.stderr));
    // A node whose ztunnel stopped: the port-forward's error (nothing
    // listens) comes back as the reason, naming the node.
    mesh.stop_ztunnel(1);
    let (code, text) = skiff(&["check"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.lines().any(|l| l.starts_with("FAIL node-2 ztunnel: not ready: ") && l.contains("127.0.0.1:15021 in pod skiff-system/skiff-node-node-2: port-forward: error forwarding port 15021 to pod: Connection refused")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("OK   node-1 ztunnel: ready")), "the other node is still OK:\n{text}");
    eprintln!("skiff check --kube-url, node-2's ztunnel stopped:\n{text}");
}
