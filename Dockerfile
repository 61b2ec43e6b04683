# grand-challenge.org algorithm image for pantherseg (PANTHER, pancreatic tumor segmentation on MRI).
#
# Base: CUDA + cuDNN 9 runtime, CUDA 12.8 by default with onnxruntime-gpu 1.26.0 (the last PyPI
# build for CUDA 12: any driver of the CUDA 12 era), or CUDA 13.0 with onnxruntime-gpu 1.31.1
# (`./build.sh --cuda 13`: needs a driver >= 580). The onnxruntime-gpu build must match the base's
# CUDA major, or its CUDA provider cannot load: requirements-cuda<major>.txt is chosen from
# CUDA_VERSION below. Without a usable GPU the container says why on stdout and runs on the CPU.
# Ubuntu 24.04 brings Python 3.12; every pinned wheel exists for it (see requirements.txt).
#
# CI builds this file unchanged against a Debian stand-in imported under the same name
# (.ci/container.sh): no CUDA there, so the container runs on the CPU.

# The base's CUDA version (./build.sh --cuda 13 sets 13.0.2).
ARG CUDA_VERSION=12.8.1

# grand-challenge runs linux/amd64 only; the platform is pinned on purpose so that a build on an
# ARM machine still produces an image grand-challenge can run.
# hadolint ignore=DL3029
FROM --platform=linux/amd64 nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-ubuntu24.04 AS base

# The application files, readable by the non-root user whatever modes the host gave them (a model
# file saved as 0600 would otherwise fail at runtime). In a stage of its own so that the image
# holds them once, in the layer COPY --from writes. The context is an allow-list (.dockerignore):
# process.py, pantherseg/, requirements.txt and models/ (a COPY naming an absent folder would fail
# the build). One image per task (grand-challenge takes one algorithm per task): TASK's model,
# models/<TASK>/, becomes /opt/app/model and the other task's model stays out of the image. Without
# a baked model/plan.json, process.py reads /opt/ml/model, where grand-challenge extracts an
# uploaded model.
FROM base AS app
ARG TASK=task1
COPY . /opt/app/
RUN case "$TASK" in \
        task1 | task2) ;; \
        *) echo "TASK must be task1 or task2, not '$TASK'" >&2 && exit 1 ;; \
    esac \
    && if [ -d "/opt/app/models/$TASK" ]; then mv "/opt/app/models/$TASK" /opt/app/model; fi \
    && rm -rf /opt/app/models \
    && chmod -R u=rwX,go=rX /opt/app

FROM base

ARG DEBIAN_FRONTEND=noninteractive

# The Python interpreter comes from the distribution of the pinned base tag; apt versions are not
# pinned because the base tag fixes the release and apt cannot install a superseded version.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# The non-root user the algorithm runs as. A fixed, numeric uid (Ubuntu 24.04 images already give
# uid 1000 to "ubuntu"), so that USER needs no lookup and host folders can be prepared for it.
RUN groupadd --gid 10001 user \
    && useradd --uid 10001 --gid 10001 --no-log-init --create-home --shell /usr/sbin/nologin user

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The onnxruntime-gpu build for the base's CUDA major (12.8.1 -> requirements-cuda12.txt).
ARG CUDA_VERSION
COPY requirements.txt requirements-cuda12.txt requirements-cuda13.txt /opt/app/
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir --require-virtualenv -r /opt/app/requirements.txt \
        -r "/opt/app/requirements-cuda${CUDA_VERSION%%.*}.txt" \
    && pip check

COPY --from=app /opt/app /opt/app
ARG TASK=task1
LABEL org.pantherseg.task="$TASK"

WORKDIR /opt/app
USER 10001:10001

ENTRYPOINT ["/opt/venv/bin/python", "/opt/app/process.py"]
