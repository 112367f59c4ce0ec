//! Content-addressed storage for rust-build-agent: digests, the blob store, the action cache
//! and Merkle trees.
//!
//! Every other crate stands on this one. The REAPI server serves these blobs and action
//! results, the executor materialises input roots from them and stores outputs back, and the
//! agent hashes users' workspaces into them.
//!
//! - [`digest`]: SHA-256 and BLAKE3 digests, their text and REAPI forms.
//! - [`seams`]: the [`Store`], [`ActionCache`] and [`Grants`] traits every caller names, and
//!   their embedded implementations.
//! - [`store`]: the filesystem blob store with its sled index (the truth of what is present,
//!   with an in-memory presence cache), group commit of batches, LRU eviction, `verify`, and
//!   one process at a time per data dir (others wait).
//! - [`action_cache`]: (instance, action digest) → `ActionResult`, returned only when complete.
//! - [`merkle`]: canonical REAPI `Directory` trees from disk or zip archives (with a stat cache
//!   and limits against hostile archives), their validation, enumeration and materialisation.
//! - [`access`]: which tenant may read which blob (grants on upload and on results served).
//! - [`backends`]: the scale-out backends: blobs in an S3-compatible bucket
//!   ([`backends::s3::BucketStore`]) with their presence index; the blob index, the action cache
//!   and the grants in PostgreSQL ([`backends::postgres`]).
//! - [`layers`]: features as layers over the seams: completeness of action-cache hits, a local
//!   fast tier in front of a bucket ([`layers::tiered::Tiered`]), peer fetch from trusted
//!   operators ([`layers::peer`]).
//! - `read_buffers`: the megabyte buffers large streamed reads are read into, reused once the
//!   network has sent them.
//! - [`records`]: a named key space in the embedded database for a node's own records (its
//!   build history), so no other crate names the database engine.
//! - [`stores`]: [`Stores`], the store, complete action cache and grants a server is given.
//! - [`Cas`]: one handle on all of them, sharing one sled database.
//!
//! The concrete types do blocking I/O; async callers go through the seams ([`Store`],
//! [`ActionCache`], [`Grants`], bundled as [`Stores`]), whose embedded implementations run
//! that work on tokio's blocking pool.

pub mod access;
pub mod action_cache;
pub mod backends;
pub mod digest;
pub mod error;
pub mod layers;
pub mod merkle;
mod read_buffers;
pub mod records;
pub mod seams;
pub mod store;
pub mod stores;

use std::path::Path;

pub use access::EmbeddedGrants;
pub use action_cache::EmbeddedActionCache;
pub use digest::{Digest, DigestError, DigestFunction};
pub use error::{CasError, Result};
pub use layers::complete::CompleteActionCache;
pub use merkle::{
    DirOptions, MAX_BUILT_DEPTH, MaterializeOptions, Materialized, MaterializedFile, StatCache,
    TreeBuild, TreeBuilder, TreeLimits, TreeStats, ZipLimits, build_from_dir, build_from_zip,
    build_from_zip_file, get_tree, make_tree_local, materialize, missing_in_tree, read_directory,
    tree_digests, tree_digests_in, tree_digests_readable_in, validate_directory, validate_tree,
};
pub use records::EmbeddedRecords;
pub use seams::{ActionCache, BlobIndex, ChunkStream, Grants, Store};
pub use store::{BlobReader, BlobStore, BlobWriter, StagedBlob, StoreConfig, StoreStats};
pub use stores::Stores;

/// The store and its action cache, opened together from one directory. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Cas {
    /// The blob store.
    pub blobs: BlobStore,
    /// The action cache over the same store.
    pub actions: EmbeddedActionCache,
    /// Who may read which blob of the store.
    pub reads: EmbeddedGrants,
}

impl Cas {
    /// Opens (creating if needed) a CAS under `root`.
    pub fn open(root: impl AsRef<Path>, config: StoreConfig) -> Result<Self> {
        let blobs = BlobStore::open(root, config)?;
        let actions = EmbeddedActionCache::open(blobs.clone())?;
        let reads = EmbeddedGrants::open(blobs.clone())?;
        Ok(Cas {
            blobs,
            actions,
            reads,
        })
    }

    /// A throwaway CAS in a new temporary directory, without fsync (tests, benchmarks). It
    /// lives as long as the returned directory guard.
    pub fn scratch() -> Result<(tempfile::TempDir, Self)> {
        let dir = tempfile::tempdir()
            .map_err(|e| CasError::io("creating a scratch store in", std::env::temp_dir(), e))?;
        let cas = Cas::open(dir.path(), StoreConfig::without_fsync())?;
        Ok((dir, cas))
    }
}
