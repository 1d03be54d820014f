"""Execution: run one planned step. Dumb on purpose -- every decision was made by the planner;
this takes the step's inputs from the store, runs its stage into a partial folder, and commits it.
"""
from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from . import memory, remote
from .errors import ForgeError, OutOfSpace
from .paths import build_dir, state_dir, variants_dir
from .runlog import StepLog
from .store import Entry, Writer, require

# Step kind -> the module in compiler/stages/ that runs it, imported when a step of it runs (a no-op
# run imports none of them, nor numpy and torch behind them).
STAGES = {
    "synthetic": "source", "hub": "source", "local": "source",
    "validate": "validate",
    "convert": "convert", "mmproj": "mmproj", "mtp-draft": "mtp_draft",
    "quantize": "quantize", "mmproj-quantize": "quantize",
    "imatrix": "imatrix",
    "kld-base": "kld", "kld-q8": "kld", "gate": "gate",
    "image-fit": "image_fit", "envelope": "envelope",
    "smoke": "smoke", "draft-run": "draft_run",
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
        return
    shared = _remote()
    if shared is not None and remote.restore(shared, out, task, say=_say):
        return
    _build_here(plan, step, out)
    if shared is not None and shared.writable:
        try:
            remote.push(shared, out, task, say=_say, toolchain=plan.toolchain)
        except remote.RemoteError as e:
            # The step is built and in the store: a remote that cannot take it now fails nothing;
            # the next run pushes it (build/.forge/remote-pending/).
            _say(f"  {task}: {e}; left to push on the next run")


def _say(line: str) -> None:
    print(line, flush=True)


def _remote():
    """The remote cache FORGE_REMOTE names, or None; one that cannot be opened is said once, and the
    build goes on without it."""
    global _REMOTE
    if _REMOTE is None:
        try:
            _REMOTE = (remote.configured(),)
        except remote.RemoteError as e:
            _say(f"  remote: {e}; building without it")
            _REMOTE = (None,)
    return _REMOTE[0]


_REMOTE: tuple | None = None


def _build_here(plan, step, out: Entry) -> None:
    task = step.task
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
        except BaseException as e:
            log.close()
            keep_failed_log(task, log.path)
            if _out_of_space(e, log, out.dir.parent):
                # Named as what it is, not as the tool's traceback; the partial folder goes with
                # the Writer, so nothing half-written stays.
                free = shutil.disk_usage(out.dir.parent).free
                raise OutOfSpace("the disk filled up while this step wrote its output (ENOSPC); its partial "
                                 "output was removed", where=task,
                                 found=f"{free / 1e9:.2f} GB free in {out.dir.parent} now",
                                 hint="free space there or point FORGE_BUILD_DIR at a larger disk, then rerun "
                                      "doit (the preflight counts what a run needs: FORGE_PREFLIGHT must not "
                                      "be 0)") from None
            raise
        finally:
            log.close()


# What tools say when a write finds no room: the C library's ENOSPC text, numpy's tofile (the
# converter's writer), and ENOSPC itself.
_NO_ROOM = ("No space left on device", "Not enough free space", "ENOSPC")


def _out_of_space(e: BaseException, log: StepLog, folder: Path) -> bool:
    """A failed step ran out of disk: ENOSPC in this process (an OSError anywhere in the chain), a
    tool saying so (its output), or the file system still all but full while its partial output is
    there (a tool that words it otherwise)."""
    import errno

    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if any(m in str(e) for m in _NO_ROOM):  # a tool's failure, with its output's tail
            return True
        e = e.__cause__ or e.__context__
    try:
        text = log.path.read_text(errors="replace") if log.path.is_file() else ""
        nearly_full = shutil.disk_usage(folder).free < (16 << 20)
    except OSError:
        text, nearly_full = "", False
    return nearly_full or any(m in t for m in _NO_ROOM for t in (text, log.tail(40)))


def keep_failed_log(task: str, log: Path) -> None:
    """The partial folder goes away with a failure; its log must not."""
    dest = build_dir() / "logs" / (task.replace(":", "_").replace("/", "_") + ".failed.log")
    try:  # on a full disk this may fail too: the failure itself must still be reported
        dest.parent.mkdir(parents=True, exist_ok=True)
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
