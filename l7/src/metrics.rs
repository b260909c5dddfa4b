//! The engine's metrics, with Istio's names and labels
//! (`istio_requests_total`, `istio_request_duration_milliseconds`,
//! reporter="waypoint"), its access log (one line per request), and the
//! Prometheus endpoint that serves them.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};
use skiff_core::{
    model::{ServiceInfo, Snapshot, Workload},
    telemetry::Peer,
};
use skiff_hbone::identity::Identity;
use tokio::net::TcpListener;
use tracing::{debug, info};

use skiff_core::telemetry::{ServiceLabels, REQUEST_LABELS as LABELS, TCP_LABELS};

pub struct Metrics {
    pub registry: Registry,
    /// Every label set of the request metrics and when a request last used
    /// it: what `prune` may remove once its workloads are gone.
    series: skiff_core::series::SeriesUse,
    requests: IntCounterVec,
    duration: HistogramVec,
    /// `istio_request_bytes` / `istio_response_bytes`: body sizes.
    request_bytes: HistogramVec,
    response_bytes: HistogramVec,
    /// The label sets of the TCP stream metrics, as `series`.
    tcp_series: skiff_core::series::SeriesUse,
    tcp_opened: IntCounterVec,
    tcp_closed: IntCounterVec,
    tcp_sent: IntCounterVec,
    tcp_received: IntCounterVec,
    /// Bytes through HBONE streams (both directions).
    pub tcp: IntCounter,
    /// HBONE connections over an admission bound, by bound.
    pub admission_refused: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid");
            registry.register(Box::new(c.clone())).expect("once");
            c
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &LABELS).expect("valid");
            registry.register(Box::new(h.clone())).expect("once");
            h
        };
        let requests = counter("istio_requests_total", "Requests handled", &LABELS);
        // Istio's buckets (its stats filter's defaults): durations up to an
        // hour, sizes by powers of ten up to 1 GB.
        let duration = histogram(
            "istio_request_duration_milliseconds",
            "Request duration, from the request's arrival to the response's last byte",
            vec![
                0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0, 600000.0, 1800000.0,
                3600000.0,
            ],
        );
        let sizes = || (0..10).map(|i| 10f64.powi(i)).collect::<Vec<f64>>();
        let request_bytes = histogram("istio_request_bytes", "Request body size (bytes)", sizes());
        let response_bytes = histogram("istio_response_bytes", "Response body size (bytes), as sent", sizes());
        let tcp_opened = counter("istio_tcp_connections_opened_total", "TCP streams opened", &TCP_LABELS);
        let tcp_closed = counter("istio_tcp_connections_closed_total", "TCP streams closed", &TCP_LABELS);
        let tcp_sent = counter("istio_tcp_sent_bytes_total", "Bytes sent in the response direction (server to client)", &TCP_LABELS);
        let tcp_received = counter("istio_tcp_received_bytes_total", "Bytes received in the request direction (client to server)", &TCP_LABELS);
        let tcp = IntCounter::new("skiff_waypoint_tunnel_bytes_total", "Bytes through HBONE streams").expect("valid");
        registry.register(Box::new(tcp.clone())).expect("once");
        let admission_refused = counter(
            "skiff_hbone_admission_refused_total",
            "HBONE connections closed unserved because an admission bound was reached (see --hbone-max-*), by bound",
            &["reason"],
        );
        // Every bound's series from the start, at 0: a dashboard shows "none
        // refused" rather than no data.
        for r in skiff_hbone::limits::Refused::ALL {
            admission_refused.with_label_values(&[r.as_str()]);
        }
        Metrics {
            registry,
            series: Default::default(),
            requests,
            duration,
            request_bytes,
            response_bytes,
            tcp_series: Default::default(),
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
            tcp,
            admission_refused,
        }
    }

    /// Removes the request and TCP metrics' label sets that name a
    /// workload or Service no longer in `snap` and that nothing used for
    /// `grace` (so their last counts are scraped first). Returns how many.
    pub fn prune(&self, snap: &Snapshot, grace: Duration) -> usize {
        use skiff_core::telemetry::{SERVICES_AT, WORKLOADS_AT};
        let gone = self.series.take_gone(snap, grace, &WORKLOADS_AT, &SERVICES_AT);
        for v in &gone {
            let values: Vec<&str> = v.iter().map(String::as_str).collect();
            let _ = self.requests.remove_label_values(&values);
            let _ = self.duration.remove_label_values(&values);
            let _ = self.request_bytes.remove_label_values(&values);
            let _ = self.response_bytes.remove_label_values(&values);
        }
        let tcp_gone = self.tcp_series.take_gone(snap, grace, &WORKLOADS_AT, &SERVICES_AT);
        for v in &tcp_gone {
            let values: Vec<&str> = v.iter().map(String::as_str).collect();
            for vec in [&self.tcp_opened, &self.tcp_closed, &self.tcp_sent, &self.tcp_received] {
                let _ = vec.remove_label_values(&values);
            }
        }
        gone.len() + tcp_gone.len()
    }

    /// Label sets of the request and TCP metrics now.
    pub fn series(&self) -> usize {
        self.series.len() + self.tcp_series.len()
    }

    pub fn render(&self) -> String {
        use prometheus::Encoder as _;
        let mut buf = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default() + &skiff_core::telemetry::process_metrics()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves the Prometheus text format on `listener` until the process ends.
/// Every request, whatever its path, gets the metrics, and the connection
/// is closed after the answer (scrapers read to the end).
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let (s, _) = skiff_hbone::transport::accept(&listener, "metrics").await;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_: Request<Incoming>| {
                let body = metrics.render();
                async move {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "text/plain; version=0.0.4")
                            .header("connection", "close")
                            .body(Full::new(Bytes::from(body)))
                            .expect("valid response"),
                    )
                }
            });
            if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(s), svc).await {
                debug!(error = %e, "metrics connection ended");
            }
        });
    }
}

