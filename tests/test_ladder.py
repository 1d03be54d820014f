"""The quant ladder on the demo checkpoint: importance matrices shared by the quants of a source,
IQ types that refuse to run without one, the quality gate against the BF16 reference, and bytes
that do not depend on where the build or the corpus lives."""
from __future__ import annotations

import hashlib
import json
import re
import shutil

import pytest

from compiler import config
from conftest import ROOT, SEED_KINDS, TRAINED_SOURCE, Workspace, assert_ok

pytestmark = pytest.mark.build
CORPUS = ROOT / "calibration" / "forge-calibration-v1.txt"


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ladder_workspace(root, corpus_dir, seed, kinds) -> Workspace:
    ws = Workspace(root)
    ws.seed(seed, kinds)
    # These tests judge imatrices, quants and gates, not sight: a smoke on 3 pictures per family
    # (12, against the demo's 40; test_fixture judges the full suite) is the size they need.
    cfg = ws.conf / "config.yaml"
    cfg.write_text(cfg.read_text().replace("fixture_items_per_family: 10", "fixture_items_per_family: 3"))
    corpus_dir.mkdir(parents=True, exist_ok=True)
    corpus = corpus_dir / CORPUS.name
    shutil.copy(CORPUS, corpus)
    path = ws.add_alloy("ladder")
    data = json.loads(path.read_text())
    q = next(s for s in data["stages"] if s["type"] == "quant")
    q["quantTypes"] = ["IQ2_XXS", "IQ3_M", "Q2_K", "Q8_0"]
    q["calibration"] = {"file": str(corpus), "sha256": sha256(corpus)}
    path.write_text(json.dumps(data, indent=2))
    ws.corpus = corpus
    return ws


@pytest.fixture(scope="module")
def ladder(tmp_path_factory, demo_seed):
    # The session's trained source and what every alloy on it shares; its own corpus makes its own
    # importance matrix.
    ws = ladder_workspace(tmp_path_factory.mktemp("ladder"), tmp_path_factory.mktemp("corpus-a"), demo_seed,
                          tuple(k for k in SEED_KINDS if k != "imatrix"))
    run = ws.doit()
    assert_ok(run)
    ws.first_run = run
    return ws


def gate_figures(ws, variant):
    receipt = json.loads((ws.variant(variant) / "ladder.alloy.json").read_text())
    return receipt["results"]["benchmarks"][0]["metrics"]


def test_one_imatrix_serves_every_quant_of_the_source(ladder):
    ran = ladder.first_run.executed
    assert [t for t in ran if t.startswith("imatrix:")] == ["imatrix:qwen3.5-tiny-seeing"]
    lock = ladder.lock()["variants"]
    assert set(lock) == {"ladder", "ladder@iq3_m", "ladder@q2_k", "ladder@q8_0"}
    keys = {v: lock[v]["keys"].get("imatrix") for v in lock}
    assert keys["ladder"] == keys["ladder@iq3_m"] == keys["ladder@q2_k"] is not None
    assert keys["ladder@q8_0"] is None  # 8-bit needs none
    # Declared types the published forge-alloy schema cannot name are recorded as experiments.
    assert "IQ3_M is not among the published forge-alloy schema's quantTypes" in lock["ladder@iq3_m"]["outsidePublishedSchema"]
    assert "outsidePublishedSchema" not in lock["ladder@q2_k"] and "outsidePublishedSchema" not in lock["ladder@q8_0"]
    assert (ladder.variant("ladder") / "ladder-IQ2_XXS.gguf").exists()
    assert (ladder.variant("ladder@iq3_m") / "ladder-IQ3_M.gguf").exists()
    # The imatrix is recorded as a dataset of the variants that used it.
    receipt = json.loads((ladder.variant("ladder") / "ladder.alloy.json").read_text())
    roles = {d["role"]: d for d in receipt["results"]["integrity"]["datasets"]}
    assert roles["imatrix-calibration"]["hash"] == "sha256:" + sha256(ladder.corpus)


def test_a_further_quant_reuses_the_imatrix(ladder):
    run = ladder.doit("alloy=ladder", "quant=iq3_xxs")
    assert_ok(run)
    assert "imatrix:qwen3.5-tiny-seeing" in run.skipped
    assert "quantize:ladder@iq3_xxs" in run.executed


def test_a_shipped_static_q8_0_is_the_gates_yardstick(ladder):
    """The gate's yardstick (the source's static Q8_0, stages/gate.py) finds the shipped Q8_0's
    bytes in the store, and that variant's gate reads the yardstick's figures instead of a second
    pass."""
    ran = ladder.first_run.executed
    assert {"quantize:ladder@q8_0", "kld-q8:qwen3.5-tiny-seeing"} <= ran
    assert "quantize:qwen3.5-tiny-seeing@q8_0-yardstick: already in the store" in ladder.first_run.out
    assert "Q8_0 is the source's static Q8_0: its figures are the yardstick's" in ladder.first_run.out
    q8 = gate_figures(ladder, "ladder@q8_0")
    yardstick = json.loads(next((ladder.build / "store" / "kld-q8").glob("*/q8.json")).read_text())["figures"]
    assert q8 == yardstick
    # Every other variant is judged against those figures.
    receipt = json.loads((ladder.variant("ladder@q2_k") / "ladder.alloy.json").read_text())
    limits = receipt["results"]["benchmarks"][0]["thresholds"]
    factor = config.compose("m4", "q2_k", [])["quant"]["gate"]["max_mean_kld_x_q8"]
    assert limits["mean_kld"]["max"] == pytest.approx(factor * max(yardstick["mean_kld"], 1e-4))


