//! The proxy's front and its request pipeline: HBONE termination (mutual
//! TLS, the peer's SPIFFE identity, HTTP/2 CONNECT), which CONNECTs are
//! taken (Services bound to this proxy), what each stream speaks (HTTP/1.1,
//! HTTP/2 and gRPC, or TCP passed through), and each request's way through
//! the other modules' steps, in order.

use std::{
    collections::HashSet,
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use skiff_core::{
    gateway,
    model::{ServiceInfo, ServicePort, Snapshot, Workload},
    routing::{self, HttpRoute, RequestInfo},
};
use skiff_hbone::{
    certs::{CertError, CertManager},
    drain::Drain,
    identity::{self, Identity},
    limits::{self, Admission, HboneLimits},
    tunnel as hbone,
};
use tokio::{net::TcpListener, sync::watch};
use opentelemetry::KeyValue;
use tracing::{debug, info, warn};

use crate::{
    authz,
    body::Body,
    errors::{self, Failure},
    metrics::{Metrics, RequestLog, Source},
    normalize,
    ratelimit::RateLimits,
    resilience::{self, BodyBudget, CircuitBreakers, Outbound},
    route, trace,
    upstream::Upstreams,
};

/// Proxy settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Waypoint (Gateway) name, as in `istio.io/use-waypoint: <name>`; the
    /// ingress gateway's workload name (its Deployment's).
    pub name: String,
    /// The proxy's own pod (`POD_NAME`): the ingress gateway finds its
    /// labels, hence the Gateways selecting it, by it.
    pub pod_name: Option<String>,
    /// The proxy's own namespace and service account: its identity.
    pub namespace: String,
    pub service_account: String,
    /// HBONE handshake and connection bounds, idle timeouts, keepalives.
    pub hbone: HboneLimits,
    /// Bounds on the HTTP spoken inside each HBONE stream.
    pub http: HttpLimits,
    /// Whether the proxy reads its namespace's Secrets: the gateway's
    /// certificates, a DestinationRule's `tls.credentialName`.
    pub read_secrets: bool,
    /// Spans, where no `Telemetry` or mesh config default says otherwise.
    pub tracing: crate::spans::Settings,
    /// A waypoint (Telemetry chooses it by `targetRefs`), not a gateway
    /// (chosen by `selector`).
    pub waypoint: bool,
}

/// Bounds on the HTTP/1.1 and HTTP/2 connections inside HBONE streams
/// (slow or flooding clients). Defaults are in ARCHITECTURE.md's "Limits
/// and timeouts" table.
#[derive(Clone, Debug, clap::Args)]
pub struct HttpLimits {
    /// An HTTP/1.1 request's headers must arrive within this long of the
    /// connection becoming ready for them (a new connection, or the end
    /// of the previous response on a kept-alive one): slow senders
    /// (slowloris) and idle kept-alive connections are closed.
    #[arg(long = "http-header-read-timeout", default_value = "30", value_name = "SECONDS", value_parser = secs)]
    pub header_read_timeout: Duration,
    /// Largest request header block, in bytes (HTTP/1.1 and HTTP/2),
    /// Envoy's default of 60 KiB; larger gets 431.
    #[arg(long = "http-max-header-bytes", default_value_t = 60 * 1024, value_name = "BYTES")]
    pub max_header_bytes: u32,
    /// Most header fields in one HTTP/1.1 request (Envoy's default).
    #[arg(long = "http-max-headers", default_value_t = 100, value_name = "N")]
    pub max_headers: usize,
    /// Concurrent streams on one downstream HTTP/2 connection.
    #[arg(long = "http2-max-concurrent-streams", default_value_t = 100, value_name = "N")]
    pub max_concurrent_streams: u32,
    /// Largest request body, in bytes (bodies are buffered so a retry or
    /// a mirror can resend them); larger gets 413.
    #[arg(long = "http-max-request-body-bytes", default_value_t = resilience::MAX_BUFFERED_BODY, value_name = "BYTES")]
    pub max_request_body: usize,
    /// Request-body bytes buffered across all requests at once; past it a
    /// request gets 503 (`UO`).
    #[arg(long = "http-max-buffered-body-bytes", default_value_t = resilience::MAX_BUFFERED_TOTAL, value_name = "BYTES")]
    pub max_buffered_body: usize,
    /// Time a client has to send its whole request body; past it, 400.
    #[arg(long = "http-request-body-timeout", default_value = "30", value_name = "SECONDS", value_parser = secs)]
    pub request_body_timeout: Duration,
    /// Idle upstream connections kept for reuse per endpoint; one more
    /// is closed when its request ends.
    #[arg(long = "http-max-idle-per-endpoint", default_value_t = crate::upstream::MAX_IDLE_PER_ENDPOINT, value_name = "N")]
    pub max_idle_per_endpoint: usize,
    /// Metric series (and rate-limit buckets, endpoint state) of workloads
    /// and Services that are gone are removed once unused for this long.
    #[arg(long = "metrics-series-grace", default_value = "300", value_name = "SECONDS", value_parser = secs)]
    pub series_grace: Duration,
    /// A downstream HTTP connection on which no byte has moved either way
    /// for this long is closed (GOAWAY for HTTP/2), as Envoy's idle
    /// timeout (1 h).
    #[arg(long = "http-idle-timeout", default_value = "3600", value_name = "SECONDS", value_parser = secs)]
    pub idle_timeout: Duration,
}

fn secs(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(n) if n > 0.0 && n.is_finite() => Ok(Duration::from_secs_f64(n)),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_read_timeout: Duration::from_secs(30),
            max_header_bytes: 60 * 1024,
            max_headers: 100,
            max_concurrent_streams: 100,
            max_request_body: resilience::MAX_BUFFERED_BODY,
            max_buffered_body: resilience::MAX_BUFFERED_TOTAL,
            request_body_timeout: resilience::BODY_READ_TIMEOUT,
            max_idle_per_endpoint: crate::upstream::MAX_IDLE_PER_ENDPOINT,
            series_grace: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(3600),
        }
    }
}

