//! `rba serve`'s REAPI face shares the node's store, action cache and executor: what a libp2p
//! client built is visible to a REAPI client.

mod common;

use common::{Client, fixture};
use rba_executor::cargo::JobKind;
use rba_proto::reapi::{self, digest_function};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reapi_clients_see_what_libp2p_clients_built() {
    let dir = tempfile::tempdir().unwrap();
    let node = common::node_with(dir.path(), &[], |config| {
        config.grpc_listen = Some(([127, 0, 0, 1], 0).into());
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
