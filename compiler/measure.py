"""Measure what llama.cpp itself allocates, on this machine's backend. Two measurements, each run
as a subprocess so that its peak memory is its own, each printing one JSON object:

    python -m compiler.measure TEXT MMPROJ N_CTX N_SEQ N_BATCH [IMAGE_PX [gpu]]
  a variant: loads the text model through llama-cpp-python's low-level API with the tier's n_ctx,
  n_seq_max and a unified KV cache (the high-level Llama() ignores n_seq_max, FACTS.md), decodes
  one short prompt per sequence in a single batch with distinct sequence ids, loads the projector
  through mtmd (which reserves its encoder's compute buffer), and reports every buffer llama.cpp
  allocated, by kind, and the process's peak RSS. IMAGE_PX > 0 also evaluates one image of that
  size into sequence 0 (projector and text model); 0 skips it.

    python -m compiler.measure image MODEL MMPROJ IMAGE_PX
  the projector at a tier's largest image: how many tokens it becomes, the encoder's seconds and
  the process's peak. Depends on the projector and the size only (the text model is opened for its
  hyperparameters, no weights read), so the forge runs it once per projector and tier, not per
  quant (stages/image_fit.py).
"""
from __future__ import annotations

import ctypes
import json
import re
import sys
import time

_CLIP = re.compile(r"(CPU|\w+)?\s*compute buffer size =\s+([\d.]+) MiB")


def peak_rss_bytes() -> int:
    """This process's peak resident set (the kernel's high-water mark, ru_maxrss): what it needed at
    its largest, which the RSS read after freeing buffers understates."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def gpu_memory_used_mib() -> int | None:
    """Device memory in use as the driver reports it (NVIDIA: nvidia-smi), whole-device, so other
    processes count too: read it before and after on an otherwise idle GPU."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True)
    try:
        return int(out.stdout.strip().splitlines()[0])
    except (ValueError, IndexError):
        return None


def measure_image(model_path: str, mmproj_path: str, image_px: int) -> dict:
    """Encode one square image of `image_px` through the projector alone (no text decode)."""
    import llama_cpp
    from llama_cpp import mtmd_cpp

    from .placement import stderr_captured
    from .smoke_run import chat, image_chunk, png
    from .vision_suite import suite

    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    # mtmd asks the text model for its embedding width only: its vocabulary and hyperparameters
    # suffice, so a 55 GB reference is opened without reading a weight.
    mp.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(model_path.encode(), mp)
    if not model:
        raise RuntimeError(f"could not open {model_path}")
    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.print_timings = False, 2, False
    err: list[str] = []
    with stderr_captured(err):
        mctx = mtmd_cpp.mtmd_init_from_file(mmproj_path.encode(), model, params)
    if not mctx:
        raise RuntimeError(f"the projector {mmproj_path} did not load: {''.join(err)[-800:]}")
    item = suite(image_px)[0]
    with image_chunk(mctx, chat(item["question"], True), png(item["image"])) as (chunk, n_tokens):
        t0 = time.monotonic()
        rc = mtmd_cpp.mtmd_encode_chunk(mctx, chunk)
        secs = time.monotonic() - t0
    mtmd_cpp.mtmd_free(mctx)
    llama_cpp.llama_model_free(model)
    if rc != 0:
        raise RuntimeError(f"mtmd_encode_chunk returned {rc} for a {image_px}px image")
    return {"image_px": image_px, "image_tokens": n_tokens, "encode_s": round(secs, 3),
            "peak_rss_mib": round(peak_rss_bytes() / 2**20, 1)}


