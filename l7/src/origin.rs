//! TLS the proxy originates to a destination's endpoints (a
//! DestinationRule's `tls.mode` SIMPLE or MUTUAL; Istio's "TLS
//! origination", so an app can call `http://` an external HTTPS API): the
//! rustls client configuration made from the rule's settings — trust from
//! `caCertificates` (a file), else `credentialName` (a Secret in the
//! proxy's namespace), else the system's roots; the client certificate for
//! MUTUAL; `subjectAltNames`; `insecureSkipVerify` — and the name sent.
//!
//! Configurations are cached per settings and rebuilt every 10 s, so a
//! rotated file or Secret is picked up without a restart; connections
//! already open keep theirs.

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use skiff_core::{
    model::Snapshot,
    routing::{ClientTls, TlsMode},
};
use tokio_rustls::rustls::{
    self,
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        WebPkiServerVerifier,
    },
    crypto::CryptoProvider,
    pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};


/// TLS the proxy originates to an endpoint: the client configuration and
/// the name sent (SNI, and what the server's certificate is checked
/// against unless the rule lists `subjectAltNames`).
#[derive(Clone)]
pub struct Originate {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
    /// Tells pooled connections of different settings or names apart.
    pub key: u64,
}

/// How long a built configuration is used before its files and Secrets
/// are read again.
const REFRESH: Duration = Duration::from_secs(10);

/// Client configurations (or why one cannot be made) by settings and
/// application protocol, with when each was built.
type Built = HashMap<(ClientTls, Alpn), (Instant, Result<Arc<ClientConfig>, String>)>;

/// The application protocol offered in the handshake (ALPN).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Alpn {
    Http1,
    Http2,
    /// Bytes passed through: none offered.
    None,
}

/// Built client configurations, by settings and protocol.
#[derive(Default)]
pub struct Origins {
    cache: Mutex<Built>,
}

impl Origins {
    /// The TLS to originate for `tls` to a server named `host` (the
    /// upstream request's host, unless the rule sets `sni`), speaking
    /// HTTP/2 or not; None when the rule originates none. The error says
    /// what is wrong (file, Secret, key, PEM), for the log.
    pub fn originate(&self, tls: Option<&ClientTls>, snap: &Snapshot, proxy_ns: &str, may_read_secrets: bool, host: &str, alpn: Alpn) -> Result<Option<Originate>, String> {
        let Some(tls) = tls.filter(|t| t.originates()) else { return Ok(None) };
        let name = tls.sni.as_deref().unwrap_or(host);
        let server_name = ServerName::try_from(name.to_owned()).map_err(|_| format!("{name:?} is not a name to send as SNI"))?;
        let key = (tls.clone(), alpn);
        let now = Instant::now();
        // A configuration that cannot be made is not tried again (files
        // read, Secrets parsed) on every request until the next refresh.
        let cached = self.cache.lock().expect("lock").get(&key).filter(|(at, _)| now.duration_since(*at) < REFRESH).map(|(_, c)| c.clone());
        let config = match cached {
            Some(c) => c?,
            None => {
                let c = client_config(tls, snap, proxy_ns, may_read_secrets, alpn).map(Arc::new);
                let mut cache = self.cache.lock().expect("lock");
                cache.retain(|_, (at, _)| now.duration_since(*at) < REFRESH * 6);
                cache.insert(key, (now, c.clone()));
                c?
            }
        };
        let mut h = std::hash::DefaultHasher::new();
        (tls, alpn, name).hash(&mut h);
        // Never 0 (no TLS).
        Ok(Some(Originate { config, server_name, key: h.finish() | 1 }))
    }
}

/// The system's root certificates, read once.
fn system_roots() -> Result<Arc<RootCertStore>, String> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(format!("no system root certificates could be read ({:?}): set caCertificates or credentialName", found.errors.first()));
            }
            Ok(Arc::new(roots))
        })
        .clone()
}

fn pem_certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem).collect::<Result<_, _>>().map_err(|e| format!("{what}: not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what}: no certificate in it"));
    }
    Ok(certs)
}

/// A root store of the CA certificates in `pem`; `what` names where they
/// came from, for the error.
fn roots_of(pem: &[u8], what: &str) -> Result<Arc<RootCertStore>, String> {
    let mut r = RootCertStore::empty();
    for c in pem_certs(pem, what)? {
        r.add(c).map_err(|e| format!("{what}: not a usable CA certificate: {e}"))?;
    }
    Ok(Arc::new(r))
}

fn read_file(path: &str, field: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{field} {path:?} cannot be read: {e}"))
}

