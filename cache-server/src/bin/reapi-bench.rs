//! `reapi-bench`: figures for any REAPI endpoint, one line per figure.
//!
//! With no `--endpoint` it starts our own server embedded on loopback (data in a temp
//! directory), so the peak RSS it reports is the whole process's (server and bench client).
//! For an external server pass `--server-pid` to read that process's peak RSS instead.
//!
//! Figures:
//! - ByteStream write and read of a 1 GiB blob (the read on a connection and a client thread
//!   of its own, hashing on a second one: the client verifies the digest of what it reads),
//!   as MiB/s and as a ratio to the raw hash + disk write of the same bytes in the same run,
//!   and (with `--server-pid`) the server's CPU seconds per GiB of each: what the server
//!   spends, apart from the client that shares this machine's cores;
//! - the same read once more by a client that only counts the bytes (`_unverified`): what the
//!   server can send when the client spends nothing on them; and the rate one core hashes the
//!   blob in memory (`raw_sha256_hash_…`), the ceiling of any verified single-stream read here;
//! - with `--versus` (a second endpoint) and `--paired-reads N`, the verified single-stream
//!   read again, the same blob from both endpoints in turn for N rounds (who goes first
//!   alternating), and the median of each side and of the per-round ratios: the two servers
//!   read a few seconds apart each round, so a host that steals CPU for a while slows both
//!   sides of a round, not one endpoint's whole run;
//! - the same blob read by several concurrent streams (`--read-streams`, default 4), each
//!   verified on its own task: the aggregate MiB/s a build fetching many outputs at once sees,
//!   which one stream cannot show on a machine where the client shares the server's cores;
//! - BatchUpdateBlobs of 10,000 4 KiB blobs (blobs/s), batches sized by the server's
//!   advertised `max_batch_total_size_bytes`;
//! - FindMissingBlobs from 200 concurrent tasks × 100 calls, 1 and 1,000 digests per call,
//!   and from one task asking about 10,000 digests per call: mean and p99 latency (every
//!   request is built and encoded before the clock starts, and sent as those bytes);
//! - last, peak RSS (VmHWM, reset before the phase) while writing and reading a 4 GiB blob.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::BodyExt;
use prost::Message;
use rba_cache_server::bytestream_route::{ReadResponseDecoder, grpc_message, message_frames};
use rba_cache_server::resource_name::{self, Compressor};
use rba_cache_server::{Config, Server};
use rba_cas::{Digest, DigestFunction};
use rba_proto::bytestream::{ReadRequest, WriteRequest, WriteResponse};
use rba_proto::reapi::capabilities_client::CapabilitiesClient;
use rba_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use rba_proto::reapi::{
    BatchUpdateBlobsRequest, FindMissingBlobsRequest, FindMissingBlobsResponse,
    GetCapabilitiesRequest, batch_update_blobs_request,
};
use tonic::Request;
use tonic::codegen::{Service, http};
use tonic::transport::{Channel, Endpoint};

const MIB: f64 = (1 << 20) as f64;
const READ_PATH: &str = "/google.bytestream.ByteStream/Read";
const WRITE_PATH: &str = "/google.bytestream.ByteStream/Write";
const FIND_MISSING_PATH: &str =
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs";
const CHUNK: usize = 1 << 20;
const BLOCK: usize = 8 << 20;

