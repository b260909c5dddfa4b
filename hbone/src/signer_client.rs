//! Obtaining workload certificates from the in-cluster signer
//! (`skiff-signer`) instead of a local CA: a CSR per identity, sent over
//! TLS (the signer's certificate must chain to the trust bundle) with the
//! node's projected service-account token.
//!
//! HTTP/1.1 through hyper's client over tokio-rustls. Requests are
//! blocking and short: certificates are pre-issued by the
//! periodic refresh, so handshakes normally find one in the cache.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use rustls::{pki_types::ServerName, ClientConfig};
use rustls_pki_types::{pem::PemObject as _, CertificateDer};

use crate::identity::{self, Identity, IdentityError, WorkloadCert};

/// The path the signer serves.
pub const SIGN_PATH: &str = "/v1/sign";

/// Why a certificate could not be obtained from the signer.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    /// The service-account token file could not be read.
    #[error("reading the token {path}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The signer could not be reached or the TLS session failed.
    #[error("talking to the signer at {addr}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The signer refused, with its reason.
    #[error("the signer refused {identity} ({status}): {message}")]
    Refused { identity: String, status: u16, message: String },
    /// The signer's answer is not what the protocol says.
    #[error("malformed answer from the signer: {0}")]
    Malformed(String),
    /// Key, CSR or certificate handling failed.
    #[error("certificate handling")]
    Identity(#[from] IdentityError),
}

/// Where the signer is and how to authenticate to it.
pub struct SignerClient {
    /// `host:port`.
    addr: String,
    server_name: ServerName<'static>,
    token_path: PathBuf,
    tls: Arc<ClientConfig>,
    timeout: Duration,
}

impl SignerClient {
    /// `url` is `https://host:port`; the signer's certificate must be for
    /// `server_name` and chain to `bundle`.
    pub fn new(url: &str, server_name: &str, token_path: PathBuf, bundle: &[CertificateDer<'static>]) -> Result<SignerClient, SignerError> {
        let addr = url
            .strip_prefix("https://")
            .map(|r| r.trim_end_matches('/'))
            .filter(|r| !r.is_empty() && !r.contains('/'))
            .ok_or_else(|| SignerError::Malformed(format!("signer URL {url:?} is not https://host:port")))?
            .to_owned();
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| SignerError::Malformed(format!("{server_name:?} is not a DNS name or IP address")))?;
        let roots = identity::roots(bundle)?;
        let tls = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(IdentityError::Tls)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(SignerClient { addr, server_name, token_path, tls: Arc::new(tls), timeout: Duration::from_secs(10) })
    }

    /// Gives up on a request after `t` (default 10 s).
    pub fn with_timeout(mut self, t: Duration) -> SignerClient {
        self.timeout = t;
        self
    }

    /// Asks for a certificate for `identity` valid for `lifetime`.
    pub fn issue(&self, identity: &Identity, lifetime: Duration) -> Result<WorkloadCert, SignerError> {
        // Read at every request: projected tokens are rotated by the kubelet.
        let token = std::fs::read_to_string(&self.token_path)
            .map_err(|source| SignerError::Token { path: self.token_path.clone(), source })?;
        let (key, csr) = identity::csr_for(identity)?;
        let body = serde_json::json!({"identity": identity.to_string(), "csr": csr, "lifetimeSeconds": lifetime.as_secs()}).to_string();
        let (status, answer) = self.post(token.trim(), &body)?;
        let v: serde_json::Value =
            serde_json::from_str(&answer).map_err(|e| SignerError::Malformed(format!("{e}: {answer:.200}")))?;
        if status != 200 {
            let message = v["error"].as_str().unwrap_or(&answer).to_owned();
            return Err(SignerError::Refused { identity: identity.to_string(), status, message });
        }
        let pem = v["certificate"].as_str().ok_or_else(|| SignerError::Malformed("no `certificate`".into()))?;
        let cert = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| SignerError::Malformed(format!("certificate PEM: {e}")))?;
        if identity::identity_of(&cert)? != *identity {
            return Err(SignerError::Malformed(format!("the signer returned a certificate for another identity than {identity}")));
        }
        let (not_before, not_after) = validity(&cert)?;
        Ok(WorkloadCert { identity: identity.clone(), chain: vec![cert], key_der: key.serialize_der(), not_before, not_after })
    }

    /// POSTs `body` to the signer and returns the status and the answer.
    ///
    /// Callers are synchronous (the certificate refresh runs off the async
    /// workers, and tests), so the request runs on a thread of its own with
    /// a current-thread runtime: safe to call from any context, async
    /// workers included, and bounded by the client's timeout.
    fn post(&self, token: &str, body: &str) -> Result<(u16, String), SignerError> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|source| SignerError::Io { addr: self.addr.clone(), source })?;
                    rt.block_on(async {
                        tokio::time::timeout(self.timeout, self.post_async(token, body)).await.map_err(|_| SignerError::Io {
                            addr: self.addr.clone(),
                            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time"),
                        })?
                    })
                })
                .join()
                .unwrap_or_else(|_| Err(SignerError::Malformed("the signer request thread panicked".into())))
        })
    }

    async fn post_async(&self, token: &str, body: &str) -> Result<(u16, String), SignerError> {
        let io = |source| SignerError::Io { addr: self.addr.clone(), source };
        let tcp = tokio::net::TcpStream::connect(self.addr.as_str()).await.map_err(io)?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone()).connect(self.server_name.clone(), tcp).await.map_err(io)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| io(std::io::Error::other(e)))?;
        let conn = tokio::spawn(conn);
        let host = self.addr.rsplit_once(':').map_or(self.addr.as_str(), |(h, _)| h);
        let req = http::Request::post(SIGN_PATH)
            .header(http::header::HOST, host)
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_owned())))
            .map_err(|e| SignerError::Malformed(format!("request: {e}")))?;
        let resp = sender.send_request(req).await.map_err(|e| io(std::io::Error::other(e)))?;
        let status = resp.status().as_u16();
        let answer = resp.into_body().collect().await.map_err(|e| io(std::io::Error::other(e)))?.to_bytes();
        drop(sender);
        let _ = conn.await;
        Ok((status, String::from_utf8_lossy(&answer).into_owned()))
    }
}

fn validity(cert: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), SignerError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| SignerError::Malformed(format!("certificate: {e}")))?;
    let t = |secs: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    Ok((t(parsed.validity().not_before.timestamp()), t(parsed.validity().not_after.timestamp())))
}
