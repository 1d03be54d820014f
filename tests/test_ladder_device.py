"""device_target_ladder over the product's hardware profiles: each gets a tier and the best entry
that fits, with the reason; machines without a supported GPU get a clear no."""
from __future__ import annotations

import pytest

from compiler.ladder import Profile, choose, probe

GB = 10**9


def entry(tier, quant, backends, weights, gpu, total, unified=None, vram=None):
    return {"tier": tier, "quant": quant, "backends": backends,
            "envelope": {"weights_bytes": weights * GB, "gpu_resident_bytes": gpu * GB, "total_bytes": total * GB,
                         "kv_bytes": 0, "recurrent_bytes": 0, "projector_bytes": 0},
            "device_hints": {"tiers": [tier], "min_unified_memory_gb": unified, "min_vram_gb": vram}}


# Figures of the shape of the fit matrix's m4/air/corvette variants.
MODELS = {
    "continuum-ai/qwen3.5-4b-m4-vision": entry("m4", "Q4_K_M", ["metal", "vulkan"], 2.7, 4.6, 5.2, unified=13),
    "continuum-ai/qwen3.5-2b-air-vision": entry("air", "IQ3_M", ["metal", "vulkan"], 1.0, 2.2, 2.6, unified=6),
    "continuum-ai/qwen3.5-9b-corvette-vision": entry("corvette", "Q4_K_M", ["cuda", "vulkan"], 5.6, 9.5, 10.5, vram=11),
}
M4, AIR, NINE = MODELS

mac = lambda brand, gb, avail: Profile("macos", brand, gb, avail, "apple" if "Apple" in brand else None)  # noqa: E731
nv = lambda name, vram, free=None: Profile("linux", "AMD Ryzen 9 7950X", 64, 50, "nvidia", name, vram,  # noqa: E731
                                           free if free is not None else vram - 0.5)

CASES = [
    ("MacBook Air M1 8 GB", mac("Apple M1", 8, 5.5), "air", AIR, "< 14,000 MB"),
    ("M2 Air 16 GB", mac("Apple M2", 16, 10), "m4", M4, "smaller end"),
    ("M3 Pro 18 GB", mac("Apple M3 Pro", 18, 12), "m4", M4, "18 GB unified"),
    ("M4 Max 36 GB", mac("Apple M4 Max", 36, 28), "m4", M4, ">= 24,000 MB"),
    ("M5 Max 48 GB", mac("Apple M5 Max", 48, 40), "m4", M4, ">= 24,000 MB"),
    ("RTX 3090 24 GB", nv("NVIDIA GeForce RTX 3090", 24), "corvette", NINE, "24 GB VRAM"),
    ("RTX 4090 24 GB", nv("NVIDIA GeForce RTX 4090", 24), "corvette", NINE, "RTX 4090"),
    ("RTX 5090 32 GB", nv("NVIDIA GeForce RTX 5090", 32), "corvette", NINE, "32 GB VRAM"),
    ("unknown NVIDIA card, by its VRAM", nv("NVIDIA Quadro Future X", 48), "corvette", NINE, "48 GB VRAM"),
    ("M4 Max 36 GB with little free memory now", mac("Apple M4 Max", 36, 4), "m4", AIR,
     "only 4 GB is available at the moment"),
]


@pytest.mark.parametrize("label, profile, tier, alias, why", CASES, ids=[c[0] for c in CASES])
def test_profiles_get_a_tier_and_the_best_entry_that_fits(label, profile, tier, alias, why):
    d = choose(profile, MODELS)
    assert (d.tier, d.entry) == (tier, alias), d.reason
    assert why in d.reason and alias in d.reason


def test_intel_mac_gets_a_clear_no():
    d = choose(Profile("macos", "Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz", 32, 20), MODELS)
    assert d.entry is None and d.tier is None and "Intel Mac" in d.reason


def test_linux_box_without_gpu_never_falls_back_to_cpu():
    d = choose(Profile("linux", "AMD EPYC", 24, 20), MODELS)
    assert d.entry is None and d.backend is None
    assert "no Metal, CUDA or Vulkan GPU" in d.reason and "never falls back to the CPU" in d.reason


def test_small_nvidia_card_gets_no_corvette_entry_and_says_why():
    d = choose(nv("NVIDIA GeForce RTX 3060", 12, free=8), MODELS)
    assert d.entry is None and "exceeds 8 GB of free VRAM" in d.reason


def test_probe_reads_this_machine():
    p = probe()
    assert p.total_memory_gb > 1 and 0 < p.available_memory_gb <= p.total_memory_gb + 0.1
    assert p.cpu_brand
