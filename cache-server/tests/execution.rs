//! The Execution and Operations services on a real server (loopback) with the real executor
//! and sandbox: commands with file and directory outputs, cache hits, non-zero exits, missing
//! and malformed inputs, WaitExecution and the Operations calls, cancellation, and live stdout
//! through ByteStream. Needs the sandbox's prerequisites (.ci/setup.d/sandbox.sh).

mod common;

use std::time::{Duration, Instant};

use common::*;
use rba_cache_server::execution::parse_operation_name;
use rba_cache_server::resource_name::{self, Compressor};
use rba_cas::{Digest, DigestFunction};
use rba_proto::Message;
use rba_proto::bytestream::ReadRequest;
use rba_proto::error_details::StatusExt;
use rba_proto::longrunning::{
    CancelOperationRequest, DeleteOperationRequest, GetOperationRequest, ListOperationsRequest,
    Operation, WaitOperationRequest, operation,
};
use rba_proto::reapi::{
    self, Action, Command, Directory, DirectoryNode, ExecuteOperationMetadata, ExecuteRequest,
    ExecuteResponse, FileNode, GetActionResultRequest, GetCapabilitiesRequest, Tree,
    WaitExecutionRequest, execution_stage,
};
use tonic::{Code, Status};

const INSTANCE: &str = "ci/exec";
const SHA: DigestFunction = DigestFunction::Sha256;

