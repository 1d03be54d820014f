"""The plan as doit tasks: small dicts, one per step, with the step's manifest as its target, the
input steps' manifests as file_dep (cheap to hash, and they order the graph), and an uptodate
check that the store entry is still sound (stat cache: no weights read on a no-op run)."""
from __future__ import annotations

from . import execute, lockfile
from .errors import ForgeError
from .store import Entry
from .toolchain import TOOLS, build_manifest, build_ready

TOOL_KINDS = {"quantize", "mmproj-quantize", "imatrix", "kld-base", "kld-q8", "gate", "receipt"}


def _guarded(fn, *args):
    try:
        fn(*args)
    except ForgeError as e:
        return execute.fail(e)
    return None


def toolchain_task(plan) -> dict:
    """The compiled llama.cpp. scripts/bootstrap.py builds it; this task finds it ready, or (after a
    compiler change, or a cleaned cache) compiles it again and puts its libraries under the binding."""
    from .toolchain import binding_current, build_key, rebuild_for_binding

    return {
        "basename": "toolchain",
        "doc": f"{', '.join(TOOLS)} and the binding's libraries from vendor/llama.cpp (build {build_key()})",
        "actions": [(_guarded, [rebuild_for_binding])],
        "targets": [str(build_manifest())],
        # Ready, and this venv's binding loads that same build (another clone sharing FORGE_CACHE may
        # have compiled a new key).
        "uptodate": [lambda task, values: build_ready() and binding_current()],
        "verbosity": 2,
    }


def step_task(plan, step) -> dict:
    out = Entry(step.kind, step.key)
    deps = [str(Entry(plan.steps[t].kind, plan.steps[t].key).manifest_path)
            for t in [t for _, t in step.inputs] + list(step.after)]
    if step.kind in TOOL_KINDS:
        deps.append(str(build_manifest()))
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
        # One task owns each store entry (doit allows one task per target); a plan's own step that
        # a variant's step also makes (plan.Step.shared_with) runs after it and finds it there.
        "targets": [] if step.shared_with else [str(out.manifest_path)],
        "task_dep": [step.shared_with] if step.shared_with else [],
        "uptodate": uptodate,
        "verbosity": 2,
    }


def lock_task(plan, variant, record_experiments: bool = False) -> dict:
    """One lock task per variant, depending on that variant's receipt alone, so that which other
    variants a command line selects never makes it stale. Up to date only while its lock file holds
    exactly what the receipt and reports say (a lock edited or reverted by git is rewritten).
    Declared variants go to the committed lock; experiments (overrides) to build/ unless lock=1."""
    receipt = Entry(variant.steps["receipt"].kind, variant.steps["receipt"].key)
    path = lockfile.path_for(variant, record_experiments)

    def write_lock():
        path, changed = lockfile.update(plan, [variant], record_experiments)
        print(f"  lock:{variant.id}: {'updated' if changed else 'unchanged'} in {path}")
        elsewhere = lockfile.committed_class_elsewhere(variant)
        if elsewhere:
            print(f"  lock:{variant.id}: the committed lock holds {elsewhere}'s hashes for {variant.id}; this machine "
                  f"trains {lockfile.platform_class(variant)}'s fixture: recorded under build/, the committed lock "
                  f"left as it is (`doit verify` here has no reference for this class)")
        elif path != lockfile.lock_path():
            print(f"  lock:{variant.id}: an experiment (overrides {', '.join(variant.overrides)}): recorded under "
                  f"build/, not in the committed lock (declare it in the alloy, or pass lock=1)")
        for line in execute.describe(plan, variant):
            print("  " + line)

    return {
        "basename": "lock",
        "name": variant.id,
        "doc": f"record what {variant.id} produced in {path.name}",
        "actions": [(_guarded, [write_lock])],
        "file_dep": [str(receipt.manifest_path)],
        "uptodate": [lambda task, values: lockfile.recorded(plan, variant, record_experiments)],
        "verbosity": 2,
    }


def write_registry(why: str = "") -> None:
    """Regenerate the registry and the catalog from the alloys, conf/ and the lock, saying so."""
    from . import registry

    changed = registry.write(registry.build())
    print(f"  registry: {registry.registry_path()} and {registry.catalog_path().name} "
          f"{'updated' if changed else 'unchanged'}{why}")


