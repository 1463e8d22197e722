//! The operator's console: in a real browser (Debian's headless Chromium,
//! driven over WebDriver, against a real `berth` with TLS, htpasswd users
//! and the test policy, a peer region, and a pull-through cache in front
//! of Debian's Distribution; every page is screenshotted into
//! `target/tmp/ui-screenshots/`, kept as the run's artifact and shown in
//! docs/ui.md), and without one: sessions and what ends them, the console
//! of an open registry, the refusals every action owes, and paging.

mod access;
mod in_browser;

use std::path::PathBuf;

use crate::pki::{self, Pki};
use crate::security::{ALICE, BOB, POLICY, ROOT, basic, client_with};
use crate::support::*;
use crate::upstream::Distribution;

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
pub(crate) async fn sign_in(browser: &Browser, base: &str, who: (&str, &str)) {
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

pub(crate) async fn peer_paused(eu: &Registry) -> bool {
    let status = eu.get("/berth/v1/replication/status").await;
    assert_eq!(status.status, 200, "{}", status.describe());
    status.json()["peers"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["peer"] == "us"))
        .map(|p| p["paused"] == true)
        .unwrap_or_else(|| panic!("no peer us: {}", status.text()))
}

pub(crate) async fn sign_in_http(
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

/// The CSRF token a console page's forms carry.
pub(crate) fn csrf_of(html: &str) -> String {
    html.split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no form on the page: {html}"))
        .to_string()
}
