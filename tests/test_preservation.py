"""Vision preservation against the converter's own mapping: every visual tower and merger tensor of
the source must reach the projector under the GGUF name the vendored converter gives it, with its
shape. One tiny checkpoint is generated and its projector converted once (module fixture); the
broken projectors are that one rewritten with gguf-py's GGUFWriter, one tensor dropped or altered."""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compiler import preservation, sizing
from compiler.errors import ForgeError

ROOT = Path(__file__).resolve().parent.parent
LLAMA = ROOT / "vendor" / "llama.cpp"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from compiler.synthetic import generate, load_shape

    base = tmp_path_factory.mktemp("preservation")
    ckpt = base / "ckpt"
    generate(ckpt, load_shape("tiny"), 0)
    mmproj = base / "mmproj-F16.gguf"
    proc = subprocess.run([sys.executable, "convert_hf_to_gguf.py", str(ckpt), "--mmproj", "--outtype", "f16",
                           "--outfile", str(mmproj)], cwd=LLAMA, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"ckpt": ckpt, "mmproj": mmproj, "tower": preservation.tower(ckpt), "base": base}


def rewrite(src: Path, dst: Path, drop=lambda name: False, alter=None) -> Path:
    """src's metadata and tensors into dst, without the tensors `drop` names; `alter` maps a tensor
    name to a function (torch-order data -> new torch-order data) for the tensors to reshape."""
    from gguf import GGUFReader, GGUFWriter

    reader = GGUFReader(str(src))
    writer = GGUFWriter(str(dst), arch="clip")
    sizing.copy_metadata(reader, writer)
    for t in reader.tensors:
        if drop(t.name):
            continue
        data = np.array(t.data)
        if alter and t.name in alter:
            data = alter[t.name](data)
        writer.add_tensor(t.name, data, raw_shape=list(data.shape), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def refusal(tiny, proj_path: Path) -> str:
    with pytest.raises(ForgeError) as e:
        preservation.check(tiny["tower"], preservation.projector(proj_path), where=str(proj_path))
    return str(e.value)


def test_the_real_projector_matches_the_converters_mapping(tiny):
    tower, proj = tiny["tower"], preservation.projector(tiny["mmproj"])
    want = tower["expected"]
    assert len(want) == tower["tensors"] == 12 * 2 + 9  # 12 per block, depth 2; merger, patch, pos
    made = {new: dims for outs in want.values() for new, dims in outs}
    assert made == proj["shapes"]  # exactly the projector's tensor table, names and dims
    # The rules that are not plain TensorNameMap look-ups:
    assert want["model.visual.patch_embed.proj.weight"] == [["v.patch_embd.weight", [16, 16, 3, 128]],
                                                            ["v.patch_embd.weight.1", [16, 16, 3, 128]]]
    assert want["model.visual.merger.linear_fc1.weight"] == [["mm.0.weight", [512, 512]]]
    assert want["model.visual.merger.linear_fc2.weight"] == [["mm.2.weight", [512, 256]]]
    assert want["model.visual.merger.norm.weight"] == [["v.post_ln.weight", [128]]]
    assert want["model.visual.pos_embed.weight"] == [["v.position_embd.weight", [128, 2304]]]
    assert want["model.visual.blocks.1.attn.qkv.weight"] == [["v.blk.1.attn_qkv.weight", [128, 384]]]
    preservation.check(tower, proj, where="intact")
    # As the smoke report carries it (through JSON) it still checks, and an explicit map wins.
    preservation.check(json.loads(json.dumps(tower)), json.loads(json.dumps(proj)), where="json")
    preservation.check({k: v for k, v in tower.items() if k != "expected"}, proj, where="arg", expected=want)


@pytest.mark.parametrize("gone, source", [
    ("v.post_ln.weight", "model.visual.merger.norm.weight"),
    ("mm.2.bias", "model.visual.merger.linear_fc2.bias"),
    ("v.position_embd.weight", "model.visual.pos_embed.weight"),
    ("v.patch_embd.weight.1", "model.visual.patch_embed.proj.weight"),
])
def test_a_missing_non_block_tensor_is_named(tiny, gone, source):
    cut = rewrite(tiny["mmproj"], tiny["base"] / f"cut-{gone}.gguf", drop=lambda n: n == gone)
    msg = refusal(tiny, cut)
    assert "missing tensors" in msg and f"{source} -> {gone}" in msg
    assert "v.blk." not in msg.split("\n")[0]  # only what is missing is named
    # The older check (no expected map) let each of these through: the gap this closes.
    loose = {k: v for k, v in tiny["tower"].items() if k != "expected"}
    preservation.check(loose, preservation.projector(cut), where="loose")


def test_a_tensor_missing_from_every_block_is_named_in_each(tiny):
    cut = rewrite(tiny["mmproj"], tiny["base"] / "cut-attn_out.gguf",
                  drop=lambda n: n.startswith("v.blk.") and n.endswith(".attn_out.weight"))
    msg = refusal(tiny, cut)
    for b in (0, 1):
        assert f"model.visual.blocks.{b}.attn.proj.weight -> v.blk.{b}.attn_out.weight" in msg
    assert "attn_out.bias" not in msg
    loose = {k: v for k, v in tiny["tower"].items() if k != "expected"}
    preservation.check(loose, preservation.projector(cut), where="loose")  # the older check missed it


def test_a_tensor_of_the_wrong_shape_is_named_with_both_shapes(tiny):
    # 2000 position embeddings instead of 2304 (torch order [n_pos, hidden]; GGUF dims reversed).
    bad = rewrite(tiny["mmproj"], tiny["base"] / "bad-pos.gguf", alter={"v.position_embd.weight": lambda d: d[:2000]})
    msg = refusal(tiny, bad)
    assert "wrong shape" in msg and "missing" not in msg
    assert "model.visual.pos_embed.weight -> v.position_embd.weight: expected [128, 2304], found [128, 2000]" in msg


def test_sharded_checkpoint_gives_the_same_map_and_a_lost_shard_is_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tiny["ckpt"] / "model.safetensors"))
    shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    names = sorted(tensors)
    for i, name in enumerate(names):  # alternate, so the tower is spread over both files
        shards[list(shards)[i % 2]][name] = tensors[name]
    for fname, part in shards.items():
        save_file(part, str(tmp_path / fname), metadata={"format": "pt"})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: fname for fname, part in shards.items() for n in part}}))
    shutil.copy(tiny["ckpt"] / "config.json", tmp_path / "config.json")
    assert preservation.expected(tmp_path) == tiny["tower"]["expected"]
    sharded = preservation.tower(tmp_path)
    assert sharded["tensors"] == tiny["tower"]["tensors"] and sharded["bytes"] == tiny["tower"]["bytes"]

    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ForgeError) as e:
        preservation.expected(tmp_path)
    assert "model-00002-of-00002.safetensors" in str(e.value) and "model.visual." in str(e.value)


