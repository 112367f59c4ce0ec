//! Throughput of the scale-out scheduler (issue 12): many small command actions through the
//! PostgreSQL [`JobQueue`] with 1, 2 and 4 [`Worker`]s, each a real sandboxed run. Goal: N
//! workers finish ≥ 0.8·N times as many jobs per second as one.
//!
//! `cargo bench -p rba-executor --bench worker_scaling` starts a private PostgreSQL server
//! (`rba_e2e_tests::postgres`, run `.ci/setup.d/postgres.sh` first) and prints
//! `worker_scaling …` lines. Settings (environment):
//! - `RBA_BENCH_JOBS` (default 500): jobs per worker count;
//! - `RBA_BENCH_SLEEP_MS` (default 200): what each job sleeps in its sandbox;
//! - `RBA_BENCH_WORKERS` (default `1,2,4`): the worker counts;
//! - `RBA_BENCH_PICKUPS` (default 20): single jobs queued one at a time to idle workers.
//!
//! # How the 2-core machine is kept out of the figure
//!
//! Every job runs `sh -c 'sleep S; echo N'` in the real sandbox: the job's own time is a sleep,
//! which needs no CPU, so N workers can overlap N jobs however few cores there are. What is
//! left on the CPU per job is exactly what the figure is about: the queue's statements, the
//! worker loop, the executor's job path and the sandbox's start and stop. The bench prints how
//! busy the machine was during each run (`/proc/stat`, every process) and what this process
//! and its sandboxes used, so a run on a loaded machine says so; the per-job overhead of N=1
//! (wall time per job − the sleep) says how far from the CPU limit N=4 is (at 4 workers the
//! overhead must fit four times per sleep on two cores).
//!
//! # What is real and what is shared
//!
//! Each worker is its own [`Executor`] (its own data dir, one slot) with its own [`JobQueue`]
//! (its own pool and `LISTEN` connection), as separate `rba worker` processes would have; they
//! run in this one process on a 4-thread runtime. They share one scratch CAS (no fsync: the
//! figure is about scheduling, not the disk the machine shares with compilers), so the
//! staging is [`rba_executor::scheduler::SharedCas`]. Jobs are distinct (each its own
//! Command), submitted with `skip_cache_lookup`: none is a cache hit. Each worker count gets a
//! fresh database, and the workers are idle (registered, waiting for work) before the clock
//! starts; the clock stops when the front end's [`JobQueue::wait`] has every outcome.
//!
//! Besides jobs/s it prints, from the database's own timestamps: the time from enqueue to
//! claim (with a backlog of all jobs queued at once this is mostly waiting for a free worker),
//! a job's time from claim to recorded outcome minus its sleep (the executor's and the
//! sandbox's share), the gap between a worker recording one outcome and claiming its next job
//! (the scheduler's share; negative since the worker claims as soon as the run ends, while the
//! outcome is being recorded), the executor's own time per job by step, and, with the workers
//! idle, the pickup latency of a single queued job (the notification path).
//!
//! Then, as the reference of what this machine can do at that moment, the same number of jobs
//! straight to `N` executors of one slot without the queue: the queue's jobs/s over that run's
//! is the scheduler's share, and that run's own scaling is the machine's (sandbox start and stop
//! on two cores shared with whatever else runs). `RBA_BENCH_DIRECT=0` skips it.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rba_cas::{Cas, Digest, DigestFunction};
use rba_e2e_tests::machine::CpuTicks;
use rba_e2e_tests::postgres::TestPostgres;
use rba_executor::runner::{ExecuteRequest, Executor, ExecutorConfig, JobStatus};
use rba_executor::scheduler::{JobId, JobQueue, QueueConfig, Worker, WorkerReport};
use tokio::sync::watch;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn p50_p99_ms(mut seconds: Vec<f64>) -> String {
    seconds.sort_by(f64::total_cmp);
    format!(
        "p50 {:.1} ms, p99 {:.1} ms",
        percentile(&seconds, 0.50) * 1e3,
        percentile(&seconds, 0.99) * 1e3
    )
}

/// CPU time of this process and its waited-for children (the sandboxes), in clock ticks.
fn own_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    rest.split_whitespace()
        .skip(11) // state … cmajflt: fields 3 to 13
        .take(4) // utime, stime, cutime, cstime
        .filter_map(|f| f.parse::<u64>().ok())
        .sum()
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Stores `sh -c SCRIPT` over the empty input root `root` in `cas`; the request for it.
fn shell_job(cas: &Cas, root: Digest, script: String) -> ExecuteRequest {
    common::command_request(cas, root, common::shell(script), true)
}

