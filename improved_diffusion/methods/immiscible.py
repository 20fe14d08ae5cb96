"""
Immiscible diffusion (Li et al. 2024, "Immiscible Diffusion: Accelerating Diffusion Training
with Noise Assignment", NeurIPS; public code yhli123/Immiscible-Diffusion), a rival for
comparison: --immiscible True.

Before the forward process, the batch's noise tensors are assigned to its images so that the
total image-noise L2 distance is smallest (a linear assignment, scipy's
`linear_sum_assignment`): each image is diffused towards nearby noise. The noise drawn is the
same set of tensors, only paired differently, so its distribution over a batch is unchanged.
Here the assignment is over one rank's batch (docs/methods.md says how the source differs).
"""

import numpy as np
import torch

from ..options.option import Option
from .registry import GROUP, NOISE, Method

ON = Option("immiscible", False, "immiscible diffusion (Li et al. 2024): assign the batch's noise to its images by "
            "minimum total L2 distance (scipy), per rank's batch, for comparison", GROUP)


def _linear_sum_assignment():
    """scipy's solver, imported when the method is switched on (scipy is an optional dependency)."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise ImportError("--immiscible True needs scipy (pip install scipy, or the dev extra: "
                          "pip install -e .[dev])") from None
    return linear_sum_assignment


def distances(x_start, noise):
    """The [N x N] float64 numpy matrix of plain (not squared) L2 distances between image i and
    noise j, flattened, computed in float64 without the matrix-product shortcut."""
    a = x_start.detach().flatten(1).double()
    b = noise.detach().flatten(1).double()
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").cpu().numpy()


def assignment(x_start, noise, solver=None):
    """The permutation `perm` (int64, on the noise's device) minimising sum_i |x_i - noise_perm[i]|:
    image i gets noise[perm[i]]."""
    solver = solver or _linear_sum_assignment()
    _, cols = solver(distances(x_start, noise))  # square: the rows are every image, in order
    return torch.from_numpy(cols.astype(np.int64)).to(noise.device)


def immiscible(on=ON.default):
    """The NOISE step: reorders the noise (and the noise that makes x_t, by the same
    permutation) by the assignment; no random draw, so the RNG stream is as without it."""
    solver = _linear_sum_assignment()

    def assign(x_start, noise, input_noise):
        perm = assignment(x_start, noise, solver)
        return noise[perm], input_noise[perm]

    return assign


METHODS = (Method("immiscible", NOISE, immiscible, options={"on": ON}, switch="on", variant="immiscible"),)
