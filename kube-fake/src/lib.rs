//! A fake Kubernetes API server for tests, speaking plain HTTP on a socket
//! the test chooses (loopback, or a listener made inside a test netns).
//!
//! It behaves like the real server where Skiff's clients can tell the
//! difference: list and `?watch=true` per resource with a monotonic global
//! `resourceVersion` (per object and per list), field and label selectors,
//! watch replay from a resource version, `BOOKMARK` events when asked for,
//! `410 Gone` for a resource version older than the last compaction (an
//! HTTP 410 on an exact list, an `ERROR` event with a Status in a watch),
//! `timeoutSeconds`, list items without `kind`/`apiVersion` and watch
//! objects with them, `404` for a kind whose CRD is absent, single-object
//! `GET`, `POST tokenreviews` answered from tokens the test registered, and
//! `pods/NAME/portforward` over WebSocket (the `v4.channel.k8s.io` channel
//! protocol kubectl and kube-rs speak) to a connection the test makes.
//!
//! A test drives it with [`FakeApiServer::apply`], [`FakeApiServer::delete`],
//! [`FakeApiServer::drop_watches`], [`FakeApiServer::compact`] and
//! [`FakeApiServer::set_absent`], and reads back every request as an RBAC
//! verb with [`FakeApiServer::requests`].

use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
    thread::JoinHandle,
    time::Duration,
};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt as _;
use hyper::{body::Incoming, service::service_fn, Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};

/// A resource the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kind {
    /// API group; `""` for core.
    pub group: &'static str,
    /// The version objects are stored and served at by default.
    pub version: &'static str,
    /// Plural resource name, as in URLs and RBAC rules.
    pub resource: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
}

impl Kind {
    fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_owned()
        } else {
            format!("{}/{}", self.group, version)
        }
    }
}

/// Every kind the fake knows.
pub const KINDS: &[Kind] = &[
    Kind { group: "", version: "v1", resource: "namespaces", kind: "Namespace", namespaced: false },
    Kind { group: "", version: "v1", resource: "pods", kind: "Pod", namespaced: true },
    Kind { group: "", version: "v1", resource: "services", kind: "Service", namespaced: true },
    Kind { group: "", version: "v1", resource: "serviceaccounts", kind: "ServiceAccount", namespaced: true },
    Kind { group: "", version: "v1", resource: "secrets", kind: "Secret", namespaced: true },
    Kind { group: "", version: "v1", resource: "configmaps", kind: "ConfigMap", namespaced: true },
    Kind { group: "discovery.k8s.io", version: "v1", resource: "endpointslices", kind: "EndpointSlice", namespaced: true },
    Kind { group: "networking.istio.io", version: "v1", resource: "virtualservices", kind: "VirtualService", namespaced: true },
    Kind { group: "networking.istio.io", version: "v1", resource: "destinationrules", kind: "DestinationRule", namespaced: true },
    Kind { group: "networking.istio.io", version: "v1", resource: "gateways", kind: "Gateway", namespaced: true },
    Kind { group: "networking.istio.io", version: "v1", resource: "serviceentries", kind: "ServiceEntry", namespaced: true },
    Kind { group: "security.istio.io", version: "v1", resource: "authorizationpolicies", kind: "AuthorizationPolicy", namespaced: true },
    Kind { group: "security.istio.io", version: "v1", resource: "peerauthentications", kind: "PeerAuthentication", namespaced: true },
    Kind { group: "telemetry.istio.io", version: "v1", resource: "telemetries", kind: "Telemetry", namespaced: true },
];

/// The kind with this `kind` name (`Pod`) or plural resource (`pods`).
pub fn kind(name: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.kind == name || k.resource == name)
}

/// One request the fake received, as Kubernetes RBAC sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ApiRequest {
    /// `list`, `watch`, `get` or `create`.
    pub verb: String,
    /// API group, `""` for core.
    pub group: String,
    /// Plural resource.
    pub resource: String,
    /// The namespace in the URL, if any.
    pub namespace: Option<String>,
}

/// What a registered token authenticates as (a TokenReview's `status.user`).
#[derive(Clone, Debug, Default)]
pub struct TokenIdentity {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
    /// Audiences the token was issued for; empty means the API server's own.
    pub audiences: Vec<String>,
}

