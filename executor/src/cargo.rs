//! Cargo jobs: which cargo command line each job kind runs in the sandbox, and how cargo's
//! output is turned into user-visible lines, progress, artifacts and a build verdict.
//!
//! # Why
//!
//! Users want to see cargo's own human output, in colour, exactly as on their terminal, while
//! the node needs structured facts (which units are done, which artifacts were produced, did the
//! build succeed). Cargo gives both at once with
//! `--message-format=json-diagnostic-rendered-ansi`: stdout carries JSON records whose
//! diagnostics embed the rendered, ANSI-coloured text. [`CargoOutputParser`] splits them again.
//!
//! # Contract
//!
//! - [`CargoJob::argv`] is the complete argument vector (starting with `cargo`) run inside the
//!   sandbox with the environment of [`crate::action`] (`CARGO_TERM_COLOR=always`, so cargo's
//!   stderr status lines such as `Compiling foo` are coloured too). Compiling jobs always pass
//!   `--locked --offline`: dependencies were fetched earlier by [`fetch_argv`] in the network
//!   phase, and the build phase has no network.
//! - A workspace without a `Cargo.lock` has one resolved first ([`resolve_argv`]: `cargo
//!   generate-lockfile` in the network phase, on a copy under [`RESOLVE_DIR`]); the executor
//!   returns it as the job's `Cargo.lock` output. The user's own `--locked`/`--frozen` (before
//!   any `--`) is not passed a second time: it becomes [`CargoJob::lock_required`] (a platform
//!   property of the action), and a workspace without a lock file then fails as in cargo.
//! - Per kind (extra arguments of the job are appended after ours, see [`CargoJob::argv`]):
//!   - `Build`: `cargo build --locked --offline --message-format=json-diagnostic-rendered-ansi
//!     [--release]`.
//!   - `Test`: `cargo test --locked --offline --no-fail-fast --message-format=… [--release]`.
//!     The test harness prints its results on stdout as plain text: those lines pass through.
//!     `BuildFinished` reports the compilation only; test failures show in the exit status.
//!   - `Clippy` (the protocol's `JOB_KIND_LINT`): `cargo clippy --locked --offline --all-targets
//!     --message-format=… [--release] -- -D warnings`. Decision: the lint job passes exactly when
//!     clippy exits 0 with every warning (rustc's and clippy's default lints) denied, so a
//!     green lint job means "no warnings at all".
//!   - `Fmt`: `cargo fmt --all --check` (no profile, no JSON: rustfmt prints a diff on stdout,
//!     which passes through; exit status 1 means "not formatted").
//!   - `Audit`: `/rba/cargo-audit audit --db /advisory-db --no-fetch --stale --no-yanked
//!     --color always` (cargo-audit run as cargo would run it). `cargo audit` normally clones
//!     the RustSec advisory database and asks crates.io about yanked crates, over a network the
//!     build phase does not have: the node's operator keeps the database (executor config
//!     `advisory_db`), mounted read-only at [`ADVISORY_DB`], and the node's `cargo-audit`
//!     binary is mounted read-only at [`CARGO_AUDIT`]; the job never fetches either. `--stale`
//!     accepts a database older than 90 days, since freshness is the operator's job. Exit
//!     status 1 (a vulnerable dependency) fails the job.
//!   - `Check`: `cargo check --locked --offline --all-targets --message-format=… [--release]`.
//!   - `Run`: `cargo run --locked --offline --message-format=… [--release]`, then the
//!     program's own arguments after the user's `--`. The program runs in the build's sandbox
//!     (no network, the job's limits); its stdout and stderr pass through as user lines and
//!     its exit status is the job's. Never cached ([`JobKind::result_is_reusable`]).
//! - `release` only affects kinds that compile ([`JobKind::has_profile`]); for `Fmt` and
//!   `Audit` it is ignored and [`CargoJob::profile`] is `debug`, so the request's flag does not
//!   split their cache entries.
//! - Progress: cargo's JSON does not say how many units a build has (only the unstable
//!   `--unit-graph` does). We count units done exactly (one per `compiler-artifact` and per
//!   `build-script-executed`, fresh units included) and report the total as 0 ("unknown") until
//!   `build-finished`, when total = done. A caller may give an estimate
//!   ([`CargoOutputParser::with_total_estimate`], e.g. [`lockfile_unit_estimate`]); the reported
//!   total is then `max(estimate, done)` while running, and exact at the end.
//! - Lines on stdout that are not cargo JSON records (test harness output, rustfmt diffs, a
//!   program's output) become [`CargoEvent::UserLine`] unchanged; so do all stderr lines.
//!   Rendered diagnostics become [`CargoEvent::Diagnostic`]: logged on stderr, where cargo's
//!   human output puts them.
//!   A stdout line that is a JSON object with a `reason` field is taken as a cargo record until
//!   `build-finished`; after it, stdout is the output of what cargo runs and never a record.

use serde::Deserialize;

/// The message format every compiling job uses.
pub const MESSAGE_FORMAT: &str = "--message-format=json-diagnostic-rendered-ansi";

/// The message format of a compiling job whose user asked for cargo's JSON records
/// (`--message-format json`): cargo renders the diagnostics itself on stderr, as a human run
/// would, and the records on stdout go to the user as they are ([`CargoOutputParser::forward_records`]).
/// A different argument vector, so a different action key: a replayed log has the records.
pub const RECORDS_FORMAT: &str = "--message-format=json-render-diagnostics";

