//! Workload certificates held by this ztunnel: one per identity of its
//! node's pods, issued on first use and rotated at half-life. Rotation only
//! affects new handshakes; open connections keep going.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rustls::{
    client::ResolvesClientCert,
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
    ClientConfig, RootCertStore, ServerConfig, SignatureScheme,
};
use tracing::{info, warn};

use crate::{
    identity::{self, Ca, ExpectedIdentityVerifier, Identity, IdentityError, WorkloadCert},
    signer_client::{SignerClient, SignerError},
};

/// Where workload certificates come from.
enum Issuer {
    /// A root key held by this process (local mode).
    Local(Box<Ca>),
    /// The in-cluster signer; ztunnel holds no root key.
    Signer { client: SignerClient, trust_domain: String },
}

/// Why a workload certificate or TLS config is not available.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Local issuance or TLS setup failed.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The in-cluster signer did not issue it.
    #[error(transparent)]
    Signer(#[from] SignerError),
    /// The blocking task that asked for it ended abnormally.
    #[error("certificate issuance task failed: {0}")]
    Task(String),
}

/// ALPN of HBONE connections.
pub const ALPN_H2: &[u8] = b"h2";

struct Issued {
    cert: WorkloadCert,
    key: Arc<CertifiedKey>,
    /// When it entered the cache or the data path last asked for it: a
    /// refresh evicts only what was not wanted since it started.
    wanted_at: Mutex<std::time::Instant>,
}

/// Summary of one certificate, for the admin config dump (never the key).
#[derive(Clone, Debug, serde::Serialize)]
pub struct CertSummary {
    pub identity: String,
    pub not_before_unix: u64,
    pub not_after_unix: u64,
    pub rotates_at_unix: u64,
}

pub struct CertManager {
    issuer: Issuer,
    lifetime: Duration,
    roots: Arc<RootCertStore>,
    certs: Mutex<HashMap<Identity, Arc<Issued>>>,
}

