//! node-agent's side of the CNI plugin: the socket `skiff-cni` talks to,
//! installing the plugin into the node's CNI chain (and keeping it there),
//! the published list of enrolled namespaces, and uninstall.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt as _, net::UnixListener},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread,
    time::Duration,
};

use skiff_cni::{
    conflist::{self, ConfError, Installed},
    proto::{Reply, Request, State},
};
use tracing::{error, info, warn};

use crate::{
    locate::{AnnotatedNetns, Chain, CniNetns, NetnsLocator, ProcNetns},
    sandbox::SharedCni,
};

/// Errors setting up the CNI side.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// The socket could not be created.
    #[error("cannot listen on CNI socket {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Copying the plugin binary failed.
    #[error("cannot install the CNI plugin {from} into {to}")]
    Install {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Removing an installed file failed.
    #[error("cannot remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Editing the CNI configuration failed.
    #[error("CNI configuration")]
    Conf(#[from] ConfError),
}

/// A request from the plugin, with where to send the answer.
pub struct CniEvent {
    pub req: Request,
    pub reply: mpsc::SyncSender<Reply>,
}

/// How long a plugin connection may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the socket thread waits for the agent's decision. The agent
/// answers within its own bounded wait (`--cni-wait`) plus one enrollment.
const DECISION_TIMEOUT: Duration = Duration::from_secs(30);

/// Listens on `path` (mode 0600: only root on the node may talk to it) and
/// forwards each request to the agent loop.
pub fn serve(path: &Path, tx: mpsc::Sender<CniEvent>) -> Result<(), CniError> {
    let listen = |source| CniError::Listen { path: path.to_owned(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(listen)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(listen(e)),
        _ => {}
    }
    let listener = UnixListener::bind(path).map_err(listen)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(listen)?;
    let shown = path.display().to_string();
    thread::Builder::new()
        .name("cni-socket".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let conn = match conn {
                    Ok(c) => c,
                    Err(e) => {
                        error!(socket = %shown, error = %e, "CNI socket accept failed");
                        thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                let tx = tx.clone();
                let _ = thread::Builder::new().name("cni-conn".into()).spawn(move || handle(conn, tx));
            }
        })
        .map_err(listen)?;
    Ok(())
}

fn handle(conn: std::os::unix::net::UnixStream, tx: mpsc::Sender<CniEvent>) {
    let _ = conn.set_read_timeout(Some(READ_TIMEOUT));
    let mut line = String::new();
    if BufReader::new(&conn).read_line(&mut line).is_err() {
        return;
    }
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(req) => {
            let (rtx, rrx) = mpsc::sync_channel(1);
            if tx.send(CniEvent { req, reply: rtx }).is_err() {
                Reply::Failed { message: "node-agent is shutting down".into() }
            } else {
                rrx.recv_timeout(DECISION_TIMEOUT).unwrap_or_else(|_| Reply::Failed {
                    message: format!("node-agent did not decide within {DECISION_TIMEOUT:?}"),
                })
            }
        }
        Err(e) => Reply::Failed { message: format!("invalid request: {e}") },
    };
    let mut out = serde_json::to_vec(&reply).expect("replies serialize");
    out.push(b'\n');
    let _ = (&conn).write_all(&out);
}

/// The plugin's entry in the CNI chain.
pub fn plugin_entry(socket: &Path, state_file: &Path) -> String {
    serde_json::json!({
        "type": skiff_cni::PLUGIN_TYPE,
        "agentSocket": socket,
        "stateFile": state_file,
    })
    .to_string()
}

/// Copies the plugin binary into the CNI bin dir, atomically (a runtime may
/// exec it at any moment).
pub fn install_plugin(from: &Path, bin_dir: &Path) -> Result<PathBuf, CniError> {
    let to = bin_dir.join(skiff_cni::PLUGIN_TYPE);
    let err = |source| CniError::Install { from: from.to_owned(), to: to.clone(), source };
    std::fs::create_dir_all(bin_dir).map_err(err)?;
    let tmp = bin_dir.join(format!(".{}.skiff-tmp-{}", skiff_cni::PLUGIN_TYPE, std::process::id()));
    let res = std::fs::copy(from, &tmp)
        .and_then(|_| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)))
        .and_then(|_| std::fs::rename(&tmp, &to));
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(to)
}

