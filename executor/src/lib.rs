//! The executor: turns cargo jobs and REAPI actions into sandboxed runs.
//!
//! Not yet implemented (see the executor issue); the crate exists so the workspace has its final
//! shape.
pub mod caches;
pub mod workspace;
