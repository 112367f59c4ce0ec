//! [`BucketStore`]: blob bytes in an S3-compatible bucket (through the `object_store` crate),
//! presence in a [`BlobIndex`] (PostgreSQL when several processes share the bucket, or
//! [`super::embedded_index::EmbeddedBlobIndex`] for one).
//!
//! Why: an operator who outgrows one machine keeps blobs in an object store they already run,
//! shared by every front end and worker, and the index that says which blobs are present in a
//! database. Put in front of it a local filesystem tier ([`crate::layers::tiered::Tiered`]) for
//! what hardlinks, seekable zips and the executor need.
//!
//! Key layout: `<prefix>/cas/<function>/<hex hash>-<size>` (the size in the key: a digest of
//! the same hash and another size is another key, and a listing of the bucket says what each
//! object should be).
//!
//! Rules, and why:
//! - **Presence is the index's.** `find_missing` is the index's one query, never a `HEAD` per
//!   digest. A blob is indexed only after its bytes are verified and stored; an indexed blob
//!   whose object is gone from the bucket (removed behind the store's back, a lifecycle rule)
//!   is dropped from the index by the first `read` that misses it, which reports
//!   [`CasError::NotFound`] (the client uploads it again).
//! - **Only verified bytes ever reach a blob's key.** S3 is last writer wins, and tenants
//!   upload concurrently: a hostile tenant that sends garbage under the digest of a blob an
//!   honest tenant is uploading at the same moment must not leave garbage under the key. So no
//!   byte is made visible under a key before the whole blob was hashed and checked:
//!   - a blob of at most [`BucketOptions::single_put_max`] bytes is collected in memory (more
//!     bytes than its digest says are refused as they arrive), hashed, checked, and only then
//!     sent, in one `PUT`;
//!   - a larger one is streamed as a multipart upload ([`BucketOptions::part_size`] parts,
//!     larger for a blob that would need more than S3's 10,000 parts;
//!     [`BucketOptions::part_concurrency`] in flight, so memory stays bounded) while it is
//!     hashed, and the upload is *completed* only once size and hash match; otherwise it is
//!     aborted. S3 makes a multipart upload's object exist only at completion, all at once, so
//!     an aborted or unfinished upload is never visible under the key, whoever else writes it.
//!
//!   This needs no temporary object and no server-side copy (a `CopyObject` is refused above
//!   5 GiB and would double the bytes written). A write cancelled mid-way (its future dropped:
//!   the client went away) aborts its upload in the background; one the process could not
//!   abort (it died) stays invisible, for the bucket's `AbortIncompleteMultipartUpload`
//!   lifecycle rule to clean up.
//! - **A blob already indexed is not written again**: its stream is drained and counted (a
//!   wrong size is still [`CasError::SizeMismatch`]), as the filesystem store does, so a client
//!   that sends it gets the usual answer.
//! - `write_batch` checks every blob, asks the index once which are missing, puts those
//!   concurrently ([`BucketOptions::batch_concurrency`]) and records them with one
//!   `index.insert`.
//! - `read(offset, limit)` is one ranged `GET`, streamed as it arrives; it marks the blob used
//!   in the index beside the read (eviction order), not before it.
//! - Errors of the bucket are [`CasError::Unavailable`]`("s3 bucket B: <operation>: <error>")`;
//!   a bucket that refuses a write fails the write and nothing is indexed. Requests are retried
//!   by `object_store` within [`BucketOptions::retry`] (short by default: a client waiting on a
//!   dead bucket should hear so).
//!
//! Hashing runs on tokio's blocking pool, beside the upload, never on a runtime thread.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
    WriteMultipart,
};

use crate::digest::{Digest, DigestFunction};
use crate::error::{CasError, Result};
use crate::seams::{BlobIndex, ChunkStream, Store};
use crate::store::StoreStats;

