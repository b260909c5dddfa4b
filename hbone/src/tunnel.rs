//! HBONE: TCP tunnelled as HTTP/2 CONNECT streams over mutual TLS 1.3, to
//! port 15008 of the destination pod. Client side: a pool of multiplexed
//! connections per (source pod, destination). Server side: request checks.
//! Both: the byte relay between a TCP socket and an HTTP/2 stream.

use std::{
    collections::HashMap,
    io,
    net::SocketAddrV4,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, Weak,
    },
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use h2::{client::SendRequest, RecvStream, SendStream};
use http::{Method, Request, StatusCode};
use skiff_core::netns::NetnsThread;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tracing::debug;

use crate::{certs::CertManager, identity::Identity, limits::{self, HboneLimits}, sock, transport};

/// HTTP/2 stream window: large enough for bulk transfers on one stream.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// HTTP/2 connection window, shared by the streams of one connection.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an HBONE stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    /// TCP connect to port 15008 failed.
    #[error("connecting to {0}")]
    Connect(SocketAddrV4, #[source] io::Error),
    /// TLS handshake failed (certificate refused, wrong identity, …).
    #[error("TLS handshake with {0}")]
    Tls(SocketAddrV4, #[source] io::Error),
    /// Timed out.
    #[error("{0} timed out")]
    Timeout(&'static str),
    /// HTTP/2 failed.
    #[error("HTTP/2")]
    H2(#[from] h2::Error),
    /// The server answered the CONNECT with an error status.
    #[error("CONNECT refused with {0}")]
    Status(StatusCode),
    /// Certificates could not be prepared.
    #[error("certificates")]
    Identity(#[from] crate::certs::CertError),
    /// The pod's netns thread is gone.
    #[error("pod network namespace")]
    Netns(#[from] skiff_core::netns::NetnsError),
    /// Another connection's dial to the same destination, which this one
    /// waited for, failed (so this one fails as fast, without a dial of
    /// its own).
    #[error("connecting to the same destination just failed: {0}")]
    DialFailed(String),
}

struct PooledConn {
    id: u64,
    send: SendRequest<Bytes>,
    streams: Arc<AtomicUsize>,
    /// When the last stream ended, in ms since the pool's epoch.
    last_used: Arc<AtomicU64>,
    dead: Arc<AtomicBool>,
}

trait ClosedCheck {
    fn poll_ready_is_closed(&mut self) -> bool;
}

impl ClosedCheck for SendRequest<Bytes> {
    /// Whether the connection can no longer open streams.
    fn poll_ready_is_closed(&mut self) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        matches!(self.poll_ready(&mut cx), std::task::Poll::Ready(Err(_)))
    }
}

/// Counts a stream against its pooled connection while it lives, and
/// stamps the connection's last use when it ends.
pub struct StreamGuard {
    streams: Arc<AtomicUsize>,
    last_used: Arc<AtomicU64>,
    epoch: Instant,
}

impl StreamGuard {
    fn new(c: &PooledConn, epoch: Instant) -> StreamGuard {
        c.streams.fetch_add(1, Ordering::AcqRel);
        StreamGuard { streams: c.streams.clone(), last_used: c.last_used.clone(), epoch }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.last_used.store(self.epoch.elapsed().as_millis() as u64, Ordering::Release);
        self.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Pool key: source pod (connections leave from its netns, with its IP)
/// and destination address.
type Key = (String, SocketAddrV4);
type Conns = Mutex<HashMap<Key, Vec<PooledConn>>>;

pub struct Pool {
    certs: Arc<CertManager>,
    limits: HboneLimits,
    conns: Arc<Conns>,
    epoch: Instant,
    next_id: AtomicU64,
    /// Keys being dialled: the lock later comers wait on, holding the
    /// last dial's failure (when, why).
    dialing: Arc<Dialing>,
}

type Dialing = Mutex<HashMap<Key, Arc<DialSlot>>>;
type DialSlot = tokio::sync::Mutex<Option<(Instant, String)>>;

/// A hold on a key's dial slot; the last holder out removes the slot.
struct DialHold {
    map: Arc<Dialing>,
    key: Key,
    slot: Option<Arc<DialSlot>>,
}

impl DialHold {
    fn new(map: &Arc<Dialing>, key: &Key) -> DialHold {
        let slot = map.lock().expect("lock").entry(key.clone()).or_default().clone();
        DialHold { map: map.clone(), key: key.clone(), slot: Some(slot) }
    }
}

impl Drop for DialHold {
    fn drop(&mut self) {
        let mut map = self.map.lock().expect("lock");
        let slot = self.slot.take().expect("held");
        // Counted and dropped under the map's lock: exactly one holder
        // sees itself as the last (the map's own reference and its own).
        if Arc::strong_count(&slot) == 2 {
            map.remove(&self.key);
        }
        drop(slot);
    }
}

impl Pool {
    pub fn new(certs: Arc<CertManager>, limits: HboneLimits) -> Pool {
        Pool { certs, limits, conns: Arc::new(Mutex::new(HashMap::new())), epoch: Instant::now(), next_id: AtomicU64::new(1), dialing: Arc::new(Mutex::new(HashMap::new())) }
    }

    /// Pooled connections open now.
    pub fn connections(&self) -> usize {
        self.conns.lock().expect("lock").values().flatten().filter(|c| !c.dead.load(Ordering::Acquire)).count()
    }

    fn pick(&self, key: &Key) -> Option<(SendRequest<Bytes>, StreamGuard)> {
        let mut conns = self.conns.lock().expect("lock");
        let list = conns.get_mut(key)?;
        // Gone, or going away (GOAWAY received: the server drains).
        list.retain(|c| !c.dead.load(Ordering::Acquire) && !c.send.clone().poll_ready_is_closed());
        if list.is_empty() {
            conns.remove(key);
            return None;
        }
        let list = conns.get_mut(key)?;
        let most = self.limits.max_streams_per_connection;
        let c = list.iter().find(|c| c.streams.load(Ordering::Acquire) < most)?;
        Some((c.send.clone(), StreamGuard::new(c, self.epoch)))
    }

    /// Resolves once the connection `id` under `key` has had no stream for
    /// the idle timeout; it is then out of the pool (under the pool's lock,
    /// so no stream can be picked onto it meanwhile).
    async fn idle_out(conns: Weak<Conns>, key: Key, id: u64, epoch: Instant, idle: Duration) {
        let tick = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            tokio::time::sleep(tick).await;
            // Some(true): idle, taken out; Some(false): in use; None: out of
            // the pool for another reason (GOAWAY, an error, its pod left),
            // no longer this task's to close — it ends once its streams
            // have and its handles are dropped.
            let verdict = (|| {
                let conns = conns.upgrade()?;
                let mut conns = conns.lock().expect("lock");
                let list = conns.get_mut(&key)?;
                let i = list.iter().position(|c| c.id == id)?;
                let c = &list[i];
                let since = epoch.elapsed().saturating_sub(Duration::from_millis(c.last_used.load(Ordering::Acquire)));
                if c.streams.load(Ordering::Acquire) == 0 && since >= idle {
                    list.remove(i);
                    if list.is_empty() {
                        conns.remove(&key);
                    }
                    return Some(true);
                }
                Some(false)
            })();
            match verdict {
                Some(true) => return,
                Some(false) => {}
                None => return std::future::pending().await,
            }
        }
    }

    async fn dial(
        &self,
        key: &Key,
        net: Option<&Arc<NetnsThread>>,
        src: &Identity,
        dst: &Identity,
        addr: SocketAddrV4,
    ) -> Result<(SendRequest<Bytes>, StreamGuard), HboneError> {
        // From the source pod's netns (ztunnel), or from our own (waypoint).
        let std = match net {
            Some(net) => net.run(sock::outbound)?,
            None => sock::outbound(),
        }
        .map_err(|e| HboneError::Connect(addr, e))?;
        let tcp = transport::connect_socket(std, addr, self.limits.connect_timeout).await.map_err(|e| HboneError::Connect(addr, e))?;
        limits::tcp_keepalive(&tcp, self.limits.keepalive_interval);
        self.certs.ensure(src).await?;
        let cfg = self.certs.client_config(src.clone(), dst.clone())?;
        let connector = tokio_rustls::TlsConnector::from(cfg);
        // The server name is not checked (identities are SPIFFE URIs); the
        // verifier checks the expected identity instead.
        let name = rustls::pki_types::ServerName::try_from("hbone.skiff").expect("valid name");
        let tls = tokio::time::timeout(self.limits.handshake_timeout, connector.connect(name, tcp))
            .await
            .map_err(|_| HboneError::Timeout("TLS handshake"))?
            .map_err(|e| HboneError::Tls(addr, e))?;
        let (send, mut conn) = tokio::time::timeout(
            self.limits.handshake_timeout,
            h2::client::Builder::new()
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .handshake::<_, Bytes>(tls),
        )
        .await
        .map_err(|_| HboneError::Timeout("HTTP/2 handshake"))??;
        let dead = Arc::new(AtomicBool::new(false));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let last_used = Arc::new(AtomicU64::new(self.epoch.elapsed().as_millis() as u64));
        let flag = dead.clone();
        let ping = conn.ping_pong();
        let (interval, timeout, idle) = (self.limits.keepalive_interval, self.limits.keepalive_timeout, self.limits.pool_idle_timeout);
        let idle_out = Self::idle_out(Arc::downgrade(&self.conns), key.clone(), id, self.epoch, idle);
        let (pool, own_key) = (Arc::downgrade(&self.conns), key.clone());
        tokio::spawn(async move {
            let keepalive = async {
                match ping {
                    Some(pp) => limits::keepalive_failed(pp, interval, timeout).await,
                    None => std::future::pending().await,
                }
            };
            // Ending this task drops the connection: its socket closes and
            // the server sees the end.
            tokio::select! {
                r = conn => if let Err(e) = r { debug!(%addr, error = %e, "HBONE connection ended") },
                why = keepalive => debug!(%addr, reason = why, "HBONE connection closed: the peer stopped answering"),
                _ = idle_out => debug!(%addr, ?idle, "idle pooled HBONE connection closed"),
            }
            flag.store(true, Ordering::Release);
            // Out of the pool, so a destination that is gone leaves nothing.
            if let Some(pool) = pool.upgrade() {
                let mut conns = pool.lock().expect("lock");
                if let Some(list) = conns.get_mut(&own_key) {
                    list.retain(|c| c.id != id);
                    if list.is_empty() {
                        conns.remove(&own_key);
                    }
                }
            }
        });
        // Pooled before the task above can look for it.
        let c = PooledConn { id, send, streams: Arc::new(AtomicUsize::new(0)), last_used, dead };
        let picked = (c.send.clone(), StreamGuard::new(&c, self.epoch));
        self.conns.lock().expect("lock").entry(key.clone()).or_default().push(c);
        Ok(picked)
    }

    /// Opens a CONNECT stream to `target` through `addr` (the destination
    /// pod's port 15008), reusing a pooled connection when one has room.
    pub async fn connect(
        &self,
        src_pod: &str,
        net: Option<&Arc<NetnsThread>>,
        src: &Identity,
        dst: &Identity,
        addr: SocketAddrV4,
        target: SocketAddrV4,
    ) -> Result<(SendStream<Bytes>, RecvStream, StreamGuard), HboneError> {
        match self.connect_once(src_pod, net, src, dst, addr, target).await {
            // The connection was going away (the server drains): once
            // more, on another connection or a new one.
            Err(HboneError::H2(e)) if e.is_go_away() => self.connect_once(src_pod, net, src, dst, addr, target).await,
            r => r,
        }
    }

    /// A pooled connection with room, or the one a dial for this key makes.
    /// One dial per key at a time: a burst of new connections waits for it
    /// and shares it (each dialling its own would also run into the
    /// server's per-peer handshake bound), and when it fails, those that
    /// waited fail at once instead of each dialling in turn.
    async fn pick_or_dial(
        &self,
        key: &Key,
        net: Option<&Arc<NetnsThread>>,
        src: &Identity,
        dst: &Identity,
        addr: SocketAddrV4,
    ) -> Result<(SendRequest<Bytes>, StreamGuard), HboneError> {
        if let Some(p) = self.pick(key) {
            return Ok(p);
        }
        let waited_from = Instant::now();
        let hold = DialHold::new(&self.dialing, key);
        let slot = hold.slot.clone().expect("held");
        let mut last_failure = slot.lock().await;
        if let Some(p) = self.pick(key) {
            return Ok(p);
        }
        if let Some((at, why)) = &*last_failure {
            if *at >= waited_from {
                return Err(HboneError::DialFailed(why.clone()));
            }
        }
        match self.dial(key, net, src, dst, addr).await {
            Ok(p) => {
                *last_failure = None;
                Ok(p)
            }
            Err(e) => {
                *last_failure = Some((Instant::now(), skiff_core::report(&e)));
                Err(e)
            }
        }
    }

    async fn connect_once(
        &self,
        src_pod: &str,
        net: Option<&Arc<NetnsThread>>,
        src: &Identity,
        dst: &Identity,
        addr: SocketAddrV4,
        target: SocketAddrV4,
    ) -> Result<(SendStream<Bytes>, RecvStream, StreamGuard), HboneError> {
        let key: Key = (src_pod.to_owned(), addr);
        let (send, guard) = self.pick_or_dial(&key, net, src, dst, addr).await?;
        let key2 = (src_pod.to_owned(), addr);
        let mark_dead = |e: h2::Error| {
            // A connection that fails a stream (GOAWAY, reset, gone) is not
            // picked again.
            if e.is_go_away() || e.is_io() || e.reason().is_none() {
                if let Some(list) = self.conns.lock().expect("lock").get_mut(&key2) {
                    list.retain(|c| !c.send.clone().poll_ready_is_closed());
                }
            }
            HboneError::H2(e)
        };
        let mut send = tokio::time::timeout(HANDSHAKE_TIMEOUT, send.ready())
            .await
            .map_err(|_| HboneError::Timeout("HTTP/2 stream slot"))?
            .map_err(mark_dead)?;
        let req = Request::builder().method(Method::CONNECT).uri(target.to_string()).body(()).expect("valid CONNECT");
        let (resp, stream) = send.send_request(req, false).map_err(mark_dead)?;
        let resp = tokio::time::timeout(HANDSHAKE_TIMEOUT, resp)
            .await
            .map_err(|_| HboneError::Timeout("CONNECT response"))?
            .map_err(mark_dead)?;
        if resp.status() != StatusCode::OK {
            return Err(HboneError::Status(resp.status()));
        }
        Ok((stream, resp.into_body(), guard))
    }

    /// Drops every pooled connection of a pod (it left the node).
    pub fn forget_pod(&self, src_pod: &str) {
        self.conns.lock().expect("lock").retain(|(pod, _), _| pod != src_pod);
    }
}

/// Copies between a TCP socket and an HTTP/2 stream until both directions
/// end, counting bytes as they pass. Returns (tcp→stream, stream→tcp).
///
/// Ends are kept as they are (RFC 9113 §8.5, CONNECT): a FIN becomes
/// END_STREAM and END_STREAM a FIN, one direction at a time (a half-closed
/// upload still gets its whole answer); a TCP reset or read error becomes
/// RST_STREAM(CONNECT_ERROR), and a reset stream (or a lost connection)
/// resets the TCP socket — never a clean end that would pass a cut-short
/// transfer off as complete.
pub async fn relay(
    tcp: TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    tcp_to_stream: &prometheus::IntCounter,
    stream_to_tcp: &prometheus::IntCounter,
) -> (u64, u64) {
    let (mut r, mut w) = tcp.into_split();
    let (reset_tx, reset_rx) = tokio::sync::watch::channel(false);
    let up = async {
        let mut reset = reset_rx.clone();
        let (total, read_failed) = copy_to_stream(&mut r, &mut send, tcp_to_stream, reset.changed()).await;
        if read_failed {
            let _ = reset_tx.send(true);
        }
        total
    };
    let down = async {
        let mut total = 0u64;
        loop {
            match recv.data().await {
                Some(Ok(data)) => {
                    let n = data.len();
                    let _ = recv.flow_control().release_capacity(n);
                    if w.write_all(&data).await.is_err() {
                        // The TCP peer is gone: the stream must not look finished.
                        let _ = reset_tx.send(true);
                        return (total, true);
                    }
                    stream_to_tcp.inc_by(n as u64);
                    total += n as u64;
                }
                None => {
                    let _ = w.shutdown().await;
                    return (total, false);
                }
                Some(Err(_)) => {
                    let _ = reset_tx.send(true);
                    return (total, true);
                }
            }
        }
    };
    let (up, (down, reset)) = tokio::join!(up, down);
    if reset || *reset_rx.borrow() {
        send.send_reset(h2::Reason::CONNECT_ERROR);
        reset_tcp(w);
    }
    (up, down)
}

/// Copies `r` onto an HTTP/2 stream, counting bytes, until `r` ends (then
/// END_STREAM: a half-close), `r` fails (then RST_STREAM(CONNECT_ERROR)),
/// the stream can no longer send, or `stop` resolves. Returns the bytes
/// copied and whether `r` failed.
async fn copy_to_stream<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    send: &mut SendStream<Bytes>,
    counter: &prometheus::IntCounter,
    stop: impl std::future::Future,
) -> (u64, bool) {
    tokio::pin!(stop);
    let mut total = 0u64;
    let mut buf = BytesMut::with_capacity(32 * 1024);
    loop {
        buf.reserve(32 * 1024);
        let n = tokio::select! {
            n = r.read_buf(&mut buf) => n,
            _ = &mut stop => return (total, false),
        };
        let n = match n {
            Ok(0) => break,
            Ok(n) => n,
            Err(_) => {
                send.send_reset(h2::Reason::CONNECT_ERROR);
                return (total, true);
            }
        };
        if !send_all(send, buf.split().freeze()).await {
            // The stream is gone: the other direction sees why.
            return (total, false);
        }
        counter.inc_by(n as u64);
        total += n as u64;
    }
    let _ = send.send_data(Bytes::new(), true);
    (total, false)
}

/// Sends `chunk` on an HTTP/2 stream as flow control allows; false when
/// the stream can no longer send.
async fn send_all(send: &mut SendStream<Bytes>, mut chunk: Bytes) -> bool {
    while !chunk.is_empty() {
        send.reserve_capacity(chunk.len());
        match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(cap)) if cap > 0 => {
                let part = chunk.split_to(cap.min(chunk.len()));
                if send.send_data(part, false).is_err() {
                    return false;
                }
            }
            Some(Ok(_)) => {}
            _ => return false,
        }
    }
    true
}

/// Closes a TCP socket with a reset (RST, not FIN): SO_LINGER 0, and the
/// write half is not shut down first (that would send a FIN ahead of it).
pub fn reset_tcp(w: tokio::net::tcp::OwnedWriteHalf) {
    let _ = socket2::SockRef::from(w.as_ref()).set_linger(Some(Duration::ZERO));
    // Closed when the read half drops too, without a shutdown.
    w.forget();
}

/// [`relay`] over any byte stream (an in-memory pipe to the waypoint's
/// HTTP engine): as `relay`, except that a reset stream can only end the
/// pipe, not reset it.
pub async fn relay_io<S: tokio::io::AsyncRead + tokio::io::AsyncWrite>(
    io: S,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    tcp_to_stream: &prometheus::IntCounter,
    stream_to_tcp: &prometheus::IntCounter,
) -> (u64, u64) {
    let (mut r, mut w) = tokio::io::split(io);
    let up = async { copy_to_stream(&mut r, &mut send, tcp_to_stream, std::future::pending::<()>()).await.0 };
    let down = async {
        let mut total = 0u64;
        while let Some(Ok(data)) = recv.data().await {
            let n = data.len();
            let _ = recv.flow_control().release_capacity(n);
            if w.write_all(&data).await.is_err() {
                break;
            }
            stream_to_tcp.inc_by(n as u64);
            total += n as u64;
        }
        let _ = w.shutdown().await;
        total
    };
    tokio::join!(up, down)
}

/// The HTTP/2 server settings every HBONE listener uses (ztunnel's inbound
/// 15008, the waypoint): the windows the client pool expects, a bound on
/// concurrent streams (by default twice what a pooled client opens on one
/// connection) and on the request header block.
pub fn server_builder(limits: &HboneLimits) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_bytes);
    b
}

