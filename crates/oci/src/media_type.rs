//! Media types the registry understands.

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST_V1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_MANIFEST_V1_SIGNED: &str =
    "application/vnd.docker.distribution.manifest.v1+prettyjws";
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const OCTET_STREAM: &str = "application/octet-stream";

/// The media type without parameters, trimmed and lowercased, as compared
/// by clients (`application/json; charset=utf-8` is `application/json`).
pub fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// A media type as the image spec allows it (RFC 6838 shape): `type/subtype`
/// with restricted characters and bounded length.
pub fn is_valid(media_type: &str) -> bool {
    const MAX: usize = 255;
    let Some((ty, sub)) = media_type.split_once('/') else {
        return false;
    };
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 127
            && s.bytes().all(|b| {
                b.is_ascii_alphanumeric()
                    || matches!(
                        b,
                        b'!' | b'#' | b'$' | b'&' | b'-' | b'^' | b'_' | b'.' | b'+'
                    )
            })
    };
    media_type.len() <= MAX && ok(ty) && ok(sub)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn essence_drops_parameters() {
        assert_eq!(
            essence("Application/JSON; charset=utf-8"),
            "application/json"
        );
        assert_eq!(essence(OCI_MANIFEST), OCI_MANIFEST);
    }

    #[test]
    fn validity() {
        assert!(is_valid(OCI_MANIFEST));
        assert!(is_valid("application/vnd.example+type"));
        assert!(!is_valid("noslash"));
        assert!(!is_valid("a/b/c"));
        assert!(!is_valid("a/b c"));
    }
}
