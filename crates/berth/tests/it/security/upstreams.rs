//! Security at the edges: tokens from an external token server (its
//! `access` claims enforced exactly), pull-through namespaces under the
//! policy, and upstreams verified over TLS.

use std::process::Command;

use super::{ALICE, BOB, POLICY, ROOT, basic, client_with};
use crate::pki::{self, Pki};
use crate::support::*;
use crate::upstream::{Distribution, Pusher, TokenIssuer, distribution_available};

/// A JWKS document for the issuer's RSA certificate.
fn jwks_of(cert: &std::path::Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-modulus", "-in"])
        .arg(cert)
        .output()
        .unwrap();
    let modulus = String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("Modulus=")
        .to_string();
    let n = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        hex::decode(modulus).unwrap(),
    );
    serde_json::json!({ "keys": [{ "kty": "RSA", "alg": "RS256", "use": "sig", "n": n, "e": "AQAB" }] })
        .to_string()
}

#[tokio::test]
async fn tokens_of_an_external_issuer_grant_exactly_their_access() {
    if !pki::tools_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let issuer = TokenIssuer::start(&dir.path().join("issuer")).await;
    std::fs::write(dir.path().join("jwks.json"), jwks_of(&issuer.cert())).unwrap();
    for keys in [
        format!("public_key_file = \"{}\"", issuer.cert().display()),
        format!("jwks_file = \"{}\"", dir.path().join("jwks.json").display()),
    ] {
        let config = dir.path().join("berth.toml");
        std::fs::write(
            &config,
            format!(
                "[external_token]\nrealm = \"{}\"\nservice = \"{}\"\nissuer = \"{}\"\n{keys}\n",
                issuer.realm(),
                crate::upstream::SERVICE,
                crate::upstream::ISSUER
            ),
        )
        .unwrap();
        let mut reg =
            Registry::start_with(Options::new().tls().flag("--config", config.display())).await;
        // Challenges send clients to the external server.
        let r = send(client_with(None).get(format!("{}/v2/", reg.url()))).await;
        assert_eq!(r.status, 401);
        assert_eq!(
            r.header("www-authenticate").unwrap(),
            format!(
                "Bearer realm=\"{}\",service=\"{}\"",
                issuer.realm(),
                crate::upstream::SERVICE
            )
        );
        let token = |scope: &str| client_with(Some(&format!("Bearer {}", issuer.token(scope))));
        let pusher = token("repository:team/app:pull,push");
        reg.set_client(pusher.clone());
        let image = Image::oci(fresh_seed(), 1, 1500);
        image.push(&reg, "team/app", Some("1")).await;
        // Only what the token lists: pull-only cannot push, another
        // repository gets nothing, delete was not granted.
        let puller = token("repository:team/app:pull");
        let r = send(puller.get(format!("{}/v2/team/app/manifests/1", reg.url()))).await;
        assert_eq!(r.status, 200);
        let r = send(
            puller
                .put(format!("{}/v2/team/app/manifests/2", reg.url()))
                .header("content-type", &image.media_type)
                .body(image.manifest.clone()),
        )
        .await;
        assert_eq!(r.status, 401);
        let challenge = r.header("www-authenticate").unwrap();
        assert!(
            challenge.contains(&issuer.realm())
                && challenge.contains("error=\"insufficient_scope\""),
            "{challenge}"
        );
        assert!(
            challenge.contains("scope=\"repository:team/app:pull,push\""),
            "{challenge}"
        );
        let r = send(pusher.get(format!("{}/v2/team/other/tags/list", reg.url()))).await;
        assert_eq!(r.status, 401);
        let r = send(pusher.delete(format!("{}/v2/team/app/manifests/1", reg.url()))).await;
        assert_eq!(r.status, 401);
        // An external token never administers Berth.
        let r = send(token("repository:team/app:*").get(format!("{}/berth/v1/tokens", reg.url())))
            .await;
        expect_error(&r, 403, &["DENIED"]);
        // Tokens signed by anyone else are refused.
        let forged = crate::security::sign_token(
            &berth_auth::SigningKey::generate().unwrap(),
            "alice",
            vec![berth_auth::Access::repository(
                "team/app",
                berth_auth::Actions::ALL_CONTENT,
            )],
            300,
        );
        let r = send(
            client_with(Some(&format!("Bearer {forged}")))
                .get(format!("{}/v2/team/app/tags/list", reg.url())),
        )
        .await;
        assert_eq!(r.status, 401);
        assert!(
            r.header("www-authenticate")
                .unwrap()
                .contains("invalid_token")
        );
    }
}

