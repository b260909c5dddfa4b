//! The node-agent → ztunnel protocol ("ZDS", after Istio's ztunnel discovery
//! service, which it follows in spirit).
//!
//! A Unix `SOCK_SEQPACKET` socket: every message is one datagram holding one
//! JSON object, so message boundaries and the file descriptor that travels
//! with an `Add` (SCM_RIGHTS) can never be mixed up. ztunnel listens;
//! node-agent connects. Each request gets exactly one response.
//!
//! Session: `Hello`, then one `Add` per enrolled pod (with its netns fd),
//! then `SnapshotSent`; from then on `Add` / `Del` as pods come and go. On
//! `SnapshotSent` ztunnel drops every pod it did not hear about in this
//! session, so both sides agree after either one restarts.

use std::{
    collections::BTreeMap,
    io::{IoSlice, IoSliceMut},
    net::Ipv4Addr,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
    time::Duration,
};

use nix::sys::socket::{
    self, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use serde::{Deserialize, Serialize};

/// Protocol version carried in `Hello`; a mismatch is refused.
pub const VERSION: u32 = 1;
/// Largest message accepted.
const MAX_MESSAGE: usize = 64 * 1024;

/// What node-agent tells ztunnel about an enrolled pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub workload_name: String,
    pub service_account: String,
    pub node: String,
    pub ip: Ipv4Addr,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Request {
    /// First message of a session.
    Hello { version: u32, node: String },
    /// A pod is enrolled; its netns fd travels with the message.
    Add { workload: WorkloadInfo },
    /// A pod is no longer enrolled.
    Del { uid: String },
    /// Every enrolled pod has been sent in this session.
    SnapshotSent,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Response {
    Ack,
    Error { message: String },
}

/// Protocol errors.
#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    /// A socket call failed.
    #[error("{call} on the node-agent/ztunnel socket failed")]
    Io {
        call: &'static str,
        #[source]
        source: nix::Error,
    },
    /// The peer closed the connection.
    #[error("peer closed the connection")]
    Closed,
    /// The message is not valid JSON for this protocol.
    #[error("malformed message")]
    Malformed(#[source] serde_json::Error),
    /// A message was larger than the protocol allows.
    #[error("message of {0} bytes is too large")]
    TooLarge(usize),
    /// A peer that is neither root nor this process's user connected.
    #[error("peer with uid {0} is not allowed")]
    Unauthorized(u32),
    /// The message carried the wrong number of file descriptors.
    #[error("expected {expected} file descriptor(s), got {got}")]
    Fds { expected: usize, got: usize },
}

fn io(call: &'static str) -> impl FnOnce(nix::Error) -> ZdsError {
    move |source| ZdsError::Io { call, source }
}

/// One end of a ZDS connection.
pub struct Conn {
    fd: OwnedFd,
}

impl From<OwnedFd> for Conn {
    /// A connection over an already connected `SOCK_SEQPACKET` socket (a
    /// socketpair in tests and the fuzz target).
    fn from(fd: OwnedFd) -> Conn {
        Conn { fd }
    }
}

impl Conn {
    /// Connects to ztunnel's socket.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Conn, ZdsError> {
        let fd = socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)
            .map_err(io("socket"))?;
        let addr = UnixAddr::new(path).map_err(io("socket path"))?;
        let tv = nix::sys::time::TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _);
        // The send timeout also bounds connect() when the listener's backlog
        // is full (a stuck ztunnel must not hang node-agent).
        socket::setsockopt(&fd, socket::sockopt::SendTimeout, &tv).map_err(io("setsockopt"))?;
        socket::setsockopt(&fd, socket::sockopt::ReceiveTimeout, &tv).map_err(io("setsockopt"))?;
        socket::connect(fd.as_raw_fd(), &addr).map_err(io("connect"))?;
        Ok(Conn { fd })
    }

    /// Sends one message, with an optional fd.
    pub fn send<T: Serialize>(&self, msg: &T, fd: Option<BorrowedFd<'_>>) -> Result<(), ZdsError> {
        let body = serde_json::to_vec(msg).map_err(ZdsError::Malformed)?;
        if body.len() > MAX_MESSAGE {
            return Err(ZdsError::TooLarge(body.len()));
        }
        let fds: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        socket::sendmsg::<()>(self.fd.as_raw_fd(), &[IoSlice::new(&body)], cmsgs, MsgFlags::MSG_NOSIGNAL, None)
            .map_err(io("sendmsg"))?;
        Ok(())
    }

    /// Receives one message and the fds that came with it.
    pub fn recv<T: for<'de> Deserialize<'de>>(&self) -> Result<(T, Vec<OwnedFd>), ZdsError> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut cmsg_buf = nix::cmsg_space!([RawFd; 4]);
        let (len, fds, truncated) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = socket::recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg_buf),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(io("recvmsg"))?;
            let mut fds = Vec::new();
            for c in msg.cmsgs().map_err(io("recvmsg"))? {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    // SAFETY: the kernel just installed these descriptors in
                    // our table for us; nothing else owns them.
                    #[allow(unsafe_code)]
                    fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
                }
            }
            (msg.bytes, fds, msg.flags.contains(MsgFlags::MSG_TRUNC))
        };
        if truncated {
            return Err(ZdsError::TooLarge(len));
        }
        if len == 0 {
            return Err(ZdsError::Closed);
        }
        let msg = serde_json::from_slice(&buf[..len]).map_err(ZdsError::Malformed)?;
        Ok((msg, fds))
    }

    /// True when the peer has closed the connection (or sent something
    /// unsolicited, which this protocol never does). Does not block.
    pub fn peer_gone(&self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(0) => false,
            Ok(_) => true,
            Err(_) => true,
        }
    }

    /// Sends a request and waits for its response.
    pub fn call(&self, req: &Request, fd: Option<BorrowedFd<'_>>) -> Result<Response, ZdsError> {
        self.send(req, fd)?;
        let (resp, _) = self.recv::<Response>()?;
        Ok(resp)
    }
}

