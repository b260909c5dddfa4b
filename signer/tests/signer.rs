//! The signer against the fake API server, asked by ztunnel's own signer
//! client (and CertManager in signer mode) over TLS on loopback.

use std::time::Duration;

use rustls::{
    client::danger::ServerCertVerifier as _,
    pki_types::{ServerName, UnixTime},
};
use serde_json::json;
use skiff_kube_fake::{FakeApiServer, TokenIdentity};
use skiff_signer::{Config, Signer};
use skiff_hbone::{
    certs::CertManager,
    identity::{identity_of, roots, Ca, ExpectedIdentityVerifier, Identity, IdentityError},
    signer_client::{SignerClient, SignerError},
};

const SIGNER_NAME: &str = "skiff-ca.skiff-system.svc";

struct Setup {
    fake: FakeApiServer,
    ca_root: rustls::pki_types::CertificateDer<'static>,
    url: String,
    /// Removed on drop.
    dir: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
}

fn pod(ns: &str, name: &str, node: &str, sa: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}")},
           "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "c"}]},
           "status": {"phase": "Running", "podIP": "10.244.1.10"}})
}

fn setup(tag: &str) -> Setup {
    setup_with(tag, Config::default())
}

fn setup_with(tag: &str, cfg: Config) -> Setup {
    let fake = FakeApiServer::start().unwrap();
    fake.apply(pod("app", "web-1", "node-1", "web")).unwrap();
    fake.apply(pod("app", "db-1", "node-2", "db")).unwrap();
    fake.apply(pod("skiff-system", "ztunnel-old", "node-2", "ztunnel")).unwrap();
    let zt = || TokenIdentity::service_account("skiff-system", "ztunnel");
    fake.add_token("zt-node-1", zt().bound_to_pod("ztunnel-a", "uid-ztunnel-a", "node-1").with_audiences(&["skiff-ca"]));
    fake.add_token("zt-wrong-audience", zt().bound_to_pod("ztunnel-a", "uid-ztunnel-a", "node-1"));
    fake.add_token("web-sa", TokenIdentity::service_account("app", "web").bound_to_pod("web-1", "uid-web-1", "node-1").with_audiences(&["skiff-ca"]));
    // A token that names only its pod (no node-name extra): the node is read from the pod.
    let mut only_pod = zt().with_audiences(&["skiff-ca"]);
    only_pod.extra.insert("authentication.kubernetes.io/pod-name".into(), vec!["ztunnel-old".into()]);
    only_pod.extra.insert("authentication.kubernetes.io/pod-uid".into(), vec!["uid-ztunnel-old".into()]);
    fake.add_token("zt-pod-only", only_pod);
    // A waypoint pod (gateway label) and its own bound token.
    fake.apply(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "waypoint-1", "namespace": "app", "uid": "uid-waypoint-1", "labels": {"gateway.networking.k8s.io/gateway-name": "waypoint"}},
        "spec": {"nodeName": "node-2", "serviceAccountName": "waypoint", "containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIP": "10.244.2.20"}}))
    .unwrap();
    fake.add_token("wp", TokenIdentity::service_account("app", "waypoint").bound_to_pod("waypoint-1", "uid-waypoint-1", "node-2").with_audiences(&["skiff-ca"]));
    fake.add_token("wp-replaced", TokenIdentity::service_account("app", "waypoint").bound_to_pod("waypoint-1", "uid-old", "node-2").with_audiences(&["skiff-ca"]));

    let dir = tempfile::Builder::new().prefix(&format!("skiff-signer-test-{tag}-")).tempdir().unwrap();
    for t in ["zt-node-1", "zt-wrong-audience", "web-sa", "zt-pod-only", "forged", "wp", "wp-replaced"] {
        std::fs::write(dir.path().join(t), format!("{t}\n")).unwrap();
    }
    let ca = Ca::generate("cluster.local").unwrap();
    ca.write_files(&dir.path().join("ca-key.pem"), &dir.path().join("ca-cert.pem")).unwrap();
    let ca = Ca::load(&dir.path().join("ca-key.pem"), &dir.path().join("ca-cert.pem"), "cluster.local").unwrap();
    let ca_root = ca.root();
    let tls = skiff_signer::tls_config(&ca, &[SIGNER_NAME.to_owned()]).unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let url = fake.url();
    let kube = rt.block_on(skiff_kube_source::connect(Some(&url))).unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let signer = Signer::new(cfg, ca, kube);
    rt.spawn(signer.serve(listener, tls));
    Setup { fake, ca_root, url: format!("https://{addr}"), dir, _rt: rt }
}

