//! Classifies `/v2/` paths. Repository names contain slashes, so routes are
//! recognised from the end of the path; the name is validated afterwards.

/// A `/v2/` endpoint with its raw (unvalidated) parts.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    Base,
    Catalog,
    Tags { name: &'a str },
    Manifest { name: &'a str, reference: &'a str },
    Blob { name: &'a str, digest: &'a str },
    UploadStart { name: &'a str },
    Upload { name: &'a str, id: &'a str },
    Referrers { name: &'a str, digest: &'a str },
    Unknown,
}

impl<'a> Route<'a> {
    pub fn parse(path: &'a str) -> Route<'a> {
        let Some(rest) = path.strip_prefix("/v2") else {
            return Route::Unknown;
        };
        let rest = match rest {
            "" | "/" => return Route::Base,
            r => match r.strip_prefix('/') {
                Some(r) => r,
                None => return Route::Unknown,
            },
        };
        if rest == "_catalog" {
            return Route::Catalog;
        }
        if let Some(name) = rest.strip_suffix("/tags/list") {
            return Route::Tags { name };
        }
        if let Some(name) = rest
            .strip_suffix("/blobs/uploads/")
            .or_else(|| rest.strip_suffix("/blobs/uploads"))
        {
            return Route::UploadStart { name };
        }
        if let Some((name, id)) = rest.rsplit_once("/blobs/uploads/") {
            return Route::Upload { name, id };
        }
        if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
            return Route::Manifest { name, reference };
        }
        if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
            return Route::Blob { name, digest };
        }
        if let Some((name, digest)) = rest.rsplit_once("/referrers/") {
            return Route::Referrers { name, digest };
        }
        Route::Unknown
    }

    /// The repository the request is about, if any.
    pub fn name(&self) -> Option<&'a str> {
        match self {
            Route::Tags { name }
            | Route::Manifest { name, .. }
            | Route::Blob { name, .. }
            | Route::UploadStart { name }
            | Route::Upload { name, .. }
            | Route::Referrers { name, .. } => Some(name),
            Route::Base | Route::Catalog | Route::Unknown => None,
        }
    }

    /// A low-cardinality label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Route::Base => "base",
            Route::Catalog => "catalog",
            Route::Tags { .. } => "tags",
            Route::Manifest { .. } => "manifest",
            Route::Blob { .. } => "blob",
            Route::UploadStart { .. } => "upload_start",
            Route::Upload { .. } => "upload",
            Route::Referrers { .. } => "referrers",
            Route::Unknown => "unknown",
        }
    }
}

pub fn label_for_path(path: &str) -> &'static str {
    match path {
        "/healthz" => "healthz",
        "/readyz" => "readyz",
        "/metrics" => "metrics",
        p if p == "/" || p == "/ui" || p.starts_with("/ui/") => "ui",
        p => Route::parse(p).label(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_every_endpoint() {
        assert_eq!(Route::parse("/v2/"), Route::Base);
        assert_eq!(Route::parse("/v2"), Route::Base);
        assert_eq!(Route::parse("/v2/_catalog"), Route::Catalog);
        assert_eq!(
            Route::parse("/v2/a/b/tags/list"),
            Route::Tags { name: "a/b" }
        );
        assert_eq!(
            Route::parse("/v2/a/b/manifests/latest"),
            Route::Manifest {
                name: "a/b",
                reference: "latest"
            }
        );
        assert_eq!(
            Route::parse("/v2/a/blobs/sha256:00"),
            Route::Blob {
                name: "a",
                digest: "sha256:00"
            }
        );
        assert_eq!(
            Route::parse("/v2/a/blobs/uploads/"),
            Route::UploadStart { name: "a" }
        );
        assert_eq!(
            Route::parse("/v2/a/blobs/uploads/123"),
            Route::Upload {
                name: "a",
                id: "123"
            }
        );
        assert_eq!(
            Route::parse("/v2/a/referrers/sha256:00"),
            Route::Referrers {
                name: "a",
                digest: "sha256:00"
            }
        );
        // A repository may itself be called "blobs" or "manifests".
        assert_eq!(
            Route::parse("/v2/blobs/manifests/manifests/x"),
            Route::Manifest {
                name: "blobs/manifests",
                reference: "x"
            }
        );
        assert_eq!(Route::parse("/v2x"), Route::Unknown);
        assert_eq!(Route::parse("/v2/a/other"), Route::Unknown);
    }
}
