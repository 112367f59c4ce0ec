//! The remote client `rba --remote` uses: connect to a node by `MULTIADDR/p2p/PEERID`, upload
//! only the blobs it lacks, submit, and follow the session to its signed end, resuming from
//! the last line seen if the connection drops.
//!
//! Why a module: the CLI, the tests and the bench all drive a node the same way; keeping the
//! protocol choreography (submit first; on `missing_input` ask `Has`, upload, submit again;
//! resume with `Attach {from_seq}`; check the end's signature and line count) in one place
//! means every caller gets the exactly-once guarantee. [`RemoteClient::cancel`] stops a session
//! this client submitted and returns its signed end (`rba cancel`, Ctrl-C on `rba build`).

use std::time::Duration;

use anyhow::Context;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use rba_cas::{BlobStore, Digest};
use rba_proto::rba::v1::{Attach, Cancel, End, EndBody, Submit, client_frame};

use crate::p2p::blobs::BlobClient;
use crate::p2p::frame::DEFAULT_MAX_FRAME;
use crate::p2p::session::{NodeError, SessionClient, SessionEvent};
use crate::p2p::{CAS_PROTOCOL, Network, SESSION_PROTOCOL, split_peer_multiaddr};

/// How long connecting to a node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Blob streams an upload uses at once: the node verifies and stores each blob before it
/// answers, so one stream is one round trip per blob; several streams on the same connection
/// keep the link and the node busy while each waits for its answer.
pub const UPLOAD_STREAMS: usize = 8;
/// The node lists at most this many missing blobs in a `missing_input` refusal (node.rs
/// `MAX_LISTED_MISSING`): a list that long may be cut, so the client asks `Has` instead.
const LISTED_MISSING_CAP: usize = 1000;
/// Reconnection attempts after a dropped session stream.
const RESUME_ATTEMPTS: u32 = 20;

/// What uploading did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UploadStats {
    /// Blobs of the tree the node was asked about.
    pub asked: u64,
    /// Blobs uploaded.
    pub uploaded: u64,
    /// Bytes uploaded.
    pub bytes: u64,
}

/// How a followed session ended.
#[derive(Clone, Debug)]
pub struct SessionResult {
    /// The session id.
    pub session_id: String,
    /// The signed end event (signature checked).
    pub end: End,
    /// Lines delivered to the caller (from the start position on).
    pub lines: u64,
    /// Times the stream dropped and was resumed.
    pub resumed: u32,
    /// What the submission uploaded.
    pub upload: UploadStats,
}

impl SessionResult {
    /// The end event's body.
    pub fn body(&self) -> &EndBody {
        self.end.body.as_ref().expect("verified ends have a body")
    }
}

/// A connection to one node.
#[derive(Clone)]
pub struct RemoteClient {
    network: Network,
    node: PeerId,
    addresses: Vec<Multiaddr>,
    max_frame: usize,
}

impl RemoteClient {
    /// Connects to `target` (`MULTIADDR/p2p/PEERID`) with `keypair` as the client identity.
    pub async fn connect(keypair: Keypair, target: &str) -> anyhow::Result<Self> {
        let (address, node) = split_peer_multiaddr(target)?;
        let network = Network::start(keypair, Duration::from_secs(6 * 3600))?;
        let client = RemoteClient {
            network,
            node,
            addresses: vec![address],
            max_frame: DEFAULT_MAX_FRAME,
        };
        client.reconnect().await?;
        Ok(client)
    }

    /// The node's PeerId.
    pub fn node(&self) -> PeerId {
        self.node
    }

