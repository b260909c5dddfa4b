//! Small programs for the local mesh's pods (demo and tests): an echo server
//! and client that report what each side saw, and a two-tier HTTP app.
//! Standard library, clap and serde_json (and the OpenTelemetry protobuf
//! messages, for the trace collector) only; one thread per connection.

use std::{
    env,
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs},
    process::ExitCode,
    thread,
    sync::OnceLock,
    time::Duration,
};

use clap::{Parser, Subcommand};
use serde_json::json;

static BACKEND_URL: OnceLock<String> = OnceLock::new();

/// Small programs for the local mesh's pods: servers log JSON lines, clients
/// print one JSON line of what they saw.
#[derive(Parser)]
#[command(name = "skiff-demo-app")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// A trace collector: OTLP/HTTP protobuf on /v1/traces, Zipkin v2 JSON
    /// on /api/v2/spans; logs every span it receives as a JSON line.
    TraceCollector {
        #[arg(long)]
        port: u16,
        /// Log one line per export (its span count) instead of one per span.
        #[arg(long)]
        quiet: bool,
    },
    /// Echo what each connection sends; log peers as JSON lines.
    EchoServer {
        #[arg(long)]
        port: u16,
    },
    /// Connect, send, print peer and reply as JSON.
    Client {
        /// HOST:PORT (an IPv4 address first, if it has one).
        #[arg(long)]
        target: String,
        #[arg(long, allow_hyphen_values = true)]
        message: String,
        /// After sending, wait this long before closing the sending side.
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
        /// Keep sending a numbered chunk every 50 ms for this long.
        #[arg(long, default_value_t = 0)]
        stream_ms: u64,
        /// Set this SO_MARK on the socket before connecting (a process
        /// with CAP_NET_RAW trying to pass for ztunnel).
        #[arg(long, value_parser = parse_mark)]
        mark: Option<u32>,
    },
    /// Open COUNT connections to TARGET and hold them all open at once;
    /// then close each one's sending side and read its echo. Prints how
    /// many opened and how many echoed, as JSON.
    Hold {
        #[arg(long)]
        target: String,
        #[arg(long)]
        count: usize,
        /// Send nothing: print how many opened, hold them this long
        /// silent, then report how many the server closed meanwhile (a
        /// peer that never starts its handshake).
        #[arg(long)]
        silent_ms: Option<u64>,
    },
    /// A slow client (slowloris): open COUNT connections, start an HTTP/1.1
    /// request on each and send one more header line every second, never
    /// ending the headers, for FOR_MS; report how many the server closed
    /// and when.
    Slowloris {
        #[arg(long)]
        target: String,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        for_ms: u64,
    },
    /// An HTTP/2 stream flood (cleartext, prior knowledge): open STREAMS
    /// request streams on one connection at once without ending any (or,
    /// with --reset, reset each right away: "rapid reset"); report what
    /// the server answered (its stream limit, refused streams, GOAWAY).
    H2Flood {
        #[arg(long)]
        target: String,
        #[arg(long)]
        authority: String,
        #[arg(long)]
        streams: u32,
        #[arg(long)]
        reset: bool,
    },
    /// On each connection: send BYTES bytes, wait a moment, then reset
    /// the connection (RST, SO_LINGER 0) instead of closing it.
    ResetServer {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        bytes: usize,
    },
    /// Connect and read until the connection ends; print how many bytes
    /// came and how it ended (`eof` or `reset`) as JSON.
    ReadAll {
        #[arg(long)]
        target: String,
    },
    /// Try to bind the port; print whether that worked as JSON.
    Bind {
        #[arg(long)]
        port: u16,
        /// Set this SO_MARK on the socket before binding.
        #[arg(long, value_parser = parse_mark)]
        mark: Option<u32>,
    },
    /// Answer every request with this pod's name and version.
    HttpBackend {
        #[arg(long)]
        port: u16,
        /// Also serve HTTPS on this port (one request per connection), with
        /// --tls-cert and --tls-key (PEM files).
        #[arg(long, requires_all = ["tls_cert", "tls_key"])]
        tls_port: Option<u16>,
        #[arg(long)]
        tls_cert: Option<std::path::PathBuf>,
        #[arg(long)]
        tls_key: Option<std::path::PathBuf>,
    },
    /// Call the backend for every request.
    HttpFrontend {
        #[arg(long)]
        port: u16,
        /// The backend's http:// URL.
        #[arg(long)]
        backend: String,
    },
    /// Answer each `--size`-byte request with as many bytes (benchmark server).
    RrServer {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 1024)]
        size: usize,
    },
    /// Round trips of `--size` bytes; print latency percentiles (µs) as JSON.
    RrClient {
        #[arg(long)]
        target: String,
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[arg(long, default_value_t = 10000)]
        count: usize,
        #[arg(long, default_value_t = 500)]
        warmup: usize,
    },
    /// Open CONNECTS connections to TARGET one after another as fast as
    /// possible, keeping the newest KEEP open (older ones are reset, so
    /// no port waits in TIME_WAIT); print how many opened and how many were
    /// refused with EPERM as JSON, then keep what is open for HOLD_MS.
    Flood {
        #[arg(long)]
        target: String,
        #[arg(long)]
        connects: usize,
        #[arg(long)]
        keep: usize,
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
        /// Do not wait for handshakes: a connect in progress counts as opened.
        #[arg(long)]
        nonblocking: bool,
    },
    /// One socket, TIMES times: connect to TARGET, undo it
    /// (connect AF_UNSPEC), connect to 127.0.0.1:9 (refused), undo that.
    /// Prints how each kind of connect ended, as JSON. A socket reused this
    /// way must not leave capture state behind.
    Reconnect {
        #[arg(long)]
        target: String,
        #[arg(long)]
        times: usize,
    },
    /// New HTTP connections one after another; print their rate and latency as JSON.
    Churn {
        #[arg(long)]
        target: String,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// Keep-alive HTTP/1.1 server answering every request with `--size` bytes.
    HttpFixed {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 1024)]
        size: usize,
    },
    /// The relay floor's client side (`bench hbone`): each TCP connection
    /// accepted on a route's LISTEN address is carried over its own mutual
    /// TLS connection (the mesh's CA, TLS 1.3, ztunnel's cipher suites) to
    /// the route's PEER, a `relay-in`. No policy, no metrics, no HTTP/2: a
    /// floor for what a tunnel costs.
    RelayOut {
        /// LISTEN=PEER (both HOST:PORT), repeatable.
        #[arg(long = "route", required = true)]
        routes: Vec<String>,
    },
    /// The relay floor's server side: terminates the mutual TLS of
    /// `relay-out` (the peer must prove relay-out's identity) and carries
    /// each connection to the route's TARGET in plain TCP.
    RelayIn {
        /// LISTEN=TARGET (both HOST:PORT), repeatable.
        #[arg(long = "route", required = true)]
        routes: Vec<String>,
    },
    /// Count what each connection sends and answer with the count.
    BulkServer {
        #[arg(long)]
        port: u16,
    },
    /// Send for `--seconds`; print the rate the server confirmed as JSON.
    BulkClient {
        #[arg(long)]
        target: String,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// Requests over one keep-alive connection; print status and version counts as JSON.
    HttpLoad {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// A request header line, `Name: value` (repeatable).
        #[arg(long = "header", value_name = "NAME: VALUE", allow_hyphen_values = true)]
        headers: Vec<String>,
        #[arg(long, default_value = "GET")]
        method: String,
        /// Concurrent clients, each printing its own JSON line.
        #[arg(long, default_value_t = 1)]
        parallel: usize,
    },
    /// Print the body of one GET.
    HttpGet { url: String },
}

