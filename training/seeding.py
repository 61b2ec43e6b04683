"""Seeds derived from (run seed, purpose, indices), so that every random draw in training is
reproducible on its own: a resumed run, a different number of loader workers or another process
of a distributed run draws exactly what an uninterrupted single-process run would."""

from __future__ import annotations

import random

import numpy as np
import torch


def derived_seed(*parts: int) -> int:
    """A 32-bit seed from any number of integers, via NumPy's SeedSequence (well mixed)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seeds the global generators that library code may use behind our back."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
