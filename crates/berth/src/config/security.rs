//! Security settings: TLS, the authentication sources, the access policy,
//! the audit log, and how this node verifies the servers it calls.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use berth_auth::{AccessRule, MetricsAccess, Policy};
use berth_server::Cidr;
use berth_server::tls::{ClientAuth, TlsFiles};
use clap::{Args, ValueEnum};
use serde::Deserialize;

use super::ConfigError;

/// `--metrics-access`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MetricsAccessArg {
    Public,
    SignedIn,
    Admin,
}

/// `--tls-client-auth`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuthArg {
    Optional,
    Required,
}

/// Security flags of `berth serve` (each also a key of the TOML file).
#[derive(Args, Debug, Default, Clone)]
pub struct SecurityArgs {
    /// Serve HTTPS with this certificate chain (PEM, leaf first); reloaded
    /// when the file changes.
    #[arg(long, env = "BERTH_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "BERTH_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Verify client certificates signed by this CA (PEM); their subject's
    /// common name becomes the caller's user name.
    #[arg(long, env = "BERTH_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// With --tls-client-ca: whether a client certificate is required
    /// [default: optional].
    #[arg(long, env = "BERTH_TLS_CLIENT_AUTH", value_enum)]
    pub tls_client_auth: Option<ClientAuthArg>,
    /// Users and bcrypt password hashes (`htpasswd -B`); reloaded when the
    /// file changes.
    #[arg(long, env = "BERTH_HTPASSWD")]
    pub htpasswd: Option<PathBuf>,
    /// Challenge clients to fetch tokens from the built-in token service
    /// (`/auth/token`); false challenges for Basic credentials [default:
    /// true].
    #[arg(long, env = "BERTH_TOKEN_SERVICE")]
    pub token_service: Option<bool>,
    /// Lifetime of issued tokens in seconds [default: 300].
    #[arg(long, env = "BERTH_TOKEN_TTL_SECS")]
    pub token_ttl_secs: Option<u64>,
    /// The token endpoint's URL in challenges [default: from the request's
    /// Host, e.g. https://HOST/auth/token].
    #[arg(long, env = "BERTH_TOKEN_REALM")]
    pub token_realm: Option<String>,
    /// The `service` of challenges and the audience of tokens [default:
    /// berth].
    #[arg(long, env = "BERTH_TOKEN_SERVICE_NAME")]
    pub token_service_name: Option<String>,
    /// The issuer (`iss`) of the tokens this registry signs [default:
    /// berth].
    #[arg(long, env = "BERTH_TOKEN_ISSUER")]
    pub token_issuer: Option<String>,
    /// Sign tokens with the ECDSA P-256 keys in this PEM file (the first
    /// signs, the rest verify) instead of keys kept in the metadata store.
    #[arg(long, env = "BERTH_TOKEN_KEY_FILE")]
    pub token_key_file: Option<PathBuf>,
    /// Seconds a verified password is remembered [default: 30].
    #[arg(long, env = "BERTH_CREDENTIAL_CACHE_SECS")]
    pub credential_cache_secs: Option<u64>,
    /// Allow an open registry (no authentication) on an address other than
    /// loopback: anyone who reaches it can push and delete.
    #[arg(long, env = "BERTH_INSECURE_OPEN")]
    pub insecure_open: bool,
    /// Also write audit events to this file, as JSON lines.
    #[arg(long, env = "BERTH_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    /// Who may read /metrics once authentication is configured [default:
    /// signed-in].
    #[arg(long, env = "BERTH_METRICS_ACCESS", value_enum)]
    pub metrics_access: Option<MetricsAccessArg>,
    /// A load balancer whose X-Forwarded-For and X-Forwarded-Proto are
    /// believed, as an address or CIDR (repeatable).
    #[arg(
        long = "trusted-proxy",
        env = "BERTH_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<String>,
    /// Extra CA certificates (PEM) trusted for peer regions' HTTPS.
    #[arg(long, env = "BERTH_PEER_CA_FILE")]
    pub peer_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) this region presents to peers (mTLS).
    #[arg(long, env = "BERTH_PEER_CLIENT_CERT")]
    pub peer_client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "BERTH_PEER_CLIENT_KEY")]
    pub peer_client_key: Option<PathBuf>,
    /// Extra CA certificates (PEM) trusted for upstream registries.
    #[arg(long, env = "BERTH_UPSTREAM_CA_FILE")]
    pub upstream_ca_file: Option<PathBuf>,
}

