#!/usr/bin/env bash
# Writes the two uploads grand-challenge takes: the algorithm image (pantherseg.tar.gz, from
# `docker save`) and the model (model.tar.gz: the contents of model/, which grand-challenge
# extracts to /opt/ml/model). Builds the image first unless SKIP_BUILD=1.
set -euo pipefail
cd "$(dirname "$0")"

IMAGE="${IMAGE:-pantherseg:latest}"

if [ ! -f model/plan.json ]; then
    echo "export.sh: model/plan.json is missing: put the trained model folder (plan.json and its" \
        "ONNX files) in model/ first" >&2
    exit 1
fi

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    ./build.sh
fi

echo "export.sh: saving $IMAGE to pantherseg.tar.gz"
GZIP_COMMAND=(gzip -c)
if command -v pigz >/dev/null; then
    GZIP_COMMAND=(pigz -c)  # same format, all cores
fi
docker save "$IMAGE" | "${GZIP_COMMAND[@]}" >pantherseg.tar.gz.partial
mv pantherseg.tar.gz.partial pantherseg.tar.gz

echo "export.sh: packing model/ into model.tar.gz"
# Readable by the container's non-root user whatever modes the files have here (save_plan and
# mkstemp-style writers leave 0600), owned by root, in a stable order.
tar --create --gzip --file model.tar.gz.partial --exclude='__pycache__' --sort=name \
    --owner=0 --group=0 --numeric-owner --mode='u=rwX,go=rX' -C model .
mv model.tar.gz.partial model.tar.gz

ls -l pantherseg.tar.gz model.tar.gz
