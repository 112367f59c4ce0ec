//! Cross-tenant poisoning through a reused target dir, on the real sandbox and real cargo (see
//! the runner's module doc, "Results nobody else influenced").
//!
//! Tenant A builds the popular `hello` tree (with one unrelated extra file, so it is another
//! action), then, in the same slot, the `planter` fixture, whose build script overwrites the
//! `hello` binary in the target dir and moves its dep-info into the future, then `hello`
//! itself: cargo calls it Fresh and reports the planted file. That result must stay A's: tenant
//! B's build of `hello` is a clean build whose binary prints the greeting, A's result is not in
//! the shared namespace, A's unchanged resubmission still hits its own entry, and a third
//! tenant is served B's clean result.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{Harness, fixture, hash_dir, log_lines};
use rba_cas::{Digest, DigestFunction};
use rba_executor::cargo::{CargoJob, JobKind};
use rba_executor::logstream::strip_ansi;
use rba_executor::runner::{
    CARGO_INSTANCE, JobHandle, JobOutcome, JobStatus, Provenance, result_namespace,
};
use rba_executor::tenant::Tenant;

const PLANTED: &[u8] = b"#!/bin/sh\necho planted by another build\n";
const IDENTITY: &str = "popular";

async fn build(
    harness: &Harness,
    source: &Path,
    tenant: &Tenant,
) -> (JobHandle, Arc<JobOutcome>, Vec<String>) {
    let root = hash_dir(&harness.cas, source, DigestFunction::Blake3).await;
    let handle = harness
        .executor
        .submit_cargo(
            &CargoJob::new(JobKind::Build),
            root,
            IDENTITY,
            tenant.clone(),
        )
        .await
        .unwrap();
    let outcome = handle.wait().await;
    let lines = log_lines(&handle).await;
    assert_eq!(
        outcome.status,
        JobStatus::Success,
        "{tenant} {}: {lines:#?} {:?}",
        source.display(),
        outcome.error
    );
    (handle, outcome, lines)
}

fn binary(harness: &Harness, outcome: &JobOutcome) -> Vec<u8> {
    let artifact = outcome
        .artifacts
        .iter()
        .find(|a| a.path == "target/debug/hello")
        .unwrap_or_else(|| panic!("no hello binary in {:?}", outcome.artifacts));
    harness
        .cas
        .blobs
        .read_to_vec(&artifact.digest, 64 << 20)
        .unwrap()
}

