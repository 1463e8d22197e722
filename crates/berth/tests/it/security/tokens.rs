//! The registry token protocol as clients speak it, Basic challenges, and
//! API tokens from creation to revocation, with the audit trail.

use super::*;

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
    // A token, even an administrator's, never administers the region: one
    // handed out for a pull must not mint API tokens.
    let r = send(
        client_with(Some(&format!("Bearer {root_jwt}")))
            .get(format!("{}/berth/v1/tokens", s.reg.url())),
    )
    .await;
    expect_error(&r, 403, &["DENIED"]);
    // A token for the catalog lists what its subject may pull.
    let r = send(client_with(Some(&basic(ALICE))).get(format!(
        "{}/auth/token?service=berth&scope=registry:catalog:*",
        s.reg.url()
    )))
    .await;
    let catalog_token = r.json()["token"].as_str().unwrap().to_string();
    let r = send(
        client_with(Some(&format!("Bearer {catalog_token}")))
            .get(format!("{}/v2/_catalog", s.reg.url())),
    )
    .await;
    assert_eq!(r.status, 200);
    let listed = r.json()["repositories"].clone();
    assert!(
        listed.as_array().unwrap().iter().any(|r| r == "team/app"),
        "{listed}"
    );
    assert!(
        !listed
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == "team/deep/app"),
        "{listed}"
    );

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
