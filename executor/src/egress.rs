//! Where the fetch phase may connect: the one network access a job gets.
//!
//! # Why
//!
//! `cargo fetch` downloads whatever the workspace names: a lock file or a manifest can name a
//! registry or a git repository on any URL, `sparse+http://127.0.0.1:8080/` or
//! `git+http://10.0.0.1/…` included, and the reply (or its error message) lands in a build log
//! the client reads. Without a rule, a job makes the node's cargo probe the operator's own
//! network (loopback services, the LAN, the cloud metadata endpoint). Here is the rule, applied
//! twice:
//!
//! 1. **Before cargo runs** ([`EgressPolicy::check_lockfile`], [`EgressPolicy::check_manifests`]):
//!    every `source` of `Cargo.lock` and every `git` / `registry-index` URL and `[patch]` source
//!    named by a `Cargo.toml` of the synced tree must be `https://` on an allowed host. The first
//!    source that is not refuses the job, with an error naming it; nothing connects anywhere.
//! 2. **At the network** ([`EgressProxy`]): cargo runs with `CARGO_HTTP_PROXY` (and the
//!    `https_proxy`/`http_proxy` family libcurl reads) pointing to an HTTP `CONNECT` proxy of
//!    the executor on loopback, which exists only during the fetch. It tunnels only to allowed
//!    host names and ports, resolves the name itself and never connects to an address of the
//!    host or its networks ([`is_internal_ip`]: loopback, private, link-local (metadata
//!    `169.254.169.254`), CGNAT, multicast, reserved, IPv6 ULA/link-local/site-local, and the
//!    v4-mapped or -embedded forms of those). A source that step 1 did not anticipate (a registry's
//!    download host, a redirect) is refused here; its refusal is named in the job's error.
//!    Cargo sends git over `https://` through the same libcurl proxy settings
//!    (`http.proxy` makes it use its curl transport for libgit2), and step 1 admits no other
//!    git transport (`ssh://`, `git://`, `file://`).
//!
//! The allowlist is operator configuration ([`crate::runner::ExecutorConfig::fetch_allowed_hosts`]),
//! by default the public registry, crates.io: lock files name it
//! `registry+https://github.com/rust-lang/crates.io-index` ([`CRATES_IO_SOURCE`]) and cargo
//! reads it over the sparse protocol from `index.crates.io` and downloads `.crate` files from
//! `static.crates.io`. A mirror or a git host is allowed by adding its host name (`host`,
//! `host:port`, or `*.domain` for its subdomains; the port is 443 unless given).
//!
//! Limit: the fetch sandbox shares the host's network namespace, so the proxy binds on host
//! loopback; only cargo runs in that phase (no build script, no proc macro), and cargo's only
//! connections are to the sources checked in step 1, through the proxy.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The source id lock files give crates.io (cargo reads it over the sparse protocol).
pub const CRATES_IO_SOURCE: &str = "registry+https://github.com/rust-lang/crates.io-index";
/// The sparse index of crates.io, as a source id.
pub const CRATES_IO_SPARSE_SOURCE: &str = "sparse+https://index.crates.io/";
/// The host cargo reads crates.io's index from.
pub const CRATES_IO_INDEX_HOST: &str = "index.crates.io";

/// The default allowlist: crates.io's sparse index and its downloads.
pub fn default_fetch_allowed_hosts() -> Vec<String> {
    vec![
        CRATES_IO_INDEX_HOST.to_string(),
        "static.crates.io".to_string(),
    ]
}

/// Largest manifest or lock file read for the checks.
const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Deepest directory searched for manifests.
const MAX_MANIFEST_DEPTH: usize = 64;
/// Time a proxy client has to send its request, and a tunnel to connect.
const PROXY_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest request head the proxy reads.
const MAX_REQUEST_HEAD: usize = 8 << 10;

