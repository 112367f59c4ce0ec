//! The operator node: the CAS, the executor, the build history, the libp2p protocols and the
//! HTTP gateway joined into one process, with one data directory and one clean shutdown.
//!
//! Why: every face of the node (a libp2p `Submit`, `rba` without `--remote`, a WebSocket
//! reader, the REAPI server) must see the same store, the same job table and the same
//! history. [`NodeShared`] is that shared state, and [`NodeShared::submit`] is the node's only
//! way to start a job: it validates the request, turns it into an Action, consults the local
//! action cache and then the trusted peers (signed results only), makes sure the input root is
//! complete (fetching missing blobs from trusted peers, verified), and hands the Action to
//! `Executor::submit`, the one job path.
//!
//! Tenants and reads: every submission carries its tenant (`peer:…` for a libp2p client,
//! `tangle:SERVICE/CALLER` for a Tangle call, `local` for the embedded node), recorded in the
//! build's history record.
//! What a tenant may read is `rba_cas::access` (grants): a libp2p client is granted the blobs
//! it uploads (`p2p::blobs`) and, here, everything of a result it is served (the Action, the
//! input root, outputs, stdout/stderr and the log) before its end event goes out. Before a
//! job of a libp2p client or a Tangle caller runs or is answered from the cache, every blob of
//! its input root must be readable by it, whether this node holds the blob or not: the others
//! are listed as `missing_input`, so the client proves it holds them by uploading them
//! (knowing a digest is not enough to be served its build, nor a tree whose files this node
//! lacks or has evicted, nor a tree a trusted peer could supply). A Tangle caller is granted
//! the tree its `zip_uri` brought (`tangle::fetch`). Once the tree is proven, what the node
//! lacks of it is fetched from trusted peers, and their signed results serve the job: operators
//! that trust each other share their work, not their clients' trees. Trusted and sharing peers
//! read everything; `local` (the operator's own jobs) proves nothing.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use libp2p::{Multiaddr, PeerId};
use rba_cache_server::auth::Authenticator;
use rba_cas::{Cas, Digest};
use rba_executor::cargo::CargoJob;
use rba_executor::runner::{
    CARGO_INSTANCE, ExecuteRequest, Executor, ExecutorError, JobHandle, JobOutcome, JobState,
    JobStatus,
};
use rba_executor::tenant::Tenant;
use rba_executor::toolchains::ToolchainError;
use rba_proto::Message;
use rba_proto::rba::v1::{Artifact as WireArtifact, End, EndBody, JobStatus as WireStatus, Submit};
use tokio::sync::watch;

use crate::config::NodeConfig;
use crate::history::{BuildRecord, History, now_ms};
use crate::metrics::Metrics;
use crate::p2p::trusted::TrustedSource;
use crate::p2p::{CAS_PROTOCOL, Network, SESSION_PROTOCOL};
use rba_cas::layers::peer::{PeerFetch, PeerFetched, PeerSource};

/// Blobs listed in a `missing_input` error, at most (the client asks `Has` for the rest).
const MAX_LISTED_MISSING: usize = 1000;
/// How old a measure of the executor's cache usage may be.
const USAGE_MAX_AGE: Duration = Duration::from_secs(10);
/// How long one trusted peer gets to serve what a submission lacks.
const PEER_FETCH_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a submission was refused: an `Error` frame's code and message.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// Stable code (`unknown_job_kind`, `bad_digest`, `missing_input`, `forbidden`,
    /// `toolchain`, `internal`, `unknown_session`, `session_finished`).
    pub code: &'static str,
    /// For people.
    pub message: String,
    /// For `missing_input`: blobs the node lacks.
    pub missing: Vec<Digest>,
}

impl Refusal {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
            missing: Vec::new(),
        }
    }
}

/// The largest stored log a reader is served.
const MAX_STORED_LOG_BYTES: u64 = 1 << 30;

/// What a session name resolved to ([`NodeShared::resolve_session`]).
struct Resolved {
    /// The job's id.
    id: String,
    /// Its handle, while the executor knows the job.
    live: Option<JobHandle>,
    /// Its history record, when it was read.
    record: Option<BuildRecord>,
}

