"""What we ship, read as the Continuum product reads it (tests/continuum_product.py): the registry
parses under its types, every alias is looked up (none is taken for a Hub repo), every entry gets its
ChatML prompt, and that prompt -- plus what the entry says to add -- is the GGUF's own template
rendered by the Hugging Face renderer for the same conversation."""
from __future__ import annotations

import hashlib
import json

import pytest

from conftest import ROOT, assert_ok
from continuum_product import builder, chatml_prompt, parse_registry, resolve

from compiler.ggufcheck import read_layout

# Conversations as the product sends them: each persona has its system prompt.
CONVERSATIONS = [
    [{"role": "system", "content": "You are Ada."}, {"role": "user", "content": "What colour is the circle?"}],
    [{"role": "system", "content": "You are Bo, one of four personas on a call."},
     {"role": "user", "content": "How many squares?"}, {"role": "assistant", "content": "Three."},
     {"role": "user", "content": "And circles?"}],
]


def _entries(path):
    text = path.read_text()
    return text, json.loads(text)


def test_the_committed_registry_reads_as_the_product_reads_it():
    text, data = _entries(ROOT / "model_registry.json")
    registry = parse_registry(text)  # a serde failure would leave the product with no models at all
    assert registry["models"], "the committed registry lists nothing"
    for alias, seen in registry["models"].items():
        assert "/" not in alias and resolve(alias, registry) == ("alias", seen), alias
        assert builder(seen["chat_template"]) == "chatml", (alias, seen["chat_template"])
        template = registry["chat_templates"][seen["chat_template"]]
        assert template == {"system": "<|im_start|>system\n{system}<|im_end|>\n",
                            "user": "<|im_start|>user\n{content}<|im_end|>\n",
                            "assistant": "<|im_start|>assistant\n", "eos": "<|im_end|>"}
        ours = data["models"][alias]
        # min_memory_gb is the model's own need: at least its files, and below the whole-device
        # figure (sensory stack and OS) that our device hints carry.
        files = sum(f["size"] for f in ours["files"])
        assert files / 1e9 <= seen["min_memory_gb"] and ours["envelope"]["total_bytes"] / 1e9 <= seen["min_memory_gb"]
        device = ours["device_hints"]["min_unified_memory_gb"] or ours["device_hints"]["min_vram_gb"]
        assert seen["min_memory_gb"] < device, alias


@pytest.mark.build
def test_the_products_prompt_plus_the_stated_extra_is_the_ggufs_own_template(demo_workspace):
    from transformers.utils.chat_template_utils import render_jinja_template

    ws = demo_workspace
    assert_ok(ws.doit("alloy=demo"))
    text, data = _entries(ws.registry)
    registry = parse_registry(text)
    for alias, ours in data["models"].items():
        name = next(f["filename"] for f in ours["files"] if f["role"] == "text")
        jinja = read_layout(ws.variant(alias) / name)["meta"]["tokenizer.chat_template"]
        assert hashlib.sha256(jinja.encode()).hexdigest() == ours["gguf_chat_template"]["sha256"]
        assert data["gguf_chat_templates"][ours["gguf_chat_template"]["name"]] == jinja
        extra = ours["gguf_chat_template"]["generation_prompt_extra"]
        # Qwen3.5's generation prompt opens an empty think block (thinking off); the README says the
        # product must add it.
        assert extra == "<think>\n\n</think>\n\n"
        template = registry["chat_templates"][registry["models"][alias]["chat_template"]]
        for convo in CONVERSATIONS:
            (want,), _ = render_jinja_template([convo], chat_template=jinja, add_generation_prompt=True)
            assert chatml_prompt(convo, template) + extra == want, convo
            (closed,), _ = render_jinja_template([convo + [{"role": "assistant", "content": "Two."}]],
                                                 chat_template=jinja)
            # A finished assistant turn ends with the object's eos, as the template ends it.
            assert closed.endswith("Two." + template["eos"] + "\n")


def test_a_gguf_template_the_product_would_prompt_wrongly_is_refused_naming_it():
    from compiler.errors import ForgeError
    from compiler.registry import alias_for, generation_prompt_extra

    llama3 = ("{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>"
              "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    with pytest.raises(ForgeError, match="chat template llama-x: its turns are not ChatML as the product builds them"):
        generation_prompt_extra("llama-x", llama3)
    plain = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert generation_prompt_extra("plain", plain) == ""
    # Rendered as transformers renders templates: with the loop controls real Qwen templates use.
    controls = ("{% for m in messages %}{% if m.role == 'tool' %}{% break %}{% endif %}<|im_start|>{{ m.role }}\n"
                "{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert generation_prompt_extra("controls", controls) == ""
    # Every variant id makes an alias the product looks up.
    for vid in ("demo", "demo@q8_0", "demo@q8_0,tier.n_seq_max=2", "with-mtp@convert.mtp=draft", "Qwen3.5-4B-Vision"):
        alias = alias_for(vid)
        assert resolve(alias, {"models": {alias: {}}}) == ("alias", {}), alias
