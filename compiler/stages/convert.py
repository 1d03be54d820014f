"""convert: the checkpoint's text model to the reference GGUF (bf16 or f16), through the vendored
convert_hf_to_gguf.py (stages/converter.py). The projector and the MTP draft are steps of their own
(stages/mmproj.py, stages/mtp_draft.py)."""
from __future__ import annotations

from .converter import checkpoint, run_converter


def run(step, out, inputs, log, ctx):
    src, _ = checkpoint(inputs)
    outtype = step.params["outtype"].upper()
    # The text GGUF never carries the MTP head, whatever conf's convert.mtp says: the pinned
    # converter would keep it in by default when the config has one (FACTS.md), and llama.cpp
    # users report crashes with vision plus MTP drafting. convert.mtp=draft adds the head as a
    # file of its own (the mtp-draft step); without a head in the config the flag changes nothing.
    run_converter(step, out, log, src, ["--no-mtp"], f"model-{outtype}.gguf", f"convert the text model to {outtype}")
