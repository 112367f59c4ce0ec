//! `rba serve`'s REAPI face shares the node's store, action cache and executor: what a libp2p
//! client built is visible to a REAPI client. With tokens and TLS it is per tenant: one
//! token's operations cannot be waited on, read or cancelled with another.

mod common;

use std::time::Duration;

use common::{Client, fixture};
use rba_cache_server::auth::Access;
use rba_cache_server::config::{TlsConfig, TokenConfig};
use rba_cas::{Digest, DigestFunction};
use rba_executor::cargo::JobKind;
use rba_proto::Message;
use rba_proto::longrunning::operations_client::OperationsClient;
use rba_proto::longrunning::{
    CancelOperationRequest, GetOperationRequest, ListOperationsRequest, operation,
};
use rba_proto::reapi::{self, digest_function};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reapi_clients_see_what_libp2p_clients_built() {
    let dir = tempfile::tempdir().unwrap();
    let node = common::node_with(dir.path(), &[], |config| {
        config.servers.reapi = Some(([127, 0, 0, 1], 0).into());
    })
    .await;
    let grpc = node.grpc_addr().expect("gRPC is listening");
    let client = Client::connect(&node).await;
    let (result, _) = client.run(JobKind::Build, &fixture("hello"), &[]).await;
    let tree = client.hash(&fixture("hello")).await;

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let capabilities = reapi::capabilities_client::CapabilitiesClient::new(channel.clone())
        .get_capabilities(reapi::GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(capabilities.execution_capabilities.is_some());

    let missing = reapi::content_addressable_storage_client::ContentAddressableStorageClient::new(
        channel.clone(),
    )
    .find_missing_blobs(reapi::FindMissingBlobsRequest {
        blob_digests: tree.blobs.iter().map(|d| d.to_reapi()).collect(),
        digest_function: digest_function::Value::Blake3 as i32,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner();
    assert!(missing.missing_blob_digests.is_empty(), "{missing:?}");

    let action = rba_cas::Digest::from_wire(result.body().action_digest.as_ref().unwrap()).unwrap();
    let cached = reapi::action_cache_client::ActionCacheClient::new(channel)
        .get_action_result(reapi::GetActionResultRequest {
            instance_name: rba_executor::runner::CARGO_INSTANCE.to_string(),
            action_digest: Some(action.to_reapi()),
            digest_function: digest_function::Value::Blake3 as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cached.exit_code, 0);
    assert!(
        cached
            .output_files
            .iter()
            .any(|f| f.path == "target/debug/hello")
    );
    node.shutdown().await.unwrap();
}

const ALICE: &str = "alice-secret-token";
const BOB: &str = "bob-secret-token";
const OPS: &str = "ops-secret-token";
const SHA: DigestFunction = DigestFunction::Sha256;

fn bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// Uploads `data` with `token`; returns its digest.
async fn put(channel: &Channel, token: &str, data: &[u8]) -> Digest {
    let digest = SHA.digest_of(data);
    let reply = reapi::content_addressable_storage_client::ContentAddressableStorageClient::new(
        channel.clone(),
    )
    .batch_update_blobs(bearer(
        reapi::BatchUpdateBlobsRequest {
            requests: vec![reapi::batch_update_blobs_request::Request {
                digest: Some(digest.to_reapi()),
                data: data.to_vec(),
                ..Default::default()
            }],
            digest_function: SHA.to_reapi() as i32,
            ..Default::default()
        },
        token,
    ))
    .await
    .unwrap()
    .into_inner();
    assert_eq!(reply.responses[0].status.as_ref().unwrap().code, 0);
    digest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_tokens_keep_each_tenants_operations_its_own() {
    rba_cache_server::server::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert_pem, key_pem) = (certified.cert.pem(), certified.signing_key.serialize_pem());
    std::fs::write(dir.path().join("cert.pem"), &cert_pem).unwrap();
    std::fs::write(dir.path().join("key.pem"), &key_pem).unwrap();
    let token = |name: &str, secret: &str| TokenConfig {
        name: name.into(),
        token: secret.into(),
        access: Access::ReadWrite,
        tenants: vec![],
    };
    let node = common::node_with(&dir.path().join("node"), &[], |config| {
        config.servers.reapi = Some(([127, 0, 0, 1], 0).into());
        let mut operator = token("ops", OPS);
        operator.tenants = vec![rba_cache_server::auth::ALL_TENANTS.into()];
        config.auth.tokens = vec![token("alice", ALICE), token("bob", BOB), operator];
        config.servers.tls = Some(TlsConfig {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
        });
    })
    .await;
    let grpc = node.grpc_addr().unwrap();

    // Plaintext to the TLS port gets nowhere.
    let plaintext = Endpoint::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    let status = reapi::capabilities_client::CapabilitiesClient::new(plaintext)
        .get_capabilities(bearer(reapi::GetCapabilitiesRequest::default(), ALICE))
        .await
        .unwrap_err();
    assert_ne!(status.code(), Code::Ok);

    // TLS with the test CA, checked against the name in the certificate.
    let channel = Endpoint::from_shared(format!("https://{grpc}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&cert_pem))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut capabilities = reapi::capabilities_client::CapabilitiesClient::new(channel.clone());
    let status = capabilities
        .get_capabilities(reapi::GetCapabilitiesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "a token is needed");
    let served = capabilities
        .get_capabilities(bearer(reapi::GetCapabilitiesRequest::default(), ALICE))
        .await
        .unwrap()
        .into_inner();
    assert!(served.execution_capabilities.is_some());

    // Alice runs something long.
    let root = put(
        &channel,
        ALICE,
        &reapi::Directory::default().encode_to_vec(),
    )
    .await;
    let command = reapi::Command {
        arguments: vec!["sleep".into(), "60".into()],
        ..Default::default()
    };
    let command = put(&channel, ALICE, &command.encode_to_vec()).await;
    let action = reapi::Action {
        command_digest: Some(command.to_reapi()),
        input_root_digest: Some(root.to_reapi()),
        ..Default::default()
    };
    let action = put(&channel, ALICE, &action.encode_to_vec()).await;
    let mut execution = reapi::execution_client::ExecutionClient::new(channel.clone());
    let mut stream = execution
        .execute(bearer(
            reapi::ExecuteRequest {
                action_digest: Some(action.to_reapi()),
                digest_function: SHA.to_reapi() as i32,
                ..Default::default()
            },
            ALICE,
        ))
        .await
        .unwrap()
        .into_inner();
    let name = stream.message().await.unwrap().unwrap().name;
    let mut operations = OperationsClient::new(channel.clone());

    // Bob knows the name and still cannot wait on it, read it, list it or cancel it: to him
    // it does not exist, exactly like a made-up one.
    let made_up = "operations/00000000-0000-0000-0000-000000000000".to_string();
    for target in [&name, &made_up] {
        let waited = execution
            .wait_execution(bearer(
                reapi::WaitExecutionRequest {
                    name: target.clone(),
                },
                BOB,
            ))
            .await
            .unwrap_err();
        assert_eq!(waited.code(), Code::NotFound, "{waited:?}");
        let got = operations
            .get_operation(bearer(
                GetOperationRequest {
                    name: target.clone(),
                },
                BOB,
            ))
            .await
            .unwrap_err();
        assert_eq!(got.code(), Code::NotFound);
        let cancelled = operations
            .cancel_operation(bearer(
                CancelOperationRequest {
                    name: target.clone(),
                },
                BOB,
            ))
            .await
            .unwrap_err();
        assert_eq!(cancelled.code(), Code::NotFound);
        assert_eq!(
            cancelled.message().replace(target.as_str(), "NAME"),
            format!("no operation {:?} (unknown or expired)", "NAME"),
        );
    }
    let listed = operations
        .list_operations(bearer(
            ListOperationsRequest {
                name: "operations".into(),
                ..Default::default()
            },
            BOB,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.operations.is_empty(), "{listed:?}");
    let listed = operations
        .list_operations(bearer(
            ListOperationsRequest {
                name: "operations".into(),
                ..Default::default()
            },
            ALICE,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.operations.len(), 1);
    assert_eq!(listed.operations[0].name, name);
    // Nor read its live output.
    let mut bytestream =
        rba_proto::bytestream::byte_stream_client::ByteStreamClient::new(channel.clone());
    let read = bytestream
        .read(bearer(
            rba_proto::bytestream::ReadRequest {
                resource_name: format!("{name}/stdout"),
                ..Default::default()
            },
            BOB,
        ))
        .await;
    let status = match read {
        Err(status) => status,
        Ok(stream) => stream.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let job_id = name.rsplit('/').next().unwrap();
    assert!(
        node.shared().executor.job(job_id).is_some(),
        "Bob's cancel did not touch it"
    );

    // Alice cancels her own.
    operations
        .cancel_operation(bearer(CancelOperationRequest { name: name.clone() }, ALICE))
        .await
        .unwrap();
    let last = loop {
        let operation = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("the cancelled operation ends")
            .unwrap()
            .expect("a final operation");
        if operation.done {
            break operation;
        }
    };
    let Some(operation::Result::Response(any)) = last.result else {
        panic!("{last:?}")
    };
    let response = reapi::ExecuteResponse::decode(any.value.as_slice()).unwrap();
    assert_eq!(response.status.unwrap().code, Code::Cancelled as i32);

    // One registry of jobs behind every face: a libp2p client's build is the operation
    // `rba/cargo/operations/{session}`, seen by a token that sees every tenant, and by no
    // token of another tenant.
    let (result, _) = Client::connect(&node)
        .await
        .run(JobKind::Build, &fixture("hello"), &[])
        .await;
    let session = format!(
        "{}/operations/{}",
        rba_executor::runner::CARGO_INSTANCE,
        result.session_id
    );
    let seen = operations
        .get_operation(bearer(
            GetOperationRequest {
                name: session.clone(),
            },
            OPS,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(seen.done, "{seen:?}");
    let Some(operation::Result::Response(any)) = seen.result else {
        panic!("{seen:?}")
    };
    let response = reapi::ExecuteResponse::decode(any.value.as_slice()).unwrap();
    assert_eq!(response.result.unwrap().exit_code, 0);
    let listed = operations
        .list_operations(bearer(
            ListOperationsRequest {
                name: format!("{}/operations", rba_executor::runner::CARGO_INSTANCE),
                ..Default::default()
            },
            OPS,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.operations.iter().any(|op| op.name == session),
        "{listed:?}"
    );
    let hidden = operations
        .get_operation(bearer(GetOperationRequest { name: session }, ALICE))
        .await
        .unwrap_err();
    assert_eq!(hidden.code(), Code::NotFound);
    node.shutdown().await.unwrap();
}