/// How a [`BucketStore`] talks to its bucket.
#[derive(Clone, Debug)]
pub struct BucketOptions {
    /// Blobs up to this size are checked in memory and sent in one `PUT`; larger ones are
    /// multipart uploads completed only once checked.
    pub single_put_max: u64,
    /// Size of a multipart upload's parts (S3's minimum is 5 MiB, except the last).
    pub part_size: usize,
    /// Parts of one upload in flight at once (memory: about `(part_concurrency + 1) *
    /// part_size` per upload).
    pub part_concurrency: usize,
    /// `PUT`s in flight at once for a [`Store::write_batch`].
    pub batch_concurrency: usize,
    /// Blobs larger than this are refused before a byte is read ([`CasError::QuotaExceeded`]);
    /// 5 TiB, S3's largest object, by default.
    pub max_blob_bytes: u64,
    /// Retries of a failed request (`object_store` retries connection errors, 5xx and
    /// throttling with backoff).
    pub retry: RetryConfig,
}

impl Default for BucketOptions {
    fn default() -> Self {
        BucketOptions {
            single_put_max: 8 << 20,
            part_size: 8 << 20,
            part_concurrency: 4,
            batch_concurrency: 32,
            max_blob_bytes: 5 << 40,
            retry: RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: 3,
                retry_timeout: Duration::from_secs(30),
            },
        }
    }
}

impl BucketOptions {
    /// The defaults without retries (tests of a bucket that refuses or is gone).
    pub fn no_retries() -> Self {
        BucketOptions {
            retry: RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: 0,
                retry_timeout: Duration::from_secs(5),
            },
            ..Default::default()
        }
    }
}

/// Where the bucket is, given explicitly (tests, configuration files) rather than through the
/// environment ([`BucketStore::from_url`]).
#[derive(Clone, Debug, Default)]
pub struct BucketSettings {
    /// `http(s)://host:port` of an S3-compatible server; `None` for AWS itself.
    pub endpoint: Option<String>,
    /// The bucket's name.
    pub bucket: String,
    /// Keys are under `<prefix>/` (empty: at the bucket's root).
    pub prefix: String,
    /// Credentials.
    pub access_key_id: String,
    /// Credentials.
    pub secret_access_key: String,
    /// The region (`us-east-1` for most S3-compatible servers).
    pub region: String,
    /// Allow plain `http://` endpoints (a server on loopback).
    pub allow_http: bool,
}

/// Blobs in an S3-compatible bucket, presence in a [`BlobIndex`]. Cheap to clone.
#[derive(Clone)]
pub struct BucketStore {
    objects: Arc<dyn ObjectStore>,
    index: Arc<dyn BlobIndex>,
    bucket: Arc<str>,
    prefix: Arc<str>,
    options: BucketOptions,
}

impl fmt::Debug for BucketStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BucketStore")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("index", &self.index.backend())
            .finish()
    }
}

/// `s3://BUCKET[/prefix]` → (bucket, prefix without surrounding slashes).
pub fn parse_store_url(url: &str) -> Result<(String, String)> {
    let rest = url.strip_prefix("s3://").ok_or_else(|| {
        CasError::invalid(
            format!("store URL {url:?}"),
            "expected s3://BUCKET[/prefix]",
        )
    })?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(CasError::invalid(
            format!("store URL {url:?}"),
            "no bucket name",
        ));
    }
    Ok((bucket.to_string(), prefix.trim_matches('/').to_string()))
}

/// object_store's HTTP client uses rustls without a bundled crypto provider (see the workspace
/// manifest): ring, the provider of the rest of the workspace, becomes the process default
/// unless one is already installed.
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

impl BucketStore {
    /// A store over `s3://BUCKET[/prefix]`, configured by the process's `AWS_*` environment
    /// (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
    /// `AWS_ALLOW_HTTP`, …, as `object_store` reads them).
    pub fn from_url(url: &str, options: BucketOptions, index: Arc<dyn BlobIndex>) -> Result<Self> {
        let vars = std::env::vars_os()
            .filter_map(|(key, value)| Some((key.into_string().ok()?, value.into_string().ok()?)));
        BucketStore::from_url_and_vars(url, vars, options, index)
    }

