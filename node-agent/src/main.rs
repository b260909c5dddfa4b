use std::{fs::File, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use skiff_node_agent::{
    agent::{stop_flag, Agent, AgentConfig},
    bpf, cni,
};

/// Skiff node-agent: eBPF capture and pod enrollment for one node.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log lines as `text` or `json` (one object per line); filter with
    /// SKIFF_LOG.
    #[arg(long, env = "SKIFF_LOG_FORMAT", default_value = "text", global = true)]
    log_format: skiff_core::logging::LogFormat,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once; boxing would only add noise
enum Cmd {
    /// Attach capture and enroll pods until SIGTERM (capture stays attached).
    Run {
        /// This node's name: pods with this `spec.nodeName` are handled here.
        #[arg(long, env = "SKIFF_NODE_NAME")]
        node: String,
        /// Where the cluster is read from (only this node's pods are watched).
        #[command(flatten)]
        source: skiff_kube_source::SourceArgs,
        /// cgroup v2 directory to attach under (default: the cgroup2 root).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// bpffs directory for pinned maps and links.
        #[arg(long, default_value = "/sys/fs/bpf/skiff")]
        pin_dir: PathBuf,
        /// ztunnel's node-agent socket.
        #[arg(long, default_value = "/var/run/skiff/ztunnel.sock")]
        ztunnel_socket: PathBuf,
        #[command(flatten)]
        cni: cni::CniArgs,
        /// Readiness (`/healthz/ready`: 200 once capture is installed and the
        /// first reconcile is done) and Prometheus metrics (`/metrics`).
        #[arg(long, default_value = "0.0.0.0:15022")]
        readiness_addr: std::net::SocketAddr,
        /// Captured connections whose handshake with ztunnel's in-pod
        /// listener may be in progress at once on this node (the size of the
        /// one shared capture map; beyond it a new connection gets no
        /// destination and ztunnel closes it). Applies when the map is
        /// created: a pinned map keeps its size until `uninstall`.
        #[arg(long, default_value_t = skiff_ebpf_common::DEFAULT_HANDSHAKES, value_parser = clap::value_parser!(u32).range(1024..))]
        max_captured_handshakes: u32,
        /// The same, per pod: its connects beyond this fail with EPERM
        /// (counted, logged with the pod's name); other pods are unaffected.
        #[arg(long, default_value_t = skiff_ebpf_common::DEFAULT_POD_HANDSHAKES, value_parser = clap::value_parser!(u64).range(1..))]
        max_pod_captured_handshakes: u64,
        /// A captured connection whose handshake with ztunnel's listener has
        /// not completed after this long (the client's SYN and the
        /// listener's SYN-ACK retries are long over) loses its entry, and its
        /// pod the slot (checked every 10 s).
        #[arg(long, default_value = "180", value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(10..))]
        captured_handshake_timeout: u64,
        /// Enrolled pods this node can hold (the size of the per-pod capture
        /// maps; beyond it a pod's enrollment, and so its CNI ADD, fails).
        /// Applies when the maps are created.
        #[arg(long, default_value_t = skiff_ebpf_common::MAX_PODS, value_parser = clap::value_parser!(u32).range(16..))]
        max_pods: u32,
        /// Sockets ztunnel made in pods and registered as its own, kept at
        /// once (least recently registered first out; a registration is
        /// needed only until its socket binds or connects). Applies when the
        /// map is created.
        #[arg(long, default_value_t = skiff_ebpf_common::DEFAULT_MESH_SOCKETS, value_parser = clap::value_parser!(u32).range(1024..))]
        max_mesh_sockets: u32,
    },
    /// Load every capture program into this kernel (verify, never attach
    /// or pin) and print each verdict as a JSON line; exit 1 if any fails.
    Preflight,
    /// Print the pinned capture state (enrolled netns, links, counters) as JSON.
    Inspect {
        #[arg(long, default_value = "/sys/fs/bpf/skiff")]
        pin_dir: PathBuf,
    },
    /// Take skiff-cni out of the CNI chain, detach every program and remove every pin: capture stops.
    Uninstall {
        #[arg(long, default_value = "/sys/fs/bpf/skiff")]
        pin_dir: PathBuf,
        #[command(flatten)]
        cni: cni::CniPaths,
        /// Where the runtime names pod netns: iptables capture rules are
        /// removed from each (pods in netns not named here keep them).
        #[arg(long, default_value = "/var/run/netns")]
        netns_dir: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    skiff_core::logging::init(cli.log_format, "info");
    skiff_core::raise_open_file_limit_logged();
    match cli.cmd {
        Cmd::Run {
            node,
            source,
            cgroup,
            pin_dir,
            ztunnel_socket,
            cni,
            readiness_addr,
            max_captured_handshakes,
            max_pod_captured_handshakes,
            captured_handshake_timeout,
            max_pods,
            max_mesh_sockets,
        } => {
            if max_pod_captured_handshakes >= u64::from(max_captured_handshakes) {
                anyhow::bail!(
                    "--max-pod-captured-handshakes ({max_pod_captured_handshakes}) must be below --max-captured-handshakes ({max_captured_handshakes}): one pod could fill the node's map"
                );
            }
            // Checked before capture is installed: a wrong command line
            // changes nothing on the node.
            let mut source = source
                .choice()?
                .pods_on_node(&node)
                .open()
                .map_err(|e| anyhow::anyhow!("opening the config source: {}", skiff_core::report(&e)))?;
            let cgroup = match cgroup {
                Some(c) => c,
                None => skiff_node_agent::cgroup2_root().context("no cgroup2 mount found in /proc/self/mountinfo")?,
            };
            let cgroup_fd =
                File::open(&cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
            let limits = bpf::CaptureLimits {
                node: max_captured_handshakes,
                per_pod: max_pod_captured_handshakes,
                handshake_timeout: Duration::from_secs(captured_handshake_timeout),
                pods: max_pods,
                mesh_sockets: max_mesh_sockets,
            };
            let capture = bpf::Capture::install(&pin_dir, std::os::fd::AsFd::as_fd(&cgroup_fd), limits)
                .map_err(report)
                .with_context(|| format!("installing capture under cgroup {}", cgroup.display()))?;
            tracing::info!(node = %node, cgroup = %cgroup.display(), pin_dir = %pin_dir.display(), "capture installed");
            let stop = stop_flag();
            let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let metrics = std::sync::Arc::new(skiff_node_agent::agent::AgentMetrics::default());
            let page = {
                let (metrics, pin_dir) = (metrics.clone(), pin_dir.clone());
                std::sync::Arc::new(move || skiff_node_agent::ready::exposition(&metrics, &pin_dir))
            };
            skiff_node_agent::ready::serve(readiness_addr, ready.clone(), page)
                .with_context(|| format!("readiness and metrics endpoint on {readiness_addr}"))?;
            let started = cni::start(&cni, stop.clone()).map_err(report)?;
            let cfg = AgentConfig { node, ztunnel_socket, ztunnel_timeout: Duration::from_secs(10) };
            let mut agent = Agent::new(cfg, capture, started.locator).with_cni(started.link).with_ready(ready).with_metrics(metrics);
            agent.run(source.as_mut(), &stop);
            Ok(())
        }
        Cmd::Preflight => {
            let verdicts = bpf::preflight();
            for v in &verdicts {
                println!("{}", serde_json::to_string(v)?);
            }
            if verdicts.iter().any(|v| v.error.is_some()) {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Inspect { pin_dir } => {
            let state = bpf::inspect(&pin_dir).map_err(report)?;
            println!("{}", serde_json::to_string_pretty(&state)?);
            Ok(())
        }
        Cmd::Uninstall { pin_dir, cni, netns_dir } => {
            // The CNI chain first: new pods must not wait for a node-agent
            // that is going away.
            for f in cni::uninstall(&cni.cni_bin_dir, &cni.cni_conf_dir, &cni.cni_state_file).map_err(report)? {
                tracing::info!(file = %f.display(), "CNI: restored or removed");
            }
            // iptables-captured pods: their nat rules would keep pointing at
            // a ztunnel that is going away.
            match skiff_node_agent::podnet::iptables::remove_from_netns_dir(&netns_dir) {
                Ok(done) => {
                    for (ns, res) in done {
                        match res {
                            Ok(true) => tracing::info!(netns = %ns.display(), "iptables capture removed"),
                            Ok(false) => {}
                            Err(e) => tracing::error!(netns = %ns.display(), error = %e, "cannot remove iptables capture; the pod keeps it until it is recreated"),
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::error!(dir = %netns_dir.display(), error = %e, "cannot list pod netns; iptables-captured pods keep their rules until recreated"),
            }
            bpf::uninstall(&pin_dir).map_err(report)?;
            tracing::info!(pin_dir = %pin_dir.display(), "capture removed");
            Ok(())
        }
    }
}

/// The whole error chain in one message.
fn report(e: impl std::error::Error + Send + Sync + 'static) -> anyhow::Error {
    anyhow::Error::new(e)
}
