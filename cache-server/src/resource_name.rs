//! ByteStream resource names and instance names, as REAPI v2.3 defines them.
//!
//! ```text
//! read:  {instance}/blobs/{digest_function/}{hash}/{size}{/metadata}
//!        {instance}/compressed-blobs/{compressor}/{digest_function/}{hash}/{size}{/metadata}
//! write: {instance}/uploads/{uuid}/blobs/{digest_function/}{hash}/{size}{/metadata}
//!        {instance}/uploads/{uuid}/compressed-blobs/{compressor}/{digest_function/}{hash}/{size}{/metadata}
//! ```
//! The instance may span several segments (or none: then there is no leading slash). No segment
//! of an instance name may equal one of the reserved keywords, which is what makes the first
//! `blobs`/`compressed-blobs`/`uploads` segment unambiguous. `digest_function` is present only
//! for functions that cannot be inferred from the hash length (for us: `blake3`); without it a
//! 64-hex-character hash means SHA-256.
//!
//! Resource names that are not blobs (e.g. the executor's live stdout streams) parse to
//! [`ResourceError::NotABlob`] so ByteStream can hand them to another reader.

use rba_cas::{Digest, DigestFunction};
use tonic::Status;

/// Path segments that may not appear in an instance name.
pub const RESERVED_SEGMENTS: [&str; 7] = [
    "blobs",
    "uploads",
    "actions",
    "actionResults",
    "operations",
    "capabilities",
    "compressed-blobs",
];

/// Longest resource name accepted (instance names included); longer ones are hostile.
pub const MAX_RESOURCE_NAME_LEN: usize = 4096;

/// How a blob's bytes travel on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compressor {
    /// Plain bytes.
    Identity,
    /// A zstd stream (one or more frames) of the bytes.
    Zstd,
}

impl Compressor {
    /// The REAPI enum value.
    pub fn to_reapi(self) -> i32 {
        match self {
            Compressor::Identity => rba_proto::reapi::compressor::Value::Identity as i32,
            Compressor::Zstd => rba_proto::reapi::compressor::Value::Zstd as i32,
        }
    }

    /// Maps a REAPI enum value; unsupported ones are `INVALID_ARGUMENT`.
    pub fn from_reapi(value: i32) -> Result<Self, Status> {
        use rba_proto::reapi::compressor::Value;
        match Value::try_from(value) {
            Ok(Value::Identity) => Ok(Compressor::Identity),
            Ok(Value::Zstd) => Ok(Compressor::Zstd),
            Ok(other) => Err(Status::invalid_argument(format!(
                "unsupported compressor {} (supported: identity, zstd)",
                other.as_str_name().to_ascii_lowercase()
            ))),
            Err(_) => Err(Status::invalid_argument(format!(
                "unknown compressor enum value {value}"
            ))),
        }
    }
}

/// A blob named by a resource name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobResource {
    /// The instance name (may contain slashes, may be empty).
    pub instance: String,
    /// The blob's digest (of the uncompressed bytes).
    pub digest: Digest,
    /// How the bytes travel.
    pub compressor: Compressor,
}

/// An upload named by a write resource name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadResource {
    /// The blob being uploaded.
    pub blob: BlobResource,
    /// The client's upload id.
    pub uuid: String,
    /// The resource name without optional metadata: identifies the upload for resumption.
    pub key: String,
}