impl Setup {
    /// Adds a token to the fake API server and its file for clients.
    fn token(&self, name: &str, id: TokenIdentity) {
        self.fake.add_token(name, id);
        std::fs::write(self.dir.path().join(name), format!("{name}\n")).unwrap();
    }

    fn client(&self, token: &str) -> SignerClient {
        SignerClient::new(&self.url, SIGNER_NAME, self.dir.path().join(token), std::slice::from_ref(&self.ca_root)).unwrap()
    }
}

fn refused(r: Result<skiff_hbone::identity::WorkloadCert, SignerError>) -> (u16, String) {
    match r {
        Err(SignerError::Refused { status, message, .. }) => (status, message),
        Err(e) => panic!("expected a refusal, got {}", skiff_core::report(&e)),
        Ok(c) => panic!("expected a refusal, got a certificate for {}", c.identity),
    }
}

#[test]
fn signs_an_identity_of_a_pod_on_the_callers_node_chained_to_the_root() {
    let s = setup("ok");
    let id = Identity::new("cluster.local", "app", "web");
    let cert = s.client("zt-node-1").issue(&id, Duration::from_secs(3600)).unwrap();
    assert_eq!(identity_of(&cert.chain[0]).unwrap(), id, "the SAN is the requested identity");
    let name = ServerName::try_from("x").unwrap();
    ExpectedIdentityVerifier::new(roots(std::slice::from_ref(&s.ca_root)).unwrap(), id.clone())
        .verify_server_cert(&cert.chain[0], &[], &name, &[], UnixTime::now())
        .expect("chains to the root");
    let foreign = Ca::generate("cluster.local").unwrap();
    assert!(ExpectedIdentityVerifier::new(roots(&[foreign.root()]).unwrap(), id)
        .verify_server_cert(&cert.chain[0], &[], &name, &[], UnixTime::now())
        .is_err());
    let life = cert.not_after.duration_since(cert.not_before).unwrap();
    assert!(life <= Duration::from_secs(3600 + 120), "lifetime {life:?}");
    // Exactly what the signer's RBAC must allow.
    let verbs: std::collections::BTreeSet<(String, String, String)> =
        s.fake.requests().into_iter().map(|r| (r.verb, r.group, r.resource)).collect();
    let want = [("create", "authentication.k8s.io", "tokenreviews"), ("list", "", "pods")];
    assert_eq!(verbs, want.iter().map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string())).collect());
}

#[test]
fn refuses_a_pod_of_another_node_an_invalid_token_and_other_callers() {
    let s = setup("refuse");
    let (code, msg) = refused(s.client("zt-node-1").issue(&Identity::new("cluster.local", "app", "db"), Duration::from_secs(3600)));
    assert_eq!(code, 403);
    assert!(msg.contains("service account db") && msg.contains("node node-1"), "{msg}");
    let (code, msg) = refused(s.client("forged").issue(&Identity::new("cluster.local", "app", "web"), Duration::from_secs(3600)));
    assert_eq!(code, 401, "{msg}");
    let (code, msg) = refused(s.client("zt-wrong-audience").issue(&Identity::new("cluster.local", "app", "web"), Duration::from_secs(3600)));
    assert_eq!(code, 401, "{msg}");
    let (code, msg) = refused(s.client("web-sa").issue(&Identity::new("cluster.local", "app", "web"), Duration::from_secs(3600)));
    assert_eq!(code, 403);
    assert!(msg.contains("system:serviceaccount:app:web is not the ztunnel"), "{msg}");
    let (code, msg) = refused(s.client("zt-node-1").issue(&Identity::new("evil.example", "app", "web"), Duration::from_secs(3600)));
    assert_eq!(code, 403);
    assert!(msg.contains("trust domain"), "{msg}");
}

