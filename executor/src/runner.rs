//! The one path every job takes: a cargo job from `rba`, a libp2p `Submit`, a Tangle job and a
//! REAPI `Execute` call all end in [`Executor::submit`] with an Action digest.
//!
//! ```text
//! submit(instance, action digest)
//!   ├─ action cache hit (exit 0, complete) ─► replay its log ─► Done { cache_hit }
//!   └─ miss ─► queue (N workers) ─► workload:
//!        cargo   (platform `job` = build|test|…): slot lock ─► sync sources (mtime-normalised)
//!                ─► [no Cargo.lock: resolve one, network] ─► fetch phase (network, once per
//!                Cargo.lock) ─► build phase (no network)
//!                ─► artifacts from cargo's JSON into the CAS
//!        command (anything else, e.g. Bazel): materialise the input root in a scratch dir
//!                ─► run ─► collect `output_paths` into the CAS
//!      ─► stdout/stderr/log into the CAS ─► ActionResult ─► action cache (successes) or the
//!         failed-results namespace (failures: kept, but re-run on resubmission) ─► Done
//! ```
//! The action cache is a seam ([`Executor::with_stores`]): the embedded one of the `Cas`, or a
//! scale-out deployment's shared one. A scale-out front end ([`Executor::with_dispatch`])
//! takes the same path up to the miss, then, instead of a local slot, publishes the inputs,
//! queues the job for the workers, mirrors its log and makes its outputs local
//! ([`crate::scheduler::dispatch`]); the worker runs the workload above, namespaces included.
//! Every job has a [`LogStream`] registered under its id before it starts, so every transport
//! reads the same lines; its state ([`JobState`]) is a `watch` channel (queued with position,
//! running with progress, done with the outcome).
//!
//! ## Results nobody else influenced
//!
//! A cargo job's target dir outlives the job (that is what makes a resubmission incremental),
//! and it is not part of the Action digest. Whoever wrote into it could steer what the next
//! build in it outputs (a build script plants a fingerprint or an artifact). The rule:
//!
//! - **Slots belong to one tenant.** A slot is keyed by (tenant, workspace identity,
//!   toolchain) ([`CacheLayout::slot`]); no job ever runs in a target dir another tenant's job
//!   wrote.
//! - **A result is shared only if its build was clean.** A job's [`Provenance`] is
//!   [`Provenance::Clean`] when every input of the build was in its input root or produced by
//!   the executor from inputs no other party could steer: a REAPI command's fresh exec root, or
//!   a cargo job whose target dir was empty when the job took the slot. Only such a success is
//!   stored in the instance's shared namespace (the instance name itself, e.g. `rba/cargo`),
//!   where any tenant is served it. A success built on a reused target dir is
//!   [`Provenance::TenantState`] and goes to the namespace of the tenant that owns the slot
//!   (`instance \0tenant:<tenant>`); failures always go to the tenant's failed namespace (kept,
//!   never served). [`result_namespace`] is the one place this is decided.
//! - **Lookup:** the tenant's own namespace, then the shared one ([`lookup_namespaces`]); a job
//!   is never served another tenant's scoped result. The same tenant's unchanged resubmission
//!   still hits.
//! - **Clients cannot write these namespaces.** [`is_executor_namespace`] names what REAPI
//!   `UpdateActionResult` refuses; [`is_private_namespace`] names what no client reads.
//!
//! - **Shared units** ([`crate::shared_units`]) are the one thing a fresh slot receives before its
//!   build: registry units the executor compiled in a clean build without workspace-controlled
//!   input, copied into the empty target dir. The build stays [`Provenance::Clean`]: they are
//!   executor-made, and cargo uses one only if its fingerprint matches this build's.
//!
//! What every tenant shares and trusts: the toolchains (read-only; the job's is the one its
//! action names, see [`crate::toolchains`]), the advisory database of audit jobs (read-only)
//! and the cargo home, written only by `cargo fetch` and `cargo generate-lockfile` (which run no
//! build script or proc macro) and mounted read-only in the build phase.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use rba_cas::merkle::beneath::{Beneath, EntryKind};
use rba_cas::merkle::{self, DirOptions, MaterializeOptions, TreeLimits};
use rba_cas::{ActionCache, Cas, CasError, Digest, DigestFunction, Stores};
use rba_proto::Message;
use rba_proto::reapi::platform::Property;
use rba_proto::reapi::{self, ActionResult, ExecutedActionMetadata, OutputDirectory, OutputFile};
use tokio::sync::{Notify, Semaphore, watch};

use crate::action::{
    ActionError, LOCKFILE_PROPERTY, LOCKFILE_REQUIRED, PreparedAction, Toolchain, cargo_platform,
    store_cargo_action,
};
use crate::caches::{CacheLayout, Slot, SlotLock};
use crate::cargo::{
    ADVISORY_DB, CARGO_AUDIT, CargoEvent, CargoJob, CargoOutputParser, FETCH_CWD, JobKind,
    RECORDS_FORMAT, RESOLVE_DIR, fetch_argv, lockfile_unit_estimate, resolve_argv,
};
use crate::egress::{EgressPolicy, EgressProxy};
use crate::logstream::{
    LogConfig, LogDigests, LogStream, LogStreamKind, LogWriter, parse_log_blob,
};
use crate::sandbox::{
    LimitKind, Limits, Mount, NetworkPolicy, OutputLine, Sandbox, SandboxConfig, SandboxError,
    SandboxSpec, Stream, TARGET_DIR, WORKSPACE_DIR,
};
use crate::shared_units::{BuildUnits, SharedUnits, UnitsPlan};
use crate::tenant::Tenant;
use crate::toolchains::Toolchains;
use crate::workspace::{DesiredEntry, read_lockfile, sync_directory};

/// The platform property of audit jobs naming the advisory database's state
/// ([`advisory_db_identity`]).
pub const ADVISORY_DB_PROPERTY: &str = "advisory-db";
/// The output path of a lock file the executor resolved for a workspace without one.
pub const RESOLVED_LOCK_PATH: &str = "Cargo.lock";
/// Largest lock file the resolution may produce.
const MAX_RESOLVED_LOCK_BYTES: u64 = 64 << 20;

/// The instance name cargo jobs use in the action cache.
pub const CARGO_INSTANCE: &str = "rba/cargo";
/// The output file under which a cargo job's full log (ordered, both streams) is kept.
pub const LOG_OUTPUT_PATH: &str = ".rba/log.jsonl";
/// How long a finished job stays queryable by id (its results stay in the CAS for good).
pub const JOB_RETENTION: Duration = Duration::from_secs(3600);
/// Largest Action blob made local for a submission over shared stores.
const MAX_ACTION_BYTES: u64 = 1 << 20;
/// Largest stdout/stderr/log blob replayed on a cache hit.
const MAX_REPLAY_BYTES: u64 = 256 << 20;

/// How the executor runs jobs.
#[derive(Clone, Debug)]
pub struct ExecutorConfig {
    /// Caches and scratch directories.
    pub data_dir: PathBuf,
    /// Jobs running at once.
    pub workers: usize,
    /// Limits of every sandboxed run, and the node's maxima: a job's [`JobLimits`] and an
    /// Action's `timeout` can only lower them.
    pub limits: Limits,
    /// Size of each slot's target-dir volume (see [`crate::quota`]): the node's disk maximum
    /// per job. `None`: target dirs are plain directories, without a disk limit.
    pub slot_disk: Option<crate::quota::DiskQuota>,
    /// The sandbox set-up (toolchain, host uid, the isolation provider by name…).
    pub sandbox: SandboxConfig,
    /// An isolation provider of the embedder's own (a microVM, a container runtime) instead of
    /// the one [`SandboxConfig::isolation`] names; see [`crate::isolation`].
    pub isolation_provider: Option<Arc<dyn crate::isolation::IsolationProvider>>,
    /// Log stream limits.
    pub log: LogConfig,
    /// Keep at most this many per-workspace slots (LRU).
    pub max_slots: usize,
    /// Bounds on every input tree, checked before anything of it touches disk.
    pub tree_limits: TreeLimits,
    /// Hosts the fetch phase may reach (`host`, `host:port`, `*.domain`; port 443 unless
    /// given): registries' indexes and downloads, git hosts. Default: crates.io
    /// ([`crate::egress::default_fetch_allowed_hosts`]). Never loopback or private addresses,
    /// whatever is listed (see [`crate::egress`]).
    pub fetch_allowed_hosts: Vec<String>,
    /// rustup's home, whose `toolchains/` a workspace's `rust-toolchain(.toml)` chooses from
    /// (see [`crate::toolchains`]). Default `$RUSTUP_HOME`, else `~/.rustup`.
    pub rustup_home: Option<PathBuf>,
    /// More toolchains a workspace may choose, each a sysroot named by its directory name.
    pub toolchain_roots: Vec<PathBuf>,
    /// The RustSec advisory database audit jobs read (a checkout of
    /// `github.com/rustsec/advisory-db`, kept current by the operator, never fetched by a job),
    /// mounted read-only at [`crate::cargo::ADVISORY_DB`]. `None`: audit jobs fail saying so.
    pub advisory_db: Option<PathBuf>,
    /// The `cargo-audit` binary audit jobs run, mounted read-only at
    /// [`crate::cargo::CARGO_AUDIT`]. Default: `cargo-audit` in `PATH`, else in
    /// `$CARGO_HOME/bin` (`~/.cargo/bin`), where `.ci/setup.d/cargo-audit.sh` links it.
    pub cargo_audit: Option<PathBuf>,
    /// Share compiled registry dependencies across workspaces and tenants
    /// ([`crate::shared_units`]). Default on.
    pub shared_units: bool,
}

/// The `cargo-audit` binary of this machine: in `PATH`, else in `$CARGO_HOME/bin` or
/// `~/.cargo/bin`; links resolved.
pub fn find_cargo_audit() -> Option<PathBuf> {
    let in_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>());
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")));
    in_path
        .chain(cargo_home.map(|home| home.join("bin")))
        .map(|dir| dir.join("cargo-audit"))
        .find(|candidate| candidate.is_file())
        .and_then(|found| std::fs::canonicalize(found).ok())
}

/// What identifies the state of an advisory database, for the action key of audit jobs (a
/// result must not outlive the database it was checked against): the commit of a git
/// checkout (`git rev-parse HEAD`), else a BLAKE3 of its `.md`/`.toml` files' paths and
/// contents; `none` without a database.
pub fn advisory_db_identity(db: Option<&Path>) -> String {
    let Some(db) = db else {
        return "none".to_string();
    };
    if db.join(".git").exists()
        && let Ok(out) = std::process::Command::new("git")
            .arg("-C")
            .arg(db)
            .args(["rev-parse", "HEAD"])
            .output()
        && out.status.success()
    {
        return format!("git:{}", String::from_utf8_lossy(&out.stdout).trim());
    }
    let mut files = Vec::new();
    let mut pending = vec![db.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let path = entry.path();
            if kind.is_dir() && entry.file_name() != ".git" {
                pending.push(path);
            } else if kind.is_file() && path.extension().is_some_and(|e| e == "md" || e == "toml") {
                files.push(path);
            }
        }
    }
    files.sort();
    let mut hasher = blake3::Hasher::new();
    for file in files {
        hasher.update(
            file.strip_prefix(db)
                .unwrap_or(&file)
                .as_os_str()
                .as_encoded_bytes(),
        );
        hasher.update(&[0]);
        hasher.update(&std::fs::read(&file).unwrap_or_default());
        hasher.update(&[0]);
    }
    format!("blake3:{}", hasher.finalize().to_hex())
}

impl ExecutorConfig {
    /// Defaults under `data_dir`: 2 workers, default limits, the host's toolchain.
    pub fn new(data_dir: impl Into<PathBuf>) -> Result<Self, ExecutorError> {
        let data_dir = data_dir.into();
        let mut sandbox = SandboxConfig::with_host_toolchain()?;
        sandbox.scratch_dir = data_dir.join("sandbox-scratch");
        Ok(ExecutorConfig {
            data_dir,
            workers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                .min(4),
            limits: Limits::default(),
            slot_disk: None,
            sandbox,
            isolation_provider: None,
            log: LogConfig::default(),
            max_slots: 64,
            tree_limits: TreeLimits::default(),
            fetch_allowed_hosts: crate::egress::default_fetch_allowed_hosts(),
            rustup_home: crate::toolchains::default_rustup_home(),
            toolchain_roots: Vec::new(),
            advisory_db: None,
            cargo_audit: find_cargo_audit(),
            shared_units: true,
        })
    }
}

