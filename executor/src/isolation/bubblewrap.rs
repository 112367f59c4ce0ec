//! A second provider: [bubblewrap](https://github.com/containers/bubblewrap), the `bwrap`
//! binary that Flatpak and many distributions ship and audit (Debian package `bubblewrap`).
//!
//! Why: an operator may trust the distribution's sandbox tool over code linked into the
//! executor, and it proves the [`IsolationProvider`] seam with a second, independent
//! implementation that passes the same test suites (hostile jobs included).
//!
//! How it differs from [`super::namespaces`]:
//!
//! - `bwrap` is started **as the sandbox's host uid** ([`SandboxConfig::host_uid`]) and builds
//!   an unprivileged user namespace itself: host uid 0 is never mapped into the job's
//!   namespace, not even for the set-up. That needs a root executor (to switch uid) and
//!   unprivileged user namespaces (`user.max_user_namespaces` > 0).
//! - `bwrap`, running as the sandbox uid, resolves every bind source itself (`realpath`, even
//!   for `--bind-fd`), so it could not reach the executor's private directories (a data dir
//!   under `/root`, rustup's toolchains). Those host paths are therefore *staged*: the job's
//!   first process is `unshare --mount` (as root, util-linux), which binds each of them below
//!   a tmpfs at `/mnt` in a private mount namespace of its own — invisible to the host and
//!   gone with the job — and then execs `setpriv` (uid switch, parent-death signal,
//!   `no_new_privs`), `prlimit` (the job's rlimits) and `bwrap`. The host's own system paths
//!   (`/usr`, `/etc/…`) are bound directly. Generated `/etc` files are handed over as
//!   descriptors (`--ro-bind-data`), the seccomp program as BPF compiled by libseccomp from
//!   the shared deny list (`--seccomp`).
//! - The root is a tmpfs of `bwrap`'s, remounted read-only; `/tmp` and `/dev/shm` are size
//!   capped (`--size`; `bwrap` cannot cap their inodes).
//! - The program is pid 2 of its pid namespace (`bwrap`'s init is pid 1), so a program a
//!   signal killed is reported by `bwrap` as exit code 128 + signal, which is how the
//!   outcome reads it. A failed `bwrap` set-up is reported as exit code 1 with `bwrap`'s
//!   message on the job's stderr (`bwrap` does not tell it apart from the program's own exit).
//! - CPU time per job is not reported ([`JobExit::usage`] is `None`): `bwrap`'s init reaps
//!   the program and is not reaped by `bwrap`, so no rusage here contains it. The memory peak
//!   comes from the job's cgroup, as with every provider.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;

use command_fds::{CommandFdExt, FdMapping};
use nix::sys::resource::Resource;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{
    Bind, DENIED_CLONE_FLAGS, DENIED_SYSCALLS, ENOSYS_SYSCALLS, IsolationProvider, JobExit,
    JobLayout, JobProcess, StartedJob,
};
use crate::sandbox::{
    ExitKind, NetworkPolicy, SANDBOX_UID, SandboxConfig, SandboxError, find_in_path, require_tools,
};

/// Where staged host paths are bound, in the job's private mount namespace (a tmpfs mounted
/// over this directory there; the host's directory is untouched).
const STAGE: &str = "/mnt";

/// Run by `/bin/sh` as root in the private mount namespace: `$1` is STAGE, then triples
/// `d|f HOST STAGED`, then `--` and the command to exec. Paths are arguments, never code.
const STAGE_SCRIPT: &str = r#"set -eu
stage=$1; shift
mount -t tmpfs -o mode=0755,size=64k,nosuid,nodev rba-stage "$stage"
while [ "$1" != -- ]; do
  if [ "$1" = d ]; then mkdir -- "$3"; else : > "$3"; fi
  mount --bind -- "$2" "$3"
  shift 3
done
shift
exec "$@"
"#;

/// `PATH` of the host-side chain (`unshare`, `sh`, `mount`, `setpriv`, `prlimit`, `bwrap`):
/// the system's directories, never the job's.
const WRAPPER_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// The first descriptor number handed to `bwrap` is at least this.
const FIRST_PASSED_FD: RawFd = 10;

/// The bubblewrap provider.
#[derive(Clone, Debug)]
pub struct Bubblewrap {
    /// The `bwrap` binary: a path, or a name looked up in `PATH`. Default `bwrap`.
    pub program: PathBuf,
}

impl Default for Bubblewrap {
    fn default() -> Self {
        Self {
            program: PathBuf::from("bwrap"),
        }
    }
}

