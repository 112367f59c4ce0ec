#!/usr/bin/env bash
# reapi-bench against BuildGrid and against our cache-server, in the same run, with ratios.
#
# Why a script: the comparison is only fair on one machine in one run (same load, same disk),
# and BuildGrid must be installed and configured the same way every time.
#
# - BuildGrid (PyPI, version $BUILDGRID_VERSION, default 0.4.4 as in issue 13's table) is
#   installed once in a venv under ~/.cache/rba-bench/, and started on loopback, cache only
#   (CAS + ByteStream + ActionCache), with its in-memory LRU CAS, no auth.
# - Our cache-server runs as its own process (release build) on loopback with a store on disk
#   under a temp dir, durable (fsync), exactly as deployed.
# - The same reapi-bench (release build) runs against each; the ratios are ours / BuildGrid's
#   (throughput, blobs/s) and BuildGrid's / ours (latencies): above 1 means we are better.
# - The verified single-stream read is also measured paired (`--versus`, PAIRED_READS rounds,
#   default 5): during our half, the same blob is read from our server and from BuildGrid in
#   turn, who goes first alternating, and the medians are reported. Each half's own read
#   figure is taken once, in its own minute; a host that steals CPU for a while (this
#   project's VMs lose up to ~18 % of it at times) then lands on one side only.
#
# - The store's data dir is a fresh directory under $BENCH_DIR (default: $TMPDIR or /tmp). On
#   an ext4 without a journal (this project's VMs), creating a file in a block group where
#   thousands of files were just deleted costs ~1 ms of kernel CPU (ext4's `recently_deleted`
#   inode scan; seen with `perf`), against ~30 us elsewhere, and BatchUpdate, one file per
#   blob, then measures the allocator, not the store. After a big `rm -rf` (a test run, an
#   earlier bench), point BENCH_DIR at a new top-level directory (`mkdir /bench-N`: ext4
#   spreads top-level directories over fresh groups).
#
# Usage: cache-server/bench/buildgrid.sh  (from the repository root; builds what it needs)
# Env: BUILDGRID_VERSION, PAIRED_READS, BENCH_ARGS (extra reapi-bench arguments; they override the script's own,
# e.g. BENCH_ARGS="--read-streams 0 --big-blob-gib 0"), BENCH_DIR, CARGO_TARGET_DIR.
set -euo pipefail

version="${BUILDGRID_VERSION:-0.4.4}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
venv="$HOME/.cache/rba-bench/buildgrid-$version"
work="$(mktemp -d -p "${BENCH_DIR:-${TMPDIR:-/tmp}}" rba-bench.XXXXXX)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

if [ ! -x "$venv/bin/bgd" ]; then
    echo "# installing buildgrid==$version in $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "buildgrid==$version"
fi

(cd "$root" && cargo build --release -p rba-agent -p rba-cache-server --bin cache-server --bin reapi-bench >&2)
bench="$target/release/reapi-bench"
server="$target/release/cache-server"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 1 300); do
        if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),1)" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "nothing listens on port $1" >&2
    return 1
}

bg_port="$(free_port)"
# thread-pool-size: BuildGrid refuses RPCs beyond its worker count (default 5 per core), and
# the FindMissing figures use 50 concurrent callers.
cat > "$work/buildgrid.yml" <<YAML
thread-pool-size: 64
server:
  - !channel
    address: "127.0.0.1:$bg_port"
    insecure-mode: true
authorization:
  method: none
storages:
  - !lru-storage &cas
    size: 6GB
caches:
  - !lru-action-cache &ac
    storage: *cas
    max-cached-refs: 100000
    allow-updates: true
instances:
  - name: ''
    services:
      - !action-cache
        cache: *ac
      - !cas
        storage: *cas
      - !bytestream
        storage: *cas
YAML
"$venv/bin/bgd" server start "$work/buildgrid.yml" > "$work/buildgrid.log" 2>&1 &
pids+=($!)
bg_pid=$!
wait_port "$bg_port" || { cat "$work/buildgrid.log" >&2; exit 1; }

