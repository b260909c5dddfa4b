//! Feeds arbitrary bytes to the waypoint's downstream HTTP server as one
//! CONNECT stream would carry them — HTTP/1.1, or HTTP/2 when the first
//! byte is odd (the preface is added) — with the waypoint's own bounds and
//! its whole request pipeline: normalization, routing by a VirtualService
//! with direct responses, redirects, rewrites, CORS, header operations, an
//! abort fault and L7 policy, to a Service with no ready endpoint (so no
//! request leaves the process). Nothing may panic or hang.
#![no_main]

use std::{net::SocketAddrV4, sync::{Arc, OnceLock}, time::Duration};

use libfuzzer_sys::fuzz_target;
use skiff_core::{k8s, model::Snapshot};
use skiff_hbone::{certs::CertManager, identity::{Ca, Identity}};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {skiff.dev/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: reviews}
  ports: [{name: http, port: 9080, targetPort: 8080}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /direct}}]
    directResponse: {status: 200, body: {string: "hello"}}
  - match: [{uri: {prefix: /moved}}]
    redirect: {uri: /new, redirectCode: 301}
  - match: [{uri: {prefix: /abort}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: reviews}}]
  - match: [{headers: {x-user: {regex: "j.*"}}}]
    rewrite: {uri: /v2}
    headers: {request: {set: {x-dest: v2}}, response: {add: {x-seen: "1"}}}
    route: [{destination: {host: reviews}}]
    corsPolicy: {allowOrigins: [{exact: "https://a.example"}], allowMethods: [GET, POST]}
  - route: [{destination: {host: reviews}}]
    retries: {attempts: 2, retryOn: 5xx}
    timeout: 1s
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"#;

fn proxy() -> &'static (tokio::runtime::Runtime, Arc<skiff_l7::Proxy>) {
    static P: OnceLock<(tokio::runtime::Runtime, Arc<skiff_l7::Proxy>)> = OnceLock::new();
    P.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let objects = k8s::parse_documents(CLUSTER).expect("fixture parses").into_iter().map(|o| ("fuzz.yaml".to_owned(), o)).collect();
        let snap = Arc::new(Snapshot::from_objects(objects).expect("fixture is valid"));
        let (tx, rx) = tokio::sync::watch::channel(snap);
        std::mem::forget(tx);
        let certs = CertManager::new(Ca::generate("cluster.local").expect("CA"), Duration::from_secs(3600)).expect("certs");
        let cfg = skiff_l7::Config {
            name: "waypoint".into(),
            pod_name: None,
            namespace: "shop".into(),
            service_account: "waypoint".into(),
            hbone: Default::default(),
            http: skiff_l7::server::HttpLimits { header_read_timeout: Duration::from_millis(200), ..Default::default() },
            read_secrets: false,
        };
        let p = rt.block_on(async { skiff_l7::Proxy::new(cfg, rx, certs) });
        (rt, p)
    })
}

fuzz_target!(|data: &[u8]| {
    let (rt, proxy) = proxy();
    rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut input = Vec::new();
        if data.first().is_some_and(|b| b % 2 == 1) {
            input.extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
            input.extend_from_slice(&data[1..]);
        } else {
            input.extend_from_slice(data);
        }
        let writer = async move {
            let _ = client.write_all(&input).await;
            let _ = client.shutdown().await;
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink).await;
        };
        let target: SocketAddrV4 = "10.96.0.10:9080".parse().unwrap();
        let peer = "10.244.1.5:40000".parse().unwrap();
        let serve = proxy.serve_http(target, peer, Identity::new("cluster.local", "shop", "client"), server);
        let done = tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(writer, serve) }).await;
        assert!(done.is_ok(), "the waypoint's HTTP server did not finish with its input");
    });
});
