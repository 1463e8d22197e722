//! Every route's action in the authorization policy. One table, so that a
//! new endpoint cannot be added without deciding who may call it.

use berth_auth::{Action, MetricsAccess, Requirement};
use berth_oci::RepositoryName;
use http::Method;

use crate::route::Route;

/// Paths outside `/v2/`.
pub const TOKEN_PATH: &str = "/auth/token";
pub const JWKS_PATH: &str = "/auth/jwks";

/// What a request needs. Names that are not valid repository names need
/// nothing here: the handler refuses them with `NAME_INVALID`, and no
/// repository can have such a name.
pub fn requirement(
    method: &Method,
    path: &str,
    query: Option<&str>,
    metrics: MetricsAccess,
) -> Requirement {
    match path {
        "/healthz" | "/readyz" | TOKEN_PATH | JWKS_PATH => return Requirement::Nothing,
        "/metrics" => return Requirement::Metrics(metrics),
        // The console authenticates and authorizes each page and action
        // itself, with the same policy (sessions, forms: see `ui`).
        p if crate::ui::is_console_path(p) => return Requirement::Nothing,
        _ => {}
    }
    if let Some(admin) = path.strip_prefix("/berth/v1/") {
        return admin_requirement(admin, query);
    }
    if path == "/berth/v1" {
        return Requirement::Admin;
    }
    let route = Route::parse(path);
    let repo = |name: &str, action: Action| match RepositoryName::parse(name) {
        Ok(_) => Requirement::Repositories(vec![(name.to_string(), action)]),
        Err(_) => Requirement::Nothing,
    };
    let read_or = |write: Action| {
        if matches!(*method, Method::GET | Method::HEAD) {
            Action::Pull
        } else {
            write
        }
    };
    match route {
        Route::Base => Requirement::SignedIn,
        Route::Catalog => Requirement::Catalog,
        Route::Tags { name } | Route::Referrers { name, .. } => repo(name, Action::Pull),
        Route::Manifest { name, .. } => repo(
            name,
            match *method {
                Method::PUT => Action::Push,
                Method::DELETE => Action::Delete,
                _ => Action::Pull,
            },
        ),
        Route::Blob { name, .. } => repo(name, read_or(Action::Delete)),
        Route::UploadStart { name } | Route::Upload { name, .. } => repo(name, Action::Push),
        Route::Unknown => Requirement::Nothing,
    }
}

