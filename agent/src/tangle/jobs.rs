//! The blueprint's jobs and their router.
//!
//! | index | job | cargo |
//! |---|---|---|
//! | 0 | `compile_rust_project` | `build` (`build_target` `""`/`debug`, `release`), or `check`, `clippy` |
//! | 1 | `test_project` | `test` |
//! | 2 | `lint_project` | `clippy -- -D warnings` |
//! | 3 | `audit_project` | `audit` |
//! | 4 | `check_project` | `check` |
//! | 5 | `execute_code` | a snippet's `build --release` (cached), then a sandboxed run |
//!
//! Input: `TangleArg<(string zip_uri, string session_id, string build_target)>` (the flat or the
//! single-tuple ABI encoding, as the service manager contract accepts). `build_target` is `""`
//! (= `debug`), `debug` or `release` for every job, and also `check` or `clippy` for job 0,
//! exactly the contract's rule. `session_id` is a canonical lowercase UUID: the job's log stream
//! is reachable under it (WebSocket `/v1/sessions/{session_id}/events`, libp2p `Attach`).
//!
//! Job 5 input: `TangleArg<(string code, string artifact, string stdin, uint64 timeoutSecs,
//! uint64 memoryBytes)>` (the contract's `ExecuteInputs`): exactly one of `code` (a `main.rs`)
//! and `artifact` (a binary the caller may read, `blake3:<hex>/<size>`), 0 for the node's
//! default timeout and memory. It is the operation of `POST /execute` ([`crate::execute`]),
//! through the same checks and the same gate; its output is [`ExecutionResult`], with stdout
//! and stderr cut to [`CHAIN_OUTPUT_CAP`] bytes each (a result is posted on chain).
//!
//! Who builds: every call is a tenant of its own, `tangle:<service>/<caller address>` (the
//! caller the producer puts in `X-TANGLE-CALLER`), so callers of one service never share a
//! target dir nor are served each other's results built on one (see the executor runner's
//! "Results nobody else influenced"). An operator whose callers trust each other sets
//! `tangle.share_target_dir_per_service` (node config): every caller of a service is then the
//! one tenant `tangle:<service>/*`, one target dir per service. A call without a caller is
//! refused.
//!
//! Output: [`BuildResult`], always as `Ok`: a job that fails — bad input, a refused zip, a
//! compile error, a failing test — still returns a result with `status` 1 and a `message`,
//! because the consumer drops an `Err` and the call would stay pending on chain.

use std::time::Instant;

use alloy_primitives::FixedBytes;
use blueprint_sdk::Router;
use blueprint_sdk::extract::Context;
use blueprint_sdk::job::Job as _;
use blueprint_sdk::tangle::TangleLayer;
use blueprint_sdk::tangle::extract::{CallId, Caller, ServiceId, TangleArg, TangleResult};
use rba_contracts::Job;
use rba_executor::cargo::{CargoJob, JobKind};
use rba_executor::runner::{JobOutcome, JobStatus};
use rba_executor::tenant::Tenant;
use rba_proto::rba::v1::{JobOptions, Submit};

use super::TangleContext;
use super::fetch::import_zip;

alloy_sol_types::sol! {
    /// A job's result as posted on chain (`abi.encode` of the struct, i.e. one tuple).
    #[derive(Debug, PartialEq, Eq)]
    struct BuildResult {
        /// 0 success, 1 error (the job failed or could not run), 2 cancelled.
        uint8 status;
        /// cargo's exit code; -1 when cargo did not run (refused input, sandbox failure).
        int32 exitCode;
        /// From the job call to the end: fetching the zip, building, storing outputs.
        uint64 durationMs;
        /// Hash of the first executable artifact (BLAKE3 of `target/<profile>/<bin>`), zero when
        /// there is none.
        bytes32 binaryHash;
        /// The stored log in the node's CAS, `blake3:<hex>/<size>`; empty when nothing ran.
        string logDigest;
        /// Why the job failed, for people; empty on success.
        string message;
    }
}

