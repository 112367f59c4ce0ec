//! One control group per sandbox run: the memory and process limits of a *job* (all its
//! processes together), not of each process.
//!
//! # Why it exists
//!
//! Rlimits are per process: four processes of one job under `RLIMIT_AS` each held their limit
//! four times over, and `RLIMIT_NPROC` counts per user namespace only because every sandbox has
//! its own. A cgroup holds every process of the job, so `memory` and `pids` limits bound the job
//! as a whole, and the kernel tells afterwards which limit was hit (`oom_kill` in
//! `memory.oom_control` / `memory.events`, `max` in `pids.events`).
//!
//! # Hierarchies
//!
//! * **cgroup v2**, used when a cgroup2 mount offers both `memory` and `pids` to the executor's own
//!   cgroup (delegated, e.g. a systemd unit with `Delegate=yes`): jobs live in
//!   `<own cgroup>/rba-jobs/<job>` with `memory.max`, `memory.swap.max = 0` and `pids.max`.
//! * **cgroup v1**, otherwise, when `memory` and `pids` hierarchies are mounted writable (the CI
//!   machines): `<mount>/<own cgroup>/rba-jobs/<job>` in both, with `memory.limit_in_bytes`,
//!   `memory.memsw.limit_in_bytes` (no swap beyond the limit, where swap accounting exists) and
//!   `pids.max`.
//! * Neither: [`available`] is `None` and the sandbox falls back to per-process rlimits (it logs
//!   so once, and every outcome says [`crate::sandbox::SandboxOutcome::cgroup`] = false).
//!
//! # Putting the job in, without a race
//!
//! The job's first process must be in the cgroup before it runs anything of the job. On v1 the
//! thread that forks the container joins the job's cgroup first ([`JobCgroup::enter`], a
//! per-thread move that v1 allows); the forked container process is born inside, and the
//! thread goes back right after the fork. v2 refuses per-thread moves in domain cgroups, so
//! there the container process is moved right after the fork ([`JobCgroup::adopt`]), together
//! with any process it already forked; the container is still setting itself up (mounts, id
//! maps) at that point, before the job's command runs, but this ordering is hakoniwa's, not a
//! guarantee of the kernel's.
//!
//! # Clean-up
//!
//! [`JobCgroup`]'s drop kills whatever is left in the cgroup and removes it. Cgroups left by a
//! process that died are removed by [`remove_stale`] (run when a sandbox is created): the
//! names carry the creating pid, and only cgroups of pids that no longer exist are touched.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The directory under the executor's own cgroup that holds the job cgroups.
const JOBS_DIR: &str = "rba-jobs";

/// Which cgroup hierarchy drives job limits on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hierarchy {
    /// cgroup v2: the directory holding the job cgroups.
    V2 {
        /// `<cgroup2 mount>/<own cgroup>/rba-jobs`.
        jobs: PathBuf,
    },
    /// cgroup v1: the directories holding the job cgroups in the two hierarchies.
    V1 {
        /// `<memory mount>/<own cgroup>/rba-jobs`.
        memory: PathBuf,
        /// `<pids mount>/<own cgroup>/rba-jobs`.
        pids: PathBuf,
    },
}

/// The hierarchy jobs use on this host, detected once; `None` when no usable one exists (the
/// reason is logged once).
pub fn available() -> Option<&'static Hierarchy> {
    static DETECTED: OnceLock<Option<Hierarchy>> = OnceLock::new();
    DETECTED
        .get_or_init(|| match detect() {
            Ok(h) => {
                tracing::info!(hierarchy = ?h, "job memory and process limits use cgroups");
                remove_stale(&h);
                Some(h)
            }
            Err(why) => {
                tracing::warn!(
                    "cgroups unavailable ({why}): job memory and process limits fall back to \
                     per-process rlimits"
                );
                None
            }
        })
        .as_ref()
}

