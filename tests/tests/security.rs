//! End-to-end tests of the zero-trust tunnel: HBONE mutual TLS between
//! ztunnels, SPIFFE identities, PeerAuthentication and L4
//! AuthorizationPolicy, certificate rotation — in the local mesh, with the
//! real kernel programs. Assertions use what crossed the wire, what the apps
//! saw, ztunnel's metrics and logs.

use std::time::Duration;

use skiff_e2e::*;

const CONNS: &str = "istio_tcp_connections_opened_total";
const WAIT: Duration = Duration::from_secs(15);

fn tls_record_start(payload: &[u8]) -> bool {
    // TLS record: content type (handshake 22, application data 23), version 3.x.
    payload.len() >= 5 && matches!(payload[0], 22 | 23) && payload[1] == 3
}

#[test]
fn traffic_between_enrolled_pods_is_mutual_tls_on_the_wire() {
    let Some(mesh) = mesh("manifests/l4") else { return };
    let (client_pod, server) = (mesh.pod("mesh", "client"), mesh.pod("mesh", "server"));
    let (plain_client, plain_server) = (mesh.pod("plain", "client"), mesh.pod("plain", "server"));
    wait_listening_on(server, 9000);
    wait_listening(plain_server);
    let secret = format!("SKIFF-SECRET-{}", mesh.run_id);
    let visible = format!("SKIFF-VISIBLE-{}", mesh.run_id);

    let capture = mesh.capture_between_nodes().unwrap();
    let r = client(&mesh, client_pod, &format!("{}:9000", server.ip), &secret);
    assert!(r.ok, "{r:?}");
    // Control: the same capture does see plaintext between non-enrolled pods.
    let r2 = client(&mesh, plain_client, &format!("{}:9000", plain_server.ip), &visible);
    assert!(r2.ok, "{r2:?}");
    std::thread::sleep(Duration::from_millis(200));
    let packets = capture.stop();

    assert!(peer_of_marker(server, &secret).is_some(), "the server still received the data");
    let contains = |needle: &str| packets.iter().any(|p| p.payload.windows(needle.len()).any(|w| w == needle.as_bytes()));
    assert!(contains(&visible), "control failed: the capture did not see plaintext traffic ({} packets)", packets.len());
    assert!(!contains(&secret), "the marker crossed the node link in clear text");
    let hbone: Vec<_> = packets
        .iter()
        .filter(|p| (p.dst == std::net::SocketAddrV4::new(server.ip, 15008) || p.src == std::net::SocketAddrV4::new(server.ip, 15008)) && !p.payload.is_empty())
        .collect();
    assert!(!hbone.is_empty(), "no traffic on port 15008 between the nodes");
    assert!(hbone.iter().any(|p| tls_record_start(&p.payload)), "no TLS records on port 15008");
    assert!(
        !packets.iter().any(|p| p.dst == std::net::SocketAddrV4::new(server.ip, 9000) && p.src.ip() == &client_pod.ip),
        "the enrolled client reached the app port directly"
    );
}

#[test]
fn server_side_ztunnel_reports_the_client_spiffe_identity() {
    let Some(mesh) = mesh("manifests/l4") else { return };
    let (client_pod, server) = (mesh.pod("mesh", "client"), mesh.pod("mesh", "server"));
    wait_listening_on(server, 9000);
    let r = client(&mesh, client_pod, &format!("{}:9000", server.ip), "who-am-i");
    assert!(r.ok, "{r:?}");
    let principal = "spiffe://cluster.local/ns/mesh/sa/client";
    eventually(WAIT, "destination metric with the client identity", || {
        let v = mesh
            .metric(
                server.node,
                CONNS,
                &[("reporter", "destination"), ("source_principal", principal), ("connection_security_policy", "mutual_tls")],
            )
            .unwrap();
        (v >= 1.0).then_some(())
    });
    eventually(WAIT, "access log with both identities", || {
        let log = std::fs::read_to_string(&mesh.nodes[server.node].ztunnel_log).unwrap();
        log.lines()
            .any(|l| {
                l.contains("direction=\"inbound\"") || l.contains("direction=inbound")
            } && l.contains(principal) && l.contains("spiffe://cluster.local/ns/mesh/sa/echo") && l.contains("mutual_tls"))
            .then_some(())
    });
}

