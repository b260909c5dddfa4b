//! End-to-end tests of the ingress gateway (issue 12), in the local mesh
//! with its default gateway (`istio-system/istio-ingressgateway`, a
//! `LoadBalancer` Service on 80 and 443), with Istio YAML as users write
//! it. Traffic: client (outside the mesh) → gateway (Gateway server,
//! VirtualService bound to it) → HBONE with the gateway's identity → the
//! backend pod's ztunnel → app.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddrV4, TcpStream},
    sync::Arc,
    time::Duration,
};

use skiff_e2e::*;

const WAIT: Duration = Duration::from_secs(20);
const GATEWAY_URL: &str = "http://istio-ingressgateway.istio-system";
const GATEWAY_PRINCIPAL: &str = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway";

struct Load {
    codes: serde_json::Value,
    versions: serde_json::Value,
    bodies: Vec<String>,
    headers: Vec<Vec<String>>,
}

/// `count` GETs from `pod` (namespace/name) to `url`, one connection.
fn load_from(mesh: &LocalMesh, pod: (&str, &str), url: &str, count: usize, headers: &[&str]) -> Load {
    let count = count.to_string();
    let mut argv = vec!["skiff-demo-app", "http-load", "--url", url, "--count", &count];
    for h in headers {
        argv.push("--header");
        argv.push(h);
    }
    let out = mesh.exec(mesh.pod(pod.0, pod.1), &argv, Duration::from_secs(300)).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {} {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)));
    Load {
        codes: v["codes"].clone(),
        versions: v["versions"].clone(),
        bodies: v["bodies"].as_array().map(|b| b.iter().map(|b| b.as_str().unwrap_or_default().to_owned()).collect()).unwrap_or_default(),
        headers: serde_json::from_value(v["headers"].clone()).unwrap_or_default(),
    }
}

/// From the client outside the mesh, through the gateway's Service.
fn load(mesh: &LocalMesh, path: &str, count: usize, headers: &[&str]) -> Load {
    load_from(mesh, ("outside", "client"), &format!("{GATEWAY_URL}{path}"), count, headers)
}

fn count(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

/// The mesh, once its backends listen and its gateway serves.
fn up() -> Option<LocalMesh> {
    let mesh = mesh("manifests/gateway")?;
    for p in ["reviews-v1", "reviews-v2"] {
        wait_listening(mesh.pod("shop", p));
    }
    // Ready: its certificate is in and every port its Gateways ask for is
    // open (Istio's gateways' readiness path).
    let gw = mesh.pod("istio-system", "istio-ingressgateway");
    eventually(WAIT, "gateway ready", || (mesh.pod_http_get(gw, 15021, "/healthz/ready").ok()?.0 == 200).then_some(()));
    Some(mesh)
}

/// A Gateway in `shop` on port 80 for `hosts`, selecting the default
/// ingress gateway, as Istio's examples write it.
fn gateway(name: &str, hosts: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  selector: {{istio: ingressgateway}}\n  servers:\n  - port: {{number: 80, name: http, protocol: HTTP}}\n    hosts: {hosts}\n"
    )
}

/// Applies `yaml` and waits until `probe` sees it in force.
fn apply(mesh: &LocalMesh, name: &str, yaml: &str, probe: impl Fn(&LocalMesh) -> bool) {
    mesh.apply(name, Some(yaml)).unwrap();
    eventually(WAIT, &format!("{name} in force"), || probe(mesh).then_some(()));
}

/// Done-when 1: a Gateway on port 80 and a VirtualService bound to it with
/// a `uri.prefix` match, a `rewrite.uri` and a 90/10 split between two
/// DestinationRule subsets.
#[test]
fn http_through_the_gateway_rewrites_and_splits_ninety_ten() {
    let Some(mesh) = up() else { return };
    let vs = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews-edge, namespace: shop}
spec:
  hosts: ["*"]
  gateways: [shop-gateway]
  http:
  - match: [{uri: {prefix: /api/}}]
    rewrite: {uri: /v1/}
    route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v2}, weight: 10}
