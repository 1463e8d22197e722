//! The `/v2/` API handlers.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use berth_oci::range::parse_content_range;
use berth_oci::{Digest, ErrorCode, Reference, RepositoryName, media_type};
use berth_proxy::{BlobAnswer, Target};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use tokio::sync::OwnedSemaphorePermit;

use crate::AppState;
use crate::body::{UnreadBody, body_stream, read_bounded};
use crate::error::{ApiError, CacheSubject, cache_error};
use crate::headers::{
    DOCKER_CONTENT_DIGEST, DOCKER_UPLOAD_UUID, OCI_FILTERS_APPLIED, OCI_SUBJECT, upload_range,
};
use crate::route::Route;
use crate::security::{CacheRoute, Caller};

type ApiResult = Result<Response, ApiError>;

pub async fn not_found() -> Response {
    ApiError::new(ErrorCode::Unsupported)
        .status(StatusCode::NOT_FOUND)
        .message("no such endpoint")
        .into_response()
}

pub async fn dispatch(
    State(state): State<AppState>,
    caller: Option<axum::Extension<Caller>>,
    cache_route: Option<axum::Extension<CacheRoute>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let query = match parse_query(uri.query()) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    // Computed before the body is wrapped: the wrapper cannot tell.
    let has_body = !http_body::Body::is_end_stream(&body);
    let body = if matches!(method, Method::PUT | Method::PATCH | Method::POST) {
        Body::from_stream(UnreadBody::new(body, state.limits.body_idle_timeout))
    } else {
        body
    };
    let ctx = Ctx {
        has_body,
        caller: caller.as_ref().map(|c| &c.0),
        cache_route: cache_route.as_ref().map(|c| &c.0),
        state: &state,
        method: &method,
        headers: &headers,
        query: &query,
    };
    let sends_body = matches!(method, Method::PUT | Method::PATCH | Method::POST);
    let route = Route::parse(uri.path());
    if let (Some(cache), Some(name)) = (&state.cache, route.name())
        && let Some(namespace) = cache.owner(name)
        && !matches!(method, Method::GET | Method::HEAD)
    {
        return read_only(namespace).into_response();
    }
    let result = match route {
        Route::Base => match method {
            Method::GET | Method::HEAD => {
                Ok(([(header::CONTENT_TYPE, "application/json")], "{}").into_response())
            }
            _ => Err(unsupported()),
        },
        Route::Catalog => ctx.catalog().await,
        Route::Tags { name } => ctx.tags(name).await,
        Route::Manifest { name, reference } => ctx.manifest(name, reference, body).await,
        Route::Blob { name, digest } => ctx.blob(name, digest).await,
        Route::UploadStart { name } => ctx.upload_start(name, body).await,
        Route::Upload { name, id } => ctx.upload(name, id, body).await,
        Route::Referrers { name, digest } => ctx.referrers(name, digest).await,
        Route::Unknown => return not_found().await,
    };
    match result {
        Ok(response) => response,
        Err(e) => {
            let mut response = e.into_response();
            if sends_body {
                // The body may be partly unread: end the connection after
                // this response so its leftovers are never parsed as a request.
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
    }
}

struct Ctx<'a> {
    has_body: bool,
    /// Who is calling, as the security guard established it.
    caller: Option<&'a Caller>,
    /// The pull-through cache's target, as the guard resolved it.
    cache_route: Option<&'a CacheRoute>,
    state: &'a AppState,
    method: &'a Method,
    headers: &'a HeaderMap,
    query: &'a HashMap<String, String>,
}

/// A write into an upstream's namespace.
fn read_only(namespace: &str) -> ApiError {
    ApiError::new(ErrorCode::Denied).message(format!(
        "{namespace}/... is a read-only pull-through cache of an upstream registry; push elsewhere"
    ))
}

/// A miss that a peer region may be able to serve.
fn is_missing(e: &berth_registry::RegistryError) -> bool {
    matches!(
        e,
        berth_registry::RegistryError::ManifestUnknown | berth_registry::RegistryError::NameUnknown
    )
}

fn unsupported() -> ApiError {
    ApiError::new(ErrorCode::Unsupported).message("method not allowed on this endpoint")
}

fn parse_name(name: &str) -> Result<RepositoryName, ApiError> {
    RepositoryName::parse(name)
        .map_err(|e| ApiError::new(ErrorCode::NameInvalid).message(e.to_string()))
}

fn parse_digest(s: &str) -> Result<Digest, ApiError> {
    s.parse::<Digest>().map_err(|e| {
        ApiError::new(ErrorCode::DigestInvalid).message(format!("invalid digest {s:?}: {e}"))
    })
}

fn parse_query(query: Option<&str>) -> Result<HashMap<String, String>, ApiError> {
    berth_oci::query::parse(query).map_err(|e| {
        ApiError::new(ErrorCode::Unsupported)
            .status(StatusCode::BAD_REQUEST)
            .message(e.to_string())
    })
}

fn header_str<'h>(headers: &'h HeaderMap, name: &header::HeaderName) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn content_length(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    match headers.get(header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| ApiError::new(ErrorCode::SizeInvalid).message("invalid Content-Length")),
    }
}