    /// [`BucketStore::from_url`] with the `AWS_*` variables given instead of read from the
    /// environment (a process that serves several buckets, tests).
    pub fn from_url_and_vars(
        url: &str,
        vars: impl IntoIterator<Item = (impl AsRef<str>, impl AsRef<str>)>,
        options: BucketOptions,
        index: Arc<dyn BlobIndex>,
    ) -> Result<Self> {
        let (bucket, prefix) = parse_store_url(url)?;
        let mut builder = AmazonS3Builder::new();
        for (key, value) in vars {
            let key = key.as_ref();
            if key.starts_with("AWS_")
                && let Ok(config) = key.to_ascii_lowercase().parse()
            {
                builder = builder.with_config(config, value.as_ref());
            }
        }
        let builder = builder.with_url(format!("s3://{bucket}"));
        BucketStore::build(builder, &bucket, &prefix, options, index)
    }

    /// A store over a bucket given explicitly.
    pub fn from_settings(
        settings: &BucketSettings,
        options: BucketOptions,
        index: Arc<dyn BlobIndex>,
    ) -> Result<Self> {
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&settings.bucket)
            .with_access_key_id(&settings.access_key_id)
            .with_secret_access_key(&settings.secret_access_key)
            .with_region(&settings.region)
            .with_allow_http(settings.allow_http);
        if let Some(endpoint) = &settings.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        BucketStore::build(builder, &settings.bucket, &settings.prefix, options, index)
    }

    fn build(
        builder: AmazonS3Builder,
        bucket: &str,
        prefix: &str,
        options: BucketOptions,
        index: Arc<dyn BlobIndex>,
    ) -> Result<Self> {
        install_crypto_provider();
        let objects = builder
            .with_retry(options.retry.clone())
            .build()
            .map_err(|e| CasError::Unavailable(format!("s3 bucket {bucket}: configuring: {e}")))?;
        Ok(BucketStore::with_object_store(
            Arc::new(objects),
            bucket,
            prefix,
            options,
            index,
        ))
    }

    /// A store over any `object_store` implementation (`bucket` names it in errors).
    pub fn with_object_store(
        objects: Arc<dyn ObjectStore>,
        bucket: &str,
        prefix: &str,
        options: BucketOptions,
        index: Arc<dyn BlobIndex>,
    ) -> Self {
        BucketStore {
            objects,
            index,
            bucket: bucket.into(),
            prefix: prefix.trim_matches('/').into(),
            options,
        }
    }

    /// The object store underneath.
    pub fn objects(&self) -> &Arc<dyn ObjectStore> {
        &self.objects
    }

    /// The index of presence.
    pub fn index(&self) -> &Arc<dyn BlobIndex> {
        &self.index
    }

    /// The bucket's name.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Whether the bucket answers (for readiness checks): lists the blob keys' first level
    /// (one small request), so a wrong bucket, endpoint or credentials show here.
    pub async fn ready(&self) -> Result<()> {
        let cas = self.key_under("cas");
        self.objects
            .list_with_delimiter(Some(&cas))
            .await
            .map(|_| ())
            .map_err(|e| self.unavailable(format_args!("listing {cas}"), e))
    }

    fn key_under(&self, name: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(name)
        } else {
            ObjectPath::from(format!("{}/{name}", self.prefix))
        }
    }

    /// The key of a blob: `<prefix>/cas/<function>/<hex hash>-<size>`.
    pub fn key(&self, digest: &Digest) -> ObjectPath {
        self.key_under(&format!(
            "cas/{}/{}-{}",
            digest.function.name(),
            digest.hash_hex(),
            digest.size
        ))
    }

    fn unavailable(&self, operation: impl fmt::Display, error: object_store::Error) -> CasError {
        CasError::Unavailable(format!(
            "s3 bucket {}: {operation}: {}",
            self.bucket,
            with_causes(&error)
        ))
    }

    /// Stores bytes already checked against `digest` under its key.
    async fn put_checked(&self, digest: &Digest, bytes: Bytes) -> Result<()> {
        let key = self.key(digest);
        self.objects
            .put(&key, PutPayload::from_bytes(bytes))
            .await
            .map(|_| ())
            .map_err(|e| self.unavailable(format_args!("put {key}"), e))
    }

    /// Streams a large blob as a multipart upload, completed only once its bytes match.
    async fn put_multipart_checked(&self, digest: Digest, mut chunks: ChunkStream) -> Result<()> {
        let key = self.key(&digest);
        let upload = self
            .objects
            .put_multipart(&key)
            .await
            .map_err(|e| self.unavailable(format_args!("starting upload of {key}"), e))?;
        let mut upload = AbortOnDrop(Some(WriteMultipart::new_with_chunk_size(
            upload,
            part_size(self.options.part_size, digest.size),
        )));
        let mut hasher = BackgroundHasher::start(digest.function);
        let mut received = 0u64;
        let refused = loop {
            let chunk = match chunks.next().await {
                None => break None,
                Some(Err(e)) => break Some(e),
                Some(Ok(chunk)) => chunk,
            };
            received += chunk.len() as u64;
            if received > digest.size {
                break Some(CasError::SizeMismatch {
                    expected: digest,
                    actual: received,
                });
            }
            if let Err(e) = upload
                .get()
                .wait_for_capacity(self.options.part_concurrency)
                .await
            {
                break Some(self.unavailable(format_args!("uploading {key}"), e));
            }
            hasher.update(chunk.clone()).await;
            upload.get().put(chunk);
        };
        let refused = match refused {
            Some(e) => Some(e),
            None if received != digest.size => Some(CasError::SizeMismatch {
                expected: digest,
                actual: received,
            }),
            None => match hasher.finish().await {
                Ok(actual) if actual == digest => None,
                Ok(actual) => Some(CasError::HashMismatch {
                    expected: digest,
                    actual,
                }),
                Err(e) => Some(e),
            },
        };
        if let Some(error) = refused {
            if let Err(e) = upload.take().abort().await {
                tracing::warn!(%key, error = %e, "aborting a refused multipart upload");
            }
            return Err(error);
        }
        upload
            .take()
            .finish()
            .await
            .map(|_| ())
            .map_err(|e| self.unavailable(format_args!("completing upload of {key}"), e))
    }
}

