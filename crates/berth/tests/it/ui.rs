//! The operator's console in a real browser: Debian's headless Chromium,
//! driven over WebDriver, against a real `berth` with TLS, htpasswd users
//! and the test policy, a peer region, and a pull-through cache in front
//! of Debian's Distribution. Every page is screenshotted into
//! `target/tmp/ui-screenshots/` (kept as the run's artifact; docs/ui.md
//! shows them). Also, without a browser: the console of an open registry
//! and the refusals every action owes (CSRF, origin, policy).

use std::path::PathBuf;
use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::pki::{self, Pki};
use crate::security::{ALICE, BOB, POLICY, ROOT, basic, client_with};
use crate::skopeo::{Layout, skopeo, skopeo_available};
use crate::support::*;
use crate::upstream::{Distribution, Pusher, distribution_available};

pub fn screenshots() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots")
}

/// A region `eu` with TLS, the test users and policy, a peer `us` (a real
/// second region) and an upstream for `docker.io`.
pub(crate) struct Console {
    pub eu: Registry,
    pub us: Registry,
    pub upstream: Distribution,
    _dir: tempfile::TempDir,
}

/// `extra`'s arguments go to `eu`.
pub(crate) async fn start_console(extra: Options) -> Console {
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    pki::htpasswd(&htpasswd, &[ALICE, BOB, ROOT]);
    let upstream = Distribution::start().await;
    let ports = [free_port(), free_port()];
    const SECRET: &str = "eu-us-console-secret";
    let config = |name: &str, peer: &str, port: u16| {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "region = \"{name}\"\n[[peer]]\nname = \"{peer}\"\nurl = \"https://127.0.0.1:{port}\"\nsecret = \"{SECRET}\"\n{POLICY}"
            ),
        )
        .unwrap();
        path
    };
    let options = |name: &str, peer: &str, own: u16, other: u16| {
        Options::new()
            .tls()
            .port(own)
            .flag("--htpasswd", htpasswd.display())
            .flag("--config", config(name, peer, other).display())
            .flag("--peer-ca-file", Pki::shared().ca().display())
    };
    let mut eu_options = options("eu", "us", ports[0], ports[1])
        .flag("--upstream", format!("docker.io={}", upstream.url()))
        .flag("--node-name", "eu-1")
        .flag("--zone", "a");
    eu_options.args.extend(extra.args);
    let mut eu = Registry::start_with(eu_options).await;
    let mut us = Registry::start_with(options("us", "eu", ports[1], ports[0])).await;
    eu.set_client(client_with(Some(&basic(ROOT))));
    us.set_client(client_with(Some(&basic(ROOT))));
    Console {
        eu,
        us,
        upstream,
        _dir: dir,
    }
}

/// Signs in through the form as `who`.
async fn sign_in(browser: &Browser, base: &str, who: (&str, &str)) {
    browser.goto(&format!("{base}/ui/login")).await;
    browser.type_into("#user", who.0).await;
    browser.type_into("#password", who.1).await;
    browser.click_and_wait("#sign-in").await;
    assert_eq!(
        browser.text("#who").await,
        format!("user:{}", who.0),
        "signed in as {}",
        who.0
    );
}