/// What every face of the node shares.
pub struct NodeShared {
    /// The configuration the node runs with.
    pub config: NodeConfig,
    /// The store.
    pub cas: Cas,
    /// The one job path.
    pub executor: Executor,
    /// The shared bucket, database and job queue of a scale-out front end (`None`: embedded).
    pub scale_out: Option<crate::compose::Shared>,
    /// Persisted build records.
    pub history: History,
    /// libp2p.
    pub network: Network,
    /// Counters.
    pub metrics: Metrics,
    /// Bearer tokens (the HTTP views of builds; the gRPC face has its own copy).
    pub auth: Authenticator,
    /// The store's peer tier: the trusted peers' stores, asked for what this one lacks.
    peers: PeerFetch,
    /// Peers that read every blob and result: the trusted and the sharing peers.
    readers: HashSet<PeerId>,
    allowed: Option<HashSet<PeerId>>,
    /// Held while a build record's alias is given or its outcome recorded, so neither
    /// overwrites the other and one owner's alias names one build (the aliases themselves
    /// are the history's: [`BuildRecord::alias`]).
    alias_lock: tokio::sync::Mutex<()>,
    /// `POST /execute`: how many run and wait.
    pub execute: crate::execute::ExecuteGate,
    /// libp2p streams being served (sessions, blob transfers): a shutdown waits for them to
    /// end so that clients of builds that finished during the drain fetch their outputs.
    active_streams: std::sync::atomic::AtomicUsize,
    /// The executor's cache usage and when it was measured (see [`NodeShared::cache_usage`]).
    usage: parking_lot::Mutex<Option<(std::time::Instant, rba_executor::caches::CacheUsage)>>,
}

impl std::fmt::Debug for NodeShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeShared")
            .field("peer_id", &self.network.peer_id())
            .field("data_dir", &self.config.data_dir)
            .finish()
    }
}

/// Where a session's lines and end come from.
pub enum SessionSource {
    /// The executor still knows the job (running or recently finished).
    Live(JobHandle),
    /// Only the history knows it (finished before a restart): replayed from the stored log.
    Finished(Box<BuildRecord>),
}

fn wire_status(status: JobStatus) -> WireStatus {
    match status {
        JobStatus::Success => WireStatus::Success,
        JobStatus::Failed | JobStatus::Error => WireStatus::Error,
        JobStatus::Cancelled => WireStatus::Cancelled,
    }
}

/// The unsigned end event of a finished job.
pub fn end_body(
    session_id: &str,
    action_digest: Digest,
    outcome: &JobOutcome,
    lines: u64,
) -> EndBody {
    EndBody {
        session_id: session_id.to_string(),
        status: wire_status(outcome.status) as i32,
        exit_code: outcome.exit_code,
        duration_ms: outcome.duration.as_millis() as u64,
        artifacts: outcome
            .artifacts
            .iter()
            .map(|a| WireArtifact {
                path: a.path.clone(),
                digest: Some(a.digest.to_wire()),
                is_executable: a.executable,
            })
            .collect(),
        log_digest: outcome.log.as_ref().map(|l| l.log.to_wire()),
        cache_hit: outcome.cache_hit,
        action_digest: Some(action_digest.to_wire()),
        last_seq: lines.saturating_sub(1),
        error: outcome.error.clone().unwrap_or_default(),
        lines,
    }
}

/// The end event of a session known only from the history.
pub fn end_body_from_record(record: &BuildRecord) -> EndBody {
    let parse = |text: &str| text.parse::<Digest>().ok().map(|d| d.to_wire());
    let status = match record.status.as_str() {
        "success" => WireStatus::Success,
        "cancelled" => WireStatus::Cancelled,
        _ => WireStatus::Error,
    };
    let lines = record.lines.unwrap_or(0);
    EndBody {
        session_id: record.id.clone(),
        status: status as i32,
        exit_code: record.exit_code.unwrap_or(-1),
        duration_ms: record.duration_ms.unwrap_or(0),
        artifacts: record
            .artifacts
            .iter()
            .map(|a| WireArtifact {
                path: a.path.clone(),
                digest: parse(&a.digest),
                is_executable: a.executable,
            })
            .collect(),
        log_digest: record.log_digest.as_deref().and_then(parse),
        cache_hit: record.cache_hit,
        action_digest: parse(&record.action_digest),
        last_seq: lines.saturating_sub(1),
        error: record.error.clone().unwrap_or_default(),
        lines,
    }
}

/// A workspace hint made safe for a directory name.
fn sanitize_hint(hint: &str) -> String {
    let clean: String = hint
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(64)
        .collect();
    if clean.is_empty() || clean.chars().all(|c| c == '.') {
        "default".to_string()
    } else {
        clean
    }
}

impl NodeShared {
    /// True when `peer` reads every blob, result and session of this node (a trusted or
    /// sharing peer).
    pub fn reads_everything(&self, peer: &PeerId) -> bool {
        self.readers.contains(peer)
    }

    /// Whether `peer` holds every input of the stored Action `action`: its input tree is all
    /// readable by it ([`NodeShared::unproven_inputs`]), or it reads everything. False when
    /// the Action is not here or not an Action.
    pub async fn peer_holds_inputs(&self, peer: &PeerId, action: &Digest) -> bool {
        if self.reads_everything(peer) {
            return true;
        }
        let (cas, action) = (self.cas.clone(), *action);
        let root = tokio::task::spawn_blocking(move || {
            let bytes = cas.blobs.read_to_vec(&action, 1 << 20).ok()?;
            let decoded = rba_proto::reapi::Action::decode(bytes.as_slice()).ok()?;
            Digest::from_reapi_field(
                action.function,
                decoded.input_root_digest.as_ref(),
                "Action.input_root_digest",
            )
            .ok()
        })
        .await
        .ok()
        .flatten();
        match root {
            Some(root) => self
                .unproven_inputs(&Tenant::peer(peer), root)
                .await
                .is_empty(),
            None => false,
        }
    }