impl Bubblewrap {
    fn binary(&self) -> Option<PathBuf> {
        if self.program.components().count() > 1 {
            self.program.is_file().then(|| self.program.clone())
        } else {
            find_in_path(&self.program.to_string_lossy())
        }
    }
}

impl IsolationProvider for Bubblewrap {
    fn name(&self) -> &'static str {
        "bubblewrap"
    }

    fn check(&self, config: &SandboxConfig) -> Result<(), SandboxError> {
        let Some(bwrap) = self.binary() else {
            return Err(SandboxError::Prerequisite(format!(
                "`{}` not found (package bubblewrap)",
                self.program.display()
            )));
        };
        if !nix::unistd::getuid().is_root() {
            return Err(SandboxError::Prerequisite(
                "the bubblewrap provider starts bwrap as the sandbox's host uid, which needs a \
                 root executor; run it as root or use isolation = \"namespaces\""
                    .into(),
            ));
        }
        let help = Command::new(&bwrap)
            .arg("--help")
            .output()
            .map_err(|e| SandboxError::Prerequisite(format!("running {}: {e}", bwrap.display())))?;
        let help = String::from_utf8_lossy(&help.stdout);
        require_tools(
            &["unshare", "setpriv", "prlimit", "mount"],
            "util-linux / mount",
        )?;
        for option in ["--ro-bind-data", "--size", "--die-with-parent", "--seccomp"] {
            if !help.contains(option) {
                return Err(SandboxError::Prerequisite(format!(
                    "{} has no {option} option (bubblewrap 0.8 or newer needed)",
                    bwrap.display()
                )));
            }
        }
        // One empty sandbox as the sandbox uid: user namespaces must be open to it.
        let probe = Command::new(&bwrap)
            .args(["--unshare-all", "--ro-bind", "/", "/", "--", "/bin/true"])
            .uid(config.host_uid)
            .gid(config.host_gid)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| SandboxError::Prerequisite(format!("running {}: {e}", bwrap.display())))?;
        if !probe.status.success() {
            return Err(SandboxError::Prerequisite(format!(
                "bwrap cannot create a sandbox as uid {} ({}): unprivileged user namespaces \
                 must be enabled",
                config.host_uid,
                String::from_utf8_lossy(&probe.stderr).trim()
            )));
        }
        Ok(())
    }

    fn start(
        &self,
        layout: &JobLayout,
        config: &SandboxConfig,
        root: &Path,
        stdin: File,
    ) -> Result<StartedJob, SandboxError> {
        let bwrap = self.binary().ok_or_else(|| {
            SandboxError::Prerequisite(format!("`{}` not found", self.program.display()))
        })?;
        let mut passed: Vec<OwnedFd> = Vec::new();
        let mut args: Vec<String> = Vec::new();
        // Descriptors are renumbered in the child, from above every open one (at least
        // FIRST_PASSED_FD) in the order passed; the arguments name them by that number, fixed
        // once all are open.
        let mut fd_args: Vec<(usize, usize)> = Vec::new(); // (index in args, index in passed)
        let mut pass = |fd: OwnedFd, args: &mut Vec<String>, passed: &mut Vec<OwnedFd>| {
            fd_args.push((args.len(), passed.len()));
            args.push(String::new());
            passed.push(fd);
        };
        let arg = |args: &mut Vec<String>, items: &[&str]| {
            args.extend(items.iter().map(|s| s.to_string()));
        };

        let uid = SANDBOX_UID.to_string();
        arg(
            &mut args,
            &[
                "--unshare-user",
                "--uid",
                &uid,
                "--gid",
                &uid,
                "--unshare-pid",
                "--unshare-ipc",
                "--unshare-uts",
                "--unshare-cgroup-try",
                "--hostname",
                &layout.hostname,
                "--die-with-parent",
                "--new-session",
                "--cap-drop",
                "ALL",
            ],
        );
        if layout.network == NetworkPolicy::None {
            arg(&mut args, &["--unshare-net"]);
        }
        arg(&mut args, &["--proc", "/proc", "--dev", "/dev"]);

        let mut staged: Vec<(PathBuf, PathBuf, bool)> = Vec::new(); // (host, stage, is dir)
        let mut mounts: Vec<(&Path, usize)> = Vec::new(); // (inside, order) for sorting
        for (i, bind) in layout.binds.iter().enumerate() {
            mounts.push((bind.inside(), i));
        }
        // Parents before the paths below them (a bind below a read-only bind needs its mount
        // point first); the layout's order otherwise.
        mounts.sort_by_key(|(inside, i)| (inside.components().count(), *i));
        for tmpfs in &layout.tmpfs {
            let (size, inside) = (tmpfs.size.to_string(), tmpfs.inside.to_string_lossy());
            arg(
                &mut args,
                &["--perms", "1777", "--size", &size, "--tmpfs", &inside],
            );
        }
        for (_, i) in mounts {
            match &layout.binds[i] {
                Bind::Symlink { target, inside } => arg(
                    &mut args,
                    &[
                        "--symlink",
                        &target.to_string_lossy(),
                        &inside.to_string_lossy(),
                    ],
                ),
                Bind::ReadOnly { host, inside } | Bind::ReadWrite { host, inside } => {
                    let writable = matches!(layout.binds[i], Bind::ReadWrite { .. });
                    // The host's own system paths (same place inside) are reachable by anyone;
                    // everything else is staged.
                    let source = if host == inside {
                        host.to_string_lossy().into_owned()
                    } else {
                        let stage = Path::new(STAGE).join(staged.len().to_string());
                        let is_dir = std::fs::metadata(host)
                            .map_err(|e| io_err(host, e))?
                            .is_dir();
                        staged.push((host.clone(), stage.clone(), is_dir));
                        stage.to_string_lossy().into_owned()
                    };
                    let option = if writable { "--bind" } else { "--ro-bind" };
                    arg(&mut args, &[option, &source, &inside.to_string_lossy()]);
                }
            }
        }
        for (n, (inside, content)) in layout.files.iter().enumerate() {
            let file = root.join(format!("file-{n}"));
            std::fs::write(&file, content).map_err(|e| io_err(&file, e))?;
            let fd = File::open(&file).map_err(|e| io_err(&file, e))?;
            arg(&mut args, &["--perms", "0644", "--ro-bind-data"]);
            pass(fd.into(), &mut args, &mut passed);
            arg(&mut args, &[&inside.to_string_lossy()]);
        }
        if layout.seccomp {
            let file = root.join("seccomp.bpf");
            write_seccomp(&file)?;
            let fd = File::open(&file).map_err(|e| io_err(&file, e))?;
            arg(&mut args, &["--seccomp"]);
            pass(fd.into(), &mut args, &mut passed);
        }
        arg(
            &mut args,
            &[
                "--remount-ro",
                "/",
                "--chdir",
                &layout.cwd.to_string_lossy(),
            ],
        );
        // The job's environment is set by bwrap inside; the host-side chain below runs with
        // WRAPPER_PATH only (a job's PATH — a REAPI client's, say — must never choose what the
        // executor runs as root).
        arg(&mut args, &["--clearenv"]);
        for (key, value) in &layout.env {
            arg(&mut args, &["--setenv", key, value]);
        }
        arg(&mut args, &["--", &layout.program]);
        args.extend(layout.args.iter().cloned());

        let base = passed
            .iter()
            .map(|fd| fd.as_raw_fd())
            .max()
            .unwrap_or(0)
            .max(FIRST_PASSED_FD - 1)
            + 1;
        for (arg_index, fd_index) in fd_args {
            args[arg_index] = (base + fd_index as RawFd).to_string();
        }

        // unshare + sh: a private mount namespace (invisible to the host, gone with the job)
        // in which each staged host path is bound below STAGE, where the sandbox uid can reach
        // it (see the module docs). setpriv: bwrap dies with its supervisor thread (the
        // parent-death signal is set after the uid switch, which would clear it) and gains no
        // privileges; prlimit: the job's rlimits, inherited by everything bwrap starts. Every
        // step execs the next: the pid stays the one this thread started.
        let tool = |name: &str| {
            find_in_path(name).ok_or_else(|| {
                SandboxError::Prerequisite(format!("`{name}` not found in PATH (util-linux)"))
            })
        };
        let (unshare, setpriv, prlimit) = (tool("unshare")?, tool("setpriv")?, tool("prlimit")?);
        let mut cmd = Command::new(unshare);
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "/bin/sh",
            "-c",
            STAGE_SCRIPT,
        ])
        .arg("rba-stage")
        .arg(STAGE);
        for (host, stage, is_dir) in &staged {
            cmd.arg(if *is_dir { "d" } else { "f" })
                .arg(host)
                .arg(stage);
        }
        cmd.arg("--").arg(setpriv).args([
            "--reuid",
            &config.host_uid.to_string(),
            "--regid",
            &config.host_gid.to_string(),
            "--clear-groups",
            "--pdeathsig",
            "KILL",
            "--no-new-privs",
            "--",
        ]);
        cmd.arg(prlimit);
        for limit in &layout.rlimits {
            cmd.arg(format!(
                "--{}={}:{}",
                prlimit_name(limit.resource),
                limit.soft,
                limit.hard
            ));
        }
        cmd.arg("--")
            .arg(&bwrap)
            .args(&args)
            .env_clear()
            .env("PATH", WRAPPER_PATH)
            .current_dir("/")
            .stdin(Stdio::from(stdin))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mappings = passed
            .into_iter()
            .enumerate()
            .map(|(i, parent_fd)| FdMapping {
                parent_fd,
                child_fd: base + i as RawFd,
            })
            .collect();
        cmd.fd_mappings(mappings)
            .map_err(|e| SandboxError::Setup(format!("passing descriptors to bwrap: {e}")))?;
        let mut child = cmd
            .spawn()
            .map_err(|e| SandboxError::Setup(format!("starting {}: {e}", bwrap.display())))?;
        // The parent's copies of the passed descriptors close with `cmd`.
        drop(cmd);
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        Ok(StartedJob::new(
            child.id(),
            stdout,
            stderr,
            Process { child },
        ))
    }
}

