//! Content digests: SHA-256 (REAPI's default, the only one Bazel 4 speaks) and BLAKE3 (our
//! native function for our own trees).
//!
//! A [`Digest`] is `(function, hash, size)`. Its text form is the REAPI resource-name form
//! `hash/size`; the function travels separately (in the REAPI request's `digest_function`, or
//! inferred from the hash length, which is ambiguous for these two 32-byte functions, so the
//! default is SHA-256 as the specification says).

use std::fmt;
use std::str::FromStr;

use rba_proto::reapi;
use sha2::Digest as _;

/// The hash functions the store accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DigestFunction {
    /// SHA-256, REAPI's default.
    Sha256,
    /// BLAKE3 (256-bit output).
    Blake3,
}

impl DigestFunction {
    /// Every supported function.
    pub const ALL: [DigestFunction; 2] = [DigestFunction::Sha256, DigestFunction::Blake3];

    /// Lowercase name, used in paths and in our own protocols.
    pub fn name(self) -> &'static str {
        match self {
            DigestFunction::Sha256 => "sha256",
            DigestFunction::Blake3 => "blake3",
        }
    }

    /// Parses a lowercase name as produced by [`DigestFunction::name`].
    pub fn from_name(name: &str) -> Result<Self, DigestError> {
        match name {
            "sha256" => Ok(DigestFunction::Sha256),
            "blake3" => Ok(DigestFunction::Blake3),
            other => Err(DigestError::UnknownFunction(other.to_string())),
        }
    }

    /// The REAPI `DigestFunction.Value` of this function.
    pub fn to_reapi(self) -> reapi::digest_function::Value {
        match self {
            DigestFunction::Sha256 => reapi::digest_function::Value::Sha256,
            DigestFunction::Blake3 => reapi::digest_function::Value::Blake3,
        }
    }

    /// Maps a REAPI `digest_function` field (an `i32`) to a supported function.
    ///
    /// `UNKNOWN` (0) means "not said": the caller infers from the hash length, which for our two
    /// 32-byte functions means SHA-256, as REAPI v2.3 specifies for old clients.
    pub fn from_reapi(value: i32) -> Result<Self, DigestError> {
        use reapi::digest_function::Value;
        match Value::try_from(value) {
            Ok(Value::Sha256) | Ok(Value::Unknown) => Ok(DigestFunction::Sha256),
            Ok(Value::Blake3) => Ok(DigestFunction::Blake3),
            Ok(other) => Err(DigestError::UnknownFunction(
                other.as_str_name().to_ascii_lowercase(),
            )),
            Err(_) => Err(DigestError::UnknownFunction(format!("enum value {value}"))),
        }
    }

    /// A fresh incremental hasher.
    pub fn hasher(self) -> Hasher {
        match self {
            DigestFunction::Sha256 => Hasher::Sha256(Box::default()),
            DigestFunction::Blake3 => Hasher::Blake3(Box::default()),
        }
    }

    /// Hashes a whole buffer.
    pub fn digest_of(self, bytes: &[u8]) -> Digest {
        let mut hasher = self.hasher();
        hasher.update(bytes);
        hasher.finish()
    }

    /// The digest of the empty blob, which every store holds implicitly.
    pub fn empty(self) -> Digest {
        self.digest_of(&[])
    }
}

impl fmt::Display for DigestFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An incremental hasher that also counts bytes, so it yields a complete [`Digest`].
pub enum Hasher {
    /// SHA-256 state.
    Sha256(Box<(sha2::Sha256, u64)>),
    /// BLAKE3 state.
    Blake3(Box<(blake3::Hasher, u64)>),
}

impl Hasher {
    /// Feeds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(state) => {
                state.0.update(bytes);
                state.1 += bytes.len() as u64;
            }
            Hasher::Blake3(state) => {
                state.0.update(bytes);
                state.1 += bytes.len() as u64;
            }
        }
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        match self {
            Hasher::Sha256(state) => state.1,
            Hasher::Blake3(state) => state.1,
        }
    }

    /// True when nothing was fed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        match self {
            Hasher::Sha256(state) => Digest {
                function: DigestFunction::Sha256,
                hash: state.0.finalize().into(),
                size: state.1,
            },
            Hasher::Blake3(state) => Digest {
                function: DigestFunction::Blake3,
                hash: *state.0.finalize().as_bytes(),
                size: state.1,
            },
        }
    }
}

