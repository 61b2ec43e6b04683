#!/usr/bin/env bash
# Trains the earlier single-stage demo model (shipped before the two-stage one): 60 training
# phantoms, 3-fold cross-validation with the folds side by side on one GPU, post-processing tuned
# out of fold, ONNX export, and scoring on 20 held-out phantoms (other seeds). Each step prints its
# time. Run from the repository root.
#
#   examples/train_demo_model.sh                    # every step: data train finetune cv heldout
#   STEPS="data train cv" examples/train_demo_model.sh
#
# `train` runs examples/demo_gpu.yaml's 6.5-minute schedule per fold; `finetune` continues each
# fold from its best weights with a fresh 3-minute poly schedule at half the learning rate (a warm
# restart: the shipped model had its GPU time in two calls, and this is the second).
#
# Environment (defaults): WORK (out/demo-model), MODEL (out/demo-model/model), PYTHON
# (.venv/bin/python), CONFIG (examples/demo_gpu.yaml), DEVICE (cuda), JOBS (all CPUs),
# TRAIN_CASES (60), HELDOUT_CASES (20), SIZE (full; small makes tiny phantoms to try the script out),
# FINETUNE_MINUTES (3.0 per fold), INIT_DIR (unset; a work folder whose fold_k/best.pt the
# fine-tuning starts from instead of this run's stage 1).
set -euo pipefail
WORK=${WORK:-out/demo-model}
MODEL=${MODEL:-$WORK/model}
PY=${PYTHON:-.venv/bin/python}
CONFIG=${CONFIG:-examples/demo_gpu.yaml}
DEVICE=${DEVICE:-cuda}
JOBS=${JOBS:-$(nproc)}
STEPS=${STEPS:-data train finetune cv heldout}
SIZE=${SIZE:-full}

# shellcheck source=examples/recipe_steps.sh
. "$(dirname "$0")/recipe_steps.sh"

# Folds train as separate processes at once: one small network leaves most of a GPU idle.
# With an argument (a file name), each fold starts from fold_k/<that file> (fine-tuning).
train_folds_side_by_side() {
    local folds pids=() k init=()
    folds=$("$PY" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["cv"]["folds"])' \
        "$WORK/work/config.yaml")
    for ((k = 0; k < folds; k++)); do
        [[ $# -gt 0 ]] && init=(--init "$WORK/work/fold_$k/$1")
        "$PY" -m training train --work "$WORK/work" --fold "$k" --device "$DEVICE" "${init[@]}" \
            >"$WORK/train_fold_$k.log" 2>&1 &
        pids+=($!)
    done
    for ((k = 0; k < folds; k++)); do
        if ! wait "${pids[$k]}"; then
            echo "fold $k failed; the end of $WORK/train_fold_$k.log:" >&2
            tail -n 30 "$WORK/train_fold_$k.log" >&2
            return 1
        fi
        grep "best validation Dice" "$WORK/train_fold_$k.log"
    done
}

if wants data; then
    step "$PY" -m pantherseg.cli synth "$WORK/train" --cases "${TRAIN_CASES:-60}" --seed 100 \
        --first-id 10000 --size "$SIZE" --jobs "$JOBS"
    step "$PY" -m training plan --data "$WORK/train" --work "$WORK/work" --config "$CONFIG"
    step "$PY" -m training preprocess --work "$WORK/work"
fi
if wants train; then
    step train_folds_side_by_side
fi
if wants finetune; then
    # Each fold starts from its stage-1 best weights, or from $INIT_DIR/fold_k/best.pt when set:
    # weights carried from an earlier run, to continue it on a fresh machine (STEPS="data finetune").
    "$PY" - "$WORK/work" "${FINETUNE_MINUTES:-3.0}" "${INIT_DIR:-}" <<'PYTHON'
import pathlib, shutil, sys, yaml

work, minutes, init = pathlib.Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
config = yaml.safe_load((work / "config.yaml").read_text())
for k in range(int(config["cv"]["folds"])):
    fold = work / f"fold_{k}"
    source = (pathlib.Path(init) / f"fold_{k}" if init else fold) / "best.pt"
    if not source.is_file():
        sys.exit(f"{source}: no weights to fine-tune fold {k} from")
    fold.mkdir(exist_ok=True)
    shutil.copyfile(source, fold / "stage1_best.pt")
    if (source.parent / "history.json").is_file():
        shutil.copyfile(source.parent / "history.json", fold / "stage1_history.json")
config["optim"].update(lr=config["optim"]["lr"] / 2, warmup_epochs=0, time_limit_minutes=minutes)
(work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
PYTHON
    step train_folds_side_by_side stage1_best.pt
fi
if wants cv; then
    # The folds are trained: cv predicts out of fold and tunes the post-processing.
    step "$PY" -m training cv --work "$WORK/work" --device "$DEVICE" --resume
    step "$PY" -m training export --work "$WORK/work" --out "$MODEL"
fi
if wants heldout; then
    step "$PY" -m pantherseg.cli synth "$WORK/heldout" --cases "${HELDOUT_CASES:-20}" --seed 200 \
        --first-id 20000 --size "$SIZE" --jobs "$JOBS"
    score_heldout "$WORK/heldout" "$MODEL" "${PREDICT_DEVICE:-cpu}" "${HELDOUT_CASES:-20} phantoms \
that no fold saw (\`pantherseg synth --seed 200\`, ids from 20000), segmented by the exported \
ensemble on the CPU through the container's code path (\`pantherseg predict\`) and scored with \
\`pantherseg evaluate\`. Synthetic data: this shows that the pipeline learns, not how it does on \
real MRI."
fi
