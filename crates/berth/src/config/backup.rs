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
}
