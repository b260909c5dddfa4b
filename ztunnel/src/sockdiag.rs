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

/// `TCP_LISTEN` in `inet_diag_msg.idiag_state`.
const TCP_LISTEN: u8 = 10;

/// What the kernel answered: a socket message, or an error code
/// (`-ENOENT`: no such socket). The exact lookup falls back to a
/// *listening* socket on the local address when no connection matches
/// (`inet_lookup`), so a socket counts only when it is not listening and
/// its own addresses are exactly the ones asked for: otherwise a forwarded
/// connection whose (SNATed) source port happens to be a port the node
/// listens on (22, 10250) would pass for one the node opened.
fn found(answer: &[u8], local: SocketAddrV4, remote: SocketAddrV4) -> io::Result<bool> {
    let field = |at: usize| answer.get(at..at + 4).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    let kind = answer.get(4..6).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    match kind {
        Some(SOCK_DIAG_BY_FAMILY) => {
            // inet_diag_msg: family, state, timer, retrans, then the sockid.
            let msg = answer.get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4 + 48).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "short sock_diag answer"))?;
            let state = msg[1];
            let id = &msg[4..];
            let exact = id[0..2] == local.port().to_be_bytes()
                && id[2..4] == remote.port().to_be_bytes()
                && id[4..8] == local.ip().octets()
                && id[20..24] == remote.ip().octets();
            Ok(state != TCP_LISTEN && exact)
        }
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
    // The kernel answers at once; this only bounds the worst case (the
    // call runs on an async worker).
    let limit = nix::sys::time::TimeVal::new(0, 200_000);
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &limit)?;
    send(fd.as_raw_fd(), &request(local, remote), MsgFlags::empty())?;
    let mut buf = [0u8; 8192];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
    found(&buf[..n], local, remote)
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
        // The listener's own address with a peer it never had: the kernel's
        // lookup falls back to the listener, which must not count (a
        // forwarded connection whose source port is one the node listens on).
        let listening = v4(l.local_addr().unwrap());
        let stranger: SocketAddrV4 = "127.0.0.9:4321".parse().unwrap();
        assert!(!local_tcp_socket(listening, stranger).unwrap(), "a listener is not a connection the node opened");
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
        let (a, b) = ("10.0.0.1:1".parse().unwrap(), "10.0.0.2:2".parse().unwrap());
        assert!(found(&[0u8; 3], a, b).is_err(), "garbage is an error, never a yes");
        let mut short = vec![0u8; 20];
        short[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        assert!(found(&short, a, b).is_err(), "a truncated socket message is an error, never a yes");
    }
}
