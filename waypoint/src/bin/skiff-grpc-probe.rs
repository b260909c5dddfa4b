//! `skiff-grpc-probe`: a minimal gRPC peer over h2c for tests and checks —
//! length-prefixed gRPC messages (opaque bytes, no protobuf schema) and the
//! status in trailers, which is what a proxy must carry intact.
//!
//! - `server --port P`: answers every call with `echo: <message>` and
//!   `grpc-status: 0`; a message `fail` gets `grpc-status: 14` (UNAVAILABLE).
//! - `client --url http://HOST:PORT/pkg.Service/Method --message M`: one
//!   unary call; prints HTTP status, gRPC status and reply as JSON.

use std::convert::Infallible;

use bytes::{Buf, Bytes, BytesMut};
use clap::{Parser, Subcommand};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Server {
        #[arg(long)]
        port: u16,
    },
    Client {
        #[arg(long)]
        url: String,
        #[arg(long)]
        message: String,
    },
}

fn frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.extend_from_slice(&[0]);
    b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    b.extend_from_slice(msg);
    b.freeze()
}

fn unframe(mut b: Bytes) -> Vec<u8> {
    let mut out = Vec::new();
    while b.len() >= 5 {
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        b.advance(5);
        let n = len.min(b.len());
        out.extend_from_slice(&b[..n]);
        b.advance(n);
    }
    out
}

async fn serve(port: u16) -> anyhow::Result<()> {
    let l = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
    println!("{{\"event\":\"listening\",\"port\":{port}}}");
    loop {
        let (s, _) = l.accept().await?;
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                let body = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                let msg = String::from_utf8_lossy(&unframe(body)).into_owned();
                let (status, text) = if msg == "fail" { ("14", "backend unavailable") } else { ("0", "OK") };
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static(status));
                trailers.insert("grpc-message", HeaderValue::from_static(text));
                let body = Full::new(frame(format!("echo: {msg}").as_bytes()))
                    .with_trailers(async move { Some(Ok::<_, Infallible>(trailers)) });
                Ok::<_, Infallible>(
                    Response::builder().header("content-type", "application/grpc").body(body).expect("valid"),
                )
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(s), svc).await;
        });
    }
}

async fn call(url: &str, message: &str) -> anyhow::Result<serde_json::Value> {
    let uri: http::Uri = url.parse()?;
    let host = uri.host().unwrap_or("localhost").to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let addr = tokio::net::lookup_host((host.as_str(), port)).await?.next().ok_or_else(|| anyhow::anyhow!("no address"))?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = Request::post(uri)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(frame(message.as_bytes())))?;
    let resp = send.send_request(req).await?;
    let http_status = resp.status().as_u16();
    let head_status = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let mut body = resp.into_body();
    let mut data = BytesMut::new();
    let mut trailers = None;
    while let Some(f) = body.frame().await {
        let f = f?;
        if let Some(d) = f.data_ref() {
            data.extend_from_slice(d);
        }
        if let Ok(t) = f.into_trailers() {
            trailers = Some(t);
        }
    }
    let from_trailers = trailers.as_ref().and_then(|t| t.get("grpc-status")).and_then(|v| v.to_str().ok()).map(str::to_owned);
    Ok(serde_json::json!({
        "http_status": http_status,
        "grpc_status": from_trailers.clone().or(head_status),
        "status_in_trailers": from_trailers.is_some(),
        "grpc_message": trailers.as_ref().and_then(|t| t.get("grpc-message")).and_then(|v| v.to_str().ok()),
        "reply": String::from_utf8_lossy(&unframe(data.freeze())),
    }))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    match cli.cmd {
        Cmd::Server { port } => {
            if let Err(e) = rt.block_on(serve(port)) {
                eprintln!("{e:#}");
                return std::process::ExitCode::FAILURE;
            }
            std::process::ExitCode::SUCCESS
        }
        Cmd::Client { url, message } => match rt.block_on(call(&url, &message)) {
            Ok(v) => {
                println!("{v}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                println!("{}", serde_json::json!({"error": format!("{e:#}")}));
                std::process::ExitCode::FAILURE
            }
        },
    }
}
