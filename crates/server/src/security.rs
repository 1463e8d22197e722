//! The security layer in front of every route: the request's credentials
//! become an identity, the route's requirement (see `access`) is checked
//! against the policy once, here, and the outcome is audited. Handlers
//! never check again; they find the caller in the request's extensions.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use berth_auth::{
    Action, AuthFailure, AuthRequest, Authenticator, Decision, Identity, MetricsAccess, Requirement,
};
use berth_oci::ErrorCode;
use http::{HeaderMap, Method, StatusCode, Uri, header};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::AppState;
use crate::access::{self, TOKEN_PATH};
use crate::audit::{Audit, AuditEvent};
use crate::error::ApiError;
use crate::headers::DOCKER_CONTENT_DIGEST;
use crate::middleware::RequestId;
use crate::route::Route;
use crate::serve::ConnInfo;

/// An address range whose `X-Forwarded-For` and `X-Forwarded-Proto` are
/// believed (the load balancers in front of Berth).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `10.0.0.0/8`, `::1/128` or a single address.
    pub fn parse(s: &str) -> Option<Cidr> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (s.parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Cidr { net: addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 client may arrive as an IPv4-mapped IPv6 address.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let (net, addr, width) = match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => (u32::from(n) as u128, u32::from(a) as u128, 32),
            (IpAddr::V6(n), IpAddr::V6(a)) => (u128::from(n), u128::from(a), 128),
            _ => return false,
        };
        let host_bits = width - u32::from(self.prefix);
        if host_bits >= 128 {
            return true;
        }
        (net >> host_bits) == (addr >> host_bits)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub reason: &'static str,
}

pub struct SecurityMetrics {
    pub auth_failures: Family<FailureLabels, Counter>,
    pub denied: Counter,
    pub tokens_issued: Counter,
    /// Audit lines of bad tokens left out (see [`Security::audit_token_failure`]).
    pub audit_suppressed: Counter,
    /// Per address: bad tokens are not throttled (they cannot be guessed),
    /// so their audit lines are, lest a flood crowd out the events that
    /// matter.
    token_failures: berth_auth::throttle::Throttle,
}

impl Default for SecurityMetrics {
    fn default() -> Self {
        SecurityMetrics {
            auth_failures: Family::default(),
            denied: Counter::default(),
            tokens_issued: Counter::default(),
            audit_suppressed: Counter::default(),
            token_failures: berth_auth::throttle::Throttle::new(
                20.0,
                std::time::Duration::from_secs(1),
            ),
        }
    }
}

/// Authentication, authorization and audit, as configured.
pub struct Security {
    pub auth: Arc<Authenticator>,
    pub audit: Arc<Audit>,
    pub metrics_access: MetricsAccess,
    /// The token endpoint's URL for challenges, when it cannot be derived
    /// from the request (a load balancer that rewrites the host).
    pub token_realm: Option<String>,
    pub trusted_proxies: Vec<Cidr>,
    /// For a request without a usable `Host`.
    pub advertise_url: String,
    pub metrics: SecurityMetrics,
}