/// Why the fetch phase refuses a job before running anything.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// A source (lock file `source`, manifest `git` / `registry-index` / `[patch]` URL) that
    /// the allowlist refuses.
    #[error("fetch source {source_id:?} (named by {named_by}) refused: {reason}")]
    Refused {
        /// The source as written.
        source_id: String,
        /// Which file named it (relative to the workspace).
        named_by: String,
        /// Why.
        reason: String,
    },
    /// A lock file that is not TOML.
    #[error("Cargo.lock is not valid TOML: {0}")]
    Lockfile(String),
    /// An allowlist entry that is not a host name.
    #[error("fetch allowlist entry {0:?} is not a host, host:port or *.domain")]
    BadAllowEntry(String),
    /// Reading the tree failed.
    #[error("reading manifests: {0}")]
    Io(#[from] io::Error),
}

/// One allowlist entry.
#[derive(Clone, Debug, PartialEq, Eq)]
struct AllowedHost {
    /// Lowercase host name or IP literal; with `subdomains`, the domain after `*.`.
    host: String,
    subdomains: bool,
    port: u16,
}

impl AllowedHost {
    fn parse(entry: &str) -> Result<Self, EgressError> {
        let bad = || EgressError::BadAllowEntry(entry.to_string());
        let entry_lower = entry.trim().trim_end_matches('.').to_ascii_lowercase();
        let (subdomains, rest) = match entry_lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, entry_lower.as_str()),
        };
        let (host, port) = split_host_port(rest).ok_or_else(bad)?;
        let port = port.unwrap_or(443);
        let valid_name = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        if !(valid_name || host.parse::<IpAddr>().is_ok()) || port == 0 {
            return Err(bad());
        }
        Ok(AllowedHost {
            host: host.to_string(),
            subdomains,
            port,
        })
    }

    fn matches(&self, host: &str, port: u16) -> bool {
        port == self.port
            && if self.subdomains {
                host.strip_suffix(&self.host)
                    .is_some_and(|prefix| prefix.len() > 1 && prefix.ends_with('.'))
            } else {
                host == self.host
            }
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port` (brackets removed).
fn split_host_port(text: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after {
            "" => Some((host, None)),
            _ => Some((host, Some(after.strip_prefix(':')?.parse().ok()?))),
        };
    }
    match text.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => Some((host, Some(port.parse().ok()?))),
        Some(_) => Some((text, None)).filter(|_| text.parse::<Ipv6Addr>().is_ok()),
        None => Some((text, None)),
    }
}

/// The operator's rule of where the fetch phase may connect (see the module documentation).
#[derive(Clone, Debug)]
pub struct EgressPolicy {
    hosts: Vec<AllowedHost>,
}

impl EgressPolicy {
    /// A policy allowing `hosts` (`host`, `host:port`, `*.domain`; port 443 unless given).
    pub fn new<S: AsRef<str>>(hosts: &[S]) -> Result<Self, EgressError> {
        let hosts = hosts
            .iter()
            .map(|h| AllowedHost::parse(h.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(EgressPolicy { hosts })
    }

    /// True when a tunnel to `host:port` is allowed by name (addresses are checked apart).
    pub fn allows_host(&self, host: &str, port: u16) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts
            .iter()
            .any(|allowed| allowed.matches(&host, port))
    }

    /// Checks one source id (`registry+URL`, `sparse+URL`, `git+URL[?…][#…]`, or a bare URL as
    /// `[patch]` keys are): `Err(reason)` when refused.
    pub fn check_source(&self, source: &str) -> Result<(), String> {
        if source == CRATES_IO_SOURCE || source == CRATES_IO_SPARSE_SOURCE {
            return if self.allows_host(CRATES_IO_INDEX_HOST, 443) {
                Ok(())
            } else {
                Err(format!(
                    "crates.io ({CRATES_IO_INDEX_HOST}) is not in the fetch allowlist"
                ))
            };
        }
        let url_text = ["registry+", "sparse+", "git+"]
            .iter()
            .find_map(|kind| source.strip_prefix(kind))
            .unwrap_or(source);
        let url = url::Url::parse(url_text).map_err(|e| format!("not a URL ({e})"))?;
        if url.scheme() != "https" {
            return Err(format!(
                "only https:// sources are fetched (through the egress proxy), not {}://",
                url.scheme()
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("credentials in the URL".into());
        }
        let port = url.port_or_known_default().unwrap_or(443);
        let host = match url.host() {
            Some(url::Host::Domain(name)) => name.to_string(),
            Some(url::Host::Ipv4(ip)) => {
                check_public(IpAddr::V4(ip))?;
                ip.to_string()
            }
            Some(url::Host::Ipv6(ip)) => {
                check_public(IpAddr::V6(ip))?;
                ip.to_string()
            }
            None => return Err("no host".into()),
        };
        if !self.allows_host(&host, port) {
            return Err(format!("{host}:{port} is not in the fetch allowlist"));
        }
        Ok(())
    }

    /// Every `source` of a lock file, checked; the first refused one is the error. Returns the
    /// number of sources (0: nothing to fetch).
    pub fn check_lockfile(&self, lockfile: &str) -> Result<usize, EgressError> {
        let sources = lockfile_sources(lockfile)?;
        for source in &sources {
            self.check_source(source)
                .map_err(|reason| EgressError::Refused {
                    source_id: source.clone(),
                    named_by: "Cargo.lock".into(),
                    reason,
                })?;
        }
        Ok(sources.len())
    }

    /// Every registry and git source named by a `Cargo.toml` under `root` (the synced tree),
    /// checked. Reads without following symlinks: symlinked directories are not entered and
    /// symlinked manifests not read (cargo may still read them in the sandbox: the proxy is
    /// the enforcement for what this check cannot see).
    pub fn check_manifests(&self, root: &Path) -> Result<(), EgressError> {
        for manifest in find_manifests(root)? {
            let Some(text) = read_nofollow(&manifest)? else {
                continue;
            };
            let named_by = manifest
                .strip_prefix(root)
                .unwrap_or(&manifest)
                .display()
                .to_string();
            // Not TOML: cargo refuses it too, with its own error, before any fetch.
            let Ok(value) = text.parse::<toml::Table>() else {
                continue;
            };
            for source in manifest_sources(&value) {
                self.check_source(&source)
                    .map_err(|reason| EgressError::Refused {
                        source_id: source.clone(),
                        named_by: named_by.clone(),
                        reason,
                    })?;
            }
        }
        Ok(())
    }
}

fn check_public(ip: IpAddr) -> Result<(), String> {
    if is_public_ip(ip) {
        Ok(())
    } else {
        Err(format!("{ip} is not a public address"))
    }
}

/// The `source` of every package of a lock file (path dependencies have none).
pub fn lockfile_sources(lockfile: &str) -> Result<Vec<String>, EgressError> {
    if lockfile.trim().is_empty() {
        return Ok(Vec::new());
    }
    let table: toml::Table = lockfile
        .parse()
        .map_err(|e: toml::de::Error| EgressError::Lockfile(e.message().to_string()))?;
    let mut sources: Vec<String> = table
        .get("package")
        .and_then(|p| p.as_array())
        .into_iter()
        .flatten()
        .filter_map(|package| package.get("source")?.as_str().map(str::to_string))
        .collect();
    sources.sort();
    sources.dedup();
    Ok(sources)
}

/// The sources a manifest names: every `git` and `registry-index` string, wherever the table
/// is (dependencies of every kind and target, `[workspace.dependencies]`, `[patch.*]`,
/// `[replace]`), and the keys of `[patch]` that are URLs.
fn manifest_sources(manifest: &toml::Table) -> Vec<String> {
    fn walk(value: &toml::Value, out: &mut Vec<String>) {
        match value {
            toml::Value::Table(table) => {
                for (key, value) in table {
                    match (key.as_str(), value) {
                        ("git", toml::Value::String(url)) => out.push(format!("git+{url}")),
                        ("registry-index", toml::Value::String(url)) => {
                            out.push(if url.starts_with("sparse+") {
                                url.clone()
                            } else {
                                format!("registry+{url}")
                            })
                        }
                        _ => walk(value, out),
                    }
                }
            }
            toml::Value::Array(items) => items.iter().for_each(|item| walk(item, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for (key, value) in manifest {
        if key == "patch"
            && let Some(patches) = value.as_table()
        {
            out.extend(patches.keys().filter(|k| k.contains(':')).cloned());
        }
        walk(value, &mut out);
    }
    out
}

/// Every regular file named `Cargo.toml` under `root`, without entering symlinked directories.
fn find_manifests(root: &Path) -> io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![(root.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            // `DirEntry::file_type` does not follow symlinks.
            let kind = entry.file_type()?;
            if kind.is_dir() && depth < MAX_MANIFEST_DEPTH {
                pending.push((entry.path(), depth + 1));
            } else if kind.is_file() && entry.file_name() == "Cargo.toml" {
                found.push(entry.path());
            }
        }
    }
    found.sort();
    Ok(found)
}

/// A file's text, opened with `O_NOFOLLOW` (`None` if it is a symlink or not UTF-8), at most
/// [`MAX_MANIFEST_BYTES`].
fn read_nofollow(path: &Path) -> io::Result<Option<String>> {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(None),
        Err(e) => return Err(e),
    };
    if !file.metadata()?.is_file() {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut io::Read::take(file, MAX_MANIFEST_BYTES), &mut bytes)?;
    Ok(String::from_utf8(bytes).ok())
}

/// True for addresses of the host itself or of the networks it sits in, which no job may reach:
/// loopback, unspecified, "this network" (`0/8`), private (RFC 1918), link-local (the cloud
/// metadata address `169.254.169.254` included), CGNAT (`100.64/10`), multicast, broadcast and
/// reserved (`240/4`); for IPv6 loopback, unspecified, ULA (`fc00::/7`), link-local,
/// site-local, multicast, and the v4-mapped, v4-compatible, 6to4, NAT64 and Teredo forms
/// (whatever IPv4 address they embed, when they embed one that is internal).
///
/// The egress proxy refuses these after resolving an allowed name. Documentation and
/// benchmarking ranges are not in the list: they are not routed on the internet and hold no
/// operator service by convention, and some CI networks resolve registries into them (this
/// project's CI answers `index.crates.io` with `203.0.113.80`). Addresses a client names
/// itself are held to the stricter [`is_public_ip`].
pub fn is_internal_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => {
            let segments = v6.segments();
            let embedded_v4 = |hi: u16, lo: u16| {
                Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8)
            };
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal_v4(v4);
            }
            // IPv4-compatible (::a.b.c.d, deprecated), and ::/96 as a whole.
            if segments[..6].iter().all(|&s| s == 0) {
                return true;
            }
            let first = segments[0];
            // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) reach the embedded IPv4 address.
            if first == 0x0064 && segments[1] == 0xff9b {
                return is_internal_v4(embedded_v4(segments[6], segments[7]));
            }
            if first == 0x2002 {
                return is_internal_v4(embedded_v4(segments[1], segments[2]));
            }
            v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || (first & 0xffc0) == 0xfec0
                || (first == 0x2001 && segments[1] == 0)
        }
    }
}

fn is_internal_v4(v4: Ipv4Addr) -> bool {
    let [a, b, ..] = v4.octets();
    v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_broadcast()
        || v4.is_unspecified()
        || v4.is_multicast()
        || a == 0
        || a >= 240
        || (a == 100 && (64..128).contains(&b))
}

/// True for addresses reachable on the public internet: not [`is_internal_ip`], and not
/// documentation (`192.0.2/24`, `198.51.100/24`, `203.0.113/24`, `2001:db8::/32`),
/// benchmarking (`198.18/15`), IETF protocol assignments (`192.0.0/24`) or discard-only
/// (`100::/64`). The rule for addresses a client names (a lock file's source, a job's
/// download URL).
pub fn is_public_ip(ip: IpAddr) -> bool {
    if is_internal_ip(ip) {
        return false;
    }
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_documentation()
                || (a == 198 && (b == 18 || b == 19))
                || (a == 192 && b == 0 && c == 0))
        }
        IpAddr::V6(v6) => {
            let segments = v6.segments();
            match v6.to_ipv4_mapped() {
                Some(v4) => is_public_ip(IpAddr::V4(v4)),
                None => {
                    !((segments[0] == 0x2001 && segments[1] == 0x0db8)
                        || (segments[0] == 0x0100 && segments[1..4].iter().all(|&s| s == 0)))
                }
            }
        }
    }
}

