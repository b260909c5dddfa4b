//! Skiff's in-cluster signer: the only holder of the mesh root key. A
//! ztunnel sends a CSR for one SPIFFE identity with its projected
//! service-account token; the signer signs only if
//!
//! 1. TokenReview authenticates the token (audience [`Config::audience`]) as
//!    the ztunnel service account, bound to a pod on a node — the node from
//!    `authentication.kubernetes.io/node-name`, else from the bound pod
//!    (`pod-name` + `pod-uid`) read from the API;
//! 2. the identity is in this trust domain, and
//! 3. a pod with that namespace and service account runs on that node
//!    (listed from the API with `spec.nodeName=<node>`, not finished; a
//!    mirror pod or one without `serviceAccountName` never counts: a
//!    node's kubelet can create mirror pods in any namespace).
//!
//! A waypoint may obtain its *own* identity: a token of service account
//! `<ns>/<sa>` gets `spiffe://<td>/ns/<ns>/sa/<sa>` only, and only when the
//! token is bound to a live pod of that service account carrying the
//! `gateway.networking.k8s.io/gateway-name: <sa>` label (a pod of waypoint
//! `<sa>`: waypoints run as the service account named like them).
//!
//! Everything else is refused with the reason (401 for the token, 403 for
//! what it may not have, 400 for a malformed request) and logged. A
//! compromised node can so obtain only the identities of its own pods.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{body::Incoming, service::service_fn, Method, Request, Response, StatusCode};
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{
    api::{ListParams, PostParams},
    Api, Client,
};
use serde_json::json;
use skiff_hbone::{
    identity::{Ca, Identity, IdentityError},
    signer_client::SIGN_PATH,
};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

/// The ztunnel service account, as TokenReview names it.
pub const ZTUNNEL_USER: &str = "system:serviceaccount:skiff-system:ztunnel";
/// TokenReview `extra` keys of a token bound to a pod.
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// Annotation the kubelet puts on the API mirror of a static pod. Such pods
/// have no service account and a node's kubelet may create them in any
/// namespace, so they never vouch for an identity.
pub const ANNOTATION_MIRROR_POD: &str = "kubernetes.io/config.mirror";

/// The service account a pod runs as, if it may vouch for an identity:
/// `None` for mirror (static) pods and pods without a `serviceAccountName`
/// (never defaulted to `default`).
fn pod_service_account(pod: &Pod) -> Option<&str> {
    let mirror = pod.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(ANNOTATION_MIRROR_POD));
    if mirror {
        return None;
    }
    pod.spec.as_ref().and_then(|s| s.service_account_name.as_deref()).filter(|sa| !sa.is_empty())
}

/// What the signer accepts.
#[derive(Clone, Debug)]
pub struct Config {
    /// SPIFFE trust domain of the identities it signs.
    pub trust_domain: String,
    /// The only user allowed to ask (TokenReview username).
    pub ztunnel_user: String,
    /// The namespace of ztunnel's pods (for the bound-pod fallback).
    pub ztunnel_namespace: String,
    /// Audience the tokens must carry.
    pub audience: String,
    /// Longest certificate lifetime handed out.
    pub max_lifetime: Duration,
    /// Time a client has to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time a client has to send a request's headers (the first request and
    /// each next one on a kept-alive connection).
    pub header_read_timeout: Duration,
    /// Time a request has from its headers to the answer (body, TokenReview,
    /// pod check, signing); past it the answer is 503.
    pub request_timeout: Duration,
    /// Connections served at once; more are closed as they are accepted.
    pub max_connections: usize,
}

/// Shortest certificate lifetime handed out (a request for less gets this).
pub const MIN_LIFETIME: Duration = Duration::from_secs(60);
/// Longest `max_lifetime` accepted (the length of a generated root's validity).
pub const MAX_MAX_LIFETIME: Duration = Duration::from_secs(3650 * 86400);

