//! Authentication and authorization over HTTPS: the harness (a registry
//! with TLS, htpasswd users, a policy and an audit file), and the tests by
//! concern: every route against every caller, the token protocol and API
//! tokens, sign-ins (throttling, reload, the open-registry default), a
//! region of nodes and regions of peers, and the edges (external token
//! servers, the pull-through cache, upstreams over TLS).
#![allow(unused_imports)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use berth_auth::header::basic_header;
use berth_auth::jwt::{Access, BerthClaims, Claims, PrincipalKind};
use berth_auth::{Action, Actions, SigningKey};
use reqwest::Method;
use serde_json::{Value, json};

use crate::pki::{self, Pki};
use crate::support::*;

mod audit;
mod cluster;
mod matrix;
mod signin;
mod tokens;
mod upstreams;

pub const ALICE: (&str, &str) = ("alice", "alice-password");
pub const BOB: (&str, &str) = ("bob", "bob-password");
pub const ROOT: (&str, &str) = ("root", "root-password");

/// alice may pull, push and delete in `team/*`; bob may pull there; root
/// administers everything; `public/**` is anyone's to pull.
pub const POLICY: &str = r#"
[[access]]
repositories = ["team/*"]
users = ["alice"]
actions = ["pull", "push", "delete"]

[[access]]
repositories = ["team/*"]
users = ["bob"]
actions = ["pull"]

[[access]]
repositories = ["**"]
users = ["root"]
actions = ["admin"]

[[access]]
repositories = ["public/**"]
users = ["anonymous"]
actions = ["pull"]
"#;

/// A registry with TLS, htpasswd users, the policy above, an audit file
/// and a token signing key the test holds too (so it can forge tokens).
pub struct Secured {
    pub reg: Registry,
    /// Holds the files below for the registry's lifetime.
    pub _dir: tempfile::TempDir,
    pub key: SigningKey,
    pub htpasswd: PathBuf,
    pub audit: PathBuf,
}

/// A client trusting the test CA, sending `authorization` on every request.
pub fn client_with(authorization: Option<&str>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::ACCEPT,
        reqwest::header::HeaderValue::from_static(MANIFEST_ACCEPT),
    );
    if let Some(a) = authorization {
        headers.insert(
            reqwest::header::AUTHORIZATION,
            reqwest::header::HeaderValue::from_str(a).unwrap(),
        );
    }
    client_builder_trusting(true)
        .default_headers(headers)
        .build()
        .unwrap()
}

pub fn basic((user, password): (&str, &str)) -> String {
    basic_header(user, password)
}

/// An ECDSA P-256 key in PKCS#8 PEM, made by openssl.
pub fn ec_key(path: &Path) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out {}",
            path.display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Secured {
    pub async fn start(extra: Options) -> Secured {
        let dir = tempfile::tempdir().unwrap();
        let htpasswd = dir.path().join("htpasswd");
        pki::htpasswd(&htpasswd, &[ALICE, BOB, ROOT]);
        let key_file = dir.path().join("token-key.pem");
        ec_key(&key_file);
        let key = SigningKey::from_pem(&std::fs::read(&key_file).unwrap())
            .unwrap()
            .remove(0);
        let config = dir.path().join("berth.toml");
        std::fs::write(&config, POLICY).unwrap();
        let audit = dir.path().join("audit.jsonl");
        let mut options = extra
            .tls()
            .flag("--htpasswd", htpasswd.display())
            .flag("--config", config.display())
            .flag("--token-key-file", key_file.display())
            .flag("--audit-log", audit.display());
        options.env.push(("BERTH_LOG".into(), "info".into()));
        let mut reg = Registry::start_with(options).await;
        reg.set_client(client_with(Some(&basic(ROOT))));
        Secured {
            reg,
            _dir: dir,
            key,
            htpasswd,
            audit,
        }
    }

    /// A token as the registry would sign it, for `sub` with `access`.
    pub fn token(&self, sub: &str, access: Vec<Access>, exp_in: i64) -> String {
        sign_token(&self.key, sub, access, exp_in)
    }

    pub fn audit_events(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The `berth` binary signed in as `who` against this registry.
    pub fn cli(&self, who: (&str, &str)) -> Command {
        cli_for(&self.reg, who)
    }
}

/// The `berth` binary signed in as `who` against `reg` (which serves TLS
/// with the shared test CA).
pub fn cli_for(reg: &Registry, who: (&str, &str)) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env("BERTH_REGISTRY", reg.url())
        .env("BERTH_CA_FILE", Pki::shared().ca())
        .env("BERTH_USERNAME", who.0)
        .env("BERTH_PASSWORD", who.1);
    cmd
}

pub fn sign_token(key: &SigningKey, sub: &str, access: Vec<Access>, exp_in: i64) -> String {
    let now = berth_auth::now_ms() as i64 / 1000;
    let claims = Claims {
        iss: "berth".into(),
        sub: sub.into(),
        aud: "berth".into(),
        exp: (now + exp_in) as u64,
        nbf: (now - 5) as u64,
        iat: (now - 5) as u64,
        jti: format!("{}", fresh_seed()),
        access,
        berth: Some(BerthClaims {
            kind: PrincipalKind::User,
            tid: None,
        }),
        grants: Vec::new(),
    };
    berth_auth::jwt::sign(key, &claims).unwrap()
}

pub(crate) fn repo_access(name: &str, actions: &[Action]) -> Access {
    Access::repository(name, Actions::of(actions))
}

/// Parses `Bearer realm="...",service="...",scope="...",error="..."`.
pub(crate) fn challenge_params(
    value: &str,
) -> (String, std::collections::BTreeMap<String, String>) {
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let mut params = std::collections::BTreeMap::new();
    let mut rest = rest;
    while let Some((key, after)) = rest.split_once("=\"") {
        let Some((val, tail)) = after.split_once('"') else {
            break;
        };
        params.insert(
            key.trim_start_matches(',').trim().to_string(),
            val.to_string(),
        );
        rest = tail;
    }
    (scheme.to_string(), params)
}

/// A small image in `team/app` (and one in `public/x`), pushed by root.
pub(crate) async fn seed(s: &Secured) -> Image {
    let image = Image::oci(fresh_seed(), 2, 2000);
    image.push(&s.reg, "team/app", Some("1")).await;
    Image::oci(fresh_seed(), 1, 500)
        .push(&s.reg, "public/x", Some("1"))
        .await;
    image
}
