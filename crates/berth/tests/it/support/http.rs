//! Responses and the clients that fetch them; spec error bodies; query strings.

use super::*;

#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}); status {}, body: {}",
                self.status,
                truncate(&self.text(), 2000)
            )
        })
    }

    /// The `Content-Length` header value (works for HEAD responses too).
    pub fn content_length(&self) -> Option<u64> {
        self.header("content-length")
            .and_then(|v| v.trim().parse().ok())
    }

    pub fn digest_header(&self) -> Option<String> {
        self.header("docker-content-digest")
    }

    /// Error codes in a spec error body; panics if the body is not a spec error body.
    pub fn error_codes(&self) -> Vec<String> {
        check_error_body(self)
    }

    pub fn describe(&self) -> String {
        format!(
            "status {} headers {:?} body {}",
            self.status,
            self.headers,
            truncate(&self.text(), 2000)
        )
    }
}

pub fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        s.to_string()
    } else {
        let mut end = n;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…({} bytes)", &s[..end], s.len())
    }
}

/// Validates the spec error body format and returns the codes.
pub fn check_error_body(r: &Resp) -> Vec<String> {
    let v: Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("error response body is not JSON ({e}): {}", r.describe()));
    let errors = v
        .get("errors")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("error body has no `errors` array: {}", r.describe()));
    assert!(
        !errors.is_empty(),
        "error body has an empty `errors` array: {}",
        r.describe()
    );
    let mut codes = Vec::new();
    for e in errors {
        let code = e
            .get("code")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("error entry without string `code`: {}", r.describe()));
        assert!(
            !code.is_empty() && code.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
            "error code {code:?} is not uppercase letters and underscores: {}",
            r.describe()
        );
        // Berth's documented extensions (docs/operations.md), for situations
        // the spec's table has no code for; each only with its own status.
        let extension_ok = match code {
            "UNKNOWN" => r.status >= 500,
            "UNAVAILABLE" => r.status == 503,
            "RANGE_INVALID" => r.status == 416,
            _ => false,
        };
        assert!(
            SPEC_ERROR_CODES.contains(&code) || extension_ok,
            "error code {code:?} is not one of the spec's codes (nor an extension with its status): {}",
            r.describe()
        );
        if let Some(m) = e.get("message") {
            assert!(
                m.is_string(),
                "error `message` must be a string: {}",
                r.describe()
            );
        }
        codes.push(code.to_string());
    }
    codes
}

/// Asserts the status and that the body is a spec error whose first code is one of `codes`.
#[track_caller]
pub fn expect_error(r: &Resp, status: u16, codes: &[&str]) {
    assert_eq!(r.status, status, "unexpected status: {}", r.describe());
    let got = check_error_body(r);
    assert!(
        got.iter().any(|c| codes.contains(&c.as_str())),
        "expected error code in {codes:?}, got {got:?}: {}",
        r.describe()
    );
}

/// Asserts the response is not a server error; for 4xx with a body it must be a spec error body.
#[track_caller]
pub fn expect_no_5xx(r: &Resp, what: &str) {
    assert!(r.status < 500, "{what}: server error: {}", r.describe());
}

pub async fn send(rb: RequestBuilder) -> Resp {
    try_send(rb)
        .await
        .unwrap_or_else(|e| panic!("request failed: {e:?}"))
}

/// Like [`send`], but returns transport errors instead of panicking.
///
/// Idempotent requests without a body (GET/HEAD) are retried once on a transport error,
/// as HTTP clients do when a pooled keep-alive connection was closed by the server
/// (RFC 9112 section 9.3.1); this keeps such races from making tests flaky.
pub async fn try_send(rb: RequestBuilder) -> Result<Resp, reqwest::Error> {
    let retry = rb.try_clone().filter(|c| {
        c.try_clone()
            .and_then(|c| c.build().ok())
            .is_some_and(|r| matches!(*r.method(), Method::GET | Method::HEAD))
    });
    match try_send_once(rb).await {
        Err(e) if retry.is_some() => {
            eprintln!("retrying idempotent request after transport error: {e:?}");
            try_send_once(retry.unwrap()).await
        }
        other => other,
    }
}

pub async fn try_send_once(rb: RequestBuilder) -> Result<Resp, reqwest::Error> {
    let resp = rb.send().await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.bytes().await?;
    Ok(Resp {
        status,
        headers,
        body,
    })
}

/// What real clients send when fetching manifests: every manifest type berth stores.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json, */*";

pub(crate) fn client_builder() -> reqwest::ClientBuilder {
    client_builder_trusting(secure_pass())
}

/// A client builder that trusts the shared test CA when `trust_ca`.
pub fn client_builder_trusting(trust_ca: bool) -> reqwest::ClientBuilder {
    let mut headers = HeaderMap::new();
    headers.insert(
        reqwest::header::ACCEPT,
        reqwest::header::HeaderValue::from_static(MANIFEST_ACCEPT),
    );
    let builder = Client::builder()
        .default_headers(headers)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5));
    if trust_ca {
        let ca = fs::read(crate::pki::Pki::shared().ca()).unwrap();
        builder.tls_certs_merge(reqwest::Certificate::from_pem_bundle(&ca).unwrap())
    } else {
        builder
    }
}

/// A client without credentials (for upstreams, and anonymous requests).
pub fn new_client() -> Client {
    client_builder().build().expect("client")
}

/// A client for Berth: in the secure pass it trusts the test CA and signs
/// in as the pass's administrator.
pub fn berth_client() -> Client {
    let mut builder = client_builder();
    if secure_pass() {
        let mut headers = HeaderMap::new();
        headers.insert(
            reqwest::header::ACCEPT,
            reqwest::header::HeaderValue::from_static(MANIFEST_ACCEPT),
        );
        headers.insert(
            reqwest::header::AUTHORIZATION,
            reqwest::header::HeaderValue::from_str(&berth_auth::header::basic_header(
                SECURE_USER,
                SECURE_PASSWORD,
            ))
            .unwrap(),
        );
        builder = builder.default_headers(headers);
    }
    builder.build().expect("client")
}
