#!/usr/bin/env bash
# Writes the two uploads grand-challenge takes for one task: the algorithm image
# (pantherseg-<task>.tar.gz, from `docker save`) and the model (model-<task>.tar.gz: the contents
# of models/<task>/, which grand-challenge extracts to /opt/ml/model). Builds the image first
# (./build.sh --task ...) unless SKIP_BUILD=1.
#   ./export.sh [--task 1|2] [--cuda 12|13]
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=docker/task.sh
. docker/task.sh

TASK=task1
BUILD_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --task)
            [ $# -ge 2 ] || {
                echo "export.sh: --task needs 1 or 2" >&2
                exit 2
            }
            TASK="$2"
            shift 2
            ;;
        --cuda)
            BUILD_ARGS+=(--cuda "${2:?export.sh: --cuda needs 12 or 13}")
            shift 2
            ;;
        *)
            echo "export.sh: unknown argument '$1' (expected --task 1|2, --cuda 12|13)" >&2
            exit 2
            ;;
    esac
done
TASK="$(task_name export.sh "$TASK")"
IMAGE="${IMAGE:-pantherseg:$TASK}"
MODEL="models/$TASK"

if [ ! -f "$MODEL/plan.json" ]; then
    echo "export.sh: $MODEL/plan.json is missing: put the trained model folder (plan.json and its" \
        "ONNX files) in $MODEL/ first" >&2
    exit 1
fi

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    ./build.sh --task "$TASK" ${BUILD_ARGS[@]+"${BUILD_ARGS[@]}"}
fi

echo "export.sh: saving $IMAGE to pantherseg-$TASK.tar.gz"
GZIP_COMMAND=(gzip -c)
if command -v pigz >/dev/null; then
    GZIP_COMMAND=(pigz -c)  # same format, all cores
fi
docker save "$IMAGE" | "${GZIP_COMMAND[@]}" >"pantherseg-$TASK.tar.gz.partial"
mv "pantherseg-$TASK.tar.gz.partial" "pantherseg-$TASK.tar.gz"

echo "export.sh: packing $MODEL/ into model-$TASK.tar.gz"
# Readable by the container's non-root user whatever modes the files have here (save_plan and
# mkstemp-style writers leave 0600), owned by root, in a stable order.
tar --create --gzip --file "model-$TASK.tar.gz.partial" --exclude='__pycache__' --sort=name \
    --owner=0 --group=0 --numeric-owner --mode='u=rwX,go=rX' -C "$MODEL" .
mv "model-$TASK.tar.gz.partial" "model-$TASK.tar.gz"

ls -l "pantherseg-$TASK.tar.gz" "model-$TASK.tar.gz"
