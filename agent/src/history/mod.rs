//! Build history: one record per session, so `GET /builds`, re-attaching to a finished
//! session and the figures survive a restart of the node.
//!
//! Why here and not in the executor: the executor knows jobs only while it runs; who submitted
//! what, and the record kept after the job is forgotten, is the operator node's business.
//!
//! Where the records live is a [`HistoryStore`]: the embedded store's database
//! ([`embedded`], the default) or, on a front end of a scale-out deployment, PostgreSQL
//! ([`postgres`]: a replaced front end still lists and serves its builds). The composition
//! root ([`crate::compose::history`]) picks it with the other backends.
//!
//! Each record names its owner tenant (`peer:…`, `local`): the HTTP views and session
//! attachment show a build only to callers that may see that tenant. Records written before
//! tenants existed have none and are shown only to callers that see every tenant.
//!
//! Newest first, a page at a time: both stores read records in (`submitted_at_ms`, id) order
//! from a cursor, so a page of the dashboard reads its own records and the ones it skips,
//! never the whole history ([`History::page`]; a history of 10,000 builds must not ship, nor
//! be parsed, to show 50).

pub mod embedded;
pub mod postgres;

use std::time::{SystemTime, UNIX_EPOCH};

use rba_executor::runner::{JobOutcome, JobStatus};
use serde::{Deserialize, Serialize};

/// One step of a job and how long it took.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StepRecord {
    /// `queue`, `sync`, `fetch`, `build`, `outputs`…
    pub name: String,
    /// Milliseconds.
    pub ms: u64,
    /// The log lines this step printed, `first_line..end_line` (`seq`s; absent in records from
    /// before steps were located in the log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_line: Option<u64>,
    /// See `first_line` (exclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_line: Option<u64>,
}

/// An artifact of a job.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ArtifactRecord {
    /// `target/debug/hello`.
    pub path: String,
    /// `blake3:HEX/SIZE`.
    pub digest: String,
    /// Executable bit.
    pub executable: bool,
}

/// What the node remembers of a session.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BuildRecord {
    /// Session id (the executor's job id).
    pub id: String,
    /// `build`, `test`, `clippy`, `audit`, `check`, `fmt`, `run`.
    pub kind: String,
    /// Release profile requested.
    pub release: bool,
    /// Input root digest (`blake3:HEX/SIZE`).
    pub input_root: String,
    /// Action digest.
    pub action_digest: String,
    /// Submitting peer (absent for local submissions).
    pub client: Option<String>,
    /// The workspace's name as the client hinted it (made path-safe; `default` when none);
    /// absent in records from before it was kept. Badges of a workspace's latest build use it.
    #[serde(default)]
    pub workspace: Option<String>,
    /// The tenant that owns the build (`peer:…`, `local`); absent in records from before
    /// tenants.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Another name the session answers to for its owner (a Tangle call's on-chain
    /// `session_id`); at most one build per alias and owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// Milliseconds since the epoch.
    pub submitted_at_ms: u64,
    /// `running`, `success`, `failed`, `error`, `cancelled`.
    pub status: String,
    /// Exit code of cargo (-1 when it did not run).
    pub exit_code: Option<i32>,
    /// Answered from the action cache.
    pub cache_hit: bool,
    /// Wall time from submission to the end.
    pub duration_ms: Option<u64>,
    /// Per-step durations.
    pub steps: Vec<StepRecord>,
    /// The stored log (JSON lines), readable with `GET /builds/{id}/logs`.
    pub log_digest: Option<String>,
    /// Number of log lines.
    pub lines: Option<u64>,
    /// Artifacts.
    pub artifacts: Vec<ArtifactRecord>,
    /// What went wrong, if the job broke.
    pub error: Option<String>,
}

/// The lowercase name of a status, as records and the API use it.
pub fn status_name(status: JobStatus) -> &'static str {
    match status {
        JobStatus::Success => "success",
        JobStatus::Failed => "failed",
        JobStatus::Cancelled => "cancelled",
        JobStatus::Error => "error",
    }
}

impl BuildRecord {
    /// Fills the outcome fields.
    pub fn finish(&mut self, outcome: &JobOutcome, lines: u64) {
        self.status = status_name(outcome.status).to_string();
        self.exit_code = Some(outcome.exit_code);
        self.cache_hit = outcome.cache_hit;
        self.duration_ms = Some(outcome.duration.as_millis() as u64);
        // Step i printed the lines between the ends of steps i - 1 and i.
        let ends = (outcome.step_end_lines.len() == outcome.steps.len())
            .then_some(&outcome.step_end_lines);
        self.steps = outcome
            .steps
            .iter()
            .enumerate()
            .map(|(i, (name, took))| StepRecord {
                name: name.clone(),
                ms: took.as_millis() as u64,
                first_line: ends.map(|e| if i == 0 { 0 } else { e[i - 1] }),
                end_line: ends.map(|e| e[i]),
            })
            .collect();
        self.log_digest = outcome.log.as_ref().map(|l| format!("{:?}", l.log));
        self.lines = Some(lines);
        self.artifacts = outcome
            .artifacts
            .iter()
            .map(|a| ArtifactRecord {
                path: a.path.clone(),
                digest: format!("{:?}", a.digest),
                executable: a.executable,
            })
            .collect();
        self.error = outcome.error.clone();
    }

