//! `skiff-hbone-probe`: a test and debugging client that speaks HBONE to a
//! pod's port 15008 with a certificate of your choosing (including bad ones:
//! from another CA, expired, or for another identity), and reports as JSON
//! how far it got. Used by the end-to-end tests; handy for checking a mesh's
//! mTLS by hand.

use std::{net::SocketAddrV4, path::PathBuf, sync::Arc, time::{Duration, SystemTime}};

use bytes::Bytes;
use clap::Parser;
use skiff_hbone::identity::{self, Ca, ExpectedIdentityVerifier, Identity};

#[derive(Parser)]
struct Cli {
    /// The pod's HBONE address (IP:15008).
    #[arg(long)]
    to: SocketAddrV4,
    /// CONNECT target (IP:port of the app in that pod).
    #[arg(long)]
    target: SocketAddrV4,
    /// The mesh CA directory (trust root, and issuer of the probe's certificate).
    #[arg(long)]
    ca_dir: PathBuf,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Identity of the probe's certificate, NAMESPACE/SERVICEACCOUNT.
    #[arg(long)]
    identity: String,
    /// Identity the server must prove, NAMESPACE/SERVICEACCOUNT.
    #[arg(long)]
    expect: String,
    /// Sign the probe's certificate with a freshly made CA the mesh does not trust.
    #[arg(long)]
    foreign_ca: bool,
    /// Present a certificate that expired an hour ago.
    #[arg(long)]
    expired: bool,
    #[arg(long, default_value = "probe")]
    message: String,
    /// Send this method instead of CONNECT (malformed-request checks).
    #[arg(long)]
    method: Option<String>,
    /// Send this authority instead of --target.
    #[arg(long)]
    authority: Option<String>,
    /// Add a header of this many bytes (oversized-header checks).
    #[arg(long)]
    header_bytes: Option<usize>,
    /// After the request, open one more proper CONNECT on the same
    /// connection: shows whether a bad request ended only its stream.
    #[arg(long)]
    then_valid: bool,
    /// After the exchange, keep the connection open and idle for up to
    /// this long; report whether and when the server closed it.
    #[arg(long)]
    then_idle_secs: Option<u64>,
}

fn id(td: &str, s: &str) -> Identity {
    let (ns, sa) = s.split_once('/').expect("NAMESPACE/SERVICEACCOUNT");
    Identity::new(td, ns, sa)
}

fn report(ok: bool, stage: &str, status: Option<u16>, reply: &str, error: &str) {
    println!("{}", serde_json::json!({"ok": ok, "stage": stage, "status": status, "reply": reply, "error": error}));
}

