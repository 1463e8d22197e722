//! Starting the security layer of `berth serve`: TLS, the authentication
//! sources, the token service's keys, API tokens, the audit log, and what
//! keeps them current while the node runs (file reloads, refreshes from the
//! metadata store).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use berth_auth::{
    ApiTokens, AuthSettings, Authenticator, ExternalIssuer, Htpasswd, KeySet, KeyStore,
    PeerCredential, SigningKey, VerifyingKey, now_ms,
};
use berth_proxy::ClientTls;
use berth_server::audit::Audit;
use berth_server::tls::Tls;
use berth_server::{FileWatch, Security};
use berth_store::MetaStore;

use crate::config::ServeConfig;

/// How often API tokens are re-read: a revocation takes effect on every
/// node within this.
pub const TOKEN_REFRESH: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Tls(#[from] berth_server::tls::TlsError),
    #[error(transparent)]
    Audit(#[from] berth_server::audit::AuditError),
    #[error("token signing keys: {0}")]
    Keys(#[from] berth_auth::KeyStoreError),
}

fn read(path: &Path) -> Result<Vec<u8>, SecurityError> {
    std::fs::read(path).map_err(|source| SecurityError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn load_htpasswd(path: &Path) -> Result<Htpasswd, SecurityError> {
    let text = String::from_utf8(read(path)?)
        .map_err(|_| SecurityError::Invalid(format!("{}: not UTF-8 text", path.display())))?;
    Htpasswd::parse(&text)
        .map_err(|e| SecurityError::Invalid(format!("htpasswd file {}: {e}", path.display())))
}

/// The running security layer and what keeps it current.
pub struct Started {
    pub security: Arc<Security>,
    pub tls: Option<Arc<Tls>>,
    /// Held, never read: dropping them stops the reloads.
    pub _watches: Vec<FileWatch>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

pub async fn start(
    config: &ServeConfig,
    meta: &Arc<dyn MetaStore>,
) -> Result<Started, SecurityError> {
    let settings = &config.security;
    let enabled = settings.auth_enabled();
    let tls = match &settings.tls {
        Some(files) => Some(Tls::load(files.clone())?),
        None => None,
    };
    let htpasswd = match &settings.htpasswd {
        Some(path) => Some(load_htpasswd(path)?),
        None => None,
    };
    let external = match &settings.external {
        None => None,
        Some(e) => {
            let keys = match (&e.public_key_file, &e.jwks_file) {
                (Some(pem), _) => VerifyingKey::from_pem(&read(pem)?),
                (None, Some(jwks)) => VerifyingKey::from_jwks(&read(jwks)?),
                (None, None) => {
                    return Err(SecurityError::Invalid(
                        "[external_token] needs public_key_file or jwks_file".into(),
                    ));
                }
            }
            .map_err(|err| SecurityError::Invalid(format!("[external_token] keys: {err}")))?;
            Some(ExternalIssuer {
                realm: e.realm.clone(),
                service: e.service.clone(),
                issuer: e.issuer.clone(),
                keys: KeySet::new(keys),
            })
        }
    };
    // The token service's keys: only when it issues tokens.
    let keys = if enabled && settings.token_service {
        Some(Arc::new(match &settings.token_key_file {
            Some(path) => KeyStore::from_file(SigningKey::from_pem(&read(path)?).map_err(|e| {
                SecurityError::Invalid(format!("token key file {}: {e}", path.display()))
            })?),
            None => KeyStore::open(meta.clone(), now_ms()).await?,
        }))
    } else {
        None
    };
    let tokens = enabled.then(|| Arc::new(ApiTokens::new(meta.clone())));
    let mut peers = Vec::new();
    if let Some(replication) = &config.replication {
        for p in &replication.peers {
            peers.push(PeerCredential {
                name: p.name.clone(),
                secret: p.secret.clone(),
                certificate: p.tls_identity.clone(),
            });
        }
        // The region-wide secret, for peers this region does not tail.
        if let Some(secret) = &replication.secret {
            peers.push(PeerCredential {
                name: "*".into(),
                secret: Some(secret.clone()),
                certificate: None,
            });
        }
    }
    let policy = settings
        .policy()
        .map_err(|e| SecurityError::Invalid(e.to_string()))?;
    let auth = Arc::new(Authenticator::new(
        AuthSettings {
            enabled,
            policy,
            token_service: settings.token_service,
            issuer: settings.token_issuer.clone(),
            service: settings.token_service_name.clone(),
            token_ttl: settings.token_ttl,
            external,
            peers,
            credential_ttl: settings.credential_ttl,
        },
        htpasswd,
        keys.clone(),
        tokens.clone(),
    ));
    let audit = Arc::new(match &settings.audit_log {
        Some(path) => Audit::with_file(path)?,
        None => Audit::log_only(),
    });
    let security = Arc::new(Security {
        auth: auth.clone(),
        audit,
        metrics_access: settings.metrics_access,
        token_realm: settings.token_realm.clone(),
        trusted_proxies: settings.trusted_proxies.clone(),
        advertise_url: config.advertise_url.clone(),
        metrics: Default::default(),
    });

    let mut watches = Vec::new();
    let mut tasks = Vec::new();
    if let Some(tls) = &tls {
        watches.push(tls.watch());
    }
    if let Some(path) = settings.htpasswd.clone() {
        let auth = auth.clone();
        let mut seen = berth_server::reload_fingerprint(&[&path]).ok();
        watches.push(berth_server::watch_files(
            std::slice::from_ref(&path.clone()),
            "htpasswd",
            move || {
                let now = berth_server::reload_fingerprint(&[&path]).ok();
                if now.is_none() || now == seen {
                    return;
                }
                match load_htpasswd(&path) {
                    Ok(file) => {
                        let users = file.len();
                        auth.set_htpasswd(file);
                        seen = now;
                        tracing::info!(path = %path.display(), users, "htpasswd reloaded");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "new htpasswd file refused; the users loaded before stay");
                    }
                }
            },
        ));
    }
    if let Some(tokens) = tokens {
        tasks.push(tokio::spawn(async move {
            let mut failing = false;
            loop {
                match tokens.refresh().await {
                    Ok(_) => {
                        if failing {
                            tracing::info!("API tokens re-read again");
                        }
                        failing = false;
                    }
                    Err(e) => {
                        // The tokens known stay valid meanwhile.
                        if !failing {
                            tracing::warn!(error = %e, "cannot re-read API tokens; keeping those known");
                        }
                        failing = true;
                    }
                }
                tokio::time::sleep(TOKEN_REFRESH).await;
            }
        }));
    }
    if let Some(keys) = keys {
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(berth_auth::keystore::REFRESH_EVERY).await;
                if let Err(e) = keys.refresh().await {
                    tracing::warn!(error = %e, "cannot re-read the token signing keys");
                }
            }
        }));
    }
    if let Some(replication) = &config.replication {
        let short = |s: &Option<String>| s.as_ref().is_some_and(|s| s.len() < 16);
        if short(&replication.secret) || replication.peers.iter().any(|p| short(&p.secret)) {
            tracing::warn!(
                "a replication secret is shorter than 16 characters: use long random secrets (openssl rand -base64 32)"
            );
        }
    }
    if settings.insecure_open && !enabled {
        tracing::warn!(
            listen = %config.listen,
            "OPEN REGISTRY: no authentication is configured and --insecure-open is set; anyone who reaches {} can push, overwrite and delete every image",
            config.listen
        );
    } else if !enabled {
        tracing::info!("no authentication configured: open registry on loopback only");
    }
    Ok(Started {
        security,
        tls,
        _watches: watches,
        tasks,
    })
}

/// The extra CA and client certificate for calls to peer regions.
pub fn peer_tls(config: &ServeConfig) -> Result<ClientTls, SecurityError> {
    let settings = &config.security;
    Ok(ClientTls {
        ca_pem: settings.peer_ca_file.as_deref().map(read).transpose()?,
        identity_pem: match &settings.peer_client_identity {
            Some((cert, key)) => {
                let mut pem = read(key)?;
                pem.push(b'\n');
                pem.extend(read(cert)?);
                Some(pem)
            }
            None => None,
        },
    })
}

/// The extra CA for calls to upstream registries.
pub fn upstream_tls(config: &ServeConfig) -> Result<ClientTls, SecurityError> {
    Ok(ClientTls {
        ca_pem: config
            .security
            .upstream_ca_file
            .as_deref()
            .map(read)
            .transpose()?,
        identity_pem: None,
    })
}
