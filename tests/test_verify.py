"""Reproducibility: `doit verify` rebuilds the locked demo in a fresh build dir and matches the lock;
an edited lock hash is reported per file; a GGUF with one tensor changed is reported by tensor
name; a flipped byte in a cached artifact is found by `doit check-cache` and rebuilt by the next
`doit`."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from compiler import ggufdiff
from conftest import ROOT, TRAINED_SOURCE, assert_ok
from gguf_edit import change_first_string, flip_tensor_bytes

pytestmark = pytest.mark.build


def test_the_sessions_build_from_nothing_reproduces_the_committed_lock(demo_workspace):
    """What `doit verify alloy=demo` on the committed lock proves (a build from nothing, here, gives
    the recorded bytes), checked on the session's own build from nothing instead of a second
    rebuild: the demo trained, converted and quantized in an empty store has exactly the committed
    lock's source files and outputs."""
    committed = json.loads((ROOT / "alloys" / "forge.lock.json").read_text())["variants"]["demo"]
    built = demo_workspace.lock()["variants"]["demo"]
    if committed["toolchain"]["fingerprint"] != built["toolchain"]["fingerprint"]:
        pytest.skip("the committed lock records another toolchain (compiler, flags, CPU architecture or Python "
                    f"packages): {committed['toolchain']['fingerprint'][:12]} there, {built['toolchain']['fingerprint'][:12]} here")
    assert built["source"]["files"] == committed["source"]["files"]
    assert built["outputs"] == committed["outputs"]
    assert built["modelHash"] == committed["modelHash"]


def test_verify_reports_an_edited_lock_per_file_and_passes_on_the_same_rebuild(demo_workspace, demo_seed):
    # Verify's rebuild from nothing (training included, in a fresh dir, nothing taken from
    # build/store) runs in tests/test_platform_class.py, and the session's own build from nothing is
    # compared with the committed lock above. Here the rebuild is one verify kept holding only the
    # trained checkpoint (as a verify stopped after its source step leaves it): verify's own doit
    # converts and quantizes there, the mismatch keeps it, and the corrected lock passes on it.
    ws = demo_workspace
    kept = ws.build / "verify" / "run-20261203T000000-1"
    ws.seed(demo_seed, TRAINED_SOURCE, build=kept)
    lock_path = ws.alloys / "forge.lock.json"
    original = lock_path.read_text()
    lock = json.loads(original)
    text = next(o for o in lock["variants"]["demo"]["outputs"] if o["filename"] == "demo-Q4_K_M.gguf")
    text["sha256"] = "0" * 64
    lock_path.write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")
    try:
        bad = ws.doit("verify", "only=demo", f"rebuilt={kept}")
    finally:
        lock_path.write_text(original)
    assert bad.proc.returncode != 0
    assert "demo: MISMATCH" in bad.out and "DIFFERS   demo-Q4_K_M.gguf" in bad.out
    assert "lock    " + "0" * 64 in bad.out
    # The rebuild used its own build dir, not the workspace's store: it converted and quantized there.
    assert "rebuilding quantize:demo" in bad.out and f"in {kept}" in bad.out
    assert {"convert:", "quantize:"} <= _ran(kept), "the rebuild converted and quantized in its own store"
    assert f"the rebuild is kept in {kept}" in bad.out
    # The projector still matches, and the report says the lock entry is what is wrong: the
    # rebuild equals the workspace's own build of that step byte for byte.
    assert "ok        mmproj-demo-F16.gguf" in bad.out
    assert "the lock entry itself is what disagrees" in bad.out
    assert "the toolchain is the one recorded" in bad.out
    report = json.loads((ws.build / "verify" / "report.json").read_text())
    row = next(f for f in report["variants"][0]["files"] if f["file"] == "demo-Q4_K_M.gguf")
    assert row["matches"] is False and row["rebuilt_sha256"] != "0" * 64
    assert row["tensor_report"]["identical"] is True and report["rebuilt_from_nothing"] is False

    # The lock as built: verify passes against the same rebuild, building nothing again, and a
    # passing verify removes its rebuild dir.
    good = ws.doit("verify", "only=demo", f"rebuilt={kept}")
    assert_ok(good)
    assert "demo: VERIFIED" in good.out and "1 of 1 variants byte-identical" in good.out
    assert f"comparing with the rebuild kept in {kept}" in good.out
    assert json.loads((ws.build / "verify" / "report.json").read_text())["rebuilt_from_nothing"] is False
    assert not list((ws.build / "verify").glob("run-*"))
    # A folder verify did not make is refused, naming it.
    stray = ws.doit("verify", "only=demo", f"rebuilt={ws.build / 'store'}")
    assert stray.proc.returncode != 0 and "not a rebuild dir that `doit verify` kept" in stray.out


