//! ztunnel's end of the node-agent protocol: one blocking thread that
//! accepts node-agent, one session at a time, and applies each request.

use std::{path::PathBuf, sync::Arc, thread};

use skiff_core::zds::{Listener, Request, Response, ZdsError};
use tokio::runtime::Handle;
use tracing::{info, warn};

use crate::proxy::Ztunnel;

/// Binds `path` and serves node-agent sessions on a background thread.
/// Returns the socket file's inode, so shutdown removes the file only if it
/// is still ours (a newer ztunnel may have bound the path meanwhile).
pub fn spawn(zt: Arc<Ztunnel>, path: PathBuf, rt: Handle) -> Result<u64, ZdsError> {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let listener = Listener::bind(&path)?;
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).map_err(|_| ZdsError::Closed)?);
    info!(socket = %path.display(), "waiting for node-agent");
    thread::Builder::new()
        .name("zds".into())
        .spawn(move || loop {
            let conn = match listener.accept() {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %skiff_core::report(&e), "node-agent accept failed");
                    thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                }
            };
            loop {
                let resp = match conn.recv::<Request>() {
                    Ok((req, fds)) => {
                        // A bug must not silently end the node-agent session
                        // thread: answer with an error and keep serving.
                        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(zt.handle(req, fds)))) {
                            Ok(r) => r,
                            Err(_) => {
                                tracing::error!("handling a node-agent request panicked");
                                Response::Error { message: "internal error in ztunnel (see its log)".into() }
                            }
                        }
                    }
                    Err(ZdsError::Closed) => {
                        info!("node-agent disconnected");
                        break;
                    }
                    Err(e @ (ZdsError::Malformed(_) | ZdsError::TooLarge(_))) => {
                        warn!(error = %skiff_core::report(&e), "bad message from node-agent");
                        Response::Error { message: skiff_core::report(&e) }
                    }
                    Err(e) => {
                        warn!(error = %skiff_core::report(&e), "node-agent connection failed");
                        break;
                    }
                };
                if let Err(e) = conn.send(&resp, None) {
                    warn!(error = %skiff_core::report(&e), "replying to node-agent failed");
                    break;
                }
            }
        })
        .expect("spawn zds thread");
    Ok(inode)
}