async fn peer_paused(eu: &Registry) -> bool {
    let status = eu.get("/berth/v1/replication/status").await;
    assert_eq!(status.status, 200, "{}", status.describe());
    status.json()["peers"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["peer"] == "us"))
        .map(|p| p["paused"] == true)
        .unwrap_or_else(|| panic!("no peer us: {}", status.text()))
}

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
    let token = page
        .text()
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_registry_has_an_open_console_that_still_refuses_forged_forms() {
    let reg =
        Registry::start_with(Options::new().flag("--upstream", "docker.io=http://127.0.0.1:9"))
            .await;
    Image::oci(fresh_seed(), 1, 2000)
        .push(&reg, "team/app", Some("v1"))
        .await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let page = send(http.get(format!("{}/ui/", reg.url()))).await;
    assert_eq!(page.status, 200, "{}", page.describe());
    assert!(page.text().contains("open registry"));
    assert_eq!(page.header("x-frame-options").as_deref(), Some("DENY"));
    assert!(
        page.header("content-security-policy")
            .unwrap()
            .contains("frame-ancestors 'none'")
    );
    let cookie = page.header("set-cookie").expect("a CSRF cookie");
    let token = cookie
        .strip_prefix("berth_csrf=")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert!(
        cookie.contains("SameSite=Strict") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    let repos = send(http.get(format!("{}/ui/repositories/team/app", reg.url()))).await;
    assert!(repos.text().contains("v1"), "{}", repos.text());
    // Region control needs a peer credential on an open registry, as on the API.
    let replication = send(http.get(format!("{}/ui/replication", reg.url()))).await;
    assert_eq!(replication.status, 200);
    let pin = |body: String, cookie: Option<String>| {
        let mut rb = http
            .post(format!("{}/ui/cache/pin", reg.url()))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        if let Some(c) = cookie {
            rb = rb.header("cookie", c);
        }
        send(rb)
    };
    // No cookie, or a token that is not the cookie's: refused.
    let r = pin(
        format!("csrf={token}&image=docker.io/x:1&pinned=true"),
        None,
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.describe());
    let r = pin(
        "csrf=other&image=docker.io/x:1&pinned=true".into(),
        Some(format!("berth_csrf={token}")),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.describe());
    // The right pair gets as far as the image (not cached here).
    let r = pin(
        format!("csrf={token}&image=docker.io/x:1&pinned=true"),
        Some(format!("berth_csrf={token}")),
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.describe());
    assert!(r.text().contains("is not cached"), "{}", r.text());
    // Region control needs a peer credential on an open registry: the
    // console refuses it even with a good form.
    let r = send(
        http.post(format!("{}/ui/replication/serving", reg.url()))
            .header("cookie", format!("berth_csrf={token}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("csrf={token}&enabled=false")),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.describe());
    // Bad input gets an answer, never a 500.
    for (method, path, body) in [
        (Method::GET, "/ui/repositories/Bad/Name", ""),
        (
            Method::GET,
            "/ui/repositories/team/app/manifests/sha256:zz",
            "",
        ),
        (
            Method::GET,
            "/ui/repositories/team/app/-/history/bad%20tag",
            "",
        ),
        (Method::GET, "/ui/cache?page=99999999999999999999", ""),
        (Method::GET, "/ui/nothing", ""),
        (Method::POST, "/ui/login", "%zz"),
        (Method::GET, "/ui/assets/../../etc/passwd", ""),
    ] {
        let r = send(
            http.request(method.clone(), format!("{}{path}", reg.url()))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body),
        )
        .await;
        assert!(
            r.status >= 400 && r.status < 500,
            "{method} {path}: {}",
            r.describe()
        );
    }
    let big = "a".repeat(20_000);
    let r = pin(
        format!("csrf={token}&image={big}"),
        Some(format!("berth_csrf={token}")),
    )
    .await;
    assert_eq!(r.status, 413, "{}", r.describe());
}

/// Signs in through the form with a plain HTTP client; the session cookie
/// (`NAME=VALUE`), or the refusal's status.
async fn sign_in_http(
    http: &reqwest::Client,
    base: &str,
    who: (&str, &str),
) -> Result<String, u16> {
    let login = send(http.get(format!("{base}/ui/login"))).await;
    let csrf = login
        .header("set-cookie")
        .and_then(|c| c.split(';').next().map(str::to_string))
        .expect("a CSRF cookie");
    let token = csrf.split_once('=').unwrap().1.to_string();
    let r = send(
        http.post(format!("{base}/ui/login"))
            .header("cookie", csrf)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!(
                "csrf={token}&user={}&password={}&next=/ui/repositories",
                who.0, who.1
            )),
    )
    .await;
    if r.status != 303 {
        return Err(r.status);
    }
    Ok(r.header("set-cookie")
        .and_then(|c| c.split(';').next().map(str::to_string))
        .expect("a session cookie"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_end_with_their_credential_and_tokens_see_only_their_claims() {
    if !pki::tools_available() {
        return;
    }
    let s = crate::security::Secured::start(Options::new()).await;
    let base = s.reg.url();
    Image::oci(fresh_seed(), 1, 1000)
        .push(&s.reg, "team/app", Some("1"))
        .await;
    let http = client_builder_trusting(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let page = |cookie: String| {
        send(
            http.get(format!("{base}/ui/repositories/team/app"))
                .header("cookie", cookie),
        )
    };
    let alice = sign_in_http(&http, &base, ALICE).await.unwrap();
    let bob = sign_in_http(&http, &base, BOB).await.unwrap();
    assert!(alice.starts_with("__Host-berth_session="), "{alice}");
    assert_eq!(page(alice.clone()).await.status, 200);
    assert_eq!(page(bob.clone()).await.status, 200);

    // alice's password changes (only her line): her session ends, bob's
    // stands.
    let text = std::fs::read_to_string(&s.htpasswd).unwrap();
    let line = std::process::Command::new("htpasswd")
        .args(["-nbB", "-C", "5", ALICE.0, "a-new-password"])
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&line.stdout).trim().to_string();
    let replaced: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with("alice:") {
                line.clone()
            } else {
                l.to_string()
            }
        })
        .collect();
    let tmp = s.htpasswd.with_extension("tmp");
    std::fs::write(&tmp, replaced.join("\n") + "\n").unwrap();
    std::fs::rename(&tmp, &s.htpasswd).unwrap();
    assert!(
        eventually(Duration::from_secs(15), || async {
            page(alice.clone()).await.status == 303
        })
        .await,
        "a new password ends the session"
    );
    assert_eq!(page(bob.clone()).await.status, 200, "bob's stands");

    // Signing out ends the session on the server.
    let logout_page = send(
        http.get(format!("{base}/ui/"))
            .header("cookie", bob.clone()),
    )
    .await;
    let token = logout_page
        .text()
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
    let r = send(
        http.post(format!("{base}/ui/logout"))
            .header("cookie", bob.clone())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("csrf={token}")),
    )
    .await;
    assert_eq!(r.status, 303, "{}", r.describe());
    assert!(r.header("set-cookie").unwrap().contains("Max-Age=0"));
    assert_eq!(page(bob.clone()).await.status, 303, "signed out for good");

    // A registry token for the catalog lists what its subject may pull,
    // but reads no repository: it carries no pull of one.
    let r = send(
        http.get(format!(
            "{base}/auth/token?service=berth&scope=registry:catalog:*"
        ))
        .header("authorization", basic(BOB)),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.describe());
    let catalog_token = r.json()["token"].as_str().unwrap().to_string();
    let bearer = |path: &str| {
        send(
            http.get(format!("{base}{path}"))
                .header("authorization", format!("Bearer {catalog_token}")),
        )
    };
    let list = bearer("/ui/repositories").await;
    assert!(list.text().contains("team/app"), "{}", list.text());
    let r = bearer("/ui/repositories/team/app").await;
    assert_eq!(r.status, 403, "{}", r.describe());

    // Sign-ins are throttled per principal: a script cannot fill the store.
    let mut statuses = Vec::new();
    for _ in 0..12 {
        statuses.push(sign_in_http(&http, &base, ROOT).await.err().unwrap_or(303));
    }
    assert!(
        statuses[..10].iter().all(|s| *s == 303) && statuses[10..].contains(&429),
        "{statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_repository_list_pages_through_everything_once() {
    let reg = Registry::start().await;
    let image = Image::oci(fresh_seed(), 1, 100);
    let mut all = Vec::new();
    for i in 0..120 {
        let name = format!("{}/r{i:03}", if i % 2 == 0 { "even" } else { "odd" });
        image.push(&reg, &name, Some("1")).await;
        all.push(name);
    }
    all.sort();
    let names_on = |html: &str| -> Vec<String> {
        html.split("<a href=\"/ui/repositories/")
            .skip(1)
            .map(|rest| rest.split('"').next().unwrap().to_string())
            .collect()
    };
    let next_on = |html: &str| -> Option<String> {
        let at = html.find("id=\"next-page\" href=\"")?;
        let rest = &html[at + "id=\"next-page\" href=\"".len()..];
        Some(rest.split('"').next().unwrap().replace("&amp;", "&"))
    };
    // Every page in turn: each name once, in order, 50 a page.
    for (query, expected) in [
        ("/ui/repositories".to_string(), all.clone()),
        (
            "/ui/repositories?q=odd".to_string(),
            all.iter()
                .filter(|n| n.starts_with("odd/"))
                .cloned()
                .collect::<Vec<_>>(),
        ),
    ] {
        let mut seen = Vec::new();
        let mut next = Some(query);
        let mut pages = 0;
        while let Some(path) = next {
            let page = reg.get(&path).await;
            assert_eq!(page.status, 200, "{}", page.describe());
            let names = names_on(&page.text());
            assert!(names.len() <= 50, "{path}: {}", names.len());
            seen.extend(names);
            next = next_on(&page.text());
            pages += 1;
            assert!(pages < 10, "the pages end");
        }
        assert_eq!(seen, expected);
        assert_eq!(pages, expected.len().div_ceil(50));
    }
}
