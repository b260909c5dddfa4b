//! The plugin ↔ node-agent protocol: a Unix stream socket; the plugin writes
//! one JSON [`Request`] line and reads one JSON [`Reply`] line.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Which pod sandbox a request is about (from `CNI_ARGS` and the CNI env).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    /// `K8S_POD_NAMESPACE`.
    pub namespace: String,
    /// `K8S_POD_NAME`.
    pub name: String,
    /// `K8S_POD_UID` (not every runtime sends it).
    #[serde(default)]
    pub uid: Option<String>,
    /// `CNI_CONTAINERID`: the sandbox.
    pub container_id: String,
}

/// What the plugin asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Request {
    /// A sandbox was created: its netns and the IPs the primary plugin gave it.
    Add {
        pod: PodRef,
        /// `CNI_NETNS`.
        netns: String,
        /// IPv4/IPv6 addresses from `prevResult.ips` (without prefix length).
        ips: Vec<String>,
    },
    /// A sandbox is being torn down.
    Del { pod: PodRef },
    /// Is the pod's enrollment as it should be?
    Check { pod: PodRef, netns: String },
}

/// node-agent's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Reply {
    /// The pod is captured: ztunnel listens in its netns and capture points there.
    Enrolled,
    /// The pod is not captured, and that is the decision (reason given).
    NotEnrolled { reason: String },
    /// The pod should be captured but is not: the sandbox must not start.
    Failed { message: String },
    /// The request was taken (DEL).
    Done,
}

/// Errors talking to node-agent.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The socket could not be reached (node-agent not running).
    #[error("cannot connect to node-agent at {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed, or timed out.
    #[error("talking to node-agent at {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The peer sent something that is not a reply.
    #[error("node-agent at {path} sent an invalid reply")]
    Decode {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Sends `req` and waits up to `timeout` for the reply.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Reply, ProtoError> {
    let path = socket.display().to_string();
    let stream = UnixStream::connect(socket).map_err(|source| ProtoError::Connect { path: path.clone(), source })?;
    let io = |source| ProtoError::Io { path: path.clone(), source };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(req).expect("requests always serialize");
    line.push(b'\n');
    (&stream).write_all(&line).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).map_err(io)?;
    serde_json::from_str(&reply).map_err(|source| ProtoError::Decode { path, source })
}

/// The node-agent's published view, read by the plugin when node-agent is
/// unreachable.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    /// Namespaces labelled for ambient capture.
    pub enrolled_namespaces: Vec<String>,
    /// Written by node-agent at startup, before it chains the plugin, when
    /// there was no readable state: it has not read the cluster yet, so the
    /// list above means nothing and every namespace but the
    /// [`SYSTEM_NAMESPACES`] is treated as enrolled.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unsynced: bool,
}

/// Namespaces whose pods start even when node-agent has no view of the
/// cluster and no trustworthy published state: the cluster's own and
/// Skiff's (node-agent must be able to start for anything to be captured).
pub const SYSTEM_NAMESPACES: &[&str] = &["kube-system", "skiff-system"];

/// Reads node-agent's published state; the error says what is wrong with it
/// (missing, unreadable, not a state) and where.
pub fn read_state(path: &Path) -> Result<State, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read state file {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("state file {} is corrupt: {e}", path.display()))
}

/// Decides, without a live view of the cluster, whether a pod in `namespace`
/// must not start uncaptured. `state` is the last published state (or why
/// there is none). `Some(reason)`: fail closed, for that reason.
///
/// - a readable state lists the enrolled namespaces: those fail closed;
/// - no readable state (missing or corrupt), or one written before
///   node-agent read the cluster ([`State::unsynced`]): every namespace but
///   the [`SYSTEM_NAMESPACES`] fails closed. node-agent writes the file
///   before it chains the plugin, so a plugin that runs and finds no file
///   means the state was lost, not that Skiff was never set up.
pub fn fail_closed_without_view(state: &Result<State, String>, namespace: &str) -> Option<String> {
    let unsynced;
    let state = match state {
        Ok(s) if s.unsynced => {
            unsynced = Err("node-agent has not read the cluster since the state file was created".to_owned());
            &unsynced
        }
        other => other,
    };
    match state {
        Ok(s) => s
            .enrolled_namespaces
            .iter()
            .any(|n| n == namespace)
            .then(|| format!("namespace {namespace} is enrolled in node-agent's last published state")),
        Err(why) if !SYSTEM_NAMESPACES.contains(&namespace) => Some(format!(
            "no trustworthy record of which namespaces are enrolled ({why}); every namespace but {} is treated as enrolled",
            SYSTEM_NAMESPACES.join(", ")
        )),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_view_only_published_or_all_non_system_namespaces_fail_closed() {
        let st = Ok(State { enrolled_namespaces: vec!["shop".into()], unsynced: false });
        assert!(fail_closed_without_view(&st, "shop").is_some());
        assert!(fail_closed_without_view(&st, "other").is_none());
        let none: Result<State, String> = Err("cannot read state file /x: not found".into());
        let why = fail_closed_without_view(&none, "shop").expect("fail closed without state");
        assert!(why.contains("/x"), "{why}");
        assert!(fail_closed_without_view(&none, "other").is_some());
        assert!(fail_closed_without_view(&none, "kube-system").is_none());
        assert!(fail_closed_without_view(&none, "skiff-system").is_none());
        let unsynced = Ok(State { enrolled_namespaces: vec![], unsynced: true });
        assert!(fail_closed_without_view(&unsynced, "other").is_some());
        assert!(fail_closed_without_view(&unsynced, "kube-system").is_none());
        // Files from before the field existed are synced lists.
        let old: State = serde_json::from_str(r#"{"enrolledNamespaces":["a"]}"#).unwrap();
        assert!(!old.unsynced);
    }
}
