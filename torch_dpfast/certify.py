"""Certified per-example norms for the fast paths (ghost/direct norm + book-keeping sum).

A fast path computes example i's squared norm n_i of a layer's gradient G_i without forming G_i,
and adds c_i G_i inside one GEMM over all rows. Both are rounded: an example crafted to cancel
(x_1 = M u, x_2 = -M u + d v) makes a float32 ghost norm negative or tiny while G_i is not, and
its huge terms c_i g_t a_t^T make the GEMM's rounding error exceed C. Neither can be seen from
n_i alone; both are bounded by U_i = sum_t ||g_it|| ||a_it|| (the rule's ``norm_bound``, a sum
of non-negative terms, so it has no cancellation):

* the rounding error of n_i is at most about gamma * U_i^2, and that of c_i G_i inside the
  GEMM about gamma * c_i U_i, with gamma a small multiple of the unit roundoff u;
* so n_i is trusted when it is finite, positive and U_i^2 <= n_i * RELATIVE_ERROR /
  (ROUNDING_MARGIN * u): then the norm errs by at most RELATIVE_ERROR relative, and the GEMM
  adds at most ~sqrt(RELATIVE_ERROR * u / ROUNDING_MARGIN) * C to the clipped sum;
* an untrusted example is recomputed exactly for that layer: its per-example gradient in
  float64, its norm from those very numbers (a sum of squares), and its clipped contribution
  added from them; the GEMM leaves it out (scale 0). The added vector then has exactly the norm
  that was clipped, whatever the input: no magnitude or cancellation can raise it above C.

Under the reduced precisions (``dpf.set_precision("tf32" | "bf16")``) the kernels round their
float32 inputs to u_in = 2^-11 or 2^-8 first, which moves G_i by up to 2 u_in U_i: the norm used
for clipping is ||G_i|| + 2 u_in U_i, an upper bound of what the GEMM adds.

ROUNDING_MARGIN: measured errors of the float32 ghost and direct norms on ViT-S/16 and
ResNet-18 layers stay below 6 u (U_i / ||G_i||)^2; the margin is 16 u. Measured honest ratios
U_i / ||G_i|| are below 25 there (certified up to 32 in float32): honest examples are never
recomputed; crafted ones are (docs/security.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import ops
from .precision import get_precision
from .rules import scaled_sum

RELATIVE_ERROR = 1e-3  # the largest relative error of a certified squared norm (norm: half)
ROUNDING_MARGIN = 16.0
INPUT_ROUNDOFF = {"ieee": 0.0, "tf32": 2.0**-11, "bf16": 2.0**-8}


def unit_roundoff(dtype: torch.dtype) -> float:
    """u of the kernels' accumulation: float64 for float64 inputs, else float32."""
    return 2.0**-53 if dtype == torch.float64 else 2.0**-24


def input_roundoff(dtype: torch.dtype) -> float:
    """u_in of the rounding the precision setting applies to float32 kernel inputs."""
    return INPUT_ROUNDOFF[get_precision()] if dtype == torch.float32 else 0.0


@dataclass
class Exact:
    """One layer's gradients of the examples that were recomputed: ``rows`` (k,) indices,
    ``grads`` {name: (k, *param.shape) float64}."""

    rows: Tensor
    grads: dict[str, Tensor]

    def sums(self, scale: Tensor) -> dict[str, Tensor]:
        """{name: sum_k scale[rows_k] grads[k]} (float64); examples with scale 0 are left out
        exactly."""
        factors = scale[self.rows.to(scale.device)].to(torch.float64)
        return {
            name: scaled_sum(grad.to(factors.device), factors) for name, grad in self.grads.items()
        }

    def without(self, scale: Tensor) -> Tensor:
        """``scale`` with the recomputed rows set to 0 (the fast sum must leave them out)."""
        scale = scale.clone()
        scale[self.rows.to(scale.device)] = 0
        return scale


def untrusted(norm_sq: Tensor, bound: Tensor, dtype: torch.dtype) -> Tensor:
    """(B,) bool: the fast-path squared norms that cannot be certified against the bound."""
    bound = bound.to(norm_sq.device)
    limit = RELATIVE_ERROR / (ROUNDING_MARGIN * unit_roundoff(dtype))
    n = norm_sq.to(torch.float64)
    trusted = torch.isfinite(n) & (bound.square() <= limit * n)
    return ~trusted & (bound != 0)  # U_i = 0: every term is 0, and so is n_i, exactly


def check(record, x, g, norm_sq: Tensor, bound: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(norm_sq with the reduced-precision allowance added, the untrusted rows) of one layer
    call on inputs ``x`` and output gradients ``g``; ``bound``: the rule's ``norm_bound``
    where the norm's kernel computed it too (Rule.norm_sq_and_bound). A rule without
    ``norm_bound`` computes its norm from materialised per-example gradients (Rule.norm_sq's
    default), the same numbers its clipped sum adds up: nothing to certify (no row untrusted)."""
    if not hasattr(record.rule, "norm_bound"):
        return norm_sq, torch.zeros(norm_sq.shape, dtype=torch.bool, device=norm_sq.device)
    if bound is None:
        bound = record.rule.norm_bound(record.module, x, g)
    dtype = _float_dtype(g)
    bad = untrusted(norm_sq, bound, dtype)
    u_in = input_roundoff(dtype)
    if u_in:
        norm = norm_sq.to(torch.float64).clamp_min(0).sqrt() + 2 * u_in * bound.to(norm_sq.device)
        norm_sq = norm.square().to(torch.float64)
    return norm_sq, bad


def recompute(record, x, g, rows: Tensor) -> tuple[Tensor, Exact]:
    """The (k,) float64 squared norms and the :class:`Exact` gradients of example ``rows`` of
    one layer call, from per-example gradients in float64."""
    grads = record.rule.per_example_grads(
        record.module, _select(x, rows, cast=True), _select(g, rows, cast=True)
    )
    grads = {name: grad.to(torch.float64) for name, grad in grads.items()}
    if grads:
        norm_sq = ops.per_example_norm_sq(list(grads.values())).to(torch.float64)
    else:
        norm_sq = torch.zeros(rows.shape[0], dtype=torch.float64)
    return norm_sq, Exact(rows, grads)


def certified(record, x, g, norm_sq: Tensor, bad: Tensor) -> tuple[Tensor, Exact]:
    """``norm_sq`` with its ``bad`` rows (at least one) replaced by exact float64 norms, and
    their gradients."""
    rows = bad.nonzero().flatten()
    exact_sq, exact = recompute(record, x, g, rows.cpu())
    norm_sq = norm_sq.to(torch.float64).clone()
    norm_sq[rows] = exact_sq.to(norm_sq.device)
    return norm_sq, exact


def _float_dtype(g) -> torch.dtype:
    first = g[0] if isinstance(g, tuple) else g
    return first.dtype


def _select(t, rows: Tensor, cast: bool):
    """Rows ``rows`` of a tensor or of each tensor of a tuple; floating tensors in float64."""
    if isinstance(t, tuple):
        return tuple(_select(item, rows, cast) for item in t)
    picked = t[rows.to(t.device)]
    return picked.to(torch.float64) if cast and picked.is_floating_point() else picked
