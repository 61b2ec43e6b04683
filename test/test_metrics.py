"""The metrics against DeepMind's surface-distance package and against shapes with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_metrics import reference_scores
from scipy import ndimage

from pantherseg.scoring import metrics


def random_blob(rng: np.random.Generator, shape: tuple[int, int, int], fill: float) -> np.ndarray:
    """An irregular, possibly multi-component shape: thresholded smoothed noise."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=rng.uniform(0.8, 2.5))
    return noise > np.quantile(noise, 1.0 - fill)


def box(shape, lo, hi) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return mask


def assert_matches_reference(gt, pred, spacing):
    ref = reference_scores(gt, pred, spacing)
    ours = metrics.surface_distances(gt, pred, spacing)
    ref_sd = ref["surface_distances"]
    np.testing.assert_allclose(ours.distances_gt_to_pred, ref_sd["distances_gt_to_pred"], rtol=1e-9)
    np.testing.assert_allclose(ours.distances_pred_to_gt, ref_sd["distances_pred_to_gt"], rtol=1e-9)
    np.testing.assert_allclose(
        np.sort(ours.areas_gt), np.sort(ref_sd["surfel_areas_gt"]), rtol=1e-9
    )
    np.testing.assert_allclose(
        np.sort(ours.areas_pred), np.sort(ref_sd["surfel_areas_pred"]), rtol=1e-9
    )
    scored = metrics.score_case(gt, pred, spacing)
    assert scored.dice == pytest.approx(ref["dice"], rel=1e-12)
    assert scored.surface_dice == pytest.approx(ref["surface_dice"], rel=1e-9)
    assert scored.hd95 == pytest.approx(ref["hd95"], rel=1e-9)
    assert scored.masd == pytest.approx(ref["masd"], rel=1e-9)


spacings = st.tuples(st.floats(0.5, 4.0), st.floats(0.5, 2.0), st.floats(0.5, 2.0)).map(
    lambda s: tuple(round(v, 4) for v in s)
)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    spacing=spacings,
    shape=st.tuples(st.integers(4, 20), st.integers(4, 24), st.integers(4, 24)),
    fill_gt=st.floats(0.01, 0.5),
    fill_pred=st.floats(0.01, 0.5),
)
def test_random_shapes_match_reference(seed, spacing, shape, fill_gt, fill_pred):
    rng = np.random.default_rng(seed)
    gt = random_blob(rng, shape, fill_gt)
    pred = random_blob(rng, shape, fill_pred)
    if not gt.any() or not pred.any() or pred.all():
        return
    assert_matches_reference(gt, pred, spacing)


def test_overlapping_tumor_like_shapes_match_reference():
    rng = np.random.default_rng(7)
    shape = (40, 90, 100)
    gt = random_blob(rng, shape, 0.03)
    pred = ndimage.binary_dilation(gt, iterations=1) ^ random_blob(rng, shape, 0.005)
    assert_matches_reference(gt, pred, (3.0, 1.1875, 1.1875))


def test_masks_touching_the_volume_border_match_reference():
    gt = box((10, 12, 14), (0, 0, 0), (10, 6, 14))
    pred = box((10, 12, 14), (0, 2, 3), (7, 12, 14))
    assert_matches_reference(gt, pred, (3.3, 0.8, 0.9))


def test_identical_masks_are_perfect():
    gt = box((20, 30, 30), (5, 5, 5), (15, 20, 22))
    scores = metrics.score_case(gt, gt.copy(), (3.0, 1.2, 1.2))
    assert scores.dice == 1.0
    assert scores.surface_dice == 1.0
    assert scores.hd95 == 0.0
    assert scores.masd == 0.0


def test_shift_along_slices_gives_slice_spacing_as_hd95():
    # A wide, flat box shifted by one slice: its top and bottom faces (most of its area) move by
    # exactly the slice spacing; the side faces stay in place.
    gt = box((12, 40, 40), (3, 5, 5), (6, 35, 35))
    pred = box((12, 40, 40), (4, 5, 5), (7, 35, 35))
    scores = metrics.score_case(gt, pred, (3.0, 1.0, 1.0))
    assert scores.hd95 == pytest.approx(3.0)
    assert scores.dice == pytest.approx(2 / 3)
    # The organisers' convention puts 1 mm on that axis instead.
    swapped = metrics.score_case(gt, pred, (3.0, 1.0, 1.0), convention="xyz")
    assert swapped.hd95 == pytest.approx(1.0)
    assert swapped.dice == scores.dice


