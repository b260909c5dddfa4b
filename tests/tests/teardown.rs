//! The local mesh removes everything it created — netns, veths (with their
//! netns), cgroups, bpffs pins (and its private bpffs mount), /etc/netns
//! entries, processes and its work directory — on success and on panic.

use std::path::PathBuf;

use skiff_e2e::*;

struct Footprint {
    netns: Vec<String>,
    cgroups: Vec<PathBuf>,
    pids: Vec<u32>,
    paths: Vec<PathBuf>,
}

fn footprint(mesh: &LocalMesh) -> Footprint {
    let run = &mesh.run_id;
    let netns: Vec<String> = std::fs::read_dir("/var/run/netns")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&format!("skiff-{run}-")))
        .collect();
    let cgroups: Vec<PathBuf> = mesh.pods.iter().map(|p| p.cgroup.clone()).collect();
    let mut pids = Vec::new();
    for cg in &cgroups {
        for l in std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default().lines() {
            pids.push(l.parse().unwrap());
        }
    }
    let mut paths = vec![mesh.work_dir.clone()];
    paths.extend(netns.iter().map(|n| PathBuf::from("/etc/netns").join(n)).filter(|p| p.exists()));
    paths.push(cgroups[0].parent().unwrap().parent().unwrap().parent().unwrap().to_owned());
    Footprint { netns, cgroups, pids, paths }
}

fn assert_gone(f: &Footprint) {
    let listed = std::process::Command::new("ip").args(["netns", "list"]).output().unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    for n in &f.netns {
        assert!(!listed.contains(n.as_str()), "netns {n} left behind");
    }
    for c in &f.cgroups {
        assert!(!c.exists(), "cgroup {} left behind", c.display());
    }
    for p in &f.paths {
        assert!(!p.exists(), "{} left behind", p.display());
    }
    for pid in &f.pids {
        assert!(!PathBuf::from(format!("/proc/{pid}")).exists(), "process {pid} left behind");
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!f.paths[0].to_str().is_some_and(|w| mounts.contains(w)), "bpffs mount left behind");
}

#[test]
fn teardown_removes_everything_on_success() {
    let Some(mesh) = mesh("manifests/l4") else { return };
    let f = footprint(&mesh);
    assert!(f.netns.len() >= 8, "expected the fabric, 2 nodes and the pods: {:?}", f.netns);
    assert!(!f.pids.is_empty());
    drop(mesh);
    assert_gone(&f);
}

#[test]
fn teardown_removes_everything_on_panic() {
    let Some(mesh) = mesh("manifests/l4") else { return };
    let f = footprint(&mesh);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _mesh = mesh;
        panic!("test failure inside a mesh");
    }));
    assert!(result.is_err());
    assert_gone(&f);
}
