"""Hugging Face Hub sources: a revision resolved to its commit, a commit's files fetched into the
Hugging Face cache (resumable across runs, each file checked against the Hub's own hash), and every
failure told apart with a message that names the alloy.

Why not `snapshot_download`: huggingface_hub 2.4 downloads each file into a temporary file unique to
the process and deletes it when the process fails ("it could not be reused anyway"), so a 55 GB
download cut at 90% starts again from zero on the next run. This module uses the library's own
pieces -- `model_info` for the commit and the files' sizes and hashes, `http_get` for a ranged GET
with its retries, `build_hf_headers` for the token, the cache layout (`blobs/<etag>`,
`snapshots/<commit>/<file>`, `refs/<branch>`) and the per-blob lock path `hf_hub_download` takes --
and keeps the partial file in the cache under a name of its own, so the next run asks for the rest.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import time
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from .errors import SourceUnreachable

COMMIT = re.compile(r"^[0-9a-f]{40}$")
PLAN_TIMEOUT_S = 10  # resolving a branch at planning: one small API call, never a long wait
CHUNK = 8 << 20


def is_commit(revision: str) -> bool:
    return bool(COMMIT.match(revision or ""))


class DiskFull(SourceUnreachable):
    pass


class ChecksumMismatch(SourceUnreachable):
    pass


def explain(e: BaseException, repo: str, revision: str, alloys: str) -> SourceUnreachable | None:
    """One failure class, one message: what happened, to which source, for which alloys, and what to
    do. None for an exception that is not about reaching the source (a bug stays a bug)."""
    import httpx2
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    label, where = f"{repo}@{revision}", f"alloy {alloys}"
    status = getattr(getattr(e, "response", None), "status_code", None)
    login = "log in with `hf auth login` or set HF_TOKEN to a token that can read it"
    if isinstance(e, RevisionNotFoundError):
        return SourceUnreachable(f"source {label}: the repo has no revision {revision!r} (404)", where=where,
                                 hint="name a branch, tag or commit sha that exists on the Hub")
    if isinstance(e, GatedRepoError):
        return SourceUnreachable(f"source {label}: the repo is gated (403) and this account has not been granted "
                                 "access", where=where,
                                 hint=f"accept its conditions on https://huggingface.co/{repo}, then {login}")
    if isinstance(e, RepositoryNotFoundError):
        if status == 401:
            # The Hub answers 401 to an anonymous request for a private, a gated or a missing repo alike.
            return SourceUnreachable(f"source {label}: the Hub refused an anonymous request (401): the repo is "
                                     "private or gated, or does not exist", where=where, hint=login)
        return SourceUnreachable(f"source {label}: no such repo on the Hub (404), or the token cannot see it",
                                 where=where, hint="check the alloy's source.baseModel")
    if isinstance(e, HfHubHTTPError) and status in (401, 403):
        return SourceUnreachable(f"source {label}: the Hub rejected the token ({status})", where=where, hint=login)
    if isinstance(e, OfflineModeIsEnabled):
        return SourceUnreachable(f"source {label}: HF_HUB_OFFLINE is set and this commit is not in the Hugging Face "
                                 "cache", where=where, hint="unset HF_HUB_OFFLINE on a machine with network")
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return DiskFull(f"source {label}: the disk filled up while downloading ({e})", where=where,
                        hint="free space under HF_HOME, or point HF_HOME at a larger disk")
    if isinstance(e, (httpx2.TransportError, LocalEntryNotFoundError, ConnectionError, TimeoutError)):
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        return SourceUnreachable(f"source {label}: the Hub cannot be reached ({type(e).__name__}: {reason})",
                                 where=where, hint="check the network; a rerun resumes what was downloaded")
    if isinstance(e, HfHubHTTPError):
        return SourceUnreachable(f"source {label}: the Hub answered {status}: {str(e).splitlines()[0][:200]}",
                                 where=where)
    return None


def resolve(repo: str, revision: str, timeout: float = PLAN_TIMEOUT_S) -> str:
    """The commit a branch or tag names now (a commit sha is its own answer: no network)."""
    if is_commit(revision):
        return revision
    from huggingface_hub import HfApi

    return HfApi().model_info(repo, revision=revision, timeout=timeout).sha


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    etag: str          # the cache's blob name: sha256 for LFS files, the git blob sha1 otherwise
    lfs: bool

    @property
    def sha256(self) -> str | None:
        return self.etag if self.lfs else None


def allowed(name: str, patterns: list[str] | None) -> bool:
    return patterns is None or any(fnmatch(name, p) for p in patterns)


def listing(repo: str, commit: str, patterns: list[str] | None) -> list[RemoteFile]:
    """The files of one commit the alloy asks for, with the sizes and hashes the Hub reports."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo, revision=commit, files_metadata=True)
    files = []
    for s in info.siblings or []:
        if not allowed(s.rfilename, patterns):
            continue
        if s.lfs is not None:
            files.append(RemoteFile(s.rfilename, int(s.lfs.size), s.lfs.sha256, True))
        else:
            files.append(RemoteFile(s.rfilename, int(s.size or 0), s.blob_id, False))
    return sorted(files, key=lambda f: f.name)


