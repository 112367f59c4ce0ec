//! Build history: one record per session, persisted in the CAS's own sled database (tree
//! `builds`), so `GET /builds`, re-attaching to a finished session and the figures survive a
//! restart of the node.
//!
//! Why here and not in the executor: the executor knows jobs only while it runs; who submitted
//! what, and the record kept after the job is forgotten, is the operator node's business.
//!
//! Each record names its owner tenant (`peer:…`, `local`): the HTTP views and session
//! attachment show a build only to callers that may see that tenant. Records written before
//! tenants existed have none and are shown only to callers that see every tenant.
//!
//! Newest first, a page at a time: a second tree (`builds_by_time`) keys every record by
//! `submitted_at_ms` (big-endian) and id, so a page of the dashboard reads its own records and
//! the ones it skips, never the whole history ([`History::page`]; a history of 10,000 builds
//! must not ship, nor be parsed, to show 50). The index is rebuilt at open when it does not
//! match the records (a history written before it existed).

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
    /// `build`, `test`, `clippy`, `audit`, `check`, `fmt`.
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

/// The persisted history. Cheap to clone.
#[derive(Clone, Debug)]
pub struct History {
    tree: sled::Tree,
    /// `submitted_at_ms` (8 bytes big-endian) ++ id → empty: the records newest first.
    by_time: sled::Tree,
    /// Records stored: counted once at open, then kept by `put`, so `/cache/stats` never
    /// scans the tree (sled's `len` is a full scan).
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

fn time_key(at_ms: u64, id: &str) -> Vec<u8> {
    let mut key = at_ms.to_be_bytes().to_vec();
    key.extend_from_slice(id.as_bytes());
    key
}

impl History {
    /// Opens the `builds` tree of the CAS's sled database (and its time index, rebuilt when it
    /// does not match).
    pub fn open(db: &sled::Db) -> anyhow::Result<Self> {
        let tree = db.open_tree("builds")?;
        let count = tree.len();
        let history = History {
            tree,
            by_time: db.open_tree("builds_by_time")?,
            count: std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(count)),
        };
        if history.by_time.len() != count {
            history.by_time.clear()?;
            for record in history.list(usize::MAX) {
                history
                    .by_time
                    .insert(time_key(record.submitted_at_ms, &record.id), &[])?;
            }
        }
        Ok(history)
    }

