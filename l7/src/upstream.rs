//! The way upstream: choosing an endpoint (the DestinationRule's load
//! balancer, ejected endpoints skipped), the HBONE tunnel to its ztunnel,
//! the pooled HTTP/1.1 and HTTP/2 connections over it, the per-endpoint
//! state (requests in flight, outlier-detection counters), sending one
//! attempt, mirroring, and raw TCP passthrough for non-HTTP ports.

use std::{
    collections::{HashMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus::IntCounter;
use skiff_core::{
    model::{Snapshot, Workload},
    routing::{self, RouteDest},
};
use skiff_hbone::{
    certs::CertManager,
    identity::Identity,
    tunnel::{self as hbone, Pool},
};
use tracing::{debug, warn};

use crate::{
    errors::Failure,
    origin::{Alpn, Originate, Origins},
    route::{self, Endpoint, Outside},
};

/// Port every pod's ztunnel terminates HBONE on.
const HBONE_PORT: u16 = 15008;
/// Idle connections kept per endpoint and protocol.
/// Default of `HttpLimits::max_idle_per_endpoint`.
pub const MAX_IDLE_PER_ENDPOINT: usize = 16;

/// One upstream HTTP connection, reusable (keep-alive / multiplexed).
enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Conn {
    fn is_closed(&self) -> bool {
        match self {
            Conn::H1(s) => s.is_closed(),
            Conn::H2(s) => s.is_closed(),
        }
    }

    fn is_ready(&self) -> bool {
        match self {
            Conn::H1(s) => s.is_ready(),
            Conn::H2(s) => s.is_ready(),
        }
    }
}

/// Idle connections, each with the requests it has carried, by
/// [`PoolKey`].
type IdlePool = HashMap<PoolKey, Vec<(Conn, u32)>>;

/// What an idle connection can be reused for: the endpoint, the protocol
/// (HTTP/2 or not), the transport (HBONE, or plain TCP to an endpoint
/// outside the mesh: a pod that joins the mesh never gets a plaintext
/// connection from the pool) and the TLS the proxy originated on it (0:
/// none; else [`Originate::key`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    ep: SocketAddrV4,
    h2: bool,
    plain: bool,
    tls: u64,
}


/// Outlier-detection and load state of one endpoint.
#[derive(Clone, Debug, Default)]
pub struct EndpointState {
    /// Attempts in flight (least-request balancing).
    pub active: usize,
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    /// Ejected by outlier detection until then.
    pub ejected_until: Option<Instant>,
    /// Times ejected so far (the ejection time grows with it).
    pub ejections: u32,
}

/// The proxy's upstream side, shared by all its requests.
pub struct Upstreams {
    /// The proxy's own namespace and service account: the identity it
    /// tunnels with.
    namespace: String,
    service_account: String,
    certs: Arc<CertManager>,
    pool: Pool,
    /// Bytes through HBONE streams.
    tcp: IntCounter,
    idle: Mutex<IdlePool>,
    /// Idle connections kept per endpoint (`--http-max-idle-per-endpoint`).
    max_idle: usize,
    /// Per endpoint: requests in flight, failures, ejection.
    pub(crate) endpoints: Mutex<HashMap<SocketAddrV4, EndpointState>>,
    /// Round-robin position per destination (endpoint set).
    rr: Mutex<HashMap<Vec<SocketAddrV4>, usize>>,
    /// Endpoints outside the cluster view (ServiceEntries') and when each
    /// was last chosen: their state is kept for 10 minutes after.
    external: Mutex<HashMap<SocketAddrV4, Instant>>,
    /// The cluster view, to tell endpoints in the mesh (HBONE) from pods
    /// outside it (plain TCP, as Istio's proxies reach them). None: HBONE
    /// always.
    cluster: Option<tokio::sync::watch::Receiver<Arc<Snapshot>>>,
    /// `--connect-timeout`, for plain TCP.
    connect_timeout: Duration,
    /// ServiceEntries' names as resolved (DNS entries' endpoints).
    names: Option<Arc<skiff_hbone::names::NameCache>>,
    /// TLS origination configurations.
    origins: Origins,
    /// Whether the proxy reads its namespace's Secrets (a
    /// DestinationRule's `credentialName`).
    read_secrets: bool,
    /// An ingress gateway: Services that ask for it are reached through
    /// their waypoint.
    ingress: bool,
}

/// Counts an attempt against its endpoint until it ends (or is dropped).
pub struct ActiveGuard<'a> {
    ups: &'a Upstreams,
    ep: SocketAddrV4,
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.ups.endpoints.lock().expect("lock").get_mut(&self.ep) {
            s.active = s.active.saturating_sub(1);
        }
    }
}

