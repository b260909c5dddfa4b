//! Loading, attaching and pinning the capture programs, and the maps
//! node-agent writes.
//!
//! Layout under the pin directory (default `/sys/fs/bpf/skiff`):
//! - `maps/<NAME>`: every map, pinned by name, so a restarted node-agent and
//!   ztunnel open the same maps;
//! - `links/<program>`: the cgroup attachments (sock_release, connect4/6,
//!   getpeername4/6, bind4/6, sockops, getsockopt);
//! - `links/inbound-<netns cookie>`: the per-pod sk_lookup attachment.
//!
//! Links are pinned, so capture outlives node-agent: restarting it opens no
//! gap. Removing a pin detaches the program.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap, Map, MapData, PerCpuArray},
    programs::{
        links::{CgroupAttachMode, FdLink},
        CgroupSockopt, SkLookup,
    },
    Ebpf, EbpfLoader,
};
use skiff_ebpf_common::{
    EnrolledPod, PodHandshakes, PortDst, PortKey, CONFIG_POD_HANDSHAKES, DEFAULT_HANDSHAKES, DEFAULT_POD_HANDSHAKES,
    STAT_COUNT, STAT_NAMES,
};

/// The compiled programs, built by build.rs.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/skiff-ebpf"));

/// Cgroup-attached programs, by ELF function name, in the order they are
/// attached: sock_release first, so every socket that capture keeps state
/// for gives it back when it closes.
const CGROUP_PROGRAMS: [&str; 9] = [
    "skiff_release",
    "skiff_connect4",
    "skiff_connect6",
    "skiff_peer4",
    "skiff_peer6",
    "skiff_bind4",
    "skiff_bind6",
    "skiff_sockops",
    "skiff_sockopt",
];
const INBOUND_PROGRAM: &str = "skiff_inbound";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Errors from the capture layer.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// bpffs is not mounted at the pin directory and could not be mounted.
    #[error("{path} is not on a bpf filesystem and mounting one failed")]
    NoBpffs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    /// A file-system operation on the pin directory failed.
    #[error("{path}")]
    Fs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Loading the object or a program into the kernel failed (verifier,
    /// missing kernel feature, not root).
    #[error("loading eBPF program {name}")]
    Program {
        name: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    /// Loading the object failed.
    #[error("loading the eBPF object")]
    Load(#[source] aya::EbpfError),
    /// A program's link could not be made pinnable.
    #[error("link of eBPF program {name}")]
    Link {
        name: String,
        #[source]
        source: aya::programs::links::LinkError,
    },
    /// Pinning a link failed.
    #[error("pinning {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    /// A map operation failed.
    #[error("map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    /// The object lacks an expected map or program (build mismatch).
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
}

fn fs_err(path: &Path) -> impl FnOnce(std::io::Error) -> BpfError + '_ {
    move |source| BpfError::Fs { path: path.to_owned(), source }
}

/// Makes sure `dir` can hold pins: mounts bpffs on `/sys/fs/bpf` when it is
/// missing there (it is not mounted by default on every distribution).
pub fn ensure_bpffs(dir: &Path) -> Result<(), BpfError> {
    let mount_point = Path::new("/sys/fs/bpf");
    let on_bpffs = |p: &Path| nix::sys::statfs::statfs(p).map(|s| s.filesystem_type().0 as i64 == BPF_FS_MAGIC);
    if dir.starts_with(mount_point) && !on_bpffs(mount_point).unwrap_or(false) {
        fs::create_dir_all(mount_point).map_err(fs_err(mount_point))?;
        nix::mount::mount(Some("bpf"), mount_point, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .map_err(|source| BpfError::NoBpffs { path: mount_point.to_owned(), source })?;
        tracing::info!(path = %mount_point.display(), "mounted bpffs");
    }
    fs::create_dir_all(dir).map_err(fs_err(dir))?;
    match on_bpffs(dir) {
        Ok(true) => Ok(()),
        Ok(false) => Err(BpfError::NoBpffs { path: dir.to_owned(), source: nix::Error::EINVAL }),
        Err(source) => Err(BpfError::NoBpffs { path: dir.to_owned(), source }),
    }
}

/// The loaded capture programs and the maps node-agent writes.
pub struct Capture {
    ebpf: Ebpf,
    links_dir: PathBuf,
    enrolled: HashMap<MapData, u64, EnrolledPod>,
    pod_handshakes: HashMap<MapData, u64, PodHandshakes>,
    reclaimed: HashMap<MapData, u64, u64>,
    orig_by_tuple: HashMap<MapData, PortKey, PortDst>,
    limits: CaptureLimits,
}

/// Bounds on the one shared capture map, `ORIG_BY_TUPLE`: captured
/// connections whose handshake with ztunnel's listener is in progress, on
/// the node and per pod, and how long an entry may wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaptureLimits {
    /// Size of `ORIG_BY_TUPLE`; takes effect when the map is created (a
    /// pinned map keeps its size).
    pub node: u32,
    /// Per pod, written at every start.
    pub per_pod: u64,
    /// Entries older than this are removed by [`Capture::sweep`].
    pub handshake_timeout: std::time::Duration,
    /// Size of the per-pod maps (`ENROLLED`, `INBOUND_SOCKS`,
    /// `POD_HANDSHAKES`, `RECLAIMED`), when they are created.
    pub pods: u32,
    /// Size of `MESH_SOCKS`, when it is created.
    pub mesh_sockets: u32,
}

impl Default for CaptureLimits {
    fn default() -> Self {
        CaptureLimits {
            node: DEFAULT_HANDSHAKES,
            per_pod: DEFAULT_POD_HANDSHAKES,
            handshake_timeout: std::time::Duration::from_secs(180),
            pods: skiff_ebpf_common::MAX_PODS,
            mesh_sockets: skiff_ebpf_common::DEFAULT_MESH_SOCKETS,
        }
    }
}

/// The maps `CaptureLimits::node` sizes.
const SIZED_MAPS: [&str; 1] = ["ORIG_BY_TUPLE"];
/// The maps `CaptureLimits::pods` sizes.
const PER_POD_MAPS: [&str; 4] = ["ENROLLED", "INBOUND_SOCKS", "POD_HANDSHAKES", "RECLAIMED"];

/// What one [`Capture::sweep`] removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Entries past the handshake timeout, per netns cookie.
    pub expired: BTreeMap<u64, u64>,
    /// Entries and counters of netns that are not enrolled.
    pub orphaned: usize,
}

