//! The sandbox: runs one untrusted command (a `cargo build`, a build script, a test binary, an
//! REAPI action) in a throw-away container and streams its output line by line.
//!
//! This module decides what a job sees and supervises it (cgroup, output, timeout, log cap,
//! kill, outcome); an [isolation provider](crate::isolation) starts it: [hakoniwa]
//! namespaces by default ([`crate::isolation::namespaces`]), or bubblewrap
//! ([`crate::isolation::bubblewrap`]), chosen by [`SandboxConfig::isolation`]. What follows
//! holds for both; where a provider differs, its module says so.
//!
//! # Why it exists
//!
//! The executor runs code it did not write: `build.rs` scripts, proc macros and tests of whatever
//! crate a client submits. Every job therefore runs in a fresh container that cannot read the
//! host's secrets, cannot write outside the directories it was given, cannot reach the network
//! (except in the dependency-fetch phase), cannot outlive its job and cannot exhaust the machine.
//!
//! # What a job sees
//!
//! | inside        | what                                                                                 |
//! |---------------|--------------------------------------------------------------------------------------|
//! | `/workspace`  | the sources, read-only ([`SandboxSpec::workspace`])                                  |
//! | `/target`     | `CARGO_TARGET_DIR`, read-write ([`SandboxSpec::target_dir`])                         |
//! | `/cargo`      | `CARGO_HOME`, read-only, read-write in the fetch phase ([`SandboxSpec::cargo_home`]) |
//! | `/toolchain`  | the Rust sysroot ([`SandboxSpec::toolchain`], else [`SandboxConfig::toolchain`]), ro |
//! | `/usr`, `/bin`, `/lib`, `/lib64`, `/sbin` | the host's, read-only (the linker `cc`, `sh`, ...)       |
//! | `/etc`        | a generated minimal `passwd`/`group`/`hosts`, the loader cache and `alternatives`;   |
//! |               | `resolv.conf`, `nsswitch.conf` and the CA certificates only with [`NetworkPolicy::Host`] |
//! | `/tmp`        | a private tmpfs capped at [`Limits::tmp_size`]                                       |
//! | `/proc`, `/dev` | the sandbox's own procfs (it sees only its processes) and a minimal `/dev`         |
//!
//! Everything else, `/root` and `/home` included, does not exist inside. The root directory is
//! read-only. The environment is exactly [`SandboxSpec::env`] on top of a fixed base
//! (`PATH=/toolchain/bin:...`, `HOME=/tmp`, `CARGO_HOME=/cargo`, `CARGO_TARGET_DIR=/target`,
//! no `RUSTUP_*`): nothing leaks in from the executor's environment.
//!
//! # Use
//!
//! ```ignore
//! let sandbox = Sandbox::new(SandboxConfig::with_host_toolchain()?)?;
//! let spec = SandboxSpec::new(["cargo", "build", "--offline", "--locked"])
//!     .workspace(&checkout)
//!     .target_dir(&target)
//!     .cargo_home(&cargo_home, false);
//! let outcome = sandbox.run(spec, |line| log.push(line)).await?;
//! // or: let mut running = sandbox.spawn(spec).await?; read running.output; running.wait().await?
//! ```
//!
//! # What it guarantees
//!
//! * **Unprivileged.** The job runs as `build` (uid/gid 1000 inside), which is mapped to a
//!   non-root host uid ([`SandboxConfig::host_uid`], 65534 by default), with no capabilities and
//!   `no_new_privs`. Files it creates in `/target` belong to that host uid; before a run the
//!   read-write mount directories are `chown`ed to it. Host uid 0 is mapped (to the
//!   namespace's root) only for the container set-up, which runs before the job's `exec`: it
//!   creates the entries of `/dev` and the tmpfs mounts, which the kernel refuses
//!   (`EOVERFLOW`) to a process whose uid is not mapped in the namespace that owns them.
//!   Mapping namespace root to an unprivileged host uid instead needs a second subordinate
//!   uid (`/etc/subuid` holds one: the sandbox user's). The job itself never runs as it. A
//!   seccomp deny list (mount, ptrace, bpf, namespaces, keyrings, kernel modules, ...) narrows
//!   the kernel surface ([`SandboxConfig::seccomp`]).
//! * **No network** by default: a new network namespace with no interface up (not even
//!   loopback). [`NetworkPolicy::Host`] shares the host's network for `cargo fetch --locked`.
//! * **Limits** ([`Limits`]): memory and processes+threads of the whole job through a cgroup
//!   of its own ([`crate::cgroup`]: created before the job's first process, which is born
//!   inside it, and removed after), CPU time (`RLIMIT_CPU`, per process), file size
//!   (`RLIMIT_FSIZE`), `/tmp` size and inodes, a wall-clock timeout and a log size cap. Where
//!   the host has no usable cgroups, memory falls back to an address-space rlimit (`RLIMIT_AS`,
//!   per process) and processes to `RLIMIT_NPROC` (counted per sandbox because every sandbox
//!   has its own user namespace); [`SandboxOutcome::cgroup`] is then `None` and the fallback is
//!   logged. Hitting the wall-clock timeout, the log cap or [`KillHandle::kill`] kills the
//!   whole sandbox. The outcome names the limit a job ran into ([`LimitKind`]): memory (an OOM
//!   kill in its cgroup), processes (a refused fork, in a job that failed), disk (a full
//!   [`SandboxSpec::disk_limited`] filesystem under a job that failed), and the others.
//! * **Nothing outlives the job.** The job is pid 1 of its own pid namespace: when it exits or is
//!   killed, the kernel kills every process left in the namespace (double-forked daemons
//!   included) before [`RunningSandbox::wait`] returns. The container's root directory (a temp
//!   dir) is removed after every run, also when the set-up failed.
//! * **Streaming.** stdout and stderr are read by dedicated threads and delivered line by line,
//!   as they are produced, through an unbounded channel: a slow consumer never blocks the job,
//!   and memory stays bounded by [`Limits::max_log_bytes`] (lines longer than 64 KiB are split).
//!
//! # Requirements and limits of the implementation
//!
//! * Linux with user namespaces, `newuidmap`/`newgidmap` (package `uidmap`) and an entry
//!   `<executor user>:<host_uid>:1` in `/etc/subuid` and `/etc/subgid`; `libseccomp` to link.
//!   `.ci/setup.d/sandbox.sh` installs all of it. [`Sandbox::new`] checks and says what is
//!   missing.
//! * cgroups are driven by [`crate::cgroup`], not by hakoniwa (which only drives cgroup v2
//!   through systemd, which hosts like the CI machines, cgroup v1 without systemd, lack). The
//!   memory limit counts the page cache and `/tmp` (tmpfs pages) of the job too.
//! * Because the job is pid 1 of its namespace, signals whose default action would kill it are
//!   ignored unless it handles them: `RLIMIT_CPU` therefore ends pid 1 with `SIGKILL` one second
//!   after the soft limit (other processes get `SIGXCPU` at the soft limit), and orphans are
//!   reparented to it.
//! * [`NetworkPolicy::Host`] is the host's network as it is, loopback services of the host
//!   included: give it only to the fetch phase (`cargo fetch --locked`), never to build scripts.
//! * Disk: `RLIMIT_FSIZE` caps each file and `/tmp` is capped; the total written to `/target`
//!   is capped by the executor's slot volumes ([`crate::quota`]), not by the sandbox.
//! * Read-only mounts are not modified: their files must be readable by the sandbox host uid
//!   (world-readable, as source trees and toolchains normally are).

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::{mpsc, oneshot};

