//! Traces exported (issue 15, item 3): the waypoint and the ingress gateway
//! record a server and a client span per request and export them — over
//! OTLP/HTTP protobuf and as Zipkin v2 JSON — to a collector in the mesh's
//! cluster (`skiff-demo-app trace-collector`, which decodes OTLP with the
//! OpenTelemetry protobuf definitions). The spans form one trace with the
//! caller's span as parent, and the backend receives the client span as
//! its parent; a proxy sampling 0% of new traces exports none of them,
//! and still keeps a caller's decision to sample.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddrV4, TcpStream},
    time::Duration,
};

use serde_json::Value;
use skiff_e2e::*;

const WAIT: Duration = Duration::from_secs(60);
const T1: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const T2: &str = "5bf92f3577b34da6a3ce929d0e0e4737";
const PARENT: &str = "00f067aa0ba902b7";

/// The spans the collector has logged, by format.
fn spans(mesh: &LocalMesh, format: &str, trace: &str) -> Vec<Value> {
    server_events(mesh.pod("observability", "collector")).into_iter().filter(|e| e["event"] == "span" && e["format"] == format && e["trace_id"] == trace).collect()
}

/// The traceparent the backend reported for a request.
fn seen_traceparent(body: &str) -> String {
    body.split_whitespace().find_map(|w| w.strip_prefix("traceparent=")).unwrap_or_else(|| panic!("no traceparent in {body}")).to_owned()
}

fn by_kind(spans: &[Value], kind: &str) -> Vec<Value> {
    spans.iter().filter(|s| s["kind"].as_str().is_some_and(|k| k.eq_ignore_ascii_case(kind))).cloned().collect()
}

fn gateway_get(ip: std::net::Ipv4Addr, path: &str, extra: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&SocketAddrV4::new(ip, 80).into(), Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: shop.example.com\r\n{extra}Connection: close\r\n\r\n").as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.starts_with("HTTP/1.1 200").then_some(out)
}

