//! The `skiff-cni` chained plugin (CNI spec 1.1, older versions accepted).
//!
//! The runtime runs it after the primary plugin with the primary's result
//! as `prevResult`. Skiff changes nothing in the pod's network: ADD tells
//! node-agent the sandbox's netns and IPs, waits until node-agent has
//! decided (and, for an enrolled pod, until capture is in place), then
//! prints `prevResult` unchanged. So capture exists before the first
//! application container starts.
//!
//! Failure policy — never block a pod Skiff does not capture, never let a
//! pod Skiff must capture start uncaptured:
//! - node-agent answers `Failed` (the pod should be enrolled but is not):
//!   ADD fails (code 11, try again later); the runtime retries the sandbox.
//! - node-agent cannot be reached: the plugin reads node-agent's published
//!   list of enrolled namespaces; if the pod's namespace is in it, ADD fails
//!   (fail closed) — otherwise the pod starts and, should it be enrolled
//!   after all (a pod-level opt-in), node-agent enrolls it when it is back
//!   (it finds running pods through /proc). A missing, corrupt or not yet
//!   synced state file fails ADD for every namespace but kube-system and
//!   skiff-system: node-agent writes the file before it puts the plugin in
//!   the chain, so a running plugin without a file means the state was
//!   lost (see [`proto::fail_closed_without_view`]).
//! - DEL always succeeds: the sandbox is going away, and a node without
//!   node-agent must still be able to delete pods.

use std::{
    collections::BTreeMap,
    io::Read,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Serialize;
use serde_json::Value;

use crate::proto::{self, PodRef, Reply, Request};

/// CNI versions this plugin accepts (`prevResult` is passed through, so its
/// shape only matters for reading `ips`, which is the same in all of these).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The spec's well-known error codes the plugin uses.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
}

/// A CNI error result (printed on stdout, exit status non-zero).
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

/// What to print and how to exit.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Success; print this JSON (or nothing).
    Ok(Option<Value>),
    Err(CniError),
}

/// The plugin's own config keys (inside its entry of the conflist).
#[derive(Debug)]
struct Conf {
    version: String,
    prev_result: Option<Value>,
    socket: PathBuf,
    state_file: PathBuf,
    timeout: Duration,
}

/// The runtime's environment, as a map (tests pass their own).
pub type Env = BTreeMap<String, String>;

fn err(version: &str, code: u32, msg: impl Into<String>, details: impl Into<String>) -> Outcome {
    Outcome::Err(CniError { cni_version: version.to_owned(), code, msg: msg.into(), details: details.into() })
}

