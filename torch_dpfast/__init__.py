"""torch_dpfast: fast, correct differentially private training (DP-SGD) for PyTorch."""

from . import ops
from .precision import get_precision, precision, set_precision

__version__ = "0.1.0.dev0"

__all__ = ["__version__", "get_precision", "ops", "precision", "set_precision"]
