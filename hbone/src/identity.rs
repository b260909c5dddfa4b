//! Workload identity: SPIFFE IDs, the local CA, workload certificates and
//! the TLS verifiers that check a peer is who it must be.
//!
//! Identities are `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//! Peers are verified against the trust bundle *and* the identity expected
//! for the destination, never just "signed by the CA".

use std::{
    fmt,
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData as _, SanType};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
    server::ParsedCertificate,
    DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// A SPIFFE workload identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Identity {
        Identity {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }

    /// Parses `spiffe://td/ns/NS/sa/SA`.
    pub fn parse(uri: &str) -> Option<Identity> {
        let rest = uri.strip_prefix("spiffe://")?;
        let mut parts = rest.split('/');
        let td = parts.next()?;
        if parts.next()? != "ns" {
            return None;
        }
        let ns = parts.next()?;
        if parts.next()? != "sa" {
            return None;
        }
        let sa = parts.next()?;
        if parts.next().is_some() || td.is_empty() || ns.is_empty() || sa.is_empty() {
            return None;
        }
        Some(Identity::new(td, ns, sa))
    }

    /// Istio's principal form, without the scheme: `td/ns/NS/sa/SA`.
    pub fn principal(&self) -> String {
        format!("{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

/// Identity problems.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The CA files could not be read or written.
    #[error("CA file {path}")]
    CaFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Key or certificate generation or parsing failed.
    #[error("certificate generation")]
    Rcgen(#[from] rcgen::Error),
    /// A certificate had no SPIFFE URI SAN, or more than one.
    #[error("certificate has no single SPIFFE identity")]
    NoSpiffeId,
    /// TLS setup failed.
    #[error("TLS configuration")]
    Tls(#[from] rustls::Error),
    /// The root key file may be read by others than its owner.
    #[error("root key {path} has mode {mode:o}: it must be readable by its owner only (0600 or 0400)")]
    KeyMode { path: PathBuf, mode: u32 },
    /// A certificate signing request is malformed or its signature (proof
    /// of possession of the key) is wrong.
    #[error("invalid certificate signing request")]
    Csr(#[source] rcgen::Error),
    /// The stored root certificate file does not hold a usable certificate.
    #[error("root certificate {path}: {why}")]
    CaCert { path: PathBuf, why: String },
    /// The stored root key file does not hold a usable private key.
    #[error("root key {path}: not a PEM private key of a supported type")]
    CaKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    /// The stored root key is not the key of the stored root certificate.
    #[error("root key {key} does not belong to root certificate {cert} (the key's public key differs from the certificate's): install the matching pair")]
    KeyMismatch { key: PathBuf, cert: PathBuf },
}

/// A workload certificate and its key.
#[derive(Clone, Debug)]
pub struct WorkloadCert {
    pub identity: Identity,
    pub chain: Vec<CertificateDer<'static>>,
    pub key_der: Vec<u8>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl WorkloadCert {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// Half-life: when rotation is due.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self.not_after.duration_since(self.not_before).unwrap_or_default();
        self.not_before + life / 2
    }
}

/// The local-mode CA: a self-signed root whose key lives in the state
/// directory (mode 0600), created on first use.
pub struct Ca {
    trust_domain: String,
    /// The root's name and key usages with its key: what signs.
    issuer: Issuer<'static, KeyPair>,
    root_der: CertificateDer<'static>,
    root_pem: String,
}

/// A root read from files: the certificate's PEM and both paths (for errors).
struct StoredRoot<'a> {
    cert_pem: &'a str,
    key_path: &'a Path,
    cert_path: &'a Path,
}

const CA_KEY: &str = "ca-key.pem";
const CA_CERT: &str = "ca-cert.pem";

fn write_private(path: &Path, contents: &str) -> Result<(), IdentityError> {
    let err = |source| IdentityError::CaFile { path: path.to_owned(), source };
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)
}

impl Ca {
    /// A new CA in memory (tests; "another CA").
    pub fn generate(trust_domain: &str) -> Result<Ca, IdentityError> {
        let key = KeyPair::generate()?;
        Self::from_key(trust_domain, key, None)
    }

    fn ca_params(trust_domain: &str) -> CertificateParams {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "skiff");
        dn.push(DnType::CommonName, format!("skiff root CA ({trust_domain})"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3650);
        params
    }

    fn from_key(trust_domain: &str, key: KeyPair, stored: Option<StoredRoot<'_>>) -> Result<Ca, IdentityError> {
        let Some(stored) = stored else {
            let params = Self::ca_params(trust_domain);
            let cert = params.self_signed(&key)?;
            let (root_der, root_pem) = (cert.der().clone(), cert.pem());
            return Ok(Ca { trust_domain: trust_domain.to_owned(), issuer: Issuer::new(params, key), root_der, root_pem });
        };
        // The stored certificate stays the trust anchor; the issuer takes
        // its name and key usages, with the stored key.
        let bad = |why: String| IdentityError::CaCert { path: stored.cert_path.to_owned(), why };
        let root_der: CertificateDer<'static> = rustls_pki_types::pem::PemObject::from_pem_slice(stored.cert_pem.as_bytes())
            .map_err(|e| bad(format!("no PEM certificate in it ({e})")))?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(root_der.as_ref()).map_err(|e| bad(format!("not a valid X.509 certificate ({e})")))?;
        // A key that is not the certificate's would sign certificates no
        // peer can verify: refuse at start instead of failing every handshake.
        if parsed.tbs_certificate.subject_pki.raw != key.subject_public_key_info().as_slice() {
            return Err(IdentityError::KeyMismatch { key: stored.key_path.to_owned(), cert: stored.cert_path.to_owned() });
        }
        let issuer = Issuer::from_ca_cert_der(&root_der, key).map_err(|e| bad(format!("not usable as a CA certificate ({e})")))?;
        Ok(Ca { trust_domain: trust_domain.to_owned(), issuer, root_der, root_pem: stored.cert_pem.to_owned() })
    }

    /// Loads the CA from `dir`, creating it (key file mode 0600) on first run.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Ca, IdentityError> {
        let key_path = dir.join(CA_KEY);
        let cert_path = dir.join(CA_CERT);
        let read = |p: &Path| fs::read_to_string(p).map_err(|source| IdentityError::CaFile { path: p.to_owned(), source });
        if key_path.exists() && cert_path.exists() {
            let key = KeyPair::from_pem(&read(&key_path)?).map_err(|source| IdentityError::CaKey { path: key_path.clone(), source })?;
            let cert_pem = read(&cert_path)?;
            return Self::from_key(trust_domain, key, Some(StoredRoot { cert_pem: &cert_pem, key_path: &key_path, cert_path: &cert_path }));
        }
        if key_path.exists() != cert_path.exists() {
            // An interrupted first run: the key is never overwritten, so say
            // what to do instead of failing obscurely at every start.
            return Err(IdentityError::CaFile {
                path: dir.to_owned(),
                source: std::io::Error::other(format!(
                    "holds only one of {CA_KEY} and {CA_CERT} (interrupted first run?): remove it to create a new CA"
                )),
            });
        }
        fs::create_dir_all(dir).map_err(|source| IdentityError::CaFile { path: dir.to_owned(), source })?;
        let ca = Self::generate(trust_domain)?;
        write_private(&key_path, &ca.issuer.key().serialize_pem())?;
        fs::write(&cert_path, &ca.root_pem).map_err(|source| IdentityError::CaFile { path: cert_path.clone(), source })?;
        Ok(ca)
    }

    /// Loads an existing root (the in-cluster signer's mounted Secret);
    /// never creates one. The key file must be private to its owner.
    pub fn load(key_path: &Path, cert_path: &Path, trust_domain: &str) -> Result<Ca, IdentityError> {
        let meta = fs::metadata(key_path).map_err(|source| IdentityError::CaFile { path: key_path.to_owned(), source })?;
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::KeyMode { path: key_path.to_owned(), mode });
        }
        let read = |p: &Path| fs::read_to_string(p).map_err(|source| IdentityError::CaFile { path: p.to_owned(), source });
        let key = KeyPair::from_pem(&read(key_path)?).map_err(|source| IdentityError::CaKey { path: key_path.to_owned(), source })?;
        let cert_pem = read(cert_path)?;
        Self::from_key(trust_domain, key, Some(StoredRoot { cert_pem: &cert_pem, key_path, cert_path }))
    }

    /// Writes this CA's key (mode 0600) and certificate as PEM (tests, and
    /// creating a root for a Secret).
    pub fn write_files(&self, key_path: &Path, cert_path: &Path) -> Result<(), IdentityError> {
        write_private(key_path, &self.issuer.key().serialize_pem())?;
        fs::write(cert_path, &self.root_pem).map_err(|source| IdentityError::CaFile { path: cert_path.to_owned(), source })
    }

    /// The root key (PKCS#8 PEM) and certificate (PEM), as `write_files`
    /// writes them: for `skiff install --ca generate`, which puts them in
    /// the signer's Secret.
    pub fn to_pem(&self) -> (String, String) {
        (self.issuer.key().serialize_pem(), self.root_pem.clone())
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Signs the public key of a CSR (whose signature must verify) as
    /// `identity`. Only the key is taken from the CSR: subject, SANs and
    /// extensions are the signer's, so a requester cannot slip in others.
    /// Returns the certificate as DER and as PEM.
    pub fn sign_csr(&self, identity: &Identity, csr_pem: &str, lifetime: Duration) -> Result<(CertificateDer<'static>, String), IdentityError> {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(IdentityError::Csr)?;
        let not_before = SystemTime::now() - Duration::from_secs(60);
        csr.params = leaf_params(identity, not_before, lifetime + Duration::from_secs(60))?;
        let cert = csr.signed_by(&self.issuer)?;
        Ok((cert.der().clone(), cert.pem()))
    }

    /// A TLS server certificate for `dns_names` (the signer's own endpoint).
    pub fn issue_server(&self, dns_names: &[String], lifetime: Duration) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), IdentityError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let now = SystemTime::now() - Duration::from_secs(60);
        params.not_before = now.into();
        params.not_after = (now + lifetime).into();
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))))
    }

    /// The root certificate (the trust bundle).
    pub fn root(&self) -> CertificateDer<'static> {
        self.root_der.clone()
    }

    /// Issues a certificate for `identity`, valid from `not_before` for `lifetime`.
    pub fn issue_at(&self, identity: &Identity, not_before: SystemTime, lifetime: Duration) -> Result<WorkloadCert, IdentityError> {
        let key = KeyPair::generate()?;
        let params = leaf_params(identity, not_before, lifetime)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(WorkloadCert {
            identity: identity.clone(),
            chain: vec![cert.der().clone()],
            key_der: key.serialize_der(),
            not_before,
            not_after: not_before + lifetime,
        })
    }

    /// Issues a certificate valid from now (back-dated a minute for clock skew).
    pub fn issue(&self, identity: &Identity, lifetime: Duration) -> Result<WorkloadCert, IdentityError> {
        let now = SystemTime::now() - Duration::from_secs(60);
        self.issue_at(identity, now, lifetime + Duration::from_secs(60))
    }
}

