//! A private PostgreSQL server for tests: [`TestPostgres::start`] creates a cluster in a new
//! temporary directory with the machine's Debian PostgreSQL binaries (installed by
//! `.ci/setup.d/postgres.sh`), listening on 127.0.0.1 on a free port and on a unix socket in
//! that directory, with trust authentication; dropping it stops the server and removes the
//! directory.
//!
//! Why: the scale-out backends keep their exact state in PostgreSQL, and the project tests
//! against the real thing, never a mock. A private cluster per test keeps tests independent
//! (no shared database to clean, no state leaking between runs) and lets a test stop and
//! restart the database in the middle of its work ([`TestPostgres::stop`],
//! [`TestPostgres::start_again`], [`TestPostgres::restart`]), which a shared server could not
//! allow.
//!
//! PostgreSQL refuses to run as root, and the tests run as root: the server then runs as the
//! `postgres` system user (created by the Debian package) through `setpriv`, which execs the
//! server in place, so the child's pid is the postmaster's and stopping it needs no helper
//! process. The server is tuned for tests (no fsync, small shared buffers): durability across a
//! power loss is not what these tests check, a clean restart is.
//!
//! Only std: this crate stays free of heavy dependencies.

use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The system user the server runs as when the tests run as root.
const SERVER_USER: &str = "postgres";
/// How long the server may take to accept connections, or to shut down.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A running (or stopped, between [`TestPostgres::stop`] and [`TestPostgres::start_again`])
/// private PostgreSQL server. Dropping it stops the server and removes its directory.
#[derive(Debug)]
pub struct TestPostgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    server: Option<Child>,
    as_user: bool,
}

