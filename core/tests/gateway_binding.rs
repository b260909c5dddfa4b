//! The ingress gateway's decisions on a whole cluster view: which servers
//! a gateway pod opens on which ports, and which VirtualServices route a
//! request's host there (Istio Gateway `servers[].hosts`, VirtualService
//! `gateways`, `hosts` and `exportTo` at a gateway).

use skiff_core::{
    gateway::{decide, route, Decision},
    k8s,
    model::Snapshot,
};

fn snapshot(yaml: &str) -> Snapshot {
    let objects = k8s::parse_documents(yaml).unwrap();
    let s = Snapshot::build(objects.into_iter().map(|o| ("t.yaml".to_owned(), o)).collect(), None);
    assert!(s.rejected.is_empty(), "{:?}", s.rejected);
    s
}

const CLUSTER: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: gw-1, namespace: istio-system, labels: {istio: ingressgateway}}
spec: {containers: [{name: gw, ports: [{name: web, containerPort: 8080}]}]}
status: {podIP: 10.0.0.9}
---
apiVersion: v1
kind: Service
metadata: {name: istio-ingressgateway, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  ports: [{name: http2, port: 80, targetPort: web}, {name: https, port: 443, targetPort: 8443}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: istio-system, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  selector: {istio: ingressgateway}
  servers:
  - {port: {number: 80, name: http, protocol: HTTP}, hosts: ["shop/*.example.com", "*/static.example.com"]}
  - {port: {number: 80, name: http-redirect, protocol: HTTP}, hosts: [secure.example.com], tls: {httpsRedirect: true}}
  - {port: {number: 9000, name: http-9000, protocol: HTTP}, hosts: ["*"]}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: other, namespace: istio-system}
spec:
  selector: {istio: eastwest}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop-wild, namespace: shop, creationTimestamp: "2026-01-02T00:00:00Z"}
