//! A one-shot HTTP/1.1 GET, blocking: what the tools (the local mesh, the
//! `skiff` CLI) use to read a proxy's admin, metrics or readiness port, or
//! a Prometheus server. `Connection: close`, the body read to the end
//! (bounded), chunked bodies decoded.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

/// The largest response read.
const MAX_RESPONSE: u64 = 64 << 20;

/// GETs `path` from `addr` (sending `Host: host`), waiting at most
/// `timeout` for each read: the status and the body. The socket is made
/// in the calling thread's network namespace.
pub fn get(addr: SocketAddr, host: &str, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(timeout))?;
    get_on(s, &addr.to_string(), host, path)
}

/// GETs `path` over a connection already made (`what` names its far end
/// in errors); the caller bounds its reads.
pub fn get_on(mut s: impl Read + Write, what: &str, host: &str, path: &str) -> std::io::Result<(u16, String)> {
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{what}{path}: {why}"));
    // One write: a server that answers after its first read and closes
    // would otherwise reset the connection on the rest.
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut raw = Vec::new();
    s.take(MAX_RESPONSE).read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw);
    let status = raw.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| bad("not an HTTP response"))?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked { dechunk(body).ok_or_else(|| bad("a malformed chunked body"))? } else { body.to_owned() };
    Ok((status, body))
}

/// The data of an HTTP/1.1 chunked body.
pub fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let n = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if n == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..n)?);
        body = rest.get(n..)?.strip_prefix("\r\n")?;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn chunked_bodies_are_decoded_and_malformed_ones_refused() {
        assert_eq!(super::dechunk("3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n").as_deref(), Some("abcde"));
        assert_eq!(super::dechunk("5\r\nabc\r\n0\r\n\r\n"), None);
        assert_eq!(super::dechunk("zz\r\n"), None);
    }
}
