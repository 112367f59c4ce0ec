//! `rba-bench`: end-to-end `rba build` over libp2p on loopback against a local `cargo build`
//! of the same fixture, measured in one run.
//!
//! For each fixture (copied to a scratch directory so it can be edited) it measures:
//! - cold: a fresh node and client (empty CAS, empty target cache) vs `cargo build` with an
//!   empty target directory;
//! - one-line change: a comment line appended to one source file, rebuilt incrementally on
//!   both sides;
//! - unchanged: the same tree again (an action-cache hit remotely; a no-op `cargo build`
//!   locally);
//! - bytes uploaded by the resubmission after the one-file change vs that file's size;
//! - the binary in the local target dir: a cold remote build plus fetching its artifacts
//!   into a local target dir (what `rba build --remote` leaves behind) vs a cold local build.
//!
//! The one-line change and the unchanged case are the medians of [`ROUNDS`] rounds, local
//! and remote alternating.
//!
//! The remote side is the whole client path: hashing the workspace, `Submit`, `Has`, upload,
//! streaming every line to the end event. Usage: `rba-bench [FIXTURE…]` (default: `hello`
//! and `midsize`, a workspace with registry dependencies, from `tests/fixtures`).
//!
//! `rba-bench execute` measures `POST /execute` end to end over HTTP on loopback instead: a
//! cached hello world (the compilation an action-cache hit, only the run happens), a new
//! snippet each time against `rustc -O` + running it locally, and the sandbox's own start and
//! stop (the fixed cost every run pays).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use libp2p::identity::Keypair;
use rba_agent::artifacts::{Artifact, land};
use rba_agent::client::{RemoteClient, SessionResult};
use rba_agent::config::NodeConfig;
use rba_agent::node::Node;
use rba_agent::workspace::hash_workspace;
use rba_cas::{Cas, StoreConfig};
use rba_executor::cargo::JobKind;
use rba_proto::rba::v1::{JobOptions, JobStatus, Submit};

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            if entry.file_name() != "target" {
                copy_dir(&entry.path(), &target)?;
            }
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// The file a one-line change goes into: the binary's main, else the first `lib.rs`.
fn file_to_change(root: &Path) -> anyhow::Result<PathBuf> {
    for candidate in [
        "src/main.rs",
        "app/src/main.rs",
        "cli/src/main.rs",
        "src/lib.rs",
    ] {
        if root.join(candidate).is_file() {
            return Ok(root.join(candidate));
        }
    }
    anyhow::bail!("no source file to change under {}", root.display())
}

fn append_line(path: &Path, line: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().append(true).open(path)?;
    writeln!(file, "{line}")?;
    Ok(())
}

fn local_cargo_build(root: &Path, target: &Path) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let status = std::process::Command::new("cargo")
        .arg("build")
        .arg("--quiet")
        .arg("--offline")
        .env("CARGO_TARGET_DIR", target)
        .current_dir(root)
        .status()
        .context("running cargo")?;
    anyhow::ensure!(status.success(), "local cargo build failed");
    Ok(started.elapsed())
}

struct Remote {
    client: RemoteClient,
    cas: Cas,
}

impl Remote {
    async fn build(&self, root: &Path) -> anyhow::Result<(Duration, SessionResult)> {
        let started = Instant::now();
        let tree = hash_workspace(&self.cas, root, true).await?;
        let submit = Submit {
            kind: JobKind::Build.to_proto() as i32,
            options: Some(JobOptions::default()),
            input_root: Some(tree.root.to_wire()),
            workspace_hint: "bench".to_string(),
            limits: None,
        };
        let result = self
            .client
            .run(&self.cas.blobs, &tree.blobs, submit, |_| {})
            .await?;
        anyhow::ensure!(
            result.body().status == JobStatus::Success as i32,
            "remote build failed"
        );
        Ok((started.elapsed(), result))
    }
}

/// Rounds of the incremental cases (medians).
const ROUNDS: usize = 7;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

struct Row {
    what: &'static str,
    local: Duration,
    remote: Duration,
    note: String,
}

