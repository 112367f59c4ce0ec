//! `build.bazel.remote.execution.v2.ActionCache`.
//!
//! - GetActionResult answers only *complete* hits: every output file, every file inside every
//!   output directory's tree, the trees themselves, stdout and stderr must be in the CAS (the
//!   completeness layer of the given [`rba_cas::Stores`], `rba_cas::layers::complete`, which
//!   also refreshes their LRU position); anything less is `NOT_FOUND`, so a client never
//!   downloads a hit whose outputs are gone.
//!   `inline_stdout`, `inline_stderr` and `inline_output_files` are honoured within the message
//!   limit.
//! - UpdateActionResult needs a read-write client. Inline contents (`stdout_raw`,
//!   `OutputFile.contents`) are verified and moved into the CAS; then every referenced blob must
//!   be present, else `FAILED_PRECONDITION` with a `PreconditionFailure` listing them — an
//!   incomplete result is never stored.
//!
//! Instance names separate action caches; the CAS is shared.
//!
//! Results are per tenant: UpdateActionResult stores under the writer's tenant namespace of the
//! instance (`rba_executor::runner::result_namespace`, the executor's own scoping, so Execute
//! never serves one tenant's uploaded result to another) and may name only blobs the writer
//! may read. GetActionResult looks in the caller's namespace, those of the tenants its token
//! lists, then the instance's shared one (the executor's clean results, served only to a
//! caller that holds the action's inputs), and grants the caller the blobs of what it serves.
//!
//! The executor's own namespaces are not the clients' to write: `rba/cargo` (what `rba build`
//! and Tangle jobs are served), anything under `rba/`, and every namespace the executor
//! derives from an instance (tenant-scoped and failed results; their names hold a NUL).
//! UpdateActionResult on them is `PERMISSION_DENIED` whatever the token, otherwise a client
//! could plant the result every later submitter of a popular tree is served. GetActionResult
//! reads a shared namespace (`rba/cargo` included: its entries are served to any tenant anyway)
//! but never a tenant-scoped or failed one (`PERMISSION_DENIED`). The rule itself lives in
//! `rba_executor::runner` (`is_executor_namespace`, `is_private_namespace`).

use std::collections::HashSet;

use bytes::Bytes;
use rba_cas::{ActionCache as _, CasError, Digest, DigestFunction, Store, Stores};
use rba_proto::Message;
use rba_proto::reapi::action_cache_server::ActionCache;
use rba_proto::reapi::{ActionResult, GetActionResultRequest, UpdateActionResultRequest};
use tonic::{Request, Response, Status};

use rba_executor::runner::{
    Provenance, is_executor_namespace, is_private_namespace, result_namespace,
};
use rba_executor::tenant::Tenant;

use crate::auth;
use crate::server::ServerState;
use crate::status;

/// The ActionCache service.
#[derive(Clone, Debug)]
pub struct ActionCacheService {
    state: ServerState,
}

impl ActionCacheService {
    /// Over the shared server state.
    pub fn new(state: ServerState) -> Self {
        ActionCacheService { state }
    }

    async fn get(&self, request: Request<GetActionResultRequest>) -> Result<ActionResult, Status> {
        auth::require_read(&request)?;
        let caller = auth::caller(&request);
        let scope = auth::read_scope(&request);
        let grantee = auth::grantee(&request);
        let request = request.into_inner();
        if is_private_namespace(&request.instance_name) {
            return Err(Status::permission_denied(format!(
                "instance {:?} is a tenant-scoped namespace of the executor; it is not readable",
                request.instance_name
            )));
        }
        let (function, action) = status::action_key(
            &request.instance_name,
            request.digest_function,
            request.action_digest.as_ref(),
        )?;
        let stores = &self.state.stores;
        let budget = self.state.max_batch_total_size_bytes();
        let namespaces = readable_namespaces(&request.instance_name, &caller);
        let shared = &request.instance_name;
        let mut found = None;
        for namespace in &namespaces {
            // Complete hits only: the completeness layer checks every blob the result names.
            match stores.actions().get(namespace, &action).await {
                // The shared namespace holds the executor's results for every tenant, but only
                // for one that holds the action's inputs (as Execute demands): otherwise
                // knowing an action digest would reveal the outputs of another tenant's
                // sources. A caller that lacks them misses, uploads, and is served through
                // Execute.
                Ok(Some(_))
                    if namespace == shared
                        && scope != auth::ReadScope::Everything
                        && !holds_inputs(stores, &scope, &action).await? => {}
                Ok(Some(result)) => {
                    found = Some(result);
                    break;
                }
                Ok(None) => {}
                // A stored result whose tree cannot be decoded is no usable hit.
                Err(e @ CasError::Invalid { .. }) => {
                    tracing::warn!(?action, error = %e, "unusable action result");
                }
                Err(e) => return Err(status::from_cas(e)),
            }
        }
        let result = match found {
            None => None,
            Some(result) => {
                // Served to the caller: its blobs are the caller's to read from now on.
                if scope != auth::ReadScope::Everything
                    && let Some(tenant) = grantee
                {
                    let blobs = stores
                        .actions()
                        .referenced_blobs(function, &result)
                        .await
                        .map_err(status::from_cas)?;
                    let trees = result
                        .output_directories
                        .iter()
                        .filter_map(|d| Digest::from_reapi(function, d.tree_digest.as_ref()?).ok());
                    let granted: Vec<Digest> = blobs.into_iter().chain(trees).collect();
                    stores
                        .grants()
                        .grant(tenant.as_str(), &granted)
                        .await
                        .map_err(status::from_cas)?;
                }
                Some(inline(stores.blobs().as_ref(), function, result, &request, budget).await)
            }
        };
        self.state.metrics.action_cache(result.is_some());
        result.ok_or_else(|| Status::not_found(format!("no complete action result for {action:?}")))
    }

