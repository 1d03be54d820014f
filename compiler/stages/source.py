"""source: put the checkpoint in the store -- generated (synthetic), downloaded from the Hub at a
revision with allow patterns, or read from a local folder (hashed in place, not copied)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ForgeError, SourceUnreachable
from ..store import stat_cache


def run(step, out, inputs, log, ctx):
    kind = step.kind
    if kind == "synthetic":
        from .. import synthetic

        p = step.params
        log(f"generating random-weight Qwen3.5 checkpoint (seed {p['seed']})")
        files = synthetic.generate(out.tmp, p["shape"], p["seed"])
        log(f"wrote {len(files)} files")
    elif kind == "hub":
        _download(step, out, log, ctx)
    elif kind == "local":
        path = Path(step.params["path"])
        if not path.is_dir():
            raise ForgeError("local source folder not found", where=f"{ctx['alloys']} $.source.localPath",
                             found=str(path))
        out.extra["path"] = str(path)
        out.extra["localFiles"] = step.params["files"]
        log(f"using local checkpoint {path} in place")
    else:
        raise ForgeError(f"unknown source kind {kind}", where=step.task)


def _download(step, out, log, ctx):
    """snapshot_download at the alloy's revision; the resolved commit goes into the manifest."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    p = step.params
    # `doit verify` pins each repo to the commit the lock recorded, so a moved branch cannot
    # change what is rebuilt.
    pinned = json.loads(os.environ.get("FORGE_PINNED_REVISIONS") or "{}").get(p["repo"])
    label = f"{p['repo']}@{pinned or p['revision']}"
    try:
        info = HfApi().model_info(p["repo"], revision=pinned or p["revision"])
        log(f"downloading {label} (commit {info.sha})")
        snapshot_download(repo_id=p["repo"], revision=info.sha, allow_patterns=p["allowPatterns"],
                          local_dir=str(out.tmp))
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise SourceUnreachable(f"source {label} cannot be reached: private, gated or missing repo ({type(e).__name__})",
                                where=f"alloy {ctx['alloys']}") from None
    except RevisionNotFoundError:
        raise SourceUnreachable(f"source {label}: no such revision", where=f"alloy {ctx['alloys']}") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError, Exception) as e:
        # huggingface_hub's HTTP stack raises its transport's own errors (connect, DNS, TLS,
        # timeouts) for a missing network; any of them means the source is out of reach.
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}" if str(e) else type(e).__name__
        raise SourceUnreachable(f"source {label} cannot be reached (no network?): {reason}",
                                where=f"alloy {ctx['alloys']}") from None
    # huggingface_hub keeps its own bookkeeping under .cache/ in local_dir: not part of the model.
    cache = out.tmp / ".cache"
    if cache.exists():
        import shutil

        shutil.rmtree(cache)
    out.extra["resolvedRevision"] = info.sha


def checkpoint_dir(entry) -> Path:
    """Where the checkpoint's files are: the store entry, or the local folder it points at."""
    manifest = entry.manifest()
    return Path(manifest["path"]) if "path" in manifest else entry.dir


def local_identity(alloy_path: Path, local: str) -> dict:
    """Content hashes of a local checkpoint's files (stat-cached): the local source's identity."""
    folder = (Path(alloy_path).parent / local).resolve()
    if not folder.is_dir():
        raise ForgeError("local source folder not found", where=f"{alloy_path} $.source.localPath",
                         found=str(folder))
    cache = stat_cache()
    files = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and ".cache" not in f.relative_to(folder).parts:
            files[str(f.relative_to(folder))] = cache.sha256(f)
    if "config.json" not in files:
        raise ForgeError("local source has no config.json", where=f"{alloy_path} $.source.localPath",
                         found=sorted(files)[:10], allowed="a Hugging Face checkpoint folder")
    return {"path": str(folder), "files": files}
