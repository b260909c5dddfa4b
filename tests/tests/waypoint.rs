//! End-to-end tests of the waypoint: a Service with two versions behind a
//! waypoint, in the local mesh. Traffic: client ztunnel → (HBONE) waypoint →
//! (HBONE) the chosen pod's ztunnel → app.

use std::time::Duration;

use skiff_e2e::*;

const WAIT: Duration = Duration::from_secs(20);

struct Load {
    codes: serde_json::Value,
    versions: serde_json::Value,
    latency_ms: Vec<u64>,
    bodies: Vec<String>,
    /// `location`, `x-*` and `access-control-*` response headers (`name:
    /// value`) of the first five responses.
    headers: Vec<Vec<String>>,
}

fn load(mesh: &LocalMesh, url: &str, count: usize, headers: &[&str]) -> Load {
    load_with(mesh, "GET", url, count, headers)
}

fn load_with(mesh: &LocalMesh, method: &str, url: &str, count: usize, headers: &[&str]) -> Load {
    let count = count.to_string();
    let mut argv = vec!["skiff-demo-app", "http-load", "--method", method, "--url", url, "--count", &count];
    for h in headers {
        argv.push("--header");
        argv.push(h);
    }
    let out = mesh.exec(mesh.pod("shop", "client"), &argv, Duration::from_secs(300)).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {} {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)));
    assert!(v.get("error").is_none(), "load failed: {v}");
    Load {
        codes: v["codes"].clone(),
        versions: v["versions"].clone(),
        latency_ms: v["latency_ms"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect(),
        bodies: v["bodies"].as_array().unwrap().iter().map(|b| b.as_str().unwrap().to_owned()).collect(),
        headers: serde_json::from_value(v["headers"].clone()).unwrap_or_default(),
    }
}

fn count(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

fn up() -> Option<LocalMesh> {
    up_from("manifests/l7")
}

/// The L7 mesh from `manifests`, once its backends and waypoint serve.
fn up_from(manifests: &str) -> Option<LocalMesh> {
    let mesh = mesh(manifests)?;
    for p in ["reviews-v1", "reviews-v2", "flaky"] {
        wait_listening(mesh.pod("shop", p));
    }
    // The waypoint serves once it logs so; then a request goes through.
    let wp = mesh.pod("shop", "waypoint");
    eventually(WAIT, "waypoint serving", || {
        std::fs::read_to_string(&wp.log).ok().filter(|l| l.contains("waypoint serving")).map(|_| ())
    });
    Some(mesh)
}

fn vs(name: &str, body: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  hosts: [reviews]\n{body}")
}

/// Applies a VirtualService and waits until the waypoint routes by it
/// (`probe` returns true once the new behaviour is visible).
fn apply_vs(mesh: &LocalMesh, name: &str, yaml: &str, probe: impl Fn(&LocalMesh) -> bool) {
    mesh.apply(name, Some(yaml)).unwrap();
    eventually(WAIT, &format!("VirtualService {name} in force"), || probe(mesh).then_some(()));
}

const URL: &str = "http://reviews:9080/";

#[test]
fn weighted_route_splits_ninety_ten_between_subsets() {
    let Some(mesh) = up() else { return };
    let all_v2 = vs("reviews", "  http:\n  - route: [{destination: {host: reviews, subset: v2}}]\n");
    apply_vs(&mesh, "reviews", &all_v2, |m| count(&load(m, URL, 5, &[]).versions, "v2") == 5);
    let split = vs(
        "reviews",
        "  http:\n  - route:\n    - {destination: {host: reviews, subset: v1}, weight: 90}\n    - {destination: {host: reviews, subset: v2}, weight: 10}\n",
    );
    apply_vs(&mesh, "reviews", &split, |m| count(&load(m, URL, 20, &[]).versions, "v1") > 0);
    let n = 2000;
    let l = load(&mesh, URL, n, &[]);
    assert_eq!(count(&l.codes, "200"), n as u64, "{:?}", l.codes);
    let v2 = count(&l.versions, "v2") as f64 / n as f64;
    // Each request goes to v2 with p = 0.1, independently: the share has
    // sd = sqrt(0.1 * 0.9 / 2000) ≈ 0.0067. ±4 sd ([0.073, 0.127]) fails a
    // correct implementation about once in 16 000 runs.
    assert!((0.073..=0.127).contains(&v2), "v2 share {v2} outside [0.073, 0.127]: {:?}", l.versions);
    assert_eq!(count(&l.versions, "v1") + count(&l.versions, "v2"), n as u64);

    // Relative weights (Istio HTTPRouteDestination.weight): 1/1 is an even
    // split, not a refused config.
    let even = vs(
        "reviews",
        "  http:\n  - route:\n    - {destination: {host: reviews, subset: v1}, weight: 1}\n    - {destination: {host: reviews, subset: v2}, weight: 1}\n",
    );
    apply_vs(&mesh, "reviews", &even, |m| count(&load(m, URL, 40, &[]).versions, "v2") >= 8);
    let l = load(&mesh, URL, n, &[]);
    assert_eq!(count(&l.codes, "200"), n as u64, "{:?}", l.codes);
    let v2 = count(&l.versions, "v2") as f64 / n as f64;
    // p = 0.5: sd = sqrt(0.25 / 2000) ≈ 0.0112; ±4 sd is [0.455, 0.545]
    // (a correct implementation fails about once in 16 000 runs).
    assert!((0.455..=0.545).contains(&v2), "v2 share {v2} outside [0.455, 0.545]: {:?}", l.versions);
}

#[test]
fn header_regex_routing_and_prefix_rewrite() {
    let Some(mesh) = up() else { return };
    let y = vs(
        "reviews",
        r#"  http:
  - name: mobile
    match: [{headers: {user-agent: {regex: ".*Mobile.*"}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - name: legacy-api
    match: [{uri: {prefix: /old/}}]
    rewrite: {uri: /new/}
    route: [{destination: {host: reviews, subset: v1}}]
  - route: [{destination: {host: reviews, subset: v1}}]
"#,
    );
    apply_vs(&mesh, "reviews", &y, |m| count(&load(m, URL, 3, &["User-Agent: Foo Mobile Bar"]).versions, "v2") == 3);
    let mobile = load(&mesh, URL, 20, &["User-Agent: Mozilla/5.0 (iPhone) Mobile Safari"]);
    assert_eq!(count(&mobile.versions, "v2"), 20, "{:?}", mobile.versions);
    let desktop = load(&mesh, URL, 20, &["User-Agent: Mozilla/5.0 (X11; Linux)"]);
    assert_eq!(count(&desktop.versions, "v1"), 20, "{:?}", desktop.versions);
    let rewritten = load(&mesh, "http://reviews:9080/old/items?id=7", 1, &[]);
    assert!(rewritten.bodies[0].contains("path=/new/items?id=7"), "{:?}", rewritten.bodies);
}

#[test]
fn fault_injection_delays_and_aborts_a_share_of_requests() {
    let Some(mesh) = up() else { return };
    let y = vs(
        "reviews",
        r#"  http:
  - match: [{uri: {prefix: /abort}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 50}}}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /delay}}]
    fault: {delay: {fixedDelay: 400ms, percentage: {value: 50}}}
    route: [{destination: {host: reviews, subset: v1}}]
  - route: [{destination: {host: reviews, subset: v1}}]
"#,
    );
    apply_vs(&mesh, "reviews", &y, |m| count(&load(m, "http://reviews:9080/abort", 10, &[]).codes, "503") > 0);
    // n = 200, p = 0.5: sd ≈ 7.1; ±4 sd is [72, 128].
    let aborts = load(&mesh, "http://reviews:9080/abort", 200, &[]);
    let a = count(&aborts.codes, "503");
    assert!((72..=128).contains(&a), "aborted {a} of 200: {:?}", aborts.codes);
    assert_eq!(a + count(&aborts.codes, "200"), 200);
    // n = 60, p = 0.5: sd ≈ 3.9; ±4 sd is [15, 45]. Each delayed request's
    // own latency is at least the configured 400 ms.
    let delays = load(&mesh, "http://reviews:9080/delay", 60, &[]);
    assert_eq!(count(&delays.codes, "200"), 60);
    let delayed = delays.latency_ms.iter().filter(|l| **l >= 400).count();
    assert!((15..=45).contains(&delayed), "delayed {delayed} of 60: {:?}", delays.latency_ms);
}

