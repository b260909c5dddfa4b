//! The ingress gateway's front: the listeners of the Gateway servers that
//! select this gateway's pod, opened and closed as the Gateways change,
//! TLS terminated for HTTPS servers (the certificate of the server the
//! client's SNI names, from its Secret, picked up on every change without
//! touching open connections), and the downstream HTTP connections, each
//! served by the same request pipeline as a waypoint's streams
//! (`server`). Requests leave over HBONE with the gateway's own identity.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, RwLock,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;

use skiff_core::{
    gateway::{self, Protocol, Server, TlsMode},
    model::Snapshot,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf},
    net::TcpListener,
    task::JoinHandle,
};
use tokio_rustls::rustls::{self, ServerConfig};
use tracing::{debug, error, info, warn};

use crate::{
    server::{Entry, Proxy, StreamCtx},
    tls::{self, ServerKey},
};

/// Downstream connections held open at once by one gateway (all its
/// listeners); past it a new connection is closed at once.
pub const MAX_CONNECTIONS: usize = 16384;

/// How often listeners that could not be opened are tried again.
const RETRY: Duration = Duration::from_secs(5);

/// What a port serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Plaintext HTTP.
    Plain,
    /// Opaque TCP, routed by VirtualService `tcp` routes.
    Tcp,
    /// TLS: terminated (HTTPS, or TLS routed as TCP) or passed through
    /// (PASSTHROUGH, routed by `tls` routes), the server chosen by SNI.
    Tls,
}

/// The largest ClientHello (with what came in the same reads) read to
/// find its SNI before the server is chosen.
const MAX_CLIENT_HELLO: usize = 32 * 1024;

/// The TLS servers of every TLS port and the configurations that could be
/// made for them, as of the last config change.
#[derive(Default)]
struct TlsState {
    servers: BTreeMap<u16, Vec<(ServerKey, Server)>>,
    configs: HashMap<ServerKey, Arc<ServerConfig>>,
}

/// What the config asks the gateway to open.
#[derive(Default)]
struct Plan {
    /// Port → what it serves and its servers (for logs).
    ports: BTreeMap<u16, (Mode, String)>,
    tls: TlsState,
    /// Servers left closed, and why (by `Gateway ns/name servers[i]`).
    problems: BTreeMap<String, String>,
}

/// Gets the gateway's certificate, then opens and closes its listeners to
/// follow the Gateways that select its pod, until the proxy drains
/// (listeners close; open connections finish as `Drain` allows).
pub async fn serve(proxy: Arc<Proxy>, max_connections: usize, ready: Arc<AtomicBool>) -> Result<(), skiff_hbone::certs::CertError> {
    proxy.ensure_certificate().await?;
    info!("gateway serving: certificate ready, listening for the Gateways that select this pod");
    let mut cluster = proxy.cluster();
    let mut open: BTreeMap<u16, (Mode, JoinHandle<()>)> = BTreeMap::new();
    let mut bind_logged: BTreeMap<u16, String> = BTreeMap::new();
    let mut problems_logged: BTreeMap<String, String> = BTreeMap::new();
    let held = Arc::new(AtomicUsize::new(0));
    let tls_state = Arc::new(RwLock::new(Arc::new(TlsState::default())));
    let draining = proxy.drain.stopping();
    tokio::pin!(draining);
    loop {
        let snap = cluster.borrow_and_update().clone();
        let plan = plan(&proxy, &snap);
        // Loud once per server and cause; quiet when it is fixed.
        for (server, why) in &plan.problems {
            if problems_logged.get(server) != Some(why) {
                error!(server = %server, reason = %why, "Gateway server not served (the other servers are)");
            }
        }
        for server in problems_logged.keys().filter(|k| !plan.problems.contains_key(*k)) {
            info!(server = %server, "Gateway server served again");
        }
        problems_logged = plan.problems.clone();
        // New connections get the new certificates; open ones keep theirs.
        *tls_state.write().expect("lock") = Arc::new(plan.tls);
        open.retain(|port, (mode, task)| {
            let keep = plan.ports.get(port).is_some_and(|(m, _)| m == mode);
            if !keep {
                task.abort();
                info!(port, "gateway listener closed: no Gateway server on it any more, or its protocol changed (open connections finish)");
                bind_logged.remove(port);
            }
            keep
        });
        for (port, (mode, servers)) in &plan.ports {
            if open.contains_key(port) {
                continue;
            }
            match std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, *port)).and_then(|l| {
                l.set_nonblocking(true)?;
                TcpListener::from_std(l)
            }) {
                Ok(l) => {
                    info!(port, mode = ?mode, servers = %servers, "gateway listening");
                    bind_logged.remove(port);
                    let task = tokio::spawn(accept_loop(proxy.clone(), l, *port, *mode, held.clone(), max_connections, tls_state.clone()));
                    open.insert(*port, (*mode, task));
                }
                Err(e) => {
                    let what = e.to_string();
                    if bind_logged.get(port) != Some(&what) {
                        error!(port, servers = %servers, error = %what, "cannot listen for these Gateway servers; they are not served until the port can be opened (retried every 5 s)");
                        bind_logged.insert(*port, what);
                    }
                }
            }
        }
        // Ready once every port the config asks for is open (a port that
        // cannot be opened keeps the pod out of its Service's endpoints).
        ready.store(open.len() == plan.ports.len(), Ordering::Release);
        tokio::select! {
            r = cluster.changed() => if r.is_err() { break },
            _ = tokio::time::sleep(RETRY), if open.len() < plan.ports.len() => {}
            _ = &mut draining => break,
        }
    }
    ready.store(false, Ordering::Release);
    for (_, (_, task)) in open {
        task.abort();
    }
    Ok(())
}

