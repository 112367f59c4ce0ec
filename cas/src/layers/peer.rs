//! Peer fetch: the slowest tier, the stores of operators this one trusts. What a submission
//! lacks here (a blob, a whole input tree, an action result) is asked of each trusted peer in
//! turn, within a time bound per peer, and kept only once it is proven: every blob goes through
//! this store's verifying writer (bytes that do not hash to the asked digest are never
//! published), and an action result is stored only when its source vouched for it (the libp2p
//! source checks the peer's signature) and every blob it names has arrived intact.
//!
//! Why here and not in the node: this is a store concern (which tier holds a blob, how a fetched
//! one is verified and published), the same whatever face asked; the node only says which peers
//! it trusts and how to reach them, through [`PeerSource`]. The wire protocol (libp2p streams,
//! signatures) stays in the agent, behind [`PeerConnection`].

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rba_proto::reapi::ActionResult;

use crate::action_cache::EmbeddedActionCache;
use crate::digest::Digest;
use crate::merkle::missing_in_tree;
use crate::store::BlobStore;

/// What a peer or its connection reports when it fails (the wire's own error, kept whole for
/// the log).
pub type PeerError = Box<dyn std::error::Error + Send + Sync>;

/// One trusted peer: how to reach its store.
#[async_trait]
pub trait PeerSource: Send + Sync + Debug + 'static {
    /// Who the peer is, for logs.
    fn name(&self) -> String;

    /// Opens a connection to the peer's store.
    async fn connect(&self) -> Result<Box<dyn PeerConnection>, PeerError>;
}

/// An open connection to a peer's store; one request at a time.
#[async_trait]
pub trait PeerConnection: Send {
    /// Asks for blob `digest`; its bytes then come from [`PeerConnection::next_chunk`]. Fails
    /// when the peer does not have it.
    async fn request_blob(&mut self, digest: Digest) -> Result<(), PeerError>;

    /// The next chunk of the requested blob; `None` after the last.
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, PeerError>;

    /// The peer's result for `action` in `instance`, vouched for by the peer (its signature
    /// checked by the connection); `None` when it has none.
    async fn action_result(
        &mut self,
        instance: &str,
        action: Digest,
    ) -> Result<Option<ActionResult>, PeerError>;
}

/// What a fetch brought, for the node's metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerFetched {
    /// One blob, verified and stored.
    Blob,
    /// One action result, with all its blobs.
    ActionResult,
}

type Observer = Arc<dyn Fn(PeerFetched) + Send + Sync>;

/// The peer tier over an embedded store and its action cache.
#[derive(Clone)]
pub struct PeerFetch {
    blobs: BlobStore,
    actions: EmbeddedActionCache,
    peers: Vec<Arc<dyn PeerSource>>,
    per_peer: Duration,
    observer: Observer,
}

impl Debug for PeerFetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerFetch")
            .field("peers", &self.peers)
            .field("per_peer", &self.per_peer)
            .finish()
    }
}

impl PeerFetch {
    /// Fetches into `blobs` and `actions` from `peers`, in order, each given `per_peer` per
    /// request.
    pub fn new(
        blobs: BlobStore,
        actions: EmbeddedActionCache,
        peers: Vec<Arc<dyn PeerSource>>,
        per_peer: Duration,
    ) -> Self {
        PeerFetch {
            blobs,
            actions,
            peers,
            per_peer,
            observer: Arc::new(|_| {}),
        }
    }

    /// Calls `observer` for every blob and action result fetched (the node's counters).
    pub fn observed_by(mut self, observer: impl Fn(PeerFetched) + Send + Sync + 'static) -> Self {
        self.observer = Arc::new(observer);
        self
    }

    /// True when there is no peer to ask.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Fetches one blob from the first peer that has it; true when it is here now.
    pub async fn fetch_blob(&self, digest: Digest) -> bool {
        self.first_peer("fetching a blob", |mut connection| async move {
            self.fetch_into(connection.as_mut(), digest).await
        })
        .await
        .is_some()
    }