"#;
    let yaml = format!("{}---\n{vs}", gateway("shop-gateway", "[\"*\"]"));
    apply(&mesh, "edge", &yaml, |m| count(&load(m, "/api/items", 3, &[]).codes, "200") == 3);
    let one = load(&mesh, "/api/items?id=7", 1, &[]);
    assert!(one.bodies[0].contains("path=/v1/items?id=7"), "the backend sees the rewritten path: {:?}", one.bodies);
    let n = 2000;
    let l = load(&mesh, "/api/items", n, &[]);
    assert_eq!(count(&l.codes, "200"), n as u64, "{:?}", l.codes);
    let v2 = count(&l.versions, "v2") as f64 / n as f64;
    // Each request goes to v2 with p = 0.1, independently: the share has
    // sd = sqrt(0.1 * 0.9 / 2000) ≈ 0.0067; ±4 sd ([0.073, 0.127]) fails a
    // correct implementation about once in 16 000 runs.
    assert!((0.073..=0.127).contains(&v2), "v2 share {v2} outside [0.073, 0.127]: {:?}", l.versions);
    assert_eq!(count(&l.versions, "v1") + count(&l.versions, "v2"), n as u64);
    // A path the VirtualService has no route for: Istio's no-route answer.
    let none = load(&mesh, "/other", 1, &[]);
    assert_eq!(count(&none.codes, "404"), 1, "{:?}", none.codes);
    // The gateway reports its requests as their source (Istio's gateways
    // do), under its own workload and identity.
    let (_, metrics) = mesh.pod_http_get(mesh.pod("istio-system", "istio-ingressgateway"), 15020, "/metrics").unwrap();
    let labels = [("reporter", "source"), ("source_workload", "istio-ingressgateway"), ("source_principal", GATEWAY_PRINCIPAL), ("destination_service_name", "reviews")];
    let ok = skiff_localmesh::mesh::sum_metric(&metrics, "istio_requests_total", &[labels[0], labels[1], labels[2], labels[3], ("response_code", "200")]);
    assert!(ok >= n as f64, "istio_requests_total at the gateway: {ok}\n{metrics}");
}

/// Done-when 2: `User-Agent` regex routes at the gateway (one to v1, one to
/// v2); an agent matching neither gets Istio's no-route answer (404, NR).
/// And a server with `httpsRedirect` answers 301 to https.
#[test]
fn user_agent_routes_no_route_answer_and_https_redirect() {
    let Some(mesh) = up() else { return };
    let gw = r#"apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: shop-gateway, namespace: shop}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [shop.example.com]
  - port: {number: 80, name: http-secure, protocol: HTTP}
    hosts: [secure.example.com]
    tls: {httpsRedirect: true}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews-agents, namespace: shop}
spec:
  hosts: [shop.example.com]
  gateways: [shop/shop-gateway]
  http:
  - name: mobile
    match: [{headers: {user-agent: {regex: ".*Mobile.*"}}}]
    route: [{destination: {host: reviews.shop.svc.cluster.local, subset: v2}}]
  - name: desktop
    match: [{headers: {user-agent: {regex: ".*(X11|Windows).*"}}}]
    route: [{destination: {host: reviews, subset: v1}}]
"#;
    let host = "Host: shop.example.com";
    apply(&mesh, "edge", gw, |m| count(&load(m, "/", 2, &[host, "User-Agent: Foo Mobile"]).versions, "v2") == 2);
    let mobile = load(&mesh, "/", 20, &[host, "User-Agent: Mozilla/5.0 (iPhone) Mobile Safari"]);
    assert_eq!(count(&mobile.versions, "v2"), 20, "{:?}", mobile.versions);
    let desktop = load(&mesh, "/", 20, &[host, "User-Agent: Mozilla/5.0 (X11; Linux)"]);
    assert_eq!(count(&desktop.versions, "v1"), 20, "{:?}", desktop.versions);
    let neither = load(&mesh, "/", 3, &[host, "User-Agent: curl/8.5"]);
    assert_eq!(count(&neither.codes, "404"), 3, "{:?}", neither.codes);
    assert!(neither.headers[0].iter().any(|h| h == "x-skiff-response-flags: NR"), "{:?}", neither.headers);
    // A host no server of the Gateway takes: 404 too.
    let other = load(&mesh, "/", 1, &["Host: other.example.com", "User-Agent: Mobile"]);
    assert_eq!(count(&other.codes, "404"), 1, "{:?}", other.codes);
    // httpsRedirect: 301 to https://, the Host as sent, the path kept.
    let r = load(&mesh, "/login?next=/cart", 1, &["Host: secure.example.com"]);
    assert_eq!(count(&r.codes, "301"), 1, "{:?}", r.codes);
    assert!(r.headers[0].iter().any(|h| h == "location: https://secure.example.com/login?next=/cart"), "{:?}", r.headers);
}

