"""doit entry point: compile the configs and alloys into a plan, hand its tasks to doit.

    doit                        every alloy at its own tier and quant
    doit alloy=demo             just the demo
    doit tier=air quant=iq3     the air alloys, overridden to IQ3_M
    doit verify alloy=demo      rebuild what the lock records in a fresh build dir, compare bytes
    doit verify only=demo keep=1    one locked variant; keep the fresh build dir
    doit verify rebuilt=<dir>   compare with a rebuild an earlier verify kept, without rebuilding
    doit publish alloy=demo     stage the repo folder, print what would be uploaded (push=1 uploads)
    doit push remote=<url>      push what the store holds for the selection to the remote cache
    doit check-cache            hash every artifact in build/store against its manifest
    doit list --all --status    the graph and what is stale
"""
import os
import sys

from doit import doit_cmd

from compiler import preflight
from compiler.errors import ForgeError
from compiler.graph import compile_graph
from compiler.paths import build_dir
from compiler.report import reporter_for
from compiler.tasks import build_task_names, check_cache_task, publish_task, push_task, tasks, verify_task

build_dir().mkdir(parents=True, exist_ok=True)
CLI_VARS = dict(doit_cmd._CMDLINE_VARS or {})
# Options of verify (only=<variant ids>, keep=1, rebuilt=<kept dir>), publish (push=1) and the lock (lock=1: record
# command-line experiments in the committed lock), not configuration overrides.
TASK_OPTIONS = ("only", "keep", "rebuilt", "push", "lock", "remote", "remote_readonly")
# The remote cache (compiler/remote.py): `doit remote=s3://bucket/forge` is FORGE_REMOTE for this run.
if CLI_VARS.get("remote"):
    os.environ["FORGE_REMOTE"] = CLI_VARS["remote"]
if CLI_VARS.get("remote_readonly"):
    os.environ["FORGE_REMOTE_READONLY"] = CLI_VARS["remote_readonly"]

try:
    PLAN = compile_graph({k: v for k, v in CLI_VARS.items() if k not in TASK_OPTIONS})
    if preflight.wanted_by(sys.argv[1:]):
        preflight.check(PLAN, sys.argv[1:], log=lambda m: print(m, file=sys.stderr))
except ForgeError as e:
    print(f"forge: refused, nothing was built or deleted.\n{e}", file=sys.stderr)
    sys.exit(2)

DOIT_CONFIG = {
    "dep_file": str(build_dir() / ".doit.sqlite"),
    # sqlite3: two doit runs on one build dir may read and write doit's own record at once.
    "backend": "sqlite3",
    "continue": True,       # an unreachable source fails its alloy; the others still build
    "verbosity": 2,
    # Each failure once with its reason and log, then a line per variant (no UnmetDependency cascade).
    "reporter": reporter_for(PLAN),
    "action_string_formatting": "new",
    # One step at a time by default. `doit -n 2 -P thread` runs independent steps side by side, each
    # waiting for room in memory first (compiler/memory.py); it gained nothing on 2 cores (every
    # llama.cpp tool uses all cores: docs/bench/forge-vs-bare.md) and one CI run of it crashed the doit
    # process (SIGSEGV) while three steps were checked at once, cause not found yet: opt-in only.
    "num_process": 1,
    # A plain `doit` builds; verify and check-cache run only when named.
    "default_tasks": build_task_names(PLAN),
}


def task_forge():
    yield from tasks(PLAN, record_experiments=CLI_VARS.get("lock", "") not in ("", "0", "false"))


def task_verify():
    return verify_task(CLI_VARS)


def task_check_cache():
    return check_cache_task()


def task_push():
    return push_task(PLAN)


def task_publish():
    return publish_task(PLAN, CLI_VARS.get("push", "") not in ("", "0", "false"))