/// Serves one established HBONE server connection: hands each CONNECT
/// stream to `on_stream` with a guard its task holds while the stream
/// lives. The connection is closed gracefully (GOAWAY, open streams
/// finish) when `stop` resolves or when it has had no stream for the
/// server idle timeout, and at once when the peer stops answering PINGs.
/// Returns why it ended.
pub async fn serve_connection<T, S, F>(
    mut conn: h2::server::Connection<T, Bytes>,
    limits: &HboneLimits,
    stop: S,
    mut on_stream: F,
) -> &'static str
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    S: std::future::Future,
    F: FnMut(Request<RecvStream>, h2::server::SendResponse<Bytes>, StreamGuard),
{
    let epoch = Instant::now();
    let owner = PooledIdle { streams: Arc::new(AtomicUsize::new(0)), last_used: Arc::new(AtomicU64::new(0)) };
    let ping = conn.ping_pong();
    let keepalive = async {
        match ping {
            Some(pp) => limits::keepalive_failed(pp, limits.keepalive_interval, limits.keepalive_timeout).await,
            None => std::future::pending().await,
        }
    };
    let idle = limits.server_idle_timeout;
    let mut ticker = tokio::time::interval((idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(10)));
    // After an idle GOAWAY the peer has this long to let the connection
    // close (h2 waits for its answer to a final PING); a peer that stops
    // reading then cannot hold the connection and its slot.
    let idle_close_deadline = tokio::time::sleep_until(far_future());
    tokio::pin!(stop, keepalive, idle_close_deadline);
    let mut closing = false;
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    owner.streams.fetch_add(1, Ordering::AcqRel);
                    let guard = StreamGuard { streams: owner.streams.clone(), last_used: owner.last_used.clone(), epoch };
                    on_stream(req, respond, guard);
                }
                Some(Err(e)) => {
                    debug!(error = %e, "HBONE server connection failed");
                    return "error";
                }
                None => return if closing { "closed by this side" } else { "closed by the peer" },
            },
            _ = &mut stop, if !closing => {
                closing = true;
                conn.graceful_shutdown();
            }
            // Also while closing: a peer that vanished mid-drain is found.
            why = &mut keepalive => return why,
            _ = &mut idle_close_deadline => return "idle, and the peer did not close after GOAWAY",
            _ = ticker.tick(), if !closing => {
                let since = epoch.elapsed().saturating_sub(Duration::from_millis(owner.last_used.load(Ordering::Acquire)));
                if owner.streams.load(Ordering::Acquire) == 0 && since >= idle {
                    debug!(?idle, "idle HBONE server connection closed");
                    closing = true;
                    conn.graceful_shutdown();
                    let at = tokio::time::Instant::now().checked_add(limits.keepalive_timeout).unwrap_or_else(far_future);
                    idle_close_deadline.as_mut().reset(at);
                }
            }
        }
    }
}

