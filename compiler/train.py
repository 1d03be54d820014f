"""Train the demo fixture: a tiny Qwen3.5 vision checkpoint that can see, on the CPU, in about
two and a half minutes on 2 cores, the same bytes on every run.

    python -m compiler.train OUT_DIR --shape tiny --seed 1 --steps 300

writes the files compiler.synthetic.generate writes (safetensors, config.json, tokenizer, chat
template, preprocessor_config.json), trained on compiler/fixture_data.py's pictures and text.

How it fits in minutes:
- The 248320-token vocabulary trains as the ~110 ids the data uses: the training model's vocabulary
  is that subset; the saved (tied) embedding holds the trained rows at their ids and zeros
  elsewhere. A zero row gives a logit of exactly 0, so one extra logit of log(248320 - subset) in
  the loss stands for every other token and the loss is the exact full-vocabulary cross-entropy.
- pixel_values are built here in the HF patch layout from 96 px pictures (a multiple of 32, which
  llama.cpp's preprocessing for this projector takes unresized), normalised as mtmd does
  ((x/255 - 0.5)/0.5) and repeated over the two temporal frames; M-RoPE positions of the image
  tokens as HF's get_rope_index and mtmd compute them (t = start, h = start + row, w = start + col;
  the text after the picture continues at start + 3).
- Loss on the answer token and <|im_end|> of each question, on every token of the text corpus, plus
  an auxiliary loss that reads each picture's mean image embedding through the tied output head
  into its answer: it trains the tower directly, before the language model has learnt to look.
- transformers' CPU path for the linear-attention layers spends most of a step in a triangular
  solve; compiler/gated_delta.py replaces it with an exact inverse built from matrix products.

Same bytes: a fixed seed, 2 threads whatever the machine, torch's deterministic algorithms, and
the CPU kernels of the machine's class pinned (compiler/kernels.py: a machine with AVX-512 runs the
AVX2 code paths any x86-64-v3 machine runs; one without AVX2, or an arm64 one, torch's default
kernels). They must be set before torch is imported, so the forge always runs this module as its
own process (stages/source.py); train() refuses to run with kernels other than the ones asked for.
The bytes hold within a class; the lock records the class its hashes are for.
"""
from __future__ import annotations

import os
import sys

from .kernels import THREADS, TORCH_CAPABILITY, pinned_env

if __name__ == "__main__":
    _k = sys.argv[sys.argv.index("--kernels") + 1] if "--kernels" in sys.argv else None
    os.environ.update(pinned_env(_k))

import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from . import fixture_data as data  # noqa: E402
from . import gated_delta  # noqa: E402
from .synthetic import PREPROCESSOR, VOCAB_SIZE, build_config, write_tokenizer  # noqa: E402

# batch: sequences through the language model per step (text_per_batch of them text-only);
# aux_images: extra pictures per step through the vision tower only, for the auxiliary loss.
HYPER = {"steps": 300, "batch": 32, "lr": 5e-3, "warmup": 30, "text_per_batch": 2, "weight_decay": 0.0,
         "aux": 1.0, "aux_images": 32}

PATCH, MERGE, TEMPORAL = 16, 2, 2


def chat(question: str, image: bool) -> str:
    """The smoke's prompt (compiler/smoke_run.chat), with the picture where mtmd puts it."""
    body = ("<|vision_start|><|image_pad|><|vision_end|>" if image else "") + question
    return f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def pixel_values(img) -> torch.Tensor:
    """HF Qwen2-VL patch layout for one RGB image whose sides are multiples of 32 (no resize):
    (grid_h*grid_w, 3*2*16*16), mtmd's normalisation, the frame duplicated over the temporal axis."""
    x = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    x = (x - 0.5) / 0.5
    x = torch.from_numpy(x).permute(2, 0, 1)  # C, H, W
    c, h, w = x.shape
    gh, gw = h // PATCH, w // PATCH
    x = x.unsqueeze(0).expand(TEMPORAL, c, h, w)
    x = x.reshape(1, TEMPORAL, c, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gh * gw, c * TEMPORAL * PATCH * PATCH).contiguous()


class Vocab:
    """Full-vocabulary ids <-> the training sub-vocabulary."""

    def __init__(self, tok, texts: list[str]):
        ids = set()
        for t in texts:
            ids.update(tok.encode(t, add_special_tokens=False))
        self.full = sorted(ids)
        self.local = {t: i for i, t in enumerate(self.full)}

    def __len__(self):
        return len(self.full)


