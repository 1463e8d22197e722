//! `berth-storm`: the pull storm after a disaster, as a benchmark. N
//! container hosts, each with its own connections, pull one image at the same
//! moment; every byte is checked against its digest's content. Reports the
//! time until the last host finished, per-pull p50/p99, failures and bytes/s.
//!
//! ```text
//! berth-storm push --registry http://127.0.0.1:5000 --image bench/storm:1
//! berth-storm pull --registry http://127.0.0.1:5000 --image bench/storm:1 --hosts 256 --json
//! ```
//!
//! Both sides generate the image from the same `--seed` and `--layers`, so
//! the puller knows what every blob must be without a reference download
//! (which would warm a cache before the storm it measures).

mod image;
mod pull;
mod push;

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use image::Image;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Http(#[from] reqwest::Error),
    #[error("{0} answered {1}")]
    Status(&'static str, reqwest::StatusCode),
    #[error("{0}")]
    Protocol(&'static str),
    #[error("{0} is not part of the image")]
    Unexpected(String),
    #[error("the content of {0} is not what its digest names")]
    Mismatch(String),
    #[error("a manifest does not parse: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Usage(String),
}

/// Where the image lives: `BASE/v2/NAME/manifests/REFERENCE`.
pub struct Target {
    pub base: String,
    pub name: String,
    pub reference: String,
}

#[derive(Parser)]
#[command(
    name = "berth-storm",
    version,
    about = "N hosts pulling one image at once, every byte verified"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ImageArgs {
    /// The registry's base URL.
    #[arg(long)]
    registry: String,
    /// Repository and tag, `NAME:TAG`.
    #[arg(long)]
    image: String,
    /// Seed of the generated content (same on both sides).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Layer sizes of the pulled platform, comma separated (`K`, `M`, `G`).
    #[arg(long, default_value = "24M,12M,6M,3M,1M,256K")]
    layers: String,
}

#[derive(Subcommand)]
enum Command {
    /// Pushes the generated image (an index of linux/amd64 and linux/arm64).
    Push {
        #[command(flatten)]
        image: ImageArgs,
    },
    /// Runs the storm.
    Pull {
        #[command(flatten)]
        image: ImageArgs,
        /// Hosts pulling at once.
        #[arg(long, default_value_t = 64)]
        hosts: usize,
        /// Bound on each request, body included, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Threads of the load generator (it shares the machine with the
        /// server it measures: one by default).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Print the result as one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
}

fn target_and_image(args: &ImageArgs) -> Result<(Target, Image), Error> {
    let (name, reference) = args
        .image
        .rsplit_once(':')
        .filter(|(name, tag)| !name.is_empty() && !tag.is_empty() && !tag.contains('/'))
        .ok_or_else(|| Error::Usage(format!("--image must be NAME:TAG, got {:?}", args.image)))?;
    let mut sizes = Vec::new();
    for s in args.layers.split(',') {
        sizes.push(image::parse_size(s).map_err(Error::Usage)?);
    }
    if sizes.is_empty() || sizes.iter().any(|&s| s == 0 || s > 8 << 30) {
        return Err(Error::Usage(
            "--layers: between 1 byte and 8 GiB each".into(),
        ));
    }
    let target = Target {
        base: args.registry.trim_end_matches('/').to_string(),
        name: name.to_string(),
        reference: reference.to_string(),
    };
    Ok((target, Image::generate(args.seed, &sizes)))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let threads = match &cli.command {
        Command::Pull { threads, .. } => (*threads).max(1),
        Command::Push { .. } => 1,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("berth-storm: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(2),
        Err(e) => {
            eprintln!("berth-storm: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `Ok(false)`: the storm ran and some pulls failed.
async fn run(command: Command) -> Result<bool, Error> {
    match command {
        Command::Push { image } => {
            let (target, image) = target_and_image(&image)?;
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(300))
                .build()?;
            let started = Instant::now();
            push::push(&client, &target, &image).await?;
            eprintln!(
                "berth-storm: pushed {}/{}:{} ({} blobs, {:.1} MiB pulled per host) in {:.2} s",
                target.base,
                target.name,
                target.reference,
                image.blobs.len(),
                image.pull_bytes as f64 / (1 << 20) as f64,
                started.elapsed().as_secs_f64()
            );
            Ok(true)
        }
        Command::Pull {
            image,
            hosts,
            timeout,
            json,
            ..
        } => {
            if hosts == 0 || hosts > 100_000 {
                return Err(Error::Usage("--hosts: between 1 and 100000".into()));
            }
            let (target, image) = target_and_image(&image)?;
            let image = Arc::new(image);
            let expected_bytes = image.pull_bytes * hosts as u64;
            let outcome = pull::storm(
                Arc::new(target),
                image.clone(),
                hosts,
                Duration::from_secs(timeout),
            )
            .await?;
            let mut times: Vec<f64> = outcome
                .pulls
                .iter()
                .filter_map(|p| p.as_ref().ok().map(Duration::as_secs_f64))
                .collect();
            times.sort_by(f64::total_cmp);
            let errors: Vec<&String> = outcome
                .pulls
                .iter()
                .filter_map(|p| p.as_ref().err())
                .collect();
            let wall = outcome.wall.as_secs_f64();
            let mut first_errors: Vec<&String> = errors.clone();
            first_errors.sort();
            first_errors.dedup();
            first_errors.truncate(5);
            let result = serde_json::json!({
                "hosts": hosts,
                "ok": times.len(),
                "failed": errors.len(),
                "time_to_last_pull_s": wall,
                "pull_p50_s": percentile(&times, 50.0),
                "pull_p99_s": percentile(&times, 99.0),
                "pull_max_s": times.last().copied().unwrap_or(0.0),
                "bytes": outcome.bytes,
                "bytes_expected": expected_bytes,
                "bytes_per_s": outcome.bytes as f64 / wall.max(1e-9),
                "errors": first_errors,
            });
            eprintln!(
                "berth-storm: {hosts} hosts, {} ok, {} failed; last pull done after {wall:.2} s; per pull p50 {:.2} s, p99 {:.2} s; {:.2} GB/s",
                times.len(),
                errors.len(),
                percentile(&times, 50.0),
                percentile(&times, 99.0),
                outcome.bytes as f64 / wall.max(1e-9) / 1e9,
            );
            for e in &first_errors {
                eprintln!("berth-storm: failure: {e}");
            }
            if json {
                println!("{result}");
            }
            Ok(errors.is_empty())
        }
    }
}
