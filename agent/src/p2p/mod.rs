//! libp2p for the node and the client: one swarm (TCP + noise + yamux, and QUIC) carrying
//! plain streams (`libp2p-stream`) for our two protocols.
//!
//! Why: the session and blob protocols are long-lived, ordered byte streams with our own
//! frames ([`frame`]), not request/response pairs, so each protocol handler owns a stream and
//! reads and writes at its own pace. This module owns the swarm task (listening, dialing,
//! connection errors turned into one clear message) and the node's persisted Ed25519 identity,
//! and signs/verifies what nodes sign.
//!
//! - [`frame`]: length-delimited protobuf frames with a size cap.
//! - [`session`]: `/rba/session/1.0.0`, client and node sides.
//! - [`blobs`]: `/rba/cas/1.0.0`, client and node sides (upload, Has, Get, signed action results).

pub mod blobs;
pub mod frame;
pub mod session;
pub mod trusted;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::identity::{Keypair, PublicKey};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

/// The session protocol id.
pub const SESSION_PROTOCOL: StreamProtocol = StreamProtocol::new(rba_proto::protocol_ids::SESSION);
/// The blob protocol id.
pub const CAS_PROTOCOL: StreamProtocol = StreamProtocol::new(rba_proto::protocol_ids::CAS);

