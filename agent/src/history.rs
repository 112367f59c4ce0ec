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
        self.steps = outcome
            .steps
            .iter()
            .map(|(name, took)| StepRecord {
                name: name.clone(),
                ms: took.as_millis() as u64,
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

/// The persisted history. Cheap to clone.
#[derive(Clone, Debug)]
pub struct History {
    tree: sled::Tree,
}

impl History {
    /// Opens the `builds` tree of the CAS's sled database.
    pub fn open(db: &sled::Db) -> anyhow::Result<Self> {
        Ok(History {
            tree: db.open_tree("builds")?,
        })
    }

    /// Stores (replaces) a record.
    pub fn put(&self, record: &BuildRecord) -> anyhow::Result<()> {
        self.tree
            .insert(record.id.as_bytes(), serde_json::to_vec(record)?)?;
        Ok(())
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

    /// Number of records.
    pub fn len(&self) -> usize {
        self.tree.len()
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
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
}
