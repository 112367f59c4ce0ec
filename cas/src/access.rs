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
//!
//! Grants are only ever added, so the ones this process wrote or found are remembered in memory
//! ([`KnownGrants`]) and never go stale: a tenant's FindMissing of 1,000 digests asked the tree
//! about each one (four to five times the latency of the same call without tokens); now only
//! about the digests not seen granted to it before. What is not remembered is read from the
//! tree, so forgetting (the memory is bounded) only costs lookups.

use std::collections::{HashMap, HashSet};

use crate::digest::{Digest, DigestFunction};
use crate::error::{CasError, Result};
use crate::store::{BlobKey, BlobStore, blob_key};

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
    /// Grants known to be in the tree.
    known: std::sync::Arc<KnownGrants>,
}

/// Grants known to be recorded, per tenant (a grant is never taken back, so an entry never goes
/// stale). Bounded: past [`KNOWN_GRANTS`] entries it starts over. Both grant backends keep one
/// (the embedded tree's here, PostgreSQL's in `backends::postgres`): what it holds is only
/// ever what the backend confirmed for that exact tenant.
#[derive(Debug, Default)]
pub(crate) struct KnownGrants {
    tenants: parking_lot::RwLock<KnownByTenant>,
}

#[derive(Debug, Default)]
struct KnownByTenant {
    keys: HashMap<Box<str>, HashSet<BlobKey, KeyHasher>>,
    entries: usize,
}

/// Digests are client-chosen: a seeded hasher (random per process), as the presence cache's.
type KeyHasher = foldhash::fast::RandomState;

/// Grants remembered before starting over (≈ 6 MB).
const KNOWN_GRANTS: usize = 131_072;

impl KnownGrants {
    /// For each of `digests`, whether one of `tenants` is known to have been granted it.
    pub(crate) fn granted(&self, tenants: &[&str], digests: &[Digest]) -> Vec<bool> {
        let known = self.tenants.read();
        let sets: Vec<_> = tenants
            .iter()
            .filter_map(|tenant| known.keys.get(*tenant))
            .collect();
        digests
            .iter()
            .map(|digest| {
                let key = blob_key(digest);
                sets.iter().any(|set| set.contains(&key))
            })
            .collect()
    }