/// A content digest: hash function, 32-byte hash and size in bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    /// The function that produced `hash`.
    pub function: DigestFunction,
    /// The raw hash.
    pub hash: [u8; 32],
    /// The blob's size in bytes.
    pub size: u64,
}

/// Why a digest could not be parsed or converted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    /// The digest function is not SHA-256 or BLAKE3.
    #[error("unsupported digest function {0:?} (supported: sha256, blake3)")]
    UnknownFunction(String),
    /// The hash is not 64 lowercase hex characters.
    #[error("malformed hash {0:?}: expected 64 lowercase hex characters")]
    MalformedHash(String),
    /// The size is negative or not a number.
    #[error("malformed size {0:?}: expected a non-negative integer")]
    MalformedSize(String),
    /// The text is not `hash/size`.
    #[error("malformed digest {0:?}: expected HASH/SIZE")]
    MalformedDigest(String),
    /// A REAPI message lacked a required digest.
    #[error("missing digest in {0}")]
    Missing(&'static str),
}

impl Digest {
    /// Builds a digest from a hex hash and a size.
    pub fn from_hex(
        function: DigestFunction,
        hash_hex: &str,
        size: i64,
    ) -> Result<Self, DigestError> {
        let hash = parse_hash(hash_hex)?;
        if size < 0 {
            return Err(DigestError::MalformedSize(size.to_string()));
        }
        Ok(Digest {
            function,
            hash,
            size: size as u64,
        })
    }

    /// Parses `hash/size`.
    pub fn parse(function: DigestFunction, text: &str) -> Result<Self, DigestError> {
        let (hash, size) = text
            .split_once('/')
            .ok_or_else(|| DigestError::MalformedDigest(text.to_string()))?;
        let size: i64 = size
            .parse()
            .map_err(|_| DigestError::MalformedSize(size.to_string()))?;
        Digest::from_hex(function, hash, size)
    }

    /// Lowercase hex of the hash.
    ///
    /// Through a fixed buffer: `hex::encode`'s char-by-char `String` building was a fifth of
    /// the CPU of a client asking FindMissing about 1,000 digests per call (and this is every
    /// REAPI digest we send and every blob path we build).
    pub fn hash_hex(&self) -> String {
        let mut text = [0u8; 64];
        hex::encode_to_slice(self.hash, &mut text).expect("64 hex digits for 32 bytes");
        String::from_utf8(text.to_vec()).expect("hex digits are ASCII")
    }

    /// True for the digest of the empty blob.
    pub fn is_empty_blob(&self) -> bool {
        self.size == 0 && *self == self.function.empty()
    }

    /// Converts a REAPI digest, whose function comes from the request.
    pub fn from_reapi(
        function: DigestFunction,
        digest: &reapi::Digest,
    ) -> Result<Self, DigestError> {
        Digest::from_hex(function, &digest.hash, digest.size_bytes)
    }

    /// Converts an optional REAPI digest field, naming the field when it is absent.
    pub fn from_reapi_field(
        function: DigestFunction,
        digest: Option<&reapi::Digest>,
        field: &'static str,
    ) -> Result<Self, DigestError> {
        Digest::from_reapi(function, digest.ok_or(DigestError::Missing(field))?)
    }

    /// The REAPI form of this digest (the function is carried by the request, not the digest).
    pub fn to_reapi(&self) -> reapi::Digest {
        reapi::Digest {
            hash: self.hash_hex(),
            size_bytes: self.size as i64,
        }
    }

    /// Converts to our own wire form.
    pub fn to_wire(&self) -> rba_proto::rba::v1::BlobDigest {
        rba_proto::rba::v1::BlobDigest {
            function: self.function.name().to_string(),
            hash: self.hash_hex(),
            size_bytes: self.size as i64,
        }
    }

    /// Converts from our own wire form.
    pub fn from_wire(wire: &rba_proto::rba::v1::BlobDigest) -> Result<Self, DigestError> {
        Digest::from_hex(
            DigestFunction::from_name(&wire.function)?,
            &wire.hash,
            wire.size_bytes,
        )
    }
}