    /// True once the job ended.
    pub fn is_finished(&self) -> bool {
        self.status != "running"
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Where a page of the history starts: after the record submitted at `at_ms` with `id`
/// (newest first). Its text form, `{at_ms}-{id}`, is the API's opaque `cursor`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    /// `submitted_at_ms` of the last record of the previous page.
    pub at_ms: u64,
    /// Its id.
    pub id: String,
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.at_ms, self.id)
    }
}

impl std::str::FromStr for Cursor {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("cursor {text:?} is not one this node gave (MS-ID)");
        let (at, id) = text.split_once('-').ok_or_else(bad)?;
        let at_ms = at.parse().map_err(|_| bad())?;
        if id.is_empty() || id.len() > 200 {
            return Err(bad());
        }
        Ok(Cursor {
            at_ms,
            id: id.to_string(),
        })
    }
}

/// One page of records, newest first, and where the next one starts.
#[derive(Clone, Debug)]
pub struct Page<T> {
    /// The records (at most the page size).
    pub items: Vec<T>,
    /// Where the next (older) page starts; `None` on the last page.
    pub next: Option<Cursor>,
}

/// Where the history's records live: the embedded database ([`embedded::EmbeddedHistory`]),
/// or PostgreSQL when the node is a front end of a scale-out deployment
/// ([`postgres::PgHistory`]). Paging, counting and the interrupted-build sweep are
/// [`History`]'s, over these few operations.
#[async_trait::async_trait]
pub trait HistoryStore: Send + Sync + std::fmt::Debug {
    /// `embedded` or `postgres`, for logs.
    fn backend(&self) -> &'static str;

    /// Stores (replaces) a record; true when its id was new. A record's `submitted_at_ms`
    /// never changes.
    async fn put(&self, record: &BuildRecord) -> anyhow::Result<bool>;

    /// The record of session `id`.
    async fn get(&self, id: &str) -> anyhow::Result<Option<BuildRecord>>;

    /// Up to `limit` records submitted before `after` (from the newest when `None`), newest
    /// first, ordered by `submitted_at_ms` then id (bytewise), both descending; fewer only
    /// when no older record exists.
    async fn older_than(
        &self,
        after: Option<&Cursor>,
        limit: usize,
    ) -> anyhow::Result<Vec<BuildRecord>>;

    /// The number of records, without counting them (a counter the store keeps).
    async fn count(&self) -> anyhow::Result<usize>;

    /// The records whose `alias` is `alias`, whoever owns them, oldest first.
    async fn aliased(&self, alias: &str) -> anyhow::Result<Vec<BuildRecord>>;

    /// The records still `running` that this node submitted (after a restart: jobs that
    /// died with the old process; another front end's running builds are not its to judge).
    async fn running(&self) -> anyhow::Result<Vec<BuildRecord>>;
}

/// The persisted history over its [`HistoryStore`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct History {
    store: std::sync::Arc<dyn HistoryStore>,
}

/// How many records a page reads from the store at a time, beyond the page itself (records
/// the view hides, e.g. another tenant's, are read and skipped).
const PAGE_READ_AHEAD: usize = 16;

impl History {
    /// The history kept by `store`.
    pub fn over(store: std::sync::Arc<dyn HistoryStore>) -> History {
        History { store }
    }

    /// The history in the embedded database of `blobs` (its time index rebuilt when it does
    /// not match the records).
    pub fn embedded(blobs: &rba_cas::BlobStore) -> anyhow::Result<History> {
        Ok(History::over(std::sync::Arc::new(
            embedded::EmbeddedHistory::open(blobs)?,
        )))
    }