fn admin_requirement(rest: &str, query: Option<&str>) -> Requirement {
    if rest == "replication/feed" || rest == "replication/snapshot" {
        return Requirement::Feed;
    }
    if rest == "region/serving" || rest.starts_with("replication/peers/") {
        return Requirement::RegionControl;
    }
    let repository = || {
        berth_oci::query::parse(query)
            .ok()
            .and_then(|q| q.get("repository").cloned())
            .filter(|r| RepositoryName::parse(r).is_ok())
    };
    match rest {
        // Moving a tag back, and bringing a deleted image back, are pushes.
        "tags/restore" | "undelete" => {
            if let Some(name) = repository() {
                return Requirement::Repositories(vec![(name, Action::Push)]);
            }
        }
        // Reading a repository's history or trash is its administrator's.
        "tags/history" | "trash" => {
            if let Some(name) = repository() {
                return Requirement::RepositoryAdmin(name);
            }
        }
        _ => {}
    }
    Requirement::Admin
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: Method, path: &str) -> Requirement {
        requirement(&method, path, None, MetricsAccess::SignedIn)
    }

    fn one(name: &str, action: Action) -> Requirement {
        Requirement::Repositories(vec![(name.to_string(), action)])
    }

    #[test]
    fn every_route_maps_to_an_action() {
        use Method as M;
        assert_eq!(req(M::GET, "/v2/"), Requirement::SignedIn);
        assert_eq!(req(M::GET, "/v2/_catalog"), Requirement::Catalog);
        assert_eq!(req(M::GET, "/v2/a/b/tags/list"), one("a/b", Action::Pull));
        assert_eq!(req(M::GET, "/v2/a/manifests/x"), one("a", Action::Pull));
        assert_eq!(req(M::HEAD, "/v2/a/manifests/x"), one("a", Action::Pull));
        assert_eq!(req(M::PUT, "/v2/a/manifests/x"), one("a", Action::Push));
        assert_eq!(
            req(M::DELETE, "/v2/a/manifests/x"),
            one("a", Action::Delete)
        );
        assert_eq!(req(M::GET, "/v2/a/blobs/sha256:0"), one("a", Action::Pull));
        assert_eq!(
            req(M::DELETE, "/v2/a/blobs/sha256:0"),
            one("a", Action::Delete)
        );
        assert_eq!(req(M::POST, "/v2/a/blobs/uploads/"), one("a", Action::Push));
        assert_eq!(
            req(M::PATCH, "/v2/a/blobs/uploads/u"),
            one("a", Action::Push)
        );
        assert_eq!(req(M::PUT, "/v2/a/blobs/uploads/u"), one("a", Action::Push));
        assert_eq!(req(M::GET, "/v2/a/blobs/uploads/u"), one("a", Action::Push));
        assert_eq!(
            req(M::GET, "/v2/a/referrers/sha256:0"),
            one("a", Action::Pull)
        );
        // Invalid names are refused by the handler, unauthenticated.
        assert_eq!(req(M::GET, "/v2/A/manifests/x"), Requirement::Nothing);
        assert_eq!(req(M::GET, "/v2/nothing-here"), Requirement::Nothing);
        assert_eq!(req(M::GET, "/healthz"), Requirement::Nothing);
        // The console decides itself (ui::session).
        assert_eq!(req(M::GET, "/ui/"), Requirement::Nothing);
        assert_eq!(req(M::POST, "/ui/cache/pin"), Requirement::Nothing);
        assert_eq!(req(M::GET, "/auth/token"), Requirement::Nothing);
        assert_eq!(
            req(M::GET, "/metrics"),
            Requirement::Metrics(MetricsAccess::SignedIn)
        );
        assert_eq!(req(M::GET, "/berth/v1/replication/feed"), Requirement::Feed);
        assert_eq!(
            req(M::GET, "/berth/v1/replication/snapshot"),
            Requirement::Feed
        );
        assert_eq!(
            req(M::POST, "/berth/v1/replication/peers/us/pause"),
            Requirement::RegionControl
        );
        assert_eq!(
            req(M::POST, "/berth/v1/region/serving"),
            Requirement::RegionControl
        );
        for admin in [
            "/berth/v1/replication/status",
            "/berth/v1/replication/state",
            "/berth/v1/cache",
            "/berth/v1/cache/pin",
            "/berth/v1/tokens",
            "/berth/v1/tokens/ci",
            "/berth/v1/auth/keys",
            "/berth/v1/gc",
            "/berth/v1/compact",
            "/berth/v1/scrub",
            "/berth/v1/backups",
            "/berth/v1/backups/verify",
            "/berth/v1/backups/restore",
            "/berth/v1/retention/plan",
            "/berth/v1/retention/apply",
            "/berth/v1/unknown",
            "/berth/v1",
        ] {
            assert_eq!(req(M::GET, admin), Requirement::Admin, "{admin}");
        }
        assert_eq!(
            requirement(
                &M::GET,
                "/berth/v1/tags/history",
                Some("repository=team%2Fapp&tag=v1"),
                MetricsAccess::Public
            ),
            Requirement::RepositoryAdmin("team/app".into())
        );
        assert_eq!(
            requirement(
                &M::POST,
                "/berth/v1/tags/restore",
                Some("repository=team%2Fapp&tag=v1&digest=sha256:00"),
                MetricsAccess::Public
            ),
            one("team/app", Action::Push)
        );
        assert_eq!(
            requirement(
                &M::POST,
                "/berth/v1/undelete",
                Some("repository=team%2Fapp&reference=v1"),
                MetricsAccess::Public
            ),
            one("team/app", Action::Push)
        );
        assert_eq!(
            requirement(
                &M::GET,
                "/berth/v1/trash",
                Some("repository=team%2Fapp"),
                MetricsAccess::Public
            ),
            Requirement::RepositoryAdmin("team/app".into())
        );
        // Without a valid repository only an administrator may ask.
        for path in [
            "/berth/v1/tags/restore",
            "/berth/v1/undelete",
            "/berth/v1/trash",
        ] {
            assert_eq!(req(M::POST, path), Requirement::Admin, "{path}");
        }
        assert_eq!(
            requirement(
                &M::POST,
                "/berth/v1/undelete",
                Some("repository=Bad%20Name&reference=v1"),
                MetricsAccess::Public
            ),
            Requirement::Admin
        );
    }
}
