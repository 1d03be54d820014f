"""The CPU kernel class the demo fixture trains with: which of torch's (and MKL's, oneDNN's) code
paths produce its bytes. Trained bytes are the same on every machine of one class and differ between
classes (vectorised reductions round differently), so the class is part of the source step's key and
of the lock's record. Light on purpose: planning calls it, and it must not import torch.

    x86_64-avx2      any x86-64 machine with AVX2 (AVX-512 machines pinned down to AVX2's paths)
    x86_64-default   an x86-64 machine without AVX2: torch's scalar (default) kernels
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
    # x86 without AVX2: MKL's and oneDNN's most conservative paths, which every x86-64 runs.
    "default-x86_64": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    # arm64: no MKL; torch's default kernels (not SVE, which some Linux arm64 servers offer).
    "default-arm64": {"ATEN_CPU_CAPABILITY": "default"},
}
# What torch.backends.cpu.get_cpu_capability() reports once pinned: train() checks it.
TORCH_CAPABILITY = {"avx2": "AVX2", "default": "DEFAULT"}


def machine() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "aarch64": "arm64", "armv8": "arm64"}.get(m, m)


@functools.lru_cache(maxsize=None)
def has_avx2() -> bool:
    """From the OS's own report of the CPU's features (Linux /proc/cpuinfo, macOS sysctl)."""
    if machine() != "x86_64":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx2" in line.split()
    except OSError:
        pass
    try:
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.leaf7_features"], capture_output=True, text=True,
                             timeout=5).stdout
        return "AVX2" in out.upper().split()
    except (OSError, subprocess.SubprocessError):
        return False


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
    return forced or ("avx2" if avx2 else "default")


def platform_class(choice: str | None = None) -> str:
    """e.g. x86_64-avx2: the machine and its kernel choice; the trained bytes hold within it."""
    return f"{machine()}-{choice or kernels()}"


def pinned_env(choice: str | None = None) -> dict:
    """The environment a training process starts with for this machine's class."""
    choice = choice or kernels()
    pins = _PINS["avx2"] if choice == "avx2" else _PINS.get(f"default-{machine()}", {"ATEN_CPU_CAPABILITY": "default"})
    return {**pins, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