#[test]
fn retries_recover_a_failing_first_attempt_and_timeouts_answer_504() {
    let Some(mesh) = up() else { return };
    let flaky = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: flaky, namespace: shop}\nspec:\n  hosts: [flaky]\n  http:\n  - retries: {attempts: 2, retryOn: 5xx}\n    route: [{destination: {host: flaky}}]\n";
    mesh.apply("flaky", Some(flaky)).unwrap();
    let timeout = vs("reviews", "  http:\n  - timeout: 500ms\n    route: [{destination: {host: reviews, subset: v1}}]\n");
    apply_vs(&mesh, "reviews", &timeout, |m| count(&load(m, "http://reviews:9080/slow", 1, &[]).codes, "504") == 1);
    // flaky answers 503 to its first request only: the retry turns it into a success.
    let l = load(&mesh, "http://flaky/", 1, &[]);
    assert_eq!(count(&l.codes, "200"), 1, "{:?} {:?}", l.codes, l.bodies);
    let t = load(&mesh, "http://reviews:9080/slow", 3, &[]);
    assert_eq!(count(&t.codes, "504"), 3, "{:?}", t.codes);
    assert!(t.latency_ms.iter().all(|l| (450..1900).contains(l)), "timed out near 500 ms: {:?}", t.latency_ms);
}

#[test]
fn invalid_virtual_service_is_rejected_and_the_previous_one_keeps_serving() {
    let Some(mesh) = up() else { return };
    let good = vs("reviews", "  http:\n  - route: [{destination: {host: reviews, subset: v2}}]\n");
    apply_vs(&mesh, "reviews", &good, |m| count(&load(m, URL, 5, &[]).versions, "v2") == 5);
    // Weights adding to 0: refused (Istio's validation), naming the field.
    let bad = vs(
        "reviews",
        "  http:\n  - route:\n    - {destination: {host: reviews, subset: v1}, weight: 0}\n    - {destination: {host: reviews, subset: v2}, weight: 0}\n",
    );
    mesh.apply("reviews", Some(&bad)).unwrap();
    let wp = mesh.pod("shop", "waypoint");
    eventually(WAIT, "refusal logged", || {
        std::fs::read_to_string(&wp.log).ok().filter(|l| {
            l.contains("config object refused") && l.contains("VirtualService shop/reviews") && l.contains("spec.http[0].route") && l.contains("add to 0")
                && l.contains("the last accepted version keeps serving")
        }).map(|_| ())
    });
    let l = load(&mesh, URL, 50, &[]);
    assert_eq!(count(&l.versions, "v2"), 50, "the previous good config must keep serving: {:?}", l.versions);
}