/// The user's own `--message-format` among `args` (`--message-format X`, `--message-format=X`),
/// removed; `true` when one of them asked for JSON. Cargo refuses two message formats, and ours
/// must stay JSON for the node to follow the build.
fn take_message_format(args: &[String]) -> (Vec<String>, bool) {
    let mut kept = Vec::with_capacity(args.len());
    let mut json = false;
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        if arg == "--" {
            kept.push(arg.clone());
            kept.extend(iter.by_ref().cloned());
            break;
        }
        let value = if arg == "--message-format" {
            iter.next().cloned().unwrap_or_default()
        } else if let Some(value) = arg.strip_prefix("--message-format=") {
            value.to_string()
        } else {
            kept.push(arg.clone());
            continue;
        };
        json |= value.split(',').any(|v| v.trim().starts_with("json"));
    }
    (kept, json)
}

/// Where audit jobs find the node's RustSec advisory database in the sandbox (read-only).
pub const ADVISORY_DB: &str = "/advisory-db";
/// Where audit jobs find the node's `cargo-audit` binary in the sandbox (read-only).
pub const CARGO_AUDIT: &str = "/rba/cargo-audit";

/// What a job does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobKind {
    /// `cargo build`.
    Build,
    /// `cargo test`.
    Test,
    /// `cargo clippy` with warnings denied (the protocol's lint job).
    Clippy,
    /// `cargo fmt --check`.
    Fmt,
    /// `cargo audit` against a pre-fetched advisory database.
    Audit,
    /// `cargo check`.
    Check,
    /// `cargo run`: builds, then runs the program in the same sandbox (no network, the job's
    /// limits). Never served from the action cache ([`JobKind::result_is_reusable`]).
    Run,
}

/// A job kind the protocol sent that we do not run.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unsupported job kind {0} (expected build, test, lint, fmt, audit, check or run)")]
pub struct UnsupportedJobKind(pub i32);

impl JobKind {
    /// Every kind.
    pub const ALL: [JobKind; 7] = [
        JobKind::Build,
        JobKind::Test,
        JobKind::Clippy,
        JobKind::Fmt,
        JobKind::Audit,
        JobKind::Check,
        JobKind::Run,
    ];

    /// Lowercase name (`build`, `test`, `clippy`, `fmt`, `audit`, `check`, `run`), also the `job`
    /// platform property of the job's REAPI action.
    pub fn name(self) -> &'static str {
        match self {
            JobKind::Build => "build",
            JobKind::Test => "test",
            JobKind::Clippy => "clippy",
            JobKind::Fmt => "fmt",
            JobKind::Audit => "audit",
            JobKind::Check => "check",
            JobKind::Run => "run",
        }
    }

    /// From the session protocol's enum; `None` for `JOB_KIND_UNSPECIFIED`.
    pub fn from_proto(kind: rba_proto::rba::v1::JobKind) -> Option<JobKind> {
        use rba_proto::rba::v1::JobKind as P;
        match kind {
            P::Unspecified => None,
            P::Build => Some(JobKind::Build),
            P::Test => Some(JobKind::Test),
            P::Lint => Some(JobKind::Clippy),
            P::Audit => Some(JobKind::Audit),
            P::Check => Some(JobKind::Check),
            P::Fmt => Some(JobKind::Fmt),
            P::Run => Some(JobKind::Run),
        }
    }

    /// From the raw `kind` field of a `Submit` message.
    pub fn from_proto_i32(kind: i32) -> Result<JobKind, UnsupportedJobKind> {
        rba_proto::rba::v1::JobKind::try_from(kind)
            .ok()
            .and_then(JobKind::from_proto)
            .ok_or(UnsupportedJobKind(kind))
    }

    /// The session protocol's enum.
    pub fn to_proto(self) -> rba_proto::rba::v1::JobKind {
        use rba_proto::rba::v1::JobKind as P;
        match self {
            JobKind::Build => P::Build,
            JobKind::Test => P::Test,
            JobKind::Clippy => P::Lint,
            JobKind::Audit => P::Audit,
            JobKind::Check => P::Check,
            JobKind::Fmt => P::Fmt,
            JobKind::Run => P::Run,
        }
    }

    /// True for kinds that compile, honour `--release` and emit cargo JSON records.
    pub fn has_profile(self) -> bool {
        !matches!(self, JobKind::Fmt | JobKind::Audit)
    }

    /// False for `Run`: what a program prints may depend on more than its inputs (the clock,
    /// randomness), so each run runs; its action says `do_not_cache`, and its result is kept
    /// only for its own tenant. The build it runs still reuses the target dir's units. Cargo's
    /// other commands are functions of the workspace and the toolchain, and are cached.
    pub fn result_is_reusable(self) -> bool {
        self != JobKind::Run
    }
}

/// A cargo job as submitted: what to run and how.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CargoJob {
    /// What to run.
    pub kind: JobKind,
    /// Build with the release profile (ignored by `Fmt` and `Audit`).
    pub release: bool,
    /// Extra arguments appended after the job's own, e.g. `-p crate`; see [`CargoJob::argv`].
    pub extra_args: Vec<String>,
}

