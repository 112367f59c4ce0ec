//! Bearer tokens: who a request comes from and what it may do.
//!
//! An interceptor in front of every service resolves the request's `authorization: Bearer
//! <token>` header to a [`Caller`] (the token's name, its [`Access`], the tenants it may see)
//! and stores it in the request's extensions; a wrong token is `UNAUTHENTICATED`. The same
//! resolution ([`Authenticator::authenticate_bearer`]) serves `rba serve`'s HTTP face, so
//! tokens mean the same thing on every face of a node. A token's tenant is `token:NAME`
//! ([`Caller::tenant`]); it sees its own operations and builds, plus those of the tenants its
//! configuration lists (`tenants = ["peer:12D3…"]`, `"*"` for all: an operator's token). Handlers then ask for what they need: reading needs read-only, uploading
//! blobs needs read-only when `read_only_may_write_cas` (blobs are verified against their
//! digest, so a reader cannot poison them) else read-write, and action-cache writes always need
//! read-write (`PERMISSION_DENIED` otherwise). Without configured tokens everyone is
//! read-write, which [`crate::Config::validate`] allows only on loopback unless asked for.
//! Which blobs a caller may read is [`read_scope`] (grants recorded in `rba_cas::EmbeddedGrants`,
//! to the tenant [`grantee`] names).

use std::sync::Arc;

use rba_executor::tenant::Tenant;
use serde::{Deserialize, Serialize};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::config::{AuthConfig, Config, TokenConfig};

/// What a client may do.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    /// Nothing.
    None,
    /// Read blobs and action results (and, if configured, upload blobs).
    ReadOnly,
    /// Everything, including action-cache writes.
    ReadWrite,
}

/// Who a request comes from: a token (by name) or nobody, and what that allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// What it may do.
    pub access: Access,
    /// The name of the token it presented (`None`: no token).
    pub token: Option<Arc<str>>,
    /// Other tenants whose operations and builds it may see (`*`: every tenant).
    pub sees: Arc<[String]>,
}

/// The `tenants` entry that lets a token see every tenant.
pub const ALL_TENANTS: &str = "*";

impl Caller {
    /// A caller without a token.
    pub fn anonymous(access: Access) -> Caller {
        Caller {
            access,
            token: None,
            sees: Arc::from(Vec::new()),
        }
    }

    /// The tenant it acts as: `token:NAME`, or `anonymous` without a token.
    pub fn tenant(&self) -> Tenant {
        match &self.token {
            Some(name) => Tenant::token(name),
            None => Tenant::anonymous(),
        }
    }

    /// Whether it may see what `tenant` owns (its own, listed, or every tenant's).
    pub fn may_see(&self, tenant: &str) -> bool {
        tenant == self.tenant().as_str()
            || self.sees.iter().any(|t| t == ALL_TENANTS || t == tenant)
    }
}

/// The name a token is known by: its configured name, or for an unnamed one a stable label
/// derived from (never revealing) its secret.
pub fn token_name(token: &TokenConfig) -> String {
    if !token.name.is_empty() {
        return token.name.clone();
    }
    let digest = rba_cas::DigestFunction::Blake3.digest_of(token.token.as_bytes());
    format!("unnamed-{}", &digest.hash_hex()[..12])
}

/// One configured token, resolved.
struct KnownToken {
    name: Arc<str>,
    secret: Vec<u8>,
    access: Access,
    sees: Arc<[String]>,
}

/// Resolves tokens to callers.
#[derive(Clone)]
pub struct Authenticator {
    tokens: Arc<Vec<KnownToken>>,
    anonymous: Access,
    read_only_may_write_cas: bool,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("tokens", &self.tokens.len())
            .field("anonymous", &self.anonymous)
            .finish()
    }
}

