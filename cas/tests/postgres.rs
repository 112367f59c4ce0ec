//! The PostgreSQL backends (`rba_cas::backends::postgres`) against a real PostgreSQL server
//! (a private cluster per test, `rba_e2e_tests::postgres`; install with
//! `.ci/setup.d/postgres.sh`): the same behaviour as the embedded index, action cache and
//! grants; migrations (concurrent, refused when newer); a database restart in the middle of
//! work; hostile inputs.

use std::time::Duration;

use rba_cas::backends::postgres::{COMPONENT, PRESENT_TTL, PROBE_CHUNK, Postgres, SCHEMA_VERSION};
use rba_cas::{
    ActionCache, BlobIndex, BlobStore, Cas, CasError, Digest, DigestFunction, EmbeddedActionCache,
    EmbeddedGrants, Grants,
};
use rba_e2e_tests::postgres::TestPostgres;
use rba_proto::reapi::{ActionResult, OutputFile};

async fn connect(server: &TestPostgres) -> Postgres {
    Postgres::connect(&server.url())
        .await
        .unwrap_or_else(|e| panic!("connecting: {e}\n{}", server.log()))
}

/// A plain client, for what the backends do not expose (the schema table, `last_used`).
async fn sql(server: &TestPostgres) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&server.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

fn blob(n: u32) -> Digest {
    DigestFunction::Blake3.digest_of(format!("blob {n}").as_bytes())
}

