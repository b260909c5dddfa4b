//! `skiff dashboard` in a real browser (issue 16): headless Chromium
//! (Debian's `chromium`, driven over WebDriver by Debian's
//! `chromedriver`) opens the dashboard of a running local mesh with
//! traffic, and the test checks what a person would see.
//!
//! - The demo (examples/two-tier, with the demo's own traffic): its
//!   workloads and edges, the padlock on mutual-TLS edges, the ingress
//!   gateway's 90/10 canary split on its edges (and on no other), and an
//!   edge's details after a click. Screenshot: target/dashboard.png.
//! - tests/manifests/explain (a 90/10 split behind a waypoint, L4 mutual
//!   TLS, a denied connection): the split, the warning for denied traffic,
//!   an edge that appears without a reload, an edge's details and
//!   explanation after a click. Screenshot: target/dashboard-explain.png.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use skiff_e2e::*;

const WAIT: Duration = Duration::from_secs(30);


/// One HTTP/1.1 exchange with a JSON body; the response's JSON.
fn http_json(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    // chromedriver keeps the connection open: read the head, then the
    // body by its length (or its chunks).
    let mut r = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).map_err(|e| e.to_string())? == 0 || l == "\r\n" {
            break;
        }
        head.push_str(&l);
    }
    let lower = head.to_ascii_lowercase();
    let body = if let Some(n) = lower.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|n| n.trim().parse::<usize>().ok()) {
        let mut b = vec![0; n];
        r.read_exact(&mut b).map_err(|e| e.to_string())?;
        String::from_utf8_lossy(&b).into_owned()
    } else if lower.contains("transfer-encoding: chunked") {
        let mut out = String::new();
        loop {
            let mut size = String::new();
            r.read_line(&mut size).map_err(|e| e.to_string())?;
            let n = usize::from_str_radix(size.trim(), 16).map_err(|e| e.to_string())?;
            let mut b = vec![0; n + 2];
            r.read_exact(&mut b).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            out.push_str(&String::from_utf8_lossy(&b[..n]));
        }
        out
    } else {
        let mut b = String::new();
        r.read_to_string(&mut b).map_err(|e| e.to_string())?;
        b
    };
    serde_json::from_str(&body).map_err(|e| format!("{e}: {head} {body}"))
}

/// A WebDriver session of headless Chromium.
struct Browser {
    driver: SocketAddr,
    session: String,
    chromedriver: Option<Killed>,
    /// Chromium's profile and scratch files (TMPDIR): removed with it.
    _tmp: tempfile::TempDir,
}

impl Browser {
    fn start(chromedriver: &Path) -> Browser {
        let tmp = tempfile::Builder::new().prefix("skiff-browser-").tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .env("TMPDIR", tmp.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let proc = Killed(child);
        let driver: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1500,900", format!("--user-data-dir={}", tmp.path().join("profile").display())],
        }}}});
        let v = eventually(WAIT, "chromedriver answers and starts Chromium", || http_json(driver, "POST", "/session", Some(&caps)).ok().filter(|v| v["value"]["sessionId"].is_string()));
        Browser { driver, session: v["value"]["sessionId"].as_str().unwrap().to_owned(), chromedriver: Some(proc), _tmp: tmp }
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let v = http_json(self.driver, method, &format!("/session/{}{path}", self.session), body.as_ref()).unwrap();
        assert!(v["value"].get("error").is_none(), "{method} {path}: {v}");
        v["value"].clone()
    }

    /// Runs `script` in the page (`arguments` as given); its result.
    fn js(&self, script: &str, args: Value) -> Value {
        self.cmd("POST", "/execute/sync", Some(json!({"script": script, "args": args})))
    }

    /// The text of the first element matching `css`, or None.
    fn text(&self, css: &str) -> Option<String> {
        self.js("const e = document.querySelector(arguments[0]); return e ? e.textContent : null;", json!([css])).as_str().map(str::to_owned)
    }

    /// Clicks the first element matching `css`.
    fn click(&self, css: &str) {
        let e = self.cmd("POST", "/element", Some(json!({"using": "css selector", "value": css})));
        let id = e.as_object().and_then(|o| o.values().next()).and_then(Value::as_str).unwrap_or_else(|| panic!("no element {css}: {e}")).to_owned();
        self.cmd("POST", &format!("/element/{id}/click"), Some(json!({})));
    }

    fn wait_text(&self, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        eventually(WAIT, what, || self.text(css).filter(|t| ok(t)))
    }

    fn screenshot(&self, to: &Path) {
        use base64::Engine as _;
        let png = self.cmd("GET", "/screenshot", None);
        std::fs::write(to, base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap()).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Chromium ends with its session, chromedriver after it; then the
        // directory goes.
        let _ = http_json(self.driver, "DELETE", &format!("/session/{}", self.session), None);
        drop(self.chromedriver.take());
    }
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("target"))
}

