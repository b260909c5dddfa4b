//! The proxy: per-pod listeners inside each enrolled pod's netns, and the
//! connection handlers.
//!
//! - outbound (15001): captured connects; to a mesh workload over HBONE
//!   (mTLS, the destination's identity verified), otherwise plain TCP;
//! - inbound HBONE (15008, pod IP): mTLS from other ztunnels; each CONNECT
//!   stream is authorized and delivered to the app;
//! - inbound plaintext (15006, via sk_lookup): refused under STRICT
//!   PeerAuthentication, otherwise authorized and delivered.

use std::{
    collections::{HashMap, HashSet},
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};

use aya::maps::{Map, MapData, SockHash};
use bytes::Bytes;
use http::{Response as HttpResponse, StatusCode};
use skiff_core::{
    outbound,
    model::{Snapshot, Workload},
    netns::{self, NetnsThread},
    policy::{self, AuthzDecision, ConnInfo, MtlsMode},
    zds::{Request, Response, WorkloadInfo, VERSION},
};
use skiff_ebpf_common::{MESH_PORTS, PORT_INBOUND_HBONE, PORT_INBOUND_PLAINTEXT, PORT_OUTBOUND};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::AbortHandle,
};
use tracing::{debug, info, warn, Instrument};

use skiff_hbone::{
    certs::CertManager,
    drain::Drain,
    identity::{self, Identity},
    sock, transport,
    tunnel::{self as hbone, Pool},
};

use crate::metrics::{ConnCounters, ConnLabels, Metrics, Peer};

/// ztunnel settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's name.
    pub node: String,
    /// Namespace whose policies apply mesh-wide (Istio's root namespace).
    pub root_namespace: String,
    /// bpffs directory of node-agent's pinned maps; when set, ztunnel
    /// registers each pod's inbound listener for sk_lookup capture.
    pub pin_dir: Option<std::path::PathBuf>,
    /// Send mesh-to-mesh traffic as plain TCP instead of HBONE. Only for
    /// pricing mTLS in benchmarks: it turns the mesh's encryption off.
    pub plaintext_mesh: bool,
    /// Plaintext from the node's own addresses (kubelet health probes)
    /// reaches enrolled pods even under STRICT PeerAuthentication and
    /// AuthorizationPolicy. Off: such traffic is treated like any other.
    pub node_probes: bool,
    /// HBONE handshake and connection bounds, idle timeouts, keepalives.
    pub hbone: skiff_hbone::limits::HboneLimits,
    /// How long a metric series of a workload or Service that is gone
    /// stays (Prometheus scrapes its last counts meanwhile).
    pub series_grace: Duration,
    /// A client of the admin, metrics or readiness endpoint that has not
    /// sent its request headers within this long is dropped.
    pub admin_header_timeout: Duration,
    /// Istio's `outboundTrafficPolicy.mode`: under REGISTRY_ONLY a
    /// connection from an enrolled pod to an address that is neither a
    /// Service, a pod nor a ServiceEntry is refused.
    pub outbound_policy: skiff_core::egress::OutboundPolicy,
}

impl Config {
    /// Defaults for everything but the node's name (tests, tools).
    pub fn for_node(node: &str) -> Config {
        Config {
            node: node.to_owned(),
            root_namespace: "istio-system".into(),
            pin_dir: None,
            plaintext_mesh: false,
            node_probes: true,
            hbone: Default::default(),
            series_grace: Duration::from_secs(300),
            admin_header_timeout: Duration::from_secs(5),
            outbound_policy: Default::default(),
        }
    }
}

/// The node's own IPv4 addresses. ztunnel runs in the node's network
/// namespace, so these are the sources kubelet's health probes come from
/// (the address of the interface towards the pod: a bridge gateway or the
/// host's own IP). Re-read at most every 5 s, and at most every 0.5 s on a
/// miss (an address added since).
struct NodeAddrs {
    cache: Mutex<(Option<Instant>, HashSet<Ipv4Addr>)>,
}

impl NodeAddrs {
    fn new() -> NodeAddrs {
        NodeAddrs { cache: Mutex::new((None, HashSet::new())) }
    }

    fn read() -> HashSet<Ipv4Addr> {
        let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return HashSet::new() };
        addrs
            .filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
            .filter(|ip| !ip.is_loopback())
            .collect()
    }

    fn contains(&self, ip: Ipv4Addr) -> bool {
        let mut c = self.cache.lock().expect("lock");
        let age = c.0.map(|t| t.elapsed());
        let stale = age.is_none_or(|a| a > Duration::from_secs(5) || (!c.1.contains(&ip) && a > Duration::from_millis(500)));
        if stale {
            *c = (Some(Instant::now()), Self::read());
        }
        c.1.contains(&ip)
    }
}

struct PodCtx {
    info: RwLock<WorkloadInfo>,
    net: Arc<NetnsThread>,
}

struct Pod {
    ctx: Arc<PodCtx>,
    netns_id: (u64, u64),
    stop: watch::Sender<bool>,
    /// The inbound listener, for (re-)registration in the capture map. It
    /// stays open as long as its accept loop runs, which outlives the Pod
    /// entry only while the loop notices `stop`.
    inbound_fd: std::os::fd::RawFd,
}

/// An authorized inbound connection, re-checked when policies change.
struct ActiveConn {
    pod_uid: String,
    info: ConnInfo,
    abort: AbortHandle,
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
    /// The pod's certificate could not be issued.
    #[error("pod certificate")]
    Identity(#[from] skiff_hbone::certs::CertError),
}

pub struct Ztunnel {
    cfg: Config,
    cluster: watch::Receiver<Arc<Snapshot>>,
    pub metrics: Arc<Metrics>,
    pub drain: Drain,
    pub certs: Arc<CertManager>,
    pool: Pool,
    pods: Mutex<HashMap<String, Pod>>,
    session_seen: Mutex<HashSet<String>>,
    ready: AtomicBool,
    /// node-agent's inbound capture map, opened on first use (node-agent
    /// may start after ztunnel).
    sockmap: Mutex<Option<SockHash<MapData, u32>>>,
    round_robin: Mutex<HashMap<String, usize>>,
    active: Mutex<HashMap<u64, ActiveConn>>,
    next_conn: AtomicU64,
    /// Bounds HBONE handshakes and established connections node-wide and
    /// per peer.
    admission: Arc<skiff_hbone::limits::Admission>,
    node_addrs: NodeAddrs,
    /// Addresses of the names DNS ServiceEntries name, as last resolved
    /// (every 30 s and when the names change).
    resolved: Arc<skiff_hbone::names::NameCache>,
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
    /// Authorization policy denied it.
    Denied,
    /// Plaintext arrived where PeerAuthentication requires mTLS.
    MtlsRequired,
    /// REGISTRY_ONLY: the destination is not in the mesh's registry.
    RegistryOnly,
}

impl Refusal {
    fn flag(self) -> &'static str {
        match self {
            Refusal::NoRoute | Refusal::RegistryOnly => "NR",
            Refusal::NoHealthyUpstream => "UH",
            Refusal::UpstreamFailure => "UF",
            Refusal::Denied | Refusal::MtlsRequired => "UAEX",
        }
    }
}

