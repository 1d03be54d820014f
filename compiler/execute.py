"""Execution: run one planned step. Dumb on purpose -- every decision was made by the planner;
this takes the step's inputs from the store, runs its stage into a partial folder, and commits it.
"""
from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from . import memory
from .errors import ForgeError
from .paths import build_dir, state_dir, variants_dir
from .runlog import StepLog
from .store import Entry, Writer, require

# Step kind -> the module in compiler/stages/ that runs it, imported when a step of it runs (a no-op
# run imports none of them, nor numpy and torch behind them).
STAGES = {
    "synthetic": "source", "hub": "source", "local": "source",
    "validate": "validate",
    "convert": "convert", "mmproj": "convert", "mtp-draft": "convert",
    "quantize": "quantize", "mmproj-quantize": "quantize",
    "imatrix": "imatrix",
    "kld-base": "kld", "kld-q8": "kld", "gate": "gate",
    "image-fit": "image_fit", "envelope": "envelope",
    "smoke": "smoke",
    "receipt": "receipt",
}


def stage(kind: str):
    import importlib

    return importlib.import_module(f".stages.{STAGES[kind]}", __package__)


def entry(step) -> Entry:
    return Entry(step.kind, step.key)


def variant_of(plan, step):
    """The variant a per-variant step (receipt, envelope, smoke) belongs to."""
    return next(v for v in plan.variants if v.steps.get(step.kind) is step)


def who_needs(plan, step) -> str:
    names = sorted({v.alloy.name for v in plan.variants if step in v.steps.values()})
    return ", ".join(names)


@contextmanager
def key_lock(out: Entry, task: str):
    """One writer per store key across processes: a second `doit` on the same build dir waits for
    the first to finish this step, then finds it complete, instead of deleting its partial folder."""
    from filelock import FileLock, Timeout

    # In the build's state folder, not the store: the store holds only entries and their partials.
    locks = state_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(locks / f"{out.kind}-{out.key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"  {task}: another run is building this step; waiting for it", flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def run_step(plan, task: str) -> None:
    step = plan.steps[task]
    out = entry(step)
    with key_lock(out, task):
        _run_step_locked(plan, step, out)
    if step.kind == "receipt":
        link_variant(plan, variant_of(plan, step))


def _run_step_locked(plan, step, out: Entry) -> None:
    task = step.task
    if out.is_complete():
        print(f"  {task}: already in the store, {out.dir}", flush=True)
    else:
        inputs = {role: entry(plan.steps[t]) for role, t in step.inputs}
        for role, e in inputs.items():
            require(e, f"input {role} of {task}")
        ctx = {"toolchain": plan.toolchain, "alloys": who_needs(plan, step)}
        if step.kind in ("receipt", "envelope", "smoke"):
            ctx["variant"] = variant_of(plan, step)
        with Writer(out, step.params, {role: e.key for role, e in inputs.items()}) as w:
            log = StepLog(w.path(f"{step.basename}.log"), task)
            started = time.monotonic()
            try:
                with memory.reserve(step, inputs):
                    started = time.monotonic()
                    stage(step.kind).run(step, w, inputs, log, ctx)
                w.extra["seconds"] = round(time.monotonic() - started, 2)
                if log.peak_rss_mib:
                    w.extra["peak_rss_mib"] = log.peak_rss_mib
                log(f"done in {w.extra['seconds']:.1f} s")
            except BaseException:
                log.close()
                keep_failed_log(task, log.path)
                raise
            finally:
                log.close()


def keep_failed_log(task: str, log: Path) -> None:
    """The partial folder goes away with a failure; its log must not."""
    dest = build_dir() / "logs" / (task.replace(":", "_").replace("/", "_") + ".failed.log")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(log, dest)
        print(f"  {task}: failed; its log is kept at {dest}", flush=True)
    except OSError:
        pass


def variant_links(plan, variant) -> dict:
    """Readable name in build/variants/<id>/ -> file in the store."""
    links = {}
    text = entry(variant.steps["quantize"])
    links[variant.text_filename] = text.output()
    if "projector" in variant.steps:
        proj = entry(variant.steps["projector"])
        links[variant.mmproj_filename] = proj.output()
    if "draft" in variant.steps:
        links[variant.draft_filename] = entry(variant.steps["draft"]).output()
    rec = entry(variant.steps["receipt"])
    links[f"{variant.alloy.name}.alloy.json"] = rec.file(f"{variant.alloy.name}.alloy.json")
    return links


def links_ok(plan, variant) -> bool:
    folder = variants_dir() / variant.id
    try:
        want = variant_links(plan, variant)
    except (OSError, ValueError):
        return False
    for name, target in want.items():
        link = folder / name
        if not link.is_symlink() or (link.parent / os.readlink(link)).resolve() != target.resolve():
            return False
    return True


def link_variant(plan, variant) -> None:
    folder = variants_dir() / variant.id
    folder.mkdir(parents=True, exist_ok=True)
    for name, target in variant_links(plan, variant).items():
        link = folder / name
        tmp = folder / f".{name}.tmp{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(os.path.relpath(target, folder), tmp)
        os.replace(tmp, link)


def describe(plan, variant) -> list[str]:
    folder = variants_dir() / variant.id
    lines = [f"{variant.id}: {variant.llama_type} for tier {variant.config['tier']['name']} "
             f"({variant.config['backend']['name']}) in {folder}"]
    for name, target in variant_links(plan, variant).items():
        size = target.stat().st_size
        lines.append(f"    {name:<48} {size / 2**20:10.1f} MiB")
    return lines


def fail(e: ForgeError):
    from doit.exceptions import TaskFailed

    return TaskFailed(str(e))