fn probe(mesh: &LocalMesh, from: &PodRt, server: &PodRt, identity: &str, expect: &str, extra: &[&str]) -> serde_json::Value {
    let ca = mesh.ca_dir().display().to_string();
    let to = format!("{}:15008", server.ip);
    let target = format!("{}:9000", server.ip);
    let mut argv = vec![
        "skiff-hbone-probe", "--to", &to, "--target", &target, "--ca-dir", &ca, "--identity", identity, "--expect", expect,
        "--message", "probe-data",
    ];
    argv.extend_from_slice(extra);
    let out = mesh.exec(from, &argv, Duration::from_secs(30)).unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn peers_with_bad_certificates_are_refused_with_a_logged_reason() {
    let Some(mesh) = mesh("manifests/l4") else { return };
    let server = mesh.pod("mesh", "server");
    let from = mesh.pod("plain", "client"); // not enrolled: the probe speaks for itself
    wait_listening_on(server, 9000);
    // Control: the right certificate for the prober's own identity works.
    let ok = probe(&mesh, from, server, "plain/default", "mesh/echo", &[]);
    assert_eq!(ok["ok"], true, "{ok}");
    assert_eq!(ok["reply"], "echo from server: probe-data");

    let log = || std::fs::read_to_string(&mesh.nodes[server.node].ztunnel_log).unwrap();
    let foreign = probe(&mesh, from, server, "plain/default", "mesh/echo", &["--foreign-ca"]);
    assert_eq!(foreign["ok"], false, "{foreign}");
    eventually(WAIT, "foreign CA refusal logged", || {
        // Another CA with the same name fails the signature check; one with
        // another name is an unknown issuer: refused either way.
        log().lines()
            .any(|l| l.contains("HBONE peer refused") && (l.contains("UnknownIssuer") || l.contains("BadSignature")))
            .then_some(())
    });
    let expired = probe(&mesh, from, server, "plain/default", "mesh/echo", &["--expired"]);
    assert_eq!(expired["ok"], false, "{expired}");
    eventually(WAIT, "expired certificate refusal logged", || {
        log().lines().any(|l| l.contains("HBONE peer refused") && l.contains("certificate expired")).then_some(())
    });
    // A valid certificate, but for another service account than the
    // workload at the prober's address.
    let impostor = probe(&mesh, from, server, "mesh/client", "mesh/echo", &[]);
    assert_eq!(impostor["ok"], false, "{impostor}");
    eventually(WAIT, "identity mismatch logged", || {
        log().lines().any(|l| l.contains("identity does not match the workload at its address") && l.contains("sa/client")).then_some(())
    });
    // And the client side: a server that cannot prove the expected service
    // account is refused by the dialer.
    let wrong_server = probe(&mesh, from, server, "plain/default", "mesh/not-echo", &[]);
    assert_eq!(wrong_server["ok"], false, "{wrong_server}");
    assert_eq!(wrong_server["stage"], "tls");
    assert!(wrong_server["error"].as_str().unwrap().contains("not the expected"), "{wrong_server}");
    assert!(peer_of_marker(server, "probe-data").is_some(), "only the control probe's data arrived");
    assert_eq!(server_events(server).iter().filter(|e| e["event"] == "received" && e["data"] == "probe-data").count(), 1);
    assert!(mesh.metric(server.node, "skiff_ztunnel_hbone_refused_total", &[]).unwrap() >= 3.0);
}

const STRICT: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: mtls, namespace: mesh}\nspec:\n  mtls: {mode: STRICT}\n";
const PERMISSIVE: &str =
    "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: mtls, namespace: mesh}\nspec:\n  mtls: {mode: PERMISSIVE}\n";