#[test]
fn trace_context_is_generated_or_kept() {
    let Some(mesh) = up() else { return };
    let fresh = load(&mesh, URL, 1, &[]);
    let body = &fresh.bodies[0];
    let tp = body.split_whitespace().find_map(|w| w.strip_prefix("traceparent=")).unwrap();
    let b3 = body.split_whitespace().find_map(|w| w.strip_prefix("x-b3-traceid=")).unwrap();
    assert!(tp.starts_with("00-") && tp.len() == 55, "a traceparent was generated: {body}");
    assert_eq!(&tp[3..35], b3, "B3 and W3C carry the same trace id: {body}");
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let kept = load(&mesh, URL, 1, &[&format!("traceparent: 00-{trace}-00f067aa0ba902b7-01")]);
    let body = &kept.bodies[0];
    let tp = body.split_whitespace().find_map(|w| w.strip_prefix("traceparent=")).unwrap();
    assert_eq!(&tp[3..35], trace, "the incoming trace id is kept: {body}");
    assert_ne!(&tp[36..52], "00f067aa0ba902b7", "the waypoint sets its own span id: {body}");
    assert!(body.contains(&format!("x-b3-traceid={trace}")), "{body}");
}

#[test]
fn l7_authorization_allows_get_public_and_denies_post_admin() {
    let Some(mesh) = up() else { return };
    let policy = |name: &str, body: &str| {
        format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]\n{body}")
    };
    let allow = policy("allow-public", "  action: ALLOW\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]\n    to: [{operation: {methods: [GET], paths: [\"/public*\"]}}]\n");
    let deny = policy("deny-admin", "  action: DENY\n  rules: [{to: [{operation: {methods: [POST], paths: [/admin]}}]}]\n");
    mesh.apply("deny-admin", Some(&deny)).unwrap();
    apply_vs(&mesh, "allow-public", &allow, |m| count(&load(m, "http://reviews:9080/private", 1, &[]).codes, "403") == 1);
    let public = load(&mesh, "http://reviews:9080/public/page", 5, &[]);
    assert_eq!(count(&public.codes, "200"), 5, "{:?}", public.codes);
    let admin = load_with(&mesh, "POST", "http://reviews:9080/admin", 3, &[]);
    assert_eq!(count(&admin.codes, "403"), 3, "{:?}", admin.codes);
    assert!(admin.bodies[0].contains("RBAC: access denied"), "{:?}", admin.bodies);
    // Normalized before policy: these are /admin, not /public/...
    for sneaky in ["http://reviews:9080/public/../admin", "http://reviews:9080/public/%2e%2e/admin"] {
        let l = load(&mesh, sneaky, 1, &[]);
        assert_eq!(count(&l.codes, "403"), 1, "{sneaky}: {:?}", l.codes);
    }
    let encoded_slash = load(&mesh, "http://reviews:9080/public%2F..%2Fadmin", 1, &[]);
    assert_eq!(count(&encoded_slash.codes, "400"), 1, "{:?}", encoded_slash.codes);
    let post_public = load_with(&mesh, "POST", "http://reviews:9080/public/page", 1, &[]);
    assert_eq!(count(&post_public.codes, "403"), 1, "only GET is allowed: {:?}", post_public.codes);
    let wp = std::fs::read_to_string(&mesh.pod("shop", "waypoint").log).unwrap();
    assert!(wp.contains("request denied by authorization policy"), "denials are logged");
    // The access lines name the decision: the waypoint's 403 is told from
    // an application's (issue 16: skiff observe's verdict).
    let access = |path: &str, method: &str| {
        wp.lines().find(|l| l.contains("request complete") && l.contains(&format!("path={path} ")) && l.contains(&format!("method={method} "))).unwrap_or_else(|| panic!("no access line for {method} {path}")).to_owned()
    };
    let admin = access("/admin", "POST");
    assert!(admin.contains("code=403") && admin.contains("policy=deny (shop/deny-admin rule 0: DENY policy matched)"), "{admin}");
    let public = access("/public/page", "GET");
    assert!(public.contains("code=200") && public.contains("policy=allow (shop/allow-public rule 0:"), "{public}");
}

#[test]
fn grpc_goes_through_the_waypoint_with_status_in_trailers() {
    let Some(mesh) = up() else { return };
    wait_listening(mesh.pod("shop", "grpc-echo"));
    let call = |message: &str| {
        let out = mesh
            .exec(
                mesh.pod("shop", "client"),
                &["skiff-grpc-probe", "client", "--url", "http://grpc-echo:9090/skiff.Echo/Say", "--message", message],
                Duration::from_secs(30),
            )
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
        v
    };
    let ok = eventually(WAIT, "gRPC call through the waypoint", || Some(call("hello")).filter(|v| v["http_status"] == 200));
    assert_eq!(ok["reply"], "echo: hello", "{ok}");
    assert_eq!(ok["grpc_status"], "0", "{ok}");
    assert_eq!(ok["status_in_trailers"], true, "{ok}");
    let fail = call("fail");
    assert_eq!(fail["grpc_status"], "14", "an error status travels in the trailers: {fail}");
    assert_eq!(fail["grpc_message"], "backend unavailable", "{fail}");
    let metrics = mesh.pod("shop", "waypoint");
    let log = std::fs::read_to_string(&metrics.log).unwrap();
    assert!(log.contains("/skiff.Echo/Say"), "the waypoint handled the call at L7");
}