    /// Makes the tree under `root` complete from the first peer that can; returns what is
    /// still missing (empty: complete).
    pub async fn complete_tree(&self, root: Digest) -> Vec<Digest> {
        let missing = self.missing_in_tree(root).await;
        if missing.is_empty() || self.peers.is_empty() {
            return missing;
        }
        let fetched = self
            .first_peer("fetching an input tree", |mut connection| async move {
                self.fetch_tree(connection.as_mut(), root).await
            })
            .await;
        match fetched {
            Some(()) => Vec::new(),
            None => self.missing_in_tree(root).await,
        }
    }

    /// Asks the peers for a result of `action`; stores the first one whose blobs all arrive
    /// intact. True when the action cache holds one now.
    pub async fn fetch_action_result(&self, instance: &str, action: Digest) -> bool {
        let fetched = self
            .first_peer("fetching an action result", |mut connection| async move {
                self.fetch_result(connection.as_mut(), instance, action)
                    .await
            })
            .await;
        if fetched == Some(true) {
            (self.observer)(PeerFetched::ActionResult);
            return true;
        }
        false
    }

    /// Runs `attempt` on a connection to each peer in turn until one succeeds (within the time
    /// bound); what it returned, or `None` when every peer failed.
    async fn first_peer<'a, T, F, Fut>(&'a self, what: &str, attempt: F) -> Option<T>
    where
        F: Fn(Box<dyn PeerConnection>) -> Fut,
        Fut: std::future::Future<Output = Result<T, PeerError>> + 'a,
    {
        for peer in &self.peers {
            let outcome = tokio::time::timeout(self.per_peer, async {
                attempt(peer.connect().await?).await
            })
            .await;
            match outcome {
                Ok(Ok(value)) => return Some(value),
                Ok(Err(e)) => tracing::warn!(peer = %peer.name(), error = %e, "{what} from a peer"),
                Err(_) => tracing::warn!(peer = %peer.name(), "{what} from a peer timed out"),
            }
        }
        None
    }

    /// One blob through the store's verifying writer: published only when its bytes hash to
    /// `digest`.
    async fn fetch_into(
        &self,
        connection: &mut dyn PeerConnection,
        digest: Digest,
    ) -> Result<(), PeerError> {
        connection.request_blob(digest).await?;
        let mut writer = self.blobs.writer(digest)?;
        while let Some(chunk) = connection.next_chunk().await? {
            writer.write_chunk(&chunk)?;
        }
        tokio::task::spawn_blocking(move || writer.commit()).await??;
        (self.observer)(PeerFetched::Blob);
        Ok(())
    }

    /// Fetches what the tree under `root` lacks, a level at a time: a missing directory hides
    /// its subtree until it has arrived (the walk is [`missing_in_tree`]'s, the store's one).
    async fn fetch_tree(
        &self,
        connection: &mut dyn PeerConnection,
        root: Digest,
    ) -> Result<(), PeerError> {
        let mut fetched = std::collections::HashSet::new();
        loop {
            let missing = self.missing_in_tree(root).await;
            if missing.is_empty() {
                return Ok(());
            }
            for digest in missing {
                if !fetched.insert(digest) {
                    // Here, yet still missing: a Directory whose children cannot be read.
                    return Err(format!("{digest:?} arrived but is not a valid Directory").into());
                }
                self.fetch_into(connection, digest).await?;
            }
        }
    }

    async fn fetch_result(
        &self,
        connection: &mut dyn PeerConnection,
        instance: &str,
        action: Digest,
    ) -> Result<bool, PeerError> {
        let Some(result) = connection.action_result(instance, action).await? else {
            return Ok(false);
        };
        let referenced = self
            .actions
            .referenced_blobs(action.function, &result)
            .map_err(|e| format!("the peer's result names blobs we cannot resolve: {e}"))?;
        let blobs = self.blobs.clone();
        let missing =
            tokio::task::spawn_blocking(move || blobs.find_missing(&referenced)).await??;
        for digest in missing {
            self.fetch_into(connection, digest).await?;
        }
        let (actions, instance) = (self.actions.clone(), instance.to_string());
        tokio::task::spawn_blocking(move || actions.put(&instance, &action, &result)).await??;
        Ok(true)
    }

    async fn missing_in_tree(&self, root: Digest) -> Vec<Digest> {
        let blobs = self.blobs.clone();
        tokio::task::spawn_blocking(move || missing_in_tree(&blobs, &root))
            .await
            .unwrap_or_else(|_| vec![root])
    }
}

