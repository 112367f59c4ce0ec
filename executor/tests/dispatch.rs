//! A front end's executor dispatching through the job queue to a worker, over a real
//! PostgreSQL ([`TestPostgres`]) and a real S3-compatible server ([`TestS3`], moto): the front
//! end and the worker each have their own local tier and see each other only through the
//! bucket and the database, as two machines would.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::hash_dir;
use rba_cas::backends::postgres::Postgres;
use rba_cas::backends::s3::{BucketOptions, BucketStore};
use rba_cas::layers::tiered::Tiered;
use rba_cas::{Cas, Digest, DigestFunction, Stores};
use rba_e2e_tests::postgres::TestPostgres;
use rba_e2e_tests::s3::TestS3;
use rba_executor::action::store_action;
use rba_executor::runner::{ExecuteRequest, Executor, ExecutorConfig, JobState, JobStatus};
use rba_executor::scheduler::{Dispatch, JobQueue, QueueConfig, TieredStaging, Worker};
use rba_executor::tenant::Tenant;
use rba_proto::reapi::{Command, Platform};
use tokio::sync::watch;

fn fast() -> QueueConfig {
    QueueConfig {
        lease_secs: 2,
        heartbeat_secs: 1,
        prefer_grace_secs: 1,
        queue_timeout_secs: 60,
        max_attempts: 3,
        poll_interval_ms: 100,
        reap_interval_secs: 1,
        retention_secs: 3600,
        database_retry_secs: 30,
    }
}

/// One machine's view of the shared state: its own scratch `Cas` as the local tier of the
/// bucket, the database's action cache and grants.
async fn shared(pg: &TestPostgres, s3: &TestS3) -> (Cas, Stores, tempfile::TempDir) {
    let (dir, cas) = Cas::scratch().unwrap();
    let postgres = Postgres::connect(&pg.url()).await.unwrap();
    let bucket = BucketStore::from_url_and_vars(
        &s3.url(),
        s3.env(),
        BucketOptions::default(),
        Arc::new(postgres.blob_index()),
    )
    .unwrap();
    let tiered = Tiered::new(cas.blobs.clone(), Arc::new(bucket));
    let stores = Stores::new(
        Arc::new(tiered),
        Arc::new(postgres.action_cache()),
        Arc::new(postgres.grants()),
    );
    (cas, stores, dir)
}

fn config(dir: &std::path::Path) -> ExecutorConfig {
    let mut config = ExecutorConfig::new(dir).unwrap();
    config.sandbox.isolation = common::isolation();
    config.workers = 2;
    config
}

/// `sh -c SCRIPT` over an input root holding `in.txt`, collecting `out.txt`.
async fn job(cas: &Cas, script: &str) -> ExecuteRequest {
    let input = tempfile::tempdir().unwrap();
    std::fs::write(input.path().join("in.txt"), "hello from the front end\n").unwrap();
    let root = hash_dir(cas, input.path(), DigestFunction::Sha256).await;
    let command = Command {
        arguments: vec!["sh".into(), "-c".into(), script.into()],
        output_paths: vec!["out.txt".into()],
        ..Default::default()
    };
    let prepared = store_action(
        command,
        root,
        Platform::default(),
        &cas.blobs,
        DigestFunction::Sha256,
    )
    .unwrap();
    ExecuteRequest {
        instance: "main".into(),
        action_digest: prepared.action_digest,
        skip_cache_lookup: false,
        workspace_identity: None,
        tenant: Tenant::local(),
        limits: Default::default(),
    }
}

