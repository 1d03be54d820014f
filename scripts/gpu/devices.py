"""Prove that llama-cpp-python's package runs on a given llama.cpp build: which libraries it loaded,
which ggml backend devices they expose, and (with --model) a fully offloaded model load + a few tokens.

    LLAMA_CPP_LIB_PATH=PREFIX/lib MTMD_CPP_LIB=PREFIX/lib python3 scripts/gpu/devices.py [--model M.gguf]

LLAMA_CPP_LIB_PATH is the folder holding libllama.so (llama_cpp/llama_cpp.py); MTMD_CPP_LIB the folder
holding libmtmd.so (llama_cpp/mtmd_cpp.py). libggml*.so are found through libllama's RUNPATH ($ORIGIN).
"""
import argparse
import ctypes
import os
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--model")
ap.add_argument("--ngl", type=int, default=-1)
a = ap.parse_args()

lib = os.environ.get("LLAMA_CPP_LIB_PATH")
import llama_cpp  # noqa: E402  (loads libllama.so from LLAMA_CPP_LIB_PATH)
from llama_cpp import mtmd_cpp  # noqa: E402  (loads libmtmd.so from MTMD_CPP_LIB)

llama_cpp.llama_backend_init()
maps = open("/proc/self/maps").read().split("\n")
for so in sorted({m.split()[-1] for m in maps if ("libggml" in m or "libllama" in m or "libmtmd" in m)}):
    print("lib", so)
print("gpu_offload", llama_cpp.llama_supports_gpu_offload())
print("system_info", llama_cpp.llama_print_system_info().decode().strip())

g = ctypes.CDLL(os.path.join(lib, "libggml.so") if lib else "libggml.so")
g.ggml_backend_dev_count.restype = ctypes.c_size_t
g.ggml_backend_dev_get.restype = ctypes.c_void_p
g.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
for f in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
    getattr(g, f).restype = ctypes.c_char_p
    getattr(g, f).argtypes = [ctypes.c_void_p]
g.ggml_backend_dev_type.restype = ctypes.c_int
g.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
g.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
kinds = {0: "CPU", 1: "GPU", 2: "IGPU", 3: "ACCEL"}
for i in range(g.ggml_backend_dev_count()):
    d = g.ggml_backend_dev_get(i)
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    g.ggml_backend_dev_memory(d, ctypes.byref(free), ctypes.byref(total))
    print(f"dev {i} {g.ggml_backend_dev_name(d).decode()} [{kinds.get(g.ggml_backend_dev_type(d), '?')}] "
          f"{g.ggml_backend_dev_description(d).decode()} free {free.value >> 20} MiB / {total.value >> 20} MiB")

if a.model:
    t = time.time()
    llm = llama_cpp.Llama(model_path=a.model, n_gpu_layers=a.ngl, n_ctx=512, seed=1, verbose=True)
    t_load = time.time() - t
    t = time.time()
    out = llm.create_completion("hello world", max_tokens=32, temperature=0.0)
    dt = time.time() - t
    n = out["usage"]["completion_tokens"]
    print(f"gen {n} tokens in {dt:.3f}s (load {t_load:.2f}s): {out['choices'][0]['text'][:60]!r}", flush=True)
print("ok")
