//! The Kubernetes source against the fake API server: start-up, absent CRDs,
//! and convergence of the enrolled set through label changes, pod churn,
//! dropped watches and forced relists (410 Gone).

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use skiff_core::{
    enroll::{decide, Decision},
    model::Snapshot,
    source::ConfigSource,
};
use skiff_kube_fake::FakeApiServer;
use skiff_kube_source::{KubeOptions, KubeSource, WATCHED};

const NODE: &str = "node-1";
const WAIT: Duration = Duration::from_secs(20);

fn namespace(name: &str, ambient: Option<&str>) -> Value {
    let mut labels = json!({});
    if let Some(key) = ambient {
        labels[key] = json!("ambient");
    }
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod(ns: &str, name: &str, node: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}"), "labels": {"app": name}},
        "spec": {"nodeName": node, "serviceAccountName": "sa", "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running", "podIP": ip},
    })
}

fn options(fake: &FakeApiServer, node: Option<&str>) -> KubeOptions {
    KubeOptions {
        url: Some(fake.url()),
        pods_on_node: node.map(str::to_owned),
        debounce: Duration::from_millis(50),
        max_delay: Duration::from_millis(300),
        max_hold: Duration::from_secs(2),
        secrets_namespace: None,
        config_maps_namespace: None,
        telemetry: false,
    }
}

/// `namespace/name` of every pod the node-agent on NODE would capture.
fn enrolled(s: &Snapshot) -> BTreeSet<String> {
    s.workloads
        .values()
        .filter(|w| decide(NODE, s.namespaces.get(&w.namespace).map(|n| &n.labels), w) == Decision::Enroll)
        .map(|w| format!("{}/{}", w.namespace, w.name))
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Polls until a published snapshot satisfies `want`; panics (with the last
/// snapshot's enrolled set) at the deadline.
fn wait_until(src: &mut KubeSource, last: &mut Option<Arc<Snapshot>>, what: &str, want: impl Fn(&Snapshot) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(s) = last.as_ref() {
            if want(s) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last snapshot: {:?}",
            last.as_ref().map(|s| enrolled(s))
        );
        match src.poll(Duration::from_millis(200)) {
            Ok(Some(s)) => *last = Some(s),
            Ok(None) => {}
            Err(e) => panic!("source rejected the cluster: {}", e.report()),
        }
    }
}

fn wait_watches(fake: &FakeApiServer, n: usize) {
    let deadline = Instant::now() + WAIT;
    while fake.active_watches() < n {
        assert!(Instant::now() < deadline, "only {} of {n} watches open", fake.active_watches());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn publishes_nothing_until_every_kind_has_listed() {
    let fake = FakeApiServer::start().unwrap();
    fake.apply(namespace("app", Some("istio.io/dataplane-mode"))).unwrap();
    fake.apply(pod("app", "a", NODE, "10.244.1.10")).unwrap();
    fake.set_failing("Pod", true);
    let mut src = KubeSource::start(options(&fake, Some(NODE))).unwrap();

    // Every other kind lists; pods keep failing: nothing may be published.
    let deadline = Instant::now() + WAIT;
    while !fake.requests().iter().any(|r| r.verb == "watch" && r.resource == "namespaces") {
        assert!(Instant::now() < deadline, "the source never watched namespaces");
        assert!(src.poll(Duration::from_millis(100)).unwrap().is_none(), "published before pods were listed");
    }
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        assert!(src.poll(Duration::from_millis(100)).unwrap().is_none(), "published before pods were listed");
    }
    assert!(fake.requests().iter().filter(|r| r.verb == "list" && r.resource == "pods").count() >= 1);

    fake.set_failing("Pod", false);
    let mut last = None;
    wait_until(&mut src, &mut last, "the first snapshot", |s| enrolled(s) == set(&["app/a"]));
    // The first snapshot is already complete: the pod is in it.
    assert_eq!(last.unwrap().workloads.len(), 1);
}

#[test]
fn a_kind_whose_crd_is_absent_is_empty_not_fatal() {
    let fake = FakeApiServer::start().unwrap();
    fake.set_absent("VirtualService", true);
    fake.set_absent("PeerAuthentication", true);
    fake.apply(namespace("app", Some("skiff.dev/dataplane-mode"))).unwrap();
    fake.apply(pod("app", "a", NODE, "10.244.1.10")).unwrap();
    fake.apply(json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-all", "namespace": "app"}, "spec": {},
    }))
    .unwrap();
    let mut src = KubeSource::start(options(&fake, None)).unwrap();
    let mut last = None;
    wait_until(&mut src, &mut last, "a snapshot despite two absent CRDs", |s| enrolled(s) == set(&["app/a"]));
    let s = last.unwrap();
    assert!(s.virtual_services.is_empty() && s.peer_authentications.is_empty());
    assert_eq!(s.authorization_policies.len(), 1, "the installed Istio kind is read");
    let reqs = fake.requests();
    assert!(reqs.iter().any(|r| r.verb == "list" && r.resource == "virtualservices"), "the absent kind was asked for");
}

