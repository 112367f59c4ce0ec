//! A revm chain with the service manager deployed and bound to a Tangle core address, plus the
//! contract's ABI written out by hand (so a renamed error or changed argument fails a test).

use alloy_primitives::{Address, B256, Bytes, FixedBytes, Log, U256, address};
use alloy_sol_types::{SolCall, SolError, SolEvent, SolInterface, SolValue, sol};
use rba_contracts::{encode_job_inputs, service_manager};
use revm::context::TxEnv;
use revm::context::result::{ExecutionResult, Output};
use revm::database::{CacheDB, EmptyDB};
use revm::handler::{MainnetContext, MainnetEvm};
use revm::primitives::TxKind;
use revm::state::{AccountInfo, Bytecode};
use revm::{Context, DatabaseRef, ExecuteCommitEvm, MainBuilder, MainContext};

sol! {
    #![sol(all_derives)]

    struct JobCall {
        bytes32 inputsHash;
        uint256 payment;
        bytes16 sessionId;
        uint8 job;
        uint8 status;
    }

    struct BinaryVersion {
        uint64 versionId;
        uint64 publishedAt;
        bool deprecated;
        bytes32 sha256Hash;
        bytes32 attestationHash;
    }

    interface Manager {
        error OnlyTangleAllowed(address caller, address tangle);
        error AlreadyInitialized();
        error NotOwner(address caller);
        error ZeroAddress();
        error InvalidJobIndex(uint8 job);
        error InputsTooLarge(uint256 length, uint256 maxLength);
        error MalformedInputs();
        error ZipUriTooLong(uint256 length, uint256 maxLength);
        error UnsupportedZipUriScheme();
        error ZipUriMissingLocation();
        error InvalidZipUriCharacter(uint256 index);
        error InvalidSessionId();
        error UnknownBuildTarget();
        error BuildTargetNotAllowed(uint8 job);
        error InsufficientPayment(uint8 job, uint256 required, uint256 paid);
        error UnexpectedPayment(uint256 amount);
        error UnsupportedPaymentAsset(address asset);
        error NothingToWithdraw();
        error WithdrawalFailed();
        error JobCallAlreadyRecorded(uint64 serviceId, uint64 jobCallId);
        error UnknownJobCall(uint64 serviceId, uint64 jobCallId);
        error ResultAlreadyPosted(uint64 serviceId, uint64 jobCallId);
        error JobIndexMismatch(uint8 expected, uint8 actual);
        error InputsHashMismatch(bytes32 expected, bytes32 actual);
        error NotRegisteredOperator(address operator);
        error CodeOrArtifactRequired();
        error InvalidArtifact();
        error InvalidTimeout(uint64 timeoutSecs);
        error InvalidMemory(uint64 memoryBytes);

        event JobAccepted(
            uint64 indexed serviceId,
            uint64 indexed jobCallId,
            bytes16 indexed sessionId,
            uint8 job,
            string zipUri,
            string buildTarget,
            uint256 payment
        );
        event JobResultPosted(
            uint64 indexed serviceId,
            uint64 indexed jobCallId,
            bytes16 indexed sessionId,
            uint8 job,
            address operator,
            bytes32 outputsHash,
            uint256 payment
        );
        event ExecutionAccepted(
            uint64 indexed serviceId,
            uint64 indexed jobCallId,
            bytes32 indexed programHash,
            bool isArtifact,
            uint64 timeoutSecs,
            uint64 memoryBytes,
            uint256 payment
        );
        event EarningsWithdrawn(address indexed operator, address indexed to, uint256 amount);

        // Tangle hooks
        function onBlueprintCreated(uint64 blueprintId, address owner, address tangleCore) external;
        function onRegister(address operator, bytes registrationInputs) external payable;
        function onUnregister(address operator) external;
        function onRequest(
            uint64 requestId,
            address requester,
            address[] operators,
            bytes requestInputs,
            uint64 ttl,
            address paymentAsset,
            uint256 paymentAmount
        ) external payable;
        function onServiceInitialized(
            uint64 blueprintId,
            uint64 requestId,
            uint64 serviceId,
            address owner,
            address[] permittedCallers,
            uint64 ttl
        ) external;
        function onBinaryVersionPublished(uint64 blueprintId, BinaryVersion version, string binaryUri) external;
        function onJobCall(uint64 serviceId, uint8 job, uint64 jobCallId, bytes inputs) external payable;
        function onJobResult(
            uint64 serviceId,
            uint8 job,
            uint64 jobCallId,
            address operator,
            bytes32 inputsHash,
            bytes outputs
        ) external payable;
        function onSlash(uint64 serviceId, bytes offender, uint8 slashPercent) external;
        function canJoin(uint64 serviceId, address operator) external view returns (bool);
        function requiresAggregation(uint64 serviceId, uint8 jobIndex) external view returns (bool);
        function getRequiredResultCount(uint64 serviceId, uint8 jobIndex) external view returns (uint32);
        function queryIsPaymentAssetAllowed(uint64 serviceId, address asset) external view returns (bool);
        function queryDeveloperPaymentAddress(uint64 serviceId) external view returns (address);

        // our own API
        function JOB_COUNT() external view returns (uint8);
        function MAX_ZIP_URI_LENGTH() external view returns (uint256);
        function MAX_INPUTS_LENGTH() external view returns (uint256);
        function MAX_EXECUTE_TIMEOUT_SECS() external view returns (uint64);
        function MIN_EXECUTE_MEMORY_BYTES() external view returns (uint64);
        function MAX_ARTIFACT_LENGTH() external view returns (uint256);
        function owner() external view returns (address);
        function tangleCore() external view returns (address);
        function blueprintId() external view returns (uint64);
        function setJobPrice(uint8 job, uint256 price) external;
        function jobPrice(uint8 job) external view returns (uint256);
        function transferOwnership(address newOwner) external;
        function withdrawEarnings(address to) external returns (uint256 amount);
        function earnings(address operator) external view returns (uint256);
        function totalEscrowed() external view returns (uint256);
        function isRegisteredOperator(address operator) external view returns (bool);
        function getJobCall(uint64 serviceId, uint64 jobCallId) external view returns (JobCall);
        function validateJobInputs(uint8 job, bytes inputs) external view returns (bytes16 sessionId);
        function decodeJobInputs(bytes inputs) external pure returns (string zipUri, string sessionId, string buildTarget);
    }
}

