//! The fake API server answers as the real one does, over raw HTTP.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use skiff_kube_fake::{ApiRequest, FakeApiServer, TokenIdentity};

fn send(fake: &FakeApiServer, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(fake.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: fake\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (code, body)
}

fn get(fake: &FakeApiServer, path: &str) -> (u16, Value) {
    let (code, body) = send(fake, "GET", path, "");
    (code, serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}")))
}

/// Reads a watch stream until `done` says enough (or 5 s pass); returns the
/// event lines (chunk framing removed).
fn watch(fake: &FakeApiServer, path: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let mut s = TcpStream::connect(fake.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: fake\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut buf = [0u8; 4096];
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
        let events = events(&raw);
        // A clean end is the last chunk; a cut connection reads 0 or fails.
        if done(&events) || raw.ends_with(b"\r\n0\r\n\r\n") || Instant::now() > deadline {
            return events;
        }
    }
    events(&raw)
}

fn events(raw: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(raw).lines().filter(|l| l.starts_with('{')).filter_map(|l| serde_json::from_str(l).ok()).collect()
}

fn pod(name: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "ns"}, "spec": {"nodeName": node}})
}

#[test]
fn list_has_resource_versions_and_items_without_kind() {
    let fake = FakeApiServer::start().unwrap();
    let rv1 = fake.apply(pod("a", "n1")).unwrap();
    let rv2 = fake.apply(pod("b", "n2")).unwrap();
    assert!(rv2 > rv1);
    assert_eq!(fake.apply(pod("b", "n2")).unwrap(), rv2, "an unchanged apply is no write");
    let (code, list) = get(&fake, "/api/v1/pods?fieldSelector=spec.nodeName%3Dn1");
    assert_eq!(code, 200);
    assert_eq!(list["kind"], "PodList");
    assert_eq!(list["metadata"]["resourceVersion"], rv2.to_string());
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["metadata"]["name"], "a");
    assert!(items[0].get("kind").is_none() && items[0].get("apiVersion").is_none());
    assert_eq!(items[0]["metadata"]["resourceVersion"], rv1.to_string());
    let (code, one) = get(&fake, "/api/v1/namespaces/ns/pods/b");
    assert_eq!((code, one["kind"].as_str()), (200, Some("Pod")));
    let (code, missing) = get(&fake, "/api/v1/namespaces/ns/pods/zz");
    assert_eq!((code, missing["reason"].as_str()), (404, Some("NotFound")));
    let (code, _) = get(&fake, "/api/v1/pods?fieldSelector=spec.bogus%3Dx");
    assert_eq!(code, 400);
    let (_, by_label) = get(&fake, "/api/v1/namespaces/ns/pods?labelSelector=app%20in%20(x,y)");
    assert_eq!(by_label["items"].as_array().unwrap().len(), 0);
}