def registry_task(plan) -> dict:
    """Regenerate model_registry.json from the alloys, conf/ and the lock, after the lock tasks; up
    to date when the file already holds exactly what would be generated (no weights read). Where a
    variant failed, doit holds this task back (its dependencies did not all succeed); the reporter
    then writes it at the end of the run (report.ForgeReporter.complete_run), so one alloy's failure
    never leaves the others' entries stale."""
    from . import registry

    def current(task, values):
        try:
            return registry.current(registry.build())
        except ForgeError:
            return False  # the action reports it

    def write():
        write_registry()

    return {
        "basename": "registry",
        "doc": "regenerate model_registry.json and model_catalog.json from the alloys, conf/ and the lock",
        "actions": [(_guarded, [write])],
        "task_dep": ["receipt", "envelope", "lock"],
        "uptodate": [current],
        "verbosity": 2,
    }


def build_task_names(plan) -> list[str]:
    """What a plain `doit` runs: the toolchain, every stage group, the lock and the registry."""
    return ["toolchain", *dict.fromkeys(s.basename for s in plan.steps.values()), "lock", "registry"]


def verify_task(cli_vars: dict) -> dict:
    def action():
        from doit.exceptions import TaskFailed

        from . import verify

        try:
            code = verify.run({k: v for k, v in cli_vars.items() if k != "keep"},
                              keep=cli_vars.get("keep", "") not in ("", "0", "false"))
        except ForgeError as e:
            return TaskFailed(str(e))
        if code == verify.NO_REFERENCE:
            # doit ends a failed task with its own status 1; `python -m compiler.verify` gives this
            # outcome its own (3).
            return TaskFailed("verify: no reference for this platform class in the lock (report above); "
                              "nothing found different, nothing claimed identical")
        return None if code == 0 else TaskFailed("verify: the rebuild differs from the lock (report above)")

    return {"basename": "verify", "doc": "rebuild the locked variants (alloy=/tier= to choose) in a fresh "
            "build dir and compare every output with the lock", "actions": [action], "uptodate": [False],
            "verbosity": 2}


def publish_task(plan, push: bool) -> dict:
    def action():
        from doit.exceptions import TaskFailed

        from . import publish

        try:
            code = publish.run(plan, push=push)
        except ForgeError as e:
            return TaskFailed(str(e))
        return None if code == 0 else TaskFailed("publish: refused or failed (reasons above)")

    return {"basename": "publish", "doc": "stage each selected variant's Hub repo folder; a dry run unless push=1",
            "actions": [action], "uptodate": [False], "verbosity": 2}


def check_cache_task() -> dict:
    def action():
        from doit.exceptions import TaskFailed

        from . import cachecheck

        return None if cachecheck.run() == 0 else TaskFailed("check-cache: damaged entries moved aside (above)")

    return {"basename": "check-cache", "doc": "hash every artifact in build/store against its manifest; "
            "move damaged ones aside so the next doit rebuilds them", "actions": [action],
            "uptodate": [False], "verbosity": 2}


def push_task(plan) -> dict:
    """`doit push`: every complete store entry of the selected variants to the remote cache (a machine
    that built before a remote was configured, or whose pushes were cut), files first, records last."""
    def action():
        from doit.exceptions import TaskFailed

        from . import remote

        try:
            shared = remote.configured()
        except remote.RemoteError as e:
            return TaskFailed(str(e))
        if shared is None:
            return TaskFailed("push: no remote cache is configured (FORGE_REMOTE=<url> or doit remote=<url>)")
        if not shared.writable:
            return TaskFailed(f"push: the remote cache {shared.name} is read-only here (FORGE_REMOTE_READONLY)")
        counts: dict = {}
        try:
            for step in plan.steps.values():
                out = Entry(step.kind, step.key)
                if out.kind in remote.NOT_CACHED or not out.is_complete():
                    continue
                result = remote.push(shared, out, step.task, toolchain=plan.toolchain)
                counts[result] = counts.get(result, 0) + 1
            for result, n in remote.push_pending(shared).items():
                counts[result] = counts.get(result, 0) + n
        except remote.RemoteError as e:
            return TaskFailed(f"push: {e} (what was pushed stays; `doit push` again completes it)")
        print(f"  push: {shared.name}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
        return TaskFailed("push: reproducibility conflicts (above)") if counts.get("conflict") else None

    return {"basename": "push", "doc": "push the selected variants' store entries to the remote cache (FORGE_REMOTE)",
            "actions": [action], "uptodate": [False], "verbosity": 2}


def tasks(plan, record_experiments: bool = False):
    yield toolchain_task(plan)
    groups = {}
    for step in plan.steps.values():
        groups.setdefault(step.basename, []).append(step)
    for basename, steps in groups.items():
        # A group task per stage (`doit quantize` runs every quantize step).
        yield {"basename": basename, "name": None, "doc": f"every {basename} step"}
        for step in steps:
            yield step_task(plan, step)
    yield {"basename": "lock", "name": None, "doc": "record every selected variant in the lock"}
    for variant in plan.variants:
        yield lock_task(plan, variant, record_experiments)
    yield registry_task(plan)
