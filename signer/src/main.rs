use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use skiff_signer::{Config, Signer};
use tracing::info;

/// Skiff signer: issues workload certificates to ztunnels, for the pods on
/// their own node only. Holds the mesh root key.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Log lines as `text` or `json` (one object per line); filter with
    /// SKIFF_LOG.
    #[arg(long, env = "SKIFF_LOG_FORMAT", default_value = "text")]
    log_format: skiff_core::logging::LogFormat,
    /// TLS listen address.
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// Prometheus metrics (`/metrics`, plain HTTP): certificates issued,
    /// requests refused by reason, time to answer.
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    /// The root key (PEM; a mounted Secret, readable by its owner only).
    #[arg(long, default_value = "/var/run/secrets/skiff-ca/ca-key.pem")]
    root_key: PathBuf,
    /// The root certificate (PEM).
    #[arg(long, default_value = "/var/run/secrets/skiff-ca/ca-cert.pem")]
    root_cert: PathBuf,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Names in the signer's TLS certificate (what ztunnel's --signer-name checks).
    #[arg(long = "dns-name", default_value = "skiff-ca.skiff-system.svc")]
    dns_names: Vec<String>,
    /// The only user that may ask (TokenReview username).
    #[arg(long, default_value = skiff_signer::ZTUNNEL_USER)]
    ztunnel_user: String,
    /// Audience the ztunnel tokens must carry.
    #[arg(long, default_value = "skiff-ca")]
    audience: String,
    /// Longest certificate lifetime handed out (60 s to 3650 days; shorter
    /// requests get at least 60 s).
    #[arg(long, default_value = "86400", value_name = "SECONDS")]
    max_lifetime: u64,
    /// The Kubernetes API at this URL instead of in-cluster config / KUBECONFIG.
    #[arg(long, value_name = "URL")]
    kube_url: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    skiff_core::logging::init(cli.log_format, "info");
    skiff_core::raise_open_file_limit_logged();
    let cfg = Config {
        trust_domain: cli.trust_domain.clone(),
        ztunnel_user: cli.ztunnel_user.clone(),
        audience: cli.audience.clone(),
        max_lifetime: Duration::from_secs(cli.max_lifetime),
        ..Config::default()
    };
    cfg.validate().map_err(|e| anyhow::anyhow!("--max-lifetime {}: {e}", cli.max_lifetime))?;
    let ca = skiff_hbone::identity::Ca::load(&cli.root_key, &cli.root_cert, &cli.trust_domain)
        .map_err(|e| anyhow::anyhow!("loading the root: {}", skiff_core::report(&e)))?;
    let tls = skiff_signer::tls_config(&ca, &cli.dns_names).map_err(|e| anyhow::anyhow!("TLS setup: {}", skiff_core::report(&e)))?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let kube = skiff_kube_source::connect(cli.kube_url.as_deref())
            .await
            .map_err(|e| anyhow::anyhow!("Kubernetes client: {}", skiff_core::report(&e)))?;
        let listener = tokio::net::TcpListener::bind(cli.listen).await.with_context(|| format!("binding {}", cli.listen))?;
        let metrics = tokio::net::TcpListener::bind(cli.metrics_addr).await.with_context(|| format!("binding {}", cli.metrics_addr))?;
        let at = |l: &tokio::net::TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        info!(listen = %at(&listener), metrics = %at(&metrics), "signer serving");
        let signer = Signer::new(cfg, ca, kube);
        tokio::spawn(signer.clone().serve_metrics(metrics));
        tokio::select! {
            r = signer.serve(listener, tls) => r.context("accepting connections")?,
            _ = tokio::signal::ctrl_c() => {}
        }
        Ok(())
    })
}
