"""DPOptimizer: wraps any torch.optim optimizer to take DP-SGD steps.

Per physical batch, ``step()`` clips each example's gradient over every attached parameter and
adds the clipped sum to ``p.summed_grad``. When the logical batch is complete (every step unless
``signal_skip_step`` asked to skip), it adds N(0, sigma^2 C^2) noise to each sum in one fused call
(``ops.add_noise_``), divides by the *expected* logical batch size, sets ``p.grad`` and lets the
wrapped optimizer step. Parameters that received no gradient still get noise.
"""

from __future__ import annotations

import math

import torch

from . import ops
from .engine import Attachment, attachments_of


class DPOptimizer(torch.optim.Optimizer):
    """DP-SGD around ``optimizer``; use with :func:`torch_dpfast.attach`.

    Args:
        optimizer: the wrapped optimizer (its param_groups, state and schedulers keep working).
        noise_multiplier: sigma >= 0; the noise std is sigma * max_grad_norm.
        max_grad_norm: the clipping bound C > 0.
        expected_batch_size: q * N, the expected logical batch size the noisy sum is divided by.
        generator: source of the noise seeds (torch's default generator if None).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        generator: torch.Generator | None = None,
    ):
        if not isinstance(noise_multiplier, (int, float)) or not noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
        if not isinstance(max_grad_norm, (int, float)) or not (
            math.isfinite(max_grad_norm) and max_grad_norm > 0
        ):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")
        if not isinstance(expected_batch_size, int) or expected_batch_size < 1:
            raise ValueError(
                f"expected_batch_size must be an int >= 1, got {expected_batch_size!r}"
            )
        self.original_optimizer = optimizer
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = expected_batch_size
        self.generator = generator
        self._skip_next = False
        self._accumulating = False
        self.steps_taken = 0

    # The wrapped optimizer owns the parameter groups, state and defaults.
    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.original_optimizer.param_groups = value

    @property
    def state(self):
        return self.original_optimizer.state

    @property
    def defaults(self):
        return self.original_optimizer.defaults

    def add_param_group(self, param_group: dict) -> None:
        self.original_optimizer.add_param_group(param_group)

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _attachments(self) -> list[Attachment]:
        params = self._params()
        attachments = attachments_of(params)
        covered = {id(p) for a in attachments for p in a.parameters()}
        missing = [tuple(p.shape) for p in params if id(p) not in covered]
        if missing:
            raise RuntimeError(
                f"DPOptimizer: {len(missing)} trainable parameter(s) (shapes {missing[:3]}...) are "
                "not covered by torch_dpfast.attach(model); their gradients would not be private. "
                "Attach the model that owns them, or freeze them"
            )
        return attachments

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """The next ``step()`` only clips and accumulates (a physical batch that does not end
        its logical batch)."""
        self._skip_next = do_skip

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears ``p.grad`` and pending captures; clipped sums survive until the logical step."""
        for attachment in attachments_of(self._params()):
            attachment.discard()
        for p in self._params():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
            if not self._accumulating:
                p.summed_grad = None

    def pre_step(self) -> bool:
        """Clips and accumulates this physical batch; on the last one of a logical batch adds
        noise, scales and fills ``p.grad``. Returns whether the wrapped optimizer should step."""
        for attachment in self._attachments():
            attachment.clip_and_accumulate(self.max_grad_norm)
        if self._skip_next:
            self._skip_next = False
            self._accumulating = True
            return False
        params = self._params()
        sums = []
        for p in params:
            if getattr(p, "summed_grad", None) is None:
                p.summed_grad = torch.zeros_like(p)
            sums.append(p.summed_grad)
        ops.add_noise_(
            sums,
            std=self.noise_multiplier * self.max_grad_norm,
            scale=1.0 / self.expected_batch_size,
            generator=self.generator,
        )
        for p in params:
            p.grad, p.summed_grad = p.summed_grad, None
        self._accumulating = False
        self.steps_taken += 1
        return True

    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        if self.pre_step():
            return self.original_optimizer.step()
        return None

    def state_dict(self) -> dict:
        return {
            "optimizer": self.original_optimizer.state_dict(),
            "dp": {"steps_taken": self.steps_taken},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.original_optimizer.load_state_dict(state_dict["optimizer"])
        self.steps_taken = state_dict["dp"]["steps_taken"]

    def __repr__(self) -> str:
        return (
            f"DPOptimizer(noise_multiplier={self.noise_multiplier}, max_grad_norm="
            f"{self.max_grad_norm}, expected_batch_size={self.expected_batch_size}, "
            f"optimizer={self.original_optimizer!r})"
        )