/// Serves `/healthz/ready` (Istio's gateways' readiness path) on
/// `listener`: 200 once the gateway has its certificate and every port its
/// Gateways ask for is open, 503 before and while draining.
pub async fn serve_readiness(listener: TcpListener, ready: Arc<AtomicBool>, header_timeout: Duration) {
    use http_body_util::Full;
    use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request, Response, StatusCode};
    use hyper_util::rt::{TokioIo, TokioTimer};
    loop {
        let (s, _) = skiff_hbone::transport::accept(&listener, "gateway readiness").await;
        let ready = ready.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let (status, body) = match (req.uri().path(), ready.load(Ordering::Acquire)) {
                    ("/healthz/ready", true) => (StatusCode::OK, "ready\n"),
                    ("/healthz/ready", false) => (StatusCode::SERVICE_UNAVAILABLE, "not ready: certificate or listeners pending, or draining\n"),
                    _ => (StatusCode::NOT_FOUND, "not found\n"),
                };
                async move {
                    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                    *r.status_mut() = status;
                    Ok::<_, std::convert::Infallible>(r)
                }
            });
            let _ = http1::Builder::new().timer(TokioTimer::new()).header_read_timeout(header_timeout).serve_connection(TokioIo::new(s), svc).await;
        });
    }
}

/// The ports to listen on, what each serves, and the TLS configurations
/// of its HTTPS servers. A port serves one kind of server: the oldest
/// Gateway's server on it decides; a server of the other kind there is
/// left closed and reported.
fn plan(proxy: &Proxy, snap: &Snapshot) -> Plan {
    let mut plan = Plan::default();
    let Some(pod) = proxy.own_pod(snap) else { return plan };
    let gateway_ns = pod.namespace.clone();
    for o in snap.gateway_servers(pod) {
        let key = tls::server_key(&o);
        let name = format!("Gateway {} servers[{}] (port {} → {})", key.0, o.server.index, o.server.number, o.port);
        let mode = match o.server.protocol {
            Protocol::Https | Protocol::Tls => Mode::Tls,
            Protocol::Tcp => Mode::Tcp,
            _ => Mode::Plain,
        };
        let hosts: Vec<String> = o.server.hosts.iter().map(|h| format!("{}/{}", h.namespace.as_deref().unwrap_or("*"), h.host)).collect();
        match plan.ports.get_mut(&o.port) {
            Some((m, _)) if *m != mode => {
                let what = match m {
                    Mode::Tls => "TLS",
                    Mode::Tcp => "TCP",
                    Mode::Plain => "plaintext HTTP",
                };
                plan.problems.insert(name, format!("port {} already serves {what} for an older Gateway's server", o.port));
                continue;
            }
            // One TCP server per port: which would take a connection is
            // not decided by anything it sends.
            Some((Mode::Tcp, _)) => {
                plan.problems.insert(name, format!("port {} already serves TCP for an older Gateway's server", o.port));
                continue;
            }
            Some((_, list)) => list.push_str(&format!("; {name} hosts {}", hosts.join(","))),
            None => {
                plan.ports.insert(o.port, (mode, format!("{name} hosts {}", hosts.join(","))));
            }
        }
        let passthrough = o.server.tls.as_ref().is_some_and(|t| t.mode == TlsMode::Passthrough);
        if mode == Mode::Tls && passthrough {
            plan.tls.servers.entry(o.port).or_default().push((key, o.server.clone()));
        } else if mode == Mode::Tls {
            match tls::server_config(snap, &gateway_ns, o.server) {
                Ok(cfg) => {
                    plan.tls.configs.insert(key.clone(), cfg);
                }
                Err(why) => {
                    plan.problems.insert(name, why);
                }
            }
            plan.tls.servers.entry(o.port).or_default().push((key, o.server.clone()));
        }
    }
    plan
}

