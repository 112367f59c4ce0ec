//! `rba`: the rust-build-agent command.
//!
//! - `rba serve`: the operator node (executor workers, libp2p sessions and blob sharing, HTTP
//!   queries and WebSocket events, the REAPI server), configured by one TOML file, `RBA_*`
//!   environment variables and flags (`--token NAME:TOKEN:ACCESS`, `--public-read`,
//!   `--tls-cert`/`--tls-key`, as in `config`); prints its PeerId and listen addresses; stops
//!   cleanly on Ctrl-C or SIGTERM.
//! - `rba build|test|lint|audit|check|fmt [PATH] [--release] [--remote MULTIADDR]
//!   [--timeout SECS] [--memory SIZE] [--processes N] [--disk SIZE]`: hashes the
//!   workspace (respecting `.gitignore`, skipping `target/`), runs the job and streams cargo's
//!   own output live, then prints a summary and exits with the job's status. Without
//!   `--remote` the job runs on an embedded node in-process; with it, on the node at
//!   `MULTIADDR/p2p/PEERID`, uploading only the blobs the node lacks.
//! - `rba logs SESSION [--from-seq N] --remote MULTIADDR`: re-attaches to a session.
//! - `rba hash PATH`: stores a workspace in the local CAS and prints its root digest.
//! - After a successful `rba build`, the binaries are written into the local target dir
//!   (`--target-dir`, `CARGO_TARGET_DIR`, else `PATH/target`) unless `--no-download`.
//! - `rba get DIGEST -o FILE [--remote MULTIADDR]`: fetches one blob the caller may read.
//!
//! Errors a user can act on are printed as one line `rba: error: …` (exit code 2).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use rba_agent::artifacts::{Artifact, land, land_lockfile, target_dir};
use rba_agent::client::RemoteClient;
use rba_agent::config::{NodeArgs, default_data_dir};
use rba_agent::node::Node;
use rba_agent::output::{ColorChoice, Terminal, exit_code, stderr_colours};
use rba_agent::p2p::session::SessionEvent;
use rba_agent::workspace::{hash_workspace, open_cas, workspace_hint};
use rba_executor::cargo::{CargoJob, JobKind};
use rba_proto::rba::v1::{JobOptions, JobStatus as WireStatus, Submit};

