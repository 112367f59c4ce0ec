//! `/rba/cas/1.0.0`: clients upload the blobs a node lacks; operators fetch blobs and signed
//! action results from trusted peers.
//!
//! One stream carries any number of requests, one at a time:
//! - `Has {digests}` → `HasReply {present}`;
//! - `Get {digest, offset}` → `Chunk`… (`last = true` on the final one) or `Error`;
//! - `Put {digest}`, `Chunk`… → `Stored` once verified and stored, or `Error`;
//! - `GetActionResult {instance, action_digest}` → `SignedActionResult` or `Error not_found`.
//!
//! Every blob entering a CAS, on either side, goes through `BlobStore::writer(expected)`, which
//! refuses bytes that do not hash to the expected digest: a peer serving a corrupt blob is
//! caught before anything is stored.
//!
//! Reads are authorized per tenant (`rba_cas::access`): a peer reads the blobs it uploaded
//! (a `Put` verified against its digest, also when the node already held the blob, is proof
//! that the peer holds the bytes) and those of results served to it; trusted and sharing
//! peers read everything. `Has` answers "absent" for blobs the peer may not read, so their
//! existence does not leak; `Get` and `GetActionResult` of anything else are refused with
//! `forbidden`, whether or not the node holds it. `GetActionResult` also wants the peer to
//! hold the Action's whole input tree (`NodeShared::peer_holds_inputs`), as a `Submit` must.

use std::collections::HashSet;
use std::io::Read;
use std::sync::Arc;

use anyhow::Context;
use futures::io::BufReader;
use libp2p::{PeerId, Stream};
use rba_cas::{BlobStore, Digest};
use rba_executor::tenant::Tenant;
use rba_proto::Message;
use rba_proto::rba::v1::{
    ActionResultBody, BlobReply, BlobRequest, Chunk, Error as WireError, Get, GetActionResult, Has,
    HasReply, Put, SignedActionResult, blob_reply, blob_request,
};
use tokio::sync::mpsc;

use super::frame::{CHUNK_BYTES, FrameError, read_frame, write_frame};
use crate::node::NodeShared;

/// Digests per `Has` request (keeps frames well under the cap).
pub const HAS_BATCH: usize = 8192;

fn error_reply(code: &str, message: impl Into<String>) -> BlobReply {
    BlobReply {
        reply: Some(blob_reply::Reply::Error(WireError {
            code: code.to_string(),
            message: message.into(),
            missing: Vec::new(),
        })),
    }
}

/// Streams a stored blob's bytes from `offset` in chunks, read on a blocking thread.
pub fn read_chunks(
    store: BlobStore,
    digest: Digest,
    offset: u64,
) -> mpsc::Receiver<anyhow::Result<Vec<u8>>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let mut reader = match store.reader(&digest, offset, 0) {
            Ok(reader) => reader,
            Err(e) => {
                let _ = tx.blocking_send(Err(e.into()));
                return;
            }
        };
        loop {
            let mut chunk = vec![0u8; CHUNK_BYTES];
            let mut filled = 0;
            while filled < chunk.len() {
                match reader.read(&mut chunk[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e.into()));
                        return;
                    }
                }
            }
            chunk.truncate(filled);
            let done = filled == 0;
            if tx.blocking_send(Ok(chunk)).is_err() || done {
                return;
            }
        }
    });
    rx
}

