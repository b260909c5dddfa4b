//! Feeds arbitrary text to the manifest reader as a manifests directory
//! would (`parse_documents`), builds a snapshot from what parses (every
//! object validated on its own, refusals and stand-ins included), and runs
//! what the data path asks of it: routing a request by every
//! VirtualService, its redirects, the DestinationRule lookup and the
//! authorization decision. Nothing may panic, whatever the text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skiff_core::{k8s, model::Snapshot, policy, routing};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(objects) = k8s::parse_documents(&text) else { return };
    let snap = Snapshot::build(objects.into_iter().map(|o| ("fuzz.yaml".to_owned(), o)).collect(), None);
    let headers = vec![("x-user".to_owned(), "jason".to_owned()), ("cookie".to_owned(), "a=1".to_owned())];
    let req = routing::RequestInfo { method: "GET", path: "/api/v1/items?x=1", authority: "reviews:9080", headers: &headers, port: 9080 };
    for vs in &snap.virtual_services {
        let _ = vs.applies_to("reviews", "shop", "shop");
        if let Some(route) = vs.route(&req) {
            if let Some(r) = &route.redirect {
                let _ = r.location("http", "reviews:9080", "/api/v1/items?x=1", 9080);
            }
            if let Some((re, with)) = &route.rewrite_regex {
                let _ = re.0.replace_all("/api/v1/items", with.as_str());
            }
            let _ = routing::pick_weighted(&route.destinations, 0);
        }
    }
    if let Some(dr) = routing::destination_rule_for(&snap.destination_rules, "reviews", "shop", "shop") {
        let _ = dr.policy_for(Some("v1"), 9080);
    }
    let conn = policy::ConnInfo {
        src_ip: "10.244.1.5".parse().unwrap(),
        principal: Some("cluster.local/ns/front/sa/web".to_owned()),
        src_namespace: Some("front".to_owned()),
        dst_ip: "10.244.0.9".parse().unwrap(),
        dst_port: 9080,
    };
    let policies: Vec<&policy::AuthzPolicy> = snap.authorization_policies.iter().collect();
    let _ = policy::evaluate(&policies, &conn);
    let l7 = policy::L7Attrs { method: "GET", path: "/api/v1/items", host: "reviews", headers: &headers };
    let _ = policy::evaluate_l7(&policies, &conn, &l7);
    let _ = policy::effective_mtls(&snap.peer_authentications, "istio-system", "shop", &Default::default(), 9080);
});