impl TokenIdentity {
    /// A service account token, as the real server reports it.
    pub fn service_account(namespace: &str, name: &str) -> TokenIdentity {
        TokenIdentity {
            username: format!("system:serviceaccount:{namespace}:{name}"),
            uid: format!("uid-sa-{namespace}-{name}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ],
            ..Default::default()
        }
    }

    /// A projected token bound to a pod on a node: the `extra` keys the
    /// real server sets (`authentication.kubernetes.io/pod-name`, `pod-uid`,
    /// `node-name`, `node-uid`, `credential-id`).
    pub fn bound_to_pod(mut self, pod_name: &str, pod_uid: &str, node_name: &str) -> TokenIdentity {
        let mut put = |k: &str, v: String| {
            self.extra.insert(format!("authentication.kubernetes.io/{k}"), vec![v]);
        };
        put("pod-name", pod_name.to_owned());
        put("pod-uid", pod_uid.to_owned());
        put("node-name", node_name.to_owned());
        put("node-uid", format!("uid-node-{node_name}"));
        put("credential-id", format!("JTI=jti-{pod_uid}"));
        self
    }

    /// Restricts the token to these audiences.
    pub fn with_audiences(mut self, audiences: &[&str]) -> TokenIdentity {
        self.audiences = audiences.iter().map(|a| a.to_string()).collect();
        self
    }
}

/// What the test asked of the fake and it could not do.
#[derive(Debug, thiserror::Error)]
pub enum FakeError {
    /// The object has no `apiVersion`/`kind` the fake serves.
    #[error("object with apiVersion {api_version:?} kind {kind:?}: not a kind the fake API server serves")]
    UnknownKind { api_version: String, kind: String },
    /// The object has no `metadata.name`.
    #[error("{kind} object without metadata.name")]
    NoName { kind: String },
    /// No such object to delete.
    #[error("{kind} {namespace}/{name} not found")]
    NotFound { kind: String, namespace: String, name: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

struct HistoryEvent {
    rv: u64,
    kind: &'static Kind,
    etype: EventType,
    old: Option<Value>,
    new: Value,
}

type Key = (&'static str, String, String); // (resource, namespace, name)

/// See [`FakeApiServer::set_port_forward`].
type PortForward = Arc<dyn Fn(&Value, u16) -> io::Result<std::net::TcpStream> + Send + Sync>;

struct State {
    rv: u64,
    /// Watches (and exact lists) from a resource version below this get 410.
    compacted: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<HistoryEvent>,
    absent: BTreeSet<&'static str>,
    /// Kinds served at these versions only (others: 404); kinds not here
    /// are served at any version.
    served: BTreeMap<&'static str, Vec<String>>,
    failing: BTreeSet<&'static str>,
    requests: Vec<ApiRequest>,
    tokens: BTreeMap<String, TokenIdentity>,
    port_forward: Option<PortForward>,
    bookmark_interval: Duration,
    active_watches: usize,
    next_uid: u64,
}

struct Shared {
    state: Mutex<State>,
    /// Bumped on every write: watches wake up and look at the history.
    wake: watch::Sender<u64>,
    /// Bumped by `drop_watches`: every open watch is cut off.
    drops: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A test thread that panicked while holding the lock leaves a state
        // that is still consistent (every write is one step).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The fake server; stops when dropped.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeApiServer {
    /// Serves on 127.0.0.1 at an ephemeral port.
    pub fn start() -> io::Result<FakeApiServer> {
        FakeApiServer::start_on(std::net::TcpListener::bind("127.0.0.1:0")?)
    }

    /// Serves on `listener` (which may have been made inside a test's
    /// network namespace) from a thread of its own.
    pub fn start_on(listener: std::net::TcpListener) -> io::Result<FakeApiServer> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1,
                compacted: 0,
                objects: BTreeMap::new(),
                history: Vec::new(),
                absent: BTreeSet::new(),
                served: BTreeMap::new(),
                failing: BTreeSet::new(),
                requests: Vec::new(),
                tokens: BTreeMap::new(),
                port_forward: None,
                bookmark_interval: Duration::from_secs(1),
                active_watches: 0,
                next_uid: 1,
            }),
            wake: watch::channel(0).0,
            drops: watch::channel(0).0,
        });
        let (stop_tx, stop_rx) = oneshot::channel();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let sh = shared.clone();
        let thread = std::thread::Builder::new().name("kube-fake".into()).spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "fake API server: cannot use the listener");
                        return;
                    }
                };
                tokio::select! {
                    _ = accept_loop(listener, sh) => {}
                    _ = stop_rx => {}
                }
            });
        })?;
        Ok(FakeApiServer { shared, addr, stop: Some(stop_tx), thread: Some(thread) })
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Creates or replaces an object (like `kubectl apply` of the whole
    /// object). Returns its new resource version; an object equal to the
    /// stored one is left alone (no event), as the real server does.
    pub fn apply(&self, obj: Value) -> Result<u64, FakeError> {
        let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or_default().to_owned();
        let kind_name = obj.get("kind").and_then(Value::as_str).unwrap_or_default().to_owned();
        let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        let Some(k) = KINDS.iter().find(|k| k.kind == kind_name && k.group == group) else {
            return Err(FakeError::UnknownKind { api_version, kind: kind_name });
        };
        let Some(name) = obj.pointer("/metadata/name").and_then(Value::as_str).map(str::to_owned) else {
            return Err(FakeError::NoName { kind: kind_name });
        };
        let namespace = if k.namespaced {
            obj.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("default").to_owned()
        } else {
            String::new()
        };
        let mut obj = obj;
        let mut st = self.shared.lock();
        let key = (k.resource, namespace.clone(), name);
        let old = st.objects.get(&key).cloned();
        {
            let meta = obj.as_object_mut().expect("checked above: has metadata").entry("metadata").or_insert_with(|| json!({}));
            if k.namespaced {
                meta["namespace"] = json!(namespace);
            }
            if meta.get("uid").is_none() {
                let uid = match old.as_ref().and_then(|o| o.pointer("/metadata/uid")) {
                    Some(u) => u.clone(),
                    None => {
                        st.next_uid += 1;
                        json!(format!("fake-uid-{}", st.next_uid))
                    }
                };
                meta["uid"] = uid;
            }
        }
        if let Some(o) = &old {
            let mut a = o.clone();
            let mut b = obj.clone();
            strip_server_fields(&mut a);
            strip_server_fields(&mut b);
            if a == b {
                return Ok(rv_of(o));
            }
        }
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        obj["apiVersion"] = json!(k.api_version(k.version));
        st.objects.insert(key, obj.clone());
        let etype = if old.is_some() { EventType::Modified } else { EventType::Added };
        st.history.push(HistoryEvent { rv, kind: k, etype, old, new: obj });
        drop(st);
        self.shared.wake.send_replace(rv);
        Ok(rv)
    }

    /// Deletes an object (`kind` is `Pod` or `pods`; `namespace` is ignored
    /// for cluster-scoped kinds).
    pub fn delete(&self, kind_name: &str, namespace: &str, name: &str) -> Result<u64, FakeError> {
        let Some(k) = kind(kind_name) else {
            return Err(FakeError::UnknownKind { api_version: String::new(), kind: kind_name.to_owned() });
        };
        let ns = if k.namespaced { namespace.to_owned() } else { String::new() };
        let mut st = self.shared.lock();
        let Some(mut obj) = st.objects.remove(&(k.resource, ns, name.to_owned())) else {
            return Err(FakeError::NotFound { kind: k.kind.into(), namespace: namespace.into(), name: name.into() });
        };
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.history.push(HistoryEvent { rv, kind: k, etype: EventType::Deleted, old: None, new: obj });
        drop(st);
        self.shared.wake.send_replace(rv);
        Ok(rv)
    }

    /// Makes the cluster hold exactly `objects` for every kind they (and
    /// `kinds`) cover: applies each, deletes the others of those kinds.
    pub fn sync(&self, kinds: &[&str], objects: &[Value]) -> Result<(), FakeError> {
        let mut keep = BTreeSet::new();
        for o in objects {
            self.apply(o.clone())?;
            let k = kind(o["kind"].as_str().unwrap_or_default()).expect("apply checked the kind");
            let ns = if k.namespaced { o.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("default") } else { "" };
            keep.insert((k.resource, ns.to_owned(), o["metadata"]["name"].as_str().unwrap_or_default().to_owned()));
        }
        let resources: BTreeSet<&str> = kinds.iter().filter_map(|n| kind(n)).map(|k| k.resource).collect();
        let stale: Vec<Key> = self.shared.lock().objects.keys().filter(|key| resources.contains(key.0) && !keep.contains(*key)).cloned().collect();
        for (resource, ns, name) in stale {
            self.delete(resource, &ns, &name)?;
        }
        Ok(())
    }

    /// The stored object, if any.
    pub fn get(&self, kind_name: &str, namespace: &str, name: &str) -> Option<Value> {
        let k = kind(kind_name)?;
        let ns = if k.namespaced { namespace.to_owned() } else { String::new() };
        self.shared.lock().objects.get(&(k.resource, ns, name.to_owned())).cloned()
    }

    /// Cuts every open watch connection mid-stream (no terminating chunk),
    /// as a load balancer or an API server restart would.
    pub fn drop_watches(&self) {
        self.shared.drops.send_modify(|g| *g += 1);
    }

    /// Compacts history: any watch from a resource version seen so far gets
    /// `410 Gone` (as does an exact list). Open watches keep streaming.
    pub fn compact(&self) {
        let mut st = self.shared.lock();
        // A new revision, as etcd's compaction is one: clients can only hold
        // older ones, so each of them is now too old.
        st.rv += 1;
        st.compacted = st.rv;
        let rv = st.rv;
        drop(st);
        self.shared.wake.send_replace(rv);
    }

    /// Compacts and drops every watch at once: the clients must relist.
    pub fn force_relist(&self) {
        self.compact();
        self.drop_watches();
    }

    /// Makes a kind answer 404 (its CRD is not installed), or serve again.
    pub fn set_absent(&self, kind_name: &str, absent: bool) {
        let k = kind(kind_name).unwrap_or_else(|| panic!("unknown kind {kind_name}"));
        let mut st = self.shared.lock();
        if absent {
            st.absent.insert(k.resource);
        } else {
            st.absent.remove(k.resource);
        }
    }

    /// Serves a kind at these API versions only (as a cluster whose CRD
    /// serves, say, only `v1beta1`); any other version answers 404.
    pub fn set_served_versions(&self, kind_name: &str, versions: &[&str]) {
        let k = kind(kind_name).unwrap_or_else(|| panic!("unknown kind {kind_name}"));
        self.shared.lock().served.insert(k.resource, versions.iter().map(|v| v.to_string()).collect());
    }

    /// Makes a kind answer 500 to list and watch (an API server that
    /// cannot serve it right now), or serve again.
    pub fn set_failing(&self, kind_name: &str, failing: bool) {
        let k = kind(kind_name).unwrap_or_else(|| panic!("unknown kind {kind_name}"));
        let mut st = self.shared.lock();
        if failing {
            st.failing.insert(k.resource);
        } else {
            st.failing.remove(k.resource);
        }
    }

    /// How often watches that allow them get a BOOKMARK (default 1 s).
    pub fn set_bookmark_interval(&self, every: Duration) {
        self.shared.lock().bookmark_interval = every;
    }

    /// Registers a bearer token for TokenReview.
    pub fn add_token(&self, token: &str, identity: TokenIdentity) {
        self.shared.lock().tokens.insert(token.to_owned(), identity);
    }

    /// Where `pods/NAME/portforward` connects: `connect(pod, port)` (the
    /// stored Pod object) makes the connection the forwarded bytes go over,
    /// as the kubelet connects to the port inside the pod's network
    /// namespace. Without one, a port-forward is refused with 503.
    pub fn set_port_forward(&self, connect: impl Fn(&Value, u16) -> io::Result<std::net::TcpStream> + Send + Sync + 'static) {
        self.shared.lock().port_forward = Some(Arc::new(connect));
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<ApiRequest> {
        self.shared.lock().requests.clone()
    }

    /// Watches currently streaming.
    pub fn active_watches(&self) -> usize {
        self.shared.lock().active_watches
    }

    /// The current global resource version.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn rv_of(o: &Value) -> u64 {
    o.pointer("/metadata/resourceVersion").and_then(Value::as_str).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn strip_server_fields(o: &mut Value) {
    if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    if let Some(m) = o.as_object_mut() {
        m.remove("apiVersion");
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "fake API server: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let sh = shared.clone();
        // The fake checks no credentials: its port-forward (a way into any
        // pod's loopback) is served only to clients on its own host (the
        // test, the CLI beside it), never to pods that reach it over the
        // network.
        let local = stream.local_addr().is_ok_and(|l| l.ip() == peer.ip()) || peer.ip().is_loopback();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let sh = sh.clone();
                async move { Ok::<_, Infallible>(handle(sh, req, local).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .with_upgrades()
                .await;
        });
    }
}

/// A response body fed from a channel; an `Err` item aborts the connection.
struct ChannelBody(mpsc::Receiver<Result<Bytes, io::Error>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

type Body = http_body_util::Either<http_body_util::Full<Bytes>, ChannelBody>;

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(http_body_util::Either::Left(http_body_util::Full::new(Bytes::from(v.to_string()))))
        .expect("static response parts")
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(code, &status_object(code.as_u16(), reason, message))
}

/// A request URL, taken apart.
struct Target {
    group: String,
    version: String,
    namespace: Option<String>,
    resource: String,
    name: Option<String>,
    /// `portforward` in `pods/NAME/portforward`.
    subresource: Option<String>,
    query: BTreeMap<String, String>,
}

fn parse_target(path: &str, query: Option<&str>) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (String::new(), v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (g.to_string(), v.to_string(), rest),
        _ => return None,
    };
    let (namespace, resource, name, subresource) = match rest {
        ["namespaces", ns, r] => (Some(ns.to_string()), r.to_string(), None, None),
        ["namespaces", ns, r, n] => (Some(ns.to_string()), r.to_string(), Some(n.to_string()), None),
        ["namespaces", ns, r, n, sub] => (Some(ns.to_string()), r.to_string(), Some(n.to_string()), Some(sub.to_string())),
        [r] => (None, r.to_string(), None, None),
        [r, n] => (None, r.to_string(), Some(n.to_string()), None),
        _ => return None,
    };
    let mut q = BTreeMap::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        q.insert(percent_decode(k), percent_decode(v));
    }
    Some(Target { group, version, namespace, resource, name, subresource, query: q })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>, local_client: bool) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let Some(t) = parse_target(&path, query.as_deref()) else {
        return status(StatusCode::NOT_FOUND, "NotFound", "the server could not find the requested resource");
    };
    if req.method() == Method::POST && t.group == "authentication.k8s.io" && t.resource == "tokenreviews" {
        record(&shared, "create", &t);
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &format!("reading the body: {e}")),
        };
        return token_review(&shared, &body);
    }
    if let Some(sub) = &t.subresource {
        if t.group.is_empty() && t.resource == "pods" && sub == "portforward" {
            if !local_client {
                record(&shared, "create", &t);
                return status(StatusCode::FORBIDDEN, "Forbidden", "pods/portforward: the fake API server serves port-forward only to clients on its own host");
            }
            return port_forward(&shared, req, &t);
        }
        return status(StatusCode::NOT_FOUND, "NotFound", "the server could not find the requested resource");
    }
    if req.method() != Method::GET {
        return status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "the fake API server serves GET and TokenReview only");
    }
    let Some(k) = KINDS.iter().find(|k| k.group == t.group && k.resource == t.resource) else {
        return status(StatusCode::NOT_FOUND, "NotFound", "the server could not find the requested resource");
    };
    let watching = matches!(t.query.get("watch").map(String::as_str), Some("true" | "1"));
    let verb = match (&t.name, watching) {
        (Some(_), _) => "get",
        (None, true) => "watch",
        (None, false) => "list",
    };
    record(&shared, verb, &t);
    let unserved = shared.lock().served.get(k.resource).is_some_and(|v| !v.contains(&t.version));
    if unserved || shared.lock().absent.contains(k.resource) {
        return status(StatusCode::NOT_FOUND, "NotFound", "the server could not find the requested resource");
    }
    if shared.lock().failing.contains(k.resource) {
        return status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", "the test made this kind fail");
    }
    if let Some(name) = &t.name {
        let ns = if k.namespaced { t.namespace.clone().unwrap_or_default() } else { String::new() };
        return match shared.lock().objects.get(&(k.resource, ns, name.clone())) {
            Some(o) => {
                let mut o = o.clone();
                o["apiVersion"] = json!(k.api_version(&t.version));
                o["kind"] = json!(k.kind);
                json_response(StatusCode::OK, &o)
            }
            None => status(StatusCode::NOT_FOUND, "NotFound", &format!("{} \"{name}\" not found", k.resource)),
        };
    }
    let filter = match Filter::new(k, &t) {
        Ok(f) => f,
        Err(msg) => return status(StatusCode::BAD_REQUEST, "BadRequest", &msg),
    };
    let rv = t.query.get("resourceVersion").filter(|s| !s.is_empty() && *s != "0");
    let rv = match rv.map(|s| s.parse::<u64>()) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(_)) => return status(StatusCode::BAD_REQUEST, "BadRequest", "resourceVersion: invalid value"),
    };
    if watching {
        let bookmarks = matches!(t.query.get("allowWatchBookmarks").map(String::as_str), Some("true" | "1"));
        let timeout = t.query.get("timeoutSeconds").and_then(|s| s.parse::<u64>().ok()).map(Duration::from_secs);
        return start_watch(shared, k, t.version.clone(), filter, rv, bookmarks, timeout);
    }
    let st = shared.lock();
    let exact = t.query.get("resourceVersionMatch").map(String::as_str) == Some("Exact");
    if let (Some(v), true) = (rv, exact) {
        if v < st.compacted {
            return status(StatusCode::GONE, "Expired", &format!("too old resource version: {v} ({})", st.compacted));
        }
    }
    let items: Vec<Value> = st
        .objects
        .iter()
        .filter(|((r, _, _), o)| *r == k.resource && filter.matches(o))
        .map(|(_, o)| {
            let mut o = o.clone();
            if let Some(m) = o.as_object_mut() {
                // List items carry neither, as from the real server.
                m.remove("apiVersion");
                m.remove("kind");
            }
            o
        })
        .collect();
    let list = json!({
        "kind": format!("{}List", k.kind),
        "apiVersion": k.api_version(&t.version),
        "metadata": {"resourceVersion": st.rv.to_string()},
        "items": items,
    });
    json_response(StatusCode::OK, &list)
}

