"""Plan mode: the exact size of every quant of a checkpoint, from its config.json alone.

1. A *sparse* checkpoint: the real model class instantiated on torch's meta device gives every
   tensor's name, shape and dtype; a safetensors header is written for them and the file extended
   to full size without writing data (a sparse file: no disk blocks, no weights).
2. A *sparse reference GGUF*: the pinned convert_hf_to_gguf.py runs on it with gguf-py's tensor
   writer replaced by one that writes the header and tensor table and extends the file instead of
   materialising tensors -- the converter's own names, shapes and metadata, without its work.
3. `llama-quantize --dry-run` on that GGUF picks every tensor's type exactly as a real quantize
   would; the bytes per tensor follow from ggml's block sizes, and the file size from the header.
"""
from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

from .errors import ForgeError
from .toolchain import VENDOR_DIR, converter, tool

# Runs the converter with a header-only tensor writer (see step 2 above).
_HEADER_ONLY = r"""
import os, runpy, sys
import gguf
from gguf.gguf_writer import GGUFWriter

def header_only(self, *, progress=False):
    self.write_ti_data_to_file()
    for fout, tensors in zip(self.fout, self.tensors):
        self.write_padding(fout, fout.tell())
        end = fout.tell()
        for ti in tensors.values():
            end += ti.nbytes
            end += (-ti.nbytes) % self.data_alignment
            ti.tensor = None
        fout.flush()
        fout.truncate(end)

GGUFWriter.write_tensors_to_file = header_only
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def sparse_checkpoint(shape: dict, out: Path) -> Path:
    """A checkpoint folder whose model.safetensors has the real header and no data."""
    import torch
    from transformers import Qwen3_5ForConditionalGeneration

    from . import synthetic

    out.mkdir(parents=True, exist_ok=True)
    config = synthetic.build_config(shape)
    with torch.device("meta"):
        model = Qwen3_5ForConditionalGeneration(config)
    tied = bool(config.tie_word_embeddings)
    header, offset = {}, 0
    tensors = dict(model.state_dict())
    tensors.update({f"mtp.{name}": t for name, t in _mtp_head_on_meta(config).state_dict().items()})
    for name, t in tensors.items():
        if tied and name == "lm_head.weight":
            continue  # tied to the embedding: save_pretrained leaves it out too
        n = 2 * t.numel()  # bf16
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)
    config.architectures = ["Qwen3_5ForConditionalGeneration"]
    config.save_pretrained(str(out))
    synthetic.write_tokenizer(out)
    (out / "preprocessor_config.json").write_text(json.dumps(synthetic.PREPROCESSOR, indent=2, sort_keys=True))
    return out


def _mtp_head_on_meta(config):
    """The checkpoint's multi-token-prediction head (`mtp.*`, as transformers leaves it out of the
    model) as shapes only: synthetic.build_mtp's layout -- fc [hidden, 2*hidden], three norms, and
    mtp_num_hidden_layers full-attention decoder layers -- with no weight allocated. None: no head."""
    import copy

    import torch
    from torch import nn
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5DecoderLayer, Qwen3_5RMSNorm

    text = config.text_config
    n = int(getattr(text, "mtp_num_hidden_layers", 0) or 0)
    head = nn.Module()
    if not n:
        return head
    layer_cfg = copy.deepcopy(text)
    layer_cfg.layer_types = ["full_attention"] * n
    hidden, eps = text.hidden_size, text.rms_norm_eps
    with torch.device("meta"):
        head.fc = nn.Linear(2 * hidden, hidden, bias=False)
        head.pre_fc_norm_embedding = Qwen3_5RMSNorm(hidden, eps=eps)
        head.pre_fc_norm_hidden = Qwen3_5RMSNorm(hidden, eps=eps)
        head.layers = nn.ModuleList(Qwen3_5DecoderLayer(layer_cfg, i) for i in range(n))
        head.norm = Qwen3_5RMSNorm(hidden, eps=eps)
    return head


def sparse_reference(checkpoint: Path, out: Path, mmproj: bool = False, draft: bool = False) -> Path:
    """The reference GGUF (BF16 text model, F16 projector, or with `draft` the BF16 MTP draft that
    convert.mtp=draft ships) as header plus sparse data."""
    cmd = [sys.executable, "-c", _HEADER_ONLY, str(converter()), str(checkpoint), "--outfile", str(out),
           "--model-name", checkpoint.name]
    cmd += (["--mmproj", "--outtype", "f16"] if mmproj else ["--mtp", "--outtype", "bf16"] if draft
            else ["--outtype", "bf16", "--no-mtp"])
    env = dict(os.environ, NO_LOCAL_GGUF="1")  # the venv's gguf-py (from the same archive) gets the patch
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=VENDOR_DIR)
    if proc.returncode != 0 or not out.is_file():
        raise ForgeError("sparse conversion failed", where=str(checkpoint), found=proc.stderr[-1500:])
    return out


def copy_metadata(reader, writer) -> None:
    """Every metadata entry of a GGUFReader into a GGUFWriter (the writer sets the architecture
    and the GGUF header fields itself)."""
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        writer.add_key_value(field.name, field.contents(), field.types[0],
                             field.types[-1] if field.types[0].name == "ARRAY" else None)


_TENSOR_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[([\d,\s]+)\], type =\s+(\w+),")
_NEW_TYPE = re.compile(r"\((\w+)\)\s*$")


def _kv_bytes(key: str, value) -> int:
    """Bytes of one GGUF metadata entry: key string, type tag, value (string or 32-bit int)."""
    size = 8 + len(key.encode()) + 4
    return size + (8 + len(value.encode()) if isinstance(value, str) else 4)


def imatrix_metadata(corpus_name: str) -> dict:
    """What llama-quantize adds to the header when given an imatrix (forge passes bare names)."""
    return {"quantize.imatrix.file": "imatrix.gguf", "quantize.imatrix.dataset": corpus_name,
            "quantize.imatrix.entries_count": 0, "quantize.imatrix.chunks_count": 0}


def dry_run(reference: Path, llama_type: str, extra: list | None = None,
            added_meta: dict | None = None) -> dict:
    """Each tensor's target type as llama-quantize would choose it, and the exact output bytes.

    `added_meta`: metadata the real quantize adds that the dry run does not (the imatrix keys)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    from .ggufcheck import read_layout

    cmd = [str(tool("llama-quantize")), "--dry-run", *(extra or []), str(reference), llama_type]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise ForgeError(f"llama-quantize --dry-run {llama_type} failed", where=str(reference), found=text[-1500:])
    layout = read_layout(reference)
    align = int(layout["meta"].get("general.alignment", 32))
    tensors, name, dims, cur = {}, None, None, None
    for line in text.splitlines():
        m = _TENSOR_LINE.match(line)
        if m:
            name, dims, cur = m.group(1), [int(d) for d in m.group(2).split(",")], m.group(3)
        if name and "size =" in line:
            t = _NEW_TYPE.search(line)
            new = t.group(1) if t and "->" in line else cur
            qtype = GGMLQuantizationType[new.upper()]
            block, type_size = GGML_QUANT_SIZES[qtype]
            nrows = 1
            for d in dims[1:]:
                nrows *= d
            tensors[name] = {"type": qtype.name, "bytes": nrows * (dims[0] // block) * type_size}
            name = None
    data = sum(t["bytes"] + (-t["bytes"]) % align for t in tensors.values())
    header_end = layout["header_end"] + sum(_kv_bytes(k, v) for k, v in (added_meta or {}).items())
    header = (header_end + align - 1) // align * align
    return {"tensors": tensors, "data_bytes": data, "header_bytes": header,
            "file_bytes": header + data, "requires_imatrix": "will require an imatrix" in text}
