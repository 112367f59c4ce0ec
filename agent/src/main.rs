//! `rba`: the rust-build-agent command.
//!
//! - `rba serve`: the operator node (executor workers, libp2p sessions and blob sharing, HTTP
//!   queries and WebSocket events, the REAPI server), configured by one TOML file, `RBA_*`
//!   environment variables and flags (`--token NAME:TOKEN:ACCESS`, `--public-read`,
//!   `--tls-cert`/`--tls-key`, as in `config`); prints its PeerId and listen addresses; stops
//!   cleanly on Ctrl-C or SIGTERM.
//! - `rba worker`: joins a scale-out deployment (`RBA_STORE_URL`, `RBA_DATABASE_URL`, the same
//!   two settings as its front ends' `rba serve`): claims jobs from the PostgreSQL job queue
//!   and runs them in its sandboxes, its `--data-dir` holding its local tier of the bucket and
//!   its target caches; SIGTERM or Ctrl-C drains (no new claim; running jobs finish within the
//!   grace, else are given back to the queue) and exits 0. See `rba_agent::compose`.
//! - `rba build|test|lint|audit|check|fmt [PATH] [CARGO FLAGS] [--remote MULTIADDR|NAME]
//!   [--timeout SECS] [--memory SIZE] [--processes N] [--disk SIZE] [-- CARGO ARGS]`: cargo's
//!   own flags (`-p`, `--features`, `--target`, `--profile`, `-r`, `-j`…, see
//!   [`rba_agent::cargo_flags`]) are first-class; hashes the
//!   workspace (respecting `.gitignore`, skipping `target/`), runs the job and streams cargo's
//!   own output live, then prints a summary and exits with the job's status. Without
//!   `--remote` the job runs on an embedded node in-process; with it, on the node at
//!   `MULTIADDR/p2p/PEERID`, uploading only the blobs the node lacks.
//! - Ctrl-C during `rba build|test|… --remote` cancels the job on the node (a `Cancel` frame;
//!   the node kills the sandbox), waits a few seconds for the signed end, prints `rba: cancelled
//!   session ID on NODE` and exits 130; a second Ctrl-C exits 130 at once. Without `--remote`,
//!   Ctrl-C cancels the embedded node's job the same way.
//! - `rba cancel SESSION --remote MULTIADDR`: cancels a session this client identity submitted
//!   (e.g. one whose client went away); exit 0 once the node confirms it.
//! - `rba test` ends with the results per test binary (passed, failed, ignored), the failing
//!   tests' output and a total (`test_report`), embedded and remote alike.
//! - `rba logs SESSION [--from-seq N] --remote MULTIADDR`: re-attaches to a session.
//! - `rba hash PATH`: stores a workspace in the local CAS and prints its root digest.
//! - After a successful `rba build`, the binaries are written into the local target dir
//!   (`--target-dir`, `CARGO_TARGET_DIR`, else `PATH/target`) unless `--no-download`.
//! - `rba get DIGEST -o FILE [--remote MULTIADDR]`: fetches one blob the caller may read.
//! - Remotes may be named in `~/.config/rba/config.toml` and a project's `.rba.toml`
//!   ([`rba_agent::client_config`]); `rba config` shows what was read.
//! - `rba completions SHELL`: shell completions on stdout.
//! - `cargo rba build …` is `rba build …` (the `cargo-rba` binary).
//!
//! Errors a user can act on are printed as one line `rba: error: …` (exit code 2).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use rba_agent::artifacts::{Artifact, land, land_lockfile, target_dir};
use rba_agent::cargo_flags::CargoFlags;
use rba_agent::client::RemoteClient;
use rba_agent::client_config::ClientConfig;
use rba_agent::config::{NodeArgs, default_data_dir};
use rba_agent::node::Node;
use rba_agent::output::{ColorChoice, LineStream, Terminal, exit_code, stderr_colours};
use rba_agent::p2p::session::SessionEvent;
use rba_agent::test_report::TestReport;
use rba_agent::workspace::{cas_dir, hash_workspace, open_cas, workspace_hint};
use rba_executor::cargo::{CargoJob, JobKind};
use rba_proto::rba::v1::{JobOptions, JobStatus as WireStatus, Submit};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(name = "rba", version, about = "Remote, cached, sandboxed cargo builds", long_about = None)]
struct Cli {
    /// Where rba keeps its CAS, caches, identity and logs.
    #[arg(long, global = true, env = "RBA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Colours in cargo's output.
    #[arg(long, global = true, value_enum, default_value_t, env = "RBA_COLOR")]
    color: ColorChoice,
    /// rba's own log lines (on stderr, filtered by RBA_LOG): text, or json for collectors.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t,
        env = "RBA_LOG_FORMAT"
    )]
    log_format: rba_cache_server::logging::LogFormat,
    #[command(subcommand)]
    command: Commands,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Commands {
    /// Run the operator node (libp2p, HTTP, REAPI, executor).
    Serve(ServeArgs),
    /// Run jobs for the front ends of a scale-out deployment.
    #[command(long_about = WORKER_ABOUT)]
    Worker(WorkerArgs),
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
    /// cargo run (the program runs on the node, in the sandbox)
    ///
    /// Builds, then runs the program in the build's sandbox: no network, the job's limits, no
    /// stdin. Its own arguments go after a second `--` (`rba run -- --bin app -- ARGS`). A run
    /// is never answered from the action cache; its build reuses the target dir.
    Run(JobArgs),
    /// Re-attach to a session on a node and stream its log from a line on.
    Logs {
        /// The session id (printed when the job was accepted).
        session: String,
        /// First line to print.
        #[arg(long, default_value_t = 0)]
        from_seq: u64,
        /// The node: MULTIADDR/p2p/PEERID or a remote's name (default: the config's).
        #[arg(long, env = "RBA_REMOTE")]
        remote: Option<String>,
    },
    /// Cancel a session this client submitted (running or queued) on a node.
    Cancel {
        /// The session id (printed when the job was accepted).
        session: String,
        /// The node: MULTIADDR/p2p/PEERID or a remote's name (default: the config's).
        #[arg(long, env = "RBA_REMOTE")]
        remote: Option<String>,
    },
    /// The node as a Tangle Blueprint (`rba tangle run`, started by the Blueprint Manager).
    #[cfg(feature = "tangle")]
    Tangle {
        #[command(subcommand)]
        command: rba_agent::tangle::runner::TangleCommand,
    },
    /// Fetch one blob (an artifact, a log) by digest into a file.
    Get {
        /// The digest as rba prints it (`blake3:HEX/SIZE`).
        digest: rba_cas::Digest,
        /// The file to write.
        #[arg(short, long)]
        output: PathBuf,
        /// The node (MULTIADDR/p2p/PEERID or a remote's name); without it, the local CAS.
        #[arg(long, env = "RBA_REMOTE")]
        remote: Option<String>,
    },
    /// Print shell completions (bash, zsh, fish, elvish, powershell) on stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Show the client config files read and the remotes they name.
    Config {
        /// The workspace whose `.rba.toml` counts.
        #[arg(default_value = ".")]
        path: PathBuf,
    },
    /// Store a workspace in the CAS and print its root digest.
    Hash {
        /// The workspace directory.
        #[arg(default_value = ".")]
        path: PathBuf,
    },
    /// Re-hash every blob of the local store and repair its index (exit 1: repaired)
    #[command(long_about = VERIFY_ABOUT)]
    Verify,
}

