"""Preflight: before the first step runs, every byte the selected run will still write, per file
system, against its free space. A 27B forge writes about 55 GB of download, a 51 GB BF16 reference,
a 27 GB static Q8_0 yardstick, its quants, two projectors and the reference logits; a disk that
fills half-way through ends in a converter's traceback hours in. Refused here instead, in the first
seconds, naming what, where, the bytes needed and the bytes free; nothing is written.

Sizes come, best first, from:
  1. the checkpoint's own safetensors headers (a local folder, or a source already in the store):
     parameters per part (text, vision tower, MTP head), exact;
  2. plan mode's figures for the official checkpoints (docs/fit-matrix.json, `python -m
     compiler.fit`: every quant's exact size from llama-quantize --dry-run) where the alloy's
     baseModel is one of them;
  3. the committed lock's record of the source's files (a source rebuilt from its recipe, the demo).
A source none of them knows (another Hub repo, not yet downloaded) is said to be unsized; its
download still checks its own size against the disk before the first byte (compiler/hub.py).

Bounds, not guesses, where the exact figure is not known: a quant is never larger than the BF16
reference; the importance matrix is a small fraction of it. FORGE_PREFLIGHT=0 skips the check (a
person who knows the disk better; the tests that fill a disk on purpose).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import ForgeError

MARGIN = 0.10            # on top of the estimate: file system overhead, logs, manifests, what the estimates miss
MARGIN_BYTES = 64 << 20  # and a floor for the small outputs (reports, logs) of every step
SMALL_OUTPUT = 1 << 20   # a report-only step (validate, gate, smoke, envelope, receipt, ...)
QWEN35_VOCAB = 248320


@dataclass(frozen=True)
class Need:
    task: str
    bytes: int
    folder: Path   # where it is written (its file system is what counts)
    how: str       # where the figure comes from


@dataclass
class Source:
    """Parameter counts of a source checkpoint's parts, and how they are known."""
    text: int
    vision: int
    mtp: int
    files_bytes: int          # its files as downloaded or generated
    vocab: int
    how: str
    quant_bytes: dict | None = None   # llama type -> exact text GGUF bytes (plan mode), where known
    mmproj_f16_bytes: int | None = None
    draft_bf16_bytes: int | None = None


def _params_from_headers(folder: Path) -> Source:
    from .weights import _read_header, _shards

    parts = {"text": 0, "vision": 0, "mtp": 0}
    total = 0
    for shard in _shards(folder):
        _, header = _read_header(shard)
        total += shard.stat().st_size
        for name, t in header.items():
            n = 1
            for d in t["shape"]:
                n *= d
            part = "vision" if ".visual." in name or name.startswith("visual.") else \
                "mtp" if name.startswith("mtp.") or ".mtp." in name else "text"
            parts[part] += n
    config = json.loads((folder / "config.json").read_text())
    vocab = config.get("text_config", config).get("vocab_size", QWEN35_VOCAB)
    return Source(parts["text"], parts["vision"], parts["mtp"], total, vocab, f"the safetensors headers in {folder}")


def _official(base_model: str) -> Source | None:
    """From plan mode's table for an official checkpoint (Qwen/Qwen3.5-<size>)."""
    from .paths import ROOT

    m = re.search(r"Qwen3\.5-([0-9.]+B)$", base_model)
    table = ROOT / "docs" / "fit-matrix.json"
    if not m or not table.is_file():
        return None
    rows = [r for r in json.loads(table.read_text()) if r["shape"] == m.group(1).lower()]
    if not rows:
        return None
    quant = {r["quant"]: r["text_file_bytes"] for r in rows}
    # Q8_0 stores 34 bytes per 32 weights: the text parameters within a fraction of a percent.
    text = int(quant["Q8_0"] * 32 / 34)
    vision = rows[0]["mmproj_file_bytes"] // 2
    shape = json.loads((ROOT / "shapes" / f"{m.group(1).lower()}.json").read_text())
    tc = shape["text_config"]
    # The MTP head: about one decoder layer of the text model.
    mtp = text // max(tc.get("num_hidden_layers", 1), 1) * tc.get("mtp_num_hidden_layers", 0)
    return Source(text, vision, mtp, 2 * (text + vision + mtp), tc.get("vocab_size", QWEN35_VOCAB),
                  f"plan mode's figures for {base_model} (docs/fit-matrix.json)", quant, rows[0]["mmproj_file_bytes"],
                  rows[0].get("mtp_draft_file_bytes"))


