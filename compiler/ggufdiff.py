"""What differs between two GGUF files, key by key and tensor by tensor: the header walked with
ggufcheck's struct reader (no per-element numpy views), tensor bytes compared through mmap, and only
tensors whose bytes differ dequantized, with gguf-py's dequantizers.

    python -m compiler.ggufdiff A.gguf B.gguf      -> a table; exit 1 when they differ

For each differing tensor: its types and shapes, the share of its bytes that differ, and the
largest absolute difference after dequantizing both -- enough to tell a one-tensor edit from a
k-quant rounding drift that touches every block.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .errors import ForgeError

def _layout(path: Path) -> dict:
    from .ggufcheck import check, read_layout

    check(Path(path))  # a truncated or corrupted file gets its own clear error first
    return read_layout(Path(path), arrays=True)


def _dequant(raw: np.ndarray, ttype: str, dims: list[int]) -> np.ndarray:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType[ttype]
    block, type_size = GGML_QUANT_SIZES[qtype]
    rows = raw.reshape(-1, dims[0] // block * type_size)
    return np.asarray(dequantize(rows, qtype), dtype=np.float32).reshape(-1)


def compare(a: Path, b: Path) -> dict:
    """A report of every difference between two GGUFs; "identical" is True only when both the
    metadata and every tensor's type, shape and bytes agree."""
    la, lb = _layout(a), _layout(b)
    keys = []
    for k in sorted(set(la["meta"]) | set(lb["meta"])):
        va, vb = la["meta"].get(k, "<absent>"), lb["meta"].get(k, "<absent>")
        if va != vb:
            show = lambda v: f"array of {v[1]} (sha256 {v[2][:12]})" if isinstance(v, tuple) else v
            keys.append({"key": k, "a": show(va), "b": show(vb)})
    ta = {t["name"]: t for t in la["tensors"]}
    tb = {t["name"]: t for t in lb["tensors"]}
    tensors = []
    ma, mb = np.memmap(a, dtype=np.uint8, mode="r"), np.memmap(b, dtype=np.uint8, mode="r")
    for name in list(ta) + [n for n in tb if n not in ta]:
        if name not in ta or name not in tb:
            tensors.append({"tensor": name, "problem": "only in " + ("a" if name in ta else "b")})
            continue
        x, y = ta[name], tb[name]
        row = {"tensor": name, "type": [x["type"], y["type"]], "shape": [x["dims"], y["dims"]]}
        if x["type"] != y["type"] or x["dims"] != y["dims"]:
            row["problem"] = "type or shape differs"
            tensors.append(row)
            continue
        sa = la["data_start"] + x["offset"]
        sb = lb["data_start"] + y["offset"]
        bx, by = ma[sa:sa + x["n_bytes"]], mb[sb:sb + y["n_bytes"]]
        if np.array_equal(bx, by):
            continue
        row["bytes"] = int(bx.size)
        row["bytes_differing_share"] = round(float(np.count_nonzero(bx != by)) / max(bx.size, 1), 6)
        try:
            dx, dy = _dequant(bx, x["type"], x["dims"]), _dequant(by, y["type"], y["dims"])
            row["max_abs_diff"] = float(np.max(np.abs(dx - dy))) if dx.size else 0.0
            row["max_abs_value"] = float(np.max(np.abs(dx))) if dx.size else 0.0
        except (NotImplementedError, ValueError) as e:
            row["max_abs_diff"] = None
            row["note"] = f"no dequantizer: {e}"
        row["problem"] = "data differs"
        tensors.append(row)
    return {"a": str(a), "b": str(b), "identical": not keys and not tensors,
            "tensor_count": [len(ta), len(tb)], "metadata": keys, "tensors": tensors}


def format_report(report: dict, indent: str = "") -> list[str]:
    if report["identical"]:
        return [f"{indent}identical: metadata and all {report['tensor_count'][0]} tensors"]
    lines = [f"{indent}a = {report['a']}", f"{indent}b = {report['b']}"]
    for k in report["metadata"]:
        lines.append(f"{indent}metadata {k['key']}: {k['a']!r} != {k['b']!r}")
    if report["tensors"]:
        lines.append(f"{indent}{'tensor':<40} {'type':<10} {'bytes differ':>12} {'max |diff|':>12}")
    for t in report["tensors"]:
        if t["problem"] != "data differs":
            lines.append(f"{indent}{t['tensor']:<40} {t['problem']} {t.get('type', '')} {t.get('shape', '')}")
            continue
        diff = "n/a" if t["max_abs_diff"] is None else f"{t['max_abs_diff']:.4g}"
        lines.append(f"{indent}{t['tensor']:<40} {t['type'][0]:<10} {100 * t['bytes_differing_share']:>11.2f}% {diff:>12}")
    n = len(report["tensors"])
    lines.append(f"{indent}{n} of {report['tensor_count'][0]} tensors differ, {len(report['metadata'])} metadata keys differ")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m compiler.ggufdiff A.gguf B.gguf", file=sys.stderr)
        return 2
    try:
        report = compare(Path(argv[0]), Path(argv[1]))
    except ForgeError as e:
        print(f"forge: {e}", file=sys.stderr)
        return 2
    print("\n".join(format_report(report)))
    if "--json" in sys.argv:
        print(json.dumps(report))
    return 0 if report["identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main([a for a in sys.argv[1:] if a != "--json"]))
