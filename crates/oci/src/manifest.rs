//! Image manifests and indexes (OCI and Docker schema 2): parsing, validation
//! and the references a registry must check and index.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::media_type::{self, essence};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManifestKind {
    OciManifest,
    OciIndex,
    DockerManifest,
    DockerManifestList,
}

impl ManifestKind {
    pub fn from_media_type(media_type: &str) -> Option<Self> {
        match media_type {
            media_type::OCI_MANIFEST => Some(ManifestKind::OciManifest),
            media_type::OCI_INDEX => Some(ManifestKind::OciIndex),
            media_type::DOCKER_MANIFEST => Some(ManifestKind::DockerManifest),
            media_type::DOCKER_MANIFEST_LIST => Some(ManifestKind::DockerManifestList),
            _ => None,
        }
    }

    pub fn media_type(self) -> &'static str {
        match self {
            ManifestKind::OciManifest => media_type::OCI_MANIFEST,
            ManifestKind::OciIndex => media_type::OCI_INDEX,
            ManifestKind::DockerManifest => media_type::DOCKER_MANIFEST,
            ManifestKind::DockerManifestList => media_type::DOCKER_MANIFEST_LIST,
        }
    }

    pub fn is_index(self) -> bool {
        matches!(
            self,
            ManifestKind::OciIndex | ManifestKind::DockerManifestList
        )
    }
}

/// A content descriptor as it appears in manifests and in referrers responses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<serde_json::Value>,
}

