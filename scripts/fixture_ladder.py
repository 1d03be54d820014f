#!/usr/bin/env python3
"""The quant ladder on the demo fixture (issue 17): each type's text quality against the BF16
reference and its vision score, relative to the fixture's own Q8_0, as one table.

Needs the demo built (`.venv/bin/doit alloy=demo`): takes its BF16 reference, importance matrix
and reference logits from the store (the lock's keys), then per type runs llama-quantize (with the
imatrix), llama-perplexity --kl-divergence against the same reference logits, and the smoke's
vision suite through llama.cpp (compiler.smoke_run with the demo's own smoke parameters). Figures:
mean KLD, 99th and 99.9th-percentile KLD, same top token (llama-perplexity's "same top p"), and the
pass/fail of each type's conf/quant gate.

    .venv/bin/python scripts/fixture_ladder.py          # -> docs/fixture-ladder.md (and .json)
"""
from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compiler import config  # noqa: E402
from compiler.stages import gate as gate_stage  # noqa: E402
from compiler.toolchain import tool  # noqa: E402

# (label, conf/quant name, output tensor type override)
LADDER = [("Q8_0", "q8_0", None), ("Q6_K", "q6_k", None), ("Q5_K_M", "q5_k_m", None), ("Q4_K_M", "q4_k_m", None),
          ("IQ4_XS", "iq4_xs", None), ("Q3_K_M", "q3_k_m", None), ("IQ3_M", "iq3_m", None), ("Q2_K", "q2_k", None),
          ("IQ2_M", "iq2_m", None), ("IQ2_XXS", "iq2_xxs", None), ("IQ2_XXS, output Q2_K", "iq2_xxs", "q2_k")]


def store(kind: str, key: str) -> Path:
    return ROOT / "build" / "store" / kind / key


def kld(model: Path, base: Path, gate: dict) -> tuple[dict, str]:
    out = subprocess.run([str(tool("llama-perplexity")), "-m", str(model), "--kl-divergence-base", str(base),
                          "--kl-divergence", "-c", str(gate["ctx"]), "--chunks", str(gate["chunks"]), "-t", "2"],
                         capture_output=True, text=True)
    text = out.stdout + out.stderr
    figures = gate_stage.parse(text)
    m = re.search(r"^99\.9%\s+KLD:\s+([-\d.eE+]+)", text, re.M)
    figures["p999_kld"] = float(m.group(1)) if m else None
    return figures, text


def vision(model: Path, mmproj: Path, params: dict, work: Path) -> float:
    path = work / "smoke-params.json"
    path.write_text(json.dumps(params["run"]))
    out = subprocess.run([sys.executable, "-m", "compiler.smoke_run", str(model), str(mmproj), str(path)],
                         capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])["vision"]["score"]


def main() -> int:
    lock = json.loads((ROOT / "alloys" / "forge.lock.json").read_text())["variants"]["demo"]
    keys = lock["keys"]
    reference = next(store("convert", keys["convert"]).glob("*.gguf"))
    imatrix = next(store("imatrix", keys["imatrix"]).glob("*.gguf"))
    base = store("kld-base", json.loads((store("gate", keys["gate"]) / "manifest.json").read_text())["inputs"]["base"]) / "base.kld"
    smoke_params = json.loads((store("smoke", keys["smoke"]) / "manifest.json").read_text())["params"]
    mmproj = ROOT / "build" / "variants" / "demo" / "mmproj-demo-F16.gguf"
    gate = config.compose("m4", "q4_k_m", [])["gate"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for label, name, output in LADDER:
            q = config.compose("m4", name, [])["quant"]
            model = work / f"fixture-{name}.gguf"
            cmd = [str(tool("llama-quantize")), "--imatrix", str(imatrix)]
            if output:
                cmd += ["--output-tensor-type", output]
            t0 = time.monotonic()
            subprocess.run(cmd + [str(reference), str(model), q["llama_type"], "2"], capture_output=True, check=True)
            secs = time.monotonic() - t0
            figures, _ = kld(model, base, gate)
            checks = gate_stage.judge(figures, q["gate"], gate["max_base_ppl"])
            failed = [c["figure"] for c in checks if not c["passed"]]
            row = {"type": label, "quantize_s": round(secs, 1), "mib": round(model.stat().st_size / 2**20, 1),
                   **{k: figures.get(k) for k in ("mean_kld", "p99_kld", "p999_kld", "top1_agreement")},
                   "vision": vision(model, mmproj, smoke_params, work), "gate_failed": failed}
            rows.append(row)
            print(json.dumps(row), flush=True)
            model.unlink()
    q8 = rows[0]
    lines = ["# The quant ladder on the demo fixture", "",
             f"Machine: {platform.machine()}, 2 threads, CPU backend. The demo fixture (docs/fixture.md) at each type "
             "with its importance matrix, against its BF16 reference on calibration/forge-heldout-v1.txt "
             f"({gate['ctx']} x {gate['chunks']} tokens), and its 40-item held-out vision suite with the F16 "
             "projector. Ratios are to the fixture's own Q8_0. Made by `scripts/fixture_ladder.py`.", "",
             "| type | MiB | mean KLD | x Q8_0 | p99 KLD | p99.9 KLD | same top | vision | conf gate |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        ratio = r["mean_kld"] / q8["mean_kld"] if q8["mean_kld"] else float("nan")
        gate_txt = "pass" if not r["gate_failed"] else "FAIL (" + ", ".join(r["gate_failed"]) + ")"
        lines.append(f"| {r['type']} | {r['mib']} | {r['mean_kld']:.5f} | {ratio:.1f} | {r['p99_kld']:.4f} | "
                     f"{r['p999_kld']:.4f} | {100 * r['top1_agreement']:.2f}% | {r['vision']:.2f} | {gate_txt} |")
    text = "\n".join(lines) + "\n"
    print(text)
    (ROOT / "docs" / "fixture-ladder.md").write_text(text)
    (ROOT / "docs" / "fixture-ladder.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
