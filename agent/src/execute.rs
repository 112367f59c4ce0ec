//! `POST /execute`: run a Rust snippet, or a binary the node built, in the sandbox and answer
//! with what it printed: for customers who want to run code, not only build it.
//!
//! ```json
//! {"language": "rust", "code": "fn main() { … }", "stdin": "…", "timeout": 10, "memory": "256M"}
//! {"artifact": "blake3:HEX/SIZE", "args": ["--flag"], "stdin": "…"}
//! → {"status": "success"|"error"|"timeout"|"memory", "exit_code", "stdout", "stderr",
//!    "stdout_truncated", "stderr_truncated", "execution_time_ms", "memory_usage_bytes",
//!    "compile_cached", "artifact"}
//! ```
//!
//! Why a module, and why this shape: execution is two jobs of the one job path, never a path of
//! its own.
//! 1. A snippet becomes a one-file crate (`Cargo.toml`, `Cargo.lock`, `src/main.rs`) stored as a
//!    Merkle tree and compiled by the ordinary cargo build job (release profile), so the same
//!    code twice is an action-cache hit and only runs (`compile_cached`). A compile error is
//!    status `error` with rustc's diagnostics as `stderr`.
//! 2. The binary runs as a command action whose input root holds it and the stdin bytes
//!    (`sh -c 'exec ./main "$@" < stdin'`), always executed (a run is not a pure function, so
//!    it is never served from the cache), in the sandbox with no network and the limits asked
//!    for, which the executor caps at the node's maxima. `timeout` and `memory` map to the
//!    job's wall-clock and memory limits; the process limit of every execution is
//!    [`ExecuteConfig::processes`], so a fork bomb ends as an error, not as a node outage.
//!
//! Output is the job's log, line by line, with terminal control sequences other than colours
//! removed (as every log of the node): a last line without a newline gets one.
//!
//! Input is a stranger's: the JSON is parsed strictly (unknown fields refused), every size is
//! bounded, a refusal is a 400 naming the field. Running needs a read-write token (it spends
//! the node's CPU); the tenant is the token's, as for every other face. At most
//! [`ExecuteConfig::max_concurrent_executions`] run at once, [`ExecuteConfig::max_queued`] more
//! wait, and beyond that the answer is 429 (`RESOURCE_EXHAUSTED`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rba_cas::merkle::TreeBuilder;
use rba_cas::{Digest, DigestFunction};
use rba_executor::action::store_action_with;
use rba_executor::cargo::{CargoJob, JobKind};
use rba_executor::runner::{ExecuteRequest, JobLimits, JobOutcome, JobStatus};
use rba_executor::sandbox::LimitKind;
use rba_executor::tenant::Tenant;
use rba_proto::reapi::{Command, Platform};
use serde::{Deserialize, Serialize};

use crate::node::NodeShared;

/// `[execute]` of the node config.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ExecuteConfig {
    /// Executions running at once.
    pub max_concurrent_executions: usize,
    /// Executions waiting for a turn; more are refused with 429.
    pub max_queued: usize,
    /// Bytes of stdout and of stderr kept in an answer; the rest is cut (and said so).
    pub output_cap_bytes: usize,
    /// Wall-clock seconds of a run when the request names none (the node's `[workers.limits]` still cap it).
    pub default_timeout_secs: u64,
    /// Memory of a run when the request names none.
    pub default_memory: String,
    /// Processes and threads of a run together.
    pub processes: u64,
}

impl Default for ExecuteConfig {
    fn default() -> Self {
        ExecuteConfig {
            max_concurrent_executions: 2,
            max_queued: 16,
            output_cap_bytes: 64 * 1024,
            default_timeout_secs: 10,
            default_memory: "256M".to_string(),
            processes: 64,
        }
    }
}

/// Bytes of `code`, at most.
const MAX_CODE_BYTES: usize = 256 * 1024;
/// Bytes of `stdin`, at most.
const MAX_STDIN_BYTES: usize = 1024 * 1024;
/// Arguments of an artifact run, at most, and bytes of each.
const MAX_ARGS: usize = 64;
const MAX_ARG_BYTES: usize = 4096;
/// The longest run a request may ask for (the node's `[workers.limits]` may allow less).
const MAX_TIMEOUT_SECS: u64 = 300;