/// Done-when 5: the gateway to backend hop is mutual TLS: the backend's
/// namespace is STRICT and requests succeed, the backend's ztunnel counts
/// them under the gateway's principal, and an AuthorizationPolicy that
/// allows only the gateway's identity admits gateway traffic and refuses a
/// direct call from a pod of the mesh.
#[test]
fn the_gateway_hop_is_mutual_tls_with_the_gateways_identity() {
    let Some(mesh) = up() else { return };
    let yaml = format!(
        "{}---\n{}",
        gateway("shop-gateway", "[\"*\"]"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews-edge, namespace: shop}\nspec:\n  hosts: [\"*\"]\n  gateways: [shop-gateway]\n  http: [{route: [{destination: {host: reviews, subset: v1}}]}]\n"
    );
    apply(&mesh, "edge", &yaml, |m| count(&load(m, "/", 2, &[]).codes, "200") == 2);
    let strict = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n";
    apply_policy(&mesh, 0, "strict", Some(strict));
    let l = load(&mesh, "/", 10, &[]);
    assert_eq!(count(&l.codes, "200"), 10, "STRICT backend, through the gateway: {:?}", l.codes);
    // reviews-v1 runs on node-1: its ztunnel saw the gateway's principal.
    let seen = mesh.metric(0, "istio_tcp_connections_opened_total", &[("reporter", "destination"), ("source_principal", GATEWAY_PRINCIPAL)]).unwrap();
    assert!(seen >= 1.0, "the backend's ztunnel names the gateway's principal ({seen})");
    let only_gateway = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: only-gateway, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: reviews}}}}\n  action: ALLOW\n  rules: [{{from: [{{source: {{principals: [\"{}\"]}}}}]}}]\n",
        GATEWAY_PRINCIPAL.trim_start_matches("spiffe://")
    );
    let direct = || load_from(&mesh, ("shop", "shop-client"), "http://reviews:9080/", 1, &[]);
    assert_eq!(count(&direct().codes, "200"), 1, "a direct call before the policy");
    apply_policy(&mesh, 0, "only-gateway", Some(&only_gateway));
    let l = load(&mesh, "/", 10, &[]);
    assert_eq!(count(&l.codes, "200"), 10, "the gateway's identity is allowed: {:?}", l.codes);
    let refused = direct();
    assert_eq!(count(&refused.codes, "200"), 0, "a direct call from another identity is refused: {:?}", refused.codes);
}

/// Done-when 7: from the host, the gateway's `LoadBalancer` address
/// answers, and it is the Service's `status.loadBalancer.ingress`.
#[test]
fn the_gateways_load_balancer_address_answers_from_the_host() {
    let Some(mesh) = up() else { return };
    let ip = mesh.load_balancer_ip("istio-system", "istio-ingressgateway").expect("a LoadBalancer address");
    let state = std::fs::read_to_string(mesh.state_dir.join("services.yaml")).unwrap();
    let docs = skiff_core::k8s::documents_as_json(&state).unwrap();
    let svc = docs.iter().find(|d| d["metadata"]["name"] == "istio-ingressgateway").expect("the gateway's Service");
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    assert_eq!(svc["status"]["loadBalancer"]["ingress"][0]["ip"], ip.to_string(), "status.loadBalancer in the cluster state: {state}");
    let yaml = format!(
        "{}---\n{}",
        gateway("shop-gateway", "[\"*\"]"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews-edge, namespace: shop}\nspec:\n  hosts: [\"*\"]\n  gateways: [shop-gateway]\n  http: [{route: [{destination: {host: reviews, subset: v2}}]}]\n"
    );
    mesh.apply("edge", Some(&yaml)).unwrap();
    let body = eventually(WAIT, "the gateway answering on its LoadBalancer address", || {
        let mut s = TcpStream::connect_timeout(&SocketAddrV4::new(ip, 80).into(), Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET /from-host HTTP/1.1\r\nHost: shop.example.com\r\nConnection: close\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.starts_with("HTTP/1.1 200").then_some(out)
    });
    assert!(body.contains("version=v2") && body.contains("path=/from-host"), "{body}");
}

// ---------------------------------------------------------------------
// HTTPS (Done-when 3 and 4): certificates from Secrets, chosen by SNI.

/// A self-signed certificate for `names` (PEM certificate, PEM key, DER).
fn self_signed(names: &[&str]) -> (String, String, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem(), cert.der().to_vec())
}

/// A CA, and a certificate it signs for `names` (client certificates).
struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

impl TestCa {
    fn new() -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
        params.distinguished_name.push(rcgen::DnType::CommonName, "test client CA");
        let pem = params.self_signed(&key).unwrap().pem();
        TestCa { issuer: rcgen::Issuer::new(params, key), pem }
    }

    fn sign(&self, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        (params.signed_by(&key, &self.issuer).unwrap().pem(), key.serialize_pem())
    }
}

/// A Secret in istio-system with `pairs` as `stringData`.
fn secret(name: &str, kind: &str, pairs: &[(&str, &str)]) -> String {
    let mut y = format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: istio-system}}\ntype: {kind}\nstringData:\n");
    for (k, v) in pairs {
        y.push_str(&format!("  {k}: |\n"));
        for line in v.lines() {
            y.push_str(&format!("    {line}\n"));
        }
    }
    y
}

/// A TLS client trusting exactly `root_der` (the server's self-signed
/// certificate, or its CA), offering `versions`, with a client
/// certificate when given.
fn tls_client(root_der: &[u8], versions: &[&'static rustls::SupportedProtocolVersion], client: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(root_der.to_vec())).unwrap();
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match client {
        Some((cert, key)) => {
            use rustls::pki_types::pem::PemObject as _;
            let chain = rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
            b.with_client_auth_cert(chain, rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap()).unwrap()
        }
        None => b.with_no_client_auth(),
    };
    Arc::new(cfg)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection to the gateway's LoadBalancer address, port 443, with
/// `sni`: Err when the handshake fails.
fn tls_connect(mesh: &LocalMesh, sni: &str, cfg: Arc<rustls::ClientConfig>) -> Result<Tls, String> {
    let ip = mesh.load_balancer_ip("istio-system", "istio-ingressgateway").unwrap();
    let tcp = TcpStream::connect_timeout(&SocketAddrV4::new(ip, 443).into(), Duration::from_secs(2)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let conn = rustls::ClientConnection::new(cfg, sni.to_owned().try_into().unwrap()).map_err(|e| e.to_string())?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).map_err(|e| e.to_string())?;
    }
    Ok(s)
}

/// One response on a kept-alive connection: status and body.
fn read_response(s: &mut impl std::io::Read) -> Result<(u16, String), String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            Ok(_) => return Err("closed before the response".into()),
            Err(e) => return Err(e.to_string()),
        }
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let len: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
        .ok_or_else(|| format!("no content-length: {head}"))?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).map_err(|e| e.to_string())?;
    Ok((status, String::from_utf8_lossy(&body).to_string()))
}

fn https_get(s: &mut Tls, host: &str, path: &str) -> Result<(u16, String), String> {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes()).map_err(|e| e.to_string())?;
    s.flush().map_err(|e| e.to_string())?;
    read_response(s)
}

/// A ClientHello that offers TLS 1.1 and nothing newer (no
/// supported_versions extension), with SNI `host`; whether the server
/// answered with a ServerHello.
fn server_hello_for_tls11(mesh: &LocalMesh, host: &str) -> bool {
    let ip = mesh.load_balancer_ip("istio-system", "istio-ingressgateway").unwrap();
    let mut tcp = TcpStream::connect_timeout(&SocketAddrV4::new(ip, 443).into(), Duration::from_secs(2)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let name = host.as_bytes();
    let mut sni = vec![0x00, 0x00]; // extension: server_name
    let list_len = name.len() + 3;
    sni.extend_from_slice(&((list_len + 2) as u16).to_be_bytes());
    sni.extend_from_slice(&(list_len as u16).to_be_bytes());
    sni.push(0);
    sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni.extend_from_slice(name);
    let mut body = vec![0x03, 0x02]; // client_version TLS 1.1
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // no session id
    body.extend_from_slice(&[0x00, 0x04, 0xc0, 0x13, 0x00, 0x2f]); // ECDHE-RSA-AES128-SHA, AES128-SHA
    body.extend_from_slice(&[0x01, 0x00]); // compression: null
    body.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    body.extend_from_slice(&sni);
    let mut hs = vec![0x01];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    record.extend_from_slice(&hs);
    tcp.write_all(&record).unwrap();
    let mut head = [0u8; 6];
    match tcp.read_exact(&mut head) {
        // A handshake record whose first message is a ServerHello (2).
        Ok(()) => head[0] == 0x16 && head[5] == 0x02,
        Err(_) => false,
    }
}

fn https_gateway(servers: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: shop-gateway, namespace: shop}}\nspec:\n  selector: {{istio: ingressgateway}}\n  servers:\n{servers}")
}

const VS_AB: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews-edge, namespace: shop}\nspec:\n  hosts: [a.example.com, b.example.com, m.example.com]\n  gateways: [shop-gateway]\n  http: [{route: [{destination: {host: reviews, subset: v1}}]}]\n";

