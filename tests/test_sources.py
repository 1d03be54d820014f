"""Real sources end to end: a Hub on loopback speaking the real protocol (model_info with file
metadata, resolve with HEAD and Range) to the real huggingface_hub client inside `doit`, serving a
tiny Qwen3.5 checkpoint sharded as the official repos are, with its own chat template; and local
checkpoints named relative to their alloy. What a person would notice: the commit a branch named is
recorded and rebuilt when it moves, a cut download resumes, verify downloads nothing, each failure
says what and for which alloy, bad weights are refused before anything is quantized."""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
from pathlib import Path

import pytest
from conftest import DEMO_ALLOY, Workspace, assert_ok

sys.path.insert(0, str(Path(__file__).parent))
from hub_loopback import LoopbackHub  # noqa: E402

REPO = "Qwen/Qwen3.5-Tiny"
# The allow patterns the real alloys carry (alloys/qwen3.5-4b-m4-vision.alloy.json).
PATTERNS = json.loads((DEMO_ALLOY.parent / "qwen3.5-4b-m4-vision.alloy.json").read_text())["source"]["allowPatterns"]
# A template of the checkpoint's own, unlike the generator's default: the registry must ship this one.
OWN_TEMPLATE = ("{%- for message in messages -%}{{- '<|im_start|>' + message['role'] + '\\n' -}}"
                "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
                "{%- for part in message['content'] -%}{%- if part['type'] == 'image' -%}"
                "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}{%- elif part['type'] == 'text' -%}"
                "{{- part['text'] -}}{%- endif -%}{%- endfor -%}{%- endif -%}{{- '<|im_end|>\\n' -}}"
                "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
TOKEN = "hf_loopback_reader"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The tiny checkpoint in the real repos' form: shards plus index, its own template, a LICENSE."""
    from compiler.synthetic import generate, load_shape

    folder = tmp_path_factory.mktemp("checkpoint") / "Qwen3.5-Tiny"
    generate(folder, load_shape("tiny"), 11, shard_size="40MB", chat_template=OWN_TEMPLATE)
    (folder / "LICENSE").write_text("Apache License 2.0 (test fixture)\n")
    assert len(list(folder.glob("model-*-of-*.safetensors"))) >= 2
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def files_of(folder: Path) -> dict:
    out = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    out["README.md"] = b"---\nlicense: apache-2.0\n---\n# a file the alloy does not ask for\n"
    return out


@pytest.fixture(scope="module")
def hub():
    with LoopbackHub(token=TOKEN) as server:
        yield server


def write_alloy(ws: Workspace, name: str, source: dict) -> Path:
    data = json.loads(DEMO_ALLOY.read_text())
    data["name"] = name
    data["source"] = {"architecture": "qwen3_5", "license": "apache-2.0", **source}
    for s in data["stages"]:
        if s["type"] == "modality":
            s["encoderModel"] = source["baseModel"]
    path = ws.alloys / f"{name}.alloy.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def workspace(root: Path) -> Workspace:
    ws = Workspace(root)
    # These checkpoints have random weights: the vision suite runs for its mechanics, ungated (a
    # conf figure, not a command-line override, so the variants stay declared ones).
    cfg = ws.conf / "config.yaml"
    cfg.write_text(cfg.read_text().replace("min_vision_score: 0.6", "min_vision_score: 0.0")
                   .replace("gate_alone: true", "gate_alone: false"))
    # Nor is their top token anything but noise over nearly flat logits (a random Q8_0 keeps it on
    # every token, a Q4_K_M on ~93%): the gate's top-token factor is opened; its KLDs still gate.
    for quant in (ws.conf / "quant").glob("*.yaml"):
        quant.write_text(re.sub(r"max_top_miss_x_q8: .*", "max_top_miss_x_q8: 1000.0", quant.read_text()))
    return ws


def hub_env(hub, home: Path, **extra) -> dict:
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1", **extra}


def biggest_shard(folder: Path) -> str:
    return max(folder.glob("model-*-of-*.safetensors"), key=lambda p: p.stat().st_size).name


def test_hub_branch_pinned_resumed_verified_and_moved(tmp_path, hub, checkpoint):
    ws = workspace(tmp_path / "ws")
    home = tmp_path / "hf"
    first = hub.seed(REPO, files_of(checkpoint))
    write_alloy(ws, "tiny-hub", {"baseModel": REPO, "revision": "main", "allowPatterns": PATTERNS})
    env = hub_env(hub, home)

    # 1. The network goes away half-way through the biggest shard: the alloy fails, saying so.
    shard = biggest_shard(checkpoint)
    size = (checkpoint / shard).stat().st_size
    hub.faults[(REPO, shard)] = {"drop_after": size // 2}
    cut = ws.doit("alloy=tiny-hub", **env)
    assert cut.proc.returncode != 0
    assert f"source {REPO}@{first}: the Hub cannot be reached" in cut.out and "alloy tiny-hub" in cut.out
    partials = list(home.rglob("*.forge-partial"))
    assert len(partials) == 1 and 0 < partials[0].stat().st_size < size
    kept = partials[0].stat().st_size

    # 2. Back on line: the next doit resumes, transferring only the rest, and builds the variant.
    hub.down.clear()
    before = hub.served.get((REPO, shard), 0)
    run = ws.doit("alloy=tiny-hub", **env)
    assert_ok(run)
    assert hub.served[(REPO, shard)] - before == size - kept
    assert f"{shard}: resuming at" in run.out
    entry = ws.lock()["variants"]["tiny-hub"]
    assert entry["source"]["resolvedRevision"] == first and entry["source"]["revision"] == "main"
    locked = {f["filename"]: f["sha256"] for f in entry["source"]["files"]}
    import hashlib

    assert locked[shard] == hashlib.sha256((checkpoint / shard).read_bytes()).hexdigest()
    assert "README.md" not in locked and "model.safetensors.index.json" in locked
    # The files are the Hugging Face cache's (hard links into the store), where the library finds them.
    from huggingface_hub import constants  # noqa: F401

    snapshot = home / "hub" / "models--Qwen--Qwen3.5-Tiny" / "snapshots" / first
    assert (snapshot / shard).resolve().read_bytes() == (checkpoint / shard).read_bytes()
    assert (home / "hub" / "models--Qwen--Qwen3.5-Tiny" / "refs" / "main").read_text() == first
    # The registry ships the checkpoint's own template, named by its hash, beside the product's
    # ChatML name, and says what the product's prompt lacks of it.
    registry = json.loads(ws.registry.read_text())
    model = registry["models"]["tiny-hub"]
    assert model["chat_template"] == "chatml"
    assert registry["gguf_chat_templates"][model["gguf_chat_template"]["name"]] == OWN_TEMPLATE
    assert model["gguf_chat_template"]["name"] == entry["chatTemplate"]["name"]
    assert model["gguf_chat_template"]["generation_prompt_extra"] == ""  # it opens no think block

    # 3. The branch moves upstream (a new chat template). verify still rebuilds the locked commit,
    #    byte for byte, downloading nothing: the cache holds it.
    moved = files_of(checkpoint)
    moved["chat_template.jinja"] = ("{#- moved upstream -#}" + OWN_TEMPLATE).encode()
    second = hub.seed(REPO, moved)
    served = hub.served_bytes(REPO)
    check = ws.doit("verify", "alloy=tiny-hub", "keep=1", **env)
    assert_ok(check)
    assert "verify: 1 of 1 variants byte-identical to the lock" in check.out
    assert hub.served_bytes(REPO) == served  # not one byte downloaded
    # ...in a build dir of its own: the conversion and quantization ran again there, none taken
    # from the workspace's store (where the same keys stand built).
    (kept,) = (ws.build / "verify").glob("run-*")
    assert json.loads((ws.build / "verify" / "report.json").read_text())["rebuilt_from_nothing"] is True
    for kind in ("convert", "quantize"):
        mine = {p.name for p in (ws.build / "store" / kind).iterdir()}
        theirs = {p.name for p in (kept / "store" / kind).iterdir()}
        assert theirs and theirs <= mine, kind
        for key in theirs:
            assert not os.path.samefile(next((kept / "store" / kind / key).glob("*.gguf")),
                                        next((ws.build / "store" / kind / key).glob("*.gguf")))
    shutil.rmtree(kept)

    # 4. doit sees the new commit, says so, and rebuilds from it; the lock records it.
    again = ws.doit("alloy=tiny-hub", **env)
    assert_ok(again)
    assert f"moved from the locked commit {first[:12]} to {second[:12]}" in again.out
    assert any(t.startswith("source:") for t in again.executed)
    entry2 = ws.lock()["variants"]["tiny-hub"]
    assert entry2["source"]["resolvedRevision"] == second
    assert entry2["outputs"] != entry["outputs"]  # the template is in the GGUF: new bytes
    # Only the changed file came over the wire.
    assert hub.served_bytes(REPO) - served == len(moved["chat_template.jinja"])

    # 5. Offline now: the lock's commit stands in for the branch, and nothing is rebuilt.
    offline = ws.doit("alloy=tiny-hub", **hub_env(hub, home, HF_HUB_OFFLINE="1"))
    assert_ok(offline)
    assert f"using the locked commit {second[:12]}" in offline.out
    assert not any(t.startswith(("source:", "convert:", "quantize:")) for t in offline.executed)

    # 6. CI on main can refuse anything but a commit sha in an alloy.
    strict = ws.doit("alloy=tiny-hub", "source.require_commit=true", **env)
    assert strict.proc.returncode == 2
    assert "source.require_commit is set" in strict.out and "$.source.revision" in strict.out and second in strict.out


def _flip_to_nan(folder: Path, tensor: str) -> None:
    """Set one element of a bf16 tensor to NaN in place (the shard holding it, per the index)."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"][tensor]
    with open(shard, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        start = header[tensor]["data_offsets"][0]
        f.seek(8 + n + start + 2 * 5)
        f.write(struct.pack("<H", 0x7FC0))


def _drop_tensor(folder: Path, tensor: str) -> None:
    from safetensors.torch import load_file, save_file

    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = folder / index["weight_map"].pop(tensor)
    tensors = load_file(str(shard))
    del tensors[tensor]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index, indent=2))


def test_failures_each_named_and_the_others_build(tmp_path, hub, checkpoint):
    """401, 404, a checksum mismatch, a NaN weight, a missing vision tensor, no chat template, a
    template whose turns are not ChatML and a checkpoint that is not the one its alloy names: each its own message naming the alloy (and the tensor or
    file), nothing of theirs converted, quantized or receipted -- while a local checkpoint named
    relative to its alloy builds, with doit run from another folder, and gets its registry entry."""
    ws = workspace(tmp_path / "ws")
    env = hub_env(hub, tmp_path / "hf")
    hub.seed("acme/private-tiny", {"config.json": b"{}"}, private=True)
    hub.seed("acme/corrupt-tiny", files_of(checkpoint))
    hub.faults[("acme/corrupt-tiny", "config.json")] = {"corrupt": True}
    write_alloy(ws, "needs-login", {"baseModel": "acme/private-tiny", "revision": "main", "allowPatterns": PATTERNS})
    write_alloy(ws, "no-such-repo", {"baseModel": "acme/missing", "revision": "main", "allowPatterns": PATTERNS})
    write_alloy(ws, "bad-bytes", {"baseModel": "acme/corrupt-tiny", "revision": "main", "allowPatterns": PATTERNS})

    # Local checkpoints beside the alloys folder, named relative to the alloy file.
    refused = ("nan", "holed", "untemplated", "llama2-chat")
    for name in ("good", *refused):
        shutil.copytree(checkpoint, ws.root / "checkpoints" / name)
    _flip_to_nan(ws.root / "checkpoints" / "nan", "model.language_model.layers.1.mlp.down_proj.weight")
    _drop_tensor(ws.root / "checkpoints" / "holed", "model.visual.blocks.1.mlp.linear_fc1.weight")
    _set_template(ws.root / "checkpoints" / "untemplated", None)
    _set_template(ws.root / "checkpoints" / "llama2-chat",
                  "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    for name in ("good", *refused):
        write_alloy(ws, f"local-{name}", {"baseModel": f"local/Qwen3.5-Tiny-{name}", "revision": "local",
                                          "localPath": f"../checkpoints/{name}"})

    # A checkpoint that is not the one the alloy names: the tiny one under an official name.
    write_alloy(ws, "local-mislabelled", {"baseModel": "Qwen/Qwen3.5-0.8B", "revision": "local",
                                          "localPath": "../checkpoints/good"})

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    import subprocess

    from conftest import DOIT
    proc = subprocess.run(DOIT, capture_output=True, text=True, env=ws.env(**env), cwd=elsewhere, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    summary = dict(line.split(None, 1) for line in proc.stdout.split("Variants:\n", 1)[1].splitlines() if line.strip())
    assert summary["local-good"].startswith("built"), out[-4000:]
    assert "alloy needs-login" in out and "refused an anonymous request (401)" in out and "HF_TOKEN" in out
    assert "alloy no-such-repo" in out and "no such repo on the Hub (404)" in out
    assert "config.json: the downloaded bytes do not match the Hub's hash" in out and "alloy bad-bytes" in out
    assert "alloy local-nan" in out and "model.language_model.layers.1.mlp.down_proj.weight holds nan" in out
    assert "alloy local-holed" in out and "model.visual.blocks.1.mlp.linear_fc1.weight" in out
    assert "alloy local-untemplated" in out and "the checkpoint has no chat template" in out
    assert "alloy local-llama2-chat" in out and "its turns are not ChatML as the product builds them" in out
    assert "alloy local-mislabelled" in out and "config.json is not the checkpoint Qwen/Qwen3.5-0.8B names" in out
    assert "text_config.hidden_size" in out, out[-3000:]
    ran = set(l.split()[-1] for l in proc.stdout.splitlines() if l.startswith(".  "))
    for bad in ("needs-login", "no-such-repo", "bad-bytes", "local-mislabelled", *(f"local-{name}" for name in refused)):
        assert summary[bad].startswith("failed"), (bad, summary[bad])
        assert f"quantize:{bad}" not in ran
        assert not (ws.build / "variants" / bad).exists()
    # A refused source costs nothing after the check: no conversion, projector, imatrix or reference logits.
    for label in (*(f"qwen3.5-tiny-{name}" for name in refused), "qwen3.5-0.8b"):
        assert f"validate:{label}" in ran
        assert not {t for t in ran if t.split(":", 1)[1].startswith(label) and not t.startswith(("source:", "validate:"))}, ran
    lock = ws.lock()["variants"]
    assert set(lock) == {"local-good"} and lock["local-good"]["source"]["kind"] == "local"
    # A local checkpoint is judged as a real one, at the limit this workspace's conf sets (0.0 here,
    # for random weights): the receipt says which limit its verdict is against.
    receipt = json.loads((ws.build / "variants" / "local-good" / "local-good.alloy.json").read_text())
    vision = {b["name"]: b for b in receipt["results"]["benchmarks"]}["vision-suite"]
    assert vision["gated"] is True and vision["metrics"]["min_score"] == 0.0 and vision["passed"] is True
    # The failures hold nothing back: the registry was regenerated with what did build.
    assert "registry:" in out and set(json.loads(ws.registry.read_text())["models"]) == {"local-good"}


def _set_template(folder, template: str | None) -> None:
    """The checkpoint's chat template replaced (None: taken away), wherever the converter looks."""
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def test_disk_too_small_is_refused_before_downloading(tmp_path, hub, checkpoint):
    """The bytes a commit still needs against the free space, checked before any download: the
    message gives both, and nothing is transferred. (A full disk cannot be made here without root;
    the free-space figure is the one thing replaced, in a child process of the real client.)"""
    import subprocess

    hub.seed("acme/big-tiny", files_of(checkpoint))
    script = (
        "import sys, pathlib\n"
        "from compiler import hub\n"
        "hub._free_bytes = lambda path: 1_000_000\n"
        "commit = hub.resolve('acme/big-tiny', 'main')\n"
        "try:\n"
        "    hub.fetch('acme/big-tiny', commit, 'main', None, pathlib.Path(sys.argv[1]), print, None, 'big')\n"
        "except hub.DiskFull as e:\n"
        "    print(e); sys.exit(3)\n")
    served = hub.served_bytes("acme/big-tiny")
    env = dict(__import__("os").environ, **hub_env(hub, tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "dest")], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    need = sum(len(v) for v in files_of(checkpoint).values()) / 1e9
    assert f"{need:.2f} GB left to download, 0.00 GB free" in proc.stdout and "alloy big" in proc.stdout
    assert hub.served_bytes("acme/big-tiny") == served


def test_two_build_dirs_fetching_one_commit_at_once_both_succeed(tmp_path, hub, checkpoint):
    """A `doit` beside a `doit verify`, or two clones, on one Hugging Face cache: both fetch the same
    commit at the same moment (real client, loopback Hub), both succeed with the same files -- into
    an empty cache, where they race for every download, and into a full one, where they race to
    link every snapshot entry."""
    import subprocess
    import time

    hub.seed("acme/shared-tiny", files_of(checkpoint))
    # Each process gets ready (imports, the commit resolved), says so, then waits for the same go.
    script = (
        "import sys, pathlib, time\n"
        "from compiler import hub, toolchain\n"
        "commit = hub.resolve('acme/shared-tiny', 'main')\n"
        "go = pathlib.Path(sys.argv[2])\n"
        "pathlib.Path(sys.argv[1] + '.ready').touch()\n"
        "while not go.exists():\n"
        "    time.sleep(0.0005)\n"
        "hub.fetch('acme/shared-tiny', commit, 'main', None, pathlib.Path(sys.argv[1]), lambda m: None,\n"
        "          toolchain.sha256_file, 'x')\n")
    root = Path(__file__).resolve().parent.parent
    served = files_of(checkpoint)
    env = dict(os.environ, **hub_env(hub, tmp_path / "hf"))
    for round_ in range(2):  # into the empty cache, then into the full one
        go = tmp_path / f"go{round_}"
        dests = [tmp_path / f"round{round_}" / name for name in ("build-a", "build-b")]
        dests[0].parent.mkdir()
        procs = [subprocess.Popen([sys.executable, "-c", script, str(d), str(go)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env=env, cwd=root) for d in dests]
        deadline = time.monotonic() + 120
        while not all(Path(f"{d}.ready").exists() for d in dests) and time.monotonic() < deadline:
            time.sleep(0.01)
        go.touch()
        outs = [p.communicate(timeout=300)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        names = sorted(p.name for p in dests[0].iterdir())
        assert names == sorted(p.name for p in dests[1].iterdir()) and "config.json" in names
        for name in names:
            assert (dests[0] / name).read_bytes() == (dests[1] / name).read_bytes() == served[name]
