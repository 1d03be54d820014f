"""Vision preservation: the projector must carry the whole visual tower it was converted from.

llama.cpp issue #22656 describes projectors that came out a fraction of their tower's size with
tensors silently missing. This compares the converted projector's tensor table with the source
checkpoint's visual tower (safetensors headers and config.json: no full weight load) and hashes
both, so the receipt can say which tower went into which projector."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from .errors import ForgeError
from .ggufcheck import read_layout

TOWER_PREFIXES = ("model.visual.", "visual.")
MIN_SIZE_RATIO = 0.4  # Q8_0 of a bf16 tower is ~0.53; f16 ~1.0


def _safetensors_headers(folder: Path):
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        yield f, 8 + n, header


def tower(folder: Path) -> dict:
    """Count, bytes and a content hash of the source's visual tower tensors."""
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
    return {"tensors": count, "bytes": size, "sha256": h.hexdigest(), "depth": depth}


def projector(path: Path) -> dict:
    layout = read_layout(path)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for t in sorted(layout["tensors"], key=lambda t: t["name"]):
            fh.seek(layout["data_start"] + t["offset"])
            h.update(t["name"].encode() + json.dumps(t["dims"]).encode() + fh.read(t["n_bytes"]))
    return {"tensors": len(layout["tensors"]), "bytes": sum(t["n_bytes"] for t in layout["tensors"]),
            "sha256": h.hexdigest(), "names": sorted(t["name"] for t in layout["tensors"])}


def check(source: dict, proj: dict, where: str) -> None:
    """Refuse a projector that lacks a block, the patch embedding or the merger, or that is much
    smaller than its tower."""
    names = set(proj["names"])
    missing = [f"v.blk.{i}.*" for i in range(source["depth"] or 0) if not any(n.startswith(f"v.blk.{i}.") for n in names)]
    blocks = {n.split(".")[2] for n in names if n.startswith("v.blk.")}
    per_block = {}
    for n in names:
        if n.startswith("v.blk."):
            per_block.setdefault(n.split(".")[2], set()).add(".".join(n.split(".")[3:]))
    if per_block:
        full = set().union(*per_block.values())
        for b in sorted(blocks, key=int):
            missing += [f"v.blk.{b}.{t}" for t in sorted(full - per_block[b])]
    for required in ("v.patch_embd.weight", "mm."):
        if not any(n == required or (required.endswith(".") and n.startswith(required)) for n in names):
            missing.append(required + ("*" if required.endswith(".") else ""))
    if missing:
        raise ForgeError(f"the projector is missing tensors of its visual tower: {', '.join(missing[:12])}",
                         where=where, found=f"{proj['tensors']} tensors in the projector",
                         allowed=f"every block of the {source['depth']}-block tower, the patch embedding and the merger")
    ratio = proj["bytes"] / source["bytes"] if source["bytes"] else 1.0
    if ratio < MIN_SIZE_RATIO:
        raise ForgeError(f"the projector is {ratio:.0%} of its visual tower's size (llama.cpp issue #22656)",
                         where=where, found=f"{proj['bytes']} bytes against {source['bytes']}",
                         allowed=f"at least {MIN_SIZE_RATIO:.0%}")
