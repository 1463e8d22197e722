//! Signing in: failed-login throttling, htpasswd reload, and the default
//! that keeps an open registry on loopback.

use super::*;

#[tokio::test]
async fn guessing_passwords_is_throttled_per_address_and_user() {
    if !pki::tools_available() {
        return;
    }
    let s = Secured::start(Options::new()).await;
    let url = format!("{}/v2/", s.reg.url());
    let guess = |i: usize| client_with(Some(&basic((ALICE.0, &format!("guess-{i}")))));
    let mut statuses = Vec::new();
    for i in 0..12 {
        statuses.push(send(guess(i).get(&url)).await.status);
    }
    assert_eq!(&statuses[..10], &[401; 10], "{statuses:?}");
    assert_eq!(&statuses[10..], &[429, 429], "{statuses:?}");
    let r = send(guess(99).get(&url)).await;
    expect_error(&r, 429, &["TOOMANYREQUESTS"]);
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=7).contains(&retry), "{retry}");
    assert!(
        r.text().contains(&format!("retry in {retry} s")),
        "the message and Retry-After agree: {}",
        r.text()
    );
    // Retrying one wrong password is no new guess: still a plain 401 (as
    // containerd, which retries a refused password several times, shows).
    let r = send(guess(0).get(&url)).await;
    expect_error(&r, 401, &["UNAUTHORIZED"]);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guesses_sent_all_at_once_are_held_back_like_sequential_ones() {
    if !pki::tools_available() {
        return;
    }
    let s = Secured::start(Options::new()).await;
    let url = format!("{}/v2/", s.reg.url());
    let guesses = (0..60).map(|i| {
        let client = client_with(Some(&basic((ALICE.0, &format!("burst-{i}")))));
        let url = url.clone();
        async move { send(client.get(url)).await.status }
    });
    let statuses: Vec<u16> = futures_util::future::join_all(guesses).await;
    let checked = statuses.iter().filter(|s| **s == 401).count();
    let held = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(checked + held, statuses.len(), "{statuses:?}");
    assert!(
        checked <= throttle_burst(),
        "at most the burst is checked: {statuses:?}"
    );
}

fn throttle_burst() -> usize {
    berth_auth::throttle::BURST as usize
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
