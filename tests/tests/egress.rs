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

/// Done-when 6 (third part), What to build 5: egress through a waypoint,
/// as Istio's ambient "Egress gateways" task sets it up — a ServiceEntry in
/// a namespace enrolled to a waypoint, a DestinationRule `tls.mode: SIMPLE`
/// — so a plain-HTTP client reaches an outside HTTPS server: the waypoint
/// originates TLS (SNI the host, the server's certificate checked against
/// the CA the rule names, from a file or a Secret), and an
/// AuthorizationPolicy bound to the ServiceEntry (`targetRefs`) is
/// enforced there. Without a trusted CA, or with names the certificate
/// does not carry, nothing goes through (never open).
#[test]
fn a_waypoint_originates_tls_to_an_outside_host_for_a_plain_http_client() {
    const WAIT: Duration = Duration::from_secs(30);
    let Some(mesh) = mesh("manifests/egress-waypoint") else { return };
    let wp = mesh.pod("egress", "waypoint");
    eventually(WAIT, "waypoint serving", || std::fs::read_to_string(&wp.log).ok().filter(|l| l.contains("waypoint serving")).map(|_| ()));
    let until = |what: &str, path: &str, code: &str| {
        eventually(WAIT, what, || {
            let (codes, body) = get(&mesh, &format!("http://outside.example.com{path}"));
            (codes[code] == 2).then_some(body)
        })
    };
    // No DestinationRule: the waypoint sends plain HTTP to the HTTPS port
    // (targetPort 443), which refuses it.
    until("plain HTTP to the HTTPS port fails", "/plain", "503");
    let rule = |tls: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: outside-tls, namespace: egress}}\nspec:\n  host: outside.example.com\n  trafficPolicy:\n    tls: {tls}\n")
    };
    let ca_file = mesh.outside_ca();
    // SIMPLE with the outside CA from a file.
    mesh.apply("rule", Some(&rule(&format!("{{mode: SIMPLE, caCertificates: {}}}", ca_file.display())))).unwrap();
    let body = until("TLS originated with caCertificates", "/tls", "200");
    assert!(body.contains("version=outside") && body.contains("path=/tls"), "{body}");
    let wp_ip = wp.ip.to_string();
    assert!(body.contains(&format!("saw client {wp_ip} ")), "the outside host sees the waypoint, not the pod: {body}");
    let outside_log = std::fs::read_to_string(mesh.work_dir.join("logs").join("outside.log")).unwrap();
    assert!(
        outside_log.lines().any(|l| l.contains(r#""event":"tls""#) && l.contains(r#""sni":"outside.example.com""#) && l.contains(r#""path":"/tls""#)),
        "the request came over TLS with the host as SNI:\n{outside_log}"
    );
    // The system's roots (no CA named) do not know the outside CA: refused.
    mesh.apply("rule", Some(&rule("{mode: SIMPLE}"))).unwrap();
    until("an untrusted server is refused", "/untrusted", "503");
    let log = std::fs::read_to_string(&wp.log).unwrap();
    assert!(log.contains("TLS origination to the endpoint failed"), "{}", skiff_localmesh::mesh::tail(&wp.log, 20));
    // A name the certificate does not carry: refused.
    mesh.apply("rule", Some(&rule(&format!("{{mode: SIMPLE, caCertificates: {}, subjectAltNames: [nobody.example.com]}}", ca_file.display())))).unwrap();
    until("a certificate without the listed names is refused", "/san", "503");
    // The CA from a Secret in the waypoint's namespace (credentialName).
    let ca = std::fs::read_to_string(&ca_file).unwrap();
    let indented: String = ca.lines().map(|l| format!("    {l}\n")).collect();
    let secret = format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: outside-ca, namespace: egress}}\ntype: Opaque\nstringData:\n  cacert: |\n{indented}");
    mesh.apply("secret", Some(&secret)).unwrap();
    mesh.apply("rule", Some(&rule("{mode: SIMPLE, credentialName: outside-ca}"))).unwrap();
    let body = until("TLS originated with credentialName", "/secret", "200");
    assert!(body.contains("path=/secret"), "{body}");
    // The client's Host is not sent as SNI unless it is one of the
    // destination's names: no fronting another site at a shared endpoint.
    let out = mesh
        .exec(mesh.pod("app", "client"), &["skiff-demo-app", "http-load", "--url", "http://outside.example.com/fronted", "--count", "1", "--header", "Host: elsewhere.example.org"], WAIT)
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(v["codes"]["200"], 1, "{v}");
    let outside_log = std::fs::read_to_string(mesh.work_dir.join("logs").join("outside.log")).unwrap();
    let line = outside_log.lines().find(|l| l.contains(r#""event":"tls""#) && l.contains("/fronted")).expect("the fronted request");
    assert!(line.contains(r#""sni":"outside.example.com""#), "{line}");
    // ISTIO_MUTUAL to a host outside the mesh: refused, never plaintext.
    mesh.apply("rule", Some(&rule("{mode: ISTIO_MUTUAL}"))).unwrap();
    until("ISTIO_MUTUAL outside the mesh is refused", "/mesh-only", "503");
    mesh.apply("rule", Some(&rule("{mode: SIMPLE, credentialName: outside-ca}"))).unwrap();
    until("TLS originated again", "/again", "200");
    // An AuthorizationPolicy bound to the ServiceEntry, at the waypoint.
    let policy = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: outside, namespace: egress}\nspec:\n  targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: outside}]\n  action: ALLOW\n  rules: [{to: [{operation: {methods: [GET], paths: [/allowed]}}]}]\n";
    mesh.apply("policy", Some(policy)).unwrap();
    until("a path the policy does not allow is refused", "/denied", "403");
    until("the allowed path goes through", "/allowed", "200");
    // Metrics name the outside host: the waypoint's requests, the client
    // ztunnel's connection to the waypoint.
    let metrics = mesh.pod_http_get(wp, 15020, "/metrics").unwrap().1;
    assert!(
        metrics.lines().any(|l| l.starts_with("istio_requests_total{") && l.contains(r#"destination_service="outside.example.com""#) && l.contains(r#"response_code="200""#)),
        "{metrics}"
    );
    let node = mesh.node_index(mesh.pod("app", "client"));
    assert!(mesh.metric(node, "istio_tcp_connections_opened_total", &[("reporter", "source"), ("destination_service", "outside.example.com")]).unwrap() >= 2.0);
    // A ServiceEntry without a waypoint is reached directly, as before.
    let (codes, body) = get(&mesh, "http://other.example.com/direct");
    assert_eq!(codes["200"], 2, "{codes}");
    assert!(!body.contains(&format!("saw client {wp_ip} ")), "{body}");
}
