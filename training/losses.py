"""Training losses, chosen by name in the training YAML (`loss.name`), with deep supervision.

Targets are label volumes (B, 1, Z, Y, X) of integers: 0 background, 1 tumor, 2 pancreas (the
dataset's values, `pantherseg.inference.plan.KNOWN_CLASSES` order). A sigmoid network (one
channel) learns tumor vs. the rest; a softmax network learns the plan's `classes`, a label whose
class the plan does not list counting as background.

- `dice_focal_boundary` (the user's loss, default 0.6 / 0.3 / 0.1): batch soft Dice, focal loss
  (gamma 2) and the boundary loss of Kervadec et al. Axial slices (along z) that contain tumor weigh
  `tumor_slice_weight` times more, in all three terms.
- `dice_ce`: nnU-Net's Dice + cross-entropy (MONAI's DiceCELoss), no slice weights: the reference.
- `tversky_ce`: `dice_ce` with the Dice term replaced by MONAI's Tversky loss, false negatives
  weighing `false_negative_weight` and false positives the rest (0.5 each is Dice): for a model
  that under-segments, as the CPU demo models do.

With deep supervision the network returns a list of logits, finest first; the label is max-pooled
to each output's size with tumor first, so a tumor smaller than a coarse voxel still marks that
voxel (nearest-neighbour sampling would drop it), and the level losses are summed with weights
decaying by `deep_supervision_decay` per level, normalised to sum 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as nnf
from monai.losses import DiceCELoss, TverskyLoss
from scipy.ndimage import distance_transform_edt
from torch import nn

from pantherseg.inference.plan import KNOWN_CLASSES, Plan
from training.config import LossConfig

TUMOR = KNOWN_CLASSES.index("tumor")
PANCREAS = KNOWN_CLASSES.index("pancreas")
Spacing = Sequence[float]


def class_lookup(classes: Sequence[str]) -> torch.Tensor:
    """Output channel of each label value for a softmax network: `lookup[label]`."""
    if "background" not in classes:
        raise ValueError(f"a softmax network needs a 'background' class, got {tuple(classes)}")
    background = classes.index("background")
    return torch.tensor(
        [classes.index(name) if name in classes else background for name in KNOWN_CLASSES]
    )


def tumor_slice_weights(target: torch.Tensor, weight: float) -> torch.Tensor:
    """(B, 1, Z, 1, 1) weights: `weight` for axial slices holding tumor, 1 elsewhere. Tumor is
    rare; its slices are where the boundary decisions are made."""
    has_tumor = (target == TUMOR).flatten(3).any(dim=3, keepdim=True).unsqueeze(-1)
    return 1.0 + (weight - 1.0) * has_tumor.float()


def signed_distance(mask: np.ndarray, spacing: Spacing) -> np.ndarray:
    """Signed distance to the mask's surface, in mm (so a 3 mm slice counts as 3 mm), negative
    inside, positive outside, divided by its largest magnitude so it lies in [-1, 1] whatever the
    patch size and the term stays on the scale of Dice and focal. All zeros when the mask is empty
    or full (no surface): such a sample adds nothing to the boundary term."""
    if not mask.any() or mask.all():
        return np.zeros(mask.shape, np.float32)
    result = distance_transform_edt(~mask, sampling=spacing).astype(np.float32)
    # The inside distance only needs the mask's bounding box plus one voxel: the nearest
    # background voxel of an inside voxel is always found there.
    box = tuple(slice(max(int(idx.min()) - 1, 0), int(idx.max()) + 2) for idx in np.nonzero(mask))
    result[box] -= distance_transform_edt(mask[box], sampling=spacing).astype(np.float32)
    return result / np.abs(result).max()


def downsample_labels(target: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Label volume at `size` by max-pooling each class, tumor over pancreas over background: a
    coarse voxel is tumor if any of its fine voxels is."""
    if tuple(target.shape[2:]) == tuple(size):
        return target
    out = torch.zeros((*target.shape[:2], *size), dtype=target.dtype, device=target.device)
    for value in (PANCREAS, TUMOR):  # later wins
        pooled = nnf.adaptive_max_pool3d((target == value).float(), tuple(size)) > 0
        out[pooled] = value
    return out


def deep_supervision_weights(levels: int, decay: float) -> list[float]:
    """Weight of each output, finest first: decay**level, normalised to sum 1."""
    raw = [decay**level for level in range(levels)]
    return [w / sum(raw) for w in raw]