async fn bench(fixture: &Path, scratch: &Path) -> anyhow::Result<()> {
    let name = fixture.file_name().unwrap().to_string_lossy().to_string();
    let local_src = scratch.join(format!("{name}-local"));
    let remote_src = scratch.join(format!("{name}-remote"));
    copy_dir(fixture, &local_src)?;
    copy_dir(fixture, &remote_src)?;
    let local_target = scratch.join(format!("{name}-target"));

    let mut config = NodeConfig::ephemeral(scratch.join(format!("{name}-node")));
    config.servers.libp2p = vec!["/ip4/127.0.0.1/tcp/0".to_string()];
    config.servers.http = None;
    config.servers.reapi = None;
    let node = Node::start(config).await?;
    let client = RemoteClient::connect(
        Keypair::generate_ed25519(),
        &node.tcp_addr().context("node address")?.to_string(),
    )
    .await?;
    let cas = Cas::open(
        scratch.join(format!("{name}-client/cas")),
        StoreConfig::without_fsync(),
    )?;
    let remote = Remote { client, cas };
    let mut rows = Vec::new();

    let local = local_cargo_build(&local_src, &local_target)?;
    let (took, cold) = remote.build(&remote_src).await?;
    rows.push(Row {
        what: "cold",
        local,
        remote: took,
        note: format!(
            "uploaded {} blobs, {} bytes",
            cold.upload.uploaded, cold.upload.bytes
        ),
    });
    // The artifacts of that build into a local target dir, fetched from the node.
    let landing = Instant::now();
    let artifacts: Vec<_> = cold
        .body()
        .artifacts
        .iter()
        .map(|a| (a.path.clone(), Artifact::from_wire(a)))
        .collect();
    let landed = land(
        &scratch.join(format!("{name}-landed")),
        &artifacts,
        &remote.cas.blobs,
        false,
        |digests| {
            let (client, store) = (remote.client.clone(), remote.cas.blobs.clone());
            async move { client.fetch_missing(&store, &digests).await.map(|_| ()) }
        },
    )
    .await?;
    let bytes: u64 = artifacts
        .iter()
        .filter_map(|(_, a)| a.as_ref().map(|a| a.digest.size))
        .sum();
    rows.push(Row {
        what: "cold, binary in the local target dir",
        local,
        remote: took + landing.elapsed(),
        note: format!(
            "{} artifact(s), {} bytes fetched in {:.3} s",
            landed.len(),
            bytes,
            landing.elapsed().as_secs_f64()
        ),
    });

    let changed_local = file_to_change(&local_src)?;
    let changed_remote = file_to_change(&remote_src)?;
    let (mut locals, mut remotes) = (Vec::new(), Vec::new());
    let mut last_upload = None;
    for round in 0..ROUNDS {
        append_line(&changed_local, &format!("// one-line change {round}"))?;
        append_line(&changed_remote, &format!("// one-line change {round}"))?;
        locals.push(local_cargo_build(&local_src, &local_target)?);
        let (took, changed) = remote.build(&remote_src).await?;
        anyhow::ensure!(
            !changed.body().cache_hit,
            "a changed tree cannot be a cache hit"
        );
        remotes.push(took);
        last_upload = Some(changed.upload);
    }
    let file_size = std::fs::metadata(&changed_remote)?.len();
    let upload = last_upload.expect("at least one round");
    rows.push(Row {
        what: "one-line change",
        local: median(locals),
        remote: median(remotes),
        note: format!(
            "median of {ROUNDS}; uploaded {} blobs, {} bytes for a {} byte file ({:.2}x)",
            upload.uploaded,
            upload.bytes,
            file_size,
            upload.bytes as f64 / file_size as f64
        ),
    });

    let (mut locals, mut remotes) = (Vec::new(), Vec::new());
    let mut hits = 0;
    for _ in 0..ROUNDS {
        locals.push(local_cargo_build(&local_src, &local_target)?);
        let (took, unchanged) = remote.build(&remote_src).await?;
        hits += usize::from(unchanged.body().cache_hit);
        remotes.push(took);
    }
    rows.push(Row {
        what: "unchanged",
        local: median(locals),
        remote: median(remotes),
        note: format!("median of {ROUNDS}; cache hits: {hits}/{ROUNDS}"),
    });

    println!("\n## {name}");
    println!(
        "| case | local cargo build | rba build --remote (loopback) | remote / local | notes |"
    );
    println!("|---|---|---|---|---|");
    for row in rows {
        println!(
            "| {} | {:.3} s | {:.3} s | {:.2} | {} |",
            row.what,
            row.local.as_secs_f64(),
            row.remote.as_secs_f64(),
            row.remote.as_secs_f64() / row.local.as_secs_f64(),
            row.note
        );
    }
    node.shutdown().await?;
    Ok(())
}

/// One `POST /execute` with a bearer token over plain HTTP/1.1; the answer's JSON.
async fn post_execute(
    addr: std::net::SocketAddr,
    token: &str,
    body: &serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = body.to_string();
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!(
                "POST /execute HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    let (head, json) = text
        .split_once("\r\n\r\n")
        .context("HTTP answer without a body")?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "{head}: {json}");
    Ok(serde_json::from_str(json)?)
}

