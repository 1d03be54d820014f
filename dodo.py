"""doit entry point: compile the configs and alloys into a plan, hand its tasks to doit.

    doit                        every alloy at its own tier and quant
    doit alloy=demo             just the demo
    doit tier=air quant=iq3     the air alloys, overridden to IQ3_M
    doit list --all --status    the graph and what is stale
"""
import sys

from doit import doit_cmd

from compiler.errors import ForgeError
from compiler.graph import compile_graph
from compiler.paths import build_dir
from compiler.tasks import tasks

build_dir().mkdir(parents=True, exist_ok=True)

DOIT_CONFIG = {
    "dep_file": str(build_dir() / ".doit.db"),
    "backend": "json",
    "continue": True,       # an unreachable source fails its alloy; the others still build
    "verbosity": 2,
    "action_string_formatting": "new",
}


def task_forge():
    try:
        plan = compile_graph(dict(doit_cmd._CMDLINE_VARS or {}))
    except ForgeError as e:
        print(f"forge: refused, nothing was built or deleted.\n{e}", file=sys.stderr)
        sys.exit(2)
    yield from tasks(plan)
