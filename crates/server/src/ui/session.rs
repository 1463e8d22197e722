//! Who is looking at the console, and what they may do there.
//!
//! A browser signs in once with a user's password or an API token's
//! secret (the same credentials as `docker login`) and gets a session: a
//! random id in a cookie that is `Secure`, `HttpOnly` and
//! `SameSite=Strict`, whose record (who, its CSRF token, its expiry) lives
//! in the MetaStore, so every node of a region knows it and signing out
//! ends it everywhere. Each request rebuilds the identity from the record
//! and the current htpasswd file and API tokens, so a removed user or a
//! revoked token loses its sessions at once.
//!
//! Every action is a POST that carries a CSRF token: the session's, or,
//! without a session (an open registry, or a client sending its own
//! `Authorization`), a per-browser cookie echoed in the form. A POST whose
//! `Origin` is another site is refused as well.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{FromRequestParts, State};
use axum::response::{IntoResponse, Redirect, Response};
use berth_auth::{
    Action, AuthFailure, AuthRequest, Authenticator, Decision, Identity, Requirement,
};
use berth_store::Txn;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use maud::html;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use super::{Form, Nav, error_page, page};
use crate::AppState;
use crate::audit::AuditEvent;
use crate::serve::ConnInfo;

pub const SESSION_COOKIE: &str = "berth_session";
pub const CSRF_COOKIE: &str = "berth_csrf";
const SESSION_PREFIX: &str = "ui/session/";
/// A session ends this long after sign-in, used or not.
const SESSION_TTL_MS: u64 = 8 * 3600 * 1000;
/// Expired sessions removed per sign-in (they are also ignored when read).
const SWEEP_LIMIT: usize = 200;
/// A session read that takes longer falls back to [`RecentSessions`].
const SESSION_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a session this node checked stands without the store.
const RECENT_FOR: std::time::Duration = std::time::Duration::from_secs(15 * 60);
/// Sessions remembered per node, at most.
const RECENT_MAX: usize = 4096;

/// The sessions this node checked lately. Used only while the metadata
/// store does not answer, so that an operator signed in before an etcd
/// outage keeps the console through it. Revocation (sign-out, a removed
/// user, a revoked token) is immediate while the store answers; during an
/// outage a session signed out on another node stands here for at most
/// [`RECENT_FOR`], and a removed user or token is still refused (the
/// identity is rebuilt from the current files and tokens).
#[derive(Default)]
pub struct RecentSessions {
    map: std::sync::Mutex<std::collections::HashMap<String, (SessionRecord, std::time::Instant)>>,
}

impl RecentSessions {
    fn remember(&self, key: &str, record: SessionRecord) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= RECENT_MAX && !map.contains_key(key) {
            map.retain(|_, (_, at)| at.elapsed() < RECENT_FOR);
            if map.len() >= RECENT_MAX {
                map.clear();
            }
        }
        map.insert(key.to_string(), (record, std::time::Instant::now()));
    }

    fn recall(&self, key: &str) -> Option<SessionRecord> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key)
            .filter(|(_, at)| at.elapsed() < RECENT_FOR)
            .map(|(r, _)| r.clone())
    }

    fn forget(&self, key: &str) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Principal {
    User,
    Token,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct SessionRecord {
    principal: Principal,
    name: String,
    /// For an API token: its id, so that a token revoked and made again
    /// under the same name does not inherit the old one's sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token_id: Option<String>,
    csrf: String,
    created_ms: u64,
    expires_ms: u64,
}

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

    pub fn may_pull(&self, repository: &str) -> bool {
        self.auth.may_list(&self.identity, repository)
    }

    pub fn may_administer(&self, repository: &str) -> bool {
        self.allowed(&Requirement::RepositoryAdmin(repository.to_string()))
    }

    pub fn may(&self, repository: &str, action: Action) -> bool {
        self.auth.granted(&self.identity, repository).allows(action)
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
        if !same_origin(headers, &self.host) {
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

    fn cookie_flags(&self) -> &'static str {
        if self.secure { "; Secure" } else { "" }
    }
}

/// Whether the request's `Origin` (when a browser sent one) is `host`,
/// the registry as this client reaches it.
fn same_origin(headers: &HeaderMap, host: &str) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let authority = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .unwrap_or("");
    !host.is_empty() && authority.eq_ignore_ascii_case(host)
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_alphanumeric()))
}

fn random_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

