//! The typed read API: what `GET /builds`, `/builds/{id}` and `/cache/stats` answer, built
//! from the history and the executor's live state.
//!
//! Why a module of its own: the JSON API (curl, other web apps through CORS), the dashboard's
//! pages and the SVG badges all show the same facts — a build's status with its queue position
//! or units done, its artifacts with sizes, the cache's hit rate — and each fact must be
//! computed in one place. A build's history record says `running` from submission to the end;
//! only the executor knows whether it still waits for a worker (`queued`, with a position) or
//! how many units cargo has built, so [`BuildView::new`] joins the two.
//!
//! Statuses: `queued`, `running`, `success`, `failed` (cargo said no), `error` (the job broke),
//! `cancelled`; `cache_hit` says a `success` was answered from the action cache.

use rba_executor::runner::JobState;
use serde::{Deserialize, Serialize};

use crate::history::{BuildRecord, StepRecord};
use crate::node::NodeShared;

/// Every status a build view may have (the `status` filter takes these and `cache-hit`).
pub const STATUSES: &[&str] = &[
    "queued",
    "running",
    "success",
    "failed",
    "error",
    "cancelled",
];

/// Every job kind's name (the `kind` filter takes these).
pub fn kinds() -> impl Iterator<Item = &'static str> {
    rba_executor::cargo::JobKind::ALL
        .into_iter()
        .map(|k| k.name())
}

/// Units done / total of a running cargo job (`total` 0: unknown yet).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Progress {
    /// Units built (fresh ones included).
    pub done: u32,
    /// Units expected (an estimate from `Cargo.lock`; 0 when unknown).
    pub total: u32,
}

/// An artifact of a build, downloadable at `download` by whoever may read the build.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ArtifactView {
    /// `target/debug/hello`.
    pub path: String,
    /// `blake3:HEX/SIZE`.
    pub digest: String,
    /// Bytes.
    pub size: u64,
    /// Executable bit.
    pub executable: bool,
    /// `/builds/{id}/artifacts/{index}`.
    pub download: String,
}

/// One build as the read API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BuildView {
    /// Session id.
    pub id: String,
    /// `build`, `test`, `clippy`, `audit`, `check`, `fmt`.
    pub kind: String,
    /// Release profile.
    pub release: bool,
    /// The workspace's name as its client hinted it (`None` in old records).
    pub workspace: Option<String>,
    /// The tenant that submitted it (`peer:…`, `token:…`, `local`).
    pub tenant: Option<String>,
    /// The submitting libp2p peer, if any.
    pub client: Option<String>,
    /// Milliseconds since the epoch.
    pub submitted_at_ms: u64,
    /// See the module doc.
    pub status: String,
    /// Jobs ahead of it while `queued` (0: next).
    pub queue_position: Option<usize>,
    /// Units done / total while `running` (cargo jobs).
    pub progress: Option<Progress>,
    /// Answered from the action cache.
    pub cache_hit: bool,
    /// Cargo's exit code once finished (-1: did not run).
    pub exit_code: Option<i32>,
    /// Wall time, once finished.
    pub duration_ms: Option<u64>,
    /// Time since submission while not finished (the server's clock).
    pub elapsed_ms: Option<u64>,
    /// Per-step durations (`queue`, `slot-lock`, `sync`, `fetch`, `build`, `outputs`…) and
    /// the log lines each printed (`first_line..end_line`), once finished.
    pub steps: Vec<StepRecord>,
    /// Artifacts, once finished.
    pub artifacts: Vec<ArtifactView>,
    /// The Action digest (the cache key).
    pub action_digest: String,
    /// The input root digest.
    pub input_root: String,
    /// The stored log (`GET /builds/{id}/logs`), once finished.
    pub log_digest: Option<String>,
    /// Log lines written so far.
    pub lines: Option<u64>,
    /// What went wrong, when the job broke.
    pub error: Option<String>,
}