fn load_parallel(mesh: &LocalMesh, url: &str, parallel: usize) -> Vec<serde_json::Value> {
    let p = parallel.to_string();
    let out = mesh
        .exec(mesh.pod("shop", "client"), &["skiff-demo-app", "http-load", "--url", url, "--count", "1", "--parallel", &p], Duration::from_secs(60))
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn circuit_breaking_answers_503_uo_when_the_pool_overflows() {
    let Some(mesh) = up() else { return };
    // At most 1 connection + 1 pending request to `slow`; /slow takes 2 s.
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: slow, namespace: shop}\nspec:\n  host: slow\n  trafficPolicy:\n    connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}\n";
    mesh.apply("slow-dr", Some(dr)).unwrap();
    let wp = mesh.pod("shop", "waypoint");
    let results = eventually(WAIT, "overflow answered", || {
        let r = load_parallel(&mesh, "http://slow/slow", 6);
        r.iter().any(|v| v["codes"]["503"].as_u64() == Some(1)).then_some(r)
    });
    let ok = results.iter().filter(|v| v["codes"]["200"].as_u64() == Some(1)).count();
    let overflow = results.iter().filter(|v| v["codes"]["503"].as_u64() == Some(1)).count();
    assert_eq!(ok + overflow, 6, "{results:?}");
    assert!(ok >= 1 && ok <= 2, "at most 2 in flight (1 connection + 1 pending): {results:?}");
    let bodies: Vec<String> = results.iter().filter_map(|v| v["bodies"][0].as_str().map(str::to_owned)).collect();
    assert!(bodies.iter().any(|b| b.contains("overflow")), "{bodies:?}");
    eventually(WAIT, "UO in the access log", || {
        std::fs::read_to_string(&wp.log).ok().filter(|l| l.contains("response_flags=UO")).map(|_| ())
    });
}

#[test]
fn outlier_detection_ejects_a_failing_endpoint_and_restores_it() {
    let Some(mesh) = up() else { return };
    wait_listening(mesh.pod("shop", "outlier-good"));
    wait_listening(mesh.pod("shop", "outlier-bad"));
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: outlier, namespace: shop}\nspec:\n  host: outlier\n  trafficPolicy:\n    outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 3s, maxEjectionPercent: 100}\n";
    mesh.apply("outlier-dr", Some(dr)).unwrap();
    // Retries off, so the client sees what each endpoint answers (Istio's
    // default policy would retry the bad pod's 503s on the good one).
    let no_retries = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: outlier, namespace: shop}\nspec:\n  hosts: [outlier]\n  http:\n  - retries: {attempts: 0}\n    route: [{destination: {host: outlier}}]\n";
    mesh.apply("outlier-vs", Some(no_retries)).unwrap();
    let wp = mesh.pod("shop", "waypoint");
    // Round robin alternates; two failures in a row from the bad pod eject it.
    eventually(WAIT, "ejection", || {
        let _ = load(&mesh, "http://outlier/", 6, &[]);
        std::fs::read_to_string(&wp.log).ok().filter(|l| l.contains("outlier detection: endpoint ejected")).map(|_| ())
    });
    let while_ejected = load(&mesh, "http://outlier/", 20, &[]);
    assert_eq!(count(&while_ejected.codes, "200"), 20, "only the healthy pod serves while the other is ejected: {:?}", while_ejected.codes);
    assert_eq!(count(&while_ejected.versions, "good"), 20);
    // After the ejection time the endpoint is back in rotation (and fails again).
    std::thread::sleep(Duration::from_millis(3500));
    let restored = load(&mesh, "http://outlier/", 4, &[]);
    assert!(count(&restored.codes, "503") >= 1, "the ejected endpoint was restored: {:?}", restored.codes);
}

#[test]
fn rate_limits_no_route_direct_responses_header_ops_and_request_metrics() {
    let Some(mesh) = up() else { return };
    let y = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: shop
  annotations: {skiff.dev/local-rate-limit.limited: 3/m}
spec:
  hosts: [reviews]
  http:
  - name: limited
    match: [{uri: {prefix: /limited}}]
    route: [{destination: {host: reviews, subset: v1}}]
  - name: canned
    match: [{uri: {exact: /canned}}]
    directResponse: {status: 418, body: {string: "short and stout"}}
  - name: decorated
    match: [{uri: {prefix: /decorated}}]
    headers:
      request: {set: {x-added: yes-please}}
      response: {set: {x-served-by: skiff-waypoint}}
    route: [{destination: {host: reviews, subset: v2}}]
"#;
    apply_vs(&mesh, "reviews", y, |m| count(&load(m, "http://reviews:9080/canned", 1, &[]).codes, "418") == 1);
    // Token bucket of 3 per minute: 3 pass, the rest get 429.
    let limited = load(&mesh, "http://reviews:9080/limited", 6, &[]);
    assert_eq!((count(&limited.codes, "200"), count(&limited.codes, "429")), (3, 3), "{:?}", limited.codes);
    // No route matches: Istio's 404 with flag NR.
    let none = load(&mesh, "http://reviews:9080/nowhere", 1, &[]);
    assert_eq!(count(&none.codes, "404"), 1, "{:?}", none.codes);
    let canned = load(&mesh, "http://reviews:9080/canned", 1, &[]);
    assert_eq!(canned.bodies[0], "short and stout");
    let decorated = load(&mesh, "http://reviews:9080/decorated", 1, &[]);
    assert_eq!(count(&decorated.versions, "v2"), 1, "{:?}", decorated.bodies);
    // Request metrics with Istio's labels, read from the waypoint.
    let wp = mesh.pod("shop", "waypoint");
    let (status, text) = mesh.pod_http_get(wp, 15020, "/metrics").unwrap();
    assert_eq!(status, 200);
    let sum = |labels: &[(&str, &str)]| skiff_localmesh::mesh::sum_metric(&text, "istio_requests_total", labels);
    assert!(sum(&[("reporter", "waypoint"), ("response_code", "429"), ("response_flags", "RL")]) >= 3.0, "{text}");
    assert!(sum(&[("response_code", "404"), ("response_flags", "NR")]) >= 1.0);
    assert!(sum(&[("destination_version", "v2"), ("source_principal", "spiffe://cluster.local/ns/shop/sa/client"), ("response_code", "200")]) >= 1.0);
    assert!(text.contains("istio_request_duration_milliseconds_bucket"), "duration histogram exported");
    assert!(text.contains("le=\"3600000\""), "Istio's duration buckets, up to an hour");
    // Body sizes: the teapot's canned body is 15 bytes ("short and
    // stout"), counted as it was sent: in the 100-byte bucket, not the
    // 10-byte one.
    let canned_bucket = |le: &str| {
        skiff_localmesh::mesh::sum_metric(&text, "istio_response_bytes_bucket", &[("destination_service", "reviews.shop.svc.cluster.local"), ("response_code", "418"), ("le", le)])
    };
    assert!(canned_bucket("100") > canned_bucket("10"), "response sizes: {text}");
    assert!(skiff_localmesh::mesh::sum_metric(&text, "istio_request_bytes_count", &[("reporter", "waypoint")]) >= 1.0, "request sizes: {text}");
}