const VERIFY_ABOUT: &str = "Re-hash every blob of the local store and repair its index: after \
a crash, a full disk, a file changed behind its back.

Removes blobs whose bytes no longer match their digest and the short files of writes a crash \
interrupted, drops index entries whose file is gone, and indexes complete files a crash left \
unindexed (hashed and synced first). Reads every byte: \
it takes as long as reading the store. A node using the same data dir waits for it (the data \
dir is locked while the store is open). Exit status: 0 when all was well, 1 when something was \
repaired (the repairs are listed), 2 on an error.";

#[derive(Args)]
struct JobArgs {
    /// The workspace directory (the one holding Cargo.toml).
    #[arg(default_value = ".")]
    path: PathBuf,
    #[command(flatten)]
    cargo: CargoFlags,
    /// Run on this node: MULTIADDR/p2p/PEERID, a name from the config file's [remotes], or
    /// `local` for the embedded node (default: the config's default_remote, else embedded).
    #[arg(long, env = "RBA_REMOTE")]
    remote: Option<String>,
    /// Concurrent jobs of the embedded node (default: `[workers] slots` of the node config
    /// file RBA_CONFIG names, RBA_WORKERS, else 2).
    #[arg(long)]
    workers: Option<usize>,
    /// Wall-clock limit of the job in seconds (the node's own limit still applies).
    #[arg(long, value_name = "SECS", value_parser = rba_executor::runner::parse_count)]
    timeout: Option<u64>,
    /// Memory of all the job's processes together (e.g. 2G, 512M).
    #[arg(long, value_name = "SIZE", value_parser = rba_executor::runner::parse_size)]
    memory: Option<u64>,
    /// Processes and threads of the job together.
    #[arg(long, value_name = "N", value_parser = rba_executor::runner::parse_count)]
    processes: Option<u64>,
    /// Bytes the job may add to its target dir (e.g. 5G; needs a node with `[workers.limits] disk`).
    #[arg(long, value_name = "SIZE", value_parser = rba_executor::runner::parse_size)]
    disk: Option<u64>,
    /// Where a build's binaries are written (default: `CARGO_TARGET_DIR`, else PATH/target).
    #[arg(long, value_name = "DIR")]
    target_dir: Option<PathBuf>,
    /// Leave the local target dir alone: do not fetch the build's binaries.
    #[arg(long)]
    no_download: bool,
    /// Extra arguments passed to cargo as given (after `--`).
    #[arg(last = true)]
    cargo_args: Vec<String>,
}