#[derive(Parser)]
#[command(name = "rba", version, about = "Remote, cached, sandboxed cargo builds", long_about = None)]
struct Cli {
    /// Where rba keeps its CAS, caches, identity and logs.
    #[arg(long, global = true, env = "RBA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Colours in cargo's output.
    #[arg(long, global = true, value_enum, default_value_t, env = "RBA_COLOR")]
    color: ColorChoice,
    #[command(subcommand)]
    command: Commands,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Commands {
    /// Run the operator node (libp2p, HTTP, REAPI, executor).
    Serve(ServeArgs),
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
    /// Re-attach to a session on a node and stream its log from a line on.
    Logs {
        /// The session id (printed when the job was accepted).
        session: String,
        /// First line to print.
        #[arg(long, default_value_t = 0)]
        from_seq: u64,
        /// The node: MULTIADDR/p2p/PEERID.
        #[arg(long, env = "RBA_REMOTE")]
        remote: String,
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
        /// The node (MULTIADDR/p2p/PEERID); without it, the local CAS.
        #[arg(long, env = "RBA_REMOTE")]
        remote: Option<String>,
    },
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
    /// Run on this node (MULTIADDR/p2p/PEERID) instead of an embedded one.
    #[arg(long, env = "RBA_REMOTE")]
    remote: Option<String>,
    /// Concurrent jobs of the embedded node.
    #[arg(long, default_value_t = 2, env = "RBA_WORKERS")]
    workers: usize,
    /// Wall-clock limit of the job in seconds (the node's own limit still applies).
    #[arg(long, value_name = "SECS", value_parser = rba_executor::runner::parse_count)]
    timeout: Option<u64>,
    /// Memory of all the job's processes together (e.g. 2G, 512M).
    #[arg(long, value_name = "SIZE", value_parser = rba_executor::runner::parse_size)]
    memory: Option<u64>,
    /// Processes and threads of the job together.
    #[arg(long, value_name = "N", value_parser = rba_executor::runner::parse_count)]
    processes: Option<u64>,
    /// Bytes the job may add to its target dir (e.g. 5G; needs a node with `[limits] disk`).
    #[arg(long, value_name = "SIZE", value_parser = rba_executor::runner::parse_size)]
    disk: Option<u64>,
    /// Where a build's binaries are written (default: `CARGO_TARGET_DIR`, else PATH/target).
    #[arg(long, value_name = "DIR")]
    target_dir: Option<PathBuf>,
    /// Leave the local target dir alone: do not fetch the build's binaries.
    #[arg(long)]
    no_download: bool,
    /// Cargo's `--locked`: a workspace without a Cargo.lock fails instead of having one
    /// resolved on the node (and written next to Cargo.toml).
    #[arg(long)]
    locked: bool,
    /// Extra arguments passed to cargo (after `--`).
    #[arg(last = true)]
    cargo_args: Vec<String>,
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
        #[cfg(feature = "tangle")]
        Commands::Tangle { command } => {
            return rba_agent::tangle::runner::main(data_dir, command).await;
        }
        Commands::Hash { path } => {
            let cas = open_cas(&client_dir)?;
            let tree = hash_workspace(&cas, &path, false).await?;
            println!("{:?} ({} files)", tree.root, tree.stats.files);
            return Ok(0);
        }
        Commands::Get {
            digest,
            output,
            remote,
        } => return get(&client_dir, digest, &output, remote.as_deref()).await,
        Commands::Logs {
            session,
            from_seq,
            remote,
        } => return logs(&client_dir, &session, from_seq, &remote, color).await,
        Commands::Build(args) => (JobKind::Build, args),
        Commands::Test(args) => (JobKind::Test, args),
        Commands::Lint(args) => (JobKind::Clippy, args),
        Commands::Audit(args) => (JobKind::Audit, args),
        Commands::Check(args) => (JobKind::Check, args),
        Commands::Fmt(args) => (JobKind::Fmt, args),
    };
    let job = CargoJob {
        kind,
        release: args.release,
        extra_args: args
            .locked
            .then(|| "--locked".to_string())
            .into_iter()
            .chain(args.cargo_args.iter().cloned())
            .collect(),
    };
    let limits = rba_executor::runner::JobLimits {
        wall_time: args.timeout.map(std::time::Duration::from_secs),
        memory_bytes: args.memory,
        max_processes: args.processes,
        disk_bytes: args.disk,
    };
    let land_in = (kind == JobKind::Build && !args.no_download)
        .then(|| target_dir(args.target_dir.as_deref(), &args.path));
    match &args.remote {
        None => {
            rba_agent::local::run(
                &client_dir,
                job,
                limits,
                &args.path,
                args.workers,
                color,
                land_in.as_deref(),
            )
            .await
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
        config.fsync = false;
    }
    let node = Node::start(config).await?;
    println!("rba: node {}", node.peer_id());
    for address in node.dialable_addrs() {
        println!("rba: listening on {address}");
    }
    if let Some(http) = node.http_addr() {
        println!("rba: http on http://{http}");
    }
    if let Some(grpc) = node.grpc_addr() {
        let scheme = if node.shared().config.tls.is_some() {
            "grpcs"
        } else {
            "grpc"
        };
        println!("rba: reapi on {scheme}://{grpc}");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    eprintln!("rba: shutting down");
    node.shutdown().await?;
    Ok(0)
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
    let cas = open_cas(client_dir)?;
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
    let result = client
        .run(&cas.blobs, &tree.blobs, submit, |event| {
            render(&mut terminal, event)
        })
        .await?;
    terminal.finish();
    eprintln!(
        "rba: uploaded {} of {} blobs ({} bytes)",
        result.upload.uploaded, result.upload.asked, result.upload.bytes
    );
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
        land(
            target_dir,
            &artifacts,
            &cas.blobs,
            stderr_colours(color),
            |digests| {
                let store = cas.blobs.clone();
                async move { client.fetch_missing(&store, &digests).await.map(|_| ()) }
            },
        )
        .await?;
    }
    Ok(code)
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
    let cas = open_cas(client_dir)?;
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
        SessionEvent::Line(line) => terminal.line(&line.line),
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
    let result = client
        .follow(session, from_seq, |event| render(&mut terminal, event))
        .await?;
    terminal.finish();
    Ok(summary(&result))
}