def test_surface_dice_tolerance_separates_near_and_far_faces():
    gt = box((12, 40, 40), (3, 5, 5), (6, 35, 35))
    pred = box((12, 40, 40), (4, 5, 5), (7, 35, 35))
    within = metrics.score_case(gt, pred, (3.0, 1.0, 1.0), tolerance_mm=3.0)
    beyond = metrics.score_case(gt, pred, (3.0, 1.0, 1.0), tolerance_mm=2.9)
    assert within.surface_dice == pytest.approx(1.0)
    assert beyond.surface_dice < 0.5


def test_sphere_surface_area_and_volume():
    radius_mm = 20.0
    spacing = (2.0, 1.0, 1.0)
    z, y, x = np.mgrid[0:30, 0:60, 0:60]
    sphere = ((z - 15) * 2.0) ** 2 + (y - 30.0) ** 2 + (x - 30.0) ** 2 <= radius_mm**2
    sd = metrics.surface_distances(sphere, sphere, spacing)
    # Marching-cubes surfels on a digitised sphere over-estimate its area by about 10 %; the
    # check is that areas come out in mm^2 with the spacing applied, not a precise area.
    assert sd.areas_gt.sum() == pytest.approx(4 * math.pi * radius_mm**2, rel=0.15)
    half = metrics.surface_distances(sphere, sphere, (1.0, 0.5, 0.5))
    assert half.areas_gt.sum() < 0.5 * sd.areas_gt.sum()
    scores = metrics.score_case(sphere, sphere, spacing)
    assert scores.gt_volume_mm3 == pytest.approx(4 / 3 * math.pi * radius_mm**3, rel=0.03)
    assert scores.gt_volume_mm3 == sphere.sum() * 2.0


def test_concentric_spheres_have_radius_difference_as_distance():
    spacing = (1.0, 1.0, 1.0)
    z, y, x = np.mgrid[0:64, 0:64, 0:64]
    r = np.sqrt((z - 32.0) ** 2 + (y - 32.0) ** 2 + (x - 32.0) ** 2)
    scores = metrics.score_case(r <= 20, r <= 26, spacing)
    # Nearest neighbours on the voxel-corner grid sit up to a voxel closer than the radii differ.
    assert 5.0 <= scores.masd <= 6.0
    assert scores.hd95 == pytest.approx(6.0, abs=1.0)
    assert scores.dice == pytest.approx(2 * 20**3 / (20**3 + 26**3), rel=0.03)


@pytest.mark.parametrize("fill", [False, True])
def test_uniform_prediction_gets_the_challenge_penalty(fill):
    gt = box((10, 20, 30), (2, 2, 2), (5, 8, 9))
    pred = np.full(gt.shape, fill)
    scores = metrics.score_case(gt, pred, (3.0, 1.5, 1.0))
    diagonal = math.sqrt((10 * 3.0) ** 2 + (20 * 1.5) ** 2 + (30 * 1.0) ** 2)
    assert scores.uniform_prediction
    assert (scores.dice, scores.surface_dice) == (0.0, 0.0)
    assert scores.hd95 == pytest.approx(diagonal)
    assert scores.masd == pytest.approx(diagonal)
    assert scores.pred_volume_mm3 == 0.0
    assert scores.gt_volume_mm3 == pytest.approx(3 * 6 * 7 * 4.5)
    swapped = metrics.score_case(gt, pred, (3.0, 1.5, 1.0), convention="xyz")
    assert swapped.hd95 == pytest.approx(math.sqrt(10.0**2 + 30.0**2 + 90.0**2))


def test_prediction_without_ground_truth_tumor_follows_reference():
    gt = np.zeros((8, 10, 10), dtype=bool)
    pred = box(gt.shape, (2, 2, 2), (4, 5, 5))
    scores = metrics.score_case(gt, pred, (3.0, 1.0, 1.0))
    assert scores.dice == 0.0
    assert scores.surface_dice == 0.0
    assert math.isinf(scores.hd95)
    assert math.isnan(scores.masd)