impl Security {
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "auth_failures",
            "Refused credentials by reason (bad_credentials, invalid_token, malformed, throttled, unavailable)",
            self.metrics.auth_failures.clone(),
        );
        registry.register(
            "auth_denied",
            "Requests by known callers that the policy refused (403)",
            self.metrics.denied.clone(),
        );
        registry.register(
            "auth_tokens_issued",
            "Tokens issued by the token service",
            self.metrics.tokens_issued.clone(),
        );
        registry.register(
            "audit_suppressed",
            "Audit events of bad tokens left out (more than 20, then one a second, per address)",
            self.metrics.audit_suppressed.clone(),
        );
        self.audit.register_metrics(registry);
    }

    /// The client's address: the connection's, or, from a trusted proxy,
    /// the last address in `X-Forwarded-For` that is not a trusted proxy.
    pub fn client_address(&self, conn: Option<&ConnInfo>, headers: &HeaderMap) -> IpAddr {
        let peer = conn.map_or(IpAddr::from([127, 0, 0, 1]), |c| c.peer.ip());
        if !self.trusted(peer) {
            return peer;
        }
        let forwarded: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|a| a.trim().parse::<IpAddr>().ok())
            .collect();
        forwarded
            .iter()
            .rev()
            .find(|a| !self.trusted(**a))
            .or(forwarded.first())
            .copied()
            .unwrap_or(peer)
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|c| c.contains(ip))
    }

    /// The token endpoint's absolute URL as this client reaches it.
    pub fn realm(&self, conn: Option<&ConnInfo>, headers: &HeaderMap, uri: &Uri) -> String {
        if let Some(realm) = &self.token_realm {
            return realm.clone();
        }
        let from_proxy = conn.is_some_and(|c| self.trusted(c.peer.ip()));
        let forwarded = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(',').next().unwrap_or("").trim().to_string())
        };
        let scheme = match forwarded("x-forwarded-proto") {
            Some(p) if from_proxy && (p == "https" || p == "http") => p,
            _ if conn.is_some_and(|c| c.tls) => "https".into(),
            _ => "http".into(),
        };
        let host = forwarded("x-forwarded-host")
            .filter(|_| from_proxy)
            .or_else(|| {
                headers
                    .get(header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            })
            .or_else(|| uri.authority().map(|a| a.to_string()))
            .filter(|h| valid_host(h));
        match host {
            Some(host) => format!("{scheme}://{host}{TOKEN_PATH}"),
            None => format!("{}{TOKEN_PATH}", self.advertise_url.trim_end_matches('/')),
        }
    }

    /// The `WWW-Authenticate` value for a 401.
    pub fn challenge(&self, realm: &str, scope: Option<&str>, error: Option<&str>) -> String {
        let settings = self.auth.settings();
        let (realm, service) = match &settings.external {
            Some(external) => (external.realm.as_str(), external.service.as_str()),
            None if settings.token_service => (realm, settings.service.as_str()),
            None => return "Basic realm=\"berth\", charset=\"UTF-8\"".into(),
        };
        let mut value = format!("Bearer realm=\"{realm}\",service=\"{service}\"");
        if let Some(scope) = scope {
            value.push_str(&format!(",scope=\"{scope}\""));
        }
        if let Some(error) = error {
            value.push_str(&format!(",error=\"{error}\""));
        }
        value
    }
}

/// A `Host` as it may appear in a URL: no quotes, spaces or paths, so it
/// cannot break out of the challenge's quoted realm.
pub(crate) fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b))
}

/// Who made the request, as the guard established it.
#[derive(Clone)]
pub struct Caller {
    pub identity: Identity,
    pub client: IpAddr,
}

/// Where a read of a pull-through namespace goes, resolved once by the
/// guard (which authorizes that repository) for the handler.
#[derive(Clone)]
pub struct CacheRoute(pub Option<berth_proxy::Target>);

/// What a handler adds to the request's audit event.
#[derive(Clone, Default)]
pub struct AuditNote {
    pub event: Option<&'static str>,
    pub detail: String,
}

fn unauthorized(message: String, challenge: String) -> Response {
    ApiError::new(ErrorCode::Unauthorized)
        .message(message)
        .header(header::WWW_AUTHENTICATE, challenge)
        .into_response()
}

pub fn throttled(wait: std::time::Duration) -> Response {
    // Whole seconds, rounded up: retrying at Retry-After succeeds.
    let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
    ApiError::new(ErrorCode::TooManyRequests)
        .message(format!(
            "too many failed sign-ins from this address or for this user; retry in {secs} s"
        ))
        .header(header::RETRY_AFTER, secs.to_string())
        .into_response()
}