def storage(repo: str) -> Path:
    """This repo's folder in the Hugging Face cache (HF_HOME / HF_HUB_CACHE), as the library lays it out."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")


def _lock_path(repo: str, etag: str) -> Path:
    # The path hf_hub_download locks for this blob, so the library and the forge never write it at once.
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / ".locks" / repo_folder_name(repo_id=repo, repo_type="model") / f"{etag}.lock"


def partial_path(repo: str, f: RemoteFile) -> Path:
    return storage(repo) / "blobs" / f"{f.etag}.forge-partial"


def _free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def still_needed(repo: str, files: list[RemoteFile]) -> int:
    """Bytes left to download: whole files not in the cache, minus what partial files already hold."""
    need = 0
    for f in files:
        if (storage(repo) / "blobs" / f.etag).is_file():
            continue
        part = partial_path(repo, f)
        need += f.size - (part.stat().st_size if part.is_file() else 0)
    return need


class _Hashing:
    """The file object http_get writes into: appends to the partial file, hashes what it writes,
    and reports progress a person can follow (bytes, rate, time left) every few seconds."""

    def __init__(self, fh, f: RemoteFile, done: int, log, hashers: list):
        self.fh, self.f, self.log, self.hashers = fh, f, log, hashers
        self.done, self.start_done, self.started = done, done, time.monotonic()
        self.shown = time.monotonic()

    def write(self, chunk: bytes) -> int:
        self.fh.write(chunk)
        for h in self.hashers:
            h.update(chunk)
        self.done += len(chunk)
        now = time.monotonic()
        if now - self.shown >= 5 or self.done == self.f.size:
            self.shown = now
            rate = (self.done - self.start_done) / max(now - self.started, 1e-6)
            left = (self.f.size - self.done) / rate if rate > 0 else float("inf")
            self.log(f"{self.f.name}: {self.done / 1e9:.2f} / {self.f.size / 1e9:.2f} GB "
                     f"({100 * self.done // max(self.f.size, 1)}%), {rate / 1e6:.1f} MB/s, "
                     f"{'done' if self.done == self.f.size else f'{left:.0f} s left'}")
        return len(chunk)

    # http_get rewinds and truncates when a server ignores the Range header and sends it all again.
    def tell(self) -> int:
        return self.fh.tell()

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.fh.seek(pos, whence)

    def truncate(self, size: int | None = None) -> int:
        n = self.fh.truncate(size)
        self.done = self.start_done = 0
        for i, h in enumerate(self.hashers):
            self.hashers[i] = hashlib.new(h.name)
            if h.name == "sha1":
                self.hashers[i].update(b"blob %d\0" % self.f.size)
        return n


def _hashers(f: RemoteFile) -> list:
    # The Hub's etag of a regular (non-LFS) file is its git blob sha1; of an LFS file, its sha256.
    hs = [hashlib.sha256()]
    if not f.lfs:
        sha1 = hashlib.sha1()
        sha1.update(b"blob %d\0" % f.size)
        hs.append(sha1)
    return hs


def _download(repo: str, commit: str, f: RemoteFile, log, alloys: str) -> str:
    """Download one file into the cache's blobs/, resuming a partial file a broken run left; returns
    its sha256 once it matches the Hub's hash."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    part = partial_path(repo, f)
    part.parent.mkdir(parents=True, exist_ok=True)
    hashers = _hashers(f)
    done = part.stat().st_size if part.is_file() else 0
    if done > f.size:
        part.unlink()
        done = 0
    if done:
        with open(part, "rb") as fh:  # the bytes already here join the hash before the rest arrives
            while chunk := fh.read(CHUNK):
                for h in hashers:
                    h.update(chunk)
        log(f"{f.name}: resuming at {done / 1e9:.2f} of {f.size / 1e9:.2f} GB")
    else:
        log(f"{f.name}: downloading {f.size / 1e9:.2f} GB")
    with open(part, "ab") as fh:
        sink = _Hashing(fh, f, done, log, hashers)
        http_get(hf_hub_url(repo, f.name, revision=commit), sink, resume_size=done, headers=build_hf_headers(),
                 expected_size=f.size, displayed_filename=f.name)
    hashers = sink.hashers
    sha256 = hashers[0].hexdigest()
    got = sha256 if f.lfs else hashers[1].hexdigest()
    if got != f.etag:
        part.unlink()  # wrong bytes are not worth resuming from
        raise ChecksumMismatch(f"{f.name}: the downloaded bytes do not match the Hub's hash",
                               where=f"alloy {alloys} ({repo}@{commit})", found=got, allowed=f.etag,
                               hint="the partial file was removed; the next run downloads it again")
    os.replace(part, storage(repo) / "blobs" / f.etag)
    return sha256


