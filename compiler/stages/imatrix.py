"""imatrix: llama-imatrix over the alloy's calibration corpus, on the reference GGUF. One imatrix
serves every quant of that source and corpus.

llama-imatrix records the corpus name as given (quantize.imatrix.dataset ends up in every GGUF
quantized with it), so it runs in the corpus's folder with the bare file name: the bytes then do
not depend on where the checkout lives."""
from __future__ import annotations

import os

from ..paths import project_file
from ..toolchain import tool


def run(step, out, inputs, log, ctx):
    p = step.params
    corpus = project_file(step.runtime["corpus"])  # where this alloy names it (not in the key)
    model = inputs["model"].output()
    cmd = [tool("llama-imatrix"), "-m", model, "-f", corpus.name, "-o", out.path("imatrix.gguf"),
           "-c", str(p["ctx"]), "--chunks", str(p["chunks"]), "-t", str(os.cpu_count() or 2), "--no-ppl"]
    if p["process_output"]:
        cmd.append("--process-output")
    log.run(cmd, f"compute the importance matrix over {p['chunks']} chunks of {p['ctx']} tokens", cwd=corpus.parent)
    log(f"imatrix.gguf: {out.path('imatrix.gguf').stat().st_size / 2**10:.0f} KiB")
