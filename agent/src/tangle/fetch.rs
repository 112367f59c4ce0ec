//! A job's `zip_uri`: where the project comes from, fetched with caps and turned into a Merkle
//! tree in the node's CAS.
//!
//! Why so strict: the URI comes from whoever pays for a job, so everything about it is hostile
//! until checked. Downloads are streamed into a temporary file under the node's download
//! directory with a byte cap, a total timeout and a bounded number of redirects (never from
//! `https` down to `http`); the archive is then read by [`rba_cas::merkle::build_from_zip_file`],
//! which refuses path escapes, links out of the tree, bombs and oversized archives without ever
//! writing an entry to disk (the files go into the CAS as blobs). Nothing is extracted here: the
//! executor materialises the tree inside its sandbox later.
//!
//! | scheme | accepted when |
//! |---|---|
//! | `https://host/path` | the host is public: not loopback/private/link-local, as given, as resolved and after every redirect (unless [`TangleConfig::allow_private_hosts`]); size cap, timeout, redirects bounded |
//! | `http://…` | only with [`TangleConfig::allow_http`] (tests, private networks) |
//! | `ipfs://CID` | a gateway is configured; the CID parses (v0 `Qm…` or multibase v1); the gateway's block (trustless `?format=raw`) hashes to the CID's sha2-256 digest and is a raw block or a single-block dag-pb UnixFS file (see [`verify_ipfs_block`]) |
//! | `file:///path` | the file resolves (symlinks followed) under [`TangleConfig::file_root`] |
//! | `cas://DIGEST` | the blob is in the node's CAS and the caller may read it: a zip, or the root `Directory` of a tree an earlier job of the caller brought (then the tree must be complete and all the caller's to read; the node checks before the job runs) |
//!
//! Every source but a `cas://` tree root grants the caller the tree it brought (the caller
//! named its content), so a later `cas://ROOT` of the same caller is served from the CAS; a
//! digest another caller's job made public on chain is not enough (answered as absent).

use std::io::{BufReader, Seek};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rba_cas::merkle::{ZipLimits, build_from_zip};
use rba_cas::{BlobStore, CasError, Digest, DigestFunction};
use rba_executor::tenant::Tenant;
use tokio::io::AsyncWriteExt;

use super::{TangleConfig, TangleContext};

/// The digest function of trees built from zips (the same as `rba`'s own workspaces).
pub const TREE_FUNCTION: DigestFunction = DigestFunction::Blake3;

