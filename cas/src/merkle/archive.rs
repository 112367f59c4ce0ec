//! Building a tree from a zip archive, refusing hostile archives.
//!
//! Two passes. The first reads only the central directory and refuses, before any byte is
//! decompressed: too many entries (checked on the end-of-central-directory record, before the
//! zip crate allocates anything per entry), duplicate names (the zip crate silently keeps one
//! of two same-named entries: we compare the declared count with the distinct count), bad paths
//! (absolute, drive letters, `..`, backslashes, NUL), a path that is both a file and a
//! directory, encrypted or special entries, a declared total above the limit, and suspicious
//! declared compression ratios. The second pass decompresses and stores, counting the bytes
//! that really come out, since declared sizes can lie: more bytes than declared, above the
//! total, or above the ratio stop the build. Blobs written before a refusal stay (they are
//! content-addressed and verified); no root is returned.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use zip::ZipArchive;
use zip::read::ZipFile;

use super::{PendingBlobs, TreeBuild, TreeBuilder};
use crate::digest::DigestFunction;
use crate::error::{CasError, Result};
use crate::store::BlobStore;

/// Limits applied to an archive; refusals name the entry that crossed them.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ZipLimits {
    /// Most entries (files, directories, symlinks) an archive may hold.
    pub max_entries: u64,
    /// Most uncompressed bytes all entries together may hold.
    pub max_total_bytes: u64,
    /// Highest uncompressed/compressed ratio accepted for entries larger than
    /// `ratio_min_bytes`.
    pub max_ratio: u64,
    /// Entries up to this size are not subject to `max_ratio` (small files of zeros are fine).
    pub ratio_min_bytes: u64,
    /// Longest symlink target accepted.
    pub max_symlink_target: u64,
}

impl Default for ZipLimits {
    fn default() -> Self {
        ZipLimits {
            max_entries: 100_000,
            max_total_bytes: 4 << 30,
            max_ratio: 200,
            ratio_min_bytes: 1 << 20,
            max_symlink_target: 4096,
        }
    }
}

/// The name used in errors about the archive as a whole.
const ARCHIVE: &str = "(archive)";

/// Entries up to this size are decompressed into memory, hashed, and stored if missing.
const SMALL_ENTRY: u64 = 1 << 20;

#[derive(Clone, Copy)]
enum Kind {
    Dir,
    File { executable: bool },
    Symlink,
}

/// [`build_from_zip`] on a file.
pub fn build_from_zip_file(
    store: &BlobStore,
    path: &Path,
    function: DigestFunction,
    limits: &ZipLimits,
) -> Result<TreeBuild> {
    let file = File::open(path).map_err(|e| CasError::io("opening", path, e))?;
    build_from_zip(store, BufReader::new(file), function, limits)
}

