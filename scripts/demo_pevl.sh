#!/usr/bin/env bash
# PEVL end to end (`make demo METHOD=pevl`): synthetic world -> shards -> a tiny PEVL pretrained by 2 CPU ranks on
# the grounding captions (boxes as position tokens) -> the position-token accuracy of that model -> the prompt
# tasks fine-tuned from it (referring expressions, VRD, GQA, VCR) -> a table of metrics beside chance.
# Everything lands under runs/demo-pevl/ (DEMO_OUT); rerunning reuses finished shards and restarts training.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${DEMO_OUT:-runs/demo-pevl}
IMAGES=${DEMO_IMAGES:-1000}
STEPS=${DEMO_STEPS:-100}
mkdir -p "$OUT"
start=$(date +%s)
stage() { echo "== $1 [$(( $(date +%s) - start ))s]"; }  # each stage with the seconds since the start
# A free rendezvous port for each launch, so the demo runs beside other DeepSpeed jobs on the machine.
port() { $PY -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

stage "1. synthesise the world ($IMAGES images)"
$PY -m data_shards synth --out "$OUT/world" --num-images "$IMAGES" --seed 0

stage "2. build shards: grounding captions, phrases, referring expressions, VRD, GQA, VCR"
build() {  # annotation-file format name samples-per-shard [extra build arguments]
    local input=$1 format=$2 name=$3 per_shard=$4; shift 4
    $PY -m data_shards build --input "$OUT/world/annotations/$input.json" --format "$format" \
        --image-root "$OUT/world/images" --output "$OUT/shards/$name/$name-%06d.tar" \
        --samples-per-shard "$per_shard" --workers 2 --seed 0 "$@" | tail -1
}
build pretrain_pevl_grounding pevl pevl 100
for split in phrase_grounding_val:pevl refcoco_train:refcoco refcoco_val:refcoco refcoco_test:refcoco \
             vrd_train:vrd vrd_val:vrd vrd_test:vrd gqa_train:gqa gqa_val:gqa gqa_test:gqa \
             vcr_train:vcr vcr_val:vcr vcr_test:vcr; do
    name=${split%%:*}; format=${split##*:}
    extra=(); [ "$format" = refcoco ] && extra=(--detections "$OUT/world/annotations/refcoco_dets.json")
    build "$name" "$format" "$name" 500 "${extra[@]}"
done
last() { printf %06d $(( $(ls "$OUT/shards/$1"/*.tar | wc -l) - 1 )); }
urls() { echo "$OUT/shards/$1/$1-{000000..$(last "$1")}.tar"; }
$PY -m data_shards inspect "$(urls pevl)" --samples 1 | tail -4

stage "3. pretrain a tiny PEVL on 2 CPU ranks (deepspeed launcher, ZeRO-0 fp32)"
rm -rf "$OUT/pretrain"
DS_ACCELERATOR=cpu .venv/bin/deepspeed --num_gpus 2 --master_port "$(port)" --module pretrain \
    --config pretrain/configs/pevl_demo.yaml --deepspeed_config ds_configs/zero0_fp32.json \
    --output-dir "$OUT/pretrain" --resume none ${STEPS:+--max-steps "$STEPS"} \
    --set "data.train=[{urls: '$(urls pevl)'}]" 2>&1 \
    | grep -v -E "^\[20|[Ww]arning|cpp_extension|shm_comm_op|return func"
$PY -m pretrain.report "$OUT/pretrain" --summary "$OUT/summary.json" --plot "$OUT/pretrain_losses.png"

finetune() {  # entry-point config run-name [extra arguments]
    local task=$1 config=$2 name=$3; shift 3
    echo "-- $name [$(( $(date +%s) - start ))s]"
    DS_ACCELERATOR=cpu .venv/bin/deepspeed --num_gpus 2 --master_port "$(port)" --module "finetune.$task" \
        --config "finetune/configs/$config" --checkpoint "$OUT/pretrain/checkpoints" \
        --output-dir "$OUT/finetune/$name" "$@" 2>&1 \
        | grep -E "^\[finetune|^done|[Ee]rror" | grep -v -E "[Ww]arning" || true
}

stage "4. position tokens of the pretrained model: each phrase's four tokens masked in the val captions"
rm -rf "$OUT/positions" "$OUT/finetune"
DS_ACCELERATOR=cpu .venv/bin/deepspeed --num_gpus 2 --master_port "$(port)" --module finetune.prompt_grounding \
    --config finetune/configs/prompt_grounding_synth.yaml --checkpoint "$OUT/pretrain/checkpoints" --evaluate \
    --output-dir "$OUT/positions" --set "data.test=$(urls phrase_grounding_val)" \
    --set options.other_boxes=shown 2>&1 | grep -E "^\[finetune|^done|[Ee]rror" | grep -v -E "[Ww]arning" || true
$PY -m finetune.prompt_grounding position-accuracy "$OUT/positions" --summary "$OUT/summary.json"

stage "5. fine-tune the prompt tasks from the pretraining checkpoint (2 CPU ranks each)"
finetune prompt_grounding prompt_grounding_synth.yaml rec --set "data.train=$(urls refcoco_train)" \
    --set "data.val=$(urls refcoco_val)" --set "data.test=$(urls refcoco_test)"
finetune vrd vrd_synth.yaml vrd --set "data.train=$(urls vrd_train)" --set "data.val=$(urls vrd_val)" \
    --set "data.test=$(urls vrd_test)" --set "options.dictionary=$OUT/world/annotations/vrd_dict.json"
finetune gqa gqa_synth.yaml gqa --set "data.train=$(urls gqa_train)" --set "data.val=$(urls gqa_val)" \
    --set "data.test=$(urls gqa_test)" --set "options.answer_list=$OUT/world/annotations/gqa_answer_list.json"
# VCR scores eight texts per question (four answers, four rationales): half the config's samples keep it short.
finetune vcr vcr_synth.yaml vcr --set "data.train=$(urls vcr_train)" --set "data.val=$(urls vcr_val)" \
    --set "data.test=$(urls vcr_test)" --set data.train_samples=256

stage "6. summary"
$PY -m finetune.report "$OUT/finetune" --summary "$OUT/summary.json"
echo "demo finished in $(( $(date +%s) - start ))s; summary: $OUT/summary.json, plot: $OUT/pretrain_losses.png"
