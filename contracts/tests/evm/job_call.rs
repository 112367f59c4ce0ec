//! onJobCall: which inputs are accepted, and the named error for each kind of bad input.

use alloy_primitives::{Address, Bytes, U256};
use alloy_sol_types::{SolError, SolValue};
use rba_contracts::{BUILD_TARGETS, Job, MAX_INPUTS_LENGTH, MAX_ZIP_URI_LENGTH, inputs_hash};

use crate::harness::*;

const ZERO: U256 = U256::ZERO;

/// A zip URI of exactly `len` bytes.
fn uri_of_len(scheme: &str, len: usize) -> String {
    format!("{scheme}{}", "a".repeat(len - scheme.len()))
}

#[test]
fn compile_job_accepts_every_build_target_and_emits_job_accepted() {
    let mut chain = Chain::new();
    for (i, target) in BUILD_TARGETS.iter().enumerate() {
        let call_id = 10 + i as u64;
        let inputs = inputs(ZIP_URI, SESSION, target);
        let (_, logs) = chain
            .job_call(call_id, Job::Compile.index(), inputs.clone(), ZERO)
            .expect_success();
        let event: JobAccepted = single_event(&logs, chain.manager);
        assert_eq!(event.serviceId, SERVICE_ID);
        assert_eq!(event.jobCallId, call_id);
        assert_eq!(event.sessionId, session_bytes(SESSION));
        assert_eq!(event.job, 0);
        assert_eq!(event.zipUri, ZIP_URI);
        assert_eq!(event.buildTarget, *target);
        assert_eq!(event.payment, ZERO);

        let record = chain.view(getJobCallCall {
            serviceId: SERVICE_ID,
            jobCallId: call_id,
        });
        assert_eq!(record.inputsHash, inputs_hash(&inputs));
        assert_eq!(record.sessionId, session_bytes(SESSION));
        assert_eq!(record.job, 0);
        assert_eq!(record.status, 1, "pending");
    }
}

#[test]
fn every_build_job_accepts_an_empty_build_target() {
    let mut chain = Chain::new();
    for job in Job::BUILDS {
        chain
            .job_call(job.index() as u64, job.index(), valid_inputs(), ZERO)
            .expect_success();
    }
}

#[test]
fn every_allowed_scheme_is_accepted() {
    let mut chain = Chain::new();
    for (i, uri) in [
        "https://artifacts.example/builds/42.zip?sig=abc%20def",
        "ipfs://bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi",
        "cas://blake3/af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262/1024",
    ]
    .iter()
    .enumerate()
    {
        chain
            .job_call(i as u64, Job::Check.index(), inputs(uri, SESSION, ""), ZERO)
            .expect_success();
    }
}

#[test]
fn tuple_encoded_inputs_are_accepted_with_their_own_hash() {
    let mut chain = Chain::new();
    let tuple = tuple_inputs(ZIP_URI, SESSION, "release");
    assert_ne!(tuple, inputs(ZIP_URI, SESSION, "release"));
    let (_, logs) = chain
        .job_call(1, Job::Compile.index(), tuple.clone(), ZERO)
        .expect_success();
    let event: JobAccepted = single_event(&logs, chain.manager);
    assert_eq!(event.buildTarget, "release");
    let record = chain.view(getJobCallCall {
        serviceId: SERVICE_ID,
        jobCallId: 1,
    });
    assert_eq!(record.inputsHash, inputs_hash(&tuple));
    let decoded = chain.view(decodeJobInputsCall { inputs: tuple });
    assert_eq!(
        (decoded.zipUri.as_str(), decoded.sessionId.as_str()),
        (ZIP_URI, SESSION)
    );
}

#[test]
fn longest_uri_is_accepted_within_tangles_hook_gas_budget() {
    let mut chain = Chain::new();
    let uri = uri_of_len("https://", MAX_ZIP_URI_LENGTH);
    // The Tangle core stub calls the hook with tnt-core's 500k gas cap, so success here means
    // the hook fits; the whole transaction (intrinsic gas and calldata included) fits too.
    let outcome = chain.job_call(
        1,
        Job::Compile.index(),
        inputs(&uri, SESSION, "clippy"),
        ZERO,
    );
    let gas = outcome.gas_used();
    outcome.expect_success();
    assert!(
        gas < TANGLE_HOOK_GAS_LIMIT,
        "onJobCall with a {MAX_ZIP_URI_LENGTH}-byte URI used {gas} gas"
    );
}

#[test]
fn job_index_outside_0_to_5_is_rejected() {
    let mut chain = Chain::new();
    for job in [6u8, 7, 200, 255] {
        assert_rejected(&mut chain, job, valid_inputs(), InvalidJobIndex { job });
    }
}