alloy_sol_types::sol! {
    /// Job 5's result as posted on chain (`abi.encode` of the struct).
    #[derive(Debug, PartialEq, Eq)]
    struct ExecutionResult {
        /// 0 success, 1 error (non-zero exit, compile error, refused input), 2 timeout,
        /// 3 memory.
        uint8 status;
        /// The program's exit code; -1 when it did not exit normally or did not run.
        int32 exitCode;
        /// Wall time of the run (not of the compilation).
        uint64 executionTimeMs;
        /// Peak memory of the run's processes together.
        uint64 memoryUsageBytes;
        /// The compilation was an action-cache hit (always for an artifact).
        bool compileCached;
        /// The binary that ran (`blake3:<hex>/<size>`): a later call can run it by artifact.
        string artifact;
        /// Its standard output, at most CHAIN_OUTPUT_CAP bytes.
        string stdout;
        /// Its standard error (rustc's diagnostics for a compile error), at most
        /// CHAIN_OUTPUT_CAP bytes.
        string stderr;
        /// stdout or stderr was longer than what is here.
        bool outputTruncated;
        /// Why the call failed before or around the run; empty otherwise.
        string message;
    }
}

/// [`ExecutionResult::status`] of a run that timed out.
pub const STATUS_TIMEOUT: u8 = 2;
/// [`ExecutionResult::status`] of a run that hit its memory limit.
pub const STATUS_MEMORY: u8 = 3;

/// Bytes of stdout and of stderr an [`ExecutionResult`] carries (results are posted on chain,
/// where every byte costs gas); the full output is cut at the node's `[execute]` cap first.
pub const CHAIN_OUTPUT_CAP: usize = 4096;

/// [`BuildResult::status`] of a successful job.
pub const STATUS_SUCCESS: u8 = 0;
/// [`BuildResult::status`] of a failed job (cargo failed, or the job could not run).
pub const STATUS_ERROR: u8 = 1;
/// [`BuildResult::status`] of a cancelled job.
pub const STATUS_CANCELLED: u8 = 2;

/// Job index of `compile_rust_project`.
pub const COMPILE_RUST_PROJECT: u8 = Job::Compile.index();
/// Job index of `test_project`.
pub const TEST_PROJECT: u8 = Job::Test.index();
/// Job index of `lint_project`.
pub const LINT_PROJECT: u8 = Job::Lint.index();
/// Job index of `audit_project`.
pub const AUDIT_PROJECT: u8 = Job::Audit.index();
/// Job index of `check_project`.
pub const CHECK_PROJECT: u8 = Job::Check.index();
/// Job index of `execute_code`.
pub const EXECUTE_CODE: u8 = Job::Execute.index();

/// Job 5's input as the extractor decodes it: `(code, artifact, stdin, timeoutSecs,
/// memoryBytes)`.
pub type ExecuteInput = (String, String, String, u64, u64);

/// The job input as the extractor decodes it: `(zip_uri, session_id, build_target)`.
pub type JobInput = (String, String, String);

/// The router of the six jobs, each behind [`TangleLayer`] (which attaches the call and
/// service ids the consumer needs, and skips calls without them).
pub fn router(ctx: TangleContext) -> Router {
    Router::new()
        .route(
            COMPILE_RUST_PROJECT,
            compile_rust_project.layer(TangleLayer),
        )
        .route(TEST_PROJECT, test_project.layer(TangleLayer))
        .route(LINT_PROJECT, lint_project.layer(TangleLayer))
        .route(AUDIT_PROJECT, audit_project.layer(TangleLayer))
        .route(CHECK_PROJECT, check_project.layer(TangleLayer))
        .route(EXECUTE_CODE, execute_code.layer(TangleLayer))
        .with_context(ctx)
}

