//! The local mesh: nodes and pods as network namespaces and cgroups, built
//! from manifests, running the real node-agent and ztunnel on each node.
//!
//! Topology: a "fabric" netns with a bridge joins the nodes (172.18.0.0/24);
//! each node has a bridge `cni0` (10.244.N.1/24) with one veth per pod and
//! routes to the other nodes' pod ranges. Every name (netns, cgroup, bpffs
//! mount, /etc/netns entry, work dir) carries a per-run id, and teardown
//! removes exactly what this run created — on success, failure and panic.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, Output},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use skiff_core::k8s;
use tracing::{info, warn};

use crate::{
    kubeproxy,
    manifests::{self, PlannedPod, PlannedService},
    sys,
};

/// What to build.
#[derive(Clone, Debug)]
pub struct MeshOptions {
    /// Directory of Kubernetes manifests.
    pub manifests: PathBuf,
    /// Number of nodes.
    pub nodes: usize,
    /// Directory holding `skiff-node-agent` and `skiff-ztunnel`; also put on
    /// the pods' PATH (so `skiff-demo-app` resolves).
    pub bin_dir: PathBuf,
    /// Lifetime of workload certificates (ztunnel rotates at half-life).
    pub cert_lifetime: Duration,
    /// Extra ztunnel arguments.
    pub ztunnel_args: Vec<String>,
    /// How uncaptured pods reach ClusterIPs.
    pub kube_proxy: KubeProxy,
    /// Pin each node's processes (ztunnel, node-agent) to one CPU: node `i`
    /// on CPU `i mod CPUs` (benchmarks).
    pub pin_node_cpus: bool,
    /// Extra node-agent `run` arguments.
    pub agent_args: Vec<String>,
    /// Write the `local.skiff.dev/netns` annotation on pods (off: node-agent
    /// must find the netns another way, e.g. from the CNI plugin).
    pub netns_annotation: bool,
    /// Serve the cluster to node-agent, ztunnel and waypoints from a fake
    /// Kubernetes API server (`--kube-url`) instead of the state directory
    /// (`--manifests`). The state directory is still written, and every
    /// change to it is mirrored into the API server.
    pub kube_api: bool,
    /// Start ztunnel with this soft open-file limit (`prlimit`), as a node
    /// whose runtime hands out the usual 1024.
    pub ztunnel_soft_nofile: Option<u64>,
    /// Run the default ingress gateway (`istio-system/istio-ingressgateway`)
    /// unless the manifests turn it off or bring their own.
    pub ingress_gateway: bool,
    /// `SKIFF_LOG_FORMAT` for the mesh's own processes (node processes,
    /// waypoints, gateways): `text` or `json`; default: the harness's own
    /// `SKIFF_LOG_FORMAT`, else text.
    pub log_format: Option<String>,
}

/// The kube-proxy stand-in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KubeProxy {
    /// A userspace forwarder on each node (no iptables needed). The
    /// endpoint sees the node's address as the source, which ztunnel takes
    /// for a kubelet probe: not faithful for policy tests.
    Userspace,
    /// iptables DNAT in each node's netns, as kube-proxy's iptables mode
    /// (the default): the client's own address reaches the endpoint, and
    /// the benchmarks' baseline has no extra proxy hop.
    Iptables,
}

impl MeshOptions {
    pub fn new(manifests: impl Into<PathBuf>, bin_dir: impl Into<PathBuf>) -> MeshOptions {
        MeshOptions { manifests: manifests.into(), nodes: 2, bin_dir: bin_dir.into(), cert_lifetime: Duration::from_secs(86400), ztunnel_args: Vec::new(), kube_proxy: KubeProxy::Iptables, pin_node_cpus: false, agent_args: Vec::new(), netns_annotation: true, kube_api: false, ztunnel_soft_nofile: None, ingress_gateway: true, log_format: std::env::var("SKIFF_LOG_FORMAT").ok() }
    }
}

pub struct NodeRt {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub pod_gateway: Ipv4Addr,
    cgroup: PathBuf,
    system_cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub zds_socket: PathBuf,
    agent: Option<Child>,
    ztunnel: Option<Child>,
    pub agent_log: PathBuf,
    pub ztunnel_log: PathBuf,
    /// This node's CNI plugin dir, CNI config dir, plugin socket and state
    /// file (node-agent installs `skiff-cni` here, as on a real node under
    /// /opt/cni/bin and /etc/cni/net.d).
    pub cni_bin_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub cni_socket: PathBuf,
    pub cni_state_file: PathBuf,
    pods_on_node: u32,
}

pub struct PodRt {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub ip: Ipv4Addr,
    pub node: usize,
    pub netns: String,
    pub cgroup: PathBuf,
    pub labels: BTreeMap<String, String>,
    pub log: PathBuf,
    pub host_network: bool,
    planned: PlannedPod,
    children: Vec<Child>,
}

impl PodRt {
    /// Where the pod's processes run: its netns and cgroup, and (unless
    /// hostNetwork) its own /etc view.
    fn placement(&self) -> sys::Placement<'_> {
        sys::Placement { netns: &self.netns, cgroup: &self.cgroup, pod_view: !self.host_network, hosts: None }
    }
}

pub struct LocalMesh {
    pub run_id: String,
    pub work_dir: PathBuf,
    pub state_dir: PathBuf,
    bin_dir: PathBuf,
    bpffs: Option<PathBuf>,
    cgroup_root: Option<PathBuf>,
    fabric: Option<String>,
    netns: Vec<String>,
    etc_dirs: Vec<PathBuf>,
    pub nodes: Vec<NodeRt>,
    pub pods: Vec<PodRt>,
    pub services: Vec<PlannedService>,
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    policies: Vec<k8s::Object>,
    secrets: Vec<k8s::Object>,
    rt: Option<tokio::runtime::Runtime>,
    extra: Vec<Child>,
    torn_down: bool,
    cert_lifetime: Duration,
    ztunnel_args: Vec<String>,
    ztunnel_soft_nofile: Option<u64>,
    kube_proxy: KubeProxy,
    pin_node_cpus: bool,
    log_format: Option<String>,
    agent_args: Vec<String>,
    netns_annotation: bool,
    /// The fake API server in kube mode (listening in the fabric netns).
    kube: Option<skiff_kube_fake::FakeApiServer>,
    /// `LoadBalancer` Services' addresses on the host, by `namespace/name`.
    load_balancers: BTreeMap<String, Ipv4Addr>,
    /// ztunnel's `--outbound-traffic-policy`, from an IstioOperator.
    outbound_traffic_policy: Option<String>,
    outside_netns: Option<String>,
    lb_rt: Option<tokio::runtime::Runtime>,
}

/// The outside host's addresses and the names pods know them by (no
/// Service, no pod: the internet's stand-in, for egress).
pub const OUTSIDE_HOSTS: [(Ipv4Addr, &str); 2] =
    [(Ipv4Addr::new(172, 18, 0, 250), "outside.example.com"), (Ipv4Addr::new(172, 18, 0, 251), "other.example.com")];

/// The fabric bridge's own address in kube mode: the fake API server's.
const FABRIC_API_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 1);