/// Why a `zip_uri` was refused or could not be fetched. The message is what the job's result
/// and log carry.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Not a URI we take at all.
    #[error("unsupported zip_uri scheme {0:?} (expected https://, ipfs://, file:// or cas://)")]
    UnsupportedScheme(String),
    /// Malformed URI.
    #[error("malformed zip_uri: {0}")]
    Malformed(String),
    /// `http://` while plain HTTP is off.
    #[error("plain http:// is not accepted, use https://")]
    PlainHttp,
    /// The host is (or resolves only to) a loopback, private or otherwise non-public address.
    #[error("{0} is not a public address")]
    PrivateHost(String),
    /// `file://` is off or the file is not under the allowed directory.
    #[error("file:// refused: {0}")]
    FileRefused(String),
    /// `ipfs://` without a configured gateway.
    #[error("ipfs:// is not enabled on this node (no gateway configured)")]
    IpfsDisabled,
    /// Not a CID.
    #[error("malformed IPFS CID {0:?}")]
    MalformedCid(String),
    /// The gateway's bytes do not hash to the CID: not the content asked for.
    #[error(
        "ipfs:// content does not match its CID {cid}: the gateway sent a block whose sha2-256 is {got}"
    )]
    IpfsMismatch {
        /// The CID asked for.
        cid: String,
        /// The digest of what came (hex).
        got: String,
    },
    /// Content this node cannot check against its CID, refused rather than trusted.
    #[error("ipfs://{cid} cannot be verified: {reason}")]
    IpfsUnverifiable {
        /// The CID asked for.
        cid: String,
        /// What is not supported.
        reason: String,
    },
    /// Connecting failed (DNS, refused, unreachable).
    #[error("cannot reach {host}: {reason}")]
    Unreachable {
        /// The host asked for.
        host: String,
        /// What the connection attempt said.
        reason: String,
    },
    /// The download took longer than allowed.
    #[error("download timed out after {0:?}")]
    Timeout(Duration),
    /// Redirect loop, too many redirects, or a downgrade to plain HTTP.
    #[error("redirect refused: {0}")]
    Redirect(String),
    /// The server answered with an error status.
    #[error("server answered HTTP {0}")]
    HttpStatus(u16),
    /// More bytes than the cap.
    #[error("zip larger than the limit of {cap} bytes")]
    TooLarge {
        /// The cap in bytes.
        cap: u64,
    },
    /// A `cas://` blob the node does not hold, or a tree missing blobs.
    #[error("cas:// input not on this node: {0}")]
    NotInCas(String),
    /// The archive was refused by the hostile-zip checks, or is not a zip.
    #[error("rejected archive: {0}")]
    Archive(String),
    /// Something failed on the node itself.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Where a zip comes from, parsed and checked (nothing fetched yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ZipSource {
    /// `https://…` (or `http://…` when allowed).
    Http(reqwest::Url),
    /// `ipfs://CID`.
    Ipfs(String),
    /// `file://…` (the path as given; checked against the root when opened).
    File(PathBuf),
    /// `cas://DIGEST`.
    Cas(Digest),
}

/// Parses `uri` and applies the scheme rules of `config` that need no I/O.
pub fn parse_zip_uri(uri: &str, config: &TangleConfig) -> Result<ZipSource, FetchError> {
    if uri.len() > 2048 {
        return Err(FetchError::Malformed(format!(
            "{} bytes (at most 2048)",
            uri.len()
        )));
    }
    if let Some(bad) = uri.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(FetchError::Malformed(format!(
            "character {bad:?} (printable ASCII without spaces only)"
        )));
    }
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Err(FetchError::UnsupportedScheme(
            uri.split(':').next().unwrap_or_default().to_string(),
        ));
    };
    let scheme = scheme.to_ascii_lowercase();
    match scheme.as_str() {
        "https" | "http" => {
            if scheme == "http" && !config.allow_http {
                return Err(FetchError::PlainHttp);
            }
            let url = reqwest::Url::parse(uri).map_err(|e| FetchError::Malformed(e.to_string()))?;
            if url.host_str().is_none_or(str::is_empty) {
                return Err(FetchError::Malformed("no host".into()));
            }
            if !url.username().is_empty() || url.password().is_some() {
                return Err(FetchError::Malformed("credentials in the URI".into()));
            }
            if !config.allow_private_hosts && !public_url(&url) {
                return Err(FetchError::PrivateHost(
                    url.host_str().unwrap_or_default().to_string(),
                ));
            }
            Ok(ZipSource::Http(url))
        }
        "ipfs" => {
            if config.ipfs_gateway.is_none() {
                return Err(FetchError::IpfsDisabled);
            }
            let cid = rest.trim_end_matches('/');
            if cid.len() > 200 || cid::Cid::try_from(cid).is_err() {
                return Err(FetchError::MalformedCid(cid.to_string()));
            }
            Ok(ZipSource::Ipfs(cid.to_string()))
        }
        "file" => {
            if config.file_root.is_none() {
                return Err(FetchError::FileRefused(
                    "file:// is disabled on this node".into(),
                ));
            }
            let url = reqwest::Url::parse(uri).map_err(|e| FetchError::Malformed(e.to_string()))?;
            if url
                .host_str()
                .is_some_and(|h| !h.is_empty() && h != "localhost")
            {
                return Err(FetchError::FileRefused(format!(
                    "remote host {:?}",
                    url.host_str().unwrap_or_default()
                )));
            }
            let path = url
                .to_file_path()
                .map_err(|()| FetchError::Malformed("not a file path".into()))?;
            Ok(ZipSource::File(path))
        }
        "cas" => rest
            .parse::<Digest>()
            .map(ZipSource::Cas)
            .map_err(|e| FetchError::Malformed(format!("cas:// digest: {e}"))),
        other => Err(FetchError::UnsupportedScheme(other.to_string())),
    }
}