/// TLS 1.3 with AES-128-GCM preferred and X25519 first: the suite and
/// key exchange an Istio mesh of Envoy sidecars (BoringSSL) negotiates, so
/// the two are compared like for like (`cargo xtask bench compare` checks
/// it). AES-256-GCM and ChaCha20 stay acceptable to peers that prefer them.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, default_provider, kx_group};
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        kx_groups: vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1],
        ..default_provider()
    })
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl CertManager {
    /// The local-mode setup: the CA in `dir` (created on first use) and
    /// workload certificates of `lifetime` (at least 2 s).
    pub fn from_ca_dir(dir: &std::path::Path, trust_domain: &str, lifetime: Duration) -> Result<Arc<CertManager>, IdentityError> {
        let ca = Ca::load_or_create(dir, trust_domain)?;
        CertManager::new(ca, lifetime.max(Duration::from_secs(2)))
    }

    pub fn new(ca: Ca, lifetime: Duration) -> Result<Arc<CertManager>, IdentityError> {
        let roots = identity::roots(&[ca.root()])?;
        Ok(Arc::new(CertManager { issuer: Issuer::Local(Box::new(ca)), lifetime, roots, certs: Mutex::new(HashMap::new()) }))
    }

    /// The in-cluster setup: certificates from the signer, peers checked
    /// against `bundle` (every root currently trusted: during a root
    /// rotation, old and new).
    pub fn from_signer(
        client: SignerClient,
        bundle: &[rustls::pki_types::CertificateDer<'static>],
        trust_domain: &str,
        lifetime: Duration,
    ) -> Result<Arc<CertManager>, IdentityError> {
        let roots = identity::roots(bundle)?;
        Ok(Arc::new(CertManager {
            issuer: Issuer::Signer { client, trust_domain: trust_domain.to_owned() },
            lifetime: lifetime.max(Duration::from_secs(2)),
            roots,
            certs: Mutex::new(HashMap::new()),
        }))
    }

    /// The certificate source a command line names: the in-cluster signer
    /// (`--signer-url`, checked against `--trust-bundle`) or else the local
    /// CA in `ca_dir`. Shared by ztunnel and the waypoint.
    pub fn from_args(signer: &SignerArgs, ca_dir: &std::path::Path, trust_domain: &str, lifetime: Duration) -> anyhow::Result<Arc<CertManager>> {
        use anyhow::Context as _;
        use rustls::pki_types::pem::PemObject as _;
        let Some(url) = signer.signer_url.as_deref() else {
            return CertManager::from_ca_dir(ca_dir, trust_domain, lifetime)
                .map_err(|e| anyhow::anyhow!("loading the CA from {}: {}", ca_dir.display(), skiff_core::report(&e)));
        };
        let bundle_path =
            signer.trust_bundle.as_deref().context("--signer-url needs --trust-bundle (the PEM roots the signer is checked against)")?;
        let pem = std::fs::read(bundle_path).with_context(|| format!("reading the trust bundle {}", bundle_path.display()))?;
        let bundle: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("trust bundle {}: {e}", bundle_path.display()))?;
        anyhow::ensure!(!bundle.is_empty(), "trust bundle {} holds no certificate", bundle_path.display());
        let client = crate::signer_client::SignerClient::new(url, &signer.signer_name, signer.signer_token.clone(), &bundle)
            .map_err(|e| anyhow::anyhow!("signer {url}: {}", skiff_core::report(&e)))?
            .with_timeout(signer.signer_timeout);
        tracing::info!(signer = %url, roots = bundle.len(), "workload certificates from the in-cluster signer");
        CertManager::from_signer(client, &bundle, trust_domain, lifetime)
            .map_err(|e| anyhow::anyhow!("trust bundle {}: {}", bundle_path.display(), skiff_core::report(&e)))
    }

    pub fn trust_domain(&self) -> &str {
        match &self.issuer {
            Issuer::Local(ca) => ca.trust_domain(),
            Issuer::Signer { trust_domain, .. } => trust_domain,
        }
    }

    fn issue(&self, id: &Identity) -> Result<WorkloadCert, CertError> {
        match &self.issuer {
            Issuer::Local(ca) => Ok(ca.issue(id, self.lifetime)?),
            Issuer::Signer { client, .. } => Ok(client.issue(id, self.lifetime)?),
        }
    }

    /// The certificate for `id`. `renew`: past half-life, ask for a new one
    /// (the background refresh does; a handshake does not, so a slow or
    /// unreachable signer never stalls connections while a valid
    /// certificate is at hand). A renewal that fails keeps serving the
    /// current certificate until a minute before it expires.
    fn issued_with(&self, id: &Identity, renew: bool) -> Result<Arc<Issued>, CertError> {
        let now = SystemTime::now();
        let cached = self.certs.lock().expect("lock").get(id).cloned();
        let usable = cached.filter(|i| now + Duration::from_secs(60) < i.cert.not_after || now < i.cert.refresh_at());
        if let Some(i) = &usable {
            if now < i.cert.refresh_at() || !renew {
                return Ok(i.clone());
            }
        }
        let cert = match self.issue(id) {
            Ok(c) => c,
            Err(e) => match usable {
                Some(i) => {
                    warn!(identity = %id, error = %skiff_core::report(&e), expires_unix = unix(i.cert.not_after),
                        "certificate renewal failed; the current certificate stays in use until it expires");
                    return Ok(i);
                }
                None => return Err(e),
            },
        };
        let signing = rustls::crypto::ring::sign::any_supported_type(&cert.key()).map_err(IdentityError::Tls)?;
        let key = Arc::new(CertifiedKey::new(cert.chain.clone(), signing));
        let issued = Arc::new(Issued { cert, key, wanted_at: Mutex::new(std::time::Instant::now()) });
        let previous = self.certs.lock().expect("lock").insert(id.clone(), issued.clone());
        info!(identity = %id, expires_unix = unix(issued.cert.not_after), rotated = previous.is_some(), "workload certificate issued");
        Ok(issued)
    }

    fn issued(&self, id: &Identity) -> Result<Arc<Issued>, CertError> {
        self.issued_with(id, true)
    }

    /// A cached certificate that can still be presented, without asking
    /// anyone for one.
    fn cached(&self, id: &Identity) -> Option<Arc<Issued>> {
        let now = SystemTime::now();
        self.certs.lock().expect("lock").get(id).filter(|i| now + Duration::from_secs(60) < i.cert.not_after || now < i.cert.refresh_at()).cloned()
    }

    /// Makes sure `id` has a certificate to present, for the data path
    /// (async): a cached one is used as it is, even past its half-life
    /// (renewal is the background refresh's job); only when there is none
    /// is one issued, on a blocking thread, so a slow or unreachable signer
    /// never stalls an async worker and the connections it serves.
    pub async fn ensure(self: &Arc<Self>, id: &Identity) -> Result<(), CertError> {
        if let Some(i) = self.cached(id) {
            *i.wanted_at.lock().expect("lock") = std::time::Instant::now();
            return Ok(());
        }
        let (mgr, id) = (self.clone(), id.clone());
        tokio::task::spawn_blocking(move || mgr.issued_with(&id, false).map(|_| ()))
            .await
            .map_err(|e| CertError::Task(e.to_string()))?
    }

    /// Issues or renews the certificates of `ids` now (called periodically,
    /// off the async runtime: signer requests block), and forgets
    /// identities no longer in use — but never a certificate cached since
    /// this refresh started (a pod that arrived meanwhile).
    pub fn refresh(&self, ids: &[Identity]) {
        self.refresh_since(ids, std::time::Instant::now())
    }

    /// [`Self::refresh`] for `ids` as they were at `started`: nothing wanted
    /// since is evicted.
    fn refresh_since(&self, ids: &[Identity], started: std::time::Instant) {
        for id in ids {
            if let Err(e) = self.issued(id) {
                warn!(identity = %id, error = %skiff_core::report(&e), "certificate renewal failed");
            }
        }
        self.certs.lock().expect("lock").retain(|k, v| ids.contains(k) || *v.wanted_at.lock().expect("lock") >= started);
    }

    /// Runs `refresh` every [`Self::refresh_interval`] for the identities
    /// `ids` names at that moment, on a blocking thread: signer requests
    /// block and must stay off the async workers.
    pub fn spawn_refresh(self: &Arc<Self>, ids: impl Fn() -> Vec<Identity> + Send + 'static) {
        let certs = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(certs.refresh_interval()).await;
                // The time before the list: whatever is wanted after it
                // was made is kept.
                let started = std::time::Instant::now();
                let (c, now) = (certs.clone(), ids());
                let _ = tokio::task::spawn_blocking(move || c.refresh_since(&now, started)).await;
            }
        });
    }

    /// How often `refresh` should run: well inside the half-life.
    pub fn refresh_interval(&self) -> Duration {
        (self.lifetime / 8).clamp(Duration::from_millis(200), Duration::from_secs(60))
    }

    pub fn summary(&self) -> Vec<CertSummary> {
        let mut v: Vec<CertSummary> = self
            .certs
            .lock()
            .expect("lock")
            .values()
            .map(|i| CertSummary {
                identity: i.cert.identity.to_string(),
                not_before_unix: unix(i.cert.not_before),
                not_after_unix: unix(i.cert.not_after),
                rotates_at_unix: unix(i.cert.refresh_at()),
            })
            .collect();
        v.sort_by(|a, b| a.identity.cmp(&b.identity));
        v
    }

    /// TLS 1.3 server config for a pod: presents the pod's certificate and
    /// requires a client certificate chaining to the trust bundle.
    /// Call [`Self::ensure`] first on an async worker: this issues (and
    /// may block on the signer) only when no certificate is cached.
    pub fn server_config(self: &Arc<Self>, id: Identity) -> Result<Arc<ServerConfig>, CertError> {
        self.issued_with(&id, false)?;
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| IdentityError::Tls(rustls::Error::General(e.to_string())))?;
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(IdentityError::Tls)?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Resolver { mgr: self.clone(), id }));
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(cfg))
    }

    /// TLS 1.3 client config: presents `src`'s certificate and accepts only
    /// a server proving `expected`.
    /// Call [`Self::ensure`] first on an async worker (see `server_config`).
    pub fn client_config(self: &Arc<Self>, src: Identity, expected: Identity) -> Result<Arc<ClientConfig>, CertError> {
        self.issued_with(&src, false)?;
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(IdentityError::Tls)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ExpectedIdentityVerifier::new(self.roots.clone(), expected)))
            .with_client_cert_resolver(Arc::new(Resolver { mgr: self.clone(), id: src }));
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// Hands out the current certificate of one identity at each handshake, so
/// rotation needs no new TLS config.
#[derive(Debug)]
struct Resolver {
    mgr: Arc<CertManager>,
    id: Identity,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertManager")
    }
}

