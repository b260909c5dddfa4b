//! `skiff check --pre` on this machine (issue 16, item 2 in part): every
//! capture program is loaded into the kernel and verified, each prerequisite
//! gets its OK/WARN/FAIL line, a refused program fails the check, and
//! nothing is left behind (the check's own bpffs is unmounted and removed).

use std::{process::Command, time::Duration};

use skiff_e2e::*;

fn root_or_skip() -> bool {
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0");
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(!ci, "skiff check --pre loads programs into the kernel: it must run as root under CI");
    eprintln!("SKIPPED: skiff check --pre loads programs into the kernel: run as root");
    false
}

fn preflight_dirs() -> Vec<String> {
    std::fs::read_dir(std::env::temp_dir()).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("skiff-preflight-")).collect()
}

#[test]
fn check_pre_loads_every_capture_program_into_this_kernel() {
    if !root_or_skip() {
        return;
    }
    let before = preflight_dirs();
    let out = Command::new(bin_dir().join("skiff")).args(["check", "--pre"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let ok = |what: &str| text.lines().any(|l| l.starts_with("OK ") && l.contains(&format!(" {what}:")));
    for what in ["kernel", "cgroup v2", "BTF", "capture maps"] {
        assert!(ok(what), "no OK line for {what}:\n{text}");
    }
    // Every program ARCHITECTURE.md's table names, loaded and verified.
    let arch = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ARCHITECTURE.md")).unwrap();
    let table = arch.split("## eBPF programs and maps").nth(1).unwrap().split("\n\n").find(|c| c.starts_with("| program")).unwrap();
    let programs: Vec<&str> = table.split('`').skip(1).step_by(2).filter(|w| w.starts_with("skiff_")).collect();
    assert!(programs.len() >= 10, "{programs:?}");
    for p in &programs {
        assert!(ok(&format!("program {p}")), "{p} not loaded:\n{text}");
    }
    let loaded = text.lines().filter(|l| l.contains(" program skiff_")).count();
    assert_eq!(loaded, programs.len(), "the build's programs and ARCHITECTURE.md's table differ:\n{text}");
    assert!(!text.lines().any(|l| l.starts_with("FAIL")), "{text}");
    assert_eq!(preflight_dirs(), before, "the check's bpffs is removed");
    assert!(!std::fs::read_to_string("/proc/self/mountinfo").unwrap().contains("skiff-preflight-"), "and unmounted");
}

#[test]
fn a_program_the_kernel_refuses_fails_the_check() {
    if !root_or_skip() {
        return;
    }
    // A node-agent whose preflight reports a refusal, as on a kernel
    // without a hook.
    let tmp = tempfile::Builder::new().prefix("skiff-check-test-").tempdir().unwrap();
    let fake = tmp.path().join("skiff-node-agent");
    std::fs::write(&fake, "#!/bin/sh\necho '{\"program\":\"maps and object\",\"error\":null}'\necho '{\"program\":\"skiff_inbound\",\"error\":\"invalid argument: sk_lookup not supported\"}'\nexit 1\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = Command::new(bin_dir().join("skiff")).args(["check", "--pre", "--node-agent"]).arg(&fake).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.lines().any(|l| l.starts_with("FAIL program skiff_inbound: invalid argument: sk_lookup not supported")), "{text}");
    // And a node-agent that cannot run at all.
    let out = Command::new(bin_dir().join("skiff")).args(["check", "--pre", "--node-agent", "/nonexistent/skiff-node-agent"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with("FAIL capture programs:")));
}

/// `skiff check` on a running mesh: OK for every node when healthy; a
/// refused object is a WARN naming it; a stopped ztunnel is a FAIL naming
/// its node, and the exit code says so.
#[test]
fn check_reports_a_healthy_mesh_and_names_the_node_whose_ztunnel_stopped() {
    let Some(mut mesh) = mesh("manifests/l4") else { return };
    let check = |mesh: &LocalMesh| {
        let out = Command::new(bin_dir().join("skiff")).args(["check", "--mesh"]).arg(&mesh.work_dir).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let (code, text) = eventually(Duration::from_secs(20), "a healthy check", || {
        let (code, text) = check(&mesh);
        (code == Some(0)).then_some((code, text))
    });
    assert_eq!(code, Some(0), "{text}");
    for node in ["node-1", "node-2"] {
        for what in ["node-agent", "ztunnel", "enrolled pods", "certificates"] {
            assert!(text.lines().any(|l| l.starts_with(&format!("OK   {node} {what}: "))), "no OK for {node} {what}:\n{text}");
        }
    }
    let version = format!("OK   versions: {} on every component read", env!("CARGO_PKG_VERSION"));
    assert!(text.lines().any(|l| l == version), "{text}");
    assert!(text.lines().any(|l| l.starts_with("OK   node-1 enrolled pods: ") && !l.contains(" 0 of")), "{text}");

    // A refused object: a WARN naming it and its field.
    mesh.apply("bad-vs", Some("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: bad, namespace: mesh}\nspec:\n  hosts: [echo]\n  http: [{route: [{destination: {host: echo}}], delegate: {name: x}}]\n")).unwrap();
    let text = eventually(Duration::from_secs(20), "the refusal reported", || {
        let (_, text) = check(&mesh);
        text.contains("WARN config: VirtualService mesh/bad refused: field `spec.http[0].delegate`").then_some(text)
    });
    assert!(!text.lines().any(|l| l.starts_with("FAIL")), "{text}");

    mesh.stop_ztunnel(1);
    let (code, text) = check(&mesh);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.lines().any(|l| l.starts_with("FAIL node-2 ztunnel: not ready")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("OK   node-1 ztunnel: ready")), "the other node is still OK:\n{text}");
}
