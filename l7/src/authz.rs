//! AuthorizationPolicy at the proxy: the policies bound to it (targetRefs
//! naming it as a Gateway, or the Service), checked against the HBONE
//! peer's identity — at L4 for streams to non-HTTP ports, at L7 for each
//! request. The decision is `skiff_core::policy`'s.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use skiff_core::{
    model::{ServiceInfo, Snapshot},
    policy::{self, AuthzPolicy},
    routing::RequestInfo,
};
use skiff_hbone::identity::Identity;
use tracing::info;

use crate::errors::Failure;

/// The policies in force for traffic to `service` (a Service, or a
/// ServiceEntry's host) at the proxy named `proxy_name` in
/// `proxy_namespace`: those naming the proxy, or the Service or
/// ServiceEntry, in `targetRefs`.
pub fn bound<'s>(snap: &'s Snapshot, proxy_namespace: &str, proxy_name: &str, service: &ServiceInfo) -> Vec<&'s AuthzPolicy> {
    let target = match &service.entry {
        Some(entry) => ("ServiceEntry", entry.as_str()),
        None => ("Service", service.name.as_str()),
    };
    snap.authorization_policies.iter().filter(|p| p.targets(proxy_namespace, proxy_name, target)).collect()
}

/// The policies in force at the ingress gateway: those selecting its pod
/// (as on any workload; the root namespace's apply mesh-wide).
pub fn selecting<'s>(snap: &'s Snapshot, pod: &skiff_core::model::Workload) -> Vec<&'s AuthzPolicy> {
    snap.authorization_policies
        .iter()
        .filter(|p| p.applies_to(skiff_core::routing::DEFAULT_ROOT_NAMESPACE, &pod.namespace, &pod.labels))
        .collect()
}

/// A stream to a non-HTTP port (`target`: the Service's address at a
/// waypoint, the gateway's own at the gateway): no L7 here, but the
/// policies bound to the proxy still apply at L4 (the destination only
/// sees the proxy's identity). The decision (None: no policy applies, the
/// stream is allowed); a denial is logged.
pub fn check_stream(policies: &[&AuthzPolicy], peer: SocketAddr, peer_id: Option<&Identity>, target: SocketAddrV4) -> Option<policy::AuthzDecision> {
    if policies.is_empty() {
        return None;
    }
    let d = decide_stream(policies, peer.ip(), peer_id, target);
    if !d.allowed {
        info!(%peer, %target, identity = ?peer_id.map(|p| p.to_string()), policy = ?d.policy, rule = ?d.rule, reason = d.reason, "TCP stream denied by authorization policy");
    }
    Some(d)
}

/// One request (normalized path and authority) to `dst_ip` (the
/// Service's address at a waypoint, the gateway's own at the gateway);
/// allowed when no policy is bound. Logs a denial. The decision as the
/// access line gives it (None: no policy is bound), in the error too.
pub fn check_request(
    policies: &[&AuthzPolicy],
    peer: SocketAddr,
    peer_id: Option<&Identity>,
    dst_ip: Ipv4Addr,
    req: &RequestInfo<'_>,
) -> Result<Option<String>, (Failure, String)> {
    if policies.is_empty() {
        return Ok(None);
    }
    let d = decide_request(policies, peer.ip(), peer_id, dst_ip, req);
    if !d.allowed {
        let identity = peer_id.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        info!(method = %req.method, path = %req.path, %peer, %identity, policy = ?d.policy, rule = ?d.rule, reason = d.reason, "request denied by authorization policy");
        return Err((Failure::Denied, d.access_text()));
    }
    Ok(Some(d.access_text()))
}

/// The L7 decision for one request (see [`check_request`]), without
/// logging: what `skiff explain` prints.
pub fn decide_request(policies: &[&AuthzPolicy], peer_ip: IpAddr, peer_id: Option<&Identity>, dst_ip: Ipv4Addr, req: &RequestInfo<'_>) -> policy::AuthzDecision {
    let host = skiff_core::routing::host_of(req.authority);
    let attrs = policy::L7Attrs { method: req.method, path: req.path.split('?').next().unwrap_or("/"), host, headers: req.headers };
    let c = policy::ConnInfo {
        src_ip: peer_ip,
        principal: peer_id.map(Identity::principal),
        src_namespace: peer_id.map(|p| p.namespace.clone()),
        dst_ip: IpAddr::V4(dst_ip),
        dst_port: req.port,
    };
    policy::evaluate_l7(policies, &c, &attrs)
}

/// The L4 decision for a stream to a non-HTTP port (see [`check_stream`]),
/// without logging.
pub fn decide_stream(policies: &[&AuthzPolicy], peer_ip: IpAddr, peer_id: Option<&Identity>, target: SocketAddrV4) -> policy::AuthzDecision {
    let c = policy::ConnInfo {
        src_ip: peer_ip,
        principal: peer_id.map(Identity::principal),
        src_namespace: peer_id.map(|p| p.namespace.clone()),
        dst_ip: IpAddr::V4(*target.ip()),
        dst_port: target.port(),
    };
    policy::evaluate(policies, &c)
}
