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
    /// The relay floor's manifests (examples/bench-floor).
    pub floor_manifests: PathBuf,
    pub bin_dir: PathBuf,
    pub round_trips: usize,
    pub bulk_seconds: f64,
    pub repetitions: usize,
    pub out: Option<PathBuf>,
}

impl BenchOptions {
    pub fn full(manifests: PathBuf, bin_dir: PathBuf) -> Self {
        BenchOptions { floor_manifests: floor_of(&manifests), manifests, bin_dir, round_trips: 20_000, bulk_seconds: 3.0, repetitions: 3, out: None }
    }

    /// Seconds, not minutes: proves the harness works.
    pub fn quick(manifests: PathBuf, bin_dir: PathBuf) -> Self {
        BenchOptions { floor_manifests: floor_of(&manifests), manifests, bin_dir, round_trips: 300, bulk_seconds: 0.3, repetitions: 1, out: None }
    }
}

/// examples/bench-floor beside examples/bench (the manifests' directory).
fn floor_of(manifests: &std::path::Path) -> PathBuf {
    manifests.parent().map_or_else(|| PathBuf::from("examples/bench-floor"), |p| p.join("bench-floor"))
}

/// Medians of one path.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ModeResult {
    pub mode: &'static str,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub gbit_per_s: f64,
    /// CPU of each of the two proxies (ztunnels, relays) per 1000 round
    /// trips of the closed-loop run, in ms; none on the direct path.
    pub proxy_cpu_ms_per_1000: Option<f64>,
}

/// Writes a benchmark's figures as JSON when asked to.
fn write_figures<T: serde::Serialize>(out: Option<&std::path::Path>, results: &T) -> anyhow::Result<()> {
    let Some(out) = out else { return Ok(()) };
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(results)?)?;
    println!("figures written to {}", out.display());
    Ok(())
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

/// Where a mode's client sends, and the CPU seconds its proxies have used.
struct Path<'a> {
    rr: String,
    bulk: String,
    proxy_cpu: Box<dyn Fn() -> f64 + 'a>,
}

