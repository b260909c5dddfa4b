//! Reaching a proxy's local ports (admin 15000, metrics 15020, readiness
//! 15021, node-agent's 15022), wherever the mesh runs: in a local mesh,
//! 127.0.0.1:PORT inside the proxy's network namespace (root: entering a
//! namespace needs CAP_SYS_ADMIN); in a cluster, through the Kubernetes
//! API's pod port-forward (over WebSocket), as `kubectl port-forward` does,
//! so the admin ports stay on the pods' loopback.

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use skiff_core::model::Snapshot;

/// Where a proxy runs.
#[derive(Clone, Debug)]
pub enum Place {
    /// A local mesh's network namespace (its path).
    Netns(PathBuf),
    /// A cluster's pod.
    Pod { namespace: String, name: String },
}

impl Place {
    fn describe(&self) -> String {
        match self {
            Place::Netns(p) => p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned()),
            Place::Pod { namespace, name } => format!("pod {namespace}/{name}"),
        }
    }
}

/// The namespace Skiff is installed in (deploy/base/namespace.yaml).
pub const SYSTEM_NAMESPACE: &str = "skiff-system";
/// The label of the node DaemonSet's pods (node-agent and ztunnel).
const NODE_POD_LABEL: (&str, &str) = ("app.kubernetes.io/name", "skiff-node");

/// A mesh: a local one (its work directory) or a cluster (through the
/// Kubernetes API).
pub enum Mesh {
    Local(PathBuf),
    Kube(Cluster),
}

/// One node: its name, and where its node-agent and ztunnel are reached
/// (or why they cannot be).
pub struct NodeAt {
    pub name: String,
    pub place: Result<Place, String>,
}

impl Mesh {
    /// `--kube`/`--kube-url URL` for a cluster, else the local mesh at
    /// `mesh` or the one running.
    pub fn open(mesh: Option<&Path>, kube: bool, kube_url: Option<String>) -> Result<Mesh, String> {
        if kube || kube_url.is_some() {
            Ok(Mesh::Kube(Cluster::connect(kube_url)?))
        } else {
            crate::mesh::work_dir(mesh).map(Mesh::Local)
        }
    }

    /// The cluster now, as the mesh's processes read it.
    pub fn snapshot(&self) -> Result<Snapshot, String> {
        match self {
            Mesh::Local(work) => skiff_core::source::LocalDirSource::analyze(&work.join("cluster")).map_err(|e| e.report()),
            Mesh::Kube(c) => crate::from_kube(c.url.clone()),
        }
    }

    /// Every node the cluster's pods are scheduled on, each with where its
    /// node-agent and ztunnel are: a local node's network namespace (gone
    /// when the node is down), a cluster node's `skiff-node` pod (none, or
    /// not running, said so).
    pub fn nodes(&self, snap: &Snapshot) -> Result<Vec<NodeAt>, String> {
        match self {
            Mesh::Local(work) => Ok(crate::mesh::all_nodes(work)?
                .into_iter()
                .map(|n| {
                    let path = n.netns_path();
                    let place = if path.exists() { Ok(Place::Netns(path)) } else { Err(format!("its network namespace {} is gone", n.netns)) };
                    NodeAt { name: n.name, place }
                })
                .collect()),
            Mesh::Kube(_) => {
                let mut names: Vec<&String> = snap.workloads.values().filter(|w| !w.is_finished()).filter_map(|w| w.node.as_ref()).collect();
                names.sort();
                names.dedup();
                Ok(names
                    .into_iter()
                    .map(|node| {
                        let pods: Vec<_> = snap
                            .workloads
                            .values()
                            .filter(|w| w.namespace == SYSTEM_NAMESPACE && w.node.as_ref() == Some(node) && w.labels.get(NODE_POD_LABEL.0).is_some_and(|v| v == NODE_POD_LABEL.1))
                            .collect();
                        // During a rollout a node may have an old pod
                        // terminating beside a new one: the running one.
                        let place = match pods.iter().find(|w| w.phase.as_deref() == Some("Running")) {
                            Some(w) => Ok(Place::Pod { namespace: w.namespace.clone(), name: w.name.clone() }),
                            None => match pods.first() {
                                Some(w) => Err(format!("its skiff-node pod {SYSTEM_NAMESPACE}/{} is {}", w.name, w.phase.as_deref().unwrap_or("not running"))),
                                None => Err(format!("no skiff-node pod runs on it (pods with {}={} in {SYSTEM_NAMESPACE}): the DaemonSet is not scheduled there", NODE_POD_LABEL.0, NODE_POD_LABEL.1)),
                            },
                        };
                        NodeAt { name: node.clone(), place }
                    })
                    .collect())
            }
        }
    }

