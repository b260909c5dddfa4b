//! The demo: traffic between enrolled and non-enrolled pods of the example
//! app, and what the mesh captured, read from ztunnel's metrics and
//! node-agent's pinned state.

use std::time::{Duration, Instant};

use anyhow::bail;

use crate::LocalMesh;

/// Connections ztunnel reported for one hop, summed over all nodes:
/// (leaving `src` captured, arriving at `dst` captured).
fn counts(mesh: &LocalMesh, src: (&str, &str), dst: (&str, &str)) -> anyhow::Result<(f64, f64)> {
    let mut out = (0.0, 0.0);
    for i in 0..mesh.nodes.len() {
        out.0 += mesh.metric(
            i,
            "istio_tcp_connections_opened_total",
            &[("reporter", "source"), ("source_workload_namespace", src.0), ("source_workload", src.1)],
        )?;
        out.1 += mesh.metric(
            i,
            "istio_tcp_connections_opened_total",
            // By app (canonical service): the frontend's two versions are
            // two workloads of one app.
            &[("reporter", "destination"), ("destination_workload_namespace", dst.0), ("destination_canonical_service", dst.1)],
        )?;
    }
    Ok(out)
}

/// Prints the pods, with where they run and whether node-agent enrolled them.
pub fn print_topology(mesh: &LocalMesh) -> anyhow::Result<()> {
    let mut enrolled = Vec::new();
    for i in 0..mesh.nodes.len() {
        let state = mesh.inspect(i)?;
        for e in state["enrolled"].as_array().cloned().unwrap_or_default() {
            if let Some(ip) = e["pod_ip"].as_str() {
                enrolled.push(ip.to_owned());
            }
        }
    }
    println!("\nLocal mesh {} — {} nodes, {} pods", mesh.run_id, mesh.nodes.len(), mesh.pods.len());
    println!("{:<13} {:<38} {:<8} {:<13} CAPTURED", "NAMESPACE", "POD", "NODE", "IP");
    for p in &mesh.pods {
        let captured = if enrolled.contains(&p.ip.to_string()) { "yes" } else { "no" };
        println!("{:<13} {:<38} {:<8} {:<13} {}", p.namespace, p.name, mesh.nodes[p.node].name, p.ip, captured);
    }
    println!("Services:");
    for s in &mesh.services {
        match mesh.load_balancer_ip(&s.namespace, &s.name) {
            Some(lb) => println!("  {}.{}  ClusterIP {}  LoadBalancer {lb} (from this machine)", s.name, s.namespace, s.cluster_ip),
            None => println!("  {}.{}  ClusterIP {}", s.name, s.namespace, s.cluster_ip),
        }
    }
    Ok(())
}

