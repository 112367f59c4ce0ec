//! Cargo's own flags, first-class on `rba build|test|lint|check|…`: `-p`, `--workspace`,
//! `--features`, `--target`, `--profile`, `--bin`, `-j`, `--message-format json` and the rest, so
//! that `rba build -p app --release` means what `cargo build -p app --release` means.
//!
//! Why a module: the flags are parsed here once and turned into cargo arguments once
//! ([`CargoFlags::cargo_args`]); both modes (embedded and `--remote`) and every job kind send
//! the same list, as the job's extra arguments, ahead of whatever follows `--`.
//!
//! The values are client input that ends up on a command line inside the sandbox: a value that
//! starts with `-` (which cargo would read as another flag), a `--target` that is a path to a
//! target-spec file rather than a triple, or a profile name cargo would not accept is refused
//! here with the flag named, before anything is hashed or sent.

use clap::{Args, ValueEnum};

/// `--message-format`: how cargo's messages reach the user.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum MessageFormat {
    /// cargo's human output on stderr.
    #[default]
    Human,
    /// cargo's JSON records on stdout, one per line, as `cargo --message-format json` prints
    /// them (diagnostics rendered on stderr); replayed with the log on a cache hit.
    Json,
}

/// The cargo flags every job command takes.
#[derive(Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct CargoFlags {
    /// Package(s) to build (`cargo -p`).
    #[arg(short = 'p', long = "package", value_name = "SPEC")]
    pub packages: Vec<String>,
    /// Every package of the workspace.
    #[arg(long)]
    pub workspace: bool,
    /// Exclude package(s) (with `--workspace`).
    #[arg(long, value_name = "SPEC")]
    pub exclude: Vec<String>,
    /// Features to activate (space or comma separated).
    #[arg(short = 'F', long, value_name = "FEATURES")]
    pub features: Vec<String>,
    /// Every feature of the selected packages.
    #[arg(long)]
    pub all_features: bool,
    /// Not the `default` feature.
    #[arg(long)]
    pub no_default_features: bool,
    /// Build for this target triple (e.g. `x86_64-unknown-linux-musl`).
    #[arg(long, value_name = "TRIPLE")]
    pub target: Vec<String>,
    /// Build with this profile (`release`, `dev` or one of the manifest's `[profile.*]`).
    #[arg(long, value_name = "NAME", conflicts_with = "release")]
    pub profile: Option<String>,
    /// Build with the release profile.
    #[arg(short = 'r', long)]
    pub release: bool,
    /// Only this binary target.
    #[arg(long, value_name = "NAME")]
    pub bin: Vec<String>,
    /// Every binary target.
    #[arg(long)]
    pub bins: bool,
    /// Only this example target.
    #[arg(long, value_name = "NAME")]
    pub example: Vec<String>,
    /// Every example target.
    #[arg(long)]
    pub examples: bool,
    /// Only the library target.
    #[arg(long)]
    pub lib: bool,
    /// Every test target.
    #[arg(long)]
    pub tests: bool,
    /// Only this test target.
    #[arg(long = "test", value_name = "NAME")]
    pub test_targets: Vec<String>,
    /// Every target.
    #[arg(long)]
    pub all_targets: bool,
    /// Parallel jobs of cargo (`cargo -j`).
    #[arg(short = 'j', long, value_name = "N")]
    pub jobs: Option<u32>,
    /// Cargo's `--locked`: a workspace without a Cargo.lock fails instead of having one
    /// resolved on the node (and written next to Cargo.toml).
    #[arg(long)]
    pub locked: bool,
    /// How cargo's messages are shown.
    #[arg(long, value_enum, default_value_t)]
    pub message_format: MessageFormat,
}

/// A flag value the node would never accept.
#[derive(Debug, thiserror::Error)]
#[error("{flag} {value:?}: {reason}")]
pub struct FlagError {
    flag: &'static str,
    value: String,
    reason: &'static str,
}

fn check(flag: &'static str, value: &str, ok: impl Fn(char) -> bool) -> Result<(), FlagError> {
    let refuse = |reason| {
        Err(FlagError {
            flag,
            value: value.to_string(),
            reason,
        })
    };
    if value.is_empty() {
        return refuse("is empty");
    }
    if value.starts_with('-') {
        return refuse("starts with '-' (cargo would read it as a flag)");
    }
    if !value.chars().all(ok) {
        return refuse("has a character cargo does not accept there");
    }
    Ok(())
}

/// Characters of package specs (`name`, `name@1.2.3`, `name:1.2.3`), target and feature names.
fn spec_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_.@:+/".contains(c)
}

fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_".contains(c)
}

fn triple_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_.".contains(c)
}

fn feature_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_/+., ".contains(c)
}

impl CargoFlags {
    /// True when the job builds with the release profile (`--release` or `--profile release`).
    pub fn release(&self) -> bool {
        self.release || self.profile.as_deref() == Some("release")
    }

