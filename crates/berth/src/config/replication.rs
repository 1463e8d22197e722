//! Geo-replication settings: this region's name and its peers.

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// A peer region in the TOML file (`[[peer]]`).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePeer {
    pub name: String,
    pub url: String,
    /// The secret shared with this peer: presented to it, and accepted
    /// from it as its credential (default: replication_secret).
    pub secret: Option<String>,
    /// The subject (CN) of the client certificate this peer presents, when
    /// it proves itself with one (mTLS) instead of a secret.
    pub tls_identity: Option<String>,
    #[serde(default)]
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
}

/// A configured peer region.
#[derive(Clone)]
pub struct PeerSetting {
    pub name: String,
    pub url: String,
    pub secret: Option<String>,
    pub tls_identity: Option<String>,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
}

/// Geo-replication settings (present when a region is named).
#[derive(Clone)]
pub struct ReplicationSettings {
    pub region: String,
    /// Accepted from any peer (the region-wide shared secret).
    pub secret: Option<String>,
    pub peers: Vec<PeerSetting>,
    pub read_through_timeout: Duration,
}

// Never print a secret.
impl std::fmt::Debug for PeerSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSetting")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("secret", &self.secret.as_ref().map(|_| "<secret>"))
            .field("tls_identity", &self.tls_identity)
            .field("include", &self.include)
            .field("exclude", &self.exclude)
            .finish()
    }
}

impl std::fmt::Debug for ReplicationSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationSettings")
            .field("region", &self.region)
            .field("secret", &self.secret.as_ref().map(|_| "<secret>"))
            .field("peers", &self.peers)
            .field("read_through_timeout", &self.read_through_timeout)
            .finish()
    }
}

fn valid_region(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && berth_proxy::valid_namespace(name)
}

/// Replication settings from flags (`--peer NAME=URL`) and the file.
pub(super) fn replication(
    region: Option<String>,
    secret: Option<String>,
    flags: &[String],
    file: &[FilePeer],
    read_through_timeout_ms: u64,
) -> Result<Option<ReplicationSettings>, ConfigError> {
    let flags: Vec<&String> = flags.iter().filter(|f| !f.is_empty()).collect();
    let Some(region) = region else {
        if !flags.is_empty() || !file.is_empty() {
            return Err(ConfigError::Invalid(
                "peers need this region's name (--region)".into(),
            ));
        }
        return Ok(None);
    };
    if !valid_region(&region) {
        return Err(ConfigError::Invalid(format!(
            "region name {region:?}: use 1-32 lowercase letters, digits or '-'"
        )));
    }
    let secret = secret.filter(|s| !s.is_empty());
    let mut peers: Vec<PeerSetting> = file
        .iter()
        .map(|p| PeerSetting {
            name: p.name.clone(),
            url: p.url.clone(),
            secret: p
                .secret
                .clone()
                .filter(|s| !s.is_empty())
                .or_else(|| secret.clone()),
            tls_identity: p.tls_identity.clone(),
            include: p.include.clone(),
            exclude: p.exclude.clone(),
        })
        .collect();
    for flag in flags {
        let Some((name, url)) = flag.split_once('=') else {
            return Err(ConfigError::Invalid(format!(
                "--peer {flag:?}: expected NAME=URL, e.g. us=https://us.registry.example"
            )));
        };
        peers.retain(|p| p.name != name);
        peers.push(PeerSetting {
            name: name.to_string(),
            url: url.to_string(),
            secret: secret.clone(),
            tls_identity: None,
            include: Vec::new(),
            exclude: Vec::new(),
        });
    }
    for p in &peers {
        if !valid_region(&p.name) || p.name == region {
            return Err(ConfigError::Invalid(format!(
                "peer name {:?}: a region name other than this one's",
                p.name
            )));
        }
        if !(p.url.starts_with("http://") || p.url.starts_with("https://")) {
            return Err(ConfigError::Invalid(format!(
                "peer {} URL {:?} must start with http:// or https://",
                p.name, p.url
            )));
        }
        if p.secret.is_none() && p.tls_identity.is_none() {
            return Err(ConfigError::Invalid(format!(
                "peer {}: no credential; give it a secret (or --replication-secret) or a tls_identity",
                p.name
            )));
        }
    }
    if peers.is_empty() && secret.is_none() {
        return Err(ConfigError::Invalid(
            "a region needs --replication-secret (peers authenticate with it) or [[peer]] entries with credentials".into(),
        ));
    }
    if read_through_timeout_ms == 0 {
        return Err(ConfigError::Zero("read_through_timeout_ms"));
    }
    Ok(Some(ReplicationSettings {
        region,
        secret,
        peers,
        read_through_timeout: Duration::from_millis(read_through_timeout_ms),
    }))
}