#[test]
fn mirrored_requests_reach_the_shadow_destination() {
    let Some(mesh) = up() else { return };
    let y = vs(
        "reviews",
        "  http:\n  - route: [{destination: {host: reviews, subset: v1}}]\n    mirror: {host: reviews, subset: v2}\n    mirrorPercentage: {value: 100}\n",
    );
    apply_vs(&mesh, "reviews", &y, |m| {
        let _ = load(m, "http://reviews:9080/mirrored", 1, &[]);
        // Only a mirrored copy carries the -shadow authority.
        server_events(m.pod("shop", "reviews-v2"))
            .iter()
            .any(|e| e["event"] == "request" && e["host"].as_str().is_some_and(|h| h.ends_with("-shadow")))
    });
    let l = load(&mesh, "http://reviews:9080/mirrored", 10, &[]);
    assert_eq!(count(&l.versions, "v1"), 10, "answers come from the primary destination: {:?}", l.versions);
    let v2 = mesh.pod("shop", "reviews-v2");
    eventually(WAIT, "copies at v2", || {
        let copies = server_events(v2)
            .iter()
            .filter(|e| e["event"] == "request" && e["path"] == "/mirrored" && e["host"].as_str().is_some_and(|h| h.ends_with("-shadow")))
            .count();
        // The probe's requests were mirrored too: at least the 10 measured.
        (copies >= 10).then_some(())
    });
}

#[test]
fn routes_without_retries_get_istios_default_retry_policy() {
    let Some(mesh) = up() else { return };
    // flaky answers 503 to its first request; no VirtualService names it,
    // so the default policy (2 retries on 503) turns that into a success.
    let l = load(&mesh, "http://flaky/", 1, &[]);
    assert_eq!(count(&l.codes, "200"), 1, "{:?} {:?}", l.codes, l.bodies);
    let served = server_events(mesh.pod("shop", "flaky")).iter().filter(|e| e["event"] == "request").count();
    assert_eq!(served, 2, "one failed attempt, one retry");
}

/// A VirtualService bound only to a Gateway (`gateways: [my-gateway]`,
/// `hosts: ["*"]`) applies to no mesh traffic (Istio VirtualService
/// `gateways`: `mesh` is implied only when the field is omitted): neither
/// in another namespace nor in the waypoint's own does it change routing.
#[test]
fn a_gateway_bound_virtual_service_does_not_route_mesh_traffic() {
    let Some(mesh) = up() else { return };
    let both = |m: &LocalMesh| {
        let l = load(m, URL, 40, &[]);
        count(&l.versions, "v1") > 0 && count(&l.versions, "v2") > 0
    };
    assert!(both(&mesh), "without a VirtualService both versions serve");
    let gateway_only = |ns: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: edge, namespace: {ns}}}\nspec:\n  hosts: [\"*\"]\n  gateways: [istio-system/my-gateway]\n  http:\n  - route: [{{destination: {{host: reviews.shop.svc.cluster.local, subset: v2}}}}]\n")
    };
    mesh.apply("edge-other", Some(&gateway_only("other"))).unwrap();
    mesh.apply("edge-shop", Some(&gateway_only("shop"))).unwrap();
    // A marker applied after them shows the waypoint has read them: a
    // mesh-bound route for another Service.
    let marker = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: marker, namespace: shop}\nspec:\n  hosts: [flaky]\n  http:\n  - directResponse: {status: 299}\n";
    mesh.apply("marker", Some(marker)).unwrap();
    eventually(WAIT, "the waypoint read the new config", || {
        (count(&load(&mesh, "http://flaky:80/", 1, &[]).codes, "299") == 1).then_some(())
    });
    let l = load(&mesh, URL, 200, &[]);
    assert_eq!(count(&l.codes, "200"), 200, "{:?}", l.codes);
    assert!(count(&l.versions, "v1") > 0 && count(&l.versions, "v2") > 0, "a gateway-only VirtualService routed mesh traffic: {:?}", l.versions);
}

