//! Cargo jobs as REAPI actions: every job becomes a `Command` and an `Action` stored in the
//! CAS, so that the `Action`'s digest keys the action cache exactly as a Bazel action does.
//!
//! # Why
//!
//! One cache key for everything: a job submitted over our session protocol and an action sent
//! by a REAPI client (Bazel, Buck2, …) are both an `Action` digest, looked up in the same action
//! cache and executed by the same path. Two submissions of the same job on the same sources with
//! the same toolchain must share a key on every node; anything else must not.
//!
//! # Contract
//!
//! - The digest depends only on: the cargo argv ([`CargoJob::argv`]), the fixed sandbox
//!   environment ([`cargo_environment`]), the input root, and the platform properties
//!   ([`cargo_platform`]): `OSFamily=linux`, `container-image=rba-sandbox`, `job=<kind>`,
//!   `profile=debug|release`, `target=<host triple>`, `toolchain=<BLAKE3 hex of rustc -vV>`,
//!   and `lockfile=required` when the user passed `--locked` ([`LOCKFILE_PROPERTY`]).
//!   Nothing host-specific (sysroot path, hostname, time, user) enters it; the toolchain is
//!   identified by the text of `rustc -vV` (release, commit hash, LLVM version, host), which is
//!   the same on every machine with that toolchain. The toolchain is the one the workspace's
//!   `rust-toolchain(.toml)` chooses ([`crate::toolchains`]), else the node's default.
//! - Messages are canonical: environment variables sorted by name, platform properties sorted
//!   by name then value (as REAPI requires), `working_directory` empty, no `output_paths`
//!   (artifacts live in the shared `/target` cache mount, outside the input root; the executor
//!   collects them from cargo's artifact records), no timeout, no salt, `do_not_cache = false`
//!   except for `cargo run` ([`crate::cargo::JobKind::result_is_reusable`]).
//!   The platform is set on the `Action` (REAPI ≥ 2.2), not the deprecated `Command.platform`.
//! - [`store_action`] (used by [`cargo_action`]) stores `Command` then `Action` in the CAS and
//!   returns both with their digests, so a worker can run the action from its digest alone.
//! - [`PreparedAction::load`] is the other entry: an action a REAPI client already stored. It
//!   fetches and decodes both messages, failing with [`ActionError::NotFound`] (naming the
//!   missing digest) or [`ActionError::Invalid`] (naming the undecodable blob, or the output
//!   path or working directory that could leave the exec root: [`check_command_paths`]).
//!   [`PreparedAction::check_input_tree`] then checks the whole input root
//!   ([`rba_cas::merkle::validate_tree`]) before anything touches disk.

use std::path::PathBuf;
use std::process::Command as Process;

use rba_cas::merkle::{TreeLimits, TreeSummary};
use rba_cas::{BlobStore, CasError, Digest, DigestFunction};
use rba_proto::Message;
use rba_proto::reapi::{
    Action, Command, Platform, command::EnvironmentVariable, platform::Property,
};

use crate::cargo::CargoJob;

/// `CARGO_HOME` inside the sandbox (registry cache, git checkouts, advisory database).
pub const SANDBOX_CARGO_HOME: &str = "/cargo";
/// `CARGO_TARGET_DIR` inside the sandbox.
pub const SANDBOX_TARGET_DIR: &str = "/target";
/// `PATH` inside the sandbox: the mounted toolchain first.
pub const SANDBOX_PATH: &str = "/toolchain/bin:/usr/bin:/bin";
/// The `container-image` platform property of cargo actions.
pub const CONTAINER_IMAGE: &str = "rba-sandbox";

/// The platform property of a cargo job whose user asked for cargo's `--locked` (see
/// [`CargoJob::lock_required`]): a workspace without a lock file then fails as with cargo,
/// instead of having one resolved. Absent otherwise (so it splits only such jobs' keys).
pub const LOCKFILE_PROPERTY: &str = "lockfile";
/// The value of [`LOCKFILE_PROPERTY`] requiring the workspace's own lock file.
pub const LOCKFILE_REQUIRED: &str = "required";