macro_rules! job {
    ($(#[$doc:meta])* $name:ident, $job:expr) => {
        $(#[$doc])*
        pub async fn $name(
            Context(ctx): Context<TangleContext>,
            CallId(call_id): CallId,
            ServiceId(service_id): ServiceId,
            caller: Option<Caller>,
            TangleArg((zip_uri, session_id, build_target)): TangleArg<JobInput>,
        ) -> TangleResult<BuildResult> {
            let call = Call {
                service_id,
                call_id,
                caller: caller.map(|c| c.as_address()),
            };
            TangleResult(run(&ctx, $job, call, &zip_uri, &session_id, &build_target).await)
        }
    };
}

job!(
    /// Job 0: `cargo build` (or `check`/`clippy` by `build_target`).
    compile_rust_project,
    Job::Compile
);
job!(
    /// Job 1: `cargo test`.
    test_project,
    Job::Test
);
job!(
    /// Job 2: `cargo clippy` with warnings denied.
    lint_project,
    Job::Lint
);
job!(
    /// Job 3: `cargo audit`.
    audit_project,
    Job::Audit
);
job!(
    /// Job 4: `cargo check`.
    check_project,
    Job::Check
);

/// Job 5: run a snippet (compiled first, through the cache) or a stored binary.
pub async fn execute_code(
    Context(ctx): Context<TangleContext>,
    CallId(call_id): CallId,
    ServiceId(service_id): ServiceId,
    caller: Option<Caller>,
    TangleArg(input): TangleArg<ExecuteInput>,
) -> TangleResult<ExecutionResult> {
    let call = Call {
        service_id,
        call_id,
        caller: caller.map(|c| c.as_address()),
    };
    TangleResult(run_execute(&ctx, call, input).await)
}

/// One job 5 call; never fails (failures are results).
pub async fn run_execute(ctx: &TangleContext, call: Call, input: ExecuteInput) -> ExecutionResult {
    let (code, artifact, stdin, timeout_secs, memory_bytes) = input;
    let Some(tenant) = tenant_of(&ctx.config, &call) else {
        return execution_refused(format!(
            "the job call names no caller ({})",
            Caller::METADATA_KEY
        ));
    };
    // The same request as a `POST /execute` body: one set of checks for both faces.
    let body = crate::execute::ExecuteBody {
        language: None,
        code: (!code.is_empty()).then_some(code),
        artifact: (!artifact.is_empty()).then_some(artifact),
        args: Vec::new(),
        stdin,
        timeout: (timeout_secs > 0).then_some(timeout_secs),
        memory: (memory_bytes > 0).then(|| memory_bytes.to_string()),
    };
    let execution = match body.check(ctx.node.execute.config()) {
        Ok(execution) => execution,
        Err(bad) => return execution_refused(bad.to_string()),
    };
    let answer = match crate::execute::execute(&ctx.node, tenant, false, execution).await {
        Ok(answer) => answer,
        Err(e) => return execution_refused(e.to_string()),
    };
    tracing::info!(
        service_id = call.service_id,
        call_id = call.call_id,
        status = %answer.status,
        exit_code = answer.exit_code,
        "tangle execution finished"
    );
    execution_result(answer)
}

/// An [`ExecutionResult`] for a call that did not run.
fn execution_refused(message: String) -> ExecutionResult {
    ExecutionResult {
        status: STATUS_ERROR,
        exitCode: -1,
        executionTimeMs: 0,
        memoryUsageBytes: 0,
        compileCached: false,
        artifact: String::new(),
        stdout: String::new(),
        stderr: String::new(),
        outputTruncated: false,
        message,
    }
}

/// The on-chain form of an execution's answer.
pub fn execution_result(answer: crate::execute::ExecuteAnswer) -> ExecutionResult {
    let status = match answer.status.as_str() {
        "success" => STATUS_SUCCESS,
        "timeout" => STATUS_TIMEOUT,
        "memory" => STATUS_MEMORY,
        _ => STATUS_ERROR,
    };
    let (stdout, stdout_cut) = cut(answer.stdout, CHAIN_OUTPUT_CAP);
    let (stderr, stderr_cut) = cut(answer.stderr, CHAIN_OUTPUT_CAP);
    ExecutionResult {
        status,
        exitCode: answer.exit_code,
        executionTimeMs: answer.execution_time_ms,
        memoryUsageBytes: answer.memory_usage_bytes,
        compileCached: answer.compile_cached,
        artifact: answer.artifact.unwrap_or_default(),
        stdout,
        stderr,
        outputTruncated: stdout_cut
            || stderr_cut
            || answer.stdout_truncated
            || answer.stderr_truncated,
        message: answer.error.unwrap_or_default(),
    }
}

/// `text` cut to at most `cap` bytes on a character boundary; whether it was cut.
fn cut(mut text: String, cap: usize) -> (String, bool) {
    if text.len() <= cap {
        return (text, false);
    }
    let mut end = cap;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    (text, true)
}

/// Where a job call comes from (the producer's metadata).
#[derive(Clone, Copy, Debug)]
pub struct Call {
    /// The service it was called on.
    pub service_id: u64,
    /// Its on-chain call id.
    pub call_id: u64,
    /// The account that called (`None` when the call carries no caller).
    pub caller: Option<alloy_primitives::Address>,
}

/// The tenant a call builds as: its caller within its service, or — when the operator shares
/// one target dir per service — the whole service. `None` without a caller.
pub fn tenant_of(config: &super::TangleConfig, call: &Call) -> Option<Tenant> {
    if config.share_target_dir_per_service {
        return Some(Tenant::tangle(call.service_id, "*"));
    }
    call.caller
        .map(|caller| Tenant::tangle(call.service_id, caller))
}

/// True for `8-4-4-4-12` lowercase hex digits (what the contract accepts).
pub fn is_canonical_uuid(text: &str) -> bool {
    text.len() == 36
        && text.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_digit() || ('a'..='f').contains(&c),
        })
}

