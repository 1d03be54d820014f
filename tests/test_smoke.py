"""The smoke stage on the demo: personas decoded together equal each prompt alone (and a shared
sequence id is caught), a projector with a tensor removed fails the preservation check, and smoke
reruns when the tier's settings change."""
from __future__ import annotations

import json

import numpy as np
import pytest

from compiler import preservation, sizing
from compiler.errors import ForgeError
from conftest import assert_ok, python_json

pytestmark = pytest.mark.build


def smoke_run(folder, tmp_path, **params):
    p = {"n_ctx": 4096, "n_seq_max": 3, "n_batch": 512, "max_tokens": 6, "image_px": 448, "vision_items": 3, **params}
    path = tmp_path / "params.json"
    path.write_text(json.dumps(p))
    return python_json(["-m", "compiler.smoke_run", str(folder / "demo-Q4_K_M.gguf"),
                        str(folder / "mmproj-demo-F16.gguf"), str(path)], timeout=600)


def test_three_personas_together_equal_each_alone_and_a_shared_sequence_is_caught(demo_workspace, tmp_path):
    folder = demo_workspace.variant("demo")
    good = smoke_run(folder, tmp_path)
    personas = good["personas"]
    assert personas["sequence_ids"] == [0, 1, 2] and personas["with_image"] == [False, True, False]
    assert personas["isolated"] == [True, True, True] and personas["equal_alone"] == [True, True, True]
    assert personas["max_logit_diff"] == [0.0, 0.0, 0.0] and personas["error"] is None
    assert good["text"]["deterministic"] and good["text"]["logits_finite"]
    assert len(good["vision"]["items"]) == 3
    broken = smoke_run(folder, tmp_path, **{"break": "shared-seq"})
    # The broken setup decodes without error -- only the checks can tell it sees its neighbours.
    assert broken["personas"]["sequence_ids"] == [0, 0, 0] and broken["personas"]["error"] is None
    assert broken["personas"]["isolated"] == [False, False, False]
    assert broken["personas"]["equal_alone"] == [False, False, False]


def test_receipt_records_smoke_and_vision_preservation(demo_workspace):
    receipt = json.loads((demo_workspace.variant("demo") / "demo.alloy.json").read_text())
    names = {b["name"]: b for b in receipt["results"]["benchmarks"]}
    # The demo fixture sees: its vision suite and the personas' alone-check are gated.
    assert names["personas"]["passed"] and names["vision-suite"]["gated"] is True
    assert names["vision-suite"]["passed"] is True and names["vision-suite"]["metrics"]["min_score"] == 0.8
    assert names["projector-agreement"]["gated"] is True and names["projector-agreement"]["passed"] is True
    assert names["projector-agreement"]["detail"]["reference"] == "mmproj-F32.gguf"
    n = names["personas"]["metrics"]["n_seq_max"]
    assert names["personas"]["metrics"]["isolated_passed"] == names["personas"]["metrics"]["isolated_total"] == n
    assert names["personas"]["detail"]["isolated"] == [True] * n
    pres = names["vision-preservation"]["metrics"]
    assert len(pres["towerSha256"]) == 64 and len(pres["projectorSha256"]) == 64
    assert names["timings"]["metrics"]["generation_tokens_per_s"] > 0


def test_a_check_only_reported_carries_its_figure_and_no_verdict(demo_workspace, tmp_path):
    # Random weights see nothing: their smoke reports the vision suite and the projector agreement
    # without gating them (stages/smoke.py). The receipt then says gated: false and gives no "passed".
    from compiler.stages.receipt import smoke_benchmarks

    key = demo_workspace.lock()["variants"]["demo"]["keys"]["smoke"]
    report = json.loads((demo_workspace.build / "store" / "smoke" / key / "smoke.json").read_text())
    report["vision"]["gated"] = report["vision"]["reference"]["gated"] = False

    class Reported:
        def file(self, name):
            (tmp_path / name).write_text(json.dumps(report))
            return tmp_path / name
    names = {b["name"]: b for b in smoke_benchmarks(Reported())}
    for name in ("vision-suite", "projector-agreement"):
        assert names[name]["gated"] is False and "passed" not in names[name], names[name]
        assert "min_score" not in names[name]["metrics"] and "min_agreement" not in names[name]["metrics"]
    assert names["vision-suite"]["metrics"]["score"] == report["vision"]["score"]


def test_a_projector_with_a_tensor_removed_fails_preservation(demo_workspace, tmp_path):
    from gguf import GGUFReader, GGUFWriter

    lock = demo_workspace.lock()["variants"]["demo"]
    source = demo_workspace.build / "store" / "synthetic" / lock["keys"]["source"]
    mmproj = demo_workspace.variant("demo") / "mmproj-demo-F16.gguf"
    tower = preservation.tower(source)
    preservation.check(tower, preservation.projector(mmproj), where="intact")  # the real one passes

    reader = GGUFReader(str(mmproj))
    cut = tmp_path / "mmproj-cut.gguf"
    writer = GGUFWriter(str(cut), arch="clip")
    sizing.copy_metadata(reader, writer)
    for t in reader.tensors:
        if t.name == "v.blk.1.ffn_down.weight":
            continue
        writer.add_tensor(t.name, np.array(t.data), raw_shape=list(reversed([int(d) for d in t.shape])),
                          raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ForgeError) as e:
        preservation.check(tower, preservation.projector(cut), where=str(cut))
    assert "v.blk.1.ffn_down.weight" in str(e.value) and "missing tensors" in str(e.value)