/// The one rule of public addresses, shared with the executor's fetch egress.
pub use rba_executor::egress::is_public_ip;

/// False when the URL's host is an IP literal that is not public, or `localhost`.
fn public_url(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(ip) => is_public_ip(ip),
        Err(_) => {
            let name = host.trim_end_matches('.').to_ascii_lowercase();
            name != "localhost" && !name.ends_with(".localhost")
        }
    }
}

/// Resolves names like the system does, then keeps only public addresses (a name that
/// resolves only to private ones is refused, so DNS cannot point a download inward).
struct PublicResolver;

impl reqwest::dns::Resolve for PublicResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| is_public_ip(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(Box::new(FetchError::PrivateHost(host)) as _);
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The HTTP client of downloads: rustls, bounded redirects that never downgrade to plain HTTP
/// (unless `allow_http`) nor lead to a non-public address (unless `allow_private`), connect and
/// total timeouts, no proxy from the environment.
pub fn http_client(
    config: &TangleConfig,
    allow_http: bool,
    allow_private: bool,
) -> anyhow::Result<reqwest::Client> {
    let max = config.max_redirects;
    let policy = reqwest::redirect::Policy::custom(move |attempt| {
        if !allow_private && !public_url(attempt.url()) {
            let message = format!("redirect to the non-public {}", attempt.url());
            attempt.error(message)
        } else if attempt.previous().len() > max {
            attempt.error(format!("more than {max} redirects"))
        } else if attempt.previous().contains(attempt.url()) {
            let message = format!("redirect loop at {}", attempt.url());
            attempt.error(message)
        } else if attempt.url().scheme() != "https"
            && !(allow_http && attempt.url().scheme() == "http")
        {
            let message = format!("redirect to {}", attempt.url().scheme());
            attempt.error(message)
        } else {
            attempt.follow()
        }
    });
    let mut builder = reqwest::Client::builder();
    if !allow_private {
        builder = builder.dns_resolver(Arc::new(PublicResolver));
    }
    Ok(builder
        .redirect(policy)
        .connect_timeout(config.connect_timeout)
        .timeout(config.fetch_timeout)
        .no_proxy()
        .user_agent(concat!("rust-build-agent/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

/// Fetches `uri` and stores its tree in the node's CAS; returns the root `Directory` digest
/// (a single top-level directory holding everything, as GitHub's zips have, is unwrapped).
pub async fn import_zip(
    ctx: &TangleContext,
    uri: &str,
    tenant: &Tenant,
) -> Result<Digest, FetchError> {
    let source = parse_zip_uri(uri, &ctx.config)?;
    let store = ctx.node.cas.blobs.clone();
    let limits = ctx.config.zip_limits.clone();
    // A `cas://` tree root is proven by the node before the job runs (every blob readable by
    // the caller); every other source brings its tree here and grants it to the caller.
    let mut brought = true;
    let root = match source {
        ZipSource::Http(url) => {
            let file = download(&ctx.http, url, None, &ctx.config).await?;
            import_file(store.clone(), file, limits).await?
        }
        ZipSource::Ipfs(cid) => {
            // The trustless form: the block itself, which is checked against the CID here
            // (a gateway is not trusted to have done it).
            let gateway = ctx.config.ipfs_gateway.as_deref().unwrap_or_default();
            let url = format!("{}/ipfs/{cid}?format=raw", gateway.trim_end_matches('/'));
            let url = reqwest::Url::parse(&url)
                .map_err(|e| FetchError::Internal(format!("gateway URL {url:?}: {e}")))?;
            let block = download(&ctx.gateway_http, url, Some(IPLD_RAW), &ctx.config).await?;
            let verified = tokio::task::spawn_blocking(move || verify_ipfs_block(&cid, block))
                .await
                .map_err(|e| FetchError::Internal(e.to_string()))??;
            match verified {
                IpfsFile::Block(file) => import_file(store.clone(), file, limits).await?,
                IpfsFile::Bytes(bytes) => {
                    let store = store.clone();
                    tokio::task::spawn_blocking(move || {
                        build_from_zip(&store, std::io::Cursor::new(bytes), TREE_FUNCTION, &limits)
                            .map(|tree| tree.root)
                            .map_err(archive_error)
                    })
                    .await
                    .map_err(|e| FetchError::Internal(e.to_string()))??
                }
            }
        }
        ZipSource::File(path) => {
            let file = open_under_root(&path, &ctx.config)?;
            import_file(store.clone(), file, limits).await?
        }
        ZipSource::Cas(digest) => {
            // Only what the caller may read: another caller's blob is answered as an absent
            // one (its digest, public on chain, is not the bytes).
            let readable = ctx
                .node
                .cas
                .reads
                .may_read(tenant.as_str(), &digest)
                .map_err(|e| FetchError::Internal(e.to_string()))?;
            if !readable {
                return Err(FetchError::NotInCas(format!("no blob {digest:?}")));
            }
            let root = import_cas(&store, digest, &ctx.config).await?;
            brought = root != digest;
            root
        }
    };
    let (cas, tenant) = (ctx.node.cas.clone(), tenant.as_str().to_string());
    tokio::task::spawn_blocking(move || {
        if brought {
            let tree = rba_cas::tree_digests(&cas.blobs, &root)
                .and_then(|tree| cas.reads.grant(&tenant, &tree));
            tree.map_err(|e| FetchError::Internal(format!("granting the imported tree: {e}")))?;
        }
        Ok(unwrap_single_dir(&cas.blobs, root))
    })
    .await
    .map_err(|e| FetchError::Internal(e.to_string()))?
}

/// The innermost cause of an error (reqwest wraps hyper wraps io).
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    cause.to_string()
}

/// The host [`PublicResolver`] refused, if that is why a request failed.
fn private_host(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause = Some(e);
    while let Some(error) = cause {
        if let Some(FetchError::PrivateHost(host)) = error.downcast_ref::<FetchError>() {
            return Some(host.clone());
        }
        cause = error.source();
    }
    None
}

fn request_error(url: &reqwest::Url, config: &TangleConfig, e: reqwest::Error) -> FetchError {
    if e.is_timeout() {
        FetchError::Timeout(config.fetch_timeout)
    } else if e.is_redirect() {
        FetchError::Redirect(root_cause(&e))
    } else if let Some(private) = private_host(&e) {
        FetchError::PrivateHost(private)
    } else {
        FetchError::Unreachable {
            host: url.host_str().unwrap_or_default().to_string(),
            reason: root_cause(&e),
        }
    }
}

/// Streams `url` (asking for `accept` when given) into a temporary file under the download
/// directory, at most `max_zip_bytes`, within `fetch_timeout`.
async fn download(
    client: &reqwest::Client,
    url: reqwest::Url,
    accept: Option<&str>,
    config: &TangleConfig,
) -> Result<std::fs::File, FetchError> {
    let cap = config.max_zip_bytes;
    let work = async {
        let mut request = client.get(url.clone());
        if let Some(accept) = accept {
            request = request.header(reqwest::header::ACCEPT, accept);
        }
        let mut response = request
            .send()
            .await
            .map_err(|e| request_error(&url, config, e))?;
        if !response.status().is_success() {
            return Err(FetchError::HttpStatus(response.status().as_u16()));
        }
        if response.content_length().is_some_and(|len| len > cap) {
            return Err(FetchError::TooLarge { cap });
        }
        // Unlinked at once: nothing stays behind in the download directory, whatever happens.
        let file = tempfile::tempfile_in(&config.download_dir)
            .map_err(|e| FetchError::Internal(format!("creating a download file: {e}")))?;
        let reader = file
            .try_clone()
            .map_err(|e| FetchError::Internal(e.to_string()))?;
        let mut writer = tokio::fs::File::from_std(file);
        let mut total = 0u64;
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| request_error(&url, config, e))?
        {
            total += chunk.len() as u64;
            if total > cap {
                return Err(FetchError::TooLarge { cap });
            }
            writer
                .write_all(&chunk)
                .await
                .map_err(|e| FetchError::Internal(format!("writing the download: {e}")))?;
        }
        writer
            .flush()
            .await
            .map_err(|e| FetchError::Internal(e.to_string()))?;
        Ok(reader)
    };
    // `Client::timeout` covers the body too; this is the belt to its braces.
    tokio::time::timeout(config.fetch_timeout + Duration::from_secs(1), work)
        .await
        .map_err(|_| FetchError::Timeout(config.fetch_timeout))?
}

/// The media type of a single raw block on a trustless gateway.
const IPLD_RAW: &str = "application/vnd.ipld.raw";
/// Multicodec of raw blocks.
const CODEC_RAW: u64 = 0x55;
/// Multicodec of dag-pb (UnixFS) blocks.
const CODEC_DAG_PB: u64 = 0x70;
/// Multihash code of sha2-256.
const HASH_SHA2_256: u64 = 0x12;
/// Largest dag-pb block decoded (IPFS blocks are at most 2 MiB on the network).
const MAX_DAG_PB_BLOCK: u64 = 4 << 20;

/// The file an `ipfs://` CID names, verified.
#[derive(Debug)]
pub enum IpfsFile {
    /// A raw block: the downloaded file is the content.
    Block(std::fs::File),
    /// The data of a single-block UnixFS file.
    Bytes(Vec<u8>),
}

/// A dag-pb node (the IPLD dag-pb spec); only what a single-block file needs.
#[derive(Clone, PartialEq, prost::Message)]
struct PbNode {
    #[prost(message, repeated, tag = "2")]
    links: Vec<PbLink>,
    #[prost(bytes = "vec", optional, tag = "1")]
    data: Option<Vec<u8>>,
}

/// A dag-pb link (decoded only to count them).
#[derive(Clone, PartialEq, prost::Message)]
struct PbLink {
    #[prost(bytes = "vec", optional, tag = "1")]
    hash: Option<Vec<u8>>,
}

/// The UnixFS `Data` message inside a dag-pb node.
#[derive(Clone, PartialEq, prost::Message)]
struct UnixFsData {
    #[prost(int32, optional, tag = "1")]
    kind: Option<i32>,
    #[prost(bytes = "vec", optional, tag = "2")]
    data: Option<Vec<u8>>,
    #[prost(uint64, optional, tag = "3")]
    filesize: Option<u64>,
    #[prost(uint64, repeated, tag = "4")]
    blocksizes: Vec<u64>,
}

/// Checks a block downloaded for `cid` against it and returns the file it holds: the block's
/// sha2-256 must be the CID's digest (CIDv0, or CIDv1 with sha2-256), and the block a raw block
/// (the content itself) or a dag-pb UnixFS file held in that one block (no links). Everything
/// else (other hash functions, multi-block files, directories, other codecs) is refused with
/// the reason: content that cannot be checked is not used.
pub fn verify_ipfs_block(cid_text: &str, mut block: std::fs::File) -> Result<IpfsFile, FetchError> {
    use sha2::Digest as _;
    let cid =
        cid::Cid::try_from(cid_text).map_err(|_| FetchError::MalformedCid(cid_text.to_string()))?;
    let unverifiable = |reason: String| FetchError::IpfsUnverifiable {
        cid: cid_text.to_string(),
        reason,
    };
    let hash = cid.hash();
    if hash.code() != HASH_SHA2_256 || hash.digest().len() != 32 {
        return Err(unverifiable(format!(
            "hash function 0x{:x} is not supported (sha2-256 only)",
            hash.code()
        )));
    }
    if cid.codec() != CODEC_RAW && cid.codec() != CODEC_DAG_PB {
        return Err(unverifiable(format!(
            "codec 0x{:x} is not a file (raw or dag-pb only)",
            cid.codec()
        )));
    }
    block
        .rewind()
        .map_err(|e| FetchError::Internal(e.to_string()))?;
    let mut hasher = sha2::Sha256::new();
    let size = std::io::copy(&mut block, &mut hasher)
        .map_err(|e| FetchError::Internal(format!("reading the block: {e}")))?;
    let got = hasher.finalize();
    if got.as_slice() != hash.digest() {
        return Err(FetchError::IpfsMismatch {
            cid: cid_text.to_string(),
            got: hex::encode(got),
        });
    }
    if cid.codec() == CODEC_RAW {
        return Ok(IpfsFile::Block(block));
    }
    if size > MAX_DAG_PB_BLOCK {
        return Err(unverifiable(format!(
            "a dag-pb block of {size} bytes (at most {MAX_DAG_PB_BLOCK})"
        )));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    block
        .rewind()
        .and_then(|()| std::io::Read::read_to_end(&mut block, &mut bytes))
        .map_err(|e| FetchError::Internal(format!("reading the block: {e}")))?;
    use prost::Message as _;
    let node = PbNode::decode(bytes.as_slice())
        .map_err(|e| unverifiable(format!("not a dag-pb node: {e}")))?;
    if !node.links.is_empty() {
        return Err(unverifiable(format!(
            "a file of {} blocks: only single-block files (or raw CIDs) are verified; \
             publish the zip with raw leaves as one block, or use https://",
            node.links.len()
        )));
    }
    let unixfs = UnixFsData::decode(node.data.unwrap_or_default().as_slice())
        .map_err(|e| unverifiable(format!("not UnixFS data: {e}")))?;
    // UnixFS types: 0 raw, 1 directory, 2 file, 3 metadata, 4 symlink, 5 HAMT shard.
    let kind = unixfs.kind.unwrap_or(-1);
    if kind != 0 && kind != 2 {
        return Err(unverifiable(format!(
            "UnixFS node of type {kind} is not a file"
        )));
    }
    let data = unixfs.data.unwrap_or_default();
    if unixfs
        .filesize
        .is_some_and(|size| size != data.len() as u64)
    {
        return Err(unverifiable(format!(
            "UnixFS file size {} differs from its {} bytes of data",
            unixfs.filesize.unwrap_or_default(),
            data.len()
        )));
    }
    Ok(IpfsFile::Bytes(data))
}

/// Opens a `file://` path only if it is a regular file under the configured root, judged on
/// the path with every symlink resolved and again on the opened descriptor.
fn open_under_root(path: &Path, config: &TangleConfig) -> Result<std::fs::File, FetchError> {
    let root = config
        .file_root
        .as_ref()
        .ok_or_else(|| FetchError::FileRefused("file:// is disabled on this node".into()))?;
    let root = std::fs::canonicalize(root)
        .map_err(|e| FetchError::Internal(format!("the file:// root {}: {e}", root.display())))?;
    let outside = || {
        FetchError::FileRefused(format!(
            "{} is outside the allowed directory {}",
            path.display(),
            root.display()
        ))
    };
    if !path.is_absolute() {
        return Err(outside());
    }
    let resolved = std::fs::canonicalize(path).map_err(|e| {
        if path.starts_with(&root) {
            FetchError::FileRefused(format!("{}: {e}", path.display()))
        } else {
            outside()
        }
    })?;
    if !resolved.starts_with(&root) {
        return Err(outside());
    }
    let file = std::fs::File::open(&resolved)
        .map_err(|e| FetchError::FileRefused(format!("{}: {e}", path.display())))?;
    // The path could have changed between resolving and opening: check what was opened.
    use std::os::fd::AsRawFd;
    if let Ok(opened) = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        && !opened.starts_with(&root)
    {
        return Err(outside());
    }
    let meta = file
        .metadata()
        .map_err(|e| FetchError::Internal(e.to_string()))?;
    if !meta.is_file() {
        return Err(FetchError::FileRefused(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    if meta.len() > config.max_zip_bytes {
        return Err(FetchError::TooLarge {
            cap: config.max_zip_bytes,
        });
    }
    Ok(file)
}

fn archive_error(e: CasError) -> FetchError {
    match e {
        CasError::QuotaExceeded(reason) => FetchError::Archive(format!("quota exceeded: {reason}")),
        other => FetchError::Archive(other.to_string()),
    }
}

/// Reads a zip from an open file into the CAS (blocking work on the blocking pool).
async fn import_file(
    store: BlobStore,
    mut file: std::fs::File,
    limits: ZipLimits,
) -> Result<Digest, FetchError> {
    tokio::task::spawn_blocking(move || {
        file.rewind()
            .map_err(|e| FetchError::Internal(e.to_string()))?;
        build_from_zip(&store, BufReader::new(file), TREE_FUNCTION, &limits)
            .map(|tree| tree.root)
            .map_err(archive_error)
    })
    .await
    .map_err(|e| FetchError::Internal(e.to_string()))?
}

/// `cas://DIGEST`: a zip blob, or the root of a tree already uploaded.
async fn import_cas(
    store: &BlobStore,
    digest: Digest,
    config: &TangleConfig,
) -> Result<Digest, FetchError> {
    let present = store
        .contains(&digest)
        .map_err(|e| FetchError::Internal(e.to_string()))?;
    if !present {
        return Err(FetchError::NotInCas(format!("no blob {digest:?}")));
    }
    let mut magic = [0u8; 4];
    {
        use std::io::Read;
        let mut reader = store
            .reader(&digest, 0, 4)
            .map_err(|e| FetchError::Internal(e.to_string()))?;
        let mut read = 0;
        while read < 4 {
            match reader.read(&mut magic[read..]) {
                Ok(0) => break,
                Ok(n) => read += n,
                Err(e) => return Err(FetchError::Internal(e.to_string())),
            }
        }
    }
    if magic.starts_with(b"PK") {
        if digest.size > config.max_zip_bytes {
            return Err(FetchError::TooLarge {
                cap: config.max_zip_bytes,
            });
        }
        let (store, limits) = (store.clone(), config.zip_limits.clone());
        return tokio::task::spawn_blocking(move || {
            let file = store
                .open_file(&digest)
                .map_err(|e| FetchError::Internal(e.to_string()))?;
            build_from_zip(&store, BufReader::new(file), TREE_FUNCTION, &limits)
                .map(|tree| tree.root)
                .map_err(archive_error)
        })
        .await
        .map_err(|e| FetchError::Internal(e.to_string()))?;
    }
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        rba_cas::read_directory(&store, &digest).map_err(|e| {
            FetchError::Archive(format!("{digest:?} is neither a zip nor a tree root: {e}"))
        })?;
        let missing = rba_cas::missing_in_tree(&store, &digest);
        if !missing.is_empty() {
            return Err(FetchError::NotInCas(format!(
                "the tree {digest:?} lacks {} blob(s), e.g. {:?}",
                missing.len(),
                missing[0]
            )));
        }
        Ok(digest)
    })
    .await
    .map_err(|e| FetchError::Internal(e.to_string()))?
}

/// A root holding one directory and nothing else stands for that directory.
fn unwrap_single_dir(store: &BlobStore, root: Digest) -> Digest {
    let Ok(dir) = rba_cas::read_directory(store, &root) else {
        return root;
    };
    if dir.files.is_empty() && dir.symlinks.is_empty() && dir.directories.len() == 1 {
        let child = Digest::from_reapi_field(
            root.function,
            dir.directories[0].digest.as_ref(),
            "DirectoryNode.digest",
        );
        if let Ok(child) = child {
            return child;
        }
    }
    root
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> TangleConfig {
        let mut config = TangleConfig::new("/nonexistent");
        config.file_root = Some("/srv/zips".into());
        config.ipfs_gateway = Some("https://ipfs.io".into());
        config
    }

    #[test]
    fn schemes() {
        let c = config();
        assert!(matches!(
            parse_zip_uri("https://example.com/a.zip", &c),
            Ok(ZipSource::Http(_))
        ));
        assert!(matches!(
            parse_zip_uri("http://example.com/a.zip", &c),
            Err(FetchError::PlainHttp)
        ));
        assert!(matches!(
            parse_zip_uri("ftp://example.com/a.zip", &c),
            Err(FetchError::UnsupportedScheme(s)) if s == "ftp"
        ));
        assert!(matches!(
            parse_zip_uri("no-scheme", &c),
            Err(FetchError::UnsupportedScheme(_))
        ));
        assert!(matches!(
            parse_zip_uri("ipfs://QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG", &c),
            Ok(ZipSource::Ipfs(_))
        ));
        assert!(matches!(
            parse_zip_uri(
                "ipfs://bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi",
                &c
            ),
            Ok(ZipSource::Ipfs(_))
        ));
        for bad in [
            "ipfs://not-a-cid",
            "ipfs://Qm../../etc/passwd",
            "ipfs://QmYwAPJzv5CZ",
            "ipfs://bafy",
        ] {
            assert!(
                matches!(parse_zip_uri(bad, &c), Err(FetchError::MalformedCid(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_zip_uri("file:///srv/zips/a.zip", &c),
            Ok(ZipSource::File(p)) if p == Path::new("/srv/zips/a.zip")
        ));
        assert!(matches!(
            parse_zip_uri("file://evil.example/a.zip", &c),
            Err(FetchError::FileRefused(_))
        ));
        assert!(matches!(
            parse_zip_uri("cas://blake3:00/1", &c),
            Err(FetchError::Malformed(_))
        ));
        assert!(matches!(
            parse_zip_uri("https://user:pw@example.com/a.zip", &c),
            Err(FetchError::Malformed(_))
        ));
        assert!(matches!(
            parse_zip_uri("https://example.com/a b.zip", &c),
            Err(FetchError::Malformed(_))
        ));
        assert!(matches!(
            parse_zip_uri("https://127.0.0.1/a.zip", &c),
            Err(FetchError::PrivateHost(_))
        ));
        assert!(matches!(
            parse_zip_uri("https://[::1]/a.zip", &c),
            Err(FetchError::PrivateHost(_))
        ));
        assert!(matches!(
            parse_zip_uri("https://localhost/a.zip", &c),
            Err(FetchError::PrivateHost(_))
        ));
        assert!(matches!(
            parse_zip_uri("https://169.254.169.254/latest/meta-data", &c),
            Err(FetchError::PrivateHost(_))
        ));
        let mut off = config();
        off.file_root = None;
        off.ipfs_gateway = None;
        assert!(matches!(
            parse_zip_uri("file:///srv/zips/a.zip", &off),
            Err(FetchError::FileRefused(_))
        ));
        assert!(matches!(
            parse_zip_uri(
                "ipfs://QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG",
                &off
            ),
            Err(FetchError::IpfsDisabled)
        ));
    }
}