    /// The mesh's proxies: every reachable node's ztunnel (`ztunnel NODE`)
    /// when `ztunnels`, and every waypoint's and gateway's pod (`waypoint
    /// NS/POD`, `gateway NS/POD`).
    pub fn proxies(&self, snap: &Snapshot, ztunnels: bool) -> Result<Vec<(String, Place)>, String> {
        let mut out = Vec::new();
        if ztunnels {
            out.extend(self.nodes(snap)?.into_iter().filter_map(|n| n.place.ok().map(|p| (format!("ztunnel {}", n.name), p))));
        }
        for w in snap.workloads.values() {
            let place = match (self, &w.netns_path) {
                (Mesh::Local(_), Some(netns)) => Place::Netns(netns.clone()),
                (Mesh::Local(_), None) => continue,
                (Mesh::Kube(_), _) if w.phase.as_deref() == Some("Running") => Place::Pod { namespace: w.namespace.clone(), name: w.name.clone() },
                (Mesh::Kube(_), _) => continue,
            };
            let waypoint = w.labels.get(skiff_core::LABEL_GATEWAY_NAME).is_some_and(|g| *g == w.service_account);
            if waypoint || !snap.gateway_servers(w).is_empty() {
                out.push((format!("{} {}/{}", if waypoint { "waypoint" } else { "gateway" }, w.namespace, w.name), place));
            }
        }
        Ok(out)
    }

    /// A connection to `port` on the proxy's loopback. `patient`: a port-forward's first bytes are held back until the
    /// kubelet has had 0.5 s to report a failed connection. A kubelet
    /// closes the stream right after reporting one, and a client that is
    /// sending at that moment can lose the report; a patient retry reads it.
    pub fn connect(&self, place: &Place, port: u16, patient: bool) -> Result<Conn, String> {
        match (self, place) {
            (_, Place::Netns(netns)) => {
                let name = place.describe();
                let ns = skiff_core::netns::open(netns).map_err(|e| format!("netns {name}: {}", skiff_core::report(&e)))?;
                let s = skiff_core::netns::run_in(std::os::fd::AsFd::as_fd(&ns), || TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)))
                    .map_err(|e| format!("entering netns {name}: {} (run as root)", skiff_core::report(&e)))?
                    .map_err(|e| format!("127.0.0.1:{port} in {name}: {e}"))?;
                Ok(Conn::Tcp(s))
            }
            (Mesh::Kube(c), Place::Pod { namespace, name }) => c.forward(namespace, name, port, patient).map(Conn::Forwarded),
            (Mesh::Local(_), Place::Pod { .. }) => Err("a local mesh's proxies are reached in their network namespaces".into()),
        }
    }

    /// HTTP GET `path` from `port` on the proxy's loopback: the body of a
    /// 200.
    pub fn get(&self, place: &Place, port: u16, path: &str) -> Result<String, String> {
        let where_ = format!("127.0.0.1:{port} in {}", place.describe());
        let once = |patient: bool| -> Result<(u16, String), String> {
            let conn = self.connect(place, port, patient)?;
            conn.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
            skiff_core::http1::get_on(conn, &where_, "localhost", path).map_err(|e| format!("{where_}: {e}"))
        };
        let (status, body) = match once(false) {
            Err(first) if matches!(place, Place::Pod { .. }) => once(true).map_err(|again| if again == first { again } else { format!("{again} (first attempt: {first})") })?,
            r => r?,
        };
        if status != 200 {
            return Err(format!("{where_}{path}: status {status}: {}", body.lines().next().unwrap_or("")));
        }
        Ok(body)
    }
}