/// Istio HTTPRouteDestination.headers, HTTPRewrite.uriRegexRewrite,
/// HTTPRedirect scheme/derivePort and CorsPolicy, through the waypoint:
/// each destination's header operations go with it (request to the picked
/// pod, response back), a regex rewrite reaches the backend, a redirect to
/// https drops the default port, an allowed origin's preflight is answered
/// at the waypoint and its requests get CORS headers.
#[test]
fn destination_headers_regex_rewrites_scheme_redirects_and_cors() {
    let Some(mesh) = up() else { return };
    let y = vs(
        "reviews",
        r#"  http:
  - name: secure
    match: [{uri: {prefix: /secure}}]
    redirect: {scheme: https, derivePort: FROM_PROTOCOL_DEFAULT}
  - name: cors
    match: [{uri: {prefix: /cors}}]
    corsPolicy: {allowOrigins: [{exact: "https://app.example"}], allowMethods: [GET, POST], maxAge: 60s}
    route: [{destination: {host: reviews, subset: v1}}]
  - name: regex
    match: [{uri: {prefix: /service/}}]
    rewrite: {uriRegexRewrite: {match: "^/service/([^/]+)(/.*)$", rewrite: '\2/instance/\1'}}
    route: [{destination: {host: reviews, subset: v1}}]
  - name: split
    route:
    - destination: {host: reviews, subset: v1}
      weight: 1
      headers: {request: {set: {x-dest: to-v1}}, response: {set: {x-picked: v1}}}
    - destination: {host: reviews, subset: v2}
      weight: 1
      headers: {request: {set: {x-dest: to-v2}}, response: {set: {x-picked: v2}}}
"#,
    );
    apply_vs(&mesh, "reviews", &y, |m| count(&load(m, "http://reviews:9080/secure", 1, &[]).codes, "301") == 1);
    let secure = load(&mesh, "http://reviews:9080/secure/page?x=1", 1, &[]);
    assert_eq!(secure.headers[0], ["location: https://reviews/secure/page?x=1"], "{:?}", secure.codes);
    let origin = "Origin: https://app.example";
    let preflight = load_with(&mesh, "OPTIONS", "http://reviews:9080/cors", 1, &[origin, "Access-Control-Request-Method: POST"]);
    assert_eq!(count(&preflight.codes, "200"), 1, "{:?}", preflight.codes);
    assert_eq!(preflight.bodies[0], "", "answered at the waypoint");
    assert_eq!(
        preflight.headers[0],
        ["access-control-allow-origin: https://app.example", "access-control-allow-methods: GET,POST", "access-control-max-age: 60"]
    );
    let actual = load(&mesh, "http://reviews:9080/cors", 1, &[origin]);
    assert!(actual.bodies[0].contains("version=v1"), "{}", actual.bodies[0]);
    assert_eq!(actual.headers[0], ["access-control-allow-origin: https://app.example"]);
    let other = load(&mesh, "http://reviews:9080/cors", 1, &["Origin: https://evil.example"]);
    assert_eq!(other.headers[0], Vec::<String>::new(), "another origin gets no CORS headers");
    let regex = load(&mesh, "http://reviews:9080/service/foo/v1/api", 1, &[]);
    assert!(regex.bodies[0].contains("path=/v1/api/instance/foo "), "{}", regex.bodies[0]);
    // Both destinations get picked within 40 requests (1 - 2 * 2^-40 of
    // the time); each of the first five carries its own destination's
    // request header to the pod and response header back.
    let split = load(&mesh, "http://reviews:9080/anything", 40, &[]);
    assert!(count(&split.versions, "v1") > 0 && count(&split.versions, "v2") > 0, "{:?}", split.versions);
    for (body, headers) in split.bodies.iter().zip(&split.headers) {
        let version = if body.contains("version=v1") { "v1" } else { "v2" };
        assert!(body.contains(&format!("x-dest=to-{version}")), "{body}");
        assert_eq!(headers, &[format!("x-picked: {version}")], "{body}");
    }
}

/// Istio ConsistentHashLB.httpHeaderName through the waypoint: each user's
/// requests all go to one pod of `reviews` (v1 or v2), and users spread
/// over both.
#[test]
fn consistent_hash_keeps_a_user_on_one_pod() {
    let Some(mesh) = up() else { return };
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: sticky, namespace: shop}\nspec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer: {consistentHash: {httpHeaderName: x-user}}\n";
    mesh.apply("sticky-dr", Some(dr)).unwrap();
    let versions = |user: &str| {
        let l = load(&mesh, URL, 8, &[&format!("x-user: {user}")]);
        assert_eq!(count(&l.codes, "200"), 8, "{:?}", l.codes);
        (count(&l.versions, "v1"), count(&l.versions, "v2"))
    };
    // Before the rule is in force, 8 requests of one user land on both
    // pods (round robin); then on one.
    eventually(WAIT, "DestinationRule sticky in force", || {
        let (v1, v2) = versions("probe");
        (v1 == 0 || v2 == 0).then_some(())
    });
    let mut seen = (0, 0);
    // 20 users: all on one pod has probability 2 * 2^-20.
    for u in 0..20 {
        let (v1, v2) = versions(&format!("user-{u}"));
        assert!(v1 == 0 || v2 == 0, "user-{u} was split: v1 {v1}, v2 {v2}");
        seen.0 += v1;
        seen.1 += v2;
    }
    assert!(seen.0 > 0 && seen.1 > 0, "users spread over both pods: {seen:?}");
}

/// Retries never repeat a request the upstream may have processed: a
/// backend that reads the request and closes without answering gets a
/// POST exactly once, even under `retryOn: 5xx`; a GET (idempotent) is
/// retried, each retry on an endpoint not tried yet.
#[test]
fn a_reset_after_the_request_was_written_is_retried_only_when_idempotent() {
    let Some(mesh) = up() else { return };
    let y = vs(
        "reviews",
        "  http:\n  - match: [{uri: {exact: /in-force}}]\n    directResponse: {status: 418}\n  - retries: {attempts: 2, retryOn: 5xx}\n    route: [{destination: {host: reviews}}]\n",
    );
    apply_vs(&mesh, "reviews", &y, |m| count(&load(m, "http://reviews:9080/in-force", 1, &[]).codes, "418") == 1);
    let seen = |m: &LocalMesh, path: &str| -> Vec<usize> {
        ["reviews-v1", "reviews-v2"]
            .iter()
            .map(|p| server_events(m.pod("shop", p)).iter().filter(|e| e["event"] == "request" && e["path"] == path).count())
            .collect()
    };
    let post = load_with(&mesh, "POST", "http://reviews:9080/reset-post", 1, &[]);
    assert_eq!(count(&post.codes, "503"), 1, "{:?}", post.codes);
    let get = load(&mesh, "http://reviews:9080/reset-get", 1, &[]);
    assert_eq!(count(&get.codes, "503"), 1, "{:?}", get.codes);
    // The GET: 1 + 2 retries, the first two on different pods.
    eventually(WAIT, "the GET's three attempts", || {
        let g = seen(&mesh, "/reset-get");
        (g.iter().sum::<usize>() == 3).then_some(g)
    })
    .iter()
    .for_each(|n| assert!(*n >= 1, "each pod tried"));
    // Given the GET's attempts have landed, the POST's would have too.
    assert_eq!(seen(&mesh, "/reset-post").iter().sum::<usize>(), 1, "a POST the upstream read is never sent again");
    let wp = std::fs::read_to_string(&mesh.pod("shop", "waypoint").log).unwrap();
    assert!(wp.contains("response_flags=UC"), "the reset is logged as UC");
}

