//! End-to-end tests of egress (issue 12): ServiceEntry and Istio's
//! outbound traffic policy, in the local mesh, whose outside host stands
//! for the internet (172.18.0.250 outside.example.com, 172.18.0.251
//! other.example.com; no node, no mesh).

use std::time::Duration;

use skiff_e2e::*;

/// `count` GETs from app/client to `url`: the status codes seen (empty
/// when the connection was refused) and the first body.
fn get(mesh: &LocalMesh, url: &str) -> (serde_json::Value, String) {
    let out = mesh.exec(mesh.pod("app", "client"), &["skiff-demo-app", "http-load", "--url", url, "--count", "2"], Duration::from_secs(60)).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    (v["codes"].clone(), v["bodies"][0].as_str().unwrap_or_default().to_owned())
}

fn up(manifests: &str) -> Option<LocalMesh> {
    let mesh = mesh(manifests)?;
    wait_listening(mesh.pod("app", "web"));
    Some(mesh)
}

/// Done-when 6 (first part): with REGISTRY_ONLY (Istio's mesh config, the
/// ConfigMap `istio` in istio-system), an enrolled pod reaches an outside host a ServiceEntry
/// declares and is refused for an undeclared one; the refusal is counted
/// (`BlackHoleCluster`, flag NR, `skiff_ztunnel_egress_refused_total`)
/// and logged with the destination and the reason; Services in the
/// cluster are unaffected; the declared host is named in metrics.
#[test]
fn registry_only_admits_service_entries_and_refuses_the_rest() {
    let Some(mesh) = up("manifests/egress") else { return };
    let (codes, body) = get(&mesh, "http://outside.example.com/");
    assert_eq!(codes["200"], 2, "declared by a ServiceEntry: {codes}");
    assert!(body.contains("version=outside"), "{body}");
    let (codes, _) = get(&mesh, "http://other.example.com/");
    assert!(codes["200"].is_null(), "undeclared: refused under REGISTRY_ONLY: {codes}");
    let (codes, _) = get(&mesh, "http://web/");
    assert_eq!(codes["200"], 2, "a Service of the cluster: {codes}");
    let node = mesh.node_index(mesh.pod("app", "client"));
    let m = |labels: &[(&str, &str)]| mesh.metric(node, "istio_tcp_connections_opened_total", labels).unwrap();
    assert!(m(&[("reporter", "source"), ("destination_service", "outside.example.com")]) >= 2.0, "the ServiceEntry's host names the destination");
    assert!(m(&[("reporter", "source"), ("destination_service", "BlackHoleCluster"), ("response_flags", "NR")]) >= 1.0, "refusals counted");
    assert!(mesh.metric(node, "skiff_ztunnel_egress_refused_total", &[]).unwrap() >= 1.0);
    let log = std::fs::read_to_string(&mesh.nodes[node].ztunnel_log).unwrap();
    let line = log.lines().find(|l| l.contains("172.18.0.251:80") && l.contains("REGISTRY_ONLY")).unwrap_or_else(|| panic!("no refusal logged:\n{}", skiff_localmesh::mesh::tail(&mesh.nodes[node].ztunnel_log, 20)));
    assert!(line.contains("BlackHoleCluster") && line.contains("not a Service, pod or ServiceEntry"), "{line}");
}

/// Done-when 6 (second part): with ALLOW_ANY (Istio's default), both
/// outside hosts are reached; the undeclared one is counted as
/// `PassthroughCluster`.
#[test]
fn allow_any_reaches_declared_and_undeclared_hosts() {
    let Some(mesh) = up("manifests/egress-allow") else { return };
    for url in ["http://outside.example.com/", "http://other.example.com/"] {
        let (codes, body) = get(&mesh, url);
        assert_eq!(codes["200"], 2, "{url}: {codes}");
        assert!(body.contains("version=outside"), "{body}");
    }
    let node = mesh.node_index(mesh.pod("app", "client"));
    let passthrough = mesh.metric(node, "istio_tcp_connections_opened_total", &[("reporter", "source"), ("destination_service", "PassthroughCluster")]).unwrap();
    assert!(passthrough >= 2.0, "an undeclared destination is counted as PassthroughCluster ({passthrough})");
}
