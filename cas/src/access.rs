//! Read grants: which tenant may read which blob.
//!
//! Why: one store serves many tenants, and a blob's digest is no secret (it travels in logs,
//! end events, action results). Knowing a digest must not be enough to read another tenant's
//! sources, binaries or logs. A tenant may read a blob when it proved it holds the bytes
//! (it uploaded them, verified against the digest) or when the blob belongs to a result the
//! node served it (outputs, logs, the input root it submitted). Every grant is recorded here
//! and every read check asks here, so the rule lives in one place; the faces (libp2p, HTTP)
//! only name the tenant (`peer:…`, `token:…`, as `rba_executor::tenant::Tenant` spells it).
//!
//! The grants are a tree of the store's own index database (`read_grants`), keyed
//! `len(tenant) ‖ tenant ‖ function ‖ hash`: a grant costs one small insert, a check one
//! lookup, and grants survive restarts with the blobs they name. The empty blob is readable by
//! everyone (it holds nothing). Grants outlive eviction harmlessly: a granted blob that is gone
//! is simply absent.

use crate::digest::{Digest, DigestFunction};
use crate::error::{CasError, Result};
use crate::store::BlobStore;

/// The grants of one store. Cheap to clone; open it once per store (clones share the count).
#[derive(Clone, Debug)]
pub struct EmbeddedGrants {
    blobs: BlobStore,
    grants: sled::Tree,
    /// The running count (metrics read it: sled's `len` is a scan), and its saved copy.
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
    meta: sled::Tree,
    /// Held while granting: which keys are new is read before they are written.
    granting: std::sync::Arc<parking_lot::Mutex<()>>,
}

const GRANT_COUNT_KEY: &[u8] = b"count";

/// Longest tenant name accepted (identities are short: `peer:12D3…`, `token:NAME`).
pub const MAX_TENANT_BYTES: usize = 1024;

/// Refuses a tenant name that is empty or longer than [`MAX_TENANT_BYTES`] (every backend's
/// rule, checked here once).
pub(crate) fn check_tenant(tenant: &str) -> Result<()> {
    if tenant.is_empty() || tenant.len() > MAX_TENANT_BYTES {
        return Err(CasError::Invalid {
            what: "tenant".to_string(),
            reason: format!("a tenant name is 1..={MAX_TENANT_BYTES} bytes"),
        });
    }
    Ok(())
}

fn grant_key(tenant: &str, digest: &Digest) -> Result<Vec<u8>> {
    check_tenant(tenant)?;
    let mut key = Vec::with_capacity(2 + tenant.len() + 1 + digest.hash.len());
    key.extend_from_slice(&(tenant.len() as u16).to_be_bytes());
    key.extend_from_slice(tenant.as_bytes());
    key.push(match digest.function {
        DigestFunction::Sha256 => 1,
        DigestFunction::Blake3 => 2,
    });
    key.extend_from_slice(&digest.hash);
    Ok(key)
}

