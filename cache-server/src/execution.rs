//! `build.bazel.remote.execution.v2.Execution` and `google.longrunning.Operations`, over the
//! executor's one job path ([`Executor::submit`]).
//!
//! This module only translates: the executor looks the action cache up, queues, materialises
//! the input root, runs the Command in its sandbox, collects `output_paths` into the CAS, stores
//! the ActionResult and streams the output. Here:
//!
//! - **Execute** checks the request (instance, digest function, action digest:
//!   `INVALID_ARGUMENT` when malformed, or when the Command's output paths or working directory
//!   could leave the exec root: `..`, a leading `/`…) and that the Action, its Command and every
//!   blob of its input root are in the CAS. Missing ones end the stream at once with an `ExecuteResponse`
//!   whose status is `FAILED_PRECONDITION` with a `PreconditionFailure` (`MISSING`,
//!   `blobs/{hash}/{size}` per blob), as the spec asks, so the client uploads and retries.
//!   With tokens, inputs the caller may not read count as missing (running another tenant's
//!   input root would hand its contents over), and the final response's blobs (outputs, trees,
//!   stdout/stderr, the log) are granted to the caller before it is sent (also to a
//!   WaitExecution caller).
//!   Otherwise it submits the job and streams `Operation`s named
//!   `{instance}/operations/{job id}` (`operations/{job id}` for the empty instance): one per
//!   stage (`QUEUED`, `EXECUTING`, `COMPLETED`), the current one again every
//!   [`KEEPALIVE`] so idle streams stay open, and a final `done` one whose response is the
//!   `ExecuteResponse`. A command that runs and exits non-zero is status `OK` with that
//!   `exit_code`; a wall-time kill is `DEADLINE_EXCEEDED` (with the partial result); a
//!   cancelled job is `CANCELLED`; a job that could not run is `INTERNAL`.
//! - **WaitExecution** resumes that stream for an operation the executor still knows (jobs
//!   are kept for [`rba_executor::runner::JOB_RETENTION`] after they end).
//! - **Operations**: GetOperation (a snapshot), ListOperations (the operations of the instance
//!   named by `{instance}/operations`, no paging), WaitOperation (until done or the timeout,
//!   at most [`MAX_WAIT`]), CancelOperation ([`rba_executor::runner::JobHandle::cancel`]: a
//!   queued job never starts, a running sandbox is killed) and DeleteOperation (forgets it;
//!   a running job still finishes and caches its result).
//! - **Ownership**: every operation belongs to the tenant that started it (`token:NAME` of the
//!   caller's bearer token, `anonymous` on a server without tokens). WaitExecution, the
//!   Operations calls and live output answer only callers that may see that tenant
//!   ([`crate::auth::Caller::may_see`]); to anyone else the operation does not exist
//!   (`NOT_FOUND`, the same answer as for an unknown id), so ids of other tenants' operations
//!   can neither be waited on, cancelled nor probed.
//! - **Live output**: `ExecuteOperationMetadata.stdout_stream_name` / `stderr_stream_name`
//!   are `{operation name}/stdout` and `/stderr`, readable through ByteStream ([`LiveOutput`]
//!   is its [`ReadSource`]) while the action runs and until the job is forgotten: the bytes
//!   arrive line by line as the command writes them, and the read ends when the job does.

use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, Stream};
use rba_cas::{CasError, Digest, Store, Stores};
use rba_executor::action::{ActionError, check_command_paths};
use rba_executor::logstream::LogStreamKind;
use rba_executor::runner::Executor;
use rba_executor::runner::{self, ExecutorError, JobHandle, JobOutcome, JobState, JobStatus};
use rba_executor::tenant::Tenant;
use rba_proto::Message;
use rba_proto::longrunning::operations_server::Operations;
use rba_proto::longrunning::{
    CancelOperationRequest, DeleteOperationRequest, GetOperationRequest, ListOperationsRequest,
    ListOperationsResponse, Operation, WaitOperationRequest, operation,
};
use rba_proto::protobuf::{Any, Empty};
use rba_proto::reapi::execution_server::Execution;
use rba_proto::reapi::{
    self, ExecuteOperationMetadata, ExecuteResponse, LogFile, WaitExecutionRequest, execution_stage,
};
use tonic::{Code, Request, Response, Status};

