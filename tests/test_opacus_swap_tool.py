"""tools/opacus_swap.py: the import swap touches nothing else, reasons match by pattern, and
every recorded reason still matches a test of the installed Opacus."""

import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import opacus_swap  # noqa: E402

sys.path.pop(0)


def test_the_swap_changes_only_the_privacy_engine_import(tmp_path):
    pytest.importorskip("opacus")
    source = opacus_swap.opacus_tests()
    copied = opacus_swap.prepare(source, tmp_path, ["privacy_engine_test.py"], swap=True)
    before = (source / "privacy_engine_test.py").read_text().splitlines()
    after = (tmp_path / copied[0]).read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and changed
    assert all(a == opacus_swap.SWAP[0] and b == opacus_swap.SWAP[1] for a, b in changed)


def test_reasons_match_by_pattern():
    reasons = {"*::test_a": "first", "x.*::test_*": "second"}
    assert opacus_swap.reason_for("x.Y::test_a", reasons) == "first"
    assert opacus_swap.reason_for("x.Y::test_b", reasons) == "second"
    assert opacus_swap.reason_for("z.Y::test_b", reasons) == ""
    recorded = json.loads(opacus_swap.REASONS.read_text())
    assert recorded and all(isinstance(why, str) and why for why in recorded.values())