/// An external token issuer in the TOML file (`[external_token]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileExternalToken {
    pub realm: String,
    pub service: String,
    pub issuer: String,
    /// PEM public keys or certificates of the issuer.
    pub public_key_file: Option<PathBuf>,
    /// A JWKS document with the issuer's keys.
    pub jwks_file: Option<PathBuf>,
}

/// The security keys of the TOML file.
#[derive(Debug, Default, Deserialize)]
pub struct FileSecurity {
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub tls_client_auth: Option<ClientAuthArg>,
    pub htpasswd: Option<PathBuf>,
    pub token_service: Option<bool>,
    pub token_ttl_secs: Option<u64>,
    pub token_realm: Option<String>,
    pub token_service_name: Option<String>,
    pub token_issuer: Option<String>,
    pub token_key_file: Option<PathBuf>,
    pub credential_cache_secs: Option<u64>,
    pub insecure_open: Option<bool>,
    pub audit_log: Option<PathBuf>,
    pub metrics_access: Option<MetricsAccessArg>,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    pub peer_ca_file: Option<PathBuf>,
    pub peer_client_cert: Option<PathBuf>,
    pub peer_client_key: Option<PathBuf>,
    pub upstream_ca_file: Option<PathBuf>,
    pub external_token: Option<FileExternalToken>,
    #[serde(default)]
    pub access: Vec<AccessRule>,
    #[serde(default)]
    pub groups: HashMap<String, Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct ExternalTokenSettings {
    pub realm: String,
    pub service: String,
    pub issuer: String,
    pub public_key_file: Option<PathBuf>,
    pub jwks_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default)]
pub struct SecuritySettings {
    pub tls: Option<TlsFiles>,
    pub htpasswd: Option<PathBuf>,
    pub token_service: bool,
    pub token_ttl: Duration,
    pub token_realm: Option<String>,
    pub token_service_name: String,
    pub token_issuer: String,
    pub token_key_file: Option<PathBuf>,
    pub credential_ttl: Duration,
    pub insecure_open: bool,
    pub audit_log: Option<PathBuf>,
    pub metrics_access: MetricsAccess,
    pub trusted_proxies: Vec<Cidr>,
    pub peer_ca_file: Option<PathBuf>,
    pub peer_client_identity: Option<(PathBuf, PathBuf)>,
    pub upstream_ca_file: Option<PathBuf>,
    pub external: Option<ExternalTokenSettings>,
    pub access: Vec<AccessRule>,
    pub groups: HashMap<String, Vec<String>>,
}

impl SecuritySettings {
    /// Whether anything authenticates callers: then everything the policy
    /// does not grant is denied.
    pub fn auth_enabled(&self) -> bool {
        self.htpasswd.is_some()
            || self.external.is_some()
            || self.tls.as_ref().is_some_and(|t| t.client_ca.is_some())
            || !self.access.is_empty()
    }

    pub fn policy(&self) -> Result<Policy, ConfigError> {
        Policy::new(&self.access, &self.groups).map_err(|e| ConfigError::Invalid(e.to_string()))
    }
}

fn pair<T>(a: Option<T>, b: Option<T>, names: &str) -> Result<Option<(T, T)>, ConfigError> {
    match (a, b) {
        (Some(a), Some(b)) => Ok(Some((a, b))),
        (None, None) => Ok(None),
        _ => Err(ConfigError::Invalid(format!("{names} go together"))),
    }
}

fn token_name(value: String, what: &str) -> Result<String, ConfigError> {
    let ok = !value.is_empty()
        && value.len() <= 255
        && value
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\\' | b','));
    if ok {
        Ok(value)
    } else {
        Err(ConfigError::Invalid(format!(
            "{what} {value:?}: use printable characters without quotes, commas or backslashes"
        )))
    }
}