/// Uploads `files` as an input root (flat), the Command and the Action; returns the Action's
/// digest.
async fn store_action(
    c: &mut Clients,
    arguments: &[&str],
    output_paths: &[&str],
    files: &[(&str, &[u8])],
) -> Digest {
    let mut root = Directory::default();
    for (name, data) in files {
        let digest = c.put(INSTANCE, SHA, data).await;
        root.files.push(FileNode {
            name: name.to_string(),
            digest: Some(digest.to_reapi()),
            is_executable: false,
            ..Default::default()
        });
    }
    root.files.sort_by(|a, b| a.name.cmp(&b.name));
    let root = c.put(INSTANCE, SHA, &root.encode_to_vec()).await;
    let command = Command {
        arguments: arguments.iter().map(|s| s.to_string()).collect(),
        output_paths: output_paths.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let command = c.put(INSTANCE, SHA, &command.encode_to_vec()).await;
    action_over(c, command, root).await
}

async fn action_over(c: &mut Clients, command: Digest, root: Digest) -> Digest {
    let action = Action {
        command_digest: Some(command.to_reapi()),
        input_root_digest: Some(root.to_reapi()),
        ..Default::default()
    };
    c.put(INSTANCE, SHA, &action.encode_to_vec()).await
}

fn request(action: &Digest, skip_cache_lookup: bool) -> ExecuteRequest {
    ExecuteRequest {
        instance_name: INSTANCE.into(),
        skip_cache_lookup,
        action_digest: Some(action.to_reapi()),
        digest_function: SHA.to_reapi() as i32,
        ..Default::default()
    }
}

/// Every Operation of an Execute stream.
async fn execute(c: &mut Clients, request: ExecuteRequest) -> Result<Vec<Operation>, Status> {
    let mut stream = c.exec.execute(request).await?.into_inner();
    let mut operations = Vec::new();
    while let Some(operation) = stream.message().await? {
        operations.push(operation);
    }
    Ok(operations)
}

fn metadata(operation: &Operation) -> ExecuteOperationMetadata {
    let any = operation.metadata.as_ref().expect("metadata");
    assert_eq!(
        any.type_url,
        "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteOperationMetadata"
    );
    ExecuteOperationMetadata::decode(any.value.as_slice()).unwrap()
}

fn response(operation: &Operation) -> ExecuteResponse {
    assert!(operation.done, "{operation:?}");
    match &operation.result {
        Some(operation::Result::Response(any)) => {
            assert_eq!(
                any.type_url,
                "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteResponse"
            );
            ExecuteResponse::decode(any.value.as_slice()).unwrap()
        }
        other => panic!("expected a response, got {other:?}"),
    }
}

/// The final ExecuteResponse of a stream, checking the stream's shape on the way.
fn final_response(operations: &[Operation]) -> ExecuteResponse {
    let last = operations.last().expect("at least one operation");
    assert!(
        operations[..operations.len() - 1].iter().all(|o| !o.done),
        "only the last operation is done"
    );
    assert!(
        operations.iter().all(|o| o.name == last.name),
        "one name throughout"
    );
    assert_eq!(
        metadata(last).stage,
        execution_stage::Value::Completed as i32
    );
    response(last)
}

fn code_of(response: &ExecuteResponse) -> i32 {
    response.status.as_ref().map_or(0, |s| s.code)
}

async fn read_blob(c: &mut Clients, digest: &reapi::Digest) -> Vec<u8> {
    let digest = Digest::from_reapi(SHA, digest).unwrap();
    c.read(
        &resource_name::read_name(INSTANCE, &digest, Compressor::Identity),
        0,
        0,
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_collects_file_and_directory_outputs_then_answers_from_the_cache() {
    let server = TestServer::start_executing().await;
    let mut c = server.clients().await;
    let caps = c
        .caps
        .get_capabilities(GetCapabilitiesRequest {
            instance_name: INSTANCE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let exec = caps.execution_capabilities.unwrap();
    assert!(exec.exec_enabled);
    assert_eq!(
        exec.digest_function,
        reapi::digest_function::Value::Sha256 as i32
    );
    assert!(
        exec.digest_functions
            .contains(&(reapi::digest_function::Value::Blake3 as i32))
    );

    let script = "mkdir -p out/dir/sub && tr a-z A-Z < in.txt > out/file.txt && \
                  echo x > out/dir/a && echo y > out/dir/sub/b && echo hello && echo warn >&2";
    let action = store_action(
        &mut c,
        &["sh", "-c", script],
        &["out/file.txt", "out/dir"],
        &[("in.txt", b"input\n")],
    )
    .await;

    let operations = execute(&mut c, request(&action, false)).await.unwrap();
    let (instance, _) = parse_operation_name(&operations[0].name).unwrap();
    assert_eq!(instance, INSTANCE);
    let first = metadata(&operations[0]);
    assert_eq!(first.action_digest, Some(action.to_reapi()));
    assert_eq!(first.digest_function, SHA.to_reapi() as i32);
    assert_eq!(
        first.stdout_stream_name,
        format!("{}/stdout", operations[0].name)
    );
    assert_eq!(
        first.stderr_stream_name,
        format!("{}/stderr", operations[0].name)
    );
    let executed = final_response(&operations);
    assert_eq!(code_of(&executed), Code::Ok as i32, "{executed:?}");
    assert!(!executed.cached_result);
    let result = executed.result.clone().unwrap();
    assert_eq!(result.exit_code, 0);
    assert_eq!(
        read_blob(&mut c, result.stdout_digest.as_ref().unwrap()).await,
        b"hello\n"
    );
    assert_eq!(
        read_blob(&mut c, result.stderr_digest.as_ref().unwrap()).await,
        b"warn\n"
    );

    // The file output…
    assert_eq!(result.output_files.len(), 1);
    assert_eq!(result.output_files[0].path, "out/file.txt");
    assert_eq!(
        read_blob(&mut c, result.output_files[0].digest.as_ref().unwrap()).await,
        b"INPUT\n"
    );
    // …and the directory output, as a Tree whose files are all in the CAS.
    assert_eq!(result.output_directories.len(), 1);
    let directory = &result.output_directories[0];
    assert_eq!(directory.path, "out/dir");
    let tree = Tree::decode(
        read_blob(&mut c, directory.tree_digest.as_ref().unwrap())
            .await
            .as_slice(),
    )
    .unwrap();
    let root = tree.root.unwrap();
    assert_eq!(root.files.len(), 1);
    assert_eq!(root.files[0].name, "a");
    assert_eq!(
        read_blob(&mut c, root.files[0].digest.as_ref().unwrap()).await,
        b"x\n"
    );
    assert_eq!(root.directories.len(), 1);
    assert_eq!(root.directories[0].name, "sub");
    assert_eq!(tree.children.len(), 1);
    assert_eq!(tree.children[0].files[0].name, "b");
    assert_eq!(
        read_blob(&mut c, tree.children[0].files[0].digest.as_ref().unwrap()).await,
        b"y\n"
    );

    // The result is in the action cache, for any REAPI client.
    let cached =
        c.ac.get_action_result(GetActionResultRequest {
            instance_name: INSTANCE.into(),
            action_digest: Some(action.to_reapi()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cached.output_files, result.output_files);

    // Again: answered from the action cache, same result.
    let again = final_response(&execute(&mut c, request(&action, false)).await.unwrap());
    assert!(again.cached_result, "{again:?}");
    assert_eq!(code_of(&again), Code::Ok as i32);
    let hit = again.result.unwrap();
    assert_eq!(hit.output_files, result.output_files);
    assert_eq!(hit.output_directories, result.output_directories);

    // skip_cache_lookup runs it again.
    let rerun = final_response(&execute(&mut c, request(&action, true)).await.unwrap());
    assert!(!rerun.cached_result);
    assert_eq!(rerun.result.unwrap().output_files, result.output_files);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_zero_exit_is_a_result_not_an_error_and_is_not_cached() {
    let server = TestServer::start_executing().await;
    let mut c = server.clients().await;
    let action = store_action(
        &mut c,
        &["sh", "-c", "echo oops >&2; exit 3"],
        &["never.txt"],
        &[],
    )
    .await;
    let failed = final_response(&execute(&mut c, request(&action, false)).await.unwrap());
    assert_eq!(code_of(&failed), Code::Ok as i32, "{failed:?}");
    assert!(!failed.cached_result);
    let result = failed.result.unwrap();
    assert_eq!(result.exit_code, 3);
    assert!(result.output_files.is_empty());
    assert_eq!(
        read_blob(&mut c, result.stderr_digest.as_ref().unwrap()).await,
        b"oops\n"
    );
    let lookup =
        c.ac.get_action_result(GetActionResultRequest {
            instance_name: INSTANCE.into(),
            action_digest: Some(action.to_reapi()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(lookup.code(), Code::NotFound);
    // A failure is never served as a hit: it runs again.
    let again = final_response(&execute(&mut c, request(&action, false)).await.unwrap());
    assert!(!again.cached_result);
    assert_eq!(again.result.unwrap().exit_code, 3);
}

/// The MISSING violations of a FAILED_PRECONDITION ExecuteResponse.
fn missing_subjects(response: &ExecuteResponse) -> Vec<String> {
    let status = response.status.as_ref().expect("a status");
    assert_eq!(status.code, Code::FailedPrecondition as i32, "{response:?}");
    let status = Status::with_details(
        Code::FailedPrecondition,
        status.message.clone(),
        status.encode_to_vec().into(),
    );
    let failure = status
        .get_details_precondition_failure()
        .expect("a PreconditionFailure detail");
    failure
        .violations
        .iter()
        .map(|v| {
            assert_eq!(v.r#type, "MISSING");
            v.subject.clone()
        })
        .collect()
}

fn subject(digest: &Digest) -> String {
    format!("blobs/{}/{}", digest.hash_hex(), digest.size)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_inputs_are_failed_precondition_with_violations() {
    let server = TestServer::start_executing().await;
    let mut c = server.clients().await;
    let command = Command {
        arguments: vec!["cat".into(), "in.txt".into()],
        ..Default::default()
    };
    let command = c.put(INSTANCE, SHA, &command.encode_to_vec()).await;

    // The input root itself is missing.
    let absent_root = Directory {
        files: vec![FileNode {
            name: "in.txt".into(),
            digest: Some(SHA.digest_of(b"never uploaded").to_reapi()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let absent_root_digest = SHA.digest_of(&absent_root.encode_to_vec());
    let action = action_over(&mut c, command, absent_root_digest).await;
    let operations = execute(&mut c, request(&action, false)).await.unwrap();
    assert_eq!(operations.len(), 1);
    let response = final_response(&operations);
    assert_eq!(
        missing_subjects(&response),
        vec![subject(&absent_root_digest)]
    );
    assert!(response.result.is_none());

    // The root is there but a file and a subdirectory in it are not.
    let file = SHA.digest_of(b"never uploaded");
    let child = SHA.digest_of(b"not a directory either");
    let root = Directory {
        files: vec![FileNode {
            name: "in.txt".into(),
            digest: Some(file.to_reapi()),
            ..Default::default()
        }],
        directories: vec![DirectoryNode {
            name: "sub".into(),
            digest: Some(child.to_reapi()),
        }],
        ..Default::default()
    };
    let root = c.put(INSTANCE, SHA, &root.encode_to_vec()).await;
    let action = action_over(&mut c, command, root).await;
    let response = final_response(&execute(&mut c, request(&action, false)).await.unwrap());
    let subjects = missing_subjects(&response);
    assert!(subjects.contains(&subject(&child)), "{subjects:?}");

    // The Command is missing too.
    let no_command = SHA.digest_of(b"no such command");
    let action = action_over(&mut c, no_command, root).await;
    let response = final_response(&execute(&mut c, request(&action, false)).await.unwrap());
    assert!(missing_subjects(&response).contains(&subject(&no_command)));

    // The Action itself.
    let no_action = SHA.digest_of(b"no such action");
    let response = final_response(&execute(&mut c, request(&no_action, false)).await.unwrap());
    assert_eq!(missing_subjects(&response), vec![subject(&no_action)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_invalid_argument() {
    let server = TestServer::start_executing().await;
    let mut c = server.clients().await;
    let bad_digest = ExecuteRequest {
        instance_name: INSTANCE.into(),
        action_digest: Some(reapi::Digest {
            hash: "not-a-hash".into(),
            size_bytes: 3,
        }),
        ..Default::default()
    };
    let status = execute(&mut c, bad_digest).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let no_digest = ExecuteRequest {
        instance_name: INSTANCE.into(),
        ..Default::default()
    };
    let status = execute(&mut c, no_digest).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let negative = ExecuteRequest {
        action_digest: Some(reapi::Digest {
            hash: SHA.digest_of(b"x").hash_hex(),
            size_bytes: -1,
        }),
        ..Default::default()
    };
    assert_eq!(
        execute(&mut c, negative).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let bad_instance = ExecuteRequest {
        instance_name: "ci/operations/x".into(),
        ..request(&SHA.digest_of(b"x"), false)
    };
    assert_eq!(
        execute(&mut c, bad_instance).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // A blob that is not an Action.
    let garbage = c.put(INSTANCE, SHA, b"\xff\xff\xff not protobuf").await;
    let status = execute(&mut c, request(&garbage, false)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // Unknown operation names.
    let status = c
        .exec
        .wait_execution(WaitExecutionRequest {
            name: format!("{INSTANCE}/operations/no-such-job"),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = c
        .ops
        .get_operation(GetOperationRequest {
            name: "a/b/c".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_execution_and_operations_after_the_fact() {
    let server = TestServer::start_executing().await;
    let mut c = server.clients().await;
    let action = store_action(&mut c, &["sh", "-c", "echo done"], &[], &[]).await;
    let operations = execute(&mut c, request(&action, false)).await.unwrap();
    let name = operations[0].name.clone();
    let executed = final_response(&operations);

    // WaitExecution on a finished operation: its final state at once.
    let mut stream = c
        .exec
        .wait_execution(WaitExecutionRequest { name: name.clone() })
        .await
        .unwrap()
        .into_inner();
    let resumed = stream.message().await.unwrap().unwrap();
    assert_eq!(resumed.name, name);
    assert_eq!(response(&resumed), executed);
    assert!(stream.message().await.unwrap().is_none());

    let got = c
        .ops
        .get_operation(GetOperationRequest { name: name.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response(&got), executed);
    let waited = c
        .ops
        .wait_operation(WaitOperationRequest {
            name: name.clone(),
            timeout: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(waited.done);
    let listed = c
        .ops
        .list_operations(ListOperationsRequest {
            name: format!("{INSTANCE}/operations"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.operations.iter().any(|o| o.name == name),
        "{listed:?}"
    );
    let other = c
        .ops
        .list_operations(ListOperationsRequest {
            name: "other/operations".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(other.operations.is_empty());
    // The same id under another instance is not this operation.
    let (_, id) = parse_operation_name(&name).unwrap();
    let status = c
        .ops
        .get_operation(GetOperationRequest {
            name: format!("other/operations/{id}"),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    c.ops
        .delete_operation(DeleteOperationRequest { name: name.clone() })
        .await
        .unwrap();
    let status = c
        .ops
        .get_operation(GetOperationRequest { name })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_operation_stops_a_running_action() {
    let server = TestServer::start_executing().await;
    let mut c = server.clients().await;
    let action = store_action(&mut c, &["sleep", "60"], &[], &[]).await;
    let started = Instant::now();
    let mut stream = c
        .exec
        .execute(request(&action, false))
        .await
        .unwrap()
        .into_inner();
    // Wait until it runs.
    let name = loop {
        let operation = stream.message().await.unwrap().expect("not done yet");
        assert!(!operation.done, "{operation:?}");
        if metadata(&operation).stage == execution_stage::Value::Executing as i32 {
            break operation.name;
        }
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.ops
        .cancel_operation(CancelOperationRequest { name: name.clone() })
        .await
        .unwrap();
    let last = loop {
        let operation = stream.message().await.unwrap().expect("a final operation");
        if operation.done {
            break operation;
        }
    };
    let cancelled = response(&last);
    assert_eq!(code_of(&cancelled), Code::Cancelled as i32, "{cancelled:?}");
    assert!(cancelled.result.is_none());
    assert!(stream.message().await.unwrap().is_none());
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "cancelled long before the sleep ends"
    );
    // Nothing was cached.
    let again = c
        .ops
        .get_operation(GetOperationRequest { name })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code_of(&response(&again)), Code::Cancelled as i32);
    let lookup =
        c.ac.get_action_result(GetActionResultRequest {
            instance_name: INSTANCE.into(),
            action_digest: Some(action.to_reapi()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(lookup.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_is_readable_live_through_bytestream() {
    let server = TestServer::start_executing().await;
    let mut c = server.clients().await;
    let action = store_action(
        &mut c,
        &["sh", "-c", "echo a; sleep 2; echo b; echo e >&2"],
        &[],
        &[],
    )
    .await;
    let mut operations = c
        .exec
        .execute(request(&action, false))
        .await
        .unwrap()
        .into_inner();
    let first = operations.message().await.unwrap().unwrap();
    let name = first.name.clone();
    let stdout = metadata(&first).stdout_stream_name;
    let stderr = metadata(&first).stderr_stream_name;

    let mut read =
        c.bs.read(ReadRequest {
            resource_name: stdout.clone(),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let chunk = tokio::time::timeout(Duration::from_secs(30), read.message())
        .await
        .expect("the first line arrives")
        .unwrap()
        .unwrap();
    assert_eq!(chunk.data, b"a\n");
    // `a` arrived while the action still runs.
    let now = c
        .ops
        .get_operation(GetOperationRequest { name: name.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(!now.done, "the action is still running when `a` arrives");
    let mut rest = Vec::new();
    while let Some(chunk) = read.message().await.unwrap() {
        rest.extend_from_slice(&chunk.data);
    }
    assert_eq!(rest, b"b\n");
    // The operation is done by the time the read ends.
    while let Some(operation) = operations.message().await.unwrap() {
        if operation.done {
            let done = response(&operation);
            assert_eq!(
                read_blob(&mut c, done.result.unwrap().stdout_digest.as_ref().unwrap()).await,
                b"a\nb\n"
            );
        }
    }

    // Afterwards the streams read whole, or from an offset, or limited.
    assert_eq!(c.read(&stdout, 0, 0).await.unwrap(), b"a\nb\n");
    assert_eq!(c.read(&stdout, 2, 0).await.unwrap(), b"b\n");
    assert_eq!(c.read(&stdout, 0, 1).await.unwrap(), b"a");
    assert_eq!(c.read(&stderr, 0, 0).await.unwrap(), b"e\n");
    assert_eq!(
        c.read(&stdout, 10, 0).await.unwrap_err().code(),
        Code::OutOfRange
    );
    let unknown = c
        .read(&format!("{INSTANCE}/operations/no-such-job/stdout"), 0, 0)
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    // The same job under another instance name is not there.
    let (_, id) = parse_operation_name(&name).unwrap();
    let elsewhere = c
        .read(&format!("other/operations/{id}/stdout"), 0, 0)
        .await
        .unwrap_err();
    assert_eq!(elsewhere.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_then_cancels_running_actions() {
    // The actions taken get the grace period, then are cancelled.
    let mut server = TestServer::start_executing_with(|mut config| {
        config.execution.shutdown_grace_secs = 2;
        config
    })
    .await;
    let mut c = server.clients().await;
    let action = store_action(&mut c, &["sleep", "60"], &[], &[]).await;
    let mut stream = c
        .exec
        .execute(request(&action, false))
        .await
        .unwrap()
        .into_inner();
    loop {
        let operation = stream.message().await.unwrap().expect("not done yet");
        if metadata(&operation).stage == execution_stage::Value::Executing as i32 {
            break;
        }
    }
    let executor = server.running().state.executor.clone().unwrap();
    let started = Instant::now();
    server.server.take().unwrap().shutdown().await.unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "the grace period was given: {took:?}"
    );
    assert!(
        took < Duration::from_secs(20),
        "shutdown does not wait for the sleep: {took:?}"
    );
    let job = executor.jobs().pop().unwrap();
    let outcome = job.wait().await;
    assert_eq!(
        outcome.status,
        rba_executor::runner::JobStatus::Cancelled,
        "{outcome:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_needs_a_read_write_client() {
    let server = TestServer::start_executing_with(with_tokens).await;
    let mut c = server.clients().await;
    let action = SHA.digest_of(b"whatever");
    let status = c
        .exec
        .execute(bearer(request(&action, false), RO_TOKEN))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = c.exec.execute(request(&action, false)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut stream = c
        .exec
        .execute(bearer(request(&action, false), RW_TOKEN))
        .await
        .unwrap()
        .into_inner();
    let only = stream.message().await.unwrap().unwrap();
    assert_eq!(
        code_of(&response(&only)),
        Code::FailedPrecondition as i32,
        "the action is missing"
    );
}

/// Every path under `dir` whose file name starts with `prefix`.
fn named_under(dir: &std::path::Path, prefix: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(listing) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in listing.flatten() {
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with(prefix) {
                found.push(path.clone());
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_paths_and_working_directories_leaving_the_exec_root_are_invalid_argument() {
    let server = TestServer::start_executing().await;
    let mut c = server.clients().await;
    let host = tempfile::tempdir().unwrap();
    let absolute = host.path().join("escape-abs/out").display().to_string();
    let cases: Vec<(&str, Vec<String>, String)> = vec![
        (
            "",
            vec!["../escape-up/out".into()],
            "\"../escape-up/out\"".into(),
        ),
        (
            "",
            vec!["ok/out".into(), "../../../../escape-far/out".into()],
            "\"../../../../escape-far/out\"".into(),
        ),
        ("", vec![absolute.clone()], format!("{absolute:?}")),
        (
            "..",
            vec!["escape-wd/out".into()],
            "working_directory \"..\"".into(),
        ),
        (
            "/tmp",
            vec!["escape-wd/out".into()],
            "working_directory \"/tmp\"".into(),
        ),
    ];
    for (working_directory, output_paths, named) in cases {
        let command = Command {
            arguments: vec!["sh".into(), "-c".into(), "mkdir -p escape-ran".into()],
            output_paths,
            working_directory: working_directory.into(),
            ..Default::default()
        };
        let command = c.put(INSTANCE, SHA, &command.encode_to_vec()).await;
        let root = c
            .put(INSTANCE, SHA, &Directory::default().encode_to_vec())
            .await;
        let action = action_over(&mut c, command, root).await;
        let status = execute(&mut c, request(&action, true)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains(&named),
            "{:?} should name {named}",
            status.message()
        );
    }
    // Nothing was created on the host, inside the server's directory or out of it, and no job ran.
    assert!(!host.path().join("escape-abs").exists());
    let server_dir = server.dir.path().parent().unwrap();
    assert_eq!(
        named_under(server.dir.path(), "escape-"),
        Vec::<std::path::PathBuf>::new()
    );
    assert!(!server_dir.join("escape-up").exists() && !server_dir.join("escape-far").exists());
    assert!(server.running().state.execution_enabled());

    // The server keeps serving: a well-formed action runs.
    let action = store_action(&mut c, &["sh", "-c", "echo ok > out/x"], &["out/x"], &[]).await;
    let response = final_response(&execute(&mut c, request(&action, false)).await.unwrap());
    assert_eq!(code_of(&response), Code::Ok as i32, "{response:?}");
    let result = response.result.unwrap();
    assert_eq!(result.exit_code, 0);
    assert_eq!(result.output_files.len(), 1);
}

const TOKEN_A: &str = "tenant-a-token-0123";
const TOKEN_B: &str = "tenant-b-token-0123";

/// Tenants `token:a` and `token:b`, both read-write, neither seeing the other.
fn with_two_tenants(mut config: rba_cache_server::Config) -> rba_cache_server::Config {
    let token = |name: &str, secret: &str| rba_cache_server::config::TokenConfig {
        name: name.into(),
        token: secret.into(),
        access: rba_cache_server::auth::Access::ReadWrite,
        tenants: vec![],
    };
    config.auth.tokens = vec![token("a", TOKEN_A), token("b", TOKEN_B)];
    config
}

/// Uploads an action (flat input root, one output file) as the holder of `token`.
async fn store_action_as(c: &mut Clients, token: &str, script: &str, input: &[u8]) -> Digest {
    let file = c.put_as(token, INSTANCE, input).await;
    let root = Directory {
        files: vec![FileNode {
            name: "in.txt".into(),
            digest: Some(file.to_reapi()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let root = c.put_as(token, INSTANCE, &root.encode_to_vec()).await;
    let command = Command {
        arguments: vec!["sh".into(), "-c".into(), script.into()],
        output_paths: vec!["out.txt".into()],
        ..Default::default()
    };
    let command = c.put_as(token, INSTANCE, &command.encode_to_vec()).await;
    let action = Action {
        command_digest: Some(command.to_reapi()),
        input_root_digest: Some(root.to_reapi()),
        ..Default::default()
    };
    c.put_as(token, INSTANCE, &action.encode_to_vec()).await
}

async fn execute_as(c: &mut Clients, token: &str, action: &Digest) -> ExecuteResponse {
    let mut stream = c
        .exec
        .execute(bearer(request(action, false), token))
        .await
        .unwrap()
        .into_inner();
    let mut operations = Vec::new();
    while let Some(operation) = stream.message().await.unwrap() {
        operations.push(operation);
    }
    final_response(&operations)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_runs_and_is_served_only_actions_whose_inputs_it_holds() {
    let server = TestServer::start_executing_with(with_two_tenants).await;
    let mut c = server.clients().await;
    let script = "tr a-z A-Z < in.txt > out.txt";
    let action = store_action_as(&mut c, TOKEN_A, script, b"a's secret\n").await;

    // B knows the digest, not the inputs: running it would hand B A's sources. The refusal
    // lists the Action alone: nothing of A's Command or tree.
    let refused = execute_as(&mut c, TOKEN_B, &action).await;
    assert_eq!(missing_subjects(&refused), [subject(&action)]);
    // Another of A's blobs named as an Action is answered as an absent digest (not "not a
    // valid Action", which told B the blob exists).
    let secret = SHA.digest_of(b"a's secret\n");
    let absent = SHA.digest_of(b"nobody stored this");
    for digest in [secret, absent] {
        let answer = execute_as(&mut c, TOKEN_B, &digest).await;
        assert_eq!(missing_subjects(&answer), [subject(&digest)], "{digest:?}");
    }
    // A's input root named as a directory of B's own tree is listed, not opened: B learns
    // nothing of what it holds (before, its files' digests came back as missing).
    let a_root = Directory {
        files: vec![FileNode {
            name: "in.txt".into(),
            digest: Some(secret.to_reapi()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let a_root = SHA.digest_of(&a_root.encode_to_vec());
    let b_root = Directory {
        directories: vec![DirectoryNode {
            name: "x".into(),
            digest: Some(a_root.to_reapi()),
        }],
        ..Default::default()
    };
    let b_root = c.put_as(TOKEN_B, INSTANCE, &b_root.encode_to_vec()).await;
    let b_command = Command {
        arguments: vec!["true".into()],
        ..Default::default()
    };
    let b_command = c
        .put_as(TOKEN_B, INSTANCE, &b_command.encode_to_vec())
        .await;
    let b_action = Action {
        command_digest: Some(b_command.to_reapi()),
        input_root_digest: Some(b_root.to_reapi()),
        ..Default::default()
    };
    let b_action = c.put_as(TOKEN_B, INSTANCE, &b_action.encode_to_vec()).await;
    let probing = execute_as(&mut c, TOKEN_B, &b_action).await;
    assert_eq!(missing_subjects(&probing), [subject(&a_root)]);

    let ran = execute_as(&mut c, TOKEN_A, &action).await;
    assert_eq!(code_of(&ran), Code::Ok as i32, "{ran:?}");
    let output = ran.result.unwrap().output_files[0].digest.clone().unwrap();
    let output = Digest::from_reapi(SHA, &output).unwrap();
    // The result's blobs were granted to the tenant it was served to…
    assert_eq!(
        c.read_as(TOKEN_A, INSTANCE, &output).await.unwrap(),
        b"A'S SECRET\n"
    );
    // …and to no one else.
    assert_eq!(
        c.read_as(TOKEN_B, INSTANCE, &output)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let get = GetActionResultRequest {
        instance_name: INSTANCE.into(),
        action_digest: Some(action.to_reapi()),
        ..Default::default()
    };
    assert_eq!(
        c.ac.get_action_result(bearer(get.clone(), TOKEN_B))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    // Once B holds the same inputs, the executor's (clean, shared) result is B's too.
    assert_eq!(
        store_action_as(&mut c, TOKEN_B, script, b"a's secret\n").await,
        action
    );
    c.ac.get_action_result(bearer(get, TOKEN_B)).await.unwrap();
    assert_eq!(
        c.read_as(TOKEN_B, INSTANCE, &output).await.unwrap(),
        b"A'S SECRET\n"
    );
    let served = execute_as(&mut c, TOKEN_B, &action).await;
    assert!(served.cached_result);

    // A result A stores with UpdateActionResult is never what B's Execute is served.
    let other = store_action_as(&mut c, TOKEN_A, "echo real > out.txt", b"x").await;
    assert_eq!(
        store_action_as(&mut c, TOKEN_B, "echo real > out.txt", b"x").await,
        other
    );
    let planted = c.put_as(TOKEN_A, INSTANCE, b"planted\n").await;
    c.ac.update_action_result(bearer(
        reapi::UpdateActionResultRequest {
            instance_name: INSTANCE.into(),
            action_digest: Some(other.to_reapi()),
            action_result: Some(reapi::ActionResult {
                output_files: vec![reapi::OutputFile {
                    path: "out.txt".into(),
                    digest: Some(planted.to_reapi()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        },
        TOKEN_A,
    ))
    .await
    .unwrap();
    let for_b = execute_as(&mut c, TOKEN_B, &other).await;
    assert!(!for_b.cached_result, "{for_b:?}");
    let real = for_b.result.unwrap().output_files[0]
        .digest
        .clone()
        .unwrap();
    let real = Digest::from_reapi(SHA, &real).unwrap();
    assert_eq!(
        c.read_as(TOKEN_B, INSTANCE, &real).await.unwrap(),
        b"real\n"
    );
}
