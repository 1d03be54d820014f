"""mmproj: the checkpoint's vision tower and merger to the projector GGUF (f16 shipped, f32 the
smoke's reference), through the vendored converter's --mmproj (stages/converter.py), checked to
carry every tower tensor of the checkpoint before any variant is quantized."""
from __future__ import annotations

from .. import preservation
from ..errors import ForgeError
from .converter import checkpoint, run_converter


def run(step, out, inputs, log, ctx):
    src, config = checkpoint(inputs)
    if "vision_config" not in config:
        raise ForgeError("the checkpoint has no vision_config: nothing to build a projector from",
                         where=str(src / "config.json"), hint="drop the alloy's modality stage (text only)")
    outtype = step.params["outtype"].upper()
    name = f"mmproj-{outtype}.gguf"
    run_converter(step, out, log, src, ["--mmproj"], name, f"convert the vision projector to {outtype}")
    # Every tower and merger tensor of the checkpoint must be in the projector, with its shape,
    # before any variant is quantized (the quantize steps wait for this one).
    tower = preservation.tower(src)
    preservation.check(tower, preservation.projector(out.path(name)), where=f"{step.task}: {name}")
    log(f"projector carries the checkpoint's {tower['tensors']} tower tensors")
