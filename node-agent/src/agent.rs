//! The node-agent's control loop: read cluster state, decide which pods on
//! this node are enrolled, and make the kernel (maps, sk_lookup links, pod
//! routing) and ztunnel agree with that decision.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use skiff_cni::proto::{PodRef, Reply, Request as CniRequest};
use skiff_core::{
    enroll::{decide, namespace_enrolled, Decision, SkipReason},
    model::{Snapshot, Workload},
    netns,
    source::ConfigSource,
    zds::{self, Request, Response, WorkloadInfo},
};
use skiff_ebpf_common::{EnrolledPod, ENROLL_INBOUND, ENROLL_OUTBOUND};
use tracing::{debug, error, info, warn};

use crate::{
    bpf::Capture,
    cni::CniLink,
    locate::NetnsLocator,
    podnet,
    sandbox::{self, CniRecord, NetnsId},
};

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

/// A plugin request waiting for the agent's decision.
struct Waiting {
    pod: PodRef,
    check: bool,
    netns: Option<NetnsId>,
    deadline: Instant,
    reply: mpsc::SyncSender<Reply>,
}

struct Enrolled {
    info: WorkloadInfo,
    netns: OwnedFd,
    cookie: u64,
    /// iptables capture was asked for (`skiff.dev/capture: iptables`).
    requested_iptables: bool,
    /// iptables capture is in force (false when it was asked for but could
    /// not be installed, and eBPF took the pod instead).
    iptables: bool,
}

/// What a reconcile does about an enrolled pod's capture mechanism.
#[derive(Debug, PartialEq, Eq)]
enum MechanismChange {
    /// The request is unchanged (whatever is in force, e.g. the eBPF
    /// fallback for a failed iptables install, stays).
    Keep,
    /// The request changed: switch in place to iptables (`true`) or eBPF.
    Switch { to_iptables: bool },
    /// The request changed but what is in force already matches it (the
    /// fallback was in force): only the request is recorded.
    Record,
}

fn mechanism_change(requested: bool, in_force: bool, wanted: bool) -> MechanismChange {
    if requested == wanted {
        MechanismChange::Keep
    } else if in_force == wanted {
        MechanismChange::Record
    } else {
        MechanismChange::Switch { to_iptables: wanted }
    }
}

/// Whether a pod gets iptables capture: `skiff.dev/capture: iptables` on
/// its namespace. A pod's own label is ignored: what a pod may weaken
/// (iptables capture lacks eBPF's per-connect checks) is not its choice.
fn wants_iptables(ns_labels: Option<&BTreeMap<String, String>>) -> bool {
    ns_labels.and_then(|l| l.get(skiff_core::LABEL_CAPTURE)).is_some_and(|v| v == skiff_core::CAPTURE_IPTABLES)
}

/// The `ENROLLED` entry of an iptables-captured pod: no flags, so connects
/// are not redirected (iptables does that), but the bind guard (no binding
/// of mesh ports but by ztunnel) applies, as it only asks whether the netns
/// has an entry.
fn iptables_entry(ip: std::net::Ipv4Addr) -> EnrolledPod {
    EnrolledPod { pod_ip: u32::from(ip).to_be(), flags: 0 }
}

/// With no snapshot yet (config source not synced: startup, API down),
/// whether an ADD in `namespace` must fail: `Some(why)` for a namespace in
/// the last published state file, and for every namespace but kube-system
/// and skiff-system when there is no readable state file.
fn no_snapshot_verdict(state_file: Option<&std::path::Path>, namespace: &str) -> Option<String> {
    let state = match state_file {
        Some(p) => skiff_cni::proto::read_state(p),
        None => Err("node-agent publishes no state file".into()),
    };
    skiff_cni::proto::fail_closed_without_view(&state, namespace).map(|why| {
        format!("node-agent has not read the cluster yet (config source not synced: starting, or API unreachable) and {why}: not starting it uncaptured")
    })
}

/// Whether a CNI DEL releases the enrolled pod: only if the sandbox it
/// tears down (the netns of the CNI record with its container id) is the
/// enrolled netns. Unknown on either side: the capture stays (fail closed;
/// the pod is released when the API drops it or its netns changes).
fn del_releases(enrolled_netns: Option<NetnsId>, del_netns: Option<NetnsId>) -> bool {
    enrolled_netns.is_some() && enrolled_netns == del_netns
}

/// Whether a CNI DEL answers a waiting ADD: same pod and same sandbox.
fn del_answers(waiting: &PodRef, check: bool, del: &PodRef) -> bool {
    !check && waiting.namespace == del.namespace && waiting.name == del.name && waiting.container_id == del.container_id
}

/// What [`Agent::sweep_stale`] removes and keeps.
#[derive(Debug, Default, PartialEq, Eq)]
struct Sweep {
    entries: Vec<(u64, std::net::Ipv4Addr)>,
    links: Vec<u64>,
    kept: Vec<(u64, std::net::Ipv4Addr)>,
}

