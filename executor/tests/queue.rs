//! The scale-out job queue ([`rba_executor::scheduler`]) against a real PostgreSQL (a private
//! cluster per test, [`TestPostgres`]): claims, leases, reaping, deadlines, preference, live
//! logs, hostile text, corrupt rows, a database restart — through the queue's API, and with
//! real workers running real sandboxed commands where the executor is the point.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Harness, hash_dir};
use rba_cas::{Cas, Digest, DigestFunction};
use rba_e2e_tests::postgres::TestPostgres;
use rba_executor::logstream::{LogLine, LogStreamKind};
use rba_executor::runner::{ExecuteRequest, Executor, ExecutorConfig, JobOutcome, JobStatus};
use rba_executor::scheduler::{
    ClaimedJob, JobId, JobQueue, QueueConfig, QueueError, Worker, WorkerReport,
};
use rba_executor::tenant::Tenant;
use tokio::sync::watch;

/// Timing for tests: short leases and deadlines, fast polling.
fn fast() -> QueueConfig {
    QueueConfig {
        lease_secs: 2,
        heartbeat_secs: 1,
        prefer_grace_secs: 2,
        queue_timeout_secs: 60,
        max_attempts: 3,
        poll_interval_ms: 100,
        reap_interval_secs: 1,
        retention_secs: 3600,
        database_retry_secs: 60,
    }
}

async fn queue(pg: &TestPostgres, config: QueueConfig) -> JobQueue {
    JobQueue::connect(&pg.url(), config).await.unwrap()
}

/// A request for an Action that is never run (queue-only tests).
fn request(n: u64) -> ExecuteRequest {
    ExecuteRequest {
        instance: "main".into(),
        action_digest: DigestFunction::Sha256.digest_of(format!("action {n}").as_bytes()),
        skip_cache_lookup: false,
        workspace_identity: None,
        tenant: Tenant::local(),
        limits: Default::default(),
    }
}

fn outcome(exit_code: i32) -> JobOutcome {
    JobOutcome {
        status: if exit_code == 0 {
            JobStatus::Success
        } else {
            JobStatus::Failed
        },
        exit_code,
        result: None,
        cache_hit: false,
        duration: Duration::from_millis(5),
        log: None,
        artifacts: Vec::new(),
        steps: Vec::new(),
        step_end_lines: Vec::new(),
        error: None,
        timed_out: false,
        limit: None,
        peak_memory_bytes: None,
    }
}

fn line(seq: u64, text: &str) -> LogLine {
    LogLine {
        seq,
        stream: LogStreamKind::Stdout,
        line: text.into(),
    }
}

/// Stores `sh -c SCRIPT` as an Action over an empty input root in `cas`; the request for it.
async fn shell_job(cas: &Cas, script: &str) -> ExecuteRequest {
    let empty = tempfile::tempdir().unwrap();
    let root = hash_dir(cas, empty.path(), DigestFunction::Sha256).await;
    common::command_request(cas, root, common::shell(script), true)
}

/// A second executor over the same CAS (the shared store), with its own data dir.
fn second_executor(cas: &Cas) -> (Executor, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ExecutorConfig::new(dir.path()).unwrap();
    config.sandbox.isolation = common::isolation();
    config.workers = 2;
    (Executor::new(cas.clone(), config).unwrap(), dir)
}

/// A running worker: its task, and the sender that drains it.
struct RunningWorker {
    task: tokio::task::JoinHandle<WorkerReport>,
    drain: watch::Sender<bool>,
}

fn start_worker(queue: &JobQueue, executor: &Executor, id: &str, slots: usize) -> RunningWorker {
    let (drain, signal) = watch::channel(false);
    let worker = Worker::new(queue.clone(), executor.clone())
        .with_id(id)
        .with_slots(slots)
        .with_drain_grace(Duration::from_secs(10));
    RunningWorker {
        task: tokio::spawn(worker.run(signal)),
        drain,
    }
}