#[test]
fn strict_refuses_plaintext_and_permissive_accepts_it_without_restart() {
    let Some(mesh) = mesh("manifests/l4") else { return };
    let server = mesh.pod("mesh", "server");
    wait_listening_on(server, 9000);
    let target = format!("{}:9000", server.ip);
    apply_policy(&mesh, server.node, "mtls", Some(STRICT));
    let r = client(&mesh, mesh.pod("plain", "client"), &target, "plain-under-strict");
    assert!(r.reply.is_empty(), "plaintext got an answer under STRICT: {r:?}");
    assert!(peer_of_marker(server, "plain-under-strict").is_none(), "plaintext reached the app under STRICT");
    let r = client(&mesh, mesh.pod("mesh", "client"), &target, "mtls-under-strict");
    assert!(r.ok && r.reply.ends_with("mtls-under-strict"), "mTLS must still work under STRICT: {r:?}");

    // kubelet's health probes come from the node itself: they still reach
    // the pod under STRICT (and are counted).
    let reply = mesh.node_exchange(server.node, std::net::SocketAddrV4::new(server.ip, 9000), "probe-under-strict").expect("probe from the node");
    assert!(reply.ends_with("probe-under-strict"), "a probe from the node did not reach the app under STRICT: {reply:?}");
    assert!(mesh.metric(server.node, "skiff_ztunnel_node_probe_connections_total", &[]).unwrap() >= 1.0, "probe not counted");
    // Only to a declared probe port: the node reaching 9001 (no probe) is
    // plaintext like any other, refused under STRICT.
    let other = mesh.node_exchange(server.node, std::net::SocketAddrV4::new(server.ip, 9001), "node-to-admin").unwrap_or_default();
    assert!(!other.contains("node-to-admin"), "the node reached a non-probe port under STRICT: {other:?}");

    apply_policy(&mesh, server.node, "mtls", Some(PERMISSIVE));
    let r = client(&mesh, mesh.pod("plain", "client"), &target, "plain-under-permissive");
    assert!(r.ok && r.reply.ends_with("plain-under-permissive"), "{r:?}");
    assert!(peer_of_marker(server, "plain-under-permissive").is_some());
    let log = std::fs::read_to_string(&mesh.nodes[server.node].ztunnel_log).unwrap();
    assert!(log.contains("plaintext connection refused: PeerAuthentication is STRICT"), "refusal not logged");
}

fn authz(name: &str, body: &str) -> String {
    format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: mesh}}\nspec:\n  selector: {{matchLabels: {{app: echo}}}}\n{body}")
}

/// (allowed, server saw the marker).
fn attempt(mesh: &LocalMesh, from: (&str, &str), port: u16, marker: &str) -> bool {
    let server = mesh.pod("mesh", "server");
    let r = client(mesh, mesh.pod(from.0, from.1), &format!("{}:{port}", server.ip), marker);
    let arrived = peer_of_marker(server, marker).is_some();
    assert_eq!(r.ok && r.reply.ends_with(marker), arrived, "client and server disagree: {r:?}");
    arrived
}