/// Node side: serves one inbound blob stream until the peer closes it or breaks the protocol.
pub async fn serve(node: Arc<NodeShared>, peer: PeerId, stream: Stream) {
    let mut stream = BufReader::new(stream);
    let max = node.config.servers.max_frame_bytes;
    loop {
        let request: BlobRequest = match read_frame(&mut stream, max).await {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(FrameError::Io(_)) => return,
            Err(error) => {
                node.metrics.inc_protocol_errors();
                let _ =
                    write_frame(&mut stream, &error_reply(error.code(), error.to_string())).await;
                return;
            }
        };
        let keep_going = match request.request {
            Some(blob_request::Request::Has(has)) => serve_has(&node, peer, &mut stream, has).await,
            Some(blob_request::Request::Get(get)) => serve_get(&node, peer, &mut stream, get).await,
            Some(blob_request::Request::Put(put)) => serve_put(&node, peer, &mut stream, put).await,
            Some(blob_request::Request::GetActionResult(ask)) => {
                serve_action_result(&node, peer, &mut stream, ask).await
            }
            Some(blob_request::Request::Chunk(_)) | None => {
                node.metrics.inc_protocol_errors();
                let _ = write_frame(
                    &mut stream,
                    &error_reply(
                        "unexpected_frame",
                        "expected Has, Get, Put or GetActionResult",
                    ),
                )
                .await;
                false
            }
        };
        if !keep_going {
            return;
        }
    }
}

async fn serve_has(
    node: &NodeShared,
    peer: PeerId,
    stream: &mut BufReader<Stream>,
    has: Has,
) -> bool {
    let mut digests = Vec::with_capacity(has.digests.len());
    for wire in &has.digests {
        match Digest::from_wire(wire) {
            Ok(d) => digests.push(d),
            Err(e) => {
                let _ = write_frame(stream, &error_reply("bad_digest", e.to_string())).await;
                return false;
            }
        }
    }
    let cas = node.cas.clone();
    let tenant = (!node.reads_everything(&peer)).then(|| Tenant::peer(peer));
    let present = tokio::task::spawn_blocking(move || match tenant {
        // Only what the peer may read counts as present.
        Some(tenant) => cas.reads.has(tenant.as_str(), &digests),
        None => {
            let missing: HashSet<Digest> = cas.blobs.find_missing(&digests)?.into_iter().collect();
            Ok(digests
                .into_iter()
                .filter(|d| !missing.contains(d))
                .collect())
        }
    })
    .await;
    let present: Vec<_> = match present {
        Ok(Ok(present)) => present.iter().map(Digest::to_wire).collect(),
        _ => {
            let _ = write_frame(stream, &error_reply("internal", "store lookup failed")).await;
            return false;
        }
    };
    let reply = BlobReply {
        reply: Some(blob_reply::Reply::Has(HasReply { present })),
    };
    write_frame(stream, &reply).await.is_ok()
}

/// The refusal of a read the peer is not authorized for (the same whether or not the node
/// holds the blob).
fn forbidden(peer: &PeerId, what: String) -> BlobReply {
    error_reply(
        "forbidden",
        format!(
            "{peer} may not read {what}: this node serves blobs and results only to the \
             clients that uploaded them or were served them, and to its trusted peers"
        ),
    )
}

async fn serve_get(
    node: &NodeShared,
    peer: PeerId,
    stream: &mut BufReader<Stream>,
    get: Get,
) -> bool {
    let digest = match get.digest.as_ref().map(Digest::from_wire) {
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            let _ = write_frame(stream, &error_reply("bad_digest", e.to_string())).await;
            return false;
        }
        None => {
            let _ = write_frame(stream, &error_reply("bad_digest", "Get without a digest")).await;
            return false;
        }
    };
    if !node.peer_may_read(&peer, &digest) {
        return write_frame(stream, &forbidden(&peer, format!("{digest:?}")))
            .await
            .is_ok();
    }
    let mut chunks = read_chunks(node.cas.blobs.clone(), digest, get.offset);
    let mut first = true;
    while let Some(chunk) = chunks.recv().await {
        match chunk {
            Ok(data) => {
                let last = data.is_empty();
                let bytes = data.len() as u64;
                let reply = BlobReply {
                    reply: Some(blob_reply::Reply::Chunk(Chunk { data, last })),
                };
                if write_frame(stream, &reply).await.is_err() {
                    return false;
                }
                node.metrics.add_served_bytes(bytes);
                if last {
                    return true;
                }
            }
            Err(e) => {
                let code = if first { "not_found" } else { "internal" };
                let _ = write_frame(stream, &error_reply(code, format!("{digest:?}: {e:#}"))).await;
                return first;
            }
        }
        first = false;
    }
    false
}

