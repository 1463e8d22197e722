//! Tag listing and the catalog, with `n`/`last` pagination and `Link` headers.

use serde_json::Value;

use crate::support::*;

fn string_list(v: &Value, key: &str) -> Vec<String> {
    match v.get(key) {
        Some(Value::Array(a)) => a
            .iter()
            .map(|t| t.as_str().expect("string entry").to_string())
            .collect(),
        Some(Value::Null) | None => Vec::new(),
        other => panic!("bad `{key}` field: {other:?}"),
    }
}

/// Parses `<url>; rel="next"` and returns the URL, checking its path.
fn next_link(r: &Resp, expected_path: &str) -> Option<String> {
    let link = r.header("link")?;
    let link = link.trim();
    assert!(
        link.starts_with('<'),
        "Link header must start with '<': {link:?}"
    );
    let end = link.find('>').expect("Link header without '>'");
    let url = &link[1..end];
    let params = &link[end + 1..];
    assert!(
        params.replace(' ', "").contains(";rel=\"next\""),
        "Link header must have rel=\"next\": {link:?}"
    );
    let parsed = reqwest::Url::parse("http://x")
        .unwrap()
        .join(url)
        .unwrap_or_else(|e| panic!("bad Link URL {url:?}: {e}"));
    assert_eq!(parsed.path(), expected_path, "Link path in {link:?}");
    Some(url.to_string())
}

async fn push_tags(reg: &Registry, repo: &str, tags: &[&str]) {
    let img = Image::oci(fresh_seed(), 1, 32);
    img.push_blobs(reg, repo).await;
    for t in tags {
        reg.push_manifest(repo, t, OCI_MANIFEST, &img.manifest)
            .await;
    }
}

#[tokio::test]
async fn tags_list_is_sorted_lexically() {
    let reg = Registry::start().await;
    let tags = [
        "v2", "latest", "1.0", "v10", "a", "0", "z-last", "v1.2.3", "v1_2", "b-1", "b.1", "b_1",
        "9", "10",
    ];
    push_tags(&reg, "tags/sorted", &tags).await;
    let r = reg.get("/v2/tags/sorted/tags/list").await;
    assert_eq!(r.status, 200, "{}", r.describe());
    let v = r.json();
    assert_eq!(v["name"], "tags/sorted");
    let got = string_list(&v, "tags");
    let mut want: Vec<String> = tags.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(got, want);
    assert!(r.header("link").is_none(), "no Link without pagination");
}

