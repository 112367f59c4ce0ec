//! The node's trusted peers as sources of the store's peer tier
//! ([`rba_cas::layers::peer`]): how to reach one (dial its addresses, open the blob protocol)
//! and what its word is worth (an action result counts only when the peer itself signed it,
//! for the action asked). Fetching, verifying and keeping what a peer sends is the store
//! layer's business, not this module's.

use std::fmt;

use anyhow::Context;
use async_trait::async_trait;
use bytes::Bytes;
use libp2p::{Multiaddr, PeerId};
use rba_cas::Digest;
use rba_cas::layers::peer::{PeerConnection, PeerError, PeerSource};
use rba_executor::runner::CARGO_INSTANCE;
use rba_proto::Message;
use rba_proto::rba::v1::SignedActionResult;
use rba_proto::reapi::ActionResult;

use super::blobs::BlobClient;
use super::{CAS_PROTOCOL, Network};

/// A peer of `trusted_peers` as a source of blobs and results: its id, where it listens, and the node's network to reach it.
#[derive(Clone)]
pub struct TrustedSource {
    id: PeerId,
    addresses: Vec<Multiaddr>,
    network: Network,
    max_frame: usize,
}

impl TrustedSource {
    /// Reaches `id` at `addresses` through `network`, frames up to `max_frame` bytes.
    pub fn new(id: PeerId, addresses: Vec<Multiaddr>, network: Network, max_frame: usize) -> Self {
        TrustedSource {
            id,
            addresses,
            network,
            max_frame,
        }
    }
}

impl fmt::Debug for TrustedSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustedSource")
            .field("id", &self.id)
            .field("addresses", &self.addresses)
            .finish()
    }
}

#[async_trait]
impl PeerSource for TrustedSource {
    fn name(&self) -> String {
        self.id.to_string()
    }

    async fn connect(&self) -> Result<Box<dyn PeerConnection>, PeerError> {
        self.network.dial(self.id, self.addresses.clone()).await?;
        let stream = self.network.open(self.id, CAS_PROTOCOL).await?;
        Ok(Box::new(TrustedConnection {
            client: BlobClient::new(stream, self.id, self.max_frame),
            peer: self.id,
        }))
    }
}

struct TrustedConnection {
    client: BlobClient,
    peer: PeerId,
}

#[async_trait]
impl PeerConnection for TrustedConnection {
    async fn request_blob(&mut self, digest: Digest) -> Result<(), PeerError> {
        Ok(self.client.request_blob(digest).await?)
    }

    async fn next_chunk(&mut self) -> Result<Option<Bytes>, PeerError> {
        Ok(self.client.next_chunk().await?.map(Bytes::from))
    }

    async fn action_result(
        &mut self,
        instance: &str,
        action: Digest,
    ) -> Result<Option<ActionResult>, PeerError> {
        let Some(signed) = self.client.get_action_result(instance, action).await? else {
            return Ok(None);
        };
        Ok(Some(verify_signed_result(&signed, self.peer, action)?))
    }
}

/// Checks a peer's signed action result: signed by `peer` itself, for the asked action.
pub fn verify_signed_result(
    signed: &SignedActionResult,
    peer: PeerId,
    action_digest: Digest,
) -> anyhow::Result<ActionResult> {
    let body = signed.body.as_ref().context("unsigned action result")?;
    let signer = super::verify(
        &signed.signer_public_key,
        &body.encode_to_vec(),
        &signed.signature,
    )?;
    anyhow::ensure!(
        signer == peer,
        "action result signed by {signer}, not by the trusted peer {peer}"
    );
    anyhow::ensure!(
        body.instance == CARGO_INSTANCE
            && body
                .action_digest
                .as_ref()
                .and_then(|d| Digest::from_wire(d).ok())
                == Some(action_digest),
        "the signed result is for another action"
    );
    ActionResult::decode(body.action_result.as_slice()).context("malformed ActionResult")
}
