"""DPOptimizer: wraps any torch.optim optimizer to take DP-SGD steps.

Per physical batch, ``step()`` clips each example's gradient over every attached parameter and
adds the clipped sum to ``p.summed_grad``. When the logical batch is complete (every step unless
``signal_skip_step`` asked to skip), it adds N(0, sigma^2 C^2) noise to each sum in one fused call
(``ops.add_noise_``), divides by the *expected* logical batch size, sets ``p.grad`` and lets the
wrapped optimizer step. Parameters that received no gradient still get noise.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable

import torch

from . import ops
from .distributed import OverlappedReduction, all_reduce_sum, world
from .engine import Attachment, attachments_of
from .random_source import RandomSource, add_secure_noise_


class DPOptimizer(torch.optim.Optimizer):
    """DP-SGD around ``optimizer``; use with :func:`torch_dpfast.attach`.

    Args:
        optimizer: the wrapped optimizer (its param_groups, state and schedulers keep working).
        noise_multiplier: sigma >= 0; the noise std is sigma * max_grad_norm.
        max_grad_norm: the clipping bound C > 0.
        expected_batch_size: q * N, the expected logical batch size the noisy sum is divided by.
        generator: source of the noise seeds: a ``torch.Generator``, a reproducible
            ``RandomSource`` (the PrivacyEngine's default, seeded from torch's default generator
            at the first step), or None for torch's default generator itself.
        secure_mode: draw the noise from the OS CSPRNG (random_source.py, docs/security.md);
            excludes ``generator``.
        distributed: under torch.distributed, all-reduce the clipped sums across ranks once
            per logical step, with the noise added by rank 0 only (see distributed.py). Every
            rank must run the same number of physical batches per logical step.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        generator: torch.Generator | RandomSource | None = None,
        secure_mode: bool = False,
        distributed: bool = False,
    ):
        if not isinstance(noise_multiplier, (int, float)) or not noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
        if not isinstance(max_grad_norm, (int, float)) or not (
            math.isfinite(max_grad_norm) and max_grad_norm > 0
        ):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")
        if not isinstance(expected_batch_size, (int, float)) or not (
            math.isfinite(expected_batch_size) and expected_batch_size > 0
        ):
            raise ValueError(
                f"expected_batch_size must be a number > 0 (q * N), got {expected_batch_size!r}"
            )
        if secure_mode and generator is not None:
            raise ValueError("secure_mode draws the noise from the OS CSPRNG; give no generator")
        self.original_optimizer = optimizer
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = expected_batch_size
        if isinstance(generator, torch.Generator):
            generator = RandomSource(generator=generator)
        self._noise: RandomSource | None = generator
        self._secure = RandomSource(secure=True) if secure_mode else None
        self.rank, self.world_size = world() if distributed else (0, 1)
        self.bytes_communicated = 0  # by the all-reduces, over the optimizer's life
        self.bytes_overlapped = 0  # of which launched during a backward (ghost clipping)
        self._overlap: OverlappedReduction | None = None
        self._skip_next = False
        self._accumulating = False
        self.steps_taken = 0
        #: Called with this optimizer after every real (noisy) step: the accountant's hook.
        self.step_hooks: list[Callable[[DPOptimizer], None]] = []

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
        its logical batch). Refused when Opacus's BatchMemoryManager calls it."""
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("opacus."):
            raise RuntimeError(
                "Opacus's BatchMemoryManager was kept after switching to torch_dpfast: it splits "
                "batches behind the sampler's back (with workers it signals steps at the wrong "
                "batches; under Poisson sampling it trains on a stand-in example in empty "
                "logical batches). Remove it and pass physical_batch_size= to make_private, "
                "whose loader yields fixed-shape physical batches and steps at the right one"
            )
        self._skip_next = do_skip

    def start_logical_batch(self) -> None:
        """A new logical batch begins: clipped sums of an unfinished one are dropped (with a
        warning), never mixed into it; nothing was released from them, so no privacy is spent."""
        if self._accumulating:
            warnings.warn(
                "torch_dpfast: a logical batch was abandoned before its last physical batch "
                "(the loop broke off, or a new epoch began); its clipped sums are discarded",
                RuntimeWarning,
                stacklevel=3,
            )
            for p in self._params():
                p.summed_grad = None
            self._accumulating = False
        self._skip_next = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears ``p.grad`` and the captures of a backward that was not stepped; the captures
        of a forward whose backward is still to come are kept (the forward -> zero_grad ->
        backward -> step order works), and clipped sums survive until the logical step."""
        for attachment in attachments_of(self._params()):
            attachment.discard(keep_pending=True)
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
        done = set()
        if self._overlap is not None:  # sums already noised, scaled and (being) all-reduced
            overlap, self._overlap = self._overlap, None
            done = overlap.finish()
            self.bytes_communicated += overlap.bytes
            self.bytes_overlapped += overlap.bytes
        sums = []
        for p in params:
            if getattr(p, "summed_grad", None) is None:
                p.summed_grad = torch.zeros_like(p)
            if id(p) not in done:
                sums.append(p.summed_grad)
        if sums:
            self._noise_and_scale(sums)
            if self.world_size > 1:
                self.bytes_communicated += all_reduce_sum(sums)
        for p in params:
            p.grad, p.summed_grad = p.summed_grad, None
        self._accumulating = False
        self.steps_taken += 1
        for hook in self.step_hooks:
            hook(self)
        return True

    def _noise_and_scale(self, sums) -> None:
        """Adds N(0, sigma^2 C^2) and divides by q N, in place. Under torch.distributed the
        noise is added once, by rank 0, before the sum over ranks."""
        std = self.noise_multiplier * self.max_grad_norm if self.rank == 0 else 0.0
        scale = 1.0 / self.expected_batch_size
        if self._secure is not None:
            add_secure_noise_(sums, std, scale, self._secure)
        else:
            ops.add_noise_(sums, std=std, scale=scale, generator=self.generator)

    def overlap(self):
        """For ghost clipping: a callback taking parameters whose clipped sums are final, to
        noise and all-reduce them during the backward (see distributed.OverlappedReduction);
        None unless this is the last physical batch of a logical step across processes."""
        if self.world_size == 1 or self._skip_next:
            return None
        self._overlap = OverlappedReduction(self._noise_and_scale)
        return self._overlap.ready

    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        if self.pre_step():
            return self.original_optimizer.step()
        return None

    @property
    def generator(self) -> torch.Generator | None:
        """The generator the noise seeds come from (None: torch's default, or secure mode)."""
        return None if self._noise is None else self._noise.generator

    def dp_state_dict(self) -> dict:
        """The DP state: steps taken, the clipped sums of a logical batch in progress, and the
        noise generator's state (none in secure mode)."""
        state = {
            "steps_taken": self.steps_taken,
            "accumulating": self._accumulating,
            "skip_next": self._skip_next,
            "summed_grads": [getattr(p, "summed_grad", None) for p in self._params()],
        }
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def check_dp_state_dict(self, state: dict) -> None:
        """Raises if ``state`` does not fit this optimizer's parameters; changes nothing."""
        params = self._params()
        sums = state["summed_grads"]
        if len(sums) != len(params):
            raise ValueError(
                f"the saved DP state has clipped sums for {len(sums)} parameters, this optimizer "
                f"has {len(params)} trainable ones: it belongs to a different model or optimizer"
            )
        for p, summed in zip(params, sums):
            if summed is not None and summed.shape != p.shape:
                raise ValueError(
                    f"saved clipped sum of shape {tuple(summed.shape)} does not fit a parameter "
                    f"of shape {tuple(p.shape)}"
                )

    def load_dp_state_dict(self, state: dict) -> None:
        self.check_dp_state_dict(state)
        for p, summed in zip(self._params(), state["summed_grads"]):
            p.summed_grad = None if summed is None else summed.to(p.device, p.dtype)
        self.steps_taken = state["steps_taken"]
        self._accumulating = state["accumulating"]
        self._skip_next = state["skip_next"]
        if self._noise is not None and "generator" in state:
            self._noise.load_state_dict(state)

    def state_dict(self) -> dict:
        return {"optimizer": self.original_optimizer.state_dict(), "dp": self.dp_state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.original_optimizer.load_state_dict(state_dict["optimizer"])
        self.load_dp_state_dict(state_dict["dp"])

    def __repr__(self) -> str:
        return (
            f"DPOptimizer(noise_multiplier={self.noise_multiplier}, max_grad_norm="
            f"{self.max_grad_norm}, expected_batch_size={self.expected_batch_size}, "
            f"optimizer={self.original_optimizer!r})"
        )