impl Security {
    /// The answer to credentials that did not check out.
    pub fn failure_response(&self, failure: &AuthFailure, realm: &str) -> Response {
        let reason = match failure {
            AuthFailure::BadCredentials { .. } => "bad_credentials",
            AuthFailure::InvalidToken(_) => "invalid_token",
            AuthFailure::Malformed(_) => "malformed",
            AuthFailure::Throttled { .. } => "throttled",
            AuthFailure::Unavailable(_) => "unavailable",
        };
        self.metrics
            .auth_failures
            .get_or_create(&FailureLabels { reason })
            .inc();
        match failure {
            AuthFailure::Throttled { wait, .. } => throttled(*wait),
            AuthFailure::Unavailable(why) => {
                // The store's error stays in the log: callers here are not
                // signed in.
                tracing::warn!(error = %why, "cannot check credentials");
                ApiError::new(ErrorCode::Unavailable)
                    .message("cannot check credentials now; retry shortly")
                    .header(header::RETRY_AFTER, "1")
                    .into_response()
            }
            AuthFailure::InvalidToken(_) => unauthorized(
                failure.to_string(),
                self.challenge(realm, None, Some("invalid_token")),
            ),
            _ => unauthorized(failure.to_string(), self.challenge(realm, None, None)),
        }
    }
}

/// Who a failed sign-in claimed to be, for the audit trail: a user name
/// only when the htpasswd file knows it (people paste passwords into the
/// user field; an unknown name is not echoed).
pub fn failed_user(auth: &Authenticator, failure: &AuthFailure) -> String {
    match failure {
        AuthFailure::BadCredentials { user }
        | AuthFailure::Throttled {
            user: Some(user), ..
        } if auth.knows_user(user) => format!("user:{user}"),
        AuthFailure::BadCredentials { .. } | AuthFailure::Throttled { user: Some(_), .. } => {
            "unknown-user".into()
        }
        _ => "unknown".into(),
    }
}

/// A refusal of a request whose body is unread: the body is drained in
/// the background and the connection closed after the answer, so the
/// client, still sending, reads the answer instead of a reset, and never
/// reuses a connection the server is about to drop.
fn refuse(request: Request, idle: std::time::Duration, mut response: Response) -> Response {
    if !http_body::Body::is_end_stream(request.body()) {
        crate::body::drain(request.into_body(), idle);
        response
            .headers_mut()
            .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
    }
    response
}

