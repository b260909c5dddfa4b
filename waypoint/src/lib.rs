//! Skiff waypoint: an L7 proxy that runs only where a namespace or Service
//! asks for one (`istio.io/use-waypoint: <name>`). Client ztunnels tunnel
//! (HBONE) to it; it terminates the tunnel, speaks HTTP/1.1 or HTTP/2 (gRPC
//! included) on each stream, applies VirtualService / DestinationRule, and
//! tunnels each request (HBONE) on to the chosen pod's ztunnel.

pub mod metrics;
pub mod trace;

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use skiff_core::{
    model::{ServiceInfo, ServicePort, Snapshot, Workload},
    policy,
    routing::{self, AbortStatus, HttpRoute, RequestInfo, RouteDest},
};
use skiff_hbone::{
    certs::CertManager,
    identity::{self, Identity},
    tunnel::{self as hbone, Pool},
};
use tokio::{net::TcpListener, sync::watch};
use tracing::{debug, info, warn};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Largest request body buffered (bodies are buffered so a retry can
/// resend them).
const MAX_BUFFERED_BODY: usize = 16 * 1024 * 1024;
/// Request-body bytes buffered across all requests at once.
const MAX_BUFFERED_TOTAL: usize = 256 * 1024 * 1024;
/// How long a client may take to send its request body.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Waypoint settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Waypoint (Gateway) name, as in `istio.io/use-waypoint: <name>`.
    pub name: String,
    /// The waypoint's own namespace and service account: its identity.
    pub namespace: String,
    pub service_account: String,
}

/// Why a request got a synthetic response; becomes the response flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No route matched (404).
    NoRoute,
    /// No ready endpoint (503).
    NoHealthyUpstream,
    /// Connecting upstream failed (503).
    UpstreamConnect,
    /// The route's timeout passed (504).
    Timeout,
    /// Fault injection aborted the request.
    FaultAbort(u16),
    /// The request body was too large to buffer (413).
    TooLarge,
    /// The destination's connection pool is full (503, circuit breaking).
    Overflow,
    /// A local rate limit is exhausted (429).
    RateLimited,
    /// AuthorizationPolicy denied it (403).
    Denied,
    /// A path or authority that cannot be normalized safely (400).
    BadRequest,
}

impl Failure {
    /// The one place an error becomes a response: status and flag.
    pub fn response(self) -> (StatusCode, &'static str, &'static str) {
        match self {
            Failure::NoRoute => (StatusCode::NOT_FOUND, "NR", "route not found"),
            Failure::NoHealthyUpstream => (StatusCode::SERVICE_UNAVAILABLE, "UH", "no healthy upstream"),
            Failure::UpstreamConnect => (StatusCode::SERVICE_UNAVAILABLE, "UF", "upstream connect error"),
            Failure::Timeout => (StatusCode::GATEWAY_TIMEOUT, "UT", "upstream request timeout"),
            Failure::FaultAbort(s) => (StatusCode::from_u16(s).unwrap_or(StatusCode::SERVICE_UNAVAILABLE), "FI", "fault filter abort"),
            Failure::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "-", "request body too large"),
            Failure::RateLimited => (StatusCode::TOO_MANY_REQUESTS, "RL", "local_rate_limited"),
            Failure::Overflow => (StatusCode::SERVICE_UNAVAILABLE, "UO", "upstream connect error or disconnect/reset before headers. reset reason: overflow"),
            Failure::Denied => (StatusCode::FORBIDDEN, "-", "RBAC: access denied"),
            Failure::BadRequest => (StatusCode::BAD_REQUEST, "-", "bad request: path or authority"),
        }
    }
}

/// One upstream HTTP connection, reusable (keep-alive / multiplexed).
enum Upstream {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

pub struct Waypoint {
    cfg: Config,
    cluster: watch::Receiver<Arc<Snapshot>>,
    certs: Arc<CertManager>,
    pool: Pool,
    pub metrics: metrics::Metrics,
    idle: Mutex<HashMap<(SocketAddrV4, bool), Vec<Upstream>>>,
    rng: AtomicU64,
    /// Requests in flight per destination (Service + subset): circuit breaking.
    in_flight: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    /// Per endpoint: requests in flight, failures, ejection.
    endpoints: Mutex<HashMap<SocketAddrV4, EndpointState>>,
    /// Local rate limits' token buckets, by Service or route.
    buckets: Mutex<HashMap<String, routing::Bucket>>,
    /// Round-robin position per destination (endpoint set).
    rr: Mutex<HashMap<Vec<SocketAddrV4>, usize>>,
    /// Request-body bytes currently buffered.
    buffered: AtomicUsize,
}

/// Releases buffered-body accounting when a request ends.
struct Buffered<'a> {
    counter: &'a AtomicUsize,
    bytes: usize,
}

impl Drop for Buffered<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Outlier-detection and load state of one endpoint.
#[derive(Clone, Debug, Default)]
struct EndpointState {
    active: usize,
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
}

/// Counts an attempt against its endpoint until it ends (or is dropped).
struct ActiveGuard<'a> {
    wp: &'a Waypoint,
    ep: SocketAddrV4,
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.wp.endpoints.lock().expect("lock").get_mut(&self.ep) {
            s.active = s.active.saturating_sub(1);
        }
    }
}

