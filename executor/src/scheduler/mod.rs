//! The scale-out scheduler: jobs in PostgreSQL, taken by any number of worker processes.
//!
//! # Why
//!
//! [`crate::runner::Executor`] queues and runs jobs in one process: when that process dies, its
//! queue dies with it, and one machine's slots are all the capacity there is. Scaled out,
//! several front ends accept jobs and several `rba worker` processes run them; the queue must
//! then live where all of them meet and outlive any of them — the PostgreSQL database that
//! already holds the blob index and the action cache
//! ([`rba_cas::backends::postgres::Postgres`], whose pool and schema versions this module
//! reuses, component [`queue::SCHEMA_COMPONENT`]).
//!
//! What it promises (tested against a real PostgreSQL in `executor/tests/queue.rs`):
//! - a job is claimed by one worker at a time (`FOR UPDATE SKIP LOCKED`) and its outcome
//!   recorded once, by the holder of its lease; a worker that lost its lease can write nothing;
//! - a worker that dies mid-job loses its lease and the job runs again elsewhere, up to
//!   [`QueueConfig::max_attempts`] times, then fails naming the lost workers;
//! - a job no worker takes fails after [`QueueConfig::queue_timeout_secs`] saying so; no
//!   waiter hangs (notifications, with polling behind them);
//! - a job prefers the worker that holds its workspace's target dir;
//! - log lines reach readers while the job runs, in order, and stay with the job.
//!
//! Modules: [`queue`] (the tables and every transition, one statement each), [`worker`] (the
//! loop that drives the one job path, [`crate::runner::Executor::submit`], under a lease, and
//! [`worker::TieredStaging`], a worker's store seam over a local tier of the shared store),
//! [`dispatch`] (a front end's executor handing its jobs to the workers, inside the same job
//! path) and `stored` (the one serialized form of a request and an outcome).
//!
//! Wiring a front end and a worker from a config (`RBA_DATABASE_URL`, `RBA_STORE_URL`) is the
//! composition root's business (the agent's `compose` module).

pub mod dispatch;
pub mod queue;
mod stored;
pub mod worker;

pub use dispatch::Dispatch;
pub use queue::{
    ClaimedJob, JobId, JobLogs, JobQueue, JobRecord, Lease, QueueConfig, QueueDepth, QueueError,
    Reaped,
};
pub use worker::{SharedCas, Staging, TieredStaging, Worker, WorkerReport, process_worker_id};
