"""A step's key holds what shapes its bytes, no more: a C compiler change re-keys the llama.cpp
steps (quantize, imatrix, gate) but not the demo's generation or its conversion; a converter
package change re-keys those."""
from __future__ import annotations

import os

from conftest import ROOT, python_json

KEYS = ("from compiler.graph import compile_graph; "
        "p = compile_graph({'alloy': 'demo'}); "
        "print(__import__('json').dumps({s.kind: s.key for s in p.steps.values()}))")


def keys(tmp_path, **env) -> dict:
    return python_json(["-c", KEYS], cwd=ROOT, env=dict(os.environ, FORGE_BUILD_DIR=str(tmp_path / "build"), **env))


def test_a_compiler_change_rekeys_quantize_but_not_the_source_or_conversion(tmp_path):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'cc (Other) 99.1.0'\n")
    fake.chmod(0o755)
    base, other = keys(tmp_path), keys(tmp_path, CC=str(fake))
    same = {k for k in base if base[k] == other[k]}
    assert {"synthetic", "convert", "mmproj"} <= same
    assert {"quantize", "imatrix", "kld-base", "gate", "envelope", "smoke", "receipt"}.isdisjoint(same)


def test_a_converter_package_change_rekeys_generation_and_conversion(tmp_path):
    # A different tokenizers version shapes the converted tokenizer: simulate it with a
    # sitecustomize that changes what importlib.metadata reports for it.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import importlib.metadata as m\n_v = m.version\n"
        "m.version = lambda n: '0.0.0-other' if n == 'tokenizers' else _v(n)\n")
    base = keys(tmp_path)
    other = keys(tmp_path, PYTHONPATH=f"{site}{os.pathsep}{ROOT}")
    assert base["convert"] != other["convert"] and base["synthetic"] != other["synthetic"]
