//! The fixture workspaces every crate's tests and benches build (`tests/fixtures/`): a single
//! crate, a 3-member workspace, a compile error, passing and failing tests, clippy warnings, a
//! registry dependency, a build script that never ends, one that takes 4 s (`sleepy`) and a
//! 34-crate mid-size workspace. Each is standalone (its own `[workspace]` and `Cargo.lock`).
//!
//! The end-to-end tests that start the real binaries live beside the crate that owns each
//! binary, because cargo builds a package's binaries for its own integration tests only:
//! `agent/tests/cli.rs` (`rba build`, `rba serve`, `rba build --remote`, `rba logs`),
//! `cache-server/tests/binary.rs` (`cache-server`) and `cache-server/tests/bazel_e2e.rs` (a real
//! Bazel client against it).
//!
//! Servers the tests run for real, shared by every crate's tests: [`s3`] (an S3-compatible
//! server, moto) and [`postgres`] (a private PostgreSQL server per test, for the scale-out
//! backends and the job queue). [`machine`] reads how busy the machine was, for the benches.

pub mod machine;
pub mod postgres;
pub mod s3;