    /// Our PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.network.peer_id()
    }

    /// (Re)connects to the node.
    pub async fn reconnect(&self) -> anyhow::Result<()> {
        let addresses = self
            .addresses
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        tokio::time::timeout(
            CONNECT_TIMEOUT,
            self.network.dial(self.node, self.addresses.clone()),
        )
        .await
        .map_err(|_| anyhow::anyhow!("node unreachable at {addresses} (timed out)"))?
    }

    /// Drops the connection to the node (tests use it to cut a session mid-build).
    pub async fn disconnect(&self) {
        self.network.disconnect(self.node).await;
    }

    /// Opens a raw stream of `protocol` to the node (tests speak the frames by hand).
    pub async fn open_raw(
        &self,
        protocol: libp2p::StreamProtocol,
    ) -> anyhow::Result<libp2p::Stream> {
        self.network.open(self.node, protocol).await
    }

    /// Opens a blob stream to the node.
    pub async fn blobs(&self) -> anyhow::Result<BlobClient> {
        let stream = self.network.open(self.node, CAS_PROTOCOL).await?;
        Ok(BlobClient::new(stream, self.node, self.max_frame))
    }

    /// Opens a session stream to the node.
    pub async fn session(&self) -> anyhow::Result<SessionClient> {
        let stream = self.network.open(self.node, SESSION_PROTOCOL).await?;
        Ok(SessionClient::new(stream, self.node, self.max_frame))
    }

    /// Asks the node which of `digests` it lacks and uploads those from `store`, on
    /// [`UPLOAD_STREAMS`] streams at once, largest blobs first, with a byte progress bar.
    pub async fn upload_missing(
        &self,
        store: &BlobStore,
        digests: &[Digest],
    ) -> anyhow::Result<UploadStats> {
        let mut first = self.blobs().await?;
        let present = first.has(digests).await?;
        let missing: Vec<Digest> = digests
            .iter()
            .filter(|d| !present.contains(d))
            .copied()
            .collect();
        let mut stats = self.upload_on(first, store, missing).await?;
        stats.asked = digests.len() as u64;
        Ok(stats)
    }

    /// Uploads `digests` from `store` without asking the node first (it listed them as
    /// missing).
    pub async fn upload_listed(
        &self,
        store: &BlobStore,
        digests: &[Digest],
    ) -> anyhow::Result<UploadStats> {
        let first = self.blobs().await?;
        self.upload_on(first, store, digests.to_vec()).await
    }

    /// Uploads `missing` on `first` and up to [`UPLOAD_STREAMS`] - 1 more streams.
    async fn upload_on(
        &self,
        first: BlobClient,
        store: &BlobStore,
        mut missing: Vec<Digest>,
    ) -> anyhow::Result<UploadStats> {
        // Popped from the end: smallest last, so the big ones overlap with the rest.
        missing.sort_by_key(|d| d.size);
        let stats = UploadStats {
            asked: missing.len() as u64,
            uploaded: missing.len() as u64,
            bytes: missing.iter().map(|d| d.size).sum(),
        };
        if missing.is_empty() {
            return Ok(stats);
        }
        let bar = crate::output::upload_bar(stats.bytes);
        // A few blobs per stream at least: each extra stream costs a round trip to open.
        let streams = UPLOAD_STREAMS.min(missing.len().div_ceil(4));
        let probe = missing[0];
        let queue = parking_lot::Mutex::new(missing);
        let mut clients = vec![first];
        while clients.len() < streams {
            // Opened one at a time, each confirmed by an answer before the next: a node drops
            // inbound streams that arrive faster than it accepts them (libp2p-stream's
            // channel), and a dropped stream is only seen as a closed one later.
            let mut extra = self.blobs().await?;
            if extra.has(&[probe]).await.is_err() {
                break;
            }
            clients.push(extra);
        }
        let uploads = clients.into_iter().map(|mut blobs| {
            let (queue, bar) = (&queue, &bar);
            async move {
                loop {
                    let next = queue.lock().pop();
                    let Some(digest) = next else {
                        return anyhow::Ok(());
                    };
                    blobs.put(store, digest).await?;
                    bar.inc(digest.size);
                }
            }
        });
        let result = futures::future::try_join_all(uploads).await;
        bar.finish_and_clear();
        result?;
        Ok(stats)
    }

    /// Fetches into `store` those of `digests` it lacks (the node serves only blobs this
    /// client may read); returns how many were fetched.
    pub async fn fetch_missing(
        &self,
        store: &BlobStore,
        digests: &[Digest],
    ) -> anyhow::Result<u64> {
        let missing = store.find_missing(digests)?;
        if missing.is_empty() {
            return Ok(0);
        }
        let mut blobs = self.blobs().await?;
        for digest in &missing {
            blobs.get_into(store, *digest).await?;
        }
        Ok(missing.len() as u64)
    }

    /// Submits a job on `submit.input_root` and follows it to its end. The node is asked first;
    /// only when it lacks part of the tree (and its trusted peers do too) are `tree_blobs`
    /// checked with `Has` and the missing ones uploaded from `store`.
    pub async fn run(
        &self,
        store: &BlobStore,
        tree_blobs: &[Digest],
        submit: Submit,
        mut on_event: impl FnMut(&SessionEvent),
    ) -> anyhow::Result<SessionResult> {
        let mut upload = UploadStats::default();
        let mut rounds = 0;
        loop {
            let mut session = self.session().await?;
            session
                .send(client_frame::Frame::Submit(submit.clone()))
                .await
                .context("sending Submit")?;
            match session.next().await {
                Ok(Some(SessionEvent::Accepted(accepted))) => {
                    on_event(&SessionEvent::Accepted(accepted.clone()));
                    let mut result = self
                        .follow_stream(session, &accepted.session_id, 0, &mut on_event)
                        .await?;
                    result.upload = upload;
                    return Ok(result);
                }
                Ok(Some(_)) => anyhow::bail!("the node did not accept the job"),
                Ok(None) => anyhow::bail!("the node closed the session without an answer"),
                Err(error) => match error.downcast::<NodeError>() {
                    Ok(refusal) if refusal.code == "missing_input" && rounds < 2 => {
                        rounds += 1;
                        // Only blobs of the tree this client submitted: a node cannot make it
                        // upload anything else its local CAS holds (another project's files).
                        let tree: std::collections::HashSet<&Digest> = tree_blobs.iter().collect();
                        let listed: Vec<Digest> = refusal
                            .missing
                            .iter()
                            .filter_map(|d| Digest::from_wire(d).ok())
                            .filter(|d| tree.contains(d))
                            .collect();
                        // A short list is usually all the node lacks (a one-file change):
                        // upload just that, without asking `Has` about the whole tree. If the
                        // node still lacks something, the second round asks about everything.
                        let round = if rounds == 1
                            && !listed.is_empty()
                            && listed.len() == refusal.missing.len()
                            && listed.len() < LISTED_MISSING_CAP
                        {
                            self.upload_listed(store, &listed).await?
                        } else {
                            self.upload_missing(store, tree_blobs).await?
                        };
                        upload.asked += round.asked;
                        upload.uploaded += round.uploaded;
                        upload.bytes += round.bytes;
                    }
                    Ok(refusal) => return Err(refusal.into()),
                    Err(other) => return Err(other),
                },
            }
        }
    }

    /// Attaches to a session from `from_seq` and follows it to its end.
    pub async fn follow(
        &self,
        session_id: &str,
        from_seq: u64,
        mut on_event: impl FnMut(&SessionEvent),
    ) -> anyhow::Result<SessionResult> {
        let session = self.attach(session_id, from_seq).await?;
        self.follow_stream(session, session_id, from_seq, &mut on_event)
            .await
    }

    /// Cancels session `session_id` (one this client's identity submitted) and returns its
    /// signed end, once the node has stopped the job. The node's refusals
    /// (`unknown_session`, `session_finished`) come back as [`NodeError`].
    pub async fn cancel(&self, session_id: &str) -> anyhow::Result<End> {
        let mut session = self.session().await?;
        session
            .send(client_frame::Frame::Cancel(Cancel {
                session_id: session_id.to_string(),
            }))
            .await
            .context("sending Cancel")?;
        loop {
            match session.next().await? {
                Some(SessionEvent::End(end)) => return Ok(end),
                Some(SessionEvent::Accepted(_)) => {}
                Some(_) => anyhow::bail!("the node answered Cancel with log frames"),
                None => anyhow::bail!("the node closed the session before its end"),
            }
        }
    }

    async fn attach(&self, session_id: &str, from_seq: u64) -> anyhow::Result<SessionClient> {
        let mut session = self.session().await?;
        session
            .send(client_frame::Frame::Attach(Attach {
                session_id: session_id.to_string(),
                from_seq,
            }))
            .await
            .context("sending Attach")?;
        match session.next().await? {
            Some(SessionEvent::Accepted(_)) => Ok(session),
            _ => anyhow::bail!("the node did not accept the attachment"),
        }
    }

    /// Reads a session to its end, delivering each line exactly once in order; resumes with
    /// `Attach {from_seq}` when the connection drops.
    async fn follow_stream(
        &self,
        mut session: SessionClient,
        session_id: &str,
        from_seq: u64,
        on_event: &mut impl FnMut(&SessionEvent),
    ) -> anyhow::Result<SessionResult> {
        let mut next_seq = from_seq;
        let mut resumed = 0;
        let mut closed = self.network.closed_connections();
        loop {
            let node = self.node;
            let event = tokio::select! {
                event = session.next() => event,
                _ = async {
                    loop {
                        match closed.recv().await {
                            Ok(peer) if peer == node => return,
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                                std::future::pending::<()>().await
                            }
                            _ => {}
                        }
                    }
                } => Ok(None),
            };
            match event {
                Ok(Some(SessionEvent::Line(line))) => {
                    if line.seq < next_seq {
                        continue;
                    }
                    anyhow::ensure!(
                        line.seq == next_seq,
                        "log gap: expected line {next_seq}, got {}",
                        line.seq
                    );
                    next_seq += 1;
                    on_event(&SessionEvent::Line(line));
                }
                Ok(Some(SessionEvent::End(end))) => {
                    let body = end.body.as_ref().expect("verified");
                    anyhow::ensure!(
                        body.lines.max(from_seq) == next_seq,
                        "the node ended the session at {} lines, {} received",
                        body.lines,
                        next_seq
                    );
                    on_event(&SessionEvent::End(end.clone()));
                    return Ok(SessionResult {
                        session_id: session_id.to_string(),
                        end,
                        lines: next_seq - from_seq,
                        resumed,
                        upload: UploadStats::default(),
                    });
                }
                Ok(Some(other)) => on_event(&other),
                Err(error) if error.downcast_ref::<NodeError>().is_some() => return Err(error),
                Ok(None) | Err(_) => {
                    // The stream dropped: reconnect and resume from the next line.
                    tracing::debug!(session_id, next_seq, "session stream dropped; resuming");
                    let mut attempt = 0;
                    session = loop {
                        attempt += 1;
                        if attempt > RESUME_ATTEMPTS {
                            anyhow::bail!(
                                "lost the session {session_id} at line {next_seq} and could not resume"
                            );
                        }
                        tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                        if self.reconnect().await.is_err() {
                            continue;
                        }
                        let attached = tokio::time::timeout(
                            Duration::from_secs(10),
                            self.attach(session_id, next_seq),
                        )
                        .await;
                        match attached {
                            Ok(Ok(session)) => break session,
                            Ok(Err(e)) => tracing::debug!(error = %e, "resume attempt failed"),
                            Err(_) => tracing::debug!("resume attempt timed out"),
                        }
                    };
                    resumed += 1;
                }
            }
        }
    }
}

