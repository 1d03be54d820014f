"""quantize / mmproj-quantize: llama-quantize from the pinned toolchain, with the quant conf's
per-tensor overrides. Inputs are checked structurally first, so a damaged GGUF is refused by name
instead of crashing the tool halfway."""
from __future__ import annotations

import os

from .. import ggufcheck
from ..toolchain import tool


def llama_type(step) -> str:
    return step.params.get("llama_type") or step.params["type"].upper()


def command(step, source, output) -> list:
    p = step.params
    cmd = [tool("llama-quantize")]
    if p.get("output_type"):
        cmd += ["--output-tensor-type", p["output_type"]]
    if p.get("token_embedding_type"):
        cmd += ["--token-embedding-type", p["token_embedding_type"]]
    for rule in p.get("tensor_types", []):
        cmd += ["--tensor-type", rule]
    return cmd + [source, output, llama_type(step), str(os.cpu_count() or 2)]


def run(step, out, inputs, log, ctx):
    role = "mmproj" if step.kind == "mmproj-quantize" else "model"
    entry = inputs[role]
    source = entry.output()
    ggufcheck.check(source, what=f"{role} GGUF to quantize")
    name = f"{role}-{llama_type(step)}.gguf"
    cmd = command(step, source, out.path(name))
    cwd = None
    if "imatrix" in inputs:
        # quantize writes the imatrix path string into the GGUF (quantize.imatrix.file): run in the
        # imatrix's folder and pass its bare name so the bytes do not depend on the store's location.
        cmd[1:1] = ["--imatrix", "imatrix.gguf"]
        cwd = inputs["imatrix"].dir
    log.run(cmd, f"quantize to {llama_type(step)}", cwd=cwd)
    summary = ggufcheck.check(out.path(name), what="quantized GGUF")
    log(f"{name}: {summary['size'] / 2**20:.1f} MiB")
