"""model_registry.json from the demo build: backward-compatible entries with the vision fields,
deterministic bytes, a check mode that catches a stale file, and only variants that passed."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, assert_ok

pytestmark = pytest.mark.build
OLD_FIELDS = {"repo", "format", "architecture", "description", "min_memory_gb", "chat_template"}


def check(ws, *args):
    return subprocess.run([sys.executable, "-m", "compiler.registry", *args], capture_output=True, text=True,
                          env=ws.env(), cwd=ROOT)


def test_demo_entry_keeps_old_fields_and_adds_the_vision_ones(demo_workspace):
    ws = demo_workspace
    assert_ok(ws.doit("alloy=demo"))
    data = json.loads(ws.registry.read_text())
    entry = data["models"]["demo"]
    assert OLD_FIELDS <= set(entry) and entry["format"] == "gguf" and entry["min_memory_gb"] >= 1
    assert entry["chat_template"] in data["chat_templates"]
    lock = ws.lock()["variants"]["demo"]
    assert {(f["filename"], f["sha256"], f["size"]) for f in entry["files"]} == \
        {(o["filename"], o["sha256"], o["size"]) for o in lock["outputs"]}
    assert {f["role"] for f in entry["files"]} == {"text", "mmproj"}
    assert entry["tier"] == "m4" and entry["quant"] == "Q4_K_M" and "metal" in entry["backends"]
    assert entry["n_seq_max"] >= 1 and entry["envelope"]["kv_bytes"] > 0 and entry["envelope"]["recurrent_bytes"] > 0
    assert entry["device_hints"]["tiers"] == ["m4"] and entry["device_hints"]["min_unified_memory_gb"] >= 1
    assert entry["alloy_hash"] == lock["alloyHash"]


def test_regeneration_is_byte_identical_and_check_mode_catches_staleness(demo_workspace):
    ws = demo_workspace
    before = ws.registry.read_bytes()
    ok = check(ws, "--check")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    data = json.loads(before)
    data["models"]["demo"]["description"] = "edited by hand"
    ws.registry.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    stale = check(ws, "--check")
    assert stale.returncode == 1 and "edited by hand" in stale.stdout and "is stale" in stale.stderr
    run = ws.doit("alloy=demo")
    assert_ok(run)
    assert "registry" in run.executed
    assert ws.registry.read_bytes() == before
    # The catalog export is checked and regenerated with it.
    catalog = ws.registry.with_name("model_catalog.json")
    rows = json.loads(catalog.read_text())
    assert [r["registry_alias"] for r in rows["rows"]] == sorted(data["models"])  # a row per entry
    row = next(r for r in rows["rows"] if r["registry_alias"] == "demo")
    assert row["id"] == row["gguf_hint"].removeprefix("huggingface.co/") == data["models"]["demo"]["repo"]
    assert "Vision" in row["capabilities"] and row["chat_template"] is None and row["parameter_count"] > 0
    kept = catalog.read_bytes()
    row["context_window"] = 262144
    catalog.write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n")
    edited = check(ws, "--check")
    assert edited.returncode == 1 and "262144" in edited.stdout and "model_catalog.json is stale" in edited.stderr
    assert_ok(ws.doit("alloy=demo"))
    assert catalog.read_bytes() == kept


def test_a_variant_that_failed_a_gate_is_not_listed(demo_workspace):
    ws = demo_workspace
    # A Q8_0 is its own yardstick: asked to be half as far from the reference as itself, it fails.
    run = ws.doit("alloy=demo", "quant=q8_0", "quant.gate.max_mean_kld_x_q8=0.5")
    assert run.proc.returncode != 0
    models = json.loads(ws.registry.read_text())["models"]
    assert not any("max_mean_kld" in alias for alias in models)
    assert "demo" in models
