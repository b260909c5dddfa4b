use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use skiff_ztunnel::{admin, proxy};
use tracing::info;

/// Skiff ztunnel: the per-node proxy for enrolled pods.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Log lines as `text` or `json` (one object per line); filter with
    /// SKIFF_LOG.
    #[arg(long, env = "SKIFF_LOG_FORMAT", default_value = "text")]
    log_format: skiff_core::logging::LogFormat,
    /// This node's name.
    #[arg(long, env = "SKIFF_NODE_NAME")]
    node: String,
    /// Where the cluster is read from.
    #[command(flatten)]
    source: skiff_kube_source::SourceArgs,
    /// Socket node-agent connects to.
    #[arg(long, default_value = "/var/run/skiff/ztunnel.sock")]
    zds_socket: PathBuf,
    /// node-agent's bpffs pin directory (inbound capture). Omit when capture
    /// is done by other means (iptables).
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    /// SPIFFE trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Directory of the local CA (root key and certificate; created on
    /// first run, key mode 0600).
    #[arg(long, default_value = "/var/lib/skiff/ca")]
    ca_dir: PathBuf,
    #[command(flatten)]
    signer: skiff_hbone::certs::SignerArgs,
    /// Lifetime of workload certificates; they rotate at half-life.
    #[arg(long, default_value = "86400", value_name = "SECONDS")]
    cert_lifetime: u64,
    /// Namespace whose PeerAuthentication and AuthorizationPolicy apply
    /// mesh-wide (Istio's root namespace).
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// Benchmarks only: carry mesh-to-mesh traffic as plain TCP instead of
    /// HBONE (turns mutual TLS off).
    #[arg(long, hide = true)]
    insecure_plaintext_mesh: bool,
    /// Plaintext from the node's own addresses (kubelet health probes):
    /// `allow` lets it reach enrolled pods past STRICT PeerAuthentication
    /// and AuthorizationPolicy (so probes keep working); `enforce` treats
    /// it like any other plaintext (probes of STRICT pods then fail).
    #[arg(long, default_value = "allow", value_parser = ["allow", "enforce"])]
    node_probes: String,
    /// Admin address: `/config_dump`, `/logging` (keep it on localhost).
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Prometheus metrics address.
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    /// Readiness address (`/healthz/ready`).
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_addr: SocketAddr,
    /// How long open connections may take to finish after SIGTERM.
    #[arg(long, default_value = "5", value_name = "SECONDS")]
    drain_timeout: u64,
    /// Metric series of workloads and Services that are gone are removed
    /// once unused for this long (after Prometheus scraped their last counts).
    #[arg(long, default_value = "300", value_name = "SECONDS", value_parser = skiff_hbone::limits::seconds)]
    metrics_series_grace: Duration,
    /// A client of the admin, metrics or readiness endpoint that has not
    /// sent its request headers within this long is dropped.
    #[arg(long, default_value = "5", value_name = "SECONDS", value_parser = skiff_hbone::limits::seconds)]
    admin_header_timeout: Duration,
    /// Istio's `outboundTrafficPolicy.mode` when the mesh config (ConfigMap
    /// `istio` in the root namespace) does not set it: ALLOW_ANY lets
    /// enrolled pods reach any address; REGISTRY_ONLY refuses an address
    /// that is neither a Service, a pod nor a ServiceEntry (counted, logged
    /// with flag NR and `dst.service=BlackHoleCluster`).
    #[arg(long, default_value = "ALLOW_ANY", value_parser = ["ALLOW_ANY", "REGISTRY_ONLY"])]
    outbound_traffic_policy: String,
    #[command(flatten)]
    hbone: skiff_hbone::limits::HboneLimits,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let log_reload = skiff_core::logging::init(cli.log_format, "info");
    skiff_core::raise_open_file_limit_logged();
    let source = cli.source.choice()?.mesh_config_in(&cli.root_namespace);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let source = source.open().map_err(|e| anyhow::anyhow!("opening the config source: {}", skiff_core::report(&e)))?;
        let cluster = skiff_kube_source::watch_cluster(source).await?;
        let lifetime = Duration::from_secs(cli.cert_lifetime);
        skiff_hbone::sock::set_outbound_timeouts(cli.hbone.keepalive_interval, cli.hbone.tcp_user_timeout);
        let certs = skiff_hbone::certs::CertManager::from_args(&cli.signer, &cli.ca_dir, &cli.trust_domain, lifetime)?;
        let cfg = proxy::Config {
            node: cli.node.clone(),
            root_namespace: cli.root_namespace,
            pin_dir: cli.pin_dir,
            plaintext_mesh: cli.insecure_plaintext_mesh,
            node_probes: cli.node_probes == "allow",
            hbone: cli.hbone,
            series_grace: cli.metrics_series_grace,
            admin_header_timeout: cli.admin_header_timeout,
            outbound_policy: skiff_core::egress::OutboundPolicy::parse(&cli.outbound_traffic_policy).expect("checked by clap"),
        };
        if cli.insecure_plaintext_mesh {
            tracing::warn!("--insecure-plaintext-mesh: mesh traffic is NOT encrypted (benchmark mode)");
        }
        let zt = proxy::Ztunnel::new(cfg, cluster, certs)?;
        zt.spawn_background();
        admin::serve_admin(zt.clone(), cli.admin_addr, log_reload)
            .await
            .with_context(|| format!("binding admin on {}", cli.admin_addr))?;
        admin::serve(zt.clone(), cli.metrics_addr, admin::Endpoint::Metrics)
            .await
            .with_context(|| format!("binding metrics on {}", cli.metrics_addr))?;
        admin::serve(zt.clone(), cli.readiness_addr, admin::Endpoint::Readiness)
            .await
            .with_context(|| format!("binding readiness on {}", cli.readiness_addr))?;
        let socket_inode = skiff_ztunnel::zds_server::spawn(zt.clone(), cli.zds_socket.clone(), tokio::runtime::Handle::current())
            .map_err(|e| anyhow::anyhow!(skiff_core::report(&e)))?;
        info!(node = %cli.node, metrics = %cli.metrics_addr, readiness = %cli.readiness_addr, "ztunnel started");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        info!(open = zt.drain.active(), "draining: listeners closed, waiting for open connections");
        zt.stop_listeners();
        let left = zt.drain.drain(Duration::from_secs(cli.drain_timeout)).await;
        info!(closed_by_deadline = left, "drained; exiting");
        if std::fs::metadata(&cli.zds_socket).is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == socket_inode) {
            let _ = std::fs::remove_file(&cli.zds_socket);
        }
        Ok(())
    })
}