async fn serve_put(
    node: &NodeShared,
    peer: PeerId,
    stream: &mut BufReader<Stream>,
    put: Put,
) -> bool {
    let digest = match put.digest.as_ref().map(Digest::from_wire) {
        Some(Ok(d)) => d,
        _ => {
            let _ = write_frame(
                stream,
                &error_reply("bad_digest", "Put needs a valid digest"),
            )
            .await;
            return false;
        }
    };
    if !node.may_submit(&peer) {
        let _ = write_frame(
            stream,
            &error_reply("forbidden", format!("{peer} may not upload to this node")),
        )
        .await;
        return false;
    }
    if digest.size > node.config.servers.max_upload_bytes {
        let _ = write_frame(
            stream,
            &error_reply(
                "upload_refused",
                format!(
                    "blob {digest:?} is larger than the node's upload limit of {} bytes",
                    node.config.servers.max_upload_bytes
                ),
            ),
        )
        .await;
        return false;
    }
    let mut writer = match node.cas.blobs.writer(digest) {
        Ok(w) => w,
        Err(e) => {
            let _ = write_frame(stream, &error_reply("upload_refused", e.to_string())).await;
            return false;
        }
    };
    // A blob already held is not rewritten, so the store does not hash it: hash it here, for
    // the upload to prove that the peer holds the bytes.
    let mut proof = writer.already_present().then(|| digest.function.hasher());
    let max = node.config.servers.max_frame_bytes;
    loop {
        let frame: BlobRequest = match read_frame(stream, max).await {
            Ok(Some(frame)) => frame,
            Ok(None) | Err(FrameError::Io(_)) => return false,
            Err(e) => {
                let _ = write_frame(stream, &error_reply(e.code(), e.to_string())).await;
                return false;
            }
        };
        let Some(blob_request::Request::Chunk(chunk)) = frame.request else {
            let _ = write_frame(
                stream,
                &error_reply("unexpected_frame", "expected Chunk after Put"),
            )
            .await;
            return false;
        };
        if let Err(e) = writer.write_chunk(&chunk.data) {
            let _ = write_frame(stream, &error_reply("digest_mismatch", e.to_string())).await;
            return false;
        }
        if let Some(hasher) = &mut proof {
            hasher.update(&chunk.data);
        }
        node.metrics.add_uploaded_bytes(chunk.data.len() as u64);
        if chunk.last {
            break;
        }
    }
    let proven = proof.map(|hasher| hasher.finish());
    let (cas, tenant) = (node.cas.clone(), Tenant::peer(peer));
    let committed = tokio::task::spawn_blocking(move || {
        let stored = writer.commit()?;
        if let Some(actual) = proven
            && actual != stored
        {
            return Err(rba_cas::CasError::HashMismatch {
                expected: stored,
                actual,
            });
        }
        cas.reads.grant(tenant.as_str(), [&stored])?;
        Ok(stored)
    })
    .await;
    let reply = match committed {
        Ok(Ok(stored)) => BlobReply {
            reply: Some(blob_reply::Reply::Stored(stored.to_wire())),
        },
        Ok(Err(e)) => error_reply("digest_mismatch", e.to_string()),
        Err(_) => error_reply("internal", "storing the blob failed"),
    };
    let ok = matches!(reply.reply, Some(blob_reply::Reply::Stored(_)));
    write_frame(stream, &reply).await.is_ok() && ok
}