fn record(shared: &Shared, verb: &str, t: &Target) {
    shared.lock().requests.push(ApiRequest {
        verb: verb.into(),
        group: t.group.clone(),
        resource: match &t.subresource {
            Some(sub) => format!("{}/{sub}", t.resource),
            None => t.resource.clone(),
        },
        namespace: t.namespace.clone(),
    });
}

/// The channel protocol of exec, attach and port-forward over WebSocket.
const CHANNEL_PROTOCOL: &str = "v4.channel.k8s.io";

/// `GET pods/NAME/portforward?ports=P` upgraded to a WebSocket, as the
/// real server and kubelet serve it: per port a data channel (0) and an
/// error channel (1), each opened by a frame holding the port (u16, little
/// endian); then every binary frame is a channel byte and data. A
/// connection the test's connector cannot make is reported on the error
/// channel; the pod side's end of stream closes the WebSocket. One port per
/// request here.
fn port_forward(shared: &Arc<Shared>, mut req: Request<Incoming>, t: &Target) -> Response<Body> {
    // RBAC: a WebSocket port-forward needs `create` on pods/portforward
    // (as a SPDY one does).
    record(shared, "create", t);
    let ns = t.namespace.clone().unwrap_or_default();
    let pod = t.name.clone().unwrap_or_default();
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    if req.method() != Method::GET || !header("upgrade").eq_ignore_ascii_case("websocket") {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "the fake API server forwards ports over WebSocket only (GET with Upgrade: websocket)");
    }
    let key = header("sec-websocket-key");
    if key.is_empty() {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "Sec-WebSocket-Key: Required value");
    }
    if !header("sec-websocket-protocol").split(',').any(|p| p.trim() == CHANNEL_PROTOCOL) {
        return status(StatusCode::BAD_REQUEST, "BadRequest", &format!("Sec-WebSocket-Protocol: the fake speaks {CHANNEL_PROTOCOL} only"));
    }
    let port = match t.query.get("ports").map(|p| p.parse::<u16>()) {
        Some(Ok(p)) if p > 0 => p,
        _ => return status(StatusCode::BAD_REQUEST, "BadRequest", "ports: one port number is required (the fake forwards one port per request)"),
    };
    let (connect, object) = {
        let st = shared.lock();
        let Some(object) = st.objects.get(&("pods", ns, pod.clone())).cloned() else {
            return status(StatusCode::NOT_FOUND, "NotFound", &format!("pods \"{pod}\" not found"));
        };
        match &st.port_forward {
            Some(c) => (c.clone(), object),
            None => return status(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", "the test registered no port-forward target"),
        }
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        use futures_util::{SinkExt as _, StreamExt as _};
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        use tokio_tungstenite::tungstenite::{protocol::Role, Message};
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(hyper_util::rt::TokioIo::new(upgraded), Role::Server, None).await;
        let [lo, hi] = port.to_le_bytes();
        if ws.send(Message::binary(vec![0, lo, hi])).await.is_err() || ws.send(Message::binary(vec![1, lo, hi])).await.is_err() {
            return;
        }
        let made = tokio::task::spawn_blocking(move || connect(&object, port).and_then(|s| {
            s.set_nonblocking(true)?;
            tokio::net::TcpStream::from_std(s)
        }))
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
        let mut conn = match made {
            Ok(c) => c,
            Err(e) => {
                let mut msg = vec![1];
                msg.extend_from_slice(format!("error forwarding port {port} to pod: {e}").as_bytes());
                let _ = ws.send(Message::binary(msg)).await;
                let _ = ws.close(None).await;
                return;
            }
        };
        let mut buf = vec![0u8; 32 * 1024];
        let mut to_pod_open = true;
        loop {
            tokio::select! {
                m = ws.next(), if to_pod_open => match m {
                    Some(Ok(Message::Binary(b))) if b.first() == Some(&0) => {
                        if conn.write_all(&b[1..]).await.is_err() {
                            break;
                        }
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                        let _ = conn.shutdown().await;
                        to_pod_open = false;
                    }
                    Some(Ok(_)) => {}
                },
                n = conn.read(&mut buf) => match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut msg = Vec::with_capacity(n + 1);
                        msg.push(0);
                        msg.extend_from_slice(&buf[..n]);
                        if ws.send(Message::binary(msg)).await.is_err() {
                            return;
                        }
                    }
                },
            }
        }
        let _ = ws.close(None).await;
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("upgrade", "websocket")
        .header("connection", "Upgrade")
        .header("sec-websocket-accept", tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()))
        .header("sec-websocket-protocol", CHANNEL_PROTOCOL)
        .body(http_body_util::Either::Left(http_body_util::Full::new(Bytes::new())))
        .expect("static response parts")
}