/// Largest `Action` or `Command` blob [`PreparedAction::load`] decodes.
const MAX_MESSAGE_BYTES: u64 = 4 << 20;

/// Why an action could not be built, stored or loaded.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// A blob the action needs is not in the CAS.
    #[error("{what} {digest:?} not found in the CAS")]
    NotFound {
        /// Which message was looked for: `Action` or `Command`.
        what: &'static str,
        /// Its digest.
        digest: Digest,
    },
    /// A blob or field is not a valid message.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was decoded, naming its digest.
        what: String,
        /// Why it is refused.
        reason: String,
    },
    /// The toolchain could not be identified.
    #[error("toolchain detection failed: {0}")]
    Toolchain(String),
    /// The store failed.
    #[error(transparent)]
    Cas(#[from] CasError),
}

/// A Rust toolchain, identified by its `rustc -vV` (the node's default one is detected at
/// startup; a workspace may choose another installed one, see [`crate::toolchains`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Toolchain {
    /// The output of `rustc -vV`, trailing whitespace removed.
    pub version_text: String,
    /// Lowercase hex BLAKE3 of `version_text`: the `toolchain` platform property.
    pub digest_hex: String,
    /// The host triple (the `host:` line), the `target` platform property.
    pub host: String,
    /// The toolchain's sysroot on this machine (host-specific: never part of a digest).
    pub sysroot: PathBuf,
}

impl Toolchain {
    /// Runs `$RUSTC` (or `rustc`) `-vV` and `--print sysroot` once.
    pub fn detect() -> Result<Toolchain, ActionError> {
        let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
        Toolchain::detect_with(&rustc)
    }

    /// Like [`Toolchain::detect`], with an explicit `rustc` binary.
    pub fn detect_with(rustc: &std::ffi::OsStr) -> Result<Toolchain, ActionError> {
        let run = |args: &[&str]| -> Result<String, ActionError> {
            let output = Process::new(rustc).args(args).output().map_err(|e| {
                ActionError::Toolchain(format!("running {rustc:?} {}: {e}", args.join(" ")))
            })?;
            if !output.status.success() {
                return Err(ActionError::Toolchain(format!(
                    "{rustc:?} {} exited with {}: {}",
                    args.join(" "),
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                )));
            }
            String::from_utf8(output.stdout).map_err(|_| {
                ActionError::Toolchain(format!("{rustc:?} {} printed non-UTF-8", args.join(" ")))
            })
        };
        let version_text = run(&["-vV"])?;
        let sysroot = run(&["--print", "sysroot"])?;
        Toolchain::from_version_text(version_text, PathBuf::from(sysroot.trim_end()))
    }

    /// Builds a toolchain from the text of `rustc -vV` (which must have a `host:` line).
    pub fn from_version_text(
        version_text: impl Into<String>,
        sysroot: PathBuf,
    ) -> Result<Toolchain, ActionError> {
        let version_text = version_text.into().trim_end().replace("\r\n", "\n");
        let host = version_text
            .lines()
            .find_map(|line| line.strip_prefix("host:"))
            .map(|host| host.trim().to_string())
            .filter(|host| !host.is_empty())
            .ok_or_else(|| {
                ActionError::Toolchain(format!(
                    "no `host:` line in rustc -vV output {version_text:?}"
                ))
            })?;
        let digest_hex = blake3::hash(version_text.as_bytes()).to_hex().to_string();
        Ok(Toolchain {
            version_text,
            digest_hex,
            host,
            sysroot,
        })
    }

    /// The `release:` line of `rustc -vV` (e.g. `1.95.0`), if present.
    pub fn release(&self) -> Option<&str> {
        self.version_text
            .lines()
            .find_map(|line| line.strip_prefix("release:"))
            .map(str::trim)
    }
}

/// An action stored in the CAS, with its command, both decoded.
#[derive(Clone, Debug, PartialEq)]
pub struct PreparedAction {
    /// The action.
    pub action: Action,
    /// Its digest: the action-cache key.
    pub action_digest: Digest,
    /// The command it runs.
    pub command: Command,
    /// The command's digest (`action.command_digest`).
    pub command_digest: Digest,
    /// The input root's digest (`action.input_root_digest`).
    pub input_root_digest: Digest,
}