def _locked(alloy_name: str) -> Source | None:
    """From the committed lock's record of the source's files: their bytes bound every part."""
    from .lockfile import read

    try:
        entries = [e for e in read(check=False)["variants"].values() if e["alloy"] == alloy_name]
    except (OSError, ValueError, KeyError):
        return None
    if not entries:
        return None
    files = entries[0]["source"]["files"]
    counted = entries[0].get("parameters")  # from the GGUFs' tensor tables, at lock time
    if counted:
        return Source(counted["text"], counted["projector"], 0, sum(f["size"] for f in files), QWEN35_VOCAB,
                      f"the lock's record of {alloy_name} (its files and parameter counts)")
    weights = sum(f["size"] for f in files if f["filename"].endswith(".safetensors"))
    # Stored as F32 at worst: weights/2 bounds the BF16 parameters of every part taken together.
    bound = weights // 2
    return Source(bound, bound, 0, sum(f["size"] for f in files), QWEN35_VOCAB,
                  f"the lock's record of {alloy_name}'s source files (an upper bound)")


def source_of(plan, variant) -> Source | None:
    from .store import Entry

    step = variant.steps["source"]
    if step.kind == "local":
        return _params_from_headers(Path(step.runtime["path"]))
    entry = Entry(step.kind, step.key)
    if entry.is_complete():
        from .stages.source import checkpoint_dir

        return _params_from_headers(checkpoint_dir(entry))
    return _official(variant.alloy.source["baseModel"]) or _locked(variant.alloy.name)


