//! Job prices, escrow, operator earnings and withdrawals: the wei add up.

use alloy_primitives::{Address, U256, address};
use rba_contracts::{Job, inputs_hash};

use crate::harness::*;

const ZERO: U256 = U256::ZERO;

#[test]
fn owner_sets_a_price_per_job_index() {
    let mut chain = Chain::new();
    assert_eq!(chain.view(ownerCall {}), DEPLOYER);
    for job in Job::ALL {
        assert_eq!(chain.view(jobPriceCall { job: job.index() }), ZERO);
        chain.set_price(job.index(), wei(1_000 + job.index() as u64));
    }
    for job in Job::ALL {
        assert_eq!(
            chain.view(jobPriceCall { job: job.index() }),
            wei(1_000 + job.index() as u64)
        );
    }
    chain
        .call_from(
            DEPLOYER,
            setJobPriceCall {
                job: 6,
                price: wei(1),
            },
            ZERO,
        )
        .expect_revert(InvalidJobIndex { job: 6 });
    chain
        .call_from(STRANGER, jobPriceCall { job: 9 }, ZERO)
        .expect_revert(InvalidJobIndex { job: 9 });
}

#[test]
fn only_the_owner_sets_prices() {
    let mut chain = Chain::new();
    for who in [STRANGER, OPERATOR, TANGLE, BLUEPRINT_OWNER] {
        chain
            .call_from(
                who,
                setJobPriceCall {
                    job: 0,
                    price: wei(1),
                },
                ZERO,
            )
            .expect_revert(NotOwner { caller: who });
    }
    assert_eq!(chain.view(jobPriceCall { job: 0 }), ZERO);
}

#[test]
fn ownership_can_be_transferred() {
    let mut chain = Chain::new();
    chain
        .call_from(STRANGER, transferOwnershipCall { newOwner: STRANGER }, ZERO)
        .expect_revert(NotOwner { caller: STRANGER });
    chain
        .call_from(
            DEPLOYER,
            transferOwnershipCall {
                newOwner: Address::ZERO,
            },
            ZERO,
        )
        .expect_revert(ZeroAddress {});
    chain
        .call_from(
            DEPLOYER,
            transferOwnershipCall {
                newOwner: BLUEPRINT_OWNER,
            },
            ZERO,
        )
        .expect_success();
    chain
        .call_from(
            DEPLOYER,
            setJobPriceCall {
                job: 1,
                price: wei(1),
            },
            ZERO,
        )
        .expect_revert(NotOwner { caller: DEPLOYER });
    chain
        .call_from(
            BLUEPRINT_OWNER,
            setJobPriceCall {
                job: 1,
                price: wei(7),
            },
            ZERO,
        )
        .expect_success();
    assert_eq!(chain.view(jobPriceCall { job: 1 }), wei(7));
}

#[test]
fn underpaid_job_calls_are_rejected_for_every_job() {
    let mut chain = Chain::new();
    let price = ether(1);
    for job in Job::ALL {
        chain.set_price(job.index(), price);
    }
    for job in Job::ALL {
        for paid in [ZERO, wei(1), price - wei(1)] {
            chain
                .job_call(1, job.index(), valid_inputs_for(job), paid)
                .expect_revert(InsufficientPayment {
                    job: job.index(),
                    required: price,
                    paid,
                });
        }
    }
    assert_eq!(chain.balance(chain.manager), ZERO);
    assert_eq!(chain.view(totalEscrowedCall {}), ZERO);
}

#[test]
fn exact_and_over_payment_are_escrowed_in_full() {
    let mut chain = Chain::new();
    chain.set_price(2, wei(100));
    let payer_before = chain.balance(RELAYER);
    chain
        .job_call(1, 2, valid_inputs(), wei(100))
        .expect_success();
    let (_, logs) = chain
        .job_call(2, 2, valid_inputs(), wei(250))
        .expect_success();
    let event: JobAccepted = single_event(&logs, chain.manager);
    assert_eq!(event.payment, wei(250));
    assert_eq!(chain.view(totalEscrowedCall {}), wei(350));
    assert_eq!(chain.balance(chain.manager), wei(350));
    assert_eq!(chain.balance(RELAYER), payer_before - wei(350));
    assert_eq!(
        chain.balance(TANGLE),
        ZERO,
        "the Tangle stub forwards all value"
    );
    let record = chain.view(getJobCallCall {
        serviceId: SERVICE_ID,
        jobCallId: 2,
    });
    assert_eq!(record.payment, wei(250));
}

#[test]
fn a_price_change_applies_to_later_calls_only() {
    let mut chain = Chain::new();
    chain.set_price(0, wei(10));
    let first = inputs(ZIP_URI, SESSION, "");
    chain
        .job_call(1, 0, first.clone(), wei(10))
        .expect_success();
    chain.set_price(0, wei(20));
    chain
        .job_call(2, 0, valid_inputs(), wei(10))
        .expect_revert(InsufficientPayment {
            job: 0,
            required: wei(20),
            paid: wei(10),
        });
    chain
        .job_result(1, 0, OPERATOR, inputs_hash(&first), b"ok")
        .expect_success();
    assert_eq!(chain.view(earningsCall { operator: OPERATOR }), wei(10));
}