/// The guard: authenticate, authorize, audit.
pub async fn guard(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let idle = state.limits.body_idle_timeout;
    let security = state.security.clone();
    let method = request.method().clone();
    // Shared bytes, not a copy.
    let original = request.uri().clone();
    let path = original.path();
    let mut requirement =
        access::requirement(&method, path, original.query(), security.metrics_access);
    if requirement == Requirement::Nothing {
        return next.run(request).await;
    }
    let conn = request.extensions().get::<ConnInfo>().cloned();
    let client = security.client_address(conn.as_ref(), request.headers());
    let request_id = request.extensions().get::<RequestId>().map(|r| r.0.clone());
    let audit_base = |identity: String, outcome: &'static str, status: u16| AuditEvent {
        identity,
        client: client.to_string(),
        outcome,
        status,
        method: method.to_string(),
        path: path.to_string(),
        request_id: request_id.as_deref().unwrap_or_default().to_string(),
        ..Default::default()
    };
    // An open registry checks only peer credentials (the feed, region
    // control); everything else is everyone's.
    let open = !security.auth.enabled()
        && !matches!(requirement, Requirement::Feed | Requirement::RegionControl);
    let identity = if open {
        Ok(Identity::Anonymous)
    } else {
        // A cheap clone (shared bytes), so the request can move on.
        let authorization = request.headers().get(header::AUTHORIZATION).cloned();
        security
            .auth
            .authenticate(&AuthRequest {
                authorization: authorization.as_ref().map(|v| v.as_bytes()),
                certificate: conn.as_ref().and_then(|c| c.certificate.as_deref()),
                client,
            })
            .await
    };
    let identity = match identity {
        Ok(identity) => identity,
        Err(failure) => {
            let realm = security.realm(conn.as_ref(), request.headers(), request.uri());
            let response = security.failure_response(&failure, &realm);
            let bad_token = matches!(
                failure,
                AuthFailure::InvalidToken(_) | AuthFailure::Malformed(_)
            );
            if bad_token
                && security
                    .metrics
                    .token_failures
                    .take(&client.to_string())
                    .is_err()
            {
                security.metrics.audit_suppressed.inc();
            } else {
                let mut event = audit_base(
                    failed_user(&security.auth, &failure),
                    "failed",
                    response.status().as_u16(),
                );
                event.event = "auth_failed";
                event.detail = failure.to_string();
                security.audit.record(event);
            }
            return refuse(request, idle, response);
        }
    };
    // A read served from the pull-through cache (`?ns=`, the mirror
    // default) is of the cache's repository: authorized as that one.
    let cache_route =
        match resolve_cache_route(&state, &identity, &method, &original, &requirement).await {
            Ok(route) => route,
            Err(response) => return refuse(request, idle, response),
        };
    if let Some(CacheRoute(Some(target))) = &cache_route {
        requirement = Requirement::Repositories(vec![(target.local.to_string(), Action::Pull)]);
    }
    let decision = security.auth.authorize(&identity, &requirement);
    let route_action = primary_action(&requirement);
    match decision {
        Decision::Allow => {}
        Decision::Challenge {
            scope,
            insufficient,
        } => {
            let realm = security.realm(conn.as_ref(), request.headers(), request.uri());
            let error = insufficient.then_some("insufficient_scope");
            let response = unauthorized(
                if insufficient {
                    "the token does not grant this action; request one with the scope in the challenge".into()
                } else {
                    "authentication required".into()
                },
                security.challenge(&realm, scope.as_deref(), error),
            );
            return refuse(request, idle, response);
        }
        Decision::Deny => {
            security.metrics.denied.inc();
            let mut event = audit_base(identity.display(), "denied", 403);
            event.event = "denied";
            event.action = route_action;
            event.repository = requirement_repository(&requirement);
            security.audit.record(event);
            let response = ApiError::new(ErrorCode::Denied)
                .message(format!(
                    "{} may not {} {}",
                    identity.display(),
                    if route_action.is_empty() {
                        "call"
                    } else {
                        route_action
                    },
                    match requirement_repository(&requirement) {
                        Some(r) => r,
                        None => "this endpoint".into(),
                    }
                ))
                .into_response();
            return refuse(request, idle, response);
        }
    }
    if security.auth.enabled() {
        restrict_mount(&security.auth, &identity, &mut request);
    }
    request.extensions_mut().insert(Caller {
        identity: identity.clone(),
        client,
    });
    if let Some(route) = cache_route {
        request.extensions_mut().insert(route);
    }
    let uri = request.uri().clone();
    let response = next.run(request).await;
    if let Some(mut event) = audited(&method, &uri, &requirement, &response) {
        let base = audit_base(identity.display(), "", response.status().as_u16());
        event.identity = base.identity;
        event.client = base.client;
        event.status = base.status;
        event.method = base.method;
        event.path = base.path;
        event.request_id = base.request_id;
        event.outcome = if response.status().is_success() {
            "ok"
        } else if response.status().is_client_error() {
            "denied"
        } else {
            "error"
        };
        if let Some(note) = response.extensions().get::<AuditNote>() {
            if let Some(kind) = note.event {
                event.event = kind;
            }
            event.detail = note.detail.clone();
        }
        security.audit.record(event);
    }
    response
}

