//! onJobResult: only registered operators, only for a recorded call with matching job index
//! and inputs hash, only once.

use alloy_primitives::{B256, U256, keccak256};
use rba_contracts::inputs_hash;

use crate::harness::*;

const CALL: u64 = 41;

/// A chain with one paid, pending compile call; returns its inputs hash.
fn with_pending_call(price: U256) -> (Chain, B256) {
    let mut chain = Chain::new();
    chain.set_price(0, price);
    let inputs = inputs(ZIP_URI, SESSION, "release");
    chain
        .job_call(CALL, 0, inputs.clone(), price)
        .expect_success();
    (chain, inputs_hash(&inputs))
}

#[test]
fn registered_operator_result_is_accepted_and_paid() {
    let (mut chain, hash) = with_pending_call(wei(1_000));
    let outputs = b"compiled: 3 crates, 0 warnings";
    let (_, logs) = chain
        .job_result(CALL, 0, OPERATOR, hash, outputs)
        .expect_success();
    let event: JobResultPosted = single_event(&logs, chain.manager);
    assert_eq!(event.serviceId, SERVICE_ID);
    assert_eq!(event.jobCallId, CALL);
    assert_eq!(event.sessionId, session_bytes(SESSION));
    assert_eq!(event.job, 0);
    assert_eq!(event.operator, OPERATOR);
    assert_eq!(event.outputsHash, keccak256(outputs));
    assert_eq!(event.payment, wei(1_000));

    assert_eq!(chain.view(earningsCall { operator: OPERATOR }), wei(1_000));
    assert_eq!(chain.view(totalEscrowedCall {}), U256::ZERO);
    let record = chain.view(getJobCallCall {
        serviceId: SERVICE_ID,
        jobCallId: CALL,
    });
    assert_eq!(record.status, 2, "completed");
}

#[test]
fn result_from_a_non_operator_is_refused() {
    let (mut chain, hash) = with_pending_call(wei(1_000));
    for who in [STRANGER, TANGLE, DEPLOYER, BLUEPRINT_OWNER] {
        chain
            .job_result(CALL, 0, who, hash, b"forged")
            .expect_revert(NotRegisteredOperator { operator: who });
    }
    // The escrow is untouched and a registered operator can still post.
    assert_eq!(chain.view(totalEscrowedCall {}), wei(1_000));
    assert_eq!(chain.view(earningsCall { operator: STRANGER }), U256::ZERO);
    chain
        .job_result(CALL, 0, OPERATOR, hash, b"ok")
        .expect_success();
}

#[test]
fn unregistered_operator_can_no_longer_post_but_keeps_earnings() {
    let (mut chain, hash) = with_pending_call(wei(500));
    chain
        .job_result(CALL, 0, OPERATOR, hash, b"ok")
        .expect_success();
    let second = inputs(ZIP_URI, SESSION, "");
    chain
        .job_call(CALL + 1, 1, second.clone(), U256::ZERO)
        .expect_success();

    chain
        .tangle(onUnregisterCall { operator: OPERATOR }, U256::ZERO)
        .expect_success();
    assert!(!chain.view(isRegisteredOperatorCall { operator: OPERATOR }));
    chain
        .job_result(CALL + 1, 1, OPERATOR, inputs_hash(&second), b"ok")
        .expect_revert(NotRegisteredOperator { operator: OPERATOR });

    let before = chain.balance(OPERATOR);
    chain
        .call_from(OPERATOR, withdrawEarningsCall { to: OPERATOR }, U256::ZERO)
        .expect_success();
    assert_eq!(chain.balance(OPERATOR), before + wei(500));
}

#[test]
fn result_must_carry_the_inputs_hash_recorded_at_call_time() {
    let (mut chain, hash) = with_pending_call(wei(10));
    let other = inputs_hash(&inputs(ZIP_URI, SESSION, "debug"));
    for wrong in [other, B256::ZERO, keccak256(b"inputs")] {
        chain
            .job_result(CALL, 0, OPERATOR, wrong, b"out")
            .expect_revert(InputsHashMismatch {
                expected: hash,
                actual: wrong,
            });
    }
    assert_eq!(chain.view(earningsCall { operator: OPERATOR }), U256::ZERO);
}

#[test]
fn result_must_be_for_the_job_index_that_was_called() {
    let (mut chain, hash) = with_pending_call(wei(10));
    chain
        .job_result(CALL, 2, OPERATOR, hash, b"out")
        .expect_revert(JobIndexMismatch {
            expected: 0,
            actual: 2,
        });
}

#[test]
fn result_for_an_unknown_call_is_refused() {
    let (mut chain, hash) = with_pending_call(wei(10));
    chain
        .job_result(CALL + 100, 0, OPERATOR, hash, b"out")
        .expect_revert(UnknownJobCall {
            serviceId: SERVICE_ID,
            jobCallId: CALL + 100,
        });
    // Same call id, other service.
    chain
        .tangle(
            onJobResultCall {
                serviceId: SERVICE_ID + 1,
                job: 0,
                jobCallId: CALL,
                operator: OPERATOR,
                inputsHash: hash,
                outputs: Default::default(),
            },
            U256::ZERO,
        )
        .expect_revert(UnknownJobCall {
            serviceId: SERVICE_ID + 1,
            jobCallId: CALL,
        });
}

#[test]
fn only_the_first_result_is_accepted_and_paid() {
    let (mut chain, hash) = with_pending_call(wei(300));
    chain
        .job_result(CALL, 0, OPERATOR, hash, b"first")
        .expect_success();
    for op in [OPERATOR_2, OPERATOR] {
        chain
            .job_result(CALL, 0, op, hash, b"again")
            .expect_revert(ResultAlreadyPosted {
                serviceId: SERVICE_ID,
                jobCallId: CALL,
            });
    }
    assert_eq!(chain.view(earningsCall { operator: OPERATOR }), wei(300));
    assert_eq!(
        chain.view(earningsCall {
            operator: OPERATOR_2
        }),
        U256::ZERO
    );
}

#[test]
fn only_tangle_core_may_post_results() {
    let (mut chain, hash) = with_pending_call(wei(10));
    let call = onJobResultCall {
        serviceId: SERVICE_ID,
        job: 0,
        jobCallId: CALL,
        operator: OPERATOR,
        inputsHash: hash,
        outputs: Default::default(),
    };
    // An operator cannot bypass Tangle and report its own result.
    chain
        .call_from(OPERATOR, call.clone(), U256::ZERO)
        .expect_revert(OnlyTangleAllowed {
            caller: OPERATOR,
            tangle: TANGLE,
        });
    chain
        .call_from(STRANGER, call, U256::ZERO)
        .expect_revert(OnlyTangleAllowed {
            caller: STRANGER,
            tangle: TANGLE,
        });
}

#[test]
fn value_sent_with_a_result_is_refused() {
    let (mut chain, hash) = with_pending_call(wei(10));
    chain
        .tangle(
            onJobResultCall {
                serviceId: SERVICE_ID,
                job: 0,
                jobCallId: CALL,
                operator: OPERATOR,
                inputsHash: hash,
                outputs: Default::default(),
            },
            wei(5),
        )
        .expect_revert(UnexpectedPayment { amount: wei(5) });
}