/// The queue's own timestamps of a set of jobs (seconds since the epoch, database clock).
struct Timing {
    worker: String,
    attempts: i32,
    enqueued: f64,
    started: f64,
    finished: f64,
}

async fn timings(url: &str, ids: &[JobId]) -> Vec<Timing> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(connection);
    let ids: Vec<i64> = ids.iter().map(|id| id.0).collect();
    let rows = client
        .query(
            "SELECT worker, attempts, extract(epoch FROM enqueued_at)::float8,
                    extract(epoch FROM started_at)::float8, extract(epoch FROM finished_at)::float8
             FROM rba_jobs WHERE id = ANY($1) ORDER BY id",
            &[&ids],
        )
        .await
        .unwrap();
    drop(client);
    let _ = driver.await;
    rows.iter()
        .map(|row| Timing {
            worker: row.get::<_, Option<String>>(0).unwrap_or_default(),
            attempts: row.get(1),
            enqueued: row.get(2),
            started: row.get(3),
            finished: row.get(4),
        })
        .collect()
}

struct Run {
    jobs_per_sec: f64,
    wall: Duration,
    /// Jobs/s of the same jobs without the queue ([`direct`]), if measured.
    direct: Option<f64>,
}

struct Settings {
    jobs: u64,
    sleep: Duration,
    pickups: u64,
    direct: bool,
}

/// `n` executors of one slot each (own data dirs), set up as [`run`]'s workers are.
fn executors(cas: &Cas, n: usize) -> Vec<(Executor, tempfile::TempDir)> {
    (0..n)
        .map(|_| {
            let dir = tempfile::tempdir().unwrap();
            let mut config = ExecutorConfig::new(dir.path()).unwrap();
            config.sandbox.isolation = common::isolation();
            config.workers = 1;
            config.shared_units = false;
            (Executor::new(cas.clone(), config).unwrap(), dir)
        })
        .collect()
}

/// The reference without a scheduler: the same jobs (their own Commands) on `n` executors of
/// one slot, each taking the next job from an in-memory list as soon as its last one ended.
/// What `n` sandboxes of this machine, right now, can do at best.
async fn direct(cas: &Cas, root: Digest, n: usize, settings: &Settings) -> f64 {
    let sleep = settings.sleep.as_secs_f64();
    let requests: Vec<ExecuteRequest> = (0..settings.jobs)
        .map(|j| {
            shell_job(
                cas,
                root,
                format!("sleep {sleep:.3}; echo direct {n} job {j}"),
            )
        })
        .collect();
    let next = std::sync::Arc::new(parking_lot::Mutex::new(requests.into_iter()));
    let executors = executors(cas, n);
    let started = Instant::now();
    let runners: Vec<_> = executors
        .iter()
        .map(|(executor, _)| {
            let executor = executor.clone();
            let next = next.clone();
            tokio::spawn(async move {
                loop {
                    let Some(request) = next.lock().next() else {
                        return;
                    };
                    let handle = executor.submit(request).await.unwrap();
                    let outcome = handle.wait().await;
                    assert_eq!(outcome.status, JobStatus::Success, "{:?}", outcome.error);
                    executor.forget_job(&handle.id);
                }
            })
        })
        .collect();
    for runner in runners {
        runner.await.unwrap();
    }
    let wall = started.elapsed();
    let jobs_per_sec = settings.jobs as f64 / wall.as_secs_f64();
    println!(
        "worker_scaling N={n}: without the queue (the same jobs straight to {n} executors): \
         {jobs_per_sec:.2} jobs/s in {:.2} s",
        wall.as_secs_f64()
    );
    jobs_per_sec
}

