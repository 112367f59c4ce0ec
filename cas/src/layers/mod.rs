//! Today's store features as layers over the seams ([`crate::seams`]), one concern per module,
//! each wrapping an inner implementation.

pub mod complete;