impl CargoJob {
    /// A debug-profile job without extra arguments.
    pub fn new(kind: JobKind) -> Self {
        CargoJob {
            kind,
            release: false,
            extra_args: Vec::new(),
        }
    }

    /// From the fields of a `Submit` message.
    pub fn from_proto(
        kind: i32,
        options: Option<&rba_proto::rba::v1::JobOptions>,
    ) -> Result<Self, UnsupportedJobKind> {
        Ok(CargoJob {
            kind: JobKind::from_proto_i32(kind)?,
            release: options.is_some_and(|o| o.release),
            extra_args: options.map(|o| o.extra_args.clone()).unwrap_or_default(),
        })
    }

    /// True when the user asked for cargo's `--locked` (or `--frozen`) among the extra
    /// arguments (before any `--`): a workspace without a `Cargo.lock` then fails as cargo
    /// fails, instead of having its lock file resolved in the fetch phase.
    pub fn lock_required(&self) -> bool {
        self.extra_args
            .iter()
            .take_while(|a| *a != "--")
            .any(|a| a == "--locked" || a == "--frozen")
    }

    /// True when the release profile is in effect (requested and meaningful for the kind).
    pub fn effective_release(&self) -> bool {
        self.release && self.kind.has_profile()
    }

    /// `release` or `debug` (always `debug` for kinds without a profile).
    pub fn profile(&self) -> &'static str {
        if self.effective_release() {
            "release"
        } else {
            "debug"
        }
    }

    /// The argument vector run in the sandbox, starting with `cargo`.
    ///
    /// Extra arguments come after the job's own. For `Clippy`, extra arguments before a `--`
    /// go to cargo and those after it are appended after `-D warnings` (to clippy-driver); for
    /// every other kind they are appended as given (so `cargo test` extras may include
    /// `-- --nocapture`).
    pub fn argv(&self) -> Vec<String> {
        let (extra_args, records) = if self.kind.has_profile() {
            take_message_format(&self.extra_args)
        } else {
            (self.extra_args.clone(), false)
        };
        let format = if records {
            RECORDS_FORMAT
        } else {
            MESSAGE_FORMAT
        };
        let mut argv: Vec<String> = Vec::new();
        let mut push = |args: &[&str]| argv.extend(args.iter().map(|a| a.to_string()));
        match self.kind {
            JobKind::Build => push(&["cargo", "build", "--locked", "--offline", format]),
            JobKind::Test => push(&[
                "cargo",
                "test",
                "--locked",
                "--offline",
                "--no-fail-fast",
                format,
            ]),
            JobKind::Clippy => push(&[
                "cargo",
                "clippy",
                "--locked",
                "--offline",
                "--all-targets",
                format,
            ]),
            JobKind::Check => push(&[
                "cargo",
                "check",
                "--locked",
                "--offline",
                "--all-targets",
                format,
            ]),
            JobKind::Run => push(&["cargo", "run", "--locked", "--offline", format]),
            JobKind::Fmt => push(&["cargo", "fmt", "--all", "--check"]),
            JobKind::Audit => push(&[
                CARGO_AUDIT,
                "audit",
                "--db",
                ADVISORY_DB,
                "--no-fetch",
                "--stale",
                "--no-yanked",
                "--color",
                "always",
            ]),
        }
        if self.effective_release() {
            argv.push("--release".to_string());
        }
        let split = extra_args
            .iter()
            .position(|a| a == "--")
            .unwrap_or(extra_args.len());
        // Compiling kinds already pass `--locked --offline`, which cargo refuses twice; the
        // user's `--locked`/`--frozen` is kept as [`CargoJob::lock_required`] instead.
        let ours = |a: &&String| {
            !(self.kind.has_profile()
                && matches!(a.as_str(), "--locked" | "--offline" | "--frozen"))
        };
        argv.extend(extra_args[..split].iter().filter(ours).cloned());
        if self.kind == JobKind::Clippy {
            argv.extend(["--", "-D", "warnings"].map(String::from));
            argv.extend(extra_args.iter().skip(split + 1).cloned());
        } else {
            argv.extend(extra_args[split..].iter().cloned());
        }
        argv
    }
}

/// The working directory of the fetch phase: outside the workspace.
pub const FETCH_CWD: &str = "/tmp";

/// The argument vector of the fetch phase (the only phase with network): downloads every
/// dependency named by `Cargo.lock` into `CARGO_HOME`, refusing to change the lock file.
///
/// It runs in [`FETCH_CWD`] with `--manifest-path`: cargo reads `.cargo/config.toml` from its
/// working directory upwards, so the workspace's own config, which can name programs to run
/// and proxies to use, is not read while the network is open and the shared cargo home is
/// writable. (The build phase reads it, offline, with the cargo home read-only.)
pub fn fetch_argv(manifest_dir: &std::path::Path) -> Vec<String> {
    vec![
        "cargo".to_string(),
        "fetch".to_string(),
        "--locked".to_string(),
        "--manifest-path".to_string(),
        manifest_dir.join("Cargo.toml").display().to_string(),
    ]
}

/// Where the resolution of a workspace without a lock file works, under the target dir
/// (`/target/.rba-resolve`): the fetch phase mounts the workspace read-only, and cargo writes
/// `Cargo.lock` next to the workspace's root manifest, so the workspace is copied here first.
/// The generated lock is left at `RESOLVE_DIR/Cargo.lock` for the executor to take.
pub const RESOLVE_DIR: &str = "/target/.rba-resolve";

