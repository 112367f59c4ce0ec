//! The client's own configuration: named remotes and a default one, so that `rba build` goes to
//! the team's node without `--remote /ip4/…/p2p/…` on every command line.
//!
//! Two files, both optional, merged in this order (later wins), then `RBA_REMOTE`, then flags:
//! - the user's file, `$XDG_CONFIG_HOME/rba/config.toml` (else `~/.config/rba/config.toml`,
//!   or `RBA_CLIENT_CONFIG` when set);
//! - the project's `.rba.toml`, in the workspace directory or the nearest parent holding one.
//!
//! ```toml
//! default_remote = "team"          # a name from [remotes], or "local" for the embedded node
//! [remotes]
//! team = "/dns4/build.example.com/tcp/7400/p2p/12D3KooW…"
//! ```
//!
//! Trust: a project file comes with the sources, and whoever wrote it is not necessarily the
//! user. It may define remotes (used when the user names them with `--remote NAME`) and pick
//! the default among the *user's* remotes, but it cannot make an address the user never wrote
//! down the default: `rba build` in a freshly cloned repository never uploads it to a node the
//! repository chose. That decision is [`ClientConfig::resolve_remote`]'s, and only there.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

/// The name that means "the embedded node" wherever a remote is named.
pub const LOCAL: &str = "local";

/// The project file's name.
pub const PROJECT_FILE: &str = ".rba.toml";

/// One file's contents.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// A name from `[remotes]`, or `local`.
    pub default_remote: Option<String>,
    /// Named node addresses (`MULTIADDR/p2p/PEERID`).
    #[serde(default)]
    pub remotes: BTreeMap<String, String>,
}

impl ConfigFile {
    /// Reads and parses `path`; `None` when it does not exist.
    pub fn load(path: &Path) -> anyhow::Result<Option<ConfigFile>> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let file: ConfigFile =
            toml::from_str(&text).with_context(|| format!("in {}", path.display()))?;
        for (name, address) in &file.remotes {
            if name == LOCAL || name.is_empty() || name.contains('/') {
                bail!(
                    "in {}: remote name {name:?} is reserved or has a '/' (names are plain words)",
                    path.display()
                );
            }
            if !address.starts_with('/') {
                bail!(
                    "in {}: remote {name:?} = {address:?} is not a multiaddr (/ip4/…/p2p/PEERID)",
                    path.display()
                );
            }
        }
        Ok(Some(file))
    }
}

/// Where a remote came from, for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The user's file.
    User(PathBuf),
    /// A project's `.rba.toml`.
    Project(PathBuf),
}

/// The merged configuration of one invocation.
#[derive(Clone, Debug, Default)]
pub struct ClientConfig {
    user: Option<(PathBuf, ConfigFile)>,
    project: Option<(PathBuf, ConfigFile)>,
}

/// The user's config file path (`RBA_CLIENT_CONFIG`, else the XDG location).
pub fn user_config_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("RBA_CLIENT_CONFIG").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))?;
    Some(base.join("rba").join("config.toml"))
}

/// The nearest `.rba.toml` at or above `workspace`.
pub fn find_project_file(workspace: &Path) -> Option<PathBuf> {
    let start = std::fs::canonicalize(workspace).ok()?;
    start
        .ancestors()
        .map(|dir| dir.join(PROJECT_FILE))
        .find(|candidate| candidate.is_file())
}

impl ClientConfig {
    /// Loads the user's file and the project file for `workspace` (either may be absent).
    pub fn load(workspace: Option<&Path>) -> anyhow::Result<ClientConfig> {
        let user = match user_config_path() {
            Some(path) => ConfigFile::load(&path)?.map(|file| (path, file)),
            None => None,
        };
        let project = match workspace.and_then(find_project_file) {
            Some(path) => ConfigFile::load(&path)?.map(|file| (path, file)),
            None => None,
        };
        Ok(ClientConfig { user, project })
    }

    /// From already-parsed files (tests, `--print-config`).
    pub fn from_files(
        user: Option<(PathBuf, ConfigFile)>,
        project: Option<(PathBuf, ConfigFile)>,
    ) -> ClientConfig {
        ClientConfig { user, project }
    }

    /// The address of the remote called `name`, with where it came from: the user's definition
    /// wins over a project's for a name both define, so a repository cannot redirect a name
    /// the user already trusts.
    fn named(&self, name: &str) -> Option<(String, Origin)> {
        let lookup = |file: &Option<(PathBuf, ConfigFile)>, origin: fn(PathBuf) -> Origin| {
            file.as_ref().and_then(|(path, file)| {
                file.remotes
                    .get(name)
                    .map(|address| (address.clone(), origin(path.clone())))
            })
        };
        lookup(&self.user, Origin::User).or_else(|| lookup(&self.project, Origin::Project))
    }