pub use Manager::*;

/// Deploys the service manager.
pub const DEPLOYER: Address = address!("00000000000000000000000000000000000d0e01");
/// The Tangle core contract: the only address the hooks accept calls from. Holds
/// [`tangle_core_code`], so hook calls reach the manager the way tnt-core makes them.
pub const TANGLE: Address = address!("000000000000000000000000000000000074a6e1");
/// The account whose transactions drive the Tangle core stub (and pay job prices).
pub const RELAYER: Address = address!("00000000000000000000000000000000000e1a40");
/// Blueprint owner as reported by Tangle in onBlueprintCreated.
pub const BLUEPRINT_OWNER: Address = address!("0000000000000000000000000000000000b0b0b0");
/// Registered operators.
pub const OPERATOR: Address = address!("0000000000000000000000000000000000000a01");
pub const OPERATOR_2: Address = address!("0000000000000000000000000000000000000a02");
/// Neither registered nor privileged.
pub const STRANGER: Address = address!("0000000000000000000000000000000000005a5a");

pub const BLUEPRINT_ID: u64 = 7;
pub const SERVICE_ID: u64 = 3;
pub const SESSION: &str = "6f1c9a2e-4b7d-4e8f-9a0b-1c2d3e4f5a6b";
pub const ZIP_URI: &str = "cas://blake3/5c1f0a9e2d/4096";

/// Tangle core's gas budget for a manager hook (tnt-core `MANAGER_HOOK_GAS_LIMIT_DEFAULT`).
pub const TANGLE_HOOK_GAS_LIMIT: u64 = 500_000;