use crate::auth::Caller;
use crate::bytestream::{ReadChunks, ReadSource};
use crate::server::ServerState;
use crate::status;
use crate::{auth, resource_name};

/// The path segment between an instance name and an operation id.
pub const OPERATIONS_SEGMENT: &str = "operations";
/// An Execute/WaitExecution stream repeats the current operation this often while nothing
/// changes, so proxies and clients never see an idle stream.
pub const KEEPALIVE: Duration = Duration::from_secs(30);
/// The longest WaitOperation waits.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// Largest Action message decoded while checking inputs.
const MAX_ACTION_BYTES: u64 = 4 << 20;
/// Bytes of live output gathered into one ReadResponse when they are already written.
const LIVE_CHUNK: usize = 64 << 10;

const METADATA_TYPE: &str = "build.bazel.remote.execution.v2.ExecuteOperationMetadata";
const RESPONSE_TYPE: &str = "build.bazel.remote.execution.v2.ExecuteResponse";

/// A stream of Operations.
pub type OperationStream = Pin<Box<dyn Stream<Item = Result<Operation, Status>> + Send>>;

/// The operation name of a job: `{instance}/operations/{id}`, or `operations/{id}`.
pub fn operation_name(instance: &str, job_id: &str) -> String {
    if instance.is_empty() {
        format!("{OPERATIONS_SEGMENT}/{job_id}")
    } else {
        format!("{instance}/{OPERATIONS_SEGMENT}/{job_id}")
    }
}

/// The ByteStream resource name of a job's live stdout or stderr.
pub fn stream_name(instance: &str, job_id: &str, kind: LogStreamKind) -> String {
    format!("{}/{}", operation_name(instance, job_id), kind.name())
}

/// Splits an operation name into (instance, job id). A bare job id is accepted too.
pub fn parse_operation_name(name: &str) -> Result<(String, String), Status> {
    let invalid = |reason: &str| {
        Status::invalid_argument(format!("invalid operation name {name:?}: {reason}"))
    };
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name.len() > resource_name::MAX_RESOURCE_NAME_LEN {
        return Err(invalid("too long"));
    }
    let segments: Vec<&str> = name.split('/').collect();
    let (instance, id) = match segments.iter().position(|s| *s == OPERATIONS_SEGMENT) {
        Some(at) if at + 2 == segments.len() => (segments[..at].join("/"), segments[at + 1]),
        Some(_) => return Err(invalid("expected {instance}/operations/{id}")),
        None if segments.len() == 1 => (String::new(), name),
        None => return Err(invalid("expected {instance}/operations/{id}")),
    };
    if id.is_empty() {
        return Err(invalid("empty operation id"));
    }
    resource_name::validate_instance_name(&instance)?;
    Ok((instance, id.to_string()))
}

/// Splits a live-output resource name into (instance, job id, stream); `None` when the name is
/// not one.
pub fn parse_stream_name(name: &str) -> Option<(String, String, LogStreamKind)> {
    let (operation, stream) = name.rsplit_once('/')?;
    let kind = match stream {
        "stdout" => LogStreamKind::Stdout,
        "stderr" => LogStreamKind::Stderr,
        _ => return None,
    };
    if !operation.split('/').any(|s| s == OPERATIONS_SEGMENT) {
        return None;
    }
    let (instance, id) = parse_operation_name(operation).ok()?;
    Some((instance, id, kind))
}

/// Packs a message into a `google.protobuf.Any`.
pub fn pack<M: Message>(type_name: &str, message: &M) -> Any {
    Any {
        type_url: format!("type.googleapis.com/{type_name}"),
        value: message.encode_to_vec(),
    }
}

/// What the Execution and Operations services share.
#[derive(Clone, Debug)]
struct Shared {
    state: ServerState,
    executor: Executor,
}

