//! Helpers for Skiff's end-to-end tests: building a local mesh (or skipping
//! with a clear message when not root, and failing when `CI` is set), running
//! the test client in a pod, and reading what servers and ztunnel saw.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

pub use skiff_localmesh::{LocalMesh, MeshOptions, PodRt};

/// Builds a mesh from `manifests` (relative to this crate), or returns None
/// after explaining why privileged tests are skipped. Under `CI` they never
/// skip: not being able to run them is a failure.
pub fn mesh(manifests: &str) -> Option<LocalMesh> {
    mesh_with(manifests, |_| {})
}

/// Like [`mesh`], with options adjusted by `tweak`.
pub fn mesh_with(manifests: &str, tweak: impl FnOnce(&mut MeshOptions)) -> Option<LocalMesh> {
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0");
    if !nix::unistd::geteuid().is_root() {
        if ci {
            panic!("privileged end-to-end tests must run under CI, but this is not root");
        }
        eprintln!("SKIPPED: privileged end-to-end test needs root (network namespaces, cgroups, eBPF); run `sudo cargo xtask test`");
        return None;
    }
    let mut opts = MeshOptions::new(Path::new(env!("CARGO_MANIFEST_DIR")).join(manifests), bin_dir());
    tweak(&mut opts);
    match LocalMesh::up(&opts) {
        Ok(m) => Some(m),
        Err(e) => panic!("local mesh did not come up: {e:#}"),
    }
}

/// The directory of the workspace's built binaries (next to this test).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>
    let dir = exe.parent().and_then(Path::parent).expect("target dir").to_owned();
    for bin in ["skiff-node-agent", "skiff-ztunnel", "skiff-demo-app", "skiff-cni"] {
        assert!(
            dir.join(bin).exists(),
            "{} is missing: build the binaries first (`cargo build --bins`), or run `cargo xtask test`",
            dir.join(bin).display()
        );
    }
    dir
}

/// What the test client printed.
#[derive(Debug)]
pub struct ClientResult {
    pub ok: bool,
    pub peer: String,
    pub reply: String,
    pub error: String,
}

/// Runs the test client in `pod`: connect to `target`, send `message`.
pub fn client(mesh: &LocalMesh, pod: &PodRt, target: &str, message: &str) -> ClientResult {
    let out = mesh
        .exec(pod, &["skiff-demo-app", "client", "--target", target, "--message", message], Duration::from_secs(30))
        .expect("exec client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("client output is not JSON ({e}): {stdout:?} stderr: {}", String::from_utf8_lossy(&out.stderr)));
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    ClientResult { ok: out.status.success(), peer: s("peer"), reply: s("reply"), error: s("error") }
}

/// Every JSON line the echo server in `pod` logged.
pub fn server_events(pod: &PodRt) -> Vec<serde_json::Value> {
    std::fs::read_to_string(&pod.log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The peer the server saw for the connection that carried `marker`.
pub fn peer_of_marker(pod: &PodRt, marker: &str) -> Option<String> {
    server_events(pod)
        .into_iter()
        .find(|e| e["event"] == "received" && e["data"].as_str() == Some(marker))
        .and_then(|e| e["peer"].as_str().map(str::to_owned))
}

/// Retries `f` until it returns Some or `timeout` passes.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sum of a ztunnel metric over both nodes.
pub fn metric_all(mesh: &LocalMesh, name: &str, labels: &[(&str, &str)]) -> f64 {
    (0..mesh.nodes.len()).map(|i| mesh.metric(i, name, labels).expect("metrics")).sum()
}

/// Pod IPs node-agent has enrolled on node `i` (from the pinned map).
pub fn enrolled_ips(mesh: &LocalMesh, i: usize) -> Vec<String> {
    let state = mesh.inspect(i).expect("inspect");
    let mut v: Vec<String> = state["enrolled"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e["pod_ip"].as_str().map(str::to_owned))
        .collect();
    v.sort();
    v
}

/// The pod's echo server is listening (it starts asynchronously).
pub fn wait_listening(pod: &PodRt) {
    eventually(Duration::from_secs(10), &format!("{} listening", pod.name), || {
        server_events(pod).iter().any(|e| e["event"] == "listening").then_some(())
    })
}

/// The pod's echo server on `port` is listening.
pub fn wait_listening_on(pod: &PodRt, port: u16) {
    eventually(Duration::from_secs(10), &format!("{} listening on {port}", pod.name), || {
        server_events(pod).iter().any(|e| e["event"] == "listening" && e["port"] == port).then_some(())
    })
}

/// Applies a manifest to the running mesh and waits until node `i`'s
/// ztunnel has the policy `name` in force (or, with `None`, has dropped it).
pub fn apply_policy(mesh: &LocalMesh, node: usize, name: &str, yaml: Option<&str>) {
    let policies = || -> Option<String> {
        let (_, body) = mesh.node_http_get(node, 15000, "/config_dump").ok()?;
        let dump: serde_json::Value = serde_json::from_str(&body).ok()?;
        Some(format!("{}{}", dump["authorization_policies"], dump["peer_authentications"]))
    };
    let before = eventually(Duration::from_secs(10), "config dump", policies);
    mesh.apply(name, yaml).expect("apply");
    // Every application in the tests changes the policies in force.
    eventually(Duration::from_secs(10), &format!("policy change {name} in force on node {node}"), || {
        policies().filter(|now| *now != before).map(|_| ())
    })
}

/// A child process killed (and reaped) when dropped, however the test
/// ends.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `skiff dashboard --listen 127.0.0.1:0 ARGS`, inside the network
/// namespace `netns` when given: the process and the port it serves on
/// (from the URL it prints first).
pub fn skiff_dashboard(netns: Option<&str>, args: &[&str]) -> (Killed, u16) {
    use std::io::BufRead as _;
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin_dir().join("skiff"));
            c
        }
        None => std::process::Command::new(bin_dir().join("skiff")),
    };
    let mut child = cmd.args(["dashboard", "--listen", "127.0.0.1:0"]).args(args).stdout(std::process::Stdio::piped()).spawn().expect("skiff dashboard");
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().expect("piped")).read_line(&mut first).expect("its first line");
    let child = Killed(child);
    let url = first.trim().rsplit(' ').next().unwrap_or("");
    assert!(url.starts_with("http://127.0.0.1:"), "{first}");
    let port = url.trim_end_matches('/').rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("{first}"));
    (child, port)
}