/// Kinds mirrored from the state directory into the fake API server.
const MIRRORED_KINDS: &[&str] =
    &["Namespace", "Pod", "Service", "VirtualService", "DestinationRule", "Gateway", "ServiceEntry", "AuthorizationPolicy", "PeerAuthentication", "Secret", "ConfigMap"];

fn preflight(opts: &MeshOptions) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the local mesh needs root (network namespaces, cgroups, eBPF)");
    }
    let mut tools = vec!["ip", "nsenter", "sysctl"];
    if opts.kube_proxy == KubeProxy::Iptables {
        tools.push("iptables-restore");
    }
    for tool in tools {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
            .unwrap_or(false);
        if !found {
            bail!("`{tool}` not found on PATH (install iproute2, util-linux, procps and iptables; `cargo xtask setup` does)");
        }
    }
    for bin in ["skiff-node-agent", "skiff-ztunnel", "skiff-cni"] {
        let p = opts.bin_dir.join(bin);
        if !p.exists() {
            bail!("{} not found: build the workspace first (`cargo build --bins`, or use `cargo xtask`)", p.display());
        }
    }
    Ok(())
}

/// Removes what earlier runs left behind when their harness was killed
/// (SIGKILL, a crash) before it could tear down: only runs whose recorded
/// owner process is gone, identified by their run id.
pub fn sweep_dead_runs() {
    let Ok(rd) = fs::read_dir(std::env::temp_dir()) else { return };
    for e in rd.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_prefix("skiff-") else { continue };
        if id.len() != 6 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        let dir = e.path();
        let Ok(pid) = fs::read_to_string(dir.join("owner.pid")) else { continue };
        let Ok(pid) = pid.trim().parse::<i32>() else { continue };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        warn!(run = id, "cleaning up after a local mesh whose harness died");
        if let Ok(cg) = sys::cgroup2_root() {
            sys::cgroup_destroy(&cg.join(format!("skiff-{id}")));
        }
        if let Ok(ns) = fs::read_dir("/var/run/netns") {
            for n in ns.filter_map(Result::ok) {
                let n = n.file_name().to_string_lossy().into_owned();
                if n.starts_with(&format!("skiff-{id}-")) {
                    let _ = sys::ip(&["netns", "del", &n]);
                    let _ = fs::remove_dir_all(PathBuf::from("/etc/netns").join(&n));
                }
            }
        }
        let bpffs = dir.join("bpffs");
        if fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| m.contains(&bpffs.display().to_string())) {
            sys::unmount(&bpffs);
        }
        let _ = fs::remove_dir_all(&dir);
    }
}

impl LocalMesh {
    /// Builds the mesh and waits until every node's ztunnel is ready.
    pub fn up(opts: &MeshOptions) -> anyhow::Result<LocalMesh> {
        preflight(opts)?;
        sweep_dead_runs();
        let node_names: Vec<String> = (1..=opts.nodes).map(|i| format!("node-{i}")).collect();
        let plan = manifests::plan(&opts.manifests, &node_names, opts.ingress_gateway)?;
        let run_id = sys::run_id();
        let work_dir = std::env::temp_dir().join(format!("skiff-{run_id}"));
        let mut mesh = LocalMesh {
            state_dir: work_dir.join("cluster"),
            work_dir,
            run_id,
            bin_dir: opts.bin_dir.clone(),
            bpffs: None,
            cgroup_root: None,
            fabric: None,
            netns: Vec::new(),
            etc_dirs: Vec::new(),
            nodes: Vec::new(),
            pods: Vec::new(),
            services: plan.services.clone(),
            namespaces: plan.namespaces.clone(),
            policies: plan.policies.clone(),
            secrets: plan.secrets.clone(),
            rt: None,
            extra: Vec::new(),
            torn_down: false,
            cert_lifetime: opts.cert_lifetime,
            ztunnel_args: opts.ztunnel_args.clone(),
            ztunnel_soft_nofile: opts.ztunnel_soft_nofile,
            kube_proxy: opts.kube_proxy,
            pin_node_cpus: opts.pin_node_cpus,
            log_format: opts.log_format.clone(),
            agent_args: opts.agent_args.clone(),
            netns_annotation: opts.netns_annotation,
            kube: None,
            load_balancers: BTreeMap::new(),
            lb_rt: None,
            outbound_traffic_policy: plan.outbound_traffic_policy.clone(),
            outside_netns: None,
        };
        // From here on, Drop tears down whatever was created if a step fails.
        mesh.build(opts, &node_names, plan.pods)?;
        Ok(mesh)
    }

    fn add_netns(&mut self, name: &str) -> anyhow::Result<()> {
        sys::ip(&["netns", "add", name])?;
        self.netns.push(name.to_owned());
        sys::ip_in(name, &["link", "set", "lo", "up"])
    }

