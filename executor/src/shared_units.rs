//! Shared units: compiled registry dependencies recorded after one workspace's build and
//! materialised into the fresh target dir of another (any workspace, any tenant), so a new
//! workspace identity starts warm.
//!
//! ## Mechanism: seeding the target dir from a unit index
//!
//! The sandbox mounts every job at the same paths (`/cargo/registry/src/…`, `/target`,
//! `/toolchain`), so a registry package compiled with the same features, profile, target,
//! toolchain and dependencies is the same compilation unit, down to the file names, in every
//! workspace: cargo names a unit's files and its fingerprint directory with its metadata hash
//! (`deps/libserde-<H>.rlib`, `.fingerprint/serde-<H>/`), which covers the package id, features,
//! profile, target kind, rustc version and the hashes of the unit's dependencies. So:
//!
//! - **After a build** that may publish ([`UnitsPlan::publish`]), every registry unit cargo
//!   compiled (`compiler-artifact` records that are not `fresh`, and `build-script-executed`
//!   records) is stored: its files under `deps/` named with its hash, or its `build/<pkg>-<H>/`
//!   directory, plus its `.fingerprint/<pkg>-<H>/` directory; each file a blob, the unit a
//!   [`UnitRecord`] in the index ([`SharedUnits`]: an action-cache namespace only the executor
//!   writes and no client reads, [`SHARED_UNITS_NAMESPACE`]). The index key is (toolchain
//!   identity, the package's checksum from `Cargo.lock`); a key holds up to [`MAX_VARIANTS`]
//!   units (other features, profiles, dependency versions), most recently published or used
//!   first, each tagged with the kind of build that made it ([`UnitsPlan::variant`]: profile
//!   dir, build or check).
//! - **Before a build in a fresh slot** (empty target dir), every unit of the job's kind of
//!   build indexed under the toolchain and a checksum of the job's `Cargo.lock` is copied into
//!   the target dir (copies, never hardlinks: the build writes into its target dir, a hardlink
//!   would let it write into the store; what a receiving build does to its copies stays in its
//!   slot), each file re-hashed while copied: a unit with a blob that is gone (evicted) or no
//!   longer matches its digest (corrupted) is removed again and rebuilt by cargo, never used.
//!   A used target dir receives nothing: it already holds what its workspace built. Every materialised file gets the same mtime (now): newer than any registry source, and
//!   no unit newer than another, which is what cargo's mtime comparisons between a unit and its
//!   dependencies need.
//! - **Cargo decides freshness**, as in any incremental build: a unit is used only if its
//!   fingerprint (the hash of everything above plus rustflags, the relevant environment and
//!   config, and its dependencies' fingerprints) equals what this build computes; a variant
//!   whose key differs in anything is not looked at and is simply never read (it costs the copy).
//!   The workspace's own crates (path packages) are never shared.
//!
//! Why this rather than a `rustc` wrapper keyed on normalised invocations: the wrapper would have
//! to reproduce cargo's notion of a unit's inputs (env, dep-info, build-script outputs, proc-macro
//! dylibs, linking) and would run inside the sandbox, where a workspace controls the process tree;
//! seeding runs on the executor side, before the sandbox starts, and leaves every decision to
//! cargo's own fingerprints, which local incremental builds already rely on.
//!
//! ## Trust
//!
//! A shared unit is read by builds of every tenant, so what goes into it must not depend on
//! anything a workspace controls beyond what its key covers. [`UnitsPlan::for_job`] decides, once
//! per job, and a job outside the rules neither receives nor publishes:
//! - the Command is one the executor makes ([`crate::action::cargo_command`]): `cargo
//!   build|check|test|clippy|run`, the executor's own environment and no other, and only arguments
//!   that select packages, targets, features or the profile (all part of cargo's unit hash); no
//!   `--config`, `-Z`, `--target` or anything else (a REAPI client can send any argument vector);
//! - no `.cargo` directory anywhere in the workspace (config: `rustflags`, `RUSTC_WRAPPER`,
//!   `[env]`, linkers, source replacement) and no manifest with `[patch]`, `[replace]` or
//!   `cargo-features`;
//! - publishing also needs the build to be **clean** (the slot's target dir was empty when the job
//!   took it: no earlier job's build script could have planted a file), a `build` or `check` job
//!   (no workspace test binary or program runs after compilation: `test` and `run` receive
//!   only), and **no workspace code run at build
//!   time**: a path or git package with a build script or a proc-macro in the build stops
//!   publishing ([`BuildUnits::artifact`]), since it runs in the same sandbox as the registry
//!   units' compilation and could rewrite their files. Only units of packages whose source is a
//!   registry and that have a checksum in the lock file are stored.
//!
//! Registry code that runs at build time: a registry package's build script or proc-macro runs
//! in the publishing build with write access to its target dir, so a malicious crate a
//! publishing workspace depends on could rewrite another registry unit of that build before it is
//! stored. A unit therefore records the registry packages whose code ran at build time where it
//! was made ([`UnitRecord::build_time_code`], by checksum), and only a build whose own lock file
//! names every one of them receives it: whatever could have touched the unit is code the
//! receiving workspace chose to run in its own build anyway, where it could touch that unit just
//! the same. A tenant cannot reach another tenant's build through a crate the other did not pick.
//! (The lock file is the receiving side's measure: it may name packages a given build does not
//! compile, e.g. optional ones; those are still packages the workspace's owner locked.) A node
//! whose operator wants no sharing at all turns it off (`ExecutorConfig::shared_units`, node
//! config `shared_units = false`).
//!
//! Eviction: unit files are ordinary blobs of the store, under its LRU and byte budget
//! (materialising touches them); a unit whose blobs are gone is skipped, rebuilt and dropped from
//! the index until a build publishes it again, and the index keeps [`MAX_VARIANTS`] per key.
//! A key's variants are kept by use: after any build that received units, those cargo found
//! fresh move to the front of their key, so a tenant publishing many feature combinations of a
//! package pushes out unused variants, not the ones builds use. [`SharedUnits::stats`] counts
//! what the index names (for the node's `/cache/stats`).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use rba_cas::merkle::beneath::{Beneath, EntryKind};
use rba_cas::{Cas, CasError, Digest, DigestFunction, StagedBlob};
use rba_proto::reapi::{ActionResult, Command, OutputFile};
use serde::{Deserialize, Serialize};

