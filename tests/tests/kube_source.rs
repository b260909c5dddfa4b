//! End to end with the Kubernetes API source: node-agent and ztunnel read
//! the cluster from a fake API server (`--kube-url`) holding the local
//! mesh's objects, instead of the manifests directory. Labelling a namespace
//! captures its pods' traffic; unlabelling releases it.

use std::time::Duration;

use skiff_e2e::*;

const CONNS: &str = "istio_tcp_connections_opened_total";
const WAIT: Duration = Duration::from_secs(20);

#[test]
fn kube_source_labelling_a_namespace_captures_and_unlabelling_releases() {
    let Some(mut mesh) = mesh_with("manifests/l4", |o| o.kube_api = true) else { return };
    let (client_ip, server_ip) = (mesh.pod("plain", "client").ip, mesh.pod("plain", "server").ip);
    let (client_node, server_node) = (mesh.pod("plain", "client").node, mesh.pod("plain", "server").node);
    wait_listening(mesh.pod("plain", "server"));

    // The processes really read the API server: both watch pods and
    // namespaces there (the mesh came up, so their first lists completed).
    let reqs = mesh.kube_api().expect("kube mode").requests();
    for resource in ["namespaces", "pods", "services", "authorizationpolicies"] {
        assert!(
            reqs.iter().any(|r| r.verb == "watch" && r.resource == resource),
            "nobody watched {resource}: {reqs:?}"
        );
    }
    // The already-enrolled namespace is captured from the API's view.
    let mesh_client_ip = mesh.pod("mesh", "client").ip.to_string();
    let mesh_client_node = mesh.pod("mesh", "client").node;
    eventually(WAIT, "mesh/client enrolled", || enrolled_ips(&mesh, mesh_client_node).contains(&mesh_client_ip).then_some(()));

    let out_labels = [("reporter", "source"), ("source_workload_namespace", "plain"), ("destination_workload", "server")];
    let count = |m: &LocalMesh| metric_all(m, CONNS, &out_labels);
    let start = count(&mesh);
    assert!(!enrolled_ips(&mesh, client_node).contains(&client_ip.to_string()), "plain/client enrolled before labelling");

    // kubectl label namespace plain istio.io/dataplane-mode=ambient
    mesh.label_namespace("plain", "istio.io/dataplane-mode", Some("ambient")).unwrap();
    eventually(WAIT, "plain/client enrolled", || enrolled_ips(&mesh, client_node).contains(&client_ip.to_string()).then_some(()));
    eventually(WAIT, "plain/server enrolled", || enrolled_ips(&mesh, server_node).contains(&server_ip.to_string()).then_some(()));
    let r = client(&mesh, mesh.pod("plain", "client"), &format!("{server_ip}:9000"), "marker-kube-labelled");
    assert!(r.ok, "{r:?}");
    eventually(WAIT, "captured after labelling", || (count(&mesh) > start).then_some(()));
    let captured = count(&mesh);

    // kubectl label namespace plain istio.io/dataplane-mode-
    mesh.label_namespace("plain", "istio.io/dataplane-mode", None).unwrap();
    eventually(WAIT, "plain pods released", || {
        (!enrolled_ips(&mesh, client_node).contains(&client_ip.to_string())
            && !enrolled_ips(&mesh, server_node).contains(&server_ip.to_string()))
        .then_some(())
    });
    let r = client(&mesh, mesh.pod("plain", "client"), &format!("{server_ip}:9000"), "marker-kube-released");
    assert!(r.ok, "{r:?}");
    let server = mesh.pod("plain", "server");
    assert!(peer_of_marker(server, "marker-kube-released").is_some(), "the released connection did not arrive");
    assert_eq!(count(&mesh), captured, "captured after the label was removed");

    // A watch cut and a forced relist (410) change nothing that is right.
    mesh.kube_api().unwrap().force_relist();
    mesh.label_namespace("plain", "istio.io/dataplane-mode", Some("ambient")).unwrap();
    eventually(WAIT, "plain/client enrolled after a relist", || {
        enrolled_ips(&mesh, client_node).contains(&client_ip.to_string()).then_some(())
    });
    assert!(enrolled_ips(&mesh, mesh_client_node).contains(&mesh_client_ip), "mesh/client released by the relist");
}

/// The waypoint (a pod, given `SKIFF_KUBE_URL`) routes by a VirtualService
/// that exists only in the API server's view.
#[test]
fn kube_source_waypoint_routes_by_a_virtual_service_from_the_api() {
    let Some(mesh) = mesh_with("manifests/l7", |o| o.kube_api = true) else { return };
    for p in ["reviews-v1", "reviews-v2"] {
        wait_listening(mesh.pod("shop", p));
    }
    let wp = mesh.pod("shop", "waypoint");
    eventually(WAIT, "waypoint serving", || {
        std::fs::read_to_string(&wp.log).ok().filter(|l| l.contains("waypoint serving")).map(|_| ())
    });
    let log = std::fs::read_to_string(&wp.log).unwrap();
    assert!(log.contains("reading the cluster from the Kubernetes API"), "the waypoint did not use the API:\n{log}");

    let versions = |m: &LocalMesh| -> serde_json::Value {
        let out = m
            .exec(m.pod("shop", "client"), &["skiff-demo-app", "http-load", "--url", "http://reviews:9080/", "--count", "5"], Duration::from_secs(60))
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["versions"].clone()
    };
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: shop}\nspec:\n  hosts: [reviews]\n  http:\n  - route: [{destination: {host: reviews, subset: v2}}]\n";
    mesh.apply("reviews-vs", Some(vs)).unwrap();
    assert!(mesh.kube_api().unwrap().get("VirtualService", "shop", "reviews").is_some());
    eventually(WAIT, "every request routed to v2", || (versions(&mesh)["v2"].as_u64() == Some(5)).then_some(()));
}