/// Done-when 3: `tls.mode: SIMPLE` with `credentialName` (self-signed
/// certificates in Secrets, both layouts), `minProtocolVersion: TLSV1_2`;
/// port 80 with `httpsRedirect` answers 301; a client offering only TLS
/// 1.1 is refused; two hosts, two certificates, by SNI; a replaced Secret
/// serves its new certificate to new connections while an open one keeps
/// working.
#[test]
fn https_from_secrets_by_sni_with_versions_redirect_and_rotation() {
    let Some(mesh) = up() else { return };
    let (a_cert, a_key, a_der) = self_signed(&["a.example.com"]);
    let (b_cert, b_key, b_der) = self_signed(&["b.example.com"]);
    let secrets = format!(
        "{}---\n{}",
        secret("a-cert", "kubernetes.io/tls", &[("tls.crt", &a_cert), ("tls.key", &a_key)]),
        secret("b-cert", "Opaque", &[("cert", &b_cert), ("key", &b_key)])
    );
    mesh.apply("secrets", Some(&secrets)).unwrap();
    let servers = "  - port: {number: 443, name: https-a, protocol: HTTPS}\n    hosts: [a.example.com]\n    tls: {mode: SIMPLE, credentialName: a-cert, minProtocolVersion: TLSV1_2}\n\
                   \x20 - port: {number: 443, name: https-b, protocol: HTTPS}\n    hosts: [b.example.com]\n    tls: {mode: SIMPLE, credentialName: b-cert}\n\
                   \x20 - port: {number: 80, name: http, protocol: HTTP}\n    hosts: [a.example.com]\n    tls: {httpsRedirect: true}\n";
    mesh.apply("edge", Some(&format!("{}---\n{VS_AB}", https_gateway(servers)))).unwrap();
    let both = [&rustls::version::TLS12, &rustls::version::TLS13];
    let mut open = eventually(WAIT, "HTTPS for a.example.com", || {
        let mut s = tls_connect(&mesh, "a.example.com", tls_client(&a_der, &both, None)).ok()?;
        matches!(https_get(&mut s, "a.example.com", "/x"), Ok((200, _))).then_some(s)
    });
    // SNI picks the certificate: each client trusts only its host's.
    let mut b = tls_connect(&mesh, "b.example.com", tls_client(&b_der, &both, None)).expect("b.example.com with its own certificate");
    let (code, body) = https_get(&mut b, "b.example.com", "/y").unwrap();
    assert!(code == 200 && body.contains("version=v1") && body.contains("path=/y"), "{code} {body}");
    assert!(tls_connect(&mesh, "b.example.com", tls_client(&a_der, &both, None)).is_err(), "b.example.com is not served with a's certificate");
    // A connection made for b.example.com cannot carry a.example.com's
    // requests (a.example.com's server has its own TLS settings): 421.
    assert_eq!(https_get(&mut b, "a.example.com", "/").unwrap().0, 421);
    // TLS 1.2 is allowed (the minimum), TLS 1.1 is refused.
    let mut v12 = tls_connect(&mesh, "a.example.com", tls_client(&a_der, &[&rustls::version::TLS12], None)).expect("TLS 1.2 client");
    assert_eq!(https_get(&mut v12, "a.example.com", "/").unwrap().0, 200);
    assert!(!server_hello_for_tls11(&mesh, "a.example.com"), "a client offering only TLS 1.1 got a ServerHello");
    // httpsRedirect on port 80.
    let r = load(&mesh, "/login?next=/cart", 1, &["Host: a.example.com"]);
    assert_eq!(count(&r.codes, "301"), 1, "{:?}", r.codes);
    assert!(r.headers[0].iter().any(|h| h == "location: https://a.example.com/login?next=/cart"), "{:?}", r.headers);
    // Rotation: a new certificate in the same Secret.
    let (a2_cert, a2_key, a2_der) = self_signed(&["a.example.com"]);
    let secrets = format!(
        "{}---\n{}",
        secret("a-cert", "kubernetes.io/tls", &[("tls.crt", &a2_cert), ("tls.key", &a2_key)]),
        secret("b-cert", "Opaque", &[("cert", &b_cert), ("key", &b_key)])
    );
    mesh.apply("secrets", Some(&secrets)).unwrap();
    eventually(WAIT, "the new certificate served", || tls_connect(&mesh, "a.example.com", tls_client(&a2_der, &both, None)).ok());
    assert!(tls_connect(&mesh, "a.example.com", tls_client(&a_der, &both, None)).is_err(), "new connections get the new certificate only");
    let (code, _) = https_get(&mut open, "a.example.com", "/still-open").expect("the connection opened before the rotation keeps working");
    assert_eq!(code, 200);
    // A Secret that goes bad disables only its server, loudly.
    let secrets = format!("{}---\n{}", secret("a-cert", "kubernetes.io/tls", &[("tls.crt", "not a certificate"), ("tls.key", &a2_key)]), secret("b-cert", "Opaque", &[("cert", &b_cert), ("key", &b_key)]));
    mesh.apply("secrets", Some(&secrets)).unwrap();
    eventually(WAIT, "a's server disabled", || tls_connect(&mesh, "a.example.com", tls_client(&a2_der, &both, None)).is_err().then_some(()));
    let mut b = tls_connect(&mesh, "b.example.com", tls_client(&b_der, &both, None)).expect("b is unaffected");
    assert_eq!(https_get(&mut b, "b.example.com", "/").unwrap().0, 200);
    let log = std::fs::read_to_string(&mesh.pod("istio-system", "istio-ingressgateway").log).unwrap();
    assert!(log.contains("Gateway server not served") && log.contains("Secret istio-system/a-cert"), "the gateway says which server and why");
}

