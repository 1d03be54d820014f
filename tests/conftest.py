"""Shared fixtures: a workspace is a build folder plus an alloys folder, both temporary, driven
through the real `doit` command line exactly as a user runs it (FORGE_BUILD_DIR and
FORGE_ALLOYS_DIR point the compiler at them; the toolchain cache in ~/.cache/forge is shared)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOIT = [sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "-d", str(ROOT)]
DEMO_ALLOY = ROOT / "alloys" / "demo.alloy.json"


@dataclass
class Run:
    proc: subprocess.CompletedProcess
    stats: list

    @property
    def out(self) -> str:
        return self.proc.stdout + self.proc.stderr

    @property
    def executed(self) -> set:
        """Tasks doit ran (`.  name`), as opposed to those up to date (`-- name`)."""
        return set(re.findall(r"^\.  (\S+)", self.proc.stdout, re.M))

    @property
    def skipped(self) -> set:
        return set(re.findall(r"^-- (\S+)", self.proc.stdout, re.M))


class Workspace:
    def __init__(self, root: Path):
        self.root = root
        self.build = root / "build"
        self.alloys = root / "alloys"
        self.alloys.mkdir(parents=True, exist_ok=True)
        self.stats_file = root / "stats.jsonl"
        # A private copy of conf/, so a test can change a figure the way a person edits it.
        self.conf = root / "conf"
        if not self.conf.exists():
            shutil.copytree(ROOT / "conf", self.conf)
            # The demo is synthetic: let its variants into this workspace's registry.
            cfg = self.conf / "config.yaml"
            cfg.write_text(cfg.read_text().replace("include_synthetic: false", "include_synthetic: true")
                           .replace("allow_synthetic: false", "allow_synthetic: true"))
        self.registry = root / "model_registry.json"

    def env(self, **extra) -> dict:
        env = dict(os.environ, FORGE_BUILD_DIR=str(self.build), FORGE_ALLOYS_DIR=str(self.alloys),
                   FORGE_STATS=str(self.stats_file), FORGE_CONF_DIR=str(self.conf), FORGE_REGISTRY=str(self.registry), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        env.update(extra)
        return env

    def add_alloy(self, name: str, **changes) -> Path:
        data = json.loads(DEMO_ALLOY.read_text())
        data["name"] = name
        for key, value in changes.items():
            if key == "quant":
                next(s for s in data["stages"] if s["type"] == "quant")["quantTypes"] = [value]
            else:
                data[key] = value
        path = self.alloys / f"{name}.alloy.json"
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    def doit(self, *args: str, timeout: int = 1800, **env) -> Run:
        if self.stats_file.exists():
            self.stats_file.unlink()
        proc = subprocess.run(DOIT + list(args), capture_output=True, text=True, env=self.env(**env),
                              timeout=timeout, cwd=self.root)
        stats = []
        if self.stats_file.exists():
            stats = [json.loads(line) for line in self.stats_file.read_text().splitlines() if line]
        return Run(proc, stats)

    def variant(self, name: str) -> Path:
        return self.build / "variants" / name

    def lock(self) -> dict:
        return json.loads((self.alloys / "forge.lock.json").read_text())


def assert_ok(run: Run) -> None:
    assert run.proc.returncode == 0, run.out[-6000:]


@pytest.fixture(scope="session")
def demo_workspace(tmp_path_factory) -> Workspace:
    """The demo alloy plus a second alloy on the same source at Q8_0, built once for the session."""
    ws = Workspace(tmp_path_factory.mktemp("demo"))
    shutil.copy(DEMO_ALLOY, ws.alloys / DEMO_ALLOY.name)
    ws.add_alloy("demo-q8", quant="Q8_0")
    run = ws.doit()
    assert_ok(run)
    ws.first_run = run
    return ws
