//! The exact state of a scaled-out deployment in PostgreSQL: the blob index ([`PgBlobIndex`]),
//! the action cache ([`PgActionCache`]) and the read grants ([`PgGrants`]), all opened from one
//! [`Postgres`] handle (a connection pool and the schema it migrated).
//!
//! Why: when one machine is not enough, several front ends and workers must agree on which
//! blobs exist, which results are cached and who may read what. PostgreSQL is the engine
//! operators already run and trust for that: transactions make "indexed" mean "durable and
//! verified" for every process at once, and the same database later holds the scheduler's
//! queue (component `scheduler` in the same schema table).
//!
//! Design:
//! - **Schema versions.** `rba_schema(component, version)` records each component's version;
//!   component `cas` owns [`MIGRATIONS`], applied in one transaction under an advisory lock, so
//!   processes starting together migrate once and never see half a schema. A database whose
//!   version is newer than this build knows is refused, naming both versions (an old binary
//!   must not write into a schema it does not understand). Other components migrate their
//!   own tables the same way ([`Postgres::migrate`]).
//! - **One statement per call.** `find_missing` and `not_readable_by_any` send the digests as
//!   arrays (`unnest … WITH ORDINALITY`) and get back the positions that are absent: one round
//!   trip whatever the count. Writes that change a counter do it in the same statement
//!   (data-modifying CTEs), so the counters never disagree with the rows they count.
//! - **FindMissing is the hot path** (issue 12: 10,000 digests in ≤ 20 ms). What the plan
//!   shows (`EXPLAIN ANALYZE`, 10,000 digests over 100,000 rows): the time is one index probe
//!   per digest, a few µs each. Through the primary key a probe reads 3.5 shared buffers on
//!   average (root, inner page, leaf, and the heap row when present); other forms of the
//!   query (a join, `hash = ANY(…)`, a covering index, an `int8` key prefix, sorted input) did
//!   the same probes. A hash index on `hash` (migration 2) reads one bucket page, and the row
//!   when present: 1.6 buffers per digest, and the statement ran in 13 ms instead of 23 ms in
//!   alternating runs over the same rows. The primary key stays, for uniqueness, inserts
//!   (`ON CONFLICT`) and ordered locking. Unpacking the three array parameters costs ~3 ms.
//!   Hence also: a big request is split into a few chunks probed at once on separate pooled
//!   connections (the server's cores work in parallel: [`PROBE_CHUNK`], [`PROBE_PARALLEL`]);
//!   the absent ordinals come back as one array, not one row each; and digests PostgreSQL
//!   answered "present" within [`PRESENT_TTL`] are not asked again ([`PresenceCache`]).
//! - **Counters, not scans.** `cas_counters` holds the number of blobs, bytes, results and
//!   grants, spread over [`COUNTER_SHARDS`] rows per counter so concurrent writers rarely wait
//!   on one row. Each process keeps the totals in memory (what the sync `stats()` and `len()`
//!   return): its own writes apply their delta at once, and a background task re-reads the
//!   totals (a sum over a few dozen rows) every [`STATS_REFRESH`] to take in other processes'
//!   writes.
//! - **No deadlocks, no write storms.** Statements that lock several rows lock them in key
//!   order (sorted input, `ORDER BY … FOR UPDATE`); `touch` skips rows another transaction
//!   holds and rows used within the store's access granularity (a minute, the embedded
//!   store's rule), so a FindMissing storm does not rewrite rows.
//! - **Outages.** Every failure is [`CasError::Unavailable`] naming postgres and the operation;
//!   nothing panics on a lost connection. A call whose pooled connection was closed under it
//!   (the database restarted) is retried on a new connection (every statement here is safe to
//!   repeat), so the first call after a restart succeeds. (One consequence: a repeated
//!   `ActionCache::remove` whose first attempt committed before the connection died answers
//!   `false`; the entry is gone either way.)
//!
//! Binary columns: hashes, instance names and tenant names are `bytea`, stored and compared
//! byte for byte (a PostgreSQL `text` cannot hold a NUL byte, which an instance name may).
//!
//! TLS to the database is not supported yet (`NoTls`): use a loopback or otherwise trusted
//! network, or a unix socket (`postgres:///db?host=/run/postgresql`).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use rba_proto::Message;
use rba_proto::reapi::ActionResult;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use crate::access::{KnownGrants, check_tenant};
use crate::digest::{Digest, DigestFunction};
use crate::error::{CasError, Result};
use crate::layers::complete::direct_references;
use crate::seams::{ActionCache, BlobIndex, Grants};
use crate::store::{ACCESS_GRANULARITY_MS, StoreStats, function_byte};

/// The component whose version `rba_schema` records for these tables.
pub const COMPONENT: &str = "cas";

/// The numbered migrations of component `cas`: migration `n` (1-based) brings the schema from
/// version `n - 1` to `n`. Append only; never edit one that has shipped.
pub const MIGRATIONS: &[&str] = &[
    // 1: the blob index, the action cache, read grants and their counters.
    r#"
    CREATE TABLE cas_blobs (
        function smallint NOT NULL,
        hash bytea NOT NULL,
        size bigint NOT NULL CHECK (size >= 0),
        last_used timestamptz NOT NULL,
        PRIMARY KEY (function, hash)
    );
    CREATE INDEX cas_blobs_lru ON cas_blobs (last_used, function, hash);
    CREATE TABLE cas_action_results (
        instance bytea NOT NULL,
        function smallint NOT NULL,
        hash bytea NOT NULL,
        result bytea NOT NULL,
        PRIMARY KEY (instance, function, hash)
    );
    CREATE TABLE cas_read_grants (
        tenant bytea NOT NULL,
        function smallint NOT NULL,
        hash bytea NOT NULL,
        PRIMARY KEY (tenant, function, hash)
    );
    CREATE TABLE cas_counters (
        name text NOT NULL,
        shard smallint NOT NULL,
        count bigint NOT NULL DEFAULT 0,
        bytes bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (name, shard)
    );
    INSERT INTO cas_counters (name, shard)
        SELECT name, shard
        FROM unnest(ARRAY['blobs', 'actions', 'grants']) AS name,
             generate_series(0, 15) AS shard;
    "#,
    // 2: FindMissing probes a hash index: a bucket page per digest (and the row when present)
    // instead of the primary key's three B-tree levels, half the buffer reads per probe.
    // Built inside the migration's transaction, so writes to the index wait until it is done.
    r#"
    CREATE INDEX cas_blobs_by_hash ON cas_blobs USING hash (hash);
    "#,
];