/// Compares without an early exit, so timing does not reveal how much of a token matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Authenticator {
    /// From the server configuration.
    pub fn new(config: &Config) -> Self {
        Self::from_auth(&config.auth)
    }

    /// From the token settings alone (the node's HTTP face uses the same ones).
    pub fn from_auth(auth: &AuthConfig) -> Self {
        Authenticator {
            tokens: Arc::new(
                auth.tokens
                    .iter()
                    .map(|t| KnownToken {
                        name: Arc::from(token_name(t)),
                        secret: t.token.as_bytes().to_vec(),
                        access: t.access,
                        sees: Arc::from(t.tenants.clone()),
                    })
                    .collect(),
            ),
            anonymous: auth.anonymous_access(),
            read_only_may_write_cas: auth.read_only_may_write_cas,
        }
    }

    /// Whether any token is configured.
    pub fn has_tokens(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// The caller an `authorization` header value names (`None`: no header): anonymous
    /// without one, the token's caller with a known `Bearer` token, an error (for people)
    /// otherwise.
    pub fn authenticate_bearer(&self, header: Option<&str>) -> Result<Caller, String> {
        let Some(header) = header else {
            return Ok(Caller::anonymous(self.anonymous));
        };
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or("authorization header must be \"Bearer <token>\"")?
            .trim();
        self.authenticate_token(token)
    }

    /// The caller a bare token names (e.g. a WebSocket's `?token=`).
    pub fn authenticate_token(&self, token: &str) -> Result<Caller, String> {
        let mut granted = None;
        for known in self.tokens.iter() {
            if constant_time_eq(&known.secret, token.as_bytes()) {
                tracing::trace!(token = %known.name, access = ?known.access, "authenticated");
                granted = Some(Caller {
                    access: known.access,
                    token: Some(known.name.clone()),
                    sees: known.sees.clone(),
                });
            }
        }
        granted.ok_or_else(|| "unknown token".to_string())
    }

    /// The caller a request's metadata names.
    pub fn authenticate_caller(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Caller, Status> {
        let header = match metadata.get("authorization") {
            None => None,
            Some(value) => Some(
                value
                    .to_str()
                    .map_err(|_| Status::unauthenticated("malformed authorization header"))?,
            ),
        };
        self.authenticate_bearer(header)
            .map_err(Status::unauthenticated)
    }

    /// The access a request's metadata grants.
    pub fn authenticate(&self, metadata: &tonic::metadata::MetadataMap) -> Result<Access, Status> {
        self.authenticate_caller(metadata).map(|c| c.access)
    }

    /// Whether read-only clients may upload blobs.
    pub fn read_only_may_write_cas(&self) -> bool {
        self.read_only_may_write_cas
    }
}

impl Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.authenticate_caller(request.metadata())?;
        request.extensions_mut().insert(ClientAccess {
            caller,
            cas_write: self.read_only_may_write_cas,
            tenants_separated: self.has_tokens(),
        });
        Ok(request)
    }
}

/// What the interceptor decided, carried in the request's extensions.
#[derive(Clone, Debug)]
pub struct ClientAccess {
    /// Who the client is and what it may do.
    pub caller: Caller,
    /// Whether read-only clients may upload blobs.
    pub cas_write: bool,
    /// Whether tokens are configured, so that blob reads and action results are per tenant
    /// (without tokens every caller is the same anonymous tenant and reads everything).
    pub tenants_separated: bool,
}

fn client<T>(request: &Request<T>) -> ClientAccess {
    // No interceptor ran (a service used outside our server): grant nothing.
    request
        .extensions()
        .get::<ClientAccess>()
        .cloned()
        .unwrap_or(ClientAccess {
            caller: Caller::anonymous(Access::None),
            cas_write: false,
            tenants_separated: true,
        })
}

/// Which blobs a caller may read (see [`read_scope`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadScope {
    /// Every blob: a server without tokens, or a token whose `tenants` list holds `"*"`.
    Everything,
    /// The blobs granted to these tenants: the caller's own first, then those its token
    /// lists.
    Tenants(Vec<String>),
}

impl ReadScope {
    /// The tenants whose grants count, `None` for everything.
    pub fn tenants(&self) -> Option<Vec<&str>> {
        match self {
            ReadScope::Everything => None,
            ReadScope::Tenants(tenants) => Some(tenants.iter().map(String::as_str).collect()),
        }
    }

    /// Of `digests`, those this scope may not read, in the order given, without duplicates:
    /// one grants lookup for the whole batch.
    pub async fn not_readable(
        &self,
        grants: &dyn rba_cas::Grants,
        digests: &[rba_cas::Digest],
    ) -> Result<Vec<rba_cas::Digest>, Status> {
        match self.tenants() {
            None => Ok(Vec::new()),
            Some(tenants) => grants
                .not_readable_by_any(&tenants, digests)
                .await
                .map_err(crate::status::from_cas),
        }
    }
}

/// The read rule of the REAPI face (the one place it is decided): a token is a tenant, and it
/// reads the blobs its tenant uploaded or was served as part of a result, plus those granted to
/// the tenants its `tenants` list names; `"*"` reads everything, and so does everyone on a
/// server without tokens (loopback only). A blob outside the scope is answered exactly like a
/// missing one, so its existence does not leak.
pub fn read_scope<T>(request: &Request<T>) -> ReadScope {
    let client = client(request);
    let caller = client.caller;
    if !client.tenants_separated || caller.sees.iter().any(|t| t == ALL_TENANTS) {
        return ReadScope::Everything;
    }
    let mut tenants = vec![caller.tenant().as_str().to_string()];
    tenants.extend(caller.sees.iter().filter(|t| !t.is_empty()).cloned());
    ReadScope::Tenants(tenants)
}

/// The tenant that blobs a request proved it holds (uploads) or was served (results) are
/// granted to; `None` on a server without tokens, where grants would change nothing.
pub fn grantee<T>(request: &Request<T>) -> Option<Tenant> {
    let client = client(request);
    client.tenants_separated.then(|| client.caller.tenant())
}

/// The tenant a configured `tenants` entry (`token:NAME`, `peer:ID`, `tangle:SERVICE/CALLER`,
/// `local`, `anonymous`) names, for the action-cache namespaces it owns; `None` for anything
/// else (such as `"*"`).
pub fn listed_tenant(name: &str) -> Option<Tenant> {
    if let Some(token) = name.strip_prefix("token:") {
        Some(Tenant::token(token))
    } else if let Some(peer) = name.strip_prefix("peer:") {
        Some(Tenant::peer(peer))
    } else if let Some((service, caller)) = name
        .strip_prefix("tangle:")
        .and_then(|rest| rest.split_once('/'))
    {
        Some(Tenant::tangle(service.parse().ok()?, caller))
    } else {
        match name {
            "local" => Some(Tenant::local()),
            "anonymous" => Some(Tenant::anonymous()),
            _ => None,
        }
    }
}