class DiceFocalBoundaryLoss(nn.Module):
    """dice_weight * soft Dice + focal_weight * focal + boundary_weight * boundary, all weighted
    per voxel by the tumor-slice weights.

    - Dice: batch-level (sums over the whole batch, as nnU-Net's batch Dice), smooth 1, weighted
      (each voxel's contribution to intersection and sizes multiplied by its weight), averaged
      over the foreground channels (background excluded for softmax).
    - Focal: -(1 - p_t)^gamma log p_t with p_t the probability of the true class (sigmoid or
      softmax), weighted mean over voxels.
    - Boundary: weighted mean of foreground probability times `signed_distance` of the target
      (computed on the CPU with SciPy, per sample and class), averaged over foreground channels.
      Its minimum is negative: probability 1 exactly inside the target. Cost: about 0.15 s
      per tumor-containing 48x192x224 patch and class (SciPy EDT); empty patches cost nothing.
    """

    def __init__(
        self,
        activation: str = "sigmoid",
        classes: Sequence[str] = ("tumor",),
        dice_weight: float = 0.6,
        focal_weight: float = 0.3,
        boundary_weight: float = 0.1,
        tumor_slice_weight: float = 2.0,
        spacing: Spacing = (1.0, 1.0, 1.0),
        gamma: float = 2.0,
        smooth: float = 1.0,
    ) -> None:
        super().__init__()
        if activation not in ("sigmoid", "softmax"):
            raise ValueError(f"activation must be 'sigmoid' or 'softmax', not {activation!r}")
        self.activation = activation
        self.weights = {"dice": dice_weight, "focal": focal_weight, "boundary": boundary_weight}
        self.tumor_slice_weight = tumor_slice_weight
        self.spacing = tuple(float(s) for s in spacing)
        self.gamma = gamma
        self.smooth = smooth
        if activation == "softmax":
            self.register_buffer("lookup", class_lookup(classes), persistent=False)
            self.foreground = [i for i, name in enumerate(classes) if name != "background"]
        else:
            self.lookup = None
            self.foreground = [0]

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, spacing: Spacing | None = None
    ) -> torch.Tensor:
        wanted = [name for name, weight in self.weights.items() if weight != 0]
        terms = self.components(logits, target, spacing, wanted)
        total = logits.new_zeros((), dtype=torch.float32)
        for name in wanted:
            total = total + self.weights[name] * terms[name]
        return total

    def components(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        spacing: Spacing | None = None,
        which: Sequence[str] = ("dice", "focal", "boundary"),
    ) -> dict[str, torch.Tensor]:
        """The unweighted terms, for logging and tests. `spacing` is the target's voxel size
        (deep supervision passes each coarser level's own)."""
        logits = logits.float()  # the loss in float32 even under mixed precision
        target = target.to(logits.device)
        weights = tumor_slice_weights(target, self.tumor_slice_weight).expand(
            target.shape[0], 1, *target.shape[2:]
        )
        if self.lookup is None:
            truth = (target == TUMOR).float()  # (B, 1, ...)
            probs = torch.sigmoid(logits)
            log_pt = nnf.logsigmoid(logits * (2 * truth - 1))
        else:
            # (B, 1, ...) channel per voxel; the lookup follows the target even if the loss
            # module was never moved to the GPU.
            index = self.lookup.to(target.device)[target.long()]
            truth = torch.zeros_like(logits).scatter_(1, index, 1.0)
            probs = torch.softmax(logits, dim=1)
            log_pt = torch.gather(nnf.log_softmax(logits, dim=1), 1, index)
        total_weight = weights.sum()
        terms: dict[str, torch.Tensor] = {}
        fg_probs, fg_truth = probs[:, self.foreground], truth[:, self.foreground]
        if "dice" in which:
            dims = (0, 2, 3, 4)
            intersection = (weights * fg_probs * fg_truth).sum(dims)
            sizes = (weights * fg_probs).sum(dims) + (weights * fg_truth).sum(dims)
            dice = (2 * intersection + self.smooth) / (sizes + self.smooth)
            terms["dice"] = 1 - dice.mean()
        if "focal" in which:
            focal = -((1 - log_pt.exp()) ** self.gamma) * log_pt
            terms["focal"] = (weights * focal).sum() / total_weight
        if "boundary" in which:
            distance = self._distance_maps(fg_truth, spacing or self.spacing)
            per_channel = (weights * fg_probs * distance).sum(dim=(0, 2, 3, 4)) / total_weight
            terms["boundary"] = per_channel.mean()
        return terms

    @staticmethod
    def _distance_maps(truth: torch.Tensor, spacing: Spacing) -> torch.Tensor:
        masks = truth.detach().cpu().numpy() > 0.5
        maps = np.stack(
            [
                np.stack([signed_distance(masks[b, c], spacing) for c in range(masks.shape[1])])
                for b in range(masks.shape[0])
            ]
        )
        return torch.from_numpy(maps).to(truth.device)


