"""Bad input is refused before anything is built, with a message that names the file and JSON
path (or the override), what was found and what is allowed."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from compiler.errors import ForgeError
from compiler.graph import compile_graph
from conftest import DEMO_ALLOY, DOIT, Workspace


@pytest.fixture
def ws(tmp_path, monkeypatch):
    w = Workspace(tmp_path)
    shutil.copy(DEMO_ALLOY, w.alloys / DEMO_ALLOY.name)
    monkeypatch.setenv("FORGE_ALLOYS_DIR", str(w.alloys))
    monkeypatch.setenv("FORGE_BUILD_DIR", str(w.build))
    return w


def refusal(vars=None) -> str:
    with pytest.raises(ForgeError) as e:
        compile_graph(vars or {})
    return str(e.value)


def edit(ws, mutate, name="demo"):
    path = ws.alloys / f"{name}.alloy.json"
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data, indent=2))
    return path


def test_the_demo_plans(ws):
    plan = compile_graph({})
    assert [v.id for v in plan.variants] == ["demo"]


def test_malformed_json_names_file_line_and_column(ws):
    path = ws.alloys / "demo.alloy.json"
    path.write_text('{\n  "name": "demo",\n  "version": 1.0.0\n}\n')
    msg = refusal()
    assert f"{path}:3:" in msg and "malformed JSON" in msg


def test_schema_violation_names_json_path_and_choices(ws):
    edit(ws, lambda d: d["stages"][1].update(quantTypes=["Q4_K_X"]))
    msg = refusal()
    assert "$.stages[1].quantTypes[0]" in msg
    assert "Q4_K_X" in msg and "IQ3_XXS" in msg and "Q4_K_M" in msg


def test_missing_required_field(ws):
    edit(ws, lambda d: d.pop("cycles"))
    msg = refusal()
    assert "demo.alloy.json" in msg and "'cycles' is a required property" in msg


@pytest.mark.parametrize("override, group, choice", [
    ("tier=pro", "tier", "corvette"),
    ("quant=q4_k_x", "quant", "iq3 (= iq3_m)"),
    ("backend=opengl", "backend", "vulkan"),
])
def test_unknown_group_choice_lists_the_choices(ws, override, group, choice):
    key, value = override.split("=")
    msg = refusal({key: value})
    assert f"override {override}" in msg and f"unknown {group}" in msg and choice in msg


def test_unknown_config_key_names_the_override(ws):
    msg = refusal({"tier.n_seq_mx": "4"})
    assert "tier.n_seq_mx" in msg and "not in struct" in msg


def test_unsupported_stage_type_lists_supported(ws):
    edit(ws, lambda d: d["stages"].append({"type": "eval", "benchmarks": ["mmlu"]}))
    msg = refusal()
    assert "$.stages[3].type" in msg and "'eval'" in msg
    assert "allowed: modality, publish, quant" in msg


@pytest.mark.parametrize("bad", ["../escape", "a/b", "..", ".hidden"])
def test_alloy_name_with_path_parts_is_refused(ws, bad):
    edit(ws, lambda d: d.update(name=bad))
    msg = refusal()
    assert "$.name" in msg and "no path separators" in msg


def test_missing_local_source_names_the_folder(ws):
    def local(d):
        d["source"].pop("synthetic")
        d["source"]["localPath"] = "../checkpoints/nowhere"
    edit(ws, local)
    msg = refusal()
    assert "$.source.localPath" in msg and "nowhere" in msg and "not found" in msg


def no_calibration(d):
    next(s for s in d["stages"] if s["type"] == "quant").pop("calibration")


def test_quant_that_needs_an_imatrix_is_refused_at_planning(ws):
    edit(ws, no_calibration)
    msg = refusal({"quant": "iq3"})
    assert "IQ3_M needs an importance matrix" in msg and "demo.alloy.json" in msg
    assert "q4_k_m" in msg  # what can be built instead


def test_unknown_alloy_selection_lists_alloys(ws):
    msg = refusal({"alloy": "nope"})
    assert "no alloy named nope" in msg and "demo" in msg


def test_cli_refusal_exits_2_and_builds_or_deletes_nothing(ws):
    ws.build.mkdir(parents=True)
    keep = ws.build / "keep.txt"
    keep.write_text("x")
    edit(ws, no_calibration)
    proc = subprocess.run(DOIT + ["quant=iq2_xxs"], capture_output=True, text=True, env=ws.env(), cwd=ws.root)
    assert proc.returncode == 2
    assert "refused, nothing was built or deleted" in proc.stderr
    assert "IQ2_XXS needs an importance matrix" in proc.stderr
    # Only bookkeeping (the stat cache) may appear; nothing built, nothing removed.
    assert set(p.name for p in ws.build.iterdir()) <= {"keep.txt", ".forge", ".doit.sqlite"}
    assert keep.read_text() == "x"