use crate::isolation::{Bind, Isolation, IsolationProvider, JobLayout, Rlimit, Tmpfs};

/// Where the sources are mounted inside the sandbox.
pub const WORKSPACE_DIR: &str = "/workspace";
/// Where the cargo target dir is mounted inside the sandbox (`CARGO_TARGET_DIR`).
pub const TARGET_DIR: &str = "/target";
/// Where the cargo home is mounted inside the sandbox (`CARGO_HOME`).
pub const CARGO_HOME_DIR: &str = "/cargo";
/// Where the Rust toolchain (sysroot) is mounted inside the sandbox.
pub const TOOLCHAIN_DIR: &str = "/toolchain";
/// The sandbox's private, size-capped tmpfs (also `HOME` and `TMPDIR`).
pub const TMP_DIR: &str = "/tmp";
/// The user the job runs as, inside.
pub const SANDBOX_USER: &str = "build";
/// The uid (and gid) of [`SANDBOX_USER`] inside the sandbox.
pub const SANDBOX_UID: u32 = 1000;
/// `PATH` unless the spec sets one.
pub const DEFAULT_PATH: &str = "/toolchain/bin:/usr/local/bin:/usr/bin:/bin";

/// Output lines longer than this are delivered in pieces of this size.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// After a kill of the job's pid namespace, how long until the container process itself is killed.
const KILL_ESCALATION: Duration = Duration::from_secs(3);
/// How long to wait for the output readers after the container exited.
const READER_DRAIN: Duration = Duration::from_secs(5);

/// `/etc` entries bound read-only into every sandbox (when they exist on the host).
const ETC_ALWAYS: &[&str] = &[
    "/etc/alternatives",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
];
/// `/etc` entries bound read-only only with [`NetworkPolicy::Host`].
const ETC_NETWORK: &[&str] = &[
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/host.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/ssl/certs",
    "/etc/ssl/openssl.cnf",
    "/etc/ca-certificates.conf",
];

/// Errors of the sandbox itself (as opposed to the job failing, which is a [`SandboxOutcome`]).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The host lacks something the sandbox needs; `.ci/setup.d/sandbox.sh` installs it.
    #[error("sandbox prerequisite missing: {0} (run .ci/setup.d/sandbox.sh)")]
    Prerequisite(String),
    /// The [`SandboxConfig`] is unusable.
    #[error("invalid sandbox config: {0}")]
    InvalidConfig(String),
    /// The [`SandboxSpec`] is unusable (bad mount, command not found, ...).
    #[error("invalid sandbox spec: {0}")]
    InvalidSpec(String),
    /// Preparing a host path failed.
    #[error("preparing {path}: {source}")]
    Io {
        /// The host path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The container could not be started or set up (mounts, id maps, rlimits, seccomp, ...).
    /// Nothing of the job ran; its temporary directory and processes are gone.
    #[error("sandbox setup failed: {0}")]
    Setup(String),
    /// The supervising thread disappeared (a bug).
    #[error("sandbox supervisor failed: {0}")]
    Supervisor(String),
}

/// Which output stream a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    /// The job's standard output.
    Stdout,
    /// The job's standard error.
    Stderr,
}

/// One line of output, without its trailing `\n` (invalid UTF-8 is replaced by U+FFFD).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputLine {
    /// Where it came from.
    pub stream: Stream,
    /// The text.
    pub line: String,
}

/// A host directory (or file) made visible inside the sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// Host path; must exist.
    pub host: PathBuf,
    /// Absolute path inside the sandbox.
    pub inside: PathBuf,
    /// Read-write bind if true (the host dir is chowned to the sandbox user before the run),
    /// read-only otherwise.
    pub writable: bool,
}

impl Mount {
    /// A read-only bind mount.
    pub fn ro(host: impl Into<PathBuf>, inside: impl Into<PathBuf>) -> Self {
        Self {
            host: host.into(),
            inside: inside.into(),
            writable: false,
        }
    }

    /// A read-write bind mount.
    pub fn rw(host: impl Into<PathBuf>, inside: impl Into<PathBuf>) -> Self {
        Self {
            host: host.into(),
            inside: inside.into(),
            writable: true,
        }
    }
}

/// Network access of a job.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NetworkPolicy {
    /// A new, empty network namespace: no connection can be made. The default.
    #[default]
    None,
    /// The host's network (and `/etc/resolv.conf`, CA certificates): for the fetch phase only.
    Host,
}

/// Resource limits of one job. `None` means "not limited by the sandbox" (inherited).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Memory of the whole job (all its processes, page cache and `/tmp` included) through its
    /// cgroup; where cgroups are unavailable, address space per process (`RLIMIT_AS`).
    /// Default 8 GiB.
    pub memory_bytes: Option<u64>,
    /// Processes and threads of the whole job through its cgroup (`pids.max`); where cgroups
    /// are unavailable, of the sandbox user counted per sandbox (`RLIMIT_NPROC`). Default 1024.
    pub max_processes: Option<u64>,
    /// CPU time per process (`RLIMIT_CPU`, whole seconds, rounded up). Default 1 hour.
    pub cpu_time: Option<Duration>,
    /// Wall-clock time of the whole job; when exceeded the sandbox is killed. Default 1 hour.
    pub wall_time: Option<Duration>,
    /// Bytes of stdout+stderr delivered; when exceeded the sandbox is killed and the outcome says
    /// `log_truncated`. Default 64 MiB.
    pub max_log_bytes: Option<u64>,
    /// Largest file a process may write (`RLIMIT_FSIZE`). Default 8 GiB.
    pub max_file_size: Option<u64>,
    /// Open files per process (`RLIMIT_NOFILE`). Default: inherited.
    pub max_open_files: Option<u64>,
    /// Size of the `/tmp` tmpfs in bytes (its inodes: one per 16 KiB, at least 1024).
    /// Default 1 GiB.
    pub tmp_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        const GIB: u64 = 1 << 30;
        Self {
            memory_bytes: Some(8 * GIB),
            max_processes: Some(1024),
            cpu_time: Some(Duration::from_secs(3600)),
            wall_time: Some(Duration::from_secs(3600)),
            max_log_bytes: Some(64 << 20),
            max_file_size: Some(8 * GIB),
            max_open_files: None,
            tmp_size: GIB,
        }
    }
}

/// What to run and with which view of the host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SandboxSpec {
    /// Program and arguments. A program without `/` is looked up in the sandbox's `PATH`.
    pub argv: Vec<String>,
    /// Environment on top of the base environment (see the module docs); overrides it.
    pub env: BTreeMap<String, String>,
    /// Working directory inside; default `/workspace` when mounted, else `/`.
    pub cwd: Option<PathBuf>,
    /// Bind mounts.
    pub mounts: Vec<Mount>,
    /// Network access.
    pub network: NetworkPolicy,
    /// Resource limits.
    pub limits: Limits,
    /// Host directories on size-capped filesystems (the slot volume of the target dir): when
    /// the job fails and one of them is full (bytes or inodes), the outcome names
    /// [`LimitKind::Disk`].
    pub disk_limited: Vec<PathBuf>,
    /// The toolchain (sysroot) of this run, mounted at [`TOOLCHAIN_DIR`] instead of
    /// [`SandboxConfig::toolchain`]. The executor chooses it among installed toolchains
    /// ([`crate::toolchains`]); it must have a `bin/` directory.
    pub toolchain: Option<PathBuf>,
}