impl RunningWorker {
    async fn stop(self) -> WorkerReport {
        let _ = self.drain.send(true);
        self.task.await.unwrap()
    }
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn stdout_of(cas: &Cas, outcome: &JobOutcome) -> String {
    let result = outcome.result.as_ref().expect("an ActionResult");
    let digest = Digest::from_reapi(
        DigestFunction::Sha256,
        result.stdout_digest.as_ref().unwrap(),
    )
    .unwrap();
    String::from_utf8(cas.blobs.read_to_vec(&digest, 1 << 20).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claimers_never_take_the_same_job() {
    let pg = TestPostgres::start();
    let queue = queue(&pg, fast()).await;
    let mut ids = BTreeSet::new();
    for n in 0..60 {
        ids.insert(queue.enqueue(&request(n), None).await.unwrap());
    }
    let depth = queue.depth().await.unwrap();
    assert_eq!((depth.queued, depth.running), (60, 0));
    let held = queue.claim("holder").await.unwrap().unwrap();
    let depth = queue.depth().await.unwrap();
    assert_eq!((depth.queued, depth.running), (59, 1));
    queue.complete(&held, &outcome(0)).await.unwrap();
    ids.remove(&held.id);
    let claimers = (0..4).map(|w| {
        let queue = queue.clone();
        tokio::spawn(async move {
            let mut claimed = Vec::new();
            while let Some(job) = queue.claim(&format!("worker-{w}")).await.unwrap() {
                queue.complete(&job, &outcome(0)).await.unwrap();
                claimed.push(job.id);
            }
            claimed
        })
    });
    let mut seen = BTreeMap::<JobId, usize>::new();
    for claimer in claimers {
        for id in claimer.await.unwrap() {
            *seen.entry(id).or_default() += 1;
        }
    }
    assert_eq!(seen.keys().copied().collect::<BTreeSet<_>>(), ids);
    assert!(
        seen.values().all(|&n| n == 1),
        "a job was claimed twice: {seen:?}"
    );
    let depth = queue.depth().await.unwrap();
    assert_eq!(
        (depth.queued, depth.running),
        (0, 0),
        "finished jobs are not counted"
    );
    for id in ids {
        let record = queue.job(id).await.unwrap();
        assert_eq!((record.state.as_str(), record.attempts), ("done", 1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_worker_can_write_nothing_after_its_job_was_requeued() {
    let pg = TestPostgres::start();
    let queue = queue(&pg, fast()).await;
    let id = queue.enqueue(&request(1), None).await.unwrap();
    let stale = queue.claim("stale").await.unwrap().unwrap();
    queue
        .append_logs(&stale, &[line(0, "from stale")])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Expired but not reaped: still the holder (nothing was lost), its heartbeat is accepted.
    queue.heartbeat(&stale).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let reaped = queue.reap().await.unwrap();
    assert_eq!(reaped.requeued, 1);
    let fresh = queue.claim("fresh").await.unwrap().unwrap();
    assert_eq!((fresh.id, fresh.attempt), (id, 2));
    for refused in [
        queue.complete(&stale, &outcome(7)).await,
        queue.heartbeat(&stale).await.map(|_| ()),
        queue.append_logs(&stale, &[line(1, "late")]).await,
        queue.release(&stale).await,
    ] {
        assert!(
            matches!(refused, Err(QueueError::LeaseLost { ref worker, .. }) if worker == "stale"),
            "{refused:?}"
        );
    }
    queue
        .append_logs(&fresh, &[line(0, "from fresh")])
        .await
        .unwrap();
    // A repeated batch (its reply lost) is stored once; a gap is refused.
    queue
        .append_logs(&fresh, &[line(0, "from fresh")])
        .await
        .unwrap();
    let gap = queue
        .append_logs(&fresh, &[line(1, "x"), line(3, "y")])
        .await
        .unwrap_err();
    assert!(gap.to_string().contains("not contiguous"), "{gap}");
    queue.complete(&fresh, &outcome(0)).await.unwrap();
    // Repeating the same complete (a lost reply) is fine; the stale one still is not.
    queue.complete(&fresh, &outcome(0)).await.unwrap();
    assert!(queue.complete(&stale, &outcome(7)).await.is_err());
    let recorded = queue.wait(id).await.unwrap();
    assert_eq!(recorded.exit_code, 0);
    let record = queue.job(id).await.unwrap();
    assert_eq!(record.worker.as_deref(), Some("fresh"));
    assert_eq!(record.lost_workers, vec!["stale".to_string()]);
    let mut logs = queue.logs(id, 0);
    let mut lines = Vec::new();
    while let Some(line) = logs.next().await.unwrap() {
        lines.push((line.seq, line.stream, line.line));
    }
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0].2, "from stale");
    assert_eq!(lines[1].1, LogStreamKind::System);
    assert!(
        lines[1]
            .2
            .contains("worker stale stopped renewing its lease"),
        "{lines:?}"
    );
    assert_eq!(lines[2].2, "from fresh");
    assert_eq!(lines.iter().map(|l| l.0).collect::<Vec<_>>(), vec![0, 1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_workers_keep_dying_fails_naming_them() {
    let pg = TestPostgres::start();
    let queue = queue(
        &pg,
        QueueConfig {
            lease_secs: 2,
            heartbeat_secs: 1,
            max_attempts: 2,
            ..fast()
        },
    )
    .await;
    let id = queue.enqueue(&request(1), None).await.unwrap();
    for worker in ["first-dead", "second-dead"] {
        let job = queue.claim(worker).await.unwrap().unwrap();
        assert_eq!(job.id, id);
        tokio::time::sleep(Duration::from_millis(2200)).await;
        queue.reap().await.unwrap();
    }
    assert!(queue.claim("third").await.unwrap().is_none());
    let failed = queue.wait(id).await.unwrap();
    assert_eq!(failed.status, JobStatus::Error);
    let error = failed.error.as_deref().unwrap();
    assert!(
        error.contains(&format!("job {id}"))
            && error.contains("worker second-dead stopped renewing its lease on attempt 2 of 2")
            && error.contains("first-dead, second-dead"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_no_worker_takes_fails_after_its_deadline_saying_so() {
    let pg = TestPostgres::start();
    let queue = queue(
        &pg,
        QueueConfig {
            queue_timeout_secs: 1,
            ..fast()
        },
    )
    .await;
    // A worker that was around (and idle) when the job came, but only takes its own jobs.
    assert!(queue.claim("busy-elsewhere").await.unwrap().is_none());
    let id = queue.enqueue(&request(1), None).await.unwrap();
    let started = Instant::now();
    // Nobody claims, nobody reaps but the waiter itself.
    let failed = tokio::time::timeout(Duration::from_secs(10), queue.wait(id))
        .await
        .expect("the waiter does not hang")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1));
    let error = failed.error.as_deref().unwrap();
    assert!(
        error.starts_with(&format!(
            "no worker took job {id} within 1 seconds (workers seen: busy-elsewhere ("
        )),
        "{error}"
    );
    assert_eq!(queue.job(id).await.unwrap().state, "failed");
    assert!(
        queue.claim("late").await.unwrap().is_none(),
        "a failed job is never claimed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_goes_to_its_preferred_worker_first_then_to_anyone() {
    let pg = TestPostgres::start();
    let queue = queue(&pg, fast()).await;
    let older = queue.enqueue(&request(1), None).await.unwrap();
    let mine = queue.enqueue(&request(2), Some("owner")).await.unwrap();
    // The owner gets its job before an older one nobody prefers.
    let claimed = queue.claim("owner").await.unwrap().unwrap();
    assert_eq!(claimed.id, mine);
    queue.complete(&claimed, &outcome(0)).await.unwrap();
    let other = queue.claim("other").await.unwrap().unwrap();
    assert_eq!(other.id, older);
    queue.complete(&other, &outcome(0)).await.unwrap();

    // Another worker waits for the grace before taking the owner's job.
    let pinned = queue.enqueue(&request(3), Some("owner")).await.unwrap();
    assert!(queue.claim("other").await.unwrap().is_none());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let taken = queue.claim("other").await.unwrap().unwrap();
    assert_eq!(taken.id, pinned);
    queue.complete(&taken, &outcome(0)).await.unwrap();

    // A preferred worker that is not around is not waited for.
    let orphan = queue
        .enqueue(&request(5), Some("never-seen"))
        .await
        .unwrap();
    let taken = queue.claim("other").await.unwrap().unwrap();
    assert_eq!(taken.id, orphan);
    queue.complete(&taken, &outcome(0)).await.unwrap();

    // Without a named preference, a workspace's job prefers the worker that last built it
    // (for the same tenant only).
    let mut workspace = request(4);
    workspace.workspace_identity = Some("github.com/acme/app".into());
    let first = queue.enqueue(&workspace, None).await.unwrap();
    let job = queue.claim("builder").await.unwrap().unwrap();
    assert_eq!(job.id, first);
    queue.complete(&job, &outcome(0)).await.unwrap();
    workspace.action_digest = DigestFunction::Sha256.digest_of(b"changed");
    let again = queue.enqueue(&workspace, None).await.unwrap();
    assert_eq!(
        queue.job(again).await.unwrap().preferred_worker.as_deref(),
        Some("builder")
    );
    assert!(queue.claim("other").await.unwrap().is_none());
    workspace.tenant = Tenant::token("someone-else");
    let theirs = queue.enqueue(&workspace, None).await.unwrap();
    assert_eq!(queue.job(theirs).await.unwrap().preferred_worker, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_instance_tenant_and_worker_text_round_trips() {
    let pg = TestPostgres::start();
    let queue = queue(&pg, fast()).await;
    let hostile = "it's \"x\"; DROP TABLE rba_jobs; --\0\\x00 $1 %s \u{1b}[2J\u{0}end";
    let mut original = request(1);
    original.instance = hostile.into();
    original.tenant = Tenant::token(hostile);
    original.workspace_identity = Some(hostile.into());
    let id = queue.enqueue(&original, Some(hostile)).await.unwrap();
    let job = queue.claim(hostile).await.unwrap().unwrap();
    assert_eq!(job.id, id, "the hostile preferred worker is its worker");
    assert_eq!(job.request.instance, original.instance);
    assert_eq!(job.request.tenant, original.tenant);
    assert_eq!(job.request.workspace_identity, original.workspace_identity);
    queue.append_logs(&job, &[line(0, hostile)]).await.unwrap();
    let mut finished = outcome(1);
    finished.error = Some(hostile.into());
    queue.complete(&job, &finished).await.unwrap();
    let back = queue.wait(id).await.unwrap();
    assert_eq!(back.error.as_deref(), Some(hostile));
    let mut logs = queue.logs(id, 0);
    assert_eq!(logs.next().await.unwrap().unwrap().line, hostile);
    assert!(logs.next().await.unwrap().is_none());
    // A reader asking for a line past any i64 gets nothing, not the log from the start.
    assert!(queue.logs(id, u64::MAX).next().await.unwrap().is_none());
    assert!(matches!(
        queue.logs(JobId(-1), 0).next().await,
        Err(QueueError::NotFound(_))
    ));
    // The table is still there and still works.
    assert!(queue.enqueue(&request(2), None).await.is_ok());
}

/// A connection of the test's own, to change rows behind the queue's back.
async fn raw_client(pg: &TestPostgres) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_request_fails_its_job_and_the_worker_keeps_serving() {
    let pg = TestPostgres::start();
    let queue = queue(&pg, fast()).await;
    let harness = Harness::new(|_| {});
    let corrupt = queue.enqueue(&request(1), None).await.unwrap();
    raw_client(&pg)
        .await
        .execute(
            "UPDATE rba_jobs SET request = '\\xdeadbeef00' WHERE id = $1",
            &[&corrupt.0],
        )
        .await
        .unwrap();
    let good = queue
        .enqueue(&shell_job(&harness.cas, "echo still serving").await, None)
        .await
        .unwrap();
    let worker = start_worker(&queue, &harness.executor, "w1", 1);
    let failed = queue.wait(corrupt).await.unwrap();
    let error = failed.error.as_deref().unwrap();
    assert!(
        error.starts_with(&format!(
            "job {corrupt}: its stored request cannot be read: "
        )),
        "{error}"
    );
    let done = queue.wait(good).await.unwrap();
    assert_eq!(done.status, JobStatus::Success, "{:?}", done.error);
    assert_eq!(stdout_of(&harness.cas, &done).await, "still serving\n");
    let report = worker.stop().await;
    assert_eq!(report.completed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_reach_a_reader_in_order_while_the_job_runs() {
    let pg = TestPostgres::start();
    let queue = queue(&pg, fast()).await;
    let harness = Harness::new(|_| {});
    let request = shell_job(
        &harness.cas,
        "for i in $(seq 1 30); do echo line $i; done; echo err >&2; sleep 3; echo last",
    )
    .await;
    let id = queue.enqueue(&request, None).await.unwrap();
    let worker = start_worker(&queue, &harness.executor, "w1", 1);
    let mut logs = queue.logs(id, 0);
    let mut lines = Vec::new();
    loop {
        let line = logs.next().await.unwrap().expect("more lines");
        let done = line.line == "err";
        lines.push(line);
        if done {
            break;
        }
    }
    // Seen while the job is still running (it sleeps before its last line).
    assert_eq!(queue.job(id).await.unwrap().state, "running");
    while let Some(line) = logs.next().await.unwrap() {
        lines.push(line);
    }
    assert_eq!(
        lines.iter().map(|l| l.seq).collect::<Vec<_>>(),
        (0..lines.len() as u64).collect::<Vec<_>>()
    );
    let stdout: Vec<&str> = lines
        .iter()
        .filter(|l| l.stream == LogStreamKind::Stdout)
        .map(|l| l.line.as_str())
        .collect();
    let mut expected: Vec<String> = (1..=30).map(|i| format!("line {i}")).collect();
    expected.push("last".into());
    assert_eq!(stdout, expected);
    assert!(
        lines
            .iter()
            .any(|l| l.stream == LogStreamKind::Stderr && l.line == "err")
    );
    // A reader from the middle gets the rest.
    let mut late = queue.logs(id, 10);
    assert_eq!(late.next().await.unwrap().unwrap().seq, 10);
    let outcome = queue.wait(id).await.unwrap();
    assert_eq!(outcome.status, JobStatus::Success);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_job_is_requeued_and_finished_by_another_once() {
    let pg = TestPostgres::start();
    let queue = queue(&pg, fast()).await;
    let harness = Harness::new(|_| {});
    let (other_executor, _other_dir) = second_executor(&harness.cas);
    let request = shell_job(&harness.cas, "echo started; sleep 3; echo finished").await;
    let id = queue.enqueue(&request, None).await.unwrap();
    let doomed = start_worker(&queue, &harness.executor, "doomed", 1);
    wait_until(
        "the job to run on the doomed worker",
        Duration::from_secs(30),
        || async {
            let record = queue.job(id).await.unwrap();
            record.state == "running" && record.log_lines > 0
        },
    )
    .await;
    // Killed: its task is gone without completing or releasing anything.
    doomed.task.abort();
    let killed = Instant::now();
    let survivor = start_worker(&queue, &other_executor, "survivor", 1);
    wait_until(
        "the survivor to take the job",
        Duration::from_secs(30),
        || async { queue.job(id).await.unwrap().worker.as_deref() == Some("survivor") },
    )
    .await;
    let taken_over = killed.elapsed();
    let outcome = queue.wait(id).await.unwrap();
    let took = killed.elapsed();
    assert_eq!(outcome.status, JobStatus::Success, "{:?}", outcome.error);
    assert_eq!(
        stdout_of(&harness.cas, &outcome).await,
        "started\nfinished\n"
    );
    let record = queue.job(id).await.unwrap();
    assert_eq!(record.state, "done");
    assert_eq!(record.attempts, 2);
    assert_eq!(record.worker.as_deref(), Some("survivor"));
    assert_eq!(record.lost_workers, vec!["doomed".to_string()]);
    eprintln!(
        "a killed worker's job: taken over {taken_over:?} and finished elsewhere {took:?} after \
         the kill (lease 2 s, reap every 1 s, the job runs 3 s)"
    );
    // The doomed executor's run ends on its own; it records nothing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        queue.job(id).await.unwrap().worker.as_deref(),
        Some("survivor")
    );
    let report = survivor.stop().await;
    assert_eq!(report.completed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_releases_a_job_that_outlives_the_grace() {
    let pg = TestPostgres::start();
    let queue = queue(&pg, fast()).await;
    let harness = Harness::new(|_| {});
    let request = shell_job(&harness.cas, "echo long; sleep 60").await;
    let id = queue.enqueue(&request, None).await.unwrap();
    let (drain, signal) = watch::channel(false);
    let worker = Worker::new(queue.clone(), harness.executor.clone())
        .with_id("leaving")
        .with_drain_grace(Duration::from_millis(500));
    let task = tokio::spawn(worker.run(signal));
    wait_until("the job to run", Duration::from_secs(30), || async {
        queue.job(id).await.unwrap().log_lines > 0
    })
    .await;
    drain.send(true).unwrap();
    let report = tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("the worker stops after the grace")
        .unwrap();
    assert_eq!(report.released, 1);
    let record = queue.job(id).await.unwrap();
    assert_eq!((record.state.as_str(), record.attempts), ("queued", 0));
    let claimed: ClaimedJob = queue.claim("next").await.unwrap().unwrap();
    assert_eq!(claimed.id, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_restart_during_a_queue_of_twenty_jobs_loses_and_repeats_nothing() {
    let mut pg = TestPostgres::start();
    let queue = queue(
        &pg,
        QueueConfig {
            lease_secs: 20,
            heartbeat_secs: 2,
            ..fast()
        },
    )
    .await;
    let harness = Harness::new(|config| config.workers = 2);
    let (other_executor, _other_dir) = second_executor(&harness.cas);
    let mut jobs = Vec::new();
    for n in 0..20 {
        let request = shell_job(&harness.cas, &format!("echo job {n}; sleep 1")).await;
        jobs.push((n, queue.enqueue(&request, None).await.unwrap()));
    }
    let workers = [
        start_worker(&queue, &harness.executor, "a", 2),
        start_worker(&queue, &other_executor, "b", 2),
    ];
    let first = jobs[0].1;
    wait_until("a first job to finish", Duration::from_secs(60), || async {
        queue.job(first).await.is_ok_and(|r| r.state == "done")
    })
    .await;
    let mut unfinished = 0;
    for (_, id) in &jobs {
        unfinished += usize::from(queue.job(*id).await.unwrap().state != "done");
    }
    assert!(
        unfinished >= 10,
        "the restart comes mid-queue ({unfinished} left)"
    );
    tokio::task::block_in_place(|| pg.restart());
    for (n, id) in &jobs {
        let outcome = tokio::time::timeout(Duration::from_secs(120), queue.wait(*id))
            .await
            .unwrap_or_else(|_| panic!("job {n} hangs"))
            .unwrap();
        assert_eq!(
            outcome.status,
            JobStatus::Success,
            "job {n}: {:?}",
            outcome.error
        );
        assert_eq!(
            stdout_of(&harness.cas, &outcome).await,
            format!("job {n}\n")
        );
        let record = queue.job(*id).await.unwrap();
        assert_eq!(record.state, "done");
        // A claim whose reply the restart swallowed is the only way to a second attempt.
        assert!(record.attempts <= 2, "job {n}: {record:?}");
    }
    let mut completed = 0;
    for worker in workers {
        completed += worker.stop().await.completed;
    }
    assert_eq!(completed, 20, "every job recorded once, by one worker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reapers_requeue_each_expired_job_once() {
    let pg = TestPostgres::start();
    let queue = queue(&pg, fast()).await;
    let mut ids = Vec::new();
    for n in 0..30 {
        ids.push(queue.enqueue(&request(n), None).await.unwrap());
    }
    for _ in &ids {
        queue.claim("gone").await.unwrap().unwrap();
    }
    tokio::time::sleep(Duration::from_millis(2200)).await;
    // Four processes' reapers at once (each its own pool).
    let mut reapers = Vec::new();
    for _ in 0..4 {
        reapers.push(JobQueue::connect(&pg.url(), fast()).await.unwrap());
    }
    let runs = reapers.iter().map(|reaper| {
        let reaper = reaper.clone();
        tokio::spawn(async move {
            let mut requeued = 0;
            for _ in 0..3 {
                requeued += reaper.reap().await.unwrap().requeued;
            }
            requeued
        })
    });
    let mut requeued = 0;
    for run in runs {
        requeued += run.await.unwrap();
    }
    assert_eq!(requeued, ids.len() as u64);
    for id in ids {
        let record = queue.job(id).await.unwrap();
        assert_eq!(record.state, "queued");
        assert_eq!(record.lost_workers, vec!["gone".to_string()]);
        assert_eq!(record.log_lines, 1, "one requeue note per job");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_woken_by_notifications_also_after_a_database_restart() {
    let mut pg = TestPostgres::start();
    // Polling so slow that only a notification (or the listener's reconnection) can wake.
    let config = QueueConfig {
        poll_interval_ms: 60_000,
        reap_interval_secs: 3600,
        ..fast()
    };
    let queue = queue(&pg, config).await;
    for round in 0..2 {
        let id = loop {
            match queue.enqueue(&request(round), None).await {
                Ok(id) => break id,
                Err(error) => {
                    assert!(error.is_transient(), "{error}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        let job = queue.claim("w").await.unwrap().unwrap();
        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { queue.wait(id).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let completed = Instant::now();
        queue.complete(&job, &outcome(0)).await.unwrap();
        let woken = tokio::time::timeout(Duration::from_secs(15), waiter)
            .await
            .unwrap_or_else(|_| panic!("round {round}: the waiter was not woken"))
            .unwrap()
            .unwrap();
        assert_eq!(woken.exit_code, 0);
        eprintln!(
            "round {round}: woken {:?} after the outcome",
            completed.elapsed()
        );
        if round == 0 {
            tokio::task::block_in_place(|| pg.restart());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_ends_queued_or_running_and_the_worker_keeps_serving() {
    let pg = TestPostgres::start();
    let queue = queue(&pg, fast()).await;
    let harness = Harness::new(|_| {});
    let waiting = queue.enqueue(&request(1), Some("nobody")).await.unwrap();
    assert!(queue.cancel(waiting).await.unwrap());
    let outcome = queue.wait(waiting).await.unwrap();
    assert_eq!(outcome.status, JobStatus::Cancelled);
    assert!(queue.claim("nobody").await.unwrap().is_none());
    assert!(!queue.cancel(waiting).await.unwrap(), "already finished");
    assert!(matches!(
        queue.cancel(JobId(424242)).await,
        Err(QueueError::NotFound(_))
    ));

    // Cancelled while its worker is dead: failed by the reaper, never requeued.
    let orphan = queue.enqueue(&request(2), None).await.unwrap();
    queue.claim("ghost").await.unwrap().unwrap();
    assert!(queue.cancel(orphan).await.unwrap());
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(queue.reap().await.unwrap().gave_up, 1);
    let error = queue.wait(orphan).await.unwrap().error.clone().unwrap();
    assert_eq!(
        error,
        format!("job {orphan} was cancelled and its worker ghost stopped renewing its lease")
    );

    let long = queue
        .enqueue(&shell_job(&harness.cas, "echo begun; sleep 60").await, None)
        .await
        .unwrap();
    let worker = start_worker(&queue, &harness.executor, "w1", 1);
    wait_until("the job to run", Duration::from_secs(30), || async {
        queue.job(long).await.unwrap().log_lines > 0
    })
    .await;
    let cancelled = Instant::now();
    assert!(queue.cancel(long).await.unwrap());
    let outcome = tokio::time::timeout(Duration::from_secs(20), queue.wait(long))
        .await
        .expect("a cancelled job ends")
        .unwrap();
    assert_eq!(outcome.status, JobStatus::Cancelled, "{:?}", outcome.error);
    assert!(cancelled.elapsed() < Duration::from_secs(10));
    let next = queue
        .enqueue(&shell_job(&harness.cas, "echo next").await, None)
        .await
        .unwrap();
    assert_eq!(queue.wait(next).await.unwrap().status, JobStatus::Success);
    let report = worker.stop().await;
    assert_eq!(report.completed, 2);
}

/// A store seam that counts its calls and refuses the inputs of instance `unreachable`.
#[derive(Default)]
struct CountingStaging {
    before: std::sync::atomic::AtomicUsize,
    after: std::sync::atomic::AtomicUsize,
}

impl rba_executor::scheduler::Staging for CountingStaging {
    fn before_run<'a>(
        &'a self,
        request: &'a ExecuteRequest,
    ) -> futures::future::BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.before
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if request.instance == "unreachable" {
                return Err("the bucket refused to serve the input root".into());
            }
            Ok(())
        })
    }

    fn after_run<'a>(
        &'a self,
        _: &'a ExecuteRequest,
        outcome: &'a JobOutcome,
    ) -> futures::future::BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            assert_eq!(outcome.status, JobStatus::Success);
            self.after.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_seam_runs_once_before_and_once_after_each_job() {
    let pg = TestPostgres::start();
    let queue = queue(&pg, fast()).await;
    let harness = Harness::new(|_| {});
    let staging = Arc::new(CountingStaging::default());
    let (drain, signal) = watch::channel(false);
    let worker = Worker::new(queue.clone(), harness.executor.clone())
        .with_id("staged")
        .with_staging(staging.clone());
    let task = tokio::spawn(worker.run(signal));
    let good = queue
        .enqueue(&shell_job(&harness.cas, "echo staged").await, None)
        .await
        .unwrap();
    let mut unreachable = shell_job(&harness.cas, "echo never").await;
    unreachable.instance = "unreachable".into();
    let refused = queue.enqueue(&unreachable, None).await.unwrap();
    assert_eq!(queue.wait(good).await.unwrap().status, JobStatus::Success);
    let error = queue.wait(refused).await.unwrap().error.clone().unwrap();
    assert_eq!(
        error,
        format!(
            "job {refused}: its inputs could not be made available to worker staged: the \
             bucket refused to serve the input root"
        )
    );
    drain.send(true).unwrap();
    task.await.unwrap();
    use std::sync::atomic::Ordering::SeqCst;
    assert_eq!(
        (staging.before.load(SeqCst), staging.after.load(SeqCst)),
        (2, 1)
    );
}

/// A store seam whose publishing of the first job's outputs waits until `release` is
/// notified (the test's say, not a timer: a loaded machine must not change the outcome).
struct SlowFirstPublish {
    release: Arc<tokio::sync::Notify>,
    published: std::sync::atomic::AtomicBool,
}

impl rba_executor::scheduler::Staging for SlowFirstPublish {
    fn before_run<'a>(
        &'a self,
        _: &'a ExecuteRequest,
    ) -> futures::future::BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    fn after_run<'a>(
        &'a self,
        _: &'a ExecuteRequest,
        _: &'a JobOutcome,
    ) -> futures::future::BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            if !self
                .published
                .swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                self.release.notified().await;
            }
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_serves_the_next_job_while_the_last_outcome_is_being_recorded() {
    let pg = TestPostgres::start();
    let queue = queue(&pg, fast()).await;
    let harness = Harness::new(|config| config.workers = 1);
    let first = queue
        .enqueue(&shell_job(&harness.cas, "echo first").await, None)
        .await
        .unwrap();
    let second = queue
        .enqueue(&shell_job(&harness.cas, "echo second").await, None)
        .await
        .unwrap();
    let (drain, signal) = watch::channel(false);
    let release = Arc::new(tokio::sync::Notify::new());
    let worker = Worker::new(queue.clone(), harness.executor.clone())
        .with_id("one-slot")
        .with_slots(1)
        .with_staging(Arc::new(SlowFirstPublish {
            release: release.clone(),
            published: Default::default(),
        }));
    let task = tokio::spawn(worker.run(signal));
    let outcome = tokio::time::timeout(Duration::from_secs(120), queue.wait(second))
        .await
        .expect("the second job ends")
        .unwrap();
    assert_eq!(outcome.status, JobStatus::Success, "{:?}", outcome.error);
    // The one slot ran the second job while the first one's outputs were still being
    // published: its outcome is not recorded yet, and its lease is still held.
    let record = queue.job(first).await.unwrap();
    assert_eq!(
        (record.state.as_str(), record.worker.as_deref()),
        ("running", Some("one-slot"))
    );
    release.notify_one();
    let outcome = queue.wait(first).await.unwrap();
    assert_eq!(stdout_of(&harness.cas, &outcome).await, "first\n");
    drain.send(true).unwrap();
    let report = task.await.unwrap();
    assert_eq!((report.completed, report.lost), (2, 0));
}