/// Runs a binary taken from the CAS on the host and returns what it printed.
fn run_binary(bytes: &[u8]) -> String {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hello");
    std::fs::write(&path, bytes).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let output = std::process::Command::new(&path).output().unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn cached(harness: &Harness, namespace: &str, action: &Digest) -> bool {
    harness
        .cas
        .actions
        .get(namespace, action)
        .unwrap()
        .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_target_dir_never_serves_another_tenant() {
    let harness = Harness::new(|config| config.limits.wall_time = Some(Duration::from_secs(300)));
    let (alice, bob, carol) = (
        Tenant::token("alice"),
        Tenant::token("bob"),
        Tenant::token("carol"),
    );
    let hello = fixture("hello");
    let hello_with_notes = tempfile::tempdir().unwrap();
    let copied = std::process::Command::new("cp")
        .arg("-r")
        .arg(format!("{}/.", hello.display()))
        .arg(hello_with_notes.path())
        .status()
        .unwrap();
    assert!(copied.success());
    std::fs::write(hello_with_notes.path().join("NOTES.txt"), "not a source\n").unwrap();

    // A's first build runs on a fresh target dir: clean, so it is shared.
    let (first, outcome, _) = build(&harness, hello_with_notes.path(), &alice).await;
    assert!(!outcome.cache_hit);
    assert!(cached(&harness, CARGO_INSTANCE, &first.action_digest));

    // The planter poisons A's target dir; its own result stays A's.
    let (planter, _, lines) = build(&harness, &fixture("planter"), &alice).await;
    assert!(
        lines
            .iter()
            .any(|l| strip_ansi(l).contains("planted 2 file(s)")),
        "the planter found the earlier build: {lines:#?}"
    );
    let alice_scope = result_namespace(CARGO_INSTANCE, &alice, Provenance::TenantState, true);
    assert!(!cached(&harness, CARGO_INSTANCE, &planter.action_digest));
    assert!(cached(&harness, &alice_scope, &planter.action_digest));

    // A builds the popular tree in the poisoned slot: the attack works on A's own build…
    let (poisoned, outcome, lines) = build(&harness, &hello, &alice).await;
    assert!(!outcome.cache_hit, "{lines:#?}");
    assert_eq!(
        binary(&harness, &outcome),
        PLANTED,
        "cargo took the planted binary as fresh (else this test proves nothing): {lines:#?}"
    );
    // …and its result is A's alone.
    assert!(
        !cached(&harness, CARGO_INSTANCE, &poisoned.action_digest),
        "a result built on a reused target dir is not shared"
    );
    assert!(cached(&harness, &alice_scope, &poisoned.action_digest));

    // B builds the same tree: not served A's result, a clean build in B's own fresh slot.
    let (clean, outcome, lines) = build(&harness, &hello, &bob).await;
    assert_eq!(
        clean.action_digest, poisoned.action_digest,
        "the same action"
    );
    assert!(!outcome.cache_hit, "B is never served A's scoped result");
    assert!(
        lines
            .iter()
            .any(|l| strip_ansi(l).contains("Compiling hello")),
        "B's build compiled hello itself: {lines:#?}"
    );
    let clean_binary = binary(&harness, &outcome);
    assert_ne!(clean_binary, PLANTED);
    assert_eq!(run_binary(&clean_binary), "Hello, rust-build-agent!\n");
    assert!(
        cached(&harness, CARGO_INSTANCE, &clean.action_digest),
        "B's clean build is shared"
    );

    // A's unchanged resubmission still hits, its own entry first.
    let (_, outcome, _) = build(&harness, &hello, &alice).await;
    assert!(outcome.cache_hit, "the same tenant's resubmission hits");
    assert_eq!(binary(&harness, &outcome), PLANTED);

    // A third tenant is served the clean shared result.
    let (_, outcome, _) = build(&harness, &hello, &carol).await;
    assert!(outcome.cache_hit);
    assert_eq!(binary(&harness, &outcome), clean_binary);
}

#[test]
fn scoped_and_failed_results_are_never_looked_up_for_another_tenant() {
    // The namespace rule itself, as the executor and the REAPI server apply it.
    use rba_executor::runner::{is_executor_namespace, is_private_namespace, lookup_namespaces};
    let alice = Tenant::token("alice");
    let bob = Tenant::peer("12D3KooBob");
    let shared = result_namespace(CARGO_INSTANCE, &alice, Provenance::Clean, true);
    assert_eq!(shared, CARGO_INSTANCE);
    let alices = result_namespace(CARGO_INSTANCE, &alice, Provenance::TenantState, true);
    let bobs = result_namespace(CARGO_INSTANCE, &bob, Provenance::TenantState, true);
    assert_ne!(alices, bobs);
    assert_eq!(
        lookup_namespaces(CARGO_INSTANCE, &alice),
        [alices.clone(), shared.clone()]
    );
    assert!(!lookup_namespaces(CARGO_INSTANCE, &bob).contains(&alices));
    for provenance in [Provenance::Clean, Provenance::TenantState] {
        let failed = result_namespace(CARGO_INSTANCE, &alice, provenance, false);
        assert!(!lookup_namespaces(CARGO_INSTANCE, &alice).contains(&failed));
        assert!(!lookup_namespaces(CARGO_INSTANCE, &bob).contains(&failed));
        assert!(is_private_namespace(&failed) && is_executor_namespace(&failed));
    }
    assert!(is_private_namespace(&alices) && is_executor_namespace(&alices));
    assert!(!is_private_namespace(&shared) && is_executor_namespace(&shared));
    assert!(is_executor_namespace("rba/anything"));
    assert!(!is_executor_namespace("ci/linux") && !is_executor_namespace(""));
}
