//! Every route against every kind of caller, glob edges, mounts, and
//! refusals of requests that carry bodies.

use super::*;

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

/// Checks an answer against what the caller must get.
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
            "POST tags/restore",
            Needs::Push,
            200,
            go(
                Method::POST,
                format!(
                    "/berth/v1/tags/restore?repository=team/app&tag=restored&digest={}",
                    image.digest
                )
            )
            .await
        );
        row!(
            "POST gc (dry run)",
            Needs::Admin,
            200,
            go(Method::POST, "/berth/v1/gc?dry_run=true".into()).await
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
async fn mounts_need_pull_on_their_source() {
    if !pki::tools_available() {
        return;
    }
    let s = Secured::start(Options::new()).await;
    // A blob in a repository alice cannot read.
    let data = random_bytes(fresh_seed(), 2000);
    let digest = s.reg.push_blob("private/vault", &data).await;
    let alice = client_with(Some(&basic(ALICE)));
    // Which `from` would the handler read? A repeated key mounts nothing.
    let allowed_src = s.reg.push_blob("team/decoy", b"decoy").await;
    let _ = allowed_src;
    for query in [
        format!("mount={digest}&from=private/vault"),
        format!("mount={digest}"),
        format!("mount={digest}&from=team/decoy&from=private/vault"),
        format!("mount={digest}&from=private/vault&from=team/decoy"),
        format!("mount={digest}&mount={digest}&from=team/decoy"),
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
async fn refused_requests_with_bodies_close_cleanly() {
    if !pki::tools_available() {
        return;
    }
    let s = Secured::start(Options::new()).await;
    let image = seed(&s).await;
    // One HTTP/1.1 client, its connections pooled: every refusal of a body
    // it is still sending must reach it, and the next request must not land
    // on a connection the server dropped.
    for who in [None, Some(basic(BOB))] {
        let client = client_with(who.as_deref());
        for i in 0..20 {
            let r = send(
                client
                    .put(format!("{}/v2/team/app/manifests/r{i}", s.reg.url()))
                    .header("content-type", &image.media_type)
                    .body(vec![b' '; 256 * 1024]),
            )
            .await;
            assert!(r.status == 401 || r.status == 403, "{}", r.describe());
            let r = try_send_once(client.get(format!("{}/v2/public/x/tags/list", s.reg.url())))
                .await
                .expect("the next request on the client works");
            assert_eq!(r.status, 200);
        }
    }
    // The refusal says the connection ends (the client then opens another).
    let body = vec![b' '; 100_000];
    let mut request = format!(
        "PUT /v2/team/app/manifests/raw HTTP/1.1\r\nHost: {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n",
        s.reg.host_port(),
        image.media_type,
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    let r = s.reg.raw(&request, Duration::from_secs(10)).await;
    assert_eq!(r.status, 401, "{}", r.head);
    assert!(
        r.head.to_ascii_lowercase().contains("connection: close"),
        "{}",
        r.head
    );
}
