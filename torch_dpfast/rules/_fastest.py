"""The fastest of several exact ways to compute one result, chosen per input shape by timing:
the first time a shape is met each way runs twice and the faster run counts; later calls run
the winner only. For paths whose speed no simple rule predicts (oneDNN's depthwise correlation
slows 3-30x on some shapes and not on others of the same size). The ways must agree up to
rounding: which one ran never changes what is computed."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from time import perf_counter

from torch import Tensor

MAX_SHAPES = 512  # choices kept (least recently used dropped)
_choices: OrderedDict[Hashable, str] = OrderedDict()


def fastest(key: Hashable, ways: dict[str, Callable[[], Tensor]]) -> Tensor:
    """The result of the way chosen for ``key``, timing every way if none is chosen yet."""
    name = _choices.get(key)
    if name is not None:
        _choices.move_to_end(key)
        return ways[name]()
    best = None
    for name, run in ways.items():
        for _ in range(2):
            start = perf_counter()
            result = run()
            elapsed = perf_counter() - start
            if best is None or elapsed < best[0]:
                best = (elapsed, name, result)
    _choices[key] = best[1]
    if len(_choices) > MAX_SHAPES:
        _choices.popitem(last=False)
    return best[2]


def chosen(key: Hashable) -> str | None:
    """The way chosen for ``key`` so far, or None."""
    return _choices.get(key)