/// Done-when 4: `MUTUAL` with a client CA: a client without a certificate
/// is refused, one with a certificate the CA signed (and a name the server
/// lists in `subjectAltNames`) is served, another name is refused.
#[test]
fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let Some(mesh) = up() else { return };
    let (m_cert, m_key, m_der) = self_signed(&["m.example.com"]);
    let ca = TestCa::new();
    mesh.apply("secrets", Some(&secret("m-cert", "kubernetes.io/tls", &[("tls.crt", &m_cert), ("tls.key", &m_key), ("ca.crt", &ca.pem)]))).unwrap();
    let servers = "  - port: {number: 443, name: https-m, protocol: HTTPS}\n    hosts: [m.example.com]\n    tls: {mode: MUTUAL, credentialName: m-cert, subjectAltNames: [client.example.com]}\n";
    mesh.apply("edge", Some(&format!("{}---\n{VS_AB}", https_gateway(servers)))).unwrap();
    let both = [&rustls::version::TLS12, &rustls::version::TLS13];
    let (c_cert, c_key) = ca.sign(&["client.example.com"]);
    let mut ok = eventually(WAIT, "MUTUAL server up", || {
        let mut s = tls_connect(&mesh, "m.example.com", tls_client(&m_der, &both, Some((&c_cert, &c_key)))).ok()?;
        matches!(https_get(&mut s, "m.example.com", "/"), Ok((200, _))).then_some(s)
    });
    assert_eq!(https_get(&mut ok, "m.example.com", "/again").unwrap().0, 200);
    // Without a certificate: the handshake (TLS 1.3: the first read) fails.
    let refused = |client: Option<(&str, &str)>| match tls_connect(&mesh, "m.example.com", tls_client(&m_der, &both, client)) {
        Err(_) => true,
        Ok(mut s) => https_get(&mut s, "m.example.com", "/").is_err(),
    };
    assert!(refused(None), "a client without a certificate was served");
    let (o_cert, o_key) = ca.sign(&["other.example.com"]);
    assert!(refused(Some((&o_cert, &o_key))), "a certificate without a listed subjectAltName was served");
    let (self_cert, self_key, _) = self_signed(&["client.example.com"]);
    assert!(refused(Some((&self_cert, &self_key))), "a certificate the CA did not sign was served");
}

