//! Running code inside another network namespace.
//!
//! A socket belongs to the netns of the thread that created it, for its whole
//! life. So ztunnel and node-agent create pod-side sockets on a thread that
//! has `setns`'d into the pod's netns, then use them from anywhere.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::Path,
    sync::mpsc,
    thread,
};

use nix::sched::{setns, CloneFlags};

/// Errors from netns operations.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The netns file could not be opened.
    #[error("cannot open network namespace {path}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    /// `setns(2)` failed (not root, or not a netns file).
    #[error("setns into network namespace failed")]
    Setns(#[source] nix::Error),
    /// The worker thread could not be started.
    #[error("cannot start netns thread")]
    Spawn(#[source] io::Error),
    /// The worker thread is gone (its netns could not be entered, or it panicked).
    #[error("netns thread {0} is not running")]
    Gone(String),
}

/// Opens a netns file (`/var/run/netns/NAME`, `/proc/PID/ns/net`).
pub fn open(path: &Path) -> Result<OwnedFd, NetnsError> {
    File::open(path)
        .map(OwnedFd::from)
        .map_err(|source| NetnsError::Open { path: path.display().to_string(), source })
}

/// Runs `f` on a short-lived thread inside the netns `ns`.
pub fn run_in<R: Send>(ns: BorrowedFd<'_>, f: impl FnOnce() -> R + Send) -> Result<R, NetnsError> {
    thread::scope(|s| {
        let h = s.spawn(move || {
            setns(ns, CloneFlags::CLONE_NEWNET).map_err(NetnsError::Setns)?;
            Ok(f())
        });
        h.join().map_err(|_| NetnsError::Gone("scoped".into()))?
    })
}

type Job = Box<dyn FnOnce() + Send>;

/// A long-lived thread parked in one netns, running jobs sent to it: the cheap
/// way to create many sockets in a pod's netns.
pub struct NetnsThread {
    name: String,
    tx: Option<mpsc::Sender<Job>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl NetnsThread {
    pub fn spawn(name: impl Into<String>, ns: OwnedFd) -> Result<Self, NetnsError> {
        let name = name.into();
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let handle = thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn(move || {
                let res = setns(ns.as_fd(), CloneFlags::CLONE_NEWNET);
                let ok = res.is_ok();
                let _ = ready_tx.send(res);
                drop(ns);
                if !ok {
                    return;
                }
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .map_err(NetnsError::Spawn)?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(NetnsError::Setns(e)),
            Err(_) => return Err(NetnsError::Gone(name)),
        }
        Ok(NetnsThread { name, tx: Some(tx), handle: Some(handle) })
    }

    /// Runs `f` in the netns and waits for its result.
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Result<R, NetnsError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.tx
            .as_ref()
            .ok_or_else(|| NetnsError::Gone(self.name.clone()))?
            .send(job)
            .map_err(|_| NetnsError::Gone(self.name.clone()))?;
        rx.recv().map_err(|_| NetnsError::Gone(self.name.clone()))
    }
}

impl Drop for NetnsThread {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Identity of a netns file: (device, inode). Two fds name the same netns
/// exactly when these are equal.
pub fn identity(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(io::Error::from)?;
    Ok((st.st_dev, st.st_ino))
}

/// The calling thread's netns cookie (`SO_NETNS_COOKIE`), the key the eBPF
/// programs use for a pod.
#[allow(unsafe_code)]
pub fn current_cookie() -> io::Result<u64> {
    let sock = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::DGRAM, None)?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid socket fd, a u64 out-buffer and its exact length.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The netns cookie of the netns `ns`.
pub fn cookie_of(ns: BorrowedFd<'_>) -> Result<u64, NetnsError> {
    run_in(ns, current_cookie)?.map_err(|source| NetnsError::Open { path: "SO_NETNS_COOKIE".into(), source })
}
