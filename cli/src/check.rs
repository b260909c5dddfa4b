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

/// `skiff check` of a running mesh: per node, node-agent and ztunnel
/// ready and at which version, capture readable, the pods enrolled against
/// those the cluster says should be, the certificates ztunnel holds; and
/// mesh-wide, one version everywhere and the config objects refused. Each
/// node's endpoints are read inside its network namespace (root), or in a
/// cluster through the API server's pod port-forward.
pub fn live(mesh: &crate::reach::Mesh) -> Result<Vec<Line>, String> {
    let snap = mesh.snapshot()?;
    let mut out = Vec::new();
    let mut nodes = Vec::new();
    for n in mesh.nodes(&snap)? {
        match n.place {
            Ok(place) => nodes.push((n.name, place)),
            Err(why) => out.push(line(Level::Fail, &format!("{} node", n.name), why, Some(match mesh {
                crate::reach::Mesh::Local(_) => "the node is down: its pods are unreachable",
                crate::reach::Mesh::Kube(_) => "no capture and no ztunnel there: enrolled pods on this node cannot start or connect; see the DaemonSet skiff-node",
            }))),
        }
    }
    if nodes.is_empty() {
        return Err("no node of this mesh can be reached (has it stopped?)".into());
    }
    // Versions by component, read or not.
    let mut tags: std::collections::BTreeMap<String, Vec<String>> = std::collections::BTreeMap::new();
    let mut unread = Vec::new();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    for (name, place) in &nodes {
        let get = |port: u16, path: &str| mesh.get(place, port, path);
        // A component's metrics, read once: its version and the rest.
        let metrics = |port: u16| get(port, "/metrics").map(|m| crate::dashboard::parse(&m));
        let tag_of = |samples: &[crate::dashboard::Sample]| samples.iter().find(|s| s.name == "istio_build").and_then(|s| s.labels.get("tag").cloned());
        // node-agent: capture installed, its maps readable.
        match get(15022, "/healthz/ready") {
            Ok(_) => {
                let samples = metrics(15022);
                let tag = samples.as_ref().ok().and_then(|s| tag_of(s));
                match &tag {
                    Some(t) => tags.entry(t.clone()).or_default().push(format!("{} node-agent", name)),
                    None => unread.push(format!("{} node-agent", name)),
                }
                let tag = tag.unwrap_or_else(|| "unknown".into());
                match samples {
                    Ok(m) if m.iter().any(|s| s.name == "skiff_node_capture_readable" && s.value == 1.0) => {
                        out.push(line(Level::Ok, &format!("{} node-agent", name), format!("ready, capture attached, version {tag}"), None))
                    }
                    Ok(_) => out.push(line(
                        Level::Fail,
                        &format!("{} node-agent", name),
                        "ready, but its pinned capture maps cannot be read",
                        Some("see node-agent's log on this node; `skiff-node-agent inspect` shows the pins"),
                    )),
                    Err(e) => out.push(line(Level::Warn, &format!("{} node-agent", name), format!("ready, but its metrics cannot be read: {e}"), Some("whether capture is attached is not known"))),
                }
            }
            Err(e) => out.push(line(
                Level::Fail,
                &format!("{} node-agent", name),
                format!("not ready: {e}"),
                Some("capture is not (re)installed on this node: new pods are not enrolled; see node-agent's log"),
            )),
        }
        // ztunnel: ready, and what it serves.
        let dump = match get(15021, "/healthz/ready") {
            Ok(_) => {
                let tag = metrics(15020).ok().and_then(|s| tag_of(&s));
                match &tag {
                    Some(t) => tags.entry(t.clone()).or_default().push(format!("{} ztunnel", name)),
                    None => unread.push(format!("{} ztunnel", name)),
                }
                out.push(line(Level::Ok, &format!("{} ztunnel", name), format!("ready, version {}", tag.as_deref().unwrap_or("unknown")), None));
                match get(15000, "/config_dump").and_then(|b| serde_json::from_str::<serde_json::Value>(&b).map_err(|e| e.to_string())) {
                    Ok(d) => Some(d),
                    Err(e) => {
                        out.push(line(Level::Warn, &format!("{} ztunnel", name), format!("its /config_dump cannot be read: {e}"), Some("enrollment and certificates on this node are not checked")));
                        None
                    }
                }
            }
            Err(e) => {
                out.push(line(
                    Level::Fail,
                    &format!("{} ztunnel", name),
                    format!("not ready: {e}"),
                    Some("enrolled pods on this node cannot open connections (refused, never sent around the mesh): start or restart ztunnel"),
                ));
                None
            }
        };
        // Enrollment: the cluster's view against ztunnel's.
        // By uid (a pod made anew under the same name is another pod),
        // shown by name.
        let want: std::collections::BTreeMap<String, String> = snap
            .workloads
            .values()
            .filter(|w| skiff_core::enroll::decide(name, snap.namespace_labels(&w.namespace), w) == skiff_core::enroll::Decision::Enroll)
            .map(|w| (w.uid.clone(), format!("{}/{}", w.namespace, w.name)))
            .collect();
        if let Some(d) = &dump {
            let have: std::collections::BTreeMap<String, String> = d["workloads"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|w| (w["uid"].as_str().unwrap_or("").to_owned(), format!("{}/{}", w["namespace"].as_str().unwrap_or(""), w["name"].as_str().unwrap_or(""))))
                .collect();
            let missing: Vec<&String> = want.iter().filter(|(u, _)| !have.contains_key(*u)).map(|(_, n)| n).collect();
            let extra: Vec<&String> = have.iter().filter(|(u, _)| !want.contains_key(*u)).map(|(_, n)| n).collect();
            let what = format!("{} enrolled pods", name);
            if missing.is_empty() && extra.is_empty() {
                out.push(line(Level::Ok, &what, format!("{} of {} pods that should be", have.len(), want.len()), None));
            } else {
                let mut found = format!("{} of {} pods that should be", want.len() - missing.len(), want.len());
                if !missing.is_empty() {
                    found.push_str(&format!("; not enrolled: {}", join(&missing)));
                }
                if !extra.is_empty() {
                    found.push_str(&format!("; enrolled but should not be: {}", join(&extra)));
                }
                out.push(line(Level::Fail, &what, found, Some("node-agent enrolls pods as they start: see its log for each pod by name")));
            }
            // Certificates: none expired, renewal not overdue.
            let certs: Vec<&serde_json::Value> = d["certificates"].as_array().into_iter().flatten().collect();
            let expired: Vec<String> = certs.iter().filter(|c| c["not_after_unix"].as_u64().is_some_and(|t| t <= now)).filter_map(|c| c["identity"].as_str().map(str::to_owned)).collect();
            let overdue: Vec<String> = certs.iter().filter(|c| c["rotates_at_unix"].as_u64().is_some_and(|t| t.saturating_add(60) < now)).filter_map(|c| c["identity"].as_str().map(str::to_owned)).collect();
            let earliest = certs.iter().filter_map(|c| c["not_after_unix"].as_u64()).min();
            let what = format!("{} certificates", name);
            if !expired.is_empty() {
                out.push(line(Level::Fail, &what, format!("expired: {}", expired.join(", ")), Some("the signer or the CA cannot issue: see ztunnel's log")));
            } else if !overdue.is_empty() {
                out.push(line(Level::Warn, &what, format!("renewal overdue: {}", overdue.join(", ")), Some("ztunnel keeps using them until they expire; see its log for why renewal fails")));
            } else {
                let soonest = earliest.map(|t| format!(", the first expires in {}", human(t.saturating_sub(now)))).unwrap_or_default();
                out.push(line(Level::Ok, &what, format!("{} held, renewed in time{soonest}", certs.len()), None));
            }
        }
    }
    out.push(versions(&tags, &unread));
    if snap.rejected.is_empty() {
        out.push(line(Level::Ok, "config", "no object refused", None));
    }
    for r in &snap.rejected {
        out.push(line(
            Level::Warn,
            "config",
            format!("{} {}/{} refused: field `{}`: {}; {}", r.key.kind, r.key.namespace, r.key.name, r.error.field, r.error.message, r.instead),
            Some("fix the object; `skiff analyze DIR` checks manifests before they are applied"),
        ));
    }
    Ok(out)
}