fn token_review(shared: &Shared, body: &[u8]) -> Response<Body> {
    let req: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &format!("TokenReview is not JSON: {e}")),
    };
    let Some(token) = req.pointer("/spec/token").and_then(Value::as_str) else {
        return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", "TokenReview.spec.token: Required value");
    };
    let wanted: Vec<String> = req
        .pointer("/spec/audiences")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    let identity = shared.lock().tokens.get(token).cloned();
    let status_v = match identity {
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
        Some(id) => {
            let token_aud = if id.audiences.is_empty() { vec!["https://kubernetes.default.svc".to_owned()] } else { id.audiences.clone() };
            let granted: Vec<String> = if wanted.is_empty() {
                token_aud.clone()
            } else {
                wanted.iter().filter(|a| token_aud.contains(a)).cloned().collect()
            };
            if granted.is_empty() {
                json!({"authenticated": false, "error": "token audiences are invalid for the target audiences"})
            } else {
                json!({
                    "authenticated": true,
                    "user": {"username": id.username, "uid": id.uid, "groups": id.groups, "extra": id.extra},
                    "audiences": granted,
                })
            }
        }
    };
    let mut out = req.clone();
    out["apiVersion"] = json!("authentication.k8s.io/v1");
    out["kind"] = json!("TokenReview");
    out["status"] = status_v;
    json_response(StatusCode::CREATED, &out)
}

