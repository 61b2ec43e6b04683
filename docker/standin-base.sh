#!/usr/bin/env bash
# Puts a stand-in for the Dockerfile's base image into the running docker daemon, for machines
# that reach Debian's archive and PyPI but no container registry (CI; see .ci/container.sh).
#
#   docker/standin-base.sh IMAGE:TAG
#
# The stand-in is a Debian bookworm root (mmdebstrap) with what the Dockerfile expects from the
# real base (nvidia/cuda:*-cudnn-runtime-ubuntu24.04) apart from CUDA itself: apt with empty package
# lists, ca-certificates, useradd, bash; the same PATH and LD_LIBRARY_PATH. It is imported under the
# base's exact name so the Dockerfile builds unchanged. No CUDA: the container runs on the CPU.
# docker/standin-customize.sh adds the host's extra CA certificates
# (/usr/local/share/ca-certificates/*.crt): apt and pip inside the build may go through a
# TLS-intercepting proxy that only the host's certificates trust.
#
# The root tarball is cached in $PANTHERSEG_CI_CACHE (default /var/cache/pantherseg-ci), keyed by
# everything that goes into it; a cache hit costs only the import. Needs root and mmdebstrap.
set -euo pipefail

IMAGE="${1:?usage: $0 IMAGE:TAG}"
CACHE="${PANTHERSEG_CI_CACHE:-/var/cache/pantherseg-ci}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
PACKAGES="ca-certificates"
HOOK="$(cd "$(dirname "$0")" && pwd)/standin-customize.sh"
# As the nvidia/cuda images set them.
ENV_PATH=/usr/local/nvidia/bin:/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
ENV_LD_LIBRARY_PATH=/usr/local/nvidia/lib:/usr/local/nvidia/lib64
RECIPE_VERSION=1  # bump to force a rebuild (the key covers this script and the hook)

log() { echo "standin-base.sh: $*"; }

shopt -s nullglob
HOST_CAS=(/usr/local/share/ca-certificates/*.crt)
shopt -u nullglob

# The cache key: recipe, mirror, suite, packages and the content of the host CA files.
KEY="$(
    {
        echo "$RECIPE_VERSION $SUITE $MIRROR $PACKAGES"
        cat "$0" "$HOOK"
        for ca in ${HOST_CAS[@]+"${HOST_CAS[@]}"}; do
            echo "$ca"
            cat "$ca"
        done
    } | sha256sum | cut -c1-16
)"
TARBALL="$CACHE/standin-$SUITE-$KEY.tar"

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9  # one builder at a time per cache
if [ -f "$TARBALL" ]; then
    log "cached root $TARBALL"
else
    log "building a $SUITE root with $PACKAGES into $TARBALL (${#HOST_CAS[@]} host CA file(s))"
    rm -f "$TARBALL.partial"
    mmdebstrap --quiet --variant=minbase --include="$PACKAGES" \
        --customize-hook="$HOOK" \
        --format=tar "$SUITE" "$TARBALL.partial" "$MIRROR"
    mv "$TARBALL.partial" "$TARBALL"
    # Older recipes' roots are dead weight.
    find "$CACHE" -maxdepth 1 -name 'standin-*.tar' ! -path "$TARBALL" -delete
fi
flock --unlock 9

log "importing it as $IMAGE"
docker import \
    --change "ENV PATH=$ENV_PATH" \
    --change "ENV LD_LIBRARY_PATH=$ENV_LD_LIBRARY_PATH" \
    --change 'LABEL org.opencontainers.image.description="pantherseg CI stand-in: Debian bookworm, no CUDA"' \
    --change 'CMD ["/bin/bash"]' \
    "$TARBALL" "$IMAGE" >/dev/null
docker image inspect "$IMAGE" --format "standin-base.sh: $IMAGE is {{.Id}} ({{.Os}}/{{.Architecture}})"