/// The request body.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecuteBody {
    /// `rust` (the only language), with `code`.
    pub language: Option<String>,
    /// A `main.rs`.
    pub code: Option<String>,
    /// A binary the caller may read, by digest, instead of `code`.
    pub artifact: Option<String>,
    /// Arguments of the program.
    #[serde(default)]
    pub args: Vec<String>,
    /// Its standard input.
    #[serde(default)]
    pub stdin: String,
    /// Wall-clock seconds of the run.
    pub timeout: Option<u64>,
    /// Memory of the run (`256M`, `1G`, bytes).
    pub memory: Option<String>,
}

/// What to run, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Program {
    /// Compile this `main.rs` first.
    Rust(String),
    /// Run this stored binary.
    Artifact(Digest),
}

/// A request the node accepts.
#[derive(Clone, Debug)]
pub struct Execution {
    /// What runs.
    pub program: Program,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its standard input.
    pub stdin: Vec<u8>,
    /// Its limits.
    pub limits: JobLimits,
}

/// A refused request: the field and why (a 400).
#[derive(Debug, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct BadRequest {
    /// The JSON field at fault.
    pub field: &'static str,
    /// Why.
    pub reason: String,
}

fn bad(field: &'static str, reason: impl Into<String>) -> BadRequest {
    BadRequest {
        field,
        reason: reason.into(),
    }
}

impl ExecuteBody {
    /// Parses a request body strictly; the error names the field (serde's message does).
    pub fn parse(bytes: &[u8]) -> Result<ExecuteBody, BadRequest> {
        serde_json::from_slice(bytes).map_err(|e| bad("body", e.to_string()))
    }

    /// Checks every field against the bounds and the node's defaults.
    pub fn check(self, config: &ExecuteConfig) -> Result<Execution, BadRequest> {
        let program = match (self.code, self.artifact) {
            (Some(_), Some(_)) => return Err(bad("artifact", "give either code or artifact")),
            (None, None) => return Err(bad("code", "missing (or give artifact)")),
            (Some(code), None) => {
                match self.language.as_deref() {
                    Some("rust") | None => {}
                    Some(other) => {
                        return Err(bad(
                            "language",
                            format!("unknown language {other:?} (supported: rust)"),
                        ));
                    }
                }
                if code.len() > MAX_CODE_BYTES {
                    return Err(bad(
                        "code",
                        format!("{} bytes, more than {MAX_CODE_BYTES}", code.len()),
                    ));
                }
                Program::Rust(code)
            }
            (None, Some(artifact)) => {
                if self.language.is_some() {
                    return Err(bad("language", "only with code"));
                }
                let digest: Digest = artifact
                    .parse()
                    .map_err(|e| bad("artifact", format!("{artifact:?}: {e}")))?;
                Program::Artifact(digest)
            }
        };
        if self.stdin.len() > MAX_STDIN_BYTES {
            return Err(bad(
                "stdin",
                format!("{} bytes, more than {MAX_STDIN_BYTES}", self.stdin.len()),
            ));
        }
        if self.args.len() > MAX_ARGS {
            return Err(bad("args", format!("more than {MAX_ARGS} arguments")));
        }
        if let Some(arg) = self
            .args
            .iter()
            .find(|a| a.len() > MAX_ARG_BYTES || a.contains('\0'))
        {
            return Err(bad(
                "args",
                format!(
                    "an argument of {} bytes or with a NUL byte (at most {MAX_ARG_BYTES})",
                    arg.len()
                ),
            ));
        }
        let timeout = self.timeout.unwrap_or(config.default_timeout_secs);
        if !(1..=MAX_TIMEOUT_SECS).contains(&timeout) {
            return Err(bad(
                "timeout",
                format!("{timeout} seconds (1 to {MAX_TIMEOUT_SECS})"),
            ));
        }
        let memory = self.memory.as_deref().unwrap_or(&config.default_memory);
        let memory = rba_executor::runner::parse_size(memory)
            .map_err(|e| bad("memory", format!("{memory:?}: {e}")))?;
        if memory < 16 * 1024 * 1024 {
            return Err(bad("memory", "less than 16M"));
        }
        Ok(Execution {
            program,
            args: self.args,
            stdin: self.stdin.into_bytes(),
            limits: JobLimits {
                wall_time: Some(Duration::from_secs(timeout)),
                memory_bytes: Some(memory),
                max_processes: Some(config.processes),
                disk_bytes: None,
            },
        })
    }
}

