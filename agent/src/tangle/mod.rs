//! The operator node as a Tangle Blueprint: customers submit build jobs on chain, the node runs
//! them on its executor and posts an ABI-encoded result, and the operator is paid for it.
//!
//! Why a module of its own: blueprint-sdk (~700 crates, alloy, a Tangle EVM client) is only
//! needed here. The jobs themselves add nothing to how a build runs: each one fetches a zip,
//! turns it into a Merkle tree in the node's CAS (through the cas crate's hostile-zip checks)
//! and hands it to [`NodeShared::submit`](crate::node::NodeShared::submit), which ends in
//! `Executor::submit` like every other face of the node. The job's log stream is reachable
//! under the on-chain `session_id` (WebSocket `/v1/sessions/{session_id}/events`, libp2p
//! `Attach`), so a requester watches its build live.
//!
//! - [`jobs`]: the five jobs (0 compile, 1 test, 2 lint, 3 audit, 4 check), their input
//!   `(zip_uri, session_id, build_target)`, the [`jobs::BuildResult`] ABI struct and
//!   [`jobs::router`].
//! - [`fetch`]: `zip_uri` schemes (`https://`, `ipfs://CID`, `file://` under one directory,
//!   `cas://DIGEST`) with size caps, timeouts and bounded redirects.
//! - [`runner`]: `rba tangle run`: `BlueprintEnvironment`, `TangleProducer`/`TangleConsumer`,
//!   `BlueprintRunner`, with the node (libp2p, HTTP, REAPI) as a background service.

pub mod fetch;
pub mod jobs;
pub mod runner;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rba_cas::merkle::ZipLimits;

use crate::node::NodeShared;

/// What a Tangle customer signs (EIP-191 `personal_sign`) to follow the session of its own job
/// call without a token of the node: `GET /v1/sessions/{id}/events?sig=0x…`. The session id is
/// public on chain (it is in the call's inputs); the signature proves the reader is the account
/// that made the call. It is bound to the one session and grants only reading it.
pub fn session_read_message(session_id: &str) -> String {
    format!("rba: read session {session_id}")
}

/// The checksummed address that signed [`session_read_message`] for `session_id` (a 65-byte
/// signature in hex), or why not.
pub fn session_reader(session_id: &str, signature: &str) -> Result<String, String> {
    let bytes = hex::decode(signature.trim_start_matches("0x"))
        .map_err(|_| "sig is not hex".to_string())?;
    let signature = alloy_primitives::Signature::try_from(bytes.as_slice())
        .map_err(|e| format!("sig is not a signature: {e}"))?;
    signature
        .recover_address_from_msg(session_read_message(session_id))
        .map(|address| address.to_string())
        .map_err(|e| format!("sig does not recover an account: {e}"))
}

/// How the Tangle jobs fetch and accept a `zip_uri`.
#[derive(Clone, Debug)]
pub struct TangleConfig {
    /// Where downloads are written (temporary files, removed when the job has its tree).
    pub download_dir: PathBuf,
    /// `file://` URIs are accepted only for files under this directory (after resolving
    /// symlinks); `None` refuses every `file://` URI.
    pub file_root: Option<PathBuf>,
    /// `ipfs://CID` is fetched as `{gateway}/ipfs/{CID}` (e.g. `https://ipfs.io`); `None`
    /// refuses `ipfs://`.
    pub ipfs_gateway: Option<String>,
    /// Accept plain `http://` URIs (loopback tests, private networks). Off in production:
    /// the contract itself only accepts `https://`, `ipfs://` and `cas://`.
    pub allow_http: bool,
    /// Fetch from loopback, private, link-local and other non-public addresses (tests, private
    /// networks). Off in production: a customer's URI must not reach the operator's own
    /// network (checked on every resolved address and every redirect).
    pub allow_private_hosts: bool,
    /// Largest zip accepted (bytes on the wire or on disk).
    pub max_zip_bytes: u64,
    /// Longest a whole download may take.
    pub fetch_timeout: Duration,
    /// Longest connecting may take.
    pub connect_timeout: Duration,
    /// Most redirects followed.
    pub max_redirects: usize,
    /// The hostile-zip limits (entries, total size, compression ratio, symlinks).
    pub zip_limits: ZipLimits,
    /// All callers of a service build as one tenant, in one target dir per service (and are
    /// served each other's results built there). Off by default: each caller is its own tenant.
    pub share_target_dir_per_service: bool,
}

impl TangleConfig {
    /// Defaults with downloads under `data_dir/tangle/downloads`: no `file://`, no IPFS
    /// gateway, no plain HTTP, public addresses only, 512 MiB zips, 5 minutes per download,
    /// 5 redirects.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        TangleConfig {
            download_dir: data_dir.into().join("tangle").join("downloads"),
            file_root: None,
            ipfs_gateway: None,
            allow_http: false,
            allow_private_hosts: false,
            max_zip_bytes: 512 << 20,
            fetch_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(15),
            max_redirects: 5,
            zip_limits: ZipLimits {
                max_total_bytes: 2 << 30,
                ..ZipLimits::default()
            },
            share_target_dir_per_service: false,
        }
    }
}

/// What every job handler gets: the node and how to fetch inputs. Cheap to clone.
#[derive(Clone)]
pub struct TangleContext {
    /// The node the jobs run on (its CAS, executor, history and session table).
    pub node: Arc<NodeShared>,
    /// Fetch limits.
    pub config: Arc<TangleConfig>,
    http: reqwest::Client,
    gateway_http: reqwest::Client,
}

impl std::fmt::Debug for TangleContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TangleContext")
            .field("config", &self.config)
            .finish()
    }
}

impl TangleContext {
    /// A context over a started node.
    pub fn new(node: Arc<NodeShared>, config: TangleConfig) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.download_dir).map_err(|e| {
            anyhow::anyhow!(
                "creating the download dir {}: {e}",
                config.download_dir.display()
            )
        })?;
        let http = fetch::http_client(&config, config.allow_http, config.allow_private_hosts)?;
        // The operator chose the gateway: a plain-HTTP gateway on a local IPFS node is fine.
        let gateway_http = fetch::http_client(&config, true, true)?;
        Ok(TangleContext {
            node,
            config: Arc::new(config),
            http,
            gateway_http,
        })
    }
}
