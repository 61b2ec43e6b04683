"""File-to-file CPU time and peak memory of an imported nnU-Net v2 model against nnU-Net itself.

The issue on importing nnU-Net models promises the container runs a team's nnU-Net folds faster
than nnU-Net does, at equal masks. This measures both on one median-size PANTHER Task 1 case:

- ours: `python -m training import-nnunet <folder> --out <model> --no-mirroring`, then the
  container's entrypoint `process.py --device cpu --threads N --cpu-engine E`, once with each
  CPU engine (OpenVINO, the default where installed, and ONNX Runtime);
- nnU-Net's: `nnUNetPredictor` (tile step 0.5, Gaussian, no mirroring, CPU) initialised from the
  trained folder, `predict_from_files_sequential` on `<case>_0000.mha` (PyTorch). The sequential
  variant runs the same preprocessing, network and export as `predict_from_files`, but in one
  process: for a single case the worker processes overlap nothing, and one process has one peak.

The model is the organisers' real baseline plan (3d_fullres, PlainConvUNet, patch 48 x 192 x 224)
at full size, fold 0, with nnU-Net's random initialisation (timing does not depend on weights).
Each side runs once, in a fresh child process; the wall time runs from spawning the interpreter
to its exit after the mask is written, and the peak is the child's own VmHWM. The network stage is
also given per tile and as a rate (the network's convolution FLOPs per second), to compare with
what the CPU can do at float32: where one side runs near that ceiling, no engine setting makes
it much faster, and the ratio is set by the other side.

    python -m bench.nnunet                      # median case, threads = usable cores
    python -m bench.nnunet --shape 40 96 112    # quick check
    python -m bench.nnunet --keep work/ --json nnunet.json
    python -m bench.nnunet --cpu-engines openvino   # one engine only
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.inference import GRIDS, SPACING_ZYX

ENGINE_NAMES = {"openvino": "OpenVINO", "onnxruntime": "ONNX Runtime"}

ROOT = Path(__file__).resolve().parents[1]
CONFIGURATION = "3d_fullres"
FOLD = 0
CASE = "case"
# Runs a script (`*.py`) or a module as __main__ and records the process's own peak RSS (VmHWM;
# ru_maxrss of a child would start from the parent's peak, which Linux carries across exec).
RUNNER = """
import atexit, runpy, sys
from pathlib import Path
peak_file, target, *argv = sys.argv[1:]
def record():
    status = Path('/proc/self/status').read_text()
    kib = next(int(l.split()[1]) for l in status.splitlines() if l.startswith('VmHWM'))
    Path(peak_file).write_text(str(kib))
atexit.register(record)
sys.argv = [target, *argv]
if target.endswith('.py'):
    runpy.run_path(target, run_name='__main__')
else:
    runpy.run_module(target, run_name='__main__', alter_sys=True)
"""
# process.py's last log line: "<case>: ... tumor voxels ...; read 1.23s, preprocess 4.56s, ...".
STAGE = re.compile(r"(\w+) (\d+\.\d+)s")


def write_case(path: Path, shape: tuple[int, int, int]) -> None:
    """A synthetic abdomen (body, organs, a tumor, texture, noise) on the plan's own spacing, so
    that neither side resamples and the comparison is about inference alone."""
    import SimpleITK as sitk

    from pantherseg.phantoms.synthetic import generate_case

    image = generate_case(0, "task1", shape_zyx=shape, direction="lps").image
    image.SetSpacing(SPACING_ZYX[::-1])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


def build_trained_folder(root: Path) -> tuple[str, int, float]:
    """nnU-Net's trained folder for the unshrunk baseline plans (runs in a spawned process, so
    that torch never inflates this one); returns the folder, the parameter count and the
    network's floating-point operations for one tile (convolutions, counted by PyTorch's
    FlopCounterMode on the meta device, so nothing is computed)."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT / "test"))
    from nnunet_models import BASELINE_PLANS, trained_folder

    plans = json.loads(BASELINE_PLANS.read_text())
    plans.pop("README", None)  # the organisers' file carries a note nnU-Net does not expect
    folder = trained_folder(root, plans, CONFIGURATION, folds=(FOLD,))
    checkpoint = torch.load(
        folder / f"fold_{FOLD}" / "checkpoint_final.pth", map_location="cpu", weights_only=False
    )
    # Modules are listed under several names (the decoder holds the encoder): count each once.
    tensors = {v.data_ptr(): v.numel() for v in checkpoint["network_weights"].values()}
    parameters = sum(tensors.values())
    config = PlansManager(plans).get_configuration(CONFIGURATION)
    classes = len(checkpoint["init_args"]["dataset_json"]["labels"])
    with torch.device("meta"):
        network = get_network_from_plans(
            config.network_arch_class_name,
            config.network_arch_init_kwargs,
            config.network_arch_init_kwargs_req_import,
            1,
            classes,
            allow_init=False,
            deep_supervision=False,
        )
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            network(torch.empty((1, 1, *config.patch_size)))
    return str(folder), parameters, float(counter.get_total_flops())


