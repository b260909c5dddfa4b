//! `skiff observe`: a live stream of the mesh's connection and request
//! events — every ztunnel's and every waypoint's and gateway's `/events`
//! (their access lines as JSON, see `skiff_hbone::events`), merged,
//! filtered, one line each. A source that falls behind drops its oldest
//! events and says how many; the mesh never waits for this tool.

use std::{
    io::{BufRead, BufReader, Read, Write as _},
    sync::{mpsc, Arc},
    time::Duration,
};

use serde_json::Value;

use crate::reach::{Conn, Mesh, Place};

/// What to show.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Source or destination namespace.
    pub namespace: Option<String>,
    /// Source or destination workload (or pod) name.
    pub pod: Option<String>,
    /// `allow`, `deny` (refused by policy: AuthorizationPolicy,
    /// PeerAuthentication, REGISTRY_ONLY) or `error` (no route, no
    /// endpoint, upstream failure, faults).
    pub verdict: Option<String>,
    /// `tcp` (connections and TCP streams) or `http` (requests).
    pub protocol: Option<String>,
}

/// The verdict of one event, by the mesh's own marks: `deny` for a
/// refusal by policy (`UAEX` or `policy=deny …`, REGISTRY_ONLY; a 403 from
/// a proxy that names no policy decision, as before the waypoint's lines
/// did), `error` for a response flag of a failure the mesh saw (no route,
/// no endpoint, upstream failure or reset, timeout, overflow, rate limit,
/// fault abort) or a 5xx, else `allow` (a delay fault, a client that
/// left, an application's own 403 after the policy allowed the request
/// are not the mesh's refusals).
pub fn verdict(e: &Value) -> &'static str {
    let flags = e["response_flags"].as_str().unwrap_or("-");
    let policy = e["policy"].as_str();
    let code = e["code"].as_u64();
    if flags.split(',').any(|f| f == "UAEX") || policy.is_some_and(|p| p.starts_with("deny")) || (code == Some(403) && policy.is_none()) {
        return "deny";
    }
    const FAILURES: [&str; 9] = ["NR", "UH", "UF", "UC", "UT", "UO", "RL", "FI", "URX"];
    if flags.split(',').any(|f| FAILURES.contains(&f)) || code.is_some_and(|c| c >= 500) {
        return "error";
    }
    "allow"
}

fn protocol(e: &Value) -> &'static str {
    if e.get("method").is_some() { "http" } else { "tcp" }
}

impl Filter {
    pub fn matches(&self, e: &Value) -> bool {
        let s = |k: &str| e[k].as_str().unwrap_or("");
        self.namespace.as_deref().is_none_or(|ns| s("src.namespace") == ns || s("dst.namespace") == ns)
            && self.pod.as_deref().is_none_or(|p| s("src.workload") == p || s("dst.workload") == p)
            && self.verdict.as_deref().is_none_or(|v| verdict(e) == v)
            && self.protocol.as_deref().is_none_or(|p| protocol(e) == p)
    }
}

/// One event as a line: time, who saw it, verdict, protocol, source →
/// destination, what decided.
pub fn render(proxy: &str, e: &Value) -> String {
    // Values as text, control characters (terminal escapes) dropped.
    let s = |k: &str| e[k].as_str().map(str::to_owned).unwrap_or_else(|| e[k].to_string()).chars().filter(|c| !c.is_control()).collect::<String>();
    let time = s("time");
    let time = time.split('T').nth(1).unwrap_or(&time).trim_end_matches('Z');
    let who = |side: &str| {
        let (ns, w) = (s(&format!("{side}.namespace")), s(&format!("{side}.workload")));
        if w == "unknown" || w == "null" { s(&format!("{side}.addr")).replace("null", "?") } else { format!("{ns}/{w}") }
    };
    let dst = match (protocol(e), e["dst.addr"].as_str()) {
        ("tcp", Some(a)) => format!("{} {a}", who("dst")),
        _ => format!("{} ({})", who("dst"), s("dst.service")),
    };
    let mut detail = Vec::new();
    if protocol(e) == "http" {
        detail.push(format!("{} {} {}", s("method"), s("path"), s("code")));
    }
    let flags = s("response_flags");
    if flags != "-" {
        detail.push(format!("flags={flags}"));
    }
    if let Some(p) = e["policy"].as_str().filter(|p| *p != "-") {
        detail.push(format!("policy={p}"));
    }
    if let Some(r) = e["route"].as_str().filter(|r| *r != "-") {
        detail.push(format!("route={r}"));
    }
    if e.get("src.identity").and_then(Value::as_str).is_some_and(|i| i != "unknown") {
        detail.push(format!("as {}", s("src.identity")));
    }
    detail.push(format!("{}ms", s("duration_ms")));
    format!("{time} [{proxy}] {} {} {} -> {dst} {}", verdict(e).to_uppercase(), protocol(e), who("src"), detail.join(" "))
}