/// A connection to a proxy's port.
pub enum Conn {
    Tcp(TcpStream),
    Forwarded(Forwarded),
}

impl Conn {
    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(t),
            Conn::Forwarded(f) => f.stream.set_read_timeout(t),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Forwarded(f) => f.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Forwarded(f) => f.stream.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::Forwarded(f) => f.stream.flush(),
        }
    }
}

/// A port-forwarded connection: one end of a socket pair whose other end
/// a task copies to and from the port-forward's stream. The error the
/// kubelet reports on the port's error channel (nothing listens, the pod
/// is gone) is given at the end of the stream.
pub struct Forwarded {
    stream: UnixStream,
    error: Arc<Mutex<Option<String>>>,
    what: String,
}

impl Read for Forwarded {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.stream.read(buf)?;
        if n == 0 && !buf.is_empty() {
            if let Some(e) = self.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return Err(std::io::Error::other(format!("{}: {e}", self.what)));
            }
        }
        Ok(n)
    }
}

/// The Kubernetes API, for port-forwards.
pub struct Cluster {
    url: Option<String>,
    client: kube::Client,
    rt: tokio::runtime::Runtime,
}

impl Cluster {
    fn connect(url: Option<String>) -> Result<Cluster, String> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().map_err(|e| format!("a runtime: {e}"))?;
        let client = rt.block_on(skiff_kube_source::connect(url.as_deref())).map_err(|e| format!("the Kubernetes API: {}", skiff_core::report(&e)))?;
        Ok(Cluster { url, client, rt })
    }

    /// A connection to `port` on pod `namespace/name`'s loopback.
    fn forward(&self, namespace: &str, name: &str, port: u16, patient: bool) -> Result<Forwarded, String> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let what = format!("port-forward to {namespace}/{name}:{port}");
        let api: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(self.client.clone(), namespace);
        let mut pf = self
            .rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), api.portforward(name, &[port])).await })
            .map_err(|_| format!("{what}: the API server did not answer within 10 s"))?
            .map_err(|e| format!("{what}: {}", skiff_core::report(&e)))?;
        let remote = pf.take_stream(port).ok_or_else(|| format!("{what}: no stream"))?;
        let mut errors = pf.take_error(port).map(Box::pin);
        let (mine, theirs) = UnixStream::pair().map_err(|e| e.to_string())?;
        theirs.set_nonblocking(true).map_err(|e| e.to_string())?;
        let _guard = self.rt.enter();
        let theirs = tokio::net::UnixStream::from_std(theirs).map_err(|e| e.to_string())?;
        let error = Arc::new(Mutex::new(None));
        let slot = error.clone();
        self.rt.spawn(async move {
            if patient {
                if let Some(e) = errors.as_mut() {
                    if let Ok(msg) = tokio::time::timeout(Duration::from_millis(500), e).await {
                        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg.unwrap_or_else(|| "the port-forward ended".into()));
                        errors = None;
                    }
                }
            }
            let (mut rr, mut rw) = tokio::io::split(remote);
            let (mut tr, mut tw) = theirs.into_split();
            let up = async move {
                let _ = tokio::io::copy(&mut tr, &mut rw).await;
                let _ = rw.shutdown().await;
            };
            let down = async move {
                let mut buf = vec![0u8; 32 * 1024];
                loop {
                    match rr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if tw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                // The error channel's message, if any, before the reader
                // sees the end. kube-rs hands the error frame on before
                // the end of the data (one ordered channel), so it is there
                // now or never: polled once, not waited for (the error
                // future resolves otherwise only when the whole
                // port-forward ends, which waits on this reader).
                if let Some(e) = errors {
                    if let Ok(Some(msg)) = tokio::time::timeout(Duration::ZERO, e).await {
                        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg);
                    }
                }
                let _ = tw.shutdown().await;
            };
            tokio::join!(up, down);
            // Both ways are done: the WebSocket's task is ended rather than
            // left waiting on a server that may never complete the close.
            pf.abort();
            let _ = pf.join().await;
        });
        Ok(Forwarded { stream: mine, error, what: "port-forward".into() })
    }
}
