//! What the two L7 processes around `skiff-l7` share: the waypoint
//! (`skiff-waypoint`, HBONE from client ztunnels) and the ingress gateway
//! (`skiff-gateway`, the mesh's edge). Flags, logging, the runtime, the
//! config source, the proxy's certificate, metrics and the drain on
//! SIGTERM are the same; what each serves is its own.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use skiff_l7::{Config, Proxy};
use tracing::info;

/// Flags both L7 processes take.
#[derive(clap::Args)]
pub struct ProxyArgs {
    /// Log lines as `text` or `json` (one object per line); filter with
    /// SKIFF_LOG.
    #[arg(long, env = "SKIFF_LOG_FORMAT", default_value = "text")]
    pub log_format: skiff_core::logging::LogFormat,
    /// The proxy's namespace (its identity's namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,
    /// Directory of Kubernetes manifests describing the cluster. Exactly
    /// one of --manifests, --kube, --kube-url.
    #[arg(long, env = "SKIFF_MANIFESTS")]
    pub manifests: Option<PathBuf>,
    /// Read the cluster from the Kubernetes API (in-cluster config, else
    /// KUBECONFIG).
    #[arg(long)]
    pub kube: bool,
    /// Read the cluster from the Kubernetes API at this URL.
    #[arg(long, env = "SKIFF_KUBE_URL", value_name = "URL")]
    pub kube_url: Option<String>,
    /// The mesh CA directory (local mode; unused with --signer-url).
    #[arg(long, env = "SKIFF_CA_DIR", required_unless_present = "signer_url")]
    pub ca_dir: Option<PathBuf>,
    #[command(flatten)]
    pub signer: skiff_hbone::certs::SignerArgs,
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Lifetime of the proxy's certificate; rotated at half-life.
    #[arg(long, default_value = "86400", value_name = "SECONDS")]
    pub cert_lifetime: u64,
    /// Prometheus metrics address.
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// Admin address: `/events`, the access events as JSON lines for
    /// `skiff observe` (keep it on localhost: they name every request).
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[arg(long, default_value = "5", value_name = "SECONDS")]
    pub drain_timeout: u64,
    #[command(flatten)]
    pub hbone: skiff_hbone::limits::HboneLimits,
    #[command(flatten)]
    pub http: skiff_l7::server::HttpLimits,
    #[command(flatten)]
    pub tracing: skiff_l7::spans::TracingArgs,
}

/// Logging to stderr, filtered by `SKIFF_LOG` (default `info`), as
/// `--log-format` says.
pub fn init_logging(format: skiff_core::logging::LogFormat) {
    skiff_core::logging::init(format, "info");
    skiff_core::raise_open_file_limit_logged();
}

/// Runs a proxy named `name` (running as `service_account`, in pod
/// `pod_name`) until SIGTERM or Ctrl-C, then drains it: `front` starts
/// what it serves (its listeners) and returns when that stops.
/// With `secrets`, the proxy also reads its own namespace's Secrets (the
/// ingress gateway's certificates); `waypoint`: it is a waypoint (chosen
/// by `targetRefs`, not pod selectors).
#[allow(clippy::too_many_arguments)]
pub fn run<F, Fut>(args: ProxyArgs, name: String, service_account: String, pod_name: Option<String>, secrets: bool, waypoint: bool, front: F) -> anyhow::Result<()>
where
    F: FnOnce(Arc<Proxy>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut source = skiff_kube_source::SourceChoice::from_args(args.manifests.clone(), args.kube, args.kube_url.clone())?;
    if secrets {
        source = source.secrets_in(&args.namespace);
    }
    // Istio's mesh config: the tracing providers Telemetry names.
    source = source.mesh_config_in(skiff_core::routing::DEFAULT_ROOT_NAMESPACE).telemetry();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let source = source.open().map_err(|e| anyhow::anyhow!("opening the config source: {}", skiff_core::report(&e)))?;
        let cluster = skiff_kube_source::watch_cluster(source).await?;
        let ca_dir = args.ca_dir.clone().unwrap_or_else(|| PathBuf::from("/var/lib/skiff/ca"));
        skiff_hbone::sock::set_outbound_timeouts(args.hbone.keepalive_interval, args.hbone.tcp_user_timeout);
        let certs = skiff_hbone::certs::CertManager::from_args(&args.signer, &ca_dir, &args.trust_domain, Duration::from_secs(args.cert_lifetime))?;
        // Renew the proxy's certificate in the background (signer requests
        // block: off the async workers).
        let own = skiff_hbone::identity::Identity::new(certs.trust_domain(), &args.namespace, &service_account);
        certs.spawn_refresh(move || vec![own.clone()]);
        let (proxy_namespace, proxy_name) = (args.namespace.clone(), name.clone());
        let cfg = Config { name, pod_name, namespace: args.namespace, service_account, hbone: args.hbone, http: args.http, read_secrets: secrets, tracing: args.tracing.settings(), waypoint };
        let proxy = Proxy::new(cfg, cluster, certs);
        let metrics = tokio::net::TcpListener::bind(args.metrics_addr).await.with_context(|| format!("binding {}", args.metrics_addr))?;
        tokio::spawn(skiff_l7::metrics::serve(metrics, proxy.metrics.clone()));
        let admin = tokio::net::TcpListener::bind(args.admin_addr).await.with_context(|| format!("binding {}", args.admin_addr))?;
        let label = format!("{} {}/{}", if waypoint { "waypoint" } else { "gateway" }, proxy_namespace, proxy_name);
        tokio::spawn(serve_admin(admin, label, proxy.clone()));
        let mut serve = tokio::spawn(front(Arc::clone(&proxy)));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = &mut serve => return r?,
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        // Stop accepting, GOAWAY every connection, let what is in flight
        // finish up to the deadline.
        info!(open_streams = proxy.drain.active(), "draining: listeners closed, GOAWAY sent, waiting for requests in flight");
        let left = proxy.drain.drain(Duration::from_secs(args.drain_timeout)).await;
        // Still starting up (waiting for its certificate) at worst.
        serve.abort();
        info!(closed_by_deadline = left, "drained; exiting");
        Ok(())
    })
}

/// The admin endpoint: `/events` (see `skiff_hbone::events`) and
/// `/config_dump` (what the proxy serves: `Proxy::config_dump`).
async fn serve_admin(listener: tokio::net::TcpListener, label: String, proxy: Arc<Proxy>) {
    use http_body_util::BodyExt as _;
    loop {
        let (s, _) = skiff_hbone::transport::accept(&listener, "admin").await;
        let (label, proxy) = (label.clone(), proxy.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (label, proxy) = (label.clone(), proxy.clone());
                async move {
                    if req.uri().path() == "/events" {
                        return Ok::<_, std::convert::Infallible>(skiff_hbone::events::response(label));
                    }
                    let resp = if req.uri().path() == "/config_dump" {
                        let body = serde_json::to_vec_pretty(&proxy.config_dump()).unwrap_or_default();
                        hyper::Response::builder().header("content-type", "application/json").body(http_body_util::Full::new(bytes::Bytes::from(body)).boxed())
                    } else {
                        hyper::Response::builder()
                            .status(hyper::StatusCode::NOT_FOUND)
                            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"not found: try /config_dump or /events\n")).boxed())
                    };
                    Ok::<_, std::convert::Infallible>(resp.expect("valid response"))
                }
            });
            // A client that sends no request head within 10 s is dropped.
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(Duration::from_secs(10));
            let _ = b.serve_connection(hyper_util::rt::TokioIo::new(s), svc).await;
        });
    }
}
