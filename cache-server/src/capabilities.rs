//! `build.bazel.remote.execution.v2.Capabilities`.
//!
//! Advertises SHA-256 and BLAKE3, zstd for ByteStream and batch uploads, whether *this client*
//! may update the action cache (per its token), and a `max_batch_total_size_bytes` derived from
//! the server's real message limit (never 0: clients that batch "without limit" overflow the
//! 4 MiB gRPC default), and `exec_enabled` when an executor is attached (SHA-256 as the
//! execution digest function, SHA-256 and BLAKE3 accepted).

use rba_cas::DigestFunction;
use rba_proto::reapi::capabilities_server::Capabilities;
use rba_proto::reapi::{
    ActionCacheUpdateCapabilities, CacheCapabilities, ExecutionCapabilities,
    GetCapabilitiesRequest, ServerCapabilities, compressor, digest_function,
    symlink_absolute_path_strategy,
};
use rba_proto::semver::SemVer;
use tonic::{Request, Response, Status};

use crate::server::ServerState;
use crate::{auth, resource_name};

/// Lowest REAPI version we speak.
pub const LOW_API_VERSION: (i32, i32) = (2, 0);
/// Highest REAPI version we implement (digest functions in requests and resource names,
/// compressed blobs).
pub const HIGH_API_VERSION: (i32, i32) = (2, 3);

/// The Capabilities service.
#[derive(Clone, Debug)]
pub struct CapabilitiesService {
    state: ServerState,
}

impl CapabilitiesService {
    /// Over the shared server state.
    pub fn new(state: ServerState) -> Self {
        CapabilitiesService { state }
    }
}

fn semver((major, minor): (i32, i32)) -> SemVer {
    SemVer {
        major,
        minor,
        patch: 0,
        prerelease: String::new(),
    }
}

/// What the server supports, for a client that may (or may not) update the action cache.
pub fn server_capabilities(state: &ServerState, update_enabled: bool) -> ServerCapabilities {
    let digest_functions: Vec<i32> = DigestFunction::ALL
        .iter()
        .map(|f| f.to_reapi() as i32)
        .collect();
    let zstd = vec![compressor::Value::Zstd as i32];
    ServerCapabilities {
        cache_capabilities: Some(CacheCapabilities {
            digest_functions: digest_functions.clone(),
            action_cache_update_capabilities: Some(ActionCacheUpdateCapabilities {
                update_enabled,
            }),
            cache_priority_capabilities: None,
            max_batch_total_size_bytes: state.max_batch_total_size_bytes() as i64,
            symlink_absolute_path_strategy: symlink_absolute_path_strategy::Value::Allowed as i32,
            supported_compressors: zstd.clone(),
            supported_batch_update_compressors: zstd,
            max_cas_blob_size_bytes: state.config.store.max_bytes.min(i64::MAX as u64) as i64,
            split_blob_support: false,
            splice_blob_support: false,
            fast_cdc_2020_params: None,
            rep_max_cdc_params: None,
        }),
        execution_capabilities: Some(ExecutionCapabilities {
            digest_function: digest_function::Value::Sha256 as i32,
            exec_enabled: state.execution_enabled(),
            execution_priority_capabilities: None,
            supported_node_properties: vec![],
            digest_functions,
        }),
        deprecated_api_version: None,
        low_api_version: Some(semver(LOW_API_VERSION)),
        high_api_version: Some(semver(HIGH_API_VERSION)),
    }
}

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    async fn get_capabilities(
        &self,
        request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<ServerCapabilities>, Status> {
        let result = (|| {
            auth::require_read(&request)?;
            resource_name::validate_instance_name(&request.get_ref().instance_name)?;
            let update_enabled = auth::may_update_action_cache(&request);
            Ok(server_capabilities(&self.state, update_enabled))
        })();
        self.state.metrics.answer("GetCapabilities", result)
    }
}
