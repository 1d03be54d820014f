"""What the three conversions share: the vendored convert_hf_to_gguf.py run on the checkpoint, under
the model's own name. Each kind's own code is a module of its own (convert, mmproj, mtp_draft), so
that a change to how a projector or a draft is made re-keys that conversion only; a change here
re-keys all three, as it changes all three."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .. import ggufcheck
from ..errors import ForgeError
from ..runlog import python
from ..toolchain import VENDOR_DIR, converter
from .source import checkpoint_dir


def checkpoint(inputs) -> tuple[Path, dict]:
    """The source checkpoint's folder and its config.json."""
    src = checkpoint_dir(inputs["source"])
    return src, json.loads((src / "config.json").read_text())


def run_converter(step, out, log, src: Path, flags: list[str], name: str, what: str) -> dict:
    """convert_hf_to_gguf.py SRC --outtype T [flags] into out/<name>; returns ggufcheck's summary."""
    script = converter()
    if not script.is_file():
        raise ForgeError("the converter is missing: vendor/llama.cpp is not unpacked", where=str(script),
                         hint="run `python3 scripts/bootstrap.py`")
    # The converter falls back on the checkpoint folder's name for general.basename/finetune/size
    # label. Ours is a content key (or a Hub snapshot's commit): a hex string that can parse as a
    # size label ("6b78...") and would put the key into the bytes. Convert through a link named after
    # the model instead, as a plain `git clone` of the repo would be.
    named = Path(tempfile.mkdtemp(prefix="forge-convert-"))
    link = named / step.params["model_name"]
    os.symlink(src.resolve(), link)
    try:
        cmd = [python(), script, link, "--outtype", step.params["outtype"], "--model-name", step.params["model_name"],
               *flags, "--outfile", out.path(name)]
        # The converter prefers the gguf-py beside it: the same pinned source as everything else.
        log.run(cmd, what, env={"PYTHONUNBUFFERED": "1"}, cwd=VENDOR_DIR)
    finally:
        link.unlink()
        named.rmdir()
    summary = ggufcheck.check(out.path(name), what=f"converted {step.kind} GGUF")
    log(f"{name}: {summary['tensors']} tensors, {summary['size'] / 2**20:.1f} MiB")
    return summary
