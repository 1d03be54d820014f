"""The MTP policy end to end (conf convert.mtp): a checkpoint with a multi-token-prediction head,
as the official 4B and 9B have, forges to a text GGUF without the head by default, and with
`convert.mtp=draft` also to the head alone as a draft GGUF that the variant links, the receipt
hashes and the envelope counts."""
from __future__ import annotations

import itertools
import json

import pytest

from conftest import assert_ok
from continuum_product import arrive, pick_files
from test_sources import workspace, write_alloy

from compiler.ggufcheck import read_layout


def test_mtp_head_dropped_by_default_and_drafted_on_request(tmp_path):
    from compiler.synthetic import generate, load_shape

    shape = load_shape("tiny")
    shape["text_config"]["mtp_num_hidden_layers"] = 1
    ws = workspace(tmp_path / "ws")
    generate(ws.root / "checkpoints" / "mtp", shape, 5)
    write_alloy(ws, "with-mtp", {"baseModel": "local/Qwen3.5-Tiny-MTP", "revision": "local",
                                 "localPath": "../checkpoints/mtp"})

    run = ws.doit("alloy=with-mtp", "convert.mtp=draft")
    assert_ok(run)
    folder = ws.variant("with-mtp@convert.mtp-draft")
    text = read_layout(folder / "with-mtp-Q4_K_M.gguf")
    draft = read_layout(folder / "mtp-with-mtp-BF16.gguf")
    # The text model: 4 blocks, no nextn tensors, no MTP metadata -- as with the default policy.
    assert not any(".nextn." in t["name"] or t["name"].startswith("blk.4.") for t in text["tensors"])
    assert text["meta"]["qwen35.block_count"] == 4
    # The draft: the head as block 4, with its nextn tensors.
    assert any(t["name"] == "blk.4.nextn.eh_proj.weight" for t in draft["tensors"])
    assert draft["meta"]["qwen35.nextn_predict_layers"] == 1
    executed = json.loads((folder / "with-mtp.alloy.json").read_text())
    hashed = {f["filename"] for f in executed["results"]["integrity"]["fileHashes"]}
    assert hashed == {"with-mtp-Q4_K_M.gguf", "mmproj-with-mtp-F16.gguf", "mtp-with-mtp-BF16.gguf"}
    # Before the receipt, the pair was loaded and decoded through as the product serves it
    # (--spec-type draft-mtp): the head proposed tokens, the text model judged them, and the text
    # is the model's own greedy decode. Random weights: nothing to accept, but every draft judged.
    decode = next(b for b in executed["results"]["benchmarks"] if b["name"] == "mtp-draft-decode")
    m = decode["metrics"]
    assert decode["passed"] and m["drafted"] >= m["decoded"] - 1 >= 40 and m["sameAsPlainDecode"] == 1, decode
    assert 0 <= m["acceptance"] <= 1 and decode["backend"] == "cpu"
    envelope = json.loads(next((ws.build / "store" / "envelope").glob("*/envelope.json")).read_text())
    term = next(t for t in envelope["terms"] if t["id"] == "mtp_draft")
    assert term["bytes"] == (folder / "mtp-with-mtp-BF16.gguf").stat().st_size

    # Recorded (lock=1), the draft variant is a registry entry whose files the product's rules sort
    # as it means them: the draft is never taken for the model, in whatever order they arrive.
    locked = ws.doit("alloy=with-mtp", "convert.mtp=draft", "lock=1")
    assert_ok(locked)
    entry = json.loads(ws.registry.read_text())["models"]["with-mtp-convert.mtp-draft"]
    roles = {f["filename"]: f["role"] for f in entry["files"]}
    assert roles == {"with-mtp-Q4_K_M.gguf": "text", "mmproj-with-mtp-F16.gguf": "mmproj",
                     "mtp-with-mtp-BF16.gguf": "mtp-draft"}
    assert sorted(entry["allow_patterns"]) == sorted(roles)
    for order in itertools.permutations(roles):
        assert pick_files(arrive(tmp_path / "dl", order)) == {"model": "with-mtp-Q4_K_M.gguf", "projectors": ["mmproj-with-mtp-F16.gguf"],
                                       "drafts": ["mtp-with-mtp-BF16.gguf"]}, order

    recorded = ws.lock()["variants"]["with-mtp@convert.mtp-draft"]["draft"]
    assert recorded["drafted"] == m["drafted"] and recorded["same_as_plain"] and recorded["backend"] == "cpu", recorded

    # Plan mode sizes the draft from config.json alone (compiler.fit): the sparse draft the pinned
    # converter writes from the shape has the real draft's layout, byte for byte.
    from compiler import sizing

    sparse = sizing.sparse_reference(sizing.sparse_checkpoint(shape, tmp_path / "sparse" / "Qwen3.5-Tiny-MTP"),
                                     tmp_path / "mtp-sparse.gguf", draft=True)
    planned = read_layout(sparse)
    assert planned["size"] == (folder / "mtp-with-mtp-BF16.gguf").stat().st_size == draft["size"]
    assert [(t["name"], t["dims"], t["type"]) for t in planned["tensors"]] == \
        [(t["name"], t["dims"], t["type"]) for t in draft["tensors"]]

    # A draft that is not this model's head is refused by the decode, named: the text model itself
    # (no nextn layer: no MTP context) and the projector (not a language model).
    from compiler.errors import ForgeError
    from compiler.runlog import StepLog
    from compiler.stages import draft_run

    params = {**json.loads(next((ws.build / "store" / "draft-run").glob("*/manifest.json")).read_text())["params"]}
    log = StepLog(tmp_path / "draft.log", "draft-run:test", echo=lambda _: None)
    for wrong, says in ((folder / "with-mtp-Q4_K_M.gguf", "MTP context"), (folder / "mmproj-with-mtp-F16.gguf", "CLIP")):
        with pytest.raises(ForgeError) as refused:
            draft_run.speculative(folder / "with-mtp-Q4_K_M.gguf", wrong, params, log)
        assert says in str(refused.value) and wrong.name in str(refused.value), str(refused.value)

    # The default (drop): the same text GGUF, no draft file, and the conversion shared.
    plain = ws.doit("alloy=with-mtp")
    assert_ok(plain)
    assert not any(t.startswith("convert:") for t in plain.executed)
    assert (ws.variant("with-mtp") / "with-mtp-Q4_K_M.gguf").read_bytes() == (folder / "with-mtp-Q4_K_M.gguf").read_bytes()
    assert not list(ws.variant("with-mtp").glob("*MTP*"))