impl SandboxSpec {
    /// A spec running `argv` with default limits, no mounts and no network.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Mounts the sysroot `host` at [`TOOLCHAIN_DIR`] for this run (see
    /// [`SandboxSpec::toolchain`]).
    pub fn toolchain(mut self, host: impl Into<PathBuf>) -> Self {
        self.toolchain = Some(host.into());
        self
    }

    /// Mounts the host dir `host` read-only at [`WORKSPACE_DIR`].
    pub fn workspace(mut self, host: impl Into<PathBuf>) -> Self {
        self.mounts.push(Mount::ro(host, WORKSPACE_DIR));
        self
    }

    /// Mounts the host dir `host` read-write at [`TARGET_DIR`].
    pub fn target_dir(mut self, host: impl Into<PathBuf>) -> Self {
        self.mounts.push(Mount::rw(host, TARGET_DIR));
        self
    }

    /// Mounts the host dir `host` at [`CARGO_HOME_DIR`], read-write only if `writable` (fetch).
    pub fn cargo_home(mut self, host: impl Into<PathBuf>, writable: bool) -> Self {
        let host = host.into();
        self.mounts.push(Mount {
            host,
            inside: CARGO_HOME_DIR.into(),
            writable,
        });
        self
    }

    /// Adds a mount.
    pub fn mount(mut self, mount: Mount) -> Self {
        self.mounts.push(mount);
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Sets the working directory inside.
    pub fn cwd(mut self, cwd: impl Into<PathBuf>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    /// Sets the network policy.
    pub fn network(mut self, network: NetworkPolicy) -> Self {
        self.network = network;
        self
    }

    /// Sets the limits.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Marks `host` as a directory on a size-capped filesystem (see [`SandboxSpec::disk_limited`]).
    pub fn disk_limited(mut self, host: impl Into<PathBuf>) -> Self {
        self.disk_limited.push(host.into());
        self
    }
}

/// Why the sandbox killed a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillReason {
    /// [`Limits::wall_time`] passed.
    WallTimeout,
    /// [`Limits::max_log_bytes`] was exceeded.
    LogLimit,
    /// [`KillHandle::kill`] was called or the [`RunningSandbox`] dropped.
    Cancelled,
}

/// A limit the job ran into, as far as the sandbox can tell. Its serde form (`wall-time`,
/// `memory`, …) is what the job queue stores ([`crate::scheduler`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LimitKind {
    /// The wall-clock timeout.
    WallTime,
    /// The log size cap.
    LogSize,
    /// The CPU time rlimit (`SIGXCPU`, or `SIGKILL` with CPU time at the limit).
    CpuTime,
    /// The file size rlimit (`SIGXFSZ`).
    FileSize,
    /// The job's memory limit (its cgroup's OOM killer ended a process of the job).
    Memory,
    /// The job's process limit (its cgroup refused a fork and the job failed).
    Processes,
    /// A size-capped filesystem of the job ran out of bytes or inodes and the job failed.
    Disk,
}

impl std::fmt::Display for LimitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LimitKind::WallTime => "wall-clock time limit",
            LimitKind::LogSize => "log size limit",
            LimitKind::CpuTime => "CPU time limit",
            LimitKind::FileSize => "file size limit",
            LimitKind::Memory => "memory limit",
            LimitKind::Processes => "process limit",
            LimitKind::Disk => "disk limit",
        })
    }
}

/// How the job's main process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// It exited with this code.
    Exited(i32),
    /// It was killed by this signal.
    Signaled(i32),
}

/// CPU and memory use of the job (its main process and the descendants it waited for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResourceUsage {
    /// User-mode CPU time.
    pub user_time: Duration,
    /// Kernel-mode CPU time.
    pub system_time: Duration,
    /// Peak resident set size of the largest process, in bytes.
    pub max_rss_bytes: u64,
}

/// The result of a job that ran.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxOutcome {
    /// Exit code or signal of the job's main process.
    pub exit: ExitKind,
    /// Set when the sandbox killed the job.
    pub killed: Option<KillReason>,
    /// The limit the job ran into, if one can be told.
    pub limit: Option<LimitKind>,
    /// Output bytes delivered (newlines included), at most [`Limits::max_log_bytes`].
    pub log_bytes: u64,
    /// Whether output was cut at [`Limits::max_log_bytes`].
    pub log_truncated: bool,
    /// Wall-clock time from start of the container to its end.
    pub duration: Duration,
    /// Resource usage, when available.
    pub usage: Option<ResourceUsage>,
    /// What the job's cgroup counted; `None` when the job ran without one (memory and processes
    /// were then limited per process by rlimits only).
    pub cgroup: Option<crate::cgroup::CgroupReport>,
}

impl SandboxOutcome {
    /// The job exited with code 0 and was not killed.
    pub fn success(&self) -> bool {
        self.exit == ExitKind::Exited(0) && self.killed.is_none()
    }
}

/// Host-wide settings of the sandbox, shared by all jobs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxConfig {
    /// Host dir of the Rust toolchain (the output of `rustc --print sysroot`), mounted read-only
    /// at [`TOOLCHAIN_DIR`]. `None`: no toolchain inside.
    pub toolchain: Option<PathBuf>,
    /// Host uid the sandbox user maps to. Must not be the executor's own uid. Default 65534.
    pub host_uid: u32,
    /// Host gid the sandbox group maps to. Default 65534.
    pub host_gid: u32,
    /// Host system paths made visible read-only at the same place (symlinks are recreated as
    /// symlinks). Default `/usr /bin /lib /lib32 /lib64 /sbin` (those that exist).
    pub system_paths: Vec<PathBuf>,
    /// Load the seccomp deny list. Default true.
    pub seccomp: bool,
    /// Hostname inside. Default `sandbox`.
    pub hostname: String,
    /// Host dir in which every job gets its container root dir (`rba-sandbox-*`, removed after
    /// the job). Default: the system temp dir.
    pub scratch_dir: PathBuf,
    /// Limit memory and processes per job with a cgroup when the host has usable cgroups
    /// (see [`crate::cgroup`]). Default true; false (or no cgroups): per-process rlimits.
    pub cgroups: bool,
    /// Which [`IsolationProvider`] starts the jobs ([`crate::isolation`]). Default
    /// [`Isolation::Namespaces`].
    pub isolation: Isolation,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            toolchain: None,
            host_uid: 65534,
            host_gid: 65534,
            system_paths: ["/usr", "/bin", "/lib", "/lib32", "/lib64", "/sbin"]
                .into_iter()
                .map(PathBuf::from)
                .collect(),
            seccomp: true,
            hostname: "sandbox".into(),
            scratch_dir: std::env::temp_dir(),
            cgroups: true,
            isolation: Isolation::default(),
        }
    }
}

impl SandboxConfig {
    /// The default config with the toolchain of the host's `rustc` (see [`host_toolchain`]).
    pub fn with_host_toolchain() -> Result<Self, SandboxError> {
        Ok(Self {
            toolchain: Some(host_toolchain()?),
            ..Self::default()
        })
    }
}

