"""The CPU kernel class the demo fixture trains with: which of torch's (and MKL's, oneDNN's) code
paths produce its bytes. Trained bytes are the same on every machine of one class and differ between
classes (vectorised reductions round differently), so the class is part of the source step's key and
of the lock's record. Light on purpose: planning calls it, and it must not import torch.

    x86_64-avx2      any x86-64 machine with AVX2 (AVX-512 machines pinned down to AVX2's paths)
    x86_64-default   an x86-64 machine without AVX2: torch's scalar (default) kernels, MKL's and
                     oneDNN's SSE4 paths (x86-64-v2: every x86-64 CPU since 2008-2011 and
                     Rosetta 2 have SSE4.2; an older one is refused, it has no path of the class)
    arm64-default    Apple Silicon, aarch64 Linux: torch's default NEON kernels

FORGE_TRAIN_KERNELS=default runs the default class on a machine that has AVX2 (how the tests
reproduce a machine without it); =avx2 where AVX2 is missing is refused.
"""
from __future__ import annotations

import functools
import os
import platform
import subprocess

from .errors import ForgeError

THREADS = 2
# Per kernel choice: what torch's dispatch, MKL's BLAS branch and oneDNN's ISA are pinned to. They
# must be set before torch is imported, so training always runs in a process of its own.
_PINS = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    # x86 without AVX2: MKL's SSE4.2 branch and oneDNN at SSE4.1, which every x86-64-v2 machine
    # runs. (MKL's COMPATIBLE branch, which pre-SSE4.2 CPUs run too, made the demo's training 2.5
    # times slower here: 33.5 s against 13.2 s for 20 steps; the tests train this class in full.)
    "default-x86_64": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    # arm64: no MKL; torch's default kernels (not SVE, which some Linux arm64 servers offer).
    "default-arm64": {"ATEN_CPU_CAPABILITY": "default"},
}
# What torch.backends.cpu.get_cpu_capability() reports once pinned: train() checks it.
TORCH_CAPABILITY = {"avx2": "AVX2", "default": "DEFAULT"}


def machine() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "aarch64": "arm64", "armv8": "arm64"}.get(m, m)


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """An x86 CPU's features as the OS reports them, lower case (Linux /proc/cpuinfo's flags, e.g.
    avx2, sse4_2; macOS sysctl's, e.g. AVX2, SSE4.2, normalised to the Linux names)."""
    if machine() != "x86_64":
        return frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    flags: set[str] = set()
    for key in ("machdep.cpu.features", "machdep.cpu.leaf7_features"):
        try:
            out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        flags.update(w.lower().replace(".", "_") for w in out.split())
    return frozenset(flags)


def has_avx2() -> bool:
    return "avx2" in cpu_flags()


def kernels() -> str:
    """avx2 or default: what this machine trains with."""
    forced = os.environ.get("FORGE_TRAIN_KERNELS", "").strip().lower()
    if forced and forced not in TORCH_CAPABILITY:
        raise ForgeError("unknown CPU kernel choice for training", where="FORGE_TRAIN_KERNELS",
                         found=forced, allowed=sorted(TORCH_CAPABILITY))
    avx2 = has_avx2()
    if forced == "avx2" and not avx2:
        raise ForgeError("this CPU has no AVX2: its torch cannot run the AVX2 kernels",
                         where="FORGE_TRAIN_KERNELS", found=forced, allowed=["default"])
    choice = forced or ("avx2" if avx2 else "default")
    if choice == "default" and machine() == "x86_64" and "sse4_2" not in cpu_flags():
        raise ForgeError("this x86-64 CPU has no SSE4.2: the demo fixture's x86_64-default class pins MKL's "
                         "SSE4.2 path, which it cannot run, so it cannot train the fixture's bytes",
                         where="the CPU's flags", found="no sse4_2",
                         allowed="an x86-64-v2 CPU (SSE4.2), or a checkpoint of your own as the source")
    return choice


def platform_class(choice: str | None = None) -> str:
    """e.g. x86_64-avx2: the machine and its kernel choice; the trained bytes hold within it."""
    return f"{machine()}-{choice or kernels()}"


def pinned_env(choice: str | None = None) -> dict:
    """The environment a training process starts with for this machine's class."""
    choice = choice or kernels()
    pins = _PINS["avx2"] if choice == "avx2" else _PINS.get(f"default-{machine()}", {"ATEN_CPU_CAPABILITY": "default"})
    return {**pins, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
