#!/usr/bin/env python3
"""Resolve requirements.in into requirements.txt: every package at an exact version.

Installs requirements.in into a fresh, throw-away venv (no system site-packages) and writes what pip
resolved, so the set-up installs the same versions on every machine until this is run again.

    python3 scripts/lock_requirements.py
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Installed by the set-up from the pinned llama.cpp archive, or part of the venv itself.
NOT_LOCKED = {"pip", "gguf", "llama-cpp-python", "llama_cpp_python"}


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        venv.create(tmp, with_pip=True)
        py = str(Path(tmp) / "bin" / "python")
        subprocess.run([py, "-m", "pip", "install", "-q", "-r", str(ROOT / "requirements.in")], check=True)
        frozen = subprocess.run([py, "-m", "pip", "freeze", "--all"], check=True, capture_output=True,
                                text=True).stdout.splitlines()
    pins = []
    for line in frozen:
        name, _, version = line.partition("==")
        if name.lower() in NOT_LOCKED:
            continue
        # A local build tag (torch's "+cpu") names where a wheel came from, not what it is.
        pins.append(f"{name}=={version.split('+')[0]}")
    head = ("# The full resolved set of Python packages, every one at an exact version. Generated from\n"
            "# requirements.in by `python3 scripts/lock_requirements.py`; edit requirements.in, not this.\n")
    (ROOT / "requirements.txt").write_text(head + "\n".join(sorted(pins, key=str.lower)) + "\n")
    print(f"requirements.txt: {len(pins)} packages", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