#[tokio::test]
async fn pulling_through_needs_pull_on_the_namespace_and_never_writes() {
    if !pki::tools_available() || !distribution_available() {
        return;
    }
    let upstream = Distribution::start().await;
    let image = Image::oci(fresh_seed(), 1, 1200);
    Pusher::new(&upstream.url(), None)
        .image("library/alpine", "3", &image)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    pki::htpasswd(&htpasswd, &[ALICE, BOB, ROOT]);
    let config = dir.path().join("berth.toml");
    std::fs::write(
        &config,
        format!("{POLICY}\n[[access]]\nrepositories = [\"docker.io/**\"]\nusers = [\"bob\"]\nactions = [\"pull\", \"push\"]\n"),
    )
    .unwrap();
    let reg = Registry::start_with(
        Options::new()
            .tls()
            .flag("--upstream", format!("docker.io={}", upstream.url()))
            .flag("--htpasswd", htpasswd.display())
            .flag("--config", config.display()),
    )
    .await;
    let path = format!("{}/v2/docker.io/library/alpine/manifests/3", reg.url());
    // bob may pull through; alice may not; nobody pushes into it.
    let r = send(client_with(Some(&basic(BOB))).get(&path)).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(r.body == image.manifest);
    let r = send(client_with(Some(&basic(ALICE))).get(&path)).await;
    expect_error(&r, 403, &["DENIED"]);
    // containerd's `?ns=` reads the cache's repository: authorized as
    // docker.io/team/x, not as the team/x alice may pull.
    let hidden = Image::oci(fresh_seed(), 1, 700);
    Pusher::new(&upstream.url(), None)
        .image("team/x", "3", &hidden)
        .await;
    let ns_path = format!("{}/v2/team/x/manifests/3?ns=docker.io", reg.url());
    let r = send(client_with(Some(&basic(ALICE))).get(&ns_path)).await;
    expect_error(&r, 403, &["DENIED"]);
    let r = send(client_with(Some(&basic(BOB))).get(&ns_path)).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(r.body == hidden.manifest);
    for who in [BOB, ROOT] {
        let r = send(
            client_with(Some(&basic(who)))
                .put(&path)
                .header("content-type", &image.media_type)
                .body(image.manifest.clone()),
        )
        .await;
        expect_error(&r, 403, &["DENIED"]);
    }
    drop(reg);
    // Docker's registry-mirrors: a name that does not exist here reads
    // docker.io's, for callers who may pull docker.io's.
    let mirror = Registry::start_with(
        Options::new()
            .tls()
            .flag("--upstream", format!("docker.io={}", upstream.url()))
            .flag("--cache-mirror-default", "docker.io")
            .flag("--htpasswd", htpasswd.display())
            .flag("--config", config.display()),
    )
    .await;
    let path = format!("{}/v2/team/x/manifests/3", mirror.url());
    // alice may not pull docker.io's: she gets the local answer, not its
    // content.
    let r = send(client_with(Some(&basic(ALICE))).get(&path)).await;
    expect_error(&r, 404, &["MANIFEST_UNKNOWN", "NAME_UNKNOWN"]);
    let r = send(client_with(Some(&basic(BOB))).get(&path)).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    // No answer tells a caller without rights whether a name exists here.
    let mut mirror = mirror;
    mirror.set_client(client_with(Some(&basic(ROOT))));
    Image::oci(fresh_seed(), 1, 300)
        .push(&mirror, "private/vault", Some("1"))
        .await;
    for who in [None, Some(basic(ALICE)), Some(basic(BOB))] {
        let client = client_with(who.as_deref());
        let mut answers = Vec::new();
        for name in ["private/vault", "private/nothing"] {
            let r = send(client.get(format!("{}/v2/{name}/manifests/1", mirror.url()))).await;
            let shape = format!(
                "{} {}",
                r.header("www-authenticate").unwrap_or_default(),
                r.text()
            )
            .replace(name, "NAME");
            answers.push((r.status, shape));
        }
        assert_eq!(
            answers[0], answers[1],
            "{who:?}: existing and missing names answer alike"
        );
    }
}

#[tokio::test]
async fn upstreams_are_verified_over_tls_with_an_extra_ca() {
    if !pki::tools_available() || !distribution_available() {
        return;
    }
    let upstream = Distribution::start_tls().await;
    let image = Image::oci(fresh_seed(), 1, 900);
    Pusher::new(&upstream.url(), None)
        .image("library/app", "1", &image)
        .await;
    let path = "/v2/docker.io/library/app/manifests/1";
    // Without the CA the upstream's certificate is not trusted.
    let untrusting = Registry::start_with(
        Options::new().flag("--upstream", format!("docker.io={}", upstream.url())),
    )
    .await;
    let r = untrusting.get(path).await;
    assert!(r.status >= 500, "{}", r.describe());
    assert!(
        r.text().contains("certificate") || r.text().contains("upstream"),
        "{}",
        r.text()
    );
    let trusting = Registry::start_with(
        Options::new()
            .flag("--upstream", format!("docker.io={}", upstream.url()))
            .flag("--upstream-ca-file", Pki::shared().ca().display()),
    )
    .await;
    let r = trusting.get(path).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(r.body == image.manifest);
}
