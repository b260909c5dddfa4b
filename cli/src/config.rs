//! `skiff config workloads|policies|certs`: the state each node's ztunnel
//! holds, read from its admin endpoint (`/config_dump`, 127.0.0.1:15000 in
//! the node's network namespace), by pod name and namespace, as a table or
//! as JSON/YAML.

use std::path::Path;

use serde_json::{json, Value};

use crate::mesh;

/// What to show.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum What {
    /// The pods each ztunnel serves (enrolled on its node).
    Workloads,
    /// AuthorizationPolicies and PeerAuthentications in force, and objects
    /// refused.
    Policies,
    /// The workload certificates each ztunnel holds, with their expiry.
    Certs,
}

fn dumps(mesh_dir: Option<&Path>) -> Result<Dumps, String> {
    let work = mesh::work_dir(mesh_dir)?;
    let nodes = mesh::nodes(&work)?;
    if nodes.is_empty() {
        return Err(format!("{}: no node of this mesh has a network namespace (has it stopped?)", work.display()));
    }
    Ok(nodes
        .into_iter()
        .map(|n| {
            let dump = mesh::get_in(&n.netns, 15000, "/config_dump")
                .and_then(|body| serde_json::from_str::<Value>(&body).map_err(|e| format!("config_dump is not JSON: {e}")))
                .map_err(|e| format!("ztunnel not reachable: {e}"));
            (n.name, dump)
        })
        .collect())
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        l.push('\n');
        l
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

/// Seconds since the epoch as RFC 3339 (UTC).
fn rfc3339(unix: &Value) -> String {
    match unix.as_u64() {
        Some(t) => {
            let full = skiff_core::logging::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t));
            // Whole seconds: drop the milliseconds.
            format!("{}Z", full.rsplit_once('.').map_or(full.as_str(), |(s, _)| s))
        }
        None => "-".into(),
    }
}

/// Each node's `/config_dump`, or why it could not be read.
type Dumps = Vec<(String, Result<Value, String>)>;

/// Runs `skiff config WHAT`; the output, and whether every node answered.
pub fn run(what: What, mesh_dir: Option<&Path>, output: &str) -> Result<(String, bool), String> {
    let dumps = dumps(mesh_dir)?;
    let all_ok = dumps.iter().all(|(_, d)| d.is_ok());
    let key = match what {
        What::Workloads => "workloads",
        What::Policies => "policies",
        What::Certs => "certificates",
    };
    if output != "table" {
        let nodes: Vec<Value> = dumps
            .iter()
            .map(|(n, d)| match d {
                Ok(d) if what == What::Policies => json!({
                    "node": n,
                    "authorization_policies": d["authorization_policies"],
                    "peer_authentications": d["peer_authentications"],
                    "rejected": d["rejected"],
                }),
                Ok(d) => json!({"node": n, key: d[key]}),
                Err(e) => json!({"node": n, "error": e}),
            })
            .collect();
        let v = json!({ "nodes": nodes });
        let text = if output == "yaml" {
            serde_saphyr::to_string(&v).map_err(|e| e.to_string())?
        } else {
            serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
        };
        return Ok((text, all_ok));
    }
    let mut out = String::new();
    let mut rows = Vec::new();
    match what {
        What::Workloads => {
            for (n, d) in &dumps {
                for w in d.as_ref().ok().and_then(|d| d["workloads"].as_array()).into_iter().flatten() {
                    rows.push(vec![n.clone(), s(&w["namespace"]), s(&w["name"]), s(&w["workload"]), s(&w["ip"]), s(&w["identity"])]);
                }
            }
            out.push_str(&table(&["NODE", "NAMESPACE", "POD", "WORKLOAD", "IP", "IDENTITY"], &rows));
        }
        What::Certs => {
            for (n, d) in &dumps {
                for c in d.as_ref().ok().and_then(|d| d["certificates"].as_array()).into_iter().flatten() {
                    rows.push(vec![n.clone(), s(&c["identity"]), rfc3339(&c["not_after_unix"]), rfc3339(&c["rotates_at_unix"])]);
                }
            }
            out.push_str(&table(&["NODE", "IDENTITY", "EXPIRES", "RENEWED AT"], &rows));
        }
        What::Policies => {
            // Every node reads the same cluster: the first that answered.
            if let Some(d) = dumps.iter().find_map(|(_, d)| d.as_ref().ok()) {
                for p in d["authorization_policies"].as_array().into_iter().flatten() {
                    let applies = if p["waypoint_only"] == true { "waypoint (targetRefs)".to_owned() } else { selector(&p["selector"]) };
                    let rules = p["rules"].as_array().map_or(0, Vec::len);
                    rows.push(vec!["AuthorizationPolicy".into(), s(&p["name"]), s(&p["action"]), applies, format!("{rules} rule(s)")]);
                }
                for p in d["peer_authentications"].as_array().into_iter().flatten() {
                    let ports = p["port_modes"].as_object().filter(|m| !m.is_empty()).map(|m| m.iter().map(|(k, v)| format!("{k}:{}", s(v))).collect::<Vec<_>>().join(",")).unwrap_or_default();
                    rows.push(vec!["PeerAuthentication".into(), s(&p["name"]), s(&p["mode"]), selector(&p["selector"]), ports]);
                }
                for r in d["rejected"].as_array().into_iter().flatten() {
                    rows.push(vec![format!("refused {}", s(&r["kind"])), format!("{}/{}", s(&r["namespace"]), s(&r["name"])), "-".into(), s(&r["field"]), s(&r["reason"])]);
                }
            }
            out.push_str(&table(&["KIND", "NAME", "MODE/ACTION", "APPLIES TO", "DETAIL"], &rows));
        }
    }
    for (n, d) in &dumps {
        if let Err(e) = d {
            out.push_str(&format!("{n}: {e}\n"));
        }
    }
    Ok((out, all_ok))
}

fn selector(v: &Value) -> String {
    match v.as_object() {
        Some(m) if !m.is_empty() => m.iter().map(|(k, v)| format!("{k}={}", s(v))).collect::<Vec<_>>().join(","),
        _ => "namespace".into(),
    }
}
