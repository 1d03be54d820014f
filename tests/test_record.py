"""The record is right: only variants that passed every gate, and only declared ones, reach the
committed lock; the registry is regenerated from committed files alone (the merge job); the lock
says which backend a smoke really ran on; two runs at once end as one would have."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import threading

import pytest

from conftest import DEMO_ALLOY, ROOT, TRAINED_SOURCE, Workspace, assert_ok

LOCK = ROOT / "alloys" / "forge.lock.json"
REGISTRY = ROOT / "model_registry.json"


def registry_check(alloys, build, registry=REGISTRY, conf=ROOT / "conf"):
    """The merge job's command, on a checkout's committed files, with no build/ directory."""
    import os

    env = dict(os.environ, FORGE_ALLOYS_DIR=str(alloys), FORGE_BUILD_DIR=str(build), FORGE_REGISTRY=str(registry),
               FORGE_CONF_DIR=str(conf))
    return subprocess.run([sys.executable, "-m", "compiler.registry", "--check"], capture_output=True, text=True,
                          env=env, cwd=ROOT)


def test_merge_job_regenerates_the_committed_registry_without_build(tmp_path):
    build = tmp_path / "no-build"  # never created: nothing under build/ may be needed
    ok = registry_check(ROOT / "alloys", build)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert not build.exists()
    assert "demo" in json.loads(REGISTRY.read_text())["models"]
    # The demo alloy's quant edited without forging and re-locking: its record no longer describes
    # the alloy, so the regenerated registry drops the entry and the check fails with the diff.
    alloys = tmp_path / "alloys"
    shutil.copytree(ROOT / "alloys", alloys)
    demo = json.loads((alloys / "demo.alloy.json").read_text())
    next(s for s in demo["stages"] if s["type"] == "quant")["quantTypes"] = ["Q6_K"]
    (alloys / "demo.alloy.json").write_text(json.dumps(demo, indent=2) + "\n")
    stale = registry_check(alloys, build)
    assert stale.returncode == 1
    assert '-    "demo": {' in stale.stdout and "is stale" in stale.stderr
    # The same when conf/ changed under the lock (the m4 tier's sensory stack): the recorded envelope
    # no longer describes what the tier asks, so the entry is not listed until it is forged again.
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    sensory = conf / "sensory" / "m4.yaml"
    sensory.write_text(sensory.read_text().replace("memory_mb: 852", "memory_mb: 900"))
    moved = registry_check(ROOT / "alloys", build, conf=conf)
    assert moved.returncode == 1 and '-    "demo": {' in moved.stdout


def test_committed_lock_holds_only_declared_variants():
    lock = json.loads(LOCK.read_text())["variants"]
    assert lock, "the committed lock is empty"
    assert all(not entry.get("overrides") for entry in lock.values()), list(lock)



@pytest.mark.build
def test_a_deleted_alloy_leaves_the_lock_and_verify_skips_it_saying_why(tmp_path, demo_workspace, monkeypatch, capsys):
    from compiler import verify

    # A checkout of the session's build whose alloys/ no longer has demo-q8 (the lock still does).
    ws = Workspace(tmp_path / "ws")
    ws.seed(demo_workspace.build / "store", tuple(p.name for p in (demo_workspace.build / "store").iterdir()))
    shutil.copy(DEMO_ALLOY, ws.alloys / DEMO_ALLOY.name)
    shutil.copy(demo_workspace.alloys / "forge.lock.json", ws.alloys / "forge.lock.json")
    gone = set(ws.lock()["variants"]) - {"demo"}  # demo-q8, and what other tests added to the session's
    assert "demo-q8" in gone
    # Before any doit: an unfiltered verify leaves them out, saying why, instead of failing on them.
    monkeypatch.setenv("FORGE_ALLOYS_DIR", str(ws.alloys))
    assert verify.selected(ws.lock(), {}) == ["demo"]
    said = capsys.readouterr().out
    assert all(f"{v} skipped: its alloy {v} is no longer in" in said for v in gone), said
    # The next doit (whatever it selects) drops their entries; the registry no longer lists them.
    run = ws.doit("alloy=demo")
    assert_ok(run)
    assert all(f"lock: {v} leaves forge.lock.json: alloy {v} is no longer in" in run.out for v in gone), run.out[-3000:]
    assert set(ws.lock()["variants"]) == {"demo"}
    assert set(json.loads(ws.registry.read_text())["models"]) == {"demo"}
    again = ws.doit("alloy=demo")
    assert_ok(again)
    assert again.executed == set(), again.out[-2000:]


@pytest.mark.build
def test_over_budget_variant_gets_no_receipt_lock_entry_or_links(demo_workspace):
    ws = demo_workspace
    lock_before = (ws.alloys / "forge.lock.json").read_bytes()
    run = ws.doit("alloy=demo", "tier.budget.model_max_gb=0.01", "lock=1")  # lock=1: it would be recorded
    assert run.proc.returncode != 0
    assert "model files <= model budget" in run.out
    assert not any(t.startswith(("receipt:", "lock:")) for t in run.executed), run.executed
    assert (ws.alloys / "forge.lock.json").read_bytes() == lock_before
    assert not [p for p in (ws.build / "variants").iterdir() if "model_max_gb" in p.name]


@pytest.mark.build
def test_an_override_is_an_experiment_kept_out_of_the_committed_lock(demo_workspace):
    ws = demo_workspace
    lock_before = (ws.alloys / "forge.lock.json").read_bytes()
    run = ws.doit("alloy=demo", "quant=q6")
    assert_ok(run)
    assert "lock:demo@q6_k" in run.executed
    assert "not in the committed lock" in run.out
    assert (ws.alloys / "forge.lock.json").read_bytes() == lock_before
    experiments = json.loads((ws.build / "experiments.lock.json").read_text())["variants"]
    assert experiments["demo@q6_k"]["quant"] == "Q6_K" and experiments["demo@q6_k"]["overrides"] == ["quant=q6_k"]
    # A lock edited (or reverted by git) is rewritten by the next run: the lock task checks content.
    data = json.loads(lock_before)
    data["variants"]["demo"]["modelHash"] = "sha256:" + "0" * 64
    (ws.alloys / "forge.lock.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    again = ws.doit("alloy=demo")
    assert_ok(again)
    assert again.executed == {"lock:demo"}, again.executed
    assert (ws.alloys / "forge.lock.json").read_bytes() == lock_before


@pytest.mark.build
def test_a_cpu_smoke_never_claims_the_gpu_backend(demo_workspace):
    ws = demo_workspace
    entry = ws.lock()["variants"]["demo"]
    # The demo's tier (m4) targets Metal; this machine's smoke ran on llama.cpp's CPU backend.
    assert entry["verification"] == {"backend": "metal", "ran_on": "cpu", "verified": False,
                                     "summary": "mechanics verified on cpu, metal not verified"}
    listed = json.loads(ws.registry.read_text())["models"]["demo"]
    assert listed["verification"]["summary"] == "mechanics verified on cpu, metal not verified"
    assert entry["envelope"]["total_bytes"] > 0 and entry["smoke"]["passed"]


def _tree(store):
    return sorted((str(p.relative_to(store)), hashlib.sha256(p.read_bytes()).hexdigest())
                  for p in store.rglob("*") if p.is_file() and p.suffix not in (".log", ".lock")
                  and p.name != "manifest.json")


@pytest.mark.build
def test_two_runs_at_once_end_as_one_would_have(tmp_path, demo_workspace, demo_seed):
    ws = Workspace(tmp_path / "together")
    # The trained source from the session's seed (training is not what this test is about); every
    # later step is built here, by whichever run gets to it first.
    ws.seed(demo_seed, TRAINED_SOURCE)
    shutil.copy(DEMO_ALLOY, ws.alloys / DEMO_ALLOY.name)
    runs = [None, None]

    def go(i):
        runs[i] = ws.doit("alloy=demo")

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for run in runs:
        assert_ok(run)
    # Each step was built exactly once across both runs: the other run waited for it and found it
    # complete (or doit's shared record already had it up to date). The seeded source, by neither.
    steps = {t for r in runs for t in r.executed | r.skipped
             if ":" in t and not t.startswith(("lock:", "toolchain"))}
    source = next(t for t in steps if t.startswith("source:"))
    assert len(steps) > 10, steps
    for step in steps - {source}:
        assert sum(r.out.count(f"{step}: done in") for r in runs) == 1, (step, [r.out[-3000:] for r in runs])
    assert sum(r.out.count(f"{source}: done in") for r in runs) == 0
    # The same lock entry as the session's single run of the demo: step keys, outputs, smoke (the
    # session's workspace has had its sensory conf edited by then, so the envelope and the receipt
    # that waits on it are keyed apart), and the same store contents.
    together, single = ws.lock()["variants"]["demo"], demo_workspace.lock()["variants"]["demo"]
    for field in ("outputs", "modelHash", "smoke", "source", "toolchain", "verification"):
        assert together[field] == single[field], field
    assert {k: v for k, v in together["keys"].items() if k != "receipt"} == \
        {k: v for k, v in single["keys"].items() if k != "receipt"}
    assert not list((ws.build / "store").glob("*/*.partial-*"))
    # Byte for byte: every artifact the two runs left in the store (checkpoint, conversions,
    # importance matrix, quants, reference logits) is the single run's file of the same key; the
    # reports beside them carry what was measured (seconds, memory, tokens/s) and the executed
    # alloy its time of writing, so those are compared by name.
    single_files = dict(_tree(demo_workspace.build / "store"))
    together_files = dict(_tree(ws.build / "store"))
    assert set(together_files) <= set(single_files)
    artifacts = [n for n in together_files if n.split("/")[0] in ARTIFACT_KINDS]
    assert any(n.endswith(".gguf") for n in artifacts) and any(n.startswith("imatrix/") for n in artifacts)
    differ = [n for n in artifacts if together_files[n] != single_files[n]]
    assert not differ, differ


ARTIFACT_KINDS = ("synthetic", "convert", "mmproj", "imatrix", "quantize", "kld-base")