/// Why a resource name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResourceError {
    /// Not a blob resource name at all (no `blobs`/`compressed-blobs`/`uploads` segment).
    #[error("resource name {0:?} does not name a blob")]
    NotABlob(String),
    /// A blob resource name, but malformed.
    #[error("malformed resource name {name:?}: {reason}")]
    Malformed {
        /// The name, truncated.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

impl From<ResourceError> for Status {
    fn from(error: ResourceError) -> Status {
        match error {
            ResourceError::NotABlob(_) => Status::invalid_argument(error.to_string()),
            ResourceError::Malformed { .. } => Status::invalid_argument(error.to_string()),
        }
    }
}

fn truncate(text: &str) -> String {
    const LIMIT: usize = 160;
    if text.len() <= LIMIT {
        return text.to_string();
    }
    let mut end = LIMIT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

fn malformed(name: &str, reason: impl Into<String>) -> ResourceError {
    ResourceError::Malformed {
        name: truncate(name),
        reason: reason.into(),
    }
}

/// Checks an instance name: no reserved or empty segments, no `.`/`..`, printable, bounded.
pub fn validate_instance_name(instance: &str) -> Result<(), Status> {
    check_instance(instance).map_err(|reason| {
        Status::invalid_argument(format!(
            "invalid instance name {:?}: {reason}",
            truncate(instance)
        ))
    })
}

fn check_instance(instance: &str) -> Result<(), String> {
    if instance.is_empty() {
        return Ok(());
    }
    if instance.len() > MAX_RESOURCE_NAME_LEN {
        return Err(format!("longer than {MAX_RESOURCE_NAME_LEN} bytes"));
    }
    if instance.chars().any(|c| c.is_control()) {
        return Err("contains control characters".into());
    }
    for segment in instance.split('/') {
        if segment.is_empty() {
            return Err("empty path segment".into());
        }
        if segment == "." || segment == ".." {
            return Err(format!("path segment {segment:?}"));
        }
        if RESERVED_SEGMENTS.contains(&segment) {
            return Err(format!("path segment {segment:?} is reserved"));
        }
    }
    Ok(())
}

/// Lowercase names of every REAPI `DigestFunction.Value` except `UNKNOWN`.
const REAPI_FUNCTION_NAMES: [&str; 9] = [
    "sha256",
    "sha1",
    "md5",
    "vso",
    "sha384",
    "sha512",
    "murmur3",
    "sha256tree",
    "blake3",
];

/// Parses the part after `blobs/` (or after `compressed-blobs/{compressor}/`):
/// `{digest_function/}{hash}/{size}{/metadata}`. Returns the digest and how many segments it used.
fn parse_digest_tail(name: &str, tail: &[&str]) -> Result<(Digest, usize), ResourceError> {
    let first = *tail
        .first()
        .ok_or_else(|| malformed(name, "missing hash/size"))?;
    let (function, rest, used) = if REAPI_FUNCTION_NAMES.contains(&first) {
        let function = DigestFunction::from_name(first).map_err(|_| {
            malformed(
                name,
                format!("unsupported digest function {first:?} (supported: sha256, blake3)"),
            )
        })?;
        (function, &tail[1..], 1)
    } else if first.chars().all(|c| c.is_ascii_hexdigit()) {
        match first.len() {
            64 => (DigestFunction::Sha256, tail, 0),
            n => {
                return Err(malformed(
                    name,
                    format!("cannot infer a supported digest function from a {n}-character hash"),
                ));
            }
        }
    } else {
        return Err(malformed(
            name,
            format!(
                "{:?} is neither a digest function nor a hash",
                truncate(first)
            ),
        ));
    };
    let (hash, size) = match rest {
        [hash, size, ..] => (*hash, *size),
        _ => return Err(malformed(name, "expected {hash}/{size}")),
    };
    if size.is_empty() || !size.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed(
            name,
            format!("size {:?} is not a non-negative integer", truncate(size)),
        ));
    }
    let size: i64 = size
        .parse()
        .map_err(|_| malformed(name, "size out of range"))?;
    let digest =
        Digest::from_hex(function, hash, size).map_err(|e| malformed(name, e.to_string()))?;
    Ok((digest, used + 2))
}

/// Parses `blobs/...` or `compressed-blobs/{compressor}/...` starting at `segments[0]`.
/// Returns the compressor, digest and number of segments consumed.
fn parse_blob_part(
    name: &str,
    segments: &[&str],
) -> Result<(Compressor, Digest, usize), ResourceError> {
    match segments.first() {
        Some(&"blobs") => {
            let (digest, used) = parse_digest_tail(name, &segments[1..])?;
            Ok((Compressor::Identity, digest, 1 + used))
        }
        Some(&"compressed-blobs") => {
            let compressor = match segments.get(1) {
                Some(&"zstd") => Compressor::Zstd,
                Some(other) => {
                    return Err(malformed(
                        name,
                        format!(
                            "unsupported compressor {:?} (supported: zstd)",
                            truncate(other)
                        ),
                    ));
                }
                None => return Err(malformed(name, "missing compressor")),
            };
            let (digest, used) = parse_digest_tail(name, &segments[2..])?;
            Ok((compressor, digest, 2 + used))
        }
        _ => Err(malformed(name, "expected blobs/ or compressed-blobs/")),
    }
}

