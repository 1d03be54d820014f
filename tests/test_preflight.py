"""The disk: a run that cannot fit is refused in its first seconds with the figures, writing
nothing; a disk that fills up mid-step anyway is named as such, with the step, and leaves no
partial output. On a real small file system (a tmpfs mounted for the test: it needs root, as CI
here has; elsewhere these tests are skipped, saying why)."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from compiler import preflight
from conftest import DEMO_ALLOY, TRAINED_SOURCE, Workspace

pytestmark = pytest.mark.build


@pytest.fixture
def small_disk(tmp_path):
    """A 240 MB file system: room for the demo's trained source (160 MB), not for the rest."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=240m", "tmpfs", str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({(proc.stderr or proc.stdout).strip()}): needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def small_workspace(root: Path, disk: Path, demo_seed: Path) -> Workspace:
    ws = Workspace(root)
    ws.build = disk / "build"
    shutil.copy(DEMO_ALLOY, ws.alloys / DEMO_ALLOY.name)
    for kind in TRAINED_SOURCE:  # copied, not linked: another file system
        shutil.copytree(demo_seed / kind, ws.build / "store" / kind)
    return ws


def entries(ws) -> set:
    store = ws.build / "store"
    return {f"{k.name}/{e.name}" for k in store.iterdir() for e in k.iterdir()}


def test_a_run_larger_than_the_disk_is_refused_at_once_and_writes_nothing(tmp_path, small_disk, demo_seed):
    ws = small_workspace(tmp_path / "ws", small_disk, demo_seed)
    before = entries(ws)
    started = time.monotonic()
    run = ws.doit("alloy=demo")
    assert run.proc.returncode == 2, run.out[-3000:]
    assert time.monotonic() - started < 60  # planning and the count; no step ran
    assert "preflight: not enough free disk for this run: nothing was written" in run.out
    assert f"{ws.build / 'store'}: needs" in run.out and "GB free; largest: " in run.out
    assert "convert:qwen3.5-tiny-seeing" in run.out.split("largest: ", 1)[1]
    assert entries(ws) == before and not run.executed
    # The figures are plan mode's, not the disk's: the same plan on the big disk needs what it said.
    needed = float(run.out.split(": needs ")[1].split(" GB")[0])
    assert 0.3 < needed < 1.0  # the demo's BF16 reference, quants, projectors and reference logits


def test_a_disk_that_fills_mid_step_is_named_with_the_step_and_leaves_no_partial(tmp_path, small_disk, demo_seed):
    ws = small_workspace(tmp_path / "ws", small_disk, demo_seed)
    # Told to skip the count (FORGE_PREFLIGHT=0), the run meets the full disk in its first big write.
    run = ws.doit("alloy=demo", FORGE_PREFLIGHT="0")
    assert run.proc.returncode != 0
    assert "convert:qwen3.5-tiny-seeing: the disk filled up while this step wrote its output (ENOSPC)" in run.out, \
        run.out[-3000:]
    assert "its partial output was removed" in run.out
    assert not list((ws.build / "store").glob("*/*.partial-*"))
    assert not (ws.build / "store" / "convert").is_dir() or not any((ws.build / "store" / "convert").iterdir())


def test_the_count_follows_the_plan_not_the_store():
    # Pure: what a plan for the official 27B checkpoint still needs, from plan mode's figures.
    from compiler.preflight import Source, step_bytes

    official = preflight._official("Qwen/Qwen3.5-27B")
    assert official is not None and official.quant_bytes["Q8_0"] > 25e9
    assert 50e9 < 2 * official.text < 56e9  # the BF16 reference of a 27B text model
    bound = Source(1000, 100, 0, 3000, 10, "test")

    class Step:
        kind, params = "quantize", {"llama_type": "Q4_K_M"}
    assert step_bytes(Step, bound, None)[0] == 2 * 1000 + 48 * 10  # no exact figure: the BF16 bound


def test_a_run_naming_its_tasks_counts_what_they_need(tmp_path, monkeypatch):
    # verify's rebuild names its targets (`doit -f dodo.py --dir ROOT quantize:demo mmproj:...`):
    # only they and their inputs are counted, never the gate's yardstick or logits they do not run.
    from compiler.graph import compile_graph

    monkeypatch.setenv("FORGE_BUILD_DIR", str(tmp_path / "empty"))
    plan = compile_graph({"alloy": "demo"})
    everything = preflight.needs(plan)[0]
    named = preflight.targets_of(plan, ["-f", "/x/dodo.py", "--dir", "/x", "quantize:demo"])
    some = preflight.needs(plan, only=named)[0]
    assert {n.task for n in some} == {"source:qwen3.5-tiny-seeing", "validate:qwen3.5-tiny-seeing",
                                      "convert:qwen3.5-tiny-seeing", "imatrix:qwen3.5-tiny-seeing",
                                      "mmproj:qwen3.5-tiny-seeing", "quantize:demo"}
    assert {n.task for n in some} < {n.task for n in everything}
    assert preflight.targets_of(plan, ["-f", "/x/dodo.py", "alloy=demo"]) is None
    assert not preflight.wanted_by(["verify", "alloy=demo"]) and preflight.wanted_by(["alloy=demo"])
