#!/usr/bin/env bash
# Builds the grand-challenge algorithm image. Usage: ./build.sh [extra docker build arguments]
# IMAGE (default pantherseg:latest) names the image.
set -euo pipefail
cd "$(dirname "$0")"

IMAGE="${IMAGE:-pantherseg:latest}"

if [ ! -f model/plan.json ]; then
    echo "build.sh: no model/plan.json: the image carries no weights and reads them from" \
        "/opt/ml/model (upload model.tar.gz to grand-challenge, or mount a folder there)"
fi
docker build --platform linux/amd64 --tag "$IMAGE" "$@" .
echo "build.sh: built $IMAGE"