fn check_length(name: &str) -> Result<(), ResourceError> {
    if name.len() > MAX_RESOURCE_NAME_LEN {
        return Err(malformed(
            name,
            format!("longer than {MAX_RESOURCE_NAME_LEN} bytes"),
        ));
    }
    Ok(())
}

fn instance_of(name: &str, segments: &[&str]) -> Result<String, ResourceError> {
    let instance = segments.join("/");
    check_instance(&instance)
        .map_err(|reason| malformed(name, format!("instance name: {reason}")))?;
    Ok(instance)
}

/// Parses a ByteStream `Read` resource name.
pub fn parse_read(name: &str) -> Result<BlobResource, ResourceError> {
    check_length(name)?;
    let segments: Vec<&str> = name.split('/').collect();
    let Some(at) = segments
        .iter()
        .position(|s| *s == "blobs" || *s == "compressed-blobs")
    else {
        return Err(ResourceError::NotABlob(truncate(name)));
    };
    let instance = instance_of(name, &segments[..at])?;
    let (compressor, digest, _) = parse_blob_part(name, &segments[at..])?;
    Ok(BlobResource {
        instance,
        digest,
        compressor,
    })
}

/// Parses a ByteStream `Write` (or `QueryWriteStatus`) resource name.
pub fn parse_write(name: &str) -> Result<UploadResource, ResourceError> {
    check_length(name)?;
    let segments: Vec<&str> = name.split('/').collect();
    let Some(at) = segments.iter().position(|s| *s == "uploads") else {
        if segments
            .iter()
            .any(|s| *s == "blobs" || *s == "compressed-blobs")
        {
            return Err(malformed(
                name,
                "writes go to {instance}/uploads/{uuid}/blobs/...",
            ));
        }
        return Err(ResourceError::NotABlob(truncate(name)));
    };
    let instance = instance_of(name, &segments[..at])?;
    let uuid = match segments.get(at + 1) {
        Some(uuid) if !uuid.is_empty() && !RESERVED_SEGMENTS.contains(uuid) => uuid.to_string(),
        _ => return Err(malformed(name, "missing upload id after uploads/")),
    };
    let (compressor, digest, used) = parse_blob_part(name, &segments[at + 2..])?;
    let key = segments[..at + 2 + used].join("/");
    Ok(UploadResource {
        blob: BlobResource {
            instance,
            digest,
            compressor,
        },
        uuid,
        key,
    })
}

/// The read resource name of a blob (what clients send), for tests and tools.
pub fn read_name(instance: &str, digest: &Digest, compressor: Compressor) -> String {
    let mut name = String::new();
    if !instance.is_empty() {
        name.push_str(instance);
        name.push('/');
    }
    blob_suffix(&mut name, digest, compressor);
    name
}

/// The write resource name of a blob, for tests and tools.
pub fn write_name(instance: &str, uuid: &str, digest: &Digest, compressor: Compressor) -> String {
    let mut name = String::new();
    if !instance.is_empty() {
        name.push_str(instance);
        name.push('/');
    }
    name.push_str("uploads/");
    name.push_str(uuid);
    name.push('/');
    blob_suffix(&mut name, digest, compressor);
    name
}