/// The same gateway reading the cluster from the Kubernetes API (the fake
/// API server): Gateways and VirtualServices through their watches, its
/// certificate's Secret through a watch of its own namespace's Secrets
/// only, as `deploy/gateway` grants.
#[test]
fn the_gateway_reads_gateways_and_its_secrets_from_the_kubernetes_api() {
    let Some(mesh) = mesh_with("manifests/gateway", |o| o.kube_api = true) else { return };
    wait_listening(mesh.pod("shop", "reviews-v1"));
    let (cert, key, der) = self_signed(&["a.example.com"]);
    let servers = "  - port: {number: 443, name: https-a, protocol: HTTPS}\n    hosts: [a.example.com]\n    tls: {mode: SIMPLE, credentialName: a-cert}\n";
    let yaml = format!(
        "{}---\n{}---\n{VS_AB}",
        secret("a-cert", "kubernetes.io/tls", &[("tls.crt", &cert), ("tls.key", &key)]),
        https_gateway(servers)
    );
    mesh.apply("edge", Some(&yaml)).unwrap();
    let both = [&rustls::version::TLS12, &rustls::version::TLS13];
    eventually(WAIT, "HTTPS through the gateway in kube mode", || {
        let mut s = tls_connect(&mesh, "a.example.com", tls_client(&der, &both, None)).ok()?;
        matches!(https_get(&mut s, "a.example.com", "/"), Ok((200, _))).then_some(())
    });
    let reqs = mesh.kube_api().expect("kube mode").requests();
    let secrets: Vec<_> = reqs.iter().filter(|r| r.resource == "secrets").collect();
    assert!(secrets.iter().any(|r| r.verb == "watch"), "the gateway watches Secrets");
    assert!(secrets.iter().all(|r| r.namespace.as_deref() == Some("istio-system")), "only in its own namespace: {secrets:?}");
    assert!(reqs.iter().any(|r| r.verb == "watch" && r.resource == "gateways"));
}

