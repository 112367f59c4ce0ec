//! A front end's executor dispatching through the job queue to a worker, over a real
//! PostgreSQL ([`TestPostgres`]) and a real S3-compatible server ([`TestS3`], moto): the front
//! end and the worker each have their own local tier and see each other only through the
//! bucket and the database, as two machines would: dispatch, live logs, outputs made local,
//! shared hits, cancellation, and the tenant namespaces of results built on a worker.

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
use rba_executor::cargo::{CargoJob, JobKind};
use rba_executor::logstream::strip_ansi;
use rba_executor::runner::{
    CARGO_INSTANCE, ExecuteRequest, Executor, ExecutorConfig, JobState, JobStatus, Provenance,
    result_namespace,
};
use rba_executor::scheduler::{Dispatch, JobQueue, QueueConfig, TieredStaging, Worker};
use rba_executor::tenant::Tenant;
use rba_proto::reapi::Command;
use tokio::sync::watch;

/// What the `planter` fixture's build script writes over the `hello` binary.
const PLANTED: &[u8] = b"#!/bin/sh\necho planted by another build\n";

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
        output_paths: vec!["out.txt".into()],
        ..common::shell(script)
    };
    common::command_request(cas, root, command, false)
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

    // The second front end follows a job the first dispatched, by its id (an operation or
    // session name reaching another front end): its live log and its outcome, the output made
    // local there. A caller that may not see the job's tenant is told nothing, and following
    // is not owning: draining the follower leaves the job running to its end.
    let slow = job(
        &front_cas,
        "sleep 2; cat in.txt > out.txt; echo followed elsewhere",
    )
    .await;
    let owner = slow.tenant.clone();
    let dispatched = front.submit(slow).await.unwrap();
    // Found elsewhere once it is in the queue (its inputs published): a worker runs it.
    let started = Instant::now();
    while !matches!(dispatched.state(), JobState::Running { .. }) {
        assert!(started.elapsed() < Duration::from_secs(30), "never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        other
            .find_job(&dispatched.id, |_| false)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        other
            .find_job("no-such-job", |_| true)
            .await
            .unwrap()
            .is_none()
    );
    let followed = other
        .find_job(&dispatched.id, |tenant| *tenant == owner)
        .await
        .unwrap()
        .expect("the job is followed");
    assert_eq!((&followed.id, &followed.tenant), (&dispatched.id, &owner));
    assert!(
        !matches!(followed.state(), JobState::Done(_)),
        "still running"
    );
    assert_eq!(
        other.drain(Duration::ZERO).await,
        0,
        "not the follower's to drain"
    );
    let outcome = followed.wait().await;
    assert_eq!(outcome.status, JobStatus::Success, "{:?}", outcome.error);
    let lines = common::log_lines(&followed).await;
    assert!(
        lines.iter().any(|l| l.contains("followed elsewhere")),
        "{lines:#?}"
    );
    assert_eq!(
        other_cas
            .blobs
            .read_to_vec(&output(&outcome), 1 << 20)
            .unwrap(),
        b"hello from the front end\n"
    );
    assert_eq!(dispatched.wait().await.status, JobStatus::Success);

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

/// A front end and one worker over the same bucket and database.
struct Deployment {
    front: Executor,
    front_cas: Cas,
    front_stores: Stores,
    worker: tokio::task::JoinHandle<rba_executor::scheduler::WorkerReport>,
    drain: watch::Sender<bool>,
    _dirs: Vec<tempfile::TempDir>,
    _services: (TestPostgres, TestS3),
}

impl Deployment {
    async fn start(tweak: impl Fn(&mut ExecutorConfig)) -> Deployment {
        let pg = TestPostgres::start();
        let s3 = TestS3::start();
        let queue = JobQueue::connect(&pg.url(), fast()).await.unwrap();
        let (front_cas, front_stores, front_dir) = shared(&pg, &s3).await;
        let front_data = tempfile::tempdir().unwrap();
        let mut front_config = config(front_data.path());
        tweak(&mut front_config);
        let front = Executor::with_dispatch(
            front_cas.clone(),
            front_config,
            front_stores.clone(),
            Dispatch::new(queue.clone()),
        )
        .unwrap();
        let (worker_cas, worker_stores, worker_dir) = shared(&pg, &s3).await;
        let worker_data = tempfile::tempdir().unwrap();
        let mut worker_config = config(worker_data.path());
        tweak(&mut worker_config);
        let limits = worker_config.tree_limits.clone();
        let executor =
            Executor::with_stores(worker_cas, worker_config, worker_stores.clone()).unwrap();
        let (drain, signal) = watch::channel(false);
        let worker = Worker::new(queue, executor)
            .with_id("the-worker")
            .with_staging(Arc::new(TieredStaging::new(worker_stores, limits)));
        Deployment {
            front,
            front_cas,
            front_stores,
            worker: tokio::spawn(worker.run(signal)),
            drain,
            _dirs: vec![front_dir, front_data, worker_dir, worker_data],
            _services: (pg, s3),
        }
    }

    async fn build(
        &self,
        source: &std::path::Path,
        tenant: &Tenant,
    ) -> (Digest, Arc<rba_executor::runner::JobOutcome>, Vec<String>) {
        let root = hash_dir(&self.front_cas, source, DigestFunction::Blake3).await;
        let handle = self
            .front
            .submit_cargo(
                &CargoJob::new(JobKind::Build),
                root,
                "popular",
                tenant.clone(),
            )
            .await
            .unwrap();
        let outcome = handle.wait().await;
        let lines = common::log_lines(&handle).await;
        assert_eq!(
            outcome.status,
            JobStatus::Success,
            "{tenant}: {lines:#?} {:?}",
            outcome.error
        );
        (handle.action_digest, outcome, lines)
    }

    /// Whether the shared action cache holds an entry (unchecked) under `namespace`.
    async fn cached(&self, namespace: &str, action: &Digest) -> bool {
        self.front_stores
            .actions()
            .inner()
            .get_unchecked(namespace, action)
            .await
            .unwrap()
            .is_some()
    }

    fn binary(&self, outcome: &rba_executor::runner::JobOutcome) -> Vec<u8> {
        let artifact = outcome
            .artifacts
            .iter()
            .find(|a| a.path == "target/debug/hello")
            .unwrap_or_else(|| panic!("no hello binary in {:?}", outcome.artifacts));
        self.front_cas
            .blobs
            .read_to_vec(&artifact.digest, 64 << 20)
            .unwrap()
    }
}

/// The runner's poisoning rule ("Results nobody else influenced") holds when the jobs run on
/// a worker: the worker's slot is the tenant's, a result built on a reused target dir lands in
/// the tenant's namespace of the shared action cache, and another tenant is never served it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_keeps_a_tenants_scoped_result_from_every_other_tenant() {
    let deployment = Deployment::start(|config| {
        config.limits.wall_time = Some(Duration::from_secs(300));
    })
    .await;
    let (alice, bob, carol) = (
        Tenant::token("alice"),
        Tenant::token("bob"),
        Tenant::token("carol"),
    );
    let hello = common::fixture("hello");
    let hello_with_notes = tempfile::tempdir().unwrap();
    common::copy_dir(&hello, hello_with_notes.path());
    std::fs::write(hello_with_notes.path().join("NOTES.txt"), "not a source\n").unwrap();
    let alice_scope = result_namespace(CARGO_INSTANCE, &alice, Provenance::TenantState, true);

    // A's first build: a fresh slot on the worker, clean, shared.
    let (first, outcome, _) = deployment.build(hello_with_notes.path(), &alice).await;
    assert!(!outcome.cache_hit);
    assert!(deployment.cached(CARGO_INSTANCE, &first).await);

    // The planter poisons A's slot on the worker; its result stays A's.
    let (planter, _, lines) = deployment.build(&common::fixture("planter"), &alice).await;
    assert!(
        lines
            .iter()
            .any(|l| strip_ansi(l).contains("planted 2 file(s)")),
        "the planter ran in A's slot on the worker: {lines:#?}"
    );
    assert!(!deployment.cached(CARGO_INSTANCE, &planter).await);
    assert!(deployment.cached(&alice_scope, &planter).await);

    // A's build of the popular tree in the poisoned slot is A's alone.
    let (poisoned, outcome, lines) = deployment.build(&hello, &alice).await;
    assert!(!outcome.cache_hit, "{lines:#?}");
    assert_eq!(deployment.binary(&outcome), PLANTED, "{lines:#?}");
    assert!(!deployment.cached(CARGO_INSTANCE, &poisoned).await);
    assert!(deployment.cached(&alice_scope, &poisoned).await);

    // B: the same action, never served A's result: a clean build of its own.
    let (clean, outcome, lines) = deployment.build(&hello, &bob).await;
    assert_eq!(clean, poisoned, "the same action");
    assert!(!outcome.cache_hit, "B is never served A's scoped result");
    assert!(
        lines
            .iter()
            .any(|l| strip_ansi(l).contains("Compiling hello")),
        "{lines:#?}"
    );
    let clean_binary = deployment.binary(&outcome);
    assert_ne!(clean_binary, PLANTED);
    assert!(deployment.cached(CARGO_INSTANCE, &clean).await);

    // A's resubmission hits its own entry; a third tenant is served B's clean one.
    let (_, outcome, _) = deployment.build(&hello, &alice).await;
    assert!(outcome.cache_hit);
    assert_eq!(deployment.binary(&outcome), PLANTED);
    let (_, outcome, _) = deployment.build(&hello, &carol).await;
    assert!(outcome.cache_hit);
    assert_eq!(deployment.binary(&outcome), clean_binary);

    let _ = deployment.drain.send(true);
    let report = deployment.worker.await.unwrap();
    assert_eq!(report.completed, 4, "{report:?}");
}
