"""Where llama.cpp put a variant: read from its own load report, not assumed.

The product forbids a CPU fallback, so on a GPU backend every repeating layer, the output layer,
the KV and recurrent caches and the projector must sit on the GPU. llama.cpp keeps the input
embedding (token_embd) in host memory by design (only rows are gathered from it), so the CPU model
buffer may hold that tensor and nothing more.

    load report lines used (vendored llama.cpp, src/llama-model.cpp and tools/mtmd/clip.cpp):
      load_tensors: offloaded 25/25 layers to GPU
      load_tensors:        CUDA0 model buffer size =   512.00 MiB
      llama_kv_cache:      CUDA0 KV buffer size =   ...
      clip_ctx: CLIP using CUDA0 backend
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_BUFFER = re.compile(r"(\S+)\s+(model|KV|RS|compute|output) buffer size =\s+([\d.]+) MiB")
_CLIP = re.compile(r"CLIP using (\S+) backend")
_HOST = re.compile(r"^(CPU|CPU_Mapped|CPU_REPACK|.*_Host)$", re.I)

# A buffer name's device family -> the backend name this project uses.
_FAMILY = {"cuda": "cuda", "vulkan": "vulkan", "metal": "metal", "mtl": "metal", "cpu": "cpu"}


def backend_of(device: str) -> str:
    low = device.lower()
    return next((name for prefix, name in _FAMILY.items() if low.startswith(prefix)), low)


@contextlib.contextmanager
def stderr_captured(sink: list):
    """mtmd's loader writes to fd 2 itself, not through llama.cpp's log callback: catch it there."""
    with tempfile.TemporaryFile() as err:
        saved = os.dup(2)
        sys.stderr.flush()
        os.dup2(err.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            err.seek(0)
            sink.append(err.read().decode("utf-8", "replace"))


def is_host(device: str) -> bool:
    """A buffer in host memory (CPU, mapped file, repack, pinned host buffers of a GPU backend)."""
    return bool(_HOST.match(device))


def buffers_by_kind(load_log: str) -> dict[str, dict[str, float]]:
    """kind (model, KV, RS, compute, output) -> device -> MiB, from llama.cpp's buffer report."""
    buffers: dict[str, dict[str, float]] = {}
    for device, kind, mib in _BUFFER.findall(load_log):
        buffers.setdefault(kind, {})
        buffers[kind][device] = buffers[kind].get(device, 0.0) + float(mib)
    return buffers


def projector_device(clip_log: str) -> str | None:
    clip = _CLIP.search(clip_log)
    return clip.group(1) if clip else None


def read(load_log: str, clip_log: str, token_embd_bytes: int) -> dict:
    """Placement of every part, from the load reports."""
    off = _OFFLOADED.search(load_log)
    buffers = buffers_by_kind(load_log)
    host_weights = sum(m for d, m in buffers.get("model", {}).items() if is_host(d))
    gpu_devices = sorted({d for by_dev in buffers.values() for d in by_dev if not is_host(d)})
    return {
        "layers_offloaded": [int(off.group(1)), int(off.group(2))] if off else None,
        "buffers_mib": buffers,
        "host_model_mib": round(host_weights, 2),
        "token_embd_mib": round(token_embd_bytes / 2**20, 2),
        "projector_device": projector_device(clip_log),
        "gpu_devices": gpu_devices,
        "backend": backend_of(gpu_devices[0]) if gpu_devices else "cpu",
    }


def problems(place: dict) -> list[str]:
    """Why this is not a full offload (empty when every part is on the GPU)."""
    out = []
    if not place["gpu_devices"]:
        return ["no GPU device was used: everything ran on the CPU"]
    lo = place["layers_offloaded"]
    if not lo or lo[0] < lo[1]:
        out.append(f"layers on the GPU: {lo[0] if lo else 0} of {lo[1] if lo else '?'} (the output layer counts as one)")
    # The host may hold the input embedding and nothing else (1 MiB of slack for alignment).
    if place["host_model_mib"] > place["token_embd_mib"] + 1.0:
        out.append(f"{place['host_model_mib'] - place['token_embd_mib']:.1f} MiB of weights besides the input "
                   f"embedding are in host memory")
    for kind in ("KV", "RS"):
        host = {d: m for d, m in place["buffers_mib"].get(kind, {}).items() if is_host(d) and m > 0}
        if host:
            out.append(f"the {kind} cache is in host memory ({host})")
    dev = place["projector_device"]
    if dev is None or is_host(dev):
        out.append(f"the projector runs on {dev or 'an unknown device'}, not the GPU")
    return out
