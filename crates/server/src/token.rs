//! The token endpoint of the Docker registry token protocol (`/auth/token`):
//! GET with Basic credentials (or none, for anonymous pulls) as docker,
//! podman and skopeo use it, and the OAuth2 password-grant POST that
//! containerd uses. Each token carries only what the policy grants of the
//! scopes asked for.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use berth_auth::{AuthFailure, AuthRequest, Identity, IssuedToken, parse_scopes};
use berth_oci::ErrorCode;
use http::{HeaderMap, Method, StatusCode, header};
use http_body_util::BodyExt as _;

use crate::AppState;
use crate::audit::AuditEvent;
use crate::error::ApiError;
use crate::serve::ConnInfo;

/// Largest OAuth2 form accepted.
const MAX_FORM: usize = 64 * 1024;

fn not_offered(why: &str) -> Response {
    ApiError::new(ErrorCode::Unsupported)
        .status(StatusCode::NOT_FOUND)
        .message(why)
        .into_response()
}

fn bad_request(message: impl Into<String>) -> Response {
    ApiError::new(ErrorCode::Unsupported)
        .status(StatusCode::BAD_REQUEST)
        .message(message)
        .into_response()
}

/// OAuth2 errors (RFC 6749, 5.2) for the POST form.
fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({ "error": error, "error_description": description }).to_string(),
    )
        .into_response()
}

pub async fn token(State(state): State<AppState>, request: Request) -> Response {
    let security = state.security.clone();
    let auth = &security.auth;
    if !auth.enabled() || auth.keys().is_none() {
        return not_offered(
            "this registry has no token service (authentication is not configured, or --token-service=false)",
        );
    }
    let conn = request.extensions().get::<ConnInfo>().cloned();
    let headers = request.headers().clone();
    let client = security.client_address(conn.as_ref(), &headers);
    let method = request.method().clone();
    let query = request.uri().query().map(str::to_string);
    let form = match method {
        Method::GET => None,
        Method::POST => {
            let limited = http_body_util::Limited::new(request.into_body(), MAX_FORM);
            match limited.collect().await {
                Ok(body) => Some(String::from_utf8_lossy(&body.to_bytes()).into_owned()),
                Err(_) => return bad_request(format!("the token form exceeds {MAX_FORM} bytes")),
            }
        }
        _ => {
            return ApiError::new(ErrorCode::Unsupported)
                .status(StatusCode::METHOD_NOT_ALLOWED)
                .message("use GET or POST")
                .into_response();
        }
    };
    let oauth = form.is_some();
    let params = match berth_oci::query::parse_pairs(form.as_deref().or(query.as_deref())) {
        Ok(p) => p,
        Err(e) => return bad_request(e.to_string()),
    };
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let service = &auth.settings().service;
    if let Some(asked) = param("service")
        && asked != service
    {
        return bad_request(format!(
            "this token service issues tokens for service {service:?}, not {asked:?}"
        ));
    }
    let scopes = match parse_scopes(
        params
            .iter()
            .filter(|(k, _)| k == "scope")
            .map(|(_, v)| v.as_str()),
    ) {
        Ok(s) => s,
        Err(e) => return bad_request(e.to_string()),
    };
    let audit = |identity: String,
                 event: &'static str,
                 outcome: &'static str,
                 status: u16,
                 detail: String| {
        security.audit.record(AuditEvent {
            event,
            identity,
            client: client.to_string(),
            outcome,
            status,
            method: method.to_string(),
            path: crate::access::TOKEN_PATH.into(),
            detail,
            ..Default::default()
        })
    };

    let identity = if oauth {
        match param("grant_type") {
            Some("password") => {
                let (Some(user), Some(password)) = (param("username"), param("password")) else {
                    return oauth_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        "username and password are required",
                    );
                };
                auth.basic(user, password, client).await
            }
            Some(other) => {
                // containerd then falls back to GET with Basic credentials.
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "unsupported_grant_type",
                    &format!("grant type {other:?} is not supported; use password"),
                );
            }
            None => {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "grant_type is required",
                );
            }
        }
    } else {
        auth.authenticate(&AuthRequest {
            authorization: headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()),
            certificate: conn.as_ref().and_then(|c| c.certificate.as_deref()),
            client,
        })
        .await
    };
    let identity = match identity {
        Ok(
            i @ (Identity::Anonymous
            | Identity::User(_)
            | Identity::Certificate(_)
            | Identity::ApiToken(_)),
        ) => i,
        Ok(other) => {
            return bad_request(format!(
                "{} cannot be exchanged for a token; sign in with a user name and password or an API token",
                other.display()
            ));
        }
        Err(failure) => {
            let realm = security.realm(conn.as_ref(), &headers, &http::Uri::from_static("/"));
            let mut response = security.failure_response(&failure, &realm);
            if matches!(
                failure,
                AuthFailure::BadCredentials { .. } | AuthFailure::Malformed(_)
            ) {
                // The token endpoint itself takes Basic credentials.
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Basic realm=\"berth\", charset=\"UTF-8\""),
                );
            }
            let user = crate::security::failed_user(auth, &failure);
            audit(
                user,
                "auth_failed",
                "failed",
                response.status().as_u16(),
                failure.to_string(),
            );
            return response;
        }
    };
    let issued = match auth.issue(&identity, &scopes) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot issue a token");
            return ApiError::new(ErrorCode::Unavailable)
                .message("the token service cannot sign tokens right now")
                .into_response();
        }
    };
    security.metrics.tokens_issued.inc();
    let granted = granted_scopes(&issued);
    // Anonymous tokens carry only public grants: not worth an audit line
    // each (and a flood of them must not crowd the audit file).
    if !identity.is_anonymous() {
        audit(
            identity.display(),
            "token_issued",
            "ok",
            200,
            granted.clone(),
        );
    }
    respond(&issued, granted, oauth)
}

fn granted_scopes(issued: &IssuedToken) -> String {
    issued
        .access
        .iter()
        .map(|a| format!("{}:{}:{}", a.kind, a.name, a.actions.join(",")))
        .collect::<Vec<_>>()
        .join(" ")
}

fn respond(issued: &IssuedToken, scope: String, oauth: bool) -> Response {
    let issued_at = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(issued.issued_at_ms),
    )
    .to_string();
    let mut body = serde_json::json!({
        "access_token": issued.token,
        "expires_in": issued.expires_in,
        "issued_at": issued_at,
    });
    if oauth {
        body["scope"] = scope.into();
    } else {
        body["token"] = issued.token.clone().into();
    }
    let mut response = Response::new(Body::from(body.to_string()));
    let headers: &mut HeaderMap = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    // Tokens are credentials: never cached on the way.
    headers.insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    response
}

/// `/auth/jwks`: the public keys Berth's tokens are signed with.
pub async fn jwks(State(state): State<AppState>) -> Response {
    match state.security.auth.keys() {
        Some(keys) if state.security.auth.enabled() => axum::Json(keys.jwks()).into_response(),
        _ => not_offered("this registry has no token service"),
    }
}
