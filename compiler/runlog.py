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


class StepLog:
    def __init__(self, path: Path, task: str, echo=None):
        self.path = Path(path)
        self.task = task
        self.echo = echo or (lambda s: print(s, flush=True))
        self.file = open(self.path, "a", encoding="utf-8", errors="replace")
        self.started = time.monotonic()
        self._tail: list[str] = []

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
        self.file.close()

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
        if code != 0:
            raise ForgeError(
                f"{Path(str(cmd[0])).name} failed with exit code {code} while trying to {what}",
                where=self.task, found="last lines of its output:\n" + self.tail(15),
                hint=f"full log: {self.path}",
            )
        return "\n".join(lines)


def python() -> str:
    return sys.executable
