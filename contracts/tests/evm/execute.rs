//! Job 5 (`execute_code`): which inputs onJobCall accepts, the named error for each bad one,
//! and a result posted and paid like any job's.

use alloy_primitives::{U256, keccak256};
use alloy_sol_types::SolValue;
use rba_contracts::{
    ExecuteInputs, Job, MAX_ARTIFACT_LENGTH, MAX_EXECUTE_TIMEOUT_SECS, MAX_INPUTS_LENGTH,
    MIN_EXECUTE_MEMORY_BYTES, inputs_hash,
};

use crate::harness::*;

const ZERO: U256 = U256::ZERO;
const JOB: u8 = Job::Execute.index();
const ARTIFACT: &str =
    "blake3:af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262/1024";

#[test]
fn code_or_artifact_runs_are_accepted_and_announced() {
    let mut chain = Chain::new();
    chain.set_price(JOB, wei(500));
    let cases = [
        (
            execute_inputs(SNIPPET, "", "some input", 0, 0),
            false,
            SNIPPET,
        ),
        (
            execute_inputs("", ARTIFACT, "", MAX_EXECUTE_TIMEOUT_SECS, 1 << 30),
            true,
            ARTIFACT,
        ),
        // The tuple encoding, as alloy's `abi_encode` of the struct gives it.
        (
            ExecuteInputs {
                code: SNIPPET.into(),
                artifact: String::new(),
                stdin: String::new(),
                timeoutSecs: 1,
                memoryBytes: MIN_EXECUTE_MEMORY_BYTES,
            }
            .abi_encode()
            .into(),
            false,
            SNIPPET,
        ),
    ];
    for (i, (inputs, is_artifact, program)) in cases.into_iter().enumerate() {
        let call = 20 + i as u64;
        let (_, logs) = chain
            .job_call(call, JOB, inputs.clone(), wei(500))
            .expect_success();
        let event: ExecutionAccepted = single_event(&logs, chain.manager);
        assert_eq!(event.jobCallId, call);
        assert_eq!(event.programHash, keccak256(program.as_bytes()));
        assert_eq!(event.isArtifact, is_artifact);
        assert_eq!(event.payment, wei(500));
        let record = chain.view(getJobCallCall {
            serviceId: SERVICE_ID,
            jobCallId: call,
        });
        assert_eq!(record.inputsHash, inputs_hash(&inputs));
        assert_eq!(record.job, JOB);
        assert_eq!(record.sessionId, [0u8; 16], "job 5 has no session");
        assert_eq!(record.status, 1, "pending");
    }
    assert_eq!(chain.view(totalEscrowedCall {}), wei(1_500));
}

#[test]
fn bad_runs_are_rejected_naming_the_problem() {
    let mut chain = Chain::new();
    assert_rejected(
        &mut chain,
        JOB,
        execute_inputs(SNIPPET, ARTIFACT, "", 0, 0),
        CodeOrArtifactRequired {},
    );
    assert_rejected(
        &mut chain,
        JOB,
        execute_inputs("", "", "stdin only", 0, 0),
        CodeOrArtifactRequired {},
    );
    for artifact in [
        "md5:abc".to_string(),
        "blake3:ab cd/1".to_string(),
        format!("blake3:{}", "a".repeat(MAX_ARTIFACT_LENGTH)),
    ] {
        assert_rejected(
            &mut chain,
            JOB,
            execute_inputs("", &artifact, "", 0, 0),
            InvalidArtifact {},
        );
    }
    assert_rejected(
        &mut chain,
        JOB,
        execute_inputs(SNIPPET, "", "", MAX_EXECUTE_TIMEOUT_SECS + 1, 0),
        InvalidTimeout {
            timeoutSecs: MAX_EXECUTE_TIMEOUT_SECS + 1,
        },
    );
    assert_rejected(
        &mut chain,
        JOB,
        execute_inputs(SNIPPET, "", "", 0, MIN_EXECUTE_MEMORY_BYTES - 1),
        InvalidMemory {
            memoryBytes: MIN_EXECUTE_MEMORY_BYTES - 1,
        },
    );
    let huge = "x".repeat(MAX_INPUTS_LENGTH);
    let too_large = execute_inputs(SNIPPET, "", &huge, 0, 0);
    assert_rejected(
        &mut chain,
        JOB,
        too_large.clone(),
        InputsTooLarge {
            length: U256::from(too_large.len()),
            maxLength: U256::from(MAX_INPUTS_LENGTH),
        },
    );
    // A build job's inputs are not a run's, and a trailing word makes the encoding
    // non-canonical.
    assert_rejected(&mut chain, JOB, valid_inputs(), MalformedInputs {});
    assert_rejected(
        &mut chain,
        JOB,
        with_trailing_word(&execute_inputs(SNIPPET, "", "", 0, 0)),
        MalformedInputs {},
    );
    // And a run's inputs are no build job's.
    chain
        .job_call(
            78,
            Job::Compile.index(),
            valid_inputs_for(Job::Execute),
            ZERO,
        )
        .expect_revert(MalformedInputs {});
}

#[test]
fn a_run_result_pays_the_operator() {
    let mut chain = Chain::new();
    chain.set_price(JOB, wei(300));
    let inputs = execute_inputs(SNIPPET, "", "", 10, 0);
    chain
        .job_call(5, JOB, inputs.clone(), wei(300))
        .expect_success();
    let outputs = b"status 0, stdout hello";
    chain
        .job_result(5, JOB, OPERATOR, inputs_hash(&inputs), outputs)
        .expect_success();
    assert_eq!(chain.view(earningsCall { operator: OPERATOR }), wei(300));
    assert_eq!(chain.view(totalEscrowedCall {}), ZERO);
    // A second result for the same call is refused.
    chain
        .job_result(5, JOB, OPERATOR_2, inputs_hash(&inputs), outputs)
        .expect_revert(ResultAlreadyPosted {
            serviceId: SERVICE_ID,
            jobCallId: 5,
        });
}

#[test]
fn a_large_snippet_stays_within_the_hook_gas_budget() {
    let mut chain = Chain::new();
    // Close to the inputs bound: what decoding and validating costs at the edge.
    let code = format!("fn main() {{}}\n//{}", "x".repeat(MAX_INPUTS_LENGTH - 400));
    let outcome = chain.job_call(6, JOB, execute_inputs(&code, "", "", 0, 0), ZERO);
    let gas = outcome.gas_used();
    outcome.expect_success();
    assert!(
        gas < TANGLE_HOOK_GAS_LIMIT,
        "onJobCall with a {}-byte snippet used {gas} gas",
        code.len()
    );
}
