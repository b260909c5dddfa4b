//! `--log-format json` (issue 15, item 4): with it (or
//! `SKIFF_LOG_FORMAT=json`) every Skiff process writes one JSON object per
//! line — node-agent, ztunnel (its access log with Istio ztunnel's field
//! names), a waypoint and the ingress gateway in the local mesh, and the
//! signer run on its own.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use skiff_e2e::*;

const WAIT: Duration = Duration::from_secs(20);

/// Every line of `path` as JSON, each with `time`, `level` and
/// `message`; panics naming the first line that is not.
fn json_lines(what: &str, path: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{what}: {}: {e}", path.display()));
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{what}: not a JSON line ({e}): {l}"));
            assert!(v["time"].is_string() && v["level"].is_string() && v["message"].is_string(), "{what}: {l}");
            v
        })
        .collect();
    assert!(!lines.is_empty(), "{what}: nothing logged");
    lines
}

#[test]
fn every_mesh_process_logs_json_lines_when_asked() {
    let Some(mesh) = mesh_with("manifests/l7", |o| o.log_format = Some("json".into())) else { return };
    let wp = mesh.pod("shop", "waypoint");
    eventually(WAIT, "waypoint serving", || std::fs::read_to_string(&wp.log).ok().filter(|l| l.contains("waypoint serving")).map(|_| ()));
    wait_listening(mesh.pod("shop", "reviews-v1"));
    // A request through the waypoint, so ztunnel writes access lines.
    let out = mesh.exec(mesh.pod("shop", "client"), &["skiff-demo-app", "http-load", "--url", "http://reviews:9080/json-logs", "--count", "2"], WAIT).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(v["codes"]["200"], 2, "{v}");
    let gw = mesh.pod("istio-system", "istio-ingressgateway");
    eventually(WAIT, "gateway serving", || std::fs::read_to_string(&gw.log).ok().filter(|l| l.contains("gateway serving")).map(|_| ()));
    json_lines("waypoint", &wp.log);
    json_lines("gateway", &gw.log);
    let node = mesh.node_index(mesh.pod("shop", "client"));
    let access = eventually(WAIT, "an access line", || {
        json_lines("ztunnel", &mesh.nodes[node].ztunnel_log).into_iter().find(|l| l["target"] == "access" && l["direction"] == "outbound")
    });
    for field in ["src.addr", "src.workload", "src.namespace", "src.identity", "dst.addr", "dst.service", "dst.workload", "dst.identity", "bytes_sent", "bytes_received", "duration_ms"] {
        assert!(!access[field].is_null(), "the access line has {field}: {access}");
    }
    assert_eq!(access["src.identity"], "spiffe://cluster.local/ns/shop/sa/client", "{access}");
    assert!(access["bytes_sent"].is_u64(), "numbers stay numbers: {access}");
    for (i, n) in mesh.nodes.iter().enumerate() {
        json_lines(&format!("ztunnel {i}"), &n.ztunnel_log);
        json_lines(&format!("node-agent {i}"), &n.agent_log);
    }
}

/// The signer, started on its own (a fresh root, the fake API server), in
/// JSON: every line until it says it serves.
#[test]
fn the_signer_logs_json_lines_when_asked() {
    let fake = skiff_kube_fake::FakeApiServer::start().unwrap();
    // Removed however the test ends.
    let tmp = tempfile::Builder::new().prefix("skiff-signer-log-").tempdir().unwrap();
    let (key, cert) = (tmp.path().join("ca-key.pem"), tmp.path().join("ca-cert.pem"));
    skiff_hbone::identity::Ca::generate("cluster.local").unwrap().write_files(&key, &cert).unwrap();
    let mut child = Command::new(bin_dir().join("skiff-signer"))
        .args(["--log-format", "json", "--listen", "127.0.0.1:0", "--kube-url", &fake.url()])
        .arg("--root-key")
        .arg(&key)
        .arg("--root-cert")
        .arg(&cert)
        .env("SKIFF_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Every line until it says it serves, each JSON.
    let deadline = std::time::Instant::now() + WAIT;
    let mut seen = Vec::new();
    let serving = loop {
        let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) else { break None };
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(v["time"].is_string() && v["level"].is_string() && v["message"].is_string(), "{line}");
        seen.push(line);
        if v["message"] == "signer serving" {
            break Some(v);
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let v = serving.unwrap_or_else(|| panic!("the signer did not say it serves; it logged: {seen:?}"));
    assert_eq!(v["level"], "info");
    assert!(v["listen"].as_str().is_some_and(|l| l.starts_with("127.0.0.1:")), "{v}");
}
