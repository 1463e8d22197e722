//! Raw HTTP, for requests reqwest would normalize or refuse to send.

use super::*;

#[derive(Debug)]
pub struct RawResp {
    /// 0 when no status line could be read (connection closed/reset first).
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResp {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            if k.trim().eq_ignore_ascii_case(name) {
                Some(v.trim().to_string())
            } else {
                None
            }
        })
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn as_resp(&self) -> Resp {
        let mut headers = HeaderMap::new();
        for l in self.head.lines().skip(1) {
            if let Some((k, v)) = l.split_once(':')
                && let (Ok(k), Ok(v)) = (
                    reqwest::header::HeaderName::from_bytes(k.trim().as_bytes()),
                    reqwest::header::HeaderValue::from_str(v.trim()),
                )
            {
                headers.append(k, v);
            }
        }
        let chunked = self
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let body = if chunked {
            dechunk(&self.body)
        } else {
            self.body.clone()
        };
        Resp {
            status: self.status,
            headers,
            body: Bytes::from(body),
        }
    }
}

pub(crate) fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(pos) = data.windows(2).position(|w| w == b"\r\n") {
        let line = String::from_utf8_lossy(&data[..pos]);
        let size_str = line.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_str, 16) else {
            break;
        };
        data = &data[pos + 2..];
        if size == 0 || data.len() < size {
            out.extend_from_slice(&data[..size.min(data.len())]);
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
    out
}

pub trait RawStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> RawStream for T {}
pub type RawConn = Box<dyn RawStream>;

/// A connection for raw requests: plain TCP, or TLS to the shared test CA's
/// certificate (HTTP/1.1).
pub async fn raw_connect(addr: &str, tls: bool) -> RawConn {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    if !tls {
        return Box::new(tcp);
    }
    let mut roots = rustls::RootCertStore::empty();
    let ca = fs::read(crate::pki::Pki::shared().ca()).unwrap();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    Box::new(connector.connect(name, tcp).await.expect("TLS handshake"))
}

/// In the secure pass, the pass's credentials go after the request line.
pub fn with_credentials(request: &[u8]) -> Vec<u8> {
    if !secure_pass() {
        return request.to_vec();
    }
    match request.windows(2).position(|w| w == b"\r\n") {
        Some(i) => {
            let header = format!(
                "Authorization: {}\r\n",
                berth_auth::header::basic_header(SECURE_USER, SECURE_PASSWORD)
            );
            let mut out = request[..i + 2].to_vec();
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(&request[i + 2..]);
            out
        }
        None => request.to_vec(),
    }
}

pub async fn raw_request(addr: &str, request: &[u8], timeout: Duration) -> RawResp {
    raw_request_to(addr, secure_pass(), request, timeout).await
}

pub async fn raw_request_to(addr: &str, tls: bool, request: &[u8], timeout: Duration) -> RawResp {
    let fut = async {
        let mut s = raw_connect(addr, tls).await;
        s.write_all(&with_credentials(request))
            .await
            .expect("write raw request");
        let mut buf = Vec::new();
        let mut tmp = [0u8; 16384];
        loop {
            match s.read(&mut tmp).await {
                Ok(0) => break,
                Ok(n) => {
                    buf.extend_from_slice(&tmp[..n]);
                    // Stop once a complete response with Content-Length has arrived.
                    if let Some(end) = find_head_end(&buf) {
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        if let Some(cl) = head.lines().find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.trim()
                                .eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())
                                .flatten()
                        }) {
                            let is_head = request.starts_with(b"HEAD ");
                            if is_head || buf.len() >= end + 4 + cl {
                                break;
                            }
                        }
                    }
                }
                Err(_) => break,
            }
        }
        buf
    };
    let buf = match tokio::time::timeout(timeout, fut).await {
        Ok(b) => b,
        Err(_) => panic!(
            "raw request timed out after {timeout:?}: {}",
            truncate(&String::from_utf8_lossy(request), 300)
        ),
    };
    let Some(end) = find_head_end(&buf) else {
        return RawResp {
            status: 0,
            head: String::from_utf8_lossy(&buf).into_owned(),
            body: Vec::new(),
        };
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    RawResp {
        status,
        head,
        body: buf[end + 4..].to_vec(),
    }
}

pub(crate) fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}