/// Loads the Ed25519 identity stored at `path`, creating it (mode 0600) on first use.
pub fn load_or_create_identity(path: &Path) -> anyhow::Result<Keypair> {
    match std::fs::read(path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes)
            .with_context(|| format!("{} is not a libp2p identity key", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let keypair = Keypair::generate_ed25519();
            let bytes = keypair
                .to_protobuf_encoding()
                .context("encoding the new identity")?;
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            let tmp = path.with_extension("tmp");
            {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .with_context(|| format!("creating {}", tmp.display()))?;
                file.write_all(&bytes)?;
                file.sync_all()?;
            }
            std::fs::rename(&tmp, path)
                .with_context(|| format!("storing the identity at {}", path.display()))?;
            Ok(keypair)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Signs `message` with `keypair`; returns (signature, protobuf-encoded public key).
pub fn sign(keypair: &Keypair, message: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let signature = keypair
        .sign(message)
        .expect("Ed25519 signing does not fail");
    (signature, keypair.public().encode_protobuf())
}

/// Verifies a signature made by [`sign`]; returns the signer's PeerId.
pub fn verify(public_key: &[u8], message: &[u8], signature: &[u8]) -> anyhow::Result<PeerId> {
    let key = PublicKey::try_decode_protobuf(public_key).context("malformed signer public key")?;
    anyhow::ensure!(key.verify(message, signature), "bad signature");
    Ok(key.to_peer_id())
}

/// Splits `…/p2p/PEERID` into the address before it and the PeerId.
pub fn split_peer_multiaddr(text: &str) -> anyhow::Result<(Multiaddr, PeerId)> {
    let mut address: Multiaddr = text.parse().map_err(|e| {
        anyhow::anyhow!("{text:?} is not a multiaddr ({e}); expected /ip4/HOST/tcp/PORT/p2p/PEERID")
    })?;
    match address.pop() {
        Some(Protocol::P2p(peer)) => Ok((address, peer)),
        _ => anyhow::bail!("{text:?} does not end with /p2p/PEERID: the node's PeerId is needed"),
    }
}

/// Why dialing a peer failed, worded for the user.
fn describe_dial_error(peer: PeerId, error: &DialError) -> String {
    match error {
        DialError::WrongPeerId { obtained, address } => {
            format!("wrong PeerId: the node at {address} is {obtained}, not {peer}")
        }
        DialError::Transport(errors) => {
            let addresses: Vec<String> = errors.iter().map(|(a, _)| a.to_string()).collect();
            let reason = errors
                .first()
                .map(|(_, e)| transport_reason(e))
                .unwrap_or_default();
            format!(
                "node unreachable at {}{reason}",
                if addresses.is_empty() {
                    "its addresses".to_string()
                } else {
                    addresses.join(", ")
                }
            )
        }
        DialError::NoAddresses => format!("no address known for {peer}"),
        DialError::LocalPeerId { .. } => "refusing to dial ourselves".to_string(),
        other => format!("cannot connect to {peer}: {other}"),
    }
}

fn transport_reason(error: &libp2p::TransportError<std::io::Error>) -> String {
    match error {
        libp2p::TransportError::Other(e) => {
            let mut source: Option<&dyn std::error::Error> = Some(e);
            let mut last = e.to_string();
            while let Some(s) = source {
                last = s.to_string();
                source = s.source();
            }
            format!(" ({last})")
        }
        libp2p::TransportError::MultiaddrNotSupported(a) => {
            format!(" (unsupported address {a})")
        }
    }
}

enum Command {
    Listen(Multiaddr, oneshot::Sender<anyhow::Result<ListenerId>>),
    Dial(PeerId, Vec<Multiaddr>, oneshot::Sender<Result<(), String>>),
    Disconnect(PeerId),
}

/// A running swarm: its identity, a stream control, and a command channel to its task.
#[derive(Clone)]
pub struct Network {
    peer_id: PeerId,
    keypair: Keypair,
    control: libp2p_stream::Control,
    commands: mpsc::Sender<Command>,
    listen_addrs: watch::Receiver<Vec<Multiaddr>>,
    shutdown: watch::Sender<bool>,
    closed: broadcast::Sender<PeerId>,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("peer_id", &self.peer_id)
            .finish()
    }
}

impl Network {
    /// Builds the swarm with `keypair` and spawns its task (listening on nothing yet).
    pub fn start(keypair: Keypair, idle_timeout: Duration) -> anyhow::Result<Self> {
        let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair.clone())
            .with_tokio()
            .with_tcp(
                libp2p::tcp::Config::default().nodelay(true),
                libp2p::noise::Config::new,
                libp2p::yamux::Config::default,
            )
            .context("setting up TCP + noise + yamux")?
            .with_quic()
            // `/dns4/…`, `/dns6/…` and `/dns/…` addresses resolve (system resolver config).
            .with_dns()
            .context("setting up DNS resolution")?
            .with_behaviour(|_| libp2p_stream::Behaviour::new())
            .context("setting up the stream behaviour")?
            .with_swarm_config(|config| config.with_idle_connection_timeout(idle_timeout))
            .build();
        let control = swarm.behaviour().new_control();
        let peer_id = *swarm.local_peer_id();
        let (commands, receiver) = mpsc::channel(64);
        let (addrs_tx, listen_addrs) = watch::channel(Vec::new());
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (closed, _) = broadcast::channel(64);
        // The swarm runs until every Network handle is gone or shutdown is asked for.
        tokio::spawn(drive(
            swarm,
            receiver,
            addrs_tx,
            shutdown_rx,
            closed.clone(),
        ));
        Ok(Network {
            peer_id,
            keypair,
            control,
            commands,
            listen_addrs,
            shutdown,
            closed,
        })
    }

    /// Our PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Our identity (for signing).
    pub fn keypair(&self) -> &Keypair {
        &self.keypair
    }

    /// A control to open and accept streams.
    pub fn control(&self) -> libp2p_stream::Control {
        self.control.clone()
    }

    /// Starts listening on `address`; returns once the listener reported its first address.
    pub async fn listen(&self, address: Multiaddr) -> anyhow::Result<()> {
        let before = self.listen_addrs.borrow().len();
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Listen(address.clone(), tx))
            .await
            .context("the network task stopped")?;
        rx.await.context("the network task stopped")??;
        let mut addrs = self.listen_addrs.clone();
        tokio::time::timeout(
            Duration::from_secs(10),
            addrs.wait_for(|a| a.len() > before),
        )
        .await
        .with_context(|| format!("listening on {address} timed out"))?
        .context("the network task stopped")?;
        Ok(())
    }

    /// The addresses we listen on.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.listen_addrs.borrow().clone()
    }

    /// Our listen addresses with `/p2p/PEERID` appended, as clients pass them to `--remote`.
    pub fn dialable_addrs(&self) -> Vec<Multiaddr> {
        self.listen_addrs()
            .into_iter()
            .map(|a| a.with(Protocol::P2p(self.peer_id)))
            .collect()
    }

    /// Connects to `peer` at `addresses` (no-op when already connected).
    pub async fn dial(&self, peer: PeerId, addresses: Vec<Multiaddr>) -> anyhow::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Dial(peer, addresses, tx))
            .await
            .context("the network task stopped")?;
        rx.await
            .context("the network task stopped")?
            .map_err(anyhow::Error::msg)
    }

    /// Closes every connection to `peer` (its streams fail on both ends).
    pub async fn disconnect(&self, peer: PeerId) {
        let _ = self.commands.send(Command::Disconnect(peer)).await;
    }

    /// Opens a stream of `protocol` to a connected (or known) peer.
    pub async fn open(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
    ) -> anyhow::Result<libp2p::Stream> {
        self.control
            .clone()
            .open_stream(peer, protocol.clone())
            .await
            .map_err(|e| match e {
                libp2p_stream::OpenStreamError::UnsupportedProtocol(p) => {
                    anyhow::anyhow!("{peer} does not speak {p}: is it an rba node?")
                }
                other => anyhow::anyhow!("opening {protocol} to {peer}: {other}"),
            })
    }

    /// PeerIds whose last connection closed, as it happens. Streams of a connection closed
    /// locally are not always woken, so readers race their reads against this.
    pub fn closed_connections(&self) -> broadcast::Receiver<PeerId> {
        self.closed.subscribe()
    }

    /// Stops the swarm task (connections close).
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }
}