/// However the checks end, the page as it was is kept.
struct Shot<'a>(&'a Browser, PathBuf);

impl Drop for Shot<'_> {
    fn drop(&mut self) {
        self.0.screenshot(&self.1);
        eprintln!("screenshot: {}", self.1.display());
    }
}

/// Debian's chromedriver, when it and chromium are installed.
fn chromedriver() -> Option<&'static Path> {
    let chromedriver = Path::new("/usr/bin/chromedriver");
    if !chromedriver.exists() || !Path::new("/usr/bin/chromium").exists() {
        let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0");
        assert!(!ci, "chromium and chromedriver are not installed: run `cargo xtask setup`");
        eprintln!("SKIPPED: chromium and chromedriver are not installed (cargo xtask setup installs them as root)");
        return None;
    }
    Some(chromedriver)
}

/// `skiff dashboard` of `mesh` on any free port: the process and the URL.
fn dashboard(mesh: &LocalMesh) -> (Killed, String) {
    let (dash, port) = skiff_dashboard(None, &["--mesh", &mesh.work_dir.display().to_string()]);
    (dash, format!("http://127.0.0.1:{port}/"))
}

/// The demo, as `cargo xtask demo` runs it, in the dashboard.
#[test]
fn the_dashboard_shows_the_demo_in_a_browser() {
    let Some(chromedriver) = chromedriver() else { return };
    let Some(mesh) = mesh("../examples/two-tier") else { return };
    // The demo's traffic: in the mesh, from outside, through the gateway's
    // canary route.
    skiff_localmesh::demo::run(&mesh).unwrap();
    let (_dash, url) = dashboard(&mesh);
    let browser = Browser::start(chromedriver);
    browser.cmd("POST", "/url", Some(json!({"url": url})));
    let shot = target_dir().join("dashboard.png");
    let _shot = Shot(&browser, shot.clone());
    let gateway = "istio-system/istio-ingressgateway/latest";
    for node in ["demo/loadgen/latest", "demo/frontend/v1", "demo/frontend/v2", "demo/backend/latest", gateway] {
        browser.wait_text(&format!("[data-node='{node}']"), &format!("node {node}"), |_| true);
    }
    assert!(browser.text("[data-app='demo/frontend']").is_some(), "the frontend's versions grouped");
    // The gateway's canary route: 90% and 10%, over mutual TLS.
    let v1 = browser.wait_text(&format!("[data-edge='{gateway}->demo/frontend/v1']"), "the gateway's edge to v1", |t| t.contains("90%"));
    assert!(v1.contains("mutual TLS") && v1.contains("rps") && v1.contains("p99"), "{v1}");
    let v2 = browser.wait_text(&format!("[data-edge='{gateway}->demo/frontend/v2']"), "the gateway's edge to v2", |t| t.contains("10%"));
    assert!(v2.contains("mutual TLS"), "{v2}");
    // In the mesh: mutual TLS, and no split (no waypoint applies the
    // gateway's route to pod-to-pod traffic).
    let l4 = browser.wait_text("[data-edge='demo/loadgen/latest->demo/frontend/v1']", "loadgen's edge", |t| t.contains("mutual TLS"));
    assert!(!l4.contains('%') || l4.contains("err"), "no split on an L4 edge: {l4}");
    assert!(!l4.contains("90%") && !l4.contains("10%"), "no split on an L4 edge: {l4}");
    browser.wait_text("[data-edge='demo/frontend/v1->demo/backend/latest']", "the frontend's edge to the backend", |t| t.contains("mutual TLS"));
    // Click a node: what it is and who talks to it.
    browser.click("[data-node='demo/frontend/v2']");
    let details = browser.wait_text("#node-details", "the node's details", |t| t.contains("demo/frontend/v2"));
    assert!(details.contains(gateway) && details.contains("demo/loadgen/latest") && details.contains("demo/backend/latest"), "in and out: {details}");
    // Click the canary's edge: its details.
    browser.click(&format!("[data-edge='{gateway}->demo/frontend/v2'] tspan.rate"));
    let details = browser.wait_text("#edge-details", "the edge's details", |t| t.contains("mutual TLS"));
    assert!(details.contains("frontend.demo") && details.contains("10%"), "{details}");
    let explain = browser.wait_text("#explain", "the edge's explanation", |t| t.contains("the source is a gateway"));
    assert!(explain.contains("VirtualService demo/frontend-edge http[0]: frontend subset v1 90%, frontend subset v2 10%"), "{explain}");
    // The demo's config is all in force: no warning.
    let warnings = browser.text("#warnings").unwrap_or_default();
    assert!(!warnings.contains("refused") && !warnings.contains("more than once") && !warnings.contains("denied"), "{warnings}");
    drop(_shot);
    assert!(shot.exists() && std::fs::metadata(&shot).unwrap().len() > 10_000, "a real screenshot");
}

