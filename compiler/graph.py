"""From the command line to a Plan: load and validate every alloy, split doit's variables into
selectors and Hydra overrides, take the toolchain fingerprint and the local sources' identities
(the only I/O, stat-cached), then plan. Nothing is built here."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from . import alloy as alloys_mod
from . import plan as plan_mod
from .config import parse_overrides
from .errors import ForgeError
from .paths import alloys_dir, project_file
from .stages.source import local_identity
from .store import stat_cache
from .toolchain import fingerprints


GENERATOR_CODE = ("synthetic.py", "train.py", "kernels.py", "fixture_data.py", "gated_delta.py")


def source_ids(alloys, pins: dict | None = None) -> dict:
    # The demo's bytes come from the generator and, for a trained fixture, from its training code and
    # data: one digest of all four keys the synthetic source step.
    here = Path(__file__).resolve().parent
    generator = hashlib.sha256("".join(
        stat_cache().sha256(here / f) for f in GENERATOR_CODE).encode()).hexdigest()
    ids = {"synthetic-generator": generator}
    for a in alloys:
        if "localPath" in a.source:
            ids[a.name] = local_identity(a.path, a.source["localPath"])
    ids.update(resolve_hub_sources([a for a in alloys if "localPath" not in a.source and "synthetic" not in a.source],
                                   pins))
    return ids


def locked_commits() -> dict:
    """(repo, revision) -> the commit the committed lock recorded for it."""
    from .lockfile import read

    try:
        lock = read(check=False)
    except (OSError, ValueError):
        return {}
    out = {}
    for entry in lock["variants"].values():
        src = entry.get("source", {})
        if src.get("kind") == "hub" and src.get("resolvedRevision"):
            out[(src["baseModel"], src["revision"])] = src["resolvedRevision"]
    return out


def resolve_hub_sources(alloys, pins: dict | None = None) -> dict:
    """alloy name -> {"commit": sha} or {"unresolved": why}, for every Hub alloy chosen.

    A commit sha in the alloy is used as it is. A branch or tag is asked of the Hub (one small call
    per repo, side by side), so a moved branch is seen and rebuilt; `doit verify` pins the lock's
    commits (FORGE_PINNED_REVISIONS); without network the lock's commit is used, and an alloy with
    neither is left unresolved: its source step fails with the reason and the other alloys build."""
    import json
    import os
    from concurrent.futures import ThreadPoolExecutor

    from . import hub

    if not alloys:
        return {}
    pinned = pins if pins is not None else json.loads(os.environ.get("FORGE_PINNED_REVISIONS") or "{}")
    locked = locked_commits()
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    wanted = {(a.source["baseModel"], a.source["revision"]) for a in alloys}

    def ask(repo_rev):
        repo, rev = repo_rev
        if hub.is_commit(rev):
            return repo_rev, {"commit": rev}
        if repo in pinned:
            return repo_rev, {"commit": pinned[repo]}
        if offline:
            return repo_rev, None
        try:
            return repo_rev, {"commit": hub.resolve(repo, rev)}
        except Exception as e:  # classified below; a bug (not a reach failure) is raised there
            return repo_rev, e

    with ThreadPoolExecutor(max_workers=min(8, len(wanted))) as pool:
        answers = dict(pool.map(ask, sorted(wanted)))
    out = {}
    for a in alloys:
        repo, rev = a.source["baseModel"], a.source["revision"]
        got, lock_commit = answers[(repo, rev)], locked.get((repo, rev))
        if isinstance(got, dict):
            if lock_commit and got["commit"] != lock_commit:
                print(f"forge: {a.name}: {repo}@{rev} moved from the locked commit {lock_commit[:12]} to "
                      f"{got['commit'][:12]}; building the new commit (`doit verify` rebuilds the locked one)",
                      file=sys.stderr)
            out[a.name] = got
            continue
        why = None
        if isinstance(got, Exception):
            explained = hub.explain(got, repo, rev, a.name)
            if explained is None:
                raise got
            if not _transport(got):  # 401/403/404: the Hub answered; the lock cannot stand in for that
                out[a.name] = {"unresolved": explained.what + (f" ({explained.hint})" if explained.hint else "")}
                continue
            why = explained.what
        if lock_commit:
            print(f"forge: {a.name}: {why or 'HF_HUB_OFFLINE is set'}; using the locked commit {lock_commit[:12]} "
                  f"of {repo}@{rev}", file=sys.stderr)
            out[a.name] = {"commit": lock_commit}
        else:
            out[a.name] = {"unresolved": f"source {repo}@{rev} cannot be resolved to a commit: "
                                         f"{why or 'HF_HUB_OFFLINE is set'}, and the lock records no commit for it"}
    return out


def _transport(e: BaseException) -> bool:
    """A failure to reach the Hub at all (as opposed to an answer from it)."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    return isinstance(e, (httpx2.TransportError, ConnectionError, TimeoutError)) or (
        isinstance(e, HfHubHTTPError) and getattr(getattr(e, "response", None), "status_code", 0) >= 500)


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


def compile_graph(cli_vars: dict, pins: dict | None = None) -> plan_mod.Plan:
    """`pins`: repo -> commit to use instead of asking the Hub (verify's locked commits)."""
    selectors, overrides = parse_overrides(cli_vars)
    alloys = alloys_mod.load_dir(alloys_dir())
    chosen, _ = plan_mod.select_alloys(alloys, selectors, overrides)
    result = plan_mod.plan(alloys, selectors, overrides, fingerprints(), source_ids(chosen, pins), stage_code())
    check_texts(result)
    stat_cache().save()
    return result


def check_texts(plan) -> None:
    """Calibration and held-out texts must be the bytes their recipe pinned (stat-cached sha256):
    every alloy's own file, also where alloys share one imatrix step (same name and content)."""
    checks = {}
    for v in plan.variants:
        imatrix = v.steps.get("imatrix")
        if imatrix is not None:
            calibration = v.alloy.stage("quant")["calibration"]
            pin = (calibration["file"], calibration["sha256"], "calibration corpus")
            checks.setdefault(pin, []).append(str(v.alloy.path))
    for step in plan.steps.values():
        if step.kind == "kld-base":
            checks[(step.params["file"], step.params["sha256"], "held-out text")] = \
                ["conf gate.heldout / gate.heldout_sha256"]
    for (name, digest, what), users in checks.items():
        where = users[0] if what == "held-out text" else \
            f"{', '.join(sorted(set(users)))} $.stages[quant].calibration"
        path = project_file(name)
        if not path.is_file():
            raise ForgeError(f"{what} not found", where=where, found=str(path))
        got = stat_cache().sha256(path)
        if got != digest:
            raise ForgeError(f"{what} {name} does not match its pinned sha256", where=where, found=got, allowed=digest)
