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


def test_changing_a_sensory_figure_reruns_only_the_envelopes_and_the_registry(demo_workspace):
    ws = demo_workspace
    path = ws.conf / "sensory" / "m4.yaml"
    path.write_text(path.read_text().replace("memory_mb: 852", "memory_mb: 900"))
    run = ws.doit()
    assert_ok(run)
    # The registry carries the envelope's figures, so it is regenerated too; nothing else runs.
    assert run.executed and all(t.startswith("envelope:") or t == "registry" for t in run.executed), run.out
    assert "envelope:demo" in run.executed
    again = ws.doit()
    assert again.executed == set(), again.out
