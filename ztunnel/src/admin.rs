//! Node-side HTTP endpoints: Prometheus metrics (15020) and readiness
//! (15021).

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::warn;

use crate::proxy::Ztunnel;

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

async fn metrics(zt: Arc<Ztunnel>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match req.uri().path() {
        "/metrics" | "/stats/prometheus" => text(StatusCode::OK, zt.metrics.render()),
        _ => text(StatusCode::NOT_FOUND, "not found: try /metrics\n".into()),
    })
}

async fn readiness(zt: Arc<Ztunnel>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match req.uri().path() {
        "/healthz/ready" if zt.is_ready() => text(StatusCode::OK, "ready\n".into()),
        "/healthz/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready: waiting for node-agent's snapshot\n".into()),
        _ => text(StatusCode::NOT_FOUND, "not found: try /healthz/ready\n".into()),
    })
}

/// Which endpoint a server exposes.
#[derive(Clone, Copy, Debug)]
pub enum Endpoint {
    Metrics,
    Readiness,
}

/// Serves `endpoint` on `addr` until the process ends.
pub async fn serve(zt: Arc<Ztunnel>, addr: SocketAddr, endpoint: Endpoint) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    continue;
                }
            };
            let zt = zt.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let zt = zt.clone();
                    async move {
                        match endpoint {
                            Endpoint::Metrics => metrics(zt, req).await,
                            Endpoint::Readiness => readiness(zt, req).await,
                        }
                    }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok(())
}