/// The HTTP client handshake on an upstream byte stream (an HBONE stream,
/// or plain TCP to a pod outside the mesh).
async fn handshake_upstream<I>(io: I, h2: bool) -> Result<Conn, Failure>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    if h2 {
        let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await.map_err(|_| Failure::UpstreamConnect)?;
        tokio::spawn(conn);
        Ok(Conn::H2(s))
    } else {
        let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|_| Failure::UpstreamConnect)?;
        tokio::spawn(conn);
        Ok(Conn::H1(s))
    }
}

impl Upstreams {
    pub fn new(
        namespace: &str,
        service_account: &str,
        certs: Arc<CertManager>,
        tcp: IntCounter,
        hbone: skiff_hbone::limits::HboneLimits,
        max_idle: usize,
    ) -> Upstreams {
        let connect_timeout = hbone.connect_timeout;
        Upstreams {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            pool: Pool::new(certs.clone(), hbone),
            certs,
            tcp,
            idle: Mutex::new(HashMap::new()),
            max_idle,
            endpoints: Mutex::new(HashMap::new()),
            rr: Mutex::new(HashMap::new()),
            external: Mutex::new(HashMap::new()),
            cluster: None,
            connect_timeout,
            names: None,
            origins: Origins::default(),
            read_secrets: false,
            ingress: false,
        }
    }

    /// Endpoints outside the mesh (not enrolled) are reached over plain TCP
    /// from now on, as Istio's gateways and waypoints reach them; before,
    /// HBONE to a pod with no ztunnel failed (503 `UF`).
    pub fn with_cluster(mut self, cluster: tokio::sync::watch::Receiver<Arc<Snapshot>>) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// ServiceEntries' endpoints: their names as `names` resolves them;
    /// `read_secrets`: whether `credentialName` can be read.
    pub fn with_outside(mut self, names: Arc<skiff_hbone::names::NameCache>, read_secrets: bool) -> Self {
        self.names = Some(names);
        self.read_secrets = read_secrets;
        self
    }

    /// The proxy is an ingress gateway (see [`route::ingress_uses_waypoint`]).
    pub fn with_ingress(mut self, ingress: bool) -> Self {
        self.ingress = ingress;
        self
    }

