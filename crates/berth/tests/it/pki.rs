//! Test certificates and password files, made with the real tools: a CA,
//! server certificates for 127.0.0.1 and client certificates from
//! `openssl`, bcrypt htpasswd files from Apache's `htpasswd -B`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and what it signs, in a directory.
pub struct Pki {
    dir: PathBuf,
    _keep: Option<tempfile::TempDir>,
}

/// A certificate and its key.
#[derive(Clone, Debug)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertPair {
    /// Certificate and key in one PEM (what reqwest's Identity reads).
    pub fn identity_pem(&self) -> Vec<u8> {
        let mut pem = std::fs::read(&self.key).unwrap();
        pem.push(b'\n');
        pem.extend(std::fs::read(&self.cert).unwrap());
        pem
    }
}

impl Pki {
    /// A new CA in `dir`.
    pub fn new(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        run(Command::new("openssl").current_dir(dir).args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "3",
            "-subj",
            "/CN=Berth test CA",
        ]));
        Pki {
            dir: dir.to_path_buf(),
            _keep: None,
        }
    }

    /// One CA for the whole test process (the secure pass).
    pub fn shared() -> &'static Pki {
        static PKI: OnceLock<Pki> = OnceLock::new();
        PKI.get_or_init(|| {
            let keep = tempfile::Builder::new()
                .prefix("berth-it-pki-")
                .tempdir()
                .unwrap();
            let mut pki = Pki::new(keep.path());
            pki._keep = Some(keep);
            pki
        })
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A certificate signed by this CA, named `name` in the directory:
    /// for a server at 127.0.0.1 and localhost when `server`, else a
    /// client certificate with subject `CN=cn`.
    pub fn issue(&self, name: &str, cn: &str, server: bool) -> CertPair {
        let (key, csr, cert, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        run(Command::new("openssl").current_dir(&self.dir).args([
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={cn}"),
        ]));
        let extensions = if server {
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
        } else {
            "extendedKeyUsage=clientAuth\n"
        };
        std::fs::write(self.dir.join(&ext), extensions).unwrap();
        run(Command::new("openssl").current_dir(&self.dir).args([
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "2",
            "-extfile",
            &ext,
        ]));
        CertPair {
            cert: self.dir.join(cert),
            key: self.dir.join(key),
        }
    }

    /// The serial number of a certificate (to tell which one a server sent).
    pub fn serial(cert: &Path) -> String {
        let out = Command::new("openssl")
            .args(["x509", "-noout", "-serial", "-in"])
            .arg(cert)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .trim_start_matches("serial=")
            .to_string()
    }
}

/// The shared CA's server certificate for 127.0.0.1.
pub fn shared_server() -> CertPair {
    static SERVER: OnceLock<CertPair> = OnceLock::new();
    SERVER
        .get_or_init(|| Pki::shared().issue("server", "127.0.0.1", true))
        .clone()
}

/// The serial of the certificate a TLS server at 127.0.0.1:port presents,
/// from `openssl s_client` (a new connection).
pub fn served_serial(port: u16, ca: &Path) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} -CAfile {} </dev/null 2>/dev/null | openssl x509 -noout -serial",
            ca.display()
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("serial=")
        .to_string()
}

/// Whether the tools are here (`scripts/test` installs them).
pub fn tools_available() -> bool {
    let ok = |c: &str, a: &str| {
        Command::new(c)
            .arg(a)
            .output()
            .is_ok_and(|o| o.status.success() || !o.stdout.is_empty() || !o.stderr.is_empty())
    };
    let found = ok("openssl", "version") && ok("htpasswd", "-nbB");
    if !found && std::env::var_os("BERTH_REQUIRE_SECURITY").is_some() {
        panic!("openssl and htpasswd (apache2-utils) are required (BERTH_REQUIRE_SECURITY is set)");
    }
    found
}

/// Writes an htpasswd file with bcrypt entries made by `htpasswd -B`.
pub fn htpasswd(path: &Path, users: &[(&str, &str)]) {
    let mut text = String::new();
    for (user, password) in users {
        let out = Command::new("htpasswd")
            .args(["-nbB", "-C", "5", user, password])
            .output()
            .expect("htpasswd (apache2-utils)");
        assert!(out.status.success(), "htpasswd failed");
        text.push_str(String::from_utf8_lossy(&out.stdout).trim());
        text.push('\n');
    }
    // Replaced in one rename, as editors and configuration tools do.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