/// Opens `/events` on the proxy's admin port (127.0.0.1:15000 where it
/// runs); the stream, past the response head.
fn subscribe(mesh: &Mesh, place: &Place) -> Result<BufReader<Conn>, String> {
    subscribe_with(mesh, place, false).or_else(|e| if matches!(place, Place::Pod { .. }) { subscribe_with(mesh, place, true) } else { Err(e) })
}

/// See [`Mesh::connect`] for `patient`.
fn subscribe_with(mesh: &Mesh, place: &Place, patient: bool) -> Result<BufReader<Conn>, String> {
    let mut s = mesh.connect(place, 15000, patient)?;
    s.write_all(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n").map_err(|e| e.to_string())?;
    // The head within 5 s, each line bounded; then events as they come.
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s);
    // The status line: a failed port-forward's reason is the read's error.
    let status = read_line(&mut r).map_err(|e| format!("/events: {e}"))?.ok_or("/events: no response")?;
    if !status.starts_with("HTTP/1.1 200") {
        return Err(format!("/events: {}", status.trim()));
    }
    for _ in 0..100 {
        match bounded_line(&mut r) {
            Some(h) if h == "\r\n" => {
                r.get_ref().set_read_timeout(None).map_err(|e| e.to_string())?;
                return Ok(r);
            }
            Some(_) => {}
            None => break,
        }
    }
    Err("/events: a malformed response head".into())
}

/// One line of at most 64 KiB (None at its end or when longer).
fn read_line(r: &mut BufReader<Conn>) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    let n = r.by_ref().take(65_536).read_until(b'\n', &mut line)?;
    Ok((n > 0 && line.ends_with(b"\n")).then(|| String::from_utf8_lossy(&line).into_owned()))
}

/// [`read_line`], an error also ending it.
fn bounded_line(r: &mut BufReader<Conn>) -> Option<String> {
    read_line(r).ok().flatten()
}

/// The lines of a chunked body, as they come.
fn read_chunked_lines(mut r: BufReader<Conn>, mut each: impl FnMut(&str) -> bool) {
    // Lines of at most 1 MiB; a chunk of at most that.
    const MAX: usize = 1 << 20;
    let mut pending = Vec::new();
    loop {
        let Some(size) = bounded_line(&mut r) else { return };
        let Ok(n) = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16) else { return };
        if n == 0 || n > MAX || pending.len() > MAX {
            return;
        }
        let mut chunk = vec![0; n + 2];
        if r.read_exact(&mut chunk).is_err() {
            return;
        }
        chunk.truncate(n);
        pending.extend_from_slice(&chunk);
        while let Some(i) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            if !each(String::from_utf8_lossy(&line).trim_end()) {
                return;
            }
        }
    }
}