/// A slot among `--max-connections`, given back however the connection
/// ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Takes connections on one listener; each is served as HTTP/1.1 or
/// HTTP/2 by the request pipeline, after TLS on a TLS port.
async fn accept_loop(proxy: Arc<Proxy>, listener: TcpListener, port: u16, mode: Mode, held: Arc<AtomicUsize>, max: usize, tls_state: Arc<RwLock<Arc<TlsState>>>) {
    loop {
        let (tcp, peer) = skiff_hbone::transport::accept(&listener, "gateway").await;
        if held.fetch_add(1, Ordering::AcqRel) >= max {
            held.fetch_sub(1, Ordering::AcqRel);
            proxy.metrics.admission_refused.with_label_values(&["gateway_connections"]).inc();
            refusal_logged(port, "gateway connections refused: too many open (--max-connections)", || format!("last from {peer}, max_connections {max}"));
            continue;
        }
        let slot = Slot(held.clone());
        let _ = tcp.set_nodelay(true);
        let (proxy, tls_state) = (proxy.clone(), tls_state.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let _tracked = proxy.drain.track();
            match mode {
                Mode::Tcp => {
                    let local = tcp.local_addr().ok();
                    serve_l4(&proxy, port, None, None, tcp, peer, local).await;
                }
                Mode::Plain => {
                    let mut tcp = tcp;
                    let Some(prefix) = first_bytes(&mut tcp, proxy.header_read_timeout()).await else {
                        return debug!(%peer, port, "gateway connection closed: nothing sent in time");
                    };
                    let ctx = Arc::new(StreamCtx { entry: Entry::Gateway { port, scheme: "http", server: None }, peer, peer_id: None });
                    proxy.serve_http_ctx(ctx, Prefixed { prefix, inner: tcp }).await;
                }
                Mode::Tls => {
                    let state = tls_state.read().expect("lock").clone();
                    let local = tcp.local_addr().ok();
                    // The ClientHello first: its SNI chooses the server,
                    // which terminates TLS or passes it through; the bytes
                    // read are replayed either way.
                    let mut tcp = tcp;
                    // One deadline for the ClientHello and the handshake.
                    let deadline = tokio::time::Instant::now() + proxy.handshake_timeout();
                    let Some((sni, hello)) = client_hello(&mut tcp, deadline).await else {
                        return debug!(%peer, port, "TLS refused: no ClientHello in time (or not one)");
                    };
                    let io = Prefixed { prefix: hello, inner: tcp };
                    let servers: Vec<(ServerKey, &Server)> = state.servers.get(&port).map(|v| v.iter().map(|(k, s)| (k.clone(), s)).collect()).unwrap_or_default();
                    let Some((key, server)) = gateway::pick_by_sni(&servers, sni.as_deref()).and_then(|k| servers.iter().find(|(s, _)| s == k)).cloned() else {
                        return debug!(%peer, port, ?sni, "TLS refused: no server of this port takes that name");
                    };
                    if server.tls.as_ref().is_some_and(|t| t.mode == TlsMode::Passthrough) {
                        return serve_l4(&proxy, port, Some((&key, server)), sni.as_deref(), io, peer, local).await;
                    }
                    let Some((key, settings, mut tls)) = handshake(io, peer, port, &state, deadline).await else { return };
                    // A TLS server (not HTTPS) carries TCP inside: routed
                    // by `tcp` routes.
                    if server.protocol == Protocol::Tls {
                        return serve_l4(&proxy, port, Some((&key, server)), None, tls, peer, local).await;
                    }
                    // The same bound on a client's first bytes as in
                    // plaintext, after the handshake.
                    let Some(prefix) = first_bytes(&mut tls, proxy.header_read_timeout()).await else {
                        return debug!(%peer, port, "gateway TLS connection closed: nothing sent in time after the handshake");
                    };
                    let ctx = Arc::new(StreamCtx { entry: Entry::Gateway { port, scheme: "https", server: Some((key, Box::new(settings))) }, peer, peer_id: None });
                    proxy.serve_http_ctx(ctx, Prefixed { prefix, inner: tls }).await;
                }
            }
        });
    }
}

