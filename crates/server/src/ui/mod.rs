//! The operator's console: server-rendered pages under `/ui/`, built for
//! the first minute of an outage. Plain HTML from templates compiled into
//! the binary (maud), one stylesheet and a few lines of script for live
//! refresh; every page works with JavaScript off.
//!
//! The console decides access itself, with the same policy as the API
//! (see `session`): the guard lets `/ui/` through unauthenticated, and
//! every page and action here asks [`session::Viewer`] first.

mod cache;
mod format;
mod lifecycle;
mod manifest;
mod overview;
mod replication;
mod repositories;
mod session;

use axum::Router;
use axum::extract::{FromRequest, Path, Request};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use http::{HeaderValue, StatusCode, header};
use maud::{DOCTYPE, Markup, html};
use serde::de::DeserializeOwned;

use crate::AppState;
pub use session::{NodeSessions, Viewer};

/// The largest form the console accepts (a sign-in, a button's fields).
const MAX_FORM_BYTES: usize = 16 * 1024;
/// Rows per page of a listing.
pub const PAGE_ROWS: usize = 50;
/// How long a page waits for a store read that is not on its main path
/// (replication status on the overview) before saying so.
pub const STORE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

const STYLE: &str = include_str!("assets/style.css");
const SCRIPT: &str = include_str!("assets/live.js");

/// Whether `path` is the console's (the guard leaves these to it).
pub fn is_console_path(path: &str) -> bool {
    path == "/" || path == "/ui" || path.starts_with("/ui/")
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(overview::page))
        .route("/ui/login", get(session::login_page).post(session::login))
        .route("/ui/logout", post(session::logout))
        .route("/ui/assets/{file}", get(asset))
        .route("/ui/replication", get(replication::page))
        .route(
            "/ui/replication/peers/{peer}/{action}",
            post(replication::pause),
        )
        .route("/ui/replication/serving", post(replication::serving))
        .route("/ui/cache", get(cache::page))
        .route("/ui/cache/pin", post(cache::pin))
        .route("/ui/repositories", get(repositories::list))
        .route(
            "/ui/repositories/{*rest}",
            get(repositories::dispatch).post(repositories::act),
        )
        .route("/ui/lifecycle", get(lifecycle::page))
        .route("/ui/{*rest}", get(not_found).post(not_found))
}

async fn not_found(viewer: Viewer) -> Response {
    error_page(
        &viewer,
        StatusCode::NOT_FOUND,
        "Not found",
        "No console page has this address.",
    )
}

async fn asset(Path(file): Path<String>) -> Response {
    let (body, content_type) = match file.as_str() {
        "style.css" => (STYLE, "text/css; charset=utf-8"),
        "live.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        _ => return (StatusCode::NOT_FOUND, "no such asset\n").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=3600"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// Which section of the navigation a page belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    None,
    Overview,
    Replication,
    Cache,
    Repositories,
    Lifecycle,
}

/// A whole page: the navigation, who is signed in, and `body`. `live`
/// pages refresh their content every few seconds when scripts run.
pub fn page(viewer: &Viewer, title: &str, nav: Nav, live: bool, body: Markup) -> Response {
    let link = |target: Nav, href: &str, label: &str| {
        html! {
            a href=(href) aria-current=[(nav == target).then_some("page")] { (label) }
        }
    };
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Berth" }
                link rel="stylesheet" href="/ui/assets/style.css";
                @if live { script src="/ui/assets/live.js" defer {} }
            }
            body {
                header {
                    a.brand href="/ui/" { "Berth" }
                    nav {
                        (link(Nav::Overview, "/ui/", "Overview"))
                        (link(Nav::Repositories, "/ui/repositories", "Repositories"))
                        (link(Nav::Replication, "/ui/replication", "Replication"))
                        (link(Nav::Cache, "/ui/cache", "Cache"))
                        (link(Nav::Lifecycle, "/ui/lifecycle", "Lifecycle"))
                    }
                    div.who {
                        @if viewer.has_session() {
                            span #who { (viewer.name()) }
                            form.inline method="post" action="/ui/logout" {
                                input type="hidden" name="csrf" value=(viewer.csrf);
                                button #sign-out type="submit" { "Sign out" }
                            }
                        } @else if viewer.signed_in() {
                            span #who { (viewer.name()) }
                        } @else if viewer.auth_enabled() {
                            a #sign-in-link href="/ui/login" { "Sign in" }
                        } @else {
                            span #who.open title="No authentication is configured" { "open registry" }
                        }
                    }
                }
                main #content data-live=[live.then_some("5")] {
                    (body)
                }
            }
        }
    };
    let mut response = (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        markup.into_string(),
    )
        .into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    session::set_cookies(viewer, &mut response);
    response
}

/// A page that says what went wrong, with its status.
pub fn error_page(viewer: &Viewer, status: StatusCode, title: &str, message: &str) -> Response {
    let body = html! {
        h1 { (title) }
        p.error role="alert" { (message) }
        p { a href="/ui/" { "Back to the overview" } }
    };
    let mut response = page(viewer, title, Nav::None, false, body);
    *response.status_mut() = status;
    response
}

/// A form's `true` or `false`.
pub fn form_bool(value: &str) -> Option<bool> {
    match value {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// A failure of a store behind a page: logged in full, shown briefly.
pub fn unavailable(viewer: &Viewer, what: &str, error: impl std::fmt::Display) -> Response {
    tracing::warn!(error = %error, "console: cannot read {what}");
    // The store's words are for administrators (as on the API, where they
    // stay in the log).
    let message = if viewer.may_admin() {
        format!("Cannot read {what} now ({error}); retry shortly.")
    } else {
        format!("Cannot read {what} now; retry shortly.")
    };
    error_page(
        viewer,
        StatusCode::SERVICE_UNAVAILABLE,
        "Unavailable",
        &message,
    )
}

/// An `application/x-www-form-urlencoded` body of at most
/// [`MAX_FORM_BYTES`], parsed with the registry's own query parser.
pub struct Form<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Form<T> {
    type Rejection = Response;

    async fn from_request(request: Request, _state: &S) -> Result<Form<T>, Response> {
        let bad =
            |why: &str| (StatusCode::BAD_REQUEST, format!("bad form: {why}\n")).into_response();
        let form_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        if !form_type {
            return Err(bad("expected application/x-www-form-urlencoded"));
        }
        let body = axum::body::to_bytes(request.into_body(), MAX_FORM_BYTES)
            .await
            .map_err(|_| {
                (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("a console form is at most {MAX_FORM_BYTES} bytes\n"),
                )
                    .into_response()
            })?;
        let text = std::str::from_utf8(&body).map_err(|_| bad("not UTF-8"))?;
        let pairs = berth_oci::query::parse(Some(text)).map_err(|e| bad(&e.to_string()))?;
        let value = serde_json::to_value(pairs).map_err(|e| bad(&e.to_string()))?;
        serde_json::from_value(value)
            .map(Form)
            .map_err(|e| bad(&e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_owns_its_paths_only() {
        for path in ["/", "/ui", "/ui/", "/ui/cache", "/ui/repositories/a/b"] {
            assert!(is_console_path(path), "{path}");
        }
        for path in ["/v2/", "/uix", "/metrics", "/berth/v1/cache"] {
            assert!(!is_console_path(path), "{path}");
        }
    }
}
