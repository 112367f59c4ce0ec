//! The stored forms of a job's request and outcome: what the job queue writes into its rows and
//! reads back, possibly in another process of another version.
//!
//! Why a form of its own: [`ExecuteRequest`] and [`JobOutcome`] are in-process types (a
//! [`Tenant`] cannot be built from a client's text, an `ActionResult` is a protobuf message).
//! This module is the one place that turns them into bytes and back; every field is named in
//! the JSON (`"v": 1` first), digests are in their text form (`sha256:HEX/SIZE`), the REAPI
//! `ActionResult` is stored beside the JSON as its protobuf encoding.
//!
//! Reading is strict: a row whose bytes are not this form (corrupted, written by an unknown
//! version) is an error naming what is wrong, which the queue turns into a failed job — never a
//! guess.

use std::time::Duration;

use rba_cas::Digest;
use rba_proto::Message;
use rba_proto::reapi::ActionResult;
use serde::{Deserialize, Serialize};

use crate::logstream::LogDigests;
use crate::runner::{Artifact, ExecuteRequest, JobLimits, JobOutcome, JobStatus};
use crate::sandbox::LimitKind;
use crate::tenant::Tenant;

/// The version of the stored forms this code writes and reads.
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredRequest {
    v: u32,
    instance: String,
    action_digest: String,
    skip_cache_lookup: bool,
    workspace_identity: Option<String>,
    tenant: String,
    limits: StoredLimits,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredLimits {
    wall_time: Option<Duration>,
    memory_bytes: Option<u64>,
    max_processes: Option<u64>,
    disk_bytes: Option<u64>,
}

/// The bytes of a request, for the queue's `request` column.
pub fn encode_request(request: &ExecuteRequest) -> Vec<u8> {
    let stored = StoredRequest {
        v: VERSION,
        instance: request.instance.clone(),
        action_digest: format!("{:?}", request.action_digest),
        skip_cache_lookup: request.skip_cache_lookup,
        workspace_identity: request.workspace_identity.clone(),
        tenant: request.tenant.as_str().to_string(),
        limits: StoredLimits {
            wall_time: request.limits.wall_time,
            memory_bytes: request.limits.memory_bytes,
            max_processes: request.limits.max_processes,
            disk_bytes: request.limits.disk_bytes,
        },
    };
    serde_json::to_vec(&stored).expect("a stored request serializes")
}

/// A request back from [`encode_request`]'s bytes; the error says what is wrong with them.
pub fn decode_request(bytes: &[u8]) -> Result<ExecuteRequest, String> {
    let stored: StoredRequest =
        serde_json::from_slice(bytes).map_err(|e| format!("not a stored request: {e}"))?;
    if stored.v != VERSION {
        return Err(format!(
            "stored request version {} (this worker reads version {VERSION})",
            stored.v
        ));
    }
    let action_digest: Digest = stored
        .action_digest
        .parse()
        .map_err(|e| format!("action digest: {e}"))?;
    Ok(ExecuteRequest {
        instance: stored.instance,
        action_digest,
        skip_cache_lookup: stored.skip_cache_lookup,
        workspace_identity: stored.workspace_identity,
        tenant: Tenant::from_stored(stored.tenant),
        limits: JobLimits {
            wall_time: stored.limits.wall_time,
            memory_bytes: stored.limits.memory_bytes,
            max_processes: stored.limits.max_processes,
            disk_bytes: stored.limits.disk_bytes,
        },
    })
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredOutcome {
    v: u32,
    status: JobStatus,
    exit_code: i32,
    cache_hit: bool,
    duration: Duration,
    log: Option<StoredLogDigests>,
    artifacts: Vec<StoredArtifact>,
    steps: Vec<(String, Duration)>,
    step_end_lines: Vec<u64>,
    error: Option<String>,
    timed_out: bool,
    limit: Option<LimitKind>,
    peak_memory_bytes: Option<u64>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredLogDigests {
    log: String,
    stdout: String,
    stderr: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredArtifact {
    path: String,
    digest: String,
    executable: bool,
}

/// The bytes of an outcome: the JSON of everything but the `ActionResult`, and the
/// `ActionResult`'s protobuf encoding (if there is one).
pub fn encode_outcome(outcome: &JobOutcome) -> (Vec<u8>, Option<Vec<u8>>) {
    let digest = |d: &Digest| format!("{d:?}");
    let stored = StoredOutcome {
        v: VERSION,
        status: outcome.status,
        exit_code: outcome.exit_code,
        cache_hit: outcome.cache_hit,
        duration: outcome.duration,
        log: outcome.log.map(|log| StoredLogDigests {
            log: digest(&log.log),
            stdout: digest(&log.stdout),
            stderr: digest(&log.stderr),
        }),
        artifacts: outcome
            .artifacts
            .iter()
            .map(|a| StoredArtifact {
                path: a.path.clone(),
                digest: digest(&a.digest),
                executable: a.executable,
            })
            .collect(),
        steps: outcome.steps.clone(),
        step_end_lines: outcome.step_end_lines.clone(),
        error: outcome.error.clone(),
        timed_out: outcome.timed_out,
        limit: outcome.limit,
        peak_memory_bytes: outcome.peak_memory_bytes,
    };
    let json = serde_json::to_vec(&stored).expect("a stored outcome serializes");
    (json, outcome.result.as_ref().map(|r| r.encode_to_vec()))
}

/// An outcome back from [`encode_outcome`]'s bytes; the error says what is wrong with them.
pub fn decode_outcome(json: &[u8], result: Option<&[u8]>) -> Result<JobOutcome, String> {
    let stored: StoredOutcome =
        serde_json::from_slice(json).map_err(|e| format!("not a stored outcome: {e}"))?;
    if stored.v != VERSION {
        return Err(format!(
            "stored outcome version {} (this reader knows version {VERSION})",
            stored.v
        ));
    }
    let digest = |what: &str, text: &str| {
        text.parse::<Digest>()
            .map_err(|e| format!("stored outcome, {what}: {e}"))
    };
    let log = match stored.log {
        Some(log) => Some(LogDigests {
            log: digest("log digest", &log.log)?,
            stdout: digest("stdout digest", &log.stdout)?,
            stderr: digest("stderr digest", &log.stderr)?,
        }),
        None => None,
    };
    let artifacts = stored
        .artifacts
        .into_iter()
        .map(|a| {
            Ok(Artifact {
                digest: digest(&format!("artifact {:?}", a.path), &a.digest)?,
                path: a.path,
                executable: a.executable,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let result = result
        .map(|bytes| ActionResult::decode(bytes).map_err(|e| format!("stored ActionResult: {e}")))
        .transpose()?;
    Ok(JobOutcome {
        status: stored.status,
        exit_code: stored.exit_code,
        result,
        cache_hit: stored.cache_hit,
        duration: stored.duration,
        log,
        artifacts,
        steps: stored.steps,
        step_end_lines: stored.step_end_lines,
        error: stored.error,
        timed_out: stored.timed_out,
        limit: stored.limit,
        peak_memory_bytes: stored.peak_memory_bytes,
    })
}

/// The outcome of a job that never ran to an end (the queue gave up on it, it could not
/// start): status `Error` with the reason.
pub fn error_outcome(error: String) -> JobOutcome {
    JobOutcome {
        status: JobStatus::Error,
        exit_code: -1,
        result: None,
        cache_hit: false,
        duration: Duration::ZERO,
        log: None,
        artifacts: Vec::new(),
        steps: Vec::new(),
        step_end_lines: Vec::new(),
        error: Some(error),
        timed_out: false,
        limit: None,
        peak_memory_bytes: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rba_cas::DigestFunction;

    fn request() -> ExecuteRequest {
        ExecuteRequest {
            instance: "it's \"main\"; DROP TABLE rba_jobs; --\0\u{1b}[2J".into(),
            action_digest: DigestFunction::Blake3.digest_of(b"action"),
            skip_cache_lookup: true,
            workspace_identity: Some("ws\0/../x".into()),
            tenant: Tenant::token("o'brien\0\\x00"),
            limits: JobLimits {
                wall_time: Some(Duration::from_millis(1500)),
                memory_bytes: Some(1 << 30),
                max_processes: None,
                disk_bytes: Some(7),
            },
        }
    }

    #[test]
    fn a_request_round_trips_whatever_its_text() {
        let original = request();
        let back = decode_request(&encode_request(&original)).unwrap();
        assert_eq!(back.instance, original.instance);
        assert_eq!(back.action_digest, original.action_digest);
        assert_eq!(back.skip_cache_lookup, original.skip_cache_lookup);
        assert_eq!(back.workspace_identity, original.workspace_identity);
        assert_eq!(back.tenant, original.tenant);
        assert_eq!(back.limits, original.limits);
    }

    #[test]
    fn corrupt_or_unknown_requests_are_errors_naming_the_problem() {
        assert!(
            decode_request(b"\xff\x00garbage")
                .unwrap_err()
                .contains("not a stored request")
        );
        let mut json: serde_json::Value =
            serde_json::from_slice(&encode_request(&request())).unwrap();
        json["v"] = 99.into();
        let err = decode_request(&serde_json::to_vec(&json).unwrap()).unwrap_err();
        assert!(err.contains("version 99"), "{err}");
        json["v"] = 1.into();
        json["action_digest"] = "sha256:zz/1".into();
        let err = decode_request(&serde_json::to_vec(&json).unwrap()).unwrap_err();
        assert!(err.contains("action digest"), "{err}");
    }

    #[test]
    fn an_outcome_round_trips() {
        let digest = DigestFunction::Sha256.digest_of(b"x");
        let outcome = JobOutcome {
            status: JobStatus::Failed,
            exit_code: 3,
            result: Some(ActionResult {
                exit_code: 3,
                ..Default::default()
            }),
            cache_hit: false,
            duration: Duration::from_millis(1234),
            log: Some(LogDigests {
                log: digest,
                stdout: digest,
                stderr: digest,
            }),
            artifacts: vec![Artifact {
                path: "target/debug/x".into(),
                digest,
                executable: true,
            }],
            steps: vec![("build".into(), Duration::from_secs(1))],
            step_end_lines: vec![4],
            error: Some("boom\0".into()),
            timed_out: true,
            limit: Some(LimitKind::Memory),
            peak_memory_bytes: Some(42),
        };
        let (json, result) = encode_outcome(&outcome);
        let back = decode_outcome(&json, result.as_deref()).unwrap();
        assert_eq!(back.status, outcome.status);
        assert_eq!(back.exit_code, 3);
        assert_eq!(back.result, outcome.result);
        assert_eq!(back.log, outcome.log);
        assert_eq!(back.artifacts, outcome.artifacts);
        assert_eq!(back.steps, outcome.steps);
        assert_eq!(back.step_end_lines, outcome.step_end_lines);
        assert_eq!(back.error, outcome.error);
        assert!(back.timed_out);
        assert_eq!(back.limit, Some(LimitKind::Memory));
        assert_eq!(back.peak_memory_bytes, Some(42));
        assert!(decode_outcome(b"{}", None).is_err());
    }
}
