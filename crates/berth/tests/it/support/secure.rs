//! The secure pass (`BERTH_IT_SECURE=1`): TLS and authentication on every registry.

use super::*;

/// `BERTH_IT_SECURE=1` runs the suite again with TLS and authentication on
/// every registry: HTTPS with a test CA, an htpasswd user that the policy
/// makes administrator everywhere, and clients that sign in as it.
pub fn secure_pass() -> bool {
    std::env::var("BERTH_IT_SECURE").is_ok_and(|v| !v.is_empty() && v != "0")
}

pub const SECURE_USER: &str = "berth-it";
pub const SECURE_PASSWORD: &str = "berth-it-password";

pub fn scheme() -> &'static str {
    if secure_pass() { "https" } else { "http" }
}

pub(crate) const SECURE_POLICY: &str =
    "\n[[access]]\nrepositories = [\"**\"]\nusers = [\"berth-it\"]\nactions = [\"admin\"]\n";

/// The pass's flags added to a registry's own: TLS, the htpasswd file, the
/// CA for peers, and the policy (merged into the test's own configuration
/// file when it has one).
/// Whether a test configures security itself (the pass leaves it alone).
pub(crate) fn self_secured(args: &[String]) -> bool {
    args.iter()
        .any(|a| a == "--tls-cert" || a == "--htpasswd" || a == "--insecure-open")
}

pub(crate) fn secure_args(workdir: &Path, args: &[String]) -> Vec<String> {
    if self_secured(args) {
        return args.to_vec();
    }
    static HTPASSWD: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let pki = crate::pki::Pki::shared();
    let htpasswd = HTPASSWD.get_or_init(|| {
        let path = pki.dir().join("htpasswd");
        crate::pki::htpasswd(&path, &[(SECURE_USER, SECURE_PASSWORD)]);
        path
    });
    let server = crate::pki::shared_server();
    let mut out = Vec::new();
    let mut own_config = None;
    let mut iter = args.iter();
    while let Some(a) = iter.next() {
        if a == "--config" {
            own_config = iter.next().cloned();
        } else {
            out.push(a.clone());
        }
    }
    let mut config = match &own_config {
        Some(path) => fs::read_to_string(path).unwrap(),
        None => String::new(),
    };
    config.push_str(SECURE_POLICY);
    // Beside the PKI, not in the registry's directory (tests check what
    // appears there).
    let merged = pki
        .dir()
        .join(format!("config-{}.toml", unique_name(workdir)));
    fs::write(&merged, config).unwrap();
    for (flag, value) in [
        ("--config", merged.display().to_string()),
        ("--tls-cert", server.cert.display().to_string()),
        ("--tls-key", server.key.display().to_string()),
        ("--htpasswd", htpasswd.display().to_string()),
        ("--peer-ca-file", pki.ca().display().to_string()),
    ] {
        out.push(flag.into());
        out.push(value);
    }
    out
}

/// The `berth` binary for operator commands, pointed at the pass's CA and
/// credentials when it runs.
pub fn berth_cli() -> Command {
    let mut cmd = Command::new(BIN);
    if secure_pass() {
        cmd.env("BERTH_CA_FILE", crate::pki::Pki::shared().ca())
            .env("BERTH_USERNAME", SECURE_USER)
            .env("BERTH_PASSWORD", SECURE_PASSWORD);
    }
    cmd
}

/// Appends `key=value` to a URL that may already carry a query string.
pub fn with_query(url: &str, key: &str, value: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{key}={}", encode_query(value))
}

pub fn encode_query(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The path and query of an absolute or relative URL (for rebasing onto a new port).
pub fn path_and_query(url: &str) -> String {
    let u = reqwest::Url::parse(url)
        .or_else(|_| reqwest::Url::parse("http://x").unwrap().join(url))
        .unwrap_or_else(|e| panic!("bad url {url:?}: {e}"));
    match u.query() {
        Some(q) => format!("{}?{q}", u.path()),
        None => u.path().to_string(),
    }
}

/// Parses a query string into pairs (with percent-decoding).
pub fn query_pairs(url: &str) -> Vec<(String, String)> {
    let parsed = reqwest::Url::parse(url)
        .or_else(|_| reqwest::Url::parse("http://x").unwrap().join(url))
        .unwrap_or_else(|e| panic!("bad url {url:?}: {e}"));
    parsed
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}