impl PreparedAction {
    /// Fetches and decodes an `Action` and its `Command` from the CAS.
    ///
    /// Missing blobs give [`ActionError::NotFound`] naming the digest; undecodable blobs or a
    /// missing/malformed digest field give [`ActionError::Invalid`] naming the blob.
    pub fn load(action_digest: Digest, blobs: &BlobStore) -> Result<PreparedAction, ActionError> {
        let function = action_digest.function;
        let action: Action = load_message(blobs, "Action", action_digest)?;
        let field = |digest: Option<&rba_proto::reapi::Digest>, name: &'static str| {
            Digest::from_reapi_field(function, digest, name).map_err(|e| ActionError::Invalid {
                what: format!("Action {action_digest:?}"),
                reason: e.to_string(),
            })
        };
        let command_digest = field(action.command_digest.as_ref(), "Action.command_digest")?;
        let input_root_digest = field(
            action.input_root_digest.as_ref(),
            "Action.input_root_digest",
        )?;
        let command: Command = load_message(blobs, "Command", command_digest)?;
        check_command_paths(&command).map_err(|reason| ActionError::Invalid {
            what: format!("Command {command_digest:?}"),
            reason,
        })?;
        Ok(PreparedAction {
            action,
            action_digest,
            command,
            command_digest,
            input_root_digest,
        })
    }

    /// Checks the whole input root against `limits` before anything of it touches disk (see
    /// [`rba_cas::merkle::validate_tree`]): a hostile tree is [`ActionError::Invalid`] naming
    /// the input root, the offending path and the limit; a missing `Directory` is
    /// [`ActionError::Cas`] with [`CasError::NotFound`].
    pub fn check_input_tree(
        &self,
        blobs: &BlobStore,
        limits: &TreeLimits,
    ) -> Result<TreeSummary, ActionError> {
        rba_cas::merkle::validate_tree(blobs, &self.input_root_digest, limits).map_err(|error| {
            match error {
                CasError::HostileEntry { .. } | CasError::Invalid { .. } => ActionError::Invalid {
                    what: format!("input root {:?}", self.input_root_digest),
                    reason: error.to_string(),
                },
                other => ActionError::Cas(other),
            }
        })
    }

    /// The platform in effect: the action's, or for clients older than REAPI 2.2 the command's.
    pub fn platform(&self) -> Platform {
        #[allow(deprecated)]
        let legacy = self.command.platform.clone();
        self.action.platform.clone().or(legacy).unwrap_or_default()
    }

    /// The value of a platform property, if set (the first one, when repeated).
    pub fn platform_property(&self, name: &str) -> Option<String> {
        self.platform()
            .properties
            .into_iter()
            .find(|p| p.name == name)
            .map(|p| p.value)
    }
}

/// Checks a Command's `output_paths` (and the legacy `output_files` / `output_directories`) and
/// its `working_directory` as REAPI asks: relative paths with `/` separators, no leading or
/// trailing `/`, no empty, `.` or `..` component, no NUL; the working directory may be empty
/// (the input root), an output path may not. The reason names the field and the path.
///
/// This is the one check; the REAPI server calls it too, to answer `INVALID_ARGUMENT` before
/// submitting.
#[allow(deprecated)]
pub fn check_command_paths(command: &Command) -> Result<(), String> {
    if !command.working_directory.is_empty() {
        check_relative_path("working_directory", &command.working_directory)?;
    }
    let outputs = [
        ("output_paths", &command.output_paths),
        ("output_files", &command.output_files),
        ("output_directories", &command.output_directories),
    ];
    for (field, paths) in outputs {
        for path in paths {
            check_relative_path(field, path)?;
        }
    }
    Ok(())
}

fn check_relative_path(field: &str, path: &str) -> Result<(), String> {
    let problem = if path.is_empty() {
        "is empty"
    } else if path.contains('\0') {
        "contains a NUL byte"
    } else if path.starts_with('/') {
        "is absolute (paths are relative to the working directory)"
    } else if path.ends_with('/') {
        "ends with '/'"
    } else if path.split('/').any(|c| c == "..") {
        "has a '..' component (it could leave the exec root)"
    } else if path.split('/').any(|c| c.is_empty() || c == ".") {
        "has an empty or '.' component"
    } else {
        return Ok(());
    };
    Err(format!("{field} {path:?} {problem}"))
}