/// The schema version this build knows (the number of [`MIGRATIONS`]).
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Rows per counter in `cas_counters` (created by migration 1).
pub const COUNTER_SHARDS: u64 = 16;

/// How often each process re-reads the counters (other processes' writes).
pub const STATS_REFRESH: Duration = Duration::from_secs(1);

/// How long this process reuses PostgreSQL's "present" answer for a digest without asking
/// again (see [`PresenceCache`]): the longest a blob removed by *another* process may still be
/// reported present here.
pub const PRESENT_TTL: Duration = Duration::from_secs(5);

/// Digests the presence cache holds per process (the least recently asked are dropped first):
/// a few tens of MB at most.
pub const PRESENT_CAPACITY: usize = 262_144;

/// Independently locked parts of the presence cache (callers rarely wait on each other).
const PRESENT_SHARDS: usize = 16;

/// A FindMissing probing at least `2 × PROBE_CHUNK` digests is split into chunks of at least
/// this many, probed concurrently on separate pooled connections (the server's cores work in
/// parallel; below this a chunk's round trip costs more than it saves).
pub const PROBE_CHUNK: usize = 2_048;

/// At most this many chunks (and pooled connections) per FindMissing.
pub const PROBE_PARALLEL: usize = 4;

/// The key of the advisory lock that serialises migrations (all components).
const SCHEMA_LOCK: i64 = 0x7262_615f_7363_6865; // "rba_sche"

/// Connections kept by the pool.
const POOL_SIZE: usize = 16;
/// How long a call waits for a connection (to open one, or for one to be free).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const WAIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts of a call whose connection was lost under it (a restarted database).
const ATTEMPTS: usize = 3;

/// The PostgreSQL state of a deployment: a connection pool over a migrated schema. Cheap to
/// clone; clones share the pool and the counters.
#[derive(Clone)]
pub struct Postgres {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    counters: Counters,
    presence: PresenceCache,
    /// Grants this process wrote or found, per tenant (rows of `cas_read_grants` are never
    /// deleted, so a remembered grant is never stale, whichever process wrote it).
    known_grants: KnownGrants,
    refresher: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.refresher.lock().take() {
            task.abort();
        }
    }
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = self.inner.pool.status();
        f.debug_struct("Postgres")
            .field("connections", &status.size)
            .field("idle", &status.available)
            .finish()
    }
}

/// Runs `$body` (an expression using `$client`, a pooled connection, that yields a
/// `Result<_, tokio_postgres::Error>`) and maps its error to [`CasError::Unavailable`] naming
/// `$operation`. A connection lost under the call is replaced and the call repeated.
macro_rules! with_client {
    ($pg:expr, $operation:expr, |$client:ident| $body:expr) => {{
        let mut attempt = 0;
        loop {
            attempt += 1;
            let $client = $pg.client($operation).await?;
            let outcome: std::result::Result<_, tokio_postgres::Error> = $body;
            match outcome {
                Err(e) if attempt < ATTEMPTS && connection_lost(&e) => {
                    tracing::debug!(operation = $operation, error = %e, "postgres connection lost; retrying");
                    continue;
                }
                other => break other.map_err(|e| failed($operation, &e)),
            }
        }
    }};
}