    /// Whether `peer` may read `digest` (it uploaded it, was served it, or reads everything).
    pub fn peer_may_read(&self, peer: &PeerId, digest: &Digest) -> bool {
        self.reads_everything(peer)
            || self
                .cas
                .reads
                .may_read(Tenant::peer(peer).as_str(), digest)
                .unwrap_or(false)
    }

    /// The job session `id` names for a reader: `id` itself when it is a job's id, else the
    /// first job aliased to it ([`NodeShared::alias_session`]) that `visible` accepts.
    /// `visible` is given the job's owner tenant: the submitter the executor's registry names
    /// while it knows the job, else its history record's (`None` for a record from before
    /// tenants). The one place a session name becomes a job: the live handle, or the record,
    /// each looked up once.
    async fn resolve(&self, id: &str, visible: impl Fn(Option<&str>) -> bool) -> Option<Resolved> {
        if let Some(handle) = self.executor.job(id) {
            return visible(Some(handle.tenant.as_str())).then(|| Resolved {
                id: id.to_string(),
                live: Some(handle),
                record: None,
            });
        }
        let record = match self.history.get(id).await {
            Some(record) => visible(record.tenant.as_deref()).then_some(record)?,
            None => self
                .history
                .aliased(id)
                .await
                .into_iter()
                .find(|record| visible(record.tenant.as_deref()))?,
        };
        Some(Resolved {
            id: record.id.clone(),
            live: self.live_job(&record).await,
            record: Some(record),
        })
    }

    /// The live job of a visible history record: this node's, or on a scale-out front end one
    /// that another front end runs, followed here (`Executor::find_job`) so that its log and
    /// outcome stream from whichever front end a client reaches. A finished record has none.
    async fn live_job(&self, record: &BuildRecord) -> Option<JobHandle> {
        if let Some(handle) = self.executor.job(&record.id) {
            return Some(handle);
        }
        if record.is_finished() {
            return None;
        }
        let owner = record.tenant.as_deref();
        match self
            .executor
            .find_job(&record.id, |tenant| Some(tenant.as_str()) == owner)
            .await
        {
            Ok(handle) => handle,
            Err(error) => {
                tracing::warn!(session = %record.id, %error, "following another front end's job failed");
                None
            }
        }
    }

    /// The job id session `id` names for a reader that `visible` lets see its owner (see
    /// [`NodeShared::visible_session`]).
    pub async fn resolve_session(
        &self,
        id: &str,
        visible: impl Fn(Option<&str>) -> bool,
    ) -> Option<String> {
        self.resolve(id, visible).await.map(|resolved| resolved.id)
    }

    /// Whether `peer` may attach to a job owned by `owner`: its owner, or a peer that reads
    /// everything.
    pub fn peer_may_follow(&self, peer: &PeerId, owner: Option<&str>) -> bool {
        self.reads_everything(peer) || owner == Some(Tenant::peer(peer).as_str())
    }

    /// Cancels session `id` (or an alias) for `tenant`, which must be the tenant that
    /// submitted it: the job is stopped by [`JobHandle::cancel`], the one cancel path (the
    /// REAPI `CancelOperation` takes it too: a queued job never starts, a running sandbox is
    /// killed), and its handle is returned so the caller can wait for the end. Cancelling is
    /// its owner's alone, not that of the peers that may read everything: to any other tenant
    /// the session is `unknown_session`, the answer `Attach` gives for a foreign or missing
    /// one; a session that already ended is `session_finished`.
    pub async fn cancel_session(&self, tenant: &Tenant, id: &str) -> Result<JobHandle, Refusal> {
        let unknown = || Refusal::new("unknown_session", format!("no session {id:?} on this node"));
        let finished = |status: &str| {
            Refusal::new(
                "session_finished",
                format!("session {id:?} already ended ({status}): nothing to cancel"),
            )
        };
        let owned = |owner: Option<&str>| owner == Some(tenant.as_str());
        match self.visible_session(id, owned).await {
            Some(SessionSource::Live(handle)) => {
                if let JobState::Done(outcome) = handle.state() {
                    return Err(finished(crate::history::status_name(outcome.status)));
                }
                tracing::info!(job = %handle.id, tenant = tenant.as_str(), "session cancelled by its owner");
                handle.cancel();
                Ok(handle)
            }
            Some(SessionSource::Finished(record)) => Err(finished(&record.status)),
            None => Err(unknown()),
        }
    }