use crate::cargo::CargoArtifact;
use crate::sandbox::TARGET_DIR;

/// Units kept per (toolchain, package checksum): other features, profiles, dependency versions.
pub const MAX_VARIANTS: usize = 8;
/// Files of one unit at most (a build script's `out/` can be large; beyond this it is not stored).
const MAX_UNIT_FILES: usize = 512;
/// Bytes of one unit at most.
const MAX_UNIT_BYTES: u64 = 512 << 20;
/// The action-cache namespace of the index: under `rba/`, so REAPI `UpdateActionResult` refuses
/// it, and with a NUL, so no client-facing read serves it (see the runner's
/// `is_executor_namespace` and `is_private_namespace`).
pub const SHARED_UNITS_NAMESPACE: &str = "rba/units\u{0}shared";
/// Largest unit record read back from the store.
const MAX_RECORD_BYTES: u64 = 4 << 20;

/// One file of a unit, relative to the target dir (`debug/deps/libitoa-<H>.rlib`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct UnitFile {
    /// Path under the target dir.
    pub path: String,
    /// Its blob, `blake3:HEX/SIZE`.
    pub digest: String,
    /// Executable bit.
    pub executable: bool,
}

/// One compilation unit (or build-script run) as stored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct UnitRecord {
    /// Its fingerprint directory under the target dir (`debug/.fingerprint/itoa-<H>`): unique
    /// per unit, the name cargo gives it from its metadata hash.
    pub id: String,
    /// Directories to create (some are empty, e.g. a build script's `out/`).
    pub dirs: Vec<String>,
    /// Its files.
    pub files: Vec<UnitFile>,
    /// Their total size.
    pub bytes: u64,
    /// The kind of build that made it ([`UnitsPlan::variant`]): only builds of the same kind
    /// receive it (a `check` build's metadata-only units are useless to a `build`).
    #[serde(default)]
    pub variant: String,
    /// The registry packages (by `Cargo.lock` checksum) whose code ran at build time in the
    /// build that made it — build scripts and proc-macros, which could write to any file of
    /// that build's target dir: only a build whose own lock file has every one of them
    /// receives the unit (see the module doc, "Trust").
    #[serde(default)]
    pub build_time_code: Vec<String>,
}

/// What the index names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedUnitStats {
    /// Units indexed (their blobs may since have been evicted).
    pub units: u64,
    /// Bytes of their files.
    pub bytes: u64,
}

/// What materialising found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Materialised {
    /// Units written into the target dir.
    pub units: usize,
    /// Bytes written.
    pub bytes: u64,
    /// Units not written, with why (`evicted`, `corrupt`).
    pub skipped: Vec<(String, String)>,
    /// The ids of the units written (not published again by the build).
    pub ids: Vec<String>,
}

/// What publishing stored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Published {
    /// Units indexed.
    pub units: usize,
    /// Bytes of their files.
    pub bytes: u64,
}

/// The index of shared units over a CAS. Cheap to clone.
///
/// Stored in the action cache, in [`SHARED_UNITS_NAMESPACE`]: one entry per (toolchain,
/// package checksum), keyed by the BLAKE3 of both; each of its `output_files` is one unit, named
/// by its id, whose digest is the unit's [`UnitRecord`] (JSON) stored as a blob and also inlined
/// in `contents`. Unit files are blobs of the store. So the index lives wherever the action cache
/// and the store live (a scale-out node's shared ones included), and an entry is read without
/// the completeness check of a hit: a unit with a missing blob is skipped, not the entry.
/// Read-modify-write: two builds publishing the same package at once may lose one's variants
/// (the next build publishes them again).
#[derive(Clone, Debug)]
pub struct SharedUnits {
    cas: Cas,
}

impl SharedUnits {
    /// The index of `cas`.
    pub fn new(cas: Cas) -> Self {
        SharedUnits { cas }
    }

    /// Units and bytes the index names.
    pub fn stats(&self) -> SharedUnitStats {
        let mut stats = SharedUnitStats::default();
        for result in self
            .cas
            .actions
            .results_in(SHARED_UNITS_NAMESPACE)
            .unwrap_or_default()
        {
            for unit in result.output_files.iter().filter_map(|f| self.decode(f)) {
                stats.units += 1;
                stats.bytes += unit.bytes;
            }
        }
        stats
    }