fn join(v: &[&String]) -> String {
    v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
}

fn human(secs: u64) -> String {
    match secs {
        s if s >= 86_400 => format!("{}d", s / 86_400),
        s if s >= 3600 => format!("{}h", s / 3600),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// One version everywhere: OK; versions one minor apart (an upgrade under
/// way): WARN; further apart, or majors that differ: FAIL. Components
/// whose version could not be read are named, not counted.
fn versions(tags: &std::collections::BTreeMap<String, Vec<String>>, unread: &[String]) -> Line {
    let not_read = if unread.is_empty() { String::new() } else { format!(" (not read: {})", unread.join(", ")) };
    let listed = || tags.iter().map(|(t, who)| format!("{t} ({})", who.join(", "))).collect::<Vec<_>>().join("; ");
    let parsed: Vec<(u64, u64)> = tags.keys().filter_map(|t| {
        let mut p = t.split('.').map(|x| x.parse::<u64>().ok());
        Some((p.next()??, p.next()??))
    }).collect();
    match tags.len() {
        0 => line(Level::Warn, "versions", format!("none could be read{not_read}"), Some("the components' /metrics carry istio_build")),
        1 => line(Level::Ok, "versions", format!("{} on every component read{not_read}", tags.keys().next().expect("one")), None),
        _ => {
            let majors: std::collections::BTreeSet<u64> = parsed.iter().map(|(m, _)| *m).collect();
            let minors: Vec<u64> = parsed.iter().map(|(_, n)| *n).collect();
            let close = parsed.len() == tags.len() && majors.len() == 1 && minors.iter().max().zip(minors.iter().min()).is_some_and(|(a, b)| a - b <= 1);
            if close {
                line(Level::Warn, "versions", format!("{}{not_read}", listed()), Some("an upgrade under way? components interoperate one minor version apart"))
            } else {
                line(Level::Fail, "versions", format!("{}{not_read}", listed()), Some("more than one minor version apart: upgrade the older components"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_one_minor_apart_warn_further_fail() {
        let t = |v: &[(&str, &str)]| {
            let mut m: std::collections::BTreeMap<String, Vec<String>> = Default::default();
            for (tag, who) in v {
                m.entry(tag.to_string()).or_default().push(who.to_string());
            }
            versions(&m, &[]).level
        };
        assert_eq!(t(&[("0.1.0", "a"), ("0.1.0", "b")]), Level::Ok);
        assert_eq!(t(&[("0.1.0", "a"), ("0.2.3", "b")]), Level::Warn);
        assert_eq!(t(&[("0.1.0", "a"), ("0.3.0", "b")]), Level::Fail);
        assert_eq!(t(&[("1.1.0", "a"), ("2.1.0", "b")]), Level::Fail);
        assert_eq!(t(&[]), Level::Warn);
    }

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
