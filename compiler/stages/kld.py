"""kld-base / kld-q8: the runs of llama-perplexity the quality gate reads. kld-base stores the
reference model's logits on the held-out text (--kl-divergence-base); kld-q8 runs the source's own
static Q8_0 over the same tokens (--kl-divergence) and keeps its figures, the yardstick every
variant of that source is judged against (stages/gate.py). Apart from the gate's judging so that
a change to how figures are judged does not rerun a reference pass over a 55 GB model."""
from __future__ import annotations

import json
import os
import re

from ..paths import project_file
from ..toolchain import tool

# name in the figures: regex over llama-perplexity's summary (--kl-divergence)
PATTERNS = {
    "mean_kld": r"^Mean\s+KLD:\s+([-\d.eE+]+)",
    "p99_kld": r"^99\.0%\s+KLD:\s+([-\d.eE+]+)",
    "p999_kld": r"^99\.9%\s+KLD:\s+([-\d.eE+]+)",
    "top1_agreement": r"^Same top p:\s+([-\d.eE+]+)",
    "ppl_ratio": r"^Mean PPL\(Q\)/PPL\(base\)\s*:\s+([-\d.eE+]+)",
    "ppl_base": r"^Mean PPL\(base\)\s*:\s+([-\d.eE+]+)",
}


def threads() -> str:
    return str(os.cpu_count() or 2)


def parse(output: str) -> dict:
    """The figures of one --kl-divergence run; same-top-p as a share (llama.cpp prints percent)."""
    figures = {}
    for name, pattern in PATTERNS.items():
        m = re.search(pattern, output, re.M)
        if m:
            value = float(m.group(1))
            figures[name] = value / 100.0 if name == "top1_agreement" else value
    return figures


def compare(log, model: str, base: str, p: dict, label: str) -> dict:
    cmd = [tool("llama-perplexity"), "-m", model, "--kl-divergence-base", base,
           "--kl-divergence", "-c", str(p["ctx"]), "--chunks", str(p["chunks"]), "-t", threads()]
    return parse(log.run(cmd, f"compare {label} with the reference on {p['file'].split('/')[-1]}"))


def run(step, out, inputs, log, ctx):
    p = step.params
    if step.kind == "kld-base":
        text = project_file(p["file"])
        cmd = [tool("llama-perplexity"), "-m", inputs["model"].output(), "-f", text.name,
               "--kl-divergence-base", out.path("base.kld"), "-c", str(p["ctx"]), "--chunks", str(p["chunks"]),
               "-t", threads()]
        log.run(cmd, f"record reference logits on {text.name}", cwd=text.parent)
        return
    figures = compare(log, inputs["model"].output(), inputs["base"].file("base.kld"), p, "the static Q8_0")
    log(f"the source's own Q8_0: {json.dumps(figures, sort_keys=True)}")
    out.path("q8.json").write_text(json.dumps({"label": "Q8_0", "heldout": p["file"], "figures": figures},
                                              indent=2, sort_keys=True) + "\n")
