//! [`JobQueue`]: the jobs of a scale-out deployment, in PostgreSQL, shared by every front end
//! and every worker.
//!
//! # Why PostgreSQL, and how a job moves
//!
//! The queue must survive any process dying — a front end, a worker, the database itself
//! restarting — without losing a job, running one twice to two recorded results, or leaving a
//! waiter hanging. PostgreSQL gives the one thing that makes this simple: single statements
//! that atomically check and change a row under its lock. Every transition below is one
//! statement, so there is no window between "check" and "change" and no client-side
//! transaction to abandon halfway.
//!
//! ```text
//!  enqueue ─► queued ──claim (FOR UPDATE SKIP LOCKED)──► running ──complete──► done (outcome)
//!               ▲  │                                     │ │ │
//!               │  └─ deadline passed (reap) ─► failed   │ │ └─ corrupt request ─► failed
//!               │                                        │ └─ release (worker drains)─► queued
//!               └──── lease expired, attempts left (reap)┘
//!                     lease expired, no attempts left (reap) ─► failed (names the lost workers)
//! ```
//!
//! - **Leases.** A claim gives the worker a lease token (a fresh number from a sequence) and a
//!   `lease_until` in the database's clock (no worker's clock matters). Heartbeat, log
//!   appends, complete and release all require the token and `state = 'running'`: a worker
//!   whose job was requeued (its lease expired and someone reaped it) can no longer write
//!   anything to that job, so the worker that took over records the one outcome. A worker
//!   whose lease expired but that nobody reaped yet is still the holder: its heartbeat or
//!   result is accepted, nothing was lost.
//! - **Reaping** ([`JobQueue::reap`]) is what turns expired leases and deadlines into state
//!   changes. Every worker and every waiting front end runs it (at most every
//!   [`QueueConfig::reap_interval_secs`] per process); it is idempotent and safe to run
//!   concurrently (each statement locks the rows it changes, `SKIP LOCKED`, and re-checks the
//!   condition under the lock).
//! - **Logs.** A running job's lines go to `rba_job_logs` (job, seq, stream, line) in batches;
//!   the sequence numbers are given out by the job's row (`log_lines`), so they are dense for
//!   the whole job, across attempts: a requeue appends a `system` line saying which worker was
//!   lost, and the next attempt's lines follow it. A reader ([`JobQueue::logs`]) reads from any
//!   line on, live.
//! - **Waking up.** Log appends and state changes `NOTIFY rba_job, '<id>'`; new work
//!   `NOTIFY rba_queue`. One `LISTEN` connection per [`JobQueue`] wakes the local waiters. A
//!   lost notification (the listening connection dropped, the database restarted) costs at
//!   most [`QueueConfig::poll_interval_ms`]: every waiter also polls.
//! - **Cancelling** ([`JobQueue::cancel`]) ends a queued job at once; a running job is marked
//!   and its worker learns it at its next heartbeat, stops the run and records the cancelled
//!   outcome.
//! - **Preference.** A job can name the worker it prefers ([`JobQueue::enqueue`]); without one
//!   a job with a workspace identity prefers the worker that last completed a job of the same
//!   (tenant, workspace identity): the worker that holds its target dir. A preferred job goes
//!   to that worker first, and to any worker once it has been queued for
//!   [`QueueConfig::prefer_grace_secs`] — at once if that worker was not seen within a lease.
//! - **Text.** Instance names and tenants are client-influenced text that may hold anything,
//!   NUL bytes included (which PostgreSQL's `text` refuses): they are stored as `bytea`, and
//!   every value is a bound parameter, never part of a statement's text.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use deadpool_postgres::Pool;
use parking_lot::Mutex;
use rba_cas::backends::postgres::Postgres;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_postgres::error::SqlState;

use super::stored;
use crate::logstream::{LogLine, LogStreamKind};
use crate::runner::{ExecuteRequest, JobOutcome, JobStatus};

/// The component name of the queue's tables in the schema-version table.
pub const SCHEMA_COMPONENT: &str = "scheduler";