async fn drive(
    mut swarm: Swarm<libp2p_stream::Behaviour>,
    mut commands: mpsc::Receiver<Command>,
    addrs: watch::Sender<Vec<Multiaddr>>,
    mut shutdown: watch::Receiver<bool>,
    closed: broadcast::Sender<PeerId>,
) {
    let mut pending: HashMap<ConnectionId, (PeerId, oneshot::Sender<Result<(), String>>)> =
        HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => break,
            command = commands.recv() => match command {
                None => break,
                Some(Command::Listen(address, reply)) => {
                    let result = swarm
                        .listen_on(address.clone())
                        .with_context(|| format!("cannot listen on {address}"));
                    let _ = reply.send(result);
                }
                Some(Command::Dial(peer, addresses, reply)) => {
                    if swarm.is_connected(&peer) {
                        let _ = reply.send(Ok(()));
                        continue;
                    }
                    let opts = DialOpts::peer_id(peer)
                        .addresses(addresses)
                        .condition(PeerCondition::Always)
                        .build();
                    let id = opts.connection_id();
                    match swarm.dial(opts) {
                        Ok(()) => {
                            pending.insert(id, (peer, reply));
                        }
                        Err(error) => {
                            let _ = reply.send(Err(describe_dial_error(peer, &error)));
                        }
                    }
                }
                Some(Command::Disconnect(peer)) => {
                    let _ = swarm.disconnect_peer_id(peer);
                }
            },
            event = swarm.select_next_some() => match event {
                SwarmEvent::NewListenAddr { address, .. } => {
                    tracing::info!(%address, "listening");
                    addrs.send_modify(|a| a.push(address));
                }
                SwarmEvent::ExpiredListenAddr { address, .. } => {
                    addrs.send_modify(|a| a.retain(|x| x != &address));
                }
                SwarmEvent::ConnectionEstablished { connection_id, peer_id, .. } => {
                    tracing::debug!(%peer_id, "connected");
                    if let Some((_, reply)) = pending.remove(&connection_id) {
                        let _ = reply.send(Ok(()));
                    }
                }
                SwarmEvent::OutgoingConnectionError { connection_id, error, peer_id } => {
                    tracing::debug!(?peer_id, %error, "dial failed");
                    if let Some((peer, reply)) = pending.remove(&connection_id) {
                        let _ = reply.send(Err(describe_dial_error(peer, &error)));
                    }
                }
                SwarmEvent::IncomingConnectionError { error, .. } => {
                    tracing::debug!(%error, "incoming connection failed");
                }
                SwarmEvent::ConnectionClosed { peer_id, cause, num_established, .. } => {
                    tracing::debug!(%peer_id, ?cause, "connection closed");
                    if num_established == 0 {
                        let _ = closed.send(peer_id);
                    }
                }
                _ => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_persists_and_signatures_verify() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id/identity.key");
        let first = load_or_create_identity(&path).unwrap();
        let again = load_or_create_identity(&path).unwrap();
        assert_eq!(first.public().to_peer_id(), again.public().to_peer_id());
        let (signature, key) = sign(&first, b"body");
        assert_eq!(
            verify(&key, b"body", &signature).unwrap(),
            first.public().to_peer_id()
        );
        assert!(verify(&key, b"other", &signature).is_err());
        std::fs::write(&path, b"junk").unwrap();
        assert!(load_or_create_identity(&path).is_err());
    }

    #[tokio::test]
    async fn dns_multiaddrs_dial() {
        let node = Network::start(Keypair::generate_ed25519(), Duration::from_secs(30)).unwrap();
        node.listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
            .await
            .unwrap();
        let port = node
            .listen_addrs()
            .iter()
            .flat_map(|a| a.iter())
            .find_map(|p| match p {
                libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
                _ => None,
            })
            .unwrap();
        let client = Network::start(Keypair::generate_ed25519(), Duration::from_secs(30)).unwrap();
        let address: Multiaddr = format!("/dns4/localhost/tcp/{port}").parse().unwrap();
        tokio::time::timeout(
            Duration::from_secs(20),
            client.dial(node.peer_id(), vec![address]),
        )
        .await
        .expect("dialling by name does not hang")
        .expect("a /dns4/localhost address dials");
        let unknown: Multiaddr = "/dns4/no-such-host.invalid/tcp/1".parse().unwrap();
        let other = Keypair::generate_ed25519().public().to_peer_id();
        let error =
            tokio::time::timeout(Duration::from_secs(30), client.dial(other, vec![unknown]))
                .await
                .expect("a failed lookup does not hang")
                .unwrap_err();
        assert!(
            error.to_string().contains("no-such-host.invalid"),
            "{error}"
        );
    }

    #[test]
    fn peer_multiaddrs() {
        let peer = Keypair::generate_ed25519().public().to_peer_id();
        let (address, parsed) =
            split_peer_multiaddr(&format!("/ip4/127.0.0.1/tcp/5/p2p/{peer}")).unwrap();
        assert_eq!(parsed, peer);
        assert_eq!(address.to_string(), "/ip4/127.0.0.1/tcp/5");
        let error = split_peer_multiaddr("/ip4/127.0.0.1/tcp/5").unwrap_err();
        assert!(error.to_string().contains("/p2p/PEERID"));
        assert!(split_peer_multiaddr("nonsense").is_err());
    }
}
