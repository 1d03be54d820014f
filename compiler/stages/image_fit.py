"""image-fit: the projector at its tier's largest image -- how many tokens the image becomes, the
encoder's seconds on this machine, and the measuring process's peak -- checked against one
persona's context. It depends on the projector and the image size only, so the forge measures it
once per projector and tier; every variant's envelope reads it (stages/envelope.py)."""
from __future__ import annotations

import json

from ..errors import ForgeError
from ..runlog import run_json


def run(step, out, inputs, log, ctx):
    px, n_ctx = step.params["image_px"], step.params["n_ctx_per_persona"]
    model, mmproj = inputs["model"].output(), inputs["mmproj"].output()
    log(f"encoding one {px}px image through {mmproj.name}")
    report = run_json(["compiler.measure", "image", model, mmproj, px], log,
                      f"encoding a {px}px image through the projector failed", str(mmproj))
    report["n_ctx_per_persona"] = n_ctx
    log(f"one {px}px image: {report['image_tokens']} tokens, encoded in {report['encode_s']:.2f} s "
        f"(peak RSS {report['peak_rss_mib']:.1f} MiB)")
    if report["image_tokens"] >= n_ctx:
        raise ForgeError(f"the tier's largest image ({px}px) takes {report['image_tokens']} tokens, more than "
                         f"one persona's context of {n_ctx}", where=step.task, found=report,
                         hint="tier.max_image_px or tier.n_ctx in conf/tier/")
    out.path("image-fit.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
