"""envelope: estimate the variant's memory at its tier's settings term by term (GGUF headers and
tensor tables only), check the tier's rules beside its sensory stack, then measure what llama.cpp
allocates on this machine's CPU backend and put estimate and measurement side by side. The tier's
largest image through the projector is measured once per projector and tier (stages/image_fit.py)
and read here.
A broken rule fails the variant, naming the rule, the figure and the shortfall."""
from __future__ import annotations

import json

from .. import envelope as env
from ..alloy import validate
from ..errors import ForgeError
from ..runlog import run_json
from ..ggufcheck import read_layout


def run(step, out, inputs, log, ctx):
    cfg = step.params["config"]
    text_path = inputs["text"].output()
    mmproj_path = inputs["mmproj"].output() if "mmproj" in inputs else None
    text = env.text_shape(read_layout(text_path))
    vision = env.vision_shape(read_layout(mmproj_path)) if mmproj_path else None
    rt = env.runtime(cfg)
    gpu = bool(cfg["backend"]["gpu"])
    terms = env.estimate(text, vision, rt, gpu)
    files = text_path.stat().st_size + (mmproj_path.stat().st_size if mmproj_path else 0)
    if "draft" in inputs:
        draft = inputs["draft"].output().stat().st_size
        terms.append(env.draft_term(draft, gpu))
        files += draft
    verdict = env.check(terms, cfg, files)
    title = (f"memory envelope of {ctx['variant'].id} on tier {cfg['tier']['name']} ({cfg['backend']['name']}): "
             f"n_ctx {cfg['tier']['n_ctx']} x {rt['n_seq_max']} personas = {rt['n_ctx']}, "
             f"image {rt['max_image_px']}px")
    report_text = env.table(terms, verdict, title)

    log("measuring llama.cpp's own allocations on the CPU backend")
    measured = run_json(["compiler.measure", text_path, mmproj_path or "-", rt["n_ctx"], rt["n_seq_max"],
                         rt["n_batch"], 0], log, "measuring the variant in llama.cpp failed", str(text_path))
    if "image" in inputs:
        measured["image"] = json.loads(inputs["image"].output().read_text())
    rows = env.side_by_side(text, vision, rt, measured)
    lines = ["  estimate vs llama.cpp (CPU backend, this machine):",
             f"    {'term':<40} {'estimate':>12} {'measured':>12} {'error':>8}"]
    for r in rows:
        meas = "-" if r["measured_bytes"] is None else f"{r['measured_bytes'] / env.MiB:9.2f} MiB"
        err = "-" if r["error_pct"] is None else f"{r['error_pct']:+.2f}%"
        lines.append(f"    {r['term']:<40} {r['estimate_bytes'] / env.MiB:9.2f} MiB {meas:>12} {err:>8}")
    image = measured.get("image")
    if image:
        lines.append(f"    one {image['image_px']}px image: {image['image_tokens']} tokens (one persona's context "
                     f"{image['n_ctx_per_persona']}), encoded in {image['encode_s']:.2f} s (measured once per "
                     f"projector and tier)")
    lines.append(f"    peak RSS of the measuring process: {measured['peak_rss_mib']:.1f} MiB")
    report_text += "\n" + "\n".join(lines)
    for line in report_text.splitlines():
        log(line)
    report = {"variant": ctx["variant"].id, "tier": cfg["tier"]["name"], "backend": cfg["backend"]["name"],
              "runtime": rt, "terms": terms, "verdict": verdict, "measured": measured, "comparison": rows}
    validate(report, "envelope.schema.json", f"{step.task} report")
    if not verdict["passed"]:
        broken = [r for r in verdict["rules"] if not r["passed"]]
        raise ForgeError("the variant does not fit its tier: " + "; ".join(
            f"{r['rule']} ({r['figure'] / env.GiB:.3f} GiB against {r['limit'] / env.GiB:.3f} GiB, short by "
            f"{abs(r['margin']) / env.GiB:.3f} GiB)" for r in broken), where=step.task,
            found="\n" + report_text, hint="tier budgets in conf/tier/, sensory figures in conf/sensory/")
    out.path("envelope.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    out.path("envelope.txt").write_text(report_text + "\n")