    /// Grants the owner of session `job_id` every blob of its result (see the module doc).
    /// Called before a result goes out, so the client can fetch what its end names.
    pub async fn grant_session_result(&self, job_id: &str, outcome: &JobOutcome) {
        let Some(record) = self.history.get(job_id).await else {
            return;
        };
        let (Some(tenant), Ok(action), Ok(root)) = (
            record.tenant.as_deref(),
            record.action_digest.parse::<Digest>(),
            record.input_root.parse::<Digest>(),
        ) else {
            return;
        };
        self.grant_result(tenant, action, root, outcome).await;
    }

    /// Grants `tenant` the Action, the input root, the outputs and logs of a result.
    async fn grant_result(&self, tenant: &str, action: Digest, root: Digest, outcome: &JobOutcome) {
        let (cas, tenant) = (self.cas.clone(), tenant.to_string());
        let mut digests = vec![action];
        if let Some(log) = &outcome.log {
            digests.extend([log.log, log.stdout, log.stderr]);
        }
        digests.extend(outcome.artifacts.iter().map(|a| a.digest));
        let result = outcome.result.clone();
        let granted = tokio::task::spawn_blocking(move || {
            if let Some(result) = &result {
                digests.extend(cas.actions.referenced_blobs(action.function, result)?);
            }
            match rba_cas::tree_digests(&cas.blobs, &root) {
                Ok(tree) => digests.extend(tree),
                // An input tree evicted meanwhile: nothing of it to grant.
                Err(rba_cas::CasError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
            cas.reads.grant(&tenant, &digests)
        })
        .await;
        match granted {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "granting a result's blobs"),
            Err(e) => tracing::warn!(error = %e, "granting a result's blobs"),
        }
    }

    /// Blobs of the input tree under `root` that `tenant` has not proven it holds: every one
    /// it may not read, present here or not (a directory without its contents, which are
    /// asked for once it is uploaded), and every directory this node lacks (its contents
    /// cannot be checked before it is here again). Empty: the whole tree is the tenant's.
    async fn unproven_inputs(&self, tenant: &Tenant, root: Digest) -> Vec<Digest> {
        let (cas, tenant) = (self.cas.clone(), tenant.as_str().to_string());
        tokio::task::spawn_blocking(move || {
            let mut unproven = Vec::new();
            let mut queue = vec![root];
            let mut seen = HashSet::new();
            while let Some(directory) = queue.pop() {
                if !seen.insert(directory) {
                    continue;
                }
                if !cas.reads.may_read(&tenant, &directory)? {
                    unproven.push(directory);
                    continue;
                }
                let dir = match rba_cas::read_directory(&cas.blobs, &directory) {
                    Ok(dir) => dir,
                    Err(rba_cas::CasError::NotFound(_)) => {
                        unproven.push(directory);
                        continue;
                    }
                    // Not a Directory: refused as an invalid input once the action is built.
                    Err(_) => continue,
                };
                let function = directory.function;
                let files: Vec<Digest> = dir
                    .files
                    .iter()
                    .filter_map(|f| Digest::from_reapi_field(function, f.digest.as_ref(), "f").ok())
                    .collect();
                let readable: HashSet<Digest> =
                    cas.reads.has(&tenant, &files)?.into_iter().collect();
                unproven.extend(files.into_iter().filter(|f| !readable.contains(f)));
                queue.extend(dir.directories.iter().filter_map(|d| {
                    Digest::from_reapi_field(function, d.digest.as_ref(), "d").ok()
                }));
            }
            unproven.sort();
            unproven.dedup();
            anyhow::Ok(unproven)
        })
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_else(|| vec![root])
    }

    /// Slots and the shared registry cache's size (`/cache/stats`, the dashboard): a walk of
    /// the cargo home, so measured at most every [`USAGE_MAX_AGE`] and off the async threads.
    pub async fn cache_usage(&self) -> rba_executor::caches::CacheUsage {
        if let Some((at, usage)) = *self.usage.lock()
            && at.elapsed() < USAGE_MAX_AGE
        {
            return usage;
        }
        let executor = self.executor.clone();
        let usage = tokio::task::spawn_blocking(move || executor.cache_usage())
            .await
            .unwrap_or_default();
        *self.usage.lock() = Some((std::time::Instant::now(), usage));
        usage
    }

    /// True when `peer` may upload and submit.
    pub fn may_submit(&self, peer: &PeerId) -> bool {
        self.allowed.as_ref().is_none_or(|a| a.contains(peer))
    }

    /// Signs an end event with the node's identity.
    pub fn sign_end(&self, body: EndBody) -> End {
        let (signature, key) = crate::p2p::sign(self.network.keypair(), &body.encode_to_vec());
        End {
            body: Some(body),
            signature,
            signer_public_key: key,
        }
    }

    /// Makes session `job_id` reachable as `alias` too (a Tangle job's on-chain session id) for
    /// its owner, in its history record (so the alias outlives the node, and a scale-out front
    /// end's is every front end's); false, and nothing changed, when `alias` is a job's id or
    /// already names a session of the same owner (another owner's use of the same alias is no
    /// conflict), or the history cannot record it.
    pub async fn alias_session(&self, alias: &str, job_id: &str) -> bool {
        let _one_at_a_time = self.alias_lock.lock().await;
        let Some(mut record) = self.history.get(job_id).await else {
            return false;
        };
        if self.executor.job(alias).is_some() || self.history.get(alias).await.is_some() {
            return false;
        }
        let aliased = self.history.aliased(alias).await;
        if aliased.iter().any(|other| other.tenant == record.tenant) {
            return false;
        }
        record.alias = Some(alias.to_string());
        match self.history.put(&record).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), alias, job_id, "recording a session alias");
                false
            }
        }
    }

    /// The blob counters of the store the node's jobs and faces use: the embedded store, or
    /// scaled out the shared one (the bucket's index), not this front end's local tier.
    pub fn store_stats(&self) -> rba_cas::StoreStats {
        self.executor.stores().blobs().stats()
    }

    /// Entries of the action cache the executor answers from (scaled out: the shared one's,
    /// from the database's counters, not this front end's local cache): a counter, not a scan.
    pub fn action_cache_entries(&self) -> u64 {
        rba_cas::ActionCache::len(self.executor.stores().actions())
    }

    /// Jobs waiting for a worker: this executor's queue, or scaled out the shared queue's
    /// (its own when the database cannot answer, logged).
    pub async fn jobs_queued(&self) -> u64 {
        if let Some(dispatch) = self.executor.dispatch() {
            match dispatch.queue().depth().await {
                Ok(depth) => return depth.queued,
                Err(e) => tracing::warn!(error = %e, "reading the shared queue's depth"),
            }
        }
        self.executor.queue_len() as u64
    }

    /// The lines of a finished job's stored log, read through the executor's stores (scaled
    /// out: from the shared store when this front end's local tier does not hold it, e.g.
    /// a build another front end, or this one before a fresh start, recorded).
    pub async fn stored_log(
        &self,
        digest: &Digest,
    ) -> anyhow::Result<Vec<rba_executor::logstream::LogLine>> {
        let bytes = self
            .executor
            .stores()
            .blobs()
            .read_to_vec(digest, MAX_STORED_LOG_BYTES)
            .await
            .with_context(|| format!("reading the stored log {digest:?}"))?;
        Ok(rba_executor::logstream::parse_log_blob(&bytes)?)
    }

    /// The session `id` (a job id or an alias) names for a reader that `visible` lets see
    /// its owner: the live job, or its finished record.
    pub async fn visible_session(
        &self,
        id: &str,
        visible: impl Fn(Option<&str>) -> bool,
    ) -> Option<SessionSource> {
        let resolved = self.resolve(id, visible).await?;
        if let Some(handle) = resolved.live {
            return Some(SessionSource::Live(handle));
        }
        resolved
            .record
            .filter(BuildRecord::is_finished)
            .map(|record| SessionSource::Finished(Box::new(record)))
    }

    /// A session by job id or alias for a reader that sees every owner (the first job the
    /// alias names; a reader that must see only its own uses
    /// [`NodeShared::visible_session`]).
    pub async fn session(&self, id: &str) -> Option<SessionSource> {
        self.visible_session(id, |_| true).await
    }

    /// Validates and starts a job (see the module doc). `peer` is the libp2p submitter
    /// (`None` for local and Tangle submissions); `tenant` is who the job builds as (its slot
    /// and the results it may be served).
    pub async fn submit(
        self: &Arc<Self>,
        peer: Option<PeerId>,
        tenant: rba_executor::tenant::Tenant,
        submit: Submit,
    ) -> Result<JobHandle, Refusal> {
        let result = self.submit_inner(peer, tenant, submit).await;
        match &result {
            Ok(_) => self.metrics.inc_submitted(),
            // The normal first answer to a new tree: the client uploads and submits again.
            Err(refusal) if refusal.code == "missing_input" => {}
            Err(_) => self.metrics.inc_refused(),
        }
        result
    }

    async fn submit_inner(
        self: &Arc<Self>,
        peer: Option<PeerId>,
        tenant: rba_executor::tenant::Tenant,
        submit: Submit,
    ) -> Result<JobHandle, Refusal> {
        if let Some(peer) = &peer
            && !self.may_submit(peer)
        {
            return Err(Refusal::new(
                "forbidden",
                format!("{peer} is not an allowed client of this node"),
            ));
        }
        let job = CargoJob::from_proto(submit.kind, submit.options.as_ref())
            .map_err(|e| Refusal::new("unknown_job_kind", e.to_string()))?;
        let root = submit
            .input_root
            .as_ref()
            .ok_or_else(|| Refusal::new("bad_digest", "Submit without an input root"))?;
        let root = Digest::from_wire(root)
            .map_err(|e| Refusal::new("bad_digest", format!("input root: {e}")))?;
        // Proof of possession, before the cache is asked (see the module doc).
        let must_prove = match &peer {
            Some(peer) => !self.reads_everything(peer),
            None => tenant != Tenant::local(),
        };
        if must_prove {
            let unproven = self.unproven_inputs(&tenant, root).await;
            if !unproven.is_empty() {
                let count = unproven.len();
                let mut refusal = Refusal::new(
                    "missing_input",
                    format!(
                        "upload {count} blob(s) of input root {root:?}: this node serves a \
                         tree only to clients that uploaded it"
                    ),
                );
                refusal.missing = unproven.into_iter().take(MAX_LISTED_MISSING).collect();
                return Err(refusal);
            }
        }

        // After the proof of possession: the toolchain is read from the tree
        // (`rust-toolchain.toml`), whose root directory and toolchain file must be here; a
        // trusted peer may supply a proven file the node lacks (not the whole tree: the
        // result may be a cache hit).
        let mut prepared = self.executor.cargo_action(&job, root).await;
        for _ in 0..4 {
            let Err(ExecutorError::Toolchain(ToolchainError::Cas(rba_cas::CasError::NotFound(
                digest,
            )))) = &prepared
            else {
                break;
            };
            if !self.peers.fetch_blob(*digest).await {
                break;
            }
            prepared = self.executor.cargo_action(&job, root).await;
        }
        let prepared = prepared.map_err(|e| match e {
            ExecutorError::Toolchain(ToolchainError::Cas(rba_cas::CasError::NotFound(digest))) => {
                let mut refusal = Refusal::new(
                    "missing_input",
                    format!("the node lacks blob {digest:?} of input root {root:?}"),
                );
                refusal.missing = vec![digest];
                refusal
            }
            ExecutorError::Toolchain(e) => Refusal::new("toolchain", e.to_string()),
            e => Refusal::new("internal", format!("storing the action: {e}")),
        })?;
        let action_digest = prepared.action_digest;

        if !self.has_cached_result(&tenant, action_digest).await
            && !self
                .peers
                .fetch_action_result(CARGO_INSTANCE, action_digest)
                .await
        {
            let missing = self.peers.complete_tree(root).await;
            if !missing.is_empty() {
                let count = missing.len();
                let mut refusal = Refusal::new(
                    "missing_input",
                    format!("the node lacks {count} blob(s) of input root {root:?}"),
                );
                refusal.missing = missing.into_iter().take(MAX_LISTED_MISSING).collect();
                return Err(refusal);
            }
        }

        let identity = format!(
            "p2p/{}/{}",
            peer.map(|p| p.to_string())
                .unwrap_or_else(|| "local".to_string()),
            sanitize_hint(&submit.workspace_hint)
        );
        let handle = self
            .executor
            .submit(ExecuteRequest {
                instance: CARGO_INSTANCE.to_string(),
                action_digest,
                skip_cache_lookup: false,
                workspace_identity: Some(identity),
                tenant: tenant.clone(),
                limits: crate::client::limits_from_wire(submit.limits.as_ref()),
            })
            .await
            .map_err(|e| match e {
                // The client's input (a hostile tree, limits that mean nothing): its fault.
                rba_executor::runner::ExecutorError::Action(
                    rba_executor::action::ActionError::Invalid { .. },
                ) => Refusal::new("invalid_input", e.to_string()),
                rba_executor::runner::ExecutorError::Draining => {
                    Refusal::new("unavailable", e.to_string())
                }
                e => Refusal::new("internal", format!("submitting: {e}")),
            })?;
        let record = BuildRecord {
            id: handle.id.clone(),
            kind: job.kind.name().to_string(),
            release: job.release,
            input_root: format!("{root:?}"),
            action_digest: format!("{action_digest:?}"),
            client: peer.map(|p| p.to_string()),
            workspace: Some(sanitize_hint(&submit.workspace_hint)),
            tenant: Some(tenant.as_str().to_string()),
            alias: None,
            submitted_at_ms: now_ms(),
            status: "running".to_string(),
            exit_code: None,
            cache_hit: false,
            duration_ms: None,
            steps: Vec::new(),
            log_digest: None,
            lines: None,
            artifacts: Vec::new(),
            error: None,
        };
        if let Err(e) = self.history.put(&record).await {
            tracing::warn!(error = %e, "recording a build");
        }
        let (node, watched, kind) = (self.clone(), handle.clone(), job.kind.name());
        tokio::spawn(async move {
            let outcome = watched.wait().await;
            node.grant_result(tenant.as_str(), action_digest, root, &outcome)
                .await;
            let lines = watched.log.wait_finished().await.lines;
            let mut record = record;
            record.finish(&outcome, lines);
            {
                // An alias given meanwhile is kept (see `alias_lock`).
                let _aliases = node.alias_lock.lock().await;
                if let Some(stored) = node.history.get(&record.id).await {
                    record.alias = stored.alias;
                }
                if let Err(e) = node.history.put(&record).await {
                    tracing::warn!(error = %e, "recording a build outcome");
                }
            }
            node.metrics
                .job_finished(kind, outcome.status, outcome.cache_hit, outcome.duration);
        });
        Ok(handle)
    }

    /// Whether the job of `tenant` for `action_digest` will be a cache hit, as the executor
    /// decides it ([`rba_executor::runner::Executor::cached_success`]: the tenant's own
    /// namespace, then the shared one, in the embedded or a front end's shared cache); then
    /// its inputs need not be here.
    async fn has_cached_result(&self, tenant: &Tenant, action_digest: Digest) -> bool {
        self.executor
            .cached_success(CARGO_INSTANCE, tenant, &action_digest)
            .await
            .ok()
            .flatten()
            .is_some()
    }
}