/// Field and label selectors plus the URL's namespace.
struct Filter {
    namespace: Option<String>,
    fields: Vec<(String, bool, String)>,
    labels: Vec<LabelReq>,
}

enum LabelReq {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl Filter {
    fn new(k: &Kind, t: &Target) -> Result<Filter, String> {
        let mut fields = Vec::new();
        for term in t.query.get("fieldSelector").map(String::as_str).unwrap_or("").split(',').filter(|s| !s.is_empty()) {
            let (key, eq, val) = if let Some((a, b)) = term.split_once("!=") {
                (a, false, b)
            } else if let Some((a, b)) = term.split_once("==") {
                (a, true, b)
            } else if let Some((a, b)) = term.split_once('=') {
                (a, true, b)
            } else {
                return Err(format!("invalid field selector term {term:?}"));
            };
            let supported = matches!(key, "metadata.name" | "metadata.namespace")
                || (k.resource == "pods" && matches!(key, "spec.nodeName" | "status.phase" | "spec.serviceAccountName"));
            if !supported {
                return Err(format!("\"{key}\" is not a known field selector: only \"metadata.name\", \"metadata.namespace\""));
            }
            fields.push((key.to_owned(), eq, val.to_owned()));
        }
        let labels = parse_label_selector(t.query.get("labelSelector").map(String::as_str).unwrap_or(""))?;
        Ok(Filter { namespace: t.namespace.clone().filter(|_| k.namespaced), fields, labels })
    }