#[test]
fn malformed_encodings_are_rejected() {
    let mut chain = Chain::new();
    let good = valid_inputs();
    let mut bad_offset = good.to_vec();
    bad_offset[31] = 0x40; // first string's offset points into the head
    let mut huge_length = good.to_vec();
    huge_length[0x60 + 24..0x60 + 32].copy_from_slice(&u64::MAX.to_be_bytes());
    let cases: Vec<(&str, Bytes)> = vec![
        ("empty", Bytes::new()),
        ("short", Bytes::from(vec![0u8; 31])),
        ("one word", Bytes::from(vec![0u8; 32])),
        ("garbage", Bytes::from(vec![0xab; 200])),
        ("truncated", good.slice(..good.len() - 32)),
        ("trailing word", with_trailing_word(&good)),
        ("non-canonical offset", bad_offset.into()),
        ("length past the end", huge_length.into()),
        // (string, string) instead of (string, string, string)
        (
            "two strings",
            (ZIP_URI.to_owned(), SESSION.to_owned())
                .abi_encode_params()
                .into(),
        ),
        (
            "tuple with trailing word",
            with_trailing_word(&tuple_inputs(ZIP_URI, SESSION, "")),
        ),
    ];
    for (name, inputs) in cases {
        let outcome = chain.job_call(99, Job::Test.index(), inputs, ZERO);
        assert!(
            matches!(&outcome, Outcome::Revert { data, .. } if data[..] == MalformedInputs {}.abi_encode()[..]),
            "{name}: {outcome:?}"
        );
    }
    // And through the view, one representative.
    assert_rejected(&mut chain, 1, Bytes::new(), MalformedInputs {});
}

#[test]
fn oversized_inputs_are_rejected_before_decoding() {
    let mut chain = Chain::new();
    let uri = uri_of_len("https://", MAX_INPUTS_LENGTH);
    let big = inputs(&uri, SESSION, "");
    assert!(big.len() > MAX_INPUTS_LENGTH);
    assert_rejected(
        &mut chain,
        0,
        big.clone(),
        InputsTooLarge {
            length: U256::from(big.len()),
            maxLength: U256::from(MAX_INPUTS_LENGTH),
        },
    );
}

#[test]
fn unsupported_uri_schemes_are_rejected() {
    let mut chain = Chain::new();
    for uri in [
        "",
        "http://example.com/a.zip",
        "HTTPS://example.com/a.zip",
        "ftp://example.com/a.zip",
        "file:///tmp/a.zip",
        "s3://bucket/a.zip",
        " https://example.com/a.zip",
        "cas:/abc",
        "ipfs:/bafy",
        "https:/x",
    ] {
        assert_rejected(
            &mut chain,
            0,
            inputs(uri, SESSION, ""),
            UnsupportedZipUriScheme {},
        );
    }
}

#[test]
fn uri_longer_than_the_cap_is_rejected() {
    let mut chain = Chain::new();
    for scheme in ["https://", "cas://"] {
        let uri = uri_of_len(scheme, MAX_ZIP_URI_LENGTH + 1);
        assert_rejected(
            &mut chain,
            0,
            inputs(&uri, SESSION, ""),
            ZipUriTooLong {
                length: U256::from(MAX_ZIP_URI_LENGTH + 1),
                maxLength: U256::from(MAX_ZIP_URI_LENGTH),
            },
        );
    }
}

#[test]
fn uri_with_only_a_scheme_is_rejected() {
    let mut chain = Chain::new();
    for uri in ["https://", "ipfs://", "cas://"] {
        assert_rejected(
            &mut chain,
            2,
            inputs(uri, SESSION, ""),
            ZipUriMissingLocation {},
        );
    }
}

#[test]
fn uri_with_spaces_controls_or_non_ascii_is_rejected_at_that_byte() {
    let mut chain = Chain::new();
    for (uri, index) in [
        ("https://example.com/a b.zip", 21usize),
        ("cas://abc\n", 9),
        ("ipfs://bafy\u{7f}", 11),
        ("cas://\tabc", 6),
        ("https://exämple.com", 10), // first byte of the two-byte 'ä'
        ("cas://abc\0", 9),
    ] {
        assert_rejected(
            &mut chain,
            3,
            inputs(uri, SESSION, ""),
            InvalidZipUriCharacter {
                index: U256::from(index),
            },
        );
    }
}

/// Inputs whose zip URI is arbitrary bytes (ABI `bytes` and `string` encode alike).
fn raw_uri_inputs(uri: Vec<u8>) -> Bytes {
    (Bytes::from(uri), SESSION.to_owned(), String::new())
        .abi_encode_params()
        .into()
}

#[test]
fn every_byte_value_is_classified_exactly_wherever_it_falls() {
    // The contract checks the URI 32 bytes at a time; put each byte value at the first byte,
    // inside, at both edges of each word, and in the byte-wise tail.
    let mut chain = Chain::new();
    let len = 100; // "cas://" + 94 bytes: words at 6..38 and 38..70, tail 70..100
    for position in [6usize, 7, 30, 37, 38, 39, 69, 70, 99] {
        for byte in 0u8..=255 {
            let mut uri = format!("cas://{}", "x".repeat(len - 6)).into_bytes();
            uri[position] = byte;
            let outcome = chain.call_from(
                STRANGER,
                validateJobInputsCall {
                    job: 0,
                    inputs: raw_uri_inputs(uri),
                },
                ZERO,
            );
            if (0x21..=0x7e).contains(&byte) {
                outcome.expect_success();
            } else {
                outcome.expect_revert(InvalidZipUriCharacter {
                    index: U256::from(position),
                });
            }
        }
    }
}

