//! In-pod network settings that make ztunnel's delivery keep the client's
//! source IP, without iptables.
//!
//! ztunnel delivers an inbound connection to the application from a socket
//! bound (IP_TRANSPARENT) to the *client's* address and marked
//! `MARK_DELIVER`. The application's replies are addressed to that remote
//! client, so on their own they would leave through the pod's eth0. Two
//! settings bring them back over loopback to ztunnel:
//! - `net.ipv4.tcp_fwmark_accept=1`: a socket the application accepts takes
//!   the mark of the SYN that created it, i.e. `MARK_DELIVER`;
//! - `ip rule fwmark MARK_DELIVER lookup DELIVER_ROUTE_TABLE` with
//!   `local 0.0.0.0/0 dev lo` in that table: marked packets are local.
//!
//! The delivery rule must come *before* the `local` table: a SYN to the
//! pod's own IP would otherwise match the local route on eth0, and the kernel
//! reports such a looped-back packet as arriving on eth0 (the device owning
//! the address), which inbound capture cannot tell from a real arrival. So
//! the `local` lookup moves from preference 0 to 100 and the delivery rule
//! takes 10: marked packets then use `local default dev lo` and arrive on
//! `lo`, which inbound capture skips.
//!
//! All of this lives in the pod's own netns and goes away with it. It stays
//! when a pod is released: it only affects packets carrying ztunnel's
//! delivery mark, and connections ztunnel is still draining need it.

use std::{os::fd::BorrowedFd, process::Command};

use skiff_core::netns;
use skiff_ebpf_common::{DELIVER_ROUTE_TABLE, MARK_DELIVER};

/// Priority of the delivery rule: before the `local` table.
const RULE_PREF: &str = "10";
/// Where the `local` table lookup moves to.
const LOCAL_PREF: &str = "100";