/// A backend outside the mesh (not enrolled: no ztunnel terminates HBONE
/// for it) is reached over plain TCP, as Istio's gateways reach such pods;
/// before, the gateway answered 503 UF.
#[test]
fn a_backend_outside_the_mesh_is_reached_in_plaintext() {
    let Some(mesh) = up() else { return };
    wait_listening(mesh.pod("outside", "legacy"));
    let yaml = format!(
        "{}---\n{}",
        gateway("shop-gateway", "[\"*\"]"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: legacy-edge, namespace: shop}\nspec:\n  hosts: [\"*\"]\n  gateways: [shop-gateway]\n  http: [{route: [{destination: {host: legacy.outside.svc.cluster.local}}]}]\n"
    );
    apply(&mesh, "edge", &yaml, |m| count(&load(m, "/", 2, &[]).codes, "200") == 2);
    let l = load(&mesh, "/x", 5, &[]);
    assert_eq!(count(&l.versions, "legacy"), 5, "{:?}", l.versions);
}

/// What to build 2, TCP and TLS passthrough servers: a TCP server routes
/// each connection by a VirtualService `tcp` route to an in-mesh echo
/// Service (over HBONE: the backend's ztunnel sees the gateway's
/// principal); a TLS server with `mode: PASSTHROUGH` on 443 routes by the
/// ClientHello's SNI through a `tls` route to the outside host's HTTPS
/// server (a ServiceEntry), never terminating it: the client verifies the
/// outside server's own certificate (the outside CA), and its request gets
/// the outside server's answer. An SNI no server takes is closed.
#[test]
fn tcp_and_tls_passthrough_servers_route_by_port_and_sni() {
    let Some(mesh) = up() else { return };
    wait_listening(mesh.pod("shop", "tcp-echo"));
    let yaml = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: edge, namespace: shop}\nspec:\n  selector: {istio: ingressgateway}\n  servers:\n  - port: {number: 31400, name: tcp, protocol: TCP}\n    hosts: ['*']\n  - port: {number: 443, name: tls, protocol: TLS}\n    hosts: [outside.example.com]\n    tls: {mode: PASSTHROUGH}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: edge-tcp, namespace: shop}\nspec:\n  hosts: ['*']\n  gateways: [edge]\n  tcp: [{match: [{port: 31400}], route: [{destination: {host: tcp-echo, port: {number: 9000}}}]}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: edge-tls, namespace: shop}\nspec:\n  hosts: [outside.example.com]\n  gateways: [edge]\n  tls: [{match: [{port: 443, sniHosts: [outside.example.com]}], route: [{destination: {host: outside.example.com, port: {number: 443}}}]}]\n";
    mesh.apply("edge", Some(yaml)).unwrap();
    // TCP, from a client outside the mesh, through the gateway's Service.
    let r = eventually(WAIT, "TCP through the gateway", || {
        let r = client(&mesh, mesh.pod("outside", "client"), "istio-ingressgateway-tcp.istio-system:31400", "hello-tcp");
        (r.ok && r.reply.contains("hello-tcp")).then_some(r)
    });
    assert!(r.error.is_empty(), "{r:?}");
    let node = mesh.node_index(mesh.pod("shop", "tcp-echo"));
    let seen = mesh.metric(node, "istio_tcp_connections_opened_total", &[("reporter", "destination"), ("source_principal", GATEWAY_PRINCIPAL), ("destination_app", "tcp-echo")]).unwrap();
    assert!(seen >= 1.0, "the echo backend's ztunnel names the gateway's principal ({seen})");
    // The gateway reports the stream itself, with Istio's TCP labels and
    // reporter "source" (as for its requests).
    let gw = mesh.pod("istio-system", "istio-ingressgateway");
    let (_, text) = mesh.pod_http_get(gw, 15020, "/metrics").unwrap();
    let at_gateway = |metric: &str| {
        skiff_localmesh::mesh::sum_metric(
            &text,
            metric,
            &[("reporter", "source"), ("destination_service", "tcp-echo.shop.svc.cluster.local"), ("destination_app", "tcp-echo"), ("request_protocol", "tcp"), ("response_flags", "-")],
        )
    };
    assert!(at_gateway("istio_tcp_connections_opened_total") >= 1.0, "{text}");
    assert!(at_gateway("istio_tcp_received_bytes_total") >= "hello-tcp".len() as f64, "{text}");
    // TLS passed through, from the host, verifying the outside server.
    use rustls::pki_types::pem::PemObject as _;
    let ca = rustls::pki_types::CertificateDer::from_pem_file(mesh.outside_ca()).unwrap();
    let cfg = tls_client(&ca, &[&rustls::version::TLS13, &rustls::version::TLS12], None);
    let mut s = eventually(WAIT, "TLS passed through to the outside host", || tls_connect(&mesh, "outside.example.com", cfg.clone()).ok());
    let (code, body) = https_get(&mut s, "outside.example.com", "/passed-through").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("version=outside") && body.contains("path=/passed-through"), "{body}");
    let outside_log = std::fs::read_to_string(mesh.work_dir.join("logs").join("outside.log")).unwrap();
    assert!(outside_log.lines().any(|l| l.contains(r#""event":"tls""#) && l.contains(r#""path":"/passed-through""#)), "the outside server terminated it:\n{outside_log}");
    // No server takes this name: closed before any handshake.
    assert!(tls_connect(&mesh, "nobody.example.com", cfg).is_err());
}
