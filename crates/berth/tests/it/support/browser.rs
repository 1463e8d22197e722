//! Debian's headless Chromium driven through ChromeDriver's W3C WebDriver
//! protocol (plain HTTP and JSON, so no browser library is needed): go to
//! a page, find elements by CSS, click, type, read text, run a script and
//! take screenshots.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

/// The W3C key of an element reference in WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Whether Chromium and ChromeDriver are installed; with
/// `BERTH_REQUIRE_BROWSER` set (scripts/test sets it) their absence fails.
pub fn browser_available() -> bool {
    let found = ["chromium", "chromedriver"].iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !found && std::env::var_os("BERTH_REQUIRE_BROWSER").is_some() {
        panic!("chromium and chromedriver are not installed but BERTH_REQUIRE_BROWSER is set");
    }
    if !found {
        eprintln!("SKIPPED: chromium and chromedriver are not installed");
    }
    found
}

pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
    _profile: tempfile::TempDir,
    shots: PathBuf,
}

impl Browser {
    /// Starts ChromeDriver and a headless Chromium that accepts the test
    /// CA's certificates; screenshots go to `shots`.
    pub async fn start(shots: &Path) -> Browser {
        std::fs::create_dir_all(shots).unwrap();
        let port = super::free_port();
        let mut cmd = Command::new("chromedriver");
        cmd.arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        unsafe {
            use std::os::unix::process::CommandExt as _;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let driver = cmd.spawn().expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = http.get(format!("{base}/status")).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        // The flags that keep Chromium off the (closed) network and quiet.
        let args = vec![
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            "--window-size=1280,1000".into(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let r = http
            .post(format!("{base}/session"))
            .header("content-type", "application/json")
            .body(
                serde_json::to_vec(&json!({
                    "capabilities": { "alwaysMatch": {
                        "browserName": "chrome",
                        "acceptInsecureCerts": true,
                        "goog:chromeOptions": { "binary": "/usr/bin/chromium", "args": args },
                    } }
                }))
                .unwrap(),
            )
            .send()
            .await
            .expect("new WebDriver session");
        let body: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        let session = body["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {body}"))
            .to_string();
        Browser {
            driver,
            base,
            session,
            http,
            _profile: profile,
            shots: shots.to_path_buf(),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        match self.try_call(method, path, body).await {
            Ok(v) => v,
            Err(e) => panic!("WebDriver {path}: {e}"),
        }
    }

    /// A WebDriver command; its error (status and body) if it failed.
    async fn try_call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut rb = self.http.request(method, &url);
        if let Some(b) = body {
            rb = rb
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&b).unwrap());
        }
        let r = rb.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = r.status();
        let v: Value =
            serde_json::from_slice(&r.bytes().await.unwrap_or_default()).unwrap_or(Value::Null);
        if !status.is_success() {
            return Err(format!("{status} {v}"));
        }
        Ok(v["value"].clone())
    }

    pub async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    pub async fn url(&self) -> String {
        self.call(reqwest::Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The page's HTML as the browser has it now.
    pub async fn source(&self) -> String {
        self.call(reqwest::Method::GET, "/source", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The element `css` matches, if any.
    pub async fn try_find(&self, css: &str) -> Option<String> {
        let url = format!("{}/session/{}/element", self.base, self.session);
        let r = self
            .http
            .post(&url)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&json!({ "using": "css selector", "value": css })).unwrap())
            .send()
            .await
            .unwrap();
        if !r.status().is_success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        v["value"][ELEMENT].as_str().map(str::to_string)
    }

    pub async fn find(&self, css: &str) -> String {
        match self.try_find(css).await {
            Some(e) => e,
            None => panic!(
                "no element {css:?} on {}:\n{}",
                self.url().await,
                self.source().await
            ),
        }
    }

    /// The visible text of the element `css` matches.
    pub async fn text(&self, css: &str) -> String {
        let e = self.find(css).await;
        self.call(reqwest::Method::GET, &format!("/element/{e}/text"), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Clicks the element `css` matches. An element replaced between
    /// finding and clicking it (a live page refreshing) is found again.
    pub async fn click(&self, css: &str) {
        for attempt in 0.. {
            let e = self.find(css).await;
            match self
                .try_call(
                    reqwest::Method::POST,
                    &format!("/element/{e}/click"),
                    Some(json!({})),
                )
                .await
            {
                Ok(_) => return,
                Err(err) if err.contains("stale element") && attempt < 5 => continue,
                Err(err) => panic!("clicking {css}: {err}"),
            }
        }
    }

    async fn run(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
        .await
    }

    /// Clicks something that loads another page (a link, a form's button)
    /// and waits until the new page has loaded.
    pub async fn click_and_wait(&self, css: &str) {
        self.run("window.__berthOldPage = true; return true;").await;
        self.click(css).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let loaded = self
                .run("return window.__berthOldPage === undefined && document.readyState === 'complete';")
                .await;
            if loaded == Value::Bool(true) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "clicking {css} loaded no page (still on {})",
                self.url().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{e}/clear"),
            Some(json!({})),
        )
        .await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    /// Runs an async script; its callback's argument comes back.
    pub async fn run_async(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/async",
            Some(json!({ "script": script, "args": [] })),
        )
        .await
    }

    /// The value of cookie `name`, as the browser keeps it.
    pub async fn cookie(&self, name: &str) -> Option<Value> {
        let all = self.call(reqwest::Method::GET, "/cookie", None).await;
        all.as_array()?.iter().find(|c| c["name"] == name).cloned()
    }

    /// Saves a PNG of the whole page as `NAME.png`; returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        // The whole page, not just the window: through Chromium's own
        // protocol, which ChromeDriver passes on.
        let url = format!("{}/session/{}/goog/cdp/execute", self.base, self.session);
        let r = self
            .http
            .post(&url)
            .header("content-type", "application/json")
            .body(
                serde_json::to_vec(&json!({
                    "cmd": "Page.captureScreenshot",
                    "params": { "format": "png", "captureBeyondViewport": true }
                }))
                .unwrap(),
            )
            .send()
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        let data = match v["value"]["data"].as_str() {
            Some(d) => d.to_string(),
            None => self
                .call(reqwest::Method::GET, "/screenshot", None)
                .await
                .as_str()
                .unwrap_or_default()
                .to_string(),
        };
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .expect("a base64 PNG");
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }
}

impl Browser {
    /// Ends the session: Chromium exits, then the driver.
    pub async fn quit(self) {
        let url = format!("{}/session/{}", self.base, self.session);
        let _ = self.http.delete(&url).send().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Best effort: the session's browser goes with the driver.
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
