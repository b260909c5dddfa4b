//! `skiff-localmesh`: run a local mesh from a manifests directory.
//!
//! - `demo [--manifests DIR]`: bring the mesh up, run the demo traffic, tear
//!   down. With `--manifests`, keep the mesh up until Ctrl-C instead.
//! - `up --manifests DIR`: bring it up and keep it until Ctrl-C.

use std::{
    path::PathBuf,
    sync::{atomic::AtomicBool, Arc},
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use skiff_localmesh::{demo, LocalMesh, MeshOptions};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log lines as `text` or `json` (one object per line); filter with
    /// SKIFF_LOG.
    #[arg(long, env = "SKIFF_LOG_FORMAT", default_value = "text", global = true)]
    log_format: skiff_core::logging::LogFormat,

    /// Number of nodes.
    #[arg(long, global = true, default_value_t = 2)]
    nodes: usize,
    /// Where skiff-node-agent, skiff-ztunnel and skiff-demo-app are
    /// (default: the directory of this binary).
    #[arg(long, global = true)]
    bin_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the example app and show what was captured.
    Demo {
        /// Run your own manifests instead, and keep the mesh up until Ctrl-C.
        #[arg(long)]
        manifests: Option<PathBuf>,
        /// The example manifests.
        #[arg(long, default_value = "examples/two-tier")]
        example: PathBuf,
    },
    /// Bring a mesh up from a manifests directory and keep it until Ctrl-C.
    Up {
        #[arg(long)]
        manifests: PathBuf,
    },
    /// Benchmarks (figures, not assertions).
    Bench {
        /// Which benchmark: `hbone` (direct vs ztunnel plain vs ztunnel
        /// HBONE), `waypoint` (HTTP: direct vs ambient L4 vs waypoint),
        /// `gateway` (HTTPS: direct vs Skiff's ingress gateway vs Envoy as
        /// the same gateway) or `compare`.
        which: String,
        /// Seconds instead of minutes: checks the harness works.
        #[arg(long)]
        quick: bool,
        /// Manifests (default: examples/bench, or examples/bench-l7 for `waypoint`).
        #[arg(long)]
        manifests: Option<PathBuf>,
        /// The oha load generator (`waypoint`).
        #[arg(long, default_value = "oha")]
        oha: PathBuf,
        /// Write the figures as JSON here (`compare`: a directory for
        /// compare.json, compare.md and compare.svg).
        #[arg(long)]
        out: Option<PathBuf>,
        /// `compare`, `gateway`: the Envoy binary (sidecars; the gateway).
        #[arg(long, default_value = "envoy")]
        envoy: PathBuf,
        /// `compare`: modes to run, comma-separated (M0,M1,M2,M3,M2-ipt; M0 always runs).
        #[arg(long, value_delimiter = ',')]
        modes: Vec<String>,
        /// `compare`: repetitions (default 5; 1 with --quick).
        #[arg(long)]
        repetitions: Option<usize>,
        /// `compare`: fixed HTTP rate, req/s (default 1000).
        #[arg(long)]
        rate: Option<u32>,
        /// `compare`: seconds per fixed-rate run (default 10).
        #[arg(long)]
        seconds: Option<u32>,
        /// `compare`: server pod counts of the memory phase (default 1,8,32; empty to skip).
        #[arg(long, value_delimiter = ',')]
        scale: Option<Vec<usize>>,
        /// `compare`: seed of the shuffled mode order.
        #[arg(long)]
        seed: Option<u64>,
    },
}

