//! `/rba/session/1.0.0`: a client sends one `Submit` (or `Attach {session_id, from_seq}`, or
//! `Cancel {session_id}`); the node answers `Accepted`, then `LogBatch`es and `Progress` as the
//! job runs, then one `End` signed by its identity, or an `Error {code, message}`. A `Cancel`
//! stops the job (`NodeShared::cancel_session`) and is answered by `Accepted` and the signed
//! `End` alone, once the job is gone; the submitter's own stream, if still open, gets the same
//! end after its last lines.
//!
//! The sender reads the job's `LogStream` with its own reader at the pace the client drains
//! the stream: a slow client only delays its own frames, never the build (the log stream spills
//! to disk), and a client that reconnects with `Attach {from_seq}` gets every line from there
//! exactly once, because lines carry their dense `seq`.
//!
//! A session is its owner's: `Attach` is answered only for the peer that submitted it (and
//! for trusted and sharing peers); to anyone else it is `unknown_session`, the same answer as
//! for an id that does not exist. `Cancel` is stricter still: only the submitting tenant may
//! (a peer that reads everything may watch a build, not stop it), and to anyone else the
//! session is `unknown_session` too. Before the `End` goes out, the owner is granted the blobs
//! of the result (`NodeShared::grant_session_result`), so it can fetch what the end names.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::io::BufReader;
use libp2p::{PeerId, Stream};
use rba_executor::logstream::LogLine as ExecLogLine;
use rba_executor::runner::JobState;
use rba_proto::rba::v1::{
    Accepted, ClientFrame, End, Error as WireError, LogBatch, LogLine, NodeFrame, Progress,
    client_frame, node_frame,
};

use super::frame::{FrameError, read_frame, write_frame};
use crate::node::{NodeShared, SessionSource, end_body, end_body_from_record};

/// Lines per `LogBatch`, at most.
const BATCH_LINES: usize = 256;
/// Text bytes per `LogBatch`, at most (a single longer line still goes alone).
const BATCH_BYTES: usize = 512 << 10;
/// How long a client has to send its first frame.
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(30);

/// An `Error` frame.
pub fn error_frame(code: &str, message: impl Into<String>) -> NodeFrame {
    NodeFrame {
        frame: Some(node_frame::Frame::Error(WireError {
            code: code.to_string(),
            message: message.into(),
            missing: Vec::new(),
        })),
    }
}

fn frame(frame: node_frame::Frame) -> NodeFrame {
    NodeFrame { frame: Some(frame) }
}