impl Ztunnel {
    pub fn new(cfg: Config, cluster: watch::Receiver<Arc<Snapshot>>, certs: Arc<CertManager>) -> anyhow::Result<Arc<Ztunnel>> {
        let hbone = cfg.hbone.clone();
        if let Some(pin_dir) = cfg.pin_dir.clone() {
            // Every socket ztunnel makes in a pod is registered with the
            // capture programs before its bind or connect (the marks alone
            // are forgeable).
            sock::set_registrar(Box::new(move |cookie| register_mesh_socket(&pin_dir, cookie)));
        }
        Ok(Arc::new(Ztunnel {
            cfg,
            cluster,
            metrics: Arc::new(Metrics::new()),
            drain: Drain::new(),
            pool: Pool::new(certs.clone(), hbone.clone()),
            admission: skiff_hbone::limits::Admission::new(hbone),
            certs,
            pods: Mutex::new(HashMap::new()),
            session_seen: Mutex::new(HashSet::new()),
            ready: AtomicBool::new(false),
            sockmap: Mutex::new(None),
            round_robin: Mutex::new(HashMap::new()),
            active: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            node_addrs: NodeAddrs::new(),
            resolved: skiff_hbone::names::NameCache::new(),
        }))
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.cfg.node
    }

    /// Ready once node-agent has sent a complete snapshot.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !*self.drain.signal().borrow()
    }

    fn identity(&self, namespace: &str, service_account: &str) -> Identity {
        Identity::new(self.certs.trust_domain(), namespace, service_account)
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
                // node-agent may have re-created its maps (uninstall + run):
                // open the pinned map afresh; every Add re-registers.
                *self.sockmap.lock().expect("lock") = None;
                *MESH_SOCKS.lock().expect("lock") = None;
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
        let existing = {
            let pods = self.pods.lock().expect("lock");
            pods.get(&uid).filter(|p| p.netns_id == netns_id).map(|p| {
                *p.ctx.info.write().expect("lock") = info.clone();
                p.inbound_fd
            })
        };
        if let Some(fd) = existing {
            self.register_inbound(info.ip, fd)?;
            // New labels may bring the pod under other policies.
            self.reevaluate();
            return Ok(());
        }
        self.remove(&uid, "pod network namespace changed");
        let pod_name = format!("{}/{}", info.namespace, info.name);
        let id = self.identity(&info.namespace, &info.service_account);
        self.certs.ensure(&id).await?;
        let tls = self.certs.server_config(id)?;
        let net = Arc::new(NetnsThread::spawn(pod_name.clone(), fd)?);
        let out_addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, PORT_OUTBOUND);
        let in_addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, PORT_INBOUND_PLAINTEXT);
        let hbone_addr = SocketAddrV4::new(info.ip, PORT_INBOUND_HBONE);
        let (out_l, in_l, hbone_l) =
            net.run(move || (sock::listener(out_addr), sock::listener(in_addr), sock::listener(hbone_addr)))?;
        let out_l = out_l.map_err(|source| AddError::Listen { addr: out_addr, source })?;
        let in_l = in_l.map_err(|source| AddError::Listen { addr: in_addr, source })?;
        let hbone_l = hbone_l.map_err(|source| AddError::Listen { addr: hbone_addr, source })?;
        let inbound_fd = in_l.as_raw_fd();
        self.register_inbound(info.ip, inbound_fd)?;
        let listen = |l: std::net::TcpListener, addr| TcpListener::from_std(l).map_err(|source| AddError::Listen { addr, source });
        let (out_l, in_l, hbone_l) = (listen(out_l, out_addr)?, listen(in_l, in_addr)?, listen(hbone_l, hbone_addr)?);
        let ctx = Arc::new(PodCtx { info: RwLock::new(info.clone()), net });
        let (stop, _) = watch::channel(false);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        tokio::spawn(self.clone().accept_loop(out_l, Direction::Outbound, ctx.clone(), stop.subscribe()));
        tokio::spawn(self.clone().accept_loop(in_l, Direction::Inbound, ctx.clone(), stop.subscribe()));
        tokio::spawn(self.clone().accept_loop(hbone_l, Direction::Hbone(acceptor), ctx.clone(), stop.subscribe()));
        self.pods.lock().expect("lock").insert(uid, Pod { ctx, netns_id, stop, inbound_fd });
        self.metrics.workloads.set(self.pods.lock().expect("lock").len() as i64);
        info!(pod = %pod_name, ip = %info.ip, "pod added: listening on 15001 (outbound), 15006 (inbound), 15008 (HBONE)");
        Ok(())
    }

    /// Puts a pod's inbound listener in node-agent's capture map.
    fn register_inbound(&self, ip: Ipv4Addr, fd: std::os::fd::RawFd) -> Result<(), AddError> {
        let Some(dir) = &self.cfg.pin_dir else { return Ok(()) };
        let mut map = self.sockmap.lock().expect("lock");
        if map.is_none() {
            *map = Some(open_sockmap(dir)?);
        }
        map.as_mut().expect("opened above").insert(u32::from(ip).to_be(), fd, 0).map_err(AddError::SockMap)
    }

    fn remove(&self, uid: &str, reason: &str) {
        let removed = self.pods.lock().expect("lock").remove(uid);
        if let Some(p) = removed {
            let _ = p.stop.send(true);
            self.pool.forget_pod(uid);
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

    /// The identities of the pods held: the certificates to keep fresh.
    pub fn identities(&self) -> Vec<Identity> {
        let mut v: Vec<Identity> = self
            .pods
            .lock()
            .expect("lock")
            .values()
            .map(|p| {
                let i = p.ctx.info.read().expect("lock");
                self.identity(&i.namespace, &i.service_account)
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Pods held, for the admin config dump.
    pub fn workloads(&self) -> Vec<serde_json::Value> {
        let mut v: Vec<serde_json::Value> = self
            .pods
            .lock()
            .expect("lock")
            .values()
            .map(|p| {
                let i = p.ctx.info.read().expect("lock");
                serde_json::json!({
                    "uid": i.uid, "namespace": i.namespace, "name": i.name, "workload": i.workload_name,
                    "ip": i.ip.to_string(), "identity": self.identity(&i.namespace, &i.service_account).to_string(),
                })
            })
            .collect();
        v.sort_by_key(|w| w["uid"].as_str().unwrap_or_default().to_owned());
        v
    }

    /// The cluster config in force (policies), for the admin config dump.
    /// The metrics text, with the HBONE connection gauges read now.
    pub fn render_metrics(&self) -> String {
        let (handshakes, inbound) = self.admission.counts();
        self.metrics.hbone_handshakes.set(handshakes as i64);
        self.metrics.hbone_connections.with_label_values(&["inbound"]).set(inbound as i64);
        self.metrics.hbone_connections.with_label_values(&["outbound"]).set(self.pool.connections() as i64);
        self.metrics.render()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.cluster.borrow().clone()
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener, dir: Direction, pod: Arc<PodCtx>, mut stop: watch::Receiver<bool>) {
        let mut drain = self.drain.signal();
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((stream, peer)) => {
                        // A proxy must not add Nagle delays to small writes
                        // (a response's headers then its body).
                        let _ = stream.set_nodelay(true);
                        // A peer that vanished frees its descriptors.
                        skiff_hbone::limits::tcp_keepalive(&stream, self.cfg.hbone.keepalive_interval);
                        let zt = self.clone();
                        let pod = pod.clone();
                        let guard = self.drain.track();
                        let dir = dir.clone();
                        let stop = stop.clone();
                        tokio::spawn(async move {
                            let _guard = guard;
                            match dir {
                                Direction::Outbound => zt.outbound(pod, stream, peer).await,
                                Direction::Inbound => zt.inbound(pod, stream, peer).await,
                                Direction::Hbone(acceptor) => zt.hbone_inbound(pod, acceptor, stream, peer, stop).await,
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

    /// Where an outbound connection from the pod at `ip` in `namespace` to
    /// `orig` goes (`skiff_core::outbound`'s decision) and, when that is
    /// an endpoint, which one: round robin over a Service's.
    fn route<'s>(&self, snap: &'s Snapshot, namespace: &str, ip: Ipv4Addr, orig: SocketAddrV4) -> (outbound::Decision<'s>, Option<SocketAddrV4>) {
        let resolved = self.resolved.read();
        let from = outbound::From { namespace, ip, mesh_ports: &MESH_PORTS, policy: self.outbound_policy(snap), resolved: &resolved };
        let decision = outbound::decide(snap, from, orig);
        drop(resolved);
        let target = match (&decision.next, &decision.destination) {
            (outbound::Next::Endpoints(eps), outbound::Destination::Service(svc, port)) => {
                Some(eps[self.next_index(format!("{}/{}:{}", svc.namespace, svc.name, port.port)) % eps.len()])
            }
            (outbound::Next::Endpoints(eps), _) => eps.first().copied(),
            _ => None,
        };
        (decision, target)
    }

    /// The next turn of a round robin named `key`.
    fn next_index(&self, key: String) -> usize {
        let mut rr = self.round_robin.lock().expect("lock");
        let c = rr.entry(key).or_insert(0);
        *c = c.wrapping_add(1);
        *c
    }

    fn local_labels(&self, info: &WorkloadInfo) -> Peer {
        Peer::of(&info.workload_name, &info.namespace, &info.labels, self.identity(&info.namespace, &info.service_account).to_string())
    }

    fn remote_labels(&self, w: Option<&Workload>) -> Peer {
        match w {
            Some(w) => Peer::of_workload(w, self.certs.trust_domain()),
            None => Peer::unknown(),
        }
    }

    /// Whether `w` is captured by the mesh (so it terminates HBONE).
    fn in_mesh(snap: &Snapshot, w: &Workload) -> bool {
        outbound::captured(snap, w)
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
            let source = self.local_labels(&info);
            let (decision, target) = self.route(&snap, &info.namespace, info.ip, orig);
            let dst_w = target.and_then(|t| snap.workload_by_ip(*t.ip()));
            let mesh_dst = dst_w.filter(|w| !self.cfg.plaintext_mesh && Self::in_mesh(&snap, w));
            let destination = self.remote_labels(dst_w);
            let (svc_name, svc_ns) = decision.service().unwrap_or_else(|| ("unknown".into(), "unknown".into()));
            let mut labels = ConnLabels {
                reporter: "source",
                source,
                destination,
                // Never the raw IP: label values must stay a bounded set.
                destination_service: match &decision.destination {
                    outbound::Destination::Service(svc, _) => svc.hostname(),
                    _ => svc_name.clone(),
                },
                destination_service_name: svc_name,
                destination_service_namespace: svc_ns,
                response_flags: "-",
                security_policy: if mesh_dst.is_some() { "mutual_tls" } else { "none" },
            };
            let target = match decision.next {
                // A Service or ServiceEntry that asks for a waypoint: tunnel
                // to the waypoint, which applies L7 and picks the endpoint
                // (for an entry, from the address the pod dialled).
                outbound::Next::Waypoint { replicas, .. } => {
                    // Balanced over the waypoint's ready replicas.
                    let key = format!("waypoint:{}/{}", replicas[0].namespace, replicas[0].service_account);
                    let wp = replicas[self.next_index(key) % replicas.len()];
                    let (Some(ip), src_id) = (wp.ip, self.identity(&info.namespace, &info.service_account)) else { return };
                    let wp_id = self.identity(&wp.namespace, &wp.service_account);
                    labels.security_policy = "mutual_tls";
                    // The waypoint picks the endpoint: only its namespace is
                    // known here (a Service's pods are in its namespace).
                    let namespace = match &decision.destination {
                        outbound::Destination::Service(svc, _) => svc.namespace.clone(),
                        _ => labels.destination.namespace.clone(),
                    };
                    labels.destination = Peer { namespace, ..Peer::unknown() };
                    let via = SocketAddrV4::new(ip, PORT_INBOUND_HBONE);
                    let tunnel = Tunnel { src: src_id, dst: wp_id, via, target: orig, upstream: via };
                    return self.hbone_outbound(&info, &pod, tunnel, client, peer, orig, labels, start).await;
                }
                outbound::Next::Refused(r) => {
                    let r = match r {
                        outbound::Refused::NoRoute => Refusal::NoRoute,
                        outbound::Refused::NoEndpoints => Refusal::NoHealthyUpstream,
                        outbound::Refused::RegistryOnly => Refusal::RegistryOnly,
                        outbound::Refused::WaypointNotReady(name) => {
                            warn!(waypoint = %name, "the destination's waypoint has no ready pod; connection refused");
                            Refusal::NoHealthyUpstream
                        }
                    };
                    return self.refused("outbound", peer, orig, None, labels, r, start);
                }
                outbound::Next::Endpoints(_) => target.expect("an endpoint was picked"),
            };
            if let Some(w) = mesh_dst {
                let tunnel = Tunnel {
                    src: self.identity(&info.namespace, &info.service_account),
                    dst: self.identity(&w.namespace, &w.service_account),
                    via: SocketAddrV4::new(*target.ip(), PORT_INBOUND_HBONE),
                    target,
                    upstream: target,
                };
                return self.hbone_outbound(&info, &pod, tunnel, client, peer, orig, labels, start).await;
            }
            match transport::Transport::PlainTcp.connect(&pod.net, target, self.cfg.hbone.connect_timeout).await {
                Ok(up) => {
                    let counters = self.metrics.connection(&labels);
                    counters.opened.inc();
                    let (rx, tx) = relay(client, up, &counters, &self.metrics).await;
                    counters.closed.inc();
                    access_log("outbound", peer, orig, Some(target), &labels, tx, rx, start, None);
                }
                Err(e) => {
                    debug!(error = %e, upstream = %target, "upstream connect failed");
                    self.refused("outbound", peer, orig, Some(target), labels, Refusal::UpstreamFailure, start);
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Carries a captured connection over HBONE (to the destination pod's
    /// ztunnel, or to a waypoint), counting and logging it.
    #[allow(clippy::too_many_arguments)]
    async fn hbone_outbound(
        &self,
        info: &WorkloadInfo,
        pod: &PodCtx,
        t: Tunnel,
        client: TcpStream,
        peer: SocketAddr,
        orig: SocketAddrV4,
        labels: ConnLabels,
        start: Instant,
    ) {
        match self.pool.connect(&info.uid, Some(&pod.net), &t.src, &t.dst, t.via, t.target).await {
            Ok((send, recv, _guard)) => {
                let counters = self.metrics.connection(&labels);
                counters.opened.inc();
                let _active = self.metrics.open_connection();
                let (rx, tx) = hbone::relay(client, send, recv, &counters.received, &counters.sent).await;
                counters.closed.inc();
                access_log("outbound", peer, orig, Some(t.upstream), &labels, tx, rx, start, None);
            }
            Err(e) => {
                warn!(via = %t.via, peer_identity = %t.dst, error = %skiff_core::report(&e), "HBONE connection failed; closed");
                self.refused("outbound", peer, orig, Some(t.upstream), labels, Refusal::UpstreamFailure, start);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn refused(&self, dir: &'static str, peer: SocketAddr, orig: SocketAddrV4, target: Option<SocketAddrV4>, mut labels: ConnLabels, r: Refusal, start: Instant) {
        labels.response_flags = r.flag();
        let counters = self.metrics.connection(&labels);
        counters.opened.inc();
        counters.closed.inc();
        // Why, in the log line: the outbound traffic policy.
        let why = matches!(r, Refusal::RegistryOnly).then(|| AuthzDecision {
            allowed: false,
            policy: Some("outboundTrafficPolicy REGISTRY_ONLY".into()),
            rule: None,
            reason: "not a Service, pod or ServiceEntry",
            audited: Vec::new(),
        });
        if why.is_some() {
            self.metrics.egress_refused.inc();
        }
        access_log(dir, peer, orig, target, &labels, 0, 0, start, why.as_ref());
    }

    /// The outbound traffic policy in force: Istio's mesh config in the root
    /// namespace (ConfigMap `istio`) when it sets one, else the flag.
    fn outbound_policy(&self, snap: &Snapshot) -> skiff_core::egress::OutboundPolicy {
        outbound::outbound_policy(snap, &self.cfg.root_namespace, self.cfg.outbound_policy)
    }

    /// Resolves the names ServiceEntries are matched by, once (see
    /// `skiff_hbone::names`).
    pub async fn resolve_service_entries(&self) {
        let names = skiff_core::egress::names_to_resolve(&self.cluster.borrow().service_entries);
        self.resolved.refresh(names).await;
    }

    /// Applicable policies for a local pod and the decision for `conn`.
    fn authorize(&self, snap: &Snapshot, info: &WorkloadInfo, conn: &ConnInfo) -> AuthzDecision {
        policy::authorize_workload(&snap.authorization_policies, &self.cfg.root_namespace, &info.namespace, &info.labels, conn)
    }

    fn inbound_labels(&self, snap: &Snapshot, info: &WorkloadInfo, src_ip: Ipv4Addr, dst_port: u16, principal: Option<&Identity>) -> ConnLabels {
        let src_w = snap.workload_by_ip(src_ip);
        let mut source = self.remote_labels(src_w);
        if let Some(p) = principal {
            source.principal = p.to_string();
        }
        let destination = self.local_labels(info);
        let local = snap.workloads.values().find(|w| w.uid == info.uid);
        let service = local.and_then(|w| {
            snap.services_of(w).find(|s| {
                s.ports.iter().any(|p| match &p.target_port {
                    skiff_core::model::TargetPort::Number(n) => *n == dst_port,
                    skiff_core::model::TargetPort::Name(n) => w.named_ports.get(n) == Some(&dst_port),
                })
            })
        });
        ConnLabels {
            reporter: "destination",
            source,
            destination,
            destination_service: service.map(|s| s.hostname()).unwrap_or_else(|| "unknown".into()),
            destination_service_name: service.map(|s| s.name.clone()).unwrap_or_else(|| "unknown".into()),
            destination_service_namespace: service.map(|s| s.namespace.clone()).unwrap_or_else(|| "unknown".into()),
            response_flags: "-",
            security_policy: if principal.is_some() { "mutual_tls" } else { "none" },
        }
    }

    /// Opens the delivery connection to the app, keeping the client's IP.
    async fn deliver(pod: &PodCtx, client_ip: Ipv4Addr, avoid_port: u16, dst: SocketAddrV4, timeout: Duration) -> Result<TcpStream, Refusal> {
        let from = SocketAddrV4::new(client_ip, avoid_port);
        match pod.net.run(move || sock::delivery(from)) {
            Ok(Ok(s)) => transport::connect_socket(s, dst, timeout).await.map_err(|e| {
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
    }

    /// Registers an authorized connection for re-evaluation; returns its id.
    fn track(&self, pod_uid: &str, info: ConnInfo, abort: AbortHandle) -> u64 {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        self.active.lock().expect("lock").insert(id, ActiveConn { pod_uid: pod_uid.to_owned(), info, abort });
        id
    }

    fn untrack(&self, id: u64) {
        self.active.lock().expect("lock").remove(&id);
    }

    /// Why the current config no longer admits an open connection, if so:
    /// AuthorizationPolicy, and STRICT PeerAuthentication for plaintext.
    fn denies(&self, snap: &Snapshot, info: &WorkloadInfo, c: &ConnInfo) -> Option<String> {
        if c.principal.is_none()
            && policy::effective_mtls(&snap.peer_authentications, &self.cfg.root_namespace, &info.namespace, &info.labels, c.dst_port)
                == MtlsMode::Strict
        {
            return Some("plaintext under STRICT PeerAuthentication".into());
        }
        let d = self.authorize(snap, info, c);
        (!d.allowed).then(|| format!("{} ({})", d.reason, d.policy.as_deref().unwrap_or("-")))
    }

    /// Re-checks one tracked connection now (closes the race between a
    /// decision and its registration).
    fn recheck(&self, id: u64) {
        let snap = self.cluster.borrow().clone();
        let active = self.active.lock().expect("lock");
        let Some(c) = active.get(&id) else { return };
        let info = self.pods.lock().expect("lock").get(&c.pod_uid).map(|p| p.ctx.info.read().expect("lock").clone());
        if let Some(info) = info {
            if let Some(why) = self.denies(&snap, &info, &c.info) {
                c.abort.abort();
                info!(src = %c.info.src_ip, dst.port = c.info.dst_port, reason = %why, "connection closed: policy changed while it was set up");
            }
        }
    }

    /// Re-checks every open inbound connection against the current
    /// policies and closes the ones now denied. Runs on each config change.
    pub fn reevaluate(&self) {
        let snap = self.cluster.borrow().clone();
        let pods: HashMap<String, WorkloadInfo> = self
            .pods
            .lock()
            .expect("lock")
            .iter()
            .map(|(k, p)| (k.clone(), p.ctx.info.read().expect("lock").clone()))
            .collect();
        let mut closed = Vec::new();
        for (id, c) in self.active.lock().expect("lock").iter() {
            let Some(info) = pods.get(&c.pod_uid) else { continue };
            if let Some(why) = self.denies(&snap, info, &c.info) {
                c.abort.abort();
                closed.push(*id);
                info!(src = %c.info.src_ip, dst.port = c.info.dst_port, reason = %why, "open connection closed: policy now denies it");
            }
        }
        let mut active = self.active.lock().expect("lock");
        for id in closed {
            active.remove(&id);
        }
    }

    async fn inbound(self: Arc<Self>, pod: Arc<PodCtx>, client: TcpStream, peer: SocketAddr) {
        let start = Instant::now();
        let info = pod.info.read().expect("lock").clone();
        // eBPF capture (sk_lookup) keeps the original destination as the
        // local address; iptables capture (DNAT to 127.0.0.1:15006) leaves
        // it in conntrack, where SO_ORIGINAL_DST finds it.
        let local = client.local_addr().ok().and_then(sock::v4);
        let local = match local {
            Some(a) if a.ip().is_loopback() => sock::original_dst(&client).ok(),
            other => other,
        };
        let (Some(dst), Some(peer4)) = (local, sock::v4(peer)) else {
            warn!(%peer, "inbound connection with a non-IPv4 address; closed");
            return;
        };
        let snap = self.cluster.borrow().clone();
        let span = tracing::info_span!("inbound", pod = %format!("{}/{}", info.namespace, info.name), src = %peer4, dst = %dst);
        async move {
            let labels = self.inbound_labels(&snap, &info, *peer4.ip(), dst.port(), None);
            if MESH_PORTS.contains(&dst.port()) {
                return self.refused("inbound", peer, dst, Some(dst), labels, Refusal::NoRoute, start);
            }
            // kubelet's health probes come from the node itself, to a port
            // the pod declares a probe on: they pass STRICT and policy (as
            // with Istio), and are not re-evaluated. Anything else from the
            // node (other ports) is treated like any plaintext.
            let probe_port = snap.probe_ports.get(&info.uid).is_some_and(|p| p.contains(&dst.port()));
            let from_node = self.cfg.node_probes && probe_port && self.node_addrs.contains(*peer4.ip()) && Self::opened_on_node(peer4, dst);
            let conn = ConnInfo { src_ip: IpAddr::V4(*peer4.ip()), principal: None, src_namespace: None, dst_ip: IpAddr::V4(*dst.ip()), dst_port: dst.port() };
            let decision = if from_node {
                debug!(src = %peer4, dst = %dst, "plaintext from the node itself (kubelet probe): delivered without mTLS or policy");
                None
            } else {
                let mode = policy::effective_mtls(&snap.peer_authentications, &self.cfg.root_namespace, &info.namespace, &info.labels, dst.port());
                if mode == MtlsMode::Strict {
                    info!(src = %peer4, dst = %dst, "plaintext connection refused: PeerAuthentication is STRICT");
                    return self.refused("inbound", peer, dst, Some(dst), labels, Refusal::MtlsRequired, start);
                }
                let decision = self.authorize(&snap, &info, &conn);
                if !decision.allowed {
                    info!(src = %peer4, dst = %dst, policy = ?decision.policy, reason = decision.reason, "connection denied by authorization policy");
                    return self.refused("inbound", peer, dst, Some(dst), labels, Refusal::Denied, start);
                }
                Some(decision)
            };
            let app = match Self::deliver(&pod, *peer4.ip(), peer4.port(), dst, self.cfg.hbone.connect_timeout).await {
                Ok(a) => a,
                Err(r) => return self.refused("inbound", peer, dst, Some(dst), labels, r, start),
            };
            if decision.is_none() {
                self.metrics.node_probes.inc();
            }
            let counters = self.metrics.connection(&labels);
            counters.opened.inc();
            let zt = self.clone();
            let task = tokio::spawn({
                let counters = counters.clone();
                async move { relay(client, app, &counters, &zt.metrics).await }
            });
            // Probes are not re-evaluated on policy changes (policy never
            // applied to them).
            let id = decision.is_some().then(|| self.track(&info.uid, conn.clone(), task.abort_handle()));
            if let Some(id) = id {
                self.recheck(id);
            }
            let (rx, tx) = task.await.unwrap_or((0, 0));
            if let Some(id) = id {
                self.untrack(id);
            }
            counters.closed.inc();
            access_log("inbound", peer, dst, Some(dst), &labels, tx, rx, start, decision.as_ref());
        }
        .instrument(span)
        .await
    }

    /// The peer's certificate must name the workload at its address: in-pod
    /// capture makes every ztunnel (and waypoint) dial from its own pod IP.
    /// An address with no workload is refused too (a stolen certificate used
    /// from elsewhere).
    fn peer_matches(&self, ip: Ipv4Addr, peer_id: &Identity) -> Result<(), String> {
        let snap = self.cluster.borrow().clone();
        let Some(w) = snap.workload_by_ip(ip) else {
            return Err(format!("no workload has the address {ip}"));
        };
        let expected = self.identity(&w.namespace, &w.service_account);
        if expected != *peer_id {
            return Err(format!("{ip} is {}/{}, whose identity is {expected}", w.namespace, w.name));
        }
        Ok(())
    }

    async fn hbone_inbound(
        self: Arc<Self>,
        pod: Arc<PodCtx>,
        acceptor: tokio_rustls::TlsAcceptor,
        stream: TcpStream,
        peer: SocketAddr,
        stop: watch::Receiver<bool>,
    ) {
        let handshake = match self.admission.handshake(peer.ip()) {
            Ok(h) => h,
            Err(r) => return self.not_admitted(peer, r),
        };
        let info = pod.info.read().expect("lock").clone();
        let Some(peer4) = sock::v4(peer) else { return };
        // One deadline for the TLS and HTTP/2 handshakes: a peer that
        // trickles bytes cannot hold its slot longer.
        let deadline = tokio::time::Instant::now().checked_add(self.cfg.hbone.handshake_timeout).expect("flag bounded to a year");
        let tls = match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                let reason = skiff_core::report(&e);
                // Throttled per reason: a peer sending garbage handshakes
                // must not flood the log.
                if let Some(skipped) = self.admission.log_now(&format!("tls: {reason}")) {
                    warn!(pod = %format!("{}/{}", info.namespace, info.name), %peer, %reason, same_reason_unlogged = skipped, "HBONE peer refused: TLS handshake failed");
                }
                self.metrics.hbone_refused.inc();
                return;
            }
            Err(_) => {
                debug!(%peer, timeout = ?self.cfg.hbone.handshake_timeout, "HBONE peer refused: TLS handshake timed out");
                self.metrics.hbone_refused.inc();
                return;
            }
        };
        {
            let conn = tls.get_ref().1;
            let suite = conn.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_default();
            let kx = conn.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name())).unwrap_or_default();
            self.metrics.tls_handshakes.with_label_values(&[&suite, &kx]).inc();
        }
        let peer_id = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(identity::identity_of) {
            Some(Ok(id)) => id,
            _ => {
                warn!(%peer, "HBONE peer refused: certificate carries no SPIFFE identity");
                self.metrics.hbone_refused.inc();
                return;
            }
        };
        if let Err(why) = self.peer_matches(*peer4.ip(), &peer_id) {
            warn!(%peer, presented = %peer_id, reason = %why, "HBONE peer refused: identity does not match the workload at its address");
            self.metrics.hbone_refused.inc();
            return;
        }
        let conn = match tokio::time::timeout_at(deadline, hbone::server_builder(&self.cfg.hbone).handshake::<_, Bytes>(tls)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "HTTP/2 handshake failed");
                return;
            }
            Err(_) => {
                debug!(%peer, "HTTP/2 handshake timed out");
                return;
            }
        };
        // Authenticated: the handshake slot is free again; the connection
        // now counts against the established bounds.
        let _established = match handshake.establish() {
            Ok(e) => e,
            Err(r) => return self.not_admitted(peer, r),
        };
        // Pod released or ztunnel draining: no new streams; open ones finish.
        let stop = {
            let (mut stop, drain) = (stop, self.drain.stopping());
            async move {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => {}
                    _ = drain => {}
                }
            }
        };
        let why = hbone::serve_connection(conn, &self.cfg.hbone, stop, |req, respond, stream_guard| {
            let zt = self.clone();
            let pod = pod.clone();
            let peer_id = peer_id.clone();
            let guard = self.drain.track();
            tokio::spawn(async move {
                let _guard = (guard, stream_guard);
                zt.hbone_stream(pod, peer, peer_id, req, respond).await
            });
        })
        .await;
        debug!(%peer, reason = why, "HBONE connection ended");
    }

    /// Whether a plaintext connection from one of the node's addresses was
    /// opened on the node (kubelet, a hostNetwork process): its socket is
    /// in ztunnel's (the node's) network namespace. Traffic the node only
    /// forwards and SNATs to its own address (NodePort, LoadBalancer) has
    /// no socket there and is not a probe. A failed lookup answers no
    /// (fail closed: the probe is then treated as plaintext).
    fn opened_on_node(src: SocketAddrV4, dst: SocketAddrV4) -> bool {
        match crate::sockdiag::local_tcp_socket(src, dst) {
            Ok(true) => true,
            Ok(false) => {
                info!(%src, %dst, "plaintext from the node's address to a probe port, but not opened on the node (forwarded and SNATed): not taken for a probe");
                false
            }
            Err(e) => {
                warn!(%src, %dst, error = %e, "cannot tell whether a connection from the node's address was opened on the node (sock_diag); not taken for a probe");
                false
            }
        }
    }

    /// A connection over an HBONE admission bound: closed, counted, and
    /// logged (at most once every 10 s per reason).
    fn not_admitted(&self, peer: SocketAddr, r: skiff_hbone::limits::Refused) {
        self.metrics.hbone_admission_refused.with_label_values(&[r.as_str()]).inc();
        if let Some(skipped) = self.admission.log_now(r.as_str()) {
            warn!(%peer, reason = %r, refused_since_last_line = skipped, "HBONE connection refused");
        }
    }

    async fn hbone_stream(
        self: Arc<Self>,
        pod: Arc<PodCtx>,
        peer: SocketAddr,
        peer_id: Identity,
        req: http::Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
    ) {
        let start = Instant::now();
        let info = pod.info.read().expect("lock").clone();
        let Some(peer4) = sock::v4(peer) else { return };
        let answer = |respond: &mut h2::server::SendResponse<Bytes>, status: StatusCode| {
            let resp = HttpResponse::builder().status(status).body(()).expect("valid response");
            let _ = respond.send_response(resp, true);
        };
        let dst = match hbone::check_connect(&req, info.ip) {
            Ok(d) => d,
            Err((status, why)) => {
                info!(%peer, uri = %req.uri(), %status, reason = why, "HBONE request rejected");
                return answer(&mut respond, status);
            }
        };
        if let Err(why) = self.peer_matches(*peer4.ip(), &peer_id) {
            info!(%peer, presented = %peer_id, reason = %why, "HBONE stream refused: the peer's address changed hands");
            return answer(&mut respond, StatusCode::FORBIDDEN);
        }
        let snap = self.cluster.borrow().clone();
        let mut labels = self.inbound_labels(&snap, &info, *peer4.ip(), dst.port(), Some(&peer_id));
        let conn = ConnInfo {
            src_ip: IpAddr::V4(*peer4.ip()),
            principal: Some(peer_id.principal()),
            src_namespace: Some(peer_id.namespace.clone()),
            dst_ip: IpAddr::V4(*dst.ip()),
            dst_port: dst.port(),
        };
        let decision = self.authorize(&snap, &info, &conn);
        if !decision.allowed {
            info!(src = %peer4, identity = %peer_id, dst = %dst, policy = ?decision.policy, reason = decision.reason,
                "connection denied by authorization policy");
            answer(&mut respond, StatusCode::FORBIDDEN);
            labels.response_flags = Refusal::Denied.flag();
            let c = self.metrics.connection(&labels);
            c.opened.inc();
            c.closed.inc();
            return access_log("inbound", peer, dst, Some(dst), &labels, 0, 0, start, Some(&decision));
        }
        let app = match Self::deliver(&pod, *peer4.ip(), peer4.port(), dst, self.cfg.hbone.connect_timeout).await {
            Ok(a) => a,
            Err(r) => {
                answer(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
                labels.response_flags = r.flag();
                let c = self.metrics.connection(&labels);
                c.opened.inc();
                c.closed.inc();
                return access_log("inbound", peer, dst, Some(dst), &labels, 0, 0, start, Some(&decision));
            }
        };
        let send = match respond.send_response(HttpResponse::builder().status(StatusCode::OK).body(()).expect("valid"), false) {
            Ok(s) => s,
            Err(_) => return,
        };
        let recv = req.into_body();
        let counters = self.metrics.connection(&labels);
        counters.opened.inc();
        let zt = self.clone();
        let task = tokio::spawn({
            let counters = counters.clone();
            async move {
                let _active = zt.metrics.open_connection();
                hbone::relay(app, send, recv, &counters.sent, &counters.received).await
            }
        });
        let id = self.track(&info.uid, conn.clone(), task.abort_handle());
        // Policy may have changed between the decision and tracking.
        self.recheck(id);
        let (tx, rx) = task.await.unwrap_or((0, 0));
        self.untrack(id);
        counters.closed.inc();
        access_log("inbound", peer, dst, Some(dst), &labels, tx, rx, start, Some(&decision));
    }

    /// Closes every pod's listeners (drain start).
    pub fn stop_listeners(&self) {
        for p in self.pods.lock().expect("lock").values() {
            let _ = p.stop.send(true);
        }
    }

    /// Forgets what names Services and workloads gone from `snap`: their
    /// round-robin positions at once, their metric series once unused for
    /// `grace`. (Pooled HBONE connections leave the pool when they close,
    /// and with their pod.)
    pub fn prune(&self, snap: &Snapshot, grace: Duration) {
        let live: HashSet<String> =
            snap.services.values().flat_map(|s| s.ports.iter().map(move |p| format!("{}/{}:{}", s.namespace, s.name, p.port))).collect();
        self.round_robin.lock().expect("lock").retain(|k, _| live.contains(k) || k.starts_with("waypoint:"));
        let removed = self.metrics.prune(snap, grace);
        if removed > 0 {
            debug!(removed, "metric series of workloads and Services that are gone removed");
        }
    }

    /// Sizes of what `prune` bounds: (round-robin entries, metric series).
    pub fn state_sizes(&self) -> (usize, usize) {
        (self.round_robin.lock().expect("lock").len(), self.metrics.series())
    }

    /// `--admin-header-timeout`.
    pub fn admin_header_timeout(&self) -> Duration {
        self.cfg.admin_header_timeout
    }

    /// Background duties: certificate rotation and policy re-evaluation.
    pub fn spawn_background(self: &Arc<Self>) {
        // Series of workloads that left while no snapshot came since.
        let zt = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                let snap = zt.cluster.borrow().clone();
                zt.prune(&snap, zt.cfg.series_grace);
            }
        });
        let zt = self.clone();
        self.certs.spawn_refresh(move || zt.identities());
        self.resolved.spawn(self.cluster.clone(), |snap| skiff_core::egress::names_to_resolve(&snap.service_entries));
        let zt = self.clone();
        let mut changes = self.cluster.clone();
        tokio::spawn(async move {
            let mut last_overlaps = Vec::new();
            let mut last_unserved = Vec::new();
            zt.metrics.set_rejected(&changes.borrow());
            while changes.changed().await.is_ok() {
                let snap = changes.borrow().clone();
                zt.metrics.set_rejected(&snap);
                zt.prune(&snap, zt.cfg.series_grace);
                let overlaps = skiff_core::egress::overlaps(&snap.service_entries);
                if overlaps != last_overlaps {
                    for (a, b, what) in &overlaps {
                        warn!(first = %a, second = %b, "ServiceEntries of different namespaces {what}: each namespace's pods use their own namespace's, others the oldest");
                    }
                    last_overlaps = overlaps;
                }
                let unserved = snap.entry_config_without_waypoint();
                if unserved != last_unserved {
                    for (object, what) in unserved.iter().filter(|u| !last_unserved.contains(u)) {
                        warn!(%object, "{what}");
                    }
                    last_unserved = unserved;
                }
                for p in snap.authorization_policies.iter().filter(|p| !p.targets_waypoint && p.has_l7()) {
                    warn!(policy = %p.key(), action = ?p.action,
                        "policy uses L7 attributes ztunnel cannot see: its ALLOW rules with them never match, its DENY rules match on their L4 part (fail closed); use a waypoint for L7");
                }
                zt.reevaluate();
            }
        });
    }
}

/// One HBONE hop: who dials, who must answer, where, and the CONNECT target.
struct Tunnel {
    src: Identity,
    dst: Identity,
    via: SocketAddrV4,
    target: SocketAddrV4,
    /// What the access log names as the upstream (the waypoint, or the pod).
    upstream: SocketAddrV4,
}

#[derive(Clone)]
enum Direction {
    Outbound,
    Inbound,
    Hbone(tokio_rustls::TlsAcceptor),
}

fn error_response(e: &(dyn std::error::Error + 'static)) -> Response {
    let message = skiff_core::report(e);
    warn!(error = %message, "node-agent request failed");
    Response::Error { message }
}

/// node-agent's `MESH_SOCKS` map and its pin's inode, opened on first use
/// and again whenever the pin is another file (node-agent re-created its
/// maps: the old map, still open here, is one the programs no longer read).
static MESH_SOCKS: Mutex<Option<(MeshSocks, u64)>> = Mutex::new(None);

type MeshSocks = aya::maps::HashMap<MapData, u64, u8>;

/// Registers one of ztunnel's sockets (by cookie) with the capture
/// programs. No map pinned (node-agent not running yet, so nothing is
/// captured; or a node-agent from before the map existed, whose programs
/// trust the mark alone): nothing to do. Any other failure fails the
/// socket — it would otherwise be captured as the pod's own.
fn register_mesh_socket(pin_dir: &Path, cookie: u64) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let path = pin_dir.join("maps").join("MESH_SOCKS");
    let ino = match std::fs::metadata(&path) {
        Ok(m) => m.ino(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(std::io::Error::other(format!("{}: {e}", path.display()))),
    };
    let mut map = MESH_SOCKS.lock().expect("lock");
    if map.as_ref().is_none_or(|(_, cached)| *cached != ino) {
        let data = MapData::from_pin(&path).map_err(|e| std::io::Error::other(format!("opening {}: {e}", path.display())))?;
        let m = aya::maps::HashMap::try_from(Map::LruHashMap(data)).map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
        *map = Some((m, ino));
    }
    let (m, _) = map.as_mut().expect("opened");
    m.insert(cookie, 1, 0).map_err(|e| std::io::Error::other(format!("registering a socket in {}: {e}", path.display())))
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
    decision: Option<&AuthzDecision>,
) {
    let policy = decision.map(AuthzDecision::access_text).unwrap_or_else(|| "-".into());
    info!(
        target: "access",
        direction,
        src.addr = %src,
        src.workload = %l.source.workload,
        src.namespace = %l.source.namespace,
        src.identity = %l.source.principal,
        dst.addr = %orig_dst,
        dst.upstream = %upstream.map(|u| u.to_string()).unwrap_or_else(|| "-".into()),
        dst.service = %l.destination_service,
        dst.workload = %l.destination.workload,
        dst.namespace = %l.destination.namespace,
        dst.identity = %l.destination.principal,
        bytes_sent,
        bytes_received,
        duration_ms = start.elapsed().as_millis() as u64,
        response_flags = l.response_flags,
        security = l.security_policy,
        %policy,
        "connection complete"
    );
}

/// Copies both ways until both sides are done, counting bytes as they pass.
/// Returns (client→server, server→client) byte counts.
/// Copies both ways between two TCP connections. A FIN is passed on as a
/// FIN, one direction at a time (half-close kept); a reset or error on
/// either side resets both (SO_LINGER 0), so a transfer cut short never
/// reaches the other end as a clean close.
async fn relay(client: TcpStream, server: TcpStream, c: &ConnCounters, m: &Metrics) -> (u64, u64) {
    let _active = m.open_connection();
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let (reset_tx, _) = watch::channel(false);
    let up = copy_counted(cr, sw, &c.received, &reset_tx);
    let down = copy_counted(sr, cw, &c.sent, &reset_tx);
    let ((rx, sw, up_reset), (tx, cw, down_reset)) = tokio::join!(up, down);
    if up_reset || down_reset {
        hbone::reset_tcp(sw);
        hbone::reset_tcp(cw);
    }
    (rx, tx)
}

/// One direction of [`relay`]: returns the bytes copied, the write half
/// (reset by the caller when either direction failed) and whether this
/// direction failed or was told to stop because the other did.
async fn copy_counted(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    counter: &prometheus::IntCounter,
    reset: &watch::Sender<bool>,
) -> (u64, tokio::net::tcp::OwnedWriteHalf, bool) {
    let mut other_failed = reset.subscribe();
    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0u64;
    loop {
        let n = tokio::select! {
            n = r.read(&mut buf) => n,
            _ = other_failed.changed() => return (total, w, true),
        };
        let n = match n {
            Ok(0) => break,
            Ok(n) => n,
            Err(_) => {
                let _ = reset.send(true);
                return (total, w, true);
            }
        };
        if w.write_all(&buf[..n]).await.is_err() {
            let _ = reset.send(true);
            return (total, w, true);
        }
        counter.inc_by(n as u64);
        total += n as u64;
    }
    let _ = w.shutdown().await;
    // Half-closed: this direction is done, the other may still fail.
    (total, w, *reset.borrow())
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
        let cfg = Config::for_node("n1");
        let ca = skiff_hbone::identity::Ca::generate("cluster.local").unwrap();
        let certs = CertManager::new(ca, std::time::Duration::from_secs(3600)).unwrap();
        Ztunnel::new(cfg, rx, certs).unwrap()
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

    /// Issue 13 item 11: round-robin positions and metric series of
    /// Services and workloads that had left were kept for the life of the
    /// process. 1000 pods, each its own workload behind its own Service
    /// (Jobs, say), are called and then leave: after the grace period both
    /// maps are back to where they started, and the series are gone from
    /// the exposition.
    /// The names of DNS ServiceEntries are resolved by ztunnel (here an
    /// endpoint named `localhost`, which every resolver knows, resolved as
    /// the absolute `localhost.`).
    #[tokio::test]
    async fn dns_service_entry_names_are_resolved() {
        let zt = ztunnel(snapshot(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: local, namespace: app}\nspec: {hosts: [local.example.com], ports: [{number: 80, name: http}], resolution: DNS, endpoints: [{address: localhost}]}\n",
        ));
        zt.resolve_service_entries().await;
        let got = zt.resolved.read().get("localhost").cloned().unwrap_or_default();
        assert!(got.contains(&Ipv4Addr::LOCALHOST), "{got:?}");
        let entries = zt.cluster.borrow().service_entries.clone();
        let t = skiff_core::egress::lookup(&entries, "app", "127.0.0.1:80".parse().unwrap(), &zt.resolved.read()).expect("in the registry");
        assert_eq!(t.host, "local.example.com");
    }

    #[test]
    fn state_of_a_thousand_pods_and_services_that_left_is_pruned() {
        let mut text = String::from(CLUSTER);
        for i in 0..1000u32 {
            let (hi, lo) = (i / 250, i % 250 + 1);
            text.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: job-{i}, namespace: jobs, labels: {{app: job-{i}}}}}\nspec: {{containers: [{{name: c}}]}}\nstatus: {{phase: Running, podIP: 10.1.{hi}.{lo}}}\n\
                 ---\napiVersion: v1\nkind: Service\nmetadata: {{name: job-{i}, namespace: jobs}}\nspec: {{clusterIP: 10.97.{hi}.{lo}, selector: {{app: job-{i}}}, ports: [{{port: 80}}]}}\n"
            ));
        }
        let busy = snapshot(&text);
        let zt = ztunnel(busy.clone());
        let baseline = zt.state_sizes();
        for i in 0..1000u32 {
            let vip = SocketAddrV4::new(std::net::Ipv4Addr::new(10, 97, (i / 250) as u8, (i % 250 + 1) as u8), 80);
            let (d, _) = zt.route(&busy, "ns", Ipv4Addr::new(10, 0, 0, 1), vip);
            assert_eq!(d.service(), Some((format!("job-{i}"), "jobs".to_owned())));
            let labels = ConnLabels {
                reporter: "source",
                source: Peer::of("a", "ns", &[("app".to_owned(), "web".to_owned())].into(), "spiffe://cluster.local/ns/ns/sa/default".into()),
                destination: Peer::of(&format!("job-{i}"), "jobs", &Default::default(), "spiffe://cluster.local/ns/jobs/sa/default".into()),
                destination_service: format!("job-{i}.jobs.svc.cluster.local"),
                destination_service_name: format!("job-{i}"),
                destination_service_namespace: "jobs".into(),
                response_flags: "-",
                security_policy: "mutual_tls",
            };
            zt.metrics.connection(&labels).opened.inc();
        }
        assert_eq!(zt.state_sizes(), (baseline.0 + 1000, baseline.1 + 1000));
        // A snapshot change while they are still there removes nothing.
        zt.prune(&busy, Duration::ZERO);
        assert_eq!(zt.state_sizes(), (baseline.0 + 1000, baseline.1 + 1000));
        // They leave: positions go at once, series after the grace period.
        let left = snapshot(CLUSTER);
        zt.prune(&left, Duration::from_secs(300));
        assert_eq!(zt.state_sizes(), (baseline.0, baseline.1 + 1000), "series stay for their last scrape");
        zt.prune(&left, Duration::ZERO);
        assert_eq!(zt.state_sizes(), baseline);
        assert!(!zt.metrics.render().contains("job-7"), "the series are gone from the exposition");
    }

    #[test]
    fn cluster_ip_connections_alternate_between_ready_endpoints() {
        let snap = snapshot(CLUSTER);
        let zt = ztunnel(snap.clone());
        let vip = SocketAddrV4::new("10.96.0.1".parse().unwrap(), 80);
        let client = Ipv4Addr::new(10, 0, 0, 9);
        let picks: Vec<SocketAddrV4> = (0..4).map(|_| zt.route(&snap, "ns", client, vip).1.unwrap()).collect();
        let a = SocketAddrV4::new("10.0.0.1".parse().unwrap(), 8080);
        let b = SocketAddrV4::new("10.0.0.2".parse().unwrap(), 8081);
        assert!(picks == vec![b, a, b, a] || picks == vec![a, b, a, b], "{picks:?}");
        assert_eq!(zt.route(&snap, "ns", client, vip).0.service(), Some(("web".to_owned(), "ns".to_owned())));
    }

    #[test]
    fn service_without_endpoints_is_no_healthy_upstream_and_pod_ips_pass_through() {
        let snap = snapshot(CLUSTER);
        let zt = ztunnel(snap.clone());
        let empty = SocketAddrV4::new("10.96.0.2".parse().unwrap(), 80);
        let client = Ipv4Addr::new(10, 0, 0, 9);
        let (d, target) = zt.route(&snap, "ns", client, empty);
        assert!(matches!(d.next, outbound::Next::Refused(outbound::Refused::NoEndpoints)) && target.is_none(), "{d:?}");
        let direct = SocketAddrV4::new("10.0.0.2".parse().unwrap(), 9999);
        let (d, target) = zt.route(&snap, "ns", client, direct);
        assert_eq!((d.service(), target), (None, Some(direct)));
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
