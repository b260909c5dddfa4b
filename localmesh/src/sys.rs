//! Thin wrappers over the host tools and kernel interfaces the local mesh
//! uses: `ip`, cgroup v2, bpffs, processes.

use std::{
    fs,
    io::Write as _,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("running `ip` (iproute2)")?;
    if !out.status.success() {
        bail!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Runs `ip -n NETNS ARGS`.
pub fn ip_in(netns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    ip(&all)
}

/// Writes a sysctl inside a netns (`ip netns exec` gives the command its
/// own /proc/sys/net view).
pub fn sysctl_in(netns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "sysctl", "-q", "-w", &format!("{key}={value}")])
        .output()
        .context("running sysctl")?;
    if !out.status.success() {
        bail!("sysctl {key}={value} in {netns}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    text.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2").then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .context("no cgroup2 filesystem mounted (the local mesh needs cgroup v2 for eBPF capture)")
}

/// Kills every process in a cgroup (and below) and removes the cgroup tree.
pub fn cgroup_destroy(path: &Path) {
    if !path.exists() {
        return;
    }
    // cgroup.kill (5.14+) kills the whole subtree at once, without races.
    let _ = fs::write(path.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match remove_cgroup_tree(path) {
            Ok(()) => return,
            Err(e) if Instant::now() >= deadline => {
                tracing::warn!(cgroup = %path.display(), error = %e, "cgroup not removed");
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn remove_cgroup_tree(path: &Path) -> std::io::Result<()> {
    for e in fs::read_dir(path)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            remove_cgroup_tree(&e.path())?;
        }
    }
    match fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// How a process is placed.
pub struct Placement<'a> {
    /// Network namespace name under /var/run/netns.
    pub netns: &'a str,
    /// cgroup directory the process joins before it starts.
    pub cgroup: &'a Path,
    /// `ip netns exec` (own mount namespace with /etc/netns/NAME files over
    /// /etc: per-pod hosts and resolv.conf) or `nsenter --net` (keeps the
    /// host's mounts: cgroup2 and bpffs stay visible, for node processes).
    pub pod_view: bool,
    /// Without `pod_view`: a hosts file bound over /etc/hosts in the
    /// process's own mount namespace (the node's view of names: the
    /// outside host's, as a node in a cluster resolves public names).
    pub hosts: Option<&'a Path>,
}

/// Builds a command that runs `argv` in the placement's netns and cgroup.
pub fn command(place: &Placement<'_>, argv: &[String], env: &[(String, String)]) -> anyhow::Result<Command> {
    let procs = fs::OpenOptions::new()
        .write(true)
        .open(place.cgroup.join("cgroup.procs"))
        .with_context(|| format!("opening {}/cgroup.procs", place.cgroup.display()))?;
    let mut cmd = if place.pod_view {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", place.netns]);
        c
    } else {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/var/run/netns/{}", place.netns)).arg("--");
        if let Some(hosts) = place.hosts {
            // A mount namespace of its own (a copy: cgroup2 and bpffs stay
            // visible) whose /etc/hosts is the node's. Slave propagation:
            // mounts made on the machine later still appear in it (a pod's
            // netns, bound under /var/run/netns when the pod is made, which
            // node-agent enters; private, it would see an empty file and
            // setns would fail), and nothing mounted in it goes back.
            c.args(["unshare", "--mount", "--propagation", "slave", "--", "/bin/sh", "-c", "mount --bind \"$0\" /etc/hosts && exec \"$@\""]);
            c.arg(hosts);
        }
        c
    };
    cmd.args(argv);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null());
    let raw = std::os::fd::AsRawFd::as_raw_fd(&procs);
    #[allow(unsafe_code)]
    // SAFETY: the closure runs between fork and exec and only calls
    // async-signal-safe functions (write, setpgid) on an fd opened before
    // the fork; `procs` is moved in so the fd stays open until then.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &procs;
            // "0" moves the writing process: the child joins before exec.
            if libc::write(raw, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            libc::setpgid(0, 0);
            // If the harness dies without tearing down, its processes die too.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    Ok(cmd)
}

/// Spawns a command with stdout and stderr appended to `log`.
pub fn spawn_logged(mut cmd: Command, log: &Path) -> anyhow::Result<Child> {
    let f = fs::OpenOptions::new().create(true).append(true).open(log).with_context(|| format!("opening {}", log.display()))?;
    let f2 = f.try_clone()?;
    cmd.stdout(f).stderr(f2);
    cmd.spawn().with_context(|| format!("starting {:?}", cmd.get_program()))
}

/// Stops a child: SIGTERM, then SIGKILL after `grace`.
pub fn stop_child(child: &mut Child, grace: Duration) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Writes a file atomically (temp file in the same dir, then rename), so a
/// watcher never reads half a manifest.
pub fn write_atomic(path: &Path, contents: &str) -> anyhow::Result<()> {
    let dir = path.parent().context("path without parent")?;
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("f")));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    Ok(())
}

/// A run id unique enough to tell concurrent runs apart on one machine.
pub fn run_id() -> String {
    let mut buf = [0u8; 4];
    if let Ok(mut f) = fs::File::open("/dev/urandom") {
        use std::io::Read as _;
        let _ = f.read_exact(&mut buf);
    }
    let r = u32::from_ne_bytes(buf) ^ std::process::id();
    format!("{:06x}", r & 0xffffff)
}

/// Mounts a private bpffs instance at `dir` (each mount is its own
/// instance: pins in it are this run's alone and vanish on unmount).
pub fn mount_bpffs(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir)?;
    nix::mount::mount(Some("bpf"), dir, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .with_context(|| format!("mounting bpffs at {}", dir.display()))
}

pub fn unmount(dir: &Path) {
    if let Err(e) = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH) {
        tracing::warn!(path = %dir.display(), error = %e, "unmount failed");
    }
}
