//! CAS benchmarks: hashing through our `Hasher` vs the raw hash crates, store put/get, a
//! FindMissing of 1,000 digests answered from the presence cache (one lock per shard, as the
//! store does it, beside one lookup per digest, `contains`, the way it did before), and
//! Merkle builds of generated trees, cold and with the stat cache warm.
//!
//! `cargo bench -p rba-cas` runs the criterion groups, then times the Merkle builds explicitly
//! (10k and 100k files) and prints `merkle …: cold X ms, warm Y ms, warm/cold = Z`.
//! `RBA_BENCH_SKIP_100K=1` skips the 100k-file tree (it takes a minute or two to generate).
//! Stores are opened with `fsync: false`: these figures are CPU and page-cache bound, not disk
//! flush bound.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput};
use rba_cas::{BlobStore, DigestFunction, DirOptions, StoreConfig, build_from_dir};
use sha2::Digest as _;

fn buffer(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect()
}

fn open_store(dir: &Path) -> BlobStore {
    BlobStore::open(dir, StoreConfig::without_fsync()).unwrap()
}

fn hashing(c: &mut Criterion) {
    let data = buffer(1 << 20);
    let mut group = c.benchmark_group("hash 1MiB");
    group
        .throughput(Throughput::Bytes(data.len() as u64))
        .sample_size(30);
    group.bench_function("sha256 via Hasher", |b| {
        b.iter(|| DigestFunction::Sha256.digest_of(black_box(&data)))
    });
    group.bench_function("sha256 raw (sha2)", |b| {
        b.iter(|| sha2::Sha256::digest(black_box(&data)))
    });
    group.bench_function("blake3 via Hasher", |b| {
        b.iter(|| DigestFunction::Blake3.digest_of(black_box(&data)))
    });
    group.bench_function("blake3 raw (blake3)", |b| {
        b.iter(|| blake3::hash(black_box(&data)))
    });
    group.finish();
}

fn store_put_get(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    for (label, len) in [("64KiB", 64 << 10), ("1MiB", 1 << 20)] {
        let mut group = c.benchmark_group(format!("store {label}"));
        group
            .throughput(Throughput::Bytes(len as u64))
            .sample_size(20);
        let mut counter = 0u64;
        let template = buffer(len);
        group.bench_function("put (new blob, blake3)", |b| {
            b.iter_batched(
                || {
                    counter += 1;
                    let mut data = template.clone();
                    data[..8].copy_from_slice(&counter.to_le_bytes());
                    data
                },
                |data| store.put_bytes(DigestFunction::Blake3, &data).unwrap(),
                BatchSize::LargeInput,
            )
        });
        let present = store.put_bytes(DigestFunction::Blake3, &template).unwrap();
        group.bench_function("put (already present)", |b| {
            b.iter(|| {
                store
                    .put_bytes(DigestFunction::Blake3, black_box(&template))
                    .unwrap()
            })
        });
        group.bench_function("get (read_to_vec)", |b| {
            b.iter(|| store.read_to_vec(&present, u64::MAX).unwrap())
        });
        group.finish();
    }
}

/// FindMissing of 1,000 digests (900 of 10,000 stored blobs, 100 never stored, all known to
/// the presence cache), from memory alone.
fn find_missing_cached(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let stored: Vec<_> = (0..10_000u64)
        .map(|i| {
            store
                .put_bytes(DigestFunction::Sha256, &i.to_le_bytes())
                .unwrap()
        })
        .collect();
    let asked: Vec<_> = (0..1_000u64)
        .map(|i| {
            if i % 10 == 9 {
                DigestFunction::Sha256.digest_of(format!("absent {i}").as_bytes())
            } else {
                stored[(i * 7_919 % 10_000) as usize]
            }
        })
        .collect();
    // Once from the index, so the cache knows every digest asked.
    assert_eq!(store.find_missing(&asked).unwrap().len(), 100);
    let mut group = c.benchmark_group("find_missing 1000 digests, cached");
    group.bench_function("one lock per shard (find_missing_cached)", |b| {
        b.iter(|| store.find_missing_cached(black_box(&asked), false).unwrap())
    });
    group.bench_function("one lock per digest (contains)", |b| {
        b.iter(|| {
            black_box(&asked)
                .iter()
                .filter(|d| !store.contains(d).unwrap())
                .count()
        })
    });
    group.finish();
}

