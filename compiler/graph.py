"""From the command line to a Plan: load and validate every alloy, split doit's variables into
selectors and Hydra overrides, take the toolchain fingerprint and the local sources' identities
(the only I/O, stat-cached), then plan. Nothing is built here."""
from __future__ import annotations

from . import alloy as alloys_mod
from . import plan as plan_mod
from .config import parse_overrides
from .paths import alloys_dir
from .stages.source import local_identity
from .store import stat_cache
from .toolchain import fingerprint


def source_ids(alloys) -> dict:
    ids = {"synthetic-generator": stat_cache().sha256(__import__("compiler.synthetic").synthetic.__file__)}
    for a in alloys:
        if "localPath" in a.source:
            ids[a.name] = local_identity(a.path, a.source["localPath"])["files"]
    return ids


def compile_graph(cli_vars: dict) -> plan_mod.Plan:
    selectors, overrides = parse_overrides(cli_vars)
    alloys = alloys_mod.load_dir(alloys_dir())
    chosen, _ = plan_mod.select_alloys(alloys, selectors, overrides)
    result = plan_mod.plan(alloys, selectors, overrides, fingerprint(), source_ids(chosen))
    stat_cache().save()
    return result