/// Keeps the plugin in the primary CNI config: checks now, then every
/// `interval` until `stop` (the primary CNI may rewrite its file at any
/// time, e.g. on its own restart). Returns after the first check.
pub fn keep_chained(conf_dir: PathBuf, entry: String, interval: Duration, stop: Arc<AtomicBool>) -> Result<(), CniError> {
    let check = move |quiet_missing: &mut bool| match conflist::ensure_installed(&conf_dir, &entry) {
        Ok(Installed::AlreadyThere(_)) => {}
        Ok(Installed::Inserted(p)) => info!(file = %p.display(), "skiff-cni added to the CNI chain"),
        Ok(Installed::Converted(p)) => info!(file = %p.display(), "CNI config converted to a conflist with skiff-cni chained"),
        Err(ConfError::NoPrimary(d)) => {
            if !*quiet_missing {
                warn!(dir = %d.display(), "no CNI config yet (primary CNI not installed?); will chain skiff-cni when it appears");
                *quiet_missing = true;
            }
        }
        Err(e) => error!(error = %skiff_core::report(&e), "cannot chain skiff-cni into the CNI config"),
    };
    let mut quiet = false;
    check(&mut quiet);
    thread::Builder::new()
        .name("cni-conf".into())
        .spawn(move || {
            let mut quiet = quiet;
            while !stop.load(Ordering::Relaxed) {
                thread::sleep(interval);
                check(&mut quiet);
            }
        })
        .map_err(|source| CniError::Listen { path: PathBuf::from("cni-conf thread"), source })?;
    Ok(())
}

/// Publishes the enrolled namespaces for the plugin (atomically).
pub fn write_state(path: &Path, enrolled_namespaces: Vec<String>) -> Result<(), CniError> {
    write(path, &State { enrolled_namespaces, unsynced: false })
}

fn write(path: &Path, state: &State) -> Result<(), CniError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| CniError::Remove { path: dir.to_owned(), source })?;
    }
    let text = serde_json::to_vec(state).expect("state serializes");
    conflist::write_atomic(path, &text, 0o644)?;
    Ok(())
}

/// Before the plugin is chained: makes sure a state file exists, so that a
/// chained plugin finding none knows the state was lost. A readable file
/// (the last list published, e.g. before a restart) is kept; a missing or
/// corrupt one is replaced by an "unsynced" state (every namespace but
/// kube-system and skiff-system fails closed until node-agent publishes).
/// Returns why it was written, if it was.
pub fn ensure_state(path: &Path) -> Result<Option<String>, CniError> {
    match skiff_cni::proto::read_state(path) {
        Ok(_) => Ok(None),
        Err(why) => {
            write(path, &State { enrolled_namespaces: Vec::new(), unsynced: true })?;
            Ok(Some(why))
        }
    }
}

/// Takes the plugin out of the CNI chain and removes its binary and state
/// file. Safe to run again.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path, state_file: &Path) -> Result<Vec<PathBuf>, CniError> {
    // Chain first: the runtime must stop calling the plugin before it goes.
    let mut changed = conflist::uninstall(conf_dir)?;
    for p in [bin_dir.join(skiff_cni::PLUGIN_TYPE), state_file.to_owned()] {
        match std::fs::remove_file(&p) {
            Ok(()) => changed.push(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(CniError::Remove { path: p, source }),
        }
    }
    Ok(changed)
}

/// Where the CNI pieces live on the node (flags shared by `run` and `uninstall`).
#[derive(clap::Args, Clone, Debug)]
pub struct CniPaths {
    /// Directory the container runtime execs CNI plugins from.
    #[arg(long, default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// Directory of the runtime's CNI network configs (the lexically first
    /// one is the one in use, and the one Skiff chains itself into).
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// Where node-agent publishes the enrolled namespaces for the plugin.
    #[arg(long, default_value = skiff_cni::DEFAULT_STATE_FILE)]
    pub cni_state_file: PathBuf,
}

/// Ways of finding a pod's netns (`--netns-from`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetnsFrom {
    /// The netns `skiff-cni` reported for the pod's sandbox.
    Cni,
    /// The local mesh's `local.skiff.dev/netns` annotation.
    Annotation,
    /// Scan /proc for a netns holding the pod's IP (pods from before install).
    Proc,
}

