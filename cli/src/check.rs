//! `skiff check --pre`: whether this node can run Skiff's capture, before
//! installing it. Each line is OK, WARN or FAIL with what was found and,
//! when not OK, what to do; the exit code is 1 if any line is FAIL.
//!
//! What it looks at: the kernel release; cgroup v2 (capture attaches to
//! it); BTF (`/sys/kernel/btf/vmlinux`: the socket-storage maps need it);
//! bpffs; and, as root, every capture program loaded into this kernel by
//! `skiff-node-agent preflight` (verified, never attached or pinned) —
//! the real test, rather than a table of kernel versions.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

/// One line of the report.
#[derive(Debug)]
pub struct Line {
    pub level: Level,
    pub what: String,
    pub found: String,
    /// What to do about it (WARN, FAIL).
    pub hint: Option<String>,
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let level = match self.level {
            Level::Ok => "OK  ",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        write!(f, "{level} {}: {}", self.what, self.found)?;
        if let Some(h) = &self.hint {
            write!(f, " — {h}")?;
        }
        Ok(())
    }
}

fn line(level: Level, what: &str, found: impl Into<String>, hint: Option<&str>) -> Line {
    Line { level, what: what.to_owned(), found: found.into(), hint: hint.map(str::to_owned) }
}

/// The filesystem type and mount point of each line of a mountinfo file.
pub fn mounts(mountinfo: &str) -> Vec<(String, String)> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let point = left.split_whitespace().nth(4)?;
            let fstype = right.split_whitespace().next()?;
            Some((fstype.to_owned(), point.to_owned()))
        })
        .collect()
}

/// The report for this node. `node_agent`: the binary whose `preflight`
/// loads the programs; `root`: whether this process may load them.
pub fn pre(node_agent: Option<&Path>, root: bool) -> Vec<Line> {
    let mut out = Vec::new();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()).unwrap_or_else(|_| "unknown".into());
    out.push(line(Level::Ok, "kernel", format!("Linux {release} (whether it takes the capture programs is checked by loading them, below)"), None));
    let mounts = mounts(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default());
    match mounts.iter().find(|(t, _)| t == "cgroup2") {
        Some((_, at)) => out.push(line(Level::Ok, "cgroup v2", format!("mounted at {at}"), None)),
        None => out.push(line(
            Level::Fail,
            "cgroup v2",
            "not mounted",
            Some("capture attaches to the cgroup v2 hierarchy: boot with the unified hierarchy (systemd.unified_cgroup_hierarchy=1)"),
        )),
    }
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        out.push(line(Level::Ok, "BTF", "/sys/kernel/btf/vmlinux present", None));
    } else {
        out.push(line(Level::Fail, "BTF", "/sys/kernel/btf/vmlinux missing", Some("the socket-storage maps need a kernel built with CONFIG_DEBUG_INFO_BTF")));
    }
    match mounts.iter().find(|(t, at)| t == "bpf" && at == "/sys/fs/bpf") {
        Some(_) => out.push(line(Level::Ok, "bpffs", "mounted at /sys/fs/bpf", None)),
        None => out.push(line(
            Level::Warn,
            "bpffs",
            "not mounted at /sys/fs/bpf",
            Some("node-agent mounts it (its pod mounts /sys/fs/bpf with Bidirectional propagation, so pins outlive it)"),
        )),
    }
    if !root {
        out.push(line(Level::Warn, "capture programs", "not loaded: not root", Some("run `skiff check --pre` as root on the node (as node-agent runs) to load them into this kernel")));
        return out;
    }
    let Some(bin) = node_agent else {
        out.push(line(Level::Fail, "capture programs", "skiff-node-agent not found", Some("pass --node-agent PATH (it is beside skiff in the image)")));
        return out;
    };
    let run = Command::new(bin).arg("preflight").output();
    let output = match run {
        Ok(o) => o,
        Err(e) => {
            out.push(line(Level::Fail, "capture programs", format!("{}: {e}", bin.display()), Some("pass --node-agent PATH")));
            return out;
        }
    };
    let mut verdicts = 0;
    for l in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else { continue };
        let program = v["program"].as_str().unwrap_or("?");
        let what = if program.starts_with("skiff_") { format!("program {program}") } else { "capture maps".to_owned() };
        verdicts += 1;
        match v["error"].as_str() {
            None => out.push(line(Level::Ok, &what, "loaded and verified by this kernel", None)),
            Some(e) => out.push(line(Level::Fail, &what, e, Some("this kernel refuses it (the reason is the kernel's)"))),
        }
    }
    if verdicts == 0 || (!output.status.success() && !out.iter().any(|l| l.level == Level::Fail)) {
        let err = String::from_utf8_lossy(&output.stderr);
        out.push(line(Level::Fail, "capture programs", format!("{} preflight failed ({}): {}", bin.display(), output.status, err.trim()), None));
    }
    out
}

/// This process's effective uid (from `/proc/self/status`).
pub fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// `skiff-node-agent` beside this binary, else on the PATH.
pub fn find_node_agent() -> Option<PathBuf> {
    let beside = std::env::current_exe().ok()?.parent()?.join("skiff-node-agent");
    if beside.exists() {
        return Some(beside);
    }
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join("skiff-node-agent")).find(|p| p.exists()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_give_type_and_mount_point() {
        let text = "36 25 0:32 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n\
                    40 25 0:35 / /sys/fs/bpf rw,nosuid shared:14 - bpf bpf rw,mode=700\n\
                    garbage line\n";
        assert_eq!(mounts(text), vec![("cgroup2".into(), "/sys/fs/cgroup".into()), ("bpf".into(), "/sys/fs/bpf".into())]);
    }

    #[test]
    fn lines_say_level_what_found_and_hint() {
        assert_eq!(line(Level::Fail, "BTF", "missing", Some("rebuild")).to_string(), "FAIL BTF: missing — rebuild");
        assert_eq!(line(Level::Ok, "bpffs", "mounted", None).to_string(), "OK   bpffs: mounted");
    }
}
