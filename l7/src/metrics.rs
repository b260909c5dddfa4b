//! The engine's metrics, with Istio's names and labels
//! (`istio_requests_total`, `istio_request_duration_milliseconds`,
//! reporter="waypoint"), its access log (one line per request), and the
//! Prometheus endpoint that serves them.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};
use skiff_core::model::{ServiceInfo, Snapshot, Workload};
use skiff_hbone::identity::Identity;
use tokio::net::TcpListener;
use tracing::{debug, info};

const LABELS: [&str; 15] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_version",
    "request_protocol",
    "response_code",
    "response_flags",
    "connection_security_policy",
];

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
    /// Bytes through HBONE streams (both directions).
    pub tcp: IntCounter,
    /// HBONE connections over an admission bound, by bound.
    pub admission_refused: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(Opts::new("istio_requests_total", "Requests handled"), &LABELS).expect("valid");
        // Istio's buckets (its stats filter's defaults): durations up to an
        // hour, sizes by powers of ten up to 1 GB.
        let duration = HistogramVec::new(
            HistogramOpts::new("istio_request_duration_milliseconds", "Request duration").buckets(vec![
                0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0, 600000.0, 1800000.0,
                3600000.0,
            ]),
            &LABELS,
        )
        .expect("valid");
        let sizes = || (0..10).map(|i| 10f64.powi(i)).collect::<Vec<f64>>();
        let request_bytes =
            HistogramVec::new(HistogramOpts::new("istio_request_bytes", "Request body size (bytes)").buckets(sizes()), &LABELS).expect("valid");
        let response_bytes =
            HistogramVec::new(HistogramOpts::new("istio_response_bytes", "Response body size (bytes), counted as it is sent").buckets(sizes()), &LABELS)
                .expect("valid");
        registry.register(Box::new(request_bytes.clone())).expect("once");
        registry.register(Box::new(response_bytes.clone())).expect("once");
        let tcp = IntCounter::new("skiff_waypoint_tunnel_bytes_total", "Bytes through HBONE streams").expect("valid");
        registry.register(Box::new(requests.clone())).expect("once");
        registry.register(Box::new(duration.clone())).expect("once");
        registry.register(Box::new(tcp.clone())).expect("once");
        let admission_refused = IntCounterVec::new(
            Opts::new(
                "skiff_hbone_admission_refused_total",
                "HBONE connections closed unserved because an admission bound was reached (see --hbone-max-*), by bound",
            ),
            &["reason"],
        )
        .expect("valid");
        registry.register(Box::new(admission_refused.clone())).expect("once");
        Metrics { registry, series: Default::default(), requests, duration, request_bytes, response_bytes, tcp, admission_refused }
    }

    /// Removes the request metrics' label sets that name a workload or
    /// Service no longer in `snap` and that no request used for `grace`
    /// (so their last counts are scraped first). Returns how many.
    pub fn prune(&self, snap: &Snapshot, grace: Duration) -> usize {
        use skiff_core::series::NamedAt;
        // Positions in LABELS.
        let workloads = [NamedAt { namespace: 2, name: 1 }, NamedAt { namespace: 5, name: 4 }];
        let services = [NamedAt { namespace: 9, name: 8 }];
        let gone = self.series.take_gone(snap, grace, &workloads, &services);
        for v in &gone {
            let values: Vec<&str> = v.iter().map(String::as_str).collect();
            let _ = self.requests.remove_label_values(&values);
            let _ = self.duration.remove_label_values(&values);
            let _ = self.request_bytes.remove_label_values(&values);
            let _ = self.response_bytes.remove_label_values(&values);
        }
        gone.len()
    }

    /// Label sets of the request metrics now.
    pub fn series(&self) -> usize {
        self.series.len()
    }

    pub fn render(&self) -> String {
        use prometheus::Encoder as _;
        let mut buf = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
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
    source_workload: String,
    source_namespace: String,
    source_principal: String,
    destination_workload: String,
    destination_namespace: String,
    destination_principal: String,
    destination_version: String,
    service: String,
    service_name: String,
    service_namespace: String,
    protocol: &'static str,
    peer: SocketAddr,
    method: String,
    pub path: String,
    trace_id: String,
    pub rewritten: Option<String>,
    pub flags: Vec<&'static str>,
    pub retries: u32,
    /// The request body's size, once read.
    pub request_bytes: u64,
    trust_domain: String,
}

