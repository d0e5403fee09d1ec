"""A loopback-only mock of the Hugging Face Hub HTTP API: ``push_to_hub`` -> ``from_pretrained(repo_id)`` offline.

Serves, on 127.0.0.1 at a random free port, what ``huggingface_hub`` (2.x, Xet disabled) and ``transformers`` need:

- ``POST /api/repos/create`` (409 when the repo exists), ``DELETE|POST /api/repos/delete``, ``GET /api/whoami-v2``,
  ``POST /api/validate-yaml``;
- ``POST /api/{type}s/{repo}/preupload/{rev}`` (``uploadMode`` "lfs" for weight-like suffixes and files of
  ``lfs_threshold`` bytes or more, else "regular"; the ``oid`` of an unchanged file, so re-uploads are skipped);
- ``POST /[{type}s/]{repo}.git/info/lfs/objects/batch`` -> basic transfer, ``PUT /lfs-upload/{sha256}`` (the body's
  sha256 is checked), ``POST /lfs-verify``;
- ``POST /api/{type}s/{repo}/commit/{rev}`` — NDJSON ``header`` / ``file`` (base64) / ``lfsFile`` (an uploaded
  sha256) / ``deletedFile`` / ``deletedFolder``; ``parentCommit`` is checked (412);
- ``GET|HEAD /api/{type}s/{repo}[/revision/{rev}]`` (info with ``sha`` and ``siblings``),
  ``GET /api/{type}s/{repo}/tree/{rev}[/{path}]`` (``?recursive=1``), ``GET /api/{type}s/{repo}/refs``;
- ``HEAD|GET /[{type}s/]{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag`` (git sha1 of regular files,
  sha256 of LFS files), ``Content-Length``, ``Range`` support; 404 with ``X-Error-Code`` ``RepoNotFound`` /
  ``RevisionNotFound`` / ``EntryNotFound``.

Revisions are branch names (``main``) or full commit ids; every commit is kept, so old revisions stay readable.
Writes need an ``Authorization: Bearer`` header (any token, or exactly ``token=`` when given). Blobs are stored
content-addressed in a folder (a temporary one by default, removed on exit). Anything else gets a 404 and is
recorded in ``MockHub.unhandled``; every request is recorded in ``MockHub.requests``.

``huggingface_hub`` reads ``HF_ENDPOINT`` when it is imported, so clients run in a subprocess:
:func:`run_in_hub_subprocess`.

Example::

    with MockHub() as hub:
        res = run_in_hub_subprocess("from huggingface_hub import HfApi; HfApi().create_repo('me/x')", hub.url, tmp)
        assert_ok(res)
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = ["MockHub", "assert_ok", "hub_env", "mock_hub", "mock_hub_server", "run_in_hub_subprocess"]

LFS_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".npy", ".npz", ".gguf", ".pkl",
    ".model", ".zip", ".tar", ".gz", ".parquet", ".arrow",
)  # fmt: skip
_GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
_TIMESTAMP = "2024-01-01T00:00:00.000Z"
_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_SEG = r"[^/]+"
_REPO = rf"({_SEG}/{_SEG})"


def git_sha1(data: bytes) -> str:
    """``git hash-object`` of ``data`` (the oid the Hub reports for regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass(frozen=True)
class Entry:
    sha256: str
    size: int
    lfs: bool
    git_oid: str

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, Entry]] = field(default_factory=dict)
    history: list[tuple[str, str]] = field(default_factory=list)  # (commit oid, summary), oldest first