fn pod() -> String {
    env::var("POD_NAME").unwrap_or_else(|_| "unknown".into())
}

/// One JSON line on stdout, flushed: the pods' logs are read while they run.
fn log(line: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// `x` to `decimals` places, as the figures were when printed with `{:.N}`.
fn round(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

fn listen(port: u16) -> TcpListener {
    let addr = format!("0.0.0.0:{port}");
    TcpListener::bind(&addr).unwrap_or_else(|e| {
        eprintln!("cannot listen on {addr}: {e}");
        std::process::exit(1)
    })
}

fn echo_server(port: u16) -> ExitCode {
    let l = listen(port);
    log(json!({"event": "listening", "port": port}));
    for s in l.incoming().flatten() {
        thread::spawn(move || {
            let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
            log(json!({"event": "accepted", "peer": peer, "local": local}));
            let mut s = s;
            let mut data = Vec::new();
            let _ = s.read_to_end(&mut data);
            let text = String::from_utf8_lossy(&data).into_owned();
            log(json!({"event": "received", "peer": peer, "bytes": data.len(), "data": text}));
            let _ = s.write_all(format!("echo from {}: {text}", pod()).as_bytes());
        });
    }
    ExitCode::SUCCESS
}

/// `0x539` or `1337`.
fn parse_mark(s: &str) -> Result<u32, String> {
    match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s:?}: {e}"))
}

/// An IPv4 TCP socket carrying `mark` (SO_MARK: needs CAP_NET_RAW or
/// CAP_NET_ADMIN).
fn marked_socket(mark: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType};
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::Mark, &mark)?;
    Ok(fd)
}

/// Binds 0.0.0.0:`port` (and listens), with a mark if given.
fn bind_marked(port: u16, mark: Option<u32>) -> std::io::Result<TcpListener> {
    let Some(mark) = mark else { return TcpListener::bind(format!("0.0.0.0:{port}")) };
    let fd = marked_socket(mark)?;
    nix::sys::socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &nix::sys::socket::SockaddrIn::new(0, 0, 0, 0, port))?;
    nix::sys::socket::listen(&fd, nix::sys::socket::Backlog::new(16).expect("valid backlog"))?;
    Ok(TcpListener::from(fd))
}

fn client(target: &str, message: &str, hold: Duration, stream: Duration, mark: Option<u32>) -> ExitCode {
    let result = (|| -> std::io::Result<(String, String, String, String)> {
        let addrs: Vec<_> = target.to_socket_addrs()?.collect();
        let addr = addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()).copied().ok_or(std::io::ErrorKind::NotFound)?;
        let mut s = match (mark, addr) {
            (Some(mark), std::net::SocketAddr::V4(a)) => {
                let fd = marked_socket(mark)?;
                nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &nix::sys::socket::SockaddrIn::from(a))?;
                TcpStream::from(fd)
            }
            _ => TcpStream::connect_timeout(&addr, Duration::from_secs(5))?,
        };
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let peer = s.peer_addr()?.to_string();
        let local = s.local_addr()?.to_string();
        s.write_all(message.as_bytes())?;
        // --stream-ms: keep sending a numbered chunk every 50 ms.
        let start = std::time::Instant::now();
        let mut i = 0;
        while start.elapsed() < stream {
            thread::sleep(Duration::from_millis(50));
            s.write_all(format!(" chunk-{i}").as_bytes())?;
            i += 1;
        }
        thread::sleep(hold);
        // Asked again at the end: a long-lived connection keeps its answer.
        let peer_after = s.peer_addr()?.to_string();
        s.shutdown(Shutdown::Write)?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        Ok((peer, local, reply, peer_after))
    })();
    match result {
        Ok((peer, local, reply, peer_after)) => {
            log(json!({"peer": peer, "local": local, "reply": reply, "peer_after": peer_after}));
            ExitCode::SUCCESS
        }
        Err(e) => {
            log(json!({"error": e.to_string()}));
            ExitCode::FAILURE
        }
    }
}

/// Request/response server: reads `size`-byte requests and answers each
/// with `size` bytes, until the client closes.
fn rr_server(port: u16, size: usize) -> ExitCode {
    let l = listen(port);
    log(json!({"event": "listening", "port": port}));
    for s in l.incoming().flatten() {
        thread::spawn(move || {
            let mut s = s;
            let _ = s.set_nodelay(true);
            let mut buf = vec![0u8; size];
            while s.read_exact(&mut buf).is_ok() {
                if s.write_all(&buf).is_err() {
                    break;
                }
            }
        });
    }
    ExitCode::SUCCESS
}

/// Request/response client: `count` round trips of `size` bytes after
/// `warmup` ones; prints latency percentiles in microseconds as JSON.
fn rr_client(target: &str, size: usize, count: usize, warmup: usize) -> ExitCode {
    let run = || -> std::io::Result<Vec<u128>> {
        let addr = target.to_socket_addrs()?.next().ok_or(std::io::ErrorKind::NotFound)?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let req = vec![7u8; size];
        let mut resp = vec![0u8; size];
        let mut lat = Vec::with_capacity(count);
        for i in 0..warmup + count {
            let t = std::time::Instant::now();
            s.write_all(&req)?;
            s.read_exact(&mut resp)?;
            if i >= warmup {
                lat.push(t.elapsed().as_micros());
            }
        }
        Ok(lat)
    };
    match run() {
        Ok(mut lat) => {
            lat.sort_unstable();
            let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
            let mean = lat.iter().sum::<u128>() as f64 / lat.len() as f64;
            log(json!({
                "count": lat.len(),
                "p50_us": pct(0.5),
                "p90_us": pct(0.9),
                "p99_us": pct(0.99),
                "p999_us": pct(0.999),
                "mean_us": round(mean, 1),
            }));
            ExitCode::SUCCESS
        }
        Err(e) => {
            log(json!({"error": e.to_string()}));
            ExitCode::FAILURE
        }
    }
}

