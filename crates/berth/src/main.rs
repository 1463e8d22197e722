//! `berth`: a highly available OCI container registry.

mod admin;
mod backup_cmd;
mod cache_cmd;
mod client;
mod cluster;
mod compact_cmd;
mod config;
mod gc_cmd;
mod job_stream;
mod progress;
mod region_view;
mod replication_cmd;
mod retention_cmd;
mod scrub_cmd;
mod security;
mod serve;
mod tags_cmd;
mod token_cmd;
mod transfer;
mod transfer_cmd;
mod trash_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{ServeArgs, ServeConfig};

#[derive(Parser)]
#[command(
    name = "berth",
    version,
    about = "A highly available OCI container registry"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the registry (embedded engines by default: local files and redb).
    Serve(ServeArgs),
    /// Inspect a cluster (etcd metadata).
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Act on one node of a cluster.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Geo-replication of a running registry's region.
    Replication {
        #[command(flatten)]
        connection: client::Connection,
        /// The region's replication secret: pauses, resumes and turns
        /// serving off or on in a region without authentication (with
        /// authentication, an administrator's credentials do).
        #[arg(
            long,
            env = "BERTH_REPLICATION_SECRET",
            hide_env_values = true,
            global = true
        )]
        replication_secret: Option<String>,
        #[command(subcommand)]
        command: ReplicationCommand,
    },
    /// The pull-through cache of a running registry.
    Cache {
        #[command(flatten)]
        connection: client::Connection,
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Collect garbage in a running registry now: links no manifest
    /// references, then blobs nothing references, then stale upload data.
    Gc {
        #[command(flatten)]
        connection: client::Connection,
        /// Report what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Keep what is younger than this many seconds [default: the
        /// registry's --gc-grace-secs].
        #[arg(long)]
        grace: Option<u64>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Compact a running registry's metadata now: change-log entries every
    /// peer has applied, tombstones and tag history older than the
    /// registry's --log-retention-secs. Shows the metadata by kind, before
    /// and after.
    Compact {
        #[command(flatten)]
        connection: client::Connection,
        /// Report what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-read and re-hash every blob at rest in a running registry now;
    /// names each corrupt or missing blob and exits 1 when it found any.
    Scrub {
        #[command(flatten)]
        connection: client::Connection,
        /// Replace what it finds with verified bytes from the node's backup
        /// targets (--backup-to) or its peer regions; exits 0 when every
        /// blob found was repaired.
        #[arg(long)]
        repair: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Backups of a running registry into one of its targets
    /// (`--backup-to`): take, list, verify and restore them.
    Backup {
        #[command(flatten)]
        connection: client::Connection,
        #[command(subcommand)]
        command: BackupCommand,
    },
    /// Write images of a running registry into an OCI image layout (a
    /// directory, or FILE.tar), every blob verified: for an air-gapped
    /// transfer (`berth import`, `skopeo copy oci:DIR:REPO:TAG`).
    Export {
        #[command(flatten)]
        connection: client::Connection,
        /// Images, as REPOSITORY:TAG or REPOSITORY@DIGEST.
        #[arg(required = true)]
        images: Vec<String>,
        /// A directory (created, or added to) or a FILE.tar.
        #[arg(long)]
        to: std::path::PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Load images into a running registry, verified: from an OCI image
    /// layout (a directory or FILE.tar; images named REPOSITORY:TAG, or a
    /// tag with --to), or with --from from another registry (every tag of
    /// the repositories its catalog lists that --repository globs match).
    /// Running it again after an interruption copies only what is missing.
    Import {
        #[command(flatten)]
        connection: client::Connection,
        /// The layout to import.
        #[arg(required_unless_present = "from", conflicts_with = "from")]
        layout: Option<std::path::PathBuf>,
        /// The repository the layout's images go to.
        #[arg(long)]
        to: Option<String>,
        /// Another registry's URL.
        #[arg(long, requires = "repository")]
        from: Option<String>,
        /// Repositories of the other registry to import (globs, e.g.
        /// `team/**`); repeat for several.
        #[arg(long)]
        repository: Vec<String>,
        /// User name at the other registry.
        #[arg(long, env = "BERTH_IMPORT_USERNAME")]
        from_username: Option<String>,
        /// Password or token at the other registry.
        #[arg(long, env = "BERTH_IMPORT_PASSWORD", hide_env_values = true)]
        from_password: Option<String>,
        /// CA certificate (PEM) of the other registry.
        #[arg(long, env = "BERTH_IMPORT_CA_FILE")]
        from_ca_file: Option<std::path::PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// A tag's history, and moving a tag back to a digest it had.
    Tags {
        #[command(flatten)]
        connection: client::Connection,
        #[command(subcommand)]
        command: TagsCommand,
    },
    /// The [[retention]] rules of a running registry.
    Retention {
        #[command(flatten)]
        connection: client::Connection,
        #[command(subcommand)]
        command: RetentionCommand,
    },
    /// What clients deleted and the trash still keeps.
    Trash {
        #[command(flatten)]
        connection: client::Connection,
        #[command(subcommand)]
        command: TrashCommand,
    },
    /// Bring back a deleted manifest (REPOSITORY@DIGEST, with the tags its
    /// delete removed) or a deleted tag (REPOSITORY:TAG) from the trash.
    Undelete {
        #[command(flatten)]
        connection: client::Connection,
        image: String,
    },
    /// API tokens for machines, and the token service's signing keys.
    Token {
        #[command(flatten)]
        connection: client::Connection,
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand)]
enum TagsCommand {
    /// Every digest a tag pointed to, oldest first: when, from which
    /// region, and who pushed it.
    History {
        /// REPOSITORY:TAG
        image: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Point a tag back at a digest it had (the manifest must still be in
    /// the repository).
    Restore {
        /// REPOSITORY:TAG
        image: String,
        digest: String,
    },
}

#[derive(Subcommand)]
enum RetentionCommand {
    /// What the rules would delete today.
    Plan {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Apply the rules now (the job does it every --retention-interval-secs).
    Apply,
}

#[derive(Subcommand)]
enum BackupCommand {
    /// Take a consistent backup now while the registry serves; exits 1
    /// when blobs had to be left out (missing or corrupt at rest).
    Create {
        /// The target (one of the node's --backup-to) [default: its first].
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The backups in a target, oldest first.
    Ls {
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Re-read and re-hash every blob of a backup and check that every
    /// manifest's references are in it; exits 1 when it found damage.
    Verify {
        #[arg(long)]
        from: Option<String>,
        /// The backup [default: the newest].
        id: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Restore a backup into this registry, which must be empty (or hold
    /// a restore of the same backup that was interrupted: it resumes).
    Restore {
        #[arg(long)]
        from: Option<String>,
        /// The backup [default: the newest].
        id: Option<String>,
        /// Take over the target from the registry the backup was taken
        /// of, to go on backing up into it: only once that registry is
        /// retired (two registries in one target prune each other's).
        #[arg(long, conflicts_with = "repository")]
        adopt: bool,
        /// Restore only these repositories (globs; repeat for several)
        /// into this registry as it is, live: each manifest and tag an
        /// ordinary push. Tags moved since the backup stay where they are.
        #[arg(long)]
        repository: Vec<String>,
        /// With --repository: move tags back even if they moved since.
        #[arg(long, requires = "repository")]
        force: bool,
        /// Restore the registry as it was at this moment (RFC 3339, such as
        /// 2026-12-01T10:00:00Z, or `latest`): the last backup before it,
        /// then the archived change log up to it.
        #[arg(long, conflicts_with_all = ["id", "repository"])]
        at: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TrashCommand {
    /// Deleted manifests and tags, newest first, with when they expire.
    Ls {
        /// Only this repository.
        repository: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create an API token; prints its secret once (use it as the password
    /// with any user name, with Basic auth or at the token endpoint).
    Create {
        name: String,
        /// Repository globs it may act on (repeatable or comma-separated;
        /// `*` stays within a path segment, `**` crosses them).
        #[arg(long = "repositories", required = true, value_delimiter = ',')]
        repositories: Vec<String>,
        /// Actions: pull, push, delete, admin (comma-separated).
        #[arg(long, required = true, value_delimiter = ',')]
        actions: Vec<String>,
        /// Lifetime such as 90d or 12h [default: until revoked].
        #[arg(long, value_parser = token_cmd::parse_lifetime)]
        expires: Option<u64>,
    },
    /// List API tokens (never their secrets).
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an API token on every node of the region.
    Revoke { name: String },
    /// List the token service's signing keys.
    Keys,
    /// Add a new signing key; older keys keep verifying until their tokens
    /// expire, and are dropped by a later rotation.
    RotateKey,
}

#[derive(Subcommand)]
enum ReplicationCommand {
    /// Per peer: changes applied, behind, seconds behind, bytes copied, last
    /// error; and a digest of this region's state. Exits 1 if a peer has an
    /// error or serving is off.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop applying a peer's changes (region-wide) until resumed.
    Pause { peer: String },
    /// Apply a peer's changes again, from where replication stopped.
    Resume { peer: String },
    /// Turn serving in this region on or off: off makes every node's
    /// /readyz fail, so load balancers and DNS fail over (drills).
    Serving {
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Fetch images into the cache now, so that they are there when the
    /// upstream is not: every platform of an index, or the chosen ones.
    Warm {
        /// Images such as docker.io/library/alpine:3.20 or NAME@DIGEST.
        #[arg(required = true)]
        images: Vec<String>,
        /// Only this platform of an index, e.g. linux/amd64 (repeatable).
        #[arg(long = "platform")]
        platforms: Vec<String>,
        /// Also pin the images, so that eviction never removes them.
        #[arg(long)]
        pin: bool,
    },
    /// List cached images: tags, size, age, last use, pinned.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pin a cached image (and an index's cached children).
    Pin { image: String },
    /// Unpin a cached image.
    Unpin { image: String },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Nodes and their readiness, etcd members and leader, storage health.
    /// Exits 0 only if everything is healthy.
    Status(ServeArgs),
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Drain a node: it stops taking traffic (`/readyz` fails), finishes its
    /// requests, leaves the cluster and exits.
    Drain {
        /// The node's name (see `berth cluster status`).
        name: String,
        /// Seconds to wait for the node to leave.
        #[arg(long, default_value_t = 60)]
        wait_secs: u64,
        #[command(flatten)]
        config: ServeArgs,
    },
}

/// Resolves configuration or explains why it is invalid.
fn resolve(args: ServeArgs) -> Result<ServeConfig, ExitCode> {
    ServeConfig::resolve(args).map_err(|e| {
        eprintln!("berth: {e}");
        ExitCode::from(2)
    })
}

/// Runs an operator command on a small runtime.
fn run_admin<F: std::future::Future<Output = Result<bool, admin::AdminError>>>(
    f: impl FnOnce() -> F,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("berth: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(f()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("berth: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Cluster {
            command: ClusterCommand::Status(args),
        } => match resolve(args) {
            Ok(config) => run_admin(|| async move { admin::cluster_status(&config).await }),
            Err(code) => code,
        },
        Command::Node {
            command:
                NodeCommand::Drain {
                    name,
                    wait_secs,
                    config,
                },
        } => match resolve(config) {
            Ok(config) => run_admin(|| async move {
                admin::drain_node(&config, &name, std::time::Duration::from_secs(wait_secs))
                    .await
                    .map(|()| true)
            }),
            Err(code) => code,
        },
        Command::Replication {
            connection,
            replication_secret,
            command,
        } => run_admin(|| async move {
            let api = connection.api(std::time::Duration::from_secs(30))?;
            let secret = replication_secret.as_deref();
            match command {
                ReplicationCommand::Status { json } => replication_cmd::status(&api, json).await,
                ReplicationCommand::Pause { peer } => {
                    replication_cmd::pause(&api, secret, &peer, true).await
                }
                ReplicationCommand::Resume { peer } => {
                    replication_cmd::pause(&api, secret, &peer, false).await
                }
                ReplicationCommand::Serving { state } => {
                    replication_cmd::serving(&api, secret, state == "on").await
                }
            }
        }),
        Command::Cache {
            connection,
            command,
        } => run_admin(|| async move {
            let api = connection.api(std::time::Duration::from_secs(120))?;
            match command {
                CacheCommand::Warm {
                    images,
                    platforms,
                    pin,
                } => cache_cmd::warm(&api, &images, &platforms, pin).await,
                CacheCommand::Ls { json } => cache_cmd::list(&api, json).await,
                CacheCommand::Pin { image } => cache_cmd::pin(&api, &image, true).await,
                CacheCommand::Unpin { image } => cache_cmd::pin(&api, &image, false).await,
            }
        }),
        Command::Gc {
            connection,
            dry_run,
            grace,
            json,
        } => run_admin(|| async move {
            // Progress arrives every second; a minute of silence is a hang.
            let api = connection.api(std::time::Duration::from_secs(60))?;
            gc_cmd::run(&api, dry_run, grace, json).await
        }),
        Command::Compact {
            connection,
            dry_run,
            json,
        } => run_admin(|| async move {
            // It scans all metadata twice to measure it: minutes at worst.
            let api = connection.api(std::time::Duration::from_secs(600))?;
            compact_cmd::run(&api, dry_run, json).await
        }),
        Command::Scrub {
            connection,
            repair,
            json,
        } => run_admin(|| async move {
            // Progress arrives every second; a minute of silence is a hang.
            let api = connection.api(std::time::Duration::from_secs(60))?;
            scrub_cmd::run(&api, repair, json).await
        }),
        Command::Backup {
            connection,
            command,
        } => run_admin(|| async move {
            // Progress arrives every second; a minute of silence is a hang.
            let api = connection.api(std::time::Duration::from_secs(60))?;
            match command {
                BackupCommand::Create { to, json } => {
                    backup_cmd::create(&api, to.as_deref(), json).await
                }
                BackupCommand::Ls { from, json } => {
                    backup_cmd::list(&api, from.as_deref(), json).await
                }
                BackupCommand::Verify { from, id, json } => {
                    backup_cmd::verify(&api, from.as_deref(), id.as_deref(), json).await
                }
                BackupCommand::Restore {
                    from,
                    id,
                    repository,
                    force,
                    json,
                    ..
                } if !repository.is_empty() => {
                    backup_cmd::restore_repositories(
                        &api,
                        from.as_deref(),
                        id.as_deref(),
                        &repository,
                        force,
                        json,
                    )
                    .await
                }
                BackupCommand::Restore {
                    from,
                    id,
                    adopt,
                    at,
                    json,
                    ..
                } => {
                    let source = backup_cmd::RestoreSource {
                        from: from.as_deref(),
                        id: id.as_deref(),
                        at: at.as_deref(),
                    };
                    backup_cmd::restore(&api, source, adopt, json).await
                }
            }
        }),
        Command::Export {
            connection,
            images,
            to,
            json,
        } => run_admin(|| async move {
            let api = connection.api(std::time::Duration::from_secs(60))?;
            transfer_cmd::export(&api, &images, &to, json).await
        }),
        Command::Import {
            connection,
            layout,
            to,
            from,
            repository,
            from_username,
            from_password,
            from_ca_file,
            json,
        } => run_admin(|| async move {
            let api = connection.api(std::time::Duration::from_secs(60))?;
            match (layout, from) {
                (Some(layout), _) => {
                    transfer_cmd::import_layout(&api, &layout, to.as_deref(), json).await
                }
                (None, Some(url)) => {
                    let from = transfer_cmd::FromRegistry {
                        url,
                        username: from_username,
                        password: from_password,
                        ca_file: from_ca_file,
                    };
                    transfer_cmd::import_registry(&api, &from, &repository, json).await
                }
                (None, None) => Err(admin::AdminError::Failed(
                    "name a layout or --from URL".into(),
                )),
            }
        }),
        Command::Tags {
            connection,
            command,
        } => run_admin(|| async move {
            let api = connection.api(std::time::Duration::from_secs(30))?;
            match command {
                TagsCommand::History { image, json } => tags_cmd::history(&api, &image, json).await,
                TagsCommand::Restore { image, digest } => {
                    tags_cmd::restore(&api, &image, &digest).await
                }
            }
        }),
        Command::Retention {
            connection,
            command,
        } => run_admin(|| async move {
            let api = connection.api(std::time::Duration::from_secs(120))?;
            match command {
                RetentionCommand::Plan { json } => retention_cmd::plan(&api, json).await,
                RetentionCommand::Apply => retention_cmd::apply(&api).await,
            }
        }),
        Command::Trash {
            connection,
            command: TrashCommand::Ls { repository, json },
        } => run_admin(|| async move {
            let api = connection.api(std::time::Duration::from_secs(30))?;
            trash_cmd::list(&api, repository.as_deref(), json).await
        }),
        Command::Undelete { connection, image } => run_admin(|| async move {
            let api = connection.api(std::time::Duration::from_secs(60))?;
            trash_cmd::undelete(&api, &image).await
        }),
        Command::Token {
            connection,
            command,
        } => run_admin(|| async move {
            let api = connection.api(std::time::Duration::from_secs(30))?;
            match command {
                TokenCommand::Create {
                    name,
                    repositories,
                    actions,
                    expires,
                } => token_cmd::create(&api, &name, &repositories, &actions, expires).await,
                TokenCommand::Ls { json } => token_cmd::list(&api, json).await,
                TokenCommand::Revoke { name } => token_cmd::revoke(&api, &name).await,
                TokenCommand::Keys => token_cmd::keys(&api).await,
                TokenCommand::RotateKey => token_cmd::rotate(&api).await,
            }
        }),
        Command::Serve(args) => {
            let config = match resolve(args) {
                Ok(c) => c,
                Err(code) => return code,
            };
            serve::init_logging(config.log_format);
            match serve::run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "berth stopped");
                    eprintln!("berth: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
