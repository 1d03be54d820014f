"""Where things live. Everything the build writes is under build/ (or FORGE_BUILD_DIR); the
toolchain cache (the source archive, the binding's Python-only wheel, the compiled llama.cpp) is
keyed by content and shared between checkouts under FORGE_CACHE (default ~/.cache/forge)."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_DIR = ROOT / "schema"
VENDOR_DIR = ROOT / "vendor" / "llama.cpp"


def conf_dir() -> Path:
    return Path(os.environ.get("FORGE_CONF_DIR", ROOT / "conf"))


def alloys_dir() -> Path:
    return Path(os.environ.get("FORGE_ALLOYS_DIR", ROOT / "alloys"))


def build_dir() -> Path:
    return Path(os.environ.get("FORGE_BUILD_DIR", ROOT / "build"))


def store_dir() -> Path:
    return build_dir() / "store"


def variants_dir() -> Path:
    return build_dir() / "variants"


def state_dir() -> Path:
    return build_dir() / ".forge"


def cache_dir() -> Path:
    return Path(os.environ.get("FORGE_CACHE", Path.home() / ".cache" / "forge"))


def lock_path() -> Path:
    return alloys_dir() / "forge.lock.json"


def project_file(path: str) -> Path:
    """A project-owned input (calibration and held-out text): absolute, or relative to the root."""
    p = Path(path)
    return p if p.is_absolute() else ROOT / p


def keep_state(name: str, data) -> None:
    """Write a planning cache (JSON) into the build's state folder, atomically. Only into a build dir
    that exists: a command run without one (the merge job's registry check) leaves nothing behind.
    A cache that cannot be written (a read-only build dir) only costs the next run its work."""
    import json

    folder = state_dir()
    if not folder.parent.is_dir():
        return
    try:
        folder.mkdir(exist_ok=True)
        tmp = folder / f"{name}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(data, sort_keys=True))
        os.replace(tmp, folder / name)
    except OSError:
        pass