/// The queue's migrations, in order: version `i + 1` is `MIGRATIONS[i]`.
pub const MIGRATIONS: &[&str] = &[
    r#"
CREATE SEQUENCE rba_job_leases;
CREATE TABLE rba_jobs (
    id               BIGSERIAL PRIMARY KEY,
    instance         BYTEA NOT NULL,
    tenant           BYTEA NOT NULL,
    affinity         BYTEA,
    request          BYTEA NOT NULL,
    state            TEXT NOT NULL DEFAULT 'queued'
                     CHECK (state IN ('queued', 'running', 'done', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL CHECK (max_attempts >= 1),
    worker           TEXT,
    lease            BIGINT,
    lease_until      TIMESTAMPTZ,
    lost_workers     TEXT[] NOT NULL DEFAULT '{}',
    preferred_worker TEXT,
    enqueued_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    queued_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    deadline         TIMESTAMPTZ NOT NULL,
    started_at       TIMESTAMPTZ,
    finished_at      TIMESTAMPTZ,
    log_lines        BIGINT NOT NULL DEFAULT 0,
    cancel_requested BOOLEAN NOT NULL DEFAULT false,
    outcome          BYTEA,
    action_result    BYTEA,
    error            TEXT
);
CREATE INDEX rba_jobs_queued ON rba_jobs (queued_at, id) WHERE state = 'queued';
CREATE INDEX rba_jobs_running ON rba_jobs (lease_until) WHERE state = 'running';
CREATE INDEX rba_jobs_finished ON rba_jobs (finished_at) WHERE state IN ('done', 'failed');
CREATE INDEX rba_jobs_affinity ON rba_jobs (affinity, finished_at)
    WHERE state = 'done' AND affinity IS NOT NULL;
CREATE TABLE rba_job_logs (
    job    BIGINT NOT NULL REFERENCES rba_jobs (id) ON DELETE CASCADE,
    seq    BIGINT NOT NULL,
    stream SMALLINT NOT NULL,
    line   BYTEA NOT NULL,
    PRIMARY KEY (job, seq)
);
CREATE TABLE rba_workers (
    id         TEXT PRIMARY KEY,
    first_seen TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen  TIMESTAMPTZ NOT NULL DEFAULT now()
);
"#,
    // A worker's own preferred jobs, found without reading the rest of the queue (see
    // `JobQueue::claim`).
    r#"
CREATE INDEX rba_jobs_preferred ON rba_jobs (preferred_worker, queued_at, id)
    WHERE state = 'queued' AND preferred_worker IS NOT NULL;
"#,
    // The front end's name of a job (its operation or session id), by which any front end
    // finds it (see `JobQueue::named`).
    r#"
ALTER TABLE rba_jobs ADD COLUMN name BYTEA;
CREATE UNIQUE INDEX rba_jobs_name ON rba_jobs (name) WHERE name IS NOT NULL;
"#,
];

/// Jobs waiting and running in the shared queue ([`JobQueue::depth`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueDepth {
    /// Waiting for a worker.
    pub queued: u64,
    /// Claimed by a worker.
    pub running: u64,
}

/// The channel of a job's events (payload: the job id): log lines, state changes.
const JOB_CHANNEL: &str = "rba_job";
/// The channel of new work (a job queued or requeued).
const QUEUE_CHANNEL: &str = "rba_queue";
/// Log lines read per query by a reader.
const READ_BATCH: i64 = 1000;
/// Workers named in a deadline error, at most.
const WORKERS_NAMED: i64 = 10;

/// How the queue times things. Every field has a default (`#[serde(default)]`), so this can be
/// the `[scheduler]` section of a config file as it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// How long a claim or heartbeat holds a job: a worker silent for longer loses it (it is
    /// requeued at the next reap).
    pub lease_secs: u64,
    /// How often a worker renews its leases; less than half the lease.
    pub heartbeat_secs: u64,
    /// How long a job waits for the worker it prefers before any worker may take it.
    pub prefer_grace_secs: u64,
    /// How long a job may stay queued (since it was queued or requeued) before it fails with
    /// "no worker took job N within S seconds": no job waits forever for a worker.
    pub queue_timeout_secs: u64,
    /// Claims of one job, at most: a job whose workers keep dying fails after that many.
    pub max_attempts: u32,
    /// How often waiters and idle workers look at the database when no notification came.
    pub poll_interval_ms: u64,
    /// How often one process reaps (see [`JobQueue::reap`]), at most.
    pub reap_interval_secs: u64,
    /// How long finished jobs (their outcome and log lines) are kept; their results stay in
    /// the CAS and the action cache.
    pub retention_secs: u64,
    /// How long waiters and workers keep retrying an unreachable database before they give
    /// up with the error.
    pub database_retry_secs: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            lease_secs: 30,
            heartbeat_secs: 10,
            prefer_grace_secs: 5,
            queue_timeout_secs: 600,
            max_attempts: 3,
            poll_interval_ms: 1000,
            reap_interval_secs: 5,
            retention_secs: 24 * 3600,
            database_retry_secs: 120,
        }
    }
}

impl QueueConfig {
    /// Refuses settings that cannot work, naming the field.
    pub fn check(&self) -> Result<(), String> {
        let positive = [
            ("lease_secs", self.lease_secs),
            ("heartbeat_secs", self.heartbeat_secs),
            ("queue_timeout_secs", self.queue_timeout_secs),
            ("max_attempts", u64::from(self.max_attempts)),
            ("poll_interval_ms", self.poll_interval_ms),
            ("reap_interval_secs", self.reap_interval_secs),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(format!("[scheduler] {name} must be at least 1"));
            }
        }
        if self.heartbeat_secs * 2 > self.lease_secs {
            return Err(format!(
                "[scheduler] heartbeat_secs ({}) must be at most half of lease_secs ({})",
                self.heartbeat_secs, self.lease_secs
            ));
        }
        if i32::try_from(self.max_attempts).is_err() {
            return Err("[scheduler] max_attempts is too large".into());
        }
        Ok(())
    }

    /// [`QueueConfig::lease_secs`] as a duration.
    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.lease_secs)
    }

    /// [`QueueConfig::heartbeat_secs`] as a duration.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs)
    }

    /// [`QueueConfig::poll_interval_ms`] as a duration.
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }

    fn database_retry(&self) -> Duration {
        Duration::from_secs(self.database_retry_secs)
    }
}

/// A job's id in the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobId(pub i64);

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why a queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The database cannot be reached (down, restarting, the pool timed out): worth retrying.
    #[error("the job database is unavailable: {0}")]
    Unavailable(String),
    /// The database refused a statement.
    #[error("job database: {0}")]
    Database(String),
    /// The caller's lease on the job is gone: the job was requeued (and maybe taken by another
    /// worker) or finished. The caller must stop working on it and write nothing more.
    #[error("worker {worker} no longer holds the lease on job {job}")]
    LeaseLost {
        /// The job.
        job: JobId,
        /// The worker that lost it.
        worker: String,
    },
    /// No such job (never enqueued, or removed after [`QueueConfig::retention_secs`]).
    #[error("no job {0} in the queue")]
    NotFound(JobId),
    /// The schema could not be brought to this version.
    #[error("migrating the job queue's tables: {0}")]
    Migration(String),
}

impl QueueError {
    /// Whether retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, QueueError::Unavailable(_))
    }
}

impl From<tokio_postgres::Error> for QueueError {
    fn from(error: tokio_postgres::Error) -> Self {
        let transient = error.is_closed()
            || match error.code() {
                None => true,
                Some(code) => {
                    let code = code.code();
                    // 08: connection exception; 57P0x: admin/crash shutdown, cannot connect now;
                    // 40001/40P01: serialization failure, deadlock (retry).
                    code.starts_with("08")
                        || code.starts_with("57P")
                        || *code == *SqlState::T_R_SERIALIZATION_FAILURE.code()
                        || *code == *SqlState::T_R_DEADLOCK_DETECTED.code()
                }
            };
        let text = match error.as_db_error() {
            Some(db) => db.to_string(),
            None => error.to_string(),
        };
        if transient {
            QueueError::Unavailable(text)
        } else {
            QueueError::Database(text)
        }
    }
}

impl From<deadpool_postgres::PoolError> for QueueError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        match error {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => QueueError::Unavailable(other.to_string()),
        }
    }
}

/// What a heartbeat found ([`JobQueue::heartbeat`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lease {
    /// The lease is renewed.
    Held,
    /// The lease is renewed, and a front end cancelled the job: stop it, record its outcome.
    CancelRequested,
}

