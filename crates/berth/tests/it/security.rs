//! Authentication and authorization over HTTPS: every route against every
//! kind of caller (exact status, error code and challenge), the token
//! protocol as docker and containerd speak it, API tokens through
//! `berth token`, throttling, the catalog and mounts under a policy, and
//! the audit trail.

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
        let mut cmd = Command::new(BIN);
        cmd.env("BERTH_REGISTRY", self.reg.url())
            .env("BERTH_CA_FILE", Pki::shared().ca())
            .env("BERTH_USERNAME", who.0)
            .env("BERTH_PASSWORD", who.1);
        cmd
    }
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
    };
    berth_auth::jwt::sign(key, &claims).unwrap()
}

fn repo_access(name: &str, actions: &[Action]) -> Access {
    Access::repository(name, Actions::of(actions))
}

/// Who calls, in the matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    Anonymous,
    WrongPassword,
    ExpiredToken,
    OtherRepoToken,
    UnknownKeyToken,
    Allowed,
    Denied,
    Admin,
}

const EVERYONE: [Who; 8] = [
    Who::Anonymous,
    Who::WrongPassword,
    Who::ExpiredToken,
    Who::OtherRepoToken,
    Who::UnknownKeyToken,
    Who::Allowed,
    Who::Denied,
    Who::Admin,
];

/// What a route needs of its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Needs {
    Nothing,
    SignedIn,
    Catalog,
    Pull(&'static str),
    Push,
    Delete,
    Admin,
}

