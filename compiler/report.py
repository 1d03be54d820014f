"""What the terminal shows of a run: doit's console lines (`.  task` ran, `-- task` up to date),
each failure once with its reason and the path of its kept log, and at the end one line per
variant -- built, up to date, failed (where and why) or waiting (for which failed step) -- instead of
doit's cascade of UnmetDependency reports for everything downstream of a failure.

A doit reporter (doit's reporter interface, DOIT_CONFIG["reporter"]); dodo.py binds it to the plan.
"""
from __future__ import annotations

from doit.exceptions import UnmetDependency
from doit.reporter import ConsoleReporter

from .paths import build_dir


def kept_log(task: str):
    """The log execute.keep_failed_log keeps for a failed step, if there is one."""
    path = build_dir() / "logs" / (task.replace(":", "_").replace("/", "_") + ".failed.log")
    return path if path.is_file() else None


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _finish_pushes(write) -> None:
    """Pushes an earlier run left undone (killed mid-push, or the remote was down): completed at the
    end of any run that has a writable remote. Nothing pending: nothing asked, no network."""
    from . import remote

    if not remote.pending():
        return
    try:
        shared = remote.configured()
    except remote.RemoteError:
        return
    if shared is None or not shared.writable:
        return
    try:
        remote.push_pending(shared, say=lambda line: write(line + "\n"))
    except remote.RemoteError as e:
        write(f"  remote: {e}; left to push on the next run\n")


class ForgeReporter(ConsoleReporter):
    desc = "forge: each failure once, then a line per variant"
    plan = None  # set by reporter_for()

    def __init__(self, outstream, options):
        super().__init__(outstream, options)
        self.ran, self.current, self.failed, self.waiting = set(), set(), {}, set()

    def execute_task(self, task):
        self.ran.add(task.name)
        super().execute_task(task)

    def skip_uptodate(self, task):
        self.current.add(task.name)
        super().skip_uptodate(task)

    def add_failure(self, task, fail):
        if isinstance(fail, UnmetDependency):
            self.waiting.add(task.name)  # said once, in the summary: not a failure of its own
            return
        self.failed[task.name] = fail.get_msg().strip()
        log = kept_log(task.name)
        self.write(f"FAILED {task.name}: {self.failed[task.name]}\n" + (f"  log: {log}\n" if log else ""))

    def complete_run(self):
        super().complete_run()  # doit's own runtime errors, if any
        _finish_pushes(self.write)
        if self.plan is None or not (self.ran or self.current or self.failed or self.waiting):
            return
        lines = []
        for v in self.plan.variants:
            tasks = [s.task for s in v.steps.values()] + [f"lock:{v.id}"]
            failed = [t for t in tasks if t in self.failed]
            waiting = [t for t in tasks if t in self.waiting]
            if failed:
                log = kept_log(failed[0])
                why = first_line(self.failed[failed[0]]).removeprefix(f"{failed[0]}: ")
                state = (f"failed at {failed[0]}: {why}"
                         + (f" (log: {log})" if log else ""))
            elif waiting:
                upstream = sorted(self.failed) or ["a step that did not run"]
                state = f"waiting: {', '.join(waiting[:2])}{' ...' if len(waiting) > 2 else ''} for {', '.join(upstream)}"
            elif any(t in self.ran for t in tasks):
                state = f"built: {v.llama_type} for tier {v.config['tier']['name']} in build/variants/{v.id}"
            elif all(t in self.current for t in tasks):
                state = "up to date"
            else:
                continue  # not part of this run (another task was named)
            lines.append(f"  {v.id:<32} {state}")
        if lines:
            self.write("Variants:\n" + "\n".join(lines) + "\n")
        if "registry" in self.waiting:
            self._registry_after_failures()

    def _registry_after_failures(self):
        """doit held the registry back for the failures above; the lock holds every variant that did
        finish, so the registry is written from it now (a failed variant keeps the entry it had)."""
        from .errors import ForgeError
        from .tasks import write_registry

        try:
            write_registry(" (after the failures above: the variants that failed keep what the lock had)")
        except ForgeError as e:
            self.failed["registry"] = str(e)
            self.write(f"FAILED registry: {e}\n")


def reporter_for(plan) -> type:
    """The reporter class doit instantiates, bound to this run's plan."""
    return type("ForgeReporter", (ForgeReporter,), {"plan": plan})