#[derive(Parser, Debug)]
#[command(
    name = "reapi-bench",
    about = "Throughput, memory and latency figures for a REAPI v2 endpoint",
    // A flag given twice takes its last value, so `BENCH_ARGS` can override the figures the
    // bench scripts choose.
    args_override_self = true
)]
struct Args {
    /// REAPI endpoint (grpc://HOST:PORT); without it our server runs embedded on loopback.
    #[arg(long)]
    endpoint: Option<String>,
    /// Instance name.
    #[arg(long, default_value = "")]
    instance: String,
    /// Digest function: sha256 or blake3.
    #[arg(long, default_value = "sha256")]
    digest_function: String,
    /// Bearer token for the endpoint.
    #[arg(long, env = "REAPI_BENCH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Size of the throughput blob, GiB.
    #[arg(long, default_value_t = 1.0)]
    throughput_gib: f64,
    /// Concurrent ByteStream reads of the throughput blob for the aggregate read figure (1 or
    /// 0 skips it).
    #[arg(long, default_value_t = 4)]
    read_streams: usize,
    /// A second endpoint (grpc://HOST:PORT, called with the same `--token`, if any) to compare
    /// the verified single-stream read with, round by round (see `--paired-reads`).
    #[arg(long, requires = "paired_reads")]
    versus: Option<String>,
    /// Rounds of the paired read: the throughput blob is written to `--versus` as well, then
    /// read from both endpoints in turn, one verified stream at a time, this many times each.
    #[arg(long, default_value_t = 0, requires = "versus")]
    paired_reads: usize,
    /// Size of the blob streamed for the peak-RSS figure, GiB (0 skips it).
    #[arg(long, default_value_t = 4.0)]
    big_blob_gib: f64,
    /// Blobs for the BatchUpdateBlobs figure.
    #[arg(long, default_value_t = 10_000)]
    batch_blobs: usize,
    /// Size of each of those blobs.
    #[arg(long, default_value_t = 4096)]
    batch_blob_size: usize,
    /// Concurrent FindMissingBlobs tasks.
    #[arg(long, default_value_t = 200)]
    find_tasks: usize,
    /// Calls per task.
    #[arg(long, default_value_t = 100)]
    find_calls: usize,
    /// PID of an external server, to report its peak RSS.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Directory for the embedded server's data and the raw-write baseline (default: a temp dir).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// fsync each blob in the embedded server (and in the raw baseline).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    fsync: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RBA_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

#[derive(Clone)]
struct Bench {
    channel: Channel,
    instance: String,
    function: DigestFunction,
    token: Option<String>,
    block: Bytes,
    nonce: u64,
}

impl Bench {
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = &self.token {
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {token}").parse().expect("valid token"),
            );
        }
        request
    }

    /// Chunk `index` of the deterministic blob of this run (unique per run by its nonce): a
    /// slice of the block, no copy, except the first chunk, which starts with the nonce.
    fn chunk(&self, index: u64, size: u64) -> Bytes {
        let start = index * CHUNK as u64;
        let len = (size - start).min(CHUNK as u64) as usize;
        let offset = (start % BLOCK as u64) as usize;
        let data = self.block.slice(offset..offset + len);
        if index != 0 {
            return data;
        }
        let mut data = data.to_vec();
        let nonce = self.nonce.to_le_bytes();
        let n = nonce.len().min(data.len());
        data[..n].copy_from_slice(&nonce[..n]);
        Bytes::from(data)
    }

    fn chunks(size: u64) -> u64 {
        size.div_ceil(CHUNK as u64)
    }

    /// Hashes the blob and writes it to a file (the raw baseline); returns digest and seconds.
    fn raw_hash_and_write(
        &self,
        size: u64,
        path: &std::path::Path,
        fsync: bool,
    ) -> anyhow::Result<(Digest, f64)> {
        let start = Instant::now();
        let mut hasher = self.function.hasher();
        let mut file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        for index in 0..Self::chunks(size) {
            let chunk = self.chunk(index, size);
            hasher.update(&chunk);
            file.write_all(&chunk)?;
        }
        if fsync {
            file.sync_all()?;
        }
        let elapsed = start.elapsed().as_secs_f64();
        drop(file);
        let _ = std::fs::remove_file(path);
        Ok((hasher.finish(), elapsed))
    }

    /// Seconds one core takes to hash `size` bytes already in memory: a client that verifies
    /// what it reads cannot receive one stream faster than this, whatever the server.
    fn hash_alone(&self, size: u64) -> f64 {
        let mut hasher = self.function.hasher();
        let start = Instant::now();
        let mut left = size;
        while left > 0 {
            let len = left.min(BLOCK as u64) as usize;
            hasher.update(&self.block[..len]);
            left -= len as u64;
        }
        std::hint::black_box(hasher.finish());
        start.elapsed().as_secs_f64()
    }

    fn digest_of_blob(&self, size: u64) -> Digest {
        let mut hasher = self.function.hasher();
        for index in 0..Self::chunks(size) {
            hasher.update(&self.chunk(index, size));
        }
        hasher.finish()
    }

    /// Writes the blob in one ByteStream.Write of [`CHUNK`]-byte messages. The request body
    /// is framed here ([`message_frames`]): each message's fields and data header as one small
    /// frame, then its data as a slice of the bench's block, where tonic's encoder would copy
    /// every message into a buffer of its own, a fixed cost of this client that on a 2-core
    /// machine comes out of every server's figure alike (as [`Bench::read_blob`] decodes).
    async fn write_blob(&self, digest: Digest) -> anyhow::Result<f64> {
        let name = resource_name::write_name(
            &self.instance,
            &uuid::Uuid::new_v4().to_string(),
            &digest,
            Compressor::Identity,
        );
        let this = self.clone();
        let size = digest.size;
        let total = Self::chunks(size);
        let frames = futures::stream::iter((0..total).flat_map(move |index| {
            let fields = WriteRequest {
                resource_name: if index == 0 {
                    name.clone()
                } else {
                    String::new()
                },
                write_offset: (index * CHUNK as u64) as i64,
                finish_write: index + 1 == total,
                data: Vec::new(),
            }
            .encode_to_vec();
            let (header, data) = message_frames(&fields, this.chunk(index, size));
            [header, data]
                .into_iter()
                .filter(|frame| !frame.is_empty())
                .map(|frame| Ok::<_, std::convert::Infallible>(http_body::Frame::data(frame)))
        }));
        let start = Instant::now();
        let response: WriteResponse = self
            .raw_response(
                WRITE_PATH,
                tonic::body::Body::new(http_body_util::StreamBody::new(frames)),
            )
            .await?;
        let elapsed = start.elapsed().as_secs_f64();
        if response.committed_size != size as i64 {
            bail!(
                "server committed {} of {size} bytes",
                response.committed_size
            );
        }
        Ok(elapsed)
    }

    /// The method at `path` called over raw HTTP/2 with `body`, headed as tonic would head
    /// it (and with the bench's token): the response, unless it is a refusal without a body.
    async fn raw_call(
        &self,
        path: &'static str,
        body: tonic::body::Body,
    ) -> anyhow::Result<http::Response<tonic::body::Body>> {
        let mut request = http::Request::post(path)
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request.body(body)?;
        let mut channel = self.channel.clone();
        std::future::poll_fn(|cx| channel.poll_ready(cx))
            .await
            .with_context(|| format!("{path}: channel"))?;
        let response = channel.call(request).await.context(path)?;
        if let Some(status) = tonic::Status::from_header_map(response.headers()) {
            bail!("{path}: {status}");
        }
        Ok(response)
    }

    /// The one response message of the method at `path` called with `body` (a unary
    /// request, or a client stream).
    async fn raw_response<T: Message + Default>(
        &self,
        path: &'static str,
        body: tonic::body::Body,
    ) -> anyhow::Result<T> {
        let answer = self
            .raw_call(path, body)
            .await?
            .into_body()
            .collect()
            .await
            .with_context(|| format!("{path}: the response body"))?;
        call_status(path, answer.trailers())?;
        let body = answer.to_bytes();
        body.get(5..)
            .and_then(|message| T::decode(message).ok())
            .with_context(|| format!("{path}: {} bytes that are no response", body.len()))
    }

    /// [`Bench::read_blob`] on a connection and a thread of its own (a current-thread runtime):
    /// receiving and decoding run on one thread, hashing on another, and nothing else of the
    /// bench's runtime is scheduled between them, as in a client built for one download.
    async fn read_blob_alone(
        &self,
        url: &str,
        digest: Digest,
        verify: bool,
    ) -> anyhow::Result<f64> {
        let (bench, url) = (self.clone(), url.to_string());
        tokio::task::spawn_blocking(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(async move {
                    let channel = connect(&url).await?;
                    Bench { channel, ..bench }.read_blob(digest, verify).await
                })
        })
        .await?
    }

    /// Reads the blob in one ByteStream.Read; with `verify`, hashes what arrives (on a thread
    /// of its own, beside receiving, as a client that verifies its downloads would) and fails
    /// unless it is the digest. The response body is decoded here
    /// ([`ReadResponseDecoder`]): each piece of data is hashed as a slice of the HTTP/2 frame
    /// it came in, where tonic's decoder would first copy every message into a buffer of its
    /// own, a fixed cost of this client that on a 2-core machine comes out of every server's
    /// figure alike.
    async fn read_blob(&self, digest: Digest, verify: bool) -> anyhow::Result<f64> {
        let message = ReadRequest {
            resource_name: resource_name::read_name(&self.instance, &digest, Compressor::Identity),
            read_offset: 0,
            read_limit: 0,
        }
        .encode_to_vec();
        let start = Instant::now();
        let response = self
            .raw_call(
                READ_PATH,
                tonic::body::Body::new(http_body_util::Full::new(Bytes::from(grpc_message(
                    &message,
                )))),
            )
            .await?;
        let mut body = response.into_body();
        let (chunks, mut received) = tokio::sync::mpsc::channel::<Bytes>(8);
        let function = self.function;
        let hashing = verify.then(|| {
            tokio::task::spawn_blocking(move || {
                let mut hasher = function.hasher();
                while let Some(chunk) = received.blocking_recv() {
                    hasher.update(&chunk);
                }
                hasher.finish()
            })
        });
        let mut decoder = ReadResponseDecoder::new();
        let (mut pieces, mut size) = (Vec::new(), 0u64);
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.context("ByteStream.Read: the response body")?;
            let frame = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    trailers = frame.into_trailers().ok();
                    continue;
                }
            };
            decoder
                .push(&frame, |piece| pieces.push(piece))
                .map_err(|e| anyhow::anyhow!("ByteStream.Read: {e}"))?;
            for piece in pieces.drain(..) {
                size += piece.len() as u64;
                if verify && chunks.send(piece).await.is_err() {
                    bail!("the hashing thread stopped");
                }
            }
        }
        decoder
            .finish()
            .map_err(|e| anyhow::anyhow!("ByteStream.Read: {e}"))?;
        call_status(READ_PATH, trailers.as_ref())?;
        drop(chunks);
        let actual = match hashing {
            Some(hashing) => Some(hashing.await.context("hashing the read")?),
            None => None,
        };
        let elapsed = start.elapsed().as_secs_f64();
        if size != digest.size {
            bail!("read back {size} of {} bytes", digest.size);
        }
        if let Some(actual) = actual
            && actual != digest
        {
            bail!("read back {actual:?}, expected {digest:?}");
        }
        Ok(elapsed)
    }
}

