"""What planning keeps between runs (compositions, validated alloys) never outlives a change: an
edited conf value or an edited alloy is seen on the next run."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import DEMO_ALLOY, ROOT, Workspace, python_json

PLAN = ("import json; from compiler.graph import compile_graph; p = compile_graph({'alloy': 'demo'}); "
        "v = p.variants[0]; print(json.dumps([v.config['tier']['n_ctx'], v.llama_type]))")


def planned(ws: Workspace) -> list:
    return python_json(["-c", PLAN], env=ws.env(), cwd=ROOT)


def test_a_conf_edit_and_an_alloy_edit_are_seen_through_the_caches(tmp_path):
    ws = Workspace(tmp_path)
    ws.build.mkdir(parents=True)  # as doit makes it: caches live in a build dir, never create one
    (ws.alloys / "demo.alloy.json").write_text(DEMO_ALLOY.read_text())
    first = planned(ws)
    assert planned(ws) == first  # second run: from the kept composition and validation
    assert (ws.build / ".forge" / "compositions.json").is_file()
    tier = ws.conf / "tier" / "m4.yaml"
    tier.write_text(tier.read_text().replace(f"n_ctx: {first[0]}", f"n_ctx: {first[0] // 2}"))
    assert planned(ws)[0] == first[0] // 2
    data = json.loads((ws.alloys / "demo.alloy.json").read_text())
    next(s for s in data["stages"] if s["type"] == "quant")["quantTypes"] = ["Q8_0"]
    (ws.alloys / "demo.alloy.json").write_text(json.dumps(data))
    assert planned(ws)[1] == "Q8_0"
    # An alloy made invalid after it once validated is refused, not served from the cache.
    data["stages"][0]["type"] = "no-such-stage"
    (ws.alloys / "demo.alloy.json").write_text(json.dumps(data))
    proc = subprocess.run([sys.executable, "-c", PLAN], capture_output=True, text=True, env=ws.env(), cwd=ROOT)
    assert proc.returncode != 0 and "schema violation" in proc.stderr
