"""The lock (alloys/forge.lock.json): the committed record of what each *declared* variant's build
produced -- resolved source revision and file hashes, toolchain fingerprint, every output's filename,
sha256 and size -- and what it was checked against: the memory envelope's figures and the backend
the smoke really ran on. The registry is regenerated from this file alone (the merge job has no
build/). Written from receipts and reports (no weights read); entries of variants not in this run
are kept as they were.

Declared variants are those an alloy names (each of its quantTypes, no command-line overrides). A
variant built with overrides is an experiment: its record goes to build/experiments.lock.json and
never touches the committed lock, unless the command line says `lock=1`.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from .alloy import canonical_json, validate
from .errors import ForgeError
from .paths import alloys_dir, build_dir, lock_path
from .store import Entry
from .toolchain import fingerprint_parts


def is_declared(variant) -> bool:
    return not variant.overrides


def experiments_path() -> Path:
    return build_dir() / "experiments.lock.json"


def platform_class(variant) -> str | None:
    """The CPU kernel class a trained source's bytes belong to (None for any other source)."""
    return variant.steps["source"].params.get("train", {}).get("platformClass")


def other_class(variant, entry: dict | None) -> dict | None:
    """{"lock": the class a lock entry's hashes hold for, "here": the class this machine trains}, where
    the two differ: the entry is then no reference for this machine's bytes (None otherwise, and for
    a source that is not trained)."""
    here, there = platform_class(variant), (entry or {}).get("source", {}).get("platformClass")
    return {"lock": there, "here": here} if here and there and here != there else None


def committed_class_elsewhere(variant) -> str | None:
    """The platform class the committed lock records this variant for, where it is another than the
    one this machine trains: those hashes are no reference here, and this build must not replace them."""
    if platform_class(variant) is None:
        return None
    try:
        entry = read(lock_path())["variants"].get(variant.id)
    except (OSError, ValueError, ForgeError):
        return None
    other = other_class(variant, entry)
    return other["lock"] if other else None


def path_for(variant, record_experiments: bool = False) -> Path:
    if committed_class_elsewhere(variant):
        return experiments_path()
    return lock_path() if is_declared(variant) or record_experiments else experiments_path()


@contextmanager
def exclusive(path: Path):
    """Hold an OS file lock for a read-modify-write of `path`: two runs on one checkout each add
    their entries instead of the last one's write dropping the other's, whatever build dirs they
    use. The lock file sits beside the guarded file, hidden and ignored by git (`.<name>.lock`)."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / f".{path.name}.lock")):
        yield


ENVELOPE_CONFIG = ("tier", "backend", "sensory")


def config_digest(cfg: dict) -> str:
    """sha256 of the configuration an envelope was checked at (tier, backend, sensory stack): the
    registry lists a locked variant only while conf/ still says the same."""
    import hashlib

    return hashlib.sha256(canonical_json({k: cfg[k] for k in ENVELOPE_CONFIG})).hexdigest()


def envelope_summary(report: dict, cfg: dict) -> dict:
    """What the registry needs of the envelope report: settings, terms, verdict totals."""
    v = report["verdict"]
    return {"config_sha256": config_digest(cfg),
            "n_ctx": report["runtime"]["n_ctx"], "n_seq_max": report["runtime"]["n_seq_max"],
            "terms": {t["id"]: t["bytes"] for t in report["terms"]},
            "total_bytes": v["total_bytes"], "sensory_bytes": v["sensory_bytes"],
            "gpu_resident_bytes": v["gpu_resident_bytes"], "passed": v["passed"]}


def verification(keyed_backend: str, smoke: dict | None) -> dict:
    """Which backend the variant's smoke really ran on, from llama.cpp's own load report; the record
    claims a backend only where it ran (never "passed on metal" for a run on this CPU)."""
    if smoke is None:
        return {"backend": keyed_backend, "ran_on": None, "verified": False,
                "summary": f"no smoke run (text-only variant): {keyed_backend} not verified"}
    ran = smoke["placement"]["backend"]
    if ran == keyed_backend:
        summary = f"verified on {ran}"
    else:
        summary = f"mechanics verified on {ran}, {keyed_backend} not verified"
    return {"backend": keyed_backend, "ran_on": ran, "verified": ran == keyed_backend and bool(smoke.get("passed")),
            "summary": summary}


def template_name(text: str) -> str:
    """A chat template's name in the lock and the registry: the architecture and its content hash, so
    entries that carry the same template share one name and a changed template gets a new one."""
    import hashlib

    return "qwen35-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def chat_template(variant) -> str:
    rec = Entry(variant.steps["receipt"].kind, variant.steps["receipt"].key)
    return rec.file("chat_template.jinja").read_text()


def parameters(variant) -> dict:
    """Parameter counts from the variant's GGUF tensor tables (no weights read): the text model and,
    where it has one, the projector -- the figure the product's catalog rows and tier rules use."""
    from math import prod

    from .ggufcheck import read_layout

    def count(role):
        step = variant.steps.get(role)
        if step is None:
            return None
        return sum(prod(t["dims"]) for t in read_layout(Entry(step.kind, step.key).output())["tensors"])

    return {"text": count("quantize"), "projector": count("projector")}