/// The caller of a request.
pub fn caller<T>(request: &Request<T>) -> Caller {
    client(request).caller
}

/// The access of a request.
pub fn access<T>(request: &Request<T>) -> Access {
    client(request).caller.access
}

/// Fails unless the client may read.
pub fn require_read<T>(request: &Request<T>) -> Result<(), Status> {
    match access(request) {
        Access::None => Err(Status::unauthenticated(
            "this server requires a token (authorization: Bearer <token>)",
        )),
        _ => Ok(()),
    }
}

/// Fails unless the client may upload blobs.
pub fn require_cas_write<T>(request: &Request<T>) -> Result<(), Status> {
    let client = client(request);
    match client.caller.access {
        Access::ReadWrite => Ok(()),
        Access::ReadOnly if client.cas_write => Ok(()),
        Access::ReadOnly => Err(Status::permission_denied(
            "read-only clients may not upload blobs",
        )),
        Access::None => Err(Status::unauthenticated(
            "this server requires a token (authorization: Bearer <token>)",
        )),
    }
}

/// Whether the client may write the action cache.
pub fn may_update_action_cache<T>(request: &Request<T>) -> bool {
    access(request) == Access::ReadWrite
}

/// Fails unless the client may write the action cache.
pub fn require_ac_write<T>(request: &Request<T>) -> Result<(), Status> {
    match access(request) {
        Access::ReadWrite => Ok(()),
        Access::ReadOnly => Err(Status::permission_denied(
            "action-cache writes need a read-write token",
        )),
        Access::None => Err(Status::unauthenticated(
            "this server requires a token (authorization: Bearer <token>)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenConfig;

    #[test]
    fn tokens_resolve_to_access() {
        let mut config = Config::default();
        config.auth.tokens = vec![
            TokenConfig {
                name: "ro".into(),
                token: "read-only-token".into(),
                access: Access::ReadOnly,
                tenants: vec![],
            },
            TokenConfig {
                name: "rw".into(),
                token: "read-write-token".into(),
                access: Access::ReadWrite,
                tenants: vec!["token:ro".into()],
            },
        ];
        let auth = Authenticator::new(&config);
        let mut md = tonic::metadata::MetadataMap::new();
        assert_eq!(auth.authenticate(&md).unwrap(), Access::None);
        md.insert("authorization", "Bearer read-only-token".parse().unwrap());
        assert_eq!(auth.authenticate(&md).unwrap(), Access::ReadOnly);
        md.insert("authorization", "Bearer read-write-token".parse().unwrap());
        assert_eq!(auth.authenticate(&md).unwrap(), Access::ReadWrite);
        md.insert("authorization", "Bearer nope".parse().unwrap());
        assert_eq!(
            auth.authenticate(&md).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        md.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(
            auth.authenticate(&md).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn callers_see_their_own_tenant_and_listed_ones() {
        let mut config = Config::default();
        config.auth.tokens = vec![
            TokenConfig {
                name: "ro".into(),
                token: "read-only-token".into(),
                access: Access::ReadOnly,
                tenants: vec![],
            },
            TokenConfig {
                name: "ops".into(),
                token: "operator-token".into(),
                access: Access::ReadWrite,
                tenants: vec![ALL_TENANTS.into()],
            },
            TokenConfig {
                name: String::new(),
                token: "nameless-token".into(),
                access: Access::ReadWrite,
                tenants: vec!["peer:abc".into()],
            },
        ];
        let auth = Authenticator::from_auth(&config.auth);
        let ro = auth
            .authenticate_bearer(Some("Bearer read-only-token"))
            .unwrap();
        assert_eq!(ro.tenant().as_str(), "token:ro");
        assert!(ro.may_see("token:ro"));
        assert!(!ro.may_see("token:ops"));
        assert!(!ro.may_see("anonymous"));
        let ops = auth.authenticate_token("operator-token").unwrap();
        assert!(ops.may_see("token:ro") && ops.may_see("peer:xyz") && ops.may_see("local"));
        let nameless = auth.authenticate_token("nameless-token").unwrap();
        let tenant = nameless.tenant();
        assert!(tenant.as_str().starts_with("token:unnamed-"), "{tenant}");
        assert!(!tenant.as_str().contains("nameless"));
        assert!(nameless.may_see("peer:abc") && !nameless.may_see("peer:abcd"));
        let anonymous = auth.authenticate_bearer(None).unwrap();
        assert_eq!(anonymous.access, Access::None);
        assert_eq!(anonymous.tenant().as_str(), "anonymous");
        assert!(auth.authenticate_token("operator-tokeN").is_err());
        assert!(auth.authenticate_bearer(Some("operator-token")).is_err());
    }
}