class MockHub:
    """A mock Hub on ``127.0.0.1:<free port>``; use as a context manager (starts on enter, stops on exit)."""

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        *,
        token: str | None = None,
        user: str = "me",
        lfs_threshold: int = 10 * 1024 * 1024,
        max_body: int = 1 << 30,
    ) -> None:
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="mock_hub_")) if root is None else Path(root)
        self.blobs = self.root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.token, self.user, self.lfs_threshold, self.max_body = token, user, lfs_threshold, max_body
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.unhandled: list[tuple[str, str]] = []  # requests no route matched
        self.errors: list[str] = []  # exceptions inside the mock (answered with 500)
        self.lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._commit_counter = 0

    # ---- lifecycle
    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("MockHub is not running")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> MockHub:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="mock-hub", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> MockHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- inspection (for test assertions)
    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        with self.lock:
            repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise KeyError(f"no {repo_type} repo {repo_id!r} on the mock hub")
        return repo

    def list_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, Entry]:
        repo = self.repo(repo_id, repo_type)
        with self.lock:
            return dict(repo.commits[self._resolve_rev(repo, revision)])

    def read(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        return (self.blobs / self.list_files(repo_id, revision, repo_type)[path].sha256).read_bytes()

    # ---- storage
    def _resolve_rev(self, repo: Repo, rev: str) -> str:
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.commits:
            return rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _store_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.blobs / sha
        if not path.exists():
            tmp = path.with_suffix(f".tmp{threading.get_ident()}")
            tmp.write_bytes(data)
            tmp.replace(path)
        return sha

    def _has_blob(self, sha256: str, size: int | None = None) -> bool:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256 or ""):
            return False
        path = self.blobs / sha256
        return path.is_file() and (size is None or path.stat().st_size == size)

    def _new_commit(self, repo: Repo, branch: str, tree: dict[str, Entry], summary: str, salt: bytes = b"") -> str:
        self._commit_counter += 1
        parent = repo.branches.get(branch, "")
        oid = hashlib.sha1(f"{repo.repo_id}\0{parent}\0{self._commit_counter}\0".encode() + salt).hexdigest()
        repo.commits[oid] = tree
        repo.branches[branch] = oid
        repo.history.append((oid, summary))
        return oid

    def _create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_type, repo_id, private)
        sha = self._store_blob(_GITATTRIBUTES)
        entry = Entry(sha, len(_GITATTRIBUTES), False, git_sha1(_GITATTRIBUTES))
        self._new_commit(repo, "main", {".gitattributes": entry}, "initial commit")
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def _upload_mode(self, path: str, size: int) -> str:
        if size > 0 and (size >= self.lfs_threshold or path.lower().endswith(LFS_SUFFIXES)):
            return "lfs"
        return "regular"


def _clean_path(path: str) -> str:
    p = PurePosixPath(path.lstrip("/"))
    if not path or not p.parts or any(part in ("", ".", "..") for part in p.parts) or "\\" in path:
        raise HubError(400, f"invalid path in repo: {path!r}")
    return str(p)


