//! `build.bazel.remote.execution.v2.ContentAddressableStorage`.
//!
//! - FindMissingBlobs: answered by the store's index alone (no filesystem access), and refreshes the LRU position of the
//!   blobs that are present, as the spec asks.
//! - BatchUpdateBlobs: each blob verified (size and hash) before it becomes visible, zstd
//!   decompressed as it streams into the store (bounded memory whatever the claimed size),
//!   then the whole batch made durable and published together (group commit: one sync for
//!   the batch, not one per blob), per-blob statuses; a request whose payload exceeds the advertised
//!   `max_batch_total_size_bytes` is `INVALID_ARGUMENT`.
//! - BatchReadBlobs: per-blob statuses, zstd when the client accepts it, the same limit.
//! - GetTree: breadth-first over `Directory` blobs, each distinct directory once, missing
//!   subtrees omitted, pages bounded by `page_size` and by the message limit; `page_token` is the
//!   number of directories already returned, so a retry resumes where the stream broke.
//! - Reads are per tenant ([`crate::auth::read_scope`]): BatchReadBlobs, GetTree (its root and
//!   each subdirectory) refuse or omit what the caller may not read exactly as if it were
//!   absent, and FindMissingBlobs lists such blobs as missing, so a client that holds the bytes
//!   uploads them and is granted them (proof of possession; one grants lookup per request).
//!   BatchUpdateBlobs grants the caller every blob it stored, once verified.
//! - Chunking RPCs (v2.12+): `UNIMPLEMENTED`, and Capabilities says so.

use std::collections::{HashSet, VecDeque};
use std::io::Read;
use std::pin::Pin;

use futures::Stream;
use rayon::prelude::*;
use rba_cas::{BlobStore, CasError, Digest, DigestFunction, StagedBlob};
use rba_proto::Message;
use rba_proto::reapi::content_addressable_storage_server::ContentAddressableStorage;
use rba_proto::reapi::{
    BatchReadBlobsRequest, BatchReadBlobsResponse, BatchUpdateBlobsRequest,
    BatchUpdateBlobsResponse, Directory, FindMissingBlobsRequest, FindMissingBlobsResponse,
    GetChunkMappingRequest, GetChunkMappingResponse, GetTreeRequest, GetTreeResponse,
    RegisterChunkMappingRequest, RegisterChunkMappingResponse, SpliceBlobRequest,
    SpliceBlobResponse, SplitBlobRequest, SplitBlobResponse, batch_read_blobs_response,
    batch_update_blobs_request, batch_update_blobs_response, compressor,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::resource_name::Compressor;
use crate::server::ServerState;
use crate::status::{self, blocking};
use crate::{auth, resource_name};

/// Finds with at most this many digests run inline; larger ones on the blocking pool.
const INLINE_FIND_LIMIT: usize = 16;
/// Framing bytes a BatchReadBlobs response adds per blob (digest, status, tags), an upper bound.
const READ_ENTRY_OVERHEAD: usize = 128;
/// Default and largest GetTree page, in directories.
const DEFAULT_TREE_PAGE: usize = 1_000;
const MAX_TREE_PAGE: usize = 10_000;
/// Largest `Directory` blob GetTree decodes.
const MAX_DIRECTORY_BYTES: u64 = 16 << 20;

/// Threads for batch blob I/O. Staging a small blob is mostly waiting on the filesystem
/// (create, write, chmod), so more threads than cores keep the disk busy; the batch's syncs
/// and renames then happen once, in [`BlobStore::publish`].
fn io_pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        rayon::ThreadPoolBuilder::new()
            .num_threads((cores * 2).clamp(4, 32))
            .thread_name(|i| format!("cas-batch-io-{i}"))
            .build()
            .expect("batch I/O thread pool")
    })
}

/// The ContentAddressableStorage service.
#[derive(Clone, Debug)]
pub struct CasService {
    state: ServerState,
}

impl CasService {
    /// Over the shared server state.
    pub fn new(state: ServerState) -> Self {
        CasService { state }
    }