    /// Resolves a destination with the ServiceEntries' names as resolved.
    pub fn resolve<'s>(&self, snap: &'s Snapshot, dest: &RouteDest, host_ns: &str, default_port: u16, original_dst: Option<SocketAddrV4>) -> Result<route::Resolved<'s>, Failure> {
        let names = self.names.as_ref().map(|n| n.read());
        route::resolve(snap, dest, host_ns, &self.namespace, default_port, Outside { names: names.as_deref(), original_dst, ingress: self.ingress })
    }

    /// The TLS to originate to `resolved`'s endpoints for a request to
    /// `authority`, if its DestinationRule asks for it; a configuration
    /// that cannot be made fails the request (503 UF), logged with why.
    pub fn originate(&self, snap: &Snapshot, resolved: &route::Resolved<'_>, authority: &str, alpn: Alpn) -> Result<Option<Originate>, Failure> {
        // Unset `sni`: the upstream request's host (Istio's automatic
        // SNI) when it is one of the destination's own names — never a
        // name the client made up, which would pick another site's
        // certificate at a shared endpoint (domain fronting past egress
        // control) — else the destination's.
        let host = routing::host_of(authority).trim_end_matches('.').to_ascii_lowercase();
        let own = resolved.svc.hostname();
        let ours = host == own || snap.entry_of(&resolved.svc).is_some_and(|e| e.hosts.contains(&host));
        let host = if ours { host } else { own };
        self.origins.originate(resolved.policy.tls.as_ref(), snap, &self.namespace, self.read_secrets, &host, alpn).map_err(|e| {
            warn!(destination = %resolved.svc.hostname(), error = %e, "TLS origination (DestinationRule tls) cannot be set up; request refused");
            Failure::UpstreamConnect
        })
    }

    /// Whether `w` terminates HBONE (its pod is enrolled).
    fn in_mesh(&self, w: &Workload) -> bool {
        let Some(cluster) = &self.cluster else { return true };
        let snap = cluster.borrow();
        let Some(node) = w.node.as_deref() else { return false };
        skiff_core::enroll::decide(node, snap.namespace_labels(&w.namespace), w) == skiff_core::enroll::Decision::Enroll
    }

    /// Drops state of endpoints not in `live` (nor an external endpoint
    /// chosen in the last 10 minutes) and closed idle connections.
    pub fn sweep(&self, live: &HashSet<Ipv4Addr>) {
        let now = Instant::now();
        let mut external = self.external.lock().expect("lock");
        external.retain(|_, t| now.duration_since(*t) < Duration::from_secs(600));
        let keep = |ep: &SocketAddrV4| live.contains(ep.ip()) || external.contains_key(ep);
        self.idle.lock().expect("lock").retain(|k, list| {
            list.retain(|(u, _)| !u.is_closed());
            keep(&k.ep) && !list.is_empty()
        });
        self.endpoints.lock().expect("lock").retain(|ep, st| keep(ep) || st.active > 0);
        self.rr.lock().expect("lock").retain(|eps, _| eps.iter().all(keep));
    }

    /// Picks an endpoint by the destination's load-balancing policy,
    /// skipping endpoints that outlier detection has ejected.
    /// With a consistent-hash policy, `hash` (the request's key, see
    /// [`route::request_hash`]) picks the endpoint: the live endpoint with
    /// the highest score for the key (rendezvous hashing), so one key keeps
    /// its endpoint while that endpoint is healthy; a request without a key
    /// goes to a random one, as Envoy's ring hash does.
    /// Endpoints in `tried` (a retry's earlier attempts) are passed over
    /// while another live one is left.
    pub fn choose<'a>(
        &self,
        eps: &[Endpoint<'a>],
        policy: &routing::TrafficPolicy,
        hash: Option<u64>,
        tried: &[SocketAddrV4],
        rng: &mut fastrand::Rng,
    ) -> Option<Endpoint<'a>> {
        let now = Instant::now();
        let states = self.endpoints.lock().expect("lock");
        let state = |e: &Endpoint<'_>| states.get(&e.addr()).cloned().unwrap_or_default();
        let mut live: Vec<Endpoint<'a>> = eps.iter().copied().filter(|e| state(e).ejected_until.is_none_or(|t| t <= now)).collect();
        if live.is_empty() {
            return None;
        }
        if !tried.is_empty() && live.iter().any(|e| !tried.contains(&e.addr())) {
            live.retain(|e| !tried.contains(&e.addr()));
        }
        if policy.hash.is_some() {
            return Some(match hash {
                Some(key) => pick_by_hash(&live, key)?,
                None => live[rng.usize(..live.len())],
            });
        }
        Some(match policy.load_balancer {
            routing::LoadBalancer::RoundRobin => {
                // One counter per destination (its endpoint set): traffic to
                // one Service (or a mirror) does not skew another's rotation.
                let key: Vec<SocketAddrV4> = eps.iter().map(Endpoint::addr).collect();
                let mut rr = self.rr.lock().expect("lock");
                let n = rr.entry(key).or_insert(0);
                *n = n.wrapping_add(1);
                live[*n % live.len()]
            }
            routing::LoadBalancer::Random => live[rng.usize(..live.len())],
            routing::LoadBalancer::LeastRequest => {
                // Power of two choices.
                let a = live[rng.usize(..live.len())];
                let b = live[rng.usize(..live.len())];
                if state(&a).active <= state(&b).active { a } else { b }
            }
        })
    }

    /// Counts an attempt to `ep` as in flight until the guard drops.
    pub fn begin(&self, ep: SocketAddrV4) -> ActiveGuard<'_> {
        self.endpoints.lock().expect("lock").entry(ep).or_default().active += 1;
        ActiveGuard { ups: self, ep }
    }

    /// HBONE to `w` (its ztunnel, or a waypoint itself) asking for `target`
    /// (see [`Endpoint::hbone`]).
    async fn dial(&self, w: &Workload, target: SocketAddrV4) -> Result<(h2::SendStream<Bytes>, h2::RecvStream, hbone::StreamGuard), hbone::HboneError> {
        let ip = w.ip.expect("ready endpoints have an IP");
        let me = Identity::new(self.certs.trust_domain(), &self.namespace, &self.service_account);
        let dst = Identity::new(self.certs.trust_domain(), &w.namespace, &w.service_account);
        self.pool.connect("waypoint", None, &me, &dst, SocketAddrV4::new(ip, HBONE_PORT), target).await
    }

    /// Whether `ep` is reached over plain TCP (outside the mesh).
    fn plain(&self, ep: &Endpoint<'_>) -> bool {
        match ep {
            Endpoint::Pod(w, _) => !self.in_mesh(w),
            Endpoint::Waypoint(..) => false,
            Endpoint::External(a) => {
                self.external.lock().expect("lock").insert(*a, Instant::now());
                true
            }
        }
    }

    /// The byte stream to `ep`: HBONE to its ztunnel for a pod in the mesh,
    /// plain TCP otherwise.
    async fn open(&self, ep: &Endpoint<'_>, plain: bool) -> Result<Stream, Failure> {
        let addr = ep.addr();
        match ep.hbone().filter(|_| !plain) {
            Some((w, target)) => {
                let (send, recv, guard) = self.dial(w, target).await.map_err(|e| {
                    debug!(error = %skiff_core::report(&e), upstream = %addr, "HBONE to endpoint failed");
                    Failure::UpstreamConnect
                })?;
                let (ours, theirs) = tokio::io::duplex(256 * 1024);
                let counters = self.tcp.clone();
                tokio::spawn(async move {
                    let _guard = guard;
                    hbone::relay_io(theirs, send, recv, &counters, &counters).await
                });
                Ok(Stream::Hbone(ours))
            }
            None => match tokio::time::timeout(self.connect_timeout, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(t)) => {
                    let _ = t.set_nodelay(true);
                    Ok(Stream::Tcp(t))
                }
                r => {
                    debug!(upstream = %addr, error = ?r.map(|r| r.err()), "TCP to an endpoint outside the mesh failed");
                    Err(Failure::UpstreamConnect)
                }
            },
        }
    }

    /// An HTTP connection to `ep` (reused when one is idle), with the
    /// requests it has carried so far and its pool key. With `tls`, the
    /// proxy's TLS to the endpoint goes first (inside HBONE for a pod in
    /// the mesh).
    async fn connection(&self, ep: &Endpoint<'_>, h2: bool, tls: Option<&Originate>, mesh_only: bool) -> Result<(Conn, u32, PoolKey), Failure> {
        let plain = self.plain(ep);
        if plain && mesh_only {
            return Err(refuse_plain(ep));
        }
        let key = PoolKey { ep: ep.addr(), h2, plain, tls: tls.map_or(0, |t| t.key) };
        {
            // Reuse a connection only when it can take a request now: an
            // HTTP/1.1 connection is busy until the previous response body
            // has been read to the end.
            let mut idle = self.idle.lock().expect("lock");
            if let Some(list) = idle.get_mut(&key) {
                list.retain(|(u, _)| !u.is_closed());
                if let Some(i) = list.iter().position(|(u, _)| u.is_ready()) {
                    let (u, carried) = list.swap_remove(i);
                    return Ok((u, carried, key));
                }
            }
        }
        let stream = self.open(ep, plain).await?;
        let conn = match tls {
            None => handshake_upstream(stream, h2).await?,
            Some(o) => handshake_upstream(self.tls_over(key.ep, o, stream).await?, h2).await?,
        };
        Ok((conn, 0, key))
    }

    /// The proxy's TLS to the endpoint at `ep` over `stream`, within the
    /// connect timeout (at least 10 s); a failure is logged.
    async fn tls_over(&self, ep: SocketAddrV4, o: &Originate, stream: Stream) -> Result<tokio_rustls::client::TlsStream<Stream>, Failure> {
        let connector = tokio_rustls::TlsConnector::from(o.config.clone());
        let deadline = self.connect_timeout.max(Duration::from_secs(10));
        match tokio::time::timeout(deadline, connector.connect(o.server_name.clone(), stream)).await {
            Ok(Ok(t)) => Ok(t),
            Ok(Err(e)) => {
                warn!(upstream = %ep, server_name = ?o.server_name, error = %e, "TLS origination to the endpoint failed");
                Err(Failure::UpstreamConnect)
            }
            Err(_) => {
                warn!(upstream = %ep, "TLS origination to the endpoint timed out");
                Err(Failure::UpstreamConnect)
            }
        }
    }

    /// Keeps a connection for reuse, unless it has carried the
    /// DestinationRule's `maxRequestsPerConnection` (then it closes once
    /// its last response is read).
    fn put_back(&self, key: PoolKey, u: Conn, carried: u32, max_requests: Option<u32>) {
        if max_requests.is_some_and(|m| carried >= m) {
            return;
        }
        let mut idle = self.idle.lock().expect("lock");
        let v = idle.entry(key).or_default();
        if v.len() < self.max_idle {
            v.push((u, carried));
        }
    }

    /// Sends one attempt; returns the response or why it failed: a
    /// failure before the request was written (hyper hands it back, or
    /// HTTP/2 REFUSED_STREAM) is `UpstreamConnect`, safe to retry; after,
    /// `UpstreamReset`, as the upstream may have processed it.
    /// `max_requests` is the DestinationRule's `maxRequestsPerConnection`.
    pub async fn attempt(
        &self,
        ep: &Endpoint<'_>,
        h2: bool,
        max_requests: Option<u32>,
        mut req: Request<Full<Bytes>>,
        tls: Option<&Originate>,
        mesh_only: bool,
    ) -> Result<Response<Incoming>, Failure> {
        if tls.is_some() && h2 {
            // `:scheme` says what the connection is.
            let mut parts = req.uri().clone().into_parts();
            parts.scheme = Some(http::uri::Scheme::HTTPS);
            if let Ok(u) = http::Uri::from_parts(parts) {
                *req.uri_mut() = u;
            }
        }
        let (conn, carried, key) = self.connection(ep, h2, tls, mesh_only).await?;
        match conn {
            Conn::H1(mut s) => {
                s.ready().await.map_err(|_| Failure::UpstreamConnect)?;
                let r = s.try_send_request(req).await.map_err(|mut e| sent_failure(e.take_message().is_none(), e.error()));
                // hyper waits for this response's body before the next request.
                self.put_back(key, Conn::H1(s), carried + 1, max_requests);
                r
            }
            Conn::H2(mut s) => {
                s.ready().await.map_err(|_| Failure::UpstreamConnect)?;
                let r = s.try_send_request(req).await.map_err(|mut e| sent_failure(e.take_message().is_none(), e.error()));
                self.put_back(key, Conn::H2(s), carried + 1, max_requests);
                r
            }
        }
    }

    /// Sends a copy of the request to the mirror destination, fire and
    /// forget; its authority gets `-shadow` appended, as Envoy does.
    #[allow(clippy::too_many_arguments)]
    pub fn mirror(
        self: &Arc<Self>,
        snap: Arc<Snapshot>,
        dest: RouteDest,
        host_ns: String,
        port: u16,
        mut parts: http::request::Parts,
        body: Bytes,
        grpc: bool,
        original_dst: Option<SocketAddrV4>,
    ) {
        if let Some(host) = parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(|h| format!("{h}-shadow")) {
            if let Ok(v) = HeaderValue::from_str(&host) {
                parts.headers.insert(header::HOST, v);
            }
        }
        let me = self.clone();
        tokio::spawn(async move {
            let Ok(r) = me.resolve(&snap, &dest, &host_ns, port, original_dst) else {
                debug!(mirror = %dest.host, "mirror destination has no endpoint; copy dropped");
                return;
            };
            let Some(ep) = me.choose(&r.endpoints, &r.policy, None, &[], &mut fastrand::Rng::new()) else { return };
            let h2 = route::port_protocol(&r.port) == "http2" || grpc;
            let authority = parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default().to_owned();
            let Ok(tls) = me.originate(&snap, &r, &authority, if h2 { Alpn::Http2 } else { Alpn::Http1 }) else { return };
            let mesh_only = mesh_only(&r.policy);
            let max_requests = r.policy.connection_pool.max_requests_per_connection;
            debug!(mirror = %r.svc.hostname(), "mirroring request");
            let req = upstream_request(&parts, &body, h2);
            if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(30), me.attempt(&ep, h2, max_requests, req, tls.as_ref(), mesh_only)).await {
                let _ = resp.into_body().collect().await;
            }
        });
    }

    /// Bytes through to one endpoint of a route destination (its
    /// subset), chosen as for HTTP (the destination's load balancer,
    /// ejected endpoints skipped): HBONE to a pod in the mesh, plain TCP to
    /// one outside it or to a ServiceEntry's endpoint (for NONE, the
    /// address the client dialled). A consistent-hash policy can only use
    /// the client's address here. False: no endpoint, or it could not be
    /// reached (the caller closes the client's connection).
    #[allow(clippy::too_many_arguments)]
    pub async fn passthrough_to<I>(
        &self,
        snap: &Snapshot,
        dest: &RouteDest,
        host_ns: &str,
        port: u16,
        peer: std::net::IpAddr,
        io: I,
        original_dst: Option<SocketAddrV4>,
        rng: &mut fastrand::Rng,
        meter: Option<(&crate::metrics::Metrics, crate::metrics::TcpLog)>,
    ) -> bool
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
    {
        let r = match self.resolve(snap, dest, host_ns, port, original_dst) {
            Ok(r) => r,
            Err(_) => {
                debug!(destination = %dest.host, "no endpoint for a TCP stream; closed");
                drop(meter.map(|(m, l)| l.open(m, None, "UH")));
                return false;
            }
        };
        let meter = meter.map(|(m, mut l)| {
            l.set_service(&r.svc);
            (m, l)
        });
        let hash = matches!(r.policy.hash, Some(routing::HashKey::SourceIp)).then(|| route::key_hash(peer.to_string().as_bytes()));
        let Some(ep) = self.choose(&r.endpoints, &r.policy, hash, &[], rng) else {
            drop(meter.map(|(m, l)| l.open(m, None, "UH")));
            return false;
        };
        // Counted opened once the endpoint is reached (else with UF).
        let opened = |flags| meter.as_ref().map(|(m, l)| l.open(m, ep.workload(), flags));
        let _active = self.begin(ep.addr());
        let plain = self.plain(&ep);
        if plain && mesh_only(&r.policy) {
            refuse_plain(&ep);
            drop(opened("UF"));
            return false;
        }
        // The DestinationRule's TLS, originated on the stream too (the
        // destination's own name as SNI: no request to take one from).
        let Ok(tls) = self.originate(snap, &r, "", Alpn::None) else {
            drop(opened("UF"));
            return false;
        };
        if let Some(o) = tls {
            let Ok(stream) = self.open(&ep, plain).await else {
                drop(opened("UF"));
                return false;
            };
            let Ok(mut t) = self.tls_over(ep.addr(), &o, stream).await else {
                drop(opened("UF"));
                return false;
            };
            let mut io = crate::body::Metered::new(io, opened("-"));
            if let Ok((a, b)) = tokio::io::copy_bidirectional(&mut io, &mut t).await {
                self.tcp.inc_by(a + b);
            }
            return true;
        }
        match ep.hbone().filter(|_| !plain) {
            Some((w, target)) => {
                let Ok((send, recv, _g)) = self.dial(w, target).await else {
                    drop(opened("UF"));
                    return false;
                };
                let io = crate::body::Metered::new(io, opened("-"));
                hbone::relay_io(io, send, recv, &self.tcp, &self.tcp).await;
            }
            None => {
                let Ok(mut t) = self.open(&ep, true).await else {
                    drop(opened("UF"));
                    return false;
                };
                let mut io = crate::body::Metered::new(io, opened("-"));
                if let Ok((a, b)) = tokio::io::copy_bidirectional(&mut io, &mut t).await {
                    self.tcp.inc_by(a + b);
                }
            }
        }
        true
    }
}

