//! How ztunnel reaches the far side of a connection. This is the seam the
//! HBONE (HTTP/2 CONNECT over mutual TLS) transport plugs into; today the one
//! transport is plain TCP from inside the source pod's netns.

use std::{io, net::SocketAddrV4, sync::Arc, time::Duration};

use skiff_core::netns::NetnsThread;
use tokio::net::{TcpSocket, TcpStream};

use crate::sock;

/// Transports ztunnel can use to reach a destination.
#[derive(Clone, Copy, Debug, Default)]
pub enum Transport {
    /// Plain TCP, from the source pod's netns with the pod's IP.
    #[default]
    PlainTcp,
}

/// Connection attempts give up after this long, by default
/// (`--connect-timeout`).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Transport {
    /// Connects to `dst` on behalf of the pod whose netns thread is `net`.
    pub async fn connect(&self, net: &Arc<NetnsThread>, dst: SocketAddrV4, timeout: Duration) -> io::Result<TcpStream> {
        match self {
            Transport::PlainTcp => {
                let std = net.run(sock::outbound).map_err(io::Error::other)??;
                connect_socket(std, dst, timeout).await
            }
        }
    }

}

/// Waits for the next connection on `listener`. An accept error (out of
/// file descriptors, a connection reset before it was taken) is logged and
/// retried after a pause, so a server never spins on it nor stops.
pub async fn accept(listener: &tokio::net::TcpListener, what: &'static str) -> (TcpStream, std::net::SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(c) => return c,
            Err(e) => {
                tracing::warn!(server = what, error = %e, "accepting a connection failed; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Connects an unconnected socket made in a pod's netns, with a timeout.
pub async fn connect_socket(std: std::net::TcpStream, dst: SocketAddrV4, timeout: Duration) -> io::Result<TcpStream> {
    let socket = TcpSocket::from_std_stream(std);
    match tokio::time::timeout(timeout, socket.connect(dst.into())).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}