/// The ClientHello's SNI (None: the client sent none), read by
/// `deadline`, and every byte read for it (to be replayed). Records are
/// handed to rustls one at a time, as they complete (it takes a
/// ClientHello over several records). None: no ClientHello in time, not
/// one, or larger than [`MAX_CLIENT_HELLO`].
async fn client_hello<I: AsyncRead + Unpin>(io: &mut I, deadline: tokio::time::Instant) -> Option<(Option<String>, Bytes)> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut seen = Vec::new();
    let mut fed = 0;
    let mut buf = [0u8; 4096];
    loop {
        let n = match tokio::time::timeout_at(deadline, io.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => n,
        };
        seen.extend_from_slice(&buf[..n]);
        if seen.len() > MAX_CLIENT_HELLO {
            return None;
        }
        // Each complete record (5-byte header, then its length).
        while seen.len() - fed >= 5 {
            // A handshake record, or not TLS at all: refused at once.
            if seen[fed] != 0x16 {
                return None;
            }
            let len = usize::from(u16::from_be_bytes([seen[fed + 3], seen[fed + 4]]));
            let end = fed + 5 + len;
            if seen.len() < end {
                break;
            }
            let mut record = &seen[fed..end];
            while !record.is_empty() {
                acceptor.read_tls(&mut record).ok()?;
            }
            fed = end;
            match acceptor.accept() {
                Ok(Some(accepted)) => return Some((accepted.client_hello().server_name().map(str::to_owned), Bytes::from(seen))),
                Ok(None) => {}
                Err(_) => return None,
            }
        }
    }
}

