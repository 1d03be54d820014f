"""The remote cache: step outputs shared between machines by their step key.

The data model of Bazel's remote cache, stored the way DVC stores a remote: through fsspec, so one
code path serves `s3://bucket/prefix` (any S3-compatible store), `file:///mnt/shared` (a shared
mount) and, best-effort, `hf://` (Hugging Face storage).

    <root>/cas/<sha256[:2]>/<sha256>       every output file, named by the sha256 of its bytes
    <root>/ac/<kind>/<key>.json            the action record of one step: its store manifest
                                           (files with sha256 and size) and who built it
    <root>/conflicts/<kind>/<key>/...      a second machine's different bytes for the same key

Before a step runs (its store entry is missing), its record is looked up: a hit streams each file
into the store, checked against the record's sha256 as it arrives (a cut download resumes; a blob
that does not match is refused and the step is built here instead), and commits the entry as the
producer wrote it. After a step runs here, its files go up first and its record last, created only
if absent, so a half-pushed step is invisible to everyone else and the next run completes it (a
marker under build/.forge/remote-pending/ says what is still to push). A record already there with
other bytes is a reproducibility conflict: it is reported, naming both machines, and never
overwritten. Integrity is our own sha256 throughout, never an S3 ETag (a multipart upload's ETag is
not a hash of the content) nor a server checksum.

Configured by FORGE_REMOTE (or `doit remote=<url>`); FORGE_REMOTE_READONLY=1 restores without ever
writing. Credentials come from each backend's usual place (for S3: the AWS environment variables,
~/.aws, an instance role; AWS_ENDPOINT_URL for MinIO, R2, Ceph or a local server) and are never
printed or written: the remote is shown without any user, password or query in its URL.

A no-op `doit` never gets here: only a step that would run looks the remote up.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .paths import build_dir, keep_state, state_dir

# Where a step's bytes come from elsewhere anyway: a Hub download is the Hub's (and its licence's),
# a local checkpoint is a folder on this machine. Everything made from them travels.
NOT_CACHED = frozenset({"hub", "local"})
# Steps whose bytes are a function of their key: the same key built anywhere gives the same files
# (tests/test_record.py holds the build to it), so other bytes there are a reproducibility conflict.
# Every other kind records a measurement or an attestation (seconds, tokens/s, peak memory, the
# receipt's time of writing): a second machine's record of it differs by nature, and the first one
# recorded stands.
REPRODUCIBLE = frozenset({"synthetic", "convert", "mmproj", "mtp-draft", "imatrix", "quantize", "mmproj-quantize",
                          "kld-base"})
CHUNK = 8 << 20


class RemoteError(Exception):
    """The remote could not be read or written (unreachable, denied, a protocol error)."""


class CorruptBlob(Exception):
    pass


def display(url: str) -> str:
    """The remote's URL as it may be printed and recorded: no user, password, query or fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def machine() -> dict:
    """Who built a step, as its action record names them (FORGE_MACHINE_NAME, else the host name)."""
    return {"machine": os.environ.get("FORGE_MACHINE_NAME") or socket.gethostname(),
            "platform": f"{platform.system()} {platform.machine()}", "python": platform.python_version()}


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def _safe(text: str, secrets: tuple[str, ...]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


@dataclass
class Remote:
    url: str
    writable: bool
    fs: object = None
    root: str = ""

    def __post_init__(self):
        import fsspec

        try:
            self.fs, root = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as e:
            raise RemoteError(_safe(f"FORGE_REMOTE={display(self.url)}: {e}", (urlsplit(self.url).password,))) from None
        self.root = root.rstrip("/")
        self.local = "file" in _protocols(self.fs)

    @property
    def name(self) -> str:
        return display(self.url)

    # -- layout --------------------------------------------------------------------------------
    def record_path(self, kind: str, key: str) -> str:
        return f"{self.root}/ac/{kind}/{key}.json"

    def blob_path(self, sha: str) -> str:
        return f"{self.root}/cas/{sha[:2]}/{sha}"

    def _err(self, what: str, e: BaseException) -> RemoteError:
        # A backend's message may quote the URL it was given: never its credentials.
        secrets = tuple(filter(None, (urlsplit(self.url).password, os.environ.get("AWS_SECRET_ACCESS_KEY"),
                                      os.environ.get("AWS_SESSION_TOKEN"), os.environ.get("HF_TOKEN"))))
        return RemoteError(_safe(f"remote {self.name}: {what}: {type(e).__name__}: {e}", secrets))

    # -- reading -------------------------------------------------------------------------------
    def record(self, kind: str, key: str) -> dict | None:
        path = self.record_path(kind, key)
        try:
            return json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        except Exception as e:  # botocore's connection errors are not OSErrors
            if _missing(e):
                return None
            raise self._err(f"reading the record of {kind}/{key}", e) from None

    def fetch_blob(self, sha: str, size: int, dest: Path, partial: Path) -> int:
        """Stream one blob to `dest`, resuming from `partial`; returns the bytes transferred. Raises
        CorruptBlob when what arrived is not the named bytes (removed, never kept)."""
        digest = hashlib.sha256()
        have = partial.stat().st_size if partial.is_file() else 0
        if have > size:
            partial.unlink()
            have = 0
        if have:
            with open(partial, "rb") as f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
        moved = 0
        try:
            with self.fs.open(self.blob_path(sha), "rb", block_size=CHUNK) as src, open(partial, "ab") as dst:
                if have:
                    src.seek(have)
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    moved += len(chunk)
                    if have + moved > size:
                        break
        except FileNotFoundError:
            raise CorruptBlob("missing from the remote") from None
        except Exception as e:
            if _missing(e):
                raise CorruptBlob("missing from the remote") from None
            raise self._err(f"downloading blob {sha[:12]}", e) from None
        got = partial.stat().st_size
        if got != size or digest.hexdigest() != sha:
            partial.unlink()
            raise CorruptBlob(f"{got} bytes with sha256 {digest.hexdigest()[:12]}, not {size} bytes with {sha[:12]}")
        os.replace(partial, dest)
        return moved

    # -- writing -------------------------------------------------------------------------------
    def put_blob(self, path: Path, sha: str, size: int) -> bool:
        """Upload one file under its sha256 unless a blob of that size is there; True if uploaded.
        A shared mount gets it under a temporary name renamed into place; an object store's PUT
        (multipart above the part size) is itself all or nothing."""
        target = self.blob_path(sha)
        try:
            if self.fs.info(target).get("size") == size:
                return False
        except FileNotFoundError:
            pass
        except Exception as e:
            if not _missing(e):
                raise self._err(f"looking up blob {sha[:12]}", e) from None
        try:
            if self.local:
                self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                tmp = f"{target}.partial-{uuid.uuid4().hex}"
                self.fs.put_file(str(path), tmp)
                self.fs.mv(tmp, target)
            elif "s3" in _protocols(self.fs) or "s3a" in _protocols(self.fs):
                self.fs.put_file(str(path), target, chunksize=part_size())
            else:
                self.fs.put_file(str(path), target)
        except Exception as e:
            raise self._err(f"uploading {path.name}", e) from None
        return True

    def create(self, path: str, data: bytes) -> bool:
        """Write `data` at `path` only if nothing is there; False if something already was."""
        try:
            if self.local:
                self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
                tmp = f"{path}.partial-{uuid.uuid4().hex}"
                with open(tmp, "wb") as f:
                    f.write(data)
                try:
                    os.link(tmp, path)  # atomic, and refused if the name exists
                except FileExistsError:
                    return False
                finally:
                    os.unlink(tmp)
                return True
            try:
                self.fs.pipe_file(path, data, mode="create")  # S3: PutObject with If-None-Match: *
            except (TypeError, NotImplementedError):
                # A backend without exclusive create (best effort: a race between two pushes of
                # different bytes within this window is not detected).
                if self.fs.exists(path):
                    return False
                self.fs.pipe_file(path, data)
            return True
        except FileExistsError:
            return False
        except Exception as e:
            if "PreconditionFailed" in str(e) or "pre-conditions" in str(e):
                return False
            raise self._err(f"writing {path.removeprefix(self.root + '/')}", e) from None


def _protocols(fs) -> tuple:
    p = fs.protocol
    return p if isinstance(p, tuple) else (p,)


def _missing(e: BaseException) -> bool:
    return isinstance(e, FileNotFoundError) or "NoSuchKey" in str(e) or "Not Found" in str(e)


def part_size() -> int:
    """Multipart upload part size for object stores (FORGE_REMOTE_PART_MIB, at least S3's 5 MiB)."""
    return max(5, int(os.environ.get("FORGE_REMOTE_PART_MIB", "64"))) << 20


def configured() -> Remote | None:
    url = os.environ.get("FORGE_REMOTE", "").strip()
    if not url:
        return None
    return Remote(url, writable=os.environ.get("FORGE_REMOTE_READONLY", "").lower() not in ("1", "true", "yes", "on"))


# -- pending pushes ----------------------------------------------------------------------------
def _pending_dir() -> Path:
    return state_dir() / "remote-pending"


def _mark(kind: str, key: str) -> Path:
    folder = _pending_dir()
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f"{kind}--{key}"
    marker.write_text(json.dumps({"kind": kind, "key": key}))
    return marker


def pending() -> list[tuple[str, str]]:
    folder = _pending_dir()
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        kind, _, key = p.name.rpartition("--")
        if kind and key:
            out.append((kind, key))
    return out


# -- the two operations a step sees ------------------------------------------------------------
def restore(remote: Remote, entry, task: str, say=print) -> bool:
    """Fill the store entry from the remote if it has this step; True when it did. Anything short
    of a whole, verified entry leaves the store as it was (the step then runs here)."""
    from .store import Writer

    if entry.kind in NOT_CACHED:
        return False
    try:
        record = remote.record(entry.kind, entry.key)
    except RemoteError as e:
        say(f"  {task}: {e}; building it here")
        return False
    if record is None:
        return False
    manifest = record["manifest"]
    downloads = state_dir() / "remote-downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    started, moved = time.monotonic(), 0
    extra = {k: v for k, v in manifest.items() if k not in ("kind", "key", "params", "inputs", "files")}
    bad = None
    try:
        with Writer(entry, manifest["params"], manifest["inputs"]) as w:
            w.extra.update(extra)
            for f in manifest["files"]:
                bad = f
                moved += remote.fetch_blob(f["sha256"], f["size"], w.path(f["filename"]),
                                           downloads / f"{f['sha256']}.part")
                w.known[f["filename"]] = f["sha256"]
    except CorruptBlob as e:
        say(f"  {task}: the remote's {bad['filename']} for this step is refused ({e}); building it here")
        if remote.writable:
            # So that this machine's push (same key, its own verified bytes) replaces it.
            try:
                remote.fs.rm_file(remote.blob_path(bad["sha256"]))
            except Exception:  # best effort: a blob left there is refused again by the next machine
                pass
        return False
    except RemoteError as e:
        say(f"  {task}: {e}; building it here")
        return False
    who = record.get("producer", {}).get("machine", "?")
    size = sum(f["size"] for f in manifest["files"])
    say(f"  {task}: restored from the remote cache {remote.name} ({len(manifest['files'])} files, "
        f"{_size(size)}, {_size(moved)} transferred in {time.monotonic() - started:.1f} s; "
        f"built by {who})")
    _note_restored(entry, record)
    return True


def _note_restored(entry, record: dict) -> None:
    """Which machine built each restored step: build/.forge/restored.json (the store's manifests stay
    exactly the producer's)."""
    path = state_dir() / "restored.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data[f"{entry.kind}/{entry.key}"] = record.get("producer", {})
    keep_state("restored.json", data)


def push(remote: Remote, entry, task: str, say=print, toolchain: str | None = None) -> str:
    """Files first, the action record last (created only if absent). Returns "pushed", "present"
    (the same bytes were there) or "conflict" (other bytes for this key: reported, theirs kept)."""
    if entry.kind in NOT_CACHED or not remote.writable:
        return "skipped"
    marker = _mark(entry.kind, entry.key)
    manifest = entry.manifest()
    uploaded = 0
    for f in manifest["files"]:
        if remote.put_blob(entry.dir / f["filename"], f["sha256"], f["size"]):
            uploaded += f["size"]
    producer = {**machine(), "pushedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if toolchain:
        producer["toolchain"] = toolchain
    record = {"schema": 1, "kind": entry.kind, "key": entry.key, "manifest": manifest, "producer": producer}
    data = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
    if remote.create(remote.record_path(entry.kind, entry.key), data):
        marker.unlink(missing_ok=True)
        say(f"  {task}: pushed to {remote.name} ({_size(uploaded)} uploaded)")
        return "pushed"
    theirs = remote.record(entry.kind, entry.key) or {}
    mine = {f["filename"]: f["sha256"] for f in manifest["files"]}
    there = {f["filename"]: f["sha256"] for f in theirs.get("manifest", {}).get("files", [])}
    marker.unlink(missing_ok=True)
    if mine == there:
        if uploaded:
            say(f"  {task}: already recorded on {remote.name}; {_size(uploaded)} of its files were missing there "
                f"and are uploaded again")
        return "present"
    if entry.kind not in REPRODUCIBLE:
        say(f"  {task}: {remote.name} already holds {theirs.get('producer', {}).get('machine', '?')}'s record of this "
            f"step; this machine's differs as a {entry.kind} record does between runs (timings, time of writing): "
            f"theirs stands")
        return "present"
    _conflict(remote, entry, task, theirs, record, mine, there, say)
    return "conflict"


def _conflict(remote, entry, task, theirs, record, mine, there, say) -> None:
    them = theirs.get("producer", {})
    differ = sorted(n for n in set(mine) | set(there) if mine.get(n) != there.get(n))
    lines = [f"  {task}: REPRODUCIBILITY CONFLICT in the remote cache {remote.name}: step {entry.kind}/{entry.key} "
             f"built by {them.get('machine', '?')} ({them.get('platform', '?')}, pushed {them.get('pushedAt', '?')}) "
             f"and by {record['producer']['machine']} ({record['producer']['platform']}, this machine) differ:"]
    for n in differ:
        lines.append(f"      {n}: {str(there.get(n))[:16]} there, {str(mine.get(n))[:16]} here")
    lines.append(f"    the remote keeps {them.get('machine', '?')}'s record; this machine's is kept beside it under "
                 f"conflicts/ (nothing was overwritten)")
    say("\n".join(lines))
    report = {"kind": entry.kind, "key": entry.key, "kept": theirs, "other": record, "files": differ}
    blob = (json.dumps(report, indent=2, sort_keys=True) + "\n").encode()
    tag = hashlib.sha256(json.dumps(mine, sort_keys=True).encode()).hexdigest()[:16]
    try:
        remote.create(f"{remote.root}/conflicts/{entry.kind}/{entry.key}/{tag}.json", blob)
    except RemoteError as e:
        say(f"  {task}: could not record the conflict on the remote: {e}")
    local = build_dir() / "logs" / "remote-conflicts.jsonl"
    local.parent.mkdir(parents=True, exist_ok=True)
    with open(local, "a") as f:
        f.write(json.dumps(report, sort_keys=True) + "\n")


def push_pending(remote: Remote, say=print) -> dict:
    """Complete the pushes an earlier run left undone (killed, or the remote was unreachable)."""
    from .store import Entry

    counts: dict = {}
    for kind, key in pending():
        entry = Entry(kind, key)
        if not entry.is_complete():
            (_pending_dir() / f"{kind}--{key}").unlink(missing_ok=True)
            continue
        try:
            result = push(remote, entry, f"{kind}/{key[:12]}", say)
        except RemoteError as e:
            say(f"  remote: {e}; left to push on the next run")
            result = "failed"
        counts[result] = counts.get(result, 0) + 1
    return counts