async fn serve_action_result(
    node: &NodeShared,
    peer: PeerId,
    stream: &mut BufReader<Stream>,
    ask: GetActionResult,
) -> bool {
    let Some(Ok(digest)) = ask.action_digest.as_ref().map(Digest::from_wire) else {
        let _ = write_frame(
            stream,
            &error_reply("bad_digest", "GetActionResult needs a digest"),
        )
        .await;
        return false;
    };
    // Tenant-scoped and failed results are the executor's to serve to their tenant alone.
    if rba_executor::runner::is_private_namespace(&ask.instance) {
        let refusal = error_reply(
            "forbidden",
            format!("instance {:?} is not readable", ask.instance),
        );
        return write_frame(stream, &refusal).await.is_ok();
    }
    // A result is served to whoever may read its Action and holds its inputs (as a Submit
    // must prove them): the peers served it, and trusted ones. Reading the Action alone is
    // not enough: its bytes follow from a known input root, and a peer may upload them.
    if !node.peer_may_read(&peer, &digest) || !node.peer_holds_inputs(&peer, &digest).await {
        return write_frame(
            stream,
            &forbidden(&peer, format!("the action result of {digest:?}")),
        )
        .await
        .is_ok();
    }
    let (actions, instance) = (node.cas.actions.clone(), ask.instance.clone());
    let found = tokio::task::spawn_blocking(move || actions.get(&instance, &digest)).await;
    let reply = match found {
        Ok(Ok(Some(result))) if result.exit_code == 0 => {
            let body = ActionResultBody {
                instance: ask.instance,
                action_digest: Some(digest.to_wire()),
                action_result: result.encode_to_vec(),
            };
            let (signature, key) = super::sign(node.network.keypair(), &body.encode_to_vec());
            BlobReply {
                reply: Some(blob_reply::Reply::ActionResult(SignedActionResult {
                    body: Some(body),
                    signature,
                    signer_public_key: key,
                })),
            }
        }
        _ => error_reply("not_found", format!("no action result for {digest:?}")),
    };
    write_frame(stream, &reply).await.is_ok()
}

/// Client side of one blob stream (used by `rba` to upload and by nodes to fetch from peers).
pub struct BlobClient {
    stream: BufReader<Stream>,
    peer: PeerId,
    max_frame: usize,
    /// The blob whose chunks are being received ([`BlobClient::request_blob`]).
    receiving: Option<Digest>,
}

impl BlobClient {
    /// Wraps an open `/rba/cas/1.0.0` stream to `peer`.
    pub fn new(stream: Stream, peer: PeerId, max_frame: usize) -> Self {
        BlobClient {
            stream: BufReader::new(stream),
            peer,
            max_frame,
            receiving: None,
        }
    }

    async fn request(&mut self, request: blob_request::Request) -> anyhow::Result<()> {
        write_frame(
            &mut self.stream,
            &BlobRequest {
                request: Some(request),
            },
        )
        .await
        .with_context(|| format!("sending to {}", self.peer))
    }

    async fn reply(&mut self) -> anyhow::Result<blob_reply::Reply> {
        let reply: BlobReply = read_frame(&mut self.stream, self.max_frame)
            .await
            .with_context(|| format!("reading from {}", self.peer))?
            .with_context(|| format!("{} closed the blob stream", self.peer))?;
        reply
            .reply
            .with_context(|| format!("{} sent an empty reply", self.peer))
    }

    /// Which of `digests` the peer holds.
    pub async fn has(&mut self, digests: &[Digest]) -> anyhow::Result<HashSet<Digest>> {
        let mut present = HashSet::new();
        for batch in digests.chunks(HAS_BATCH) {
            self.request(blob_request::Request::Has(Has {
                digests: batch.iter().map(Digest::to_wire).collect(),
            }))
            .await?;
            match self.reply().await? {
                blob_reply::Reply::Has(reply) => {
                    for wire in &reply.present {
                        present.insert(Digest::from_wire(wire)?);
                    }
                }
                blob_reply::Reply::Error(e) => anyhow::bail!("{}: {}", e.code, e.message),
                _ => anyhow::bail!("{} answered Has with something else", self.peer),
            }
        }
        Ok(present)
    }