/// What is known about one request, for its metrics and access-log line.
pub struct RequestLog {
    /// `waypoint`, or `source` at the ingress gateway (Istio's gateways
    /// report as the source of the requests they send on).
    reporter: &'static str,
    source: Peer,
    destination: Peer,
    service: String,
    service_name: String,
    service_namespace: String,
    /// `grpc` for a gRPC request, else `http` (Istio's values, whatever
    /// the HTTP version).
    protocol: &'static str,
    peer: SocketAddr,
    method: String,
    pub path: String,
    trace_id: String,
    pub rewritten: Option<String>,
    /// The VirtualService route that took the request (`ns/name http[i]`).
    pub route: Option<String>,
    /// The authorization decision (`deny (ns/name rule i: …)`), when
    /// policies were checked: what tells the proxy's 403 from the
    /// application's.
    pub policy: Option<String>,
    pub flags: Vec<&'static str>,
    pub retries: u32,
    /// The request body's size, once read.
    pub request_bytes: u64,
    trust_domain: String,
    /// Its spans, ended with the response.
    pub spans: Option<crate::spans::RequestSpans>,
    /// Until the response is known: where to record the request if it is
    /// dropped first (the client went away), and since when.
    on_drop: Option<(Arc<Metrics>, Instant)>,
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        if let Some((m, start)) = self.on_drop.take() {
            // Envoy's DC: downstream connection termination.
            self.flags.push("DC");
            let grpc = (self.protocol == "grpc").then(|| "1".to_owned());
            record(self, &m, 0, grpc.as_deref(), start, 0);
        }
    }
}

/// Who a request's metrics name as its source.
pub enum Source<'a> {
    /// The HBONE peer (at a waypoint): its identity, its workload by
    /// address.
    Peer(&'a Identity),
    /// The proxy itself (the ingress gateway, which the backends see as
    /// the client): its workload name, its own pod if found, and identity.
    Proxy(&'a str, Option<&'a Workload>, &'a Identity),
}

impl Source<'_> {
    /// The reporter and the source's labels of a request or stream from
    /// `peer`.
    fn labels(&self, snap: &Snapshot, peer: SocketAddr) -> (&'static str, Peer) {
        match self {
            Source::Peer(id) => {
                let w = match peer {
                    SocketAddr::V4(a) => snap.workload_by_ip(*a.ip()),
                    SocketAddr::V6(_) => None,
                };
                let mut p = match w {
                    Some(w) => Peer::of_workload(w, &id.trust_domain),
                    None => Peer { namespace: id.namespace.clone(), ..Peer::unknown() },
                };
                // The identity the peer proved, whatever pod has the address.
                p.principal = id.to_string();
                ("waypoint", p)
            }
            Source::Proxy(workload, pod, id) => {
                let none = std::collections::BTreeMap::new();
                ("source", Peer::of(workload, &id.namespace, pod.map_or(&none, |w| &w.labels), id.to_string()))
            }
        }
    }

    /// The identity the source proved (the peer's) or has (the proxy's).
    fn identity(&self) -> &Identity {
        match self {
            Source::Peer(id) | Source::Proxy(_, _, id) => id,
        }
    }
}