/// The argument vector resolving the lock file of a workspace that has none (`cargo
/// generate-lockfile`, network through the egress proxy as in [`fetch_argv`], run in
/// [`FETCH_CWD`] so that the workspace's `.cargo/config.toml` is not read). `manifest_dir` is
/// the job's working directory relative to the workspace root.
pub fn resolve_argv(manifest_dir: &std::path::Path) -> Vec<String> {
    let copy = format!("{RESOLVE_DIR}/workspace");
    let manifest = std::path::Path::new(&copy)
        .join(manifest_dir)
        .join("Cargo.toml");
    let script = format!(
        "set -e; rm -rf {RESOLVE_DIR}; mkdir -p {copy}; cp -R {ws}/. {copy}/; \
         cargo generate-lockfile --manifest-path \"$1\"; \
         mv {copy}/Cargo.lock {RESOLVE_DIR}/Cargo.lock; rm -rf {copy}",
        ws = crate::sandbox::WORKSPACE_DIR,
    );
    vec![
        "sh".to_string(),
        "-c".to_string(),
        script,
        "resolve".to_string(),
        manifest.display().to_string(),
    ]
}

/// A rough number of build units from a `Cargo.lock`: one per `[[package]]`.
///
/// Only an estimate for a progress bar: build scripts (two units each), several targets per
/// package and test builds make the real number larger; platform-specific or optional
/// dependencies that are not built make it smaller.
pub fn lockfile_unit_estimate(cargo_lock: &str) -> u32 {
    cargo_lock
        .lines()
        .filter(|line| line.trim() == "[[package]]")
        .count() as u32
}

/// An artifact cargo reported (`compiler-artifact`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CargoArtifact {
    /// Cargo's package id, e.g. `path+file:///src/foo#0.1.0`.
    pub package_id: String,
    /// The target's name.
    pub target_name: String,
    /// The target's kinds (`lib`, `bin`, `test`, `custom-build`, `proc-macro`…).
    pub target_kinds: Vec<String>,
    /// True when built with the test profile flag (`profile.test`: a test harness binary).
    pub test: bool,
    /// The executable produced, for binaries and test harnesses.
    pub executable: Option<String>,
    /// Every file produced for the unit.
    pub filenames: Vec<String>,
    /// True when cargo did not need to rebuild it.
    pub fresh: bool,
}

impl CargoArtifact {
    /// The files of this unit that `cargo build` leaves in `target/<profile>/` and a user wants
    /// back: the executable, and the libraries of `cdylib` and `staticlib` targets (`.so`,
    /// `.dylib`, `.dll`, `.a`, `.lib`; not the `.rlib`/`.rmeta` cargo only keeps for itself).
    pub fn deliverables(&self) -> Vec<&str> {
        let mut files: Vec<&str> = self.executable.as_deref().into_iter().collect();
        let shared_or_static = self
            .target_kinds
            .iter()
            .any(|k| k == "cdylib" || k == "staticlib");
        if shared_or_static && !self.test {
            files.extend(self.filenames.iter().map(String::as_str).filter(|f| {
                std::path::Path::new(f)
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| matches!(e, "so" | "dylib" | "dll" | "a" | "lib"))
            }));
        }
        files
    }
}

/// What one line of cargo output means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CargoEvent {
    /// A line to show the user (ANSI colours kept), on the stream it came from.
    UserLine(String),
    /// A line of a compiler diagnostic (rendered by rustc, colours kept): it arrives in a JSON
    /// record on stdout, but cargo's human output prints it on stderr, and so do we.
    Diagnostic(String),
    /// Units done so far and the total (0 = unknown, see the module documentation).
    Progress {
        /// Units finished, fresh ones included.
        done: u32,
        /// Total units, 0 when unknown.
        total: u32,
    },
    /// An artifact was produced (or found fresh).
    Artifact(CargoArtifact),
    /// A build script ran (or was found fresh): `build-script-executed`.
    BuildScriptExecuted {
        /// Cargo's package id.
        package_id: String,
        /// Its `OUT_DIR`, an inside-sandbox path.
        out_dir: String,
    },
    /// Cargo finished compiling (before tests run, for `cargo test`).
    BuildFinished {
        /// True when every unit compiled.
        success: bool,
    },
}

#[derive(Deserialize)]
struct Record {
    reason: String,
    #[serde(default)]
    package_id: String,
    message: Option<Diagnostic>,
    target: Option<Target>,
    profile: Option<Profile>,
    #[serde(default)]
    filenames: Vec<String>,
    executable: Option<String>,
    #[serde(default)]
    fresh: bool,
    success: Option<bool>,
    #[serde(default)]
    out_dir: String,
}

#[derive(Deserialize)]
struct Diagnostic {
    rendered: Option<String>,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct Target {
    #[serde(default)]
    name: String,
    #[serde(default)]
    kind: Vec<String>,
}

#[derive(Deserialize)]
struct Profile {
    #[serde(default)]
    test: bool,
}

/// Turns cargo's output lines into [`CargoEvent`]s. One parser per cargo run.
#[derive(Clone, Debug, Default)]
pub struct CargoOutputParser {
    done: u32,
    total_estimate: u32,
    success: Option<bool>,
    /// Pass every record line through to the user as well ([`RECORDS_FORMAT`] jobs).
    pub forward_records: bool,
}

impl CargoOutputParser {
    /// A parser reporting the total as unknown (0) until the build finishes.
    pub fn new() -> Self {
        CargoOutputParser::default()
    }

