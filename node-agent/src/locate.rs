//! Finding a pod's network namespace on a real node.
//!
//! Three ways, tried in order by [`Chain`]:
//! 1. [`CniNetns`]: the netns the CNI plugin reported for the pod's sandbox
//!    (`skiff-cni` ADD). Exact, and known before the pod's containers start.
//! 2. [`AnnotatedNetns`]: the local mesh's annotation.
//! 3. [`ProcNetns`]: pods that were running before Skiff was installed (or
//!    while node-agent was down): every netns some process on the node is
//!    in, matched by the pod's IP.
//!
//! A netns whose sandbox the CNI plugin reported torn down (DEL) is never
//! returned again, by any locator: between DEL and the sandbox's last
//! process exiting, the old netns still carries the pod's IP.

use std::{
    collections::HashMap,
    fs::File,
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
    sync::Mutex,
};

use skiff_core::{model::Workload, netns};
use tracing::debug;

use crate::sandbox::{NetnsId, SharedCni};

/// How node-agent finds a pod's network namespace.
pub trait NetnsLocator: Send {
    fn open(&self, pod: &Workload) -> Result<OwnedFd, String>;
}

/// Local mesh: the harness records each pod's netns path in an annotation.
pub struct AnnotatedNetns;

impl NetnsLocator for AnnotatedNetns {
    fn open(&self, pod: &Workload) -> Result<OwnedFd, String> {
        let path = pod
            .netns_path
            .as_ref()
            .ok_or_else(|| format!("no `{}` annotation", skiff_core::ANNOTATION_LOCAL_NETNS))?;
        netns::open(path).map_err(|e| skiff_core::report(&e))
    }
}

/// The netns the CNI plugin reported for the pod.
pub struct CniNetns(pub SharedCni);

impl NetnsLocator for CniNetns {
    fn open(&self, pod: &Workload) -> Result<OwnedFd, String> {
        let state = self.0.lock().map_err(|_| "CNI state lock poisoned".to_owned())?;
        let rec = state
            .pods
            .get(&format!("{}/{}", pod.namespace, pod.name))
            .ok_or_else(|| "no CNI ADD seen for the pod".to_owned())?;
        if rec.uid.as_ref().is_some_and(|u| *u != pod.uid) {
            return Err(format!("CNI ADD was for another pod of the same name (uid {:?})", rec.uid));
        }
        rec.netns.try_clone().map_err(|e| format!("duplicating netns fd of {}: {e}", rec.netns_path.display()))
    }
}

/// Locators tried in order; the first that finds a netns not torn down wins.
pub struct Chain {
    pub locators: Vec<(&'static str, Box<dyn NetnsLocator>)>,
    pub cni: SharedCni,
}

impl NetnsLocator for Chain {
    fn open(&self, pod: &Workload) -> Result<OwnedFd, String> {
        let mut errors = Vec::new();
        for (name, l) in &self.locators {
            match l.open(pod) {
                Ok(fd) => {
                    let id = netns::identity(fd.as_fd()).map_err(|e| format!("{name}: fstat netns: {e}"))?;
                    if self.cni.lock().map(|mut s| s.is_released(id)).unwrap_or(true) {
                        errors.push(format!("{name}: netns {id:?} belongs to a sandbox the CNI plugin tore down"));
                        continue;
                    }
                    debug!(pod = %format!("{}/{}", pod.namespace, pod.name), via = name, "netns located");
                    return Ok(fd);
                }
                Err(e) => errors.push(format!("{name}: {e}")),
            }
        }
        Err(errors.join("; "))
    }
}

/// Addresses seen in one netns.
struct Seen {
    pid: u32,
    ips: Vec<IpAddr>,
}

/// Finds a running pod's netns by scanning `/proc/*/ns/net` and matching the
/// pod's IP against each netns' interface addresses.
///
/// Addresses are read in-process: a helper thread `setns`es into the netns
/// and calls `getifaddrs` (its netlink socket belongs to that netns). Results
/// are cached by netns inode; an inode no process holds any more is
/// forgotten on the next scan. A miss re-reads every cached netns once (an
/// address can be added after the netns was first seen).
pub struct ProcNetns {
    proc: PathBuf,
    cache: Mutex<HashMap<NetnsId, Seen>>,
}

impl Default for ProcNetns {
    fn default() -> Self {
        Self::new("/proc")
    }
}

impl ProcNetns {
    pub fn new(proc: impl Into<PathBuf>) -> Self {
        ProcNetns { proc: proc.into(), cache: Mutex::new(HashMap::new()) }
    }

