"""Opacus's own test-suite with one import swapped: how much of an Opacus user's code runs
unchanged on torch_dpfast.

The tests ship inside the installed opacus package (``opacus/tests``). The script copies the
test files that use ``PrivacyEngine`` twice into a scratch directory, once as they are and once
with ``from opacus import PrivacyEngine`` replaced by ``from torch_dpfast import
PrivacyEngine`` (nothing else changed), runs pytest on both, and reports every test that passes
under Opacus with its outcome under the swap, plus the reason recorded in
``tools/opacus_swap_reasons.json`` (fnmatch patterns of test ids) for those that fail.

Usage:
  python tools/opacus_swap.py --out DIR [--files privacy_engine_test.py,...] [--timeout 1800]
  python tools/opacus_swap.py --out DIR --run torch_dpfast --reuse OLD/opacus_swap.json
  python tools/opacus_swap.py --out DIR --run "" --reuse OLD/opacus_swap.json  # re-annotate
Writes DIR/opacus_swap.json (versions, per-test outcomes) and DIR/opacus_swap.md (the table).
Multi-GPU files (multigpu_*, ddp_hook_check) are left out: they need several CUDA devices.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from importlib import metadata

HERE = pathlib.Path(__file__).resolve().parent
REASONS = HERE / "opacus_swap_reasons.json"
SWAP = ("from opacus import PrivacyEngine", "from torch_dpfast import PrivacyEngine")
FILES = (
    "privacy_engine_test.py",
    "privacy_engine_validation_test.py",
    "gradient_accumulation_test.py",
    "randomness_test.py",
    "accounting_noise_multiplier_test.py",
    "mixed_precision_test.py",
    "batch_memory_manager_test.py",
    "schedulers/grad_clip_scheduler_test.py",
    "schedulers/noise_scheduler_test.py",
)


def opacus_tests() -> pathlib.Path:
    import opacus

    path = pathlib.Path(opacus.__file__).parent / "tests"
    if not path.is_dir():
        raise SystemExit(f"the installed opacus has no tests directory ({path})")
    return path


def prepare(source: pathlib.Path, target: pathlib.Path, files, swap: bool) -> list[str]:
    """Copies the tests (and their helpers) to ``target`` as package ``opacus_tests``; returns
    the copied test files' paths relative to ``target``."""
    package = target / "opacus_tests"
    shutil.copytree(source, package, ignore=shutil.ignore_patterns("__pycache__"))
    copied = []
    for name in files:
        path = package / name
        if swap:
            text = path.read_text()
            if SWAP[0] not in text:
                raise SystemExit(f"{name} no longer imports PrivacyEngine from opacus")
            path.write_text(text.replace(SWAP[0], SWAP[1]))
        copied.append(str(path.relative_to(target)))
    return copied


def run(target: pathlib.Path, files: list[str], timeout: float) -> dict[str, str]:
    """{test id: "passed" | "failed" | "skipped" | "error"} from one pytest run."""
    report = target / "report.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
        + files,
        cwd=target,
        timeout=timeout,
        capture_output=True,
        check=False,
    )
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}".removeprefix("opacus_tests.")
        kinds = {child.tag for child in case}
        outcome = "passed"
        for tag in ("error", "failure", "skipped"):
            if tag in kinds:
                outcome = {"failure": "failed"}.get(tag, tag)
        outcomes[test] = outcome
    return outcomes


def markdown(payload: dict) -> str:
    rows = payload["tests"]
    passing = [t for t in rows if t["opacus"] == "passed"]
    swapped = [t for t in passing if t["torch_dpfast"] == "passed"]
    lines = [
        "# Opacus's tests with the import swapped",
        "",
        f"opacus {payload['opacus']}, torch_dpfast {payload['torch_dpfast']}, torch "
        f"{payload['torch']}, commit {payload.get('commit')}. Test files: "
        f"{', '.join(payload['files'])}.",
        "",
        f"**{len(swapped)} of the {len(passing)} tests that pass under Opacus pass with "
        "`from torch_dpfast import PrivacyEngine`.**",
        "",
        "| test | with the swap | reason |",
        "|---|---|---|",
    ]
    for t in passing:
        if t["torch_dpfast"] != "passed":
            lines.append(f"| `{t['test']}` | {t['torch_dpfast']} | {t.get('reason', '')} |")
    return "\n".join(lines) + "\n"


def reason_for(test: str, reasons: dict[str, str]) -> str:
    """The recorded reason of the first pattern (fnmatch, e.g. ``*::test_per_layer_clipping``)
    that matches the test id."""
    return next((why for pattern, why in reasons.items() if fnmatch.fnmatch(test, pattern)), "")


def _commit() -> str | None:
    """The torch_dpfast checkout's commit (None outside a git checkout)."""
    done = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--files", default=",".join(FILES))
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument(
        "--run",
        default="opacus,torch_dpfast",
        help="which runs to do: opacus, torch_dpfast, both (default) or none ('')",
    )
    parser.add_argument(
        "--reuse",
        type=pathlib.Path,
        help="an earlier opacus_swap.json: the outcomes of the runs not done (same versions)",
    )
    args = parser.parse_args()
    files = args.files.split(",")
    source = opacus_tests()
    reasons = json.loads(REASONS.read_text()) if REASONS.exists() else {}
    results = {}
    if args.reuse is not None:
        earlier = json.loads(args.reuse.read_text())
        if earlier["opacus"] != metadata.version("opacus"):
            raise SystemExit(f"{args.reuse} was made with opacus {earlier['opacus']}")
        for name in ("opacus", "torch_dpfast"):
            results[name] = {t["test"]: t[name] for t in earlier["tests"]}
    runs = [name for name in args.run.split(",") if name]
    with tempfile.TemporaryDirectory() as scratch:
        for name, swap in (("opacus", False), ("torch_dpfast", True)):
            if name not in runs:
                continue
            target = pathlib.Path(scratch) / name
            target.mkdir()
            print(f"running Opacus's tests ({name}) ...", flush=True)
            results[name] = run(target, prepare(source, target, files, swap), args.timeout)
    if set(results) != {"opacus", "torch_dpfast"}:
        raise SystemExit("give --reuse for the runs that --run leaves out")
    tests = []
    for test, outcome in results["opacus"].items():
        row = dict(
            test=test, opacus=outcome, torch_dpfast=results["torch_dpfast"].get(test, "missing")
        )
        if outcome == "passed" and row["torch_dpfast"] != "passed":
            row["reason"] = reason_for(test, reasons)
        tests.append(row)
    payload = dict(
        opacus=metadata.version("opacus"),
        torch_dpfast=metadata.version("torch_dpfast"),
        torch=metadata.version("torch"),
        commit=_commit(),
        files=files,
        tests=tests,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "opacus_swap.json").write_text(json.dumps(payload, indent=1) + "\n")
    table = markdown(payload)
    (args.out / "opacus_swap.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