def _cached_sha256(repo: str, f: RemoteFile, digest_of) -> str | None:
    """The sha256 of a blob already in the cache if it still matches the Hub's hash; a damaged blob
    is removed (and downloaded again)."""
    blob = storage(repo) / "blobs" / f.etag
    if not blob.is_file():
        return None
    if blob.stat().st_size == f.size:
        sha256 = digest_of(blob)
        if f.lfs and sha256 == f.etag:
            return sha256
        if not f.lfs:
            h = hashlib.sha1(b"blob %d\0" % f.size)
            h.update(blob.read_bytes())
            if h.hexdigest() == f.etag:
                return sha256
    blob.unlink()
    return None


def _point(repo: str, commit: str, f: RemoteFile) -> None:
    """snapshots/<commit>/<file> -> ../../blobs/<etag>, so the library (and `hf cache scan`) sees it.
    Made under the blob's lock and put in place by a rename: a second build dir fetching the same
    commit at once finds either no link or a whole one, never a half-replaced one (FileExistsError)."""
    blob = storage(repo) / "blobs" / f.etag
    pointer = storage(repo) / "snapshots" / commit / f.name
    pointer.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(blob, pointer.parent)
    if pointer.is_symlink() and os.readlink(pointer) == target:
        return
    tmp = pointer.with_name(f".{pointer.name}.forge-link-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, pointer)


def fetch(repo: str, commit: str, revision: str, patterns: list[str] | None, dest: Path, log, digest_of,
          alloys: str) -> dict:
    """Put the commit's allowed files into the Hugging Face cache (what is there already is checked,
    not downloaded again) and link them into `dest` (hard links; symbolic links across file systems).
    Returns {filename: sha256} of every file linked."""
    from huggingface_hub.utils import WeakFileLock, disable_progress_bars

    from huggingface_hub import constants

    disable_progress_bars()  # the step log reports progress, one line every few seconds
    # http_get hands over the body in chunks of this size and a cut loses the chunk in flight:
    # 1 MiB (not the library's 10 MiB) keeps what a broken download leaves on disk close to what
    # arrived, at a negligible cost per chunk.
    constants.DOWNLOAD_CHUNK_SIZE = min(constants.DOWNLOAD_CHUNK_SIZE, 1 << 20)
    files = listing(repo, commit, patterns)
    if not any(f.name == "config.json" for f in files):
        raise SourceUnreachable(f"source {repo}@{commit}: no config.json among the files the alloy allows",
                                where=f"alloy {alloys} $.source.allowPatterns", found=[f.name for f in files][:12])
    need = still_needed(repo, files)
    free = _free_bytes(storage(repo))
    if need > free:
        raise DiskFull(f"source {repo}@{commit}: {need / 1e9:.2f} GB left to download, {free / 1e9:.2f} GB free "
                       f"under {storage(repo)}", where=f"alloy {alloys}",
                       hint="free space there, or point HF_HOME at a larger disk (nothing was downloaded)")
    total = sum(f.size for f in files)
    log(f"{repo}@{commit[:12]}: {len(files)} files, {total / 1e9:.2f} GB, {need / 1e9:.2f} GB to download")
    digests = {}
    for f in files:
        lock = _lock_path(repo, f.etag)
        lock.parent.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(lock):
            sha256 = _cached_sha256(repo, f, digest_of)
            if sha256 is None:
                sha256 = _download(repo, commit, f, log, alloys)
            _point(repo, commit, f)
        _link(storage(repo) / "blobs" / f.etag, dest / f.name)
        digests[f.name] = sha256
    if not is_commit(revision):
        refs = storage(repo) / "refs" / revision
        refs.parent.mkdir(parents=True, exist_ok=True)
        tmp = refs.with_name(f".{refs.name}.forge-{os.getpid()}")
        tmp.write_text(commit)
        os.replace(tmp, refs)  # whole, whoever writes it last
    return digests


def _link(blob: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(blob, dest)
    except OSError:  # another file system (or one without hard links): reference the cache instead
        os.symlink(blob.resolve(), dest)
