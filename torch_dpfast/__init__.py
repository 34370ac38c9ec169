"""torch_dpfast: fast, correct differentially private training (DP-SGD) for PyTorch."""

from . import accounting, ops, rules
from .checkpoint import CheckpointError
from .data_loader import DPDataLoader
from .engine import Attachment, attach
from .errors import UnsupportedModuleError
from .explain import Explanation, explain
from .fix import fix
from .losses import CausalLMLoss, TokenMeanLoss
from .optimizer import DPOptimizer
from .precision import get_precision, precision, set_precision
from .privacy_engine import PrivacyEngine

__version__ = "0.1.0.dev0"

__all__ = [
    "Attachment",
    "CausalLMLoss",
    "CheckpointError",
    "DPDataLoader",
    "DPOptimizer",
    "Explanation",
    "UnsupportedModuleError",
    "PrivacyEngine",
    "TokenMeanLoss",
    "__version__",
    "accounting",
    "attach",
    "explain",
    "fix",
    "get_precision",
    "ops",
    "precision",
    "rules",
    "set_precision",
]
