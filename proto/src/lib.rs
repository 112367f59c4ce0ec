//! Wire messages of rust-build-agent, and the one set of REAPI types every crate uses.
//!
//! Two families live here:
//! - [`reapi`], [`bytestream`], [`longrunning`], [`rpc`]: the Bazel Remote Execution API v2 and
//!   the Google APIs it builds on, re-exported from `bazel-remote-apis` so that `cas`,
//!   `executor`, `cache-server` and `agent` never mix two generations of the same message.
//!   [`error_details`] adds the `google.rpc` detail messages (`PreconditionFailure`, …) that
//!   `bazel-remote-apis` lacks, from `tonic-types`.
//! - [`rba`]: our own protocols, compiled from `proto/rba/v1/*.proto` at build time by prost
//!   (parsed with `protox`, no system `protoc`): the libp2p session protocol
//!   (`/rba/session/1.0.0`) and the blob protocol (`/rba/cas/1.0.0`).
//!
//! Nothing in this crate does I/O; it only defines messages.

pub use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
pub use bazel_remote_apis::build::bazel::semver;
pub use bazel_remote_apis::google::bytestream;
pub use bazel_remote_apis::google::longrunning;
pub use bazel_remote_apis::google::protobuf;
pub use bazel_remote_apis::google::rpc;
pub use prost;
pub use prost::Message;

/// `google.rpc` error-detail messages and the helpers that attach them to a `tonic::Status`.
pub mod error_details {
    pub use tonic_types::{ErrorDetails, PreconditionViolation, StatusExt};
}

/// Our own wire protocols (`rba.v1`).
pub mod rba {
    /// Version 1 of the session and blob protocols.
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/rba.v1.rs"));
    }
}

/// Protocol identifiers as negotiated by libp2p.
pub mod protocol_ids {
    /// Job submission, attachment and log streaming.
    pub const SESSION: &str = "/rba/session/1.0.0";
    /// Blob upload and peer-to-peer blob fetch.
    pub const CAS: &str = "/rba/cas/1.0.0";
}
