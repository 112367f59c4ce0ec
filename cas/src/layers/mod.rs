//! Layers: today's store features as implementations of the seams ([`crate::seams`]) that wrap
//! an inner one, so a feature is written once and put over whichever backend the composition
//! root chose. One concern per module.
//!
//! - [`complete`]: an action-cache hit only when every blob it names is present (REAPI's
//!   completeness rule), over any store.
//! - [`tiered`]: a local filesystem tier in front of a shared slow one (a bucket).
//! - [`peer`]: the stores of trusted operators, behind everything else: what this node lacks,
//!   fetched and verified before it is kept.

pub mod complete;
pub mod peer;
pub mod tiered;
