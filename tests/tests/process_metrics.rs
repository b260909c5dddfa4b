//! `/metrics` of the processes that had none (issue 15, item 2):
//! node-agent — its own counters (enrollments, reconciles, refused config)
//! and the kernel's (captured connects and the other capture counters,
//! enrolled pods, map fill) on the readiness port — and the signer
//! (certificates issued, requests refused by reason, time to answer), in
//! the Prometheus text format.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    process::{Command, Stdio},
    time::Duration,
};

use skiff_e2e::*;

/// Every sample line of an exposition as (name with labels, value); each
/// metric named in a sample has its `# TYPE`.
fn samples(text: &str) -> Vec<(String, f64)> {
    let typed: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split_whitespace().next()).collect();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {l}"));
            let name = series.split('{').next().unwrap();
            // A histogram's series are typed under its base name.
            let base = ["_bucket", "_sum", "_count"].iter().find_map(|sfx| name.strip_suffix(sfx).filter(|b| typed.contains(b))).unwrap_or(name);
            assert!(typed.contains(&base), "{name} has no # TYPE:\n{text}");
            (series.to_owned(), value.parse().unwrap_or_else(|e| panic!("{l}: {e}")))
        })
        .collect()
}

#[test]
fn node_agent_exposes_its_own_and_the_kernels_counters() {
    let Some(mesh) = mesh("manifests/l4") else { return };
    wait_listening(mesh.pod("mesh", "server"));
    let server_ip = mesh.pod("mesh", "server").ip;
    // A captured connection from the enrolled client.
    let r = client(&mesh, mesh.pod("mesh", "client"), &format!("{server_ip}:9000"), "marker-metrics");
    assert!(r.ok, "{r:?}");
    let node = mesh.node_index(mesh.pod("mesh", "client"));
    let get = |series: &str| -> f64 {
        let (status, body) = mesh.node_http_get(node, 15022, "/metrics").unwrap();
        assert_eq!(status, 200, "{body}");
        samples(&body).into_iter().find(|(s, _)| s == series).map(|(_, v)| v).unwrap_or_else(|| panic!("no {series} in:\n{body}"))
    };
    eventually(Duration::from_secs(10), "the capture counters", || (get("skiff_node_capture_events_total{event=\"captured_connects\"}") >= 1.0).then_some(()));
    assert_eq!(get("skiff_node_capture_readable"), 1.0);
    assert!(get("skiff_node_enrolled_pods") >= 1.0, "the client is enrolled on its node");
    assert!(get("skiff_node_enrollments_total") >= 1.0);
    assert!(get("skiff_node_reconciles_total") >= 1.0);
    assert_eq!(get("skiff_node_enroll_failures_total"), 0.0);
    assert_eq!(get("skiff_config_rejected_objects"), 0.0);
    assert!(get("skiff_node_capture_map_capacity{map=\"ORIG_BY_TUPLE\"}") > 0.0, "the shared capture map's size");
    // Readiness is still served beside it.
    assert_eq!(mesh.node_http_get(node, 15022, "/healthz/ready").unwrap().0, 200);
}

/// The signer, started on its own (a fresh root, the fake API server): a
/// certificate issued to a ztunnel for a pod on its node, a request with a
/// token the API does not know refused, both counted on `/metrics`.
#[test]
fn the_signer_counts_certificates_issued_and_refused() {
    use skiff_hbone::identity::{Ca, Identity};
    use skiff_kube_fake::{FakeApiServer, TokenIdentity};
    let fake = FakeApiServer::start().unwrap();
    fake.apply(serde_json::json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "app", "uid": "uid-web-1"},
        "spec": {"nodeName": "node-1", "serviceAccountName": "web", "containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIP": "10.244.1.10"}}))
    .unwrap();
    fake.apply(serde_json::json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "ztunnel-a", "namespace": "skiff-system", "uid": "uid-ztunnel-a"},
        "spec": {"nodeName": "node-1", "serviceAccountName": "ztunnel", "containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIP": "10.244.1.2"}}))
    .unwrap();
    fake.add_token("zt", TokenIdentity::service_account("skiff-system", "ztunnel").bound_to_pod("ztunnel-a", "uid-ztunnel-a", "node-1").with_audiences(&["skiff-ca"]));
    // Removed however the test ends.
    let tmp = tempfile::Builder::new().prefix("skiff-signer-metrics-").tempdir().unwrap();
    let (key, cert) = (tmp.path().join("ca-key.pem"), tmp.path().join("ca-cert.pem"));
    let ca = Ca::generate("cluster.local").unwrap();
    ca.write_files(&key, &cert).unwrap();
    for (name, token) in [("zt", "zt"), ("unknown", "not-a-token")] {
        std::fs::write(tmp.path().join(name), token).unwrap();
    }
    let mut child = Command::new(bin_dir().join("skiff-signer"))
        .args(["--log-format", "json", "--listen", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0", "--dns-name", "signer.test", "--kube-url", &fake.url()])
        .arg("--root-key")
        .arg(&key)
        .arg("--root-cert")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed however the test ends.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stderr = child.stderr.take().unwrap();
    let _child = Kill(child);
    // Where it listens, from its "signer serving" line.
    let mut lines = BufReader::new(stderr).lines();
    let serving = loop {
        let line = lines.next().expect("the signer says it serves").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["message"] == "signer serving" {
            break v;
        }
    };
    {
        let (listen, metrics) = (serving["listen"].as_str().unwrap().to_owned(), serving["metrics"].as_str().unwrap().to_owned());
        let client = |token: &str| {
            skiff_hbone::signer_client::SignerClient::new(&format!("https://{listen}"), "signer.test", tmp.path().join(token), &[ca.root()]).unwrap()
        };
        client("zt").issue(&Identity::new("cluster.local", "app", "web"), Duration::from_secs(600)).expect("issued");
        assert!(client("unknown").issue(&Identity::new("cluster.local", "app", "web"), Duration::from_secs(600)).is_err(), "refused");
        let mut tcp = std::net::TcpStream::connect(&metrics).unwrap();
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut text = String::new();
        tcp.read_to_string(&mut text).unwrap();
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        let all = samples(&body);
        let get = |series: &str| all.iter().find(|(s, _)| s == series).map(|(_, v)| *v).unwrap_or_else(|| panic!("no {series} in:\n{body}"));
        assert_eq!(get("skiff_signer_certificates_issued_total"), 1.0);
        assert_eq!(get("skiff_signer_requests_refused_total{reason=\"unauthenticated\"}"), 1.0);
        assert_eq!(get("skiff_signer_request_duration_seconds_count"), 2.0);
    }
}