/// Logs a refusal anyone can cause at most once per 10 s per port and
/// reason, with how many there were since.
fn refusal_logged(port: u16, reason: &'static str, detail: impl FnOnce() -> String) {
    /// By port and reason: when last logged, and how many since.
    type Logged = HashMap<(u16, &'static str), (tokio::time::Instant, u64)>;
    static LAST: std::sync::Mutex<Option<Logged>> = std::sync::Mutex::new(None);
    let mut guard = LAST.lock().expect("lock");
    let map = guard.get_or_insert_with(HashMap::new);
    let now = tokio::time::Instant::now();
    let e = map.entry((port, reason)).or_insert((now - Duration::from_secs(60), 0));
    e.1 += 1;
    if now.duration_since(e.0) >= Duration::from_secs(10) {
        warn!(port, count = e.1, "{reason}: {}", detail());
        *e = (now, 0);
    }
}

/// A connection a TCP server takes (`key` None), a TLS server passes
/// through (`sni`) or terminates to TCP: the policies selecting the
/// gateway's pod at L4 (the client has no mesh identity), then the route
/// ([`gateway::route_l4`]) and its weighted destination, to which the
/// bytes go (over HBONE with the gateway's identity to a pod in the mesh,
/// plain TCP otherwise). Closed when any of those says no, logged.
async fn serve_l4<I>(proxy: &Proxy, port: u16, chosen: Option<(&ServerKey, &Server)>, sni: Option<&str>, io: I, peer: SocketAddr, local: Option<SocketAddr>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send,
{
    let snap = proxy.cluster().borrow().clone();
    let Some(pod) = proxy.own_pod(&snap) else { return };
    let open = snap.gateway_servers(pod);
    // The server the connection was chosen for, still on this port as it
    // was (changed since, e.g. PASSTHROUGH no more: closed).
    let o = match chosen {
        Some((k, server)) => open.iter().find(|o| tls::server_key(o) == *k && o.port == port && o.server == server),
        None => open.iter().find(|o| o.port == port && o.server.protocol == Protocol::Tcp),
    };
    let Some(o) = o else {
        return debug!(%peer, port, "gateway connection closed: its server is gone");
    };
    let own_ip = pod.ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
    let (own_id, name) = proxy.own_identity();
    let decision = crate::authz::check_stream(&crate::authz::selecting(&snap, pod), peer, None, SocketAddrV4::new(own_ip, port));
    let meter = || crate::metrics::TcpLog::new(crate::metrics::Source::Proxy(name, Some(pod), &own_id), &snap, peer);
    if let Some(d) = decision.as_ref().filter(|d| !d.allowed) {
        return meter().refused(&proxy.metrics, d);
    }
    let local_ip = local.map(|a| a.ip()).unwrap_or(std::net::IpAddr::V4(own_ip));
    let Some((vs, route)) = gateway::route_l4(&snap.virtual_services, o, sni, local_ip, &pod.namespace) else {
        let server = tls::server_key(o);
        return refusal_logged(port, "gateway connections closed: no VirtualService route takes them (tcp, or tls by SNI)", || format!("last from {peer}, SNI {sni:?}, server {server:?}"));
    };
    let mut rng = fastrand::Rng::new();
    let Some(dest) = skiff_core::routing::pick_weighted(&route.destinations, rng.u32(..skiff_core::routing::total_weight(&route.destinations).max(1))).cloned() else {
        return;
    };
    debug!(%peer, port, ?sni, virtual_service = %format!("{}/{}", vs.namespace, vs.name), destination = %dest.host, "gateway connection routed");
    // `--http-idle-timeout` bounds a connection on which nothing moves
    // either way, as for HTTP.
    let last = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let born = std::time::Instant::now();
    let io = crate::body::Activity::new(io, last.clone(), born);
    let mut meter = meter();
    // As for requests: a decision is named only when a policy applies.
    if let Some(d) = &decision {
        meter.set_policy(d);
    }
    let relayed = proxy.upstreams().passthrough_to(&snap, &dest, &vs.namespace, o.server.number, peer.ip(), io, None, &mut rng, Some((&proxy.metrics, meter)));
    tokio::select! {
        ok = relayed => if !ok {
            let host = dest.host.clone();
            refusal_logged(port, "gateway connections closed: the route's destination has no reachable endpoint", || format!("last from {peer}, destination {host}"));
        },
        _ = crate::server::idle_for(last, born, proxy.idle_timeout()) => debug!(%peer, port, "gateway TCP connection idle: closed"),
    }
}

/// The client's first bytes, read within `within`: at least one, and for
/// HTTP/2 (prior knowledge) the whole 24-byte preface, which the HTTP
/// server would otherwise wait for without a bound. None: nothing (or a
/// partial preface) in time, or the client closed.
async fn first_bytes<I: AsyncRead + Unpin>(io: &mut I, within: Duration) -> Option<Bytes> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 24];
    let mut n = 0;
    loop {
        match tokio::time::timeout_at(deadline, io.read(&mut buf[n..])).await {
            Ok(Ok(0)) => return (n > 0).then(|| Bytes::copy_from_slice(&buf[..n])),
            Ok(Ok(m)) => n += m,
            _ => return None,
        }
        if n == PREFACE.len() || buf[..n] != PREFACE[..n] {
            return Some(Bytes::copy_from_slice(&buf[..n]));
        }
    }
}

