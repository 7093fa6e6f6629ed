#!/usr/bin/env bash
# Data-loading benchmark on this machine: builds the synthetic shards once, runs
# `python -m data_shards bench` for PIL and DALI (CPU; DALI on the GPU too when CUDA is available) and
# prints a markdown table in the layout of benchmarks/README.md.
#
#   bash benchmarks/data_bench.sh [WORK_DIR]          # default /tmp/w; REPEAT=3 BATCH=64 THREADS="1 2"
#
# Every stage runs REPEAT times and the fastest run counts (other processes on a shared machine only
# ever slow a run down); the CPU pressure before and after is printed so a busy machine is visible.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=.venv/bin/python
WORK=${1:-/tmp/w}
REPEAT=${REPEAT:-3}
BATCH=${BATCH:-64}
THREADS=${THREADS:-"1 2"}
SHARDS="$WORK/shards/train-{000000..000003}.tar"

if [ ! -f "$WORK/shards/train-000003.idx" ]; then
    $PYTHON -m data_shards synth --out "$WORK" --num-images 2000 --seed 0 >&2
    $PYTHON -m data_shards build --input "$WORK/annotations/pretrain_albef.json" --format albef \
        --image-root "$WORK/images" --output "$WORK/shards/train-%06d.tar" --samples-per-shard 500 --workers 2 >&2
fi

RESULTS=$(mktemp)
trap 'rm -f "$RESULTS"' EXIT
pressure() { [ -r /proc/pressure/cpu ] && echo "cpu pressure ($1): $(head -1 /proc/pressure/cpu)" >&2 || true; }
run() {  # decoder device threads
    $PYTHON -m data_shards bench "$SHARDS" --decoder "$1" --device "$2" --threads "$3" --batch-size "$BATCH" \
        --repeat "$REPEAT" --json 2> >(grep -v -i warning >&2) >> "$RESULTS"
}

pressure before
for threads in $THREADS; do
    run pil cpu "$threads"
    run dali cpu "$threads"
done
if $PYTHON -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    for threads in $THREADS 4; do run dali gpu "$threads"; done
fi
pressure after

$PYTHON - "$RESULTS" <<'EOF'
import json, os, sys

rows = [json.loads(line) for line in open(sys.argv[1])]
machine = f"{rows[0]['cpu']}, {os.cpu_count()} cores"
print(f"{rows[0]['images']} images of {rows[0]['image_size']} px, batch {rows[0]['batch_size']}, "
      f"best of {rows[0]['repeat']}; images/s")
print()
print("| machine | decoder | device | threads | raw tar read | read | read / raw | read + decode "
      "| read + decode + augment |")
print("|---|---|---|---|---:|---:|---:|---:|---:|")
for row in rows:
    print(f"| {machine} | {row['decoder']} | {row['device']} | {row['threads']} | {row['raw_tar_read']:.0f} "
          f"| {row['read']:.0f} | {row['ratios']['read_vs_raw']:.2f} | {row['decode']:.0f} | {row['augment']:.0f} |")
pil = {row["threads"]: row for row in rows if row["decoder"] == "pil"}
print()
for row in rows:
    if row["decoder"] == "dali" and row["threads"] in pil:
        base = pil[row["threads"]]
        print(f"DALI {row['device']} / PIL at {row['threads']} thread(s): decode {row['decode'] / base['decode']:.2f}x, "
              f"decode + augment {row['augment'] / base['augment']:.2f}x")
EOF