impl TestPostgres {
    /// Creates a cluster in a new temporary directory and starts it. Panics with the server's
    /// log when it cannot (a test cannot go on without its database).
    pub fn start() -> TestPostgres {
        static REAPED: std::sync::Once = std::sync::Once::new();
        REAPED.call_once(reap_orphans);
        let bin = postgres_bin().unwrap_or_else(|e| panic!("{e}"));
        let as_user = running_as_root();
        let dir = unique_temp_dir();
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let mut postgres = TestPostgres {
            dir,
            bin,
            port: 0,
            server: None,
            as_user,
        };
        if as_user {
            let (uid, gid) = user_ids(SERVER_USER).unwrap_or_else(|e| panic!("{e}"));
            std::os::unix::fs::chown(&postgres.dir, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {}: {e}", postgres.dir.display()));
        }
        postgres.initdb();
        postgres.launch_on_free_port();
        postgres
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`: the superuser's database over TCP.
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    /// The URL of another database of this server (create it first, e.g. with
    /// [`TestPostgres::create_database`]).
    pub fn url_of(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The superuser's database through the unix socket (no TCP).
    pub fn socket_url(&self) -> String {
        let dir: String = self
            .socket_dir()
            .to_string_lossy()
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                    char::from(b).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        format!("postgres://postgres@{dir}:{}/postgres", self.port)
    }

    /// The directory holding the server's unix socket (`.s.PGSQL.PORT`).
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.join("socket")
    }

    /// The TCP port the server listens on (kept across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log (stdout and stderr), for a failing test's message.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// Creates a database (with `createdb`, through the unix socket) and returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        let output = self
            .command(self.bin.join("createdb"))
            .args(["-h"])
            .arg(self.socket_dir())
            .args(["-p", &self.port.to_string(), "-U", "postgres", "--", name])
            .output()
            .unwrap_or_else(|e| panic!("running createdb: {e}"));
        assert!(
            output.status.success(),
            "createdb {name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        self.url_of(name)
    }

    /// Whether the server process is running.
    pub fn is_running(&self) -> bool {
        self.server.is_some()
    }

    /// Stops the server (fast shutdown: open sessions are ended, the data is kept) and waits
    /// for it to exit. Stopping a stopped server does nothing.
    pub fn stop(&mut self) {
        let Some(mut server) = self.server.take() else {
            return;
        };
        // SIGINT is PostgreSQL's fast shutdown. `kill` (procps) because std sends only SIGKILL.
        let _ = Command::new("kill")
            .args(["-INT", &server.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match server.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = server.kill();
                    let _ = server.wait();
                    return;
                }
            }
        }
    }

    /// Starts a stopped server again on the same port, with the same data, and waits until it
    /// accepts connections. Panics with the log when it cannot.
    pub fn start_again(&mut self) {
        if self.server.is_none() {
            self.launch()
                .unwrap_or_else(|e| panic!("{e}\n{}", self.log()));
        }
    }

    /// [`TestPostgres::stop`] then [`TestPostgres::start_again`].
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// A command run as the server's user when the tests run as root.
    fn command(&self, program: impl AsRef<Path>) -> Command {
        if self.as_user {
            let mut command = Command::new("setpriv");
            command
                .args([
                    "--reuid",
                    SERVER_USER,
                    "--regid",
                    SERVER_USER,
                    "--init-groups",
                ])
                .arg("--")
                .arg(program.as_ref());
            command
        } else {
            Command::new(program.as_ref())
        }
    }

    fn initdb(&self) {
        let output = self
            .command(self.bin.join("initdb"))
            .arg("-D")
            .arg(self.data_dir())
            .args([
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ])
            .current_dir(&self.dir)
            .output()
            .unwrap_or_else(|e| panic!("running initdb: {e}"));
        assert!(
            output.status.success(),
            "initdb in {}: {}{}",
            self.dir.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let socket = self.socket_dir();
        fs::create_dir(&socket).unwrap_or_else(|e| panic!("creating {}: {e}", socket.display()));
        if self.as_user {
            let (uid, gid) = user_ids(SERVER_USER).unwrap_or_else(|e| panic!("{e}"));
            std::os::unix::fs::chown(&socket, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {}: {e}", socket.display()));
        }
    }

    /// Picks a free port and starts the server on it; another process may take the port
    /// between the pick and the bind, so a failed start is retried on another port.
    fn launch_on_free_port(&mut self) {
        let mut last = String::new();
        for _ in 0..5 {
            self.port = free_port();
            match self.launch() {
                Ok(()) => return,
                Err(e) => last = e,
            }
        }
        panic!("starting PostgreSQL: {last}\n{}", self.log());
    }

    fn launch(&mut self) -> Result<(), String> {
        let log_path = self.dir.join("server.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
        let _ = fs::remove_file(self.data_dir().join("postmaster.pid"));
        let mut server = self
            .command(self.bin.join("postgres"))
            .arg("-D")
            .arg(self.data_dir())
            .arg("-k")
            .arg(self.socket_dir())
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "shared_buffers=32MB",
                "-c",
                "max_connections=64",
            ])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .current_dir(&self.dir)
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", self.bin.join("postgres").display()))?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = server.try_wait() {
                return Err(format!("the server exited at start ({status})"));
            }
            if self.accepts_connections() {
                self.server = Some(server);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = server.kill();
                let _ = server.wait();
                return Err(format!("the server was not ready within {READY_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The postmaster writes `ready` on line 8 of `postmaster.pid` once it accepts
    /// connections (a listening socket alone may still answer "starting up").
    fn accepts_connections(&self) -> bool {
        let pid_file =
            fs::read_to_string(self.data_dir().join("postmaster.pid")).unwrap_or_default();
        pid_file.lines().nth(7).map(str::trim) == Some("ready")
            && TcpStream::connect_timeout(
                &SocketAddr::from(([127, 0, 0, 1], self.port)),
                Duration::from_secs(1),
            )
            .is_ok()
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The `bin` directory of the newest PostgreSQL installed under `/usr/lib/postgresql/`.
pub fn postgres_bin() -> Result<PathBuf, String> {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir(root)
        .map_err(|e| {
            format!(
                "PostgreSQL is not installed ({}: {e}); run .ci/setup.d/postgres.sh",
                root.display()
            )
        })?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(|| {
        format!(
            "no PostgreSQL server under {}; run .ci/setup.d/postgres.sh",
            root.display()
        )
    })
}

/// Stops the servers and removes the directories that test processes killed before their
/// `Drop` ran left behind (a directory is named after its test process: `rba-pg-PID-…`), so
/// an interrupted run does not leak servers or disk. A server is signalled only when its
/// command line names that directory.
fn reap_orphans() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(owner) = name
            .strip_prefix("rba-pg-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if owner == std::process::id() || Path::new(&format!("/proc/{owner}")).exists() {
            continue; // its test process is alive
        }
        let dir = entry.path();
        let data = dir.join("data");
        let server = fs::read_to_string(data.join("postmaster.pid"))
            .ok()
            .and_then(|pid_file| pid_file.lines().next()?.trim().parse::<u32>().ok());
        if let Some(server) = server
            && String::from_utf8_lossy(&command_line(server)).contains(&*data.to_string_lossy())
        {
            let _ = Command::new("kill")
                .args(["-INT", &server.to_string()])
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + STOP_TIMEOUT;
            while !command_line(server).is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = fs::remove_dir_all(&dir);
    }
}

/// A process's command line; empty once it exited (a zombie has none) or when there is none.
fn command_line(pid: u32) -> Vec<u8> {
    fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()
}

fn running_as_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// A user's uid and gid, from /etc/passwd.
fn user_ids(user: &str) -> Result<(u32, u32), String> {
    let passwd =
        fs::read_to_string("/etc/passwd").map_err(|e| format!("reading /etc/passwd: {e}"))?;
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&user) && fields.len() > 3)
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
                .flatten()
        })
        .ok_or_else(|| {
            format!("no user {user:?} (created by Debian's postgresql package; run .ci/setup.d/postgres.sh)")
        })
}

fn unique_temp_dir() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "rba-pg-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|e| panic!("finding a free port on 127.0.0.1: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_restarts_and_cleans_up() {
        let mut postgres = TestPostgres::start();
        let dir = postgres.dir.clone();
        let port = postgres.port();
        assert!(postgres.url().contains(&format!("127.0.0.1:{port}")));
        assert!(
            postgres
                .socket_dir()
                .join(format!(".s.PGSQL.{port}"))
                .exists()
        );
        assert!(postgres.socket_url().contains("%2Fsocket"));
        let url = postgres.create_database("it's");
        assert!(url.ends_with("/it's"));
        postgres.stop();
        assert!(!postgres.is_running());
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
        postgres.restart();
        assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
        drop(postgres);
        assert!(!dir.exists(), "the cluster's directory is removed");
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    }

    #[test]
    fn servers_of_killed_test_processes_are_reaped() {
        // A server whose test process is gone (here: a directory named after a dead pid).
        let mut orphan = TestPostgres::start();
        let port = orphan.port();
        let dead_pid = u32::MAX - 1; // no process has it (pid_max is at most 2^22)
        let moved = std::env::temp_dir().join(format!("rba-pg-{dead_pid}-0-0"));
        orphan.stop();
        fs::rename(&orphan.dir, &moved).unwrap();
        orphan.dir = moved.clone();
        orphan.start_again();
        let server = orphan.server.take().unwrap(); // as if the test process died
        std::mem::forget(server);
        std::mem::forget(orphan);
        reap_orphans();
        assert!(!moved.exists(), "the orphan's directory is removed");
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    }
}
