//! Binding to Tangle core, operator registration, service requests and the query hooks.

use alloy_primitives::{Address, U256, address};

use crate::harness::*;

const ZERO: U256 = U256::ZERO;

fn request(operators: Vec<Address>, payment_asset: Address) -> onRequestCall {
    onRequestCall {
        requestId: 1,
        requester: STRANGER,
        operators,
        requestInputs: Default::default(),
        ttl: 1_000,
        paymentAsset: payment_asset,
        paymentAmount: wei(10),
    }
}

#[test]
fn blueprint_creation_binds_the_calling_tangle_core_once() {
    let mut chain = Chain::deployed();
    assert_eq!(chain.view(tangleCoreCall {}), Address::ZERO);
    // Before binding, no hook is accepted.
    chain
        .tangle(
            onRegisterCall {
                operator: OPERATOR,
                registrationInputs: Default::default(),
            },
            ZERO,
        )
        .expect_revert(OnlyTangleAllowed {
            caller: TANGLE,
            tangle: Address::ZERO,
        });
    // Tangle core passes itself as `tangleCore`; anyone else naming it is refused.
    let create = onBlueprintCreatedCall {
        blueprintId: BLUEPRINT_ID,
        owner: BLUEPRINT_OWNER,
        tangleCore: TANGLE,
    };
    chain
        .call_from(STRANGER, create.clone(), ZERO)
        .expect_revert(OnlyTangleAllowed {
            caller: STRANGER,
            tangle: TANGLE,
        });
    chain.tangle(create, ZERO).expect_success();
    assert_eq!(chain.view(tangleCoreCall {}), TANGLE);
    assert_eq!(chain.view(blueprintIdCall {}), BLUEPRINT_ID);
    assert_eq!(
        chain.view(queryDeveloperPaymentAddressCall { serviceId: 1 }),
        BLUEPRINT_OWNER
    );
    // A second binding, even by the bound core or to another one, is refused.
    chain
        .tangle(
            onBlueprintCreatedCall {
                blueprintId: 8,
                owner: STRANGER,
                tangleCore: TANGLE,
            },
            ZERO,
        )
        .expect_revert(AlreadyInitialized {});
    chain
        .call_from(
            STRANGER,
            onBlueprintCreatedCall {
                blueprintId: 8,
                owner: STRANGER,
                tangleCore: STRANGER,
            },
            ZERO,
        )
        .expect_revert(AlreadyInitialized {});
}

#[test]
fn operators_are_registered_and_unregistered_by_tangle_only() {
    let mut chain = Chain::new();
    assert!(chain.view(isRegisteredOperatorCall { operator: OPERATOR }));
    assert!(!chain.view(isRegisteredOperatorCall { operator: STRANGER }));
    chain
        .call_from(
            STRANGER,
            onRegisterCall {
                operator: STRANGER,
                registrationInputs: Default::default(),
            },
            ZERO,
        )
        .expect_revert(OnlyTangleAllowed {
            caller: STRANGER,
            tangle: TANGLE,
        });
    chain
        .call_from(
            OPERATOR,
            onUnregisterCall {
                operator: OPERATOR_2,
            },
            ZERO,
        )
        .expect_revert(OnlyTangleAllowed {
            caller: OPERATOR,
            tangle: TANGLE,
        });
    chain
        .tangle(
            onRegisterCall {
                operator: Address::ZERO,
                registrationInputs: Default::default(),
            },
            ZERO,
        )
        .expect_revert(ZeroAddress {});
    assert!(chain.view(canJoinCall {
        serviceId: SERVICE_ID,
        operator: OPERATOR
    }));
    assert!(!chain.view(canJoinCall {
        serviceId: SERVICE_ID,
        operator: STRANGER
    }));
}

