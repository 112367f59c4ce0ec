//! `rba build|test|…` without `--remote`: an embedded node in-process (the CAS and the
//! sandboxed executor under the data directory), so a fresh machine needs no service started
//! by hand.
//!
//! Why a module: the embedded mode is the default and must keep working on its own, without
//! libp2p or HTTP; it takes the same `Executor::submit_cargo` path as everything else.
//!
//! Ctrl-C while the job runs cancels it through `JobHandle::cancel` (the executor kills the
//! sandbox, as for a remote `Cancel`), waits for its end and exits 130; a second Ctrl-C exits
//! 130 at once. A test job's results are reported by `test_report` from the lines printed.

use std::path::Path;

use anyhow::Context;
use rba_executor::cargo::{CargoJob, JobKind};
use rba_executor::runner::{Executor, JobLimits, JobState, JobStatus};
use tokio::signal::unix::{SignalKind, signal};

use crate::artifacts::Artifact;
use crate::config::NodeConfig;
use crate::history::status_name;
use crate::output::{ColorChoice, LineStream, Terminal, exit_code, stderr_colours};
use crate::test_report::TestReport;
use crate::workspace::{hash_workspace, open_cas, workspace_identity};

/// The embedded node's configuration: the node schema (`[workers]`: slots, sandbox, limits,
/// toolchains; `[store]`: capacity, durability) from the file `RBA_CONFIG` names, else the
/// defaults, then the `RBA_*` environment; its data under `data_dir` (the client's), whatever
/// the file says, and `slots` (`--workers`) over all of it. Only the executor and the local
/// store are configured by it: the embedded node serves no face and shares no state.
pub fn embedded_config(data_dir: &Path, slots: Option<usize>) -> anyhow::Result<NodeConfig> {
    let mut config = match std::env::var_os("RBA_CONFIG") {
        Some(file) => NodeConfig::from_file(Path::new(&file))?,
        None => NodeConfig::default(),
    };
    config.apply_env()?;
    config.data_dir = data_dir.to_path_buf();
    match slots {
        Some(0) => anyhow::bail!("--workers must be at least 1"),
        Some(slots) => config.workers.slots = slots,
        // Named where it came from: the flag was not given.
        None => anyhow::ensure!(
            config.workers.slots > 0,
            "[workers] slots (from RBA_CONFIG's file or RBA_WORKERS) must be at least 1"
        ),
    }
    if config.workers.advisory_db.is_none() {
        // `rba audit` embedded checks against the user's own cargo-audit database, if any.
        config.workers.advisory_db = std::env::var_os("CARGO_HOME")
            .map(std::path::PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
            .map(|home| home.join("advisory-db"))
            .filter(|db| db.is_dir());
    }
    Ok(config)
}

/// Runs `job` on the workspace at `path` in-process, configured by `config`
/// ([`embedded_config`]); returns the process exit code. With `land_in`, a successful job's
/// artifacts are written into that target dir.
pub async fn run(
    config: &NodeConfig,
    job: CargoJob,
    limits: JobLimits,
    path: &Path,
    color: ColorChoice,
    land_in: Option<&Path>,
) -> anyhow::Result<u8> {
    let data_dir = &config.data_dir;
    let cas = open_cas(data_dir, config.store.local())?;
    let store = cas.blobs.clone();
    let tree = hash_workspace(&cas, path, true).await?;
    let executor_config = crate::compose::executor_config(config, &data_dir.join("executor"))?;
    let executor = Executor::new(cas, executor_config).context("starting the embedded executor")?;
    let handle = executor
        .submit_cargo_with_limits(
            &job,
            tree.root,
            &workspace_identity(path),
            rba_executor::tenant::Tenant::local(),
            limits,
        )
        .await?;
    eprintln!(
        "rba: {} {} ({} files, root {:?}) on the embedded node",
        job.kind.name(),
        path.display(),
        tree.stats.files,
        tree.root
    );

    let terminal = std::sync::Arc::new(parking_lot::Mutex::new(Terminal::for_stdio(color)));
    let mut state = handle.watch();
    let bar = terminal.clone();
    let progress = tokio::spawn(async move {
        while state.changed().await.is_ok() {
            let current = state.borrow().clone();
            if let JobState::Running { done, total } = current {
                bar.lock().progress(done, total);
            }
        }
    });
    let mut reader = handle.log.subscribe(0);
    let mut report = TestReport::default();
    let mut interrupt = signal(SignalKind::interrupt()).context("handling Ctrl-C")?;
    let mut interrupted = false;
    loop {
        tokio::select! {
            line = reader.next() => match line {
                Some(line) => {
                    report.line(&line.line);
                    terminal
                        .lock()
                        .line(LineStream::from_kind(line.stream), &line.line);
                }
                None => break,
            },
            _ = interrupt.recv() => {
                if interrupted {
                    std::process::exit(130);
                }
                interrupted = true;
                terminal.lock().finish();
                eprintln!("rba: cancelling job {} (Ctrl-C again to quit at once)", handle.id);
                handle.cancel();
            }
        }
    }
    let outcome = handle.wait().await;
    progress.abort();
    terminal.lock().finish();
    if interrupted {
        eprintln!(
            "rba: cancelled job {} on the embedded node ({})",
            handle.id,
            status_name(outcome.status)
        );
        return Ok(130);
    }
    eprintln!();
    if job.kind == JobKind::Test {
        report.print();
    }
    eprintln!(
        "rba: {} in {:.2}s{} (exit code {})",
        status_name(outcome.status),
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
    let outputs: Vec<_> = outcome
        .artifacts
        .iter()
        .map(|a| (a.path.clone(), Some(Artifact::from(a))))
        .collect();
    crate::artifacts::land_lockfile(path, &outputs, &store, stderr_colours(color), |_| async {
        Ok::<(), anyhow::Error>(())
    })
    .await?;
    if let Some(target_dir) = land_in.filter(|_| outcome.status == JobStatus::Success) {
        let artifacts: Vec<_> = outcome
            .artifacts
            .iter()
            .map(|a| (a.path.clone(), Some(Artifact::from(a))))
            .collect();
        // The embedded node's CAS is this process's: nothing to fetch.
        crate::artifacts::land(
            target_dir,
            &artifacts,
            &store,
            stderr_colours(color),
            |_| async { Ok::<(), anyhow::Error>(()) },
        )
        .await?;
    }
    Ok(exit_code(
        outcome.status == JobStatus::Success,
        outcome.exit_code,
    ))
}