/// The L7 proxy: its settings, the cluster it routes by, and the state its
/// requests share.
pub struct Proxy {
    cfg: Config,
    cluster: watch::Receiver<Arc<Snapshot>>,
    certs: Arc<CertManager>,
    pub metrics: Arc<Metrics>,
    upstreams: Arc<Upstreams>,
    breakers: CircuitBreakers,
    rate_limits: RateLimits,
    bodies: BodyBudget,
    admission: Arc<Admission>,
    /// Graceful stop: SIGTERM stops accepting, sends GOAWAY and lets
    /// in-flight requests finish (see `Drain::drain`).
    pub drain: Drain,
    /// The proxy's own pod's uid, once found (a lookup by key, not a scan
    /// of every workload per request).
    own_uid: std::sync::Mutex<Option<String>>,
    /// ServiceEntries' names as resolved: which entry a CONNECT's address
    /// belongs to, and DNS entries' endpoints.
    names: Arc<skiff_hbone::names::NameCache>,
    /// Spans of requests, and where they go.
    pub spans: Arc<crate::spans::Tracing>,
    /// [`Proxy::trace_settings`] of the last snapshot seen.
    trace_cache: std::sync::Mutex<Option<(std::sync::Weak<Snapshot>, crate::spans::Settings)>>,
}

/// Where the requests of one downstream connection came in.
pub(crate) enum Entry {
    /// A CONNECT stream (at a waypoint) to this Service (or ServiceEntry
    /// host) and port, at the address the client dialled.
    Service { svc: Box<ServiceInfo>, port: ServicePort, target: SocketAddrV4 },
    /// An ingress gateway listener: the port it listens on, the scheme
    /// clients use, and for TLS the server the handshake's SNI chose
    /// (only its hosts and VirtualServices apply).
    Gateway { port: u16, scheme: &'static str, server: Option<(crate::tls::ServerKey, Box<gateway::ServerTls>)> },
}

/// Where one downstream connection came in, and from whom.
pub(crate) struct StreamCtx {
    pub(crate) entry: Entry,
    pub(crate) peer: SocketAddr,
    /// The HBONE peer's identity (None at the gateway: its clients are
    /// outside the mesh).
    pub(crate) peer_id: Option<Identity>,
}

/// What a request's route was chosen from: the VirtualService and route,
/// the namespace short destination hosts resolve in, the port a
/// destination without one goes to, and the policies in force.
struct Routed<'s> {
    vs: Option<&'s routing::VirtualService>,
    route: HttpRoute,
    host_ns: String,
    default_port: u16,
    /// The Service the request was addressed to (waypoint).
    svc: Option<&'s ServiceInfo>,
    /// The VirtualService route taken, for the access line:
    /// `ns/name http[i]` (the default route: None).
    taken: Option<String>,
}

const HOP_BY_HOP: [&str; 8] =
    ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer", "proxy-authorization"];

/// Drops hop-by-hop headers; `te: trailers` is end-to-end for gRPC and
/// must reach the backend.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let te_trailers = h.get(header::TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in HOP_BY_HOP {
        h.remove(name);
    }
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Drops a response's hop-by-hop headers (and those its `connection`
/// header names), as Envoy does.
fn strip_response_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|n| n.trim().to_ascii_lowercase()))
        .filter(|n| !n.is_empty())
        .collect();
    // `trailer` stays: it announces the response's trailers (gRPC).
    for name in ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"].into_iter().chain(named.iter().map(String::as_str)) {
        h.remove(name);
    }
}

/// Resolves once no byte has moved either way for `limit` (`last`: the
/// milliseconds after `born` of the last read or write).
pub(crate) async fn idle_for(last: Arc<std::sync::atomic::AtomicU64>, born: Instant, limit: Duration) {
    let check = (limit / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
    loop {
        tokio::time::sleep(check).await;
        let at = Duration::from_millis(last.load(std::sync::atomic::Ordering::Relaxed));
        if born.elapsed().saturating_sub(at) >= limit {
            return;
        }
    }
}

/// A request answered before any route: refused, or answered here.
enum Chosen {
    Refused(Failure),
    Answer(Box<Response<Body>>),
}

/// A gateway server's `httpsRedirect`, as Envoy's `require_tls`: 301 to
/// `https://` with the Host as sent (its port included) and the path.
/// None when the Host is not an authority (400).
fn https_redirect(authority: &str, path: &str) -> Option<Response<Body>> {
    if !routing::is_authority(authority) {
        return None;
    }
    let mut r = Response::new(crate::body::full(""));
    *r.status_mut() = StatusCode::MOVED_PERMANENTLY;
    r.headers_mut().insert(header::LOCATION, HeaderValue::from_str(&format!("https://{authority}{path}")).ok()?);
    Some(r)
}

/// What the mesh's edge sets on a request it lets in, as Istio's gateway
/// (Envoy with `use_remote_address`): the client's address appended to
/// `x-forwarded-for`, `x-forwarded-proto` the scheme it used, a new
/// random `x-request-id` (an outside client's is not trusted), no
/// `x-forwarded-client-cert`.
fn edge_headers(h: &mut HeaderMap, client: std::net::IpAddr, scheme: &str, request_id: &str) {
    let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => format!("{prev},{client}"),
        _ => client.to_string(),
    };
    h.remove("x-forwarded-for");
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert("x-forwarded-for", v);
    }
    h.insert("x-forwarded-proto", HeaderValue::from_static(if scheme == "https" { "https" } else { "http" }));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert("x-request-id", v);
    }
    // Istio's gateways sanitize it: only the proxy may say which client
    // certificate it saw.
    h.remove("x-forwarded-client-cert");
}

impl Proxy {
    pub fn new(cfg: Config, cluster: watch::Receiver<Arc<Snapshot>>, certs: Arc<CertManager>) -> Arc<Proxy> {
        let metrics = Arc::new(Metrics::new());
        let names = skiff_hbone::names::NameCache::new();
        let upstreams = Upstreams::new(
            &cfg.namespace,
            &cfg.service_account,
            certs.clone(),
            metrics.tcp.clone(),
            cfg.hbone.clone(),
            cfg.http.max_idle_per_endpoint,
        )
        .with_cluster(cluster.clone())
        .with_ingress(!cfg.waypoint)
        .with_outside(names.clone(), cfg.read_secrets);
        // The names of the entries exported to the proxy's namespace, and
        // of its own namespace's (those it may serve).
        let ns = cfg.namespace.clone();
        names.spawn(cluster.clone(), move |snap| {
            let visible: Vec<_> = snap.service_entries.iter().filter(|e| e.namespace == ns || e.export_to.visible_to(&ns)).cloned().collect();
            skiff_core::egress::names_to_resolve(&visible)
        });
        let bodies = BodyBudget::new(cfg.http.max_request_body, cfg.http.max_buffered_body, cfg.http.request_body_timeout);
        // Istio's name for a proxy in its spans: <workload>.<namespace>.
        let service_name = format!("{}.{}", cfg.name, cfg.namespace);
        Arc::new(Proxy {
            admission: Admission::new(cfg.hbone.clone()),
            drain: Drain::new(),
            upstreams: Arc::new(upstreams),
            cfg,
            cluster,
            certs,
            metrics,
            breakers: CircuitBreakers::default(),
            rate_limits: RateLimits::default(),
            bodies,
            own_uid: std::sync::Mutex::new(None),
            names,
            spans: Arc::new(crate::spans::Tracing::new(service_name)),
            trace_cache: std::sync::Mutex::new(None),
        })
    }