/// New-connection churn: for `secs`, one connection after another: connect,
/// send an HTTP/1.1 GET (`Connection: close`), read the first byte of the
/// answer, close. Prints connections per second and the connect-to-first-
/// byte latency percentiles as JSON.
fn churn(target: &str, secs: f64) -> ExitCode {
    let run = || -> std::io::Result<(Vec<u128>, usize)> {
        let addr = target.to_socket_addrs()?.next().ok_or(std::io::ErrorKind::NotFound)?;
        let req = format!("GET / HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");
        let end = std::time::Instant::now() + Duration::from_secs_f64(secs);
        let (mut lat, mut errors) = (Vec::new(), 0usize);
        while std::time::Instant::now() < end {
            let t = std::time::Instant::now();
            let one = || -> std::io::Result<()> {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(req.as_bytes())?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b)
            };
            match one() {
                Ok(()) => lat.push(t.elapsed().as_micros()),
                Err(_) => errors += 1,
            }
        }
        Ok((lat, errors))
    };
    match run() {
        Ok((mut lat, errors)) if !lat.is_empty() => {
            lat.sort_unstable();
            let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
            log(json!({
                "connections": lat.len(),
                "errors": errors,
                "per_second": round(lat.len() as f64 / secs, 1),
                "p50_us": pct(0.5),
                "p90_us": pct(0.9),
                "p99_us": pct(0.99),
            }));
            ExitCode::SUCCESS
        }
        Ok((_, errors)) => {
            log(json!({"error": format!("no connection succeeded ({errors} failed)")}));
            ExitCode::FAILURE
        }
        Err(e) => {
            log(json!({"error": e.to_string()}));
            ExitCode::FAILURE
        }
    }
}

/// Keep-alive HTTP/1.1 server answering every request with `size` bytes:
/// the benchmark backend (load tools reuse connections).
fn http_fixed(port: u16, size: usize) -> ExitCode {
    let l = listen(port);
    log(json!({"event": "listening", "port": port}));
    // The body starts with the pod's name (so a client can tell which
    // version answered) and is padded to `size` bytes.
    let mut body = format!("{}\n", pod());
    body.push_str(&"x".repeat(size.saturating_sub(body.len())));
    for s in l.incoming().flatten() {
        let body = body.clone();
        thread::spawn(move || {
            let _ = s.set_nodelay(true);
            let Ok(w) = s.try_clone() else { return };
            let mut r = BufReader::new(s);
            let mut w = w;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                let mut len = 0usize;
                let mut close = false;
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 {
                        return;
                    }
                    if h == "\r\n" || h == "\n" {
                        break;
                    }
                    let lower = h.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    if lower.strip_prefix("connection:").is_some_and(|v| v.trim() == "close") {
                        close = true;
                    }
                }
                let mut req_body = vec![0u8; len];
                if r.read_exact(&mut req_body).is_err() {
                    return;
                }
                let conn = if close { "Connection: close\r\n" } else { "" };
                let resp = format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{conn}\r\n{body}", body.len());
                if w.write_all(resp.as_bytes()).is_err() || close {
                    return;
                }
            }
        });
    }
    ExitCode::SUCCESS
}

/// Bulk sink: counts what a connection sends and answers with the count.
fn bulk_server(port: u16) -> ExitCode {
    let l = listen(port);
    log(json!({"event": "listening", "port": port}));
    for s in l.incoming().flatten() {
        thread::spawn(move || {
            let mut s = s;
            let mut buf = vec![0u8; 256 * 1024];
            let mut total: u64 = 0;
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            let _ = s.write_all(total.to_string().as_bytes());
        });
    }
    ExitCode::SUCCESS
}

/// Bulk source: sends for `secs` seconds, then reports the rate the server
/// confirmed receiving.
fn bulk_client(target: &str, secs: f64) -> ExitCode {
    let run = || -> std::io::Result<(u64, f64)> {
        let addr = target.to_socket_addrs()?.next().ok_or(std::io::ErrorKind::NotFound)?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        let buf = vec![1u8; 256 * 1024];
        let start = std::time::Instant::now();
        while start.elapsed().as_secs_f64() < secs {
            s.write_all(&buf)?;
        }
        s.shutdown(Shutdown::Write)?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        let elapsed = start.elapsed().as_secs_f64();
        Ok((answer.trim().parse().unwrap_or(0), elapsed))
    };
    match run() {
        Ok((bytes, elapsed)) => {
            log(json!({
                "bytes": bytes,
                "seconds": round(elapsed, 3),
                "gbit_per_s": round(bytes as f64 * 8.0 / elapsed / 1e9, 3),
            }));
            ExitCode::SUCCESS
        }
        Err(e) => {
            log(json!({"error": e.to_string()}));
            ExitCode::FAILURE
        }
    }
}

/// One parsed request: request line and lower-cased headers.
struct Req {
    line: String,
    headers: Vec<(String, String)>,
}

impl Req {
    fn header(&self, k: &str) -> &str {
        self.headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str()).unwrap_or("-")
    }

    fn path(&self) -> &str {
        self.line.split_whitespace().nth(1).unwrap_or("/")
    }
}

fn read_request(s: &mut TcpStream) -> Option<Req> {
    let mut r = BufReader::new(s.try_clone().ok()?);
    parse_request(&mut r)
}

fn parse_request<R: BufRead>(r: &mut R) -> Option<Req> {
    let mut first = String::new();
    r.read_line(&mut first).ok()?;
    let mut headers = Vec::new();
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            let k = k.trim().to_ascii_lowercase();
            if k == "content-length" {
                len = v.trim().parse().unwrap_or(0);
            }
            headers.push((k, v.trim().to_owned()));
        }
    }
    let mut body = vec![0u8; len.min(1 << 20)];
    let _ = r.read_exact(&mut body);
    Some(Req { line: first.trim().to_owned(), headers })
}