/// A running operator node.
pub struct Node {
    shared: Arc<NodeShared>,
    http_addr: Option<SocketAddr>,
    grpc_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("peer_id", &self.peer_id())
            .field("http", &self.http_addr)
            .finish()
    }
}

impl Node {
    /// Opens the data directory, starts the executor, libp2p, HTTP (and gRPC when configured).
    pub async fn start(config: NodeConfig) -> anyhow::Result<Node> {
        config.validate()?;
        let data_dir: PathBuf = config.data_dir.clone();
        // The store under the data dir and, scaled out, the bucket and the database (reached
        // before anything binds: a wrong URL fails the start naming its variable). Every face
        // serves the same stores, and the executor runs over them. See `compose`.
        let crate::compose::Backends {
            cas,
            shared: scale_out,
            stores,
        } = crate::compose::backends(&config).await?;
        let executor_config = crate::compose::executor_config(&config, &data_dir.join("executor"))?;
        let executor = crate::compose::front_end_executor(
            &cas,
            executor_config,
            scale_out.as_ref().map(|shared| (shared, stores.clone())),
        )?;
        let reapi = match config.servers.reapi {
            Some(addr) => Some((
                crate::grpc::server(&config, stores.clone(), Some(executor.clone()))?,
                addr,
            )),
            None => None,
        };
        let keypair = crate::p2p::load_or_create_identity(&data_dir.join("identity.key"))?;
        let history = crate::compose::history(
            &cas,
            scale_out.as_ref(),
            &keypair.public().to_peer_id().to_string(),
        )
        .await?;
        let interrupted = history.mark_interrupted().await?;
        if interrupted > 0 {
            tracing::warn!(interrupted, "builds interrupted by the last stop");
        }
        let network = Network::start(
            keypair,
            Duration::from_secs(config.servers.idle_timeout_secs),
        )?;
        for address in &config.servers.libp2p {
            network.listen(address.parse()?).await?;
        }
        let trusted = config
            .trusted_peers
            .iter()
            .map(|p| p.parse())
            .collect::<anyhow::Result<Vec<(PeerId, Vec<Multiaddr>)>>>()?;
        let mut readers: HashSet<PeerId> = trusted.iter().map(|(peer, _)| *peer).collect();
        readers.extend(
            config
                .sharing_peers
                .iter()
                .filter_map(|p| p.parse::<PeerId>().ok()),
        );
        let allowed = config
            .allowed_clients
            .as_ref()
            .map(|list| list.iter().filter_map(|p| p.parse().ok()).collect());
        let metrics = Metrics::default();
        let counters = metrics.clone();
        let peers = PeerFetch::new(
            cas.blobs.clone(),
            cas.actions.clone(),
            trusted
                .into_iter()
                .map(|(id, addresses)| {
                    Arc::new(TrustedSource::new(
                        id,
                        addresses,
                        network.clone(),
                        config.servers.max_frame_bytes,
                    )) as Arc<dyn PeerSource>
                })
                .collect(),
            PEER_FETCH_TIMEOUT,
        )
        .observed_by(move |fetched| match fetched {
            PeerFetched::Blob => counters.inc_peer_fetched_blobs(),
            PeerFetched::ActionResult => counters.inc_peer_action_results(),
        });
        let shared = Arc::new(NodeShared {
            config: config.clone(),
            cas,
            executor,
            scale_out,
            history,
            network,
            metrics,
            auth: Authenticator::from_auth(&config.auth),
            peers,
            readers,
            allowed,
            alias_lock: tokio::sync::Mutex::new(()),
            execute: crate::execute::ExecuteGate::new(config.execute.clone()),
            active_streams: Default::default(),
            usage: Default::default(),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        tasks.push(accept_loop(
            shared.clone(),
            SESSION_PROTOCOL,
            shutdown_rx.clone(),
            |node, peer, stream| tokio::spawn(crate::p2p::session::serve(node, peer, stream)),
        )?);
        tasks.push(accept_loop(
            shared.clone(),
            CAS_PROTOCOL,
            shutdown_rx.clone(),
            |node, peer, stream| tokio::spawn(crate::p2p::blobs::serve(node, peer, stream)),
        )?);
        let mut http_addr = None;
        if let Some(addr) = config.servers.http {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding HTTP on {addr}"))?;
            http_addr = Some(listener.local_addr()?);
            let (node, stop) = (shared.clone(), shutdown_rx.clone());
            tasks.push(tokio::spawn(async move {
                if let Err(e) = crate::http::serve(node, listener, stop).await {
                    tracing::error!(error = %e, "HTTP server");
                }
            }));
        }
        let mut grpc_addr = None;
        if let Some((server, addr)) = reapi {
            let (bound, task) = crate::grpc::spawn(server, addr, shutdown_rx.clone()).await?;
            grpc_addr = Some(bound);
            tasks.push(task);
        }
        Ok(Node {
            shared,
            http_addr,
            grpc_addr,
            shutdown,
            tasks,
        })
    }

    /// The shared state (for tests and embedders).
    pub fn shared(&self) -> &Arc<NodeShared> {
        &self.shared
    }

    /// The node's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.shared.network.peer_id()
    }

    /// libp2p addresses with `/p2p/PEERID`, as `--remote` takes them.
    pub fn dialable_addrs(&self) -> Vec<Multiaddr> {
        self.shared.network.dialable_addrs()
    }

    /// The first TCP address with `/p2p/PEERID`.
    pub fn tcp_addr(&self) -> Option<Multiaddr> {
        self.dialable_addrs().into_iter().find(|a| {
            a.iter()
                .any(|p| matches!(p, libp2p::multiaddr::Protocol::Tcp(_)))
        })
    }

    /// The first QUIC address with `/p2p/PEERID`.
    pub fn quic_addr(&self) -> Option<Multiaddr> {
        self.dialable_addrs().into_iter().find(|a| {
            a.iter()
                .any(|p| matches!(p, libp2p::multiaddr::Protocol::QuicV1))
        })
    }

    /// The HTTP address, when enabled.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The REAPI gRPC address, when enabled.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc_addr
    }

