//! Node-side HTTP endpoints: Prometheus metrics (15020) and readiness
//! (15021).

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

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
        "/metrics" | "/stats/prometheus" => text(StatusCode::OK, zt.render_metrics()),
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

/// Changes the log filter at run time.
pub type LogReload = tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

fn json(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec_pretty(&v).unwrap_or_default())))
        .expect("valid response")
}

/// What the admin port shows: the pods held, the policies in force, the
/// config objects refused (with why and what serves instead) and those
/// read fail-closed, the certificates (identity and validity only — never
/// keys).
pub fn config_dump(zt: &Ztunnel) -> serde_json::Value {
    let snap = zt.snapshot();
    let authz: Vec<serde_json::Value> = snap
        .authorization_policies
        .iter()
        .map(|p| {
            serde_json::json!({
                "name": p.key(), "action": format!("{:?}", p.action).to_uppercase(),
                "selector": p.selector, "waypoint_only": p.targets_waypoint, "rules": p.rules,
            })
        })
        .collect();
    let peer: Vec<serde_json::Value> = snap
        .peer_authentications
        .iter()
        .map(|p| {
            let ports: std::collections::BTreeMap<String, &str> =
                p.port_modes.iter().map(|(k, v)| (k.to_string(), v.as_str())).collect();
            serde_json::json!({
                "name": format!("{}/{}", p.namespace, p.name), "selector": p.selector,
                "mode": p.mode.as_str(), "port_modes": ports,
            })
        })
        .collect();
    serde_json::json!({
        "workloads": zt.workloads(),
        "authorization_policies": authz,
        "peer_authentications": peer,
        "rejected": snap.rejected.iter().map(|r| r.to_json()).collect::<Vec<_>>(),
        "warnings": snap.warnings,
        "certificates": zt.certs.summary(),
    })
}

type AdminBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn admin(zt: Arc<Ztunnel>, reload: LogReload, req: Request<Incoming>) -> Result<Response<AdminBody>, Infallible> {
    use http_body_util::BodyExt as _;
    if req.uri().path() == "/events" {
        // The access events from now on, as JSON lines (`skiff observe`).
        return Ok(skiff_hbone::events::response(format!("ztunnel {}", zt.node())));
    }
    Ok(match req.uri().path() {
        "/config_dump" => json(StatusCode::OK, config_dump(&zt)),
        "/logging" => {
            let level = req.uri().query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("level=")));
            match level {
                None => text(StatusCode::OK, "set the log filter with /logging?level=debug (any SKIFF_LOG filter)\n".into()),
                Some(l) => match l.parse::<tracing_subscriber::EnvFilter>() {
                    Ok(f) => match reload.reload(f) {
                        Ok(()) => {
                            tracing::info!(filter = l, "log filter changed");
                            text(StatusCode::OK, format!("log filter: {l}\n"))
                        }
                        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
                    },
                    Err(e) => text(StatusCode::BAD_REQUEST, format!("invalid filter {l:?}: {e}\n")),
                },
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found: try /config_dump, /events or /logging?level=debug\n".into()),
    }
    .map(|b| b.boxed()))
}

/// Serves the admin endpoints on `addr` (localhost only by default).
pub async fn serve_admin(zt: Arc<Ztunnel>, addr: SocketAddr, reload: LogReload) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        loop {
            let (stream, _) = skiff_hbone::transport::accept(&listener, "admin").await;
            let (zt, reload) = (zt.clone(), reload.clone());
            let guard = slow_client_guard(zt.admin_header_timeout());
            tokio::spawn(async move {
                let svc = service_fn(move |req| admin(zt.clone(), reload.clone(), req));
                let _ = guard.serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok(())
}

/// HTTP/1 server settings for the node-side endpoints: a client that does
/// not send its request headers within `timeout` (`--admin-header-timeout`)
/// is dropped.
fn slow_client_guard(timeout: std::time::Duration) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(timeout);
    b
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
            let (stream, _) = skiff_hbone::transport::accept(&listener, "metrics/readiness").await;
            let zt = zt.clone();
            let guard = slow_client_guard(zt.admin_header_timeout());
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
                let _ = guard.serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok(())
}
