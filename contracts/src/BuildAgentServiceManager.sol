// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.26;

import { IBlueprintServiceManager, Types } from "./interfaces/IBlueprintServiceManager.sol";

/// @title BuildAgentServiceManager
/// @notice Blueprint service manager of the rust-build-agent blueprint. It checks a job's
///         inputs and payment when Tangle core forwards the job call, before any operator
///         spends compute on it, and pays the operator once a result for exactly those
///         inputs is posted.
/// @dev Jobs (the job index is the `job` argument of the hooks):
///        0 compile, 1 test, 2 lint, 3 audit, 4 check, 5 execute (run code, see below).
///      Job inputs are the ABI encoding of `(string zipUri, string sessionId, string buildTarget)`,
///      either flat (`abi.encode(zipUri, sessionId, buildTarget)`) or as one tuple
///      (`abi.encode(JobInputs(...))`, what alloy's `SolValue::abi_encode` gives); both are what
///      blueprint-sdk's `TangleArg` extractor decodes. Any other or non-canonical encoding is
///      rejected, so the inputs hash recorded at call time identifies the decoded inputs.
///        - zipUri: `https://`, `ipfs://` or `cas://` followed by at least one printable,
///          non-space ASCII character; at most MAX_ZIP_URI_LENGTH bytes in total.
///        - sessionId: a canonical UUID, `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, lowercase hex.
///          Events carry it as `bytes16` (its 16 bytes), indexed, for log filtering.
///        - buildTarget: "" for every job; `debug`, `release`, `check` or `clippy` for job 0 only.
///      Job 5 (execute_code) inputs are `(string code, string artifact, string stdin,
///      uint64 timeoutSecs, uint64 memoryBytes)`, flat or as one tuple (ExecuteInputs), and
///      canonical like the others:
///        - exactly one of code (a Rust `main.rs`) and artifact (a binary the node built,
///          `blake3:<64 hex>/<size>` or `sha256:<64 hex>/<size>`, printable ASCII) is non-empty;
///        - timeoutSecs 0 (the node's default) or 1..MAX_EXECUTE_TIMEOUT_SECS;
///        - memoryBytes 0 (the node's default) or at least MIN_EXECUTE_MEMORY_BYTES;
///        - the encoded inputs at most MAX_INPUTS_LENGTH bytes, as for every job (Tangle's hook
///          gas budget; a larger program is a project zip built by job 0, run by artifact).
///      Its call records no session id (zero) and emits ExecutionAccepted.
///      Payment: the owner sets a native-token price per job; onJobCall must carry at least that
///      much value. The whole value is escrowed for the call and credited to the operator whose
///      result is accepted; operators withdraw their earnings with `withdrawEarnings`.
///      Hook access: the Tangle core bound in onBlueprintCreated is the only caller allowed,
///      as in tnt-core's BlueprintServiceManagerBase (`onlyFromTangle`).
contract BuildAgentServiceManager is IBlueprintServiceManager {
    // ═══════════════════════════════════════════════════════════════════════
    // CONSTANTS
    // ═══════════════════════════════════════════════════════════════════════

    uint8 public constant JOB_COMPILE = 0;
    uint8 public constant JOB_TEST = 1;
    uint8 public constant JOB_LINT = 2;
    uint8 public constant JOB_AUDIT = 3;
    uint8 public constant JOB_CHECK = 4;
    uint8 public constant JOB_EXECUTE = 5;
    /// @notice Number of jobs; valid job indexes are 0 .. JOB_COUNT - 1.
    uint8 public constant JOB_COUNT = 6;

    /// @notice Longest run job 5 may ask for, in seconds.
    uint64 public constant MAX_EXECUTE_TIMEOUT_SECS = 300;
    /// @notice Least memory job 5 may ask for, in bytes (16 MiB).
    uint64 public constant MIN_EXECUTE_MEMORY_BYTES = 16 << 20;
    /// @notice Longest artifact digest text of job 5.
    uint256 public constant MAX_ARTIFACT_LENGTH = 128;

    /// @notice Longest accepted zip URI, in bytes.
    uint256 public constant MAX_ZIP_URI_LENGTH = 2048;
    /// @notice Longest accepted encoded inputs, in bytes (bounds the decoding gas).
    uint256 public constant MAX_INPUTS_LENGTH = 8192;

    /// @notice Status of a recorded job call.
    uint8 public constant CALL_NONE = 0;
    uint8 public constant CALL_PENDING = 1;
    uint8 public constant CALL_COMPLETED = 2;

    uint256 private constant NOT_FOUND = type(uint256).max;
    uint256 private constant ALL_01 = 0x0101010101010101010101010101010101010101010101010101010101010101;
    uint256 private constant ALL_21 = ALL_01 * 0x21;
    uint256 private constant ALL_7F = ALL_01 * 0x7f;
    uint256 private constant ALL_80 = ALL_01 * 0x80;

    // ═══════════════════════════════════════════════════════════════════════
    // ERRORS
    // ═══════════════════════════════════════════════════════════════════════

    // access
    error OnlyTangleAllowed(address caller, address tangle);
    error AlreadyInitialized();
    error NotOwner(address caller);
    error ZeroAddress();
    // job inputs
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
    error CodeOrArtifactRequired();
    error InvalidArtifact();
    error InvalidTimeout(uint64 timeoutSecs);
    error InvalidMemory(uint64 memoryBytes);
    // payment
    error InsufficientPayment(uint8 job, uint256 required, uint256 paid);
    error UnexpectedPayment(uint256 amount);
    error UnsupportedPaymentAsset(address asset);
    error NothingToWithdraw();
    error WithdrawalFailed();
    // job calls and results
    error JobCallAlreadyRecorded(uint64 serviceId, uint64 jobCallId);
    error UnknownJobCall(uint64 serviceId, uint64 jobCallId);
    error ResultAlreadyPosted(uint64 serviceId, uint64 jobCallId);
    error JobIndexMismatch(uint8 expected, uint8 actual);
    error InputsHashMismatch(bytes32 expected, bytes32 actual);
    error NotRegisteredOperator(address operator);

    // ═══════════════════════════════════════════════════════════════════════
    // EVENTS
    // ═══════════════════════════════════════════════════════════════════════

    /// @notice A job call passed validation and its payment is escrowed.
    /// @param sessionId The session UUID's 16 bytes; the session's log stream is keyed by it.
    event JobAccepted(
        uint64 indexed serviceId,
        uint64 indexed jobCallId,
        bytes16 indexed sessionId,
        uint8 job,
        string zipUri,
        string buildTarget,
        uint256 payment
    );

    /// @notice A job 5 (execute_code) call passed validation and its payment is escrowed.
    /// @param programHash keccak256 of the code, or of the artifact digest text.
    event ExecutionAccepted(
        uint64 indexed serviceId,
        uint64 indexed jobCallId,
        bytes32 indexed programHash,
        bool isArtifact,
        uint64 timeoutSecs,
        uint64 memoryBytes,
        uint256 payment
    );

    /// @notice An operator's result for a job call was accepted and the payment credited to it.
    event JobResultPosted(
        uint64 indexed serviceId,
        uint64 indexed jobCallId,
        bytes16 indexed sessionId,
        uint8 job,
        address operator,
        bytes32 outputsHash,
        uint256 payment
    );

    event BlueprintBound(uint64 indexed blueprintId, address indexed blueprintOwner, address indexed tangleCore);
    event OperatorRegistered(address indexed operator);
    event OperatorUnregistered(address indexed operator);
    event JobPriceSet(uint8 indexed job, uint256 price);
    event EarningsWithdrawn(address indexed operator, address indexed to, uint256 amount);
    event OwnershipTransferred(address indexed previousOwner, address indexed newOwner);

    // ═══════════════════════════════════════════════════════════════════════
    // STATE
    // ═══════════════════════════════════════════════════════════════════════

    /// @notice A job call as recorded by onJobCall.
    struct JobCall {
        bytes32 inputsHash;
        uint256 payment;
        bytes16 sessionId;
        uint8 job;
        uint8 status;
    }

    /// @notice The tuple form of the job inputs (see the contract doc).
    struct JobInputs {
        string zipUri;
        string sessionId;
        string buildTarget;
    }

    /// @notice The tuple form of job 5's inputs (see the contract doc).
    struct ExecuteInputs {
        string code;
        string artifact;
        string stdin;
        uint64 timeoutSecs;
        uint64 memoryBytes;
    }

    /// @notice Sets job prices; the deployer until ownership is transferred.
    address public owner;
    /// @notice The Tangle core contract, the only caller of the hooks. Zero until bound.
    address public tangleCore;
    /// @notice The blueprint this manager serves.
    uint64 public blueprintId;
    /// @notice The blueprint owner reported by Tangle; receives the developer payment share.
    address public blueprintOwner;

    /// @notice Operators registered through onRegister and not unregistered since.
    mapping(address => bool) public isRegisteredOperator;
    /// @notice Native-token earnings an operator can withdraw.
    mapping(address => uint256) public earnings;
    /// @notice Sum of the payments of calls that have no accepted result yet.
    uint256 public totalEscrowed;

    uint256[6] private _jobPrices;
    mapping(uint64 serviceId => mapping(uint64 jobCallId => JobCall)) private _jobCalls;

    // ═══════════════════════════════════════════════════════════════════════
    // MODIFIERS
    // ═══════════════════════════════════════════════════════════════════════

    modifier onlyFromTangle() {
        if (msg.sender != tangleCore) revert OnlyTangleAllowed(msg.sender, tangleCore);
        _;
    }

    modifier onlyOwner() {
        if (msg.sender != owner) revert NotOwner(msg.sender);
        _;
    }

    /// @dev For the payable hooks that carry no payment in this blueprint: value sent there
    ///      would be unaccounted, so it is refused.
    modifier noValue() {
        if (msg.value != 0) revert UnexpectedPayment(msg.value);
        _;
    }

    constructor() {
        owner = msg.sender;
        emit OwnershipTransferred(address(0), msg.sender);
    }

    // ═══════════════════════════════════════════════════════════════════════
    // OWNER
    // ═══════════════════════════════════════════════════════════════════════

    /// @notice Sets the price, in wei of the native token, that onJobCall requires for `job`.
    function setJobPrice(uint8 job, uint256 price) external onlyOwner {
        _checkJobIndex(job);
        _jobPrices[job] = price;
        emit JobPriceSet(job, price);
    }

    function transferOwnership(address newOwner) external onlyOwner {
        if (newOwner == address(0)) revert ZeroAddress();
        emit OwnershipTransferred(owner, newOwner);
        owner = newOwner;
    }

    /// @notice The price set for `job`.
    function jobPrice(uint8 job) external view returns (uint256) {
        _checkJobIndex(job);
        return _jobPrices[job];
    }

    // ═══════════════════════════════════════════════════════════════════════
    // OPERATOR EARNINGS
    // ═══════════════════════════════════════════════════════════════════════

    /// @notice Sends all of the caller's earnings to `to`.
    function withdrawEarnings(address payable to) external returns (uint256 amount) {
        if (to == address(0)) revert ZeroAddress();
        amount = earnings[msg.sender];
        if (amount == 0) revert NothingToWithdraw();
        earnings[msg.sender] = 0;
        emit EarningsWithdrawn(msg.sender, to, amount);
        (bool ok,) = to.call{ value: amount }("");
        if (!ok) revert WithdrawalFailed();
    }

    /// @notice A recorded job call; status is CALL_NONE for an unknown one.
    function getJobCall(uint64 serviceId, uint64 jobCallId) external view returns (JobCall memory) {
        return _jobCalls[serviceId][jobCallId];
    }

    // ═══════════════════════════════════════════════════════════════════════
    // INPUT FORMAT
    // ═══════════════════════════════════════════════════════════════════════

    /// @notice Decodes job inputs in either accepted encoding; reverts on anything else.
    /// @dev External so that onJobCall can turn any decoding failure into MalformedInputs.
    function decodeJobInputs(bytes calldata inputs)
        external
        pure
        returns (string memory zipUri, string memory sessionId, string memory buildTarget)
    {
        if (inputs.length < 32) revert MalformedInputs();
        bytes32 inputsHash = keccak256(inputs);
        if (uint256(bytes32(inputs[0:32])) == 0x20) {
            JobInputs memory tuple = abi.decode(inputs, (JobInputs));
            if (keccak256(abi.encode(tuple)) != inputsHash) revert MalformedInputs();
            return (tuple.zipUri, tuple.sessionId, tuple.buildTarget);
        }
        (zipUri, sessionId, buildTarget) = abi.decode(inputs, (string, string, string));
        if (keccak256(abi.encode(zipUri, sessionId, buildTarget)) != inputsHash) revert MalformedInputs();
    }

    /// @notice Decodes job 5's inputs in either accepted encoding; reverts on anything else.
    function decodeExecuteInputs(bytes calldata inputs) external pure returns (ExecuteInputs memory decoded) {
        if (inputs.length < 32) revert MalformedInputs();
        bytes32 inputsHash = keccak256(inputs);
        if (uint256(bytes32(inputs[0:32])) == 0x20) {
            decoded = abi.decode(inputs, (ExecuteInputs));
            if (keccak256(abi.encode(decoded)) != inputsHash) revert MalformedInputs();
            return decoded;
        }
        (decoded.code, decoded.artifact, decoded.stdin, decoded.timeoutSecs, decoded.memoryBytes) =
            abi.decode(inputs, (string, string, string, uint64, uint64));
        if (
            keccak256(
                abi.encode(decoded.code, decoded.artifact, decoded.stdin, decoded.timeoutSecs, decoded.memoryBytes)
            ) != inputsHash
        ) revert MalformedInputs();
    }

    /// @notice Checks job inputs like onJobCall does, without recording anything.
    /// @return sessionId The session UUID's 16 bytes (zero for job 5, which has none).
    function validateJobInputs(uint8 job, bytes calldata inputs) public view returns (bytes16 sessionId) {
        if (job == JOB_EXECUTE) {
            _validateExecuteInputs(inputs);
            return bytes16(0);
        }
        (,, sessionId,) = _validateJobInputs(job, inputs);
    }

    function _validateExecuteInputs(bytes calldata inputs) internal view returns (ExecuteInputs memory decoded) {
        if (inputs.length > MAX_INPUTS_LENGTH) revert InputsTooLarge(inputs.length, MAX_INPUTS_LENGTH);
        try this.decodeExecuteInputs(inputs) returns (ExecuteInputs memory d) {
            decoded = d;
        } catch {
            revert MalformedInputs();
        }
        bytes memory artifact = bytes(decoded.artifact);
        if ((bytes(decoded.code).length == 0) == (artifact.length == 0)) revert CodeOrArtifactRequired();
        if (artifact.length != 0) {
            if (artifact.length > MAX_ARTIFACT_LENGTH) revert InvalidArtifact();
            if (!_hasPrefix(artifact, "blake3:") && !_hasPrefix(artifact, "sha256:")) revert InvalidArtifact();
            if (_firstNonPrintable(artifact, 0) != NOT_FOUND) revert InvalidArtifact();
        }
        if (decoded.timeoutSecs > MAX_EXECUTE_TIMEOUT_SECS) revert InvalidTimeout(decoded.timeoutSecs);
        if (decoded.memoryBytes != 0 && decoded.memoryBytes < MIN_EXECUTE_MEMORY_BYTES) {
            revert InvalidMemory(decoded.memoryBytes);
        }
    }

    function _validateJobInputs(
        uint8 job,
        bytes calldata inputs
    )
        internal
        view
        returns (string memory zipUri, string memory sessionIdText, bytes16 sessionId, string memory buildTarget)
    {
        _checkJobIndex(job);
        if (job == JOB_EXECUTE) revert InvalidJobIndex(job); // its inputs: _validateExecuteInputs
        if (inputs.length > MAX_INPUTS_LENGTH) revert InputsTooLarge(inputs.length, MAX_INPUTS_LENGTH);
        try this.decodeJobInputs(inputs) returns (string memory z, string memory s, string memory b) {
            (zipUri, sessionIdText, buildTarget) = (z, s, b);
        } catch {
            revert MalformedInputs();
        }
        _validateZipUri(bytes(zipUri));
        sessionId = _parseSessionId(bytes(sessionIdText));
        _validateBuildTarget(job, bytes(buildTarget));
    }

    function _checkJobIndex(uint8 job) internal pure {
        if (job >= JOB_COUNT) revert InvalidJobIndex(job);
    }

    function _validateZipUri(bytes memory uri) internal pure {
        uint256 len = uri.length;
        if (len > MAX_ZIP_URI_LENGTH) revert ZipUriTooLong(len, MAX_ZIP_URI_LENGTH);
        uint256 start;
        if (_hasPrefix(uri, "https://")) start = 8;
        else if (_hasPrefix(uri, "ipfs://")) start = 7;
        else if (_hasPrefix(uri, "cas://")) start = 6;
        else revert UnsupportedZipUriScheme();
        if (len == start) revert ZipUriMissingLocation();
        uint256 bad = _firstNonPrintable(uri, start);
        if (bad != NOT_FOUND) revert InvalidZipUriCharacter(bad);
    }

    /// @dev Index of the first byte of `s` at or after `from` outside 0x21..0x7e (controls,
    ///      space, DEL, non-ASCII), or NOT_FOUND. Tests 32 bytes at a time with the classic
    ///      "has a byte less than n" / "has a zero byte" word tricks, exact as booleans, then
    ///      finds the byte one at a time; a 2 KiB URI costs a few thousand gas.
    function _firstNonPrintable(bytes memory s, uint256 from) internal pure returns (uint256) {
        uint256 len = s.length;
        uint256 i = from;
        unchecked {
            for (; i + 32 <= len; i += 32) {
                uint256 w;
                assembly ("memory-safe") {
                    w := mload(add(add(s, 0x20), i))
                }
                uint256 del = w ^ ALL_7F;
                uint256 flags = (w & ALL_80) | ((w - ALL_21) & ~w & ALL_80) | ((del - ALL_01) & ~del & ALL_80);
                if (flags != 0) break;
            }
            for (; i < len; ++i) {
                bytes1 c = s[i];
                if (c <= 0x20 || c >= 0x7f) return i;
            }
        }
        return NOT_FOUND;
    }

    function _hasPrefix(bytes memory s, bytes memory prefix) internal pure returns (bool) {
        if (s.length < prefix.length) return false;
        for (uint256 i; i < prefix.length;) {
            if (s[i] != prefix[i]) return false;
            unchecked {
                ++i;
            }
        }
        return true;
    }

    /// @dev Canonical UUID text: 8-4-4-4-12 lowercase hex digits separated by hyphens.
    function _parseSessionId(bytes memory s) internal pure returns (bytes16) {
        if (s.length != 36) revert InvalidSessionId();
        uint128 acc;
        for (uint256 i; i < 36;) {
            uint8 c = uint8(s[i]);
            if (i == 8 || i == 13 || i == 18 || i == 23) {
                if (c != 0x2d) revert InvalidSessionId(); // '-'
            } else {
                uint8 nibble;
                if (c >= 0x30 && c <= 0x39) nibble = c - 0x30; // '0'..'9'
                else if (c >= 0x61 && c <= 0x66) nibble = c - 0x57; // 'a'..'f'
                else revert InvalidSessionId();
                acc = (acc << 4) | nibble;
            }
            unchecked {
                ++i;
            }
        }
        return bytes16(acc);
    }

    function _validateBuildTarget(uint8 job, bytes memory target) internal pure {
        if (target.length == 0) return;
        bytes32 h = keccak256(target);
        if (h != keccak256("debug") && h != keccak256("release") && h != keccak256("check") && h != keccak256("clippy"))
        {
            revert UnknownBuildTarget();
        }
        if (job != JOB_COMPILE) revert BuildTargetNotAllowed(job);
    }

    // ═══════════════════════════════════════════════════════════════════════
    // BLUEPRINT LIFECYCLE
    // ═══════════════════════════════════════════════════════════════════════

    /// @inheritdoc IBlueprintServiceManager
    /// @dev One-shot binder, as in BlueprintServiceManagerBase. Tangle core passes itself as
    ///      `_tangleCore`, so the caller must be that address.
    function onBlueprintCreated(uint64 _blueprintId, address _owner, address _tangleCore) external {
        if (tangleCore != address(0)) revert AlreadyInitialized();
        if (msg.sender != _tangleCore) revert OnlyTangleAllowed(msg.sender, _tangleCore);
        blueprintId = _blueprintId;
        blueprintOwner = _owner;
        tangleCore = _tangleCore;
        emit BlueprintBound(_blueprintId, _owner, _tangleCore);
    }

    /// @inheritdoc IBlueprintServiceManager
    function onBinaryVersionPublished(uint64, Types.BinaryVersion calldata, string calldata) external onlyFromTangle { }

    /// @inheritdoc IBlueprintServiceManager
    function onOperatorBinaryAcked(uint64, uint64, address) external onlyFromTangle { }

    // ═══════════════════════════════════════════════════════════════════════
    // OPERATOR LIFECYCLE
    // ═══════════════════════════════════════════════════════════════════════

    /// @inheritdoc IBlueprintServiceManager
    function onRegister(address operator, bytes calldata) external payable onlyFromTangle noValue {
        if (operator == address(0)) revert ZeroAddress();
        isRegisteredOperator[operator] = true;
        emit OperatorRegistered(operator);
    }

    /// @inheritdoc IBlueprintServiceManager
    /// @dev Earnings stay withdrawable after unregistering.
    function onUnregister(address operator) external onlyFromTangle {
        isRegisteredOperator[operator] = false;
        emit OperatorUnregistered(operator);
    }

    /// @inheritdoc IBlueprintServiceManager
    function onUpdatePreferences(address, bytes calldata) external payable onlyFromTangle noValue { }

    // ═══════════════════════════════════════════════════════════════════════
    // SERVICE CONFIGURATION QUERIES (protocol defaults)
    // ═══════════════════════════════════════════════════════════════════════

    function getHeartbeatInterval(uint64) external pure returns (bool, uint64) {
        return (true, 0);
    }

    function getHeartbeatThreshold(uint64) external pure returns (bool, uint8) {
        return (true, 0);
    }

    function getSlashingWindow(uint64) external pure returns (bool, uint64) {
        return (true, 0);
    }

    function getExitConfig(uint64) external pure returns (bool, uint64, uint64, bool) {
        return (true, 0, 0, false);
    }

    function getNonPaymentTerminationPolicy(uint64) external pure returns (bool, uint64) {
        return (true, 0);
    }

    function forceRemoveAllowsBelowMin(uint64) external pure returns (bool) {
        return false;
    }

    function computeBillAdjustmentBps(uint64, uint64, uint64) external pure returns (uint16) {
        return 10_000;
    }

    // ═══════════════════════════════════════════════════════════════════════
    // SERVICE LIFECYCLE
    // ═══════════════════════════════════════════════════════════════════════

    /// @inheritdoc IBlueprintServiceManager
    /// @dev Every requested operator must be registered; service payments are in the native
    ///      token only.
    function onRequest(
        uint64,
        address,
        address[] calldata operators,
        bytes calldata,
        uint64,
        address paymentAsset,
        uint256
    )
        external
        payable
        onlyFromTangle
        noValue
    {
        if (paymentAsset != address(0)) revert UnsupportedPaymentAsset(paymentAsset);
        for (uint256 i; i < operators.length;) {
            if (!isRegisteredOperator[operators[i]]) revert NotRegisteredOperator(operators[i]);
            unchecked {
                ++i;
            }
        }
    }

    /// @inheritdoc IBlueprintServiceManager
    function onApprove(address, uint64, uint8) external payable onlyFromTangle noValue { }

    /// @inheritdoc IBlueprintServiceManager
    function onReject(address, uint64) external onlyFromTangle { }

    /// @inheritdoc IBlueprintServiceManager
    function onServiceInitialized(
        uint64,
        uint64,
        uint64,
        address,
        address[] calldata,
        uint64
    )
        external
        onlyFromTangle
    { }

    /// @inheritdoc IBlueprintServiceManager
    function onServiceTermination(uint64, address) external onlyFromTangle { }

    // ═══════════════════════════════════════════════════════════════════════
    // DYNAMIC MEMBERSHIP
    // ═══════════════════════════════════════════════════════════════════════

    /// @inheritdoc IBlueprintServiceManager
    function canJoin(uint64, address operator) external view returns (bool) {
        return isRegisteredOperator[operator];
    }

    /// @inheritdoc IBlueprintServiceManager
    function onOperatorJoined(uint64, address, uint16) external onlyFromTangle { }

    /// @inheritdoc IBlueprintServiceManager
    function canLeave(uint64, address) external pure returns (bool) {
        return true;
    }

    /// @inheritdoc IBlueprintServiceManager
    function onOperatorLeft(uint64, address) external onlyFromTangle { }

    /// @inheritdoc IBlueprintServiceManager
    function onExitScheduled(uint64, address, uint64) external onlyFromTangle { }

    /// @inheritdoc IBlueprintServiceManager
    function onExitCanceled(uint64, address) external onlyFromTangle { }

    // ═══════════════════════════════════════════════════════════════════════
    // JOB LIFECYCLE
    // ═══════════════════════════════════════════════════════════════════════

    /// @inheritdoc IBlueprintServiceManager
    /// @dev Validates the inputs (see the contract doc), requires msg.value >= the job's price,
    ///      escrows msg.value and records keccak256(inputs) for onJobResult.
    function onJobCall(
        uint64 serviceId,
        uint8 job,
        uint64 jobCallId,
        bytes calldata inputs
    )
        external
        payable
        onlyFromTangle
    {
        if (job == JOB_EXECUTE) {
            ExecuteInputs memory run = _validateExecuteInputs(inputs);
            bool isArtifact = bytes(run.artifact).length != 0;
            bytes32 programHash = keccak256(isArtifact ? bytes(run.artifact) : bytes(run.code));
            _recordJobCall(serviceId, job, jobCallId, inputs, bytes16(0));
            emit ExecutionAccepted(
                serviceId, jobCallId, programHash, isArtifact, run.timeoutSecs, run.memoryBytes, msg.value
            );
            return;
        }
        (string memory zipUri,, bytes16 sessionId, string memory buildTarget) = _validateJobInputs(job, inputs);
        _recordJobCall(serviceId, job, jobCallId, inputs, sessionId);
        emit JobAccepted(serviceId, jobCallId, sessionId, job, zipUri, buildTarget, msg.value);
    }

    /// @dev Checks the payment and records a validated call, escrowing msg.value.
    function _recordJobCall(
        uint64 serviceId,
        uint8 job,
        uint64 jobCallId,
        bytes calldata inputs,
        bytes16 sessionId
    )
        internal
    {
        uint256 price = _jobPrices[job];
        if (msg.value < price) revert InsufficientPayment(job, price, msg.value);
        JobCall storage record = _jobCalls[serviceId][jobCallId];
        if (record.status != CALL_NONE) revert JobCallAlreadyRecorded(serviceId, jobCallId);

        record.inputsHash = keccak256(inputs);
        record.payment = msg.value;
        record.sessionId = sessionId;
        record.job = job;
        record.status = CALL_PENDING;
        totalEscrowed += msg.value;
    }

    /// @inheritdoc IBlueprintServiceManager
    /// @dev Accepts the first result from a registered operator whose job index and inputs hash
    ///      match the call, and moves the call's escrowed payment to that operator's earnings.
    function onJobResult(
        uint64 serviceId,
        uint8 job,
        uint64 jobCallId,
        address operator,
        bytes32 inputsHash,
        bytes calldata outputs
    )
        external
        payable
        onlyFromTangle
        noValue
    {
        if (!isRegisteredOperator[operator]) revert NotRegisteredOperator(operator);
        JobCall storage record = _jobCalls[serviceId][jobCallId];
        uint8 status = record.status;
        if (status == CALL_NONE) revert UnknownJobCall(serviceId, jobCallId);
        if (status == CALL_COMPLETED) revert ResultAlreadyPosted(serviceId, jobCallId);
        if (record.job != job) revert JobIndexMismatch(record.job, job);
        if (record.inputsHash != inputsHash) revert InputsHashMismatch(record.inputsHash, inputsHash);

        record.status = CALL_COMPLETED;
        uint256 payment = record.payment;
        totalEscrowed -= payment;
        earnings[operator] += payment;

        emit JobResultPosted(serviceId, jobCallId, record.sessionId, job, operator, keccak256(outputs), payment);
    }

    // ═══════════════════════════════════════════════════════════════════════
    // SLASHING
    // ═══════════════════════════════════════════════════════════════════════

    /// @inheritdoc IBlueprintServiceManager
    function onUnappliedSlash(uint64, bytes calldata, uint8) external onlyFromTangle { }

    /// @inheritdoc IBlueprintServiceManager
    function onSlash(uint64, bytes calldata, uint8) external onlyFromTangle { }

    // ═══════════════════════════════════════════════════════════════════════
    // AUTHORIZATION AND PAYMENT QUERIES
    // ═══════════════════════════════════════════════════════════════════════

    function querySlashingOrigin(uint64) external view returns (address) {
        return address(this);
    }

    function queryDisputeOrigin(uint64) external view returns (address) {
        return address(this);
    }

    function queryDeveloperPaymentAddress(uint64) external view returns (address payable) {
        return payable(blueprintOwner);
    }

    /// @dev Native token only, matching the per-job prices.
    function queryIsPaymentAssetAllowed(uint64, address asset) external pure returns (bool) {
        return asset == address(0);
    }

    // ═══════════════════════════════════════════════════════════════════════
    // JOB CONFIGURATION AND AGGREGATION (single result, no BLS aggregation)
    // ═══════════════════════════════════════════════════════════════════════

    function getRequiredResultCount(uint64, uint8) external pure returns (uint32) {
        return 1;
    }

    function requiresAggregation(uint64, uint8) external pure returns (bool) {
        return false;
    }

    function getAggregationThreshold(uint64, uint8) external pure returns (uint16, uint8) {
        return (6700, 0);
    }

    /// @inheritdoc IBlueprintServiceManager
    function onAggregatedResult(
        uint64,
        uint8,
        uint64,
        bytes calldata,
        uint256,
        uint256[2] calldata,
        uint256[4] calldata
    )
        external
        onlyFromTangle
    { }

    function getMinOperatorStake() external pure returns (bool, uint256) {
        return (true, 0);
    }
}
