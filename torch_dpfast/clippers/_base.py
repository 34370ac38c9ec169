"""The clipper contract (see the package docstring)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from ..engine import Attachment
    from ..records import Record


class Clipper(ABC):
    """Clips one physical batch of an :class:`~torch_dpfast.engine.Attachment`."""

    @abstractmethod
    def clip(self, attachment: Attachment, max_grad_norm: float) -> Tensor:
        """Clips each example's gradient over all attached parameters to norm
        ``max_grad_norm`` and adds sum_i c_i g_i to ``p.summed_grad``; returns the (B,) squared
        norms (after the loss-reduction rescaling); masked examples contribute nothing. Called
        by ``Attachment.clip_and_accumulate`` once per physical batch."""

    def on_backward(self, attachment: Attachment, record: Record) -> None:  # noqa: B027
        """A captured layer's backward recorded its output gradient ``record.g``."""

    def retains_graph(self) -> bool:
        """Whether the backward in progress is followed by another one through the same graph
        (captured layers then keep what their backward needs)."""
        return False

    def reset(self) -> None:  # noqa: B027
        """Forgets what is held between batches (the attachment is detached)."""
