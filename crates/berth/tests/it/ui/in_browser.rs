//! The whole console in Chromium, as an administrator and as a puller.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use super::{peer_paused, screenshots, sign_in, start_console};
use crate::pki::{self, Pki};
use crate::security::{ALICE, BOB, ROOT};
use crate::skopeo::{Layout, skopeo, skopeo_available};
use crate::support::*;
use crate::upstream::{Pusher, distribution_available};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_real_browser() {
    if !browser_available()
        || !skopeo_available()
        || !distribution_available()
        || !pki::tools_available()
    {
        return;
    }
    let backups = tempfile::tempdir().unwrap();
    let console = start_console(
        Options::new()
            .flag("--backup-to", backups.path().display())
            .flag("--backup-every", "1h"),
    )
    .await;
    let eu = &console.eu;
    let base = eu.url();

    // An image pushed by skopeo, pushed twice under one tag (history).
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("layout");
    let mut layout = Layout::new(&src);
    let first = layout.add_image(fresh_seed(), &[30_000, 50_000], "amd64");
    layout.tag("1.0", OCI_MANIFEST, &first);
    let creds = format!("{}:{}", ALICE.0, ALICE.1);
    let certs = work.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(Pki::shared().ca(), certs.join("ca.crt")).unwrap();
    let ca = format!("--dest-cert-dir={}", certs.display());
    let copy = |from: &str, to: &str| {
        let from = format!("oci:{}:{from}", src.display());
        let to = format!("docker://{}/team/app:{to}", eu.host_port());
        let (creds, ca) = (creds.clone(), ca.clone());
        async move { skopeo(&["copy", "--dest-creds", &creds, &ca, &from, &to]).await }
    };
    // 1.0 is the first image, then moves to the second (its history keeps
    // the first); 2.0, pushed last, is the first image again.
    copy("1.0", "1.0").await;
    let second = layout.add_image(fresh_seed(), &[20_000, 10_000, 5_000], "amd64");
    layout.tag("2.0", OCI_MANIFEST, &second);
    copy("2.0", "1.0").await;
    copy("1.0", "2.0").await;
    let first_digest = sha256_digest(&first);
    let app_digest = eu
        .manifest_digest("team/app", "1.0")
        .await
        .expect("team/app:1.0");
    // A signature-like referrer of it, a two-platform index, and a
    // repository bob may not see.
    eu.push_blob("team/app", b"{}").await;
    let signature = artifact_manifest(
        "application/vnd.dev.cosign.artifact.sig.v1+json",
        &[("application/octet-stream", b"signature bytes")],
        Some(json!({ "mediaType": OCI_MANIFEST, "digest": app_digest, "size": second.len() })),
        Some(json!({ "org.opencontainers.image.created": "2026-12-01T00:00:00Z" })),
    );
    eu.push_blob("team/app", b"signature bytes").await;
    eu.push_manifest(
        "team/app",
        &sha256_digest(&signature),
        OCI_MANIFEST,
        &signature,
    )
    .await;
    let (index, amd, arm) = two_platform_index(fresh_seed());
    amd.push(eu, "team/multi", None).await;
    arm.push(eu, "team/multi", None).await;
    eu.push_manifest("team/multi", "3", OCI_INDEX, &index).await;
    Image::oci(fresh_seed(), 1, 1000)
        .push(eu, "ops/secret", Some("1"))
        .await;
    // Something cached through the pull-through cache.
    let cached = Image::oci(fresh_seed(), 2, 4000);
    Pusher::new(&console.upstream.url(), None)
        .image("library/busybox", "stable", &cached)
        .await;
    let r = eu
        .get("/v2/docker.io/library/busybox/manifests/stable")
        .await;
    assert_eq!(r.status, 200, "through the cache: {}", r.describe());

    let browser = Browser::start(&screenshots()).await;

    // Signing in: a wrong password is refused, with the page saying so.
    browser.goto(&format!("{base}/ui/")).await;
    assert!(
        browser.url().await.contains("/ui/login"),
        "sent to sign in: {}",
        browser.url().await
    );
    browser.screenshot("login").await;
    browser.type_into("#user", ROOT.0).await;
    browser.type_into("#password", "not-the-password").await;
    browser.click_and_wait("#sign-in").await;
    let refused = browser.text(".error").await;
    assert!(refused.contains("Wrong user or password"), "{refused}");
    let cookie = browser
        .cookie("__Host-berth_csrf")
        .await
        .expect("a CSRF cookie");
    assert_eq!(cookie["httpOnly"], true);
    sign_in(&browser, &base, ROOT).await;
    let session = browser
        .cookie("__Host-berth_session")
        .await
        .expect("a session cookie");
    assert_eq!(session["secure"], true, "{session}");
    assert_eq!(session["httpOnly"], true, "{session}");
    assert_eq!(session["sameSite"], "Strict", "{session}");

    // The overview: this node, ready, its zone and jobs; traffic.
    browser.goto(&format!("{base}/ui/")).await;
    assert!(
        eventually(Duration::from_secs(15), || async {
            browser.goto(&format!("{base}/ui/")).await;
            browser.try_find("#nodes").await.is_some()
                && browser.text("#nodes").await.contains("replication-us")
        })
        .await,
        "the region was looked at, with this node leading replication"
    );
    assert_eq!(browser.text("#node-name").await, "eu-1");
    assert!(browser.text("#node-ready").await.starts_with("ready"));
    assert_eq!(browser.text("#region-name").await, "eu");
    let nodes = browser.text("#nodes").await;
    assert!(
        nodes.contains("eu-1") && nodes.contains("replication-us"),
        "{nodes}"
    );
    assert!(browser.text("#rate-requests").await.ends_with("/s"));
    // Live refresh (scripts on): the page's time moves on its own.
    let before = browser.text("#rendered").await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            browser.text("#rendered").await != before
        })
        .await,
        "live refresh replaced the content"
    );
    browser.screenshot("overview").await;

    // Repositories: a list, a search, a repository, a manifest, an index.
    browser.goto(&format!("{base}/ui/repositories")).await;
    let list = browser.text("#repositories").await;
    for name in [
        "team/app",
        "team/multi",
        "ops/secret",
        "docker.io/library/busybox",
    ] {
        assert!(list.contains(name), "{name} in {list}");
    }
    browser.screenshot("repositories").await;
    browser.type_into("#q", "mult").await;
    browser.click_and_wait("form.search button").await;
    let found = browser.text("#repositories").await;
    assert!(
        found.contains("team/multi") && !found.contains("team/app"),
        "{found}"
    );
    browser
        .goto(&format!("{base}/ui/repositories?q=nothing-like-this"))
        .await;
    browser.find("#no-repositories").await;

    browser
        .goto(&format!("{base}/ui/repositories/team/app"))
        .await;
    let tags = browser.text("#tags").await;
    assert!(tags.contains("1.0") && tags.contains("2.0"), "{tags}");
    // Newest first: 2.0 was pushed last.
    assert!(tags.find("2.0") < tags.find("1.0"), "{tags}");
    browser.screenshot("repository").await;

    // The trash: a deleted tag shows there, and Undelete brings it back.
    let r = eu.delete("/v2/team/multi/manifests/3").await;
    assert_eq!(r.status, 202, "{}", r.describe());
    browser
        .goto(&format!("{base}/ui/repositories/team/multi"))
        .await;
    assert!(browser.try_find("tr[data-tag='3']").await.is_none());
    assert!(browser.text("#trash").await.contains("tag 3"));
    browser.screenshot("trash").await;
    browser
        .click_and_wait("tr[data-reference='3'] button.undelete")
        .await;
    assert!(browser.try_find("tr[data-tag='3']").await.is_some());
    assert_eq!(
        eu.manifest_digest("team/multi", "3").await,
        Some(sha256_digest(&index)),
        "the tag is back where it pointed"
    );

    browser
        .goto(&format!("{base}/ui/repositories/team/app"))
        .await;
    browser.click_and_wait("tr[data-tag='1.0'] a").await;
    assert!(
        browser
            .url()
            .await
            .ends_with(&format!("/ui/repositories/team/app/manifests/{app_digest}"))
    );
    assert_eq!(browser.text("#digest").await, app_digest);
    let layers = browser.text("#layers").await;
    assert_eq!(
        layers.lines().filter(|l| l.contains("tar+gzip")).count(),
        3,
        "1.0 is the second image now: {layers}"
    );
    let pull = browser.text("#pull-command").await;
    assert_eq!(
        pull,
        format!("docker pull {}/team/app@{app_digest}", eu.host_port())
    );
    assert!(
        browser
            .text("#referrers")
            .await
            .contains("cosign.artifact.sig"),
        "the signature is listed"
    );
    browser.screenshot("manifest").await;
    browser
        .goto(&format!(
            "{base}/ui/repositories/team/multi/manifests/{}",
            sha256_digest(&index)
        ))
        .await;
    let platforms = browser.text("#platforms").await;
    assert!(
        platforms.contains("linux/amd64") && platforms.contains("linux/arm64"),
        "{platforms}"
    );
    browser.screenshot("index").await;
    browser
        .goto(&format!("{base}/ui/repositories/team/app/-/history/1.0"))
        .await;
    let history = browser.text("#history").await;
    assert!(
        history.contains(&first_digest[..19]) && history.contains("user:alice"),
        "{history}"
    );
    browser.screenshot("history").await;

    // Replication: pause and resume the peer from the page.
    browser.goto(&format!("{base}/ui/replication")).await;
    assert!(
        browser
            .text("tr[data-peer=us] .state")
            .await
            .contains("running")
    );
    browser.screenshot("replication").await;
    browser
        .click_and_wait("tr[data-peer=us] button.pause")
        .await;
    assert!(
        browser
            .text("tr[data-peer=us] .state")
            .await
            .contains("paused")
    );
    assert!(peer_paused(eu).await, "the API sees the pause");
    browser
        .click_and_wait("tr[data-peer=us] button.resume")
        .await;
    assert!(
        browser
            .text("tr[data-peer=us] .state")
            .await
            .contains("running")
    );
    assert!(!peer_paused(eu).await, "the API sees the resume");

    // The cache: the upstream is up, the image is cached; pin it.
    browser.goto(&format!("{base}/ui/cache")).await;
    assert!(
        browser
            .text("tr[data-namespace='docker.io'] .state")
            .await
            .contains("up")
    );
    let row = "tr[data-image='docker.io/library/busybox:stable']";
    assert_eq!(browser.text(&format!("{row} .pinned")).await, "-");
    browser.click_and_wait(&format!("{row} button.pin")).await;
    assert_eq!(browser.text(&format!("{row} .pinned")).await, "pinned");
    let listed = eu.get("/berth/v1/cache").await.json();
    assert!(
        listed["images"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["repository"] == "docker.io/library/busybox" && i["pinned"] == true),
        "{listed}"
    );
    browser.screenshot("cache").await;

    // Lifecycle: who leads each job, and the backups in the target.
    let r = send(eu.req(Method::POST, "/berth/v1/backups")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    browser.goto(&format!("{base}/ui/lifecycle")).await;
    let row = browser.text("tr[data-job=backup]").await;
    assert!(
        row.contains("eu-1"),
        "{row}\n{}",
        browser.text("#jobs").await
    );
    assert!(
        !browser.text("tr[data-job=backup]").await.contains("never"),
        "this node took the backup"
    );
    assert_eq!(
        browser.text("#backups tbody").await.lines().count(),
        1,
        "one backup listed"
    );
    browser.screenshot("lifecycle").await;

    // A forged form: right session, no or wrong CSRF token, or another
    // site's origin, is refused and changes nothing.
    let session_id = session["value"].as_str().unwrap().to_string();
    let http = client_builder_trusting(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let post = |path: &str, body: String, origin: Option<&str>| {
        let mut rb = http
            .post(format!("{base}{path}"))
            .header("cookie", format!("__Host-berth_session={session_id}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        if let Some(o) = origin {
            rb = rb.header("origin", o);
        }
        rb
    };
    for (body, origin) in [("".to_string(), None), ("csrf=forged".to_string(), None)] {
        let r = send(post("/ui/replication/peers/us/pause", body, origin)).await;
        assert_eq!(r.status, 403, "{}", r.describe());
    }
    // The page's own token, from another site's page: refused too.
    let page = send(
        http.get(format!("{base}/ui/replication"))
            .header("cookie", format!("__Host-berth_session={session_id}")),
    )
    .await;
    let token = super::csrf_of(&page.text());
    let r = send(post(
        "/ui/replication/peers/us/pause",
        format!("csrf={token}"),
        Some("https://evil.example"),
    ))
    .await;
    assert_eq!(r.status, 403, "{}", r.describe());
    assert!(!peer_paused(eu).await, "no forged form paused the peer");
    // With the token and this origin it goes through (so the refusals above
    // were about the token and the origin).
    let r = send(post(
        "/ui/replication/peers/us/pause",
        format!("csrf={token}"),
        Some(&base),
    ))
    .await;
    assert_eq!(r.status, 303, "{}", r.describe());
    assert!(peer_paused(eu).await);
    let r = send(post(
        "/ui/replication/peers/us/resume",
        format!("csrf={token}"),
        None,
    ))
    .await;
    assert_eq!(r.status, 303, "{}", r.describe());

    // Signing out ends the session on the server, not just in the browser.
    browser.goto(&format!("{base}/ui/")).await;
    browser.click_and_wait("#sign-out").await;
    assert!(browser.url().await.contains("/ui/login"));
    let r = send(
        http.get(format!("{base}/ui/replication"))
            .header("cookie", format!("__Host-berth_session={session_id}")),
    )
    .await;
    assert_eq!(r.status, 303, "the old session is gone: {}", r.describe());

    // bob may pull team/*: he sees those repositories and no admin action,
    // and an action posted anyway is refused with 403.
    sign_in(&browser, &base, BOB).await;
    browser.goto(&format!("{base}/ui/")).await;
    assert!(
        browser.try_find("#nodes").await.is_none(),
        "no region details for bob"
    );
    browser.screenshot("overview-bob").await;
    browser.goto(&format!("{base}/ui/repositories")).await;
    let list = browser.text("#repositories").await;
    assert!(
        list.contains("team/app") && !list.contains("ops/secret"),
        "{list}"
    );
    browser
        .goto(&format!("{base}/ui/repositories/team/app"))
        .await;
    assert!(
        !browser.source().await.contains("/-/history/"),
        "no history links for bob"
    );
    browser
        .goto(&format!("{base}/ui/repositories/team/multi"))
        .await;
    assert!(
        browser.try_find("#trash").await.is_none(),
        "no trash for bob"
    );
    browser
        .goto(&format!("{base}/ui/repositories/ops/secret"))
        .await;
    assert!(browser.text("h1").await.contains("Not allowed"));
    browser.goto(&format!("{base}/ui/replication")).await;
    assert!(browser.text("h1").await.contains("Not allowed"));
    assert!(browser.try_find("button.pause").await.is_none());
    browser.screenshot("replication-bob").await;
    let status = browser
        .run_async(
            "const done = arguments[arguments.length - 1];
             const csrf = document.querySelector('input[name=csrf]').value;
             Promise.all(['/ui/replication/peers/us/pause', '/ui/cache/pin', '/ui/replication/serving'].map(p =>
               fetch(p, { method: 'POST', redirect: 'manual',
                          headers: { 'content-type': 'application/x-www-form-urlencoded' },
                          body: 'csrf=' + encodeURIComponent(csrf) + '&image=docker.io/library/busybox:stable&pinned=false&enabled=false' })
                 .then(r => r.status))).then(done);",
        )
        .await;
    assert_eq!(status, json!([403, 403, 403]), "bob's posts");
    assert!(!peer_paused(eu).await);
    let ready = eu.get("/readyz").await;
    assert_eq!(ready.status, 200, "serving stayed on");
    browser.quit().await;
}