#[test]
fn a_token_bound_only_to_a_pod_is_placed_by_that_pods_node() {
    let s = setup("podonly");
    // ztunnel-old runs on node-2, where db-1 is.
    let id = Identity::new("cluster.local", "app", "db");
    let cert = s.client("zt-pod-only").issue(&id, Duration::from_secs(600)).unwrap();
    assert_eq!(identity_of(&cert.chain[0]).unwrap(), id);
    assert!(s.fake.requests().iter().any(|r| r.verb == "get" && r.resource == "pods" && r.namespace.as_deref() == Some("skiff-system")));
    refused(s.client("zt-pod-only").issue(&Identity::new("cluster.local", "app", "web"), Duration::from_secs(600)));
}

#[test]
fn ztunnel_cert_manager_in_signer_mode_serves_only_its_nodes_identities() {
    let s = setup("mgr");
    let mgr = CertManager::from_signer(s.client("zt-node-1"), std::slice::from_ref(&s.ca_root), "cluster.local", Duration::from_secs(600)).unwrap();
    mgr.server_config(Identity::new("cluster.local", "app", "web")).expect("own pod's identity");
    assert_eq!(mgr.summary().len(), 1);
    let err = mgr.server_config(Identity::new("cluster.local", "app", "db")).unwrap_err();
    assert!(skiff_core::report(&err).contains("refused"), "{}", skiff_core::report(&err));
}

#[test]
fn the_signer_does_not_trust_a_root_key_others_can_read() {
    let s = setup("mode");
    let key = s.dir.path().join("ca-key.pem");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    match Ca::load(&key, &s.dir.path().join("ca-cert.pem"), "cluster.local") {
        Err(e @ IdentityError::KeyMode { .. }) => assert!(e.to_string().contains("644"), "{e}"),
        Err(e) => panic!("unexpected {e}"),
        Ok(_) => panic!("loaded a world-readable root key"),
    }
}

#[test]
fn a_waypoint_obtains_its_own_identity_and_nothing_else() {
    let s = setup("waypoint");
    let own = Identity::new("cluster.local", "app", "waypoint");
    let cert = s.client("wp").issue(&own, Duration::from_secs(600)).unwrap();
    assert_eq!(identity_of(&cert.chain[0]).unwrap(), own);
    // Not another identity, even one of a pod on its node.
    let (code, msg) = refused(s.client("wp").issue(&Identity::new("cluster.local", "app", "db"), Duration::from_secs(600)));
    assert_eq!(code, 403);
    assert!(msg.contains("may only obtain its own identity"), "{msg}");
    // A token bound to a pod that was replaced.
    let (code, msg) = refused(s.client("wp-replaced").issue(&own, Duration::from_secs(600)));
    assert_eq!(code, 403);
    assert!(msg.contains("replaced"), "{msg}");
    // An ordinary workload (no waypoint label) does not get even its own.
    let (code, msg) = refused(s.client("web-sa").issue(&Identity::new("cluster.local", "app", "web"), Duration::from_secs(600)));
    assert_eq!(code, 403);
    assert!(msg.contains("is not a waypoint"), "{msg}");
    // Issue 13 item 8: a pod that carries the waypoint's label but runs as
    // another service account (anyone who can create pods can label one)
    // is not a pod of that waypoint: no identity from this path.
    s.fake
        .apply(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "rogue", "namespace": "app", "uid": "uid-rogue", "labels": {"gateway.networking.k8s.io/gateway-name": "waypoint"}},
            "spec": {"nodeName": "node-1", "serviceAccountName": "default", "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": "10.244.1.40"}}))
        .unwrap();
    s.token("rogue", TokenIdentity::service_account("app", "default").bound_to_pod("rogue", "uid-rogue", "node-1").with_audiences(&["skiff-ca"]));
    let (code, msg) = refused(s.client("rogue").issue(&Identity::new("cluster.local", "app", "default"), Duration::from_secs(600)));
    assert_eq!(code, 403);
    assert!(msg.contains("labelled as waypoint \"waypoint\""), "{msg}");
    // The waypoint path reads the bound pod: get pods in its namespace.
    assert!(s.fake.requests().iter().any(|r| r.verb == "get" && r.resource == "pods" && r.namespace.as_deref() == Some("app")));
}

