//! `rba`: the rust-build-agent command.
//!
//! `rba build|test|lint|audit|check|fmt [PATH]` hashes a workspace into the CAS (respecting
//! `.gitignore`, skipping `target/`), submits it as a cargo job and streams cargo's own output
//! live, then prints a summary and exits with the job's status. Without `--remote` (not yet
//! available) it runs an embedded node in-process: the CAS and the sandboxed executor live
//! under the data directory, so a fresh machine needs no service started by hand.
//! `rba hash PATH` only stores a workspace and prints its root digest.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use rba_cas::merkle::{DirOptions, build_from_dir};
use rba_cas::{Cas, DigestFunction, StoreConfig};
use rba_executor::cargo::{CargoJob, JobKind};
use rba_executor::runner::{Executor, ExecutorConfig, JobState, JobStatus};

#[derive(Parser)]
#[command(name = "rba", version, about = "Remote, cached, sandboxed cargo builds", long_about = None)]
struct Cli {
    /// Where the embedded node keeps its CAS, caches and logs.
    #[arg(long, global = true, env = "RBA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// cargo build
    Build(JobArgs),
    /// cargo test
    Test(JobArgs),
    /// cargo clippy (warnings are errors)
    Lint(JobArgs),
    /// cargo audit
    Audit(JobArgs),
    /// cargo check
    Check(JobArgs),
    /// cargo fmt --check
    Fmt(JobArgs),
    /// Store a workspace in the CAS and print its root digest.
    Hash {
        /// The workspace directory.
        #[arg(default_value = ".")]
        path: PathBuf,
    },
}

#[derive(Args)]
struct JobArgs {
    /// The workspace directory (the one holding Cargo.toml).
    #[arg(default_value = ".")]
    path: PathBuf,
    /// Build with the release profile.
    #[arg(long)]
    release: bool,
    /// Concurrent jobs of the embedded node.
    #[arg(long, default_value_t = 2, env = "RBA_WORKERS")]
    workers: usize,
    /// Extra arguments passed to cargo (after `--`).
    #[arg(last = true)]
    cargo_args: Vec<String>,
}

fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("rba")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RBA_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("rba: error: {error:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let data_dir = cli.data_dir.unwrap_or_else(default_data_dir);
    let (kind, args) = match cli.command {
        Commands::Hash { path } => {
            let cas = open_cas(&data_dir)?;
            let (root, files) = hash_workspace(&cas, &path, false).await?;
            println!("{root:?} ({files} files)");
            return Ok(ExitCode::SUCCESS);
        }
        Commands::Build(args) => (JobKind::Build, args),
        Commands::Test(args) => (JobKind::Test, args),
        Commands::Lint(args) => (JobKind::Clippy, args),
        Commands::Audit(args) => (JobKind::Audit, args),
        Commands::Check(args) => (JobKind::Check, args),
        Commands::Fmt(args) => (JobKind::Fmt, args),
    };
    run_job(&data_dir, kind, args).await
}

fn open_cas(data_dir: &Path) -> anyhow::Result<Cas> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    Cas::open(data_dir.join("cas"), StoreConfig::default())
        .with_context(|| format!("opening the CAS under {}", data_dir.display()))
}

/// Hashes a workspace into the CAS; returns the root digest and the number of files.
async fn hash_workspace(
    cas: &Cas,
    path: &Path,
    require_manifest: bool,
) -> anyhow::Result<(rba_cas::Digest, u64)> {
    if !path.is_dir() {
        bail!("{} is not a directory", path.display());
    }
    if require_manifest && !path.join("Cargo.toml").is_file() {
        bail!(
            "no Cargo.toml in {}: point rba at a crate or workspace root",
            path.display()
        );
    }
    let (blobs, path) = (cas.blobs.clone(), path.to_path_buf());
    let built = tokio::task::spawn_blocking(move || {
        build_from_dir(
            &blobs,
            &path,
            DigestFunction::Blake3,
            &DirOptions::default(),
        )
        .with_context(|| format!("hashing {}", path.display()))
    })
    .await??;
    Ok((built.root, built.stats.files))
}

/// A stable name for the workspace's target cache: its canonical path on this machine.
fn workspace_identity(path: &Path) -> String {
    std::fs::canonicalize(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

async fn run_job(data_dir: &Path, kind: JobKind, args: JobArgs) -> anyhow::Result<ExitCode> {
    let cas = open_cas(data_dir)?;
    let (root, files) = hash_workspace(&cas, &args.path, true).await?;
    let mut config =
        ExecutorConfig::new(data_dir.join("executor")).context("configuring the executor")?;
    config.workers = args.workers.max(1);
    let executor = Executor::new(cas, config).context("starting the embedded executor")?;
    let job = CargoJob {
        kind,
        release: args.release,
        extra_args: args.cargo_args,
    };
    let handle = executor
        .submit_cargo(&job, root, &workspace_identity(&args.path))
        .await?;
    eprintln!(
        "rba: {} {} ({files} files, root {root:?}) on the embedded node",
        kind.name(),
        args.path.display()
    );

    let interactive = std::io::stderr().is_terminal();
    let mut state = handle.watch();
    let progress = tokio::spawn(async move {
        let mut last = (0, 0);
        while state.changed().await.is_ok() {
            let current = state.borrow().clone();
            if let JobState::Running { done, total } = current
                && interactive
                && (done, total) != last
            {
                last = (done, total);
                let total = if total == 0 {
                    "?".to_string()
                } else {
                    total.to_string()
                };
                eprint!("\r\x1b[2K[{done}/{total} units]");
            }
        }
    });
    let mut reader = handle.log.subscribe(0);
    let mut stdout = std::io::stdout().lock();
    while let Some(line) = reader.next().await {
        if interactive {
            eprint!("\r\x1b[2K");
        }
        writeln!(stdout, "{}", line.line).ok();
    }
    drop(stdout);
    let outcome = handle.wait().await;
    progress.abort();
    if interactive {
        eprint!("\r\x1b[2K");
    }
    eprintln!();
    let status = match outcome.status {
        JobStatus::Success => "success",
        JobStatus::Failed => "failed",
        JobStatus::Cancelled => "cancelled",
        JobStatus::Error => "error",
    };
    eprintln!(
        "rba: {status} in {:.2}s{} (exit code {})",
        outcome.duration.as_secs_f64(),
        if outcome.cache_hit {
            ", action-cache hit"
        } else {
            ""
        },
        outcome.exit_code
    );
    for (step, took) in &outcome.steps {
        eprintln!("rba:   {step:<12} {:.2}s", took.as_secs_f64());
    }
    for artifact in &outcome.artifacts {
        eprintln!("rba: artifact {} {:?}", artifact.path, artifact.digest);
    }
    if let Some(error) = &outcome.error {
        eprintln!("rba: {error}");
    }
    Ok(match outcome.status {
        JobStatus::Success => ExitCode::SUCCESS,
        _ => ExitCode::from(
            u8::try_from(outcome.exit_code)
                .ok()
                .filter(|c| *c != 0)
                .unwrap_or(1),
        ),
    })
}