/// prlimit's option for a resource.
fn prlimit_name(resource: Resource) -> &'static str {
    match resource {
        Resource::RLIMIT_AS => "as",
        Resource::RLIMIT_NPROC => "nproc",
        Resource::RLIMIT_CPU => "cpu",
        Resource::RLIMIT_FSIZE => "fsize",
        Resource::RLIMIT_NOFILE => "nofile",
        _ => "core",
    }
}

/// The shared deny list compiled to BPF by libseccomp, for `bwrap --seccomp`.
fn write_seccomp(file: &Path) -> Result<(), SandboxError> {
    use libseccomp::{ScmpAction, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall};
    let fail = |e: libseccomp::error::SeccompError| {
        SandboxError::Setup(format!("building the seccomp filter: {e}"))
    };
    let mut ctx = ScmpFilterContext::new(ScmpAction::Allow).map_err(fail)?;
    let rules = DENIED_SYSCALLS
        .iter()
        .map(|name| (name, libc::EPERM))
        .chain(ENOSYS_SYSCALLS.iter().map(|name| (name, libc::ENOSYS)));
    for (name, errno) in rules {
        // A syscall this kernel or libseccomp does not know cannot be called either.
        if let Ok(syscall) = ScmpSyscall::from_name(name) {
            ctx.add_rule(ScmpAction::Errno(errno), syscall)
                .map_err(fail)?;
        }
    }
    let clone = ScmpSyscall::from_name("clone").map_err(fail)?;
    for &flag in DENIED_CLONE_FLAGS {
        let flag = flag as u64;
        ctx.add_rule_conditional(
            ScmpAction::Errno(libc::EPERM),
            clone,
            &[ScmpArgCompare::new(
                0,
                ScmpCompareOp::MaskedEqual(flag),
                flag,
            )],
        )
        .map_err(fail)?;
    }
    let out = File::create(file).map_err(|e| io_err(file, e))?;
    ctx.export_bpf(&out).map_err(fail)
}

fn io_err(path: &Path, source: io::Error) -> SandboxError {
    SandboxError::Io {
        path: path.to_path_buf(),
        source,
    }
}

struct Process {
    child: std::process::Child,
}

impl JobProcess for Process {
    fn wait(&mut self) -> io::Result<JobExit> {
        let status = self.child.wait()?;
        Ok(JobExit {
            exit: decode_exit(status),
            // bwrap's init, which reaps the program, is never reaped by bwrap (it reads the
            // exit status from it): the program's CPU time is in no rusage this process sees.
            // Peak memory comes from the job's cgroup.
            usage: None,
            reason: format!("bwrap ended with {status}"),
        })
    }
}

/// `bwrap`'s exit: its program's exit code, or 128 + the signal that killed the program; a
/// signal when `bwrap` itself was killed.
fn decode_exit(status: std::process::ExitStatus) -> Option<ExitKind> {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) if code > 128 && code <= 128 + 64 => Some(ExitKind::Signaled(code - 128)),
        (Some(code), _) => Some(ExitKind::Exited(code)),
        (None, Some(signal)) => Some(ExitKind::Signaled(signal)),
        (None, None) => None,
    }
}
