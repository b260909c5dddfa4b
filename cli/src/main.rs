//! `skiff`: the operator's command-line tool.
//!
//! `skiff analyze DIR` reads a directory of Kubernetes and Istio manifests
//! exactly as node-agent, ztunnel and the waypoint read them, and prints one
//! line per problem: the file, the object, the field and why, and what the
//! mesh would serve instead. Nothing runs and nothing is contacted.
//!
//! `skiff check` says whether a running mesh is healthy, node by node;
//! `skiff check --pre` whether this node can run Skiff's capture (see
//! `check.rs`).
//!
//! `skiff explain --from SOURCE --to DESTINATION` prints every decision the
//! mesh takes for that connection or request, in order, with the object
//! and rule that made it (see `explain.rs`), against a manifests
//! directory or the running local mesh's cluster view.
//!
//! Exit codes (analyze): 0 no object refused (fail-closed readings are printed as
//! warnings; `--strict` counts them too), 1 some object refused, 2 the
//! directory could not be read or the command line is wrong.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

mod check;
mod config;
mod dashboard;
mod explain;
mod install;
mod mesh;
mod observe;
mod offline;
mod reach;

/// skiff: install, check, explain and watch a Skiff mesh.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Check a directory of manifests offline, as the mesh would read it.
    ///
    /// Every refused object and every fail-closed reading, with file,
    /// object, field and reason.
    Analyze {
        /// The directory (searched recursively for *.yaml, *.yml, *.json).
        dir: PathBuf,
        /// Output: `text` (one line per problem) or `json`.
        #[arg(short, long, default_value = "text", value_parser = ["text", "json"])]
        output: String,
        /// Also fail (exit 1) on warnings: fields read fail-closed.
        #[arg(long)]
        strict: bool,
    },
    /// Whether the mesh is healthy (or, with --pre, whether this node can
    /// run it).
    ///
    /// One OK/WARN/FAIL line each with a hint, exit 1 on any FAIL: per node, node-agent (which installs the
    /// capture: the kernel hooks that send enrolled pods' connections to
    /// ztunnel) and ztunnel (the node's tunnel) ready and at which
    /// version, the pods enrolled against those that should be, the
    /// certificates and their expiry; mesh-wide, one version and the
    /// config objects refused. `--pre`: whether this node can run Skiff's
    /// capture (kernel, cgroup v2, BTF, bpffs, and as root every capture
    /// program loaded into this kernel).
    Check {
        /// This node's prerequisites, before installing.
        #[arg(long, conflicts_with_all = ["mesh", "kube", "kube_url"])]
        pre: bool,
        /// The skiff-node-agent binary that loads the programs (`--pre`;
        /// default: beside skiff, else on the PATH).
        #[arg(long, requires = "pre")]
        node_agent: Option<PathBuf>,
        #[command(flatten)]
        at: Where,
    },
    /// Every decision the mesh takes for one connection or request, and why.
    ///
    /// In order, with the object and rule that made each: whether the source
    /// is captured, what the address is, whether a waypoint handles it,
    /// the outbound traffic policy, PeerAuthentication (STRICT: only
    /// mutual-TLS connections are accepted), AuthorizationPolicy (which
    /// policy and rule), the VirtualService route and its match, weights,
    /// faults, retries and timeout, and the endpoints. A waypoint is the
    /// per-namespace L7 proxy that Services opt into with
    /// `istio.io/use-waypoint`.
    Explain {
        /// Where it starts: NAMESPACE/POD, NAMESPACE/sa/SERVICE_ACCOUNT,
        /// or an IPv4 address.
        #[arg(long, required_unless_present = "why_denied", conflicts_with = "why_denied")]
        from: Option<String>,
        /// Where it goes: SERVICE[.NAMESPACE][:PORT], NAMESPACE/POD:PORT,
        /// A.B.C.D:PORT, or http://HOST[:PORT]/PATH for an HTTP request.
        #[arg(long, required_unless_present = "why_denied", conflicts_with = "why_denied")]
        to: Option<String>,
        /// Start from a refused connection or request instead: one line of
        /// ztunnel's or a waypoint's access log (text or JSON), as printed.
        #[arg(long, value_name = "ACCESS_LOG_LINE")]
        why_denied: Option<String>,
        /// The request's method (HTTP ports).
        #[arg(short = 'X', long, default_value = "GET")]
        method: String,
        /// A request header, `name: value` (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// Read the cluster from this manifests directory instead of the
        /// running local mesh.
        #[arg(long, conflicts_with_all = ["mesh", "kube", "kube_url"])]
        manifests: Option<PathBuf>,
        /// Read the cluster from the Kubernetes API (KUBECONFIG, else
        /// in-cluster config), as the mesh's own processes read it.
        #[arg(long, conflicts_with = "mesh")]
        kube: bool,
        /// Read the cluster from the Kubernetes API at this URL.
        #[arg(long, value_name = "URL", conflicts_with = "mesh")]
        kube_url: Option<String>,
        /// The local mesh's work directory (`/tmp/skiff-RUN`), when several
        /// run.
        #[arg(long)]
        mesh: Option<PathBuf>,
        /// The mesh's trust domain (identities are spiffe://DOMAIN/ns/NS/sa/SA).
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Istio's root namespace (mesh-wide policies).
        #[arg(long, default_value = skiff_core::routing::DEFAULT_ROOT_NAMESPACE)]
        root_namespace: String,
        /// ztunnel's `--outbound-traffic-policy` (ALLOW_ANY or
        /// REGISTRY_ONLY), in force when the mesh config sets none. Default:
        /// the running local mesh's ztunnel's, else ALLOW_ANY.
        #[arg(long)]
        outbound_traffic_policy: Option<String>,
        /// Output: `text` or `json`.
        #[arg(short, long, default_value = "text", value_parser = ["text", "json"])]
        output: String,
    },
    /// Install Skiff on the cluster kubectl points at.
    ///
    /// The node DaemonSet
    /// (node-agent, which captures enrolled pods' connections in the
    /// kernel, and ztunnel, the node's tunnel), the signer (the mesh CA's
    /// only holder) and their RBAC; optionally Istio's CRDs, the ingress
    /// gateway and waypoints (per-namespace L7 proxies). With `--ca
    /// generate`, a new mesh root: its key goes into the Secret
    /// skiff-system/skiff-ca only. Applied with `kubectl apply -f -`.
    Install {
        #[command(flatten)]
        parts: Parts,
        /// The mesh CA: `existing` (Secret skiff-ca and ConfigMap
        /// skiff-ca-root made by hand), `generate` (a new root), or
        /// `files` (`--ca-key`, `--ca-cert`).
        #[arg(long, default_value = "existing", value_parser = ["existing", "generate", "files"])]
        ca: String,
        /// The root's private key (PKCS#8 PEM), with `--ca files`.
        #[arg(long, required_if_eq("ca", "files"))]
        ca_key: Option<PathBuf>,
        /// The root's certificate (PEM), with `--ca files`.
        #[arg(long, required_if_eq("ca", "files"))]
        ca_cert: Option<PathBuf>,
        /// The mesh's trust domain (identities are spiffe://DOMAIN/ns/NS/sa/SA):
        /// in the root's name and given to the signer, ztunnel, waypoints
        /// and the gateway.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// With `--ca generate`: also write the new root's key and
        /// certificate into this directory, to keep offline.
        #[arg(long, value_name = "DIR")]
        ca_out: Option<PathBuf>,
        /// Let `--ca generate|files` replace a root the cluster has.
        #[arg(long)]
        replace_ca: bool,
        /// Print the objects that would be applied (YAML on stdout, Secret
        /// values redacted; a list on stderr) and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove Skiff from the cluster kubectl points at.
    ///
    /// In order: the node
    /// DaemonSet, then on every node the cleaner (CNI chain restored,
    /// programs detached), then the install. Unlabel enrolled namespaces
    /// first.
    Uninstall {
        #[command(flatten)]
        parts: Parts,
        /// Print each step (commands and objects) and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Shell completions for skiff.
    ///
    /// `skiff completions bash >
    /// /etc/bash_completion.d/skiff` (or zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// A web page with the mesh's live service graph, served locally.
    ///
    /// Workloads grouped by app and version, edges with request rate, error
    /// rate and p99 latency, a padlock on mutual-TLS edges, the split of
    /// weighted routes, ingress and egress, warnings for refused config and
    /// denied traffic; click an edge for its figures and `skiff explain`.
    /// Read from every ztunnel's, waypoint's and gateway's metrics (as
    /// root, in their network namespaces; in a cluster by pod
    /// port-forward) every 2 s.
    Dashboard {
        /// Where to serve the page (port 0: any free port; the URL is
        /// printed).
        #[arg(long, default_value = "127.0.0.1:15080")]
        listen: String,
        /// Read the graph's series from this Prometheus server
        /// (`http://HOST:PORT`) instead of scraping the proxies.
        #[arg(long, value_name = "URL")]
        prometheus: Option<String>,
        /// A cluster: its objects from the Kubernetes API (KUBECONFIG, else
        /// in-cluster config), its proxies' metrics from --prometheus or,
        /// without it, by pod port-forward every 2 s (small clusters).
        #[arg(long, conflicts_with = "mesh")]
        kube: bool,
        /// A cluster, through the Kubernetes API at this URL.
        #[arg(long, value_name = "URL", conflicts_with = "mesh")]
        kube_url: Option<String>,
        /// The local mesh's work directory (`/tmp/skiff-RUN`), when several
        /// run.
        #[arg(long)]
        mesh: Option<PathBuf>,
    },
    /// A live stream of the mesh's connection and request events.
    ///
    /// One line each: who saw it (a node's ztunnel, a waypoint, the gateway), the
    /// verdict (ALLOW, DENY by policy, ERROR), source and destination
    /// workloads and identities, the policy or flags that decided, the
    /// latency. Each proxy keeps a bounded buffer per reader: a reader that
    /// falls behind loses the oldest events and is told how many; the mesh
    /// never waits for it. As root (it reads each proxy's admin port in its
    /// network namespace), or with --kube by pod port-forward.
    Observe {
        /// Only events whose source or destination is in this namespace.
        #[arg(short, long)]
        namespace: Option<String>,
        /// Only events whose source or destination workload is this one.
        #[arg(long)]
        pod: Option<String>,
        /// Only this verdict: `allow`, `deny` (refused by policy) or
        /// `error` (no route, no endpoint, upstream failure, fault).
        #[arg(long, value_parser = ["allow", "deny", "error"])]
        verdict: Option<String>,
        /// Only `tcp` (connections, TCP streams) or `http` (requests).
        #[arg(long, value_parser = ["tcp", "http"])]
        protocol: Option<String>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
        #[command(flatten)]
        at: Where,
        /// Output: `text` or `json` (one event per line, the access line's
        /// fields and `proxy`).
        #[arg(short, long, default_value = "text", value_parser = ["text", "json"])]
        output: String,
    },
    /// The state each node's ztunnel holds, by pod name and namespace.
    ///
    /// The pods it serves (`workloads`: the enrolled pods, whose traffic it
    /// captures), the policies in force and objects refused (`policies`),
    /// its workload certificates and their expiry (`certs`). Read from
    /// each ztunnel's admin endpoint: in its node's network namespace (run
    /// as root), or with --kube by pod port-forward. Exit 1 when a node's
    /// ztunnel does not answer.
    Config {
        #[arg(value_enum)]
        what: config::What,
        #[command(flatten)]
        at: Where,
        /// Output: `table`, `json` or `yaml`.
        #[arg(short, long, default_value = "table", value_parser = ["table", "json", "yaml"])]
        output: String,
    },
}

/// Which mesh: the local one, or a cluster through the Kubernetes API.
#[derive(clap::Args)]
struct Where {
    /// The local mesh's work directory (`/tmp/skiff-RUN`), when several
    /// run.
    #[arg(long, conflicts_with_all = ["kube", "kube_url"])]
    mesh: Option<PathBuf>,
    /// A cluster, through the Kubernetes API (KUBECONFIG, else in-cluster
    /// config): each proxy's local ports are reached by pod port-forward,
    /// as `kubectl port-forward` does (needs `create` on pods/portforward
    /// in skiff-system and the waypoints' namespaces).
    #[arg(long)]
    kube: bool,
    /// A cluster, through the Kubernetes API at this URL.
    #[arg(long, value_name = "URL")]
    kube_url: Option<String>,
}

impl Where {
    fn open(self) -> Result<reach::Mesh, String> {
        reach::Mesh::open(self.mesh.as_deref(), self.kube, self.kube_url)
    }
}

/// What an install has, for install and uninstall alike.
#[derive(clap::Args)]
struct Parts {
    /// The image (`REGISTRY/skiff:TAG`, built from the repository's
    /// Dockerfile). Install: default `skiff:dev`; uninstall: default the
    /// installed node DaemonSet's.
    #[arg(long)]
    image: Option<String>,
    /// Also minimal CRDs for the Istio kinds Skiff reads (clusters without
    /// Istio; never next to Istio's own CRDs).
    #[arg(long)]
    crds: bool,
    /// Also the ingress gateway (istio-system/istio-ingressgateway; the
    /// namespace istio-system must exist).
    #[arg(long)]
    gateway: bool,
    /// A waypoint in this namespace (repeatable); then label the
    /// namespace or its Services istio.io/use-waypoint=waypoint.
    #[arg(long = "waypoint", value_name = "NAMESPACE")]
    waypoints: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Analyze { dir, output, strict } => analyze(&dir, &output, strict),
        Command::Explain { from, to, why_denied, method, headers, manifests, kube, kube_url, mesh, trust_domain, root_namespace, outbound_traffic_policy, output } => {
            let what = match (from, to, why_denied) {
                (Some(f), Some(t), None) => What::Asked(f, t),
                (None, None, Some(line)) => What::Logged(line),
                _ => unreachable!("clap requires --from and --to, or --why-denied"),
            };
            let source = match (manifests, kube || kube_url.is_some()) {
                (Some(d), _) => Source::Manifests(d),
                (None, true) => Source::Kube(kube_url),
                (None, false) => Source::Mesh(mesh),
            };
            match run_explain(what, method, headers, source, trust_domain, root_namespace, outbound_traffic_policy) {
                Ok(e) => {
                    if output == "json" {
                        println!("{}", serde_json::to_string_pretty(&e).unwrap_or_default());
                    } else {
                        print!("{}", explain::render(&e));
                    }
                    ExitCode::SUCCESS
                }
                Err(why) => {
                    eprintln!("skiff explain: {why}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Install { parts, ca, ca_key, ca_cert, trust_domain, ca_out, replace_ca, dry_run } => {
            let ca = match (ca.as_str(), ca_key, ca_cert) {
                ("generate", ..) => install::Ca::Generate,
                ("files", Some(k), Some(c)) => install::Ca::Files(k, c),
                _ => install::Ca::Existing,
            };
            let image = parts.image.unwrap_or_else(|| "skiff:dev".into());
            let o = install::Options { image, crds: parts.crds, gateway: parts.gateway, waypoints: parts.waypoints, ca, trust_domain, ca_out };
            exit_with("install", install::install(&o, dry_run, replace_ca))
        }
        Command::Uninstall { parts, dry_run } => {
            let image = match parts.image.or_else(install::installed_image) {
                Some(i) => i,
                None if dry_run => "skiff:dev".into(),
                None => {
                    eprintln!("skiff uninstall: the node DaemonSet's image cannot be read from the cluster: pass --image (the cleaner runs it)");
                    return ExitCode::from(2);
                }
            };
            let o = install::Options {
                image,
                crds: parts.crds,
                gateway: parts.gateway,
                waypoints: parts.waypoints,
                ca: install::Ca::Existing,
                trust_domain: "cluster.local".into(),
                ca_out: None,
            };
            exit_with("uninstall", install::uninstall(&o, dry_run))
        }
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(shell, &mut Cli::command(), "skiff", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Dashboard { listen, prometheus, kube, kube_url, mesh } => match (if kube || kube_url.is_some() {
            dashboard::View::kube(kube_url, prometheus.is_none())
        } else {
            mesh::work_dir(mesh.as_deref()).map(dashboard::View::Mesh)
        })
        .and_then(|view| dashboard::run(view, &listen, prometheus))
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(why) => {
                eprintln!("skiff dashboard: {why}");
                ExitCode::from(2)
            }
        },
        Command::Observe { namespace, pod, verdict, protocol, count, at, output } => {
            let filter = observe::Filter { namespace, pod, verdict, protocol };
            match at.open().and_then(|mesh| observe::run(mesh, &filter, output == "json", count)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(why) => {
                    eprintln!("skiff observe: {why}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Config { what, at, output } => match at.open().and_then(|mesh| config::run(what, &mesh, &output)) {
            Ok((text, all_ok)) => {
                print!("{text}");
                if all_ok { ExitCode::SUCCESS } else { ExitCode::from(1) }
            }
            Err(why) => {
                eprintln!("skiff config: {why}");
                ExitCode::from(2)
            }
        },
        Command::Check { pre, node_agent, at } => {
            let lines = if pre {
                let root = check::effective_uid() == Some(0);
                check::pre(node_agent.or_else(check::find_node_agent).as_deref(), root)
            } else {
                match at.open().and_then(|mesh| check::live(&mesh)) {
                    Ok(l) => l,
                    Err(why) => {
                        eprintln!("skiff check: {why}");
                        return ExitCode::from(2);
                    }
                }
            };
            for l in &lines {
                println!("{l}");
            }
            if lines.iter().any(|l| l.level == check::Level::Fail) {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}

fn analyze(dir: &std::path::Path, output: &str, strict: bool) -> ExitCode {
    let snap = match skiff_core::source::LocalDirSource::analyze(dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("skiff analyze: {}", e.report());
            return ExitCode::from(2);
        }
    };
    if output == "json" {
        let v = serde_json::json!({
            "rejected": snap.rejected.iter().map(|r| r.to_json()).collect::<Vec<_>>(),
            "warnings": snap.warnings,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        for r in &snap.rejected {
            println!("error: {r}");
        }
        for w in &snap.warnings {
            println!("warning: {w}");
        }
        let objects = snap.namespaces.len()
            + snap.workloads.len()
            + snap.services.len()
            + snap.peer_authentications.len()
            + snap.authorization_policies.len()
            + snap.virtual_services.len()
            + snap.destination_rules.len();
        eprintln!(
            "skiff analyze {}: {} object(s) taken, {} refused, {} warning(s)",
            dir.display(),
            objects,
            snap.rejected.len(),
            snap.warnings.len()
        );
    }
    if !snap.rejected.is_empty() || (strict && !snap.warnings.is_empty()) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Where `explain` reads the cluster.
enum Source {
    /// A manifests directory, as written.
    Manifests(PathBuf),
    /// The Kubernetes API (a URL, else KUBECONFIG or in-cluster).
    Kube(Option<String>),
    /// The running local mesh (its work directory when given).
    Mesh(Option<PathBuf>),
}

/// The cluster as the mesh's processes read it from the Kubernetes API:
/// the first complete view, within 30 s.
fn from_kube(url: Option<String>) -> Result<skiff_core::model::Snapshot, String> {
    match dashboard::View::kube(url, false)? {
        dashboard::View::Kube(k, _) => Ok((*k.into_inner().expect("lock").1).clone()),
        dashboard::View::Mesh(_) => unreachable!("View::kube reads the API"),
    }
}

/// What `explain` is asked about.
enum What {
    /// `--from`, `--to`.
    Asked(String, String),
    /// `--why-denied`: an access-log line.
    Logged(String),
}

#[allow(clippy::too_many_arguments)]
fn run_explain(
    what: What,
    method: String,
    headers: Vec<String>,
    source: Source,
    trust_domain: String,
    root_namespace: String,
    outbound_traffic_policy: Option<String>,
) -> Result<explain::Explanation, String> {
    let (from, to, path, method) = match what {
        What::Asked(from, to) => {
            let (to, path) = explain::parse_to(&to)?;
            (explain::parse_from(&from)?, to, path, method)
        }
        What::Logged(line) => {
            let (from, to, path, logged) = explain::from_access_log(&line)?;
            (from, to, path, logged.unwrap_or(method))
        }
    };
    let headers = headers
        .iter()
        .map(|h| match h.split_once(':') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_ascii_lowercase(), v.trim().to_owned())),
            _ => Err(format!("-H {h:?}: expected `name: value`")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    // A directory of manifests as written (offline), or the running local
    // mesh's cluster view, read object by object as the mesh reads it.
    let (snap, notes, running) = match source {
        Source::Manifests(d) => {
            let (snap, notes) = offline::load(&d)?;
            (snap, notes, None)
        }
        Source::Kube(url) => {
            let snap = from_kube(url)?;
            let notes = snap.rejected.iter().map(|r| format!("refused: {r}")).collect();
            (snap, notes, None)
        }
        Source::Mesh(mesh) => {
            let cluster = mesh::cluster_dir(mesh.as_deref())?;
            let snap = skiff_core::source::LocalDirSource::analyze(&cluster).map_err(|e| e.report())?;
            let notes = snap.rejected.iter().map(|r| format!("refused: {r}")).collect();
            (snap, notes, Some(cluster))
        }
    };
    // The flag ztunnel runs with: given, else the running mesh's.
    let (flag, flag_from) = match outbound_traffic_policy {
        Some(p) => (p, "--outbound-traffic-policy as given to skiff explain"),
        None => match running.as_deref().and_then(|c| mesh::ztunnel_flag(c, "--outbound-traffic-policy")) {
            Some(p) => (p, "ztunnel's --outbound-traffic-policy"),
            None => ("ALLOW_ANY".to_owned(), "the default (no mesh config or ztunnel flag sets one)"),
        },
    };
    let outbound_policy = skiff_core::egress::OutboundPolicy::parse(&flag).ok_or_else(|| format!("--outbound-traffic-policy {flag:?}: ALLOW_ANY or REGISTRY_ONLY"))?;
    for n in &notes {
        eprintln!("note: {n}");
    }
    let ask = explain::Ask {
        from,
        to,
        path,
        method: method.to_ascii_uppercase(),
        headers,
        trust_domain,
        root_namespace,
        outbound_policy,
        outbound_policy_from: format!("{flag_from}: {flag}"),
    };
    explain::explain(&snap, &ask)
}

fn exit_with(what: &str, r: Result<(), String>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("skiff {what}: {why}");
            ExitCode::from(1)
        }
    }
}