    async fn update(
        &self,
        request: Request<UpdateActionResultRequest>,
    ) -> Result<ActionResult, Status> {
        auth::require_ac_write(&request)?;
        let caller = auth::caller(&request);
        let scope = auth::read_scope(&request);
        let grantee = auth::grantee(&request);
        let request = request.into_inner();
        if is_executor_namespace(&request.instance_name) {
            return Err(Status::permission_denied(format!(
                "instance {:?} is reserved for the executor's own results; clients cannot \
                 write it (use another instance name)",
                request.instance_name
            )));
        }
        let (function, action) = status::action_key(
            &request.instance_name,
            request.digest_function,
            request.action_digest.as_ref(),
        )?;
        let mut result = request
            .action_result
            .ok_or_else(|| Status::invalid_argument("missing action_result"))?;
        let stores = &self.state.stores;
        let grants = stores.grants().as_ref();
        // The writer's own namespace: served to its tenant and to tokens that list it.
        let namespace = result_namespace(
            &request.instance_name,
            &caller.tenant(),
            Provenance::TenantState,
            true,
        );
        let inlined =
            externalise_inline_contents(stores.blobs().as_ref(), function, &mut result).await?;
        if let Some(tenant) = &grantee {
            grants
                .grant(tenant.as_str(), &inlined)
                .await
                .map_err(status::from_cas)?;
        }
        // A tree the writer may not read is missing to it (its listing is another's).
        let trees: Vec<Digest> = result
            .output_directories
            .iter()
            .filter_map(|d| Digest::from_reapi(function, d.tree_digest.as_ref()?).ok())
            .collect();
        let hidden_trees = scope.not_readable(grants, &trees).await?;
        if !hidden_trees.is_empty() {
            return Err(status::missing_blobs(
                "an output directory's tree is not in the CAS",
                &hidden_trees,
            ));
        }
        let referenced = match stores.actions().referenced_blobs(function, &result).await {
            Ok(referenced) => referenced,
            Err(CasError::NotFound(tree)) => {
                return Err(status::missing_blobs(
                    "an output directory's tree is not in the CAS",
                    &[tree],
                ));
            }
            Err(e) => return Err(status::from_cas(e)),
        };
        let mut missing = stores
            .blobs()
            .find_missing(&referenced)
            .await
            .map_err(status::from_cas)?;
        // A result may only name blobs its writer may read; otherwise whoever is served it
        // would be granted another tenant's blobs. Unreadable ones are missing to it.
        missing.extend(scope.not_readable(grants, &referenced).await?);
        missing.sort_by_key(|d| d.hash_hex());
        missing.dedup();
        if !missing.is_empty() {
            return Err(status::missing_blobs(
                format!(
                    "{} blob(s) the action result references are not in the CAS; upload them first",
                    missing.len()
                ),
                &missing,
            ));
        }
        stores
            .actions()
            .put(&namespace, &action, &result)
            .await
            .map_err(status::from_cas)?;
        Ok(result)
    }
}

