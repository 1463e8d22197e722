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

/// Default retention of the change log, tombstones and tag history: two
/// weeks of history to restore from, and of absence a region survives
/// without resynchronizing.
pub const DEFAULT_LOG_RETENTION_SECS: u64 = 14 * 86_400;

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
    /// Keep manifests and tags that clients delete this many days, so that
    /// `berth undelete` can bring them back; 0 turns the trash off
    /// [default: 7].
    #[arg(long, env = "BERTH_TRASH_RETENTION_DAYS")]
    pub trash_retention_days: Option<u64>,
    /// With [[retention]] rules: apply them this often, on one node of the
    /// region; 0 only plans (`berth retention plan`) [default: 3600].
    #[arg(long, env = "BERTH_RETENTION_INTERVAL_SECS")]
    pub retention_interval_secs: Option<u64>,
    /// Keep change-log entries, tombstones and tag history this long (and
    /// log entries until every live peer has applied them); a peer away
    /// longer resynchronizes [default: 1209600, 14 days].
    #[arg(long, env = "BERTH_LOG_RETENTION_SECS")]
    pub log_retention_secs: Option<u64>,
    /// Compact metadata this often, on one node of the region; 0 turns
    /// the job off (compact with `berth compact`) [default: 3600].
    #[arg(long, env = "BERTH_COMPACTION_INTERVAL_SECS")]
    pub compaction_interval_secs: Option<u64>,
    /// How far apart regions' clocks may be: a replicated change stamped
    /// further ahead waits until they agree, and a tombstone stays this
    /// much longer than the moment every peer had caught up past it
    /// [default: 600].
    #[arg(long, env = "BERTH_MAX_CLOCK_SKEW_SECS")]
    pub max_clock_skew_secs: Option<u64>,
    /// Re-read and re-hash every blob at rest this often, on one node of
    /// the region; 0 turns the job off (scrub with `berth scrub`)
    /// [default: 0].
    #[arg(long, env = "BERTH_SCRUB_INTERVAL_SECS")]
    pub scrub_interval_secs: Option<u64>,
}

/// The same keys in the TOML file (flattened into it, so unknown keys are
/// refused there).
#[derive(Default, Deserialize)]
pub struct FileLifecycle {
    gc_interval_secs: Option<u64>,
    gc_grace_secs: Option<u64>,
    link_refresh_secs: Option<u64>,
    trash_retention_days: Option<u64>,
    retention_interval_secs: Option<u64>,
    log_retention_secs: Option<u64>,
    compaction_interval_secs: Option<u64>,
    max_clock_skew_secs: Option<u64>,
    scrub_interval_secs: Option<u64>,
    #[serde(default)]
    immutable: Vec<FileImmutable>,
    #[serde(default)]
    retention: Vec<FileRetention>,
}

/// A `[[retention]]` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRetention {
    repositories: Vec<String>,
    keep_last: Option<usize>,
    keep_days: Option<u64>,
    #[serde(default)]
    keep_tags: Vec<String>,
    untagged_days: Option<u64>,
}

/// A parsed `[[retention]]` rule (see docs/lifecycle.md).
#[derive(Debug, Clone)]
pub struct RetentionSetting {
    pub repositories: Vec<Glob>,
    pub keep_last: Option<usize>,
    pub keep_days: Option<u64>,
    pub keep_tags: Vec<Glob>,
    pub untagged_days: Option<u64>,
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
    /// Zero: no trash.
    pub trash_retention: Duration,
    pub immutable: Vec<ImmutableRule>,
    pub retention: Vec<RetentionSetting>,
    /// `None`: rules are only planned.
    pub retention_interval: Option<Duration>,
    /// How long compaction keeps the change log, tombstones and history.
    pub log_retention: Duration,
    /// `None`: the compaction job is off.
    pub compaction_interval: Option<Duration>,
    pub max_clock_skew: Duration,
    /// `None`: the scrub job is off.
    pub scrub_interval: Option<Duration>,
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
    let mut retention = Vec::new();
    for rule in &file.retention {
        if rule.keep_last.is_none() && rule.keep_days.is_none() && rule.untagged_days.is_none() {
            return Err(ConfigError::Invalid(
                "a [[retention]] rule needs keep_last, keep_days or untagged_days".into(),
            ));
        }
        let keep_tags = rule
            .keep_tags
            .iter()
            .map(|p| {
                Glob::parse(p).map_err(|e| {
                    ConfigError::Invalid(format!("[[retention]] keep_tags {p:?}: {e}"))
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let repositories = rule
            .repositories
            .iter()
            .map(|p| {
                Glob::parse(p).map_err(|e| {
                    ConfigError::Invalid(format!("[[retention]] repositories {p:?}: {e}"))
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        if repositories.is_empty() {
            return Err(ConfigError::Invalid(
                "a [[retention]] rule needs at least one pattern in repositories".into(),
            ));
        }
        retention.push(RetentionSetting {
            repositories,
            keep_last: rule.keep_last,
            keep_days: rule.keep_days,
            keep_tags,
            untagged_days: rule.untagged_days,
        });
    }
    let log_retention = args
        .log_retention_secs
        .or(file.log_retention_secs)
        .unwrap_or(DEFAULT_LOG_RETENTION_SECS);
    if log_retention == 0 {
        return Err(ConfigError::Zero("log_retention_secs"));
    }
    let max_clock_skew = args
        .max_clock_skew_secs
        .or(file.max_clock_skew_secs)
        .unwrap_or(600);
    if max_clock_skew == 0 {
        return Err(ConfigError::Zero("max_clock_skew_secs"));
    }
    let compaction_interval = args
        .compaction_interval_secs
        .or(file.compaction_interval_secs)
        .unwrap_or(3600);
    let retention_interval = args
        .retention_interval_secs
        .or(file.retention_interval_secs)
        .unwrap_or(3600);
    Ok(LifecycleSettings {
        retention,
        retention_interval: (retention_interval > 0)
            .then(|| Duration::from_secs(retention_interval)),
        gc_interval: (interval > 0).then(|| Duration::from_secs(interval)),
        gc_grace: Duration::from_secs(grace),
        link_refresh: Duration::from_secs(refresh),
        trash_retention: Duration::from_secs(
            args.trash_retention_days
                .or(file.trash_retention_days)
                .unwrap_or(7)
                .saturating_mul(86_400),
        ),
        immutable,
        log_retention: Duration::from_secs(log_retention),
        compaction_interval: (compaction_interval > 0)
            .then(|| Duration::from_secs(compaction_interval)),
        max_clock_skew: Duration::from_secs(max_clock_skew),
        scrub_interval: args
            .scrub_interval_secs
            .or(file.scrub_interval_secs)
            .filter(|secs| *secs > 0)
            .map(Duration::from_secs),
    })
}