/// Receives spans (see `Cmd::TraceCollector`): each decoded with the
/// format's own definition — OTLP with the OpenTelemetry protobuf
/// messages, Zipkin as its JSON — and logged as
/// `{"event":"span","format",...,"trace_id","span_id","parent_span_id","name","kind","service","attributes"}`.
fn trace_collector(port: u16, quiet: bool) -> ExitCode {
    let l = listen(port);
    log(json!({"event": "listening", "port": port}));
    for s in l.incoming().flatten() {
        thread::spawn(move || {
            let mut s = s;
            let mut r = BufReader::new(match s.try_clone() {
                Ok(c) => c,
                Err(_) => return,
            });
            loop {
                let mut first = String::new();
                if r.read_line(&mut first).unwrap_or(0) == 0 {
                    return;
                }
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = line.split_once(':') {
                        if k.trim().eq_ignore_ascii_case("content-length") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                }
                let mut body = vec![0u8; len.min(16 << 20)];
                if r.read_exact(&mut body).is_err() {
                    return;
                }
                let path = first.split_whitespace().nth(1).unwrap_or("/");
                let (status, spans) = match path {
                    "/v1/traces" => otlp_spans(&body),
                    "/api/v2/spans" => zipkin_spans(&body),
                    _ => ("404 Not Found", Err(format!("no collector at {path}"))),
                };
                match spans {
                    Ok(spans) if quiet => log(json!({"event": "export", "path": path, "spans": spans.len()})),
                    Ok(spans) => spans.into_iter().for_each(log),
                    Err(e) => log(json!({"event": "bad_export", "path": path, "error": e})),
                }
                let _ = write!(s, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
            }
        });
    }
    ExitCode::SUCCESS
}

type Spans = Result<Vec<serde_json::Value>, String>;

fn otlp_spans(body: &[u8]) -> (&'static str, Spans) {
    use opentelemetry_proto::tonic::{collector::trace::v1::ExportTraceServiceRequest, common::v1::any_value::Value};
    let req = match <ExportTraceServiceRequest as prost::Message>::decode(body) {
        Ok(r) => r,
        Err(e) => return ("400 Bad Request", Err(format!("not an OTLP ExportTraceServiceRequest: {e}"))),
    };
    let text = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => json!(s),
        Some(Value::BoolValue(b)) => json!(b),
        Some(Value::IntValue(i)) => json!(i),
        Some(Value::DoubleValue(d)) => json!(d),
        other => json!(format!("{other:?}")),
    };
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let mut out = Vec::new();
    for rs in &req.resource_spans {
        let service = rs.resource.as_ref().and_then(|r| r.attributes.iter().find(|a| a.key == "service.name")).map(|a| text(&a.value)).unwrap_or(json!(null));
        for ss in &rs.scope_spans {
            for sp in &ss.spans {
                let attributes: serde_json::Map<String, serde_json::Value> = sp.attributes.iter().map(|a| (a.key.clone(), text(&a.value))).collect();
                let kind = match sp.kind {
                    2 => "SERVER",
                    3 => "CLIENT",
                    _ => "OTHER",
                };
                out.push(json!({"event": "span", "format": "otlp", "trace_id": hex(&sp.trace_id), "span_id": hex(&sp.span_id),
                    "parent_span_id": hex(&sp.parent_span_id), "name": sp.name, "kind": kind, "service": service,
                    "error": sp.status.as_ref().is_some_and(|s| s.code == 2), "attributes": attributes}));
            }
        }
    }
    ("200 OK", Ok(out))
}

fn zipkin_spans(body: &[u8]) -> (&'static str, Spans) {
    let spans: Vec<serde_json::Value> = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return ("400 Bad Request", Err(format!("not a Zipkin v2 JSON span list: {e}"))),
    };
    let out = spans
        .into_iter()
        .map(|sp| {
            json!({"event": "span", "format": "zipkin", "trace_id": sp["traceId"], "span_id": sp["id"],
                "parent_span_id": sp.get("parentId").cloned().unwrap_or(json!("")), "name": sp["name"], "kind": sp["kind"],
                "service": sp["localEndpoint"]["serviceName"], "attributes": sp["tags"]})
        })
        .collect();
    ("202 Accepted", Ok(out))
}

fn respond_conn(s: &mut TcpStream, status: &str, body: &str, keep_alive: bool) {
    let connection = if keep_alive { "" } else { "Connection: close\r\n" };
    let _ = write!(s, "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{connection}\r\n{body}", body.len());
}