    /// Every netns some process is in: inode → one pid in it.
    fn scan(&self) -> HashMap<NetnsId, u32> {
        let mut out = HashMap::new();
        let Ok(dir) = std::fs::read_dir(&self.proc) else { return out };
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            // stat follows the magic link to the nsfs inode.
            if let Ok(md) = std::fs::metadata(entry.path().join("ns/net")) {
                use std::os::unix::fs::MetadataExt as _;
                out.entry((md.dev(), md.ino())).or_insert(pid);
            }
        }
        out
    }

    fn open_pid(&self, pid: u32) -> Option<(OwnedFd, NetnsId)> {
        let fd = OwnedFd::from(File::open(self.proc.join(pid.to_string()).join("ns/net")).ok()?);
        let id = netns::identity(fd.as_fd()).ok()?;
        Some((fd, id))
    }

    fn addresses(fd: &OwnedFd) -> Vec<IpAddr> {
        netns::run_in(fd.as_fd(), || {
            nix::ifaddrs::getifaddrs()
                .map(|it| {
                    it.filter_map(|a| a.address)
                        .filter_map(|a| {
                            a.as_sockaddr_in()
                                .map(|s| IpAddr::V4(s.ip()))
                                .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
                        })
                        .collect()
                })
                .unwrap_or_default()
        })
        .unwrap_or_default()
    }

    fn host_ids() -> Vec<NetnsId> {
        ["/proc/self/ns/net", "/proc/1/ns/net"]
            .iter()
            .filter_map(|p| File::open(p).ok().and_then(|f| netns::identity(f.as_fd()).ok()))
            .collect()
    }

    /// The netns holding `ip`, if exactly one does.
    pub fn find(&self, ip: Ipv4Addr) -> Result<OwnedFd, String> {
        let live = self.scan();
        let hosts = Self::host_ids();
        let mut cache = self.cache.lock().map_err(|_| "netns cache lock poisoned".to_owned())?;
        cache.retain(|id, _| live.contains_key(id));
        for refresh in [false, true] {
            for (id, &pid) in &live {
                if hosts.contains(id) {
                    continue;
                }
                if refresh || !cache.contains_key(id) {
                    let Some((fd, real)) = self.open_pid(pid) else { continue };
                    if real != *id {
                        continue; // the pid moved on or was reused
                    }
                    cache.insert(*id, Seen { pid, ips: Self::addresses(&fd) });
                }
            }
            let hits: Vec<(NetnsId, u32)> =
                cache.iter().filter(|(_, s)| s.ips.contains(&IpAddr::V4(ip))).map(|(id, s)| (*id, s.pid)).collect();
            match hits.as_slice() {
                [] => continue,
                [(id, pid)] => {
                    // Open again and check it is still that netns.
                    return match self.open_pid(*pid) {
                        Some((fd, real)) if real == *id => Ok(fd),
                        _ => Err(format!("process {pid} holding {ip} exited while opening its netns")),
                    };
                }
                many => {
                    return Err(format!(
                        "{} network namespaces hold {ip} (pids {:?}); refusing to guess",
                        many.len(),
                        many.iter().map(|(_, p)| p).collect::<Vec<_>>()
                    ))
                }
            }
        }
        Err(format!("no process on this node is in a network namespace with address {ip}"))
    }
}

