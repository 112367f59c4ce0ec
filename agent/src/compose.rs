//! The one composition root of the executor's backends: a [`NodeConfig`] becomes the stores
//! an executor runs on, and — scaled out — the job queue its jobs go through. `rba serve` (a
//! front end) and `rba worker` both call it, so the two sides of a deployment can never be
//! wired differently.
//!
//! Why: the choice of backends is made once, here, from two settings — `[store] url`
//! (`RBA_STORE_URL`, `s3://BUCKET[/prefix]`, with the `AWS_*` variables `object_store` reads)
//! and `[database] url` (`RBA_DATABASE_URL`, `postgres://…`). With neither, everything is
//! embedded, exactly as before (`rba build`, `rba serve`). With both:
//!
//! - blobs live in the bucket, with this machine's `Cas` as their local tier
//!   ([`Tiered`]); presence, the action cache and the read grants live in PostgreSQL;
//! - the job queue ([`JobQueue`]) lives in the same database; a front end's executor
//!   dispatches its jobs to it ([`Dispatch`]), a worker's executor runs them
//!   ([`rba_executor::scheduler::Worker`] with [`TieredStaging`]);
//! - the build history a front end records lives there too ([`history`]).
//!
//! Workers run what the front ends prepared: a cargo Action names its toolchain (chosen on the
//! front end from the workspace's `rust-toolchain.toml`), so workers need those toolchains
//! installed (`rustup_home`, `toolchain_roots`), as a node does.
//!
//! One without the other is a configuration error naming both: a bucket without a shared
//! index, or a shared queue without a shared store, would let front ends and workers see
//! different state. Errors name the variable to fix; a database URL's password is never
//! printed (`--print-config` masks it, connection errors do not repeat the URL).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rba_cas::backends::postgres::Postgres;
use rba_cas::backends::s3::{BucketOptions, BucketStore, parse_store_url};
use rba_cas::layers::tiered::Tiered;
use rba_cas::{Cas, Stores};
use rba_executor::runner::{Executor, ExecutorConfig};
use rba_executor::scheduler::{Dispatch, JobQueue, TieredStaging};
use serde::{Deserialize, Serialize};

use crate::config::NodeConfig;
use crate::history::History;
use crate::history::postgres::PgHistory;

/// The environment variable of `[store] url`.
pub const STORE_URL_VAR: &str = "RBA_STORE_URL";
/// The environment variable of `[database] url`.
pub const DATABASE_URL_VAR: &str = "RBA_DATABASE_URL";

/// `[store]`: where blobs live. No `url`: the embedded store under the data dir; with one,
/// the bucket, this machine's store under the data dir being its local tier.
///
/// ```toml
/// [store]
/// max_bytes = 53687091200   # the local store's capacity (LRU eviction above it)
/// fsync = true              # durable writes (off only for tests and tmpfs)
/// url = "s3://rba-cas/prod" # scale-out (RBA_STORE_URL), with [database] url
/// ```
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSection {
    /// `s3://BUCKET[/prefix]` (the endpoint and credentials come from the `AWS_*` variables).
    pub url: Option<String>,
    /// Capacity of the store under the data dir, in bytes (embedded: the CAS; scaled out:
    /// the local tier).
    pub max_bytes: u64,
    /// fsync blobs (turn off for tests and benches on tmpfs).
    pub fsync: bool,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            url: None,
            max_bytes: 50 << 30,
            fsync: true,
        }
    }
}

impl StoreSection {
    /// The settings of the store under the data dir.
    pub fn local(&self) -> rba_cas::StoreConfig {
        rba_cas::StoreConfig {
            max_bytes: self.max_bytes,
            fsync: self.fsync,
            ..Default::default()
        }
    }
}

