//! The REAPI v2 gRPC server over the `rba-cas` store.
//!
//! Not yet implemented (see the cache-server issue); the crate exists so the workspace has its
//! final shape.