/// A workload certificate's parameters: the SPIFFE URI SAN only.
fn leaf_params(identity: &Identity, not_before: SystemTime, lifetime: Duration) -> Result<CertificateParams, IdentityError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = not_before.into();
    params.not_after = (not_before + lifetime).into();
    Ok(params)
}

/// A key pair and a CSR for `identity` (what ztunnel sends the signer).
pub fn csr_for(identity: &Identity) -> Result<(KeyPair, String), IdentityError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.pem()?))
}

/// The SPIFFE identity in a certificate's URI SAN.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, IdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|_| IdentityError::NoSpiffeId)?;
    let san = parsed.subject_alternative_name().map_err(|_| IdentityError::NoSpiffeId)?.ok_or(IdentityError::NoSpiffeId)?;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Identity::parse(u),
        _ => None,
    });
    match (ids.next(), ids.next()) {
        (Some(id), None) => Ok(id),
        _ => Err(IdentityError::NoSpiffeId),
    }
}

/// A certificate's subject alternative names: DNS names, URIs, email
/// addresses and IP addresses, as text (the ingress gateway's
/// `subjectAltNames` check of client certificates). Empty when there are
/// none or the certificate cannot be read.
pub fn subject_alt_names(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else { return Vec::new() };
    let Ok(Some(san)) = parsed.subject_alternative_name() else { return Vec::new() };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_string()),
            GeneralName::URI(u) => Some(u.to_string()),
            GeneralName::RFC822Name(e) => Some(e.to_string()),
            GeneralName::IPAddress(b) => match b.len() {
                4 => Some(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).ok()?).to_string()),
                16 => Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).ok()?).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