    /// Drains, then stops: no new job is taken, the jobs already taken get
    /// `[workers] shutdown_grace_secs` to finish (then they are
    /// cancelled), then every face and task stops and the store is flushed.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let grace = Duration::from_secs(self.shared.config.workers.shutdown_grace_secs);
        let deadline = tokio::time::Instant::now() + grace;
        let busy = self
            .shared
            .executor
            .jobs()
            .iter()
            .any(|job| !matches!(job.state(), rba_executor::runner::JobState::Done(_)));
        let cancelled = self.shared.executor.drain(grace).await;
        if cancelled > 0 {
            tracing::warn!(
                cancelled,
                "jobs cancelled at shutdown after the grace period"
            );
        }
        // Clients of builds that just ended fetch their artifacts next: serve until no stream
        // has been open for a moment, within what is left of the grace period.
        let mut quiet_since = None;
        while busy && tokio::time::Instant::now() < deadline {
            let open = self
                .shared
                .active_streams
                .load(std::sync::atomic::Ordering::SeqCst);
            let now = tokio::time::Instant::now();
            match (open, quiet_since) {
                (0, None) => quiet_since = Some(now),
                (0, Some(since)) if now - since >= QUIET_BEFORE_STOP => break,
                (0, Some(_)) => {}
                _ => quiet_since = None,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
        self.shared.network.shutdown();
        self.shared.cas.blobs.flush()?;
        Ok(())
    }
}

/// At shutdown, how long no libp2p stream must have been open before the node stops.
const QUIET_BEFORE_STOP: Duration = Duration::from_millis(1500);

type Spawn = fn(Arc<NodeShared>, PeerId, libp2p::Stream) -> tokio::task::JoinHandle<()>;

fn accept_loop(
    node: Arc<NodeShared>,
    protocol: libp2p::StreamProtocol,
    mut stop: watch::Receiver<bool>,
    spawn: Spawn,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut incoming = node
        .network
        .control()
        .accept(protocol.clone())
        .map_err(|_| anyhow::anyhow!("{protocol} is already registered"))?;
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                next = incoming.next() => match next {
                    Some((peer, stream)) => {
                        use std::sync::atomic::Ordering;
                        node.active_streams.fetch_add(1, Ordering::SeqCst);
                        let served = spawn(node.clone(), peer, stream);
                        let node = node.clone();
                        tokio::spawn(async move {
                            let _ = served.await;
                            node.active_streams.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                    None => return,
                },
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_are_safe_directory_names() {
        assert_eq!(sanitize_hint("hello"), "hello");
        assert_eq!(sanitize_hint("../../etc"), "....etc");
        assert_eq!(sanitize_hint(".."), "default");
        assert_eq!(sanitize_hint(""), "default");
        assert_eq!(sanitize_hint(&"x".repeat(100)).len(), 64);
    }
}