impl Postgres {
    /// Connects to `url` (`postgres://user@host:port/db`, or any form `tokio-postgres`
    /// accepts), creates or upgrades the `cas` schema and starts the background refresh of the
    /// counters. Fails when the database is unreachable or its schema is newer than this build.
    /// Call from within a tokio runtime.
    pub async fn connect(url: &str) -> Result<Postgres> {
        // The URL may hold a password: errors never repeat it.
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            CasError::Unavailable(format!(
                "postgres: parsing the database URL: {}",
                describe(&e)
            ))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                // A closed connection is dropped when taken from the pool; one that dies while
                // a statement runs is retried (`with_client!`): no extra round trip per call.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(CONNECT_TIMEOUT))
            .wait_timeout(Some(WAIT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| CasError::Unavailable(format!("postgres: building the pool: {e}")))?;
        let postgres = Postgres {
            inner: Arc::new(Inner {
                pool,
                counters: Counters::default(),
                presence: PresenceCache::new(PRESENT_CAPACITY, PRESENT_TTL),
                known_grants: KnownGrants::default(),
                refresher: parking_lot::Mutex::new(None),
            }),
        };
        postgres.migrate(COMPONENT, MIGRATIONS).await?;
        postgres.refresh_stats().await?;
        let weak = Arc::downgrade(&postgres.inner);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(STATS_REFRESH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await; // the first tick is immediate: connect just refreshed
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                let postgres = Postgres { inner };
                if let Err(e) = postgres.refresh_stats().await {
                    tracing::debug!(error = %e, "refreshing the postgres counters failed");
                }
            }
        });
        *postgres.inner.refresher.lock() = Some(task);
        Ok(postgres)
    }

    /// The blob index over this database, answering recently seen present digests from this
    /// process's [`PresenceCache`].
    pub fn blob_index(&self) -> PgBlobIndex {
        PgBlobIndex {
            pg: self.clone(),
            cached: true,
        }
    }

    /// The blob index over this database that asks PostgreSQL about every digest (its
    /// removals still clear the presence cache of this handle): for callers that cannot accept
    /// [`PRESENT_TTL`] of staleness about other processes' removals, and to measure the
    /// database alone.
    pub fn blob_index_uncached(&self) -> PgBlobIndex {
        PgBlobIndex {
            pg: self.clone(),
            cached: false,
        }
    }

    /// The action cache in this database.
    pub fn action_cache(&self) -> PgActionCache {
        PgActionCache { pg: self.clone() }
    }

    /// The read grants in this database, answering grants this process already wrote or
    /// found from memory (see [`PgGrants`]).
    pub fn grants(&self) -> PgGrants {
        PgGrants {
            pg: self.clone(),
            remembered: true,
        }
    }

    /// The read grants in this database, asking PostgreSQL about every digest: to measure the
    /// database alone.
    pub fn grants_uncached(&self) -> PgGrants {
        PgGrants {
            pg: self.clone(),
            remembered: false,
        }
    }

    /// The version `rba_schema` records for `component`, if any.
    pub async fn schema_version(&self, component: &str) -> Result<Option<i32>> {
        let row = with_client!(self, "reading the schema version", |client| {
            client
                .query_opt(
                    "SELECT version FROM rba_schema WHERE component = $1",
                    &[&component],
                )
                .await
        })?;
        Ok(row.map(|row| row.get(0)))
    }

    /// Re-reads the counters now (the background task does it every [`STATS_REFRESH`]), e.g.
    /// to see another process's writes at once.
    pub async fn refresh_stats(&self) -> Result<()> {
        let mark = self.inner.counters.quiet_mark();
        let rows = with_client!(self, "reading the counters", |client| {
            let statement = client
                .prepare_cached(
                    "SELECT name, sum(count)::bigint, sum(bytes)::bigint \
                     FROM cas_counters GROUP BY name",
                )
                .await;
            match statement {
                Ok(statement) => client.query(&statement, &[]).await,
                Err(e) => Err(e),
            }
        })?;
        let mut totals = Totals::default();
        for row in rows {
            let (name, count, bytes): (String, i64, i64) = (row.get(0), row.get(1), row.get(2));
            match name.as_str() {
                "blobs" => {
                    totals.blobs = count;
                    totals.blob_bytes = bytes;
                }
                "actions" => totals.actions = count,
                "grants" => totals.grants = count,
                _ => {}
            }
        }
        self.inner.counters.store(mark, totals);
        Ok(())
    }

    /// The connection pool, for the tables of other components in the same database (the
    /// scheduler's job queue).
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// A pooled connection, or [`CasError::Unavailable`] naming the operation.
    async fn client(&self, operation: &str) -> Result<Object> {
        self.inner.pool.get().await.map_err(|e| {
            CasError::Unavailable(format!(
                "postgres: {operation}: no connection: {}",
                describe(&e)
            ))
        })
    }

    /// Creates or upgrades `component`'s schema with its numbered `migrations` (migration `n`,
    /// 1-based, brings it from version `n - 1` to `n`) and returns the version before. One
    /// transaction, under an advisory lock that every process and every component takes
    /// before touching `rba_schema`: processes starting together migrate once. A database
    /// whose version is newer than `migrations.len()` is refused, naming both versions.
    /// `connect` migrates component [`COMPONENT`]; others (the scheduler) call this for theirs.
    pub async fn migrate(&self, component: &str, migrations: &[&str]) -> Result<i32> {
        let operation = format!("migrating the {component} schema");
        let fail = |e: tokio_postgres::Error| failed(&operation, &e);
        let known = i32::try_from(migrations.len()).unwrap_or(i32::MAX);
        let mut client = self.client(&operation).await?;
        let transaction = client.transaction().await.map_err(fail)?;
        transaction
            .execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
            .await
            .map_err(fail)?;
        transaction
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS rba_schema \
                 (component text PRIMARY KEY, version integer NOT NULL)",
            )
            .await
            .map_err(fail)?;
        let current: i32 = transaction
            .query_opt(
                "SELECT version FROM rba_schema WHERE component = $1",
                &[&component],
            )
            .await
            .map_err(fail)?
            .map(|row| row.get(0))
            .unwrap_or(0);
        if current > known {
            return Err(CasError::Unavailable(format!(
                "postgres: the database's {component} schema is version {current}, newer than \
                 version {known} that this build knows: run a newer rba against it"
            )));
        }
        if current == known {
            return Ok(current); // dropping the transaction rolls it back
        }
        for (index, migration) in migrations.iter().enumerate().skip(current.max(0) as usize) {
            transaction.batch_execute(migration).await.map_err(|e| {
                failed(&format!("applying {component} migration {}", index + 1), &e)
            })?;
        }
        transaction
            .execute(
                "INSERT INTO rba_schema (component, version) VALUES ($1, $2) \
                 ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version",
                &[&component, &known],
            )
            .await
            .map_err(fail)?;
        transaction.commit().await.map_err(fail)?;
        tracing::info!(
            component,
            from = current,
            to = known,
            "postgres: migrated the schema"
        );
        Ok(current)
    }
}

/// Whether an error means the connection is gone (the server restarted or closed it), so the
/// same statement on a new connection may succeed.
fn connection_lost(error: &tokio_postgres::Error) -> bool {
    if error.is_closed() {
        return true;
    }
    if let Some(code) = error.code() {
        return [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
        ]
        .contains(code);
    }
    std::error::Error::source(error).is_some_and(|source| source.is::<std::io::Error>())
}