/// The HTTP `CONNECT` proxy of one fetch phase, on an ephemeral loopback port; stops (with
/// every tunnel) when dropped.
pub struct EgressProxy {
    addr: SocketAddr,
    refusals: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl EgressProxy {
    /// Binds `127.0.0.1:0` and serves `policy` until dropped.
    pub async fn start(policy: EgressPolicy) -> io::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let refusals = Arc::new(Mutex::new(Vec::new()));
        let (policy, log) = (Arc::new(policy), refusals.clone());
        let task = tokio::spawn(async move {
            // Dropping the set (when the task is aborted) aborts every tunnel.
            let mut tunnels = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        let (policy, log) = (policy.clone(), log.clone());
                        tunnels.spawn(async move {
                            let mut client = client;
                            if let Err((refusal, answer)) =
                                serve_client(&mut client, &policy).await
                            {
                                tracing::info!(%refusal, "egress proxy refused a connection");
                                // Recorded before the client hears the answer: whoever reads
                                // the refusals after the answer sees this one.
                                {
                                    let mut log = log.lock();
                                    if log.len() < 64 {
                                        log.push(refusal);
                                    }
                                }
                                if let Some(status) = answer {
                                    let _ = client
                                        .write_all(
                                            format!(
                                                "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\
                                                 Connection: close\r\n\r\n"
                                            )
                                            .as_bytes(),
                                        )
                                        .await;
                                }
                            }
                        });
                    }
                    Some(_) = tunnels.join_next(), if !tunnels.is_empty() => {}
                }
            }
        });
        Ok(EgressProxy {
            addr,
            refusals,
            task,
        })
    }

    /// Where the proxy listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy as a URL for `CARGO_HTTP_PROXY` / `https_proxy`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The environment that sends cargo's libcurl (registries, and git through cargo's curl
    /// transport) through this proxy and no other.
    pub fn cargo_env(&self) -> Vec<(&'static str, String)> {
        let url = self.url();
        let mut env: Vec<(&'static str, String)> = [
            "CARGO_HTTP_PROXY",
            "https_proxy",
            "HTTPS_PROXY",
            "http_proxy",
            "HTTP_PROXY",
            "ALL_PROXY",
            "all_proxy",
        ]
        .into_iter()
        .map(|name| (name, url.clone()))
        .collect();
        env.push(("NO_PROXY", String::new()));
        env.push(("no_proxy", String::new()));
        env.push(("CARGO_NET_GIT_FETCH_WITH_CLI", "false".into()));
        env
    }

    /// What the proxy refused so far (at most 64 entries), e.g.
    /// `CONNECT 127.0.0.1:8080: 127.0.0.1 is not a public address`.
    pub fn refusals(&self) -> Vec<String> {
        self.refusals.lock().clone()
    }
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One client: reads `CONNECT host:port`, checks, connects, answers `200`, then copies bytes
/// both ways. `Err((refusal, status))`: why, and the status line to answer (`403`, `405`,
/// `502`…), if the client is still there to hear it.
async fn serve_client(
    client: &mut TcpStream,
    policy: &EgressPolicy,
) -> Result<(), (String, Option<&'static str>)> {
    let head = tokio::time::timeout(PROXY_HANDSHAKE_TIMEOUT, read_head(client))
        .await
        .map_err(|_| ("no request within the handshake timeout".to_string(), None))?
        .map_err(|e| (format!("reading the request: {e}"), None))?;
    let (head, leftover) = head;
    let request_line = head.lines().next().unwrap_or_default().to_string();
    let mut parts = request_line.split_ascii_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "CONNECT" {
        return Err((
            format!("{method} {target}: only CONNECT (https) is proxied"),
            Some("405 Method Not Allowed"),
        ));
    }
    let upstream = match tokio::time::timeout(
        PROXY_HANDSHAKE_TIMEOUT,
        connect_checked(target, policy),
    )
    .await
    {
        Ok(Ok(upstream)) => upstream,
        Ok(Err((status, reason))) => {
            return Err((format!("CONNECT {target}: {reason}"), Some(status)));
        }
        Err(_) => {
            return Err((
                format!("CONNECT {target}: connecting timed out"),
                Some("504 Gateway Timeout"),
            ));
        }
    };
    let mut upstream = upstream;
    client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .map_err(|e| (e.to_string(), None))?;
    if !leftover.is_empty() && upstream.write_all(&leftover).await.is_err() {
        return Ok(());
    }
    let _ = tokio::io::copy_bidirectional(client, &mut upstream).await;
    Ok(())
}