impl Shared {
    /// The job of an operation name, if the executor knows it, it was submitted by a tenant
    /// `caller` may see, and under the named instance (a bare id names it whatever its
    /// instance). Anything else is the same `NOT_FOUND`. The executor's job registry is the
    /// one table of jobs: its handles carry their instance and tenant.
    async fn lookup(&self, name: &str, caller: &Caller) -> Result<JobHandle, Status> {
        let (instance, id) = parse_operation_name(name)?;
        let not_found = || Status::not_found(format!("no operation {name:?} (unknown or expired)"));
        // On a scale-out front end, an operation another front end dispatched is followed
        // here (`Executor::find_job`), if the caller may see its tenant.
        let handle = self
            .executor
            .find_job(&id, |tenant| caller.may_see(tenant.as_str()))
            .await
            .map_err(|error| match error {
                ExecutorError::Queue(reason) => Status::unavailable(format!(
                    "looking up operation {name:?} in the job queue: {reason}"
                )),
                other => submit_status(other),
            })?
            .ok_or_else(not_found)?;
        if !caller.may_see(handle.tenant.as_str()) {
            tracing::debug!(operation = %id, owner = %handle.tenant, caller = %caller.tenant(), "operation of another tenant");
            return Err(not_found());
        }
        let bare = !name.contains('/');
        if !bare && handle.instance != instance {
            return Err(not_found());
        }
        Ok(handle)
    }
}

/// The Execution service.
#[derive(Clone, Debug)]
pub struct ExecutionService {
    shared: Shared,
}

/// The google.longrunning Operations service over the same jobs.
#[derive(Clone, Debug)]
pub struct OperationsService {
    shared: Shared,
}

/// The Execution service, the Operations service and the live-output reader over one
/// executor and its job registry.
#[derive(Clone, Debug)]
pub struct ExecutionServices {
    /// `build.bazel.remote.execution.v2.Execution`.
    pub execution: ExecutionService,
    /// `google.longrunning.Operations`.
    pub operations: OperationsService,
    /// The ByteStream [`ReadSource`] of live stdout/stderr.
    pub live_output: LiveOutput,
}

/// The services over `executor`, which must run on `state`'s store.
pub fn services(state: ServerState, executor: Executor) -> ExecutionServices {
    let shared = Shared { state, executor };
    ExecutionServices {
        execution: ExecutionService {
            shared: shared.clone(),
        },
        operations: OperationsService {
            shared: shared.clone(),
        },
        live_output: LiveOutput { shared },
    }
}

impl ExecutionService {
    async fn start(
        &self,
        request: Request<reapi::ExecuteRequest>,
    ) -> Result<OperationStream, Status> {
        // Running an action writes the action cache.
        auth::require_ac_write(&request)?;
        let tenant = auth::caller(&request).tenant();
        let scope = auth::read_scope(&request);
        let grantee = auth::grantee(&request);
        let request = request.into_inner();
        let (_, action) = status::action_key(
            &request.instance_name,
            request.digest_function,
            request.action_digest.as_ref(),
        )?;
        let instance = request.instance_name;

        // The server's stores are the executor's own (checked when the server was built).
        let stores = &self.shared.state.stores;
        let missing = lacking_inputs(stores, &scope, &action).await?;
        if !missing.is_empty() {
            return Ok(precondition_failure(&instance, &action, &missing));
        }
        let submitted = self
            .shared
            .executor
            .submit(runner::ExecuteRequest {
                instance: instance.clone(),
                action_digest: action,
                skip_cache_lookup: request.skip_cache_lookup,
                workspace_identity: None,
                // The token's tenant; `anonymous` only on a server without tokens.
                tenant,
                // The client's limits come as platform properties of the Action.
                limits: Default::default(),
            })
            .await;
        let handle = match submitted {
            Ok(handle) => handle,
            // Evicted between the check and the submission.
            Err(ExecutorError::Action(ActionError::NotFound { digest, .. })) => {
                return Ok(precondition_failure(&instance, &action, &[digest]));
            }
            Err(error) => return Err(submit_status(error)),
        };
        tracing::debug!(job = %handle.id, ?action, %instance, "execute");
        Ok(operation_stream(handle, self.result_grant(grantee)))
    }