/// Moves inline bytes of an uploaded result into the CAS (verifying any digest they come
/// with) so that the stored result is small and its blobs are shared. The blobs are written
/// as one batch (group commit).
async fn externalise_inline_contents(
    blobs: &dyn Store,
    function: DigestFunction,
    result: &mut ActionResult,
) -> Result<Vec<Digest>, Status> {
    let mut batch: Vec<(Digest, Bytes)> = Vec::new();
    let mut store = |bytes: &[u8],
                     claimed: Option<&rba_proto::reapi::Digest>,
                     what: &str|
     -> Result<Digest, Status> {
        let actual = function.digest_of(bytes);
        if let Some(claimed) = claimed {
            let claimed = status::digest(function, claimed)?;
            if claimed != actual {
                return Err(Status::invalid_argument(format!(
                    "inline {what} hashes to {actual:?}, not {claimed:?}"
                )));
            }
        }
        batch.push((actual, Bytes::copy_from_slice(bytes)));
        Ok(actual)
    };
    for file in &mut result.output_files {
        if !file.contents.is_empty() {
            let digest = store(
                &file.contents,
                file.digest.as_ref(),
                &format!("contents of {}", file.path),
            )?;
            file.digest = Some(digest.to_reapi());
            file.contents.clear();
        }
    }
    if !result.stdout_raw.is_empty() {
        let digest = store(&result.stdout_raw, result.stdout_digest.as_ref(), "stdout")?;
        result.stdout_digest = Some(digest.to_reapi());
        result.stdout_raw.clear();
    }
    if !result.stderr_raw.is_empty() {
        let digest = store(&result.stderr_raw, result.stderr_digest.as_ref(), "stderr")?;
        result.stderr_digest = Some(digest.to_reapi());
        result.stderr_raw.clear();
    }
    let stored: Vec<Digest> = batch.iter().map(|(digest, _)| *digest).collect();
    if !batch.is_empty() {
        for written in blobs.write_batch(batch).await {
            written.map_err(status::from_cas)?;
        }
    }
    Ok(stored)
}

/// Whether `scope` may read the Action `action`, its Command and its whole input root (and
/// the store holds them): nothing lacking, as Execute decides it.
async fn holds_inputs(
    stores: &Stores,
    scope: &auth::ReadScope,
    action: &Digest,
) -> Result<bool, Status> {
    match crate::execution::lacking_inputs(stores, scope, action).await {
        Ok(lacking) => Ok(lacking.is_empty()),
        // Not an Action (or a malformed input): nothing proves the caller holds the inputs.
        Err(status) if status.code() == tonic::Code::InvalidArgument => Ok(false),
        Err(status) => Err(status),
    }
}

/// Where GetActionResult looks for `caller`, in order: its own namespace (what it stored), the
/// namespaces of the tenants its token lists, then the instance's shared namespace (the
/// executor's clean results, and entries from before results were scoped).
pub fn readable_namespaces(instance: &str, caller: &auth::Caller) -> Vec<String> {
    let scoped =
        |tenant: &Tenant| result_namespace(instance, tenant, Provenance::TenantState, true);
    let mut namespaces = vec![scoped(&caller.tenant())];
    namespaces.extend(
        caller
            .sees
            .iter()
            .filter_map(|name| auth::listed_tenant(name))
            .map(|tenant| scoped(&tenant)),
    );
    namespaces.push(result_namespace(
        instance,
        &caller.tenant(),
        Provenance::Clean,
        true,
    ));
    namespaces.dedup();
    namespaces
}

/// Fills in what the client asked to be inlined, as long as the response stays within
/// `budget` bytes. Blobs that vanished in the meantime are simply not inlined.
async fn inline(
    blobs: &dyn Store,
    function: DigestFunction,
    mut result: ActionResult,
    request: &GetActionResultRequest,
    budget: usize,
) -> ActionResult {
    let mut remaining = budget.saturating_sub(result.encoded_len()) as u64;
    async fn read(
        blobs: &dyn Store,
        function: DigestFunction,
        remaining: &mut u64,
        digest: Option<&rba_proto::reapi::Digest>,
    ) -> Option<Vec<u8>> {
        let digest = Digest::from_reapi(function, digest?).ok()?;
        if digest.size == 0 || digest.size > *remaining {
            return None;
        }
        let bytes = blobs.read_to_vec(&digest, *remaining).await.ok()?;
        *remaining -= bytes.len() as u64;
        Some(bytes)
    }
    if request.inline_stdout
        && result.stdout_raw.is_empty()
        && let Some(bytes) = read(
            blobs,
            function,
            &mut remaining,
            result.stdout_digest.as_ref(),
        )
        .await
    {
        result.stdout_raw = bytes;
    }
    if request.inline_stderr
        && result.stderr_raw.is_empty()
        && let Some(bytes) = read(
            blobs,
            function,
            &mut remaining,
            result.stderr_digest.as_ref(),
        )
        .await
    {
        result.stderr_raw = bytes;
    }
    if !request.inline_output_files.is_empty() {
        let wanted: HashSet<&str> = request
            .inline_output_files
            .iter()
            .map(String::as_str)
            .collect();
        for file in &mut result.output_files {
            if file.contents.is_empty()
                && wanted.contains(file.path.as_str())
                && let Some(bytes) =
                    read(blobs, function, &mut remaining, file.digest.as_ref()).await
            {
                file.contents = bytes;
            }
        }
    }
    result
}

#[tonic::async_trait]
impl ActionCache for ActionCacheService {
    async fn get_action_result(
        &self,
        request: Request<GetActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        self.state
            .metrics
            .answer("GetActionResult", self.get(request).await)
    }

    async fn update_action_result(
        &self,
        request: Request<UpdateActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        self.state
            .metrics
            .answer("UpdateActionResult", self.update(request).await)
    }
}
