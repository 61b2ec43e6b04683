#!/usr/bin/env bash
# Trains the demo model shipped in model/: 60 training phantoms, 3-fold cross-validation on the
# CPU with post-processing tuned out of fold, ONNX export, and scoring on 20 held-out phantoms
# (other seeds). Each step prints its time. Run from the repository root after `make test`.
set -euo pipefail
WORK=${WORK:-out/demo-model}
MODEL=${MODEL:-model}
BIN=.venv/bin

step() { echo "== $*"; local start=$SECONDS; "$@"; echo "== $(( SECONDS - start )) s: $1 ${2:-}"; }

step "$BIN/pantherseg" synth "$WORK/train" --cases 60 --seed 100 --first-id 10000
step "$BIN/pantherseg" synth "$WORK/heldout" --cases 20 --seed 200 --first-id 20000
step "$BIN/python" -m training plan --data "$WORK/train" --work "$WORK/work" --config examples/demo_cpu.yaml
step "$BIN/python" -m training preprocess --work "$WORK/work"
step "$BIN/python" -m training cv --work "$WORK/work" --device cpu --resume
step "$BIN/python" -m training export --work "$WORK/work" --out "$MODEL"
step "$BIN/pantherseg" predict "$WORK/heldout/ImagesTr" -o "$WORK/heldout/predictions" --model "$MODEL" --device cpu
step "$BIN/pantherseg" evaluate --pred "$WORK/heldout/predictions" --gt "$WORK/heldout/LabelsTr" \
    --images "$WORK/heldout/ImagesTr" --out "$WORK/heldout/evaluation" --report "$WORK/heldout/report" \
    --convention both --quiet
