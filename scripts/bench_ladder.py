#!/usr/bin/env python3
"""Benchmark the quant ladder on a random-weight checkpoint of a real Qwen3.5 shape.

Builds one alloy with every quant type in conf/quant/ (importance matrix over the forge calibration
text) through the real `doit` graph in its own build folder, then prints one table: imatrix time,
quantize time and size per type, and the quality gate's figures (mean KLD, 99th-percentile KLD,
top-1 agreement, PPL ratio against the BF16 reference on held-out text) with pass/fail against the
conf thresholds. Figures of a variant whose gate failed are read from its kept log.

    .venv/bin/python scripts/bench_ladder.py --shape 0.8b            # all types, ~30 min on 2 cores
    .venv/bin/python scripts/bench_ladder.py --shape tiny --quants q8_0,q4_k_m,iq2_xxs

Random weights make the figures a test of the mechanics and of the ranking, not of real quality.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compiler import config  # noqa: E402
from compiler.stages import gate as gate_stage  # noqa: E402

CALIBRATION = "calibration/forge-calibration-v1.txt"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="0.8b", help="tiny, or a file in shapes/ (0.8b, 2b, 4b, 9b, 27b)")
    ap.add_argument("--quants", default="all", help="comma-separated conf/quant names, or 'all'")
    ap.add_argument("--workdir", default=str(ROOT / "build" / "bench"), help="build and alloys folder")
    ap.add_argument("--json", default=None, help="also write the table as JSON here")
    args = ap.parse_args()

    quants = config.choices("quant") if args.quants == "all" else args.quants.split(",")
    labels = [config.compose("m4", q, [])["quant"]["label"] for q in quants]
    llama_types = [config.compose("m4", q, [])["quant"]["llama_type"] for q in quants]
    # A recipe's quantTypes are forge-alloy quant types: the named variants (Q4_K_L: a label that
    # is not its llama type) are built as command-line overrides of the same alloy instead.
    plain = [q for q, label, lt in zip(quants, labels, llama_types) if label == lt]
    named = [q for q in quants if q not in plain]
    name = f"bench-{args.shape.replace('.', '_')}"
    work = Path(args.workdir) / name
    alloys = work / "alloys"
    alloys.mkdir(parents=True, exist_ok=True)
    from hashlib import sha256

    calib_sha = sha256((ROOT / CALIBRATION).read_bytes()).hexdigest()
    alloy = {
        "name": name, "version": "1.0.0", "tier": "m4",
        "description": f"Ladder benchmark on a random-weight Qwen3.5 {args.shape} checkpoint.",
        "source": {"baseModel": f"forge-bench/qwen3.5-{args.shape}-random", "architecture": "qwen3_5",
                   "revision": "synthetic-v1", "synthetic": {"shape": args.shape, "seed": 1234}},
        "stages": [{"type": "modality", "modality": "vision", "encoderModel": f"forge-bench/qwen3.5-{args.shape}-random"},
                   # With no plain type asked for, the alloy's own quant is never built (only overrides run).
                   {"type": "quant", "format": "gguf",
                    "quantTypes": [labels[quants.index(q)] for q in plain] or [llama_types[0]],
                    "calibration": {"file": CALIBRATION, "sha256": calib_sha}}],
        "cycles": 1,
    }
    (alloys / f"{name}.alloy.json").write_text(json.dumps(alloy, indent=2) + "\n")
    env = dict(os.environ, FORGE_BUILD_DIR=str(work / "build"), FORGE_ALLOYS_DIR=str(alloys), HF_HUB_OFFLINE="1")
    t0 = time.monotonic()
    runs = ([[]] if plain else []) + [[f"alloy={name}", f"quant={q}"] for q in named]
    procs = [subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "-d", str(ROOT), *extra],
                            env=env, cwd=ROOT, text=True, capture_output=True) for extra in runs]
    wall = time.monotonic() - t0
    (work / "doit.log").write_text("".join(p.stdout + p.stderr for p in procs))

    store = work / "build" / "store"

    def manifests(kind):
        return [json.loads(p.read_text()) for p in (store / kind).glob("*/manifest.json")] if (store / kind).is_dir() else []

    seconds = {kind: sum(m.get("seconds", 0) for m in manifests(kind))
               for kind in ("synthetic", "convert", "mmproj", "imatrix", "kld-base")}
    quantized = {m["params"]["llama_type"] + json.dumps(m["params"], sort_keys=True): m for m in manifests("quantize")}
    rows = []
    for q, label in zip(quants, labels):
        cfg = config.compose("m4", q, [])["quant"]
        vid = name if plain and q == plain[0] else f"{name}@{q}"
        qm = next((m for m in quantized.values() if m["params"]["llama_type"] == cfg["llama_type"]
                   and m["params"]["output_type"] == cfg["output_type"]), None)
        gate_json = next((json.loads(p.read_text()) for p in (store / "gate").glob("*/gate.json")
                          if json.loads(p.read_text())["label"] == label), None) if (store / "gate").is_dir() else None
        if gate_json:
            figures = gate_json["figures"]
        else:
            failed = work / "build" / "logs" / f"gate_{vid}.failed.log"
            figures = gate_stage.parse(failed.read_text()) if failed.exists() else {}
        checks = gate_stage.judge(figures, cfg["gate"]) if figures else []
        rows.append({
            "quant": label, "imatrix": qm is not None and qm["params"]["imatrix"] is not None,
            "quantize_s": qm.get("seconds") if qm else None,
            "size_mib": round(qm["files"][0]["size"] / 2**20, 1) if qm else None,
            **{k: figures.get(k) for k in ("mean_kld", "p99_kld", "top1_agreement", "ppl_ratio")},
            "gate": ("pass" if all(c["passed"] for c in checks) else "FAIL") if checks else "not run",
        })
    result = {"shape": args.shape, "machine": f"{platform.machine()}, {os.cpu_count()} cores", "wall_s": round(wall, 1),
              "stage_seconds": seconds, "rows": rows, "doit_exit": max(p.returncode for p in procs)}
    print(f"ladder on random-weight Qwen3.5 {args.shape} ({result['machine']}): wall {wall:.0f} s; "
          + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    print(f"| quant | imatrix | quantize s | size MiB | mean KLD | p99 KLD | top-1 | PPL ratio | gate |")
    print("|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        print(f"| {r['quant']} | {'yes' if r['imatrix'] else 'no'} | {fmt(r['quantize_s'], '.1f')} | "
              f"{fmt(r['size_mib'], '.1f')} | {fmt(r['mean_kld'], '.6f')} | {fmt(r['p99_kld'], '.6f')} | "
              f"{fmt(r['top1_agreement'], '.4f')} | {fmt(r['ppl_ratio'], '.4f')} | {r['gate']} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