#[test]
fn authorization_policies_allow_and_deny_as_istio_specifies() {
    let Some(mesh) = mesh("manifests/l4") else { return };
    let server = mesh.pod("mesh", "server");
    wait_listening_on(server, 9000);
    wait_listening_on(server, 9001);
    let node = server.node;
    let n = std::cell::Cell::new(0);
    let try_ = |from: (&str, &str), port: u16| {
        n.set(n.get() + 1);
        attempt(&mesh, from, port, &format!("authz-{}", n.get()))
    };
    let (mesh_client, echo_b, plain_client) = (("mesh", "client"), ("mesh", "server-b"), ("plain", "client"));

    // ALLOW by namespace.
    apply_policy(&mesh, node, "p", Some(&authz("p", "  action: ALLOW\n  rules: [{from: [{source: {namespaces: [mesh]}}]}]\n")));
    assert!(try_(mesh_client, 9000), "ALLOW namespaces [mesh]: mesh client");
    assert!(!try_(plain_client, 9000), "ALLOW namespaces [mesh]: plaintext client has no namespace");

    // ALLOW by principal.
    apply_policy(&mesh, node, "p", Some(&authz("p", "  rules: [{from: [{source: {principals: [cluster.local/ns/mesh/sa/client]}}]}]\n")));
    assert!(try_(mesh_client, 9000), "ALLOW principal: the named principal");
    assert!(!try_(echo_b, 9000), "ALLOW principal: another service account");

    // DENY by port, and DENY beating ALLOW.
    apply_policy(&mesh, node, "p", Some(&authz("p", "  action: ALLOW\n  rules: [{}]\n")));
    apply_policy(&mesh, node, "d", Some(&authz("d", "  action: DENY\n  rules: [{to: [{operation: {ports: [\"9001\"]}}]}]\n")));
    assert!(try_(mesh_client, 9000), "DENY port 9001: port 9000 allowed");
    assert!(!try_(mesh_client, 9001), "DENY port 9001 beats ALLOW all");
    apply_policy(&mesh, node, "d", None);
    assert!(try_(mesh_client, 9001), "DENY removed");

    // ipBlocks.
    let plain_ip = mesh.pod("plain", "client").ip;
    apply_policy(&mesh, node, "p", Some(&authz("p", &format!("  rules: [{{from: [{{source: {{ipBlocks: [{plain_ip}/32]}}}}]}}]\n"))));
    assert!(try_(plain_client, 9000), "ipBlocks: listed address");
    assert!(!try_(mesh_client, 9000), "ipBlocks: other address");

    // ALLOW by serviceAccounts (namespace/name): exactly that account;
    // another account and plaintext are refused.
    apply_policy(&mesh, node, "p", Some(&authz("p", "  rules: [{from: [{source: {serviceAccounts: [mesh/client]}}]}]\n")));
    assert!(try_(mesh_client, 9000), "serviceAccounts: the named account");
    assert!(!try_(echo_b, 9000), "serviceAccounts: another account (echo)");
    assert!(!try_(plain_client, 9000), "serviceAccounts: plaintext has no account");

    // A field Skiff does not know (`principal`, a typo) never widens an
    // ALLOW: the rule never matches (fail closed), for anyone.
    apply_policy(&mesh, node, "p", Some(&authz("p", "  rules: [{from: [{source: {principal: [cluster.local/ns/mesh/sa/client]}}]}]\n")));
    assert!(!try_(mesh_client, 9000), "unknown source field: the ALLOW rule never matches");
    assert!(!try_(plain_client, 9000), "unknown source field: plaintext refused");

    // An ALLOW policy with no rules allows nothing.
    apply_policy(&mesh, node, "p", Some(&authz("p", "  action: ALLOW\n")));
    assert!(!try_(mesh_client, 9000), "ALLOW without rules");
    apply_policy(&mesh, node, "p", None);
    assert!(try_(mesh_client, 9000), "no policy: allowed");

    let log = std::fs::read_to_string(&mesh.nodes[node].ztunnel_log).unwrap();
    assert!(log.contains("connection denied by authorization policy"), "denials are logged");
}

#[test]
fn removing_the_allow_rule_closes_an_open_connection() {
    let Some(mut mesh) = mesh("manifests/l4") else { return };
    let server_ip = mesh.pod("mesh", "server").ip;
    let node = mesh.pod("mesh", "server").node;
    wait_listening_on(mesh.pod("mesh", "server"), 9000);
    apply_policy(&mesh, node, "p", Some(&authz("p", "  rules: [{from: [{source: {namespaces: [mesh]}}]}]\n")));
    let k = mesh.pods.iter().position(|p| p.namespace == "mesh" && p.name == "client").unwrap();
    let log = mesh.work_dir.join("logs").join("held-client.log");
    let target = format!("{server_ip}:9000");
    mesh.spawn_in(k, &["skiff-demo-app", "client", "--target", &target, "--message", "held", "--hold-ms", "20000"], &log).unwrap();
    eventually(WAIT, "connection open at the server's ztunnel", || {
        (mesh.metric(node, "skiff_ztunnel_active_connections", &[]).unwrap() >= 1.0).then_some(())
    });
    // The rule that allowed it goes away: only another namespace is allowed now.
    mesh.apply("p", Some(&authz("p", "  rules: [{from: [{source: {namespaces: [plain]}}]}]\n"))).unwrap();
    let changed = std::time::Instant::now();
    eventually(Duration::from_secs(1), "the open connection closed within a second", || {
        (mesh.metric(node, "skiff_ztunnel_active_connections", &[]).unwrap() == 0.0).then_some(())
    });
    assert!(changed.elapsed() <= Duration::from_secs(1));
    let zlog = std::fs::read_to_string(&mesh.nodes[node].ztunnel_log).unwrap();
    assert!(zlog.contains("open connection closed: policy now denies it"), "{zlog}");
}

