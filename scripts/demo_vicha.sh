#!/usr/bin/env bash
# ViCHA end to end (`make demo METHOD=vicha`): synthetic world -> shards -> an ALBEF baseline pretrained on 2 CPU
# ranks -> visual concepts for every image, chosen by that baseline's ITC towers (`data_shards concepts`) ->
# ViCHA pretrained with the same steps, data and seed -> zero-shot retrieval of both -> retrieval and VQA
# fine-tuned from ViCHA -> runs/demo-vicha/summary.json. Rerunning reuses the baseline's shards, rebuilds those
# holding concepts (they follow the baseline) and restarts training.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${DEMO_OUT:-runs/demo-vicha}
IMAGES=${DEMO_IMAGES:-1000}
STEPS=${DEMO_STEPS:-100}
ANN="$OUT/world/annotations"
KW="$OUT/annotations"
mkdir -p "$OUT" "$KW"
start=$(date +%s)
quiet() { grep -v -E "^\[20|[Ww]arning|cpp_extension|shm_comm_op|return func" || true; }
# A free rendezvous port for each launch: another job on this machine may hold DeepSpeed's default.
port() { $PY -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

echo "== 1. synthesise the world ($IMAGES images)"
$PY -m data_shards synth --out "$OUT/world" --num-images "$IMAGES" --seed 0

build() {  # annotation-file format name samples-per-shard
    $PY -m data_shards build --input "$1" --format "$2" --image-root "$OUT/world/images" \
        --output "$OUT/shards/$3/$3-%06d.tar" --samples-per-shard "$4" --workers 2 --seed 0 | tail -1
}
last() { printf %06d $(( $(ls "$OUT/shards/$1"/*.tar | wc -l) - 1 )); }
urls() { echo "$OUT/shards/$1/$1-{000000..$(last "$1")}.tar"; }

echo "== 2. ALBEF baseline: shards, then $STEPS steps on 2 CPU ranks (demo_vicha.yaml without ViCHA's additions)"
build "$ANN/pretrain_albef.json" albef pretrain_albef 100
build "$ANN/retrieval_val.json" coco retrieval_val_plain 1000
rm -rf "$OUT/albef"
# The baseline is ViCHA's demo config without ViCHA's three additions: the same model, schedule, seed and samples.
DS_ACCELERATOR=cpu ".venv/bin/deepspeed" --num_gpus 2 --master_port "$(port)" --module pretrain \
    --config pretrain/configs/demo_vicha.yaml --set method=albef --set model.concepts.layers=0 \
    --set "objectives={itc: {momentum_distillation: false}, itm: {}, mlm: {}}" \
    --deepspeed_config ds_configs/zero0_fp32.json --output-dir "$OUT/albef" --resume none --max-steps "$STEPS" \
    --set "data.train=[{urls: '$(urls pretrain_albef)'}]" \
    --set "eval.retrieval_urls=$OUT/shards/retrieval_val_plain/retrieval_val_plain-000000.tar" 2>&1 | quiet

echo "== 3. visual concepts: caption nouns, ranked for every image by the baseline's ITC towers"
# The synthetic world's captions hold 11 nouns (3 shapes, 6 colours, "shapes", "background"); an image holds at
# most 4 shapes, so 5 concepts per image. ViCHA's 15 would hand every image the whole vocabulary, and the
# concepts would then tell the model nothing about the image.
concept_inputs=()
for name in pretrain_albef retrieval_train retrieval_val retrieval_test vqa_train vqa_val vqa_test; do
    concept_inputs+=(--input "$ANN/$name.json" --output "$KW/$name.json")
done
$PY -m data_shards concepts --captions "$ANN/retrieval_train.json" --min-count 2 \
    --vocabulary-out "$KW/vocabulary.json" --checkpoint "$OUT/albef/checkpoints" \
    --image-root "$OUT/world/images" --top-k 5 --batch-size 100 "${concept_inputs[@]}" 2>&1 | grep -v "it/s\|img/s"

echo "== 4. ViCHA: shards with concepts, then $STEPS steps with the same data, seed and schedule"
# The concepts come from this run's baseline: shards made from an earlier run's concepts are stale.
rm -rf "$OUT/shards/pretrain_vicha" "$OUT/shards/retrieval_val" "$OUT/shards/retrieval_train" \
    "$OUT/shards/retrieval_test" "$OUT/shards/vqa_train" "$OUT/shards/vqa_val" "$OUT/shards/vqa_test"
build "$KW/pretrain_albef.json" vicha pretrain_vicha 100
build "$KW/retrieval_val.json" coco retrieval_val 1000
rm -rf "$OUT/pretrain"
DS_ACCELERATOR=cpu ".venv/bin/deepspeed" --num_gpus 2 --master_port "$(port)" --module pretrain --config pretrain/configs/demo_vicha.yaml \
    --deepspeed_config ds_configs/zero0_fp32.json --output-dir "$OUT/pretrain" --resume none --max-steps "$STEPS" \
    --set "data.train=[{urls: '$(urls pretrain_vicha)'}]" \
    --set "eval.retrieval_urls=$OUT/shards/retrieval_val/retrieval_val-000000.tar" 2>&1 | quiet

echo "== 5. pretraining summary: ViCHA beside ALBEF, and the concepts against the truth"
$PY -m pretrain.report "$OUT/pretrain" --summary "$OUT/summary.json" --plot "$OUT/pretrain_losses.png"
$PY scripts/vicha_summary.py --summary "$OUT/summary.json" --albef-run "$OUT/albef" \
    --concepts "$KW/pretrain_albef.json" --truth "$ANN/pretrain_vicha_kwords.json"

echo "== 6. fine-tune retrieval and VQA from ViCHA (2 CPU ranks each; every concept of each image)"
for split in retrieval_train:coco retrieval_test:coco vqa_train:vqa vqa_val:vqa vqa_test:vqa; do
    name=${split%%:*}; build "$KW/$name.json" "${split##*:}" "$name" 500
done
rm -rf "$OUT/finetune"
finetune() {  # task config run-name split-prefix [extra arguments]
    local task=$1 config=$2 name=$3 prefix=$4; shift 4
    echo "-- $name"
    DS_ACCELERATOR=cpu ".venv/bin/deepspeed" --num_gpus 2 --master_port "$(port)" --module "finetune.$task" \
        --config "finetune/configs/$config" --checkpoint "$OUT/pretrain/checkpoints" \
        --output-dir "$OUT/finetune/$name" --set "data.train=$(urls "${prefix}_train")" \
        --set "data.test=$(urls "${prefix}_test")" --set model.concepts.layers=2 \
        --set model.concepts.max_length=12 "$@" 2>&1 | grep -E "^\[finetune|^done|[Ee]rror" | grep -v -E "[Ww]arning" || true
}
finetune retrieval retrieval_synth.yaml retrieval retrieval \
    --set "data.val=$OUT/shards/retrieval_val/retrieval_val-000000.tar"
finetune vqa vqa_synth.yaml vqa vqa --set "data.val=$(urls vqa_val)" \
    --set "options.answer_list=$ANN/vqa_answer_list.json"
$PY -m finetune.report "$OUT/finetune" --summary "$OUT/summary.json"
echo "demo finished in $(( $(date +%s) - start ))s; summary: $OUT/summary.json"
