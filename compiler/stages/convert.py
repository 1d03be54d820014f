"""convert / mmproj: the vendored convert_hf_to_gguf.py turns the checkpoint into the reference text
GGUF (bf16 or f16) or, with --mmproj, the vision projector GGUF (f16)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .. import ggufcheck, preservation
from ..errors import ForgeError
from ..runlog import python
from ..toolchain import VENDOR_DIR, converter
from .source import checkpoint_dir


def run(step, out, inputs, log, ctx):
    script = converter()
    if not script.is_file():
        raise ForgeError("the converter is missing: vendor/llama.cpp is not unpacked", where=str(script),
                         hint="run `python3 scripts/bootstrap.py`")
    src = checkpoint_dir(inputs["source"])
    config = json.loads((src / "config.json").read_text())
    outtype = step.params["outtype"]
    text_config = config.get("text_config", config)
    if step.kind == "mtp-draft" and not text_config.get("mtp_num_hidden_layers"):
        raise ForgeError("convert.mtp=draft, but the checkpoint has no multi-token-prediction head",
                         where=str(src / "config.json"), found="no text_config.mtp_num_hidden_layers",
                         hint="build it with convert.mtp=drop")
    if step.kind == "mmproj" and "vision_config" not in config:
        raise ForgeError("the checkpoint has no vision_config: nothing to build a projector from",
                         where=str(src / "config.json"), hint="drop the alloy's modality stage (text only)")
    # The converter falls back on the checkpoint folder's name for general.basename/finetune/size
    # label. Ours is a content key (or a Hub snapshot's commit): a hex string that can parse as a
    # size label ("6b78...") and would put the key into the bytes. Convert through a link named after
    # the model instead, as a plain `git clone` of the repo would be.
    named = Path(tempfile.mkdtemp(prefix="forge-convert-"))
    link = named / step.params["model_name"]
    os.symlink(src.resolve(), link)
    try:
        _convert(step, out, log, script, link, config, outtype)
    finally:
        link.unlink()
        named.rmdir()


def _convert(step, out, log, script, src, config, outtype):
    cmd = [python(), script, src, "--outtype", outtype, "--model-name", step.params["model_name"]]
    if step.kind == "mmproj":
        name = f"mmproj-{outtype.upper()}.gguf"
        cmd += ["--mmproj"]
        what = f"convert the vision projector to {outtype.upper()}"
    elif step.kind == "mtp-draft":
        name = f"mtp-{outtype.upper()}.gguf"
        cmd += ["--mtp"]  # the head alone, as a speculative-draft GGUF (FACTS.md)
        what = f"convert the multi-token-prediction head to a {outtype.upper()} draft"
    else:
        name = f"model-{outtype.upper()}.gguf"
        what = f"convert the text model to {outtype.upper()}"
        # The text GGUF never carries the MTP head, whatever conf's convert.mtp says: the pinned
        # converter would keep it in by default when the config has one (FACTS.md), and llama.cpp
        # users report crashes with vision plus MTP drafting. convert.mtp=draft adds the head as a
        # file of its own (the mtp-draft step); without a head in the config the flag changes nothing.
        cmd += ["--no-mtp"]
    cmd += ["--outfile", out.path(name)]
    # The converter prefers the gguf-py beside it: the same pinned source as everything else.
    log.run(cmd, what, env={"PYTHONUNBUFFERED": "1"}, cwd=VENDOR_DIR)
    summary = ggufcheck.check(out.path(name), what=f"converted {step.kind} GGUF")
    log(f"{name}: {summary['tensors']} tensors, {summary['size'] / 2**20:.1f} MiB")
    if step.kind == "mmproj":
        # Every tower and merger tensor of the checkpoint must be in the projector, with its shape,
        # before any variant is quantized (the quantize steps wait for this one).
        tower = preservation.tower(src)
        preservation.check(tower, preservation.projector(out.path(name)), where=f"{step.task}: {name}")
        log(f"projector carries the checkpoint's {tower['tensors']} tower tensors")