    /// A parser reporting `max(estimate, done)` as the total while the build runs.
    pub fn with_total_estimate(estimate: u32) -> Self {
        CargoOutputParser {
            total_estimate: estimate,
            ..Default::default()
        }
    }

    /// Units done so far.
    pub fn units_done(&self) -> u32 {
        self.done
    }

    /// The build verdict, once `build-finished` was seen.
    pub fn build_success(&self) -> Option<bool> {
        self.success
    }

    fn total(&self) -> u32 {
        match self.success {
            Some(_) => self.done,
            None if self.total_estimate == 0 => 0,
            None => self.total_estimate.max(self.done),
        }
    }

    fn progress(&self) -> CargoEvent {
        CargoEvent::Progress {
            done: self.done,
            total: self.total(),
        }
    }

    /// Interprets one stdout line (without its terminator).
    pub fn feed_stdout(&mut self, line: &str) -> Vec<CargoEvent> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        // After `build-finished` stdout belongs to the programs cargo runs (test harnesses):
        // a line there that looks like a cargo record is the program's text, never a record a
        // test could forge (a fake artifact pointing outside the target dir, say).
        let record = if line.starts_with('{') && self.success.is_none() {
            serde_json::from_str::<Record>(line).ok()
        } else {
            None
        };
        let Some(record) = record else {
            return vec![CargoEvent::UserLine(line.to_string())];
        };
        let mut events = Vec::new();
        if self.forward_records {
            events.push(CargoEvent::UserLine(line.to_string()));
        }
        events.extend(self.interpret(record));
        events
    }

    fn interpret(&mut self, record: Record) -> Vec<CargoEvent> {
        match record.reason.as_str() {
            "compiler-message" => {
                let Some(diagnostic) = record.message else {
                    return Vec::new();
                };
                let text = diagnostic.rendered.unwrap_or(diagnostic.message);
                text.lines()
                    .map(|l| CargoEvent::Diagnostic(l.to_string()))
                    .collect()
            }
            "compiler-artifact" => {
                self.done += 1;
                let target = record.target.unwrap_or(Target {
                    name: String::new(),
                    kind: Vec::new(),
                });
                let artifact = CargoArtifact {
                    package_id: record.package_id,
                    target_name: target.name,
                    target_kinds: target.kind,
                    test: record.profile.is_some_and(|p| p.test),
                    executable: record.executable,
                    filenames: record.filenames,
                    fresh: record.fresh,
                };
                vec![CargoEvent::Artifact(artifact), self.progress()]
            }
            "build-script-executed" => {
                self.done += 1;
                vec![
                    CargoEvent::BuildScriptExecuted {
                        package_id: record.package_id,
                        out_dir: record.out_dir,
                    },
                    self.progress(),
                ]
            }
            "build-finished" => {
                let success = record.success.unwrap_or(false);
                self.success = Some(success);
                vec![self.progress(), CargoEvent::BuildFinished { success }]
            }
            // Other records (e.g. unstable `timing-info`) carry nothing for the user.
            _ => Vec::new(),
        }
    }