/// A job's limits as sent in [`Submit::limits`] (0 = not asked).
pub fn limits_to_wire(limits: &rba_executor::runner::JobLimits) -> rba_proto::rba::v1::JobLimits {
    rba_proto::rba::v1::JobLimits {
        timeout_secs: limits.wall_time.map_or(0, |t| t.as_secs().max(1)),
        memory_bytes: limits.memory_bytes.unwrap_or(0),
        max_processes: limits.max_processes.unwrap_or(0),
        disk_bytes: limits.disk_bytes.unwrap_or(0),
    }
}

/// The limits a [`Submit`] asks for (the node caps them by its own).
pub fn limits_from_wire(
    wire: Option<&rba_proto::rba::v1::JobLimits>,
) -> rba_executor::runner::JobLimits {
    let Some(wire) = wire else {
        return rba_executor::runner::JobLimits::default();
    };
    let asked = |v: u64| (v > 0).then_some(v);
    rba_executor::runner::JobLimits {
        wall_time: asked(wire.timeout_secs).map(Duration::from_secs),
        memory_bytes: asked(wire.memory_bytes),
        max_processes: asked(wire.max_processes),
        disk_bytes: asked(wire.disk_bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rba_executor::runner::JobLimits;

    #[test]
    fn limits_cross_the_wire_unchanged_and_zero_means_not_asked() {
        let asked = JobLimits {
            wall_time: Some(Duration::from_secs(5)),
            memory_bytes: Some(2 << 30),
            max_processes: None,
            disk_bytes: Some(1 << 30),
        };
        assert_eq!(limits_from_wire(Some(&limits_to_wire(&asked))), asked);
        assert_eq!(limits_from_wire(None), JobLimits::default());
        let zeros = rba_proto::rba::v1::JobLimits::default();
        assert_eq!(limits_from_wire(Some(&zeros)), JobLimits::default());
    }
}
