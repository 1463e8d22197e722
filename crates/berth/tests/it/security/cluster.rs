//! Security across nodes and regions: a region of three nodes on one etcd
//! shares signing keys, API tokens and revocations; regions replicate over
//! TLS, each peer with a credential of its own (a secret or a client
//! certificate) that lets it read the feed and nothing else.

use std::time::{Duration, Instant};

use super::{ALICE, BOB, POLICY, ROOT, basic, client_with};
use crate::pki::{self, Pki};
use crate::support::*;

/// Polls until `url` answers `status` to `client`; how long after
/// `since` that was.
async fn until_status(
    client: &reqwest::Client,
    url: &str,
    status: u16,
    since: Instant,
) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(15) {
        if send(client.get(url)).await.status == status {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

fn token_of(r: &Resp) -> String {
    assert_eq!(r.status, 200, "{}", r.describe());
    r.json()["token"].as_str().unwrap().to_string()
}

fn kid_of(token: &str) -> String {
    let header = token.split('.').next().unwrap();
    let header: serde_json::Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, header).unwrap(),
    )
    .unwrap();
    header["kid"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_of_three_nodes_shares_keys_tokens_and_revocations() {
    if !pki::tools_available() {
        return;
    }
    let Some(etcd) = start_etcd().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    pki::htpasswd(&htpasswd, &[ALICE, BOB, ROOT]);
    let config = dir.path().join("berth.toml");
    std::fs::write(&config, POLICY).unwrap();
    let metadata = format!("etcd://127.0.0.1:{}/auth-{}", etcd.port, fresh_seed());
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(
            Registry::start_with(
                Options::new()
                    .tls()
                    .flag("--metadata", &metadata)
                    .flag("--node-name", format!("n{i}"))
                    .flag("--htpasswd", htpasswd.display())
                    .flag("--config", config.display()),
            )
            .await,
        );
    }
    let url = |i: usize, path: &str| format!("{}{path}", nodes[i].url());
    let alice = client_with(Some(&basic(ALICE)));
    // A token from one node opens every node: the signing key is the
    // region's, kept in etcd.
    let token = token_of(&send(alice.get(url(0, "/auth/token?service=berth"))).await);
    let bearer = client_with(Some(&format!("Bearer {token}")));
    for i in 0..3 {
        assert_eq!(
            send(bearer.get(url(i, "/v2/"))).await.status,
            200,
            "node {i}"
        );
    }
    // An API token made through node 0 works on node 2 at once.
    let cli = |i: usize| super::cli_for(&nodes[i], ROOT);
    let out = cli(0)
        .args([
            "token",
            "create",
            "ci",
            "--repositories",
            "team/*",
            "--actions",
            "pull",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secret = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let ci = client_with(Some(&basic(("ci", &secret))));
    assert_eq!(send(ci.get(url(2, "/v2/"))).await.status, 200);
    let ci_token = token_of(
        &send(ci.get(url(
            1,
            "/auth/token?service=berth&scope=repository:team/app:pull",
        )))
        .await,
    );
    let ci_bearer = client_with(Some(&format!("Bearer {ci_token}")));
    for i in 0..3 {
        assert_eq!(
            send(ci_bearer.get(url(i, "/v2/"))).await.status,
            200,
            "node {i}"
        );
    }
    // Revoked through node 0: every node refuses the secret and its JWT
    // within seconds.
    let out = cli(0).args(["token", "revoke", "ci"]).output().unwrap();
    let revoked = Instant::now();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for i in 0..3 {
        let secret_refused = until_status(&ci, &url(i, "/v2/"), 401, revoked)
            .await
            .unwrap_or_else(|| panic!("node {i} still accepts the revoked secret"));
        let jwt_refused = until_status(&ci_bearer, &url(i, "/v2/"), 401, revoked)
            .await
            .unwrap_or_else(|| panic!("node {i} still accepts the revoked token's JWT"));
        eprintln!(
            "node {i}: after the revocation, the secret was refused within {secret_refused:?}, its JWT within {jwt_refused:?}"
        );
    }
    // Key rotation through node 1: the old tokens keep working everywhere;
    // once active, tokens signed with the new key work everywhere too.
    let old_kid = kid_of(&token);
    let out = cli(1).args(["token", "rotate-key"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::sleep(berth_auth::keystore::ACTIVATION_DELAY + Duration::from_millis(500)).await;
    let fresh = token_of(&send(alice.get(url(1, "/auth/token?service=berth"))).await);
    assert_ne!(kid_of(&fresh), old_kid, "node 1 signs with the new key");
    let fresh_bearer = client_with(Some(&format!("Bearer {fresh}")));
    for i in 0..3 {
        assert_eq!(
            send(fresh_bearer.get(url(i, "/v2/"))).await.status,
            200,
            "node {i}, new key"
        );
        assert_eq!(
            send(bearer.get(url(i, "/v2/"))).await.status,
            200,
            "node {i}, old key"
        );
    }
    let out = cli(2).args(["token", "keys"]).output().unwrap();
    let keys = String::from_utf8_lossy(&out.stdout);
    assert!(keys.contains(&old_kid), "{keys}");
    drop(nodes);
}

/// A region with TLS, the test policy and a `[[peer]]` of its own.
fn region_config(dir: &std::path::Path, name: &str, peer_toml: &str) -> std::path::PathBuf {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!("region = \"{name}\"\n{peer_toml}\n{POLICY}"),
    )
    .unwrap();
    config
}

async fn replicated(to: &Registry, repo: &str, tag: &str, image: &Image) -> bool {
    let alice = client_with(Some(&basic(ALICE)));
    eventually(Duration::from_secs(30), || async {
        let r = send(
            alice
                .get(format!("{}/v2/{repo}/manifests/{tag}", to.url()))
                .header("x-berth-local-only", "1"),
        )
        .await;
        r.status == 200 && r.body == image.manifest
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regions_replicate_over_tls_each_peer_with_its_own_secret() {
    if !pki::tools_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    pki::htpasswd(&htpasswd, &[ALICE, BOB, ROOT]);
    let ports = [free_port(), free_port()];
    let peer = |name: &str, port: u16, secret: &str| {
        format!(
            "[[peer]]\nname = \"{name}\"\nurl = \"https://127.0.0.1:{port}\"\nsecret = \"{secret}\"\n"
        )
    };
    const PAIR: &str = "eu-us-pair-secret";
    let start = |name: &'static str, port: u16, peer_toml: String| {
        let config = region_config(dir.path(), name, &peer_toml);
        Options::new()
            .tls()
            .port(port)
            .flag("--htpasswd", htpasswd.display())
            .flag("--config", config.display())
            .flag("--peer-ca-file", Pki::shared().ca().display())
    };
    let mut eu = Registry::start_with(start("eu", ports[0], peer("us", ports[1], PAIR))).await;
    let us = Registry::start_with(start("us", ports[1], peer("eu", ports[0], PAIR))).await;
    eu.set_client(client_with(Some(&basic(ALICE))));
    let image = Image::oci(fresh_seed(), 2, 3000);
    image.push(&eu, "team/app", Some("1")).await;
    assert!(
        replicated(&us, "team/app", "1", &image).await,
        "replicated over TLS: {}",
        us.log_tail(30)
    );
    // The pair's secret reads the feed and content, and nothing else.
    let as_peer = client_with(Some(&format!("Bearer {PAIR}")));
    let feed = send(as_peer.get(format!("{}/berth/v1/replication/feed?after=0", eu.url()))).await;
    assert_eq!(feed.status, 200, "{}", feed.describe());
    let r = send(
        as_peer
            .get(format!("{}/v2/team/app/manifests/1", eu.url()))
            .header("x-berth-local-only", "1"),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = send(
        as_peer
            .put(format!("{}/v2/team/app/manifests/2", eu.url()))
            .header("content-type", &image.media_type)
            .body(image.manifest.clone()),
    )
    .await;
    expect_error(&r, 403, &["DENIED"]);
    for (method, path) in [
        (reqwest::Method::GET, "/berth/v1/replication/status"),
        (
            reqwest::Method::POST,
            "/berth/v1/replication/peers/us/pause",
        ),
        (
            reqwest::Method::POST,
            "/berth/v1/region/serving?enabled=false",
        ),
        (reqwest::Method::GET, "/berth/v1/tokens"),
    ] {
        let r = send(as_peer.request(method.clone(), format!("{}{path}", eu.url()))).await;
        expect_error(&r, 403, &["DENIED"]);
    }
    // A wrong peer credential is refused.
    let wrong = client_with(Some("Bearer not-the-pair-secret"));
    let r = send(wrong.get(format!("{}/berth/v1/replication/feed?after=0", eu.url()))).await;
    expect_error(&r, 401, &["UNAUTHORIZED"]);
    // Region control is for administrators.
    let root = client_with(Some(&basic(ROOT)));
    let r = send(root.post(format!("{}/berth/v1/replication/peers/us/pause", eu.url()))).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    let r = send(root.post(format!("{}/berth/v1/replication/peers/us/resume", eu.url()))).await;
    assert_eq!(r.status, 200);
    let r = send(
        client_with(Some(&basic(BOB)))
            .post(format!("{}/berth/v1/replication/peers/us/pause", eu.url())),
    )
    .await;
    expect_error(&r, 403, &["DENIED"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regions_replicate_with_client_certificates_as_peer_identities() {
    if !pki::tools_available() {
        return;
    }
    let pki = Pki::shared();
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    pki::htpasswd(&htpasswd, &[ALICE, BOB, ROOT]);
    let ports = [free_port(), free_port()];
    let certs = [
        pki.issue(&format!("eu-peer-{}", fresh_seed()), "eu.peer", false),
        pki.issue(&format!("ap-peer-{}", fresh_seed()), "ap.peer", false),
    ];
    let names = ["eu", "ap"];
    let mut regions = Vec::new();
    for i in 0..2 {
        let other = 1 - i;
        let peer_toml = format!(
            "[[peer]]\nname = \"{}\"\nurl = \"https://127.0.0.1:{}\"\ntls_identity = \"{}.peer\"\n",
            names[other], ports[other], names[other]
        );
        let config = region_config(dir.path(), names[i], &peer_toml);
        regions.push(
            Registry::start_with(
                Options::new()
                    .tls()
                    .port(ports[i])
                    .flag("--tls-client-ca", pki.ca().display())
                    .flag("--htpasswd", htpasswd.display())
                    .flag("--config", config.display())
                    .flag("--peer-ca-file", pki.ca().display())
                    .flag("--peer-client-cert", certs[i].cert.display())
                    .flag("--peer-client-key", certs[i].key.display()),
            )
            .await,
        );
    }
    regions[1].set_client(client_with(Some(&basic(ALICE))));
    let image = Image::oci(fresh_seed(), 1, 2000);
    image.push(&regions[1], "team/cert", Some("1")).await;
    assert!(
        replicated(&regions[0], "team/cert", "1", &image).await,
        "{}",
        regions[0].log_tail(30)
    );
    // ap's certificate reads eu's feed; another certificate of the same CA
    // is just a user, who may not.
    let with = |pair: &crate::pki::CertPair| {
        client_builder_trusting(true)
            .identity(reqwest::Identity::from_pem(&pair.identity_pem()).unwrap())
            .build()
            .unwrap()
    };
    let feed = format!("{}/berth/v1/replication/feed?after=0", regions[0].url());
    assert_eq!(send(with(&certs[1]).get(&feed)).await.status, 200);
    let stranger = pki.issue(&format!("stranger-{}", fresh_seed()), "mallory", false);
    let r = send(with(&stranger).get(&feed)).await;
    expect_error(&r, 403, &["DENIED"]);
}