#[test]
fn mirror_pods_and_pods_without_a_service_account_vouch_for_no_identity() {
    let s = setup("mirror");
    // What a compromised node-1 kubelet could create: mirror pods in any
    // namespace, with or without a service account, and a pod naming none.
    let mirror = |ns: &str, name: &str, sa: Option<&str>, labels: serde_json::Value| {
        let mut spec = json!({"nodeName": "node-1", "containers": [{"name": "c"}]});
        if let Some(sa) = sa {
            spec["serviceAccountName"] = json!(sa);
        }
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"), "labels": labels,
                            "annotations": {"kubernetes.io/config.mirror": "0123abcd"}},
               "spec": spec, "status": {"phase": "Running", "podIP": "10.244.1.30"}})
    };
    s.fake.apply(mirror("payments", "static-1", None, json!({}))).unwrap();
    s.fake.apply(mirror("payments", "static-2", Some("admin"), json!({}))).unwrap();
    s.fake.apply(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "nosa-1", "namespace": "billing", "uid": "uid-nosa-1"},
        "spec": {"nodeName": "node-1", "serviceAccountName": "", "containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIP": "10.244.1.31"}}))
    .unwrap();
    for (ns, sa) in [("payments", "default"), ("payments", "admin"), ("billing", "default")] {
        let (code, msg) = refused(s.client("zt-node-1").issue(&Identity::new("cluster.local", ns, sa), Duration::from_secs(600)));
        assert_eq!(code, 403, "ns/{ns}/sa/{sa}: {msg}");
        assert!(msg.contains(&format!("service account {sa} in namespace {ns} on node node-1")), "{msg}");
    }
    // The waypoint path: a labelled mirror pod, and a labelled pod naming
    // no service account, do not vouch for their token's service account.
    // (Each labelled as the waypoint named like its service account, so
    // only what the case is about refuses it.)
    s.fake.apply(mirror("app", "static-wp", Some("mirror-wp"), json!({"gateway.networking.k8s.io/gateway-name": "mirror-wp"}))).unwrap();
    s.token("mirror-wp", TokenIdentity::service_account("app", "mirror-wp").bound_to_pod("static-wp", "uid-static-wp", "node-1").with_audiences(&["skiff-ca"]));
    let (code, msg) = refused(s.client("mirror-wp").issue(&Identity::new("cluster.local", "app", "mirror-wp"), Duration::from_secs(600)));
    assert_eq!(code, 403);
    assert!(msg.contains("mirror"), "{msg}");
    s.fake.apply(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "nosa-wp", "namespace": "app", "uid": "uid-nosa-wp", "labels": {"gateway.networking.k8s.io/gateway-name": "default"}},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIP": "10.244.1.32"}}))
    .unwrap();
    s.token("nosa-wp", TokenIdentity::service_account("app", "default").bound_to_pod("nosa-wp", "uid-nosa-wp", "node-1").with_audiences(&["skiff-ca"]));
    let (code, msg) = refused(s.client("nosa-wp").issue(&Identity::new("cluster.local", "app", "default"), Duration::from_secs(600)));
    assert_eq!(code, 403);
    assert!(msg.contains("names no service account"), "{msg}");
}