/// The verified single-stream read of `digest` from `url` and from `versus` in turn, `rounds`
/// times each (who reads first alternating), after writing the blob to `versus`: each round's
/// MiB/s and ratio, then the medians.
async fn paired_reads(
    bench: &Bench,
    url: &str,
    versus: &str,
    digest: Digest,
    rounds: usize,
    gib: f64,
) -> anyhow::Result<()> {
    let versus = versus.replacen("grpc://", "http://", 1);
    let theirs = Bench {
        channel: connect(&versus).await?,
        ..bench.clone()
    };
    theirs
        .write_blob(digest)
        .await
        .with_context(|| format!("writing the paired-read blob to {versus}"))?;
    let size = digest.size as f64 / MIB;
    let (mut ours, mut others, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let mut rates = [0.0; 2];
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            let (reader, from) = if side == 0 {
                (bench, url)
            } else {
                (&theirs, versus.as_str())
            };
            rates[side] = size / reader.read_blob_alone(from, digest, true).await?;
        }
        let ratio = rates[0] / rates[1];
        println!(
            "bytestream_read_{gib}GiB_paired_round_{}: {:.1} MiB/s vs {:.1} MiB/s = {ratio:.2}x",
            round + 1,
            rates[0],
            rates[1],
        );
        ours.push(rates[0]);
        others.push(rates[1]);
        ratios.push(ratio);
    }
    println!(
        "bytestream_read_{gib}GiB_paired: {:.1} MiB/s vs {:.1} MiB/s at {versus}, median ratio {:.2}x ({rounds} rounds, each endpoint read in turn, verified)",
        median(&mut ours),
        median(&mut others),
        median(&mut ratios)
    );
    Ok(())
}

