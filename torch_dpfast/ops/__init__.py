"""Low-level kernel API: per-example gradient norms, clipped sums, clip factors and noise.

Every op is a ``torch.library`` custom op (``torch.ops.torch_dpfast.*``, traceable by
``torch.compile``) with a pure-PyTorch reference and, where built, faster backends; each takes
``backend="auto" | "reference" | "cpp" | "cuda" | "triton"``. See docs/ops.md.
"""

from ._backend import AUTO_ORDER, BACKENDS, available
from .clip import (
    clip_accumulate_,
    clip_factors,
    per_example_norm_sq,
    scaled_accumulate_,
    total_clip_factors,
)
from .conv import conv_clipped_sum, conv_norm_sq
from .embedding import embedding_clipped_sum, embedding_norm_sq
from .linear import linear_clipped_sum, linear_norm_sq
from .noise import add_noise_

OPS = (
    "linear_norm_sq",
    "linear_clipped_sum",
    "conv_norm_sq",
    "conv_clipped_sum",
    "embedding_norm_sq",
    "embedding_clipped_sum",
    "clip_factors",
    "total_clip_factors",
    "per_example_norm_sq",
    "clip_accumulate_",
    "scaled_accumulate_",
    "add_noise_",
)

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "OPS",
    "add_noise_",
    "available",
    "clip_accumulate_",
    "clip_factors",
    "conv_clipped_sum",
    "conv_norm_sq",
    "embedding_clipped_sum",
    "embedding_norm_sq",
    "linear_clipped_sum",
    "linear_norm_sq",
    "per_example_norm_sq",
    "scaled_accumulate_",
    "total_clip_factors",
]

try:  # the Triton backend registers itself where Triton is installed
    from . import triton as _triton  # noqa: F401
except ImportError:
    pass