const WORKER_ABOUT: &str = "Run jobs for the front ends of a scale-out deployment.

A worker joins the deployment its front ends (`rba serve`) run on: blobs in an S3-compatible \
bucket, the blob index, the action cache and the job queue in PostgreSQL. Give it the same two \
settings: RBA_STORE_URL=s3://BUCKET[/prefix] (with AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, \
AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ALLOW_HTTP as the S3 client reads them) and \
RBA_DATABASE_URL=postgres://USER@HOST:PORT/DB, or [store] url and [database] url in --config.

It claims jobs from the queue (preferring those whose workspace's target dir it holds), fetches \
their inputs from the bucket into its local store under --data-dir, runs them in its sandboxes \
(the [workers] section of the config applies: sandbox, limits, toolchains) with --workers at once, streams their \
log lines to the front ends and publishes their outputs to the bucket. Its results go to the \
shared action cache. A worker that dies mid-job loses its lease and the job runs elsewhere.

SIGTERM or Ctrl-C drains: no new claim; running jobs get [workers] shutdown_grace_secs to finish, \
then are given back to the queue; the worker then exits 0. It prints its id (`rba: worker ID`).";

#[derive(Args)]
struct WorkerArgs {
    /// Node TOML configuration file ([store], [database], [scheduler], [workers]…).
    #[arg(long, env = "RBA_CONFIG")]
    config: Option<PathBuf>,
    /// Jobs run at once (default: the config's `[workers] slots`, RBA_WORKERS).
    #[arg(long)]
    workers: Option<usize>,
    /// Do not fsync blobs of the local store (tests, tmpfs).
    #[arg(long)]
    no_fsync: bool,
    /// Print the configuration the worker would run with (passwords and tokens masked), and
    /// exit.
    #[arg(long)]
    print_config: bool,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// A trusted peer operator, MULTIADDR/p2p/PEERID (repeatable).
    #[arg(long)]
    trusted_peer: Vec<String>,
    /// Do not fsync blobs (tests, tmpfs).
    #[arg(long)]
    no_fsync: bool,
    /// Print the configuration the node would run with (defaults < file < RBA_* environment
    /// < flags; tokens masked) as TOML, and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A Tangle node is a service whose output the Blueprint Manager collects: `info` shows each
    // call taken, built and posted. At a terminal, `warn` keeps the build's own output readable.
    let default_filter = match &cli.command {
        #[cfg(feature = "tangle")]
        Commands::Tangle { .. } => "info",
        _ => "warn",
    };
    rba_cache_server::logging::init(
        tracing_subscriber::EnvFilter::try_from_env("RBA_LOG")
            .unwrap_or_else(|_| default_filter.into()),
        cli.log_format,
    );
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = runtime.block_on(run(cli));
    // Background tasks (the swarm, blocking readers) must not keep the process alive.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            let text = format!("{error:#}").replace('\n', " ");
            eprintln!("rba: error: {text}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    let data_dir = cli.data_dir.clone();
    let client_dir = data_dir.clone().unwrap_or_else(default_data_dir);
    let color = cli.color;
    let (kind, args) = match cli.command {
        Commands::Serve(args) => return serve(data_dir, args).await,
        Commands::Worker(args) => return worker(data_dir, args).await,
        #[cfg(feature = "tangle")]
        Commands::Tangle { command } => {
            return rba_agent::tangle::runner::main(data_dir, command).await;
        }
        Commands::Hash { path } => {
            let cas = open_cas(&client_dir, rba_cas::StoreConfig::default())?;
            let tree = hash_workspace(&cas, &path, false).await?;
            println!("{:?} ({} files)", tree.root, tree.stats.files);
            return Ok(0);
        }
        Commands::Verify => return verify(&client_dir).await,
        Commands::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "rba", &mut std::io::stdout());
            return Ok(0);
        }
        Commands::Config { path } => {
            print!("{}", ClientConfig::load(Some(&path))?.describe());
            return Ok(0);
        }
        Commands::Get {
            digest,
            output,
            remote,
        } => {
            // Only an explicit --remote: without it, `get` reads the local CAS.
            let remote = match remote {
                Some(name) => ClientConfig::load(None)?.resolve_remote(Some(&name))?,
                None => None,
            };
            return get(&client_dir, digest, &output, remote.as_deref()).await;
        }
        Commands::Logs {
            session,
            from_seq,
            remote,
        } => {
            let remote = session_node(remote.as_deref(), "logs")?;
            return logs(&client_dir, &session, from_seq, &remote, color).await;
        }
        Commands::Cancel { session, remote } => {
            let remote = session_node(remote.as_deref(), "cancel")?;
            return cancel(&client_dir, &session, &remote).await;
        }
        Commands::Build(args) => (JobKind::Build, args),
        Commands::Test(args) => (JobKind::Test, args),
        Commands::Lint(args) => (JobKind::Clippy, args),
        Commands::Audit(args) => (JobKind::Audit, args),
        Commands::Check(args) => (JobKind::Check, args),
        Commands::Fmt(args) => (JobKind::Fmt, args),
        Commands::Run(args) => (JobKind::Run, args),
    };
    let mut extra_args = args.cargo.cargo_args()?;
    extra_args.extend(args.cargo_args.iter().cloned());
    let job = CargoJob {
        kind,
        release: args.cargo.release(),
        extra_args,
    };
    let limits = rba_executor::runner::JobLimits {
        wall_time: args.timeout.map(std::time::Duration::from_secs),
        memory_bytes: args.memory,
        max_processes: args.processes,
        disk_bytes: args.disk,
    };
    let land_in = (matches!(kind, JobKind::Build | JobKind::Run) && !args.no_download)
        .then(|| target_dir(args.target_dir.as_deref(), &args.path));
    let remote = ClientConfig::load(Some(&args.path))?.resolve_remote(args.remote.as_deref())?;
    match &remote {
        None => {
            let config = rba_agent::local::embedded_config(&client_dir, args.workers)?;
            rba_agent::local::run(&config, job, limits, &args.path, color, land_in.as_deref()).await
        }
        Some(remote) => {
            run_remote(
                &client_dir,
                job,
                limits,
                &args.path,
                remote,
                color,
                land_in.as_deref(),
            )
            .await
        }
    }
}

