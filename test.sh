#!/usr/bin/env bash
# Builds each task's image, checks that every module it holds under /opt/app/pantherseg imports,
# then runs it the way grand-challenge does (no network, read-only /input, no capabilities) on its
# task's sample case, on two bad inputs (two images; the other task's sample case, which it must
# refuse) and, when the image bakes a model, with another model uploaded to /opt/ml/model, and
# checks what comes out.
#
#   ./test.sh                       build (./build.sh --task ...), then test, both tasks
#   TASKS=task2 ./test.sh           one task
#   SKIP_BUILD=1 ./test.sh          test the images that are already built
#
# Images: pantherseg:task1 and pantherseg:task2 (IMAGE_NAME, default pantherseg, names the
# repository). Sample case of a task: test/samples/<task>/input/ (laid out like /input:
# inputs.json and images/<socket>/<uuid>.mha). Weights: the baked model when models/<task>/plan.json
# exists, else a tiny threshold network of that task (test/model_factory.py) mounted read-only at
# /opt/ml/model. Expected mask, compared when the model is baked: test/samples/<task>/
# expected_output/ (laid out like /output). A successful run must write nothing on stderr:
# grand-challenge shows stderr as errors.
# Needs docker and the project venv (.venv; `make test` creates it) for the test model and checks.
set -euo pipefail
cd "$(dirname "$0")"
REPO="$PWD"

IMAGE_NAME="${IMAGE_NAME:-pantherseg}"
TASKS="${TASKS:-task1 task2}"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
# Lowest Dice against the expected mask that passes: identical on the CPU that wrote it, but
# another CPU's float kernels (or a GPU) may flip a boundary voxel; lower it further for GPU runs.
EXPECTED_MIN_DICE="${EXPECTED_MIN_DICE:-0.999}"
OUTPUT_SOCKET=images/pancreatic-tumor-segmentation

fail() {
    echo "test.sh: FAIL${TASK:+ ($TASK)}: $*" >&2
    exit 1
}
step() { echo "test.sh:${TASK:+ [$TASK]} $*"; }

# input_socket TASK: the task's input socket folder (CONTRACT.md).
input_socket() {
    case "$1" in
        task1) echo images/abdominal-t1-mri ;;
        task2) echo images/abdominal-t2-mri ;;
        *) fail "unknown task '$1' in TASKS (expected task1, task2)" ;;
    esac
}

[ -x "$PYTHON" ] || fail "no Python at $PYTHON: run 'make test' first (it creates .venv) or set PYTHON"
command -v docker >/dev/null || fail "docker is not installed"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/pantherseg-test.XXXXXX")"
CONTAINERS=()
LAST_IMAGE=""
cleanup() {
    local name
    for name in ${CONTAINERS[@]+"${CONTAINERS[@]}"}; do
        docker rm --force "$name" >/dev/null 2>&1 || true
    done
    # The container's user owns what it wrote; a non-root caller removes that through the image.
    if ! rm -rf "$WORK" 2>/dev/null; then
        if [ -n "$LAST_IMAGE" ]; then
            docker run --rm --network none --user 0:0 --entrypoint /bin/rm -v "$WORK:/work" \
                "$LAST_IMAGE" -rf /work/task1 /work/task2 >/dev/null 2>&1 || true
        fi
        rm -rf "$WORK" || echo "test.sh: could not remove $WORK" >&2
    fi
}
trap cleanup EXIT
# A Python program that imports every module under /opt/app/pantherseg inside an image. process.py
# imports only some of them; one that ships but cannot import (a dependency missing from
# requirements.txt, a file .dockerignore left out) must fail here, by name, not in a user's job.
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

# threshold_model DIR TASK: the tiny threshold network of test/model_factory.py, as a model folder
# of TASK.
threshold_model() {
    "$PYTHON" - "$1" "$2" <<'PY' || fail "could not build the test model in $1"
import sys
from pathlib import Path

sys.path.insert(0, "test")
from model_factory import threshold_model_dir  # noqa: E402

threshold_model_dir(Path(sys.argv[1]), task=sys.argv[2])
PY
}

GPU_ARGS=()
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    GPU_ARGS=(--gpus all)
    step "GPU found: running with --gpus all"
else
    step "no GPU (nvidia-smi absent or failing): running on the CPU"
fi