#[test]
fn watch_replays_from_a_resource_version_and_follows_the_field_selector() {
    let fake = FakeApiServer::start().unwrap();
    let rv = fake.apply(pod("a", "n1")).unwrap();
    fake.apply(pod("b", "n1")).unwrap();
    fake.apply(pod("a", "n2")).unwrap(); // a leaves n1
    fake.delete("Pod", "ns", "b").unwrap();
    let ev = watch(&fake, &format!("/api/v1/pods?watch=true&resourceVersion={rv}&fieldSelector=spec.nodeName%3Dn1"), |e| e.len() >= 3);
    let seen: Vec<(String, String)> = ev
        .iter()
        .map(|e| (e["type"].as_str().unwrap().to_owned(), e["object"]["metadata"]["name"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(seen, [("ADDED".into(), "b".into()), ("DELETED".into(), "a".into()), ("DELETED".into(), "b".into())]);
    assert_eq!(ev[0]["object"]["kind"], "Pod", "watch objects carry their kind");
}

#[test]
fn compaction_gives_410_and_bookmarks_come_when_allowed() {
    let fake = FakeApiServer::start().unwrap();
    fake.set_bookmark_interval(Duration::from_millis(50));
    let rv = fake.apply(pod("a", "n1")).unwrap();
    let ev = watch(&fake, &format!("/api/v1/pods?watch=true&resourceVersion={rv}&allowWatchBookmarks=true"), |e| !e.is_empty());
    assert_eq!(ev[0]["type"], "BOOKMARK");
    assert_eq!(ev[0]["object"]["metadata"]["resourceVersion"], rv.to_string());
    fake.compact();
    let ev = watch(&fake, &format!("/api/v1/pods?watch=true&resourceVersion={rv}"), |e| !e.is_empty());
    assert_eq!(ev[0]["type"], "ERROR");
    assert_eq!(ev[0]["object"]["code"], 410);
    let (code, st) = get(&fake, &format!("/api/v1/pods?resourceVersion={rv}&resourceVersionMatch=Exact"));
    assert_eq!((code, st["reason"].as_str()), (410, Some("Expired")));
    let (code, _) = get(&fake, &format!("/api/v1/pods?resourceVersion={rv}&resourceVersionMatch=NotOlderThan"));
    assert_eq!(code, 200);
}

#[test]
fn dropped_watches_end_and_timeouts_end_cleanly() {
    let fake = FakeApiServer::start().unwrap();
    fake.apply(pod("a", "n1")).unwrap();
    let started = Instant::now();
    let ev = watch(&fake, "/api/v1/pods?watch=1&timeoutSeconds=1", |_| false);
    assert_eq!(ev.len(), 1, "the current state as ADDED: {ev:?}");
    assert!(started.elapsed() < Duration::from_secs(4), "timeoutSeconds not honoured");

    let f = std::sync::Arc::new(fake);
    let f2 = f.clone();
    let dropper = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(5);
        while f2.active_watches() == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        f2.drop_watches();
    });
    let started = Instant::now();
    watch(&f, "/api/v1/pods?watch=1", |_| false);
    dropper.join().unwrap();
    assert!(started.elapsed() < Duration::from_secs(4), "the watch was not cut");
}

#[test]
fn absent_kinds_404_and_requests_are_recorded_as_rbac_verbs() {
    let fake = FakeApiServer::start().unwrap();
    fake.set_absent("VirtualService", true);
    let (code, st) = get(&fake, "/apis/networking.istio.io/v1/virtualservices");
    assert_eq!((code, st["code"].as_i64()), (404, Some(404)));
    get(&fake, "/api/v1/namespaces/ns/pods/x");
    watch(&fake, "/api/v1/namespaces?watch=true&timeoutSeconds=1", |_| false);
    let r = |verb: &str, group: &str, resource: &str, ns: Option<&str>| ApiRequest {
        verb: verb.into(),
        group: group.into(),
        resource: resource.into(),
        namespace: ns.map(str::to_owned),
    };
    assert_eq!(
        fake.requests(),
        [
            r("list", "networking.istio.io", "virtualservices", None),
            r("get", "", "pods", Some("ns")),
            r("watch", "", "namespaces", None)
        ]
    );
}

#[test]
fn token_review_reports_the_bound_pod_and_node() {
    let fake = FakeApiServer::start().unwrap();
    fake.add_token(
        "good",
        TokenIdentity::service_account("skiff-system", "ztunnel").bound_to_pod("zt-1", "uid-1", "node-1").with_audiences(&["skiff-ca"]),
    );
    let review = |token: &str, aud: &str| {
        let body = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token, "audiences": [aud]}});
        let (code, body) = send(&fake, "POST", "/apis/authentication.k8s.io/v1/tokenreviews", &body.to_string());
        assert_eq!(code, 201);
        serde_json::from_str::<Value>(&body).unwrap()["status"].clone()
    };
    let ok = review("good", "skiff-ca");
    assert_eq!(ok["authenticated"], true);
    assert_eq!(ok["user"]["username"], "system:serviceaccount:skiff-system:ztunnel");
    assert_eq!(ok["user"]["extra"]["authentication.kubernetes.io/node-name"][0], "node-1");
    assert_eq!(ok["user"]["extra"]["authentication.kubernetes.io/pod-name"][0], "zt-1");
    assert_eq!(ok["user"]["extra"]["authentication.kubernetes.io/pod-uid"][0], "uid-1");
    assert_eq!(review("good", "other")["authenticated"], false, "wrong audience");
    assert_eq!(review("forged", "skiff-ca")["authenticated"], false);
    assert!(fake.requests().iter().all(|r| r.verb == "create" && r.resource == "tokenreviews"));
}
