//! HBONE: TCP tunnelled as HTTP/2 CONNECT streams over mutual TLS 1.3, to
//! port 15008 of the destination pod. Client side: a pool of multiplexed
//! connections per (source pod, destination). Server side: request checks.
//! Both: the byte relay between a TCP socket and an HTTP/2 stream.

use std::{
    collections::HashMap,
    io,
    net::SocketAddrV4,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
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

use crate::{certs::CertManager, identity::Identity, sock, transport};

/// HTTP/2 stream window: large enough for bulk transfers on one stream.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// HTTP/2 connection window, shared by the streams of one connection.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Streams per pooled connection before another connection is opened.
pub const MAX_STREAMS_PER_CONN: usize = 100;
/// Largest request header block a server accepts.
pub const MAX_HEADER_LIST: u32 = 16 * 1024;
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
}

struct PooledConn {
    send: SendRequest<Bytes>,
    streams: Arc<AtomicUsize>,
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

/// Counts a stream against its pooled connection while it lives.
pub struct StreamGuard(Arc<AtomicUsize>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Pool key: source pod (connections leave from its netns, with its IP)
/// and destination address.
type Key = (String, SocketAddrV4);

pub struct Pool {
    certs: Arc<CertManager>,
    conns: Mutex<HashMap<Key, Vec<PooledConn>>>,
}

impl Pool {
    pub fn new(certs: Arc<CertManager>) -> Pool {
        Pool { certs, conns: Mutex::new(HashMap::new()) }
    }

    fn pick(&self, key: &Key) -> Option<(SendRequest<Bytes>, StreamGuard)> {
        let mut conns = self.conns.lock().expect("lock");
        let list = conns.get_mut(key)?;
        list.retain(|c| !c.dead.load(Ordering::Acquire));
        if list.is_empty() {
            conns.remove(key);
            return None;
        }
        let list = conns.get_mut(key)?;
        let c = list.iter().find(|c| c.streams.load(Ordering::Acquire) < MAX_STREAMS_PER_CONN)?;
        c.streams.fetch_add(1, Ordering::AcqRel);
        Some((c.send.clone(), StreamGuard(c.streams.clone())))
    }

    async fn dial(
        &self,
        net: Option<&Arc<NetnsThread>>,
        src: &Identity,
        dst: &Identity,
        addr: SocketAddrV4,
    ) -> Result<PooledConn, HboneError> {
        // From the source pod's netns (ztunnel), or from our own (waypoint).
        let std = match net {
            Some(net) => net.run(sock::outbound)?,
            None => sock::outbound(),
        }
        .map_err(|e| HboneError::Connect(addr, e))?;
        let tcp = transport::connect_socket(std, addr).await.map_err(|e| HboneError::Connect(addr, e))?;
        let cfg = self.certs.client_config(src.clone(), dst.clone())?;
        let connector = tokio_rustls::TlsConnector::from(cfg);
        // The server name is not checked (identities are SPIFFE URIs); the
        // verifier checks the expected identity instead.
        let name = rustls::pki_types::ServerName::try_from("hbone.skiff").expect("valid name");
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| HboneError::Timeout("TLS handshake"))?
            .map_err(|e| HboneError::Tls(addr, e))?;
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Bytes>(tls)
            .await?;
        let dead = Arc::new(AtomicBool::new(false));
        let flag = dead.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "HBONE connection ended");
            }
            flag.store(true, Ordering::Release);
        });
        Ok(PooledConn { send, streams: Arc::new(AtomicUsize::new(0)), dead })
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
        let key: Key = (src_pod.to_owned(), addr);
        let (send, guard) = match self.pick(&key) {
            Some(p) => p,
            None => {
                let c = self.dial(net, src, dst, addr).await?;
                c.streams.fetch_add(1, Ordering::AcqRel);
                let picked = (c.send.clone(), StreamGuard(c.streams.clone()));
                self.conns.lock().expect("lock").entry(key).or_default().push(c);
                picked
            }
        };
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
pub async fn relay(
    tcp: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    tcp_to_stream: &prometheus::IntCounter,
    stream_to_tcp: &prometheus::IntCounter,
) -> (u64, u64) {
    relay_io(tcp, send, recv, tcp_to_stream, stream_to_tcp).await
}

/// [`relay`] over any byte stream (a TCP socket, an in-memory pipe).
pub async fn relay_io<S: tokio::io::AsyncRead + tokio::io::AsyncWrite>(
    io: S,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    tcp_to_stream: &prometheus::IntCounter,
    stream_to_tcp: &prometheus::IntCounter,
) -> (u64, u64) {
    let (mut r, mut w) = tokio::io::split(io);
    let up = async {
        let mut total = 0u64;
        let mut buf = BytesMut::with_capacity(32 * 1024);
        loop {
            buf.reserve(32 * 1024);
            let n = match r.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut chunk = buf.split().freeze();
            while !chunk.is_empty() {
                send.reserve_capacity(chunk.len());
                match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                    Some(Ok(cap)) if cap > 0 => {
                        let part = chunk.split_to(cap.min(chunk.len()));
                        if send.send_data(part, false).is_err() {
                            return total;
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => return total,
                }
            }
            tcp_to_stream.inc_by(n as u64);
            total += n as u64;
        }
        let _ = send.send_data(Bytes::new(), true);
        total
    };
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
/// concurrent streams (twice what a pooled client opens on one connection)
/// and on the request header block.
pub fn server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_STREAMS_PER_CONN as u32 * 2)
        .max_header_list_size(MAX_HEADER_LIST);
    b
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