/// A job a worker claimed: what to run and the lease that lets it report on the job.
#[derive(Clone, Debug)]
pub struct ClaimedJob {
    /// The job.
    pub id: JobId,
    /// The lease token: every report on the job names it.
    pub lease: i64,
    /// The worker holding the lease.
    pub worker: String,
    /// This claim's number (1 for the first).
    pub attempt: u32,
    /// Claims allowed in all.
    pub max_attempts: u32,
    /// Log lines the job had when claimed (earlier attempts, the queue's notes): this
    /// attempt's lines follow them.
    pub log_base: u64,
    /// What to run.
    pub request: ExecuteRequest,
}

/// A job's row as a front end or an operator sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobRecord {
    /// The job.
    pub id: JobId,
    /// `queued`, `running`, `done` or `failed`.
    pub state: String,
    /// Claims so far.
    pub attempts: u32,
    /// The worker holding (or that last held) the job.
    pub worker: Option<String>,
    /// The worker the job prefers.
    pub preferred_worker: Option<String>,
    /// Workers that lost the job (stopped renewing their lease), in order.
    pub lost_workers: Vec<String>,
    /// Log lines stored so far.
    pub log_lines: u64,
    /// Why the queue failed the job.
    pub error: Option<String>,
}

/// What one [`JobQueue::reap`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reaped {
    /// Running jobs whose lease expired, queued again.
    pub requeued: u64,
    /// Running jobs whose lease expired on their last attempt, failed.
    pub gave_up: u64,
    /// Queued jobs past their deadline, failed.
    pub expired: u64,
}

/// The job queue. Cheap to clone; clones share the pool and the listening connection.
#[derive(Clone)]
pub struct JobQueue {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    config: QueueConfig,
    listener: Arc<Listener>,
    listen_task: tokio::task::AbortHandle,
    last_reap: Mutex<Option<Instant>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.listen_task.abort();
    }
}

impl std::fmt::Debug for JobQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobQueue")
            .field("config", &self.inner.config)
            .finish()
    }
}

fn secs(duration: u64) -> f64 {
    duration as f64
}

/// Text for a `text` column: PostgreSQL refuses NUL bytes there.
fn pg_text(text: &str) -> String {
    text.replace('\0', "\\0")
}

fn stream_code(stream: LogStreamKind) -> i16 {
    match stream {
        LogStreamKind::Stdout => 0,
        LogStreamKind::Stderr => 1,
        LogStreamKind::System => 2,
    }
}

fn stream_of(code: i16) -> LogStreamKind {
    match code {
        0 => LogStreamKind::Stdout,
        1 => LogStreamKind::Stderr,
        _ => LogStreamKind::System,
    }
}

