//! The proxy: per-pod listeners inside each enrolled pod's netns, and the
//! outbound and inbound connection handlers.

use std::{
    collections::{HashMap, HashSet},
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, RwLock,
    },
    time::Instant,
};

use aya::maps::{Map, MapData, SockHash};
use skiff_core::{
    model::{Snapshot, Workload},
    netns::{self, NetnsThread},
    zds::{Request, Response, WorkloadInfo, VERSION},
};
use skiff_ebpf_common::{MESH_PORTS, PORT_INBOUND_PLAINTEXT, PORT_OUTBOUND};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{debug, info, warn, Instrument};

use crate::{
    drain::Drain,
    metrics::{ConnCounters, ConnLabels, Metrics},
    sock,
    transport::{self, Transport},
};

/// ztunnel settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's name.
    pub node: String,
    /// SPIFFE trust domain of workload identities.
    pub trust_domain: String,
    /// bpffs directory of node-agent's pinned maps; when set, ztunnel
    /// registers each pod's inbound listener for sk_lookup capture.
    pub pin_dir: Option<std::path::PathBuf>,
}

struct PodCtx {
    info: RwLock<WorkloadInfo>,
    net: Arc<NetnsThread>,
}

struct Pod {
    ctx: Arc<PodCtx>,
    netns_id: (u64, u64),
    stop: watch::Sender<bool>,
}

/// Errors handling a node-agent request.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    /// An Add came without exactly one netns fd.
    #[error("Add must carry exactly one network-namespace fd, got {0}")]
    Fds(usize),
    /// The netns could not be entered.
    #[error("pod network namespace")]
    Netns(#[from] netns::NetnsError),
    /// A listener could not be created in the pod.
    #[error("creating listener {addr} in the pod")]
    Listen {
        addr: SocketAddrV4,
        #[source]
        source: io::Error,
    },
    /// node-agent's pinned capture map could not be opened.
    #[error("opening the inbound capture map {path} (is node-agent running?)")]
    OpenSockMap {
        path: String,
        #[source]
        source: aya::maps::MapError,
    },
    /// The inbound listener could not be registered for capture.
    #[error("registering the inbound listener in the capture map")]
    SockMap(#[source] aya::maps::MapError),
}

pub struct Ztunnel {
    cfg: Config,
    cluster: watch::Receiver<Arc<Snapshot>>,
    pub metrics: Arc<Metrics>,
    pub drain: Drain,
    transport: Transport,
    pods: Mutex<HashMap<String, Pod>>,
    session_seen: Mutex<HashSet<String>>,
    ready: AtomicBool,
    /// node-agent's inbound capture map, opened on first use (node-agent
    /// may start after ztunnel).
    sockmap: Mutex<Option<SockHash<MapData, u32>>>,
    round_robin: Mutex<HashMap<String, usize>>,
}

/// Why a connection could not be proxied; becomes the response flag.
#[derive(Clone, Copy, Debug)]
enum Refusal {
    /// No route: the destination is ztunnel itself or a mesh port.
    NoRoute,
    /// A Service with no ready endpoint.
    NoHealthyUpstream,
    /// The upstream connection failed.
    UpstreamFailure,
}

impl Refusal {
    fn flag(self) -> &'static str {
        match self {
            Refusal::NoRoute => "NR",
            Refusal::NoHealthyUpstream => "UH",
            Refusal::UpstreamFailure => "UF",
        }
    }
}

impl Ztunnel {
    pub fn new(cfg: Config, cluster: watch::Receiver<Arc<Snapshot>>) -> anyhow::Result<Arc<Ztunnel>> {
        let sockmap = Mutex::new(None);
        Ok(Arc::new(Ztunnel {
            cfg,
            cluster,
            metrics: Arc::new(Metrics::new()),
            drain: Drain::new(),
            transport: Transport::default(),
            pods: Mutex::new(HashMap::new()),
            session_seen: Mutex::new(HashSet::new()),
            ready: AtomicBool::new(false),
            sockmap,
            round_robin: Mutex::new(HashMap::new()),
        }))
    }