    /// Gets the proxy's own certificate (before it serves: requests then
    /// never wait for the first one).
    pub async fn ensure_certificate(&self) -> Result<(), CertError> {
        let me = Identity::new(self.certs.trust_domain(), &self.cfg.namespace, &self.cfg.service_account);
        self.certs.ensure(&me).await.map(|_| ())
    }

    /// The cluster view, to follow its changes.
    pub(crate) fn upstreams(&self) -> &Arc<Upstreams> {
        &self.upstreams
    }

    pub(crate) fn cluster(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.cluster.clone()
    }

    /// The proxy's own pod in the cluster view (`Config::pod_name`).
    pub(crate) fn own_pod<'s>(&self, snap: &'s Snapshot) -> Option<&'s Workload> {
        let name = self.cfg.pod_name.as_deref()?;
        let mine = |w: &&Workload| w.namespace == self.cfg.namespace && w.name == name;
        let mut uid = self.own_uid.lock().expect("lock");
        if let Some(w) = uid.as_ref().and_then(|u| snap.workloads.get(u)).filter(mine) {
            return Some(w);
        }
        let w = snap.workloads.values().find(mine)?;
        *uid = Some(w.uid.clone());
        Some(w)
    }

    /// The bound on a TLS handshake (`--hbone-handshake-timeout`) and on a
    /// client's first bytes (`--http-header-read-timeout`).
    pub(crate) fn handshake_timeout(&self) -> Duration {
        self.cfg.hbone.handshake_timeout
    }

    /// `--http-idle-timeout`.
    /// The span settings for this proxy now (worked out once per
    /// snapshot): Istio's Telemetry and the mesh config's tracing
    /// providers where they apply, else `--tracing-*`.
    fn trace_settings(&self, snap: &Arc<Snapshot>) -> crate::spans::Settings {
        // A weak reference, not an address: a freed snapshot's memory
        // reused by a later one cannot pass for it.
        let mut cache = self.trace_cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((k, s)) = cache.as_ref() {
            if std::ptr::eq(k.as_ptr(), Arc::as_ptr(snap)) && k.strong_count() > 0 {
                return s.clone();
            }
        }
        let s = self.resolve_trace_settings(snap);
        if cache.as_ref().is_none_or(|(_, prev)| *prev != s) {
            info!(otlp = ?s.otlp, zipkin = ?s.zipkin, sampling = s.sampling, reporting = s.exports(), "tracing configuration in force");
        }
        *cache = Some((Arc::downgrade(snap), s.clone()));
        s
    }

    fn resolve_trace_settings(&self, snap: &Snapshot) -> crate::spans::Settings {
        use skiff_core::telemetry_api::{self, Provider, ProxyScope};
        let root = skiff_core::routing::DEFAULT_ROOT_NAMESPACE;
        // Waypoints are chosen by targetRefs only, the gateway by its pod's labels.
        let scope = ProxyScope {
            namespace: &self.cfg.namespace,
            waypoint: self.cfg.waypoint.then_some(self.cfg.name.as_str()),
            labels: if self.cfg.waypoint { None } else { self.own_pod(snap).map(|w| &w.labels) },
        };
        let (rule, ignored) = telemetry_api::tracing_for(&snap.telemetries, root, &scope);
        if !ignored.is_empty() {
            warn!(ignored = ?ignored, "more than one Telemetry with tracing at one scope (Istio calls this invalid): the first by name is used");
        }
        let mesh = snap.mesh_configs.get(root);
        let defaults = mesh.map(|m| m.default_tracing.clone()).unwrap_or_default();
        let rule = match rule {
            Some(r) => r,
            // No Telemetry: the mesh's default providers, if it names any.
            None if !defaults.is_empty() => Default::default(),
            None => return self.cfg.tracing.clone(),
        };
        let names = rule.providers.clone().unwrap_or(defaults);
        let mut s = crate::spans::Settings {
            sampling: rule.sampling.unwrap_or(self.cfg.tracing.sampling),
            disable_reporting: rule.disable_reporting.unwrap_or(false),
            mode: rule.mode.unwrap_or_default(),
            tags: rule.custom_tags.clone().unwrap_or_default(),
            ..Default::default()
        };
        for name in &names {
            match mesh.and_then(|m| m.tracing_providers.get(name)) {
                Some(Provider::OtlpHttp { url }) => s.otlp = Some(url.clone()),
                Some(Provider::Zipkin { url }) => s.zipkin = Some(url.clone()),
                Some(Provider::Unsupported(why)) => warn!(provider = %name, reason = %why, "Telemetry names a tracing provider Skiff cannot export to: no spans sent to it"),
                None => warn!(provider = %name, "Telemetry names a tracing provider the mesh config (ConfigMap istio in the root namespace, extensionProviders) does not define: no spans sent to it"),
            }
        }
        s
    }

    /// Istio's span attributes of a request as it arrived.
    fn span_attributes(&self, ctx: &StreamCtx, parts: &http::request::Parts, own_pod: Option<&Workload>) -> Vec<KeyValue> {
        let h = |k: &str| crate::spans::bounded(parts.headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or("-"));
        let authority = parts.uri.authority().map(|a| a.to_string()).unwrap_or_else(|| h("host"));
        let scheme = match &ctx.entry {
            Entry::Gateway { scheme, .. } => *scheme,
            Entry::Service { .. } => "http",
        };
        let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let none = std::collections::BTreeMap::new();
        let labels = own_pod.map_or(&none, |w| &w.labels);
        vec![
            KeyValue::new("http.url", crate::spans::bounded(&format!("{scheme}://{authority}{path}"))),
            KeyValue::new("http.method", parts.method.to_string()),
            KeyValue::new("http.protocol", format!("{:?}", parts.version)),
            KeyValue::new("user_agent", h("user-agent")),
            KeyValue::new("guid:x-request-id", h("x-request-id")),
            KeyValue::new("peer.address", ctx.peer.ip().to_string()),
            KeyValue::new("downstream_cluster", "-"),
            KeyValue::new("component", "proxy"),
            KeyValue::new("istio.mesh_id", self.certs.trust_domain().to_owned()),
            KeyValue::new("istio.namespace", self.cfg.namespace.clone()),
            KeyValue::new("istio.canonical_service", skiff_core::telemetry::canonical_service(labels, &self.cfg.name).to_owned()),
            KeyValue::new("istio.canonical_revision", skiff_core::telemetry::canonical_revision(labels).to_owned()),
        ]
    }

    /// The proxy's own mesh identity, and its workload name.
    pub(crate) fn own_identity(&self) -> (Identity, &str) {
        (Identity::new(self.certs.trust_domain(), &self.cfg.namespace, &self.cfg.service_account), &self.cfg.name)
    }

    pub(crate) fn idle_timeout(&self) -> Duration {
        self.cfg.http.idle_timeout
    }

    pub(crate) fn header_read_timeout(&self) -> Duration {
        self.cfg.http.header_read_timeout
    }

    /// Drops state of endpoints that left the cluster and closed idle
    /// connections, so the maps track the cluster instead of its history.
    pub fn sweep(&self) {
        let snap = self.cluster.borrow().clone();
        let live: HashSet<Ipv4Addr> = snap.workloads.values().filter(|w| w.is_ready()).filter_map(|w| w.ip).collect();
        self.upstreams.sweep(&live);
        self.breakers.sweep();
        self.rate_limits.sweep(&snap);
        // Series of workloads and Services that left, after their last
        // scrape (as ztunnel does).
        self.metrics.prune(&snap, self.cfg.http.series_grace);
    }

    /// Accepts HBONE connections until the process ends.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> Result<(), CertError> {
        let sweeper = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(30)).await;
                sweeper.sweep();
            }
        });
        let me = Identity::new(self.certs.trust_domain(), &self.cfg.namespace, &self.cfg.service_account);
        self.certs.ensure(&me).await?;
        let acceptor = tokio_rustls::TlsAcceptor::from(self.certs.server_config(me)?);
        let draining = self.drain.stopping();
        tokio::pin!(draining);
        loop {
            // Draining: the listener closes (new connections are refused;
            // client ztunnels dial another replica).
            let (tcp, peer) = tokio::select! {
                c = skiff_hbone::transport::accept(&listener, "waypoint HBONE") => c,
                _ = &mut draining => return Ok(()),
            };
            let _ = tcp.set_nodelay(true);
            limits::tcp_keepalive(&tcp, self.cfg.hbone.keepalive_interval);
            let handshake = match self.admission.handshake(peer.ip()) {
                Ok(h) => h,
                Err(r) => {
                    self.not_admitted(peer, r);
                    continue;
                }
            };
            let (proxy, acceptor) = (self.clone(), acceptor.clone());
            tokio::spawn(async move { proxy.connection(acceptor, tcp, peer, handshake).await });
        }
    }

    /// A connection over an HBONE admission bound: closed, counted, and
    /// logged (at most once every 10 s per reason).
    fn not_admitted(&self, peer: SocketAddr, r: limits::Refused) {
        self.metrics.admission_refused.with_label_values(&[r.as_str()]).inc();
        if let Some(skipped) = self.admission.log_now(r.as_str()) {
            warn!(%peer, reason = %r, refused_since_last_line = skipped, "HBONE connection refused");
        }
    }

    async fn connection(self: Arc<Self>, acceptor: tokio_rustls::TlsAcceptor, tcp: tokio::net::TcpStream, peer: SocketAddr, handshake: limits::Handshake) {
        // One deadline for the TLS and HTTP/2 handshakes.
        let deadline = tokio::time::Instant::now().checked_add(self.cfg.hbone.handshake_timeout).expect("flag bounded to a year");
        let tls = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                let reason = skiff_core::report(&e);
                // Throttled per reason (see ztunnel).
                if let Some(skipped) = self.admission.log_now(&format!("tls: {reason}")) {
                    warn!(%peer, %reason, same_reason_unlogged = skipped, "HBONE peer refused: TLS handshake failed");
                }
                return;
            }
            Err(_) => return debug!(%peer, "HBONE peer refused: TLS handshake timed out"),
        };
        let Some(Ok(peer_id)) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(identity::identity_of) else {
            return warn!(%peer, "HBONE peer refused: no SPIFFE identity");
        };
        let Ok(Ok(conn)) = tokio::time::timeout_at(deadline, hbone::server_builder(&self.cfg.hbone).handshake::<_, Bytes>(tls)).await else {
            return debug!(%peer, "HBONE peer refused: HTTP/2 handshake failed or timed out");
        };
        let _established = match handshake.establish() {
            Ok(e) => e,
            Err(r) => return self.not_admitted(peer, r),
        };
        // Draining: GOAWAY, open streams finish.
        let stop = self.drain.stopping();
        let why = hbone::serve_connection(conn, &self.cfg.hbone, stop, |req, respond, guard| {
            let proxy = self.clone();
            let peer_id = peer_id.clone();
            let tracked = self.drain.track();
            tokio::spawn(async move {
                let _guard = (guard, tracked);
                proxy.stream(req, respond, peer, peer_id).await
            });
        })
        .await;
        debug!(%peer, reason = why, "HBONE connection ended");
    }

    /// One CONNECT: checked, answered, then served as HTTP (each request
    /// through `request`) or passed through as TCP.
    async fn stream(self: Arc<Self>, req: Request<h2::RecvStream>, mut respond: h2::server::SendResponse<Bytes>, peer: SocketAddr, peer_id: Identity) {
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
        let Some((svc, port)) = self.connect_target(&snap, target, &peer_id) else {
            info!(%peer, %target, "CONNECT to an address that is neither a Service nor a ServiceEntry this waypoint serves");
            return answer(&mut respond, StatusCode::BAD_REQUEST);
        };
        // Only Services (and ServiceEntries) bound to this waypoint:
        // otherwise any workload could use it as a middleman carrying the
        // waypoint's identity.
        if !self.serves(&snap, &svc) {
            info!(%peer, %target, service = %svc.hostname(), "CONNECT to a Service not bound to this waypoint");
            return answer(&mut respond, StatusCode::FORBIDDEN);
        }
        let tcp = route::port_protocol(&port) == "tcp";
        let decision = if tcp { authz::check_stream(&authz::bound(&snap, &self.cfg.namespace, &self.cfg.name, &svc), peer, Some(&peer_id), target) } else { None };
        if let Some(d) = decision.as_ref().filter(|d| !d.allowed) {
            let mut meter = crate::metrics::TcpLog::new(Source::Peer(&peer_id), &snap, peer);
            meter.set_service(&svc);
            meter.refused(&self.metrics, d);
            return answer(&mut respond, StatusCode::FORBIDDEN);
        }
        let Ok(send) = respond.send_response(Response::builder().status(StatusCode::OK).body(()).expect("valid"), false) else {
            return;
        };
        let recv = req.into_body();
        let (ours, theirs) = tokio::io::duplex(256 * 1024);
        let counters = self.metrics.tcp.clone();
        // Tracked too: the response's tail is still on its way back after
        // the HTTP side is done.
        let relaying = self.drain.track();
        tokio::spawn(async move {
            let _relaying = relaying;
            hbone::relay_io(theirs, send, recv, &counters, &counters).await
        });
        if tcp {
            let snap = self.cluster.borrow().clone();
            let mut rng = fastrand::Rng::new();
            let (dest, host_ns) = route::select_tcp(&snap, &svc, port.port, std::net::IpAddr::V4(*target.ip()), &self.cfg.namespace, &mut rng);
            let mut meter = crate::metrics::TcpLog::new(Source::Peer(&peer_id), &snap, peer);
            if let Some(d) = &decision {
                meter.set_policy(d);
            }
            self.upstreams.passthrough_to(&snap, &dest, &host_ns, port.port, peer.ip(), ours, Some(target), &mut rng, Some((&self.metrics, meter))).await;
            return;
        }
        let ctx = Arc::new(StreamCtx { entry: Entry::Service { svc: Box::new(svc), port, target }, peer, peer_id: Some(peer_id) });
        self.serve_http_ctx(ctx, ours).await
    }

    /// What a CONNECT to `target` reaches: a Service by its ClusterIP and
    /// port, else the ServiceEntry that takes the address for the peer's
    /// namespace (as the peer's ztunnel matched it), as the host the
    /// address belongs to.
    fn connect_target(&self, snap: &Snapshot, target: SocketAddrV4, peer_id: &Identity) -> Option<(ServiceInfo, ServicePort)> {
        if let Some((svc, port)) = snap.service_by_vip(*target.ip(), target.port()) {
            return Some((svc.clone(), port.clone()));
        }
        // A pod's address is never a ServiceEntry's (as at ztunnel).
        if snap.workload_by_ip(*target.ip()).is_some() {
            return None;
        }
        let names = self.names.read();
        let found = skiff_core::egress::lookup(&snap.service_entries, &peer_id.namespace, target, &names)?;
        let svc = ServiceInfo::from_entry(found.entry, found.host);
        let port = svc.ports.iter().find(|p| p.port == target.port())?.clone();
        Some((svc, port))
    }

    /// What this proxy serves, for its admin `/config_dump` (`skiff config
    /// services|routes`): at a waypoint, each Service and ServiceEntry host
    /// bound to it with its ports and protocols, the VirtualService that
    /// routes it (each route: name, matches, destinations and weights) and
    /// the AuthorizationPolicies bound; at the gateway, its servers. And
    /// the objects refused.
    pub fn config_dump(&self) -> serde_json::Value {
        use serde_json::json;
        let snap = self.cluster.borrow().clone();
        let dests = |d: &[routing::RouteDest]| -> Vec<serde_json::Value> {
            let total = routing::total_weight(d).max(1);
            d.iter()
                .map(|x| json!({"host": x.host, "subset": x.subset, "port": x.port, "percent": if d.len() == 1 { 100.0 } else { f64::from(x.weight) * 100.0 / f64::from(total) }}))
                .collect()
        };
        let mut services: Vec<ServiceInfo> = snap.services.values().filter(|s| self.serves(&snap, s)).cloned().collect();
        for e in snap.service_entries.iter().filter(|e| e.namespace == self.cfg.namespace && snap.waypoint_name_for_entry(e).as_deref() == Some(self.cfg.name.as_str())) {
            services.extend(e.hosts.iter().map(|h| ServiceInfo::from_entry(e, h)));
        }
        let services: Vec<serde_json::Value> = services
            .iter()
            .map(|svc| {
                let vs = snap
                    .virtual_services
                    .iter()
                    .filter(|v| (!v.http.is_empty() || !v.tcp.is_empty()) && v.applies_to(&svc.name, &svc.namespace, &self.cfg.namespace))
                    .min_by_key(|v| v.precedence(&svc.namespace));
                let routes: Vec<serde_json::Value> = vs
                    .map(|v| {
                        let http = v.http.iter().enumerate().map(|(i, r)| {
                            json!({"route": format!("http[{i}]"), "name": r.name, "matches": r.matches.len(), "destinations": dests(&r.destinations),
                                "fault": r.fault.is_some(), "timeout_ms": r.timeout.map(|t| t.as_millis() as u64), "retries": r.retries.as_ref().map(|x| x.attempts)})
                        });
                        let tcp = v.tcp.iter().enumerate().map(|(i, r)| json!({"route": format!("tcp[{i}]"), "matches": r.matches.len(), "destinations": dests(&r.destinations)}));
                        http.chain(tcp).collect()
                    })
                    .unwrap_or_default();
                json!({
                    "service": svc.hostname(), "kind": if svc.entry.is_some() { "ServiceEntry" } else { "Service" },
                    "ports": svc.ports.iter().map(|p| json!({"port": p.port, "protocol": route::port_protocol(p)})).collect::<Vec<_>>(),
                    "virtual_service": vs.map(|v| format!("{}/{}", v.namespace, v.name)),
                    "routes": routes,
                    "policies": authz::bound(&snap, &self.cfg.namespace, &self.cfg.name, svc).iter().map(|p| p.key()).collect::<Vec<_>>(),
                })
            })
            .collect();
        let servers: Vec<serde_json::Value> = self
            .own_pod(&snap)
            .filter(|_| !self.cfg.waypoint)
            .map(|pod| {
                snap.gateway_servers(pod)
                    .iter()
                    .map(|o| json!({"gateway": format!("{}/{}", o.gateway.namespace, o.gateway.name), "server": o.server.index, "port": o.server.number, "listens_on": o.port, "protocol": format!("{:?}", o.server.protocol), "tls": o.server.tls.is_some()}))
                    .collect()
            })
            .unwrap_or_default();
        json!({
            "proxy": format!("{} {}/{}", if self.cfg.waypoint { "waypoint" } else { "gateway" }, self.cfg.namespace, self.cfg.name),
            "services": services,
            "servers": servers,
            "rejected": snap.rejected.iter().map(|r| r.to_json()).collect::<Vec<_>>(),
        })
    }

    /// Whether this waypoint serves `svc`: a Service or ServiceEntry of
    /// its namespace that names it (`istio.io/use-waypoint`, its own or
    /// its namespace's).
    fn serves(&self, snap: &Snapshot, svc: &ServiceInfo) -> bool {
        if svc.namespace != self.cfg.namespace {
            return false;
        }
        let name = match &svc.entry {
            Some(_) => snap.entry_of(svc).and_then(|e| snap.waypoint_name_for_entry(e)),
            None => snap.waypoint_name_for(svc),
        };
        name.as_deref() == Some(self.cfg.name.as_str())
    }

    /// Serves HTTP/1.1 or HTTP/2 on `io` as on a CONNECT stream to
    /// `target` (a Service address) from `peer`, without the CONNECT's own
    /// checks: the request pipeline and the downstream bounds only. For
    /// the fuzz target that feeds it arbitrary bytes.
    pub async fn serve_http<I>(self: &Arc<Self>, target: SocketAddrV4, peer: SocketAddr, peer_id: Identity, io: I)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let snap = self.cluster.borrow().clone();
        let Some((svc, port)) = snap.service_by_vip(*target.ip(), target.port()) else { return };
        let ctx = Arc::new(StreamCtx { entry: Entry::Service { svc: Box::new(svc.clone()), port: port.clone(), target }, peer, peer_id: Some(peer_id) });
        self.serve_http_ctx(ctx, io).await
    }

    pub(crate) async fn serve_http_ctx<I>(self: &Arc<Self>, ctx: Arc<StreamCtx>, io: I)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let proxy = self.clone();
        let svc = hyper::service::service_fn(move |req| {
            let (proxy, ctx) = (proxy.clone(), ctx.clone());
            async move { Ok::<_, Infallible>(proxy.request(ctx, req).await) }
        });
        let builder = self.http_builder();
        let last = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let born = Instant::now();
        let io = crate::body::Activity::new(io, last.clone(), born);
        let conn = builder.serve_connection(TokioIo::new(io), svc);
        tokio::pin!(conn);
        let draining = self.drain.stopping();
        let idle = idle_for(last, born, self.cfg.http.idle_timeout);
        let ended = tokio::select! {
            r = conn.as_mut() => r,
            // Draining: HTTP/1.1 finishes the request in flight and closes
            // (an idle connection closes at once); HTTP/2 sends GOAWAY and
            // finishes its open streams.
            _ = draining => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
            // Nothing either way for `--http-idle-timeout`: GOAWAY (an
            // HTTP/2 client that keeps its connection and never uses it).
            _ = idle => {
                debug!("downstream HTTP connection idle: closing");
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = ended {
            debug!(error = %e, "downstream HTTP connection ended");
        }
    }

    /// The downstream HTTP server of one HBONE stream, with its bounds.
    fn http_builder(&self) -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
        let l = &self.cfg.http;
        let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        b.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(l.header_read_timeout)
            .max_headers(l.max_headers)
            .max_buf_size((l.max_header_bytes as usize).max(8192));
        b.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(l.max_concurrent_streams)
            .max_header_list_size(l.max_header_bytes)
            .keep_alive_interval(self.cfg.hbone.keepalive_interval)
            .keep_alive_timeout(self.cfg.hbone.keepalive_timeout);
        b
    }

    /// One request, step by step: trace context, normalized path and
    /// authority, route (`choose`), L7 policy, rate limits, local answers,
    /// faults, destination, body, circuit breaker, the upstream request,
    /// mirror, forward (retries, timeouts). A step that refuses the request
    /// gives a `Failure`, which `finish` answers with.
    async fn request(self: &Arc<Self>, ctx: Arc<StreamCtx>, req: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        let mut rng = fastrand::Rng::new();
        let snap = self.cluster.borrow().clone();
        let (mut parts, body) = req.into_parts();
        // At the edge, what the client says about forwarding, its request id
        // and client certificate is replaced before anything reads it.
        if let Entry::Gateway { scheme, .. } = &ctx.entry {
            edge_headers(&mut parts.headers, ctx.peer.ip(), scheme, &trace::random_id(&mut rng, 16));
        }
        crate::spans::normalize_traceparent(&mut parts.headers);
        let headers = normalize::joined_headers(&parts.headers);
        let raw_path = parts.uri.path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "/".into());
        let grpc = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|c| c.starts_with("application/grpc"));
        let (own_id, own_name) = self.own_identity();
        let (entry_svc, source) = match (&ctx.entry, &ctx.peer_id) {
            (Entry::Service { svc, .. }, Some(id)) => (Some(&**svc), Source::Peer(id)),
            _ => (None, Source::Proxy(own_name, self.own_pod(&snap), &own_id)),
        };
        let settings = self.trace_settings(&snap);
        // Istio's operation name: the destination `<host>:<port>/*` — at
        // the gateway once routed (until then the gateway's own name,
        // never what the client wrote).
        let span_name = match (&ctx.entry, entry_svc) {
            (Entry::Service { port, .. }, Some(svc)) => format!("{}:{}/*", svc.hostname(), port.port),
            _ => format!("{}.{}/*", self.cfg.name, self.cfg.namespace),
        };
        // Attributes only for spans that go somewhere: without an
        // exporter a request pays for its trace context alone.
        let request_attributes = if settings.exports() { self.span_attributes(&ctx, &parts, self.own_pod(&snap)) } else { Vec::new() };
        let spans = self.spans.start(&settings, &parts.headers, span_name, request_attributes);
        let trace_id = spans.trace_id();
        let mut log = RequestLog::new(entry_svc, source, &snap, ctx.peer, &parts.method, &raw_path, grpc, &trace_id);
        log.spans = Some(spans);
        // A request whose client goes away before the answer is still
        // counted and logged (code 0, flag DC).
        log.record_if_dropped(&self.metrics, start);
        // Policy, routing and the upstream all see one normalized path.
        let Some(path) = normalize::normalize_path(&raw_path) else {
            log.flags.push("-");
            return self.finish(log, start, Err(Failure::BadRequest), &Default::default());
        };
        log.path.clone_from(&path);
        let Some(authority) = normalize::authority(&parts.uri, &parts.headers) else {
            return self.finish(log, start, Err(Failure::BadRequest), &Default::default());
        };
        let (port, scheme) = match &ctx.entry {
            Entry::Service { port, .. } => (port.port, "http"),
            Entry::Gateway { port, scheme, .. } => (*port, *scheme),
        };
        let info = RequestInfo { method: parts.method.as_str(), path: &path, authority: &authority, headers: &headers, port, scheme };
        let chosen = self.choose(&snap, &ctx, &info, &raw_path, &mut log.policy);
        let routed = match chosen {
            Ok(r) => r,
            Err(Chosen::Answer(r)) => return self.finish(log, start, Ok((*r, None)), &Default::default()),
            Err(Chosen::Refused(f)) => return self.finish(log, start, Err(f), &Default::default()),
        };
        let Routed { vs, route, host_ns, default_port, svc, taken } = routed;
        log.route = taken;
        // CORS (Envoy's filter, per route): a preflight may be answered
        // here; an allowed origin's response gets its headers, after the
        // route's own.
        let with_cors;
        let ops = match route.cors.as_ref().map(|c| route::cors(c, &parts.method, &parts.headers)) {
            Some(route::CorsAction::Answer(r)) => return self.finish(log, start, Ok((r, None)), &Default::default()),
            Some(route::CorsAction::Decorate(set)) => {
                let mut o = route.response_headers.clone();
                o.set.extend(set);
                with_cors = o;
                &with_cors
            }
            _ => &route.response_headers,
        };
        if let Err(f) = self.rate_limits.check(vs, &route, svc) {
            return self.finish(log, start, Err(f), ops);
        }
        if let Some(r) = route::local_response(&route, scheme, &authority, &path, default_port) {
            return self.finish(log, start, Ok((r, None)), ops);
        }
        if let Some(fault) = &route.fault {
            let (delay_roll, abort_roll) = (route::percent_roll(&mut rng), route::percent_roll(&mut rng));
            if let Err(f) = route::inject_fault(fault, delay_roll, abort_roll, &mut log.flags).await {
                return self.finish(log, start, Err(f), ops);
            }
        }
        let Some(dest) = routing::pick_weighted(&route.destinations, rng.u32(..routing::total_weight(&route.destinations).max(1))).cloned() else {
            return self.finish(log, start, Err(Failure::NoRoute), ops);
        };
        // The destination Service, its port, the subset's pods.
        let original_dst = match &ctx.entry {
            Entry::Service { target, .. } => Some(*target),
            Entry::Gateway { .. } => None,
        };
        let resolved = match self.upstreams.resolve(&snap, &dest, &host_ns, default_port, original_dst) {
            Ok(r) => r,
            Err(f) => return self.finish(log, start, Err(f), ops),
        };
        if svc.is_none() {
            log.set_service(&resolved.svc);
            if let Some(spans) = log.spans.as_mut() {
                spans.rename(format!("{}:{}/*", resolved.svc.hostname(), resolved.port.port));
            }
        }
        let h2 = route::port_protocol(&resolved.port) == "http2" || grpc;
        let (body, _buffered) = match self.bodies.read(body).await {
            Ok(b) => b,
            Err(f) => return self.finish(log, start, Err(f), ops),
        };
        log.request_bytes = body.len() as u64;
        let mut slot = match self.breakers.acquire(&resolved.svc, dest.subset.as_deref(), &resolved.policy, h2) {
            Ok(s) => Some(s),
            Err(f) => return self.finish(log, start, Err(f), ops),
        };
        // The consistent-hash key, from the request as it came (Envoy
        // hashes before any header operation).
        let (hash, set_cookie) = route::request_hash(&resolved.policy, &parts.headers, &path, ctx.peer.ip(), &mut rng);
        // The upstream request.
        strip_hop_by_hop(&mut parts.headers);
        // The destination's own header operations, then the route's (as
        // Envoy orders weighted-cluster and route level).
        route::apply_header_ops(&mut parts.headers, &dest.request_headers);
        log.rewritten = match route::apply_to_request(&mut parts, &route, &path) {
            Ok(r) => r,
            Err(f) => return self.finish(log, start, Err(f), ops),
        };
        if let Some(spans) = log.spans.as_mut() {
            let attributes = if settings.exports() && spans.sampled() {
                let cluster = format!("outbound|{}|{}|{}", resolved.port.port, dest.subset.as_deref().unwrap_or(""), resolved.svc.hostname());
                vec![KeyValue::new("upstream_cluster", cluster.clone()), KeyValue::new("upstream_cluster.name", cluster)]
            } else {
                Vec::new()
            };
            spans.upstream(&self.spans, &mut parts.headers, attributes);
        }
        if let Some(v) = (!trace_id.is_empty()).then(|| HeaderValue::from_str(&trace_id).ok()).flatten() {
            parts.headers.entry("x-request-id").or_insert(v);
        }
        for (mirror, pct) in &route.mirrors {
            if route::percent_roll(&mut rng) < *pct {
                self.upstreams.mirror(snap.clone(), mirror.clone(), host_ns.clone(), default_port, parts.clone(), body.clone(), grpc, original_dst);
            }
        }
        // TLS to the endpoint, if the DestinationRule asks for it: the name
        // sent is the upstream request's host (after rewrites).
        let authority = parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned).or_else(|| parts.uri.authority().map(|a| a.to_string()));
        let alpn = if h2 { crate::origin::Alpn::Http2 } else { crate::origin::Alpn::Http1 };
        let tls = match self.upstreams.originate(&snap, &resolved, authority.as_deref().unwrap_or_default(), alpn) {
            Ok(t) => t,
            Err(f) => return self.finish(log, start, Err(f), ops),
        };
        let out = Outbound { dest: &resolved, route: &route, parts: &parts, body: &body, h2, hash, tls: tls.as_ref() };
        let mut outcome = resilience::forward(&self.upstreams, out, &mut slot, &mut log.retries, &mut rng).await;
        if let Ok((resp, _)) = &mut outcome {
            // The upstream connection's own headers (`connection: close`…)
            // are not the downstream's: passed on, they would close the
            // client's kept-alive connection.
            strip_response_hop_by_hop(resp.headers_mut());
            route::apply_header_ops(resp.headers_mut(), &dest.response_headers);
            if let Some(c) = set_cookie {
                resp.headers_mut().append(header::SET_COOKIE, c);
            }
        }
        self.finish(log, start, outcome, ops)
    }

    /// The route for a request, and the L7 policy check: at a waypoint,
    /// the VirtualService for the Service it was sent to and the policies
    /// bound to the waypoint or the Service; at the gateway, the server
    /// its host reaches on the port, the VirtualServices bound to that
    /// server's Gateway, and the policies selecting the gateway's pod.
    fn choose<'s>(&self, snap: &'s Snapshot, ctx: &StreamCtx, info: &RequestInfo<'_>, raw_path: &str, policy: &mut Option<String>) -> Result<Routed<'s>, Chosen> {
        // The policy check's decision, for the access line, either way.
        let mut checked = |r: Result<Option<String>, (Failure, String)>| match r {
            Ok(d) => {
                *policy = d;
                Ok(())
            }
            Err((f, d)) => {
                *policy = Some(d);
                Err(Chosen::Refused(f))
            }
        };
        match &ctx.entry {
            Entry::Service { svc, port, target } => {
                let route::Selected { vs, route, index } = route::select(snap, svc, info, &self.cfg.namespace);
                let taken = vs.zip(index).map(|(v, i)| format!("{}/{} http[{i}]", v.namespace, v.name));
                let policies = authz::bound(snap, &self.cfg.namespace, &self.cfg.name, svc);
                let cluster_ip = svc.cluster_ip.unwrap_or(*target.ip());
                checked(authz::check_request(&policies, ctx.peer, ctx.peer_id.as_ref(), cluster_ip, info))?;
                let route = route.ok_or(Chosen::Refused(Failure::NoRoute))?;
                let host_ns = vs.map(|v| v.namespace.clone()).unwrap_or_else(|| svc.namespace.clone());
                let svc = snap.services.get(&format!("{}/{}", svc.namespace, svc.name));
                Ok(Routed { vs, route, host_ns, default_port: port.port, svc, taken })
            }
            Entry::Gateway { port, server: tls_server, .. } => {
                let Some(pod) = self.own_pod(snap) else {
                    warn!(pod = ?self.cfg.pod_name, namespace = %self.cfg.namespace, "the gateway's own pod is not in the cluster view: no Gateway selects it yet");
                    return Err(Chosen::Refused(Failure::NoRoute));
                };
                let policies = authz::selecting(snap, pod);
                let own_ip = pod.ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
                checked(authz::check_request(&policies, ctx.peer, None, own_ip, info))?;
                let mut open = snap.gateway_servers(pod);
                match tls_server {
                    // TLS: the server the handshake chose, alone, and only
                    // while its TLS settings are those the handshake used
                    // (removed or changed since: 421, the client reconnects).
                    Some((key, tls)) => {
                        // A Host that another TLS server of this port takes
                        // more specifically than the handshake's (SNI for
                        // `*.example.com`, Host `admin.example.com` of a
                        // MUTUAL server) would skip that server's TLS
                        // requirements: 421, the client connects anew with
                        // the right name. Stricter than Istio, which routes
                        // it by the handshake's server.
                        let host = gateway::request_host(info.authority);
                        let tls_servers: Vec<_> = open.iter().filter(|o| o.server.tls.is_some()).cloned().collect();
                        if gateway::server_for_host(&tls_servers, *port, &host).is_some_and(|o| crate::tls::server_key(o) != *key) {
                            return Err(Chosen::Refused(Failure::Misdirected));
                        }
                        open.retain(|o| crate::tls::server_key(o) == *key && o.server.tls.as_ref() == Some(&**tls));
                        if open.is_empty() {
                            return Err(Chosen::Refused(Failure::Misdirected));
                        }
                    }
                    // Plaintext: plaintext servers only.
                    None => open.retain(|o| o.server.protocol.is_plain_http()),
                }
                let host = gateway::request_host(info.authority);
                match gateway::decide(&snap.virtual_services, &open, *port, &host, &self.cfg.namespace) {
                    gateway::Decision::NoServer => Err(Chosen::Refused(Failure::NoRoute)),
                    gateway::Decision::HttpsRedirect => match https_redirect(info.authority, raw_path) {
                        Some(r) => Err(Chosen::Answer(Box::new(r))),
                        None => Err(Chosen::Refused(Failure::BadRequest)),
                    },
                    gateway::Decision::Route { at, server, virtual_services } => {
                        // Route matches on `port` see the server's number
                        // (what clients address), as in Istio.
                        let info = RequestInfo { port: server.number, ..info.clone() };
                        let (vs, route) = gateway::route(&virtual_services, &info, &at).ok_or(Chosen::Refused(Failure::NoRoute))?;
                        let route = route.at(&at, &vs.gateways);
                        let taken = Some(format!("{}/{}", vs.namespace, vs.name));
                        Ok(Routed { vs: Some(vs), route, host_ns: vs.namespace.clone(), default_port: server.number, svc: None, taken })
                    }
                }
            }
        }
    }

    /// The response and its access-log line and metrics: a failure becomes
    /// its synthetic response (`errors::respond`), then the route's
    /// response header operations apply either way.
    fn finish(
        &self,
        mut log: RequestLog,
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
                let (r, flag) = errors::respond(f);
                log.flags.push(flag);
                r
            }
        };
        route::apply_header_ops(resp.headers_mut(), response_ops);
        let done = log.finish(&self.metrics, resp.status().as_u16(), resp.headers(), start);
        resp.map(|b| crate::body::counted(b, done))
    }
}

#[cfg(test)]
mod idle_tests {
    use std::sync::{atomic::AtomicU64, Arc};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// `--http-idle-timeout`: a connection on which bytes keep moving is
    /// not idle; one on which nothing moves for the limit is.
    #[tokio::test]
    async fn idle_means_no_byte_either_way_for_the_limit() {
        let (a, mut b) = tokio::io::duplex(64);
        let last = Arc::new(AtomicU64::new(0));
        let born = Instant::now();
        let mut io = crate::body::Activity::new(a, last.clone(), born);
        let limit = Duration::from_millis(400);
        let idle = idle_for(last.clone(), born, limit);
        tokio::pin!(idle);
        // Traffic every 100 ms for a second: never idle.
        for _ in 0..10 {
            b.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            io.read_exact(&mut one).await.unwrap();
            tokio::select! {
                _ = &mut idle => panic!("idle while bytes moved"),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        // Then nothing: idle within the limit and a check period.
        tokio::time::timeout(Duration::from_secs(2), idle).await.expect("idle once nothing moves");
    }
}
