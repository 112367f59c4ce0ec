//! The hook interface against the ABI shipped by the `tnt-core-bindings` crate that
//! blueprint-sdk 0.2.0-alpha.20 uses: same functions, same selectors, same types.
//!
//! The crate is far too heavy to compile just for its ABI (it pulls in all of alloy and
//! ~270k lines of generated bindings), so the test reads `abi/IBlueprintServiceManager.json`
//! from the crate's source in the cargo registry; `.ci/setup.d/contracts.sh` downloads it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use alloy_primitives::keccak256;
use rba_contracts::{
    ARTIFACT_JSON, HOOK_INTERFACE, SERVICE_MANAGER, TNT_CORE_BINDINGS_VERSION, TNT_CORE_COMMIT,
    contract_from_artifact,
};
use serde_json::Value;

const CRATE: &str = "tnt-core-bindings";

/// The unpacked crate source: `$TNT_CORE_BINDINGS_DIR`, or the cargo registry (downloading the
/// crate with `cargo info` when it is not there yet).
fn bindings_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TNT_CORE_BINDINGS_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = find_in_registry() {
        return dir;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let spec = format!("{CRATE}@{TNT_CORE_BINDINGS_VERSION}");
    let fetched = Command::new(&cargo)
        .args(["info", &spec])
        .current_dir(std::env::temp_dir())
        .output();
    find_in_registry().unwrap_or_else(|| {
        panic!(
            "{CRATE} {TNT_CORE_BINDINGS_VERSION} is not in the cargo registry and `{cargo} info \
             {spec}` did not fetch it ({fetched:?}).\nRun `bash .ci/setup.d/contracts.sh`, or set \
             TNT_CORE_BINDINGS_DIR to the unpacked crate."
        )
    })
}

fn find_in_registry() -> Option<PathBuf> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))?;
    let wanted = format!("{CRATE}-{TNT_CORE_BINDINGS_VERSION}");
    let mut found: Vec<PathBuf> = std::fs::read_dir(cargo_home.join("registry").join("src"))
        .ok()?
        .filter_map(|index| Some(index.ok()?.path().join(&wanted)))
        .filter(|dir| {
            dir.join("abi")
                .join("IBlueprintServiceManager.json")
                .is_file()
        })
        .collect();
    found.sort();
    found.into_iter().next()
}

fn upstream_artifact() -> Value {
    let path = bindings_dir()
        .join("abi")
        .join("IBlueprintServiceManager.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("upstream ABI is JSON")
}

/// Canonical ABI type, tuples expanded: `(uint64,uint64,bool,bytes32,bytes32)`.
fn canonical_type(param: &Value) -> String {
    let ty = param["type"].as_str().expect("param type");
    match ty.strip_prefix("tuple") {
        Some(array_suffix) => {
            let inner: Vec<String> = param["components"]
                .as_array()
                .expect("tuple components")
                .iter()
                .map(canonical_type)
                .collect();
            format!("({}){array_suffix}", inner.join(","))
        }
        None => ty.to_owned(),
    }
}

fn types(params: &Value) -> Vec<String> {
    params
        .as_array()
        .map(|ps| ps.iter().map(canonical_type).collect())
        .unwrap_or_default()
}

#[derive(Debug, PartialEq)]
struct FunctionShape {
    inputs: Vec<String>,
    outputs: Vec<String>,
    state_mutability: String,
}

/// Canonical signature → shape, for every function in an ABI.
fn functions(abi: &Value) -> BTreeMap<String, FunctionShape> {
    abi.as_array()
        .expect("ABI array")
        .iter()
        .filter(|item| item["type"] == "function")
        .map(|f| {
            let inputs = types(&f["inputs"]);
            let signature = format!("{}({})", f["name"].as_str().unwrap(), inputs.join(","));
            let shape = FunctionShape {
                inputs,
                outputs: types(&f["outputs"]),
                state_mutability: f["stateMutability"].as_str().unwrap().to_owned(),
            };
            (signature, shape)
        })
        .collect()
}

fn selector(signature: &str) -> [u8; 4] {
    keccak256(signature.as_bytes())[..4].try_into().unwrap()
}

fn upstream_functions() -> BTreeMap<String, FunctionShape> {
    let upstream = upstream_artifact();
    let fns = functions(&upstream["abi"]);
    assert!(
        fns.len() >= 30,
        "upstream ABI has only {} functions: wrong file?",
        fns.len()
    );
    fns
}

#[test]
fn bindings_are_the_pinned_tnt_core_version() {
    let dir = bindings_dir();
    let version = std::fs::read_to_string(dir.join("TNT_CORE_VERSION")).expect("TNT_CORE_VERSION");
    assert_eq!(version.trim(), TNT_CORE_COMMIT);
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).expect("crate manifest");
    assert!(manifest.contains(&format!("version = \"{TNT_CORE_BINDINGS_VERSION}\"")));
}