    async fn resume(
        &self,
        request: Request<WaitExecutionRequest>,
    ) -> Result<OperationStream, Status> {
        auth::require_read(&request)?;
        let caller = auth::caller(&request);
        let grantee = auth::grantee(&request);
        let handle = self.shared.lookup(&request.get_ref().name, &caller).await?;
        Ok(operation_stream(handle, self.result_grant(grantee)))
    }

    /// Who is granted the blobs of the result an operation stream delivers.
    fn result_grant(&self, grantee: Option<Tenant>) -> Option<ResultGrant> {
        grantee.map(|tenant| ResultGrant {
            stores: self.shared.state.stores.clone(),
            tenant,
        })
    }
}

#[tonic::async_trait]
impl Execution for ExecutionService {
    type ExecuteStream = OperationStream;
    type WaitExecutionStream = OperationStream;

    async fn execute(
        &self,
        request: Request<reapi::ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        self.shared
            .state
            .metrics
            .answer("Execute", self.start(request).await)
    }

    async fn wait_execution(
        &self,
        request: Request<WaitExecutionRequest>,
    ) -> Result<Response<Self::WaitExecutionStream>, Status> {
        self.shared
            .state
            .metrics
            .answer("WaitExecution", self.resume(request).await)
    }
}

#[tonic::async_trait]
impl Operations for OperationsService {
    async fn list_operations(
        &self,
        request: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        let result = (|| {
            auth::require_read(&request)?;
            let caller = auth::caller(&request);
            let name = &request.get_ref().name;
            let instance = match name.strip_suffix(OPERATIONS_SEGMENT) {
                Some(prefix) => prefix.trim_end_matches('/'),
                None => name.as_str(),
            };
            resource_name::validate_instance_name(instance)?;
            let mut operations: Vec<Operation> = self
                .shared
                .executor
                .jobs()
                .into_iter()
                .filter(|job| job.instance == instance && caller.may_see(job.tenant.as_str()))
                .map(|job| snapshot(&job, &job.state()))
                .collect();
            operations.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(ListOperationsResponse {
                operations,
                ..Default::default()
            })
        })();
        self.shared.state.metrics.answer("ListOperations", result)
    }

    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let result = async {
            auth::require_read(&request)?;
            let caller = auth::caller(&request);
            let handle = self.shared.lookup(&request.get_ref().name, &caller).await?;
            Ok(snapshot(&handle, &handle.state()))
        }
        .await;
        self.shared.state.metrics.answer("GetOperation", result)
    }

    async fn delete_operation(
        &self,
        request: Request<DeleteOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        let result = async {
            auth::require_ac_write(&request)?;
            let caller = auth::caller(&request);
            let handle = self.shared.lookup(&request.get_ref().name, &caller).await?;
            self.shared.executor.forget_job(&handle.id);
            Ok(Empty {})
        }
        .await;
        self.shared.state.metrics.answer("DeleteOperation", result)
    }

    async fn cancel_operation(
        &self,
        request: Request<CancelOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        let result = async {
            auth::require_ac_write(&request)?;
            let caller = auth::caller(&request);
            let handle = self.shared.lookup(&request.get_ref().name, &caller).await?;
            tracing::info!(job = %handle.id, "operation cancelled by the client");
            handle.cancel();
            Ok(Empty {})
        }
        .await;
        self.shared.state.metrics.answer("CancelOperation", result)
    }

    async fn wait_operation(
        &self,
        request: Request<WaitOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let result = async {
            auth::require_read(&request)?;
            let caller = auth::caller(&request);
            let request = request.into_inner();
            let handle = self.shared.lookup(&request.name, &caller).await?;
            let timeout = request
                .timeout
                .map(|t| Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32))
                .unwrap_or(MAX_WAIT)
                .min(MAX_WAIT);
            let _ = tokio::time::timeout(timeout, handle.wait()).await;
            Ok(snapshot(&handle, &handle.state()))
        }
        .await;
        self.shared.state.metrics.answer("WaitOperation", result)
    }
}

