//! [`Worker`]: the loop of an `rba worker` process — claims jobs from the [`JobQueue`], runs
//! each through the one job path ([`Executor::submit`]), streams its log lines to the queue
//! while it runs, renews its lease, and records its outcome.
//!
//! Why a loop of its own: the executor runs jobs in process and knows nothing of leases; the
//! queue knows leases and nothing of sandboxes. The worker is the only place where the two
//! meet, so the rules of a leased job live here:
//!
//! - **Heartbeats** every [`QueueConfig::heartbeat_secs`] while the job runs *and* while its
//!   outcome is being recorded (a database outage at the end of a job must not cost the
//!   lease).
//! - **A cancelled job** (a heartbeat says so) is stopped and completed with its cancelled
//!   outcome.
//! - **A lost lease cancels the local job** (its sandbox is killed) and nothing more is written:
//!   another worker owns the job now.
//! - **Draining** ([`Worker::run`]'s signal): no new claim; running jobs get the drain grace to
//!   finish, then are cancelled and released (queued again at once, not counted as an attempt).
//! - **A job that cannot start** (its Action is missing or malformed) ends with an `Error`
//!   outcome naming why; the worker keeps serving. A job whose stored request cannot be read is
//!   failed by [`JobQueue::claim`] itself.
//! - **Slots** ([`Worker::with_slots`]) are the executor's: a slot is taken for the claim and
//!   given back when the job's run has ended, *before* its log is flushed and its outcome
//!   recorded, so a busy worker's next claim and sandbox start overlap those round trips
//!   instead of following them (`benches/worker_scaling.rs` measures the gap). A job being
//!   recorded still counts as running for draining.
//! - **Outages** of the database are retried with backoff for
//!   [`QueueConfig::database_retry_secs`]; log lines are kept and re-sent, never dropped.
//!
//! ## The store seam
//!
//! The job's Action, Command and input root must be readable from the executor's [`Cas`]
//! before [`Executor::submit`], and its outputs and logs must reach the shared store after.
//! Making that so is [`Staging`]'s business, called once each per job:
//! [`Staging::before_run`] right before submit and [`Staging::after_run`] right after the
//! outcome, before it is recorded (not for a job that could not start). The default
//! ([`SharedCas`]) does nothing: the executor's `Cas` is the shared store itself.
//! [`TieredStaging`] is the seam of an `rba worker` whose executor's `Cas` is the local (fast)
//! tier of the shared store ([`rba_cas::layers::tiered::Tiered`]): it fetches the inputs into
//! the local tier before the run and publishes every blob the outcome names after it.
//!
//! The worker's executor looks results up in and stores them into the shared action cache
//! ([`Executor::with_stores`]), with the namespaces ([`crate::runner::result_namespace`])
//! computed from the stored request's instance and tenant exactly as the embedded path does;
//! its result becomes a hit for the front ends only once [`Staging::after_run`] published its
//! blobs (the completeness layer over the shared store decides), so a worker that dies
//! between the two leaves a miss, never a hit whose outputs are gone.
//!
//! [`Cas`]: rba_cas::Cas
//! [`QueueConfig::heartbeat_secs`]: super::QueueConfig::heartbeat_secs
//! [`QueueConfig::database_retry_secs`]: super::QueueConfig::database_retry_secs

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;

use rba_cas::merkle::TreeLimits;
use rba_cas::{CasError, Digest, Stores, make_tree_local};
use rba_proto::Message;
use rba_proto::reapi::Action;

use super::dispatch::outcome_blobs;
use super::queue::{ClaimedJob, JobQueue, Lease, QueueError};
use super::stored::error_outcome;
use crate::logstream::{LogLine, LogStream};
use crate::runner::{ExecuteRequest, Executor, ExecutorError, JobHandle, JobOutcome};

/// Lines sent to the queue in one batch, at most.
const BATCH_LINES: usize = 500;
/// Bytes of line text sent in one batch, at most (a longer single line is sent alone).
const BATCH_BYTES: usize = 1 << 20;
/// How long a batch waits for more lines once it has one.
const BATCH_LINGER: Duration = Duration::from_millis(50);
/// Longest pause between retries of an unreachable database.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long a cancelled job may take to stop before it is released anyway.
const CANCEL_WAIT: Duration = Duration::from_secs(5);

