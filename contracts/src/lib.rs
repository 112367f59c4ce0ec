//! The on-chain side of the blueprint: `BuildAgentServiceManager.sol`, compiled with solc-js
//! and tested on a real EVM. Not yet implemented (see the contracts issue).