impl BuildView {
    /// The view of `record`, with the executor's live state while the job is known to it.
    pub fn new(node: &NodeShared, record: BuildRecord) -> BuildView {
        let live = (!record.is_finished())
            .then(|| node.executor.job(&record.id))
            .flatten();
        let (mut status, mut queue_position, mut progress, mut lines) =
            (record.status.clone(), None, None, record.lines);
        if let Some(handle) = &live {
            lines = Some(handle.log.lines_written());
            match handle.state() {
                JobState::Queued { position } => {
                    status = "queued".to_string();
                    queue_position = Some(position);
                }
                JobState::Running { done, total } => progress = Some(Progress { done, total }),
                // Done, the history not yet written: the record catches up within moments.
                JobState::Done(_) => {}
            }
        }
        let elapsed_ms = (!record.is_finished())
            .then(|| crate::history::now_ms().saturating_sub(record.submitted_at_ms));
        let artifacts = record
            .artifacts
            .iter()
            .enumerate()
            .map(|(index, a)| ArtifactView {
                path: a.path.clone(),
                size: a
                    .digest
                    .parse::<rba_cas::Digest>()
                    .map(|d| d.size)
                    .unwrap_or(0),
                digest: a.digest.clone(),
                executable: a.executable,
                download: format!("/builds/{}/artifacts/{index}", record.id),
            })
            .collect();
        if live.is_none() {
            // A record that says running but whose job the executor forgot.
            progress = None;
        }
        if record.is_finished() {
            queue_position = None;
        }
        BuildView {
            id: record.id,
            kind: record.kind,
            release: record.release,
            workspace: record.workspace,
            tenant: record.tenant,
            client: record.client,
            submitted_at_ms: record.submitted_at_ms,
            status,
            queue_position,
            progress,
            cache_hit: record.cache_hit,
            exit_code: record.exit_code,
            duration_ms: record.duration_ms,
            elapsed_ms,
            steps: record.steps,
            artifacts,
            action_digest: record.action_digest,
            input_root: record.input_root,
            log_digest: record.log_digest,
            lines,
            error: record.error,
        }
    }

    /// The badge's word: `cache hit` for a success from the cache, else the status.
    pub fn badge_label(&self) -> &str {
        if self.cache_hit && self.status == "success" {
            "cache hit"
        } else {
            &self.status
        }
    }
}

/// The filters of `GET /builds`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Page size (default 50, at most 500).
    pub limit: Option<usize>,
    /// Where the page starts: the `cursor` of the previous page's `Link: rel="next"`.
    pub cursor: Option<String>,
    /// Only builds with this status (one of [`STATUSES`], or `cache-hit`).
    pub status: Option<String>,
    /// Only builds of this kind (one of [`kinds`]).
    pub kind: Option<String>,
    /// Only builds of this workspace.
    pub workspace: Option<String>,
}

/// Default page size.
pub const DEFAULT_PAGE: usize = 50;
/// Largest page.
pub const MAX_PAGE: usize = 500;

/// A bad filter: the field and why (the API answers 400 with both).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadQuery {
    /// The query parameter at fault.
    pub field: &'static str,
    /// Why.
    pub message: String,
}

impl ListQuery {
    /// Checks the filters; the cursor parsed.
    pub fn check(&self) -> Result<Option<crate::history::Cursor>, BadQuery> {
        if let Some(status) = &self.status
            && status != "cache-hit"
            && !STATUSES.contains(&status.as_str())
        {
            return Err(BadQuery {
                field: "status",
                message: format!(
                    "unknown status {status:?}: one of {}, cache-hit",
                    STATUSES.join(", ")
                ),
            });
        }
        if let Some(kind) = &self.kind
            && !kinds().any(|k| k == kind)
        {
            return Err(BadQuery {
                field: "kind",
                message: format!(
                    "unknown kind {kind:?}: one of {}",
                    kinds().collect::<Vec<_>>().join(", ")
                ),
            });
        }
        if self.limit == Some(0) {
            return Err(BadQuery {
                field: "limit",
                message: "limit must be at least 1".to_string(),
            });
        }
        self.cursor
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|message| BadQuery {
                field: "cursor",
                message,
            })
    }

    /// The page size asked for, within bounds.
    pub fn page_size(&self) -> usize {
        self.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE)
    }

    /// Whether a record passes the filters that do not need the live state.
    pub fn keeps_record(&self, record: &BuildRecord) -> bool {
        self.kind.as_deref().is_none_or(|k| record.kind == k)
            && self
                .workspace
                .as_deref()
                .is_none_or(|w| record.workspace.as_deref() == Some(w))
            && match self.status.as_deref() {
                None => true,
                // Queued builds are `running` in the history.
                Some("queued") | Some("running") => !record.is_finished(),
                Some("cache-hit") => record.cache_hit && record.status == "success",
                Some(status) => record.status == status,
            }
    }

    /// Whether a view passes the status filter (queued and running differ only live).
    pub fn keeps_view(&self, view: &BuildView) -> bool {
        match self.status.as_deref() {
            Some("queued") => view.status == "queued",
            Some("running") => view.status == "running",
            _ => true,
        }
    }

    /// The query string of the page after `cursor`, with the same filters.
    pub fn next_query(&self, cursor: &crate::history::Cursor) -> String {
        let mut parts = vec![format!("limit={}", self.page_size())];
        for (name, value) in [
            ("status", &self.status),
            ("kind", &self.kind),
            ("workspace", &self.workspace),
        ] {
            if let Some(value) = value {
                parts.push(format!("{name}={}", query_escape(value)));
            }
        }
        parts.push(format!("cursor={}", query_escape(&cursor.to_string())));
        parts.join("&")
    }
}

