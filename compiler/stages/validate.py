"""validate: the source checkpoint checked before anything is converted -- config.json names an
architecture the forge converts, with a vision tower whose layers the pinned converter and mtmd
carry; the tokenizer and a chat template whose turns are the product's ChatML are there; every
tower block holds the tensors its config promises; every floating tensor is finite and within what
the F16 reference and the k-quants' fp16 scales can hold (compiler/weights.py). Everything that needs only the source, so a
refusal costs seconds, not a conversion. Reads one tensor at a time; writes a small report."""
from __future__ import annotations

import json

from .. import weights
from ..errors import ForgeError
from .source import checkpoint_dir


def run(step, out, inputs, log, ctx):
    try:
        _check(step, out, inputs, log)
    except ForgeError as e:  # name the alloys whose source this is, beside the file and tensor
        e.where = f"alloy {ctx['alloys']}: {e.where}" if e.where else f"alloy {ctx['alloys']}"
        raise ForgeError(e.what, where=e.where, found=e.found, allowed=e.allowed, hint=e.hint) from None


def _check(step, out, inputs, log):
    folder = checkpoint_dir(inputs["source"])
    config = weights.check_config(folder)
    log(f"config.json: {config}")
    promised = step.params["promised"]
    weights.check_promised(folder, promised, step.params["base_model"])
    log(f"config.json as the alloy promises: {', '.join(f'{k}={v}' for k, v in promised.items())}")
    tokenizer = weights.check_tokenizer(folder)
    # Its turns must be the product's ChatML (the registry's own check, here before any conversion).
    from ..registry import generation_prompt_extra

    extra = generation_prompt_extra(tokenizer["from"], tokenizer["template"])
    log(f"chat template from {tokenizer['from']}: ChatML turns; adds {extra!r} after the assistant's start")
    blocks = weights.check_blocks(folder)
    log(f"blocks complete: {blocks}")
    summary = weights.scan(folder, max_abs=step.params["max_abs"], log=log)
    log(f"{summary['tensors']} tensors, {summary['bytes'] / 1e9:.2f} GB: finite, |x| <= {step.params['max_abs']:g} "
        f"({summary['seconds']:.1f} s)")
    out.path("validate.json").write_text(json.dumps({"config": config, "blocks": blocks, "weights": summary,
                                                     "chat_template": {"from": tokenizer["from"]}},
                                                    indent=2, sort_keys=True) + "\n")