    /// Remembers that `tenant` was granted `digests` (already recorded by the backend).
    pub(crate) fn remember<'a>(&self, tenant: &str, digests: impl IntoIterator<Item = &'a Digest>) {
        let keys: Vec<BlobKey> = digests.into_iter().map(blob_key).collect();
        if keys.is_empty() {
            return;
        }
        let mut known = self.tenants.write();
        if known.entries + keys.len() > KNOWN_GRANTS {
            *known = KnownByTenant::default();
        }
        let KnownByTenant {
            keys: by_tenant,
            entries,
        } = &mut *known;
        let set = match by_tenant.get_mut(tenant) {
            Some(set) => set,
            None => by_tenant.entry(tenant.into()).or_default(),
        };
        for key in keys.into_iter().take(KNOWN_GRANTS) {
            if set.insert(key) {
                *entries += 1;
            }
        }
    }
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
            known: Default::default(),
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
        let mut new = HashSet::new();
        let mut granted = Vec::new();
        for digest in digests {
            if digest.is_empty_blob() {
                continue;
            }
            granted.push(*digest);
            let key = grant_key(tenant, digest)?;
            if !new.contains(&key) && !self.grants.contains_key(&key)? {
                batch.insert(key.clone(), &[][..]);
                new.insert(key);
            }
        }
        if new.is_empty() {
            self.known.remember(tenant, &granted);
            return Ok(());
        }
        self.grants.apply_batch(batch)?;
        // Remembered once recorded: a remembered grant is always in the tree.
        self.known.remember(tenant, &granted);
        let count = self
            .count
            .fetch_add(new.len() as u64, std::sync::atomic::Ordering::Relaxed)
            + new.len() as u64;
        self.meta.insert(GRANT_COUNT_KEY, &count.to_be_bytes())?;
        Ok(())
    }

    /// Whether `tenant` may read `digest` (whether or not the blob is still stored).
    pub fn may_read(&self, tenant: &str, digest: &Digest) -> Result<bool> {
        Ok(self
            .not_readable_by_any(&[tenant], std::slice::from_ref(digest))?
            .is_empty())
    }

    /// Of `digests`, those `tenant` may not read, in the order given, without duplicates.
    pub fn not_readable(&self, tenant: &str, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.not_readable_by_any(&[tenant], digests)
    }

    /// For each of `digests`, whether the tree need not be asked: it is remembered granted to
    /// one of `tenants`, or it is the empty blob (which needs no grant). Memory only, never
    /// blocks: async callers answer from it alone when every one is, and otherwise hand it to
    /// [`EmbeddedGrants::not_readable_beyond`] on a blocking thread.
    pub(crate) fn remembered(&self, tenants: &[&str], digests: &[Digest]) -> Result<Vec<bool>> {
        for tenant in tenants {
            check_tenant(tenant)?;
        }
        Ok(self
            .known
            .granted(tenants, digests)
            .into_iter()
            .zip(digests)
            .map(|(known, digest)| known || digest.is_empty_blob())
            .collect())
    }

    /// Of `digests`, those none of `tenants` may read, in the order given, without duplicates
    /// (a caller that acts for several tenants: its own and those its operator lets it see).
    /// Every tenant name is checked, whether or not an earlier one may read the blobs. The
    /// grants remembered answer first; the tree is asked about the rest, and what it confirms
    /// is remembered.
    pub fn not_readable_by_any(&self, tenants: &[&str], digests: &[Digest]) -> Result<Vec<Digest>> {
        let remembered = self.remembered(tenants, digests)?;
        self.not_readable_beyond(tenants, digests, &remembered)
    }

    /// [`EmbeddedGrants::not_readable_by_any`] for the digests not `remembered` (what
    /// [`EmbeddedGrants::remembered`] said of the same `tenants` and `digests`).
    pub(crate) fn not_readable_beyond(
        &self,
        tenants: &[&str],
        digests: &[Digest],
        remembered: &[bool],
    ) -> Result<Vec<Digest>> {
        let mut seen = HashSet::with_hasher(KeyHasher::default());
        let mut refused = Vec::new();
        let mut found: Vec<(&str, Digest)> = Vec::new();
        for (digest, remembered) in digests.iter().zip(remembered) {
            if *remembered || !seen.insert(*digest) {
                continue;
            }
            let mut readable = false;
            for tenant in tenants {
                if self.grants.contains_key(grant_key(tenant, digest)?)? {
                    found.push((tenant, *digest));
                    readable = true;
                    break;
                }
            }
            if !readable {
                refused.push(*digest);
            }
        }
        for tenant in tenants {
            self.known.remember(
                tenant,
                found.iter().filter(|(t, _)| t == tenant).map(|(_, d)| d),
            );
        }
        Ok(refused)
    }

    /// Of `digests`, those present in the store *and* readable by `tenant`: the only answer a
    /// tenant gets to "which of these do you hold", so a blob it may not read looks absent and
    /// its existence does not leak.
    pub fn has(&self, tenant: &str, digests: &[Digest]) -> Result<Vec<Digest>> {
        let missing: HashSet<Digest> = self.blobs.find_missing(digests)?.into_iter().collect();
        let mut seen = HashSet::new();
        let present: Vec<Digest> = digests
            .iter()
            .filter(|digest| !missing.contains(digest) && seen.insert(**digest))
            .copied()
            .collect();
        let refused: HashSet<Digest> = self.not_readable(tenant, &present)?.into_iter().collect();
        Ok(present
            .into_iter()
            .filter(|digest| !refused.contains(digest))
            .collect())
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
    fn remembered_grants_are_per_tenant_and_come_from_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        let function = DigestFunction::Sha256;
        let (a, b);
        {
            let cas = Cas::open(dir.path(), crate::StoreConfig::without_fsync()).unwrap();
            a = cas.blobs.put_bytes(function, b"a's").unwrap();
            b = cas.blobs.put_bytes(function, b"b's").unwrap();
            cas.reads.grant("token:a", [&a]).unwrap();
            // Remembered as granted, for its tenant only.
            assert_eq!(
                cas.reads.known.granted(&["token:a"], &[a, b]),
                [true, false]
            );
            assert_eq!(cas.reads.known.granted(&["token:b"], &[a]), [false]);
            assert_eq!(cas.reads.known.granted(&["token:"], &[a]), [false]);
            assert_eq!(cas.reads.not_readable("token:b", &[a, b]).unwrap(), [a, b]);
            cas.blobs.flush().unwrap();
        }
        // A new process remembers nothing, reads the tree, and remembers what it confirmed
        // (never a refusal: a grant may come later).
        let cas = Cas::open(dir.path(), crate::StoreConfig::without_fsync()).unwrap();
        assert_eq!(cas.reads.known.granted(&["token:a"], &[a]), [false]);
        assert_eq!(cas.reads.not_readable("token:a", &[a, b]).unwrap(), [b]);
        assert_eq!(
            cas.reads.known.granted(&["token:a"], &[a, b]),
            [true, false]
        );
        let all_remembered = |tenants: &[&str], digests: &[Digest]| {
            cas.reads
                .remembered(tenants, digests)
                .map(|each| each.into_iter().all(|r| r))
        };
        assert!(!all_remembered(&["token:a"], &[a, b]).unwrap());
        cas.reads.grant("token:a", [&b]).unwrap();
        assert!(
            cas.reads
                .not_readable("token:a", &[a, b])
                .unwrap()
                .is_empty()
        );
        let empty = function.empty();
        assert!(all_remembered(&["token:a"], &[a, b, empty]).unwrap());
        assert!(!all_remembered(&["token:b"], &[a]).unwrap());
        assert!(all_remembered(&[""], &[a]).is_err());
    }

    #[test]
    fn remembered_grants_start_over_past_their_bound() {
        let known = KnownGrants::default();
        let function = DigestFunction::Blake3;
        let digests: Vec<Digest> = (0..KNOWN_GRANTS as u64 + 1)
            .map(|i| function.digest_of(&i.to_le_bytes()))
            .collect();
        known.remember("token:a", &digests[..KNOWN_GRANTS]);
        assert_eq!(known.tenants.read().entries, KNOWN_GRANTS);
        assert_eq!(known.granted(&["token:a"], &digests[..1]), [true]);
        known.remember("token:b", &digests[KNOWN_GRANTS..]);
        assert_eq!(known.tenants.read().entries, 1);
        assert_eq!(known.granted(&["token:a"], &digests[..1]), [false]);
        assert_eq!(
            known.granted(&["token:b"], &digests[KNOWN_GRANTS..]),
            [true]
        );
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