def encode_example(tok, vocab: Vocab, item: dict | None, text: str | None, chat_pair=None):
    """One training sequence: a visual question (item), a plain text line (text) or a text-only chat
    turn (chat_pair). Returns (sub-vocabulary ids, loss mask, (t, h, w) position per token, number
    of image tokens); the single <|image_pad|> is expanded to the 3x3 merged image tokens."""
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    if item is not None:
        prompt = tok.encode(chat(item["question"], True), add_special_tokens=False)
        answer = tok.encode(item["answer"] + "<|im_end|>", add_special_tokens=False)
    elif chat_pair is not None:
        prompt = tok.encode(chat(chat_pair[0], False), add_special_tokens=False)
        answer = tok.encode(chat_pair[1] + "<|im_end|>", add_special_tokens=False)
    else:
        prompt, answer = [], tok.encode(text, add_special_tokens=False)
    ids, pos = [], []
    n_img = 0
    cur = 0
    for t in prompt:
        if t == image_pad:  # expand to the 3x3 merged grid
            g = data.PX // (PATCH * MERGE)
            for r in range(g):
                for c in range(g):
                    ids.append(t)
                    pos.append((cur, cur + r, cur + c))
            cur += g
            n_img += g * g
        else:
            ids.append(t)
            pos.append((cur, cur, cur))
            cur += 1
    n_prompt = len(ids)
    for t in answer:
        ids.append(t)
        pos.append((cur, cur, cur))
        cur += 1
    # target at i is ids[i+1]; the loss covers the answer tokens (all tokens for plain text)
    mask = [0.0] * len(ids)
    first = max(n_prompt - 1, 0) if prompt else 0
    for i in range(first, len(ids) - 1):
        mask[i] = 1.0
    return [vocab.local[t] for t in ids], mask, pos, n_img


def collate(examples, pad_local: int):
    L = max(len(e[0]) for e in examples)
    B = len(examples)
    ids = torch.full((B, L), pad_local, dtype=torch.long)
    mask = torch.zeros(B, L)
    pos = torch.zeros(3, B, L, dtype=torch.long)
    for b, (i, m, p, _) in enumerate(examples):
        n = len(i)
        ids[b, :n] = torch.tensor(i)
        mask[b, :n] = torch.tensor(m)
        pp = torch.tensor(p, dtype=torch.long).T
        pos[:, b, :n] = pp
        if n < L:  # padding continues the positions
            pos[:, b, n:] = pp[:, -1:] + torch.arange(1, L - n + 1)
    return ids, mask, pos


def small_config(shape: dict, n_vocab: int):
    config = build_config(shape)
    config.text_config.vocab_size = n_vocab
    config.text_config.dtype = "float32"
    return config


def forward(model, ids, pos, pix, image_local: int, return_image: bool = False):
    """Logits over the sub-vocabulary, with image embeddings scattered into the image_pad slots
    (and, with return_image, the image embeddings: (n_images, tokens per image, hidden))."""
    inner = model.model
    emb = inner.language_model.embed_tokens(ids)
    if pix is not None:
        n_img = pix.shape[0] // (data.PX // PATCH) ** 2
        g = data.PX // PATCH
        grid = torch.tensor([[1, g, g]] * n_img)
        img = inner.visual(pix, grid_thw=grid).pooler_output
        mask = (ids == image_local).unsqueeze(-1)
        emb = emb.masked_scatter(mask, img.to(emb.dtype))
    out = inner.language_model(inputs_embeds=emb, position_ids=pos)
    logits = model.lm_head(out.last_hidden_state)
    if return_image:
        return logits, img.view(n_img, -1, img.shape[-1])
    return logits


def full_vocab_ce(logits, targets, mask, n_other: int):
    """Exact cross-entropy over the full vocabulary when every token outside the subset has a zero
    embedding row (logit exactly 0): logsumexp over [subset logits, log(n_other)]."""
    other = torch.full(logits.shape[:-1] + (1,), math.log(n_other), dtype=logits.dtype)
    lse = torch.logsumexp(torch.cat([logits, other], -1), -1)
    tgt = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    nll = lse - tgt
    return (nll * mask).sum() / mask.sum()


def build_tokenizer(tmp: Path):
    from transformers import AutoTokenizer

    write_tokenizer(tmp)
    return AutoTokenizer.from_pretrained(str(tmp))