#[test]
fn certificates_rotate_under_a_long_lived_connection() {
    let Some(mut mesh) = mesh_with("manifests/l4", |o| o.cert_lifetime = Duration::from_secs(4)) else { return };
    let server_ip = mesh.pod("mesh", "server").ip;
    wait_listening_on(mesh.pod("mesh", "server"), 9000);
    let k = mesh.pods.iter().position(|p| p.namespace == "mesh" && p.name == "client").unwrap();
    let client_node = mesh.pods[k].node;
    let log = mesh.work_dir.join("logs").join("streaming-client.log");
    let target = format!("{server_ip}:9000");
    // Streams for 7 s: certificates (4 s lifetime) rotate at least once on both nodes.
    mesh.spawn_in(k, &["skiff-demo-app", "client", "--target", &target, "--message", "stream", "--stream-ms", "7000"], &log).unwrap();
    let out = eventually(Duration::from_secs(30), "streaming client finished", || {
        let text = std::fs::read_to_string(&log).ok()?;
        (!text.trim().is_empty()).then_some(text)
    });
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    let reply = v["reply"].as_str().unwrap_or_else(|| panic!("client failed: {v}"));
    assert!(reply.starts_with("echo from server: stream chunk-0 chunk-1"), "{v}");
    let chunks = reply.matches(" chunk-").count();
    assert!(chunks >= 20, "the connection carried data throughout ({chunks} chunks)");
    for node in [client_node, mesh.pod("mesh", "server").node] {
        let zlog = std::fs::read_to_string(&mesh.nodes[node].ztunnel_log).unwrap();
        assert!(zlog.contains("rotated=true"), "no rotation on {}", mesh.nodes[node].name);
    }
    // New connections after rotation work too.
    let r = client(&mesh, &mesh.pods[k], &target, "after-rotation");
    assert!(r.ok && r.reply.ends_with("after-rotation"), "{r:?}");
}

#[test]
fn malformed_connect_requests_get_4xx_and_only_their_stream_ends() {
    let Some(mesh) = mesh("manifests/l4") else { return };
    let server = mesh.pod("mesh", "server");
    let from = mesh.pod("plain", "client");
    wait_listening_on(server, 9000);
    let other_pod = format!("{}:9000", mesh.pod("mesh", "client").ip);
    let mesh_port = format!("{}:15008", server.ip);
    let cases: [(&str, Vec<&str>, u64); 5] = [
        ("non-CONNECT method", vec!["--method", "GET"], 405),
        ("authority is not IP:port", vec!["--authority", "example.com:80"], 400),
        ("target is another pod", vec!["--authority", &other_pod], 400),
        ("target is a mesh port", vec!["--authority", &mesh_port], 400),
        ("oversized headers", vec!["--header-bytes", "20000"], 431),
    ];
    for (what, mut args, want) in cases {
        args.push("--then-valid");
        let v = probe(&mesh, from, server, "plain/default", "mesh/echo", &args);
        assert_eq!(v["ok"], false, "{what}: {v}");
        assert_eq!(v["status"].as_u64(), Some(want), "{what}: {v}");
        // The connection survived its bad stream: a proper request on it works.
        assert!(
            v["error"].as_str().unwrap().contains("follow-up on the same connection answered: echo from server: probe-data"),
            "{what}: {v}"
        );
    }
    // ztunnel is still up and serving.
    assert_eq!(mesh.node_http_get(server.node, 15021, "/healthz/ready").unwrap().0, 200);
}