#[test]
fn interface_has_exactly_the_upstream_hooks_with_the_same_types() {
    let upstream = upstream_functions();
    let ours = functions(
        &contract_from_artifact(ARTIFACT_JSON, HOOK_INTERFACE)
            .unwrap()
            .abi,
    );
    let missing: Vec<_> = upstream.keys().filter(|s| !ours.contains_key(*s)).collect();
    let extra: Vec<_> = ours.keys().filter(|s| !upstream.contains_key(*s)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "interface differs from {CRATE} {TNT_CORE_BINDINGS_VERSION}: missing {missing:?}, extra {extra:?}"
    );
    for (signature, shape) in &upstream {
        assert_eq!(&ours[signature], shape, "{signature}");
    }
}

#[test]
fn every_hook_selector_matches_the_upstream_abi() {
    let upstream = upstream_artifact();
    let shipped_ids = upstream["methodIdentifiers"]
        .as_object()
        .expect("upstream methodIdentifiers");
    let interface = contract_from_artifact(ARTIFACT_JSON, HOOK_INTERFACE).unwrap();
    let manager = contract_from_artifact(ARTIFACT_JSON, SERVICE_MANAGER).unwrap();
    let upstream = upstream_functions();
    assert_eq!(shipped_ids.len(), upstream.len());
    for signature in upstream.keys() {
        let expected = selector(signature);
        // The selector tnt-core's own build recorded agrees with the ABI's signature ...
        assert_eq!(
            shipped_ids[signature].as_str(),
            Some(hex::encode(expected).as_str()),
            "{signature}"
        );
        // ... and solc gives our interface and our contract that same selector.
        assert_eq!(
            interface.method_identifiers.get(signature),
            Some(&expected),
            "interface selector of {signature}"
        );
        assert_eq!(
            manager.method_identifiers.get(signature),
            Some(&expected),
            "contract selector of {signature}"
        );
    }
}

#[test]
fn the_job_hooks_have_the_signatures_this_version_defines() {
    let upstream = upstream_functions();
    let manager = contract_from_artifact(ARTIFACT_JSON, SERVICE_MANAGER).unwrap();
    for signature in [
        "onRequest(uint64,address,address[],bytes,uint64,address,uint256)",
        "onJobCall(uint64,uint8,uint64,bytes)",
        // inputsHash is bytes32 in this version.
        "onJobResult(uint64,uint8,uint64,address,bytes32,bytes)",
        "onRegister(address,bytes)",
        "onBlueprintCreated(uint64,address,address)",
    ] {
        assert!(
            upstream.contains_key(signature),
            "upstream lacks {signature}"
        );
        assert_eq!(
            manager.method_identifiers.get(signature),
            Some(&selector(signature)),
            "{signature}"
        );
    }
    assert_eq!(
        upstream["onJobCall(uint64,uint8,uint64,bytes)"].state_mutability,
        "payable"
    );
}