def train(out_dir, shape: dict, seed: int, hyper: dict | None = None, log=print, kernels: str = "avx2") -> list[str]:
    """Train from `seed` with torch's `kernels` (compiler/kernels.py) and write the checkpoint into
    out_dir; returns the files written."""
    from transformers import Qwen3_5ForConditionalGeneration

    capability = torch.backends.cpu.get_cpu_capability()
    if capability != TORCH_CAPABILITY[kernels]:
        raise RuntimeError(f"torch runs its {capability} kernels here: the fixture's bytes need the pinned {kernels} ones "
                           f"(run `python -m compiler.train --kernels {kernels}`, which sets {pinned_env(kernels)})")
    hp = dict(HYPER, **(hyper or {}))
    gated_delta.install()
    t_start = time.monotonic()
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    vocab = Vocab(tok, data.all_texts(chat))
    image_local = vocab.local[tok.convert_tokens_to_ids("<|image_pad|>")]
    pad_local = vocab.local[tok.convert_tokens_to_ids("<|endoftext|>")]
    n_other = VOCAB_SIZE - len(vocab)

    torch.manual_seed(seed)
    model = Qwen3_5ForConditionalGeneration(small_config(shape, len(vocab))).float()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=hp["lr"], betas=(0.9, 0.98), weight_decay=hp["weight_decay"])
    steps, warm = hp["steps"], hp["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = random.Random(seed)
    text_items = [(None, t, None) for t in data.TEXT_CORPUS] + [(None, None, p) for p in data.TEXT_CHAT]
    n_vis = hp["batch"] - hp["text_per_batch"]
    t_loop = time.monotonic()
    for step in range(steps):
        items = [data.training_item(rng) for _ in range(n_vis)]
        exs = [encode_example(tok, vocab, it, None) for it in items]
        for _ in range(hp["text_per_batch"]):
            _, text, pair = text_items[rng.randrange(len(text_items))]
            exs.append(encode_example(tok, vocab, None, text, pair))
        ids, mask, pos = collate(exs, pad_local)
        pix = torch.cat([pixel_values(it["image"]) for it in items])
        logits, img = forward(model, ids, pos, pix, image_local, return_image=True)
        targets = torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), pad_local)], 1)
        loss = full_vocab_ce(logits, targets, mask, n_other)
        if hp["aux"]:
            extra = [data.training_item(rng) for _ in range(hp["aux_images"])]
            if extra:  # more images through the (cheap) vision tower, for the auxiliary loss only
                g = data.PX // PATCH
                pix_x = torch.cat([pixel_values(it["image"]) for it in extra])
                img_x = model.model.visual(pix_x, grid_thw=torch.tensor([[1, g, g]] * len(extra))).pooler_output
                img = torch.cat([img, img_x.view(len(extra), -1, img_x.shape[-1])])
                items = items + extra
            # Auxiliary loss: the mean of each image's embeddings, read out through the tied output
            # head, predicts the answer token. It trains the vision tower directly (the path through
            # the untrained language model is slow at first) and lines image features up with the
            # answer embeddings, which the language model then only has to copy.
            answer = torch.tensor([vocab.local[tok.encode(it["answer"], add_special_tokens=False)[0]] for it in items])
            aux_logits = model.lm_head(img.mean(1))
            aux = torch.nn.functional.cross_entropy(aux_logits, answer)
            loss = loss + hp["aux"] * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            with torch.no_grad():
                vis = full_vocab_ce(logits[:n_vis], targets[:n_vis], mask[:n_vis], n_other).item()
                txt = full_vocab_ce(logits[n_vis:], targets[n_vis:], mask[n_vis:], n_other).item()
            # "[ n/N]": the form StepLog.run reads as progress (echoed every 10%)
            log(f"[{step + 1:4d}/{steps}] loss {loss.item():.4f} (vision answers {vis:.3f}, text {txt:.3f}, "
                f"aux {aux.item() if hp['aux'] else 0:.3f}) t {time.monotonic() - t_loop:.1f}s")
    save(model, vocab, out, shape)
    log(f"trained {steps} steps in {time.monotonic() - t_start:.1f} s")
    return sorted(p.name for p in out.iterdir() if p.is_file())


def save(model, vocab: Vocab, out: Path, shape: dict):
    """Full-vocabulary checkpoint: trained rows at the subset ids, zeros elsewhere; bf16 like generate()."""
    from transformers import Qwen3_5ForConditionalGeneration

    config = build_config(shape)
    with torch.device("meta"):
        full = Qwen3_5ForConditionalGeneration(config)
    sd = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
    key = "model.language_model.embed_tokens.weight"
    emb = torch.zeros(VOCAB_SIZE, sd[key].shape[1], dtype=torch.bfloat16)
    emb[torch.tensor(vocab.full)] = sd[key]
    sd[key] = emb
    sd.pop("lm_head.weight", None)
    full.load_state_dict(sd, strict=False, assign=True)
    full.tie_weights()
    missing = [n for n, p in full.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"tensors left uninitialised: {missing[:5]}")
    full.eval()
    full.save_pretrained(str(out), safe_serialization=True, max_shard_size="50GB")
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2, sort_keys=True) + "\n")


def main(argv: list[str]) -> int:
    import argparse

    from .synthetic import load_shape

    ap = argparse.ArgumentParser(description="train the demo fixture (compiler/train.py)")
    ap.add_argument("out")
    ap.add_argument("--shape", default="tiny", help="a shape name or file (synthetic.load_shape)")
    ap.add_argument("--shape-json", help="the shape itself, as JSON (what the forge passes)")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--steps", type=int, default=HYPER["steps"])
    ap.add_argument("--kernels", choices=sorted(TORCH_CAPABILITY), default=None,
                    help="torch's CPU kernels (compiler/kernels.py); default: this machine's class")
    a = ap.parse_args(argv)
    shape = json.loads(a.shape_json) if a.shape_json else load_shape(a.shape)
    from .kernels import kernels as this_machine

    files = train(a.out, shape, a.seed, {"steps": a.steps}, log=lambda m: print(m, flush=True),
                  kernels=a.kernels or this_machine())
    print(json.dumps({"files": files}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
