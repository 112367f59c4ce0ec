//! The on-chain side of the build-agent blueprint.
//!
//! On Tangle, every job call goes through the blueprint's *service manager* contract before
//! any operator sees it. Ours, `src/BuildAgentServiceManager.sol`, rejects job calls whose
//! inputs are malformed or whose payment is short, so an operator never spends compute on
//! them, and it pays the operator whose result matches the inputs recorded at call time.
//!
//! This crate keeps that contract next to the Rust code that serves its jobs:
//! - `src/*.sol` is compiled by `build.mjs` with a pinned solc-js into
//!   `artifacts/BuildAgentServiceManager.json` (committed; see `contracts/README.md`);
//! - `tests/evm` deploys that bytecode into revm and drives the hooks the way Tangle core
//!   does, and checks the hook selectors against the ABI of the `tnt-core-bindings` crate
//!   that blueprint-sdk links against;
//! - this library gives the rest of the workspace the deployable bytecode and the job-input
//!   encoding the contract accepts.

use std::collections::BTreeMap;
use std::fmt;

use alloy_primitives::{B256, keccak256};
use alloy_sol_types::SolValue;

/// The compiled artifact written by `build.mjs`: every contract's ABI, bytecode and selectors.
pub const ARTIFACT_JSON: &str = include_str!("../artifacts/BuildAgentServiceManager.json");

/// Name of the service manager contract in [`ARTIFACT_JSON`].
pub const SERVICE_MANAGER: &str = "BuildAgentServiceManager";

/// Name of the hook interface in [`ARTIFACT_JSON`].
pub const HOOK_INTERFACE: &str = "IBlueprintServiceManager";

/// Version of the `tnt-core-bindings` crate whose `IBlueprintServiceManager` ABI the contract
/// implements (the one blueprint-sdk 0.2.0-alpha.20 resolves to).
pub const TNT_CORE_BINDINGS_VERSION: &str = "0.20.0";

/// The tnt-core commit those bindings were generated from (their `TNT_CORE_VERSION` file).
pub const TNT_CORE_COMMIT: &str = "9a62f12a82a0130f7c0090d0fb34240138a5b49c";

/// Longest zip URI the contract accepts, in bytes.
pub const MAX_ZIP_URI_LENGTH: usize = 2048;

/// Longest encoded job inputs the contract accepts, in bytes.
pub const MAX_INPUTS_LENGTH: usize = 8192;

/// URI schemes the contract accepts for `zip_uri`.
pub const ZIP_URI_SCHEMES: [&str; 3] = ["https://", "ipfs://", "cas://"];

/// Longest run [`Job::Execute`] may ask for, in seconds (0 asks for the node's default).
pub const MAX_EXECUTE_TIMEOUT_SECS: u64 = 300;

/// Least memory [`Job::Execute`] may ask for, in bytes (0 asks for the node's default).
pub const MIN_EXECUTE_MEMORY_BYTES: u64 = 16 << 20;

/// Longest artifact digest text of [`Job::Execute`].
pub const MAX_ARTIFACT_LENGTH: usize = 128;

/// Build targets the contract accepts; anything but `""` only for [`Job::Compile`].
pub const BUILD_TARGETS: [&str; 5] = ["", "debug", "release", "check", "clippy"];

/// The blueprint's jobs, by job index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Job {
    Compile = 0,
    Test = 1,
    Lint = 2,
    Audit = 3,
    Check = 4,
    /// Run a Rust snippet or a built binary (`execute_code`); inputs [`ExecuteInputs`].
    Execute = 5,
}

impl Job {
    /// All jobs in job-index order.
    pub const ALL: [Job; 6] = [
        Job::Compile,
        Job::Test,
        Job::Lint,
        Job::Audit,
        Job::Check,
        Job::Execute,
    ];

