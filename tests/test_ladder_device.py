"""device_target_ladder over the product's hardware profiles: each gets a tier and the best entry
that fits, with the reason; machines without a supported GPU get a clear no."""
from __future__ import annotations

import pytest

from compiler.errors import ForgeError
from compiler.ladder import PROFILES, Profile, choose, load_rules, probe
from conftest import ROOT

GB = 10**9


def entry(tier, quant, backends, weights, gpu, total, unified=None, vram=None, params=None):
    return {"tier": tier, "quant": quant, "backends": backends, "parameters": {"text": params, "projector": 0},
            "envelope": {"weights_bytes": weights * GB, "gpu_resident_bytes": gpu * GB, "total_bytes": total * GB,
                         "kv_bytes": 0, "recurrent_bytes": 0, "projector_bytes": 0},
            "device_hints": {"tiers": [tier], "min_unified_memory_gb": unified, "min_vram_gb": vram}}


# Figures of the shape of the fit matrix's m4/air/corvette variants.
MODELS = {
    "qwen3.5-4b-m4-vision": entry("m4", "Q4_K_M", ["metal", "vulkan"], 2.7, 4.6, 5.2, unified=13, params=4.54e9),
    "qwen3.5-2b-air-vision": entry("air", "IQ4_XS", ["metal", "vulkan"], 1.0, 2.2, 2.6, unified=6, params=2.21e9),
    "qwen3.5-9b-corvette-vision": entry("corvette", "Q4_K_M", ["cuda", "vulkan"], 5.6, 9.5, 10.5, vram=11, params=9.41e9),
}
M4, AIR, NINE = MODELS
P = PROFILES

CASES = [
    ("MacBook Air M1 8 GB", "air", AIR, "< 14,000 MB"),
    ("M2 Air 16 GB", "m4", M4, "smaller end"),
    ("M3 Pro 18 GB", "m4", M4, "18 GB unified"),
    ("M2 Pro 24 GB", "m4", M4, ">= 24,000 MB"),
    ("M4 Max 36 GB", "m4", M4, ">= 24,000 MB"),
    ("M5 Max 48 GB", "m4", M4, ">= 24,000 MB"),
    ("RTX 3090 24 GB", "corvette", NINE, "24 GB VRAM"),
    ("RTX 4090 24 GB", "corvette", NINE, "RTX 4090"),
    ("RTX 5090 32 GB", "corvette", NINE, "32 GB VRAM"),
    ("M4 Max 36 GB with little free memory now", "m4", AIR, "only 4 GB is available at the moment"),
]


@pytest.mark.parametrize("label, tier, alias, why", CASES, ids=[c[0] for c in CASES])
def test_profiles_get_a_tier_and_the_best_entry_that_fits(label, tier, alias, why):
    d = choose(P[label], MODELS)
    assert (d.tier, d.entry) == (tier, alias), d.reason
    assert why in d.reason and alias in d.reason


def test_an_unknown_nvidia_card_is_placed_by_its_vram():
    d = choose(Profile("linux", "AMD Ryzen 9 7950X", 64, 50, "nvidia", "NVIDIA Quadro Future X", 48, 47.5), MODELS)
    assert (d.tier, d.entry) == ("corvette", NINE) and "48 GB VRAM" in d.reason


def test_the_products_rules_pick_by_size_and_refuse_small_macs():
    rules = load_rules("continuum-pr1003")
    small = dict(MODELS, **{"qwen3.5-0.8b-air-vision": entry("air", "Q4_K_M", ["metal", "vulkan"], 0.5, 1.3, 1.6,
                                                                 unified=5, params=0.85e9)})
    for label, want in [("M2 Air 16 GB", "qwen3.5-0.8b-air-vision"), ("M3 Pro 18 GB", "qwen3.5-0.8b-air-vision"),
                        ("M2 Pro 24 GB", AIR), ("M4 Max 36 GB", M4), ("M5 Max 48 GB", M4)]:
        assert choose(P[label], small, rules).entry == want, label
    refused = choose(P["MacBook Air M1 8 GB"], small, rules)
    assert refused.entry is None and refused.backend is None and "under 16 GB" in refused.reason
    # Without an entry of the size its rule names, nothing -- said so, never a larger one.
    none = choose(P["M2 Air 16 GB"], MODELS, rules)
    assert none.entry is None and "no registry entry that small" in none.reason
    with pytest.raises(ForgeError, match="unknown ladder rules 'nope'.*continuum-pr1003, seed"):
        load_rules("nope")


def test_a_malformed_rule_is_named(tmp_path, monkeypatch):
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf" / "ladder", conf / "ladder")
    (conf / "ladder" / "bad.yaml").write_text("name: bad\napple:\n  - {min_gb: 16, tier: m4, max_parameters: 5}\n")
    monkeypatch.setenv("FORGE_CONF_DIR", str(conf))
    with pytest.raises(ForgeError, match=r"bad.yaml apple\[0\]: a rule needs a floor .* exactly one of tier"):
        load_rules("bad")


def test_the_docs_table_is_the_rules_applied_to_the_committed_alloys():
    from compiler.ladder import fit_matrix_entries, table

    assert (ROOT / "docs" / "ladder-rules.md").read_text() == table(fit_matrix_entries()), \
        "docs/ladder-rules.md is stale: run `.venv/bin/python -m compiler.ladder --table docs/ladder-rules.md`"


def test_intel_mac_gets_a_clear_no():
    d = choose(P["Intel Mac 32 GB"], MODELS)
    assert d.entry is None and d.tier is None and "Intel Mac" in d.reason


def test_linux_box_without_gpu_never_falls_back_to_cpu():
    d = choose(P["Linux box without a GPU"], MODELS)
    assert d.entry is None and d.backend is None
    assert "no Metal, CUDA or Vulkan GPU" in d.reason and "never falls back to the CPU" in d.reason


def test_small_nvidia_card_gets_no_corvette_entry_and_says_why():
    d = choose(P["RTX 3060 12 GB (8 free)"], MODELS)
    assert d.entry is None and "exceeds 8 GB of free VRAM" in d.reason


def test_probe_reads_this_machine():
    p = probe()
    assert p.total_memory_gb > 1 and 0 < p.available_memory_gb <= p.total_memory_gb + 0.1
    assert p.cpu_brand