/// `run`'s CNI flags.
#[derive(clap::Args, Clone, Debug)]
pub struct CniArgs {
    #[command(flatten)]
    pub paths: CniPaths,
    /// The socket `skiff-cni` talks to (mode 0600).
    #[arg(long, default_value = skiff_cni::DEFAULT_SOCKET)]
    pub cni_socket: PathBuf,
    /// The plugin binary to install (default: `skiff-cni` next to this binary).
    #[arg(long)]
    pub cni_plugin: Option<PathBuf>,
    /// Listen for the plugin, but neither install it nor edit the CNI config.
    #[arg(long)]
    pub no_cni_install: bool,
    /// How long a CNI ADD waits for a pod the config source does not show yet.
    #[arg(long, default_value_t = 5)]
    pub cni_wait_seconds: u64,
    /// Where to look for a pod's netns, in order.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "cni,annotation,proc")]
    pub netns_from: Vec<NetnsFrom>,
}

/// The CNI plugin's link to the agent loop.
pub struct CniLink {
    /// Requests from the plugin (via the socket thread).
    pub events: mpsc::Receiver<CniEvent>,
    /// What the plugin reported, shared with the [`CniNetns`] locator.
    pub state: SharedCni,
    /// Where the enrolled namespaces are published for the plugin.
    pub state_file: Option<PathBuf>,
    /// How long an ADD for a pod the config source does not show yet waits
    /// for it before answering.
    pub wait: Duration,
}

/// What [`start`] set up for the agent.
pub struct Started {
    pub locator: Box<dyn NetnsLocator>,
    pub link: CniLink,
}

/// Listens for the plugin, installs and chains it (unless told not to), and
/// builds the netns locator chain.
pub fn start(args: &CniArgs, stop: Arc<AtomicBool>) -> Result<Started, CniError> {
    let state: SharedCni = Default::default();
    let (tx, rx) = mpsc::channel();
    serve(&args.cni_socket, tx)?;
    // The state file exists before the plugin can run (see ensure_state).
    if let Some(why) = ensure_state(&args.paths.cni_state_file)? {
        info!(file = %args.paths.cni_state_file.display(), %why,
            "CNI state file written as unsynced: ADDs outside kube-system/skiff-system fail until the cluster is read");
    }
    if !args.no_cni_install {
        let from = match &args.cni_plugin {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .map(|e| e.with_file_name(skiff_cni::PLUGIN_TYPE))
                .map_err(|source| CniError::Install { from: "current exe".into(), to: args.paths.cni_bin_dir.clone(), source })?,
        };
        let to = install_plugin(&from, &args.paths.cni_bin_dir)?;
        info!(plugin = %to.display(), "CNI plugin installed");
        let entry = plugin_entry(&args.cni_socket, &args.paths.cni_state_file);
        keep_chained(args.paths.cni_conf_dir.clone(), entry, Duration::from_secs(2), stop)?;
    }
    let mut locators: Vec<(&'static str, Box<dyn NetnsLocator>)> = Vec::new();
    for f in &args.netns_from {
        match f {
            NetnsFrom::Cni => locators.push(("cni", Box::new(CniNetns(state.clone())))),
            NetnsFrom::Annotation => locators.push(("annotation", Box::new(AnnotatedNetns))),
            NetnsFrom::Proc => locators.push(("proc", Box::new(ProcNetns::default()))),
        }
    }
    let locator = Box::new(Chain { locators, cni: state.clone() });
    let link = CniLink {
        events: rx,
        state,
        state_file: Some(args.paths.cni_state_file.clone()),
        wait: Duration::from_secs(args.cni_wait_seconds),
    };
    Ok(Started { locator, link })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_file_exists_before_chaining_and_a_good_one_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/cni-state.json");
        // Missing: written as unsynced (fail closed outside system namespaces).
        assert!(ensure_state(&path).unwrap().is_some());
        let st = skiff_cni::proto::read_state(&path).unwrap();
        assert!(st.unsynced && st.enrolled_namespaces.is_empty());
        // A published list is kept as it is.
        write_state(&path, vec!["shop".into()]).unwrap();
        assert!(ensure_state(&path).unwrap().is_none());
        assert_eq!(skiff_cni::proto::read_state(&path).unwrap().enrolled_namespaces, ["shop"]);
        // Corrupt: replaced by unsynced.
        std::fs::write(&path, "{").unwrap();
        assert!(ensure_state(&path).unwrap().unwrap().contains("corrupt"));
        assert!(skiff_cni::proto::read_state(&path).unwrap().unsynced);
    }

    #[test]
    fn default_state_file_survives_reboot() {
        assert!(skiff_cni::DEFAULT_STATE_FILE.starts_with("/var/lib/"), "{}", skiff_cni::DEFAULT_STATE_FILE);
    }
}