/// DestinationRule `connectionPool.http.maxRequestsPerConnection: 1`: the
/// waypoint opens a new upstream connection (an HBONE stream the pod's
/// ztunnel counts) for every request, where it otherwise keeps them alive.
#[test]
fn max_requests_per_connection_one_turns_keep_alive_off() {
    let Some(mesh) = up() else { return };
    let labels = [("reporter", "destination"), ("source_workload", "waypoint")];
    let opened = |m: &LocalMesh| -> f64 { (0..m.nodes.len()).map(|n| m.metric(n, "istio_tcp_connections_opened_total", &labels).unwrap()).sum() };
    let during = |m: &LocalMesh, n: usize| {
        let before = opened(m);
        // The backend keeps connections alive under /keep.
        let l = load(m, "http://reviews:9080/keep", n, &[]);
        assert_eq!(count(&l.codes, "200"), n as u64, "{:?}", l.codes);
        // The destination ztunnels count a stream when it opens.
        std::thread::sleep(Duration::from_millis(300));
        opened(m) - before
    };
    // Kept alive: 20 requests over a few connections (one or two per pod).
    let kept = during(&mesh, 20);
    assert!(kept <= 6.0, "keep-alive reuses connections: {kept} opened for 20 requests");
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: per-request, namespace: shop}\nspec:\n  host: reviews\n  trafficPolicy:\n    connectionPool: {http: {maxRequestsPerConnection: 1}}\n";
    mesh.apply("per-request-dr", Some(dr)).unwrap();
    eventually(WAIT, "maxRequestsPerConnection in force", || (during(&mesh, 5) >= 5.0).then_some(()));
    let fresh = during(&mesh, 20);
    assert!(fresh >= 20.0, "one connection per request: {fresh} opened for 20 requests");
}

