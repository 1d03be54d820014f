"""The remote cache (compiler/remote.py) between machines, through the real `doit`: a `file://`
remote on a shared folder, and S3 spoken to moto's S3 server on loopback (started here, stopped by
PID). Machines are build dirs with their own empty stores and names (FORGE_MACHINE_NAME); they
share the toolchain cache, as two checkouts of one release do. What a person would notice: a second
machine runs no stage, only restores, and ends with the same bytes and the same lock; a damaged blob
is refused and that one step built again; a cut push is finished by the next run; a machine that
made other bytes for a step is reported by name and never overwrites; no credential shows anywhere."""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DEMO_ALLOY, ROOT, Workspace, assert_ok

pytestmark = pytest.mark.build
SECRET = "forge-test-" + secrets.token_hex(12)
KEY_ID = "FORGETESTKEY" + secrets.token_hex(4).upper()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def machine(root: Path, name: str, seed_from: Path | None = None, kinds: tuple = ()) -> Workspace:
    ws = Workspace(root / name)
    shutil.copy(DEMO_ALLOY, ws.alloys / DEMO_ALLOY.name)
    if seed_from is not None:
        ws.seed(seed_from, kinds)
    ws.name = name
    return ws


def doit(ws: Workspace, *args: str, **env):
    return ws.doit(*args, FORGE_MACHINE_NAME=ws.name, **env)


def ran(run) -> list[str]:
    return [line for line in run.out.splitlines() if ": done in " in line]