/// `[database]`: where the blob index, the action cache and the job queue live. No `url`:
/// embedded.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSection {
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/DB` (or any form `tokio-postgres` accepts).
    pub url: Option<String>,
}

/// The scale-out URLs of a config, checked together: `None` when embedded.
pub fn scale_out_urls(config: &NodeConfig) -> anyhow::Result<Option<(&str, &str)>> {
    let store = config.store.url.as_deref().filter(|u| !u.trim().is_empty());
    let database = config
        .database
        .url
        .as_deref()
        .filter(|u| !u.trim().is_empty());
    match (store, database) {
        (None, None) => Ok(None),
        (Some(store), Some(database)) => {
            parse_store_url(store).map_err(|e| {
                anyhow::anyhow!(
                    "{STORE_URL_VAR} ([store] url): {e} (only s3://BUCKET[/prefix] is supported)"
                )
            })?;
            if !(database.starts_with("postgres://")
                || database.starts_with("postgresql://")
                || database.contains('='))
            {
                anyhow::bail!(
                    "{DATABASE_URL_VAR} ([database] url) is not a PostgreSQL URL: expected \
                     postgres://USER@HOST:PORT/DB"
                );
            }
            Ok(Some((store, database)))
        }
        (Some(_), None) => anyhow::bail!(
            "{STORE_URL_VAR} ([store] url) is set but {DATABASE_URL_VAR} ([database] url) is \
             not: a scale-out deployment needs both (blobs in the bucket, their index, the \
             action cache and the job queue in PostgreSQL); set both, or neither for the \
             embedded store"
        ),
        (None, Some(_)) => anyhow::bail!(
            "{DATABASE_URL_VAR} ([database] url) is set but {STORE_URL_VAR} ([store] url) is \
             not: a scale-out deployment needs both (blobs in the bucket, their index, the \
             action cache and the job queue in PostgreSQL); set both, or neither for the \
             embedded store"
        ),
    }
}

/// A URL with its password (`user:PASSWORD@`, `password=…`) masked, for printing.
pub fn mask_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        if let Some((userinfo, host)) = authority.rsplit_once('@')
            && let Some((user, _password)) = userinfo.split_once(':')
        {
            return mask_params(&format!("{scheme}://{user}:********@{host}{tail}"));
        }
        return mask_params(url);
    }
    mask_params(url)
}

/// `password=…` (a key=value connection string or a URL query) masked.
fn mask_params(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("password=") {
        let value = at + "password=".len();
        out.push_str(&rest[..value]);
        out.push_str("********");
        let end = rest[value..]
            .find(['&', ' '])
            .map_or(rest.len(), |e| value + e);
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// The shared state of a scale-out deployment, connected.
#[derive(Clone, Debug)]
pub struct Shared {
    /// The database (blob index, action cache, grants).
    pub postgres: Postgres,
    /// The bucket (blob bytes).
    pub bucket: BucketStore,
    /// The job queue (in the same database).
    pub queue: JobQueue,
}

impl Shared {
    /// Connects to the database and the bucket `config` names (`None`: embedded). Fails
    /// naming the variable whose service cannot be reached.
    pub async fn connect(config: &NodeConfig) -> anyhow::Result<Option<Shared>> {
        let Some((store_url, database_url)) = scale_out_urls(config)? else {
            return Ok(None);
        };
        let postgres = Postgres::connect(database_url)
            .await
            .with_context(|| format!("{DATABASE_URL_VAR}: the database cannot be used"))?;
        let bucket = BucketStore::from_url(
            store_url,
            BucketOptions::default(),
            Arc::new(postgres.blob_index()),
        )
        .with_context(|| format!("{STORE_URL_VAR}: the bucket cannot be used"))?;
        bucket.ready().await.with_context(|| {
            format!(
                "{STORE_URL_VAR}: the bucket {} does not answer (check AWS_ENDPOINT_URL and the \
                 credentials)",
                bucket.bucket()
            )
        })?;
        let queue = JobQueue::open(&postgres, database_url, config.scheduler.clone())
            .await
            .with_context(|| format!("{DATABASE_URL_VAR}: the job queue cannot be used"))?;
        Ok(Some(Shared {
            postgres,
            bucket,
            queue,
        }))
    }

    /// The stores of a process whose local tier is `cas`: the bucket behind it, the
    /// database's action cache and grants.
    pub fn stores(&self, cas: &Cas) -> Stores {
        let tiered = Tiered::new(cas.blobs.clone(), Arc::new(self.bucket.clone()));
        Stores::new(
            Arc::new(tiered),
            Arc::new(self.postgres.action_cache()),
            Arc::new(self.postgres.grants()),
        )
    }

    /// Readiness of the shared state: the database answers, the bucket answers, and a worker
    /// was seen within a lease. Each check's name and, when it fails, why.
    pub async fn ready(&self) -> Vec<(&'static str, Result<(), String>)> {
        let database = self
            .postgres
            .schema_version("cas")
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        let store = self.bucket.ready().await.map_err(|e| e.to_string());
        let lease = Duration::from_secs(self.queue.config().lease_secs);
        let workers = match self.queue.workers(lease).await {
            Ok(seen) if !seen.is_empty() => Ok(()),
            Ok(_) => Err(format!("no worker seen within {} s", lease.as_secs())),
            Err(e) => Err(e.to_string()),
        };
        vec![
            ("database", database),
            ("store", store),
            ("workers", workers),
        ]
    }
}

/// What every face of a node (or `cache-server`) serves: the store under the data dir, and
/// scaled out the shared state with the stores over it.
#[derive(Clone, Debug)]
pub struct Backends {
    /// The store under `data_dir/cas`: embedded, the store; scaled out, the local tier.
    pub cas: Cas,
    /// The shared state of a scale-out deployment (`None`: embedded).
    pub shared: Option<Shared>,
    /// The stores the faces serve and the executor runs over (the shared ones over `cas`, or
    /// `cas`'s own).
    pub stores: Stores,
}

/// Opens (creating) `config`'s data dir and its store, and connects to the shared state when
/// scaled out (failing naming the variable whose service cannot be reached).
pub async fn backends(config: &NodeConfig) -> anyhow::Result<Backends> {
    let shared = Shared::connect(config).await?;
    let cas = crate::workspace::open_cas(&config.data_dir, config.store.local())?;
    let stores = match &shared {
        Some(shared) => shared.stores(&cas),
        None => Stores::embedded(&cas),
    };
    Ok(Backends {
        cas,
        shared,
        stores,
    })
}

/// `cache-server`: the REAPI face alone over [`backends`], with an executor when `[reapi]
/// execution` is on — a front end's that dispatches to the workers when scaled out. An
/// embedded executor that cannot start (the sandbox's prerequisites missing) leaves the server
/// cache-only, saying why.
pub async fn reapi_server(config: &NodeConfig) -> anyhow::Result<rba_cache_server::Server> {
    config.validate()?;
    let Backends {
        cas,
        shared,
        stores,
    } = backends(config).await?;
    let executor = if config.reapi.execution {
        // A configuration error stops the start; only an executor that cannot start (the
        // sandbox's prerequisites) leaves the server cache-only.
        let settings = executor_config(config, &config.data_dir.join("executor"))?;
        let started =
            front_end_executor(&cas, settings, shared.as_ref().map(|s| (s, stores.clone())));
        match started {
            Ok(executor) => {
                tracing::info!(slots = config.workers.slots, "remote execution enabled");
                Some(executor)
            }
            Err(error) => {
                tracing::warn!(
                    error = %format!("{error:#}"),
                    "remote execution is DISABLED: the sandbox cannot be set up (run \
                     .ci/setup.d/sandbox.sh, or pass --no-execution to silence this); serving \
                     cache-only"
                );
                None
            }
        }
    } else {
        tracing::info!("execution disabled by configuration: serving cache-only");
        None
    };
    crate::grpc::server(config, stores, executor)
}

