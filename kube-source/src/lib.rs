//! The Kubernetes API as a Skiff config source.
//!
//! One kube-rs watcher and reflector store per kind (Namespaces, Pods —
//! optionally only this node's —, Services, ServiceAccounts, EndpointSlices
//! and the Istio kinds the model reads), on a runtime thread of its own so
//! that synchronous callers (node-agent) and async ones (ztunnel, waypoint)
//! use it alike through [`ConfigSource`]. Objects are read as JSON
//! (`DynamicObject`) and go through the same parsing and validation as the
//! manifests directory ([`skiff_core::k8s::parse_object`],
//! [`Snapshot::from_objects`]), so both sources produce the same
//! [`Snapshot`] for the same objects.
//!
//! Publishing rules:
//! - nothing until every kind has finished its first list (a kind whose CRD
//!   is not installed counts as finished and empty, logged once);
//! - a relist (after `410 Gone`) replaces a store only when complete (the
//!   reflector's buffered `Init`/`InitDone`), and while any kind is
//!   relisting, publishing waits (up to [`KubeOptions::max_hold`]);
//! - changes are debounced ([`KubeOptions::debounce`], at most
//!   [`KubeOptions::max_delay`] behind), and a snapshot equal to the last
//!   one published is not published again.
//!
//! [`watch_cluster`] turns any config source (this one or a manifests
//! directory) into the watch channel the proxies serve from.

mod watch;

pub use watch::{watch_cluster, WatchError};

use std::{
    sync::{mpsc as std_mpsc, Arc},
    thread::JoinHandle,
    time::Duration,
};

use futures::StreamExt as _;
use kube::{
    api::{ApiResource, DynamicObject},
    runtime::{
        reflector::{self, store::Writer, Store},
        watcher, WatchStreamExt as _,
    },
    Api, Client,
};
use skiff_core::{
    k8s::{self, Object},
    model::Snapshot,
    source::{ConfigSource, SourceError},
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

/// How to reach the API server and what to watch.
#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// API server URL (e.g. `http://127.0.0.1:6443` for a test server);
    /// `None`: in-cluster config, else `KUBECONFIG`/`~/.kube/config`.
    pub url: Option<String>,
    /// Watch only pods with this `spec.nodeName` (node-agent). ztunnel and
    /// waypoints need every pod (peers, Service endpoints) and leave it unset.
    pub pods_on_node: Option<String>,
    /// Quiet time after a change before a snapshot is published.
    pub debounce: Duration,
    /// Upper bound on how long a stream of changes delays publishing.
    pub max_delay: Duration,
    /// Upper bound on how long a relist in progress holds publishing.
    pub max_hold: Duration,
    /// Also watch the Secrets of this namespace (the ingress gateway's
    /// own, for its certificates; RBAC: a Role there). No other process
    /// reads Secrets.
    pub secrets_namespace: Option<String>,
    /// Also watch the ConfigMaps of this namespace (ztunnel: Istio's mesh
    /// config, ConfigMap `istio` in the root namespace; RBAC: a Role
    /// there).
    pub config_maps_namespace: Option<String>,
    /// Also watch Telemetry objects (waypoints and gateways: their
    /// tracing; RBAC: the `skiff-telemetry-reader` ClusterRole). Others
    /// never ask, so a cluster without the kind or the grant costs them
    /// nothing.
    pub telemetry: bool,
}

impl Default for KubeOptions {
    fn default() -> Self {
        KubeOptions {
            url: None,
            pods_on_node: None,
            debounce: Duration::from_millis(150),
            max_delay: Duration::from_secs(1),
            max_hold: Duration::from_secs(5),
            secrets_namespace: None,
            config_maps_namespace: None,
            telemetry: false,
        }
    }
}

/// A watched kind.
#[derive(Clone, Copy, Debug)]
pub struct WatchedKind {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    /// Older API versions to read the kind at when `version` is not served
    /// (Istio CRDs serve v1, v1beta1 and, for networking, v1alpha3; a
    /// cluster may serve only some).
    pub fallback: &'static [&'static str],
    /// What it feeds in the model.
    pub feeds: &'static str,
}

/// Secrets: watched in one namespace, by the ingress gateway only.
pub const SECRETS: WatchedKind =
    WatchedKind { group: "", version: "v1", kind: "Secret", plural: "secrets", fallback: &[], feeds: "the ingress gateway's certificates (its own namespace only)" };