fn blob_location(name: &RepositoryName, digest: &Digest) -> String {
    format!("/v2/{name}/blobs/{digest}")
}

fn upload_location(name: &RepositoryName, id: &str) -> String {
    format!("/v2/{name}/blobs/uploads/{id}")
}

fn with_headers(
    status: StatusCode,
    headers: Vec<(header::HeaderName, String)>,
    body: Body,
) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let map = response.headers_mut();
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            map.insert(name, v);
        }
    }
    response
}

fn upload_accepted(status: StatusCode, name: &RepositoryName, id: &str, size: u64) -> Response {
    let mut headers = vec![
        (header::LOCATION, upload_location(name, id)),
        (header::RANGE, upload_range(size)),
        (DOCKER_UPLOAD_UUID, id.to_string()),
    ];
    // A 204 must not carry Content-Length (RFC 9110, 8.6).
    if status != StatusCode::NO_CONTENT {
        headers.push((header::CONTENT_LENGTH, "0".into()));
    }
    with_headers(status, headers, Body::empty())
}

fn blob_created(name: &RepositoryName, digest: &Digest) -> Response {
    with_headers(
        StatusCode::CREATED,
        vec![
            (header::LOCATION, blob_location(name, digest)),
            (DOCKER_CONTENT_DIGEST, digest.to_string()),
            (header::CONTENT_LENGTH, "0".into()),
        ],
        Body::empty(),
    )
}

/// Media types listed in the Accept headers, without parameters.
fn accepted_types(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(media_type::essence)
        .filter(|t| !t.is_empty())
        .take(64)
        .collect()
}