fn detect() -> Result<Hierarchy, String> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
    let own = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
    let mut v2_mount = None;
    let mut v1_memory = None;
    let mut v1_pids = None;
    for line in mountinfo.lines() {
        // id parent major:minor root mount-point options ... - fstype source super-options
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(mount_point), Some(fstype), Some(super_opts)) =
            (fields.get(4), fields.get(dash + 1), fields.get(dash + 3))
        else {
            continue;
        };
        if fields
            .get(5)
            .is_some_and(|o| o.split(',').any(|o| o == "ro"))
        {
            continue;
        }
        match *fstype {
            "cgroup2" => v2_mount = v2_mount.or(Some(PathBuf::from(mount_point))),
            "cgroup" => {
                let opts: Vec<&str> = super_opts.split(',').collect();
                if opts.contains(&"memory") {
                    v1_memory = Some(PathBuf::from(mount_point));
                }
                if opts.contains(&"pids") {
                    v1_pids = Some(PathBuf::from(mount_point));
                }
            }
            _ => {}
        }
    }
    let own_path = |controller: Option<&str>| -> Option<String> {
        own.lines().find_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let matches = match controller {
                None => controllers.is_empty(),
                Some(c) => controllers.split(',').any(|x| x == c),
            };
            matches.then(|| path.trim_start_matches('/').to_string())
        })
    };
    let mut why = Vec::new();
    if let (Some(mount), Some(path)) = (&v2_mount, own_path(None)) {
        match setup_v2(&mount.join(&path)) {
            Ok(jobs) => return Ok(Hierarchy::V2 { jobs }),
            Err(e) => why.push(format!("cgroup2 at {}: {e}", mount.display())),
        }
    }
    match (v1_memory, v1_pids) {
        (Some(memory), Some(pids)) => {
            let memory = memory.join(own_path(Some("memory")).unwrap_or_default());
            let pids = pids.join(own_path(Some("pids")).unwrap_or_default());
            let memory_jobs = memory.join(JOBS_DIR);
            let pids_jobs = pids.join(JOBS_DIR);
            for dir in [&memory_jobs, &pids_jobs] {
                ensure_dir(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
            }
            // v1 memory: children count towards the parents (the default on current kernels).
            let _ = fs::write(memory_jobs.join("memory.use_hierarchy"), "1");
            Ok(Hierarchy::V1 {
                memory: memory_jobs,
                pids: pids_jobs,
            })
        }
        _ => {
            why.push("no writable cgroup v1 `memory` and `pids` hierarchies".into());
            Err(why.join("; "))
        }
    }
}

/// Creates `<own>/rba-jobs` with `memory` and `pids` enabled for its children.
fn setup_v2(own: &Path) -> io::Result<PathBuf> {
    let controllers = fs::read_to_string(own.join("cgroup.controllers"))?;
    for needed in ["memory", "pids"] {
        if !controllers.split_whitespace().any(|c| c == needed) {
            return Err(io::Error::other(format!(
                "controller `{needed}` not delegated to {}",
                own.display()
            )));
        }
    }
    let jobs = own.join(JOBS_DIR);
    ensure_dir(&jobs)?;
    // Our own cgroup must pass the controllers down to rba-jobs, and rba-jobs to the jobs.
    // Enabling them in our own cgroup fails if it holds processes (the "no internal
    // processes" rule) unless it is the root: then v2 is not usable as delegated.
    fs::write(own.join("cgroup.subtree_control"), "+memory +pids")?;
    fs::write(jobs.join("cgroup.subtree_control"), "+memory +pids")?;
    Ok(jobs)
}

fn ensure_dir(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// Limits of one job's cgroup; `None` = not limited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupLimits {
    /// Memory of all processes together (anonymous memory, page cache, kernel memory), bytes.
    pub memory_bytes: Option<u64>,
    /// Processes and threads together.
    pub max_processes: Option<u64>,
}

/// What the kernel counted for a job's cgroup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupReport {
    /// Processes the OOM killer ended because of the memory limit.
    pub oom_kills: u64,
    /// Forks refused because of the process limit.
    pub pids_max_hits: u64,
    /// Highest memory use seen, bytes (0 when the kernel does not say).
    pub memory_peak: u64,
    /// Highest process count seen (0 when the kernel does not say).
    pub pids_peak: u64,
}