/// The cache target of a read the cache may serve (`None` when no cache is
/// configured or the request is not such a read).
///
/// The mirror default serves names that do not exist here. Whether one
/// exists is asked only for callers who may pull it here: a caller who may
/// not gets the mirror (if it may pull that) whether or not the name
/// exists, so no answer tells it which names exist.
async fn resolve_cache_route(
    state: &AppState,
    identity: &Identity,
    method: &Method,
    uri: &Uri,
    requirement: &Requirement,
) -> Result<Option<CacheRoute>, Response> {
    let (Some(cache), Requirement::Repositories(needs)) = (&state.cache, requirement) else {
        return Ok(None);
    };
    let route = Route::parse(uri.path());
    let read = matches!(*method, Method::GET | Method::HEAD);
    let served = match route {
        Route::Tags { .. } | Route::Referrers { .. } => true,
        Route::Manifest { .. } | Route::Blob { .. } => read,
        _ => false,
    };
    let [(name, _)] = needs.as_slice() else {
        return Ok(None);
    };
    if !served {
        return Ok(None);
    }
    let failed = |e| {
        crate::error::cache_error(e, crate::error::CacheSubject::Manifest, false).into_response()
    };
    let query = berth_oci::query::parse(uri.query()).unwrap_or_default();
    let ns = query.get("ns").map(String::as_str);
    if let Some(explicit) = cache.route_explicit(name, ns) {
        return Ok(Some(CacheRoute(Some(explicit.map_err(failed)?))));
    }
    // An `?ns=` without an upstream stays local.
    if ns.is_some() {
        return Ok(Some(CacheRoute(None)));
    }
    let Some(mirror) = cache.mirror_target(name) else {
        return Ok(Some(CacheRoute(None)));
    };
    let mirror = mirror.map_err(failed)?;
    // Pushers probe for blobs with HEADs: the mirror default never answers
    // them (the handler serves those locally).
    if *method == Method::HEAD && matches!(route, Route::Blob { .. }) {
        return Ok(Some(CacheRoute(None)));
    }
    let auth = &state.security.auth;
    let local_ok = auth.granted(identity, name).allows(Action::Pull);
    let mirror_ok = auth
        .granted(identity, mirror.local.as_str())
        .allows(Action::Pull);
    let use_mirror = match (local_ok, mirror_ok) {
        (_, false) => false,
        (false, true) => true,
        (true, true) => {
            let repo = berth_oci::RepositoryName::parse(name).map_err(|e| {
                ApiError::new(ErrorCode::NameInvalid)
                    .message(e.to_string())
                    .into_response()
            })?;
            !state
                .registry
                .repository_exists(&repo)
                .await
                .map_err(|e| ApiError::from(e).into_response())?
        }
    };
    Ok(Some(CacheRoute(use_mirror.then_some(mirror))))
}

fn primary_action(requirement: &Requirement) -> &'static str {
    match requirement {
        Requirement::Repositories(needs) => needs.first().map_or("", |(_, a)| a.as_str()),
        Requirement::Admin
        | Requirement::RepositoryAdmin(_)
        | Requirement::RegionControl
        | Requirement::Feed => "admin",
        Requirement::Catalog => "pull",
        _ => "",
    }
}

fn requirement_repository(requirement: &Requirement) -> Option<String> {
    match requirement {
        Requirement::Repositories(needs) => needs.first().map(|(n, _)| n.clone()),
        Requirement::RepositoryAdmin(n) => Some(n.clone()),
        _ => None,
    }
}

/// A mount needs pull on its source. Without it, or without a source (a
/// mount from anywhere would let a digest read another repository's blob),
/// the mount is dropped from the request and the client gets an upload
/// session, which clients handle as "not mountable" (a 401 would make
/// containerd abort the push).
fn restrict_mount(auth: &Authenticator, identity: &Identity, request: &mut Request) {
    if *request.method() != Method::POST
        || !matches!(
            Route::parse(request.uri().path()),
            Route::UploadStart { .. }
        )
    {
        return;
    }
    // A query that does not parse is refused by the handler.
    let Ok(pairs) = berth_oci::query::parse_pairs(request.uri().query()) else {
        return;
    };
    let count = |key: &str| pairs.iter().filter(|(k, _)| k == key).count();
    if count("mount") == 0 && count("from") == 0 {
        return;
    }
    // Exactly one mount from exactly one source the caller may pull; a
    // repeated key (which one would the handler read?) mounts nothing.
    let allowed = count("mount") == 1
        && count("from") == 1
        && pairs
            .iter()
            .find(|(k, _)| k == "from")
            .is_some_and(|(_, from)| auth.granted(identity, from).allows(Action::Pull));
    if allowed {
        return;
    }
    let kept: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k != "mount" && k != "from")
        .map(|(k, v)| {
            format!(
                "{}={}",
                berth_oci::query::encode(k),
                berth_oci::query::encode(v)
            )
        })
        .collect();
    let path = request.uri().path().to_string();
    let rewritten = if kept.is_empty() {
        path.clone()
    } else {
        format!("{path}?{}", kept.join("&"))
    };
    // Fail closed: if the rewritten URI does not build, drop the query.
    let uri = rewritten
        .parse::<Uri>()
        .or_else(|_| path.parse::<Uri>())
        .unwrap_or_else(|_| Uri::from_static("/v2/"));
    *request.uri_mut() = uri;
}