def predict_with_nnunet(folder: Path, images: Path, out: Path, report: Path, threads: int) -> None:
    """nnU-Net's own inference, timed by stage and written to `report` (the child's side)."""
    started = time.perf_counter()
    import nnunetv2.inference.predict_from_raw_data  # noqa: F401 (timed: nnU-Net's import)
    import torch
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    sys.path.insert(0, str(ROOT / "test"))
    from nnunet_models import cpu_predictor

    imported = time.perf_counter()
    torch_default = torch.get_num_threads()
    torch.set_num_threads(threads)
    predictor = cpu_predictor(folder, (FOLD,), mirroring=False)
    initialised = time.perf_counter()
    network = predictor.predict_logits_from_preprocessed_data
    spent = {"network": 0.0}
    tiles = []

    def timed_network(data: Any) -> Any:
        patch = predictor.configuration_manager.patch_size
        padded = [max(size, tile) for size, tile in zip(data.shape[1:], patch, strict=True)]
        steps = compute_steps_for_sliding_window(padded, patch, predictor.tile_step_size)
        tiles.append(math.prod(len(axis) for axis in steps))
        start = time.perf_counter()
        try:
            return network(data)
        finally:
            spent["network"] += time.perf_counter() - start

    predictor.predict_logits_from_preprocessed_data = timed_network
    out.mkdir(parents=True, exist_ok=True)  # the sequential variant does not make it
    predictor.predict_from_files_sequential(str(images), str(out), save_probabilities=False)
    done = time.perf_counter()
    stages = {
        "import": imported - started,
        "initialise": initialised - imported,
        "preprocess+export": done - initialised - spent["network"],
        "network": spent["network"],
    }
    summary = {"stages": stages, "tiles": sum(tiles), "torch_default_threads": torch_default}
    report.write_text(json.dumps(summary))


def machine_busy_s() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat), to tell a quiet run."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle, iowait = fields[3], fields[4]
    return (sum(fields) - idle - iowait) / os.sysconf("SC_CLK_TCK")


def run_child(
    target: str, argv: list[str], log: Path, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Runs `target` in a fresh interpreter; its wall time, CPU time and own peak RSS, and the
    CPU time the rest of the machine took meanwhile (other work stretches the wall time)."""
    peak_file = log.with_suffix(".peak")
    command = [sys.executable, "-c", RUNNER, str(peak_file), target, *argv]
    busy = machine_busy_s()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with log.open("w") as output:
        result = subprocess.run(
            command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, env=env, check=False
        )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    others = max(0.0, machine_busy_s() - busy - cpu)
    if result.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise RuntimeError(f"{target} exited with {result.returncode}; see {log}:\n{tail}")
    peak = int(peak_file.read_text()) / 1024**2
    return {"wall_s": wall, "cpu_s": cpu, "peak_gib": peak, "others_cpu_s": others}


def process_py_stages(log: Path) -> dict[str, float]:
    """Seconds per stage from process.py's log line for the case."""
    lines = [line for line in log.read_text().splitlines() if "; total " in line]
    if not lines:
        return {}
    stages = lines[-1].rsplit("; total ", 1)[0].rsplit("; ", 1)[-1]
    return {name: float(seconds) for name, seconds in STAGE.findall(stages)}


def agreement(ours_path: Path, theirs_path: Path, tumor_label: int) -> dict[str, float]:
    """Share of equal voxels and tumor Dice between process.py's mask and nnU-Net's labels."""
    import SimpleITK as sitk

    from pantherseg.scoring.metrics import dice

    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(ours_path))) > 0
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(theirs_path))) == tumor_label
    return {
        "equal_voxels": float((ours == theirs).mean()),
        "tumor_dice": dice(theirs, ours),
        "tumor_voxels_ours": int(ours.sum()),
        "tumor_voxels_nnunet": int(theirs.sum()),
    }