impl Config {
    /// Checks the values the signer cannot work with.
    pub fn validate(&self) -> Result<(), String> {
        let max = self.max_lifetime;
        if max < MIN_LIFETIME || max > MAX_MAX_LIFETIME {
            return Err(format!(
                "max lifetime {} s is outside {}..={} s (the shortest certificate the signer issues is {} s)",
                max.as_secs(),
                MIN_LIFETIME.as_secs(),
                MAX_MAX_LIFETIME.as_secs(),
                MIN_LIFETIME.as_secs()
            ));
        }
        Ok(())
    }

    /// The lifetime to issue for a requested one: at least [`MIN_LIFETIME`],
    /// at most `max_lifetime` (which wins should it be below the minimum;
    /// never panics, whatever the config).
    pub fn lifetime_for(&self, requested: Duration) -> Duration {
        requested.max(MIN_LIFETIME).min(self.max_lifetime.min(MAX_MAX_LIFETIME))
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            trust_domain: "cluster.local".into(),
            ztunnel_user: ZTUNNEL_USER.into(),
            ztunnel_namespace: "skiff-system".into(),
            audience: "skiff-ca".into(),
            max_lifetime: Duration::from_secs(86400),
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            max_connections: 512,
        }
    }
}

/// Why a request was not signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// No bearer token, or TokenReview did not authenticate it.
    #[error("token not authenticated: {0}")]
    Unauthenticated(String),
    /// The caller may not have this certificate.
    #[error("refused: {0}")]
    Forbidden(String),
    /// The request is malformed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The CSR did not verify.
    #[error("bad request")]
    Csr(#[source] IdentityError),
    /// The Kubernetes API could not answer: nothing is signed without it.
    #[error("Kubernetes API {what}")]
    Api {
        what: &'static str,
        #[source]
        source: kube::Error,
    },
    /// Signing failed.
    #[error("signing")]
    Sign(#[source] IdentityError),
}

impl SignError {
    /// The `reason` label of a refusal.
    fn reason(&self) -> &'static str {
        match self {
            SignError::Unauthenticated(_) => "unauthenticated",
            SignError::Forbidden(_) => "forbidden",
            SignError::BadRequest(_) | SignError::Csr(_) => "bad_request",
            SignError::Api { .. } => "api_unavailable",
            SignError::Sign(_) => "signing_failed",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            SignError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            SignError::Forbidden(_) => StatusCode::FORBIDDEN,
            SignError::BadRequest(_) | SignError::Csr(_) => StatusCode::BAD_REQUEST,
            SignError::Api { .. } => StatusCode::SERVICE_UNAVAILABLE,
            SignError::Sign(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// An authenticated caller (TokenReview's user).
struct Caller {
    username: String,
    extra: std::collections::BTreeMap<String, Vec<String>>,
}

impl Caller {
    fn one(&self, key: &str) -> Option<String> {
        self.extra.get(key).and_then(|v| v.first()).filter(|s| !s.is_empty()).cloned()
    }
}

/// TokenReview's `status.audiences` must be present and contain `want`: the
/// API server returns the audiences it checked when the request names them,
/// so an answer without them cannot show the token is meant for the signer.
fn check_audience(granted: Option<&[String]>, want: &str) -> Result<(), SignError> {
    match granted {
        Some(a) if a.iter().any(|x| x == want) => Ok(()),
        Some(a) => Err(SignError::Unauthenticated(format!("token is not for audience {want} (TokenReview granted {a:?})"))),
        None => Err(SignError::Unauthenticated(format!(
            "TokenReview returned no status.audiences: the token is not shown to be for audience {want}"
        ))),
    }
}

/// The signer: a root and an API client.
pub struct Signer {
    cfg: Config,
    ca: Ca,
    kube: Client,
    metrics: SignerMetrics,
}

/// What the signer counts (`/metrics` on `--metrics-addr`).
pub struct SignerMetrics {
    registry: prometheus::Registry,
    issued: prometheus::IntCounter,
    refused: prometheus::IntCounterVec,
    duration: prometheus::Histogram,
}

impl SignerMetrics {
    fn new() -> SignerMetrics {
        let registry = prometheus::Registry::new();
        let issued = prometheus::IntCounter::new("skiff_signer_certificates_issued_total", "Workload certificates signed.").expect("valid metric");
        let refused = prometheus::IntCounterVec::new(
            prometheus::Opts::new("skiff_signer_requests_refused_total", "Certificate requests refused, by reason (unauthenticated, forbidden, bad_request, api_unavailable, signing_failed)."),
            &["reason"],
        )
        .expect("valid metric");
        let duration = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new("skiff_signer_request_duration_seconds", "Time to answer a certificate request (TokenReview and Pod look-ups included).")
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )
        .expect("valid metric");
        for c in [Box::new(issued.clone()) as Box<dyn prometheus::core::Collector>, Box::new(refused.clone()), Box::new(duration.clone())] {
            registry.register(c).expect("registered once");
        }
        SignerMetrics { registry, issued, refused, duration }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default() + &skiff_core::telemetry::process_metrics()
    }
}

impl Signer {
    pub fn new(cfg: Config, ca: Ca, kube: Client) -> Arc<Signer> {
        Arc::new(Signer { cfg, ca, kube, metrics: SignerMetrics::new() })
    }

    pub fn metrics(&self) -> &SignerMetrics {
        &self.metrics
    }

    /// Serves `GET /metrics` on `listener` (plain HTTP, one request per
    /// connection, bounded reads) until the process ends.
    pub async fn serve_metrics(self: Arc<Self>, listener: TcpListener) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        loop {
            let (mut tcp, _) = skiff_hbone::transport::accept(&listener, "signer metrics").await;
            let me = self.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await else { return };
                let req = String::from_utf8_lossy(&buf[..n]);
                let (status, body) = match req.split_whitespace().nth(1) {
                    Some("/metrics") => ("200 OK", me.metrics.render()),
                    _ => ("404 Not Found", "not found: try /metrics\n".to_owned()),
                };
                let head = format!("HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                let _ = tcp.write_all(head.as_bytes()).await;
                let _ = tcp.write_all(body.as_bytes()).await;
            });
        }
    }

    /// Checks and signs one request: returns the certificate as PEM.
    pub async fn sign(&self, token: &str, identity: &str, csr_pem: &str, lifetime: Duration) -> Result<String, SignError> {
        let caller = self.review(token).await?;
        let id = Identity::parse(identity).ok_or_else(|| SignError::BadRequest(format!("{identity:?} is not spiffe://<td>/ns/<ns>/sa/<sa>")))?;
        if id.trust_domain != self.cfg.trust_domain {
            return Err(SignError::Forbidden(format!("{identity}: trust domain is not {}", self.cfg.trust_domain)));
        }
        let node = if caller.username == self.cfg.ztunnel_user {
            let node = self.node_of(&caller).await?;
            self.check_pod_on_node(&id, &node).await?;
            node
        } else {
            self.check_waypoint_own_identity(&caller, &id).await?
        };
        let lifetime = self.cfg.lifetime_for(lifetime);
        let (_, pem) = self.ca.sign_csr(&id, csr_pem, lifetime).map_err(|e| match e {
            IdentityError::Csr(_) => SignError::Csr(e),
            e => SignError::Sign(e),
        })?;
        info!(%identity, node = %node, lifetime_s = lifetime.as_secs(), "certificate signed");
        Ok(pem)
    }

    /// Authenticates a token (TokenReview, audience checked).
    async fn review(&self, token: &str) -> Result<Caller, SignError> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_owned()), audiences: Some(vec![self.cfg.audience.clone()]) },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.kube.clone());
        let done = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|source| SignError::Api { what: "TokenReview", source })?;
        let status = done.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(SignError::Unauthenticated(status.error.unwrap_or_else(|| "TokenReview: not authenticated".into())));
        }
        check_audience(status.audiences.as_deref(), &self.cfg.audience)?;
        let user = status.user.unwrap_or_default();
        Ok(Caller { username: user.username.unwrap_or_default(), extra: user.extra.unwrap_or_default() })
    }

    /// A waypoint asking for its own identity: the token must belong to
    /// that identity's service account and be bound to a live pod of it
    /// that carries the waypoint label. Returns the pod's node (for the log).
    async fn check_waypoint_own_identity(&self, caller: &Caller, id: &Identity) -> Result<String, SignError> {
        let not_allowed = |why: String| {
            SignError::Forbidden(format!("{} is not the ztunnel service account {} and {why}", caller.username, self.cfg.ztunnel_user))
        };
        let Some((ns, sa)) = caller.username.strip_prefix("system:serviceaccount:").and_then(|r| r.split_once(':')) else {
            return Err(not_allowed("not a service account".into()));
        };
        if (ns, sa) != (id.namespace.as_str(), id.service_account.as_str()) {
            return Err(not_allowed(format!("may only obtain its own identity spiffe://{}/ns/{ns}/sa/{sa}", self.cfg.trust_domain)));
        }
        let pod = self.bound_pod(caller, ns).await?.map_err(not_allowed)?;
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        // A waypoint's pods run as the service account named like the
        // waypoint (what ztunnels select them by): a pod that merely
        // carries the label gets no identity from it.
        match pod.metadata.labels.as_ref().and_then(|l| l.get(skiff_core::LABEL_GATEWAY_NAME)) {
            None => return Err(not_allowed(format!("its pod {ns}/{pod_name} is not a waypoint (no {} label)", skiff_core::LABEL_GATEWAY_NAME))),
            Some(gw) if gw != sa => {
                return Err(not_allowed(format!(
                    "its pod {ns}/{pod_name} is labelled as waypoint {gw:?} but a waypoint's pods run as the service account named like it, not {sa:?}"
                )))
            }
            Some(_) => {}
        }
        if pod.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(ANNOTATION_MIRROR_POD)) {
            return Err(not_allowed(format!("its pod {ns}/{pod_name} is a mirror (static) pod ({ANNOTATION_MIRROR_POD})")));
        }
        match pod_service_account(&pod) {
            Some(pod_sa) if pod_sa == sa => {}
            Some(_) => return Err(not_allowed(format!("its pod {ns}/{pod_name} runs as another service account"))),
            None => return Err(not_allowed(format!("its pod {ns}/{pod_name} names no service account"))),
        }
        let spec = pod.spec.unwrap_or_default();
        let finished = pod.status.as_ref().and_then(|s| s.phase.as_deref()).is_some_and(|p| p == "Succeeded" || p == "Failed");
        if finished {
            return Err(not_allowed(format!("its pod {ns}/{pod_name} has finished")));
        }
        Ok(spec.node_name.unwrap_or_else(|| "(unscheduled)".into()))
    }

    /// The pod the caller's token is bound to (`pod-name` and `pod-uid` in
    /// TokenReview's extra), read from `ns`. The inner error says why the
    /// binding does not hold (unbound, no such pod, replaced).
    async fn bound_pod(&self, caller: &Caller, ns: &str) -> Result<Result<Pod, String>, SignError> {
        let (Some(pod_name), Some(pod_uid)) = (caller.one(EXTRA_POD_NAME), caller.one(EXTRA_POD_UID)) else {
            return Ok(Err("its token is not bound to a pod (no pod-name and pod-uid in TokenReview extra)".into()));
        };
        let pods: Api<Pod> = Api::namespaced(self.kube.clone(), ns);
        let Some(pod) = pods.get_opt(&pod_name).await.map_err(|source| SignError::Api { what: "get pod", source })? else {
            return Ok(Err(format!("its token's pod {ns}/{pod_name} does not exist")));
        };
        if pod.metadata.uid.as_deref() != Some(pod_uid.as_str()) {
            return Ok(Err(format!("its token's pod {ns}/{pod_name} was replaced (uid differs)")));
        }
        Ok(Ok(pod))
    }

    /// The node the token's ztunnel runs on.
    async fn node_of(&self, caller: &Caller) -> Result<String, SignError> {
        if let Some(node) = caller.one(EXTRA_NODE_NAME) {
            return Ok(node);
        }
        // Older API servers put only the bound pod in the token: read its node.
        let pod = self.bound_pod(caller, &self.cfg.ztunnel_namespace).await?.map_err(SignError::Forbidden)?;
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        pod.spec
            .and_then(|s| s.node_name)
            .ok_or_else(|| SignError::Forbidden(format!("the token's pod {pod_name} is not scheduled")))
    }

    async fn check_pod_on_node(&self, id: &Identity, node: &str) -> Result<(), SignError> {
        let pods: Api<Pod> = Api::namespaced(self.kube.clone(), &id.namespace);
        let list = pods
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await
            .map_err(|source| SignError::Api { what: "list pods", source })?;
        // Mirror pods and pods naming no service account vouch for nothing.
        let found = list.items.iter().any(|p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
                && pod_service_account(p) == Some(id.service_account.as_str())
                && !matches!(phase, Some("Succeeded" | "Failed"))
        });
        if found {
            Ok(())
        } else {
            Err(SignError::Forbidden(format!(
                "no running pod with service account {} in namespace {} on node {node} (mirror pods and pods without serviceAccountName do not count)",
                id.service_account, id.namespace
            )))
        }
    }

    /// Serves the signing endpoint over TLS, forever. Failing to accept
    /// (out of file descriptors, say) is logged and retried after a short
    /// pause, never fatal. Each connection holds one of
    /// [`Config::max_connections`] slots (with none free it is closed at
    /// once) and is closed when the client is slower than
    /// [`Config::handshake_timeout`] or [`Config::header_read_timeout`];
    /// a request not answered within [`Config::request_timeout`] gets 503.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) -> std::io::Result<()> {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let slots = Arc::new(tokio::sync::Semaphore::new(self.cfg.max_connections));
        let mut last_full_warning: Option<tokio::time::Instant> = None;
        loop {
            let (tcp, peer) = skiff_hbone::transport::accept(&listener, "signer").await;
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                drop(tcp);
                // One warning per 10 s at most: a flood must not flood the log too.
                if last_full_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    last_full_warning = Some(tokio::time::Instant::now());
                    warn!(%peer, max_connections = self.cfg.max_connections, "connection limit reached: closing new connections");
                }
                continue;
            };
            let acceptor = acceptor.clone();
            let me = self.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let stream = match tokio::time::timeout(me.cfg.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        warn!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        debug!(%peer, timeout_s = me.cfg.handshake_timeout.as_secs_f64(), "TLS handshake timed out: connection closed");
                        return;
                    }
                };
                let header_read_timeout = me.cfg.header_read_timeout;
                let svc = service_fn(move |req| {
                    let me = me.clone();
                    async move {
                        let limit = me.cfg.request_timeout;
                        let resp = match tokio::time::timeout(limit, me.handle(req, peer)).await {
                            Ok(r) => r,
                            Err(_) => {
                                warn!(%peer, timeout_s = limit.as_secs_f64(), "request not answered in time");
                                answer(
                                    StatusCode::SERVICE_UNAVAILABLE,
                                    json!({"error": format!("request not answered within {} s", limit.as_secs_f64())}),
                                )
                            }
                        };
                        Ok::<_, Infallible>(resp)
                    }
                });
                let mut http = hyper::server::conn::http1::Builder::new();
                http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(header_read_timeout);
                if let Err(e) = http.serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await {
                    debug!(%peer, error = %e, "connection closed");
                }
            });
        }
    }

    async fn handle(&self, req: Request<Incoming>, peer: std::net::SocketAddr) -> Response<Full<Bytes>> {
        if req.method() != Method::POST || req.uri().path() != SIGN_PATH {
            return answer(StatusCode::NOT_FOUND, json!({"error": format!("only POST {SIGN_PATH}")}));
        }
        let token = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return answer(StatusCode::BAD_REQUEST, json!({"error": format!("reading the request: {e}")})),
        };
        let started = std::time::Instant::now();
        let result = async {
            let token = token.ok_or_else(|| SignError::Unauthenticated("no bearer token".into()))?;
            let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| SignError::BadRequest(format!("not JSON: {e}")))?;
            let identity = v["identity"].as_str().ok_or_else(|| SignError::BadRequest("`identity` missing".into()))?;
            let csr = v["csr"].as_str().ok_or_else(|| SignError::BadRequest("`csr` missing".into()))?;
            let lifetime = Duration::from_secs(v["lifetimeSeconds"].as_u64().unwrap_or(self.cfg.max_lifetime.as_secs()));
            self.sign(&token, identity, csr, lifetime).await
        }
        .await;
        self.metrics.duration.observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(_) => self.metrics.issued.inc(),
            Err(e) => self.metrics.refused.with_label_values(&[e.reason()]).inc(),
        }
        match result {
            Ok(cert) => answer(StatusCode::OK, json!({"certificate": cert})),
            Err(e) => {
                let msg = skiff_core::report(&e);
                let identity = serde_json::from_slice::<serde_json::Value>(&body).ok().and_then(|v| v["identity"].as_str().map(str::to_owned));
                warn!(%peer, identity = identity.as_deref().unwrap_or("-"), error = %msg, "certificate request refused");
                answer(e.status(), json!({"error": msg}))
            }
        }
    }
}

