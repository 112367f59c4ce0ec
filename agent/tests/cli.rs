//! The real `rba` binary, run as a user would: embedded node, real sandbox, real cargo.

use std::path::PathBuf;

use assert_cmd::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn rba(data_dir: &std::path::Path) -> Command {
    let mut command = Command::cargo_bin("rba").unwrap();
    command
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("RBA_DATA_DIR");
    command
}

#[test]
fn build_streams_cargo_output_and_second_run_is_a_cache_hit() {
    let data = tempfile::tempdir().unwrap();
    let first = rba(data.path())
        .arg("build")
        .arg(fixture("hello"))
        .assert()
        .success();
    let out = String::from_utf8_lossy(&first.get_output().stdout).to_string();
    let err = String::from_utf8_lossy(&first.get_output().stderr).to_string();
    assert!(
        out.contains("Compiling") && out.contains("hello v0.1.0"),
        "stdout: {out}"
    );
    assert!(err.contains("rba: success"), "stderr: {err}");
    assert!(
        err.contains("artifact target/debug/hello blake3:"),
        "stderr: {err}"
    );
    assert!(!err.contains("action-cache hit"));

    let second = rba(data.path())
        .arg("build")
        .arg(fixture("hello"))
        .assert()
        .success();
    let err = String::from_utf8_lossy(&second.get_output().stderr).to_string();
    assert!(err.contains("action-cache hit"), "stderr: {err}");
}

#[test]
fn failing_build_exits_with_cargos_status_and_shows_the_error() {
    let data = tempfile::tempdir().unwrap();
    let run = rba(data.path())
        .arg("build")
        .arg(fixture("compile-error"))
        .assert()
        .failure();
    let out = String::from_utf8_lossy(&run.get_output().stdout).to_string();
    assert!(out.contains("mismatched types"), "stdout: {out}");
    assert_eq!(run.get_output().status.code(), Some(101));
}

#[test]
fn user_errors_are_one_clear_line() {
    let data = tempfile::tempdir().unwrap();
    let empty = tempfile::tempdir().unwrap();
    let run = rba(data.path())
        .arg("build")
        .arg(empty.path())
        .assert()
        .code(2);
    let err = String::from_utf8_lossy(&run.get_output().stderr).to_string();
    assert!(
        err.starts_with("rba: error: no Cargo.toml in"),
        "stderr: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "stderr: {err}");

    let run = rba(data.path())
        .arg("check")
        .arg("/definitely/not/here")
        .assert()
        .code(2);
    let err = String::from_utf8_lossy(&run.get_output().stderr).to_string();
    assert!(err.contains("is not a directory"), "stderr: {err}");

    rba(data.path()).arg("frobnicate").assert().code(2);
}

#[test]
fn help_lists_the_jobs_and_hash_prints_a_root() {
    let data = tempfile::tempdir().unwrap();
    let help = rba(data.path()).arg("--help").assert().success();
    let text = String::from_utf8_lossy(&help.get_output().stdout).to_string();
    for job in ["build", "test", "lint", "audit", "check", "hash"] {
        assert!(text.contains(job), "{text}");
    }
    let hash = rba(data.path())
        .arg("hash")
        .arg(fixture("hello"))
        .assert()
        .success();
    let out = String::from_utf8_lossy(&hash.get_output().stdout).to_string();
    assert!(
        out.starts_with("blake3:") && out.contains("(3 files)"),
        "{out}"
    );
}
