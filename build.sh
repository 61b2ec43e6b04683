#!/usr/bin/env bash
# Builds the grand-challenge algorithm image.
#   ./build.sh [--cuda 12|13] [extra docker build arguments]
# --cuda 12 (default): CUDA 12.8 with onnxruntime-gpu 1.26.0, for any driver of the CUDA 12 era;
# --cuda 13: CUDA 13.0 with onnxruntime-gpu 1.31.1, for drivers >= 580.
# IMAGE (default pantherseg:latest) names the image.
set -euo pipefail
cd "$(dirname "$0")"

IMAGE="${IMAGE:-pantherseg:latest}"
CUDA=12
if [ "${1:-}" = "--cuda" ]; then
    CUDA="${2:?build.sh: --cuda needs 12 or 13}"
    shift 2
fi
case "$CUDA" in
    12) CUDA_VERSION=12.8.1 ;;
    13) CUDA_VERSION=13.0.2 ;;
    *)
        echo "build.sh: --cuda must be 12 or 13, not '$CUDA'" >&2
        exit 2
        ;;
esac

if [ ! -f model/plan.json ]; then
    echo "build.sh: no model/plan.json: the image carries no weights and reads them from" \
        "/opt/ml/model (upload model.tar.gz to grand-challenge, or mount a folder there)"
fi
docker build --platform linux/amd64 --build-arg "CUDA_VERSION=$CUDA_VERSION" --tag "$IMAGE" "$@" .
echo "build.sh: built $IMAGE (CUDA $CUDA_VERSION)"