    /// The units indexed under a toolchain and a package checksum, newest first.
    pub fn units(&self, toolchain: &str, checksum: &str) -> Vec<UnitRecord> {
        match self
            .cas
            .actions
            .get_unchecked(SHARED_UNITS_NAMESPACE, &index_key(toolchain, checksum))
        {
            Ok(Some(result)) => result
                .output_files
                .iter()
                .filter_map(|f| self.decode(f))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// A unit record of an index entry: its inlined contents if they match its digest, else its
    /// blob (verified too); `None` when neither does.
    fn decode(&self, file: &OutputFile) -> Option<UnitRecord> {
        let digest =
            Digest::from_reapi_field(DigestFunction::Blake3, file.digest.as_ref(), "unit").ok()?;
        let matches = |bytes: &[u8]| DigestFunction::Blake3.digest_of(bytes) == digest;
        let bytes = if matches(&file.contents) {
            file.contents.clone()
        } else {
            let bytes = self.cas.blobs.read_to_vec(&digest, MAX_RECORD_BYTES).ok()?;
            matches(&bytes).then_some(bytes)?
        };
        serde_json::from_slice(&bytes).ok()
    }

    /// The entry of (`toolchain`, `checksum`) with `change` applied to its units, its record
    /// blobs added to `staged`: `None` when the change changed nothing, else the key and the new
    /// entry (`None`: no unit left, the entry goes).
    fn changed_entry(
        &self,
        toolchain: &str,
        checksum: &str,
        change: impl FnOnce(&mut Vec<UnitRecord>),
        staged: &mut Vec<StagedBlob>,
    ) -> Result<Option<IndexEntry>, CasError> {
        let key = index_key(toolchain, checksum);
        let before = self.units(toolchain, checksum);
        let mut units = before.clone();
        change(&mut units);
        if units == before {
            return Ok(None);
        }
        if units.is_empty() {
            return Ok(Some(IndexEntry { key, result: None }));
        }
        let mut output_files = Vec::new();
        for unit in &units {
            let json = serde_json::to_vec(unit)
                .map_err(|e| CasError::invalid(format!("unit {}", unit.id), e.to_string()))?;
            let mut writer = self.cas.blobs.writer_for(DigestFunction::Blake3)?;
            writer.write_chunk(&json)?;
            let blob = writer.stage()?;
            output_files.push(OutputFile {
                path: unit.id.clone(),
                digest: Some(blob.digest().to_reapi()),
                contents: json,
                ..Default::default()
            });
            staged.push(blob);
        }
        let result = ActionResult {
            output_files,
            ..Default::default()
        };
        Ok(Some(IndexEntry {
            key,
            result: Some(result),
        }))
    }

    /// Publishes `staged` (one group commit), then writes the index entries.
    fn commit(&self, staged: Vec<StagedBlob>, entries: Vec<IndexEntry>) -> Result<(), CasError> {
        for published in self.cas.blobs.publish(staged) {
            published?;
        }
        for IndexEntry { key, result } in entries {
            match result {
                Some(result) => self
                    .cas
                    .actions
                    .put(SHARED_UNITS_NAMESPACE, &key, &result)?,
                None => {
                    self.cas.actions.remove(SHARED_UNITS_NAMESPACE, &key)?;
                }
            }
        }
        Ok(())
    }

    /// Copies every unit indexed under `toolchain` and a registry checksum of `lockfile`, made
    /// by a build of the kind `variant`, into `target` (a fresh target dir, executor side); blobs
    /// re-hashed on the way, a unit with a missing or corrupt blob removed again (from the target
    /// dir and the index) and reported in [`Materialised::skipped`].
    pub fn materialise(
        &self,
        toolchain: &str,
        variant: &str,
        lockfile: &str,
        target: &Path,
    ) -> io::Result<Materialised> {
        let target = Beneath::open(target)?;
        let now = SystemTime::now();
        let mut done = Materialised::default();
        let locked = lock_registry_packages(lockfile);
        let chosen: BTreeSet<&String> = locked.values().collect();
        for checksum in locked.values() {
            let mut unusable = Vec::new();
            for unit in self.units(toolchain, checksum) {
                if unit.variant != variant || target.metadata(Path::new(&unit.id)).is_ok() {
                    continue;
                }
                // Made where code this workspace did not pick ran at build time: not for it.
                if !unit.build_time_code.iter().all(|c| chosen.contains(c)) {
                    continue;
                }
                match self.write_unit(&target, &unit, now) {
                    Ok(()) => {
                        done.units += 1;
                        done.bytes += unit.bytes;
                        done.ids.push(unit.id);
                    }
                    Err(skip) => {
                        remove_unit(&target, &unit);
                        if skip.unusable {
                            unusable.push(unit.id.clone());
                        }
                        done.skipped.push((unit.id, skip.why));
                    }
                }
            }
            if !unusable.is_empty() {
                // Out of the index (and of the stats) until a build publishes it again.
                let mut staged = Vec::new();
                let entry = self
                    .changed_entry(
                        toolchain,
                        checksum,
                        |units| units.retain(|u| !unusable.contains(&u.id)),
                        &mut staged,
                    )
                    .and_then(|entry| self.commit(staged, entry.into_iter().collect()));
                entry.map_err(io::Error::other)?;
            }
        }
        Ok(done)
    }

    fn write_unit(&self, target: &Beneath, unit: &UnitRecord, now: SystemTime) -> Result<(), Skip> {
        let io = |e: io::Error| Skip::failed(format!("writing: {e}"));
        for dir in &unit.dirs {
            target
                .create_dir_all(&plain(dir).map_err(Skip::unusable)?)
                .map_err(io)?;
        }
        for file in &unit.files {
            let path = plain(&file.path).map_err(Skip::unusable)?;
            let digest: Digest = file
                .digest
                .parse()
                .map_err(|e| Skip::unusable(format!("{e}")))?;
            let mut reader = match self.cas.blobs.reader(&digest, 0, 0) {
                Ok(reader) => reader,
                Err(CasError::NotFound(_)) => return Err(Skip::unusable("evicted".into())),
                Err(e) => return Err(Skip::failed(format!("reading: {e}"))),
            };
            let parent = path.parent().unwrap_or(Path::new(""));
            target.create_dir_all(parent).map_err(io)?;
            let dir = target.open_dir(parent).map_err(io)?;
            let mode = if file.executable { 0o755 } else { 0o644 };
            let (temp, mut out) = dir.create_temp(mode).map_err(io)?;
            let mut hasher = digest.function.hasher();
            let mut buffer = vec![0u8; 1 << 16];
            loop {
                let n = reader
                    .read(&mut buffer)
                    .map_err(|e| Skip::failed(format!("reading: {e}")))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buffer[..n]);
                out.write_all(&buffer[..n]).map_err(io)?;
            }
            let written = hasher.finish();
            let name = path.file_name().map(Path::new).unwrap_or(Path::new(""));
            if written != digest {
                let _ = dir.remove(Path::new(&temp));
                // Gone from the store, so the unit's next publication stores it again.
                let _ = self.cas.blobs.remove_if_corrupt(&digest);
                return Err(Skip::unusable(format!(
                    "corrupt ({} does not match its digest)",
                    file.path
                )));
            }
            out.set_modified(now).map_err(io)?;
            dir.rename_from(&dir, Path::new(&temp), name).map_err(io)?;
        }
        Ok(())
    }

    /// Stores the registry units `built` names, if it [`BuildUnits::publishes`] (files read
    /// beneath `target` without following anything), and indexes them under `toolchain` and
    /// their package's checksum in `lockfile`; moves the materialised units the build used to the
    /// front of their keys.
    pub fn publish(
        &self,
        toolchain: &str,
        variant: &str,
        lockfile: &str,
        target: &Path,
        built: &BuildUnits,
    ) -> Result<Published, CasError> {
        let checksums = lock_registry_packages(lockfile);
        let target_dir = Beneath::open(target).map_err(|e| CasError::io("opening", target, e))?;
        let mut by_checksum: BTreeMap<String, Vec<UnitRecord>> = BTreeMap::new();
        let mut published = Published::default();
        // Every package whose code ran at build time, by checksum; one without a checksum
        // cannot be named to a receiver, so then nothing of this build is stored.
        let build_time_code: Option<Vec<String>> = built
            .build_time_code
            .iter()
            .map(|id| registry_package(id).and_then(|key| checksums.get(&key).cloned()))
            .collect::<Option<BTreeSet<_>>>()
            .map(|set| set.into_iter().collect());
        let mut staged = Vec::new();
        let stored = if built.publishes() && build_time_code.is_some() {
            &built.units[..]
        } else {
            &[]
        };
        for unit in stored {
            let Some(checksum) = registry_package(&unit.package_id)
                .and_then(|(source, name, version)| checksums.get(&(source, name, version)))
            else {
                continue;
            };
            let Some(mut record) =
                self.store_unit(&target_dir, target, unit, &built.materialised, &mut staged)?
            else {
                continue;
            };
            record.variant = variant.to_string();
            record.build_time_code = build_time_code.clone().unwrap_or_default();
            published.units += 1;
            published.bytes += record.bytes;
            by_checksum
                .entry(checksum.clone())
                .or_default()
                .push(record);
        }
        // Materialised units cargo used move up their key's list: variants are kept by use.
        let mut used: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for unit in &built.used {
            let Some(checksum) = registry_package(&unit.package_id)
                .and_then(|(source, name, version)| checksums.get(&(source, name, version)))
            else {
                continue;
            };
            let Some((id, _)) = unit_paths(&target_dir, unit) else {
                continue;
            };
            let id = id.display().to_string();
            if built.materialised.contains(&id) {
                used.entry(checksum.clone()).or_default().push(id);
                by_checksum.entry(checksum.clone()).or_default();
            }
        }
        let mut entries = Vec::new();
        for (checksum, records) in by_checksum {
            let used = used.remove(&checksum).unwrap_or_default();
            let change = |units: &mut Vec<UnitRecord>| {
                units.retain(|u| !records.iter().any(|r| r.id == u.id));
                let (mut first, rest): (Vec<_>, Vec<_>) =
                    units.drain(..).partition(|u| used.contains(&u.id));
                let mut ordered = records;
                ordered.append(&mut first);
                ordered.extend(rest);
                ordered.truncate(MAX_VARIANTS);
                *units = ordered;
            };
            if let Some(entry) = self.changed_entry(toolchain, &checksum, change, &mut staged)? {
                entries.push(entry);
            }
        }
        // Every file and record of the build made durable together, then indexed.
        self.commit(staged, entries)?;
        Ok(published)
    }

    /// The unit's files stored as blobs; `None` when its files are not where cargo's naming puts
    /// them (then it is not shared).
    fn store_unit(
        &self,
        target: &Beneath,
        host: &Path,
        unit: &BuiltUnit,
        materialised: &BTreeSet<String>,
        staged: &mut Vec<StagedBlob>,
    ) -> Result<Option<UnitRecord>, CasError> {
        let Some((fingerprint, roots)) = unit_paths(target, unit) else {
            return Ok(None);
        };
        if materialised.contains(&fingerprint.display().to_string()) {
            // Copied in from the index before the build (a build script's run, reported again).
            return Ok(None);
        }
        let mut dirs = Vec::new();
        let mut files = Vec::new();
        let mut pending: Vec<PathBuf> = Vec::new();
        for root in roots.into_iter().chain([fingerprint.clone()]) {
            match target.metadata(&root).map(|m| m.kind) {
                Ok(EntryKind::Directory) => pending.push(root),
                Ok(EntryKind::File) => files.push(root),
                _ => return Ok(None),
            }
        }
        while let Some(dir) = pending.pop() {
            let Ok(entries) = target.read_dir(&dir) else {
                return Ok(None);
            };
            dirs.push(dir.clone());
            for (name, kind) in entries {
                match kind {
                    EntryKind::Directory => pending.push(dir.join(name)),
                    EntryKind::File => files.push(dir.join(name)),
                    // A link or a FIFO in a unit: not something cargo made; not shared.
                    EntryKind::Symlink | EntryKind::Other => return Ok(None),
                }
            }
            if files.len() > MAX_UNIT_FILES {
                return Ok(None);
            }
        }
        let mut record_files = Vec::new();
        let mut bytes = 0;
        for path in files {
            let (Ok(meta), Ok(mut file)) = (target.metadata(&path), target.open_file(&path)) else {
                return Ok(None);
            };
            bytes += meta.size;
            if bytes > MAX_UNIT_BYTES {
                return Ok(None);
            }
            let blob = self.cas.blobs.stage_open_file(
                DigestFunction::Blake3,
                &mut file,
                &host.join(&path),
            )?;
            record_files.push(UnitFile {
                path: path.display().to_string(),
                // `function:hash/size` (the `Debug` form is the one `FromStr` reads back).
                digest: format!("{:?}", blob.digest()),
                executable: meta.mode & 0o111 != 0,
            });
            staged.push(blob);
        }
        dirs.sort();
        record_files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(Some(UnitRecord {
            id: fingerprint.display().to_string(),
            dirs: dirs.iter().map(|d| d.display().to_string()).collect(),
            files: record_files,
            bytes,
            variant: String::new(),
            build_time_code: Vec::new(),
        }))
    }
}

/// A changed index entry: its key and its new result (`None`: removed).
struct IndexEntry {
    key: Digest,
    result: Option<ActionResult>,
}

/// Why a unit was not materialised.
struct Skip {
    why: String,
    /// The unit itself is broken (a blob evicted or corrupt): out of the index. Otherwise (the
    /// target dir's disk full, say) it stays indexed for the next build.
    unusable: bool,
}

impl Skip {
    fn unusable(why: String) -> Skip {
        Skip {
            why,
            unusable: true,
        }
    }

