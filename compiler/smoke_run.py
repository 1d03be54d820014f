"""The smoke checks, run in their own process on the pinned llama.cpp through llama-cpp-python.

    python -m compiler.smoke_run TEXT.gguf MMPROJ.gguf PARAMS.json [REFERENCE_MMPROJ.gguf]
                                                                     -> one JSON report on stdout

- text: a greedy completion, twice: same tokens both times, every logit finite;
- vision: each image of the generated suite through the projector (mtmd), then a greedy answer;
  with a reference projector (the F32 conversion), the same items again through it beside the same
  text model: the share of answers that stay the same is what the shipped projector type kept;
- personas: n_seq_max prompts (some with images) in one context, each on its own sequence id,
  generated together one batch per step. Two checks:
    isolation -- for each sequence, the same batch again with every *other* prompt replaced by
      different content of the same length (the cell layout and batch shapes stay the same): its
      logits must be bit-identical, since masked cells contribute exact zeros. Anything it can see
      of its neighbours moves them. This check is exact on any weights.
    alone -- each sequence's greedy tokens, and the ids of its top-8 logits with their values
      within 1% (of the logit, or 0.01 below 1), equal what its prompt gives decoded alone in an
      empty context. With a unified KV cache a sequence's cells sit at other offsets than alone,
      and llama.cpp's tiled attention rounds differently (seen: up to 0.05 on image prompts of the
      real 0.8B layout, 0.014 on the trained demo fixture's logits of ~20; bit-identical with
      kv_unified off). Weights that predict have margins far above that; random weights have
      near-ties, so the stage gates this check on seeing checkpoints only and reports it on random
      ones.
  PARAMS may set "break": "shared-seq" to put every prompt on sequence 0 -- the broken setup both
  checks have to catch;
- timings: load, image encode, prompt and generation tokens/s, time to first token.
"""
from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import sys
import time

