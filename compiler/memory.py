"""Steps side by side within the machine's memory, not only its cores.

doit runs independent steps in threads (`-n`, dodo.py sets one per core): the Python converter
leaves cores idle, the projector converts beside the text model, a quality gate runs beside the
next quantize. Two steps whose peaks together exceed the memory this run may use must not run at
once, though: at the 27B layout one conversion alone takes most of a 64 GB machine. Each step
reserves its expected peak before it starts and waits while the running steps' reservations leave
too little; a step larger than the whole budget runs alone. The peaks are a multiple of the step's
input bytes plus a constant per kind (PEAK, from the peaks the bench measured: docs/bench/); the
checks that measure memory and speed (envelope, smoke) run alone so their figures are their own.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager

MiB = 2**20
# kind -> (x input bytes, + MiB). None: runs alone.
PEAK = {
    "synthetic": None,          # torch builds the whole model in memory
    "hub": (0.0, 256), "local": (0.0, 64), "validate": (0.0, 128),
    "convert": (1.0, 1024), "mmproj": (1.0, 1024), "mtp-draft": (1.0, 1024),
    "quantize": (1.5, 256), "mmproj-quantize": (1.5, 256),
    "imatrix": (1.0, 1024), "kld-base": (1.0, 1536), "kld-q8": (1.0, 1536), "gate": (1.0, 1536),
    "image-fit": None, "envelope": None, "smoke": None,
    # text and draft loaded twice over (speculative, then alone): their bytes and a context each
    "draft-run": (2.0, 512),
    "receipt": (0.0, 64),
}
BUDGET_SHARE = 0.85  # of the memory available when the run started: the rest for everything else


def _available() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


class Gate:
    def __init__(self, budget: int):
        self.budget, self.used, self.running = budget, 0, 0
        self.cond = threading.Condition()

    @contextmanager
    def hold(self, need: int | None):
        need = self.budget if need is None else min(need, self.budget)
        with self.cond:
            while self.running and self.used + need > self.budget:
                self.cond.wait()
            self.used += need
            self.running += 1
        try:
            yield
        finally:
            with self.cond:
                self.used -= need
                self.running -= 1
                self.cond.notify_all()


_GATE: Gate | None = None
_GATE_LOCK = threading.Lock()


def gate() -> Gate:
    global _GATE
    with _GATE_LOCK:
        if _GATE is None:
            budget = int(os.environ.get("FORGE_MEMORY_BUDGET_MIB", 0)) * MiB or int(_available() * BUDGET_SHARE)
            _GATE = Gate(budget)
        return _GATE


def input_bytes(inputs: dict) -> int:
    """Bytes of the step's input files, from their manifests (a local checkpoint's from its folder)."""
    total = 0
    for entry in inputs.values():
        try:
            manifest = entry.manifest()
        except (OSError, ValueError):
            continue
        total += sum(f.get("size", 0) for f in manifest.get("files", []))
        if "localFiles" in manifest:
            total += sum(os.path.getsize(os.path.join(manifest["path"], n)) for n in manifest["localFiles"])
    return total


def expected_peak(kind: str, inputs: dict) -> int | None:
    rule = PEAK.get(kind)
    if rule is None:
        return None
    factor, const = rule
    return int(factor * input_bytes(inputs)) + const * MiB


def reserve(step, inputs: dict):
    """Wait until the step's expected peak fits beside what is running, and hold it while it runs."""
    return gate().hold(expected_peak(step.kind, inputs))