impl<'a> Path<'a> {
    /// To the server pod of `ns`, through whatever the mesh puts on the way
    /// (ztunnels when `ns` is enrolled: their CPU counted).
    fn to_server(mesh: &'a LocalMesh, ns: &str, ztunnels: bool) -> Path<'a> {
        let server = mesh.pod(ns, "server").ip;
        let proxy_cpu: Box<dyn Fn() -> f64> = if ztunnels {
            Box::new(|| (0..mesh.nodes.len()).filter_map(|i| mesh.ztunnel_pid(i)).map(crate::compare::pid_cpu).sum())
        } else {
            Box::new(|| 0.0)
        };
        Path { rr: format!("{server}:7000"), bulk: format!("{server}:7001"), proxy_cpu }
    }
}

fn measure(mesh: &LocalMesh, ns: &str, mode: &'static str, path: &Path<'_>, o: &BenchOptions) -> anyhow::Result<ModeResult> {
    let (rr, bulk) = (&path.rr, &path.bulk);
    // Wait for the servers.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while exec_json(mesh, ns, &["skiff-demo-app", "rr-client", "--target", rr, "--count", "10", "--warmup", "0"]).is_err() {
        if std::time::Instant::now() > deadline {
            bail!("{mode}: server not answering");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (mut p50, mut p90, mut p99, mut gbps, mut cpu) = (vec![], vec![], vec![], vec![], vec![]);
    let count = o.round_trips.to_string();
    let secs = o.bulk_seconds.to_string();
    for _ in 0..o.repetitions {
        let cpu0 = (path.proxy_cpu)();
        let v = exec_json(mesh, ns, &["skiff-demo-app", "rr-client", "--target", rr, "--count", &count, "--warmup", "200"])?;
        // Both proxies' CPU over the round trips (and their warm-up), per
        // proxy per 1000.
        cpu.push(((path.proxy_cpu)() - cpu0) * 1000.0 / 2.0 / ((o.round_trips + 200) as f64 / 1000.0));
        p50.push(v["p50_us"].as_f64().unwrap_or(0.0));
        p90.push(v["p90_us"].as_f64().unwrap_or(0.0));
        p99.push(v["p99_us"].as_f64().unwrap_or(0.0));
        let v = exec_json(mesh, ns, &["skiff-demo-app", "bulk-client", "--target", bulk, "--seconds", &secs])?;
        gbps.push(v["gbit_per_s"].as_f64().unwrap_or(0.0));
    }
    let cpu = median(cpu);
    let r = ModeResult { mode, p50_us: median(p50), p90_us: median(p90), p99_us: median(p99), gbit_per_s: median(gbps), proxy_cpu_ms_per_1000: (cpu > 0.0).then_some(cpu) };
    eprintln!("  {mode}: p50 {:.0} µs, p99 {:.0} µs, {:.2} Gbit/s", r.p50_us, r.p99_us, r.gbit_per_s);
    Ok(r)
}

/// Runs the benchmark and prints a table; returns every figure.
pub fn hbone(o: &BenchOptions) -> anyhow::Result<Vec<ModeResult>> {
    let mut results = Vec::new();
    eprintln!("bench: mesh with HBONE (direct and hbone paths)");
    {
        let mesh = LocalMesh::up(&MeshOptions::new(&o.manifests, &o.bin_dir))?;
        results.push(measure(&mesh, "bench-direct", "direct", &Path::to_server(&mesh, "bench-direct", false), o)?);
        results.push(measure(&mesh, "bench-mesh", "hbone", &Path::to_server(&mesh, "bench-mesh", true), o)?);
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
        results.insert(1, measure(&mesh, "bench-mesh", "ztunnel-plain", &Path::to_server(&mesh, "bench-mesh", true), o)?);
        let v = mesh.metric(0, "istio_tcp_connections_opened_total", &[("reporter", "source"), ("connection_security_policy", "none")])?;
        if v < 1.0 {
            bail!("ztunnel-plain path: ztunnel reported no connection");
        }
    }
    eprintln!("bench: the relay floor (a bare mutual-TLS relay pair where the ztunnels run)");
    {
        let mesh = LocalMesh::up(&MeshOptions::new(&o.floor_manifests, &o.bin_dir))?;
        // The relays' routes name the nodes' addresses (see the manifests).
        for (i, want) in [(0usize, "172.18.0.11"), (1, "172.18.0.12")] {
            let got = mesh.nodes.get(i).map(|n| n.ip.to_string()).unwrap_or_default();
            if got != want {
                bail!("relay floor: node {} has address {got}, the relays' routes in {} expect {want}", i + 1, o.floor_manifests.display());
            }
        }
        let server = mesh.pod("bench-floor", "server").ip.to_string();
        if server != "10.244.2.10" {
            bail!("relay floor: the server pod has address {server}, relay-in's routes in {} expect 10.244.2.10", o.floor_manifests.display());
        }
        let (out, inn) = (mesh.pod("bench-floor", "relay-out"), mesh.pod("bench-floor", "relay-in"));
        let path = Path { rr: "172.18.0.11:17000".into(), bulk: "172.18.0.11:17001".into(), proxy_cpu: Box::new(move || pod_cpu_seconds(out) + pod_cpu_seconds(inn)) };
        let floor = measure(&mesh, "bench-floor", "relay floor", &path, o)?;
        results.push(floor);
    }
    let direct = results[0].clone();
    let floor = results.last().cloned().expect("the floor was measured");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!("\nHBONE benchmark — {} round trips of 1 KiB and {} s single-stream bulk, median of {} run(s)", o.round_trips, o.bulk_seconds, o.repetitions);
    println!("CPU placement: clients on CPU 0, servers on CPU 1, ztunnels and node-agents unpinned ({cpus} CPUs, kernel {})", kernel.trim());
    println!("Ratios are to the relay floor: a bare tokio + rustls mutual-TLS relay pair in the nodes' network namespaces (no policy, metrics or HTTP/2).");
    println!("| path | p50 µs | p90 µs | p99 µs | added p50 µs | added p99 µs | added p99 ÷ floor's | throughput Gbit/s | ÷ floor | CPU ms per 1000 round trips, each proxy | ÷ floor |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let ratio = |a: f64, b: f64| if b > 0.0 { format!("{:.2}", a / b) } else { "–".into() };
    for r in &results {
        let added_p99 = r.p99_us - direct.p99_us;
        let cpu = r.proxy_cpu_ms_per_1000.map_or("–".into(), |c| format!("{c:.0}"));
        let cpu_ratio = match (r.proxy_cpu_ms_per_1000, floor.proxy_cpu_ms_per_1000) {
            (Some(a), Some(b)) => ratio(a, b),
            _ => "–".into(),
        };
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:+.0} | {:+.0} | {} | {:.2} | {} | {cpu} | {cpu_ratio} |",
            r.mode,
            r.p50_us,
            r.p90_us,
            r.p99_us,
            r.p50_us - direct.p50_us,
            added_p99,
            if r.mode == "direct" { "–".into() } else { ratio(added_p99, floor.p99_us - direct.p99_us) },
            r.gbit_per_s,
            ratio(r.gbit_per_s, floor.gbit_per_s),
        );
    }
    write_figures(o.out.as_deref(), &results)?;
    Ok(results)
}

/// Sizes of the waypoint benchmark.
#[derive(Clone, Debug)]
pub struct L7BenchOptions {
    pub manifests: PathBuf,
    pub bin_dir: PathBuf,
    /// The `oha` load generator.
    pub oha: PathBuf,
    pub rate: u32,
    pub connections: u32,
    pub seconds: u32,
    pub repetitions: usize,
    pub out: Option<PathBuf>,
}

/// Medians of one path of the waypoint benchmark (latencies in µs).
#[derive(Clone, Debug, serde::Serialize)]
pub struct L7Result {
    pub mode: &'static str,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub achieved_rps: f64,
    pub target_rps: u32,
    /// Waypoint CPU time per 1000 requests (waypoint path only).
    pub waypoint_cpu_ms_per_1000: Option<f64>,
}

/// CPU seconds (user + system) of every process in a pod's cgroup.
fn pod_cpu_seconds(pod: &crate::PodRt) -> f64 {
    std::fs::read_to_string(pod.cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|pid| pid.trim().parse::<u32>().ok())
        .map(crate::compare::pid_cpu)
        .sum()
}

/// What one oha run measured.
struct OhaRun {
    p50: f64,
    p90: f64,
    p99: f64,
    rps: f64,
    /// Share of requests that got a response.
    success_rate: f64,
    /// Responses by status code.
    codes: serde_json::Value,
}

/// One oha run at the options' rate, from `client` (namespace, pod) to
/// `url`, latency corrected, with `extra` arguments before the URL.
fn oha_run(mesh: &LocalMesh, client: (&str, &str), url: &str, extra: &[&str], o: &L7BenchOptions) -> anyhow::Result<OhaRun> {
    let (z, q, c) = (format!("{}s", o.seconds), o.rate.to_string(), o.connections.to_string());
    let oha = o.oha.display().to_string();
    let mut argv: Vec<&str> = vec!["taskset", "-c", "0", &oha, "-z", &z, "-q", &q, "-c", &c, "--latency-correction", "--no-tui", "--output-format", "json"];
    argv.extend(extra);
    argv.push(url);
    let out = mesh.exec(mesh.pod(client.0, client.1), &argv, Duration::from_secs(o.seconds as u64 + 120))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("oha output: {} {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))?;
    let pct = |k: &str| v["latencyPercentiles"][k].as_f64().unwrap_or(0.0) * 1e6;
    Ok(OhaRun {
        p50: pct("p50"),
        p90: pct("p90"),
        p99: pct("p99"),
        rps: v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        success_rate: v["summary"]["successRate"].as_f64().unwrap_or(0.0),
        codes: v["statusCodeDistribution"].clone(),
    })
}

fn oha(mesh: &LocalMesh, ns: &str, o: &L7BenchOptions) -> anyhow::Result<(f64, f64, f64, f64)> {
    let r = oha_run(mesh, (ns, "client"), &format!("http://server.{ns}:8080/"), &[], o)?;
    if r.success_rate < 0.999 {
        bail!("{ns}: only {:.1}% of requests succeeded", r.success_rate * 100.0);
    }
    Ok((r.p50, r.p90, r.p99, r.rps))
}

/// Each path's medians over the runs (`figures`, by path, in `modes`'
/// order).
fn summarize(modes: &[&'static str], figures: &Figures, target_rps: u32) -> Vec<L7Result> {
    modes
        .iter()
        .map(|mode| {
            let f = &figures[mode];
            L7Result {
                mode,
                p50_us: median(f.iter().map(|x| x.0).collect()),
                p90_us: median(f.iter().map(|x| x.1).collect()),
                p99_us: median(f.iter().map(|x| x.2).collect()),
                achieved_rps: median(f.iter().map(|x| x.3).collect()),
                target_rps,
                waypoint_cpu_ms_per_1000: f[0].4.map(|_| median(f.iter().filter_map(|x| x.4).collect())),
            }
        })
        .collect()
}

/// The results as a markdown table, latencies also as added to the first
/// path's; `cpu` names the last column (whose proxy's CPU it is). A path
/// below 99% of its target rate is marked.
fn print_table(results: &[L7Result], cpu: &str) {
    let d = &results[0];
    println!("| path | p50 µs | p90 µs | p99 µs | added p50 | added p90 | added p99 | achieved req/s | {cpu} CPU ms / 1000 req |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in results {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:+.0} | {:+.0} | {:+.0} | {:.0} | {} |",
            r.mode,
            r.p50_us,
            r.p90_us,
            r.p99_us,
            r.p50_us - d.p50_us,
            r.p90_us - d.p90_us,
            r.p99_us - d.p99_us,
            r.achieved_rps,
            r.waypoint_cpu_ms_per_1000.map(|c| format!("{c:.1}")).unwrap_or_else(|| "-".into())
        );
        if r.achieved_rps < r.target_rps as f64 * 0.99 {
            println!("  note: {} reached {:.0} of {} req/s: below 99% of the target, its latencies are not comparable", r.mode, r.achieved_rps, r.target_rps);
        }
    }
}

/// The tracing of the traced waypoint path: the mesh config's OTLP
/// provider (the bench's collector) and a Telemetry sampling every new
/// trace at the waypoint.
const BENCH_TRACING: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\ndata:\n  mesh: |\n    extensionProviders:\n    - name: otel\n      opentelemetry: {service: otel-collector.bench-observability.svc.cluster.local, port: 4318, http: {path: /v1/traces}}\n---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: bench-tracing, namespace: bench-waypoint}\nspec:\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n  tracing: [{providers: [{name: otel}], randomSamplingPercentage: 100}]\n";

/// Turns the waypoint's tracing on or off and waits until it says so
/// ("tracing configuration in force" with or without an exporter; it
/// works the configuration out at a request, so one is sent meanwhile).
fn set_tracing(mesh: &LocalMesh, wp: &crate::PodRt, on: bool) -> anyhow::Result<()> {
    // The waypoint's "tracing configuration in force" lines: how many, and the last.
    let said = || {
        let log = std::fs::read_to_string(&wp.log).unwrap_or_default();
        let lines: Vec<String> = log.lines().filter(|l| l.contains("tracing configuration in force")).map(str::to_owned).collect();
        (lines.len(), lines.last().cloned().unwrap_or_default())
    };
    let (before, _) = said();
    mesh.apply("bench-tracing", on.then_some(BENCH_TRACING))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (count, last) = said();
        if count > before && last.contains("otel-collector") == on {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("the waypoint did not switch its tracing {}:\n{}", if on { "on" } else { "off" }, crate::mesh::tail(&wp.log, 10));
        }
        let _ = mesh.exec(mesh.pod("bench-waypoint", "client"), &["skiff-demo-app", "http-load", "--url", "http://server.bench-waypoint:8080/", "--count", "1"], Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `bench waypoint`: HTTP/1.1 1 KiB at a fixed rate, coordinated-omission
/// corrected (oha `--latency-correction`), for direct, ambient L4,
/// ambient + waypoint, and the same with every request traced (a server
/// and a client span exported over OTLP to a collector in the mesh);
/// added latency and the waypoint's CPU per 1000 requests, and what
/// tracing adds to it.
pub fn waypoint(o: &L7BenchOptions) -> anyhow::Result<Vec<L7Result>> {
    let mesh = LocalMesh::up(&MeshOptions::new(&o.manifests, &o.bin_dir))?;
    let wp = mesh.pod("bench-waypoint", "waypoint");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&wp.log).unwrap_or_default().contains("waypoint serving") {
        if std::time::Instant::now() > deadline {
            bail!("the waypoint did not start:\n{}", crate::mesh::tail(&wp.log, 20));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let modes: [(&'static str, &str); 4] =
        [("direct", "bench-direct"), ("ambient-l4", "bench-l4"), ("ambient-waypoint", "bench-waypoint"), ("ambient-waypoint-traced", "bench-waypoint")];
    let mut traced = false;
    // Warm up every path (and wait for the servers).
    for (mode, ns) in modes {
        let warm = L7BenchOptions { seconds: 1, rate: 100, ..o.clone() };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while let Err(e) = oha(&mesh, ns, &warm) {
            if std::time::Instant::now() > deadline {
                bail!("{mode}: {e:#}");
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let mut figures: Figures = Default::default();
    let mut order = modes.to_vec();
    for rep in 0..o.repetitions {
        // A different order each repetition: drift does not favour a mode.
        order.rotate_left(rep % modes.len());
        for (mode, ns) in &order {
            let want = *mode == "ambient-waypoint-traced";
            if want != traced {
                set_tracing(&mesh, wp, want)?;
                traced = want;
            }
            let cpu0 = pod_cpu_seconds(wp);
            let (p50, p90, p99, rps) = oha(&mesh, ns, o)?;
            let cpu = pod_cpu_seconds(wp) - cpu0;
            let per_1000 = mode.starts_with("ambient-waypoint").then(|| cpu * 1000.0 / (rps * o.seconds as f64) * 1000.0);
            eprintln!("  {mode}: p50 {p50:.0} µs, p99 {p99:.0} µs, {rps:.0} req/s");
            figures.entry(mode).or_default().push((p50, p90, p99, rps, per_1000));
        }
    }
    // The paths really were what they claim.
    let l4 = (0..mesh.nodes.len())
        .map(|i| mesh.metric(i, "istio_tcp_connections_opened_total", &[("source_workload_namespace", "bench-l4")]).unwrap_or(0.0))
        .sum::<f64>();
    if l4 < 1.0 {
        bail!("ambient-l4: ztunnel saw no connection");
    }
    let (_, wp_metrics) = mesh.pod_http_get(wp, 15020, "/metrics")?;
    if crate::mesh::sum_metric(&wp_metrics, "istio_requests_total", &[("response_code", "200")]) < 1.0 {
        bail!("ambient-waypoint: the waypoint served no request");
    }
    // The traced runs' spans reached the collector (counted by it).
    std::thread::sleep(Duration::from_secs(2));
    let collector = mesh.pod("bench-observability", "collector");
    let received: u64 = std::fs::read_to_string(&collector.log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "export")
        .filter_map(|v| v["spans"].as_u64())
        .sum();
    if received == 0 {
        bail!("ambient-waypoint-traced: the collector received no span");
    }
    let names: Vec<&'static str> = modes.iter().map(|(m, _)| *m).collect();
    let results = summarize(&names, &figures, o.rate);
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!(
        "\nWaypoint benchmark — HTTP/1.1 1 KiB responses at {} req/s over {} connections for {} s (oha, latency corrected), median of {} run(s)",
        o.rate, o.connections, o.seconds, o.repetitions
    );
    println!("CPU placement: load generator on CPU 0, servers on CPU 1, ztunnels and the waypoint unpinned ({cpus} CPUs)");
    print_table(&results, "waypoint");
    if let (Some(plain), Some(traced)) = (results[2].waypoint_cpu_ms_per_1000, results[3].waypoint_cpu_ms_per_1000) {
        println!(
            "tracing (every request sampled, 2 spans exported over OTLP; {received} spans received): waypoint CPU {:+.1} ms per 1000 requests ({:.2}x), added p99 {:+.0} µs",
            traced - plain,
            traced / plain,
            results[3].p99_us - results[2].p99_us
        );
    }
    write_figures(o.out.as_deref(), &results)?;
    Ok(results)
}

/// Per path, each run's p50, p90, p99 (µs), achieved req/s and the
/// measured proxy's CPU ms per 1000 requests.
type Figures = std::collections::BTreeMap<&'static str, Vec<(f64, f64, f64, f64, Option<f64>)>>;

/// Options of `bench gateway`.
#[derive(Clone, Debug)]
pub struct GatewayBenchOptions {
    pub l7: L7BenchOptions,
    /// Envoy, configured as the same gateway.
    pub envoy: PathBuf,
}

/// `bench gateway`: HTTPS (TLS 1.3, HTTP/1.1, 1 KiB responses) at a fixed
/// rate, coordinated-omission corrected, from a client outside the mesh:
/// direct (plain HTTP to a server outside the mesh: the floor), through
/// Skiff's ingress gateway (TLS terminated, routed by a VirtualService,
/// HBONE with the gateway's identity to an enrolled server's ztunnel), and
/// through a real Envoy configured as the same gateway (TLS terminated,
/// one route, plain HTTP to the server outside the mesh). Added latency
/// over direct, and each gateway's CPU per 1000 requests.
pub fn gateway(o: &GatewayBenchOptions) -> anyhow::Result<Vec<L7Result>> {
    let mut mesh = LocalMesh::up(&MeshOptions::new(&o.l7.manifests, &o.l7.bin_dir))?;
    // The certificate both gateways serve, and the client's trust in it.
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec![BENCH_HOST.to_owned()])?.self_signed(&key)?;
    let dir = mesh.work_dir.join("bench-gateway");
    std::fs::create_dir_all(&dir)?;
    let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_file, cert.pem())?;
    std::fs::write(&key_file, key.serialize_pem())?;
    let indent = |pem: &str| pem.lines().map(|l| format!("    {l}\n")).collect::<String>();
    let skiff = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: bench-cert, namespace: istio-system}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}---\n\
         apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: bench, namespace: bench-gw}}\nspec:\n  selector: {{istio: ingressgateway}}\n  servers:\n\
         \x20 - port: {{number: 443, name: https, protocol: HTTPS}}\n    hosts: [{BENCH_HOST}]\n    tls: {{mode: SIMPLE, credentialName: bench-cert}}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: bench, namespace: bench-gw}}\nspec:\n  hosts: [{BENCH_HOST}]\n  gateways: [bench]\n  http: [{{route: [{{destination: {{host: server, port: {{number: 8080}}}}}}]}}]\n",
        indent(&cert.pem()),
        indent(&key.serialize_pem())
    );
    mesh.apply("bench-gateway", Some(&skiff))?;
    let server = mesh.pod("bench-edge", "server").ip;
    let config = dir.join("envoy.yaml");
    std::fs::write(&config, envoy_gateway_config(&cert_file, &key_file, server))?;
    let envoy_pod = mesh.pods.iter().position(|p| p.namespace == "bench-edge" && p.name == "envoy-gateway").context("the envoy-gateway pod")?;
    let envoy = o.envoy.display().to_string();
    let log = mesh.work_dir.join("logs").join("envoy-gateway.log");
    let cfg = config.display().to_string();
    mesh.spawn_in(envoy_pod, &["taskset", "-c", "1", &envoy, "-c", &cfg, "--concurrency", "2", "--log-level", "warn"], &log)?;
    let gw_ip = mesh.service_ip("istio-system", "istio-ingressgateway");
    let envoy_ip = mesh.pods[envoy_pod].ip;
    let modes: [(&'static str, String, Option<String>); 3] = [
        ("direct", "http://server.bench-edge:8080/".into(), None),
        ("skiff-gateway", format!("https://{BENCH_HOST}/"), Some(format!("{BENCH_HOST}:443:{gw_ip}:443"))),
        ("envoy-gateway", format!("https://{BENCH_HOST}/"), Some(format!("{BENCH_HOST}:443:{envoy_ip}:8443"))),
    ];
    let cacert = cert_file.display().to_string();
    let run = |mesh: &LocalMesh, url: &str, connect_to: &Option<String>, opts: &L7BenchOptions| -> anyhow::Result<(f64, f64, f64, f64)> {
        let extra: Vec<&str> = match connect_to {
            Some(ct) => vec!["--connect-to", ct, "--cacert", &cacert],
            None => Vec::new(),
        };
        let r = oha_run(mesh, ("bench-edge", "client"), url, &extra, opts)?;
        if r.success_rate < 0.999 || r.codes.as_object().is_some_and(|m| m.keys().any(|k| k != "200")) {
            bail!("{url}: {:.1}% succeeded, status codes {}", r.success_rate * 100.0, r.codes);
        }
        Ok((r.p50, r.p90, r.p99, r.rps))
    };
    for (mode, url, ct) in &modes {
        let warm = L7BenchOptions { seconds: 1, rate: 100, ..o.l7.clone() };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while let Err(e) = run(&mesh, url, ct, &warm) {
            if std::time::Instant::now() > deadline {
                bail!("{mode}: {e:#}");
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let gw_pod = mesh.pod("istio-system", "istio-ingressgateway");
    let envoy_rt = &mesh.pods[envoy_pod];
    let mut figures: Figures = Default::default();
    let mut order: Vec<usize> = (0..modes.len()).collect();
    for rep in 0..o.l7.repetitions {
        order.rotate_left(rep % modes.len());
        for &i in &order {
            let (mode, url, ct) = &modes[i];
            let cpu_of = || match *mode {
                "skiff-gateway" => pod_cpu_seconds(gw_pod),
                "envoy-gateway" => pod_cpu_seconds(envoy_rt),
                _ => 0.0,
            };
            let cpu0 = cpu_of();
            let (p50, p90, p99, rps) = run(&mesh, url, ct, &o.l7)?;
            let cpu = cpu_of() - cpu0;
            let per_1000 = (*mode != "direct").then(|| cpu * 1000.0 / (rps * o.l7.seconds as f64) * 1000.0);
            eprintln!("  {mode}: p50 {p50:.0} µs, p99 {p99:.0} µs, {rps:.0} req/s");
            figures.entry(mode).or_default().push((p50, p90, p99, rps, per_1000));
        }
    }
    // The paths were what they claim: the gateway served the requests and
    // sent them over HBONE (the server's ztunnel saw its identity).
    let (_, m) = mesh.pod_http_get(gw_pod, 15020, "/metrics")?;
    if crate::mesh::sum_metric(&m, "istio_requests_total", &[("reporter", "source"), ("response_code", "200")]) < 1.0 {
        bail!("skiff-gateway: the gateway served no request");
    }
    let hbone = (0..mesh.nodes.len())
        .map(|i| mesh.metric(i, "istio_tcp_connections_opened_total", &[("reporter", "destination"), ("source_workload", "istio-ingressgateway")]).unwrap_or(0.0))
        .sum::<f64>();
    if hbone < 1.0 {
        bail!("skiff-gateway: no HBONE connection from the gateway reached the server's ztunnel");
    }
    let names: Vec<&'static str> = modes.iter().map(|(m, _, _)| *m).collect();
    let results = summarize(&names, &figures, o.l7.rate);
    let d = results[0].clone();
    println!(
        "\nIngress gateway benchmark — HTTPS (TLS 1.3, HTTP/1.1) 1 KiB responses at {} req/s over {} connections for {} s (oha, latency corrected), median of {} run(s)",
        o.l7.rate, o.l7.connections, o.l7.seconds, o.l7.repetitions
    );
    println!("direct is plain HTTP to a server outside the mesh; skiff-gateway sends on over HBONE (mutual TLS) to an enrolled server; envoy-gateway over plain HTTP");
    print_table(&results, "gateway");
    if let (Some(s), Some(e)) = (results[1].waypoint_cpu_ms_per_1000, results[2].waypoint_cpu_ms_per_1000) {
        println!("ratios skiff/envoy: CPU per 1000 requests {:.2}, added p50 {:.2}, added p99 {:.2}", s / e, (results[1].p50_us - d.p50_us) / (results[2].p50_us - d.p50_us), (results[1].p99_us - d.p99_us) / (results[2].p99_us - d.p99_us));
    }
    write_figures(o.l7.out.as_deref(), &results)?;
    drop(mesh);
    Ok(results)
}

/// The host both gateways serve in `bench gateway`.
pub const BENCH_HOST: &str = "bench.example.com";

/// Envoy as the same gateway: TLS on 8443 with the benchmark's
/// certificate, `bench.example.com` routed to one upstream (plain HTTP).
fn envoy_gateway_config(cert: &std::path::Path, key: &std::path::Path, upstream: std::net::Ipv4Addr) -> String {
    format!(
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 15099}}}}}}\n\
static_resources:\n  listeners:\n  - name: gateway\n    address: {{socket_address: {{address: 0.0.0.0, port_value: 8443}}}}\n    filter_chains:\n\
\x20   - transport_socket:\n        name: envoy.transport_sockets.tls\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n\
\x20         common_tls_context:\n            alpn_protocols: [h2, http/1.1]\n            tls_certificates: [{{certificate_chain: {{filename: \"{}\"}}, private_key: {{filename: \"{}\"}}}}]\n\
\x20     filters:\n      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n\
\x20         stat_prefix: gateway\n          route_config:\n            virtual_hosts:\n            - name: bench\n              domains: [\"{BENCH_HOST}\", \"{BENCH_HOST}:*\"]\n              routes: [{{match: {{prefix: /}}, route: {{cluster: backend}}}}]\n\
\x20         http_filters:\n          - name: envoy.filters.http.router\n            typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}\n\
\x20 clusters:\n  - name: backend\n    type: STATIC\n    connect_timeout: 5s\n    load_assignment:\n      cluster_name: backend\n      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {upstream}, port_value: 8080}}}}}}}}]}}]\n",
        cert.display(),
        key.display()
    )
}