/// HTTPS from this machine through the ingress gateway: a self-signed
/// certificate for demo.example.com goes into a Secret, a second Gateway
/// with an HTTPS server naming it and a VirtualService bound to that
/// Gateway are applied (as `kubectl apply` would), and a client trusting
/// exactly that certificate asks for `/`.
fn https_through_the_gateway(mesh: &LocalMesh) -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["demo.example.com".to_owned()])?.self_signed(&key)?;
    let indent = |pem: &str| pem.lines().map(|l| format!("    {l}\n")).collect::<String>();
    let yaml = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: demo-cert, namespace: istio-system}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}---\n\
         apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: demo-gateway-https, namespace: demo}}\nspec:\n  selector: {{istio: ingressgateway}}\n  servers:\n\
         \x20 - port: {{number: 443, name: https, protocol: HTTPS}}\n    hosts: [demo.example.com]\n    tls: {{mode: SIMPLE, credentialName: demo-cert, minProtocolVersion: TLSV1_2}}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: frontend-edge-https, namespace: demo}}\nspec:\n  hosts: [demo.example.com]\n  gateways: [demo-gateway-https]\n\
         \x20 http:\n  - route: [{{destination: {{host: frontend, subset: v1, port: {{number: 8080}}}}}}]\n",
        indent(&cert.pem()),
        indent(&key.serialize_pem())
    );
    println!("== applying a Secret (a self-signed certificate for demo.example.com), a Gateway with an HTTPS server naming it, and a VirtualService bound to it");
    mesh.apply("demo-https", Some(&yaml))?;
    let lb = mesh.load_balancer_ip("istio-system", "istio-ingressgateway").expect("checked");
    let addr = std::net::SocketAddrV4::new(lb, 443);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(cert.der().to_vec()))?;
    let cfg = std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let (version, reply) = loop {
        let attempt = || -> anyhow::Result<(String, String)> {
            let tcp = std::net::TcpStream::connect_timeout(&addr.into(), Duration::from_secs(2))?;
            tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
            let conn = rustls::ClientConnection::new(cfg.clone(), "demo.example.com".try_into()?)?;
            let mut s = rustls::StreamOwned::new(conn, tcp);
            s.write_all(b"GET / HTTP/1.1\r\nHost: demo.example.com\r\nConnection: close\r\n\r\n")?;
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            let version = format!("{:?}", s.conn.protocol_version().unwrap_or(rustls::ProtocolVersion::Unknown(0)));
            let text = String::from_utf8_lossy(&out).to_string();
            anyhow::ensure!(text.starts_with("HTTP/1.1 200"), "answered {:?}", text.lines().next().unwrap_or_default());
            Ok((version, text.split_once("\r\n\r\n").map(|(_, b)| b.trim().to_owned()).unwrap_or_default()))
        };
        match attempt() {
            Ok(r) => break r,
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    println!("== this machine -> https://{addr}/ (SNI demo.example.com, {version}, the certificate from the Secret)  (outside -> ingress gateway -> enrolled)");
    println!("   HTTP/1.1 200 OK: {reply}");
    Ok(())
}

/// One HTTP/1.1 GET from this machine (outside the cluster) to `addr`
/// with `host` as the Host header: the status line and the body.
pub fn get_from_host(addr: std::net::SocketAddrV4, host: &str, path: &str) -> anyhow::Result<(String, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    Ok((head.lines().next().unwrap_or_default().to_owned(), body.trim().to_owned()))
}

fn call(mesh: &LocalMesh, ns: &str, from: &str, url: &str) -> anyhow::Result<String> {
    let pod = mesh.pod(ns, from);
    let out = mesh.exec(pod, &["skiff-demo-app", "http-get", url], Duration::from_secs(15))?;
    if !out.status.success() {
        bail!("{ns}/{from} -> {url} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Waits until `url` answers from `ns/from` (apps start asynchronously).
fn wait_serving(mesh: &LocalMesh, ns: &str, from: &str, url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match call(mesh, ns, from, url) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Runs the example traffic and reports what was captured. Fails when the
/// mesh did not capture what it should, or captured what it should not.
pub fn run(mesh: &LocalMesh) -> anyhow::Result<()> {
    print_topology(mesh)?;
    wait_serving(mesh, "legacy", "loadgen", "http://web.legacy:8080/")?;
    wait_serving(mesh, "demo", "loadgen", "http://frontend:8080/")?;
    let scenarios: [(&str, &str, &str, (&str, &str), &str, bool, bool); 3] = [
        ("demo", "loadgen", "http://frontend:8080/", ("demo", "frontend"), "enrolled -> enrolled", true, true),
        ("legacy", "loadgen", "http://frontend.demo:8080/", ("demo", "frontend"), "not enrolled -> enrolled", false, true),
        ("legacy", "loadgen", "http://web.legacy:8080/", ("legacy", "web"), "not enrolled -> not enrolled", false, false),
    ];
    println!();
    let mut failures = Vec::new();
    for (ns, from, url, dst, what, want_out, want_in) in scenarios {
        let before = counts(mesh, (ns, from), dst)?;
        let mut replies = Vec::new();
        for _ in 0..3 {
            replies.push(call(mesh, ns, from, url)?);
        }
        // ztunnel counts a connection when it closes its side; give it a beat.
        std::thread::sleep(Duration::from_millis(300));
        let after = counts(mesh, (ns, from), dst)?;
        let (out, inb) = (after.0 - before.0, after.1 - before.1);
        println!("== {ns}/{from} -> {url}  ({what})");
        for r in &replies {
            println!("   reply: {r}");
        }
        println!(
            "   ztunnel saw: {out} connection(s) leaving {ns}/{from}, {inb} arriving at {}/{}",
            dst.0, dst.1
        );
        let captured_out = out > 0.0;
        let captured_in = inb > 0.0;
        println!(
            "   outbound {}, inbound {}",
            if captured_out { "CAPTURED" } else { "not captured" },
            if captured_in { "CAPTURED" } else { "not captured" }
        );
        if captured_out != want_out || captured_in != want_in {
            failures.push(format!("{what}: expected outbound captured={want_out} inbound captured={want_in}"));
        }
    }
    // From this machine, through the ingress gateway's LoadBalancer
    // address (examples/two-tier/gateway.yaml routes demo.example.com).
    if let Some(lb) = mesh.load_balancer_ip("istio-system", "istio-ingressgateway") {
        let addr = std::net::SocketAddrV4::new(lb, 80);
        let before = counts(mesh, ("istio-system", "istio-ingressgateway"), ("demo", "frontend"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let (status, body) = loop {
            match get_from_host(addr, "demo.example.com", "/") {
                Ok((st, b)) if st.contains(" 200") => break (st, b),
                r if Instant::now() > deadline => bail!("the ingress gateway at {addr} did not answer 200 for demo.example.com: {r:?}"),
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        std::thread::sleep(Duration::from_millis(300));
        let after = counts(mesh, ("istio-system", "istio-ingressgateway"), ("demo", "frontend"))?;
        println!("== this machine -> http://{addr}/ (Host: demo.example.com)  (outside -> ingress gateway -> enrolled)");
        println!("   {status}: {body}");
        let inb = after.1 - before.1;
        println!("   ztunnel saw: {inb} connection(s) arriving at demo/frontend over HBONE from the gateway");
        if inb <= 0.0 {
            failures.push("outside -> ingress gateway -> enrolled: nothing arrived at demo/frontend through ztunnel".into());
        }
        // The canary: the gateway's weighted route, seen in which
        // frontend answered.
        let (mut v1, mut v2, mut other) = (0, 0, 0);
        for _ in 0..100 {
            match get_from_host(addr, "demo.example.com", "/") {
                Ok((st, b)) if st.contains(" 200") && b.starts_with("frontend frontend-v2-") => v2 += 1,
                Ok((st, b)) if st.contains(" 200") && b.starts_with("frontend frontend-") => v1 += 1,
                _ => other += 1,
            }
        }
        println!("== this machine -> http://{addr}/ x100  (the canary: VirtualService demo/frontend-edge sends 90% to v1, 10% to v2)");
        println!("   answered by frontend v1: {v1}, by frontend v2: {v2}{}", if other > 0 { format!(", failed: {other}") } else { String::new() });
        if other > 0 || v1 == 0 {
            failures.push(format!("the canary through the ingress gateway: {v1} to v1, {v2} to v2, {other} failed"));
        }
    }
    if mesh.load_balancer_ip("istio-system", "istio-ingressgateway").is_some() {
        if let Err(e) = https_through_the_gateway(mesh) {
            failures.push(format!("outside -> ingress gateway (HTTPS) -> enrolled: {e:#}"));
        }
    }
    println!("\nKernel-side capture counters (skiff-node-agent inspect):");
    for i in 0..mesh.nodes.len() {
        let state = mesh.inspect(i)?;
        println!("  {}: {} pods enrolled, {}", mesh.nodes[i].name, state["enrolled"].as_array().map_or(0, |a| a.len()), state["stats"]);
    }
    if !failures.is_empty() {
        bail!("the mesh did not behave as expected:\n  {}", failures.join("\n  "));
    }
    println!("\nDemo passed: enrolled pods' traffic went through ztunnel; the rest went direct; requests from outside came in through the ingress gateway.");
    Ok(())
}