def _header_only_checkpoint(folder: Path, vision: dict, family: str = "qwen3_5") -> dict[str, list[int]]:
    """config.json and a safetensors file holding only the header (no weights) of a Qwen3.5 (or
    Qwen3-VL, with deepstack mergers) visual tower of this vision config, its tensor names and
    shapes from transformers' own module."""
    import importlib

    import torch

    cls = "Qwen3_5Vision" if family == "qwen3_5" else "Qwen3VLVision"
    config = getattr(importlib.import_module(f"transformers.models.{family}.configuration_{family}"), cls + "Config")
    module = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), cls + "Model")
    with torch.device("meta"):
        model = module(config(**vision))
    shapes = {"model.visual." + k: list(v.shape) for k, v in model.state_dict().items()}
    header, off = {}, 0
    for name, shape in sorted(shapes.items()):
        n = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    (folder / "config.json").write_text(json.dumps({"vision_config": vision}))
    return shapes


def _converter_output(shapes: dict[str, list[int]], vision: dict, monkeypatch) -> dict[str, list[list]]:
    """What the vendored converter's Qwen3VLVisionModel itself yields for these tensors (its
    filter_tensors and modify_tensors run on meta tensors: names and shapes only)."""
    import gguf
    import torch

    monkeypatch.syspath_prepend(str(LLAMA))
    from conversion.qwen3vl import Qwen3VLVisionModel

    model = object.__new__(Qwen3VLVisionModel)  # only the state modify_tensors reads
    model.hparams_vision = vision
    model.tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, vision["depth"])
    model.fuse_qkv = model.fuse_gate_up_exps = False
    out = {}
    for name, shape in shapes.items():
        item = Qwen3VLVisionModel.filter_tensors((name, lambda: None))
        assert item is not None
        bid = next((int(p) for p in item[0].split(".") if p.isdecimal()), None)
        made = model.modify_tensors(torch.empty(shape, device="meta"), item[0], bid)
        out[name] = [[new, list(reversed(t.shape))] for new, t in made]
    return out


@pytest.mark.parametrize("size", ["0.8b", "27b"])
def test_expected_agrees_with_the_converter_at_real_shapes(size, tmp_path, monkeypatch):
    from compiler.synthetic import load_shape

    vision = load_shape(size)["vision_config"]
    shapes = _header_only_checkpoint(tmp_path, vision)
    want = preservation.expected(tmp_path)
    assert want == _converter_output(shapes, vision, monkeypatch)
    assert sum(len(v) for v in want.values()) == 12 * vision["depth"] + 10
    assert want["model.visual.patch_embed.proj.weight"][1] == [
        "v.patch_embd.weight.1", [16, 16, 3, vision["hidden_size"]]]


def test_expected_agrees_with_the_converter_on_deepstack_mergers(tmp_path, monkeypatch):
    # Qwen3.5 has no deepstack (deepstack_visual_indexes == [] in every shapes/*.json), but its
    # converter class is Qwen3-VL's: merger i must land at v.deepstack.{indexes[i]}.
    vision = dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=96,
                  num_position_embeddings=2304, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  deepstack_visual_indexes=[1, 3])
    shapes = _header_only_checkpoint(tmp_path, vision, family="qwen3_vl")
    want = preservation.expected(tmp_path)
    assert want == _converter_output(shapes, vision, monkeypatch)
    assert want["model.visual.deepstack_merger_list.1.norm.weight"] == [["v.deepstack.3.norm.weight", [256]]]
