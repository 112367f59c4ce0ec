//! Isolation providers: the one seam between *what* a job may see and use and *which kernel
//! mechanism* enforces it.
//!
//! # Why
//!
//! Operators differ in what they trust and in what their hosts allow: one runs the
//! namespace sandbox built into the executor (hakoniwa, the default), another prefers the
//! `bwrap` their distribution maintains and audits, a third wants every job in a microVM or a
//! container runtime. The executor must not care. So the decisions are split:
//!
//! - [`crate::sandbox`] decides, once, what a job sees: it validates a
//!   [`SandboxSpec`](crate::sandbox::SandboxSpec) into a [`JobLayout`] (the mounts, the
//!   generated `/etc` files, the tmpfs sizes, the environment, the working directory, the
//!   program found in the sandbox's `PATH`, the rlimits), and it supervises every job the same
//!   way whatever the provider: the job's cgroup (memory, processes), its output streams, the
//!   wall-clock timeout, the log cap, cancellation, the outcome and the removal of the job's
//!   scratch directory.
//! - A provider ([`IsolationProvider`]) only *prepares and starts* the job's first process from
//!   a layout, and *reaps* it ([`JobProcess::wait`]). Kill is the same for every provider: the
//!   first process's child is the init of the job's own pid namespace, so killing it makes the
//!   kernel kill every process of the job.
//!
//! A new provider implements the two traits and is handed to
//! [`Sandbox::with_provider`](crate::sandbox::Sandbox::with_provider) (or, for the executor,
//! `ExecutorConfig::isolation_provider`); the executor does not change. Two ship here: [`Isolation::Namespaces`] ([`namespaces`], hakoniwa) and
//! [`Isolation::Bubblewrap`] ([`bubblewrap`], Debian's `bwrap`). The node chooses with
//! `[sandbox] isolation = "namespaces" | "bubblewrap"`. The sandbox, hostile-job and limit
//! and runner suites of this crate run against both (`RBA_TEST_ISOLATION=bubblewrap`, see
//! `.ci/test`).
//!
//! # What a provider must guarantee
//!
//! - The first process is a child of the calling thread, started from it (the thread has
//!   joined the job's cgroup, so the process is born inside it), and its child is the init of a
//!   new pid namespace in which the program runs.
//! - The program runs as [`SANDBOX_UID`](crate::sandbox::SANDBOX_UID) inside, mapped to
//!   [`SandboxConfig::host_uid`] outside, without capabilities, with `no_new_privs`, the
//!   seccomp deny list ([`DENIED_SYSCALLS`], [`DENIED_CLONE_FLAGS`]) when
//!   [`JobLayout::seccomp`], the layout's rlimits, and no network unless
//!   [`NetworkPolicy::Host`].
//! - The root is read-only; only [`Bind::ReadWrite`] mounts and the [`Tmpfs`] mounts are
//!   writable; nothing else of the host is visible.

pub mod bubblewrap;
pub mod namespaces;

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use nix::sys::resource::Resource;

use crate::sandbox::{ExitKind, NetworkPolicy, ResourceUsage, SandboxConfig, SandboxError};

/// The isolation providers that ship with the executor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// Namespaces set up in-process by hakoniwa ([`namespaces`]). The default.
    #[default]
    Namespaces,
    /// Bubblewrap, the `bwrap` binary of the host ([`bubblewrap`]).
    Bubblewrap,
}

impl Isolation {
    /// The provider of this kind.
    pub fn provider(self) -> Arc<dyn IsolationProvider> {
        match self {
            Isolation::Namespaces => Arc::new(namespaces::Namespaces),
            Isolation::Bubblewrap => Arc::new(bubblewrap::Bubblewrap::default()),
        }
    }

    /// Every provider, by name.
    pub const ALL: [Isolation; 2] = [Isolation::Namespaces, Isolation::Bubblewrap];

    /// The name used in configs.
    pub fn name(self) -> &'static str {
        match self {
            Isolation::Namespaces => "namespaces",
            Isolation::Bubblewrap => "bubblewrap",
        }
    }
}

impl fmt::Display for Isolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Isolation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Isolation::ALL
            .into_iter()
            .find(|i| i.name() == s)
            .ok_or_else(|| {
                format!("unknown isolation provider `{s}` (expected `namespaces` or `bubblewrap`)")
            })
    }
}

/// One path made visible inside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bind {
    /// A host path, read-only, at `inside`.
    ReadOnly {
        /// Host path.
        host: PathBuf,
        /// Path inside.
        inside: PathBuf,
    },
    /// A host path, read-write, at `inside` (owned by the sandbox user on the host).
    ReadWrite {
        /// Host path.
        host: PathBuf,
        /// Path inside.
        inside: PathBuf,
    },
    /// A symlink `inside` -> `target` (e.g. `/bin` -> `usr/bin` on merged-/usr hosts).
    Symlink {
        /// What the link points at.
        target: PathBuf,
        /// Path of the link inside.
        inside: PathBuf,
    },
}