/// Builds the tree held by a zip archive, storing every file and `Directory` in `store`.
///
/// Hostile archives are refused with [`CasError::HostileEntry`] naming the entry (or
/// `"(archive)"` for archive-wide problems); unreadable ones with [`CasError::Invalid`].
/// Executable bits come from the entries' Unix modes; symlinks are entries with the symlink
/// mode, whose content is the target.
pub fn build_from_zip<R: Read + Seek>(
    store: &BlobStore,
    mut reader: R,
    function: DigestFunction,
    limits: &ZipLimits,
) -> Result<TreeBuild> {
    let declared = declared_entry_count(&mut reader)?;
    if let Some(declared) = declared
        && declared > limits.max_entries
    {
        return Err(too_many(declared, limits));
    }
    let mut archive =
        ZipArchive::new(reader).map_err(|e| CasError::invalid("zip archive", e.to_string()))?;
    let count = archive.len() as u64;
    if count > limits.max_entries {
        return Err(too_many(count, limits));
    }
    if let Some(declared) = declared
        && declared != count
    {
        return Err(CasError::hostile(
            ARCHIVE,
            format!(
                "the central directory lists {declared} entries but only {count} distinct names: duplicate entries"
            ),
        ));
    }

    // Pass 1: metadata only.
    let placeholder = function.empty();
    let mut plan = TreeBuilder::new(function);
    let mut entries = Vec::with_capacity(archive.len());
    let mut declared_total = 0u64;
    for index in 0..archive.len() {
        let hint = archive
            .name_for_index(index)
            .map(str::to_string)
            .unwrap_or_else(|| format!("#{index}"));
        let entry = archive
            .by_index_raw(index)
            .map_err(|e| CasError::hostile(hint, e.to_string()))?;
        let name = entry.name().to_string();
        check_zip_name(&name)?;
        if entry.encrypted() {
            return Err(CasError::hostile(
                name,
                "encrypted entries are not supported",
            ));
        }
        let kind = classify(&entry, &name)?;
        let size = entry.size();
        let compressed = entry.compressed_size();
        declared_total = declared_total.saturating_add(size);
        if declared_total > limits.max_total_bytes {
            return Err(CasError::hostile(
                name,
                format!(
                    "declared uncompressed total exceeds the limit of {} bytes",
                    limits.max_total_bytes
                ),
            ));
        }
        if size > limits.ratio_min_bytes && size > compressed.saturating_mul(limits.max_ratio) {
            return Err(CasError::hostile(
                name,
                format!(
                    "declared compression ratio {}:1 exceeds the limit of {}:1",
                    size / compressed.max(1),
                    limits.max_ratio
                ),
            ));
        }
        match kind {
            Kind::Dir => plan.add_directory(&name)?,
            Kind::File { .. } => plan.add_file(&name, placeholder, false)?,
            Kind::Symlink => {
                if size > limits.max_symlink_target {
                    return Err(CasError::hostile(name, "symlink target too long"));
                }
                // The target is checked in pass 2; here only the path's shape matters.
                plan.insert(&name, Some(super::Node::Symlink(String::new())))?;
            }
        }
        drop(entry);
        entries.push((name, kind, size, compressed));
    }
    drop(plan);

    // Pass 2: decompress, count, store.
    let mut builder = TreeBuilder::new(function);
    let pending = PendingBlobs::default();
    let mut budget = limits.max_total_bytes;
    let (mut files_hashed, mut new_blobs, mut new_bytes) = (0u64, 0u64, 0u64);
    for (index, (name, kind, size, compressed)) in entries.into_iter().enumerate() {
        if let Kind::Dir = kind {
            builder.add_directory(&name)?;
            continue;
        }
        let mut entry = archive
            .by_index(index)
            .map_err(|e| CasError::hostile(&name, e.to_string()))?;
        let mut counted = Counted {
            name: &name,
            declared: size,
            compressed,
            limits,
            budget: &mut budget,
            read: 0,
        };
        match kind {
            Kind::Symlink => {
                let mut target = Vec::new();
                counted.pump(&mut entry, |chunk| {
                    target.extend_from_slice(chunk);
                    Ok(())
                })?;
                let target = String::from_utf8(target)
                    .map_err(|_| CasError::hostile(&name, "symlink target is not UTF-8"))?;
                builder.add_symlink(&name, &target)?;
            }
            Kind::File { executable } => {
                let (digest, new) = if size <= SMALL_ENTRY {
                    let mut bytes = Vec::with_capacity(size as usize);
                    counted.pump(&mut entry, |chunk| {
                        bytes.extend_from_slice(chunk);
                        Ok(())
                    })?;
                    let digest = function.digest_of(&bytes);
                    (digest, pending.stage_bytes(store, digest, &bytes)?)
                } else {
                    let mut writer = store.writer_for(function)?;
                    let mut hasher = function.hasher();
                    counted.pump(&mut entry, |chunk| {
                        hasher.update(chunk);
                        writer.write_chunk(chunk)
                    })?;
                    let digest = hasher.finish();
                    if store.contains(&digest)? {
                        (digest, false)
                    } else {
                        let staged = writer.stage()?;
                        debug_assert_eq!(staged.digest(), digest);
                        pending.push(staged);
                        (digest, true)
                    }
                };
                files_hashed += 1;
                if new {
                    new_blobs += 1;
                    new_bytes += digest.size;
                }
                builder.add_file(&name, digest, executable)?;
            }
            Kind::Dir => unreachable!("handled above"),
        }
    }
    let mut build = builder.finish_with(store, pending)?;
    build.stats.files_hashed = files_hashed;
    build.stats.new_blobs += new_blobs;
    build.stats.new_bytes += new_bytes;
    Ok(build)
}

fn too_many(count: u64, limits: &ZipLimits) -> CasError {
    CasError::hostile(
        ARCHIVE,
        format!("{count} entries exceed the limit of {}", limits.max_entries),
    )
}

/// Refuses entry names that could escape the tree or mean different paths on different hosts.
fn check_zip_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        "empty entry name"
    } else if name.contains('\0') {
        "NUL byte in entry name"
    } else if name.contains('\\') {
        "backslash in entry name (zip paths use '/')"
    } else if name.starts_with('/') {
        "absolute path"
    } else if name.len() >= 2
        && name.as_bytes()[0].is_ascii_alphabetic()
        && name.as_bytes()[1] == b':'
    {
        "absolute path with a drive letter"
    } else if name.split('/').any(|c| c == "..") {
        "'..' component escapes the tree"
    } else {
        return Ok(());
    };
    Err(CasError::hostile(name, reason))
}