    /// `embedded` or `postgres`.
    pub fn backend(&self) -> &'static str {
        self.store.backend()
    }

    /// Stores (replaces) a record.
    pub async fn put(&self, record: &BuildRecord) -> anyhow::Result<()> {
        self.store.put(record).await.map(|_| ())
    }

    /// A record by session id; `None` also when the store cannot answer (logged), so a
    /// reader is refused rather than shown something it may not see.
    pub async fn get(&self, id: &str) -> Option<BuildRecord> {
        match self.store.get(id).await {
            Ok(record) => record,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), id, "reading a build record");
                None
            }
        }
    }

    /// The records that answer to `alias` (see [`BuildRecord::alias`]), oldest first; none
    /// when the store cannot answer (logged).
    pub async fn aliased(&self, alias: &str) -> Vec<BuildRecord> {
        match self.store.aliased(alias).await {
            Ok(records) => records,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), alias, "reading aliased build records");
                Vec::new()
            }
        }
    }

    /// Up to `limit` records older than `after` (from the newest when `None`), newest first,
    /// mapped by `view` (`None`: not shown, e.g. another tenant's or filtered out). Reads
    /// records from the store a batch at a time until the page is full and one more shown
    /// record proves a next page.
    pub async fn page<T>(
        &self,
        after: Option<&Cursor>,
        limit: usize,
        mut view: impl FnMut(BuildRecord) -> Option<T>,
    ) -> anyhow::Result<Page<T>> {
        let batch = limit.saturating_add(1).saturating_add(PAGE_READ_AHEAD);
        let mut items = Vec::new();
        let mut last = None;
        let mut read_from = after.cloned();
        loop {
            let records = self.store.older_than(read_from.as_ref(), batch).await?;
            let exhausted = records.len() < batch;
            for record in records {
                let cursor = Cursor {
                    at_ms: record.submitted_at_ms,
                    id: record.id.clone(),
                };
                read_from = Some(cursor.clone());
                if items.len() == limit {
                    // One more shown record exists: the page has a successor.
                    if view(record).is_some() {
                        return Ok(Page { items, next: last });
                    }
                    continue;
                }
                if let Some(item) = view(record) {
                    items.push(item);
                    last = Some(cursor);
                }
            }
            if exhausted {
                return Ok(Page { items, next: None });
            }
        }
    }

    /// The newest record that `keep` accepts.
    pub async fn latest(
        &self,
        keep: impl Fn(&BuildRecord) -> bool,
    ) -> anyhow::Result<Option<BuildRecord>> {
        Ok(self
            .page(None, 1, |record| keep(&record).then_some(record))
            .await?
            .items
            .pop())
    }

    /// Number of records (a counter the store keeps: no scan).
    pub async fn count(&self) -> anyhow::Result<usize> {
        self.store.count().await
    }

    /// This node's records still `running` (after a restart: jobs that died with the old
    /// process) become `error`.
    pub async fn mark_interrupted(&self) -> anyhow::Result<usize> {
        let mut count = 0;
        for mut record in self.store.running().await? {
            record.status = "error".to_string();
            record.error = Some("the node stopped while the job ran".to_string());
            self.put(&record).await?;
            count += 1;
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, at: u64, tenant: &str) -> BuildRecord {
        BuildRecord {
            id: id.into(),
            kind: "build".into(),
            release: false,
            input_root: String::new(),
            action_digest: String::new(),
            client: None,
            workspace: Some("w".into()),
            tenant: Some(tenant.into()),
            alias: None,
            submitted_at_ms: at,
            status: "success".into(),
            exit_code: Some(0),
            cache_hit: false,
            duration_ms: Some(1),
            steps: vec![],
            log_digest: None,
            lines: None,
            artifacts: vec![],
            error: None,
        }
    }

    fn embedded(dir: &std::path::Path) -> (rba_cas::BlobStore, History) {
        let blobs = rba_cas::BlobStore::open(dir, rba_cas::StoreConfig::default()).unwrap();
        let history = History::embedded(&blobs).unwrap();
        (blobs, history)
    }

    #[tokio::test]
    async fn pages_walk_the_time_index_newest_first_and_the_index_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let (blobs, history) = embedded(dir.path());
        // Two records in the same millisecond, ids out of order.
        for (id, at) in [("b", 5), ("a", 5), ("c", 1), ("d", 9), ("e", 3)] {
            let tenant = if id == "c" { "other" } else { "me" };
            history.put(&record(id, at, tenant)).await.unwrap();
        }
        // Putting a record again (its outcome) does not add a second index entry.
        history.put(&record("d", 9, "me")).await.unwrap();
        assert_eq!(
            history.count().await.unwrap(),
            5,
            "a replaced record is not counted twice"
        );
        let mine = |r: BuildRecord| (r.tenant.as_deref() == Some("me")).then_some(r.id);
        let first = history.page(None, 2, mine).await.unwrap();
        assert_eq!(first.items, ["d", "b"]);
        let next = first.next.unwrap();
        assert_eq!(next.to_string(), "5-b");
        assert_eq!(next.to_string().parse::<Cursor>().unwrap(), next);
        let second = history.page(Some(&next), 2, mine).await.unwrap();
        assert_eq!(second.items, ["a", "e"]);
        // Only another tenant's record is left: no next page.
        assert!(second.next.is_none(), "{:?}", second.next);
        let latest = history.latest(|r| r.id != "d").await.unwrap().unwrap();
        assert_eq!(latest.id, "b");
        for bad in ["", "x-y", "5", "5-"] {
            assert!(bad.parse::<Cursor>().is_err(), "{bad:?}");
        }
        // A history written before the index: rebuilt at open.
        rba_cas::EmbeddedRecords::open(&blobs, "builds_by_time")
            .unwrap()
            .clear()
            .unwrap();
        drop(history);
        let history = History::embedded(&blobs).unwrap();
        let all = history.page(None, 10, |r| Some(r.id)).await.unwrap();
        assert_eq!(all.items, ["d", "b", "a", "e", "c"]);
        assert_eq!(history.count().await.unwrap(), 5, "counted again at open");
        // A page larger than a store read, with most records hidden, still fills.
        for i in 0..100u64 {
            let tenant = if i % 10 == 0 { "me" } else { "other" };
            history
                .put(&record(&format!("n{i:03}"), 100 + i, tenant))
                .await
                .unwrap();
        }
        let mine_page = history.page(None, 7, mine).await.unwrap();
        assert_eq!(
            mine_page.items,
            ["n090", "n080", "n070", "n060", "n050", "n040", "n030"]
        );
        let rest = history
            .page(mine_page.next.as_ref(), 100, mine)
            .await
            .unwrap();
        assert_eq!(rest.items, ["n020", "n010", "n000", "d", "b", "a", "e"]);
        assert!(rest.next.is_none());
    }

    #[tokio::test]
    async fn interrupted_builds_become_errors_and_old_records_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let (blobs, history) = embedded(dir.path());
        let mut running = record("r", 2, "peer:1");
        running.status = "running".into();
        history.put(&running).await.unwrap();
        history.put(&record("s", 1, "peer:1")).await.unwrap();
        // A record from before tenants reads back without one.
        rba_cas::EmbeddedRecords::open(&blobs, "builds")
            .unwrap()
            .insert(b"old", br#"{"id":"old","kind":"build","release":false,"input_root":"","action_digest":"","client":null,"submitted_at_ms":0,"status":"success","exit_code":0,"cache_hit":false,"duration_ms":1,"steps":[],"log_digest":null,"lines":0,"artifacts":[],"error":null}"#)
            .unwrap();
        assert_eq!(history.get("old").await.unwrap().tenant, None);
        assert_eq!(history.mark_interrupted().await.unwrap(), 1);
        let r = history.get("r").await.unwrap();
        assert_eq!(
            (r.status.as_str(), r.tenant.as_deref()),
            ("error", Some("peer:1"))
        );
        assert_eq!(history.get("s").await.unwrap().status, "success");
        assert!(history.get("zzz").await.is_none());
        assert_eq!(history.mark_interrupted().await.unwrap(), 0);
        // Aliases: found by name, whoever owns them, and kept across an open.
        let mut aliased = record("t", 3, "peer:2");
        aliased.alias = Some("0xabc".into());
        history.put(&aliased).await.unwrap();
        let mut other = record("u", 4, "peer:1");
        other.alias = Some("0xabc".into());
        history.put(&other).await.unwrap();
        history.put(&record("v", 5, "peer:1")).await.unwrap();
        let history = History::embedded(&blobs).unwrap();
        let named: Vec<String> = history
            .aliased("0xabc")
            .await
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(named, ["t", "u"]);
        assert!(history.aliased("0xab").await.is_empty());
    }

    #[test]
    fn finished_steps_name_their_lines_in_the_log() {
        let mut build = record("x", 1, "me");
        let outcome = |ends: Vec<u64>| JobOutcome {
            status: JobStatus::Success,
            exit_code: 0,
            result: None,
            cache_hit: false,
            duration: std::time::Duration::from_millis(30),
            log: None,
            artifacts: vec![],
            steps: ["queue", "sync", "build"]
                .iter()
                .map(|s| (s.to_string(), std::time::Duration::from_millis(10)))
                .collect(),
            step_end_lines: ends,
            error: None,
            timed_out: false,
            limit: None,
            peak_memory_bytes: None,
        };
        build.finish(&outcome(vec![0, 1, 9]), 10);
        let ranges: Vec<_> = build
            .steps
            .iter()
            .map(|s| (s.name.as_str(), s.first_line, s.end_line))
            .collect();
        assert_eq!(
            ranges,
            [
                ("queue", Some(0), Some(0)),
                ("sync", Some(0), Some(1)),
                ("build", Some(1), Some(9))
            ]
        );
        // An outcome that does not locate its steps: durations only, and no ranges in JSON.
        build.finish(&outcome(vec![]), 10);
        assert!(build.steps.iter().all(|s| s.first_line.is_none()));
        assert!(
            !serde_json::to_string(&build)
                .unwrap()
                .contains("first_line")
        );
    }
}