def entry_for(plan, variant) -> dict:
    src_step = variant.steps["source"]
    src = Entry(src_step.kind, src_step.key).manifest()
    alloy = variant.alloy
    rec = Entry(variant.steps["receipt"].kind, variant.steps["receipt"].key)
    results = json.loads(rec.file(f"{alloy.name}.alloy.json").read_text())["results"]
    envelope = json.loads(Entry("envelope", variant.steps["envelope"].key).file("envelope.json").read_text())
    smoke = (json.loads(Entry("smoke", variant.steps["smoke"].key).file("smoke.json").read_text())
             if "smoke" in variant.steps else None)
    draft = (json.loads(Entry("draft-run", variant.steps["draft-run"].key).file("draft.json").read_text())
             if "draft-run" in variant.steps else None)
    if "localFiles" in src:
        files = [{"filename": k, "sha256": v, "size": os.path.getsize(os.path.join(src["path"], k))}
                 for k, v in sorted(src["localFiles"].items())]
    else:
        files = sorted(src["files"], key=lambda f: f["filename"])
    import hashlib

    from .alloy import outside_published_schema

    template = chat_template(variant)
    trained_on = platform_class(variant)
    unpublished = outside_published_schema(variant.llama_type)
    return {
        **({"outsidePublishedSchema": unpublished} if unpublished else {}),
        "alloy": alloy.name,
        "alloyHash": alloy.alloy_hash,
        "chatTemplate": {"name": template_name(template), "sha256": hashlib.sha256(template.encode()).hexdigest()},
        "overrides": variant.overrides,
        "tier": variant.config["tier"]["name"],
        "quant": variant.llama_type,
        "source": {"kind": src_step.kind, "baseModel": alloy.source["baseModel"],
                   "revision": alloy.source["revision"], "resolvedRevision": src.get("resolvedRevision"),
                   "files": files, **({"platformClass": trained_on} if trained_on else {})},
        "toolchain": {"fingerprint": plan.toolchain, **fingerprint_parts()},
        "keys": {role: s.key for role, s in variant.steps.items() if role != "envelope"},
        "outputs": results["integrity"]["fileHashes"],
        "modelHash": results["integrity"]["modelHash"],
        "parameters": parameters(variant),
        "envelope": envelope_summary(envelope, variant.steps["envelope"].params["config"]),
        "verification": verification(variant.config["backend"]["name"], smoke),
        **({} if draft is None else {"draft": {
            "backend": draft["backend"], "drafted": draft["stats"]["n_drafted"], "accepted": draft["stats"]["n_accept"],
            "acceptance": round(draft["acceptance"], 4), "same_as_plain": draft["same_as_plain"],
            "same_as_plain_gated": draft["same_as_plain_gated"]}}),
        "smoke": None if smoke is None else {
            "passed": bool(smoke["passed"]), "vision_score": smoke["vision"]["score"],
            "vision_gated": bool(smoke["vision"]["gated"]), "vision_items": len(smoke["vision"]["items"]),
            "personas": smoke["personas"]["n_seq_max"],
            "personas_isolated": sum(map(bool, smoke["personas"]["isolated"])),
            "personas_equal_alone": sum(map(bool, smoke["personas"]["equal_alone"]))},
    }


