//! TLS (rustls, ring) on a listener, from PEM files, and optional client certificates (mTLS).
//!
//! With a client CA, a client certificate that chains to it binds the connection to one identity,
//! named in the certificate's subject alternative names: `urn:rtpay:tenant:<uuid>`,
//! `urn:rtpay:client:<uuid>` (one OAuth client) or `urn:rtpay:operator`. Authentication then also
//! requires the credential (API key, OAuth client secret or access token, operator token) to belong
//! to that identity, so a stolen key is useless without the certificate and a certificate is
//! useless with another tenant's key. A tenant's certificate covers all its credentials; a
//! client's certificate only that client's secret and tokens. Connections without a certificate are
//! accepted (health checks, metrics) but authenticate to nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// A TLS handshake that takes longer than this is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Client certificates are verified against these roots; `None`: no client certificates.
    pub client_ca: Option<PathBuf>,
}

/// Whom the connection's client certificate names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerIdentity {
    /// TLS with client certificates, and this connection presented none.
    Anonymous,
    Tenant(u128),
    /// One OAuth client (of some tenant).
    Client(u128),
    Operator,
    /// A valid certificate that names no rtpay identity.
    Unbound,
}

pub(crate) fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{what} {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{what} {}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{what} {}: no certificate in the file", path.display()));
    }
    Ok(certs)
}

/// Builds the acceptor; every error names the file and what is wrong with it.
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, String> {
    config(files, ClientCertificates::Optional, vec![b"http/1.1".to_vec()])
}

/// The ISO 8583 listener's TLS: the same certificate; with `--tls-client-ca`, a client
/// certificate from it is required at the handshake (a card network's link has one peer, which
/// must prove who it is before any message is read), and must name the card network.
pub fn iso8583_tls(files: &TlsFiles) -> Result<crate::iso8583::Tls, String> {
    Ok(crate::iso8583::Tls {
        acceptor: config(files, ClientCertificates::Required, Vec::new())?,
        network_certificate: files.client_ca.is_some(),
    })
}

/// With a client CA: whether a connection may go on without a certificate (the HTTP listener's
/// routes decide what each needs), or not.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ClientCertificates {
    Optional,
    Required,
}

fn config(files: &TlsFiles, clients: ClientCertificates, alpn: Vec<Vec<u8>>) -> Result<TlsAcceptor, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs(&files.cert, "--tls-cert")?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("--tls-key {}: no PEM private key: {e}", files.key.display()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(path, "--tls-client-ca")? {
                roots.add(cert).map_err(|e| format!("--tls-client-ca {}: {e}", path.display()))?;
            }
            let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if clients == ClientCertificates::Optional {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier.build().map_err(|e| format!("--tls-client-ca {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("--tls-cert/--tls-key: the key does not fit the certificate or is unusable: {e}"))?;
    config.alpn_protocols = alpn;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The subject alternative name that makes a client certificate the card network's: the only one
/// the ISO 8583 listener admits when it checks client certificates (one CA may sign tenants' too).
pub const CARD_NETWORK_URI: &str = "urn:rtpay:card-network";

/// Whether a verified client certificate names the card network ([`CARD_NETWORK_URI`]).
pub fn names_card_network(cert: &[u8]) -> bool {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(cert) else { return false };
    let Ok(Some(san)) = cert.subject_alternative_name() else { return false };
    san.value
        .general_names
        .iter()
        .any(|name| matches!(name, x509_parser::extensions::GeneralName::URI(uri) if *uri == CARD_NETWORK_URI))
}

/// The identity in a verified client certificate's subject alternative names.
pub fn identity_of(cert: &[u8]) -> PeerIdentity {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(cert) else { return PeerIdentity::Unbound };
    let Ok(Some(san)) = cert.subject_alternative_name() else { return PeerIdentity::Unbound };
    for name in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::URI(uri) = name {
            if *uri == "urn:rtpay:operator" {
                return PeerIdentity::Operator;
            }
            if let Some(id) = uri.strip_prefix("urn:rtpay:tenant:").and_then(|t| uuid::Uuid::parse_str(t).ok()) {
                return PeerIdentity::Tenant(id.as_u128());
            }
            if let Some(id) = uri.strip_prefix("urn:rtpay:client:").and_then(|t| uuid::Uuid::parse_str(t).ok()) {
                return PeerIdentity::Client(id.as_u128());
            }
        }
    }
    PeerIdentity::Unbound
}

/// Serves `router` over TLS until `shutdown` resolves, then lets open connections finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    acceptor: TlsAcceptor,
    mutual: bool,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    crate::accept_until(listener, shutdown, |stream, addr, watcher| {
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                // A failed handshake is the client's problem; the reason is not a secret.
                Ok(Err(e)) => return tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                Err(_) => return tracing::debug!(%addr, "TLS handshake timed out"),
            };
            let identity = match stream.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                Some(cert) => identity_of(cert),
                None if mutual => PeerIdentity::Anonymous,
                None => PeerIdentity::Unbound,
            };
            let peer = axum::Extension(ConnectInfo(crate::Peer::new(addr)));
            if mutual {
                let layers = tower_layer::Stack::new(peer, axum::Extension(identity));
                crate::serve_connection(stream, router, layers, watcher, addr).await;
            } else {
                crate::serve_connection(stream, router, peer, watcher, addr).await;
            }
        });
    })
    .await
}
