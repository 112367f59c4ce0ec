// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.26;

/// @notice Types used by the Tangle hook interface (mirrors tnt-core's `Types` library).
library Types {
    /// @notice A published blueprint binary version (`Types.BinaryVersion` in tnt-core).
    struct BinaryVersion {
        uint64 versionId;
        uint64 publishedAt;
        bool deprecated;
        bytes32 sha256Hash;
        bytes32 attestationHash;
    }
}

/// @title IBlueprintServiceManager
/// @notice The hooks Tangle core calls on a blueprint's service manager (BSM).
/// @dev Written from the ABI shipped by the `tnt-core-bindings` crate, version 0.20.0
///      (tnt-core commit 9a62f12a82a0130f7c0090d0fb34240138a5b49c), which is what
///      blueprint-sdk 0.2.0-alpha.20 links against. tnt-core's Solidity sources are not
///      packaged in any registry, so this file is maintained by hand; the Rust test
///      `abi_compat` fails if any selector, parameter type, return type or state
///      mutability here drifts from that crate's `abi/IBlueprintServiceManager.json`.
///
///      Lifecycle: onBlueprintCreated → onRegister (per operator) → onRequest →
///      onApprove/onReject → onServiceInitialized → onJobCall → onJobResult →
///      onServiceTermination. Every hook except onBlueprintCreated is called by the
///      Tangle core contract that was bound in onBlueprintCreated.
interface IBlueprintServiceManager {
    // ── blueprint lifecycle ────────────────────────────────────────────────
    function onBlueprintCreated(uint64 blueprintId, address owner, address tangleCore) external;

    function onBinaryVersionPublished(
        uint64 blueprintId,
        Types.BinaryVersion calldata version,
        string calldata binaryUri
    )
        external;

    function onOperatorBinaryAcked(uint64 serviceId, uint64 versionId, address operator) external;

    // ── operator lifecycle ─────────────────────────────────────────────────
    function onRegister(address operator, bytes calldata registrationInputs) external payable;

    function onUnregister(address operator) external;

    function onUpdatePreferences(address operator, bytes calldata newPreferences) external payable;

    // ── service configuration queries ──────────────────────────────────────
    function getHeartbeatInterval(uint64 serviceId) external view returns (bool useDefault, uint64 interval);

    function getHeartbeatThreshold(uint64 serviceId) external view returns (bool useDefault, uint8 threshold);

    function getSlashingWindow(uint64 serviceId) external view returns (bool useDefault, uint64 window);

    function getExitConfig(uint64 serviceId)
        external
        view
        returns (bool useDefault, uint64 minCommitmentDuration, uint64 exitQueueDuration, bool forceExitAllowed);

    function getNonPaymentTerminationPolicy(uint64 serviceId)
        external
        view
        returns (bool useDefault, uint64 graceIntervals);

    function forceRemoveAllowsBelowMin(uint64 serviceId) external view returns (bool);

    function computeBillAdjustmentBps(
        uint64 serviceId,
        uint64 periodStart,
        uint64 periodEnd
    )
        external
        view
        returns (uint16);

    // ── service lifecycle ──────────────────────────────────────────────────
    function onRequest(
        uint64 requestId,
        address requester,
        address[] calldata operators,
        bytes calldata requestInputs,
        uint64 ttl,
        address paymentAsset,
        uint256 paymentAmount
    )
        external
        payable;

    function onApprove(address operator, uint64 requestId, uint8 stakingPercent) external payable;

    function onReject(address operator, uint64 requestId) external;

    function onServiceInitialized(
        uint64 blueprintId,
        uint64 requestId,
        uint64 serviceId,
        address owner,
        address[] calldata permittedCallers,
        uint64 ttl
    )
        external;

    function onServiceTermination(uint64 serviceId, address owner) external;

    // ── dynamic membership ─────────────────────────────────────────────────
    function canJoin(uint64 serviceId, address operator) external view returns (bool);

    function onOperatorJoined(uint64 serviceId, address operator, uint16 exposureBps) external;

    function canLeave(uint64 serviceId, address operator) external view returns (bool);

    function onOperatorLeft(uint64 serviceId, address operator) external;

    function onExitScheduled(uint64 serviceId, address operator, uint64 executeAfter) external;

    function onExitCanceled(uint64 serviceId, address operator) external;

    // ── job lifecycle ──────────────────────────────────────────────────────
    function onJobCall(uint64 serviceId, uint8 job, uint64 jobCallId, bytes calldata inputs) external payable;

    /// @param inputsHash keccak256 of the job's inputs as recorded by Tangle at submission time.
    function onJobResult(
        uint64 serviceId,
        uint8 job,
        uint64 jobCallId,
        address operator,
        bytes32 inputsHash,
        bytes calldata outputs
    )
        external
        payable;

    // ── slashing ───────────────────────────────────────────────────────────
    function onUnappliedSlash(uint64 serviceId, bytes calldata offender, uint8 slashPercent) external;

    function onSlash(uint64 serviceId, bytes calldata offender, uint8 slashPercent) external;

    // ── authorization queries ──────────────────────────────────────────────
    function querySlashingOrigin(uint64 serviceId) external view returns (address);

    function queryDisputeOrigin(uint64 serviceId) external view returns (address);

    // ── payment queries ────────────────────────────────────────────────────
    function queryDeveloperPaymentAddress(uint64 serviceId) external view returns (address payable);

    function queryIsPaymentAssetAllowed(uint64 serviceId, address asset) external view returns (bool);

    // ── job configuration ──────────────────────────────────────────────────
    function getRequiredResultCount(uint64 serviceId, uint8 jobIndex) external view returns (uint32);

    // ── BLS aggregation ────────────────────────────────────────────────────
    function requiresAggregation(uint64 serviceId, uint8 jobIndex) external view returns (bool);

    function getAggregationThreshold(
        uint64 serviceId,
        uint8 jobIndex
    )
        external
        view
        returns (uint16 thresholdBps, uint8 thresholdType);

    function onAggregatedResult(
        uint64 serviceId,
        uint8 job,
        uint64 jobCallId,
        bytes calldata output,
        uint256 signerBitmap,
        uint256[2] calldata aggregatedSignature,
        uint256[4] calldata aggregatedPubkey
    )
        external;

    // ── stake requirements ─────────────────────────────────────────────────
    function getMinOperatorStake() external view returns (bool useDefault, uint256 minStake);
}