/// Which `ORIG_BY_TUPLE` entries a sweep removes: those of netns that are
/// not enrolled (`Err`, no slot to give back: their counters go too), and
/// those older than `timeout` (`Ok`, counted in `RECLAIMED`).
fn stale_entry(v: &PortDst, netns: u64, enrolled: &BTreeSet<u64>, now_secs: u64, timeout: std::time::Duration) -> Option<Result<(), ()>> {
    if !enrolled.contains(&netns) {
        return Some(Err(()));
    }
    (now_secs.saturating_sub(u64::from(v.created)) > timeout.as_secs()).then_some(Ok(()))
}

fn monotonic_secs() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map(|t| t.tv_sec() as u64).unwrap_or(0)
}

/// One program's (or the object's) verdict from [`preflight`].
#[derive(Debug, serde::Serialize)]
pub struct Preflight {
    pub program: String,
    /// None: the kernel loaded it (the verifier accepted it).
    pub error: Option<String>,
}

/// Whether this kernel takes Skiff's capture: the object (its maps, the
/// socket storage among them needing BTF) and every program, loaded into
/// the kernel and verified — never attached, and the maps (which the
/// object pins by name) pinned only in a bpffs of its own, mounted for the
/// check and removed after it: the node's pins are never touched. What
/// `skiff check --pre` runs on a node.
pub fn preflight() -> Vec<Preflight> {
    let fail = |e: String| vec![Preflight { program: "maps and object".into(), error: Some(e) }];
    let dir = std::env::temp_dir().join(format!("skiff-preflight-{}", std::process::id()));
    if let Err(e) = fs::create_dir_all(&dir) {
        return fail(format!("{}: {e}", dir.display()));
    }
    if let Err(e) = nix::mount::mount(Some("bpf"), &dir, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>) {
        let _ = fs::remove_dir(&dir);
        return fail(format!("mounting a bpffs for the check at {}: {e}", dir.display()));
    }
    let out = preflight_in(&dir);
    // The check's own bpffs goes, and its pins with it.
    let _ = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH);
    let _ = fs::remove_dir(&dir);
    out
}

