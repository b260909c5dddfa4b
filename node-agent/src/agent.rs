//! The node-agent's control loop: read cluster state, decide which pods on
//! this node are enrolled, and make the kernel (maps, sk_lookup links, pod
//! routing) and ztunnel agree with that decision.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use skiff_core::{
    enroll::{decide, Decision, SkipReason},
    model::{Snapshot, Workload},
    netns,
    source::ConfigSource,
    zds::{self, Request, Response, WorkloadInfo},
};
use skiff_ebpf_common::{EnrolledPod, ENROLL_INBOUND, ENROLL_OUTBOUND};
use tracing::{debug, error, info, warn};

use crate::{bpf::Capture, podnet};


/// node-agent settings.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// This node's name (`spec.nodeName` of the pods it owns).
    pub node: String,
    /// ztunnel's ZDS socket.
    pub ztunnel_socket: PathBuf,
    /// How long to wait for ztunnel to answer one message.
    pub ztunnel_timeout: Duration,
}

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

struct Enrolled {
    info: WorkloadInfo,
    netns: OwnedFd,
    cookie: u64,
    /// Captured by iptables rules in the pod's netns instead of eBPF.
    iptables: bool,
}

/// Whether a pod asks for iptables capture (`skiff.dev/capture: iptables`
/// on the pod, or else on its namespace).
fn wants_iptables(w: &Workload, ns_labels: Option<&BTreeMap<String, String>>) -> bool {
    let label = skiff_core::LABEL_CAPTURE;
    match w.labels.get(label) {
        Some(v) => v == skiff_core::CAPTURE_IPTABLES,
        None => ns_labels.and_then(|l| l.get(label)).is_some_and(|v| v == skiff_core::CAPTURE_IPTABLES),
    }
}

pub struct Agent {
    cfg: AgentConfig,
    capture: Capture,
    locator: Box<dyn NetnsLocator>,
    pods: BTreeMap<String, Enrolled>,
    ztunnel: Option<zds::Conn>,
    last_connect_attempt: Option<Instant>,
    ztunnel_warned: bool,
    /// Pods that should be enrolled but are not (yet).
    pending: usize,
}

/// How often pods that failed to enroll are retried.
const RETRY_INTERVAL: Duration = Duration::from_secs(2);

fn info_of(w: &Workload, node: &str) -> Option<WorkloadInfo> {
    Some(WorkloadInfo {
        uid: w.uid.clone(),
        namespace: w.namespace.clone(),
        name: w.name.clone(),
        workload_name: w.workload_name.clone(),
        service_account: w.service_account.clone(),
        node: node.to_owned(),
        ip: w.ip?,
        labels: w.labels.clone(),
    })
}

impl Agent {
    pub fn new(cfg: AgentConfig, capture: Capture, locator: Box<dyn NetnsLocator>) -> Self {
        Agent {
            cfg,
            capture,
            locator,
            pods: BTreeMap::new(),
            ztunnel: None,
            last_connect_attempt: None,
            ztunnel_warned: false,
            pending: 0,
        }
    }

