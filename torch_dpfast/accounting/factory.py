"""``create_accountant(name)``: the accountant for "prv", "rdp" or "gdp"."""

from __future__ import annotations

from ._base import Accountant
from .gdp import GaussianAccountant
from .prv import PRVAccountant
from .rdp import RDPAccountant

ACCOUNTANTS = {"prv": PRVAccountant, "rdp": RDPAccountant, "gdp": GaussianAccountant}


def create_accountant(name: str) -> Accountant:
    if name not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {sorted(ACCOUNTANTS)}, got {name!r}")
    return ACCOUNTANTS[name]()
