"""A step's log: every line of every tool goes to the log file kept beside the step's outputs;
the console gets the lines a person follows (what is running, how far along, what went wrong)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from .errors import ForgeError

# tqdm ("Writing:  45%|...") and llama-quantize ("[  12/ 55] blk.0...") progress lines.
_PCT = re.compile(r"(\d{1,3})%\|")
_FRACTION = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")


def _console_line(text: str) -> None:
    # One write per line: print() writes the text and its newline separately, and doit's own
    # ".  task" line, written from another thread between the two, then joined this line (seen in CI).
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class StepLog:
    def __init__(self, path: Path, task: str, echo=None):
        self.path = Path(path)
        self.task = task
        self.echo = echo or _console_line
        self.file = open(self.path, "a", encoding="utf-8", errors="replace")
        self.started = time.monotonic()
        self._tail: list[str] = []
        self.peak_rss_mib = 0.0  # the largest tool process this step ran (its own high-water mark)

    def __call__(self, message: str) -> None:
        """A line for both the log and the console."""
        self.write(message)
        self.echo(f"  {self.task}: {message}")

    def write(self, line: str) -> None:
        self.file.write(line + "\n")
        self._tail = (self._tail + [line])[-40:]

    def tail(self, n: int = 25) -> str:
        return "\n".join(self._tail[-n:])

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:  # a full disk: what could not be flushed is lost, the step's own error is not
            pass

    def run(self, cmd: list, what: str, env: dict | None = None, cwd: Path | None = None) -> str:
        """Run a tool, logging all its output and echoing its progress every 10%; returns the output."""
        self.write("$ " + " ".join(str(c) for c in cmd))
        self(what)
        full_env = dict(os.environ, **(env or {}))
        try:
            proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, errors="replace", env=full_env, cwd=cwd)
        except OSError as e:
            raise ForgeError(f"could not start {cmd[0]}: {e}", where=self.task) from None
        shown = -1
        lines = []
        watch = _PeakWatch(proc.pid, str(cmd[0]))
        assert proc.stdout is not None
        for raw in proc.stdout:  # universal newlines: tqdm's \r updates arrive as lines
            line = raw.rstrip()
            if not line:
                continue
            self.write(line)
            lines.append(line)
            pct = None
            m = _PCT.search(line)
            if m:
                pct = int(m.group(1))
            else:
                m = _FRACTION.match(line)
                if m and int(m.group(2)):
                    pct = 100 * int(m.group(1)) // int(m.group(2))
            if pct is not None and pct // 10 > shown // 10:
                shown = pct
                self.echo(f"  {self.task}: {what} {pct}%")
        code = proc.wait()
        self.peak_rss_mib = max(self.peak_rss_mib, watch.stop())
        if code != 0:
            raise ForgeError(
                f"{Path(str(cmd[0])).name} failed with exit code {code} while trying to {what}",
                where=self.task, found="last lines of its output:\n" + self.tail(15),
                hint=f"full log: {self.path}",
            )
        return "\n".join(lines)


class _PeakWatch:
    """The peak resident memory of one tool process, so a step can report it beside the bare
    tool's. Linux's VmHWM (reset at exec, unlike the child's ru_maxrss, which keeps the pre-exec
    copy of a large parent) read every 0.2 s: a high-water mark only grows, so only a peak in the
    last 0.2 s before exit can be missed. 0.0 where /proc is not there (macOS)."""

    def __init__(self, pid: int, argv0: str):
        import threading

        self.path, self.peak, self.done = f"/proc/{pid}/status", 0.0, threading.Event()
        self.cmdline, self.argv0, self.execed = f"/proc/{pid}/cmdline", argv0.encode(), False
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while True:
            try:
                # Before exec the child is a copy of this (large) process: not the tool's memory.
                if not self.execed:
                    with open(self.cmdline, "rb") as f:
                        self.execed = f.read().split(b"\0", 1)[0] == self.argv0
                if self.execed:
                    with open(self.path) as f:
                        for line in f:
                            if line.startswith("VmHWM:"):
                                self.peak = max(self.peak, int(line.split()[1]) / 1024)
            except (OSError, ValueError):
                return
            if self.done.wait(0.2 if self.execed else 0.01):
                return

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return round(self.peak, 1)


def python() -> str:
    return sys.executable


def run_json(module_args: list, log: StepLog, failure: str, where: str) -> dict:
    """Run `python -m MODULE ARGS...` whose stdout's last line is one JSON object (the measuring and
    smoke processes): its stderr goes to the step's log, a crash to a ForgeError with its tail."""
    import json

    proc = subprocess.run([sys.executable, "-m", *[str(a) for a in module_args]], capture_output=True, text=True)
    log.write(proc.stderr[-20000:])
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise ForgeError(failure, where=where, found=proc.stderr[-1500:]) from None