/// The request head up to the blank line, and any bytes read after it.
async fn read_head(client: &mut TcpStream) -> io::Result<(String, Vec<u8>)> {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let leftover = buffer.split_off(end + 4);
            return Ok((String::from_utf8_lossy(&buffer).into_owned(), leftover));
        }
        if buffer.len() > MAX_REQUEST_HEAD {
            return Err(io::Error::other("request head too large"));
        }
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

/// Checks `host:port` against the policy, resolves it, and connects to its first public
/// address that answers. `Err((status line, reason))`.
async fn connect_checked(
    target: &str,
    policy: &EgressPolicy,
) -> Result<TcpStream, (&'static str, String)> {
    let forbidden = |reason: String| ("403 Forbidden", reason);
    let (host, port) = match split_host_port(target) {
        Some((host, Some(port))) if !host.is_empty() && port != 0 => (host, port),
        _ => return Err(("400 Bad Request", "not host:port".into())),
    };
    if !policy.allows_host(host, port) {
        return Err(forbidden(format!(
            "{host}:{port} is not in the fetch allowlist"
        )));
    }
    let resolved: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| ("502 Bad Gateway", format!("resolving {host}: {e}")))?
            .collect(),
    };
    let (public, private): (Vec<SocketAddr>, Vec<SocketAddr>) =
        resolved.into_iter().partition(|a| !is_internal_ip(a.ip()));
    if public.is_empty() {
        let shown = private
            .iter()
            .map(|a| format!("{} is not a public address", a.ip()))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(forbidden(format!("{host}: {shown}")));
    }
    let mut last = String::new();
    for addr in public {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = format!("connecting to {addr}: {e}"),
        }
    }
    Err(("502 Bad Gateway", last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_allowlist_entries_are_parsed_strictly() {
        for bad in [
            "",
            "*",
            "*.",
            "https://index.crates.io",
            "index.crates.io/path",
            "a b",
            "host:0",
            "host:99999",
            "host:",
            "[::1",
        ] {
            let error = EgressPolicy::new(&[bad])
                .err()
                .unwrap_or_else(|| panic!("{bad:?}"));
            assert!(error.to_string().contains(&format!("{bad:?}")), "{error}");
        }
        let policy = EgressPolicy::new(&["*.example.com", "mirror.example.org:8443"]).unwrap();
        assert!(policy.allows_host("a.example.com", 443));
        assert!(policy.allows_host("A.Example.Com.", 443));
        assert!(!policy.allows_host("example.com", 443));
        assert!(!policy.allows_host("badexample.com", 443));
        assert!(!policy.allows_host("a.example.com", 80));
        assert!(policy.allows_host("mirror.example.org", 8443));
        assert!(!policy.allows_host("mirror.example.org", 443));
    }

    #[test]
    fn internal_addresses() {
        assert!(!is_internal_ip("203.0.113.80".parse().unwrap()));
        assert!(!is_public_ip("203.0.113.80".parse().unwrap()));
        for internal in [
            "127.0.0.1",
            "10.0.0.1",
            "169.254.169.254",
            "::ffff:10.0.0.1",
            "fd00::1",
        ] {
            assert!(is_internal_ip(internal.parse().unwrap()), "{internal}");
        }
    }

    #[test]
    fn public_addresses() {
        for public in [
            "1.1.1.1",
            "151.101.1.137",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public_ip(public.parse().unwrap()), "{public}");
        }
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "fec0::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
            "2001::1",
            "ff02::1",
        ] {
            assert!(!is_public_ip(private.parse().unwrap()), "{private}");
        }
    }

    #[test]
    fn sources_against_the_default_allowlist() {
        let policy = EgressPolicy::new(&default_fetch_allowed_hosts()).unwrap();
        assert!(policy.check_source(CRATES_IO_SOURCE).is_ok());
        assert!(policy.check_source(CRATES_IO_SPARSE_SOURCE).is_ok());
        for (source, reason) in [
            ("sparse+http://127.0.0.1:8080/", "only https://"),
            (
                "registry+https://10.0.0.1/index",
                "10.0.0.1 is not a public address",
            ),
            ("sparse+https://[::1]/", "::1 is not a public address"),
            (
                "git+https://github.com/a/b?rev=1#abc",
                "github.com:443 is not in the fetch allowlist",
            ),
            ("git+ssh://git@github.com/a/b", "only https://"),
            ("git+file:///etc", "only https://"),
            (
                "sparse+https://index.crates.io.evil.test/",
                "not in the fetch allowlist",
            ),
            ("sparse+https://user:pw@index.crates.io/", "credentials"),
            (
                "sparse+https://index.crates.io:8443/",
                "index.crates.io:8443 is not",
            ),
            ("path+file:///x", "only https://"),
        ] {
            let refused = policy.check_source(source).unwrap_err();
            assert!(refused.contains(reason), "{source}: {refused}");
        }
        let mirrors =
            EgressPolicy::new(&["index.crates.io", "*.example.com", "git.test:8443"]).unwrap();
        assert!(mirrors.check_source("git+https://git.test:8443/x").is_ok());
        assert!(
            mirrors
                .check_source("sparse+https://mirror.example.com/")
                .is_ok()
        );
        assert!(mirrors.check_source("sparse+https://example.com/").is_err());
        assert!(
            mirrors
                .check_source("sparse+https://badexample.com/")
                .is_err()
        );
        assert!(EgressPolicy::new(&["bad host"]).is_err());
        assert!(EgressPolicy::new(&["host:0"]).is_err());
    }

    #[test]
    fn manifest_sources_found_anywhere() {
        let manifest: toml::Table = r#"
            [package]
            name = "x"
            [dependencies]
            a = { git = "https://g.test/a" }
            [target.'cfg(unix)'.build-dependencies]
            b = { version = "1", registry-index = "sparse+http://127.0.0.1:1/" }
            [workspace.dependencies]
            c = { version = "1", registry-index = "https://r.test/index" }
            [patch.'https://p.test/index']
            d = { path = "d" }
            [patch.crates-io]
            e = { git = "ssh://git@e.test/e" }
        "#
        .parse()
        .unwrap();
        let mut sources = manifest_sources(&manifest);
        sources.sort();
        assert_eq!(
            sources,
            [
                "git+https://g.test/a",
                "git+ssh://git@e.test/e",
                "https://p.test/index",
                "registry+https://r.test/index",
                "sparse+http://127.0.0.1:1/",
            ]
        );
    }
}