/// Why a job could not be submitted or run.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    /// The Action or Command is missing or malformed.
    #[error(transparent)]
    Action(#[from] ActionError),
    /// The store failed or refused something.
    #[error(transparent)]
    Cas(#[from] CasError),
    /// The sandbox could not be set up.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The job's toolchain cannot be had (refused, not installed).
    #[error(transparent)]
    Toolchain(#[from] crate::toolchains::ToolchainError),
    /// Syncing a workspace failed.
    #[error(transparent)]
    Sync(#[from] crate::workspace::SyncError),
    /// Filesystem failure in the executor's own directories.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The job was cancelled.
    #[error("job cancelled")]
    Cancelled,
    /// The executor is draining for a shutdown ([`Executor::drain`]) and takes no new job.
    #[error("the executor is shutting down and takes no new jobs")]
    Draining,
    /// The scale-out job queue failed (a dispatched job: [`crate::scheduler::dispatch`]).
    #[error("job queue: {0}")]
    Queue(String),
}

fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ExecutorError {
    let context = context.into();
    move |source| ExecutorError::Io { context, source }
}

/// A job's request.
#[derive(Clone, Debug)]
pub struct ExecuteRequest {
    /// REAPI instance name (separate action caches).
    pub instance: String,
    /// The Action, already stored in the CAS with its Command and input root.
    pub action_digest: Digest,
    /// Run even if the action cache has a result.
    pub skip_cache_lookup: bool,
    /// For cargo jobs: which target cache to reuse (not part of the Action digest).
    pub workspace_identity: Option<String>,
    /// Who asked: scopes slots and the results the job may be served.
    pub tenant: Tenant,
    /// Limits the client asked for (capped by the node's); not part of the Action digest.
    pub limits: JobLimits,
}

/// Limits a client asks for, each optional; the executor lowers its own ([`ExecutorConfig`])
/// to them and never raises them. Not part of any action key: a success under tighter limits
/// is the same result.
///
/// REAPI clients set them as platform properties of the Action (they are then part of *their*
/// action key): `rba-timeout` (seconds), `rba-memory`, `rba-disk` (sizes: bytes or with a
/// `K`/`M`/`G`/`T` suffix, powers of 1024, optional `iB`/`B`) and `rba-processes` (a count).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JobLimits {
    /// Wall-clock time of each sandboxed run of the job.
    pub wall_time: Option<Duration>,
    /// Memory of the job's processes together.
    pub memory_bytes: Option<u64>,
    /// Processes and threads of the job together.
    pub max_processes: Option<u64>,
    /// Bytes the job may add to its target dir (needs [`ExecutorConfig::slot_disk`]).
    pub disk_bytes: Option<u64>,
}

impl JobLimits {
    /// Platform property names of the limits (see the type's docs).
    pub const PLATFORM_TIMEOUT: &'static str = "rba-timeout";
    /// See [`JobLimits::PLATFORM_TIMEOUT`].
    pub const PLATFORM_MEMORY: &'static str = "rba-memory";
    /// See [`JobLimits::PLATFORM_TIMEOUT`].
    pub const PLATFORM_PROCESSES: &'static str = "rba-processes";
    /// See [`JobLimits::PLATFORM_TIMEOUT`].
    pub const PLATFORM_DISK: &'static str = "rba-disk";

    /// The limits named by platform properties; an unparsable value is an error naming it.
    pub fn from_platform(property: impl Fn(&str) -> Option<String>) -> Result<JobLimits, String> {
        let get = |name: &str, parse: fn(&str) -> Result<u64, String>| {
            property(name)
                .map(|v| parse(&v).map_err(|e| format!("platform property `{name}`: {e}")))
                .transpose()
        };
        Ok(JobLimits {
            wall_time: get(Self::PLATFORM_TIMEOUT, parse_count)?.map(Duration::from_secs),
            memory_bytes: get(Self::PLATFORM_MEMORY, parse_size)?,
            max_processes: get(Self::PLATFORM_PROCESSES, parse_count)?,
            disk_bytes: get(Self::PLATFORM_DISK, parse_size)?,
        })
    }

    /// Each limit the lower of the two (a limit set in either one applies).
    pub fn tightest(self, other: JobLimits) -> JobLimits {
        fn min<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }
        JobLimits {
            wall_time: min(self.wall_time, other.wall_time),
            memory_bytes: min(self.memory_bytes, other.memory_bytes),
            max_processes: min(self.max_processes, other.max_processes),
            disk_bytes: min(self.disk_bytes, other.disk_bytes),
        }
    }

    /// `node` lowered to these limits (never raised).
    pub fn cap(&self, node: &Limits) -> Limits {
        fn lower<T: Ord + Copy>(own: Option<T>, asked: Option<T>) -> Option<T> {
            match (own, asked) {
                (Some(own), Some(asked)) => Some(own.min(asked)),
                (own, asked) => own.or(asked),
            }
        }
        Limits {
            wall_time: lower(node.wall_time, self.wall_time),
            memory_bytes: lower(node.memory_bytes, self.memory_bytes),
            max_processes: lower(node.max_processes, self.max_processes),
            ..node.clone()
        }
    }
}

/// A whole number (`rba-timeout`, `rba-processes`, `--processes`); 0 is refused.
pub fn parse_count(text: &str) -> Result<u64, String> {
    match text.trim().parse::<u64>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{text}` is not a whole number")),
    }
}

/// A size in bytes: `1048576`, `512M`, `2G`, `2GiB`, `1.5G` (powers of 1024); 0 is refused.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (number, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("`{text}`: unknown unit `{c}` (K, M, G or T)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a size (e.g. 512M, 2G)"))?;
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("`{text}` is not a size of at least one byte"));
    }
    Ok(bytes as u64)
}

/// How a job ended. Its serde form (`success`, `failed`, `cancelled`, `error`) is what the job
/// queue stores ([`crate::scheduler`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobStatus {
    /// The command exited 0.
    Success,
    /// The command ran and failed (non-zero exit, killed by a limit).
    Failed,
    /// Cancelled before or while running.
    Cancelled,
    /// The job could not run at all (bad input, sandbox set-up failure).
    Error,
}

/// An artifact a job produced, stored in the CAS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Artifact {
    /// Path relative to the job's root (`target/debug/hello`).
    pub path: String,
    /// Content digest.
    pub digest: Digest,
    /// Executable bit.
    pub executable: bool,
}

/// Everything known about a finished job.
#[derive(Clone, Debug)]
pub struct JobOutcome {
    /// How it ended.
    pub status: JobStatus,
    /// The command's exit code (-1 when it did not exit normally or did not run).
    pub exit_code: i32,
    /// The REAPI result (absent when the job could not run).
    pub result: Option<ActionResult>,
    /// Answered from the action cache without running anything.
    pub cache_hit: bool,
    /// Wall time from submission to the end.
    pub duration: Duration,
    /// Digests of the stored log, stdout and stderr.
    pub log: Option<LogDigests>,
    /// Output files (for cargo jobs: executables).
    pub artifacts: Vec<Artifact>,
    /// Named step durations (`queue`, `sync`, `fetch`, `build`, `outputs`).
    pub steps: Vec<(String, Duration)>,
    /// Log lines written when each step ended, parallel to `steps`: step `i` printed lines
    /// `step_end_lines[i - 1]..step_end_lines[i]` (from 0 for the first), so a reader can show
    /// each step's own log. Empty when unknown.
    pub step_end_lines: Vec<u64>,
    /// What went wrong, for `Error` and limit kills.
    pub error: Option<String>,
    /// The command was killed by its wall-clock timeout.
    pub timed_out: bool,
    /// The limit that ended the command, if one did.
    pub limit: Option<LimitKind>,
    /// The most memory the command's processes used together (its cgroup's peak, else the
    /// largest process's resident set), when it ran.
    pub peak_memory_bytes: Option<u64>,
}

/// Where a job is.
#[derive(Clone, Debug)]
pub enum JobState {
    /// Waiting for a worker; `position` 0 is next.
    Queued {
        /// Jobs ahead of this one.
        position: usize,
    },
    /// Running; cargo jobs report units done / total (0 when unknown).
    Running {
        /// Units done.
        done: u32,
        /// Units expected (an estimate, 0 if unknown).
        total: u32,
    },
    /// Finished.
    Done(Arc<JobOutcome>),
}

/// A submitted job: its id, log, state, and a way to cancel it. Cheap to clone.
#[derive(Clone, Debug)]
pub struct JobHandle {
    /// Unique id; also the log stream's id in the registry.
    pub id: String,
    /// The REAPI instance it was submitted under ([`CARGO_INSTANCE`] for cargo jobs).
    pub instance: String,
    /// The tenant that submitted it: every face shows a job only to callers that may see
    /// this tenant.
    pub tenant: Tenant,
    /// The Action digest.
    pub action_digest: Digest,
    /// The job's log.
    pub log: LogStream,
    state: watch::Receiver<JobState>,
    cancel: Arc<Notify>,
    /// Another front end's job, followed here ([`Executor::find_job`]): not this executor's
    /// to drain.
    followed: bool,
}

impl JobHandle {
    /// The current state.
    pub fn state(&self) -> JobState {
        self.state.borrow().clone()
    }

    /// A receiver of state changes.
    pub fn watch(&self) -> watch::Receiver<JobState> {
        self.state.clone()
    }

    /// Waits for the end.
    pub async fn wait(&self) -> Arc<JobOutcome> {
        let mut state = self.state.clone();
        loop {
            if let JobState::Done(outcome) = &*state.borrow_and_update() {
                return outcome.clone();
            }
            if state.changed().await.is_err() {
                if let JobState::Done(outcome) = &*state.borrow() {
                    return outcome.clone();
                }
                unreachable!("the job task always publishes Done before dropping its sender");
            }
        }
    }

    /// Asks the job to stop: a queued job never starts, a running sandbox is killed.
    pub fn cancel(&self) {
        self.cancel.notify_one();
    }
}

struct Inner {
    cas: Cas,
    /// The action cache results are looked up in and stored into, and the store whose blobs
    /// decide a hit's completeness (see [`Executor::with_stores`]).
    stores: Stores,
    /// Where jobs run when they are not run here ([`Executor::with_dispatch`]).
    dispatch: Option<crate::scheduler::Dispatch>,
    layout: CacheLayout,
    sandbox: Sandbox,
    toolchains: Toolchains,
    units: SharedUnits,
    config: ExecutorConfig,
    workers: Arc<Semaphore>,
    queue: Mutex<Vec<(String, watch::Sender<JobState>)>>,
    /// The one registry of jobs every face reads: id → handle (instance, tenant, state, log).
    jobs: Mutex<HashMap<String, JobHandle>>,
    /// Set by [`Executor::drain`]: every later submit is refused.
    draining: std::sync::atomic::AtomicBool,
    /// Builds whose shared units are being published in the background.
    publishing: watch::Sender<usize>,
}

/// Counts one background publication of shared units while it lives.
struct PublishingGuard(watch::Sender<usize>);

impl PublishingGuard {
    fn start(count: &watch::Sender<usize>) -> Self {
        count.send_modify(|n| *n += 1);
        PublishingGuard(count.clone())
    }
}

impl Drop for PublishingGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl Drop for Inner {
    /// Shut-down: the slot volumes are unmounted (see [`CacheLayout::unmount_volumes`]).
    fn drop(&mut self) {
        if self.config.slot_disk.is_some() {
            self.layout.unmount_volumes();
        }
    }
}

/// The executor. Cheap to clone; clones share workers, caches and the job table.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("data_dir", &self.inner.config.data_dir)
            .finish()
    }
}

impl Executor {
    /// Sets up the caches and checks the sandbox's prerequisites. Results go to `cas`'s own
    /// (embedded) action cache.
    pub fn new(cas: Cas, config: ExecutorConfig) -> Result<Self, ExecutorError> {
        let stores = Stores::embedded(&cas);
        Executor::with_stores(cas, config, stores)
    }

    /// [`Executor::new`] whose results are looked up in and stored into `stores`' action
    /// cache (a scale-out deployment's shared one), a hit being complete over `stores`' blob
    /// store. `cas` stays the executor's working store: jobs read their inputs from and write
    /// their outputs into its blob store, so it must be `stores`' local tier
    /// ([`rba_cas::Store::local`]); blobs of a hit found only in a slower tier are made local before
    /// the hit is served. What stays in `cas` alone: the shared-units namespace (compiled
    /// units only this machine's slots reuse).
    pub fn with_stores(
        cas: Cas,
        config: ExecutorConfig,
        stores: Stores,
    ) -> Result<Self, ExecutorError> {
        Executor::build(cas, config, stores, None)
    }

    /// A front end's executor: [`Executor::with_stores`] whose jobs, on an action-cache miss,
    /// run on the workers of `dispatch` instead of in a local slot (see
    /// [`crate::scheduler::dispatch`]). `stores`' blob store is the shared store the workers
    /// read (with `cas` as its local tier).
    pub fn with_dispatch(
        cas: Cas,
        config: ExecutorConfig,
        stores: Stores,
        dispatch: crate::scheduler::Dispatch,
    ) -> Result<Self, ExecutorError> {
        Executor::build(cas, config, stores, Some(dispatch))
    }

    fn build(
        cas: Cas,
        config: ExecutorConfig,
        stores: Stores,
        dispatch: Option<crate::scheduler::Dispatch>,
    ) -> Result<Self, ExecutorError> {
        let local_root = stores
            .blobs()
            .local()
            .map(|local| local.root().to_path_buf());
        if local_root.as_deref() != Some(cas.blobs.root()) {
            return Err(ExecutorError::Cas(CasError::Unavailable(format!(
                "the executor's store under {} is not the local tier of the {} store it was given",
                cas.blobs.root().display(),
                stores.blobs().backend()
            ))));
        }
        let layout = CacheLayout::create(&config.data_dir)
            .map_err(io_error("creating the executor's data dir"))?;
        std::fs::create_dir_all(&config.sandbox.scratch_dir)
            .map_err(io_error("creating the sandbox scratch dir"))?;
        let sandbox = match &config.isolation_provider {
            Some(provider) => Sandbox::with_provider(config.sandbox.clone(), provider.clone())?,
            None => Sandbox::new(config.sandbox.clone())?,
        };
        let toolchains = Toolchains::new(
            Toolchain::detect()?,
            config.rustup_home.clone(),
            config.toolchain_roots.clone(),
        );
        let units = SharedUnits::new(cas.clone());
        Ok(Executor {
            inner: Arc::new(Inner {
                units,
                cas,
                stores,
                dispatch,
                layout,
                sandbox,
                toolchains,
                workers: Arc::new(Semaphore::new(config.workers.max(1))),
                config,
                queue: Mutex::new(Vec::new()),
                jobs: Mutex::new(HashMap::new()),
                draining: std::sync::atomic::AtomicBool::new(false),
                publishing: watch::channel(0).0,
            }),
        })
    }

    /// The action cache (and its store) results are looked up in and stored into.
    pub fn stores(&self) -> &Stores {
        &self.inner.stores
    }

    /// The workers this executor's jobs run on, when it is a front end.
    pub fn dispatch(&self) -> Option<&crate::scheduler::Dispatch> {
        self.inner.dispatch.as_ref()
    }

    /// The store jobs read from and write to.
    pub fn cas(&self) -> &Cas {
        &self.inner.cas
    }

    /// The index of shared units ([`crate::shared_units`]).
    pub fn shared_units(&self) -> &SharedUnits {
        &self.inner.units
    }

    /// The toolchain of cargo jobs whose workspace names none.
    pub fn toolchain(&self) -> &Toolchain {
        self.inner.toolchains.default_toolchain()
    }

    /// The toolchains of this node (the default one and those installed).
    pub fn toolchains(&self) -> &Toolchains {
        &self.inner.toolchains
    }

    /// Stores a cargo job as an Action over `input_root`, with the toolchain its workspace
    /// asks for ([`Toolchains::for_workspace`]; refused, naming it, when not installed). The one
    /// place every face turns a cargo job into an Action.
    pub async fn cargo_action(
        &self,
        job: &CargoJob,
        input_root: Digest,
    ) -> Result<PreparedAction, ExecutorError> {
        let executor = self.clone();
        let job = job.clone();
        tokio::task::spawn_blocking(move || {
            let blobs = &executor.inner.cas.blobs;
            let toolchain = executor
                .inner
                .toolchains
                .for_workspace(blobs, &input_root)?;
            let mut platform = cargo_platform(&job, &toolchain);
            if job.kind == JobKind::Audit {
                // An audit result holds for the database it was checked against.
                let db = executor.inner.config.advisory_db.as_deref();
                platform.properties.push(Property {
                    name: ADVISORY_DB_PROPERTY.to_string(),
                    value: advisory_db_identity(db),
                });
            }
            Ok(store_cargo_action(&job, input_root, platform, blobs)?)
        })
        .await
        .expect("cargo_action does not panic")
    }

    /// The complete, successful cached result a job of `tenant` submitting `action` under
    /// `instance` would be served: its own namespace, then the shared one
    /// ([`lookup_namespaces`]). The one lookup: the job path's hit is this, and a face that
    /// must know beforehand (whether missing inputs matter) asks this too.
    pub async fn cached_success(
        &self,
        instance: &str,
        tenant: &Tenant,
        action: &Digest,
    ) -> Result<Option<ActionResult>, ExecutorError> {
        for namespace in lookup_namespaces(instance, tenant) {
            if let Some(result) = self.inner.stores.actions().get(&namespace, action).await?
                && result.exit_code == 0
            {
                return Ok(Some(result));
            }
        }
        Ok(None)
    }

    /// A job by id, while it is known.
    pub fn job(&self, id: &str) -> Option<JobHandle> {
        self.inner.jobs.lock().get(id).cloned()
    }

    /// Every job still known (running, queued, or finished within [`JOB_RETENTION`]).
    pub fn jobs(&self) -> Vec<JobHandle> {
        self.inner.jobs.lock().values().cloned().collect()
    }

    /// Forgets a job and its log stream (a running job keeps running; its results still reach
    /// the CAS and the action cache). Returns the handle if the job was known.
    pub fn forget_job(&self, id: &str) -> Option<JobHandle> {
        self.inner.jobs.lock().remove(id)
    }

    /// Slots and the shared cargo home's size (a directory walk: off the async threads).
    pub fn cache_usage(&self) -> crate::caches::CacheUsage {
        crate::caches::CacheUsage {
            shared_units: self.shared_units().stats(),
            ..self.inner.layout.usage()
        }
    }

    /// Jobs waiting for a worker.
    pub fn queue_len(&self) -> usize {
        self.inner.queue.lock().len()
    }

    /// Drains for a shutdown: from now on every submit fails with
    /// [`ExecutorError::Draining`]; the jobs already taken (queued or running) get up to
    /// `grace` to finish, then those left are cancelled (their sandboxes killed) and waited for
    /// a few seconds more. Returns how many had to be cancelled. Idempotent.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.inner
            .draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let unfinished = || -> Vec<JobHandle> {
            self.jobs()
                .into_iter()
                .filter(|job| !job.followed && !matches!(job.state(), JobState::Done(_)))
                .collect()
        };
        let taken = unfinished();
        if taken.is_empty() {
            return 0;
        }
        tracing::info!(
            jobs = taken.len(),
            ?grace,
            "draining: waiting for running jobs"
        );
        let all = futures::future::join_all(taken.iter().map(|job| job.wait()));
        if tokio::time::timeout(grace, all).await.is_ok() {
            // What finished may still be storing its shared units: let it, within reason.
            let _ = tokio::time::timeout(Duration::from_secs(30), self.units_published()).await;
            return 0;
        }
        let left = unfinished();
        tracing::warn!(
            jobs = left.len(),
            "draining: cancelling jobs still running after the grace period"
        );
        for job in &left {
            job.cancel();
        }
        let all = futures::future::join_all(left.iter().map(|job| job.wait()));
        if tokio::time::timeout(Duration::from_secs(5), all)
            .await
            .is_err()
        {
            tracing::warn!("draining: jobs still running 5 s after cancellation");
        }
        left.len()
    }

    /// Waits until no build's shared units are still being published (they are stored in the
    /// background after the job ends; see [`crate::shared_units`]).
    pub async fn units_published(&self) {
        let mut count = self.inner.publishing.subscribe();
        let _ = count.wait_for(|n| *n == 0).await;
    }

    /// Whether [`Executor::drain`] was called.
    pub fn is_draining(&self) -> bool {
        self.inner
            .draining
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stores a cargo job as an Action over `input_root` and submits it.
    pub async fn submit_cargo(
        &self,
        job: &CargoJob,
        input_root: Digest,
        workspace_identity: &str,
        tenant: Tenant,
    ) -> Result<JobHandle, ExecutorError> {
        self.submit_cargo_with_limits(
            job,
            input_root,
            workspace_identity,
            tenant,
            JobLimits::default(),
        )
        .await
    }

    /// [`Executor::submit_cargo`] with limits the client asked for (capped by the node's).
    pub async fn submit_cargo_with_limits(
        &self,
        job: &CargoJob,
        input_root: Digest,
        workspace_identity: &str,
        tenant: Tenant,
        limits: JobLimits,
    ) -> Result<JobHandle, ExecutorError> {
        let prepared = self.cargo_action(job, input_root).await?;
        self.submit(ExecuteRequest {
            instance: CARGO_INSTANCE.to_string(),
            action_digest: prepared.action_digest,
            skip_cache_lookup: false,
            workspace_identity: Some(workspace_identity.to_string()),
            tenant,
            limits,
        })
        .await
    }

    /// Makes an Action and its Command readable from the local tier (shared stores only). A
    /// blob no tier holds is left for [`PreparedAction::load`] to report, naming it.
    async fn make_action_local(&self, action: Digest) -> Result<(), ExecutorError> {
        let store = self.inner.stores.blobs();
        match store.make_local(&[action]).await {
            Ok(()) => {}
            Err(CasError::NotFound(_)) => return Ok(()),
            Err(other) => return Err(other.into()),
        }
        let blobs = self.inner.cas.blobs.clone();
        let command = tokio::task::spawn_blocking(move || {
            let bytes = blobs.read_to_vec(&action, MAX_ACTION_BYTES)?;
            Ok::<_, CasError>(
                reapi::Action::decode(bytes.as_slice())
                    .ok()
                    .and_then(|decoded| decoded.command_digest)
                    .and_then(|command| Digest::from_reapi(action.function, &command).ok()),
            )
        })
        .await
        .expect("reading an action does not panic")?;
        if let Some(command) = command {
            match store.make_local(&[command]).await {
                Ok(()) | Err(CasError::NotFound(_)) => {}
                Err(other) => return Err(other.into()),
            }
        }
        Ok(())
    }

    /// Drops jobs (and their log streams) that finished more than [`JOB_RETENTION`] ago.
    fn forget_old_jobs(&self) {
        let now = Instant::now();
        self.inner.jobs.lock().retain(|_, job| {
            job.log
                .finished_at()
                .is_none_or(|finished| now.duration_since(finished) < JOB_RETENTION)
        });
    }

    /// Submits an Action already in the CAS. Returns at once; the job runs in the background.
    ///
    /// Fails when the Action or Command cannot be loaded (missing or malformed, or an output
    /// path or working directory that could leave the exec root) or when the input tree breaks
    /// a rule or a [`TreeLimits`] bound ([`PreparedAction::check_input_tree`]): such a request
    /// never becomes a job, and nothing of it touched disk. An input tree not (yet) complete in
    /// the CAS is let through (a cached result may answer it); it is checked again before it is
    /// written anywhere.
    pub async fn submit(&self, request: ExecuteRequest) -> Result<JobHandle, ExecutorError> {
        if self.is_draining() {
            return Err(ExecutorError::Draining);
        }
        let digest = request.action_digest;
        let prepared = self.prepare(digest).await?;
        // Refused before it becomes a job: limits the client named but that mean nothing.
        JobLimits::from_platform(|name| prepared.platform_property(name)).map_err(|reason| {
            ActionError::Invalid {
                what: format!("Action {digest:?}"),
                reason,
            }
        })?;
        self.start(uuid::Uuid::new_v4().to_string(), request, prepared, None)
    }

    /// A job by id: this executor's, or — on a scale-out front end ([`Executor::with_dispatch`])
    /// — one another front end dispatched under that id, from when it is queued (its inputs
    /// published; before, it is unknown here, and a REAPI client retries its Execute) while the
    /// queue keeps it. Such a job
    /// is *followed* here: a handle whose log mirrors the queue's lines and whose outcome is
    /// the queue's, its blobs made local, exactly as for a job dispatched from here (one job
    /// path, [`crate::scheduler::dispatch`]), so every face serves an operation or session
    /// from whichever front end a client reaches. `visible` is given the job's tenant and
    /// decides before anything is followed; a job it refuses is `None`, as an unknown one.
    /// Cancelling a followed handle cancels the job; shutting this front end down does not.
    pub async fn find_job(
        &self,
        id: &str,
        visible: impl Fn(&Tenant) -> bool,
    ) -> Result<Option<JobHandle>, ExecutorError> {
        if let Some(handle) = self.job(id) {
            return Ok(Some(handle));
        }
        let Some(dispatch) = &self.inner.dispatch else {
            return Ok(None);
        };
        let queue_error = |e: crate::scheduler::QueueError| ExecutorError::Queue(e.to_string());
        let Some((queued, request)) = dispatch.queue().named(id).await.map_err(queue_error)? else {
            return Ok(None);
        };
        if !visible(&request.tenant) {
            return Ok(None);
        }
        let prepared = self.prepare(request.action_digest).await?;
        self.start(id.to_string(), request, prepared, Some(queued))
            .map(Some)
    }

    /// Loads and checks an Action for a job (see [`Executor::submit`]).
    async fn prepare(&self, digest: Digest) -> Result<PreparedAction, ExecutorError> {
        let blobs = self.inner.cas.blobs.clone();
        let limits = self.inner.config.tree_limits.clone();
        if !self.inner.stores.is_embedded_in(&self.inner.cas) {
            // Shared stores: the Action and its Command may have been uploaded through another
            // process (a client that found them present skips the upload); they are read from
            // the local tier.
            self.make_action_local(digest).await?;
        }
        Ok(tokio::task::spawn_blocking(move || {
            let prepared = PreparedAction::load(digest, &blobs)?;
            match prepared.check_input_tree(&blobs, &limits) {
                Ok(_) | Err(ActionError::Cas(CasError::NotFound(_))) => Ok(prepared),
                Err(refused) => Err(refused),
            }
        })
        .await
        .expect("loading an action does not panic")?)
    }

    /// Registers job `id` and runs it in the background: a new job, or with `followed` the
    /// queue's job of that name (see [`Executor::find_job`]). A job of that id registered
    /// meanwhile (two readers following one job at once) is returned instead.
    fn start(
        &self,
        id: String,
        request: ExecuteRequest,
        prepared: PreparedAction,
        followed: Option<crate::scheduler::JobId>,
    ) -> Result<JobHandle, ExecutorError> {
        self.forget_old_jobs();
        if let Some(known) = self.job(&id) {
            return Ok(known);
        }
        let log_dir = self.inner.config.data_dir.join("logs");
        std::fs::create_dir_all(&log_dir).map_err(io_error("creating the log dir"))?;
        let (writer, log) = LogStream::with_config(&log_dir, self.inner.config.log.clone())
            .map_err(io_error("creating a log stream"))?;
        let (state_tx, state_rx) = watch::channel(JobState::Queued { position: 0 });
        let handle = JobHandle {
            id: id.clone(),
            instance: request.instance.clone(),
            tenant: request.tenant.clone(),
            action_digest: prepared.action_digest,
            log: log.clone(),
            state: state_rx,
            cancel: Arc::new(Notify::new()),
            followed: followed.is_some(),
        };
        match self.inner.jobs.lock().entry(id.clone()) {
            std::collections::hash_map::Entry::Occupied(known) => return Ok(known.get().clone()),
            std::collections::hash_map::Entry::Vacant(slot) => slot.insert(handle.clone()),
        };
        let executor = self.clone();
        let cancel = handle.cancel.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut job = RunningJob {
                executor: &executor,
                id: &id,
                request,
                prepared,
                writer: Some(writer),
                started,
                steps: Vec::new(),
                step_end_lines: Vec::new(),
                state: state_tx.clone(),
                provenance: Provenance::TenantState,
                followed,
            };
            let outcome = tokio::select! {
                outcome = job.run() => outcome,
                _ = cancel.notified() => {
                    if let (Some(queued), Some(dispatch)) = (followed, &executor.inner.dispatch) {
                        // A followed job is not this front end's to cancel on drop (see
                        // `RunningJob::follow`): a reader's cancel is passed on here.
                        if let Err(error) = dispatch.queue().cancel(queued).await {
                            tracing::warn!(job = %id, %error, "cancelling a followed job failed");
                        }
                    }
                    Err(ExecutorError::Cancelled)
                }
            };
            let outcome = match outcome {
                Ok(outcome) => outcome,
                Err(error) => job.failed_outcome(error).await,
            };
            let _ = state_tx.send(JobState::Done(Arc::new(outcome)));
        });
        Ok(handle)
    }
}

/// One job in progress.
struct RunningJob<'a> {
    executor: &'a Executor,
    id: &'a str,
    request: ExecuteRequest,
    prepared: PreparedAction,
    writer: Option<LogWriter>,
    started: Instant,
    steps: Vec<(String, Duration)>,
    /// Lines written when each step ended (see [`JobOutcome::step_end_lines`]).
    step_end_lines: Vec<u64>,
    state: watch::Sender<JobState>,
    /// Decides the result's namespace; set by the workload, `TenantState` until it proves
    /// otherwise.
    provenance: Provenance,
    /// The queue's job this one follows ([`Executor::find_job`]): another front end looked up
    /// the cache and dispatched it.
    followed: Option<crate::scheduler::JobId>,
}

/// What the log and the steps call a networked phase ([`RunningJob::network_phase`]).
struct NetworkPhase {
    step: &'static str,
    announce: &'static str,
    failure: &'static str,
}

/// What a workload produced.
struct RunResult {
    exit_code: i32,
    success: bool,
    output_files: Vec<OutputFile>,
    output_directories: Vec<OutputDirectory>,
    artifacts: Vec<Artifact>,
    error: Option<String>,
    timed_out: bool,
    limit: Option<LimitKind>,
    peak_memory_bytes: Option<u64>,
}

impl RunningJob<'_> {
    fn inner(&self) -> &Inner {
        &self.executor.inner
    }

    fn function(&self) -> DigestFunction {
        self.prepared.action_digest.function
    }

    fn log(&mut self, stream: LogStreamKind, line: impl Into<String>) {
        if let Some(writer) = &mut self.writer {
            writer.push(stream, line);
        }
    }

    fn step(&mut self, name: &str, since: Instant) {
        self.steps.push((name.to_string(), since.elapsed()));
        let lines = match &self.writer {
            Some(writer) => writer.lines_written(),
            // The log is already stored: nothing was written since the last step.
            None => self.step_end_lines.last().copied().unwrap_or(0),
        };
        self.step_end_lines.push(lines);
    }

    async fn blocking<T: Send + 'static>(
        f: impl FnOnce() -> Result<T, ExecutorError> + Send + 'static,
    ) -> Result<T, ExecutorError> {
        tokio::task::spawn_blocking(f)
            .await
            .expect("blocking executor work does not panic")
    }

    async fn run(&mut self) -> Result<JobOutcome, ExecutorError> {
        if let (Some(queued), Some(dispatch)) = (self.followed, self.inner().dispatch.clone()) {
            return self.follow(dispatch.queue(), queued, false).await;
        }
        if !self.request.skip_cache_lookup
            && !self.prepared.action.do_not_cache
            && let Some(outcome) = self.try_cache_hit().await?
        {
            return Ok(outcome);
        }
        if let Some(dispatch) = self.inner().dispatch.clone() {
            return self.run_remote(&dispatch).await;
        }
        let queued = Instant::now();
        let _permit = self.wait_for_worker().await;
        self.step("queue", queued);
        let _ = self.state.send(JobState::Running { done: 0, total: 0 });
        let run = match self.prepared.platform_property("job") {
            Some(_) => self.run_cargo().await?,
            None => {
                // A fresh exec root materialised from the input root alone.
                self.provenance = Provenance::Clean;
                self.run_command().await?
            }
        };
        self.finish(run).await
    }

    /// Runs the job on a worker of `dispatch` (see [`crate::scheduler::dispatch`]).
    async fn run_remote(
        &mut self,
        dispatch: &crate::scheduler::Dispatch,
    ) -> Result<JobOutcome, ExecutorError> {
        use crate::scheduler::dispatch::publish_inputs;
        let queue = dispatch.queue();
        let stores = self.inner().stores.clone();
        let published = Instant::now();
        publish_inputs(
            stores.blobs().as_ref(),
            self.prepared.action_digest,
            self.prepared.command_digest,
            self.prepared.input_root_digest,
        )
        .await?;
        self.step("publish", published);
        let request = ExecuteRequest {
            // The lookup was made here (or the client asked for none): see the module doc.
            skip_cache_lookup: true,
            ..self.request.clone()
        };
        let job = queue
            .enqueue_named(Some(self.id), &request, None)
            .await
            .map_err(|e| ExecutorError::Queue(e.to_string()))?;
        tracing::info!(job = %self.id, queued = %job, "job dispatched to the workers");
        self.follow(queue, job, true).await
    }

    /// Waits for queue job `job`, mirroring its log lines into this job's log, and makes its
    /// outcome this job's, its blobs local: steps 3 to 6 of [`crate::scheduler::dispatch`].
    /// `owned`: this front end dispatched it, and dropping this future (a cancelled handle, a
    /// shutdown) cancels it; a followed job is cancelled only on a reader's request.
    async fn follow(
        &mut self,
        queue: &crate::scheduler::JobQueue,
        job: crate::scheduler::JobId,
        owned: bool,
    ) -> Result<JobOutcome, ExecutorError> {
        use crate::scheduler::dispatch::{
            CancelOnDrop, make_outcome_local, mirror_logs, starts_attempt,
        };
        let stores = self.inner().stores.clone();
        let mut cancel = CancelOnDrop::new(queue.clone(), job);
        if !owned {
            cancel.disarm();
        }
        let queued = Instant::now();
        let before = self.writer.as_ref().map_or(0, |w| w.lines_written());
        let mut attempt_base = before;
        let mut lines = mirror_logs(queue, job);
        let wait = queue.wait(job);
        tokio::pin!(wait);
        let mut poll = tokio::time::interval(queue.config().poll_interval());
        let mut running = false;
        let outcome = loop {
            tokio::select! {
                outcome = &mut wait => break outcome,
                Some(line) = lines.recv() => {
                    if !running {
                        running = true;
                        self.step("queue", queued);
                        let _ = self.state.send(JobState::Running { done: 0, total: 0 });
                    }
                    if starts_attempt(&line) {
                        attempt_base = before + line.seq + 1;
                    }
                    self.log(line.stream, line.line);
                }
                _ = poll.tick(), if !running => {
                    if queue.job(job).await.is_ok_and(|record| record.state == "running") {
                        running = true;
                        self.step("queue", queued);
                        let _ = self.state.send(JobState::Running { done: 0, total: 0 });
                    }
                }
            }
        };
        cancel.disarm();
        let outcome = outcome.map_err(|e| ExecutorError::Queue(e.to_string()))?;
        // The lines written before the outcome was recorded: the log ends with them.
        while let Some(line) = lines.recv().await {
            if starts_attempt(&line) {
                attempt_base = before + line.seq + 1;
            }
            self.log(line.stream, line.line);
        }
        if !running {
            self.step("queue", queued);
        }
        make_outcome_local(&stores, self.function(), &outcome).await?;
        let log = self.finish_log().await?;
        let mut outcome = JobOutcome::clone(&outcome);
        let mut steps = std::mem::take(&mut self.steps);
        let mut step_end_lines = std::mem::take(&mut self.step_end_lines);
        // The worker's steps, their line numbers counted in this log.
        if outcome.step_end_lines.len() == outcome.steps.len() {
            step_end_lines.extend(outcome.step_end_lines.iter().map(|n| n + attempt_base));
            steps.append(&mut outcome.steps);
        } else {
            step_end_lines.clear();
            steps.append(&mut outcome.steps);
        }
        Ok(JobOutcome {
            duration: self.started.elapsed(),
            log: Some(log),
            steps,
            step_end_lines,
            ..outcome
        })
    }

    /// Serves the job from the action cache when a complete, successful result exists.
    /// Looks in the tenant's own namespace, then the shared one ([`lookup_namespaces`]).
    async fn try_cache_hit(&mut self) -> Result<Option<JobOutcome>, ExecutorError> {
        let stores = self.inner().stores.clone();
        let cached = self
            .executor
            .cached_success(
                &self.request.instance,
                &self.request.tenant,
                &self.prepared.action_digest,
            )
            .await?;
        let Some(result) = cached else {
            return Ok(None);
        };
        if !stores.is_embedded_in(&self.inner().cas) {
            // A shared cache: the hit is complete in the shared store; every face serves it
            // (and the replay reads it) from this machine's local tier.
            let referenced = stores
                .actions()
                .referenced_blobs(self.function(), &result)
                .await?;
            stores.blobs().make_local(&referenced).await?;
        }
        let function = self.function();
        let blobs = self.inner().cas.blobs.clone();
        let stored = result.clone();
        let replay = Self::blocking(move || Ok(replay_lines(&blobs, function, &stored)?)).await?;
        for (stream, line) in replay {
            self.log(stream, line);
        }
        let log = self.finish_log().await?;
        Ok(Some(JobOutcome {
            status: JobStatus::Success,
            exit_code: 0,
            artifacts: artifacts_of(function, &result),
            result: Some(result),
            cache_hit: true,
            duration: self.started.elapsed(),
            log: Some(log),
            steps: std::mem::take(&mut self.steps),
            step_end_lines: std::mem::take(&mut self.step_end_lines),
            error: None,
            timed_out: false,
            limit: None,
            peak_memory_bytes: None,
        }))
    }

    async fn wait_for_worker(&mut self) -> tokio::sync::OwnedSemaphorePermit {
        let workers = self.inner().workers.clone();
        if let Ok(permit) = workers.clone().try_acquire_owned() {
            return permit;
        }
        let position = {
            let mut queue = self.inner().queue.lock();
            queue.push((self.id.to_string(), self.state.clone()));
            queue.len() - 1
        };
        let _ = self.state.send(JobState::Queued { position });
        self.log(
            LogStreamKind::System,
            format!("queued at position {position}"),
        );
        let permit = workers
            .acquire_owned()
            .await
            .expect("the worker semaphore is never closed");
        let mut queue = self.inner().queue.lock();
        queue.retain(|(id, _)| id != self.id);
        for (position, (_, state)) in queue.iter().enumerate() {
            let _ = state.send(JobState::Queued { position });
        }
        permit
    }

    /// What the client asked for: the request's limits, the platform properties and the
    /// Action's `timeout`, the tightest of each.
    fn asked_limits(&self) -> JobLimits {
        let platform = JobLimits::from_platform(|name| self.prepared.platform_property(name))
            .unwrap_or_default(); // validated in `submit`
        let timeout = JobLimits {
            wall_time: self
                .prepared
                .action
                .timeout
                .as_ref()
                .filter(|t| t.seconds > 0)
                .map(|t| Duration::from_secs(t.seconds as u64)),
            ..JobLimits::default()
        };
        self.request.limits.tightest(platform).tightest(timeout)
    }

    /// The node's limits lowered to what the client asked for.
    fn limits(&self) -> Limits {
        self.asked_limits().cap(&self.inner().config.limits)
    }

    /// Mounts the slot's volume (once per slot) and points the slot's target dir into it;
    /// returns the job's allowance in it (held until the job ends). Without
    /// [`ExecutorConfig::slot_disk`] the target dir stays a plain directory.
    async fn slot_volume(
        &mut self,
        slot: &mut Slot,
    ) -> Result<Option<crate::quota::Allowance>, ExecutorError> {
        let Some((vol, allowance)) = self.disk_volume(slot.dir.clone()).await? else {
            return Ok(None);
        };
        slot.target = vol.join("target");
        Ok(Some(allowance))
    }

    /// Mounts the size-capped volume of `dir` (a slot's or an exec volume's; once per
    /// directory and process) and reserves the job's allowance in it; returns the mount point
    /// and the allowance (held until the job ends). `None` without
    /// [`ExecutorConfig::slot_disk`], said in the job's log when the client asked for a limit.
    async fn disk_volume(
        &mut self,
        dir: PathBuf,
    ) -> Result<Option<(PathBuf, crate::quota::Allowance)>, ExecutorError> {
        let asked = self.asked_limits().disk_bytes;
        let Some(quota) = self.inner().config.slot_disk else {
            if asked.is_some() {
                self.log(
                    LogStreamKind::System,
                    "disk limit not enforced: this node has no slot volumes ([limits] disk)",
                );
            }
            return Ok(None);
        };
        let mounted = Self::blocking(move || {
            let vol = crate::quota::mount_slot_volume(&dir, quota)
                .map_err(io_error("mounting a disk volume"))?;
            let allowance = match asked {
                Some(bytes) => crate::quota::Allowance::reserve(&vol, bytes)
                    .map_err(io_error("reserving the job's disk allowance"))?,
                None => crate::quota::Allowance::unlimited(),
            };
            Ok((vol, allowance))
        })
        .await?;
        Ok(Some(mounted))
    }

    fn command_env(&self, mut spec: SandboxSpec) -> SandboxSpec {
        for variable in &self.prepared.command.environment_variables {
            spec = spec.env(&variable.name, &variable.value);
        }
        spec
    }

    fn working_directory(&self) -> PathBuf {
        Path::new(WORKSPACE_DIR).join(&self.prepared.command.working_directory)
    }

    /// Runs a sandboxed process, feeding its lines through `on_line`; kills it on cancel.
    async fn run_sandboxed(
        &mut self,
        spec: SandboxSpec,
        mut on_line: impl FnMut(&mut Self, OutputLine),
    ) -> Result<crate::sandbox::SandboxOutcome, ExecutorError> {
        let mut running = self.inner().sandbox.spawn(spec).await?;
        while let Some(line) = running.output.recv().await {
            on_line(self, line);
        }
        Ok(running.wait().await?)
    }

    /// A cargo job: shared slot, fetch phase, offline build phase, artifacts from cargo's JSON.
    async fn run_cargo(&mut self) -> Result<RunResult, ExecutorError> {
        let identity = self.request.workspace_identity.clone().unwrap_or_else(|| {
            format!(
                "{}:{:?}",
                self.request.instance, self.prepared.input_root_digest
            )
        });
        let layout = self.inner().layout.clone();
        // The toolchain is the Action's (its `toolchain` property: part of the action key),
        // found again among this node's installed ones; the slot is keyed by it too.
        let toolchain = match self.prepared.platform_property("toolchain") {
            Some(digest) => {
                let executor = self.executor.clone();
                Self::blocking(move || Ok(executor.inner.toolchains.by_digest(&digest)?)).await?
            }
            None => self.inner().toolchains.default_toolchain().clone(),
        };
        let toolchain_digest = toolchain.digest_hex.clone();
        let tenant = self.request.tenant.clone();
        let mut slot = Self::blocking(move || {
            layout
                .slot(&tenant, &identity, &toolchain_digest)
                .map_err(io_error("creating a workspace slot"))
        })
        .await?;
        let lock_slot = slot.clone();
        let waited = Instant::now();
        let lock = Self::blocking(move || {
            SlotLock::acquire(&lock_slot).map_err(io_error("locking a workspace slot"))
        })
        .await?;
        self.step("slot-lock", waited);
        // The target dir moves into the slot's volume when the node limits disk.
        let _allowance = self.slot_volume(&mut slot).await?;
        // Only under the lock: no other job of the slot can write the target dir meanwhile.
        let fresh_slot = slot.clone();
        let fresh = Self::blocking(move || {
            fresh_slot
                .target_is_empty()
                .map_err(io_error("reading the target dir"))
        })
        .await?;
        if fresh {
            self.provenance = Provenance::Clean;
        }

        let synced = Instant::now();
        let (blobs, root, sync_slot, limits) = (
            self.inner().cas.blobs.clone(),
            self.prepared.input_root_digest,
            slot.clone(),
            self.inner().config.tree_limits.clone(),
        );
        let stats = Self::blocking(move || {
            let entries = desired_entries(&blobs, &root, &limits)?;
            Ok(sync_directory(
                &blobs,
                &entries,
                &sync_slot.src,
                &sync_slot.manifest,
            )?)
        })
        .await?;
        self.log(
            LogStreamKind::System,
            format!(
                "workspace synced: {} written, {} unchanged, {} removed",
                stats.written, stats.kept, stats.removed
            ),
        );
        // After its report line: that line is the sync step's own (`step_end_lines`).
        self.step("sync", synced);

        let (blobs, root) = (
            self.inner().cas.blobs.clone(),
            self.prepared.input_root_digest,
        );
        // Any entry named `Cargo.lock` (a link too, even a dangling one) is the tree's own:
        // only a tree without one has its lock file resolved.
        let top = rba_cas::read_directory(&blobs, &root)?;
        let has_lock = top.files.iter().any(|f| f.name == RESOLVED_LOCK_PATH)
            || top.symlinks.iter().any(|l| l.name == RESOLVED_LOCK_PATH)
            || top.directories.iter().any(|d| d.name == RESOLVED_LOCK_PATH);
        let mut lockfile = read_lockfile(&blobs, &root)?;
        let mut resolved_lock = None;
        if !has_lock {
            // A lock file an earlier job of the slot resolved is not this tree's.
            let src = slot.src.clone();
            Self::blocking(move || {
                remove_resolved_lock(&src).map_err(io_error("removing a resolved lock file"))
            })
            .await?;
            let required = self
                .prepared
                .platform_property(LOCKFILE_PROPERTY)
                .as_deref()
                == Some(LOCKFILE_REQUIRED);
            if required {
                // What cargo says, without depending on what the offline index knows.
                return Ok(self.ended_before_running(format!(
                    "error: cannot create the lock file {} because --locked was passed to \
                     prevent this (the workspace has no Cargo.lock; without --locked the node \
                     resolves one and returns it)",
                    Path::new(WORKSPACE_DIR).join(RESOLVED_LOCK_PATH).display()
                )));
            }
            match self.resolve_phase(&slot, &toolchain).await? {
                Ok((text, artifact)) => {
                    lockfile = text;
                    resolved_lock = Some(artifact);
                }
                Err(failure) => return Ok(failure),
            }
        }
        if let Some(failure) = self.fetch_phase(&slot, &lockfile, &toolchain).await? {
            return Ok(failure);
        }
        let mut built_units = self
            .receive_units(fresh, &slot, &lockfile, &toolchain)
            .await?;

        let built = Instant::now();
        let cargo_home = self.inner().layout.cargo_home();
        let mut tools = Vec::new();
        if self.prepared.platform_property("job").as_deref() == Some(JobKind::Audit.name()) {
            let config = &self.inner().config;
            match (&config.advisory_db, &config.cargo_audit) {
                (Some(db), Some(binary)) => {
                    tools.push(Mount::ro(db, ADVISORY_DB));
                    tools.push(Mount::ro(binary, CARGO_AUDIT));
                }
                (None, _) => {
                    return Ok(self.ended_before_running(
                        "this node keeps no advisory database (`advisory_db` in its config): \
                         it runs no audit jobs"
                            .to_string(),
                    ));
                }
                (_, None) => {
                    return Ok(self.ended_before_running(
                        "cargo-audit is not installed on this node (.ci/setup.d/cargo-audit.sh)"
                            .to_string(),
                    ));
                }
            }
        }
        let mut spec = self
            .command_env(SandboxSpec::new(self.prepared.command.arguments.clone()))
            .toolchain(&toolchain.sysroot)
            .env("CARGO_CACHE_AUTO_CLEAN_FREQUENCY", "never")
            .workspace(&slot.src)
            .target_dir(&slot.target)
            .disk_limited(&slot.target)
            .cargo_home(&cargo_home, false)
            .cwd(self.working_directory())
            .network(NetworkPolicy::None)
            .limits(self.limits());
        for mount in tools {
            spec = spec.mount(mount);
        }
        let mut parser = CargoOutputParser::with_total_estimate(lockfile_unit_estimate(&lockfile));
        parser.forward_records = self
            .prepared
            .command
            .arguments
            .iter()
            .any(|a| a == RECORDS_FORMAT);
        // Each executable is stored as soon as cargo reports it, while cargo goes on (other
        // units, the test run, its own exit and the sandbox teardown).
        let (blobs, function) = (self.inner().cas.blobs.clone(), self.function());
        let mut storing = Vec::new();
        let outcome = self
            .run_sandboxed(spec, |job, line| {
                let events = match line.stream {
                    Stream::Stdout => parser.feed_stdout(&line.line),
                    Stream::Stderr => parser.feed_stderr(&line.line),
                };
                let kind = log_kind(line.stream);
                for event in events {
                    match event {
                        CargoEvent::UserLine(text) => job.log(kind, text),
                        CargoEvent::Diagnostic(text) => job.log(LogStreamKind::Stderr, text),
                        CargoEvent::Progress { done, total } => {
                            let _ = job.state.send(JobState::Running { done, total });
                        }
                        CargoEvent::Artifact(artifact) => {
                            if let Some(built) = built_units.as_mut() {
                                built.artifact(&artifact);
                            }
                            for inside in artifact.deliverables() {
                                let (blobs, target) = (blobs.clone(), slot.target.clone());
                                let inside = inside.to_string();
                                storing.push(tokio::task::spawn_blocking(move || {
                                    store_cargo_artifact(&blobs, function, &target, &inside)
                                }));
                            }
                        }
                        CargoEvent::BuildScriptExecuted {
                            package_id,
                            out_dir,
                        } => {
                            if let Some(built) = built_units.as_mut() {
                                built.build_script_run(&package_id, &out_dir);
                            }
                        }
                        CargoEvent::BuildFinished { .. } => {}
                    }
                }
            })
            .await?;
        self.step("build", built);
        if outcome.limit == Some(crate::sandbox::LimitKind::Disk) {
            // A target dir that filled its volume would fail every later job of the slot: it
            // is a cache, start it over.
            let target = slot.target.clone();
            Self::blocking(move || {
                clear_dir(&target).map_err(io_error("clearing a full target dir"))
            })
            .await?;
            self.log(
                LogStreamKind::System,
                "the target dir filled its disk limit and was cleared",
            );
        }

        let collected = Instant::now();
        let mut staged = Vec::new();
        for task in storing {
            let stored = task.await.expect("storing an artifact does not panic")?;
            staged.extend(stored);
        }
        // Every artifact made durable and visible together (one group commit).
        let blobs = self.inner().cas.blobs.clone();
        let mut artifacts = Self::blocking(move || {
            let (artifacts, blobs_staged): (Vec<Artifact>, Vec<rba_cas::StagedBlob>) =
                staged.into_iter().unzip();
            for published in blobs.publish(blobs_staged) {
                published?;
            }
            Ok(artifacts)
        })
        .await?;
        artifacts.extend(resolved_lock);
        artifacts.sort_by(|a, b| a.path.cmp(&b.path));
        artifacts.dedup_by(|a, b| a.path == b.path);
        self.step("outputs", collected);
        if outcome.success() {
            // The job's last step: the slot stays locked until the units are stored.
            self.start_publishing(built_units, &slot, &lockfile, &toolchain, lock);
        }
        let (layout, max_slots) = (self.inner().layout.clone(), self.inner().config.max_slots);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = layout.cleanup(max_slots) {
                tracing::warn!(error = %e, "slot cleanup failed");
            }
        });
        Ok(RunResult {
            exit_code: exit_code(&outcome),
            success: outcome.success(),
            output_files: artifacts.iter().map(artifact_output_file).collect(),
            output_directories: Vec::new(),
            artifacts,
            error: limit_message(&outcome),
            timed_out: timed_out(&outcome),
            limit: outcome.limit,
            peak_memory_bytes: peak_memory(&outcome),
        })
    }

    /// Shared units before the build ([`crate::shared_units`]): what the job may do with them,
    /// and, in a fresh slot, the matching ones materialised into its target dir. Returns the
    /// collector of what the build compiles and uses when it may receive units.
    async fn receive_units(
        &mut self,
        fresh: bool,
        slot: &Slot,
        lockfile: &str,
        toolchain: &Toolchain,
    ) -> Result<Option<BuildUnits>, ExecutorError> {
        if !self.inner().config.shared_units || !fresh {
            return Ok(None);
        }
        let (command, src) = (self.prepared.command.clone(), slot.src.clone());
        let plan = Self::blocking(move || Ok(UnitsPlan::for_job(&command, &src, fresh))).await?;
        if !plan.receive {
            let reason = plan.reason.unwrap_or_default();
            self.log(LogStreamKind::System, format!("shared units off: {reason}"));
            return Ok(None);
        }
        let started = Instant::now();
        let (units, toolchain, variant, lock, target) = (
            self.inner().units.clone(),
            toolchain.digest_hex.clone(),
            plan.variant.clone(),
            lockfile.to_string(),
            slot.target.clone(),
        );
        let done = Self::blocking(move || {
            units
                .materialise(&toolchain, &variant, &lock, &target)
                .map_err(io_error("materialising shared units"))
        })
        .await;
        self.step("units", started);
        let mut materialised = Vec::new();
        match done {
            Ok(done) => {
                self.log(
                    LogStreamKind::System,
                    format!(
                        "shared units: {} materialised ({} bytes)",
                        done.units, done.bytes
                    ),
                );
                for (unit, why) in done.skipped {
                    self.log(
                        LogStreamKind::System,
                        format!("shared units: {unit} not used: {why}"),
                    );
                }
                materialised = done.ids;
            }
            // Not the job's failure: cargo builds what is not there.
            Err(e) => self.log(LogStreamKind::System, format!("shared units: {e}")),
        }
        if let Some(reason) = plan.reason {
            self.log(LogStreamKind::System, format!("shared units: {reason}"));
        }
        Ok(Some(BuildUnits::new(
            plan.variant,
            materialised,
            plan.publish,
        )))
    }

    /// Shared units after a successful build: the registry units it compiled stored and
    /// indexed if it publishes ([`BuildUnits::publishes`]: not when workspace code ran at build
    /// time), and the shared units it used kept in front of their variants. In the background,
    /// so the job's client does not wait for it: the slot's lock (`lock`) is held until it is
    /// done, so no later job of the slot touches the files meanwhile
    /// ([`Executor::units_published`] waits for every build's). It holds the executor too:
    /// shut-down (the last clone's drop) unmounts only the volumes of unlocked slots, so it
    /// must come after the lock is given back, or the slot's volume would stay mounted.
    fn start_publishing(
        &mut self,
        built: Option<BuildUnits>,
        slot: &Slot,
        lockfile: &str,
        toolchain: &Toolchain,
        lock: SlotLock,
    ) {
        let Some(built) = built else {
            return;
        };
        let publishes = built.publishes();
        if let Some(reason) = built.tainted() {
            let line = format!("shared units not published: {reason}");
            self.log(LogStreamKind::System, line);
        } else if publishes {
            self.log(
                LogStreamKind::System,
                "shared units: publishing this build's registry units",
            );
        }
        let (units, toolchain, lock_file, target) = (
            self.inner().units.clone(),
            toolchain.digest_hex.clone(),
            lockfile.to_string(),
            slot.target.clone(),
        );
        let in_flight = PublishingGuard::start(&self.inner().publishing);
        let executor = self.executor.clone();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            match units.publish(&toolchain, built.variant(), &lock_file, &target, &built) {
                Ok(published) if publishes => tracing::info!(
                    units = published.units,
                    bytes = published.bytes,
                    took = ?started.elapsed(),
                    "shared units published"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "publishing shared units"),
            }
            drop(lock);
            drop(in_flight);
            drop(executor); // last, after the lock: see above
        });
    }

    /// The lock file of a workspace that has none: `cargo generate-lockfile` with the network
    /// of the fetch phase (the tree's manifests checked first, the egress proxy as the only way
    /// out), on a copy of the workspace under the target dir ([`RESOLVE_DIR`]). The lock is
    /// stored in the CAS as the job's `Cargo.lock` output and written into the slot's sources
    /// (executor side, beneath the slot: nothing followed), where the build phase reads it;
    /// [`RunningJob::fetch_phase`] then checks its sources like any lock file's.
    async fn resolve_phase(
        &mut self,
        slot: &Slot,
        toolchain: &Toolchain,
    ) -> Result<Result<(String, Artifact), RunResult>, ExecutorError> {
        let policy = match EgressPolicy::new(&self.inner().config.fetch_allowed_hosts) {
            Ok(policy) => policy,
            Err(refused) => return Ok(Err(self.ended_before_running(refused.to_string()))),
        };
        let (src, manifest_policy) = (slot.src.clone(), policy.clone());
        let manifests = Self::blocking(move || Ok(manifest_policy.check_manifests(&src))).await?;
        if let Err(refused) = manifests {
            return Ok(Err(self.ended_before_running(refused.to_string())));
        }
        let argv = resolve_argv(Path::new(&self.prepared.command.working_directory));
        if let Some(failed) = self
            .network_phase(
                NetworkPhase {
                    step: "resolve",
                    announce: "no Cargo.lock: resolving one (network allowed in this phase only, through the egress proxy)",
                    failure: "resolving the lock file (cargo generate-lockfile) failed",
                },
                argv,
                policy,
                slot,
                toolchain,
            )
            .await?
        {
            return Ok(Err(failed));
        }
        let (blobs, function, target, src) = (
            self.inner().cas.blobs.clone(),
            self.function(),
            slot.target.clone(),
            slot.src.clone(),
        );
        let (text, digest) =
            Self::blocking(move || take_resolved_lock(&blobs, function, &target, &src)).await?;
        self.log(
            LogStreamKind::System,
            format!("resolved Cargo.lock ({digest:?}), returned with the job's outputs"),
        );
        Ok(Ok((
            text,
            Artifact {
                path: RESOLVED_LOCK_PATH.to_string(),
                digest,
                executable: false,
            },
        )))
    }

    /// `cargo fetch --locked` with network into the shared cargo home, once per Cargo.lock.
    ///
    /// The network is the operator's fetch allowlist only (see [`crate::egress`]): every
    /// source of the lock file and of the tree's manifests is checked first (a refused one ends
    /// the job with an error naming it, before anything connects), then cargo runs with an
    /// egress proxy as its only way out.
    async fn fetch_phase(
        &mut self,
        slot: &Slot,
        lockfile: &str,
        toolchain: &Toolchain,
    ) -> Result<Option<RunResult>, ExecutorError> {
        let policy = match EgressPolicy::new(&self.inner().config.fetch_allowed_hosts)
            .and_then(|policy| Ok((policy.check_lockfile(lockfile)?, policy)))
        {
            Ok(checked) => checked,
            Err(refused) => return Ok(Some(self.ended_before_running(refused.to_string()))),
        };
        let (sources, policy) = policy;
        let needs_network = sources > 0;
        // What a lock file names is fetched once into the shared cargo home, whichever slot
        // asks first: the marker lives there, written by the executor (the sandbox never
        // sees `fetched/`).
        let lock_digest = DigestFunction::Blake3
            .digest_of(lockfile.as_bytes())
            .hash_hex();
        let marker = self
            .inner()
            .layout
            .fetched_marker(&lock_digest)
            .map_err(io_error("preparing the fetch marker"))?;
        if !needs_network || marker.exists() {
            return Ok(None);
        }
        let (src, manifest_policy) = (slot.src.clone(), policy.clone());
        let manifests = Self::blocking(move || Ok(manifest_policy.check_manifests(&src))).await?;
        if let Err(refused) = manifests {
            return Ok(Some(self.ended_before_running(refused.to_string())));
        }
        let argv = fetch_argv(&self.working_directory());
        if let Some(failed) = self
            .network_phase(
                NetworkPhase {
                    step: "fetch",
                    announce: "fetching dependencies (network allowed in this phase only, through the egress proxy)",
                    failure: "cargo fetch failed",
                },
                argv,
                policy,
                slot,
                toolchain,
            )
            .await?
        {
            return Ok(Some(failed));
        }
        std::fs::write(&marker, lock_digest).map_err(io_error("recording the fetched lockfile"))?;
        Ok(None)
    }

    /// Runs `argv` (cargo, in [`FETCH_CWD`]) with the network of the fetch phases: the shared
    /// cargo home writable, the egress proxy for `policy` as the only way out. `None` when it
    /// succeeded; else the job's failed result, naming what the proxy refused.
    async fn network_phase(
        &mut self,
        phase: NetworkPhase,
        argv: Vec<String>,
        policy: EgressPolicy,
        slot: &Slot,
        toolchain: &Toolchain,
    ) -> Result<Option<RunResult>, ExecutorError> {
        let proxy = EgressProxy::start(policy)
            .await
            .map_err(io_error("starting the egress proxy"))?;
        let started = Instant::now();
        self.log(LogStreamKind::System, phase.announce);
        let mut spec = SandboxSpec::new(argv)
            .env("CARGO_CACHE_AUTO_CLEAN_FREQUENCY", "never")
            .env("CARGO_TERM_COLOR", "always");
        for (name, value) in proxy.cargo_env() {
            spec = spec.env(name, value);
        }
        let spec = spec
            .toolchain(&toolchain.sysroot)
            .workspace(&slot.src)
            .target_dir(&slot.target)
            .disk_limited(&slot.target)
            .cargo_home(self.inner().layout.cargo_home(), true)
            .cwd(FETCH_CWD)
            .network(NetworkPolicy::Host)
            .limits(self.limits());
        let outcome = self
            .run_sandboxed(spec, |job, line| job.log(log_kind(line.stream), line.line))
            .await?;
        let refusals = proxy.refusals();
        drop(proxy);
        self.step(phase.step, started);
        if outcome.success() {
            return Ok(None);
        }
        let mut error = limit_message(&outcome).unwrap_or_else(|| phase.failure.to_string());
        if !refusals.is_empty() {
            error = format!("{error}; the egress proxy refused {}", refusals.join("; "));
            self.log(LogStreamKind::System, error.clone());
        }
        Ok(Some(RunResult {
            exit_code: exit_code(&outcome),
            success: false,
            output_files: Vec::new(),
            output_directories: Vec::new(),
            artifacts: Vec::new(),
            error: Some(error),
            timed_out: timed_out(&outcome),
            limit: outcome.limit,
            peak_memory_bytes: peak_memory(&outcome),
        }))
    }

    /// The result of a job refused before anything ran (a refused fetch, no advisory
    /// database), logged too.
    fn ended_before_running(&mut self, error: String) -> RunResult {
        self.log(LogStreamKind::System, error.clone());
        RunResult {
            exit_code: 1,
            success: false,
            output_files: Vec::new(),
            output_directories: Vec::new(),
            artifacts: Vec::new(),
            error: Some(error),
            timed_out: false,
            limit: None,
            peak_memory_bytes: None,
        }
    }

    /// Any other command (a Bazel action): fresh exec root, run, collect `output_paths`.
    async fn run_command(&mut self) -> Result<RunResult, ExecutorError> {
        let job_dir = self
            .inner()
            .layout
            .job_dir(self.id)
            .map_err(io_error("creating the job dir"))?;
        // With a disk limit, the exec root is on a size-capped volume of its own (an exec
        // volume, this action's alone while it runs), as a cargo job's target dir is: an
        // action filling it fails with LimitKind::Disk, the host's disk stays untouched.
        let layout = self.inner().layout.clone();
        let (volume, _volume_lock) = match self.inner().config.slot_disk {
            Some(_) => {
                let (dir, lock) = Self::blocking(move || {
                    layout
                        .exec_volume()
                        .map_err(io_error("taking an exec volume"))
                })
                .await?;
                (self.disk_volume(dir).await?, Some(lock))
            }
            None => (None, None),
        };
        let exec_root = match &volume {
            Some((vol, _)) => vol.join("exec"),
            None => job_dir.path().join("exec"),
        };
        let fresh_root = exec_root.clone();
        Self::blocking(move || {
            // What the volume's previous action left (one that was killed mid-way) goes first.
            match std::fs::remove_dir_all(&fresh_root) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(io_error("clearing the exec root")(e))
                }
                _ => Ok(()),
            }
        })
        .await?;
        let materialised = Instant::now();
        let (blobs, root, target, limits) = (
            self.inner().cas.blobs.clone(),
            self.prepared.input_root_digest,
            exec_root.clone(),
            self.inner().config.tree_limits.clone(),
        );
        Self::blocking(move || {
            // Checked at submission, unless it was incomplete then: never expanded unchecked.
            merkle::validate_tree(&blobs, &root, &limits)?;
            // Copies, not hardlinks: the command may write where its inputs are.
            merkle::materialize(
                &blobs,
                &root,
                &target,
                &MaterializeOptions { hardlink: false },
            )?;
            Ok(())
        })
        .await?;
        self.step("materialise", materialised);
        let command = &self.prepared.command;
        let outputs = output_paths(command);
        // Checked when the action was loaded (`check_command_paths`): relative, no `..`.
        let working = PathBuf::from(&command.working_directory);
        let exec = Beneath::open(&exec_root).map_err(io_error("opening the exec root"))?;
        for output in &outputs {
            // REAPI: the server creates the parent directories of every output path, here never
            // through a symlink of the input tree.
            if let Some(parent) = working.join(output).parent() {
                exec.create_dir_all(parent).map_err(io_error(format!(
                    "creating the parent directories of output {output:?}"
                )))?;
            }
        }
        let ran = Instant::now();
        let spec = self
            .command_env(SandboxSpec::new(command.arguments.clone()))
            .mount(crate::sandbox::Mount::rw(&exec_root, WORKSPACE_DIR))
            .cwd(self.working_directory())
            .network(NetworkPolicy::None)
            .limits(self.limits());
        let spec = match &volume {
            Some(_) => spec.disk_limited(&exec_root),
            None => spec,
        };
        let outcome = self
            .run_sandboxed(spec, |job, line| job.log(log_kind(line.stream), line.line))
            .await?;
        self.step("run", ran);
        let collected = Instant::now();
        let (blobs, function) = (self.inner().cas.blobs.clone(), self.function());
        let (files, directories) = Self::blocking(move || {
            let collected = collect_outputs(&blobs, function, &exec_root, &working, &outputs);
            // The volume is reused: nothing of this action stays for the next.
            if let Err(e) = std::fs::remove_dir_all(&exec_root) {
                tracing::warn!(path = %exec_root.display(), error = %e, "clearing an exec root");
            }
            collected
        })
        .await?;
        self.step("outputs", collected);
        drop(volume);
        drop(job_dir);
        let artifacts = files
            .iter()
            .filter_map(|f| output_file_artifact(function, f))
            .collect();
        Ok(RunResult {
            exit_code: exit_code(&outcome),
            success: outcome.success(),
            output_files: files,
            output_directories: directories,
            artifacts,
            error: limit_message(&outcome),
            timed_out: timed_out(&outcome),
            limit: outcome.limit,
            peak_memory_bytes: peak_memory(&outcome),
        })
    }

    async fn finish_log(&mut self) -> Result<LogDigests, ExecutorError> {
        let writer = self.writer.take().expect("the log is finished once");
        Ok(writer
            .finish_async(self.inner().cas.blobs.clone(), self.function())
            .await?)
    }

    /// Stores the log and the ActionResult, and builds the outcome.
    async fn finish(&mut self, mut run: RunResult) -> Result<JobOutcome, ExecutorError> {
        if let Some(error) = &run.error {
            self.log(LogStreamKind::System, error.clone());
        }
        let log = self.finish_log().await?;
        let is_cargo = self.prepared.platform_property("job").is_some();
        if is_cargo {
            run.output_files.push(OutputFile {
                path: LOG_OUTPUT_PATH.to_string(),
                digest: Some(log.log.to_reapi()),
                ..Default::default()
            });
        }
        let now = prost_timestamp(SystemTime::now());
        let result = ActionResult {
            output_files: run.output_files,
            output_directories: run.output_directories,
            exit_code: run.exit_code,
            stdout_digest: Some(log.stdout.to_reapi()),
            stderr_digest: Some(log.stderr.to_reapi()),
            execution_metadata: Some(ExecutedActionMetadata {
                worker: "rba-executor".to_string(),
                worker_completed_timestamp: Some(now),
                ..Default::default()
            }),
            ..Default::default()
        };
        let cacheable = run.success && !self.prepared.action.do_not_cache;
        let namespace = result_namespace(
            &self.request.instance,
            &self.request.tenant,
            self.provenance,
            cacheable,
        );
        self.inner()
            .stores
            .actions()
            .put(&namespace, &self.prepared.action_digest, &result)
            .await?;
        Ok(JobOutcome {
            status: if run.success {
                JobStatus::Success
            } else {
                JobStatus::Failed
            },
            exit_code: run.exit_code,
            result: Some(result),
            cache_hit: false,
            duration: self.started.elapsed(),
            log: Some(log),
            artifacts: run.artifacts,
            steps: std::mem::take(&mut self.steps),
            step_end_lines: std::mem::take(&mut self.step_end_lines),
            error: run.error,
            timed_out: run.timed_out,
            limit: run.limit,
            peak_memory_bytes: run.peak_memory_bytes,
        })
    }

    /// The outcome of a job that broke (or was cancelled) before it could finish normally.
    async fn failed_outcome(&mut self, error: ExecutorError) -> JobOutcome {
        let status = if matches!(error, ExecutorError::Cancelled) {
            JobStatus::Cancelled
        } else {
            JobStatus::Error
        };
        let message = error.to_string();
        let log = if self.writer.is_some() {
            self.log(LogStreamKind::System, format!("error: {message}"));
            self.finish_log().await.ok()
        } else {
            None
        };
        JobOutcome {
            status,
            exit_code: -1,
            result: None,
            cache_hit: false,
            duration: self.started.elapsed(),
            log,
            artifacts: Vec::new(),
            steps: std::mem::take(&mut self.steps),
            step_end_lines: std::mem::take(&mut self.step_end_lines),
            error: Some(message),
            timed_out: false,
            limit: None,
            peak_memory_bytes: None,
        }
    }
}

/// The action-cache instance under which failed results are kept: retrievable, never served
/// as hits.
pub fn failed_instance(instance: &str) -> String {
    format!("{instance}\u{0}failed")
}

/// What, besides its input root, a job's build could see (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provenance {
    /// Only the input root and what the executor made from it: a fresh exec root, or a target
    /// dir that was empty when the job took its slot.
    Clean,
    /// A target dir earlier jobs of the slot's tenant wrote into.
    TenantState,
}

/// The action-cache namespace a job's result belongs to: the one decision of who may be
/// served it. Clean successes go to the shared `instance`; anything else stays with `tenant`
/// (successes in `instance \0tenant:<tenant>`, failures in that namespace's failed namespace,
/// never served as hits).
pub fn result_namespace(
    instance: &str,
    tenant: &Tenant,
    provenance: Provenance,
    success: bool,
) -> String {
    match (provenance, success) {
        (Provenance::Clean, true) => instance.to_string(),
        (Provenance::TenantState, true) => format!("{instance}\u{0}tenant:{tenant}"),
        (_, false) => failed_instance(&result_namespace(
            instance,
            tenant,
            Provenance::TenantState,
            true,
        )),
    }
}

/// Where a job of `tenant` may find a cached success, in lookup order: its own namespace,
/// then the shared one.
pub fn lookup_namespaces(instance: &str, tenant: &Tenant) -> [String; 2] {
    [
        result_namespace(instance, tenant, Provenance::TenantState, true),
        result_namespace(instance, tenant, Provenance::Clean, true),
    ]
}

/// True for a namespace only the executor writes: [`CARGO_INSTANCE`], anything under `rba/`,
/// and every namespace derived by [`result_namespace`] (they hold a NUL, which no client
/// instance name needs). REAPI `UpdateActionResult` refuses these.
pub fn is_executor_namespace(instance: &str) -> bool {
    instance == CARGO_INSTANCE || instance.starts_with("rba/") || is_private_namespace(instance)
}

/// True for a tenant-scoped or failed namespace: readable by the executor alone (it serves a
/// tenant its own entries), never through a client-facing read.
pub fn is_private_namespace(instance: &str) -> bool {
    instance.contains('\u{0}')
}

/// The log stream a sandbox output line belongs to.
fn log_kind(stream: Stream) -> LogStreamKind {
    match stream {
        Stream::Stdout => LogStreamKind::Stdout,
        Stream::Stderr => LogStreamKind::Stderr,
    }
}

fn exit_code(outcome: &crate::sandbox::SandboxOutcome) -> i32 {
    match outcome.exit {
        crate::sandbox::ExitKind::Exited(code) => code,
        crate::sandbox::ExitKind::Signaled(signal) => 128 + signal,
    }
}

fn peak_memory(outcome: &crate::sandbox::SandboxOutcome) -> Option<u64> {
    outcome
        .cgroup
        .as_ref()
        .map(|c| c.memory_peak)
        .filter(|peak| *peak > 0)
        .or(outcome.usage.as_ref().map(|u| u.max_rss_bytes))
}

fn timed_out(outcome: &crate::sandbox::SandboxOutcome) -> bool {
    outcome.killed == Some(crate::sandbox::KillReason::WallTimeout)
        || outcome.limit == Some(crate::sandbox::LimitKind::WallTime)
}

/// Removes everything inside `dir` (not `dir` itself: it may be a mount's directory).
/// Removes the `Cargo.lock` a resolution left in a slot's sources (the tree has none).
fn remove_resolved_lock(src: &Path) -> std::io::Result<()> {
    let src = Beneath::open(src)?;
    src.remove(Path::new(RESOLVED_LOCK_PATH))
}

/// Takes the lock file the resolution left under the target dir ([`RESOLVE_DIR`]): read
/// beneath the target dir without following links (the sandbox wrote there), stored in the
/// CAS, written into the slot's sources for the build phase, and the resolution dir removed.
fn take_resolved_lock(
    blobs: &rba_cas::BlobStore,
    function: DigestFunction,
    target: &Path,
    src: &Path,
) -> Result<(String, Digest), ExecutorError> {
    use std::io::{Read, Write};
    let resolve_dir = Path::new(RESOLVE_DIR)
        .strip_prefix(TARGET_DIR)
        .expect("the resolve dir is under the target dir");
    let target = Beneath::open(target).map_err(io_error("opening the target dir"))?;
    let mut bytes = Vec::new();
    target
        .open_file(&resolve_dir.join("Cargo.lock"))
        .and_then(|file| {
            file.take(MAX_RESOLVED_LOCK_BYTES + 1)
                .read_to_end(&mut bytes)
        })
        .map_err(io_error("reading the resolved Cargo.lock"))?;
    if bytes.len() as u64 > MAX_RESOLVED_LOCK_BYTES {
        return Err(ExecutorError::Io {
            context: "reading the resolved Cargo.lock".into(),
            source: std::io::Error::other(format!("larger than {MAX_RESOLVED_LOCK_BYTES} bytes")),
        });
    }
    let digest = blobs.put_bytes(function, &bytes)?;
    let src = Beneath::open(src).map_err(io_error("opening the slot's sources"))?;
    let (temp, mut file) = src
        .create_temp(0o644)
        .map_err(io_error("writing the resolved Cargo.lock"))?;
    file.write_all(&bytes)
        .and_then(|()| src.rename_from(&src, Path::new(&temp), Path::new(RESOLVED_LOCK_PATH)))
        .map_err(io_error("writing the resolved Cargo.lock"))?;
    target
        .remove(resolve_dir)
        .map_err(io_error("removing the resolution dir"))?;
    Ok((String::from_utf8_lossy(&bytes).into_owned(), digest))
}

fn clear_dir(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if std::fs::symlink_metadata(&path)?.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// The job's error naming the limit it hit (`memory limit reached`, `disk limit reached`, ...).
fn limit_message(outcome: &crate::sandbox::SandboxOutcome) -> Option<String> {
    match (outcome.limit, outcome.killed) {
        (Some(limit), Some(reason)) => Some(format!("{limit} reached (killed: {reason:?})")),
        (Some(limit), None) => Some(format!("{limit} reached")),
        (None, Some(reason)) => Some(format!("killed: {reason:?}")),
        (None, None) => None,
    }
}

fn prost_timestamp(time: SystemTime) -> rba_proto::protobuf::Timestamp {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    rba_proto::protobuf::Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
    }
}

/// The lines to replay for a cached result: the ordered log if the job kept one, else stdout
/// then stderr.
fn replay_lines(
    blobs: &rba_cas::BlobStore,
    function: DigestFunction,
    result: &ActionResult,
) -> Result<Vec<(LogStreamKind, String)>, CasError> {
    if let Some(file) = result
        .output_files
        .iter()
        .find(|f| f.path == LOG_OUTPUT_PATH)
    {
        let digest = Digest::from_reapi_field(function, file.digest.as_ref(), "OutputFile.digest")?;
        let bytes = blobs.read_to_vec(&digest, MAX_REPLAY_BYTES)?;
        let lines = parse_log_blob(&bytes)
            .map_err(|e| CasError::invalid(format!("log {digest:?}"), e.to_string()))?;
        return Ok(lines.into_iter().map(|l| (l.stream, l.line)).collect());
    }
    let mut lines = Vec::new();
    for (stream, digest, raw) in [
        (
            LogStreamKind::Stdout,
            &result.stdout_digest,
            &result.stdout_raw,
        ),
        (
            LogStreamKind::Stderr,
            &result.stderr_digest,
            &result.stderr_raw,
        ),
    ] {
        let bytes = match digest {
            Some(digest) => {
                blobs.read_to_vec(&Digest::from_reapi(function, digest)?, MAX_REPLAY_BYTES)?
            }
            None => raw.clone(),
        };
        lines.extend(
            String::from_utf8_lossy(&bytes)
                .lines()
                .map(|l| (stream, l.to_string())),
        );
    }
    Ok(lines)
}

fn output_file_artifact(function: DigestFunction, file: &OutputFile) -> Option<Artifact> {
    if file.path == LOG_OUTPUT_PATH {
        return None;
    }
    let digest =
        Digest::from_reapi_field(function, file.digest.as_ref(), "OutputFile.digest").ok()?;
    Some(Artifact {
        path: file.path.clone(),
        digest,
        executable: file.is_executable,
    })
}

fn artifacts_of(function: DigestFunction, result: &ActionResult) -> Vec<Artifact> {
    result
        .output_files
        .iter()
        .filter_map(|f| output_file_artifact(function, f))
        .collect()
}

fn artifact_output_file(artifact: &Artifact) -> OutputFile {
    OutputFile {
        path: artifact.path.clone(),
        digest: Some(artifact.digest.to_reapi()),
        is_executable: artifact.executable,
        ..Default::default()
    }
}

/// The entries of a stored tree, as the workspace sync wants them. The tree is validated first
/// (again, when submission found it incomplete): it is never expanded unchecked.
fn desired_entries(
    blobs: &rba_cas::BlobStore,
    root: &Digest,
    limits: &TreeLimits,
) -> Result<Vec<DesiredEntry>, ExecutorError> {
    merkle::validate_tree(blobs, root, limits)?;
    let mut entries = Vec::new();
    let mut stack = vec![(PathBuf::new(), *root)];
    while let Some((path, digest)) = stack.pop() {
        let directory = merkle::read_directory(blobs, &digest)?;
        for file in &directory.files {
            let digest =
                Digest::from_reapi_field(root.function, file.digest.as_ref(), "FileNode.digest")
                    .map_err(CasError::from)?;
            entries.push(DesiredEntry::File {
                path: path.join(&file.name),
                digest,
                executable: file.is_executable,
            });
        }
        for link in &directory.symlinks {
            entries.push(DesiredEntry::Symlink {
                path: path.join(&link.name),
                target: link.target.clone(),
            });
        }
        for child in &directory.directories {
            let digest = Digest::from_reapi_field(
                root.function,
                child.digest.as_ref(),
                "DirectoryNode.digest",
            )
            .map_err(CasError::from)?;
            entries.push(DesiredEntry::Directory {
                path: path.join(&child.name),
            });
            stack.push((path.join(&child.name), digest));
        }
    }
    // Parents before children, so directories exist before their files are written.
    entries.sort_by(|a, b| entry_path(a).cmp(entry_path(b)));
    Ok(entries)
}

fn entry_path(entry: &DesiredEntry) -> &Path {
    match entry {
        DesiredEntry::File { path, .. }
        | DesiredEntry::Directory { path }
        | DesiredEntry::Symlink { path, .. } => path,
    }
}

/// A file cargo reported (an executable or a cdylib/staticlib, an inside-sandbox path under
/// `/target`) stored into the CAS with its executable bit as it is; `None` for anything but a
/// regular file inside the slot's target dir.
///
/// The job may still be running and its files are hostile: the path is opened without
/// following a final symlink and without blocking (a FIFO), and what was actually opened is
/// checked through `/proc/self/fd`, so no symlink or `..`, swapped in at any moment, makes the
/// executor (often root) store a host file.
fn store_cargo_artifact(
    blobs: &rba_cas::BlobStore,
    function: DigestFunction,
    target: &Path,
    inside: &str,
) -> Result<Option<(Artifact, rba_cas::StagedBlob)>, ExecutorError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;

    let Ok(relative) = Path::new(inside).strip_prefix(TARGET_DIR) else {
        return Ok(None);
    };
    if !relative
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)))
    {
        return Ok(None);
    }
    let host = target.join(relative);
    let Ok(mut file) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&host)
    else {
        return Ok(None);
    };
    let opened = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(io_error("resolving an artifact"))?;
    let target = std::fs::canonicalize(target).map_err(io_error("resolving the target dir"))?;
    let metadata = file.metadata().ok().filter(|m| m.is_file());
    if !opened.starts_with(&target) || metadata.is_none() {
        tracing::warn!(path = inside, opened = %opened.display(), "artifact refused");
        return Ok(None);
    }
    let staged = blobs.stage_open_file(function, &mut file, &host)?;
    Ok(Some((
        Artifact {
            path: format!("target/{}", relative.display()),
            digest: staged.digest(),
            executable: metadata.is_some_and(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.permissions().mode() & 0o111 != 0
            }),
        },
        staged,
    )))
}

/// The Command's outputs: `output_paths` (REAPI v2.1+), else the legacy file and directory lists.
#[allow(deprecated)]
fn output_paths(command: &reapi::Command) -> Vec<String> {
    if !command.output_paths.is_empty() {
        return command.output_paths.clone();
    }
    command
        .output_files
        .iter()
        .chain(command.output_directories.iter())
        .cloned()
        .collect()
}

/// Stores whatever exists at the output paths: files as `OutputFile`s, directories as `Tree`s.
///
/// Output paths are relative to the working directory (both checked when the action was
/// loaded); each is looked up beneath the exec root without following any symlink, final or on
/// the way ([`Beneath`]): an output the command replaced by a symlink, or placed behind one, is
/// not collected, so no host file is read.
fn collect_outputs(
    blobs: &rba_cas::BlobStore,
    function: DigestFunction,
    exec_root: &Path,
    working: &Path,
    outputs: &[String],
) -> Result<(Vec<OutputFile>, Vec<OutputDirectory>), ExecutorError> {
    let root = Beneath::open(exec_root).map_err(io_error("opening the exec root"))?;
    let mut files = Vec::new();
    let mut directories = Vec::new();
    for output in outputs {
        let relative = working.join(output);
        let Ok(meta) = root.metadata(&relative) else {
            continue;
        };
        match meta.kind {
            EntryKind::File => {
                let Ok(mut file) = root.open_file(&relative) else {
                    continue;
                };
                let digest =
                    blobs.put_open_file(function, &mut file, &exec_root.join(&relative))?;
                files.push(OutputFile {
                    path: output.clone(),
                    digest: Some(digest.to_reapi()),
                    is_executable: meta.mode & 0o111 != 0,
                    ..Default::default()
                });
            }
            EntryKind::Directory => {
                // Reached without a symlink (checked by opening it); the command has ended, so
                // nothing swaps one in before the walk, which follows none itself.
                if root.open_dir(&relative).is_err() {
                    continue;
                }
                let options = DirOptions {
                    respect_gitignore: false,
                    skip_root_dirs: Vec::new(),
                    skip_git: false,
                    skip_cache_dirs: false,
                    use_stat_cache: false,
                    always_include: Vec::new(),
                    files_done: None,
                };
                let path = exec_root.join(&relative);
                let built = merkle::build_from_dir(blobs, &path, function, &options)?;
                let tree = merkle::get_tree(blobs, &built.root)?;
                let tree_digest = blobs.put_bytes(function, &tree.encode_to_vec())?;
                directories.push(OutputDirectory {
                    path: output.clone(),
                    tree_digest: Some(tree_digest.to_reapi()),
                    is_topologically_sorted: false,
                    root_directory_digest: Some(built.root.to_reapi()),
                });
            }
            EntryKind::Symlink | EntryKind::Other => {}
        }
    }
    Ok((files, directories))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_inside_the_target_dir_are_stored_as_artifacts() {
        let (_store_dir, blobs) = rba_cas::BlobStore::scratch().unwrap();
        let slot = tempfile::tempdir().unwrap();
        let target = slot.path().join("target");
        std::fs::create_dir_all(target.join("debug")).unwrap();
        std::fs::write(target.join("debug/app"), b"binary").unwrap();
        let outside = slot.path().join("secret");
        std::fs::write(&outside, b"host secret").unwrap();
        std::os::unix::fs::symlink(&outside, target.join("debug/link")).unwrap();
        std::os::unix::fs::symlink(slot.path(), target.join("escape")).unwrap();
        let fifo = std::process::Command::new("mkfifo")
            .arg(target.join("debug/fifo"))
            .status()
            .unwrap();
        assert!(fifo.success());

        let store = |inside: &str| {
            store_cargo_artifact(&blobs, DigestFunction::Blake3, &target, inside)
                .unwrap()
                .map(|(artifact, staged)| {
                    for published in blobs.publish(vec![staged]) {
                        published.unwrap();
                    }
                    artifact
                })
        };
        let app = store("/target/debug/app").expect("a regular file is stored");
        assert_eq!(app.path, "target/debug/app");
        assert!(!app.executable, "written 0644: its mode is kept");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            target.join("debug/app"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        assert!(store("/target/debug/app").unwrap().executable);
        assert_eq!(blobs.read_to_vec(&app.digest, 100).unwrap(), b"binary");
        for hostile in [
            "/target/debug/link",
            "/target/escape/secret",
            "/target/../secret",
            "/target/debug/../../secret",
            "/target/debug/fifo",
            "/target/debug/missing",
            "/workspace/Cargo.toml",
            "/etc/passwd",
        ] {
            assert_eq!(store(hostile), None, "{hostile}");
        }
        let secret = DigestFunction::Blake3.digest_of(b"host secret");
        assert!(
            !blobs.contains(&secret).unwrap(),
            "no host file entered the CAS"
        );
    }
}