def main(argv: list[str]) -> int:
    if argv and argv[0] == "image":
        print(json.dumps(measure_image(argv[1], argv[2], int(argv[3]))))
        return 0
    import psutil

    import llama_cpp

    text_path, mmproj_path, n_ctx, n_seq, n_batch = argv[0], argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    image_px = int(argv[5]) if len(argv) > 5 else 448
    # "gpu": every layer and the projector on the GPU (the GPU script); default: CPU only.
    on_gpu = len(argv) > 6 and argv[6] == "gpu"
    log: list[str] = []

    @llama_cpp.llama_log_callback
    def capture(level, message, user):
        log.append(message.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(capture, ctypes.c_void_p())
    llama_cpp.llama_backend_init()
    proc = psutil.Process()
    rss_before = proc.memory_info().rss
    vram_before = gpu_memory_used_mib() if on_gpu else None
    t0 = time.monotonic()
    mp = llama_cpp.llama_model_default_params()
    mp.use_extra_bufts = False  # no CPU weight repacking: the GPU backends have none either
    mp.n_gpu_layers = 999 if on_gpu else 0
    model = llama_cpp.llama_model_load_from_file(text_path.encode(), mp)
    if not model:
        print(json.dumps({"error": f"could not load {text_path}"}))
        return 1
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_seq_max, cp.kv_unified = n_ctx, n_seq, True
    cp.n_batch = n_batch
    cp.n_ubatch = min(n_batch, 512)
    ctx = llama_cpp.llama_init_from_model(model, cp)
    load_s = time.monotonic() - t0
    text_log = "".join(log)

    # One prompt per persona, decoded together: distinct sequence ids in one batch.
    vocab = llama_cpp.llama_model_get_vocab(model)
    batch = llama_cpp.llama_batch_init(512, 0, n_seq)
    n = 0
    for seq in range(n_seq):
        prompt = f"Persona {seq} says hello.".encode()
        toks = (llama_cpp.llama_token * 64)()
        count = llama_cpp.llama_tokenize(vocab, prompt, len(prompt), toks, 64, True, False)
        for i in range(count):
            batch.token[n] = toks[i]
            batch.pos[n] = i
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = seq
            batch.logits[n] = i == count - 1
            n += 1
    batch.n_tokens = n
    rc = llama_cpp.llama_decode(ctx, batch)
    llama_cpp.llama_batch_free(batch)

    mtmd_log_start = len(log)
    mmproj, mmproj_log_text = {}, ""
    vram_after = None
    if mmproj_path != "-":
        from llama_cpp import mtmd_cpp

        from .placement import stderr_captured

        mparams = mtmd_cpp.mtmd_context_params_default()
        mparams.use_gpu = on_gpu
        mparams.n_threads = 2
        # mtmd's loader writes to stderr itself rather than through the log callback.
        err: list[str] = []
        with stderr_captured(err):
            mctx = mtmd_cpp.mtmd_init_from_file(mmproj_path.encode(), model, mparams)
        clip_log = "".join(log[mtmd_log_start:]) + "".join(err)
        mmproj_log_text = clip_log
        warmup = re.search(r"warmup with image size = (\d+) x (\d+)", clip_log)
        weights = re.search(r"model size:\s+([\d.]+) MiB", clip_log)
        compute = _CLIP.findall(clip_log)
        mmproj = {"loaded": bool(mctx), "weights_mib": float(weights.group(1)) if weights else None,
                  "compute_mib": sum(float(c[1]) for c in compute) if compute else None,
                  "warmup_px": int(warmup.group(1)) if warmup else None}
        if mctx and image_px > 0:
            # Evaluate one image of the tier's largest size into sequence 0, after its prompt.
            from .smoke_run import chat, eval_image_prompt, png
            from .vision_suite import suite

            item = suite(image_px)[0]
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), 0, -1, -1)
            _, n_img, secs = eval_image_prompt(mctx, ctx, chat(item["question"], True), png(item["image"]), 0, 0,
                                               n_batch)
            mmproj.update(image_px=image_px, image_prompt_tokens=n_img, image_eval_s=round(secs, 3))
            # Read the device while the projector still holds its memory.
            vram_after = gpu_memory_used_mib() if on_gpu else None
        if mctx:
            mtmd_cpp.mtmd_free(mctx)
    from .placement import buffers_by_kind, projector_device

    by_kind = buffers_by_kind(text_log)
    buffers = {kind: sum(devs.values()) for kind, devs in by_kind.items()}
    by_device: dict[str, dict[str, float]] = {}
    for kind, devs in by_kind.items():
        for device, mib in devs.items():
            by_device.setdefault(device, {})[kind] = mib
    if vram_after is None and on_gpu:
        vram_after = gpu_memory_used_mib()
    peak = peak_rss_bytes()
    out = {"buffers_mib": buffers, "projector": mmproj, "decode_rc": rc, "decoded_tokens": n,
           "load_s": round(load_s, 3), "rss_growth_mib": round((proc.memory_info().rss - rss_before) / 2**20, 1),
           # peak: the process's high-water mark, not its RSS now
           "peak_rss_mib": round(peak / 2**20, 1), "buffers_by_device_mib": by_device,
           "backend": "gpu" if on_gpu else "cpu", "projector_log_device": projector_device(mmproj_log_text),
           "vram_used_mib": {"before": vram_before, "after": vram_after,
                             "growth": (vram_after - vram_before) if vram_before is not None and vram_after is not None else None}}
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
