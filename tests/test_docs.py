"""Every ```python block in README.md and docs/ runs (design.md excepted, see below)."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# design.md is the contract for what is still being built; its sketches are not runnable yet.
DOCS = [
    ROOT / "README.md",
    *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "design.md"),
]
BLOCKS = [
    pytest.param(block, id=f"{path.name}-{i}")
    for path in DOCS
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.S))
    if "..." not in block  # API sketches with elided bodies are not runnable
]


@pytest.mark.parametrize("code", BLOCKS)
def test_doc_block_runs(code):
    exec(compile(code, "<doc>", "exec"), {})


def test_docs_have_runnable_blocks():
    assert len(BLOCKS) >= 2