#[test]
fn the_dashboard_shows_the_graph_in_a_browser() {
    let Some(chromedriver) = chromedriver() else { return };
    let Some(mesh) = mesh("manifests/explain") else { return };
    for (ns, p) in [("shop", "reviews-v1"), ("shop", "reviews-v2"), ("secure", "db")] {
        wait_listening(mesh.pod(ns, p));
    }
    let wp = mesh.pod("shop", "waypoint");
    eventually(WAIT, "waypoint serving", || std::fs::read_to_string(&wp.log).ok().filter(|l| l.contains("waypoint serving")).map(|_| ()));
    // Traffic: the 90/10 split, and a denied connection.
    let load = mesh.exec(mesh.pod("shop", "client"), &["skiff-demo-app", "http-load", "--url", "http://reviews:9080/api/x", "--count", "60"], Duration::from_secs(120)).unwrap();
    assert!(load.status.success(), "{}", String::from_utf8_lossy(&load.stderr));
    client(&mesh, mesh.pod("shop", "other"), "db.secure:5432", "denied");

    let (_dash, url) = dashboard(&mesh);

    // Only its own address's names: a page elsewhere that points its own
    // name here (DNS rebinding) is refused.
    let addr: SocketAddr = url.trim_start_matches("http://").trim_end_matches('/').parse().unwrap();
    let ask = |host: &str| {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "GET /api/graph HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.lines().next().unwrap_or("").to_owned()
    };
    assert!(ask("attacker.example:80").contains(" 421 "));
    assert!(ask(&format!("localhost:{}", addr.port())).contains(" 200 "));

    let browser = Browser::start(chromedriver);
    browser.cmd("POST", "/url", Some(json!({"url": url})));
    let shot = target_dir().join("dashboard-explain.png");
    let _shot = Shot(&browser, shot.clone());

    // The workloads, by app and version, and the edges between them.
    for node in ["shop/client/latest", "shop/reviews/v1", "shop/reviews/v2", "secure/db/latest", "shop/other/latest"] {
        browser.wait_text(&format!("[data-node='{node}']"), &format!("node {node}"), |_| true);
    }
    assert!(browser.text("[data-app='shop/reviews']").is_some(), "reviews' versions grouped");
    // The split and the padlock on the waypoint's mutual-TLS edges.
    let v1 = browser.wait_text("[data-edge='shop/client/latest->shop/reviews/v1']", "edge to v1", |t| t.contains("90%"));
    assert!(v1.contains("mutual TLS") && v1.contains("rps") && v1.contains("p99"), "the padlock (titled mutual TLS), rate and p99: {v1}");
    let v2 = browser.wait_text("[data-edge='shop/client/latest->shop/reviews/v2']", "edge to v2", |t| t.contains("10%"));
    assert!(v2.contains("mutual TLS"), "{v2}");
    // The denied connection: an edge and a warning.
    browser.wait_text("[data-edge='shop/other/latest->secure/db/latest']", "the denied edge", |t| t.contains("100% err"));
    browser.wait_text("#warnings", "a denied-traffic warning", |t| t.contains("denied from shop/other/latest to secure/db/latest"));

    // New traffic shows without a reload.
    assert!(browser.text("[data-edge='shop/client/latest->secure/db/latest']").is_none());
    let r = client(&mesh, mesh.pod("shop", "client"), "db.secure:5432", "hello");
    assert!(r.ok, "{r:?}");
    let l4 = browser.wait_text("[data-edge='shop/client/latest->secure/db/latest']", "the new edge, without a reload", |_| true);
    assert!(l4.contains("mutual TLS") && l4.contains("conn/s"), "L4 mutual TLS: {l4}");

    // Click an edge: its details and its explanation.
    browser.click("[data-edge='shop/client/latest->shop/reviews/v1'] tspan.rate");
    let details = browser.wait_text("#edge-details", "the edge's details", |t| t.contains("mutual TLS"));
    assert!(details.contains("reviews.shop") && details.contains("90%"), "{details}");
    let explain = browser.wait_text("#explain", "the edge's explanation", |t| t.contains("VirtualService shop/reviews"));
    assert!(explain.contains("skiff explain --from shop/client --to http://reviews.shop:9080/"), "{explain}");
    let started = Instant::now();
    drop(_shot);
    assert!(shot.exists() && std::fs::metadata(&shot).unwrap().len() > 10_000, "a real screenshot");
    eprintln!("screenshot taken in {:?}", started.elapsed());
}