    fn failed(why: String) -> Skip {
        Skip {
            why,
            unusable: false,
        }
    }
}

/// The fingerprint dir and the other roots (files or dirs) of a unit, relative to the target
/// dir, from what cargo reported; `None` when they are not where cargo's naming puts them.
fn unit_paths(target: &Beneath, unit: &BuiltUnit) -> Option<(PathBuf, Vec<PathBuf>)> {
    let first = under_target(unit.files.first()?)?;
    let parent = first.parent()?;
    // A build script's compilation or run: everything in `<profile>/build/<pkg>-<H>/`.
    // (`out_dir` of a run, `build-script-build` of a compilation: the parent is that directory.)
    if unit.build_script_run
        || (parent.parent()?.file_name()? == "build" && parent.file_name()? != "deps")
    {
        let dir = parent.to_path_buf();
        let profile = dir.parent()?.parent()?;
        let name = dir.file_name()?;
        return Some((profile.join(".fingerprint").join(name), vec![dir]));
    }
    // A library: `<profile>/deps/<stem>-<H>.*`, fingerprint `<profile>/.fingerprint/<pkg>-<H>`.
    if parent.file_name()? != "deps" {
        return None;
    }
    let stem = first.file_name()?.to_str()?.split('.').next()?;
    let hash = stem.rsplit_once('-')?.1;
    if hash.len() < 8 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let suffix = format!("-{hash}");
    let named = |name: &OsString| {
        name.to_str()
            .and_then(|n| n.split('.').next())
            .is_some_and(|s| s.ends_with(&suffix))
    };
    let files = target
        .read_dir(parent)
        .ok()?
        .into_iter()
        .filter(|(name, kind)| *kind == EntryKind::File && named(name))
        .map(|(name, _)| parent.join(name))
        .collect();
    let profile = parent.parent()?;
    let fingerprints = target.read_dir(&profile.join(".fingerprint")).ok()?;
    let fingerprint = fingerprints
        .into_iter()
        .find(|(name, kind)| *kind == EntryKind::Directory && named(name))?
        .0;
    Some((profile.join(".fingerprint").join(fingerprint), files))
}

/// A path cargo reported inside the sandbox, relative to the target dir; `None` unless it is a
/// plain path under it.
fn under_target(inside: &str) -> Option<PathBuf> {
    let relative = Path::new(inside).strip_prefix(TARGET_DIR).ok()?;
    relative
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
        .then(|| relative.to_path_buf())
        .filter(|p| p.components().count() > 0)
}

/// A stored relative path, refused unless plain.
fn plain(path: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(path);
    if path.components().count() > 0 && path.components().all(|c| matches!(c, Component::Normal(_)))
    {
        Ok(path)
    } else {
        Err(format!("not a plain relative path: {path:?}"))
    }
}

fn remove_unit(target: &Beneath, unit: &UnitRecord) {
    for file in &unit.files {
        if let Ok(path) = plain(&file.path) {
            let _ = target.remove(&path);
        }
    }
    if let Ok(path) = plain(&unit.id) {
        let _ = target.remove(&path);
    }
}

/// The index entry's key: BLAKE3 of the toolchain identity and the package checksum (each
/// length-prefixed).
fn index_key(toolchain: &str, checksum: &str) -> Digest {
    let mut key = b"rba shared units 1".to_vec();
    for part in [toolchain, checksum] {
        key.extend_from_slice(&(part.len() as u64).to_le_bytes());
        key.extend_from_slice(part.as_bytes());
    }
    DigestFunction::Blake3.digest_of(&key)
}

/// `(source, name, version)` of a registry package id (`registry+URL#name@version`, also
/// `sparse+URL#…`); `None` for path and git packages.
pub fn registry_package(package_id: &str) -> Option<(String, String, String)> {
    let (source, fragment) = package_id.split_once('#')?;
    if !(source.starts_with("registry+") || source.starts_with("sparse+")) {
        return None;
    }
    let (name, version) = fragment.split_once('@')?;
    Some((source.to_string(), name.to_string(), version.to_string()))
}

/// The registry packages of a lock file that carry a checksum: `(source, name, version)` →
/// checksum.
pub fn lock_registry_packages(lockfile: &str) -> BTreeMap<(String, String, String), String> {
    let mut found = BTreeMap::new();
    let Ok(lock) = lockfile.parse::<toml::Table>() else {
        return found;
    };
    let Some(packages) = lock.get("package").and_then(|p| p.as_array()) else {
        return found;
    };
    for package in packages {
        let field = |name: &str| package.get(name).and_then(|v| v.as_str()).map(String::from);
        if let (Some(name), Some(version), Some(source), Some(checksum)) = (
            field("name"),
            field("version"),
            field("source"),
            field("checksum"),
        ) && (source.starts_with("registry+") || source.starts_with("sparse+"))
        {
            found.insert((source, name, version), checksum);
        }
    }
    found
}

/// A unit cargo built in this job, as its records named it.
#[derive(Clone, Debug)]
struct BuiltUnit {
    package_id: String,
    /// Files cargo reported (`filenames`, or the build script's `out_dir`).
    files: Vec<String>,
    build_script_run: bool,
}

/// What a job's cargo records said about the units it built (fed by the runner).
#[derive(Clone, Debug, Default)]
pub struct BuildUnits {
    units: Vec<BuiltUnit>,
    /// Registry units cargo found fresh (materialised ones, used by this build).
    used: Vec<BuiltUnit>,
    materialised: BTreeSet<String>,
    publish: bool,
    /// Why nothing of the build may be published (workspace code ran at build time).
    tainted: Option<String>,
    variant: String,
    /// Registry packages (ids) with a build script or a proc-macro in this build.
    build_time_code: BTreeSet<String>,
}

impl BuildUnits {
    /// An empty collector for a build of `variant` ([`UnitsPlan::variant`]) into which the
    /// units `materialised` (their ids) were copied; `publish` as [`UnitsPlan::publish`].
    pub fn new(variant: String, materialised: Vec<String>, publish: bool) -> Self {
        BuildUnits {
            variant,
            materialised: materialised.into_iter().collect(),
            publish,
            ..Default::default()
        }
    }

