//! Audit jobs on the real sandbox with the real `cargo-audit` (`.ci/setup.d/cargo-audit.sh`):
//! an advisory database the test writes itself (RustSec's layout, a git checkout as the
//! operator would keep) names a dependency of the fixture as vulnerable, and the job reports
//! it and fails; the same fixture against a database without such an advisory passes.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Harness, fixture};
use rba_executor::cargo::{CargoJob, JobKind};
use rba_executor::logstream::strip_ansi;
use rba_executor::runner::JobStatus;

/// A RustSec-layout database (`crates/NAME/RUSTSEC-….md`, TOML front matter) committed in a
/// fresh git repository at `dir`.
fn advisory_db(dir: &Path, advisories: &[(&str, &str, &str)]) {
    for (krate, id, patched) in advisories {
        let folder = dir.join("crates").join(krate);
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(
            folder.join(format!("{id}.md")),
            format!(
                "```toml\n[advisory]\nid = \"{id}\"\npackage = \"{krate}\"\ndate = \"2099-01-01\"\n\
                 url = \"https://example.invalid/{id}\"\ncategories = [\"memory-corruption\"]\n\n\
                 [versions]\npatched = [\"{patched}\"]\n```\n\n# {krate} is made-up vulnerable\n\n\
                 An advisory written by rba's audit test.\n"
            ),
        )
        .unwrap();
    }
    std::fs::create_dir_all(dir.join("crates")).unwrap();
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args([
                "-c",
                "user.name=rba",
                "-c",
                "user.email=rba@example.invalid",
            ])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {out:?}");
    };
    git(&["init", "-q"]);
    std::fs::write(dir.join("README.md"), "test advisory db\n").unwrap();
    git(&["add", "-A"]);
    git(&["commit", "-q", "-m", "advisories"]);
}

fn harness(db: &Path) -> Harness {
    let db = db.to_path_buf();
    Harness::new(move |config| {
        config.limits.wall_time = Some(Duration::from_secs(300));
        config.advisory_db = Some(db);
        assert!(
            config.cargo_audit.is_some(),
            "cargo-audit not found: run .ci/setup.d/cargo-audit.sh"
        );
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vulnerable_dependency_fails_the_audit_and_a_clean_database_passes() {
    let vulnerable = tempfile::tempdir().unwrap();
    advisory_db(
        vulnerable.path(),
        &[("itoa", "RUSTSEC-2099-0001", ">= 9.9.9")],
    );
    let harness_vulnerable = harness(vulnerable.path());
    let (_, outcome, lines) = harness_vulnerable
        .run(
            &CargoJob::new(JobKind::Audit),
            &fixture("registry-dep"),
            "audit",
        )
        .await;
    let text: Vec<String> = lines.iter().map(|l| strip_ansi(l).into_owned()).collect();
    assert_eq!(
        outcome.status,
        JobStatus::Failed,
        "{text:#?} {:?}",
        outcome.error
    );
    assert_eq!(outcome.exit_code, 1, "{text:#?}");
    assert!(
        text.iter().any(|l| l.contains("RUSTSEC-2099-0001")),
        "{text:#?}"
    );
    assert!(
        text.iter().any(|l| l.contains("1 vulnerability found")),
        "{text:#?}"
    );

    // A database naming another crate (and a patched itoa): the same tree passes.
    let clean = tempfile::tempdir().unwrap();
    advisory_db(
        clean.path(),
        &[
            ("itoa", "RUSTSEC-2099-0002", ">= 1.0.0"),
            ("not-a-dependency", "RUSTSEC-2099-0003", ">= 9.9.9"),
        ],
    );
    let harness_clean = harness(clean.path());
    let (_, outcome, lines) = harness_clean
        .run(
            &CargoJob::new(JobKind::Audit),
            &fixture("registry-dep"),
            "audit",
        )
        .await;
    let text: Vec<String> = lines.iter().map(|l| strip_ansi(l).into_owned()).collect();
    assert_eq!(
        outcome.status,
        JobStatus::Success,
        "{text:#?} {:?}",
        outcome.error
    );
    assert!(
        text.iter()
            .any(|l| l.contains("Loaded 2 security advisories")),
        "{text:#?}"
    );

    // The database's state is part of the action key: the same tree audited against another
    // commit of the database is not the cached success.
    advisory_db_add(clean.path(), "itoa", "RUSTSEC-2099-0004");
    let (_, after_update, lines) = harness_clean
        .run(
            &CargoJob::new(JobKind::Audit),
            &fixture("registry-dep"),
            "audit",
        )
        .await;
    assert!(!after_update.cache_hit, "{lines:#?}");
    assert_eq!(after_update.status, JobStatus::Failed, "{lines:#?}");
}

/// Commits one more advisory (vulnerable itoa) to the database at `dir`.
fn advisory_db_add(dir: &Path, krate: &str, id: &str) {
    let other = tempfile::tempdir().unwrap();
    advisory_db(other.path(), &[(krate, id, ">= 9.9.9")]);
    let name = format!("crates/{krate}/{id}.md");
    std::fs::copy(other.path().join(&name), dir.join(&name)).unwrap();
    for args in [
        vec!["add", "-A"],
        vec![
            "-c",
            "user.name=rba",
            "-c",
            "user.email=rba@example.invalid",
            "commit",
            "-q",
            "-m",
            "one more",
        ],
    ] {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(&args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_an_advisory_database_says_so() {
    let harness = Harness::new(|config| config.advisory_db = None);
    let (_, outcome, lines) = harness
        .run(
            &CargoJob::new(JobKind::Audit),
            &fixture("registry-dep"),
            "audit",
        )
        .await;
    assert_eq!(outcome.status, JobStatus::Failed, "{lines:#?}");
    let error = outcome.error.clone().unwrap_or_default();
    assert!(error.contains("no advisory database"), "{error}");
}
