//! EVM tests of BuildAgentServiceManager: the compiled bytecode deployed into revm and driven
//! through its hooks the way Tangle core calls them.

mod abi_compat;
mod artifact;
mod execute;
mod harness;
mod job_call;
mod job_result;
mod lifecycle;
mod payments;
