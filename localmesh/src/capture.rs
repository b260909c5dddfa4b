//! A packet capture on the link between the nodes (an `AF_PACKET` socket in
//! the fabric netns), so tests can check what actually crosses the wire.
#![allow(unsafe_code)]

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
};

use anyhow::Context as _;

/// One captured IPv4 TCP segment.
#[derive(Clone, Debug)]
pub struct TcpPacket {
    pub src: std::net::SocketAddrV4,
    pub dst: std::net::SocketAddrV4,
    pub payload: Vec<u8>,
}

/// A running capture; `stop` returns what it saw.
pub struct Capture {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<Vec<TcpPacket>>>,
}

fn parse(frame: &[u8]) -> Option<TcpPacket> {
    // Ethernet II, IPv4, TCP.
    if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[14..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if ip[0] >> 4 != 4 || ip[9] != 6 || ip.len() < ihl + 20 {
        return None;
    }
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let ip = &ip[..total.min(ip.len())];
    let tcp = &ip[ihl..];
    let doff = ((tcp[12] >> 4) as usize) * 4;
    if tcp.len() < doff {
        return None;
    }
    let a = |o: usize| std::net::Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]);
    let p = |o: usize| u16::from_be_bytes([tcp[o], tcp[o + 1]]);
    Some(TcpPacket {
        src: std::net::SocketAddrV4::new(a(12), p(0)),
        dst: std::net::SocketAddrV4::new(a(16), p(2)),
        payload: tcp[doff..].to_vec(),
    })
}

impl Capture {
    /// Starts capturing every frame on the interface `ifname` of the netns
    /// at `netns_path` (`None`: every interface there).
    pub fn start(netns_path: &Path, ifname: Option<&str>) -> anyhow::Result<Capture> {
        let ns = skiff_core::netns::open(netns_path)?;
        let ifname = ifname.map(std::ffi::CString::new).transpose()?;
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = thread::spawn(move || {
            let sock = (|| -> std::io::Result<OwnedFd> {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
                // SAFETY: plain socket(2); the result is checked.
                let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (libc::ETH_P_ALL as u16).to_be() as i32) };
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: fd is a new descriptor we own.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                let index = match &ifname {
                    // SAFETY: valid C string.
                    Some(name) => match unsafe { libc::if_nametoindex(name.as_ptr()) } {
                        0 => return Err(std::io::Error::last_os_error()),
                        i => i,
                    },
                    None => 0,
                };
                // SAFETY: sockaddr_ll is plain data.
                let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
                sll.sll_ifindex = index as i32;
                // SAFETY: valid fd and address of the size given.
                let rc = unsafe {
                    libc::bind(fd.as_raw_fd(), (&sll as *const libc::sockaddr_ll).cast(), std::mem::size_of::<libc::sockaddr_ll>() as u32)
                };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
                // SAFETY: valid fd and option value.
                unsafe {
                    libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&tv as *const libc::timeval).cast(), std::mem::size_of::<libc::timeval>() as u32);
                }
                Ok(fd)
            })();
            let fd = match sock {
                Ok(fd) => {
                    let _ = tx.send(Ok(()));
                    fd
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return Vec::new();
                }
            };
            let mut out = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !flag.load(Ordering::Acquire) {
                // SAFETY: valid fd and buffer.
                let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    if let Some(p) = parse(&buf[..n as usize]) {
                        out.push(p);
                    }
                }
            }
            out
        });
        rx.recv().context("capture thread")?.context("opening the packet capture")?;
        Ok(Capture { stop, handle: Some(handle) })
    }

    /// Stops and returns the TCP segments seen.
    pub fn stop(mut self) -> Vec<TcpPacket> {
        self.stop.store(true, Ordering::Release);
        self.handle.take().and_then(|h| h.join().ok()).unwrap_or_default()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