impl Descriptor {
    /// Foreign (non-distributable) layers live elsewhere, named by `urls`; a
    /// registry must not require them to have been pushed.
    pub fn is_foreign(&self) -> bool {
        let mt = self.media_type.as_str();
        self.urls.as_ref().is_some_and(|u| !u.is_empty())
            && (mt.contains("foreign") || mt.contains("nondistributable"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid JSON: {0}")]
    Json(String),
    #[error("unsupported manifest schemaVersion (only 2 is supported)")]
    SchemaVersion,
    #[error("unsupported manifest media type {0:?}")]
    UnsupportedMediaType(String),
    #[error("manifest mediaType {body:?} does not match Content-Type {header:?}")]
    MediaTypeMismatch { body: String, header: String },
    #[error("manifest is missing required field {0}")]
    MissingField(&'static str),
    #[error("invalid media type {0:?} in descriptor")]
    InvalidDescriptorMediaType(String),
    #[error("index entries must be manifests, found {0:?}")]
    IndexEntryNotManifest(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<i64>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
    subject: Option<Descriptor>,
    annotations: Option<BTreeMap<String, String>>,
}

/// A parsed, validated manifest. The registry stores the client's exact bytes;
/// this is what it needs to know about them.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub kind: ManifestKind,
    pub config: Option<Descriptor>,
    pub layers: Vec<Descriptor>,
    pub manifests: Vec<Descriptor>,
    pub subject: Option<Descriptor>,
    pub artifact_type: Option<String>,
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Manifest {
    /// Parses `bytes` sent with `content_type`. When both the header and the
    /// body's `mediaType` name a type they must agree; when neither does, the
    /// shape of the document decides (OCI manifest or index).
    pub fn parse(content_type: Option<&str>, bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let raw: RawManifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Json(e.to_string()))?;
        if raw.schema_version != Some(2) {
            return Err(ManifestError::SchemaVersion);
        }
        let header = content_type
            .map(essence)
            .filter(|h| !h.is_empty() && ManifestKind::from_media_type(h).is_some());
        let media_type = match (&raw.media_type, header) {
            (Some(body), Some(header)) if *body != header => {
                return Err(ManifestError::MediaTypeMismatch {
                    body: body.clone(),
                    header,
                });
            }
            (Some(body), _) => body.clone(),
            (None, Some(header)) => header,
            (None, None) => match content_type.map(essence) {
                Some(other) if !other.is_empty() && other != "application/json" => {
                    return Err(ManifestError::UnsupportedMediaType(other));
                }
                _ if raw.manifests.is_some() => media_type::OCI_INDEX.to_string(),
                _ => media_type::OCI_MANIFEST.to_string(),
            },
        };
        let kind = ManifestKind::from_media_type(&media_type)
            .ok_or(ManifestError::UnsupportedMediaType(media_type))?;

        let manifest = match kind {
            ManifestKind::OciManifest | ManifestKind::DockerManifest => Manifest {
                kind,
                config: Some(raw.config.ok_or(ManifestError::MissingField("config"))?),
                layers: raw.layers.ok_or(ManifestError::MissingField("layers"))?,
                manifests: Vec::new(),
                subject: raw.subject,
                artifact_type: raw.artifact_type,
                annotations: raw.annotations,
            },
            ManifestKind::OciIndex | ManifestKind::DockerManifestList => {
                let manifests = raw
                    .manifests
                    .ok_or(ManifestError::MissingField("manifests"))?;
                Manifest {
                    kind,
                    config: None,
                    layers: Vec::new(),
                    manifests,
                    subject: raw.subject,
                    artifact_type: raw.artifact_type,
                    annotations: raw.annotations,
                }
            }
        };
        manifest.validate_descriptors()?;
        Ok(manifest)
    }

    fn validate_descriptors(&self) -> Result<(), ManifestError> {
        let all = self
            .config
            .iter()
            .chain(&self.layers)
            .chain(&self.manifests)
            .chain(&self.subject);
        for d in all {
            if !media_type::is_valid(&d.media_type) {
                return Err(ManifestError::InvalidDescriptorMediaType(
                    d.media_type.clone(),
                ));
            }
        }
        if self.kind == ManifestKind::DockerManifestList {
            for d in &self.manifests {
                if ManifestKind::from_media_type(&d.media_type).is_none() {
                    return Err(ManifestError::IndexEntryNotManifest(d.media_type.clone()));
                }
            }
        }
        Ok(())
    }

    /// Blobs that must exist in the repository before this manifest is accepted.
    pub fn required_blobs(&self) -> impl Iterator<Item = &Descriptor> {
        self.config
            .iter()
            .chain(&self.layers)
            .filter(|d| !d.is_foreign())
    }

    /// Children of an index. Entries that are manifests must exist; an OCI
    /// index may also point at other content (any blob), which must exist as
    /// a blob instead.
    pub fn children(&self) -> &[Descriptor] {
        &self.manifests
    }

    /// The artifact type reported in referrers responses: `artifactType`, or
    /// for an image manifest without one, the config's media type.
    pub fn referrer_artifact_type(&self) -> Option<String> {
        self.artifact_type.clone().or_else(|| {
            self.config
                .as_ref()
                .filter(|_| self.kind == ManifestKind::OciManifest)
                .map(|c| c.media_type.clone())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const D2: &str = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";

    fn image(media_type_field: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,{media_type_field}"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{D1}","size":0}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{D2}","size":2}}]}}"#
        )
    }

    #[test]
    fn parses_oci_image_manifest() {
        let m = Manifest::parse(Some(media_type::OCI_MANIFEST), image("").as_bytes()).unwrap();
        assert_eq!(m.kind, ManifestKind::OciManifest);
        assert_eq!(m.required_blobs().count(), 2);
        assert_eq!(
            m.referrer_artifact_type().as_deref(),
            Some("application/vnd.oci.image.config.v1+json")
        );
    }

    #[test]
    fn media_type_must_agree_with_header() {
        let body = image(&format!(r#""mediaType":"{}","#, media_type::OCI_MANIFEST));
        assert!(Manifest::parse(Some(media_type::OCI_MANIFEST), body.as_bytes()).is_ok());
        assert!(matches!(
            Manifest::parse(Some(media_type::DOCKER_MANIFEST), body.as_bytes()),
            Err(ManifestError::MediaTypeMismatch { .. })
        ));
        // The body's type wins when the header is generic.
        assert!(Manifest::parse(Some("application/json"), body.as_bytes()).is_ok());
    }

    #[test]
    fn parses_index_with_subject_and_artifact_type() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","artifactType":"application/x-sig","manifests":[{{"mediaType":"{}","digest":"{D1}","size":10,"platform":{{"os":"linux","architecture":"amd64"}}}}],"subject":{{"mediaType":"{}","digest":"{D2}","size":3}}}}"#,
            media_type::OCI_INDEX,
            media_type::OCI_MANIFEST,
            media_type::OCI_MANIFEST
        );
        let m = Manifest::parse(None, body.as_bytes()).unwrap();
        assert_eq!(m.kind, ManifestKind::OciIndex);
        assert_eq!(m.children().len(), 1);
        assert_eq!(m.subject.as_ref().unwrap().digest.to_string(), D2);
        assert_eq!(
            m.referrer_artifact_type().as_deref(),
            Some("application/x-sig")
        );
    }

    #[test]
    fn rejects_invalid_documents() {
        let cases: Vec<(Option<&str>, String)> = vec![
            (None, "not json".into()),
            (None, "[]".into()),
            (None, r#"{"schemaVersion":1}"#.into()),
            (
                Some(media_type::OCI_MANIFEST),
                r#"{"schemaVersion":2}"#.into(),
            ),
            (Some(media_type::OCI_INDEX), r#"{"schemaVersion":2}"#.into()),
            (
                Some(media_type::OCI_MANIFEST),
                image("").replace(D2, "sha256:1234"),
            ),
            (
                Some(media_type::OCI_MANIFEST),
                image("").replace(r#""size":2"#, r#""size":-2"#),
            ),
            (Some("text/plain"), image("")),
            (
                Some(media_type::OCI_MANIFEST),
                image("").replace("application/vnd.oci.image.layer.v1.tar", "bad type"),
            ),
        ];
        for (ct, body) in cases {
            assert!(
                Manifest::parse(ct, body.as_bytes()).is_err(),
                "{ct:?} {body}"
            );
        }
    }

    #[test]
    fn foreign_layers_are_not_required() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"{D1}","size":0}},"layers":[{{"mediaType":"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip","digest":"{D2}","size":2,"urls":["https://example.com/l"]}}]}}"#,
            media_type::DOCKER_MANIFEST
        );
        let m = Manifest::parse(Some(media_type::DOCKER_MANIFEST), body.as_bytes()).unwrap();
        assert_eq!(m.required_blobs().count(), 1);
    }
}