/// The Command and input root digests of the Action stored as `bytes`; `INVALID_ARGUMENT`
/// when it does not decode or lacks either.
fn action_inputs(action_digest: &Digest, bytes: &[u8]) -> Result<(Digest, Digest), Status> {
    let action = reapi::Action::decode(bytes).map_err(|e| {
        Status::invalid_argument(format!("blob {action_digest:?} is not a valid Action: {e}"))
    })?;
    let function = action_digest.function;
    let command = status::required_digest(
        function,
        action.command_digest.as_ref(),
        "Action.command_digest",
    )?;
    let root = status::required_digest(
        function,
        action.input_root_digest.as_ref(),
        "Action.input_root_digest",
    )?;
    Ok((command, root))
}

/// What the caller lacks of an action: the Action, its Command and every blob of its input
/// root that the store lacks or `scope` may not read (the two alike: inputs the caller may not
/// read are missing to it, since running another tenant's input root would hand its contents
/// to the caller). Nothing the caller may not read is opened: an Action or Command of another
/// tenant is listed unread, and a directory of another tenant's tree is listed without its
/// contents ([`rba_cas::tree_digests_readable_in`]), so the list tells the caller neither
/// whether such a blob exists nor what it holds. `INVALID_ARGUMENT` when a blob the caller may
/// read is malformed (an Action, a Command leaving the exec root, a Directory).
pub(crate) async fn lacking_inputs(
    stores: &Stores,
    scope: &auth::ReadScope,
    action_digest: &Digest,
) -> Result<Vec<Digest>, Status> {
    let (blobs, grants) = (stores.blobs().as_ref(), stores.grants().as_ref());
    if !scope
        .not_readable(grants, &[*action_digest])
        .await?
        .is_empty()
    {
        return Ok(vec![*action_digest]);
    }
    let bytes = match blobs.read_to_vec(action_digest, MAX_ACTION_BYTES).await {
        Ok(bytes) => bytes,
        Err(CasError::NotFound(_)) => return Ok(vec![*action_digest]),
        Err(CasError::QuotaExceeded(reason)) => {
            return Err(Status::invalid_argument(format!(
                "Action {action_digest:?}: {reason}"
            )));
        }
        Err(e) => return Err(status::from_cas_read(e)),
    };
    let (command, root) = action_inputs(action_digest, &bytes)?;
    let lacking = |digests: Vec<Digest>| async move {
        let mut lacking = blobs
            .find_missing(&digests)
            .await
            .map_err(status::from_cas)?;
        lacking.extend(scope.not_readable(grants, &digests).await?);
        Ok::<_, Status>(lacking)
    };
    let mut missing = lacking(vec![command, root]).await?;
    if !missing.contains(&command) {
        check_command(blobs, &command).await?;
    }
    if !missing.contains(&root) {
        let tree = match scope.tenants() {
            None => rba_cas::tree_digests_in(blobs, &root).await,
            Some(tenants) => {
                rba_cas::tree_digests_readable_in(blobs, &root, grants, &tenants).await
            }
        };
        match tree {
            Ok(all) => missing.extend(lacking(all).await?),
            Err(CasError::NotFound(directory)) => missing.push(directory),
            Err(e) => return Err(status::from_cas(e)),
        }
    }
    missing.sort_by_key(|d| d.hash_hex());
    missing.dedup();
    Ok(missing)
}

/// Refuses, with `INVALID_ARGUMENT` naming the path, a Command whose output paths or working
/// directory could leave the exec root, before anything happens on the host. The executor
/// refuses it too (the same check: [`check_command_paths`]); answering here keeps such a
/// request from ever reaching it.
async fn check_command(blobs: &dyn Store, digest: &Digest) -> Result<(), Status> {
    let bytes = match blobs.read_to_vec(digest, MAX_ACTION_BYTES).await {
        Ok(bytes) => bytes,
        Err(CasError::NotFound(_)) => return Ok(()),
        Err(CasError::QuotaExceeded(reason)) => {
            return Err(Status::invalid_argument(format!(
                "Command {digest:?}: {reason}"
            )));
        }
        Err(e) => return Err(status::from_cas_read(e)),
    };
    let command = reapi::Command::decode(bytes.as_slice()).map_err(|e| {
        Status::invalid_argument(format!("blob {digest:?} is not a valid Command: {e}"))
    })?;
    check_command_paths(&command)
        .map_err(|reason| Status::invalid_argument(format!("Command {digest:?}: {reason}")))
}

