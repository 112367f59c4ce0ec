//! The executor: turns cargo jobs and REAPI actions into sandboxed runs.
//!
//! [`sandbox`] runs one command in an isolated, resource-limited container (hakoniwa) with fixed
//! paths (`/workspace`, `/target`, `/cargo`, `/toolchain`) and streams its output line by line;
//! [`isolation`] is the seam behind it (namespaces by default, bubblewrap, or another provider).
//! [`scheduler`] is the scale-out queue: jobs in PostgreSQL, claimed under a lease by `rba
//! worker` processes that run them through the same [`runner::Executor::submit`].
pub mod action;
pub mod caches;
pub mod cargo;
pub mod cgroup;
pub mod egress;
pub mod isolation;
pub mod logstream;
pub mod quota;
pub mod runner;
pub mod sandbox;
pub mod scheduler;
pub mod shared_units;
pub mod tenant;
pub mod toolchains;
pub mod workspace;