/// The answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecuteAnswer {
    /// `success`, `error` (non-zero exit, compile error, a limit other than time and memory),
    /// `timeout` or `memory`.
    pub status: String,
    /// The program's exit code (-1 when it did not exit normally or did not run).
    pub exit_code: i32,
    /// Its standard output, up to the cap (lossy UTF-8).
    pub stdout: String,
    /// Its standard error, up to the cap; for a compile error, rustc's diagnostics.
    pub stderr: String,
    /// stdout was longer than the cap.
    pub stdout_truncated: bool,
    /// stderr was longer than the cap.
    pub stderr_truncated: bool,
    /// The cap, in bytes.
    pub output_cap_bytes: usize,
    /// Wall time of the run (not of the compilation).
    pub execution_time_ms: u64,
    /// Peak memory of the run's processes together.
    pub memory_usage_bytes: u64,
    /// The compilation was an action-cache hit (always true for an artifact).
    pub compile_cached: bool,
    /// The binary that ran, by digest: `{"artifact": …}` runs it again without compiling.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifact: Option<String>,
    /// What went wrong, when something did before or around the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Why an execution was not run at all.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError {
    /// The queue is full (429).
    #[error(
        "RESOURCE_EXHAUSTED: {running} executions running and {queued} queued (the node's limits)"
    )]
    Busy {
        /// Running now.
        running: usize,
        /// Waiting.
        queued: usize,
    },
    /// The artifact is not one the caller may read, or not stored (404, one answer for both).
    #[error("artifact {0:?} not found")]
    NoArtifact(Digest),
    /// The node failed (500).
    #[error("{0}")]
    Internal(String),
}

/// The node's gate: a semaphore for the runs and a count of those waiting.
#[derive(Debug)]
pub struct ExecuteGate {
    permits: Arc<tokio::sync::Semaphore>,
    queued: AtomicUsize,
    config: ExecuteConfig,
}

