//! `skiff-waypoint`: the process around the L7 engine (`skiff-l7`) — flags,
//! logging, the runtime, the config source, the waypoint's certificate and
//! shutdown.

use std::{net::{Ipv4Addr, SocketAddr}, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use skiff_l7::{Config, Proxy};
use tracing::info;

/// Skiff waypoint: the L7 proxy for namespaces and Services that ask for one.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Waypoint name (what `istio.io/use-waypoint` names).
    #[arg(long)]
    name: String,
    /// The waypoint's namespace (its identity's namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: String,
    /// The waypoint's service account.
    #[arg(long, default_value = "default")]
    service_account: String,
    /// The pod's IP: HBONE is served on it, port 15008.
    #[arg(long, env = "POD_IP")]
    pod_ip: Ipv4Addr,
    /// Directory of Kubernetes manifests describing the cluster. Exactly
    /// one of --manifests, --kube, --kube-url.
    #[arg(long, env = "SKIFF_MANIFESTS")]
    manifests: Option<PathBuf>,
    /// Read the cluster from the Kubernetes API (in-cluster config, else
    /// KUBECONFIG).
    #[arg(long)]
    kube: bool,
    /// Read the cluster from the Kubernetes API at this URL.
    #[arg(long, env = "SKIFF_KUBE_URL", value_name = "URL")]
    kube_url: Option<String>,
    /// The mesh CA directory (local mode; unused with --signer-url).
    #[arg(long, env = "SKIFF_CA_DIR", required_unless_present = "signer_url")]
    ca_dir: Option<PathBuf>,
    #[command(flatten)]
    signer: skiff_hbone::certs::SignerArgs,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Lifetime of the waypoint's certificate; rotated at half-life.
    #[arg(long, default_value = "86400", value_name = "SECONDS")]
    cert_lifetime: u64,
    /// Prometheus metrics address.
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[arg(long, default_value = "5", value_name = "SECONDS")]
    drain_timeout: u64,
    #[command(flatten)]
    hbone: skiff_hbone::limits::HboneLimits,
    #[command(flatten)]
    http: skiff_l7::server::HttpLimits,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SKIFF_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    skiff_core::raise_open_file_limit_logged();
    let cli = Cli::parse();
    let source = skiff_kube_source::SourceChoice::from_args(cli.manifests.clone(), cli.kube, cli.kube_url.clone())?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let source = source.open().map_err(|e| anyhow::anyhow!("opening the config source: {}", skiff_core::report(&e)))?;
        let cluster = skiff_kube_source::watch_cluster(source).await?;
        let ca_dir = cli.ca_dir.clone().unwrap_or_else(|| PathBuf::from("/var/lib/skiff/ca"));
        skiff_hbone::sock::set_outbound_timeouts(cli.hbone.keepalive_interval, cli.hbone.tcp_user_timeout);
        let certs = skiff_hbone::certs::CertManager::from_args(&cli.signer, &ca_dir, &cli.trust_domain, Duration::from_secs(cli.cert_lifetime))?;
        // Renew the waypoint's certificate in the background (signer
        // requests block: off the async workers).
        let own = skiff_hbone::identity::Identity::new(certs.trust_domain(), &cli.namespace, &cli.service_account);
        certs.spawn_refresh(move || vec![own.clone()]);
        let cfg = Config { name: cli.name.clone(), namespace: cli.namespace, service_account: cli.service_account, hbone: cli.hbone, http: cli.http };
        let wp = Proxy::new(cfg, cluster, certs);
        let hbone = tokio::net::TcpListener::bind((cli.pod_ip, 15008)).await.with_context(|| format!("binding {}:15008", cli.pod_ip))?;
        let metrics = tokio::net::TcpListener::bind(cli.metrics_addr).await.with_context(|| format!("binding {}", cli.metrics_addr))?;
        tokio::spawn(skiff_l7::metrics::serve(metrics, wp.metrics.clone()));
        info!(name = %cli.name, ip = %cli.pod_ip, "waypoint serving HBONE on 15008");
        let mut serve = tokio::spawn(Arc::clone(&wp).serve(hbone));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = &mut serve => return Ok(r??),
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        // Stop accepting, GOAWAY every connection, let what is in flight
        // finish up to the deadline.
        info!(open_streams = wp.drain.active(), "draining: listener closed, GOAWAY sent, waiting for requests in flight");
        let left = wp.drain.drain(Duration::from_secs(cli.drain_timeout)).await;
        // Still starting up (waiting for its certificate) at worst.
        serve.abort();
        info!(closed_by_deadline = left, "drained; exiting");
        Ok(())
    })
}
