//! Per-request observation: a request id on the response and on every log
//! line (through a tracing span), metrics, and the API version header.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use futures_util::StreamExt;
use http::{HeaderValue, Method};
use http_body::Body as _;
use tracing::Instrument;

use crate::AppState;
use crate::error::StorageFailure;
use crate::headers::{DOCKER_API_VERSION, REQUEST_ID};
use crate::metrics::{RequestLabels, RouteLabels};
use crate::route::label_for_path;

static REQUEST_COUNTER: AtomicU64 = AtomicU64::new(0);
static PROCESS_TAG: LazyLock<u32> = LazyLock::new(rand::random);

fn request_id(incoming: Option<&HeaderValue>) -> String {
    if let Some(v) = incoming.and_then(|v| v.to_str().ok())
        && !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return v.to_string();
    }
    let n = REQUEST_COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:08x}{n:08x}", *PROCESS_TAG)
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// The request's id, for handlers and the audit trail.
#[derive(Clone)]
pub struct RequestId(pub Arc<str>);

pub async fn observe(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request_id(request.headers().get(&REQUEST_ID));
    request
        .extensions_mut()
        .insert(RequestId(Arc::from(id.as_str())));
    let route = label_for_path(request.uri().path());
    let method = method_label(request.method());
    let span = tracing::info_span!("request", id = %id, method, path = %request.uri().path());

    let metrics = state.metrics.clone();
    let mut response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    metrics
        .requests
        .get_or_create(&RequestLabels {
            route,
            method,
            status,
        })
        .inc();
    metrics.traffic.record(route, method, status);
    metrics
        .latency
        .get_or_create(&RouteLabels { route, method })
        .observe(elapsed.as_secs_f64());
    if response.extensions().get::<StorageFailure>().is_some() {
        metrics.storage_errors.inc();
    }
    let _enter = span.enter();
    if status >= 500 {
        tracing::error!(
            status,
            elapsed_ms = elapsed.as_millis() as u64,
            "request failed"
        );
    } else {
        tracing::debug!(
            status,
            elapsed_ms = elapsed.as_millis() as u64,
            "request done"
        );
    }
    drop(_enter);

    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&id) {
        headers.insert(REQUEST_ID, v);
    }
    headers.insert(DOCKER_API_VERSION, HeaderValue::from_static("registry/2.0"));

    // Count response bytes: known sizes at once, streams as they are sent
    // (the stream keeps the explicit Content-Length it was given).
    if method != "HEAD" {
        match response.body().size_hint().exact() {
            Some(n) => {
                metrics.bytes_out.inc_by(n);
            }
            None => {
                let counter = metrics.bytes_out.clone();
                // One chunk in flight per response: a storm of slow
                // downloads holds one chunk each, not hyper's whole queue.
                response = response.map(|body| {
                    Body::from_stream(berth_store::blob::pace::one_in_flight(
                        body.into_data_stream().map(move |chunk| {
                            if let Ok(c) = &chunk {
                                counter.inc_by(c.len() as u64);
                            }
                            chunk
                        }),
                    ))
                });
            }
        }
    }
    response
}