/// S3 allows at most this many parts in one multipart upload.
const MAX_PARTS: u64 = 10_000;

/// The part size for a blob of `size` bytes: the configured one, or larger (in whole MiB) when
/// the blob would need more than [`MAX_PARTS`] parts of it.
fn part_size(configured: usize, size: u64) -> usize {
    let needed = size.div_ceil(MAX_PARTS).next_multiple_of(1 << 20);
    (configured as u64).max(needed) as usize
}

/// A multipart upload that is aborted if dropped unfinished: a write whose future is dropped
/// (the client went away) does not leave its parts stored and billed until the bucket's
/// lifecycle rule cleans them.
struct AbortOnDrop(Option<WriteMultipart>);

impl AbortOnDrop {
    fn get(&mut self) -> &mut WriteMultipart {
        self.0.as_mut().expect("upload still in progress")
    }

    fn take(&mut self) -> WriteMultipart {
        self.0.take().expect("upload still in progress")
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(upload) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                if let Err(e) = upload.abort().await {
                    tracing::warn!(error = %e, "aborting an abandoned multipart upload");
                }
            });
        }
    }
}

/// Hashes chunks on tokio's blocking pool while the caller goes on uploading them.
struct BackgroundHasher {
    chunks: tokio::sync::mpsc::Sender<Bytes>,
    task: tokio::task::JoinHandle<Digest>,
}

impl BackgroundHasher {
    fn start(function: DigestFunction) -> Self {
        let (chunks, mut rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let task = tokio::task::spawn_blocking(move || {
            let mut hasher = function.hasher();
            while let Some(chunk) = rx.blocking_recv() {
                hasher.update(&chunk);
            }
            hasher.finish()
        });
        BackgroundHasher { chunks, task }
    }

    async fn update(&mut self, chunk: Bytes) {
        // The task ends only when the sender is dropped, so the send cannot fail.
        let _ = self.chunks.send(chunk).await;
    }

    async fn finish(self) -> Result<Digest> {
        drop(self.chunks);
        self.task
            .await
            .map_err(|e| CasError::Unavailable(format!("hashing task failed: {e}")))
    }
}

/// Reads a stream to its end only to count it: what a write of a blob already present does.
async fn drain_counting(digest: Digest, mut chunks: ChunkStream) -> Result<()> {
    let mut received = 0u64;
    while let Some(chunk) = chunks.next().await {
        received += chunk?.len() as u64;
        if received > digest.size {
            break;
        }
    }
    if received != digest.size {
        return Err(CasError::SizeMismatch {
            expected: digest,
            actual: received,
        });
    }
    Ok(())
}

/// Collects a small blob, refusing more bytes than its digest says as soon as they arrive.
async fn collect(digest: Digest, mut chunks: ChunkStream) -> Result<Bytes> {
    let mut buffer = BytesMut::with_capacity(digest.size as usize);
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        if (buffer.len() + chunk.len()) as u64 > digest.size {
            return Err(CasError::SizeMismatch {
                expected: digest,
                actual: (buffer.len() + chunk.len()) as u64,
            });
        }
        buffer.extend_from_slice(&chunk);
    }
    if buffer.len() as u64 != digest.size {
        return Err(CasError::SizeMismatch {
            expected: digest,
            actual: buffer.len() as u64,
        });
    }
    Ok(buffer.freeze())
}