/// The median of `values` (the mean of the middle two for an even count).
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[middle],
        _ => (values[middle - 1] + values[middle]) / 2.0,
    }
}

/// The call's end as its `trailers` tell it: OK, or the status as an error.
fn call_status(path: &str, trailers: Option<&http::HeaderMap>) -> anyhow::Result<()> {
    match trailers.and_then(tonic::Status::from_header_map) {
        Some(status) if status.code() == tonic::Code::Ok => Ok(()),
        Some(status) => bail!("{path}: {status}"),
        None => bail!("{path}: the response ended without a grpc-status"),
    }
}

/// A channel to `url` with windows and frames sized for large blobs, as a build tool's client
/// would set them (the same for every endpoint measured): HTTP/2's defaults (64 KiB windows,
/// 16 KiB frames) cap a loopback stream far below the disk's speed.
async fn connect(url: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(url.to_string())?
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .max_frame_size(Some((1 << 20) - 1))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))
}

/// CPU time (user + system) a process has used so far, in seconds, from `/proc/PID/stat`.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(proc_file(Some(pid), "stat")).ok()?;
    // The command name may hold spaces: the fields counted here follow its closing parenthesis.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    (ticks > 0).then(|| (utime + stime) as f64 / ticks as f64)
}

/// A `/proc/PID/…` file of the server (`None`: of this process).
fn proc_file(pid: Option<u32>, name: &str) -> String {
    match pid {
        Some(pid) => format!("/proc/{pid}/{name}"),
        None => format!("/proc/self/{name}"),
    }
}

