//! Who asked for a job: the identity every request carries into the executor.
//!
//! Why: rba serves strangers on one node. The executor's decisions that one tenant could use
//! against another — which target dir (slot) a job may reuse, which action-cache entries it is
//! served, under which namespace its result is stored — are taken from this one value, never
//! from anything the client names. Each face maps its own authenticated identity to a
//! `Tenant`: a libp2p PeerId, a REAPI bearer token's name, a Tangle service and caller, or the
//! local user of an embedded node.

use std::fmt;

/// An authenticated requester. The text is `<kind>:<id>` (`peer:12D3…`, `token:ci`,
/// `tangle:7/0xabc…`, `local`), stable across restarts, and never chosen by the client beyond
/// the identity it proved.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tenant(String);

impl Tenant {
    /// The user of an embedded node (`rba build` without `--remote`): the only tenant there.
    pub fn local() -> Tenant {
        Tenant("local".to_string())
    }

    /// A libp2p peer, by the PeerId its connection proved.
    pub fn peer(peer_id: impl fmt::Display) -> Tenant {
        Tenant(format!("peer:{peer_id}"))
    }

    /// A REAPI / HTTP client, by the name of the bearer token it presented.
    pub fn token(name: impl fmt::Display) -> Tenant {
        Tenant(format!("token:{name}"))
    }

    /// An anonymous client of a server that runs without tokens (loopback only).
    pub fn anonymous() -> Tenant {
        Tenant("anonymous".to_string())
    }

    /// A Tangle caller of one service.
    pub fn tangle(service_id: u64, caller: impl fmt::Display) -> Tenant {
        Tenant(format!("tangle:{service_id}/{caller}"))
    }

    /// A tenant read back from a store only the executor writes (the job queue,
    /// [`crate::scheduler`]), as [`Tenant::as_str`] gave it: never from a client's words.
    pub fn from_stored(text: impl Into<String>) -> Tenant {
        Tenant(text.into())
    }

    /// The identity as text (`peer:…`, `token:…`, …).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
