//! Backends of the seams ([`crate::seams`]) beyond the embedded filesystem store: where an
//! operator who outgrows one machine keeps blobs and the exact state. The embedded backends live
//! beside the types they wrap ([`crate::store`], [`crate::action_cache`], [`crate::access`]).
//!
//! - [`s3`]: blob bytes in an S3-compatible bucket, presence in a [`crate::BlobIndex`].
//! - [`embedded_index`]: a [`crate::BlobIndex`] in sled, for a bucket store run without a
//!   database server (one process per directory).
//! - [`postgres`]: the blob index, the action cache and the grants in PostgreSQL, with
//!   migrations and a schema version per component.

pub mod embedded_index;
pub mod postgres;
pub mod s3;