    /// True when the build's new units are to be stored: its plan allows it and no workspace
    /// code ran at build time.
    pub fn publishes(&self) -> bool {
        self.publish && self.tainted.is_none()
    }

    /// The kind of build the units come from.
    pub fn variant(&self) -> &str {
        &self.variant
    }

    /// A `compiler-artifact` record.
    pub fn artifact(&mut self, artifact: &CargoArtifact) {
        let runs_at_build_time = artifact
            .target_kinds
            .iter()
            .any(|k| k == "custom-build" || k == "proc-macro");
        if runs_at_build_time && registry_package(&artifact.package_id).is_some() {
            self.build_time_code.insert(artifact.package_id.clone());
        }
        if registry_package(&artifact.package_id).is_none() {
            if artifact
                .target_kinds
                .iter()
                .any(|k| k == "custom-build" || k == "proc-macro")
            {
                self.tainted.get_or_insert_with(|| {
                    format!(
                        "{} runs code at build time (a build script or proc-macro)",
                        artifact.package_id
                    )
                });
            }
            return;
        }
        let unit = BuiltUnit {
            package_id: artifact.package_id.clone(),
            files: artifact.filenames.clone(),
            build_script_run: false,
        };
        if artifact.fresh {
            self.used.push(unit);
        } else {
            self.units.push(unit);
        }
    }