async fn run(cli: Cli) -> Result<(), (String, Option<u16>, String)> {
    let err = |stage: &str| {
        let stage = stage.to_owned();
        move |e: &dyn std::fmt::Display| (stage.clone(), None, e.to_string())
    };
    let mesh_ca = Ca::load_or_create(&cli.ca_dir, &cli.trust_domain).map_err(|e| err("setup")(&skiff_core::report(&e)))?;
    let issuer = if cli.foreign_ca { Ca::generate(&cli.trust_domain).map_err(|e| err("setup")(&e))? } else { Ca::load_or_create(&cli.ca_dir, &cli.trust_domain).map_err(|e| err("setup")(&e))? };
    let me = id(&cli.trust_domain, &cli.identity);
    let cert = if cli.expired {
        issuer.issue_at(&me, SystemTime::now() - Duration::from_secs(7200), Duration::from_secs(3600))
    } else {
        issuer.issue(&me, Duration::from_secs(3600))
    }
    .map_err(|e| err("setup")(&e))?;
    let roots = identity::roots(&[mesh_ca.root()]).map_err(|e| err("setup")(&e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| err("setup")(&e))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ExpectedIdentityVerifier::new(roots, id(&cli.trust_domain, &cli.expect))))
        .with_client_auth_cert(cert.chain.clone(), cert.key())
        .map_err(|e| err("setup")(&e))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(cli.to).await.map_err(|e| err("tcp")(&e))?;
    let name = rustls::pki_types::ServerName::try_from("hbone.skiff").expect("valid");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.map_err(|e| err("tls")(&e))?;
    let (send, conn) = h2::client::handshake(tls).await.map_err(|e| err("tls")(&e))?;
    let mut conn = tokio::spawn(conn);
    let mut send = send.ready().await.map_err(|e| err("tls")(&e))?;
    let method = http::Method::from_bytes(cli.method.as_deref().unwrap_or("CONNECT").as_bytes()).map_err(|e| err("setup")(&e))?;
    let uri = cli.authority.clone().unwrap_or_else(|| cli.target.to_string());
    let uri = if method == http::Method::CONNECT { uri } else { format!("http://{uri}/") };
    let mut req = http::Request::builder().method(method).uri(uri);
    if let Some(n) = cli.header_bytes {
        req = req.header("x-padding", "a".repeat(n));
    }
    let req = req.body(()).map_err(|e| err("setup")(&e))?;
    let (resp, mut stream) = send.send_request(req, false).map_err(|e| err("connect")(&e))?;
    let resp = resp.await.map_err(|e| err("connect")(&e))?;
    let status = resp.status().as_u16();
    if status != 200 {
        let mut error = format!("CONNECT answered {status}");
        if cli.then_valid {
            // Same connection, a proper request: is it still usable?
            let mut send = send.ready().await.map_err(|e| err("followup")(&e))?;
            let req = http::Request::builder().method(http::Method::CONNECT).uri(cli.target.to_string()).body(()).expect("valid");
            let (resp, mut stream) = send.send_request(req, false).map_err(|e| err("followup")(&e))?;
            let resp = resp.await.map_err(|e| err("followup")(&e))?;
            stream.send_data(Bytes::from(cli.message.clone()), true).map_err(|e| err("followup")(&e))?;
            let mut body = resp.into_body();
            let mut reply = Vec::new();
            while let Some(Ok(chunk)) = body.data().await {
                let _ = body.flow_control().release_capacity(chunk.len());
                reply.extend_from_slice(&chunk);
            }
            error = format!("{error}; follow-up on the same connection answered: {}", String::from_utf8_lossy(&reply));
        }
        return Err(("connect".into(), Some(status), error));
    }
    stream.send_data(Bytes::from(cli.message.clone()), true).map_err(|e| err("data")(&e))?;
    let mut body = resp.into_body();
    let mut reply = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| err("data")(&e))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        reply.extend_from_slice(&chunk);
    }
    let reply = String::from_utf8_lossy(&reply).into_owned();
    if let Some(secs) = cli.then_idle_secs {
        // Idle: no stream open, the handle kept (the connection stays ours).
        let start = std::time::Instant::now();
        let closed = tokio::time::timeout(Duration::from_secs(secs), &mut conn).await.is_ok();
        let idle = serde_json::json!({"closed_by_server": closed, "after_ms": start.elapsed().as_millis() as u64});
        drop(send);
        println!("{}", serde_json::json!({"ok": true, "stage": "idle", "status": status, "reply": reply, "error": "", "idle": idle}));
        return Ok(());
    }
    report(true, "data", Some(status), &reply, "");
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let limit = Duration::from_secs(15 + cli.then_idle_secs.unwrap_or(0));
    match rt.block_on(async { tokio::time::timeout(limit, run(cli)).await }) {
        Ok(Ok(())) => std::process::ExitCode::SUCCESS,
        Ok(Err((stage, status, error))) => {
            report(false, &stage, status, "", &error);
            std::process::ExitCode::FAILURE
        }
        Err(_) => {
            report(false, "timeout", None, "", "timed out");
            std::process::ExitCode::FAILURE
        }
    }
}