    fn known_names(&self) -> Vec<String> {
        let mut names: Vec<String> = [&self.user, &self.project]
            .into_iter()
            .flatten()
            .flat_map(|(_, file)| file.remotes.keys().cloned())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The node to run on: `None` for the embedded node, else a `MULTIADDR/p2p/PEERID`.
    ///
    /// `requested` is `--remote` (or `RBA_REMOTE`): a multiaddr as given, a name from either
    /// file, or `local`. Without it, the project's `default_remote` (only a name the user's own
    /// file defines, or `local`), else the user's `default_remote`, else the embedded node.
    pub fn resolve_remote(&self, requested: Option<&str>) -> anyhow::Result<Option<String>> {
        if let Some(requested) = requested {
            if requested == LOCAL {
                return Ok(None);
            }
            if requested.starts_with('/') {
                return Ok(Some(requested.to_string()));
            }
            return match self.named(requested) {
                Some((address, _)) => Ok(Some(address)),
                None => bail!(
                    "no remote named {requested:?} (known: {}); give a multiaddr or add it to {}",
                    list_or_none(&self.known_names()),
                    user_config_path()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "the config file".into())
                ),
            };
        }
        if let Some((path, project)) = &self.project
            && let Some(default) = &project.default_remote
        {
            if default == LOCAL {
                return Ok(None);
            }
            let user_defined = self
                .user
                .as_ref()
                .and_then(|(_, user)| user.remotes.get(default));
            return match user_defined {
                Some(address) => Ok(Some(address.clone())),
                None => bail!(
                    "{} makes {default:?} the default remote, but only remotes of your own config \
                     file can be a project's default: run with --remote {default} to use it, or \
                     define it in {}",
                    path.display(),
                    user_config_path()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "your config file".into())
                ),
            };
        }
        if let Some((path, user)) = &self.user
            && let Some(default) = &user.default_remote
        {
            if default == LOCAL {
                return Ok(None);
            }
            return match self.named(default) {
                Some((address, _)) => Ok(Some(address)),
                None => bail!(
                    "{}: default_remote {default:?} is not among its [remotes] (known: {})",
                    path.display(),
                    list_or_none(&self.known_names())
                ),
            };
        }
        Ok(None)
    }

    /// A human summary of the files read and the remotes known (`rba config`).
    pub fn describe(&self) -> String {
        let mut text = String::new();
        for (label, file) in [("user", &self.user), ("project", &self.project)] {
            match file {
                Some((path, file)) => {
                    text.push_str(&format!("{label} config: {}\n", path.display()));
                    if let Some(default) = &file.default_remote {
                        text.push_str(&format!("  default_remote = {default:?}\n"));
                    }
                    for (name, address) in &file.remotes {
                        text.push_str(&format!("  {name} = {address}\n"));
                    }
                }
                None => text.push_str(&format!("{label} config: none\n")),
            }
        }
        text
    }
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEAM: &str = "/ip4/127.0.0.1/tcp/7400/p2p/12D3KooWteam";
    const EVIL: &str = "/ip4/203.0.113.9/tcp/7400/p2p/12D3KooWevil";

    fn file(default: Option<&str>, remotes: &[(&str, &str)]) -> ConfigFile {
        ConfigFile {
            default_remote: default.map(String::from),
            remotes: remotes
                .iter()
                .map(|(n, a)| (n.to_string(), a.to_string()))
                .collect(),
        }
    }

    fn config(user: Option<ConfigFile>, project: Option<ConfigFile>) -> ClientConfig {
        ClientConfig::from_files(
            user.map(|f| (PathBuf::from("/home/u/.config/rba/config.toml"), f)),
            project.map(|f| (PathBuf::from("/src/app/.rba.toml"), f)),
        )
    }

    #[test]
    fn flags_then_defaults_then_embedded() {
        let c = config(Some(file(Some("team"), &[("team", TEAM)])), None);
        assert_eq!(c.resolve_remote(None).unwrap().as_deref(), Some(TEAM));
        assert_eq!(c.resolve_remote(Some("local")).unwrap(), None);
        assert_eq!(
            c.resolve_remote(Some("team")).unwrap().as_deref(),
            Some(TEAM)
        );
        assert_eq!(c.resolve_remote(Some(EVIL)).unwrap().as_deref(), Some(EVIL));
        assert_eq!(config(None, None).resolve_remote(None).unwrap(), None);
        let error = c.resolve_remote(Some("nope")).unwrap_err().to_string();
        assert!(
            error.contains("no remote named \"nope\" (known: team)"),
            "{error}"
        );
    }

    #[test]
    fn a_project_picks_among_the_users_remotes_only() {
        let user = file(None, &[("team", TEAM)]);
        let c = config(Some(user.clone()), Some(file(Some("team"), &[])));
        assert_eq!(c.resolve_remote(None).unwrap().as_deref(), Some(TEAM));
        // A cloned repository naming its own node as the default is refused, not followed.
        let hostile = config(
            Some(user.clone()),
            Some(file(Some("theirs"), &[("theirs", EVIL)])),
        );
        let error = hostile.resolve_remote(None).unwrap_err().to_string();
        assert!(
            error.contains("/src/app/.rba.toml makes \"theirs\" the default"),
            "{error}"
        );
        // …even when it redefines a name the user has.
        let shadow = config(Some(user), Some(file(Some("team"), &[("team", EVIL)])));
        assert_eq!(shadow.resolve_remote(None).unwrap().as_deref(), Some(TEAM));
        assert_eq!(
            shadow.resolve_remote(Some("team")).unwrap().as_deref(),
            Some(TEAM)
        );
        // Named explicitly, the project's remote is the user's choice.
        assert_eq!(
            hostile.resolve_remote(Some("theirs")).unwrap().as_deref(),
            Some(EVIL)
        );
        let local = config(None, Some(file(Some("local"), &[])));
        assert_eq!(local.resolve_remote(None).unwrap(), None);
    }

    #[test]
    fn malformed_files_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        for (text, expected) in [
            ("remote = \"x\"\n", "unknown field `remote`"),
            ("[remotes]\nlocal = \"/ip4/1.2.3.4\"\n", "reserved"),
            (
                "[remotes]\nteam = \"build.example.com:7400\"\n",
                "not a multiaddr",
            ),
            ("default_remote = [1]\n", "default_remote"),
        ] {
            std::fs::write(&path, text).unwrap();
            let error = format!("{:#}", ConfigFile::load(&path).unwrap_err());
            assert!(error.contains(expected), "{text:?}: {error}");
            assert!(error.contains("config.toml"), "{error}");
        }
        assert_eq!(ConfigFile::load(&dir.path().join("absent")).unwrap(), None);
    }
}