/// The cargo job for a job index and `build_target` (the contract's rules).
pub fn cargo_job(job: Job, build_target: &str) -> Result<CargoJob, String> {
    let release = match build_target {
        "" | "debug" => false,
        "release" => true,
        "check" | "clippy" if job == Job::Compile => false,
        "check" | "clippy" => {
            return Err(format!(
                "build_target {build_target:?} is only allowed for job 0 (compile)"
            ));
        }
        other => {
            return Err(format!(
                "unknown build_target {other:?} (expected \"\", debug, release, check or clippy)"
            ));
        }
    };
    let kind = match (job, build_target) {
        (Job::Compile, "check") => JobKind::Check,
        (Job::Compile, "clippy") => JobKind::Clippy,
        (Job::Compile, _) => JobKind::Build,
        (Job::Test, _) => JobKind::Test,
        (Job::Lint, _) => JobKind::Clippy,
        (Job::Audit, _) => JobKind::Audit,
        (Job::Check, _) => JobKind::Check,
        (Job::Execute, _) => {
            return Err("job 5 (execute_code) runs code; it takes no zip or build target".into());
        }
    };
    Ok(CargoJob {
        kind,
        release,
        extra_args: Vec::new(),
    })
}

fn refused(started: Instant, message: impl Into<String>) -> BuildResult {
    BuildResult {
        status: STATUS_ERROR,
        exitCode: -1,
        durationMs: started.elapsed().as_millis() as u64,
        binaryHash: FixedBytes::ZERO,
        logDigest: String::new(),
        message: message.into(),
    }
}

/// The result of a finished job.
pub fn result_of(outcome: &JobOutcome, kind: JobKind, started: Instant) -> BuildResult {
    let status = match outcome.status {
        JobStatus::Success => STATUS_SUCCESS,
        JobStatus::Failed | JobStatus::Error => STATUS_ERROR,
        JobStatus::Cancelled => STATUS_CANCELLED,
    };
    let message = match (&outcome.error, outcome.status) {
        (Some(error), _) => error.clone(),
        (None, JobStatus::Success) => String::new(),
        (None, JobStatus::Failed) => {
            format!("cargo {} exited with {}", kind.name(), outcome.exit_code)
        }
        (None, JobStatus::Error) => "the job could not run".to_string(),
        (None, JobStatus::Cancelled) => "cancelled".to_string(),
    };
    BuildResult {
        status,
        exitCode: outcome.exit_code,
        durationMs: started.elapsed().as_millis() as u64,
        binaryHash: outcome
            .artifacts
            .iter()
            .find(|a| a.executable)
            .map(|a| FixedBytes(a.digest.hash))
            .unwrap_or(FixedBytes::ZERO),
        logDigest: outcome
            .log
            .as_ref()
            .map(|l| format!("{:?}", l.log))
            .unwrap_or_default(),
        message,
    }
}