fn wait_for_interrupt(mesh: &LocalMesh, stop: &AtomicBool) -> anyhow::Result<()> {
    println!("\nThe mesh is up (run {}). Logs: {}/logs", mesh.run_id, mesh.work_dir.display());
    println!("Run a shell inside a pod (its netns and cgroup, so capture applies as to the pod's own processes):");
    for p in &mesh.pods {
        println!(
            "  {}/{}: sh -c 'echo $$ > {}/cgroup.procs && exec ip netns exec {} sh'",
            p.namespace,
            p.name,
            p.cgroup.display(),
            p.netns
        );
    }
    for n in &mesh.nodes {
        println!("  {} metrics: ip netns exec {} curl -s localhost:15020/metrics", n.name, n.netns);
    }
    let skiff = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("skiff"))).filter(|p| p.exists());
    if let Some(skiff) = skiff {
        let w = mesh.work_dir.display();
        println!("Operate it with skiff (as root; --mesh {w} when several run):");
        println!("  {} check                       # every node's capture, ztunnel, pods, certificates", skiff.display());
        println!("  {} explain --from NS/POD --to SERVICE.NS:PORT   # every decision, and why", skiff.display());
        println!("  {} observe                     # live connection and request events", skiff.display());
        println!("  {} dashboard                   # the service graph at http://127.0.0.1:15080/", skiff.display());
        println!("  {} config workloads|policies|certs|services|routes", skiff.display());
    }
    println!("Press Ctrl-C to tear it down.");
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    skiff_core::logging::init(cli.log_format, "warn");
    let bin_dir = match cli.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()?.parent().context("binary without a directory")?.to_owned(),
    };
    let (manifests, keep) = match cli.cmd {
        Cmd::Demo { manifests: Some(m), .. } => (m, true),
        Cmd::Demo { manifests: None, example } => (example, false),
        Cmd::Up { manifests } => (manifests, true),
        Cmd::Bench { which, quick, manifests, out, oha, envoy, modes, repetitions, rate, seconds, scale, seed } => {
            if which == "compare" {
                use skiff_localmesh::compare::{self, Mode};
                let out = out.unwrap_or_else(|| "target/bench/compare".into());
                let mut o = if quick {
                    compare::CompareOptions::quick(bin_dir, envoy, oha, out)
                } else {
                    compare::CompareOptions::full(bin_dir, envoy, oha, out)
                };
                if !modes.is_empty() {
                    let mut ms = vec![Mode::M0];
                    for m in &modes {
                        let m = Mode::parse(m).with_context(|| format!("unknown mode {m:?} (M0, M1, M2, M3, M2-ipt)"))?;
                        if !ms.contains(&m) {
                            ms.push(m);
                        }
                    }
                    o.modes = ms;
                }
                o.repetitions = repetitions.unwrap_or(o.repetitions).max(1);
                o.rate = rate.unwrap_or(o.rate);
                o.seconds = seconds.unwrap_or(o.seconds);
                if let Some(s) = scale {
                    o.scale = s.into_iter().filter(|&n| n > 0).collect();
                }
                o.seed = seed.unwrap_or(o.seed);
                compare::compare(&o)?;
                return Ok(());
            }
            if which == "waypoint" {
                let o = skiff_localmesh::bench::L7BenchOptions {
                    manifests: manifests.unwrap_or_else(|| "examples/bench-l7".into()),
                    bin_dir,
                    oha,
                    rate: if quick { 200 } else { 1000 },
                    connections: 4,
                    seconds: if quick { 2 } else { 10 },
                    repetitions: if quick { 1 } else { 3 },
                    out,
                };
                skiff_localmesh::bench::waypoint(&o)?;
                return Ok(());
            }
            if which == "gateway" {
                let o = skiff_localmesh::bench::GatewayBenchOptions {
                    l7: skiff_localmesh::bench::L7BenchOptions {
                        manifests: manifests.unwrap_or_else(|| "examples/bench-gateway".into()),
                        bin_dir,
                        oha,
                        rate: rate.unwrap_or(if quick { 200 } else { 1000 }),
                        connections: 4,
                        seconds: seconds.unwrap_or(if quick { 2 } else { 10 }),
                        repetitions: repetitions.unwrap_or(if quick { 1 } else { 3 }),
                        out,
                    },
                    envoy,
                };
                skiff_localmesh::bench::gateway(&o)?;
                return Ok(());
            }
            if which != "hbone" {
                anyhow::bail!("unknown benchmark {which:?} (available: hbone, waypoint, gateway, compare)");
            }
            let manifests = manifests.unwrap_or_else(|| "examples/bench".into());
            let mut o = if quick {
                skiff_localmesh::bench::BenchOptions::quick(manifests, bin_dir)
            } else {
                skiff_localmesh::bench::BenchOptions::full(manifests, bin_dir)
            };
            o.out = out;
            skiff_localmesh::bench::hbone(&o)?;
            return Ok(());
        }
    };
    let mut opts = MeshOptions::new(manifests.clone(), bin_dir);
    opts.nodes = cli.nodes;
    // Ctrl-C at any point (even while the mesh is being built) ends in a
    // teardown, never in leftovers: the signal only sets a flag.
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    println!("Building a {}-node local mesh from {} ...", cli.nodes, manifests.display());
    let mesh = LocalMesh::up(&opts)?;
    if stop.load(std::sync::atomic::Ordering::Relaxed) {
        println!("interrupted; tearing down");
        return Ok(());
    }
    if keep {
        demo::print_topology(&mesh)?;
        wait_for_interrupt(&mesh, &stop)?;
        Ok(())
    } else {
        let result = demo::run(&mesh);
        if result.is_err() {
            mesh.dump_logs();
        }
        drop(mesh);
        result
    }
}
