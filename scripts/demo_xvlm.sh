#!/usr/bin/env bash
# The X-VLM demo (`make demo METHOD=xvlm`): synthetic world -> caption and region shards -> a tiny X-VLM pretrained
# by 2 CPU ranks (image-text batches, and a region batch at half of the steps) -> zero-shot retrieval and the
# pretrained box head's zero-shot grounding -> box grounding and retrieval fine-tuned from that checkpoint -> the
# table of metrics beside chance. Everything lands under runs/demo-xvlm/ (DEMO_OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${DEMO_OUT:-runs/demo-xvlm}
IMAGES=${DEMO_IMAGES:-1000}
STEPS=${DEMO_STEPS:-}
mkdir -p "$OUT"
start=$(date +%s)
# A free port per launch: runs sharing a machine on deepspeed's default port would also share (and remove) each
# other's CPU all-reduce buffers in /dev/shm, which are named after it.
port() { $PY -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

echo "== 1. synthesise the world ($IMAGES images)"
$PY -m data_shards synth --out "$OUT/world" --num-images "$IMAGES" --seed 0

echo "== 2. build shards: captions, X-VLM regions, retrieval and grounding splits"
build() {  # annotation-file format name samples-per-shard [extra build arguments]
    local input=$1 format=$2 name=$3 per_shard=$4; shift 4
    $PY -m data_shards build --input "$OUT/world/annotations/$input.json" --format "$format" \
        --image-root "$OUT/world/images" --output "$OUT/shards/$name/$name-%06d.tar" \
        --samples-per-shard "$per_shard" --workers 2 --seed 0 "$@" | tail -1
}
build pretrain_albef albef pretrain 100
build pretrain_xvlm_regions xvlm regions 100
for split in retrieval_train retrieval_val retrieval_test; do build "$split" coco "$split" 500; done
for split in refcoco_train refcoco_val refcoco_test; do
    build "$split" refcoco "$split" 500 --detections "$OUT/world/annotations/refcoco_dets.json"
done
urls() { echo "$OUT/shards/$1/$1-{000000..$(printf %06d $(( $(ls "$OUT/shards/$1"/*.tar | wc -l) - 1 )))}.tar"; }
VAL="$OUT/shards/retrieval_val/retrieval_val-000000.tar"
$PY -m data_shards inspect "$OUT/shards/regions/regions-000000.tar" --samples 1 | tail -4

echo "== 3. pretrain a tiny X-VLM on 2 CPU ranks (deepspeed launcher, ZeRO-0 fp32)"
rm -rf "$OUT/pretrain"
DS_ACCELERATOR=cpu .venv/bin/deepspeed --num_gpus 2 --master_port "$(port)" --module pretrain \
    --config pretrain/configs/xvlm_demo.yaml --deepspeed_config ds_configs/zero0_fp32.json \
    --output-dir "$OUT/pretrain" --resume none ${STEPS:+--max-steps "$STEPS"} \
    --set "data.train=[{urls: '$(urls pretrain)'}]" --set "data.streams.regions.train=[{urls: '$(urls regions)'}]" \
    --set "eval.retrieval_urls=$VAL" 2>&1 | grep -v -E "^\[20|[Ww]arning|cpp_extension|shm_comm_op|return func"

finetune() {  # entry-point config run-folder split-prefix [extra arguments]
    local task=$1 config=$2 folder=$3 prefix=$4; shift 4
    echo "-- $folder"
    DS_ACCELERATOR=cpu .venv/bin/deepspeed --num_gpus 2 --master_port "$(port)" --module "finetune.$task" \
        --config "finetune/configs/$config" --checkpoint "$OUT/pretrain/checkpoints" \
        --output-dir "$OUT/$folder" --set "data.train=$(urls "${prefix}_train")" \
        --set "data.val=$(urls "${prefix}_val")" --set "data.test=$(urls "${prefix}_test")" "$@" 2>&1 \
        | grep -E "^\[finetune|^done|[Ee]rror" | grep -v -E "[Ww]arning" || true
}

echo "== 4. the pretrained box head's zero-shot grounding (evaluation only)"
rm -rf "$OUT/zero_shot_grounding"
finetune grounding grounding_box_xvlm_synth.yaml zero_shot_grounding refcoco --evaluate

echo "== 5. pretraining summary"
$PY -m pretrain.report "$OUT/pretrain" --summary "$OUT/summary.json" --plot "$OUT/pretrain_losses.png" \
    --zero-shot-grounding "$OUT/zero_shot_grounding/results.json"

echo "== 6. fine-tune box grounding and retrieval from the pretraining checkpoint (2 CPU ranks each)"
rm -rf "$OUT/finetune"
finetune grounding grounding_box_xvlm_synth.yaml finetune/grounding_box refcoco
finetune retrieval retrieval_xvlm_synth.yaml finetune/retrieval retrieval --set "data.val=$VAL"

echo "== 7. fine-tuning summary"
$PY -m finetune.report "$OUT/finetune" --summary "$OUT/summary.json"
echo "demo finished in $(( $(date +%s) - start ))s; summary: $OUT/summary.json, plot: $OUT/pretrain_losses.png"