/// ztunnel's listening socket.
pub struct Listener {
    fd: OwnedFd,
}

impl Listener {
    /// Binds `path`, replacing a stale socket file left by a previous run.
    pub fn bind(path: &Path) -> Result<Listener, ZdsError> {
        let _ = std::fs::remove_file(path);
        let fd = socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)
            .map_err(io("socket"))?;
        let addr = UnixAddr::new(path).map_err(io("socket path"))?;
        socket::bind(fd.as_raw_fd(), &addr).map_err(io("bind"))?;
        socket::listen(&fd, socket::Backlog::new(4).expect("valid backlog")).map_err(io("listen"))?;
        Ok(Listener { fd })
    }

    /// Accepts the next peer. Only root (or this process's own user) may
    /// hand ztunnel network namespaces.
    pub fn accept(&self) -> Result<Conn, ZdsError> {
        let raw = socket::accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC).map_err(io("accept"))?;
        // SAFETY: accept4 returned a new descriptor that we now own.
        #[allow(unsafe_code)]
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let cred = socket::getsockopt(&fd, socket::sockopt::PeerCredentials).map_err(io("SO_PEERCRED"))?;
        let me = nix::unistd::geteuid().as_raw();
        if cred.uid() != 0 && cred.uid() != me {
            return Err(ZdsError::Unauthorized(cred.uid()));
        }
        Ok(Conn { fd })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn request_with_fd_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("zds.sock");
        let listener = Listener::bind(&path).unwrap();
        let client = Conn::connect(&path, Duration::from_secs(5)).unwrap();
        let server = listener.accept().unwrap();
        let w = WorkloadInfo {
            uid: "u1".into(),
            namespace: "ns".into(),
            name: "p".into(),
            workload_name: "p".into(),
            service_account: "sa".into(),
            node: "n1".into(),
            ip: "10.0.0.1".parse().unwrap(),
            labels: BTreeMap::new(),
        };
        let file = std::fs::File::open("/proc/self/ns/net").unwrap();
        client.send(&Request::Add { workload: w.clone() }, Some(file.as_fd())).unwrap();
        let (req, fds) = server.recv::<Request>().unwrap();
        assert_eq!(req, Request::Add { workload: w });
        assert_eq!(fds.len(), 1);
        assert_eq!(
            crate::netns::identity(fds[0].as_fd()).unwrap(),
            crate::netns::identity(file.as_fd()).unwrap()
        );
        server.send(&Response::Ack, None).unwrap();
        assert_eq!(client.recv::<Response>().unwrap().0, Response::Ack);
        drop(server);
        assert!(matches!(client.recv::<Response>(), Err(ZdsError::Closed)));
        let _ = std::fs::remove_file(&path);
    }
}