    async fn find_missing(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> Result<FindMissingBlobsResponse, Status> {
        auth::require_read(&request)?;
        let scope = auth::read_scope(&request);
        let request = request.into_inner();
        resource_name::validate_instance_name(&request.instance_name)?;
        let function = status::digest_function(request.digest_function)?;
        let digests = request
            .blob_digests
            .iter()
            .map(|d| status::digest(function, d))
            .collect::<Result<Vec<_>, _>>()?;
        let cas = self.state.cas.clone();
        let find = move || -> Result<Vec<Digest>, Status> {
            let blobs = &cas.blobs;
            // Present blobs were just asked about: a build is about to use them (touched).
            let mut missing = blobs
                .find_missing_and_touch(&digests)
                .map_err(status::from_cas)?;
            // Present but not the caller's to read: missing to it, so a client that really
            // holds the bytes uploads them and earns the grant (proof of possession).
            if scope != auth::ReadScope::Everything {
                let mut hidden: HashSet<Digest> = missing.iter().copied().collect();
                let present: Vec<Digest> = digests
                    .iter()
                    .filter(|d| !hidden.contains(d))
                    .copied()
                    .collect();
                hidden.extend(scope.not_readable(&cas, &present)?);
                // In the order asked, so the answer does not tell the two kinds apart.
                missing = digests
                    .iter()
                    .filter(|d| hidden.remove(d))
                    .copied()
                    .collect();
            }
            Ok(missing)
        };
        let asked = request.blob_digests.len() as u64;
        let missing = if request.blob_digests.len() <= INLINE_FIND_LIMIT {
            find()?
        } else {
            blocking(find).await?
        };
        self.state.metrics.lookups(
            asked.saturating_sub(missing.len() as u64),
            missing.len() as u64,
        );
        Ok(FindMissingBlobsResponse {
            missing_blob_digests: missing.iter().map(Digest::to_reapi).collect(),
        })
    }

    async fn batch_update(
        &self,
        request: Request<BatchUpdateBlobsRequest>,
    ) -> Result<BatchUpdateBlobsResponse, Status> {
        auth::require_cas_write(&request)?;
        let grantee = auth::grantee(&request);
        let request = request.into_inner();
        resource_name::validate_instance_name(&request.instance_name)?;
        let function = status::digest_function(request.digest_function)?;
        let payload: usize = request.requests.iter().map(|r| r.data.len()).sum();
        let limit = self.state.max_batch_total_size_bytes();
        if payload > limit {
            return Err(Status::invalid_argument(format!(
                "batch of {payload} bytes exceeds max_batch_total_size_bytes {limit}; use ByteStream or smaller batches"
            )));
        }
        self.state.metrics.received(payload as u64);
        let cas = self.state.cas.clone();
        let blobs = cas.blobs.clone();
        let responses = blocking(move || {
            // Group commit: every blob is written and verified in parallel, then the batch is
            // made durable and published at once (one sync per phase, not one per blob).
            let staged: Vec<Result<StagedBlob, Status>> = io_pool().install(|| {
                request
                    .requests
                    .par_iter()
                    .map(|entry| stage_entry(&blobs, function, entry))
                    .collect()
            });
            let mut to_publish = Vec::new();
            let mut outcomes: Vec<Option<Result<(), Status>>> = staged
                .into_iter()
                .map(|result| match result {
                    Ok(blob) => {
                        to_publish.push(blob);
                        None
                    }
                    Err(status) => Some(Err(status)),
                })
                .collect();
            let mut published = blobs.publish(to_publish).into_iter();
            for outcome in outcomes.iter_mut().filter(|o| o.is_none()) {
                let result = published.next().expect("one result per staged blob");
                *outcome = Some(result.map(|_| ()).map_err(status::from_cas));
            }
            let responses: Vec<_> = request
                .requests
                .into_iter()
                .zip(outcomes)
                .map(|(entry, outcome)| {
                    let result = outcome.expect("every entry has an outcome");
                    if let Err(status) = &result {
                        tracing::debug!(code = ?status.code(), message = status.message(), "batch update entry refused");
                    }
                    batch_update_blobs_response::Response {
                        digest: entry.digest,
                        status: Some(match result {
                            Ok(()) => status::rpc_ok(),
                            Err(status) => status::to_rpc(&status),
                        }),
                    }
                })
                .collect();
            // The caller proved it holds the bytes of every blob stored (verified against its
            // digest, also when already present): one grant for the request.
            if let Some(tenant) = grantee {
                let stored: Vec<Digest> = responses
                    .iter()
                    .filter(|r| r.status.as_ref().is_some_and(|s| s.code == 0))
                    .filter_map(|r| r.digest.as_ref())
                    .filter_map(|d| status::digest(function, d).ok())
                    .collect();
                cas.reads
                    .grant(tenant.as_str(), &stored)
                    .map_err(status::from_cas)?;
            }
            Ok(responses)
        })
        .await?;
        Ok(BatchUpdateBlobsResponse { responses })
    }

    async fn batch_read(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> Result<BatchReadBlobsResponse, Status> {
        auth::require_read(&request)?;
        let scope = auth::read_scope(&request);
        let request = request.into_inner();
        resource_name::validate_instance_name(&request.instance_name)?;
        let function = status::digest_function(request.digest_function)?;
        let zstd_ok = request
            .acceptable_compressors
            .contains(&(compressor::Value::Zstd as i32));
        let total: u64 = request
            .digests
            .iter()
            .map(|d| d.size_bytes.max(0) as u64)
            .sum();
        let limit = self.state.max_batch_total_size_bytes() as u64;
        if total > limit {
            return Err(Status::invalid_argument(format!(
                "batch of {total} bytes exceeds max_batch_total_size_bytes {limit}; use ByteStream or smaller batches"
            )));
        }
        let framing = total as usize + request.digests.len() * READ_ENTRY_OVERHEAD;
        if framing > self.state.config.max_message_bytes {
            return Err(Status::invalid_argument(format!(
                "{} blobs would not fit one {}-byte response; split the request",
                request.digests.len(),
                self.state.config.max_message_bytes
            )));
        }
        let cas = self.state.cas.clone();
        let level = self.state.config.zstd_level;
        let responses = blocking(move || {
            let blobs = &cas.blobs;
            let wanted: Vec<Digest> = request
                .digests
                .iter()
                .filter_map(|d| status::digest(function, d).ok())
                .collect();
            let refused: HashSet<Digest> = scope.not_readable(&cas, &wanted)?.into_iter().collect();
            Ok(request
                .digests
                .into_par_iter()
                .map(|wire| {
                    let read = status::digest(function, &wire).and_then(|digest| {
                        if refused.contains(&digest) {
                            // The same answer as for a blob that is not stored.
                            return Err(status::from_cas_read(CasError::NotFound(digest)));
                        }
                        blobs
                            .read_to_vec(&digest, limit)
                            .map_err(status::from_cas_read)
                    });
                    match read {
                        Ok(data) if zstd_ok && data.len() > 64 => {
                            match zstd::bulk::compress(&data, level) {
                                Ok(compressed) => batch_read_blobs_response::Response {
                                    digest: Some(wire),
                                    data: compressed,
                                    compressor: Compressor::Zstd.to_reapi(),
                                    status: Some(status::rpc_ok()),
                                },
                                Err(e) => {
                                    read_failure(wire, Status::internal(format!("zstd: {e}")))
                                }
                            }
                        }
                        Ok(data) => batch_read_blobs_response::Response {
                            digest: Some(wire),
                            data,
                            compressor: Compressor::Identity.to_reapi(),
                            status: Some(status::rpc_ok()),
                        },
                        Err(status) => read_failure(wire, status),
                    }
                })
                .collect::<Vec<_>>())
        })
        .await?;
        self.state
            .metrics
            .sent(responses.iter().map(|r| r.data.len() as u64).sum());
        Ok(BatchReadBlobsResponse { responses })
    }

    fn get_tree_stream(&self, request: Request<GetTreeRequest>) -> Result<TreeStream, Status> {
        auth::require_read(&request)?;
        let scope = auth::read_scope(&request);
        let request = request.into_inner();
        resource_name::validate_instance_name(&request.instance_name)?;
        let function = status::digest_function(request.digest_function)?;
        let root = status::required_digest(function, request.root_digest.as_ref(), "root_digest")?;
        if request.page_size < 0 {
            return Err(Status::invalid_argument("page_size must not be negative"));
        }
        let page_size = match request.page_size as usize {
            0 => DEFAULT_TREE_PAGE,
            n => n.min(MAX_TREE_PAGE),
        };
        let skip: usize = if request.page_token.is_empty() {
            0
        } else {
            request.page_token.parse().map_err(|_| {
                Status::invalid_argument(format!("malformed page_token {:?}", request.page_token))
            })?
        };
        // Room for the page token and framing.
        let page_bytes = self.state.config.max_message_bytes - (16 << 10);
        let cas = self.state.cas.clone();
        let blobs = cas.blobs.clone();
        // Root first, so a missing root is NOT_FOUND on the call itself. A root the caller may
        // not read is missing to it.
        let not_found = || Status::not_found(format!("tree root {root:?} is not in the CAS"));
        if !scope.not_readable(&cas, &[root])?.is_empty() {
            return Err(not_found());
        }
        let root_directory = read_directory(&blobs, &root)?.ok_or_else(not_found)?;
        let (tx, rx) = mpsc::channel(2);
        tokio::task::spawn_blocking(move || {
            let walker = TreeWalker {
                blobs,
                cas,
                scope,
                function,
                page_size,
                page_bytes,
                skip,
            };
            if let Err(status) = walker.walk(root, root_directory, &tx) {
                let _ = tx.blocking_send(Err(status));
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

fn read_failure(
    digest: rba_proto::reapi::Digest,
    status: Status,
) -> batch_read_blobs_response::Response {
    batch_read_blobs_response::Response {
        digest: Some(digest),
        data: vec![],
        compressor: Compressor::Identity.to_reapi(),
        status: Some(status::to_rpc(&status)),
    }
}

/// Stores one BatchUpdateBlobs entry, verified.
/// Writes and verifies one BatchUpdateBlobs entry, ready to publish with the rest.
fn stage_entry(
    blobs: &BlobStore,
    function: DigestFunction,
    entry: &batch_update_blobs_request::Request,
) -> Result<StagedBlob, Status> {
    let digest = status::required_digest(function, entry.digest.as_ref(), "digest")?;
    match Compressor::from_reapi(entry.compressor)? {
        Compressor::Identity => {
            if entry.data.len() as u64 != digest.size {
                return Err(Status::invalid_argument(format!(
                    "digest {digest:?} says {} bytes but {} were sent",
                    digest.size,
                    entry.data.len()
                )));
            }
            stage_from_reader(blobs, digest, entry.data.as_slice())
        }
        Compressor::Zstd => {
            let decoder = zstd::stream::read::Decoder::with_buffer(entry.data.as_slice())
                .map_err(|e| Status::internal(format!("zstd: {e}")))?;
            stage_from_reader(blobs, digest, decoder)
        }
    }
}

/// Streams bytes into the store's temp files, verifying them against `digest` even when the
/// blob is already present (so a lying client is told so); [`BlobStore::publish`] makes them
/// visible. Memory stays bounded by the buffer.
fn stage_from_reader(
    blobs: &BlobStore,
    digest: Digest,
    mut source: impl Read,
) -> Result<StagedBlob, Status> {
    let mut buffer = vec![0u8; (digest.size as usize).clamp(1, 256 << 10)];
    let mut writer = blobs.writer(digest).map_err(status::from_cas)?;
    let mut hasher = writer.already_present().then(|| digest.function.hasher());
    loop {
        let n = match source.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Status::invalid_argument(format!(
                    "undecodable data for {digest:?}: {e}"
                )));
            }
        };
        writer.write_chunk(&buffer[..n]).map_err(status::from_cas)?;
        if let Some(hasher) = &mut hasher {
            hasher.update(&buffer[..n]);
        }
    }
    if let Some(hasher) = hasher {
        let actual = hasher.finish();
        if actual != digest {
            return Err(status::from_cas(if actual.size != digest.size {
                CasError::SizeMismatch {
                    expected: digest,
                    actual: actual.size,
                }
            } else {
                CasError::HashMismatch {
                    expected: digest,
                    actual,
                }
            }));
        }
    }
    writer.stage().map_err(status::from_cas)
}

/// A `Directory` blob, `None` when absent.
fn read_directory(blobs: &BlobStore, digest: &Digest) -> Result<Option<Directory>, Status> {
    let bytes = match blobs.read_to_vec(digest, MAX_DIRECTORY_BYTES) {
        Ok(bytes) => bytes,
        Err(CasError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(status::from_cas_read(e)),
    };
    Directory::decode(bytes.as_slice())
        .map(Some)
        .map_err(|e| Status::invalid_argument(format!("blob {digest:?} is not a Directory: {e}")))
}

type TreeStream = Pin<Box<dyn Stream<Item = Result<GetTreeResponse, Status>> + Send>>;

struct TreeWalker {
    blobs: BlobStore,
    /// For the read check of each directory (those the caller may not read are omitted, like
    /// missing ones).
    cas: rba_cas::Cas,
    scope: auth::ReadScope,
    function: DigestFunction,
    page_size: usize,
    page_bytes: usize,
    skip: usize,
}

impl TreeWalker {
    /// Breadth-first, each distinct directory once, in a stable order (children in listing
    /// order), so that page tokens (positions in this order) stay valid across calls.
    fn walk(
        &self,
        root: Digest,
        root_directory: Directory,
        tx: &mpsc::Sender<Result<GetTreeResponse, Status>>,
    ) -> Result<(), Status> {
        let mut seen = HashSet::from([root]);
        let mut queue = VecDeque::from([(root_directory)]);
        let mut position = 0usize;
        let mut page = Vec::new();
        let mut page_bytes = 0usize;
        let mut sent_any = false;
        while let Some(directory) = queue.pop_front() {
            for child in &directory.directories {
                let digest = status::required_digest(
                    self.function,
                    child.digest.as_ref(),
                    "DirectoryNode.digest",
                )?;
                if seen.insert(digest)
                    && self.scope.not_readable(&self.cas, &[digest])?.is_empty()
                    && let Some(child) = read_directory(&self.blobs, &digest)?
                {
                    queue.push_back(child);
                }
            }
            position += 1;
            if position <= self.skip {
                continue;
            }
            let size = directory.encoded_len() + 8;
            if !page.is_empty()
                && (page.len() >= self.page_size || page_bytes + size > self.page_bytes)
            {
                let response = GetTreeResponse {
                    directories: std::mem::take(&mut page),
                    next_page_token: (position - 1).to_string(),
                };
                if tx.blocking_send(Ok(response)).is_err() {
                    return Ok(()); // the client went away
                }
                sent_any = true;
                page_bytes = 0;
            }
            page_bytes += size;
            page.push(directory);
        }
        if !page.is_empty() || !sent_any {
            let _ = tx.blocking_send(Ok(GetTreeResponse {
                directories: page,
                next_page_token: String::new(),
            }));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl ContentAddressableStorage for CasService {
    async fn find_missing_blobs(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        let result = self.find_missing(request).await;
        self.state.metrics.request("FindMissingBlobs", &result);
        result.map(Response::new)
    }

    async fn batch_update_blobs(
        &self,
        request: Request<BatchUpdateBlobsRequest>,
    ) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        let result = self.batch_update(request).await;
        self.state.metrics.request("BatchUpdateBlobs", &result);
        result.map(Response::new)
    }

    async fn batch_read_blobs(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> Result<Response<BatchReadBlobsResponse>, Status> {
        let result = self.batch_read(request).await;
        self.state.metrics.request("BatchReadBlobs", &result);
        result.map(Response::new)
    }

    type GetTreeStream = TreeStream;

    async fn get_tree(
        &self,
        request: Request<GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        let state = self.state.clone();
        let this = self.clone();
        let result = blocking(move || this.get_tree_stream(request)).await;
        state.metrics.request("GetTree", &result);
        result.map(Response::new)
    }

    async fn split_blob(
        &self,
        _: Request<SplitBlobRequest>,
    ) -> Result<Response<SplitBlobResponse>, Status> {
        Err(Status::unimplemented(
            "blob splitting is not supported (split_blob_support = false)",
        ))
    }

    type GetChunkMappingStream =
        Pin<Box<dyn Stream<Item = Result<GetChunkMappingResponse, Status>> + Send>>;

    async fn get_chunk_mapping(
        &self,
        _: Request<GetChunkMappingRequest>,
    ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
        Err(Status::unimplemented(
            "blob splitting is not supported (split_blob_support = false)",
        ))
    }

    async fn splice_blob(
        &self,
        _: Request<SpliceBlobRequest>,
    ) -> Result<Response<SpliceBlobResponse>, Status> {
        Err(Status::unimplemented(
            "blob splicing is not supported (splice_blob_support = false)",
        ))
    }

    async fn register_chunk_mapping(
        &self,
        _: Request<tonic::Streaming<RegisterChunkMappingRequest>>,
    ) -> Result<Response<RegisterChunkMappingResponse>, Status> {
        Err(Status::unimplemented(
            "blob splicing is not supported (splice_blob_support = false)",
        ))
    }
}
