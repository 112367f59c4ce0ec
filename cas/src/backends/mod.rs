//! Backends of the seams ([`crate::seams`]) for a scaled-out deployment, one module each; the
//! embedded backends live beside the types they wrap ([`crate::store`],
//! [`crate::action_cache`], [`crate::access`]).

pub mod postgres;
