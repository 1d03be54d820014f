"""The compiler core on the real pipeline: the demo checkpoint generated, converted and quantized
with the pinned llama.cpp, driven through `doit` as a user drives it. The tests share one
workspace and run in file order; each later test builds on what the earlier ones left."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time

import pytest

from conftest import DOIT, assert_ok
from test_alloy_schema import assert_our_alloy

pytestmark = pytest.mark.build


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def test_demo_variant_has_published_names_and_a_true_receipt(demo_workspace):
    ws = demo_workspace
    folder = ws.variant("demo")
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["demo-Q4_K_M.gguf", "demo.alloy.json", "mmproj-demo-F16.gguf"]
    receipt = json.loads((folder / "demo.alloy.json").read_text())
    integrity = receipt["results"]["integrity"]
    # Every hash in the receipt is the hash of the bytes on disk.
    for f in integrity["fileHashes"]:
        assert sha256(folder / f["filename"]) == f["sha256"]
        assert (folder / f["filename"]).stat().st_size == f["size"]
    # modelHash as forge-alloy defines it, recomputed from the files themselves.
    pairs = sorted(({"filename": p.name, "sha256": sha256(p)} for p in folder.glob("*.gguf")),
                   key=lambda f: f["filename"])
    expect = "sha256:" + hashlib.sha256(json.dumps(pairs, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert integrity["modelHash"] == expect
    assert integrity["alloyHash"].startswith("sha256:")
    # Both executed alloys are forge-alloy documents by our schema (and by the published one:
    # test_alloy_schema.test_the_demo_build_writes_published_forge_alloys, skipped where it cannot be had).
    assert_our_alloy(receipt)
    assert_our_alloy(json.loads((ws.variant("demo-q8") / "demo-q8.alloy.json").read_text()))
    # The recipe itself is untouched by the build (the recipe is input, the receipt is output).
    assert "results" not in json.loads((ws.alloys / "demo.alloy.json").read_text())
    lock = ws.lock()["variants"]
    assert set(lock) == {"demo", "demo-q8"}
    assert lock["demo"]["modelHash"] == integrity["modelHash"]
    assert lock["demo"]["source"]["kind"] == "synthetic"
    assert {f["filename"] for f in lock["demo"]["source"]["files"]} >= {"config.json", "model.safetensors"}
    # No store key in the bytes: the converter names the model after it, not after the folder it
    # was read from (a content key that can parse as a size label, "6b78...").
    from compiler.ggufcheck import read_layout

    source_key = lock["demo"]["keys"]["source"]
    ggufs = sorted(folder.glob("*.gguf"))
    assert len(ggufs) == 2, ggufs
    for gguf_file in ggufs:
        meta = read_layout(gguf_file)["meta"]  # every value but the arrays
        strings = {k: v for k, v in meta.items() if isinstance(v, str)}
        assert "general.architecture" in strings, (gguf_file.name, sorted(meta))
        for key, value in strings.items():
            assert source_key not in value and source_key[:8] not in value, (gguf_file.name, key, value)
        assert meta["general.name"] == "qwen3.5-tiny-seeing" and "general.finetune" not in meta
    # Progress a person can follow, and the outputs' location at the end.
    assert "quantize to Q4_K_M 100%" in ws.first_run.out
    assert str(folder) in ws.first_run.out


def test_two_alloys_with_one_source_share_one_conversion(demo_workspace):
    ws = demo_workspace
    ran = ws.first_run.executed
    assert {t for t in ran if t.startswith("convert:")} == {"convert:qwen3.5-tiny-seeing"}
    assert {"quantize:demo", "quantize:demo-q8"} <= ran
    # One imatrix (Q4_K_M uses it; Q8_0 needs none) and one set of reference logits for both gates.
    assert {t for t in ran if t.startswith(("imatrix:", "kld-base:"))} == {
        "imatrix:qwen3.5-tiny-seeing", "kld-base:qwen3.5-tiny-seeing"}
    assert len(list((ws.build / "store" / "convert").iterdir())) == 1
    # Both variants' text models come from the same converted file.
    assert ws.lock()["variants"]["demo"]["keys"]["convert"] == ws.lock()["variants"]["demo-q8"]["keys"]["convert"]


def test_second_run_executes_nothing_and_reads_no_weights(demo_workspace):
    run = demo_workspace.doit()
    assert_ok(run)
    assert run.executed == set(), run.out
    assert "quantize:demo" in run.skipped
    assert run.stats and sum(s["hashed_bytes"] for s in run.stats) == 0, run.stats
    assert sum(s["stat_hits"] for s in run.stats) > 0


def test_touching_files_without_changing_them_reruns_nothing(demo_workspace):
    ws = demo_workspace
    for path in list(ws.alloys.glob("*.alloy.json")) + list((ws.build / "store").rglob("*.gguf")):
        os.utime(path)
    run = ws.doit()
    assert_ok(run)
    assert run.executed == set(), run.out


def test_demo_loads_in_llama_cpp_and_evaluates_an_image(demo_workspace, tmp_path):
    """The text GGUF and projector load in llama-cpp-python and an image goes through mtmd."""
    script = tmp_path / "see.py"
    script.write_text(
        "import base64, io, json, sys\n"
        "from PIL import Image, ImageDraw\n"
        "from llama_cpp import Llama\n"
        "from llama_cpp.llama_chat_format import MTMDChatHandler\n"
        "img = Image.new('RGB', (64, 64), 'white'); ImageDraw.Draw(img).ellipse((8, 8, 56, 56), fill='red')\n"
        "buf = io.BytesIO(); img.save(buf, 'PNG')\n"
        "url = 'data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode()\n"
        "llm = Llama(sys.argv[1], chat_handler=MTMDChatHandler(sys.argv[2], verbose=False), n_ctx=1024,\n"
        "            n_threads=2, verbose=False)\n"
        "out = llm.create_chat_completion(messages=[{'role': 'user', 'content': [\n"
        "    {'type': 'image_url', 'image_url': {'url': url}}, {'type': 'text', 'text': 'What shape?'}]}],\n"
        "    max_tokens=4, temperature=0.0)\n"
        "text_only = llm.create_chat_completion(messages=[{'role': 'user', 'content': 'What shape?'}],\n"
        "    max_tokens=4, temperature=0.0)\n"
        "print(json.dumps({'with_image': out['usage'], 'text_only': text_only['usage']}))\n"
    )
    folder = demo_workspace.variant("demo")
    proc = subprocess.run([os.sys.executable, str(script), str(folder / "demo-Q4_K_M.gguf"),
                           str(folder / "mmproj-demo-F16.gguf")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    usage = json.loads(proc.stdout.strip().splitlines()[-1])
    # The image became tokens in the prompt: a 64x64 image is 2x2 merged patches -> at least 4 more.
    assert usage["with_image"]["prompt_tokens"] >= usage["text_only"]["prompt_tokens"] + 4
    assert usage["with_image"]["completion_tokens"] >= 1


def test_unreachable_source_fails_its_alloy_and_the_others_still_build(demo_workspace):
    ws = demo_workspace
    stages = [dict(s, encoderModel="Qwen/Qwen3.5-4B") if s["type"] == "modality" else s
              for s in json.loads((ws.alloys / "demo.alloy.json").read_text())["stages"]]
    path = ws.add_alloy("offline-4b", source={"baseModel": "Qwen/Qwen3.5-4B", "revision": "main",
                                               "architecture": "qwen3_5"}, stages=stages)
    try:
        run = ws.doit()
        assert run.proc.returncode != 0
        # Offline, with no commit for it in the lock: the reason, and the alloy named.
        assert "Qwen/Qwen3.5-4B@main cannot be resolved to a commit: HF_HUB_OFFLINE is set, and the lock " \
               "records no commit for it" in run.out
        assert "offline-4b" in run.out
        # The demo variants were checked and are still there, untouched.
        assert "quantize:demo" in run.skipped
        assert ws.variant("demo").joinpath("demo-Q4_K_M.gguf").exists()
        # The terminal: the failure once, with its log, then a line per variant -- no doit cascade
        # of every step downstream of the source.
        assert run.proc.stdout.count("FAILED source:qwen3.5-4b:") == 1
        assert "UnmetDependency" not in run.out
        summary = run.proc.stdout.split("Variants:\n", 1)[1].splitlines()
        states = dict(line.split(None, 1) for line in summary if line.strip())
        assert states["offline-4b"].startswith("failed at source:qwen3.5-4b: alloy offline-4b: source ")
        assert "(log: " in states["offline-4b"] and states["demo"] == "up to date"
    finally:
        path.unlink()


def test_override_builds_a_separate_variant_and_keeps_the_default(demo_workspace):
    ws = demo_workspace
    before = sha256(ws.variant("demo") / "demo-Q4_K_M.gguf")
    run = ws.doit("alloy=demo", "quant=q8", "tier.n_seq_max=2")
    assert_ok(run)
    folder = ws.variant("demo@q8_0,tier.n_seq_max-2")
    assert (folder / "demo-Q8_0.gguf").exists()
    # Same source, same quant type as demo-q8: the store already had those bytes.
    assert sha256(folder / "demo-Q8_0.gguf") == sha256(ws.variant("demo-q8") / "demo-q8-Q8_0.gguf")
    assert not any(t.startswith(("convert:", "source:", "mmproj:")) for t in run.executed)
    assert sha256(ws.variant("demo") / "demo-Q4_K_M.gguf") == before
    again = ws.doit("alloy=demo")
    assert_ok(again)
    assert again.executed == set(), again.out


def test_editing_one_alloys_quant_reruns_only_its_quantize_and_after(demo_workspace):
    ws = demo_workspace
    path = ws.alloys / "demo-q8.alloy.json"
    data = json.loads(path.read_text())
    next(s for s in data["stages"] if s["type"] == "quant")["quantTypes"] = ["Q5_K_M"]
    path.write_text(json.dumps(data, indent=2))
    run = ws.doit()
    assert_ok(run)
    assert run.executed == {f"{s}:demo-q8" for s in ("quantize", "gate", "envelope", "smoke", "receipt", "lock")} | {
        "registry"}, run.out
    assert (ws.variant("demo-q8") / "demo-q8-Q5_K_M.gguf").exists()
    assert ws.lock()["variants"]["demo-q8"]["quant"] == "Q5_K_M"


def test_quantize_killed_midway_is_never_taken_as_done(demo_workspace):
    ws = demo_workspace
    # A type no other test builds on the session's demo source (test_record builds Q6_K there): the
    # quantize must run here, whatever order the tests run in.
    ws.add_alloy("demo-kill", quant="Q4_K_S")
    store = ws.build / "store" / "quantize"
    before = set(store.iterdir())
    assert not list(store.glob("*/model-Q4_K_S.gguf")), "a Q4_K_S of the demo is already in the store"
    proc = subprocess.Popen(DOIT + ["alloy=demo-kill"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=ws.env(), cwd=ws.root, start_new_session=True)
    partial = None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        hits = [p for p in store.glob("*.partial-*/model-Q4_K_S.gguf") if p.stat().st_size > 0]
        if hits:
            partial = hits[0]
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert partial is not None, "quantize finished before it could be killed"
    new = set(store.iterdir()) - before
    # Only the partial folder is left, and it does not look finished.
    assert new and all(".partial-" in p.name for p in new)
    assert not any((p / "manifest.json").exists() for p in new)
    run = ws.doit("alloy=demo-kill")
    assert_ok(run)
    assert "quantize:demo-kill" in run.executed
    assert not list(store.glob("*.partial-*"))
    out = ws.variant("demo-kill") / "demo-kill-Q4_K_S.gguf"
    # The finished file is exactly what llama-quantize gives when nothing interrupts it.
    lock = ws.lock()["variants"]["demo-kill"]
    convert = ws.build / "store" / "convert" / lock["keys"]["convert"] / "model-BF16.gguf"
    from compiler.toolchain import tool

    imatrix = ws.build / "store" / "imatrix" / lock["keys"]["imatrix"]
    clean = ws.root / "clean-Q4_K_S.gguf"
    subprocess.run([str(tool("llama-quantize")), "--imatrix", "imatrix.gguf",
                    str(convert), str(clean), "Q4_K_S", "2"], check=True, capture_output=True, cwd=imatrix)
    assert sha256(out) == sha256(clean)


def test_each_tool_step_records_its_seconds_and_its_tools_peak_memory(demo_workspace):
    """The manifests carry what the bench compares with bare llama.cpp: the step's seconds and the
    peak resident memory of the tool it ran (not the forge's own, larger, process)."""
    store = demo_workspace.build / "store"
    for kind in ("convert", "mmproj", "imatrix", "quantize", "kld-base", "gate"):
        # The entry of the kind that took longest (a Q8_0 variant's gate reuses the yardstick's
        # figures and takes no measurable time: it runs no tool).
        m = max((json.loads(p.read_text()) for p in (store / kind).glob("*/manifest.json")), key=lambda m: m["seconds"])
        assert m["seconds"] > 0, kind
        assert 10 < m["peak_rss_mib"] < 8000, (kind, m.get("peak_rss_mib"))
    # llama-quantize of a 150 MB BF16 model does not take the ~1 GB the forge process holds.
    quantize = json.loads(next((store / "quantize").glob("*/manifest.json")).read_text())
    assert quantize["peak_rss_mib"] < 900
    # The demo's source trains in its own process; that process's peak is the step's (torch's
    # training holds more than quantize's, and far less than the 8 GB a leak would show).
    synthetic = json.loads(next((store / "synthetic").glob("*/manifest.json")).read_text())
    assert quantize["peak_rss_mib"] < synthetic["peak_rss_mib"] < 4000