/// ConfigMaps: watched in the root namespace, by ztunnel only (Istio's
/// mesh config).
pub const CONFIG_MAPS: WatchedKind =
    WatchedKind { group: "", version: "v1", kind: "ConfigMap", plural: "configmaps", fallback: &[], feeds: "Istio's mesh config (ConfigMap istio in the root namespace): the outbound traffic policy" };

/// Every kind the source watches cluster-wide (and so the `list`/`watch`
/// RBAC it needs); the ingress gateway adds [`SECRETS`] in its namespace.
pub const WATCHED: &[WatchedKind] = &[
    WatchedKind { group: "", version: "v1", kind: "Namespace", plural: "namespaces", fallback: &[], feeds: "enrollment (dataplane-mode label), waypoint use" },
    WatchedKind { group: "", version: "v1", kind: "Pod", plural: "pods", fallback: &[], feeds: "workloads: enrollment, identities, Service endpoints" },
    WatchedKind { group: "", version: "v1", kind: "Service", plural: "services", fallback: &[], feeds: "ClusterIPs, ports, waypoint use" },
    WatchedKind { group: "", version: "v1", kind: "ServiceAccount", plural: "serviceaccounts", fallback: &[], feeds: "nothing yet (identities come from pods' serviceAccountName)" },
    WatchedKind { group: "discovery.k8s.io", version: "v1", kind: "EndpointSlice", plural: "endpointslices", fallback: &[], feeds: "nothing yet (endpoints come from pods and selectors)" },
    WatchedKind { group: "networking.istio.io", version: "v1", kind: "VirtualService", plural: "virtualservices", fallback: &["v1beta1", "v1alpha3"], feeds: "waypoint routing" },
    WatchedKind { group: "networking.istio.io", version: "v1", kind: "DestinationRule", plural: "destinationrules", fallback: &["v1beta1", "v1alpha3"], feeds: "waypoint subsets and traffic policy" },
    WatchedKind { group: "networking.istio.io", version: "v1", kind: "Gateway", plural: "gateways", fallback: &["v1beta1", "v1alpha3"], feeds: "ingress gateway servers" },
    WatchedKind { group: "networking.istio.io", version: "v1", kind: "ServiceEntry", plural: "serviceentries", fallback: &["v1beta1", "v1alpha3"], feeds: "egress: external destinations in the registry" },
    WatchedKind { group: "security.istio.io", version: "v1", kind: "AuthorizationPolicy", plural: "authorizationpolicies", fallback: &["v1beta1"], feeds: "L4 and L7 authorization" },
    WatchedKind { group: "security.istio.io", version: "v1", kind: "PeerAuthentication", plural: "peerauthentications", fallback: &["v1beta1"], feeds: "mTLS mode" },
];

/// Telemetry: watched by waypoints and gateways only (their tracing).
pub const TELEMETRY: WatchedKind =
    WatchedKind { group: "telemetry.istio.io", version: "v1", kind: "Telemetry", plural: "telemetries", fallback: &["v1alpha1"], feeds: "tracing of waypoints and gateways" };

impl WatchedKind {
    fn api_resource(&self) -> ApiResource {
        self.api_resource_at(self.version)
    }

    fn api_resource_at(&self, version: &str) -> ApiResource {
        let api_version = if self.group.is_empty() { version.to_owned() } else { format!("{}/{version}", self.group) };
        ApiResource {
            group: self.group.into(),
            version: version.into(),
            api_version,
            kind: self.kind.into(),
            plural: self.plural.into(),
        }
    }
}

/// The API version to read `wk` at: the first of its versions the server
/// serves (a one-object list; 404 means not served). With none served the
/// preferred one, which the watcher then reports as absent. A cluster that
/// serves an Istio kind only at an older version is read at that version:
/// its policies are never taken for "none".
async fn served_resource(client: &Client, wk: &WatchedKind) -> ApiResource {
    if wk.fallback.is_empty() {
        return wk.api_resource();
    }
    for version in std::iter::once(wk.version).chain(wk.fallback.iter().copied()) {
        let ar = wk.api_resource_at(version);
        let api = Api::<DynamicObject>::all_with(client.clone(), &ar);
        match api.list(&kube::api::ListParams::default().limit(1)).await {
            Err(kube::Error::Api(s)) if s.code == 404 => continue,
            _ => {
                if version != wk.version {
                    warn!(kind = wk.kind, group = wk.group, version, preferred = wk.version,
                        "the API server does not serve the preferred version; reading this kind at an older one");
                }
                return ar;
            }
        }
    }
    wk.api_resource()
}