def test_a_second_machine_restores_the_demo_from_a_shared_folder_and_runs_no_stage(tmp_path, demo_workspace):
    remote = tmp_path / "shared" / "forge-cache"
    url = remote.as_uri()
    # Machine A built the demo before any remote was configured (its store: the session's build),
    # then pushes what it has.
    a = machine(tmp_path, "machine-a", demo_workspace.build / "store",
                tuple(p.name for p in (demo_workspace.build / "store").iterdir()))
    assert_ok(doit(a, "alloy=demo"))
    pushed = doit(a, "push", "alloy=demo", f"remote={url}")
    assert_ok(pushed)
    assert "push: " in pushed.out and " pushed" in pushed.out
    # Files under their sha256, one action record per step, nothing half-written left.
    records = sorted(remote.glob("ac/*/*.json"))
    assert {p.parent.name for p in records} >= {"synthetic", "convert", "quantize", "smoke", "receipt"}
    for rec in records:
        for f in json.loads(rec.read_text())["manifest"]["files"]:
            blob = remote / "cas" / f["sha256"][:2] / f["sha256"]
            assert blob.stat().st_size == f["size"]
    assert not list(remote.rglob("*.partial-*"))

    # Machine B: another build dir, an empty store, the remote read-only for it. It restores every
    # step and runs none.
    b = machine(tmp_path, "machine-b")
    run = doit(b, "alloy=demo", f"remote={url}", "remote_readonly=1")
    assert_ok(run)
    assert not ran(run), ran(run)
    restored = [line for line in run.out.splitlines() if "restored from the remote cache" in line]
    assert len(restored) == len(records) and all("built by machine-a" in line for line in restored)
    for name in ("demo-Q4_K_M.gguf", "mmproj-demo-F16.gguf", "demo.alloy.json"):
        assert sha256(b.variant("demo") / name) == sha256(a.variant("demo") / name), name
    assert b.lock()["variants"]["demo"] == a.lock()["variants"]["demo"]
    assert json.loads((b.build / ".forge" / "restored.json").read_text())  # who built what, kept aside
    refused = doit(b, "push", "alloy=demo", f"remote={url}", "remote_readonly=1")
    assert refused.proc.returncode != 0 and f"the remote cache {url} is read-only here" in refused.out
    assert sorted(remote.glob("ac/*/*.json")) == records

    # A no-op run stays offline: a remote that cannot even be reached changes nothing.
    again = doit(b, "alloy=demo", "remote=s3://forge-unreachable/cache", AWS_ENDPOINT_URL="http://127.0.0.1:9",
                 AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y")
    assert_ok(again)
    assert again.executed == set() and "remote" not in again.out.replace("remote=", "")


# -- S3 ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on loopback with one bucket; the environment a machine needs to reach it."""
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": KEY_ID,
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        with pytest.MonkeyPatch.context() as mp:  # this process's own S3 client (the checks below)
            for k, v in env.items():
                mp.setenv(k, v)
            import s3fs

            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            fs.mkdir("forge-remote")
            yield {"env": env, "fs": fs, "url": "s3://forge-remote/cache", "outputs": [], "machines": []}
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


def s3_doit(s3, ws, *args, **env):
    s3["machines"].append(ws.root)
    run = doit(ws, *args, f"remote={s3['url']}", **s3["env"], **env)
    s3["outputs"].append(run.out)
    return run


def record(s3, kind: str, key: str) -> dict:
    s3["fs"].invalidate_cache()
    return json.loads(s3["fs"].cat_file(f"forge-remote/cache/ac/{kind}/{key}.json"))


@pytest.fixture(scope="module")
def machine_c(tmp_path_factory, demo_workspace, s3):
    """A machine holding the demo built (the session's store), configured with the S3 remote and 5 MiB
    upload parts: `doit push` sends every step up."""
    store = demo_workspace.build / "store"
    c = machine(tmp_path_factory.mktemp("s3"), "machine-c", store, tuple(p.name for p in store.iterdir()))
    assert_ok(s3_doit(s3, c, "alloy=demo"))
    run = s3_doit(s3, c, "push", "alloy=demo", FORGE_REMOTE_PART_MIB="5")
    assert_ok(run)
    assert "quantize:demo: pushed to s3://forge-remote/cache" in run.out
    c.keys = c.lock()["variants"]["demo"]["keys"]
    return c


def test_s3_multipart_upload_and_a_damaged_blob_refused_and_built_again(tmp_path, s3, machine_c):
    fs = s3["fs"]
    quant = record(s3, "quantize", machine_c.keys["quantize"])["manifest"]["files"][0]
    blob = f"forge-remote/cache/cas/{quant['sha256'][:2]}/{quant['sha256']}"
    # Uploaded in parts: its ETag is no hash of its bytes, and nothing here relies on it.
    info = fs.info(blob)
    parts = -(-quant["size"] // (5 << 20))
    assert info["size"] == quant["size"] and info["ETag"].strip('"').endswith(f"-{parts}"), info
    # The stored GGUF is damaged (same size, one changed byte).
    data = bytearray(fs.cat_file(blob))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(blob, bytes(data))

    d = machine(tmp_path, "machine-d")
    run = s3_doit(s3, d, "alloy=demo")
    assert_ok(run)
    assert f"quantize:demo: the remote's {quant['filename']} for this step is refused" in run.out
    assert [line.split(":")[0] + ":" + line.split(":")[1] for line in ran(run)] == ["  quantize:demo"], ran(run)
    assert sha256(d.variant("demo") / "demo-Q4_K_M.gguf") == quant["sha256"]
    assert d.lock()["variants"]["demo"] == machine_c.lock()["variants"]["demo"]
    # Its rebuild, pushed as it was built, put the right bytes back under the name.
    assert "quantize:demo: already recorded on s3://forge-remote/cache;" in run.out and "uploaded again" in run.out
    assert hashlib.sha256(fs.cat_file(blob)).hexdigest() == quant["sha256"]


def test_a_push_killed_midway_leaves_no_record_and_the_next_run_completes_it(s3, machine_c):
    fs = s3["fs"]
    key = machine_c.keys["quantize"]
    prefix = "s3://forge-remote/killed"
    # The push dies (no clean-up, as under SIGKILL) once the GGUF is up and before its record.
    script = ("import os, sys\nfrom compiler import remote\nfrom compiler.store import Entry\n"
              "put = remote.Remote.put_blob\n"
              "def put_then_die(self, *a):\n    put(self, *a)\n    os._exit(9)\n"
              "remote.Remote.put_blob = put_then_die\n"
              f"remote.push(remote.configured(), Entry('quantize', {key!r}), 'quantize:demo')\n")
    env = machine_c.env(**s3["env"], FORGE_REMOTE=prefix, FORGE_MACHINE_NAME="machine-c")
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True)
    s3["outputs"].append(proc.stdout + proc.stderr)
    assert proc.returncode == 9, proc.stderr
    fs.invalidate_cache()
    assert fs.ls("forge-remote/killed/cas", detail=False)  # the file went up...
    assert not fs.exists(f"forge-remote/killed/ac/quantize/{key}.json")  # ...but no record: invisible
    assert (machine_c.build / ".forge" / "remote-pending" / f"quantize--{key}").is_file()

    # The next run (nothing to build) finishes the push it finds pending, and only that.
    run = doit(machine_c, "alloy=demo", f"remote={prefix}", **s3["env"])
    s3["outputs"].append(run.out)
    assert_ok(run)
    assert run.executed == set() and f"quantize/{key[:12]}: pushed to s3://forge-remote/killed" in run.out
    fs.invalidate_cache()
    assert json.loads(fs.cat_file(f"forge-remote/killed/ac/quantize/{key}.json"))["key"] == key
    assert fs.ls("forge-remote/killed/ac", detail=False) == ["forge-remote/killed/ac/quantize"]
    assert not (machine_c.build / ".forge" / "remote-pending" / f"quantize--{key}").exists()


def test_other_bytes_for_a_pushed_step_are_reported_naming_both_machines_and_never_overwrite(tmp_path, s3, machine_c):
    fs = s3["fs"]
    key = machine_c.keys["imatrix"]
    fs.invalidate_cache()
    before = fs.cat_file(f"forge-remote/cache/ac/imatrix/{key}.json")
    # Machine E made the same importance matrix (same key) with other bytes: one changed byte.
    e = machine(tmp_path, "machine-e")
    dest = e.build / "store" / "imatrix" / key
    shutil.copytree(machine_c.build / "store" / "imatrix" / key, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    name = manifest["files"][0]["filename"]
    data = bytearray((dest / name).read_bytes())
    data[-1] ^= 0x01
    (dest / name).write_bytes(bytes(data))
    manifest["files"][0]["sha256"] = sha256(dest / name)
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    # ...and measured the same gate again (its report differs by nature: not a conflict).
    gate = machine_c.keys["gate"]
    shutil.copytree(machine_c.build / "store" / "gate" / gate, e.build / "store" / "gate" / gate)
    gate_dir = e.build / "store" / "gate" / gate
    gm = json.loads((gate_dir / "manifest.json").read_text())
    report = gate_dir / gm["files"][0]["filename"]
    report.write_text(report.read_text() + " ")
    gm["files"][0].update(sha256=sha256(report), size=report.stat().st_size)
    (gate_dir / "manifest.json").write_text(json.dumps(gm, indent=2, sort_keys=True) + "\n")

    run = s3_doit(s3, e, "push", "alloy=demo")
    assert run.proc.returncode != 0
    assert f"REPRODUCIBILITY CONFLICT in the remote cache s3://forge-remote/cache: step imatrix/{key}" in run.out
    assert "built by machine-c" in run.out and "by machine-e" in run.out and name in run.out
    assert f"gate:demo: s3://forge-remote/cache already holds machine-c's record of this step" in run.out
    assert "step gate/" not in run.out and "1 conflict" in run.out
    fs.invalidate_cache()
    assert fs.cat_file(f"forge-remote/cache/ac/imatrix/{key}.json") == before  # theirs kept, byte for byte
    (kept,) = fs.ls(f"forge-remote/cache/conflicts/imatrix/{key}", detail=False)
    assert json.loads(fs.cat_file(kept))["other"]["producer"]["machine"] == "machine-e"
    assert (e.build / "logs" / "remote-conflicts.jsonl").is_file()


def test_an_unreachable_remote_builds_here_and_the_push_waits_for_the_next_run(tmp_path, s3, machine_c):
    # Machine F has everything but the demo's quantization; its remote cannot be reached.
    store = machine_c.build / "store"
    f = machine(tmp_path, "machine-f", store, tuple(p.name for p in store.iterdir()))
    key = machine_c.keys["quantize"]
    shutil.rmtree(f.build / "store" / "quantize" / key)
    down = {**s3["env"], "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"}
    s3["machines"].append(f.root)
    run = doit(f, "alloy=demo", f"remote={s3['url']}", **down)
    s3["outputs"].append(run.out)
    assert_ok(run)
    assert f"quantize:demo: remote s3://forge-remote/cache: reading the record of quantize/{key}" in run.out
    assert "building it here" in run.out and "left to push on the next run" in run.out
    assert [line.split(": done in")[0].strip() for line in ran(run)] == ["quantize:demo"]
    marker = f.build / ".forge" / "remote-pending" / f"quantize--{key}"
    assert marker.is_file()
    # Back on line: a run with nothing to build finishes the push (the same bytes: nothing to report).
    again = s3_doit(s3, f, "alloy=demo")
    assert_ok(again)
    assert again.executed == set() and not marker.exists() and "CONFLICT" not in again.out


def test_no_credential_in_any_output_record_or_file(s3, machine_c):
    # Runs after the others in this module (pytest keeps file order): everything they printed, every
    # file the machines wrote (text ones) and every record and report on the remote.
    assert len(s3["outputs"]) >= 4
    for out in s3["outputs"]:
        assert SECRET not in out and KEY_ID not in out
    assert len(set(s3["machines"])) >= 4  # machines c, d, e, f
    for root in set(s3["machines"]):
        for p in root.rglob("*"):
            if p.is_file() and p.suffix in (".json", ".jsonl", ".log", ".txt", ".yaml", ""):
                text = p.read_bytes()
                assert SECRET.encode() not in text and KEY_ID.encode() not in text, p
    fs = s3["fs"]
    fs.invalidate_cache()
    for path in fs.find("forge-remote/cache") + fs.find("forge-remote/killed"):
        if path.endswith(".json"):
            text = fs.cat_file(path)
            assert SECRET.encode() not in text and KEY_ID.encode() not in text, path