/// Whether `bytes` are the blob `digest` names.
fn check(digest: &Digest, bytes: &[u8]) -> Result<()> {
    if bytes.len() as u64 != digest.size {
        return Err(CasError::SizeMismatch {
            expected: *digest,
            actual: bytes.len() as u64,
        });
    }
    let actual = digest.function.digest_of(bytes);
    if actual != *digest {
        return Err(CasError::HashMismatch {
            expected: *digest,
            actual,
        });
    }
    Ok(())
}

/// An error with the causes its own text leaves out ("error sending request" says little;
/// "…: tcp connect error: Connection refused" says what to fix).
fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The same failure for another blob of a batch ([`CasError`] is not `Clone`).
fn same_error(error: &CasError) -> CasError {
    match error {
        CasError::Unavailable(message) => CasError::Unavailable(message.clone()),
        other => CasError::Unavailable(other.to_string()),
    }
}

fn empty_stream() -> ChunkStream {
    futures::stream::empty().boxed()
}

#[async_trait]
impl Store for BucketStore {
    fn backend(&self) -> &'static str {
        "s3"
    }

    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.index.find_missing(digests).await
    }

    async fn touch(&self, digests: &[Digest]) -> Result<()> {
        self.index.touch(digests).await
    }

    async fn read(&self, digest: &Digest, offset: u64, limit: u64) -> Result<ChunkStream> {
        if offset > digest.size {
            return Err(CasError::OffsetOutOfRange {
                digest: *digest,
                offset,
            });
        }
        if digest.is_empty_blob() {
            return Ok(empty_stream());
        }
        if !self
            .index
            .find_missing(std::slice::from_ref(digest))
            .await?
            .is_empty()
        {
            return Err(CasError::NotFound(*digest));
        }
        let end = if limit == 0 {
            digest.size
        } else {
            offset.saturating_add(limit).min(digest.size)
        };
        if offset == end {
            return Ok(empty_stream());
        }
        // A read is a use (eviction order), recorded beside the read rather than before it.
        let (index, used) = (self.index.clone(), *digest);
        tokio::spawn(async move {
            if let Err(e) = index.touch(&[used]).await {
                tracing::warn!(digest = ?used, error = %e, "marking a read blob as used");
            }
        });
        let key = self.key(digest);
        let options = GetOptions::new().with_range(Some(GetRange::Bounded(offset..end)));
        let got = match self.objects.get_opts(&key, options).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => {
                tracing::warn!(%key, "indexed blob gone from the bucket: forgetting it");
                self.index.remove(std::slice::from_ref(digest)).await?;
                return Err(CasError::NotFound(*digest));
            }
            Err(e) => return Err(self.unavailable(format_args!("get {key}"), e)),
        };
        if got.meta.size != digest.size {
            // Only checked bytes are ever put under a key: this object was written behind the
            // store's back. Forget it, so the blob is uploaded (and overwritten) again.
            tracing::error!(%key, size = got.meta.size, "object of the wrong size: forgetting it");
            self.index.remove(std::slice::from_ref(digest)).await?;
            return Err(CasError::NotFound(*digest));
        }
        let this = self.clone();
        Ok(got
            .into_stream()
            .map(move |chunk| chunk.map_err(|e| this.unavailable(format_args!("get {key}"), e)))
            .boxed())
    }

    async fn write(&self, digest: Digest, chunks: ChunkStream) -> Result<()> {
        if digest.size > self.options.max_blob_bytes {
            return Err(CasError::QuotaExceeded(format!(
                "blob {digest:?} is larger than the {} bytes s3 bucket {} takes",
                self.options.max_blob_bytes, self.bucket
            )));
        }
        if digest.is_empty_blob()
            || self
                .index
                .find_missing(std::slice::from_ref(&digest))
                .await?
                .is_empty()
        {
            return drain_counting(digest, chunks).await;
        }
        if digest.size <= self.options.single_put_max {
            let bytes = collect(digest, chunks).await?;
            let checked = bytes.clone();
            tokio::task::spawn_blocking(move || check(&digest, &checked))
                .await
                .map_err(|e| CasError::Unavailable(format!("hashing task failed: {e}")))??;
            self.put_checked(&digest, bytes).await?;
        } else {
            self.put_multipart_checked(digest, chunks).await?;
        }
        self.index.insert(&[digest]).await
    }

    async fn write_batch(&self, blobs: Vec<(Digest, Bytes)>) -> Vec<Result<()>> {
        let count = blobs.len();
        // Check every blob off the runtime threads.
        let checked = tokio::task::spawn_blocking(move || {
            let outcomes: Vec<Result<()>> = blobs.iter().map(|(d, b)| check(d, b)).collect();
            (blobs, outcomes)
        })
        .await;
        let (blobs, mut outcomes) = match checked {
            Ok(checked) => checked,
            Err(e) => {
                let message = format!("hashing task failed: {e}");
                return (0..count)
                    .map(|_| Err(CasError::Unavailable(message.clone())))
                    .collect();
            }
        };
        let candidates: Vec<Digest> = blobs
            .iter()
            .zip(&outcomes)
            .filter(|((digest, _), outcome)| outcome.is_ok() && !digest.is_empty_blob())
            .map(|((digest, _), _)| *digest)
            .collect();
        let missing = match self.index.find_missing(&candidates).await {
            Ok(missing) => missing,
            Err(e) => {
                return outcomes
                    .into_iter()
                    .map(|outcome| outcome.and(Err(same_error(&e))))
                    .collect();
            }
        };
        // One put per distinct missing blob (find_missing answers without duplicates).
        let first: HashMap<Digest, usize> = blobs
            .iter()
            .enumerate()
            .rev()
            .map(|(i, (digest, _))| (*digest, i))
            .collect();
        let puts = futures::stream::iter(missing.into_iter().map(|digest| {
            let bytes = blobs[first[&digest]].1.clone();
            async move { (digest, self.put_checked(&digest, bytes).await) }
        }))
        .buffer_unordered(self.options.batch_concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
        let mut failed: HashMap<Digest, CasError> = HashMap::new();
        let mut stored = Vec::new();
        for (digest, outcome) in puts {
            match outcome {
                Ok(()) => stored.push(digest),
                Err(e) => {
                    failed.insert(digest, e);
                }
            }
        }
        if !stored.is_empty()
            && let Err(e) = self.index.insert(&stored).await
        {
            for digest in stored {
                failed.insert(digest, same_error(&e));
            }
        }
        for ((digest, _), outcome) in blobs.iter().zip(outcomes.iter_mut()) {
            if outcome.is_ok()
                && let Some(error) = failed.get(digest)
            {
                *outcome = Err(same_error(error));
            }
        }
        outcomes
    }

    fn stats(&self) -> StoreStats {
        self.index.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_grow_so_an_upload_never_needs_more_than_s3_allows() {
        let mib = 1usize << 20;
        assert_eq!(part_size(8 * mib, 20 * mib as u64), 8 * mib);
        assert_eq!(part_size(8 * mib, 10_000 * 8 * mib as u64), 8 * mib);
        let five_tib = 5u64 << 40;
        let part = part_size(8 * mib, five_tib);
        assert_eq!(part % mib, 0);
        assert!(five_tib.div_ceil(part as u64) <= MAX_PARTS);
        assert!(part > 8 * mib);
    }
}
