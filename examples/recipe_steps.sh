# Sourced by the demo recipes (train_demo_cpu.sh, train_demo_model.sh): their step runner.
# shellcheck shell=bash

# step COMMAND...: runs COMMAND, printing it before and its wall time after ("== N s: ...").
step() {
    echo "== $*"
    local start=$SECONDS
    "$@"
    echo "== $((SECONDS - start)) s: $*"
}

# wants NAME: whether NAME is one of the words of $STEPS (the steps the caller asked for).
wants() { [[ " $STEPS " == *" $1 "* ]]; }

# score_heldout HELDOUT MODEL DEVICE NOTE: MODEL segments HELDOUT/ImagesTr through the container's
# code path (pantherseg predict on DEVICE), is scored against HELDOUT/LabelsTr (pantherseg
# evaluate, both spacing conventions) and the scores go into MODEL's card under "Held-out
# phantoms" with NOTE above them. Uses the caller's PY and JOBS.
score_heldout() {
    local heldout=$1 model=$2 device=$3 note=$4
    step "$PY" -m pantherseg.cli predict "$heldout/ImagesTr" -o "$heldout/predictions" \
        --model "$model" --device "$device"
    step "$PY" -m pantherseg.cli evaluate --pred "$heldout/predictions" \
        --gt "$heldout/LabelsTr" --images "$heldout/ImagesTr" \
        --out "$heldout/evaluation" --report "$heldout/report" --convention both \
        --jobs "$JOBS" --quiet
    step "$PY" -m training card --model "$model" --title "Held-out phantoms" \
        --evaluation "$heldout/evaluation/summary.json" --note "$note"
}