#[test]
fn converges_through_labels_pod_churn_dropped_watches_and_relists() {
    let fake = FakeApiServer::start().unwrap();
    // Frequent bookmarks: the watcher must keep its place through them.
    fake.set_bookmark_interval(Duration::from_millis(200));
    fake.apply(namespace("app", None)).unwrap();
    fake.apply(namespace("other", None)).unwrap();
    fake.apply(pod("app", "a1", NODE, "10.244.1.10")).unwrap();
    fake.apply(pod("app", "a2", NODE, "10.244.1.11")).unwrap();
    fake.apply(pod("app", "far", "node-2", "10.244.2.10")).unwrap();
    fake.apply(pod("other", "o1", NODE, "10.244.1.12")).unwrap();
    let mut src = KubeSource::start(options(&fake, Some(NODE))).unwrap();
    let mut last = None;

    wait_until(&mut src, &mut last, "the initial snapshot", |s| s.workloads.len() == 3);
    assert!(enrolled(last.as_ref().unwrap()).is_empty(), "nothing is labelled yet");
    assert!(
        last.as_ref().unwrap().workloads.values().all(|w| w.node.as_deref() == Some(NODE)),
        "the node field selector keeps other nodes' pods out"
    );

    // Label the namespace: its pods on this node are enrolled.
    fake.apply(namespace("app", Some("istio.io/dataplane-mode"))).unwrap();
    wait_until(&mut src, &mut last, "app enrolled", |s| enrolled(s) == set(&["app/a1", "app/a2"]));

    // Pods come and go.
    fake.apply(pod("app", "a3", NODE, "10.244.1.13")).unwrap();
    fake.delete("Pod", "app", "a1").unwrap();
    wait_until(&mut src, &mut last, "a3 in, a1 out", |s| enrolled(s) == set(&["app/a2", "app/a3"]));

    // Every watch is cut mid-stream; changes made meanwhile still arrive
    // (the watcher resumes from its resource version).
    wait_watches(&fake, WATCHED.len());
    fake.drop_watches();
    fake.apply(namespace("other", Some("skiff.dev/dataplane-mode"))).unwrap();
    fake.delete("Pod", "app", "a2").unwrap();
    wait_until(&mut src, &mut last, "convergence after dropped watches", |s| {
        enrolled(s) == set(&["app/a3", "other/o1"])
    });

    // History compacted and watches cut: the next watch gets 410 and the
    // source relists. Changes made across the relist converge.
    wait_watches(&fake, WATCHED.len());
    let lists_before = fake.requests().iter().filter(|r| r.verb == "list" && r.resource == "pods").count();
    fake.force_relist();
    fake.apply(pod("app", "a4", NODE, "10.244.1.14")).unwrap();
    fake.delete("Pod", "other", "o1").unwrap();
    fake.apply(namespace("app", None)).unwrap();
    fake.apply(pod("app", "opt-in", NODE, "10.244.1.15")).unwrap();
    let mut p = pod("app", "opt-in", NODE, "10.244.1.15");
    p["metadata"]["labels"]["skiff.dev/dataplane-mode"] = json!("ambient");
    fake.apply(p).unwrap();
    wait_until(&mut src, &mut last, "convergence after a forced relist", |s| enrolled(s) == set(&["app/opt-in"]));
    let lists_after = fake.requests().iter().filter(|r| r.verb == "list" && r.resource == "pods").count();
    assert!(lists_after > lists_before, "410 did not make the source relist pods ({lists_before} → {lists_after} lists)");

    // Unlabel everything: released.
    fake.apply(namespace("other", None)).unwrap();
    fake.delete("Pod", "app", "opt-in").unwrap();
    wait_until(&mut src, &mut last, "everything released", |s| enrolled(s).is_empty() && s.workloads.len() == 2);
}

