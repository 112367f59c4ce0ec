//! The default provider: Linux namespaces set up in-process by [hakoniwa].
//!
//! Why the default: it needs no binary beyond `newuidmap`/`newgidmap` (package `uidmap`), it
//! runs from an executor that is not root as long as `/etc/subuid` gives it the sandbox uid,
//! and its container root is the job's scratch directory.
//!
//! How: a mount, user, pid, UTS, IPC and cgroup namespace (and a network namespace unless the
//! layout asks for the host's). Host uid 0 (or the executor's uid) is mapped to the namespace's
//! root for the set-up only — the kernel refuses `/dev` nodes and tmpfs mounts to a process
//! whose uid is not mapped in the namespace that owns them — and the program runs as
//! [`SANDBOX_UID`], mapped to [`SandboxConfig::host_uid`].

use std::fs::File;
use std::io;
use std::path::Path;

use hakoniwa::{Container, MountOptions, Namespace, Runctl, Stdio};
use nix::sys::resource::Resource;

use super::{
    Bind, DENIED_CLONE_FLAGS, DENIED_SYSCALLS, ENOSYS_SYSCALLS, IsolationProvider, JobExit,
    JobLayout, JobProcess, StartedJob,
};
use crate::sandbox::{
    ExitKind, NetworkPolicy, ResourceUsage, SANDBOX_UID, SANDBOX_USER, SandboxConfig, SandboxError,
    require_tools, subid_allows,
};

/// The hakoniwa provider.
#[derive(Clone, Copy, Debug, Default)]
pub struct Namespaces;

impl IsolationProvider for Namespaces {
    fn name(&self) -> &'static str {
        "namespaces"
    }

    fn check(&self, config: &SandboxConfig) -> Result<(), SandboxError> {
        require_tools(&["newuidmap", "newgidmap"], "uidmap")?;
        let uid = nix::unistd::getuid().as_raw();
        let user = nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| uid.to_string());
        for (file, id) in [
            ("/etc/subuid", config.host_uid),
            ("/etc/subgid", config.host_gid),
        ] {
            if !subid_allows(Path::new(file), &user, uid, id) {
                return Err(SandboxError::Prerequisite(format!(
                    "{file} has no range of `{user}` containing {id} (add `{user}:{id}:1`)"
                )));
            }
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
        let container = container(layout, config, root);
        let mut cmd = container.command(&layout.program);
        cmd.args(&layout.args)
            .envs(&layout.env)
            .current_dir(&layout.cwd)
            .stdin(Stdio::from(stdin))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| SandboxError::Setup(e.to_string()))?;
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        Ok(StartedJob::new(
            child.id(),
            stdout,
            stderr,
            Process { child },
        ))
    }
}

/// The hakoniwa container for `layout`.
fn container(layout: &JobLayout, config: &SandboxConfig, root: &Path) -> Container {
    let mut c = Container::new(); // mount, user and pid namespaces, /proc
    c.rootdir(root)
        .unshare(Namespace::Uts)
        .unshare(Namespace::Ipc)
        .unshare(Namespace::Cgroup)
        .hostname(&layout.hostname)
        .runctl(Runctl::MountFallback);
    if layout.network == NetworkPolicy::None {
        c.unshare(Namespace::Network);
    }
    c.devfsmount("/dev");
    for tmpfs in &layout.tmpfs {
        let mut options = format!("size={},mode=1777", tmpfs.size);
        if let Some(inodes) = tmpfs.inodes {
            options.push_str(&format!(",nr_inodes={inodes}"));
        }
        c.mount(
            "tmpfs",
            &tmpfs.inside.to_string_lossy(),
            "tmpfs",
            MountOptions::NOSUID | MountOptions::NODEV,
            Some(options),
        );
    }
    c.dir("/etc", 0o755);
    for (inside, content) in &layout.files {
        c.file(&inside.to_string_lossy(), content);
    }
    for bind in &layout.binds {
        match bind {
            Bind::ReadOnly { host, inside } => {
                c.bindmount_ro(&host.to_string_lossy(), &inside.to_string_lossy());
            }
            Bind::ReadWrite { host, inside } => {
                c.bindmount_rw(&host.to_string_lossy(), &inside.to_string_lossy());
            }
            Bind::Symlink { target, inside } => {
                c.symlink(&target.to_string_lossy(), &inside.to_string_lossy());
            }
        }
    }
    c.uidmaps(&[
        (0, nix::unistd::getuid().as_raw(), 1),
        (SANDBOX_UID, config.host_uid, 1),
    ]);
    c.gidmaps(&[
        (0, nix::unistd::getgid().as_raw(), 1),
        (SANDBOX_UID, config.host_gid, 1),
    ]);
    c.user(SANDBOX_USER, Some(SANDBOX_USER), &[]);
    for limit in &layout.rlimits {
        c.setrlimit(rlimit(limit.resource), limit.soft, limit.hard);
    }
    if layout.seccomp {
        c.seccomp_filter(seccomp_filter());
    }
    c
}

fn rlimit(resource: Resource) -> hakoniwa::Rlimit {
    use hakoniwa::Rlimit as R;
    match resource {
        Resource::RLIMIT_AS => R::As,
        Resource::RLIMIT_NPROC => R::Nproc,
        Resource::RLIMIT_CPU => R::Cpu,
        Resource::RLIMIT_FSIZE => R::Fsize,
        Resource::RLIMIT_NOFILE => R::Nofile,
        _ => R::Core,
    }
}

/// The shared deny list as a hakoniwa filter.
fn seccomp_filter() -> hakoniwa::seccomp::Filter {
    use hakoniwa::seccomp::{Action, ArgCmp, ArgCmpOp, Filter};
    let mut f = Filter::new(Action::Allow);
    for name in DENIED_SYSCALLS {
        f.add_rule(Action::Errno(libc::EPERM), name);
    }
    for name in ENOSYS_SYSCALLS {
        f.add_rule(Action::Errno(libc::ENOSYS), name);
    }
    for &flag in DENIED_CLONE_FLAGS {
        let flag = flag as u64;
        f.add_rule_conditional(
            Action::Errno(libc::EPERM),
            "clone",
            &[ArgCmp::new(0, ArgCmpOp::MaskedEq, flag, flag)],
        );
    }
    f
}

struct Process {
    child: hakoniwa::Child,
}

impl JobProcess for Process {
    fn wait(&mut self) -> io::Result<JobExit> {
        let st = self.child.wait().map_err(io::Error::other)?;
        let exit = match st.exit_code {
            Some(code) => Some(ExitKind::Exited(code)),
            // Signals come as 128 + signal number; hakoniwa's own failures as 125.
            None if st.code > 128 => Some(ExitKind::Signaled(st.code - 128)),
            None => None,
        };
        let usage = st.rusage.map(|r| ResourceUsage {
            user_time: r.user_time,
            system_time: r.system_time,
            max_rss_bytes: u64::try_from(r.max_rss).unwrap_or(0) * 1024,
        });
        Ok(JobExit {
            exit,
            usage,
            reason: st.reason,
        })
    }
}