/// A submission the executor refused.
fn submit_status(error: ExecutorError) -> Status {
    match error {
        ExecutorError::Action(ActionError::Invalid { what, reason }) => {
            Status::invalid_argument(format!("invalid {what}: {reason}"))
        }
        ExecutorError::Action(ActionError::Cas(e)) | ExecutorError::Cas(e) => status::from_cas(e),
        // Shutting down: a client retries elsewhere or later.
        ExecutorError::Draining => Status::unavailable(error.to_string()),
        other => {
            tracing::error!(error = %other, "submitting an action failed");
            Status::internal(other.to_string())
        }
    }
}

/// The one-message stream of an Execute whose inputs are missing.
fn precondition_failure(instance: &str, action: &Digest, missing: &[Digest]) -> OperationStream {
    let status = status::missing_blobs(
        format!(
            "{} blob(s) of the action are not in the CAS; upload them and execute again",
            missing.len()
        ),
        missing,
    );
    let response = ExecuteResponse {
        status: Some(status::to_rpc_with_details(&status)),
        message: status.message().to_string(),
        ..Default::default()
    };
    let id = uuid::Uuid::new_v4().to_string();
    let operation = Operation {
        name: operation_name(instance, &id),
        metadata: Some(pack(
            METADATA_TYPE,
            &ExecuteOperationMetadata {
                stage: execution_stage::Value::Completed as i32,
                action_digest: Some(action.to_reapi()),
                digest_function: action.function.to_reapi() as i32,
                ..Default::default()
            },
        )),
        done: true,
        result: Some(operation::Result::Response(pack(RESPONSE_TYPE, &response))),
    };
    Box::pin(futures::stream::once(async move { Ok(operation) }))
}

/// The Operation describing a job in `state`.
fn snapshot(job: &JobHandle, state: &JobState) -> Operation {
    let instance = job.instance.as_str();
    let stage = match state {
        JobState::Queued { .. } => execution_stage::Value::Queued,
        JobState::Running { .. } => execution_stage::Value::Executing,
        JobState::Done(_) => execution_stage::Value::Completed,
    };
    let metadata = ExecuteOperationMetadata {
        stage: stage as i32,
        action_digest: Some(job.action_digest.to_reapi()),
        stdout_stream_name: stream_name(instance, &job.id, LogStreamKind::Stdout),
        stderr_stream_name: stream_name(instance, &job.id, LogStreamKind::Stderr),
        partial_execution_metadata: None,
        digest_function: job.action_digest.function.to_reapi() as i32,
    };
    let (done, result) = match state {
        JobState::Done(outcome) => (
            true,
            Some(operation::Result::Response(pack(
                RESPONSE_TYPE,
                &execute_response(outcome),
            ))),
        ),
        _ => (false, None),
    };
    Operation {
        name: operation_name(instance, &job.id),
        metadata: Some(pack(METADATA_TYPE, &metadata)),
        done,
        result,
    }
}

fn rpc_status(code: Code, message: impl Into<String>) -> rba_proto::rpc::Status {
    rba_proto::rpc::Status {
        code: code as i32,
        message: message.into(),
        details: vec![],
    }
}

/// The ExecuteResponse of a finished job.
pub fn execute_response(outcome: &JobOutcome) -> ExecuteResponse {
    let message = outcome.error.clone().unwrap_or_default();
    let status = match (outcome.status, &outcome.result) {
        (JobStatus::Success | JobStatus::Failed, Some(_)) if timed_out(outcome) => {
            rpc_status(Code::DeadlineExceeded, message.clone())
        }
        (JobStatus::Success | JobStatus::Failed, Some(_)) => status::rpc_ok(),
        (JobStatus::Cancelled, _) => rpc_status(Code::Cancelled, "the operation was cancelled"),
        (_, _) => rpc_status(
            Code::Internal,
            format!(
                "the action could not run: {}",
                outcome.error.as_deref().unwrap_or("unknown error")
            ),
        ),
    };
    let server_logs = outcome
        .log
        .as_ref()
        .map(|log| {
            HashMap::from([(
                "rba-log".to_string(),
                LogFile {
                    digest: Some(log.log.to_reapi()),
                    human_readable: false,
                },
            )])
        })
        .unwrap_or_default();
    ExecuteResponse {
        result: outcome.result.clone(),
        cached_result: outcome.cache_hit,
        status: Some(status),
        server_logs,
        message,
    }
}