impl Resolver {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        // The local CA signs in-process: renewing here is cheap. The signer
        // is a network call, never made inside a handshake (it would block
        // an async worker): the cached certificate serves, the background
        // refresh renews it.
        if matches!(self.mgr.issuer, Issuer::Signer { .. }) {
            return match self.mgr.cached(&self.id) {
                Some(i) => Some(i.key.clone()),
                None => {
                    warn!(identity = %self.id, "no valid certificate for handshake (the signer has not renewed it)");
                    None
                }
            };
        }
        match self.mgr.issued_with(&self.id, true) {
            Ok(i) => Some(i.key.clone()),
            Err(e) => {
                warn!(identity = %self.id, error = %skiff_core::report(&e), "no certificate for handshake");
                None
            }
        }
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Command-line flags naming the in-cluster signer (ztunnel and the
/// waypoint take the same ones).
#[derive(clap::Args, Clone, Debug)]
pub struct SignerArgs {
    /// Obtain workload certificates from the in-cluster signer at this URL
    /// (`https://host:port`) instead of a local CA (--ca-dir is then unused).
    #[arg(long, value_name = "URL", requires = "trust_bundle")]
    pub signer_url: Option<String>,
    /// The name the signer's TLS certificate must carry.
    #[arg(long, default_value = "skiff-ca.skiff-system.svc")]
    pub signer_name: String,
    /// Projected service-account token (audience skiff-ca) sent to the signer.
    #[arg(long, default_value = "/var/run/secrets/tokens/skiff-ca-token")]
    pub signer_token: std::path::PathBuf,
    /// PEM file of the trusted roots (every root during a rotation); with
    /// --signer-url.
    #[arg(long, value_name = "PATH")]
    pub trust_bundle: Option<std::path::PathBuf>,
    /// One certificate request to the signer (connect, TLS, answer) gives
    /// up after this long; the current certificate keeps serving.
    #[arg(long, default_value = "10", value_name = "SECONDS", value_parser = crate::limits::seconds)]
    pub signer_timeout: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A signer that cannot be reached must not take away a certificate
    /// that is past its half-life but still valid.
    #[test]
    fn a_failed_renewal_keeps_the_valid_certificate() {
        let ca = Ca::generate("cluster.local").unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let token = dir.join("token");
        std::fs::write(&token, "t").unwrap();
        // Nothing listens on port 1 of loopback: every request fails.
        let client = SignerClient::new("https://127.0.0.1:1", "signer.test", token, &[ca.root()]).unwrap();
        let mgr = CertManager::from_signer(client, &[ca.root()], "cluster.local", Duration::from_secs(400)).unwrap();
        let id = Identity::new("cluster.local", "app", "web");
        assert!(mgr.issued(&id).is_err(), "no certificate and no signer: nothing to serve");
        // Issued 250 s ago for 400 s: half-life passed, 150 s left.
        let cert = ca.issue_at(&id, SystemTime::now() - Duration::from_secs(250), Duration::from_secs(400)).unwrap();
        let signing = rustls::crypto::ring::sign::any_supported_type(&cert.key()).unwrap();
        let issued = Arc::new(Issued { key: Arc::new(CertifiedKey::new(cert.chain.clone(), signing)), cert, wanted_at: Mutex::new(std::time::Instant::now()) });
        mgr.certs.lock().unwrap().insert(id.clone(), issued.clone());
        let got = mgr.issued(&id).expect("the valid certificate is kept");
        assert!(Arc::ptr_eq(&got, &issued));
        mgr.refresh(std::slice::from_ref(&id));
        assert!(Arc::ptr_eq(&mgr.issued(&id).unwrap(), &issued), "refresh must not drop it either");
    }

    /// A signer that accepts connections and never answers: every request
    /// waits out the client's timeout.
    fn blackholed_signer(ca: &Ca, dir: &std::path::Path, timeout: Duration) -> (SignerClient, std::net::TcpListener) {
        let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let token = dir.join("token");
        std::fs::write(&token, "t").unwrap();
        let url = format!("https://{}", hole.local_addr().unwrap());
        (SignerClient::new(&url, "signer.test", token, &[ca.root()]).unwrap().with_timeout(timeout), hole)
    }

    fn past_half_life(ca: &Ca, id: &Identity) -> Arc<Issued> {
        let cert = ca.issue_at(id, SystemTime::now() - Duration::from_secs(250), Duration::from_secs(400)).unwrap();
        let signing = rustls::crypto::ring::sign::any_supported_type(&cert.key()).unwrap();
        Arc::new(Issued { key: Arc::new(CertifiedKey::new(cert.chain.clone(), signing)), cert, wanted_at: Mutex::new(std::time::Instant::now()) })
    }

    /// Issue 13 item 6: with the signer blackholed and the certificate past
    /// its half-life, a new connection used to wait for the signer (10 s)
    /// on an async worker, stalling every relay on it. Now the data path
    /// takes the cached, still valid certificate at once and a TLS
    /// handshake completes with it; only the background refresh waits.
    #[tokio::test(flavor = "current_thread")]
    async fn a_blackholed_signer_never_stalls_the_data_path() {
        let ca = Ca::generate("cluster.local").unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let (client, _hole) = blackholed_signer(&ca, tmp.path(), Duration::from_secs(5));
        let mgr = CertManager::from_signer(client, &[ca.root()], "cluster.local", Duration::from_secs(400)).unwrap();
        let (a, b) = (Identity::new("cluster.local", "app", "a"), Identity::new("cluster.local", "app", "b"));
        let (ca_cert, cb_cert) = (past_half_life(&ca, &a), past_half_life(&ca, &b));
        mgr.certs.lock().unwrap().insert(a.clone(), ca_cert.clone());
        mgr.certs.lock().unwrap().insert(b.clone(), cb_cert.clone());
        // A ticker on the same (single) worker: it keeps ticking only if
        // nothing blocks the worker.
        let ticks = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let t = ticks.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                t.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        let start = std::time::Instant::now();
        mgr.ensure(&a).await.unwrap();
        mgr.ensure(&b).await.unwrap();
        let client_cfg = mgr.client_config(a.clone(), b.clone()).unwrap();
        let server_cfg = mgr.server_config(b.clone()).unwrap();
        let (c, s) = tokio::io::duplex(64 * 1024);
        let name = rustls::pki_types::ServerName::try_from("hbone.skiff").unwrap();
        let (client, server) = tokio::join!(
            tokio_rustls::TlsConnector::from(client_cfg).connect(name, c),
            tokio_rustls::TlsAcceptor::from(server_cfg).accept(s)
        );
        let (client, server) = (client.expect("client handshake"), server.expect("server handshake"));
        assert!(start.elapsed() < Duration::from_secs(2), "the data path waited for the signer: {:?}", start.elapsed());
        let presented = server.get_ref().1.peer_certificates().unwrap()[0].clone();
        assert_eq!(presented, ca_cert.cert.chain[0], "the still-valid cached certificate is presented");
        assert_eq!(client.get_ref().1.peer_certificates().unwrap()[0], cb_cert.cert.chain[0]);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(ticks.load(std::sync::atomic::Ordering::Relaxed) >= 5, "the worker kept running other tasks");
    }

    /// Issue 13 item 6: a refresh forgot every identity not in its list,
    /// including one whose certificate was issued while it ran (a pod that
    /// arrived meanwhile): that pod's next handshake had no certificate.
    #[test]
    fn a_certificate_cached_during_a_refresh_is_not_evicted_by_it() {
        let ca = Ca::generate("cluster.local").unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let (client, _hole) = blackholed_signer(&ca, tmp.path(), Duration::from_millis(1500));
        let mgr = CertManager::from_signer(client, &[ca.root()], "cluster.local", Duration::from_secs(400)).unwrap();
        let (old, gone, new) =
            (Identity::new("cluster.local", "app", "old"), Identity::new("cluster.local", "app", "gone"), Identity::new("cluster.local", "app", "new"));
        mgr.certs.lock().unwrap().insert(gone.clone(), past_half_life(&ca, &gone));
        let refresher = {
            let (mgr, old) = (mgr.clone(), old.clone());
            // Waits on the blackholed signer for `old`.
            std::thread::spawn(move || mgr.refresh(&[old]))
        };
        std::thread::sleep(Duration::from_millis(300));
        mgr.certs.lock().unwrap().insert(new.clone(), past_half_life(&ca, &new));
        refresher.join().unwrap();
        assert!(mgr.cached(&new).is_some(), "the certificate cached during the refresh was evicted");
        assert!(mgr.cached(&gone).is_none(), "an identity no longer in use is still forgotten");
    }
}