/// An instant no timer reaches (for a deadline not set).
fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86400 * 365)
}

/// The stream count and last-use stamp of one server connection.
struct PooledIdle {
    streams: Arc<AtomicUsize>,
    last_used: Arc<AtomicU64>,
}

/// Checks an inbound CONNECT request: method and authority. Returns the
/// target address, or the status to answer with.
pub fn check_connect<B>(req: &Request<B>, pod_ip: std::net::Ipv4Addr) -> Result<SocketAddrV4, (StatusCode, &'static str)> {
    if req.method() != Method::CONNECT {
        return Err((StatusCode::METHOD_NOT_ALLOWED, "only CONNECT is served on 15008"));
    }
    let authority = req.uri().authority().ok_or((StatusCode::BAD_REQUEST, "CONNECT without authority"))?;
    let target: SocketAddrV4 =
        authority.as_str().parse().map_err(|_| (StatusCode::BAD_REQUEST, "authority is not IPv4:port"))?;
    if *target.ip() != pod_ip {
        return Err((StatusCode::BAD_REQUEST, "target is not this pod"));
    }
    if target.port() == 0 || skiff_ebpf_common::MESH_PORTS.contains(&target.port()) {
        return Err((StatusCode::BAD_REQUEST, "target port is reserved"));
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: Method, uri: &str) -> Request<()> {
        Request::builder().method(method).uri(uri).body(()).unwrap()
    }

    /// A burst of connections to a destination whose dial fails (here: a
    /// listener that never speaks TLS) used to dial one after another,
    /// each waiting out the handshake timeout; now one dial runs and those
    /// that waited for it fail with it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiters_on_a_failed_dial_fail_with_it_instead_of_dialling_in_turn() {
        if sock::outbound().is_err() {
            assert!(std::env::var("CI").map_or(true, |v| v.is_empty() || v == "false"), "under CI this test must run (as root)");
            eprintln!("SKIPPED: marking sockets (SO_MARK) needs CAP_NET_ADMIN; run as root");
            return;
        }
        let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let std::net::SocketAddr::V4(addr) = hole.local_addr().unwrap() else { unreachable!() };
        let ca = crate::identity::Ca::generate("cluster.local").unwrap();
        let certs = CertManager::new(ca, Duration::from_secs(3600)).unwrap();
        let limits = HboneLimits { handshake_timeout: Duration::from_millis(800), ..HboneLimits::default() };
        let pool = Arc::new(Pool::new(certs, limits));
        let (src, dst) = (Identity::new("cluster.local", "a", "client"), Identity::new("cluster.local", "b", "server"));
        let tasks: Vec<_> = (0..5)
            .map(|_| {
                let (pool, src, dst) = (pool.clone(), src.clone(), dst.clone());
                tokio::spawn(async move { pool.connect("pod-a", None, &src, &dst, addr, addr).await.map(|_| ()) })
            })
            .collect();
        let (mut timeouts, mut shared) = (0, 0);
        for t in tasks {
            match t.await.unwrap() {
                Err(HboneError::Timeout(_)) => timeouts += 1,
                Err(HboneError::DialFailed(why)) => {
                    assert!(why.contains("timed out"), "{why}");
                    shared += 1
                }
                other => panic!("unexpected outcome: {other:?}"),
            }
        }
        assert_eq!((timeouts, shared), (1, 4), "one dial, four connections failed with it");
        assert!(pool.dialing.lock().unwrap().is_empty(), "no dial slot outlives its holders");
    }

    #[test]
    fn connect_requests_are_checked() {
        let ip = "10.0.0.1".parse().unwrap();
        assert_eq!(check_connect(&req(Method::CONNECT, "10.0.0.1:8080"), ip).unwrap(), "10.0.0.1:8080".parse().unwrap());
        let status = |m, u| check_connect(&req(m, u), ip).unwrap_err().0;
        assert_eq!(status(Method::GET, "http://10.0.0.1:8080/"), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(status(Method::CONNECT, "example.com:80"), StatusCode::BAD_REQUEST);
        assert_eq!(status(Method::CONNECT, "10.0.0.2:8080"), StatusCode::BAD_REQUEST);
        assert_eq!(status(Method::CONNECT, "10.0.0.1:15008"), StatusCode::BAD_REQUEST);
        assert_eq!(status(Method::CONNECT, "10.0.0.1:0"), StatusCode::BAD_REQUEST);
    }
}
