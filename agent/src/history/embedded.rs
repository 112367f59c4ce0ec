//! [`EmbeddedHistory`]: the build history in the embedded store's own database, for a node
//! that keeps its state on its own disk (`rba build`, `rba serve` without PostgreSQL).
//!
//! Two record spaces of the store ([`EmbeddedRecords`]): `builds` (session id → record as
//! JSON) and `builds_by_time` (`submitted_at_ms` big-endian ++ id → nothing), so a page reads
//! its own records and the ones it skips, never the whole history. The index is rebuilt at
//! open when it does not match the records (a history written before it existed). Every
//! operation runs on tokio's blocking pool.

use anyhow::Context;
use rba_cas::{BlobStore, EmbeddedRecords};

use super::{BuildRecord, Cursor, HistoryStore};

/// The most records one alias is read back with (one per owner: a public on-chain id may be
/// reused by many callers, each sees only its own).
const MAX_ALIASED: usize = 10_000;

/// The history in the embedded database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct EmbeddedHistory {
    records: EmbeddedRecords,
    by_time: EmbeddedRecords,
    /// `alias` ++ NUL ++ id → nothing: the records an alias names.
    by_alias: EmbeddedRecords,
    /// Records stored: counted once at open (a scan), then kept by `put`.
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

fn time_key(at_ms: u64, id: &str) -> Vec<u8> {
    let mut key = at_ms.to_be_bytes().to_vec();
    key.extend_from_slice(id.as_bytes());
    key
}

fn alias_prefix(alias: &str) -> Vec<u8> {
    let mut key = alias.as_bytes().to_vec();
    key.push(0);
    key
}

fn decode(bytes: &[u8]) -> Option<BuildRecord> {
    serde_json::from_slice(bytes).ok()
}

impl EmbeddedHistory {
    /// Opens the history of `blobs`' database, rebuilding its time index when needed.
    pub fn open(blobs: &BlobStore) -> anyhow::Result<EmbeddedHistory> {
        let records = EmbeddedRecords::open(blobs, "builds")?;
        let count = records.count();
        let history = EmbeddedHistory {
            records,
            by_time: EmbeddedRecords::open(blobs, "builds_by_time")?,
            by_alias: EmbeddedRecords::open(blobs, "builds_by_alias")?,
            count: std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(count)),
        };
        if history.by_time.count() != count {
            history.by_time.clear()?;
            for bytes in history.records.values() {
                if let Some(record) = decode(&bytes?) {
                    history
                        .by_time
                        .insert(&time_key(record.submitted_at_ms, &record.id), &[])?;
                }
            }
        }
        Ok(history)
    }

    /// Runs `work` on this history on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&EmbeddedHistory) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let history = self.clone();
        tokio::task::spawn_blocking(move || work(&history))
            .await
            .context("the history's task failed")?
    }
}

#[async_trait::async_trait]
impl HistoryStore for EmbeddedHistory {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn put(&self, record: &BuildRecord) -> anyhow::Result<bool> {
        let (key, json) = (record.id.clone(), serde_json::to_vec(record)?);
        let time = time_key(record.submitted_at_ms, &record.id);
        let alias = record.alias.as_deref().map(|alias| {
            let mut key = alias_prefix(alias);
            key.extend_from_slice(record.id.as_bytes());
            key
        });
        self.blocking(move |history| {
            let new = history.records.insert(key.as_bytes(), &json)?;
            history.by_time.insert(&time, &[])?;
            if let Some(alias) = alias {
                history.by_alias.insert(&alias, &[])?;
            }
            if new {
                history
                    .count
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(new)
        })
        .await
    }

    async fn get(&self, id: &str) -> anyhow::Result<Option<BuildRecord>> {
        let id = id.to_string();
        self.blocking(move |history| {
            Ok(history
                .records
                .get(id.as_bytes())?
                .and_then(|bytes| decode(&bytes)))
        })
        .await
    }

    async fn older_than(
        &self,
        after: Option<&Cursor>,
        limit: usize,
    ) -> anyhow::Result<Vec<BuildRecord>> {
        let mut below = after.map(|cursor| time_key(cursor.at_ms, &cursor.id));
        self.blocking(move |history| {
            let mut records = Vec::new();
            // An index entry without its record (or with one that no longer decodes) is
            // skipped, and the walk goes on until `limit` records or the oldest key.
            while records.len() < limit {
                let keys = history
                    .by_time
                    .keys_below(below.as_deref(), limit - records.len())?;
                let Some(last) = keys.last().cloned() else {
                    break;
                };
                for key in keys.iter().filter(|key| key.len() > 8) {
                    if let Some(record) = history.records.get(&key[8..])?.and_then(|b| decode(&b)) {
                        records.push(record);
                    }
                }
                below = Some(last);
            }
            Ok(records)
        })
        .await
    }

    async fn count(&self) -> anyhow::Result<usize> {
        Ok(self.count.load(std::sync::atomic::Ordering::Relaxed))
    }

    async fn aliased(&self, alias: &str) -> anyhow::Result<Vec<BuildRecord>> {
        let (prefix, alias) = (alias_prefix(alias), alias.to_string());
        self.blocking(move |history| {
            let mut records = Vec::new();
            for key in history.by_alias.keys_with_prefix(&prefix, MAX_ALIASED)? {
                let id = &key[prefix.len()..];
                if let Some(record) = history.records.get(id)?.and_then(|b| decode(&b))
                    && record.alias.as_deref() == Some(alias.as_str())
                {
                    records.push(record);
                }
            }
            records.sort_by(|a, b| (a.submitted_at_ms, &a.id).cmp(&(b.submitted_at_ms, &b.id)));
            Ok(records)
        })
        .await
    }

    async fn running(&self) -> anyhow::Result<Vec<BuildRecord>> {
        self.blocking(|history| {
            let mut running = Vec::new();
            for bytes in history.records.values() {
                if let Some(record) = decode(&bytes?).filter(|r| !r.is_finished()) {
                    running.push(record);
                }
            }
            Ok(running)
        })
        .await
    }
}
