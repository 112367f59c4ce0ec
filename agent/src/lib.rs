//! The rust-build-agent operator node and the `rba` CLI (binary in `main.rs`).
//!
//! Today the crate holds the `rba` command, which runs cargo jobs on an embedded node (CAS +
//! sandboxed executor in-process). The libp2p sessions, WebSocket gateway, read-only HTTP and
//! the Tangle Blueprint runner come with their issues.