#[test]
fn every_watched_kind_is_listed_and_watched_and_nothing_else_is_asked() {
    let fake = FakeApiServer::start().unwrap();
    fake.apply(namespace("app", None)).unwrap();
    let mut src = KubeSource::start(options(&fake, None)).unwrap();
    let mut last = None;
    wait_until(&mut src, &mut last, "the initial snapshot", |s| s.namespaces.contains_key("app"));
    wait_watches(&fake, WATCHED.len());
    let asked: BTreeSet<(String, String, String)> =
        fake.requests().into_iter().map(|r| (r.verb, r.group, r.resource)).collect();
    let mut expected = BTreeSet::new();
    for k in WATCHED {
        for verb in ["list", "watch"] {
            expected.insert((verb.to_owned(), k.group.to_owned(), k.plural.to_owned()));
        }
    }
    assert_eq!(asked, expected);
}

#[test]
fn an_invalid_object_is_refused_on_its_own_and_the_rest_is_published() {
    let fake = FakeApiServer::start().unwrap();
    fake.apply(namespace("app", Some("istio.io/dataplane-mode"))).unwrap();
    fake.apply(pod("app", "a", NODE, "10.244.1.10")).unwrap();
    let mut src = KubeSource::start(options(&fake, None)).unwrap();
    let mut last = None;
    wait_until(&mut src, &mut last, "the initial snapshot", |s| enrolled(s) == set(&["app/a"]));
    // A bad pod is refused, named with its field; a good pod added with it
    // is published all the same.
    fake.apply(pod("app", "bad", NODE, "not-an-ip")).unwrap();
    fake.apply(pod("app", "c", NODE, "10.244.1.11")).unwrap();
    wait_until(&mut src, &mut last, "the good pod next to the refused one", |s| enrolled(s) == set(&["app/a", "app/c"]));
    let refused: Vec<String> = last.as_ref().unwrap().rejected.iter().map(|r| r.to_string()).collect();
    assert!(refused.iter().any(|r| r.contains("pods app/bad") && r.contains("status.podIP")), "{refused:?}");
    // Fixed: taken.
    fake.apply(pod("app", "bad", NODE, "10.244.1.20")).unwrap();
    wait_until(&mut src, &mut last, "the fixed pod", |s| enrolled(s) == set(&["app/a", "app/bad", "app/c"]));
    assert!(last.as_ref().unwrap().rejected.is_empty(), "{:?}", last.as_ref().unwrap().rejected);
}

/// The same objects give the same snapshot from either source: the
/// repository's manifest directories, loaded by `LocalDirSource` and served
/// by the fake API server.
#[test]
fn the_same_objects_give_the_same_snapshot_as_the_manifests_directory() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for dir in ["tests/manifests/l4", "tests/manifests/l7", "examples/two-tier"] {
        let dir = root.join(dir);
        let from_files = skiff_core::source::LocalDirSource::load(&dir).unwrap_or_else(|e| panic!("{}: {}", dir.display(), e.report()));
        let fake = FakeApiServer::start().unwrap();
        let mut served = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            for v in serde_saphyr::from_multiple::<Value>(&text).unwrap() {
                let mut v = v;
                if v.is_null() || v["kind"] == "Deployment" {
                    continue; // the local mesh's business; the model ignores them
                }
                // The API server gives every object a uid; the manifests'
                // model falls back to namespace/name. Use that as the uid so
                // the two are comparable.
                if v["kind"] == "Pod" && v["metadata"].get("uid").is_none() {
                    let ns = v["metadata"]["namespace"].as_str().unwrap_or("default").to_owned();
                    let name = v["metadata"]["name"].as_str().unwrap().to_owned();
                    v["metadata"]["uid"] = json!(format!("{ns}/{name}"));
                }
                fake.apply(v).unwrap();
                served += 1;
            }
        }
        assert!(served > 0);
        let mut src = KubeSource::start(options(&fake, None)).unwrap();
        let mut last = None;
        wait_until(&mut src, &mut last, "the first snapshot", |_| true);
        let from_api = last.unwrap();
        assert_eq!(*from_api, from_files, "{}: the sources disagree", dir.display());
    }
}