def benchmark(
    work: Path, shape: tuple[int, int, int], threads: int, cpu_engines: list[str]
) -> dict[str, Any]:
    """Builds the model both ways, runs nnU-Net once and process.py once per CPU engine, and
    compares each engine's mask with nnU-Net's."""
    from pantherseg.inference.grand_challenge import output_mask_path
    from pantherseg.inference.plan import TASK_SOCKETS

    gc_input = work / "input"
    image = gc_input / "images" / TASK_SOCKETS["task1"] / f"{CASE}.mha"
    write_case(image, shape)
    nnunet_input = work / "nnunet_input"
    nnunet_input.mkdir(exist_ok=True)
    (nnunet_input / f"{CASE}_0000.mha").write_bytes(image.read_bytes())

    print("building nnU-Net's trained folder (unshrunk baseline plans, fold 0)...", flush=True)
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        built = pool.submit(build_trained_folder, work / "results")
        folder, parameters, tile_flops = built.result()
    print("importing it: python -m training import-nnunet ... --no-mirroring", flush=True)
    model = work / "model"
    command = ["import-nnunet", folder, "--out", str(model), "--folds", str(FOLD)]
    imported = subprocess.run(
        [sys.executable, "-m", "training", *command, "--no-mirroring"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    (work / "import.log").write_text(imported.stdout + imported.stderr)
    if imported.returncode != 0:
        raise RuntimeError(f"import-nnunet failed; see {work / 'import.log'}")

    ours = {}
    for engine in cpu_engines:
        print(f"running process.py --cpu-engine {engine}...", flush=True)
        files = ["--input", str(gc_input), "--output", str(work / f"output-{engine}")]
        options = ["--device", "cpu", "--threads", str(threads), "--cpu-engine", engine]
        log = work / f"process-{engine}.log"
        ours[engine] = run_child(
            str(ROOT / "process.py"), [*files, "--model", str(model), *options], log
        )
        ours[engine]["stages"] = process_py_stages(log)

    print("running nnU-Net's predictor...", flush=True)
    report = work / "nnunet.json"
    child = ["--nnunet-child", folder, str(nnunet_input), str(work / "nnunet_output"), str(report)]
    theirs = run_child(
        "bench.nnunet",
        [*child, "--threads", str(threads)],
        work / "nnunet.log",
        env={**os.environ, "nnUNet_def_n_proc": str(threads)},  # nnU-Net's own thread caps
    )
    theirs.update(json.loads(report.read_text()))

    labels = json.loads((Path(folder) / "dataset.json").read_text())["labels"]
    theirs_mask = work / "nnunet_output" / f"{CASE}.mha"
    for engine, row in ours.items():
        ours_mask = output_mask_path(work / f"output-{engine}", image)
        row["masks"] = agreement(ours_mask, theirs_mask, labels["tumor"])
        row["speedup"] = theirs["wall_s"] / row["wall_s"]
    return {
        "shape_zyx": list(shape),
        "spacing_zyx": list(SPACING_ZYX),
        "parameters": parameters,
        "tile_flops": tile_flops,
        "tiles": theirs.pop("tiles"),  # nnU-Net's count; parity makes it ours as well
        "threads": threads,
        "torch_default_threads": theirs.pop("torch_default_threads"),
        "process_py": ours,  # per CPU engine
        "nnunet": theirs,
    }


def print_table(result: dict[str, Any]) -> None:
    """The side-by-side table the issue asks for."""
    z, y, x = result["shape_zyx"]
    sz, sy, sx = result["spacing_zyx"]
    print(
        f"\ncase {z} x {y} x {x} (z, y, x) at {sz} x {sy} x {sx} mm, synthetic; model: baseline "
        f"plans {CONFIGURATION} PlainConvUNet, {result['parameters'] / 1e6:.1f} M parameters, "
        f"fold {FOLD}, no mirroring"
    )
    print(
        f"threads: {result['threads']} for every run (process.py --threads: the engine's "
        f"intra-op threads; torch.set_num_threads and nnUNet_def_n_proc); defaults: one thread "
        f"per physical core, torch {result['torch_default_threads']}"
    )
    others = "others' CPU s"  # the rest of the machine, during the run
    header = f"{'':<34}{'wall s':>10}{'CPU s':>10}{'peak RSS GiB':>14}{others:>15}"
    print(header)
    print("-" * len(header))
    theirs = result["nnunet"]
    rows = [(f"process.py ({ENGINE_NAMES[e]})", row) for e, row in result["process_py"].items()]
    for label, row in [*rows, ("nnU-Net (PyTorch)", theirs)]:
        print(
            f"{label:<34}{row['wall_s']:>10.1f}{row['cpu_s']:>10.1f}{row['peak_gib']:>14.2f}"
            f"{row['others_cpu_s']:>15.1f}"
        )
    for label, row in rows:
        cpu = theirs["cpu_s"] / row["cpu_s"]
        memory = row["peak_gib"] / theirs["peak_gib"]
        masks = row["masks"]
        dice = masks["tumor_dice"]
        print(
            f"{label}: {row['speedup']:.2f}x wall, {cpu:.2f}x CPU time, peak RSS {memory:.2f} "
            f"of nnU-Net's (issue's target: 2x wall at equal masks); masks "
            f"{masks['equal_voxels'] * 100:.4f} % of voxels equal, tumor Dice "
            f"{'n/a (both empty)' if math.isnan(dice) else f'{dice:.4f}'} (tumor voxels: "
            f"process.py {masks['tumor_voxels_ours']}, nnU-Net {masks['tumor_voxels_nnunet']})"
        )
    tiles, tile_flops = result["tiles"], result["tile_flops"]
    rates = []
    for label, row in [*rows, ("nnU-Net", theirs)]:
        per_tile = row["stages"]["network"] / tiles
        rates.append(f"{label} {per_tile:.2f} s ({tile_flops / per_tile / 1e9:.0f} GFLOP/s)")
    print(
        f"network stage (stitching included) per tile, {tiles} tiles of "
        f"{tile_flops / 1e9:.0f} GFLOP each (convolutions): {'; '.join(rates)}"
    )
    for label, row in [*rows, ("nnU-Net", theirs)]:
        stages = row.get("stages", {})
        startup = row["wall_s"] - sum(stages.values())
        parts = ", ".join(f"{name} {seconds:.2f}" for name, seconds in stages.items())
        print(f"{label} seconds: {parts}; interpreter start and rest {startup:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="CPU threads for both networks (default: the usable cores)",
    )
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one)")
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        metavar=("Z", "Y", "X"),
        default=GRIDS["median"],
        help="image grid (default: the median PANTHER Task 1 case, 72 258 318)",
    )
    parser.add_argument(
        "--cpu-engines",
        nargs="+",
        choices=sorted(ENGINE_NAMES),
        default=["openvino", "onnxruntime"],
        help="process.py once with each (default: both)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--nnunet-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.nnunet_child:
        folder, images, out, report = map(Path, args.nnunet_child)
        predict_with_nnunet(folder, images, out, report, args.threads)
        return 0
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = benchmark(args.keep.resolve(), tuple(args.shape), args.threads, args.cpu_engines)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = benchmark(Path(tmp), tuple(args.shape), args.threads, args.cpu_engines)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