/// Pinned state of netns the agent does not hold (`known`): removed, except
/// for entries (and their netns's inbound link) whose pod IP belongs to a pod
/// desired on this node that no enrolled pod holds (`held`) yet.
fn stale(
    known: &std::collections::BTreeSet<u64>,
    held: &std::collections::BTreeSet<std::net::Ipv4Addr>,
    desired_ips: &std::collections::BTreeSet<std::net::Ipv4Addr>,
    entries: &[(u64, EnrolledPod)],
    attached: &[u64],
) -> Sweep {
    let mut out = Sweep::default();
    for (cookie, entry) in entries {
        if known.contains(cookie) {
            continue;
        }
        let ip = std::net::Ipv4Addr::from(u32::from_be(entry.pod_ip));
        if desired_ips.contains(&ip) && !held.contains(&ip) {
            out.kept.push((*cookie, ip));
        } else {
            out.entries.push((*cookie, ip));
        }
    }
    for cookie in attached {
        if !known.contains(cookie) && !out.kept.iter().any(|(c, _)| c == cookie) {
            out.links.push(*cookie);
        }
    }
    out
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
    /// Why the last enrollment attempt of a pod failed, by uid.
    last_error: BTreeMap<String, String>,
    cni: Option<CniLink>,
    waiting: Vec<Waiting>,
    published: Option<Vec<String>>,
    ready: Option<Arc<AtomicBool>>,
    metrics: Arc<AgentMetrics>,
}

/// How often pods that failed to enroll are retried.
const RETRY_INTERVAL: Duration = Duration::from_secs(2);
/// How often refusals at the capture bounds are looked for and logged.
const CAPACITY_INTERVAL: Duration = Duration::from_secs(10);

/// Pods whose captured connects were refused at their quota since the last
/// look: (netns cookie, refused since then, handshakes in progress now).
/// `prev` is updated to `now`; pods no longer listed are dropped from it.
fn quota_refusals(prev: &mut BTreeMap<u64, u64>, now: &[(u64, i64, u64)]) -> Vec<(u64, u64, i64)> {
    let mut out = Vec::new();
    let mut next = BTreeMap::new();
    for &(cookie, live, refused) in now {
        // A pod's counters are new when it was forgotten and made again.
        let before = prev.get(&cookie).copied().filter(|b| *b <= refused).unwrap_or(0);
        if refused > before {
            out.push((cookie, refused - before, live));
        }
        next.insert(cookie, refused);
    }
    *prev = next;
    out
}

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