pub(super) fn resolve(
    args: SecurityArgs,
    file: FileSecurity,
    listen: SocketAddr,
) -> Result<SecuritySettings, ConfigError> {
    let tls = match pair(
        args.tls_cert.or(file.tls_cert),
        args.tls_key.or(file.tls_key),
        "tls_cert and tls_key",
    )? {
        Some((cert, key)) => Some(TlsFiles {
            cert,
            key,
            client_ca: args.tls_client_ca.clone().or(file.tls_client_ca.clone()),
            client_auth: match args.tls_client_auth.or(file.tls_client_auth) {
                Some(ClientAuthArg::Required) => ClientAuth::Required,
                Some(ClientAuthArg::Optional) | None => ClientAuth::Optional,
            },
        }),
        None => {
            if args.tls_client_ca.is_some() || file.tls_client_ca.is_some() {
                return Err(ConfigError::Invalid(
                    "tls_client_ca needs tls_cert and tls_key (client certificates come with TLS)"
                        .into(),
                ));
            }
            None
        }
    };
    let external = match file.external_token {
        None => None,
        Some(e) => {
            if e.public_key_file.is_none() == e.jwks_file.is_none() {
                return Err(ConfigError::Invalid(
                    "[external_token] needs exactly one of public_key_file and jwks_file".into(),
                ));
            }
            if !(e.realm.starts_with("https://") || e.realm.starts_with("http://")) {
                return Err(ConfigError::Invalid(format!(
                    "[external_token] realm {:?} must be an http(s) URL",
                    e.realm
                )));
            }
            Some(ExternalTokenSettings {
                realm: e.realm,
                service: token_name(e.service, "[external_token] service")?,
                issuer: e.issuer,
                public_key_file: e.public_key_file,
                jwks_file: e.jwks_file,
            })
        }
    };
    let mut trusted_proxies = Vec::new();
    for p in args
        .trusted_proxies
        .iter()
        .chain(&file.trusted_proxies)
        .filter(|p| !p.is_empty())
    {
        trusted_proxies.push(Cidr::parse(p).ok_or_else(|| {
            ConfigError::Invalid(format!("trusted proxy {p:?}: expected an address or CIDR"))
        })?);
    }
    let token_ttl_secs = args.token_ttl_secs.or(file.token_ttl_secs).unwrap_or(300);
    if !(10..=86_400).contains(&token_ttl_secs) {
        return Err(ConfigError::Invalid(
            "token_ttl_secs must be between 10 and 86400".into(),
        ));
    }
    let settings = SecuritySettings {
        tls,
        htpasswd: args.htpasswd.or(file.htpasswd),
        token_service: args.token_service.or(file.token_service).unwrap_or(true),
        token_ttl: Duration::from_secs(token_ttl_secs),
        token_realm: args.token_realm.or(file.token_realm),
        token_service_name: token_name(
            args.token_service_name
                .or(file.token_service_name)
                .unwrap_or_else(|| "berth".into()),
            "token_service_name",
        )?,
        token_issuer: token_name(
            args.token_issuer
                .or(file.token_issuer)
                .unwrap_or_else(|| "berth".into()),
            "token_issuer",
        )?,
        token_key_file: args.token_key_file.or(file.token_key_file),
        credential_ttl: Duration::from_secs(
            args.credential_cache_secs
                .or(file.credential_cache_secs)
                .unwrap_or(30)
                .min(3600),
        ),
        insecure_open: args.insecure_open || file.insecure_open.unwrap_or(false),
        audit_log: args.audit_log.or(file.audit_log),
        metrics_access: match args.metrics_access.or(file.metrics_access) {
            Some(MetricsAccessArg::Public) => MetricsAccess::Public,
            Some(MetricsAccessArg::Admin) => MetricsAccess::Admin,
            Some(MetricsAccessArg::SignedIn) | None => MetricsAccess::SignedIn,
        },
        trusted_proxies,
        peer_ca_file: args.peer_ca_file.or(file.peer_ca_file),
        peer_client_identity: pair(
            args.peer_client_cert.or(file.peer_client_cert),
            args.peer_client_key.or(file.peer_client_key),
            "peer_client_cert and peer_client_key",
        )?,
        upstream_ca_file: args.upstream_ca_file.or(file.upstream_ca_file),
        external,
        access: file.access,
        groups: file.groups,
    };
    // Validated now, so that a bad rule stops the start with its number.
    settings.policy()?;
    if let Some(path) = &settings.htpasswd {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        berth_auth::Htpasswd::parse(&text)
            .map_err(|e| ConfigError::Invalid(format!("htpasswd file {}: {e}", path.display())))?;
    }
    if !settings.auth_enabled() && !listen.ip().is_loopback() && !settings.insecure_open {
        return Err(ConfigError::Invalid(format!(
            "refusing to listen on {listen} without authentication: anyone who reaches it could push and delete. \
             Configure --htpasswd (or [[access]] rules, an external token issuer, or client certificates), \
             or pass --insecure-open to run an open registry anyway"
        )));
    }
    Ok(settings)
}