#[tokio::test]
async fn tags_list_paginates_with_n_last_and_link_header() {
    let reg = Registry::start().await;
    let tags = ["e", "a", "d", "b", "c", "f", "g"];
    push_tags(&reg, "tags/page", &tags).await;
    let path = "/v2/tags/page/tags/list";

    let r = reg.get(&format!("{path}?n=2")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(string_list(&r.json(), "tags"), vec!["a", "b"]);
    let link = next_link(&r, path).expect("Link header when more tags exist");
    let q = query_pairs(&link);
    assert!(q.contains(&("n".into(), "2".into())), "Link {link}");
    assert!(q.contains(&("last".into(), "b".into())), "Link {link}");

    // Follow Link headers to the end.
    let mut collected = vec!["a".to_string(), "b".to_string()];
    let mut next = Some(link);
    let mut pages = 1;
    while let Some(url) = next {
        let r = reg.get(&url).await;
        assert_eq!(r.status, 200, "{url}: {}", r.describe());
        let page = string_list(&r.json(), "tags");
        assert!(page.len() <= 2, "page larger than n: {page:?}");
        assert!(!page.is_empty(), "empty page while a Link was given");
        collected.extend(page);
        next = next_link(&r, path);
        pages += 1;
        assert!(pages < 10, "pagination does not terminate");
    }
    assert_eq!(collected, vec!["a", "b", "c", "d", "e", "f", "g"]);
    assert_eq!(pages, 4);

    // `last` alone.
    let r = reg.get(&format!("{path}?last=c")).await;
    assert_eq!(r.status, 200);
    assert_eq!(string_list(&r.json(), "tags"), vec!["d", "e", "f", "g"]);
    // `last` that is not itself a tag still works lexically.
    let r = reg.get(&format!("{path}?n=2&last=cc")).await;
    assert_eq!(r.status, 200);
    assert_eq!(string_list(&r.json(), "tags"), vec!["d", "e"]);
    // n larger than the total.
    let r = reg.get(&format!("{path}?n=100")).await;
    assert_eq!(r.status, 200);
    assert_eq!(string_list(&r.json(), "tags").len(), 7);
    assert!(r.header("link").is_none(), "{}", r.describe());
    // Exactly the remaining count: no Link needed, and if given it must lead to an empty page.
    let r = reg.get(&format!("{path}?n=2&last=e")).await;
    assert_eq!(string_list(&r.json(), "tags"), vec!["f", "g"]);
}

#[tokio::test]
async fn tags_list_n_zero_returns_empty_list_without_link() {
    let reg = Registry::start().await;
    push_tags(&reg, "tags/nzero", &["a", "b"]).await;
    let r = reg.get("/v2/tags/nzero/tags/list?n=0").await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(string_list(&r.json(), "tags").is_empty());
    assert!(r.header("link").is_none(), "n=0 MUST NOT include Link");
}

#[tokio::test]
async fn tags_list_last_beyond_the_end_returns_empty_list() {
    let reg = Registry::start().await;
    push_tags(&reg, "tags/beyond", &["a", "b"]).await;
    for q in ["?last=b", "?last=zzz", "?n=5&last=b", "?n=5&last=zzzz"] {
        let r = reg.get(&format!("/v2/tags/beyond/tags/list{q}")).await;
        assert_eq!(r.status, 200, "{q}: {}", r.describe());
        assert!(string_list(&r.json(), "tags").is_empty(), "{q}");
        assert!(r.header("link").is_none(), "{q}");
    }
}

#[tokio::test]
async fn tags_list_of_unknown_repository_returns_404_name_unknown() {
    let reg = Registry::start().await;
    let r = reg.get("/v2/tags/never-pushed/tags/list").await;
    expect_error(&r, 404, &["NAME_UNKNOWN"]);
}

#[tokio::test]
async fn tags_list_after_deleting_tags() {
    let reg = Registry::start().await;
    push_tags(&reg, "tags/deleted", &["a", "b", "c"]).await;
    let r = reg.delete("/v2/tags/deleted/manifests/b").await;
    assert_eq!(r.status, 202, "{}", r.describe());
    assert_eq!(reg.tags("tags/deleted").await, vec!["a", "c"]);
}

#[tokio::test]
async fn catalog_lists_repositories_sorted_with_pagination() {
    let reg = Registry::start().await;
    let repos = ["cat/c", "cat/a", "cat/b/sub", "cat/b", "alpha", "zeta/one"];
    for repo in repos {
        push_tags(&reg, repo, &["v1"]).await;
    }
    let mut want: Vec<String> = repos.iter().map(|s| s.to_string()).collect();
    want.sort();

    let r = reg.get("/v2/_catalog").await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(string_list(&r.json(), "repositories"), want);

    let r = reg.get("/v2/_catalog?n=2").await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(string_list(&r.json(), "repositories"), want[..2].to_vec());
    let link = next_link(&r, "/v2/_catalog").expect("catalog Link header");
    let q = query_pairs(&link);
    assert!(q.contains(&("n".into(), "2".into())), "Link {link}");
    assert!(q.contains(&("last".into(), want[1].clone())), "Link {link}");

    let mut collected = want[..2].to_vec();
    let mut next = Some(link);
    let mut guard = 0;
    while let Some(url) = next {
        let r = reg.get(&url).await;
        assert_eq!(r.status, 200, "{url}: {}", r.describe());
        collected.extend(string_list(&r.json(), "repositories"));
        next = next_link(&r, "/v2/_catalog");
        guard += 1;
        assert!(guard < 10, "catalog pagination does not terminate");
    }
    assert_eq!(collected, want);

    let r = reg.get("/v2/_catalog?n=0").await;
    assert_eq!(r.status, 200);
    assert!(string_list(&r.json(), "repositories").is_empty());
    assert!(r.header("link").is_none());

    let r = reg.get("/v2/_catalog?last=zeta/one").await;
    assert_eq!(r.status, 200);
    assert!(string_list(&r.json(), "repositories").is_empty());

    let r = reg
        .get(&format!("/v2/_catalog?n=10&last={}", encode_query("cat/b")))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        string_list(&r.json(), "repositories"),
        vec!["cat/b/sub", "cat/c", "zeta/one"]
    );
}

#[tokio::test]
async fn catalog_of_empty_registry_is_empty() {
    let reg = Registry::start().await;
    let r = reg.get("/v2/_catalog").await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(string_list(&r.json(), "repositories").is_empty());
}
