//! Turning store errors and malformed requests into the statuses REAPI names.
//!
//! - malformed digests, resource names, instance names, digest mismatches from the client:
//!   `INVALID_ARGUMENT`;
//! - absent blobs and action results: `NOT_FOUND`;
//! - blobs referenced but missing: `FAILED_PRECONDITION` with a `google.rpc.PreconditionFailure`
//!   detail, one `MISSING` violation per blob, subject `blobs/{hash}/{size}`;
//! - store full or a request over the server's limits: `RESOURCE_EXHAUSTED`;
//! - stored bytes that no longer match their digest: `DATA_LOSS`;
//! - anything else (disk, database): `INTERNAL`.

use rba_cas::{CasError, Digest, DigestError, DigestFunction};
use rba_proto::error_details::{ErrorDetails, PreconditionViolation, StatusExt};
use rba_proto::reapi;
use tonic::{Code, Status};

/// Maps an error from the store, raised while handling data the *client* sent.
pub fn from_cas(error: CasError) -> Status {
    match &error {
        CasError::Digest(_) => Status::invalid_argument(error.to_string()),
        CasError::NotFound(_) => Status::not_found(error.to_string()),
        CasError::SizeMismatch { .. } | CasError::HashMismatch { .. } => {
            Status::invalid_argument(error.to_string())
        }
        CasError::QuotaExceeded(_) => Status::resource_exhausted(error.to_string()),
        CasError::OffsetOutOfRange { .. } => Status::out_of_range(error.to_string()),
        CasError::Invalid { .. } | CasError::HostileEntry { .. } => {
            Status::invalid_argument(error.to_string())
        }
        CasError::Io { .. } | CasError::Db(_) => {
            tracing::error!(%error, "store failure");
            Status::internal(error.to_string())
        }
        CasError::Unavailable(_) => {
            tracing::warn!(%error, "store unavailable");
            Status::unavailable(error.to_string())
        }
    }
}

/// Maps an error raised while reading *stored* data back: a size or hash mismatch there means
/// the store lost data, not that the client lied.
pub fn from_cas_read(error: CasError) -> Status {
    match &error {
        CasError::SizeMismatch { .. } | CasError::HashMismatch { .. } => {
            tracing::error!(%error, "stored blob is corrupt");
            Status::data_loss(error.to_string())
        }
        CasError::Io { source, .. } if source.kind() == std::io::ErrorKind::UnexpectedEof => {
            tracing::error!(%error, "stored blob is truncated");
            Status::data_loss(error.to_string())
        }
        _ => from_cas(error),
    }
}

/// Maps an I/O error raised while streaming a stored blob.
pub fn from_read_io(digest: &Digest, error: std::io::Error) -> Status {
    if error.kind() == std::io::ErrorKind::UnexpectedEof {
        tracing::error!(?digest, "stored blob is shorter than its digest");
        Status::data_loss(format!("blob {digest:?} is truncated in the store"))
    } else {
        Status::internal(format!("reading {digest:?}: {error}"))
    }
}

/// Maps a digest parsing error.
pub fn from_digest(error: DigestError) -> Status {
    Status::invalid_argument(error.to_string())
}

/// The digest function a request names, as REAPI v2.3 specifies: `UNKNOWN` (0) means "infer
/// from the hash length", which for 64 hex characters is SHA-256.
pub fn digest_function(value: i32) -> Result<DigestFunction, Status> {
    DigestFunction::from_reapi(value).map_err(from_digest)
}

/// Converts a REAPI digest of the request's function.
pub fn digest(function: DigestFunction, digest: &reapi::Digest) -> Result<Digest, Status> {
    Digest::from_reapi(function, digest).map_err(from_digest)
}

/// Converts a required REAPI digest field, naming it when absent.
pub fn required_digest(
    function: DigestFunction,
    digest: Option<&reapi::Digest>,
    field: &'static str,
) -> Result<Digest, Status> {
    Digest::from_reapi_field(function, digest, field).map_err(from_digest)
}

/// The key of every action-keyed request (GetActionResult, UpdateActionResult, Execute): the
/// instance name checked, the digest function resolved and the action digest required.
pub fn action_key(
    instance_name: &str,
    digest_function: i32,
    action_digest: Option<&reapi::Digest>,
) -> Result<(DigestFunction, Digest), Status> {
    crate::resource_name::validate_instance_name(instance_name)?;
    let function = self::digest_function(digest_function)?;
    let action = required_digest(function, action_digest, "action_digest")?;
    Ok((function, action))
}

/// `FAILED_PRECONDITION` with a `PreconditionFailure` listing each missing blob.
pub fn missing_blobs(message: impl Into<String>, missing: &[Digest]) -> Status {
    let violations: Vec<PreconditionViolation> = missing
        .iter()
        .map(|digest| {
            PreconditionViolation::new(
                "MISSING",
                format!("blobs/{}/{}", digest.hash_hex(), digest.size),
                format!("blob {digest:?} is not in the CAS"),
            )
        })
        .collect();
    Status::with_error_details(
        Code::FailedPrecondition,
        message,
        ErrorDetails::with_precondition_failure(violations),
    )
}

/// A `google.rpc.Status` for per-item results of batch RPCs.
pub fn to_rpc(status: &Status) -> rba_proto::rpc::Status {
    rba_proto::rpc::Status {
        code: status.code() as i32,
        message: status.message().to_string(),
        details: vec![],
    }
}

/// A `google.rpc.Status` with the status's details (e.g. a `PreconditionFailure`), for
/// statuses carried inside messages such as `ExecuteResponse.status`.
pub fn to_rpc_with_details(status: &Status) -> rba_proto::rpc::Status {
    use rba_proto::Message;
    match rba_proto::rpc::Status::decode(status.details()) {
        Ok(decoded) if !status.details().is_empty() && decoded.code == status.code() as i32 => {
            decoded
        }
        _ => to_rpc(status),
    }
}

/// The `google.rpc.Status` of success.
pub fn rpc_ok() -> rba_proto::rpc::Status {
    rba_proto::rpc::Status {
        code: Code::Ok as i32,
        message: String::new(),
        details: vec![],
    }
}

/// Runs blocking work off the async workers: codec work (zstd, hashing) and the local tier's
/// upload writers. Store work proper goes through the seams, whose backends do their own.
pub async fn blocking<T, F>(work: F) -> Result<T, Status>
where
    F: FnOnce() -> Result<T, Status> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Status::internal(format!("worker task failed: {e}")))?
}