async fn serve(data_dir: Option<PathBuf>, args: ServeArgs) -> anyhow::Result<u8> {
    let mut config = args.node.node_config()?;
    if let Some(dir) = data_dir {
        config.data_dir = dir;
    }
    for peer in &args.trusted_peer {
        config
            .trusted_peers
            .push(rba_agent::config::trusted_peer_from_multiaddr(peer)?);
    }
    if args.no_fsync {
        config.store.fsync = false;
    }
    if args.print_config {
        print!("{}", config.to_masked_toml());
        return Ok(0);
    }
    // Signals are listened for before the node says where it listens: a SIGTERM sent as soon
    // as those lines appear must already shut it down cleanly.
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let node = Node::start(config).await?;
    println!("rba: node {}", node.peer_id());
    for address in node.dialable_addrs() {
        println!("rba: listening on {address}");
    }
    if let Some(http) = node.http_addr() {
        println!("rba: http on http://{http}");
    }
    if let Some(grpc) = node.grpc_addr() {
        let scheme = if node.shared().config.servers.tls.is_some() {
            "grpcs"
        } else {
            "grpc"
        };
        println!("rba: reapi on {scheme}://{grpc}");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    eprintln!("rba: shutting down");
    node.shutdown().await?;
    Ok(0)
}

async fn worker(data_dir: Option<PathBuf>, args: WorkerArgs) -> anyhow::Result<u8> {
    use rba_agent::compose::{Shared, executor_config, worker_executor};
    let mut config = match &args.config {
        Some(path) => rba_agent::config::NodeConfig::from_file(path)?,
        None => rba_agent::config::NodeConfig::default(),
    };
    config.apply_env()?;
    config.data_dir = data_dir.unwrap_or_else(|| default_data_dir().join("worker"));
    if let Some(workers) = args.workers {
        config.workers.slots = workers;
    }
    if args.no_fsync {
        config.store.fsync = false;
    }
    if args.print_config {
        print!("{}", config.to_masked_toml());
        return Ok(0);
    }
    config.validate()?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let shared = Shared::connect(&config).await?.ok_or_else(|| {
        anyhow::anyhow!(
            "rba worker joins a scale-out deployment: set RBA_STORE_URL and RBA_DATABASE_URL \
             (or [store] url and [database] url in --config), as for its front ends"
        )
    })?;
    let data_dir = config.data_dir.clone();
    let cas = open_cas(&data_dir, config.store.local())?;
    let (executor, staging) = worker_executor(
        &cas,
        executor_config(&config, &data_dir.join("executor"))?,
        &shared,
    )?;
    let worker = rba_executor::scheduler::Worker::new(shared.queue.clone(), executor)
        .with_slots(config.workers.slots)
        .with_drain_grace(std::time::Duration::from_secs(
            config.workers.shutdown_grace_secs,
        ))
        .with_staging(std::sync::Arc::new(staging));
    println!("rba: worker {}", worker.id());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let (drain, drained) = tokio::sync::watch::channel(false);
    let mut running = tokio::spawn(worker.run(drained));
    let report = tokio::select! {
        report = &mut running => report?,
        _ = terminate.recv() => drain_worker(&drain, &mut running).await?,
        _ = interrupt.recv() => drain_worker(&drain, &mut running).await?,
    };
    eprintln!(
        "rba: worker stopped: {} job(s) completed, {} given back, {} lost",
        report.completed, report.released, report.lost
    );
    let blobs = cas.blobs.clone();
    tokio::task::spawn_blocking(move || blobs.flush()).await??;
    Ok(0)
}

/// Raises the drain signal and waits for the worker to stop.
async fn drain_worker(
    drain: &tokio::sync::watch::Sender<bool>,
    running: &mut tokio::task::JoinHandle<rba_executor::scheduler::WorkerReport>,
) -> anyhow::Result<rba_executor::scheduler::WorkerReport> {
    eprintln!("rba: worker draining");
    let _ = drain.send(true);
    Ok(running.await?)
}

/// The node a session command (`rba logs`, `rba cancel`) talks to: `--remote`, else the
/// config's default; a session lives on a node, so the embedded one is an error.
fn session_node(remote: Option<&str>, command: &str) -> anyhow::Result<String> {
    ClientConfig::load(Some(Path::new(".")))?
        .resolve_remote(remote)?
        .ok_or_else(|| anyhow::anyhow!("rba {command} talks to a session on a node: pass --remote"))
}

fn client_keypair(client_dir: &Path) -> anyhow::Result<libp2p::identity::Keypair> {
    rba_agent::p2p::load_or_create_identity(&client_dir.join("client.key"))
}

async fn run_remote(
    client_dir: &Path,
    job: CargoJob,
    limits: rba_executor::runner::JobLimits,
    path: &Path,
    remote: &str,
    color: ColorChoice,
    land_in: Option<&Path>,
) -> anyhow::Result<u8> {
    let cas = open_cas(client_dir, rba_cas::StoreConfig::default())?;
    let tree = hash_workspace(&cas, path, true).await?;
    let client = RemoteClient::connect(client_keypair(client_dir)?, remote).await?;
    eprintln!(
        "rba: {} {} ({} files, root {:?}) on {}",
        job.kind.name(),
        path.display(),
        tree.stats.files,
        tree.root,
        client.node()
    );
    let submit = Submit {
        kind: job.kind.to_proto() as i32,
        options: Some(JobOptions {
            release: job.release,
            extra_args: job.extra_args.clone(),
        }),
        input_root: Some(tree.root.to_wire()),
        workspace_hint: workspace_hint(path),
        limits: Some(rba_agent::client::limits_to_wire(&limits)),
    };
    let mut terminal = Terminal::for_stdio(color);
    let mut report = TestReport::default();
    // Installed only now, so that Ctrl-C while hashing or connecting still just stops `rba`.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let session_id = parking_lot::Mutex::new(None::<String>);
    let finished = {
        let run = client.run(&cas.blobs, &tree.blobs, submit, |event| {
            match event {
                SessionEvent::Accepted(accepted) => {
                    *session_id.lock() = Some(accepted.session_id.clone())
                }
                SessionEvent::Line(line) => report.line(&line.line),
                _ => {}
            }
            render(&mut terminal, event)
        });
        tokio::pin!(run);
        let interrupted = tokio::select! {
            result = &mut run => Some(result),
            _ = interrupt.recv() => None,
        };
        match interrupted {
            Some(result) => Some(result),
            // Ctrl-C while uploading or submitting: the node may be about to accept the job.
            // Follow the session a little longer (bounded) so that the job it accepts can be
            // cancelled instead of left running; a second Ctrl-C quits at once.
            None => {
                let deadline = tokio::time::sleep(CANCEL_WAIT);
                tokio::pin!(deadline);
                while session_id.lock().is_none() {
                    tokio::select! {
                        _ = &mut run => break,
                        _ = &mut deadline => break,
                        _ = interrupt.recv() => std::process::exit(130),
                        _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
                    }
                }
                None
            }
        }
    };
    terminal.finish();
    let Some(result) = finished else {
        let session = session_id.lock().clone();
        return cancel_interrupted(&client, session, &mut interrupt).await;
    };
    let result = result?;
    eprintln!(
        "rba: uploaded {} of {} blobs ({} bytes)",
        result.upload.uploaded, result.upload.asked, result.upload.bytes
    );
    if job.kind == JobKind::Test {
        report.print();
    }
    let code = summary(&result);
    let body = result.body();
    let outputs: Vec<_> = body
        .artifacts
        .iter()
        .map(|a| (a.path.clone(), Artifact::from_wire(a)))
        .collect();
    land_lockfile(
        path,
        &outputs,
        &cas.blobs,
        stderr_colours(color),
        |digests| {
            let (store, client) = (cas.blobs.clone(), &client);
            async move { client.fetch_missing(&store, &digests).await.map(|_| ()) }
        },
    )
    .await?;
    if let Some(target_dir) = land_in.filter(|_| body.status == WireStatus::Success as i32) {
        let artifacts: Vec<_> = body
            .artifacts
            .iter()
            .map(|a| (a.path.clone(), Artifact::from_wire(a)))
            .collect();
        let landing = land(
            target_dir,
            &artifacts,
            &cas.blobs,
            stderr_colours(color),
            |digests| {
                let store = cas.blobs.clone();
                async move { client.fetch_missing(&store, &digests).await.map(|_| ()) }
            },
        );
        // SIGINT is ours now (the handler stays for the process): Ctrl-C still stops the fetch.
        tokio::select! {
            landed = landing => {
                landed?;
            }
            _ = interrupt.recv() => {
                eprintln!("rba: interrupted while fetching the artifacts");
                return Ok(130);
            }
        }
    }
    Ok(code)
}

/// How long an interrupted `rba` waits for the node to confirm the cancel.
const CANCEL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Ctrl-C during a remote job: cancels its session (when the node accepted one) and waits, at
/// most [`CANCEL_WAIT`], for the signed end; a second Ctrl-C exits at once. Exit code 130, as
/// a shell reports a process stopped by SIGINT.
async fn cancel_interrupted(
    client: &RemoteClient,
    session: Option<String>,
    interrupt: &mut tokio::signal::unix::Signal,
) -> anyhow::Result<u8> {
    let Some(session) = session else {
        eprintln!("rba: interrupted before the node accepted the job");
        return Ok(130);
    };
    eprintln!("rba: cancelling session {session} (Ctrl-C again to quit at once)");
    let confirmed = tokio::select! {
        confirmed = tokio::time::timeout(CANCEL_WAIT, client.cancel(&session)) => confirmed,
        _ = interrupt.recv() => std::process::exit(130),
    };
    match confirmed {
        Ok(Ok(end)) => {
            report_cancelled(&session, client.node(), &end);
        }
        Ok(Err(error)) => {
            eprintln!("rba: could not cancel session {session}: {error:#}")
        }
        Err(_) => eprintln!(
            "rba: the node did not confirm cancelling session {session} within {}s",
            CANCEL_WAIT.as_secs()
        ),
    }
    Ok(130)
}

/// Prints what a `Cancel` ended in; true when the job was cancelled (it may have ended on its
/// own just before).
fn report_cancelled(session: &str, node: libp2p::PeerId, end: &rba_proto::rba::v1::End) -> bool {
    let status = end
        .body
        .as_ref()
        .and_then(|b| WireStatus::try_from(b.status).ok())
        .unwrap_or(WireStatus::Unspecified);
    if status == WireStatus::Cancelled {
        eprintln!("rba: cancelled session {session} on {node}");
        true
    } else {
        eprintln!(
            "rba: session {session} on {node} ended ({}) before the cancel reached it",
            status.as_str_name()
        );
        false
    }
}

/// `rba cancel`: cancels a session of this client identity.
async fn cancel(client_dir: &Path, session: &str, remote: &str) -> anyhow::Result<u8> {
    let client = RemoteClient::connect(client_keypair(client_dir)?, remote).await?;
    let wait = std::time::Duration::from_secs(60);
    let end = tokio::time::timeout(wait, client.cancel(session))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the node did not confirm cancelling session {session} within {}s",
                wait.as_secs()
            )
        })??;
    Ok(if report_cancelled(session, client.node(), &end) {
        0
    } else {
        1
    })
}