/// A `kB` figure of `/proc/PID/status`, such as `VmHWM` or `VmRSS`.
fn status_kib(pid: Option<u32>, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(proc_file(pid, "status")).ok()?;
    let line = status.lines().find(|l| {
        l.strip_prefix(field)
            .is_some_and(|rest| rest.starts_with(':'))
    })?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn vm_hwm_kib(pid: Option<u32>) -> Option<u64> {
    status_kib(pid, "VmHWM")
}

fn vm_rss_kib(pid: Option<u32>) -> Option<u64> {
    status_kib(pid, "VmRSS")
}

/// Resets VmHWM to the current RSS (Linux: write 5 to clear_refs).
fn reset_hwm(pid: Option<u32>) -> bool {
    std::fs::write(proc_file(pid, "clear_refs"), "5").is_ok()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 * p).ceil() as usize)
        .saturating_sub(1)
        .min(sorted.len() - 1);
    sorted[index]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

async fn run(args: Args) -> anyhow::Result<()> {
    let function =
        DigestFunction::from_name(&args.digest_function).map_err(|e| anyhow::anyhow!("{e}"))?;
    // The FindMissing figures ask about the batch's digests, from these tasks and calls.
    for (flag, value) in [
        ("--batch-blobs", args.batch_blobs),
        ("--batch-blob-size", args.batch_blob_size),
        ("--find-tasks", args.find_tasks),
        ("--find-calls", args.find_calls),
    ] {
        if value == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    if args.versus.is_some() && args.paired_reads == 0 {
        bail!("--paired-reads must be at least 1 with --versus");
    }
    if !(args.throughput_gib > 0.0 && args.throughput_gib.is_finite()) {
        bail!("--throughput-gib must be a positive size");
    }
    let work = match &args.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            tempfile::tempdir_in(dir)?
        }
        None => tempfile::tempdir()?,
    };
    let (url, embedded) = match &args.endpoint {
        Some(endpoint) => (endpoint.replacen("grpc://", "http://", 1), None),
        None => {
            let mut config = Config {
                listen: "127.0.0.1:0".parse()?,
                metrics_listen: None,
                data_dir: work.path().join("server"),
                ..Config::default()
            };
            config.store.fsync = args.fsync;
            let server = Server::spawn(config).await?;
            (server.url(), Some(server))
        }
    };
    let server_pid = if embedded.is_some() {
        None
    } else {
        args.server_pid
    };
    // A PID that names no readable process would silently drop the server's figures.
    if let Some(pid) = server_pid
        && cpu_seconds(pid).is_none()
    {
        bail!("--server-pid {pid}: no process whose /proc/{pid}/stat can be read");
    }
    let channel = connect(&url).await?;
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    let bench = Bench {
        channel: channel.clone(),
        instance: args.instance.clone(),
        function,
        token: args.token.clone(),
        block: Bytes::from(noise(BLOCK, nonce)),
        nonce,
    };
    let server_label = if embedded.is_some() {
        "embedded rba cache-server".to_string()
    } else {
        url.clone()
    };
    println!(
        "# reapi-bench against {server_label}, digest function {function}, instance {:?}",
        args.instance
    );

    let mut caps_client = CapabilitiesClient::new(channel.clone());
    let caps = caps_client
        .get_capabilities(bench.request(GetCapabilitiesRequest {
            instance_name: args.instance.clone(),
        }))
        .await?
        .into_inner();
    let max_batch = caps
        .cache_capabilities
        .as_ref()
        .map(|c| c.max_batch_total_size_bytes)
        .unwrap_or(0);
    let max_batch = if max_batch <= 0 {
        4 << 20
    } else {
        max_batch as usize
    };

    // 1. Throughput vs the raw hash + disk write of the same bytes.
    let size = (args.throughput_gib * (1u64 << 30) as f64) as u64;
    let (digest, raw_secs) = tokio::task::block_in_place(|| {
        bench.raw_hash_and_write(size, &work.path().join("raw.bin"), args.fsync)
    })?;
    let raw = size as f64 / MIB / raw_secs;
    let hash_alone = size as f64 / MIB / bench.hash_alone(size);
    let cpu_before_write = server_pid.and_then(cpu_seconds);
    let write = size as f64 / MIB / bench.write_blob(digest).await?;
    let cpu_before_read = server_pid.and_then(cpu_seconds);
    let read = size as f64 / MIB / bench.read_blob_alone(&url, digest, true).await?;
    let cpu_after_read = server_pid.and_then(cpu_seconds);
    let read_unverified = size as f64 / MIB / bench.read_blob_alone(&url, digest, false).await?;
    let cpu_after_unverified = server_pid.and_then(cpu_seconds);
    let gib = args.throughput_gib;
    println!(
        "raw_{function}_hash_plus_disk_write_{gib}GiB: {raw:.1} MiB/s (baseline, fsync={})",
        args.fsync
    );
    println!(
        "raw_{function}_hash_{gib}GiB: {hash_alone:.1} MiB/s (one core hashing in memory: no verified single-stream read can be faster)"
    );
    println!(
        "bytestream_write_{gib}GiB: {write:.1} MiB/s = {:.2}x raw hash+write",
        write / raw
    );
    println!(
        "bytestream_read_{gib}GiB: {read:.1} MiB/s = {:.2}x raw hash+write (client verifies the digest)",
        read / raw
    );
    println!(
        "bytestream_read_{gib}GiB_unverified: {read_unverified:.1} MiB/s (the client counts the bytes, hashes nothing)"
    );
    // What one stream costs the server, whoever the client is: on this machine the client
    // shares the server's cores, so MiB/s of one stream is partly the client's figure.
    if let (Some(w), Some(r), Some(end)) = (cpu_before_write, cpu_before_read, cpu_after_read) {
        println!(
            "bytestream_write_{gib}GiB_server_cpu: {:.3} s/GiB (server process CPU per GiB written)",
            (r - w) / gib
        );
        println!(
            "bytestream_read_{gib}GiB_server_cpu: {:.3} s/GiB (server process CPU per GiB read)",
            (end - r) / gib
        );
        if let Some(after) = cpu_after_unverified {
            println!(
                "bytestream_read_{gib}GiB_unverified_server_cpu: {:.3} s/GiB (server process CPU per GiB read, unverified read)",
                (after - end) / gib
            );
        }
    }
    if let Some(versus) = &args.versus {
        paired_reads(&bench, &url, versus, digest, args.paired_reads, gib).await?;
    }
    if args.read_streams > 1 {
        let streams = args.read_streams;
        let start = Instant::now();
        let mut reads = tokio::task::JoinSet::new();
        for _ in 0..streams {
            let bench = bench.clone();
            reads.spawn(async move { bench.read_blob(digest, true).await });
        }
        while let Some(read) = reads.join_next().await {
            read??;
        }
        let aggregate = (streams as u64 * size) as f64 / MIB / start.elapsed().as_secs_f64();
        println!(
            "bytestream_read_{gib}GiB_x{streams}_streams: {aggregate:.1} MiB/s in all ({streams} concurrent reads of the blob, each verified)"
        );
    }

    // 2. BatchUpdateBlobs of many small blobs.
    let blobs: Vec<Vec<u8>> = (0..args.batch_blobs)
        .map(|i| {
            let mut blob = noise(args.batch_blob_size, nonce ^ (i as u64 + 1));
            blob[..8].copy_from_slice(&(nonce.wrapping_add(i as u64)).to_le_bytes());
            blob
        })
        .collect();
    let digests: Vec<Digest> = blobs.iter().map(|b| function.digest_of(b)).collect();
    let per_batch = (max_batch / (args.batch_blob_size + 100)).max(1);
    let start = Instant::now();
    let mut in_flight = tokio::task::JoinSet::new();
    for (chunk_blobs, chunk_digests) in blobs.chunks(per_batch).zip(digests.chunks(per_batch)) {
        let requests: Vec<_> = chunk_blobs
            .iter()
            .zip(chunk_digests)
            .map(|(data, digest)| batch_update_blobs_request::Request {
                digest: Some(digest.to_reapi()),
                data: data.clone(),
                compressor: 0,
            })
            .collect();
        let request = bench.request(BatchUpdateBlobsRequest {
            instance_name: args.instance.clone(),
            requests,
            digest_function: function.to_reapi() as i32,
        });
        let mut client = ContentAddressableStorageClient::new(channel.clone())
            .max_encoding_message_size(64 << 20)
            .max_decoding_message_size(64 << 20);
        in_flight.spawn(async move { client.batch_update_blobs(request).await });
        while in_flight.len() >= 4 {
            check_batch(in_flight.join_next().await.expect("a task"))?;
        }
    }
    while let Some(result) = in_flight.join_next().await {
        check_batch(result)?;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "batch_update_{}x{}B: {:.0} blobs/s ({:.1} MiB/s, {} blobs per batch, 4 batches in flight)",
        args.batch_blobs,
        args.batch_blob_size,
        args.batch_blobs as f64 / secs,
        (args.batch_blobs * args.batch_blob_size) as f64 / MIB / secs,
        per_batch
    );

    // 3. FindMissingBlobs latency under concurrency.
    let absent: Vec<Digest> = (0..1000u64)
        .map(|i| function.digest_of(&(nonce ^ !i).to_le_bytes()))
        .collect();
    // Many callers asking about 1 and 1,000 digests, then one caller asking about 10,000.
    let rounds = [
        (1usize, args.find_tasks),
        (1000, args.find_tasks),
        (10_000, 1),
    ];
    for (per_call, find_tasks) in rounds {
        // Every request is built and encoded before the clock starts (all tasks wait on one
        // barrier): the figure is the endpoint's, and on a 2-core machine a client encoding
        // 50,000 digests per round would take its CPU from the server it measures.
        let start_line = Arc::new(tokio::sync::Barrier::new(find_tasks + 1));
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..find_tasks {
            let requests: Vec<Bytes> = (0..args.find_calls)
                .map(|call| {
                    // 90% present, 10% absent, different per task and call.
                    let blob_digests: Vec<_> = (0..per_call)
                        .map(|k| {
                            let i = task * 7919 + call * 104_729 + k;
                            if k % 10 == 9 {
                                absent[i % absent.len()]
                            } else {
                                digests[i % digests.len()]
                            }
                        })
                        .map(|d| d.to_reapi())
                        .collect();
                    let request = FindMissingBlobsRequest {
                        instance_name: args.instance.clone(),
                        blob_digests,
                        digest_function: function.to_reapi() as i32,
                    };
                    Bytes::from(grpc_message(&request.encode_to_vec()))
                })
                .collect();
            let (start_line, bench) = (start_line.clone(), bench.clone());
            tasks.spawn(async move {
                let mut latencies = Vec::with_capacity(requests.len());
                start_line.wait().await;
                for request in requests {
                    let start = Instant::now();
                    let request = tonic::body::Body::new(http_body_util::Full::new(request));
                    bench
                        .raw_response::<FindMissingBlobsResponse>(FIND_MISSING_PATH, request)
                        .await?;
                    latencies.push(start.elapsed());
                }
                Ok::<_, anyhow::Error>(latencies)
            });
        }
        start_line.wait().await;
        let wall = Instant::now();
        let mut all = Vec::new();
        while let Some(result) = tasks.join_next().await {
            all.extend(result??);
        }
        let wall = wall.elapsed().as_secs_f64();
        all.sort();
        let mean = all.iter().sum::<Duration>() / all.len().max(1) as u32;
        println!(
            "find_missing_{per_call}_digest{}: mean {:.2} ms, p99 {:.2} ms ({} tasks x {} calls, {:.0} calls/s)",
            if per_call == 1 { "" } else { "s" },
            ms(mean),
            ms(percentile(&all, 0.99)),
            find_tasks,
            args.find_calls,
            all.len() as f64 / wall
        );
    }

    // 4. Peak RSS while streaming a big blob in and out: last, because writing gigabytes
    // leaves the disk busy for a while, which the small durable writes of BatchUpdate (whose
    // syncs wait on the whole filesystem) must not be measured behind.
    if args.big_blob_gib > 0.0 {
        let big = (args.big_blob_gib * (1u64 << 30) as f64) as u64;
        let big_digest = tokio::task::block_in_place(|| bench.digest_of_blob(big));
        if embedded.is_some() || server_pid.is_some() {
            let before = vm_rss_kib(server_pid).unwrap_or(0);
            let reset = reset_hwm(server_pid);
            let write_secs = bench.write_blob(big_digest).await?;
            let read_secs = bench.read_blob(big_digest, true).await?;
            let peak = vm_hwm_kib(server_pid).unwrap_or(0);
            let whose = if server_pid.is_some() {
                "server process"
            } else {
                "whole process: embedded server + bench client"
            };
            println!(
                "peak_rss_streaming_{}GiB: {:.1} MiB VmHWM ({whose}; RSS before {:.1} MiB; hwm reset {}; write {:.0} MiB/s, read {:.0} MiB/s)",
                args.big_blob_gib,
                peak as f64 / 1024.0,
                before as f64 / 1024.0,
                if reset { "ok" } else { "unavailable" },
                big as f64 / MIB / write_secs,
                big as f64 / MIB / read_secs,
            );
        } else {
            println!("peak_rss_streaming: skipped (external endpoint without --server-pid)");
        }
    }

    if let Some(server) = embedded {
        server.shutdown().await?;
    }
    Ok(())
}

fn check_batch(
    result: Result<
        Result<tonic::Response<rba_proto::reapi::BatchUpdateBlobsResponse>, tonic::Status>,
        tokio::task::JoinError,
    >,
) -> anyhow::Result<()> {
    let response = result??.into_inner();
    if let Some(failed) = response
        .responses
        .iter()
        .find(|r| r.status.as_ref().is_some_and(|s| s.code != 0))
    {
        bail!("BatchUpdateBlobs entry failed: {:?}", failed.status);
    }
    Ok(())
}
