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

/// One node of a local mesh: its name and network namespace.
pub struct Node {
    pub name: String,
    pub netns: String,
}

impl Node {
    /// Where its network namespace is.
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.netns)
    }
}

/// Every node the local mesh's pods are scheduled on, whether its network
/// namespace is there or not.
pub fn all_nodes(work: &Path) -> Result<Vec<Node>, String> {
    let run = work.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("skiff-")).ok_or_else(|| format!("{}: not a local mesh's work directory", work.display()))?;
    let pods = std::fs::read_to_string(work.join("cluster/pods.yaml")).map_err(|e| format!("{}: {e}", work.join("cluster/pods.yaml").display()))?;
    let docs = skiff_core::k8s::parse_documents(&pods).map_err(|e| skiff_core::report(&e))?;
    let mut names: Vec<String> = docs
        .into_iter()
        .filter_map(|o| match o {
            skiff_core::k8s::Object::Pod(p) => p.spec.node_name,
            _ => None,
        })
        .collect();
    names.sort();
    names.dedup();
    Ok(names.into_iter().map(|name| Node { netns: format!("skiff-{run}-{name}"), name }).collect())
}

/// The work directory of `mesh`, or of the one running local mesh.
pub fn work_dir(mesh: Option<&Path>) -> Result<PathBuf, String> {
    Ok(cluster_dir(mesh)?.parent().expect("cluster/ has a parent").to_owned())
}

/// The value of `flag` on the command line of a `skiff-ztunnel` of the
/// local mesh whose cluster view is `cluster` (its `--manifests`), if one
/// runs and sets it.
pub fn ztunnel_flag(cluster: &Path, flag: &str) -> Option<String> {
    let want = cluster.display().to_string();
    for e in std::fs::read_dir("/proc").ok()?.filter_map(Result::ok) {
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else { continue };
        let args: Vec<String> = raw.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if !args.first().is_some_and(|a| a.ends_with("skiff-ztunnel")) || !args.contains(&want) {
            continue;
        }
        return args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    }
    None
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt as _;

    /// ztunnel's flags are read from the process serving that cluster
    /// view, and from no other.
    #[test]
    fn the_flag_of_the_ztunnel_reading_this_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = dir.path().join("cluster");
        assert_eq!(super::ztunnel_flag(&cluster, "--outbound-traffic-policy"), None);
        let mut child = std::process::Command::new("sh")
            .arg0("/opt/skiff/skiff-ztunnel")
            .args(["-c", "sleep 30; true", "sh", "--manifests"])
            .arg(&cluster)
            .args(["--outbound-traffic-policy", "REGISTRY_ONLY"])
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let got = loop {
            match super::ztunnel_flag(&cluster, "--outbound-traffic-policy") {
                Some(v) => break Some(v),
                None if std::time::Instant::now() > deadline => break None,
                None => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        };
        let other = super::ztunnel_flag(&dir.path().join("other"), "--outbound-traffic-policy");
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(got.as_deref(), Some("REGISTRY_ONLY"));
        assert_eq!(other, None);
    }
}