/// `rba verify`: [`rba_cas::BlobStore::verify`] over the local store, reported.
async fn verify(client_dir: &Path) -> anyhow::Result<u8> {
    use anyhow::Context;
    // A mistyped --data-dir must not get a new, empty store that verifies clean.
    if !cas_dir(client_dir).is_dir() {
        anyhow::bail!("no store under {} to verify", client_dir.display());
    }
    let cas = open_cas(client_dir, rba_cas::StoreConfig::default())?;
    let blobs = cas.blobs.clone();
    let report = tokio::task::spawn_blocking(move || blobs.verify())
        .await?
        .with_context(|| format!("verifying the store under {}", client_dir.display()))?;
    for digest in &report.corrupt {
        println!("removed corrupt blob {digest:?}");
    }
    for digest in &report.missing {
        println!("dropped index entry without a file {digest:?}");
    }
    println!(
        "verified {}: {} blobs intact; removed {} corrupt; dropped {} index entries without a \
         file; indexed {} files again; removed {} unfinished writes",
        cas_dir(client_dir).display(),
        report.intact,
        report.corrupt.len(),
        report.missing.len(),
        report.adopted,
        report.unfinished
    );
    Ok(u8::from(report.repaired()))
}

/// `rba get`: one blob by digest, from the node (which checks this client may read it) or
/// from the local CAS, written to `output`.
async fn get(
    client_dir: &Path,
    digest: rba_cas::Digest,
    output: &Path,
    remote: Option<&str>,
) -> anyhow::Result<u8> {
    use anyhow::Context;
    let cas = open_cas(client_dir, rba_cas::StoreConfig::default())?;
    if let Some(remote) = remote {
        let client = RemoteClient::connect(client_keypair(client_dir)?, remote).await?;
        client.fetch_missing(&cas.blobs, &[digest]).await?;
    }
    let mut reader = cas
        .blobs
        .reader(&digest, 0, 0)
        .with_context(|| format!("reading {digest:?}"))?;
    let mut file =
        std::fs::File::create(output).with_context(|| format!("creating {}", output.display()))?;
    std::io::copy(&mut reader, &mut file)
        .with_context(|| format!("writing {}", output.display()))?;
    eprintln!("rba: wrote {} ({} bytes)", output.display(), digest.size);
    Ok(0)
}