/// The affinity key of a request: who last completed a job of the same (tenant, workspace
/// identity) holds its target dir.
fn affinity(request: &ExecuteRequest) -> Option<Vec<u8>> {
    let identity = request.workspace_identity.as_ref()?;
    let mut hasher = blake3::Hasher::new();
    for part in [request.tenant.as_str(), identity] {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    Some(hasher.finalize().as_bytes().to_vec())
}

impl JobQueue {
    /// Connects to the database at `url` (through the CAS's [`Postgres`]: its pool and its
    /// schema versions) and brings the queue's tables to this version ([`MIGRATIONS`]).
    pub async fn connect(url: &str, config: QueueConfig) -> Result<JobQueue, QueueError> {
        let postgres = Postgres::connect(url)
            .await
            .map_err(|e| QueueError::Unavailable(e.to_string()))?;
        JobQueue::open(&postgres, url, config).await
    }

    /// The queue in the database of `postgres` (connected to `url`), sharing its pool; brings
    /// the queue's tables to this version ([`MIGRATIONS`], component [`SCHEMA_COMPONENT`]).
    pub async fn open(
        postgres: &Postgres,
        url: &str,
        config: QueueConfig,
    ) -> Result<JobQueue, QueueError> {
        config.check().map_err(QueueError::Database)?;
        postgres
            .migrate(SCHEMA_COMPONENT, MIGRATIONS)
            .await
            .map_err(|e| QueueError::Migration(e.to_string()))?;
        JobQueue::new(postgres.pool().clone(), url, config)
    }

    /// The queue over `pool` (its schema already migrated: see [`MIGRATIONS`]); `url` is the
    /// database's URL, for the one connection that `LISTEN`s (a pooled connection cannot).
    pub fn new(pool: Pool, url: &str, config: QueueConfig) -> Result<JobQueue, QueueError> {
        config.check().map_err(QueueError::Database)?;
        let pg_config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| QueueError::Database(format!("database URL: {e}")))?;
        let listener = Arc::new(Listener::default());
        let listen_task = tokio::spawn(listen(pg_config, Arc::downgrade(&listener))).abort_handle();
        Ok(JobQueue {
            inner: Arc::new(Inner {
                pool,
                config,
                listener,
                listen_task,
                last_reap: Mutex::new(None),
            }),
        })
    }

    /// The queue's timing.
    pub fn config(&self) -> &QueueConfig {
        &self.inner.config
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, QueueError> {
        Ok(self.inner.pool.get().await?)
    }

    /// Queues a job. `preferred_worker`: the worker that should get it first; `None`: the
    /// worker that last completed a job of the same (tenant, workspace identity), if any.
    ///
    /// Nothing here looks at the Action: a front end checks the request first (as
    /// [`crate::runner::Executor::submit`] does before a job exists); a worker that cannot
    /// load it ends the job with an `Error` outcome naming why.
    pub async fn enqueue(
        &self,
        request: &ExecuteRequest,
        preferred_worker: Option<&str>,
    ) -> Result<JobId, QueueError> {
        self.enqueue_named(None, request, preferred_worker).await
    }

    /// [`JobQueue::enqueue`] under `name`, the front end's id of the job (its operation or
    /// session name, unique), by which every front end finds it ([`JobQueue::named`]).
    pub async fn enqueue_named(
        &self,
        name: Option<&str>,
        request: &ExecuteRequest,
        preferred_worker: Option<&str>,
    ) -> Result<JobId, QueueError> {
        let client = self.client().await?;
        let preferred = preferred_worker.map(pg_text);
        let row = client
            .query_one(
                "WITH job AS (
                    INSERT INTO rba_jobs (instance, tenant, affinity, request, max_attempts,
                                          preferred_worker, deadline, name)
                    VALUES ($1, $2, $3, $4, $5,
                            COALESCE($6::text, (SELECT worker FROM rba_jobs
                                                WHERE affinity = $3 AND state = 'done'
                                                ORDER BY finished_at DESC LIMIT 1)),
                            now() + $7::float8 * interval '1 second', $9)
                    RETURNING id)
                 SELECT id, pg_notify($8, id::text)::text FROM job",
                &[
                    &request.instance.as_bytes(),
                    &request.tenant.as_str().as_bytes(),
                    &affinity(request),
                    &stored::encode_request(request),
                    &(self.inner.config.max_attempts as i32),
                    &preferred,
                    &secs(self.inner.config.queue_timeout_secs),
                    &QUEUE_CHANNEL,
                    &name.map(str::as_bytes),
                ],
            )
            .await?;
        Ok(JobId(row.get(0)))
    }

    /// The job a front end enqueued under `name` ([`JobQueue::enqueue_named`]) and its
    /// request, while the queue keeps it ([`QueueConfig::retention_secs`] after its end).
    /// `name` is a client's text: a bound parameter, compared as bytes. A stored request that
    /// cannot be read is an error naming why.
    pub async fn named(&self, name: &str) -> Result<Option<(JobId, ExecuteRequest)>, QueueError> {
        let client = self.client().await?;
        let Some(row) = client
            .query_opt(
                "SELECT id, request FROM rba_jobs WHERE name = $1",
                &[&name.as_bytes()],
            )
            .await?
        else {
            return Ok(None);
        };
        let job = JobId(row.get(0));
        let request = stored::decode_request(row.get(1))
            .map_err(|reason| QueueError::Database(format!("job {job}: {reason}")))?;
        Ok(Some((job, request)))
    }

    /// Claims the next job `worker` may take, if any: its own preferred jobs first, then the
    /// oldest job nobody prefers, whose preference grace is over, or whose preferred worker
    /// was not seen within a lease (gone: no point waiting for it). Records `worker` as seen.
    /// A job whose stored request cannot be read is failed (naming why) and the next one is
    /// claimed instead.
    ///
    /// Two index walks, each stopping at its first free row, so a claim costs the same with
    /// ten jobs queued or ten thousand: the worker's own preferred jobs
    /// (`rba_jobs_preferred`), and only if it has none, the oldest job it may take
    /// (`rba_jobs_queued`). One ordering of all queued rows by "preferred by me first" instead
    /// sorted the whole queue on every claim (18 ms of database time with 5,000 queued).
    pub async fn claim(&self, worker: &str) -> Result<Option<ClaimedJob>, QueueError> {
        let worker = pg_text(worker);
        let client = self.client().await?;
        let config = &self.inner.config;
        loop {
            let row = client
                .query_opt(
                    "WITH seen AS (
                        INSERT INTO rba_workers (id) VALUES ($1)
                        ON CONFLICT (id) DO UPDATE SET last_seen = now()),
                     mine AS MATERIALIZED (
                        SELECT id FROM rba_jobs
                        WHERE state = 'queued' AND preferred_worker = $1 AND deadline > now()
                        ORDER BY queued_at, id
                        LIMIT 1
                        FOR UPDATE SKIP LOCKED),
                     anyones AS MATERIALIZED (
                        SELECT id FROM rba_jobs
                        WHERE NOT EXISTS (SELECT 1 FROM mine)
                          AND state = 'queued' AND deadline > now()
                          AND (preferred_worker IS NULL
                               OR queued_at <= now() - $2::float8 * interval '1 second'
                               OR NOT EXISTS (
                                   SELECT 1 FROM rba_workers w
                                   WHERE w.id = preferred_worker
                                     AND w.last_seen > now() - $3::float8 * interval '1 second'))
                        ORDER BY queued_at, id
                        LIMIT 1
                        FOR UPDATE SKIP LOCKED),
                     next AS (
                        SELECT id FROM mine UNION ALL SELECT id FROM anyones LIMIT 1)
                     UPDATE rba_jobs j
                     SET state = 'running', worker = $1, attempts = j.attempts + 1,
                         lease = nextval('rba_job_leases'),
                         lease_until = now() + $3::float8 * interval '1 second',
                         started_at = now()
                     FROM next WHERE j.id = next.id
                     RETURNING j.id, j.lease, j.attempts, j.max_attempts, j.request, j.log_lines",
                    &[
                        &worker,
                        &secs(config.prefer_grace_secs),
                        &secs(config.lease_secs),
                    ],
                )
                .await?;
            let Some(row) = row else {
                return Ok(None);
            };
            let id = JobId(row.get(0));
            let lease: i64 = row.get(1);
            let bytes: &[u8] = row.get(4);
            match stored::decode_request(bytes) {
                Ok(request) => {
                    return Ok(Some(ClaimedJob {
                        id,
                        lease,
                        worker,
                        attempt: row.get::<_, i32>(2) as u32,
                        max_attempts: row.get::<_, i32>(3) as u32,
                        log_base: row.get::<_, i64>(5) as u64,
                        request,
                    }));
                }
                Err(reason) => {
                    let error = format!("job {id}: its stored request cannot be read: {reason}");
                    tracing::warn!(job = %id, %error, "failing a job with a corrupt request");
                    client
                        .execute(
                            "WITH failed AS (
                                UPDATE rba_jobs SET state = 'failed', error = $3,
                                       finished_at = now(), lease_until = NULL
                                WHERE id = $1 AND lease = $2 AND state = 'running'
                                RETURNING id)
                             SELECT pg_notify($4, id::text)::text FROM failed",
                            &[&id.0, &lease, &pg_text(&error), &JOB_CHANNEL],
                        )
                        .await?;
                }
            }
        }
    }

    /// Renews the lease on a claimed job (and records its worker as seen). `LeaseLost` when
    /// the job is no longer this claim's: stop working on it. [`Lease::CancelRequested`]: a
    /// front end cancelled the job; stop it and complete it with its (cancelled) outcome.
    pub async fn heartbeat(&self, job: &ClaimedJob) -> Result<Lease, QueueError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "WITH seen AS (
                    UPDATE rba_workers SET last_seen = now() WHERE id = $3)
                 UPDATE rba_jobs SET lease_until = now() + $4::float8 * interval '1 second'
                 WHERE id = $1 AND lease = $2 AND state = 'running'
                 RETURNING cancel_requested",
                &[
                    &job.id.0,
                    &job.lease,
                    &job.worker,
                    &secs(self.inner.config.lease_secs),
                ],
            )
            .await?;
        match row {
            Some(row) if row.get::<_, bool>(0) => Ok(Lease::CancelRequested),
            Some(_) => Ok(Lease::Held),
            None => Err(lost(job)),
        }
    }

    /// Cancels a job: a queued job ends at once with a `Cancelled` outcome; a running job is
    /// marked, and its worker stops it at its next heartbeat and records its outcome (if the
    /// worker is gone, the reaper fails it instead of requeueing it). `false` when the job had
    /// already finished.
    pub async fn cancel(&self, job: JobId) -> Result<bool, QueueError> {
        let mut cancelled =
            stored::error_outcome(format!("job {job} was cancelled before a worker took it"));
        cancelled.status = JobStatus::Cancelled;
        let (json, _) = stored::encode_outcome(&cancelled);
        let client = self.client().await?;
        let row = client
            .query_opt(
                "WITH cancelled AS (
                    UPDATE rba_jobs SET cancel_requested = true,
                           outcome = CASE WHEN state = 'queued' THEN $2 ELSE outcome END,
                           finished_at = CASE WHEN state = 'queued' THEN now()
                                              ELSE finished_at END,
                           state = CASE WHEN state = 'queued' THEN 'done' ELSE state END
                    WHERE id = $1 AND state IN ('queued', 'running')
                    RETURNING id)
                 SELECT id, pg_notify($3, id::text)::text FROM cancelled",
                &[&job.0, &json, &JOB_CHANNEL],
            )
            .await?;
        if row.is_some() {
            return Ok(true);
        }
        match client
            .query_opt("SELECT 1 FROM rba_jobs WHERE id = $1", &[&job.0])
            .await?
        {
            Some(_) => Ok(false),
            None => Err(QueueError::NotFound(job)),
        }
    }

    /// Appends log lines of a claimed job (one statement: all or none) and wakes its readers.
    /// `lines` are the executor's own lines of this attempt, contiguous, numbered from 0 for
    /// its first line ([`LogLine::seq`]): they are stored at [`ClaimedJob::log_base`] + `seq`,
    /// so a batch repeated after a lost reply is recognised and not stored twice. `LeaseLost`
    /// when the job is no longer this claim's (nothing is appended).
    pub async fn append_logs(&self, job: &ClaimedJob, lines: &[LogLine]) -> Result<(), QueueError> {
        let (Some(first), Some(last)) = (lines.first(), lines.last()) else {
            return Ok(());
        };
        if lines
            .windows(2)
            .any(|pair| pair[0].seq.checked_add(1) != Some(pair[1].seq))
        {
            return Err(QueueError::Database(format!(
                "job {}: log lines to append are not contiguous ({}..={} for {} lines)",
                job.id,
                first.seq,
                last.seq,
                lines.len()
            )));
        }
        let from = (job.log_base + first.seq) as i64;
        let upto = (job.log_base + last.seq + 1) as i64;
        let streams: Vec<i16> = lines.iter().map(|l| stream_code(l.stream)).collect();
        let texts: Vec<&[u8]> = lines.iter().map(|l| l.line.as_bytes()).collect();
        let client = self.client().await?;
        let row = client
            .query_opt(
                "WITH job AS (
                    UPDATE rba_jobs SET log_lines = $4
                    WHERE id = $1 AND lease = $2 AND state = 'running' AND log_lines = $3
                    RETURNING id),
                 lines AS (
                    INSERT INTO rba_job_logs (job, seq, stream, line)
                    SELECT $1, $3 + t.ord - 1, t.stream, t.line
                    FROM job, unnest($5::smallint[], $6::bytea[]) WITH ORDINALITY
                         AS t(stream, line, ord))
                 SELECT id, pg_notify($7, $1::text)::text FROM job",
                &[
                    &job.id.0,
                    &job.lease,
                    &from,
                    &upto,
                    &streams,
                    &texts,
                    &JOB_CHANNEL,
                ],
            )
            .await?;
        if row.is_some() {
            return Ok(());
        }
        // Stored already by this claim (a repeated batch)?
        let row = client
            .query_opt(
                "SELECT 1 FROM rba_jobs
                 WHERE id = $1 AND lease = $2 AND state = 'running' AND log_lines >= $3",
                &[&job.id.0, &job.lease, &upto],
            )
            .await?;
        match row {
            Some(_) => Ok(()),
            None => Err(lost(job)),
        }
    }

    /// Records the outcome of a claimed job: `done`, woken waiters. Only the lease holder can:
    /// `LeaseLost` when the job was requeued or finished by someone else, and nothing is
    /// written. Calling it again after a success (e.g. the reply was lost) is a success.
    pub async fn complete(&self, job: &ClaimedJob, outcome: &JobOutcome) -> Result<(), QueueError> {
        let (json, result) = stored::encode_outcome(outcome);
        let error = outcome.error.as_deref().map(pg_text);
        let client = self.client().await?;
        let row = client
            .query_opt(
                "WITH done AS (
                    UPDATE rba_jobs SET state = 'done', outcome = $3, action_result = $4,
                           error = $5, finished_at = now(), lease_until = NULL
                    WHERE id = $1 AND lease = $2 AND state = 'running'
                    RETURNING id)
                 SELECT id, pg_notify($6, id::text)::text FROM done",
                &[&job.id.0, &job.lease, &json, &result, &error, &JOB_CHANNEL],
            )
            .await?;
        if row.is_some() {
            return Ok(());
        }
        // Already recorded by this very claim (an earlier call whose reply was lost)?
        let row = client
            .query_opt(
                "SELECT 1 FROM rba_jobs WHERE id = $1 AND lease = $2 AND state = 'done'",
                &[&job.id.0, &job.lease],
            )
            .await?;
        match row {
            Some(_) => Ok(()),
            None => Err(lost(job)),
        }
    }

    /// Gives a claimed job back (the worker is shutting down): queued again at once, the claim
    /// not counted as an attempt, a `system` log line saying so. `LeaseLost` if it was no
    /// longer this claim's.
    pub async fn release(&self, job: &ClaimedJob) -> Result<(), QueueError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "WITH released AS (
                    UPDATE rba_jobs SET state = 'queued', attempts = attempts - 1, lease = NULL,
                           lease_until = NULL, queued_at = now(),
                           deadline = now() + $3::float8 * interval '1 second',
                           log_lines = log_lines + 1
                    WHERE id = $1 AND lease = $2 AND state = 'running'
                    RETURNING id, worker, log_lines - 1 AS seq),
                 line AS (
                    INSERT INTO rba_job_logs (job, seq, stream, line)
                    SELECT id, seq, 2, convert_to(format(
                        'worker %s is shutting down: job requeued', worker), 'UTF8')
                    FROM released)
                 SELECT id, pg_notify($4, id::text)::text, pg_notify($5, id::text)::text
                 FROM released",
                &[
                    &job.id.0,
                    &job.lease,
                    &secs(self.inner.config.queue_timeout_secs),
                    &JOB_CHANNEL,
                    &QUEUE_CHANNEL,
                ],
            )
            .await?;
        match row {
            Some(_) => Ok(()),
            None => Err(lost(job)),
        }
    }

    /// Turns expired leases and deadlines into state changes (see the module doc): running
    /// jobs whose lease expired are queued again while attempts remain (a `system` log line
    /// names the lost worker), else failed naming the lost workers; queued jobs past their
    /// deadline are failed with "no worker took job N within S seconds (workers seen: …)";
    /// finished jobs older than the retention are removed. Idempotent; safe to run from any
    /// number of processes at once.
    pub async fn reap(&self) -> Result<Reaped, QueueError> {
        *self.inner.last_reap.lock() = Some(Instant::now());
        let config = &self.inner.config;
        let client = self.client().await?;
        let requeued = client
            .query(
                "WITH lost AS (
                    UPDATE rba_jobs SET state = 'queued', lease = NULL, lease_until = NULL,
                           queued_at = now(),
                           deadline = now() + $1::float8 * interval '1 second',
                           lost_workers = array_append(lost_workers, worker),
                           log_lines = log_lines + 1
                    WHERE id IN (SELECT id FROM rba_jobs
                                 WHERE state = 'running' AND lease_until < now()
                                   AND attempts < max_attempts AND NOT cancel_requested
                                 FOR UPDATE SKIP LOCKED)
                    RETURNING id, worker, attempts, max_attempts, log_lines - 1 AS seq),
                 line AS (
                    INSERT INTO rba_job_logs (job, seq, stream, line)
                    SELECT id, seq, 2, convert_to(format(
                        'worker %s stopped renewing its lease: job requeued after attempt %s of %s',
                        worker, attempts, max_attempts), 'UTF8')
                    FROM lost)
                 SELECT id, pg_notify($2, id::text)::text, pg_notify($3, id::text)::text
                 FROM lost",
                &[
                    &secs(config.queue_timeout_secs),
                    &JOB_CHANNEL,
                    &QUEUE_CHANNEL,
                ],
            )
            .await?
            .len() as u64;
        let gave_up = client
            .query(
                "WITH gave_up AS (
                    UPDATE rba_jobs SET state = 'failed', lease = NULL, lease_until = NULL,
                           finished_at = now(),
                           lost_workers = array_append(lost_workers, worker),
                           error = CASE WHEN cancel_requested
                               THEN format('job %s was cancelled and its worker %s stopped '
                                           'renewing its lease', id, worker)
                               ELSE format('job %s: worker %s stopped renewing its lease on '
                                   'attempt %s of %s; giving up (workers lost: %s)',
                                   id, worker, attempts, max_attempts,
                                   array_to_string(array_append(lost_workers, worker), ', '))
                               END
                    WHERE id IN (SELECT id FROM rba_jobs
                                 WHERE state = 'running' AND lease_until < now()
                                   AND (attempts >= max_attempts OR cancel_requested)
                                 FOR UPDATE SKIP LOCKED)
                    RETURNING id)
                 SELECT id, pg_notify($1, id::text)::text FROM gave_up",
                &[&JOB_CHANNEL],
            )
            .await?
            .len() as u64;
        let expired = client
            .query(
                "WITH seen AS (
                    SELECT COALESCE(string_agg(format('%s (%s s ago)', id,
                               floor(extract(epoch FROM now() - last_seen))::bigint), ', '
                               ORDER BY last_seen DESC), 'none') AS names
                    FROM (SELECT id, last_seen FROM rba_workers
                          WHERE last_seen > now() - $1::float8 * interval '1 second'
                          ORDER BY last_seen DESC LIMIT $2) recent),
                 expired AS (
                    UPDATE rba_jobs SET state = 'failed', finished_at = now(),
                           error = format('no worker took job %s within %s seconds '
                                          '(workers seen: %s)', rba_jobs.id, $3::bigint, seen.names)
                    FROM seen
                    WHERE rba_jobs.id IN (SELECT id FROM rba_jobs
                                          WHERE state = 'queued' AND deadline <= now()
                                          FOR UPDATE SKIP LOCKED)
                    RETURNING rba_jobs.id)
                 SELECT id, pg_notify($4, id::text)::text FROM expired",
                &[
                    &secs(config.queue_timeout_secs + config.lease_secs),
                    &WORKERS_NAMED,
                    &(config.queue_timeout_secs as i64),
                    &JOB_CHANNEL,
                ],
            )
            .await?
            .len() as u64;
        client
            .execute(
                "DELETE FROM rba_jobs WHERE state IN ('done', 'failed')
                   AND finished_at < now() - $1::float8 * interval '1 second'",
                &[&secs(config.retention_secs)],
            )
            .await?;
        client
            .execute(
                "DELETE FROM rba_workers
                 WHERE last_seen < now() - $1::float8 * interval '1 second'",
                &[&secs(config.retention_secs)],
            )
            .await?;
        let reaped = Reaped {
            requeued,
            gave_up,
            expired,
        };
        if reaped != Reaped::default() {
            tracing::info!(?reaped, "reaped the job queue");
        }
        Ok(reaped)
    }

    /// [`JobQueue::reap`] unless this process reaped less than
    /// [`QueueConfig::reap_interval_secs`] ago. Errors are logged, not returned: a reap is
    /// retried at the next chance.
    pub async fn reap_if_due(&self) {
        let due = self.inner.last_reap.lock().is_none_or(|last| {
            last.elapsed() >= Duration::from_secs(self.inner.config.reap_interval_secs)
        });
        if due && let Err(error) = self.reap().await {
            tracing::warn!(%error, "reaping the job queue failed; will retry");
        }
    }

    /// A job's row.
    pub async fn job(&self, job: JobId) -> Result<JobRecord, QueueError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT state, attempts, worker, preferred_worker, lost_workers, log_lines, error
                 FROM rba_jobs WHERE id = $1",
                &[&job.0],
            )
            .await?
            .ok_or(QueueError::NotFound(job))?;
        Ok(JobRecord {
            id: job,
            state: row.get(0),
            attempts: row.get::<_, i32>(1) as u32,
            worker: row.get(2),
            preferred_worker: row.get(3),
            lost_workers: row.get(4),
            log_lines: row.get::<_, i64>(5) as u64,
            error: row.get(6),
        })
    }

    /// How many jobs are queued and how many running, for metrics: read through the queue's
    /// partial indexes (never the finished jobs).
    pub async fn depth(&self) -> Result<QueueDepth, QueueError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM rba_jobs WHERE state = 'queued'),
                        (SELECT count(*) FROM rba_jobs WHERE state = 'running')",
                &[],
            )
            .await?;
        let count = |i: usize| u64::try_from(row.get::<_, i64>(i)).unwrap_or(0);
        Ok(QueueDepth {
            queued: count(0),
            running: count(1),
        })
    }

    /// The workers seen within `within`, most recent first, with when they were last seen.
    pub async fn workers(&self, within: Duration) -> Result<Vec<(String, SystemTime)>, QueueError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, last_seen FROM rba_workers
                 WHERE last_seen > now() - $1::float8 * interval '1 second'
                 ORDER BY last_seen DESC",
                &[&within.as_secs_f64()],
            )
            .await?;
        Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
    }

    /// The outcome of a finished job, `None` while it is queued or running. A job the queue
    /// failed (deadline, lost workers, corrupt request) has an `Error` outcome with the
    /// queue's reason.
    pub async fn outcome(&self, job: JobId) -> Result<Option<Arc<JobOutcome>>, QueueError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT state, outcome, action_result, error FROM rba_jobs WHERE id = $1",
                &[&job.0],
            )
            .await?
            .ok_or(QueueError::NotFound(job))?;
        let state: &str = row.get(0);
        Ok(match state {
            "done" => {
                let json: Option<&[u8]> = row.get(1);
                let result: Option<&[u8]> = row.get(2);
                let outcome = json
                    .ok_or_else(|| "no outcome stored".to_string())
                    .and_then(|json| stored::decode_outcome(json, result))
                    .unwrap_or_else(|reason| {
                        stored::error_outcome(format!(
                            "job {job}: its stored outcome cannot be read: {reason}"
                        ))
                    });
                Some(Arc::new(outcome))
            }
            "failed" => {
                let error: Option<String> = row.get(3);
                Some(Arc::new(stored::error_outcome(error.unwrap_or_else(
                    || format!("job {job} failed in the queue"),
                ))))
            }
            _ => None,
        })
    }

    /// Waits for a job's end and returns its outcome (see [`JobQueue::outcome`]). Woken by
    /// notifications, and polls every [`QueueConfig::poll_interval_ms`] besides (reaping when
    /// due), so neither a lost notification nor a dead worker makes it hang: the job ends
    /// done, requeued and done elsewhere, or failed within the queue's bounds. Retries an
    /// unreachable database for [`QueueConfig::database_retry_secs`].
    pub async fn wait(&self, job: JobId) -> Result<Arc<JobOutcome>, QueueError> {
        let notify = self.inner.listener.watch(job);
        let mut unavailable_since: Option<Instant> = None;
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.outcome(job).await {
                Ok(Some(outcome)) => return Ok(outcome),
                Ok(None) => unavailable_since = None,
                Err(error) => self.tolerate(error, &mut unavailable_since)?,
            }
            self.reap_if_due().await;
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(self.inner.config.poll_interval()) => {}
            }
        }
    }

    /// Keeps going through a transient error until the database has been unreachable for
    /// [`QueueConfig::database_retry_secs`].
    fn tolerate(
        &self,
        error: QueueError,
        unavailable_since: &mut Option<Instant>,
    ) -> Result<(), QueueError> {
        if !error.is_transient() {
            return Err(error);
        }
        let since = *unavailable_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= self.inner.config.database_retry() {
            return Err(error);
        }
        tracing::debug!(%error, "job database unavailable; retrying");
        Ok(())
    }

    /// A job's log lines from `from_seq` on, in order, live: the reader waits for lines not
    /// yet written and ends after the last line of a finished job.
    pub fn logs(&self, job: JobId, from_seq: u64) -> JobLogs {
        JobLogs {
            queue: self.clone(),
            job,
            next: from_seq,
            buffer: VecDeque::new(),
            notify: self.inner.listener.watch(job),
            unavailable_since: None,
        }
    }

    /// A signal of new work, armed now (before the caller looks for work, so a job queued in
    /// between is not missed): resolves when a job is queued or requeued (a notification) or
    /// after the poll interval.
    pub fn work_signal(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut notified = Box::pin(self.inner.listener.queue.clone().notified_owned());
        notified.as_mut().enable();
        let poll = self.inner.config.poll_interval();
        async move {
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(poll) => {}
            }
        }
    }
}

