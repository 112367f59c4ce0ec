//! Two `rba build` at once on one data dir (the real binary, embedded node): the second waits
//! for the first's data dir lock, saying so, and both succeed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn start_build(data_dir: &Path, target: &Path) -> Child {
    Command::new(assert_cmd::cargo::cargo_bin("rba"))
        .arg("--data-dir")
        .arg(data_dir)
        .arg("build")
        .arg(fixture("hello"))
        .arg("--target-dir")
        .arg(target)
        .env_remove("RBA_DATA_DIR")
        .env_remove("RBA_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn two_concurrent_embedded_builds_on_one_data_dir_both_succeed() {
    let data = tempfile::tempdir().unwrap();
    let target = tempfile::tempdir().unwrap();
    let mut first = start_build(data.path(), target.path());
    // Once the first has submitted its job it holds the data dir for the whole build.
    let mut first_err = BufReader::new(first.stderr.take().unwrap());
    let mut first_log = String::new();
    loop {
        let mut line = String::new();
        assert!(
            first_err.read_line(&mut line).unwrap() > 0,
            "first build ended early: {first_log}"
        );
        first_log.push_str(&line);
        if line.contains("on the embedded node") {
            break;
        }
    }
    let second = start_build(data.path(), target.path());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut first_err, &mut rest).unwrap();
    first_log.push_str(&rest);
    assert!(first.wait().unwrap().success(), "first: {first_log}");
    let second = second.wait_with_output().unwrap();
    let second_log = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "second: {second_log}");
    let waiting = format!(
        "rba: blocking waiting for the data dir lock held by pid {}",
        first.id()
    );
    assert_eq!(
        second_log.matches(&waiting).count(),
        1,
        "the second build waits for the first, once: {second_log}"
    );
    assert!(first_log.contains("rba: success"), "{first_log}");
    assert!(second_log.contains("rba: success"), "{second_log}");
    assert!(target.path().join("debug/hello").exists());
}