#[test]
fn a_max_lifetime_below_a_minute_neither_panics_nor_starts() {
    // In use (a config not validated): the certificate is capped, the
    // connection does not die with the handler.
    let s = setup_with("shortmax", Config { max_lifetime: Duration::from_secs(30), ..Config::default() });
    let id = Identity::new("cluster.local", "app", "web");
    let cert = s.client("zt-node-1").issue(&id, Duration::from_secs(3600)).expect("signed, not a dropped connection");
    let life = cert.not_after.duration_since(cert.not_before).unwrap();
    assert!(life <= Duration::from_secs(30 + 60), "lifetime {life:?}");
    // At start: the binary refuses it before reading anything, naming the flag.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_skiff-signer"))
        .args(["--max-lifetime", "30", "--root-key", "/nonexistent/key.pem"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--max-lifetime 30") && err.contains("60"), "{err}");
}

/// How long until the signer closes `stream` (which sends nothing), if it
/// does within `within`.
async fn closed_after<S: tokio::io::AsyncRead + Unpin>(mut stream: S, within: Duration) -> Option<Duration> {
    use tokio::io::AsyncReadExt as _;
    let start = std::time::Instant::now();
    let mut buf = [0u8; 64];
    match tokio::time::timeout(within, stream.read(&mut buf)).await {
        Ok(Ok(0) | Err(_)) => Some(start.elapsed()),
        Ok(Ok(n)) => panic!("the signer sent {n} bytes unasked"),
        Err(_) => None,
    }
}

#[test]
fn silent_clients_are_closed_and_connections_are_bounded() {
    let cfg = Config {
        handshake_timeout: Duration::from_millis(800),
        header_read_timeout: Duration::from_millis(800),
        request_timeout: Duration::from_millis(800),
        max_connections: 2,
        ..Config::default()
    };
    let s = setup_with("slow", cfg);
    let addr = s.url.strip_prefix("https://").unwrap().to_owned();
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(std::slice::from_ref(&s.ca_root)).unwrap())
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    s._rt.block_on(async {
        // TCP only, no TLS handshake: closed at the handshake timeout.
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let t = closed_after(tcp, Duration::from_secs(5)).await.expect("a silent TCP client is closed");
        assert!(t >= Duration::from_millis(700), "closed after {t:?}, before the timeout");
        // TLS done, then no request: closed at the header read timeout.
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let name = ServerName::try_from(SIGNER_NAME).unwrap();
        let tls = connector.connect(name.clone(), tcp).await.expect("TLS handshake");
        let t = closed_after(tls, Duration::from_secs(5)).await.expect("a client sending no request is closed");
        assert!(t >= Duration::from_millis(700), "closed after {t:?}, before the timeout");
        // Headers, then a body that never comes: 503 at the request timeout.
        {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let mut tls = connector.connect(name.clone(), tcp).await.expect("TLS handshake");
            let head = "POST /v1/sign HTTP/1.1\r\nhost: x\r\nauthorization: Bearer zt-node-1\r\ncontent-length: 100\r\n\r\n{";
            tls.write_all(head.as_bytes()).await.unwrap();
            let start = std::time::Instant::now();
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                    Err(_) => panic!("no answer to a request whose body never comes"),
                }
            }
            let got = String::from_utf8_lossy(&got);
            assert!(got.starts_with("HTTP/1.1 503"), "{got}");
            assert!(start.elapsed() >= Duration::from_millis(700), "answered after {:?}", start.elapsed());
        }
        // Two silent connections hold both slots: a third is closed at once.
        let a = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let b = tokio::net::TcpStream::connect(&addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let t = closed_after(c, Duration::from_millis(500)).await.expect("a connection over the limit is closed at once");
        assert!(t < Duration::from_millis(500), "{t:?}");
        drop((a, b));
    });
    // Slots come back: a real request is served.
    std::thread::sleep(Duration::from_millis(200));
    let id = Identity::new("cluster.local", "app", "web");
    s.client("zt-node-1").issue(&id, Duration::from_secs(600)).expect("served once slots are free");
}
