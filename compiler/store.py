"""The content-addressed store: build/store/<kind>/<key>/ holds one step's outputs and manifest.

A step writes into a fresh `<key>.partial-*` folder and renames it into place when every output
and the manifest are written, so a killed build leaves nothing that looks finished (DESIGN.md rule
3). Files are hashed once, when written; afterwards a stat cache (size, mtime, inode) answers
"is it still what the manifest says?" without reading weights (rule 4). The counters below show it:
a no-op run hashes zero bytes.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import ForgeError
from .paths import state_dir, store_dir
from .toolchain import sha256_file as _sha256

MANIFEST = "manifest.json"
COUNTERS = {"hashed_bytes": 0, "hashed_files": 0, "stat_hits": 0}
_lock = threading.RLock()


def sha256_file(path: Path) -> str:
    """toolchain's sha256 of a file, counted: every byte this process hashes shows in COUNTERS."""
    digest = _sha256(path)
    with _lock:
        COUNTERS["hashed_bytes"] += Path(path).stat().st_size
        COUNTERS["hashed_files"] += 1
    return digest


def _stat_key(st: os.stat_result) -> list:
    return [st.st_size, st.st_mtime_ns, st.st_ino]


class StatCache:
    """path -> (size, mtime_ns, inode, sha256), persisted in build/.forge/statcache.json."""

    def __init__(self, path: Path):
        self.path = path
        self.dirty = False
        # What this process learnt since it read the file: a save merges only these into what is
        # on disk then, so a process that read the cache early (doit's parent, checking a task's
        # entry at the end of a run) never drops what another one (the child running the steps,
        # a second doit on the same build dir) saved meanwhile.
        self.learnt: set[str] = set()
        self.entries = self._read()

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def sha256(self, file: Path) -> str:
        file = Path(file)
        st = file.stat()
        key = str(file.resolve())
        with _lock:
            hit = self.entries.get(key)
        if hit and hit[:3] == _stat_key(st):
            with _lock:
                COUNTERS["stat_hits"] += 1
            return hit[3]
        digest = sha256_file(file)
        with _lock:
            self.entries[key] = _stat_key(st) + [digest]
            self.learnt.add(key)
            self.dirty = True
        return digest

    def remember(self, file: Path, digest: str) -> None:
        with _lock:
            key = str(Path(file).resolve())
            self.entries[key] = _stat_key(Path(file).stat()) + [digest]
            self.learnt.add(key)
            self.dirty = True

    def save(self) -> None:
        # Steps run side by side in threads of one process (doit -n): one writer at a time.
        with _lock:
            # A command run without a build dir (the merge job's registry check) leaves none behind.
            if not self.dirty or not self.path.parent.parent.is_dir():
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            merged = self._read()
            merged.update({k: self.entries[k] for k in self.learnt})
            self.entries = merged
            tmp = self.path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
            tmp.write_text(json.dumps(merged, sort_keys=True))
            os.replace(tmp, self.path)
            self.learnt.clear()
            self.dirty = False


_STAT_CACHE: StatCache | None = None


def stat_cache() -> StatCache:
    global _STAT_CACHE
    want = state_dir() / "statcache.json"
    if _STAT_CACHE is None or _STAT_CACHE.path != want:
        _STAT_CACHE = StatCache(want)
    return _STAT_CACHE


def _write_run_stats() -> None:
    """Leave this process's counters where a person (or a test) can read them."""
    try:
        if _STAT_CACHE is not None:
            _STAT_CACHE.save()
        if os.environ.get("FORGE_STATS"):
            with open(os.environ["FORGE_STATS"], "a") as f:
                f.write(json.dumps(COUNTERS, sort_keys=True) + "\n")
    except OSError:
        pass


atexit.register(_write_run_stats)


@dataclass(frozen=True)
class Entry:
    kind: str
    key: str

    @property
    def dir(self) -> Path:
        return store_dir() / self.kind / self.key

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    def manifest(self) -> dict:
        return json.loads(self.manifest_path.read_text())

    def file(self, name: str) -> Path:
        return self.dir / name

    def output(self) -> Path:
        """The step's (first) output file, as its manifest lists it."""
        return self.file(self.manifest()["files"][0]["filename"])

    def is_complete(self) -> bool:
        """The manifest exists and every output still has its recorded size and hash: size plus
        the stat cache (a file whose size, mtime and inode are unchanged is not read again)."""
        try:
            manifest = self.manifest()
        except (OSError, ValueError):
            return False
        cache = stat_cache()
        for f in manifest.get("files", []):
            path = self.dir / f["filename"]
            try:
                if path.stat().st_size != f["size"]:
                    return False
            except OSError:
                return False
            if cache.sha256(path) != f["sha256"]:
                return False
        return True


class Writer:
    """Collects one step's outputs in a partial folder and commits them atomically.

        with Writer(entry, params=..., inputs=...) as w:
            run_tool(output=w.path("model-Q4_K_M.gguf"))
        # renamed into place with its manifest, or removed if the body raised
    """

    def __init__(self, entry: Entry, params: dict, inputs: dict):
        self.entry = entry
        self.params = params
        self.inputs = inputs
        self.extra: dict = {}
        # filename -> sha256 a stage already verified while writing (a 55 GB download is hashed as it
        # streams in, not read a second time here).
        self.known: dict = {}
        self.tmp: Path | None = None

    def __enter__(self) -> "Writer":
        parent = self.entry.dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        # Leftovers of a killed run of this same step are garbage: remove them first.
        for stale in parent.glob(self.entry.key + ".partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=self.entry.key + ".partial-", dir=parent))
        return self

    def path(self, name: str) -> Path:
        assert self.tmp is not None
        return self.tmp / name

    def __exit__(self, exc_type, exc, tb):
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        files = []
        cache = stat_cache()
        for p in sorted(self.tmp.iterdir()):
            if p.name == MANIFEST or not p.is_file() or p.name.endswith(".log"):
                continue
            digest = self.known.get(p.name) or sha256_file(p)
            files.append({"filename": p.name, "sha256": digest, "size": p.stat().st_size})
        manifest = {"kind": self.entry.kind, "key": self.entry.key, "params": self.params,
                    "inputs": self.inputs, "files": files, **self.extra}
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if self.entry.dir.exists():
            # Only reached when a previous entry failed its check: replace it as a whole.
            shutil.rmtree(self.entry.dir)
        os.replace(self.tmp, self.entry.dir)
        for f in files:
            cache.remember(self.entry.dir / f["filename"], f["sha256"])
        cache.save()
        return False


def require(entry: Entry, what: str) -> dict:
    """The manifest of an input step, refusing to use an entry that is not sound."""
    if not entry.is_complete():
        raise ForgeError(f"{what} is missing or damaged in the store", where=str(entry.dir),
                         hint="rerun `doit`; it rebuilds what is damaged")
    return entry.manifest()