fn answer(code: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())))
        .expect("static response parts")
}

/// The signer's TLS config: a server certificate for `dns_names` issued by
/// the root itself (ztunnels trust the root already).
pub fn tls_config(ca: &Ca, dns_names: &[String]) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
    let (cert, key) = ca.issue_server(dns_names, Duration::from_secs(365 * 86400))?;
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_lifetime_is_validated_and_never_panics_in_use() {
        let cfg = |secs| Config { max_lifetime: Duration::from_secs(secs), ..Config::default() };
        assert!(Config::default().validate().is_ok());
        for bad in [0, 30, 59, u64::MAX] {
            let e = cfg(bad).validate().unwrap_err();
            assert!(e.contains("max lifetime") && e.contains(&bad.to_string()), "{e}");
            // An unvalidated config still never panics nor overflows.
            let l = cfg(bad).lifetime_for(Duration::from_secs(3600));
            assert!(l <= MAX_MAX_LIFETIME, "{l:?}");
        }
        assert_eq!(cfg(30).lifetime_for(Duration::from_secs(3600)), Duration::from_secs(30));
        assert_eq!(cfg(600).lifetime_for(Duration::from_secs(1)), MIN_LIFETIME);
        assert_eq!(cfg(600).lifetime_for(Duration::from_secs(3600)), Duration::from_secs(600));
    }

    #[test]
    fn the_audience_must_be_granted_explicitly() {
        let want = "skiff-ca";
        check_audience(Some(&["other".into(), want.into()]), want).expect("granted");
        for granted in [None, Some(&[][..]), Some(&["https://kubernetes.default.svc".to_owned()][..])] {
            match check_audience(granted, want) {
                Err(e @ SignError::Unauthenticated(_)) => assert!(e.to_string().contains(want), "{e}"),
                other => panic!("{granted:?}: expected unauthenticated, got {other:?}"),
            }
        }
    }
}