/// The answer a caller must get.
#[derive(Debug, PartialEq, Eq)]
enum Expect {
    Ok(u16),
    /// 401 with a challenge; the scope it must name; the error it must name.
    Challenge(Option<String>, Option<&'static str>),
    Denied,
}

fn expected(who: Who, needs: Needs, ok: u16) -> Expect {
    let scope = |actions: &str| Some(format!("repository:team/app:{actions}"));
    let content = |allowed: bool, actions: &str| match who {
        Who::Anonymous => Expect::Challenge(scope(actions), None),
        Who::WrongPassword => Expect::Challenge(None, None),
        Who::ExpiredToken | Who::UnknownKeyToken => Expect::Challenge(None, Some("invalid_token")),
        // alice's token for another repository: alice may, so another token.
        Who::OtherRepoToken => Expect::Challenge(scope(actions), Some("insufficient_scope")),
        Who::Allowed | Who::Admin => Expect::Ok(ok),
        Who::Denied if allowed => Expect::Ok(ok),
        Who::Denied => Expect::Denied,
    };
    match needs {
        Needs::Nothing => Expect::Ok(ok),
        Needs::SignedIn => match who {
            Who::Anonymous | Who::WrongPassword => Expect::Challenge(None, None),
            Who::ExpiredToken | Who::UnknownKeyToken => {
                Expect::Challenge(None, Some("invalid_token"))
            }
            _ => Expect::Ok(ok),
        },
        Needs::Catalog => match who {
            // Anonymous callers see the public repositories.
            Who::Anonymous => Expect::Ok(ok),
            Who::WrongPassword => Expect::Challenge(None, None),
            Who::ExpiredToken | Who::UnknownKeyToken => {
                Expect::Challenge(None, Some("invalid_token"))
            }
            _ => Expect::Ok(ok),
        },
        Needs::Pull(scope_actions) => content(true, scope_actions),
        Needs::Push => content(false, "pull,push"),
        Needs::Delete => content(false, "delete"),
        Needs::Admin => match who {
            Who::Anonymous | Who::WrongPassword => Expect::Challenge(None, None),
            Who::ExpiredToken | Who::UnknownKeyToken => {
                Expect::Challenge(None, Some("invalid_token"))
            }
            Who::Admin => Expect::Ok(ok),
            _ => Expect::Denied,
        },
    }
}

/// Parses `Bearer realm="...",service="...",scope="...",error="..."`.
fn challenge_params(value: &str) -> (String, std::collections::BTreeMap<String, String>) {
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

fn check(who: Who, route: &str, r: &Resp, expect: &Expect, realm: &str) {
    let what = format!("{who:?} {route}");
    match expect {
        Expect::Ok(status) => {
            assert_eq!(r.status, *status, "{what}: {}", r.describe());
        }
        Expect::Denied => {
            assert_eq!(r.status, 403, "{what}: {}", r.describe());
            expect_error(r, 403, &["DENIED"]);
            assert!(
                r.header("www-authenticate").is_none(),
                "{what}: no challenge on 403"
            );
        }
        Expect::Challenge(scope, error) => {
            assert_eq!(r.status, 401, "{what}: {}", r.describe());
            if !route.starts_with("HEAD") {
                expect_error(r, 401, &["UNAUTHORIZED"]);
            }
            let header = r
                .header("www-authenticate")
                .unwrap_or_else(|| panic!("{what}: 401 without a challenge"));
            let (scheme, params) = challenge_params(&header);
            assert_eq!(scheme, "Bearer", "{what}: {header}");
            assert_eq!(
                params.get("realm").map(String::as_str),
                Some(realm),
                "{what}: {header}"
            );
            assert_eq!(
                params.get("service").map(String::as_str),
                Some("berth"),
                "{what}: {header}"
            );
            assert_eq!(params.get("scope"), scope.as_ref(), "{what}: {header}");
            assert_eq!(
                params.get("error").map(String::as_str),
                *error,
                "{what}: {header}"
            );
        }
    }
}

/// A small image in `team/app` (and one in `public/x`), pushed by root.
async fn seed(s: &Secured) -> Image {
    let image = Image::oci(fresh_seed(), 2, 2000);
    image.push(&s.reg, "team/app", Some("1")).await;
    Image::oci(fresh_seed(), 1, 500)
        .push(&s.reg, "public/x", Some("1"))
        .await;
    image
}

#[tokio::test]
async fn every_route_answers_every_kind_of_caller_exactly() {
    if !pki::tools_available() {
        return;
    }
    let s = Secured::start(Options::new()).await;
    let image = seed(&s).await;
    let realm = format!("{}/auth/token", s.reg.url());
    let stranger = SigningKey::generate().unwrap();
    let full = vec![repo_access(
        "team/app",
        &[Action::Pull, Action::Push, Action::Delete],
    )];
    let header = |who: Who| -> Option<String> {
        match who {
            Who::Anonymous => None,
            Who::WrongPassword => Some(basic((ALICE.0, "not-her-password"))),
            Who::ExpiredToken => Some(format!("Bearer {}", s.token("alice", full.clone(), -120))),
            Who::OtherRepoToken => Some(format!(
                "Bearer {}",
                s.token(
                    "alice",
                    vec![repo_access("team/other", &[Action::Pull, Action::Push])],
                    300
                )
            )),
            Who::UnknownKeyToken => Some(format!(
                "Bearer {}",
                sign_token(&stranger, "alice", full.clone(), 300)
            )),
            Who::Allowed => Some(basic(ALICE)),
            Who::Denied => Some(basic(BOB)),
            Who::Admin => Some(basic(ROOT)),
        }
    };
    let layer = sha256_digest(&image.layers[0]);
    let rows_sent = std::cell::Cell::new(0u8);
    for (i, who) in EVERYONE.into_iter().enumerate() {
        // Each caller from its own loopback address, and each wrong password
        // from yet another: the matrix is about answers, not about the
        // failed-login throttle (tested below).
        let from = |n: u8| {
            let mut headers = reqwest::header::HeaderMap::new();
            headers.insert(
                reqwest::header::ACCEPT,
                reqwest::header::HeaderValue::from_static(MANIFEST_ACCEPT),
            );
            if let Some(a) = header(who) {
                headers.insert(
                    reqwest::header::AUTHORIZATION,
                    reqwest::header::HeaderValue::from_str(&a).unwrap(),
                );
            }
            client_builder_trusting(true)
                .default_headers(headers)
                .local_address(std::net::IpAddr::from([127, 0, 1 + i as u8, n]))
                .build()
                .unwrap()
        };
        let client = from(1);
        let fresh_client = || {
            if who == Who::WrongPassword {
                rows_sent.set(rows_sent.get() + 1);
                from(10 + rows_sent.get())
            } else {
                client.clone()
            }
        };
        let url = |p: &str| format!("{}{p}", s.reg.url());
        let go = |method: Method, path: String| {
            let client = fresh_client();
            async move { send(client.request(method, url(&path))).await }
        };
        // State each write needs, made by root just before.
        let reg = &s.reg;
        let upload = || async move { path_and_query(&reg.start_upload("team/app").await) };
        let throwaway = Image::oci(fresh_seed(), 1, 300);
        throwaway.push(&s.reg, "team/app", None).await;
        let loose_blob = s
            .reg
            .push_blob("team/app", &random_bytes(fresh_seed(), 400))
            .await;

        let mut rows: Vec<(String, Needs, u16, Resp)> = Vec::new();
        macro_rules! row {
            ($label:expr, $needs:expr, $ok:expr, $resp:expr) => {
                rows.push(($label.to_string(), $needs, $ok, $resp));
            };
        }
        row!(
            "GET /v2/",
            Needs::SignedIn,
            200,
            go(Method::GET, "/v2/".into()).await
        );
        row!(
            "GET /v2/_catalog",
            Needs::Catalog,
            200,
            go(Method::GET, "/v2/_catalog".into()).await
        );
        row!(
            "GET tags",
            Needs::Pull("pull"),
            200,
            go(Method::GET, "/v2/team/app/tags/list".into()).await
        );
        row!(
            "GET manifest",
            Needs::Pull("pull"),
            200,
            go(Method::GET, "/v2/team/app/manifests/1".into()).await
        );
        row!(
            "HEAD manifest",
            Needs::Pull("pull"),
            200,
            go(Method::HEAD, "/v2/team/app/manifests/1".into()).await
        );
        row!(
            "PUT manifest",
            Needs::Push,
            201,
            send(
                fresh_client()
                    .put(url("/v2/team/app/manifests/pushed"))
                    .header("content-type", &image.media_type)
                    .body(image.manifest.clone())
            )
            .await
        );
        row!(
            "DELETE manifest",
            Needs::Delete,
            202,
            go(
                Method::DELETE,
                format!("/v2/team/app/manifests/{}", throwaway.digest)
            )
            .await
        );
        row!(
            "GET blob",
            Needs::Pull("pull"),
            200,
            go(Method::GET, format!("/v2/team/app/blobs/{layer}")).await
        );
        row!(
            "HEAD blob",
            Needs::Pull("pull"),
            200,
            go(Method::HEAD, format!("/v2/team/app/blobs/{layer}")).await
        );
        row!(
            "DELETE blob",
            Needs::Delete,
            202,
            go(Method::DELETE, format!("/v2/team/app/blobs/{loose_blob}")).await
        );
        row!(
            "POST upload",
            Needs::Push,
            202,
            send(
                fresh_client()
                    .post(url("/v2/team/app/blobs/uploads/"))
                    .header("content-length", "0")
            )
            .await
        );
        let data = random_bytes(fresh_seed(), 100);
        let session = upload().await;
        row!(
            "PATCH upload",
            Needs::Push,
            202,
            send(
                fresh_client()
                    .patch(url(&session))
                    .header("content-type", "application/octet-stream")
                    .body(data.clone())
            )
            .await
        );
        let session = upload().await;
        row!(
            "PUT upload",
            Needs::Push,
            201,
            send(
                fresh_client()
                    .put(with_query(&url(&session), "digest", &sha256_digest(&data)))
                    .header("content-type", "application/octet-stream")
                    .body(data.clone())
            )
            .await
        );
        let session = upload().await;
        row!(
            "GET upload",
            Needs::Push,
            204,
            go(Method::GET, session).await
        );
        let session = upload().await;
        row!(
            "DELETE upload",
            Needs::Push,
            204,
            go(Method::DELETE, session).await
        );
        row!(
            "GET referrers",
            Needs::Pull("pull"),
            200,
            go(
                Method::GET,
                format!("/v2/team/app/referrers/{}", image.digest)
            )
            .await
        );
        row!(
            "GET tokens",
            Needs::Admin,
            200,
            go(Method::GET, "/berth/v1/tokens".into()).await
        );
        row!(
            "GET keys",
            Needs::Admin,
            200,
            go(Method::GET, "/berth/v1/auth/keys".into()).await
        );
        row!(
            "GET replication status",
            Needs::Admin,
            404,
            go(Method::GET, "/berth/v1/replication/status".into()).await
        );
        row!(
            "GET cache",
            Needs::Admin,
            404,
            go(Method::GET, "/berth/v1/cache".into()).await
        );
        row!(
            "GET /metrics",
            Needs::SignedIn,
            200,
            go(Method::GET, "/metrics".into()).await
        );
        row!(
            "GET /healthz",
            Needs::Nothing,
            200,
            go(Method::GET, "/healthz".into()).await
        );
        row!(
            "GET /readyz",
            Needs::Nothing,
            200,
            go(Method::GET, "/readyz".into()).await
        );
        row!(
            "GET public tags",
            Needs::Nothing,
            200,
            go(Method::GET, "/v2/public/x/tags/list".into()).await
        );
        for (label, needs, ok, resp) in &rows {
            let mut expect = expected(who, *needs, *ok);
            // Public content: every valid credential and no credential pull it;
            // bad credentials are still refused.
            if label == "GET public tags" {
                expect = match who {
                    Who::WrongPassword => Expect::Challenge(None, None),
                    Who::ExpiredToken | Who::UnknownKeyToken => {
                        Expect::Challenge(None, Some("invalid_token"))
                    }
                    _ => Expect::Ok(200),
                };
            }
            check(who, label, resp, &expect, &realm);
        }
        // The catalog lists only what the caller may pull.
        let catalog = go(Method::GET, "/v2/_catalog".into()).await;
        if catalog.status == 200 {
            let repos: Vec<String> = catalog.json()["repositories"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect();
            let expected_repos: Vec<&str> = match who {
                Who::Allowed | Who::Denied | Who::Admin => vec!["public/x", "team/app"],
                // A token lists what it carries (team/other has nothing).
                _ => vec!["public/x"],
            };
            assert_eq!(repos, expected_repos, "{who:?} catalog");
        }
    }
    // Bad input still gets the spec's errors, not a 401 or a crash.
    let anonymous = client_with(None);
    let r = send(anonymous.get(format!("{}/v2/Team/App/tags/list", s.reg.url()))).await;
    expect_error(&r, 400, &["NAME_INVALID"]);
    let r = send(anonymous.get(format!(
        "{}/v2/team/app/manifests/.INVALID_MANIFEST_NAME",
        s.reg.url()
    )))
    .await;
    // Needs pull first: an anonymous caller is asked to sign in.
    assert_eq!(r.status, 401);
    let r = send(client_with(Some(&basic(ALICE))).get(format!(
        "{}/v2/team/app/manifests/.INVALID_MANIFEST_NAME",
        s.reg.url()
    )))
    .await;
    expect_error(&r, 404, &["MANIFEST_UNKNOWN"]);
    let r = send(
        client_with(Some(&basic(ALICE)))
            .put(format!("{}/v2/team/app/manifests/.INVALID", s.reg.url()))
            .header("content-type", &image.media_type)
            .body(image.manifest.clone()),
    )
    .await;
    expect_error(&r, 400, &["MANIFEST_INVALID"]);
    for junk in ["Basic !!!", "Negotiate abc", "Bearer", "Bearer a b c"] {
        let r = send(
            reqwest::Client::builder()
                .tls_certs_merge(
                    reqwest::Certificate::from_pem_bundle(
                        &std::fs::read(Pki::shared().ca()).unwrap(),
                    )
                    .unwrap(),
                )
                .build()
                .unwrap()
                .get(format!("{}/v2/", s.reg.url()))
                .header("authorization", junk),
        )
        .await;
        expect_error(&r, 401, &["UNAUTHORIZED"]);
    }
}

#[tokio::test]
async fn glob_edges_hold_after_name_validation() {
    if !pki::tools_available() {
        return;
    }
    let s = Secured::start(Options::new()).await;
    let alice = client_with(Some(&basic(ALICE)));
    let image = Image::oci(fresh_seed(), 1, 300);
    // team/* is alice's; team-evil/x, team/a/b and team itself are not.
    for (repo, allowed) in [
        ("team/app", true),
        ("team-evil/x", false),
        ("team/a/b", false),
        ("team", false),
        ("teamx/app", false),
    ] {
        let r = send(
            alice
                .post(format!("{}/v2/{repo}/blobs/uploads/", s.reg.url()))
                .header("content-length", "0"),
        )
        .await;
        if allowed {
            assert_eq!(r.status, 202, "{repo}: {}", r.describe());
        } else {
            expect_error(&r, 403, &["DENIED"]);
        }
    }
    // A name with a traversal is no name at all: refused before any policy.
    for path in [
        "/v2/team/../x/manifests/1",
        "/v2/team/%2e%2e/x/manifests/1",
        "/v2/team/./app/manifests/1",
    ] {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: {}\r\nConnection: close\r\n\r\n",
            s.reg.host_port(),
            basic(ALICE)
        );
        let r = s.reg.raw(request.as_bytes(), Duration::from_secs(10)).await;
        assert!(
            r.status == 400 || r.status == 404,
            "{path}: {} {}",
            r.status,
            r.head
        );
        assert_ne!(r.status, 200);
    }
    image.push(&s.reg, "team/app", Some("1")).await;
}

/// The registry token protocol as clients speak it.
#[tokio::test]
async fn tokens_by_get_and_by_oauth_post_and_their_limits() {
    if !pki::tools_available() {
        return;
    }
    let mut s = Secured::start(Options::new()).await;
    let image = seed(&s).await;
    let anonymous = client_with(None);
    // The challenge leads to the token endpoint.
    let r = send(anonymous.get(format!("{}/v2/", s.reg.url()))).await;
    let (_, params) = challenge_params(&r.header("www-authenticate").unwrap());
    let realm = params["realm"].clone();
    assert_eq!(realm, format!("{}/auth/token", s.reg.url()));
    // GET with Basic credentials, as docker, podman and skopeo do.
    let alice = client_with(Some(&basic(ALICE)));
    let scope = "repository:team/app:pull,push";
    let r = send(alice.get(format!(
        "{realm}?service=berth&scope={}&scope={}",
        encode_query(scope),
        encode_query("repository:team/secret:pull")
    )))
    .await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(r.header("cache-control").as_deref(), Some("no-store"));
    let body = r.json();
    assert_eq!(body["token"], body["access_token"]);
    assert_eq!(body["expires_in"], 300);
    let token = body["token"].as_str().unwrap().to_string();
    // It carries what alice may, nothing else.
    let payload = token.split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["aud"], "berth");
    assert_eq!(
        claims["access"],
        json!([
            {"type": "repository", "name": "team/app", "actions": ["pull", "push"]},
            {"type": "repository", "name": "team/secret", "actions": ["pull"]},
        ])
    );
    // team/secret matches team/*: alice may pull it. Now with the token:
    let bearer = client_with(Some(&format!("Bearer {token}")));
    let r = send(bearer.get(format!("{}/v2/team/app/manifests/1", s.reg.url()))).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(r.body == image.manifest);
    // Pushing with it works.
    let other = Image::oci(fresh_seed(), 1, 800);
    s.reg.set_client(bearer.clone());
    other.push(&s.reg, "team/app", Some("2")).await;
    s.reg.set_client(client_with(Some(&basic(ROOT))));

    // The OAuth2 form containerd posts.
    let form = format!(
        "grant_type=password&username=alice&password={}&service=berth&client_id=containerd-client&scope={}",
        encode_query(ALICE.1),
        encode_query("repository:team/app:pull repository:team/app:pull,push")
    );
    let r = send(
        anonymous
            .post(&realm)
            .header(
                "content-type",
                "application/x-www-form-urlencoded; charset=utf-8",
            )
            .body(form),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.describe());
    let body = r.json();
    assert!(body["access_token"].is_string());
    assert_eq!(body["scope"], "repository:team/app:pull,push");
    // Unsupported grants answer 400, on which containerd falls back to GET.
    let r = send(
        anonymous
            .post(&realm)
            .header("content-type", "application/x-www-form-urlencoded")
            .body("grant_type=refresh_token&refresh_token=x&service=berth&client_id=c"),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "unsupported_grant_type");
    // Wrong password: 401 with a Basic challenge for the token endpoint.
    let r =
        send(client_with(Some(&basic((ALICE.0, "nope")))).get(format!("{realm}?service=berth")))
            .await;
    expect_error(&r, 401, &["UNAUTHORIZED"]);
    assert!(r.header("www-authenticate").unwrap().starts_with("Basic "));
    // Another service's tokens are not made here; bad scopes are refused.
    let r = send(alice.get(format!("{realm}?service=elsewhere"))).await;
    assert_eq!(r.status, 400);
    let r = send(alice.get(format!(
        "{realm}?service=berth&scope=repository:Bad/Name:pull"
    )))
    .await;
    assert_eq!(r.status, 400);
    let many: Vec<String> = (0..65)
        .map(|i| format!("scope=repository:team/r{i}:pull"))
        .collect();
    let r = send(alice.get(format!("{realm}?{}", many.join("&")))).await;
    assert_eq!(r.status, 400);
    // Anonymous tokens carry only public grants.
    let r = send(anonymous.get(format!(
        "{realm}?service=berth&scope={}&scope={}",
        encode_query("repository:public/x:pull"),
        encode_query("repository:team/app:pull")
    )))
    .await;
    assert_eq!(r.status, 200);
    let anon_token = r.json()["token"].as_str().unwrap().to_string();
    let anon = client_with(Some(&format!("Bearer {anon_token}")));
    let r = send(anon.get(format!("{}/v2/public/x/tags/list", s.reg.url()))).await;
    assert_eq!(r.status, 200);
    let r = send(anon.get(format!("{}/v2/team/app/tags/list", s.reg.url()))).await;
    assert_eq!(r.status, 401);
    // docker login: a token without scope, then /v2/ answers 200.
    let r = send(alice.get(format!(
        "{realm}?service=berth&account=alice&offline_token=true&client_id=docker"
    )))
    .await;
    let login = r.json()["token"].as_str().unwrap().to_string();
    let r = send(client_with(Some(&format!("Bearer {login}"))).get(format!("{}/v2/", s.reg.url())))
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn basic_challenges_when_the_token_service_is_off() {
    if !pki::tools_available() {
        return;
    }
    let s = Secured::start(Options::new().flag("--token-service", "false")).await;
    seed(&s).await;
    let r = send(client_with(None).get(format!("{}/v2/", s.reg.url()))).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate").as_deref(),
        Some("Basic realm=\"berth\", charset=\"UTF-8\"")
    );
    let r = send(client_with(None).get(format!("{}/v2/team/app/tags/list", s.reg.url()))).await;
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").unwrap().starts_with("Basic "));
    // No token endpoint then.
    let r = send(client_with(Some(&basic(ALICE))).get(format!("{}/auth/token", s.reg.url()))).await;
    assert_eq!(r.status, 404);
    let r = send(
        client_with(Some(&basic(ALICE))).get(format!("{}/v2/team/app/tags/list", s.reg.url())),
    )
    .await;
    assert_eq!(r.status, 200);
    // Public content without credentials.
    let r = send(client_with(None).get(format!("{}/v2/public/x/tags/list", s.reg.url()))).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn guessing_passwords_is_throttled_per_address_and_user() {
    if !pki::tools_available() {
        return;
    }
    let s = Secured::start(Options::new()).await;
    let url = format!("{}/v2/", s.reg.url());
    let wrong = client_with(Some(&basic((ALICE.0, "guess"))));
    let mut statuses = Vec::new();
    for _ in 0..12 {
        statuses.push(send(wrong.get(&url)).await.status);
    }
    assert_eq!(&statuses[..10], &[401; 10], "{statuses:?}");
    assert_eq!(&statuses[10..], &[429, 429], "{statuses:?}");
    let r = send(wrong.get(&url)).await;
    expect_error(&r, 429, &["TOOMANYREQUESTS"]);
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=7).contains(&retry), "{retry}");
    // The right password waits too, from this address: guessing must not
    // find it meanwhile.
    let r = send(client_with(Some(&basic(ALICE))).get(&url)).await;
    assert_eq!(r.status, 429);
    // alice from another address, and bob from this one, are not held up
    // (a guesser does not lock a user out, nor a whole NAT).
    let other_address = client_builder_trusting(true)
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let r = send(
        other_address
            .get(&url)
            .header("authorization", basic(ALICE)),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.describe());
    let r = send(client_with(Some(&basic(BOB))).get(&url)).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    // And once verified, alice's credential passes from the throttled
    // address too (her running clients keep working).
    let r = send(client_with(Some(&basic(ALICE))).get(&url)).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    // Nothing secret in the log.
    assert!(!s.reg.log().contains("guess"));
    assert!(!s.reg.log().contains(ALICE.1));
}