/// Node side: serves one inbound session stream.
pub async fn serve(node: Arc<NodeShared>, peer: PeerId, stream: Stream) {
    let mut stream = BufReader::new(stream);
    let first = tokio::time::timeout(
        FIRST_FRAME_TIMEOUT,
        read_frame::<_, ClientFrame>(&mut stream, node.config.servers.max_frame_bytes),
    )
    .await;
    let request = match first {
        Ok(Ok(Some(request))) => request,
        Ok(Ok(None)) | Ok(Err(FrameError::Io(_))) => return,
        Ok(Err(error)) => {
            node.metrics.inc_protocol_errors();
            let _ = write_frame(&mut stream, &error_frame(error.code(), error.to_string())).await;
            return;
        }
        Err(_) => {
            let _ = write_frame(
                &mut stream,
                &error_frame("timeout", "no Submit, Attach or Cancel within 30 s"),
            )
            .await;
            return;
        }
    };
    let result = match request.frame {
        Some(client_frame::Frame::Submit(submit)) => match node
            .submit(Some(peer), rba_executor::tenant::Tenant::peer(peer), submit)
            .await
        {
            Ok(handle) => {
                let position = match handle.state() {
                    JobState::Queued { position } => position as u32,
                    _ => 0,
                };
                let accepted = frame(node_frame::Frame::Accepted(Accepted {
                    session_id: handle.id.clone(),
                    action_digest: Some(handle.action_digest.to_wire()),
                    queue_position: position,
                }));
                match write_frame(&mut stream, &accepted).await {
                    Ok(()) => stream_live(&node, &mut stream, &handle, 0).await,
                    Err(e) => Err(e),
                }
            }
            Err(refusal) => {
                let error = NodeFrame {
                    frame: Some(node_frame::Frame::Error(WireError {
                        code: refusal.code.to_string(),
                        message: refusal.message,
                        missing: refusal.missing.iter().map(|d| d.to_wire()).collect(),
                    })),
                };
                write_frame(&mut stream, &error).await
            }
        },
        Some(client_frame::Frame::Attach(attach)) => match node
            .visible_session(&attach.session_id, |owner| {
                node.peer_may_follow(&peer, owner)
            })
            .await
        {
            Some(source) => {
                node.metrics.inc_attached();
                let accepted = |action_digest| {
                    frame(node_frame::Frame::Accepted(Accepted {
                        session_id: attach.session_id.clone(),
                        action_digest,
                        queue_position: 0,
                    }))
                };
                match source {
                    SessionSource::Live(handle) => {
                        let first = accepted(Some(handle.action_digest.to_wire()));
                        match write_frame(&mut stream, &first).await {
                            Ok(()) => {
                                stream_live(&node, &mut stream, &handle, attach.from_seq).await
                            }
                            Err(e) => Err(e),
                        }
                    }
                    SessionSource::Finished(record) => {
                        let body = end_body_from_record(&record);
                        let first = accepted(body.action_digest.clone());
                        match write_frame(&mut stream, &first).await {
                            Ok(()) => {
                                stream_stored(&node, &mut stream, body, attach.from_seq).await
                            }
                            Err(e) => Err(e),
                        }
                    }
                }
            }
            None => {
                write_frame(
                    &mut stream,
                    &error_frame(
                        "unknown_session",
                        format!("no session {:?} on this node", attach.session_id),
                    ),
                )
                .await
            }
        },
        Some(client_frame::Frame::Cancel(cancel)) => {
            match node
                .cancel_session(
                    &rba_executor::tenant::Tenant::peer(peer),
                    &cancel.session_id,
                )
                .await
            {
                Ok(handle) => {
                    let accepted = frame(node_frame::Frame::Accepted(Accepted {
                        session_id: cancel.session_id.clone(),
                        action_digest: Some(handle.action_digest.to_wire()),
                        queue_position: 0,
                    }));
                    match write_frame(&mut stream, &accepted).await {
                        Ok(()) => send_end(&node, &mut stream, &handle).await,
                        Err(e) => Err(e),
                    }
                }
                Err(refusal) => {
                    write_frame(&mut stream, &error_frame(refusal.code, refusal.message)).await
                }
            }
        }
        None => {
            node.metrics.inc_protocol_errors();
            write_frame(
                &mut stream,
                &error_frame("unexpected_frame", "expected Submit, Attach or Cancel"),
            )
            .await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "session stream ended early");
    }
    let _ = futures::AsyncWriteExt::close(&mut stream).await;
}

fn batch_frame(lines: Vec<LogLine>) -> NodeFrame {
    frame(node_frame::Frame::LogBatch(LogBatch { lines }))
}

/// Streams a live job's lines from `from_seq`, progress while it runs, then the signed end.
async fn stream_live(
    node: &NodeShared,
    stream: &mut BufReader<Stream>,
    handle: &rba_executor::runner::JobHandle,
    from_seq: u64,
) -> std::io::Result<()> {
    let mut reader = handle.log.subscribe(from_seq);
    let mut state = handle.watch();
    let mut last_progress = (u32::MAX, u32::MAX);
    let mut running = true;
    loop {
        tokio::select! {
            biased;
            line = reader.next() => {
                let Some(line) = line else { break };
                let mut bytes = line.line.len();
                let mut batch = vec![line.to_proto()];
                // Whatever else is already there goes in the same frame.
                while batch.len() < BATCH_LINES && bytes < BATCH_BYTES {
                    match reader.next().now_or_never() {
                        Some(Some(line)) => {
                            bytes += line.line.len();
                            batch.push(line.to_proto());
                        }
                        _ => break,
                    }
                }
                write_frame(stream, &batch_frame(batch)).await?;
            }
            changed = state.changed(), if running => {
                if changed.is_err() {
                    running = false;
                    continue;
                }
                let current = state.borrow_and_update().clone();
                match current {
                    JobState::Running { done, total } if (done, total) != last_progress => {
                        last_progress = (done, total);
                        let progress = frame(node_frame::Frame::Progress(Progress {
                            units_done: done,
                            units_total: total,
                            current: String::new(),
                        }));
                        write_frame(stream, &progress).await?;
                    }
                    JobState::Done(_) => running = false,
                    _ => {}
                }
            }
        }
    }
    send_end(node, stream, handle).await
}

/// Waits for the job's end, grants its owner the result, and sends the signed `End`.
async fn send_end(
    node: &NodeShared,
    stream: &mut BufReader<Stream>,
    handle: &rba_executor::runner::JobHandle,
) -> std::io::Result<()> {
    let outcome = handle.wait().await;
    node.grant_session_result(&handle.id, &outcome).await;
    let lines = handle.log.wait_finished().await.lines;
    let end = node.sign_end(end_body(&handle.id, handle.action_digest, &outcome, lines));
    write_frame(stream, &frame(node_frame::Frame::End(end))).await
}