#[test]
fn spans_of_the_waypoint_and_the_gateway_reach_the_collector_as_one_trace() {
    let Some(mesh) = mesh("manifests/tracing") else { return };
    wait_listening_on(mesh.pod("shop", "reviews-v1"), 8080);
    wait_listening_on(mesh.pod("observability", "collector"), 4318);

    // Client → waypoint → backend, the client's own span as parent.
    let header = format!("traceparent: 00-{T1}-{PARENT}-01");
    let body = eventually(WAIT, "a request through the waypoint", || {
        let out = mesh
            .exec(mesh.pod("shop", "client"), &["skiff-demo-app", "http-load", "--url", "http://reviews:9080/traced", "--count", "1", "--header", &header], WAIT)
            .ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["codes"]["200"] == 1).then(|| v["bodies"][0].as_str().unwrap_or_default().to_owned())
    });
    let backend_saw = seen_traceparent(&body);
    let parts: Vec<&str> = backend_saw.split('-').collect();
    assert_eq!((parts[0], parts[1], parts[3]), ("00", T1, "01"), "the backend continues the client's trace: {backend_saw}");
    for format in ["otlp", "zipkin"] {
        let got = eventually(WAIT, &format!("the waypoint's spans over {format}"), || {
            let s = spans(&mesh, format, T1);
            (by_kind(&s, "server").len() == 1 && by_kind(&s, "client").len() == 1).then_some(s)
        });
        let (server, client) = (&by_kind(&got, "server")[0], &by_kind(&got, "client")[0]);
        assert_eq!(server["parent_span_id"], PARENT, "{format}: the server span's parent is the caller's span: {server}");
        assert_eq!(client["parent_span_id"], server["span_id"], "{format}: the client span is the server span's child: {client}");
        assert_eq!(client["span_id"], parts[2], "{format}: the backend's parent is the client span");
        assert_eq!(server["service"], "waypoint.shop", "{format}: {server}");
        assert_eq!(server["name"], "reviews.shop.svc.cluster.local:9080/*", "{format}: {server}");
        let attrs = &server["attributes"];
        assert_eq!(attrs["http.method"], "GET", "{format}: {attrs}");
        assert_eq!(attrs["http.url"], "http://reviews/traced", "{format}: {attrs}");
        assert_eq!(attrs["http.status_code"], "200", "{format}: {attrs}");
        assert_eq!(attrs["istio.namespace"], "shop", "{format}: {attrs}");
        assert_eq!(attrs["component"], "proxy", "{format}: {attrs}");
        assert_eq!(client["attributes"]["upstream_cluster"], "outbound|9080||reviews.shop.svc.cluster.local", "{format}: {client}");
    }

    // Host → gateway (0% of new traces) → waypoint → backend.
    let ip = mesh.load_balancer_ip("istio-system", "istio-ingressgateway").expect("a LoadBalancer address");
    let unsampled = eventually(WAIT, "a request through the gateway", || gateway_get(ip, "/new-trace", ""));
    let tp = seen_traceparent(&unsampled);
    let fields: Vec<&str> = tp.split('-').collect();
    assert_eq!(fields[3], "00", "a new trace at 0% is not sampled, and says so downstream: {tp}");
    // A caller that decided to sample is followed.
    let sampled = gateway_get(ip, "/sampled", &format!("traceparent: 00-{T2}-{PARENT}-01\r\n")).expect("a sampled request through the gateway");
    let tp2 = seen_traceparent(&sampled);
    assert!(tp2.starts_with(&format!("00-{T2}-")) && tp2.ends_with("-01"), "{tp2}");
    let got = eventually(WAIT, "the gateway's and the waypoint's spans of the sampled trace", || {
        let s = spans(&mesh, "otlp", T2);
        (by_kind(&s, "server").len() == 2 && by_kind(&s, "client").len() == 2).then_some(s)
    });
    let of = |service: &str, kind: &str| -> Value {
        by_kind(&got, kind).into_iter().find(|s| s["service"] == service).unwrap_or_else(|| panic!("no {kind} span of {service}: {got:?}"))
    };
    let (gw_server, gw_client) = (of("istio-ingressgateway.istio-system", "server"), of("istio-ingressgateway.istio-system", "client"));
    let (wp_server, wp_client) = (of("waypoint.shop", "server"), of("waypoint.shop", "client"));
    // One trace, each span the child of the one before it.
    assert_eq!(gw_server["parent_span_id"], PARENT);
    assert_eq!(gw_client["parent_span_id"], gw_server["span_id"]);
    assert_eq!(wp_server["parent_span_id"], gw_client["span_id"], "the waypoint continues the gateway's client span");
    assert_eq!(wp_client["parent_span_id"], wp_server["span_id"]);
    assert_eq!(wp_client["span_id"], tp2.split('-').nth(2).unwrap(), "the backend's parent is the waypoint's client span");
    assert_eq!(gw_server["name"], "reviews.shop.svc.cluster.local:9080/*", "the gateway's span is named after the routed destination: {gw_server}");
    // Past two export intervals, nothing of the unsampled trace arrived.
    std::thread::sleep(Duration::from_secs(3));
    let unsampled_spans = spans(&mesh, "otlp", fields[1]);
    assert!(unsampled_spans.is_empty(), "0% sampling exported {unsampled_spans:?}");
    // Nothing the collector could not decode.
    let bad: Vec<Value> = server_events(mesh.pod("observability", "collector")).into_iter().filter(|e| e["event"] == "bad_export").collect();
    assert!(bad.is_empty(), "{bad:?}");

    // Istio's way: the mesh config's extensionProviders and a Telemetry
    // for the waypoint (targetRefs). Its provider (OTLP only) and custom
    // tag replace the flags' configuration.
    let mesh_config = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\ndata:\n  mesh: |\n    extensionProviders:\n    - name: otel\n      opentelemetry:\n        service: otel-collector.observability.svc.cluster.local\n        port: 4318\n        http: {path: /v1/traces}\n";
    let telemetry = |pct: &str| {
        format!(
            "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: waypoint-tracing, namespace: shop}}\nspec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]\n  tracing:\n  - providers: [{{name: otel}}]\n    randomSamplingPercentage: {pct}\n    customTags: {{team: {{literal: {{value: storefront}}}}}}\n"
        )
    };
    mesh.apply("mesh-config", Some(mesh_config)).unwrap();
    mesh.apply("telemetry", Some(&telemetry("100"))).unwrap();
    let new_trace = |path: &str| -> String {
        let out = mesh.exec(mesh.pod("shop", "client"), &["skiff-demo-app", "http-load", "--url", &format!("http://reviews:9080{path}"), "--count", "1"], WAIT).unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        seen_traceparent(v["bodies"][0].as_str().unwrap_or_default())
    };
    // Once the Telemetry is in force, spans carry its tag.
    let (tagged_trace, tagged) = eventually(WAIT, "spans configured by the Telemetry", || {
        let tp = new_trace("/telemetry");
        let trace = tp.split('-').nth(1)?.to_owned();
        std::thread::sleep(Duration::from_millis(1500));
        let s = spans(&mesh, "otlp", &trace);
        s.iter().any(|sp| sp["attributes"]["team"] == "storefront").then_some((trace, s))
    });
    assert_eq!(by_kind(&tagged, "server").len(), 1, "{tagged:?}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(spans(&mesh, "zipkin", &tagged_trace).is_empty(), "the Telemetry's provider (OTLP) replaces the flags' (OTLP and Zipkin)");
    // 0%: new traces are not sampled, and nothing is exported for them.
    mesh.apply("telemetry", Some(&telemetry("0"))).unwrap();
    let unsampled = eventually(WAIT, "the Telemetry's 0% sampling in force", || {
        let tp = new_trace("/zero");
        tp.ends_with("-00").then_some(tp)
    });
    let trace = unsampled.split('-').nth(1).unwrap().to_owned();
    std::thread::sleep(Duration::from_secs(3));
    let exported: Vec<Value> = ["otlp", "zipkin"].iter().flat_map(|f| spans(&mesh, f, &trace)).collect();
    assert!(exported.is_empty(), "a Telemetry at 0% exported {exported:?}");
}