/// A response body that keeps a circuit-breaker slot until it ends.
struct HoldSlot<B> {
    inner: B,
    _slot: Option<Slot>,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for HoldSlot<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Releases a circuit-breaker slot when the request is done.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Where one HBONE stream was addressed.
struct StreamCtx {
    svc: ServiceInfo,
    port: ServicePort,
    peer: SocketAddr,
    peer_id: Identity,
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn synthetic(status: StatusCode, flag: &str, text: &str) -> Response<Body> {
    let mut r = Response::new(full(format!("{text}\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if let Ok(v) = HeaderValue::from_str(flag) {
        r.headers_mut().insert("x-skiff-response-flags", v);
    }
    r
}

/// Whether a Service port speaks HTTP (Istio's protocol selection:
/// `appProtocol`, else the port name's prefix).
pub fn port_protocol(p: &ServicePort) -> &'static str {
    let from = |s: &str| {
        let s = s.to_ascii_lowercase();
        if s == "grpc" || s.starts_with("grpc-") || s == "http2" || s.starts_with("http2-") || s == "kubernetes.io/h2c" {
            Some("http2")
        } else if s == "http" || s.starts_with("http-") {
            Some("http")
        } else if s == "tcp" || s.starts_with("tcp-") {
            Some("tcp")
        } else {
            None
        }
    };
    p.app_protocol.as_deref().and_then(from).or_else(|| p.name.as_deref().and_then(from)).unwrap_or("tcp")
}

const HOP_BY_HOP: [&str; 8] =
    ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer", "proxy-authorization"];

impl Waypoint {
    pub fn new(cfg: Config, cluster: watch::Receiver<Arc<Snapshot>>, certs: Arc<CertManager>) -> Arc<Waypoint> {
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
        Arc::new(Waypoint {
            pool: Pool::new(certs.clone()),
            cfg,
            cluster,
            certs,
            metrics: metrics::Metrics::new(),
            idle: Mutex::new(HashMap::new()),
            rng: AtomicU64::new(seed | 1),
            in_flight: Mutex::new(HashMap::new()),
            endpoints: Mutex::new(HashMap::new()),
            buckets: Mutex::new(HashMap::new()),
            rr: Mutex::new(HashMap::new()),
            buffered: AtomicUsize::new(0),
        })
    }

    fn identity(&self, ns: &str, sa: &str) -> Identity {
        Identity::new(self.certs.trust_domain(), ns, sa)
    }

    /// Uniform in 0..n (xorshift; decisions take it as input).
    fn roll(&self, n: u64) -> u64 {
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::Relaxed);
        x % n
    }

    fn hex(&self, bytes: usize) -> String {
        (0..bytes).map(|_| format!("{:02x}", self.roll(256))).collect()
    }

    /// Drops state of endpoints that left the cluster and closed idle
    /// connections, so the maps track the cluster instead of its history.
    pub fn sweep(&self) {
        let snap = self.cluster.borrow().clone();
        let live: std::collections::HashSet<Ipv4Addr> =
            snap.workloads.values().filter(|w| w.is_ready()).filter_map(|w| w.ip).collect();
        self.idle.lock().expect("lock").retain(|(ep, _), list| {
            list.retain(|u| match u {
                Upstream::H1(s) => !s.is_closed(),
                Upstream::H2(s) => !s.is_closed(),
            });
            live.contains(ep.ip()) && !list.is_empty()
        });
        self.endpoints.lock().expect("lock").retain(|ep, st| live.contains(ep.ip()) || st.active > 0);
        self.rr.lock().expect("lock").retain(|eps, _| eps.iter().all(|e| live.contains(e.ip())));
        self.in_flight.lock().expect("lock").retain(|_, c| Arc::strong_count(c) > 1 || c.load(Ordering::Acquire) > 0);
    }

    /// Accepts HBONE connections until the process ends.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> anyhow::Result<()> {
        let sweeper = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(30)).await;
                sweeper.sweep();
            }
        });
        let me = self.identity(&self.cfg.namespace, &self.cfg.service_account);
        let acceptor = tokio_rustls::TlsAcceptor::from(self.certs.server_config(me)?);
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (wp, acceptor) = (self.clone(), acceptor.clone());
            tokio::spawn(async move { wp.connection(acceptor, tcp, peer).await });
        }
    }

    async fn connection(self: Arc<Self>, acceptor: tokio_rustls::TlsAcceptor, tcp: tokio::net::TcpStream, peer: SocketAddr) {
        let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return warn!(%peer, reason = %skiff_core::report(&e), "HBONE peer refused: TLS handshake failed"),
            Err(_) => return warn!(%peer, "HBONE peer refused: TLS handshake timed out"),
        };
        let Some(Ok(peer_id)) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(identity::identity_of) else {
            return warn!(%peer, "HBONE peer refused: no SPIFFE identity");
        };
        let Ok(mut conn) = hbone::server_builder()
            .handshake::<_, Bytes>(tls)
            .await
        else {
            return;
        };
        while let Some(Ok((req, respond))) = conn.accept().await {
            let wp = self.clone();
            let peer_id = peer_id.clone();
            tokio::spawn(async move { wp.stream(req, respond, peer, peer_id).await });
        }
    }

    async fn stream(
        self: Arc<Self>,
        req: Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
        peer: SocketAddr,
        peer_id: Identity,
    ) {
        let answer = |respond: &mut h2::server::SendResponse<Bytes>, s: StatusCode| {
            let _ = respond.send_response(Response::builder().status(s).body(()).expect("valid"), true);
        };
        if req.method() != http::Method::CONNECT {
            return answer(&mut respond, StatusCode::METHOD_NOT_ALLOWED);
        }
        let Some(target) = req.uri().authority().and_then(|a| a.as_str().parse::<SocketAddrV4>().ok()) else {
            return answer(&mut respond, StatusCode::BAD_REQUEST);
        };
        let snap = self.cluster.borrow().clone();
        let Some((svc, port)) = snap.service_by_vip(*target.ip(), target.port()) else {
            info!(%peer, %target, "CONNECT to an address that is not a Service this waypoint serves");
            return answer(&mut respond, StatusCode::BAD_REQUEST);
        };
        // Only Services bound to this waypoint: otherwise any workload could
        // use it as a middleman carrying the waypoint's identity.
        let bound = svc.namespace == self.cfg.namespace
            && matches!(snap.waypoint_for(svc), Some(Ok(w)) if w.labels.get(skiff_core::LABEL_GATEWAY_NAME) == Some(&self.cfg.name));
        if !bound {
            info!(%peer, %target, service = %svc.hostname(), "CONNECT to a Service not bound to this waypoint");
            return answer(&mut respond, StatusCode::FORBIDDEN);
        }
        let ctx = Arc::new(StreamCtx { svc: svc.clone(), port: port.clone(), peer, peer_id });
        if port_protocol(port) == "tcp" {
            // No L7 here, but the policies bound to the waypoint still apply
            // at L4 (the destination only sees the waypoint's identity).
            let policies: Vec<&policy::AuthzPolicy> =
                snap.authorization_policies.iter().filter(|p| p.targets(&self.cfg.namespace, &self.cfg.name, &svc.name)).collect();
            let conn = policy::ConnInfo {
                src_ip: peer.ip(),
                principal: Some(ctx.peer_id.principal()),
                src_namespace: Some(ctx.peer_id.namespace.clone()),
                dst_ip: std::net::IpAddr::V4(*target.ip()),
                dst_port: target.port(),
            };
            let d = policy::evaluate(&policies, &conn);
            if !d.allowed {
                info!(%peer, identity = %ctx.peer_id, policy = ?d.policy, reason = d.reason, "TCP stream denied by authorization policy");
                return answer(&mut respond, StatusCode::FORBIDDEN);
            }
        }
        let Ok(send) = respond.send_response(Response::builder().status(StatusCode::OK).body(()).expect("valid"), false) else {
            return;
        };
        let recv = req.into_body();
        let (ours, theirs) = tokio::io::duplex(256 * 1024);
        let counters = self.metrics.tcp.clone();
        tokio::spawn(async move { hbone::relay_io(theirs, send, recv, &counters, &counters).await });
        if port_protocol(port) == "tcp" {
            return self.tcp_passthrough(ctx, ours).await;
        }
        let wp = self.clone();
        let svc = hyper::service::service_fn(move |req| {
            let (wp, ctx) = (wp.clone(), ctx.clone());
            async move { Ok::<_, Infallible>(wp.request(ctx, req).await) }
        });
        if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(ours), svc).await {
            debug!(error = %e, "downstream HTTP connection ended");
        }
    }

    /// Non-HTTP ports: bytes through to one endpoint, chosen as for HTTP
    /// (the destination's load balancer, ejected endpoints skipped).
    async fn tcp_passthrough(&self, ctx: Arc<StreamCtx>, io: tokio::io::DuplexStream) {
        let snap = self.cluster.borrow().clone();
        let dest = RouteDest { host: ctx.svc.hostname(), subset: None, port: Some(ctx.port.port), weight: 100 };
        let Ok((_, _, eps, policy)) = Self::resolve(&snap, &dest, &ctx.svc.namespace, ctx.port.port) else { return };
        let Some((w, port)) = self.choose(&eps, &policy) else { return };
        let Ok((send, recv, _g)) = self.dial(w, port).await else { return };
        let c = self.metrics.tcp.clone();
        hbone::relay_io(io, send, recv, &c, &c).await;
    }

    async fn dial(&self, w: &Workload, port: u16) -> Result<(h2::SendStream<Bytes>, h2::RecvStream, hbone::StreamGuard), hbone::HboneError> {
        let ip = w.ip.expect("ready endpoints have an IP");
        let me = self.identity(&self.cfg.namespace, &self.cfg.service_account);
        let dst = self.identity(&w.namespace, &w.service_account);
        self.pool
            .connect("waypoint", None, &me, &dst, SocketAddrV4::new(ip, HBONE_PORT), SocketAddrV4::new(ip, port))
            .await
    }

    /// An HTTP connection to `ep` (reused when one is idle).
    async fn upstream(&self, w: &Workload, port: u16, h2: bool) -> Result<Upstream, Failure> {
        let ep = SocketAddrV4::new(w.ip.expect("ready"), port);
        {
            // Reuse a connection only when it can take a request now: an
            // HTTP/1.1 connection is busy until the previous response body
            // has been read to the end.
            let mut idle = self.idle.lock().expect("lock");
            if let Some(list) = idle.get_mut(&(ep, h2)) {
                list.retain(|u| match u {
                    Upstream::H1(s) => !s.is_closed(),
                    Upstream::H2(s) => !s.is_closed(),
                });
                let ready = list.iter().position(|u| match u {
                    Upstream::H1(s) => s.is_ready(),
                    Upstream::H2(s) => s.is_ready(),
                });
                if let Some(i) = ready {
                    return Ok(list.swap_remove(i));
                }
            }
        }
        let (send, recv, guard) = self.dial(w, port).await.map_err(|e| {
            debug!(error = %skiff_core::report(&e), upstream = %ep, "HBONE to endpoint failed");
            Failure::UpstreamConnect
        })?;
        let (ours, theirs) = tokio::io::duplex(256 * 1024);
        let counters = self.metrics.tcp.clone();
        tokio::spawn(async move {
            let _guard = guard;
            hbone::relay_io(theirs, send, recv, &counters, &counters).await
        });
        if h2 {
            let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(ours))
                .await
                .map_err(|_| Failure::UpstreamConnect)?;
            tokio::spawn(conn);
            Ok(Upstream::H2(s))
        } else {
            let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(ours)).await.map_err(|_| Failure::UpstreamConnect)?;
            tokio::spawn(conn);
            Ok(Upstream::H1(s))
        }
    }

    fn put_back(&self, w: &Workload, port: u16, h2: bool, u: Upstream) {
        let ep = SocketAddrV4::new(w.ip.expect("ready"), port);
        let mut idle = self.idle.lock().expect("lock");
        let v = idle.entry((ep, h2)).or_default();
        if v.len() < 16 {
            v.push(u);
        }
    }

    /// Sends one attempt; returns the response or why it failed.
    async fn attempt(&self, w: &Workload, port: u16, h2: bool, req: Request<Full<Bytes>>) -> Result<Response<Incoming>, Failure> {
        let u = self.upstream(w, port, h2).await?;
        match u {
            Upstream::H1(mut s) => {
                s.ready().await.map_err(|_| Failure::UpstreamConnect)?;
                let r = s.send_request(req).await.map_err(|_| Failure::UpstreamConnect);
                // hyper waits for this response's body before the next request.
                self.put_back(w, port, h2, Upstream::H1(s));
                r
            }
            Upstream::H2(mut s) => {
                s.ready().await.map_err(|_| Failure::UpstreamConnect)?;
                let r = s.send_request(req).await.map_err(|_| Failure::UpstreamConnect);
                self.put_back(w, port, h2, Upstream::H2(s));
                r
            }
        }
    }

    fn default_route(svc: &ServiceInfo) -> HttpRoute {
        HttpRoute {
            name: None,
            matches: vec![],
            destinations: vec![RouteDest { host: svc.hostname(), subset: None, port: None, weight: 100 }],
            rewrite_uri: None,
            rewrite_authority: None,
            fault: None,
            timeout: None,
            retries: None,
            request_headers: Default::default(),
            response_headers: Default::default(),
            direct_response: None,
            redirect: None,
            mirror: None,
        }
    }

    /// Handles one request: route, fault, pick, forward (with retries and
    /// timeout), answer. Errors become responses in `Failure::response`.
    async fn request(self: &Arc<Self>, ctx: Arc<StreamCtx>, req: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        let snap = self.cluster.borrow().clone();
        let (mut parts, body) = req.into_parts();
        let trace = trace::continue_or_start(&parts.headers, &self.hex(16), &self.hex(8));
        // Repeated headers joined with ",", as Envoy presents them; a value
        // that is not text stays present (as its lossy form), so a DENY on
        // the header still sees it.
        let mut headers: Vec<(String, String)> = Vec::new();
        for (k, v) in parts.headers.iter() {
            let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
            match headers.iter_mut().find(|(n, _)| n == k.as_str()) {
                Some((_, existing)) => {
                    existing.push(',');
                    existing.push_str(&v);
                }
                None => headers.push((k.as_str().to_owned(), v)),
            }
        }
        let raw_path = parts.uri.path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "/".into());
        // Policy, routing and the upstream all see one normalized path, so
        // `/public/../admin` cannot pass as `/public/...` and reach `/admin`.
        let Some(path) = normalize_path(&raw_path) else {
            let mut log = metrics::RequestLog::new(&ctx.svc, &ctx.peer_id, &snap, ctx.peer, &parts.method, &raw_path, "http", &trace.trace_id);
            log.flags.push("-");
            return self.finish(log, start, Err(Failure::BadRequest), &Default::default());
        };
        let host_header = parts.headers.get(header::HOST).map(|h| h.to_str().map(str::to_owned));
        let authority = match (parts.uri.authority().map(|a| a.to_string()), host_header) {
            (_, Some(Err(_))) => None,
            (Some(a), Some(Ok(h))) if !a.eq_ignore_ascii_case(&h) => None,
            (Some(a), _) => Some(a),
            (None, Some(Ok(h))) => Some(h),
            (None, None) => Some(String::new()),
        };
        let Some(authority) = authority.map(|a| a.trim_end_matches('.').to_ascii_lowercase()) else {
            let log = metrics::RequestLog::new(&ctx.svc, &ctx.peer_id, &snap, ctx.peer, &parts.method, &raw_path, "http", &trace.trace_id);
            return self.finish(log, start, Err(Failure::BadRequest), &Default::default());
        };
        let info = RequestInfo { method: parts.method.as_str(), path: &path, authority: &authority, headers: &headers, port: ctx.port.port };
        let protocol = if parts.version == http::Version::HTTP_2 { "http2" } else { "http" };
        let grpc = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|c| c.starts_with("application/grpc"));
        let vs = snap
            .virtual_services
            .iter()
            .filter(|v| v.applies_to(&ctx.svc.name, &ctx.svc.namespace))
            .min_by_key(|v| (v.namespace != ctx.svc.namespace, v.name.clone()));
        let route = match vs {
            Some(vs) => vs.route(&info).cloned(),
            None => Some(Self::default_route(&ctx.svc)),
        };
        let mut log = metrics::RequestLog::new(&ctx.svc, &ctx.peer_id, &snap, ctx.peer, &parts.method, &path, protocol, &trace.trace_id);
        // L7 authorization: policies whose targetRefs name this waypoint (or
        // the Service), with the tunnel peer's identity.
        let policies: Vec<&policy::AuthzPolicy> = snap
            .authorization_policies
            .iter()
            .filter(|p| p.targets(&self.cfg.namespace, &self.cfg.name, &ctx.svc.name))
            .collect();
        if !policies.is_empty() {
            let conn = policy::ConnInfo {
                src_ip: ctx.peer.ip(),
                principal: Some(ctx.peer_id.principal()),
                src_namespace: Some(ctx.peer_id.namespace.clone()),
                dst_ip: std::net::IpAddr::V4(ctx.svc.cluster_ip.unwrap_or(Ipv4Addr::UNSPECIFIED)),
                dst_port: ctx.port.port,
            };
            let host = authority.rsplit_once(':').map(|(h, _)| h).unwrap_or(&authority);
            let attrs = policy::L7Attrs { method: parts.method.as_str(), path: path.split('?').next().unwrap_or("/"), host, headers: &headers };
            let d = policy::evaluate_l7(&policies, &conn, &attrs);
            if !d.allowed {
                info!(method = %parts.method, %path, identity = %ctx.peer_id, policy = ?d.policy, reason = d.reason, "request denied by authorization policy");
                return self.finish(log, start, Err(Failure::Denied), &Default::default());
            }
        }
        let Some(route) = route else {
            return self.finish(log, start, Err(Failure::NoRoute), &Default::default());
        };
        // Local rate limits: the route's (VirtualService annotation), then
        // the Service's (annotation).
        let route_limit = vs.zip(route.name.as_ref()).and_then(|(v, n)| {
            v.route_rate_limits.get(n).map(|l| (format!("route:{}/{}/{n}", v.namespace, v.name), *l))
        });
        let svc_limit = ctx
            .svc
            .annotations
            .get(routing::ANNOTATION_RATE_LIMIT)
            .and_then(|v| routing::RateLimit::parse(v))
            .map(|l| (format!("service:{}", ctx.svc.hostname()), l));
        for (key, limit) in route_limit.into_iter().chain(svc_limit) {
            let now = Instant::now();
            let mut buckets = self.buckets.lock().expect("lock");
            let b = buckets.entry(key).or_insert(routing::Bucket { tokens: limit.requests as f64, at: now });
            if !routing::take_token(&limit, b, now) {
                drop(buckets);
                return self.finish(log, start, Err(Failure::RateLimited), &route.response_headers);
            }
        }
        if let Some((status, text)) = &route.direct_response {
            let mut r = Response::new(full(text.clone()));
            *r.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
            return self.finish(log, start, Ok((r, None)), &route.response_headers);
        }
        if let Some((uri, auth, code)) = &route.redirect {
            let loc = format!("http://{}{}", auth.as_deref().unwrap_or(&authority), uri.as_deref().unwrap_or(&path));
            let mut r = Response::new(full(""));
            *r.status_mut() = StatusCode::from_u16(*code).unwrap_or(StatusCode::MOVED_PERMANENTLY);
            if let Ok(v) = HeaderValue::from_str(&loc) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            return self.finish(log, start, Ok((r, None)), &route.response_headers);
        }
        if let Some(f) = &route.fault {
            let d = routing::fault_decision(f, self.roll(1_000_000) as f64 / 10_000.0, self.roll(1_000_000) as f64 / 10_000.0);
            if let Some(delay) = d.delay {
                tokio::time::sleep(delay).await;
                log.flags.push("DI");
            }
            match d.abort {
                Some(AbortStatus::Http(s)) => return self.finish(log, start, Err(Failure::FaultAbort(s)), &route.response_headers),
                Some(AbortStatus::Grpc(g)) => {
                    let mut r = synthetic(StatusCode::OK, "FI", "fault filter abort");
                    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
                    if let Ok(v) = HeaderValue::from_str(&grpc_code(&g).to_string()) {
                        r.headers_mut().insert("grpc-status", v);
                    }
                    log.flags.push("FI");
                    return self.finish(log, start, Ok((r, None)), &route.response_headers);
                }
                None => {}
            }
        }
        let Some(dest) = routing::pick_weighted(&route.destinations, self.roll(100) as u32).cloned() else {
            return self.finish(log, start, Err(Failure::NoRoute), &route.response_headers);
        };
        // The destination Service, its port, the subset's pods.
        let host_ns = vs.map(|v| v.namespace.as_str()).unwrap_or(&ctx.svc.namespace).to_owned();
        let (dsvc, dport, eps, policy) = match Self::resolve(&snap, &dest, &host_ns, ctx.port.port) {
            Ok(r) => r,
            Err(f) => return self.finish(log, start, Err(f), &route.response_headers),
        };
        let (dsvc, dport) = (&dsvc, &dport);
        let h2_upstream = port_protocol(dport) == "http2" || grpc;
        // The body is read (bounded in size and time) before a pool slot is
        // taken, so slow senders cannot hold slots; the bytes buffered
        // across all requests are capped too.
        let body = match tokio::time::timeout(BODY_READ_TIMEOUT, http_body_util::Limited::new(body, MAX_BUFFERED_BODY).collect()).await {
            Ok(Ok(c)) => c.to_bytes(),
            Ok(Err(_)) => return self.finish(log, start, Err(Failure::TooLarge), &route.response_headers),
            Err(_) => return self.finish(log, start, Err(Failure::BadRequest), &route.response_headers),
        };
        let _buffered = {
            let now = self.buffered.fetch_add(body.len(), Ordering::AcqRel) + body.len();
            let guard = Buffered { counter: &self.buffered, bytes: body.len() };
            if now > MAX_BUFFERED_TOTAL {
                return self.finish(log, start, Err(Failure::Overflow), &route.response_headers);
            }
            guard
        };
        // Circuit breaking: a full pool answers at once instead of queueing.
        let mut slot = {
            let key = format!("{}|{}", dsvc.hostname(), dest.subset.as_deref().unwrap_or(""));
            let counter = self.in_flight.lock().expect("lock").entry(key).or_default().clone();
            let now = counter.fetch_add(1, Ordering::AcqRel);
            let slot = Slot(counter);
            if policy.connection_pool.max_in_flight(h2_upstream).is_some_and(|max| now as u32 >= max) {
                return self.finish(log, start, Err(Failure::Overflow), &route.response_headers);
            }
            Some(slot)
        };
        // The upstream request.
        // `te: trailers` is end-to-end for gRPC and must reach the backend.
        let te_trailers = parts.headers.get(header::TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
        for h in HOP_BY_HOP {
            parts.headers.remove(h);
        }
        if te_trailers {
            parts.headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        if let Ok(u) = path.parse() {
            parts.uri = u;
        }
        if let Some(uri) = &route.rewrite_uri {
            let rest = route
                .matches
                .iter()
                .find_map(|m| match &m.uri {
                    Some(routing::StrMatch::Prefix(p)) if path.starts_with(p.as_str()) => Some(&path[p.len()..]),
                    _ => None,
                })
                .unwrap_or("");
            // Exact, regex or no match: the whole path is replaced and the
            // query string kept.
            let query = path.split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
            let new = if rest.is_empty() { format!("{uri}{query}") } else { format!("{}{}", uri.trim_end_matches('/'), if rest.starts_with('/') || rest.starts_with('?') { rest.to_owned() } else { format!("/{rest}") }) };
            if let Ok(u) = new.parse() {
                parts.uri = u;
            }
            log.rewritten = Some(new);
        }
        if let Some(a) = &route.rewrite_authority {
            if let Ok(v) = HeaderValue::from_str(a) {
                parts.headers.insert(header::HOST, v);
            }
        }
        apply_header_ops(&mut parts.headers, &route.request_headers);
        trace::inject(&trace, &mut parts.headers);
        if let Ok(v) = HeaderValue::from_str(&format!("{}", trace.trace_id)) {
            parts.headers.entry("x-request-id").or_insert(v);
        }
        if let Some((mirror, pct)) = &route.mirror {
            if (self.roll(1_000_000) as f64 / 10_000.0) < *pct {
                self.mirror(&snap, mirror, &host_ns, ctx.port.port, parts.clone(), body.clone(), grpc);
            }
        }
        let h2 = h2_upstream;
        let max_retries = policy.connection_pool.max_retries.unwrap_or(u32::MAX);
        // A route without `retries` gets Istio's default policy;
        // `retries: {attempts: 0}` turns retrying off.
        let retries = route.retries.clone().unwrap_or_else(routing::Retries::istio_default);
        let attempts = 1 + retries.attempts.min(max_retries);
        let per_try = retries.per_try_timeout;
        let retry_on: Vec<String> = retries.retry_on.clone();
        let deadline = route.timeout.and_then(|t| Instant::now().checked_add(t));
        let mut outcome: Result<(Response<Body>, Option<&Workload>), Failure> = Err(Failure::NoHealthyUpstream);
        for n in 0..attempts {
            let Some((w, port)) = self.choose(&eps, &policy) else {
                outcome = Err(Failure::NoHealthyUpstream);
                break;
            };
            let ep = SocketAddrV4::new(w.ip.expect("ready"), port);
            self.endpoints.lock().expect("lock").entry(ep).or_default().active += 1;
            // Decrements `active` even if the client goes away mid-attempt.
            let _active = ActiveGuard { wp: self, ep };
            let req = upstream_request(&parts, &body, h2);
            let limit = match (per_try, deadline) {
                (Some(p), Some(d)) => Some(p.min(d.saturating_duration_since(Instant::now()))),
                (Some(p), None) => Some(p),
                (None, Some(d)) => Some(d.saturating_duration_since(Instant::now())),
                (None, None) => None,
            };
            let fut = self.attempt(w, port, h2, req);
            let r = match limit {
                Some(l) => tokio::time::timeout(l, fut).await.unwrap_or(Err(Failure::Timeout)),
                None => fut.await,
            };
            let members: Vec<SocketAddrV4> = eps.iter().map(|(w, p)| SocketAddrV4::new(w.ip.expect("ready"), *p)).collect();
            self.observe(ep, &r, &policy, &members);
            let last = n + 1 == attempts || deadline.is_some_and(|d| Instant::now() >= d);
            match r {
                Ok(resp) => {
                    let code = resp.status().as_u16();
                    let retriable = code >= 500
                        && retry_on.iter().any(|c| {
                            c == "5xx"
                                || c == &code.to_string()
                                || (c == "gateway-error" && matches!(code, 502..=504))
                                || (c == "retriable-status-codes" && code == 503)
                        });
                    if retriable && !last {
                        log.retries += 1;
                        continue;
                    }
                    // The circuit-breaker slot is held until the response
                    // body has been sent (or dropped), not just its headers.
                    let held = slot.take();
                    outcome = Ok((resp.map(|b| HoldSlot { inner: b, _slot: held }.boxed()), Some(w)));
                    break;
                }
                Err(f) => {
                    let retriable = match f {
                        Failure::UpstreamConnect => {
                            retry_on.iter().any(|c| matches!(c.as_str(), "connect-failure" | "5xx" | "reset" | "refused-stream"))
                        }
                        Failure::Timeout => per_try.is_some() && deadline.is_none_or(|d| Instant::now() < d),
                        _ => false,
                    };
                    if retriable && !last {
                        log.retries += 1;
                        continue;
                    }
                    outcome = Err(f);
                    break;
                }
            }
        }
        let outcome = outcome.map(|(r, w)| (r, w.cloned()));
        self.finish(log, start, outcome.map(|(r, w)| (r, w)), &route.response_headers)
    }

    /// A route destination → its Service, port, ready endpoints (of the
    /// subset) and traffic policy.
    #[allow(clippy::type_complexity)]
    fn resolve<'s>(
        snap: &'s Snapshot,
        dest: &RouteDest,
        host_ns: &str,
        default_port: u16,
    ) -> Result<(ServiceInfo, ServicePort, Vec<(&'s Workload, u16)>, routing::TrafficPolicy), Failure> {
        let dsvc = snap
            .services
            .values()
            .find(|s| routing::host_matches(&dest.host, host_ns, &s.name, &s.namespace))
            .ok_or(Failure::NoHealthyUpstream)?;
        let want_port = dest.port.unwrap_or(default_port);
        let dport = dsvc.ports.iter().find(|p| p.port == want_port).or_else(|| dsvc.ports.first()).ok_or(Failure::NoHealthyUpstream)?;
        let dr = snap.destination_rules.iter().find(|dr| routing::host_matches(&dr.host, &dr.namespace, &dsvc.name, &dsvc.namespace));
        let subset_labels = dest.subset.as_ref().and_then(|sub| dr.and_then(|dr| dr.subsets.get(sub).cloned()));
        if dest.subset.is_some() && subset_labels.is_none() {
            warn!(subset = ?dest.subset, service = %dsvc.hostname(), "route names a subset no DestinationRule defines");
            return Err(Failure::NoHealthyUpstream);
        }
        let eps: Vec<(&Workload, u16)> = snap
            .endpoints(dsvc, dport)
            .into_iter()
            .filter(|(w, _)| subset_labels.as_ref().is_none_or(|l| l.iter().all(|(k, v)| w.labels.get(k) == Some(v))))
            .collect();
        if eps.is_empty() {
            return Err(Failure::NoHealthyUpstream);
        }
        let policy = dr.map(|dr| dr.policy_for(dest.subset.as_deref(), dport.port).clone()).unwrap_or_default();
        Ok((dsvc.clone(), dport.clone(), eps, policy))
    }

    /// Sends a copy of the request to the mirror destination, fire and
    /// forget; its authority gets `-shadow` appended, as Envoy does.
    #[allow(clippy::too_many_arguments)]
    fn mirror(self: &Arc<Self>, snap: &Snapshot, dest: &RouteDest, host_ns: &str, port: u16, mut parts: http::request::Parts, body: Bytes, grpc: bool) {
        let Ok((svc, sport, eps, policy)) = Self::resolve(snap, dest, host_ns, port) else {
            debug!(mirror = %dest.host, "mirror destination has no endpoint; copy dropped");
            return;
        };
        let Some((w, p)) = self.choose(&eps, &policy) else { return };
        let w = w.clone();
        if let Some(host) = parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(|h| format!("{h}-shadow")) {
            if let Ok(v) = HeaderValue::from_str(&host) {
                parts.headers.insert(header::HOST, v);
            }
        }
        let h2 = port_protocol(&sport) == "http2" || grpc;
        let me = self.clone();
        debug!(mirror = %svc.hostname(), "mirroring request");
        tokio::spawn(async move {
            let req = upstream_request(&parts, &body, h2);
            if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(30), me.attempt(&w, p, h2, req)).await {
                let _ = resp.into_body().collect().await;
            }
        });
    }

    /// Picks an endpoint by the destination's load-balancing policy,
    /// skipping endpoints that outlier detection has ejected.
    fn choose<'a>(&self, eps: &[(&'a Workload, u16)], policy: &routing::TrafficPolicy) -> Option<(&'a Workload, u16)> {
        let now = Instant::now();
        let states = self.endpoints.lock().expect("lock");
        let state = |w: &Workload, p: u16| states.get(&SocketAddrV4::new(w.ip.unwrap_or(Ipv4Addr::UNSPECIFIED), p)).cloned().unwrap_or_default();
        let live: Vec<(&'a Workload, u16)> =
            eps.iter().copied().filter(|(w, p)| state(w, *p).ejected_until.is_none_or(|t| t <= now)).collect();
        if live.is_empty() {
            return None;
        }
        Some(match policy.load_balancer {
            routing::LoadBalancer::RoundRobin => {
                // One counter per destination (its endpoint set): traffic to
                // one Service (or a mirror) does not skew another's rotation.
                let key: Vec<SocketAddrV4> = eps.iter().map(|(w, p)| SocketAddrV4::new(w.ip.unwrap_or(Ipv4Addr::UNSPECIFIED), *p)).collect();
                let mut rr = self.rr.lock().expect("lock");
                let n = rr.entry(key).or_insert(0);
                *n = n.wrapping_add(1);
                live[*n % live.len()]
            }
            routing::LoadBalancer::Random => live[self.roll(live.len() as u64) as usize],
            routing::LoadBalancer::LeastRequest => {
                // Power of two choices.
                let a = live[self.roll(live.len() as u64) as usize];
                let b = live[self.roll(live.len() as u64) as usize];
                if state(a.0, a.1).active <= state(b.0, b.1).active { a } else { b }
            }
        })
    }

    /// Records an attempt's outcome for outlier detection.
    fn observe(&self, ep: SocketAddrV4, r: &Result<Response<Incoming>, Failure>, policy: &routing::TrafficPolicy, members: &[SocketAddrV4]) {
        let total = members.len();
        let mut states = self.endpoints.lock().expect("lock");
        let now = Instant::now();
        // maxEjectionPercent counts this destination's endpoints only.
        let ejected = members
            .iter()
            .filter(|m| states.get(m).is_some_and(|s| s.ejected_until.is_some_and(|t| t > now)))
            .count();
        let s = states.entry(ep).or_default();
        if s.ejected_until.is_some_and(|t| t <= now) {
            // Back from ejection: starts with a clean slate.
            s.ejected_until = None;
            s.consecutive_5xx = 0;
            s.consecutive_gateway = 0;
        }
        let code = match r {
            Ok(resp) => resp.status().as_u16(),
            Err(Failure::UpstreamConnect) => 503,
            Err(Failure::Timeout) => 504,
            Err(_) => return,
        };
        if code >= 500 {
            s.consecutive_5xx += 1;
            if matches!(code, 502..=504) {
                s.consecutive_gateway += 1;
            }
        } else {
            s.consecutive_5xx = 0;
            s.consecutive_gateway = 0;
            return;
        }
        let Some(o) = &policy.outlier else { return };
        let tripped = o.consecutive_5xx.is_some_and(|n| s.consecutive_5xx >= n)
            || o.consecutive_gateway.is_some_and(|n| s.consecutive_gateway >= n);
        let room = (ejected + 1) * 100 <= total * o.max_ejection_percent as usize || ejected == 0;
        if tripped && room && s.ejected_until.is_none() {
            s.ejections = s.ejections.saturating_add(1).min(100);
            let for_how_long = o.base_ejection_time.checked_mul(s.ejections).unwrap_or(Duration::from_secs(3600)).min(Duration::from_secs(3600));
            s.ejected_until = now.checked_add(for_how_long);
            warn!(endpoint = %ep, ejected_for_ms = for_how_long.as_millis() as u64, "outlier detection: endpoint ejected");
        }
    }

    fn finish(
        &self,
        mut log: metrics::RequestLog,
        start: Instant,
        outcome: Result<(Response<Body>, Option<Workload>), Failure>,
        response_ops: &routing::HeaderOps,
    ) -> Response<Body> {
        let mut resp = match outcome {
            Ok((r, w)) => {
                if let Some(w) = w {
                    log.set_destination(&w);
                }
                r
            }
            Err(f) => {
                let (status, flag, text) = f.response();
                log.flags.push(flag);
                synthetic(status, flag, text)
            }
        };
        apply_header_ops(resp.headers_mut(), response_ops);
        log.finish(&self.metrics, resp.status().as_u16(), start.elapsed());
        resp
    }
}

