"""compiler/weights.py on tiny hand-made checkpoints: the config refusals and the value scan."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from compiler import weights
from compiler.errors import ForgeError

BAD_TENSOR = "model.language_model.layers.1.mlp.down_proj.weight"


def config(**vision) -> dict:
    return {
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "text_config": {"num_hidden_layers": 2, "mtp_num_hidden_layers": 1},
        "vision_config": {"depth": 2, "deepstack_visual_indexes": [], **vision},
    }


def tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "model.visual.blocks.0.attn.qkv.weight": torch.randn(48, 16, generator=g).to(torch.bfloat16),
        "model.language_model.layers.0.mlp.down_proj.weight": torch.randn(32, 64, generator=g).to(torch.bfloat16),
        BAD_TENSOR: torch.randn(32, 64, generator=g).to(torch.bfloat16),
        "model.language_model.layers.1.linear_attn.A_log": torch.randn(8, generator=g),  # f32, as shipped
        "model.language_model.norm.weight": torch.ones(64, dtype=torch.float16),
    }


def checkpoint(folder: Path, ts: dict | None = None, cfg: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(ts if ts is not None else tensors(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg if cfg is not None else config()))
    return folder


def refusal(folder: Path, **kw) -> ForgeError:
    with pytest.raises(ForgeError) as e:
        weights.scan(folder, log=None, **kw)
    return e.value


# --- scan -------------------------------------------------------------------------------------

def test_clean_checkpoint_passes(tmp_path):
    ts = tensors()
    r = weights.scan(checkpoint(tmp_path, ts), log=None)
    assert r["tensors"] == 5 and r["files"] == 1
    assert r["bytes"] == sum(t.numel() * t.element_size() for t in ts.values())
    expected = max(float(t.float().abs().max()) for t in ts.values() if t.dtype == torch.bfloat16)
    assert r["max_abs_seen"]["BF16"] == expected
    assert r["max_abs_seen"]["F16"] == 1.0


@pytest.mark.parametrize("value, shown", [(float("nan"), "nan"), (float("inf"), "inf"),
                                          (-float("inf"), "-inf"), (1e30, "1.0")])
def test_bad_value_is_refused_naming_tensor_and_value(tmp_path, value, shown):
    ts = tensors()
    ts[BAD_TENSOR][3, 5] = value
    e = refusal(checkpoint(tmp_path, ts))
    msg = str(e)
    assert BAD_TENSOR in msg and shown in msg and "[3, 5]" in msg and "65504" in msg
    assert e.where.endswith("model.safetensors")
    [o] = e.offenders
    assert o["name"] == BAD_TENSOR and o["index"] == 3 * 64 + 5 and o["count"] == 1
    if value == 1e30:  # bf16 rounds it, but it stays ~1e30
        assert o["value"] == pytest.approx(1e30, rel=1e-2)


def test_every_offending_tensor_is_listed_in_one_refusal(tmp_path):
    ts = tensors()
    ts["model.visual.blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    ts[BAD_TENSOR][1, 2] = 7e4
    ts[BAD_TENSOR][2, 2] = -1e19
    ts["model.language_model.layers.1.linear_attn.A_log"][4] = float("inf")
    e = refusal(checkpoint(tmp_path, ts))
    names = {o["name"] for o in e.offenders}
    assert names == {"model.visual.blocks.0.attn.qkv.weight", BAD_TENSOR, "model.language_model.layers.1.linear_attn.A_log"}
    assert "and 2 more tensors" in e.what
    assert next(o for o in e.offenders if o["name"] == BAD_TENSOR)["count"] == 2
    for name in names:
        assert f"{name}: " in e.found


def test_the_limit_is_the_largest_f16(tmp_path):
    ts = tensors()
    ts[BAD_TENSOR][0, 0] = 65280.0  # the largest bf16 <= 65504: kept
    ts["model.language_model.layers.1.linear_attn.A_log"][0] = -65504.0  # the largest f16 itself
    assert weights.scan(checkpoint(tmp_path / "ok", ts), log=None)["max_abs_seen"]["F32"] == 65504.0
    ts[BAD_TENSOR][0, 0] = 65536.0  # the next bf16: an f16 overflows to inf
    e = refusal(checkpoint(tmp_path / "bad", ts))
    assert e.offenders[0]["value"] == 65536.0
    ts = tensors()
    ts["model.language_model.layers.1.linear_attn.A_log"][0] = float(np.nextafter(np.float32(65504), np.float32(1e9)))
    assert refusal(checkpoint(tmp_path / "f32", ts)).offenders[0]["name"].endswith("A_log")


def test_max_abs_is_a_parameter(tmp_path):
    folder = checkpoint(tmp_path)
    e = refusal(folder, max_abs=1.0)
    assert "|x| <= 1" in str(e) and len(e.offenders) == 4  # three bf16 and the f32; the f16 ones are 1.0
    assert weights.scan(folder, max_abs=1e6, log=None)["tensors"] == 5


def test_large_tensors_are_read_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "CHUNK_BYTES", 256)
    ts = tensors()
    ts[BAD_TENSOR][31, 63] = float("nan")  # the last element, several chunks in
    [o] = refusal(checkpoint(tmp_path, ts)).offenders
    assert o["index"] == 32 * 64 - 1


def test_sharded_checkpoint_refused_in_second_shard(tmp_path):
    ts = tensors()
    ts[BAD_TENSOR][0, 1] = float("inf")
    names = sorted(ts)
    first = {n: ts[n] for n in names[:2]}
    second = {n: ts[n] for n in names[2:]}
    assert BAD_TENSOR in second
    save_file(first, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(second, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {**{n: "model-00001-of-00002.safetensors" for n in first},
                                           **{n: "model-00002-of-00002.safetensors" for n in second}}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    e = refusal(tmp_path)
    assert BAD_TENSOR in str(e) and "inf" in str(e)
    assert e.where.endswith("model-00002-of-00002.safetensors")
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    e = refusal(tmp_path)
    assert "model-00002-of-00002.safetensors" in e.found and "index" in e.what


def test_truncated_shard_is_refused(tmp_path):
    path = checkpoint(tmp_path) / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    assert "truncated" in refusal(tmp_path).what


def test_hand_written_header_with_non_float_tensor(tmp_path):
    # safetensors' own writer aligns; a hand-written file need not, and may hold integer tensors
    ids = np.arange(6, dtype=np.int64).tobytes()
    vals = (np.array([1.0, -2.0, np.nan], dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
    header = {"ids": {"dtype": "I64", "shape": [6], "data_offsets": [0, 48]},
              "w": {"dtype": "BF16", "shape": [3], "data_offsets": [48, 54]}}
    h = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + ids + vals)
    e = refusal(tmp_path)
    assert e.offenders[0]["name"] == "w" and e.offenders[0]["index"] == 2


# --- check_config -----------------------------------------------------------------------------

def test_config_summary(tmp_path):
    assert weights.check_config(checkpoint(tmp_path)) == {
        "architecture": "Qwen3_5ForConditionalGeneration", "vision_depth": 2, "text_layers": 2, "mtp_layers": 1}
    cfg = config()
    del cfg["vision_config"]["deepstack_visual_indexes"]
    del cfg["text_config"]["mtp_num_hidden_layers"]
    assert "mtp_layers" not in weights.check_config(checkpoint(tmp_path, cfg=cfg))


def config_refusal(tmp_path, cfg) -> ForgeError:
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ForgeError) as e:
        weights.check_config(tmp_path)
    return e.value


def test_wrong_architecture_is_refused(tmp_path):
    cfg = config()
    cfg["architectures"] = ["Qwen3VLForConditionalGeneration"]
    e = config_refusal(tmp_path, cfg)
    assert "config.json $.architectures" in e.where and "Qwen3VLForConditionalGeneration" in str(e)
    assert "Qwen3_5ForConditionalGeneration" in str(e)


def test_missing_vision_config_is_refused(tmp_path):
    cfg = config()
    del cfg["vision_config"]
    e = config_refusal(tmp_path, cfg)
    assert "config.json $.vision_config" in e.where and "vision_config" in e.what


def test_deepstack_layers_are_refused(tmp_path):
    e = config_refusal(tmp_path, config(deepstack_visual_indexes=[5, 11, 17]))
    assert "config.json $.vision_config.deepstack_visual_indexes" in e.where
    assert "[5, 11, 17]" in str(e) and "deepstack" in e.what
