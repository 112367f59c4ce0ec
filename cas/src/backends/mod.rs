//! Backends of the seams ([`crate::seams`]) beyond the embedded filesystem store: where an
//! operator who outgrows one machine keeps blobs and their index.
//!
//! - [`s3`]: blob bytes in an S3-compatible bucket, presence in a [`crate::BlobIndex`].
//! - [`embedded_index`]: a [`crate::BlobIndex`] in sled, for a bucket store run without a
//!   database server (one process per directory).

pub mod embedded_index;
pub mod s3;