    /// The jobs on a project zip (inputs [`JobInputs`]), in job-index order.
    pub const BUILDS: [Job; 5] = [Job::Compile, Job::Test, Job::Lint, Job::Audit, Job::Check];

    /// The job index Tangle passes to the hooks.
    pub const fn index(self) -> u8 {
        self as u8
    }

    /// The job with this index, if any.
    pub const fn from_index(index: u8) -> Option<Job> {
        match index {
            0 => Some(Job::Compile),
            1 => Some(Job::Test),
            2 => Some(Job::Lint),
            3 => Some(Job::Audit),
            4 => Some(Job::Check),
            5 => Some(Job::Execute),
            _ => None,
        }
    }

    /// Lower-case name, as in the blueprint's job list.
    pub const fn name(self) -> &'static str {
        match self {
            Job::Compile => "compile",
            Job::Test => "test",
            Job::Lint => "lint",
            Job::Audit => "audit",
            Job::Check => "check",
            Job::Execute => "execute",
        }
    }
}

alloy_sol_types::sol! {
    /// The job inputs as one Solidity tuple; the contract also accepts this encoding.
    #[derive(Debug, PartialEq, Eq)]
    struct JobInputs {
        string zipUri;
        string sessionId;
        string buildTarget;
    }
}

alloy_sol_types::sol! {
    /// [`Job::Execute`]'s inputs as one Solidity tuple (the contract also accepts the flat
    /// encoding, [`encode_execute_inputs`]). Exactly one of `code` and `artifact` is non-empty;
    /// `timeoutSecs` and `memoryBytes` 0 ask for the node's defaults.
    #[derive(Debug, PartialEq, Eq)]
    struct ExecuteInputs {
        string code;
        string artifact;
        string stdin;
        uint64 timeoutSecs;
        uint64 memoryBytes;
    }
}

/// Encodes [`Job::Execute`] inputs flat (`abi.encode(code, artifact, stdin, timeoutSecs,
/// memoryBytes)`), as the contract and blueprint-sdk's `TangleArg` decode them.
pub fn encode_execute_inputs(
    code: &str,
    artifact: &str,
    stdin: &str,
    timeout_secs: u64,
    memory_bytes: u64,
) -> Vec<u8> {
    (
        code.to_owned(),
        artifact.to_owned(),
        stdin.to_owned(),
        timeout_secs,
        memory_bytes,
    )
        .abi_encode_params()
}

/// Encodes job inputs the way the contract's `abi.decode(inputs, (string, string, string))`
/// reads them (the flat encoding, `abi.encode(zipUri, sessionId, buildTarget)`).
pub fn encode_job_inputs(zip_uri: &str, session_id: &str, build_target: &str) -> Vec<u8> {
    (
        zip_uri.to_owned(),
        session_id.to_owned(),
        build_target.to_owned(),
    )
        .abi_encode_params()
}

/// The hash the contract records for job inputs and expects back in `onJobResult`
/// (Tangle core computes the same `keccak256(inputs)`).
pub fn inputs_hash(inputs: &[u8]) -> B256 {
    keccak256(inputs)
}

/// One contract from the artifact.
#[derive(Debug, Clone)]
pub struct CompiledContract {
    /// Source file, relative to `contracts/`.
    pub source: String,
    /// The JSON ABI.
    pub abi: serde_json::Value,
    /// Creation bytecode.
    pub bytecode: Vec<u8>,
    /// Runtime bytecode.
    pub deployed_bytecode: Vec<u8>,
    /// Canonical function signature → 4-byte selector, as solc reports them.
    pub method_identifiers: BTreeMap<String, [u8; 4]>,
}

/// Why an artifact could not be read.
#[derive(Debug)]
pub enum ArtifactError {
    Json(serde_json::Error),
    MissingContract(String),
    BadField {
        contract: String,
        field: &'static str,
    },
}

