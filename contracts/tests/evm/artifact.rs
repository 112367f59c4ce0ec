//! The committed artifact is what the current sources compile to with the pinned solc-js.

use std::path::{Path, PathBuf};
use std::process::Command;

use rba_contracts::ARTIFACT_JSON;
use serde_json::Value;
use sha2::{Digest, Sha256};

const SETUP_HINT: &str = "run `bash .ci/setup.d/contracts.sh` from the repository root";
const REBUILD_HINT: &str = "run `npm --prefix contracts run build` and commit contracts/artifacts";

fn contracts_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `src/**/*.sol` relative to contracts/, sorted, with `/` separators (as build.mjs lists them).
fn solidity_sources(dir: &Path, rel: &str, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).expect("read src dir") {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().expect("utf-8 file name");
        let rel_path = format!("{rel}/{name}");
        if entry.file_type().unwrap().is_dir() {
            solidity_sources(&entry.path(), &rel_path, out);
        } else if name.ends_with(".sol") {
            out.push(rel_path);
        }
    }
}

#[test]
fn committed_artifact_was_built_from_the_current_sources() {
    let mut files = Vec::new();
    solidity_sources(&contracts_dir().join("src"), "src", &mut files);
    files.sort();
    let mut hasher = Sha256::new();
    for file in &files {
        let content = std::fs::read(contracts_dir().join(file)).unwrap();
        hasher.update(file.as_bytes());
        hasher.update([0]);
        hasher.update(&content);
        hasher.update([0]);
    }
    let artifact: Value = serde_json::from_str(ARTIFACT_JSON).unwrap();
    let listed: Vec<&str> = artifact["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        listed, files,
        "artifact lists other sources: {REBUILD_HINT}"
    );
    assert_eq!(
        artifact["sourceHash"].as_str(),
        Some(hex::encode(hasher.finalize()).as_str()),
        "contracts/src changed since the artifact was built: {REBUILD_HINT}"
    );
}

#[test]
fn committed_artifact_used_the_pinned_solc() {
    let package: Value = serde_json::from_str(
        &std::fs::read_to_string(contracts_dir().join("package.json")).unwrap(),
    )
    .unwrap();
    let pinned = package["dependencies"]["solc"].as_str().expect("solc pin");
    assert!(
        pinned.chars().all(|c| c.is_ascii_digit() || c == '.'),
        "solc must be pinned to an exact version in contracts/package.json, not {pinned:?}"
    );
    let artifact: Value = serde_json::from_str(ARTIFACT_JSON).unwrap();
    let version = artifact["compiler"]["version"].as_str().unwrap();
    assert!(
        version.starts_with(&format!("{pinned}+")),
        "artifact built by solc {version}, package.json pins {pinned}: {REBUILD_HINT}"
    );
}

/// Recompiles with node + solc-js and compares byte for byte. Needs the setup script.
#[test]
fn committed_artifact_is_reproduced_by_the_pinned_solc() {
    let node_ok = Command::new("node")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(node_ok, "node is not installed: {SETUP_HINT}");
    assert!(
        contracts_dir().join("node_modules").join("solc").is_dir(),
        "the solc npm package is not installed in contracts/node_modules: {SETUP_HINT}"
    );
    let out_dir = std::env::temp_dir().join(format!("rba-contracts-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join("artifact.json");
    let run = Command::new("node")
        .arg("build.mjs")
        .arg("--out")
        .arg(&out)
        .current_dir(contracts_dir())
        .output()
        .expect("run node build.mjs");
    assert!(
        run.status.success(),
        "node build.mjs failed ({}):\n{}\n{SETUP_HINT}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    let fresh = std::fs::read_to_string(&out).unwrap();
    let _ = std::fs::remove_dir_all(&out_dir);
    assert!(
        fresh == ARTIFACT_JSON,
        "contracts/artifacts/BuildAgentServiceManager.json differs from a fresh compile: {REBUILD_HINT}"
    );
}
