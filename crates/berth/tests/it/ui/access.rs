//! Without a browser: sessions and what ends them, what a token sees, an
//! open registry's console and the refusals it owes, paging.

use std::time::Duration;

use reqwest::Method;

use super::sign_in_http;
use crate::pki;
use crate::security::{ALICE, BOB, ROOT, basic};
use crate::support::*;

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
    let token = super::csrf_of(&logout_page.text());
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
