//! The spec's JSON error responses.

use axum::response::{IntoResponse, Response};
use berth_oci::ErrorCode;
use berth_proxy::{CacheError, FailureKind};
use berth_registry::RegistryError;
use berth_store::StoreError;
use http::{HeaderName, HeaderValue, StatusCode, header};

/// Marks a response caused by a storage failure, for the error metric.
#[derive(Clone, Copy)]
pub struct StorageFailure;

pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    detail: Option<serde_json::Value>,
    headers: Vec<(HeaderName, HeaderValue)>,
    storage_failure: bool,
}

impl ApiError {
    pub fn new(code: ErrorCode) -> Self {
        Self {
            status: StatusCode::from_u16(code.status()).unwrap_or(StatusCode::BAD_REQUEST),
            code: code.as_str(),
            message: code.default_message().to_string(),
            detail: None,
            headers: Vec::new(),
            storage_failure: false,
        }
    }

    pub fn message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    pub fn detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = Some(detail);
        self
    }

    pub fn status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn header(mut self, name: HeaderName, value: impl AsRef<str>) -> Self {
        if let Ok(v) = HeaderValue::from_str(value.as_ref()) {
            self.headers.push((name, v));
        }
        self
    }

    fn storage(e: &StoreError) -> Self {
        if let StoreError::Unavailable(why) = e {
            // Fail fast with a retryable answer: clients back off and retry.
            let mut err = ApiError::new(ErrorCode::Unavailable)
                .message(format!(
                    "the registry's storage is unavailable, retry later: {why}"
                ))
                .header(header::RETRY_AFTER, "1");
            err.storage_failure = true;
            return err;
        }
        let (status, message) = match e {
            StoreError::Io(io) if io.raw_os_error() == Some(28) => (
                StatusCode::INSUFFICIENT_STORAGE,
                "the registry's storage is full".to_string(),
            ),
            _ => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the registry could not access its storage".to_string(),
            ),
        };
        Self {
            status,
            code: "UNKNOWN",
            message,
            detail: None,
            headers: Vec::new(),
            storage_failure: true,
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match &e {
            RegistryError::Store(store) => {
                tracing::error!(error = %store, "storage failure");
                return ApiError::storage(store);
            }
            RegistryError::CorruptRecord(what) => {
                tracing::error!(record = %what, "corrupt metadata record");
                return ApiError::storage(&StoreError::Database(what.clone()));
            }
            _ => {}
        }
        let code = e.code().unwrap_or(ErrorCode::Unsupported);
        let err = ApiError::new(code).message(e.to_string());
        match e {
            RegistryError::BlobUnknown(d) | RegistryError::ManifestBlobUnknown(d) => {
                err.detail(serde_json::json!({ "digest": d.to_string() }))
            }
            RegistryError::TooLarge { limit } => err
                .status(StatusCode::PAYLOAD_TOO_LARGE)
                .detail(serde_json::json!({ "limit": limit })),
            RegistryError::RangeNotSatisfiable { size } => {
                err.header(header::CONTENT_RANGE, format!("bytes */{size}"))
            }
            RegistryError::RangeMismatch { size } => err
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::RANGE, crate::headers::upload_range(size)),
            _ => err,
        }
    }
}

/// What a failed cache request was for: an upstream's "not found" becomes
/// the matching spec error.
#[derive(Clone, Copy)]
pub enum CacheSubject {
    Manifest,
    Blob,
}

/// `via_mirror_default`: the request named a repository that is not local
/// and went to the default upstream; its refusal then just means "not here".
pub fn cache_error(e: CacheError, subject: CacheSubject, via_mirror_default: bool) -> ApiError {
    let upstream = match e {
        CacheError::Registry(e) => return e.into(),
        CacheError::Config(m) | CacheError::Io(m) => {
            tracing::error!(error = %m, "pull-through cache failure");
            return ApiError::storage(&StoreError::Database(m));
        }
        CacheError::Upstream(u) => u,
    };
    let message = upstream.to_string();
    let not_found = upstream.kind == FailureKind::NotFound
        || (via_mirror_default && upstream.kind == FailureKind::Unauthorized);
    match upstream.kind {
        _ if not_found => ApiError::new(match subject {
            CacheSubject::Manifest => ErrorCode::ManifestUnknown,
            CacheSubject::Blob => ErrorCode::BlobUnknown,
        })
        .message(message),
        FailureKind::Unauthorized => ApiError::new(ErrorCode::Denied)
            .message(format!("{message} (check the upstream's credentials)")),
        FailureKind::TooLarge => ApiError::new(ErrorCode::SizeInvalid)
            .status(StatusCode::PAYLOAD_TOO_LARGE)
            .message(message),
        _ if upstream.is_unavailable() => ApiError::new(ErrorCode::Unavailable)
            .message(format!("{message}; nothing cached to serve instead"))
            .header(header::RETRY_AFTER, "5"),
        // Corrupt or unexpected answers: the upstream is at fault.
        _ => ApiError::new(ErrorCode::Unavailable)
            .status(StatusCode::BAD_GATEWAY)
            .message(message),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "code": self.code, "message": self.message });
        if let Some(detail) = self.detail {
            body["detail"] = detail;
        }
        let body = serde_json::json!({ "errors": [body] }).to_string();
        let mut response = (
            self.status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response();
        for (name, value) in self.headers {
            response.headers_mut().insert(name, value);
        }
        if self.storage_failure {
            response.extensions_mut().insert(StorageFailure);
        }
        response
    }
}
