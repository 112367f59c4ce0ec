//! The one error type of the `cas` crate. Every variant names the digest, path or entry that
//! caused it, so a server can turn it into a precise status and a user can act on it.

use std::path::PathBuf;

use crate::digest::{Digest, DigestError};

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum CasError {
    /// A digest could not be parsed.
    #[error(transparent)]
    Digest(#[from] DigestError),
    /// The blob is not in the store.
    #[error("blob {0:?} not found")]
    NotFound(Digest),
    /// More (or fewer) bytes arrived than the digest's size says.
    #[error("size mismatch for {expected:?}: received {actual} bytes")]
    SizeMismatch {
        /// The digest the writer promised.
        expected: Digest,
        /// Bytes actually received (so far, if too many).
        actual: u64,
    },
    /// The bytes hash to something else than the promised digest.
    #[error("hash mismatch: expected {expected:?}, data hashes to {actual:?}")]
    HashMismatch {
        /// The digest the writer promised.
        expected: Digest,
        /// The digest of the data received.
        actual: Digest,
    },
    /// A blob is larger than the whole store may hold, or a limit of the request was exceeded.
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
    /// A read asked for an offset past the end of the blob.
    #[error("offset {offset} is past the end of {digest:?}")]
    OffsetOutOfRange {
        /// The blob read.
        digest: Digest,
        /// The offset asked for.
        offset: u64,
    },
    /// A stored message (a `Directory`, a `Tree`, an `ActionResult`) is not valid.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was being decoded or checked, e.g. "Directory abc…/12".
        what: String,
        /// Why it is refused.
        reason: String,
    },
    /// A hostile or malformed input archive or tree entry.
    #[error("refused entry {entry:?}: {reason}")]
    HostileEntry {
        /// The entry's name as given by the input.
        entry: String,
        /// Why it is refused.
        reason: String,
    },
    /// A filesystem operation failed.
    #[error("{context} {path}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A backend service or task could not do the work (a database or bucket unreachable or
    /// refusing, a worker task gone); the message names which and why.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The embedded database failed.
    #[error("index database: {0}")]
    Db(#[from] sled::Error),
}

impl CasError {
    /// Wraps an I/O error with what was done and where.
    pub fn io(context: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CasError::Io {
            context,
            path: path.into(),
            source,
        }
    }

    /// Builds an [`CasError::Invalid`].
    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        CasError::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// Builds a [`CasError::HostileEntry`].
    pub fn hostile(entry: impl Into<String>, reason: impl Into<String>) -> Self {
        CasError::HostileEntry {
            entry: entry.into(),
            reason: reason.into(),
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = CasError> = std::result::Result<T, E>;