    /// Interprets one stderr line: cargo's status lines and anything else pass through.
    pub fn feed_stderr(&mut self, line: &str) -> Vec<CargoEvent> {
        vec![CargoEvent::UserLine(
            line.strip_suffix('\n').unwrap_or(line).to_string(),
        )]
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::Command;

    use super::*;

    #[test]
    fn deliverables_are_executables_and_cdylib_staticlib_files_only() {
        let unit =
            |kinds: &[&str], test: bool, executable: Option<&str>, files: &[&str]| CargoArtifact {
                package_id: "p".into(),
                target_name: "t".into(),
                target_kinds: kinds.iter().map(|k| k.to_string()).collect(),
                test,
                executable: executable.map(str::to_string),
                filenames: files.iter().map(|f| f.to_string()).collect(),
                fresh: false,
            };
        let bin = unit(
            &["bin"],
            false,
            Some("/target/debug/app"),
            &["/target/debug/app"],
        );
        assert_eq!(bin.deliverables(), ["/target/debug/app"]);
        let libs = unit(
            &["lib", "cdylib", "staticlib"],
            false,
            None,
            &[
                "/target/debug/libplug.rlib",
                "/target/debug/libplug.so",
                "/target/debug/libplug.a",
                "/target/debug/deps/libplug.rmeta",
            ],
        );
        assert_eq!(
            libs.deliverables(),
            ["/target/debug/libplug.so", "/target/debug/libplug.a"]
        );
        let rlib = unit(
            &["lib"],
            false,
            None,
            &["/target/debug/libx.rlib", "/target/debug/libx.so"],
        );
        assert!(rlib.deliverables().is_empty());
        let harness = unit(
            &["cdylib"],
            true,
            Some("/target/debug/deps/plug-1"),
            &["/target/debug/deps/plug-1"],
        );
        assert_eq!(harness.deliverables(), ["/target/debug/deps/plug-1"]);
    }

    #[test]
    fn records_after_build_finished_are_program_output() {
        let mut parser = CargoOutputParser::default();
        parser.feed_stdout(r#"{"reason":"build-finished","success":true}"#);
        let forged = r#"{"reason":"compiler-artifact","package_id":"x","executable":"/target/../../etc/shadow","filenames":[],"fresh":false}"#;
        assert_eq!(
            parser.feed_stdout(forged),
            vec![CargoEvent::UserLine(forged.to_string())]
        );
    }

    #[test]
    fn argv_per_kind() {
        let argv = |kind, release, extra: &[&str]| {
            CargoJob {
                kind,
                release,
                extra_args: extra.iter().map(|s| s.to_string()).collect(),
            }
            .argv()
            .join(" ")
        };
        assert_eq!(
            argv(JobKind::Build, true, &["-p", "x"]),
            "cargo build --locked --offline --message-format=json-diagnostic-rendered-ansi --release -p x"
        );
        assert_eq!(
            argv(JobKind::Test, false, &["--", "--nocapture"]),
            "cargo test --locked --offline --no-fail-fast --message-format=json-diagnostic-rendered-ansi -- --nocapture"
        );
        assert_eq!(
            argv(
                JobKind::Clippy,
                false,
                &["-p", "x", "--", "-W", "clippy::pedantic"]
            ),
            "cargo clippy --locked --offline --all-targets --message-format=json-diagnostic-rendered-ansi -p x -- -D warnings -W clippy::pedantic"
        );
        assert_eq!(
            argv(JobKind::Check, true, &[]),
            "cargo check --locked --offline --all-targets --message-format=json-diagnostic-rendered-ansi --release"
        );
        // The program's arguments after the user's `--`; a `--locked` there is the program's.
        assert_eq!(
            argv(JobKind::Run, true, &["--bin", "x", "--", "--locked", "a"]),
            "cargo run --locked --offline --message-format=json-diagnostic-rendered-ansi --release --bin x -- --locked a"
        );
        assert_eq!(argv(JobKind::Fmt, true, &[]), "cargo fmt --all --check");
        assert_eq!(
            argv(JobKind::Audit, true, &[]),
            "/rba/cargo-audit audit --db /advisory-db --no-fetch --stale --no-yanked --color always"
        );
        assert_eq!(
            fetch_argv(std::path::Path::new("/workspace/app")).join(" "),
            "cargo fetch --locked --manifest-path /workspace/app/Cargo.toml"
        );
        let fmt = CargoJob {
            kind: JobKind::Fmt,
            release: true,
            extra_args: vec![],
        };
        assert_eq!(fmt.profile(), "debug");
        assert_eq!(
            CargoJob {
                kind: JobKind::Build,
                release: true,
                extra_args: vec![]
            }
            .profile(),
            "release"
        );
    }

    #[test]
    fn the_users_locked_is_kept_as_a_fact_not_passed_twice() {
        let job = |extra: &[&str]| CargoJob {
            kind: JobKind::Build,
            release: false,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
        };
        let locked = job(&["--locked", "-p", "x"]);
        assert!(locked.lock_required());
        assert_eq!(
            locked.argv().join(" "),
            "cargo build --locked --offline --message-format=json-diagnostic-rendered-ansi -p x"
        );
        assert!(job(&["--frozen"]).lock_required());
        assert!(!job(&["-p", "x"]).lock_required());
        // After `--` it is the program's argument, not cargo's.
        let test = CargoJob {
            kind: JobKind::Test,
            ..job(&["--", "--locked"])
        };
        assert!(!test.lock_required());
        assert!(
            test.argv()
                .ends_with(&["--".to_string(), "--locked".to_string()])
        );
        let resolve = resolve_argv(Path::new("app"));
        assert_eq!(resolve[..2], ["sh", "-c"]);
        assert_eq!(
            resolve.last().unwrap(),
            "/target/.rba-resolve/workspace/app/Cargo.toml"
        );
        assert!(resolve[2].contains("cargo generate-lockfile --manifest-path \"$1\""));
    }

    #[test]
    fn proto_mapping() {
        use rba_proto::rba::v1::{JobKind as P, JobOptions};
        for kind in JobKind::ALL {
            assert_eq!(JobKind::from_proto(kind.to_proto()), Some(kind));
            assert_eq!(JobKind::from_proto_i32(kind.to_proto() as i32), Ok(kind));
        }
        assert_eq!(JobKind::from_proto(P::Lint), Some(JobKind::Clippy));
        assert_eq!(JobKind::from_proto_i32(0), Err(UnsupportedJobKind(0)));
        assert_eq!(JobKind::from_proto_i32(42), Err(UnsupportedJobKind(42)));
        let options = JobOptions {
            release: true,
            extra_args: vec!["-p".into(), "a".into()],
        };
        let job = CargoJob::from_proto(P::Test as i32, Some(&options)).unwrap();
        assert_eq!(
            job,
            CargoJob {
                kind: JobKind::Test,
                release: true,
                extra_args: vec!["-p".into(), "a".into()]
            }
        );
        assert_eq!(
            CargoJob::from_proto(P::Build as i32, None).unwrap(),
            CargoJob::new(JobKind::Build)
        );
    }

    #[test]
    fn plain_lines_and_progress_bookkeeping() {
        let mut parser = CargoOutputParser::with_total_estimate(3);
        assert_eq!(
            parser.feed_stdout("running 1 test\n"),
            vec![CargoEvent::UserLine("running 1 test".into())]
        );
        assert_eq!(
            parser.feed_stdout("{not json"),
            vec![CargoEvent::UserLine("{not json".into())]
        );
        assert_eq!(
            parser.feed_stdout(r#"{"no_reason":1}"#),
            vec![CargoEvent::UserLine(r#"{"no_reason":1}"#.into())]
        );
        assert_eq!(parser.feed_stdout(r#"{"reason":"timing-info"}"#), vec![]);
        assert_eq!(
            parser.feed_stdout(
                r#"{"reason":"build-script-executed","package_id":"x","out_dir":"/target/o"}"#
            ),
            vec![
                CargoEvent::BuildScriptExecuted {
                    package_id: "x".into(),
                    out_dir: "/target/o".into()
                },
                CargoEvent::Progress { done: 1, total: 3 }
            ]
        );
        assert_eq!(
            parser.feed_stderr("   Compiling x"),
            vec![CargoEvent::UserLine("   Compiling x".into())]
        );
        assert_eq!(
            lockfile_unit_estimate(
                "version = 4\n\n[[package]]\nname = \"a\"\n\n[[package]]\nname = \"b\"\n"
            ),
            2
        );
    }

    // ---- Real cargo output ----

    const LOCK: &str = "# This file is automatically @generated by Cargo.\n# It is not intended for manual editing.\nversion = 4\n\n[[package]]\nname = \"fixture\"\nversion = \"0.1.0\"\n";

    /// Writes a one-package crate (with its lock file, so `--locked` holds) into `dir`.
    fn fixture_crate(dir: &Path, lib_rs: &str, main_rs: &str) {
        std::fs::create_dir_all(dir.join("src")).unwrap();
        std::fs::write(
            dir.join("Cargo.toml"),
            "[package]\nname = \"fixture\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n",
        )
        .unwrap();
        std::fs::write(dir.join("Cargo.lock"), LOCK).unwrap();
        std::fs::write(dir.join("src/lib.rs"), lib_rs).unwrap();
        std::fs::write(dir.join("src/main.rs"), main_rs).unwrap();
    }

    /// Runs a job's argv with real cargo in `dir`; returns the parser's events for stdout and
    /// stderr, and whether cargo exited successfully.
    fn run_job(dir: &Path, job: &CargoJob) -> (Vec<CargoEvent>, Vec<CargoEvent>, bool) {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let argv = job.argv();
        let output = Command::new(cargo)
            .args(&argv[1..])
            .current_dir(dir)
            .env("CARGO_TARGET_DIR", dir.join("target"))
            .env("CARGO_TERM_COLOR", "always")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_BUILD_RUSTFLAGS")
            .env_remove("RUSTC_WRAPPER")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .output()
            .expect("cargo runs");
        let mut parser = CargoOutputParser::new();
        let stdout: Vec<CargoEvent> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .flat_map(|l| parser.feed_stdout(l))
            .collect();
        let stderr: Vec<CargoEvent> = String::from_utf8_lossy(&output.stderr)
            .lines()
            .flat_map(|l| parser.feed_stderr(l))
            .collect();
        (stdout, stderr, output.status.success())
    }

    #[test]
    fn a_users_message_format_becomes_ours_and_json_forwards_records() {
        let job = |extra: &[&str]| CargoJob {
            kind: JobKind::Build,
            release: false,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
        };
        let argv = job(&["--message-format", "json", "-p", "x"]).argv();
        assert_eq!(
            argv.join(" "),
            "cargo build --locked --offline --message-format=json-render-diagnostics -p x"
        );
        let argv = job(&["--message-format=short"]).argv();
        assert!(argv.contains(&MESSAGE_FORMAT.to_string()), "{argv:?}");
        assert_eq!(
            argv.iter().filter(|a| a.contains("message-format")).count(),
            1
        );
        // After `--` the arguments belong to the program, untouched.
        let argv = job(&["--", "--message-format=json"]).argv();
        assert_eq!(argv.last().unwrap(), "--message-format=json");
        assert!(argv.contains(&MESSAGE_FORMAT.to_string()), "{argv:?}");

        let record = r#"{"reason":"build-script-executed","package_id":"x"}"#;
        let mut parser = CargoOutputParser::new();
        assert_eq!(user_lines(&parser.feed_stdout(record)), Vec::<&str>::new());
        let mut parser = CargoOutputParser {
            forward_records: true,
            ..CargoOutputParser::new()
        };
        let events = parser.feed_stdout(record);
        assert_eq!(user_lines(&events), [record]);
        assert_eq!(parser.units_done(), 1, "the record is still interpreted");
    }

    fn user_lines(events: &[CargoEvent]) -> Vec<&str> {
        events
            .iter()
            .filter_map(|e| match e {
                CargoEvent::UserLine(l) | CargoEvent::Diagnostic(l) => Some(l.as_str()),
                _ => None,
            })
            .collect()
    }

    fn artifacts(events: &[CargoEvent]) -> Vec<&CargoArtifact> {
        events
            .iter()
            .filter_map(|e| match e {
                CargoEvent::Artifact(a) => Some(a),
                _ => None,
            })
            .collect()
    }

    const WARN_LIB: &str = "pub fn answer() -> u32 {\n    let unused = 1;\n    42\n}\n\n#[cfg(test)]\nmod tests {\n    #[test]\n    fn it_answers() {\n        assert_eq!(super::answer(), 42);\n    }\n}\n";
    const MAIN: &str = "fn main() {\n    println!(\"{}\", fixture::answer());\n}\n";

    #[test]
    fn real_cargo_test_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        fixture_crate(dir.path(), WARN_LIB, MAIN);
        let (stdout, stderr, ok) = run_job(dir.path(), &CargoJob::new(JobKind::Test));
        assert!(ok, "cargo test failed: {stdout:?} {stderr:?}");

        // The warning, rendered with colours, as user lines.
        let lines = user_lines(&stdout);
        let warning = lines
            .iter()
            .find(|l| l.contains("unused variable"))
            .expect("warning rendered");
        assert!(
            warning.contains("\u{1b}["),
            "ANSI colours kept: {warning:?}"
        );
        assert!(
            lines.iter().any(|l| l.contains("src/lib.rs:2")),
            "location line: {lines:?}"
        );
        // The test harness's plain-text output passes through.
        assert!(lines.contains(&"running 1 test"), "{lines:?}");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("test tests::it_answers ... ")),
            "{lines:?}"
        );
        assert!(
            !lines.iter().any(|l| l.starts_with("{\"reason\"")),
            "no raw JSON shown: {lines:?}"
        );

        // Artifacts: the library, the binary, and the two test harnesses (lib and bin).
        let artifacts = artifacts(&stdout);
        let lib = artifacts
            .iter()
            .find(|a| a.target_kinds == ["lib"] && !a.test)
            .expect("lib artifact");
        assert_eq!(lib.target_name, "fixture");
        assert!(lib.executable.is_none());
        assert!(
            lib.filenames.iter().any(|f| f.ends_with(".rlib")),
            "{:?}",
            lib.filenames
        );
        assert!(lib.deliverables().is_empty(), "an rlib is cargo's own");
        let harnesses: Vec<_> = artifacts.iter().filter(|a| a.test).collect();
        assert_eq!(harnesses.len(), 2, "{artifacts:?}");
        for harness in harnesses {
            let exe = harness
                .executable
                .as_deref()
                .expect("test harness is executable");
            assert!(Path::new(exe).is_file(), "{exe}");
        }

        // Progress counts every artifact; total unknown until the end, then exact.
        let progress: Vec<(u32, u32)> = stdout
            .iter()
            .filter_map(|e| match e {
                CargoEvent::Progress { done, total } => Some((*done, *total)),
                _ => None,
            })
            .collect();
        let n = artifacts.len() as u32;
        assert_eq!(progress.first(), Some(&(1, 0)));
        assert_eq!(progress.last(), Some(&(n, n)));
        assert!(progress.windows(2).all(|w| w[0].0 <= w[1].0));
        let finished = stdout
            .iter()
            .position(|e| *e == CargoEvent::BuildFinished { success: true })
            .unwrap();
        let running = stdout
            .iter()
            .position(|e| *e == CargoEvent::UserLine("running 1 test".into()))
            .unwrap();
        assert!(
            finished < running,
            "build-finished comes before the harness runs"
        );

        // Cargo's status lines on stderr, coloured (CARGO_TERM_COLOR=always), pass through.
        let status = user_lines(&stderr);
        assert!(
            status
                .iter()
                .any(|l| l.contains("Compiling") && l.contains("\u{1b}[")),
            "{status:?}"
        );
    }

    #[test]
    fn real_cargo_build_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        fixture_crate(
            dir.path(),
            "pub fn broken() -> u32 {\n    \"not a number\"\n}\n",
            MAIN,
        );
        let (stdout, _stderr, ok) = run_job(dir.path(), &CargoJob::new(JobKind::Build));
        assert!(!ok);
        let lines = user_lines(&stdout);
        let error = lines
            .iter()
            .find(|l| l.contains("mismatched types"))
            .expect("error rendered");
        assert!(error.contains("\u{1b}["), "{error:?}");
        assert!(lines.iter().any(|l| l.contains("E0308")), "{lines:?}");
        assert!(artifacts(&stdout).is_empty());
        assert_eq!(
            stdout.last(),
            Some(&CargoEvent::BuildFinished { success: false })
        );
        assert!(stdout.contains(&CargoEvent::Progress { done: 0, total: 0 }));
    }

    #[test]
    fn real_cargo_clippy_denies_warnings() {
        let dir = tempfile::tempdir().unwrap();
        fixture_crate(dir.path(), WARN_LIB, MAIN);
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let has_clippy = Command::new(cargo)
            .args(["clippy", "--version"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !has_clippy {
            eprintln!("clippy not installed; skipping");
            return;
        }
        let (stdout, stderr, ok) = run_job(dir.path(), &CargoJob::new(JobKind::Clippy));
        assert!(!ok, "a warning fails the lint job");
        let lines = user_lines(&stdout);
        assert!(
            lines.iter().any(|l| l.contains("unused variable")),
            "{lines:?} {stderr:?}"
        );
        assert!(stdout.contains(&CargoEvent::BuildFinished { success: false }));
    }
}