    fn build(&mut self, opts: &MeshOptions, node_names: &[String], pods: Vec<PlannedPod>) -> anyhow::Result<()> {
        // create_dir, not create_dir_all: if another run somehow has this id,
        // fail here rather than adopt (and later tear down) its resources.
        let work = self.work_dir.clone();
        self.work_dir = PathBuf::new();
        fs::create_dir(&work).with_context(|| format!("creating {} (run id in use?)", work.display()))?;
        self.work_dir = work;
        fs::write(self.work_dir.join("owner.pid"), std::process::id().to_string())?;
        fs::create_dir_all(self.work_dir.join("logs"))?;
        fs::create_dir_all(&self.state_dir)?;
        let cg = sys::cgroup2_root()?.join(format!("skiff-{}", self.run_id));
        fs::create_dir(&cg).with_context(|| format!("creating cgroup {} (run id in use?)", cg.display()))?;
        self.cgroup_root = Some(cg.clone());
        let bpffs = self.work_dir.join("bpffs");
        sys::mount_bpffs(&bpffs)?;
        self.bpffs = Some(bpffs.clone());

        let fabric = format!("skiff-{}-fabric", self.run_id);
        self.add_netns(&fabric)?;
        self.fabric = Some(fabric.clone());
        sys::ip_in(&fabric, &["link", "add", "br0", "type", "bridge"])?;
        sys::ip_in(&fabric, &["link", "set", "br0", "up"])?;

        for (i, name) in node_names.iter().enumerate() {
            let n = i + 1;
            let netns = format!("skiff-{}-{name}", self.run_id);
            self.add_netns(&netns)?;
            let ip = Ipv4Addr::new(172, 18, 0, 10 + n as u8);
            let gw = Ipv4Addr::new(10, 244, n as u8, 1);
            let veth = format!("n{n}");
            sys::ip_in(&fabric, &["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns])?;
            sys::ip_in(&fabric, &["link", "set", &veth, "master", "br0", "up"])?;
            sys::ip_in(&netns, &["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            sys::ip_in(&netns, &["link", "set", "eth0", "up"])?;
            sys::ip_in(&netns, &["link", "add", "cni0", "type", "bridge"])?;
            sys::ip_in(&netns, &["addr", "add", &format!("{gw}/24"), "dev", "cni0"])?;
            sys::ip_in(&netns, &["link", "set", "cni0", "up"])?;
            sys::sysctl_in(&netns, "net.ipv4.ip_forward", "1")?;
            for j in 1..=node_names.len() {
                if j != n {
                    let via = Ipv4Addr::new(172, 18, 0, 10 + j as u8).to_string();
                    sys::ip_in(&netns, &["route", "add", &format!("10.244.{j}.0/24"), "via", &via])?;
                }
            }
            let node_cg = cg.join(name);
            let system_cg = node_cg.join("system");
            fs::create_dir_all(&system_cg)?;
            fs::create_dir_all(node_cg.join("pods"))?;
            let node_dir = self.work_dir.join(name);
            fs::create_dir_all(&node_dir)?;
            // A stand-in for the primary CNI's config, for node-agent to chain into.
            let cni_conf_dir = node_dir.join("cni").join("net.d");
            fs::create_dir_all(&cni_conf_dir)?;
            fs::write(
                cni_conf_dir.join("10-localmesh.conflist"),
                format!(
                    "{{\n  \"cniVersion\": \"1.0.0\",\n  \"name\": \"localmesh\",\n  \"plugins\": [\n    {{\"type\": \"bridge\", \"bridge\": \"cni0\", \"ipam\": {{\"type\": \"host-local\", \"subnet\": \"10.244.{}.0/24\"}}}}\n  ]\n}}\n",
                    self.nodes.len() + 1
                ),
            )?;
            self.nodes.push(NodeRt {
                name: name.clone(),
                netns,
                ip,
                pod_gateway: gw,
                cgroup: node_cg,
                system_cgroup: system_cg,
                pin_dir: bpffs.join(name),
                zds_socket: node_dir.join("ztunnel.sock"),
                agent: None,
                ztunnel: None,
                agent_log: self.work_dir.join("logs").join(format!("{name}-node-agent.log")),
                ztunnel_log: self.work_dir.join("logs").join(format!("{name}-ztunnel.log")),
                cni_bin_dir: node_dir.join("cni").join("bin"),
                cni_conf_dir,
                cni_socket: node_dir.join("cni.sock"),
                cni_state_file: node_dir.join("cni-state.json"),
                pods_on_node: 0,
            });
        }

        self.add_outside(&fabric, &cg)?;
        if opts.kube_api {
            self.start_kube_api(&fabric, node_names.len())?;
        }
        for (k, planned) in pods.into_iter().enumerate() {
            self.add_pod(k, planned)?;
        }
        let lbs: Vec<String> =
            self.services.iter().filter(|s| s.object.spec.type_.as_deref() == Some("LoadBalancer")).map(|s| format!("{}/{}", s.namespace, s.name)).collect();
        for (k, key) in lbs.into_iter().enumerate() {
            self.load_balancers.insert(key, crate::loadbalancer::address(&self.run_id, k));
        }
        self.write_state()?;

        // ztunnel first: node-agent then finds it at once and hands over
        // every pod before capture points at ztunnel's listeners.
        for i in 0..self.nodes.len() {
            self.start_ztunnel(i)?;
            self.start_node_agent(i)?;
            self.wait_for_capture(i)?;
        }
        for i in 0..self.nodes.len() {
            self.wait_ready(i, Duration::from_secs(20))?;
        }
        self.start_kube_proxy()?;
        self.start_load_balancers()?;
        for k in 0..self.pods.len() {
            self.start_containers(k, opts)?;
        }
        Ok(())
    }

    /// The outside world: a host that is no node and runs no mesh, on the
    /// fabric (so pods reach it through their node, as they would reach the
    /// internet), with two addresses and names in every pod's /etc/hosts
    /// ([`OUTSIDE_HOSTS`]), serving HTTP on 80 and HTTPS on 443
    /// (`skiff-demo-app http-backend`, VERSION=outside) with a certificate
    /// for both names from the run's own "outside CA"
    /// ([`Self::outside_ca`]): what a public CA is to the internet.
    fn add_outside(&mut self, fabric: &str, cg: &Path) -> anyhow::Result<()> {
        let netns = format!("skiff-{}-outside", self.run_id);
        self.add_netns(&netns)?;
        sys::ip_in(fabric, &["link", "add", "out0", "type", "veth", "peer", "name", "eth0", "netns", &netns])?;
        sys::ip_in(fabric, &["link", "set", "out0", "master", "br0", "up"])?;
        for (ip, _) in OUTSIDE_HOSTS {
            sys::ip_in(&netns, &["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        }
        sys::ip_in(&netns, &["link", "set", "eth0", "up"])?;
        for (j, n) in self.nodes.iter().enumerate() {
            sys::ip_in(&netns, &["route", "add", &format!("10.244.{}.0/24", j + 1), "via", &n.ip.to_string()])?;
        }
        let ocg = cg.join("outside");
        fs::create_dir_all(&ocg)?;
        let pki = self.outside_pki()?;
        let place = sys::Placement { netns: &netns, cgroup: &ocg, pod_view: false, hosts: None };
        let argv = [
            self.bin_dir.join("skiff-demo-app").display().to_string(),
            "http-backend".into(),
            "--port".into(),
            "80".into(),
            "--tls-port".into(),
            "443".into(),
            "--tls-cert".into(),
            pki.join("cert.pem").display().to_string(),
            "--tls-key".into(),
            pki.join("key.pem").display().to_string(),
        ];
        let env = [("VERSION".to_owned(), "outside".to_owned()), ("POD_NAME".to_owned(), "outside".to_owned())];
        let log = self.work_dir.join("logs").join("outside.log");
        let child = sys::spawn_logged(sys::command(&place, &argv, &env)?, &log)?;
        self.extra.push(child);
        self.outside_netns = Some(netns);
        Ok(())
    }

    /// The outside host's CA and its certificate for [`OUTSIDE_HOSTS`]'
    /// names, in the run's work directory (`outside/`).
    fn outside_pki(&self) -> anyhow::Result<PathBuf> {
        let dir = self.work_dir.join("outside");
        fs::create_dir_all(&dir)?;
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
        ca.distinguished_name.push(rcgen::DnType::CommonName, "Skiff local mesh outside CA");
        fs::write(dir.join("ca.pem"), ca.self_signed(&ca_key)?.pem())?;
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate()?;
        let cert = rcgen::CertificateParams::new(OUTSIDE_HOSTS.iter().map(|(_, n)| n.to_string()).collect::<Vec<_>>())?.signed_by(&key, &issuer)?;
        fs::write(dir.join("cert.pem"), cert.pem())?;
        fs::write(dir.join("key.pem"), key.serialize_pem())?;
        Ok(dir)
    }

    /// The PEM file of the CA that signed the outside host's HTTPS
    /// certificate: what a DestinationRule's `tls.caCertificates` names to
    /// originate TLS to it (or its content, `cacert` of a Secret).
    pub fn outside_ca(&self) -> PathBuf {
        self.work_dir.join("outside").join("ca.pem")
    }

    /// A place to observe the mesh from, as a cluster's monitoring would:
    /// the fabric netns, given its own address on the bridge (the fake API
    /// server's, in kube mode) and routes to every node's pod range, so a
    /// process there (a Prometheus server) reaches every node's and pod's
    /// ports. Idempotent. Returns the netns and the address.
    pub fn observer(&self) -> anyhow::Result<(String, Ipv4Addr)> {
        let fabric = self.fabric.clone().context("no fabric")?;
        let shown = std::process::Command::new("ip").args(["-n", &fabric, "-4", "addr", "show", "dev", "br0"]).output()?;
        if !String::from_utf8_lossy(&shown.stdout).contains(&format!("inet {FABRIC_API_IP}/")) {
            sys::ip_in(&fabric, &["link", "set", "lo", "up"])?;
            sys::ip_in(&fabric, &["addr", "add", &format!("{FABRIC_API_IP}/24"), "dev", "br0"])?;
            for (j, n) in self.nodes.iter().enumerate() {
                sys::ip_in(&fabric, &["route", "replace", &format!("10.244.{}.0/24", j + 1), "via", &n.ip.to_string()])?;
            }
        }
        Ok((fabric, FABRIC_API_IP))
    }

    /// The outside host's netns (see [`Self::add_outside`]).
    pub fn outside_netns(&self) -> Option<&str> {
        self.outside_netns.as_deref()
    }

    /// Kube mode: the fake API server on the fabric bridge's address, which
    /// every node reaches over its eth0 (pods through their node).
    fn start_kube_api(&mut self, fabric: &str, nodes: usize) -> anyhow::Result<()> {
        sys::ip_in(fabric, &["addr", "add", &format!("{FABRIC_API_IP}/24"), "dev", "br0"])?;
        for j in 1..=nodes {
            let via = Ipv4Addr::new(172, 18, 0, 10 + j as u8).to_string();
            sys::ip_in(fabric, &["route", "add", &format!("10.244.{j}.0/24"), "via", &via])?;
        }
        let ns = skiff_core::netns::open(Path::new(&format!("/var/run/netns/{fabric}")))?;
        let listener = skiff_core::netns::run_in(std::os::fd::AsFd::as_fd(&ns), || std::net::TcpListener::bind((FABRIC_API_IP, 0)))?
            .with_context(|| format!("binding the fake API server to {FABRIC_API_IP} in {fabric}"))?;
        let fake = skiff_kube_fake::FakeApiServer::start_on(listener).context("starting the fake API server")?;
        // Port-forward, as the kubelet does it: to 127.0.0.1:PORT in the
        // pod's network namespace (a node pod's is its node's).
        fake.set_port_forward(|pod, port| {
            let path = pod.pointer("/metadata/annotations").and_then(|a| a.get(skiff_core::ANNOTATION_LOCAL_NETNS)).and_then(serde_json::Value::as_str).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, "the pod has no network namespace here (no local.skiff.dev/netns annotation)")
            })?;
            let netns_err = |e: skiff_core::netns::NetnsError| std::io::Error::other(skiff_core::report(&e));
            let ns = skiff_core::netns::open(Path::new(path)).map_err(netns_err)?;
            skiff_core::netns::run_in(std::os::fd::AsFd::as_fd(&ns), || std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2))).map_err(netns_err)?
        });
        info!(url = %fake.url(), "fake Kubernetes API server serving the cluster");
        self.kube = Some(fake);
        Ok(())
    }

    /// The fake API server (kube mode only).
    pub fn kube_api(&self) -> Option<&skiff_kube_fake::FakeApiServer> {
        self.kube.as_ref()
    }

    /// How node processes and waypoints are told where the cluster is.
    fn source_args(&self) -> [String; 2] {
        match &self.kube {
            Some(k) => ["--kube-url".into(), k.url()],
            None => ["--manifests".into(), self.state_dir.display().to_string()],
        }
    }

    /// Kube mode: makes the API server hold what the state directory holds.
    fn mirror_to_kube(&self) -> anyhow::Result<()> {
        let Some(fake) = &self.kube else { return Ok(()) };
        let mut objects = Vec::new();
        let mut paths: Vec<PathBuf> = fs::read_dir(&self.state_dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
                continue;
            }
            let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            for v in serde_saphyr::from_multiple::<serde_json::Value>(&text).with_context(|| format!("parsing {}", path.display()))? {
                let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or_default();
                if MIRRORED_KINDS.contains(&kind) {
                    objects.push(v);
                }
            }
        }
        // The node DaemonSet's pods, as a cluster with Skiff installed has
        // them (deploy/base/node.yaml): what `skiff check|config|observe
        // --kube` find each node's node-agent and ztunnel by.
        objects.push(serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "skiff-system"}}));
        for n in &self.nodes {
            objects.push(serde_json::json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": format!("skiff-node-{}", n.name),
                    "namespace": "skiff-system",
                    "uid": format!("{}-skiff-node-{}", self.run_id, n.name),
                    "labels": {"app.kubernetes.io/name": "skiff-node", "app.kubernetes.io/part-of": "skiff"},
                    "annotations": {skiff_core::ANNOTATION_LOCAL_NETNS: format!("/var/run/netns/{}", n.netns)},
                },
                "spec": {"nodeName": n.name, "hostNetwork": true, "serviceAccountName": "ztunnel", "containers": [{"name": "ztunnel", "image": "skiff"}]},
                "status": {"phase": "Running", "podIP": n.ip.to_string(), "hostIP": n.ip.to_string()},
            }));
        }
        fake.sync(MIRRORED_KINDS, &objects).context("mirroring the cluster into the fake API server")
    }

    fn add_pod(&mut self, k: usize, planned: PlannedPod) -> anyhow::Result<()> {
        let node = planned.node;
        let node_rt = &mut self.nodes[node];
        let (netns, ip) = if planned.host_network {
            (node_rt.netns.clone(), node_rt.ip)
        } else {
            node_rt.pods_on_node += 1;
            let ip = Ipv4Addr::new(10, 244, node as u8 + 1, 9 + node_rt.pods_on_node as u8);
            (format!("skiff-{}-p{k}", self.run_id), ip)
        };
        let node_ns = self.nodes[node].netns.clone();
        let gw = self.nodes[node].pod_gateway;
        if !planned.host_network {
            self.add_netns(&netns)?;
            let veth = format!("vp{k}");
            sys::ip_in(&node_ns, &["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns])?;
            sys::ip_in(&node_ns, &["link", "set", &veth, "master", "cni0", "up"])?;
            sys::ip_in(&netns, &["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            sys::ip_in(&netns, &["link", "set", "eth0", "up"])?;
            sys::ip_in(&netns, &["route", "add", "default", "via", &gw.to_string()])?;
            self.write_etc(&netns, &planned, ip)?;
        }
        let cgroup = self.nodes[node].cgroup.join("pods").join(format!("p{k}"));
        fs::create_dir_all(&cgroup)?;
        let log = self.work_dir.join("logs").join(format!("{}_{}.log", planned.namespace, planned.name));
        self.pods.push(PodRt {
            namespace: planned.namespace.clone(),
            name: planned.name.clone(),
            uid: planned.uid.clone(),
            ip,
            node,
            netns,
            cgroup,
            labels: planned.labels.clone(),
            log,
            host_network: planned.host_network,
            planned,
            children: Vec::new(),
        });
        Ok(())
    }

    /// /etc/netns/<netns>/{hosts,resolv.conf}: Service names resolve to
    /// ClusterIPs in the pod (`ip netns exec` mounts these over /etc).
    fn write_etc(&mut self, netns: &str, pod: &PlannedPod, ip: Ipv4Addr) -> anyhow::Result<()> {
        let dir = PathBuf::from("/etc/netns").join(netns);
        fs::create_dir_all(&dir)?;
        self.etc_dirs.push(dir.clone());
        let mut hosts = format!("127.0.0.1 localhost\n::1 localhost\n{ip} {}\n", pod.name);
        for s in &self.services {
            let fq = format!("{}.{}.svc.cluster.local", s.name, s.namespace);
            let mut names = vec![fq, format!("{}.{}.svc", s.name, s.namespace), format!("{}.{}", s.name, s.namespace)];
            if s.namespace == pod.namespace {
                names.push(s.name.clone());
            }
            hosts.push_str(&format!("{} {}\n", s.cluster_ip, names.join(" ")));
        }
        for (ip, name) in OUTSIDE_HOSTS {
            hosts.push_str(&format!("{ip} {name}\n"));
        }
        fs::write(dir.join("hosts"), hosts)?;
        // No DNS server: unknown names fail fast instead of leaving the mesh.
        fs::write(
            dir.join("resolv.conf"),
            format!("search {}.svc.cluster.local svc.cluster.local cluster.local\nnameserver 127.0.0.1\noptions timeout:1 attempts:1\n", pod.namespace),
        )?;
        Ok(())
    }

    /// The cluster as node-agent and ztunnel read it.
    pub fn write_state(&self) -> anyhow::Result<()> {
        let mut docs = Vec::new();
        for (name, labels) in &self.namespaces {
            let ns = k8s::Namespace {
                metadata: k8s::ObjectMeta { name: Some(name.clone()), labels: labels.clone(), ..Default::default() },
            };
            docs.push(with_kind("v1", "Namespace", serde_json::to_value(&ns)?));
        }
        sys::write_atomic(&self.state_dir.join("namespaces.yaml"), &join_docs(&docs)?)?;
        let mut docs = Vec::new();
        for s in &self.services {
            let mut obj = s.object.clone();
            obj.metadata.namespace = Some(s.namespace.clone());
            obj.spec.cluster_ip = Some(s.cluster_ip.to_string());
            let mut doc = with_kind("v1", "Service", serde_json::to_value(&obj)?);
            if let Some(ip) = self.load_balancers.get(&format!("{}/{}", s.namespace, s.name)) {
                doc["status"] = serde_json::json!({"loadBalancer": {"ingress": [{"ip": ip.to_string()}]}});
            }
            docs.push(doc);
        }
        sys::write_atomic(&self.state_dir.join("services.yaml"), &join_docs(&docs)?)?;
        let mut docs = Vec::new();
        for p in &self.pods {
            let mut annotations = BTreeMap::new();
            if !p.host_network && self.netns_annotation {
                annotations.insert(skiff_core::ANNOTATION_LOCAL_NETNS.to_owned(), format!("/var/run/netns/{}", p.netns));
            }
            let mut spec = p.planned.spec.clone();
            spec.node_name = Some(self.nodes[p.node].name.clone());
            let pod = k8s::Pod {
                metadata: k8s::ObjectMeta {
                    name: Some(p.name.clone()),
                    namespace: Some(p.namespace.clone()),
                    uid: Some(p.uid.clone()),
                    labels: p.labels.clone(),
                    annotations,
                    owner_references: p.planned.owner.iter().cloned().collect(),
                    ..Default::default()
                },
                spec,
                status: k8s::PodStatus { phase: Some("Running".into()), pod_ip: Some(p.ip.to_string()), ..Default::default() },
            };
            docs.push(with_kind("v1", "Pod", serde_json::to_value(&pod)?));
        }
        sys::write_atomic(&self.state_dir.join("pods.yaml"), &join_docs(&docs)?)?;
        let mut docs = Vec::new();
        for p in &self.policies {
            match p {
                k8s::Object::PeerAuthentication(o) => docs.push(with_kind("security.istio.io/v1", "PeerAuthentication", serde_json::to_value(o)?)),
                k8s::Object::AuthorizationPolicy(o) => docs.push(with_kind("security.istio.io/v1", "AuthorizationPolicy", serde_json::to_value(o)?)),
                k8s::Object::VirtualService(o) => docs.push(with_kind("networking.istio.io/v1", "VirtualService", serde_json::to_value(o)?)),
                k8s::Object::DestinationRule(o) => docs.push(with_kind("networking.istio.io/v1", "DestinationRule", serde_json::to_value(o)?)),
                k8s::Object::Gateway(o) => docs.push(with_kind("networking.istio.io/v1", "Gateway", serde_json::to_value(o)?)),
                k8s::Object::ServiceEntry(o) => docs.push(with_kind("networking.istio.io/v1", "ServiceEntry", serde_json::to_value(o)?)),
                k8s::Object::Telemetry(o) => docs.push(with_kind("telemetry.istio.io/v1", "Telemetry", serde_json::to_value(o)?)),
                k8s::Object::ConfigMap(o) => docs.push(with_kind("v1", "ConfigMap", serde_json::to_value(o)?)),
                k8s::Object::Invalid(o) => docs.push(o.raw.clone()),
                _ => {}
            }
        }
        sys::write_atomic(&self.state_dir.join("policies.yaml"), &join_docs(&docs)?)?;
        let mut docs = Vec::new();
        for p in &self.secrets {
            if let k8s::Object::Secret(o) = p {
                docs.push(with_kind("v1", "Secret", serde_json::to_value(o)?));
            }
        }
        sys::write_atomic(&self.state_dir.join("secrets.yaml"), &join_docs(&docs)?)?;
        self.mirror_to_kube()
    }

    /// Applies extra manifests (policies, …) to the running mesh, like
    /// `kubectl apply`; `None` deletes what was applied under `name`.
    pub fn apply(&self, name: &str, yaml: Option<&str>) -> anyhow::Result<()> {
        let path = self.state_dir.join(format!("applied-{name}.yaml"));
        match yaml {
            Some(y) => sys::write_atomic(&path, y)?,
            None => match fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            },
        }
        self.mirror_to_kube()
    }

    /// `SKIFF_LOG_FORMAT` for the mesh's processes (node processes, and
    /// pods: waypoints and gateways read it, apps ignore it).
    fn log_format_env(&self) -> Option<(String, String)> {
        self.log_format.clone().map(|f| ("SKIFF_LOG_FORMAT".to_owned(), f))
    }

    fn node_env(&self) -> Vec<(String, String)> {
        let log = std::env::var("SKIFF_LOG").unwrap_or_else(|_| "info".into());
        let mut env = vec![("SKIFF_LOG".into(), log), ("RUST_BACKTRACE".into(), "0".into()), ("NO_COLOR".into(), "1".into())];
        env.extend(self.log_format_env());
        env
    }

    /// Starts (or restarts) node-agent on node `i`.
    pub fn start_node_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let n = &self.nodes[i];
        let source = self.source_args();
        let argv: Vec<String> = vec![
            self.bin_dir.join("skiff-node-agent").display().to_string(),
            "run".into(),
            "--node".into(),
            n.name.clone(),
            source[0].clone(),
            source[1].clone(),
            "--cgroup".into(),
            n.cgroup.display().to_string(),
            "--pin-dir".into(),
            n.pin_dir.display().to_string(),
            "--ztunnel-socket".into(),
            n.zds_socket.display().to_string(),
            "--cni-bin-dir".into(),
            n.cni_bin_dir.display().to_string(),
            "--cni-conf-dir".into(),
            n.cni_conf_dir.display().to_string(),
            "--cni-socket".into(),
            n.cni_socket.display().to_string(),
            "--cni-state-file".into(),
            n.cni_state_file.display().to_string(),
            "--cni-plugin".into(),
            self.bin_dir.join("skiff-cni").display().to_string(),
        ];
        let argv: Vec<String> = argv.into_iter().chain(self.agent_args.iter().cloned()).collect();
        let child = self.spawn_on_node(i, &argv, &n.agent_log)?;
        self.nodes[i].agent = Some(child);
        Ok(())
    }

    /// Starts a node process (node netns, the node's system cgroup, host
    /// mounts) with its output in `log`.
    fn spawn_on_node(&self, i: usize, argv: &[String], log: &Path) -> anyhow::Result<Child> {
        let n = &self.nodes[i];
        let hosts = self.node_hosts()?;
        let place = sys::Placement { netns: &n.netns, cgroup: &n.system_cgroup, pod_view: false, hosts: Some(&hosts) };
        let mut argv = argv.to_vec();
        if self.pin_node_cpus {
            let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            argv.splice(0..0, ["taskset".to_owned(), "-c".to_owned(), (i % cpus).to_string()]);
        }
        sys::spawn_logged(sys::command(&place, &argv, &self.node_env())?, log)
    }

    /// The nodes' /etc/hosts: the machine's, and the outside host's names
    /// (as pods know them), so ztunnel resolves a DNS ServiceEntry's host
    /// as a node of a cluster resolves a public name.
    fn node_hosts(&self) -> anyhow::Result<PathBuf> {
        let path = self.work_dir.join("node-hosts");
        if !path.exists() {
            let mut hosts = fs::read_to_string("/etc/hosts").unwrap_or_else(|_| "127.0.0.1 localhost\n".into());
            if !hosts.ends_with('\n') {
                hosts.push('\n');
            }
            for (ip, name) in OUTSIDE_HOSTS {
                hosts.push_str(&format!("{ip} {name}\n"));
            }
            sys::write_atomic(&path, &hosts)?;
        }
        Ok(path)
    }

    /// Kills node-agent on node `i` with SIGKILL (no chance to clean up).
    pub fn kill_node_agent(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts (or restarts) ztunnel on node `i`.
    pub fn start_ztunnel(&mut self, i: usize) -> anyhow::Result<()> {
        let n = &self.nodes[i];
        let [source_flag, source_value] = self.source_args();
        let argv: Vec<String> = [
            self.bin_dir.join("skiff-ztunnel").display().to_string(),
            "--node".into(),
            n.name.clone(),
            source_flag,
            source_value,
            "--zds-socket".into(),
            n.zds_socket.display().to_string(),
            "--pin-dir".into(),
            n.pin_dir.display().to_string(),
            "--drain-timeout".into(),
            "2".into(),
            "--ca-dir".into(),
            self.ca_dir().display().to_string(),
            "--cert-lifetime".into(),
            self.cert_lifetime.as_secs().to_string(),
        ]
        .into_iter()
        .chain(self.outbound_traffic_policy.iter().flat_map(|m| ["--outbound-traffic-policy".to_owned(), m.clone()]))
        .chain(self.ztunnel_args.iter().cloned())
        .collect();
        let argv: Vec<String> = match self.ztunnel_soft_nofile {
            Some(soft) => ["prlimit".to_owned(), format!("--nofile={soft}:"), "--".to_owned()].into_iter().chain(argv).collect(),
            None => argv,
        };
        let child = self.spawn_on_node(i, &argv, &n.ztunnel_log)?;
        self.nodes[i].ztunnel = Some(child);
        Ok(())
    }

    /// Starts a packet capture on the link between the nodes (every port
    /// of the fabric bridge: a bridged frame is seen once per port it
    /// crosses).
    pub fn capture_between_nodes(&self) -> anyhow::Result<crate::capture::Capture> {
        let fabric = self.fabric.as_ref().context("no fabric")?;
        crate::capture::Capture::start(Path::new(&format!("/var/run/netns/{fabric}")), None)
    }

    /// The mesh's CA directory (shared by every node's ztunnel: one trust
    /// domain, one root).
    pub fn ca_dir(&self) -> PathBuf {
        self.work_dir.join("ca")
    }

    /// Stops pod `k`'s containers as kubelet does: SIGTERM, then SIGKILL
    /// after `grace`. Returns once they have exited.
    pub fn terminate_pod(&mut self, k: usize, grace: Duration) {
        for c in &mut self.pods[k].children {
            sys::stop_child(c, grace);
        }
    }

    /// Stops ztunnel on node `i` (SIGTERM: it drains, then exits).
    pub fn stop_ztunnel(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].ztunnel.take() {
            sys::stop_child(&mut c, Duration::from_secs(5));
        }
    }

    /// The process id of node `i`'s ztunnel, while it runs.
    pub fn ztunnel_pid(&self, i: usize) -> Option<u32> {
        self.nodes.get(i)?.ztunnel.as_ref().map(|c| c.id())
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) ztunnel on node `i`: while it
    /// is frozen the kernel still completes handshakes with its listeners
    /// until their accept queues are full, and nothing is relayed.
    pub fn freeze_ztunnel(&mut self, i: usize, frozen: bool) -> anyhow::Result<()> {
        let c = self.nodes[i].ztunnel.as_ref().context("ztunnel is not running")?;
        let sig = if frozen { nix::sys::signal::Signal::SIGSTOP } else { nix::sys::signal::Signal::SIGCONT };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig)?;
        Ok(())
    }

    fn wait_for_capture(&mut self, i: usize) -> anyhow::Result<()> {
        let pin = self.nodes[i].pin_dir.join("links").join("skiff_sockopt");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !pin.exists() {
            if let Some(Ok(Some(status))) = self.nodes[i].agent.as_mut().map(|c| c.try_wait()) {
                bail!("node-agent on {} exited ({status}):\n{}", self.nodes[i].name, tail(&self.nodes[i].agent_log, 30));
            }
            if Instant::now() > deadline {
                bail!("node-agent on {} did not attach capture in time:\n{}", self.nodes[i].name, tail(&self.nodes[i].agent_log, 30));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Waits until ztunnel on node `i` answers `/healthz/ready` with 200.
    pub fn wait_ready(&mut self, i: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, _)) = self.node_http_get(i, 15021, "/healthz/ready") {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.nodes[i].ztunnel.as_mut().map(|c| c.try_wait()) {
                bail!("ztunnel on {} exited ({status}):\n{}", self.nodes[i].name, tail(&self.nodes[i].ztunnel_log, 30));
            }
            if Instant::now() > deadline {
                bail!(
                    "ztunnel on {} not ready in time.\nztunnel log:\n{}\nnode-agent log:\n{}",
                    self.nodes[i].name,
                    tail(&self.nodes[i].ztunnel_log, 20),
                    tail(&self.nodes[i].agent_log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The endpoints of one port of a Service: its selected pods' addresses
    /// and target ports (named ports resolved on each pod).
    fn endpoints_of(&self, s: &PlannedService, port: &k8s::ServicePort) -> Vec<SocketAddrV4> {
        let selector = &s.object.spec.selector;
        self.pods
            .iter()
            .filter(|p| p.namespace == s.namespace && !selector.is_empty() && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
            .filter_map(|p| {
                let target = match &port.target_port {
                    None => port.port,
                    Some(k8s::IntOrString::Int(n)) => *n,
                    Some(k8s::IntOrString::String(name)) => name.parse().ok().or_else(|| {
                        p.planned.spec.containers.iter().flat_map(|c| &c.ports).find(|cp| cp.name.as_deref() == Some(name)).map(|cp| cp.container_port)
                    })?,
                };
                Some(SocketAddrV4::new(p.ip, target))
            })
            .collect()
    }

    /// `LoadBalancer` Services' addresses on the host (see
    /// [`crate::loadbalancer`]).
    fn start_load_balancers(&mut self) -> anyhow::Result<()> {
        let mut frontends = Vec::new();
        for s in &self.services {
            let Some(ip) = self.load_balancers.get(&format!("{}/{}", s.namespace, s.name)) else { continue };
            for port in s.object.spec.ports.iter().filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP")) {
                frontends.push(crate::loadbalancer::Frontend { listen: SocketAddrV4::new(*ip, port.port), endpoints: self.endpoints_of(s, port) });
            }
        }
        if frontends.is_empty() {
            return Ok(());
        }
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let fd = skiff_core::netns::open(Path::new(&format!("/var/run/netns/{}", self.nodes[0].netns)))?;
        crate::loadbalancer::start(rt.handle(), fd, frontends)?;
        self.lb_rt = Some(rt);
        Ok(())
    }

    /// The host address of a `LoadBalancer` Service (its
    /// `status.loadBalancer.ingress[0].ip`).
    pub fn load_balancer_ip(&self, namespace: &str, name: &str) -> Option<Ipv4Addr> {
        self.load_balancers.get(&format!("{namespace}/{name}")).copied()
    }

    fn start_kube_proxy(&mut self) -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let mut frontends = Vec::new();
        for s in &self.services {
            for port in &s.object.spec.ports {
                if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
                    continue;
                }
                let endpoints = self.endpoints_of(s, port);
                frontends.push(kubeproxy::Frontend { vip: SocketAddrV4::new(s.cluster_ip, port.port), endpoints });
            }
        }
        if self.kube_proxy == KubeProxy::Iptables {
            let rules = kubeproxy::iptables_rules(&frontends);
            for n in &self.nodes {
                kubeproxy::iptables_apply(&n.netns, &rules).with_context(|| format!("kube-proxy rules on {}", n.name))?;
            }
            return Ok(());
        }
        for n in &self.nodes {
            let mut vips: Vec<Ipv4Addr> = frontends.iter().map(|f| *f.vip.ip()).collect();
            vips.dedup();
            for vip in vips {
                sys::ip_in(&n.netns, &["addr", "add", &format!("{vip}/32"), "dev", "lo"])?;
            }
            let fd = skiff_core::netns::open(Path::new(&format!("/var/run/netns/{}", n.netns)))?;
            kubeproxy::start(rt.handle(), &n.name, fd, frontends.clone())?;
        }
        self.rt = Some(rt);
        Ok(())
    }

    fn pod_env(&self, p: &PodRt, extra: &[k8s::EnvVar]) -> Vec<(String, String)> {
        let path = format!("{}:{}", self.bin_dir.display(), std::env::var("PATH").unwrap_or_default());
        let mut env = vec![
            ("PATH".to_owned(), path),
            ("POD_NAME".into(), p.name.clone()),
            ("POD_NAMESPACE".into(), p.namespace.clone()),
            ("POD_IP".into(), p.ip.to_string()),
            ("NODE_NAME".into(), self.nodes[p.node].name.clone()),
            // Local-mode stand-ins for the API server and the CA signer,
            // for mesh components that run as pods (waypoints).
            ("SKIFF_CA_DIR".into(), self.ca_dir().display().to_string()),
        ];
        env.extend(self.log_format_env());
        match &self.kube {
            Some(k) => env.push(("SKIFF_KUBE_URL".into(), k.url())),
            None => env.push(("SKIFF_MANIFESTS".into(), self.state_dir.display().to_string())),
        }
        for e in extra {
            env.push((e.name.clone(), e.value.clone().unwrap_or_default()));
        }
        env
    }

    fn start_containers(&mut self, k: usize, _opts: &MeshOptions) -> anyhow::Result<()> {
        let containers = self.pods[k].planned.spec.containers.clone();
        for c in containers {
            let p = &self.pods[k];
            let argv: Vec<String> = c.command.iter().chain(c.args.iter()).cloned().collect();
            let env = self.pod_env(p, &c.env);
            let place = p.placement();
            let cmd = sys::command(&place, &argv, &env)?;
            let child = sys::spawn_logged(cmd, &p.log)
                .with_context(|| format!("pod {}/{} container {}", p.namespace, p.name, c.name))?;
            self.pods[k].children.push(child);
        }
        Ok(())
    }

    /// Index of the pod `namespace/name`, or of the first pod whose name
    /// starts with `name-` (a Deployment's pod).
    pub fn pod(&self, namespace: &str, name: &str) -> &PodRt {
        self.pods_of(namespace, name).into_iter().next().unwrap_or_else(|| panic!("no pod {namespace}/{name}"))
    }

    /// Every pod of `namespace` named `name` or belonging to Deployment `name`.
    pub fn pods_of(&self, namespace: &str, name: &str) -> Vec<&PodRt> {
        self.pods
            .iter()
            .filter(|p| {
                p.namespace == namespace
                    && (p.name == name || p.planned.owner.as_ref().is_some_and(|o| o.name.rsplit_once('-').map(|x| x.0) == Some(name)))
            })
            .collect()
    }

    pub fn service_ip(&self, namespace: &str, name: &str) -> Ipv4Addr {
        self.services
            .iter()
            .find(|s| s.namespace == namespace && s.name == name)
            .unwrap_or_else(|| panic!("no service {namespace}/{name}"))
            .cluster_ip
    }

    pub fn node_index(&self, pod: &PodRt) -> usize {
        pod.node
    }

    /// Runs a command inside a pod (its netns, cgroup and /etc view), like
    /// `kubectl exec`, and waits for it (at most `timeout`).
    pub fn exec(&self, pod: &PodRt, argv: &[&str], timeout: Duration) -> anyhow::Result<Output> {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let env = self.pod_env(pod, &[]);
        let place = pod.placement();
        let mut cmd = sys::command(&place, &argv, &env)?;
        cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().context("exec in pod")?;
        let deadline = Instant::now() + timeout;
        loop {
            if child.try_wait()?.is_some() {
                return Ok(child.wait_with_output()?);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output()?;
                bail!(
                    "`{}` in pod {}/{} did not finish in {timeout:?}; stdout: {} stderr: {}",
                    argv.join(" "),
                    pod.namespace,
                    pod.name,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts a background process in a pod; it is stopped at teardown.
    pub fn spawn_in(&mut self, pod_index: usize, argv: &[&str], log: &Path) -> anyhow::Result<()> {
        let p = &self.pods[pod_index];
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let env = self.pod_env(p, &[]);
        let place = p.placement();
        let cmd = sys::command(&place, &argv, &env)?;
        let child = sys::spawn_logged(cmd, log)?;
        self.extra.push(child);
        Ok(())
    }

    /// Sends `message` over TCP from node `i`'s own netns (as kubelet's
    /// probes do) to `addr`, and returns what comes back before the peer
    /// closes or 3 s pass.
    pub fn node_exchange(&self, i: usize, addr: SocketAddrV4, message: &str) -> anyhow::Result<String> {
        let ns = skiff_core::netns::open(Path::new(&format!("/var/run/netns/{}", self.nodes[i].netns)))?;
        let message = message.to_owned();
        let out = skiff_core::netns::run_in(std::os::fd::AsFd::as_fd(&ns), move || -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect_timeout(&addr.into(), Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.write_all(message.as_bytes())?;
            s.shutdown(std::net::Shutdown::Write)?;
            let mut out = Vec::new();
            match s.read_to_end(&mut out) {
                Ok(_) => {}
                Err(e) if out.is_empty() => return Err(e),
                Err(_) => {}
            }
            Ok(String::from_utf8_lossy(&out).into_owned())
        })??;
        Ok(out)
    }

    /// HTTP GET to 127.0.0.1:`port` inside node `i`'s netns.
    pub fn node_http_get(&self, i: usize, port: u16, path: &str) -> anyhow::Result<(u16, String)> {
        self.netns_http_get(&self.nodes[i].netns, port, path)
    }

    /// HTTP GET to 127.0.0.1:`port` inside a pod's netns (e.g. a waypoint's
    /// metrics).
    pub fn pod_http_get(&self, pod: &PodRt, port: u16, path: &str) -> anyhow::Result<(u16, String)> {
        self.netns_http_get(&pod.netns, port, path)
    }

    /// HTTP GET to 127.0.0.1:`port` inside netns `netns`.
    pub fn netns_http_get(&self, netns: &str, port: u16, path: &str) -> anyhow::Result<(u16, String)> {
        let ns = skiff_core::netns::open(Path::new(&format!("/var/run/netns/{netns}")))?;
        let path = path.to_owned();
        let got = skiff_core::netns::run_in(std::os::fd::AsFd::as_fd(&ns), move || {
            skiff_core::http1::get(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port).into(), "localhost", &path, Duration::from_secs(5))
        })??;
        Ok(got)
    }

    /// Sum of a ztunnel metric on node `i` over series whose labels contain
    /// every `key="value"` in `labels`.
    pub fn metric(&self, i: usize, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        let (status, body) = self.node_http_get(i, 15020, "/metrics")?;
        if status != 200 {
            bail!("metrics on {} answered {status}", self.nodes[i].name);
        }
        Ok(sum_metric(&body, name, labels))
    }

    /// node-agent's pinned state on node `i` (`skiff-node-agent inspect`).
    pub fn inspect(&self, i: usize) -> anyhow::Result<serde_json::Value> {
        let out = std::process::Command::new(self.bin_dir.join("skiff-node-agent"))
            .args(["inspect", "--pin-dir"])
            .arg(&self.nodes[i].pin_dir)
            .env("NO_COLOR", "1")
            .output()?;
        if !out.status.success() {
            bail!("inspect failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Sets (or with `None` removes) a namespace label, as `kubectl label` would.
    pub fn label_namespace(&mut self, ns: &str, key: &str, value: Option<&str>) -> anyhow::Result<()> {
        let labels = self.namespaces.entry(ns.to_owned()).or_default();
        match value {
            Some(v) => labels.insert(key.to_owned(), v.to_owned()),
            None => labels.remove(key),
        };
        self.write_state()
    }

    /// Tears everything down. Called by Drop; safe to call twice.
    pub fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        if std::thread::panicking() {
            self.dump_logs();
        }
        for c in &mut self.extra {
            let _ = c.kill();
            let _ = c.wait();
        }
        for p in &mut self.pods {
            for c in &mut p.children {
                let _ = c.kill();
                let _ = c.wait();
            }
            sys::cgroup_destroy(&p.cgroup);
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.ztunnel.take() {
                sys::stop_child(&mut c, Duration::from_secs(3));
            }
            if let Some(mut c) = n.agent.take() {
                sys::stop_child(&mut c, Duration::from_secs(3));
            }
        }
        for rt in [self.rt.take(), self.lb_rt.take()].into_iter().flatten() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
        // Its listener lives in the fabric netns: stop it before that goes.
        drop(self.kube.take());
        if let Some(bpffs) = self.bpffs.take() {
            for n in &self.nodes {
                remove_pins(&n.pin_dir);
            }
            sys::unmount(&bpffs);
        }
        for ns in self.netns.drain(..).rev() {
            if let Err(e) = sys::ip(&["netns", "del", &ns]) {
                warn!(netns = %ns, error = %e, "netns not deleted");
            }
        }
        for d in self.etc_dirs.drain(..) {
            let _ = fs::remove_dir_all(&d);
        }
        if let Some(cg) = self.cgroup_root.take() {
            sys::cgroup_destroy(&cg);
        }
        if !self.work_dir.as_os_str().is_empty() {
            let _ = fs::remove_dir_all(&self.work_dir);
        }
        info!(run = %self.run_id, "local mesh torn down");
    }

    /// Prints the tail of every log (used when a test fails).
    pub fn dump_logs(&self) {
        let Ok(rd) = fs::read_dir(self.work_dir.join("logs")) else { return };
        let mut paths: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for p in paths {
            eprintln!("===== {} =====\n{}", p.display(), tail(&p, 40));
        }
    }
}

impl Drop for LocalMesh {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn remove_pins(dir: &Path) {
    for sub in ["links", "maps"] {
        if let Ok(rd) = fs::read_dir(dir.join(sub)) {
            for e in rd.filter_map(Result::ok) {
                let _ = fs::remove_file(e.path());
            }
        }
        let _ = fs::remove_dir(dir.join(sub));
    }
    let _ = fs::remove_dir(dir);
}

fn with_kind(api_version: &str, kind: &str, v: serde_json::Value) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("apiVersion".into(), api_version.into());
    m.insert("kind".into(), kind.into());
    if let serde_json::Value::Object(rest) = v {
        m.extend(rest);
    }
    serde_json::Value::Object(m)
}

fn join_docs(docs: &[serde_json::Value]) -> anyhow::Result<String> {
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(d)?);
    }
    Ok(out)
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Sums a metric family in Prometheus text format over matching series.
pub fn sum_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((m, r)) => (m, r),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            if !labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))) {
                return None;
            }
            value.parse::<f64>().ok()
        })
        .sum()
}
