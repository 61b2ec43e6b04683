"""Post-processing rules: threshold, component size in mm^3, pancreas guidance, never empty."""

from __future__ import annotations

import numpy as np
import pytest

from pantherseg.inference.plan import PancreasGuidance, Postprocessing
from pantherseg.inference.postprocess import dilate_mm, postprocess

SPACING = (3.0, 1.0, 1.0)


def probability_with_blobs() -> np.ndarray:
    prob = np.zeros((10, 40, 40), dtype=np.float32)
    prob[2:6, 5:15, 5:15] = 0.9  # 400 voxels = 1200 mm^3
    prob[7:8, 30:32, 30:32] = 0.8  # 4 voxels = 12 mm^3
    return prob


def test_threshold_and_minimum_size_in_mm3():
    prob = probability_with_blobs()
    mask, report = postprocess(prob, SPACING, Postprocessing(threshold=0.5))
    assert mask.dtype == np.uint8 and set(np.unique(mask).tolist()) == {0, 1}
    assert mask.sum() == 404 and report.components_found == 2
    mask, report = postprocess(prob, SPACING, Postprocessing(min_component_mm3=13.0))
    assert mask.sum() == 400 and report.removed_small == 1
    # The same component in voxels, but on a finer grid it is smaller in mm^3: both go, and the
    # never-empty rule (on by default) must bring back the one with the higher peak.
    mask, report = postprocess(prob, (1.0, 1.0, 1.0), Postprocessing(min_component_mm3=500.0))
    assert report.removed_small == 2 and "highest peak" in report.fallback
    assert mask.sum() == 400 and mask[2:6, 5:15, 5:15].all()
    mask, _ = postprocess(
        prob, (1.0, 1.0, 1.0), Postprocessing(min_component_mm3=500.0, never_empty=False)
    )
    assert mask.sum() == 0


def test_never_empty_keeps_the_most_probable_component():
    prob = probability_with_blobs()
    mask, report = postprocess(prob, SPACING, Postprocessing(min_component_mm3=1e6))
    assert mask.sum() == 400
    assert "highest peak" in report.fallback


def test_never_empty_below_threshold_takes_the_region_around_the_peak():
    prob = np.full((6, 20, 20), 0.01, dtype=np.float32)
    prob[2:4, 8:12, 8:12] = 0.3
    prob[3, 10, 10] = 0.4
    mask, report = postprocess(prob, SPACING, Postprocessing(threshold=0.5))
    assert mask.sum() == 32
    assert "nothing passed" in report.fallback
    empty, _ = postprocess(prob, SPACING, Postprocessing(threshold=0.5, never_empty=False))
    assert empty.sum() == 0


def test_pancreas_guidance_drops_components_far_from_the_pancreas():
    prob = probability_with_blobs()
    pancreas = np.zeros_like(prob)
    pancreas[2:6, 14:20, 5:15] = 0.9  # beside the large blob, far from the small one
    settings = Postprocessing(
        pancreas_guidance=PancreasGuidance(True, dilation_mm=3.0, min_overlap=0.15)
    )
    mask, report = postprocess(prob, SPACING, settings, pancreas)
    assert mask.sum() == 400 and report.removed_outside_pancreas == 1
    _, report = postprocess(prob, SPACING, settings, np.zeros_like(prob))
    assert report.removed_outside_pancreas == 0 and "skipped" in report.notes[0]
    with pytest.raises(ValueError, match="pancreas probability"):
        postprocess(prob, SPACING, settings)


def test_dilation_uses_physical_distance():
    mask = np.zeros((9, 21, 21), dtype=bool)
    mask[4, 10, 10] = True
    grown = dilate_mm(mask, (3.0, 1.0, 1.0), 3.0)
    assert grown[4, 10, 13] and not grown[4, 10, 14]  # 3 voxels of 1 mm in-plane
    assert grown[5, 10, 10] and not grown[6, 10, 10]  # 1 slice of 3 mm
    assert dilate_mm(np.zeros_like(mask), (1, 1, 1), 5).sum() == 0