/// A Secret of the proxy's namespace by name (data by key).
fn secret<'s>(snap: &'s Snapshot, ns: &str, name: &str) -> Option<&'s std::collections::BTreeMap<String, Vec<u8>>> {
    snap.secrets.get(&format!("{ns}/{name}")).map(|s| &s.data)
}

/// The client configuration for `tls` (SIMPLE or MUTUAL).
pub fn client_config(tls: &ClientTls, snap: &Snapshot, proxy_ns: &str, may_read_secrets: bool, alpn: Alpn) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    if tls.credential_name.is_some() && !may_read_secrets {
        return Err("credentialName: this proxy does not read Secrets (start the waypoint with --read-secrets, and let it read Secrets in its namespace)".into());
    }
    let cred = tls.credential_name.as_deref();
    let what = |n: &str| format!("Secret {proxy_ns}/{n}");
    // Trust.
    let verifier: Arc<dyn ServerCertVerifier> = if tls.insecure_skip_verify {
        Arc::new(NoVerification(provider.clone()))
    } else {
        let roots = match (&tls.ca_certificates, cred) {
            (Some(path), _) => roots_of(&read_file(path, "caCertificates")?, &format!("caCertificates {path:?}"))?,
            (None, Some(name)) => {
                // `<name>-cacert` first (Istio's separate CA Secret), then
                // the Secret itself; neither: the system's roots.
                let lookup = |n: &str| secret(snap, proxy_ns, n);
                let empty = std::collections::BTreeMap::new();
                let data = secret(snap, proxy_ns, name);
                match skiff_core::gateway::credential_ca(lookup, proxy_ns, name, data.unwrap_or(&empty))? {
                    Some((pem, from)) => roots_of(&pem, &format!("{}: the CA", what(&from)))?,
                    None if data.is_none() => return Err(format!("{} does not exist (or is not readable by the proxy)", what(name))),
                    None => system_roots()?,
                }
            }
            (None, None) => system_roots()?,
        };
        let inner = WebPkiServerVerifier::builder_with_provider(roots, provider.clone()).build().map_err(|e| format!("server verifier: {e}"))?;
        if tls.subject_alt_names.is_empty() {
            inner
        } else {
            let names = tls
                .subject_alt_names
                .iter()
                .map(|n| ServerName::try_from(n.clone()).map_err(|_| format!("subjectAltNames: {n:?} is not a DNS name or IP address")))
                .collect::<Result<Vec<_>, _>>()?;
            Arc::new(AnyOfNames { inner, names })
        }
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("protocol versions: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = if tls.mode == TlsMode::Mutual {
        let (chain, key, from) = match (cred, &tls.client_certificate, &tls.private_key) {
            (Some(name), _, _) => {
                let lookup = |n: &str| secret(snap, proxy_ns, n);
                let c = skiff_core::gateway::credential(lookup, proxy_ns, name, false)?;
                (c.cert_chain, c.key, what(name))
            }
            (None, Some(c), Some(k)) => (read_file(c, "clientCertificate")?, read_file(k, "privateKey")?, format!("clientCertificate {c:?}")),
            _ => return Err("MUTUAL without a client certificate".into()),
        };
        let certs = pem_certs(&chain, &from)?;
        let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| format!("{from}: the key is not a PEM private key: {e}"))?;
        builder.with_client_auth_cert(certs, key).map_err(|e| format!("{from}: the key does not go with the certificate, or is unusable: {e}"))?
    } else {
        builder.with_no_client_auth()
    };
    cfg.alpn_protocols = match alpn {
        Alpn::Http1 => vec![b"http/1.1".to_vec()],
        Alpn::Http2 => vec![b"h2".to_vec()],
        Alpn::None => Vec::new(),
    };
    Ok(cfg)
}

/// `subjectAltNames`: the chain must verify (CA, validity) and the
/// certificate must carry one of the names, whatever name was sent.
#[derive(Debug)]
struct AnyOfNames {
    inner: Arc<WebPkiServerVerifier>,
    names: Vec<ServerName<'static>>,
}

impl ServerCertVerifier for AnyOfNames {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut last = rustls::Error::General("no subjectAltNames".into());
        for n in &self.names {
            match self.inner.verify_server_cert(end_entity, intermediates, n, ocsp, now) {
                Ok(v) => return Ok(v),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `insecureSkipVerify`: no check of the CA or the names (the handshake's
/// signatures are still checked, so the peer holds the key of the
/// certificate it sent).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(&self, _: &CertificateDer<'_>, _: &[CertificateDer<'_>], _: &ServerName<'_>, _: &[u8], _: UnixTime) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