class DiceCE(nn.Module):
    """nnU-Net's loss: batch Dice (foreground channels) + cross-entropy (BCE for one channel),
    equal weights, via MONAI's DiceCELoss with its default smoothing. With
    `false_negative_weight` other than 0.5 the Dice term becomes MONAI's batch Tversky loss
    (alpha = 1 - weight for false positives, beta = weight for false negatives), plus the same
    cross-entropy."""

    def __init__(
        self,
        activation: str = "sigmoid",
        classes: Sequence[str] = ("tumor",),
        false_negative_weight: float = 0.5,
    ) -> None:
        super().__init__()
        if not 0.0 < false_negative_weight < 1.0:
            raise ValueError(
                f"false_negative_weight must lie strictly between 0 and 1, not "
                f"{false_negative_weight}"
            )
        self.activation = activation
        if activation == "sigmoid":
            self.lookup = None
            overlap = {"sigmoid": True}
        elif activation == "softmax":
            self.register_buffer("lookup", class_lookup(classes), persistent=False)
            background = self.lookup[0].item()
            if background != 0:
                raise ValueError("dice_ce expects 'background' as the first softmax class")
            overlap = {"softmax": True, "to_onehot_y": True, "include_background": False}
        else:
            raise ValueError(f"activation must be 'sigmoid' or 'softmax', not {activation!r}")
        # Exactly one of the two: MONAI's DiceCELoss (nnU-Net's loss, as shipped), or Tversky
        # with the cross-entropy computed in `forward`.
        self.loss: DiceCELoss | None = None
        self.tversky: TverskyLoss | None = None
        if false_negative_weight == 0.5:
            self.loss = DiceCELoss(batch=True, **overlap)
        else:
            self.tversky = TverskyLoss(
                alpha=1.0 - false_negative_weight,
                beta=false_negative_weight,
                batch=True,
                **overlap,
            )

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, spacing: Spacing | None = None
    ) -> torch.Tensor:
        logits = logits.float()
        target = target.to(logits.device)
        if self.lookup is None:
            target = (target == TUMOR).float()
        else:
            target = self.lookup.to(target.device)[target.long()]
        if self.loss is not None:
            return self.loss(logits, target)
        if self.lookup is None:
            cross_entropy = nnf.binary_cross_entropy_with_logits(logits, target)
        else:
            cross_entropy = nnf.cross_entropy(logits, target[:, 0].long())
        return self.tversky(logits, target) + cross_entropy


class DeepSupervisedLoss(nn.Module):
    """Applies a loss to one output, or to a list of outputs (finest first) against the label
    max-pooled to each output's size, with weights `deep_supervision_weights`."""

    def __init__(self, loss: nn.Module, decay: float = 0.5, spacing: Spacing = (1.0, 1.0, 1.0)):
        super().__init__()
        self.loss = loss
        self.decay = decay
        self.spacing = tuple(float(s) for s in spacing)

    def forward(
        self, outputs: torch.Tensor | list[torch.Tensor], target: torch.Tensor
    ) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target, spacing=self.spacing)
        full = outputs[0].shape[2:]
        if tuple(full) != tuple(target.shape[2:]):
            raise ValueError(
                f"the first output {tuple(full)} must have the label's size "
                f"{tuple(target.shape[2:])}"
            )
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for weight, output in zip(
            deep_supervision_weights(len(outputs), self.decay), outputs, strict=True
        ):
            size = output.shape[2:]
            spacing = [s * f / c for s, f, c in zip(self.spacing, full, size, strict=True)]
            total = total + weight * self.loss(
                output, downsample_labels(target, size), spacing=spacing
            )
        return total


LOSSES = ("dice_focal_boundary", "dice_ce", "tversky_ce")


def build_loss(config: LossConfig, plan: Plan) -> nn.Module:
    """The loss named in `config` for the plan's output activation and classes, wrapped for deep
    supervision (a single tensor passes straight through)."""
    activation, classes = plan.inference.activation, plan.inference.classes
    if config.name == "dice_focal_boundary":
        loss: nn.Module = DiceFocalBoundaryLoss(
            activation,
            classes,
            dice_weight=config.dice_weight,
            focal_weight=config.focal_weight,
            boundary_weight=config.boundary_weight,
            tumor_slice_weight=config.tumor_slice_weight,
            spacing=plan.preprocessing.target_spacing_zyx,
        )
    elif config.name == "dice_ce":
        loss = DiceCE(activation, classes)
    elif config.name == "tversky_ce":
        loss = DiceCE(activation, classes, config.false_negative_weight)
    else:
        raise ValueError(f"unknown loss {config.name!r}; choose one of {', '.join(LOSSES)}")
    return DeepSupervisedLoss(
        loss, config.deep_supervision_decay, plan.preprocessing.target_spacing_zyx
    )
