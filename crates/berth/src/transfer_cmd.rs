//! `berth export` and `berth import`: images out of this registry into an
//! OCI image layout (a directory or a `.tar`, for an air-gapped transfer),
//! and into it from a layout or from another registry, every byte verified
//! by digest, with progress and a summary.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_auth::Glob;
use berth_proxy::{ClientTls, Credentials, UpstreamClient, UpstreamConfig};

use crate::admin::AdminError;
use crate::client::Api;
use crate::gc_cmd::human_bytes;
use crate::transfer::layout::{LayoutSink, LayoutSource, REF_NAME};
use crate::transfer::registry::RegistryApi;
use crate::transfer::upstream::Upstream;
use crate::transfer::{Totals, TransferError, copy_image, parse_image, with_progress};

fn failed(e: TransferError) -> AdminError {
    AdminError::Failed(e.to_string())
}

/// The end of a transfer, for humans or as JSON.
fn summary(what: &str, totals: &Totals, started: Instant, failures: &[String], json: bool) {
    let secs = started.elapsed().as_secs_f64();
    let bytes = Totals::get(&totals.bytes);
    if json {
        let value = serde_json::json!({
            "images": Totals::get(&totals.images),
            "manifests": Totals::get(&totals.manifests),
            "blobs": Totals::get(&totals.blobs),
            "bytes": bytes,
            "skipped": Totals::get(&totals.skipped),
            "failed": failures,
            "duration_ms": (secs * 1000.0) as u64,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        return;
    }
    println!(
        "{what} {} images: {} manifests and {} blobs ({}) copied in {secs:.1} s ({}/s), {} already there, {} failed",
        Totals::get(&totals.images),
        Totals::get(&totals.manifests),
        Totals::get(&totals.blobs),
        human_bytes(bytes),
        human_bytes((bytes as f64 / secs.max(0.001)) as u64),
        Totals::get(&totals.skipped),
        failures.len()
    );
    for failure in failures {
        println!("failed {failure}");
    }
}

/// `berth export IMAGE... --to PATH`.
pub async fn export(
    api: &Api,
    images: &[String],
    to: &Path,
    json: bool,
) -> Result<bool, AdminError> {
    let parsed: Vec<(String, String)> = images
        .iter()
        .map(|i| parse_image(i))
        .collect::<Result<_, _>>()
        .map_err(failed)?;
    let sink = LayoutSink::create(to).await.map_err(failed)?;
    let source = RegistryApi { api };
    let totals = Arc::new(Totals::default());
    let started = Instant::now();
    let work = async {
        for (repo, reference) in &parsed {
            let digest = copy_image(&source, &sink, repo, repo, reference, &totals).await?;
            let (bytes, media_type) =
                crate::transfer::Source::manifest(&source, repo, &digest.to_string()).await?;
            let name = if reference.parse::<berth_oci::Digest>().is_ok() {
                format!("{repo}@{reference}")
            } else {
                format!("{repo}:{reference}")
            };
            sink.name_image(&name, &digest, &media_type, bytes.len() as u64);
            if !json {
                eprintln!("exported {name} ({digest})");
            }
        }
        Ok::<_, TransferError>(())
    };
    with_progress(totals.clone(), json, work)
        .await
        .map_err(failed)?;
    sink.finish().await.map_err(failed)?;
    summary(
        &format!("exported to {}:", to.display()),
        &totals,
        started,
        &[],
        json,
    );
    Ok(true)
}

/// Where a layout's image goes: `--to REPO` keeps the tag of its name.
fn destination(
    name: Option<&str>,
    to: Option<&str>,
) -> Result<(String, String, Option<String>), TransferError> {
    // (source repository for the lookup, destination repository, tag)
    let (from_repo, tag) = match name {
        Some(name) => match parse_image(name) {
            Ok((repo, tag)) => (repo, Some(tag)),
            Err(_) => (String::new(), Some(name.to_string())),
        },
        None => (String::new(), None),
    };
    let to_repo = match (to, from_repo.is_empty()) {
        (Some(to), _) => to.to_string(),
        (None, false) => from_repo.clone(),
        (None, true) => {
            return Err(TransferError::Invalid(format!(
                "the layout names an image {:?} without a repository: say where it goes with --to REPOSITORY",
                name.unwrap_or("(unnamed)")
            )));
        }
    };
    berth_oci::RepositoryName::parse(&to_repo)
        .map_err(|_| TransferError::Invalid(format!("{to_repo:?} is not a repository name")))?;
    Ok((from_repo, to_repo, tag))
}

/// `berth import PATH [--to REPO]`.
pub async fn import_layout(
    api: &Api,
    from: &Path,
    to: Option<&str>,
    json: bool,
) -> Result<bool, AdminError> {
    let source = LayoutSource::open(from).await.map_err(failed)?;
    let sink = RegistryApi { api };
    let totals = Arc::new(Totals::default());
    let started = Instant::now();
    let mut failures = Vec::new();
    let entries = source.entries.clone();
    let work = async {
        for entry in &entries {
            let name = entry["annotations"][REF_NAME].as_str();
            let digest = entry["digest"].as_str().unwrap_or_default().to_string();
            let outcome = async {
                let (from_repo, to_repo, tag) = destination(name, to)?;
                let reference = tag.clone().filter(|t| {
                    berth_oci::Tag::parse(t).is_ok() || t.parse::<berth_oci::Digest>().is_ok()
                });
                let reference = reference.unwrap_or_else(|| digest.clone());
                copy_image(&source, &sink, &from_repo, &to_repo, &reference, &totals).await?;
                Ok::<_, TransferError>(format!("{to_repo}:{reference}"))
            }
            .await;
            match outcome {
                Ok(done) if !json => eprintln!("imported {done}"),
                Ok(_) => {}
                Err(e) => failures.push(format!("{}: {e}", name.unwrap_or(&digest))),
            }
        }
    };
    with_progress(totals.clone(), json, work).await;
    summary(
        &format!("imported from {}:", from.display()),
        &totals,
        started,
        &failures,
        json,
    );
    Ok(failures.is_empty())
}

/// The other registry of `berth import --from`.
pub struct FromRegistry {
    pub url: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub ca_file: Option<std::path::PathBuf>,
}

/// `berth import --from URL --repository GLOB...`: every tag of every
/// repository the other registry's catalog lists and a glob matches.
pub async fn import_registry(
    api: &Api,
    from: &FromRegistry,
    repositories: &[String],
    json: bool,
) -> Result<bool, AdminError> {
    let globs: Vec<Glob> = repositories
        .iter()
        .map(|g| Glob::parse(g).map_err(|e| AdminError::Failed(format!("--repository {g:?}: {e}"))))
        .collect::<Result<_, _>>()?;
    let credentials = match (&from.username, &from.password) {
        (Some(username), Some(password)) => Some(Credentials {
            username: username.clone(),
            password: password.clone(),
        }),
        (None, None) => None,
        _ => {
            return Err(AdminError::Failed(
                "--from-username and --from-password go together".into(),
            ));
        }
    };
    let ca_pem = match &from.ca_file {
        Some(path) => Some(
            std::fs::read(path)
                .map_err(|e| AdminError::Failed(format!("{}: {e}", path.display())))?,
        ),
        None => None,
    };
    let client = UpstreamClient::new(UpstreamConfig {
        namespace: "import".into(),
        url: from.url.trim_end_matches('/').to_string(),
        credentials,
        bearer: None,
        headers: Vec::new(),
        timeout: Duration::from_secs(30),
        tls: ClientTls {
            ca_pem,
            identity_pem: None,
        },
    })
    .map_err(|e| AdminError::Failed(e.to_string()))?;
    let source = Upstream { client };
    let catalog = source
        .client
        .catalog()
        .await
        .map_err(|e| AdminError::Failed(format!("the catalog of {}: {e}", from.url)))?;
    // Names from another registry are checked before they are used in
    // a path on this one (the globs assume valid names).
    let mut failures = Vec::new();
    let mut chosen: Vec<String> = Vec::new();
    for name in catalog {
        if berth_oci::RepositoryName::parse(&name).is_err() {
            failures.push(format!("{name:?}: not a repository name; skipped"));
        } else if globs.iter().any(|g| g.matches(&name)) {
            chosen.push(name);
        }
    }
    chosen.sort();
    chosen.dedup();
    if !json {
        eprintln!("importing {} repositories from {}", chosen.len(), from.url);
    }
    let sink = RegistryApi { api };
    let totals = Arc::new(Totals::default());
    let started = Instant::now();
    let work = async {
        for repo in &chosen {
            let tags = match source.client.tags(repo).await {
                Ok(tags) => tags,
                Err(e) => {
                    failures.push(format!("{repo}: {e}"));
                    continue;
                }
            };
            for tag in tags {
                if berth_oci::Tag::parse(&tag).is_err() {
                    failures.push(format!("{repo}:{tag:?}: not a tag; skipped"));
                    continue;
                }
                match copy_image(&source, &sink, repo, repo, &tag, &totals).await {
                    Ok(digest) if !json => eprintln!("imported {repo}:{tag} ({digest})"),
                    Ok(_) => {}
                    Err(e) => failures.push(format!("{repo}:{tag}: {e}")),
                }
            }
        }
    };
    with_progress(totals.clone(), json, work).await;
    summary(
        &format!("imported from {}:", from.url),
        &totals,
        started,
        &failures,
        json,
    );
    Ok(failures.is_empty())
}
