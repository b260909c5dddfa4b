//! node-agent's readiness endpoint: `GET /healthz/ready` answers 200 once
//! capture is installed and the first reconcile with a complete view of the
//! cluster is done, 503 before. The DaemonSet's readiness therefore says
//! "capture is in place on this node".

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

/// Serves readiness on `addr` from a background thread.
pub fn serve(addr: SocketAddr, ready: Arc<AtomicBool>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    thread::Builder::new().name("readiness".into()).spawn(move || {
        for conn in listener.incoming().flatten() {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 1024];
            let n = (&conn).read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = match path {
                "/healthz/ready" if ready.load(Ordering::Relaxed) => ("200 OK", "ready\n"),
                "/healthz/ready" => ("503 Service Unavailable", "not ready: capture not installed or first reconcile not done\n"),
                _ => ("404 Not Found", "not found: try /healthz/ready\n"),
            };
            let _ = write!(
                &conn,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    })?;
    Ok(local)
}
