//! `skiff-gateway`: the mesh's ingress gateway. It opens the servers of
//! the Istio `Gateway`s whose selector matches its pod's labels (HTTP
//! today), routes each request by the VirtualServices bound to that
//! Gateway through the L7 engine the waypoint uses (`skiff-l7`), and sends
//! it on over HBONE with its own identity, so every hop from the edge to a
//! mesh workload is mutual TLS. It is never captured itself (its pods are
//! labelled `istio.io/dataplane-mode: none`).

use std::sync::{atomic::AtomicBool, Arc};

use anyhow::Context as _;
use clap::Parser;

/// Skiff ingress gateway: Istio Gateways and the VirtualServices bound to them.
#[derive(Parser)]
#[command(name = "skiff-gateway", version)]
struct Cli {
    /// The gateway's workload name (its Deployment's), as metrics name it
    /// (`source_workload`).
    #[arg(long, default_value = "istio-ingressgateway")]
    name: String,
    /// The gateway's service account: its identity, which backends and
    /// their AuthorizationPolicies see.
    #[arg(long, default_value = "istio-ingressgateway")]
    service_account: String,
    /// The gateway's pod name: Gateways select it by its labels.
    #[arg(long, env = "POD_NAME")]
    pod_name: String,
    /// Downstream connections held open at once (all listeners); past it
    /// a new connection is closed at once and counted.
    #[arg(long = "max-connections", id = "gateway_max_connections", default_value_t = skiff_l7::gateway::MAX_CONNECTIONS, value_name = "N")]
    max_connections: usize,
    /// Readiness address: `/healthz/ready` answers 200 once the gateway has
    /// its certificate and every port its Gateways ask for is open.
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_addr: std::net::SocketAddr,
    #[command(flatten)]
    proxy: skiff_waypoint::ProxyArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    skiff_waypoint::init_logging(cli.proxy.log_format);
    let (max, readiness_addr) = (cli.max_connections.max(1), cli.readiness_addr);
    let header_timeout = cli.proxy.http.header_read_timeout;
    skiff_waypoint::run(cli.proxy, cli.name, cli.service_account, Some(cli.pod_name), true, false, move |gw| async move {
        let ready = Arc::new(AtomicBool::new(false));
        let listener = tokio::net::TcpListener::bind(readiness_addr).await.with_context(|| format!("binding {readiness_addr}"))?;
        tokio::spawn(skiff_l7::gateway::serve_readiness(listener, ready.clone(), header_timeout));
        Ok(skiff_l7::gateway::serve(gw, max, ready).await?)
    })
}
