//! Who is looking at the console, and what they may do there.
//!
//! A browser signs in once (see `login`) and gets a session: a random id
//! in the cookie `__Host-berth_session` (`Secure`, `HttpOnly`,
//! `SameSite=Strict`, `/` only, no domain), whose record lives in the
//! MetaStore (see `store`). Each request rebuilds the identity from the
//! record and the current htpasswd file and API tokens, so a removed user,
//! a changed password or a revoked token ends its sessions at once.
//! Without a session, the request's own `Authorization` or client
//! certificate is taken, as the API takes them.
//!
//! Every action is a POST that carries a CSRF token: the session's, or,
//! without a session (an open registry, or a client sending its own
//! `Authorization`), a per-browser cookie echoed in the form. A POST whose
//! `Origin` is not this registry is refused as well.

mod login;
mod store;

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Redirect, Response};
use berth_auth::{Action, AuthRequest, Authenticator, Decision, Identity, Requirement};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use subtle::ConstantTimeEq;

pub use login::{CsrfForm, login, login_page, logout};
pub use store::NodeSessions;
use store::{SESSION_READ_TIMEOUT, SessionRecord, random_token, session_key};

use super::error_page;
use crate::AppState;
use crate::serve::ConnInfo;

pub const SESSION_COOKIE: &str = "__Host-berth_session";
/// The CSRF cookie of a browser without a session: `__Host-` over HTTPS;
/// plain on an open registry's loopback HTTP, where a `__Host-` cookie
/// (which must be `Secure`) would not be kept.
const CSRF_COOKIE_SECURE: &str = "__Host-berth_csrf";
const CSRF_COOKIE_PLAIN: &str = "berth_csrf";

/// The caller of a console page.
pub struct Viewer {
    pub identity: Identity,
    /// The session's key in the MetaStore, when signed in through the form.
    session_key: Option<String>,
    /// The token a form must carry to be accepted.
    pub csrf: String,
    /// A CSRF cookie to set on the response (a first visit).
    pub set_csrf_cookie: Option<String>,
    /// Whether the request came over TLS (cookies say `Secure` then).
    secure: bool,
    /// The registry's own origin as configured (`--advertise-url`), also
    /// accepted as a form's `Origin` (a proxy may rewrite `Host`).
    advertised: String,
    pub client: IpAddr,
    /// The registry's host as this client reaches it (for pull commands).
    pub host: String,
    auth: Arc<Authenticator>,
}

impl Viewer {
    pub fn auth_enabled(&self) -> bool {
        self.auth.enabled()
    }

    pub fn signed_in(&self) -> bool {
        !self.identity.is_anonymous()
    }

    pub fn has_session(&self) -> bool {
        self.session_key.is_some()
    }

    pub fn name(&self) -> String {
        self.identity.display()
    }

    pub fn allowed(&self, requirement: &Requirement) -> bool {
        self.auth.authorize(&self.identity, requirement) == Decision::Allow
    }

    /// Region-wide administration (the replication and cache pages).
    pub fn may_admin(&self) -> bool {
        self.allowed(&Requirement::Admin)
    }

    /// Pausing a peer, turning serving off: on an open registry only a
    /// peer credential may, as on the API.
    pub fn may_control_region(&self) -> bool {
        self.allowed(&Requirement::RegionControl)
    }

    /// Whether the repository list shows `repository` to this viewer
    /// (a catalog token lists what its subject may pull).
    pub fn may_list(&self, repository: &str) -> bool {
        self.auth.may_list(&self.identity, repository)
    }

    /// Whether this viewer may read `repository`'s tags and manifests:
    /// exactly what the API would let it pull.
    pub fn may_pull(&self, repository: &str) -> bool {
        self.may(repository, Action::Pull)
    }

    pub fn may_administer(&self, repository: &str) -> bool {
        self.allowed(&Requirement::RepositoryAdmin(repository.to_string()))
    }

