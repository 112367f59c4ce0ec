//! Which Rust toolchain a cargo job runs with: the one its workspace asks for
//! (`rust-toolchain` / `rust-toolchain.toml` at the root of the input tree), chosen among the
//! toolchains installed on this node, else the node's default.
//!
//! # Why
//!
//! A crate pinned to `nightly` or to `1.70.0` does not build (or builds differently) with
//! whatever `rustc` the node started with, and a result built by one toolchain must never be
//! served for another. So the workspace's choice selects the toolchain, and the toolchain's
//! identity (the BLAKE3 of its `rustc -vV`, [`Toolchain::digest_hex`]) is the `toolchain`
//! platform property of the job's Action (its action key) and part of its slot key.
//!
//! # Contract
//!
//! - Installed toolchains are rustup's (`$RUSTUP_HOME/toolchains/*`, default
//!   `~/.rustup/toolchains`, linked ones from `rustup toolchain link` included) and the
//!   toolchain roots of the executor's config (each a sysroot, named by its directory name).
//!   An entry counts when it has `bin/rustc` and `bin/cargo`.
//! - A channel `C` matches the installed toolchain named `C` or `C-<host triple>` (rustup's
//!   names: `stable-x86_64-unknown-linux-gnu`, `1.95.0-…`, `nightly-…`, or a linked name).
//!   The channel only ever selects a name from that listing: it never becomes a path.
//! - The workspace's file is client input: a `path = …` key, or a channel that is not a plain
//!   name (`/usr`, `../../etc`, anything but ASCII letters, digits, `.`, `_`, `-`, or starting
//!   with `.`) is refused with an error naming it, before anything is mounted. A channel the
//!   node lacks is refused naming it and listing what is installed. Other keys (`components`,
//!   `targets`, `profile`) are not acted on: what is installed is what is used.
//! - When both files exist, `rust-toolchain` wins, as with rustup.
//! - [`Toolchains::by_digest`] maps an Action's `toolchain` property back to a sysroot on this
//!   node, for the runner (and for actions REAPI clients stored themselves).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use rba_cas::{BlobStore, Digest};

use crate::action::Toolchain;

/// The files naming a workspace's toolchain, in the order they are looked for.
pub const TOOLCHAIN_FILES: [&str; 2] = ["rust-toolchain", "rust-toolchain.toml"];
/// Largest toolchain file read.
const MAX_TOOLCHAIN_FILE_BYTES: u64 = 64 << 10;

