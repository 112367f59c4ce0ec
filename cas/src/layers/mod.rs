//! Layers: [`crate::Store`] implementations that wrap other stores, so a feature is written once
//! and put over whichever backend the composition root chose.
//!
//! - [`tiered`]: a local filesystem tier in front of a shared slow one (a bucket).

pub mod tiered;
