//! The etcd engine's tests: range arithmetic, and (against real etcd
//! servers the tests start) the engine suite, TLS, and reads without a
//! quorum.

mod ranges {
    use super::super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"abc"), b"abd");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}

/// Tests against real etcd servers, started on loopback and killed on drop.
mod etcd_tests {
    use std::net::TcpListener;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use super::super::*;
    use crate::Txn;

    struct Member {
        name: String,
        client_url: String,
        peer_url: String,
        child: Option<Child>,
    }

    /// An etcd cluster of one or more members.
    struct Cluster {
        members: Vec<Member>,
        initial_cluster: String,
        dir: tempfile::TempDir,
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port")
    }

    impl Cluster {
        /// `size` members, ready to serve; `None` (test skipped) when etcd is
        /// not installed and `BERTH_REQUIRE_ETCD` is unset.
        async fn start(size: usize) -> Option<Cluster> {
            if Command::new("etcd").arg("--version").output().is_err() {
                assert!(
                    std::env::var_os("BERTH_REQUIRE_ETCD").is_none(),
                    "etcd is not installed but BERTH_REQUIRE_ETCD is set"
                );
                eprintln!(
                    "SKIPPED: etcd is not installed (set BERTH_REQUIRE_ETCD to fail instead)"
                );
                return None;
            }
            let members: Vec<Member> = (0..size)
                .map(|i| Member {
                    name: format!("m{i}"),
                    client_url: format!("http://127.0.0.1:{}", free_port()),
                    peer_url: format!("http://127.0.0.1:{}", free_port()),
                    child: None,
                })
                .collect();
            let initial_cluster = members
                .iter()
                .map(|m| format!("{}={}", m.name, m.peer_url))
                .collect::<Vec<_>>()
                .join(",");
            let mut cluster = Cluster {
                members,
                initial_cluster,
                dir: tempfile::tempdir().expect("temp dir"),
            };
            for i in 0..size {
                cluster.start_member(i);
            }
            let probe = EtcdMetaStore::connect(cluster.options("/probe/"))
                .await
                .ok()?;
            eventually(Duration::from_secs(30), || probe.check_health()).await;
            Some(cluster)
        }