fn lost(job: &ClaimedJob) -> QueueError {
    QueueError::LeaseLost {
        job: job.id,
        worker: job.worker.clone(),
    }
}

/// A live reader of one job's log lines ([`JobQueue::logs`]).
pub struct JobLogs {
    queue: JobQueue,
    job: JobId,
    next: u64,
    buffer: VecDeque<LogLine>,
    notify: Arc<Notify>,
    unavailable_since: Option<Instant>,
}

impl std::fmt::Debug for JobLogs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobLogs")
            .field("job", &self.job)
            .field("next", &self.next)
            .finish()
    }
}

impl JobLogs {
    /// The next line, waiting for it while the job runs; `None` after the last line of a
    /// finished job.
    pub async fn next(&mut self) -> Result<Option<LogLine>, QueueError> {
        loop {
            if let Some(line) = self.buffer.pop_front() {
                return Ok(Some(line));
            }
            let notify = self.notify.clone();
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.fetch().await {
                Ok(Fetched::Lines) => {
                    self.unavailable_since = None;
                    continue;
                }
                Ok(Fetched::End) => return Ok(None),
                Ok(Fetched::Wait) => self.unavailable_since = None,
                Err(error) => self.queue.tolerate(error, &mut self.unavailable_since)?,
            }
            self.queue.reap_if_due().await;
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(self.queue.inner.config.poll_interval()) => {}
            }
        }
    }

    /// Reads the next lines into the buffer.
    async fn fetch(&mut self) -> Result<Fetched, QueueError> {
        let client = self.queue.client().await?;
        // The state first: lines are written only while the job runs, so once it is seen
        // finished, the lines read after are all there are.
        let state: String = client
            .query_opt("SELECT state FROM rba_jobs WHERE id = $1", &[&self.job.0])
            .await?
            .ok_or(QueueError::NotFound(self.job))?
            .get(0);
        let rows = client
            .query(
                "SELECT seq, stream, line FROM rba_job_logs
                 WHERE job = $1 AND seq >= $2 ORDER BY seq LIMIT $3",
                &[
                    &self.job.0,
                    &i64::try_from(self.next).unwrap_or(i64::MAX),
                    &READ_BATCH,
                ],
            )
            .await?;
        for row in &rows {
            let bytes: &[u8] = row.get(2);
            self.buffer.push_back(LogLine {
                seq: row.get::<_, i64>(0) as u64,
                stream: stream_of(row.get(1)),
                line: String::from_utf8_lossy(bytes).into_owned(),
            });
        }
        if let Some(last) = self.buffer.back() {
            self.next = last.seq + 1;
            return Ok(Fetched::Lines);
        }
        if state == "done" || state == "failed" {
            return Ok(Fetched::End);
        }
        Ok(Fetched::Wait)
    }
}