/// Percent-encodes everything but unreserved characters.
fn query_escape(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What `GET /cache/stats` answers.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CacheView {
    /// Bytes held by the CAS.
    pub total_bytes: u64,
    /// Blobs held by the CAS.
    pub blob_count: u64,
    /// Blobs evicted since start.
    pub evictions: u64,
    /// Bytes evicted since start.
    pub evicted_bytes: u64,
    /// The CAS's capacity.
    pub max_bytes: u64,
    /// Action cache entries.
    pub action_cache_entries: u64,
    /// Build records in the history.
    pub builds: usize,
    /// Jobs answered from the action cache since start.
    pub cache_hits: u64,
    /// Jobs that ended since start.
    pub jobs_finished: u64,
    /// `cache_hits / jobs_finished` (0 before the first job).
    pub hit_rate: f64,
    /// Concurrent jobs.
    pub workers: usize,
    /// Jobs waiting for a worker.
    pub queued: usize,
    /// Per-workspace slots (target dirs) on disk.
    pub slots: usize,
    /// Bytes of the shared cargo home (the registry cache every job reads).
    pub registry_cache_bytes: u64,
    /// Registry units shared across workspaces (`rba_executor::shared_units`).
    pub shared_units: rba_executor::shared_units::SharedUnitStats,
}

impl CacheView {
    /// The statistics now; `usage` is the executor's cache usage (a directory walk the
    /// caller does off the async threads, and not too often); `builds` the history's count.
    pub fn new(
        node: &NodeShared,
        usage: rba_executor::caches::CacheUsage,
        builds: usize,
    ) -> CacheView {
        let stats = node.store_stats();
        let (cache_hits, jobs_finished) = (node.metrics.cache_hits(), node.metrics.jobs_finished());
        CacheView {
            total_bytes: stats.total_bytes,
            blob_count: stats.blob_count,
            evictions: stats.evictions,
            evicted_bytes: stats.evicted_bytes,
            max_bytes: node.cas.blobs.config().max_bytes,
            action_cache_entries: node.action_cache_entries(),
            builds,
            cache_hits,
            jobs_finished,
            hit_rate: if jobs_finished == 0 {
                0.0
            } else {
                cache_hits as f64 / jobs_finished as f64
            },
            workers: node.config.workers.slots,
            queued: node.executor.queue_len(),
            slots: usage.slots,
            registry_cache_bytes: usage.cargo_home_bytes,
            shared_units: usage.shared_units,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_checked_and_the_next_page_keeps_them() {
        let query = ListQuery {
            status: Some("cache-hit".into()),
            kind: Some("test".into()),
            workspace: Some("a b&c".into()),
            ..Default::default()
        };
        assert_eq!(query.check(), Ok(None));
        let cursor = crate::history::Cursor {
            at_ms: 12,
            id: "x-y".into(),
        };
        assert_eq!(
            query.next_query(&cursor),
            "limit=50&status=cache-hit&kind=test&workspace=a%20b%26c&cursor=12-x-y"
        );
        let bad = |query: ListQuery| query.check().unwrap_err().field;
        assert_eq!(
            bad(ListQuery {
                status: Some("done".into()),
                ..Default::default()
            }),
            "status"
        );
        assert_eq!(
            bad(ListQuery {
                kind: Some("<script>".into()),
                ..Default::default()
            }),
            "kind"
        );
        assert_eq!(
            bad(ListQuery {
                cursor: Some("nope".into()),
                ..Default::default()
            }),
            "cursor"
        );
        assert_eq!(
            bad(ListQuery {
                limit: Some(0),
                ..Default::default()
            }),
            "limit"
        );
        assert_eq!(
            ListQuery {
                limit: Some(1_000_000),
                ..Default::default()
            }
            .page_size(),
            MAX_PAGE
        );
    }
}
