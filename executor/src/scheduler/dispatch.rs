//! [`Dispatch`]: how a front end's executor hands a job to the scale-out workers instead of
//! running it in one of its own slots.
//!
//! # Why inside the one job path
//!
//! Every face (REAPI Execute, libp2p sessions, HTTP, `rba build --remote`) calls
//! [`crate::runner::Executor::submit`] and gets a [`crate::runner::JobHandle`]: one job id, one
//! [`crate::logstream::LogStream`], one state channel, one cancel. A second job path for
//! scale-out would mean a second job table and a second notion of a log, which is what the
//! issue set out to remove. So dispatch is a branch of the job itself: after the action-cache
//! lookup missed (once, on the front end: [`crate::runner::Executor::with_stores`]), a front
//! end with a [`Dispatch`] does, instead of taking a local slot:
//!
//! 1. **publish the inputs** — the Action, the Command and every blob of the input tree (one
//!    index query for the whole tree; only what the shared store lacks is uploaded from this
//!    machine's local tier), so any worker can make them local;
//! 2. **enqueue** the request ([`JobQueue::enqueue`]: the queue prefers the worker that holds
//!    the (tenant, workspace) target dir). The stored request says `skip_cache_lookup`: the
//!    front end already looked, or was told not to; the flag controls the lookup alone, never
//!    the put nor the namespaces, which the worker computes from the same instance and tenant
//!    exactly as the embedded path does;
//! 3. **mirror** the job's log lines from the queue into the local log as they arrive (the
//!    job is `Running` once a worker claimed it), so every face streams them as for a local
//!    job;
//! 4. **wait** for the outcome ([`JobQueue::wait`]: a requeued job finishes elsewhere; a job
//!    no worker takes fails within the queue's bound, saying so);
//! 5. **make the outcome's blobs local** (outputs, output trees and their files, stdout,
//!    stderr, the worker's log, artifacts), so every face serves them from this machine's
//!    local tier as it serves a local job's;
//! 6. finish the local log (the outcome's log digests are this front end's own copy).
//!
//! Dropping the job (a cancelled [`crate::runner::JobHandle`]) cancels the queued job
//! ([`JobQueue::cancel`]): a queued job ends at once, a running one at its worker's next
//! heartbeat.
//!
//! The job is enqueued under its id ([`JobQueue::enqueue_named`]), so it is one job for every
//! front end: a client whose next call reaches another front end (a load balancer, a
//! reconnect) names it there, and that front end *follows* it
//! ([`crate::runner::Executor::find_job`]) with steps 3 to 6 above — the same code, minus the
//! ownership: only a reader's explicit cancel is passed on, never a follower's shutdown.
//!
//! Inputs from the queue are data: digests and the stored request, never paths; a worker
//! reads nothing of a front end but the shared store and the queue.

use rba_cas::{CasError, Digest, DigestFunction, Store};

use super::queue::{JobId, JobQueue};
use crate::logstream::{LogLine, LogStreamKind};
use crate::runner::JobOutcome;

/// A front end's connection to the workers: the shared job queue. The shared store is the
/// executor's own ([`crate::runner::Executor::stores`]), a local tier in front of it.
#[derive(Clone, Debug)]
pub struct Dispatch {
    queue: JobQueue,
}

impl Dispatch {
    /// Jobs go to the workers of `queue`.
    pub fn new(queue: JobQueue) -> Dispatch {
        Dispatch { queue }
    }

    /// The job queue.
    pub fn queue(&self) -> &JobQueue {
        &self.queue
    }
}

/// Publishes a job's inputs (the Action, the Command and every blob of the input tree) from
/// the local tier to the shared store; [`CasError::NotFound`] names one no tier holds.
pub(crate) async fn publish_inputs(
    store: &dyn Store,
    action: Digest,
    command: Digest,
    input_root: Digest,
) -> Result<(), CasError> {
    let mut digests = vec![action, command];
    digests.extend(rba_cas::tree_digests_in(store, &input_root).await?);
    store.publish_local(&digests).await
}

/// Makes every blob an outcome names readable from the local tier: the result's outputs
/// (output trees and the files in them included), stdout, stderr, the log and the artifacts.
pub(crate) async fn make_outcome_local(
    stores: &rba_cas::Stores,
    function: DigestFunction,
    outcome: &JobOutcome,
) -> Result<(), CasError> {
    let digests = outcome_blobs(stores, function, outcome).await?;
    stores.blobs().make_local(&digests).await
}

/// Every blob an outcome names (see [`make_outcome_local`]), without duplicates; what a
/// worker publishes too.
pub async fn outcome_blobs(
    stores: &rba_cas::Stores,
    function: DigestFunction,
    outcome: &JobOutcome,
) -> Result<Vec<Digest>, CasError> {
    let mut digests = Vec::new();
    if let Some(result) = &outcome.result {
        digests.extend(stores.actions().referenced_blobs(function, result).await?);
    }
    if let Some(log) = &outcome.log {
        digests.extend([log.log, log.stdout, log.stderr]);
    }
    digests.extend(outcome.artifacts.iter().map(|a| a.digest));
    let mut seen = std::collections::HashSet::new();
    digests.retain(|d| seen.insert(*d));
    Ok(digests)
}

/// Cancels the queued job when dropped while armed: the job future was dropped (its handle
/// was cancelled) before the outcome arrived.
pub(crate) struct CancelOnDrop {
    queue: JobQueue,
    job: JobId,
    armed: bool,
}

impl CancelOnDrop {
    pub(crate) fn new(queue: JobQueue, job: JobId) -> CancelOnDrop {
        CancelOnDrop {
            queue,
            job,
            armed: true,
        }
    }

    /// The job ended: nothing to cancel.
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (queue, job) = (self.queue.clone(), self.job);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                match queue.cancel(job).await {
                    Ok(_) => tracing::info!(%job, "queued job cancelled"),
                    Err(error) => tracing::warn!(%job, %error, "cancelling a queued job failed"),
                }
            });
        }
    }
}

/// Reads a job's log lines from the queue into `lines` until the job's log ends (or the
/// receiver goes away). A read error ends the mirror with a warning: the outcome, not the
/// log, is what the job waits for.
pub(crate) fn mirror_logs(queue: &JobQueue, job: JobId) -> tokio::sync::mpsc::Receiver<LogLine> {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let mut logs = queue.logs(job, 0);
    tokio::spawn(async move {
        loop {
            match logs.next().await {
                Ok(Some(line)) => {
                    if tx.send(line).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(error) => {
                    tracing::warn!(%job, %error, "reading the job's log lines from the queue failed");
                    return;
                }
            }
        }
    });
    rx
}

/// Whether a queue line marks the start of another attempt (the queue's requeue line): the
/// final attempt's step boundaries count from the line after the last one.
pub(crate) fn starts_attempt(line: &LogLine) -> bool {
    line.stream == LogStreamKind::System && line.line.contains(": job requeued after attempt ")
}