/// The sysroot of the `rustc` in the executor's `PATH` (`rustc --print sysroot`).
pub fn host_toolchain() -> Result<PathBuf, SandboxError> {
    let out = std::process::Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .map_err(|e| SandboxError::Prerequisite(format!("running rustc --print sysroot: {e}")))?;
    if !out.status.success() {
        return Err(SandboxError::Prerequisite(format!(
            "rustc --print sysroot failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// A validated sandbox factory. Cheap to clone; every [`Sandbox::spawn`] makes a new container.
#[derive(Clone, Debug)]
pub struct Sandbox {
    config: Arc<SandboxConfig>,
    provider: Arc<dyn IsolationProvider>,
}

/// Cancels a running job. Cheap to clone; killing a finished job does nothing.
#[derive(Clone, Debug)]
pub struct KillHandle {
    ctl: std_mpsc::Sender<Ctl>,
}

impl KillHandle {
    /// Kills every process of the job; its outcome says [`KillReason::Cancelled`].
    pub fn kill(&self) {
        let _ = self.ctl.send(Ctl::Kill(KillReason::Cancelled));
    }
}

/// A job that is running. Dropping it without [`RunningSandbox::wait`] kills the job.
#[derive(Debug)]
pub struct RunningSandbox {
    /// The job's output, line by line, in the order each stream produced it. Closes when both
    /// streams are closed (after the job ended).
    pub output: mpsc::UnboundedReceiver<OutputLine>,
    kill: KillHandle,
    outcome: Option<oneshot::Receiver<Result<SandboxOutcome, SandboxError>>>,
}

impl RunningSandbox {
    /// A handle to kill the job from elsewhere.
    pub fn kill_handle(&self) -> KillHandle {
        self.kill.clone()
    }

    /// Kills the job.
    pub fn kill(&self) {
        self.kill.kill();
    }

    /// Waits until the job and every process it started are gone. Output not yet taken from
    /// [`RunningSandbox::output`] is dropped.
    ///
    /// Dropping the returned future before it resolves kills the job.
    pub async fn wait(mut self) -> Result<SandboxOutcome, SandboxError> {
        let rx = self.outcome.take().expect("outcome taken only here");
        let guard = KillOnDrop(Some(self.kill.clone()));
        let result = rx.await.map_err(|_| {
            SandboxError::Supervisor("supervisor thread ended without outcome".into())
        });
        guard.disarm();
        result?
    }
}

/// Kills the job when dropped, unless disarmed.
struct KillOnDrop(Option<KillHandle>);

impl KillOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(kill) = &self.0 {
            kill.kill();
        }
    }
}

impl Drop for RunningSandbox {
    fn drop(&mut self) {
        if self.outcome.is_some() {
            self.kill.kill();
        }
    }
}

enum Ctl {
    Kill(KillReason),
    Exited,
}

struct Shared {
    kill_reason: OnceLock<KillReason>,
    log_bytes: AtomicU64,
    log_truncated: AtomicBool,
    max_log_bytes: Option<u64>,
}

/// Everything the supervisor thread needs to start the container.
struct Plan {
    layout: JobLayout,
    limits: Limits,
    cgroup: Option<&'static crate::cgroup::Hierarchy>,
    disk_limited: Vec<PathBuf>,
}

impl Sandbox {
    /// Checks the host prerequisites and the config; jobs run under the provider the config
    /// names ([`SandboxConfig::isolation`]).
    pub fn new(config: SandboxConfig) -> Result<Self, SandboxError> {
        let provider = config.isolation.provider();
        Self::with_provider(config, provider)
    }

    /// Like [`Sandbox::new`], with jobs started by `provider` (one of this crate's or another
    /// implementation of [`IsolationProvider`]).
    pub fn with_provider(
        config: SandboxConfig,
        provider: Arc<dyn IsolationProvider>,
    ) -> Result<Self, SandboxError> {
        let uid = nix::unistd::getuid().as_raw();
        if config.host_uid == uid {
            return Err(SandboxError::InvalidConfig(format!(
                "host_uid {} is the executor's own uid; pick another (e.g. 65534)",
                config.host_uid
            )));
        }
        if config.host_uid == 0 || config.host_gid == 0 {
            return Err(SandboxError::InvalidConfig(
                "the sandbox user must not map to host root".into(),
            ));
        }
        if let Some(tc) = &config.toolchain
            && !tc.join("bin").is_dir()
        {
            return Err(SandboxError::InvalidConfig(format!(
                "toolchain {} has no bin/ directory",
                tc.display()
            )));
        }
        provider.check(&config)?;
        Ok(Self {
            config: Arc::new(config),
            provider,
        })
    }

    /// The provider that starts the jobs.
    pub fn provider(&self) -> &dyn IsolationProvider {
        &*self.provider
    }

    /// The config in use.
    pub fn config(&self) -> &SandboxConfig {
        &self.config
    }

    /// Starts a job. Returns once the container is set up and the job's program is starting.
    pub async fn spawn(&self, spec: SandboxSpec) -> Result<RunningSandbox, SandboxError> {
        let plan = self.plan(&spec)?;
        let config = self.config.clone();
        let provider = self.provider.clone();
        let writable: Vec<PathBuf> = spec
            .mounts
            .iter()
            .filter(|m| m.writable)
            .map(|m| m.host.clone())
            .collect();
        let (line_tx, line_rx) = mpsc::unbounded_channel();
        let (ctl_tx, ctl_rx) = std_mpsc::channel();
        let (started_tx, started_rx) = oneshot::channel();
        let (outcome_tx, outcome_rx) = oneshot::channel();
        let supervisor_ctl = ctl_tx.clone();
        thread::Builder::new()
            .name("rba-sandbox".into())
            .spawn(move || {
                let root = writable
                    .iter()
                    .try_for_each(|p| chown_tree(p, config.host_uid, config.host_gid))
                    .and_then(|()| job_root(&config.scratch_dir));
                let root = match root {
                    Ok(root) => root,
                    Err(e) => {
                        let _ = started_tx.send(Err(e));
                        return;
                    }
                };
                let mut started_tx = Some(started_tx);
                let start = |stdin| provider.start(&plan.layout, &config, root.path(), stdin);
                let result = supervise(
                    &plan,
                    start,
                    line_tx,
                    supervisor_ctl,
                    ctl_rx,
                    &mut started_tx,
                );
                // The container is gone (the supervisor waited for it): remove its root dir
                // before anyone hears of the end.
                let path = root.path().to_path_buf();
                if let Err(e) = root.close() {
                    tracing::warn!(path = %path.display(), "removing sandbox root: {e}");
                }
                match started_tx {
                    Some(started_tx) => {
                        let _ = started_tx.send(result.map(drop));
                    }
                    None => {
                        let _ = outcome_tx.send(result);
                    }
                }
            })
            .map_err(|e| SandboxError::Supervisor(format!("spawning thread: {e}")))?;
        match started_rx.await {
            Ok(Ok(())) => Ok(RunningSandbox {
                output: line_rx,
                kill: KillHandle { ctl: ctl_tx },
                outcome: Some(outcome_rx),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(SandboxError::Supervisor(
                "supervisor thread ended during start".into(),
            )),
        }
    }

    /// Runs a job to its end, calling `on_line` for every output line as it is produced.
    pub async fn run(
        &self,
        spec: SandboxSpec,
        mut on_line: impl FnMut(OutputLine),
    ) -> Result<SandboxOutcome, SandboxError> {
        let mut running = self.spawn(spec).await?;
        while let Some(line) = running.output.recv().await {
            on_line(line);
        }
        running.wait().await
    }

    /// Validates `spec` and decides everything the job sees: its [`JobLayout`].
    fn plan(&self, spec: &SandboxSpec) -> Result<Plan, SandboxError> {
        let cfg = &*self.config;
        if spec.argv.is_empty() {
            return Err(SandboxError::InvalidSpec("empty argv".into()));
        }
        let mut binds: Vec<Bind> = Vec::new();

        // Inside path -> host path, for PATH lookup.
        let mut visible: Vec<(PathBuf, PathBuf)> = Vec::new();
        let mut taken: HashSet<PathBuf> = ["/", "/proc", "/dev", "/etc", TMP_DIR]
            .into_iter()
            .map(PathBuf::from)
            .collect();

        for path in &cfg.system_paths {
            let Ok(meta) = std::fs::symlink_metadata(path) else {
                continue;
            };
            path_str(path)?;
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(path).map_err(|e| io_err(path, e))?;
                path_str(&target)?;
                binds.push(Bind::Symlink {
                    target,
                    inside: path.clone(),
                });
            } else {
                binds.push(Bind::ReadOnly {
                    host: path.clone(),
                    inside: path.clone(),
                });
            }
            visible.push((path.clone(), path.clone()));
            taken.insert(path.clone());
        }
        if let Some(tc) = spec.toolchain.as_ref().or(cfg.toolchain.as_ref()) {
            if !tc.join("bin").is_dir() {
                return Err(SandboxError::InvalidSpec(format!(
                    "toolchain {} has no bin/ directory",
                    tc.display()
                )));
            }
            path_str(tc)?;
            binds.push(Bind::ReadOnly {
                host: tc.clone(),
                inside: TOOLCHAIN_DIR.into(),
            });
            visible.push((TOOLCHAIN_DIR.into(), tc.clone()));
            taken.insert(TOOLCHAIN_DIR.into());
        }

        let tmpfs = vec![
            Tmpfs {
                inside: "/dev/shm".into(),
                size: 64 << 20,
                inodes: None,
            },
            Tmpfs {
                inside: TMP_DIR.into(),
                size: spec.limits.tmp_size.max(4096),
                inodes: Some((spec.limits.tmp_size / (16 << 10)).max(1024)),
            },
        ];

        let files = vec![
            (
                PathBuf::from("/etc/passwd"),
                format!(
                    "root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n\
                     {SANDBOX_USER}:x:{SANDBOX_UID}:{SANDBOX_UID}:{SANDBOX_USER}:{TMP_DIR}:/bin/sh\n\
                     nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
                ),
            ),
            (
                PathBuf::from("/etc/group"),
                format!("root:x:0:\n{SANDBOX_USER}:x:{SANDBOX_UID}:\nnogroup:x:65534:\n"),
            ),
            (
                PathBuf::from("/etc/hosts"),
                format!(
                    "127.0.0.1\tlocalhost {0}\n::1\tlocalhost {0}\n",
                    cfg.hostname
                ),
            ),
            (
                PathBuf::from("/etc/hostname"),
                format!("{}\n", cfg.hostname),
            ),
        ];
        let etc: Vec<&str> = match spec.network {
            NetworkPolicy::None => ETC_ALWAYS.to_vec(),
            NetworkPolicy::Host => ETC_ALWAYS.iter().chain(ETC_NETWORK).copied().collect(),
        };
        for path in etc {
            // metadata() follows symlinks, like the bind mount will.
            if std::fs::metadata(path).is_ok() {
                binds.push(Bind::ReadOnly {
                    host: path.into(),
                    inside: path.into(),
                });
            }
        }

        // Mount points are created before the read-only remounts: a mount point below a
        // read-only mount would be created in the host dir behind it. Only tmpfs /tmp and
        // writable mounts may contain other mounts.
        let insides = spec
            .mounts
            .iter()
            .map(|m| normalize_inside(&m.inside))
            .collect::<Result<Vec<_>, _>>()?;
        let mut no_nesting: Vec<PathBuf> = taken
            .iter()
            .filter(|p| *p != Path::new(TMP_DIR) && *p != Path::new("/"))
            .cloned()
            .collect();
        for (m, inside) in spec.mounts.iter().zip(&insides) {
            if !m.writable {
                no_nesting.push(inside.clone());
            }
        }
        for (m, inside) in spec.mounts.iter().zip(insides.iter().cloned()) {
            if !taken.insert(inside.clone()) {
                return Err(SandboxError::InvalidSpec(format!(
                    "mount target {} is reserved or used twice",
                    inside.display()
                )));
            }
            if no_nesting
                .iter()
                .any(|p| inside.starts_with(p) && inside != *p)
            {
                return Err(SandboxError::InvalidSpec(format!(
                    "mount target {} is below a read-only mount",
                    inside.display()
                )));
            }
            std::fs::metadata(&m.host).map_err(|e| io_err(&m.host, e))?;
            path_str(&m.host)?;
            path_str(&inside)?;
            if m.writable {
                binds.push(Bind::ReadWrite {
                    host: m.host.clone(),
                    inside: inside.clone(),
                });
            } else {
                warn_if_unreadable(&m.host, cfg.host_uid);
                binds.push(Bind::ReadOnly {
                    host: m.host.clone(),
                    inside: inside.clone(),
                });
            }
            visible.push((inside, m.host.clone()));
        }

        let cgroup = if cfg.cgroups {
            crate::cgroup::available()
        } else {
            None
        };
        let rlimits = rlimits(&spec.limits, cgroup.is_some());

        let mut env: BTreeMap<String, String> = [
            ("PATH", DEFAULT_PATH),
            ("HOME", TMP_DIR),
            ("TMPDIR", TMP_DIR),
            ("USER", SANDBOX_USER),
            ("LOGNAME", SANDBOX_USER),
            ("LANG", "C.UTF-8"),
            ("CARGO_HOME", CARGO_HOME_DIR),
            ("CARGO_TARGET_DIR", TARGET_DIR),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        env.extend(spec.env.clone());

        let cwd = match &spec.cwd {
            Some(cwd) => normalize_inside(cwd).or_else(|e| {
                if cwd == Path::new("/") {
                    Ok(PathBuf::from("/"))
                } else {
                    Err(e)
                }
            })?,
            None if spec
                .mounts
                .iter()
                .any(|m| m.inside == Path::new(WORKSPACE_DIR)) =>
            {
                WORKSPACE_DIR.into()
            }
            None => "/".into(),
        };

        match to_host(&cwd, &visible) {
            Some(host) if !host.is_dir() => {
                return Err(SandboxError::InvalidSpec(format!(
                    "working directory {} does not exist",
                    cwd.display()
                )));
            }
            None if cwd != Path::new("/") && cwd != Path::new(TMP_DIR) => {
                return Err(SandboxError::InvalidSpec(format!(
                    "working directory {} is not in a mount",
                    cwd.display()
                )));
            }
            _ => {}
        }

        let program = resolve_program(&spec.argv[0], env.get("PATH"), &visible)?;
        Ok(Plan {
            layout: JobLayout {
                binds,
                tmpfs,
                files,
                network: spec.network,
                hostname: cfg.hostname.clone(),
                program,
                args: spec.argv[1..].to_vec(),
                env,
                cwd,
                rlimits,
                seccomp: cfg.seccomp,
            },
            limits: spec.limits.clone(),
            cgroup,
            disk_limited: spec.disk_limited.clone(),
        })
    }
}

/// The supervisor thread: starts the container (taking `started_tx` once it runs), waits for
/// it and returns the outcome. It stays alive as long as the container (the container's
/// processes die with this thread). An error with `started_tx` left in place is a start error.
fn supervise(
    plan: &Plan,
    start_job: impl FnOnce(File) -> Result<crate::isolation::StartedJob, SandboxError>,
    line_tx: mpsc::UnboundedSender<OutputLine>,
    ctl_tx: std_mpsc::Sender<Ctl>,
    ctl_rx: std_mpsc::Receiver<Ctl>,
    started_tx: &mut Option<oneshot::Sender<Result<(), SandboxError>>>,
) -> Result<SandboxOutcome, SandboxError> {
    let start = Instant::now();
    let shared = Arc::new(Shared {
        kill_reason: OnceLock::new(),
        log_bytes: AtomicU64::new(0),
        log_truncated: AtomicBool::new(false),
        max_log_bytes: plan.limits.max_log_bytes,
    });
    let stdin = File::open("/dev/null").map_err(|e| io_err(Path::new("/dev/null"), e))?;
    // The job's cgroup exists before the container: on v1 this thread joins it for the fork,
    // so the container process is born inside (see the cgroup module).
    let cgroup = plan
        .cgroup
        .map(|h| {
            crate::cgroup::JobCgroup::create(
                h,
                crate::cgroup::CgroupLimits {
                    memory_bytes: plan.limits.memory_bytes,
                    max_processes: plan.limits.max_processes,
                },
            )
        })
        .transpose()
        .map_err(|e| SandboxError::Setup(format!("creating the job's cgroup: {e}")))?;
    let entered = cgroup
        .as_ref()
        .map(|c| c.enter())
        .transpose()
        .map_err(|e| SandboxError::Setup(format!("entering the job's cgroup: {e}")))?
        .flatten();
    let born_inside = entered.is_some();
    let spawned = start_job(stdin);
    drop(entered);
    let crate::isolation::StartedJob {
        pid,
        stdout,
        stderr,
        process: mut child,
    } = spawned?;
    if let Some(cgroup) = cgroup.as_ref().filter(|_| !born_inside)
        && let Err(e) = cgroup.adopt(pid)
    {
        kill_pid_namespace(pid);
        let _ = child.wait();
        reap_leftover(pid);
        return Err(SandboxError::Setup(format!(
            "moving the job into its cgroup: {e}"
        )));
    }
    tracing::debug!(pid, program = %plan.layout.program, "sandbox started");

    let (done_tx, done_rx) = std_mpsc::channel::<()>();
    let mut readers = 0;
    for (pipe, stream) in [(stdout, Stream::Stdout), (stderr, Stream::Stderr)] {
        let Some(pipe) = pipe else { continue };
        let (tx, shared, ctl, done) = (
            line_tx.clone(),
            shared.clone(),
            ctl_tx.clone(),
            done_tx.clone(),
        );
        let spawned = thread::Builder::new()
            .name("rba-sandbox-out".into())
            .spawn(move || {
                read_lines(pipe, stream, &tx, &shared, &ctl);
                let _ = done.send(());
            });
        if spawned.is_ok() {
            readers += 1;
        } else {
            let _ = ctl_tx.send(Ctl::Kill(KillReason::Cancelled));
        }
    }
    drop((line_tx, done_tx));

    let deadline = plan.limits.wall_time.map(|t| start + t);
    let watchdog_shared = shared.clone();
    let watchdog = thread::Builder::new()
        .name("rba-sandbox-watch".into())
        .spawn(move || watchdog(pid, ctl_rx, deadline, &watchdog_shared));
    if watchdog.is_err() {
        // Without a watchdog nothing enforces the timeout: give up on this job.
        kill_pid_namespace(pid);
    }
    if let Some(tx) = started_tx.take()
        && tx.send(Ok(())).is_err()
    {
        // Nobody is waiting for this job any more (the spawn future was dropped).
        let _ = ctl_tx.send(Ctl::Kill(KillReason::Cancelled));
    }

    let status = child.wait();
    let duration = start.elapsed();
    let report = cgroup.as_ref().map(|c| c.report());
    // Anything the namespace's end did not take (it should have taken all) dies with the cgroup.
    drop(cgroup);
    let _ = ctl_tx.send(Ctl::Exited);
    // Output of processes that are gone: drain what is left in the pipes.
    let drain_until = Instant::now() + READER_DRAIN;
    for _ in 0..readers {
        if done_rx
            .recv_timeout(drain_until.saturating_duration_since(Instant::now()))
            .is_err()
        {
            tracing::warn!(pid, "sandbox output still open after the job ended");
            break;
        }
    }

    let killed = shared.kill_reason.get().copied();
    let result = match status {
        Err(e) => {
            reap_leftover(pid);
            Err(SandboxError::Setup(e.to_string()))
        }
        Ok(st) => {
            let exit = st.exit.or_else(|| {
                // A killed job whose container process had no time to report it.
                killed.map(|_| ExitKind::Signaled(libc::SIGKILL))
            });
            match exit {
                None => {
                    reap_leftover(pid);
                    Err(SandboxError::Setup(st.reason))
                }
                Some(exit) => {
                    let killed = killed.filter(|_| exit == ExitKind::Signaled(libc::SIGKILL));
                    let usage = st.usage;
                    let log_truncated = shared.log_truncated.load(Ordering::SeqCst);
                    let mut log_bytes = shared.log_bytes.load(Ordering::SeqCst);
                    if let Some(max) = plan.limits.max_log_bytes {
                        log_bytes = log_bytes.min(max);
                    }
                    let limit = limit_hit(exit, killed, usage, &plan.limits)
                        .or_else(|| cgroup_limit_hit(exit, killed, report, &plan.disk_limited));
                    Ok(SandboxOutcome {
                        exit,
                        killed,
                        limit,
                        log_bytes,
                        log_truncated,
                        duration,
                        usage,
                        cgroup: report,
                    })
                }
            }
        }
    };
    drop(child);
    tracing::debug!(pid, ?result, "sandbox finished");
    result
}

/// The job-wide limits: memory (an OOM kill in the job's cgroup), processes (a refused fork in a
/// job that failed), disk (a full size-capped filesystem under a job that failed).
fn cgroup_limit_hit(
    exit: ExitKind,
    killed: Option<KillReason>,
    report: Option<crate::cgroup::CgroupReport>,
    disk_limited: &[PathBuf],
) -> Option<LimitKind> {
    if killed.is_some() {
        return None;
    }
    if report.is_some_and(|r| r.oom_kills > 0) {
        return Some(LimitKind::Memory);
    }
    if exit == ExitKind::Exited(0) {
        return None;
    }
    if report.is_some_and(|r| r.pids_max_hits > 0) {
        return Some(LimitKind::Processes);
    }
    disk_limited
        .iter()
        .any(|dir| crate::quota::is_full(dir))
        .then_some(LimitKind::Disk)
}

fn limit_hit(
    exit: ExitKind,
    killed: Option<KillReason>,
    usage: Option<ResourceUsage>,
    limits: &Limits,
) -> Option<LimitKind> {
    match killed {
        Some(KillReason::WallTimeout) => return Some(LimitKind::WallTime),
        Some(KillReason::LogLimit) => return Some(LimitKind::LogSize),
        Some(KillReason::Cancelled) => return None,
        None => {}
    }
    match exit {
        ExitKind::Signaled(libc::SIGXCPU) => Some(LimitKind::CpuTime),
        ExitKind::Signaled(libc::SIGXFSZ) => Some(LimitKind::FileSize),
        ExitKind::Signaled(libc::SIGKILL) => {
            let cpu = usage.map(|u| u.user_time + u.system_time)?;
            let limit = limits.cpu_time?;
            (cpu + Duration::from_millis(50) >= Duration::from_secs(cpu_secs(limit)))
                .then_some(LimitKind::CpuTime)
        }
        _ => None,
    }
}

/// Whole seconds of a CPU limit (rounded up, at least 1).
fn cpu_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// Waits for control messages; kills the sandbox on timeout, log cap or cancellation.
fn watchdog(pid: i32, ctl: std_mpsc::Receiver<Ctl>, deadline: Option<Instant>, shared: &Shared) {
    let mut killed_at: Option<Instant> = None;
    let mut escalated = false;
    loop {
        let wake = match killed_at {
            Some(at) if !escalated => Some(at + KILL_ESCALATION),
            Some(_) => None,
            None => deadline,
        };
        let msg = match wake {
            Some(at) => ctl.recv_timeout(at.saturating_duration_since(Instant::now())),
            None => ctl
                .recv()
                .map_err(|_| std_mpsc::RecvTimeoutError::Disconnected),
        };
        let reason = match msg {
            Ok(Ctl::Exited) | Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            Ok(Ctl::Kill(reason)) => reason,
            Err(std_mpsc::RecvTimeoutError::Timeout) if killed_at.is_some() => {
                // The pid namespace did not go away: kill the container process itself; its
                // death kills the namespace's init (parent-death signal).
                tracing::warn!(pid, "sandbox did not die, killing its container process");
                if is_our_child(pid) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
                escalated = true;
                continue;
            }
            Err(std_mpsc::RecvTimeoutError::Timeout) => KillReason::WallTimeout,
        };
        if killed_at.is_none() {
            let _ = shared.kill_reason.set(reason);
            tracing::debug!(pid, ?reason, "killing sandbox");
            kill_pid_namespace(pid);
            killed_at = Some(Instant::now());
        }
    }
}

/// Kills the init process of the sandbox's pid namespace (the child of the container process
/// `pid`), which makes the kernel kill every process in the namespace before the container
/// process can reap it. Falls back to killing the container process.
fn kill_pid_namespace(pid: i32) {
    if !is_our_child(pid) {
        return; // already reaped
    }
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let mut any = false;
    for child in children
        .split_whitespace()
        .filter_map(|c| c.parse::<i32>().ok())
    {
        any = true;
        let _ = kill(Pid::from_raw(child), Signal::SIGKILL);
    }
    if !any {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Whether `pid` is still an unreaped child of this process (guards against pid reuse).
fn is_our_child(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) state ppid ...": comm may contain spaces and parentheses.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return false;
    };
    let ppid = rest
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse::<u32>().ok());
    ppid == Some(std::process::id())
}

/// hakoniwa does not reap the container process when its set-up failed in the parent (it killed
/// it and returned a ready-made status); reap it here so no zombie is left.
fn reap_leftover(pid: i32) {
    if is_our_child(pid) {
        let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
    }
}

/// Reads one output stream, splitting it into lines and enforcing the log cap.
fn read_lines(
    mut pipe: impl Read,
    stream: Stream,
    tx: &mpsc::UnboundedSender<OutputLine>,
    shared: &Shared,
    ctl: &std_mpsc::Sender<Ctl>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    let mut forwarding = true;
    let emit = |bytes: &[u8], counted: u64| -> bool {
        let prev = shared.log_bytes.fetch_add(counted, Ordering::SeqCst);
        let mut bytes = bytes;
        let mut keep_going = true;
        if let Some(max) = shared.max_log_bytes
            && prev + counted > max
        {
            let allowed = usize::try_from(max.saturating_sub(prev)).unwrap_or(usize::MAX);
            bytes = &bytes[..bytes.len().min(allowed)];
            shared.log_truncated.store(true, Ordering::SeqCst);
            let _ = ctl.send(Ctl::Kill(KillReason::LogLimit));
            keep_going = false;
            if bytes.is_empty() {
                return false;
            }
        }
        let line = String::from_utf8_lossy(bytes).into_owned();
        let _ = tx.send(OutputLine { stream, line });
        keep_going
    };
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if !forwarding {
            continue; // keep draining so the writers never block before the kill lands
        }
        pending.extend_from_slice(&buf[..n]);
        let mut start = 0;
        while let Some(pos) = pending[start..].iter().position(|&b| b == b'\n') {
            let end = start + pos;
            if !emit(&pending[start..end], (pos + 1) as u64) {
                forwarding = false;
                break;
            }
            start = end + 1;
        }
        pending.drain(..start);
        while forwarding && pending.len() >= MAX_LINE_BYTES {
            if !emit(&pending[..MAX_LINE_BYTES], MAX_LINE_BYTES as u64) {
                forwarding = false;
            }
            pending.drain(..MAX_LINE_BYTES);
        }
        if !forwarding {
            pending = Vec::new();
        }
    }
    if forwarding && !pending.is_empty() {
        emit(&pending, pending.len() as u64);
    }
}

/// Rlimits of every process of the job; memory and processes only when no cgroup limits the job
/// as a whole (`job_cgroup` false).
fn rlimits(limits: &Limits, job_cgroup: bool) -> Vec<Rlimit> {
    use nix::sys::resource::{Resource, getrlimit};
    let mut out = Vec::new();
    let mut set = |resource: Resource, soft: u64, hard: u64| {
        // An unprivileged process cannot raise its hard limit: stay within the current one.
        let max = getrlimit(resource).map(|(_, h)| h).unwrap_or(u64::MAX);
        out.push(Rlimit {
            resource,
            soft: soft.min(max),
            hard: hard.min(max),
        });
    };
    if let Some(v) = limits.memory_bytes.filter(|_| !job_cgroup) {
        set(Resource::RLIMIT_AS, v, v);
    }
    if let Some(v) = limits.max_processes.filter(|_| !job_cgroup) {
        set(Resource::RLIMIT_NPROC, v, v);
    }
    if let Some(v) = limits.cpu_time {
        let secs = cpu_secs(v);
        set(Resource::RLIMIT_CPU, secs, secs + 1);
    }
    if let Some(v) = limits.max_file_size {
        set(Resource::RLIMIT_FSIZE, v, v);
    }
    if let Some(v) = limits.max_open_files {
        set(Resource::RLIMIT_NOFILE, v, v);
    }
    set(Resource::RLIMIT_CORE, 0, 0);
    out
}

/// Looks `program` up in the sandbox's PATH, translating inside dirs to host dirs.
fn resolve_program(
    program: &str,
    path: Option<&String>,
    visible: &[(PathBuf, PathBuf)],
) -> Result<String, SandboxError> {
    if program.contains('/') {
        return Ok(program.to_string());
    }
    let path = path.map(String::as_str).unwrap_or(DEFAULT_PATH);
    for dir in path.split(':').filter(|d| d.starts_with('/')) {
        let dir = Path::new(dir);
        let Some(host_dir) = to_host(dir, visible) else {
            continue;
        };
        let candidate = host_dir.join(program);
        let executable = std::fs::metadata(&candidate)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false);
        if executable {
            return Ok(dir.join(program).to_string_lossy().into_owned());
        }
    }
    Err(SandboxError::InvalidSpec(format!(
        "`{program}` not found in the sandbox PATH ({path})"
    )))
}

/// The host path behind an inside path, by the longest matching mount.
fn to_host(inside: &Path, visible: &[(PathBuf, PathBuf)]) -> Option<PathBuf> {
    visible
        .iter()
        .filter(|(mount, _)| inside.starts_with(mount))
        .max_by_key(|(mount, _)| mount.components().count())
        .map(|(mount, host)| {
            let rest = inside.strip_prefix(mount).expect("filtered by starts_with");
            if rest.as_os_str().is_empty() {
                host.clone()
            } else {
                host.join(rest)
            }
        })
}

/// An absolute inside path without `.`/`..`, not `/`.
fn normalize_inside(p: &Path) -> Result<PathBuf, SandboxError> {
    let mut out = PathBuf::from("/");
    let mut comps = p.components();
    if comps.next() != Some(Component::RootDir) {
        return Err(SandboxError::InvalidSpec(format!(
            "inside path {} is not absolute",
            p.display()
        )));
    }
    for c in comps {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => {
                return Err(SandboxError::InvalidSpec(format!(
                    "inside path {} has `..`",
                    p.display()
                )));
            }
        }
    }
    if out == Path::new("/") {
        return Err(SandboxError::InvalidSpec("cannot mount over /".into()));
    }
    Ok(out)
}

fn path_str(p: &Path) -> Result<&str, SandboxError> {
    p.to_str()
        .ok_or_else(|| SandboxError::InvalidSpec(format!("path {} is not UTF-8", p.display())))
}

fn io_err(path: &Path, source: io::Error) -> SandboxError {
    SandboxError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A fresh, world-traversable directory for one container's root.
fn job_root(scratch: &Path) -> Result<tempfile::TempDir, SandboxError> {
    let dir = tempfile::Builder::new()
        .prefix("rba-sandbox-")
        .tempdir_in(scratch)
        .map_err(|e| io_err(scratch, e))?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .map_err(|e| io_err(dir.path(), e))?;
    Ok(dir)
}

/// Makes `root` and everything below it owned by the sandbox user (symlinks not followed).
fn chown_tree(root: &Path, uid: u32, gid: u32) -> Result<(), SandboxError> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).map_err(|e| io_err(&path, e))?;
        if meta.uid() != uid || meta.gid() != gid {
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid)).map_err(|e| io_err(&path, e))?;
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(|e| io_err(&path, e))? {
                stack.push(entry.map_err(|e| io_err(&path, e))?.path());
            }
        }
    }
    Ok(())
}