/// A DestinationRule `tls.mode: ISTIO_MUTUAL`: the mesh's mutual TLS, to
/// pods in the mesh only.
pub fn mesh_only(policy: &routing::TrafficPolicy) -> bool {
    policy.tls.as_ref().is_some_and(|t| t.mode == routing::TlsMode::IstioMutual)
}

/// ISTIO_MUTUAL asked for, and the endpoint is outside the mesh: refused
/// (Istio's proxies would fail the mutual TLS handshake), never sent in
/// plaintext.
fn refuse_plain(ep: &Endpoint<'_>) -> Failure {
    warn!(upstream = %ep.addr(), "DestinationRule tls ISTIO_MUTUAL, and the endpoint is outside the mesh (no HBONE): refused, not sent in plaintext");
    Failure::UpstreamConnect
}

/// A byte stream to an endpoint.
enum Stream {
    /// Over HBONE (the relay task's end of a duplex pipe).
    Hbone(tokio::io::DuplexStream),
    /// Plain TCP, outside the mesh.
    Tcp(tokio::net::TcpStream),
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Hbone(d) => std::pin::Pin::new(d).poll_read(cx, buf),
            Stream::Tcp(t) => std::pin::Pin::new(t).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Hbone(d) => std::pin::Pin::new(d).poll_write(cx, buf),
            Stream::Tcp(t) => std::pin::Pin::new(t).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Hbone(d) => std::pin::Pin::new(d).poll_flush(cx),
            Stream::Tcp(t) => std::pin::Pin::new(t).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Hbone(d) => std::pin::Pin::new(d).poll_shutdown(cx),
            Stream::Tcp(t) => std::pin::Pin::new(t).poll_shutdown(cx),
        }
    }
}

