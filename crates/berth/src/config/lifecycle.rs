//! Data lifecycle settings: when garbage collection runs, and how long a
//! link or an unrecorded blob must be unused before it may be collected.

use std::time::Duration;

use berth_auth::Glob;
use clap::Args;
use serde::Deserialize;

use super::ConfigError;

/// Default grace period: far above the time between a client's `HEAD` of a
/// blob and the push of the manifest that uses it.
pub const DEFAULT_GC_GRACE_SECS: u64 = 3600;

/// Lifecycle flags of `berth serve` (each also a key of the TOML file).
#[derive(Args, Debug, Default, Clone)]
pub struct LifecycleArgs {
    /// Run garbage collection every this many seconds, on one node of the
    /// region; 0 turns the job off (collect with `berth gc`) [default: 0].
    #[arg(long, env = "BERTH_GC_INTERVAL_SECS")]
    pub gc_interval_secs: Option<u64>,
    /// Links and unrecorded bytes younger than this are never collected
    /// [default: 3600].
    #[arg(long, env = "BERTH_GC_GRACE_SECS")]
    pub gc_grace_secs: Option<u64>,
    /// A link not confirmed for this long is dated again when a client
    /// relies on it (a blob HEAD, a repeated upload); keep it well under
    /// the grace period [default: 600].
    #[arg(long, env = "BERTH_LINK_REFRESH_SECS")]
    pub link_refresh_secs: Option<u64>,
}

/// The same keys in the TOML file (flattened into it, so unknown keys are
/// refused there).
#[derive(Default, Deserialize)]
pub struct FileLifecycle {
    gc_interval_secs: Option<u64>,
    gc_grace_secs: Option<u64>,
    link_refresh_secs: Option<u64>,
    #[serde(default)]
    immutable: Vec<FileImmutable>,
}

/// An `[[immutable]]` table: tags matching `tags` in repositories matching
/// `repositories` cannot be moved or deleted once pushed.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileImmutable {
    repositories: Vec<String>,
    tags: Vec<String>,
}

/// A parsed `[[immutable]]` rule.
#[derive(Debug, Clone)]
pub struct ImmutableRule {
    pub repositories: Vec<Glob>,
    pub tags: Vec<Glob>,
}

impl ImmutableRule {
    pub fn covers(&self, repository: &str, tag: &str) -> bool {
        self.repositories.iter().any(|g| g.matches(repository))
            && self.tags.iter().any(|g| g.matches(tag))
    }
}

#[derive(Debug, Clone)]
pub struct LifecycleSettings {
    /// `None`: the job is off.
    pub gc_interval: Option<Duration>,
    pub gc_grace: Duration,
    pub link_refresh: Duration,
    pub immutable: Vec<ImmutableRule>,
}

pub(super) fn resolve(
    args: LifecycleArgs,
    file: FileLifecycle,
) -> Result<LifecycleSettings, ConfigError> {
    let interval = args.gc_interval_secs.or(file.gc_interval_secs).unwrap_or(0);
    let grace = args
        .gc_grace_secs
        .or(file.gc_grace_secs)
        .unwrap_or(DEFAULT_GC_GRACE_SECS);
    let refresh = args
        .link_refresh_secs
        .or(file.link_refresh_secs)
        .unwrap_or(600);
    if refresh == 0 {
        return Err(ConfigError::Zero("link_refresh_secs"));
    }
    let globs = |patterns: &[String], what: &str| -> Result<Vec<Glob>, ConfigError> {
        if patterns.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "an [[immutable]] rule needs at least one pattern in {what}"
            )));
        }
        patterns
            .iter()
            .map(|p| {
                Glob::parse(p)
                    .map_err(|e| ConfigError::Invalid(format!("[[immutable]] {what} {p:?}: {e}")))
            })
            .collect()
    };
    let immutable = file
        .immutable
        .iter()
        .map(|rule| {
            Ok(ImmutableRule {
                repositories: globs(&rule.repositories, "repositories")?,
                tags: globs(&rule.tags, "tags")?,
            })
        })
        .collect::<Result<Vec<_>, ConfigError>>()?;
    Ok(LifecycleSettings {
        gc_interval: (interval > 0).then(|| Duration::from_secs(interval)),
        gc_grace: Duration::from_secs(grace),
        link_refresh: Duration::from_secs(refresh),
        immutable,
    })
}