fn blob_suffix(name: &mut String, digest: &Digest, compressor: Compressor) {
    match compressor {
        Compressor::Identity => name.push_str("blobs/"),
        Compressor::Zstd => name.push_str("compressed-blobs/zstd/"),
    }
    if digest.function != DigestFunction::Sha256 {
        name.push_str(digest.function.name());
        name.push('/');
    }
    name.push_str(&format!("{}/{}", digest.hash_hex(), digest.size));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha() -> Digest {
        DigestFunction::Sha256.digest_of(b"hello")
    }

    #[test]
    fn parses_classic_and_v23_forms() {
        let d = sha();
        let r = parse_read(&format!("blobs/{}/{}", d.hash_hex(), d.size)).unwrap();
        assert_eq!(
            r,
            BlobResource {
                instance: String::new(),
                digest: d,
                compressor: Compressor::Identity
            }
        );
        let r = parse_read(&format!(
            "a/b/c/blobs/{}/{}/meta/data",
            d.hash_hex(),
            d.size
        ))
        .unwrap();
        assert_eq!(r.instance, "a/b/c");
        let b = DigestFunction::Blake3.digest_of(b"hello");
        let r = parse_read(&format!(
            "main/compressed-blobs/zstd/blake3/{}/{}",
            b.hash_hex(),
            b.size
        ))
        .unwrap();
        assert_eq!(
            (r.instance.as_str(), r.digest, r.compressor),
            ("main", b, Compressor::Zstd)
        );
        let r = parse_read(&format!("x/blobs/sha256/{}/{}", d.hash_hex(), d.size)).unwrap();
        assert_eq!(r.digest, d);
        let w = parse_write(&format!(
            "ci/linux/uploads/u-1/blobs/blake3/{}/{}/extra",
            b.hash_hex(),
            b.size
        ))
        .unwrap();
        assert_eq!(w.blob.instance, "ci/linux");
        assert_eq!(w.uuid, "u-1");
        assert_eq!(w.blob.digest, b);
        assert_eq!(
            w.key,
            format!(
                "ci/linux/uploads/u-1/blobs/blake3/{}/{}",
                b.hash_hex(),
                b.size
            )
        );
        for compressor in [Compressor::Identity, Compressor::Zstd] {
            for digest in [d, b] {
                assert_eq!(
                    parse_read(&read_name("i/j", &digest, compressor))
                        .unwrap()
                        .digest,
                    digest
                );
                let w = parse_write(&write_name("", "u", &digest, compressor)).unwrap();
                assert_eq!((w.blob.digest, w.blob.compressor), (digest, compressor));
            }
        }
    }

    #[test]
    fn refuses_hostile_names() {
        let d = sha();
        let h = d.hash_hex();
        let bad = [
            format!("blobs/{h}"),
            format!("blobs/{h}/-1"),
            format!("blobs/{h}/+5"),
            format!("blobs/{h}/99999999999999999999999"),
            format!("blobs/{}/5", &h[..40]),
            format!("blobs/sha1/{}/5", &h[..40]),
            format!("blobs/md5/{h}/5"),
            format!("blobs/nonsense/{h}/5"),
            format!("blobs/{}/5", h.to_uppercase()),
            format!("compressed-blobs/deflate/{h}/5"),
            format!("compressed-blobs/{h}/5"),
            format!("a//b/blobs/{h}/5"),
            format!("../blobs/{h}/5"),
            format!("{}/blobs/{h}/5", "x".repeat(5000)),
        ];
        for name in &bad {
            assert!(
                matches!(parse_read(name), Err(ResourceError::Malformed { .. })),
                "{name}"
            );
        }
        assert!(matches!(
            parse_read("operations/123"),
            Err(ResourceError::NotABlob(_))
        ));
        assert!(matches!(
            parse_write(&format!("blobs/{h}/5")),
            Err(ResourceError::Malformed { .. })
        ));
        assert!(matches!(
            parse_write(&format!("uploads/blobs/{h}/5")),
            Err(ResourceError::Malformed { .. })
        ));
        assert!(matches!(
            parse_write(&format!("uploads//blobs/{h}/5")),
            Err(ResourceError::Malformed { .. })
        ));
        assert!(validate_instance_name("a/blobs/c").is_err());
        assert!(validate_instance_name("ok/instance-1").is_ok());
        assert!(validate_instance_name("").is_ok());
        assert!(validate_instance_name("/lead").is_err());
    }
}