/// Runtime code of a stand-in for Tangle core: forwards its calldata and value to `manager`
/// with a [`TANGLE_HOOK_GAS_LIMIT`] gas cap, as tnt-core's `_callManager` does
/// (`manager.call{gas: _hookGasLimit()}(data)`), and returns or reverts with the manager's
/// return data.
pub fn tangle_core_code(manager: Address) -> Vec<u8> {
    let mut code = vec![
        0x36, 0x5f, 0x5f, 0x37, // CALLDATACOPY(0, 0, CALLDATASIZE)
        0x5f, 0x5f, 0x36, 0x5f,
        0x34, // retSize 0, retOffset 0, argsSize, argsOffset 0, CALLVALUE
        0x73, // PUSH20 manager
    ];
    code.extend_from_slice(manager.as_slice());
    code.push(0x62); // PUSH3 gas
    code.extend_from_slice(&TANGLE_HOOK_GAS_LIMIT.to_be_bytes()[5..]);
    code.extend_from_slice(&[
        0xf1, // CALL
        0x3d, 0x5f, 0x5f, 0x3e, // RETURNDATACOPY(0, 0, RETURNDATASIZE)
        0x60, 0x2d, 0x57, // JUMPI(45, success)
        0x3d, 0x5f, 0xfd, // REVERT(0, RETURNDATASIZE)
        0x5b, 0x3d, 0x5f, 0xf3, // 45: JUMPDEST; RETURN(0, RETURNDATASIZE)
    ]);
    assert_eq!(code[45], 0x5b, "jump target");
    code
}

pub fn wei(n: u64) -> U256 {
    U256::from(n)
}

pub fn ether(n: u64) -> U256 {
    U256::from(n) * U256::from(10u64).pow(U256::from(18u64))
}

/// The 16 bytes of a canonical UUID string, as the contract's events carry it.
pub fn session_bytes(uuid: &str) -> FixedBytes<16> {
    let hex: String = uuid.chars().filter(|c| *c != '-').collect();
    FixedBytes::<16>::from_slice(&hex::decode(hex).expect("uuid hex"))
}

pub fn inputs(zip_uri: &str, session: &str, target: &str) -> Bytes {
    encode_job_inputs(zip_uri, session, target).into()
}

pub fn valid_inputs() -> Bytes {
    inputs(ZIP_URI, SESSION, "")
}

/// A Rust snippet for job 5.
pub const SNIPPET: &str = "fn main() { println!(\"hello\"); }";

/// Job 5 inputs.
pub fn execute_inputs(code: &str, artifact: &str, stdin: &str, timeout: u64, memory: u64) -> Bytes {
    rba_contracts::encode_execute_inputs(code, artifact, stdin, timeout, memory).into()
}

/// Inputs `job` accepts: a zip build's, or a snippet for job 5.
pub fn valid_inputs_for(job: rba_contracts::Job) -> Bytes {
    match job {
        rba_contracts::Job::Execute => execute_inputs(SNIPPET, "", "", 0, 0),
        _ => valid_inputs(),
    }
}

/// What a transaction did.
#[derive(Debug)]
pub enum Outcome {
    Success {
        output: Bytes,
        logs: Vec<Log>,
        gas_used: u64,
    },
    Revert {
        data: Bytes,
        gas_used: u64,
    },
    Halt(String),
}

impl Outcome {
    #[track_caller]
    pub fn expect_success(self) -> (Bytes, Vec<Log>) {
        match self {
            Outcome::Success { output, logs, .. } => (output, logs),
            other => panic!("expected success, got {}", describe(&other)),
        }
    }

    #[track_caller]
    pub fn gas_used(&self) -> u64 {
        match self {
            Outcome::Success { gas_used, .. } | Outcome::Revert { gas_used, .. } => *gas_used,
            Outcome::Halt(reason) => panic!("halted: {reason}"),
        }
    }

    /// Asserts the call reverted with exactly `expected` (selector and arguments).
    #[track_caller]
    pub fn expect_revert<E: SolError + std::fmt::Debug>(self, expected: E) {
        let want = Bytes::from(expected.abi_encode());
        match &self {
            Outcome::Revert { data, .. } if *data == want => {}
            other => panic!(
                "expected revert {}{expected:?} ({want}), got {}",
                E::SIGNATURE,
                describe(other)
            ),
        }
    }
}

fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Success { output, .. } => format!("success with output {output}"),
        Outcome::Revert { data, .. } => match ManagerErrors::abi_decode(data) {
            Ok(err) => format!("revert {err:?}"),
            Err(_) => format!("revert with data {data}"),
        },
        Outcome::Halt(reason) => format!("halt: {reason}"),
    }
}

