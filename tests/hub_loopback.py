"""An in-process fake of the Hugging Face Hub HTTP API, so tests can drive the *real* huggingface_hub
client end to end without a network.

huggingface_hub reads HF_ENDPOINT and HF_HUB_DISABLE_XET when it is imported, so run the client in a
subprocess with HF_ENDPOINT=<hub.url>, HF_HUB_DISABLE_XET=1 (uploads then take the legacy LFS path
faked here: preupload -> LFS batch -> PUT -> verify -> NDJSON commit) and a throwaway HF_HOME (so no
cached real token is ever sent). Wire formats follow huggingface_hub 2.4.0: hf_api.py, _commit_api.py,
lfs.py and utils/_http.py, whose status + X-Error-Code mapping picks the exception class raised.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

LFS_THRESHOLD = 10_000  # the real Hub uses 10 MiB; a small one keeps test fixtures small


def is_lfs(path: str, size: int) -> bool:
    return size > LFS_THRESHOLD or path.endswith(".gguf")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **body):
        super().__init__(message)
        self.status, self.message, self.code, self.body = status, message, code, body


_REPO = r"/api/models/(?P<repo_id>[^/]+/[^/]+)"
ROUTES = [  # (method, path pattern, handler, needs the token)
    ("POST", r"/api/repos/create", "_create", True),
    ("POST", r"/api/validate-yaml", "_validate_yaml", False),  # create_commit calls it for README.md
    ("GET", _REPO + r"(?:/revision/(?P<rev>[^/]+))?", "_info", False),
    ("GET", _REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "_tree", False),
    ("POST", _REPO + r"/preupload/(?P<rev>[^/]+)", "_preupload", True),
    ("POST", _REPO + r"/commit/(?P<rev>[^/]+)", "_commit", True),
    ("POST", r"/(?P<repo_id>[^/]+/[^/]+)\.git/info/lfs/objects/batch", "_batch", True),
    # The client PUTs to the href as to a presigned S3 URL, with no Authorization header at all,
    # so a signature minted by the batch response guards this route instead of the token.
    ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "_put", False),
    ("POST", r"/lfs-verify/(?P<oid>[0-9a-f]{64})", "_verify", True),
    # Downloads: hf_hub_url's resolve endpoint, HEAD for metadata and GET with Range for the bytes.
    ("HEAD", r"/(?P<repo_id>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "_resolve", False),
    ("GET", r"/(?P<repo_id>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "_resolve", False),
]


class Reply:
    """A file download's reply: status, body, headers, and a fault to inject (drop the connection
    after `drop_after` bytes of the body, as a network cut does)."""

    def __init__(self, status: int, body: bytes, headers: dict, drop_after: int | None = None):
        self.status, self.body, self.headers, self.drop_after = status, body, headers, drop_after


class LoopbackHub:
    def __init__(self, token: str):
        self.token = token
        # repo_id -> {"files": {path: bytes}, "lfs": {paths stored as LFS}, "private": bool,
        #             "commits": [{"oid", "summary", "files": [added paths], "deleted": [paths]}]}
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str, dict]] = []  # (method, path with query, headers)
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> bytes, one store for all repos as on the Hub
        self.tree_page_size = 1000  # lower it to make list_repo_tree follow Link headers
        # Downloads: body bytes sent per (repo, path); faults a test injects per (repo, path):
        # {"drop_after": n} cuts the next reply after n bytes and then refuses that file until the
        # test clears `down`; {"corrupt": True} serves the file with one byte changed.
        self.served: dict[tuple, int] = {}
        self.faults: dict[tuple, dict] = {}
        self.down: set[tuple] = set()
        self.url = ""
        self._lock = threading.Lock()
        self._sign_key = secrets.token_bytes(16)
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> "LoopbackHub":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads, self._server.hub = True, self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "LoopbackHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def seed(self, repo_id: str, files: dict, private: bool = False, gated: bool = False) -> str:
        """Commit these files (path -> bytes) to the repo's main branch directly, creating the repo
        if needed (a test's fixture, not an upload); returns the new commit's oid. Seeding an
        existing repo moves main to a new commit, as a push upstream does."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, {"files": {}, "lfs": set(), "commits": [], "private": private})
            repo["gated"] = gated
            repo["files"] = dict(files)
            repo["lfs"] = {p for p, d in files.items() if is_lfs(p, len(d))}
            oid = hashlib.sha1(f"{repo_id}@{len(repo['commits']) + 1}".encode()).hexdigest()
            repo["commits"].append({"oid": oid, "summary": "seed", "files": sorted(files), "deleted": [],
                                    "snapshot": (dict(repo["files"]), set(repo["lfs"]))})
        return oid

    def served_bytes(self, repo_id: str | None = None) -> int:
        return sum(n for (r, _), n in self.served.items() if repo_id in (None, r))

    def committed_files(self, repo_id: str) -> dict[str, str]:
        return {p: hashlib.sha256(d).hexdigest() for p, d in self.repos[repo_id]["files"].items()}

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        self.requests.append((h.command, h.path, dict(h.headers)))
        split = urlsplit(h.path)
        req = SimpleNamespace(query=parse_qs(split.query), path=split.path, headers={}, body=b"",
                              range=h.headers.get("Range"))
        try:
            if h.headers.get("Transfer-Encoding"):  # http.server can't de-chunk; the client never chunks
                h.close_connection = True
                raise HubError(411, "loopback hub needs a Content-Length")
            req.body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
            auth = h.headers.get("Authorization")
            if auth is not None and not hmac.compare_digest(auth, f"Bearer {self.token}"):
                # The real Hub rejects a bad token on every route, public reads included; this exact
                # message stops hf_raise_for_status from disguising it as RepositoryNotFoundError.
                raise HubError(401, "Invalid credentials in Authorization header")
            req.authed = auth is not None
            for method, pattern, name, needs_token in ROUTES:
                if (m := re.fullmatch(pattern, split.path)) and method == h.command:
                    break
            else:
                raise HubError(404, f"loopback hub does not implement {h.command} {split.path}")
            if needs_token and not req.authed:
                raise HubError(401, "You must be authenticated to access this resource")
            groups = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
            status, payload = 200, getattr(self, name)(req, **groups)
            if isinstance(payload, Reply):
                return self._send_file(h, payload, groups)
        except HubError as e:
            status, payload = e.status, {"error": e.message, **e.body}
            req.headers["X-Error-Message"] = e.message.encode("ascii", "backslashreplace").decode()
            req.headers.update({"X-Error-Code": e.code} if e.code else {})
        except (KeyError, ValueError, TypeError) as e:  # a malformed body: a 5xx would make the client retry
            status, payload = 400, {"error": f"malformed request: {e!r}"}
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        h.send_response(status)
        for key, value in {"Content-Type": "application/json", "Content-Length": str(len(body)), **req.headers}.items():
            h.send_header(key, value)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def _send_file(self, h: BaseHTTPRequestHandler, reply: "Reply", groups: dict) -> None:
        key = (groups["repo_id"], groups["path"])
        if reply.drop_after == 0:  # the connection goes away before any reply
            h.close_connection = True
            return
        h.send_response(reply.status)
        for k, v in {**reply.headers, "Content-Length": str(len(reply.body))}.items():
            h.send_header(k, v)
        h.end_headers()
        if h.command == "HEAD":
            return
        body = reply.body if reply.drop_after is None else reply.body[:reply.drop_after]
        h.wfile.write(body)
        h.wfile.flush()
        with self._lock:
            self.served[key] = self.served.get(key, 0) + len(body)
        if reply.drop_after is not None:  # cut mid-body: the client sees a short read
            h.close_connection = True

    def _repo(self, repo_id: str, authed: bool, rev: str | None = None) -> dict:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if (repo["private"] or repo.get("gated")) and not authed:
            # As the real Hub: an anonymous request for a private or gated repo gets a 401.
            raise HubError(401, "Repository not found", "RepoNotFound")
        if rev not in (None, "main") and self._snapshot(repo, rev) is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo

    def _snapshot(self, repo: dict, rev: str | None):
        """(files, lfs paths, commit oid) at a branch (main) or a commit oid; None if unknown."""
        if rev in (None, "main"):
            oid = repo["commits"][-1]["oid"] if repo["commits"] else None
            return repo["files"], repo["lfs"], oid
        for c in repo["commits"]:
            if c["oid"] == rev:
                files, lfs = c.get("snapshot", (repo["files"], repo["lfs"]))
                return files, lfs, rev
        return None

    def _head(self, repo_id: str) -> str:
        commits = self.repos[repo_id]["commits"]
        return commits[-1]["oid"] if commits else hashlib.sha1(f"{repo_id}@0".encode()).hexdigest()

    def _sign(self, oid: str, size: int) -> str:
        return hmac.new(self._sign_key, f"{oid}:{size}".encode(), "sha256").hexdigest()

    def _create(self, req):
        data = json.loads(req.body)
        repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
        if "/" not in repo_id or data.get("type") not in (None, "model"):
            raise HubError(400, "loopback hub only creates model repos named namespace/name")
        with self._lock:
            if repo_id in self.repos:  # create_repo(exist_ok=True) swallows this but still reads "url"
                raise HubError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
            private = bool(data.get("private")) or data.get("visibility") == "private"
            self.repos[repo_id] = {"files": {}, "lfs": set(), "commits": [], "private": private}
        return {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}

    def _validate_yaml(self, req):
        return {"errors": [], "warnings": []}

    def _info(self, req, repo_id, rev=None):
        repo = self._repo(repo_id, req.authed, rev)
        files, lfs, oid = self._snapshot(repo, rev)
        blobs = req.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for p in sorted(files):
            sib = {"rfilename": p}
            if blobs:  # files_metadata=True: sizes and hashes, as model_info documents
                entry = self._file_entry({"files": files, "lfs": lfs}, p)
                sib.update(size=entry["size"], blobId=entry["oid"])
                if "lfs" in entry:
                    sib["lfs"] = {"size": entry["lfs"]["size"], "sha256": entry["lfs"]["oid"],
                                  "pointerSize": entry["lfs"]["pointerSize"]}
            siblings.append(sib)
        return {"id": repo_id, "modelId": repo_id, "sha": oid or self._head(repo_id), "private": repo["private"],
                "siblings": siblings}

    def _resolve(self, req, repo_id, rev, path):
        repo = self._repo(repo_id, req.authed, rev)
        files, lfs, oid = self._snapshot(repo, rev)
        if path not in files:
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        data, key = files[path], (repo_id, path)
        etag = hashlib.sha256(data).hexdigest() if path in lfs else git_blob_sha1(data)
        headers = {"X-Repo-Commit": oid, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream",
                   "Accept-Ranges": "bytes"}
        if path in lfs:  # the Hub names an LFS file's content hash and size in these
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        fault = self.faults.get(key, {})
        if fault.get("corrupt"):
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = 0
        if (rng := req.range) and (m := re.fullmatch(r"bytes=(\d+)-", rng)):
            start = int(m.group(1))
        body = data[start:]
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        drop = None
        if key in self.down:
            drop = 0
        elif "drop_after" in fault:
            drop = fault.pop("drop_after")
            self.down.add(key)  # the network stays down for this file until the test brings it back
        return Reply(206 if start else 200, body, headers, drop)

    def _tree(self, req, repo_id, rev, path=""):
        repo = self._repo(repo_id, req.authed, rev)
        recursive = req.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries: dict[str, dict] = {}
        for file in (p for p in repo["files"] if p.startswith(prefix)):
            parts = file[len(prefix):].split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):  # folders come from paths
                folder = prefix + "/".join(parts[:depth])
                entries[folder] = {"type": "directory", "path": folder,
                                   "oid": hashlib.sha1(f"tree:{folder}".encode()).hexdigest()}
            if recursive or len(parts) == 1:
                entries[file] = self._file_entry(repo, file)
        if prefix and not entries:
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        items = [entries[k] for k in sorted(entries)]
        start = int(req.query.get("cursor", ["0"])[0])
        end = start + self.tree_page_size
        if end < len(items):  # a Link header is the client's only sign that another page exists
            query = {k: v[0] for k, v in req.query.items()} | {"cursor": str(end)}
            req.headers["Link"] = f'<{self.url}{req.path}?{urlencode(query)}>; rel="next"'
        return items[start:end]

    def _file_entry(self, repo: dict, path: str) -> dict:
        data = repo["files"][path]
        if path not in repo["lfs"]:
            return {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
        # Git stores the LFS pointer, so the blob oid is the pointer's; the content hash sits under "lfs".
        sha256 = hashlib.sha256(data).hexdigest()
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n"
        return {"type": "file", "oid": git_blob_sha1(pointer.encode()), "size": len(data), "path": path,
                "lfs": {"oid": sha256, "size": len(data), "pointerSize": len(pointer)}}

    def _preupload(self, req, repo_id, rev):
        repo = self._repo(repo_id, True, rev)
        out = []
        for f in json.loads(req.body)["files"]:
            entry = {"path": f["path"], "shouldIgnore": False,
                     "uploadMode": "lfs" if is_lfs(f["path"], f["size"]) else "regular"}
            if (old := repo["files"].get(f["path"])) is not None:
                # The client leaves a file out of the commit when this equals its own oid for it:
                # sha256 of the content for LFS files, the git blob sha1 for regular ones.
                lfs = f["path"] in repo["lfs"]
                entry["oid"] = hashlib.sha256(old).hexdigest() if lfs else git_blob_sha1(old)
            out.append(entry)
        return {"files": out, "commitOid": self._head(repo_id)}

    def _batch(self, req, repo_id):
        self._repo(repo_id, True)
        data = json.loads(req.body)
        if data.get("operation") != "upload":
            raise HubError(400, "loopback hub only supports LFS uploads")
        objects = []
        for obj in data["objects"]:
            oid, size = obj["oid"], obj["size"]
            item = {"oid": oid, "size": size}
            if oid not in self.lfs_objects:  # an object without "actions" means: already stored, skip it
                href = f"{self.url}/lfs-upload/{oid}?size={size}&sig={self._sign(oid, size)}"
                item["actions"] = {"upload": {"href": href, "header": {}},
                                   "verify": {"href": f"{self.url}/lfs-verify/{oid}", "header": {}}}
            objects.append(item)
        return {"transfer": "basic", "objects": objects}

    def _put(self, req, oid):
        size = int(req.query["size"][0])
        if not hmac.compare_digest(req.query.get("sig", [""])[0], self._sign(oid, size)):
            raise HubError(403, "upload URL signature mismatch")
        if len(req.body) != size or hashlib.sha256(req.body).hexdigest() != oid:
            raise HubError(400, f"uploaded content does not match oid {oid} / size {size}")
        self.lfs_objects[oid] = req.body
        return b""

    def _verify(self, req, oid):
        data, stored = json.loads(req.body), self.lfs_objects.get(oid)
        if stored is None or data.get("oid") != oid or data.get("size") != len(stored):
            raise HubError(404, f"LFS object {oid} not found or wrong size")
        return {}

    def _commit(self, req, repo_id, rev):
        repo = self._repo(repo_id, True, rev)
        if req.query.get("create_pr"):
            raise HubError(400, "loopback hub does not support pull requests")
        lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        with self._lock:
            if header.get("parentCommit") not in (None, self._head(repo_id)):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            # Work on copies so that a bad operation leaves the repo untouched, as a real commit would.
            files, lfs, added, deleted = dict(repo["files"]), set(repo["lfs"]), [], []
            for line in lines[1:]:
                key, path = line["key"], line["value"]["path"]
                if key == "file":
                    files[path] = base64.b64decode(line["value"]["content"])
                    if is_lfs(path, len(files[path])):
                        raise HubError(400, f"{path} must be uploaded through LFS, not inline")
                    lfs.discard(path)
                elif key == "lfsFile":
                    if line["value"]["oid"] not in self.lfs_objects:
                        raise HubError(400, f"LFS object for {path} was never uploaded")
                    files[path] = self.lfs_objects[line["value"]["oid"]]
                    lfs.add(path)
                elif key in ("deletedFile", "deletedFolder"):
                    folder = path.rstrip("/") + "/"
                    gone = [p for p in files if (p.startswith(folder) if key == "deletedFolder" else p == path)]
                    if not gone:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                    for p in gone:
                        del files[p]
                    deleted += gone
                    continue
                else:
                    raise HubError(400, f"loopback hub does not support commit operation {key!r}")
                added.append(path)
            oid = hashlib.sha1(f"{repo_id}@{len(repo['commits']) + 1}".encode()).hexdigest()
            repo["files"], repo["lfs"] = files, lfs & set(files)
            repo["commits"].append({"oid": oid, "summary": header.get("summary"), "files": added,
                                    "deleted": deleted, "snapshot": (dict(files), set(repo["lfs"]))})
        return {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # httpx keeps connections alive, so every reply carries a length

    def _dispatch(self):
        self.server.hub._handle(self)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _dispatch

    def log_message(self, *args):
        pass
