"""Plan mode's file sizes are exact: a sparse reference GGUF made from config.json alone has the
real converter's layout byte for byte, and llama-quantize --dry-run on it predicts every demo
variant's size to the byte."""
from __future__ import annotations

import pytest

from compiler import sizing
from compiler.ggufcheck import read_layout
from compiler.synthetic import load_shape

pytestmark = pytest.mark.build


def test_sizes_from_config_alone_match_real_quantize_output(demo_workspace, tmp_path):
    ws = demo_workspace
    ckpt = sizing.sparse_checkpoint(load_shape("tiny"), tmp_path / "qwen3.5-tiny-seeing")
    ref = sizing.sparse_reference(ckpt, tmp_path / "ref.gguf")
    lock = ws.lock()["variants"]
    real = ws.build / "store" / "convert" / lock["demo"]["keys"]["convert"] / "model-BF16.gguf"
    a, b = read_layout(ref), read_layout(real)
    assert a["size"] == b["size"] and a["data_start"] == b["data_start"]
    assert [(t["name"], t["dims"], t["type"], t["offset"]) for t in a["tensors"]] == \
        [(t["name"], t["dims"], t["type"], t["offset"]) for t in b["tensors"]]
    assert ref.stat().st_blocks * 512 < a["size"] / 4  # sparse: the weights were never written
    checked = 0
    for vid, entry in lock.items():
        out = next(o for o in entry["outputs"] if not o["filename"].startswith("mmproj-"))
        meta = sizing.imatrix_metadata("forge-calibration-v1.txt") if entry["keys"].get("imatrix") else None
        predicted = sizing.dry_run(ref, entry["quant"], added_meta=meta)
        assert predicted["file_bytes"] == out["size"], (vid, entry["quant"])
        checked += 1
    assert checked >= 3
