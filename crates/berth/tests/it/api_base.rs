//! Base endpoint, health/readiness, metrics, request ids and logging.

use std::collections::HashSet;
use std::time::Duration;

use crate::support::*;

#[tokio::test]
async fn v2_base_returns_200_with_distribution_api_version_header() {
    let reg = Registry::start().await;
    let r = reg.get("/v2/").await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(
        r.header("docker-distribution-api-version").as_deref(),
        Some("registry/2.0"),
        "{}",
        r.describe()
    );
    // Also without the trailing slash variant clients sometimes use: must not 5xx.
    let r = reg.get("/v2").await;
    expect_no_5xx(&r, "GET /v2");
    let r = reg.head("/v2/").await;
    assert_eq!(r.status, 200, "HEAD /v2/: {}", r.describe());
}

#[tokio::test]
async fn healthz_and_readyz_return_200_when_ready() {
    let reg = Registry::start().await;
    let r = reg.get("/healthz").await;
    assert_eq!(r.status, 200, "{}", r.describe());
    let r = reg.get("/readyz").await;
    assert_eq!(r.status, 200, "{}", r.describe());
}

#[tokio::test]
async fn metrics_endpoint_exposes_prometheus_text() {
    let reg = Registry::start().await;
    // Generate some traffic, including an error.
    for _ in 0..3 {
        reg.get("/v2/").await;
    }
    reg.get("/v2/metrics/probe/manifests/nope").await;
    let r = reg.get("/metrics").await;
    assert_eq!(r.status, 200, "{}", r.describe());
    let ct = r.header("content-type").unwrap_or_default();
    assert!(
        ct.starts_with("text/plain") || ct.starts_with("application/openmetrics-text"),
        "unexpected metrics content type {ct:?}"
    );
    let text = r.text();
    assert!(
        text.contains("berth_http_requests_total"),
        "metrics lack berth_http_requests_total:\n{}",
        truncate(&text, 3000)
    );
    // Prometheus text format: every non-comment line is `name{labels} value`.
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let rest = match line.rfind('}') {
            Some(i) => &line[i + 1..],
            None => line.split_once(' ').map(|(_, r)| r).unwrap_or(""),
        };
        let value = rest.split_whitespace().next().unwrap_or("");
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "malformed metrics line {line:?}"
        );
    }
}

/// Sum of all samples of `metric` (any labels) in a Prometheus text exposition.
fn metric_sum(text: &str, metric: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| {
            let rest = match l.rfind('}') {
                Some(i) => &l[i + 1..],
                None => &l[metric.len()..],
            };
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

#[tokio::test]
async fn request_counter_increases_with_traffic() {
    let reg = Registry::start().await;
    reg.get("/v2/").await;
    let before = metric_sum(
        &reg.get("/metrics").await.text(),
        "berth_http_requests_total",
    );
    for _ in 0..7 {
        reg.get("/v2/").await;
    }
    reg.get("/v2/counter/repo/manifests/missing").await;
    let text = reg.get("/metrics").await.text();
    let after = metric_sum(&text, "berth_http_requests_total");
    assert!(
        after >= before + 8.0,
        "berth_http_requests_total went from {before} to {after}:\n{}",
        truncate(&text, 3000)
    );
}

#[tokio::test]
async fn byte_counters_count_blob_and_manifest_bodies_both_ways() {
    let reg = Registry::start().await;
    let sums = |text: &str| {
        (
            metric_sum(text, "berth_http_request_body_bytes_total"),
            metric_sum(text, "berth_http_response_body_bytes_total"),
        )
    };
    let (in_before, out_before) = sums(&reg.get("/metrics").await.text());
    let image = Image::oci(fresh_seed(), 2, 50_000);
    image.push(&reg, "metrics/bytes", Some("v1")).await;
    let pushed = image.manifest.len()
        + image.config.len()
        + image.layers.iter().map(Vec::len).sum::<usize>();
    let pulled = reg.get("/v2/metrics/bytes/manifests/v1").await.body.len()
        + reg
            .get(&format!(
                "/v2/metrics/bytes/blobs/{}",
                sha256_digest(&image.layers[0])
            ))
            .await
            .body
            .len();
    let (in_after, out_after) = sums(&reg.get("/metrics").await.text());
    assert!(
        in_after - in_before >= pushed as f64,
        "request bytes grew by {} for {pushed} pushed",
        in_after - in_before
    );
    assert!(
        out_after - out_before >= pulled as f64,
        "response bytes grew by {} for {pulled} pulled",
        out_after - out_before
    );
}

#[tokio::test]
async fn every_response_carries_a_unique_x_request_id() {
    let reg = Registry::start().await;
    let data = random_bytes(fresh_seed(), 64);
    let digest = reg.push_blob("reqid/repo", &data).await;
    let mut responses = vec![
        ("GET /v2/", reg.get("/v2/").await),
        ("GET /healthz", reg.get("/healthz").await),
        ("GET /readyz", reg.get("/readyz").await),
        ("GET /metrics", reg.get("/metrics").await),
        (
            "GET blob",
            reg.get(&format!("/v2/reqid/repo/blobs/{digest}")).await,
        ),
        (
            "HEAD blob",
            reg.head(&format!("/v2/reqid/repo/blobs/{digest}")).await,
        ),
        (
            "GET unknown blob",
            reg.get(&format!(
                "/v2/reqid/repo/blobs/{}",
                sha256_digest(b"unknown")
            ))
            .await,
        ),
        ("GET invalid name", reg.get("/v2/BAD/tags/list").await),
        (
            "POST upload",
            reg.post("/v2/reqid/repo/blobs/uploads/").await,
        ),
        (
            "GET unknown manifest",
            reg.get("/v2/reqid/repo/manifests/missing").await,
        ),
        (
            "GET unknown route",
            reg.get("/definitely/not/a/route").await,
        ),
    ];
    let raw = reg
        .raw(
            b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            Duration::from_secs(10),
        )
        .await;
    responses.push(("raw GET /v2/", raw.as_resp()));
    let mut ids = HashSet::new();
    for (what, r) in &responses {
        let id = r
            .header("x-request-id")
            .unwrap_or_else(|| panic!("{what}: no X-Request-Id: {}", r.describe()));
        assert!(!id.trim().is_empty(), "{what}: empty X-Request-Id");
        assert!(ids.insert(id.clone()), "{what}: X-Request-Id {id} reused");
    }
}

#[tokio::test]
async fn unknown_routes_return_4xx_not_5xx() {
    let reg = Registry::start().await;
    for path in ["/v1/", "/v3/", "/v2/_unknown", "/v2/a/b/c", "/favicon.ico"] {
        let r = reg.get(path).await;
        assert!(
            (400..500).contains(&r.status),
            "GET {path}: {}",
            r.describe()
        );
    }
}

#[tokio::test]
async fn json_log_format_writes_json_lines() {
    let mut reg = Registry::start_with(
        Options::new()
            .flag("--log-format", "json")
            .env("BERTH_LOG", "info"),
    )
    .await;
    reg.get("/v2/").await;
    reg.get("/v2/jsonlog/repo/manifests/nope").await;
    reg.sigterm();
    let st = reg.wait_exit(Duration::from_secs(20)).await;
    assert!(st.is_some(), "berth did not exit after SIGTERM");
    let log = reg.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("===== berth-it"))
        .collect();
    assert!(!lines.is_empty(), "no log output with BERTH_LOG=info");
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}"));
        assert!(v.is_object(), "log line is not a JSON object: {l}");
    }
}
