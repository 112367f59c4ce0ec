//! Bearer-token write trust.
//!
//! An interceptor in front of every service resolves the request's `authorization: Bearer
//! <token>` header to an [`Access`] and stores it in the request's extensions; a wrong token is
//! `UNAUTHENTICATED`. Handlers then ask for what they need: reading needs read-only, uploading
//! blobs needs read-only when `read_only_may_write_cas` (blobs are verified against their
//! digest, so a reader cannot poison them) else read-write, and action-cache writes always need
//! read-write (`PERMISSION_DENIED` otherwise). Without configured tokens everyone is
//! read-write, which [`crate::Config::validate`] allows only on loopback unless asked for.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::config::Config;

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

/// Resolves tokens to access levels.
#[derive(Clone)]
pub struct Authenticator {
    tokens: Arc<Vec<(String, Vec<u8>, Access)>>,
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
        Authenticator {
            tokens: Arc::new(
                config
                    .auth
                    .tokens
                    .iter()
                    .map(|t| (t.name.clone(), t.token.as_bytes().to_vec(), t.access))
                    .collect(),
            ),
            anonymous: config.anonymous_access(),
            read_only_may_write_cas: config.auth.read_only_may_write_cas,
        }
    }

    /// The access a request's metadata grants.
    pub fn authenticate(&self, metadata: &tonic::metadata::MetadataMap) -> Result<Access, Status> {
        let Some(header) = metadata.get("authorization") else {
            return Ok(self.anonymous);
        };
        let header = header
            .to_str()
            .map_err(|_| Status::unauthenticated("malformed authorization header"))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("authorization header must be \"Bearer <token>\"")
            })?
            .trim();
        let mut granted = None;
        for (name, secret, access) in self.tokens.iter() {
            if constant_time_eq(secret, token.as_bytes()) {
                tracing::trace!(token = %name, ?access, "authenticated");
                granted = Some(*access);
            }
        }
        granted.ok_or_else(|| Status::unauthenticated("unknown token"))
    }

    /// Whether read-only clients may upload blobs.
    pub fn read_only_may_write_cas(&self) -> bool {
        self.read_only_may_write_cas
    }
}

impl Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let access = self.authenticate(request.metadata())?;
        request.extensions_mut().insert(ClientAccess {
            access,
            cas_write: self.read_only_may_write_cas,
        });
        Ok(request)
    }
}

/// What the interceptor decided, carried in the request's extensions.
#[derive(Clone, Copy, Debug)]
pub struct ClientAccess {
    /// The client's access.
    pub access: Access,
    /// Whether read-only clients may upload blobs.
    pub cas_write: bool,
}

fn client<T>(request: &Request<T>) -> ClientAccess {
    // No interceptor ran (a service used outside our server): grant nothing.
    request
        .extensions()
        .get::<ClientAccess>()
        .copied()
        .unwrap_or(ClientAccess {
            access: Access::None,
            cas_write: false,
        })
}

/// The access of a request.
pub fn access<T>(request: &Request<T>) -> Access {
    client(request).access
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
    match client.access {
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
            },
            TokenConfig {
                name: "rw".into(),
                token: "read-write-token".into(),
                access: Access::ReadWrite,
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
}