impl RequestLog {
    /// A request to `svc` (None until a route names the destination, at
    /// the gateway).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        svc: Option<&ServiceInfo>,
        source: Source<'_>,
        snap: &Snapshot,
        peer: SocketAddr,
        method: &http::Method,
        path: &str,
        grpc: bool,
        trace_id: &str,
    ) -> RequestLog {
        let (reporter, src) = source.labels(snap, peer);
        let trust_domain = source.identity().trust_domain.clone();
        let mut log = RequestLog {
            reporter,
            source: src,
            destination: Peer::unknown(),
            service: "unknown".into(),
            service_name: "unknown".into(),
            service_namespace: "unknown".into(),
            protocol: if grpc { "grpc" } else { "http" },
            peer,
            method: method.to_string(),
            path: path.to_owned(),
            trace_id: trace_id.to_owned(),
            rewritten: None,
            route: None,
            policy: None,
            flags: Vec::new(),
            retries: 0,
            request_bytes: 0,
            trust_domain,
            spans: None,
            on_drop: None,
        };
        if let Some(svc) = svc {
            log.set_service(svc);
        }
        log
    }

    /// The destination Service, once known.
    pub fn set_service(&mut self, svc: &ServiceInfo) {
        self.destination.namespace = svc.namespace.clone();
        self.service = svc.hostname();
        self.service_name = svc.name.clone();
        self.service_namespace = svc.namespace.clone();
    }

    pub fn set_destination(&mut self, w: &Workload) {
        self.destination = Peer::of_workload(w, &self.trust_domain);
    }

    /// If the request is dropped before [`RequestLog::finish`] (its
    /// client went away), it is still counted and logged: code 0, flag
    /// `DC`, gRPC status 1 (CANCELLED), as Envoy records it.
    pub fn record_if_dropped(&mut self, m: &Arc<Metrics>, start: Instant) {
        self.on_drop = Some((m.clone(), start));
    }

    /// The response's status is known: what is left is recorded when its
    /// body ends ([`Completion`], carried by [`crate::body::counted`]),
    /// as Istio's proxies record at the end of the stream.
    pub fn finish(mut self, m: &Arc<Metrics>, code: u16, headers: &http::HeaderMap, start: Instant) -> Completion {
        self.on_drop = None;
        let grpc_status = (self.protocol == "grpc").then(|| grpc_status(headers).unwrap_or_else(|| http_to_grpc(code).to_string()));
        Completion { log: self, metrics: m.clone(), code, grpc_status, start }
    }

    fn values<'a>(&'a self, code: &'a str, grpc: &'a str, flags: &'a str) -> [&'a str; 25] {
        let service = ServiceLabels { host: &self.service, name: &self.service_name, namespace: &self.service_namespace };
        let tcp = skiff_core::telemetry::tcp_values(self.reporter, &self.source, &self.destination, service, self.protocol, flags, security_policy(self.reporter));
        skiff_core::telemetry::request_values(tcp, code, grpc)
    }
}

/// Istio's `connection_security_policy`: `mutual_tls` where the proxy
/// received the request or stream over mutual TLS (a waypoint, from
/// HBONE); `unknown` for a source reporter (the gateway), whose client
/// connection is not the mesh's.
fn security_policy(reporter: &str) -> &'static str {
    if reporter == "source" {
        "unknown"
    } else {
        "mutual_tls"
    }
}

/// `grpc-status` of a header or trailer block: one of gRPC's codes (0–16);
/// anything else is UNKNOWN (2), as gRPC clients read it — never a value
/// of the peer's choosing (a label's values stay a bounded set).
fn grpc_status(h: &http::HeaderMap) -> Option<String> {
    let v = h.get("grpc-status")?.to_str().ok()?.trim();
    Some(match v.parse::<u32>() {
        Ok(n) if n <= 16 => n.to_string(),
        _ => "2".to_owned(),
    })
}