type Db = CacheDB<EmptyDB>;

/// One chain, one deployed and bound manager.
pub struct Chain {
    evm: MainnetEvm<MainnetContext<Db>>,
    pub manager: Address,
}

impl Chain {
    /// Deploys the committed bytecode from [`DEPLOYER`], binds it to [`TANGLE`] the way Tangle
    /// core does when the blueprint is created, and registers [`OPERATOR`] and [`OPERATOR_2`].
    pub fn new() -> Self {
        let mut chain = Self::deployed();
        chain
            .tangle(
                onBlueprintCreatedCall {
                    blueprintId: BLUEPRINT_ID,
                    owner: BLUEPRINT_OWNER,
                    tangleCore: TANGLE,
                },
                U256::ZERO,
            )
            .expect_success();
        for op in [OPERATOR, OPERATOR_2] {
            chain.register(op);
        }
        chain
    }

    /// Deployed but not yet bound to a Tangle core.
    pub fn deployed() -> Self {
        let mut db = Db::default();
        for who in [
            DEPLOYER,
            RELAYER,
            BLUEPRINT_OWNER,
            OPERATOR,
            OPERATOR_2,
            STRANGER,
        ] {
            db.insert_account_info(
                who,
                AccountInfo {
                    balance: ether(1_000),
                    ..Default::default()
                },
            );
        }
        let evm = Context::mainnet()
            .with_db(db)
            .modify_cfg_chained(|cfg| cfg.disable_nonce_check = true)
            .build_mainnet();
        let mut chain = Chain {
            evm,
            manager: Address::ZERO,
        };
        let code = service_manager().bytecode;
        let tx = TxEnv::builder()
            .caller(DEPLOYER)
            .kind(TxKind::Create)
            .data(code.into())
            .gas_limit(16_000_000)
            .build()
            .expect("deploy tx");
        match chain.evm.transact_commit(tx).expect("deploy executes") {
            ExecutionResult::Success {
                output: Output::Create(_, Some(addr)),
                ..
            } => chain.manager = addr,
            other => panic!("deployment failed: {other:?}"),
        }
        let manager = chain.manager;
        chain.set_code(TANGLE, &tangle_core_code(manager));
        chain
    }

    /// Sends a transaction from `from` to `to`. From [`TANGLE`] (a contract) it is relayed:
    /// [`RELAYER`] calls the Tangle core stub, which makes the call with the hook gas cap.
    pub fn send(&mut self, from: Address, to: Address, value: U256, data: Bytes) -> Outcome {
        let (from, to) = if from == TANGLE {
            assert_eq!(
                to, self.manager,
                "the Tangle core stub only calls the manager"
            );
            (RELAYER, TANGLE)
        } else {
            (from, to)
        };
        let tx = TxEnv::builder()
            .caller(from)
            .kind(TxKind::Call(to))
            .value(value)
            .data(data)
            .gas_limit(10_000_000)
            .build()
            .expect("tx");
        match self.evm.transact_commit(tx).expect("tx executes") {
            ExecutionResult::Success {
                output, logs, gas, ..
            } => Outcome::Success {
                output: output.into_data(),
                logs,
                gas_used: gas.tx_gas_used(),
            },
            ExecutionResult::Revert { output, gas, .. } => Outcome::Revert {
                data: output,
                gas_used: gas.tx_gas_used(),
            },
            ExecutionResult::Halt { reason, .. } => Outcome::Halt(format!("{reason:?}")),
        }
    }

    /// Calls the manager from `from`.
    pub fn call_from<C: SolCall>(&mut self, from: Address, call: C, value: U256) -> Outcome {
        let manager = self.manager;
        self.send(from, manager, value, call.abi_encode().into())
    }

    /// Calls a hook the way Tangle core does.
    pub fn tangle<C: SolCall>(&mut self, call: C, value: U256) -> Outcome {
        self.call_from(TANGLE, call, value)
    }

    /// Calls a view function and decodes its return value.
    #[track_caller]
    pub fn view<C: SolCall>(&mut self, call: C) -> C::Return {
        let (output, _) = self.call_from(STRANGER, call, U256::ZERO).expect_success();
        C::abi_decode_returns(&output).expect("decodable return")
    }

