"""smoke: text, vision and n_seq_max personas through llama-cpp-python at the tier's settings,
plus vision preservation (projector against the source's visual tower). A variant whose smoke
fails gets no receipt, and nothing after it runs."""
from __future__ import annotations

import json

from .. import preservation
from ..errors import ForgeError
from ..runlog import run_json
from .source import checkpoint_dir


def run(step, out, inputs, log, ctx):
    p = step.params
    text, mmproj = inputs["text"].output(), inputs["mmproj"].output()
    tower = preservation.tower(checkpoint_dir(inputs["source"]))
    proj = preservation.projector(mmproj)
    preservation.check(tower, proj, where=f"{step.task}: {mmproj.name}")
    log(f"vision preserved: {tower['tensors']} tower tensors ({tower['bytes'] / 2**20:.1f} MiB) -> "
        f"{proj['tensors']} projector tensors ({proj['bytes'] / 2**20:.1f} MiB)")
    sections = preservation.mrope_sections(text, checkpoint_dir(inputs["source"]), where=f"{step.task}: {text.name}")
    if sections:
        log(f"M-RoPE sections of the text model as the checkpoint's: {sections}")
    params = out.path("smoke-params.json")
    params.write_text(json.dumps(p["run"]))
    try:
        reference = [inputs["reference_mmproj"].output()] if "reference_mmproj" in inputs else []
        report = run_json(["compiler.smoke_run", text, mmproj, params, *reference], log, "the smoke run crashed",
                          str(text))
    finally:
        params.unlink()
    # The report keeps the counts and hashes; the per-tensor tables were for the check above.
    report["preservation"] = {"tower": {k: v for k, v in tower.items() if k != "expected"},
                              "projector": {k: v for k, v in proj.items() if k not in ("names", "shapes")}}
    problems = judge(report, p)
    t, v, pers, place = report["text"], report["vision"], report["personas"], report["placement"]
    log(f"text: {'deterministic' if t['deterministic'] else 'NOT deterministic'}, logits "
        f"{'finite' if t['logits_finite'] else 'NOT finite'}")
    log(f"vision: {len(v['items'])} images answered ({v['suite']}), score {v['score']:.2f} "
        f"({'gated at ' + str(p['min_vision_score']) if v['gated'] else 'random weights: reported, not gated'})")
    if v.get("reference"):
        r = v["reference"]
        log(f"projector preservation: {r['agreement']:.2f} of the answers as the F32 projector's {r['projector']} "
            f"(its score {r['score']:.2f}; {'gated at ' + str(r['min_agreement']) if r['gated'] else 'reported'})")
    log(f"personas: {pers['n_seq_max']} sequences (kv_unified {pers['kv_unified']}): isolated {pers['isolated']}, "
        f"equal alone {pers['equal_alone']} ({'gated' if pers['alone_gated'] else 'reported, not gated'}), "
        f"largest logit difference from alone {pers['max_logit_diff']}"
        + (f", parted from alone on a tie at steps {pers['parted_on_a_tie']}"
           if any(x is not None for x in pers.get("parted_on_a_tie", [])) else ""))
    log("timings: " + ", ".join(f"{k} {val}" for k, val in report["timings"].items()))
    log(f"placement: backend {place['backend']}, layers on GPU {place['layers_offloaded']}, projector on "
        f"{place['projector_device']}, host weights {place['host_model_mib']} MiB (input embedding "
        f"{place['token_embd_mib']} MiB)")
    out.path("smoke.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    if problems:
        raise ForgeError("smoke failed: " + "; ".join(problems), where=step.task,
                         hint=f"the report is in the step's log")


def judge(report: dict, p: dict) -> list[str]:
    """What fails the variant in a smoke report, in words (empty: it passed); marks in the report
    what was gated. Pure: tests judge reports of broken projectors with it."""
    # A source that cannot see (random weights) runs the suite for its mechanics only.
    gated = p["sees"]
    report["vision"]["gated"] = gated
    report["vision"]["min_score"] = p["min_vision_score"]
    t, v, pers = report["text"], report["vision"], report["personas"]
    # Isolation is exact on any weights; equality with the empty-context decode is gated on real
    # checkpoints only (random weights have near-tied logits that layout rounding can flip).
    alone_gated = gated and p.get("gate_alone", True)
    pers["alone_gated"] = alone_gated
    pers["passed"] = pers["error"] is None and all(pers["isolated"]) and (not alone_gated or all(pers["equal_alone"]))
    problems = []
    place = report["placement"]
    # On a GPU backend the product forbids any CPU fallback: check it, never assume it.
    # (llama.cpp makes a backend per GPU device even with no layer offloaded: gate on what the run
    # asked for, not on which devices exist.)
    if report.get("on_gpu") or p["run"].get("gpu") == "required":
        from ..placement import problems as offload_problems

        problems += [f"not fully on the GPU: {why}" for why in offload_problems(place)]
    if not t["deterministic"]:
        problems.append("the same greedy prompt gave different tokens on a second run")
    if not t["logits_finite"]:
        problems.append("non-finite logits")
    if not pers["passed"]:
        # After a decode error nothing was compared: say so rather than blame the sequences.
        bleed = [i for i, ok in enumerate(pers["isolated"]) if not ok] if pers.get("error") is None else []
        apart = [i for i, ok in enumerate(pers["equal_alone"]) if not ok] if alone_gated and pers.get("error") is None else []
        problems.append(("personas failed: "
                         + (f"sequences {bleed} change when their neighbours' prompts change (they see each "
                            f"other); " if bleed else "")
                         + (f"sequences {apart} decoded together differ from the same prompt alone; " if apart else "")
                         + (f"decode error: {pers['error']}" if pers.get("error") else "")).rstrip("; "))
    if not v["items"] or any(not a["answer"] and a["answer"] != "" for a in v["items"]):
        problems.append("the vision suite did not run")
    if gated and v["score"] < p["min_vision_score"]:
        right = sum(a["correct"] for a in v["items"])
        problems.append(f"vision score {v['score']:.2f} below {p['min_vision_score']} ({right} of {len(v['items'])} "
                        f"answered right, {v['suite']} suite)")
    ref = v.get("reference")
    if ref is not None:
        ref["min_agreement"] = p["min_projector_agreement"]
        ref["gated"] = gated
        if gated and ref["agreement"] < p["min_projector_agreement"]:
            problems.append(f"the shipped projector answers {ref['agreement']:.2f} of the suite as the F32 reference "
                            f"projector does, below {p['min_projector_agreement']} (differ: {', '.join(ref['differ'][:8])}"
                            f"{' ...' if len(ref['differ']) > 8 else ''})")
    report["passed"] = not problems
    return problems