def _make_handler(hub: MockHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 60  # idle keep-alive connections end, so nothing outlives the test for long
        server_version = "MockHub/1.0"

        def log_message(self, *args):  # keep test output clean
            pass

        # ---- plumbing
        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, ctype="application/json"):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            with hub.lock:
                hub.requests.append((self.command, self.path, status))

        def _json(self, obj, status: int = 200, headers: dict | None = None, ctype="application/json"):
            self._send(status, json.dumps(obj).encode(), headers, ctype)

        def _error(self, err: HubError):
            headers = {"X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._json({"error": err.message}, err.status, headers)

        def _body(self) -> bytes:
            return self._request_body

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks, total = [], 0
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    total += size
                    if total > hub.max_body:
                        self.close_connection = True
                        raise HubError(413, "request body too large")
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length") or 0)
            if n > hub.max_body:
                self.close_connection = True
                raise HubError(413, "request body too large")
            return self.rfile.read(n) if n else b""

        def _require_auth(self):
            auth = self.headers.get("Authorization", "")
            if not auth.startswith("Bearer ") or not auth[7:].strip():
                raise HubError(401, "Invalid username or password.")
            if hub.token is not None and auth[7:].strip() != hub.token:
                raise HubError(401, "Invalid credentials in Authorization header")

        def _repo(self, repo_type: str, repo_id: str) -> Repo:
            repo = hub.repos.get((repo_type, repo_id))
            if repo is None:
                raise HubError(404, f"Repository Not Found for url: {self.path}.", "RepoNotFound")
            return repo

        def _dispatch(self):
            if self.client_address[0] != "127.0.0.1":  # bound to loopback; refuse anything else regardless
                raise HubError(403, "mock hub serves loopback only")
            split = urlsplit(self.path)
            path, query = split.path, parse_qs(split.query)
            for method, pattern, func in _ROUTES:
                if method == self.command or (method == "GET" and self.command == "HEAD"):
                    m = re.fullmatch(pattern, path)
                    if m:
                        return func(self, query, *[unquote(g) if g is not None else None for g in m.groups()])
            with hub.lock:
                hub.unhandled.append((self.command, self.path))
            raise HubError(404, f"mock hub: unhandled {self.command} {path}")

        def _handle(self):
            try:
                self._request_body = b""  # read it all first: a keep-alive connection must not keep unread bytes
                self._request_body = self._read_body()
                self._dispatch()
            except HubError as err:
                self._error(err)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                self._error(HubError(400, f"bad request: {type(exc).__name__}: {exc}"))
            except Exception as exc:  # noqa: BLE001 - a mock bug: answer 500 and keep it for the test to see
                with hub.lock:
                    hub.errors.append(f"{self.command} {self.path}: {type(exc).__name__}: {exc}")
                self.close_connection = True
                self._error(HubError(500, f"mock hub error: {type(exc).__name__}: {exc}"))

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle

        # ---- repos, user, yaml
        def create_repo(self, query):
            self._require_auth()
            info = json.loads(self._body() or b"{}")
            name, org = info["name"], info.get("organization")
            repo_id = name if "/" in name else f"{org or hub.user}/{name}"
            repo_type = info.get("type") or "model"
            url = f"{hub.url}/{_URL_PREFIX[repo_type]}{repo_id}"
            with hub.lock:
                if (repo_type, repo_id) in hub.repos:
                    return self._json({"error": "You already created this model repo", "url": url}, 409)
                hub._create_repo(repo_type, repo_id, bool(info.get("private")))
            return self._json({"url": url, "name": repo_id, "id": repo_id})

        def delete_repo(self, query):
            self._require_auth()
            info = json.loads(self._body() or b"{}")
            name, org = info["name"], info.get("organization")
            repo_id = name if "/" in name else f"{org or hub.user}/{name}"
            with hub.lock:
                self._repo(info.get("type") or "model", repo_id)
                del hub.repos[(info.get("type") or "model", repo_id)]
            return self._send(200)

        def whoami(self, query):
            self._require_auth()
            return self._json({"type": "user", "name": hub.user, "fullname": hub.user, "orgs": [],
                               "auth": {"type": "access_token", "accessToken": {"role": "write"}}})  # fmt: skip

        def validate_yaml(self, query):
            self._body()
            return self._json({"errors": [], "warnings": []})

        # ---- upload
        def preupload(self, query, kind, repo_id, rev):
            self._require_auth()
            files = json.loads(self._body())["files"]
            with hub.lock:
                repo = self._repo(_REPO_TYPES[kind], repo_id)
                tree = repo.commits[hub._resolve_rev(repo, rev)] if rev in repo.branches or rev in repo.commits else {}
                out = []
                for f in files:
                    path = _clean_path(f["path"])
                    mode = hub._upload_mode(path, int(f.get("size", 0)))
                    old = tree.get(path)
                    oid = None if old is None else (old.sha256 if mode == "lfs" else old.git_oid)
                    out.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
            return self._json({"files": out, "commitOid": repo.branches.get(rev)})

        def lfs_batch(self, query, kind, repo_id):
            self._require_auth()
            req = json.loads(self._body())
            with hub.lock:
                self._repo(_REPO_TYPES[kind or "models"], repo_id)
            if req.get("operation") != "upload" or "basic" not in req.get("transfers", ["basic"]):
                raise HubError(400, "mock hub supports LFS uploads with the basic transfer only")
            objects = []
            for o in req["objects"]:
                oid, size = o["oid"], int(o["size"])
                if not re.fullmatch(r"[0-9a-f]{64}", oid):
                    objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": "invalid oid"}})
                elif hub._has_blob(oid, size):
                    objects.append({"oid": oid, "size": size})  # no actions: already uploaded
                else:
                    objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                        "upload": {"href": f"{hub.url}/lfs-upload/{oid}"},
                        "verify": {"href": f"{hub.url}/lfs-verify"},
                    }})  # fmt: skip
            return self._json({"transfer": "basic", "objects": objects}, ctype="application/vnd.git-lfs+json")

        def lfs_upload(self, query, oid):
            data = self._body()
            if hashlib.sha256(data).hexdigest() != oid:
                raise HubError(400, "uploaded content does not match its sha256 oid")
            with hub.lock:
                hub._store_blob(data)
            return self._send(200)

        def lfs_verify(self, query):
            req = json.loads(self._body())
            if not hub._has_blob(req["oid"], int(req["size"])):
                raise HubError(404, f"LFS object {req['oid']} not found", "EntryNotFound")
            return self._json({"success": True})

        def commit(self, query, kind, repo_id, rev):
            self._require_auth()
            if query.get("create_pr", ["0"])[0] not in ("0", "false", "False", ""):
                raise HubError(400, "mock hub does not support pull requests")
            body = self._body()
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            if not lines or lines[0].get("key") != "header":
                raise HubError(400, "commit payload must start with a header line")
            header = lines[0]["value"]
            with hub.lock:
                repo = self._repo(_REPO_TYPES[kind], repo_id)
                if rev not in repo.branches:
                    raise HubError(404, f"Invalid rev id: {rev} (commits go to a branch)", "RevisionNotFound")
                parent = header.get("parentCommit")
                if parent and parent != repo.branches[rev]:
                    raise HubError(412, f"A commit has happened since {parent}; head is {repo.branches[rev]}")
                tree = dict(repo.commits[repo.branches[rev]])
                for item in lines[1:]:
                    key, val = item["key"], item["value"]
                    path = _clean_path(val["path"].rstrip("/") if key == "deletedFolder" else val["path"])
                    if key == "file":
                        content = val["content"]
                        data = base64.b64decode(content) if val.get("encoding") == "base64" else content.encode()
                        tree[path] = Entry(hub._store_blob(data), len(data), False, git_sha1(data))
                    elif key == "lfsFile":
                        if not hub._has_blob(val["oid"], val.get("size")):
                            raise HubError(422, f"LFS object {val['oid']} for {path} was not uploaded")
                        size = (hub.blobs / val["oid"]).stat().st_size
                        tree[path] = Entry(val["oid"], size, True, git_sha1(_lfs_pointer(val["oid"], size)))
                    elif key == "deletedFile":
                        if tree.pop(path, None) is None:
                            raise HubError(404, f"cannot delete {path}: no such file", "EntryNotFound")
                    elif key == "deletedFolder":
                        gone = [p for p in tree if p.startswith(path + "/")]
                        if not gone:
                            raise HubError(404, f"cannot delete folder {path}: no such folder", "EntryNotFound")
                        for p in gone:
                            del tree[p]
                    else:
                        raise HubError(400, f"mock hub: unsupported commit operation {key!r}")
                oid = hub._new_commit(repo, rev, tree, header.get("summary", ""), body)
            commit_url = f"{hub.url}/{_URL_PREFIX[repo.repo_type]}{repo_id}/commit/{oid}"
            return self._json({"success": True, "commitOid": oid, "commitUrl": commit_url, "pullRequestUrl": None})

        # ---- read
        def repo_info(self, query, kind, repo_id, rev):
            with hub.lock:
                repo = self._repo(_REPO_TYPES[kind], repo_id)
                oid = hub._resolve_rev(repo, rev or "main")
                tree = repo.commits[oid]
            siblings = [{"rfilename": p, "size": e.size} for p, e in sorted(tree.items())]
            info = {"_id": repo_id, "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0], "sha": oid,
                    "private": repo.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
                    "tags": [], "lastModified": _TIMESTAMP, "createdAt": _TIMESTAMP, "siblings": siblings}  # fmt: skip
            if "config.json" in tree:
                info["library_name"] = "transformers"
            return self._json(info)

        def refs(self, query, kind, repo_id):
            with hub.lock:
                repo = self._repo(_REPO_TYPES[kind], repo_id)
                branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": o} for b, o in repo.branches.items()]
            return self._json({"branches": branches, "tags": [], "converts": []})

        def tree(self, query, kind, repo_id, rev, sub):
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            with hub.lock:
                repo = self._repo(_REPO_TYPES[kind], repo_id)
                files = repo.commits[hub._resolve_rev(repo, rev)]
            prefix = (_clean_path(sub.rstrip("/")) + "/") if sub else ""
            if prefix and not any(p.startswith(prefix) for p in files):
                raise HubError(404, f"{sub} does not exist on {rev}", "EntryNotFound")
            items, dirs = [], set()
            for p, e in sorted(files.items()):
                if not p.startswith(prefix):
                    continue
                rest = p[len(prefix) :].split("/")
                for i in range(1, len(rest) if recursive else min(len(rest), 2)):
                    dirs.add(prefix + "/".join(rest[:i]))
                if len(rest) == 1 or recursive:
                    item = {"type": "file", "oid": e.git_oid, "size": e.size, "path": p}
                    if e.lfs:
                        item["lfs"] = {
                            "oid": e.sha256,
                            "size": e.size,
                            "pointerSize": len(_lfs_pointer(e.sha256, e.size)),
                        }
                    items.append(item)
            items += [{"type": "directory", "oid": git_sha1(d.encode()), "size": 0, "path": d} for d in sorted(dirs)]
            return self._json(items)

        def resolve(self, query, kind, repo_id, rev, path):
            with hub.lock:
                repo = self._repo(_REPO_TYPES[kind or "models"], repo_id)
                oid = hub._resolve_rev(repo, rev)
                entry = repo.commits[oid].get(path)
            if entry is None:
                raise HubError(404, "Entry not found", "EntryNotFound")
            headers = {"X-Repo-Commit": oid, "ETag": f'"{entry.etag}"', "Accept-Ranges": "bytes"}
            if entry.lfs:
                headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
            data = (hub.blobs / entry.sha256).read_bytes() if self.command == "GET" else b""
            rng = self.headers.get("Range")
            if rng and self.command == "GET":
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
                start = int(m.group(1)) if m else entry.size
                end = min(int(m.group(2)) if m and m.group(2) else entry.size - 1, entry.size - 1)
                if start >= entry.size or start > end:
                    return self._send(416, b"", {**headers, "Content-Range": f"bytes */{entry.size}"})
                headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
                return self._send(206, data[start : end + 1], headers, "application/octet-stream")
            if self.command == "HEAD":  # Content-Length of the file, no body
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(entry.size))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                with hub.lock:
                    hub.requests.append((self.command, self.path, 200))
                return None
            return self._send(200, data, headers, "application/octet-stream")

    return Handler


