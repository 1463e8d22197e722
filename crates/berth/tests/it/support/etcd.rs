//! A single-member etcd of a test's own, for tests that need a second
//! metadata engine whatever the pass.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{eventually, free_port};

/// A single-member etcd of the test's own.
pub struct Etcd {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn start_etcd() -> Option<Etcd> {
    if Command::new("etcd").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("BERTH_REQUIRE_ETCD").is_none(),
            "etcd is not installed but BERTH_REQUIRE_ETCD is set"
        );
        eprintln!("SKIPPED: etcd is not installed");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let (port, peer) = (free_port(), free_port());
    let child = Command::new("etcd")
        .arg("--name=auth")
        .arg(format!("--data-dir={}", dir.path().join("etcd").display()))
        .arg(format!("--listen-client-urls=http://127.0.0.1:{port}"))
        .arg(format!("--advertise-client-urls=http://127.0.0.1:{port}"))
        .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
        .arg(format!(
            "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
        ))
        .arg(format!("--initial-cluster=auth=http://127.0.0.1:{peer}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let etcd = Etcd {
        child,
        port,
        _dir: dir,
    };
    let health = format!("http://127.0.0.1:{port}/health");
    assert!(
        eventually(Duration::from_secs(20), || async {
            reqwest::get(&health)
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await,
        "etcd did not start"
    );
    Some(etcd)
}
