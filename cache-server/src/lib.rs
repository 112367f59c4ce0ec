//! The Bazel Remote Execution API v2 over gRPC, on the `rba-cas` store.
//!
//! Every REAPI client (Bazel, Buck2, Pants, …) can use this server as its remote cache. One
//! module per gRPC service, so the Execution service (and google.longrunning Operations) slot in
//! beside them later:
//!
//! - [`capabilities`]: `GetCapabilities` — digest functions, compressors, the real batch limit,
//!   whether *this client* may update the action cache.
//! - [`cas`]: `ContentAddressableStorage` — FindMissingBlobs, BatchUpdateBlobs, BatchReadBlobs,
//!   GetTree with paging.
//! - [`action_cache`]: `ActionCache` — GetActionResult (complete hits only, inlining honoured),
//!   UpdateActionResult (refused while referenced blobs are missing).
//! - [`bytestream`]: `google.bytestream.ByteStream` — streaming, verified, resumable blob
//!   reads and writes, plain or zstd-compressed.
//!
//! Around them: [`config`] (TOML file, environment, flags), [`auth`] (bearer tokens,
//! read-only or read-write), [`metrics`] (Prometheus text over HTTP), [`resource_name`]
//! (ByteStream resource names, both the classic and the v2.3 digest-function forms),
//! [`status`] (the spec's status codes for every store error) and [`server`] (the tonic
//! router, listeners and clean shutdown).

pub mod action_cache;
pub mod auth;
pub mod bytestream;
pub mod capabilities;
pub mod cas;
pub mod config;
pub mod metrics;
pub mod resource_name;
pub mod server;
pub mod status;

pub use config::Config;
pub use server::{RunningServer, Server, ServerState};