our_port="$(free_port)"
"$server" --listen "127.0.0.1:$our_port" --data-dir "$work/ours" --metrics-listen off \
    > "$work/cache-server.log" 2>&1 &
pids+=($!)
our_pid=$!
wait_port "$our_port" || { cat "$work/cache-server.log" >&2; exit 1; }

# The machine's CPU ticks so far: all, and those the hypervisor gave to other guests (steal).
cpu_ticks() { awk '/^cpu /{ print $2+$3+$4+$5+$6+$7+$8+$9, $9 }' /proc/stat; }
# Runs reapi-bench and then says how much CPU time the host stole meanwhile: on a shared VM the
# two runs may not get the same machine, and a ratio is only fair when they did.
bench_run() {
    local before after
    before="$(cpu_ticks)"
    "$bench" "$@"
    after="$(cpu_ticks)"
    awk -v b="$before" -v a="$after" 'BEGIN { split(b, x, " "); split(a, y, " ");
        if (y[1] > x[1]) printf "# CPU time stolen by the host during this run: %.1f %%\n",
            100 * (y[2] - x[2]) / (y[1] - x[1]) }' >&2
}

# The issue's figures: 1 GiB streams, 10,000 × 4 KiB batch, 50 callers × 20 calls.
common=(--throughput-gib 1 --find-tasks 50 --find-calls 20 --work-dir "$work" ${BENCH_ARGS:-})
echo "# BuildGrid $version (in-memory CAS) on 127.0.0.1:$bg_port" >&2
bench_run --endpoint "grpc://127.0.0.1:$bg_port" --server-pid "$bg_pid" --big-blob-gib 0 "${common[@]}" | tee "$work/theirs.txt"
echo "# rba cache-server (disk store, fsync) on 127.0.0.1:$our_port" >&2
bench_run --endpoint "grpc://127.0.0.1:$our_port" --server-pid "$our_pid" --big-blob-gib 4 \
    --versus "grpc://127.0.0.1:$bg_port" --paired-reads "${PAIRED_READS:-5}" "${common[@]}" | tee "$work/ours.txt"

python3 - "$work/ours.txt" "$work/theirs.txt" "$version" <<'PY'
import re, sys
def figures(path):
    out = {}
    for line in open(path):
        name, _, rest = line.partition(": ")
        m = re.match(r"([\d.]+) (MiB/s|blobs/s|s/GiB)", rest)
        if m:
            out[name] = (float(m.group(1)), m.group(2))
        m = re.match(r"mean ([\d.]+) ms, p99 ([\d.]+) ms", rest)
        if m:
            out[name + " mean"] = (float(m.group(1)), "ms")
            out[name + " p99"] = (float(m.group(2)), "ms")
    return out
ours, theirs = figures(sys.argv[1]), figures(sys.argv[2])
print(f"\n| figure | rba | BuildGrid {sys.argv[3]} | ratio (>1: rba better) |")
print("|---|---|---|---|")
paired = None
for line in open(sys.argv[1]):
    m = re.match(r"(\S+_paired): ([\d.]+) MiB/s vs ([\d.]+) MiB/s at \S+, median ratio ([\d.]+)x \((\d+) rounds", line)
    if m:
        paired = m
for name, (value, unit) in ours.items():
    if name not in theirs or name.startswith("raw_"):
        continue
    other = theirs[name][0]
    ratio = other / value if unit in ("ms", "s/GiB") else value / other
    places = 3 if unit == "s/GiB" else 1
    print(f"| {name} | {value:,.{places}f} {unit} | {other:,.{places}f} {unit} | {ratio:.2f}x |")
if paired:
    name, value, other, ratio, rounds = paired.groups()
    print(f"| {name} (each side's median of {rounds} alternating rounds; ratio: the median round's) | {float(value):,.1f} MiB/s | {float(other):,.1f} MiB/s | {float(ratio):.2f}x |")
PY
