"""torch_dpfast: fast, correct differentially private training (DP-SGD) for PyTorch."""

from . import ops, rules
from .engine import Attachment, attach
from .explain import Explanation, explain
from .optimizer import DPOptimizer
from .precision import get_precision, precision, set_precision

__version__ = "0.1.0.dev0"

__all__ = [
    "Attachment",
    "DPOptimizer",
    "Explanation",
    "__version__",
    "attach",
    "explain",
    "get_precision",
    "ops",
    "precision",
    "rules",
    "set_precision",
]