    /// A `build-script-executed` record (its `out_dir`).
    pub fn build_script_run(&mut self, package_id: &str, out_dir: &str) {
        if registry_package(package_id).is_some() {
            self.units.push(BuiltUnit {
                package_id: package_id.to_string(),
                files: vec![out_dir.to_string()],
                build_script_run: true,
            });
        }
    }

    /// Why this build's units may not be shared, if they may not.
    pub fn tainted(&self) -> Option<&str> {
        self.tainted.as_deref()
    }
}

/// What a job may do with shared units, decided once before its build ([`UnitsPlan::for_job`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnitsPlan {
    /// Materialise matching units before the build.
    pub receive: bool,
    /// Store the registry units it compiles after a successful build.
    pub publish: bool,
    /// Why either is off (for the job's log).
    pub reason: Option<String>,
    /// The kind of build, `<profile dir>/<build|check>` (`debug/build` for `cargo build` and
    /// `cargo test`, `release/check` for `cargo check --release` or clippy): units are received
    /// only by builds of the kind that published them.
    pub variant: String,
}

impl UnitsPlan {
    /// Neither receive nor publish.
    pub fn off(reason: impl Into<String>) -> Self {
        UnitsPlan {
            receive: false,
            publish: false,
            reason: Some(reason.into()),
            variant: String::new(),
        }
    }