def test_smoke_reruns_when_tier_settings_change_and_not_otherwise(demo_workspace):
    ws = demo_workspace
    quiet = ws.doit("alloy=demo")
    assert_ok(quiet)
    assert "smoke:demo" in quiet.skipped
    path = ws.conf / "tier" / "m4.yaml"
    path.write_text(path.read_text().replace("n_seq_max: 4", "n_seq_max: 3"))
    run = ws.doit("alloy=demo")
    assert_ok(run)
    assert "smoke:demo" in run.executed and "envelope:demo" in run.executed
    assert not any(t.startswith(("quantize:", "gate:", "convert:")) for t in run.executed)


def test_smoke_with_gpu_required_fails_on_a_machine_without_one(demo_workspace):
    # The product forbids a CPU fallback: asked to run on a GPU, the smoke stage must not quietly
    # run on the CPU. This machine's llama.cpp has no GPU device, so the variant stops at smoke.
    run = demo_workspace.doit("alloy=demo", "smoke.gpu=required")
    assert run.proc.returncode != 0
    assert "gpu=required but this llama.cpp build has no GPU device" in run.out
    assert not any(t.startswith("receipt:demo@") for t in run.executed)


def _decode(tokens, tops):
    return [0, len(tokens), tokens, tops]


def test_together_agrees_with_alone_through_rounding_and_a_tie_but_not_through_a_real_difference():
    """The alone check judges what a GPU's batched kernels may change (rounding, so near-tied top-8
    entries swapping or a tied greedy choice going the other way) apart from what a sequence that
    reads another's cache changes (logits moved by far more)."""
    from compiler.smoke_run import agree

    top = [(5, 20.0), (9, 12.0), (3, 11.00), (4, 10.99), (7, 9.0), (8, 8.5), (1, 8.0), (2, 7.0)]
    alone = _decode([5, 9], [top, top])
    # Identical decodes agree at any tolerance, exactly at 0.
    assert agree(alone, alone, 0.0) == (True, 0.0, None) and agree(alone, alone, 1e-2)[0]
    # Two near-tied entries (11.00 and 10.99) swap places: rounding, within 1%; not exact.
    swapped = [(5, 20.01), (9, 12.0), (4, 11.00), (3, 10.995), (7, 9.0), (8, 8.5), (1, 8.0), (2, 7.0)]
    ok, diff, tie = agree(alone, _decode([5, 9], [swapped, swapped]), 1e-2)
    assert ok and tie is None and abs(diff - 0.01) < 1e-9
    assert not agree(alone, _decode([5, 9], [swapped, swapped]), 0.0)[0]
    # The 8th entry changes for one just below the cutoff.
    cut = top[:7] + [(6, 6.99)]
    assert agree(alone, _decode([5, 9], [cut, cut]), 1e-2)[0]
    # A greedy choice between two tied tokens goes the other way: compared up to there, then apart.
    tied = [(5, 20.0), (6, 19.9)] + top[2:]
    tied_b = [(6, 20.0), (5, 19.95)] + top[2:]
    ok, _, tie = agree(_decode([5, 9], [tied, top]), _decode([6, 3], [tied_b, top]), 1e-2)
    assert ok and tie == 0
    assert not agree(_decode([5, 9], [tied, top]), _decode([6, 3], [tied_b, top]), 0.0)[0]
    # What a neighbour's cache does: a token far from tied, or a value moved by several percent.
    far = [(9, 21.0), (5, 15.0)] + top[2:]
    assert not agree(alone, _decode([9, 9], [far, top]), 1e-2)[0]
    moved = [(5, 20.0), (9, 12.5)] + top[2:]
    assert agree(alone, _decode([5, 9], [moved, top]), 1e-2)[:1] == (False,)
    stranger = [(5, 20.0), (9, 12.0), (0, 11.5)] + top[3:]
    assert not agree(alone, _decode([5, 9], [stranger, stranger]), 1e-2)[0]


def test_top_ids_are_a_stable_sorts_first_ids_ties_included():
    # The smoke's top-8 per generated token: the same ids, in the same order, as a stable sort of
    # the whole vocabulary -- including a trained fixture's untrained tokens, all exactly 0.
    from compiler.smoke_run import top_ids

    rng = np.random.default_rng(1)
    for trial in range(200):
        n = int(rng.integers(10, 5000))
        x = rng.integers(-3, 4, size=n).astype(np.float32) if trial % 2 else rng.standard_normal(n).astype(np.float32)
        if trial % 3 == 0:
            x[rng.integers(0, n, size=n // 2)] = 0.0
        assert top_ids(x, 8).tolist() == np.argsort(-x, kind="stable")[:8].tolist(), trial
    fixture_like = np.zeros(248320, np.float32)
    fixture_like[[7, 3, 4000]] = [2.0, 5.0, -1.0]
    assert top_ids(fixture_like, 8).tolist() == [3, 7, 0, 1, 2, 4, 5, 6]