# llama.cpp's libraries must load before numpy's: with the GPU image's numpy imported first, the
# CUDA build segfaulted inside llama_model_load_from_file (seen on an H100; llama_cpp first: fine).
import llama_cpp  # noqa: F401  (imported for its load order)
import numpy as np


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one: a CI runner or a
    container may grant fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def top_ids(logits: np.ndarray, k: int, block: int = 128) -> np.ndarray:
    """The k largest logits' ids, largest first, ties in id order: what a stable sort of the whole
    vocabulary gives (a trained fixture's untrained tokens all have logit 0 exactly, and tied
    values must come out in the same order on every call), without sorting 248k values for every
    generated token. The k-th largest of the blocks' maxima, b, bounds the k-th largest value from
    below (k values, those maxima, are >= b), so the top k are the values above b -- sorted, as few
    as there are -- and, where fewer than k are above it, the first ids whose value is b.
    (numpy's partition is no shortcut: on the fixture's 248k equal zeros it is slower than a sort.)"""
    n = len(logits)
    padded = np.full(-(-n // block) * block, -np.inf, dtype=logits.dtype)
    padded[:n] = logits
    maxima = padded.reshape(-1, block).max(axis=1)
    b = np.sort(maxima)[-k] if len(maxima) >= k else padded.min()
    above = np.flatnonzero(logits > b)
    above = above[np.argsort(-logits[above], kind="stable")]
    if len(above) >= k:
        return above[:k]
    return np.concatenate([above, np.flatnonzero(logits == b)[:k - len(above)]])


class Session:
    def __init__(self, text_path: str, mmproj_path: str, n_ctx: int, n_seq: int, n_batch: int,
                 kv_unified: bool = True, gpu: str = "auto"):
        import llama_cpp
        from llama_cpp import mtmd_cpp

        from . import placement

        self.ll, self.mt = llama_cpp, mtmd_cpp
        self.log: list[str] = []

        @llama_cpp.llama_log_callback
        def capture(level, message, user):
            # Kept for the placement report; the JSON report is the only stdout.
            self.log.append(message.decode("utf-8", "replace"))

        self._capture = capture
        llama_cpp.llama_log_set(capture, ctypes.c_void_p())
        llama_cpp.llama_backend_init()
        # gpu: "off" keeps everything on the CPU; "auto" offloads every layer and the projector
        # when llama.cpp has a GPU device; "required" also fails when it has none.
        self.on_gpu = gpu != "off" and bool(llama_cpp.llama_supports_gpu_offload())
        if gpu == "required" and not self.on_gpu:
            raise RuntimeError("gpu=required but this llama.cpp build has no GPU device")
        t0 = time.monotonic()
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 999 if self.on_gpu else 0
        # No CPU weight repacking beside a GPU: no layer runs on the CPU there (as in measure.py).
        mp.use_extra_bufts = not self.on_gpu
        self.model = llama_cpp.llama_model_load_from_file(text_path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"could not load {text_path}")
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_seq_max, cp.kv_unified = n_ctx, n_seq, kv_unified
        cp.n_batch, cp.n_ubatch = n_batch, min(n_batch, 512)
        # One thread per core this process may use: llama.cpp's default (4) on a 2-core machine
        # leaves threads spinning for cores that are busy.
        cp.n_threads = cp.n_threads_batch = usable_cores()
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        load_log, n_load = "".join(self.log), len(self.log)
        mparams = mtmd_cpp.mtmd_context_params_default()
        mparams.use_gpu = self.on_gpu
        mparams.print_timings = False
        mparams.n_threads = cp.n_threads
        self.mparams = mparams
        clip_log = self._load_projector(mmproj_path) if mmproj_path else []
        self.load_s = time.monotonic() - t0
        from .ggufcheck import read_layout

        embd = next((t["n_bytes"] for t in read_layout(text_path)["tensors"] if t["name"] == "token_embd.weight"), 0)
        self.placement = placement.read(load_log, "".join(clip_log) + "".join(self.log[n_load:]), embd)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_batch = n_batch
        self.kv_unified = kv_unified
        self.finite = True
        self.timing = {"prompt_tokens": 0, "prompt_s": 0.0, "image_s": [], "gen_tokens": 0, "gen_s": 0.0}

    def _load_projector(self, path: str) -> list[str]:
        from . import placement

        clip_log: list[str] = []
        with placement.stderr_captured(clip_log):
            self.mctx = self.mt.mtmd_init_from_file(path.encode(), self.model, self.mparams)
        sys.stderr.write("".join(clip_log))  # the loader's own words stay in the step's log
        if not self.mctx:
            raise RuntimeError(f"the projector {path} did not load: {''.join(clip_log)[-800:]}")
        return clip_log

    def use_projector(self, path: str) -> None:
        """Another projector beside the same text model (the reference one for the preservation
        check): the current one is freed first, so two are never held at once."""
        self.mt.mtmd_free(self.mctx)
        self.mctx = None
        self._load_projector(path)

    def clear(self):
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)

    def argmax(self, i: int) -> int:
        ptr = self.ll.llama_get_logits_ith(self.ctx, i)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        finite = bool(np.isfinite(logits).all())
        self.finite = self.finite and finite
        # Keep the top of the distribution too: on random weights greedy text can collapse to one
        # token for every prompt, so equal tokens alone would not prove that sequences stay apart.
        top = top_ids(logits, 8) if finite else np.argsort(-logits, kind="stable")[:8]
        self.last_top = [(int(t), float(logits[t])) for t in top]
        return int(top[0])

    def tokenize(self, text: str) -> list[int]:
        raw = text.encode()
        buf = (self.ll.llama_token * (len(raw) + 16))()
        n = self.ll.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), False, True)
        return list(buf[:n])

    def prefill(self, seq: int, prompt: str | list[int], image: bytes | None, start: int = 0) -> tuple[int, int]:
        """Evaluate a prompt (text, or tokens when there is no image) into sequence `seq` from
        position `start`; returns (next position, first greedy token)."""
        t0 = time.monotonic()
        if image is None:
            toks = prompt if isinstance(prompt, list) else self.tokenize(prompt)
            batch = self.ll.llama_batch_init(len(toks), 0, 1)
            for i, tok in enumerate(toks):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, start + i, 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = i == len(toks) - 1
            batch.n_tokens = len(toks)
            rc = self.ll.llama_decode(self.ctx, batch)
            self.ll.llama_batch_free(batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            n_past = start + len(toks)
            self.timing["prompt_tokens"] += len(toks)
        else:
            n_past, n_tokens, seconds = eval_image_prompt(self.mctx, self.ctx, prompt, image, seq, start, self.n_batch)
            self.timing["image_s"].append(seconds)
            self.timing["prompt_tokens"] += n_tokens
        self.timing["prompt_s"] += time.monotonic() - t0
        return n_past, self.argmax(-1)

    def generate(self, states: list[list], n_tokens: int, one_history: bool = False, until_end: bool = False) -> None:
        """states: [seq, n_past, tokens]; one batch per step, one token per sequence. With
        one_history (the broken setup) every state shares one sequence, so its tokens take
        consecutive positions of that one history. until_end (one state): stop at the end of the
        turn (an end-of-generation token, kept in the tokens), as the product's chat does -- what
        comes after it is not part of the answer."""
        for _ in range(n_tokens - 1):
            if until_end and self.ll.llama_vocab_is_eog(self.vocab, states[0][2][-1]):
                break
            t0 = time.monotonic()
            batch = self.ll.llama_batch_init(len(states), 0, 1)
            base = max(st[1] for st in states)
            for i, (seq, n_past, toks, *_) in enumerate(states):
                pos = base + i if one_history else n_past
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = toks[-1], pos, 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = True
            batch.n_tokens = len(states)
            rc = self.ll.llama_decode(self.ctx, batch)
            self.ll.llama_batch_free(batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            for i, st in enumerate(states):
                st[1] = base + len(states) if one_history else st[1] + 1
                st[2].append(self.argmax(i))
                if len(st) > 3:
                    st[3].append(self.last_top)
            self.timing["gen_tokens"] += len(states)
            self.timing["gen_s"] += time.monotonic() - t0

    def piece(self, toks: list[int]) -> str:
        out = b""
        for t in toks:
            buf = (ctypes.c_char * 64)()
            n = self.ll.llama_token_to_piece(self.vocab, t, buf, 64, 0, True)
            out += buf.raw[:max(n, 0)]
        return out.decode("utf-8", "replace")


@contextlib.contextmanager
def tokenized(mctx, prompt: str, image: bytes):
    """mtmd's chunks for a prompt with one image (`<image>` marks where), freed on leaving."""
    from llama_cpp import mtmd_cpp as mt

    data = (ctypes.c_uint8 * len(image)).from_buffer_copy(image)
    bitmap = mt.mtmd_helper_bitmap_init_from_buf(mctx, data, len(image), False)
    text = mt.mtmd_input_text()
    raw = prompt.replace("<image>", mt.mtmd_default_marker().decode()).encode()
    text.text, text.text_len = raw, len(raw)
    text.add_special, text.parse_special = False, True
    chunks = mt.mtmd_input_chunks_init()
    bitmaps = (mt.mtmd_bitmap_p_ctypes * 1)(bitmap)
    try:
        rc = mt.mtmd_tokenize(mctx, chunks, ctypes.byref(text), bitmaps, 1)
        if rc != 0:
            raise RuntimeError(f"mtmd_tokenize returned {rc}")
        yield chunks
    finally:
        mt.mtmd_input_chunks_free(chunks)
        mt.mtmd_bitmap_free(bitmap)


@contextlib.contextmanager
def image_chunk(mctx, prompt: str, image: bytes):
    """The image's own chunk of a tokenized prompt, with its token count."""
    from llama_cpp import mtmd_cpp as mt

    with tokenized(mctx, prompt, image) as chunks:
        for i in range(mt.mtmd_input_chunks_size(chunks)):
            chunk = mt.mtmd_input_chunks_get(chunks, i)
            if mt.mtmd_input_chunk_get_type(chunk) != mt.MTMD_INPUT_CHUNK_TYPE_TEXT:
                yield chunk, mt.mtmd_input_chunk_get_n_tokens(chunk)
                return
        raise RuntimeError("mtmd made no image chunk of the prompt")


def eval_image_prompt(mctx, ctx, prompt: str, image: bytes, seq: int, start: int, n_batch: int):
    """Tokenize a prompt with one image through mtmd and evaluate it into sequence `seq` from
    position `start`; returns (next position, tokens, seconds spent evaluating)."""
    import llama_cpp as ll
    from llama_cpp import mtmd_cpp as mt

    with tokenized(mctx, prompt, image) as chunks:
        new_past = ll.llama_pos(0)
        t0 = time.monotonic()
        rc = mt.mtmd_helper_eval_chunks(mctx, ctx, chunks, start, seq, n_batch, True, ctypes.byref(new_past))
        seconds = time.monotonic() - t0
        if rc != 0:
            raise RuntimeError(f"mtmd_helper_eval_chunks returned {rc}")
        return new_past.value, mt.mtmd_helper_get_n_tokens(chunks), seconds


def chat(question: str, image: bool) -> str:
    # mtmd wraps the media marker in <|vision_start|> ... <|vision_end|> itself.
    body = ("<image>" if image else "") + question
    return f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def agree(a: list, b: list, tol: float) -> tuple[bool, float | None, int | None]:
    """Whether two decodes of one prompt ([seq, n_past, tokens, top-8 per step]) agree: at every
    step the ids both top-8 lists hold have values within tol (relative to the logit's size where
    it is above 1); an id only one list holds sits within tol of the other list's cutoff (the
    8th value); and the greedy tokens are the same -- or differ at a step where the two tokens'
    logits were tied within tol, after which the histories differ and nothing more is comparable.
    A GPU's kernels for one sequence and for a batch of them round differently, so near-tied
    entries may swap between the two decodes; a sequence reading another's cache moves logits by far
    more than rounding. With tol 0 this is exact equality of tokens, ids and values.
    Returns (agree, largest absolute difference of a shared id, step parted on a tie or None)."""
    def close(x: float, y: float) -> bool:
        return abs(x - y) <= tol * max(1.0, abs(x))

    diff = 0.0
    for step, (tok_a, tok_b, top_a, top_b) in enumerate(zip(a[2], b[2], a[3], b[3])):
        va, vb = dict(top_a), dict(top_b)
        for t in va.keys() & vb.keys():
            diff = max(diff, abs(va[t] - vb[t]))
            if not close(va[t], vb[t]):
                return False, diff, None
        if tol == 0.0 and [t for t, _ in top_a] != [t for t, _ in top_b]:
            return False, None, None
        if any(not close(va[t], top_b[-1][1]) for t in va.keys() - vb.keys()) or \
                any(not close(vb[t], top_a[-1][1]) for t in vb.keys() - va.keys()):
            return False, None, None
        if tok_a != tok_b:
            tied = tok_b in va and tok_a in vb and close(va[tok_a], va[tok_b]) and close(vb[tok_a], vb[tok_b])
            return (tied and tol > 0.0), diff, (step if tied and tol > 0.0 else None)
    return len(a[2]) == len(b[2]), diff, None


def main(argv: list[str]) -> int:
    from .vision_suite import suite

    text_path, mmproj_path, params = argv[0], argv[1], json.loads(open(argv[2]).read())
    reference_path = argv[3] if len(argv) > 3 else None
    n_seq, n_gen = params["n_seq_max"], params["max_tokens"]
    s = Session(text_path, mmproj_path, params["n_ctx"], n_seq, params["n_batch"], params.get("kv_unified", True),
                params.get("gpu", "auto"))
    report = {"backend": s.placement["backend"] if s.on_gpu else "cpu", "load_s": round(s.load_s, 3),
              "placement": s.placement, "gpu_mode": params.get("gpu", "auto"), "on_gpu": s.on_gpu}

    # text: the same greedy completion twice
    runs = []
    for _ in range(2):
        s.clear()
        t0 = time.monotonic()
        n_past, first = s.prefill(0, chat("Name three colours of the rainbow.", False), None)
        ttft = time.monotonic() - t0
        st = [[0, n_past, [first]]]
        s.generate(st, n_gen)
        runs.append(st[0][2])
    report["text"] = {"tokens": runs[0], "text": s.piece(runs[0]), "deterministic": runs[0] == runs[1],
                      "ttft_ms": round(ttft * 1000, 1)}

    # vision: the generated suite, one image at a time
    if params.get("suite") == "fixture":
        # A trained fixture's own suite: 96 px pictures of 9 tokens each, all of them on any backend.
        from .fixture_data import suite as fixture_suite

        items = fixture_suite(params["fixture_items_per_family"])
        n_items, suite_name = len(items), f"fixture, {len(items)} items"
    else:
        # The whole suite on a GPU; its first items on the CPU, where each image costs seconds.
        n_items = params["vision_items"] if s.on_gpu else params.get("vision_items_cpu", params["vision_items"])
        items = suite(params["image_px"])[:n_items]
        suite_name = "full" if n_items >= params["vision_items"] else f"first {n_items} (CPU)"
    def answer(items) -> list[dict]:
        out = []
        for item in items:
            s.clear()
            n_past, first = s.prefill(0, chat(item["question"], True), png(item["image"]))
            st = [[0, n_past, [first]]]
            s.generate(st, n_gen, until_end=True)
            said = s.piece(st[0][2])
            out.append({"id": item["id"], "question": item["question"], "answer": said,
                        "accepted": item["accepted"],
                        "correct": any(a.lower() in said.lower() for a in item["accepted"])})
        return out

    answers = answer(items)
    report["vision"] = {"items": answers, "score": sum(a["correct"] for a in answers) / max(len(answers), 1),
                        "suite": suite_name}
    if reference_path:
        # The same items through the reference (F32) projector beside the same text model: what the
        # shipped projector type changed is the answers that differ. Its timings are not the
        # shipped pair's, so they are set aside.
        timing = {k: (list(v) if isinstance(v, list) else v) for k, v in s.timing.items()}
        s.use_projector(reference_path)
        ref = answer(items)
        s.use_projector(mmproj_path)
        s.timing = timing
        same = [a["answer"] == r["answer"] for a, r in zip(answers, ref)]
        report["vision"]["reference"] = {
            "projector": os.path.basename(reference_path), "answers": [r["answer"] for r in ref],
            "score": sum(r["correct"] for r in ref) / max(len(ref), 1),
            "agreement": sum(same) / max(len(same), 1),
            "differ": [a["id"] for a, ok in zip(answers, same) if not ok]}

    # personas: n_seq prompts, every other one with an image, together and alone
    from PIL import ImageOps

    prompts = []
    small = items if params.get("suite") == "fixture" else \
        suite(params.get("persona_image_px", params["image_px"]))[:max(len(items), 1)]
    for k in range(n_seq):
        item = small[k % len(small)] if k % 2 == 1 and small else None
        if item:
            prompts.append((chat(item["question"], True), item["image"]))
        else:
            prompts.append((s.tokenize(chat(f"Persona {k}: say something about the sea.", False)), None))

    def other(prompt):
        """Different content, same length: reversed tokens, or the image's negative (same size, so
        the same number of image tokens)."""
        text, image = prompt
        return (text, ImageOps.invert(image.convert("RGB"))) if image is not None else (text[::-1], None)

    shared = params.get("break") == "shared-seq"

    def together(batch_prompts):
        """Prefill every prompt on its own sequence (all on 0 when broken), then generate them
        together; returns ([seq, n_past, tokens, top-8 per step], error)."""
        s.clear()
        states = []
        try:
            for k, (prompt, image) in enumerate(batch_prompts):
                # The broken setup shares sequence 0, its prompts one after another in one history.
                seq = 0 if shared else k
                n_past, first = s.prefill(seq, prompt, png(image) if image is not None else None,
                                          start=states[-1][1] if shared and states else 0)
                states.append([seq, n_past, [first], [s.last_top]])
            s.generate(states, n_gen, one_history=shared)
        except RuntimeError as e:
            return states, str(e)
        return states, None

    alone = []
    for prompt, image in prompts:
        s.clear()
        n_past, first = s.prefill(0, prompt, png(image) if image is not None else None)
        st = [[0, n_past, [first], [s.last_top]]]
        s.generate(st, n_gen)
        alone.append(st[0])
    gen0 = s.timing["gen_tokens"], s.timing["gen_s"]
    states, error = together(prompts)
    gen1 = s.timing["gen_tokens"], s.timing["gen_s"]

    isolated = []
    for k in range(n_seq):
        if error is not None:
            isolated.append(False)
            continue
        varied, err = together([p if j == k else other(p) for j, p in enumerate(prompts)])
        # The layout must be the same for the comparison to be exact: same positions reached.
        ok = err is None and [st[1] for st in varied] == [st[1] for st in states] \
            and agree(states[k], varied[k], 0.0)[0]
        isolated.append(ok)

    checks = [agree(a, b, 1e-2) for a, b in zip(alone, states)] if error is None else [(False, None, None)] * len(prompts)
    report["personas"] = {
        "error": error,
        "n_seq_max": n_seq, "kv_unified": s.kv_unified, "sequence_ids": [st[0] for st in states],
        "with_image": [image is not None for _, image in prompts],
        "outputs": [s.piece(st[2]) for st in states],
        "isolated": isolated,
        "equal_alone": [ok for ok, _, _ in checks],
        "max_logit_diff": [d for _, d, _ in checks],
        # The step where together and alone took different tokens that were tied within the
        # tolerance (compared up to there; after it their histories differ), or None.
        "parted_on_a_tie": [t for _, _, t in checks],
    }
    t = s.timing
    batch_tokens, batch_s = gen1[0] - gen0[0], gen1[1] - gen0[1]
    report["timings"] = {
        "load_s": round(s.load_s, 3),
        "image_encode_ms": round(1000 * sum(t["image_s"]) / max(len(t["image_s"]), 1), 1),
        "prompt_tokens_per_s": round(t["prompt_tokens"] / t["prompt_s"], 1) if t["prompt_s"] else None,
        "generation_tokens_per_s": round(t["gen_tokens"] / t["gen_s"], 1) if t["gen_s"] else None,
        "batched_generation_tokens_per_s": round(batch_tokens / batch_s, 1) if batch_s else None,
        "ttft_ms": report["text"]["ttft_ms"],
    }
    report["text"]["logits_finite"] = s.finite
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