/// The gRPC status a gRPC client sees for an HTTP status without a
/// `grpc-status` (gRPC's "HTTP to gRPC Status Code Mapping", as Envoy
/// infers it): 400 INTERNAL, 401 UNAUTHENTICATED, 403 PERMISSION_DENIED,
/// 404 UNIMPLEMENTED, 429/502/503/504 UNAVAILABLE, anything else UNKNOWN.
fn http_to_grpc(code: u16) -> u32 {
    match code {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// A request whose response is on its way: recorded (metrics and the
/// access-log line) once, when the response body ends or is dropped.
pub struct Completion {
    log: RequestLog,
    metrics: Arc<Metrics>,
    code: u16,
    /// For gRPC: the status so far (headers, or inferred from the HTTP
    /// status); trailers replace it.
    grpc_status: Option<String>,
    start: Instant,
}

impl Completion {
    /// The response's trailers arrived.
    pub fn trailers(&mut self, t: &http::HeaderMap) {
        if self.grpc_status.is_some() {
            if let Some(s) = grpc_status(t) {
                self.grpc_status = Some(s);
            }
        }
    }

    /// The response body ended (or was abandoned) after `sent` bytes.
    pub fn record(mut self, sent: u64) {
        record(&mut self.log, &self.metrics, self.code, self.grpc_status.as_deref(), self.start, sent);
    }
}

/// Records one request: its spans end, its metrics count, its access line
/// is written.
fn record(log: &mut RequestLog, m: &Metrics, code: u16, grpc: Option<&str>, start: Instant, sent: u64) {
    let flags = if log.flags.is_empty() { "-".to_owned() } else { log.flags.join(",") };
    if let Some(spans) = log.spans.take() {
        spans.end(
            code,
            vec![
                opentelemetry::KeyValue::new("response_flags", flags.clone()),
                opentelemetry::KeyValue::new("request_size", log.request_bytes.to_string()),
                opentelemetry::KeyValue::new("response_size", sent.to_string()),
            ],
        );
    }
    let took = start.elapsed();
    let code_s = code.to_string();
    let grpc = grpc.unwrap_or("");
    let values = log.values(&code_s, grpc, &flags);
    m.requests.with_label_values(&values).inc();
    m.duration.with_label_values(&values).observe(took.as_secs_f64() * 1000.0);
    m.request_bytes.with_label_values(&values).observe(log.request_bytes as f64);
    m.response_bytes.with_label_values(&values).observe(sent as f64);
    m.series.record(&values);
    info!(
        target: "access",
        method = %log.method,
        path = %log.path,
        rewritten = %log.rewritten.as_deref().unwrap_or("-"),
        route = %log.route.as_deref().unwrap_or("-"),
        policy = %log.policy.as_deref().unwrap_or("-"),
        code,
        grpc_status = %grpc,
        response_flags = %flags,
        src.addr = %log.peer,
        src.workload = %log.source.workload,
        src.namespace = %log.source.namespace,
        src.identity = %log.source.principal,
        dst.service = %log.service,
        dst.workload = %log.destination.workload,
        dst.namespace = %log.destination.namespace,
        dst.identity = %log.destination.principal,
        dst.version = %log.destination.version,
        retries = log.retries,
        bytes_sent = sent,
        bytes_received = log.request_bytes,
        duration_ms = took.as_millis() as u64,
        trace_id = %log.trace_id,
        "request complete"
    );
}

/// A TCP stream through the proxy (a waypoint's TCP port, a gateway's TCP
/// or TLS passthrough server): its labels, until its endpoint is chosen.
pub struct TcpLog {
    reporter: &'static str,
    peer: SocketAddr,
    source: Peer,
    service: String,
    service_name: String,
    service_namespace: String,
    trust_domain: String,
    /// The authorization decision, when one was taken for the stream.
    policy: Option<String>,
}

impl TcpLog {
    /// A stream from `peer`, to a Service not known yet (see
    /// [`TcpLog::set_service`]).
    pub fn new(source: Source<'_>, snap: &Snapshot, peer: SocketAddr) -> TcpLog {
        let (reporter, src) = source.labels(snap, peer);
        let trust_domain = source.identity().trust_domain.clone();
        let unknown = || "unknown".to_owned();
        TcpLog { reporter, peer, source: src, service: unknown(), service_name: unknown(), service_namespace: unknown(), trust_domain, policy: None }
    }

    /// The Service the stream's route goes to.
    pub fn set_service(&mut self, svc: &ServiceInfo) {
        self.service = svc.hostname();
        self.service_name = svc.name.clone();
        self.service_namespace = svc.namespace.clone();
    }

    /// The authorization decision taken for the stream (its access line
    /// names it).
    pub fn set_policy(&mut self, d: &skiff_core::policy::AuthzDecision) {
        self.policy = Some(d.access_text());
    }

    /// The stream was refused by the authorization decision `d`: counted
    /// (UAEX, as ztunnel counts a refused connection) and its access line
    /// written, naming the policy and rule.
    pub fn refused(mut self, m: &Metrics, d: &skiff_core::policy::AuthzDecision) {
        self.set_policy(d);
        drop(self.open(m, None, "UAEX"));
    }

    /// The stream is open to `endpoint` (a pod, or None: outside the
    /// mesh or not reached, with `flags`): counts it opened and returns
    /// its counters; it counts closed, and its access line is written,
    /// when they drop.
    pub fn open(&self, m: &Metrics, endpoint: Option<&Workload>, flags: &'static str) -> TcpConn {
        let destination = match endpoint {
            Some(w) => Peer::of_workload(w, &self.trust_domain),
            None => Peer { namespace: self.service_namespace.clone(), ..Peer::unknown() },
        };
        let service = ServiceLabels { host: &self.service, name: &self.service_name, namespace: &self.service_namespace };
        let values = skiff_core::telemetry::tcp_values(self.reporter, &self.source, &destination, service, "tcp", flags, security_policy(self.reporter));
        m.tcp_series.record(&values);
        m.tcp_opened.with_label_values(&values).inc();
        TcpConn {
            sent: m.tcp_sent.with_label_values(&values),
            received: m.tcp_received.with_label_values(&values),
            closed: m.tcp_closed.with_label_values(&values),
            bytes_sent: 0,
            bytes_received: 0,
            start: Instant::now(),
            log: Box::new(StreamLog {
                peer: self.peer,
                source: self.source.clone(),
                destination,
                service: self.service.clone(),
                flags,
                policy: self.policy.clone(),
            }),
        }
    }
}

/// What a stream's access line says besides its bytes and duration.
struct StreamLog {
    peer: SocketAddr,
    source: Peer,
    destination: Peer,
    service: String,
    flags: &'static str,
    policy: Option<String>,
}

/// One open TCP stream's counters.
pub struct TcpConn {
    sent: IntCounter,
    received: IntCounter,
    closed: IntCounter,
    bytes_sent: u64,
    bytes_received: u64,
    start: Instant,
    log: Box<StreamLog>,
}

impl TcpConn {
    /// `n` bytes sent towards the client.
    pub fn sent(&mut self, n: u64) {
        self.sent.inc_by(n);
        self.bytes_sent += n;
    }

    /// `n` bytes received from the client.
    pub fn received(&mut self, n: u64) {
        self.received.inc_by(n);
        self.bytes_received += n;
    }
}

impl Drop for TcpConn {
    fn drop(&mut self) {
        self.closed.inc();
        let l = &self.log;
        info!(
            target: "access",
            protocol = %"tcp",
            src.addr = %l.peer,
            src.workload = %l.source.workload,
            src.namespace = %l.source.namespace,
            src.identity = %l.source.principal,
            dst.service = %l.service,
            dst.workload = %l.destination.workload,
            dst.namespace = %l.destination.namespace,
            dst.identity = %l.destination.principal,
            bytes_sent = self.bytes_sent,
            bytes_received = self.bytes_received,
            duration_ms = self.start.elapsed().as_millis() as u64,
            response_flags = %l.flags,
            policy = %l.policy.as_deref().unwrap_or("-"),
            "stream complete"
        );
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn metrics_are_served_and_the_connection_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        metrics.tcp.inc_by(7);
        tokio::spawn(serve(listener, metrics));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
        let mut out = String::new();
        // Ends only if the server closes the connection after answering.
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await.unwrap().unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("content-type: text/plain; version=0.0.4"), "{head}");
        assert!(body.contains("skiff_waypoint_tunnel_bytes_total 7"), "{body}");
    }

    /// Issue 13 item 11 (the waypoint's side): request series of workloads
    /// and Services that left were kept for the life of the process.
    #[test]
    fn request_series_of_workloads_that_left_are_pruned_after_the_grace() {
        use skiff_core::k8s;
        let snap = |n: usize| {
            let mut text = String::from("apiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: shop}\nspec: {containers: [{name: c}]}\nstatus: {phase: Running, podIP: 10.0.9.9}\n");
            for i in 0..n {
                text.push_str(&format!(
                    "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: job-{i}, namespace: jobs, labels: {{app: job-{i}}}}}\nspec: {{containers: [{{name: c}}]}}\nstatus: {{phase: Running, podIP: 10.1.0.{}}}\n\
                     ---\napiVersion: v1\nkind: Service\nmetadata: {{name: job-{i}, namespace: jobs}}\nspec: {{clusterIP: 10.97.0.{}, selector: {{app: job-{i}}}, ports: [{{port: 80}}]}}\n",
                    i + 1,
                    i + 1
                ));
            }
            let objects = k8s::parse_documents(&text).unwrap().into_iter().map(|o| ("t".to_owned(), o)).collect();
            Snapshot::from_objects(objects).unwrap()
        };
        let (busy, left) = (snap(100), snap(0));
        let m = Arc::new(Metrics::new());
        let peer_id = Identity::new("cluster.local", "shop", "default");
        for svc in busy.services.values() {
            let mut log = RequestLog::new(Some(svc), Source::Peer(&peer_id), &busy, "10.0.9.9:5000".parse().unwrap(), &http::Method::GET, "/", false, "t");
            let w = busy.workloads.values().find(|w| w.name == svc.name).unwrap();
            log.set_destination(w);
            log.finish(&m, 200, &Default::default(), Instant::now()).record(10);
        }
        assert_eq!(m.series(), 100);
        assert_eq!(m.prune(&busy, Duration::ZERO), 0, "nothing of a live workload goes");
        assert_eq!(m.prune(&left, Duration::from_secs(300)), 0, "kept for their last scrape");
        assert_eq!(m.prune(&left, Duration::ZERO), 100);
        assert_eq!(m.series(), 0);
        assert!(!m.render().contains("istio_response_bytes_count{"), "the size histograms' series go too");
        assert!(!m.render().contains("job-7"), "gone from the exposition");
    }

    /// A request dropped before its answer (the client went away) is
    /// counted and logged once, as Envoy does: code 0, flag DC; one that
    /// finishes is counted once, at its end.
    #[test]
    fn a_dropped_request_is_recorded_once_with_dc_and_a_finished_one_once() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: shop}\nspec: {containers: [{name: c}]}\nstatus: {phase: Running, podIP: 10.0.9.9}\n";
        let objects = skiff_core::k8s::parse_documents(text).unwrap().into_iter().map(|o| ("t".to_owned(), o)).collect();
        let snap = Snapshot::from_objects(objects).unwrap();
        let m = Arc::new(Metrics::new());
        let id = Identity::new("cluster.local", "shop", "client");
        let new = || RequestLog::new(None, Source::Peer(&id), &snap, "10.0.9.9:5000".parse().unwrap(), &http::Method::POST, "/", false, "t");
        let mut dropped = new();
        dropped.record_if_dropped(&m, Instant::now());
        drop(dropped);
        let count = |code: &str, flags: &str| m.requests.get_metric_with_label_values(&RequestLog::new(None, Source::Peer(&id), &snap, "10.0.9.9:5000".parse().unwrap(), &http::Method::GET, "/", false, "t").values(code, "", flags)).map(|c| c.get()).unwrap_or(0);
        assert_eq!(count("0", "DC"), 1);
        let mut finished = new();
        finished.record_if_dropped(&m, Instant::now());
        let done = finished.finish(&m, 200, &Default::default(), Instant::now());
        assert_eq!(count("200", "-"), 0, "recorded when the body ends, not before");
        done.record(3);
        assert_eq!((count("200", "-"), count("0", "DC")), (1, 1), "once, and the finished request is no DC");
    }

    /// `grpc-status` label values are gRPC's codes only (0-16); anything
    /// else reads as UNKNOWN (2).
    #[test]
    fn grpc_status_values_stay_grpcs_codes() {
        let h = |v: &str| {
            let mut m = http::HeaderMap::new();
            m.insert("grpc-status", v.parse().unwrap());
            grpc_status(&m)
        };
        assert_eq!(h("0").as_deref(), Some("0"));
        assert_eq!(h(" 16 ").as_deref(), Some("16"));
        assert_eq!(h("17").as_deref(), Some("2"));
        assert_eq!(h("4294967296").as_deref(), Some("2"));
        assert_eq!(h("nope").as_deref(), Some("2"));
        assert_eq!(grpc_status(&http::HeaderMap::new()), None);
    }
}