/// Streams events until interrupted (or `limit` lines printed), to
/// `out`. Sources that cannot be reached are reported on stderr; none at
/// all is an error.
pub fn run(mesh: Mesh, filter: &Filter, json: bool, limit: Option<usize>) -> Result<(), String> {
    let (tx, rx) = mpsc::channel::<String>();
    let sources = mesh.proxies(&mesh.snapshot()?, true)?;
    let mesh = Arc::new(mesh);
    if sources.is_empty() {
        return Err("no ztunnel, waypoint or gateway in this mesh".into());
    }
    let count = sources.len();
    for (what, place) in sources {
        let (tx, filter, mesh) = (tx.clone(), filter.clone(), mesh.clone());
        // Each source on its own: one that hangs holds up no other.
        std::thread::spawn(move || {
            let r = match subscribe(&mesh, &place) {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(format!("# {what}: not watched: {e}"));
                    return;
                }
            };
            read_chunked_lines(r, |line| {
                let Ok(e) = serde_json::from_str::<Value>(line) else { return true };
                let out = match e["event"].as_str() {
                    Some("subscribed") => format!("# watching {what}"),
                    Some("dropped") => format!("# {what}: {} event(s) dropped (this reader fell behind)", e["count"]),
                    _ if !filter.matches(&e) => return true,
                    _ if json => match e {
                        Value::Object(mut m) => {
                            m.insert("proxy".into(), Value::String(what.clone()));
                            Value::Object(m).to_string()
                        }
                        _ => return true,
                    },
                    _ => render(&what, &e),
                };
                tx.send(out).is_ok()
            });
            let _ = tx.send(format!("# {what}: stream ended"));
        });
    }
    drop(tx);
    let (mut printed, mut failed) = (0, 0);
    let stdout = std::io::stdout();
    for line in rx {
        let status = line.starts_with('#');
        if status && line.contains(": not watched: ") {
            failed += 1;
            eprintln!("skiff observe: {}", &line[2..]);
            if failed == count {
                return Err("no ztunnel, waypoint or gateway could be reached".into());
            }
            continue;
        }
        // Status lines go to stderr with --output json, so stdout stays
        // JSON lines.
        if status && json {
            eprintln!("{line}");
            continue;
        }
        let mut o = stdout.lock();
        if writeln!(o, "{line}").and_then(|_| o.flush()).is_err() {
            return Ok(());
        }
        if !status {
            printed += 1;
            if limit.is_some_and(|l| printed >= l) {
                return Ok(());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Verdicts from real access lines' fields.
    #[test]
    fn verdicts() {
        let rows = [
            (r#"{"response_flags":"UAEX","policy":"deny (a/b rule 0: DENY policy matched)"}"#, "deny"),
            (r#"{"response_flags":"NR","policy":"deny (outboundTrafficPolicy REGISTRY_ONLY: not a Service, pod or ServiceEntry)"}"#, "deny"),
            (r#"{"response_flags":"-","policy":"allow (no ALLOW policy applies)"}"#, "allow"),
            (r#"{"response_flags":"UF","policy":"-"}"#, "error"),
            (r#"{"method":"GET","code":403,"response_flags":"-"}"#, "deny"),
            (r#"{"method":"GET","code":403,"response_flags":"-","policy":"deny (shop/only-jason rule 0: no ALLOW policy matched)"}"#, "deny"),
            // The application's own 403: the waypoint's policy allowed it,
            // or none applies.
            (r#"{"method":"GET","code":403,"response_flags":"-","policy":"allow (shop/only-jason rule 0: ALLOW policy matched)"}"#, "allow"),
            (r#"{"method":"GET","code":403,"response_flags":"-","policy":"-"}"#, "allow"),
            (r#"{"method":"GET","code":404,"response_flags":"NR"}"#, "error"),
            (r#"{"method":"GET","code":418,"response_flags":"FI"}"#, "error"),
            (r#"{"method":"GET","code":200,"response_flags":"-"}"#, "allow"),
            (r#"{"method":"GET","code":0,"response_flags":"DC"}"#, "allow"),
            (r#"{"method":"GET","code":200,"response_flags":"DI"}"#, "allow"),
            (r#"{"method":"GET","code":404,"response_flags":"-"}"#, "allow"),
            (r#"{"method":"GET","code":429,"response_flags":"RL"}"#, "error"),
            (r#"{"method":"GET","code":503,"response_flags":"UH"}"#, "error"),
        ];
        for (line, want) in rows {
            assert_eq!(verdict(&serde_json::from_str(line).unwrap()), want, "{line}");
        }
        let f = Filter { verdict: Some("deny".into()), protocol: Some("tcp".into()), ..Default::default() };
        assert!(f.matches(&serde_json::from_str(rows[0].0).unwrap()));
        assert!(!f.matches(&serde_json::from_str(rows[4].0).unwrap()), "http, not tcp");
    }
}