fn http_get(url: &str) -> Result<(u16, String), String> {
    let rest = url.strip_prefix("http://").ok_or("only http:// URLs")?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let hostport = if hostport.contains(':') { hostport.to_owned() } else { format!("{hostport}:80") };
    let addr = hostport.to_socket_addrs().map_err(|e| format!("resolving {hostport}: {e}"))?.next().ok_or("no address")?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| format!("connecting to {hostport}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    let host = hostport.split(':').next().unwrap_or("");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).map_err(|e| format!("reading from {hostport}: {e}"))?;
    let status = raw.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or("malformed response")?;
    let body = raw.split_once("\r\n\r\n").map(|x| x.1.to_owned()).unwrap_or_default();
    Ok((status, body))
}

fn http_server(port: u16, handler: fn(&TcpStream, &Req) -> (String, String)) -> ExitCode {
    let l = listen(port);
    log(json!({"event": "listening", "port": port}));
    for s in l.incoming().flatten() {
        thread::spawn(move || {
            let mut s = s;
            // One request per connection, except under `/keep`: those keep
            // the connection open for the next request (keep-alive).
            while let Some(req) = read_request(&mut s) {
                let (status, body) = handler(&s, &req);
                // No status: close without answering (the request was read).
                if status.is_empty() {
                    break;
                }
                let keep = req.path().starts_with("/keep");
                respond_conn(&mut s, &status, &body, keep);
                if !keep {
                    break;
                }
            }
        });
    }
    ExitCode::SUCCESS
}

/// HTTPS (TLS 1.2 or 1.3, `http/1.1`), one request per connection; the
/// certificate and key are PEM files.
fn https_server(port: u16, cert: &std::path::Path, key: &std::path::Path, handler: fn(&TcpStream, &Req) -> (String, String)) {
    use rustls::pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = match CertificateDer::pem_file_iter(cert).and_then(|i| i.collect::<Result<_, _>>()) {
        Ok(c) => c,
        Err(e) => return eprintln!("cannot read {}: {e}", cert.display()),
    };
    let key = match PrivateKeyDer::from_pem_file(key) {
        Ok(k) => k,
        Err(e) => return eprintln!("cannot read {}: {e}", key.display()),
    };
    let cfg = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key));
    let mut cfg = match cfg {
        Ok(c) => c,
        Err(e) => return eprintln!("TLS configuration: {e}"),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let cfg = std::sync::Arc::new(cfg);
    let l = listen(port);
    log(json!({"event": "listening", "port": port, "tls": true}));
    for s in l.incoming().flatten() {
        let cfg = cfg.clone();
        thread::spawn(move || {
            let Ok(peer) = s.try_clone() else { return };
            let Ok(conn) = rustls::ServerConnection::new(cfg) else { return };
            let mut r = BufReader::new(rustls::StreamOwned::new(conn, s));
            let Some(req) = parse_request(&mut r) else { return };
            let sni = r.get_ref().conn.server_name().unwrap_or("-").to_owned();
            log(json!({"event": "tls", "port": port, "sni": sni, "path": req.path()}));
            let (status, body) = handler(&peer, &req);
            if status.is_empty() {
                return;
            }
            let tls = r.get_mut();
            let _ = write!(tls, "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            tls.conn.send_close_notify();
            let _ = tls.flush();
        });
    }
}

static SERVED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Answers with what it saw. `FAIL_FIRST=N`: the first N requests get 503;
/// paths under `/slow` take 2 s; paths under `/reset` are read, then the
/// connection is closed without an answer.
fn backend(s: &TcpStream, req: &Req) -> (String, String) {
    let peer = s.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
    let version = env::var("VERSION").unwrap_or_else(|_| "v1".into());
    let n = SERVED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    log(json!({"event": "request", "path": req.path(), "host": req.header("host"), "peer": peer}));
    if req.path().starts_with("/reset") {
        return (String::new(), String::new());
    }
    let fail_first: u64 = env::var("FAIL_FIRST").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    if n < fail_first {
        return ("503 Service Unavailable".into(), format!("backend {} failing request {n}\n", pod()));
    }
    if req.path().starts_with("/slow") {
        thread::sleep(Duration::from_secs(2));
    }
    (
        "200 OK".into(),
        format!(
            "backend {} version={version} path={} saw client {peer} traceparent={} x-b3-traceid={} user-agent={} x-dest={}\n",
            pod(),
            req.path(),
            req.header("traceparent"),
            req.header("x-b3-traceid"),
            req.header("user-agent"),
            req.header("x-dest"),
        ),
    )
}

/// N requests over one keep-alive connection; prints status and version
/// counts and each request's latency (ms) as JSON.
fn http_load(url: &str, method: &str, count: usize, headers: &[String]) -> ExitCode {
    type Outcome = (BTreeMapStr, BTreeMapStr, Vec<u128>, Vec<String>, Vec<Vec<String>>);
    let run = || -> Result<Outcome, String> {
        let rest = url.strip_prefix("http://").ok_or("only http:// URLs")?;
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let hostport = if hostport.contains(':') { hostport.to_owned() } else { format!("{hostport}:80") };
        let addr = hostport.to_socket_addrs().map_err(|e| format!("{hostport}: {e}"))?.next().ok_or("no address")?;
        let host = hostport.split(':').next().unwrap_or("");
        let mut codes = BTreeMapStr::new();
        let mut versions = BTreeMapStr::new();
        let mut lat = Vec::new();
        let mut bodies = Vec::new();
        // `location`, `x-*` and `access-control-*` response headers of the
        // first responses.
        let mut resp_headers = Vec::new();
        let mut conn: Option<BufReader<TcpStream>> = None;
        for _ in 0..count {
            let start = std::time::Instant::now();
            if conn.is_none() {
                let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(Duration::from_secs(15))).map_err(|e| e.to_string())?;
                conn = Some(BufReader::new(s));
            }
            let r = conn.as_mut().expect("connected");
            // A `Host` given as a header replaces the URL's (a virtual host
            // behind one address, as at an ingress gateway).
            let own_host = headers.iter().any(|h| h.split(':').next().is_some_and(|n| n.trim().eq_ignore_ascii_case("host")));
            let mut req = if own_host {
                format!("{method} {path} HTTP/1.1\r\nContent-Length: 0\r\n")
            } else {
                format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n")
            };
            for h in headers {
                req.push_str(h);
                req.push_str("\r\n");
            }
            req.push_str("\r\n");
            r.get_mut().write_all(req.as_bytes()).map_err(|e| e.to_string())?;
            let mut status = String::new();
            r.read_line(&mut status).map_err(|e| e.to_string())?;
            let code = status.split_whitespace().nth(1).unwrap_or("000").to_owned();
            let (mut len, mut close) = (0usize, false);
            let mut seen = Vec::new();
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).map_err(|e| e.to_string())? == 0 || line == "\r\n" {
                    break;
                }
                let l = line.to_ascii_lowercase();
                if let Some(v) = l.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                if l.starts_with("connection:") && l.contains("close") {
                    close = true;
                }
                if l.starts_with("location:") || l.starts_with("x-") || l.starts_with("access-control-") {
                    seen.push(line.trim_end().to_owned());
                }
            }
            let mut body = vec![0u8; len];
            r.read_exact(&mut body).map_err(|e| e.to_string())?;
            let body = String::from_utf8_lossy(&body).into_owned();
            lat.push(start.elapsed().as_millis());
            *codes.entry(code).or_insert(0) += 1;
            let version = body.split_whitespace().find_map(|w| w.strip_prefix("version=")).unwrap_or("none").to_owned();
            *versions.entry(version).or_insert(0) += 1;
            if bodies.len() < 5 {
                bodies.push(body.trim().to_owned());
                resp_headers.push(seen);
            }
            if close {
                conn = None;
            }
        }
        Ok((codes, versions, lat, bodies, resp_headers))
    };
    match run() {
        Ok((codes, versions, lat, bodies, headers)) => {
            log(json!({"codes": codes, "versions": versions, "latency_ms": lat, "bodies": bodies, "headers": headers}));
            ExitCode::SUCCESS
        }
        Err(e) => {
            log(json!({"error": e}));
            ExitCode::FAILURE
        }
    }
}

type BTreeMapStr = std::collections::BTreeMap<String, u64>;

fn frontend(_s: &TcpStream, _req: &Req) -> (String, String) {
    let url = BACKEND_URL.get().map(String::as_str).unwrap_or_default();
    match http_get(url) {
        Ok((code, body)) => ("200 OK".into(), format!("frontend {} -> [{code}] {body}", pod())),
        Err(e) => ("502 Bad Gateway".into(), format!("frontend {} -> backend failed: {e}\n", pod())),
    }
}

