"""The demo on a machine whose CPU kernels are not the committed lock's (an Apple Silicon or aarch64
machine, an x86-64 without AVX2), reproduced on this one with torch's default kernels
(FORGE_TRAIN_KERNELS=default: the kernel path such a machine's torch runs, compiler/kernels.py): the
fixture trains there, sees, and passes its gates; `doit verify` says it has no reference for that
class, compares what it can and claims nothing else, with an exit status of its own; the build
records itself under build/ and leaves the committed lock's hashes (another class's) as they are."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from compiler.kernels import machine
from conftest import DEMO_ALLOY, DONE_IN, ROOT, STEP_TIMES, Background, Run, Workspace, assert_ok

pytestmark = pytest.mark.build
DEFAULT_KERNELS = {"FORGE_TRAIN_KERNELS": "default"}


def _classes() -> tuple[str, str]:
    committed = json.loads((ROOT / "alloys" / "forge.lock.json").read_text())
    return committed["variants"]["demo"]["source"]["platformClass"], f"{machine()}-default"


def start_in_background(root: Path) -> Background | None:
    """The whole build (tests/platform_class_job.py): a rebuild from nothing with this class's kernels
    through `python -m compiler.verify` (whose exit status tells this outcome apart; `doit verify`
    says the same and fails with doit's 1), then the demo finished twice in the rebuild dir it kept.
    The default kernels' training is the tests' longest step (~250 s here), so the job starts with
    the session, at the lowest priority (conftest.Background)."""
    there, here = _classes()
    if there == here:
        return None
    ws = Workspace(root / "other-class")
    shutil.copy(DEMO_ALLOY, ws.alloys / DEMO_ALLOY.name)
    shutil.copy(ROOT / "alloys" / "forge.lock.json", ws.alloys / "forge.lock.json")
    return Background([sys.executable, str(Path(__file__).parent / "platform_class_job.py"), str(ws.root)],
                      ws.env(**DEFAULT_KERNELS), ROOT, root)


def logged(background: Background, name: str, rc: int) -> Run:
    """One command of the job, as a Run (its output is one log, stdout and stderr together); the
    steps it ran join the session's step summary under this test."""
    out = (background.root / "other-class" / f"{name}.log").read_text(errors="replace")
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
    STEP_TIMES.extend((test, task, float(secs)) for task, secs in DONE_IN.findall(out))
    return Run(subprocess.CompletedProcess([name], rc, out, ""), [])


def test_the_demo_builds_on_another_kernel_class_and_verify_says_it_has_no_reference(background):
    committed = json.loads((ROOT / "alloys" / "forge.lock.json").read_text())
    there, here = _classes()
    if there == here:
        pytest.skip(f"the committed lock is {here}'s own: nothing to reproduce")
    ws = Workspace(background.root / "other-class")
    lock_before = (ROOT / "alloys" / "forge.lock.json").read_text()  # the workspace's copy of it

    job = background.wait(timeout=2400)
    assert job.returncode == 0, job.stdout[-4000:]
    results = json.loads((ws.root / "results.json").read_text())
    check = logged(background, "verify", results["verify"])
    assert check.proc.returncode == 3, check.out[-4000:]
    assert "demo: NO REFERENCE" in check.out and "MISMATCH" not in check.out
    assert f"the lock's hashes are for platform class {there}; this machine trains {here}'s fixture" in check.out
    source_files = sorted(f["filename"] for f in committed["variants"]["demo"]["source"]["files"])
    compared = [n for n in source_files if not n.endswith(".safetensors")]
    assert f"compared, identical: {', '.join(compared)}" in check.out
    assert "not compared: model.safetensors, demo-Q4_K_M.gguf, mmproj-demo-F16.gguf" in check.out
    assert "variants byte-identical" in check.out and "0 of 1" in check.out
    summary = json.loads((ws.build / "verify" / "report.json").read_text())
    report = summary["variants"][0]
    assert report["no_reference"] == {"lock": there, "here": here}
    assert all(f["matches"] is None and f["compared"] is False for f in report["files"])
    # This is the tests' one verify rebuild from nothing: in a fresh dir of its own it trained,
    # converted and quantized (tests/test_verify.py compares on a kept rebuild).
    (kept,) = (ws.build / "verify").glob("run-*")
    assert results["kept"] == [str(kept)]
    assert summary["rebuilt_from_nothing"] is True and "rebuilding quantize:demo" in check.out
    for kind in ("synthetic", "convert", "quantize", "mmproj"):
        assert any((kept / "store" / kind).glob("*/manifest.json")), kind

    # The kept rebuild is a build dir like any: the demo finishes there -- quality gate, envelope and
    # the smoke's vision suite, gated on this class's fixture -- without training a second time.
    run = logged(background, "doit-first", results["first"])
    assert_ok(run)
    assert "source:qwen3.5-tiny-seeing" in run.skipped and "source:qwen3.5-tiny-seeing: done in" not in run.out
    smoke_key = json.loads((kept / "experiments.lock.json").read_text())["variants"]["demo"]["keys"]["smoke"]
    smoke = json.loads((kept / "store" / "smoke" / smoke_key / "smoke.json").read_text())
    assert smoke["vision"]["gated"] and smoke["vision"]["score"] >= 0.8 and smoke["passed"]
    # Recorded for what it is, where it belongs; the committed lock keeps the other class's hashes.
    assert f"the committed lock holds {there}'s hashes for demo; this machine trains {here}'s fixture" in run.out
    assert (ws.alloys / "forge.lock.json").read_text() == lock_before
    mine = json.loads((kept / "experiments.lock.json").read_text())["variants"]["demo"]
    assert mine["source"]["platformClass"] == here
    assert mine["outputs"] != committed["variants"]["demo"]["outputs"]
    # A second run is a no-op: the record is where it belongs and up to date.
    again = logged(background, "doit-again", results["again"])
    assert_ok(again)
    assert again.executed == set(), again.out[-3000:]