/// The executor settings of a node or worker config (its `[workers]`: slots, sandbox, limits,
/// toolchains),
/// its data under `dir`: one place, so a worker runs jobs exactly as an embedded node does.
pub fn executor_config(
    config: &NodeConfig,
    dir: &std::path::Path,
) -> anyhow::Result<ExecutorConfig> {
    let workers = &config.workers;
    let mut executor_config = ExecutorConfig::new(dir).context("configuring the executor")?;
    executor_config.workers = workers.slots;
    executor_config.fetch_allowed_hosts = workers.fetch_allowed_hosts.clone();
    executor_config.shared_units = workers.shared_units;
    if let Some(home) = &workers.rustup_home {
        executor_config.rustup_home = Some(home.clone());
    }
    executor_config.toolchain_roots = workers.toolchain_roots.clone();
    executor_config.advisory_db = workers.advisory_db.clone();
    executor_config.sandbox.isolation = workers.isolation;
    if let Some(binary) = &workers.cargo_audit {
        executor_config.cargo_audit = Some(binary.clone());
    }
    workers.limits.apply(&mut executor_config)?;
    Ok(executor_config)
}

/// A node's executor over `cas`: embedded (`shared` is `None`), or a front end that
/// dispatches to the workers of `shared`, over `stores` ([`Shared::stores`] of `cas`: the
/// same handles the node's other faces serve).
pub fn front_end_executor(
    cas: &Cas,
    executor_config: ExecutorConfig,
    shared: Option<(&Shared, Stores)>,
) -> anyhow::Result<Executor> {
    let executor = match shared {
        None => Executor::new(cas.clone(), executor_config),
        Some((shared, stores)) => Executor::with_dispatch(
            cas.clone(),
            executor_config,
            stores,
            Dispatch::new(shared.queue.clone()),
        ),
    };
    executor.context("starting the executor")
}