/// Issue 13 item 1: handshake slots were held for a connection's whole
/// life and shared by every peer, so a peer that opened connections to a
/// pod's :15008 and never spoke TLS locked everyone out. Now one peer holds
/// at most its own few handshake slots, and an authenticated connection
/// frees its slot.
#[test]
fn idle_connections_to_15008_do_not_lock_other_peers_out() {
    let Some(mut mesh) = mesh("manifests/l4") else { return };
    let (server_ip, server_node) = (mesh.pod("mesh", "server").ip, mesh.pod("mesh", "server").node);
    wait_listening_on(mesh.pod("mesh", "server"), 9000);
    let k = mesh.pods.iter().position(|p| p.namespace == "plain" && p.name == "client").unwrap();
    let log = mesh.work_dir.join("logs").join("silent-15008.log");
    let to = format!("{server_ip}:15008");
    mesh.spawn_in(k, &["skiff-demo-app", "hold", "--target", &to, "--count", "1025", "--silent-ms", "12000"], &log).unwrap();
    let opened = eventually(Duration::from_secs(60), "1025 silent connections open", || {
        let text = std::fs::read_to_string(&log).ok()?;
        let v: serde_json::Value = serde_json::from_str(text.lines().next()?).ok()?;
        v["opened"].as_u64()
    });
    assert_eq!(opened, 1025, "{}", std::fs::read_to_string(&log).unwrap());
    // ztunnel has taken every one of them: each holds a handshake slot or
    // was refused one.
    eventually(Duration::from_secs(20), "ztunnel took all 1025 silent connections", || {
        let metrics = mesh.node_http_get(server_node, 15020, "/metrics").unwrap().1;
        let held = skiff_localmesh::mesh::sum_metric(&metrics, "skiff_hbone_handshakes_in_progress", &[]);
        let refused = skiff_localmesh::mesh::sum_metric(&metrics, "skiff_hbone_admission_refused_total", &[]);
        (held + refused >= 1025.0).then_some(())
    });
    // Well inside the 10 s handshake timeout: the silent peer still holds
    // every slot it got.
    let client_pod = mesh.pod("mesh", "client");
    let r = client(&mesh, client_pod, &format!("{server_ip}:9000"), "past-the-silent-peer");
    assert!(r.ok && r.reply.ends_with("past-the-silent-peer"), "{r:?}");
    let refused = mesh.metric(server_node, "skiff_hbone_admission_refused_total", &[("reason", "handshakes_per_peer")]).unwrap();
    assert!(refused >= (1025 - 32) as f64, "the silent peer's connections past its 32 slots are refused at once: {refused}");
    let zlog = std::fs::read_to_string(&mesh.nodes[server_node].ztunnel_log).unwrap();
    let lines = zlog.lines().filter(|l| l.contains("HBONE connection refused")).count();
    assert!((1..=3).contains(&lines), "refusals are logged, at most once per 10 s per reason: {lines} lines");
    assert!(zlog.contains("--hbone-max-handshakes-per-peer"), "the log names the flag that raises the bound");
    // The silent connections are cut at the handshake timeout, not held.
    let done = eventually(Duration::from_secs(30), "the silent peer's report", || {
        let text = std::fs::read_to_string(&log).ok()?;
        text.lines().nth(1).and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    });
    assert_eq!(done["closed_by_server"].as_u64(), Some(1025), "{done}");
}