/// Asserts the error names postgres and the operation; returns its message.
fn assert_unavailable<T: std::fmt::Debug>(outcome: rba_cas::Result<T>, operation: &str) -> String {
    match outcome {
        Err(CasError::Unavailable(message)) => {
            assert!(
                message.starts_with("postgres: ") && message.contains(operation),
                "{message:?} names postgres and {operation:?}"
            );
            message
        }
        other => panic!("{operation}: expected Unavailable, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_index_answers_like_the_embedded_store() {
    let server = TestPostgres::start();
    let pg = connect(&server).await;
    let index = pg.blob_index();
    let (_dir, store) = BlobStore::scratch().unwrap();
    assert_eq!(index.backend(), "postgres");

    let f = DigestFunction::Sha256;
    let stored: Vec<Digest> = [&b"one"[..], b"two", b"three"]
        .iter()
        .map(|bytes| store.put_bytes(f, bytes).unwrap())
        .collect();
    index.insert(&stored).await.unwrap();
    index.insert(&stored[..1]).await.unwrap(); // again: nothing new
    index.insert(&[f.empty()]).await.unwrap(); // the empty blob is never a row

    let absent = f.digest_of(b"absent");
    let wrong_size = Digest {
        size: stored[0].size + 1,
        ..stored[0]
    };
    let other_function = DigestFunction::Blake3.digest_of(b"one");
    let asked = [
        absent,
        stored[0],
        f.empty(),
        DigestFunction::Blake3.empty(),
        wrong_size,
        absent,
        other_function,
        stored[2],
        other_function,
    ];
    let missing = index.find_missing(&asked).await.unwrap();
    assert_eq!(missing, vec![absent, wrong_size, other_function]);
    assert_eq!(
        missing,
        store.find_missing(&asked).unwrap(),
        "as the embedded store"
    );
    assert!(index.find_missing(&[]).await.unwrap().is_empty());

    let stats = index.stats();
    assert_eq!(stats.blob_count, 3);
    assert_eq!(stats.total_bytes, 3 + 3 + 5);

    index.remove(&[stored[1], absent, stored[1]]).await.unwrap();
    assert_eq!(index.find_missing(&stored).await.unwrap(), vec![stored[1]]);
    assert_eq!(index.stats().blob_count, 2);
    assert_eq!(index.stats().total_bytes, 3 + 5);
    index.remove(&[f.empty()]).await.unwrap();
    assert!(index.find_missing(&[f.empty()]).await.unwrap().is_empty());

    // A second handle (another process) sees the same rows and, once refreshed, the totals.
    let other = connect(&server).await;
    assert!(
        other
            .blob_index()
            .find_missing(&stored[..1])
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(other.blob_index().stats().blob_count, 2);
    other.blob_index().insert(&[absent]).await.unwrap();
    pg.refresh_stats().await.unwrap();
    assert_eq!(index.stats().blob_count, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_recently_used_and_touch_at_minute_precision() {
    let server = TestPostgres::start();
    let pg = connect(&server).await;
    let index = pg.blob_index();
    let client = sql(&server).await;
    let (a, b, c) = (blob(1), blob(2), blob(3));
    index.insert(&[a, b, c]).await.unwrap();
    // Ages: a used 3 h ago, b 2 h ago, c 1 h ago.
    for (digest, hours) in [(a, 3), (b, 2), (c, 1)] {
        client
            .execute(
                "UPDATE cas_blobs SET last_used = now() - $2::int * interval '1 hour' \
                 WHERE hash = $1",
                &[&&digest.hash[..], &hours],
            )
            .await
            .unwrap();
    }
    assert_eq!(index.least_recently_used(10).await.unwrap(), vec![a, b, c]);
    assert_eq!(index.least_recently_used(2).await.unwrap(), vec![a, b]);
    assert!(index.least_recently_used(0).await.unwrap().is_empty());

    index.touch(&[a, blob(99), a]).await.unwrap();
    assert_eq!(index.least_recently_used(10).await.unwrap(), vec![b, c, a]);

    // A row used within the last minute is not rewritten (no write storm).
    let last_used = |digest: Digest| {
        let client = &client;
        async move {
            let row = client
                .query_one(
                    "SELECT last_used::text FROM cas_blobs WHERE hash = $1",
                    &[&&digest.hash[..]],
                )
                .await
                .unwrap();
            row.get::<_, String>(0)
        }
    };
    let touched = last_used(a).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    index.touch(&[a]).await.unwrap();
    index.insert(&[a]).await.unwrap();
    assert_eq!(last_used(a).await, touched);
    // Re-inserting an old row marks it as just used.
    index.insert(&[b]).await.unwrap();
    assert_eq!(index.least_recently_used(1).await.unwrap(), vec![c]);
}

/// The action-cache behaviour every backend keeps.
async fn action_cache_conformance(cache: &dyn ActionCache) {
    let f = DigestFunction::Blake3;
    let result = |code| ActionResult {
        exit_code: code,
        ..Default::default()
    };
    let (a, b) = (f.digest_of(b"a"), f.digest_of(b"b"));
    assert!(cache.is_empty());
    assert_eq!(cache.get_unchecked("i", &a).await.unwrap(), None);
    cache.put("i", &a, &result(1)).await.unwrap();
    cache.put("i", &a, &result(2)).await.unwrap(); // replaced, not added
    cache.put("j", &a, &result(3)).await.unwrap();
    cache.put("i", &b, &result(4)).await.unwrap();
    cache.put("", &b, &result(5)).await.unwrap();
    cache.put("ij", &b, &result(6)).await.unwrap();
    assert_eq!(cache.len(), 5);
    assert_eq!(cache.get_unchecked("i", &a).await.unwrap(), Some(result(2)));
    assert_eq!(cache.get_unchecked("j", &a).await.unwrap(), Some(result(3)));
    assert_eq!(cache.get_unchecked("j", &b).await.unwrap(), None);
    let other_function = DigestFunction::Sha256.digest_of(b"a");
    assert_eq!(
        cache.get_unchecked("i", &other_function).await.unwrap(),
        None
    );

    let mut codes: Vec<i32> = cache
        .results_in("i")
        .await
        .unwrap()
        .iter()
        .map(|r| r.exit_code)
        .collect();
    codes.sort();
    assert_eq!(codes, [2, 4], "instance \"i\" only, not \"ij\" nor \"\"");
    assert_eq!(cache.results_in("").await.unwrap(), vec![result(5)]);
    assert!(cache.results_in("none").await.unwrap().is_empty());

    assert!(cache.remove("i", &a).await.unwrap());
    assert!(!cache.remove("i", &a).await.unwrap());
    assert_eq!(cache.len(), 4);

    let malformed = ActionResult {
        output_files: vec![OutputFile {
            path: "out".into(),
            digest: Some(rba_proto::reapi::Digest {
                hash: "nothex".into(),
                size_bytes: 1,
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let refused = cache.put("i", &f.digest_of(b"bad"), &malformed).await;
    assert!(
        matches!(refused, Err(CasError::Digest(_))),
        "a malformed digest is refused: {refused:?}"
    );
    assert_eq!(cache.len(), 4);
}

/// The grant rules every backend keeps (those of `rba_cas::access`).
async fn grants_conformance(grants: &dyn Grants) {
    let f = DigestFunction::Sha256;
    let (mine, theirs, absent) = (
        f.digest_of(b"mine"),
        f.digest_of(b"theirs"),
        f.digest_of(b"x"),
    );
    let empty = f.empty();
    assert!(grants.is_empty());
    grants
        .grant("peer:a", &[mine, absent, mine, empty])
        .await
        .unwrap();
    grants.grant("peer:b", &[theirs]).await.unwrap();
    grants.grant("peer:b", &[theirs]).await.unwrap(); // again: nothing new
    assert_eq!(grants.len(), 3);

    assert!(grants.may_read("peer:a", &mine).await.unwrap());
    assert!(!grants.may_read("peer:a", &theirs).await.unwrap());
    assert!(grants.may_read("peer:a", &empty).await.unwrap());
    assert!(grants.may_read("nobody", &empty).await.unwrap());
    // A tenant whose name is a prefix (or an extension) of another's gets nothing of it.
    assert!(!grants.may_read("peer:", &mine).await.unwrap());
    assert!(!grants.may_read("peer:ab", &mine).await.unwrap());

    let asked = [
        mine,
        theirs,
        absent,
        empty,
        mine,
        DigestFunction::Blake3.digest_of(b"mine"),
    ];
    assert_eq!(
        grants
            .not_readable_by_any(&["peer:b"], &asked)
            .await
            .unwrap(),
        vec![mine, absent, asked[5]]
    );
    assert_eq!(
        grants
            .not_readable_by_any(&["peer:a", "peer:b"], &asked)
            .await
            .unwrap(),
        vec![asked[5]]
    );
    assert_eq!(
        grants.not_readable_by_any(&[], &asked).await.unwrap(),
        vec![mine, theirs, absent, asked[5]]
    );
    assert!(
        grants
            .not_readable_by_any(&["peer:a"], &[])
            .await
            .unwrap()
            .is_empty()
    );

    for bad in [
        String::new(),
        "x".repeat(rba_cas::access::MAX_TENANT_BYTES + 1),
    ] {
        assert!(matches!(
            grants.grant(&bad, &[mine]).await,
            Err(CasError::Invalid { .. })
        ));
        assert!(matches!(
            grants.not_readable_by_any(&["peer:a", &bad], &[mine]).await,
            Err(CasError::Invalid { .. })
        ));
    }
    let longest = "t".repeat(rba_cas::access::MAX_TENANT_BYTES);
    grants.grant(&longest, &[theirs]).await.unwrap();
    assert!(grants.may_read(&longest, &theirs).await.unwrap());
    assert_eq!(grants.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn action_cache_and_grants_behave_like_the_embedded_ones() {
    let (_dir, cas) = Cas::scratch().unwrap();
    let embedded: EmbeddedActionCache = cas.actions.clone();
    action_cache_conformance(&embedded).await;
    let embedded_grants: EmbeddedGrants = cas.reads.clone();
    grants_conformance(&embedded_grants).await;

    let server = TestPostgres::start();
    let pg = connect(&server).await;
    assert_eq!(pg.action_cache().backend(), "postgres");
    action_cache_conformance(&pg.action_cache()).await;
    grants_conformance(&pg.grants()).await;

    // The counters survive a reconnect (they are rows, not process memory).
    drop(pg);
    let pg = connect(&server).await;
    assert_eq!(pg.action_cache().len(), 4);
    assert_eq!(pg.grants().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_starting_together_migrate_once() {
    let server = TestPostgres::start();
    let url = server.url();
    let connects: Vec<_> = (0..6)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { Postgres::connect(&url).await })
        })
        .collect();
    let mut handles = Vec::new();
    for connect in connects {
        handles.push(connect.await.unwrap().unwrap());
    }
    assert_eq!(
        handles[0].schema_version(COMPONENT).await.unwrap(),
        Some(SCHEMA_VERSION)
    );
    let client = sql(&server).await;
    let rows = client
        .query_one("SELECT count(*) FROM rba_schema", &[])
        .await
        .unwrap();
    assert_eq!(rows.get::<_, i64>(0), 1);
    // Migration 1 created each counter row once.
    let counters = client
        .query_one("SELECT count(*) FROM cas_counters", &[])
        .await
        .unwrap();
    assert_eq!(counters.get::<_, i64>(0), 3 * 16);
    // Each handle works on the one schema, over TCP or the unix socket alike.
    handles.push(
        Postgres::connect(&server.socket_url())
            .await
            .unwrap_or_else(|e| panic!("over {}: {e}", server.socket_url())),
    );
    handles[1].blob_index().insert(&[blob(1)]).await.unwrap();
    assert!(
        handles[6]
            .blob_index()
            .find_missing(&[blob(1)])
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        handles[5]
            .blob_index()
            .find_missing(&[blob(1)])
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_newer_than_the_build_is_refused() {
    let server = TestPostgres::start();
    drop(connect(&server).await);
    let newer = SCHEMA_VERSION + 1;
    sql(&server)
        .await
        .execute(
            "UPDATE rba_schema SET version = $1 WHERE component = 'cas'",
            &[&newer],
        )
        .await
        .unwrap();
    let refused = Postgres::connect(&server.url()).await;
    let Err(CasError::Unavailable(message)) = refused else {
        panic!("a newer schema is refused: {refused:?}");
    };
    assert!(
        message.contains(&format!("version {newer}"))
            && message.contains(&format!("version {SCHEMA_VERSION}")),
        "{message}"
    );
    // Another component's version is not ours to judge.
    sql(&server)
        .await
        .execute(
            "UPDATE rba_schema SET version = $1 WHERE component = 'cas'",
            &[&SCHEMA_VERSION],
        )
        .await
        .unwrap();
    sql(&server)
        .await
        .batch_execute("INSERT INTO rba_schema VALUES ('scheduler', 99)")
        .await
        .unwrap();
    connect(&server).await;
}

/// A database an earlier build migrated to version 1 (no hash index) is brought to this
/// build's version on connect, keeping its rows, and answers FindMissing through the index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_database_is_upgraded_in_place() {
    let server = TestPostgres::start();
    let indexed: Vec<Digest> = (0..500).map(blob).collect();
    connect(&server)
        .await
        .blob_index()
        .insert(&indexed)
        .await
        .unwrap();
    sql(&server)
        .await
        .batch_execute(
            "DROP INDEX cas_blobs_by_hash; \
             UPDATE rba_schema SET version = 1 WHERE component = 'cas'",
        )
        .await
        .unwrap();

    let upgraded = connect(&server).await;
    assert_eq!(
        upgraded.schema_version(COMPONENT).await.unwrap(),
        Some(SCHEMA_VERSION)
    );
    let method: String = sql(&server)
        .await
        .query_one(
            "SELECT am.amname::text FROM pg_class c JOIN pg_am am ON am.oid = c.relam \
             WHERE c.relname = 'cas_blobs_by_hash'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(method, "hash");
    let absent: Vec<Digest> = (1_000..1_100).map(blob).collect();
    let asked: Vec<Digest> = indexed.iter().chain(&absent).copied().collect();
    assert_eq!(
        upgraded
            .blob_index_uncached()
            .find_missing(&asked)
            .await
            .unwrap(),
        absent
    );
    assert_eq!(upgraded.blob_index().stats().blob_count, 500);
}

/// Grants a process remembers answer only for the exact tenant the database confirmed them for,
/// are learned whichever process wrote them, are never learned from a call for several tenants
/// or from a refusal, and spare the database: with it stopped, remembered grants still answer
/// and anything else is refused as unavailable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remembered_grants_are_per_tenant_and_come_from_the_database() {
    let mut server = TestPostgres::start();
    let (ours, other) = (connect(&server).await, connect(&server).await);
    let (grants, elsewhere) = (ours.grants(), other.grants());
    let f = DigestFunction::Sha256;
    let [written, theirs, shared, never] =
        [&b"written"[..], b"theirs", b"shared", b"never"].map(|bytes| f.digest_of(bytes));
    grants.grant("token:a", &[written]).await.unwrap();
    // Written by another front end on the same database.
    elsewhere.grant("token:b", &[theirs, shared]).await.unwrap();
    assert!(grants.may_read("token:b", &theirs).await.unwrap());
    // Readable by one of two tenants: says nothing about token:a alone.
    assert!(
        grants
            .not_readable_by_any(&["token:a", "token:b"], &[shared])
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        grants
            .not_readable_by_any(&["token:a"], &[shared, theirs, written])
            .await
            .unwrap(),
        vec![shared, theirs]
    );
    // A refusal is not remembered: granted elsewhere, readable at once.
    elsewhere.grant("token:a", &[shared]).await.unwrap();
    assert!(grants.may_read("token:a", &shared).await.unwrap());

    tokio::task::block_in_place(|| server.stop());
    assert!(
        grants
            .not_readable_by_any(&["token:a"], &[written, shared, f.empty()])
            .await
            .unwrap()
            .is_empty()
    );
    assert!(grants.may_read("token:b", &theirs).await.unwrap());
    // Never confirmed for this tenant here (or at all), a grant of another tenant's, a refusal
    // seen before: the database is asked, and it is gone.
    for (tenant, digest) in [
        ("token:a", theirs),
        ("token:b", written),
        ("token:a", never),
        ("token:ab", written),
        ("token:", written),
    ] {
        let asked = grants.not_readable_by_any(&[tenant], &[digest]).await;
        assert!(
            matches!(asked, Err(CasError::Unavailable(_))),
            "{tenant} {digest:?}: {asked:?}"
        );
    }
    // Remembered for token:a but asked together with one not remembered: the database is
    // asked about that one, and the call fails as a whole.
    assert!(matches!(
        grants
            .not_readable_by_any(&["token:a"], &[written, never])
            .await,
        Err(CasError::Unavailable(_))
    ));
    // The uncached handle asks the database about everything.
    assert!(matches!(
        ours.grants_uncached()
            .not_readable_by_any(&["token:a"], &[written])
            .await,
        Err(CasError::Unavailable(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_a_clear_error() {
    let mut server = TestPostgres::start();
    let url = server.url();
    tokio::task::block_in_place(|| server.stop());
    let refused = Postgres::connect(&url).await;
    let message = assert_unavailable(refused, "migrating the cas schema");
    assert!(message.contains("Connection refused"), "{message}");
    let garbage = Postgres::connect("postgres://[::1").await;
    assert_unavailable(garbage, "parsing the database URL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_mid_sequence_loses_nothing() {
    let mut server = TestPostgres::start();
    let pg = connect(&server).await;
    let (index, cache, grants) = (pg.blob_index(), pg.action_cache(), pg.grants());
    let before: Vec<Digest> = (0..100).map(blob).collect();
    let result = ActionResult {
        exit_code: 7,
        ..Default::default()
    };
    let action = blob(1000);
    index.insert(&before).await.unwrap();
    cache.put("main", &action, &result).await.unwrap();
    grants.grant("token:ci", &before[..10]).await.unwrap();
    // Warm several pooled connections, so stale ones are in the pool at the restart.
    let warm: Vec<_> = (0..8)
        .map(|i| {
            let index = index.clone();
            tokio::spawn(async move { index.find_missing(&[blob(i)]).await })
        })
        .collect();
    for call in warm {
        call.await.unwrap().unwrap();
    }

    tokio::task::block_in_place(|| server.stop());
    assert_unavailable(index.find_missing(&before).await, "find_missing");
    assert_unavailable(index.insert(&[blob(5000)]).await, "insert");
    assert_unavailable(
        cache.get_unchecked("main", &action).await,
        "get action result",
    );
    assert_unavailable(
        cache.put("main", &blob(1001), &result).await,
        "put action result",
    );
    // The database's answer, and a grant not known to this process, are unavailable; a grant
    // this process wrote is remembered and still answers.
    let uncached_grants = pg.grants_uncached();
    assert_unavailable(
        uncached_grants.may_read("token:ci", &before[0]).await,
        "check read grants",
    );
    assert_unavailable(
        grants.may_read("token:ci", &before[10]).await,
        "check read grants",
    );
    assert!(grants.may_read("token:ci", &before[0]).await.unwrap());
    // The counters keep their last values through the outage.
    assert_eq!(index.stats().blob_count, 100);
    assert_eq!(cache.len(), 1);

    tokio::task::block_in_place(|| server.start_again());
    // The very next calls succeed: stale connections are replaced.
    assert!(index.find_missing(&before).await.unwrap().is_empty());
    assert_eq!(
        cache.get_unchecked("main", &action).await.unwrap(),
        Some(result.clone())
    );
    assert!(
        uncached_grants
            .may_read("token:ci", &before[0])
            .await
            .unwrap()
    );
    assert!(!grants.may_read("token:ci", &before[10]).await.unwrap());
    let after: Vec<Digest> = (100..200).map(blob).collect();
    index.insert(&after).await.unwrap();
    cache.put("main", &blob(1001), &result).await.unwrap();
    assert_eq!(
        index.find_missing(&[blob(5000)]).await.unwrap(),
        vec![blob(5000)]
    );
    pg.refresh_stats().await.unwrap();
    assert_eq!(index.stats().blob_count, 200);
    assert_eq!(cache.len(), 2);
    assert_eq!(grants.len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_are_stored_exactly_or_refused() {
    let server = TestPostgres::start();
    let pg = connect(&server).await;
    let (index, cache, grants) = (pg.blob_index(), pg.action_cache(), pg.grants());

    // Instance names with quotes, NUL bytes, SQL and LIKE metacharacters, non-UTF-8-looking text.
    let instances = [
        "it's \"quoted\"",
        "nul\0inside\0",
        "'; DROP TABLE cas_action_results; --",
        "%_\\",
        "%",
        "\u{1F980}\u{0}\u{FFFF}",
        &"long".repeat(10_000),
    ];
    let action = blob(1);
    for (code, instance) in instances.iter().enumerate() {
        let result = ActionResult {
            exit_code: code as i32,
            ..Default::default()
        };
        cache.put(instance, &action, &result).await.unwrap();
    }
    for (code, instance) in instances.iter().enumerate() {
        let expected = ActionResult {
            exit_code: code as i32,
            ..Default::default()
        };
        assert_eq!(
            cache.get_unchecked(instance, &action).await.unwrap(),
            Some(expected.clone()),
            "{instance:?}"
        );
        assert_eq!(cache.results_in(instance).await.unwrap(), vec![expected]);
    }
    assert!(cache.results_in("nul").await.unwrap().is_empty());
    assert!(cache.results_in("nul\0inside").await.unwrap().is_empty());
    assert_eq!(cache.len(), instances.len() as u64);

    // Tenants: a huge name is refused before any query; odd bytes are exact.
    let huge = "x".repeat(1 << 20);
    assert!(matches!(
        grants.grant(&huge, &[action]).await,
        Err(CasError::Invalid { .. })
    ));
    assert!(matches!(
        grants.may_read(&huge, &action).await,
        Err(CasError::Invalid { .. })
    ));
    grants.grant("token:o'brien\0", &[action]).await.unwrap();
    assert!(grants.may_read("token:o'brien\0", &action).await.unwrap());
    assert!(!grants.may_read("token:o'brien", &action).await.unwrap());
    assert!(!grants.may_read("token:%", &action).await.unwrap());

    // 10,000 digests in one call, half of them present, with duplicates and the empty blob.
    let present: Vec<Digest> = (0..5_000).map(|n| blob(2 * n)).collect();
    index.insert(&present).await.unwrap();
    let mut asked: Vec<Digest> = (0..10_000).map(blob).collect();
    asked.push(blob(3));
    asked.push(DigestFunction::Blake3.empty());
    let missing = index.find_missing(&asked).await.unwrap();
    let expected: Vec<Digest> = (0..5_000).map(|n| blob(2 * n + 1)).collect();
    assert_eq!(missing, expected);
    grants.grant("token:big", &present).await.unwrap();
    assert_eq!(
        grants
            .not_readable_by_any(&["token:big"], &asked)
            .await
            .unwrap(),
        expected
    );
    // A digest whose size no blob can have is simply missing.
    let impossible = Digest {
        size: u64::MAX,
        ..blob(0)
    };
    assert_eq!(
        index.find_missing(&[impossible]).await.unwrap(),
        vec![impossible]
    );
    assert!(matches!(
        index.insert(&[impossible]).await,
        Err(CasError::Invalid { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_of_overlapping_batches_neither_deadlock_nor_miscount() {
    let server = TestPostgres::start();
    let (first, second) = (connect(&server).await, connect(&server).await);
    let mut calls = Vec::new();
    for worker in 0..8u32 {
        let pg = if worker % 2 == 0 {
            first.clone()
        } else {
            second.clone()
        };
        calls.push(tokio::spawn(async move {
            let index = pg.blob_index();
            let grants = pg.grants();
            for round in 0..10u32 {
                // Overlapping batches, in opposite orders in alternate workers.
                let mut batch: Vec<Digest> =
                    (0..200).map(|n| blob((n + round * 50) % 600)).collect();
                if worker % 2 == 1 {
                    batch.reverse();
                }
                index.insert(&batch).await.unwrap();
                index.touch(&batch).await.unwrap();
                grants.grant("token:t", &batch).await.unwrap();
                if round % 3 == 0 {
                    index.remove(&batch[..50]).await.unwrap();
                }
            }
        }));
    }
    for call in calls {
        call.await.unwrap();
    }
    let client = sql(&server).await;
    let row = client
        .query_one(
            "SELECT count(*), coalesce(sum(size), 0)::bigint FROM cas_blobs",
            &[],
        )
        .await
        .unwrap();
    let (count, bytes): (i64, i64) = (row.get(0), row.get(1));
    first.refresh_stats().await.unwrap();
    let stats = first.blob_index().stats();
    assert_eq!(
        (stats.blob_count, stats.total_bytes),
        (count as u64, bytes as u64)
    );
    let grants: i64 = client
        .query_one("SELECT count(*) FROM cas_read_grants", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(first.grants().len(), grants as u64);
}

/// On a current-thread runtime nothing notices the restart while it happens (the connections'
/// tasks cannot run): the pool still holds the dead connections, and the first calls must
/// replace them rather than fail.
#[tokio::test(flavor = "current_thread")]
async fn the_first_calls_after_a_quiet_restart_succeed() {
    let mut server = TestPostgres::start();
    let pg = connect(&server).await;
    let (index, cache) = (pg.blob_index(), pg.action_cache());
    index.insert(&[blob(1)]).await.unwrap();
    let warm = (0..4).map(|i| {
        let index = index.clone();
        async move { index.find_missing(&[blob(i)]).await.unwrap() }
    });
    futures::future::join_all(warm).await;
    for round in 0..3 {
        server.restart(); // blocks the runtime's only thread: no task runs meanwhile
        assert!(
            index.find_missing(&[blob(1)]).await.unwrap().is_empty(),
            "round {round}"
        );
        cache
            .put("main", &blob(round), &ActionResult::default())
            .await
            .unwrap();
        index.insert(&[blob(100 + round)]).await.unwrap();
    }
    assert_eq!(cache.results_in("main").await.unwrap().len(), 3);
}

/// The migration rules hold for any component (the scheduler will own its own): versions
/// recorded apart, a failed migration leaves nothing behind, a newer one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_migrate_apart_and_a_failed_migration_leaves_nothing() {
    let server = TestPostgres::start();
    let pg = connect(&server).await;
    let broken = [
        "CREATE TABLE other_a (x int)",
        "CREATE TABLE other_b (y nosuchtype)",
    ];
    let failed = pg.migrate("other", &broken).await;
    let message = assert_unavailable(failed, "applying other migration 2");
    assert!(message.contains("nosuchtype"), "{message}");
    assert_eq!(pg.schema_version("other").await.unwrap(), None);
    let client = sql(&server).await;
    let exists = |table: &'static str| {
        let client = &client;
        async move {
            client
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
                .await
                .unwrap()
                .get::<_, bool>(0)
        }
    };
    assert!(
        !exists("other_a").await,
        "migration 1 was rolled back with 2"
    );

    let first = ["CREATE TABLE other_a (x int)"];
    assert_eq!(pg.migrate("other", &first).await.unwrap(), 0);
    assert_eq!(
        pg.migrate("other", &first).await.unwrap(),
        1,
        "nothing to do"
    );
    let both = [
        "CREATE TABLE other_a (x int)",
        "CREATE TABLE other_b (y int)",
    ];
    assert_eq!(pg.migrate("other", &both).await.unwrap(), 1);
    assert!(exists("other_a").await && exists("other_b").await);
    assert_eq!(pg.schema_version("other").await.unwrap(), Some(2));
    assert_eq!(
        pg.schema_version(COMPONENT).await.unwrap(),
        Some(SCHEMA_VERSION)
    );
    let refused = pg.migrate("other", &first).await;
    let message = assert_unavailable(refused, "other schema is version 2");
    assert!(
        message.contains("version 1 that this build knows"),
        "{message}"
    );
}

/// What `find_missing` must answer: the distinct non-empty digests of `asked` that are not
/// exactly (function, hash and size) in `indexed`, in the order asked.
fn expected_missing(indexed: &[Digest], asked: &[Digest]) -> Vec<Digest> {
    let indexed: std::collections::HashSet<Digest> = indexed.iter().copied().collect();
    let mut seen = std::collections::HashSet::new();
    asked
        .iter()
        .filter(|d| !d.is_empty_blob() && !indexed.contains(d) && seen.insert(**d))
        .copied()
        .collect()
}

/// The fast path (sorted, chunked, probed on several connections at once, one array back,
/// the presence cache in front) answers exactly what the table holds: mixed present and
/// missing, duplicates, the other digest function's digest of the same hash bytes, a wrong
/// size, hostile hashes and sizes, at and around every chunk boundary, cached or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_missing_fast_path_answers_exactly_across_chunks() {
    let server = TestPostgres::start();
    let pg = connect(&server).await;
    let (cached, uncached) = (pg.blob_index(), pg.blob_index_uncached());
    let indexed: Vec<Digest> = (0..6_000).map(|n| blob(3 * n)).collect();
    cached.insert(&indexed).await.unwrap();
    let zeros = Digest {
        function: DigestFunction::Sha256,
        hash: [0; 32],
        size: 0,
    };
    let ones = Digest {
        function: DigestFunction::Blake3,
        hash: [0xff; 32],
        size: 1 << 40,
    };
    let alternating = Digest {
        function: DigestFunction::Sha256,
        hash: std::array::from_fn(|i| if i % 2 == 0 { 0 } else { 0xff }),
        size: 1,
    };
    // (The index keys on function and hash: one size per hash.)
    let hostile_present = [zeros, alternating, ones];
    cached.insert(&hostile_present).await.unwrap();
    let indexed: Vec<Digest> = indexed.into_iter().chain(hostile_present).collect();

    // Everything that must not match a row of blob(0): its hash under the other function,
    // other sizes, the largest sizes.
    let twin = |d: Digest, f: DigestFunction| Digest { function: f, ..d };
    let near_misses = [
        twin(blob(0), DigestFunction::Sha256),
        Digest {
            size: blob(0).size + 1,
            ..blob(0)
        },
        Digest { size: 0, ..blob(0) },
        Digest {
            size: u64::MAX,
            ..blob(0)
        },
        Digest {
            size: i64::MAX as u64 + 1,
            ..blob(0)
        },
        twin(ones, DigestFunction::Sha256),
        twin(zeros, DigestFunction::Blake3),
        Digest { size: 2, ..zeros },
        DigestFunction::Sha256.empty(),
        DigestFunction::Blake3.empty(),
    ];
    let mixed = |count: usize| -> Vec<Digest> {
        let mut asked: Vec<Digest> = (0..count as u32).map(|n| blob(n * 2)).collect();
        // Duplicates far apart (different chunks once sorted or not) and side by side.
        asked.extend_from_within(..count.min(300));
        asked.insert(count / 2, asked[0]);
        asked.extend(near_misses);
        asked.extend(hostile_present);
        asked.extend(hostile_present);
        asked
    };
    let mut sizes = vec![1, 2, PROBE_CHUNK - 20, 2 * PROBE_CHUNK - 330];
    for chunks in 2..=5 {
        sizes.extend([
            chunks * PROBE_CHUNK - 331,
            chunks * PROBE_CHUNK - 330,
            chunks * PROBE_CHUNK - 329,
        ]);
    }
    sizes.push(12_000);
    for count in sizes {
        let asked = mixed(count);
        let expected = expected_missing(&indexed, &asked);
        assert!(!expected.is_empty());
        assert_eq!(
            uncached.find_missing(&asked).await.unwrap(),
            expected,
            "{count} asked, uncached"
        );
        // Twice through the cache: the second answer comes mostly from it.
        for round in 0..2 {
            assert_eq!(
                cached.find_missing(&asked).await.unwrap(),
                expected,
                "{count} asked, cached, round {round}"
            );
        }
    }
    // Present digests only (nothing comes back), then missing only.
    assert!(cached.find_missing(&indexed).await.unwrap().is_empty());
    assert!(uncached.find_missing(&indexed).await.unwrap().is_empty());
    let absent: Vec<Digest> = (0..9_000).map(|n| blob(3 * n + 1)).collect();
    assert_eq!(cached.find_missing(&absent).await.unwrap(), absent);
}

/// The presence cache never outlives a removal made through the same handle, even one that
/// races a FindMissing in flight; another handle's (process's) removal is seen at once by
/// the uncached index and by the cached one within `PRESENT_TTL`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_presence_cache_forgets_removals() {
    let server = TestPostgres::start();
    let pg = connect(&server).await;
    let index = pg.blob_index();
    let batch: Vec<Digest> = (0..5_000).map(blob).collect();

    // Removed through this handle: missing at once, whichever index removed it.
    index.insert(&batch).await.unwrap();
    assert!(index.find_missing(&batch).await.unwrap().is_empty());
    pg.blob_index_uncached().remove(&batch[..10]).await.unwrap();
    index.remove(&batch[10..20]).await.unwrap();
    assert_eq!(index.find_missing(&batch).await.unwrap(), batch[..20]);

    // A removal racing FindMissing calls in flight: once it returned, nothing is cached.
    for round in 0..20 {
        index.insert(&batch).await.unwrap();
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (index, batch) = (index.clone(), batch.clone());
                tokio::spawn(async move { index.find_missing(&batch).await.unwrap() })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(round % 5)).await;
        index.remove(&batch).await.unwrap();
        for reader in readers {
            reader.await.unwrap();
        }
        assert_eq!(
            index.find_missing(&batch).await.unwrap(),
            batch,
            "round {round}"
        );
    }

    // Another process's removal: its own view and an uncached index see it at once; this
    // cached index within PRESENT_TTL.
    index.insert(&batch).await.unwrap();
    assert!(index.find_missing(&batch).await.unwrap().is_empty());
    let other = connect(&server).await;
    other.blob_index().remove(&batch[..100]).await.unwrap();
    assert_eq!(
        other.blob_index().find_missing(&batch).await.unwrap(),
        batch[..100]
    );
    assert_eq!(
        pg.blob_index_uncached().find_missing(&batch).await.unwrap(),
        batch[..100]
    );
    tokio::time::sleep(PRESENT_TTL).await;
    assert_eq!(index.find_missing(&batch).await.unwrap(), batch[..100]);
}
