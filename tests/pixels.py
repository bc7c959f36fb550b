"""Small helpers the parity tests share: pixels as int16, the largest per-pixel difference of two image
lists, and one CPU generator per image (seed + i), as the library and diffusers' tests use them."""
from __future__ import annotations

import numpy as np
import torch


def px(image) -> np.ndarray:
    return np.asarray(image, np.int16)


def max_diff(ours, theirs) -> int:
    assert len(ours) == len(theirs)
    return max(int(np.abs(px(a) - px(b)).max()) for a, b in zip(ours, theirs))


def gens(seed, n):
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