/// One worker count: fresh database, `n` idle workers, the jobs queued at once, every outcome
/// waited for; then the single-job pickups.
async fn run(pg: &TestPostgres, cas: &Cas, root: Digest, n: usize, settings: &Settings) -> Run {
    let url = pg.create_database(&format!("scaling_{n}"));
    // The defaults of a deployment (polling only behind notifications, every second), except
    // the queue timeout: one worker's backlog of 500 jobs may take longer than 10 minutes on a
    // loaded machine, and a job failed for waiting would spoil the figure, not make it.
    let config = QueueConfig {
        queue_timeout_secs: 24 * 3600,
        ..QueueConfig::default()
    };
    let front = JobQueue::connect(&url, config.clone()).await.unwrap();
    let sleep = settings.sleep.as_secs_f64();
    let requests: Vec<ExecuteRequest> = (0..settings.jobs + settings.pickups)
        .map(|j| {
            shell_job(
                cas,
                root,
                format!("sleep {sleep:.3}; echo workers {n} job {j}"),
            )
        })
        .collect();
    let (requests, pickups) = requests.split_at(settings.jobs as usize);

    let mut dirs = Vec::new();
    let mut workers = Vec::new();
    let (drain, signal) = watch::channel(false);
    for (w, (executor, dir)) in executors(cas, n).into_iter().enumerate() {
        let queue = JobQueue::connect(&url, config.clone()).await.unwrap();
        let worker = Worker::new(queue, executor)
            .with_id(format!("worker-{w}"))
            .with_slots(1);
        workers.push(tokio::spawn(worker.run(signal.clone())));
        dirs.push(dir);
    }
    // Idle: every worker has looked for work once (and is now waiting for a notification).
    let registered = Instant::now();
    while front.workers(Duration::from_secs(600)).await.unwrap().len() < n {
        assert!(
            registered.elapsed() < Duration::from_secs(60),
            "workers did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let machine_before = CpuTicks::now();
    let own_before = own_ticks();
    let started = Instant::now();
    let mut ids = Vec::with_capacity(requests.len());
    for request in requests {
        ids.push(front.enqueue(request, None).await.unwrap());
    }
    let enqueued = started.elapsed();
    let mut failed = 0;
    let mut steps: BTreeMap<String, (usize, Duration)> = BTreeMap::new();
    let mut executor_time = Duration::ZERO;
    for id in &ids {
        let outcome = front.wait(*id).await.unwrap();
        executor_time += outcome.duration;
        for (position, (step, took)) in outcome.steps.iter().enumerate() {
            let entry = steps
                .entry(step.clone())
                .or_insert((position, Duration::ZERO));
            entry.1 += *took;
        }
        if outcome.status != JobStatus::Success {
            failed += 1;
            if failed <= 3 {
                eprintln!(
                    "worker_scaling: job {id} ended {:?}: {:?}",
                    outcome.status, outcome.error
                );
            }
        }
    }
    let wall = started.elapsed();
    let machine_after = CpuTicks::now();
    let own = own_ticks() - own_before;
    assert_eq!(failed, 0, "every job succeeds");

    let times = timings(&url, &ids).await;
    let queue_wait: Vec<f64> = times.iter().map(|t| t.started - t.enqueued).collect();
    let in_job: Vec<f64> = times
        .iter()
        .map(|t| t.finished - t.started - sleep)
        .collect();
    let mut per_worker: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for t in &times {
        per_worker
            .entry(t.worker.as_str())
            .or_default()
            .push((t.started, t.finished));
    }
    let mut gaps = Vec::new();
    for runs in per_worker.values_mut() {
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        gaps.extend(runs.windows(2).map(|pair| pair[1].0 - pair[0].1));
    }
    let retried = times.iter().filter(|t| t.attempts != 1).count();
    let balance: Vec<String> = per_worker
        .iter()
        .map(|(w, runs)| format!("{w} {}", runs.len()))
        .collect();

    let jobs = settings.jobs as f64;
    let jobs_per_sec = jobs / wall.as_secs_f64();
    // `/proc` counts in USER_HZ, which Linux fixes at 100 for user space.
    let ticks = 100.0;
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get()) as f64;
    let machine_busy = machine_before
        .zip(machine_after)
        .and_then(|(before, after)| after.busy_since(&before))
        .unwrap_or(0.0);
    println!(
        "worker_scaling N={n}: {} jobs of {:.0} ms sleep in {:.2} s: {jobs_per_sec:.2} jobs/s \
         ({:.0}% of the sleep-bound {:.2} jobs/s); enqueueing took {:.2} s",
        settings.jobs,
        sleep * 1e3,
        wall.as_secs_f64(),
        100.0 * jobs_per_sec * sleep / n as f64,
        n as f64 / sleep,
        enqueued.as_secs_f64(),
    );
    println!(
        "worker_scaling N={n}: enqueue→claim {}; claim→outcome recorded − sleep {}; \
         a worker's previous outcome recorded→its next claim {} (negative: the claim overlapped \
         the recording)",
        p50_p99_ms(queue_wait),
        p50_p99_ms(in_job),
        p50_p99_ms(gaps),
    );
    println!(
        "worker_scaling N={n}: jobs per worker: {}; claimed more than once: {retried}; CPU: this \
         process and its sandboxes {:.1} ms per job, the machine {:.0}% busy of {cores:.0} cores \
         (load average {})",
        balance.join(", "),
        own as f64 / ticks / jobs * 1e3,
        machine_busy * 100.0,
        load_average(),
    );

    let mut steps: Vec<_> = steps.into_iter().collect();
    steps.sort_by_key(|(_, (position, _))| *position);
    let per_job_ms = |total: Duration| total.as_secs_f64() * 1e3 / jobs;
    println!(
        "worker_scaling N={n}: the executor's own time per job (mean) {:.1} ms: {}",
        per_job_ms(executor_time),
        steps
            .iter()
            .map(|(step, (_, took))| format!("{step} {:.1} ms", per_job_ms(*took)))
            .collect::<Vec<_>>()
            .join(", "),
    );

    // Pickup latency of a single job queued to idle workers: the notification path.
    let mut pickup_ids = Vec::new();
    for request in pickups {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let id = front.enqueue(request, None).await.unwrap();
        let outcome = front.wait(id).await.unwrap();
        assert_eq!(outcome.status, JobStatus::Success, "{:?}", outcome.error);
        pickup_ids.push(id);
    }
    if !pickup_ids.is_empty() {
        let times = timings(&url, &pickup_ids).await;
        let latency: Vec<f64> = times.iter().map(|t| t.started - t.enqueued).collect();
        println!(
            "worker_scaling N={n}: a single job queued to idle workers, enqueue→claim over {} \
             jobs: {}",
            pickup_ids.len(),
            p50_p99_ms(latency),
        );
    }

    drain.send(true).unwrap();
    let mut report = WorkerReport::default();
    for worker in workers {
        let done = worker.await.unwrap();
        report.completed += done.completed;
        report.released += done.released;
        report.lost += done.lost;
    }
    assert_eq!(
        report,
        WorkerReport {
            completed: settings.jobs + settings.pickups,
            released: 0,
            lost: 0,
        },
        "every job recorded once"
    );
    Run {
        jobs_per_sec,
        wall,
        direct: None,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for the list; nothing to list.
    }
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run briefly then.
    let benching = std::env::args().any(|a| a == "--bench");
    let settings = Settings {
        jobs: setting("RBA_BENCH_JOBS", if benching { 500 } else { 8 }).max(1),
        sleep: Duration::from_millis(setting(
            "RBA_BENCH_SLEEP_MS",
            if benching { 200 } else { 50 },
        )),
        pickups: setting("RBA_BENCH_PICKUPS", if benching { 20 } else { 2 }),
        direct: setting("RBA_BENCH_DIRECT", 1) != 0,
    };
    let counts: Vec<usize> = std::env::var("RBA_BENCH_WORKERS")
        .unwrap_or_else(|_| "1,2,4".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .filter(|&n| n > 0)
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let pg = TestPostgres::start();
    let (_cas_dir, cas) = Cas::scratch().unwrap();
    println!(
        "worker_scaling: {} jobs per worker count, {} ms sleep each, workers {counts:?}; load \
         average {} at the start",
        settings.jobs,
        settings.sleep.as_millis(),
        load_average()
    );
    runtime.block_on(async {
        let empty = tempfile::tempdir().unwrap();
        let root = common::hash_dir(&cas, empty.path(), DigestFunction::Sha256).await;
        let mut runs: Vec<(usize, Run)> = Vec::new();
        for &n in &counts {
            let mut run = run(&pg, &cas, root, n, &settings).await;
            if settings.direct {
                run.direct = Some(direct(&cas, root, n, &settings).await);
            }
            if n == 1 {
                let per_job = run.wall.as_secs_f64() / settings.jobs as f64;
                println!(
                    "worker_scaling N=1: per-job overhead (wall per job − sleep) {:.1} ms",
                    (per_job - settings.sleep.as_secs_f64()) * 1e3
                );
            }
            runs.push((n, run));
        }
        if let Some((_, one)) = runs.iter().find(|(n, _)| *n == 1) {
            for (n, run) in &runs {
                let ratio = run.jobs_per_sec / one.jobs_per_sec;
                let efficiency = ratio / *n as f64;
                let against_direct = match (run.direct, one.direct) {
                    (Some(direct), Some(direct_one)) => format!(
                        "; without the queue ×{:.2} of N=1 ({:.0}% of ideal), the queue's \
                         jobs/s {:.0}% of the direct run's",
                        direct / direct_one,
                        direct / direct_one / *n as f64 * 100.0,
                        run.jobs_per_sec / direct * 100.0
                    ),
                    _ => String::new(),
                };
                println!(
                    "worker_scaling N={n}: {:.2} jobs/s, ×{ratio:.2} of N=1, {:.0}% of the ideal \
                     ×{n} (goal ≥ 80%: {}){against_direct}",
                    run.jobs_per_sec,
                    efficiency * 100.0,
                    if efficiency >= 0.8 { "met" } else { "NOT met" },
                );
            }
        }
    });
}