/// Whether the sandbox killed the command at its wall-time limit.
fn timed_out(outcome: &JobOutcome) -> bool {
    outcome.timed_out
}

/// Operations for a job: the current one at once, then one per state change (or every
/// [`KEEPALIVE`]) until the final one.
/// The tenant a finished operation's result is served to: granted its blobs (outputs, trees,
/// stdout/stderr, the log) before it learns their digests.
struct ResultGrant {
    stores: Stores,
    tenant: Tenant,
}

impl ResultGrant {
    async fn grant(&self, job: &JobHandle, outcome: &JobOutcome) -> Result<(), Status> {
        let Some(result) = outcome.result.clone() else {
            return Ok(());
        };
        let function = job.action_digest.function;
        let logs: Vec<Digest> = outcome.log.iter().map(|log| log.log).collect();
        let mut blobs = self
            .stores
            .actions()
            .referenced_blobs(function, &result)
            .await
            .map_err(status::from_cas)?;
        blobs.extend(
            result
                .output_directories
                .iter()
                .filter_map(|d| Digest::from_reapi(function, d.tree_digest.as_ref()?).ok()),
        );
        blobs.extend(logs);
        self.stores
            .grants()
            .grant(self.tenant.as_str(), &blobs)
            .await
            .map_err(status::from_cas)
    }
}

fn operation_stream(job: JobHandle, grant: Option<ResultGrant>) -> OperationStream {
    Box::pin(async_stream::stream! {
        let mut state = job.watch();
        loop {
            let current = state.borrow_and_update().clone();
            if let (Some(grant), JobState::Done(outcome)) = (&grant, &current)
                && let Err(status) = grant.grant(&job, outcome).await
            {
                yield Err(status);
                break;
            }
            let operation = snapshot(&job, &current);
            let done = operation.done;
            yield Ok(operation);
            if done {
                break;
            }
            match tokio::time::timeout(KEEPALIVE, state.changed()).await {
                Ok(Ok(())) | Err(_) => {}
                Ok(Err(_)) => {
                    if !matches!(&*state.borrow(), JobState::Done(_)) {
                        yield Err(Status::internal("the job ended without an outcome"));
                        break;
                    }
                }
            }
        }
    })
}

/// ByteStream reads of `{instance}/operations/{id}/stdout` and `/stderr`: the job's output,
/// live, from the executor's log stream.
#[derive(Clone, Debug)]
pub struct LiveOutput {
    shared: Shared,
}

impl ReadSource for LiveOutput {
    fn read(
        &self,
        caller: &Caller,
        resource_name: &str,
        offset: u64,
        limit: u64,
    ) -> Option<Result<ReadChunks, Status>> {
        let (instance, id, kind) = parse_stream_name(resource_name)?;
        let (shared, caller, resource_name) = (
            self.shared.clone(),
            caller.clone(),
            resource_name.to_string(),
        );
        // The lookup may ask the job queue (a scale-out front end): it is the stream's first
        // step, its refusal the stream's one item.
        Some(Ok(Box::pin(async_stream::stream! {
            match shared.lookup(&operation_name(&instance, &id), &caller).await {
                Ok(job) => {
                    let mut bytes = live_bytes(job, kind, offset, limit);
                    while let Some(item) = futures::StreamExt::next(&mut bytes).await {
                        yield item;
                    }
                }
                Err(status) if status.code() == Code::NotFound => {
                    yield Err(Status::not_found(format!(
                        "no live output {resource_name:?} (unknown or expired operation)"
                    )));
                }
                Err(status) => yield Err(status),
            }
        })))
    }
}