fn session_key(id: &str) -> String {
    format!(
        "{SESSION_PREFIX}{}",
        hex::encode(Sha256::digest(id.as_bytes()))
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
                .is_some_and(|v| v.as_bytes() == b"https"));
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
        let mut viewer = Viewer {
            identity: Identity::Anonymous,
            session_key: None,
            csrf: String::new(),
            set_csrf_cookie: None,
            secure,
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
            let record = match read {
                Ok(Some(kv)) => serde_json::from_slice::<SessionRecord>(&kv.value).ok(),
                Ok(None) => None,
                // The store does not answer (an etcd outage, when the
                // console matters most): a session this node checked
                // lately still stands.
                Err(e) => match state.sessions.recall(&key) {
                    Some(record) => {
                        tracing::debug!(error = %e, "console session from memory");
                        Some(record)
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
            match record.and_then(|r| session_identity(&auth, &r).map(|i| (i, r))) {
                Some((identity, record)) => {
                    viewer.identity = identity;
                    viewer.csrf = record.csrf.clone();
                    state.sessions.remember(&key, record);
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
        match cookie(&parts.headers, CSRF_COOKIE) {
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

/// The identity a session stands for now, if it still stands.
fn session_identity(auth: &Authenticator, record: &SessionRecord) -> Option<Identity> {
    let now = berth_registry::now_ms();
    if record.expires_ms <= now {
        return None;
    }
    match record.principal {
        Principal::User => auth
            .knows_user(&record.name)
            .then(|| Identity::User(record.name.clone())),
        Principal::Token => auth
            .api_tokens()?
            .by_name(&record.name)
            .filter(|t| !t.expired(now) && Some(&t.record.id) == record.token_id.as_ref())
            .map(Identity::ApiToken),
    }
}

/// Adds the cookies a page must set.
pub fn set_cookies(viewer: &Viewer, response: &mut Response) {
    if let Some(token) = &viewer.set_csrf_cookie {
        let value = format!(
            "{CSRF_COOKIE}={token}; Path=/ui; HttpOnly; SameSite=Strict{}",
            viewer.cookie_flags()
        );
        if let Ok(v) = HeaderValue::from_str(&value) {
            response.headers_mut().append(header::SET_COOKIE, v);
        }
    }
}

#[derive(Deserialize)]
pub struct NextQuery {
    next: Option<String>,
}

/// Only a console path: never another site.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with("/ui/") && !n.contains("//") && !n.contains('\\') => n.to_string(),
        _ => "/ui/".into(),
    }
}

pub async fn login_page(
    viewer: Viewer,
    axum::extract::Query(query): axum::extract::Query<NextQuery>,
) -> Response {
    login_form(&viewer, query.next.as_deref(), None, StatusCode::OK)
}

fn login_form(
    viewer: &Viewer,
    next: Option<&str>,
    problem: Option<&str>,
    status: StatusCode,
) -> Response {
    let next = safe_next(next);
    let body = html! {
        h1 { "Sign in" }
        @if !viewer.auth_enabled() {
            p.note { "This registry has no authentication configured: the console is open to whoever reaches it (loopback only, unless opted in)." }
            p { a href="/ui/" { "Go to the overview" } }
        } @else {
            @if let Some(problem) = problem {
                p.error role="alert" { (problem) }
            }
            form.login method="post" action="/ui/login" {
                input type="hidden" name="csrf" value=(viewer.csrf);
                input type="hidden" name="next" value=(next);
                label { "User or API token name" input #user type="text" name="user" autocomplete="username" required autofocus; }
                label { "Password or API token secret" input #password type="password" name="password" autocomplete="current-password" required; }
                button #sign-in type="submit" { "Sign in" }
            }
            @if !viewer.secure {
                p.note { "This connection is not HTTPS: browsers keep the session cookie only on localhost." }
            }
        }
    };
    let mut response = page(viewer, "Sign in", Nav::None, false, body);
    *response.status_mut() = status;
    response
}

#[derive(Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    next: Option<String>,
    #[serde(default)]
    user: String,
    #[serde(default)]
    password: String,
}

pub async fn login(
    State(state): State<AppState>,
    viewer: Viewer,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    if let Some(refused) = viewer.forged(&headers, &form.csrf) {
        return refused;
    }
    let auth = &state.security.auth;
    if !auth.enabled() {
        return Redirect::to("/ui/").into_response();
    }
    if form.user.len() > 256 || form.password.len() > 4096 {
        return login_form(
            &viewer,
            form.next.as_deref(),
            Some("Wrong user or password."),
            StatusCode::UNAUTHORIZED,
        );
    }
    let audit = |identity: String,
                 outcome: &'static str,
                 status: u16,
                 event: &'static str,
                 detail: String| {
        state.security.audit.record(AuditEvent {
            identity,
            client: viewer.client.to_string(),
            outcome,
            status,
            method: "POST".into(),
            path: "/ui/login".into(),
            event,
            detail,
            ..Default::default()
        });
    };
    let identity = match auth.basic(&form.user, &form.password, viewer.client).await {
        Ok(identity) => identity,
        Err(failure) => {
            let (status, message) = match &failure {
                AuthFailure::Throttled { .. } => {
                    (StatusCode::TOO_MANY_REQUESTS, failure.to_string())
                }
                AuthFailure::Unavailable(_) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Credentials cannot be checked now; retry shortly.".to_string(),
                ),
                _ => (
                    StatusCode::UNAUTHORIZED,
                    "Wrong user or password.".to_string(),
                ),
            };
            audit(
                crate::security::failed_user(auth, &failure),
                "failed",
                status.as_u16(),
                "auth_failed",
                format!("console sign-in: {failure}"),
            );
            return login_form(&viewer, form.next.as_deref(), Some(&message), status);
        }
    };
    let (principal, name, token_id) = match &identity {
        Identity::User(u) => (Principal::User, u.clone(), None),
        Identity::ApiToken(t) => (
            Principal::Token,
            t.name().to_string(),
            Some(t.record.id.clone()),
        ),
        _ => {
            return login_form(
                &viewer,
                form.next.as_deref(),
                Some("These credentials cannot sign in to the console."),
                StatusCode::UNAUTHORIZED,
            );
        }
    };
    let now = berth_registry::now_ms();
    let id = random_token();
    let record = SessionRecord {
        principal,
        name,
        token_id,
        csrf: random_token(),
        created_ms: now,
        expires_ms: now + SESSION_TTL_MS,
    };
    let meta = state.registry.meta();
    sweep_expired(meta.as_ref(), now).await;
    let stored = meta
        .commit(Txn::new().put(
            session_key(&id),
            serde_json::to_vec(&record).unwrap_or_default(),
        ))
        .await;
    if let Err(e) = stored {
        tracing::warn!(error = %e, "cannot store a console session");
        return login_form(
            &viewer,
            form.next.as_deref(),
            Some("Sessions cannot be stored now; retry shortly."),
            StatusCode::SERVICE_UNAVAILABLE,
        );
    }
    audit(identity.display(), "ok", 303, "ui_login", String::new());
    let mut response = Redirect::to(&safe_next(form.next.as_deref())).into_response();
    let value = format!(
        "{SESSION_COOKIE}={id}; Path=/; Max-Age={}; HttpOnly; SameSite=Strict; Secure",
        SESSION_TTL_MS / 1000
    );
    if let Ok(v) = HeaderValue::from_str(&value) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
    response
}

/// Removes some expired sessions (each sign-in does a little of it).
async fn sweep_expired(meta: &dyn berth_store::MetaStore, now: u64) {
    let Ok(kvs) = meta
        .scan(SESSION_PREFIX.as_bytes(), None, SWEEP_LIMIT)
        .await
    else {
        return;
    };
    let mut txn = Txn::new();
    for kv in kvs {
        let expired = serde_json::from_slice::<SessionRecord>(&kv.value)
            .map_or(true, |r| r.expires_ms <= now);
        if expired {
            txn = txn.delete(kv.key);
        }
    }
    if !txn.is_empty()
        && let Err(e) = meta.commit(txn).await
    {
        tracing::debug!(error = %e, "could not remove expired console sessions");
    }
}

#[derive(Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    pub csrf: String,
}

pub async fn logout(
    State(state): State<AppState>,
    viewer: Viewer,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some(refused) = viewer.forged(&headers, &form.csrf) {
        return refused;
    }
    if let Some(key) = &viewer.session_key
        && let Err(e) = state
            .registry
            .meta()
            .commit(Txn::new().delete(key.clone()))
            .await
    {
        tracing::warn!(error = %e, "cannot end a console session");
        return error_page(
            &viewer,
            StatusCode::SERVICE_UNAVAILABLE,
            "Unavailable",
            "The session could not be ended now; retry shortly.",
        );
    }
    let mut response = Redirect::to("/ui/login").into_response();
    let value = format!("{SESSION_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict; Secure");
    if let Ok(v) = HeaderValue::from_str(&value) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_stays_on_the_console() {
        assert_eq!(safe_next(Some("/ui/cache")), "/ui/cache");
        assert_eq!(safe_next(Some("https://evil.example/")), "/ui/");
        assert_eq!(safe_next(Some("//evil.example/ui/")), "/ui/");
        assert_eq!(safe_next(Some("/ui//evil.example")), "/ui/");
        assert_eq!(safe_next(Some("/ui/\\evil")), "/ui/");
        assert_eq!(safe_next(None), "/ui/");
    }

    #[test]
    fn origins_must_match_the_host() {
        let host = "reg.example:5000";
        let mut h = HeaderMap::new();
        assert!(
            same_origin(&h, host),
            "no Origin: not a cross-site browser form"
        );
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://reg.example:5000"),
        );
        assert!(same_origin(&h, host));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!same_origin(&h, host));
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(!same_origin(&h, host));
        assert!(!same_origin(&h, ""));
    }

    #[test]
    fn cookies_are_read_strictly() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; berth_session=abc123; b=2"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("abc123"));
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("berth_session=a%20b"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), None);
    }
}