/// What node-agent counts, for `/metrics` (the kernel's own counters are
/// read from the pinned maps at each scrape).
#[derive(Debug, Default)]
pub struct AgentMetrics {
    /// Pods enrolled (each time a pod's capture was set up).
    pub enrollments: AtomicU64,
    /// Attempts to enroll that failed (retried; the reason is logged).
    pub enroll_failures: AtomicU64,
    /// Pods released (capture removed).
    pub releases: AtomicU64,
    /// Reconciles with a complete view of the cluster.
    pub reconciles: AtomicU64,
    /// Times the config source could not be read (the last good config
    /// stays in force).
    pub config_errors: AtomicU64,
    /// Requests ztunnel refused.
    pub ztunnel_refusals: AtomicU64,
    /// Objects of the current config refused by validation.
    pub rejected_objects: AtomicU64,
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
            last_error: BTreeMap::new(),
            cni: None,
            waiting: Vec::new(),
            published: None,
            ready: None,
            metrics: Arc::new(AgentMetrics::default()),
        }
    }

    /// Counts into `metrics` (served on `/metrics`).
    pub fn with_metrics(mut self, metrics: Arc<AgentMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Takes requests from the CNI plugin.
    pub fn with_cni(mut self, link: CniLink) -> Self {
        self.cni = Some(link);
        self
    }

    /// Sets `flag` once the first reconcile is done (capture is installed
    /// before the agent exists).
    pub fn with_ready(mut self, flag: Arc<AtomicBool>) -> Self {
        self.ready = Some(flag);
        self
    }

    /// Logs pods refused at their quota of captured handshakes, and
    /// captured connections that lost their destination because the
    /// node's map was full, since the last call. The counters themselves
    /// are in `inspect`.
    fn report_capacity(&mut self, seen: &mut BTreeMap<u64, u64>, no_state_seen: &mut u64) {
        let limits = self.capture.limits();
        let swept = self.capture.sweep();
        for (cookie, n) in &swept.expired {
            warn!(
                pod = %self.pod_name(*cookie),
                expired = n,
                timeout_s = limits.handshake_timeout.as_secs(),
                "captured connections whose handshake with ztunnel's listener never completed were removed (--captured-handshake-timeout); their slots are given back"
            );
        }
        if swept.orphaned > 0 {
            debug!(removed = swept.orphaned, "capture state of pods no longer enrolled removed");
        }
        for (cookie, refused, pending) in quota_refusals(seen, &self.capture.pod_handshakes()) {
            let pod = self.pod_name(cookie);
            warn!(
                %pod,
                refused,
                pending,
                quota = limits.per_pod,
                "captured connects refused (EPERM): the pod has its quota of connections waiting for ztunnel's listener (--max-pod-captured-handshakes); other pods are unaffected"
            );
        }
        let no_state = self.capture.stats().get("refused_no_state").copied().unwrap_or(0);
        if no_state > *no_state_seen {
            error!(
                refused = no_state - *no_state_seen,
                size = limits.node,
                "captured connections refused on this node for want of room to keep their destination (--max-captured-handshakes is full, or a socket's storage could not be made)"
            );
        }
        *no_state_seen = no_state;
    }

    /// "namespace/name" of the enrolled pod with netns `cookie`.
    fn pod_name(&self, cookie: u64) -> String {
        self.pods
            .values()
            .find(|e| e.cookie == cookie)
            .map(|e| format!("{}/{}", e.info.namespace, e.info.name))
            .unwrap_or_else(|| format!("netns cookie {cookie}"))
    }

    /// Runs until `stop` is set. Capture is left in place on exit.
    pub fn run(&mut self, source: &mut dyn ConfigSource, stop: &AtomicBool) {
        // Nothing is touched until the first complete, valid view of the
        // cluster: an empty or partial view would release every pod.
        let mut snapshot: Option<Arc<Snapshot>> = None;
        let mut last_retry = Instant::now();
        // With the CNI plugin waiting on answers, look at its requests often.
        let poll = if self.cni.is_some() { Duration::from_millis(50) } else { Duration::from_millis(300) };
        let mut rejections = skiff_core::model::RejectionLog::default();
        let mut last_capacity = Instant::now();
        let mut quota_seen = BTreeMap::new();
        let mut no_state_seen = self.capture.stats().get("refused_no_state").copied().unwrap_or(0);
        quota_refusals(&mut quota_seen, &self.capture.pod_handshakes());
        while !stop.load(Ordering::Relaxed) {
            if last_capacity.elapsed() >= CAPACITY_INTERVAL {
                last_capacity = Instant::now();
                self.report_capacity(&mut quota_seen, &mut no_state_seen);
            }
            match source.poll(poll) {
                Ok(Some(s)) => {
                    // A refused object affects only itself: enrollment
                    // goes on with everything else.
                    rejections.report(&s);
                    self.metrics.rejected_objects.store(s.rejected.len() as u64, Ordering::Relaxed);
                    self.reconcile(&s);
                    snapshot = Some(s);
                    if let Some(r) = &self.ready {
                        r.store(true, Ordering::Relaxed);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    self.metrics.config_errors.fetch_add(1, Ordering::Relaxed);
                    error!(error = %e.report(), "config source unreadable; keeping the last good config")
                }
            }
            if self.take_cni_events(snapshot.as_deref()) {
                if let Some(s) = snapshot.clone() {
                    self.reconcile(&s);
                }
            }
            self.answer_waiting(snapshot.as_deref());
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
        self.metrics.reconciles.fetch_add(1, Ordering::Relaxed);
        let node = self.cfg.node.clone();
        let mut desired: BTreeMap<String, (&Workload, bool)> = BTreeMap::new();
        let mut skipped: BTreeMap<String, SkipReason> = BTreeMap::new();
        let patched: Vec<Workload> = snap.workloads.values().map(|w| self.with_cni_ip(w)).collect();
        for w in &patched {
            match decide(&node, snap.namespace_labels(&w.namespace), w) {
                Decision::Enroll => {
                    desired.insert(w.uid.clone(), (w, wants_iptables(snap.namespace_labels(&w.namespace))));
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
        let desired_ips: std::collections::BTreeSet<std::net::Ipv4Addr> = desired.values().filter_map(|(w, _)| w.ip).collect();
        for (uid, (w, iptables)) in desired {
            let Some(info) = info_of(w, &node) else { continue };
            // A recreated sandbox keeps the pod's uid but has a new netns:
            // that is a new pod for capture.
            // Compared with the request, not with what is in force: a pod on
            // the eBPF fallback is not released and re-enrolled each time.
            if let Some(e) = self.pods.get_mut(&uid) {
                match mechanism_change(e.requested_iptables, e.iptables, iptables) {
                    MechanismChange::Keep => {}
                    MechanismChange::Record => e.requested_iptables = iptables,
                    MechanismChange::Switch { to_iptables } => self.switch_mechanism(&uid, to_iptables),
                }
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
        self.sweep_stale(&desired_ips);
        self.publish(snap);
    }

    /// In a cluster the API shows a pod's IP only after its sandbox is up,
    /// i.e. after CNI ADD: until then, the IP the CNI reported stands in, so
    /// capture is in place before the pod's first packet.
    fn with_cni_ip(&self, w: &Workload) -> Workload {
        let mut w = w.clone();
        if w.ip.is_none() {
            if let Some(link) = &self.cni {
                if let Ok(state) = link.state.lock() {
                    if let Some(rec) = state.pods.get(&format!("{}/{}", w.namespace, w.name)) {
                        if rec.uid.as_ref().is_none_or(|u| *u == w.uid) {
                            w.ip = rec.ips.first().copied();
                        }
                    }
                }
            }
        }
        w
    }

    /// Publishes the enrolled namespaces for the CNI plugin (used when it
    /// cannot reach node-agent: fail closed for those namespaces).
    fn publish(&mut self, snap: &Snapshot) {
        if let Some(link) = &self.cni {
            let names: std::collections::BTreeSet<String> =
                snap.workloads.values().map(|w| format!("{}/{}", w.namespace, w.name)).collect();
            if let Ok(mut st) = link.state.lock() {
                for pod in st.prune(|k| names.contains(k)) {
                    info!(%pod, "dropping the CNI record of a pod the API no longer shows (its DEL was missed)");
                }
            }
        }
        let Some(path) = self.cni.as_ref().and_then(|c| c.state_file.clone()) else { return };
        let names: Vec<String> =
            snap.namespaces.iter().filter(|(n, i)| namespace_enrolled(n, &i.labels)).map(|(n, _)| n.clone()).collect();
        if self.published.as_ref() == Some(&names) {
            return;
        }
        match crate::cni::write_state(&path, names.clone()) {
            Ok(()) => self.published = Some(names),
            Err(e) => error!(file = %path.display(), error = %skiff_core::report(&e), "cannot publish enrolled namespaces for the CNI plugin"),
        }
    }

    /// Records what the CNI plugin reported; true if a reconcile is due.
    fn take_cni_events(&mut self, snap: Option<&Snapshot>) -> bool {
        let mut changed = false;
        loop {
            let Some(link) = &self.cni else { return changed };
            let ev = match link.events.try_recv() {
                Ok(ev) => ev,
                Err(_) => return changed,
            };
            let state = link.state.clone();
            let wait = link.wait;
            match ev.req {
                CniRequest::Add { pod, netns, ips } => {
                    let key = format!("{}/{}", pod.namespace, pod.name);
                    let (fd, id) = match sandbox::open_path(std::path::Path::new(&netns)) {
                        Ok(x) => x,
                        Err(e) => {
                            let enrolled_ns = match snap {
                                Some(s) => s.namespace_labels(&pod.namespace).is_some_and(|l| namespace_enrolled(&pod.namespace, l)),
                                None => no_snapshot_verdict(link.state_file.as_deref(), &pod.namespace).is_some(),
                            };
                            warn!(pod = %key, %netns, error = %e, "CNI ADD: cannot open the sandbox's netns");
                            let _ = ev.reply.send(if enrolled_ns {
                                Reply::Failed { message: format!("cannot open netns {netns}: {e}") }
                            } else {
                                Reply::NotEnrolled { reason: format!("cannot open netns {netns}: {e}") }
                            });
                            continue;
                        }
                    };
                    info!(pod = %key, container = %pod.container_id, %netns, ?ips, "CNI ADD: sandbox created");
                    let v4: Vec<std::net::Ipv4Addr> = ips.iter().filter_map(|s| s.parse().ok()).collect();
                    // An IPv6-only sandbox in an enrolled namespace cannot be
                    // captured (the data path carries IPv4): the ADD fails,
                    // rather than the pod running outside the mesh.
                    if v4.is_empty() && ips.iter().any(|s| s.parse::<std::net::Ipv6Addr>().is_ok()) {
                        let enrolled_ns = match snap {
                            Some(s) => s.namespace_labels(&pod.namespace).is_some_and(|l| namespace_enrolled(&pod.namespace, l)),
                            None => no_snapshot_verdict(link.state_file.as_deref(), &pod.namespace).is_some(),
                        };
                        if enrolled_ns {
                            warn!(pod = %key, ?ips, "CNI ADD: an IPv6-only pod in an enrolled namespace; Skiff carries IPv4 only");
                            let _ = ev.reply.send(Reply::Failed {
                                message: format!("pod {key} has only IPv6 addresses ({}); Skiff captures IPv4 pods only, so it cannot enroll it", ips.join(", ")),
                            });
                            continue;
                        }
                    }
                    let ips = v4;
                    if let Ok(mut st) = state.lock() {
                        st.released.remove(&id);
                        st.pods.insert(
                            key,
                            CniRecord {
                                uid: pod.uid.clone(),
                                container_id: pod.container_id.clone(),
                                netns_path: netns.into(),
                                netns: fd,
                                id,
                                ips,
                                added: Instant::now(),
                            },
                        );
                    }
                    self.waiting.push(Waiting { pod, check: false, netns: Some(id), deadline: Instant::now() + wait, reply: ev.reply });
                    changed = true;
                }
                CniRequest::Check { pod, .. } => {
                    self.waiting.push(Waiting { pod, check: true, netns: None, deadline: Instant::now(), reply: ev.reply });
                }
                CniRequest::Del { pod } => {
                    let key = format!("{}/{}", pod.namespace, pod.name);
                    info!(pod = %key, container = %pod.container_id, "CNI DEL: sandbox torn down");
                    // The sandbox this DEL is about: the record with its
                    // container id (a stale or repeated DEL finds none, or
                    // finds the record of a newer sandbox and leaves it).
                    let mut del_netns = None;
                    if let Ok(mut st) = state.lock() {
                        if st.pods.get(&key).is_some_and(|r| r.container_id == pod.container_id) {
                            if let Some(r) = st.pods.remove(&key) {
                                del_netns = Some(r.id);
                            }
                        }
                        if let Some(id) = del_netns {
                            st.released.insert(id, Instant::now());
                        }
                    }
                    // The enrolled pod of that sandbox (by uid, else by name),
                    // released only if its netns is the one torn down.
                    let enrolled = self
                        .pods
                        .iter()
                        .find(|(uid, e)| {
                            pod.uid.as_ref().map_or(e.info.namespace == pod.namespace && e.info.name == pod.name, |u| *u == **uid)
                        })
                        .map(|(uid, e)| (uid.clone(), netns::identity(e.netns.as_fd()).ok()));
                    if let Some((uid, enrolled_netns)) = enrolled {
                        if del_releases(enrolled_netns, del_netns) {
                            self.release(&uid, "CNI DEL: pod sandbox torn down");
                        } else {
                            info!(pod = %key, container = %pod.container_id,
                                "CNI DEL is not for the enrolled sandbox (stale, repeated, or its ADD was not seen): capture stays");
                        }
                    }
                    for w in std::mem::take(&mut self.waiting) {
                        if del_answers(&w.pod, w.check, &pod) {
                            let _ = w.reply.send(Reply::NotEnrolled { reason: "sandbox deleted before a decision".into() });
                        } else {
                            self.waiting.push(w);
                        }
                    }
                    let _ = ev.reply.send(Reply::Done);
                }
            }
        }
    }

    /// Answers plugin requests whose pod is decided (or whose wait ran out).
    fn answer_waiting(&mut self, snap: Option<&Snapshot>) {
        let now = Instant::now();
        for w in std::mem::take(&mut self.waiting) {
            let key = format!("{}/{}", w.pod.namespace, w.pod.name);
            let found = snap.and_then(|s| {
                s.workloads
                    .values()
                    .find(|x| x.namespace == w.pod.namespace && x.name == w.pod.name && w.pod.uid.as_ref().is_none_or(|u| *u == x.uid))
                    .map(|x| (self.with_cni_ip(x), s.namespace_labels(&x.namespace)))
            });
            let reply = match found {
                Some((pod, ns_labels)) => match decide(&self.cfg.node, ns_labels, &pod) {
                    Decision::Skip(reason) => Reply::NotEnrolled { reason: reason.to_string() },
                    Decision::Enroll => {
                        let same_netns = |e: &Enrolled| w.netns.is_none() || netns::identity(e.netns.as_fd()).ok() == w.netns;
                        match self.pods.get(&pod.uid) {
                            Some(e) if same_netns(e) => Reply::Enrolled,
                            _ => Reply::Failed {
                                message: self
                                    .last_error
                                    .get(&pod.uid)
                                    .cloned()
                                    .unwrap_or_else(|| "not enrolled yet (see node-agent's log)".into()),
                            },
                        }
                    }
                },
                None if now < w.deadline => {
                    self.waiting.push(w);
                    continue;
                }
                None if snap.is_none() => {
                    let state_file = self.cni.as_ref().and_then(|c| c.state_file.as_deref());
                    match no_snapshot_verdict(state_file, &w.pod.namespace) {
                        Some(why) if !w.check => {
                            error!(pod = %key, %why, "CNI ADD: no view of the cluster yet; failing closed");
                            Reply::Failed { message: format!("pod {key}: {why}") }
                        }
                        Some(why) => Reply::NotEnrolled { reason: format!("CHECK before node-agent has read the cluster: {why}") },
                        None => Reply::NotEnrolled {
                            reason: "node-agent has not read the cluster yet and the namespace is not enrolled in its last published state; enrolled later if it should be".into(),
                        },
                    }
                }
                None => {
                    let enrolled_ns = snap
                        .and_then(|s| s.namespace_labels(&w.pod.namespace))
                        .is_some_and(|l| namespace_enrolled(&w.pod.namespace, l));
                    if enrolled_ns && !w.check {
                        Reply::Failed {
                            message: format!(
                                "pod {key} is not in node-agent's view of the API yet and namespace {} is enrolled: not starting it uncaptured",
                                w.pod.namespace
                            ),
                        }
                    } else {
                        Reply::NotEnrolled {
                            reason: "not in node-agent's view of the API yet; enrolled when the API shows it, if it should be".into(),
                        }
                    }
                }
            };
            let what = if w.check { "CNI CHECK" } else { "CNI ADD" };
            match &reply {
                Reply::Enrolled => info!(pod = %key, "{what}: answered enrolled"),
                Reply::NotEnrolled { reason } => info!(pod = %key, %reason, "{what}: answered not enrolled"),
                Reply::Failed { message } => warn!(pod = %key, %message, "{what}: answered failed (the runtime retries the sandbox)"),
                Reply::Done => {}
            }
            let _ = w.reply.send(reply);
        }
    }

    fn enroll(&mut self, w: &Workload, info: WorkloadInfo, iptables: bool) {
        let uid = info.uid.clone();
        match self.try_enroll(w, info, iptables) {
            Ok(()) => {
                self.metrics.enrollments.fetch_add(1, Ordering::Relaxed);
                self.last_error.remove(&uid);
            }
            Err(e) => {
                self.metrics.enroll_failures.fetch_add(1, Ordering::Relaxed);
                self.last_error.insert(uid, e);
            }
        }
    }

    /// Enrolls one pod; the error (already logged) says why not.
    fn try_enroll(&mut self, w: &Workload, info: WorkloadInfo, iptables: bool) -> Result<(), String> {
        let pod = format!("{}/{}", info.namespace, info.name);
        let netns = match self.locator.open(w) {
            Ok(fd) => fd,
            Err(e) => {
                warn!(%pod, error = %e, "cannot enroll: pod network namespace not found; will retry");
                return Err(format!("pod network namespace not found: {e}"));
            }
        };
        if self.is_node_netns(&netns) {
            error!(%pod, "refusing to enroll: the pod's network namespace is the node's own");
            return Err("the pod's network namespace is the node's own".into());
        }
        let cookie = match netns::cookie_of(netns.as_fd()) {
            Ok(c) => c,
            Err(e) => {
                error!(%pod, error = %skiff_core::report(&e), "cannot enroll: netns cookie");
                return Err(format!("netns cookie: {}", skiff_core::report(&e)));
            }
        };
        if let Err(e) = podnet::setup(netns.as_fd()) {
            error!(%pod, error = %skiff_core::report(&e), "cannot enroll: pod routing for ztunnel delivery");
            return Err(format!("pod routing for ztunnel delivery: {}", skiff_core::report(&e)));
        }
        // ztunnel first, so its listeners exist before capture points at
        // them. If ztunnel is not connected, capture goes on anyway (its
        // connects are refused until ztunnel gets the snapshot: fail closed);
        // if ztunnel refuses the pod, capture would have nowhere to go, so
        // the pod stays pending and is retried.
        if let Sent::Refused = self.send_add(&info, &netns) {
            error!(%pod, "not enrolled: ztunnel refused the pod; will retry");
            return Err("ztunnel refused the pod (see its log)".into());
        }
        if iptables {
            let installed = podnet::iptables::install(netns.as_fd()).map_err(|e| skiff_core::report(&e)).and_then(|()| {
                self.capture.enroll(cookie, iptables_entry(info.ip)).map_err(|e| {
                    let _ = podnet::iptables::remove(netns.as_fd());
                    format!("bind-guard entry in the capture map: {}", skiff_core::report(&e))
                })
            });
            match installed {
                Ok(()) => {
                    info!(%pod, ip = %info.ip, netns_cookie = cookie, ztunnel = self.ztunnel.is_some(), capture = "iptables", "pod enrolled");
                    self.pods.insert(info.uid.clone(), Enrolled { info, netns, cookie, requested_iptables: true, iptables: true });
                    return Ok(());
                }
                // Never uncaptured: eBPF takes the pod instead.
                Err(e) => error!(%pod, error = %e, "iptables capture failed; capturing with eBPF instead"),
            }
        }
        let entry = EnrolledPod { pod_ip: u32::from(info.ip).to_be(), flags: ENROLL_OUTBOUND | ENROLL_INBOUND };
        if let Err(e) = self.capture.enroll(cookie, entry) {
            error!(%pod, error = %skiff_core::report(&e), "cannot enroll: capture map");
            return Err(format!("capture map: {}", skiff_core::report(&e)));
        }
        if let Err(e) = self.capture.attach_inbound(netns.as_fd(), cookie) {
            error!(%pod, error = %skiff_core::report(&e), "cannot enroll: inbound capture not attached; will retry");
            let _ = self.capture.unenroll(cookie);
            self.send(&Request::Del { uid: info.uid.clone() }, None);
            return Err(format!("inbound capture not attached: {}", skiff_core::report(&e)));
        }
        info!(%pod, ip = %info.ip, netns_cookie = cookie, ztunnel = self.ztunnel.is_some(), "pod enrolled");
        self.pods.insert(info.uid.clone(), Enrolled { info, netns, cookie, requested_iptables: iptables, iptables: false });
        Ok(())
    }

    /// Changes an enrolled pod's capture mechanism in place, new capture
    /// first, then the old one off (both point at ztunnel, so the overlap
    /// captures twice at worst, never not at all). If the new one cannot
    /// be installed the old one stays in force.
    fn switch_mechanism(&mut self, uid: &str, to_iptables: bool) {
        let Some(e) = self.pods.get_mut(uid) else { return };
        e.requested_iptables = to_iptables;
        let pod = format!("{}/{}", e.info.namespace, e.info.name);
        if to_iptables {
            if let Err(err) = podnet::iptables::install(e.netns.as_fd()) {
                error!(%pod, error = %skiff_core::report(&err), "iptables capture failed; eBPF capture stays in force");
                return;
            }
            e.iptables = true;
            if let Err(err) = self.capture.detach_inbound(e.cookie) {
                error!(%pod, error = %skiff_core::report(&err), "detaching inbound capture after switching to iptables");
            }
            // Connect redirection off, bind guard kept (see iptables_entry).
            if let Err(err) = self.capture.enroll(e.cookie, iptables_entry(e.info.ip)) {
                error!(%pod, error = %skiff_core::report(&err), "rewriting the capture entry after switching to iptables");
            }
            info!(%pod, capture = "iptables", "capture mechanism switched");
        } else {
            let entry = EnrolledPod { pod_ip: u32::from(e.info.ip).to_be(), flags: ENROLL_OUTBOUND | ENROLL_INBOUND };
            let res = self.capture.enroll(e.cookie, entry).and_then(|()| self.capture.attach_inbound(e.netns.as_fd(), e.cookie));
            if let Err(err) = res {
                error!(%pod, error = %skiff_core::report(&err), "eBPF capture failed; iptables capture stays in force");
                let _ = self.capture.detach_inbound(e.cookie);
                let _ = self.capture.unenroll(e.cookie);
                return;
            }
            e.iptables = false;
            if let Err(err) = podnet::iptables::remove(e.netns.as_fd()) {
                error!(%pod, error = %skiff_core::report(&err), "removing iptables capture after switching to eBPF");
            }
            info!(%pod, capture = "ebpf", "capture mechanism switched");
        }
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
        self.metrics.releases.fetch_add(1, Ordering::Relaxed);
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
        if let Err(err) = self.capture.forget(e.cookie) {
            error!(%pod, error = %skiff_core::report(&err), "removing the pod's connection state");
        }
        // The delivery routing stays: it only affects ztunnel-marked
        // packets, and connections ztunnel is still draining need it.
        self.send(&Request::Del { uid: uid.to_owned() }, None);
        info!(%pod, %reason, "pod released");
    }

    /// Removes kernel state for netns this agent does not hold: pods released
    /// while node-agent was down. State of a pod that is desired on this node
    /// but not (re-)enrolled yet stays: its pinned capture is all that keeps
    /// it in the mesh (fail closed); it is replaced when the pod enrolls.
    fn sweep_stale(&mut self, desired_ips: &std::collections::BTreeSet<std::net::Ipv4Addr>) {
        let known: std::collections::BTreeSet<u64> = self.pods.values().map(|e| e.cookie).collect();
        let held: std::collections::BTreeSet<std::net::Ipv4Addr> = self.pods.values().map(|e| e.info.ip).collect();
        let sweep = stale(&known, &held, desired_ips, &self.capture.enrolled(), &self.capture.inbound_attached());
        for (cookie, ip) in &sweep.kept {
            warn!(netns_cookie = cookie, %ip, "keeping the pinned capture of a pod that should be enrolled but is not (yet): fail closed");
        }
        for (cookie, ip) in sweep.entries {
            info!(netns_cookie = cookie, %ip, "removing stale capture entry");
            let _ = self.capture.unenroll(cookie);
            let _ = self.capture.forget(cookie);
        }
        for cookie in sweep.links {
            info!(netns_cookie = cookie, "removing stale inbound attachment");
            let _ = self.capture.detach_inbound(cookie);
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
                self.metrics.ztunnel_refusals.fetch_add(1, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_refusals_report_each_pod_once_per_increase() {
        let mut seen = BTreeMap::new();
        // (netns cookie, open, refused) in; (netns cookie, newly refused, open) out.
        assert_eq!(quota_refusals(&mut seen, &[(1, 5, 10)]), vec![(1, 10, 5)]);
        assert_eq!(quota_refusals(&mut seen, &[(1, 8, 16), (2, 0, 3)]), vec![(1, 6, 8), (2, 3, 0)]);
        assert_eq!(quota_refusals(&mut seen, &[(1, 8, 16), (2, 0, 3)]), vec![]);
        // Pod 1's counters were removed and made again; pod 2 is gone.
        assert_eq!(quota_refusals(&mut seen, &[(1, 1, 2)]), vec![(1, 2, 1)]);
        assert_eq!(seen, BTreeMap::from([(1, 2)]));
    }

    #[test]
    fn only_the_namespace_chooses_iptables_capture() {
        // Only the namespace's labels are an input: a pod's label has no say.
        let ipt: BTreeMap<String, String> =
            [(skiff_core::LABEL_CAPTURE.to_owned(), skiff_core::CAPTURE_IPTABLES.to_owned())].into();
        assert!(wants_iptables(Some(&ipt)));
        assert!(!wants_iptables(None));
        assert!(!wants_iptables(Some(&BTreeMap::new())));
        // The bind guard applies to iptables pods; connects are not redirected.
        let e = iptables_entry("10.1.0.5".parse().unwrap());
        assert_eq!(e.flags & (ENROLL_OUTBOUND | ENROLL_INBOUND), 0);
        assert_eq!(e.pod_ip, u32::from(std::net::Ipv4Addr::new(10, 1, 0, 5)).to_be());
    }

    #[test]
    fn a_stale_del_leaves_the_current_sandbox_alone() {
        let (old, cur) = ((1, 10), (1, 11));
        // DEL of the enrolled sandbox: released.
        assert!(del_releases(Some(cur), Some(cur)));
        // A stale DEL (older sandbox's record, or none left): not released.
        assert!(!del_releases(Some(cur), Some(old)));
        assert!(!del_releases(Some(cur), None));
        assert!(!del_releases(None, None));
        // Waiting ADDs are answered only for the sandbox being deleted.
        let p = |cid: &str| PodRef { namespace: "shop".into(), name: "web-1".into(), uid: Some("u1".into()), container_id: cid.into() };
        assert!(del_answers(&p("c2"), false, &p("c2")));
        assert!(!del_answers(&p("c2"), false, &p("c1")));
        assert!(!del_answers(&p("c2"), true, &p("c2")));
    }

    #[test]
    fn sweep_keeps_the_pinned_capture_of_desired_pods_not_yet_reenrolled() {
        let ip = |s: &str| -> std::net::Ipv4Addr { s.parse().unwrap() };
        let e = |s: &str| EnrolledPod { pod_ip: u32::from(ip(s)).to_be(), flags: ENROLL_OUTBOUND | ENROLL_INBOUND };
        let known = [1u64].into();
        let held = [ip("10.0.0.1")].into();
        // .1 enrolled (cookie 1); .2 desired but not re-enrolled (cookie 2);
        // .3 gone; cookie 4 is an old netns of the enrolled .1.
        let desired = [ip("10.0.0.1"), ip("10.0.0.2")].into();
        let entries = [(1, e("10.0.0.1")), (2, e("10.0.0.2")), (3, e("10.0.0.3")), (4, e("10.0.0.1"))];
        let sw = stale(&known, &held, &desired, &entries, &[1, 2, 3, 5]);
        assert_eq!(sw.kept, [(2, ip("10.0.0.2"))]);
        assert_eq!(sw.entries, [(3, ip("10.0.0.3")), (4, ip("10.0.0.1"))]);
        assert_eq!(sw.links, [3, 5]);
    }

    #[test]
    fn the_ebpf_fallback_is_not_a_mechanism_change() {
        // iptables asked for, eBPF in force (iptables-restore failed): the
        // next reconcile, still asking for iptables, leaves the pod alone.
        assert_eq!(mechanism_change(true, false, true), MechanismChange::Keep);
        assert_eq!(mechanism_change(false, false, false), MechanismChange::Keep);
        assert_eq!(mechanism_change(true, true, true), MechanismChange::Keep);
        // The label went away while the fallback was in force: nothing to switch.
        assert_eq!(mechanism_change(true, false, false), MechanismChange::Record);
        assert_eq!(mechanism_change(false, false, true), MechanismChange::Switch { to_iptables: true });
        assert_eq!(mechanism_change(true, true, false), MechanismChange::Switch { to_iptables: false });
    }

    #[test]
    fn without_a_snapshot_adds_fail_closed_by_the_published_state() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("cni-state.json");
        // No state file: everything but the system namespaces fails.
        let why = no_snapshot_verdict(Some(&state), "shop").expect("fail closed without a state file");
        assert!(why.contains("not read the cluster") && why.contains(&state.display().to_string()), "{why}");
        assert!(no_snapshot_verdict(Some(&state), "kube-system").is_none());
        assert!(no_snapshot_verdict(None, "shop").is_some());
        // A published state: its namespaces fail, others start.
        crate::cni::write_state(&state, vec!["shop".into()]).unwrap();
        assert!(no_snapshot_verdict(Some(&state), "shop").is_some());
        assert!(no_snapshot_verdict(Some(&state), "blog").is_none());
    }
}