    /// Uploads one blob from `store`; the peer verifies it before storing.
    pub async fn put(&mut self, store: &BlobStore, digest: Digest) -> anyhow::Result<()> {
        self.request(blob_request::Request::Put(Put {
            digest: Some(digest.to_wire()),
        }))
        .await?;
        let mut chunks = read_chunks(store.clone(), digest, 0);
        let mut send_failed = false;
        while let Some(chunk) = chunks.recv().await {
            let data = chunk.with_context(|| format!("reading local blob {digest:?}"))?;
            let last = data.is_empty();
            if self
                .request(blob_request::Request::Chunk(Chunk { data, last }))
                .await
                .is_err()
            {
                send_failed = true;
                break;
            }
            if last {
                break;
            }
        }
        match self.reply().await {
            Ok(blob_reply::Reply::Stored(_)) if !send_failed => Ok(()),
            Ok(blob_reply::Reply::Error(e)) => {
                anyhow::bail!("upload refused ({}): {}", e.code, e.message)
            }
            Ok(_) => anyhow::bail!("{} answered Put with something else", self.peer),
            Err(e) => Err(e.context(format!("uploading {digest:?}"))),
        }
    }

    /// Fetches one blob into `store`, verified against `digest`.
    pub async fn get_into(&mut self, store: &BlobStore, digest: Digest) -> anyhow::Result<()> {
        self.request_blob(digest).await?;
        let mut writer = store.writer(digest)?;
        while let Some(chunk) = self.next_chunk().await? {
            writer
                .write_chunk(&chunk)
                .with_context(|| format!("{} served a corrupt blob for {digest:?}", self.peer))?;
        }
        let peer = self.peer;
        tokio::task::spawn_blocking(move || writer.commit())
            .await?
            .with_context(|| format!("{peer} served a corrupt blob for {digest:?}"))?;
        Ok(())
    }

    /// Asks for blob `digest` from its start; its bytes follow through
    /// [`BlobClient::next_chunk`].
    pub async fn request_blob(&mut self, digest: Digest) -> anyhow::Result<()> {
        self.receiving = None;
        self.request(blob_request::Request::Get(Get {
            digest: Some(digest.to_wire()),
            offset: 0,
        }))
        .await?;
        self.receiving = Some(digest);
        Ok(())
    }

    /// The next chunk of the blob asked by [`BlobClient::request_blob`]; `None` after its
    /// last one. Fails when the peer has no such blob.
    pub async fn next_chunk(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
        let Some(digest) = self.receiving else {
            return Ok(None);
        };
        let reply = self.reply().await;
        self.receiving = None;
        match reply? {
            blob_reply::Reply::Chunk(chunk) => {
                if !chunk.last {
                    self.receiving = Some(digest);
                }
                Ok(Some(chunk.data))
            }
            blob_reply::Reply::Error(e) => {
                anyhow::bail!(
                    "{} has no {digest:?} ({}: {})",
                    self.peer,
                    e.code,
                    e.message
                )
            }
            _ => anyhow::bail!("{} answered Get with something else", self.peer),
        }
    }

    /// Asks the peer for its signed action result of `action_digest`.
    pub async fn get_action_result(
        &mut self,
        instance: &str,
        action_digest: Digest,
    ) -> anyhow::Result<Option<SignedActionResult>> {
        self.request(blob_request::Request::GetActionResult(GetActionResult {
            instance: instance.to_string(),
            action_digest: Some(action_digest.to_wire()),
        }))
        .await?;
        match self.reply().await? {
            blob_reply::Reply::ActionResult(signed) => Ok(Some(signed)),
            blob_reply::Reply::Error(e) if e.code == "not_found" => Ok(None),
            blob_reply::Reply::Error(e) => anyhow::bail!("{}: {}", e.code, e.message),
            _ => anyhow::bail!("{} answered GetActionResult with something else", self.peer),
        }
    }
}