/// A failed send: `UpstreamReset` when the request may have reached the
/// upstream (written, and not refused by HTTP/2 REFUSED_STREAM, which
/// promises the stream was not processed), else `UpstreamConnect`.
fn sent_failure(written: bool, e: &hyper::Error) -> Failure {
    let refused = std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<h2::Error>())
        .is_some_and(|h| h.reason() == Some(h2::Reason::REFUSED_STREAM));
    if written && !refused {
        Failure::UpstreamReset
    } else {
        Failure::UpstreamConnect
    }
}

/// The endpoint with the highest rendezvous score for `key`.
fn pick_by_hash<'a>(live: &[Endpoint<'a>], key: u64) -> Option<Endpoint<'a>> {
    live.iter().copied().max_by_key(|e| rendezvous(key, e.addr()))
}

/// The rendezvous score of an endpoint for a key.
fn rendezvous(key: u64, ep: SocketAddrV4) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    key.hash(&mut h);
    ep.hash(&mut h);
    h.finish()
}

/// The upstream form of a request: HTTP/2 takes the authority in the URI
/// (`:authority`) and no Host header; HTTP/1.1 takes origin-form and Host.
pub fn upstream_request(parts: &http::request::Parts, body: &Bytes, h2: bool) -> Request<Full<Bytes>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_requests_carry_the_authority_as_their_protocol_wants() {
        let req = |uri: &str, host: Option<&str>| {
            let mut b = Request::builder().uri(uri);
            if let Some(h) = host {
                b = b.header(header::HOST, h);
            }
            b.body(()).unwrap().into_parts().0
        };
        #[rustfmt::skip]
        let cases = [
            ("h1 from Host", req("/a?b=1", Some("reviews:9080")), false, "/a?b=1", Some("reviews:9080")),
            ("h1 from absolute form", req("http://reviews/a", None), false, "/a", Some("reviews")),
            ("h1 without either", req("/a", None), false, "/a", Some("localhost")),
            ("h2 from Host", req("/a?b=1", Some("reviews:9080")), true, "http://reviews:9080/a?b=1", None),
        ];
        for (name, parts, h2, uri, host) in cases {
            let r = upstream_request(&parts, &Bytes::new(), h2);
            assert_eq!(r.uri().to_string(), uri, "case {name}");
            assert_eq!(r.headers().get(header::HOST).map(|v| v.to_str().unwrap()), host, "case {name}");
            assert_eq!(r.version(), if h2 { http::Version::HTTP_2 } else { http::Version::HTTP_11 }, "case {name}");
        }
    }

    /// Consistent hashing (Istio ConsistentHashLB): one key, one endpoint;
    /// keys spread over the endpoints; when an endpoint leaves, only its
    /// keys move.
    #[test]
    fn consistent_hash_keeps_keys_on_their_endpoints() {
        let ws: Vec<Workload> = (1..=4)
            .map(|i| Workload {
                uid: format!("w{i}"),
                namespace: "shop".into(),
                name: format!("w{i}"),
                workload_name: "w".into(),
                service_account: "default".into(),
                node: None,
                ip: Some(Ipv4Addr::new(10, 0, 0, i)),
                labels: Default::default(),
                host_network: false,
                phase: Some("Running".into()),
                netns_path: None,
                named_ports: Default::default(),
            })
            .collect();
        let all: Vec<Endpoint<'_>> = ws.iter().map(|w| Endpoint::Pod(w, 80)).collect();
        let pick = |live: &[Endpoint<'_>], k: u64| pick_by_hash(live, route::key_hash(&k.to_le_bytes())).unwrap().workload().unwrap().uid.clone();
        let mut per = std::collections::BTreeMap::new();
        for k in 0..4000u64 {
            assert_eq!(pick(&all, k), pick(&all, k), "the same key, the same endpoint");
            *per.entry(pick(&all, k)).or_insert(0) += 1;
        }
        // 1000 expected each; sd = sqrt(4000 * 0.25 * 0.75) ≈ 27: ±150 is
        // over 5 sd.
        assert!(per.values().all(|n| (850..=1150).contains(n)), "{per:?}");
        let three = &all[..3];
        for k in 0..4000u64 {
            let before = pick(&all, k);
            if before != "w4" {
                assert_eq!(pick(three, k), before, "key {k} moved though its endpoint stayed");
            }
        }
    }
}