/// The upstream form of a request: HTTP/2 takes the authority in the URI
/// (`:authority`) and no Host header; HTTP/1.1 takes origin-form and Host.
fn upstream_request(parts: &http::request::Parts, body: &Bytes, h2: bool) -> Request<Full<Bytes>> {
    let mut parts = parts.clone();
    let authority = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()))
        .unwrap_or_else(|| "localhost".into());
    let pq = parts.uri.path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "/".into());
    if h2 {
        parts.headers.remove(header::HOST);
        if let Ok(u) = format!("http://{authority}{pq}").parse() {
            parts.uri = u;
        }
        parts.version = http::Version::HTTP_2;
    } else {
        if let Ok(u) = pq.parse() {
            parts.uri = u;
        }
        if let Ok(v) = HeaderValue::from_str(&authority) {
            parts.headers.insert(header::HOST, v);
        }
        parts.version = http::Version::HTTP_11;
    }
    Request::from_parts(parts, Full::new(body.clone()))
}

/// Istio's BASE path normalization plus merged slashes: `%xx` of unreserved
/// characters decoded, `.` and `..` segments resolved, `//` merged; encoded
/// `/` or `\\` and raw `\\` are refused (None). The query is kept as is.
pub fn normalize_path(raw: &str) -> Option<String> {
    let (path, query) = match raw.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (raw, None),
    };
    if !path.starts_with('/') || path.contains('\\') {
        return None;
    }
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = path.get(i + 1..i + 3)?;
            let v = u8::from_str_radix(hex, 16).ok()?;
            if v == b'/' || v == b'\\' {
                return None;
            }
            if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') {
                decoded.push(v as char);
            } else {
                decoded.push('%');
                decoded.push_str(&hex.to_ascii_uppercase());
            }
            i += 3;
        } else {
            decoded.push(bytes[i] as char);
            i += 1;
        }
    }
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut p = format!("/{}", out.join("/"));
    if (decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..")) && p != "/" {
        p.push('/');
    }
    Some(match query {
        Some(q) => format!("{p}?{q}"),
        None => p,
    })
}