    /// Stores (replaces) a record. A record's `submitted_at_ms` never changes, so its index
    /// key stays the same.
    pub fn put(&self, record: &BuildRecord) -> anyhow::Result<()> {
        let previous = self
            .tree
            .insert(record.id.as_bytes(), serde_json::to_vec(record)?)?;
        if previous.is_none() {
            self.count
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.by_time
            .insert(time_key(record.submitted_at_ms, &record.id), &[])?;
        Ok(())
    }

    /// Up to `limit` records older than `after` (from the newest when `None`), newest first,
    /// mapped by `view` (`None`: not shown, e.g. another tenant's or filtered out). Reads
    /// records until the page is full, through the time index.
    pub fn page<T>(
        &self,
        after: Option<&Cursor>,
        limit: usize,
        mut view: impl FnMut(BuildRecord) -> Option<T>,
    ) -> Page<T> {
        let end = match after {
            Some(cursor) => std::ops::Bound::Excluded(time_key(cursor.at_ms, &cursor.id)),
            None => std::ops::Bound::Unbounded,
        };
        let mut items = Vec::new();
        let mut last = None;
        for key in self
            .by_time
            .range::<Vec<u8>, _>((std::ops::Bound::Unbounded, end))
            .keys()
            .rev()
            .filter_map(Result::ok)
        {
            if key.len() < 8 {
                continue;
            }
            let id = String::from_utf8_lossy(&key[8..]).to_string();
            let Some(record) = self.get(&id) else {
                continue;
            };
            if items.len() == limit {
                // One more shown record exists: the page has a successor.
                if view(record).is_some() {
                    return Page { items, next: last };
                }
                continue;
            }
            let cursor = Cursor {
                at_ms: record.submitted_at_ms,
                id: record.id.clone(),
            };
            if let Some(item) = view(record) {
                items.push(item);
                last = Some(cursor);
            }
        }
        Page { items, next: None }
    }

    /// The newest record that `keep` accepts.
    pub fn latest(&self, keep: impl Fn(&BuildRecord) -> bool) -> Option<BuildRecord> {
        self.page(None, 1, |record| keep(&record).then_some(record))
            .items
            .pop()
    }

    /// A record by session id.
    pub fn get(&self, id: &str) -> Option<BuildRecord> {
        let bytes = self.tree.get(id.as_bytes()).ok()??;
        serde_json::from_slice(&bytes).ok()
    }

    /// The most recent records first, at most `limit`.
    pub fn list(&self, limit: usize) -> Vec<BuildRecord> {
        self.list_where(limit, |_| true)
    }

    /// The most recent records that `keep` accepts, at most `limit` (e.g. one tenant's).
    pub fn list_where(
        &self,
        limit: usize,
        keep: impl Fn(&BuildRecord) -> bool,
    ) -> Vec<BuildRecord> {
        let mut records: Vec<BuildRecord> = self
            .tree
            .iter()
            .values()
            .filter_map(|v| v.ok())
            .filter_map(|v| serde_json::from_slice::<BuildRecord>(&v).ok())
            .filter(|record| keep(record))
            .collect();
        records.sort_by(|a, b| {
            b.submitted_at_ms
                .cmp(&a.submitted_at_ms)
                .then(a.id.cmp(&b.id))
        });
        records.truncate(limit);
        records
    }

    /// Number of records (a counter: no scan).
    pub fn len(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records still `running` (after a restart: jobs that died with the old process) become
    /// `error`.
    pub fn mark_interrupted(&self) -> anyhow::Result<usize> {
        let mut count = 0;
        for mut record in self.list(usize::MAX) {
            if !record.is_finished() {
                record.status = "error".to_string();
                record.error = Some("the node stopped while the job ran".to_string());
                self.put(&record)?;
                count += 1;
            }
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_list_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let history = History::open(&db).unwrap();
        for (id, at) in [("a", 1), ("b", 3), ("c", 2)] {
            history
                .put(&BuildRecord {
                    id: id.into(),
                    kind: "build".into(),
                    release: false,
                    input_root: String::new(),
                    action_digest: String::new(),
                    client: None,
                    workspace: None,
                    tenant: Some(format!("peer:{}", at % 2)),
                    submitted_at_ms: at,
                    status: "running".into(),
                    exit_code: None,
                    cache_hit: false,
                    duration_ms: None,
                    steps: vec![],
                    log_digest: None,
                    lines: None,
                    artifacts: vec![],
                    error: None,
                })
                .unwrap();
        }
        let ids: Vec<String> = history.list(2).into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["b", "c"]);
        let odd: Vec<String> = history
            .list_where(10, |r| r.tenant.as_deref() == Some("peer:1"))
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(odd, ["b", "a"]);
        // A record from before tenants reads back without one.
        history
            .tree
            .insert("old", br#"{"id":"old","kind":"build","release":false,"input_root":"","action_digest":"","client":null,"submitted_at_ms":0,"status":"success","exit_code":0,"cache_hit":false,"duration_ms":1,"steps":[],"log_digest":null,"lines":0,"artifacts":[],"error":null}"#.to_vec())
            .unwrap();
        assert_eq!(history.get("old").unwrap().tenant, None);
        assert_eq!(history.mark_interrupted().unwrap(), 3);
        assert_eq!(history.get("a").unwrap().tenant.as_deref(), Some("peer:1"));
        assert_eq!(history.get("a").unwrap().status, "error");
        assert!(history.get("zzz").is_none());
    }

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

    #[test]
    fn pages_walk_the_time_index_newest_first_and_the_index_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let history = History::open(&db).unwrap();
        // Two records in the same millisecond, ids out of order.
        for (id, at) in [("b", 5), ("a", 5), ("c", 1), ("d", 9), ("e", 3)] {
            let tenant = if id == "c" { "other" } else { "me" };
            history.put(&record(id, at, tenant)).unwrap();
        }
        // Putting a record again (its outcome) does not add a second index entry.
        history.put(&record("d", 9, "me")).unwrap();
        assert_eq!(history.len(), 5, "a replaced record is not counted twice");
        let mine = |r: BuildRecord| (r.tenant.as_deref() == Some("me")).then_some(r.id);
        let first = history.page(None, 2, mine);
        assert_eq!(first.items, ["d", "b"]);
        let next = first.next.unwrap();
        assert_eq!(next.to_string(), "5-b");
        assert_eq!(next.to_string().parse::<Cursor>().unwrap(), next);
        let second = history.page(Some(&next), 2, mine);
        assert_eq!(second.items, ["a", "e"]);
        // Only another tenant's record is left: no next page.
        assert!(second.next.is_none(), "{:?}", second.next);
        assert_eq!(history.latest(|r| r.id != "d").unwrap().id, "b");
        for bad in ["", "x-y", "5", "5-"] {
            assert!(bad.parse::<Cursor>().is_err(), "{bad:?}");
        }
        // A history written before the index: rebuilt at open.
        history.by_time.clear().unwrap();
        drop(history);
        let history = History::open(&db).unwrap();
        assert_eq!(
            history.page(None, 10, |r| Some(r.id)).items,
            ["d", "b", "a", "e", "c"]
        );
        assert_eq!(history.len(), 5, "counted again at open");
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
