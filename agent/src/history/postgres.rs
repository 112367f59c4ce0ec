//! [`PgHistory`]: the build history in PostgreSQL, for a front end of a scale-out deployment,
//! so the builds a front end recorded are still listed, attachable and badged after it is
//! replaced (a new machine, a fresh data dir) and every front end over the same database
//! shows the same history.
//!
//! One table, `rba_builds` (schema component [`SCHEMA_COMPONENT`], migrated like the store's
//! and the queue's): the record as JSON beside the columns queries use (`submitted_at_ms`
//! and the id, collated bytewise like the embedded index, for newest-first pages; `running`
//! and `front_end` for the sweep of interrupted builds; `alias` and `tenant`, unique together,
//! so two front ends cannot give one owner's alias to two builds). A one-row table keeps the count, so
//! opening never counts the table. Each front end names itself (its libp2p peer id, stable
//! with its data dir) and, at start, marks interrupted only the builds it submitted: another
//! front end's running builds are alive.

use anyhow::Context;
use rba_cas::backends::postgres::Postgres;

use super::{BuildRecord, Cursor, HistoryStore};

/// The history's component in `rba_schema`.
pub const SCHEMA_COMPONENT: &str = "history";

/// The history's migrations, in order: version `i + 1` is `MIGRATIONS[i]`.
pub const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE rba_builds (
    id               TEXT COLLATE "C" PRIMARY KEY,
    submitted_at_ms  BIGINT NOT NULL,
    running          BOOLEAN NOT NULL,
    front_end        TEXT NOT NULL,
    tenant           TEXT,
    alias            TEXT,
    record           TEXT NOT NULL
);
CREATE UNIQUE INDEX rba_builds_alias ON rba_builds (alias, tenant) WHERE alias IS NOT NULL;
CREATE INDEX rba_builds_newest ON rba_builds (submitted_at_ms DESC, id DESC);
CREATE INDEX rba_builds_running ON rba_builds (front_end) WHERE running;
CREATE TABLE rba_builds_count (
    only_row  BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
    records   BIGINT NOT NULL
);
INSERT INTO rba_builds_count (records) VALUES (0);
"#];

/// The history in PostgreSQL, as seen by front end `front_end`. Cheap to clone.
#[derive(Clone)]
pub struct PgHistory {
    pool: deadpool_postgres::Pool,
    front_end: String,
}

impl std::fmt::Debug for PgHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgHistory")
            .field("front_end", &self.front_end)
            .finish_non_exhaustive()
    }
}

/// A stored record, or `None` (logged) for one that does not decode — written by a newer
/// version, or damaged: as the embedded history does, such a record is left out of lists and
/// lookups instead of failing every page that holds it.
fn decode(row: &deadpool_postgres::tokio_postgres::Row) -> Option<BuildRecord> {
    let json: &str = row.get(0);
    match serde_json::from_str(json) {
        Ok(record) => Some(record),
        Err(error) => {
            tracing::warn!(%error, "a build record in rba_builds does not decode; left out");
            None
        }
    }
}

fn decode_all(rows: &[deadpool_postgres::tokio_postgres::Row]) -> Vec<BuildRecord> {
    rows.iter().filter_map(decode).collect()
}

fn millis(at_ms: u64) -> i64 {
    i64::try_from(at_ms).unwrap_or(i64::MAX)
}

impl PgHistory {
    /// The history in `postgres` (its schema brought to this version) for the front end
    /// named `front_end`.
    pub async fn open(postgres: &Postgres, front_end: &str) -> anyhow::Result<PgHistory> {
        postgres
            .migrate(SCHEMA_COMPONENT, MIGRATIONS)
            .await
            .context("migrating the build history's schema")?;
        Ok(PgHistory {
            pool: postgres.pool().clone(),
            front_end: front_end.to_string(),
        })
    }

    async fn client(&self) -> anyhow::Result<deadpool_postgres::Object> {
        self.pool
            .get()
            .await
            .context("postgres: the build history has no connection")
    }
}

#[async_trait::async_trait]
impl HistoryStore for PgHistory {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn put(&self, record: &BuildRecord) -> anyhow::Result<bool> {
        let json = serde_json::to_string(record)?;
        let client = self.client().await?;
        let row = client
            .query_one(
                "WITH stored AS (
                     INSERT INTO rba_builds
                         (id, submitted_at_ms, running, front_end, tenant, alias, record)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (id) DO UPDATE
                         SET running = EXCLUDED.running, alias = EXCLUDED.alias,
                             record = EXCLUDED.record
                     RETURNING (xmax = 0) AS inserted
                 ), counted AS (
                     UPDATE rba_builds_count SET records = records + 1
                     WHERE (SELECT inserted FROM stored)
                 )
                 SELECT inserted FROM stored",
                &[
                    &record.id,
                    &millis(record.submitted_at_ms),
                    &!record.is_finished(),
                    &self.front_end,
                    &record.tenant,
                    &record.alias,
                    &json,
                ],
            )
            .await
            .context("postgres: storing a build record")?;
        Ok(row.get(0))
    }

    async fn get(&self, id: &str) -> anyhow::Result<Option<BuildRecord>> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT record FROM rba_builds WHERE id = $1", &[&id])
            .await
            .context("postgres: reading a build record")?;
        Ok(row.as_ref().and_then(decode))
    }

    async fn older_than(
        &self,
        after: Option<&Cursor>,
        limit: usize,
    ) -> anyhow::Result<Vec<BuildRecord>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let client = self.client().await?;
        let rows = match after {
            None => {
                client
                    .query(
                        "SELECT record FROM rba_builds
                         ORDER BY submitted_at_ms DESC, id DESC LIMIT $1",
                        &[&limit],
                    )
                    .await
            }
            Some(cursor) => {
                client
                    .query(
                        "SELECT record FROM rba_builds
                         WHERE (submitted_at_ms, id) < ($1, $2)
                         ORDER BY submitted_at_ms DESC, id DESC LIMIT $3",
                        &[&millis(cursor.at_ms), &cursor.id, &limit],
                    )
                    .await
            }
        }
        .context("postgres: reading a page of build records")?;
        Ok(decode_all(&rows))
    }

    async fn count(&self) -> anyhow::Result<usize> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT records FROM rba_builds_count", &[])
            .await
            .context("postgres: counting build records")?;
        Ok(usize::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }

    async fn aliased(&self, alias: &str) -> anyhow::Result<Vec<BuildRecord>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT record FROM rba_builds WHERE alias = $1
                 ORDER BY submitted_at_ms, id",
                &[&alias],
            )
            .await
            .context("postgres: reading aliased build records")?;
        Ok(decode_all(&rows))
    }

    async fn running(&self) -> anyhow::Result<Vec<BuildRecord>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT record FROM rba_builds WHERE running AND front_end = $1",
                &[&self.front_end],
            )
            .await
            .context("postgres: reading running builds")?;
        Ok(decode_all(&rows))
    }
}
