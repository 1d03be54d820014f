"""The configuration the product depends on: every quant the issue names exists with its imatrix
need, the schema accepts exactly what conf offers, tiers carry the product's budgets."""
from __future__ import annotations

import json

import pytest

from compiler import config
from compiler.paths import SCHEMA_DIR

NAMED = ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_k_s", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k", "iq4_xs",
         "iq4_nl", "iq3_m", "iq3_s", "iq3_xs", "iq3_xxs", "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs"]


def test_every_named_quant_is_configured_and_says_whether_it_needs_an_imatrix():
    assert set(NAMED) <= set(config.choices("quant"))
    for q in NAMED:
        cfg = config.compose("m4", q, [])
        assert cfg["quant"]["llama_type"] == q.upper()
        assert cfg["quant"]["imatrix"] in ("required", "recommended", "none")
    # llama-quantize itself refuses these without an imatrix (FACTS.md).
    for q in ("iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs"):
        assert config.compose("m4", q, [])["quant"]["imatrix"] == "required"


def test_iq3_alias_names_one_type():
    assert config.resolve_quant("iq3", "test") == "iq3_m"
    assert config.resolve_quant("IQ3_XXS", "test") == "iq3_xxs"


def test_schema_enums_match_conf():
    schema = json.loads((SCHEMA_DIR / "alloy.schema.json").read_text())
    assert sorted(schema["properties"]["tier"]["enum"]) == config.choices("tier")
    llama_types = set(schema["$defs"]["llamaType"]["enum"])
    for q in config.choices("quant"):
        assert config.compose("m4", q, [])["quant"]["llama_type"] in llama_types


@pytest.mark.parametrize("tier, backend, sensory", [("m4", "metal", "m4"), ("air", "metal", "air"),
                                                     ("corvette", "cuda", "corvette")])
def test_tiers_bring_their_backend_and_sensory_stack(tier, backend, sensory):
    cfg = config.compose(tier, "q4_k_m", [])
    assert cfg["backend"]["name"] == backend and cfg["sensory"]["name"] == sensory
    assert all("FACTS.md" in p["source"] or "product convention" in p["source"] for p in cfg["sensory"]["processes"])


def test_product_budgets():
    assert config.compose("m4", "q4_k_m", [])["tier"]["budget"] == {"model_max_gb": 4, "sensory_max_gb": 8,
                                                                     "slack_min_gb": 20}
    assert config.compose("air", "q4_k_m", [])["tier"]["budget"] == {"total_max_gb": 8}
    assert config.compose("corvette", "q4_k_m", [])["tier"]["budget"]["vram_max_gb"] >= 24


def test_overrides_reach_the_composed_config():
    cfg = config.compose("m4", "q4_k_m", ["backend=vulkan", "tier.n_seq_max=4"])
    assert cfg["backend"]["name"] == "vulkan" and cfg["tier"]["n_seq_max"] == 4