def step_bytes(step, src: Source, variant) -> tuple[int, str]:
    """Bytes a step writes into its store entry (hard links and reports aside)."""
    kind, p = step.kind, step.params
    # A text GGUF also carries its tokenizer (tokens, types, merges: ~40 bytes a token) and its
    # norms in F32: counted with the weights.
    bf16_text = 2 * src.text + 48 * src.vocab
    if kind in ("synthetic", "hub"):
        return (src.files_bytes, src.how)
    if kind == "convert":
        return bf16_text, src.how
    if kind == "mmproj":
        f16 = src.mmproj_f16_bytes or 2 * src.vision
        return (2 * f16 if p["outtype"] == "f32" else f16), src.how
    if kind == "mtp-draft":
        # The head plus the token embedding and output head it reads and writes through (at 27B
        # 3.4 GB, most of it the embedding): plan mode's exact figure, else the BF16 text reference
        # bounds it (at the conversion type, the draft holds less than the whole model).
        if src.draft_bf16_bytes and p["outtype"] == "bf16":
            return src.draft_bf16_bytes, src.how
        return bf16_text + 2 * src.mtp, "at most the BF16 reference and the head"
    if kind == "mmproj-quantize":
        return src.mmproj_f16_bytes or 2 * src.vision, "at most the F16 projector"
    if kind == "quantize":
        exact = (src.quant_bytes or {}).get(p["llama_type"])
        return (exact, src.how) if exact else (bf16_text, "at most the BF16 reference")
    if kind == "imatrix":
        return bf16_text // 100 + SMALL_OUTPUT, "at most 1% of the BF16 reference"
    if kind == "kld-base":
        # llama-perplexity --kl-divergence-base: per scored token (the second half of each chunk)
        # the vocabulary's log-probabilities as 16-bit values and a few more.
        scored = p["chunks"] * (p["ctx"] - p["ctx"] // 2)
        return scored * 2 * (src.vocab + 5) + SMALL_OUTPUT, f"{p['chunks']} x {p['ctx'] // 2} scored tokens x {src.vocab} logits"
    return SMALL_OUTPUT, "a report"


def needs(plan, from_nothing: bool = False, only: set | None = None) -> tuple[list[Need], list[str]]:
    """(what the run still writes, the alloys whose source could not be sized). Every step belongs
    to the source its variant's steps lead back to (the gate's yardstick and reference logits, the
    smoke's F32 projector included); a step in the store already writes nothing (from_nothing: as
    on a machine with an empty store and no network problem, for the table in the README)."""
    from .paths import store_dir
    from .store import Entry

    out, unsized, seen = [], [], set()
    for variant in plan.variants:
        todo = [s.task for s in variant.steps.values()]
        mine = []
        while todo:
            task = todo.pop()
            if task in seen:
                continue
            seen.add(task)
            step = plan.steps[task]
            todo.extend(t for _, t in step.inputs)
            todo.extend(step.after)
            if step.kind != "local" and (only is None or task in only) and \
                    (from_nothing or not Entry(step.kind, step.key).is_complete()):
                mine.append(step)
        if not mine:
            continue
        if "unresolved" in variant.steps["source"].params and not from_nothing:
            continue  # no commit to fetch: its source step fails at once, writing nothing (graph.py)
        src = source_of(plan, variant)
        if src is None:
            unsized.append(variant.alloy.name)
            continue
        for step in mine:
            n, how = step_bytes(step, src, variant)
            if step.kind == "hub":
                from .hub import storage

                folder = storage(variant.alloy.source["baseModel"])  # the Hub cache; the store only links
            else:
                folder = store_dir() / step.kind
            out.append(Need(step.task, n, folder, how))
    return out, unsized


def _existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


# doit commands that build nothing (the forge's own verify, publish and check-cache among them:
# verify's rebuild runs a doit of its own in its fresh build dir, which checks for itself).
NOT_BUILDING = {"list", "info", "help", "clean", "forget", "ignore", "dumpdb", "strace", "reset-dep", "tabcompletion",
                "verify", "publish", "check-cache"}


def wanted_by(argv: list[str]) -> bool:
    """Whether this doit command line builds (a plain `doit`, `doit run`, `doit quantize`, ...)."""
    return not any(w in NOT_BUILDING for w in _words(argv))


def _words(argv: list[str]) -> list[str]:
    return [a for a in argv if "=" not in a and not a.startswith("-")]


def targets_of(plan, argv: list[str]) -> set | None:
    """The tasks a command line names (`doit quantize:demo mmproj`, as verify's rebuild does) and
    what they need; None for a plain `doit` (everything)."""
    basenames = {s.basename for s in plan.steps.values()}
    # Words that name tasks (an option's value, like -f's dodo.py, names none).
    named = [w for w in _words(argv) if w in plan.steps or w in basenames or w in ("lock", "registry", "toolchain")]
    if not named:
        return None
    todo = [t for t in plan.steps if t in named or plan.steps[t].basename in named]
    if any(w in ("lock", "registry") for w in named):
        return None  # they need every receipt
    out = set()
    while todo:
        t = todo.pop()
        if t not in out:
            out.add(t)
            todo.extend(x for _, x in plan.steps[t].inputs)
            todo.extend(plan.steps[t].after)
    return out


def check(plan, argv: list[str] | None = None, log=print) -> None:
    """Refuse the run when a file system it writes to lacks the room; say what it needs otherwise.
    `argv`: doit's command line, whose named tasks (if any) limit what is counted."""
    if os.environ.get("FORGE_PREFLIGHT", "1").strip().lower() in ("0", "false", "off", "no"):
        return
    wanted, unsized = needs(plan, only=targets_of(plan, argv or []))
    by_fs: dict[int, list[Need]] = {}
    anchor: dict[int, Path] = {}
    for n in wanted:
        where = _existing(n.folder)
        dev = where.stat().st_dev
        by_fs.setdefault(dev, []).append(n)
        anchor.setdefault(dev, where)
    short = []
    for dev, items in by_fs.items():
        total = sum(n.bytes for n in items)
        need = int(total * (1 + MARGIN)) + MARGIN_BYTES
        free = shutil.disk_usage(anchor[dev]).free
        if need > free:
            biggest = sorted(items, key=lambda n: -n.bytes)[:4]
            short.append(f"{anchor[dev]}: needs {need / 1e9:.2f} GB ({total / 1e9:.2f} GB of outputs + "
                         f"{MARGIN:.0%} and {MARGIN_BYTES >> 20} MiB of margin), {free / 1e9:.2f} GB free; largest: "
                         + ", ".join(f"{n.task} {n.bytes / 1e9:.2f} GB ({n.how})" for n in biggest))
    if short:
        raise ForgeError("not enough free disk for this run: nothing was written",
                         where="preflight", found="; ".join(short),
                         hint="free space there, point FORGE_BUILD_DIR (or HF_HOME for downloads) at a larger disk, "
                              "or build fewer alloys at once (alloy=...); FORGE_PREFLIGHT=0 skips this check")
    if wanted:
        total = sum(n.bytes for n in wanted)
        log(f"forge: preflight: this run writes about {total / 1e9:.2f} GB on {len(by_fs)} file system(s); "
            f"room on each" + (f"; not sized before download: {', '.join(unsized)}" if unsized else ""))


def main(argv=None) -> int:
    """`python -m compiler.preflight [alloy=a,b] [tier=...] [quant=...]`: what each selected alloy's
    forge writes from nothing, per step and per place (the store, the Hugging Face cache)."""
    import sys

    from .graph import compile_graph

    args = dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # sizes come from plan mode, not the Hub
    plan = compile_graph(args)
    wanted, unsized = needs(plan, from_nothing=True)
    for variant in plan.variants:
        mine = {s.task for s in variant.steps.values()}
        rows = [n for n in wanted if n.task in mine or n.task.split(":", 1)[1].startswith(
            variant.steps["source"].name)]
        store = sum(n.bytes for n in rows if "/store/" in str(n.folder) or str(n.folder).endswith("/store"))
        cache = sum(n.bytes for n in rows) - store
        print(f"{variant.id}: {(store + cache) / 1e9:.1f} GB from nothing: {cache / 1e9:.1f} GB download into the "
              f"Hugging Face cache, {store / 1e9:.1f} GB into the store")
        for n in sorted(rows, key=lambda n: -n.bytes):
            if n.bytes >= 1e8:
                print(f"  {n.task:<48} {n.bytes / 1e9:7.2f} GB  ({n.how})")
    if unsized:
        print(f"not sized before download: {', '.join(unsized)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