fn parse_hash(hash_hex: &str) -> Result<[u8; 32], DigestError> {
    hash_from_hex(hash_hex.as_bytes()).ok_or_else(|| DigestError::MalformedHash(truncate(hash_hex)))
}

/// The hash whose lowercase hex is `hex` (64 digits, nothing else), or `None`: the one rule
/// for a digest's hash text, for callers that hold it as bytes (a request decoded by hand)
/// as well as [`Digest::from_hex`].
pub fn hash_from_hex(hex: &[u8]) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    // One pass, lowercase only: FindMissing parses thousands of these per request.
    let mut hash = [0u8; 32];
    for (out, pair) in hash.iter_mut().zip(hex.chunks_exact(2)) {
        let (high, low) = (LOWER_HEX[pair[0] as usize], LOWER_HEX[pair[1] as usize]);
        if (high | low) > 0x0f {
            return None;
        }
        *out = (high << 4) | low;
    }
    Some(hash)
}

/// Value of each lowercase hex digit, 0xff for every other byte.
const LOWER_HEX: [u8; 256] = {
    let mut table = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};

/// Keeps hostile inputs from flooding error messages.
fn truncate(text: &str) -> String {
    const LIMIT: usize = 80;
    if text.len() <= LIMIT {
        text.to_string()
    } else {
        let mut end = LIMIT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &text[..end])
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.hash_hex(), self.size)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.function, self.hash_hex(), self.size)
    }
}

/// Parses `function:hash/size` (the `Debug` form), or `hash/size` as SHA-256.
impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.split_once(':') {
            Some((function, rest)) => Digest::parse(DigestFunction::from_name(function)?, rest),
            None => Digest::parse(DigestFunction::Sha256, text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        assert_eq!(
            DigestFunction::Sha256.empty().hash_hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            DigestFunction::Blake3.empty().hash_hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        assert_eq!(DigestFunction::Sha256.digest_of(b"abc").size, 3);
    }

    #[test]
    fn round_trips_through_text_reapi_and_wire() {
        for function in DigestFunction::ALL {
            let digest = function.digest_of(b"hello");
            assert_eq!(
                Digest::parse(function, &digest.to_string()).unwrap(),
                digest
            );
            assert_eq!(
                Digest::from_reapi(function, &digest.to_reapi()).unwrap(),
                digest
            );
            assert_eq!(Digest::from_wire(&digest.to_wire()).unwrap(), digest);
            assert_eq!(format!("{digest:?}").parse::<Digest>().unwrap(), digest);
        }
    }

    #[test]
    fn hostile_text_is_refused_with_a_named_error() {
        let f = DigestFunction::Sha256;
        assert!(matches!(
            Digest::parse(f, "abc"),
            Err(DigestError::MalformedDigest(_))
        ));
        assert!(matches!(
            Digest::parse(f, "abc/1"),
            Err(DigestError::MalformedHash(_))
        ));
        let upper = "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855/0";
        assert!(matches!(
            Digest::parse(f, upper),
            Err(DigestError::MalformedHash(_))
        ));
        let hash = f.empty().hash_hex();
        assert!(matches!(
            Digest::parse(f, &format!("{hash}/-1")),
            Err(DigestError::MalformedSize(_))
        ));
        assert!(matches!(
            Digest::parse(f, &format!("{hash}/x")),
            Err(DigestError::MalformedSize(_))
        ));
        assert!(matches!(
            DigestFunction::from_reapi(3),
            Err(DigestError::UnknownFunction(_))
        ));
        assert!(matches!(
            DigestFunction::from_reapi(999),
            Err(DigestError::UnknownFunction(_))
        ));
        let long = "a".repeat(10_000);
        let message = Digest::parse(f, &format!("{long}/1"))
            .unwrap_err()
            .to_string();
        assert!(
            message.len() < 200,
            "error message must not echo huge input"
        );
    }

    #[test]
    fn unknown_reapi_function_defaults_to_sha256() {
        assert_eq!(
            DigestFunction::from_reapi(0).unwrap(),
            DigestFunction::Sha256
        );
        assert_eq!(
            DigestFunction::from_reapi(9).unwrap(),
            DigestFunction::Blake3
        );
    }
}