    pub fn may(&self, repository: &str, action: Action) -> bool {
        self.auth.granted(&self.identity, repository).allows(action)
    }

    /// The audit event of an action this viewer took through the console;
    /// the caller adds what it acted on, and records it.
    pub fn audit_event(
        &self,
        path: impl Into<String>,
        event: &'static str,
        action: &'static str,
    ) -> crate::audit::AuditEvent {
        crate::audit::AuditEvent {
            identity: self.name(),
            client: self.client.to_string(),
            outcome: "ok",
            status: 303,
            method: "POST".into(),
            path: path.into(),
            event,
            action,
            ..Default::default()
        }
    }

    /// The answer to a page this viewer may not see: the sign-in form for
    /// someone not signed in, 403 for someone who is.
    pub fn refuse(&self, uri: &str) -> Response {
        if self.auth_enabled() && !self.signed_in() {
            return Redirect::to(&format!("/ui/login?next={}", super::format::encode(uri)))
                .into_response();
        }
        error_page(
            self,
            StatusCode::FORBIDDEN,
            "Not allowed",
            &format!("{} may not see or do this.", self.name()),
        )
    }

    /// The refusal of a form whose CSRF token or origin is wrong, if so.
    pub fn forged(&self, headers: &HeaderMap, csrf: &str) -> Option<Response> {
        let scheme = if self.secure { "https" } else { "http" };
        let own = format!("{scheme}://{}", self.host);
        let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
        if !berth_auth::browser::same_origin(origin, &[own.as_str(), self.advertised.as_str()]) {
            return Some(error_page(
                self,
                StatusCode::FORBIDDEN,
                "Refused",
                "The form came from another site.",
            ));
        }
        let ok: bool = !self.csrf.is_empty() && self.csrf.as_bytes().ct_eq(csrf.as_bytes()).into();
        (!ok).then(|| {
            error_page(
                self,
                StatusCode::FORBIDDEN,
                "Refused",
                "The form's security token is missing or stale: reload the page and try again.",
            )
        })
    }

    fn csrf_cookie(&self) -> &'static str {
        if self.secure {
            CSRF_COOKIE_SECURE
        } else {
            CSRF_COOKIE_PLAIN
        }
    }
}

/// Cookie `name` of the request (see [`berth_auth::browser::cookie`]).
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    berth_auth::browser::cookie(
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok()),
        name,
    )
}

