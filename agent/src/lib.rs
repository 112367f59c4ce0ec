//! The rust-build-agent operator node and the `rba` CLI (binary in `main.rs`).
//!
//! One module per concern:
//! - [`config`]: the node's TOML configuration, environment and flag overrides.
//! - [`compose`]: the config turned into the executor's backends: embedded, or a scale-out
//!   front end or worker over a bucket and PostgreSQL (`RBA_STORE_URL`, `RBA_DATABASE_URL`).
//! - [`node`]: the operator node joining the CAS, the executor, the history, libp2p, HTTP and
//!   gRPC; [`node::NodeShared::submit`] is how every remote submission reaches
//!   `Executor::submit`.
//! - [`p2p`]: libp2p (TCP + noise + yamux, QUIC), the node identity, frames, and the
//!   `/rba/session/1.0.0` and `/rba/cas/1.0.0` protocols (both sides).
//! - [`http`]: the HTTP face (axum): the read API, the WebSocket event gateway, `POST /execute`.
//! - [`views`]: the read API's typed answers (a build with its live state, the cache).
//! - [`dashboard`]: the build dashboard in the browser (pages, embedded assets, login cookie,
//!   SVG badges).
//! - [`history`]: build records, in the embedded database or (scaled out) PostgreSQL.
//! - [`metrics`]: counters rendered as Prometheus text.
//! - [`grpc`]: the REAPI server on the node's CAS.
//! - [`client`]: the remote client `rba --remote` uses (upload what is missing, submit,
//!   follow, resume).
//! - [`artifacts`]: a build's binaries written into the user's target dir, hostile paths refused.
//! - [`local`]: the embedded node `rba` uses without `--remote`.
//! - [`output`]: what the CLI prints (live lines, progress bar, summary).
//! - [`test_report`]: `rba test`'s results per test binary and the failing tests' output, read
//!   from the log lines both paths print.
//! - [`workspace`]: hashing a user's workspace into a local CAS.
//! - `tangle` (feature `tangle`, off by default): the Tangle Blueprint jobs (0–4), `zip_uri`
//!   fetching and `rba tangle run`.

pub mod artifacts;
pub mod cargo_flags;
pub mod client;
pub mod client_config;
pub mod compose;
pub mod config;
pub mod dashboard;
pub mod execute;
pub mod grpc;
pub mod history;
pub mod http;
pub mod local;
pub mod metrics;
pub mod node;
pub mod output;
pub mod p2p;
#[cfg(feature = "tangle")]
pub mod tangle;
pub mod test_report;
pub mod views;
pub mod workspace;