/// Replays a finished session from its stored log blob, then its end.
async fn stream_stored(
    node: &NodeShared,
    stream: &mut BufReader<Stream>,
    body: rba_proto::rba::v1::EndBody,
    from_seq: u64,
) -> std::io::Result<()> {
    let lines: Vec<ExecLogLine> = match body
        .log_digest
        .as_ref()
        .and_then(|d| rba_cas::Digest::from_wire(d).ok())
    {
        Some(digest) => match node.stored_log(&digest).await {
            Ok(lines) => lines,
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "replaying a finished session");
                return write_frame(
                    stream,
                    &error_frame("not_found", "the session's log is no longer stored"),
                )
                .await;
            }
        },
        None => Vec::new(),
    };
    let rest: Vec<LogLine> = lines
        .iter()
        .filter(|l| l.seq >= from_seq)
        .map(ExecLogLine::to_proto)
        .collect();
    for batch in rest.chunks(BATCH_LINES) {
        write_frame(stream, &batch_frame(batch.to_vec())).await?;
    }
    let end = node.sign_end(body);
    write_frame(stream, &frame(node_frame::Frame::End(end))).await
}

/// What a session stream delivers to a client.
#[derive(Debug, Clone)]
pub enum SessionEvent {
    /// The node took the job (or the attachment).
    Accepted(Accepted),
    /// A log line.
    Line(LogLine),
    /// Units done / total.
    Progress(Progress),
    /// The signed end (signature already checked against the node's PeerId).
    End(End),
}

/// An error frame from the node.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message} ({code})")]
pub struct NodeError {
    /// The frame's code.
    pub code: String,
    /// The frame's message.
    pub message: String,
    /// For `missing_input`.
    pub missing: Vec<rba_proto::rba::v1::BlobDigest>,
}

/// Client side of one session stream.
pub struct SessionClient {
    stream: BufReader<Stream>,
    node: PeerId,
    max_frame: usize,
    pending: std::collections::VecDeque<SessionEvent>,
}

impl SessionClient {
    /// Wraps an open `/rba/session/1.0.0` stream to `node`.
    pub fn new(stream: Stream, node: PeerId, max_frame: usize) -> Self {
        SessionClient {
            stream: BufReader::new(stream),
            node,
            max_frame,
            pending: Default::default(),
        }
    }

    /// Sends the first frame (`Submit`, `Attach` or `Cancel`).
    pub async fn send(&mut self, request: client_frame::Frame) -> std::io::Result<()> {
        write_frame(
            &mut self.stream,
            &ClientFrame {
                frame: Some(request),
            },
        )
        .await
    }

    /// The next event; `Ok(None)` when the node closed the stream cleanly. Node `Error` frames
    /// become `Err(NodeError)` (downcastable from the `anyhow::Error`).
    pub async fn next(&mut self) -> anyhow::Result<Option<SessionEvent>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(Some(event));
            }
            let Some(frame) = read_frame::<_, NodeFrame>(&mut self.stream, self.max_frame).await?
            else {
                return Ok(None);
            };
            return match frame.frame {
                Some(node_frame::Frame::Accepted(a)) => Ok(Some(SessionEvent::Accepted(a))),
                Some(node_frame::Frame::LogBatch(batch)) => {
                    self.pending
                        .extend(batch.lines.into_iter().map(SessionEvent::Line));
                    continue;
                }
                Some(node_frame::Frame::Progress(p)) => Ok(Some(SessionEvent::Progress(p))),
                Some(node_frame::Frame::End(end)) => {
                    verify_end(&end, self.node)?;
                    Ok(Some(SessionEvent::End(end)))
                }
                Some(node_frame::Frame::Error(e)) => Err(NodeError {
                    code: e.code,
                    message: e.message,
                    missing: e.missing,
                }
                .into()),
                None => anyhow::bail!("the node sent an empty frame"),
            };
        }
    }
}

/// Checks that an `End` is signed by `node`'s own key.
pub fn verify_end(end: &End, node: PeerId) -> anyhow::Result<()> {
    use rba_proto::Message;
    let body = end
        .body
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("end event without a body"))?;
    let signer = super::verify(
        &end.signer_public_key,
        &body.encode_to_vec(),
        &end.signature,
    )
    .map_err(|e| anyhow::anyhow!("end event signature: {e}"))?;
    anyhow::ensure!(
        signer == node,
        "end event signed by {signer}, not by the node {node}"
    );
    Ok(())
}
