"""`pantherseg choose-mirroring`: every set of the trained mirror axes segments the tuning cases,
each set's mask is the one `--mirroring <letters>` gives, the network runs once per distinct
flipped tile, and the fixed rules choose.

The model is test_cascade's two-stage model (a localiser, then test_process_models' softmax
network, which looks one voxel further along x: flipping x changes its output, flipping z or y
does not), with a second, differently calibrated region fold so that the folds' average counts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from imaging import write_image
from test_cascade import model_folder, weights
from test_process_models import SPACING_XYZ, scene, softmax_network

from pantherseg import cli
from pantherseg.inference import pipeline
from pantherseg.inference.pipeline import Segmenter
from pantherseg.inference.plan import load_plan, save_plan
from pantherseg.mirror_choice import (
    AxisSetScore,
    RememberingPredictor,
    Rule,
    axis_sets,
    choose,
    choose_mirroring,
)

SETS = ["", "z", "y", "x", "zy", "zx", "yx", "zyx"]


@pytest.fixture(scope="module", params=["one stage", "two stages"])
def model_and_tuning(tmp_path_factory, request) -> tuple[Path, Path]:
    """The model, and three tuning cases (the scene shifted along x) with their labels."""
    root = tmp_path_factory.mktemp("mirror_choice")
    image, inside, _ = scene()
    localiser = {} if request.param == "two stages" else None
    model = model_folder(root / "model", image, localiser=localiser)
    second = softmax_network(model / "fold_1.onnx", image * 1.03)
    replan(model, folds=(*load_plan(model).inference.folds, weights(second)))
    tuning = root / "tuning"
    label = np.zeros(image.shape, np.uint8)
    label[4:12, 10:30, 8:30] = 2
    label[inside] = 1
    for case, shift in (("101", 0), ("102", 3), ("103", -2)):
        write_image(
            tuning / "ImagesTr" / f"{case}_0000.mha",
            np.roll(image, shift, axis=2),
            spacing_xyz=SPACING_XYZ,
        )
        write_image(
            tuning / "LabelsTr" / f"{case}.mha",
            np.roll(label, shift, axis=2),
            spacing_xyz=SPACING_XYZ,
        )
    return model, tuning


def replan(model: Path, **inference_changes) -> None:
    plan = load_plan(model, verify_weights=False)
    inference = dataclasses.replace(plan.inference, **inference_changes)
    save_plan(dataclasses.replace(plan, inference=inference), model)


class CountingEngine:
    """An engine that counts its calls per stage, otherwise itself."""

    def __init__(self, engine, calls: Counter, stage: int) -> None:
        self.engine, self.calls, self.stage = engine, calls, stage

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls[self.stage] += 1
        return self.engine(batch)

    def __getattr__(self, name: str):
        return getattr(self.engine, name)


def counted_engines(monkeypatch, calls: Counter) -> None:
    real = pipeline.load_fold_engines

    def load(*args, **kwargs):
        stages = real(*args, **kwargs)
        return [[CountingEngine(e, calls, s) for e in stage] for s, stage in enumerate(stages)]

    monkeypatch.setattr(pipeline, "load_fold_engines", load)


def read(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(path))


def test_every_axis_set_gives_the_mask_of_its_letters_at_the_cost_of_all_axes(
    model_and_tuning, tmp_path, monkeypatch
):
    model, tuning = model_and_tuning
    calls: Counter = Counter()
    counted_engines(monkeypatch, calls)
    chosen, scores = choose_mirroring(model, tuning, tmp_path, device="cpu", progress=False)
    assert [s.axes for s in scores] == SETS
    tool_calls = calls.copy()

    calls.clear()
    engines = pipeline.load_fold_engines(load_plan(model), model, device="cpu")
    masks, cost = {}, {}
    for axes in SETS:
        before = calls.copy()
        segmenter = Segmenter(
            load_plan(model),
            engines[0],
            on_gpu=False,  # one tile a call, as on the CPU
            mirroring=axes or "off",
            localiser_folds=engines[1] if len(engines) > 1 else (),
        )
        for path in sorted((tuning / "ImagesTr").glob("*.mha")):
            image = read(path)
            array = sitk.GetArrayFromImage(image).astype(np.float32)
            mask = segmenter.segment(
                array, tuple(reversed(image.GetSpacing())), image.GetDirection()
            ).mask
            case = path.name.removesuffix("_0000.mha")
            written = sitk.GetArrayFromImage(read(tmp_path / (axes or "none") / f"{case}.mha"))
            np.testing.assert_array_equal(written, mask, err_msg=f"{axes or 'none'} {case}")
            masks[axes, case] = mask
        cost[axes] = calls - before
    # Flipping x changes the one-stage model's mask (within the two-stage model's box it changes
    # only probabilities), z and y do not: the sets differ only where x is in them.
    if load_plan(model).localiser is None:
        assert any((masks["", c] != masks["zyx", c]).any() for c in ("101", "102", "103"))
    for axes in SETS:
        reference = "zyx" if "x" in axes else ""
        for case in ("101", "102", "103"):
            np.testing.assert_array_equal(masks[axes, case], masks[reference, case])
    # Two region folds, each run once per flipped tile: what one fully mirrored run costs; a
    # localiser once per case, as without mirroring.
    assert tool_calls[0] == cost["zyx"][0] == 8 * cost[""][0] > 0
    assert tool_calls[1] == cost[""][1] == cost["zyx"][1]
    # The figures follow from the masks: x-sets and the others score alike.
    by_axes = {s.axes: s for s in scores}
    assert by_axes["x"].dice == by_axes["zyx"].dice and by_axes["zy"].dice == by_axes[""].dice
    choice = json.loads((tmp_path / "choice.json").read_text())
    assert choice["chosen"] == chosen and choice["cases"] == 3
    assert [s["name"] for s in choice["axis_sets"]] == ["none", *SETS[1:]]


def test_the_command_resumes_prints_the_table_and_applies_the_choice(
    model_and_tuning, tmp_path, capsys, caplog
):
    model, tuning = model_and_tuning
    own = shutil.copytree(model, tmp_path / "model")
    (own / "metadata.json").write_text('{"data": {"synthetic": true}}\n')
    card = "# card\n\n- Test-time mirroring: off (not measured by cross-validation).\n- Data: x\n"
    (own / "README.md").write_text(card)
    out = tmp_path / "out"
    argv = ["choose-mirroring", str(own), str(tuning), "-o", str(out), "--device", "cpu"]
    assert cli.main([*argv, "--cases", "2"]) == 0
    first = (out / "cases.jsonl").read_text().splitlines()
    assert [json.loads(line)["case"] for line in first] == ["101", "102"]
    assert load_plan(own) == load_plan(model)  # without --apply the plan stays
    (out / "none" / "101.mha").unlink()  # a measured case is not segmented again
    # A rule that turns mirroring on whatever it gains, and takes any set as good as all axes'.
    rule = ["--min-gain", "-1", "--tolerance", "1", "--hd95-slack", "1000"]
    assert cli.main([*argv, "--apply", *rule]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = (out / "cases.jsonl").read_text().splitlines()
    assert lines[:2] == first and json.loads(lines[2])["case"] == "103"
    assert not (out / "none" / "101.mha").exists()
    assert "| axes (`--mirroring`), 3 cases |" in captured.out
    # The fewest passes, the highest Dice among them (z and y give the unmirrored mask, x the
    # mirrored one).
    scores = json.loads((out / "choice.json").read_text())["axis_sets"]
    singles = [s for s in scores if s["passes"] == 2]
    best = max(singles, key=lambda s: s["dice"])
    assert f"chosen: mirroring over {best['axes']} (2 passes); written into" in captured.out
    inference = load_plan(own).inference
    assert inference.test_time_mirroring
    assert inference.test_time_mirror_axes == tuple("zyx".index(a) for a in best["axes"])
    metadata = json.loads((own / "metadata.json").read_text())
    assert metadata["data"] == {"synthetic": True}  # kept
    assert metadata["test_time_mirroring_choice"]["chosen"] == best["axes"]
    assert metadata["test_time_mirroring_choice"]["cases"] == 3
    # The card states what the plan now does, and why; its other lines stay.
    letters = " and ".join(best["axes"])
    reason = "chosen by `pantherseg choose-mirroring` on 3 tuning cases (tuning)"
    assert (
        card.replace(
            "off (not measured by cross-validation)",
            f"on over {letters}, 2 passes per tile ({reason}; metadata.json holds every axis set's "
            "scores)",
        )
        == (own / "README.md").read_text()
    )
    # A rule no mirroring can pass turns it off in the plan.
    assert cli.main([*argv, "--apply", "--min-gain", "1"]) == 0
    assert "chosen: no mirroring" in capsys.readouterr().out
    assert not load_plan(own).inference.test_time_mirroring
    assert f"\n- Test-time mirroring: off ({reason};" in (own / "README.md").read_text()
    # A card without the line (written by hand) is left alone, with a word saying so.
    (own / "README.md").write_text("# card written by hand\n")
    assert cli.main([*argv, "--apply"]) == 0
    assert "no line starting '- Test-time mirroring:'" in caplog.text
    assert (own / "README.md").read_text() == "# card written by hand\n"


def score(axes: str, dice: float, hd95: float = 5.0, found: int = 9, fallbacks: int = 0):
    return AxisSetScore(axes, 2 ** len(axes), dice, hd95, math.nan, found, 10, fallbacks)


def test_the_rules():
    rule = Rule()
    base = [score(a, 0.80) for a in SETS[1:-1]]
    # Off unless all axes gain at least 0.005 Dice without HD95 more than 0.5 mm worse.
    assert choose([score("", 0.80), *base, score("zyx", 0.804)], rule) is None
    assert choose([score("", 0.80), *base, score("zyx", 0.81, hd95=5.6)], rule) is None
    # On: the fewest passes within 0.002 Dice of all axes, the higher Dice among as few.
    sets = [score("", 0.80), score("z", 0.807), score("y", 0.809), score("x", 0.7)]
    sets += [score(a, 0.81) for a in ("zy", "zx", "yx")]
    assert choose([*sets, score("zyx", 0.81)], rule) == "y"
    # A set that finds fewer tumors or falls back more often does not qualify.
    sets[2] = score("y", 0.809, found=8)
    sets[1] = score("z", 0.809, fallbacks=1)
    assert choose([*sets, score("zyx", 0.81)], rule) == "zy"
    # Nothing short of all axes qualifies: all axes.
    worse = [score(a, 0.79) for a in SETS[1:-1]]
    assert choose([score("", 0.79), *worse, score("zyx", 0.81)], rule) == "zyx"


def test_axis_sets_of_the_trained_axes():
    assert axis_sets((0, 1, 2)) == SETS
    assert axis_sets((2, 1)) == ["", "y", "x", "yx"]


def test_remembering_predictor_computes_each_input_once_and_hands_out_copies():
    calls = []

    def network(batch):
        calls.append(batch.copy())
        return batch * 2

    remembering = RememberingPredictor(network)
    a = np.arange(8, dtype=np.float32).reshape(1, 1, 2, 2, 2)
    first = remembering(a)
    first += 100  # the caller's own copy
    np.testing.assert_array_equal(remembering(a.copy()), a * 2)
    remembering(np.flip(a, 4))  # another input: computed
    remembering(a.astype(np.float64))  # same values, another dtype: computed
    assert len(calls) == 3
    remembering.forget()
    remembering(a)
    assert len(calls) == 4


def test_bad_inputs_are_refused_with_the_reason(model_and_tuning, tmp_path, capsys):
    model, tuning = model_and_tuning
    flat = shutil.copytree(model, tmp_path / "flat")
    replan(flat, mirror_axes=(), test_time_mirroring=False)
    argv = ["choose-mirroring", str(flat), str(tuning), "-o", str(tmp_path / "o1")]
    assert cli.main(argv) == 2
    assert "trained without flips" in capsys.readouterr().err

    partial = tmp_path / "partial"
    for sub in ("ImagesTr", "LabelsTr"):
        (partial / sub).mkdir(parents=True)
    for path in (tuning / "ImagesTr").iterdir():
        (partial / "ImagesTr" / path.name).write_bytes(path.read_bytes())
    (partial / "LabelsTr" / "101.mha").write_bytes((tuning / "LabelsTr" / "101.mha").read_bytes())
    argv = ["choose-mirroring", str(model), str(partial), "-o", str(tmp_path / "o2")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert str(partial) in err and "no label for image(s) 102_0000.mha, 103_0000.mha" in err
    assert not (tmp_path / "o2").exists()

    other = tmp_path / "o3"
    other.mkdir()
    (other / "cases.jsonl").write_text(json.dumps({"case": "101", "none": {}, "y": {}}) + "\n")
    argv = ["choose-mirroring", str(model), str(tuning), "-o", str(other)]
    assert cli.main(argv) == 2
    assert "measured with other axis sets" in capsys.readouterr().err
