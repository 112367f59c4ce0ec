//! The executor: turns cargo jobs and REAPI actions into sandboxed runs.
//!
//! [`sandbox`] runs one command in an isolated, resource-limited container (hakoniwa) with fixed
//! paths (`/workspace`, `/target`, `/cargo`, `/toolchain`) and streams its output line by line;
//! [`isolation`] is the seam behind it (namespaces by default, bubblewrap, or another provider).
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
pub mod shared_units;
pub mod tenant;
pub mod toolchains;
pub mod workspace;