    /// Runs until `stop` is set. Capture is left in place on exit.
    pub fn run(&mut self, source: &mut dyn ConfigSource, stop: &AtomicBool) {
        // Nothing is touched until the first complete, valid view of the
        // cluster: an empty or partial view would release every pod.
        let mut snapshot: Option<Arc<Snapshot>> = None;
        let mut last_retry = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            match source.poll(Duration::from_millis(300)) {
                Ok(Some(s)) => {
                    self.reconcile(&s);
                    snapshot = Some(s);
                }
                Ok(None) => {}
                Err(e) => error!(error = %e.report(), "config rejected; keeping the last good config"),
            }
            if let Some(s) = &snapshot {
                // Pods that could not be enrolled (netns not there yet, a
                // failed setup) are retried without waiting for a change.
                if self.pending > 0 && last_retry.elapsed() >= RETRY_INTERVAL {
                    last_retry = Instant::now();
                    let s = s.clone();
                    self.reconcile(&s);
                }
                self.maintain_ztunnel();
            }
        }
        info!("node-agent stopping; capture stays in place");
    }

    /// Brings kernel state and ztunnel in line with `snap`.
    pub fn reconcile(&mut self, snap: &Snapshot) {
        let node = self.cfg.node.clone();
        let mut desired: BTreeMap<String, (&Workload, bool)> = BTreeMap::new();
        let mut skipped: BTreeMap<String, SkipReason> = BTreeMap::new();
        for w in snap.workloads.values() {
            match decide(&node, snap.namespace_labels(&w.namespace), w) {
                Decision::Enroll => {
                    desired.insert(w.uid.clone(), (w, wants_iptables(w, snap.namespace_labels(&w.namespace))));
                }
                Decision::Skip(reason) => {
                    skipped.insert(w.uid.clone(), reason);
                }
            }
        }
        let gone: Vec<String> = self.pods.keys().filter(|uid| !desired.contains_key(*uid)).cloned().collect();
        for uid in gone {
            let reason = skipped.get(&uid).map(|r| r.to_string()).unwrap_or_else(|| "pod deleted".into());
            self.release(&uid, &reason);
        }
        let wanted = desired.len();
        for (uid, (w, iptables)) in desired {
            let Some(info) = info_of(w, &node) else { continue };
            // A recreated sandbox keeps the pod's uid but has a new netns:
            // that is a new pod for capture.
            if self.pods.get(&uid).is_some_and(|e| e.iptables != iptables) {
                self.release(&uid, "capture mechanism changed");
            }
            if let Some(e) = self.pods.get(&uid) {
                let current = self.locator.open(w).ok().and_then(|fd| netns::identity(fd.as_fd()).ok());
                if current.is_some_and(|id| Some(id) != netns::identity(e.netns.as_fd()).ok()) {
                    self.release(&uid, "pod network namespace changed");
                }
            }
            match self.pods.get(&uid) {
                Some(e) if e.info == info => {}
                Some(_) => self.update(info),
                None => self.enroll(w, info, iptables),
            }
        }
        self.pending = wanted.saturating_sub(self.pods.len());
        self.sweep_stale();
    }

    fn enroll(&mut self, w: &Workload, info: WorkloadInfo, iptables: bool) {
        let pod = format!("{}/{}", info.namespace, info.name);
        let netns = match self.locator.open(w) {
            Ok(fd) => fd,
            Err(e) => {
                warn!(%pod, error = %e, "cannot enroll: pod network namespace not found; will retry");
                return;
            }
        };
        if self.is_node_netns(&netns) {
            error!(%pod, "refusing to enroll: the pod's network namespace is the node's own");
            return;
        }
        let cookie = match netns::cookie_of(netns.as_fd()) {
            Ok(c) => c,
            Err(e) => {
                error!(%pod, error = %skiff_core::report(&e), "cannot enroll: netns cookie");
                return;
            }
        };
        if let Err(e) = podnet::setup(netns.as_fd()) {
            error!(%pod, error = %skiff_core::report(&e), "cannot enroll: pod routing for ztunnel delivery");
            return;
        }
        // ztunnel first, so its listeners exist before capture points at
        // them. If ztunnel is not connected, capture goes on anyway (its
        // connects are refused until ztunnel gets the snapshot: fail closed);
        // if ztunnel refuses the pod, capture would have nowhere to go, so
        // the pod stays pending and is retried.
        if let Sent::Refused = self.send_add(&info, &netns) {
            error!(%pod, "not enrolled: ztunnel refused the pod; will retry");
            return;
        }
        if iptables {
            match podnet::iptables::install(netns.as_fd()) {
                Ok(()) => {
                    info!(%pod, ip = %info.ip, netns_cookie = cookie, ztunnel = self.ztunnel.is_some(), capture = "iptables", "pod enrolled");
                    self.pods.insert(info.uid.clone(), Enrolled { info, netns, cookie, iptables: true });
                    return;
                }
                // Never uncaptured: eBPF takes the pod instead.
                Err(e) => error!(%pod, error = %skiff_core::report(&e), "iptables capture failed; capturing with eBPF instead"),
            }
        }
        let entry = EnrolledPod { pod_ip: u32::from(info.ip).to_be(), flags: ENROLL_OUTBOUND | ENROLL_INBOUND };
        if let Err(e) = self.capture.enroll(cookie, entry) {
            error!(%pod, error = %skiff_core::report(&e), "cannot enroll: capture map");
            return;
        }
        if let Err(e) = self.capture.attach_inbound(netns.as_fd(), cookie) {
            error!(%pod, error = %skiff_core::report(&e), "cannot enroll: inbound capture not attached; will retry");
            let _ = self.capture.unenroll(cookie);
            self.send(&Request::Del { uid: info.uid.clone() }, None);
            return;
        }
        info!(%pod, ip = %info.ip, netns_cookie = cookie, ztunnel = self.ztunnel.is_some(), "pod enrolled");
        self.pods.insert(info.uid.clone(), Enrolled { info, netns, cookie, iptables: false });
    }

    fn update(&mut self, info: WorkloadInfo) {
        let Some(e) = self.pods.remove(&info.uid) else { return };
        if e.info.ip != info.ip {
            // A new IP is a new pod as far as capture is concerned.
            let uid = info.uid.clone();
            self.pods.insert(uid.clone(), e);
            self.release(&uid, "pod IP changed");
            return;
        }
        self.send_add(&info, &e.netns);
        debug!(pod = %format!("{}/{}", info.namespace, info.name), "pod metadata updated");
        self.pods.insert(info.uid.clone(), Enrolled { info, ..e });
    }

    fn release(&mut self, uid: &str, reason: &str) {
        let Some(e) = self.pods.remove(uid) else { return };
        let pod = format!("{}/{}", e.info.namespace, e.info.name);
        // Capture off first, then ztunnel: no connection is refused for lack
        // of a listener in between.
        if e.iptables {
            if let Err(err) = podnet::iptables::remove(e.netns.as_fd()) {
                error!(%pod, error = %skiff_core::report(&err), "removing iptables capture");
            }
        }
        if let Err(err) = self.capture.unenroll(e.cookie) {
            error!(%pod, error = %skiff_core::report(&err), "removing capture entry");
        }
        if let Err(err) = self.capture.detach_inbound(e.cookie) {
            error!(%pod, error = %skiff_core::report(&err), "detaching inbound capture");
        }
        // The delivery routing stays: it only affects ztunnel-marked
        // packets, and connections ztunnel is still draining need it.
        self.send(&Request::Del { uid: uid.to_owned() }, None);
        info!(%pod, %reason, "pod released");
    }

    /// Removes kernel state for netns this agent does not hold: pods released
    /// while node-agent was down.
    fn sweep_stale(&mut self) {
        let known: std::collections::BTreeSet<u64> = self.pods.values().map(|e| e.cookie).collect();
        for (cookie, entry) in self.capture.enrolled() {
            if !known.contains(&cookie) {
                let ip = std::net::Ipv4Addr::from(u32::from_be(entry.pod_ip));
                info!(netns_cookie = cookie, %ip, "removing stale capture entry");
                let _ = self.capture.unenroll(cookie);
            }
        }
        for cookie in self.capture.inbound_attached() {
            if !known.contains(&cookie) {
                info!(netns_cookie = cookie, "removing stale inbound attachment");
                let _ = self.capture.detach_inbound(cookie);
            }
        }
    }

    fn send_add(&mut self, info: &WorkloadInfo, netns: &OwnedFd) -> Sent {
        self.send(&Request::Add { workload: info.clone() }, Some(netns))
    }

    /// Sends one request if connected; a broken connection is dropped and
    /// re-established (with a full snapshot) later.
    fn send(&mut self, req: &Request, fd: Option<&OwnedFd>) -> Sent {
        let Some(conn) = &self.ztunnel else { return Sent::NotConnected };
        match conn.call(req, fd.map(|f| f.as_fd())) {
            Ok(Response::Ack) => Sent::Acked,
            Ok(Response::Error { message }) => {
                error!(request = ?req_kind(req), %message, "ztunnel refused");
                Sent::Refused
            }
            Err(e) => {
                warn!(error = %skiff_core::report(&e), "lost ztunnel connection; will reconnect and resend the snapshot");
                self.ztunnel = None;
                Sent::NotConnected
            }
        }
    }

    /// Whether `fd` is the node's own netns (node-agent's, or init's): never
    /// a pod's, whatever a manifest claims.
    fn is_node_netns(&self, fd: &OwnedFd) -> bool {
        let Ok(id) = netns::identity(fd.as_fd()) else { return true };
        ["/proc/self/ns/net", "/proc/1/ns/net"].iter().any(|p| {
            std::fs::File::open(p).ok().and_then(|f| netns::identity(f.as_fd()).ok()) == Some(id)
        })
    }

    fn maintain_ztunnel(&mut self) {
        if let Some(conn) = &self.ztunnel {
            if !conn.peer_gone() {
                return;
            }
            warn!("ztunnel closed the connection; will reconnect and resend the snapshot");
            self.ztunnel = None;
        }
        if self.last_connect_attempt.is_some_and(|t| t.elapsed() < Duration::from_millis(500)) {
            return;
        }
        self.last_connect_attempt = Some(Instant::now());
        match self.connect() {
            Ok(conn) => {
                info!(pods = self.pods.len(), "connected to ztunnel; snapshot sent");
                self.ztunnel = Some(conn);
                self.ztunnel_warned = false;
            }
            Err(e) => {
                if !self.ztunnel_warned {
                    warn!(socket = %self.cfg.ztunnel_socket.display(), error = %e,
                        "ztunnel not reachable; enrolled pods' connections are refused until it is");
                    self.ztunnel_warned = true;
                }
            }
        }
    }

    fn connect(&self) -> Result<zds::Conn, String> {
        let conn = zds::Conn::connect(&self.cfg.ztunnel_socket, self.cfg.ztunnel_timeout).map_err(|e| skiff_core::report(&e))?;
        let expect_ack = |r: Result<Response, zds::ZdsError>, what: &str| match r {
            Ok(Response::Ack) => Ok(()),
            Ok(Response::Error { message }) => Err(format!("{what}: ztunnel said: {message}")),
            Err(e) => Err(format!("{what}: {}", skiff_core::report(&e))),
        };
        expect_ack(conn.call(&Request::Hello { version: zds::VERSION, node: self.cfg.node.clone() }, None), "hello")?;
        for e in self.pods.values() {
            match conn.call(&Request::Add { workload: e.info.clone() }, Some(e.netns.as_fd())) {
                Ok(Response::Ack) => {}
                Ok(Response::Error { message }) => {
                    error!(pod = %format!("{}/{}", e.info.namespace, e.info.name), %message, "ztunnel refused pod")
                }
                Err(err) => return Err(format!("add: {}", skiff_core::report(&err))),
            }
        }
        expect_ack(conn.call(&Request::SnapshotSent, None), "snapshot")?;
        Ok(conn)
    }
}

/// Outcome of sending a request to ztunnel.
enum Sent {
    Acked,
    Refused,
    NotConnected,
}

fn req_kind(r: &Request) -> &'static str {
    match r {
        Request::Hello { .. } => "hello",
        Request::Add { .. } => "add",
        Request::Del { .. } => "del",
        Request::SnapshotSent => "snapshot-sent",
    }
}

/// Installs SIGTERM/SIGINT handlers that set the returned flag.
pub fn stop_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook_consts::SIGTERM, signal_hook_consts::SIGINT] {
        let _ = signal_hook::flag::register(sig, flag.clone());
    }
    flag
}

mod signal_hook_consts {
    pub const SIGTERM: i32 = libc::SIGTERM;
    pub const SIGINT: i32 = libc::SIGINT;
}
