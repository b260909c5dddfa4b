//! `skiff-localmesh bench hbone`: what the tunnel costs. 1 KiB
//! request/response latency and single-stream throughput between two pods
//! on different nodes, for three paths:
//! - `direct`: pods not in the mesh;
//! - `ztunnel-plain`: through both ztunnels, plain TCP between them (mTLS
//!   off: prices the proxying alone);
//! - `hbone`: through both ztunnels over HBONE (mutual TLS, HTTP/2).
//!
//! Figures, not assertions. Clients run on CPU 0, servers on CPU 1, ztunnels
//! unpinned; every figure is the median of the repetitions.

use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Context as _};

use crate::{LocalMesh, MeshOptions};

/// Sizes of a run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub manifests: PathBuf,
    pub bin_dir: PathBuf,
    pub round_trips: usize,
    pub bulk_seconds: f64,
    pub repetitions: usize,
    pub out: Option<PathBuf>,
}

impl BenchOptions {
    pub fn full(manifests: PathBuf, bin_dir: PathBuf) -> Self {
        BenchOptions { manifests, bin_dir, round_trips: 20_000, bulk_seconds: 3.0, repetitions: 3, out: None }
    }

    /// Seconds, not minutes: proves the harness works.
    pub fn quick(manifests: PathBuf, bin_dir: PathBuf) -> Self {
        BenchOptions { manifests, bin_dir, round_trips: 300, bulk_seconds: 0.3, repetitions: 1, out: None }
    }
}

/// Medians of one path.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ModeResult {
    pub mode: &'static str,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub gbit_per_s: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

fn exec_json(mesh: &LocalMesh, ns: &str, argv: &[&str]) -> anyhow::Result<serde_json::Value> {
    let pod = mesh.pod(ns, "client");
    let mut full = vec!["taskset", "-c", "0"];
    full.extend_from_slice(argv);
    let out = mesh.exec(pod, &full, Duration::from_secs(600))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{}: {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))?;
    if let Some(e) = v.get("error") {
        bail!("{ns} client: {e}");
    }
    Ok(v)
}

fn measure(mesh: &LocalMesh, ns: &str, mode: &'static str, o: &BenchOptions) -> anyhow::Result<ModeResult> {
    let server = mesh.pod(ns, "server").ip;
    let rr = format!("{server}:7000");
    let bulk = format!("{server}:7001");
    // Wait for the servers.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while exec_json(mesh, ns, &["skiff-demo-app", "rr-client", "--target", &rr, "--count", "10", "--warmup", "0"]).is_err() {
        if std::time::Instant::now() > deadline {
            bail!("{mode}: server not answering");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (mut p50, mut p90, mut p99, mut gbps) = (vec![], vec![], vec![], vec![]);
    let count = o.round_trips.to_string();
    let secs = o.bulk_seconds.to_string();
    for _ in 0..o.repetitions {
        let v = exec_json(mesh, ns, &["skiff-demo-app", "rr-client", "--target", &rr, "--count", &count, "--warmup", "200"])?;
        p50.push(v["p50_us"].as_f64().unwrap_or(0.0));
        p90.push(v["p90_us"].as_f64().unwrap_or(0.0));
        p99.push(v["p99_us"].as_f64().unwrap_or(0.0));
        let v = exec_json(mesh, ns, &["skiff-demo-app", "bulk-client", "--target", &bulk, "--seconds", &secs])?;
        gbps.push(v["gbit_per_s"].as_f64().unwrap_or(0.0));
    }
    let r = ModeResult { mode, p50_us: median(p50), p90_us: median(p90), p99_us: median(p99), gbit_per_s: median(gbps) };
    eprintln!("  {mode}: p50 {:.0} µs, p99 {:.0} µs, {:.2} Gbit/s", r.p50_us, r.p99_us, r.gbit_per_s);
    Ok(r)
}

/// Runs the benchmark and prints a table; returns every figure.
pub fn hbone(o: &BenchOptions) -> anyhow::Result<Vec<ModeResult>> {
    let mut results = Vec::new();
    eprintln!("bench: mesh with HBONE (direct and hbone paths)");
    {
        let mesh = LocalMesh::up(&MeshOptions::new(&o.manifests, &o.bin_dir))?;
        results.push(measure(&mesh, "bench-direct", "direct", o)?);
        results.push(measure(&mesh, "bench-mesh", "hbone", o)?);
        let v = mesh.metric(0, "istio_tcp_connections_opened_total", &[("reporter", "source"), ("connection_security_policy", "mutual_tls")])?;
        if v < 1.0 {
            bail!("hbone path: ztunnel reported no mutual-TLS connection; the figures would be meaningless");
        }
    }
    eprintln!("bench: mesh with ztunnel plain TCP between nodes");
    {
        let mut opts = MeshOptions::new(&o.manifests, &o.bin_dir);
        opts.ztunnel_args = vec!["--insecure-plaintext-mesh".into()];
        let mesh = LocalMesh::up(&opts)?;
        results.insert(1, measure(&mesh, "bench-mesh", "ztunnel-plain", o)?);
        let v = mesh.metric(0, "istio_tcp_connections_opened_total", &[("reporter", "source"), ("connection_security_policy", "none")])?;
        if v < 1.0 {
            bail!("ztunnel-plain path: ztunnel reported no connection");
        }
    }
    let direct = results[0].clone();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!("\nHBONE benchmark — {} round trips of 1 KiB and {} s single-stream bulk, median of {} run(s)", o.round_trips, o.bulk_seconds, o.repetitions);
    println!("CPU placement: clients on CPU 0, servers on CPU 1, ztunnels and node-agents unpinned ({cpus} CPUs, kernel {})", kernel.trim());
    println!("| path | p50 µs | p90 µs | p99 µs | added p50 µs | added p99 µs | throughput Gbit/s |");
    println!("|---|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:+.0} | {:+.0} | {:.2} |",
            r.mode, r.p50_us, r.p90_us, r.p99_us, r.p50_us - direct.p50_us, r.p99_us - direct.p99_us, r.gbit_per_s
        );
    }
    if let Some(out) = &o.out {
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(out, serde_json::to_string_pretty(&results)?)?;
        println!("figures written to {}", out.display());
    }
    Ok(results)
}
