#!/usr/bin/env bash
# The embedded end-to-end run (`make demo`): synthetic world -> shards -> inspect -> bench ->
# a tiny ALBEF pretrained by 2 CPU ranks under the deepspeed launcher -> zero-shot retrieval ->
# every fine-tuning task from that checkpoint -> a table of metrics beside chance.
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
build() {  # annotation-file format name samples-per-shard [extra build arguments]
    local input=$1 format=$2 name=$3 per_shard=$4; shift 4
    $PY -m data_shards build --input "$OUT/world/annotations/$input.json" --format "$format" \
        --image-root "$OUT/world/images" --output "$OUT/shards/$name/$name-%06d.tar" \
        --samples-per-shard "$per_shard" --workers 2 --seed 0 "$@"
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

echo "== 6. pretraining summary"
$PY -m pretrain.report "$OUT/pretrain" --summary "$OUT/summary.json" --plot "$OUT/pretrain_losses.png"

echo "== 7. build the fine-tuning splits"
for split in retrieval_train:coco retrieval_test:coco vqa_train:vqa vqa_val:vqa vqa_test:vqa \
             nlvr2_train:nlvr2 nlvr2_val:nlvr2 nlvr2_test:nlvr2 ve_train:ve ve_val:ve ve_test:ve \
             refcoco_train:refcoco refcoco_val:refcoco refcoco_test:refcoco \
             caption_train:caption caption_val:caption caption_test:caption; do
    name=${split%%:*}; format=${split##*:}
    extra=(); [ "$format" = refcoco ] && extra=(--detections "$OUT/world/annotations/refcoco_dets.json")
    build "$name" "$format" "$name" 500 "${extra[@]}" | tail -1
done
urls() { echo "$OUT/shards/$1/$1-{000000..$(last "$1")}.tar"; }

echo "== 8. fine-tune every task from the pretraining checkpoint (2 CPU ranks each)"
rm -rf "$OUT/finetune"
finetune() {  # entry-point config run-name split-prefix [extra arguments]
    local task=$1 config=$2 name=$3 prefix=$4; shift 4
    echo "-- $name"
    DS_ACCELERATOR=cpu .venv/bin/deepspeed --num_gpus 2 --module "finetune.$task" \
        --config "finetune/configs/$config" --checkpoint "$OUT/pretrain/checkpoints" \
        --output-dir "$OUT/finetune/$name" --set "data.train=$(urls "${prefix}_train")" \
        --set "data.val=$(urls "${prefix}_val")" --set "data.test=$(urls "${prefix}_test")" "$@" 2>&1 \
        | grep -E "^\[finetune|^done|[Ee]rror" | grep -v -E "[Ww]arning" || true
}
finetune retrieval retrieval_synth.yaml retrieval retrieval --set "data.val=$VAL"
finetune vqa vqa_synth.yaml vqa vqa --set "options.answer_list=$OUT/world/annotations/vqa_answer_list.json"
finetune nlvr2 nlvr2_synth.yaml nlvr2 nlvr2
finetune ve ve_synth.yaml ve ve
finetune grounding grounding_synth.yaml grounding_gradcam refcoco
finetune grounding grounding_box_synth.yaml grounding_box refcoco
finetune captioning captioning_synth.yaml captioning caption --set "options.train_captions=$(urls caption_train)"

echo "== 9. fine-tuning summary"
$PY -m finetune.report "$OUT/finetune" --summary "$OUT/summary.json"
echo "demo finished in $(( $(date +%s) - start ))s; summary: $OUT/summary.json, plot: $OUT/pretrain_losses.png"