/// Relists and reconnects of an unchanged cluster publish nothing: no
/// intermediate (partial or empty) view ever reaches the node.
#[test]
fn relists_of_an_unchanged_cluster_publish_nothing() {
    let fake = FakeApiServer::start().unwrap();
    fake.apply(namespace("app", Some("istio.io/dataplane-mode"))).unwrap();
    for i in 0..20 {
        fake.apply(pod("app", &format!("p{i}"), NODE, &format!("10.244.1.{}", 10 + i))).unwrap();
    }
    let mut src = KubeSource::start(options(&fake, Some(NODE))).unwrap();
    let mut last = None;
    wait_until(&mut src, &mut last, "the initial snapshot", |s| enrolled(s).len() == 20);
    let lists = || fake.requests().iter().filter(|r| r.verb == "list" && r.resource == "pods").count();
    for round in 0..3 {
        wait_watches(&fake, WATCHED.len());
        let before = lists();
        if round % 2 == 0 {
            fake.force_relist();
        } else {
            fake.drop_watches();
        }
        let deadline = Instant::now() + WAIT;
        // Until the watches are back (and, after a compaction, pods relisted),
        // and a little beyond the debounce, nothing may be published.
        while fake.active_watches() < WATCHED.len() || (round % 2 == 0 && lists() == before) {
            assert!(Instant::now() < deadline, "round {round}: watches did not come back");
            if let Some(s) = src.poll(Duration::from_millis(50)).unwrap() {
                panic!("round {round}: published during a relist: {:?}", enrolled(&s));
            }
        }
        if let Some(s) = src.poll(Duration::from_millis(500)).unwrap() {
            panic!("round {round}: published after a relist of unchanged objects: {:?}", enrolled(&s));
        }
    }
}

/// A cluster whose Istio security CRDs serve only `v1beta1`: the policies
/// are read at that version — a STRICT PeerAuthentication and a DENY
/// policy are in the snapshot, never taken for "no policy" (which would
/// read as PERMISSIVE and allow).
#[test]
fn istio_kinds_served_only_at_an_older_version_are_read_there() {
    let fake = FakeApiServer::start().unwrap();
    for kind in ["PeerAuthentication", "AuthorizationPolicy"] {
        fake.set_served_versions(kind, &["v1beta1"]);
    }
    fake.set_served_versions("VirtualService", &["v1alpha3"]);
    fake.apply(namespace("app", Some("istio.io/dataplane-mode"))).unwrap();
    fake.apply(json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "strict", "namespace": "app"}, "spec": {"mtls": {"mode": "STRICT"}}}))
    .unwrap();
    fake.apply(json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny", "namespace": "app"}, "spec": {"action": "DENY", "rules": [{}]}}))
    .unwrap();
    fake.apply(json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "r", "namespace": "app"}, "spec": {"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r"}}]}]}}))
    .unwrap();
    let mut src = KubeSource::start(options(&fake, None)).unwrap();
    let mut last = None;
    wait_until(&mut src, &mut last, "the policies read at v1beta1", |s| {
        s.peer_authentications.iter().any(|p| p.name == "strict") && s.authorization_policies.iter().any(|p| p.name == "deny") && s.virtual_services.len() == 1
    });
}

/// Secrets are read by the ingress gateway only, in its own namespace: a
/// namespaced watch (so a Role there is all its RBAC needs), and no
/// other namespace's Secret reaches the snapshot. Without the option (every
/// other process) no Secret is asked for.
#[test]
fn secrets_are_read_only_in_the_namespace_asked_for() {
    let fake = FakeApiServer::start().unwrap();
    fake.apply(namespace("istio-system", None)).unwrap();
    let secret = |ns: &str, name: &str| {
        serde_json::json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns},
            "type": "kubernetes.io/tls", "data": {"tls.crt": "Y2VydA==", "tls.key": "a2V5"}})
    };
    fake.apply(secret("istio-system", "shop-cert")).unwrap();
    fake.apply(secret("shop", "other-cert")).unwrap();
    let mut src = KubeSource::start(KubeOptions { secrets_namespace: Some("istio-system".into()), ..options(&fake, None) }).unwrap();
    let mut last = None;
    wait_until(&mut src, &mut last, "the gateway's Secret", |s| s.secrets.contains_key("istio-system/shop-cert"));
    let s = last.unwrap();
    assert_eq!(s.secrets.keys().collect::<Vec<_>>(), ["istio-system/shop-cert"], "another namespace's Secret is never read");
    assert_eq!(s.secrets["istio-system/shop-cert"].data["tls.crt"], b"cert");
    let asked: Vec<_> = fake.requests().into_iter().filter(|r| r.resource == "secrets").collect();
    assert!(!asked.is_empty() && asked.iter().all(|r| r.namespace.as_deref() == Some("istio-system")), "{asked:?}");
    drop(src);

    let before = fake.requests().iter().filter(|r| r.resource == "secrets").count();
    let mut src = KubeSource::start(options(&fake, None)).unwrap();
    let mut last = None;
    wait_until(&mut src, &mut last, "a snapshot", |s| s.namespaces.contains_key("istio-system"));
    assert!(last.unwrap().secrets.is_empty());
    assert_eq!(fake.requests().iter().filter(|r| r.resource == "secrets").count(), before, "no Secret is asked for");
}
