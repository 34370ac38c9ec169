"""``clipping="ghost"``: the two backward passes run by :func:`torch_dpfast.ghost.ghost_backward`
clip and accumulate as they go; this clipper holds the pass in progress (it receives the
captured layers' backwards) and hands its norms to ``optimizer.step()``."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import Clipper


class Ghost(Clipper):
    def __init__(self):
        self.pass_in_progress = None  # ghost.GhostPass while ghost_backward runs
        self.norm_sq: Tensor | None = None  # squared norms of the last ghost_backward
        self.stray_backward = False  # a backward ran outside ghost_backward

    def on_backward(self, attachment, record) -> None:
        if self.pass_in_progress is not None:
            self.pass_in_progress.on_backward(record)
        else:
            self.stray_backward = True

    def retains_graph(self) -> bool:
        return self.pass_in_progress is not None

    def clip(self, attachment, max_grad_norm: float) -> Tensor:
        """The two passes already accumulated the sums: only the norms are left to return."""
        stray, self.stray_backward = self.stray_backward, False
        attachment.discard()
        attachment.take_mask()
        if stray:
            raise RuntimeError(
                "torch_dpfast: clipping='ghost' clips in two backward passes that the wrapped "
                "loss runs: call backward() on the loss returned by the criterion that "
                "make_private returned (or use torch_dpfast.ghost.ghost_backward), not on a "
                "plain loss"
            )
        norm_sq, self.norm_sq = self.norm_sq, None
        return norm_sq if norm_sq is not None else torch.zeros(0)

    def reset(self) -> None:
        self.pass_in_progress, self.norm_sq, self.stray_backward = None, None, False