/// What one read of a job's log found.
enum Fetched {
    /// Lines, now in the buffer.
    Lines,
    /// No new line yet; the job is not finished.
    Wait,
    /// The job finished and every line was read.
    End,
}

/// Wakes the local waiters of the notifications of one `LISTEN` connection.
#[derive(Default)]
struct Listener {
    jobs: Mutex<HashMap<JobId, Weak<Notify>>>,
    queue: Arc<Notify>,
}

impl Listener {
    /// The wake-up of `job`'s waiters (shared by every local waiter of the job).
    fn watch(&self, job: JobId) -> Arc<Notify> {
        let mut jobs = self.jobs.lock();
        if let Some(notify) = jobs.get(&job).and_then(Weak::upgrade) {
            return notify;
        }
        if jobs.len() >= 64 && jobs.len().is_power_of_two() {
            jobs.retain(|_, notify| notify.strong_count() > 0);
        }
        let notify = Arc::new(Notify::new());
        jobs.insert(job, Arc::downgrade(&notify));
        notify
    }

    fn job_event(&self, job: JobId) {
        let notify = self.jobs.lock().get(&job).and_then(Weak::upgrade);
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
    }

    /// After a reconnection: whatever was notified meanwhile was lost; everyone looks again.
    fn wake_all(&self) {
        let all: Vec<_> = self
            .jobs
            .lock()
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for notify in all {
            notify.notify_waiters();
        }
        self.queue.notify_waiters();
    }
}

