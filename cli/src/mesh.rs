//! Finding the running local mesh (`cargo xtask demo`, the tests): its
//! work directory `/tmp/skiff-RUN` holds `owner.pid` (the harness) and
//! `cluster/` (the cluster as node-agent, ztunnel and waypoints read it).

use std::path::{Path, PathBuf};

/// Local meshes whose harness is alive, by work directory.
pub fn live() -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) else { return Vec::new() };
    let mut out: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|d| {
            let id = d.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("skiff-")).unwrap_or("");
            id.len() == 6
                && id.chars().all(|c| c.is_ascii_hexdigit())
                && d.join("cluster").is_dir()
                && std::fs::read_to_string(d.join("owner.pid"))
                    .ok()
                    .and_then(|p| p.trim().parse::<u32>().ok())
                    .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
        })
        .collect();
    out.sort();
    out
}

/// The cluster view of `mesh` (a work directory), or of the one running
/// local mesh.
pub fn cluster_dir(mesh: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(m) = mesh {
        let d = m.join("cluster");
        return if d.is_dir() { Ok(d) } else { Err(format!("--mesh {}: no cluster/ directory there (not a local mesh's work directory)", m.display())) };
    }
    let live = live();
    match live.as_slice() {
        [one] => Ok(one.join("cluster")),
        [] => Err("no local mesh is running (start one with `cargo xtask demo`), and no --manifests DIR was given".into()),
        many => Err(format!(
            "{} local meshes are running; name one with --mesh: {}",
            many.len(),
            many.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        )),
    }
}