    fn matches(&self, o: &Value) -> bool {
        if let Some(ns) = &self.namespace {
            if o.pointer("/metadata/namespace").and_then(Value::as_str) != Some(ns) {
                return false;
            }
        }
        for (key, eq, val) in &self.fields {
            let ptr = format!("/{}", key.replace('.', "/"));
            let actual = o.pointer(&ptr).and_then(Value::as_str).unwrap_or("");
            if (actual == val) != *eq {
                return false;
            }
        }
        let labels = o.pointer("/metadata/labels").and_then(Value::as_object);
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.labels.iter().all(|r| match r {
            LabelReq::Eq(k, v) => label(k) == Some(v.as_str()),
            LabelReq::Ne(k, v) => label(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
        })
    }
}

fn parse_label_selector(s: &str) -> Result<Vec<LabelReq>, String> {
    // Split on commas outside parentheses.
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&s[start..]);
    let mut out = Vec::new();
    for term in terms.into_iter().map(str::trim).filter(|t| !t.is_empty()) {
        let set = |rest: &str| -> Result<Vec<String>, String> {
            let inner = rest.trim().strip_prefix('(').and_then(|r| r.strip_suffix(')')).ok_or_else(|| format!("invalid label selector term {term:?}"))?;
            Ok(inner.split(',').map(|v| v.trim().to_owned()).collect())
        };
        let req = if let Some(k) = term.strip_prefix('!') {
            LabelReq::NotExists(k.trim().to_owned())
        } else if let Some((k, v)) = term.split_once("!=") {
            LabelReq::Ne(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            LabelReq::Eq(k.trim().into(), v.trim().into())
        } else if let Some((k, rest)) = term.split_once(" notin ") {
            LabelReq::NotIn(k.trim().into(), set(rest)?)
        } else if let Some((k, rest)) = term.split_once(" in ") {
            LabelReq::In(k.trim().into(), set(rest)?)
        } else if term.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c)) {
            LabelReq::Exists(term.to_owned())
        } else {
            return Err(format!("invalid label selector term {term:?}"));
        };
        out.push(req);
    }
    Ok(out)
}

