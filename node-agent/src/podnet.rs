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
//!
//! The route and rules are set over rtnetlink; each request is the one the
//! `ip` command named in its error sends (same header, attributes and
//! flags). The netlink socket is opened on the thread that has entered the
//! pod's netns (a socket stays in the netns it was created in), by a
//! current-thread runtime that lives for one call.

use std::{net::Ipv4Addr, os::fd::BorrowedFd};

use futures_util::TryStreamExt as _;
use rtnetlink::{
    packet_route::{
        route::{RouteProtocol, RouteScope, RouteType},
        rule::{RuleAction, RuleAttribute, RuleMessage},
        AddressFamily,
    },
    Handle, IpVersion, RouteMessageBuilder,
};
use skiff_core::netns;
use skiff_ebpf_common::{DELIVER_ROUTE_TABLE, MARK_DELIVER};

/// Priority of the delivery rule: before the `local` table.
const RULE_PREF: u32 = 10;
/// Where the `local` table lookup moves to.
const LOCAL_PREF: u32 = 100;
/// `RT_TABLE_LOCAL`.
const TABLE_LOCAL: u32 = libc::RT_TABLE_LOCAL as u32;

/// Errors from setting up a pod's netns.
#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    /// Entering the pod's netns failed.
    #[error("entering the pod network namespace")]
    Netns(#[from] netns::NetnsError),
    /// A sysctl could not be written.
    #[error("writing sysctl {0}")]
    Sysctl(&'static str, #[source] std::io::Error),
    /// The netlink socket, or the runtime that drives it, could not be set up.
    #[error("cannot open a netlink socket in the pod network namespace")]
    NetlinkSocket(#[source] std::io::Error),
    /// The pod's netns has no `lo` device.
    #[error("no `lo` device in the pod network namespace")]
    NoLoopback,
    /// A netlink request failed; `op` is the `ip` command it stands for.
    #[error("netlink `{op}` failed")]
    Netlink {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    /// `iptables-restore` could not run or failed.
    #[error("iptables-restore failed: {stderr}")]
    Iptables { stderr: String },
}

fn netlink(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> PodNetError {
    let op = op.into();
    move |source| PodNetError::Netlink { op, source }
}

const FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";

/// What the delivery settings change in the IPv4 rules, given the rules
/// there now as (preference, table) pairs. Setup is idempotent: the
/// delivery rule and the moved `local` lookup are added only when no rule
/// with that preference looks up that table, and the `local` lookup at
/// preference 0 is removed only when it is there.
#[derive(Debug, Default, PartialEq, Eq)]
struct RuleChanges {
    add_deliver: bool,
    add_local: bool,
    del_local_at_0: bool,
}

fn rule_changes(rules: &[(u32, u32)]) -> RuleChanges {
    RuleChanges {
        add_deliver: !rules.contains(&(RULE_PREF, DELIVER_ROUTE_TABLE)),
        add_local: !rules.contains(&(LOCAL_PREF, TABLE_LOCAL)),
        del_local_at_0: rules.contains(&(0, TABLE_LOCAL)),
    }
}

/// A rule's (preference, table), read as `ip rule show` reads them: the
/// kernel leaves out `FRA_PRIORITY` for preference 0, and a table above 255
/// is in `FRA_TABLE` rather than the header.
fn pref_and_table(rule: &RuleMessage) -> (u32, u32) {
    let mut pref = 0;
    let mut table = u32::from(rule.header.table);
    for attr in &rule.attributes {
        match attr {
            RuleAttribute::Priority(p) => pref = *p,
            RuleAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    (pref, table)
}

async fn loopback_index(nl: &Handle) -> Result<u32, PodNetError> {
    let mut links = nl.link().get().match_name("lo").execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(link.header.index),
        Ok(None) => Err(PodNetError::NoLoopback),
        // The kernel answers ENODEV for a name it does not know.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == libc::ENODEV => Err(PodNetError::NoLoopback),
        Err(e) => Err(netlink("ip link show lo")(e)),
    }
}

/// `ip -4 rule add [fwmark MARK] lookup TABLE pref PREF` (`what`: that
/// command, for the error).
async fn add_rule(nl: &Handle, mark: Option<u32>, table: u32, pref: u32, what: String) -> Result<(), PodNetError> {
    let mut req = nl.rule().add().v4().action(RuleAction::ToTable);
    if let Some(m) = mark {
        req = req.fw_mark(m);
    }
    req.table_id(table).priority(pref).execute().await.map_err(netlink(what))
}

/// The routing part of the delivery settings, over `nl` (a socket opened in
/// the pod's netns). Each request is the one the `ip` command in its error
/// would send: same table, preference, mark (no mask: the kernel then
/// matches all 32 bits), route type, scope, protocol and device.
async fn route_delivery(nl: &Handle) -> Result<(), PodNetError> {
    let lo = loopback_index(nl).await?;
    // `ip -4 route replace local 0.0.0.0/0 dev lo table DELIVER_ROUTE_TABLE`
    // (ip's defaults for a `local` route: scope host, proto boot).
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .output_interface(lo)
        .table_id(DELIVER_ROUTE_TABLE)
        .kind(RouteType::Local)
        .scope(RouteScope::Host)
        .protocol(RouteProtocol::Boot)
        .build();
    nl.route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(netlink(format!("ip -4 route replace local 0.0.0.0/0 dev lo table {DELIVER_ROUTE_TABLE}")))?;

    let rules: Vec<(u32, u32)> = nl
        .rule()
        .get(IpVersion::V4)
        .execute()
        .map_ok(|r| pref_and_table(&r))
        .try_collect()
        .await
        .map_err(netlink("ip -4 rule show"))?;
    let changes = rule_changes(&rules);
    if changes.add_deliver {
        add_rule(nl, Some(MARK_DELIVER), DELIVER_ROUTE_TABLE, RULE_PREF, format!("ip -4 rule add fwmark {MARK_DELIVER:#x} lookup {DELIVER_ROUTE_TABLE} pref {RULE_PREF}")).await?;
    }
    if changes.add_local {
        add_rule(nl, None, TABLE_LOCAL, LOCAL_PREF, format!("ip -4 rule add pref {LOCAL_PREF} lookup local")).await?;
    }
    if changes.del_local_at_0 {
        // As `ip rule del` sends it: no action, the preference given
        // explicitly (so only the rule at 0 matches).
        let mut rule = RuleMessage::default();
        rule.header.family = AddressFamily::Inet;
        rule.header.table = libc::RT_TABLE_LOCAL;
        rule.header.action = RuleAction::Unspec;
        rule.attributes.push(RuleAttribute::Priority(0));
        nl.rule().del(rule).execute().await.map_err(netlink("ip -4 rule del pref 0 lookup local"))?;
    }
    Ok(())
}

fn setup_here() -> Result<(), PodNetError> {
    std::fs::write(FWMARK_ACCEPT, "1").map_err(|e| PodNetError::Sysctl("net.ipv4.tcp_fwmark_accept", e))?;
    // A socket belongs to the netns of the thread that creates it: this
    // thread has entered the pod's netns, and a current-thread runtime
    // creates the socket (and runs everything) on it.
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().map_err(PodNetError::NetlinkSocket)?;
    rt.block_on(async {
        let (conn, nl, _) = rtnetlink::new_connection().map_err(PodNetError::NetlinkSocket)?;
        tokio::spawn(conn);
        route_delivery(&nl).await
    })
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
            // The netns and the directory go however the test ends.
            let dir = tempfile::tempdir().unwrap();
            struct DelNetns(String);
            impl Drop for DelNetns {
                fn drop(&mut self) {
                    let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
                }
            }
            let _cleanup = DelNetns(name.clone());
            assert!(Command::new("ip").args(["netns", "add", &name]).status().unwrap().success());
            let path = std::path::PathBuf::from(format!("/var/run/netns/{name}"));
            let fd = netns::open(&path).unwrap();
            use std::os::fd::AsFd as _;
            install(fd.as_fd()).unwrap();
            assert!(netns::run_in(fd.as_fd(), has_skiff_chains).unwrap().unwrap());
            std::os::unix::fs::symlink(&path, dir.path().join("pod")).unwrap();
            let res = remove_from_netns_dir(dir.path());
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
            let res = res.unwrap();
            assert_eq!(res.len(), 1);
            assert_eq!(res[0].1, Ok(true), "{res:?}");
            assert!(!netns::run_in(fd.as_fd(), has_skiff_chains).unwrap().unwrap());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn rules_already_in_place_are_left_alone() {
        let (local0, deliver, local100) = ((0, TABLE_LOCAL), (RULE_PREF, DELIVER_ROUTE_TABLE), (LOCAL_PREF, TABLE_LOCAL));
        let (main, default) = ((32766, 254), (32767, 253));
        let changes = |add_deliver, add_local, del_local_at_0| RuleChanges { add_deliver, add_local, del_local_at_0 };
        for (rules, want) in [
            // A fresh netns.
            (&[local0, main, default][..], changes(true, true, true)),
            // Set up already.
            (&[deliver, local100, main, default][..], changes(false, false, false)),
            // Interrupted after the first rule.
            (&[local0, deliver, main, default][..], changes(false, true, true)),
            // Interrupted before the delete.
            (&[local0, deliver, local100, main, default][..], changes(false, false, true)),
            // Same preference, another table: not the delivery rule.
            (&[(RULE_PREF, 254), local100, main, default][..], changes(true, false, false)),
        ] {
            assert_eq!(rule_changes(rules), want, "{rules:?}");
        }
    }

    /// Privileged (root): skipped otherwise. The expected text is what the
    /// `ip` commands podnet ran before it spoke netlink left behind.
    #[test]
    fn setup_routes_marked_packets_over_lo_and_is_idempotent() {
        if !nix::unistd::geteuid().is_root() {
            let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0");
            assert!(!ci, "this privileged test must run under CI (needs root)");
            eprintln!("skipped: needs root");
            return;
        }
        let name = format!("skiff-ut-podnet-{}", std::process::id());
        struct DelNetns(String);
        impl Drop for DelNetns {
            fn drop(&mut self) {
                let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
            }
        }
        assert!(Command::new("ip").args(["netns", "add", &name]).status().unwrap().success());
        let _cleanup = DelNetns(name.clone());
        let fd = netns::open(std::path::Path::new(&format!("/var/run/netns/{name}"))).unwrap();
        let show = |args: &[&str]| {
            let out = Command::new("ip").args(["-n", &name, "-d", "-4"]).args(args).output().unwrap();
            assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8(out.stdout).unwrap()
        };
        use std::os::fd::AsFd as _;
        for _ in 0..2 {
            setup(fd.as_fd()).unwrap();
            assert_eq!(
                show(&["rule", "show"]),
                "10:\tfrom all fwmark 0x53a lookup 100 proto unspec\n\
                 100:\tfrom all lookup local proto unspec\n\
                 32766:\tfrom all lookup main proto kernel\n\
                 32767:\tfrom all lookup default proto kernel\n"
            );
            assert_eq!(show(&["route", "show", "table", "100"]), "local default dev lo proto boot scope host \n");
            let accept = netns::run_in(fd.as_fd(), || std::fs::read_to_string(FWMARK_ACCEPT).unwrap()).unwrap();
            assert_eq!(accept.trim(), "1");
        }
    }
}