#[test]
fn payments_results_and_withdrawals_add_up() {
    let mut chain = Chain::new();
    let prices = [ether(3), wei(2_000), wei(1_500), ether(1), wei(7)];
    for (job, price) in prices.iter().enumerate() {
        chain.set_price(job as u8, *price);
    }
    let tracked = [RELAYER, TANGLE, OPERATOR, OPERATOR_2, STRANGER];
    let total_before: U256 =
        tracked.iter().map(|a| chain.balance(*a)).sum::<U256>() + chain.balance(chain.manager);

    // Ten calls over all jobs; some overpaid.
    let mut calls = Vec::new();
    for id in 0..10u64 {
        let job = (id % 5) as u8;
        let paid = prices[job as usize] + if id % 3 == 0 { wei(id) } else { ZERO };
        let session = format!("00000000-0000-4000-8000-{id:012x}");
        let inputs = inputs(ZIP_URI, &session, "");
        chain
            .job_call(id, job, inputs.clone(), paid)
            .expect_success();
        calls.push((id, job, paid, inputs_hash(&inputs)));
    }
    let escrowed: U256 = calls.iter().map(|c| c.2).sum();
    assert_eq!(chain.view(totalEscrowedCall {}), escrowed);
    assert_eq!(chain.balance(chain.manager), escrowed);

    // Results for eight of them: even ids by OPERATOR, odd by OPERATOR_2.
    let (mut earned_1, mut earned_2) = (ZERO, ZERO);
    for &(id, job, paid, hash) in &calls[..8] {
        let op = if id % 2 == 0 { OPERATOR } else { OPERATOR_2 };
        chain
            .job_result(id, job, op, hash, b"done")
            .expect_success();
        if op == OPERATOR {
            earned_1 += paid;
        } else {
            earned_2 += paid;
        }
    }
    let pending: U256 = calls[8..].iter().map(|c| c.2).sum();
    assert_eq!(chain.view(earningsCall { operator: OPERATOR }), earned_1);
    assert_eq!(
        chain.view(earningsCall {
            operator: OPERATOR_2
        }),
        earned_2
    );
    assert_eq!(chain.view(totalEscrowedCall {}), pending);
    // Everything the manager holds is either escrowed or owed to an operator.
    assert_eq!(chain.balance(chain.manager), pending + earned_1 + earned_2);

    // OPERATOR withdraws to itself, OPERATOR_2 to another address.
    let op1_before = chain.balance(OPERATOR);
    let (out, logs) = chain
        .call_from(OPERATOR, withdrawEarningsCall { to: OPERATOR }, ZERO)
        .expect_success();
    assert_eq!(U256::from_be_slice(&out), earned_1);
    let event: EarningsWithdrawn = single_event(&logs, chain.manager);
    assert_eq!(
        (event.operator, event.to, event.amount),
        (OPERATOR, OPERATOR, earned_1)
    );
    assert_eq!(chain.balance(OPERATOR), op1_before + earned_1);

    let stranger_before = chain.balance(STRANGER);
    chain
        .call_from(OPERATOR_2, withdrawEarningsCall { to: STRANGER }, ZERO)
        .expect_success();
    assert_eq!(chain.balance(STRANGER), stranger_before + earned_2);

    assert_eq!(chain.view(earningsCall { operator: OPERATOR }), ZERO);
    assert_eq!(
        chain.view(earningsCall {
            operator: OPERATOR_2
        }),
        ZERO
    );
    assert_eq!(chain.balance(chain.manager), pending);
    // Gas is free on this chain, so no wei appeared or vanished.
    let total_after: U256 =
        tracked.iter().map(|a| chain.balance(*a)).sum::<U256>() + chain.balance(chain.manager);
    assert_eq!(total_after, total_before);

    // Nothing left to withdraw.
    chain
        .call_from(OPERATOR, withdrawEarningsCall { to: OPERATOR }, ZERO)
        .expect_revert(NothingToWithdraw {});
}

#[test]
fn withdrawals_need_earnings_and_a_recipient_that_accepts_them() {
    let mut chain = Chain::new();
    chain
        .call_from(STRANGER, withdrawEarningsCall { to: STRANGER }, ZERO)
        .expect_revert(NothingToWithdraw {});

    chain.set_price(4, wei(900));
    let inputs = valid_inputs();
    chain
        .job_call(1, 4, inputs.clone(), wei(900))
        .expect_success();
    chain
        .job_result(1, 4, OPERATOR, inputs_hash(&inputs), b"ok")
        .expect_success();

    chain
        .call_from(OPERATOR, withdrawEarningsCall { to: Address::ZERO }, ZERO)
        .expect_revert(ZeroAddress {});

    // A recipient whose code always reverts (PUSH0 PUSH0 REVERT).
    let rejecting: Address = address!("00000000000000000000000000000000000bad00");
    chain.set_code(rejecting, &[0x5f, 0x5f, 0xfd]);
    chain
        .call_from(OPERATOR, withdrawEarningsCall { to: rejecting }, ZERO)
        .expect_revert(WithdrawalFailed {});
    // The failed withdrawal left the earnings in place.
    assert_eq!(chain.view(earningsCall { operator: OPERATOR }), wei(900));
    assert_eq!(chain.balance(chain.manager), wei(900));
    assert_eq!(chain.balance(rejecting), ZERO);
}

#[test]
fn value_is_refused_on_hooks_that_carry_no_payment() {
    let mut chain = Chain::new();
    chain
        .tangle(
            onRegisterCall {
                operator: STRANGER,
                registrationInputs: Default::default(),
            },
            wei(1),
        )
        .expect_revert(UnexpectedPayment { amount: wei(1) });
    chain
        .tangle(
            onRequestCall {
                requestId: 1,
                requester: STRANGER,
                operators: vec![OPERATOR],
                requestInputs: Default::default(),
                ttl: 100,
                paymentAsset: Address::ZERO,
                paymentAmount: ZERO,
            },
            wei(2),
        )
        .expect_revert(UnexpectedPayment { amount: wei(2) });
    // Plain transfers have no receive function to land in.
    let manager = chain.manager;
    assert!(matches!(
        chain.send(STRANGER, manager, wei(3), Default::default()),
        Outcome::Revert { .. }
    ));
    assert_eq!(chain.balance(chain.manager), ZERO);
}