#[test]
fn service_requests_need_registered_operators_and_the_native_asset() {
    let mut chain = Chain::new();
    chain
        .tangle(request(vec![OPERATOR, OPERATOR_2], Address::ZERO), ZERO)
        .expect_success();
    chain
        .tangle(request(vec![OPERATOR, STRANGER], Address::ZERO), ZERO)
        .expect_revert(NotRegisteredOperator { operator: STRANGER });
    let token = address!("00000000000000000000000000000000000e2c20");
    chain
        .tangle(request(vec![OPERATOR], token), ZERO)
        .expect_revert(UnsupportedPaymentAsset { asset: token });
    chain
        .call_from(STRANGER, request(vec![OPERATOR], Address::ZERO), ZERO)
        .expect_revert(OnlyTangleAllowed {
            caller: STRANGER,
            tangle: TANGLE,
        });
    assert!(chain.view(queryIsPaymentAssetAllowedCall {
        serviceId: SERVICE_ID,
        asset: Address::ZERO
    }));
    assert!(!chain.view(queryIsPaymentAssetAllowedCall {
        serviceId: SERVICE_ID,
        asset: token
    }));
}

#[test]
fn other_lifecycle_hooks_accept_tangle_and_refuse_everyone_else() {
    let mut chain = Chain::new();
    let init = onServiceInitializedCall {
        blueprintId: BLUEPRINT_ID,
        requestId: 1,
        serviceId: SERVICE_ID,
        owner: STRANGER,
        permittedCallers: vec![STRANGER],
        ttl: 1_000,
    };
    let published = onBinaryVersionPublishedCall {
        blueprintId: BLUEPRINT_ID,
        version: BinaryVersion {
            versionId: 1,
            publishedAt: 1_700_000_000,
            deprecated: false,
            sha256Hash: [7u8; 32].into(),
            attestationHash: Default::default(),
        },
        binaryUri: "https://example.invalid/rba-blueprint".into(),
    };
    let slash = onSlashCall {
        serviceId: SERVICE_ID,
        offender: OPERATOR.to_vec().into(),
        slashPercent: 10,
    };
    chain.tangle(init.clone(), ZERO).expect_success();
    chain.tangle(published.clone(), ZERO).expect_success();
    chain.tangle(slash.clone(), ZERO).expect_success();
    let refused = OnlyTangleAllowed {
        caller: STRANGER,
        tangle: TANGLE,
    };
    chain
        .call_from(STRANGER, init, ZERO)
        .expect_revert(refused.clone());
    chain
        .call_from(STRANGER, published, ZERO)
        .expect_revert(refused.clone());
    chain
        .call_from(STRANGER, slash, ZERO)
        .expect_revert(refused);
}

#[test]
fn jobs_need_one_result_and_no_bls_aggregation() {
    let mut chain = Chain::new();
    for job in rba_contracts::Job::ALL.map(|j| j.index()) {
        assert_eq!(
            chain.view(getRequiredResultCountCall {
                serviceId: SERVICE_ID,
                jobIndex: job
            }),
            1
        );
        assert!(!chain.view(requiresAggregationCall {
            serviceId: SERVICE_ID,
            jobIndex: job
        }));
    }
}

#[test]
fn rust_constants_match_the_contract() {
    let mut chain = Chain::new();
    assert_eq!(
        chain.view(JOB_COUNTCall {}) as usize,
        rba_contracts::Job::ALL.len()
    );
    assert_eq!(
        chain.view(MAX_ZIP_URI_LENGTHCall {}),
        U256::from(rba_contracts::MAX_ZIP_URI_LENGTH)
    );
    assert_eq!(
        chain.view(MAX_INPUTS_LENGTHCall {}),
        U256::from(rba_contracts::MAX_INPUTS_LENGTH)
    );
    assert_eq!(
        chain.view(MAX_EXECUTE_TIMEOUT_SECSCall {}),
        rba_contracts::MAX_EXECUTE_TIMEOUT_SECS
    );
    assert_eq!(
        chain.view(MIN_EXECUTE_MEMORY_BYTESCall {}),
        rba_contracts::MIN_EXECUTE_MEMORY_BYTES
    );
    assert_eq!(
        chain.view(MAX_ARTIFACT_LENGTHCall {}),
        U256::from(rba_contracts::MAX_ARTIFACT_LENGTH)
    );
}
