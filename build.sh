#!/usr/bin/env bash
# Builds the grand-challenge algorithm image of one task (grand-challenge takes one algorithm per
# task; each image bakes its own task's model).
#   ./build.sh [--task 1|2] [--cuda 12|13] [extra docker build arguments]
# --task 1 (default): Task 1, T1 arterial MRI, model from models/task1/; --task 2: Task 2, T2
# MR-Linac MRI, model from models/task2/. --task task1 and --task task2 work too.
# --cuda 12 (default): CUDA 12.8 with onnxruntime-gpu 1.26.0, for any driver of the CUDA 12 era;
# --cuda 13: CUDA 13.0 with onnxruntime-gpu 1.31.1, for drivers >= 580.
# IMAGE (default pantherseg:task1 or pantherseg:task2) names the image.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=docker/task.sh
. docker/task.sh

TASK=task1
CUDA=12
while [ $# -gt 0 ]; do
    case "$1" in
        --task)
            [ $# -ge 2 ] || {
                echo "build.sh: --task needs 1 or 2" >&2
                exit 2
            }
            TASK="$2"
            shift 2
            ;;
        --cuda)
            CUDA="${2:?build.sh: --cuda needs 12 or 13}"
            shift 2
            ;;
        *) break ;;
    esac
done
TASK="$(task_name build.sh "$TASK")"
case "$CUDA" in
    12) CUDA_VERSION=12.8.1 ;;
    13) CUDA_VERSION=13.0.2 ;;
    *)
        echo "build.sh: --cuda must be 12 or 13, not '$CUDA'" >&2
        exit 2
        ;;
esac
IMAGE="${IMAGE:-pantherseg:$TASK}"

if [ ! -f "models/$TASK/plan.json" ]; then
    echo "build.sh: no models/$TASK/plan.json: the image carries no weights and reads them from" \
        "/opt/ml/model (upload model.tar.gz to grand-challenge, or mount a folder there)"
fi
docker build --platform linux/amd64 --build-arg "CUDA_VERSION=$CUDA_VERSION" \
    --build-arg "TASK=$TASK" --tag "$IMAGE" "$@" .
echo "build.sh: built $IMAGE ($TASK, CUDA $CUDA_VERSION)"