/// The bytes of one stream of a job's log (each line followed by `\n`), from `offset`, at most
/// `limit` (0: all), as ReadResponses of what is already written, waiting for more until the
/// job ends.
fn live_bytes(job: JobHandle, kind: LogStreamKind, offset: u64, limit: u64) -> ReadChunks {
    Box::pin(async_stream::stream! {
        let mut reader = job.log.subscribe(0);
        let mut position = 0u64; // bytes of the stream seen so far
        let mut sent = 0u64;
        let mut chunk: Vec<u8> = Vec::new();
        let mut finished = false;
        while !finished {
            // Wait for one line, then take whatever else is already there.
            let mut next = reader.next().await;
            loop {
                let Some(line) = next else {
                    finished = true;
                    break;
                };
                if line.stream == kind {
                    let mut bytes = line.line.into_bytes();
                    bytes.push(b'\n');
                    let start = offset.saturating_sub(position).min(bytes.len() as u64) as usize;
                    position += bytes.len() as u64;
                    chunk.extend_from_slice(&bytes[start..]);
                }
                if chunk.len() >= LIVE_CHUNK {
                    break;
                }
                match reader.next().now_or_never() {
                    Some(line) => next = line,
                    None => break,
                }
            }
            if limit > 0 && sent + chunk.len() as u64 >= limit {
                chunk.truncate((limit - sent) as usize);
                finished = true;
            }
            if !chunk.is_empty() {
                sent += chunk.len() as u64;
                yield Ok(Bytes::from(std::mem::take(&mut chunk)));
            }
        }
        if offset > position && limit == 0 {
            yield Err(Status::out_of_range(format!(
                "read_offset {offset} is past the end of the {position}-byte output"
            )));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_names_round_trip() {
        assert_eq!(operation_name("ci/linux", "j1"), "ci/linux/operations/j1");
        assert_eq!(operation_name("", "j1"), "operations/j1");
        assert_eq!(
            parse_operation_name("ci/linux/operations/j1").unwrap(),
            ("ci/linux".to_string(), "j1".to_string())
        );
        assert_eq!(
            parse_operation_name("operations/j1").unwrap(),
            (String::new(), "j1".to_string())
        );
        assert_eq!(
            parse_operation_name("j1").unwrap(),
            (String::new(), "j1".to_string())
        );
        for bad in [
            "",
            "a/b",
            "operations/",
            "ci/operations/j1/x",
            "../operations/j",
        ] {
            assert_eq!(
                parse_operation_name(bad).unwrap_err().code(),
                Code::InvalidArgument,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn stream_names_round_trip() {
        let name = stream_name("ci", "j1", LogStreamKind::Stdout);
        assert_eq!(name, "ci/operations/j1/stdout");
        assert_eq!(
            parse_stream_name(&name),
            Some(("ci".into(), "j1".into(), LogStreamKind::Stdout))
        );
        assert_eq!(
            parse_stream_name("operations/j1/stderr"),
            Some((String::new(), "j1".into(), LogStreamKind::Stderr))
        );
        assert_eq!(parse_stream_name("ci/blobs/x/stdout"), None);
        assert_eq!(parse_stream_name("ci/operations/j1/log"), None);
    }

    #[test]
    fn non_zero_exit_is_ok_and_timeouts_are_deadline_exceeded() {
        let outcome = |status, error: Option<&str>| JobOutcome {
            status,
            exit_code: 3,
            result: Some(reapi::ActionResult {
                exit_code: 3,
                ..Default::default()
            }),
            cache_hit: false,
            duration: Duration::ZERO,
            log: None,
            artifacts: vec![],
            steps: vec![],
            step_end_lines: vec![],
            error: error.map(String::from),
            timed_out: error.is_some_and(|e| e.contains("WallTimeout")),
            limit: None,
            peak_memory_bytes: None,
        };
        let failed = execute_response(&outcome(JobStatus::Failed, None));
        assert_eq!(failed.status.unwrap().code, Code::Ok as i32);
        assert_eq!(failed.result.unwrap().exit_code, 3);
        let killed = execute_response(&outcome(JobStatus::Failed, Some("killed: WallTimeout")));
        assert_eq!(killed.status.unwrap().code, Code::DeadlineExceeded as i32);
        let mut cancelled = outcome(JobStatus::Cancelled, Some("job cancelled"));
        cancelled.result = None;
        assert_eq!(
            execute_response(&cancelled).status.unwrap().code,
            Code::Cancelled as i32
        );
    }
}