/// The audit event of a request that changed something, if it did.
fn audited(
    method: &Method,
    uri: &Uri,
    requirement: &Requirement,
    response: &Response,
) -> Option<AuditEvent> {
    let digest = response
        .headers()
        .get(&DOCKER_CONTENT_DIGEST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut event = AuditEvent::default();
    match requirement {
        Requirement::Admin | Requirement::RepositoryAdmin(_) | Requirement::RegionControl => {
            if matches!(*method, Method::GET | Method::HEAD) {
                return None;
            }
            event.event = "admin";
            event.action = "admin";
            event.repository = requirement_repository(requirement);
            return Some(event);
        }
        Requirement::Repositories(_) => {}
        _ => return None,
    }
    // Operator endpoints that act on one repository with a push's right.
    if let Some(admin) = uri.path().strip_prefix("/berth/v1/") {
        let query = berth_oci::query::parse(uri.query()).unwrap_or_default();
        event.event = match admin {
            "tags/restore" => "tag_restore",
            "undelete" => "undelete",
            _ => return None,
        };
        event.action = "push";
        event.repository = query.get("repository").cloned();
        event.reference = query.get("tag").or_else(|| query.get("reference")).cloned();
        event.digest = query.get("digest").cloned();
        return Some(event);
    }
    match Route::parse(uri.path()) {
        Route::Manifest { name, reference } if *method == Method::PUT => {
            event.event = "push";
            event.action = "push";
            event.repository = Some(name.to_string());
            event.reference = Some(reference.to_string());
            event.digest = digest;
        }
        Route::Manifest { name, reference } if *method == Method::DELETE => {
            event.event = "delete";
            event.action = "delete";
            event.repository = Some(name.to_string());
            event.reference = Some(reference.to_string());
        }
        Route::Blob { name, digest: d } if *method == Method::DELETE => {
            event.event = "delete";
            event.action = "delete";
            event.repository = Some(name.to_string());
            event.digest = Some(d.to_string());
        }
        Route::UploadStart { name } | Route::Upload { name, .. }
            if response.status() == StatusCode::CREATED =>
        {
            let pairs = berth_oci::query::parse_pairs(uri.query()).unwrap_or_default();
            let from = pairs.iter().find(|(k, _)| k == "from").map(|(_, v)| v);
            let mount = pairs.iter().any(|(k, _)| k == "mount");
            event.event = if mount { "mount" } else { "upload" };
            event.action = "push";
            event.repository = Some(name.to_string());
            event.digest = digest;
            if mount && let Some(from) = from {
                event.detail = format!("from {from}");
            }
        }
        _ => return None,
    }
    Some(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        assert!(
            Cidr::parse("127.0.0.1")
                .unwrap()
                .contains("127.0.0.1".parse().unwrap())
        );
        assert!(
            !Cidr::parse("127.0.0.1")
                .unwrap()
                .contains("127.0.0.2".parse().unwrap())
        );
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        assert!(
            Cidr::parse("::/0")
                .unwrap()
                .contains("2001:db8::1".parse().unwrap())
        );
        for bad in ["", "10.0.0.0/33", "x", "10.0.0.0/x", "::/129"] {
            assert!(Cidr::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn hosts_cannot_break_the_challenge() {
        assert!(valid_host("registry.example:5000"));
        assert!(valid_host("[::1]:5000"));
        assert!(!valid_host("a\",b"));
        assert!(!valid_host("a/b"));
        assert!(!valid_host(""));
    }
}