fn preflight_in(pins: &Path) -> Vec<Preflight> {
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(pins);
    let mut ebpf = match loader.load(PROGRAMS) {
        Ok(e) => e,
        Err(e) => return vec![Preflight { program: "maps and object".into(), error: Some(skiff_core::report(&e)) }],
    };
    let mut out = vec![Preflight { program: "maps and object".into(), error: None }];
    let names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_owned()).collect();
    for name in names {
        let err = match ebpf.program_mut(&name) {
            Some(aya::programs::Program::CgroupSockAddr(p)) => p.load().err(),
            Some(aya::programs::Program::SockOps(p)) => p.load().err(),
            Some(aya::programs::Program::CgroupSock(p)) => p.load().err(),
            Some(aya::programs::Program::CgroupSockopt(p)) => p.load().err(),
            Some(aya::programs::Program::SkLookup(p)) => p.load().err(),
            _ => {
                out.push(Preflight { program: name, error: Some("a program of a type this build does not expect".into()) });
                continue;
            }
        };
        out.push(Preflight { program: name, error: err.map(|e| skiff_core::report(&e)) });
    }
    out.sort_by(|a, b| a.program.cmp(&b.program));
    out
}

impl Capture {
    /// Loads the programs, reusing pinned maps, and attaches every cgroup
    /// program under `cgroup` that is not attached (pinned) already.
    ///
    /// Attachments are BPF links, which the kernel always treats as
    /// multi-attach: other agents' programs on the same cgroup keep running
    /// (the link API refuses the legacy `ALLOW_MULTI` flag, hence `Single`).
    pub fn install(pin_dir: &Path, cgroup: BorrowedFd<'_>, limits: CaptureLimits) -> Result<Capture, BpfError> {
        ensure_bpffs(pin_dir)?;
        let maps_dir = pin_dir.join("maps");
        let links_dir = pin_dir.join("links");
        for d in [&maps_dir, &links_dir] {
            fs::create_dir_all(d).map_err(fs_err(d))?;
        }
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&maps_dir);
        let sizes = PER_POD_MAPS
            .iter()
            .map(|m| (*m, limits.pods, "--max-pods"))
            .chain(SIZED_MAPS.iter().map(|m| (*m, limits.node, "--max-captured-handshakes")))
            .chain([("MESH_SOCKS", limits.mesh_sockets, "--max-mesh-sockets")]);
        for (name, size, flag) in sizes {
            loader.map_max_entries(name, size);
            // A pinned map is reused as it is (capture state survives
            // restarts): a new size applies once it is recreated.
            let Ok(info) = aya::maps::MapInfo::from_pin(maps_dir.join(name)) else { continue };
            if info.max_entries() != size {
                tracing::warn!(
                    map = name,
                    pinned = info.max_entries(),
                    wanted = size,
                    flag,
                    "the pinned map keeps its size: the flag takes effect after `skiff-node-agent uninstall` and a restart"
                );
            }
            if SIZED_MAPS.contains(&name) && u64::from(info.max_entries()) <= limits.per_pod {
                tracing::error!(
                    map = name,
                    pinned = info.max_entries(),
                    per_pod = limits.per_pod,
                    "the pinned map is not larger than one pod's quota (--max-pod-captured-handshakes): one pod can fill it"
                );
            }
        }
        let mut ebpf = loader.load(PROGRAMS).map_err(BpfError::Load)?;
        let config = ebpf.take_map("CONFIG").ok_or(BpfError::Missing("CONFIG map"))?;
        let mut config: aya::maps::Array<MapData, u64> =
            aya::maps::Array::try_from(config).map_err(|source| BpfError::Map { map: "CONFIG", source })?;
        config.set(CONFIG_POD_HANDSHAKES, limits.per_pod, 0).map_err(|source| BpfError::Map { map: "CONFIG", source })?;
        // Which build's programs the pinned links run. Links are kept
        // across restarts (capture never lapses), so after an upgrade the
        // previous build's programs stay attached until they are replaced
        // (`skiff-node-agent uninstall`, or a reboot): say so loudly. The
        // fingerprint lives in the pinned `BUILD` map (bpffs holds no
        // plain files).
        let build = fnv1a(PROGRAMS).max(1);
        let any_pinned = CGROUP_PROGRAMS.iter().any(|n| links_dir.join(n).exists());
        let build_map = ebpf.take_map("BUILD").ok_or(BpfError::Missing("BUILD map"))?;
        let mut build_map: aya::maps::Array<MapData, u64> =
            aya::maps::Array::try_from(build_map).map_err(|source| BpfError::Map { map: "BUILD", source })?;
        let pinned = build_map.get(&0, 0).unwrap_or(0);
        if !any_pinned {
            build_map.set(0, build, 0).map_err(|source| BpfError::Map { map: "BUILD", source })?;
        } else if pinned != build {
            tracing::warn!(
                pinned_build = %format!("{pinned:016x}"),
                this_build = %format!("{build:016x}"),
                "capture programs of another build (0: one that did not record it) are attached and kept (pinned links): this build's programs are NOT in force until `skiff-node-agent uninstall` and a restart (or a reboot)"
            );
        }
        let program_err = |name: &str| {
            let name = name.to_owned();
            move |source| BpfError::Program { name, source }
        };
        // Load, attach to `cgroup` and take the link: the same steps for
        // each cgroup program type (aya gives them no common trait).
        macro_rules! attach_link {
            ($p:expr, $name:expr) => {{
                let (p, name) = ($p, $name);
                p.load().map_err(program_err(name))?;
                let id = p.attach(cgroup, CgroupAttachMode::Single).map_err(program_err(name))?;
                let link = p.take_link(id).map_err(program_err(name))?;
                FdLink::try_from(link).map_err(|e| BpfError::Link { name: name.to_owned(), source: e })?
            }};
        }
        for name in CGROUP_PROGRAMS {
            let pin = links_dir.join(name);
            if pin.exists() {
                tracing::info!(program = name, "already attached (pinned link kept)");
                continue;
            }
            let prog = ebpf.program_mut(name).ok_or(BpfError::Missing("cgroup program"))?;
            let fd_link: FdLink = match prog {
                aya::programs::Program::CgroupSockAddr(p) => attach_link!(p, name),
                aya::programs::Program::SockOps(p) => attach_link!(p, name),
                aya::programs::Program::CgroupSock(p) => attach_link!(p, name),
                aya::programs::Program::CgroupSockopt(p) => {
                    let p: &mut CgroupSockopt = p;
                    p.load().map_err(program_err(name))?;
                    let prog_fd = p.fd().map_err(program_err(name))?.as_fd();
                    crate::rawlink::link_and_pin(prog_fd, cgroup, crate::rawlink::BPF_CGROUP_GETSOCKOPT, &pin)
                        .map_err(|source| BpfError::Fs { path: pin.clone(), source })?;
                    tracing::info!(program = name, "attached");
                    continue;
                }
                _ => return Err(BpfError::Missing("program of the expected type")),
            };
            fd_link.pin(&pin).map_err(|source| BpfError::Pin { path: pin.clone(), source })?;
            tracing::info!(program = name, "attached");
        }
        let enrolled = ebpf.take_map("ENROLLED").ok_or(BpfError::Missing("ENROLLED map"))?;
        let enrolled = HashMap::try_from(enrolled).map_err(|source| BpfError::Map { map: "ENROLLED", source })?;
        let pod_handshakes = ebpf.take_map("POD_HANDSHAKES").ok_or(BpfError::Missing("POD_HANDSHAKES map"))?;
        let pod_handshakes =
            HashMap::try_from(pod_handshakes).map_err(|source| BpfError::Map { map: "POD_HANDSHAKES", source })?;
        let reclaimed = ebpf.take_map("RECLAIMED").ok_or(BpfError::Missing("RECLAIMED map"))?;
        let reclaimed = HashMap::try_from(reclaimed).map_err(|source| BpfError::Map { map: "RECLAIMED", source })?;
        let orig_by_tuple = ebpf.take_map("ORIG_BY_TUPLE").ok_or(BpfError::Missing("ORIG_BY_TUPLE map"))?;
        let orig_by_tuple =
            HashMap::try_from(orig_by_tuple).map_err(|source| BpfError::Map { map: "ORIG_BY_TUPLE", source })?;
        let mut capture = Capture { ebpf, links_dir, enrolled, pod_handshakes, reclaimed, orig_by_tuple, limits };
        capture.inbound()?.load().map_err(program_err(INBOUND_PROGRAM))?;
        Ok(capture)
    }

    fn inbound(&mut self) -> Result<&mut SkLookup, BpfError> {
        match self.ebpf.program_mut(INBOUND_PROGRAM) {
            Some(aya::programs::Program::SkLookup(p)) => Ok(p),
            _ => Err(BpfError::Missing("sk_lookup program")),
        }
    }

    /// Starts capturing the pod whose netns has `cookie`.
    pub fn enroll(&mut self, cookie: u64, pod: EnrolledPod) -> Result<(), BpfError> {
        self.enrolled.insert(cookie, pod, 0).map_err(|source| BpfError::Map { map: "ENROLLED", source })
    }

    /// Stops capturing a pod. Missing entries are fine.
    pub fn unenroll(&mut self, cookie: u64) -> Result<(), BpfError> {
        match self.enrolled.remove(&cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(BpfError::Map { map: "ENROLLED", source }),
        }
    }

    /// Drops what the programs keep for a pod that is gone or released:
    /// its handshake counters and its `ORIG_BY_TUPLE` entries (handshakes
    /// its ztunnel listener will no longer complete). What its open
    /// sockets hold goes with them. (A connect racing this may make the
    /// counters again; the next [`Capture::sweep`] removes them.)
    pub fn forget(&mut self, cookie: u64) -> Result<(), BpfError> {
        match self.pod_handshakes.remove(&cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(source) => return Err(BpfError::Map { map: "POD_HANDSHAKES", source }),
        }
        let _ = self.reclaimed.remove(&cookie);
        let stale: Vec<PortKey> =
            self.orig_by_tuple.keys().filter_map(Result::ok).filter(|k| k.netns_cookie == cookie).collect();
        for k in stale {
            let _ = self.orig_by_tuple.remove(&k);
        }
        Ok(())
    }

    /// Removes `ORIG_BY_TUPLE` entries whose handshake can no longer
    /// complete (older than the handshake timeout: the client's SYN and
    /// the listener's SYN-ACK retries are long over) and everything kept
    /// for netns that are not enrolled. An expired entry's slot is given
    /// back through `RECLAIMED` (this process is its only writer).
    pub fn sweep(&mut self) -> Swept {
        let enrolled: BTreeSet<u64> = self.enrolled.keys().filter_map(Result::ok).collect();
        let now = monotonic_secs();
        let timeout = self.limits.handshake_timeout;
        let mut out = Swept::default();
        let entries: Vec<(PortKey, PortDst)> = self.orig_by_tuple.iter().filter_map(Result::ok).collect();
        for (k, v) in entries {
            match stale_entry(&v, k.netns_cookie, &enrolled, now, timeout) {
                None => {}
                Some(Err(())) if self.orig_by_tuple.remove(&k).is_ok() => out.orphaned += 1,
                // Removed by us, so not by the programs: its slot is ours
                // to give back.
                Some(Ok(())) if self.orig_by_tuple.remove(&k).is_ok() => *out.expired.entry(k.netns_cookie).or_default() += 1,
                Some(_) => {}
            }
        }
        for (netns, n) in &out.expired {
            let before = self.reclaimed.get(netns, 0).unwrap_or(0);
            let _ = self.reclaimed.insert(netns, before + n, 0);
        }
        let counters: Vec<u64> = self.pod_handshakes.keys().filter_map(Result::ok).filter(|c| !enrolled.contains(c)).collect();
        for c in counters {
            let _ = self.pod_handshakes.remove(&c);
            let _ = self.reclaimed.remove(&c);
            out.orphaned += 1;
        }
        out
    }

    /// Handshake counters of every pod that has made a captured connect:
    /// (netns cookie, slots held, connects refused at the quota).
    pub fn pod_handshakes(&self) -> Vec<(u64, i64, u64)> {
        self.pod_handshakes
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (k, v.pending - self.reclaimed.get(&k, 0).unwrap_or(0) as i64, v.refused))
            .collect()
    }

    /// The bounds this capture was installed with.
    pub fn limits(&self) -> CaptureLimits {
        self.limits
    }

    /// The node-wide counters (see `STAT_NAMES`); empty if they cannot be
    /// read (they only feed log lines here).
    pub fn stats(&self) -> std::collections::BTreeMap<&'static str, u64> {
        self.ebpf
            .map("STATS")
            .and_then(|m| PerCpuArray::<_, u64>::try_from(m).ok())
            .and_then(|s| read_stats(&s).ok())
            .unwrap_or_default()
    }

    /// Every enrolled netns cookie and its entry.
    pub fn enrolled(&self) -> Vec<(u64, EnrolledPod)> {
        self.enrolled.iter().filter_map(Result::ok).collect()
    }

    fn inbound_pin(&self, cookie: u64) -> PathBuf {
        self.links_dir.join(format!("inbound-{cookie}"))
    }

    /// Attaches inbound capture to a pod's netns (kept if already pinned).
    pub fn attach_inbound(&mut self, netns: BorrowedFd<'_>, cookie: u64) -> Result<(), BpfError> {
        let pin = self.inbound_pin(cookie);
        if pin.exists() {
            return Ok(());
        }
        let err = |source| BpfError::Program { name: INBOUND_PROGRAM.into(), source };
        let prog = self.inbound()?;
        let id = prog.attach(netns.as_fd()).map_err(err)?;
        let link = prog.take_link(id).map_err(err)?;
        let fd_link = FdLink::from(link);
        fd_link.pin(&pin).map_err(|source| BpfError::Pin { path: pin.clone(), source })?;
        Ok(())
    }

    /// Detaches inbound capture from a pod's netns.
    pub fn detach_inbound(&mut self, cookie: u64) -> Result<(), BpfError> {
        let pin = self.inbound_pin(cookie);
        match fs::remove_file(&pin) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(BpfError::Fs { path: pin, source }),
        }
    }

    /// Netns cookies that have a pinned inbound attachment.
    pub fn inbound_attached(&self) -> Vec<u64> {
        inbound_pins(&self.links_dir)
    }
}

