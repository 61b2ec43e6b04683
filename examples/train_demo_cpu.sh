#!/usr/bin/env bash
# Trains the two-stage demo model on the CPU: 60 training phantoms, 3-fold cross-validation of
# both stages (localiser, then the region network in its boxes), post-processing tuned out of fold
# on the whole chain, ONNX export, test-time mirroring chosen on 40 tuning phantoms of their own
# seed (`pantherseg choose-mirroring --apply`), and scoring on 40 held-out phantoms from a seed no
# step of the recipe uses otherwise. Each step prints its wall time. Run from the repository root; every step
# resumes where a killed run stopped (cv --resume), so the recipe may span sessions.
#
#   examples/train_demo_cpu.sh                      # every step: data cv export mirroring heldout
#   STEPS="cv export" examples/train_demo_cpu.sh    # continue after an interruption
#   TASK=task2 examples/train_demo_cpu.sh           # the Task 2 (T2 MR-Linac) demo model
#
# Environment (defaults): TASK (task1), WORK (out/demo-cpu for task1, out/demo-cpu-task2 for
# task2), CONFIG (examples/demo_cpu.yaml for task1, examples/demo_cpu_task2.yaml for task2),
# MODEL (\$WORK/model), PYTHON (.venv/bin/python), DEVICE (cpu), JOBS (all CPUs),
# TRAIN_CASES (60), TUNING_CASES (40), HELDOUT_CASES (40), SIZE (full; small makes tiny phantoms to try it out),
# INIT (none: random weights; an exported model folder fine-tunes region fold k from its fold k:
# INIT=models/task1 with a Task 2 config on Task 1's grid is the fine-tuned Task 2 edition that
# models/task2/README.md compares under "Previous editions").
set -euo pipefail
TASK=${TASK:-task1}
case "$TASK" in
    task1)
        WORK=${WORK:-out/demo-cpu}
        CONFIG=${CONFIG:-examples/demo_cpu.yaml}
        INIT=${INIT:-}
        ;;
    task2)
        WORK=${WORK:-out/demo-cpu-task2}
        CONFIG=${CONFIG:-examples/demo_cpu_task2.yaml}
        INIT=${INIT:-}
        ;;
    *)
        echo "train_demo_cpu.sh: TASK must be task1 or task2, not '$TASK'" >&2
        exit 2
        ;;
esac
MODEL=${MODEL:-$WORK/model}
PY=${PYTHON:-.venv/bin/python}
DEVICE=${DEVICE:-cpu}
JOBS=${JOBS:-$(nproc)}
STEPS=${STEPS:-data cv export mirroring heldout}
SIZE=${SIZE:-full}
HELDOUT_SEED=300 # training uses seed 100; the shipped sample case comes from seed 200
TUNING_SEED=400  # the test-time mirroring choice's own phantoms

# shellcheck source=examples/recipe_steps.sh
. "$(dirname "$0")/recipe_steps.sh"

if wants data; then
    step "$PY" -m pantherseg.cli synth "$WORK/train" --cases "${TRAIN_CASES:-60}" --seed 100 \
        --first-id 10000 --task "$TASK" --size "$SIZE" --jobs "$JOBS"
    step "$PY" -m training plan --data "$WORK/train" --work "$WORK/work" --config "$CONFIG"
    step "$PY" -m training preprocess --work "$WORK/work"
fi
if wants cv; then
    step "$PY" -m training cv --work "$WORK/work" --device "$DEVICE" --resume ${INIT:+--init "$INIT"}
fi
if wants export; then
    step "$PY" -m training export --work "$WORK/work" --out "$MODEL"
fi
if wants mirroring; then
    step "$PY" -m pantherseg.cli synth "$WORK/tuning" --cases "${TUNING_CASES:-40}" \
        --seed "$TUNING_SEED" --first-id 40000 --task "$TASK" --size "$SIZE" --jobs "$JOBS"
    step "$PY" -m pantherseg.cli choose-mirroring "$MODEL" "$WORK/tuning" -o "$WORK/mirroring" \
        --apply --device "$DEVICE"
fi
if wants heldout; then
    step "$PY" -m pantherseg.cli synth "$WORK/heldout" --cases "${HELDOUT_CASES:-40}" \
        --seed "$HELDOUT_SEED" --first-id 30000 --task "$TASK" --size "$SIZE" --jobs "$JOBS"
    score_heldout "$WORK/heldout" "$MODEL" cpu "${HELDOUT_CASES:-40} phantoms that no fold saw \
(\`pantherseg synth --task $TASK --seed $HELDOUT_SEED\`, ids from 30000), segmented by the exported \
ensemble on the CPU through the container's code path (\`pantherseg predict\`) and scored with \
\`pantherseg evaluate\`. Synthetic data: this shows that the pipeline learns, not how it does on \
real MRI."
fi