#[test]
fn the_first_bad_uri_byte_is_reported() {
    let mut chain = Chain::new();
    let mut uri = format!("https://{}", "y".repeat(120)).into_bytes();
    for (at, byte) in [(100usize, b' '), (45, 0x80), (41, 0x7f), (90, b'\n')] {
        uri[at] = byte;
    }
    assert_rejected(
        &mut chain,
        0,
        raw_uri_inputs(uri),
        InvalidZipUriCharacter {
            index: U256::from(41),
        },
    );
}

#[test]
fn session_ids_that_are_not_canonical_uuids_are_rejected() {
    let mut chain = Chain::new();
    for session in [
        "",
        "not-a-uuid",
        "6F1C9A2E-4B7D-4E8F-9A0B-1C2D3E4F5A6B",   // upper case
        "6f1c9a2e4b7d4e8f9a0b1c2d3e4f5a6b",       // no hyphens
        "{6f1c9a2e-4b7d-4e8f-9a0b-1c2d3e4f5a6b}", // braces
        "6f1c9a2e-4b7d-4e8f-9a0b-1c2d3e4f5a6",    // short
        "6f1c9a2e-4b7d-4e8f-9a0b-1c2d3e4f5a6b0",  // long
        "6f1c9a2e-4b7d-4e8f-9a0b-1c2d3e4f5a6g",   // not hex
        "6f1c9a2e4-b7d-4e8f-9a0b-1c2d3e4f5a6b",   // hyphen moved
        "6f1c9a2e-4b7d-4e8f-9a0b_1c2d3e4f5a6b",   // wrong separator
        "urn:uuid:6f1c9a2e-4b7d-4e8f-9a0b-1c2d",
    ] {
        assert_rejected(
            &mut chain,
            1,
            inputs(ZIP_URI, session, ""),
            InvalidSessionId {},
        );
    }
}

#[test]
fn session_id_bytes_are_the_uuid_bytes() {
    let mut chain = Chain::new();
    for session in [
        "00000000-0000-0000-0000-000000000000",
        "ffffffff-ffff-ffff-ffff-ffffffffffff",
        "0123abcd-4567-89ef-0a1b-2c3d4e5f6789",
    ] {
        let got = chain.view(validateJobInputsCall {
            job: 4,
            inputs: inputs(ZIP_URI, session, ""),
        });
        assert_eq!(got, session_bytes(session), "{session}");
    }
}

#[test]
fn unknown_build_targets_are_rejected() {
    let mut chain = Chain::new();
    for target in [
        "Release", "bench", "test", " debug", "debug ", "clippy\0", "profile", "releases",
    ] {
        for job in [0u8, 2] {
            assert_rejected(
                &mut chain,
                job,
                inputs(ZIP_URI, SESSION, target),
                UnknownBuildTarget {},
            );
        }
    }
}

#[test]
fn build_targets_are_only_allowed_for_the_compile_job() {
    let mut chain = Chain::new();
    for job in [Job::Test, Job::Lint, Job::Audit, Job::Check] {
        for target in ["debug", "release", "check", "clippy"] {
            assert_rejected(
                &mut chain,
                job.index(),
                inputs(ZIP_URI, SESSION, target),
                BuildTargetNotAllowed { job: job.index() },
            );
        }
    }
}

#[test]
fn a_job_call_id_is_recorded_once_per_service() {
    let mut chain = Chain::new();
    chain.job_call(5, 0, valid_inputs(), ZERO).expect_success();
    chain
        .job_call(5, 1, valid_inputs(), ZERO)
        .expect_revert(JobCallAlreadyRecorded {
            serviceId: SERVICE_ID,
            jobCallId: 5,
        });
    // The same call id in another service is a different call.
    chain
        .tangle(
            onJobCallCall {
                serviceId: SERVICE_ID + 1,
                job: 0,
                jobCallId: 5,
                inputs: valid_inputs(),
            },
            ZERO,
        )
        .expect_success();
}

#[test]
fn only_tangle_core_may_call_the_job_hook() {
    let mut chain = Chain::new();
    for caller in [STRANGER, OPERATOR, DEPLOYER, BLUEPRINT_OWNER, Address::ZERO] {
        chain
            .call_from(
                caller,
                onJobCallCall {
                    serviceId: SERVICE_ID,
                    job: 0,
                    jobCallId: 1,
                    inputs: valid_inputs(),
                },
                ZERO,
            )
            .expect_revert(OnlyTangleAllowed {
                caller,
                tangle: TANGLE,
            });
    }
}
