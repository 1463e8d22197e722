//! Backup settings: the targets this node may write backups to and
//! restore from, and the schedule.
//!
//! Targets are named here, on the server, not by the caller: a backup
//! command names one of them. Letting an API caller choose any directory
//! or bucket would let a registry administrator make the node write
//! wherever its process may.

use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use super::ConfigError;

/// Backups a schedule keeps by default.
pub const DEFAULT_KEEP: usize = 7;

#[derive(Args, Debug, Default, Clone)]
pub struct BackupArgs {
    /// A backup target: an absolute directory or `s3://BUCKET/PREFIX`
    /// (with the AWS variables); repeat for several. The first is the
    /// schedule's.
    #[arg(long = "backup-to", env = "BERTH_BACKUP_TO", value_delimiter = ',')]
    pub backup_to: Vec<String>,
    /// Take a backup to the first target this often (`6h`, `30m`), on one
    /// node of the region [default: off].
    #[arg(long, env = "BERTH_BACKUP_EVERY")]
    pub backup_every: Option<String>,
    /// Scheduled backups keep this many newest backups in the target,
    /// removing older ones and the blobs only they held [default: 7].
    #[arg(long, env = "BERTH_BACKUP_KEEP")]
    pub backup_keep: Option<usize>,
}

#[derive(Default, Deserialize)]
pub struct FileBackup {
    #[serde(default)]
    backup_to: Vec<String>,
    backup_every: Option<String>,
    backup_keep: Option<usize>,
}

#[derive(Debug, Clone, Default)]
pub struct BackupSettings {
    pub targets: Vec<String>,
    /// `None`: no scheduled backups.
    pub every: Option<Duration>,
    pub keep: usize,
}

fn valid_target(url: &str) -> Result<(), ConfigError> {
    let ok = match url.strip_prefix("s3://") {
        Some(rest) => !rest.split('/').next().unwrap_or_default().is_empty(),
        None => std::path::Path::new(url.strip_prefix("file://").unwrap_or(url)).is_absolute(),
    };
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "backup target {url:?}: expected an absolute directory or s3://BUCKET/PREFIX"
        )))
    }
}

pub(super) fn resolve(args: BackupArgs, file: FileBackup) -> Result<BackupSettings, ConfigError> {
    let targets = if args.backup_to.is_empty() {
        file.backup_to
    } else {
        args.backup_to
    };
    for target in &targets {
        valid_target(target)?;
    }
    let every = match args.backup_every.or(file.backup_every) {
        None => None,
        Some(text) if text == "0" || text == "off" => None,
        Some(text) => {
            let every = humantime::parse_duration(&text).map_err(|e| {
                ConfigError::Invalid(format!("backup_every {text:?}: {e} (e.g. 6h, 30m)"))
            })?;
            if every < Duration::from_secs(60) {
                return Err(ConfigError::Invalid(
                    "backup_every must be at least a minute".into(),
                ));
            }
            Some(every)
        }
    };
    if every.is_some() && targets.is_empty() {
        return Err(ConfigError::Invalid(
            "backup_every needs a target (--backup-to)".into(),
        ));
    }
    let keep = args
        .backup_keep
        .or(file.backup_keep)
        .unwrap_or(DEFAULT_KEEP);
    if keep == 0 {
        return Err(ConfigError::Zero("backup_keep"));
    }
    Ok(BackupSettings {
        targets,
        every,
        keep,
    })
}

/// A path made absolute and without `.` or `..`, lexically (it may not
/// exist yet).
fn lexical(path: &std::path::Path) -> std::path::PathBuf {
    use std::path::Component;
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut out = std::path::PathBuf::new();
    for part in absolute.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Backups must not live inside the registry's own storage (or it inside
/// them): a prune would delete live blobs, a garbage collection backup
/// chunks.
pub(super) fn check_apart(
    backup: &BackupSettings,
    data_dir: &std::path::Path,
    storage: &super::Storage,
) -> Result<(), ConfigError> {
    let data_dir = lexical(data_dir);
    for target in &backup.targets {
        let overlaps = match target.strip_prefix("s3://") {
            Some(rest) => match storage {
                super::Storage::S3 { bucket, prefix } => {
                    let (tbucket, tprefix) = rest.split_once('/').unwrap_or((rest, ""));
                    // The whole bucket is the empty prefix, a prefix of all.
                    let norm = |p: &str| match p.trim_matches('/') {
                        "" => String::new(),
                        p => format!("{p}/"),
                    };
                    let (a, b) = (norm(tprefix), norm(prefix));
                    tbucket == bucket && (a.starts_with(&b) || b.starts_with(&a))
                }
                super::Storage::Fs => false,
            },
            None => {
                let dir = lexical(std::path::Path::new(
                    target.strip_prefix("file://").unwrap_or(target),
                ));
                dir.starts_with(&data_dir) || data_dir.starts_with(&dir)
            }
        };
        if overlaps {
            return Err(ConfigError::Invalid(format!(
                "backup target {target} overlaps the registry's own storage: keep backups apart from the data directory and the blob bucket prefix"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(to: &[&str], every: Option<&str>) -> BackupArgs {
        BackupArgs {
            backup_to: to.iter().map(|s| s.to_string()).collect(),
            backup_every: every.map(str::to_string),
            backup_keep: None,
        }
    }

    #[test]
    fn targets_and_schedules_are_checked() {
        let ok = resolve(
            args(&["/backups", "s3://b/p"], Some("6h")),
            FileBackup::default(),
        )
        .unwrap();
        assert_eq!(ok.every, Some(Duration::from_secs(6 * 3600)));
        assert_eq!(ok.keep, DEFAULT_KEEP);
        for bad in [
            args(&["relative/dir"], None),
            args(&["s3://"], None),
            args(&[], Some("6h")),
            args(&["/b"], Some("10s")),
            args(&["/b"], Some("soon")),
        ] {
            assert!(
                resolve(bad.clone(), FileBackup::default()).is_err(),
                "{bad:?}"
            );
        }
        assert!(
            resolve(args(&["/b"], Some("off")), FileBackup::default())
                .unwrap()
                .every
                .is_none()
        );
    }

    #[test]
    fn backups_stay_apart_from_the_registry_storage() {
        use super::super::Storage;
        let settings = |t: &str| BackupSettings {
            targets: vec![t.to_string()],
            ..BackupSettings::default()
        };
        let data = std::path::Path::new("/var/lib/berth");
        let s3 = |bucket: &str, prefix: &str| Storage::S3 {
            bucket: bucket.into(),
            prefix: prefix.into(),
        };
        for bad in ["/var/lib/berth/backups", "/var/lib", "/var/lib/x/../berth"] {
            assert!(
                check_apart(&settings(bad), data, &Storage::Fs).is_err(),
                "{bad}"
            );
        }
        assert!(check_apart(&settings("/var/backups"), data, &Storage::Fs).is_ok());
        assert!(check_apart(&settings("s3://b/backups"), data, &s3("b", "")).is_err());
        assert!(check_apart(&settings("s3://b/eu/backups"), data, &s3("b", "eu/")).is_err());
        assert!(check_apart(&settings("s3://b/backups"), data, &s3("b", "eu/")).is_ok());
        assert!(check_apart(&settings("s3://other/x"), data, &s3("b", "")).is_ok());
    }
}
