"""mtp-draft: the checkpoint's multi-token-prediction head alone, as a speculative-draft GGUF
(the vendored converter's --mtp, FACTS.md; stages/converter.py). Only with convert.mtp=draft."""
from __future__ import annotations

from ..errors import ForgeError
from .converter import checkpoint, run_converter


def run(step, out, inputs, log, ctx):
    src, config = checkpoint(inputs)
    if not config.get("text_config", config).get("mtp_num_hidden_layers"):
        raise ForgeError("convert.mtp=draft, but the checkpoint has no multi-token-prediction head",
                         where=str(src / "config.json"), found="no text_config.mtp_num_hidden_layers",
                         hint="build it with convert.mtp=drop")
    outtype = step.params["outtype"].upper()
    run_converter(step, out, log, src, ["--mtp"], f"mtp-{outtype}.gguf",
                  f"convert the multi-token-prediction head to a {outtype} draft")