/// The listening connection: `LISTEN`s on the queue's channels and wakes local waiters;
/// reconnects (waking everyone) whenever the connection is lost. Ends with the queue.
async fn listen(config: tokio_postgres::Config, listener: Weak<Listener>) {
    const FIRST_RETRY: Duration = Duration::from_millis(200);
    const LAST_RETRY: Duration = Duration::from_secs(5);
    let mut retry = FIRST_RETRY;
    loop {
        let connected = config.connect(tokio_postgres::NoTls).await;
        let (client, mut connection) = match connected {
            Ok(pair) => pair,
            Err(error) => {
                tracing::debug!(%error, "job queue listener: cannot connect; retrying");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(LAST_RETRY);
                if listener.strong_count() == 0 {
                    return;
                }
                continue;
            }
        };
        // The connection delivers notifications only while it is polled: a task of its own
        // drives it and forwards them; it ends when the connection does.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            while let Some(message) =
                futures::future::poll_fn(|cx| connection.poll_message(cx)).await
            {
                match message {
                    Ok(message) => {
                        if tx.send(message).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        let listening = client
            .batch_execute(&format!("LISTEN {JOB_CHANNEL}; LISTEN {QUEUE_CHANNEL}"))
            .await;
        if let Err(error) = listening {
            tracing::debug!(%error, "job queue listener: LISTEN failed; retrying");
            driver.abort();
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(LAST_RETRY);
            continue;
        }
        retry = FIRST_RETRY;
        match listener.upgrade() {
            Some(listener) => listener.wake_all(),
            None => {
                driver.abort();
                return;
            }
        }
        while let Some(message) = rx.recv().await {
            let Some(listener) = listener.upgrade() else {
                driver.abort();
                return;
            };
            if let tokio_postgres::AsyncMessage::Notification(note) = message {
                if note.channel() == QUEUE_CHANNEL {
                    listener.queue.notify_waiters();
                } else if let Ok(id) = note.payload().parse() {
                    listener.job_event(JobId(id));
                }
            }
        }
        driver.abort();
        drop(client);
        tracing::debug!("job queue listener: connection lost; reconnecting");
        if listener.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(retry).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_is_a_scheduler_section_with_defaults() {
        let config: QueueConfig = toml::from_str("lease_secs = 60\nheartbeat_secs = 20").unwrap();
        assert_eq!(config.lease(), Duration::from_secs(60));
        assert_eq!(config.max_attempts, QueueConfig::default().max_attempts);
        config.check().unwrap();
        QueueConfig::default().check().unwrap();
        let unknown = toml::from_str::<QueueConfig>("lease = 3").unwrap_err();
        assert!(unknown.to_string().contains("lease"), "{unknown}");
        let too_slow = QueueConfig {
            heartbeat_secs: 20,
            ..QueueConfig::default()
        };
        let refused = too_slow.check().unwrap_err();
        assert!(refused.contains("heartbeat_secs (20)"), "{refused}");
    }
}