/// Who a request's metrics name as its source.
pub enum Source<'a> {
    /// The HBONE peer (at a waypoint): its identity, its workload by
    /// address.
    Peer(&'a Identity),
    /// The proxy itself (the ingress gateway, which the backends see as
    /// the client): its workload name and identity.
    Proxy(&'a str, &'a Identity),
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
        protocol: &'static str,
        trace_id: &str,
    ) -> RequestLog {
        let (reporter, source_workload, id) = match source {
            Source::Peer(id) => {
                let src = match peer {
                    SocketAddr::V4(a) => snap.workload_by_ip(*a.ip()),
                    SocketAddr::V6(_) => None,
                };
                ("waypoint", src.map(|w| w.workload_name.clone()).unwrap_or_else(|| "unknown".into()), id)
            }
            Source::Proxy(workload, id) => ("source", workload.to_owned(), id),
        };
        let mut log = RequestLog {
            reporter,
            source_workload,
            source_namespace: id.namespace.clone(),
            source_principal: id.to_string(),
            destination_workload: "unknown".into(),
            destination_namespace: "unknown".into(),
            destination_principal: "unknown".into(),
            destination_version: "unknown".into(),
            service: "unknown".into(),
            service_name: "unknown".into(),
            service_namespace: "unknown".into(),
            protocol,
            peer,
            method: method.to_string(),
            path: path.to_owned(),
            trace_id: trace_id.to_owned(),
            rewritten: None,
            flags: Vec::new(),
            retries: 0,
            request_bytes: 0,
            trust_domain: id.trust_domain.clone(),
        };
        if let Some(svc) = svc {
            log.set_service(svc);
        }
        log
    }

    /// The destination Service, once known.
    pub fn set_service(&mut self, svc: &ServiceInfo) {
        self.destination_namespace = svc.namespace.clone();
        self.service = svc.hostname();
        self.service_name = svc.name.clone();
        self.service_namespace = svc.namespace.clone();
    }

    pub fn set_destination(&mut self, w: &Workload) {
        self.destination_workload = w.workload_name.clone();
        self.destination_namespace = w.namespace.clone();
        self.destination_principal = format!("spiffe://{}/ns/{}/sa/{}", self.trust_domain, w.namespace, w.service_account);
        self.destination_version = w.labels.get("version").cloned().unwrap_or_else(|| "unknown".into());
    }

    /// Counts the request and logs it; returns the response-size
    /// histogram of its label set, for the body as it is sent
    /// ([`crate::body::counted`]).
    pub fn finish(self, m: &Metrics, code: u16, took: Duration) -> prometheus::Histogram {
        let flags = if self.flags.is_empty() { "-".to_owned() } else { self.flags.join(",") };
        let code_s = code.to_string();
        let values = [
            self.reporter,
            &self.source_workload,
            &self.source_namespace,
            &self.source_principal,
            &self.destination_workload,
            &self.destination_namespace,
            &self.destination_principal,
            &self.service,
            &self.service_name,
            &self.service_namespace,
            &self.destination_version,
            self.protocol,
            &code_s,
            &flags,
            "mutual_tls",
        ];
        m.requests.with_label_values(&values).inc();
        m.duration.with_label_values(&values).observe(took.as_secs_f64() * 1000.0);
        m.request_bytes.with_label_values(&values).observe(self.request_bytes as f64);
        let response_bytes = m.response_bytes.with_label_values(&values);
        m.series.record(&values);
        info!(
            target: "access",
            method = %self.method,
            path = %self.path,
            rewritten = %self.rewritten.as_deref().unwrap_or("-"),
            code,
            response_flags = %flags,
            src.addr = %self.peer,
            src.identity = %self.source_principal,
            dst.service = %self.service,
            dst.workload = %self.destination_workload,
            dst.version = %self.destination_version,
            retries = self.retries,
            duration_ms = took.as_millis() as u64,
            trace_id = %self.trace_id,
            "request complete"
        );
        response_bytes
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
        let m = Metrics::new();
        let peer_id = Identity::new("cluster.local", "shop", "default");
        for svc in busy.services.values() {
            let mut log = RequestLog::new(Some(svc), Source::Peer(&peer_id), &busy, "10.0.9.9:5000".parse().unwrap(), &http::Method::GET, "/", "http", "t");
            let w = busy.workloads.values().find(|w| w.name == svc.name).unwrap();
            log.set_destination(w);
            log.finish(&m, 200, Duration::from_millis(1));
        }
        assert_eq!(m.series(), 100);
        assert_eq!(m.prune(&busy, Duration::ZERO), 0, "nothing of a live workload goes");
        assert_eq!(m.prune(&left, Duration::from_secs(300)), 0, "kept for their last scrape");
        assert_eq!(m.prune(&left, Duration::ZERO), 100);
        assert_eq!(m.series(), 0);
        assert!(!m.render().contains("istio_response_bytes_count{"), "the size histograms' series go too");
        assert!(!m.render().contains("job-7"), "gone from the exposition");
    }
}