fn load_message<M: Message + Default>(
    blobs: &BlobStore,
    what: &'static str,
    digest: Digest,
) -> Result<M, ActionError> {
    let bytes = match blobs.read_to_vec(&digest, MAX_MESSAGE_BYTES) {
        Ok(bytes) => bytes,
        Err(CasError::NotFound(_)) => return Err(ActionError::NotFound { what, digest }),
        Err(CasError::QuotaExceeded(reason)) => {
            return Err(ActionError::Invalid {
                what: format!("{what} {digest:?}"),
                reason,
            });
        }
        Err(e) => return Err(e.into()),
    };
    M::decode(bytes.as_slice()).map_err(|e| ActionError::Invalid {
        what: format!("{what} {digest:?}"),
        reason: format!("not a valid {what} message: {e}"),
    })
}

/// The sandbox environment of every cargo job, sorted by name.
pub fn cargo_environment() -> Vec<EnvironmentVariable> {
    let mut env: Vec<EnvironmentVariable> = [
        ("CARGO_HOME", SANDBOX_CARGO_HOME),
        ("CARGO_TARGET_DIR", SANDBOX_TARGET_DIR),
        ("CARGO_TERM_COLOR", "always"),
        ("PATH", SANDBOX_PATH),
    ]
    .into_iter()
    .map(|(name, value)| EnvironmentVariable {
        name: name.to_string(),
        value: value.to_string(),
    })
    .collect();
    env.sort_by(|a, b| a.name.cmp(&b.name));
    env
}

/// A platform from properties, sorted by name then value as REAPI requires.
pub fn sorted_platform<N: Into<String>, V: Into<String>>(
    properties: impl IntoIterator<Item = (N, V)>,
) -> Platform {
    let mut properties: Vec<Property> = properties
        .into_iter()
        .map(|(name, value)| Property {
            name: name.into(),
            value: value.into(),
        })
        .collect();
    properties.sort_by(|a, b| (&a.name, &a.value).cmp(&(&b.name, &b.value)));
    Platform { properties }
}

/// The platform properties of a cargo job (see the module documentation).
pub fn cargo_platform(job: &CargoJob, toolchain: &Toolchain) -> Platform {
    let mut properties = vec![
        ("OSFamily", "linux"),
        ("container-image", CONTAINER_IMAGE),
        ("job", job.kind.name()),
        ("profile", job.profile()),
        ("target", toolchain.host.as_str()),
        ("toolchain", toolchain.digest_hex.as_str()),
    ];
    if job.lock_required() {
        properties.push((LOCKFILE_PROPERTY, LOCKFILE_REQUIRED));
    }
    sorted_platform(properties)
}

/// The `Command` of a cargo job.
pub fn cargo_command(job: &CargoJob) -> Command {
    Command {
        arguments: job.argv(),
        environment_variables: cargo_environment(),
        working_directory: String::new(),
        ..Default::default()
    }
}

/// Builds, stores and returns the action of a cargo job on `input_root` (whose digest function
/// is used for every digest).
pub fn cargo_action(
    job: &CargoJob,
    input_root: Digest,
    toolchain: &Toolchain,
    blobs: &BlobStore,
) -> Result<PreparedAction, ActionError> {
    store_cargo_action(job, input_root, cargo_platform(job, toolchain), blobs)
}

/// Stores the action of a cargo job on `input_root` with `platform` ([`cargo_platform`], plus
/// what the executor adds): the job's command, and `do_not_cache` for kinds whose result is not
/// reusable ([`crate::cargo::JobKind::result_is_reusable`]).
pub fn store_cargo_action(
    job: &CargoJob,
    input_root: Digest,
    platform: Platform,
    blobs: &BlobStore,
) -> Result<PreparedAction, ActionError> {
    store_action_with(
        cargo_command(job),
        input_root,
        platform,
        blobs,
        input_root.function,
        !job.kind.result_is_reusable(),
    )
}

