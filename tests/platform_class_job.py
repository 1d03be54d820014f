"""The platform-class test's whole build, run as one background job from the session's start
(tests/test_platform_class.py): `python -m compiler.verify alloy=demo keep=1` (a rebuild from nothing
with another kernel class's training), then `doit alloy=demo` twice in the rebuild dir it kept (the
demo finished there, then a no-op). Each command's output goes to its own log beside this job's
results.json (exit statuses and the kept dir); the test reads them when the job is done.

    python tests/platform_class_job.py WORKSPACE_ROOT
(the environment is the workspace's, with the kernel class set)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import DOIT, ROOT  # this file's folder is sys.path[0]: the tests' own doit command line


def run(args: list[str], log: Path, **env) -> int:
    with open(log, "w") as out:
        return subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                              env=dict(os.environ, **env)).returncode


def main(root: Path) -> int:
    build = Path(os.environ["FORGE_BUILD_DIR"])
    results: dict = {"verify": run([sys.executable, "-m", "compiler.verify", "alloy=demo", "keep=1"],
                                   root / "verify.log")}
    kept = sorted((build / "verify").glob("run-*"))
    results["kept"] = [str(k) for k in kept]
    if len(kept) == 1:
        for name in ("first", "again"):
            results[name] = run(DOIT + ["alloy=demo"], root / f"doit-{name}.log", FORGE_BUILD_DIR=str(kept[0]))
    (root / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1])))