/// Makes a job's inputs readable by the executor and its outputs reachable by the front ends:
/// see the module doc's "store seam". Both calls may fail with a reason, which becomes the
/// job's `Error` outcome.
pub trait Staging: Send + Sync + 'static {
    /// Called right before [`Executor::submit`]: the Action, its Command and its input root
    /// must then be in the executor's `Cas`.
    fn before_run<'a>(&'a self, request: &'a ExecuteRequest) -> BoxFuture<'a, Result<(), String>>;

    /// Called right after the job's outcome is known, before it is recorded: the blobs it
    /// names (outputs, stdout, stderr, log) must then be where the front ends read.
    fn after_run<'a>(
        &'a self,
        request: &'a ExecuteRequest,
        outcome: &'a JobOutcome,
    ) -> BoxFuture<'a, Result<(), String>>;
}

/// The [`Staging`] of a worker whose executor's `Cas` is the shared store: nothing to do.
#[derive(Clone, Copy, Debug, Default)]
pub struct SharedCas;

impl Staging for SharedCas {
    fn before_run<'a>(&'a self, _: &'a ExecuteRequest) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    fn after_run<'a>(
        &'a self,
        _: &'a ExecuteRequest,
        _: &'a JobOutcome,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}

/// The [`Staging`] of a worker whose executor's `Cas` is the local tier of a shared store
/// (`stores.blobs()`, e.g. [`rba_cas::layers::tiered::Tiered`]): see the module doc.
#[derive(Clone, Debug)]
pub struct TieredStaging {
    stores: Stores,
    limits: TreeLimits,
}

/// Largest Action blob a worker reads.
const MAX_ACTION_BYTES: u64 = 1 << 20;

impl TieredStaging {
    /// Staging through `stores` (the worker executor's [`Executor::stores`]); an input tree
    /// fetched is bounded by `limits` (the executor's [`crate::runner::ExecutorConfig::tree_limits`]).
    pub fn new(stores: Stores, limits: TreeLimits) -> TieredStaging {
        TieredStaging { stores, limits }
    }

    async fn stage_inputs(&self, action_digest: Digest) -> Result<(), CasError> {
        let store = self.stores.blobs().as_ref();
        let function = action_digest.function;
        store.make_local(&[action_digest]).await?;
        let bytes = store.read_to_vec(&action_digest, MAX_ACTION_BYTES).await?;
        let action = Action::decode(bytes.as_slice()).map_err(|e| CasError::Invalid {
            what: format!("Action {action_digest:?}"),
            reason: e.to_string(),
        })?;
        let field = |digest, name| {
            Digest::from_reapi_field(function, digest, name).map_err(|e| CasError::Invalid {
                what: format!("Action {action_digest:?}"),
                reason: e.to_string(),
            })
        };
        let command = field(action.command_digest.as_ref(), "Action.command_digest")?;
        let root = field(
            action.input_root_digest.as_ref(),
            "Action.input_root_digest",
        )?;
        store.make_local(&[command]).await?;
        make_tree_local(store, &root, &self.limits).await?;
        Ok(())
    }
}

impl Staging for TieredStaging {
    fn before_run<'a>(&'a self, request: &'a ExecuteRequest) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.stage_inputs(request.action_digest)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn after_run<'a>(
        &'a self,
        request: &'a ExecuteRequest,
        outcome: &'a JobOutcome,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let function = request.action_digest.function;
            let blobs = outcome_blobs(&self.stores, function, outcome)
                .await
                .map_err(|e| e.to_string())?;
            self.stores
                .blobs()
                .publish_local(&blobs)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// This process's worker id: `hostname-pid-random`, stable for the process's life (and
/// different for the next process on the same host, so a restarted worker never inherits the
/// leases of the one it replaces).
pub fn process_worker_id() -> String {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_string());
        let random = uuid::Uuid::new_v4().simple().to_string();
        format!("{host}-{}-{}", std::process::id(), &random[..8])
    })
    .clone()
}

/// What a worker did before it stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerReport {
    /// Jobs whose outcome this worker recorded.
    pub completed: u64,
    /// Jobs given back to the queue on drain.
    pub released: u64,
    /// Jobs whose lease this worker lost (another worker owns them now).
    pub lost: u64,
}

/// How one job ended for this worker.
enum JobEnd {
    Completed,
    Released,
    Lost,
    /// The database stayed unreachable; the lease will expire and the job be requeued.
    Abandoned,
}

/// A worker: a [`JobQueue`], an [`Executor`] and how many jobs to run at once.
#[derive(Clone)]
pub struct Worker {
    id: String,
    queue: JobQueue,
    executor: Executor,
    slots: usize,
    drain_grace: Duration,
    staging: Arc<dyn Staging>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.id)
            .field("slots", &self.slots)
            .finish()
    }
}

