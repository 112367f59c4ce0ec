//! A real S3-compatible server for tests: moto in server mode (`moto_server`), started on
//! 127.0.0.1 with a free port and one bucket, stopped when the handle is dropped.
//!
//! Why moto: the project tests its scale-out store against a real server process speaking the
//! S3 protocol over HTTP, never a mock object, and moto is the S3 server that installs from a
//! package registry (PyPI) without containers. `.ci/setup.d/s3.sh` installs it into
//! `~/.cache/rba-tools/moto`, where [`TestS3::start`] looks first; a `moto_server` on `PATH`
//! is the fallback (a developer's own install).
//!
//! moto keeps objects in memory: a [`TestS3::restart`] is a new, empty server on the same port
//! with the bucket created again (what a test of "the server went away and came back" needs;
//! not a test of durability). moto does not check request signatures, so any credentials work.
//!
//! This crate stays free of dependencies: the harness speaks just enough HTTP/1.1 over a
//! `TcpStream` to wait for the server and create the bucket.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a moto server may take to answer after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Where `.ci/setup.d/s3.sh` installs `moto_server`.
pub fn installed_moto_server() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let path = PathBuf::from(home).join(".cache/rba-tools/moto/bin/moto_server");
    path.is_file().then_some(path)
}

/// The `moto_server` to run: the project's install, else the one on `PATH`.
pub fn moto_server() -> Option<PathBuf> {
    installed_moto_server().or_else(|| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("moto_server"))
                .find(|path| path.is_file())
        })
    })
}

/// A running moto server with one bucket. Dropping it kills the server.
#[derive(Debug)]
pub struct TestS3 {
    program: PathBuf,
    port: u16,
    bucket: String,
    log: PathBuf,
    child: Option<Child>,
}

impl TestS3 {
    /// Starts a server with a bucket named `rba-test`. Panics (naming the fix) when moto is not
    /// installed or does not come up.
    pub fn start() -> TestS3 {
        TestS3::start_with_bucket("rba-test")
    }

    /// Starts a server with a bucket named `bucket`.
    pub fn start_with_bucket(bucket: &str) -> TestS3 {
        let program = moto_server().unwrap_or_else(|| {
            panic!(
                "moto_server is not installed: run `bash .ci/setup.d/s3.sh` (installs moto[server] \
                 into ~/.cache/rba-tools/moto)"
            )
        });
        let mut last_error = String::new();
        // A free port can be taken between our probe and moto's bind: try a few.
        for _ in 0..3 {
            let port = free_port();
            let mut server = TestS3 {
                program: program.clone(),
                port,
                bucket: bucket.to_string(),
                log: std::env::temp_dir()
                    .join(format!("rba-moto-{}-{port}.log", std::process::id())),
                child: None,
            };
            match server.launch() {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!(
            "moto_server ({}) did not start: {last_error}",
            program.display()
        );
    }

    /// Starts the process, waits until it answers, creates the bucket.
    fn launch(&mut self) -> Result<(), String> {
        let log = std::fs::File::create(&self.log)
            .map_err(|e| format!("creating {}: {e}", self.log.display()))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(&self.program)
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", self.program.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!("exited with {status}: {}", self.log_tail()));
            }
            if let Ok((status, _)) = http(self.port, "PUT", &format!("/{}", self.bucket)) {
                if status == 200 {
                    return Ok(());
                }
                self.stop();
                return Err(format!(
                    "creating bucket {} answered HTTP {status}: {}",
                    self.bucket,
                    self.log_tail()
                ));
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!(
                    "no answer on port {} within {START_TIMEOUT:?}: {}",
                    self.port,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(2000);
        String::from_utf8_lossy(&text[start..]).into_owned()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// One unsigned request to the server (moto does not check signatures): the status code
    /// and the whole response, e.g. `request("GET", "/BUCKET?uploads")` to list the multipart
    /// uploads in progress.
    pub fn request(&self, method: &str, path: &str) -> std::io::Result<(u16, String)> {
        http(self.port, method, path)
    }

    /// The bucket created at start.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The settings a client reads from the environment (object_store's
    /// `AmazonS3Builder::from_env`, the AWS SDKs): endpoint, credentials (any work: moto does
    /// not check signatures), region, plain HTTP allowed.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", "rba-test".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "rba-test-secret".to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
    }

    /// `s3://BUCKET` (what `RBA_STORE_URL` holds).
    pub fn url(&self) -> String {
        format!("s3://{}", self.bucket)
    }

    /// Kills the server (requests fail from now on). Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A new, empty server on the same port with the bucket created again (moto keeps
    /// objects in memory: everything stored before is gone).
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.launch() {
                Ok(()) => return,
                // the old socket may linger a moment before the port is free again
                Err(e) if Instant::now() > deadline => {
                    panic!("moto_server did not restart on port {}: {e}", self.port)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

impl Drop for TestS3 {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A port free on 127.0.0.1 right now.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("binding 127.0.0.1:0")
}

/// One unsigned HTTP/1.1 request without a body; the status code and the response text.
pub fn http(port: u16, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {response:?}")))?;
    Ok((status, response))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_restarts_and_is_killed_when_dropped() {
        let mut s3 = TestS3::start_with_bucket("rba-harness");
        let bucket = format!("/{}", s3.bucket());
        assert_eq!(s3.request("GET", &bucket).unwrap().0, 200);
        assert_eq!(s3.request("GET", "/rba-absent").unwrap().0, 404);
        let first = s3.pid().unwrap();

        s3.restart();
        let second = s3.pid().unwrap();
        assert_ne!(first, second);
        assert!(!std::path::Path::new(&format!("/proc/{first}")).exists());
        assert_eq!(s3.request("GET", &bucket).unwrap().0, 200);

        let log = s3.log.clone();
        drop(s3);
        assert!(!std::path::Path::new(&format!("/proc/{second}")).exists());
        assert!(!log.exists());
    }
}
