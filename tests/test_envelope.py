"""The memory envelope on the demo: the estimator's terms against what llama.cpp allocates, a
variant over its tier's budget failing with the named rule, and a sensory figure changed rerunning
the envelope steps alone."""
from __future__ import annotations

import json
import re

import pytest

from conftest import assert_ok

pytestmark = pytest.mark.build


def envelope_report(ws, variant):
    reports = [json.loads(p.read_text()) for p in (ws.build / "store" / "envelope").glob("*/envelope.json")]
    return next(r for r in reports if r["variant"] == variant)


def test_estimate_matches_what_llama_cpp_allocates(demo_workspace):
    report = envelope_report(demo_workspace, "demo")
    rows = {r["term"]: r for r in report["comparison"]}
    for term in ("weights", "KV cache", "recurrent state"):
        assert rows[term]["measured_bytes"], term
        assert abs(rows[term]["error_pct"]) <= 5.0, rows[term]
    # n_ctx is per persona; with a unified cache the pool is n_ctx x n_seq_max.
    assert report["runtime"]["n_ctx"] == 8192 * 4 and report["runtime"]["n_seq_max"] == 4
    assert report["verdict"]["passed"]
    assert {t["id"] for t in report["terms"]} >= {"weights_gpu", "weights_host", "kv", "recurrent", "compute",
                                                  "projector", "vision_compute", "checkpoints"}


def test_a_variant_over_its_budget_fails_naming_the_rule(demo_workspace):
    run = demo_workspace.doit("alloy=demo", "tier.budget.model_max_gb=0.01")
    assert run.proc.returncode != 0
    assert "does not fit its tier" in run.out
    assert re.search(r"model files <= model budget \([\d.]+ GiB against 0\.010 GiB, short by [\d.]+ GiB\)", run.out)


def test_changing_a_sensory_figure_reruns_only_the_envelopes_and_what_records_them(demo_workspace):
    ws = demo_workspace
    before = ws.lock()["variants"]["demo"]["envelope"]["sensory_bytes"]
    path = ws.conf / "sensory" / "m4.yaml"
    path.write_text(path.read_text().replace("memory_mb: 852", "memory_mb: 900"))
    run = ws.doit()
    assert_ok(run)
    # The envelope is a gate the receipt waits on, and the lock and registry carry its figures: those
    # are rewritten (no weights read); no conversion, quantization, quality gate or smoke runs again.
    assert run.executed and all(t.split(":")[0] in ("envelope", "receipt", "lock", "registry")
                                for t in run.executed), run.out
    assert "envelope:demo" in run.executed
    # The lock records the new figure (48 MB more of speech-to-text).
    assert ws.lock()["variants"]["demo"]["envelope"]["sensory_bytes"] == before + 48_000_000
    again = ws.doit()
    assert again.executed == set(), again.out


def test_gpu_backends_carry_their_measured_runtime_term():
    from compiler import config, envelope

    shape = {"n_attn_layers": 8, "n_head_kv": 4, "key_length": 256, "value_length": 256, "ssm_d_conv": 4,
             "ssm_d_inner": 4096, "ssm_n_group": 16, "ssm_d_state": 128, "n_recurrent_layers": 24,
             "token_embd_bytes": 10**8, "weights_bytes": 2 * 10**9, "tied_output": False, "n_vocab": 248320,
             "n_ff": 9216, "n_embd": 2560}
    runtime = {}
    for backend in ("cuda", "vulkan", "metal", "cpu"):
        cfg = config.compose("corvette", "q4_k_m", [f"backend={backend}"])
        rt = envelope.runtime(cfg)
        terms = {t["id"]: t for t in envelope.estimate(shape, None, rt, bool(cfg["backend"]["gpu"]))}
        runtime[backend] = terms.get("backend_runtime", {}).get("bytes", 0)
        if runtime[backend]:
            assert terms["backend_runtime"]["where"] == "gpu"
    # CUDA's context and cuBLAS workspaces, Vulkan's device objects: measured on an H200 (conf/backend).
    assert runtime == {"cuda": 756 * 2**20, "vulkan": 208 * 2**20, "metal": 0, "cpu": 0}


def test_the_largest_image_is_measured_once_per_projector_and_tier(demo_workspace):
    # demo (Q4_K_M) and demo-q8 (Q8_0) share a source, a tier and an F16 projector: one image-fit
    # step serves both envelopes (it does not depend on the quant).
    ws = demo_workspace
    fits = [t for t in ws.first_run.executed if t.startswith("image-fit:")]
    assert len(fits) == 1, ws.first_run.executed
    images = [envelope_report(ws, v)["measured"]["image"] for v in ("demo", "demo-q8")]
    assert images[0] == images[1]
    assert images[0]["image_px"] == 1024 and images[0]["image_tokens"] == (1024 // 32) ** 2
    assert "one 1024px image: 1024 tokens" in ws.first_run.out


def test_a_largest_image_beyond_one_persona_context_fails_naming_it(demo_workspace):
    run = demo_workspace.doit("alloy=demo", "tier.n_ctx=768")
    assert run.proc.returncode != 0
    assert "the tier's largest image (1024px) takes 1024 tokens, more than one persona's context of 768" in run.out
    assert "tier.max_image_px or tier.n_ctx" in run.out
