"""A step's key holds what shapes its bytes, no more: a C compiler change re-keys the llama.cpp
steps (quantize, imatrix, gate) but not the demo's generation or its conversion; a converter
package change re-keys those."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

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


TASK_KEYS = ("from compiler.graph import compile_graph; import sys; "
             "p = compile_graph(dict(a.split('=', 1) for a in sys.argv[1:])); "
             "print(__import__('json').dumps({t: s.key for t, s in p.steps.items()}))")


def task_keys(tmp_path, *args, cwd=ROOT, **env) -> dict:
    """task -> key of the plan `doit ARGS` would build, planned by the project at `cwd`."""
    env = {**os.environ, "FORGE_BUILD_DIR": str(tmp_path / "build"), "PYTHONPATH": str(cwd), **env}
    return python_json(["-c", TASK_KEYS, *args], cwd=cwd, env=env)


def changed(base: dict, other: dict) -> set:
    """The kinds (task basenames) of the tasks whose key differs."""
    return {t.split(":", 1)[0] for t in base if base[t] != other.get(t)}


def project_copy(dest: Path) -> Path:
    """The planning half of a checkout (code, conf, alloys, texts) to edit a file in."""
    for part in ("compiler", "conf", "alloys", "calibration", "schema"):
        shutil.copytree(ROOT / part, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_the_build_key_holds_the_flag_variables_and_cmake_but_nothing_else(tmp_path):
    base = task_keys(tmp_path, "alloy=demo")
    llama_cpp = {"quantize", "imatrix", "kld-base", "kld-q8", "gate", "image-fit", "envelope", "smoke", "receipt"}
    python_side = {"source", "validate", "convert", "mmproj"}
    # CFLAGS (read by cmake into every compile line) shapes every k-quant's bytes.
    flags = task_keys(tmp_path, "alloy=demo", CFLAGS="-O1")
    assert changed(base, flags) == llama_cpp
    # So does cmake's version: the compile lines it generates from the same CMakeLists.
    fake = tmp_path / "bin" / "cmake"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'cmake version 9.9.9'\n")
    fake.chmod(0o755)
    cmake = task_keys(tmp_path, "alloy=demo", PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    assert changed(base, cmake) == llama_cpp
    # An empty flag variable and any other variable are no build setting: nothing re-keys.
    assert task_keys(tmp_path, "alloy=demo", CFLAGS="", FORGE_UNRELATED="1") == base
    assert python_side.isdisjoint(changed(base, flags))


def test_each_conversion_is_keyed_by_its_own_code(tmp_path):
    root = project_copy(tmp_path / "project")
    args = ("alloy=demo", "convert.mtp=draft")
    base = task_keys(tmp_path, *args, cwd=root)
    stages = root / "compiler" / "stages"

    def edit(name: str) -> set:
        before = (stages / name).read_text()
        (stages / name).write_text(before + "\n# a change\n")
        try:
            return changed(base, task_keys(tmp_path, *args, cwd=root))
        finally:
            (stages / name).write_text(before)

    # A projector-only change re-converts the projectors (and re-runs what reads them), never the
    # text model, its quants or the draft; a draft-only change re-converts the draft alone.
    projector = edit("mmproj.py")
    assert "mmproj" in projector and {"convert", "mtp-draft", "quantize", "imatrix", "gate"}.isdisjoint(projector)
    draft = edit("mtp_draft.py")
    assert "mtp-draft" in draft and {"convert", "mmproj", "quantize", "imatrix", "gate", "smoke"}.isdisjoint(draft)
    text = edit("convert.py")
    assert {"convert", "quantize", "imatrix", "gate"} <= text and {"mmproj", "mtp-draft"}.isdisjoint(text)
    # What all three run re-keys all three.
    assert {"convert", "mmproj", "mtp-draft"} <= edit("converter.py")
    assert task_keys(tmp_path, *args, cwd=root) == base


def test_what_draws_the_pictures_keys_the_trained_source_and_the_smoke(tmp_path):
    alloys = tmp_path / "alloys"
    alloys.mkdir()
    demo = json.loads((ROOT / "alloys" / "demo.alloy.json").read_text())
    shutil.copy(ROOT / "alloys" / "demo.alloy.json", alloys)
    demo["name"], demo["source"]["baseModel"] = "random", "forge-demo/qwen3.5-tiny-random"
    demo["stages"][0]["encoderModel"] = demo["source"]["baseModel"]
    del demo["source"]["synthetic"]["train"]  # random weights: nothing drawn to make them
    (alloys / "random.alloy.json").write_text(json.dumps(demo))
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import importlib.metadata as m\n_v = m.version\n"
        "m.version = lambda n: '99.0.0' if n.lower() == 'pillow' else _v(n)\n")
    base = task_keys(tmp_path, FORGE_ALLOYS_DIR=str(alloys))
    other = task_keys(tmp_path, FORGE_ALLOYS_DIR=str(alloys), PYTHONPATH=f"{site}{os.pathsep}{ROOT}")
    differ = {t for t in base if base[t] != other[t]}
    # Another Pillow: the trained fixture's pictures, so its weights and all made from them, and
    # every suite's answers.
    assert {t for t in base if ":qwen3.5-tiny-seeing" in t or t.endswith(":demo")} <= differ
    assert "smoke:random" in differ
    # The random-weight source draws nothing: it and all but its smoke (and its receipt) keep their keys.
    random = {t for t in base if ":qwen3.5-tiny-random" in t or t.endswith(":random")}
    assert random & differ == {"smoke:random", "receipt:random"}


def test_a_corpus_is_keyed_by_its_content_and_name_not_its_folder(tmp_path):
    corpus = ROOT / "calibration" / "forge-calibration-v1.txt"

    def keys_with(path: Path) -> dict:
        alloys = tmp_path / "alloys"
        alloys.mkdir(exist_ok=True)
        data = json.loads((ROOT / "alloys" / "demo.alloy.json").read_text())
        quant = next(s for s in data["stages"] if s["type"] == "quant")
        quant["calibration"] = {"file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        (alloys / "demo.alloy.json").write_text(json.dumps(data))
        return task_keys(tmp_path, "alloy=demo", FORGE_ALLOYS_DIR=str(alloys))

    def copy(folder: str, name: str, extra: bytes = b"") -> Path:
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / name).write_bytes(corpus.read_bytes() + extra)
        return tmp_path / folder / name

    here = keys_with(corpus)
    # The same corpus elsewhere: the same importance matrix and quants (llama-imatrix runs on its
    # bare name); only the receipt, which records the alloy as written, is another.
    assert changed(here, keys_with(copy("moved", corpus.name))) == {"receipt"}
    # Its name is in the imatrix's bytes (quantize.imatrix.dataset), its content in every figure.
    assert changed(here, keys_with(copy("renamed", "other-name.txt"))) >= {"imatrix", "quantize"}
    assert changed(here, keys_with(copy("edited", corpus.name, b"one more line\n"))) >= {"imatrix", "quantize"}


def test_a_local_checkpoint_is_keyed_by_its_files_not_its_git_folder(tmp_path):
    from compiler.stages.source import local_identity

    folder = tmp_path / "ckpt"
    (folder / ".git" / "lfs" / "objects").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (folder / ".git" / "lfs" / "objects" / "blob").write_bytes(b"weights")
    alloy = tmp_path / "local.alloy.json"
    before = local_identity(alloy, "ckpt")["files"]
    assert set(before) == {"config.json", "model.safetensors"}
    # A `git fetch` (new objects, moved refs) is not a new checkpoint...
    (folder / ".git" / "lfs" / "objects" / "blob2").write_bytes(b"more")
    (folder / ".git" / "FETCH_HEAD").write_text("abc\n")
    assert local_identity(alloy, "ckpt")["files"] == before
    # ...a changed weight is.
    (folder / "model.safetensors").write_bytes(b"other weights")
    assert local_identity(alloy, "ckpt")["files"] != before