impl Worker {
    /// A worker with this process's id ([`process_worker_id`]), one job at a time, a 30 s
    /// drain grace and the [`SharedCas`] staging.
    pub fn new(queue: JobQueue, executor: Executor) -> Worker {
        Worker {
            id: process_worker_id(),
            queue,
            executor,
            slots: 1,
            drain_grace: Duration::from_secs(30),
            staging: Arc::new(SharedCas),
        }
    }

    /// Another id (tests run several workers in one process).
    pub fn with_id(mut self, id: impl Into<String>) -> Worker {
        self.id = id.into();
        self
    }

    /// Jobs claimed and run at once (at least 1); match the executor's own
    /// [`crate::runner::ExecutorConfig::workers`].
    pub fn with_slots(mut self, slots: usize) -> Worker {
        self.slots = slots.max(1);
        self
    }

    /// How long running jobs may take to finish once draining starts, before they are
    /// released.
    pub fn with_drain_grace(mut self, grace: Duration) -> Worker {
        self.drain_grace = grace;
        self
    }

    /// The store seam ([`Staging`]).
    pub fn with_staging(mut self, staging: Arc<dyn Staging>) -> Worker {
        self.staging = staging;
        self
    }

    /// The worker's id, as the queue records it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Claims and runs jobs until `drain` becomes true (a dropped sender never drains), then
    /// lets the running jobs finish within the drain grace, releases those that do not, and
    /// returns. Reaps the queue when due.
    pub async fn run(self, drain: watch::Receiver<bool>) -> WorkerReport {
        let slots = Arc::new(Semaphore::new(self.slots));
        let mut jobs = JoinSet::new();
        let mut report = WorkerReport::default();
        let mut backoff = self.queue.config().poll_interval();
        tracing::info!(worker = %self.id, slots = self.slots, "worker started");
        loop {
            while let Some(end) = jobs.try_join_next() {
                tally(&mut report, end);
            }
            if *drain.borrow() {
                break;
            }
            let permit = tokio::select! {
                permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                _ = raised(drain.clone()) => break,
                Some(end) = jobs.join_next(), if !jobs.is_empty() => {
                    tally(&mut report, end);
                    continue;
                }
            };
            self.queue.reap_if_due().await;
            let work_signal = self.queue.work_signal();
            match self.queue.claim(&self.id).await {
                Ok(Some(job)) => {
                    backoff = self.queue.config().poll_interval();
                    tracing::info!(worker = %self.id, job = %job.id, attempt = job.attempt, "claimed a job");
                    let worker = self.clone();
                    let drain = drain.clone();
                    jobs.spawn(async move { worker.run_job(job, drain, permit).await });
                }
                Ok(None) => {
                    drop(permit);
                    tokio::select! {
                        _ = work_signal => {}
                        _ = raised(drain.clone()) => {}
                    }
                }
                Err(error) => {
                    drop(permit);
                    tracing::warn!(worker = %self.id, %error, "claiming a job failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = raised(drain.clone()) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        tracing::info!(worker = %self.id, running = jobs.len(), "worker draining");
        while let Some(end) = jobs.join_next().await {
            tally(&mut report, end);
        }
        tracing::info!(worker = %self.id, ?report, "worker stopped");
        report
    }

    /// One claimed job, from submit to its recorded outcome (or its loss or release). `slot`
    /// is given back as soon as the run has ended (see the module doc's "Slots").
    async fn run_job(
        &self,
        job: ClaimedJob,
        drain: watch::Receiver<bool>,
        slot: OwnedSemaphorePermit,
    ) -> JobEnd {
        // The store seam, part 1: inputs readable by the executor. Then the one job path.
        let started = self
            .under_lease(&job, async {
                self.staging.before_run(&job.request).await?;
                Ok::<_, String>(self.executor.submit(job.request.clone()).await)
            })
            .await;
        let submitted = match started {
            Err(end) => return end,
            Ok(Err(reason)) => {
                let outcome = error_outcome(format!(
                    "job {}: its inputs could not be made available to worker {}: {reason}",
                    job.id, self.id
                ));
                return self.finish(&job, Arc::new(outcome), None).await;
            }
            Ok(Ok(submitted)) => submitted,
        };
        let handle = match submitted {
            Ok(handle) => handle,
            Err(ExecutorError::Draining) => return self.release(&job, None).await,
            Err(error) => {
                let outcome = error_outcome(format!("job {}: {error}", job.id));
                return self.finish(&job, Arc::new(outcome), None).await;
            }
        };
        let (lost_tx, lost_rx) = watch::channel(false);
        let pump = tokio::spawn(pump_logs(
            self.queue.clone(),
            job.clone(),
            handle.log.clone(),
            lost_tx,
        ));
        let mut heartbeat = self.heartbeat_timer();
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        let mut cancelling = false;
        let outcome = loop {
            tokio::select! {
                outcome = handle.wait() => break outcome,
                _ = heartbeat.tick() => match self.queue.heartbeat(&job).await {
                    Err(QueueError::LeaseLost { .. }) => {
                        return self.lose(&job, &handle, pump).await;
                    }
                    Ok(Lease::CancelRequested) if !cancelling => {
                        tracing::info!(worker = %self.id, job = %job.id, "job cancelled");
                        cancelling = true;
                        handle.cancel();
                    }
                    _ => {}
                },
                _ = raised(lost_rx.clone()) => return self.lose(&job, &handle, pump).await,
                _ = raised(drain.clone()), if drain_deadline.is_none() => {
                    drain_deadline = Some(tokio::time::Instant::now() + self.drain_grace);
                }
                _ = sleep_until(drain_deadline), if drain_deadline.is_some() => {
                    return self.release(&job, Some((&handle, pump))).await;
                }
            }
        };
        // The executor's slot is free again: the next claim overlaps the recording.
        drop(slot);
        self.finish(&job, outcome, Some((&handle, pump))).await
    }

    /// Runs `work` while renewing the lease on `job` (staging, submitting, recording: anything
    /// that may outlast a lease); `Err(JobEnd::Lost)` as soon as the lease is gone (`work` is
    /// dropped).
    async fn under_lease<T>(
        &self,
        job: &ClaimedJob,
        work: impl std::future::Future<Output = T>,
    ) -> Result<T, JobEnd> {
        tokio::pin!(work);
        let mut heartbeat = self.heartbeat_timer();
        loop {
            tokio::select! {
                done = &mut work => return Ok(done),
                _ = heartbeat.tick() => {
                    if let Err(QueueError::LeaseLost { .. }) = self.queue.heartbeat(job).await {
                        return Err(JobEnd::Lost);
                    }
                }
            }
        }
    }

    fn heartbeat_timer(&self) -> tokio::time::Interval {
        let period = self.queue.config().heartbeat();
        let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        timer
    }

    /// Records an outcome: waits for the log pump to send every line, lets the store seam
    /// publish the outputs, then completes the job, retrying an unreachable database, and
    /// heartbeating all along.
    async fn finish(
        &self,
        job: &ClaimedJob,
        outcome: Arc<JobOutcome>,
        running: Option<(&JobHandle, tokio::task::JoinHandle<Result<(), QueueError>>)>,
    ) -> JobEnd {
        let (handle, pump) = match running {
            Some((handle, pump)) => (Some(handle), Some(pump)),
            None => (None, None),
        };
        let work = async {
            if let Some(pump) = pump {
                match pump.await {
                    Ok(Err(QueueError::LeaseLost { .. })) => return Err(JobEnd::Lost),
                    Ok(Err(error)) => {
                        // The outcome matters more than the log: record it anyway.
                        tracing::warn!(job = %job.id, %error, "some log lines of the job could not be stored");
                    }
                    _ => {}
                }
            }
            // The store seam, part 2: outputs where the front ends read them (only for a job
            // that ran: one that could not start has none).
            let published = match handle {
                Some(_) => self.staging.after_run(&job.request, &outcome).await,
                None => Ok(()),
            };
            let outcome = match published {
                Ok(()) => outcome,
                Err(reason) => Arc::new(error_outcome(format!(
                    "job {}: its outputs could not be published by worker {}: {reason}",
                    job.id, self.id
                ))),
            };
            let mut backoff = self.queue.config().poll_interval();
            let started = Instant::now();
            loop {
                match self.queue.complete(job, &outcome).await {
                    Ok(()) => return Ok(()),
                    Err(QueueError::LeaseLost { .. }) => return Err(JobEnd::Lost),
                    Err(error)
                        if error.is_transient() && started.elapsed() < self.database_retry() =>
                    {
                        tracing::warn!(job = %job.id, %error, "recording an outcome failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                    Err(error) => {
                        tracing::error!(job = %job.id, %error, "cannot record the outcome; the job will be requeued when its lease expires");
                        return Err(JobEnd::Abandoned);
                    }
                }
            }
        };
        let end = match self.under_lease(job, work).await {
            Ok(Ok(())) => JobEnd::Completed,
            Ok(Err(end)) | Err(end) => end,
        };
        if let Some(handle) = handle {
            self.executor.forget_job(&handle.id);
        }
        match end {
            JobEnd::Completed => tracing::info!(worker = %self.id, job = %job.id, "job done"),
            JobEnd::Lost => {
                tracing::warn!(worker = %self.id, job = %job.id, "lost the lease before recording the outcome")
            }
            _ => {}
        }
        end
    }

    /// The lease is gone: the local job is cancelled, nothing more is written.
    async fn lose(
        &self,
        job: &ClaimedJob,
        handle: &JobHandle,
        pump: tokio::task::JoinHandle<Result<(), QueueError>>,
    ) -> JobEnd {
        tracing::warn!(worker = %self.id, job = %job.id, "lost the lease; cancelling the local run");
        pump.abort();
        handle.cancel();
        let _ = tokio::time::timeout(CANCEL_WAIT, handle.wait()).await;
        self.executor.forget_job(&handle.id);
        JobEnd::Lost
    }

    /// Gives the job back to the queue (draining): the local run is cancelled first.
    async fn release(
        &self,
        job: &ClaimedJob,
        running: Option<(&JobHandle, tokio::task::JoinHandle<Result<(), QueueError>>)>,
    ) -> JobEnd {
        if let Some((handle, pump)) = running {
            handle.cancel();
            let _ = tokio::time::timeout(CANCEL_WAIT, handle.wait()).await;
            pump.abort();
            self.executor.forget_job(&handle.id);
        }
        let mut backoff = self.queue.config().poll_interval();
        for _ in 0..5 {
            match self.queue.release(job).await {
                Ok(()) => {
                    tracing::info!(worker = %self.id, job = %job.id, "released a job on drain");
                    return JobEnd::Released;
                }
                Err(QueueError::LeaseLost { .. }) => return JobEnd::Lost,
                Err(error) => {
                    tracing::warn!(job = %job.id, %error, "releasing a job failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        // The lease expires and the reaper requeues it.
        JobEnd::Abandoned
    }

    fn database_retry(&self) -> Duration {
        Duration::from_secs(self.queue.config().database_retry_secs)
    }
}

fn tally(report: &mut WorkerReport, end: Result<JobEnd, tokio::task::JoinError>) {
    match end {
        Ok(JobEnd::Completed) => report.completed += 1,
        Ok(JobEnd::Released) => report.released += 1,
        Ok(JobEnd::Lost) => report.lost += 1,
        Ok(JobEnd::Abandoned) => {}
        Err(error) => tracing::error!(%error, "a job task of the worker failed"),
    }
}

/// Resolves once `flag` is true (the drain signal, a lost lease); never when its sender is
/// gone without raising it.
async fn raised(mut flag: watch::Receiver<bool>) {
    if flag.wait_for(|raised| *raised).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Sends a running job's log lines to the queue in batches, in order, until the local log
/// ends. A batch the database refuses for a while is retried (lines are never dropped); a
/// lost lease is reported on `lost` and ends the pump.
async fn pump_logs(
    queue: JobQueue,
    job: ClaimedJob,
    log: LogStream,
    lost: watch::Sender<bool>,
) -> Result<(), QueueError> {
    let mut reader = log.subscribe(0);
    loop {
        let Some(first) = reader.next().await else {
            return Ok(());
        };
        let mut bytes = first.line.len();
        let mut batch: Vec<LogLine> = vec![first];
        let linger = tokio::time::Instant::now() + BATCH_LINGER;
        while batch.len() < BATCH_LINES && bytes < BATCH_BYTES {
            match tokio::time::timeout_at(linger, reader.next()).await {
                Ok(Some(line)) => {
                    bytes += line.line.len();
                    batch.push(line);
                }
                _ => break,
            }
        }
        let mut backoff = queue.config().poll_interval();
        let started = Instant::now();
        loop {
            match queue.append_logs(&job, &batch).await {
                Ok(()) => break,
                Err(error @ QueueError::LeaseLost { .. }) => {
                    let _ = lost.send(true);
                    return Err(error);
                }
                Err(error)
                    if error.is_transient()
                        && started.elapsed()
                            < Duration::from_secs(queue.config().database_retry_secs) =>
                {
                    tracing::debug!(job = %job.id, %error, "sending log lines failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(error) => return Err(error),
            }
        }
    }
}