    pub fn register(&mut self, operator: Address) {
        self.tangle(
            onRegisterCall {
                operator,
                registrationInputs: Bytes::new(),
            },
            U256::ZERO,
        )
        .expect_success();
    }

    pub fn set_price(&mut self, job: u8, price: U256) {
        self.call_from(DEPLOYER, setJobPriceCall { job, price }, U256::ZERO)
            .expect_success();
    }

    /// Tangle forwards a job call with `value` attached.
    pub fn job_call(&mut self, job_call_id: u64, job: u8, inputs: Bytes, value: U256) -> Outcome {
        self.tangle(
            onJobCallCall {
                serviceId: SERVICE_ID,
                job,
                jobCallId: job_call_id,
                inputs,
            },
            value,
        )
    }

    /// Tangle forwards `operator`'s result, with the inputs hash it recorded at submission.
    pub fn job_result(
        &mut self,
        job_call_id: u64,
        job: u8,
        operator: Address,
        inputs_hash: B256,
        outputs: &[u8],
    ) -> Outcome {
        self.tangle(
            onJobResultCall {
                serviceId: SERVICE_ID,
                job,
                jobCallId: job_call_id,
                operator,
                inputsHash: inputs_hash,
                outputs: Bytes::copy_from_slice(outputs),
            },
            U256::ZERO,
        )
    }

    pub fn balance(&self, who: Address) -> U256 {
        self.evm
            .ctx
            .journaled_state
            .database
            .basic_ref(who)
            .expect("db read")
            .map(|info| info.balance)
            .unwrap_or_default()
    }

    /// Puts `runtime` code at `at`, keeping its balance.
    pub fn set_code(&mut self, at: Address, runtime: &[u8]) {
        let code = Bytecode::new_raw(Bytes::copy_from_slice(runtime));
        let balance = self.balance(at);
        self.evm.ctx.journaled_state.database.insert_account_info(
            at,
            AccountInfo {
                balance,
                code_hash: code.hash_slow(),
                code: Some(code),
                ..Default::default()
            },
        );
    }
}

/// Decodes the one `E` event the manager emitted among `logs`.
#[track_caller]
pub fn single_event<E: SolEvent>(logs: &[Log], manager: Address) -> E {
    let found: Vec<E> = logs
        .iter()
        .filter(|log| log.address == manager && log.topics().first() == Some(&E::SIGNATURE_HASH))
        .map(|log| E::decode_log_data(&log.data).expect("decodable event"))
        .collect();
    assert_eq!(found.len(), 1, "expected one {} event", E::SIGNATURE);
    found.into_iter().next().unwrap()
}

/// The flat encoding with one word appended: decodes, but is not canonical.
pub fn with_trailing_word(inputs: &Bytes) -> Bytes {
    let mut v = inputs.to_vec();
    v.extend_from_slice(&[0u8; 32]);
    v.into()
}

/// The tuple encoding (`abi.encode(JobInputs(...))`) of the inputs.
pub fn tuple_inputs(zip_uri: &str, session: &str, target: &str) -> Bytes {
    rba_contracts::JobInputs {
        zipUri: zip_uri.into(),
        sessionId: session.into(),
        buildTarget: target.into(),
    }
    .abi_encode()
    .into()
}

/// `validateJobInputs` (a view) and the job hook reject `inputs` of `job` with `expected`, and
/// nothing is recorded.
#[track_caller]
pub fn assert_rejected<E: SolError + std::fmt::Debug + Clone>(
    chain: &mut Chain,
    job: u8,
    inputs: Bytes,
    expected: E,
) {
    // validateJobInputs (a view) and the hook agree on the error.
    chain
        .call_from(
            STRANGER,
            validateJobInputsCall {
                job,
                inputs: inputs.clone(),
            },
            U256::ZERO,
        )
        .expect_revert(expected.clone());
    chain
        .job_call(99, job, inputs, U256::ZERO)
        .expect_revert(expected);
    // Nothing was recorded.
    assert_eq!(
        chain
            .view(getJobCallCall {
                serviceId: SERVICE_ID,
                jobCallId: 99
            })
            .status,
        0
    );
}
