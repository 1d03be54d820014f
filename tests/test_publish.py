"""`doit publish` against a Hub on loopback, driven through the real huggingface_hub client: a dry run
creates nothing; a push creates the repo and commits the staged files (hashes as in the lock, the
card's front matter as the Hub reads it); a second push uploads nothing; a variant whose files no
longer match the lock is refused; the token appears in no output, file or log."""
from __future__ import annotations

import hashlib
import itertools
import json

import pytest
import yaml

from conftest import SEED_KINDS, Workspace, assert_ok
from continuum_product import arrive, pick_files
from hub_loopback import LoopbackHub

pytestmark = pytest.mark.build

TOKEN = "hf_forgeLoopbackSecret0123456789abcdef"
REPO = "continuum-ai/qwen3.5-demo-tiny-seeing-GGUF"


@pytest.fixture()
def hub():
    with LoopbackHub(token=TOKEN) as server:
        yield server


def publish(ws, hub, *args):
    return ws.doit("publish", "alloy=demo", *args, HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1",
                   HF_TOKEN=TOKEN, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1")


def download(folder, files: dict, order):
    """The repo's files arriving in `order` (their bytes are the Hub's, checked against the lock)."""
    assert set(order) <= set(files), order
    return arrive(folder, order)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_publish_dry_run_push_and_a_second_push_that_uploads_nothing(demo_workspace, hub):
    ws = demo_workspace
    lock = ws.lock()["variants"]["demo"]
    dry = publish(ws, hub)
    assert_ok(dry)
    assert f"would create repo {REPO}" in dry.out and "dry run: 5 to upload" in dry.out
    assert hub.repos == {}  # a dry run creates and uploads nothing

    first = publish(ws, hub, "push=1")
    assert_ok(first)
    assert f"creating repo {REPO}" in first.out and "committed 5 files" in first.out
    files = hub.committed_files(REPO)
    assert set(files) == {"README.md", "demo-Q4_K_M.gguf", "mmproj-demo-F16.gguf", "demo.alloy.json",
                          "registry-entry.json"}
    for out in lock["outputs"]:
        assert files[out["filename"]] == out["sha256"]
    card = hub.repos[REPO]["files"]["README.md"].decode()
    meta = front_matter(card)
    assert meta["base_model"] == "forge-demo/qwen3.5-tiny-seeing"
    assert meta["base_model_relation"] == "quantized" and meta["pipeline_tag"] == "image-text-to-text"
    assert meta["license"] == "apache-2.0" and meta["quantized_by"] == "continuum-ai"
    assert {"continuum-ai", "forged", "forge-alloy", "gguf", "vision", "qwen3.5", "m4", "Q4_K_M"} <= set(meta["tags"])
    assert lock["outputs"][0]["sha256"] in card and "llama-mtmd-cli" in card and "doit verify only=demo" in card
    # The card claims only the backend the smoke really ran on.
    assert "mechanics verified on cpu, metal not verified" in card
    executed = json.loads(hub.repos[REPO]["files"]["demo.alloy.json"])
    assert executed["results"]["integrity"]["fileHashes"] == lock["outputs"]
    entry = json.loads(hub.repos[REPO]["files"]["registry-entry.json"])
    assert entry["demo"]["repo"] == REPO
    assert len(hub.repos[REPO]["commits"]) == 1

    puts = sum(1 for method, _, _ in hub.requests if method == "PUT")
    second = publish(ws, hub, "push=1")
    assert_ok(second)
    assert "nothing to upload" in second.out and second.out.count("same hash on the Hub") == 5
    assert len(hub.repos[REPO]["commits"]) == 1
    assert sum(1 for method, _, _ in hub.requests if method == "PUT") == puts

    # The token went to the Hub in the Authorization header and nowhere else.
    assert any(h.get("authorization") == f"Bearer {TOKEN}" for _, _, h in hub.requests)
    for run in (dry, first, second):
        assert TOKEN not in run.out
    for path in ws.build.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 5_000_000:
            assert TOKEN.encode() not in path.read_bytes(), path
    for name, data in hub.repos[REPO]["files"].items():
        assert TOKEN.encode() not in data, name


def test_publish_refuses_files_that_differ_from_the_lock_and_a_bad_token_stays_secret(demo_workspace, hub):
    ws = demo_workspace
    lock_path = ws.alloys / "forge.lock.json"
    original = lock_path.read_text()
    lock = json.loads(original)
    mm = next(o for o in lock["variants"]["demo"]["outputs"] if o["filename"].startswith("mmproj-"))
    mm["sha256"] = hashlib.sha256(b"not the projector").hexdigest()
    lock_path.write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")
    try:
        refused = publish(ws, hub, "push=1")
    finally:
        lock_path.write_text(original)
    assert refused.proc.returncode != 0
    assert "REFUSED" in refused.out and "mmproj-demo-F16.gguf does not hash as the lock records" in refused.out
    assert hub.repos == {}

    wrong = "hf_wrongTokenThatMustNotLeak987654321"
    bad = ws.doit("publish", "alloy=demo", "push=1", HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1",
                  HF_TOKEN=wrong, HF_HUB_OFFLINE="0")
    assert bad.proc.returncode != 0 and "FAILED to upload" in bad.out
    assert wrong not in bad.out and hub.repos.get(REPO, {}).get("commits", []) == []


def test_every_publish_message_is_scrubbed_of_the_token(capsys):
    from compiler.publish import _Scrub

    say = _Scrub(TOKEN)
    say(f"HTTP 401 for https://hub/api?token={TOKEN}: Bearer {TOKEN}")
    out = capsys.readouterr().out
    assert TOKEN not in out and out.count("<token>") == 2


def test_a_tier_repo_holds_every_declared_quant_of_its_alloy(tmp_path, hub, demo_seed):
    ws = Workspace(tmp_path)
    # The session's trained source and its shared steps: this test is about the repo's files.
    ws.seed(demo_seed, SEED_KINDS)
    repo = "continuum-ai/qwen3.5-demo-two-GGUF"
    path = ws.add_alloy("demo-two")
    data = json.loads(path.read_text())
    next(s for s in data["stages"] if s["type"] == "quant")["quantTypes"] = ["Q4_K_M", "Q8_0"]
    next(s for s in data["stages"] if s["type"] == "publish")["repo"] = repo
    path.write_text(json.dumps(data, indent=2) + "\n")
    assert_ok(ws.doit("alloy=demo-two"))
    lock = ws.lock()["variants"]
    assert {"demo-two", "demo-two@q8_0"} <= set(lock)  # both declared: both in the committed lock
    run = ws.doit("publish", "alloy=demo-two", "push=1", HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1",
                  HF_TOKEN=TOKEN, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1")
    assert_ok(run)
    files = hub.repos[repo]["files"]
    # Two quants beside one projector, one card, each quant's executed alloy, both registry entries.
    assert set(files) == {"demo-two-Q4_K_M.gguf", "demo-two-Q8_0.gguf", "mmproj-demo-two-F16.gguf", "README.md",
                          "demo-two.alloy.json", "demo-two-Q8_0.alloy.json", "registry-entry.json"}
    assert len(hub.repos[repo]["commits"]) == 1
    card = files["README.md"].decode()
    for variant, quant in (("demo-two", "Q4_K_M"), ("demo-two@q8_0", "Q8_0")):
        text = next(o for o in lock[variant]["outputs"] if not o["filename"].startswith("mmproj-"))
        row = next(line for line in card.splitlines() if line.startswith(f"| `{text['filename']}`"))
        assert text["sha256"] in row and f"text model, {quant}" in row and "(pass)" in row and " MiB |" in row
        assert hashlib.sha256(files[text["filename"]]).hexdigest() == text["sha256"]
    assert "default quant is **Q4_K_M**" in card and "doit verify only=demo-two,demo-two@q8_0" in card
    entries = json.loads(files["registry-entry.json"])
    assert set(entries) == {"demo-two", "demo-two-q8_0"}
    registry = json.loads(ws.registry.read_text())["models"]
    assert registry["demo-two-q8_0"]["quants"] == {"default": "Q4_K_M", "available": ["Q4_K_M", "Q8_0"]}
    assert json.loads(files["demo-two-Q8_0.alloy.json"])["results"]["integrity"]["fileHashes"] == \
        lock["demo-two@q8_0"]["outputs"]
    assert entries["demo-two"]["quants"] == {"default": "Q4_K_M", "available": ["Q4_K_M", "Q8_0"]}
    # The product's file rules on this repo: a client that downloads an entry's allow_patterns finds
    # exactly its model and projector, in every download order; the whole repo gives whichever quant
    # came last (why each entry names its files).
    for alias, e in entries.items():
        want = next(f["filename"] for f in e["files"] if f["role"] == "text")
        assert sorted(e["allow_patterns"]) == sorted(f["filename"] for f in e["files"])
        for order in itertools.permutations(e["allow_patterns"]):
            got = pick_files(download(tmp_path / "dl" / alias, files, order))
            assert got == {"model": want, "projectors": ["mmproj-demo-two-F16.gguf"], "drafts": []}, (alias, order)
    whole = [n for n in files if n.endswith(".gguf")]
    picked = {pick_files(download(tmp_path / "dl" / "all", files, order))["model"] for order in itertools.permutations(whole)}
    assert picked == {"demo-two-Q4_K_M.gguf", "demo-two-Q8_0.gguf"}
    # The alloy stops declaring Q8_0: its lock entry goes (the lock records what alloys declare).
    next(s for s in data["stages"] if s["type"] == "quant")["quantTypes"] = ["Q4_K_M"]
    path.write_text(json.dumps(data, indent=2) + "\n")
    assert_ok(ws.doit("alloy=demo-two"))
    assert set(ws.lock()["variants"]) == {"demo-two"}


def test_random_weights_and_experiments_are_never_pushed(demo_workspace, hub):
    ws = demo_workspace
    cfg = ws.conf / "config.yaml"
    original = cfg.read_text()
    cfg.write_text(original.replace("allow_synthetic: true", "allow_synthetic: false"))
    try:
        run = publish(ws, hub, "push=1")
    finally:
        cfg.write_text(original)
    assert run.proc.returncode != 0
    assert "synthetic source (made by the forge, not a released model): staged for inspection; pushing it needs publish.allow_synthetic=true" in run.out
    # A command-line experiment would replace the tier repo's card and default recipe: refused.
    experiment = publish(ws, hub, "quant=q8", "push=1")
    assert experiment.proc.returncode != 0
    assert "an experiment (overrides quant=q8_0) is not published" in experiment.out
    assert hub.repos == {}
