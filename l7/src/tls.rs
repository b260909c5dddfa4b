//! The ingress gateway's TLS servers: each HTTPS server's rustls
//! configuration, made from its `credentialName` Secret (certificate,
//! key, and for MUTUAL the client CA) and its protocol versions, and the
//! `subjectAltNames` check of a client certificate. Pure of I/O: the
//! gateway front builds these on every config change and hands each new
//! connection the configuration of the server its SNI picks.

use std::sync::Arc;

use skiff_core::{
    gateway::{self, Server, TlsMode, TlsVersion},
    model::Snapshot,
};
use tokio_rustls::rustls::{
    self,
    pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    RootCertStore, ServerConfig, SupportedProtocolVersion,
};

/// A server of one Gateway: `namespace/name` and its port name (unique in
/// a Gateway, and stable when other servers are added or removed).
pub type ServerKey = (String, String);

pub fn server_key(o: &gateway::Opened<'_>) -> ServerKey {
    (format!("{}/{}", o.gateway.namespace, o.gateway.name), o.server.port_name.clone())
}

/// The protocol versions a server allows. rustls speaks TLS 1.2 and 1.3:
/// a minimum below 1.2 (or TLS_AUTO) allows 1.2; a maximum below 1.2
/// leaves nothing, and the server stays closed, reported.
pub fn versions(min: TlsVersion, max: TlsVersion) -> Result<Vec<&'static SupportedProtocolVersion>, String> {
    let allows = |v: TlsVersion| (min == TlsVersion::Auto || min <= v) && (max == TlsVersion::Auto || max >= v);
    let mut out = Vec::new();
    if allows(TlsVersion::V1_2) {
        out.push(&rustls::version::TLS12);
    }
    if allows(TlsVersion::V1_3) {
        out.push(&rustls::version::TLS13);
    }
    if out.is_empty() {
        return Err(format!("maxProtocolVersion {max:?} leaves no version Skiff speaks (TLS 1.2 and 1.3)"));
    }
    Ok(out)
}

/// The rustls configuration of one SIMPLE or MUTUAL server, from the
/// Secrets of the gateway's namespace; the error says what is missing or
/// wrong (Secret, key, PEM), for the log.
pub fn server_config(snap: &Snapshot, gateway_ns: &str, server: &Server) -> Result<Arc<ServerConfig>, String> {
    let tls = server.tls.as_ref().ok_or("no TLS settings")?;
    let name = tls.credential_name.as_deref().ok_or("no credentialName")?;
    let lookup = |n: &str| snap.secrets.get(&format!("{gateway_ns}/{n}")).map(|s| &s.data);
    let cred = gateway::credential(lookup, gateway_ns, name, tls.mode == TlsMode::Mutual)?;
    let what = format!("Secret {gateway_ns}/{name}");
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&cred.cert_chain).collect::<Result<_, _>>().map_err(|e| format!("{what}: the certificate is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what}: no certificate in the certificate key"));
    }
    let key = PrivateKeyDer::from_pem_slice(&cred.key).map_err(|e| format!("{what}: the key is not a PEM private key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions(tls.min_version, tls.max_version)?)
        .map_err(|e| format!("protocol versions: {e}"))?;
    let builder = match &cred.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca) {
                let c = c.map_err(|e| format!("{what}: the client CA is not PEM: {e}"))?;
                roots.add(c).map_err(|e| format!("{what}: the client CA is not a usable certificate: {e}"))?;
            }
            if roots.is_empty() {
                return Err(format!("{what}: no certificate in the client CA"));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().map_err(|e| format!("{what}: client CA: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_single_cert(certs, key).map_err(|e| format!("{what}: the key does not go with the certificate, or is unusable: {e}"))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Whether a client certificate passes the server's `subjectAltNames`
/// (none listed: any certificate the CA signed; else one of its names
/// must be listed, exactly).
pub fn client_names_allowed(wanted: &[String], cert: Option<&CertificateDer<'_>>) -> bool {
    if wanted.is_empty() {
        return true;
    }
    let Some(cert) = cert else { return false };
    skiff_hbone::identity::subject_alt_names(cert).iter().any(|n| wanted.iter().any(|w| w == n))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ServerTLSSettings.TLSProtocol, as rustls can honour it.
    #[test]
    fn protocol_versions() {
        use TlsVersion::*;
        let names = |min, max| versions(min, max).map(|v| v.iter().map(|v| format!("{:?}", v.version)).collect::<Vec<_>>());
        assert_eq!(names(Auto, Auto).unwrap(), ["TLSv1_2", "TLSv1_3"]);
        assert_eq!(names(V1_2, Auto).unwrap(), ["TLSv1_2", "TLSv1_3"]);
        assert_eq!(names(V1_0, Auto).unwrap(), ["TLSv1_2", "TLSv1_3"], "below 1.2: rustls has none lower");
        assert_eq!(names(V1_3, Auto).unwrap(), ["TLSv1_3"]);
        assert_eq!(names(Auto, V1_2).unwrap(), ["TLSv1_2"]);
        assert!(names(Auto, V1_1).is_err());
    }
}