# run NAME INPUT OUTPUT [DOCKER ARGS...]: $IMAGE as grand-challenge runs it, with any extra docker
# arguments (e.g. a mount); sets RC, writes NAME.stdout/.stderr in the task's folder $TW.
run() {
    local name="pantherseg-test-$$-$TASK-$1"
    CONTAINERS+=("$name")
    local started=$SECONDS
    set +e
    docker run --rm --name "$name" --network none --cap-drop ALL \
        --security-opt no-new-privileges --pids-limit 256 --shm-size 128m --memory 16g \
        ${GPU_ARGS[@]+"${GPU_ARGS[@]}"} \
        --volume "$2:/input:ro" --volume "$3:/output" \
        ${MODEL_ARGS[@]+"${MODEL_ARGS[@]}"} "${@:4}" \
        "$IMAGE" >"$TW/$1.stdout" 2>"$TW/$1.stderr"
    RC=$?
    set -e
    # docker's own warning about swap accounting is not the container's.
    grep -v '^WARNING: Your kernel does not support swap limit capabilities' "$TW/$1.stderr" \
        >"$TW/$1.stderr.container" || true
    mv "$TW/$1.stderr.container" "$TW/$1.stderr"
    step "container '$1' exited with $RC after $((SECONDS - started)) s; its stdout and stderr:"
    sed 's/^/    out| /' "$TW/$1.stdout"
    sed 's/^/    err| /' "$TW/$1.stderr"
}

# silent_stderr NAME: a successful run writes nothing on stderr (grand-challenge shows it as errors).
silent_stderr() {
    if [ -s "$TW/$1.stderr" ]; then
        fail "container '$1' succeeded but wrote $(grep -c '' "$TW/$1.stderr") line(s) on stderr" \
            "(see 'err|' above); grand-challenge shows stderr as errors"
    fi
}

# names_model NAME DIR: whether container NAME's log says it segmented with the model in DIR
# (process.py logs "...; model: N fold(s) from DIR on ...").
names_model() {
    grep -Eq "model: .* $2([ ;]|\$)" "$TW/$1.stdout"
}

# refused NAME OUTPUT WHAT: container NAME failed as a bad input must: non-zero exit, one
# process.py error line on stderr, nothing in OUTPUT.
refused() {
    [ "$RC" -ne 0 ] || fail "the container exited 0 on $3"
    local lines left
    lines="$(grep -c '' "$TW/$1.stderr" || true)"
    [ "$lines" -eq 1 ] || fail "expected one line on stderr for $3, got $lines"
    grep -q '^process.py: error: ' "$TW/$1.stderr" || fail "the stderr line is not a process.py error"
    left="$(find "$2" -mindepth 1 | sed "s|^$2/||")"
    [ -z "$left" ] || fail "the failed run on $3 left output behind: $left"
}