/// Issue 13 item 3: the waypoint had no header-read timeout and took
/// HTTP/2's stream default, so slow and flooding clients held it as long
/// as they liked. Now a slow client (slowloris) is cut at the header-read
/// timeout, an HTTP/2 connection gets at most 100 concurrent streams (the
/// rest are refused), a rapid-reset flood is answered by the server's reset
/// limits, oversized header sets get 431, and other clients are served
/// throughout. Everything goes through the client's ztunnel, as an
/// attacking pod's traffic would.
#[test]
fn slowloris_and_an_http2_stream_flood_leave_other_clients_served() {
    let dir = tempfile::Builder::new().prefix("skiff-e2e-slow-").tempdir().unwrap();
    let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/l7/cluster.yaml")).unwrap();
    let waypoint = "command: [skiff-waypoint, --name, waypoint, --service-account, waypoint]";
    assert!(text.contains(waypoint));
    let text = text.replace(waypoint, "command: [skiff-waypoint, --name, waypoint, --service-account, waypoint, --http-header-read-timeout, \"3\"]");
    std::fs::write(dir.path().join("cluster.yaml"), text).unwrap();
    let Some(mut mesh) = up_from(dir.path().to_str().unwrap()) else { return };
    let target = format!("{}:9080", mesh.service_ip("shop", "reviews"));
    eventually(WAIT, "a request through the waypoint", || (count(&load(&mesh, URL, 1, &[]).codes, "200") == 1).then_some(()));
    let k = mesh.pods.iter().position(|p| p.namespace == "shop" && p.name == "client").unwrap();
    let slow_log = mesh.work_dir.join("logs").join("slowloris.log");
    mesh.spawn_in(k, &["skiff-demo-app", "slowloris", "--target", &target, "--count", "200", "--for-ms", "9000"], &slow_log).unwrap();
    let flood = |extra: &[&str]| -> serde_json::Value {
        let mut argv = vec!["skiff-demo-app", "h2-flood", "--target", &target, "--authority", "reviews"];
        argv.extend_from_slice(extra);
        let out = mesh.exec(mesh.pod("shop", "client"), &argv, Duration::from_secs(30)).unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
    };
    // 1000 streams opened at once on one connection, none ended.
    let v = flood(&["--streams", "1000"]);
    assert_eq!(v["server_max_concurrent_streams"], 100, "{v}");
    assert!(v["refused_streams"].as_u64().unwrap() >= 900, "streams past the limit are refused: {v}");
    // Other clients are served meanwhile.
    let during = load(&mesh, URL, 20, &[]);
    assert_eq!(count(&during.codes, "200"), 20, "{}", during.codes);
    // Rapid reset: open and reset 5000 streams.
    let rapid = flood(&["--streams", "5000", "--reset"]);
    assert_eq!(rapid["written"], true, "{rapid}");
    // Too many header fields: 431, as Envoy answers.
    let many: Vec<String> = (0..101).map(|i| format!("x-many-{i}: v")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let big = load(&mesh, URL, 1, &many);
    assert_eq!(count(&big.codes, "431"), 1, "{}", big.codes);
    // The slow connections were cut at the 3 s header-read timeout.
    let slow = eventually(Duration::from_secs(30), "the slowloris report", || {
        std::fs::read_to_string(&slow_log).ok().and_then(|t| serde_json::from_str::<serde_json::Value>(t.trim()).ok())
    });
    assert_eq!(slow["opened"], 200, "{slow}");
    assert_eq!(slow["closed_by_server"], 200, "every slow connection is closed: {slow}");
    let (first, last) = (slow["first_close_ms"].as_u64().unwrap(), slow["last_close_ms"].as_u64().unwrap());
    assert!(first >= 2000 && last <= 8000, "closed about 3 s after they started: {slow}");
    let after = load(&mesh, URL, 20, &[]);
    assert_eq!(count(&after.codes, "200"), 20, "served after the floods (rapid reset answered {rapid}): {}", after.codes);
}

/// Issue 13 item 10: SIGTERM used to end the waypoint at once, cutting
/// every request in flight. Now it stops accepting, sends GOAWAY and lets
/// what it accepted finish: 20 requests that each take 2 s at the backend
/// are all answered although the waypoint is told to stop while they wait.
#[test]
fn the_waypoint_drains_on_sigterm_and_loses_no_accepted_request() {
    let Some(mut mesh) = up() else { return };
    eventually(WAIT, "a request through the waypoint", || (count(&load(&mesh, URL, 1, &[]).codes, "200") == 1).then_some(()));
    let slow_seen = |mesh: &LocalMesh| -> usize {
        ["reviews-v1", "reviews-v2"]
            .iter()
            .map(|p| server_events(mesh.pod("shop", p)).iter().filter(|e| e["event"] == "request" && e["path"] == "/slow").count())
            .sum()
    };
    let k = mesh.pods.iter().position(|p| p.namespace == "shop" && p.name == "client").unwrap();
    let log = mesh.work_dir.join("logs").join("drain-load.log");
    mesh.spawn_in(k, &["skiff-demo-app", "http-load", "--url", "http://reviews:9080/slow", "--count", "1", "--parallel", "20"], &log).unwrap();
    // All 20 are at the backends (each answers after 2 s).
    eventually(Duration::from_secs(10), "20 slow requests at the backends", || (slow_seen(&mesh) >= 20).then_some(()));
    let w = mesh.pods.iter().position(|p| p.namespace == "shop" && p.name == "waypoint").unwrap();
    let start = std::time::Instant::now();
    mesh.terminate_pod(w, Duration::from_secs(10));
    let took = start.elapsed();
    let lines = eventually(Duration::from_secs(20), "20 load reports", || {
        let text = std::fs::read_to_string(&log).ok()?;
        let lines: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        (lines.len() == 20).then_some(lines)
    });
    for l in &lines {
        assert_eq!(l["codes"]["200"], 1, "a request accepted before SIGTERM was lost: {l}");
    }
    assert_eq!(slow_seen(&mesh), 20, "no request was sent twice");
    let wlog = std::fs::read_to_string(&mesh.pod("shop", "waypoint").log).unwrap();
    assert!(wlog.contains("draining") && wlog.contains("closed_by_deadline=0"), "{wlog}");
    assert!(took < Duration::from_secs(5), "the waypoint exits once its requests are done, not at the deadline: {took:?}");
}

/// Issue 13 item 8: the waypoint was "the lowest-IP ready pod labelled
/// with its name", so a pod anyone could create with that label, on a
/// lower IP than the real waypoint, took the namespace's L7 traffic. Here
/// such a pod runs as another service account on node-1 (lower IPs than
/// the waypoint's node-2): every request still goes through the real
/// waypoint, and the impostor is named in the ztunnels' config warnings.
#[test]
fn a_pod_labelled_like_the_waypoint_gets_none_of_its_traffic() {
    let dir = tempfile::Builder::new().prefix("skiff-e2e-rogue-").tempdir().unwrap();
    let mut text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/l7/cluster.yaml")).unwrap();
    text.push_str(
        "\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: rogue, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}\n\
         spec:\n  nodeName: node-1\n  containers: [{name: echo, command: [skiff-demo-app, echo-server, --port, \"9000\"]}]\n",
    );
    std::fs::write(dir.path().join("cluster.yaml"), text).unwrap();
    let Some(mesh) = up_from(dir.path().to_str().unwrap()) else { return };
    let (rogue, waypoint) = (mesh.pod("shop", "rogue"), mesh.pod("shop", "waypoint"));
    assert!(rogue.ip < waypoint.ip, "the impostor has the lower IP ({} vs {})", rogue.ip, waypoint.ip);
    let l = eventually(WAIT, "requests through the waypoint", || Some(load(&mesh, URL, 20, &[])).filter(|l| count(&l.codes, "200") == 20));
    assert_eq!(count(&l.codes, "200"), 20, "{}", l.codes);
    let metrics = mesh.pod_http_get(waypoint, 15020, "/metrics").unwrap().1;
    let served = skiff_localmesh::mesh::sum_metric(&metrics, "istio_requests_total", &[("response_code", "200")]);
    assert!(served >= 20.0, "the real waypoint served them: {served}");
    let zlog = std::fs::read_to_string(&mesh.nodes[rogue.node].ztunnel_log).unwrap();
    assert!(!zlog.contains(&format!("{}:15008", rogue.ip)), "nothing was sent to the impostor's HBONE port");
    let dump = mesh.node_http_get(rogue.node, 15000, "/config_dump").unwrap().1;
    assert!(dump.contains("labelled as waypoint") && dump.contains("rogue"), "the impostor is named in the config warnings");
}
