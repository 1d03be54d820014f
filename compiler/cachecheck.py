"""`doit check-cache`: every artifact in build/store read in full and hashed against its manifest.

The normal run trusts a file whose size, mtime and inode are unchanged (the stat cache), which is
what keeps a no-op run at zero bytes read; a byte flipped in place with its mtime restored (bit
rot, a careless tool) slips past that. This reads everything. A damaged entry is moved, whole, to
build/store/.damaged/ -- kept for inspection, never used -- so the next `doit` rebuilds it and
nothing downstream or published can take it.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .paths import store_dir
from .store import MANIFEST, sha256_file, stat_cache


def check_entry(entry: Path) -> list[str]:
    """Problems of one store entry (empty when sound)."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return [f"manifest unreadable: {type(e).__name__}"]
    problems = []
    for f in manifest.get("files", []):
        path = entry / f["filename"]
        if not path.is_file():
            problems.append(f"{f['filename']}: missing")
            continue
        size = path.stat().st_size
        if size != f["size"]:
            problems.append(f"{f['filename']}: {size} bytes, manifest says {f['size']} (truncated or grown)")
            continue
        got = sha256_file(path)
        if got != f["sha256"]:
            problems.append(f"{f['filename']}: sha256 {got[:16]}..., manifest says {f['sha256'][:16]}...")
    return problems


def run(quarantine: bool = True) -> int:
    store = store_dir()
    damaged, checked, nbytes, leftovers = [], 0, 0, []
    t0 = time.monotonic()
    for kind in sorted(p for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")) if store.is_dir() else []:
        for entry in sorted(p for p in kind.iterdir() if p.is_dir()):
            if ".partial-" in entry.name:
                leftovers.append(entry)
                continue
            checked += 1
            nbytes += sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
            problems = check_entry(entry)
            if problems:
                damaged.append((entry, problems))
    cache = stat_cache()
    for entry, problems in damaged:
        print(f"DAMAGED {entry.parent.name}/{entry.name}")
        for p in problems:
            print(f"  {p}")
        if quarantine:
            dest = store / ".damaged" / f"{entry.parent.name}-{entry.name}-{time.strftime('%Y%m%dT%H%M%S')}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(entry), str(dest))
            for f in list(cache.entries):
                if f.startswith(str(entry.resolve()) + "/"):
                    del cache.entries[f]
                    cache.dirty = True
            print(f"  moved to {dest}; the next `doit` rebuilds it")
    cache.save()
    for p in leftovers:
        print(f"leftover of a killed step (ignored, removed when that step next runs): {p}")
    print(f"check-cache: {checked} entries, {nbytes / 2**20:.1f} MiB read in {time.monotonic() - t0:.1f} s; "
          f"{len(damaged)} damaged")
    return 1 if damaged else 0