fn failed(operation: &str, error: &tokio_postgres::Error) -> CasError {
    CasError::Unavailable(format!("postgres: {operation}: {}", describe(error)))
}

/// An error and its causes on one line (`tokio-postgres` shows only "db error" or "error
/// connecting to server" and keeps the reason in the source).
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string().replace('\n', " ");
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

/// The totals of `cas_counters`.
#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    blobs: i64,
    blob_bytes: i64,
    actions: i64,
    grants: i64,
}

/// The totals this process shows, and the bookkeeping that keeps a background refresh from
/// undoing (or counting twice) a write of its own that ran during the refresh: a refresh
/// replaces the totals only when no write of this process was in flight from its start to its
/// end, and otherwise at most every [`STALE_AFTER`].
#[derive(Default)]
struct Counters {
    state: parking_lot::Mutex<CounterState>,
    shard: AtomicU64,
}

#[derive(Default)]
struct CounterState {
    totals: Totals,
    started: u64,
    finished: u64,
    stored_at: Option<Instant>,
}

/// A refresh that could not find a quiet moment for this long stores what it read anyway.
const STALE_AFTER: Duration = Duration::from_secs(10);

impl Counters {
    fn totals(&self) -> Totals {
        self.state.lock().totals
    }

    /// The counter row this write updates (writers spread over the shards).
    fn shard(&self) -> i16 {
        let next = self.shard.fetch_add(1, Ordering::Relaxed) + u64::from(std::process::id());
        (next % COUNTER_SHARDS) as i16
    }

    /// Marks a write as started; [`CounterWrite::finish`] applies its delta.
    fn begin(&self) -> CounterWrite<'_> {
        self.state.lock().started += 1;
        CounterWrite {
            counters: self,
            open: true,
        }
    }

    /// Before a refresh: the write count, when no write is in flight.
    fn quiet_mark(&self) -> Option<u64> {
        let state = self.state.lock();
        (state.started == state.finished).then_some(state.started)
    }

    fn store(&self, mark: Option<u64>, totals: Totals) {
        let mut state = self.state.lock();
        let quiet = mark.is_some_and(|mark| state.started == mark && state.finished == mark);
        let stale = state
            .stored_at
            .is_none_or(|stored| stored.elapsed() >= STALE_AFTER);
        if quiet || stale {
            state.totals = totals;
            state.stored_at = Some(Instant::now());
        }
    }
}

/// A write in flight (see [`Counters`]); dropped unfinished (an error, a cancelled call), it
/// counts as finished without a delta, and the next refresh corrects the totals.
struct CounterWrite<'a> {
    counters: &'a Counters,
    open: bool,
}

impl CounterWrite<'_> {
    fn finish(mut self, apply: impl FnOnce(&mut Totals)) {
        let mut state = self.counters.state.lock();
        apply(&mut state.totals);
        state.finished += 1;
        self.open = false;
    }
}

impl Drop for CounterWrite<'_> {
    fn drop(&mut self) {
        if self.open {
            self.counters.state.lock().finished += 1;
        }
    }
}

/// The digests PostgreSQL recently answered "present" for, so a FindMissing that asks again
/// within [`PRESENT_TTL`] (the next build's same inputs, a completeness check right after an
/// upload) costs no probe. Bounded ([`PRESENT_CAPACITY`], least recently asked dropped
/// first), sharded ([`PRESENT_SHARDS`] locks).
///
/// Why only "present": the index never revokes a present blob except by [`BlobIndex::remove`]
/// (eviction, or a blob found corrupt), while an absent one may appear any time (another
/// process uploads it). Removals and staleness:
/// - this process's removals (through any index of the same [`Postgres`] handle) forget the
///   digests once the DELETE has run, and a FindMissing whose answer was read before a
///   removal finished remembers nothing (the removal epoch changed under it, checked under
///   the shard lock that `forget` also takes);
/// - another process's removals are not seen: this process may report such a blob present for
///   up to [`PRESENT_TTL`] after PostgreSQL last said so. That is the race every CAS already
///   has between FindMissing and the blob's use (REAPI clients re-upload on a missing input),
///   made at most [`PRESENT_TTL`] longer; eviction removes the least recently used blobs,
///   and a FindMissing that found a blob present touched it
///   ([`crate::seams::Store::find_missing_and_touch`] touches through PostgreSQL, cached or
///   not). Callers that need PostgreSQL's answer every time use
///   [`Postgres::blob_index_uncached`].
/// - the key is the whole digest (function, hash and size): a wrong size or another
///   function's digest with the same hash bytes is never answered from here.
struct PresenceCache {
    /// `digest → when PostgreSQL said present`.
    shards: Box<[parking_lot::Mutex<lru::LruCache<Digest, Instant>>]>,
    /// Bumped by every removal: answers read across one are not remembered.
    removals: AtomicU64,
    ttl: Duration,
}

impl PresenceCache {
    fn new(capacity: usize, ttl: Duration) -> PresenceCache {
        let per_shard = std::num::NonZeroUsize::new(capacity.div_ceil(PRESENT_SHARDS).max(1))
            .unwrap_or(std::num::NonZeroUsize::MIN);
        PresenceCache {
            shards: (0..PRESENT_SHARDS)
                .map(|_| parking_lot::Mutex::new(lru::LruCache::new(per_shard)))
                .collect(),
            removals: AtomicU64::new(0),
            ttl,
        }
    }

    fn shard(&self, digest: &Digest) -> &parking_lot::Mutex<lru::LruCache<Digest, Instant>> {
        // Only indexed (verified) blobs are remembered: their hash bytes are uniform.
        &self.shards[usize::from(digest.hash[0]) % PRESENT_SHARDS]
    }

    fn epoch(&self) -> u64 {
        self.removals.load(Ordering::SeqCst)
    }

