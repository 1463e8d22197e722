//! `/ui/login` and `/ui/logout`: signing in with the same credentials as
//! `docker login` (a user's password or an API token's secret), throttled
//! and audited like the API's sign-ins, and signing out.

use axum::extract::State;
use axum::response::{IntoResponse, Redirect, Response};
use berth_auth::AuthFailure;
use berth_auth::browser::safe_next;
use berth_store::Txn;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use maud::html;
use serde::Deserialize;

use super::store::{CreateError, SESSION_TTL_MS, SessionRecord};
use super::{SESSION_COOKIE, Viewer};
use crate::AppState;
use crate::audit::AuditEvent;
use crate::ui::{Form, Nav, error_page, page};

#[derive(Deserialize)]
pub struct NextQuery {
    next: Option<String>,
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
    let next = form.next.as_deref();
    // As the API bounds them in the Authorization header.
    if form.user.len() > berth_auth::header::MAX_USERNAME
        || form.password.len() > berth_auth::header::MAX_PASSWORD
    {
        return login_form(
            &viewer,
            next,
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
            return login_form(&viewer, next, Some(&message), status);
        }
    };
    let Some(record) = SessionRecord::open(auth, &identity, berth_registry::now_ms()) else {
        return login_form(
            &viewer,
            next,
            Some("These credentials cannot sign in to the console."),
            StatusCode::UNAUTHORIZED,
        );
    };
    let meta = state.registry.meta();
    let id = match state
        .sessions
        .create(meta.as_ref(), &record, viewer.session_key.as_deref())
        .await
    {
        Ok(id) => id,
        Err(CreateError::Throttled(wait)) => {
            return login_form(
                &viewer,
                next,
                Some(&format!(
                    "Too many sign-ins for {}; retry in {} s.",
                    identity.display(),
                    wait.as_secs().max(1)
                )),
                StatusCode::TOO_MANY_REQUESTS,
            );
        }
        Err(CreateError::Store(e)) => {
            tracing::warn!(error = %e, "cannot store a console session");
            return login_form(
                &viewer,
                next,
                Some("Sessions cannot be stored now; retry shortly."),
                StatusCode::SERVICE_UNAVAILABLE,
            );
        }
    };
    audit(identity.display(), "ok", 303, "ui_login", String::new());
    let mut response = Redirect::to(&safe_next(next)).into_response();
    set_session_cookie(&mut response, &id, SESSION_TTL_MS / 1000);
    response
}

/// `__Host-` cookies are `Secure`, for `/`, without a domain: a sibling
/// subdomain cannot plant one.
fn set_session_cookie(response: &mut Response, id: &str, max_age: u64) {
    let value = format!(
        "{SESSION_COOKIE}={id}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict; Secure"
    );
    if let Ok(v) = HeaderValue::from_str(&value) {
        response.headers_mut().append(header::SET_COOKIE, v);
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
    let mut response = Redirect::to("/ui/login").into_response();
    if let Some(key) = &viewer.session_key {
        // Deleted first, then forgotten: a request reading the record in
        // between cannot put it back in memory.
        let deleted = state
            .registry
            .meta()
            .commit(Txn::new().delete(key.clone()))
            .await;
        state.sessions.forget(key);
        if let Err(e) = deleted {
            tracing::warn!(error = %e, "cannot end a console session in the store");
            response = error_page(
                &viewer,
                StatusCode::SERVICE_UNAVAILABLE,
                "Signed out here only",
                "The metadata store does not answer: this browser has forgotten the session, but its record stands until it expires (at most 8 hours) or a sign-out succeeds.",
            );
        }
    }
    // The browser forgets it whatever the store said.
    set_session_cookie(&mut response, "", 0);
    response
}
