"""The plan as doit tasks: small dicts, one per step, with the step's manifest as its target, the
input steps' manifests as file_dep (cheap to hash, and they order the graph), and an uptodate
check that the store entry is still sound (stat cache: no weights read on a no-op run)."""
from __future__ import annotations

from . import execute, lockfile
from .errors import ForgeError
from .store import Entry
from .toolchain import TOOLS, fingerprint_parts, tools_manifest, tools_ready

TOOL_KINDS = {"quantize", "mmproj-quantize", "receipt"}


def _guarded(fn, *args):
    try:
        fn(*args)
    except ForgeError as e:
        return execute.fail(e)
    return None


def toolchain_task(plan) -> dict:
    from .toolchain import build_tools

    fp = plan.toolchain
    return {
        "basename": "toolchain",
        "doc": f"build {', '.join(TOOLS)} from vendor/llama.cpp (cached by fingerprint {fp[:16]})",
        "actions": [(_guarded, [build_tools, fp, fingerprint_parts()])],
        "targets": [str(tools_manifest(fp))],
        "uptodate": [lambda task, values: tools_ready(fp)],
        "verbosity": 2,
    }


def step_task(plan, step) -> dict:
    out = Entry(step.kind, step.key)
    deps = [str(Entry(plan.steps[t].kind, plan.steps[t].key).manifest_path) for _, t in step.inputs]
    if step.kind in TOOL_KINDS:
        deps.append(str(tools_manifest(plan.toolchain)))
    uptodate = [lambda task, values, out=out: out.is_complete()]
    if step.kind == "receipt":
        variant = execute.variant_of(plan, step)
        uptodate.append(lambda task, values, v=variant: execute.links_ok(plan, v))
    return {
        "basename": step.basename,
        "name": step.name,
        "doc": step.doc,
        "actions": [(_guarded, [execute.run_step, plan, step.task])],
        "file_dep": deps,
        "targets": [str(out.manifest_path)],
        "uptodate": uptodate,
        "verbosity": 2,
    }


def lock_task(plan) -> dict:
    receipts = [str(Entry(v.steps["receipt"].kind, v.steps["receipt"].key).manifest_path) for v in plan.variants]

    def write_lock():
        lock, changed = lockfile.update(plan)
        print(f"  lock: {'updated' if changed else 'unchanged'}, {len(lock['variants'])} variants recorded")
        print("\nBuilt:")
        for v in plan.variants:
            for line in execute.describe(plan, v):
                print("  " + line)

    return {
        "basename": "lock",
        "doc": "record what the selected variants produced in alloys/forge.lock.json",
        "actions": [(_guarded, [write_lock])],
        "file_dep": receipts,
        "verbosity": 2,
    }


def tasks(plan):
    yield toolchain_task(plan)
    groups = {}
    for step in plan.steps.values():
        groups.setdefault(step.basename, []).append(step)
    for basename, steps in groups.items():
        # A group task per stage (`doit quantize` runs every quantize step).
        yield {"basename": basename, "name": None, "doc": f"every {basename} step"}
        for step in steps:
            yield step_task(plan, step)
    yield lock_task(plan)