impl NetnsLocator for ProcNetns {
    fn open(&self, pod: &Workload) -> Result<OwnedFd, String> {
        let ip = pod.ip.ok_or_else(|| "pod has no IP".to_owned())?;
        self.find(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::{CniRecord, RELEASED_TTL};
    use std::{
        path::Path,
        process::{Child, Command, Stdio},
        time::{Duration, Instant},
    };

    fn privileged() -> bool {
        let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0");
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        assert!(!ci, "privileged test must run under CI, but this is not root");
        eprintln!("SKIPPED: needs root (creates a network namespace)");
        false
    }

    /// A netns with an address and a process in it, removed on drop.
    struct TestNs {
        name: String,
        child: Option<Child>,
    }
    impl Drop for TestNs {
        fn drop(&mut self) {
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        }
    }

    fn ip(args: &[&str]) {
        let st = Command::new("ip").args(args).status().expect("run ip");
        assert!(st.success(), "ip {args:?} failed");
    }

    fn workload(ns: &str, name: &str, uid: &str) -> Workload {
        Workload {
            uid: uid.into(),
            namespace: ns.into(),
            name: name.into(),
            workload_name: name.into(),
            service_account: "default".into(),
            node: Some("n".into()),
            ip: Some("10.0.0.1".parse().unwrap()),
            labels: Default::default(),
            host_network: false,
            phase: None,
            netns_path: None,
            named_ports: Default::default(),
        }
    }

    /// Any file stands in for a netns here: the locators only fstat it.
    fn fd(path: &str) -> OwnedFd {
        OwnedFd::from(File::open(path).unwrap())
    }

    struct Fixed(&'static str);
    impl NetnsLocator for Fixed {
        fn open(&self, _: &Workload) -> Result<OwnedFd, String> {
            Ok(fd(self.0))
        }
    }

    #[test]
    fn cni_records_match_by_name_and_uid() {
        let state: SharedCni = Default::default();
        let f = fd("/dev/null");
        let id = netns::identity(f.as_fd()).unwrap();
        state.lock().unwrap().pods.insert(
            "shop/web".into(),
            CniRecord {
                uid: Some("u1".into()),
                container_id: "c".into(),
                netns_path: "/dev/null".into(),
                netns: f,
                id,
                ips: vec![],
                added: Instant::now(),
            },
        );
        let loc = CniNetns(state);
        assert_eq!(netns::identity(loc.open(&workload("shop", "web", "u1")).unwrap().as_fd()).unwrap(), id);
        // Same name, another pod (a StatefulSet pod recreated): not this sandbox.
        assert!(loc.open(&workload("shop", "web", "u2")).unwrap_err().contains("another pod"));
        assert!(loc.open(&workload("shop", "api", "u3")).unwrap_err().contains("no CNI ADD"));
    }

    #[test]
    fn chain_takes_the_first_hit_and_never_a_torn_down_netns() {
        let state: SharedCni = Default::default();
        let chain = Chain {
            locators: vec![("first", Box::new(Fixed("/dev/null"))), ("second", Box::new(Fixed("/dev/zero")))],
            cni: state.clone(),
        };
        let w = workload("shop", "web", "u1");
        let null = netns::identity(fd("/dev/null").as_fd()).unwrap();
        let zero = netns::identity(fd("/dev/zero").as_fd()).unwrap();
        assert_eq!(netns::identity(chain.open(&w).unwrap().as_fd()).unwrap(), null);
        // The first one's netns belongs to a sandbox CNI DEL tore down: skipped.
        state.lock().unwrap().released.insert(null, Instant::now());
        assert_eq!(netns::identity(chain.open(&w).unwrap().as_fd()).unwrap(), zero);
        state.lock().unwrap().released.insert(zero, Instant::now());
        let e = chain.open(&w).unwrap_err();
        assert!(e.contains("first:") && e.contains("second:") && e.contains("tore down"), "{e}");
        // Tombstones expire.
        if let Some(old) = Instant::now().checked_sub(RELEASED_TTL + Duration::from_secs(1)) {
            state.lock().unwrap().released.insert(null, old);
            assert_eq!(netns::identity(chain.open(&w).unwrap().as_fd()).unwrap(), null);
        }
    }

    #[test]
    fn proc_locator_finds_a_netns_by_address_and_forgets_it_when_its_processes_exit() {
        if !privileged() {
            return;
        }
        let name = format!("skiff-procns-{}-{}", std::process::id(), std::time::UNIX_EPOCH.elapsed().unwrap().as_nanos() % 1_000_000);
        let mut ns = TestNs { name: name.clone(), child: None };
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
        ip(&["-n", &name, "addr", "add", "10.254.77.9/32", "dev", "v0"]);
        let addr: Ipv4Addr = "10.254.77.9".parse().unwrap();
        let loc = ProcNetns::default();
        // No process in it yet: /proc cannot see it.
        assert!(loc.find(addr).is_err());
        let child = Command::new("nsenter")
            .args([format!("--net=/var/run/netns/{name}").as_str(), "sleep", "60"])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sleep in netns");
        ns.child = Some(child);
        let want = netns::identity(netns::open(Path::new(&format!("/var/run/netns/{name}"))).unwrap().as_fd()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let fd = loop {
            match loc.find(addr) {
                Ok(fd) => break fd,
                Err(e) if Instant::now() > deadline => panic!("not found: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        assert_eq!(netns::identity(fd.as_fd()).unwrap(), want);
        assert!(loc.cache.lock().unwrap().contains_key(&want));
        // An address nobody has.
        assert!(loc.find("10.254.77.10".parse().unwrap()).unwrap_err().contains("no process"));
        // The process exits: the cache entry goes with it.
        let mut c = ns.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
        assert!(loc.find(addr).is_err());
        assert!(!loc.cache.lock().unwrap().contains_key(&want));
    }
}