/// A stream whose first bytes were read already (see [`first_bytes`]):
/// they are read again first.
struct Prefixed<I> {
    prefix: Bytes,
    inner: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The TLS handshake of one connection: the server its SNI picks among
/// this port's, that server's configuration (certificate, versions,
/// client CA), then the `subjectAltNames` check of a MUTUAL client. None:
/// refused (logged at debug: clients that fail TLS are common and cheap
/// to cause).
async fn handshake<I>(
    io: I,
    peer: SocketAddr,
    port: u16,
    state: &TlsState,
    deadline: tokio::time::Instant,
) -> Option<(ServerKey, gateway::ServerTls, tokio_rustls::server::TlsStream<I>)>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let peer = Some(peer);
    let start = match tokio::time::timeout_at(deadline, tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(?peer, port, error = %e, "TLS refused: not a ClientHello");
            return None;
        }
        Err(_) => return None,
    };
    let sni = start.client_hello().server_name().map(str::to_owned);
    let servers: Vec<(ServerKey, &Server)> = state.servers.get(&port).map(|v| v.iter().map(|(k, s)| (k.clone(), s)).collect()).unwrap_or_default();
    let Some(key) = gateway::pick_by_sni(&servers, sni.as_deref()).cloned() else {
        debug!(?peer, port, ?sni, "TLS refused: no server of this port takes that name");
        return None;
    };
    let Some(cfg) = state.configs.get(&key).cloned() else {
        debug!(?peer, port, ?sni, server = ?key, "TLS refused: that server has no usable certificate (see the error logged for it)");
        return None;
    };
    let stream = match tokio::time::timeout_at(deadline, start.into_stream(cfg)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(?peer, port, ?sni, error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => return None,
    };
    let server = servers.iter().find(|(k, _)| *k == key).map(|(_, s)| *s)?;
    let settings = server.tls.clone()?;
    if settings.mode == TlsMode::Mutual {
        let cert = stream.get_ref().1.peer_certificates().and_then(|c| c.first());
        if !tls::client_names_allowed(&settings.subject_alt_names, cert) {
            info!(?peer, port, ?sni, "TLS client refused: its certificate names none of the server's subjectAltNames");
            return None;
        }
    }
    Some((key, settings, stream))
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt as _;

    use super::*;

    /// A real ClientHello (rustls, SNI `outside.example.com`), in two
    /// writes: its SNI is found, and the bytes read for it are exactly
    /// what the client sent, to be replayed to the destination.
    #[tokio::test]
    async fn a_client_hello_gives_its_sni_and_every_byte_read() {
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), "outside.example.com".try_into().unwrap()).unwrap();
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).unwrap();
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let (a, b) = hello.split_at(hello.len() / 2);
        let (a, b) = (a.to_vec(), b.to_vec());
        tokio::spawn(async move {
            client.write_all(&a).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            client.write_all(&b).await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let within = || tokio::time::Instant::now() + Duration::from_secs(2);
        let (sni, seen) = client_hello(&mut server, within()).await.expect("a ClientHello");
        assert_eq!(sni.as_deref(), Some("outside.example.com"));
        assert_eq!(&seen[..], &hello[..]);
        // The same ClientHello split over two records, in one write.
        let body = &hello[5..];
        let (x, y) = body.split_at(body.len() / 2);
        let mut two = Vec::new();
        for part in [x, y] {
            two.extend_from_slice(&[0x16, hello[1], hello[2]]);
            two.extend_from_slice(&(part.len() as u16).to_be_bytes());
            two.extend_from_slice(part);
        }
        let (mut c, mut s) = tokio::io::duplex(1 << 16);
        c.write_all(&two).await.unwrap();
        let (sni, seen) = client_hello(&mut s, within()).await.expect("a ClientHello over two records");
        assert_eq!((sni.as_deref(), &seen[..]), (Some("outside.example.com"), &two[..]));
        // Not TLS: refused, not waited on.
        let (mut c, mut s) = tokio::io::duplex(1024);
        c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
        let t = std::time::Instant::now();
        assert!(client_hello(&mut s, within()).await.is_none());
        assert!(t.elapsed() < Duration::from_secs(1), "not waited on");
        // A client that sends part of one and stalls: given up at the deadline.
        let (mut c, mut s) = tokio::io::duplex(1024);
        c.write_all(&hello[..10]).await.unwrap();
        let t = std::time::Instant::now();
        assert!(client_hello(&mut s, tokio::time::Instant::now() + Duration::from_millis(200)).await.is_none());
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