fn warn_if_unreadable(host: &Path, uid: u32) {
    if let Ok(meta) = std::fs::metadata(host) {
        let mode = meta.permissions().mode();
        let need = if meta.is_dir() { 0o005 } else { 0o004 };
        if meta.uid() != uid && mode & need != need {
            tracing::warn!(
                path = %host.display(),
                mode = format_args!("{mode:o}"),
                "read-only mount is not world-readable: the sandbox user cannot read it"
            );
        }
    }
}

/// Every one of `tools` in the executor's `PATH`, else a prerequisite error naming the missing
/// one and its package.
pub(crate) fn require_tools(tools: &[&str], package: &str) -> Result<(), SandboxError> {
    match tools.iter().find(|tool| find_in_path(tool).is_none()) {
        Some(tool) => Err(SandboxError::Prerequisite(format!(
            "`{tool}` not found in PATH (package {package})"
        ))),
        None => Ok(()),
    }
}

pub(crate) fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Whether a subordinate-id file gives `user` (or `uid`) a range containing `id`.
pub(crate) fn subid_allows(file: &Path, user: &str, uid: u32, id: u32) -> bool {
    let Ok(text) = std::fs::read_to_string(file) else {
        return false;
    };
    text.lines().any(|line| {
        let mut f = line.trim().split(':');
        let (Some(owner), Some(start), Some(count)) = (f.next(), f.next(), f.next()) else {
            return false;
        };
        let (Ok(start), Ok(count)) = (start.parse::<u64>(), count.parse::<u64>()) else {
            return false;
        };
        (owner == user || owner == uid.to_string())
            && u64::from(id) >= start
            && u64::from(id) < start + count
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_inside_paths() {
        assert_eq!(
            normalize_inside(Path::new("/a/./b")).unwrap(),
            Path::new("/a/b")
        );
        assert!(normalize_inside(Path::new("a")).is_err());
        assert!(normalize_inside(Path::new("/a/../b")).is_err());
        assert!(normalize_inside(Path::new("/")).is_err());
    }

    #[test]
    fn to_host_uses_longest_mount() {
        let visible = vec![
            (PathBuf::from("/usr"), PathBuf::from("/usr")),
            (PathBuf::from("/toolchain"), PathBuf::from("/opt/tc")),
            (PathBuf::from("/toolchain/bin"), PathBuf::from("/opt/bin")),
        ];
        assert_eq!(
            to_host(Path::new("/toolchain/bin"), &visible).unwrap(),
            Path::new("/opt/bin")
        );
        assert_eq!(
            to_host(Path::new("/toolchain/lib"), &visible).unwrap(),
            Path::new("/opt/tc/lib")
        );
        assert_eq!(
            to_host(Path::new("/usr/bin"), &visible).unwrap(),
            Path::new("/usr/bin")
        );
        assert!(to_host(Path::new("/opt"), &visible).is_none());
    }

    #[test]
    fn subid_lines() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("subuid");
        std::fs::write(&file, "alice:100000:65536\nroot:65534:1\n").unwrap();
        assert!(subid_allows(&file, "root", 0, 65534));
        assert!(!subid_allows(&file, "root", 0, 65533));
        assert!(subid_allows(&file, "alice", 1000, 100500));
        assert!(!subid_allows(&file, "bob", 1001, 100500));
    }

    #[test]
    fn read_lines_splits_and_caps() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (ctl_tx, ctl_rx) = std_mpsc::channel();
        let shared = Shared {
            kill_reason: OnceLock::new(),
            log_bytes: AtomicU64::new(0),
            log_truncated: AtomicBool::new(false),
            max_log_bytes: Some(10),
        };
        read_lines(
            &b"ab\ncd\nefghij\nklm"[..],
            Stream::Stdout,
            &tx,
            &shared,
            &ctl_tx,
        );
        drop(tx);
        let mut lines = vec![];
        while let Ok(l) = rx.try_recv() {
            lines.push(l.line);
        }
        assert_eq!(lines, ["ab", "cd", "efgh"]);
        assert!(shared.log_truncated.load(Ordering::SeqCst));
        assert!(matches!(
            ctl_rx.try_recv(),
            Ok(Ctl::Kill(KillReason::LogLimit))
        ));
    }

    #[test]
    fn read_lines_splits_long_lines() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (ctl_tx, _ctl_rx) = std_mpsc::channel();
        let shared = Shared {
            kill_reason: OnceLock::new(),
            log_bytes: AtomicU64::new(0),
            log_truncated: AtomicBool::new(false),
            max_log_bytes: None,
        };
        let input = vec![b'x'; MAX_LINE_BYTES * 2 + 5];
        read_lines(&input[..], Stream::Stderr, &tx, &shared, &ctl_tx);
        drop(tx);
        let mut sizes = vec![];
        while let Ok(l) = rx.try_recv() {
            assert_eq!(l.stream, Stream::Stderr);
            sizes.push(l.line.len());
        }
        assert_eq!(sizes, [MAX_LINE_BYTES, MAX_LINE_BYTES, 5]);
    }
}