fn parse_conf(stdin: &[u8]) -> Result<Conf, Outcome> {
    let v: Value = serde_json::from_slice(stdin)
        .map_err(|e| err("1.1.0", code::DECODE, "skiff-cni: network configuration on stdin is not JSON", e.to_string()))?;
    let version = v.get("cniVersion").and_then(Value::as_str).unwrap_or_default().to_owned();
    if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
        return Err(err(
            "1.1.0",
            code::INCOMPATIBLE_VERSION,
            format!("skiff-cni: unsupported cniVersion {version:?}"),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    let s = |k: &str, d: &str| PathBuf::from(v.get(k).and_then(Value::as_str).unwrap_or(d));
    let timeout = v.get("timeoutSeconds").and_then(Value::as_u64).unwrap_or(20);
    Ok(Conf {
        prev_result: v.get("prevResult").cloned(),
        socket: s("agentSocket", crate::DEFAULT_SOCKET),
        state_file: s("stateFile", crate::DEFAULT_STATE_FILE),
        timeout: Duration::from_secs(timeout),
        version,
    })
}

/// `K1=V1;K2=V2` → map.
fn cni_args(s: &str) -> BTreeMap<String, String> {
    s.split(';').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

/// The IPs in a result's `ips` list, without prefix length.
fn ips_of(prev: &Value) -> Vec<String> {
    prev.get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.get("address").and_then(Value::as_str))
        .map(|a| a.split('/').next().unwrap_or(a).to_owned())
        .collect()
}

fn pod_ref(env: &Env, container_id: &str) -> Option<PodRef> {
    let args = cni_args(env.get("CNI_ARGS").map(String::as_str).unwrap_or(""));
    Some(PodRef {
        namespace: args.get("K8S_POD_NAMESPACE")?.clone(),
        name: args.get("K8S_POD_NAME")?.clone(),
        uid: args.get("K8S_POD_UID").cloned(),
        container_id: container_id.to_owned(),
    })
}

/// Why a pod in `namespace` must not start while node-agent is unreachable,
/// from node-agent's last published state (`None`: it may start).
fn fail_closed(state_file: &Path, namespace: &str) -> Option<String> {
    proto::fail_closed_without_view(&proto::read_state(state_file), namespace)
}

/// Runs one plugin invocation. Logs (for the runtime's log) go to `log`.
pub fn run(env: &Env, stdin: &[u8], log: &mut dyn std::io::Write) -> Outcome {
    let command = env.get("CNI_COMMAND").map(String::as_str).unwrap_or("");
    if command == "VERSION" {
        return Outcome::Ok(Some(serde_json::json!({
            "cniVersion": "1.1.0",
            "supportedVersions": SUPPORTED_VERSIONS,
        })));
    }
    let conf = match parse_conf(stdin) {
        Ok(c) => c,
        Err(o) => return o,
    };
    let v = conf.version.as_str();
    let need = |k: &str| env.get(k).filter(|s| !s.is_empty()).cloned();
    match command {
        // CNI 1.1: Skiff keeps no per-attachment state of its own to collect,
        // and its readiness does not gate the node's network.
        "STATUS" | "GC" => Outcome::Ok(None),
        "DEL" => {
            let Some(cid) = need("CNI_CONTAINERID") else {
                return err(v, code::INVALID_ENV, "skiff-cni: CNI_CONTAINERID is not set", "");
            };
            if let Some(pod) = pod_ref(env, &cid) {
                // Best effort with a short wait: DEL must succeed without node-agent.
                let timeout = conf.timeout.min(Duration::from_secs(3));
                match proto::call(&conf.socket, &Request::Del { pod }, timeout) {
                    Ok(_) => {}
                    Err(e) => {
                        let _ = writeln!(log, "skiff-cni: DEL {cid}: {} (ignored: DEL always succeeds)", report(&e));
                    }
                }
            }
            Outcome::Ok(None)
        }
        "ADD" | "CHECK" => {
            let (Some(cid), Some(netns), Some(_ifname)) = (need("CNI_CONTAINERID"), need("CNI_NETNS"), need("CNI_IFNAME")) else {
                return err(v, code::INVALID_ENV, "skiff-cni: CNI_CONTAINERID, CNI_NETNS and CNI_IFNAME must be set", "");
            };
            let Some(prev) = conf.prev_result.clone() else {
                return err(
                    v,
                    code::INVALID_CONFIG,
                    "skiff-cni: no prevResult: it must be chained after the plugin that sets up the pod's interface",
                    "",
                );
            };
            let Some(pod) = pod_ref(env, &cid) else {
                // Not a Kubernetes pod (no K8S_POD_* in CNI_ARGS): nothing to decide.
                return Outcome::Ok((command == "ADD").then_some(prev));
            };
            let who = format!("{}/{}", pod.namespace, pod.name);
            let namespace = pod.namespace.clone();
            let req = if command == "ADD" {
                Request::Add { pod, netns, ips: ips_of(&prev) }
            } else {
                Request::Check { pod, netns }
            };
            let ok = Outcome::Ok((command == "ADD").then_some(prev));
            match proto::call(&conf.socket, &req, conf.timeout) {
                Ok(Reply::Enrolled) | Ok(Reply::Done) => ok,
                Ok(Reply::NotEnrolled { reason }) => {
                    let _ = writeln!(log, "skiff-cni: {command} {who}: not captured: {reason}");
                    ok
                }
                Ok(Reply::Failed { message }) => err(
                    v,
                    code::TRY_AGAIN_LATER,
                    format!("skiff-cni: pod {who} must be captured but is not"),
                    message,
                ),
                Err(e) => match fail_closed(&conf.state_file, &namespace) {
                    Some(why) => err(
                        v,
                        code::TRY_AGAIN_LATER,
                        format!("skiff-cni: node-agent cannot be reached and {why}; not starting {who} (namespace {namespace}) uncaptured"),
                        report(&e),
                    ),
                    None => {
                        let _ = writeln!(log, "skiff-cni: {command} {who}: {}; namespace not enrolled, pod starts", report(&e));
                        ok
                    }
                },
            }
        }
        "" => err(v, code::INVALID_ENV, "skiff-cni: CNI_COMMAND is not set", ""),
        other => err(v, code::INVALID_ENV, format!("skiff-cni: unknown CNI_COMMAND {other:?}"), ""),
    }
}

/// Reads stdin and the process environment, runs, prints, and returns the
/// exit status.
pub fn main_with_io() -> i32 {
    let env: Env = std::env::vars().collect();
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => run(&env, &stdin, &mut std::io::stderr()),
        Err(e) => err("1.1.0", code::IO_FAILURE, "skiff-cni: cannot read stdin", e.to_string()),
    };
    match outcome {
        Outcome::Ok(Some(v)) => {
            println!("{v}");
            0
        }
        Outcome::Ok(None) => 0,
        Outcome::Err(e) => {
            println!("{}", serde_json::to_string(&e).expect("errors serialize"));
            1
        }
    }
}

fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(cmd: &str, extra: &[(&str, &str)]) -> Env {
        let mut e: Env = [("CNI_COMMAND", cmd), ("CNI_CONTAINERID", "c1"), ("CNI_NETNS", "/var/run/netns/x"), ("CNI_IFNAME", "eth0")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        for (k, v) in extra {
            e.insert((*k).to_owned(), (*v).to_owned());
        }
        e
    }

    fn conf(socket: &str, state: &str) -> Vec<u8> {
        serde_json::json!({
            "cniVersion": "1.0.0", "name": "net", "type": "skiff-cni",
            "agentSocket": socket, "stateFile": state, "timeoutSeconds": 1,
            "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5/24", "gateway": "10.1.0.1"}], "dns": {}},
        })
        .to_string()
        .into_bytes()
    }

    const POD: &str = "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_UID=u1;IgnoreUnknown=1";

    #[test]
    fn version_lists_what_is_supported() {
        let Outcome::Ok(Some(v)) = run(&env("VERSION", &[]), b"", &mut Vec::new()) else { panic!() };
        assert_eq!(v["cniVersion"], "1.1.0");
        assert!(v["supportedVersions"].as_array().unwrap().iter().any(|x| x == "0.4.0"));
    }

    #[test]
    fn bad_input_gives_spec_error_codes() {
        let codes = |o: Outcome| match o {
            Outcome::Err(e) => e.code,
            Outcome::Ok(_) => 0,
        };
        assert_eq!(codes(run(&env("ADD", &[]), b"{", &mut Vec::new())), code::DECODE);
        assert_eq!(codes(run(&env("ADD", &[]), br#"{"cniVersion":"9.9.9"}"#, &mut Vec::new())), code::INCOMPATIBLE_VERSION);
        let mut e = env("ADD", &[]);
        e.remove("CNI_NETNS");
        assert_eq!(codes(run(&e, &conf("/nonexistent", "/nonexistent"), &mut Vec::new())), code::INVALID_ENV);
        let no_prev = br#"{"cniVersion":"1.0.0","name":"n","type":"skiff-cni"}"#;
        assert_eq!(codes(run(&env("ADD", &[("CNI_ARGS", POD)]), no_prev, &mut Vec::new())), code::INVALID_CONFIG);
    }

    #[test]
    fn agent_down_passes_through_unless_the_namespace_is_enrolled() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let state = dir.join("state.json");
        let sock = dir.join("none.sock");
        let (s, st) = (sock.to_str().unwrap(), state.to_str().unwrap());
        let c = conf(s, st);
        let prev: Value = serde_json::from_slice::<Value>(&c).unwrap()["prevResult"].clone();
        // No state file while the plugin is chained: state was lost (node-agent
        // writes it before chaining the plugin): fail closed, but not for the
        // system namespaces.
        let Outcome::Err(e) = run(&env("ADD", &[("CNI_ARGS", POD)]), &c, &mut Vec::new()) else { panic!("no state: must fail closed") };
        assert_eq!(e.code, code::TRY_AGAIN_LATER);
        assert!(e.msg.contains("cannot read state file") && e.msg.contains(st), "{}", e.msg);
        let sys = "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns-1;K8S_POD_UID=u2";
        assert_eq!(run(&env("ADD", &[("CNI_ARGS", sys)]), &c, &mut Vec::new()), Outcome::Ok(Some(prev.clone())));
        // Corrupt, or written before node-agent read the cluster: the same.
        std::fs::write(&state, "{not json").unwrap();
        let Outcome::Err(e) = run(&env("ADD", &[("CNI_ARGS", POD)]), &c, &mut Vec::new()) else { panic!("corrupt: must fail closed") };
        assert!(e.msg.contains("corrupt"), "{}", e.msg);
        std::fs::write(&state, r#"{"enrolledNamespaces":[],"unsynced":true}"#).unwrap();
        assert!(matches!(run(&env("ADD", &[("CNI_ARGS", POD)]), &c, &mut Vec::new()), Outcome::Err(_)));
        std::fs::write(&state, r#"{"enrolledNamespaces":["other"]}"#).unwrap();
        assert_eq!(run(&env("ADD", &[("CNI_ARGS", POD)]), &c, &mut Vec::new()), Outcome::Ok(Some(prev.clone())));
        std::fs::write(&state, r#"{"enrolledNamespaces":["shop"]}"#).unwrap();
        let Outcome::Err(e) = run(&env("ADD", &[("CNI_ARGS", POD)]), &c, &mut Vec::new()) else { panic!("must fail closed") };
        assert_eq!(e.code, code::TRY_AGAIN_LATER);
        assert!(e.msg.contains("shop") && e.msg.contains("node-agent") && e.msg.contains("enrolled"), "{}", e.msg);
        // DEL never fails.
        assert_eq!(run(&env("DEL", &[("CNI_ARGS", POD)]), &c, &mut Vec::new()), Outcome::Ok(None));
        // Not a Kubernetes pod: passthrough without asking.
        assert_eq!(run(&env("ADD", &[]), &c, &mut Vec::new()), Outcome::Ok(Some(prev)));
    }

    #[test]
    fn ips_come_from_prev_result() {
        let prev = serde_json::json!({"ips": [{"address": "10.1.0.5/24"}, {"address": "fd00::5/64"}]});
        assert_eq!(ips_of(&prev), ["10.1.0.5", "fd00::5"]);
    }
}