#[cfg(test)]
mod tests {
    //! The layer against sources that lie or stall. A source here serves from a real store of
    //! its own; the libp2p source is tested end to end in the agent (`tests/p2p.rs`,
    //! `tests/hostile.rs`).

    use std::sync::atomic::{AtomicUsize, Ordering};

    use rba_proto::reapi::OutputFile;

    use super::*;
    use crate::DigestFunction;

    /// How a test peer behaves.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Behaviour {
        Honest,
        /// Serves other bytes than asked (flips the first byte).
        Corrupt,
        /// Never answers.
        Stalls,
    }

    #[derive(Debug)]
    struct TestPeer {
        store: BlobStore,
        results: EmbeddedActionCache,
        behaviour: Behaviour,
        connections: AtomicUsize,
    }

    struct TestConnection {
        store: BlobStore,
        results: EmbeddedActionCache,
        behaviour: Behaviour,
        chunks: Vec<Bytes>,
    }

    #[async_trait]
    impl PeerSource for TestPeer {
        fn name(&self) -> String {
            format!("{:?} peer", self.behaviour)
        }

        async fn connect(&self) -> Result<Box<dyn PeerConnection>, PeerError> {
            self.connections.fetch_add(1, Ordering::SeqCst);
            Ok(Box::new(TestConnection {
                store: self.store.clone(),
                results: self.results.clone(),
                behaviour: self.behaviour,
                chunks: Vec::new(),
            }))
        }
    }

    #[async_trait]
    impl PeerConnection for TestConnection {
        async fn request_blob(&mut self, digest: Digest) -> Result<(), PeerError> {
            if self.behaviour == Behaviour::Stalls {
                std::future::pending::<()>().await;
            }
            let mut bytes = self.store.read_to_vec(&digest, u64::MAX)?;
            if self.behaviour == Behaviour::Corrupt
                && let Some(first) = bytes.first_mut()
            {
                *first ^= 0xff;
            }
            // Two chunks, last first (popped from the end).
            let half = bytes.len() / 2;
            self.chunks = vec![
                Bytes::copy_from_slice(&bytes[half..]),
                Bytes::copy_from_slice(&bytes[..half]),
            ];
            Ok(())
        }

        async fn next_chunk(&mut self) -> Result<Option<Bytes>, PeerError> {
            Ok(self.chunks.pop())
        }

        async fn action_result(
            &mut self,
            instance: &str,
            action: Digest,
        ) -> Result<Option<ActionResult>, PeerError> {
            // Served whether or not the peer still holds its blobs (a peer that lost them).
            Ok(self.results.get_unchecked(instance, &action)?)
        }
    }

    struct Side {
        _dir: tempfile::TempDir,
        blobs: BlobStore,
        actions: EmbeddedActionCache,
    }

    fn side() -> Side {
        let (dir, blobs) = BlobStore::scratch().unwrap();
        let actions = EmbeddedActionCache::open(blobs.clone()).unwrap();
        Side {
            _dir: dir,
            blobs,
            actions,
        }
    }

    fn peer(side: &Side, behaviour: Behaviour) -> Arc<TestPeer> {
        Arc::new(TestPeer {
            store: side.blobs.clone(),
            results: side.actions.clone(),
            behaviour,
            connections: AtomicUsize::new(0),
        })
    }

    fn layer(here: &Side, peers: Vec<Arc<TestPeer>>) -> (PeerFetch, Arc<AtomicUsize>) {
        let fetched = Arc::new(AtomicUsize::new(0));
        let counter = fetched.clone();
        let peers = peers
            .into_iter()
            .map(|p| p as Arc<dyn PeerSource>)
            .collect();
        let layer = PeerFetch::new(
            here.blobs.clone(),
            here.actions.clone(),
            peers,
            Duration::from_millis(500),
        )
        .observed_by(move |what| {
            if what == PeerFetched::Blob {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        });
        (layer, fetched)
    }

    /// A result naming one output file of `content` (not stored), stored at `there` for
    /// `action`.
    fn result_at(there: &Side, content: &[u8]) -> (Digest, Digest) {
        let f = DigestFunction::Blake3;
        let file = f.digest_of(content);
        let action = f.digest_of(b"the action");
        let result = ActionResult {
            output_files: vec![OutputFile {
                path: "out".into(),
                digest: Some(file.to_reapi()),
                ..Default::default()
            }],
            ..Default::default()
        };
        there.actions.put("", &action, &result).unwrap();
        (action, file)
    }

    #[tokio::test]
    async fn a_corrupt_peer_stores_nothing_and_the_next_honest_one_is_asked() {
        let (here, liar, honest) = (side(), side(), side());
        let digest = liar
            .blobs
            .put_bytes(DigestFunction::Blake3, b"wanted bytes")
            .unwrap();
        honest
            .blobs
            .put_bytes(DigestFunction::Blake3, b"wanted bytes")
            .unwrap();
        let (only_liar, _) = layer(&here, vec![peer(&liar, Behaviour::Corrupt)]);
        assert!(!only_liar.fetch_blob(digest).await);
        assert!(!here.blobs.contains(&digest).unwrap());

        let (both, fetched) = layer(
            &here,
            vec![
                peer(&liar, Behaviour::Corrupt),
                peer(&honest, Behaviour::Honest),
            ],
        );
        assert!(both.fetch_blob(digest).await);
        assert_eq!(
            here.blobs.read_to_vec(&digest, 100).unwrap(),
            b"wanted bytes"
        );
        assert_eq!(fetched.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_stalling_peer_costs_its_time_bound_and_no_more() {
        let (here, staller, honest) = (side(), side(), side());
        let digest = honest
            .blobs
            .put_bytes(DigestFunction::Blake3, b"x")
            .unwrap();
        let (layer, _) = layer(
            &here,
            vec![
                peer(&staller, Behaviour::Stalls),
                peer(&honest, Behaviour::Honest),
            ],
        );
        let started = std::time::Instant::now();
        assert!(layer.fetch_blob(digest).await);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_result_is_kept_only_with_every_blob_it_names() {
        let (here, there) = (side(), side());
        let (action, file) = result_at(&there, b"output bytes");
        // The peer lacks the output: its result is refused, nothing recorded here.
        let (layer_here, _) = layer(&here, vec![peer(&there, Behaviour::Honest)]);
        assert!(!layer_here.fetch_action_result("", action).await);
        assert!(here.actions.get("", &action).unwrap().is_none());

        // With the output back, the result and its blob arrive together.
        there
            .blobs
            .put_bytes(DigestFunction::Blake3, b"output bytes")
            .unwrap();
        assert!(layer_here.fetch_action_result("", action).await);
        assert!(here.actions.get("", &action).unwrap().is_some());
        assert!(here.blobs.contains(&file).unwrap());
    }

    #[tokio::test]
    async fn a_tree_is_completed_from_a_peer_and_what_no_peer_has_is_named() {
        let (here, there) = (side(), side());
        let source = tempfile::tempdir().unwrap();
        std::fs::create_dir(source.path().join("sub")).unwrap();
        std::fs::write(source.path().join("a"), b"a").unwrap();
        std::fs::write(source.path().join("sub/b"), b"b").unwrap();
        let root = crate::build_from_dir(
            &there.blobs,
            source.path(),
            DigestFunction::Blake3,
            &crate::DirOptions::default(),
        )
        .unwrap()
        .root;
        let (nobody, _) = layer(&here, Vec::new());
        assert_eq!(nobody.complete_tree(root).await, vec![root]);

        let (layer, fetched) = layer(&here, vec![peer(&there, Behaviour::Honest)]);
        assert!(layer.complete_tree(root).await.is_empty());
        assert!(missing_in_tree(&here.blobs, &root).is_empty());
        assert_eq!(
            fetched.load(Ordering::SeqCst),
            4,
            "two directories, two files"
        );

        // A "root" that arrives intact but is no Directory: named, and the fetch ends.
        let garbage = there
            .blobs
            .put_bytes(DigestFunction::Blake3, b"\xff not a Directory")
            .unwrap();
        assert_eq!(layer.complete_tree(garbage).await, vec![garbage]);
    }
}