    /// The rules of the module doc: `command` is the job's Command, `src` its synced sources,
    /// `fresh` whether its target dir was empty when it took the slot.
    pub fn for_job(command: &Command, src: &Path, fresh: bool) -> Self {
        if !fresh {
            // Nothing to receive into a used target dir, and what earlier jobs left in it is
            // not the executor's alone.
            return UnitsPlan::off("the target dir was used before");
        }
        let (subcommand, release) = match command_control(command) {
            Ok(found) => found,
            Err(why) => return UnitsPlan::off(why),
        };
        if let Err(why) = workspace_control(src) {
            return UnitsPlan::off(why);
        }
        let publish = matches!(subcommand.as_str(), "build" | "check");
        UnitsPlan {
            receive: true,
            publish,
            reason: (!publish).then(|| format!("`cargo {subcommand}` jobs do not publish units")),
            variant: format!(
                "{}/{}",
                if release { "release" } else { "debug" },
                if matches!(subcommand.as_str(), "build" | "test" | "run") {
                    "build"
                } else {
                    "check"
                }
            ),
        }
    }
}

/// Arguments that only select what cargo builds (packages, targets, features, profile, message
/// format): all covered by cargo's unit hash or without effect on units.
const PLAIN_FLAGS: &[&str] = &[
    "--locked",
    "--offline",
    "--frozen",
    "--no-fail-fast",
    "--all-targets",
    "--release",
    "-r",
    "--workspace",
    "--all",
    "--lib",
    "--bins",
    "--tests",
    "--examples",
    "--benches",
    "--all-features",
    "--no-default-features",
    "--keep-going",
    "-q",
    "--quiet",
    "-v",
    "--verbose",
];
/// Flags taking a value, same meaning.
const VALUE_FLAGS: &[&str] = &[
    "-p",
    "--package",
    "--exclude",
    "-F",
    "--features",
    "--bin",
    "--test",
    "--example",
    "--bench",
    "-j",
    "--jobs",
    "--message-format",
];

/// The cargo subcommand and whether it builds with the release profile, if the Command is one
/// the executor makes; else why not.
fn command_control(command: &Command) -> Result<(String, bool), String> {
    let mut env = command.environment_variables.clone();
    env.sort_by(|a, b| a.name.cmp(&b.name));
    if env != crate::action::cargo_environment() {
        return Err("the job sets its own environment".into());
    }
    let args = &command.arguments;
    if args.first().map(String::as_str) != Some("cargo") {
        return Err("the job does not run cargo".into());
    }
    let subcommand = args.get(1).cloned().unwrap_or_default();
    if !matches!(
        subcommand.as_str(),
        "build" | "check" | "test" | "clippy" | "run"
    ) {
        return Err(format!(
            "`cargo {subcommand}` does not compile with shared units"
        ));
    }
    let mut rest = args[2..].iter();
    let mut release = false;
    while let Some(arg) = rest.next() {
        if arg == "--" {
            // After it: the test harness's or clippy's arguments, which never reach a
            // dependency's compilation.
            break;
        }
        let flag = arg.split_once('=').map_or(arg.as_str(), |(flag, _)| flag);
        if PLAIN_FLAGS.contains(&arg.as_str()) {
            release |= arg == "--release" || arg == "-r";
            continue;
        }
        if VALUE_FLAGS.contains(&flag) {
            if !arg.contains('=') {
                rest.next();
            }
            continue;
        }
        return Err(format!("the job passes `{arg}` to cargo"));
    }
    Ok((subcommand, release))
}