_READ: dict = {}  # (path, size, mtime_ns, inode) -> validated lock, for this process


def read(path: Path | None = None, check: bool = True) -> dict:
    """The lock as data (a copy the caller may change). A validated read is kept for the process
    while the file's size, mtime and inode stay: a run compares each of its variants with the lock,
    and validating a 50-entry lock 50 times was most of a no-op run."""
    import copy

    path = path or lock_path()
    try:
        st = path.stat()
    except FileNotFoundError:
        return {"lockVersion": 1, "variants": {}}
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if check and key in _READ:
        return copy.deepcopy(_READ[key])
    data = json.loads(path.read_text())
    if check:
        validate(data, "lock.schema.json", str(path))
        _READ.clear()
        _READ[key] = copy.deepcopy(data)
    return data


def no_longer_declared(lock: dict, plan, variant) -> list[str]:
    """Entries of this variant's alloy for quants it no longer declares (an alloy's quantTypes
    shrank): the lock records what the alloys declare, so they go."""
    if not is_declared(variant):
        return []
    declared = {v.id for v in plan.variants if v.alloy.name == variant.alloy.name and is_declared(v)}
    return [vid for vid, e in lock["variants"].items()
            if e["alloy"] == variant.alloy.name and not e.get("overrides") and vid not in declared]


def recorded(plan, variant, record_experiments: bool = False) -> bool:
    """The lock already holds exactly what this variant's receipt and reports say, and nothing its
    alloy no longer declares."""
    path = path_for(variant, record_experiments)
    try:
        lock = read(path)
        entry = json.loads(json.dumps(entry_for(plan, variant)))
        return (lock["variants"].get(variant.id) == entry
                and lock.get("chatTemplates", {}).get(entry["chatTemplate"]["name"]) == chat_template(variant)
                and set(lock.get("chatTemplates", {})) == _templates_in_use(lock)
                and not no_longer_declared(lock, plan, variant)
                and not (plan.alloys and {e["alloy"] for e in lock["variants"].values()} - set(plan.alloys)))
    except (OSError, ValueError, KeyError, ForgeError):
        return False  # unreadable or not valid: the lock task rewrites it


def _templates_in_use(lock: dict) -> set:
    return {e["chatTemplate"]["name"] for e in lock["variants"].values() if "chatTemplate" in e}


def update(plan, variants, record_experiments: bool = False) -> tuple[Path, bool]:
    """Merge these finished variants into their lock file (the committed lock for declared ones,
    build/experiments.lock.json for the rest); returns (path, changed)."""
    path = path_for(variants[0], record_experiments)
    assert all(path_for(v, record_experiments) == path for v in variants)
    with exclusive(path):
        # Entries written by an older forge may miss a field: they are rewritten here, and the
        # result as a whole must validate before it replaces the file.
        lock = read(path, check=False)
        before = json.dumps(lock, sort_keys=True)
        for gone in [vid for vid, e in lock["variants"].items() if plan.alloys and e["alloy"] not in plan.alloys]:
            # Its alloy was deleted: nothing builds, verifies or lists it any more.
            print(f"  lock: {gone} leaves {path.name}: alloy {lock['variants'][gone]['alloy']} is no longer in "
                  f"{alloys_dir()}")
            del lock["variants"][gone]
        for v in variants:
            for gone in no_longer_declared(lock, plan, v):
                del lock["variants"][gone]
            if Entry(v.steps["receipt"].kind, v.steps["receipt"].key).is_complete():
                lock["variants"][v.id] = entry_for(plan, v)
                lock.setdefault("chatTemplates", {})[lock["variants"][v.id]["chatTemplate"]["name"]] = chat_template(v)
        lock["variants"] = dict(sorted(lock["variants"].items()))
        # A template no entry names any more leaves with the last entry that carried it.
        used = _templates_in_use(lock)
        lock["chatTemplates"] = {k: t for k, t in sorted(lock.get("chatTemplates", {}).items()) if k in used}
        validate(lock, "lock.schema.json", str(path))
        changed = json.dumps(lock, sort_keys=True) != before
        if changed:
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, path)
    return path, changed