    /// The cargo arguments these flags stand for, checked. `--release` and `--profile release`
    /// are not among them: they travel as the job's release option (part of its profile).
    pub fn cargo_args(&self) -> Result<Vec<String>, FlagError> {
        let mut args = Vec::new();
        for spec in &self.packages {
            check("--package", spec, spec_char)?;
            args.extend(["--package".to_string(), spec.clone()]);
        }
        if self.workspace {
            args.push("--workspace".to_string());
        }
        for spec in &self.exclude {
            check("--exclude", spec, spec_char)?;
            args.extend(["--exclude".to_string(), spec.clone()]);
        }
        for features in &self.features {
            check("--features", features, feature_char)?;
            args.extend(["--features".to_string(), features.clone()]);
        }
        if self.all_features {
            args.push("--all-features".to_string());
        }
        if self.no_default_features {
            args.push("--no-default-features".to_string());
        }
        for triple in &self.target {
            // A value with a `/` or ending in `.json` is a target-spec file: not a triple.
            if triple.ends_with(".json") {
                return Err(FlagError {
                    flag: "--target",
                    value: triple.clone(),
                    reason: "is a target-spec file; only target triples are accepted",
                });
            }
            check("--target", triple, triple_char)?;
            args.extend(["--target".to_string(), triple.clone()]);
        }
        match self.profile.as_deref() {
            None | Some("release") => {}
            Some(profile) => {
                check("--profile", profile, name_char)?;
                args.extend(["--profile".to_string(), profile.to_string()]);
            }
        }
        let targets: [(&'static str, &Vec<String>); 3] = [
            ("--bin", &self.bin),
            ("--example", &self.example),
            ("--test", &self.test_targets),
        ];
        for (flag, names) in targets {
            for name in names {
                check(flag, name, spec_char)?;
                args.extend([flag.to_string(), name.clone()]);
            }
        }
        for (flag, on) in [
            ("--bins", self.bins),
            ("--examples", self.examples),
            ("--lib", self.lib),
            ("--tests", self.tests),
            ("--all-targets", self.all_targets),
        ] {
            if on {
                args.push(flag.to_string());
            }
        }
        if let Some(jobs) = self.jobs {
            args.extend(["--jobs".to_string(), jobs.to_string()]);
        }
        if self.locked {
            args.push("--locked".to_string());
        }
        if self.message_format == MessageFormat::Json {
            args.extend(["--message-format".to_string(), "json".to_string()]);
        }
        Ok(args)
    }

    /// The directory under the target dir where cargo leaves this build's outputs
    /// (`debug`, `release`, a custom profile's name), below the triple with `--target`.
    pub fn profile_dir(&self) -> String {
        match self.profile.as_deref() {
            Some("dev") | Some("test") => "debug".to_string(),
            Some("bench") => "release".to_string(),
            Some(profile) => profile.to_string(),
            None if self.release => "release".to_string(),
            None => "debug".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        flags: CargoFlags,
    }

    fn parse(args: &[&str]) -> CargoFlags {
        Cli::try_parse_from(std::iter::once("rba").chain(args.iter().copied()))
            .unwrap()
            .flags
    }

    #[test]
    fn flags_become_cargo_arguments() {
        let flags = parse(&[
            "-p",
            "app",
            "--features",
            "a,b",
            "--no-default-features",
            "--target",
            "x86_64-unknown-linux-gnu",
            "--bin",
            "tool",
            "--tests",
            "-j",
            "3",
        ]);
        assert_eq!(
            flags.cargo_args().unwrap(),
            [
                "--package",
                "app",
                "--features",
                "a,b",
                "--no-default-features",
                "--target",
                "x86_64-unknown-linux-gnu",
                "--bin",
                "tool",
                "--tests",
                "--jobs",
                "3"
            ]
        );
        assert!(!flags.release());
    }

    #[test]
    fn profiles_map_to_release_and_directories() {
        let release = parse(&["--profile", "release"]);
        assert!(release.release());
        assert!(release.cargo_args().unwrap().is_empty());
        assert_eq!(release.profile_dir(), "release");
        assert_eq!(parse(&["-r"]).profile_dir(), "release");
        let custom = parse(&["--profile", "fast"]);
        assert!(!custom.release());
        assert_eq!(custom.cargo_args().unwrap(), ["--profile", "fast"]);
        assert_eq!(custom.profile_dir(), "fast");
        assert_eq!(parse(&["--profile", "dev"]).profile_dir(), "debug");
        assert!(
            Cli::try_parse_from(["rba", "--release", "--profile", "fast"]).is_err(),
            "--release and --profile conflict as in cargo"
        );
    }

    #[test]
    fn hostile_values_are_refused_with_the_flag_named() {
        for (args, flag) in [
            (vec!["--target", "/etc/evil.json"], "--target"),
            (vec!["--target", "spec.json"], "--target"),
            (vec!["--profile", "../x"], "--profile"),
            (vec!["-p", "a;rm -rf /"], "--package"),
            (vec!["--features", "a\nb"], "--features"),
            (vec!["--bin", "a b"], "--bin"),
        ] {
            let error = parse(&args).cargo_args().unwrap_err().to_string();
            assert!(error.starts_with(flag), "{args:?}: {error}");
        }
        // clap itself refuses a value that looks like another flag.
        assert!(Cli::try_parse_from(["rba", "-p", "--config=x"]).is_err());
        let error = CargoFlags {
            packages: vec!["--config=build.rustflags".into()],
            ..Default::default()
        }
        .cargo_args()
        .unwrap_err()
        .to_string();
        assert!(error.contains("starts with '-'"), "{error}");
    }
}