/// Issue 13 item 1: pooled HBONE connections used to stay open for ever.
/// The client pool closes one idle past --hbone-pool-idle-timeout, and the
/// server side sees it go; a server closes (GOAWAY) a connection its peer
/// keeps idle past --hbone-server-idle-timeout.
#[test]
fn idle_hbone_connections_are_closed_on_both_ends() {
    let args = ["--hbone-pool-idle-timeout", "2", "--hbone-server-idle-timeout", "4"];
    let Some(mesh) = mesh_with("manifests/l4", |o| o.ztunnel_args.extend(args.iter().map(|s| s.to_string()))) else { return };
    let (client_pod, server) = (mesh.pod("mesh", "client"), mesh.pod("mesh", "server"));
    assert_ne!(client_pod.node, server.node, "the manifests place client and server on different nodes");
    wait_listening_on(server, 9000);
    let r = client(&mesh, client_pod, &format!("{}:9000", server.ip), "before-idle");
    assert!(r.ok, "{r:?}");
    let hbone = |node: usize, direction: &str| mesh.metric(node, "skiff_hbone_connections", &[("direction", direction)]).unwrap();
    assert_eq!(hbone(client_pod.node, "outbound"), 1.0, "one pooled connection after the call");
    assert_eq!(hbone(server.node, "inbound"), 1.0, "one accepted connection after the call");
    eventually(Duration::from_secs(10), "the idle pooled connection closed on both ends", || {
        (hbone(client_pod.node, "outbound") == 0.0 && hbone(server.node, "inbound") == 0.0).then_some(())
    });
    // A new call opens a new connection.
    let r = client(&mesh, client_pod, &format!("{}:9000", server.ip), "after-idle");
    assert!(r.ok && r.reply.ends_with("after-idle"), "{r:?}");
    // A peer that keeps its connection idle (no pool timeout of its own).
    let v = probe(&mesh, mesh.pod("plain", "client"), server, "plain/default", "mesh/echo", &["--then-idle-secs", "12"]);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["idle"]["closed_by_server"], true, "{v}");
    let after = v["idle"]["after_ms"].as_u64().unwrap();
    assert!((3500..=9000).contains(&after), "closed about 4 s after the last stream: {after} ms");
}

/// Issue 13 item 9: the probe exemption under STRICT took any connection
/// with the node's address as its source, so traffic the node forwards and
/// SNATs (a NodePort, a LoadBalancer) passed as a "probe". Here node-2
/// SNATs the plain pod's connections to the server to its own address on
/// their way in, as kube-proxy's masquerade does: refused under STRICT,
/// while a probe the node opens itself still passes.
#[test]
fn a_forwarded_connection_with_the_nodes_address_is_not_a_probe() {
    let Some(mesh) = mesh("manifests/l4") else { return };
    let server = mesh.pod("mesh", "server");
    wait_listening_on(server, 9000);
    let node = &mesh.nodes[server.node];
    let plain = mesh.pod("plain", "client");
    assert_ne!(plain.node, server.node, "the plain client's traffic crosses node-2 from outside");
    let snat = std::process::Command::new("ip")
        .args(["netns", "exec", &node.netns, "iptables", "-w", "-t", "nat", "-I", "POSTROUTING", "-p", "tcp"])
        .args(["-s", &plain.ip.to_string(), "-d", &server.ip.to_string(), "--dport", "9000", "-j", "SNAT", "--to-source"])
        .arg(node.pod_gateway.to_string())
        .status()
        .unwrap();
    assert!(snat.success(), "adding the SNAT rule in {}", node.netns);
    let target = format!("{}:9000", server.ip);
    // PERMISSIVE: the forwarded connection arrives with the node's address.
    let r = client(&mesh, plain, &target, "forwarded-permissive");
    assert!(r.ok, "{r:?}");
    let seen = peer_of_marker(server, "forwarded-permissive").expect("the app saw the forwarded connection");
    assert!(seen.starts_with(&format!("{}:", node.pod_gateway)), "the connection arrived SNATed to the node's address: {seen}");
    apply_policy(&mesh, server.node, "mtls", Some(STRICT));
    let r = client(&mesh, plain, &target, "forwarded-under-strict");
    assert!(r.reply.is_empty(), "forwarded traffic passed as a probe under STRICT: {r:?}");
    assert!(peer_of_marker(server, "forwarded-under-strict").is_none(), "it reached the app");
    let log = std::fs::read_to_string(&node.ztunnel_log).unwrap();
    assert!(log.contains("not opened on the node (forwarded and SNATed)"), "the refusal says why");
    // A probe the node opens itself still passes.
    let reply = mesh.node_exchange(server.node, std::net::SocketAddrV4::new(server.ip, 9000), "real-probe").expect("probe from the node");
    assert!(reply.ends_with("real-probe"), "{reply:?}");
}