fn classify<R: Read>(entry: &ZipFile<'_, R>, name: &str) -> Result<Kind> {
    const TYPE_MASK: u32 = 0o170_000;
    let mode = entry.unix_mode();
    let kind = mode.map(|m| m & TYPE_MASK).unwrap_or(0);
    if name.ends_with('/') {
        return match kind {
            0 | 0o040_000 => Ok(Kind::Dir),
            _ => Err(CasError::hostile(
                name,
                "directory entry with a non-directory mode",
            )),
        };
    }
    match kind {
        0 | 0o100_000 => Ok(Kind::File {
            executable: mode.is_some_and(|m| m & 0o111 != 0),
        }),
        0o120_000 => Ok(Kind::Symlink),
        0o040_000 => Ok(Kind::Dir),
        other => Err(CasError::hostile(
            name,
            format!("special file type {other:o} is not supported"),
        )),
    }
}

/// Counts the bytes that really come out of an entry and stops at the first limit crossed.
struct Counted<'a> {
    name: &'a str,
    declared: u64,
    compressed: u64,
    limits: &'a ZipLimits,
    budget: &'a mut u64,
    read: u64,
}

impl Counted<'_> {
    fn pump(
        &mut self,
        source: &mut impl Read,
        mut sink: impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = source
                .read(&mut buffer)
                .map_err(|e| CasError::hostile(self.name, format!("cannot decompress: {e}")))?;
            if n == 0 {
                break;
            }
            self.read += n as u64;
            if self.read > self.declared {
                return Err(CasError::hostile(
                    self.name,
                    format!(
                        "decompresses to more than its declared {} bytes",
                        self.declared
                    ),
                ));
            }
            if self.read > *self.budget {
                return Err(CasError::hostile(
                    self.name,
                    format!(
                        "uncompressed total exceeds the limit of {} bytes",
                        self.limits.max_total_bytes
                    ),
                ));
            }
            if self.read > self.limits.ratio_min_bytes
                && self.read > self.compressed.saturating_mul(self.limits.max_ratio)
            {
                return Err(CasError::hostile(
                    self.name,
                    format!(
                        "compression ratio exceeds the limit of {}:1",
                        self.limits.max_ratio
                    ),
                ));
            }
            sink(&buffer[..n])?;
        }
        if self.read != self.declared {
            return Err(CasError::hostile(
                self.name,
                format!(
                    "decompresses to {} bytes, not the declared {}",
                    self.read, self.declared
                ),
            ));
        }
        *self.budget -= self.read;
        Ok(())
    }
}

/// The entry count the end-of-central-directory record declares (zip64 aware), or `None` when
/// no record is found (the zip crate then reports the archive as invalid).
fn declared_entry_count<R: Read + Seek>(reader: &mut R) -> Result<Option<u64>> {
    let io = |e| CasError::io("reading", "zip archive", e);
    let len = reader.seek(SeekFrom::End(0)).map_err(io)?;
    let tail_len = len.min(22 + 65_535 + 20);
    reader.seek(SeekFrom::Start(len - tail_len)).map_err(io)?;
    let mut tail = vec![0u8; tail_len as usize];
    reader.read_exact(&mut tail).map_err(io)?;
    reader.seek(SeekFrom::Start(0)).map_err(io)?;
    let Some(eocd) = (0..tail.len().saturating_sub(21))
        .rev()
        .find(|&at| tail[at..].starts_with(b"PK\x05\x06"))
    else {
        return Ok(None);
    };
    let entries = u16::from_le_bytes([tail[eocd + 10], tail[eocd + 11]]);
    if entries != u16::MAX {
        return Ok(Some(entries as u64));
    }
    // Zip64: the locator sits just before the record and points at the zip64 record.
    let Some(locator) = eocd
        .checked_sub(20)
        .filter(|&at| tail[at..].starts_with(b"PK\x06\x07"))
    else {
        return Ok(Some(entries as u64));
    };
    let offset = u64::from_le_bytes(tail[locator + 8..locator + 16].try_into().expect("8 bytes"));
    let mut record = [0u8; 56];
    reader.seek(SeekFrom::Start(offset)).map_err(io)?;
    let found = reader.read_exact(&mut record).is_ok() && record.starts_with(b"PK\x06\x06");
    reader.seek(SeekFrom::Start(0)).map_err(io)?;
    if !found {
        return Ok(None);
    }
    Ok(Some(u64::from_le_bytes(
        record[32..40].try_into().expect("8 bytes"),
    )))
}