/// Why a job's toolchain cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum ToolchainError {
    /// The workspace's toolchain file is refused (a path, a malformed file).
    #[error("{file}: {reason}")]
    Refused {
        /// `rust-toolchain.toml` or `rust-toolchain`.
        file: String,
        /// Why, naming the offending value.
        reason: String,
    },
    /// The channel asked for is not installed here.
    #[error("toolchain {channel:?} is not installed on this node; installed: {installed}")]
    NotInstalled {
        /// The channel as the workspace wrote it.
        channel: String,
        /// The installed toolchains' names, comma-separated.
        installed: String,
    },
    /// An action names a toolchain digest no installed toolchain has.
    #[error("the action's toolchain {0} is not installed on this node")]
    UnknownDigest(String),
    /// An installed toolchain could not be identified.
    #[error(transparent)]
    Detect(#[from] crate::action::ActionError),
    /// The workspace's tree could not be read.
    #[error(transparent)]
    Cas(#[from] rba_cas::CasError),
}

/// The channel a toolchain file names, or an error naming what is refused. `file` is the
/// file's name (`rust-toolchain.toml` or `rust-toolchain`), `text` its content.
pub fn parse_toolchain_file(file: &str, text: &str) -> Result<String, ToolchainError> {
    let refused = |reason: String| ToolchainError::Refused {
        file: file.to_string(),
        reason,
    };
    let toml_form = file.ends_with(".toml") || text.trim_start().starts_with('[');
    let channel = if toml_form {
        let value: toml::Table = text
            .parse()
            .map_err(|e| refused(format!("not valid TOML: {e}")))?;
        let table = value
            .get("toolchain")
            .and_then(|t| t.as_table())
            .ok_or_else(|| refused("no [toolchain] table".into()))?;
        if let Some(path) = table.get("path") {
            return Err(refused(format!(
                "names the toolchain path {path}; this node only runs its installed \
                 toolchains (name a channel instead)"
            )));
        }
        table
            .get("channel")
            .and_then(|c| c.as_str())
            .ok_or_else(|| refused("no `channel` in [toolchain]".into()))?
            .to_string()
    } else {
        text.trim().to_string()
    };
    check_channel(&channel).map_err(refused)?;
    Ok(channel)
}

/// A channel is a plain name: `stable`, `1.70.0`, `nightly-2025-01-01`, a linked name.
fn check_channel(channel: &str) -> Result<(), String> {
    let plain = !channel.is_empty()
        && channel.len() <= 128
        && !channel.starts_with('.')
        && channel
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if plain {
        Ok(())
    } else {
        Err(format!(
            "the toolchain {channel:?} is not a channel name (a path or other characters); \
             this node only runs its installed toolchains"
        ))
    }
}

/// The channel the input tree's toolchain file names, if it has one (read from the CAS).
pub fn workspace_channel(
    blobs: &BlobStore,
    root: &Digest,
) -> Result<Option<String>, ToolchainError> {
    for file in TOOLCHAIN_FILES {
        if let Some((digest, _)) = rba_cas::merkle::find_file(blobs, root, file)? {
            if digest.size > MAX_TOOLCHAIN_FILE_BYTES {
                return Err(ToolchainError::Refused {
                    file: file.to_string(),
                    reason: format!("larger than {MAX_TOOLCHAIN_FILE_BYTES} bytes"),
                });
            }
            let bytes = blobs.read_to_vec(&digest, MAX_TOOLCHAIN_FILE_BYTES)?;
            let text = String::from_utf8(bytes).map_err(|_| ToolchainError::Refused {
                file: file.to_string(),
                reason: "not UTF-8".into(),
            })?;
            return parse_toolchain_file(file, &text).map(Some);
        }
    }
    Ok(None)
}

/// The toolchains of this node: the default one and those installed.
#[derive(Debug)]
pub struct Toolchains {
    default: Toolchain,
    rustup_toolchains: Option<PathBuf>,
    roots: Vec<PathBuf>,
    /// Identified toolchains by digest (the default's and every one selected so far).
    known: Mutex<HashMap<String, Toolchain>>,
    /// Identified toolchains by installed path (detection runs `rustc` twice).
    detected: Mutex<HashMap<PathBuf, Toolchain>>,
}

/// rustup's home: `$RUSTUP_HOME`, else `~/.rustup`.
pub fn default_rustup_home() -> Option<PathBuf> {
    std::env::var_os("RUSTUP_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".rustup")))
}

impl Toolchains {
    /// `default` for workspaces that name no toolchain; rustup's toolchains under
    /// `rustup_home` and the sysroots in `roots` for those that do.
    pub fn new(default: Toolchain, rustup_home: Option<PathBuf>, roots: Vec<PathBuf>) -> Self {
        let known = HashMap::from([(default.digest_hex.clone(), default.clone())]);
        Toolchains {
            default,
            rustup_toolchains: rustup_home.map(|home| home.join("toolchains")),
            roots,
            known: Mutex::new(known),
            detected: Mutex::new(HashMap::new()),
        }
    }

    /// The toolchain of workspaces that name none.
    pub fn default_toolchain(&self) -> &Toolchain {
        &self.default
    }

    /// Installed toolchains as (name, path), sorted by name: rustup's, then the roots'.
    pub fn installed(&self) -> Vec<(String, PathBuf)> {
        let usable =
            |path: &Path| path.join("bin/rustc").is_file() && path.join("bin/cargo").is_file();
        let mut found = Vec::new();
        if let Some(dir) = &self.rustup_toolchains
            && let Ok(entries) = std::fs::read_dir(dir)
        {
            for entry in entries.flatten() {
                let (name, path) = (entry.file_name(), entry.path());
                if let Some(name) = name.to_str()
                    && usable(&path)
                {
                    found.push((name.to_string(), path));
                }
            }
        }
        found.sort();
        for root in &self.roots {
            if let Some(name) = root.file_name().and_then(|n| n.to_str())
                && usable(root)
            {
                found.push((name.to_string(), root.clone()));
            }
        }
        found
    }

    /// The installed toolchain `channel` names (see the module documentation).
    pub fn select(&self, channel: &str) -> Result<Toolchain, ToolchainError> {
        check_channel(channel).map_err(|reason| ToolchainError::Refused {
            file: "toolchain".into(),
            reason,
        })?;
        let installed = self.installed();
        let qualified = format!("{channel}-{}", self.default.host);
        let chosen = installed
            .iter()
            .find(|(name, _)| name == channel)
            .or_else(|| installed.iter().find(|(name, _)| *name == qualified));
        let Some((_, path)) = chosen else {
            let names: Vec<&str> = installed.iter().map(|(n, _)| n.as_str()).collect();
            return Err(ToolchainError::NotInstalled {
                channel: channel.to_string(),
                installed: if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                },
            });
        };
        self.identify(path)
    }

    /// The toolchain for a job on the input tree `root`: the one its toolchain file names, or
    /// the default.
    pub fn for_workspace(
        &self,
        blobs: &BlobStore,
        root: &Digest,
    ) -> Result<Toolchain, ToolchainError> {
        match workspace_channel(blobs, root)? {
            Some(channel) => self.select(&channel),
            None => Ok(self.default.clone()),
        }
    }

    /// The installed toolchain whose identity is `digest_hex` (an Action's `toolchain`
    /// property), identifying installed toolchains not seen yet if needed.
    pub fn by_digest(&self, digest_hex: &str) -> Result<Toolchain, ToolchainError> {
        if let Some(toolchain) = self.known.lock().get(digest_hex) {
            return Ok(toolchain.clone());
        }
        for (_, path) in self.installed() {
            let toolchain = self.identify(&path)?;
            if toolchain.digest_hex == digest_hex {
                return Ok(toolchain);
            }
        }
        Err(ToolchainError::UnknownDigest(digest_hex.to_string()))
    }

    /// Runs the toolchain's own `rustc` (never rustup's proxy) once per path.
    fn identify(&self, path: &Path) -> Result<Toolchain, ToolchainError> {
        if let Some(toolchain) = self.detected.lock().get(path) {
            return Ok(toolchain.clone());
        }
        let toolchain = Toolchain::detect_with(path.join("bin/rustc").as_os_str())?;
        self.detected
            .lock()
            .insert(path.to_path_buf(), toolchain.clone());
        self.known
            .lock()
            .insert(toolchain.digest_hex.clone(), toolchain.clone());
        Ok(toolchain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake sysroot at `dir/name` whose `bin/rustc` prints `release` in its `-vV`.
    fn fake_toolchain(dir: &Path, name: &str, release: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let root = dir.join(name);
        std::fs::create_dir_all(root.join("bin")).unwrap();
        let rustc = root.join("bin/rustc");
        std::fs::write(
            &rustc,
            format!(
                "#!/bin/sh\nif [ \"$1\" = -vV ]; then printf 'rustc {release}\\nhost: x86_64-unknown-linux-gnu\\nrelease: {release}\\n'; \
                 else echo {}; fi\n",
                root.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&rustc, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::copy(&rustc, root.join("bin/cargo")).unwrap();
        root
    }

    #[test]
    fn channels_select_rustup_names_and_roots_and_digests_map_back() {
        let dir = tempfile::tempdir().unwrap();
        let rustup = dir.path().join("rustup");
        let default = Toolchain::detect_with(
            fake_toolchain(
                &rustup.join("toolchains"),
                "stable-x86_64-unknown-linux-gnu",
                "1.0.0",
            )
            .join("bin/rustc")
            .as_os_str(),
        )
        .unwrap();
        fake_toolchain(
            &rustup.join("toolchains"),
            "1.70.0-x86_64-unknown-linux-gnu",
            "1.70.0",
        );
        // Not a toolchain: no bin/cargo.
        std::fs::create_dir_all(rustup.join("toolchains/broken/bin")).unwrap();
        let root = fake_toolchain(&dir.path().join("roots"), "custom", "9.9.9");
        let toolchains = Toolchains::new(default.clone(), Some(rustup), vec![root.clone()]);

        let names: Vec<String> = toolchains.installed().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "1.70.0-x86_64-unknown-linux-gnu",
                "stable-x86_64-unknown-linux-gnu",
                "custom"
            ]
        );
        let old = toolchains.select("1.70.0").unwrap();
        assert_eq!(old.release(), Some("1.70.0"));
        assert_eq!(toolchains.select("stable").unwrap(), default);
        let custom = toolchains.select("custom").unwrap();
        assert_eq!(custom.sysroot, root);
        let error = toolchains.select("1.71.0").unwrap_err().to_string();
        assert_eq!(
            error,
            "toolchain \"1.71.0\" is not installed on this node; installed: \
             1.70.0-x86_64-unknown-linux-gnu, stable-x86_64-unknown-linux-gnu, custom"
        );
        assert!(toolchains.select("broken").is_err());
        assert!(
            toolchains
                .select("../toolchains/1.70.0-x86_64-unknown-linux-gnu")
                .is_err()
        );

        // An action's toolchain digest maps back, also for one never selected on this run.
        let fresh = Toolchains::new(default.clone(), None, vec![root.clone()]);
        assert_eq!(fresh.by_digest(&custom.digest_hex).unwrap(), custom);
        assert_eq!(fresh.by_digest(&default.digest_hex).unwrap(), default);
        assert!(matches!(
            fresh.by_digest(&old.digest_hex),
            Err(ToolchainError::UnknownDigest(_))
        ));
    }

    #[test]
    fn toolchain_files_name_channels_and_never_paths() {
        let toml = |text: &str| parse_toolchain_file("rust-toolchain.toml", text);
        assert_eq!(
            toml("[toolchain]\nchannel = \"nightly\"\ncomponents = [\"rustfmt\"]\n").unwrap(),
            "nightly"
        );
        assert_eq!(
            parse_toolchain_file("rust-toolchain", "1.70.0\n").unwrap(),
            "1.70.0"
        );
        assert_eq!(
            parse_toolchain_file("rust-toolchain", "[toolchain]\nchannel = \"stable\"\n").unwrap(),
            "stable"
        );
        for hostile in [
            "[toolchain]\npath = \"/usr\"\n",
            "[toolchain]\nchannel = \"../../etc\"\n",
            "[toolchain]\nchannel = \"/usr\"\n",
            "[toolchain]\nchannel = \".\"\n",
            "[toolchain]\nchannel = \"\"\n",
            "[toolchain]\nchannel = \"a b\"\n",
            "[toolchain]\n",
            "channel = \"stable\"\n",
            "not toml [",
        ] {
            let error = toml(hostile).unwrap_err().to_string();
            assert!(error.starts_with("rust-toolchain.toml: "), "{error}");
        }
        let error = toml("[toolchain]\npath = \"/usr\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("\"/usr\""), "{error}");
        let error = toml("[toolchain]\nchannel = \"../../etc\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("\"../../etc\""), "{error}");
        let error = parse_toolchain_file("rust-toolchain", "/opt/rust\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("\"/opt/rust\""), "{error}");
    }
}
