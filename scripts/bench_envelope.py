#!/usr/bin/env python3
"""Benchmark the envelope estimator against what llama.cpp allocates, at real Qwen3.5 shapes.

For each shape (default 0.8b, 2b, 4b from shapes/), a quantized GGUF of the real layout is written
*sparse*: the sparse BF16 reference from plan mode, each tensor's type and size from
llama-quantize --dry-run, the data never written (zeros on read). llama.cpp loads it like any
other file and reports its buffers, which do not depend on the weights' values. Each tier's
settings (n_ctx x n_seq_max, unified KV) are measured on this machine's CPU backend and compared
with the estimate, term by term.

    .venv/bin/python scripts/bench_envelope.py [--shapes 0.8b,2b,4b] [--quant q4_k_m] [--tiers m4,air]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compiler import config, envelope, sizing  # noqa: E402
from compiler.fit import quantized_layout, references  # noqa: E402
from compiler.ggufcheck import read_layout  # noqa: E402
from compiler.paths import build_dir  # noqa: E402

# What peers published for Qwen3.5-family memory (FACTS.md): error of their estimate vs llama.cpp.
PEERS = [("gguf-parser-go, qwen35moe KV (issue #28)", "~+300% (about 4x)"),
         ("LM Studio, Qwen3.5-9B at 110k context (lms #499)", "+99% (22.9 GB vs ~11.5 GB)")]


def sparse_quantized(reference: Path, dry: dict, out: Path) -> Path:
    """A GGUF with the quantized layout and no data: metadata copied, tensor infos retyped."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFWriter, GGMLQuantizationType

    reader = GGUFReader(str(reference))
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(str(out), arch=arch)
    sizing.copy_metadata(reader, writer)
    for t in reader.tensors:
        info = dry["tensors"].get(t.name)
        qtype = GGMLQuantizationType[info["type"]] if info else t.tensor_type
        nbytes = info["bytes"] if info else int(t.n_bytes)
        # gguf-py takes a quantized tensor's shape in bytes per row (numpy order).
        block, type_size = GGML_QUANT_SIZES[qtype]
        shape = [int(d) for d in reversed(t.shape)]
        shape[-1] = shape[-1] // block * type_size
        writer.add_tensor_info(t.name, shape, np.uint8, nbytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]
    writer.write_padding(fout, fout.tell())
    end = fout.tell() + sum(i["bytes"] + (-i["bytes"]) % writer.data_alignment for i in dry["tensors"].values())
    fout.flush()
    fout.truncate(end)
    writer.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="0.8b,2b,4b")
    ap.add_argument("--quant", default="q4_k_m")
    ap.add_argument("--tiers", default="m4,air")
    ap.add_argument("--json")
    args = ap.parse_args()
    work = build_dir() / "plan"
    rows = []
    for shape in args.shapes.split(","):
        text_ref, mmproj_ref, _ = references(shape, work)
        qcfg = config.compose("m4", args.quant, [])["quant"]
        dry = sizing.dry_run(text_ref, qcfg["llama_type"])
        qpath = sparse_quantized(text_ref, dry, work / shape / f"text-{qcfg['label']}.sparse.gguf")
        text = envelope.text_shape(quantized_layout(read_layout(text_ref), dry))
        vision = envelope.vision_shape(read_layout(mmproj_ref))
        for tier in args.tiers.split(","):
            cfg = config.compose(tier, args.quant, ["backend=cpu"])
            rt = envelope.runtime(cfg)
            proc = subprocess.run([sys.executable, "-m", "compiler.measure", str(qpath), str(mmproj_ref),
                                   str(rt["n_ctx"]), str(rt["n_seq_max"]), str(rt["n_batch"])],
                                  capture_output=True, text=True, cwd=ROOT)
            measured = json.loads(proc.stdout.strip().splitlines()[-1])
            comparison = envelope.side_by_side(text, vision, rt, measured)
            est_total = sum(r["estimate_bytes"] for r in comparison if r["measured_bytes"])
            meas_total = sum(r["measured_bytes"] for r in comparison if r["measured_bytes"])
            rows.append({"shape": shape, "quant": qcfg["label"], "tier": tier, "n_ctx": rt["n_ctx"],
                         "n_seq_max": rt["n_seq_max"], "terms": comparison,
                         "total_estimate": est_total, "total_measured": meas_total,
                         "total_error_pct": round(100 * (est_total - meas_total) / meas_total, 2)})
            print(f"[bench] {shape} {qcfg['label']} {tier}: total error {rows[-1]['total_error_pct']:+.2f}%",
                  file=sys.stderr)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, CPU backend"
    print(f"Envelope estimate vs llama.cpp's own buffers ({machine}); sparse GGUFs of the real layouts\n")
    print("| shape | quant | tier (n_ctx x seq) | term | estimate MiB | measured MiB | error |")
    print("|---|---|---|---|---|---|---|")
    worst = 0.0
    for r in rows:
        for t in r["terms"] + [{"term": "total of measured terms", "estimate_bytes": r["total_estimate"],
                                "measured_bytes": r["total_measured"], "error_pct": r["total_error_pct"]}]:
            if t["measured_bytes"] is None:
                continue
            worst = max(worst, abs(t["error_pct"] or 0))
            print(f"| {r['shape']} | {r['quant']} | {r['tier']} ({r['n_ctx'] // r['n_seq_max']} x {r['n_seq_max']}) | "
                  f"{t['term']} | {t['estimate_bytes'] / 2**20:.2f} | {t['measured_bytes'] / 2**20:.2f} | "
                  f"{t['error_pct']:+.2f}% |")
    print(f"\nlargest error of any term: {worst:.2f}%")
    print("\nPeers, as published (FACTS.md):")
    for name, err in PEERS:
        print(f"- {name}: {err}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
