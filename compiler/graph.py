"""From the command line to a Plan: load and validate every alloy, split doit's variables into
selectors and Hydra overrides, take the toolchain fingerprint and the local sources' identities
(the only I/O, stat-cached), then plan. Nothing is built here."""
from __future__ import annotations

from . import alloy as alloys_mod
from . import plan as plan_mod
from .config import parse_overrides
from .errors import ForgeError
from .paths import alloys_dir, project_file
from .stages.source import local_identity
from .store import stat_cache
from .toolchain import fingerprints


def source_ids(alloys) -> dict:
    ids = {"synthetic-generator": stat_cache().sha256(__import__("compiler.synthetic").synthetic.__file__)}
    for a in alloys:
        if "localPath" in a.source:
            ids[a.name] = local_identity(a.path, a.source["localPath"])["files"]
    return ids


def stage_code() -> dict:
    """kind -> digest of the forge source files that kind runs (stat-cached: no re-reading)."""
    import hashlib
    from pathlib import Path

    here = Path(__file__).resolve().parent
    out = {}
    for kind, files in plan_mod.STAGE_CODE.items():
        h = hashlib.sha256()
        for f in files:
            h.update(f.encode() + stat_cache().sha256(here / f).encode())
        out[kind] = h.hexdigest()[:16]
    return out


def compile_graph(cli_vars: dict) -> plan_mod.Plan:
    selectors, overrides = parse_overrides(cli_vars)
    alloys = alloys_mod.load_dir(alloys_dir())
    chosen, _ = plan_mod.select_alloys(alloys, selectors, overrides)
    result = plan_mod.plan(alloys, selectors, overrides, fingerprints(), source_ids(chosen), stage_code())
    check_texts(result)
    stat_cache().save()
    return result


def check_texts(plan) -> None:
    """Calibration and held-out texts must be the bytes their recipe pinned (stat-cached sha256)."""
    for step in plan.steps.values():
        if step.kind == "imatrix":
            name, digest = step.params["corpus"], step.params["corpus_sha256"]
            users = sorted({str(v.alloy.path) for v in plan.variants if v.steps.get("imatrix") is step})
            where, what = f"{', '.join(users)} $.stages[quant].calibration", "calibration corpus"
        elif step.kind == "kld-base":
            name, digest = step.params["file"], step.params["sha256"]
            where, what = "conf gate.heldout / gate.heldout_sha256", "held-out text"
        else:
            continue
        path = project_file(name)
        if not path.is_file():
            raise ForgeError(f"{what} not found", where=where, found=str(path))
        got = stat_cache().sha256(path)
        if got != digest:
            raise ForgeError(f"{what} {name} does not match its pinned sha256", where=where, found=got, allowed=digest)
