//! Skiff node-agent: loads and pins the eBPF capture programs, decides which
//! pods on this node are enrolled (from the config source), and hands each
//! enrolled pod's network namespace to ztunnel.

pub mod agent;
pub mod bpf;
pub mod cni;
pub mod locate;
pub mod podnet;
pub mod ready;
pub mod sandbox;
mod rawlink;

/// The cgroup2 mount point, read from `/proc/self/mountinfo` (cgroup v2 is
/// at `/sys/fs/cgroup` on pure-v2 hosts and elsewhere on hybrid ones).
pub fn cgroup2_root() -> Option<std::path::PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(std::path::PathBuf::from)
    })
}
