"""The quality gate's yardstick (stages/gate.py): once per source, a static Q8_0 and its KL
divergence on the held-out tokens, under a task name of its own whichever alloys are selected.
Where an alloy ships that very Q8_0, the variant's quantize owns the store entry and the yardstick
runs after it, finding the bytes there (no second quantize, no shared doit target)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import DEMO_ALLOY, ROOT

PLAN = ("from compiler.graph import compile_graph; p = compile_graph({}); "
        "print(__import__('json').dumps([{'task': s.task, 'kind': s.kind, 'key': s.key, 'inputs': s.inputs, "
        "'after': s.after, 'shared_with': s.shared_with} for s in p.steps.values()]))")


def plan_of(tmp_path, alloys: dict[str, str | None]) -> dict:
    folder = tmp_path / "alloys"
    folder.mkdir()
    for name, quant in alloys.items():
        data = json.loads(DEMO_ALLOY.read_text())
        data["name"] = name
        if quant:
            next(s for s in data["stages"] if s["type"] == "quant")["quantTypes"] = [quant]
        (folder / f"{name}.alloy.json").write_text(json.dumps(data, indent=2))
    out = subprocess.run([sys.executable, "-c", PLAN], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, FORGE_BUILD_DIR=str(tmp_path / "build"), FORGE_ALLOYS_DIR=str(folder),
                                  HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    return {s["task"]: s for s in json.loads(out.stdout.splitlines()[-1])}


YARDSTICK = "quantize:qwen3.5-tiny-seeing@q8_0-yardstick"


@pytest.mark.parametrize("shipped", ["a-q8", "z-q8"])  # planned before / after the Q4_K_M demo
def test_a_shipped_static_q8_0_is_made_once_and_the_yardstick_follows_it(tmp_path, shipped):
    steps = plan_of(tmp_path, {"demo": None, shipped: "Q8_0"})
    quantize = {s["task"]: s for s in steps.values() if s["kind"] == "quantize"}
    assert sorted(quantize) == sorted(["quantize:demo", f"quantize:{shipped}", YARDSTICK])
    ship, yard = quantize[f"quantize:{shipped}"], quantize[YARDSTICK]
    assert yard["key"] == ship["key"] and yard["shared_with"] == ship["task"] and not ship["shared_with"]
    assert ship["task"] not in yard["after"]  # ordered by a doit task_dep: its file_dep never moves
    # The shipped one still waits for the projector's tensor check, as every variant's quantize does.
    assert any(t.startswith("mmproj:") for t in ship["after"])
    (kld_q8,) = [s for s in steps.values() if s["kind"] == "kld-q8"]
    assert dict(map(tuple, kld_q8["inputs"]))["model"] == YARDSTICK
    for gate in ("gate:demo", f"gate:{shipped}"):
        assert dict(map(tuple, steps[gate]["inputs"]))["q8"] == kld_q8["task"]


def test_without_a_shipped_q8_0_the_yardstick_owns_its_entry(tmp_path):
    steps = plan_of(tmp_path, {"demo": None})
    (yardstick,) = [t for t in steps if t.startswith("quantize:") and t != "quantize:demo"]
    assert yardstick == YARDSTICK and not steps[YARDSTICK]["shared_with"]
    (kld_q8,) = [s for s in steps.values() if s["kind"] == "kld-q8"]
    assert dict(map(tuple, kld_q8["inputs"]))["model"] == yardstick
