//! Sockets ztunnel creates inside a pod's network namespace. These functions
//! run on the pod's netns thread; the sockets they return work from any
//! thread afterwards.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsRawFd,
};

use skiff_ebpf_common::{MARK_BYPASS, MARK_DELIVER};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Registers a socket ztunnel made as its own, by socket cookie, so the
/// capture programs let it pass (see `set_registrar`).
pub type Registrar = dyn Fn(u64) -> io::Result<()> + Send + Sync;

static REGISTRAR: std::sync::OnceLock<Box<Registrar>> = std::sync::OnceLock::new();

/// Sets how ztunnel's sockets are registered with the capture programs
/// (ztunnel writes their cookies to the pinned `MESH_SOCKS` map). The
/// mesh marks alone are forgeable — any process with CAP_NET_RAW can set
/// SO_MARK — so the programs let a marked socket pass only when it is
/// registered. Once per process; false if already set.
pub fn set_registrar(f: Box<Registrar>) -> bool {
    REGISTRAR.set(f).is_ok()
}

/// The socket's cookie (`SO_COOKIE`): unique for the life of the boot.
#[allow(unsafe_code)]
fn cookie(s: &Socket) -> io::Result<u64> {
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out-buffer of the length passed.
    let rc = unsafe { libc::getsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_COOKIE, (&mut v as *mut u64).cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

fn tcp4() -> io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, Type::STREAM.nonblocking().cloexec(), Some(Protocol::TCP))?;
    // Registered before any bind or connect: a socket that cannot be is
    // not used (it would be captured as the pod's and loop).
    if let Some(register) = REGISTRAR.get() {
        register(cookie(&s)?)?;
    }
    Ok(s)
}

/// A listener on `addr`. The bind carries ztunnel's mark so the bind guard
/// lets it onto a mesh port; the mark is cleared before `listen` so accepted
/// sockets start unmarked (with `tcp_fwmark_accept` they would otherwise
/// inherit it and their replies would be routed back into the pod).
pub fn listener(addr: SocketAddrV4) -> io::Result<std::net::TcpListener> {
    let s = tcp4()?;
    s.set_reuse_address(true)?;
    s.set_mark(MARK_BYPASS)?;
    s.bind(&SockAddr::from(addr))?;
    s.set_mark(0)?;
    s.listen(1024)?;
    Ok(s.into())
}

/// Keepalive idle time and TCP_USER_TIMEOUT of the sockets [`outbound`]
/// makes (`--hbone-keepalive-interval`, `--tcp-user-timeout`); set once at
/// start by [`set_outbound_timeouts`], 30 s and 60 s until then.
static OUTBOUND_TIMEOUTS: std::sync::OnceLock<(std::time::Duration, std::time::Duration)> = std::sync::OnceLock::new();

/// Sets the keepalive idle time and TCP_USER_TIMEOUT of every socket
/// [`outbound`] makes from now on. The first call wins.
pub fn set_outbound_timeouts(keepalive_idle: std::time::Duration, user_timeout: std::time::Duration) {
    let _ = OUTBOUND_TIMEOUTS.set((keepalive_idle, user_timeout));
}

/// TCP keepalive that starts probing after `idle` of silence, every third
/// of it, three times (`limits::tcp_keepalive` puts it on connections).
pub fn keepalive(idle: std::time::Duration) -> socket2::TcpKeepalive {
    use std::time::Duration;
    // The kernel takes 1 to 32767 s (TCP_KEEPIDLE); outside that it would
    // refuse the setting and leave its 2 h default.
    let idle = idle.clamp(Duration::from_secs(3), Duration::from_secs(32767));
    socket2::TcpKeepalive::new().with_time(idle).with_interval((idle / 3).max(Duration::from_secs(1))).with_retries(3)
}

/// An unconnected socket for a connection ztunnel makes on a pod's behalf:
/// leaves the pod with the pod's IP, never captured again.
pub fn outbound() -> io::Result<std::net::TcpStream> {
    let s = tcp4()?;
    s.set_mark(MARK_BYPASS)?;
    s.set_tcp_nodelay(true)?;
    // A peer that vanishes (partition, node loss) is noticed in about a
    // minute instead of the kernel's retransmission timeout (~15 min).
    let (idle, user_timeout) = OUTBOUND_TIMEOUTS
        .get()
        .copied()
        .unwrap_or((std::time::Duration::from_secs(30), std::time::Duration::from_secs(60)));
    s.set_tcp_keepalive(&keepalive(idle))?;
    s.set_tcp_user_timeout(Some(user_timeout))?;
    Ok(s.into())
}

/// An unconnected socket for delivering an inbound connection to the app,
/// bound to the client's IP so the app sees its real peer. The kernel picks
/// the port; it must differ from the client's own port, or the app's socket
/// would have the very 4-tuple of ztunnel's inbound socket.
pub fn delivery(client: SocketAddrV4) -> io::Result<std::net::TcpStream> {
    for _ in 0..8 {
        let s = tcp4()?;
        s.set_ip_transparent_v4(true)?;
        s.set_mark(MARK_DELIVER)?;
        s.set_tcp_nodelay(true)?;
        s.bind(&SockAddr::from(SocketAddrV4::new(*client.ip(), 0)))?;
        let port = s.local_addr()?.as_socket().map(|a| a.port()).unwrap_or(0);
        if port != client.port() {
            return Ok(s.into());
        }
    }
    Err(io::Error::new(io::ErrorKind::AddrInUse, "no delivery port distinct from the client's"))
}

/// The destination a captured connection was addressed to, from
/// `SO_ORIGINAL_DST` (answered by Skiff's getsockopt program, or by
/// netfilter behind iptables REDIRECT).
#[allow(unsafe_code)]
pub fn original_dst(sock: &impl AsRawFd) -> io::Result<SocketAddrV4> {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: valid fd, out-buffer of the length passed.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if addr.sin_family != libc::AF_INET as libc::sa_family_t {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "SO_ORIGINAL_DST returned a non-IPv4 address"));
    }
    Ok(SocketAddrV4::new(Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)), u16::from_be(addr.sin_port)))
}

pub fn v4(addr: SocketAddr) -> Option<SocketAddrV4> {
    match addr {
        SocketAddr::V4(a) => Some(a),
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().map(|ip| SocketAddrV4::new(ip, a.port())),
    }
}