fn output(outcome: &rba_executor::runner::JobOutcome) -> Digest {
    let file = &outcome.result.as_ref().expect("a result").output_files[0];
    assert_eq!(file.path, "out.txt");
    Digest::from_reapi(DigestFunction::Sha256, file.digest.as_ref().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_front_end_runs_its_jobs_on_a_worker_through_the_bucket_and_the_database() {
    let pg = TestPostgres::start();
    let s3 = TestS3::start();

    let (front_cas, front_stores, _front_dir) = shared(&pg, &s3).await;
    let front_data = tempfile::tempdir().unwrap();
    let queue = JobQueue::connect(&pg.url(), fast()).await.unwrap();
    let front = Executor::with_dispatch(
        front_cas.clone(),
        config(front_data.path()),
        front_stores.clone(),
        Dispatch::new(queue.clone()),
    )
    .unwrap();

    let (worker_cas, worker_stores, _worker_dir) = shared(&pg, &s3).await;
    let worker_data = tempfile::tempdir().unwrap();
    let worker_config = config(worker_data.path());
    let limits = worker_config.tree_limits.clone();
    let worker_executor =
        Executor::with_stores(worker_cas.clone(), worker_config, worker_stores.clone()).unwrap();
    let (drain, signal) = watch::channel(false);
    let worker = Worker::new(queue.clone(), worker_executor)
        .with_id("worker-a")
        .with_slots(2)
        .with_staging(Arc::new(TieredStaging::new(worker_stores.clone(), limits)));
    let worker = tokio::spawn(worker.run(signal));

    // A miss runs on the worker; its log reaches the front end's job as it runs, its output
    // is in the front end's local tier.
    let request = job(&front_cas, "cat in.txt > out.txt; echo ran on a worker").await;
    let handle = front.submit(request.clone()).await.unwrap();
    let outcome = handle.wait().await;
    assert_eq!(outcome.status, JobStatus::Success, "{:?}", outcome.error);
    assert!(!outcome.cache_hit);
    let text = {
        use futures::StreamExt;
        let lines: Vec<_> = handle.log.lines(0).collect().await;
        lines
            .into_iter()
            .map(|l| l.line)
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(text.contains("ran on a worker"), "{text}");
    let out = output(&outcome);
    assert_eq!(
        front_cas.blobs.read_to_vec(&out, 1 << 20).unwrap(),
        b"hello from the front end\n"
    );
    assert!(
        worker_cas.blobs.contains(&out).unwrap(),
        "the worker made it"
    );
    let log = outcome.log.unwrap();
    assert!(
        front_cas.blobs.contains(&log.log).unwrap(),
        "the front end's own log"
    );

    // The same action again: a hit from the shared action cache, nothing runs.
    let again = front.submit(request.clone()).await.unwrap().wait().await;
    assert!(again.cache_hit, "{again:?}");
    assert_eq!(output(&again), out);

    // A second front end with an empty local tier is served the same hit, its blobs made
    // local from the bucket.
    let (other_cas, other_stores, _other_dir) = shared(&pg, &s3).await;
    let other_data = tempfile::tempdir().unwrap();
    let other = Executor::with_dispatch(
        other_cas.clone(),
        config(other_data.path()),
        other_stores,
        Dispatch::new(queue.clone()),
    )
    .unwrap();
    // (its Action and Command come from the bucket too: the first front end published them)
    assert!(!other_cas.blobs.contains(&request.action_digest).unwrap());
    let elsewhere = other.submit(request.clone()).await.unwrap().wait().await;
    assert!(elsewhere.cache_hit, "{elsewhere:?}");
    assert!(other_cas.blobs.contains(&out).unwrap());

    // Cancelling a dispatched job cancels it in the queue: the worker stops it.
    let sleeper = job(&front_cas, "sleep 60; echo never > out.txt").await;
    let handle = front.submit(sleeper).await.unwrap();
    let started = Instant::now();
    while !matches!(handle.state(), JobState::Running { .. }) {
        assert!(started.elapsed() < Duration::from_secs(30), "never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    handle.cancel();
    assert_eq!(handle.wait().await.status, JobStatus::Cancelled);
    let followup = job(&front_cas, "cat in.txt > out.txt; echo after the cancel").await;
    let started = Instant::now();
    let outcome = front.submit(followup).await.unwrap().wait().await;
    assert_eq!(outcome.status, JobStatus::Success, "{:?}", outcome.error);
    assert!(started.elapsed() < Duration::from_secs(30));

    let _ = drain.send(true);
    let report = worker.await.unwrap();
    assert!(report.completed >= 2, "{report:?}");
}
