"""Vision preservation: the projector must carry the whole visual tower it was converted from.

llama.cpp issue #22656 describes projectors that came out a fraction of their tower's size with
tensors silently missing. This compares the converted projector's tensor table with the source
checkpoint's visual tower (safetensors headers and config.json: no full weight load) and hashes
both, so the receipt can say which tower went into which projector.

`expected(folder)` says, for every visual tower and merger tensor of the source, which GGUF
tensor(s) the vendored converter writes for it and with which shape; `check` then requires each of
them in the projector with exactly that shape. The name mapping is the converter's own: the
Qwen3.5 projector is written by `Qwen3VLVisionModel` (vendor/llama.cpp/conversion/qwen3vl.py,
registered for Qwen3_5ForConditionalGeneration and Qwen3_5MoeForConditionalGeneration), whose
`modify_tensors` handles a few tensors itself (the rules in `_convert` below, each citing it) and
hands the rest to gguf-py's TensorNameMap for MODEL_ARCH.MMPROJ, which is used here as is."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from .errors import ForgeError
from .ggufcheck import read_layout

TOWER_PREFIXES = ("model.visual.", "visual.")
MIN_SIZE_RATIO = 0.4  # Q8_0 of a bf16 tower is ~0.53; f16 ~1.0
SHOW = 40  # tensors named in one refusal before "and N more"


def _safetensors_headers(folder: Path):
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        yield f, 8 + n, header


def tower(folder: Path) -> dict:
    """Count, bytes and a content hash of the source's visual tower tensors, and `expected`: the
    projector tensors (GGUF name and dims) the converter makes of them (see `expected`)."""
    h = hashlib.sha256()
    count = size = 0
    for f, base, header in _safetensors_headers(folder):
        with open(f, "rb") as fh:
            for name in sorted(k for k in header if k.startswith(TOWER_PREFIXES)):
                start, end = header[name]["data_offsets"]
                fh.seek(base + start)
                h.update(name.encode() + json.dumps(header[name]["shape"]).encode() + fh.read(end - start))
                count += 1
                size += end - start
    depth = json.loads((folder / "config.json").read_text()).get("vision_config", {}).get("depth")
    return {"tensors": count, "bytes": size, "sha256": h.hexdigest(), "depth": depth,
            "expected": expected(folder)}


def projector(path: Path) -> dict:
    """Count, bytes and a content hash of the projector's tensors, their names and `shapes`
    (name -> GGUF dims, innermost first: a torch shape reversed)."""
    layout = read_layout(path)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for t in sorted(layout["tensors"], key=lambda t: t["name"]):
            fh.seek(layout["data_start"] + t["offset"])
            h.update(t["name"].encode() + json.dumps(t["dims"]).encode() + fh.read(t["n_bytes"]))
    return {"tensors": len(layout["tensors"]), "bytes": sum(t["n_bytes"] for t in layout["tensors"]),
            "sha256": h.hexdigest(), "names": sorted(t["name"] for t in layout["tensors"]),
            "shapes": {t["name"]: [int(d) for d in t["dims"]] for t in layout["tensors"]}}


# --- what the converter writes -------------------------------------------------------------------

# ModelBase.prepare_tensors (vendor/llama.cpp/conversion/base.py) skips these before any mapping:
# "we don't need these".
_DROPPED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")


def source_tensors(folder: Path) -> dict[str, list[int]]:
    """Name -> torch shape of every visual tower and merger tensor of the checkpoint, from the
    safetensors headers of all its files (sharded or not). With a model.safetensors.index.json,
    a tower tensor it lists that no file holds is refused (a shard is missing)."""
    folder = Path(folder)
    shapes: dict[str, list[int]] = {}
    for _, _, header in _safetensors_headers(folder):
        for name, info in header.items():
            if name.startswith(TOWER_PREFIXES):
                shapes[name] = [int(d) for d in info["shape"]]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        lost = sorted(n for n in weight_map if n.startswith(TOWER_PREFIXES) and n not in shapes)
        if lost:
            files = sorted({weight_map[n] for n in lost})
            raise ForgeError(f"the checkpoint's index lists visual tower tensors no file holds: {_some(lost)}",
                             where=str(folder), found=f"missing shard(s): {', '.join(files)}")
    return shapes


def _convert(name: str, shape: list[int], vision: dict, tmap, gguf) -> list[tuple[str, list[int]]] | None:
    """What Qwen3VLVisionModel writes for one source tensor: (GGUF name, torch shape) pairs, [] for
    a tensor dropped on purpose, None for one the converter cannot map (it raises on those)."""
    # Qwen3VLVisionModel.filter_tensors (conversion/qwen3vl.py): "model.visual." -> "visual.".
    if name.startswith("model.visual."):
        name = name.replace("model.visual.", "visual.", 1)
    if name.endswith(_DROPPED_SUFFIXES):
        return []

    def mapped(gguf_name: str, out_shape: list[int]):
        # ModelBase.modify_tensors -> map_tensor_name: TensorNameMap.get_name(try_suffixes=(".weight", ".bias")).
        # (Its Q/K/V and gate/up expert fusions concern text arches only: MODEL_TENSORS[MMPROJ] has
        # neither ATTN_QKV nor FFN_GATE_EXP, and the Qwen3.5 tower stores qkv already fused.)
        new = tmap.get_name(gguf_name, try_suffixes=(".weight", ".bias"))
        return None if new is None else [(new, out_shape)]

    # Rule 1 (qwen3vl.py modify_tensors, "visual.deepstack_merger_list."): deepstack merger i is
    # renamed to v.deepstack.{deepstack_visual_indexes[i]}.{norm,fc1,fc2} (absolute clip layer index).
    # Qwen3.5 checkpoints have deepstack_visual_indexes == [], Qwen3-VL ones use it.
    if name.startswith("visual.deepstack_merger_list."):
        i, rest = name.split(".", 3)[2:]
        kind, _, suffix = rest.partition(".")
        key = {"norm": gguf.MODEL_TENSOR.V_DS_NORM, "linear_fc1": gguf.MODEL_TENSOR.V_DS_FC1,
               "linear_fc2": gguf.MODEL_TENSOR.V_DS_FC2}.get(kind)
        indexes = vision.get("deepstack_visual_indexes") or []
        if key is None or not i.isdecimal() or int(i) >= len(indexes):
            return None
        return mapped(gguf.TENSOR_NAMES[key].format(bid=indexes[int(i)]) + "." + suffix, shape)

    # Rule 2 (qwen3vl.py modify_tensors, "visual.merger."): the merger's two linears become
    # mm.0 and mm.2 ("matching Qwen2VL which uses indices 0 and 2") and its norm becomes the
    # post-layernorm v.post_ln (V_POST_NORM); any other merger tensor makes the converter raise.
    if name.startswith("visual.merger."):
        part, _, suffix = name.split(".", 2)[2].partition(".")
        if part in ("linear_fc1", "linear_fc2"):
            return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ].format(bid=0 if part == "linear_fc1" else 2)
                     + "." + suffix, shape)]
        if part == "norm":
            return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_POST_NORM] + "." + suffix, shape)]
        return None

    # Rule 3 (qwen3vl.py modify_tensors, "visual.patch_embed.proj.weight": "split Conv3D into
    # Conv2Ds along temporal dimension"): the [out, in, kt, kh, kw] Conv3d kernel, kt == 2 (the
    # converter raises on any other temporal_patch_size), becomes v.patch_embd.weight (t = 0) and
    # v.patch_embd.weight.1 (t = 1), each [out, in, kh, kw].
    patch = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_EMBD_PATCH]
    if name == "visual.patch_embed.proj.weight":
        if len(shape) != 5 or shape[2] != 2:
            return None
        half = shape[:2] + shape[3:]
        return [(patch + ".weight", half), (patch + ".weight.1", half)]
    # Rule 4 (same place): the Conv3d bias is kept as v.patch_embd.bias ("used by the C++ code").
    if name == "visual.patch_embed.proj.bias":
        return [(patch + ".bias", shape)]

    # Everything else (blocks' norm1/norm2/attn.qkv/attn.proj/mlp.linear_fc1/mlp.linear_fc2,
    # pos_embed) goes through MmprojModel -> ModelBase.modify_tensors, i.e. the TensorNameMap.
    return mapped(name, shape)


def expected(folder: Path) -> dict[str, list[list]]:
    """Source tensor name -> [[GGUF name, GGUF dims], ...] for every visual tower and merger tensor
    of the checkpoint: what the vendored converter writes for it in the projector (one entry for
    most, two for the split patch embedding, none for a tensor it drops on purpose). GGUF dims are
    the torch shape reversed (innermost first), as the converter's GGUFWriter stores them.
    Reads config.json and the safetensors headers only."""
    import gguf

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    vision = config.get("vision_config") or {}
    # MmprojModel.__init__: block_count from the vision config's "depth" (n_block_keys), and
    # tensor_map = gguf.get_tensor_name_map(MODEL_ARCH.MMPROJ, block_count).
    depth = int(vision.get("depth") or 0)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, depth)
    out, unmapped = {}, []
    for name, shape in sorted(source_tensors(folder).items()):
        made = _convert(name, shape, vision, tmap, gguf)
        if made is None:
            unmapped.append(f"{name} {shape}")
            continue
        out[name] = [[new, list(reversed(s))] for new, s in made]
    if unmapped:
        raise ForgeError(f"the vendored converter has no projector tensor for: {_some(unmapped)}",
                         where=str(folder), found=f"a {depth}-block visual tower",
                         allowed="the tensors Qwen3VLVisionModel (conversion/qwen3vl.py) maps",
                         hint="the converter itself would stop at these (\"Can not map tensor\")")
    return out


def _some(items: list[str]) -> str:
    more = len(items) - SHOW
    return ", ".join(items[:SHOW]) + (f" and {more} more" if more > 0 else "")


def check(source: dict, proj: dict, where: str, expected: dict | None = None) -> None:
    """Refuse a projector that lacks any tensor the converter makes of the tower, holds one with
    another shape, lacks a block, or is much smaller than its tower.

    `expected` defaults to source["expected"] (what `tower` records); without either, only the
    older loose checks run (every block, the patch embedding and some merger tensor present)."""
    names = set(proj["names"])
    want = expected if expected is not None else source.get("expected")
    missing = [f"v.blk.{i}.*" for i in range(source["depth"] or 0) if not any(n.startswith(f"v.blk.{i}.") for n in names)]
    wrong = []
    if want is None:
        missing += _loose_missing(names)
    else:
        shapes = proj.get("shapes") or {}
        for src, outs in sorted(want.items()):
            for new, dims in outs:
                if new not in names:
                    missing.append(f"{src} -> {new}")
                elif new in shapes and list(shapes[new]) != list(dims):
                    wrong.append(f"{src} -> {new}: expected {list(dims)}, found {list(shapes[new])}")
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"the projector is missing tensors of its visual tower: {_some(missing)}")
        if wrong:
            parts.append(f"the projector has tensors of the wrong shape (GGUF dims, innermost first): {_some(wrong)}")
        found = f"{proj['tensors']} tensors in the projector"
        if want is None:
            allowed = f"every block of the {source['depth']}-block tower, the patch embedding and the merger"
        else:
            found += f", {sum(len(v) for v in want.values())} expected from {len(want)} tower tensors"
            allowed = f"every tensor the converter makes of the {source['depth']}-block tower, with its shape"
        raise ForgeError("; ".join(parts), where=where, found=found, allowed=allowed)
    ratio = proj["bytes"] / source["bytes"] if source["bytes"] else 1.0
    if ratio < MIN_SIZE_RATIO:
        raise ForgeError(f"the projector is {ratio:.0%} of its visual tower's size (llama.cpp issue #22656)",
                         where=where, found=f"{proj['bytes']} bytes against {source['bytes']}",
                         allowed=f"at least {MIN_SIZE_RATIO:.0%}")


def _loose_missing(names: set) -> list[str]:
    """The checks for a tower without an expected map: each block has the union of the per-block
    tensor names, and a patch embedding and some merger (mm.) tensor exist."""
    missing = []
    per_block = {}
    for n in names:
        if n.startswith("v.blk."):
            per_block.setdefault(n.split(".")[2], set()).add(".".join(n.split(".")[3:]))
    if per_block:
        full = set().union(*per_block.values())
        for b in sorted(per_block, key=int):
            missing += [f"v.blk.{b}.{t}" for t in sorted(full - per_block[b])]
    for required in ("v.patch_embd.weight", "mm."):
        if not any(n == required or (required.endswith(".") and n.startswith(required)) for n in names):
            missing.append(required + ("*" if required.endswith(".") else ""))
    return missing


def mrope_sections(text_gguf: Path, folder: Path, where: str) -> list[int] | None:
    """The text model's M-RoPE sections as converted must be the checkpoint's: they split each
    image token's rotary dimensions over its time, row and column positions, and nothing in a
    text-only check sees them wrong (text tokens carry one position in all three). The vision
    tower's own 2D sections are compiled into mtmd (models/qwen3vl.cpp), not read from the GGUF.
    Returns the sections, or None for a checkpoint without M-RoPE."""
    from .ggufcheck import read_layout

    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config", config)
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    want = rope.get("mrope_section")
    if not want:
        return None
    want = [int(v) for v in want] + [0] * (4 - len(want))
    # Read without gguf-py's GGUFReader, which decodes the whole 248k-token vocabulary first
    # (about 25 s per smoke on the demo, for a 4-number key).
    meta = read_layout(text_gguf, numbers=(".rope.dimension_sections",))["meta"]
    arch = meta["general.architecture"]
    got = meta.get(f"{arch}.rope.dimension_sections")
    if got != want:
        raise ForgeError("the text model's M-RoPE sections are not the checkpoint's: its image tokens would "
                         "rotate by the wrong positions", where=f"{where}: {arch}.rope.dimension_sections",
                         found=got if got is not None else "no such key", allowed=f"{want} (config.json mrope_section)")
    return got