    /// Whether PostgreSQL said `digest` present within the TTL.
    fn is_present(&self, digest: &Digest) -> bool {
        let mut shard = self.shard(digest).lock();
        match shard.get(digest).map(|said| said.elapsed() < self.ttl) {
            Some(true) => true,
            Some(false) => {
                shard.pop(digest);
                false
            }
            None => false,
        }
    }

    /// Remembers `present` as PostgreSQL's answer of now, unless a removal ran since `epoch`.
    fn remember<'a>(&self, epoch: u64, present: impl Iterator<Item = &'a Digest>) {
        let now = Instant::now();
        for digest in present {
            let mut shard = self.shard(digest).lock();
            // Under the shard lock, which `forget` takes after bumping the epoch: either this
            // sees the bump, or `forget` runs after this insertion and undoes it.
            if self.removals.load(Ordering::SeqCst) != epoch {
                return;
            }
            shard.put(*digest, now);
        }
    }

    /// Forgets `removed` (after their rows were deleted) and voids answers in flight.
    fn forget(&self, removed: &[Digest]) {
        self.removals.fetch_add(1, Ordering::SeqCst);
        for digest in removed {
            self.shard(digest).lock().pop(digest);
        }
    }
}

fn function_code(function: DigestFunction) -> i16 {
    i16::from(function_byte(function))
}

fn digest_from_row(function: i16, hash: &[u8], size: i64) -> Result<Digest> {
    let invalid = || {
        CasError::invalid(
            "a postgres cas_blobs row",
            format!(
                "function {function}, hash of {} bytes, size {size}",
                hash.len()
            ),
        )
    };
    let function = DigestFunction::ALL
        .into_iter()
        .find(|f| function_code(*f) == function)
        .ok_or_else(invalid)?;
    Ok(Digest {
        function,
        hash: hash.try_into().map_err(|_| invalid())?,
        size: u64::try_from(size).map_err(|_| invalid())?,
    })
}

/// The digests of `digests` a query needs (first occurrence order, no duplicates, no empty
/// blob: it is always present and always readable).
fn distinct_non_empty(digests: &[Digest]) -> Vec<Digest> {
    let mut seen = HashSet::new();
    digests
        .iter()
        .filter(|digest| !digest.is_empty_blob() && seen.insert(**digest))
        .copied()
        .collect()
}

/// Digests as the three arrays the statements `unnest`.
fn columns(digests: &[Digest]) -> (Vec<i16>, Vec<&[u8]>, Vec<i64>) {
    (
        digests.iter().map(|d| function_code(d.function)).collect(),
        digests.iter().map(|d| &d.hash[..]).collect(),
        // A size past i64::MAX was never stored (sizes are checked on insert): -1 matches none.
        digests
            .iter()
            .map(|d| i64::try_from(d.size).unwrap_or(-1))
            .collect(),
    )
}

/// Sorted by key, without duplicates: statements lock rows in this order (no deadlocks).
fn sorted_keys(digests: &[Digest]) -> Vec<Digest> {
    let mut sorted = distinct_non_empty(digests);
    sorted.sort_unstable_by_key(|d| (function_code(d.function), d.hash));
    sorted.dedup_by_key(|d| (d.function, d.hash));
    sorted
}

/// `digests[i]` for every 1-based ordinal PostgreSQL returned, in `digests`' order.
fn pick(digests: Vec<Digest>, rows: &[tokio_postgres::Row]) -> Vec<Digest> {
    let mut chosen = vec![false; digests.len()];
    for row in rows {
        let ordinal: i64 = row.get(0);
        if let Some(slot) = usize::try_from(ordinal - 1)
            .ok()
            .and_then(|i| chosen.get_mut(i))
        {
            *slot = true;
        }
    }
    digests
        .into_iter()
        .zip(chosen)
        .filter(|(_, chosen)| *chosen)
        .map(|(digest, _)| digest)
        .collect()
}

/// Runs one prepared (cached per connection) statement and returns its rows.
macro_rules! query {
    ($pg:expr, $operation:expr, $sql:expr, $params:expr) => {
        with_client!($pg, $operation, |client| {
            match client.prepare_cached($sql).await {
                Ok(statement) => client.query(&statement, $params).await,
                Err(e) => Err(e),
            }
        })
    };
}

/// The stored size of each of `$2` (hashes of digest function `$1`), in the order asked; NULL
/// for one not indexed. Why a correlated scalar subquery and not `NOT EXISTS`: PostgreSQL turns
/// `NOT EXISTS` into an anti-join, and with a table of 100,000 rows its cost model prefers
/// hashing the whole table on every call (O(table) per call, ~5× slower here) to probing an
/// index once per digest. A scalar subquery is always a probe per digest (of
/// `cas_blobs_by_hash`): the cost follows the digests asked, never the size of the index. The
/// sizes come back as one array in one row (thousands of result rows cost the server and the
/// client more than the probes they report), and the caller compares them: one array unnested,
/// not three with ordinality, is ~25 % less of the server's CPU per call (pgbench, 10,000
/// digests over 100,000 rows). The array keeps `unnest`'s order: a single function scan, with
/// no join or sort to reorder its rows.
const STORED_SIZES: &str = "\
    SELECT array(SELECT (SELECT b.size FROM cas_blobs b \
        WHERE b.function = $1::smallint AND b.hash = d.hash) \
    FROM unnest($2::bytea[]) AS d(hash))";

