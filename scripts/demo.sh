#!/usr/bin/env bash
# The embedded end-to-end run (`make demo`): synthetic world -> shards -> inspect -> bench ->
# a tiny ALBEF pretrained by 2 CPU ranks under the deepspeed launcher -> zero-shot retrieval.
# Everything lands under runs/demo/ (DEMO_OUT); rerunning reuses finished shards and restarts training.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${DEMO_OUT:-runs/demo}
IMAGES=${DEMO_IMAGES:-1000}
STEPS=${DEMO_STEPS:-150}
mkdir -p "$OUT"
start=$(date +%s)

echo "== 1. synthesise the world ($IMAGES images)"
$PY -m data_shards synth --out "$OUT/world" --num-images "$IMAGES" --seed 0

echo "== 2. build shards: pretraining captions, X-VLM regions, the retrieval val split"
build() {  # annotation-file format name samples-per-shard
    $PY -m data_shards build --input "$OUT/world/annotations/$1.json" --format "$2" \
        --image-root "$OUT/world/images" --output "$OUT/shards/$3/$3-%06d.tar" \
        --samples-per-shard "$4" --workers 2 --seed 0
}
build pretrain_albef albef pretrain 100
build pretrain_xvlm_regions xvlm regions 100
build retrieval_val coco retrieval_val 1000
last() { printf %06d $(( $(ls "$OUT/shards/$1"/*.tar | wc -l) - 1 )); }
TRAIN="$OUT/shards/pretrain/pretrain-{000000..$(last pretrain)}.tar"
VAL="$OUT/shards/retrieval_val/retrieval_val-000000.tar"

echo "== 3. inspect $TRAIN"
$PY -m data_shards inspect "$TRAIN" --samples 2
$PY -m data_shards inspect "$OUT/shards/regions/regions-000000.tar" --samples 1 | tail -6

echo "== 4. bench: PIL and DALI (CPU) on the same shards"
$PY -m data_shards bench "$TRAIN" --decoder pil --batch-size 32 --device cpu --max-samples 512
$PY -m data_shards bench "$TRAIN" --decoder dali --batch-size 32 --device cpu --max-samples 512

echo "== 5. pretrain a tiny ALBEF on 2 CPU ranks (deepspeed launcher, ZeRO-0 fp32)"
rm -rf "$OUT/pretrain"
DS_ACCELERATOR=cpu .venv/bin/deepspeed --num_gpus 2 --module pretrain \
    --config pretrain/configs/demo.yaml --deepspeed_config ds_configs/zero0_fp32.json \
    --output-dir "$OUT/pretrain" --resume none ${STEPS:+--max-steps "$STEPS"} \
    --set "data.train=[{urls: '$TRAIN'}]" --set "eval.retrieval_urls=$VAL" 2>&1 \
    | grep -v -E "^\[20|[Ww]arning|cpp_extension|shm_comm_op|return func"

echo "== 6. summary"
$PY -m pretrain.report "$OUT/pretrain" --summary "$OUT/summary.json" --plot "$OUT/pretrain_losses.png"
echo "demo finished in $(( $(date +%s) - start ))s; summary: $OUT/summary.json, plot: $OUT/pretrain_losses.png"