impl FromRequestParts<AppState> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Viewer, Response> {
        let auth = state.security.auth.clone();
        let conn = parts.extensions.get::<ConnInfo>().cloned();
        let client = state.security.client_address(conn.as_ref(), &parts.headers);
        let secure = conn.as_ref().is_some_and(|c| c.tls)
            || (conn.as_ref().is_some_and(|c| {
                state
                    .security
                    .trusted_proxies
                    .iter()
                    .any(|p| p.contains(c.peer.ip()))
            }) && parts
                .headers
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok())
                // The first proxy's word, as the token realm takes it.
                .is_some_and(|v| v.split(',').next().unwrap_or("").trim() == "https"));
        let from_proxy = conn.as_ref().is_some_and(|c| {
            state
                .security
                .trusted_proxies
                .iter()
                .any(|p| p.contains(c.peer.ip()))
        });
        let header_host = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(',').next().unwrap_or("").trim().to_string())
                .filter(|h| crate::security::valid_host(h))
        };
        // HTTP/2 carries the host in the URI's authority, not in `Host`.
        let host = header_host("x-forwarded-host")
            .filter(|_| from_proxy)
            .or_else(|| header_host("host"))
            .or_else(|| {
                parts
                    .uri
                    .authority()
                    .map(|a| a.to_string())
                    .filter(|h| crate::security::valid_host(h))
            })
            .unwrap_or_else(|| {
                let url = &state.security.advertise_url;
                url.split_once("://")
                    .map_or(url.as_str(), |(_, h)| h)
                    .trim_end_matches('/')
                    .to_string()
            });
        let advertised = state
            .security
            .advertise_url
            .trim_end_matches('/')
            .to_string();
        let mut viewer = Viewer {
            identity: Identity::Anonymous,
            session_key: None,
            csrf: String::new(),
            set_csrf_cookie: None,
            secure,
            advertised,
            client,
            host,
            auth: auth.clone(),
        };
        if let Some(id) = cookie(&parts.headers, SESSION_COOKIE) {
            let key = session_key(id);
            let read = tokio::time::timeout(
                SESSION_READ_TIMEOUT,
                state.registry.meta().get(key.as_bytes()),
            )
            .await
            .unwrap_or_else(|_| {
                Err(berth_store::StoreError::Unavailable(format!(
                    "no answer within {SESSION_READ_TIMEOUT:?}"
                )))
            });
            let now = berth_registry::now_ms();
            let found = match read {
                Ok(Some(kv)) => serde_json::from_slice::<SessionRecord>(&kv.value)
                    .ok()
                    .map(|r| (r, true)),
                Ok(None) => None,
                // The store does not answer (an etcd outage, when the
                // console matters most): a session this node read from it
                // lately still stands.
                Err(e) => match state.sessions.recall(&key) {
                    Some(record) => {
                        tracing::debug!(error = %e, "console session from memory");
                        Some((record, false))
                    }
                    None => {
                        tracing::warn!(error = %e, "cannot read a console session");
                        return Err(error_page(
                            &viewer,
                            StatusCode::SERVICE_UNAVAILABLE,
                            "Unavailable",
                            "Sessions cannot be read now (the metadata store does not answer); retry shortly, or use the registry's credentials directly (curl -u).",
                        ));
                    }
                },
            };
            match found.and_then(|(r, fresh)| r.identity(&auth, now).map(|i| (i, r, fresh))) {
                Some((identity, record, fresh)) => {
                    viewer.identity = identity;
                    viewer.csrf = record.csrf.clone();
                    // Only what the store said counts as lately checked.
                    if fresh {
                        state.sessions.remember(&key, record);
                    }
                    viewer.session_key = Some(key);
                    return Ok(viewer);
                }
                None => state.sessions.forget(&key),
            }
        }
        // No session: the request's own credentials, as the API takes them.
        if auth.enabled() {
            let authorization = parts.headers.get(header::AUTHORIZATION);
            let certificate = conn.as_ref().and_then(|c| c.certificate.as_deref());
            if authorization.is_some() || certificate.is_some() {
                match auth
                    .authenticate(&AuthRequest {
                        authorization: authorization.map(|v| v.as_bytes()),
                        certificate,
                        client,
                    })
                    .await
                {
                    Ok(identity) => viewer.identity = identity,
                    Err(failure) => {
                        let realm = state
                            .security
                            .realm(conn.as_ref(), &parts.headers, &parts.uri);
                        return Err(state.security.failure_response(&failure, &realm));
                    }
                }
            }
        }
        match cookie(&parts.headers, viewer.csrf_cookie()) {
            Some(token) => viewer.csrf = token.to_string(),
            None => {
                let token = random_token();
                viewer.csrf = token.clone();
                viewer.set_csrf_cookie = Some(token);
            }
        }
        Ok(viewer)
    }
}

/// Adds the cookies a page must set.
pub fn set_cookies(viewer: &Viewer, response: &mut Response) {
    if let Some(token) = &viewer.set_csrf_cookie {
        let secure = if viewer.secure { "; Secure" } else { "" };
        let value = format!(
            "{}={token}; Path=/; HttpOnly; SameSite=Strict{secure}",
            viewer.csrf_cookie()
        );
        if let Ok(v) = HeaderValue::from_str(&value) {
            response.headers_mut().append(header::SET_COOKIE, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_come_from_every_cookie_header() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(
            header::COOKIE,
            HeaderValue::from_static("__Host-berth_session=abc123"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("abc123"));
    }
}
