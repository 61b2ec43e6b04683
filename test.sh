#!/usr/bin/env bash
# Builds the image, checks that every module it holds under /opt/app/pantherseg imports, then runs
# it the way grand-challenge does (no network, read-only /input, no capabilities) on one sample case,
# on one bad input and, when the image bakes a model, with another model uploaded to /opt/ml/model,
# and checks what comes out.
#
#   ./test.sh                 build (./build.sh), then test
#   SKIP_BUILD=1 ./test.sh    test the image that is already built
#
# Sample case: test/input/ (laid out like /input: images/abdominal-t1-mri/<name>.mha, inputs.json
# optional) when it exists, else one phantom from `pantherseg synth`. Weights: the baked model when
# model/plan.json exists, else a tiny threshold network (test/model_factory.py) mounted read-only at
# /opt/ml/model. Expected mask: test/expected_output/ (laid out like /output) when it exists. A
# successful run must write nothing on stderr: grand-challenge shows stderr as errors.
# Needs docker and the project venv (.venv; `make test` creates it) for the sample and the checks.
set -euo pipefail
cd "$(dirname "$0")"
REPO="$PWD"

IMAGE="${IMAGE:-pantherseg:latest}"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
# Lowest Dice against test/expected_output that passes: identical on the CPU that wrote it, but
# another CPU's float kernels (or a GPU) may flip a boundary voxel; lower it further for GPU runs.
EXPECTED_MIN_DICE="${EXPECTED_MIN_DICE:-0.999}"
INPUT_SOCKET=images/abdominal-t1-mri
OUTPUT_SOCKET=images/pancreatic-tumor-segmentation
CASE_NAME=0c9b3f52-5d1e-4e8a-9a43-7e1f2b6c8d01  # grand-challenge names inputs by uuid

fail() {
    echo "test.sh: FAIL: $*" >&2
    exit 1
}
step() { echo "test.sh: $*"; }

[ -x "$PYTHON" ] || fail "no Python at $PYTHON: run 'make test' first (it creates .venv) or set PYTHON"
command -v docker >/dev/null || fail "docker is not installed"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/pantherseg-test.XXXXXX")"
CONTAINERS=()
cleanup() {
    local name
    for name in ${CONTAINERS[@]+"${CONTAINERS[@]}"}; do
        docker rm --force "$name" >/dev/null 2>&1 || true
    done
    # The container's user owns what it wrote; a non-root caller removes that through the image.
    if ! rm -rf "$WORK" 2>/dev/null; then
        docker run --rm --network none --user 0:0 --entrypoint /bin/rm -v "$WORK:/work" "$IMAGE" \
            -rf /work/ok-output /work/bad-output /work/uploaded-output >/dev/null 2>&1 || true
        rm -rf "$WORK" || echo "test.sh: could not remove $WORK" >&2
    fi
}
trap cleanup EXIT

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    ./build.sh
fi
docker image inspect "$IMAGE" >/dev/null 2>&1 || fail "image $IMAGE not found: run ./build.sh"

# --- every module the image holds imports ------------------------------------------------------
# process.py imports only some of them; one that ships but cannot import (a dependency missing from
# requirements.txt, a file .dockerignore left out) must fail here, by name, not in a user's job.
step "importing every Python module under /opt/app/pantherseg inside the image"
IMPORT_ALL='
import importlib
import sys
from pathlib import Path

app = Path("/opt/app")
sys.path.insert(0, str(app))
names = sorted(
    ".".join(path.relative_to(app).with_suffix("").parts).removesuffix(".__init__")
    for path in (app / "pantherseg").rglob("*.py")
)
failed = []
for name in names:
    try:
        module = importlib.import_module(name)
    except BaseException as error:
        failed.append(f"{name}: {type(error).__name__}: {error}")
        continue
    if not str(getattr(module, "__file__", "")).startswith(f"{app}/"):
        failed.append(f"{name}: loaded from {module.__file__}, not from {app}")
for line in failed:
    print(f"cannot import {line}")
print(f"imported {len(names) - len(failed)} of {len(names)} modules under {app}/pantherseg")
sys.exit(1 if failed or not names else 0)
'
IMPORTS_NAME="pantherseg-test-$$-imports"
CONTAINERS+=("$IMPORTS_NAME")
if ! docker run --rm --name "$IMPORTS_NAME" --network none --cap-drop ALL \
    --security-opt no-new-privileges --entrypoint /opt/venv/bin/python "$IMAGE" -c "$IMPORT_ALL" \
    >"$WORK/imports.log" 2>&1; then
    sed 's/^/    | /' "$WORK/imports.log"
    BROKEN="$(sed -n 's/^cannot import \([^:]*\):.*/\1/p' "$WORK/imports.log" | paste -sd ' ' -)"
    fail "modules of the image that do not import: ${BROKEN:-none named (see above)}"