/// Why the source could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    /// The `--kube-url` is not a URL.
    #[error("Kubernetes API URL {url:?} is not a valid URL")]
    Url {
        url: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    /// Neither in-cluster config nor a kubeconfig was found.
    #[error("no Kubernetes config: not in a cluster (KUBERNETES_SERVICE_HOST unset or token missing) and no usable kubeconfig")]
    Infer(#[source] kube::config::InferConfigError),
    /// The client could not be built from the config (TLS, auth).
    #[error("building the Kubernetes client")]
    Client(#[source] kube::Error),
    /// The runtime thread could not start.
    #[error("starting the Kubernetes source thread")]
    Thread(#[source] std::io::Error),
}

/// The Kubernetes API source. Dropping it stops its watches.
pub struct KubeSource {
    rx: std_mpsc::Receiver<Result<Arc<Snapshot>, SourceError>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl KubeSource {
    /// Connects (lazily: the first request happens on the source's thread)
    /// and starts watching.
    pub fn start(opts: KubeOptions) -> Result<KubeSource, KubeSourceError> {
        let (ready_tx, ready_rx) = std_mpsc::channel::<Result<(), KubeSourceError>>();
        let (out_tx, out_rx) = std_mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("kube-source".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(KubeSourceError::Thread(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    let client = match connect(opts.url.as_deref()).await {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    tokio::select! {
                        _ = run(client, opts, out_tx) => {}
                        _ = stop_rx => {}
                    }
                });
            })
            .map_err(KubeSourceError::Thread)?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(KubeSource { rx: out_rx, stop: Some(stop_tx), thread: Some(thread) }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(KubeSourceError::Thread(std::io::Error::other("the source thread ended before it started")))
            }
        }
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl ConfigSource for KubeSource {
    fn poll(&mut self, timeout: Duration) -> Result<Option<Arc<Snapshot>>, SourceError> {
        let first = match self.rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(std_mpsc::RecvTimeoutError::Timeout) => return Ok(None),
            Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                // The thread only ends when dropped; don't spin if it died.
                std::thread::sleep(timeout);
                return Ok(None);
            }
        };
        // Only the newest outcome matters.
        let mut last = first;
        while let Ok(r) = self.rx.try_recv() {
            last = r;
        }
        last.map(Some)
    }
}

/// A Kubernetes client for `url`, or from in-cluster config / kubeconfig.
pub async fn connect(url: Option<&str>) -> Result<Client, KubeSourceError> {
    let config = match url {
        Some(url) => {
            let uri: http::Uri = url.parse().map_err(|source| KubeSourceError::Url { url: url.to_owned(), source })?;
            kube::Config::new(uri)
        }
        None => kube::Config::infer().await.map_err(KubeSourceError::Infer)?,
    };
    Client::try_from(config).map_err(KubeSourceError::Client)
}

/// What a kind's watch task reports to the publisher.
#[derive(Debug)]
enum Update {
    /// The store changed (an object applied or deleted, or a relist swapped in).
    Changed,
    /// A relist started: the store keeps its old contents until it ends.
    Relisting,
    /// A (re)list completed.
    Listed,
    /// The kind's CRD is not installed (404 on list): empty.
    Absent,
}

async fn run(client: Client, opts: KubeOptions, out: std_mpsc::Sender<Result<Arc<Snapshot>, SourceError>>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Update)>();
    let mut stores: Vec<Store<DynamicObject>> = Vec::new();
    let kinds: Vec<(WatchedKind, Option<String>)> =
        WATCHED
            .iter()
            .map(|k| (*k, None))
            .chain(opts.secrets_namespace.clone().map(|ns| (SECRETS, Some(ns))))
            .chain(opts.config_maps_namespace.clone().map(|ns| (CONFIG_MAPS, Some(ns))))
            .chain(opts.telemetry.then_some((TELEMETRY, None)))
            .collect();
    for (i, (wk, namespace)) in kinds.iter().enumerate() {
        let ar = wk.api_resource();
        let writer = Writer::<DynamicObject>::new(ar.clone());
        stores.push(writer.as_reader());
        let mut cfg = watcher::Config::default();
        if wk.plural == "pods" {
            if let Some(node) = &opts.pods_on_node {
                cfg = cfg.fields(&format!("spec.nodeName={node}"));
            }
        }
        let tx = tx.clone();
        let (wk, namespace) = (*wk, namespace.clone());
        let client = client.clone();
        tokio::spawn(async move {
            let ar = served_resource(&client, &wk).await;
            let api = match &namespace {
                Some(ns) => Api::<DynamicObject>::namespaced_with(client.clone(), ns, &ar),
                None => Api::<DynamicObject>::all_with(client.clone(), &ar),
            };
            let stream = reflector::reflector(writer, watcher(api, cfg).default_backoff());
            futures::pin_mut!(stream);
            let mut listed = false;
            let mut absent_logged = false;
            while let Some(item) = stream.next().await {
                let update = match item {
                    Ok(watcher::Event::Init) => Update::Relisting,
                    Ok(watcher::Event::InitApply(_)) => continue,
                    Ok(watcher::Event::InitDone) => {
                        if !listed {
                            info!(kind = wk.kind, "initial list complete");
                        } else {
                            debug!(kind = wk.kind, "relist complete");
                        }
                        listed = true;
                        absent_logged = false;
                        Update::Listed
                    }
                    Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => Update::Changed,
                    Err(watcher::Error::InitialListFailed(kube::Error::Api(s))) if s.code == 404 => {
                        if !absent_logged {
                            warn!(kind = wk.kind, group = wk.group, versions = ?std::iter::once(wk.version).chain(wk.fallback.iter().copied()).collect::<Vec<_>>(),
                                "not served by the API server at any version Skiff reads (CRD not installed?): treated as empty; retrying in the background");
                            absent_logged = true;
                        }
                        Update::Absent
                    }
                    Err(watcher::Error::InitialListFailed(e)) => {
                        // Not yet listed: nothing is published until it is.
                        // 403 means the RBAC in deploy/ is missing a grant.
                        let hint = match &e {
                            kube::Error::Api(s) if s.code == 403 => " (forbidden: check the ClusterRole skiff-config-reader grants list/watch on it)",
                            kube::Error::Api(s) if s.code == 401 => " (unauthorized: check the service account token)",
                            _ => "",
                        };
                        warn!(kind = wk.kind, group = wk.group, error = %skiff_core::report(&e),
                            "initial list failed{hint}; nothing is published until every kind is listed; retrying");
                        continue;
                    }
                    Err(e) => {
                        // 410 Gone and dropped connections land here; the
                        // watcher resumes or relists by itself (with backoff).
                        warn!(kind = wk.kind, error = %skiff_core::report(&e), "watch interrupted; resuming");
                        continue;
                    }
                };
                if tx.send((i, update)).is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let kinds: Vec<WatchedKind> = kinds.into_iter().map(|(k, _)| k).collect();
    publish_loop(&opts, &kinds, &stores, &mut rx, &out).await;
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum KindState {
    Waiting,
    Ready,
    Relisting,
}

async fn publish_loop(
    opts: &KubeOptions,
    kinds: &[WatchedKind],
    stores: &[Store<DynamicObject>],
    rx: &mut mpsc::UnboundedReceiver<(usize, Update)>,
    out: &std_mpsc::Sender<Result<Arc<Snapshot>, SourceError>>,
) {
    use tokio::time::{sleep_until, Instant};
    let mut state = vec![KindState::Waiting; kinds.len()];
    let mut absent = vec![false; kinds.len()];
    let mut dirty_since: Option<Instant> = None;
    let mut last_change = Instant::now();
    let mut hold_since: Option<Instant> = None;
    let mut last: Option<Result<Arc<Snapshot>, String>> = None;
    loop {
        let all_listed = state.iter().all(|s| *s != KindState::Waiting);
        let relisting = state.contains(&KindState::Relisting);
        // When may we publish next?
        let due = match dirty_since {
            Some(first) if all_listed => {
                let at = (last_change + opts.debounce).min(first + opts.max_delay);
                Some(match (relisting, hold_since) {
                    (true, Some(h)) => at.max(h + opts.max_hold),
                    _ => at,
                })
            }
            _ => None,
        };
        let wait = async {
            match due {
                Some(at) => sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = rx.recv() => {
                let Some((i, update)) = msg else { return };
                match update {
                    Update::Relisting => {
                        if state[i] == KindState::Ready {
                            state[i] = KindState::Relisting;
                            hold_since.get_or_insert_with(Instant::now);
                        }
                        continue;
                    }
                    Update::Listed => {
                        state[i] = KindState::Ready;
                        absent[i] = false;
                        if !state.contains(&KindState::Relisting) {
                            hold_since = None;
                        }
                    }
                    Update::Absent => {
                        if state[i] == KindState::Waiting {
                            state[i] = KindState::Ready;
                            absent[i] = true;
                        } else {
                            continue;
                        }
                    }
                    Update::Changed => {}
                }
                last_change = Instant::now();
                dirty_since.get_or_insert(last_change);
            }
            _ = wait => {
                dirty_since = None;
                hold_since = None;
                let previous = match &last {
                    Some(Ok(s)) => Some(s.clone()),
                    _ => None,
                };
                let outcome = build(kinds, stores, previous.as_deref());
                let key = match &outcome {
                    Ok(s) => Ok(s.clone()),
                    Err(e) => Err(e.report()),
                };
                let same = match (&last, &key) {
                    (Some(Ok(a)), Ok(b)) => a == b,
                    (Some(Err(a)), Err(b)) => a == b,
                    _ => false,
                };
                if same {
                    continue;
                }
                last = Some(key);
                if out.send(outcome).is_err() {
                    return;
                }
            }
        }
    }
}

/// The snapshot of everything in the stores, validated like a manifests
/// directory, object by object (`previous`: the last published, whose
/// accepted objects stand in for refused ones).
fn build(kinds: &[WatchedKind], stores: &[Store<DynamicObject>], previous: Option<&Snapshot>) -> Result<Arc<Snapshot>, SourceError> {
    let mut objects: Vec<(String, Object)> = Vec::new();
    for (wk, store) in kinds.iter().zip(stores) {
        let mut items = store.state();
        // Stores are hash maps: sort so equal contents give equal snapshots.
        items.sort_by(|a, b| (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name)));
        for obj in items {
            let origin = match &obj.metadata.namespace {
                Some(ns) => format!("kube: {} {ns}/{}", wk.plural, obj.metadata.name.as_deref().unwrap_or("")),
                None => format!("kube: {} {}", wk.plural, obj.metadata.name.as_deref().unwrap_or("")),
            };
            let mut y = serde_json::to_value(&*obj).map_err(|e| SourceError::Object {
                origin: origin.clone(),
                source: k8s::ParseError::Field { index: 0, kind: wk.kind.to_owned(), name: String::new(), path: String::new(), source: e },
            })?;
            // List items come without apiVersion and kind.
            if let Some(m) = y.as_object_mut() {
                m.insert("apiVersion".into(), wk.api_resource().api_version.into());
                m.insert("kind".into(), wk.kind.into());
            }
            // An object that cannot be read at all (no kind) is refused on
            // its own; kinds are known here, so keep what identifies it.
            let parsed = k8s::parse_object(&y).unwrap_or_else(|e| {
                k8s::Object::Invalid(k8s::InvalidObject {
                    api_version: wk.api_resource().api_version,
                    kind: wk.kind.to_owned(),
                    namespace: obj.metadata.namespace.clone(),
                    name: obj.metadata.name.clone().unwrap_or_default(),
                    field: String::new(),
                    message: skiff_core::report(&e),
                    raw: y,
                })
            });
            objects.push((origin, parsed));
        }
    }
    Ok(Arc::new(Snapshot::build(objects, previous)))
}

/// Which config source a process was told to use.
#[derive(Clone, Debug)]
pub enum SourceChoice {
    /// A directory of manifests (`--manifests DIR`), and the namespace
    /// whose Secrets are read (the ingress gateway's; None for others).
    Manifests(std::path::PathBuf, Option<String>),
    /// The Kubernetes API (`--kube`, or `--kube-url URL`).
    Kube(KubeOptions),
}

/// The command line did not name exactly one config source.
#[derive(Debug, thiserror::Error)]
pub enum ChoiceError {
    /// None given.
    #[error("no config source: give --manifests DIR, --kube (in-cluster config or KUBECONFIG) or --kube-url URL")]
    None,
    /// More than one given.
    #[error("more than one config source ({0}): give exactly one of --manifests DIR, --kube, --kube-url URL")]
    Several(String),
}

/// The config-source flags of node-agent and ztunnel: exactly one of
/// `--manifests`, `--kube`, `--kube-url`.
#[derive(clap::Args, Clone, Debug)]
pub struct SourceArgs {
    /// Directory of Kubernetes manifests describing the cluster.
    #[arg(long)]
    pub manifests: Option<std::path::PathBuf>,
    /// Read the cluster from the Kubernetes API (in-cluster config, else
    /// KUBECONFIG).
    #[arg(long)]
    pub kube: bool,
    /// Read the cluster from the Kubernetes API at this URL (tests: a
    /// plain-http fake API server).
    #[arg(long, value_name = "URL")]
    pub kube_url: Option<String>,
}

impl SourceArgs {
    pub fn choice(&self) -> Result<SourceChoice, ChoiceError> {
        SourceChoice::from_args(self.manifests.clone(), self.kube, self.kube_url.clone())
    }
}

impl SourceChoice {
    /// From the three flags every node process has. `--kube` and
    /// `--kube-url` together are one choice (the URL wins over inference).
    pub fn from_args(manifests: Option<std::path::PathBuf>, kube: bool, kube_url: Option<String>) -> Result<SourceChoice, ChoiceError> {
        match (manifests, kube || kube_url.is_some()) {
            (Some(dir), false) => Ok(SourceChoice::Manifests(dir, None)),
            (None, true) => Ok(SourceChoice::Kube(KubeOptions { url: kube_url, ..Default::default() })),
            (None, false) => Err(ChoiceError::None),
            (Some(dir), true) => Err(ChoiceError::Several(format!(
                "--manifests {} and {}",
                dir.display(),
                kube_url.map_or("--kube".to_owned(), |u| format!("--kube-url {u}"))
            ))),
        }
    }

    /// Only this node's pods (node-agent). No effect on a manifests directory.
    pub fn pods_on_node(mut self, node: &str) -> SourceChoice {
        if let SourceChoice::Kube(o) = &mut self {
            o.pods_on_node = Some(node.to_owned());
        }
        self
    }

    /// Also read the Secrets of `namespace` (the ingress gateway, for its
    /// certificates). Every other process reads none.
    pub fn secrets_in(mut self, namespace: &str) -> SourceChoice {
        match &mut self {
            SourceChoice::Kube(o) => o.secrets_namespace = Some(namespace.to_owned()),
            SourceChoice::Manifests(_, ns) => *ns = Some(namespace.to_owned()),
        }
        self
    }

    /// Also read the ConfigMaps of `namespace` (ztunnel: Istio's mesh
    /// config in the root namespace). A manifests directory's are read as
    /// they are.
    pub fn mesh_config_in(mut self, namespace: &str) -> SourceChoice {
        if let SourceChoice::Kube(o) = &mut self {
            o.config_maps_namespace = Some(namespace.to_owned());
        }
        self
    }

    /// Also read Telemetry objects (waypoints and gateways). A manifests
    /// directory's are read as they are.
    pub fn telemetry(mut self) -> SourceChoice {
        if let SourceChoice::Kube(o) = &mut self {
            o.telemetry = true;
        }
        self
    }

    /// Opens the source.
    pub fn open(self) -> Result<Box<dyn ConfigSource>, KubeSourceError> {
        Ok(match self {
            SourceChoice::Manifests(dir, secrets) => Box::new(skiff_core::source::LocalDirSource::new(dir).with_secrets_in(secrets)),
            SourceChoice::Kube(o) => {
                info!(url = o.url.as_deref().unwrap_or("(in-cluster or kubeconfig)"), pods_on_node = ?o.pods_on_node, secrets_namespace = ?o.secrets_namespace, "reading the cluster from the Kubernetes API");
                Box::new(KubeSource::start(o)?)
            }
        })
    }
}