_KIND = r"(models|datasets|spaces)"
_ROUTES = [
    ("POST", r"/api/repos/create", lambda h, q: h.create_repo(q)),
    ("POST", r"/api/repos/delete", lambda h, q: h.delete_repo(q)),
    ("DELETE", r"/api/repos/delete", lambda h, q: h.delete_repo(q)),
    ("GET", r"/api/whoami-v2", lambda h, q: h.whoami(q)),
    ("POST", r"/api/validate-yaml", lambda h, q: h.validate_yaml(q)),
    ("POST", rf"/api/{_KIND}/{_REPO}/preupload/({_SEG})", lambda h, q, *g: h.preupload(q, *g)),
    ("POST", rf"/api/{_KIND}/{_REPO}/commit/({_SEG})", lambda h, q, *g: h.commit(q, *g)),
    ("POST", rf"/(?:(datasets|spaces)/)?{_REPO}\.git/info/lfs/objects/batch", lambda h, q, *g: h.lfs_batch(q, *g)),
    ("PUT", r"/lfs-upload/([0-9a-f]{64})", lambda h, q, *g: h.lfs_upload(q, *g)),
    ("POST", r"/lfs-verify", lambda h, q: h.lfs_verify(q)),
    ("GET", rf"/api/{_KIND}/{_REPO}(?:/revision/({_SEG}))?", lambda h, q, *g: h.repo_info(q, *g)),
    ("GET", rf"/api/{_KIND}/{_REPO}/refs", lambda h, q, *g: h.refs(q, *g)),
    ("GET", rf"/api/{_KIND}/{_REPO}/tree/({_SEG})(?:/(.*))?", lambda h, q, *g: h.tree(q, *g)),
    ("GET", rf"/(?:(datasets|spaces)/)?{_REPO}/resolve/({_SEG})/(.+)", lambda h, q, *g: h.resolve(q, *g)),
]


