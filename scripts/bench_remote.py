#!/usr/bin/env python3
"""The demo on a second machine with a warm remote cache, against the same demo from nothing.

Machine A builds the demo from nothing (training included) with a `file://` remote configured, so
each step is pushed as it is built; machine B (another build dir, an empty store, the same
toolchain cache) then runs `doit alloy=demo` against that remote and restores every step. Prints a
table: wall time, steps run, steps restored, bytes moved. Not a test: a figure for the README.

    .venv/bin/python scripts/bench_remote.py [--keep DIR]
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def doit(build: Path, root: Path, name: str, remote: str) -> tuple[float, str]:
    env = dict(os.environ, FORGE_BUILD_DIR=str(build), FORGE_REGISTRY=str(root / f"{name}-registry.json"),
               FORGE_MACHINE_NAME=name, FORGE_REMOTE=remote, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "-d", str(ROOT), "alloy=demo"],
                          env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        sys.exit(f"{name}: doit failed\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return wall, proc.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", help="work in this folder and keep it")
    args = ap.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="forge-bench-remote-"))
    root.mkdir(parents=True, exist_ok=True)
    remote = root / "remote"
    url = remote.as_uri()
    try:
        rows = []
        for name in ("machine-a", "machine-b"):
            build = root / name
            shutil.rmtree(build, ignore_errors=True)
            wall, out = doit(build, root, name, url)
            ran = re.findall(r"^  (\S+): done in", out, re.M)
            restored = re.findall(r"^  (\S+): restored from the remote cache", out, re.M)
            # What went over the wire: A's uploads, B's downloads.
            mib = sum(float(n) / (1 if unit == "MiB" else 1024)
                      for n, unit in re.findall(r"([0-9.]+) (MiB|KiB) (?:uploaded|transferred)", out))
            rows.append((name, "from nothing, pushing" if name == "machine-a" else "warm remote, empty store",
                         wall, len(ran), len(restored), mib))
        cpu = platform.processor() or platform.machine()
        print(f"demo (alloy=demo), remote {url}; {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}")
        print(f"| machine   | run                      | wall (s) | steps run | steps restored | MiB moved |")
        print(f"|-----------|--------------------------|---------:|----------:|---------------:|----------:|")
        for name, what, wall, n_ran, n_rest, mib in rows:
            print(f"| {name} | {what:<24} | {wall:8.1f} | {n_ran:9d} | {n_rest:14d} | {mib:9.1f} |")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
