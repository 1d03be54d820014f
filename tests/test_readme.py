"""The README's table of real tier alloys says what the alloys say (an engineer copies its commands)."""
from __future__ import annotations

import re

from conftest import ROOT

from compiler.alloy import load_dir


def test_the_real_tier_table_matches_the_alloys():
    text = (ROOT / "README.md").read_text()
    section = text.split("### Forging a real tier (with internet)", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| (\S+) \| (\S+) \| ([A-Z0-9_, ]+) \| (\S+) \|$", section, re.M)
    real = {a.name: a for a in load_dir(ROOT / "alloys") if "synthetic" not in a.source}
    assert {r[0] for r in rows} == set(real), "every real alloy, and only those, in the README's table"
    for name, base, revision, quants, tier in rows:
        a = real[name]
        assert (base, revision, tier) == (a.source["baseModel"], a.source["revision"], a.tier), name
        assert [q.strip() for q in quants.split(",")] == a.quant_types, name
    for name in re.findall(r"doit alloy=(\S+)", section):
        assert name in real, f"the README runs an alloy that does not exist: {name}"
