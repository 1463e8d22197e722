//! Berth's own TLS: protocol versions and HTTP/2 by ALPN, certificate
//! rotation while clients keep pulling, refusal of a bad new certificate,
//! and client certificates (mTLS) as identities.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;

use crate::pki::{self, CertPair, Pki};
use crate::security::{ALICE, POLICY, basic, client_with};
use crate::support::*;

fn curl(args: &[&str]) -> (bool, String) {
    let out = Command::new("curl").args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn openssl_connects(port: u16, version_flag: &str) -> bool {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} {version_flag} -CAfile {} -verify_return_error </dev/null",
            Pki::shared().ca().display()
        ))
        .output()
        .unwrap();
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("BEGIN CERTIFICATE")
}

#[tokio::test]
async fn https_speaks_http2_by_alpn_and_only_tls_1_2_and_up() {
    if !pki::tools_available() {
        return;
    }
    let reg = Registry::start_with(Options::new().tls()).await;
    let ca = Pki::shared().ca().display().to_string();
    let url = format!("{}/v2/", reg.url());
    let (ok, version) = curl(&[
        "-sS",
        "--cacert",
        &ca,
        "--http2",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version}",
        &url,
    ]);
    assert!(ok);
    assert_eq!(version, "2", "HTTP/2 negotiated by ALPN");
    let (ok, version) = curl(&[
        "-sS",
        "--cacert",
        &ca,
        "--http1.1",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version}",
        &url,
    ]);
    assert!(ok);
    assert_eq!(version, "1.1");
    assert!(openssl_connects(reg.port(), "-tls1_3"));
    assert!(openssl_connects(reg.port(), "-tls1_2"));
    assert!(
        !openssl_connects(reg.port(), "-tls1_1"),
        "TLS 1.1 must be refused"
    );
    // Plain HTTP to the TLS port gets nothing served.
    let r = raw_request_to(
        &reg.host_port(),
        false,
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_ne!(r.status, 200);
}