impl Bind {
    /// The path inside the sandbox.
    pub fn inside(&self) -> &Path {
        match self {
            Bind::ReadOnly { inside, .. }
            | Bind::ReadWrite { inside, .. }
            | Bind::Symlink { inside, .. } => inside,
        }
    }
}

/// A private tmpfs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tmpfs {
    /// Where, inside.
    pub inside: PathBuf,
    /// Size cap in bytes.
    pub size: u64,
    /// Inode cap, where the provider can set one.
    pub inodes: Option<u64>,
}

/// One rlimit of every process of the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rlimit {
    /// Which resource.
    pub resource: Resource,
    /// Soft limit.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

/// Everything a provider needs to start one job, decided and validated by the sandbox.
#[derive(Clone, Debug)]
pub struct JobLayout {
    /// Paths made visible, in mount order (parents before the paths below them).
    pub binds: Vec<Bind>,
    /// Private tmpfs mounts (`/tmp`, `/dev/shm`).
    pub tmpfs: Vec<Tmpfs>,
    /// Generated files (inside path, content), all below `/etc`, read-only inside.
    pub files: Vec<(PathBuf, String)>,
    /// Network access.
    pub network: NetworkPolicy,
    /// Host name inside.
    pub hostname: String,
    /// The program, an absolute path inside.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// The whole environment.
    pub env: BTreeMap<String, String>,
    /// Working directory inside.
    pub cwd: PathBuf,
    /// Rlimits of every process.
    pub rlimits: Vec<Rlimit>,
    /// Load the seccomp deny list.
    pub seccomp: bool,
}

/// How the first process ended, as its provider reaps it.
#[derive(Clone, Debug)]
pub struct JobExit {
    /// Exit code or signal of the job's program; `None`: the provider's set-up failed and
    /// the program never ran (`reason` says why).
    pub exit: Option<ExitKind>,
    /// CPU time and peak memory, when the provider knows them.
    pub usage: Option<ResourceUsage>,
    /// The provider's words for a failed set-up.
    pub reason: String,
}

/// A job's first process, as a provider started it.
pub struct StartedJob {
    /// Its host pid (a child of this process).
    pub pid: i32,
    /// The job's stdout.
    pub stdout: Option<Box<dyn Read + Send>>,
    /// The job's stderr.
    pub stderr: Option<Box<dyn Read + Send>>,
    /// What reaps it.
    pub process: Box<dyn JobProcess>,
}

impl StartedJob {
    /// A started job from its pid, its output pipes and what reaps it.
    pub fn new(
        pid: u32,
        stdout: Option<impl Read + Send + 'static>,
        stderr: Option<impl Read + Send + 'static>,
        process: impl JobProcess + 'static,
    ) -> Self {
        StartedJob {
            pid: pid as i32,
            stdout: stdout.map(|p| Box::new(p) as Box<dyn Read + Send>),
            stderr: stderr.map(|p| Box::new(p) as Box<dyn Read + Send>),
            process: Box::new(process),
        }
    }
}

/// Reaps a job's first process.
pub trait JobProcess: Send {
    /// Waits for the process (and with it the whole pid namespace) to end and reaps it.
    fn wait(&mut self) -> io::Result<JobExit>;
}

/// A way to isolate jobs (see the module docs for the contract).
pub trait IsolationProvider: Send + Sync + fmt::Debug {
    /// Its name, for logs and errors.
    fn name(&self) -> &'static str;
    /// Checks the host prerequisites once, when the sandbox is created; the error says what
    /// is missing and how to get it.
    fn check(&self, config: &SandboxConfig) -> Result<(), SandboxError>;
    /// Prepares and starts the job's first process from the calling thread. `root` is an
    /// empty, private directory of this job, removed after it: the provider may use it as the
    /// container's root or for its own files. `stdin` becomes the job's standard input.
    fn start(
        &self,
        layout: &JobLayout,
        config: &SandboxConfig,
        root: &Path,
        stdin: File,
    ) -> Result<StartedJob, SandboxError>;
}

/// Syscalls a build never needs and that widen the kernel attack surface: `EPERM`.
pub const DENIED_SYSCALLS: &[&str] = &[
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "unshare",
    "setns",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "keyctl",
    "add_key",
    "request_key",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "swapon",
    "swapoff",
    "reboot",
    "acct",
    "quotactl",
    "syslog",
    "open_by_handle_at",
    "name_to_handle_at",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "iopl",
    "ioperm",
    "lookup_dcookie",
    "fanotify_init",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
];

/// Syscalls answered `ENOSYS`: `clone3` passes its flags in memory, out of seccomp's reach,
/// so libc falls back to `clone`, whose flags [`DENIED_CLONE_FLAGS`] can check.
pub const ENOSYS_SYSCALLS: &[&str] = &["clone3"];

/// `clone` flags refused with `EPERM` (new namespaces).
pub const DENIED_CLONE_FLAGS: &[libc::c_int] = &[
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWNS,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWCGROUP,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for i in Isolation::ALL {
            assert_eq!(i.name().parse::<Isolation>().unwrap(), i);
        }
        let err = "firecracker".parse::<Isolation>().unwrap_err();
        assert!(err.contains("firecracker"), "{err}");
    }
}
