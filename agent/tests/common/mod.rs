//! Helpers shared by the agent's integration tests: nodes on loopback, clients, fixtures.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;
use rba_agent::client::{RemoteClient, SessionResult};
use rba_agent::config::{NodeConfig, TrustedPeer};
use rba_agent::node::Node;
use rba_agent::p2p::session::{NodeError, SessionEvent};
use rba_cas::merkle::TreeBuild;
use rba_cas::{Cas, StoreConfig};
use rba_executor::cargo::JobKind;
use rba_proto::rba::v1::{JobOptions, LogLine, Submit};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// A crate whose test prints `lines` lines, `delay_ms` apart (run as `test -- --nocapture`).
pub fn slow_crate(dir: &Path, lines: u32, delay_ms: u64) -> PathBuf {
    let root = dir.join("slow");
    std::fs::create_dir_all(root.join("src")).unwrap();
    std::fs::write(
        root.join("Cargo.toml"),
        "[package]\nname = \"slow\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n",
    )
    .unwrap();
    std::fs::write(
        root.join("Cargo.lock"),
        "version = 4\n\n[[package]]\nname = \"slow\"\nversion = \"0.1.0\"\n",
    )
    .unwrap();
    std::fs::write(
        root.join("src/lib.rs"),
        format!(
            "#[test]\nfn slow_lines() {{\n    for i in 0..{lines} {{\n        println!(\"slow line {{i}}\");\n        std::thread::sleep(std::time::Duration::from_millis({delay_ms}));\n    }}\n}}\n"
        ),
    )
    .unwrap();
    root
}

/// A node on loopback (port 0) under `dir`.
pub async fn node(dir: &Path, trusted: &[&Node]) -> Node {
    node_with(dir, trusted, |_| {}).await
}

pub async fn node_with(dir: &Path, trusted: &[&Node], tweak: impl FnOnce(&mut NodeConfig)) -> Node {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RBA_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
    let mut config = NodeConfig::ephemeral(dir);
    config.servers.reapi = None;
    config.servers.libp2p = vec!["/ip4/127.0.0.1/tcp/0".to_string()];
    config.trusted_peers = trusted
        .iter()
        .map(|peer| TrustedPeer {
            peer_id: peer.peer_id().to_string(),
            addresses: peer
                .shared()
                .network
                .listen_addrs()
                .iter()
                .map(ToString::to_string)
                .collect(),
        })
        .collect();
    tweak(&mut config);
    Node::start(config).await.expect("node starts")
}

/// A client with its own local CAS.
pub struct Client {
    pub remote: RemoteClient,
    pub cas: Cas,
    _dir: tempfile::TempDir,
}

impl Client {
    pub async fn connect(node: &Node) -> Client {
        Self::connect_as(node, Keypair::generate_ed25519()).await
    }

    /// A client with a given libp2p identity (its tenant is `peer:{its PeerId}`).
    pub async fn connect_as(node: &Node, keypair: Keypair) -> Client {
        let target = node.tcp_addr().unwrap().to_string();
        let remote = RemoteClient::connect(keypair, &target).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cas = Cas::open(dir.path().join("cas"), StoreConfig::without_fsync()).unwrap();
        Client {
            remote,
            cas,
            _dir: dir,
        }
    }

    pub async fn hash(&self, path: &Path) -> TreeBuild {
        rba_agent::workspace::hash_workspace(&self.cas, path, true)
            .await
            .unwrap()
    }

    pub fn submit(kind: JobKind, tree: &TreeBuild, extra: &[&str]) -> Submit {
        Submit {
            kind: kind.to_proto() as i32,
            options: Some(JobOptions {
                release: false,
                extra_args: extra.iter().map(|s| s.to_string()).collect(),
            }),
            input_root: Some(tree.root.to_wire()),
            workspace_hint: "fixture".to_string(),
            limits: None,
        }
    }

    /// Hashes `path`, runs `kind` on it, and returns the result with every event in order.
    pub async fn run(
        &self,
        kind: JobKind,
        path: &Path,
        extra: &[&str],
    ) -> (SessionResult, Vec<SessionEvent>) {
        let tree = self.hash(path).await;
        let mut events = Vec::new();
        let result = self
            .remote
            .run(
                &self.cas.blobs,
                &tree.blobs,
                Self::submit(kind, &tree, extra),
                |e| events.push(e.clone()),
            )
            .await
            .unwrap();
        (result, events)
    }

    /// Submits a build of `tree` naming its root only (uploading nothing, whatever the node
    /// asks for) and returns the node's refusal.
    pub async fn refusal_without_upload(&self, tree: &TreeBuild) -> NodeError {
        let error = self
            .remote
            .run(
                &self.cas.blobs,
                &[],
                Self::submit(JobKind::Build, tree, &[]),
                |_| {},
            )
            .await
            .expect_err("refused");
        error
            .downcast_ref::<NodeError>()
            .expect("an Error frame")
            .clone()
    }
}

pub fn lines_of(events: &[SessionEvent]) -> Vec<LogLine> {
    events
        .iter()
        .filter_map(|e| match e {
            SessionEvent::Line(l) => Some(l.clone()),
            _ => None,
        })
        .collect()
}

/// The log stored under `digest` on `node`.
pub fn stored_log(node: &Node, digest: &rba_cas::Digest) -> Vec<rba_executor::logstream::LogLine> {
    let bytes = node
        .shared()
        .cas
        .blobs
        .read_to_vec(digest, 1 << 30)
        .unwrap();
    rba_executor::logstream::parse_log_blob(&bytes).unwrap()
}

/// The lines of a session's stored log on `node`.
pub fn stored_lines(node: &Node, result: &SessionResult) -> Vec<(u64, String)> {
    let digest = rba_cas::Digest::from_wire(result.body().log_digest.as_ref().unwrap()).unwrap();
    stored_log(node, &digest)
        .into_iter()
        .map(|l| (l.seq, l.line))
        .collect()
}

/// A raw HTTP/1.1 request on loopback (no client library between the test and the node's
/// bytes); `(status, head lower-cased, body)`, a chunked body joined.
pub async fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text[9..12].parse().unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, head, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    out
}