/// Replaces a certificate and key the way certbot and cert-manager do: new
/// files renamed into place, the key first.
fn install(pair: &CertPair, dir: &Path) {
    for (from, name) in [(&pair.key, "tls.key"), (&pair.cert, "tls.crt")] {
        let tmp = dir.join(format!(".{name}.new"));
        std::fs::copy(from, &tmp).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
}

#[tokio::test]
async fn certificates_rotate_under_load_and_a_bad_one_is_refused() {
    if !pki::tools_available() {
        return;
    }
    let pki = Pki::shared();
    let dir = tempfile::tempdir().unwrap();
    let first = pki.issue(&format!("rot-a-{}", fresh_seed()), "127.0.0.1", true);
    let second = pki.issue(&format!("rot-b-{}", fresh_seed()), "127.0.0.1", true);
    install(&first, dir.path());
    let reg = Registry::start_with(
        Options::new().tls_files(&dir.path().join("tls.crt"), &dir.path().join("tls.key")),
    )
    .await;
    let port = reg.port();
    assert_eq!(
        pki::served_serial(port, &pki.ca()),
        Pki::serial(&first.cert)
    );
    let big = random_bytes(fresh_seed(), 8 << 20);
    let digest = reg.push_blob("tls/app", &big).await;
    let url = format!("{}/v2/tls/app/blobs/{digest}", reg.url());

    // Clients pulling all along: one on a kept-alive connection, one with a
    // new connection (and so a new handshake) each time.
    let stop = Arc::new(AtomicBool::new(false));
    let (pulls, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut pullers = Vec::new();
    for fresh_connections in [false, true] {
        let (stop, pulls, failures, url, big) = (
            stop.clone(),
            pulls.clone(),
            failures.clone(),
            url.clone(),
            big.clone(),
        );
        pullers.push(tokio::spawn(async move {
            let mut client = client_builder_trusting(true).build().unwrap();
            while !stop.load(Ordering::Relaxed) {
                if fresh_connections {
                    client = client_builder_trusting(true)
                        .pool_max_idle_per_host(0)
                        .build()
                        .unwrap();
                }
                let ok = match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => r.bytes().await.is_ok_and(|b| b == big),
                    _ => false,
                };
                pulls.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // A slow download that spans the rotation: its connection must stay.
    let slow = {
        let url = url.clone();
        tokio::spawn(async move {
            let client = client_builder_trusting(true).build().unwrap();
            let response = client.get(&url).send().await.unwrap();
            let mut stream = response.bytes_stream();
            let mut got = Vec::new();
            while let Some(chunk) = stream.next().await {
                got.extend_from_slice(&chunk.unwrap());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            got
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    install(&second, dir.path());
    let rotated = eventually(Duration::from_secs(15), || async {
        pki::served_serial(port, &pki.ca()) == Pki::serial(&second.cert)
    })
    .await;
    assert!(rotated, "the new certificate is served without a restart");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A broken certificate: refused, the one in use stays.
    std::fs::write(
        dir.path().join("tls.crt"),
        "-----BEGIN CERTIFICATE-----\nnot one\n",
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(15), || async {
            reg.log().contains("new TLS files refused")
        })
        .await,
        "{}",
        reg.log_tail(20)
    );
    assert_eq!(
        pki::served_serial(port, &pki.ca()),
        Pki::serial(&second.cert)
    );
    // A key that does not match the certificate: refused too.
    std::fs::copy(&second.cert, dir.path().join("tls.crt")).unwrap();
    std::fs::copy(&first.key, dir.path().join("tls.key")).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        pki::served_serial(port, &pki.ca()),
        Pki::serial(&second.cert)
    );
    stop.store(true, Ordering::Relaxed);
    for p in pullers {
        p.await.unwrap();
    }
    let downloaded = slow.await.unwrap();
    assert!(
        downloaded == big,
        "the download spanning the rotation completed intact"
    );
    let (pulls, failures) = (
        pulls.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed),
    );
    eprintln!("{pulls} pulls of 8 MiB during rotation, {failures} failed");
    assert!(pulls > 4, "{pulls}");
    assert_eq!(failures, 0, "no pull failed while certificates rotated");
    let metrics = reg.get("/metrics").await.text();
    assert!(metrics.contains("berth_tls_reloads_total 1"), "{metrics}");
    assert!(
        !metrics.contains("berth_tls_reload_failures_total 0"),
        "{metrics}"
    );
}

#[tokio::test]
async fn client_certificates_are_identities() {
    if !pki::tools_available() {
        return;
    }
    let pki = Pki::shared();
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    pki::htpasswd(&htpasswd, &[ALICE]);
    let config = dir.path().join("berth.toml");
    std::fs::write(
        &config,
        format!(
            "{POLICY}\n[[access]]\nrepositories = [\"team/*\"]\nusers = [\"ci-bot\"]\nactions = [\"pull\", \"push\"]\n"
        ),
    )
    .unwrap();
    let bot = pki.issue(&format!("ci-bot-{}", fresh_seed()), "ci-bot", false);
    let stranger = pki.issue(&format!("stranger-{}", fresh_seed()), "stranger", false);
    let with_cert = |pair: &CertPair| {
        client_builder_trusting(true)
            .identity(reqwest::Identity::from_pem(&pair.identity_pem()).unwrap())
            .build()
            .unwrap()
    };
    let base = Options::new()
        .tls()
        .flag("--tls-client-ca", pki.ca().display())
        .flag("--htpasswd", htpasswd.display())
        .flag("--config", config.display());
    let mut reg = Registry::start_with(base.clone()).await;
    // The certificate is the credential.
    reg.set_client(with_cert(&bot));
    let image = Image::oci(fresh_seed(), 1, 1000);
    image.push(&reg, "team/app", Some("1")).await;
    let r = send(with_cert(&stranger).get(format!("{}/v2/team/app/tags/list", reg.url()))).await;
    expect_error(&r, 403, &["DENIED"]);
    let r = send(client_with(None).get(format!("{}/v2/team/app/tags/list", reg.url()))).await;
    assert_eq!(
        r.status, 401,
        "optional: without a certificate, sign in otherwise"
    );
    let r =
        send(client_with(Some(&basic(ALICE))).get(format!("{}/v2/team/app/tags/list", reg.url())))
            .await;
    assert_eq!(r.status, 200);
    drop(reg);

    // Required: no certificate, no connection.
    let required = Registry::start_with(
        base.flag("--tls-client-auth", "required")
            .client_identity(bot.identity_pem()),
    )
    .await;
    let refused = client_with(Some(&basic(ALICE)))
        .get(format!("{}/v2/", required.url()))
        .send()
        .await;
    assert!(
        refused.is_err(),
        "a client without a certificate is refused: {refused:?}"
    );
    let r = send(with_cert(&bot).get(format!("{}/v2/team/app/tags/list", required.url()))).await;
    assert_eq!(
        r.status, 404,
        "signed in by certificate (nothing pushed here yet)"
    );
}
