"""The random-weight generator writes the forms real Qwen3.5 repos come in: a multi-token-prediction
head (`mtp.*`, named and shaped as in the official checkpoints), sharded safetensors with an index,
and a chat template of the caller's own; the pinned converter reads that head the three ways it
offers (kept in the text GGUF, left out with --no-mtp, alone as a draft GGUF with --mtp)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compiler import synthetic

SEED = 7
TEMPLATE = "{%- for m in messages -%}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{%- endfor -%}"

# The official Qwen3.5 MTP head (e.g. Qwen3.5-4B, hidden 2560: fc [2560, 5120], q_proj [8192, 2560]),
# here at the tiny shape: hidden 256, 4 heads x 64 (gated: q_proj doubled), 2 KV heads, ffn 512.
MTP_TENSORS = {
    "mtp.fc.weight": [256, 512],
    "mtp.pre_fc_norm_embedding.weight": [256],
    "mtp.pre_fc_norm_hidden.weight": [256],
    "mtp.norm.weight": [256],
    "mtp.layers.0.input_layernorm.weight": [256],
    "mtp.layers.0.post_attention_layernorm.weight": [256],
    "mtp.layers.0.self_attn.q_proj.weight": [512, 256],
    "mtp.layers.0.self_attn.k_proj.weight": [128, 256],
    "mtp.layers.0.self_attn.v_proj.weight": [128, 256],
    "mtp.layers.0.self_attn.o_proj.weight": [256, 256],
    "mtp.layers.0.self_attn.q_norm.weight": [64],
    "mtp.layers.0.self_attn.k_norm.weight": [64],
    "mtp.layers.0.mlp.gate_proj.weight": [512, 256],
    "mtp.layers.0.mlp.up_proj.weight": [512, 256],
    "mtp.layers.0.mlp.down_proj.weight": [256, 512],
}
# What the converter makes of them: the head becomes block n_layer (4) with the nextn tensors.
MTP_BLOCK = {f"blk.4.{n}.weight" for n in (
    "nextn.eh_proj", "nextn.enorm", "nextn.hnorm", "nextn.shared_head_norm",
    "attn_norm", "post_attention_norm", "attn_q", "attn_k", "attn_v", "attn_output",
    "attn_q_norm", "attn_k_norm", "ffn_gate", "ffn_up", "ffn_down")}


def mtp_shape() -> dict:
    shape = synthetic.load_shape("tiny")
    shape["text_config"]["mtp_num_hidden_layers"] = 1
    return shape


def tensors(folder: Path) -> dict:
    """Every tensor of a checkpoint (one file or shards) by name, as raw bytes with dtype and shape."""
    from safetensors import safe_open

    found = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                assert name not in found, f"{name} in two shards"
                t = st.get_tensor(name)
                found[name] = (str(t.dtype), list(t.shape), t.contiguous().view(-1).view(dtype=_u8()).numpy().tobytes())
    return found


def _u8():
    import torch

    return torch.uint8


def digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def forms(tmp_path_factory) -> Path:
    """Tiny shape with an MTP head, in 4 MB shards, with its own chat template."""
    out = tmp_path_factory.mktemp("forms") / "qwen3.5-tiny-mtp"
    synthetic.generate(out, mtp_shape(), SEED, shard_size="4MB", chat_template=TEMPLATE)
    return out


def test_default_tiny_shape_has_no_mtp_head():
    assert "mtp_num_hidden_layers" not in synthetic.TINY_SHAPE["text_config"]
    assert not hasattr(synthetic.build_config(synthetic.load_shape("tiny")).text_config, "mtp_num_hidden_layers")
    zero = synthetic.load_shape("tiny")
    zero["text_config"]["mtp_num_hidden_layers"] = 0  # declared but absent: left out of config.json
    assert not hasattr(synthetic.build_config(zero).text_config, "mtp_num_hidden_layers")
    assert synthetic.build_config(mtp_shape()).text_config.mtp_num_hidden_layers == 1


def test_shards_and_index_match_the_unsharded_checkpoint(forms, tmp_path):
    shards = sorted(p.name for p in forms.glob("*.safetensors"))
    n = len(shards)
    assert n >= 3 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (forms / "model.safetensors").exists()
    index = json.loads((forms / "model.safetensors.index.json").read_text())
    sharded = tensors(forms)
    # The index names every tensor and the shard that holds it, nothing more.
    from safetensors import safe_open

    where = {}
    for s in shards:
        with safe_open(str(forms / s), "pt") as st:
            where.update({k: s for k in st.keys()})
    assert index["weight_map"] == where
    assert index["metadata"]["total_size"] == sum(len(b) for _, _, b in sharded.values())

    single = tmp_path / "single"
    files = synthetic.generate(single, mtp_shape(), SEED)
    assert "model.safetensors" in files and "model.safetensors.index.json" not in files
    whole = tensors(single)
    assert sharded.keys() == whole.keys()
    assert all(sharded[k] == whole[k] for k in whole), [k for k in whole if sharded[k] != whole[k]]

    # The MTP head: the official names and shapes, bf16, declared in config.json.
    mtp = {k: v for k, v in whole.items() if k.startswith("mtp.")}
    assert {k: shape for k, (_, shape, _) in mtp.items()} == MTP_TENSORS
    assert {dtype for dtype, _, _ in mtp.values()} == {"torch.bfloat16"}
    assert json.loads((single / "config.json").read_text())["text_config"]["mtp_num_hidden_layers"] == 1
    # The head draws from its own generator: the trunk is the one a head-less shape gets.
    plain = tmp_path / "plain"
    synthetic.generate(plain, synthetic.load_shape("tiny"), SEED)
    trunk = tensors(plain)
    assert trunk == {k: v for k, v in whole.items() if not k.startswith("mtp.")}

    # The chat template: transformers 5 writes it to chat_template.jinja, not tokenizer_config.json.
    assert (forms / "chat_template.jinja").read_text() == TEMPLATE
    assert (single / "chat_template.jinja").read_text() == synthetic.CHAT_TEMPLATE
    assert "chat_template" not in json.loads((forms / "tokenizer_config.json").read_text())


def test_same_seed_same_bytes(forms, tmp_path):
    again = tmp_path / forms.name
    synthetic.generate(again, mtp_shape(), SEED, shard_size="4MB", chat_template=TEMPLATE)
    assert digests(again) == digests(forms)
    other = tmp_path / "other-seed"
    synthetic.generate(other, mtp_shape(), SEED + 1, shard_size="4MB", chat_template=TEMPLATE)
    changed = {k for k, v in digests(other).items() if digests(forms)[k] != v}
    assert changed and all(k.endswith(".safetensors") for k in changed)


# --- the pinned converter ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vendor() -> Path:
    from compiler import toolchain

    if not toolchain.converter().is_file():
        toolchain.unpack_vendor(toolchain.fetch_archive(sys.executable))
    return toolchain.VENDOR_DIR


def convert(vendor: Path, ckpt: Path, out: Path, *flags: str) -> dict:
    """Run convert_hf_to_gguf.py from its own folder (it prefers its own gguf-py); read the result."""
    cmd = [sys.executable, str(vendor / "convert_hf_to_gguf.py"), str(ckpt), "--outtype", "bf16",
           "--outfile", str(out), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=vendor, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0 and out.is_file(), (proc.stdout + proc.stderr)[-4000:]
    from compiler.ggufcheck import read_layout

    layout = read_layout(out)  # GGUFReader: half a minute on the tokenizer arrays
    meta = layout["meta"]
    return {"arch": meta["general.architecture"],
            "keys": {k: v for k, v in meta.items() if "nextn" in k or k.endswith("block_count")},
            "tensors": {t["name"] for t in layout["tensors"]}}


@pytest.mark.build
def test_no_mtp_leaves_the_head_out(forms, vendor, tmp_path):
    g = convert(vendor, forms, tmp_path / "text.gguf", "--no-mtp")
    assert g["arch"] == "qwen35"
    assert g["keys"] == {"qwen35.block_count": 4}  # no qwen35.nextn_predict_layers
    assert not {t for t in g["tensors"] if t.startswith("blk.4.") or "nextn" in t}
    assert {"token_embd.weight", "output_norm.weight", "blk.3.attn_q.weight", "blk.0.ssm_out.weight"} <= g["tensors"]


@pytest.mark.build
def test_mtp_writes_only_the_head_as_a_draft(forms, vendor, tmp_path):
    g = convert(vendor, forms, tmp_path / "draft.gguf", "--mtp")
    assert g["arch"] == "qwen35"
    assert g["keys"] == {"qwen35.block_count": 5, "qwen35.nextn_predict_layers": 1}
    # The head's block plus the trunk tensors it shares (embedding, final norm; the output is tied).
    assert g["tensors"] == MTP_BLOCK | {"token_embd.weight", "output_norm.weight"}


def test_the_kept_tokenizer_is_the_converted_one_and_a_damaged_one_is_converted_again(tmp_path, monkeypatch):
    # The conversion (~9 s of one core, in every training and generation) is kept in the forge cache:
    # the kept files are the conversion's, byte for byte -- the committed lock's tokenizer.json, from
    # a training from nothing -- and a damaged entry is noticed and redone.
    monkeypatch.setenv("FORGE_CACHE", str(tmp_path / "cache"))
    synthetic.write_tokenizer(tmp_path / "a")
    (entry,) = (tmp_path / "cache" / "tokenizer").iterdir()
    synthetic.write_tokenizer(tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir()) and "tokenizer.json" in names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    lock = json.loads((Path(__file__).parents[1] / "alloys" / "forge.lock.json").read_text())
    locked = {f["filename"]: f["sha256"] for f in lock["variants"]["demo"]["source"]["files"]}
    assert hashlib.sha256((tmp_path / "b" / "tokenizer.json").read_bytes()).hexdigest() == locked["tokenizer.json"]
    (entry / "tokenizer.json").write_bytes(b"{}")
    synthetic.write_tokenizer(tmp_path / "c")
    assert (tmp_path / "c" / "tokenizer.json").read_bytes() == (tmp_path / "a" / "tokenizer.json").read_bytes()
    assert (entry / "tokenizer.json").read_bytes() == (tmp_path / "a" / "tokenizer.json").read_bytes()
    # Another template is another entry.
    synthetic.write_tokenizer(tmp_path / "d", TEMPLATE)
    assert len(list((tmp_path / "cache" / "tokenizer").iterdir())) == 2