#[cfg(test)]
mod tests {
    use super::normalize_path;

    #[test]
    fn paths_are_normalized_before_policy_and_routing() {
        for (raw, want) in [
            ("/public/../admin", Some("/admin")),
            ("//admin", Some("/admin")),
            ("/%61dmin", Some("/admin")),
            ("/a/./b/", Some("/a/b/")),
            ("/a/b?x=../y", Some("/a/b?x=../y")),
            ("/../..", Some("/")),
            ("/a%2Fb", None),
            ("/a%5cb", None),
            ("/a\\b", None),
            ("/a%zz", None),
            ("/caf%C3%A9", Some("/caf%C3%A9")),
            ("relative", None),
        ] {
            assert_eq!(normalize_path(raw).as_deref(), want, "{raw}");
        }
    }
}

/// Port every pod's ztunnel terminates HBONE on.
const HBONE_PORT: u16 = 15008;

fn apply_header_ops(h: &mut HeaderMap, ops: &routing::HeaderOps) {
    for k in &ops.remove {
        h.remove(k.as_str());
    }
    for (k, v) in &ops.set {
        if let (Ok(k), Ok(v)) = (header::HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
            h.insert(k, v);
        }
    }
    for (k, v) in &ops.add {
        if let (Ok(k), Ok(v)) = (header::HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
            h.append(k, v);
        }
    }
}

/// gRPC status code from a name (`UNAVAILABLE`) or number.
pub fn grpc_code(s: &str) -> u32 {
    const NAMES: [&str; 17] = [
        "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
        "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
        "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
    ];
    s.parse().ok().or_else(|| NAMES.iter().position(|n| n.eq_ignore_ascii_case(s)).map(|i| i as u32)).unwrap_or(2)
}