spec:
  hosts: ["*.example.com"]
  gateways: [istio-system/edge]
  http: [{name: wild, route: [{destination: {host: web}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop-www-b, namespace: shop, creationTimestamp: "2026-01-03T00:00:00Z"}
spec:
  hosts: [www.example.com]
  gateways: [istio-system/edge]
  http: [{name: www-b, route: [{destination: {host: web}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop-www-a, namespace: shop, creationTimestamp: "2026-01-02T12:00:00Z"}
spec:
  hosts: [www.example.com]
  gateways: [istio-system/edge, mesh]
  http: [{name: www-a, match: [{uri: {prefix: /a}}], route: [{destination: {host: web}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: intruder, namespace: other}
spec:
  hosts: [www.example.com]
  gateways: [istio-system/edge]
  http: [{name: intruder, route: [{destination: {host: web}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: hijack, namespace: other}
spec:
  hosts: ["*.example.com"]
  gateways: [istio-system/edge]
  http: [{name: hijack, route: [{destination: {host: web}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: static, namespace: other}
spec:
  hosts: [static.example.com]
  gateways: [istio-system/edge]
  http: [{name: static, route: [{destination: {host: web}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: hidden, namespace: shop}
spec:
  hosts: [hidden.example.com]
  gateways: [istio-system/edge]
  exportTo: ["."]
  http: [{name: hidden, route: [{destination: {host: web}}]}]
"#;

fn names(d: &Decision<'_>) -> Vec<String> {
    match d {
        Decision::Route { virtual_services, .. } => virtual_services.iter().map(|v| v.name.clone()).collect(),
        other => vec![format!("{other:?}")],
    }
}

/// Istio Gateway `servers[].hosts` ("ns/host": VirtualServices of that
/// namespace only; "*/host" or a bare host: any), VirtualService
/// `gateways` and `hosts` at a gateway, `exportTo`, and the merging of
/// VirtualServices for one host at a gateway (oldest first).
#[test]
fn servers_ports_and_virtual_service_binding() {
    let snap = snapshot(CLUSTER);
    let pod = snap.workloads.values().find(|w| w.name == "gw-1").unwrap();
    let open = snap.gateway_servers(pod);
    // Port 80 goes to the named target port; 9000 has no Service port
    // and listens as numbered. The other Gateway selects other pods.
    let ports: Vec<(&str, u16)> = open.iter().map(|o| (o.server.port_name.as_str(), o.port)).collect();
    assert_eq!(ports, [("http", 8080), ("http-redirect", 8080), ("http-9000", 9000)]);
    #[rustfmt::skip]
    let cases: &[(&str, u16, &str, &[&str])] = &[
        ("exact host: both of shop's, oldest first; other's is not admitted (shop/ only)", 8080, "www.example.com", &["shop-www-a", "shop-www-b"]),
        ("wildcard; other's *.example.com is not admitted for it (shop/ only), though it overlaps */static.example.com", 8080, "api.example.com", &["shop-wild"]),
        ("*/host admits any namespace; shop's *.example.com meets that server host too (Istio intersects the two and merges, oldest first)", 8080, "static.example.com", &["shop-wild", "hijack", "static"]),
        ("not exported to istio-system", 8080, "hidden.example.com", &["shop-wild"]),
        ("no server for the host", 8080, "example.org", &["NoServer"]),
        ("redirecting server", 8080, "secure.example.com", &["HttpsRedirect"]),
        ("`*` on 9000 admits every namespace's; without a creation time last", 9000, "www.example.com", &["shop-www-a", "shop-www-b", "intruder"]),
        ("no VirtualService for the host", 9000, "example.org", &[]),
        ("nothing on that port", 8443, "www.example.com", &["NoServer"]),
    ];
    for (what, port, host, want) in cases {
        let d = decide(&snap.virtual_services, &open, *port, host, "istio-system");
        assert_eq!(names(&d), *want, "{what}");
    }
    // Routing at the gateway: per-route matches apply, and the merged
    // list is tried in order.
    let Decision::Route { at, virtual_services, .. } = decide(&snap.virtual_services, &open, 8080, "www.example.com", "istio-system") else { panic!() };
    let info = |path| skiff_core::routing::RequestInfo { method: "GET", path, authority: "www.example.com", headers: &[], port: 80, scheme: "http" };
    let first = |path| virtual_services.iter().find_map(|v| v.route_at(&info(path), &at)).and_then(|r| r.name.clone());
    assert_eq!(first("/a/x").as_deref(), Some("www-a"));
    assert_eq!(first("/b").as_deref(), Some("www-b"));
    let merged = |path| route(&virtual_services, &info(path), &at).and_then(|(_, r)| r.name.clone());
    assert_eq!(merged("/a/x").as_deref(), Some("www-a"));
    assert_eq!(merged("/b").as_deref(), Some("www-b"));
}


/// Istio's gateway merge: within one VirtualService the first catch-all
/// ends its routes (`/api` after `/` is never reached, as at a sidecar);
/// across VirtualServices for one host, catch-alls go after every other
/// route.
#[test]
fn catch_all_routes_end_their_virtual_service_and_go_last_when_merged() {
    let text = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: a, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  hosts: [www.example.com]
  gateways: [istio-system/edge]
  http:
  - {name: a-root, match: [{uri: {prefix: /}}], route: [{destination: {host: web}}]}
  - {name: a-api, match: [{uri: {prefix: /api}}], route: [{destination: {host: web}}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: b, namespace: shop, creationTimestamp: "2026-01-02T00:00:00Z"}
spec:
  hosts: [www.example.com]
  gateways: [istio-system/edge]
  http:
  - {name: b-docs, match: [{uri: {prefix: /docs}}], route: [{destination: {host: web}}]}
"#;
    let snap = snapshot(text);
    let vss: Vec<_> = snap.virtual_services.iter().collect();
    let mut ordered = vss.clone();
    ordered.sort_by_key(|v| v.name.clone());
    let at = skiff_core::routing::Bind::Gateway { namespace: "istio-system".into(), name: "edge".into() };
    let name = |path| {
        let info = skiff_core::routing::RequestInfo { method: "GET", path, authority: "www.example.com", headers: &[], port: 80, scheme: "http" };
        route(&ordered, &info, &at).and_then(|(_, r)| r.name.clone())
    };
    assert_eq!(name("/docs/x").as_deref(), Some("b-docs"), "b's route before a's catch-all");
    assert_eq!(name("/api/x").as_deref(), Some("a-root"), "a-api comes after a's catch-all: never reached");
    assert_eq!(name("/other").as_deref(), Some("a-root"));
}

/// TCP and TLS passthrough servers (Istio TCPRoute/TLSRoute at a gateway):
/// the route a connection takes, by server, SNI, port and the address it
/// reached, among the VirtualServices bound to the server's Gateway whose
/// hosts the server admits, oldest first.
#[test]
fn tcp_and_tls_connections_take_the_first_matching_route_of_the_bound_virtual_services() {
    let s = snapshot(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: gw-1, namespace: istio-system, labels: {istio: ingressgateway}}
spec: {containers: [{name: gw}]}
status: {podIP: 10.0.0.9}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - {port: {number: 31400, name: tcp, protocol: TCP}, hosts: ["*"]}
  - {port: {number: 443, name: tls, protocol: TLS}, hosts: ["shop/*.example.com"], tls: {mode: PASSTHROUGH}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  hosts: ["*"]
  gateways: [istio-system/edge]
  tcp:
  - {match: [{port: 31400, destinationSubnets: [10.0.0.0/24]}], route: [{destination: {host: db-inside}}]}
  - {route: [{destination: {host: db-any}}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: later, namespace: shop, creationTimestamp: "2026-01-02T00:00:00Z"}
spec:
  hosts: ["*"]
  gateways: [istio-system/edge]
  tcp: [{route: [{destination: {host: never}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: sni, namespace: shop}
spec:
  hosts: ["*.example.com"]
  gateways: [istio-system/edge]
  tls:
  - {match: [{sniHosts: [a.example.com]}], route: [{destination: {host: a}}]}
  - {match: [{sniHosts: ["*.example.com"], port: 443}], route: [{destination: {host: rest}}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: exact-later, namespace: shop, creationTimestamp: "2026-03-01T00:00:00Z"}
spec:
  hosts: [c.example.com]
  gateways: [istio-system/edge]
  tls: [{match: [{sniHosts: [c.example.com]}], route: [{destination: {host: c-exact}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: elsewhere, namespace: other}
spec:
  hosts: [b.example.com]
  gateways: [istio-system/edge]
  tls: [{match: [{sniHosts: [b.example.com]}], route: [{destination: {host: stolen}}]}]
"#,
    );
    let pod = s.workloads.values().find(|w| w.name == "gw-1").unwrap();
    let open = s.gateway_servers(pod);
    let server = |name: &str| open.iter().find(|o| o.server.port_name == name).unwrap();
    let ip = |a: &str| a.parse::<std::net::IpAddr>().unwrap();
    let dest = |name: &str, sni: Option<&str>, local: &str| {
        skiff_core::gateway::route_l4(&s.virtual_services, server(name), sni, ip(local), "istio-system").map(|(_, r)| r.destinations[0].host.clone())
    };
    // What, server, SNI, the address reached, the destination.
    type Case<'a> = (&'a str, &'a str, Option<&'a str>, &'a str, Option<&'a str>);
    #[rustfmt::skip]
    let cases: &[Case] = &[
        ("TCP to an address in the match's subnets", "tcp", None, "10.0.0.9", Some("db-inside")),
        ("TCP elsewhere: the next route, of the oldest VirtualService", "tcp", None, "192.168.1.1", Some("db-any")),
        ("TLS by exact SNI", "tls", Some("a.example.com"), "10.0.0.9", Some("a")),
        ("TLS by wildcard SNI, case and trailing dot ignored", "tls", Some("D.Example.com."), "10.0.0.9", Some("rest")),
        ("TLS: the most specific sniHost wins across VirtualServices (Envoy's filter chains), not the oldest", "tls", Some("c.example.com"), "10.0.0.9", Some("c-exact")),
        ("TLS: a VirtualService of a namespace the server does not admit", "tls", Some("b.example.com"), "10.0.0.9", Some("rest")),
        ("TLS: an SNI no host takes", "tls", Some("example.org"), "10.0.0.9", None),
        ("TLS without SNI", "tls", None, "10.0.0.9", None),
    ];
    for (what, name, sni, local, want) in cases {
        assert_eq!(dest(name, *sni, local).as_deref(), *want, "{what}");
    }
}