def _ran(build) -> set:
    """The steps whose outputs a build dir holds, as task-name prefixes (source:, convert:, ...)."""
    kinds = {"synthetic": "source:", "convert": "convert:", "quantize": "quantize:"}
    return {kinds[k.name] for k in (build / "store").iterdir() if k.name in kinds and any(k.iterdir())}


def test_a_gguf_with_one_tensor_changed_is_reported_by_tensor_name(demo_workspace, tmp_path):
    original = demo_workspace.variant("demo") / "demo-Q4_K_M.gguf"
    changed = tmp_path / "demo-Q4_K_M.gguf"
    flip_tensor_bytes(original, changed, "blk.2.ffn_up.weight")
    report = ggufdiff.compare(original, changed)
    assert not report["identical"] and report["metadata"] == []
    assert [t["tensor"] for t in report["tensors"]] == ["blk.2.ffn_up.weight"]
    row = report["tensors"][0]
    assert row["type"] == ["Q4_K", "Q4_K"] and 0 < row["bytes_differing_share"] < 0.01
    assert row["max_abs_diff"] > 0
    text = "\n".join(ggufdiff.format_report(report))
    assert "blk.2.ffn_up.weight" in text and "1 of 55 tensors differ" in text
    # The tokenizer arrays are compared too: one character of one token changed is named by its key.
    retokenized = tmp_path / "retokenized.gguf"
    shutil.copyfile(original, retokenized)
    assert ggufdiff.compare(original, retokenized)["identical"]
    change_first_string(retokenized, "tokenizer.ggml.tokens")
    report = ggufdiff.compare(original, retokenized)
    assert not report["identical"] and report["tensors"] == []
    assert [m["key"] for m in report["metadata"]] == ["tokenizer.ggml.tokens"], report["metadata"]


def test_a_flipped_byte_is_found_by_check_cache_and_rebuilt_by_the_next_doit(demo_workspace):
    ws = demo_workspace
    key = ws.lock()["variants"]["demo"]["keys"]["quantize"]
    entry = ws.build / "store" / "quantize" / key
    gguf = next(entry.glob("*.gguf"))
    want = json.loads((entry / "manifest.json").read_text())["files"][0]["sha256"]
    st = gguf.stat()
    with open(gguf, "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0x01]))
    # Bit rot keeps size and mtime: the fast path (stat cache) cannot see it...
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert "quantize:demo" in ws.doit("alloy=demo").skipped
    # ...the cache check reads every byte.
    check = ws.doit("check-cache")
    assert check.proc.returncode != 0
    assert f"DAMAGED quantize/{key}" in check.out and "the next `doit` rebuilds it" in check.out
    assert not entry.exists() and list((ws.build / "store" / ".damaged").glob(f"quantize-{key}-*"))
    rebuilt = ws.doit("alloy=demo")
    assert_ok(rebuilt)
    assert "quantize:demo" in rebuilt.executed
    assert json.loads((entry / "manifest.json").read_text())["files"][0]["sha256"] == want
    assert ws.doit("check-cache").proc.returncode == 0


def test_verify_refuses_an_empty_lock_unknown_ids_and_other_options():
    from compiler import verify
    from compiler.errors import ForgeError

    lock = {"lockVersion": 1, "variants": {"demo": {"alloy": "demo", "tier": "m4"},
                                           "demo@q8_0": {"alloy": "demo", "tier": "m4"}}}
    assert verify.selected(lock, {"alloy": "demo"}) == ["demo", "demo@q8_0"]
    assert verify.selected(lock, {"only": "demo@q8_0"}) == ["demo@q8_0"]
    with pytest.raises(ForgeError, match="records no variants"):
        verify.selected({"lockVersion": 1, "variants": {}}, {})
    with pytest.raises(ForgeError, match="no such variant") as e:
        verify.selected(lock, {"only": "demo,demo@q4_0"})
    assert "demo@q4_0" in str(e.value)
    with pytest.raises(ForgeError, match="only=, alloy= and tier= alone"):
        verify.selected(lock, {"alloy": "demo", "quant": "q8_0"})