const INSERT_BLOBS: &str = "\
    WITH ins AS ( \
        INSERT INTO cas_blobs AS b (function, hash, size, last_used) \
        SELECT function, hash, size, now() \
            FROM unnest($1::smallint[], $2::bytea[], $3::bigint[]) AS d(function, hash, size) \
        ON CONFLICT (function, hash) DO UPDATE SET last_used = now() \
            WHERE b.last_used < now() - $4::bigint * interval '1 millisecond' \
        RETURNING (xmax = 0) AS inserted, size), \
    added AS (SELECT count(*) AS count, coalesce(sum(size), 0)::bigint AS bytes \
        FROM ins WHERE inserted), \
    bump AS (UPDATE cas_counters c SET count = c.count + added.count, \
            bytes = c.bytes + added.bytes \
        FROM added WHERE c.name = 'blobs' AND c.shard = $5 AND added.count > 0) \
    SELECT count, bytes FROM added";

const TOUCH_BLOBS: &str = "\
    WITH target AS ( \
        SELECT b.function, b.hash FROM cas_blobs b \
            JOIN unnest($1::smallint[], $2::bytea[]) AS d(function, hash) \
            ON b.function = d.function AND b.hash = d.hash \
        WHERE b.last_used < now() - $3::bigint * interval '1 millisecond' \
        FOR UPDATE OF b SKIP LOCKED) \
    UPDATE cas_blobs b SET last_used = now() FROM target t \
    WHERE b.function = t.function AND b.hash = t.hash";

const REMOVE_BLOBS: &str = "\
    WITH doomed AS ( \
        SELECT b.function, b.hash FROM cas_blobs b \
            JOIN unnest($1::smallint[], $2::bytea[]) AS d(function, hash) \
            ON b.function = d.function AND b.hash = d.hash \
        ORDER BY b.function, b.hash FOR UPDATE OF b), \
    del AS (DELETE FROM cas_blobs b USING doomed \
        WHERE b.function = doomed.function AND b.hash = doomed.hash RETURNING b.size), \
    removed AS (SELECT count(*) AS count, coalesce(sum(size), 0)::bigint AS bytes FROM del), \
    bump AS (UPDATE cas_counters c SET count = c.count - removed.count, \
            bytes = c.bytes - removed.bytes \
        FROM removed WHERE c.name = 'blobs' AND c.shard = $3 AND removed.count > 0) \
    SELECT count, bytes FROM removed";

const LEAST_RECENTLY_USED: &str = "\
    SELECT function, hash, size FROM cas_blobs \
    ORDER BY last_used, function, hash LIMIT $1";

/// The blob index in PostgreSQL (table `cas_blobs`), for a store whose bytes live in a
/// bucket. Cheap to clone.
#[derive(Clone, Debug)]
pub struct PgBlobIndex {
    pg: Postgres,
    /// Whether `find_missing` answers recently seen present digests from the presence cache.
    cached: bool,
}

impl PgBlobIndex {
    /// `absent[i]` for `digests[i]` (distinct, non-empty): not indexed, or indexed with another
    /// size. A statement probes the digests of one digest function (a request's share one);
    /// when there are many, they are split into up to [`PROBE_PARALLEL`] chunks (one more per
    /// further digest function) probed at once. (The hash index has no key order for a chunk to
    /// follow, so the digests keep theirs.)
    async fn probe(&self, digests: &[Digest]) -> Result<Vec<bool>> {
        if digests.is_empty() {
            return Ok(Vec::new());
        }
        let chunks = (digests.len() / PROBE_CHUNK).clamp(1, PROBE_PARALLEL);
        let per_chunk = digests.len().div_ceil(chunks);
        let mut by_function: Vec<usize> = (0..digests.len()).collect();
        by_function.sort_by_key(|&i| function_code(digests[i].function)); // stable
        let statements: Vec<&[usize]> = by_function
            .chunk_by(|&a, &b| digests[a].function == digests[b].function)
            .flat_map(|same_function| same_function.chunks(per_chunk))
            .collect();
        let answers = futures::future::try_join_all(
            statements
                .iter()
                .map(|positions| self.stored_sizes(digests, positions)),
        )
        .await?;
        let mut absent = vec![true; digests.len()];
        for (positions, stored) in statements.into_iter().zip(answers) {
            for (&i, stored) in positions.iter().zip(stored) {
                // A size past i64::MAX was never stored (sizes are checked on insert).
                let asked = i64::try_from(digests[i].size).ok();
                absent[i] = stored.is_none_or(|stored| Some(stored) != asked);
            }
        }
        Ok(absent)
    }

    /// The stored sizes of `digests[i]` for each of `positions` (one digest function), in order.
    async fn stored_sizes(
        &self,
        digests: &[Digest],
        positions: &[usize],
    ) -> Result<Vec<Option<i64>>> {
        let function = function_code(digests[positions[0]].function);
        let hashes: Vec<&[u8]> = positions.iter().map(|&i| &digests[i].hash[..]).collect();
        let rows = query!(self.pg, "find_missing", STORED_SIZES, &[&function, &hashes])?;
        let stored: Vec<Option<i64>> = match rows.first() {
            Some(row) => row.try_get(0).map_err(|e| failed("find_missing", &e))?,
            None => Vec::new(),
        };
        if stored.len() != positions.len() {
            return Err(CasError::invalid(
                "a postgres find_missing answer",
                format!("{} sizes for {} digests", stored.len(), positions.len()),
            ));
        }
        Ok(stored)
    }
}