/// One job call, start to end; never fails (failures are results).
pub async fn run(
    ctx: &TangleContext,
    job: Job,
    call: Call,
    zip_uri: &str,
    session_id: &str,
    build_target: &str,
) -> BuildResult {
    let started = Instant::now();
    let Call {
        service_id,
        call_id,
        ..
    } = call;
    let Some(tenant) = tenant_of(&ctx.config, &call) else {
        return refused(
            started,
            format!("the job call names no caller ({})", Caller::METADATA_KEY),
        );
    };
    if !is_canonical_uuid(session_id) {
        return refused(
            started,
            format!("session_id {session_id:?} is not a canonical lowercase UUID"),
        );
    }
    let cargo = match cargo_job(job, build_target) {
        Ok(cargo) => cargo,
        Err(message) => return refused(started, message),
    };
    // One job per session id and caller; another caller's use of the same (public) id is
    // no conflict: each reads only its own.
    let owns = |owner: Option<&str>| owner == Some(tenant.as_str());
    if ctx.node.resolve_session(session_id, owns).await.is_some() {
        return refused(
            started,
            format!("session_id {session_id} is already in use by this caller"),
        );
    }
    let root = match import_zip(ctx, zip_uri, &tenant).await {
        Ok(root) => root,
        Err(e) => {
            tracing::warn!(job = job.name(), service_id, call_id, error = %e, "zip_uri refused");
            return refused(started, format!("zip_uri: {e}"));
        }
    };
    let submit = Submit {
        kind: cargo.kind.to_proto() as i32,
        options: Some(JobOptions {
            release: cargo.release,
            extra_args: Vec::new(),
        }),
        input_root: Some(root.to_wire()),
        workspace_hint: format!("tangle-service-{service_id}"),
        limits: None,
    };
    let handle = match ctx.node.submit(None, tenant, submit).await {
        Ok(handle) => handle,
        Err(refusal) => {
            return refused(started, format!("{}: {}", refusal.code, refusal.message));
        }
    };
    if !ctx.node.alias_session(session_id, &handle.id).await {
        // A call of the same caller took this session id while we were fetching: ours runs
        // anyway (the chain paid for it) but cannot be watched under that id.
        tracing::warn!(session_id, job_id = %handle.id, "session id taken meanwhile");
    }
    tracing::info!(
        job = job.name(),
        service_id,
        call_id,
        session_id,
        job_id = %handle.id,
        root = ?root,
        "tangle job started"
    );
    let outcome = handle.wait().await;
    let result = result_of(&outcome, cargo.kind, started);
    tracing::info!(
        job = job.name(),
        service_id,
        call_id,
        session_id,
        status = result.status,
        exit_code = result.exitCode,
        "tangle job finished"
    );
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids() {
        assert!(is_canonical_uuid("123e4567-e89b-42d3-a456-426614174000"));
        assert!(!is_canonical_uuid("123E4567-E89B-42D3-A456-426614174000"));
        assert!(!is_canonical_uuid("123e4567e89b42d3a456426614174000"));
        assert!(!is_canonical_uuid("123e4567-e89b-42d3-a456-42661417400g"));
        assert!(!is_canonical_uuid(""));
    }

    #[test]
    fn build_targets_follow_the_contract() {
        assert_eq!(cargo_job(Job::Compile, "").unwrap().kind, JobKind::Build);
        assert!(cargo_job(Job::Compile, "release").unwrap().release);
        assert_eq!(
            cargo_job(Job::Compile, "check").unwrap().kind,
            JobKind::Check
        );
        assert_eq!(
            cargo_job(Job::Compile, "clippy").unwrap().kind,
            JobKind::Clippy
        );
        assert_eq!(cargo_job(Job::Lint, "").unwrap().kind, JobKind::Clippy);
        assert_eq!(cargo_job(Job::Audit, "").unwrap().kind, JobKind::Audit);
        assert!(cargo_job(Job::Test, "release").unwrap().release);
        assert!(cargo_job(Job::Test, "clippy").is_err());
        assert!(cargo_job(Job::Compile, "fast").is_err());
        for target in rba_contracts::BUILD_TARGETS {
            assert!(cargo_job(Job::Compile, target).is_ok());
        }
    }

    #[test]
    fn execution_output_is_cut_on_a_character_boundary() {
        assert_eq!(cut("héllo".into(), 2), ("h".to_string(), true));
        assert_eq!(cut("hello".into(), 5), ("hello".to_string(), false));
    }

    #[test]
    fn result_abi_round_trip() {
        use alloy_sol_types::SolValue;
        let result = BuildResult {
            status: STATUS_ERROR,
            exitCode: 101,
            durationMs: 1234,
            binaryHash: FixedBytes([7; 32]),
            logDigest: "blake3:ab/1".into(),
            message: "cargo build exited with 101".into(),
        };
        let bytes = result.abi_encode();
        assert_eq!(BuildResult::abi_decode(&bytes).unwrap(), result);
    }
}