/// `Ok` when the workspace controls nothing of its dependencies' compilation beyond what
/// cargo's unit hash covers: no `.cargo` (config) anywhere, no `[patch]`, `[replace]` or
/// `cargo-features` in a manifest. Walked without following links; a linked `.cargo` or
/// `Cargo.toml` counts as one.
fn workspace_control(src: &Path) -> Result<(), String> {
    let root = Beneath::open(src).map_err(|e| format!("reading the workspace: {e}"))?;
    let mut pending = vec![PathBuf::new()];
    while let Some(dir) = pending.pop() {
        let entries = root
            .read_dir(&dir)
            .map_err(|e| format!("reading the workspace: {e}"))?;
        for (name, kind) in entries {
            let path = dir.join(&name);
            if name == ".cargo" {
                return Err(format!(
                    "the workspace has cargo configuration ({})",
                    path.display()
                ));
            }
            match kind {
                EntryKind::Directory if name != ".git" && name != "target" => pending.push(path),
                EntryKind::File if name == "Cargo.toml" => {
                    let mut text = String::new();
                    root.open_file(&path)
                        .and_then(|f| f.take(16 << 20).read_to_string(&mut text))
                        .map_err(|e| format!("reading {}: {e}", path.display()))?;
                    let Ok(manifest) = text.parse::<toml::Table>() else {
                        continue; // cargo refuses it itself
                    };
                    for key in ["patch", "replace", "cargo-features"] {
                        if manifest.contains_key(key) {
                            return Err(format!("{} has `{key}`", path.display()));
                        }
                    }
                }
                EntryKind::Symlink if name == "Cargo.toml" => {
                    return Err(format!("{} is a link", path.display()));
                }
                _ => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_paths_under_the_target_dir() {
        assert_eq!(
            under_target("/target/debug/deps/libitoa-0123456789abcdef.rlib"),
            Some(PathBuf::from("debug/deps/libitoa-0123456789abcdef.rlib"))
        );
        for hostile in [
            "/target",
            "/target/../etc/passwd",
            "/workspace/x",
            "target/x",
            "/etc",
        ] {
            assert_eq!(under_target(hostile), None, "{hostile}");
        }
        assert!(plain("debug/.fingerprint/itoa-1").is_ok());
        for hostile in ["", "/etc/passwd", "debug/../../x", "./x"] {
            assert!(plain(hostile).is_err(), "{hostile}");
        }
    }

    #[test]
    fn the_index_namespace_is_the_executors_alone() {
        assert!(crate::runner::is_executor_namespace(SHARED_UNITS_NAMESPACE));
        assert!(crate::runner::is_private_namespace(SHARED_UNITS_NAMESPACE));
    }

    #[test]
    fn registry_package_ids_and_lock_checksums() {
        assert_eq!(
            registry_package("registry+https://github.com/rust-lang/crates.io-index#itoa@1.0.15"),
            Some((
                "registry+https://github.com/rust-lang/crates.io-index".into(),
                "itoa".into(),
                "1.0.15".into()
            ))
        );
        assert_eq!(registry_package("path+file:///workspace#0.1.0"), None);
        assert_eq!(
            registry_package("git+https://example.com/x#abc@0.1.0"),
            None
        );
        let lock = "version = 4\n[[package]]\nname = \"itoa\"\nversion = \"1.0.15\"\nsource = \"registry+https://github.com/rust-lang/crates.io-index\"\nchecksum = \"abc\"\n\n[[package]]\nname = \"app\"\nversion = \"0.1.0\"\n";
        let found = lock_registry_packages(lock);
        assert_eq!(found.len(), 1);
        assert_eq!(found.values().next().unwrap(), "abc");
    }

    fn command(args: &[&str]) -> Command {
        Command {
            arguments: args.iter().map(|a| a.to_string()).collect(),
            environment_variables: crate::action::cargo_environment(),
            ..Default::default()
        }
    }

    #[test]
    fn only_executor_made_commands_share() {
        let src = tempfile::tempdir().unwrap();
        let job = crate::cargo::CargoJob::new(crate::cargo::JobKind::Build);
        let plan = UnitsPlan::for_job(&crate::action::cargo_command(&job), src.path(), true);
        assert_eq!((plan.receive, plan.publish), (true, true));
        assert_eq!(plan.variant, "debug/build");
        let mut release = crate::cargo::CargoJob::new(crate::cargo::JobKind::Clippy);
        release.release = true;
        let plan = UnitsPlan::for_job(&crate::action::cargo_command(&release), src.path(), true);
        assert_eq!((plan.receive, plan.publish), (true, false));
        assert_eq!(plan.variant, "release/check");
        let test = crate::cargo::CargoJob::new(crate::cargo::JobKind::Test);
        let plan = UnitsPlan::for_job(&crate::action::cargo_command(&test), src.path(), true);
        assert_eq!((plan.receive, plan.publish), (true, false));
        assert!(
            !UnitsPlan::for_job(&crate::action::cargo_command(&job), src.path(), false).receive
        );
        for hostile in [
            &["cargo", "build", "--config", "build.rustflags=['-Cfoo']"][..],
            &["cargo", "build", "--config=build.rustc-wrapper='x'"],
            &["cargo", "build", "-Zbuild-std"],
            &["cargo", "build", "--target", "x86_64-unknown-linux-musl"],
            &["sh", "-c", "cargo build"],
            &["cargo", "rustc", "--", "-Cfoo"],
        ] {
            let plan = UnitsPlan::for_job(&command(hostile), src.path(), true);
            assert!(!plan.receive && !plan.publish, "{hostile:?}");
        }
        let mut with_env = command(&["cargo", "build"]);
        with_env
            .environment_variables
            .push(rba_proto::reapi::command::EnvironmentVariable {
                name: "RUSTFLAGS".into(),
                value: "-Cfoo".into(),
            });
        assert!(!UnitsPlan::for_job(&with_env, src.path(), true).receive);
        assert!(
            UnitsPlan::for_job(
                &command(&["cargo", "test", "-p", "x", "--", "--nocapture"]),
                src.path(),
                true
            )
            .receive
        );
        // A run compiles like a build, so it receives the build variant, but its program runs
        // after compilation in the same sandbox: it never publishes.
        let run = UnitsPlan::for_job(
            &command(&[
                "cargo",
                "run",
                "--release",
                "--bin",
                "x",
                "--",
                "--config=x",
            ]),
            src.path(),
            true,
        );
        assert!(run.receive && !run.publish);
        assert_eq!(run.variant, "release/build");
    }

    #[test]
    fn workspace_config_and_patches_turn_sharing_off() {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("Cargo.toml"), "[package]\nname = \"a\"\n").unwrap();
        assert_eq!(workspace_control(src.path()), Ok(()));
        std::fs::create_dir_all(src.path().join("sub")).unwrap();
        std::fs::write(
            src.path().join("sub/Cargo.toml"),
            "[patch.crates-io]\nitoa = { path = \"x\" }\n",
        )
        .unwrap();
        assert!(workspace_control(src.path()).unwrap_err().contains("patch"));
        std::fs::remove_file(src.path().join("sub/Cargo.toml")).unwrap();
        std::fs::create_dir_all(src.path().join("sub/.cargo")).unwrap();
        assert!(
            workspace_control(src.path())
                .unwrap_err()
                .contains(".cargo")
        );
    }
}