#[async_trait]
impl BlobIndex for PgBlobIndex {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let asked = distinct_non_empty(digests);
        if asked.is_empty() {
            return Ok(Vec::new());
        }
        let presence = &self.pg.inner.presence;
        // Taken before asking: an answer that a removal may have overtaken is not remembered.
        let epoch = presence.epoch();
        let probed: Vec<Digest> = if self.cached {
            asked
                .into_iter()
                .filter(|digest| !presence.is_present(digest))
                .collect()
        } else {
            asked
        };
        let absent = self.probe(&probed).await?;
        if self.cached {
            presence.remember(
                epoch,
                probed
                    .iter()
                    .zip(&absent)
                    .filter(|(_, absent)| !**absent)
                    .map(|(digest, _)| digest),
            );
        }
        // `probed` keeps the order of `asked`, which keeps the order of `digests`.
        Ok(probed
            .into_iter()
            .zip(absent)
            .filter(|(_, absent)| *absent)
            .map(|(digest, _)| digest)
            .collect())
    }

    async fn insert(&self, digests: &[Digest]) -> Result<()> {
        let blobs = sorted_keys(digests);
        if blobs.is_empty() {
            return Ok(());
        }
        if let Some(huge) = blobs.iter().find(|d| i64::try_from(d.size).is_err()) {
            return Err(CasError::invalid(
                format!("blob {huge:?}"),
                "its size does not fit a signed 64-bit integer",
            ));
        }
        let (functions, hashes, sizes) = columns(&blobs);
        let granularity = ACCESS_GRANULARITY_MS as i64;
        let counters = &self.pg.inner.counters;
        let shard = counters.shard();
        let write = counters.begin();
        let rows = query!(
            self.pg,
            "insert",
            INSERT_BLOBS,
            &[&functions, &hashes, &sizes, &granularity, &shard]
        )?;
        let (count, bytes): (i64, i64) = rows.first().map_or((0, 0), |r| (r.get(0), r.get(1)));
        write.finish(|totals| {
            totals.blobs += count;
            totals.blob_bytes += bytes;
        });
        Ok(())
    }

    async fn touch(&self, digests: &[Digest]) -> Result<()> {
        let blobs = sorted_keys(digests);
        if blobs.is_empty() {
            return Ok(());
        }
        let (functions, hashes, _) = columns(&blobs);
        let granularity = ACCESS_GRANULARITY_MS as i64;
        query!(
            self.pg,
            "touch",
            TOUCH_BLOBS,
            &[&functions, &hashes, &granularity]
        )?;
        Ok(())
    }

    async fn remove(&self, digests: &[Digest]) -> Result<()> {
        let blobs = sorted_keys(digests);
        if blobs.is_empty() {
            return Ok(());
        }
        let (functions, hashes, _) = columns(&blobs);
        let counters = &self.pg.inner.counters;
        let shard = counters.shard();
        let write = counters.begin();
        let outcome = query!(
            self.pg,
            "remove",
            REMOVE_BLOBS,
            &[&functions, &hashes, &shard]
        );
        // After the statement (committed, or perhaps committed before an error): no answer
        // read before it stays in the cache, and none in flight is remembered.
        self.pg.inner.presence.forget(&blobs);
        let rows = outcome?;
        let (count, bytes): (i64, i64) = rows.first().map_or((0, 0), |r| (r.get(0), r.get(1)));
        write.finish(|totals| {
            totals.blobs -= count;
            totals.blob_bytes -= bytes;
        });
        Ok(())
    }

    async fn least_recently_used(&self, limit: usize) -> Result<Vec<Digest>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = query!(
            self.pg,
            "least_recently_used",
            LEAST_RECENTLY_USED,
            &[&limit]
        )?;
        rows.iter()
            .map(|row| digest_from_row(row.get(0), row.get(1), row.get(2)))
            .collect()
    }

    fn stats(&self) -> StoreStats {
        let totals = self.pg.inner.counters.totals();
        StoreStats {
            total_bytes: totals.blob_bytes.max(0) as u64,
            blob_count: totals.blobs.max(0) as u64,
            ..StoreStats::default()
        }
    }
}

const GET_RESULT: &str = "\
    SELECT result FROM cas_action_results \
    WHERE instance = $1 AND function = $2 AND hash = $3";

const PUT_RESULT: &str = "\
    WITH up AS ( \
        INSERT INTO cas_action_results (instance, function, hash, result) \
        VALUES ($1, $2, $3, $4) \
        ON CONFLICT (instance, function, hash) DO UPDATE SET result = EXCLUDED.result \
        RETURNING (xmax = 0) AS inserted), \
    bump AS (UPDATE cas_counters c SET count = c.count + 1 \
        WHERE c.name = 'actions' AND c.shard = $5 AND (SELECT inserted FROM up)) \
    SELECT inserted FROM up";

const REMOVE_RESULT: &str = "\
    WITH del AS (DELETE FROM cas_action_results \
        WHERE instance = $1 AND function = $2 AND hash = $3 RETURNING 1), \
    bump AS (UPDATE cas_counters c SET count = c.count - 1 \
        WHERE c.name = 'actions' AND c.shard = $4 AND EXISTS (SELECT 1 FROM del)) \
    SELECT count(*) FROM del";

const RESULTS_IN: &str = "SELECT result FROM cas_action_results WHERE instance = $1";

/// The action cache in PostgreSQL (table `cas_action_results`). Cheap to clone.
#[derive(Clone, Debug)]
pub struct PgActionCache {
    pg: Postgres,
}

#[async_trait]
impl ActionCache for PgActionCache {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn get_unchecked(&self, instance: &str, action: &Digest) -> Result<Option<ActionResult>> {
        let function = function_code(action.function);
        let rows = query!(
            self.pg,
            "get action result",
            GET_RESULT,
            &[&instance.as_bytes(), &function, &&action.hash[..]]
        )?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let bytes: &[u8] = row.get(0);
        ActionResult::decode(bytes).map(Some).map_err(|e| {
            CasError::invalid(format!("stored ActionResult for {action:?}"), e.to_string())
        })
    }