fn render(terminal: &mut Terminal, event: &SessionEvent) {
    match event {
        SessionEvent::Accepted(accepted) => {
            eprintln!("rba: session {}", accepted.session_id);
            if accepted.queue_position > 0 {
                eprintln!("rba: queued at position {}", accepted.queue_position);
            }
        }
        SessionEvent::Line(line) => terminal.line(LineStream::from_wire(line.stream), &line.line),
        SessionEvent::Progress(progress) => {
            terminal.progress(progress.units_done, progress.units_total)
        }
        SessionEvent::End(_) => {}
    }
}

fn summary(result: &rba_agent::client::SessionResult) -> u8 {
    let body = result.body();
    let status = WireStatus::try_from(body.status).unwrap_or(WireStatus::Unspecified);
    let name = match status {
        WireStatus::Success => "success",
        WireStatus::Cancelled => "cancelled",
        _ => "error",
    };
    eprintln!();
    eprintln!(
        "rba: {name} in {:.2}s{} (exit code {}, session {}{})",
        body.duration_ms as f64 / 1000.0,
        if body.cache_hit {
            ", action-cache hit"
        } else {
            ""
        },
        body.exit_code,
        result.session_id,
        if result.resumed > 0 {
            format!(", resumed {} time(s)", result.resumed)
        } else {
            String::new()
        }
    );
    for artifact in &body.artifacts {
        let digest = artifact
            .digest
            .as_ref()
            .and_then(|d| rba_cas::Digest::from_wire(d).ok())
            .map(|d| format!("{d:?}"))
            .unwrap_or_default();
        eprintln!("rba: artifact {} {digest}", artifact.path);
    }
    if let Some(log) = body
        .log_digest
        .as_ref()
        .and_then(|d| rba_cas::Digest::from_wire(d).ok())
    {
        eprintln!("rba: log {log:?} ({} lines)", body.lines);
    }
    if !body.error.is_empty() {
        eprintln!("rba: {}", body.error);
    }
    exit_code(status == WireStatus::Success, body.exit_code)
}

async fn logs(
    client_dir: &Path,
    session: &str,
    from_seq: u64,
    remote: &str,
    color: ColorChoice,
) -> anyhow::Result<u8> {
    let client = RemoteClient::connect(client_keypair(client_dir)?, remote).await?;
    let mut terminal = Terminal::for_stdio(color);
    let mut report = TestReport::default();
    let result = client
        .follow(session, from_seq, |event| {
            if let SessionEvent::Line(line) = event {
                report.line(&line.line);
            }
            render(&mut terminal, event)
        })
        .await?;
    terminal.finish();
    // The session's kind is not on the wire: a log with test results gets their report.
    if !report.binaries().is_empty() {
        report.print();
    }
    Ok(summary(&result))
}