impl ExecuteGate {
    /// For `config`.
    pub fn new(config: ExecuteConfig) -> ExecuteGate {
        ExecuteGate {
            permits: Arc::new(tokio::sync::Semaphore::new(
                config.max_concurrent_executions.max(1),
            )),
            queued: AtomicUsize::new(0),
            config,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ExecuteConfig {
        &self.config
    }
}

/// The crate a snippet becomes. No dependencies: the lock file is what cargo would write.
const SNIPPET_MANIFEST: &str = "[package]\nname = \"snippet\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[[bin]]\nname = \"main\"\npath = \"src/main.rs\"\n";
const SNIPPET_LOCK: &str = "# This file is automatically @generated by Cargo.\n# It is not intended for manual editing.\nversion = 4\n\n[[package]]\nname = \"snippet\"\nversion = \"0.1.0\"\n";
/// Where the snippet's binary is among the build's artifacts.
const SNIPPET_BINARY: &str = "target/release/main";
/// The run's command: the program with its arguments, stdin from a file of the input root.
const RUN_SCRIPT: &str = "exec ./main \"$@\" < stdin";

/// Runs one execution for `tenant`, waiting for a turn within the node's bounds. `reads_all`:
/// the caller may run any stored binary (an operator's token); otherwise only binaries its
/// tenant may read (its own snippets' builds, results served to it).
pub async fn execute(
    node: &NodeShared,
    tenant: Tenant,
    reads_all: bool,
    execution: Execution,
) -> Result<ExecuteAnswer, ExecuteError> {
    let gate = &node.execute;
    let running = gate.config.max_concurrent_executions.max(1) - gate.permits.available_permits();
    let waiting = gate.queued.fetch_add(1, Ordering::SeqCst);
    if gate.permits.available_permits() == 0 && waiting >= gate.config.max_queued {
        gate.queued.fetch_sub(1, Ordering::SeqCst);
        return Err(ExecuteError::Busy {
            running,
            queued: waiting,
        });
    }
    let permit = gate.permits.clone().acquire_owned().await;
    gate.queued.fetch_sub(1, Ordering::SeqCst);
    let _permit = permit.map_err(|_| ExecuteError::Internal("the node is stopping".into()))?;

    let cap = gate.config.output_cap_bytes;
    let (binary, compile_cached) = match &execution.program {
        Program::Artifact(digest) => {
            let readable = reads_all
                || node
                    .cas
                    .reads
                    .may_read(tenant.as_str(), digest)
                    .map_err(|e| ExecuteError::Internal(e.to_string()))?;
            let stored = node
                .cas
                .blobs
                .find_missing(&[*digest])
                .map_err(|e| ExecuteError::Internal(e.to_string()))?
                .is_empty();
            if !(readable && stored) {
                return Err(ExecuteError::NoArtifact(*digest));
            }
            (*digest, true)
        }
        Program::Rust(code) => match compile(node, &tenant, code).await? {
            Ok(compiled) => compiled,
            Err(failed) => return Ok(compile_error(node, &failed, cap)),
        },
    };
    run(node, tenant, &execution, binary, compile_cached, cap).await
}

/// Builds the snippet; `Ok(Err(outcome))` when it did not compile.
async fn compile(
    node: &NodeShared,
    tenant: &Tenant,
    code: &str,
) -> Result<Result<(Digest, bool), JobOutcome>, ExecuteError> {
    let blobs = node.cas.blobs.clone();
    let code = code.to_string();
    let root = tokio::task::spawn_blocking(move || {
        let function = DigestFunction::Blake3;
        let mut tree = TreeBuilder::new(function);
        for (path, text) in [
            ("Cargo.toml", SNIPPET_MANIFEST),
            ("Cargo.lock", SNIPPET_LOCK),
            ("src/main.rs", code.as_str()),
        ] {
            let digest = blobs.put_bytes(function, text.as_bytes())?;
            tree.add_file(path, digest, false)?;
        }
        Ok::<_, rba_cas::CasError>(tree.finish(&blobs)?.root)
    })
    .await
    .map_err(|e| ExecuteError::Internal(e.to_string()))?
    .map_err(|e| ExecuteError::Internal(format!("storing the snippet: {e}")))?;
    let job = CargoJob {
        kind: JobKind::Build,
        release: true,
        extra_args: Vec::new(),
    };
    // One target dir per tenant for all its snippets: incremental, never shared.
    let handle = node
        .executor
        .submit_cargo_with_limits(&job, root, "execute", tenant.clone(), JobLimits::default())
        .await
        .map_err(|e| ExecuteError::Internal(format!("compiling: {e}")))?;
    let outcome = handle.wait().await;
    if outcome.status != JobStatus::Success {
        return Ok(Err((*outcome).clone()));
    }
    let binary = outcome
        .artifacts
        .iter()
        .find(|a| a.path == SNIPPET_BINARY)
        .map(|a| a.digest)
        .ok_or_else(|| ExecuteError::Internal("the build left no binary".into()))?;
    node.cas
        .reads
        .grant(tenant.as_str(), [&binary])
        .map_err(|e| ExecuteError::Internal(e.to_string()))?;
    Ok(Ok((binary, outcome.cache_hit)))
}

fn compile_error(node: &NodeShared, outcome: &JobOutcome, cap: usize) -> ExecuteAnswer {
    let log = outcome
        .log
        .as_ref()
        .map(|log| read_capped(node, &log.stderr, cap))
        .unwrap_or_default();
    ExecuteAnswer {
        status: "error".to_string(),
        exit_code: outcome.exit_code,
        stdout: String::new(),
        stderr: log.0,
        stdout_truncated: false,
        stderr_truncated: log.1,
        output_cap_bytes: cap,
        execution_time_ms: 0,
        memory_usage_bytes: 0,
        compile_cached: outcome.cache_hit,
        artifact: None,
        error: Some(
            outcome
                .error
                .clone()
                .unwrap_or_else(|| "the code did not compile".to_string()),
        ),
    }
}

async fn run(
    node: &NodeShared,
    tenant: Tenant,
    execution: &Execution,
    binary: Digest,
    compile_cached: bool,
    cap: usize,
) -> Result<ExecuteAnswer, ExecuteError> {
    let blobs = node.cas.blobs.clone();
    let (stdin, args) = (execution.stdin.clone(), execution.args.clone());
    let function = binary.function;
    let action = tokio::task::spawn_blocking(move || {
        let mut tree = TreeBuilder::new(function);
        tree.add_file("main", binary, true)?;
        tree.add_file("stdin", blobs.put_bytes(function, &stdin)?, false)?;
        let root = tree.finish(&blobs)?.root;
        let mut arguments = vec![
            "/bin/sh".to_string(),
            "-c".to_string(),
            RUN_SCRIPT.to_string(),
            "main".to_string(),
        ];
        arguments.extend(args);
        let command = Command {
            arguments,
            ..Default::default()
        };
        // A run is not a pure function and its output is the caller's alone: never cached
        // where another tenant (or a REAPI client naming the `execute` instance) is served.
        store_action_with(command, root, Platform::default(), &blobs, function, true)
            .map_err(|e| rba_cas::CasError::invalid("the run's action", e.to_string()))
    })
    .await
    .map_err(|e| ExecuteError::Internal(e.to_string()))?
    .map_err(|e| ExecuteError::Internal(format!("preparing the run: {e}")))?;
    let started = Instant::now();
    let handle = node
        .executor
        .submit(ExecuteRequest {
            instance: "execute".to_string(),
            action_digest: action.action_digest,
            skip_cache_lookup: true,
            workspace_identity: None,
            tenant,
            limits: execution.limits,
        })
        .await
        .map_err(|e| ExecuteError::Internal(format!("running: {e}")))?;
    let outcome = handle.wait().await;
    let took = started.elapsed();
    let (stdout, stdout_truncated) = outcome
        .log
        .as_ref()
        .map(|log| read_capped(node, &log.stdout, cap))
        .unwrap_or_default();
    let (stderr, stderr_truncated) = outcome
        .log
        .as_ref()
        .map(|log| read_capped(node, &log.stderr, cap))
        .unwrap_or_default();
    let status = if outcome.timed_out || outcome.limit == Some(LimitKind::WallTime) {
        "timeout"
    } else if outcome.limit == Some(LimitKind::Memory) {
        "memory"
    } else if outcome.status == JobStatus::Success {
        "success"
    } else {
        "error"
    };
    Ok(ExecuteAnswer {
        status: status.to_string(),
        exit_code: outcome.exit_code,
        stdout,
        stderr,
        stdout_truncated,
        stderr_truncated,
        output_cap_bytes: cap,
        execution_time_ms: took.as_millis() as u64,
        memory_usage_bytes: outcome.peak_memory_bytes.unwrap_or(0),
        compile_cached,
        artifact: Some(format!("{binary:?}")),
        error: outcome.error.clone(),
    })
}

/// A stored output blob as text, at most `cap` bytes (cut at a character boundary), and
/// whether it was cut.
fn read_capped(node: &NodeShared, digest: &Digest, cap: usize) -> (String, bool) {
    use std::io::Read;
    let Ok(reader) = node.cas.blobs.reader(digest, 0, 0) else {
        return (String::new(), false);
    };
    let mut bytes = Vec::with_capacity(cap.min(digest.size as usize));
    let _ = reader.take(cap as u64).read_to_end(&mut bytes);
    let truncated = digest.size > bytes.len() as u64;
    let mut text = String::from_utf8_lossy(&bytes).into_owned();
    if truncated {
        // A cut in the middle of a character shows as U+FFFD at the end: drop it.
        while text.ends_with('\u{FFFD}') {
            text.pop();
        }
    }
    (text, truncated)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(json: &str) -> Result<Execution, BadRequest> {
        ExecuteBody::parse(json.as_bytes())?.check(&ExecuteConfig::default())
    }

    #[test]
    fn requests_are_checked_field_by_field() {
        let ok = check(
            r#"{"language":"rust","code":"fn main(){}","stdin":"x","timeout":3,"memory":"64M"}"#,
        )
        .unwrap();
        assert_eq!(ok.program, Program::Rust("fn main(){}".into()));
        assert_eq!(ok.limits.wall_time, Some(Duration::from_secs(3)));
        assert_eq!(ok.limits.memory_bytes, Some(64 << 20));
        assert_eq!(ok.limits.max_processes, Some(64));
        for (json, field) in [
            (r#"{"code":"x","language":"python"}"#, "language"),
            (r#"{"stdin":"x"}"#, "code"),
            (r#"{"code":"x","artifact":"blake3:00/1"}"#, "artifact"),
            (r#"{"artifact":"../../etc/passwd"}"#, "artifact"),
            (r#"{"code":"x","timeout":0}"#, "timeout"),
            (r#"{"code":"x","timeout":100000}"#, "timeout"),
            (r#"{"code":"x","memory":"lots"}"#, "memory"),
            (r#"{"code":"x","memory":"1K"}"#, "memory"),
            (r#"{"code":"x","args":["a\u0000b"]}"#, "args"),
            (r#"{"code":"x","extra":1}"#, "body"),
            (r#"{"code":"#, "body"),
        ] {
            let error = check(json).unwrap_err();
            assert_eq!(error.field, field, "{json}: {error}");
        }
        let error = check(r#"{"code":"x","extra":1}"#).unwrap_err().to_string();
        assert!(error.contains("unknown field `extra`"), "{error}");
        let huge = format!(r#"{{"code":"{}"}}"#, "x".repeat(MAX_CODE_BYTES + 1));
        assert_eq!(check(&huge).unwrap_err().field, "code");
    }
}