pub fn roots(bundle: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, IdentityError> {
    let mut roots = RootCertStore::empty();
    for c in bundle {
        roots.add(c.clone())?;
    }
    Ok(Arc::new(roots))
}

/// Client-side verifier: the server's chain must lead to the trust bundle
/// and its SPIFFE ID must be exactly `expected`.
#[derive(Debug)]
pub struct ExpectedIdentityVerifier {
    roots: Arc<RootCertStore>,
    expected: Identity,
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ExpectedIdentityVerifier {
    pub fn new(roots: Arc<RootCertStore>, expected: Identity) -> Self {
        let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        ExpectedIdentityVerifier { roots, expected, algs }
    }
}

impl ServerCertVerifier for ExpectedIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(&parsed, &self.roots, intermediates, now, self.algs.all)?;
        let got = identity_of(end_entity)
            .map_err(|_| rustls::Error::General("peer certificate carries no SPIFFE identity".into()))?;
        if got != self.expected {
            return Err(rustls::Error::General(format!("peer identity {got} is not the expected {}", self.expected)));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(&self, _: &[u8], _: &CertificateDer<'_>, _: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used in the mesh".into()))
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_parse_strictly() {
        let id = Identity::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        assert_eq!(id, Identity::new("cluster.local", "a", "b"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/a/sa/b");
        assert_eq!(id.principal(), "cluster.local/ns/a/sa/b");
        for bad in ["spiffe://td/ns/a", "spiffe://td/ns/a/sa/b/c", "http://td/ns/a/sa/b", "spiffe://td/x/a/sa/b", "spiffe:///ns/a/sa/b"] {
            assert!(Identity::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn signing_a_csr_takes_only_its_key() {
        let ca = Ca::generate("cluster.local").unwrap();
        let wanted = Identity::new("cluster.local", "app", "web");
        // A CSR asking for more than it is given: an extra SPIFFE ID.
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::URI("spiffe://cluster.local/ns/app/sa/web".try_into().unwrap()),
            SanType::URI("spiffe://cluster.local/ns/kube-system/sa/admin".try_into().unwrap()),
        ];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let (der, pem) = ca.sign_csr(&wanted, &csr, Duration::from_secs(600)).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(identity_of(&der).unwrap(), wanted, "exactly one SAN, the signer's");
        let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
        assert!(!parsed.is_ca());
        // A CSR whose signature does not match its key is refused.
        let mut bad = csr.clone().into_bytes();
        let i = bad.len() - 40;
        bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
        assert!(matches!(ca.sign_csr(&wanted, std::str::from_utf8(&bad).unwrap(), Duration::from_secs(600)), Err(IdentityError::Csr(_))));
    }

    #[test]
    fn loading_a_root_checks_the_key_is_the_certificates_and_names_a_bad_certificate_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (a_key, a_cert) = (dir.join("a-key.pem"), dir.join("a-cert.pem"));
        let (b_key, b_cert) = (dir.join("b-key.pem"), dir.join("b-cert.pem"));
        Ca::generate("cluster.local").unwrap().write_files(&a_key, &a_cert).unwrap();
        Ca::generate("cluster.local").unwrap().write_files(&b_key, &b_cert).unwrap();
        Ca::load(&a_key, &a_cert, "cluster.local").expect("a matching pair loads");
        // Key of one root, certificate of another.
        match Ca::load(&a_key, &b_cert, "cluster.local") {
            Err(e @ IdentityError::KeyMismatch { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(&a_key.display().to_string()) && msg.contains(&b_cert.display().to_string()), "{msg}");
            }
            Err(e) => panic!("expected a key mismatch, got {e}"),
            Ok(_) => panic!("loaded a key that is not the certificate's"),
        }
        // A certificate file that is not PEM: its own error, naming the file.
        let junk = dir.join("junk-cert.pem");
        fs::write(&junk, "not a certificate\n").unwrap();
        match Ca::load(&a_key, &junk, "cluster.local") {
            Err(e @ IdentityError::CaCert { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(&junk.display().to_string()) && !msg.contains("SPIFFE"), "{msg}");
            }
            Err(e) => panic!("expected a certificate file error, got {e}"),
            Ok(_) => panic!("loaded a junk certificate"),
        }
        // A key file that holds no key: named too.
        let junk_key = dir.join("junk-key.pem");
        fs::write(&junk_key, "not a key\n").unwrap();
        fs::set_permissions(&junk_key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        match Ca::load(&junk_key, &a_cert, "cluster.local") {
            Err(e @ IdentityError::CaKey { .. }) => assert!(e.to_string().contains(&junk_key.display().to_string()), "{e}"),
            Err(e) => panic!("expected a key file error, got {e}"),
            Ok(_) => panic!("loaded a junk key"),
        }
        // PEM framing around bytes that are no certificate.
        let bad_der = dir.join("bad-der-cert.pem");
        fs::write(&bad_der, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        match Ca::load(&a_key, &bad_der, "cluster.local") {
            Err(e @ IdentityError::CaCert { .. }) => assert!(e.to_string().contains(&bad_der.display().to_string()), "{e}"),
            Err(e) => panic!("expected a certificate file error, got {e}"),
            Ok(_) => panic!("loaded a broken certificate"),
        }
    }

    #[test]
    fn ca_persists_with_private_key_mode_and_issues_spiffe_certs() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let ca = Ca::load_or_create(&dir, "cluster.local").unwrap();
        let mode = fs::metadata(dir.join(CA_KEY)).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        let again = Ca::load_or_create(&dir, "cluster.local").unwrap();
        assert_eq!(ca.root(), again.root(), "the stored root is reused");
        let id = Identity::new("cluster.local", "ns1", "sa1");
        let cert = again.issue(&id, Duration::from_secs(3600)).unwrap();
        assert_eq!(identity_of(&cert.chain[0]).unwrap(), id);
        // Issued by the reloaded CA, verified against the original root.
        let v = ExpectedIdentityVerifier::new(roots(&[ca.root()]).unwrap(), id.clone());
        let name = ServerName::try_from("skiff").unwrap();
        v.verify_server_cert(&cert.chain[0], &[], &name, &[], UnixTime::now()).unwrap();
        let other = ExpectedIdentityVerifier::new(roots(&[ca.root()]).unwrap(), Identity::new("cluster.local", "ns1", "other"));
        let err = other.verify_server_cert(&cert.chain[0], &[], &name, &[], UnixTime::now()).unwrap_err();
        assert!(err.to_string().contains("not the expected"), "{err}");
        let foreign = Ca::generate("cluster.local").unwrap();
        let v = ExpectedIdentityVerifier::new(roots(&[foreign.root()]).unwrap(), id);
        assert!(v.verify_server_cert(&cert.chain[0], &[], &name, &[], UnixTime::now()).is_err());
    }
}