/// `rba-bench execute`.
async fn bench_execute(scratch: &Path) -> anyhow::Result<()> {
    const TOKEN: &str = "bench-runner-token";
    let mut config = NodeConfig::ephemeral(scratch.join("execute-node"));
    config.servers.reapi = None;
    config.servers.libp2p = vec!["/ip4/127.0.0.1/tcp/0".to_string()];
    config.auth.tokens = vec![rba_cache_server::config::TokenConfig {
        name: "bench".into(),
        token: TOKEN.into(),
        access: rba_cache_server::auth::Access::ReadWrite,
        tenants: Vec::new(),
    }];
    let node = Node::start(config).await?;
    let http = node.http_addr().context("the node has an HTTP port")?;
    let snippet = |n: usize| format!("fn main() {{ println!(\"hello {n}\"); }}");

    // Cached: the same code; the first call compiles, the rest only run.
    let hello = serde_json::json!({"language": "rust", "code": snippet(0)});
    let first = post_execute(http, TOKEN, &hello).await?;
    anyhow::ensure!(first["status"] == "success", "{first}");
    let mut cached = Vec::new();
    for _ in 0..ROUNDS * 3 {
        let started = Instant::now();
        let answer = post_execute(http, TOKEN, &hello).await?;
        cached.push(started.elapsed());
        anyhow::ensure!(answer["compile_cached"] == true, "{answer}");
    }

    // Uncached: new code each time, against rustc -O and a run of the same code locally.
    let (mut remote, mut local) = (Vec::new(), Vec::new());
    let local_dir = scratch.join("execute-local");
    std::fs::create_dir_all(&local_dir)?;
    for round in 1..=ROUNDS {
        let code = snippet(round);
        let started = Instant::now();
        let answer = post_execute(
            http,
            TOKEN,
            &serde_json::json!({"language": "rust", "code": code}),
        )
        .await?;
        remote.push(started.elapsed());
        anyhow::ensure!(answer["compile_cached"] == false, "{answer}");

        let source = local_dir.join(format!("main{round}.rs"));
        let binary = local_dir.join(format!("main{round}"));
        std::fs::write(&source, &code)?;
        let started = Instant::now();
        let compiled = std::process::Command::new("rustc")
            .args(["-O", "--edition", "2021", "-o"])
            .arg(&binary)
            .arg(&source)
            .status()?;
        anyhow::ensure!(compiled.success(), "local rustc failed");
        let ran = std::process::Command::new(&binary).output()?;
        local.push(started.elapsed());
        anyhow::ensure!(ran.status.success(), "local run failed");
    }

    // The sandbox's own start and stop, with the node's default provider.
    let sandbox = rba_executor::sandbox::Sandbox::new(
        rba_executor::sandbox::SandboxConfig::with_host_toolchain()?,
    )?;
    let mut starts = Vec::new();
    for _ in 0..ROUNDS * 3 {
        let started = Instant::now();
        let outcome = sandbox
            .run(rba_executor::sandbox::SandboxSpec::new(["true"]), |_| {})
            .await?;
        starts.push(started.elapsed());
        anyhow::ensure!(outcome.success(), "sandbox run of `true` failed");
    }
    let (cached, remote, local, start) = (
        median(cached),
        median(remote),
        median(local),
        median(starts),
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("POST /execute on loopback (medians)");
    println!(
        "  cached hello world           {:>8.1} ms   = sandbox start/stop {:.1} ms + {:.1} ms (goal: + 50 ms at most)",
        ms(cached),
        ms(start),
        ms(cached.saturating_sub(start))
    );
    println!(
        "  new snippet, compile + run   {:>8.1} ms   vs rustc -O + run locally {:.1} ms: {:.2}x",
        ms(remote),
        ms(local),
        remote.as_secs_f64() / local.as_secs_f64()
    );
    node.shutdown().await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("execute") {
        let scratch = tempfile::tempdir()?;
        return bench_execute(scratch.path()).await;
    }
    let fixtures_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let mut fixtures: Vec<PathBuf> = std::env::args()
        .skip(1)
        .map(|name| {
            let path = PathBuf::from(&name);
            if path.is_dir() {
                path
            } else {
                fixtures_dir.join(name)
            }
        })
        .collect();
    if fixtures.is_empty() {
        fixtures = vec![fixtures_dir.join("hello"), fixtures_dir.join("midsize")];
    }
    let scratch = tempfile::tempdir()?;
    for fixture in &fixtures {
        bench(fixture, scratch.path())
            .await
            .with_context(|| format!("benchmarking {}", fixture.display()))?;
    }
    Ok(())
}
