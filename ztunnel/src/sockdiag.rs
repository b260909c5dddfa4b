//! Whether a TCP connection was opened from this network namespace (the
//! node's: ztunnel runs there): an exact `sock_diag` (`NETLINK_SOCK_DIAG`,
//! `inet_diag_req_v2`) lookup of the socket with that local and remote
//! address. kubelet's probe connections have such a socket on the node;
//! traffic the node only forwards and SNATs to the node's address (a
//! NodePort, a LoadBalancer with `externalTrafficPolicy: Cluster`) has a
//! conntrack entry but no socket, so it cannot pass for a probe.

use std::{io, net::SocketAddrV4, os::fd::AsRawFd};

use nix::sys::socket::{recv, send, socket, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDRLEN: usize = 16;
/// `sizeof(struct inet_diag_req_v2)`: family, protocol, ext, pad (1 byte
/// each), states (u32), then `inet_diag_sockid` (48 bytes).
const REQ_LEN: usize = 56;
const INET_DIAG_NOCOOKIE: u32 = !0;

/// The request for the TCP socket whose own address is `local` and whose
/// peer is `remote`.
fn request(local: SocketAddrV4, remote: SocketAddrV4) -> Vec<u8> {
    let mut m = Vec::with_capacity(NLMSG_HDRLEN + REQ_LEN);
    m.extend(((NLMSG_HDRLEN + REQ_LEN) as u32).to_ne_bytes());
    m.extend(SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend(NLM_F_REQUEST.to_ne_bytes()); // one socket, not a dump
    m.extend(1u32.to_ne_bytes()); // sequence
    m.extend(0u32.to_ne_bytes()); // port id: the kernel
    m.extend([libc::AF_INET as u8, libc::IPPROTO_TCP as u8, 0, 0]);
    m.extend((!0u32).to_ne_bytes()); // any state
    // inet_diag_sockid: ports and addresses in network order.
    m.extend(local.port().to_be_bytes());
    m.extend(remote.port().to_be_bytes());
    for ip in [local.ip(), remote.ip()] {
        m.extend(ip.octets());
        m.extend([0u8; 12]);
    }
    m.extend(0u32.to_ne_bytes()); // any interface
    m.extend(INET_DIAG_NOCOOKIE.to_ne_bytes());
    m.extend(INET_DIAG_NOCOOKIE.to_ne_bytes());
    m
}

/// What the kernel answered: a socket message (found), or an error code
/// (`-ENOENT`: no such socket).
fn found(answer: &[u8]) -> io::Result<bool> {
    let field = |at: usize| answer.get(at..at + 4).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    let kind = answer.get(4..6).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    match kind {
        Some(SOCK_DIAG_BY_FAMILY) => Ok(true),
        Some(NLMSG_ERROR) => match field(NLMSG_HDRLEN).map(|e| e as i32) {
            Some(e) if e == -libc::ENOENT => Ok(false),
            Some(e) => Err(io::Error::from_raw_os_error(-e)),
            None => Err(io::Error::new(io::ErrorKind::InvalidData, "short netlink error message")),
        },
        _ => Err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected netlink answer of {} bytes", answer.len()))),
    }
}

/// Whether this network namespace has a TCP socket bound to `local` and
/// connected to `remote`.
pub fn local_tcp_socket(local: SocketAddrV4, remote: SocketAddrV4) -> io::Result<bool> {
    let fd = socket(AddressFamily::Netlink, SockType::Datagram, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkSockDiag)?;
    send(fd.as_raw_fd(), &request(local, remote), MsgFlags::empty())?;
    let mut buf = [0u8; 8192];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
    found(&buf[..n])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_made_here_is_found_and_a_made_up_one_is_not() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let v4 = |a: std::net::SocketAddr| match a {
            std::net::SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        let (local, remote) = (v4(c.local_addr().unwrap()), v4(c.peer_addr().unwrap()));
        assert!(local_tcp_socket(local, remote).unwrap(), "the client's own socket");
        assert!(local_tcp_socket(remote, local).unwrap(), "the accepted socket, seen from its side");
        let other = SocketAddrV4::new(*local.ip(), local.port().wrapping_add(1).max(1));
        assert!(!local_tcp_socket(other, remote).unwrap(), "no socket has that address");
        drop((c, s));
    }

    #[test]
    fn the_request_has_the_kernel_layout() {
        let r = request("10.0.0.1:40000".parse().unwrap(), "10.0.0.2:8080".parse().unwrap());
        assert_eq!(r.len(), 72);
        assert_eq!(&r[24..26], &40000u16.to_be_bytes(), "sport");
        assert_eq!(&r[26..28], &8080u16.to_be_bytes(), "dport");
        assert_eq!(&r[28..32], &[10, 0, 0, 1], "src");
        assert_eq!(&r[44..48], &[10, 0, 0, 2], "dst");
        assert!(found(&[0u8; 3]).is_err(), "garbage is an error, never a yes");
    }
}