/// `target`'s first IPv4 address; logs the failure when it has none.
fn ipv4_target(target: &str) -> Option<std::net::SocketAddrV4> {
    let found = target.to_socket_addrs().ok().and_then(|mut a| {
        a.find_map(|a| match a {
            std::net::SocketAddr::V4(v4) => Some(v4),
            std::net::SocketAddr::V6(_) => None,
        })
    });
    if found.is_none() {
        log(json!({"error": format!("cannot resolve {target}")}));
    }
    found
}

/// Many connections at once (see `Cmd::Hold`).
fn hold(target: &str, count: usize, silent_ms: Option<u64>) -> ExitCode {
    let Some(addr) = ipv4_target(target).map(std::net::SocketAddr::V4) else { return ExitCode::FAILURE };
    let mut conns = Vec::with_capacity(count);
    let mut errors = Vec::new();
    for i in 0..count {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(10)).and_then(|mut s| {
            if silent_ms.is_none() {
                s.write_all(format!("conn-{i}").as_bytes())?;
            }
            Ok(s)
        }) {
            Ok(s) => conns.push(s),
            Err(e) if errors.len() < 5 => errors.push(format!("conn-{i}: {e}")),
            Err(_) => {}
        }
    }
    let opened = conns.len();
    if let Some(ms) = silent_ms {
        log(json!({"opened": opened, "errors": errors}));
        std::thread::sleep(Duration::from_millis(ms));
        // A closed connection reads end-of-file (or a reset) at once.
        let closed = conns
            .iter()
            .filter(|s| {
                let _ = s.set_nonblocking(true);
                let mut r: &TcpStream = s;
                !matches!(r.read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            })
            .count();
        log(json!({"held": opened, "closed_by_server": closed}));
        return ExitCode::SUCCESS;
    }
    // Every connection is open at this point; now end each and read its
    // echo (the echo server answers once the sending side is closed).
    let mut echoed = 0;
    for (i, mut s) in conns.into_iter().enumerate() {
        let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut reply = String::new();
        match s.read_to_string(&mut reply) {
            Ok(_) if reply.ends_with(&format!(": conn-{i}")) => echoed += 1,
            Ok(_) if errors.len() < 5 => errors.push(format!("conn-{i}: reply {reply:?}")),
            Err(e) if errors.len() < 5 => errors.push(format!("conn-{i}: {e}")),
            _ => {}
        }
    }
    log(json!({"opened": opened, "echoed": echoed, "errors": errors}));
    ExitCode::SUCCESS
}

/// See `Cmd::Reconnect`. Raw libc: connecting to an AF_UNSPEC address
/// (the only way to undo a TCP connect) has no safe wrapper.
#[allow(unsafe_code)]
fn reconnect(target: &str, times: usize) -> ExitCode {
    let Some(addr) = ipv4_target(target) else { return ExitCode::FAILURE };
    let sockaddr = |a: std::net::SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: plain socket calls on a descriptor this function owns, with
    // properly sized address structures.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd < 0 {
        log(json!({"error": std::io::Error::last_os_error().to_string()}));
        return ExitCode::FAILURE;
    }
    let connect = |a: &libc::sockaddr_in| -> Result<(), std::io::Error> {
        // SAFETY: as above.
        let r = unsafe { libc::connect(fd, (a as *const libc::sockaddr_in).cast(), std::mem::size_of::<libc::sockaddr_in>() as u32) };
        if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
    };
    let unspec = libc::sockaddr_in { sin_family: libc::AF_UNSPEC as libc::sa_family_t, sin_port: 0, sin_addr: libc::in_addr { s_addr: 0 }, sin_zero: [0; 8] };
    let (target_sa, closed_sa) = (sockaddr(addr), sockaddr(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 9)));
    let (mut connected, mut refused, mut errors) = (0usize, 0usize, Vec::new());
    for _ in 0..times {
        match connect(&target_sa) {
            Ok(()) => connected += 1,
            Err(e) if errors.len() < 5 => errors.push(format!("target: {e}")),
            Err(_) => {}
        }
        let _ = connect(&unspec);
        match connect(&closed_sa) {
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => refused += 1,
            other if errors.len() < 5 => errors.push(format!("127.0.0.1:9: {other:?}")),
            _ => {}
        }
        let _ = connect(&unspec);
    }
    // SAFETY: as above.
    unsafe { libc::close(fd) };
    log(json!({"connected": connected, "refused": refused, "errors": errors}));
    ExitCode::SUCCESS
}

/// See `Cmd::Flood`.
fn flood(target: &str, connects: usize, keep: usize, hold_ms: u64, nonblocking: bool) -> ExitCode {
    let Some(v4) = ipv4_target(target) else { return ExitCode::FAILURE };
    let addr = std::net::SocketAddr::V4(v4);
    let reset = |s: TcpStream| {
        let _ = nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &libc::linger { l_onoff: 1, l_linger: 0 });
    };
    let mut open = std::collections::VecDeque::with_capacity(keep + 1);
    let (mut opened, mut refused, mut most_open) = (0usize, 0usize, 0usize);
    let mut errors = Vec::new();
    let start = std::time::Instant::now();
    let connect_nonblocking = || -> std::io::Result<TcpStream> {
        use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType, SockaddrIn};
        let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_NONBLOCK, None)?;
        match nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(v4)) {
            Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => Ok(TcpStream::from(fd)),
            Err(e) => Err(e.into()),
        }
    };
    for _ in 0..connects {
        let attempt = if nonblocking { connect_nonblocking() } else { TcpStream::connect_timeout(&addr, Duration::from_secs(5)) };
        match attempt {
            Ok(s) => {
                opened += 1;
                open.push_back(s);
                if open.len() > keep {
                    reset(open.pop_front().expect("not empty"));
                }
                most_open = most_open.max(open.len());
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => refused += 1,
            Err(e) => {
                if errors.len() < 5 {
                    errors.push(e.to_string());
                }
            }
        }
    }
    log(json!({
        "opened": opened, "refused_eperm": refused, "errors": errors, "most_open": most_open,
        "open": open.len(), "seconds": start.elapsed().as_secs_f64(),
    }));
    thread::sleep(Duration::from_millis(hold_ms));
    open.into_iter().for_each(reset);
    log(json!({"event": "closed"}));
    ExitCode::SUCCESS
}