fn watch_event(etype: &str, k: &Kind, version: &str, obj: &Value) -> Bytes {
    let mut obj = obj.clone();
    obj["apiVersion"] = json!(k.api_version(version));
    obj["kind"] = json!(k.kind);
    let mut line = json!({"type": etype, "object": obj}).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// Counts a watch as active for as long as its stream task runs.
struct ActiveWatch(Arc<Shared>);

impl Drop for ActiveWatch {
    fn drop(&mut self) {
        self.0.lock().active_watches -= 1;
    }
}

fn start_watch(
    shared: Arc<Shared>,
    k: &'static Kind,
    version: String,
    filter: Filter,
    from: Option<u64>,
    bookmarks: bool,
    timeout: Option<Duration>,
) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Result<Bytes, io::Error>>(256);
    let mut wake = shared.wake.subscribe();
    let mut drops = shared.drops.subscribe();
    drops.borrow_and_update();
    shared.lock().active_watches += 1;
    let guard = ActiveWatch(shared.clone());
    tokio::spawn(async move {
        let _guard = guard;
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut initial = Vec::new();
        let start = {
            let st = shared.lock();
            match from {
                None => {
                    // No resource version: the current state as ADDED, then changes.
                    for ((r, _, _), o) in &st.objects {
                        if *r == k.resource && filter.matches(o) {
                            initial.push(watch_event("ADDED", k, &version, o));
                        }
                    }
                    Ok(st.rv)
                }
                Some(v) if v < st.compacted => Err(format!("too old resource version: {v} ({})", st.compacted)),
                Some(v) => Ok(v),
            }
        };
        let mut sent = match start {
            Ok(v) => v,
            Err(msg) => {
                let mut line = json!({"type": "ERROR", "object": status_object(410, "Expired", &msg)}).to_string();
                line.push('\n');
                let _ = tx.send(Ok(Bytes::from(line))).await;
                return;
            }
        };
        for e in initial {
            if tx.send(Ok(e)).await.is_err() {
                return;
            }
        }
        let interval = shared.lock().bookmark_interval.max(Duration::from_millis(10));
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            wake.borrow_and_update();
            let events: Vec<Bytes> = {
                let st = shared.lock();
                let start = st.history.partition_point(|e| e.rv <= sent);
                let out = st.history[start..]
                    .iter()
                    .filter(|e| e.kind.resource == k.resource)
                    .filter_map(|e| {
                        let now = filter.matches(&e.new);
                        let before = e.old.as_ref().is_some_and(|o| filter.matches(o));
                        let t = match (e.etype, before, now) {
                            (EventType::Deleted, _, true) => "DELETED",
                            (EventType::Added, _, true) => "ADDED",
                            (EventType::Modified, true, true) => "MODIFIED",
                            (EventType::Modified, false, true) => "ADDED",
                            // Left the selection: the real server sends DELETED.
                            (EventType::Modified, true, false) => "DELETED",
                            _ => return None,
                        };
                        Some(watch_event(t, k, &version, &e.new))
                    })
                    .collect();
                sent = sent.max(st.history.last().map_or(sent, |e| e.rv));
                out
            };
            for e in events {
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
            let until = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = wake.changed() => {}
                _ = drops.changed() => {
                    let _ = tx.send(Err(io::Error::new(io::ErrorKind::ConnectionAborted, "watch dropped by the test"))).await;
                    return;
                }
                _ = ticker.tick(), if bookmarks => {
                    // Only as far as events were sent: a compaction (no event)
                    // is never revealed, so a client cut off after one must
                    // relist, as `force_relist` promises.
                    let obj = json!({"metadata": {"resourceVersion": sent.to_string()}});
                    if tx.send(Ok(watch_event("BOOKMARK", k, &version, &obj))).await.is_err() {
                        return;
                    }
                }
                _ = until => return,
                _ = tx.closed() => return,
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(http_body_util::Either::Right(ChannelBody(rx)))
        .expect("static response parts")
}