# check_mask INPUT_IMAGE OUTPUT [EXPECTED_ROOT]: exactly one non-empty uint8 {0, 1} mask, on the
# input's grid, under OUTPUT/$OUTPUT_SOCKET and nothing else; with EXPECTED_ROOT, close to the mask
# there.
check_mask() {
    "$PYTHON" - "$1" "$2" "$OUTPUT_SOCKET" "$EXPECTED_MIN_DICE" "${@:3}" <<'PY'
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

# test_task: builds (unless SKIP_BUILD=1) and tests the image of $TASK.
test_task() {
    IMAGE="$IMAGE_NAME:$TASK"
    TW="$WORK/$TASK"
    local socket sample other_task other_sample
    socket="$(input_socket "$TASK")"
    sample="test/samples/$TASK/input"
    mkdir -p "$TW"

    if [ "${SKIP_BUILD:-0}" != 1 ]; then
        IMAGE="$IMAGE" ./build.sh --task "$TASK"
    fi
    docker image inspect "$IMAGE" >/dev/null 2>&1 || fail "image $IMAGE not found: run ./build.sh --task $TASK"
    LAST_IMAGE="$IMAGE"

    # --- every module the image holds imports -------------------------------------------------
    step "importing every Python module under /opt/app/pantherseg inside $IMAGE"
    local imports_name="pantherseg-test-$$-$TASK-imports" broken
    CONTAINERS+=("$imports_name")
    if ! docker run --rm --name "$imports_name" --network none --cap-drop ALL \
        --security-opt no-new-privileges --entrypoint /opt/venv/bin/python "$IMAGE" -c "$IMPORT_ALL" \
        >"$TW/imports.log" 2>&1; then
        sed 's/^/    | /' "$TW/imports.log"
        broken="$(sed -n 's/^cannot import \([^:]*\):.*/\1/p' "$TW/imports.log" | paste -sd ' ' -)"
        fail "modules of the image that do not import: ${broken:-none named (see above)}"
    fi
    step "$(tail -n 1 "$TW/imports.log")"

    # --- the inputs ---------------------------------------------------------------------------
    [ -f "$sample/inputs.json" ] || fail "no sample case: $sample/inputs.json is missing"
    local images=("$sample/$socket"/*.mha)
    if [ "${#images[@]}" -ne 1 ] || [ ! -f "${images[0]}" ]; then
        fail "expected one .mha under $sample/$socket, found ${#images[@]}"
    fi
    local input="$TW/input" input_image
    mkdir -p "$input"
    cp -R "$sample/." "$input/"
    input_image="$input/$socket/$(basename "${images[0]}")"
    step "sample case: $sample/$socket/$(basename "${images[0]}")"

    # A two-image input: the container must refuse it.
    local two_images="$TW/two-images"
    mkdir -p "$two_images/$socket"
    cp "$input_image" "$two_images/$socket/a.mha"
    cp "$input_image" "$two_images/$socket/b.mha"

    # --- the model ----------------------------------------------------------------------------
    MODEL_ARGS=()
    local model_used uploaded_model="" expected=()
    if [ -f "models/$TASK/plan.json" ]; then
        step "model: the one baked into the image (models/$TASK/plan.json)"
        model_used=/opt/app/model
        # A model uploaded to grand-challenge (extracted to /opt/ml/model) must win over the baked one.
        uploaded_model="$TW/uploaded-model"
        threshold_model "$uploaded_model" "$TASK"
        if [ -d "test/samples/$TASK/expected_output" ]; then
            expected=("test/samples/$TASK/expected_output")
        fi
    else
        step "model: a threshold network mounted at /opt/ml/model (no models/$TASK/plan.json)"
        model_used=/opt/ml/model
        threshold_model "$TW/model" "$TASK"
        MODEL_ARGS=(--volume "$TW/model:/opt/ml/model:ro")
    fi

    # mktemp made $WORK private; the container's user must read the inputs and write the outputs.
    mkdir -p "$TW/ok-output" "$TW/bad-output" "$TW/other-output" "$TW/uploaded-output"
    chmod -R a+rX "$WORK"
    chmod 0777 "$TW/ok-output" "$TW/bad-output" "$TW/other-output" "$TW/uploaded-output"

    # --- case 1: one image in, one mask out ---------------------------------------------------
    run ok "$input" "$TW/ok-output"
    [ "$RC" -eq 0 ] || fail "the container exited with $RC on the sample case"
    silent_stderr ok
    names_model ok "$model_used" || fail "the log does not name $model_used as the model used"

    local provider
    # onnxruntime's providers, or OpenVINO (the CPU's engine where the image has it)
    provider="$(grep -Eo 'running on ([A-Za-z]*ExecutionProvider|OpenVINO CPU)' "$TW/ok.stdout" \
        | head -n 1 || true)"
    [ -n "$provider" ] || fail "the log names no engine ('running on ...ExecutionProvider' or 'OpenVINO CPU')"
    step "network: $provider"
    if [ "${#GPU_ARGS[@]}" -gt 0 ] && [ "$provider" != "running on CUDAExecutionProvider" ] \
        && [ "$provider" != "running on TensorrtExecutionProvider" ]; then
        fail "a GPU is present but the network ran on the CPU: CUDA libraries or driver do not match"
    fi
    check_mask "$input_image" "$TW/ok-output" ${expected[@]+"${expected[@]}"} \
        || fail "the mask is wrong (see above)"
    step "sample case: OK"

    # --- case 2: two images in, a clear failure out -------------------------------------------
    run bad "$two_images" "$TW/bad-output"
    refused bad "$TW/bad-output" "an input with two images"
    step "two images: OK (exit $RC, one error line, no output)"

    # --- case 3: the other task's image, refused ----------------------------------------------
    for other_task in task1 task2; do
        [ "$other_task" != "$TASK" ] || continue
        other_sample="test/samples/$other_task/input"
        if [ ! -d "$other_sample" ]; then
            step "other task's image: skipped (no $other_sample)"
            continue
        fi
        cp -R "$other_sample" "$TW/other-input"
        chmod -R a+rX "$TW/other-input"
        run other "$TW/other-input" "$TW/other-output"
        refused other "$TW/other-output" "a $other_task image"
        grep -q "a $other_task image" "$TW/other.stderr" \
            || fail "the refusal does not say the image is of $other_task"
        step "$other_task image: OK (refused: exit $RC, one error line, no output)"
    done

    # --- case 4: a model uploaded to /opt/ml/model wins over the baked one --------------------
    if [ -n "$uploaded_model" ]; then
        chmod -R a+rX "$uploaded_model"
        run uploaded "$input" "$TW/uploaded-output" --volume "$uploaded_model:/opt/ml/model:ro"
        [ "$RC" -eq 0 ] || fail "the container exited with $RC with a model mounted at /opt/ml/model"
        silent_stderr uploaded
        names_model uploaded /opt/ml/model \
            || fail "a model is mounted at /opt/ml/model but the log does not name it as the model used"
        check_mask "$input_image" "$TW/uploaded-output" \
            || fail "the mask made with the uploaded model is wrong"
        step "uploaded model: OK (/opt/ml/model used, not the baked model)"
    else
        step "uploaded model: skipped (no baked model; the sample case already used /opt/ml/model)"
    fi
    step "PASS ($IMAGE)"
}

for TASK in $TASKS; do
    input_socket "$TASK" >/dev/null
    test_task
done
TASK=""
step "PASS ($TASKS)"