def test_gate_ranks_quants_and_records_figures_in_the_receipt(ladder):
    q8, q2 = gate_figures(ladder, "ladder@q8_0"), gate_figures(ladder, "ladder@q2_k")
    iq2 = gate_figures(ladder, "ladder")
    assert q2["mean_kld"] > q8["mean_kld"]
    assert iq2["mean_kld"] > q8["mean_kld"]
    assert q8["top1_agreement"] > q2["top1_agreement"]
    # ppl_base: the reference's perplexity on the text, which says whether the ratio was gated.
    assert set(q8) == {"mean_kld", "p99_kld", "p999_kld", "top1_agreement", "ppl_ratio", "ppl_base"}
    assert q8["ppl_base"] == q2["ppl_base"] > 1


def test_a_threshold_below_the_measured_kld_fails_the_variant_with_its_table(ladder):
    run = ladder.doit("alloy=ladder", "quant=q8_0", "quant.gate.max_mean_kld_x_q8=0.5")
    assert run.proc.returncode != 0
    assert "quality gate failed" in run.out and "relative to the source's own Q8_0" in run.out
    assert re.search(r"mean KLD .* 0\.5 x Q8_0 .* FAIL", run.out), run.out[-2000:]
    assert not ladder.variant("ladder@q8_0,quant.gate.max_mean_kld_x_q8-0.5").exists()


def test_projector_can_ship_as_q8_0(ladder):
    run = ladder.doit("alloy=ladder", "quant=q8_0", "quant.projector=q8_0")
    assert_ok(run)
    folder = ladder.variant("ladder@q8_0,quant.projector-q8_0")
    f16, q8 = ladder.variant("ladder@q8_0") / "mmproj-ladder-F16.gguf", folder / "mmproj-ladder-Q8_0.gguf"
    assert q8.exists() and q8.stat().st_size < f16.stat().st_size
    assert "mmproj-quantize:qwen3.5-tiny-seeing-q8_0" in run.executed


def test_same_variant_built_elsewhere_has_the_same_bytes(ladder, tmp_path_factory, demo_seed):
    # Elsewhere: another build dir and corpus folder, converting again from the same trained source
    # (its training from nothing elsewhere is what `doit verify` proves).
    other = ladder_workspace(tmp_path_factory.mktemp("elsewhere"), tmp_path_factory.mktemp("corpus-b"), demo_seed,
                             TRAINED_SOURCE)
    assert other.corpus != ladder.corpus
    run = other.doit("alloy=ladder", "quant=iq3_m")
    assert_ok(run)
    for name in ("ladder-IQ3_M.gguf", "mmproj-ladder-F16.gguf"):
        assert sha256(other.variant("ladder@iq3_m") / name) == sha256(ladder.variant("ladder@iq3_m") / name)


def test_changing_the_corpus_rebuilds_the_imatrix_and_its_quants_only(ladder):
    with open(ladder.corpus, "a") as f:
        f.write("\nOne more paragraph changes the importance matrix, and nothing upstream of it.\n")
    path = ladder.alloys / "ladder.alloy.json"
    data = json.loads(path.read_text())
    next(s for s in data["stages"] if s["type"] == "quant")["calibration"]["sha256"] = sha256(ladder.corpus)
    path.write_text(json.dumps(data, indent=2))
    run = ladder.doit()
    assert_ok(run)
    rebuilt = {"imatrix:qwen3.5-tiny-seeing"} | {f"{stage}:{v}" for stage in ("quantize", "gate", "envelope", "smoke")
                                                 for v in ("ladder", "ladder@iq3_m", "ladder@q2_k")}
    assert {t for t in run.executed if not t.startswith(("receipt:", "lock:")) and t != "registry"} == rebuilt, run.out
    # The recipe changed, so every variant of it gets a new executed alloy (receipt) and lock
    # entry -- the Q8_0 one with its GGUF untouched.
    assert {f"{s}:ladder@q8_0" for s in ("quantize", "gate", "envelope", "smoke")} <= run.skipped


def test_a_corpus_that_does_not_match_its_sha256_is_refused(ladder):
    with open(ladder.corpus, "a") as f:
        f.write("tampered\n")
    run = ladder.doit()
    assert run.proc.returncode == 2
    assert "calibration corpus" in run.out and "does not match its pinned sha256" in run.out