/// Stores `command` and the `Action` running it on `input_root` with `platform`, and returns
/// both with their digests.
///
/// The command's environment variables and the platform's properties are sorted first, so
/// equal requests always give equal digests. `input_root` must use `function`.
pub fn store_action(
    command: Command,
    input_root: Digest,
    platform: Platform,
    blobs: &BlobStore,
    function: DigestFunction,
) -> Result<PreparedAction, ActionError> {
    store_action_with(command, input_root, platform, blobs, function, false)
}

/// [`store_action`] with the Action's `do_not_cache` flag: a result of such an action is
/// never stored where anyone else is served from (the runner keeps it in the tenant's
/// namespace of failed and uncacheable results), for runs that are not pure functions.
pub fn store_action_with(
    mut command: Command,
    input_root: Digest,
    platform: Platform,
    blobs: &BlobStore,
    function: DigestFunction,
    do_not_cache: bool,
) -> Result<PreparedAction, ActionError> {
    if input_root.function != function {
        return Err(ActionError::Invalid {
            what: format!("input root {input_root:?}"),
            reason: format!("its digest function is not the action's ({function})"),
        });
    }
    command
        .environment_variables
        .sort_by(|a, b| a.name.cmp(&b.name));
    let platform = sorted_platform(platform.properties.into_iter().map(|p| (p.name, p.value)));
    let command_digest = blobs.put_bytes(function, &command.encode_to_vec())?;
    let action = Action {
        command_digest: Some(command_digest.to_reapi()),
        input_root_digest: Some(input_root.to_reapi()),
        timeout: None,
        do_not_cache,
        salt: Vec::new(),
        platform: Some(platform),
    };
    let action_digest = blobs.put_bytes(function, &action.encode_to_vec())?;
    Ok(PreparedAction {
        action,
        action_digest,
        command,
        command_digest,
        input_root_digest: input_root,
    })
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::cargo::JobKind;

    fn store() -> (tempfile::TempDir, BlobStore) {
        BlobStore::scratch().unwrap()
    }

    const RUSTC_VV: &str = "rustc 1.95.0 (59807616e 2026-04-14)\nbinary: rustc\ncommit-hash: 59807616e1fa2540724bfbac14d7976d7e4a3860\ncommit-date: 2026-04-14\nhost: x86_64-unknown-linux-gnu\nrelease: 1.95.0\nLLVM version: 22.1.2\n";

    fn toolchain(sysroot: &str) -> Toolchain {
        Toolchain::from_version_text(RUSTC_VV, PathBuf::from(sysroot)).unwrap()
    }

    fn root(blobs: &BlobStore, content: &[u8]) -> Digest {
        blobs.put_bytes(DigestFunction::Sha256, content).unwrap()
    }

    #[test]
    fn same_job_same_root_same_digest_and_golden_value() {
        let (_dir, blobs) = store();
        let input = root(&blobs, b"root directory");
        let job = CargoJob::new(JobKind::Build);
        let first = cargo_action(
            &job,
            input,
            &toolchain("/home/alice/.rustup/toolchains/stable"),
            &blobs,
        )
        .unwrap();
        // Another machine: same toolchain installed elsewhere.
        let second = cargo_action(&job, input, &toolchain("/opt/rust"), &blobs).unwrap();
        assert_eq!(first.action_digest, second.action_digest);
        assert_eq!(first.command_digest, second.command_digest);
        // Fixed across processes and builds: a change here changes every cache key.
        assert_eq!(
            first.action_digest.to_string(),
            "55e80d5553f5229a595f2dad3ced70c0ddb7218b030ce4a74af01ff22208c4ab/342",
            "the action digest of a fixed job changed"
        );
    }

    /// A run's output is not a function of its inputs: its action says so, and only its.
    #[test]
    fn only_a_run_is_marked_do_not_cache() {
        let (_dir, blobs) = store();
        let input = root(&blobs, b"root directory");
        let tc = toolchain("/opt/rust");
        for kind in JobKind::ALL {
            let action = cargo_action(&CargoJob::new(kind), input, &tc, &blobs).unwrap();
            assert_eq!(action.action.do_not_cache, kind == JobKind::Run, "{kind:?}");
        }
    }

    #[test]
    fn every_input_changes_the_digest() {
        let (_dir, blobs) = store();
        let input = root(&blobs, b"root directory");
        let tc = toolchain("/opt/rust");
        let base = CargoJob::new(JobKind::Build);
        let digest = |job: &CargoJob, input: Digest, tc: &Toolchain| {
            cargo_action(job, input, tc, &blobs).unwrap().action_digest
        };
        let reference = digest(&base, input, &tc);
        let other_tc = Toolchain::from_version_text(
            RUSTC_VV.replace("22.1.2", "22.1.3"),
            PathBuf::from("/opt/rust"),
        )
        .unwrap();
        let other_host = Toolchain::from_version_text(
            RUSTC_VV.replace(
                "host: x86_64-unknown-linux-gnu",
                "host: aarch64-unknown-linux-gnu",
            ),
            PathBuf::from("/opt/rust"),
        )
        .unwrap();
        let variants = [
            digest(
                &CargoJob {
                    release: true,
                    ..base.clone()
                },
                input,
                &tc,
            ),
            digest(&CargoJob::new(JobKind::Check), input, &tc),
            digest(&CargoJob::new(JobKind::Test), input, &tc),
            digest(
                &CargoJob {
                    extra_args: vec!["-p".into(), "a".into()],
                    ..base.clone()
                },
                input,
                &tc,
            ),
            digest(&base, root(&blobs, b"another root"), &tc),
            digest(&base, input, &other_tc),
            digest(&base, input, &other_host),
        ];
        let mut all = vec![reference];
        all.extend(variants);
        let unique: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(unique.len(), all.len(), "{all:?}");
        // Fmt ignores the profile: release does not split its cache entries.
        let fmt = CargoJob::new(JobKind::Fmt);
        assert_eq!(
            digest(&fmt, input, &tc),
            digest(
                &CargoJob {
                    release: true,
                    ..fmt.clone()
                },
                input,
                &tc
            )
        );
    }

    #[test]
    fn stored_messages_decode_back_and_are_canonical() {
        let (_dir, blobs) = store();
        let input = root(&blobs, b"root");
        let tc = toolchain("/very/host/specific/sysroot");
        let prepared = cargo_action(&CargoJob::new(JobKind::Clippy), input, &tc, &blobs).unwrap();
        let command_bytes = blobs
            .read_to_vec(&prepared.command_digest, 1 << 20)
            .unwrap();
        assert_eq!(
            Command::decode(command_bytes.as_slice()).unwrap(),
            prepared.command
        );
        assert_eq!(
            prepared.command.arguments,
            CargoJob::new(JobKind::Clippy).argv()
        );
        let names: Vec<&str> = prepared
            .command
            .environment_variables
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(
            names,
            ["CARGO_HOME", "CARGO_TARGET_DIR", "CARGO_TERM_COLOR", "PATH"]
        );
        let properties: Vec<(String, String)> = prepared
            .platform()
            .properties
            .into_iter()
            .map(|p| (p.name, p.value))
            .collect();
        let expected = [
            ("OSFamily", "linux"),
            ("container-image", "rba-sandbox"),
            ("job", "clippy"),
            ("profile", "debug"),
            ("target", "x86_64-unknown-linux-gnu"),
            ("toolchain", tc.digest_hex.as_str()),
        ]
        .map(|(n, v)| (n.to_string(), v.to_string()));
        assert_eq!(properties, expected);
        assert_eq!(prepared.platform_property("job").as_deref(), Some("clippy"));
        // Nothing host-specific in what is hashed.
        let action_bytes = blobs.read_to_vec(&prepared.action_digest, 1 << 20).unwrap();
        for bytes in [&command_bytes, &action_bytes] {
            assert!(!String::from_utf8_lossy(bytes).contains("/very/host"));
        }
        let loaded = PreparedAction::load(prepared.action_digest, &blobs).unwrap();
        assert_eq!(loaded, prepared);
        assert_eq!(loaded.input_root_digest, input);
    }

    #[test]
    fn store_action_sorts_and_checks_the_function() {
        let (_dir, blobs) = store();
        let input = root(&blobs, b"root");
        let env = |n: &str| EnvironmentVariable {
            name: n.into(),
            value: "1".into(),
        };
        let command = |names: &[&str]| Command {
            arguments: vec!["true".into()],
            environment_variables: names.iter().map(|n| env(n)).collect(),
            ..Default::default()
        };
        let a = store_action(
            command(&["B", "A"]),
            input,
            sorted_platform([("z", "1"), ("a", "2")]),
            &blobs,
            DigestFunction::Sha256,
        )
        .unwrap();
        let platform = Platform {
            properties: vec![
                Property {
                    name: "z".into(),
                    value: "1".into(),
                },
                Property {
                    name: "a".into(),
                    value: "2".into(),
                },
            ],
        };
        let b = store_action(
            command(&["A", "B"]),
            input,
            platform,
            &blobs,
            DigestFunction::Sha256,
        )
        .unwrap();
        assert_eq!(a.action_digest, b.action_digest);
        let blake_root = blobs.put_bytes(DigestFunction::Blake3, b"root").unwrap();
        let err = store_action(
            command(&[]),
            blake_root,
            Platform::default(),
            &blobs,
            DigestFunction::Sha256,
        )
        .unwrap_err();
        assert!(matches!(err, ActionError::Invalid { .. }), "{err}");
        // BLAKE3 end to end.
        let prepared = cargo_action(
            &CargoJob::new(JobKind::Build),
            blake_root,
            &toolchain("/x"),
            &blobs,
        )
        .unwrap();
        assert_eq!(prepared.action_digest.function, DigestFunction::Blake3);
        assert_eq!(
            PreparedAction::load(prepared.action_digest, &blobs).unwrap(),
            prepared
        );
    }

    #[test]
    fn load_names_missing_and_garbage_blobs() {
        let (_dir, blobs) = store();
        let f = DigestFunction::Sha256;
        let missing = f.digest_of(b"never stored");
        let err = PreparedAction::load(missing, &blobs).unwrap_err();
        assert!(
            matches!(err, ActionError::NotFound { what: "Action", digest } if digest == missing)
        );
        assert!(err.to_string().contains(&missing.hash_hex()), "{err}");

        let garbage = blobs.put_bytes(f, b"\xff\xff\xff\xff garbage").unwrap();
        let err = PreparedAction::load(garbage, &blobs).unwrap_err();
        assert!(matches!(err, ActionError::Invalid { .. }), "{err}");
        assert!(
            err.to_string().contains("Action") && err.to_string().contains(&garbage.hash_hex()),
            "{err}"
        );

        // An action whose command was never stored.
        let command_digest = f.digest_of(b"no such command");
        let action = Action {
            command_digest: Some(command_digest.to_reapi()),
            input_root_digest: Some(f.empty().to_reapi()),
            ..Default::default()
        };
        let action_digest = blobs.put_bytes(f, &action.encode_to_vec()).unwrap();
        let err = PreparedAction::load(action_digest, &blobs).unwrap_err();
        assert!(
            matches!(err, ActionError::NotFound { what: "Command", digest } if digest == command_digest),
            "{err}"
        );

        // An action without a command digest.
        let action = Action {
            input_root_digest: Some(f.empty().to_reapi()),
            ..Default::default()
        };
        let action_digest = blobs.put_bytes(f, &action.encode_to_vec()).unwrap();
        let err = PreparedAction::load(action_digest, &blobs).unwrap_err();
        assert!(err.to_string().contains("Action.command_digest"), "{err}");

        // A command blob that is not a Command.
        let bad_command = blobs.put_bytes(f, b"\x0a\xff\xff\xff\xff\xff").unwrap();
        let action = Action {
            command_digest: Some(bad_command.to_reapi()),
            input_root_digest: Some(f.empty().to_reapi()),
            ..Default::default()
        };
        let action_digest = blobs.put_bytes(f, &action.encode_to_vec()).unwrap();
        let err = PreparedAction::load(action_digest, &blobs).unwrap_err();
        assert!(
            matches!(&err, ActionError::Invalid { what, .. } if what.starts_with("Command")),
            "{err}"
        );
    }

    #[test]
    fn legacy_command_platform_is_honoured() {
        let (_dir, blobs) = store();
        let f = DigestFunction::Sha256;
        #[allow(deprecated)]
        let command = Command {
            arguments: vec!["true".into()],
            platform: Some(sorted_platform([("OSFamily", "linux")])),
            ..Default::default()
        };
        let command_digest = blobs.put_bytes(f, &command.encode_to_vec()).unwrap();
        let action = Action {
            command_digest: Some(command_digest.to_reapi()),
            input_root_digest: Some(f.empty().to_reapi()),
            ..Default::default()
        };
        let action_digest = blobs.put_bytes(f, &action.encode_to_vec()).unwrap();
        let loaded = PreparedAction::load(action_digest, &blobs).unwrap();
        assert_eq!(
            loaded.platform_property("OSFamily").as_deref(),
            Some("linux")
        );
    }

    #[test]
    #[allow(deprecated)]
    fn output_paths_and_working_directories_that_could_leave_the_exec_root_are_refused() {
        let (_dir, blobs) = store();
        let f = DigestFunction::Sha256;
        let load = |command: Command| {
            let command_digest = blobs.put_bytes(f, &command.encode_to_vec()).unwrap();
            let action = Action {
                command_digest: Some(command_digest.to_reapi()),
                input_root_digest: Some(f.empty().to_reapi()),
                ..Default::default()
            };
            let action_digest = blobs.put_bytes(f, &action.encode_to_vec()).unwrap();
            PreparedAction::load(action_digest, &blobs)
        };
        let fine = Command {
            arguments: vec!["true".into()],
            working_directory: "pkg/sub".into(),
            output_paths: vec!["out/a.o".into(), "b".into()],
            ..Default::default()
        };
        load(fine.clone()).unwrap();
        let hostile = [
            ("output_paths", "../escape", "'..'"),
            ("output_paths", "/abs", "absolute"),
            ("output_paths", "a/../../x", "'..'"),
            ("output_paths", "", "empty"),
            ("output_paths", "a//b", "empty or '.'"),
            ("output_paths", "./a", "empty or '.'"),
            ("output_paths", "a/", "ends with"),
            ("output_files", "../f", "'..'"),
            ("output_directories", "/d", "absolute"),
            ("working_directory", "..", "'..'"),
            ("working_directory", "/tmp", "absolute"),
        ];
        for (field, path, needle) in hostile {
            let mut command = fine.clone();
            match field {
                "output_paths" => command.output_paths = vec![path.into()],
                "output_files" => command.output_files = vec![path.into()],
                "output_directories" => command.output_directories = vec![path.into()],
                _ => command.working_directory = path.into(),
            }
            match load(command) {
                Err(ActionError::Invalid { what, reason }) => {
                    assert!(what.starts_with("Command"), "{what}");
                    assert!(
                        reason.contains(field) && reason.contains(&format!("{path:?}")),
                        "{reason}"
                    );
                    assert!(reason.contains(needle), "{reason} should say {needle}");
                }
                other => panic!("{field} {path:?}: expected Invalid, got {other:?}"),
            }
        }
    }

    #[test]
    fn detects_the_real_toolchain() {
        let tc = Toolchain::detect().unwrap();
        assert_eq!(tc.digest_hex.len(), 64);
        assert!(!tc.host.is_empty() && !tc.host.contains(char::is_whitespace));
        assert!(tc.sysroot.is_dir(), "{:?}", tc.sysroot);
        assert!(tc.release().is_some());
        assert_eq!(Toolchain::detect().unwrap(), tc, "detection is stable");
        assert!(matches!(
            Toolchain::from_version_text("rustc 1.0\n", PathBuf::new()),
            Err(ActionError::Toolchain(_))
        ));
        assert!(matches!(
            Toolchain::detect_with(std::ffi::OsStr::new("/nonexistent/rustc")),
            Err(ActionError::Toolchain(_))
        ));
    }
}