/// See `Cmd::ResetServer`.
fn reset_server(port: u16, bytes: usize) -> ExitCode {
    let l = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            log(json!({"event": "error", "error": e.to_string()}));
            return ExitCode::FAILURE;
        }
    };
    log(json!({"event": "listening", "port": port}));
    for s in l.incoming().flatten() {
        thread::spawn(move || {
            let mut s = s;
            let sent = s.write_all(&vec![b'r'; bytes]).is_ok();
            thread::sleep(Duration::from_millis(300));
            // SO_LINGER 0: closing sends RST instead of FIN.
            let linger = libc::linger { l_onoff: 1, l_linger: 0 };
            let set = nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &linger).is_ok();
            log(json!({"event": "reset", "sent": sent, "linger_set": set}));
        });
    }
    ExitCode::SUCCESS
}

/// See `Cmd::ReadAll`.
fn read_all(target: &str) -> ExitCode {
    let mut s = match TcpStream::connect(target) {
        Ok(s) => s,
        Err(e) => {
            log(json!({"error": format!("connect {target}: {e}")}));
            return ExitCode::FAILURE;
        }
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let (mut total, mut buf) = (0usize, [0u8; 16384]);
    let end = loop {
        match s.read(&mut buf) {
            Ok(0) => break "eof".to_owned(),
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break "reset".to_owned(),
            Err(e) => break format!("error: {e}"),
        }
    };
    log(json!({"bytes": total, "end": end}));
    ExitCode::SUCCESS
}

/// See `Cmd::Slowloris`.
fn slowloris(target: &str, count: usize, for_ms: u64) -> ExitCode {
    let start = std::time::Instant::now();
    let mut conns: Vec<(TcpStream, Option<u64>)> = Vec::new();
    for _ in 0..count {
        if let Ok(mut s) = TcpStream::connect(target) {
            if s.write_all(b"GET / HTTP/1.1\r\nHost: slow\r\n").is_ok() {
                let _ = s.set_nonblocking(true);
                conns.push((s, None));
            }
        }
    }
    let opened = conns.len();
    let mut line = 0u64;
    let mut answers: Vec<String> = Vec::new();
    while start.elapsed() < Duration::from_millis(for_ms) {
        thread::sleep(Duration::from_millis(1000));
        line += 1;
        let at = start.elapsed().as_millis() as u64;
        for (s, closed) in conns.iter_mut().filter(|(_, c)| c.is_none()) {
            // Whatever the server sends (an error response) or a closed
            // socket ends this connection's attack.
            let mut buf = [0u8; 512];
            let gone = match s.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => s.write_all(format!("X-Slow-{line}: 1\r\n").as_bytes()).is_err(),
                Ok(n) if n > 0 => {
                    answers.push(String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or_default().to_owned());
                    true
                }
                _ => true,
            };
            if gone {
                *closed = Some(at);
            }
        }
    }
    let mut times: Vec<u64> = conns.iter().filter_map(|(_, c)| *c).collect();
    times.sort();
    answers.sort();
    answers.dedup();
    log(json!({
        "opened": opened,
        "closed_by_server": times.len(),
        "first_close_ms": times.first(),
        "median_close_ms": times.get(times.len() / 2),
        "last_close_ms": times.last(),
        "answers": answers,
    }));
    ExitCode::SUCCESS
}

