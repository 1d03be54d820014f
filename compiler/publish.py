"""`doit publish`: stage each selected repo's Hugging Face folder, then -- only with `push=1` --
upload what differs.

A tier's repo holds every declared variant of its alloy (each quant type the alloy names, as GGUF
repos usually do: several quants beside one projector). The staged folder (build/publish/<alloy>/)
is what the repo will hold: each variant's text GGUF and projector under their published names,
README.md (one model card, a row per file with its gate and envelope figures), the executed alloys
(<name>.alloy.json for the tier's default quant -- the alloy's first -- and <name>-<QUANT>.alloy.json
for the others) and the registry entries (registry-entry.json). The repo is the alloy's publish
stage's, else continuum-ai/qwen3.5-<tier>-vision-forged-GGUF.

Refused, with the reason: a variant that is not built or whose gates failed (no receipt), one that
the lock does not record, and one whose files -- read in full here, not through the stat cache --
no longer hash as the lock says. Uploads skip files whose hash already matches on the Hub (sha256
for LFS files, the git blob id for small ones). The token comes from HF_TOKEN or the Hugging Face
login and is only ever handed to huggingface_hub: every message printed is scrubbed of it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ForgeError
from .paths import build_dir
from .registry import alias_for, entry as registry_entry, repo_for
from .store import Entry
from .toolchain import sha256_file


@dataclass
class Checked:
    """One variant, checked for publishing: its sources (published name -> store path) and records."""
    variant: object
    repo: str
    sources: dict = field(default_factory=dict)
    receipt: dict | None = None
    envelope: dict | None = None
    lock_entry: dict | None = None
    templates: dict = field(default_factory=dict)  # the lock's chat templates, by name
    refused: list = field(default_factory=list)
    random_weights: bool = False     # staged and shown, but not pushed unless publish.allow_synthetic


@dataclass
class Staged:
    variant: str                     # the variants it holds, e.g. "demo, demo@q6_k"
    repo: str
    folder: Path
    files: dict                      # path in repo -> local path
    refused: list = field(default_factory=list)
    random_weights: bool = False


def git_blob_id(path: Path) -> str:
    """The id git (and the Hub's tree listing) gives a regular file: sha1 of "blob <size>\\0" + data."""
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _kld(receipt: dict) -> dict:
    return next((b for b in receipt["results"]["benchmarks"] if b["name"] == "kl-divergence-vs-reference"), {})


def _variant_sections(c: Checked, multi: bool) -> list[str]:
    """One variant's memory envelope and quality/smoke sections (headed by its quant when the repo
    holds several)."""
    variant, receipt, envelope, lock_entry = c.variant, c.receipt, c.envelope, c.lock_entry
    cfg = variant.config
    tier = cfg["tier"]["name"]
    head = f"## {variant.label}: " if multi else "## "
    bench = {b["name"]: b for b in receipt["results"]["benchmarks"]}
    rt = envelope["runtime"]
    lines = ["", f"{head}Memory envelope (tier `{tier}`, backend `{envelope['backend']}`)", "",
             f"Checked at n_ctx {rt['n_ctx']} ({rt['n_ctx'] // rt['n_seq_max']} per sequence x n_seq_max "
             f"{rt['n_seq_max']}), batch {rt['n_batch']}, KV {rt['cache_type_k']}/{rt['cache_type_v']}, images up to "
             f"{rt['max_image_px']} px.", "", "| term | where | size |", "| --- | --- | ---: |"]
    lines += [f"| {t['term']} | {t['where']} | {_mib(t['bytes'])} |" for t in envelope["terms"]]
    v = envelope["verdict"]
    lines += [f"| **total** | | **{_mib(v['total_bytes'])}** |", "", "| rule | figure | limit | result |",
              "| --- | ---: | ---: | --- |"]
    lines += [f"| {r['rule']} | {_mib(r['figure'])} | {_mib(r['limit'])} | {'pass' if r['passed'] else 'FAIL'} |"
              for r in v["rules"]]
    kld = bench.get("kl-divergence-vs-reference", {})
    ver = lock_entry["verification"]
    lines += ["", f"{head}Quality and smoke", "",
              # Which backend the smoke really ran on (llama.cpp's load report): claimed only where it ran.
              f"Backend: built for `{ver['backend']}`; **{ver['summary']}**.", ""]
    if lock_entry.get("outsidePublishedSchema"):
        lines += [f"**Experiment:** {lock_entry['outsidePublishedSchema']}.", ""]
    lines += ["| check | figures | result |", "| --- | --- | --- |"]
    if kld:
        m = kld["metrics"]
        bound = {k: next(iter(v.values())) for k, v in kld.get("thresholds", {}).items()}

        def limit(name, spec):
            v = bound.get(name)
            return format(v, spec) if isinstance(v, (int, float)) else "-"
        lines.append(f"| KL divergence vs {cfg['convert']['outtype'].upper()} on {kld['dataset']} ({kld['chunks']} x "
                     f"{kld['ctx']} tokens), limits from the source's own static Q8_0 | mean {m['mean_kld']} "
                     f"(<= {limit('mean_kld', '.4g')}), p99.9 {m.get('p999_kld', '-')} "
                     f"(<= {limit('p999_kld', '.4g')}), top-1 agreement {m['top1_agreement']:.4f} "
                     f"(>= {limit('top1_agreement', '.4f')}), perplexity ratio {m['ppl_ratio']} | "
                     f"{'pass' if kld['passed'] else 'FAIL'} |")
    def verdict(entry: dict, limit: str) -> str:
        """A gated check's verdict and its limit; a check only reported says so (no verdict)."""
        if not entry["gated"]:
            return "reported, not gated (random weights)"
        return f"{'pass' if entry['passed'] else 'FAIL'} (>= {entry['metrics'][limit]})"

    if "vision-suite" in bench:
        vs = bench["vision-suite"]
        lines.append(f"| vision suite (generated images) | score {vs['metrics']['score']:.2f} over {vs['metrics']['items']} "
                     f"items | {verdict(vs, 'min_score')} |")
    if "projector-agreement" in bench:
        pa = bench["projector-agreement"]
        lines.append(f"| shipped projector answers as its F32 conversion | {pa['metrics']['agreement']:.2f} of "
                     f"{pa['metrics']['items']} items | {verdict(pa, 'min_agreement')} |")
    if "personas" in bench:
        p = bench["personas"]["metrics"]
        lines.append(f"| {p['n_seq_max']} personas in one context | isolated {p['isolated_passed']}/{p['isolated_total']}, "
                     f"equal to alone {p['equal_alone_passed']}/{p['equal_alone_total']} | "
                     f"{'pass' if bench['personas']['passed'] else 'FAIL'} |")
    if "timings" in bench:
        # A timing the smoke run could not take is absent from the metrics (the receipt names it).
        t = {k: "n/a" for k in bench["timings"].get("notMeasured", [])} | bench["timings"]["metrics"]
        lines.append(f"| timings ({bench['timings']['backend']} backend of the forging machine) | load {t['load_s']} s, "
                     f"image encode {t['image_encode_ms']} ms, prompt {t['prompt_tokens_per_s']} tok/s, generation "
                     f"{t['generation_tokens_per_s']} tok/s, first token {t['ttft_ms']} ms | measured |")
    if "vision-preservation" in bench:
        pm = bench["vision-preservation"]["metrics"]
        lines.append(f"| vision preservation | {pm['towerTensors']} tower tensors -> {pm['projectorTensors']} projector "
                     f"tensors | pass |")
    return lines


def card(items: list[Checked], repo: str) -> str:
    """The model card for a repo holding one or more variants of one alloy: Hub front matter
    (through huggingface_hub's ModelCardData), a row per file with its gate and envelope figures,
    each variant's envelope, quality and smoke, how to run (the default quant), how to reproduce."""
    from huggingface_hub import ModelCardData

    first = items[0]
    variant, lock_entry = first.variant, first.lock_entry
    alloy, cfg = variant.alloy, variant.config
    tier = cfg["tier"]["name"]
    labels = [c.variant.label for c in items]
    multi = len(items) > 1
    data = ModelCardData(
        base_model=alloy.source["baseModel"], base_model_relation="quantized", quantized_by="continuum-ai",
        pipeline_tag="image-text-to-text", license=alloy.source.get("license", "other"), library_name="gguf",
        tags=["continuum-ai", "forged", "forge-alloy", "gguf", "vision", "qwen3.5", tier, *labels],
    )
    text = next(f for f in lock_entry["outputs"] if f["filename"] == variant.text_filename)
    mmproj = next((f for f in lock_entry["outputs"] if f["filename"].startswith("mmproj-")), None)
    lines = [f"---\n{data.to_yaml()}\n---", "",
             f"# {alloy.name} ({', '.join(labels)}, {tier} tier)", "",
             alloy.data.get("description", ""), "",
             f"Forged by the forge compiler from [{alloy.source['baseModel']}](https://huggingface.co/{alloy.source['baseModel']})"
             + (f" at commit `{lock_entry['source']['resolvedRevision']}`" if lock_entry["source"].get("resolvedRevision") else
                f" (revision `{alloy.source['revision']}`)") + (": quantized text models and their vision projector (mmproj), "
             "meant to run together, fully on the GPU." if mmproj else ": quantized text models, meant to run fully on the GPU."),
             ""]
    if multi:
        lines += [f"The tier's default quant is **{labels[0]}**; {', '.join(labels[1:])} "
                  f"{'is' if len(labels) == 2 else 'are'} here beside it.", ""]
    lines += ["## Files", "",
              "| file | role | size | sha256 | quality gate (mean KLD) | envelope total | verified |",
              "| --- | --- | ---: | --- | --- | ---: | --- |"]
    projectors: dict = {}
    for c in items:
        m = _kld(c.receipt).get("metrics", {})
        kld = f"{m['mean_kld']} ({'pass' if _kld(c.receipt).get('passed') else 'FAIL'})" if m else "-"
        total = _mib(c.envelope["verdict"]["total_bytes"])
        for f in c.lock_entry["outputs"]:
            if f["filename"].startswith("mmproj-"):
                projectors.setdefault(f["filename"], (f, []))[1].append(c.variant.label)
                continue
            if f["filename"] == c.variant.draft_filename:
                projectors.setdefault(f["filename"], (f, []))[1].append(c.variant.label)
                continue
            lines.append(f"| `{f['filename']}` | text model, {c.variant.label} | {_mib(f['size'])} | `{f['sha256']}` | "
                         f"{kld} | {total} | {c.lock_entry['verification']['summary']} |")
    for name, (f, users) in projectors.items():
        role = "vision projector (mmproj)" if name.startswith("mmproj-") else "multi-token-prediction draft (MTP head)"
        lines.append(f"| `{name}` | {role}, for {', '.join(users)} | {_mib(f['size'])} | "
                     f"`{f['sha256']}` | - | - | - |")
    mtp = "kept as its own draft file (above), for speculative decoding" if variant.draft_filename else (
        "left out of the text model (conf convert.mtp=drop)")
    lines += ["", f"Multi-token-prediction head of the checkpoint, if it has one: {mtp}."]
    for c in items:
        d = c.lock_entry.get("draft")
        if d:
            # What was checked of the draft, where: never more than the decode the forge ran.
            lines.append(
                f"- with {c.variant.label}: loaded beside it and decoded through (llama.cpp `--spec-type draft-mtp`, "
                f"on {d['backend']}): {d['drafted']} tokens drafted, {d['accepted']} accepted "
                f"({d['acceptance']:.0%}); text {'equal to' if d['same_as_plain'] else 'different from'} the "
                f"model's own greedy decode ({'gated' if d['same_as_plain_gated'] else 'reported, not gated: random weights'}).")
    for c in items:
        lines += _variant_sections(c, multi)
    rt = first.envelope["runtime"]
    n_ctx = rt["n_ctx"] // rt["n_seq_max"]
    lines += ["", "## Run it", ""]
    if mmproj:
        mm = mmproj["filename"]
        lines += ["llama.cpp (the projector goes beside the model; `-ngl 99` keeps every layer on the GPU):",
                  "", "```", f"llama-mtmd-cli -m {text['filename']} --mmproj {mm} -ngl 99 \\",
                  f"  -c {n_ctx} --image photo.jpg -p \"Describe this image.\"", "```", "",
                  "llama-cpp-python:", "", "```python", "from huggingface_hub import hf_hub_download",
                  "from llama_cpp import Llama", "from llama_cpp.llama_chat_format import Qwen25VLChatHandler", "",
                  f"model = hf_hub_download(\"{repo}\", \"{text['filename']}\")",
                  f"mmproj = hf_hub_download(\"{repo}\", \"{mm}\")",
                  f"llm = Llama(model_path=model, chat_handler=Qwen25VLChatHandler(clip_model_path=mmproj),",
                  f"            n_gpu_layers=-1, n_ctx={n_ctx})", "```", ""]
    else:
        lines += ["llama.cpp (`-ngl 99` keeps every layer on the GPU):", "", "```",
                  f"llama-cli -m {text['filename']} -ngl 99 -c {n_ctx} -p \"Hello\"", "```", "",
                  "llama-cpp-python:", "", "```python", "from llama_cpp import Llama", "",
                  f"llm = Llama.from_pretrained(\"{repo}\", \"{text['filename']}\", n_gpu_layers=-1, n_ctx={n_ctx})",
                  "```", ""]
    ids = ",".join(c.variant.id for c in items)
    lines += ["## Reproduce it", "",
              f"`{alloy.name}.alloy.json` in this repo is the executed recipe (with its results)"
              + (f"; `{alloy.name}-<QUANT>.alloy.json` the other quants'" if multi else "") + ". With the forge "
              f"compiler's checkout, its `alloys/forge.lock.json` records the source files, the toolchain fingerprint "
              f"(`{lock_entry['toolchain']['fingerprint'][:16]}`: {lock_entry['toolchain']['source']}, "
              f"{lock_entry['toolchain']['machine']}) and every output's sha256; rebuild and compare byte for byte with:",
              "", "```", f"doit verify only={ids}", "```", "",
              "k-quant bytes can depend on the compiler and CPU architecture: verify names the toolchain parts that "
              "differ from the recorded ones.", ""]
    return "\n".join(lines)


def check(plan, variant, lock: dict) -> Checked:
    """Everything publishing a variant needs, or why it is refused (nothing written)."""
    c = Checked(variant=variant, repo=repo_for(variant.alloy))
    if variant.overrides:
        # A tier's repo holds the alloy's declared quants only: an experiment published there would
        # replace its card and default recipe with something no alloy declares.
        c.refused.append(f"an experiment (overrides {', '.join(variant.overrides)}) is not published: declare its "
                         f"quant in the alloy's quantTypes")
        return c
    receipt = Entry("receipt", variant.steps["receipt"].key)
    if not receipt.is_complete():
        logs = sorted(l for l in (build_dir() / "logs").glob(f"*_{variant.id}*.failed.log")
                      if l.name.endswith(f"_{variant.id}.failed.log") or f"_{variant.id}~" in l.name)
        c.refused.append("no receipt: it is not built, or its quality gate, envelope or smoke failed"
                         + (f" -- see {', '.join(str(l) for l in logs)}" if logs else
                            f" -- run `doit alloy={variant.alloy.name}` and read its errors"))
        return c
    c.lock_entry = lock["variants"].get(variant.id)
    c.templates = lock.get("chatTemplates", {})
    if c.lock_entry is None:
        c.refused.append("the lock does not record it: run `doit` to write its lock entry, and commit the lock")
        return c
    c.random_weights = variant.steps["source"].kind == "synthetic" and not variant.config["publish"]["allow_synthetic"]
    try:
        c.sources = {variant.text_filename: Entry("quantize", variant.steps["quantize"].key).output()}
        if variant.mmproj_filename:
            maker = variant.steps["projector"]
            c.sources[variant.mmproj_filename] = Entry(maker.kind, maker.key).output()
        if variant.draft_filename:
            c.sources[variant.draft_filename] = Entry("mtp-draft", variant.steps["draft"].key).output()
    except (OSError, ValueError, IndexError, KeyError):
        c.refused.append("its GGUFs are missing from build/store (moved aside by check-cache?): run `doit` to rebuild them")
        return c
    recorded = {f["filename"]: f for f in c.lock_entry["outputs"]}
    for name, path in c.sources.items():
        want = recorded.get(name)
        got = sha256_file(path) if path.is_file() else None
        if want is None or got != want["sha256"]:
            c.refused.append(f"{name} does not hash as the lock records (lock {want['sha256'] if want else 'none'}, "
                             f"file {got or 'missing'}): run `doit check-cache` and `doit verify only={variant.id}`")
    if c.refused:
        return c
    c.receipt = json.loads(receipt.file(f"{variant.alloy.name}.alloy.json").read_text())
    c.envelope = json.loads(Entry("envelope", variant.steps["envelope"].key).file("envelope.json").read_text())
    return c


def alloy_filename(c: Checked, default: bool) -> str:
    name = c.variant.alloy.name
    return f"{name}.alloy.json" if default else f"{name}-{c.variant.label}.alloy.json"


def write_repo(items: list[Checked]) -> Staged:
    """Write build/publish/<folder>/ atomically: every variant's files, one card, the executed alloys
    and the registry entries. `items` are checked variants of one alloy for one repo, default first."""
    repo = items[0].repo
    folder = build_dir() / "publish" / (items[0].variant.alloy.name if len(items) > 1 else items[0].variant.id)
    tmp = folder.with_name(folder.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for c in items:
        for name, path in c.sources.items():
            if not (tmp / name).is_symlink():  # one projector serves every quant of the alloy
                os.symlink(path, tmp / name)
    (tmp / "README.md").write_text(card(items, repo))
    registry = {}
    for i, c in enumerate(items):
        (tmp / alloy_filename(c, i == 0)).write_text(json.dumps(c.receipt, indent=2, sort_keys=True) + "\n")
        registry[alias_for(c.variant.id)] = registry_entry(c.variant.alloy, c.variant.config, c.lock_entry,
                                                                c.templates)
        # As model_registry.json has it: the default quant (published first) and the others.
        registry[alias_for(c.variant.id)]["quants"] = {"default": items[0].variant.label,
                                                       "available": [x.variant.label for x in items]}
    (tmp / "registry-entry.json").write_text(json.dumps(registry, indent=2, sort_keys=True) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return Staged(variant=", ".join(c.variant.id for c in items), repo=repo, folder=folder,
                  files={p.name: p for p in sorted(folder.iterdir())},
                  random_weights=any(c.random_weights for c in items))


def stage_all(plan, lock: dict) -> list[Staged]:
    """One staged folder per repo. A repo takes the declared variants of one alloy together (its
    quant types, default first); anything else aimed at one repo (two alloys, an experiment beside
    the declared ones) is refused, since one repo must not mix what its card cannot describe."""
    checked = [check(plan, v, lock) for v in plan.variants]
    by_repo: dict = {}
    for c in checked:
        by_repo.setdefault(c.repo, []).append(c)
    staged = []
    for repo, group in by_repo.items():
        bad = [c for c in group if c.refused]
        ok = [c for c in group if not c.refused]
        for c in bad:
            staged.append(Staged(variant=c.variant.id, repo=repo, folder=build_dir() / "publish" / c.variant.id,
                                 files={}, refused=c.refused))
        if not ok:
            continue
        alloys = {c.variant.alloy.name for c in ok}
        if len(alloys) > 1:
            why = (f"{len(ok)} variants selected for one repo {repo} ({', '.join(c.variant.id for c in ok)}): a repo "
                   "holds the declared variants of one alloy; choose with alloy=")
            staged += [Staged(variant=c.variant.id, repo=repo, folder=build_dir() / "publish" / c.variant.id,
                              files={}, refused=[why]) for c in ok]
            continue
        if bad:
            # Publish a tier's repo whole or not at all: a declared quant that is not ready holds it back.
            staged += [Staged(variant=c.variant.id, repo=repo, folder=build_dir() / "publish" / c.variant.id, files={},
                              refused=[f"held back: {', '.join(b.variant.id for b in bad)} of the same repo is refused"])
                       for c in ok]
            continue
        order = {q.lower(): i for i, q in enumerate(ok[0].variant.alloy.quant_types)}
        ok.sort(key=lambda c: order.get(c.variant.quant, len(order)))
        staged.append(write_repo(ok))
    return staged


def remote_files(api, repo: str) -> dict | None:
    """path -> ("sha256", hex) for LFS files, ("git", blob id) for regular ones; None: no such repo."""
    from huggingface_hub.errors import RepositoryNotFoundError
    from huggingface_hub.hf_api import RepoFile

    try:
        tree = list(api.list_repo_tree(repo, recursive=True))
    except RepositoryNotFoundError:
        return None
    out = {}
    for item in tree:
        if isinstance(item, RepoFile):
            out[item.path] = ("sha256", item.lfs.sha256) if item.lfs else ("git", item.blob_id)
    return out


def upload_plan(files: dict, remote: dict | None) -> list[tuple[str, str, str]]:
    """(path, action, why) per local file: upload (new / changed) or skip (same hash on the Hub)."""
    rows = []
    for name, path in files.items():
        if remote is None or name not in remote:
            rows.append((name, "upload", "new"))
            continue
        algo, digest = remote[name]
        mine = sha256_file(path) if algo == "sha256" else git_blob_id(path)
        rows.append((name, "skip", "same hash on the Hub") if mine == digest else (name, "upload", f"changed ({algo} differs)"))
    return rows


class _Scrub:
    """Everything printed goes through here: the token never reaches a log, even inside an error."""

    def __init__(self, token: str | None):
        self.token = token

    def __call__(self, text: str) -> None:
        print(text.replace(self.token, "<token>") if self.token else text, flush=True)


def run(plan, push: bool = False) -> int:
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    from .lockfile import read

    token = os.environ.get("HF_TOKEN") or get_token()
    say = _Scrub(token)
    lock = read()
    staged = stage_all(plan, lock)
    api = HfApi(token=token)
    failed = False
    for st in staged:
        if st.refused:
            failed = True
            say(f"publish {st.variant} -> {st.repo}: REFUSED")
            for why in st.refused:
                say(f"  {why}")
            continue
        say(f"publish {st.variant} -> {st.repo}: staged in {st.folder}")
        try:
            remote = remote_files(api, st.repo)
            reach = None
        except Exception as e:  # no network or an HTTP error: a dry run still shows the staged folder
            remote, reach = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if reach:
            say(f"  cannot read {st.repo} on the Hub ({reach}); listing every file as an upload")
        elif remote is None:
            say(f"  {'creating' if push else 'would create'} repo {st.repo}")
        rows = upload_plan(st.files, remote)
        for name, action, why in rows:
            size = st.files[name].stat().st_size
            verb = action if push or action == "skip" else f"would {action}"
            say(f"  {verb:<15} {name:<48} {_mib(size):>12}  {why}")
        if remote:
            for name in sorted(set(remote) - set(st.files)):
                say(f"  {'left alone':<15} {name:<48} {'':>12}  on the Hub, not staged")
        todo = [n for n, action, _ in rows if action == "upload"]
        if st.random_weights:
            say("  synthetic source (made by the forge, not a released model): staged for inspection; pushing it needs publish.allow_synthetic=true")
            if push:
                failed = True
                continue
        if not push:
            say(f"  dry run: {len(todo)} to upload, {len(rows) - len(todo)} unchanged; `doit publish push=1` uploads")
            continue
        if not token:
            say("  REFUSED: no Hugging Face token (set HF_TOKEN or run `hf auth login`)")
            failed = True
            continue
        if not todo:
            say("  nothing to upload: the Hub already holds these bytes")
            continue
        try:
            if remote is None:
                api.create_repo(st.repo, repo_type="model", exist_ok=True)
            info = api.create_commit(
                st.repo, operations=[CommitOperationAdd(n, str(st.files[n].resolve())) for n in todo],
                commit_message=f"forge: {st.variant} ({len(todo)} files)",
                commit_description=f"Published by the forge compiler from {st.variant}; see the executed alloys beside the GGUFs.")
            say(f"  committed {len(todo)} files: {info.commit_url}")
        except Exception as e:
            say(f"  FAILED to upload to {st.repo}: {type(e).__name__}: {e}")
            failed = True
    return 1 if failed else 0