    async fn put(&self, instance: &str, action: &Digest, result: &ActionResult) -> Result<()> {
        direct_references(action.function, result)?;
        let function = function_code(action.function);
        let bytes = result.encode_to_vec();
        let counters = &self.pg.inner.counters;
        let shard = counters.shard();
        let write = counters.begin();
        let rows = query!(
            self.pg,
            "put action result",
            PUT_RESULT,
            &[
                &instance.as_bytes(),
                &function,
                &&action.hash[..],
                &bytes,
                &shard
            ]
        )?;
        let inserted = rows.first().is_some_and(|row| row.get::<_, bool>(0));
        write.finish(|totals| totals.actions += i64::from(inserted));
        Ok(())
    }

    async fn remove(&self, instance: &str, action: &Digest) -> Result<bool> {
        let function = function_code(action.function);
        let counters = &self.pg.inner.counters;
        let shard = counters.shard();
        let write = counters.begin();
        let rows = query!(
            self.pg,
            "remove action result",
            REMOVE_RESULT,
            &[&instance.as_bytes(), &function, &&action.hash[..], &shard]
        )?;
        let removed = rows.first().map_or(0, |row| row.get::<_, i64>(0));
        write.finish(|totals| totals.actions -= removed);
        Ok(removed > 0)
    }

    async fn results_in(&self, instance: &str) -> Result<Vec<ActionResult>> {
        let rows = query!(
            self.pg,
            "list action results",
            RESULTS_IN,
            &[&instance.as_bytes()]
        )?;
        rows.iter()
            .map(|row| {
                ActionResult::decode(row.get::<_, &[u8]>(0)).map_err(|e| {
                    CasError::invalid(
                        format!("stored ActionResult in {instance:?}"),
                        e.to_string(),
                    )
                })
            })
            .collect()
    }

    fn len(&self) -> u64 {
        self.pg.inner.counters.totals().actions.max(0) as u64
    }
}

const GRANT: &str = "\
    WITH ins AS ( \
        INSERT INTO cas_read_grants (tenant, function, hash) \
        SELECT $1::bytea, function, hash FROM unnest($2::smallint[], $3::bytea[]) AS d(function, hash) \
        ON CONFLICT DO NOTHING RETURNING 1), \
    added AS (SELECT count(*) AS count FROM ins), \
    bump AS (UPDATE cas_counters c SET count = c.count + added.count \
        FROM added WHERE c.name = 'grants' AND c.shard = $4 AND added.count > 0) \
    SELECT count FROM added";

/// A scalar subquery per digest, for the reason given at [`STORED_SIZES`].
const NOT_READABLE: &str = "\
    SELECT d.i FROM unnest($1::smallint[], $2::bytea[]) WITH ORDINALITY AS d(function, hash, i) \
    WHERE (SELECT true FROM cas_read_grants g \
        WHERE g.tenant = ANY($3::bytea[]) AND g.function = d.function AND g.hash = d.hash \
        LIMIT 1) IS NULL";

/// The read grants in PostgreSQL (table `cas_read_grants`), with the rules of
/// [`crate::access`]. Cheap to clone.
///
/// Grants are only ever added, so those this process wrote, or found granted to the single
/// tenant a call asked about, are remembered (per tenant, bounded) and the database is asked
/// only about the rest: a tenant's FindMissing of the same inputs again (the next build) is
/// answered without a statement. A call for several tenants learns nothing it can remember
/// (the statement says only that *one* of them may read a blob), and a refusal is never
/// remembered: another process may grant it the next moment.
#[derive(Clone, Debug)]
pub struct PgGrants {
    pg: Postgres,
    remembered: bool,
}

#[async_trait]
impl Grants for PgGrants {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn grant(&self, tenant: &str, digests: &[Digest]) -> Result<()> {
        check_tenant(tenant)?;
        let blobs = sorted_keys(digests);
        if blobs.is_empty() {
            return Ok(());
        }
        let (functions, hashes, _) = columns(&blobs);
        let counters = &self.pg.inner.counters;
        let shard = counters.shard();
        let write = counters.begin();
        let rows = query!(
            self.pg,
            "grant",
            GRANT,
            &[&tenant.as_bytes(), &functions, &hashes, &shard]
        )?;
        let added = rows.first().map_or(0, |row| row.get::<_, i64>(0));
        write.finish(|totals| totals.grants += added);
        if self.remembered {
            // Remembered once committed: a remembered grant is always in the table.
            self.pg.inner.known_grants.remember(tenant, &blobs);
        }
        Ok(())
    }

    async fn not_readable_by_any(
        &self,
        tenants: &[&str],
        digests: &[Digest],
    ) -> Result<Vec<Digest>> {
        for tenant in tenants {
            check_tenant(tenant)?;
        }
        let asked = distinct_non_empty(digests);
        if asked.is_empty() {
            return Ok(Vec::new());
        }
        if tenants.is_empty() {
            return Ok(asked);
        }
        let known = &self.pg.inner.known_grants;
        let unknown: Vec<Digest> = if self.remembered {
            let granted = known.granted(tenants, &asked);
            asked
                .into_iter()
                .zip(granted)
                .filter_map(|(digest, granted)| (!granted).then_some(digest))
                .collect()
        } else {
            asked
        };
        if unknown.is_empty() {
            return Ok(Vec::new());
        }
        let (functions, hashes, _) = columns(&unknown);
        let names: Vec<&[u8]> = tenants.iter().map(|t| t.as_bytes()).collect();
        let rows = query!(
            self.pg,
            "check read grants",
            NOT_READABLE,
            &[&functions, &hashes, &names]
        )?;
        let refused = pick(unknown.clone(), &rows);
        if let [tenant] = tenants
            && self.remembered
            && refused.len() < unknown.len()
        {
            let refused: HashSet<&Digest> = refused.iter().collect();
            known.remember(tenant, unknown.iter().filter(|d| !refused.contains(d)));
        }
        Ok(refused)
    }

    fn len(&self) -> u64 {
        self.pg.inner.counters.totals().grants.max(0) as u64
    }
}