    /// Ready once node-agent has sent a complete snapshot.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !*self.drain.signal().borrow()
    }

    /// Handles one node-agent request.
    pub async fn handle(self: &Arc<Self>, req: Request, mut fds: Vec<OwnedFd>) -> Response {
        match req {
            Request::Hello { version, node } => {
                if version != VERSION {
                    return Response::Error { message: format!("protocol version {version} not supported (want {VERSION})") };
                }
                if node != self.cfg.node {
                    warn!(agent_node = %node, ztunnel_node = %self.cfg.node, "node-agent reports a different node name");
                }
                self.session_seen.lock().expect("lock").clear();
                info!("node-agent connected");
                Response::Ack
            }
            Request::Add { workload } => {
                if fds.len() != 1 {
                    return error_response(&AddError::Fds(fds.len()));
                }
                let fd = fds.remove(0);
                match self.add(workload, fd).await {
                    Ok(()) => Response::Ack,
                    Err(e) => error_response(&e),
                }
            }
            Request::Del { uid } => {
                self.remove(&uid, "released by node-agent");
                Response::Ack
            }
            Request::SnapshotSent => {
                let seen = self.session_seen.lock().expect("lock").clone();
                let stale: Vec<String> =
                    self.pods.lock().expect("lock").keys().filter(|k| !seen.contains(*k)).cloned().collect();
                for uid in stale {
                    self.remove(&uid, "not in node-agent's snapshot");
                }
                self.ready.store(true, Ordering::Release);
                info!(pods = seen.len(), "snapshot reconciled");
                Response::Ack
            }
        }
    }

    async fn add(self: &Arc<Self>, info: WorkloadInfo, fd: OwnedFd) -> Result<(), AddError> {
        let netns_id = netns::identity(fd.as_fd()).map_err(|e| netns::NetnsError::Open { path: "fd".into(), source: e })?;
        let uid = info.uid.clone();
        self.session_seen.lock().expect("lock").insert(uid.clone());
        {
            let pods = self.pods.lock().expect("lock");
            if let Some(p) = pods.get(&uid) {
                if p.netns_id == netns_id {
                    *p.ctx.info.write().expect("lock") = info;
                    return Ok(());
                }
            }
        }
        self.remove(&uid, "pod network namespace changed");
        let pod_name = format!("{}/{}", info.namespace, info.name);
        let net = Arc::new(NetnsThread::spawn(pod_name.clone(), fd)?);
        let out_addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, PORT_OUTBOUND);
        let in_addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, PORT_INBOUND_PLAINTEXT);
        let (out_l, in_l) = net.run(move || (sock::listener(out_addr), sock::listener(in_addr)))?;
        let out_l = out_l.map_err(|source| AddError::Listen { addr: out_addr, source })?;
        let in_l = in_l.map_err(|source| AddError::Listen { addr: in_addr, source })?;
        if let Some(dir) = &self.cfg.pin_dir {
            let mut map = self.sockmap.lock().expect("lock");
            if map.is_none() {
                *map = Some(open_sockmap(dir)?);
            }
            map.as_mut()
                .expect("opened above")
                .insert(u32::from(info.ip).to_be(), in_l.as_raw_fd(), 0)
                .map_err(AddError::SockMap)?;
        }
        let out_l = TcpListener::from_std(out_l).map_err(|source| AddError::Listen { addr: out_addr, source })?;
        let in_l = TcpListener::from_std(in_l).map_err(|source| AddError::Listen { addr: in_addr, source })?;
        let ctx = Arc::new(PodCtx { info: RwLock::new(info.clone()), net });
        let (stop, _) = watch::channel(false);
        tokio::spawn(self.clone().accept_loop(out_l, Direction::Outbound, ctx.clone(), stop.subscribe()));
        tokio::spawn(self.clone().accept_loop(in_l, Direction::Inbound, ctx.clone(), stop.subscribe()));
        self.pods.lock().expect("lock").insert(uid, Pod { ctx, netns_id, stop });
        self.metrics.workloads.set(self.pods.lock().expect("lock").len() as i64);
        info!(pod = %pod_name, ip = %info.ip, "pod added: listening on 15001 (outbound) and 15006 (inbound)");
        Ok(())
    }

    fn remove(&self, uid: &str, reason: &str) {
        let removed = self.pods.lock().expect("lock").remove(uid);
        if let Some(p) = removed {
            let _ = p.stop.send(true);
            let info = p.ctx.info.read().expect("lock").clone();
            info!(pod = %format!("{}/{}", info.namespace, info.name), %reason, "pod removed: listeners closed, open connections drain");
        }
        self.metrics.workloads.set(self.pods.lock().expect("lock").len() as i64);
    }

    /// Names of pods held, for tests and the admin view.
    pub fn pod_uids(&self) -> Vec<String> {
        let mut v: Vec<String> = self.pods.lock().expect("lock").keys().cloned().collect();
        v.sort();
        v
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        dir: Direction,
        pod: Arc<PodCtx>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut drain = self.drain.signal();
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((stream, peer)) => {
                        let zt = self.clone();
                        let pod = pod.clone();
                        let guard = self.drain.track();
                        tokio::spawn(async move {
                            let _guard = guard;
                            match dir {
                                Direction::Outbound => zt.outbound(pod, stream, peer).await,
                                Direction::Inbound => zt.inbound(pod, stream, peer).await,
                            }
                        });
                    }
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
                _ = stop.changed() => break,
                _ = drain.changed() => break,
            }
        }
        // Dropping the listener closes it; the kernel removes it from the
        // capture map, so new connections are refused, never bypassed.
    }

    fn principal(&self, namespace: &str, service_account: &str) -> String {
        format!("spiffe://{}/ns/{}/sa/{}", self.cfg.trust_domain, namespace, service_account)
    }

    fn pick_endpoint(
        &self,
        snap: &Snapshot,
        dst: SocketAddrV4,
    ) -> Result<(SocketAddrV4, Option<(String, String)>), Refusal> {
        let Some((svc, port)) = snap.service_by_vip(*dst.ip(), dst.port()) else {
            return Ok((dst, None));
        };
        let eps = snap.endpoints(svc, port);
        if eps.is_empty() {
            return Err(Refusal::NoHealthyUpstream);
        }
        let key = format!("{}/{}:{}", svc.namespace, svc.name, port.port);
        let n = {
            let mut rr = self.round_robin.lock().expect("lock");
            let c = rr.entry(key).or_insert(0);
            *c = c.wrapping_add(1);
            *c
        };
        let (w, target_port) = eps[n % eps.len()];
        let ip = w.ip.expect("ready endpoints have an IP");
        Ok((SocketAddrV4::new(ip, target_port), Some((svc.name.clone(), svc.namespace.clone()))))
    }

    fn local_labels(&self, info: &WorkloadInfo) -> (String, String, String, String) {
        (
            info.workload_name.clone(),
            info.namespace.clone(),
            self.principal(&info.namespace, &info.service_account),
            info.labels.get("app").cloned().unwrap_or_else(|| "unknown".into()),
        )
    }

    fn remote_labels(&self, w: Option<&Workload>) -> (String, String, String, String) {
        match w {
            Some(w) => (
                w.workload_name.clone(),
                w.namespace.clone(),
                self.principal(&w.namespace, &w.service_account),
                w.labels.get("app").cloned().unwrap_or_else(|| "unknown".into()),
            ),
            None => ("unknown".into(), "unknown".into(), "unknown".into(), "unknown".into()),
        }
    }

    async fn outbound(self: Arc<Self>, pod: Arc<PodCtx>, client: TcpStream, peer: SocketAddr) {
        let start = Instant::now();
        let info = pod.info.read().expect("lock").clone();
        let orig = match sock::original_dst(&client) {
            Ok(a) => a,
            Err(e) => {
                warn!(pod = %format!("{}/{}", info.namespace, info.name), %peer, error = %e,
                    "outbound connection without an original destination; closed");
                return;
            }
        };
        let snap = self.cluster.borrow().clone();
        let span = tracing::info_span!("outbound", pod = %format!("{}/{}", info.namespace, info.name), dst = %orig);
        async move {
            let (sw, sns, sp, sapp) = self.local_labels(&info);
            let routed = if orig.ip().is_loopback() || (*orig.ip() == info.ip && MESH_PORTS.contains(&orig.port())) {
                Err(Refusal::NoRoute)
            } else {
                self.pick_endpoint(&snap, orig)
            };
            let (target, service) = match &routed {
                Ok((t, s)) => (Some(*t), s.clone()),
                Err(_) => (None, None),
            };
            let dst_w = target.and_then(|t| snap.workload_by_ip(*t.ip()));
            let (dw, dns, dp, dapp) = self.remote_labels(dst_w);
            let (svc_name, svc_ns) = service.clone().unwrap_or_else(|| ("unknown".into(), "unknown".into()));
            let mut labels = ConnLabels {
                reporter: "source",
                source_workload: sw,
                source_namespace: sns,
                source_principal: sp,
                source_app: sapp,
                destination_workload: dw,
                destination_namespace: dns,
                destination_principal: dp,
                destination_app: dapp,
                destination_service: service
                    .as_ref()
                    .map(|(n, ns)| format!("{n}.{ns}.svc.cluster.local"))
                    .unwrap_or_else(|| orig.ip().to_string()),
                destination_service_name: svc_name,
                destination_service_namespace: svc_ns,
                response_flags: "-",
                security_policy: self.transport.security_policy(),
            };
            let upstream = match routed {
                Err(r) => Err(r),
                Ok((t, _)) => self.transport.connect(&pod.net, t).await.map_err(|e| {
                    debug!(error = %e, upstream = %t, "upstream connect failed");
                    Refusal::UpstreamFailure
                }),
            };
            match upstream {
                Ok(up) => {
                    let counters = self.metrics.connection(&labels);
                    counters.opened.inc();
                    let (rx, tx) = relay(client, up, &counters, &self.metrics).await;
                    counters.closed.inc();
                    access_log("outbound", peer, orig, target, &labels, tx, rx, start);
                }
                Err(r) => {
                    labels.response_flags = r.flag();
                    let counters = self.metrics.connection(&labels);
                    counters.opened.inc();
                    counters.closed.inc();
                    access_log("outbound", peer, orig, target, &labels, 0, 0, start);
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn inbound(self: Arc<Self>, pod: Arc<PodCtx>, client: TcpStream, peer: SocketAddr) {
        let start = Instant::now();
        let info = pod.info.read().expect("lock").clone();
        let (Some(dst), Some(peer4)) = (client.local_addr().ok().and_then(sock::v4), sock::v4(peer)) else {
            warn!(%peer, "inbound connection with a non-IPv4 address; closed");
            return;
        };
        let snap = self.cluster.borrow().clone();
        let span = tracing::info_span!("inbound", pod = %format!("{}/{}", info.namespace, info.name), src = %peer4, dst = %dst);
        async move {
            let src_w = snap.workload_by_ip(*peer4.ip());
            let (sw, sns, sp, sapp) = self.remote_labels(src_w);
            let (dw, dns, dp, dapp) = self.local_labels(&info);
            let local = snap.workloads.values().find(|w| w.uid == info.uid);
            let service = local.and_then(|w| snap.services_of(w).find(|s| s.ports.iter().any(|p| match &p.target_port {
                skiff_core::model::TargetPort::Number(n) => *n == dst.port(),
                skiff_core::model::TargetPort::Name(n) => w.named_ports.get(n) == Some(&dst.port()),
            })));
            let mut labels = ConnLabels {
                reporter: "destination",
                source_workload: sw,
                source_namespace: sns,
                source_principal: sp,
                source_app: sapp,
                destination_workload: dw,
                destination_namespace: dns,
                destination_principal: dp,
                destination_app: dapp,
                destination_service: service.map(|s| s.hostname()).unwrap_or_else(|| "unknown".into()),
                destination_service_name: service.map(|s| s.name.clone()).unwrap_or_else(|| "unknown".into()),
                destination_service_namespace: service.map(|s| s.namespace.clone()).unwrap_or_else(|| "unknown".into()),
                response_flags: "-",
                security_policy: self.transport.security_policy(),
            };
            let upstream = if MESH_PORTS.contains(&dst.port()) {
                Err(Refusal::NoRoute)
            } else {
                let made = pod.net.run(move || sock::delivery(peer4));
                match made {
                    Ok(Ok(s)) => transport::connect_socket(s, dst).await.map_err(|e| {
                        debug!(error = %e, "delivery to the application failed");
                        Refusal::UpstreamFailure
                    }),
                    Ok(Err(e)) => {
                        warn!(error = %e, "cannot create delivery socket");
                        Err(Refusal::UpstreamFailure)
                    }
                    Err(e) => {
                        warn!(error = %skiff_core::report(&e), "pod netns thread gone");
                        Err(Refusal::UpstreamFailure)
                    }
                }
            };
            match upstream {
                Ok(app) => {
                    let counters = self.metrics.connection(&labels);
                    counters.opened.inc();
                    let (rx, tx) = relay(client, app, &counters, &self.metrics).await;
                    counters.closed.inc();
                    access_log("inbound", peer, dst, Some(dst), &labels, tx, rx, start);
                }
                Err(r) => {
                    labels.response_flags = r.flag();
                    let counters = self.metrics.connection(&labels);
                    counters.opened.inc();
                    counters.closed.inc();
                    access_log("inbound", peer, dst, Some(dst), &labels, 0, 0, start);
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Closes every pod's listeners (drain start).
    pub fn stop_listeners(&self) {
        for p in self.pods.lock().expect("lock").values() {
            let _ = p.stop.send(true);
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Direction {
    Outbound,
    Inbound,
}

fn error_response(e: &(dyn std::error::Error + 'static)) -> Response {
    let message = skiff_core::report(e);
    warn!(error = %message, "node-agent request failed");
    Response::Error { message }
}

fn open_sockmap(pin_dir: &Path) -> Result<SockHash<MapData, u32>, AddError> {
    let path = pin_dir.join("maps").join("INBOUND_SOCKS");
    let err = |source| AddError::OpenSockMap { path: path.display().to_string(), source };
    let data = MapData::from_pin(&path).map_err(err)?;
    SockHash::try_from(Map::SockHash(data)).map_err(err)
}

#[allow(clippy::too_many_arguments)]
fn access_log(
    direction: &'static str,
    src: SocketAddr,
    orig_dst: SocketAddrV4,
    upstream: Option<SocketAddrV4>,
    l: &ConnLabels,
    bytes_sent: u64,
    bytes_received: u64,
    start: Instant,
) {
    info!(
        target: "access",
        direction,
        src.addr = %src,
        src.workload = %l.source_workload,
        src.namespace = %l.source_namespace,
        src.identity = %l.source_principal,
        dst.addr = %orig_dst,
        dst.upstream = %upstream.map(|u| u.to_string()).unwrap_or_else(|| "-".into()),
        dst.service = %l.destination_service,
        dst.workload = %l.destination_workload,
        dst.namespace = %l.destination_namespace,
        dst.identity = %l.destination_principal,
        bytes_sent,
        bytes_received,
        duration_ms = start.elapsed().as_millis() as u64,
        response_flags = l.response_flags,
        security = l.security_policy,
        "connection complete"
    );
}

/// Copies both ways until both sides are done, counting bytes as they pass.
/// Returns (client→server, server→client) byte counts.
async fn relay(client: TcpStream, server: TcpStream, c: &ConnCounters, m: &Metrics) -> (u64, u64) {
    m.active_connections.inc();
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = copy_counted(cr, sw, &c.received);
    let down = copy_counted(sr, cw, &c.sent);
    let r = tokio::join!(up, down);
    m.active_connections.dec();
    r
}

async fn copy_counted(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    counter: &prometheus::IntCounter,
) -> u64 {
    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if w.write_all(&buf[..n]).await.is_err() {
            break;
        }
        counter.inc_by(n as u64);
        total += n as u64;
    }
    let _ = w.shutdown().await;
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_core::{k8s::parse_documents, model::Snapshot};

    fn snapshot(text: &str) -> Arc<Snapshot> {
        let objs = parse_documents(text).unwrap().into_iter().map(|o| ("t".to_owned(), o)).collect();
        Arc::new(Snapshot::from_objects(objs).unwrap())
    }

    fn ztunnel(snap: Arc<Snapshot>) -> Arc<Ztunnel> {
        let (_tx, rx) = watch::channel(snap);
        let cfg = Config { node: "n1".into(), trust_domain: "cluster.local".into(), pin_dir: None };
        Ztunnel::new(cfg, rx).unwrap()
    }

    const CLUSTER: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: ns, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {phase: Running, podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: ns, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8081}]}]}
status: {phase: Running, podIP: 10.0.0.2}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: ns}
spec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{port: 80, targetPort: http}]}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: ns}
spec: {clusterIP: 10.96.0.2, selector: {app: none}, ports: [{port: 80}]}
"#;

    #[test]
    fn cluster_ip_connections_alternate_between_ready_endpoints() {
        let snap = snapshot(CLUSTER);
        let zt = ztunnel(snap.clone());
        let vip = SocketAddrV4::new("10.96.0.1".parse().unwrap(), 80);
        let picks: Vec<SocketAddrV4> = (0..4).map(|_| zt.pick_endpoint(&snap, vip).unwrap().0).collect();
        let a = SocketAddrV4::new("10.0.0.1".parse().unwrap(), 8080);
        let b = SocketAddrV4::new("10.0.0.2".parse().unwrap(), 8081);
        assert!(picks == vec![b, a, b, a] || picks == vec![a, b, a, b], "{picks:?}");
        let (_, svc) = zt.pick_endpoint(&snap, vip).unwrap();
        assert_eq!(svc, Some(("web".to_owned(), "ns".to_owned())));
    }

    #[test]
    fn service_without_endpoints_is_no_healthy_upstream_and_pod_ips_pass_through() {
        let snap = snapshot(CLUSTER);
        let zt = ztunnel(snap.clone());
        let empty = SocketAddrV4::new("10.96.0.2".parse().unwrap(), 80);
        assert!(matches!(zt.pick_endpoint(&snap, empty), Err(Refusal::NoHealthyUpstream)));
        let direct = SocketAddrV4::new("10.0.0.2".parse().unwrap(), 9999);
        assert_eq!(zt.pick_endpoint(&snap, direct).unwrap(), (direct, None));
    }

    #[tokio::test]
    async fn node_agent_requests_are_validated() {
        let zt = ztunnel(snapshot(CLUSTER));
        let resp = zt.handle(Request::Hello { version: 99, node: "n1".into() }, vec![]).await;
        assert!(matches!(resp, Response::Error { message } if message.contains("version 99")));
        assert_eq!(zt.handle(Request::Hello { version: VERSION, node: "n1".into() }, vec![]).await, Response::Ack);
        let w = WorkloadInfo {
            uid: "u".into(),
            namespace: "ns".into(),
            name: "a".into(),
            workload_name: "a".into(),
            service_account: "default".into(),
            node: "n1".into(),
            ip: "10.0.0.1".parse().unwrap(),
            labels: Default::default(),
        };
        let resp = zt.handle(Request::Add { workload: w }, vec![]).await;
        assert!(matches!(&resp, Response::Error { message } if message.contains("exactly one")), "{resp:?}");
        assert!(!zt.is_ready());
        assert_eq!(zt.handle(Request::SnapshotSent, vec![]).await, Response::Ack);
        assert!(zt.is_ready());
        assert!(zt.pod_uids().is_empty());
    }
}