fi
step "$(tail -n 1 "$WORK/imports.log")"

# --- the sample case ---------------------------------------------------------------------------
INPUT="$WORK/input"
mkdir -p "$INPUT"
if [ -d test/input ]; then
    step "sample case from test/input/"
    cp -R test/input/. "$INPUT/"
else
    step "sample case: a generated phantom (no test/input/)"
    mkdir -p "$INPUT/$INPUT_SOCKET"
    if "$PYTHON" -m pantherseg.cli synth "$WORK/synth" -n 1 --size small --seed 5 >"$WORK/synth.log" 2>&1; then
        images=("$WORK"/synth/ImagesTr/*_0000.mha)
        if [ "${#images[@]}" -ne 1 ] || [ ! -f "${images[0]}" ]; then
            fail "pantherseg synth did not write exactly one image"
        fi
        cp "${images[0]}" "$INPUT/$INPUT_SOCKET/$CASE_NAME.mha"
    else
        step "pantherseg synth failed ($(tail -n 1 "$WORK/synth.log")); writing a phantom with SimpleITK"
        "$PYTHON" - "$INPUT/$INPUT_SOCKET/$CASE_NAME.mha" <<'PY'
import sys

import numpy as np
import SimpleITK as sitk

rng = np.random.default_rng(5)
shape = (24, 64, 72)  # z, y, x
array = rng.normal(100, 5, shape)
array[8:16, 20:40, 24:48] = 400  # the bright "tumor" the threshold network finds
image = sitk.GetImageFromArray(array.astype(np.int16))
image.SetSpacing((1.1875, 1.1875, 3.0))  # x, y, z: Task 1's anisotropy
image.SetOrigin((-120.5, 80.25, -310.0))
c, s = np.cos(0.2), np.sin(0.2)
image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))  # never assume identity
sitk.WriteImage(image, sys.argv[1], useCompression=True)
PY
    fi
fi

# inputs.json as grand-challenge writes it, unless the sample brings its own.
"$PYTHON" - "$INPUT" "$INPUT_SOCKET" <<'PY' || fail "the sample case is not one image under $INPUT_SOCKET"
import json
import sys
from pathlib import Path

root, socket = Path(sys.argv[1]), Path(sys.argv[2])
images = sorted((root / socket).glob("*.mha"))
if len(images) != 1:
    sys.exit(f"expected one .mha under {socket}, found {len(images)}")
if not (root / "inputs.json").exists():
    value = {
        "interface": {"slug": socket.name, "kind": "Image", "relative_path": str(socket)},
        "image": {"name": images[0].name},
    }
    (root / "inputs.json").write_text(json.dumps([value], indent=2))
PY
INPUT_IMAGE="$(find "$INPUT/$INPUT_SOCKET" -name '*.mha' | head -n 1)"

# A two-image input: the container must refuse it.
BAD_INPUT="$WORK/bad-input"
mkdir -p "$BAD_INPUT/$INPUT_SOCKET"
cp "$INPUT_IMAGE" "$BAD_INPUT/$INPUT_SOCKET/a.mha"
cp "$INPUT_IMAGE" "$BAD_INPUT/$INPUT_SOCKET/b.mha"

# --- the model ---------------------------------------------------------------------------------
# threshold_model DIR: the tiny threshold network of test/model_factory.py, as a model folder.
threshold_model() {
    "$PYTHON" - "$1" <<'PY' || fail "could not build the test model in $1"
import sys
from pathlib import Path

sys.path.insert(0, "test")
from model_factory import threshold_model_dir  # noqa: E402

threshold_model_dir(Path(sys.argv[1]))
PY
}

MODEL_ARGS=()
UPLOADED_MODEL=""
if [ -f model/plan.json ]; then
    step "model: the one baked into the image (model/plan.json)"
    MODEL_USED=/opt/app/model
    # A model uploaded to grand-challenge (extracted to /opt/ml/model) must win over the baked one.
    UPLOADED_MODEL="$WORK/uploaded-model"
    threshold_model "$UPLOADED_MODEL"
else
    step "model: a threshold network mounted at /opt/ml/model (no model/plan.json)"
    MODEL_USED=/opt/ml/model
    threshold_model "$WORK/model"
    MODEL_ARGS=(--volume "$WORK/model:/opt/ml/model:ro")
fi

# names_model NAME DIR: whether container NAME's log says it segmented with the model in DIR
# (process.py logs "...; model: N fold(s) from DIR on ...").
names_model() {
    grep -Eq "model: .* $2([ ;]|\$)" "$WORK/$1.stdout"
}

# mktemp made $WORK private; the container's user must read the inputs and write the outputs.
mkdir -p "$WORK/ok-output" "$WORK/bad-output" "$WORK/uploaded-output"
chmod -R a+rX "$WORK"
chmod 0777 "$WORK/ok-output" "$WORK/bad-output" "$WORK/uploaded-output"

GPU_ARGS=()
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    GPU_ARGS=(--gpus all)
    step "GPU found: running with --gpus all"
else
    step "no GPU (nvidia-smi absent or failing): running on the CPU"
fi

# run NAME INPUT OUTPUT [DOCKER ARGS...]: the container as grand-challenge runs it, with any extra
# docker arguments (e.g. a mount); sets RC, writes NAME.stdout/.stderr.
run() {
    local name="pantherseg-test-$$-$1"
    CONTAINERS+=("$name")
    local started=$SECONDS
    set +e
    docker run --rm --name "$name" --network none --cap-drop ALL \
        --security-opt no-new-privileges --pids-limit 256 --shm-size 128m --memory 16g \
        ${GPU_ARGS[@]+"${GPU_ARGS[@]}"} \
        --volume "$2:/input:ro" --volume "$3:/output" \
        ${MODEL_ARGS[@]+"${MODEL_ARGS[@]}"} "${@:4}" \
        "$IMAGE" >"$WORK/$1.stdout" 2>"$WORK/$1.stderr"
    RC=$?
    set -e
    # docker's own warning about swap accounting is not the container's.
    grep -v '^WARNING: Your kernel does not support swap limit capabilities' "$WORK/$1.stderr" \
        >"$WORK/$1.stderr.container" || true
    mv "$WORK/$1.stderr.container" "$WORK/$1.stderr"
    step "container '$1' exited with $RC after $((SECONDS - started)) s; its stdout and stderr:"
    sed 's/^/    out| /' "$WORK/$1.stdout"
    sed 's/^/    err| /' "$WORK/$1.stderr"
}

# silent_stderr NAME: a successful run writes nothing on stderr (grand-challenge shows it as errors).
silent_stderr() {
    if [ -s "$WORK/$1.stderr" ]; then
        fail "container '$1' succeeded but wrote $(grep -c '' "$WORK/$1.stderr") line(s) on stderr" \
            "(see 'err|' above); grand-challenge shows stderr as errors"
    fi
}

# check_mask OUTPUT [EXPECTED_ROOT]: exactly one non-empty uint8 {0, 1} mask, on the input's grid,
# under OUTPUT/$OUTPUT_SOCKET and nothing else; with EXPECTED_ROOT, close to the mask there.
check_mask() {
    "$PYTHON" - "$INPUT_IMAGE" "$1" "$OUTPUT_SOCKET" "$EXPECTED_MIN_DICE" "${@:2}" <<'PY'
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

source_path, output, socket = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
min_dice = float(sys.argv[4])
expected_root = Path(sys.argv[5]) if len(sys.argv) > 5 else None
problems = []

written = sorted(p.relative_to(output) for p in output.rglob("*") if p.is_file())
masks = [p for p in written if p.parent == Path(socket)]
if len(written) != 1 or len(masks) != 1:
    sys.exit(f"expected exactly one file under {socket}/ and nothing else, found {written}")
mask_path = output / masks[0]
print(f"mask: {masks[0]}")
if mask_path.suffix != ".mha":
    problems.append(f"{mask_path.name} is not a .mha file")

mask_image = sitk.ReadImage(str(mask_path))
source = sitk.ReadImage(str(source_path))
if mask_image.GetPixelID() != sitk.sitkUInt8:
    problems.append(f"pixel type {mask_image.GetPixelIDTypeAsString()}, expected 8-bit unsigned")
mask = sitk.GetArrayFromImage(mask_image)
values = set(np.unique(mask).tolist())
if not values <= {0, 1}:
    problems.append(f"values {sorted(values)}, expected a subset of {{0, 1}}")
if not mask.any():
    problems.append("the mask is empty")
if mask_image.GetSize() != source.GetSize():
    problems.append(f"size {mask_image.GetSize()} != input {source.GetSize()}")
for what in ("Spacing", "Origin", "Direction"):
    got, want = getattr(mask_image, f"Get{what}")(), getattr(source, f"Get{what}")()
    if len(got) != len(want) or not np.allclose(got, want, rtol=0, atol=1e-6):
        problems.append(f"{what.lower()} {got} != input {want}")
print(f"{int(mask.sum())} tumor voxels of {mask.size}; size {mask_image.GetSize()}, "
      f"spacing {tuple(round(s, 4) for s in mask_image.GetSpacing())}")

if expected_root is not None:
    expected_path = expected_root / masks[0]
    if not expected_path.is_file():
        problems.append(f"no expected mask {expected_path} for {masks[0]}")
    else:
        expected = sitk.GetArrayFromImage(sitk.ReadImage(str(expected_path))) == 1
        got = mask == 1
        if expected.shape != got.shape:
            problems.append(f"shape {got.shape} != expected {expected.shape}")
        else:
            total = int(expected.sum() + got.sum())
            dice = 1.0 if total == 0 else 2 * int((expected & got).sum()) / total
            differ = int((expected != got).sum())
            print(f"against {expected_path}: Dice {dice:.6f}, {differ} voxels differ")
            if dice < min_dice:
                problems.append(f"Dice {dice:.6f} with the expected mask is below {min_dice}")

for problem in problems:
    print(f"mask problem: {problem}")
sys.exit(1 if problems else 0)
PY
}

# --- case 1: one image in, one mask out --------------------------------------------------------
run ok "$INPUT" "$WORK/ok-output"
[ "$RC" -eq 0 ] || fail "the container exited with $RC on the sample case"
silent_stderr ok
names_model ok "$MODEL_USED" || fail "the log does not name $MODEL_USED as the model used"

PROVIDER="$(grep -o 'running on [A-Za-z]*ExecutionProvider' "$WORK/ok.stdout" | head -n 1 || true)"
[ -n "$PROVIDER" ] || fail "the log names no execution provider ('running on ...ExecutionProvider')"
step "network: $PROVIDER"
if [ "${#GPU_ARGS[@]}" -gt 0 ] && [ "$PROVIDER" = "running on CPUExecutionProvider" ]; then
    fail "a GPU is present but the network ran on the CPU: CUDA libraries or driver do not match"
fi

EXPECTED_ARGS=()
if [ -d test/expected_output ]; then
    EXPECTED_ARGS=(test/expected_output)
fi
check_mask "$WORK/ok-output" ${EXPECTED_ARGS[@]+"${EXPECTED_ARGS[@]}"} \
    || fail "the mask is wrong (see above)"
step "sample case: OK"

# --- case 2: two images in, a clear failure out ------------------------------------------------
run bad "$BAD_INPUT" "$WORK/bad-output"
[ "$RC" -ne 0 ] || fail "the container exited 0 on an input with two images"
LINES="$(grep -c '' "$WORK/bad.stderr" || true)"
[ "$LINES" -eq 1 ] || fail "expected one line on stderr for the bad input, got $LINES"
grep -q '^process.py: error: ' "$WORK/bad.stderr" || fail "the stderr line is not a process.py error"
LEFT="$(find "$WORK/bad-output" -mindepth 1 | sed "s|^$WORK/bad-output/||")"
[ -z "$LEFT" ] || fail "the failed run left output behind: $LEFT"
step "bad input: OK (exit $RC, one error line, no output)"

# --- case 3: a model uploaded to /opt/ml/model wins over the baked one -------------------------
if [ -n "$UPLOADED_MODEL" ]; then
    run uploaded "$INPUT" "$WORK/uploaded-output" --volume "$UPLOADED_MODEL:/opt/ml/model:ro"
    [ "$RC" -eq 0 ] || fail "the container exited with $RC with a model mounted at /opt/ml/model"
    silent_stderr uploaded
    names_model uploaded /opt/ml/model \
        || fail "a model is mounted at /opt/ml/model but the log does not name it as the model used"
    check_mask "$WORK/uploaded-output" || fail "the mask made with the uploaded model is wrong"
    step "uploaded model: OK (/opt/ml/model used, not the baked model)"
else
    step "uploaded model: skipped (no baked model; the sample case already used /opt/ml/model)"
fi

step "PASS ($IMAGE)"