/// One job's cgroup (in both hierarchies on v1). Dropping it kills what is left inside and
/// removes it.
#[derive(Debug)]
pub struct JobCgroup {
    hierarchy: &'static Hierarchy,
    /// The job's directories: one (v2) or memory and pids (v1).
    dirs: Vec<PathBuf>,
}

impl JobCgroup {
    /// Creates a cgroup for one job with `limits`.
    pub fn create(hierarchy: &'static Hierarchy, limits: CgroupLimits) -> io::Result<JobCgroup> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "job-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dirs = match hierarchy {
            Hierarchy::V2 { jobs } => vec![jobs.join(&name)],
            Hierarchy::V1 { memory, pids } => vec![memory.join(&name), pids.join(&name)],
        };
        let mut cgroup = JobCgroup {
            hierarchy,
            dirs: Vec::new(),
        };
        for dir in dirs {
            fs::create_dir(&dir).map_err(|e| context(&dir, e))?;
            cgroup.dirs.push(dir);
        }
        cgroup.apply(limits)?;
        Ok(cgroup)
    }

    fn apply(&self, limits: CgroupLimits) -> io::Result<()> {
        let write = |dir: &Path, file: &str, value: String| -> io::Result<()> {
            let path = dir.join(file);
            fs::write(&path, value).map_err(|e| context(&path, e))
        };
        match self.hierarchy {
            Hierarchy::V2 { .. } => {
                let dir = &self.dirs[0];
                if let Some(bytes) = limits.memory_bytes {
                    write(dir, "memory.max", bytes.to_string())?;
                    // No swap beyond the limit; absent when the kernel has no swap accounting.
                    if dir.join("memory.swap.max").exists() {
                        write(dir, "memory.swap.max", "0".into())?;
                    }
                    // The OOM killer ends the whole job, not one of its processes at random.
                    let _ = write(dir, "memory.oom.group", "1".into());
                }
                if let Some(n) = limits.max_processes {
                    write(dir, "pids.max", n.to_string())?;
                }
            }
            Hierarchy::V1 { .. } => {
                let (memory, pids) = (&self.dirs[0], &self.dirs[1]);
                if let Some(bytes) = limits.memory_bytes {
                    write(memory, "memory.limit_in_bytes", bytes.to_string())?;
                    // memsw (memory + swap) must be >= the memory limit; absent without swap
                    // accounting.
                    if memory.join("memory.memsw.limit_in_bytes").exists() {
                        write(memory, "memory.memsw.limit_in_bytes", bytes.to_string())?;
                    }
                    let _ = write(memory, "memory.swappiness", "0".into());
                }
                if let Some(n) = limits.max_processes {
                    write(pids, "pids.max", n.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// v1 only: moves the calling thread into the job's cgroups until the guard drops; a
    /// process forked meanwhile is born inside. `None` on v2 (use [`JobCgroup::adopt`]).
    pub fn enter(&self) -> io::Result<Option<EnteredThread>> {
        let Hierarchy::V1 { memory, pids } = self.hierarchy else {
            return Ok(None);
        };
        let tid = nix::unistd::gettid().as_raw().to_string();
        // Where the thread returns to: the parents of the jobs dirs are the executor's cgroups.
        let home: Vec<PathBuf> = [memory, pids]
            .iter()
            .map(|jobs| jobs.parent().unwrap_or(jobs).join("tasks"))
            .collect();
        let mut entered = EnteredThread {
            tid: tid.clone(),
            home: Vec::new(),
        };
        for (dir, home) in self.dirs.iter().zip(home) {
            let tasks = dir.join("tasks");
            fs::write(&tasks, &tid).map_err(|e| context(&tasks, e))?;
            entered.home.push(home);
        }
        Ok(Some(entered))
    }

    /// Moves process `pid` and the processes it already forked into the job's cgroup (v2, where
    /// [`JobCgroup::enter`] cannot be used; see the module docs).
    pub fn adopt(&self, pid: i32) -> io::Result<()> {
        let mut pending = vec![pid];
        while let Some(pid) = pending.pop() {
            for dir in &self.dirs {
                let procs = dir.join("cgroup.procs");
                match fs::write(&procs, pid.to_string()) {
                    Ok(()) => {}
                    // Gone meanwhile.
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                    Err(e) => return Err(context(&procs, e)),
                }
            }
            let children =
                fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
            pending.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<i32>().ok()),
            );
        }
        Ok(())
    }

    /// Pids of the processes in the job's cgroup right now.
    pub fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.dirs[0].join("cgroup.procs"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// The job cgroup's directory in the `pids` hierarchy (for `pids.current`), or the v2 one.
    pub fn pids_dir(&self) -> &Path {
        self.dirs.last().expect("at least one dir")
    }

    /// What the kernel counted so far.
    pub fn report(&self) -> CgroupReport {
        let read = |path: PathBuf| fs::read_to_string(path).unwrap_or_default();
        let key = |text: &str, key: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
                .unwrap_or(0)
        };
        let number = |text: String| text.trim().parse::<u64>().unwrap_or(0);
        match self.hierarchy {
            Hierarchy::V2 { .. } => {
                let dir = &self.dirs[0];
                CgroupReport {
                    oom_kills: key(&read(dir.join("memory.events")), "oom_kill "),
                    pids_max_hits: key(&read(dir.join("pids.events")), "max "),
                    memory_peak: number(read(dir.join("memory.peak"))),
                    pids_peak: number(read(dir.join("pids.peak"))),
                }
            }
            Hierarchy::V1 { .. } => {
                let (memory, pids) = (&self.dirs[0], &self.dirs[1]);
                CgroupReport {
                    oom_kills: key(&read(memory.join("memory.oom_control")), "oom_kill "),
                    pids_max_hits: key(&read(pids.join("pids.events")), "max "),
                    memory_peak: number(read(memory.join("memory.max_usage_in_bytes"))),
                    pids_peak: number(read(pids.join("pids.peak"))),
                }
            }
        }
    }

    /// Kills every process in the cgroup (repeatedly, until it is empty or `patience` passed).
    pub fn kill_all(&self, patience: Duration) {
        let deadline = std::time::Instant::now() + patience;
        loop {
            if let Some(dir) = self.dirs.first()
                && matches!(self.hierarchy, Hierarchy::V2 { .. })
                && fs::write(dir.join("cgroup.kill"), "1").is_ok()
            {
                // The kernel kills them all at once; wait below until they are gone.
            }
            let pids = self.pids();
            if pids.is_empty() || std::time::Instant::now() >= deadline {
                return;
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for JobCgroup {
    fn drop(&mut self) {
        self.kill_all(Duration::from_secs(2));
        for dir in &self.dirs {
            remove_cgroup(dir);
        }
    }
}

/// A thread moved into a job's cgroups by [`JobCgroup::enter`]; moves it back when dropped.
#[derive(Debug)]
pub struct EnteredThread {
    tid: String,
    home: Vec<PathBuf>,
}

impl Drop for EnteredThread {
    fn drop(&mut self) {
        for tasks in &self.home {
            if let Err(e) = fs::write(tasks, &self.tid) {
                tracing::warn!(path = %tasks.display(), "moving the sandbox thread back: {e}");
            }
        }
    }
}

/// Removes an empty cgroup, retrying briefly while the kernel finishes tearing down its last
/// processes.
fn remove_cgroup(dir: &Path) {
    for attempt in 0..100 {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) if attempt == 99 => {
                tracing::warn!(path = %dir.display(), "removing a job cgroup: {e}");
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Removes job cgroups left behind by executor processes that no longer exist.
pub fn remove_stale(hierarchy: &Hierarchy) {
    let dirs: Vec<&PathBuf> = match hierarchy {
        Hierarchy::V2 { jobs } => vec![jobs],
        Hierarchy::V1 { memory, pids } => vec![memory, pids],
    };
    for jobs in dirs {
        let Ok(entries) = fs::read_dir(jobs) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("job-")
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if Path::new(&format!("/proc/{pid}")).exists() {
                continue; // its executor still runs (or the pid was reused: leave it)
            }
            let path = entry.path();
            for pid in fs::read_to_string(path.join("cgroup.procs"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            remove_cgroup(&path);
            tracing::info!(path = %path.display(), "removed a stale job cgroup");
        }
    }
}

fn context(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}