fn inbound_pins(links_dir: &Path) -> Vec<u64> {
    let Ok(rd) = fs::read_dir(links_dir) else { return Vec::new() };
    rd.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("inbound-")?.parse().ok())
        .collect()
}

/// What `skiff-node-agent inspect` prints: the pinned state, read without
/// loading anything.
#[derive(Debug, serde::Serialize)]
pub struct PinnedState {
    pub cgroup_links: Vec<String>,
    pub enrolled: Vec<EnrolledEntry>,
    pub inbound_links: Vec<u64>,
    pub stats: std::collections::BTreeMap<&'static str, u64>,
    /// Per pod that made a captured connect: handshakes with ztunnel's
    /// listener in progress now, and connects refused at the quota.
    pub pod_handshakes: Vec<PodHandshakesEntry>,
    /// Entries and size of the shared map that bounds them.
    pub maps: std::collections::BTreeMap<&'static str, MapFill>,
    /// The per-pod quota in force.
    pub pod_handshake_quota: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct PodHandshakesEntry {
    pub netns_cookie: u64,
    pub pending: i64,
    pub refused: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct MapFill {
    pub entries: usize,
    pub max_entries: u32,
}

#[derive(Debug, serde::Serialize)]
pub struct EnrolledEntry {
    pub netns_cookie: u64,
    pub pod_ip: std::net::Ipv4Addr,
    pub flags: u32,
}

/// Reads the pinned maps and links under `pin_dir`.
pub fn inspect(pin_dir: &Path) -> Result<PinnedState, BpfError> {
    let maps_dir = pin_dir.join("maps");
    let open = |name: &'static str| {
        MapData::from_pin(maps_dir.join(name)).map_err(|source| BpfError::Map { map: name, source })
    };
    let enrolled: HashMap<MapData, u64, EnrolledPod> = HashMap::try_from(Map::HashMap(open("ENROLLED")?))
        .map_err(|source| BpfError::Map { map: "ENROLLED", source })?;
    let stats: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(open("STATS")?))
        .map_err(|source| BpfError::Map { map: "STATS", source })?;
    // Maps an older node-agent did not make read as empty.
    let reclaimed: BTreeMap<u64, u64> = match open("RECLAIMED") {
        Ok(m) => HashMap::<_, u64, u64>::try_from(Map::HashMap(m))
            .map_err(|source| BpfError::Map { map: "RECLAIMED", source })?
            .iter()
            .filter_map(Result::ok)
            .collect(),
        Err(_) => BTreeMap::new(),
    };
    let mut pod_handshakes: Vec<PodHandshakesEntry> = match open("POD_HANDSHAKES") {
        Ok(m) => HashMap::<_, u64, PodHandshakes>::try_from(Map::HashMap(m))
            .map_err(|source| BpfError::Map { map: "POD_HANDSHAKES", source })?
            .iter()
            .filter_map(Result::ok)
            .map(|(netns_cookie, v)| PodHandshakesEntry {
                netns_cookie,
                pending: v.pending - reclaimed.get(&netns_cookie).copied().unwrap_or(0) as i64,
                refused: v.refused,
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    pod_handshakes.sort_by_key(|e| e.netns_cookie);
    let mut maps = std::collections::BTreeMap::new();
    for name in SIZED_MAPS {
        let Ok(m) = open(name) else { continue };
        let max_entries = m.info().map(|i| i.max_entries()).unwrap_or(0);
        let entries = HashMap::<_, PortKey, PortDst>::try_from(Map::HashMap(m)).map(|h| h.keys().count()).unwrap_or(0);
        maps.insert(name, MapFill { entries, max_entries });
    }
    let pod_handshake_quota = open("CONFIG")
        .ok()
        .and_then(|m| aya::maps::Array::<_, u64>::try_from(Map::Array(m)).ok())
        .and_then(|a| a.get(&CONFIG_POD_HANDSHAKES, 0).ok())
        .filter(|q| *q > 0)
        .unwrap_or(DEFAULT_POD_HANDSHAKES);
    let links_dir = pin_dir.join("links");
    let mut cgroup_links: Vec<String> =
        CGROUP_PROGRAMS.iter().filter(|p| links_dir.join(p).exists()).map(|p| p.to_string()).collect();
    cgroup_links.sort();
    let mut enrolled: Vec<EnrolledEntry> = enrolled
        .iter()
        .filter_map(Result::ok)
        .map(|(cookie, e)| EnrolledEntry {
            netns_cookie: cookie,
            pod_ip: std::net::Ipv4Addr::from(u32::from_be(e.pod_ip)),
            flags: e.flags,
        })
        .collect();
    enrolled.sort_by_key(|e| e.netns_cookie);
    let mut inbound_links = inbound_pins(&links_dir);
    inbound_links.sort();
    Ok(PinnedState {
        cgroup_links,
        enrolled,
        inbound_links,
        stats: read_stats(&stats)?,
        pod_handshakes,
        maps,
        pod_handshake_quota,
    })
}

fn read_stats<T: std::borrow::Borrow<MapData>>(
    stats: &PerCpuArray<T, u64>,
) -> Result<std::collections::BTreeMap<&'static str, u64>, BpfError> {
    let mut out = std::collections::BTreeMap::new();
    for i in 0..STAT_COUNT {
        // A STATS map pinned by an older node-agent has fewer counters
        // (pinned maps are reused as they are): the newer ones read 0.
        let v = match stats.get(&i, 0) {
            Ok(v) => v.iter().sum(),
            Err(aya::maps::MapError::OutOfBounds { .. }) => 0,
            Err(source) => return Err(BpfError::Map { map: "STATS", source }),
        };
        out.insert(STAT_NAMES[i as usize], v);
    }
    Ok(out)
}

/// FNV-1a (64 bit): a stable fingerprint of the embedded programs.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Detaches everything and removes every pin under `pin_dir`: links first
/// (capture stops), then maps.
pub fn uninstall(pin_dir: &Path) -> Result<(), BpfError> {
    for sub in ["links", "maps"] {
        let d = pin_dir.join(sub);
        if let Ok(rd) = fs::read_dir(&d) {
            for e in rd.filter_map(Result::ok) {
                let p = e.path();
                fs::remove_file(&p).map_err(fs_err(&p))?;
            }
        }
        match fs::remove_dir(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(BpfError::Fs { path: d, source }),
        }
    }
    match fs::remove_dir(pin_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(BpfError::Fs { path: pin_dir.to_owned(), source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sweep removes an entry of a netns that is not enrolled at once,
    /// and one of an enrolled pod only after the handshake timeout.
    #[test]
    fn stale_entries_are_those_of_gone_pods_and_those_past_the_timeout() {
        let v = |created| PortDst { cookie: 1, ip: 0, port: 0, flags: 0, created };
        let enrolled = BTreeSet::from([7u64]);
        let t = std::time::Duration::from_secs(180);
        let cases = [
            // (netns, created, now, removed as)
            (8, 1000, 1000, Some(Err(()))),
            (7, 1000, 1000, None),
            (7, 1000, 1180, None),
            (7, 1000, 1181, Some(Ok(()))),
            // A clock before the entry (another boot's value) is not "old".
            (7, 5000, 1000, None),
        ];
        for (netns, created, now, want) in cases {
            assert_eq!(stale_entry(&v(created), netns, &enrolled, now, t), want, "netns {netns} created {created} now {now}");
        }
    }
}
