"""One clipper per clipping mode: how a physical batch's captured layer calls become
per-example norms, clip factors and clipped sums (added to ``p.summed_grad``).

* ``auto`` and ``bk``: :class:`~.book_keeping.BookKeeping` (fast-path norms, certified, and
  book-keeping clipped sums; ``auto`` picks ghost or direct norms per layer and materialises
  cheap layers on CPU, ``bk`` takes ghost norms everywhere);
* ``per_example``: :class:`~.per_example.PerExample` (every per-example gradient materialised:
  the Opacus-equivalent baseline);
* ``ghost``: :class:`~.ghost.Ghost` (two backward passes run by ``torch_dpfast.ghost``).
"""

from __future__ import annotations

from ..validation import check_choice
from ._base import Clipper
from .book_keeping import BookKeeping
from .ghost import Ghost
from .per_example import PerExample

CLIPPING_MODES = ("auto", "bk", "per_example", "ghost")


def make_clipper(mode: str) -> Clipper:
    """A fresh clipper for ``mode`` (one per attachment: some hold state between batches)."""
    if mode in ("auto", "bk"):
        return BookKeeping(mode)
    if mode == "per_example":
        return PerExample()
    check_choice("clipping", mode, CLIPPING_MODES)
    return Ghost()


__all__ = ["CLIPPING_MODES", "BookKeeping", "Clipper", "Ghost", "PerExample", "make_clipper"]
