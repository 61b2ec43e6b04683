"""import-nnunet: a tiny nnU-Net v2 trained model folder (plans, dataset.json, checkpoints in
nnU-Net's format) becomes a model folder: plan.json with nnU-Net's preprocessing and stitching,
ONNX folds that reproduce the PyTorch network, a card naming the source; what our inference
cannot reproduce is refused with the reason."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import training.export as export_module
import training.nnunet_import as nnunet_import
from pantherseg.inference.engines import OnnxEngine
from pantherseg.inference.plan import PLAN_FILE, PlanError, describe_test_time_mirroring, load_plan
from training.__main__ import main
from training.export import ExportError, Parity
from training.nnunet_import import (
    ImportOptions,
    NnunetImportError,
    build_network,
    import_nnunet,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FOLDER = "nnUNetTrainer__nnUNetPlans__3d_fullres"
# The PANTHER organisers' baseline plans.json (3d_fullres), with a patch and a network small enough
# for a test: three stages of 4, 8 and 16 features (about 10k parameters).
CONFIGURATION = {
    "data_identifier": "nnUNetPlans_3d_fullres",
    "preprocessor_name": "DefaultPreprocessor",
    "batch_size": 2,
    "patch_size": [8, 32, 32],
    "median_image_size_in_voxels": [72.0, 258.0, 318.0],
    "spacing": [3.0, 1.1875, 1.1875],
    "normalization_schemes": ["ZScoreNormalization"],
    "use_mask_for_norm": [True],
    "resampling_fn_data": "resample_data_or_seg_to_shape",
    "resampling_fn_seg": "resample_data_or_seg_to_shape",
    "resampling_fn_data_kwargs": {
        "is_seg": False,
        "order": 3,
        "order_z": 0,
        "force_separate_z": None,
    },
    "resampling_fn_seg_kwargs": {
        "is_seg": True,
        "order": 1,
        "order_z": 0,
        "force_separate_z": None,
    },
    "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
    "resampling_fn_probabilities_kwargs": {
        "is_seg": False,
        "order": 1,
        "order_z": 0,
        "force_separate_z": None,
    },
    "architecture": {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": 3,
            "features_per_stage": [4, 8, 16],
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
            "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
            "n_conv_per_stage": [1, 1, 1],
            "n_conv_per_stage_decoder": [1, 1],
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    },
    "batch_dice": False,
}
PLANS = {
    "dataset_name": "Dataset094_PantherTask1",
    "plans_name": "nnUNetPlans",
    "image_reader_writer": "SimpleITKIO",
    "transpose_forward": [0, 2, 1],  # not the identity, so the test sees it carried over
    "transpose_backward": [0, 2, 1],
    "configurations": {"3d_fullres": CONFIGURATION},
    "experiment_planner_used": "ExperimentPlanner",
    "label_manager": "LabelManager",
    "foreground_intensity_properties_per_channel": {
        "0": {"max": 914.0, "mean": 207.1, "median": 197.0, "min": 0.0, "std": 87.6}
    },
}
DATASET = {
    "channel_names": {"0": "MRI"},
    "labels": {"background": 0, "tumor": 1, "pancreas": 2},
    "numTraining": 92,
    "file_ending": ".mha",
}


def tiny_network(architecture=CONFIGURATION["architecture"], seed=0):
    torch.manual_seed(seed)
    return build_network(architecture, 1, 3, Path("plans.json"))


def residual_encoder():
    """nnU-Net's residual encoder presets name another class, with blocks instead of convs."""
    architecture = copy.deepcopy(CONFIGURATION["architecture"])
    architecture["network_class_name"] = (
        "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    )
    kwargs = architecture["arch_kwargs"]
    kwargs["n_blocks_per_stage"] = kwargs.pop("n_conv_per_stage")
    return architecture


def write_folder(
    root,
    plans=PLANS,
    dataset=DATASET,
    folds=("0",),
    mirror_axes=(0, 1, 2),
    prefix="",
    name=FOLDER,
    checkpoint="checkpoint_final.pth",
    architecture=None,
):
    """An nnU-Net trained model folder; the fold networks (by default of the plans' 3d_fullres
    architecture), seeded by their fold index."""
    folder = root / "Dataset094_PantherTask1" / name
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    networks = {}
    for index, fold in enumerate(folds):
        network = tiny_network(
            architecture or plans["configurations"]["3d_fullres"]["architecture"], seed=index
        )
        axes = mirror_axes[index] if isinstance(mirror_axes, list) else mirror_axes
        (folder / f"fold_{fold}").mkdir()
        torch.save(
            {
                "network_weights": {prefix + k: v for k, v in network.state_dict().items()},
                "optimizer_state": {},
                "current_epoch": 1000,
                "init_args": {"configuration": "3d_fullres", "fold": index, "plans": plans},
                "trainer_name": "nnUNetTrainer",
                "inference_allowed_mirroring_axes": axes,
            },
            folder / f"fold_{fold}" / checkpoint,
        )
        networks[fold] = network
    return folder, networks


def with_configuration(**changes):
    plans = copy.deepcopy(PLANS)
    plans["configurations"]["3d_fullres"].update(changes)
    return plans


def test_import_translates_the_plans_and_exports_every_fold(tmp_path):
    # fold 1 was saved from a torch.compile'd DDP network: its keys carry both wrappers' prefixes;
    # fold_all (trained on every case) ships only when asked for, as in nnU-Net's predictor
    folder, networks = write_folder(tmp_path, folds=("0", "1", "all"))
    state = torch.load(folder / "fold_1" / "checkpoint_final.pth", weights_only=False)
    state["network_weights"] = {
        f"module._orig_mod.{k}": v for k, v in state["network_weights"].items()
    }
    torch.save(state, folder / "fold_1" / "checkpoint_final.pth")
    model = tmp_path / "model"
    assert main(["import-nnunet", str(folder), "--out", str(model)]) == 0

    plan = load_plan(model)  # validates, and checks every fold's sha256
    pre, inf, post = plan.preprocessing, plan.inference, plan.postprocessing
    assert pre.fixed_transpose == (0, 2, 1)
    assert pre.target_spacing_zyx == (3.0, 1.1875, 1.1875) and pre.crop_to_nonzero
    assert (pre.normalization.scheme, pre.normalization.clip_percentiles) == ("zscore", None)
    assert pre.normalization.nonzero_only  # use_mask_for_norm
    r = pre.resampling
    assert (r.image_order, r.through_plane_order) == (3, 0)
    assert (r.probability_order, r.probability_through_plane_order) == (1, 0)
    assert r.anisotropy_threshold == 3.0 and r.clip_image
    assert inf.patch_size_zyx == (8, 32, 32) and inf.tile_step == 0.5
    assert inf.gaussian_sigma_scale == 0.125 and inf.batch_size == 1
    assert inf.mirror_axes == (0, 1, 2) and inf.test_time_mirroring
    assert inf.classes == ("background", "tumor", "pancreas") and inf.activation == "softmax"
    assert (inf.stitching, inf.restore) == ("nnunet", "logits")
    assert [f.file for f in inf.folds] == ["fold_0.onnx", "fold_1.onnx"]
    assert inf.precision in ("float32", "float16")
    assert (post.decision, post.min_component_mm3, post.never_empty) == ("argmax", 0.0, True)
    assert not post.pancreas_guidance.enabled
    assert plan.task == "task1" and plan.input_socket == "abdominal-t1-mri"

    # Each ONNX fold gives its PyTorch network's logits.
    batch = np.random.default_rng(7).standard_normal((2, 1, 8, 32, 32)).astype(np.float32)
    for fold in ("0", "1"):
        network = networks[fold]
        onnx_logits = OnnxEngine(model / f"fold_{fold}.onnx", device="cpu")(batch)
        with torch.no_grad():
            expected = network(torch.from_numpy(batch)).numpy()
        assert onnx_logits.shape == (2, 3, 8, 32, 32)
        np.testing.assert_allclose(onnx_logits, expected, atol=1e-4 * np.abs(expected).max())

    metadata = json.loads((model / "metadata.json").read_text())
    source = metadata["source"]
    assert source["folder"] == FOLDER and source["dataset"] == "Dataset094_PantherTask1"
    assert (source["trainer"], source["plans"], source["configuration"]) == (
        "nnUNetTrainer",
        "nnUNetPlans",
        "3d_fullres",
    )
    assert source["folds"] == ["0", "1"] and source["checkpoint"] == "checkpoint_final.pth"
    assert source["plans_sha256"] == nnunet_import.sha256_of(folder / "plans.json")
    export = metadata["export"]
    assert set(export["max_relative_difference"]) == {"fold_0.onnx", "fold_1.onnx"}
    assert all(0 <= v <= 1e-4 for v in export["max_relative_difference"].values())
    half = export["float16_max_relative_difference"]
    assert inf.precision == ("float16" if max(half.values()) <= 1e-2 else "float32")
    assert "dynamic_network_architectures" in metadata["versions"]
    card = (model / "README.md").read_text()
    assert FOLDER in card and "Dataset094_PantherTask1" in card and "Intended use" in card
    mirroring = describe_test_time_mirroring(inf)
    assert f"\n- Test-time mirroring: {mirroring} (as nnU-Net's predictor" in card
    for shipped in ("metadata.json", "README.md", PLAN_FILE):
        assert str(tmp_path) not in (model / shipped).read_text()


def test_options_choose_folds_checkpoint_labels_and_post_processing(tmp_path):
    dataset = {**DATASET, "labels": {"background": 0, "pancreas": 1, "lesion": 2}}
    folder, _ = write_folder(
        tmp_path, dataset=dataset, folds=("0", "3"), checkpoint="checkpoint_best.pth"
    )
    options = ImportOptions(
        folds=("3",),
        checkpoint="best",
        task="task2",
        tile_step=0.25,
        test_time_mirroring=False,
        tumor_label="lesion",
        pancreas_label="pancreas",
        threshold=0.3,
        min_component_mm3=50.0,
        pancreas_guidance=True,
        never_empty=False,
    )
    plan = import_nnunet(folder, tmp_path / "model", options)
    assert [f.file for f in plan.inference.folds] == ["fold_3.onnx"]
    assert plan.inference.classes == ("background", "pancreas", "tumor")
    assert plan.inference.tile_step == 0.25 and not plan.inference.test_time_mirroring
    assert plan.inference.mirror_axes == (0, 1, 2)
    post = plan.postprocessing
    assert (post.decision, post.threshold, post.min_component_mm3) == ("threshold", 0.3, 50.0)
    assert post.pancreas_guidance.enabled and not post.never_empty
    assert plan.task == "task2" and plan.input_socket == "abdominal-t2-mri"
    metadata = json.loads((tmp_path / "model" / "metadata.json").read_text())
    assert metadata["source"]["checkpoint"] == "checkpoint_best.pth"


def test_inherited_configuration_no_normalisation_and_untrained_mirroring(tmp_path):
    plans = with_configuration(normalization_schemes=["NoNormalization"], use_mask_for_norm=[False])
    plans["configurations"]["3d_small"] = {"inherits_from": "3d_fullres", "patch_size": [8, 16, 16]}
    folder, _ = write_folder(tmp_path, plans=plans, mirror_axes=None, name="T__P__3d_small")
    # The checkpoint says 3d_fullres: nnU-Net's predictor would build that configuration.
    with pytest.raises(NnunetImportError, match="trained with configuration '3d_fullres'"):
        import_nnunet(folder, tmp_path / "model", ImportOptions())
    assert not list((tmp_path / "model").glob("*.onnx"))
    plan = import_nnunet(folder, tmp_path / "model", ImportOptions(configuration="3d_fullres"))
    assert plan.preprocessing.normalization.scheme == "none"
    assert plan.inference.mirror_axes == () and not plan.inference.test_time_mirroring
    small = nnunet_import.translate_plan(
        plans,
        nnunet_import.resolve_configuration(plans, "3d_small", folder),
        "3d_small",
        DATASET,
        ImportOptions(),
        folder,
    )
    assert small.inference.patch_size_zyx == (8, 16, 16)
    assert small.preprocessing.target_spacing_zyx == (3.0, 1.1875, 1.1875)


def test_any_network_class_the_plans_name(tmp_path):
    folder, networks = write_folder(
        tmp_path, plans=with_configuration(architecture=residual_encoder())
    )
    plan = import_nnunet(folder, tmp_path / "model", ImportOptions())
    batch = np.random.default_rng(0).standard_normal((1, 1, 8, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = networks["0"](torch.from_numpy(batch)).numpy()
    onnx_logits = OnnxEngine(tmp_path / "model" / plan.inference.folds[0].file, device="cpu")(batch)
    np.testing.assert_allclose(onnx_logits, expected, atol=1e-4 * np.abs(expected).max())
    metadata = json.loads((tmp_path / "model" / "metadata.json").read_text())
    assert metadata["source"]["network"].endswith(".ResidualEncoderUNet")
    # Measured, average pooling included (emulated: PyTorch's CPU has no float16 pooling).
    half = metadata["export"]["float16_max_relative_difference"]["fold_0.onnx"]
    assert half > 0 and plan.inference.precision == ("float16" if half <= 1e-2 else "float32")


def unknown_network():
    architecture = copy.deepcopy(CONFIGURATION["architecture"])
    architecture["network_class_name"] = "dynamic_network_architectures.NoSuchUNet"
    return with_configuration(architecture=architecture)


def cascade():
    plans = copy.deepcopy(PLANS)
    plans["configurations"]["3d_cascade_fullres"] = {
        "inherits_from": "3d_fullres",
        "previous_stage": "3d_lowres",
    }
    return plans


REFUSED = {
    "cascade": (
        {"plans": cascade(), "name": "T__P__3d_cascade_fullres"},
        "cascade stage",
    ),
    "2d": ({"plans": with_configuration(patch_size=[32, 32])}, r"only 3D configurations"),
    "regions": (
        {"dataset": {**DATASET, "labels": {"background": 0, "whole": [1, 2], "tumor": 2}}},
        r"region-based labels \(whole\)",
    ),
    "region order": (
        {"dataset": {**DATASET, "regions_class_order": [1, 2]}},
        "region-based training",
    ),
    "channels": (
        {"dataset": {**DATASET, "channel_names": {"0": "T1", "1": "T2"}}},
        "2 input channels",
    ),
    "extra label": (
        {"dataset": {**DATASET, "labels": {**DATASET["labels"], "vessel": 3}}},
        r"label\(s\) 'vessel' \(3\) are neither",
    ),
    "ct normalisation": (
        {"plans": with_configuration(normalization_schemes=["CTNormalization"])},
        "CTNormalization",
    ),
    "resampling function": (
        {"plans": with_configuration(resampling_fn_data="resample_torch_fornnunet")},
        "resampling_fn_data 'resample_torch_fornnunet'",
    ),
    "forced separate z": (
        {
            "plans": with_configuration(
                resampling_fn_probabilities_kwargs={"order": 1, "force_separate_z": True}
            )
        },
        "force_separate_z is True",
    ),
    "mirror axes differ": (
        {"folds": ("0", "1"), "mirror_axes": [(0, 1, 2), (1, 2)]},
        r"mirror axes \[1, 2\], the folds before it with \[0, 1, 2\]",
    ),
    "weights of another network": ({"prefix": "backbone."}, "the weights do not fit the network"),
    "unknown network class": (
        {"plans": unknown_network(), "architecture": CONFIGURATION["architecture"]},
        r"network class 'dynamic_network_architectures\.NoSuchUNet' not found",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refusals_name_the_problem_and_leave_no_model(tmp_path, case):
    kwargs, message = REFUSED[case]
    folder, _ = write_folder(tmp_path, **kwargs)
    model = tmp_path / "model"
    with pytest.raises(NnunetImportError, match=message):
        import_nnunet(folder, model, ImportOptions())
    assert not model.exists() or not any(model.iterdir())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"folds": ("0", "4")}, r"not found: .*fold_4/checkpoint_final\.pth"),
        ({"checkpoint": "best"}, r"not found: .*fold_0/checkpoint_best\.pth"),
        ({"pancreas_label": "tumor"}, "both the tumor and the pancreas"),
        ({"tumor_label": "liver"}, "no foreground label 'liver' for the tumor"),
    ],
)
def test_option_refusals(tmp_path, options, message):
    folder, _ = write_folder(tmp_path)
    with pytest.raises(NnunetImportError, match=message):
        import_nnunet(folder, tmp_path / "model", ImportOptions(**options))


def test_pancreas_guidance_needs_a_pancreas_and_options_are_checked_before_export(tmp_path):
    dataset = {**DATASET, "labels": {"background": 0, "tumor": 1}}
    folder, _ = write_folder(tmp_path, dataset=dataset)
    with pytest.raises(NnunetImportError, match="--pancreas-guidance needs a pancreas label"):
        import_nnunet(folder, tmp_path / "model", ImportOptions(pancreas_guidance=True))
    with pytest.raises(PlanError, match=r"threshold must be in \(0, 1\)"):
        import_nnunet(folder, tmp_path / "model", ImportOptions(threshold=1.5))
    assert not (tmp_path / "model").exists()


def test_a_failed_parity_removes_the_folds_already_written(tmp_path, monkeypatch):
    folder, _ = write_folder(tmp_path, folds=("0", "1"))
    real = export_module.parity
    calls = []

    def second_fold_differs(network, path, batches):
        calls.append(path.name)
        return Parity(1.0, 0.1) if len(calls) == 2 else real(network, path, batches)

    monkeypatch.setattr(export_module, "parity", second_fold_differs)
    model = tmp_path / "model"
    with pytest.raises(ExportError, match=r"fold_1.*differs from PyTorch by 0\.1"):
        import_nnunet(folder, model, ImportOptions())
    assert calls == ["fold_0.onnx", "fold_1.onnx"]
    assert not list(model.iterdir())


def test_cli_reports_a_refusal_in_one_line(tmp_path, capsys):
    folder, _ = write_folder(tmp_path, name="not_an_nnunet_name")
    assert main(["import-nnunet", str(folder), "--out", str(tmp_path / "model")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--configuration" in error


def test_the_network_matches_nnunets_own_builder():
    """Our rebuild of the architecture is nnU-Net's: same tensors, same shapes."""
    from nnunetv2 import configuration
    from nnunetv2.utilities import get_network_from_plans as plans_module

    architecture = CONFIGURATION["architecture"]
    theirs = plans_module.get_network_from_plans(
        architecture["network_class_name"],
        architecture["arch_kwargs"],
        architecture["_kw_requires_import"],
        1,
        3,
        deep_supervision=False,
    )
    ours = tiny_network()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    assert nnunet_import.ANISO_THRESHOLD == configuration.ANISO_THRESHOLD


def test_the_imported_model_segments_like_nnunets_own_predictor(tmp_path):
    """The acceptance test of the translation: our container's pipeline on the imported folds gives
    nnU-Net's own tumor mask, on a grid whose thick axis is resampled on its own."""
    from nnunetv2.inference import predict_from_raw_data as predictor_module

    from pantherseg.inference.pipeline import Segmenter

    folder, _ = write_folder(tmp_path, folds=("0", "1"))
    import_nnunet(folder, tmp_path / "model", ImportOptions())
    rng = np.random.default_rng(0)
    image = np.zeros((20, 60, 50), np.float32)
    image[2:18, 5:55, 4:46] = rng.random((16, 50, 42)) * 100 + 10  # a body in an empty field
    spacing = (6.0, 0.8, 0.9)
    ours = Segmenter.from_model_dir(tmp_path / "model", device="cpu").segment(
        image, spacing, (1, 0, 0, 0, 1, 0, 0, 0, 1)
    )
    predictor = predictor_module.nnUNetPredictor(
        perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False
    )
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=("0", "1"))
    theirs = predictor.predict_single_npy_array(image[None], {"spacing": list(spacing)})
    assert 0 < (theirs == 1).sum() < theirs.size
    np.testing.assert_array_equal(ours.mask, (theirs == 1).astype(np.uint8))
