"""The lock (alloys/forge.lock.json): the committed record of what each variant's build produced --
resolved source revision and file hashes, toolchain fingerprint, every output's filename, sha256
and size. Written from receipts and manifests (no weights read); entries of variants not in this
run are kept as they were."""
from __future__ import annotations

import json
import os

from .alloy import validate
from .paths import lock_path
from .store import Entry
from .toolchain import fingerprint_parts


def entry_for(plan, variant) -> dict:
    src_step = variant.steps["source"]
    src = Entry(src_step.kind, src_step.key).manifest()
    alloy = variant.alloy
    rec = Entry(variant.steps["receipt"].kind, variant.steps["receipt"].key)
    results = json.loads(rec.file(f"{alloy.name}.alloy.json").read_text())["results"]
    if "localFiles" in src:
        files = [{"filename": k, "sha256": v, "size": os.path.getsize(os.path.join(src["path"], k))}
                 for k, v in sorted(src["localFiles"].items())]
    else:
        files = sorted(src["files"], key=lambda f: f["filename"])
    return {
        "alloy": alloy.name,
        "alloyHash": alloy.alloy_hash,
        "overrides": variant.overrides,
        "tier": variant.config["tier"]["name"],
        "quant": variant.llama_type,
        "source": {"kind": src_step.kind, "baseModel": alloy.source["baseModel"],
                   "revision": alloy.source["revision"], "resolvedRevision": src.get("resolvedRevision"),
                   "files": files},
        "toolchain": {"fingerprint": plan.toolchain, **fingerprint_parts()},
        "keys": {role: s.key for role, s in variant.steps.items() if role != "envelope"},
        "outputs": results["integrity"]["fileHashes"],
        "modelHash": results["integrity"]["modelHash"],
    }


def read() -> dict:
    path = lock_path()
    if not path.is_file():
        return {"lockVersion": 1, "variants": {}}
    data = json.loads(path.read_text())
    validate(data, "lock.schema.json", str(path))
    return data


def update(plan, variants) -> tuple[dict, bool]:
    """Merge these finished variants into the lock; returns (lock, changed)."""
    lock = read()
    before = json.dumps(lock, sort_keys=True)
    for v in variants:
        if Entry(v.steps["receipt"].kind, v.steps["receipt"].key).is_complete():
            lock["variants"][v.id] = entry_for(plan, v)
    lock["variants"] = dict(sorted(lock["variants"].items()))
    validate(lock, "lock.schema.json", str(lock_path()))
    changed = json.dumps(lock, sort_keys=True) != before
    if changed:
        path = lock_path()
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    return lock, changed
