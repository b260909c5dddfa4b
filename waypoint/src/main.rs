//! `skiff-waypoint`: the process around the L7 engine (`skiff-l7`) for
//! namespaces and Services that ask for a waypoint: HBONE from client
//! ztunnels on the pod's IP, port 15008.

use std::{net::Ipv4Addr, sync::Arc};

use anyhow::Context as _;
use clap::Parser;
use tracing::info;

/// Skiff waypoint: the L7 proxy for namespaces and Services that ask for one.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Waypoint name (what `istio.io/use-waypoint` names).
    #[arg(long)]
    name: String,
    /// The waypoint's service account.
    #[arg(long, default_value = "default")]
    service_account: String,
    /// The pod's IP: HBONE is served on it, port 15008.
    #[arg(long, env = "POD_IP")]
    pod_ip: Ipv4Addr,
    /// Read the Secrets of the waypoint's namespace, for DestinationRules
    /// whose `tls.credentialName` names one (TLS origination). Off by
    /// default: it needs RBAC to read every Secret of the namespace.
    #[arg(long, env = "SKIFF_READ_SECRETS")]
    read_secrets: bool,
    #[command(flatten)]
    proxy: skiff_waypoint::ProxyArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    skiff_waypoint::init_logging(cli.proxy.log_format);
    let (name, ip) = (cli.name.clone(), cli.pod_ip);
    skiff_waypoint::run(cli.proxy, cli.name, cli.service_account, std::env::var("POD_NAME").ok(), cli.read_secrets, true, move |wp| async move {
        let hbone = tokio::net::TcpListener::bind((ip, 15008)).await.with_context(|| format!("binding {ip}:15008"))?;
        info!(%name, %ip, "waypoint serving HBONE on 15008");
        Ok(Arc::clone(&wp).serve(hbone).await?)
    })
}