/// One HTTP/2 frame header and payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// See `Cmd::H2Flood`.
fn h2_flood(target: &str, authority: &str, streams: u32, reset: bool) -> ExitCode {
    let mut s = match TcpStream::connect(target) {
        Ok(s) => s,
        Err(e) => {
            log(json!({"error": format!("connect {target}: {e}")}));
            return ExitCode::FAILURE;
        }
    };
    // HPACK from the static table: :method GET, :scheme http, :path /,
    // and :authority as a literal without indexing.
    let mut block = vec![0x82, 0x86, 0x84, 0x01, authority.len() as u8];
    block.extend_from_slice(authority.as_bytes());
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(0x4, 0, 0, &[]));
    for i in 0..streams {
        let id = 1 + 2 * i;
        out.extend(h2_frame(0x1, 0x4, id, &block));
        if reset {
            out.extend(h2_frame(0x3, 0, id, &0x8u32.to_be_bytes()));
        }
    }
    let written = s.write_all(&out).is_ok();
    // Read what the server says for a while.
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let mut closed = false;
    while std::time::Instant::now() < deadline {
        match s.read(&mut chunk) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    let (mut max_streams, mut refused, mut other_resets, mut goaway, mut responses) = (None, 0u32, 0u32, None, 0u32);
    let mut at = 0;
    while at + 9 <= buf.len() {
        let len = u32::from_be_bytes([0, buf[at], buf[at + 1], buf[at + 2]]) as usize;
        let (kind, flags) = (buf[at + 3], buf[at + 4]);
        let Some(payload) = buf.get(at + 9..at + 9 + len) else { break };
        match kind {
            0x4 if flags & 1 == 0 => {
                for p in payload.chunks_exact(6) {
                    if u16::from_be_bytes([p[0], p[1]]) == 0x3 {
                        max_streams = Some(u32::from_be_bytes([p[2], p[3], p[4], p[5]]));
                    }
                }
            }
            0x1 => responses += 1,
            0x3 if payload.len() == 4 => {
                if u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) == 0x7 {
                    refused += 1;
                } else {
                    other_resets += 1;
                }
            }
            0x7 if payload.len() >= 8 => goaway = Some(u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]])),
            _ => {}
        }
        at += 9 + len;
    }
    log(json!({
        "written": written,
        "server_max_concurrent_streams": max_streams,
        "refused_streams": refused,
        "other_resets": other_resets,
        "responses": responses,
        "goaway_error": goaway,
        "closed": closed,
    }));
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    // Many connections at once (hold, the echo server) need more than the
    // usual 1024 descriptors.
    let _ = skiff_core::raise_open_file_limit();
    match Cli::parse().cmd {
        Cmd::Hold { target, count, silent_ms } => hold(&target, count, silent_ms),
        Cmd::ResetServer { port, bytes } => reset_server(port, bytes),
        Cmd::ReadAll { target } => read_all(&target),
        Cmd::Slowloris { target, count, for_ms } => slowloris(&target, count, for_ms),
        Cmd::H2Flood { target, authority, streams, reset } => h2_flood(&target, &authority, streams, reset),
        Cmd::EchoServer { port } => echo_server(port),
        Cmd::TraceCollector { port, quiet } => trace_collector(port, quiet),
        Cmd::Client { target, message, hold_ms, stream_ms, mark } => {
            client(&target, &message, Duration::from_millis(hold_ms), Duration::from_millis(stream_ms), mark)
        }
        Cmd::Bind { port, mark } => match bind_marked(port, mark) {
            Ok(_) => {
                log(json!({"bound": true}));
                ExitCode::SUCCESS
            }
            Err(e) => {
                log(json!({"bound": false, "error": e.to_string()}));
                ExitCode::FAILURE
            }
        },
        Cmd::HttpBackend { port, tls_port, tls_cert, tls_key } => {
            if let (Some(p), Some(c), Some(k)) = (tls_port, tls_cert, tls_key) {
                thread::spawn(move || https_server(p, &c, &k, backend));
            }
            http_server(port, backend)
        }
        Cmd::HttpFrontend { port, backend } => {
            let _ = BACKEND_URL.set(backend);
            http_server(port, frontend)
        }
        Cmd::RrServer { port, size } => rr_server(port, size),
        Cmd::RrClient { target, size, count, warmup } => rr_client(&target, size, count, warmup),
        Cmd::Churn { target, seconds } => churn(&target, seconds),
        Cmd::Reconnect { target, times } => reconnect(&target, times),
        Cmd::Flood { target, connects, keep, hold_ms, nonblocking } => flood(&target, connects, keep, hold_ms, nonblocking),
        Cmd::HttpFixed { port, size } => http_fixed(port, size),
        Cmd::BulkServer { port } => bulk_server(port),
        Cmd::RelayOut { routes } => relay::run(relay::Side::Out, &routes),
        Cmd::RelayIn { routes } => relay::run(relay::Side::In, &routes),
        Cmd::BulkClient { target, seconds } => bulk_client(&target, seconds),
        Cmd::HttpLoad { url, count, headers, method, parallel } => {
            if parallel > 1 {
                // Concurrent clients: each prints its own JSON line.
                let hs: Vec<_> = (0..parallel)
                    .map(|_| {
                        let (u, m, h) = (url.clone(), method.clone(), headers.clone());
                        thread::spawn(move || http_load(&u, &m, count, &h))
                    })
                    .collect();
                for h in hs {
                    let _ = h.join();
                }
                ExitCode::SUCCESS
            } else {
                http_load(&url, &method, count, &headers)
            }
        }
        Cmd::HttpGet { url } => match http_get(&url) {
            Ok((code, body)) => {
                print!("{body}");
                if (200..300).contains(&code) { ExitCode::SUCCESS } else { eprintln!("HTTP {code}"); ExitCode::FAILURE }
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// The relay floor of `bench hbone` (issue 17): the least a mutual-TLS
/// tunnel between two nodes can cost with the mesh's TLS stack (tokio,
/// rustls and its provider and cipher suites through skiff-hbone's
/// certificate manager), for the benchmark to report ztunnel's figures
/// against.
mod relay {
    use std::{process::ExitCode, sync::Arc};

    use skiff_hbone::{certs::CertManager, identity::Identity};
    use tokio::net::{TcpListener, TcpStream};

    #[derive(Clone, Copy, PartialEq, Eq)]
    pub enum Side {
        Out,
        In,
    }

    const TRUST_DOMAIN: &str = "cluster.local";
    /// The relays' buffers, each way (ztunnel's relay reads 32 KiB at a
    /// time; larger moves bulk in fewer TLS records).
    const BUF: usize = 64 * 1024;

    fn id(side: Side) -> Identity {
        Identity::new(TRUST_DOMAIN, "bench-floor", if side == Side::Out { "relay-out" } else { "relay-in" })
    }

    pub fn run(side: Side, routes: &[String]) -> ExitCode {
        let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("relay: a runtime: {e}");
                return ExitCode::from(1);
            }
        };
        match rt.block_on(serve(side, routes)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("relay: {e:#}");
                ExitCode::from(1)
            }
        }
    }

    async fn serve(side: Side, routes: &[String]) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let ca_dir = std::env::var_os("SKIFF_CA_DIR").context("SKIFF_CA_DIR: the mesh's CA directory (the local mesh sets it)")?;
        let mgr = CertManager::from_ca_dir(std::path::Path::new(&ca_dir), TRUST_DOMAIN, std::time::Duration::from_secs(86_400))?;
        mgr.ensure(&id(side)).await?;
        let mut tasks = Vec::new();
        for r in routes {
            let (listen, to) = r.split_once('=').with_context(|| format!("--route {r:?}: LISTEN=HOST:PORT"))?;
            let l = TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
            eprintln!("{{\"event\":\"listening\",\"listen\":\"{listen}\",\"to\":\"{to}\"}}");
            let (mgr, to) = (mgr.clone(), to.to_owned());
            let tls: Tls = match side {
                Side::Out => Tls::Client(tokio_rustls::TlsConnector::from(mgr.client_config(id(Side::Out), id(Side::In))?)),
                Side::In => Tls::Server(tokio_rustls::TlsAcceptor::from(mgr.server_config(id(Side::In))?)),
            };
            let tls = Arc::new(tls);
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((s, _)) = l.accept().await else { continue };
                    let (tls, to) = (tls.clone(), to.clone());
                    tokio::spawn(async move {
                        if let Err(e) = carry(&tls, s, &to).await {
                            eprintln!("{{\"event\":\"relay failed\",\"error\":\"{e}\"}}");
                        }
                    });
                }
            }));
        }
        for t in tasks {
            t.await?;
        }
        Ok(())
    }

    enum Tls {
        Client(tokio_rustls::TlsConnector),
        Server(tokio_rustls::TlsAcceptor),
    }

    async fn carry(tls: &Tls, accepted: TcpStream, to: &str) -> std::io::Result<()> {
        accepted.set_nodelay(true)?;
        let next = TcpStream::connect(to).await?;
        next.set_nodelay(true)?;
        match tls {
            Tls::Client(c) => {
                let name = rustls::pki_types::ServerName::try_from("relay-in.bench-floor").map_err(std::io::Error::other)?;
                let mut t = c.connect(name, next).await?;
                let mut a = accepted;
                tokio::io::copy_bidirectional_with_sizes(&mut a, &mut t, BUF, BUF).await?;
            }
            Tls::Server(s) => {
                let mut t = s.accept(accepted).await?;
                let mut n = next;
                tokio::io::copy_bidirectional_with_sizes(&mut t, &mut n, BUF, BUF).await?;
            }
        }
        Ok(())
    }
}
