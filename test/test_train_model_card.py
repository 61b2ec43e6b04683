"""The model card records evaluations: a `pantherseg evaluate` summary becomes a section of
README.md (before "Intended use"; recorded again, its recorded part is replaced and what was
written by hand after it kept) and an entry of metadata.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from strict_json import read_strict_json

from pantherseg.cli import main as pantherseg_main
from pantherseg.phantoms.synthetic import write_dataset
from training.__main__ import main as training_main
from training.model_card import RECORDED_END, RECORDED_START

CARD = """# pantherseg model card

- Task: task1.

## Cross-validation (out-of-fold, challenge metrics)

| metric | value |
| --- | --- |
| dice | 0.5000 |

## Intended use

Research only.
"""


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    """A real summary.json: two small phantoms, one predicted exactly, one with nothing found."""
    root = tmp_path_factory.mktemp("heldout")
    infos = write_dataset(root / "data", 2, seed=4, size="small", progress=False)
    predictions = root / "predictions"
    predictions.mkdir()
    for k, info in enumerate(infos):
        label = sitk.ReadImage(str(root / "data" / info["label"]))
        array = (sitk.GetArrayFromImage(label) == 1).astype(np.uint8) if k == 0 else None
        if array is None:  # the second case: an empty mask
            array = np.zeros(label.GetSize()[::-1], np.uint8)
        mask = sitk.GetImageFromArray(array)
        mask.CopyInformation(label)
        sitk.WriteImage(mask, str(predictions / f"{info['case_id']}_0001.mha"))
    code = pantherseg_main(
        [
            "evaluate",
            "--pred",
            str(predictions),
            "--gt",
            str(root / "data" / "LabelsTr"),
            "--out",
            str(root / "evaluation"),
            "--convention",
            "both",
            "--quiet",
        ]
    )
    assert code == 0
    return root / "evaluation" / "summary.json"


def model_folder(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "README.md").write_text(CARD)
    (model / "metadata.json").write_text(json.dumps({"name": "pantherseg"}))
    return model


def test_evaluation_goes_before_intended_use_and_into_metadata(tmp_path, summary, capsys):
    model = model_folder(tmp_path)
    argv = ["card", "--model", str(model), "--evaluation", str(summary)]
    assert training_main([*argv, "--title", "Held-out phantoms", "--note", "Two cases."]) == 0
    card = (model / "README.md").read_text()
    section = card[card.index("## Held-out phantoms") : card.index("## Intended use")]
    assert "Two cases." in section and "| metric | spacing zyx | spacing xyz |" in section
    expected = json.loads(summary.read_text())["methods"]["predictions"]["aggregates"]
    dice = expected["zyx"]["dice"]
    assert 0.4 < dice < 0.6  # one perfect case, one empty: the mean is about a half
    assert f"| dice | {dice:.4f} | {expected['xyz']['dice']:.4f} |" in section
    assert "| n_cases | 2 | 2 |" in section
    assert "By true tumor volume (spacing zyx):" in section
    bands = json.loads(summary.read_text())["methods"]["predictions"]["by_tumor_volume"]["zyx"]
    assert sum(b["n_cases"] for b in bands) == 2
    for band in bands:
        assert f"| {band['band']} | {band['n_cases']} | {band['dice']:.4f} |" in section
    assert card.index("## Cross-validation") < card.index("## Held-out phantoms")
    assert section.startswith("## Held-out phantoms\n" + RECORDED_START + "\n\nTwo cases.")
    assert "|\n\n" + RECORDED_END + "\n\n## Intended use" in card  # blank lines around it
    metadata = json.loads((model / "metadata.json").read_text())
    recorded = metadata["evaluations"]["Held-out phantoms"]
    assert recorded["note"] == "Two cases." and recorded["methods"]["predictions"] == expected
    assert "section 'Held-out phantoms' written" in capsys.readouterr().out

    # Recorded again after a paragraph was written by hand below the recorded part: the recorded
    # part is replaced, not repeated, and the paragraph stays where it was.
    paragraph = "\n\nWritten by hand: why the small tumors are missed."
    card = card.replace(RECORDED_END, RECORDED_END + paragraph)
    (model / "README.md").write_text(card)
    assert training_main([*argv, "--title", "Held-out phantoms", "--note", "Again."]) == 0
    card = (model / "README.md").read_text()
    assert card.count("## Held-out phantoms") == 1 and "Again." in card and "Two cases." not in card
    assert card.count(RECORDED_START) == 1 and card.count(RECORDED_END) == 1
    assert RECORDED_END + paragraph + "\n\n## Intended use" in card
    assert card.rstrip().endswith("Research only.")


def test_a_section_without_markers_is_not_overwritten(tmp_path, summary, capsys):
    """A section of the same title written by hand (or before the markers existed) may hold text
    no summary can restore: recording into it stops, naming the card, and changes nothing."""
    model = model_folder(tmp_path)
    card = CARD.replace(
        "## Intended use", "## Held-out phantoms\n\nA hand-made table.\n\n## Intended use"
    )
    (model / "README.md").write_text(card)
    argv = ["card", "--model", str(model), "--evaluation", str(summary), "--title"]
    assert training_main([*argv, "Held-out phantoms"]) == 2
    err = capsys.readouterr().err
    assert f"{model / 'README.md'}: section 'Held-out phantoms' lacks the markers" in err
    assert (model / "README.md").read_text() == card
    assert json.loads((model / "metadata.json").read_text()) == {"name": "pantherseg"}


def test_a_subsection_of_the_same_title_is_another_section(tmp_path, summary):
    """`### Held-out phantoms` (an older edition's, under "Previous editions") is not the
    section `## Held-out phantoms`: recording adds the section and leaves the subsection alone,
    before the fix it was taken for the section and the recording stopped."""
    model = model_folder(tmp_path)
    older = "## Previous editions\n\n### Held-out phantoms\n\nAn older edition's table.\n\n"
    card = CARD.replace("## Intended use", older + "## Intended use")
    (model / "README.md").write_text(card)
    argv = ["card", "--model", str(model), "--evaluation", str(summary), "--title"]
    assert training_main([*argv, "Held-out phantoms"]) == 0
    once = (model / "README.md").read_text()
    assert once.count("\n## Held-out phantoms\n") == 1 and once.count(RECORDED_START) == 1
    assert older in once
    assert training_main([*argv, "Held-out phantoms"]) == 0  # and again: the same card
    assert (model / "README.md").read_text() == once


def test_a_card_without_intended_use_gets_the_section_at_its_end(tmp_path, summary):
    model = model_folder(tmp_path)
    card = CARD[: CARD.index("## Intended use")]
    (model / "README.md").write_text(card)
    argv = ["card", "--model", str(model), "--evaluation", str(summary), "--title", "Tuning"]
    assert training_main(argv) == 0
    once = (model / "README.md").read_text()
    assert once.startswith(card.rstrip("\n") + "\n\n## Tuning\n" + RECORDED_START + "\n")
    assert once.endswith("|\n\n" + RECORDED_END + "\n")
    assert training_main(argv) == 0  # recorded again from the same summary: the same card
    assert (model / "README.md").read_text() == once


def test_missing_or_wrong_summary_is_a_clear_error(tmp_path, capsys):
    model = model_folder(tmp_path)
    missing = tmp_path / "nowhere" / "summary.json"
    argv = ["card", "--model", str(model), "--title", "T", "--evaluation"]
    assert training_main([*argv, str(missing)]) == 2
    assert f"{missing}: not found" in capsys.readouterr().err
    wrong = tmp_path / "wrong.json"
    wrong.write_text("{}")
    assert training_main([*argv, str(wrong)]) == 2
    assert "not a `pantherseg evaluate` summary.json" in capsys.readouterr().err
    assert (model / "README.md").read_text() == CARD  # nothing changed


@pytest.mark.parametrize("task", ["task1", "task2"])
def test_the_shipped_cards_can_be_recorded_again_without_losing_their_paragraphs(
    tmp_path, summary, task
):
    """The shipped cards' held-out sections carry paragraphs written by hand after the recorded
    tables: a new held-out score replaces the tables and keeps every one of those paragraphs."""
    shipped = Path(__file__).resolve().parents[1] / "models" / task
    model = tmp_path / task
    model.mkdir()
    for name in ("README.md", "metadata.json"):
        (model / name).write_bytes((shipped / name).read_bytes())
    before = (model / "README.md").read_text()
    start = before.index("## Held-out phantoms")
    kept = before[before.index(RECORDED_END, start) + len(RECORDED_END) :]
    assert "\n## Test-time mirroring" in kept and len(kept.split("\n## ")[0]) > 200
    argv = ["card", "--model", str(model), "--evaluation", str(summary)]
    assert training_main([*argv, "--title", "Held-out phantoms", "--note", "Again."]) == 0
    after = (model / "README.md").read_text()
    assert after.endswith(RECORDED_END + kept) and "Again." in after
    assert after[:start] == before[:start]


def test_a_mean_without_value_is_written_n_a(tmp_path):
    """summary.json writes a mean over no tumor as null (strict JSON); the card says n/a."""
    label = np.zeros((8, 16, 16), np.uint8)
    label[2:6, 4:12, 4:12] = 2  # pancreas, no tumor
    for folder, array in (("gt", label), ("pred", (label == 2).astype(np.uint8))):
        (tmp_path / folder).mkdir()
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / folder / "10000_0001.mha"))
    out = tmp_path / "evaluation"
    argv = ["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]
    assert pantherseg_main([*argv, "--out", str(out), "--quiet"]) == 0
    summary = read_strict_json(out / "summary.json")
    assert summary["methods"]["pred"]["aggregates"]["zyx"]["dice"] is None
    model = model_folder(tmp_path)
    argv = ["card", "--model", str(model), "--evaluation", str(out / "summary.json")]
    assert training_main([*argv, "--title", "Tumor-free"]) == 0
    card = (model / "README.md").read_text()
    assert "| dice | n/a |" in card and "| tumor_burden_rmse | 256.0000 |" in card