def test_bad_inputs_are_refused():
    gt = np.zeros((4, 4, 4), dtype=bool)
    with pytest.raises(TypeError, match="boolean"):
        metrics.score_case(gt.astype(np.uint8), gt, (1, 1, 1))
    with pytest.raises(ValueError, match="shape"):
        metrics.score_case(gt, np.zeros((4, 4, 5), dtype=bool), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        metrics.score_case(gt, gt, (1, 0, 1))
    with pytest.raises(ValueError, match="convention"):
        metrics.score_case(gt, gt, (1, 1, 1), convention="yxz")


def test_aggregate_excludes_tumor_free_cases_from_means_only():
    cases = [
        metrics.CaseMetrics(0.8, 0.9, 4.0, 1.0, 1000.0, 1100.0, False),
        metrics.CaseMetrics(0.6, 0.7, 8.0, 3.0, 2000.0, 1700.0, False),
        metrics.CaseMetrics(0.0, 0.0, math.inf, math.nan, 0.0, 400.0, False),
    ]
    summary = metrics.aggregate(cases)
    assert summary["dice"] == pytest.approx(0.7)
    assert summary["hd95"] == pytest.approx(6.0)
    assert summary["masd"] == pytest.approx(2.0)
    assert summary["tumor_burden_rmse"] == pytest.approx(math.sqrt((100**2 + 300**2 + 400**2) / 3))
    assert summary["n_without_tumor"] == 1
    assert summary["n_cases"] == 3


def test_bands_of_tumor_volume_hold_their_cases_and_skip_empty_bands():
    def case(dice: float, volume_ml: float) -> metrics.CaseMetrics:
        return metrics.CaseMetrics(dice, dice, 10 * (1 - dice), 1.0, volume_ml * 1000, 0.0, False)

    cases = [case(0.2, 0.5), case(0.4, 1.9), case(0.6, 2.0), case(0.9, 12.0), case(0.0, 0.0)]
    bands = metrics.by_tumor_volume(cases)
    assert [b["band"] for b in bands] == ["under 2 mL", "2 to 5 mL", "10 mL and more"]
    assert [b["n_cases"] for b in bands] == [2, 1, 1]  # the tumor-free case is in none
    assert [b["min_ml"] for b in bands] == [0.0, 2.0, 10.0]
    assert [b["max_ml"] for b in bands] == [2.0, 5.0, None]
    assert bands[0]["dice"] == pytest.approx(0.3) and bands[0]["hd95"] == pytest.approx(7.0)
    assert bands[2]["surface_dice"] == pytest.approx(0.9)
    assert metrics.by_tumor_volume([case(0.0, 0.0)]) == []
    assert [b["band"] for b in metrics.by_tumor_volume(cases, edges_ml=[1.0])] == [
        "under 1 mL",
        "1 mL and more",
    ]
    with pytest.raises(ValueError, match="must rise"):
        metrics.by_tumor_volume(cases, edges_ml=[5.0, 2.0])


def test_ranking_averages_per_metric_ranks():
    summaries = {
        "a": {"dice": 0.7, "surface_dice": 0.9, "hd95": 9.0, "masd": 2.0, "tumor_burden_rmse": 5.0},
        "b": {"dice": 0.6, "surface_dice": 0.9, "hd95": 8.0, "masd": 3.0, "tumor_burden_rmse": 9.0},
        "c": {
            "dice": 0.5,
            "surface_dice": 0.8,
            "hd95": math.nan,
            "masd": 1.0,
            "tumor_burden_rmse": 7.0,
        },
    }
    ranks = metrics.rank_methods(summaries)
    assert ranks["a"] == {
        "dice": 1,
        "surface_dice": 1,
        "hd95": 2,
        "masd": 2,
        "tumor_burden_rmse": 1,
        "mean_rank": 1.4,
    }
    assert ranks["b"]["surface_dice"] == 1
    assert ranks["c"]["hd95"] == 3
    assert ranks["b"]["mean_rank"] == pytest.approx((2 + 1 + 1 + 3 + 3) / 5)