/// Errors from setting up a pod's netns.
#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    /// Entering the pod's netns failed.
    #[error("entering the pod network namespace")]
    Netns(#[from] netns::NetnsError),
    /// A sysctl could not be written.
    #[error("writing sysctl {0}")]
    Sysctl(&'static str, #[source] std::io::Error),
    /// `ip` could not run or failed.
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    /// `iptables-restore` could not run or failed.
    #[error("iptables-restore failed: {stderr}")]
    Iptables { stderr: String },
}

fn ip(args: &[&str]) -> Result<String, PodNetError> {
    let out = Command::new("ip").args(args).output().map_err(|e| PodNetError::Ip {
        args: args.join(" "),
        stderr: format!("cannot run ip: {e}"),
    })?;
    if !out.status.success() {
        return Err(PodNetError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

const FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";

fn setup_here() -> Result<(), PodNetError> {
    std::fs::write(FWMARK_ACCEPT, "1").map_err(|e| PodNetError::Sysctl("net.ipv4.tcp_fwmark_accept", e))?;
    let mark = format!("{MARK_DELIVER:#x}");
    let table = DELIVER_ROUTE_TABLE.to_string();
    ip(&["-4", "route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", &table])?;
    let rules = ip(&["-4", "rule", "show"])?;
    if !rules.lines().any(|l| l.starts_with(&format!("{RULE_PREF}:")) && l.contains(&format!("lookup {table}"))) {
        ip(&["-4", "rule", "add", "fwmark", &mark, "lookup", &table, "pref", RULE_PREF])?;
    }
    if !rules.lines().any(|l| l.starts_with(&format!("{LOCAL_PREF}:")) && l.contains("lookup local")) {
        ip(&["-4", "rule", "add", "pref", LOCAL_PREF, "lookup", "local"])?;
    }
    if rules.lines().any(|l| l.starts_with("0:") && l.contains("lookup local")) {
        ip(&["-4", "rule", "del", "pref", "0", "lookup", "local"])?;
    }
    Ok(())
}

/// Applies the delivery settings in a pod's netns (idempotent).
pub fn setup(ns: BorrowedFd<'_>) -> Result<(), PodNetError> {
    netns::run_in(ns, setup_here)?
}

/// iptables capture, the alternative to eBPF for pods labelled
/// `skiff.dev/capture: iptables` (kept to price the capture mechanism
/// alone in `cargo xtask bench compare`, and for hosts where cgroup eBPF
/// cannot be attached). The pod's `nat` table is replaced by:
/// - OUTPUT: TCP the pod opens is redirected to ztunnel's outbound listener
///   (127.0.0.1:15001), except ztunnel's own sockets (marks
///   `MARK_BYPASS`, `MARK_DELIVER`) and loopback;
/// - PREROUTING: TCP arriving from outside goes to ztunnel's plaintext
///   inbound listener (127.0.0.1:15006, `route_localnet` on), except HBONE
///   (15008), which ztunnel itself serves.
///
/// ztunnel reads the original destination with `SO_ORIGINAL_DST`, which
/// conntrack answers for these connections. The pod's `nat` table is
/// Skiff's: rules others put there are replaced.
pub mod iptables {
    use std::{
        io::Write as _,
        os::fd::BorrowedFd,
        process::{Command, Stdio},
    };

    use skiff_core::netns;
    use skiff_ebpf_common::{MARK_BYPASS, MARK_DELIVER, PORT_INBOUND_HBONE, PORT_INBOUND_PLAINTEXT, PORT_OUTBOUND};

    use super::PodNetError;

    const ROUTE_LOCALNET: &str = "/proc/sys/net/ipv4/conf/all/route_localnet";
    /// IPv6 off in the pod: iptables (IPv4) does not capture it, and eBPF's
    /// refusal of native IPv6 needs the connect redirection this pod lacks.
    /// `all` applies to the existing interfaces, `default` to new ones.
    const DISABLE_IPV6: [(&str, &str); 2] = [
        ("/proc/sys/net/ipv6/conf/all/disable_ipv6", "net.ipv6.conf.all.disable_ipv6"),
        ("/proc/sys/net/ipv6/conf/default/disable_ipv6", "net.ipv6.conf.default.disable_ipv6"),
    ];

    /// Turns IPv6 off (a kernel without IPv6 has nothing to turn off).
    fn disable_ipv6() -> Result<(), PodNetError> {
        for (path, name) in DISABLE_IPV6 {
            match std::fs::write(path, "1") {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(PodNetError::Sysctl(name, e)),
            }
        }
        Ok(())
    }

    /// The `nat` table for an iptables-captured pod (iptables-restore input).
    pub fn rules() -> String {
        format!(
            "*nat\n\
             :PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
             :SKIFF_OUTPUT - [0:0]\n:SKIFF_INBOUND - [0:0]\n\
             -A OUTPUT -p tcp -j SKIFF_OUTPUT\n\
             -A SKIFF_OUTPUT -m mark --mark {bypass:#x} -j RETURN\n\
             -A SKIFF_OUTPUT -m mark --mark {deliver:#x} -j RETURN\n\
             -A SKIFF_OUTPUT -d 127.0.0.0/8 -j RETURN\n\
             -A SKIFF_OUTPUT -p tcp -j REDIRECT --to-ports {out}\n\
             -A PREROUTING -p tcp -j SKIFF_INBOUND\n\
             -A SKIFF_INBOUND -i lo -j RETURN\n\
             -A SKIFF_INBOUND -p tcp --dport {hbone} -j RETURN\n\
             -A SKIFF_INBOUND -p tcp -j DNAT --to-destination 127.0.0.1:{inb}\n\
             COMMIT\n",
            bypass = MARK_BYPASS,
            deliver = MARK_DELIVER,
            out = PORT_OUTBOUND,
            hbone = PORT_INBOUND_HBONE,
            inb = PORT_INBOUND_PLAINTEXT,
        )
    }

    fn restore(input: &str) -> Result<(), PodNetError> {
        let err = |stderr: String| PodNetError::Iptables { stderr };
        let mut child = Command::new("iptables-restore")
            .arg("-w")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| err(format!("cannot run iptables-restore: {e} (install the iptables package)")))?;
        child.stdin.take().expect("piped").write_all(input.as_bytes()).map_err(|e| err(e.to_string()))?;
        let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
        if !out.status.success() {
            return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
        }
        Ok(())
    }

    /// Installs the capture rules in a pod's netns (idempotent), with IPv6
    /// turned off there first (it stays off when the rules are removed).
    pub fn install(ns: BorrowedFd<'_>) -> Result<(), PodNetError> {
        netns::run_in(ns, || {
            std::fs::write(ROUTE_LOCALNET, "1").map_err(|e| PodNetError::Sysctl("net.ipv4.conf.all.route_localnet", e))?;
            disable_ipv6()?;
            restore(&rules())
        })?
    }

    /// Removes the capture rules (empties the pod's `nat` table).
    pub fn remove(ns: BorrowedFd<'_>) -> Result<(), PodNetError> {
        netns::run_in(ns, || restore("*nat\nCOMMIT\n"))?
    }

    /// Whether the current netns's `nat` table has Skiff's chains.
    fn has_skiff_chains() -> Result<bool, PodNetError> {
        let out = Command::new("iptables-save")
            .args(["-t", "nat"])
            .output()
            .map_err(|e| PodNetError::Iptables { stderr: format!("cannot run iptables-save: {e}") })?;
        if !out.status.success() {
            return Err(PodNetError::Iptables { stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned() });
        }
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text.lines().any(|l| l.starts_with(":SKIFF_OUTPUT") || l.starts_with(":SKIFF_INBOUND")))
    }

    /// Removes the capture rules if Skiff's chains are there; true if they were.
    pub fn remove_if_present(ns: BorrowedFd<'_>) -> Result<bool, PodNetError> {
        netns::run_in(ns, || {
            if has_skiff_chains()? {
                restore("*nat\nCOMMIT\n")?;
                Ok(true)
            } else {
                Ok(false)
            }
        })?
    }

    /// One netns `uninstall` looked at: whether rules were removed, or why not.
    pub type Cleaned = (std::path::PathBuf, Result<bool, String>);

    /// For `uninstall`: removes iptables capture from every netns named in
    /// `dir` (the runtime's `/var/run/netns`), never from the node's own.
    /// Returns, per netns, whether rules were removed or why not.
    pub fn remove_from_netns_dir(dir: &std::path::Path) -> Result<Vec<Cleaned>, std::io::Error> {
        use std::os::fd::AsFd as _;
        let node: Vec<_> = ["/proc/self/ns/net", "/proc/1/ns/net"]
            .iter()
            .filter_map(|p| netns::open(std::path::Path::new(p)).ok())
            .filter_map(|fd| netns::identity(fd.as_fd()).ok())
            .collect();
        let mut out = Vec::new();
        let mut entries: Vec<_> = std::fs::read_dir(dir)?.filter_map(Result::ok).map(|e| e.path()).collect();
        entries.sort();
        for path in entries {
            let res = netns::open(&path).map_err(|e| skiff_core::report(&e)).and_then(|fd| {
                // Not a netns (or the node's own): nothing to do.
                match netns::identity(fd.as_fd()) {
                    Ok(id) if !node.contains(&id) => remove_if_present(fd.as_fd()).map_err(|e| skiff_core::report(&e)),
                    _ => Ok(false),
                }
            });
            out.push((path, res));
        }
        Ok(out)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Privileged (root, iptables): skipped otherwise.
        #[test]
        fn uninstall_removes_capture_rules_from_pod_netns() {
            let root = std::fs::read_to_string("/proc/self/status")
                .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")));
            let have = Command::new("iptables-save").arg("--version").output().is_ok_and(|o| o.status.success());
            if !root || !have {
                let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0");
                assert!(!ci, "this privileged test must run under CI (needs root and iptables)");
                eprintln!("skipped: needs root and iptables");
                return;
            }
            let name = format!("skiff-ut-ipt-{}", std::process::id());
            let dir = std::env::temp_dir().join(&name);
            std::fs::create_dir_all(&dir).unwrap();
            // The netns and the directory go however the test ends.
            struct Cleanup(String, std::path::PathBuf);
            impl Drop for Cleanup {
                fn drop(&mut self) {
                    let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
                    let _ = std::fs::remove_dir_all(&self.1);
                }
            }
            let _cleanup = Cleanup(name.clone(), dir.clone());
            assert!(Command::new("ip").args(["netns", "add", &name]).status().unwrap().success());
            let path = std::path::PathBuf::from(format!("/var/run/netns/{name}"));
            let fd = netns::open(&path).unwrap();
            use std::os::fd::AsFd as _;
            install(fd.as_fd()).unwrap();
            assert!(netns::run_in(fd.as_fd(), has_skiff_chains).unwrap().unwrap());
            std::os::unix::fs::symlink(&path, dir.join("pod")).unwrap();
            let res = remove_from_netns_dir(&dir);
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
            let res = res.unwrap();
            assert_eq!(res.len(), 1);
            assert_eq!(res[0].1, Ok(true), "{res:?}");
            assert!(!netns::run_in(fd.as_fd(), has_skiff_chains).unwrap().unwrap());
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