impl EmbeddedGrants {
    /// Opens the grants of `blobs` (in its index database).
    pub fn open(blobs: BlobStore) -> Result<Self> {
        let grants = blobs.db().open_tree("read_grants")?;
        let meta = blobs.db().open_tree("read_grants_meta")?;
        let saved = meta
            .get(GRANT_COUNT_KEY)?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes));
        // Stores from before the running count: counted once, here.
        let count = match saved {
            Some(count) => count,
            None => {
                let count = grants.len() as u64;
                meta.insert(GRANT_COUNT_KEY, &count.to_be_bytes())?;
                count
            }
        };
        Ok(EmbeddedGrants {
            blobs,
            grants,
            count: std::sync::Arc::new(count.into()),
            meta,
            granting: Default::default(),
        })
    }

    /// Lets `tenant` read `digests` from now on.
    pub fn grant<'a>(
        &self,
        tenant: &str,
        digests: impl IntoIterator<Item = &'a Digest>,
    ) -> Result<()> {
        check_tenant(tenant)?;
        let _one_at_a_time = self.granting.lock();
        let mut batch = sled::Batch::default();
        let mut new = std::collections::HashSet::new();
        for digest in digests {
            if digest.is_empty_blob() {
                continue;
            }
            let key = grant_key(tenant, digest)?;
            if !new.contains(&key) && !self.grants.contains_key(&key)? {
                batch.insert(key.clone(), &[][..]);
                new.insert(key);
            }
        }
        if new.is_empty() {
            return Ok(());
        }
        self.grants.apply_batch(batch)?;
        let count = self
            .count
            .fetch_add(new.len() as u64, std::sync::atomic::Ordering::Relaxed)
            + new.len() as u64;
        self.meta.insert(GRANT_COUNT_KEY, &count.to_be_bytes())?;
        Ok(())
    }

    /// Whether `tenant` may read `digest` (whether or not the blob is still stored).
    pub fn may_read(&self, tenant: &str, digest: &Digest) -> Result<bool> {
        if digest.is_empty_blob() {
            return Ok(true);
        }
        Ok(self.grants.contains_key(grant_key(tenant, digest)?)?)
    }

    /// Of `digests`, those `tenant` may not read, in the order given, without duplicates.
    pub fn not_readable(&self, tenant: &str, digests: &[Digest]) -> Result<Vec<Digest>> {
        let mut seen = std::collections::HashSet::new();
        let mut refused = Vec::new();
        for digest in digests {
            if seen.insert(*digest) && !self.may_read(tenant, digest)? {
                refused.push(*digest);
            }
        }
        Ok(refused)
    }

    /// Of `digests`, those none of `tenants` may read, in the order given, without duplicates
    /// (a caller that acts for several tenants: its own and those its operator lets it see).
    /// Every tenant name is checked, whether or not an earlier one may read the blobs.
    pub fn not_readable_by_any(&self, tenants: &[&str], digests: &[Digest]) -> Result<Vec<Digest>> {
        for tenant in tenants {
            check_tenant(tenant)?;
        }
        let mut seen = std::collections::HashSet::new();
        let mut refused = Vec::new();
        for digest in digests {
            if !seen.insert(*digest) || digest.is_empty_blob() {
                continue;
            }
            let mut readable = false;
            for tenant in tenants {
                if self.grants.contains_key(grant_key(tenant, digest)?)? {
                    readable = true;
                    break;
                }
            }
            if !readable {
                refused.push(*digest);
            }
        }
        Ok(refused)
    }

    /// Of `digests`, those present in the store *and* readable by `tenant`: the only answer a
    /// tenant gets to "which of these do you hold", so a blob it may not read looks absent and
    /// its existence does not leak.
    pub fn has(&self, tenant: &str, digests: &[Digest]) -> Result<Vec<Digest>> {
        let missing: std::collections::HashSet<Digest> =
            self.blobs.find_missing(digests)?.into_iter().collect();
        let mut seen = std::collections::HashSet::new();
        let mut present = Vec::new();
        for digest in digests {
            if seen.insert(*digest) && !missing.contains(digest) && self.may_read(tenant, digest)? {
                present.push(*digest);
            }
        }
        Ok(present)
    }

    /// Number of grants (all tenants; a running count, not a scan).
    pub fn len(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Relaxed) as usize
    }

    /// True when nothing was granted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cas;

    #[test]
    fn grants_are_per_tenant_and_has_hides_the_rest() {
        let (_dir, cas) = Cas::scratch().unwrap();
        let function = DigestFunction::Blake3;
        let mine = cas.blobs.put_bytes(function, b"mine").unwrap();
        let theirs = cas.blobs.put_bytes(function, b"theirs").unwrap();
        let absent = function.digest_of(b"never stored");
        let empty = function.empty();
        cas.reads.grant("peer:a", [&mine, &absent]).unwrap();
        cas.reads.grant("peer:b", [&theirs]).unwrap();
        // The running count: a grant given again, or twice in one call, counts once.
        cas.reads.grant("peer:a", [&mine, &mine, &empty]).unwrap();
        assert_eq!(cas.reads.len(), 3);

        assert!(cas.reads.may_read("peer:a", &mine).unwrap());
        assert!(!cas.reads.may_read("peer:a", &theirs).unwrap());
        assert!(cas.reads.may_read("peer:a", &empty).unwrap());
        // A tenant whose name is a prefix of another's gets nothing of it.
        assert!(!cas.reads.may_read("peer:", &mine).unwrap());
        assert!(!cas.reads.may_read("peer:ab", &mine).unwrap());

        let all = [mine, theirs, absent, empty, mine];
        assert_eq!(cas.reads.has("peer:a", &all).unwrap(), vec![mine, empty]);
        assert_eq!(cas.reads.has("peer:b", &all).unwrap(), vec![theirs, empty]);
        assert_eq!(
            cas.reads.not_readable("peer:b", &all).unwrap(),
            vec![mine, absent]
        );
        assert!(cas.reads.grant("", [&mine]).is_err());
        assert!(
            cas.reads
                .may_read(&"x".repeat(MAX_TENANT_BYTES + 1), &mine)
                .is_err()
        );
    }

    #[test]
    fn a_caller_of_several_tenants_reads_what_any_of_them_may() {
        let (_dir, cas) = Cas::scratch().unwrap();
        let function = DigestFunction::Sha256;
        let a = cas.blobs.put_bytes(function, b"a's").unwrap();
        let b = cas.blobs.put_bytes(function, b"b's").unwrap();
        let c = cas.blobs.put_bytes(function, b"c's").unwrap();
        cas.reads.grant("token:a", [&a]).unwrap();
        cas.reads.grant("token:b", [&b]).unwrap();
        let asked = [a, b, c, function.empty(), c];
        assert_eq!(
            cas.reads
                .not_readable_by_any(&["token:a", "token:b"], &asked)
                .unwrap(),
            vec![c]
        );
        assert_eq!(
            cas.reads.not_readable_by_any(&["token:a"], &asked).unwrap(),
            vec![b, c]
        );
        assert_eq!(
            cas.reads.not_readable_by_any(&[], &asked).unwrap(),
            vec![a, b, c]
        );
        assert!(cas.reads.not_readable_by_any(&[""], &[a]).is_err());
    }

    #[test]
    fn grants_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let digest;
        {
            let cas = Cas::open(dir.path(), crate::StoreConfig::without_fsync()).unwrap();
            digest = cas
                .blobs
                .put_bytes(DigestFunction::Sha256, b"kept")
                .unwrap();
            cas.reads.grant("token:ci", [&digest]).unwrap();
            cas.blobs.flush().unwrap();
        }
        let cas = Cas::open(dir.path(), crate::StoreConfig::without_fsync()).unwrap();
        assert!(cas.reads.may_read("token:ci", &digest).unwrap());
        assert_eq!(cas.reads.len(), 1, "the count is kept, not rescanned");
        assert!(!cas.reads.may_read("token:other", &digest).unwrap());
    }
}
