"""``create_accountant(name)``: the accountant for "prv" or "rdp"."""

from __future__ import annotations

from ._base import Accountant
from .prv import PRVAccountant
from .rdp import RDPAccountant

ACCOUNTANTS = {"prv": PRVAccountant, "rdp": RDPAccountant}


def create_accountant(name: str) -> Accountant:
    if name not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {sorted(ACCOUNTANTS)}, got {name!r}")
    return ACCOUNTANTS[name]()