impl Ctx<'_> {
    /// The cache target of a read of `name`, if the cache serves it.
    async fn cache_target(&self, name: &str) -> Result<Option<Target>, ApiError> {
        // Resolved once, by the security guard, which authorized the
        // repository it resolved to.
        if let Some(route) = self.cache_route {
            return Ok(route.0.clone());
        }
        let Some(cache) = &self.state.cache else {
            return Ok(None);
        };
        let ns = self.query.get("ns").map(String::as_str);
        cache
            .route(name, ns)
            .await
            .map_err(|e| cache_error(e, CacheSubject::Manifest, false))
    }

    /// Whether this request may read through to peer regions (it may not
    /// when a peer itself asks: it wants this region's own content).
    fn replicator(&self) -> Option<&berth_replication::Replicator> {
        if self.headers.contains_key("x-berth-local-only") {
            return None;
        }
        self.state.replication.as_deref()
    }

    async fn read_through_manifest(
        &self,
        name: &RepositoryName,
        reference: &Reference,
    ) -> Option<Digest> {
        self.replicator()?
            .read_through_manifest(name, reference)
            .await
    }

    /// A blob missing here, from a peer region (None: not missing, or no
    /// peer has it).
    async fn read_through_blob(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        head: bool,
        ranged: bool,
    ) -> Result<Option<BlobAnswer>, ApiError> {
        let Some(replicator) = self.replicator() else {
            return Ok(None);
        };
        // Pushers probe for blobs with HEADs: a blob that is not linked in
        // this repository must not look present, or the client skips an
        // upload its manifest then lacks.
        if head {
            return Ok(None);
        }
        match self.state.registry.stat_blob(name, digest).await {
            Ok(_) => Ok(None),
            Err(berth_registry::RegistryError::BlobUnknown(_)) => Ok(replicator
                .read_through_blob(name, digest, head, ranged)
                .await),
            Err(e) => Err(e.into()),
        }
    }

    /// Admits a request that streams blob content in: within the size limit
    /// (when announced) and within the concurrent upload limit (429 past it).
    /// The returned permit is held until the content is stored. (A refused
    /// body is drained in the background when dropped; see `UnreadBody`.)
    async fn admit_upload(&self, body: Body) -> Result<(OwnedSemaphorePermit, Body), ApiError> {
        let limit = self.state.registry.limits().max_blob_bytes;
        if let Some(n) = content_length(self.headers)?
            && n > limit
        {
            return Err(berth_registry::RegistryError::TooLarge { limit }.into());
        }
        let permit = self
            .state
            .limits
            .upload_slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                ApiError::new(ErrorCode::TooManyRequests)
                    .message("too many uploads in progress; retry shortly")
                    .header(header::RETRY_AFTER, "1")
            })?;
        Ok((permit, body))
    }

    fn page_params(&self) -> Result<(Option<usize>, Option<&str>), ApiError> {
        let n = match self.query.get("n") {
            None => None,
            Some(n) => Some(n.parse::<usize>().map_err(|_| {
                ApiError::new(ErrorCode::SizeInvalid)
                    .message("query parameter n must be a non-negative integer")
            })?),
        };
        Ok((n, self.query.get("last").map(String::as_str)))
    }

    async fn catalog(&self) -> ApiResult {
        if !matches!(*self.method, Method::GET | Method::HEAD) {
            return Err(unsupported());
        }
        let (n, last) = self.page_params()?;
        let page = self.catalog_page(last, n).await?;
        let link = page.items.last().filter(|_| page.more).map(|last| {
            format!(
                "</v2/_catalog?n={}&last={}>; rel=\"next\"",
                n.unwrap_or(page.items.len()),
                last
            )
        });
        Ok(json_page(
            serde_json::json!({ "repositories": page.items }),
            link,
        ))
    }

    /// A page of the catalog, holding only repositories the caller may pull
    /// when a policy applies. Filtering reads on past what it drops, up to
    /// a bound, so a page is full whenever enough repositories follow.
    async fn catalog_page(
        &self,
        last: Option<&str>,
        n: Option<usize>,
    ) -> Result<berth_registry::Page, ApiError> {
        let registry = &self.state.registry;
        let auth = &self.state.security.auth;
        let caller = match self.caller {
            Some(c) if auth.enabled() => c,
            _ => return Ok(registry.catalog(last, n).await?),
        };
        let want = n
            .unwrap_or(registry.limits().max_page)
            .min(registry.limits().max_page);
        // A caller who may see few repositories gets short pages (with a
        // Link to go on) after a bounded scan. The Link names the last
        // repository returned, so a page is never empty while more follow:
        // the scan goes on until it finds one, or the catalog ends.
        const SCAN_PER_PAGE: usize = 10_000;
        let mut items = Vec::new();
        let mut cursor = last.map(str::to_string);
        let mut scanned = 0;
        let mut more = want > 0;
        while more && items.len() < want && (scanned < SCAN_PER_PAGE || items.is_empty()) {
            let page = registry
                .catalog(cursor.as_deref(), Some(want.max(100)))
                .await?;
            more = page.more;
            let count = page.items.len();
            for (i, name) in page.items.into_iter().enumerate() {
                scanned += 1;
                cursor = Some(name.clone());
                if auth.may_list(&caller.identity, &name) {
                    items.push(name);
                    if items.len() == want {
                        more |= i + 1 < count;
                        break;
                    }
                }
            }
        }
        Ok(berth_registry::Page { items, more })
    }

    async fn tags(&self, name: &str) -> ApiResult {
        let name = match self.cache_target(name).await? {
            // The tags cached so far.
            Some(target) => target.local,
            None => parse_name(name)?,
        };
        if !matches!(*self.method, Method::GET | Method::HEAD) {
            return Err(unsupported());
        }
        let (n, last) = self.page_params()?;
        let page = self.state.registry.list_tags(&name, last, n).await?;
        let link = page.items.last().filter(|_| page.more).map(|last| {
            format!(
                "</v2/{name}/tags/list?n={}&last={}>; rel=\"next\"",
                n.unwrap_or(page.items.len()),
                last
            )
        });
        Ok(json_page(
            serde_json::json!({ "name": name.as_str(), "tags": page.items }),
            link,
        ))
    }

    async fn referrers(&self, name: &str, digest: &str) -> ApiResult {
        let name = match self.cache_target(name).await? {
            Some(target) => target.local,
            None => parse_name(name)?,
        };
        let subject = parse_digest(digest)?;
        if !matches!(*self.method, Method::GET | Method::HEAD) {
            return Err(unsupported());
        }
        let filter = self.query.get("artifactType").map(String::as_str);
        let last = match self.query.get("last") {
            Some(l) => Some(parse_digest(l)?),
            None => None,
        };
        let (manifests, more) = self
            .state
            .registry
            .referrers(&name, &subject, filter, last.as_ref())
            .await?;
        let body = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media_type::OCI_INDEX,
            "manifests": manifests,
        }))
        .unwrap_or_default();
        let mut headers = vec![(header::CONTENT_TYPE, media_type::OCI_INDEX.to_string())];
        if filter.is_some() {
            headers.push((OCI_FILTERS_APPLIED, "artifactType".into()));
        }
        if more && let Some(next) = manifests.last() {
            let mut link = format!("</v2/{name}/referrers/{subject}?last={}", next.digest);
            if let Some(t) = filter {
                link.push_str("&artifactType=");
                link.push_str(&berth_oci::query::encode(t));
            }
            link.push_str(">; rel=\"next\"");
            headers.push((header::LINK, link));
        }
        Ok(with_headers(StatusCode::OK, headers, Body::from(body)))
    }

    async fn manifest(&self, name: &str, reference: &str, body: Body) -> ApiResult {
        let name = parse_name(name)?;
        let reference = Reference::parse(reference).map_err(|e| match e {
            // A reference that cannot exist is simply not there (clients and
            // the conformance tests expect 404); pushing to it is a 400.
            _ if *self.method != Method::PUT => ApiError::new(ErrorCode::ManifestUnknown)
                .message(format!("no manifest {reference:?}: {e}")),
            berth_oci::reference::ReferenceError::Digest(d) => {
                ApiError::new(ErrorCode::DigestInvalid).message(format!("invalid digest: {d}"))
            }
            berth_oci::reference::ReferenceError::Tag(t) => {
                ApiError::new(ErrorCode::ManifestInvalid).message(t.to_string())
            }
        })?;
        let registry = &self.state.registry;
        let name = match *self.method {
            Method::GET | Method::HEAD => match self.cache_target(name.as_str()).await? {
                Some(target) => {
                    if let Some(cache) = &self.state.cache {
                        cache
                            .ensure_manifest_for(&target, &reference, &accepted_types(self.headers))
                            .await
                            .map_err(|e| {
                                cache_error(e, CacheSubject::Manifest, target.via_mirror_default)
                            })?;
                    }
                    target.local
                }
                None => name,
            },
            _ => name,
        };
        match *self.method {
            Method::GET => {
                let accept = accepted_types(self.headers);
                let content = match registry.get_manifest(&name, &reference, &accept).await {
                    Err(e) if is_missing(&e) => {
                        match self.read_through_manifest(&name, &reference).await {
                            Some(digest) => {
                                registry
                                    .get_manifest(&name, &Reference::Digest(digest), &accept)
                                    .await?
                            }
                            None => return Err(e.into()),
                        }
                    }
                    result => result?,
                };
                Ok(with_headers(
                    StatusCode::OK,
                    vec![
                        (header::CONTENT_TYPE, content.media_type),
                        (header::CONTENT_LENGTH, content.bytes.len().to_string()),
                        (DOCKER_CONTENT_DIGEST, content.digest.to_string()),
                        (header::ETAG, format!("\"{}\"", content.digest)),
                    ],
                    Body::from(content.bytes),
                ))
            }
            Method::HEAD => {
                let accept = accepted_types(self.headers);
                let (digest, record) =
                    match registry.manifest_head(&name, &reference, &accept).await {
                        Err(e) if is_missing(&e) => {
                            match self.read_through_manifest(&name, &reference).await {
                                Some(digest) => {
                                    registry
                                        .manifest_head(&name, &Reference::Digest(digest), &accept)
                                        .await?
                                }
                                None => return Err(e.into()),
                            }
                        }
                        result => result?,
                    };
                Ok(with_headers(
                    StatusCode::OK,
                    vec![
                        (header::CONTENT_TYPE, record.media_type),
                        (header::CONTENT_LENGTH, record.size.to_string()),
                        (DOCKER_CONTENT_DIGEST, digest.to_string()),
                        (header::ETAG, format!("\"{digest}\"")),
                    ],
                    Body::empty(),
                ))
            }
            Method::PUT => {
                let limit = registry.limits().max_manifest_bytes;
                let too_large = || -> ApiError {
                    ApiError::new(ErrorCode::SizeInvalid)
                        .status(StatusCode::PAYLOAD_TOO_LARGE)
                        .message(format!("manifest exceeds the limit of {limit} bytes"))
                };
                if let Some(n) = content_length(self.headers)?
                    && n > limit
                {
                    return Err(too_large());
                }
                let bytes = read_bounded(self.state, body, limit)
                    .await?
                    .ok_or_else(too_large)?;
                let content_type = header_str(self.headers, &header::CONTENT_TYPE);
                let by = crate::tags_admin::author(self.state, self.caller);
                let outcome = registry
                    .put_manifest_by(&name, &reference, content_type, bytes, by.as_deref())
                    .await?;
                let mut headers = vec![
                    (
                        header::LOCATION,
                        format!("/v2/{name}/manifests/{}", outcome.digest),
                    ),
                    (DOCKER_CONTENT_DIGEST, outcome.digest.to_string()),
                    (header::CONTENT_LENGTH, "0".into()),
                ];
                if let Some(subject) = outcome.subject {
                    headers.push((OCI_SUBJECT, subject.to_string()));
                }
                Ok(with_headers(StatusCode::CREATED, headers, Body::empty()))
            }
            Method::DELETE => {
                let by = crate::tags_admin::author(self.state, self.caller);
                registry
                    .delete_manifest_by(&name, &reference, by.as_deref())
                    .await?;
                Ok(with_headers(
                    StatusCode::ACCEPTED,
                    vec![(header::CONTENT_LENGTH, "0".into())],
                    Body::empty(),
                ))
            }
            _ => Err(unsupported()),
        }
    }

    async fn blob(&self, name: &str, digest: &str) -> ApiResult {
        let name = parse_name(name)?;
        let digest = parse_digest(digest)?;
        let registry = &self.state.registry;
        match *self.method {
            Method::GET | Method::HEAD => {
                let mut headers = vec![
                    (header::CONTENT_TYPE, media_type::OCTET_STREAM.to_string()),
                    (DOCKER_CONTENT_DIGEST, digest.to_string()),
                    (header::ACCEPT_RANGES, "bytes".to_string()),
                    (header::ETAG, format!("\"{digest}\"")),
                ];
                // Pushers probe for blobs with HEADs: for a repository that is
                // not here, the mirror default must not answer them (the
                // client would skip an upload its manifest then lacks).
                let target = self
                    .cache_target(name.as_str())
                    .await?
                    .filter(|t| !(t.via_mirror_default && *self.method == Method::HEAD));
                let head = *self.method == Method::HEAD;
                let ranged = self.headers.contains_key(header::RANGE);
                let (name, answer) = match (target, &self.state.cache) {
                    (Some(target), Some(cache)) => {
                        let answer =
                            cache
                                .blob(&target, &digest, head, ranged)
                                .await
                                .map_err(|e| {
                                    cache_error(e, CacheSubject::Blob, target.via_mirror_default)
                                })?;
                        (target.local, Some(answer))
                    }
                    _ => {
                        let answer = self.read_through_blob(&name, &digest, head, ranged).await?;
                        (name, answer)
                    }
                };
                match answer {
                    Some(BlobAnswer::Remote { size }) => {
                        headers.push((header::CONTENT_LENGTH, size.to_string()));
                        return Ok(with_headers(StatusCode::OK, headers, Body::empty()));
                    }
                    Some(BlobAnswer::Streaming { stream, size }) => {
                        if let Some(size) = size {
                            headers.push((header::CONTENT_LENGTH, size.to_string()));
                        }
                        return Ok(with_headers(
                            StatusCode::OK,
                            headers,
                            Body::from_stream(stream),
                        ));
                    }
                    Some(BlobAnswer::Local) | None => {}
                }
                if *self.method == Method::HEAD {
                    let size = registry.confirm_blob(&name, &digest).await?;
                    headers.push((header::CONTENT_LENGTH, size.to_string()));
                    return Ok(with_headers(StatusCode::OK, headers, Body::empty()));
                }
                if let Some(url) = registry.blob_redirect(&name, &digest).await? {
                    // The storage serves the bytes (and the Range) itself.
                    return Ok(with_headers(
                        StatusCode::TEMPORARY_REDIRECT,
                        vec![
                            (header::LOCATION, url),
                            (DOCKER_CONTENT_DIGEST, digest.to_string()),
                            (header::CONTENT_LENGTH, "0".into()),
                        ],
                        Body::empty(),
                    ));
                }
                let range_header = header_str(self.headers, &header::RANGE);
                let (read, range) = registry.read_blob(&name, &digest, range_header).await?;
                let status = match range {
                    Some(r) => {
                        headers.push((
                            header::CONTENT_RANGE,
                            format!("bytes {}-{}/{}", r.start, r.end, read.size),
                        ));
                        headers.push((header::CONTENT_LENGTH, r.len().to_string()));
                        StatusCode::PARTIAL_CONTENT
                    }
                    None => {
                        headers.push((header::CONTENT_LENGTH, read.size.to_string()));
                        StatusCode::OK
                    }
                };
                Ok(with_headers(
                    status,
                    headers,
                    Body::from_stream(read.stream),
                ))
            }
            Method::DELETE => {
                registry.delete_blob(&name, &digest).await?;
                Ok(with_headers(
                    StatusCode::ACCEPTED,
                    vec![(header::CONTENT_LENGTH, "0".into())],
                    Body::empty(),
                ))
            }
            _ => Err(unsupported()),
        }
    }

    async fn upload_start(&self, name: &str, body: Body) -> ApiResult {
        let name = parse_name(name)?;
        if *self.method != Method::POST {
            return Err(unsupported());
        }
        let registry = &self.state.registry;
        if let Some(mount) = self.query.get("mount") {
            let digest = parse_digest(mount)?;
            let from = match self.query.get("from") {
                Some(from) => Some(parse_name(from)?),
                None => None,
            };
            if registry
                .mount_blob(&name, &digest, from.as_ref())
                .await?
                .is_some()
            {
                return Ok(blob_created(&name, &digest));
            }
            // Not mountable: the client falls back to a normal upload.
        } else if let Some(digest) = self.query.get("digest") {
            let digest = parse_digest(digest)?;
            let (_slot, body) = self.admit_upload(body).await?;
            registry
                .put_blob(&name, &digest, body_stream(self.state, body))
                .await?;
            return Ok(blob_created(&name, &digest));
        }
        let id = registry.start_upload(&name).await?;
        Ok(upload_accepted(StatusCode::ACCEPTED, &name, &id, 0))
    }

    async fn upload(&self, name: &str, id: &str, body: Body) -> ApiResult {
        let name = parse_name(name)?;
        let registry = &self.state.registry;
        let chunk = |headers: &HeaderMap| -> Result<_, ApiError> {
            let range = match header_str(headers, &header::CONTENT_RANGE) {
                None => None,
                Some(h) => Some(parse_content_range(h).map_err(|_| {
                    ApiError::new(ErrorCode::BlobUploadInvalid)
                        .status(StatusCode::RANGE_NOT_SATISFIABLE)
                        .message(format!("malformed Content-Range {h:?}"))
                })?),
            };
            Ok((range, content_length(headers)?))
        };
        let add_location = |e: ApiError| {
            e.header(header::LOCATION, upload_location(&name, id))
                .header(DOCKER_UPLOAD_UUID, id)
        };
        match *self.method {
            Method::GET => {
                let status = registry.upload_status(&name, id).await?;
                Ok(upload_accepted(
                    StatusCode::NO_CONTENT,
                    &name,
                    id,
                    status.size,
                ))
            }
            Method::PATCH => {
                let (_slot, body) = self.admit_upload(body).await.map_err(add_location)?;
                let (range, len) = chunk(self.headers).map_err(add_location)?;
                let status = registry
                    .append_upload(&name, id, range, len, body_stream(self.state, body))
                    .await
                    .map_err(|e| add_location(e.into()))?;
                Ok(upload_accepted(
                    StatusCode::ACCEPTED,
                    &name,
                    id,
                    status.size,
                ))
            }
            Method::PUT => {
                let digest = self.query.get("digest").ok_or_else(|| {
                    ApiError::new(ErrorCode::DigestInvalid)
                        .message("the digest query parameter is required to complete an upload")
                })?;
                let digest = parse_digest(digest)?;
                let (final_chunk, _slot) = if self.has_body {
                    let (slot, body) = self.admit_upload(body).await.map_err(add_location)?;
                    let (range, len) = chunk(self.headers).map_err(add_location)?;
                    (
                        Some((range, len, body_stream(self.state, body))),
                        Some(slot),
                    )
                } else {
                    (None, None)
                };
                registry
                    .complete_upload(&name, id, &digest, final_chunk)
                    .await
                    .map_err(|e| match e {
                        e @ berth_registry::RegistryError::RangeMismatch { .. } => {
                            add_location(e.into())
                        }
                        e => e.into(),
                    })?;
                Ok(blob_created(&name, &digest))
            }
            Method::DELETE => {
                registry.cancel_upload(&name, id).await?;
                Ok(with_headers(
                    StatusCode::NO_CONTENT,
                    Vec::new(),
                    Body::empty(),
                ))
            }
            _ => Err(unsupported()),
        }
    }
}

fn json_page(body: serde_json::Value, link: Option<String>) -> Response {
    let mut headers = vec![(header::CONTENT_TYPE, "application/json".to_string())];
    if let Some(link) = link {
        headers.push((header::LINK, link));
    }
    with_headers(StatusCode::OK, headers, Body::from(body.to_string()))
}