impl fmt::Display for ArtifactError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArtifactError::Json(e) => write!(f, "artifact is not valid JSON: {e}"),
            ArtifactError::MissingContract(name) => write!(f, "artifact has no contract {name}"),
            ArtifactError::BadField { contract, field } => {
                write!(
                    f,
                    "artifact field {field} of {contract} is missing or malformed"
                )
            }
        }
    }
}

impl std::error::Error for ArtifactError {}

/// Reads contract `name` from an artifact in the format `build.mjs` writes.
pub fn contract_from_artifact(
    artifact: &str,
    name: &str,
) -> Result<CompiledContract, ArtifactError> {
    let root: serde_json::Value = serde_json::from_str(artifact).map_err(ArtifactError::Json)?;
    let c = root
        .get("contracts")
        .and_then(|c| c.get(name))
        .ok_or_else(|| ArtifactError::MissingContract(name.to_owned()))?;
    let bad = |field| ArtifactError::BadField {
        contract: name.to_owned(),
        field,
    };
    let hex_field = |field: &'static str| -> Result<Vec<u8>, ArtifactError> {
        let s = c
            .get(field)
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad(field))?;
        hex::decode(s.strip_prefix("0x").unwrap_or(s)).map_err(|_| bad(field))
    };
    let mut method_identifiers = BTreeMap::new();
    let ids = c
        .get("methodIdentifiers")
        .and_then(|v| v.as_object())
        .ok_or_else(|| bad("methodIdentifiers"))?;
    for (signature, selector) in ids {
        let bytes = selector
            .as_str()
            .and_then(|s| hex::decode(s).ok())
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .ok_or_else(|| bad("methodIdentifiers"))?;
        method_identifiers.insert(signature.clone(), bytes);
    }
    Ok(CompiledContract {
        source: c
            .get("source")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad("source"))?
            .to_owned(),
        abi: c.get("abi").cloned().ok_or_else(|| bad("abi"))?,
        bytecode: hex_field("bytecode")?,
        deployed_bytecode: hex_field("deployedBytecode")?,
        method_identifiers,
    })
}

/// `BuildAgentServiceManager` from the committed artifact.
pub fn service_manager() -> CompiledContract {
    contract_from_artifact(ARTIFACT_JSON, SERVICE_MANAGER)
        .expect("the committed artifact is checked by the crate's tests")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_indexes_round_trip() {
        for (i, job) in Job::ALL.iter().enumerate() {
            assert_eq!(job.index() as usize, i);
            assert_eq!(Job::from_index(job.index()), Some(*job));
        }
        assert_eq!(Job::from_index(6), None);
        assert_eq!(Job::Execute.name(), "execute");
        assert!(!Job::BUILDS.contains(&Job::Execute));
        assert_eq!(Job::Audit.name(), "audit");
    }

    #[test]
    fn flat_and_tuple_encodings_decode_to_the_same_inputs() {
        let flat = encode_job_inputs("cas://abc", "00000000-0000-4000-8000-000000000000", "");
        let tuple = JobInputs {
            zipUri: "cas://abc".into(),
            sessionId: "00000000-0000-4000-8000-000000000000".into(),
            buildTarget: String::new(),
        };
        // The tuple form is the flat form behind one extra offset word.
        let wrapped = tuple.abi_encode();
        assert_eq!(&wrapped[32..], &flat[..]);
        assert_eq!(wrapped[31], 0x20);
        assert_eq!(flat[31], 0x60);
    }

    #[test]
    fn committed_artifact_has_the_service_manager() {
        let sm = service_manager();
        assert_eq!(sm.source, "src/BuildAgentServiceManager.sol");
        assert!(!sm.bytecode.is_empty() && !sm.deployed_bytecode.is_empty());
        // EIP-170 code size limit.
        assert!(sm.deployed_bytecode.len() <= 24_576);
        assert!(
            sm.method_identifiers
                .contains_key("onJobCall(uint64,uint8,uint64,bytes)")
        );
    }
}
