//! HTTPS: rustls with TLS 1.2 and 1.3, HTTP/2 and HTTP/1.1 by ALPN, and
//! optional client certificates (mTLS) whose subject becomes the identity.
//!
//! The certificate, key and client CA are read again when their files
//! change: new connections get the new certificate, open ones keep theirs.
//! A file that does not load (a half-written rotation, a key that does not
//! match the certificate) is refused with a log line and the certificate in
//! use stays.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::reload;

/// Whether clients must present a certificate signed by the client CA.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClientAuth {
    /// A certificate is verified if sent, and its subject is the identity;
    /// clients without one authenticate otherwise.
    #[default]
    Optional,
    /// Connections without a valid certificate are refused.
    Required,
}

#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    pub client_auth: ClientAuth,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Invalid { path: String, why: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn invalid(path: &Path, why: impl ToString) -> TlsError {
    TlsError::Invalid {
        path: path.display().to_string(),
        why: why.to_string(),
    }
}

/// Certificates of a PEM file (a chain: leaf first).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, e))?;
    if certs.is_empty() {
        return Err(invalid(path, "no certificate in the file"));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| invalid(path, format!("no usable private key: {e}")))
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn build(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in load_certs(ca)? {
                roots.add(cert).map_err(|e| invalid(ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let verifier = match files.client_auth {
                ClientAuth::Optional => verifier.allow_unauthenticated(),
                ClientAuth::Required => verifier,
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| invalid(ca, e))?)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        invalid(
            &files.cert,
            format!("certificate and key do not go together: {e}"),
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The server's TLS settings, swapped whole on reload.
pub struct Tls {
    files: TlsFiles,
    config: ArcSwap<ServerConfig>,
    fingerprint: Mutex<[u8; 32]>,
    reloads: prometheus_client::metrics::counter::Counter,
    failures: prometheus_client::metrics::counter::Counter,
}

impl Tls {
    pub fn load(files: TlsFiles) -> Result<Arc<Tls>, TlsError> {
        let config = build(&files)?;
        let fingerprint = fingerprint(&files).unwrap_or_default();
        Ok(Arc::new(Tls {
            files,
            config: ArcSwap::from_pointee(config),
            fingerprint: Mutex::new(fingerprint),
            reloads: Default::default(),
            failures: Default::default(),
        }))
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.load_full())
    }

    pub fn client_auth(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// Reads the files again if their content changed. `Ok(true)` when the
    /// new certificate is in use.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let now = fingerprint(&self.files).map_err(|source| TlsError::Read {
            path: self.files.cert.display().to_string(),
            source,
        })?;
        let mut seen = self.fingerprint.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == now {
            return Ok(false);
        }
        let config = build(&self.files)?;
        self.config.store(Arc::new(config));
        *seen = now;
        Ok(true)
    }

    /// Reloads whenever the files change, for as long as the returned
    /// watch is kept.
    pub fn watch(self: &Arc<Self>) -> reload::FileWatch {
        let mut paths = vec![self.files.cert.clone(), self.files.key.clone()];
        paths.extend(self.files.client_ca.clone());
        let tls = self.clone();
        reload::watch(&paths, "TLS", move || match tls.reload() {
            Ok(true) => {
                tls.reloads.inc();
                tracing::info!(cert = %tls.files.cert.display(), "TLS certificate reloaded; new connections use it");
            }
            Ok(false) => {}
            Err(e) => {
                tls.failures.inc();
                tracing::error!(error = %e, "new TLS files refused; the certificate in use stays");
            }
        })
    }

    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "tls_reloads",
            "Certificate reloads that took effect",
            self.reloads.clone(),
        );
        registry.register(
            "tls_reload_failures",
            "Changed TLS files that were refused (the old certificate stayed)",
            self.failures.clone(),
        );
    }
}

fn fingerprint(files: &TlsFiles) -> std::io::Result<[u8; 32]> {
    let mut paths: Vec<&Path> = vec![&files.cert, &files.key];
    if let Some(ca) = &files.client_ca {
        paths.push(ca);
    }
    reload::fingerprint(&paths)
}

/// The identity a client certificate carries: its subject's common name,
/// or the whole subject when it has none.
pub fn certificate_subject(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let subject = parsed.subject();
    let cn = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    cn.or_else(|| Some(subject.to_string()))
        .filter(|s| !s.is_empty() && s.len() <= 256)
}