        fn start_member(&mut self, i: usize) {
            let m = &mut self.members[i];
            let child = Command::new("etcd")
                .args(["--name", &m.name, "--data-dir"])
                .arg(self.dir.path().join(&m.name))
                .args(["--listen-client-urls", &m.client_url])
                .args(["--advertise-client-urls", &m.client_url])
                .args(["--listen-peer-urls", &m.peer_url])
                .args(["--initial-advertise-peer-urls", &m.peer_url])
                .args(["--initial-cluster", &self.initial_cluster])
                .args(["--heartbeat-interval", "100", "--election-timeout", "500"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn etcd");
            m.child = Some(child);
        }

        fn kill_member(&mut self, i: usize) {
            if let Some(mut child) = self.members[i].child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }

        fn options(&self, prefix: &str) -> EtcdOptions {
            let endpoints = self.members.iter().map(|m| m.client_url.clone()).collect();
            EtcdOptions::new(endpoints, prefix)
        }
    }

    impl Drop for Cluster {
        fn drop(&mut self) {
            for i in 0..self.members.len() {
                self.kill_member(i);
            }
        }
    }

    /// Runs `f` until it succeeds or `limit` passes.
    async fn eventually<T, F, Fut>(limit: Duration, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let deadline = Instant::now() + limit;
        loop {
            match f().await {
                Ok(v) => return v,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "did not succeed in {limit:?}: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    #[tokio::test]
    async fn passes_the_metastore_suite() {
        let Some(etcd) = Cluster::start(1).await else {
            return;
        };
        let store = EtcdMetaStore::connect(etcd.options("/berth/suite/"))
            .await
            .unwrap();
        crate::testsuite::metastore_suite(&store).await;
    }

    /// The change feed of a cluster is woken by this watch: a write by
    /// another node (another client) must reach it, a write of another key
    /// or under another prefix must not.
    #[tokio::test]
    async fn a_watch_sees_writes_of_its_key_by_other_clients_only() {
        use futures_util::StreamExt as _;
        let Some(etcd) = Cluster::start(1).await else {
            return;
        };
        let watcher = EtcdMetaStore::connect(etcd.options("/berth/w/"))
            .await
            .unwrap();
        let writer = EtcdMetaStore::connect(etcd.options("/berth/w/"))
            .await
            .unwrap();
        let other = EtcdMetaStore::connect(etcd.options("/berth/x/"))
            .await
            .unwrap();
        let mut watch = watcher.watch_key(b"head").await.unwrap().unwrap();
        // The watch's creation is announced first.
        let created = tokio::time::timeout(Duration::from_secs(5), watch.next()).await;
        assert!(matches!(created, Ok(Some(Ok(())))), "{created:?}");
        assert!(other.commit(Txn::new().put("head", "x")).await.unwrap());
        assert!(writer.commit(Txn::new().put("other", "1")).await.unwrap());
        let quiet = tokio::time::timeout(Duration::from_millis(500), watch.next()).await;
        assert!(quiet.is_err(), "woken by another key or prefix: {quiet:?}");
        assert!(writer.commit(Txn::new().put("head", "1")).await.unwrap());
        let seen = tokio::time::timeout(Duration::from_secs(5), watch.next()).await;
        assert!(matches!(seen, Ok(Some(Ok(())))), "{seen:?}");
    }

    #[tokio::test]
    async fn prefixes_isolate_registries_sharing_one_etcd() {
        let Some(etcd) = Cluster::start(1).await else {
            return;
        };
        let a = EtcdMetaStore::connect(etcd.options("/berth/a/"))
            .await
            .unwrap();
        let b = EtcdMetaStore::connect(etcd.options("/berth/b/"))
            .await
            .unwrap();
        assert!(a.commit(Txn::new().put("k", "from a")).await.unwrap());
        assert!(b.get(b"k").await.unwrap().is_none());
        assert!(
            b.commit(Txn::new().require_absent("k").put("k", "from b"))
                .await
                .unwrap()
        );
        assert_eq!(a.get(b"k").await.unwrap().unwrap().value, b"from a");
        let all_of_a = a.scan(b"", None, 100).await.unwrap();
        assert_eq!(all_of_a.len(), 1);
        assert_eq!(all_of_a[0].key, b"k");
    }

    #[tokio::test]
    async fn an_unreachable_etcd_fails_fast_as_unavailable() {
        let Some(mut etcd) = Cluster::start(1).await else {
            return;
        };
        let store = EtcdMetaStore::connect(etcd.options("/berth/down/"))
            .await
            .unwrap();
        assert!(store.commit(Txn::new().put("k", "v")).await.unwrap());
        etcd.kill_member(0);
        // Bounded only to catch a hang; the client's own timeout is 3 s.
        let outcome = tokio::time::timeout(
            Duration::from_secs(30),
            store.commit(Txn::new().put("k", "w")),
        )
        .await
        .expect("a write to a dead etcd must not hang");
        assert!(
            matches!(outcome, Err(StoreError::Unavailable(_))),
            "{outcome:?}"
        );
        assert!(matches!(
            store.check_health().await,
            Err(StoreError::Unavailable(_))
        ));
        // And so do reads, once no member is left to serve them.
        assert!(matches!(
            store.get(b"k").await,
            Err(StoreError::Unavailable(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_survive_the_loss_of_quorum_and_writes_resume_with_it() {
        let Some(mut cluster) = Cluster::start(3).await else {
            return;
        };
        let store = EtcdMetaStore::connect(cluster.options("/berth/quorum/"))
            .await
            .unwrap();
        assert!(store.commit(Txn::new().put("tag/a", "v1")).await.unwrap());
        assert!(store.commit(Txn::new().put("tag/b", "v2")).await.unwrap());

        // Two of three members die: no quorum.
        cluster.kill_member(1);
        cluster.kill_member(2);

        // Reads go on, served by the survivor.
        for _ in 0..5 {
            let kv = tokio::time::timeout(Duration::from_secs(10), store.get(b"tag/a"))
                .await
                .expect("a read without quorum must not hang")
                .expect("a read without quorum must be served");
            assert_eq!(kv.unwrap().value, b"v1");
            let all = store
                .scan(b"tag/", None, 10)
                .await
                .expect("scan without quorum");
            assert_eq!(all.len(), 2);
        }
        // Writes fail, fast and retryably; readiness reports the lost quorum.
        let write = tokio::time::timeout(
            Duration::from_secs(30),
            store.commit(Txn::new().put("tag/a", "v3")),
        )
        .await
        .expect("a write without quorum must not hang");
        assert!(
            matches!(write, Err(StoreError::Unavailable(_))),
            "{write:?}"
        );
        assert!(store.check_health().await.is_err());

        // One member returns: quorum is back, and so are writes, untouched.
        cluster.start_member(1);
        eventually(Duration::from_secs(60), || {
            store.commit(Txn::new().put("tag/a", "v3"))
        })
        .await;
        eventually(Duration::from_secs(30), || store.check_health()).await;
        assert_eq!(store.get(b"tag/a").await.unwrap().unwrap().value, b"v3");
    }

    /// Runs `openssl` with `args` in `dir`.
    fn openssl(dir: &std::path::Path, args: &[&str]) {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A CA, a server certificate for 127.0.0.1 and a client certificate.
    fn make_certificates(dir: &std::path::Path) {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-subj",
                "/CN=berth-test-ca",
            ],
        );
        for (name, cn, ext) in [
            (
                "server",
                "127.0.0.1",
                "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
            ),
            ("client", "berth-client", "extendedKeyUsage=clientAuth\n"),
        ] {
            std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
            openssl(
                dir,
                &[
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                    "-subj",
                    &format!("/CN={cn}"),
                ],
            );
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-out",
                    &format!("{name}.pem"),
                    "-extfile",
                    &format!("{name}.ext"),
                ],
            );
        }
    }

    /// etcd over TLS with client certificates and password authentication:
    /// the options that `--etcd-ca-file`, `--etcd-cert-file`,
    /// `--etcd-key-file`, `--etcd-user` and `--etcd-password` set.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_with_client_certificates_and_password_authentication() {
        let Some(plain) = Cluster::start(1).await else {
            return;
        };
        drop(plain);
        let dir = tempfile::tempdir().unwrap();
        make_certificates(dir.path());
        let client_port = free_port();
        let peer = format!("http://127.0.0.1:{}", free_port());
        let endpoint = format!("https://127.0.0.1:{client_port}");
        let mut etcd = Command::new("etcd")
            .current_dir(dir.path())
            .args(["--name", "tls", "--data-dir", "data"])
            .args([
                "--listen-client-urls",
                &endpoint,
                "--advertise-client-urls",
                &endpoint,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("tls={peer}")])
            .args(["--cert-file", "server.pem", "--key-file", "server.key"])
            .args(["--trusted-ca-file", "ca.pem", "--client-cert-auth"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn etcd");
        let read = |f: &str| std::fs::read(dir.path().join(f)).unwrap();
        let tls = EtcdTls {
            ca_pem: read("ca.pem"),
            client: Some((read("client.pem"), read("client.key"))),
        };
        let mut options = EtcdOptions::new(vec![endpoint.clone()], "/tls/");
        options.tls = Some(tls.clone());

        // Enable authentication with a root user, over TLS.
        let admin = eventually(Duration::from_secs(30), || {
            let options = options.clone();
            async move {
                let store = EtcdMetaStore::connect(options).await?;
                store.check_health().await?;
                Ok(store)
            }
        })
        .await;
        let mut client = admin.client.clone();
        client.user_add("root", "s3cret", None).await.unwrap();
        client.user_grant_role("root", "root").await.unwrap();
        client.auth_enable().await.unwrap();

        // With the password, everything works.
        let mut authed = options.clone();
        authed.user = Some(("root".into(), "s3cret".into()));
        let store = eventually(Duration::from_secs(10), || {
            let authed = authed.clone();
            async move {
                let store = EtcdMetaStore::connect(authed).await?;
                store.check_health().await?;
                Ok(store)
            }
        })
        .await;
        crate::testsuite::metastore_suite(&store).await;

        // A wrong password, no client certificate, or plain HTTP: refused.
        let mut wrong = options.clone();
        wrong.user = Some(("root".into(), "wrong".into()));
        let refused = match EtcdMetaStore::connect(wrong).await {
            Ok(store) => store.check_health().await.is_err(),
            Err(_) => true,
        };
        assert!(refused, "a wrong password must be refused");
        let mut no_cert = authed.clone();
        no_cert.tls = Some(EtcdTls {
            ca_pem: tls.ca_pem.clone(),
            client: None,
        });
        let refused = match EtcdMetaStore::connect(no_cert).await {
            Ok(store) => store.check_health().await.is_err(),
            Err(_) => true,
        };
        assert!(refused, "a client without a certificate must be refused");
        let mut plain_http = authed.clone();
        plain_http.tls = None;
        plain_http.endpoints = vec![format!("http://127.0.0.1:{client_port}")];
        plain_http.request_timeout = Duration::from_secs(1);
        plain_http.connect_timeout = Duration::from_secs(1);
        let refused = match EtcdMetaStore::connect(plain_http).await {
            Ok(store) => store.check_health().await.is_err(),
            Err(_) => true,
        };
        assert!(refused, "plain HTTP to a TLS member must fail");
        let _ = etcd.kill();
        let _ = etcd.wait();
    }
}
