//! The Bazel Remote Execution API v2 over gRPC, on the `rba-cas` store and the `rba-executor`.
//!
//! Every REAPI client (Bazel, Buck2, Pants, …) can use this server as its remote cache and
//! remote executor. The services are thin over the [`rba_cas::Stores`] they are given (a
//! `Store`, the complete action cache over it and the read grants, behind `rba_cas`'s seams):
//! nothing here opens a backend or names one, so the same services serve the embedded store
//! ([`Server::new`]) or a front end's shared one ([`Server::with_stores`]). One module per gRPC
//! service:
//!
//! - [`capabilities`]: `GetCapabilities` — digest functions, compressors, the real batch limit,
//!   whether *this client* may update the action cache.
//! - [`cas`]: `ContentAddressableStorage` — FindMissingBlobs, BatchUpdateBlobs, BatchReadBlobs,
//!   GetTree with paging.
//! - [`action_cache`]: `ActionCache` — GetActionResult (complete hits only, inlining honoured),
//!   UpdateActionResult (refused while referenced blobs are missing).
//! - [`bytestream`]: `google.bytestream.ByteStream` — streaming, verified, resumable blob
//!   reads and writes, plain or zstd-compressed; and live action output.
//! - [`execution`]: `Execution` (Execute, WaitExecution) and `google.longrunning.Operations`,
//!   a thin translation onto `rba_executor::runner::Executor`, which runs every action in its
//!   sandbox and stores outputs and results; its live stdout/stderr are ByteStream-readable.
//!
//! Around them: [`config`] (TOML file, environment, flags), [`auth`] (bearer tokens,
//! read-only or read-write), [`metrics`] (Prometheus text over HTTP), [`resource_name`]
//! (ByteStream resource names, both the classic and the v2.3 digest-function forms),
//! [`status`] (the spec's status codes for every store error), [`bytestream_route`] (ByteStream
//! Read's responses framed, and Write's requests decoded, without tonic's and prost's copies
//! of every byte; and the client's matching decoder) and
//! [`server`] (the tonic router, listeners and clean shutdown).

pub mod action_cache;
pub mod auth;
pub mod bytestream;
pub mod bytestream_route;
pub mod capabilities;
pub mod cas;
pub mod cas_route;
pub mod config;
pub mod execution;
pub mod hand_route;
pub mod logging;
pub mod metrics;
pub mod resource_name;
pub mod server;
pub mod status;

pub use config::Config;
pub use server::{RunningServer, Server, ServerState};
