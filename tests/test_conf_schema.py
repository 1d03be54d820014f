"""Overrides and conf files are checked against compiler/conf_schema.py when the graph is planned:
a value of the wrong type or out of range is refused with exit code 2, naming the key, the value and
what is allowed, and nothing runs (issue 14: `tier.n_seq_max=abc` used to die inside the envelope
step, `tier.n_seq_max=0` inside the registry). Every committed conf combination passes, unchanged."""
from __future__ import annotations

import json
import re
import shutil

import pytest

from compiler import conf_schema, config
from compiler.errors import ForgeError
from conftest import DEMO_ALLOY, Workspace


@pytest.fixture
def ws(tmp_path):
    w = Workspace(tmp_path)
    shutil.copy(DEMO_ALLOY, w.alloys / DEMO_ALLOY.name)
    return w


@pytest.mark.parametrize("override, key, found, allowed", [
    ("tier.n_seq_max=abc", "tier.n_seq_max", "'abc'", "an integer from 1 to 256"),
    ("tier.n_seq_max=0", "tier.n_seq_max", "0", "an integer from 1 to 256"),
    ("tier.n_ctx=-5", "tier.n_ctx", "-5", "an integer >= 256, a multiple of 256"),
])
def test_wrong_override_is_refused_on_the_command_line_before_anything_runs(ws, override, key, found, allowed):
    ws.build.mkdir(parents=True)
    keep = ws.build / "keep.txt"
    keep.write_text("x")
    # Without the check this would start building the demo; the timeout keeps that from hanging.
    run = ws.doit("alloy=demo", override, timeout=300)
    err = run.proc.stderr
    assert run.proc.returncode == 2, run.out[-3000:]
    assert "refused, nothing was built or deleted" in err
    assert "Traceback" not in run.out
    assert f"override {override}: invalid value for {key}" in err
    assert re.search(rf"^\s+found:\s+{re.escape(found)}$", err, re.M), err
    assert re.search(rf"^\s+allowed:\s+{re.escape(allowed)}$", err, re.M), err
    assert not run.executed
    # Only bookkeeping (the stat cache, doit's own record) may appear; nothing built, nothing removed.
    assert {p.name for p in ws.build.iterdir()} <= {"keep.txt", ".forge", ".doit.sqlite", ".doit.db"}
    assert keep.read_text() == "x"


def refused(overrides: list[str], tier: str = "m4", quant: str = "q4_k_m") -> str:
    with pytest.raises(ForgeError) as e:
        config.compose(tier, quant, overrides)
    return str(e.value)


@pytest.mark.parametrize("override, allowed", [
    ("tier.memory.gpu_working_set_fraction=1.5", "a number > 0 and <= 1"),
    ("quant.gate.max_top_miss_x_q8=0", "a number > 0"),
    ("tier.cache_type_k=q5_1", "one of f32, f16, bf16, q8_0, q4_0"),
    ("tier.cache_type_v=F16", "one of f32, f16, bf16, q8_0, q4_0"),
    ("tier.budget.model_max_gb=0", "a number > 0"),
    ("tier.budget.sensory_max_gb=-2.5", "a number > 0"),
    ("tier.budget.model_max_gb=lots", "a number > 0"),
    ("tier.kv_unified=maybe", "true or false"),
    ("smoke.gpu=sometimes", "one of auto, required, off"),
    ("backend.n_gpu_layers=-1", "an integer >= 0, or 'all'"),
    ("tier.backend_default=opengl", "one of cpu, cuda, metal, vulkan"),
])
def test_schema_refuses_wrong_values_naming_key_value_and_what_is_allowed(override, allowed):
    key, value = override.split("=", 1)
    msg = refused([override])
    assert f"override {override}: invalid value for {key}" in msg
    assert value in msg.split("found:", 1)[1].splitlines()[0]
    assert f"allowed: {allowed}" in msg


def test_an_unknown_llama_type_lists_the_known_ones():
    msg = refused(["quant.llama_type=Q4_K_X"])
    assert "invalid value for quant.llama_type" in msg and "'Q4_K_X'" in msg
    assert "Q4_K_M" in msg and "IQ3_XXS" in msg


def test_a_quant_llama_quantize_refuses_without_an_imatrix_cannot_be_made_optional():
    msg = refused(["quant.imatrix=recommended"], quant="iq2_xxs")
    assert "invalid value for quant.imatrix" in msg and "llama_refuses_without_imatrix" in msg


def test_an_added_budget_rule_must_be_one_the_envelope_knows():
    msg = refused(["+tier.budget.vram_gb=24"])
    assert "tier.budget.vram_gb is not a configuration key" in msg
    assert "vram_max_gb" in msg and "total_max_gb" in msg


def test_a_rule_added_to_a_tier_reaches_the_config_and_unset_rules_stay_absent():
    cfg = config.compose("air", "q4_k_m", ["+tier.budget.model_max_gb=3.5"])
    assert cfg["tier"]["budget"] == {"model_max_gb": 3.5, "total_max_gb": 8}


def test_values_come_out_typed():
    # A quoted number is a string to Hydra; the schema makes it the integer the planner multiplies.
    cfg = config.compose("m4", "q4_k_m", ["tier.n_seq_max='2'", "tier.memory.os_reserve_gb=2"])
    assert cfg["tier"]["n_seq_max"] == 2 and isinstance(cfg["tier"]["n_seq_max"], int)
    assert cfg["tier"]["memory"]["os_reserve_gb"] == 2


def test_a_bad_value_in_a_conf_file_names_that_file_and_the_list_item():
    data, chosen = config._hydra_compose(("tier=air",))
    data["sensory"]["processes"][1]["memory_mb"] = "a lot"
    with pytest.raises(ForgeError) as e:
        conf_schema.validate(data, where=lambda key: config.value_origin(key, ("tier=air",), chosen))
    msg = str(e.value)
    assert msg.startswith(str(config.conf_dir() / "sensory" / "air.yaml") + ": ")
    assert "invalid value for sensory.processes[1].memory_mb" in msg and "'a lot'" in msg


@pytest.mark.parametrize("tier", config.choices("tier"))
@pytest.mark.parametrize("backend", config.choices("backend"))
def test_every_committed_combination_composes_validates_and_keeps_its_values(tier, backend):
    for quant in config.choices("quant"):
        overrides = (f"tier={tier}", f"quant={quant}", f"backend={backend}")
        raw, chosen = config._hydra_compose(overrides)
        checked = conf_schema.validate(raw, where=lambda key: config.value_origin(key, overrides, chosen))
        # Byte for byte, order and int/float included: the configuration enters step keys, so a
        # value the schema rewrote (8 -> 8.0) would re-plan every envelope and break the lock.
        assert json.dumps(checked) == json.dumps(raw), overrides