/// Writes `files` files of 256 B – 4 KiB, 100 per directory, two directory levels, plus a
/// `.gitignore`; then waits out the stat cache's racy window.
fn generate_tree(root: &Path, files: usize) {
    let template = buffer(4096);
    for i in 0..files {
        let dir = root
            .join(format!("d{:03}", i / 10_000))
            .join(format!("s{:03}", (i / 100) % 100));
        if i % 100 == 0 {
            std::fs::create_dir_all(&dir).unwrap();
        }
        let len = 256 + (i * 37) % 3840;
        let mut content = template[..len].to_vec();
        content[..8].copy_from_slice(&(i as u64).to_le_bytes());
        std::fs::write(dir.join(format!("f{i}.rs")), content).unwrap();
    }
    std::fs::write(root.join(".gitignore"), "*.log\n").unwrap();
    std::thread::sleep(Duration::from_millis(2100));
}

fn merkle_criterion(c: &mut Criterion, tree: &Path) {
    let options = DirOptions::default();
    let mut group = c.benchmark_group("merkle 10k files");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(15))
        .warm_up_time(Duration::from_secs(1));
    group.bench_function("cold (fresh store and stat cache)", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().unwrap();
                let store = open_store(dir.path());
                (dir, store)
            },
            |(dir, store)| {
                build_from_dir(&store, tree, DigestFunction::Blake3, &options).unwrap();
                (dir, store)
            },
            BatchSize::PerIteration,
        )
    });
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    build_from_dir(&store, tree, DigestFunction::Blake3, &options).unwrap();
    group.bench_function("warm stat cache", |b| {
        b.iter(|| {
            let build = build_from_dir(&store, tree, DigestFunction::Blake3, &options).unwrap();
            assert_eq!(build.stats.files_hashed, 0);
            build
        })
    });
    group.finish();
}

/// Times one cold build (fresh store and stat cache) and the best of three warm ones.
fn cold_vs_warm(label: &str, tree: &Path) {
    let options = DirOptions::default();
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let start = Instant::now();
    let cold = build_from_dir(&store, tree, DigestFunction::Blake3, &options).unwrap();
    let cold_time = start.elapsed();
    let mut warm_time = Duration::MAX;
    let mut warm = None;
    for _ in 0..3 {
        let start = Instant::now();
        let build = build_from_dir(&store, tree, DigestFunction::Blake3, &options).unwrap();
        warm_time = warm_time.min(start.elapsed());
        warm = Some(build);
    }
    let warm = warm.unwrap();
    assert_eq!(warm.root, cold.root);
    assert_eq!(
        warm.stats.files_hashed, 0,
        "every file should come from the stat cache"
    );
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{label}: cold {:.0} ms, warm {:.0} ms, warm/cold = {:.3} ({} files, {} dirs, {:.1} MiB, {} new blobs)",
        ms(cold_time),
        ms(warm_time),
        warm_time.as_secs_f64() / cold_time.as_secs_f64(),
        cold.stats.files,
        cold.stats.directories,
        cold.stats.bytes as f64 / (1 << 20) as f64,
        cold.stats.new_blobs,
    );
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    hashing(&mut c);
    store_put_get(&mut c);
    find_missing_cached(&mut c);
    let ten_k = tempfile::tempdir().unwrap();
    let start = Instant::now();
    generate_tree(ten_k.path(), 10_000);
    println!(
        "generated 10k files in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    merkle_criterion(&mut c, ten_k.path());
    c.final_summary();

    cold_vs_warm("merkle 10k files", ten_k.path());
    drop(ten_k);
    if std::env::var_os("RBA_BENCH_SKIP_100K").is_none() {
        let hundred_k = tempfile::tempdir().unwrap();
        let start = Instant::now();
        generate_tree(hundred_k.path(), 100_000);
        println!(
            "generated 100k files in {:.1} s",
            start.elapsed().as_secs_f64()
        );
        cold_vs_warm("merkle 100k files", hundred_k.path());
    }
}