# ---------------------------------------------------------------- test-facing helpers
@contextlib.contextmanager
def mock_hub(root: str | os.PathLike | None = None, **kwargs):
    """Serve a :class:`MockHub` for the duration of the block; yield its endpoint URL."""
    with MockHub(root, **kwargs) as hub:
        yield hub.url


try:  # a pytest fixture, for tests that import it (``from helpers.hub_server import mock_hub_server``)
    import pytest

    @pytest.fixture
    def mock_hub_server(tmp_path):
        """A running :class:`MockHub` storing its blobs under ``tmp_path / "hub"``; stopped after the test."""
        with MockHub(tmp_path / "hub") as hub:
            yield hub

except ImportError:  # pragma: no cover
    pass


_REPO_ROOT = Path(__file__).resolve().parents[2]
_TESTS_DIR = Path(__file__).resolve().parents[1]


def hub_env(endpoint: str, home: str | os.PathLike, token: str = "dummy", extra: dict | None = None) -> dict:
    """The environment of a Hub client process talking to ``endpoint`` with its own cache in ``home``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "HUGGINGFACE_")) and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
        and k not in ("TRANSFORMERS_CACHE", "TRANSFORMERS_OFFLINE")
    }  # fmt: skip
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HUB_DISABLE_XET="1",
        HF_TOKEN=token,
        HF_HOME=str(home),
        HF_HUB_OFFLINE="0",
        TRANSFORMERS_OFFLINE="0",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_ETAG_TIMEOUT="30",
        HF_HUB_DOWNLOAD_TIMEOUT="60",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(p for p in (str(_REPO_ROOT), str(_TESTS_DIR), os.environ.get("PYTHONPATH")) if p),
    )
    env.update(extra or {})
    return env


def run_in_hub_subprocess(
    script: str,
    endpoint: str,
    tmp_path: str | os.PathLike,
    *,
    home: str | os.PathLike | None = None,
    timeout: float = 300,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Run ``script`` (Python source, dedented) in a fresh interpreter whose huggingface_hub uses ``endpoint``.

    ``HF_ENDPOINT`` is read when huggingface_hub is imported, hence the subprocess. The environment sets
    ``HF_HUB_DISABLE_XET=1``, ``HF_TOKEN=dummy``, ``HF_HUB_OFFLINE=0``, no proxy for loopback, ``PYTHONPATH`` with the
    repository root and ``tests/`` (so ``import optimum_mc`` and ``from helpers... import ...`` work), and an
    ``HF_HOME`` of its own: ``home``, or a fresh folder under ``tmp_path`` — so every call starts with an empty cache
    and downloads for real. ``env`` adds/overrides variables. Returns the completed process (text mode, output
    captured); check it with :func:`assert_ok`.
    """
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    home = Path(home) if home is not None else Path(tempfile.mkdtemp(prefix="hf_home_", dir=tmp_path))
    home.mkdir(parents=True, exist_ok=True)
    fd, script_path = tempfile.mkstemp(prefix="hub_client_", suffix=".py", dir=tmp_path)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(textwrap.dedent(script))
    return subprocess.run(
        [sys.executable, script_path],
        env=hub_env(endpoint, home, extra=env),
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_ok(res: subprocess.CompletedProcess, expect: str | None = None) -> str:
    """Assert the subprocess exited 0 (and printed ``expect``); return its stdout. Shows stderr on failure."""
    msg = f"exit {res.returncode}\n--- stdout\n{res.stdout[-3000:]}\n--- stderr\n{res.stderr[-6000:]}"
    assert res.returncode == 0, msg
    if expect is not None:
        assert expect in res.stdout, msg
    return res.stdout


def hub_url_for(endpoint: str, repo_id: str, path: str, revision: str = "main") -> str:
    """The resolve URL of a file in a model repo."""
    return f"{endpoint}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(path)}"