#[tokio::test]
async fn api_tokens_from_create_to_revoke_with_an_audit_trail() {
    if !pki::tools_available() {
        return;
    }
    let mut s = Secured::start(Options::new()).await;
    seed(&s).await;
    // Only an administrator makes tokens.
    let out = s
        .cli(ALICE)
        .args([
            "token",
            "create",
            "ci",
            "--repositories",
            "team/**",
            "--actions",
            "pull,push",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("403"),
        "{out:?}"
    );
    let out = s
        .cli(ROOT)
        .args([
            "token",
            "create",
            "ci",
            "--repositories",
            "team/**",
            "--actions",
            "pull,push",
            "--expires",
            "7d",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secret = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(secret.starts_with("berth_"), "{secret}");
    // Any user name with the secret as password.
    let ci = client_with(Some(&basic(("gitlab-ci-token", &secret))));
    let image = Image::oci(fresh_seed(), 1, 1000);
    s.reg.set_client(ci.clone());
    image.push(&s.reg, "team/deep/app", Some("1")).await;
    s.reg.set_client(client_with(Some(&basic(ROOT))));
    let r = send(ci.delete(format!("{}/v2/team/deep/app/manifests/1", s.reg.url()))).await;
    expect_error(&r, 403, &["DENIED"]);
    let r = send(ci.get(format!("{}/berth/v1/tokens", s.reg.url()))).await;
    expect_error(&r, 403, &["DENIED"]);
    // At the token endpoint too.
    let r = send(ci.get(format!(
        "{}/auth/token?service=berth&scope={}",
        s.reg.url(),
        encode_query("repository:team/deep/app:pull,push,delete")
    )))
    .await;
    assert_eq!(r.status, 200);
    let jwt = r.json()["token"].as_str().unwrap().to_string();
    let with_jwt = client_with(Some(&format!("Bearer {jwt}")));
    let r = send(with_jwt.get(format!("{}/v2/team/deep/app/manifests/1", s.reg.url()))).await;
    assert_eq!(r.status, 200);
    // Listed, never with its secret.
    let out = s
        .cli(ROOT)
        .args(["token", "ls", "--json"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        listed.contains("\"ci\"") && !listed.contains(&secret),
        "{listed}"
    );
    let out = s.cli(ROOT).args(["token", "ls"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("team/**"));
    // Revoked: the secret and the JWT issued for it stop working.
    let out = s
        .cli(ROOT)
        .args(["token", "revoke", "ci"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = send(ci.get(format!("{}/v2/", s.reg.url()))).await;
    assert_eq!(r.status, 401);
    let started = Instant::now();
    assert!(
        eventually(Duration::from_secs(10), || async {
            send(with_jwt.get(format!("{}/v2/team/deep/app/manifests/1", s.reg.url())))
                .await
                .status
                == 401
        })
        .await,
        "the revoked token's JWT must stop working"
    );
    eprintln!("revoked JWT refused after {:?}", started.elapsed());
    // Key rotation: old tokens keep verifying, the CLI says which key signs.
    let root_jwt = {
        let r = send(
            client_with(Some(&basic(ROOT)))
                .get(format!("{}/auth/token?service=berth", s.reg.url())),
        )
        .await;
        r.json()["token"].as_str().unwrap().to_string()
    };
    let out = s.cli(ROOT).args(["token", "rotate-key"]).output().unwrap();
    // A file-based key is rotated by editing the file.
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--token-key-file"));
    let r =
        send(client_with(Some(&format!("Bearer {root_jwt}"))).get(format!("{}/v2/", s.reg.url())))
            .await;
    assert_eq!(r.status, 200);

    // The audit trail: who did what from where.
    let events = s.audit_events();
    let find = |event: &str, pred: &dyn Fn(&Value) -> bool| {
        events
            .iter()
            .find(|e| e["event"] == event && pred(e))
            .unwrap_or_else(|| panic!("no {event} event in {events:#?}"))
            .clone()
    };
    let e = find("token_created", &|e| e["identity"] == "user:root");
    assert_eq!(e["outcome"], "ok");
    assert!(e["detail"].as_str().unwrap().contains("ci"));
    let e = find("push", &|e| e["identity"] == "token:ci");
    assert_eq!(e["repository"], "team/deep/app");
    assert_eq!(e["reference"], "1");
    assert_eq!(e["digest"], image.digest);
    assert_eq!(e["client"], "127.0.0.1");
    assert!(e["time"].is_string() && e["request_id"].is_string());
    find("upload", &|e| e["identity"] == "token:ci");
    find("denied", &|e| {
        e["identity"] == "token:ci" && e["action"] == "delete"
    });
    find("denied", &|e| {
        e["identity"] == "user:alice" && e["action"] == "admin"
    });
    find("token_issued", &|e| e["identity"] == "token:ci");
    find("token_revoked", &|e| e["identity"] == "user:root");
    find("auth_failed", &|e| e["outcome"] == "failed");
    for e in &events {
        let line = e.to_string();
        for secret in [secret.as_str(), ALICE.1, BOB.1, ROOT.1] {
            assert!(
                !line.contains(secret),
                "a secret in the audit trail: {line}"
            );
        }
    }
    for secret in [secret.as_str(), ALICE.1, ROOT.1] {
        assert!(!s.reg.log().contains(secret), "a secret in the log");
    }
    // Also in the log, under their own target.
    assert!(s.reg.log().contains("berth::audit"));
}

#[tokio::test]
async fn mounts_need_pull_on_their_source() {
    if !pki::tools_available() {
        return;
    }
    let s = Secured::start(Options::new()).await;
    // A blob in a repository alice cannot read.
    let data = random_bytes(fresh_seed(), 2000);
    let digest = s.reg.push_blob("private/vault", &data).await;
    let alice = client_with(Some(&basic(ALICE)));
    for query in [
        format!("mount={digest}&from=private/vault"),
        format!("mount={digest}"),
    ] {
        let r = send(
            alice
                .post(format!(
                    "{}/v2/team/app/blobs/uploads/?{query}",
                    s.reg.url()
                ))
                .header("content-length", "0"),
        )
        .await;
        // Not mounted, not refused: an upload session, as for any blob
        // that cannot be mounted.
        assert_eq!(r.status, 202, "{query}: {}", r.describe());
        let r = send(alice.get(format!("{}/v2/team/app/blobs/{digest}", s.reg.url()))).await;
        assert_eq!(r.status, 404, "{query}: the blob must not have been linked");
    }
    // From a repository alice may pull, the mount happens.
    let shared = s.reg.push_blob("team/src", &data).await;
    let r = send(
        alice
            .post(format!(
                "{}/v2/team/app/blobs/uploads/?mount={shared}&from=team/src",
                s.reg.url()
            ))
            .header("content-length", "0"),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.describe());
}

#[tokio::test]
async fn htpasswd_changes_take_effect_without_a_restart() {
    if !pki::tools_available() {
        return;
    }
    let s = Secured::start(Options::new()).await;
    let url = format!("{}/v2/", s.reg.url());
    let carol = client_with(Some(&basic(("carol", "carol-password"))));
    assert_eq!(send(carol.get(&url)).await.status, 401);
    let reloads = |s: &Secured| s.reg.log().matches("htpasswd reloaded").count();
    // carol added (the file replaced by a rename, as tools do).
    pki::htpasswd(
        &s.htpasswd,
        &[ALICE, BOB, ROOT, ("carol", "carol-password")],
    );
    assert!(
        eventually(Duration::from_secs(10), || async { reloads(&s) == 1 }).await,
        "{}",
        s.reg.log_tail(20)
    );
    assert_eq!(send(carol.get(&url)).await.status, 200);
    // A file with a hash other than bcrypt is refused as a whole; the users
    // loaded before stay.
    std::fs::write(&s.htpasswd, "alice:$apr1$abcdefgh$0123456789abcdefghijkl\n").unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            s.reg.log().contains("new htpasswd file refused")
        })
        .await
    );
    assert!(s.reg.log().contains("line 1"), "the refusal names the line");
    assert_eq!(send(carol.get(&url)).await.status, 200);
    // carol removed: refused at once (remembered passwords are forgotten).
    pki::htpasswd(&s.htpasswd, &[ALICE, BOB, ROOT]);
    assert!(eventually(Duration::from_secs(10), || async { reloads(&s) == 2 }).await);
    assert_eq!(send(carol.get(&url)).await.status, 401);
    assert_eq!(
        send(client_with(Some(&basic(ALICE))).get(&url))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn an_open_registry_binds_only_to_loopback_unless_told_otherwise() {
    // Refused before it binds anything.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--listen", "0.0.0.0:5999", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--insecure-open") && stderr.contains("--htpasswd"),
        "{stderr}"
    );
    // An htpasswd file that holds another hash format stops the start, naming
    // the line.
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(
        &htpasswd,
        "# users\nalice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--htpasswd"])
        .arg(&htpasswd)
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 2") && stderr.contains("bcrypt"),
        "{stderr}"
    );
    // With the opt-in it runs, and says loudly what it is. Inside a network
    // namespace of the test's own, so nothing listens beyond this machine.
    if !netns_available() {
        return;
    }
    let ns = format!("berth-it-{}", std::process::id());
    assert!(
        Command::new("ip")
            .args(["netns", "add", &ns])
            .status()
            .unwrap()
            .success()
    );
    let _cleanup = NetnsGuard(ns.clone());
    Command::new("ip")
        .args(["-n", &ns, "link", "set", "lo", "up"])
        .status()
        .unwrap();
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            BIN,
            "serve",
            "--listen",
            "0.0.0.0:5000",
            "--insecure-open",
            "--data-dir",
        ])
        .arg(dir.path().join("open"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = eventually(Duration::from_secs(10), || async {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "curl",
                "-sf",
                "http://127.0.0.1:5000/readyz",
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    })
    .await;
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(started, "{log}");
    assert!(log.contains("OPEN REGISTRY"), "{log}");
    eprintln!("open registry started in network namespace {ns}");
}

fn netns_available() -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    let ip = Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !(root && ip) && std::env::var_os("BERTH_REQUIRE_SECURITY").is_some() {
        panic!("network namespaces (root and iproute2) are required here");
    }
    root && ip
}

struct NetnsGuard(String);

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}
