//! `skiff config workloads|policies|certs`: the state each node's ztunnel
//! holds, read from its admin endpoint (`/config_dump`, 127.0.0.1:15000 in
//! the node's network namespace), by pod name and namespace, as a table or
//! as JSON/YAML.

use serde_json::{json, Value};

use crate::reach::Mesh;

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
    /// The Services and ServiceEntry hosts each waypoint serves, with their
    /// ports, protocols, VirtualService and policies (and each gateway's
    /// servers).
    Services,
    /// The routes each waypoint applies: per Service, each VirtualService
    /// route with its destinations and weights.
    Routes,
}

fn dumps(mesh: &Mesh) -> Result<Dumps, String> {
    let snap = mesh.snapshot()?;
    let nodes: Vec<_> = mesh.nodes(&snap)?.into_iter().filter_map(|n| n.place.ok().map(|p| (n.name, p))).collect();
    if nodes.is_empty() {
        return Err("no node of this mesh can be reached (has it stopped?)".into());
    }
    Ok(nodes
        .into_iter()
        .map(|(name, place)| {
            let dump = mesh
                .get(&place, 15000, "/config_dump")
                .and_then(|body| serde_json::from_str::<Value>(&body).map_err(|e| format!("config_dump is not JSON: {e}")))
                .map_err(|e| format!("ztunnel not reachable: {e}"));
            (name, dump)
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
            let Some(at) = std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(t)) else { return "-".into() };
            let full = skiff_core::logging::rfc3339(at);
            // Whole seconds: drop the milliseconds.
            format!("{}Z", full.rsplit_once('.').map_or(full.as_str(), |(s, _)| s))
        }
        None => "-".into(),
    }
}

/// Each node's `/config_dump`, or why it could not be read.
type Dumps = Vec<(String, Result<Value, String>)>;

/// Each waypoint's and gateway's `/config_dump`, by proxy.
fn proxy_dumps(mesh: &Mesh) -> Result<Dumps, String> {
    let snap = mesh.snapshot()?;
    Ok(mesh
        .proxies(&snap, false)?
        .into_iter()
        .map(|(what, place)| {
            let dump = mesh
                .get(&place, 15000, "/config_dump")
                .and_then(|body| serde_json::from_str::<Value>(&body).map_err(|e| format!("config_dump is not JSON: {e}")))
                .map_err(|e| format!("not reachable: {e}"));
            (what, dump)
        })
        .collect())
}

/// `config services|routes`: what the waypoints and gateways hold.
fn run_proxies(what: What, mesh: &Mesh, output: &str) -> Result<(String, bool), String> {
    let dumps = proxy_dumps(mesh)?;
    let all_ok = dumps.iter().all(|(_, d)| d.is_ok());
    if output != "table" {
        let v = json!({"proxies": dumps.iter().map(|(p, d)| match d {
            Ok(d) => json!({"proxy": p, "services": d["services"], "servers": d["servers"]}),
            Err(e) => json!({"proxy": p, "error": e}),
        }).collect::<Vec<_>>()});
        let text = if output == "yaml" { serde_saphyr::to_string(&v).map_err(|e| e.to_string())? } else { serde_json::to_string_pretty(&v).unwrap_or_default() + "\n" };
        return Ok((text, all_ok));
    }
    let mut rows = Vec::new();
    for (p, d) in &dumps {
        let Ok(d) = d else { continue };
        for svc in d["services"].as_array().into_iter().flatten() {
            match what {
                What::Services => {
                    let ports = svc["ports"].as_array().into_iter().flatten().map(|x| format!("{}/{}", s(&x["port"]), s(&x["protocol"]))).collect::<Vec<_>>().join(",");
                    let policies = svc["policies"].as_array().into_iter().flatten().map(s).collect::<Vec<_>>().join(",");
                    rows.push(vec![p.clone(), s(&svc["service"]), s(&svc["kind"]), ports, s(&svc["virtual_service"]), if policies.is_empty() { "-".into() } else { policies }]);
                }
                _ => {
                    let routes = svc["routes"].as_array().cloned().unwrap_or_default();
                    if routes.is_empty() {
                        rows.push(vec![p.clone(), s(&svc["service"]), "-".into(), "(default: the Service itself)".into(), "-".into()]);
                    }
                    for r in routes {
                        let dests = r["destinations"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|x| {
                                let subset = x["subset"].as_str().map(|v| format!(" subset {v}")).unwrap_or_default();
                                format!("{}{subset} {}%", s(&x["host"]), x["percent"].as_f64().map(|v| (v * 10.0).round() / 10.0).unwrap_or(0.0))
                            })
                            .collect::<Vec<_>>()
                            .join(", ");
                        let name = r["name"].as_str().map(|n| format!("{} {n:?}", s(&r["route"]))).unwrap_or_else(|| s(&r["route"]));
                        rows.push(vec![p.clone(), s(&svc["service"]), format!("{} {name}", s(&svc["virtual_service"])), dests, format!("{} match(es)", s(&r["matches"]))]);
                    }
                }
            }
        }
        if what == What::Services {
            for sv in d["servers"].as_array().into_iter().flatten() {
                rows.push(vec![p.clone(), format!("{} server {}", s(&sv["gateway"]), s(&sv["server"])), "Gateway server".into(), format!("{}/{} on {}", s(&sv["port"]), s(&sv["protocol"]), s(&sv["listens_on"])), "-".into(), "-".into()]);
            }
        }
    }
    let mut out = match what {
        What::Services => table(&["PROXY", "SERVICE", "KIND", "PORTS", "VIRTUALSERVICE", "POLICIES"], &rows),
        _ => table(&["PROXY", "SERVICE", "ROUTE", "DESTINATIONS", "MATCHES"], &rows),
    };
    for (p, d) in &dumps {
        if let Err(e) = d {
            out.push_str(&format!("{p}: {e}\n"));
        }
    }
    Ok((out, all_ok))
}

/// Runs `skiff config WHAT`; the output, and whether every node answered.
pub fn run(what: What, mesh: &Mesh, output: &str) -> Result<(String, bool), String> {
    if matches!(what, What::Services | What::Routes) {
        return run_proxies(what, mesh, output);
    }
    let dumps = dumps(mesh)?;
    let all_ok = dumps.iter().all(|(_, d)| d.is_ok());
    let key = match what {
        What::Workloads => "workloads",
        What::Policies => "policies",
        What::Certs => "certificates",
        What::Services | What::Routes => unreachable!("the waypoints' state: run_proxies"),
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
        What::Services | What::Routes => unreachable!("the waypoints' state: run_proxies"),
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