/// The build history of a node over `cas`: in its embedded database, or — a front end of
/// `shared` — in the shared database, where the front end named `front_end` (its peer id)
/// records the builds it takes.
pub async fn history(
    cas: &Cas,
    shared: Option<&Shared>,
    front_end: &str,
) -> anyhow::Result<History> {
    match shared {
        None => History::embedded(&cas.blobs),
        Some(shared) => {
            let store = PgHistory::open(&shared.postgres, front_end)
                .await
                .with_context(|| format!("{DATABASE_URL_VAR}: the build history cannot be used"))?;
            Ok(History::over(Arc::new(store)))
        }
    }
}

/// A worker's executor over its local tier `cas` and the staging its jobs go through.
pub fn worker_executor(
    cas: &Cas,
    executor_config: ExecutorConfig,
    shared: &Shared,
) -> anyhow::Result<(Executor, TieredStaging)> {
    let limits = executor_config.tree_limits.clone();
    let stores = shared.stores(cas);
    let executor = Executor::with_stores(cas.clone(), executor_config, stores.clone())
        .context("starting the worker's executor")?;
    Ok((executor, TieredStaging::new(stores, limits)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked() {
        assert_eq!(
            mask_url("postgres://rba:s3cret@db.example:5432/rba?sslmode=disable"),
            "postgres://rba:********@db.example:5432/rba?sslmode=disable"
        );
        assert_eq!(
            mask_url("postgres://rba@127.0.0.1/rba"),
            "postgres://rba@127.0.0.1/rba"
        );
        assert_eq!(
            mask_url("host=/tmp user=rba password=s3cret dbname=rba"),
            "host=/tmp user=rba password=******** dbname=rba"
        );
        assert_eq!(
            mask_url("postgres://h/db?password=x&user=y"),
            "postgres://h/db?password=********&user=y"
        );
    }

    #[test]
    fn both_urls_or_neither() {
        let mut config = NodeConfig::default();
        assert!(scale_out_urls(&config).unwrap().is_none());
        config.store.url = Some("s3://bucket".into());
        let error = scale_out_urls(&config).unwrap_err().to_string();
        assert!(error.contains(DATABASE_URL_VAR), "{error}");
        config.database.url = Some("postgres://rba@127.0.0.1/rba".into());
        assert!(scale_out_urls(&config).unwrap().is_some());
        config.store.url = Some("gs://bucket".into());
        let error = scale_out_urls(&config).unwrap_err().to_string();
        assert!(error.contains(STORE_URL_VAR), "{error}");
        config.store.url = Some("s3://".into());
        assert!(scale_out_urls(&config).is_err());
        config.store.url = None;
        let error = scale_out_urls(&config).unwrap_err().to_string();
        assert!(error.contains(STORE_URL_VAR), "{error}");
    }
}
