"""source: put the checkpoint in the store -- generated (synthetic), downloaded from the Hub at a
revision with allow patterns, or read from a local folder (hashed in place, not copied)."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import ForgeError, SourceUnreachable
from ..store import stat_cache


def run(step, out, inputs, log, ctx):
    kind = step.kind
    if kind == "synthetic" and "train" in step.params:
        _train(step, out, log)
    elif kind == "synthetic":
        from .. import synthetic

        p = step.params
        log(f"generating random-weight Qwen3.5 checkpoint (seed {p['seed']})")
        files = synthetic.generate(out.tmp, p["shape"], p["seed"])
        log(f"wrote {len(files)} files")
    elif kind == "hub":
        _download(step, out, log, ctx)
    elif kind == "local":
        # The folder as planned: resolved against the alloy's own folder, wherever doit runs from.
        path = Path(step.runtime["path"])
        if not path.is_dir():
            raise ForgeError("local source folder not found", where=f"{ctx['alloys']} $.source.localPath",
                             found=str(path))
        out.extra["path"] = str(path)
        out.extra["localFiles"] = step.params["files"]
        # Nothing may change between planning (which hashed the files) and now unnoticed.
        now = local_identity(Path(step.runtime["alloy"]), step.runtime["localPath"])["files"]
        if now != step.params["files"]:
            changed = sorted(k for k in set(now) | set(step.params["files"]) if now.get(k) != step.params["files"].get(k))
            raise ForgeError("the local checkpoint changed while the forge was running", where=str(path),
                             found=changed[:10], hint="rerun doit")
        log(f"using local checkpoint {path} in place")
    else:
        raise ForgeError(f"unknown source kind {kind}", where=step.task)


def _download(step, out, log, ctx):
    """The planned commit's files, through the Hugging Face cache, linked into the store entry."""
    from .. import hub
    from ..store import stat_cache

    p = step.params
    if "unresolved" in p:  # planning could not name a commit (reason recorded then): nothing to fetch
        raise SourceUnreachable(p["unresolved"], where=f"alloy {ctx['alloys']}")
    try:
        digests = hub.fetch(p["repo"], p["commit"], step.runtime["revision"], p["allowPatterns"], out.tmp, log,
                            stat_cache().sha256, ctx["alloys"])
    except SourceUnreachable:
        raise
    except Exception as e:
        explained = hub.explain(e, p["repo"], p["commit"], ctx["alloys"])
        if explained is None:
            raise
        raise explained from None
    out.known.update(digests)
    out.extra["resolvedRevision"] = p["commit"]


def checkpoint_dir(entry) -> Path:
    """Where the checkpoint's files are: the store entry, or the local folder it points at."""
    manifest = entry.manifest()
    return Path(manifest["path"]) if "path" in manifest else entry.dir


def local_identity(alloy_path: Path, local: str) -> dict:
    """Content hashes of a local checkpoint's files (stat-cached): the local source's identity.
    Hidden entries are not the checkpoint's: a `git clone` of a Hub repo carries .git/ (its LFS
    objects another copy of every weight: hashing them doubles the read at 55 GB, and a `git fetch`
    would re-key the source) and .gitattributes, huggingface_hub leaves .cache/; the converter reads
    none of them."""
    folder = (Path(alloy_path).parent / local).resolve()
    if not folder.is_dir():
        raise ForgeError("local source folder not found", where=f"{alloy_path} $.source.localPath",
                         found=str(folder))
    cache = stat_cache()
    files = {}
    for top, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # not even walked
        for name in names:
            f = Path(top) / name
            if not name.startswith(".") and f.is_file():
                files[f.relative_to(folder).as_posix()] = cache.sha256(f)
    files = dict(sorted(files.items()))
    if "config.json" not in files:
        raise ForgeError("local source has no config.json", where=f"{alloy_path} $.source.localPath",
                         found=sorted(files)[:10], allowed="a Hugging Face checkpoint folder")
    return {"path": str(folder), "files": files}


def _train(step, out, log) -> None:
    """The demo fixture, trained in a process of its own: its CPU kernels and threads are pinned
    before torch loads (compiler/train.py), whatever this process already imported."""
    import json
    import sys

    from ..kernels import pinned_env

    p = step.params
    # The kernel class is in the key (plan.source_params): the bytes are that class's.
    choice = p["train"]["platformClass"].split("-", 1)[1]
    cmd = [sys.executable, "-m", "compiler.train", out.tmp, "--shape-json", json.dumps(p["shape"]),
           "--seed", p["seed"], "--steps", p["train"]["steps"], "--kernels", choice]
    output = log.run(cmd, f"train the Qwen3.5 fixture, {p['train']['steps']} steps from seed {p['seed']} "
                     f"with {p['train']['platformClass']} kernels (compiler/train.py; about 3 minutes on 2 cores)",
                     env=pinned_env(choice),
                     cwd=Path(__file__).resolve().parents[2])
    files = json.loads(output.splitlines()[-1])["files"]
    log(f"wrote {len(files)} files")
