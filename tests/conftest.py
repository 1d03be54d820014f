"""Shared fixtures: a workspace is a build folder plus an alloys folder, both temporary, driven
through the real `doit` command line exactly as a user runs it (FORGE_BUILD_DIR and
FORGE_ALLOYS_DIR point the compiler at them; the toolchain cache in ~/.cache/forge is shared)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOIT = [sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "-d", str(ROOT)]
DEMO_ALLOY = ROOT / "alloys" / "demo.alloy.json"

# The published forge-alloy schema the recipes and receipts are checked against: CambrianTech/forge-alloy,
# schema/forge-alloy.schema.json at commit e5a8c8c, pinned by the sha256 of its bytes (the bytes are
# what is judged against; a URL alone would follow whatever the repository serves).
PUBLISHED_SCHEMA_SHA256 = "a235e7385b9ba97f51e1324c8253b8da5500f80fe1b89ac3555dec77d13d0700"
PUBLISHED_SCHEMA_URL = "https://raw.githubusercontent.com/CambrianTech/forge-alloy/e5a8c8c/schema/forge-alloy.schema.json"


def _sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


# Every forge step the tests' doit runs took, as (test, task, seconds): the session's summary adds
# them up per kind of step, so CI's log shows where the test budget goes beneath pytest's
# per-test durations (a training, a smoke or a conversion repeated across tests).
STEP_TIMES: list[tuple[str, str, float]] = []
DONE_IN = re.compile(r"^  (\S+?): done in ([0-9.]+) s$", re.M)


def _lowest_priority() -> None:
    """In the child, after setsid: nice 19, and where Linux groups a session's processes for the
    scheduler (autogroup), that group's nice too -- otherwise the new session gets an equal share
    against the tests' own, whatever its processes' nice values."""
    os.nice(19)
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write("19")
    except OSError:
        pass


class Background:
    """A slow command one test needs, started as the session starts (pytest_collection_finish) at
    the lowest CPU priority: it runs on what the other tests leave of the cores, and its test waits
    for what is left of it. Nothing it computes depends on its priority or on when it runs. (At an
    even share it was far slower, and so was everything beside it: torch's OpenMP threads and
    llama.cpp's thread pool each spin at their barriers, and two 2-thread jobs on 2 cores spend
    their slices waiting for each other -- a smoke that takes 5 s alone took over 45.)"""

    def __init__(self, args: list[str], env: dict, cwd: Path, root: Path):
        self.root, self.log = root, root / "background.log"
        self.started = time.monotonic()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                         preexec_fn=_lowest_priority, start_new_session=True)

    def wait(self, timeout: int) -> subprocess.CompletedProcess:
        rc = self.proc.wait(timeout=max(1, timeout - (time.monotonic() - self.started)))
        return subprocess.CompletedProcess(self.proc.args, rc, self.log.read_text(errors="replace"), "")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


BACKGROUND: dict[str, Background | None] = {}


def pytest_collection_modifyitems(session, config, items):
    # Tests that wait for a background job run last: the job has had the whole session's spare
    # cycles by then, and the wait is only for what is left of it. Otherwise in collection order.
    items.sort(key=lambda item: "background" in getattr(item, "fixturenames", ()))


def pytest_collection_finish(session):
    # A test module may offer `start_in_background(root) -> Background | None`: started once, here,
    # when one of its tests is selected; the `background` fixture hands it to them.
    if session.config.option.collectonly:
        return
    for item in session.items:
        module = getattr(item, "module", None)
        start = getattr(module, "start_in_background", None)
        if start and module.__name__ not in BACKGROUND:
            BACKGROUND[module.__name__] = start(Path(tempfile.mkdtemp(prefix=f"forge-{module.__name__}-")))


def pytest_sessionfinish(session):
    for job in BACKGROUND.values():
        if job is not None:
            job.stop()


@pytest.fixture
def background(request) -> Background | None:
    return BACKGROUND.get(request.module.__name__)


def pytest_terminal_summary(terminalreporter):
    if not STEP_TIMES:
        return
    by_kind: dict[str, list[float]] = {}
    by_test: dict[str, float] = {}
    for test, task, secs in STEP_TIMES:
        by_kind.setdefault(task.split(":", 1)[0], []).append(secs)
        by_test[test] = by_test.get(test, 0.0) + secs
    tr = terminalreporter
    tr.section("forge steps the tests ran, by kind")
    for kind, times in sorted(by_kind.items(), key=lambda kv: -sum(kv[1])):
        tr.write_line(f"{sum(times):8.1f} s  {len(times):4d} x  {kind}")
    tr.write_line(f"{sum(s for *_, s in STEP_TIMES):8.1f} s  in all; the tests spending most in steps:")
    for test, secs in sorted(by_test.items(), key=lambda kv: -kv[1])[:10]:
        tr.write_line(f"{secs:8.1f} s  {test}")


_FETCH_FAILED: list[str] = []  # one try per test session: offline, every test would wait out the timeout


def _fetch_published_schema(dest: Path) -> str | None:
    """Fetch the pinned schema into dest; None when done, else why not."""
    import urllib.request

    if _FETCH_FAILED:
        return _FETCH_FAILED[0]
    try:
        with urllib.request.urlopen(PUBLISHED_SCHEMA_URL, timeout=10) as r:
            data = r.read()
    except OSError as e:
        why = f"could not fetch {PUBLISHED_SCHEMA_URL}: {e}"
    else:
        if _sha256_bytes(data) == PUBLISHED_SCHEMA_SHA256:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, dest)
            return None
        why = f"{PUBLISHED_SCHEMA_URL} served bytes of sha256 {_sha256_bytes(data)}, not the pinned one"
    _FETCH_FAILED.append(why)
    return why


def published_schema_path() -> Path:
    """Where the pinned published schema is, in this order: FORGE_ALLOY_SCHEMA (a path a user sets),
    ../shared/reference/ beside the checkout (this workspace), a copy fetched earlier into the forge
    cache, or a fetch of the pinned commit now. Whatever is found must hash to the pin. Where it
    cannot be had (offline, no copy), the test is skipped with the reason -- unless
    FORGE_REQUIRE_PUBLISHED_SCHEMA=1 (CI here), where that is a failure."""
    from compiler.paths import cache_dir

    cached = cache_dir() / "reference" / f"forge-alloy.schema.{PUBLISHED_SCHEMA_SHA256[:16]}.json"
    candidates = [Path(p) for p in [os.environ.get("FORGE_ALLOY_SCHEMA")] if p] + [
        ROOT.parent / "shared" / "reference" / "forge-alloy.schema.json", cached]
    for path in candidates:
        if path.is_file():
            got = _sha256_bytes(path.read_bytes())
            assert got == PUBLISHED_SCHEMA_SHA256, (
                f"{path} is not the pinned published forge-alloy schema (sha256 {got}, pinned {PUBLISHED_SCHEMA_SHA256})")
            return path
    why = _fetch_published_schema(cached)
    if why is None:
        return cached
    reason = (f"the published forge-alloy schema is not available ({why}); set FORGE_ALLOY_SCHEMA to a copy "
              f"(sha256 {PUBLISHED_SCHEMA_SHA256})")
    if os.environ.get("FORGE_REQUIRE_PUBLISHED_SCHEMA") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


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

    def seed(self, store: Path, kinds: tuple[str, ...], build: Path | None = None) -> None:
        """Give this workspace's store the complete entries of these kinds from another store, as
        hard links: the forge then finds them "already in the store" (as a second checkout sharing a
        store would) instead of rebuilding them -- above all the demo's trained source, whose
        training is the one slow step and is exercised, once, by the session's demo_workspace. The
        links are safe because no test edits a file of a seeded entry in place."""
        for kind in kinds:
            for entry in sorted((store / kind).iterdir()) if (store / kind).is_dir() else []:
                if ".partial-" in entry.name or not (entry / "manifest.json").is_file():
                    continue
                dest = (build or self.build) / "store" / kind / entry.name
                if not dest.exists():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copytree(entry, dest, copy_function=os.link)

    def doit(self, *args: str, timeout: int = 1800, **env) -> Run:
        if self.stats_file.exists():
            self.stats_file.unlink()
        proc = subprocess.run(DOIT + list(args), capture_output=True, text=True, env=self.env(**env),
                              timeout=timeout, cwd=self.root)
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
        STEP_TIMES.extend((test, task, float(secs)) for task, secs in DONE_IN.findall(proc.stdout))
        stats = []
        if self.stats_file.exists():
            stats = [json.loads(line) for line in self.stats_file.read_text().splitlines() if line]
        return Run(proc, stats)

    def variant(self, name: str) -> Path:
        return self.build / "variants" / name

    def lock(self) -> dict:
        return json.loads((self.alloys / "forge.lock.json").read_text())


def python_json(args: list[str], timeout: int = 900, **kwargs) -> dict:
    """Run `python ARGS` (a module of ours, or -c code), which must succeed, and read the JSON object
    its stdout ends with (a report, keys, a plan)."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


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


# Per-source steps every alloy on the demo's source shares.
SEED_KINDS = ("synthetic", "validate", "convert", "mmproj", "imatrix", "kld-base", "image-fit")


@pytest.fixture(scope="session")
def demo_seed(demo_workspace, tmp_path_factory) -> Path:
    """A pristine store holding the session demo's trained source and what every alloy on it shares
    (conversions, the importance matrix, the reference logits, the static Q8_0 yardstick), linked
    copied (not linked) from its store: a test that corrupts a file of demo_workspace in place never
    reaches these. Only the kinds a workspace may take: what variants built later added is not copied."""
    seed = tmp_path_factory.mktemp("demo-seed")
    for kind in SEED_KINDS:
        if (demo_workspace.build / "store" / kind).is_dir():
            shutil.copytree(demo_workspace.build / "store" / kind, seed / kind,
                            ignore=shutil.ignore_patterns("*.partial-*"))
    return seed


# What a workspace on the demo's source takes from demo_seed by default: the trained checkpoint only;
# everything after it is built in the workspace, so its own tests still see conversion and quantization.
TRAINED_SOURCE = ("synthetic",)
