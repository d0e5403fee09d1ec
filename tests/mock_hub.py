"""A loopback-only mock of the Hugging Face Hub HTTP API, enough for push_to_hub -> from_pretrained(repo_id).

Implements: repo create, README HEAD (404 EntryNotFound), validate-yaml, preupload, LFS batch + PUT (Xet
disabled), NDJSON commit, model info, tree listing, HEAD/GET resolve. Files live in a temporary folder.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class _Hub:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.lfs: dict[str, bytes] = {}
        self.commits: dict[str, str] = {}
        self.lock = threading.Lock()

    def repo_dir(self, repo: str) -> Path:
        return self.root / repo.replace("/", "__")


def _handler(hub: _Hub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output clean
            pass

        def _send(self, code: int, body: bytes = b"", headers: dict | None = None, ctype="application/json"):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, obj, code=200):
            self._send(code, json.dumps(obj).encode())

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def do_POST(self):  # noqa: N802
            path = urlparse(self.path).path
            body = self._body()
            if path == "/api/repos/create":
                info = json.loads(body or b"{}")
                repo = (
                    f"{info.get('organization') or 'me'}/{info['name']}" if "/" not in info["name"] else info["name"]
                )
                hub.repo_dir(repo).mkdir(parents=True, exist_ok=True)
                return self._json({"url": f"http://{self.headers['Host']}/{repo}", "name": repo})
            if path == "/api/validate-yaml":
                return self._json({"errors": [], "warnings": []})
            m = re.match(r"^/api/models/(.+?)/preupload/(.+)$", path)
            if m:
                files = json.loads(body)["files"]
                return self._json(
                    {"files": [{"path": f["path"], "uploadMode": "lfs" if f.get("size", 0) > 1000 else "regular",
                                "shouldIgnore": False, "oid": None} for f in files]}
                )  # fmt: skip
            m = re.match(r"^/(.+?)\.git/info/lfs/objects/batch$", path)
            if m:
                req = json.loads(body)
                host = f"http://{self.headers['Host']}"
                objs = [
                    {"oid": o["oid"], "size": o["size"], "authenticated": True,
                     "actions": {"upload": {"href": f"{host}/lfs-upload/{o['oid']}"}}}
                    for o in req["objects"]
                ]  # fmt: skip
                return self._send(200, json.dumps({"transfer": "basic", "objects": objs}).encode(),
                                  ctype="application/vnd.git-lfs+json")  # fmt: skip
            m = re.match(r"^/api/models/(.+?)/commit/(.+)$", path)
            if m:
                repo = unquote(m.group(1))
                d = hub.repo_dir(repo)
                d.mkdir(parents=True, exist_ok=True)
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    key, val = item["key"], item["value"]
                    if key == "file":
                        data = base64.b64decode(val["content"])
                    elif key == "lfsFile":
                        data = hub.lfs[val["oid"]]
                    else:
                        continue
                    target = d / val["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
                oid = hashlib.sha1(body).hexdigest()
                hub.commits[repo] = oid
                url = f"http://{self.headers['Host']}/{repo}/commit/{oid}"
                return self._json({"commitUrl": url, "commitOid": oid})
            return self._json({"error": f"unhandled POST {path}"}, 404)

        def do_PUT(self):  # noqa: N802
            m = re.match(r"^/lfs-upload/(\w+)$", urlparse(self.path).path)
            if not m:
                return self._json({"error": "bad PUT"}, 404)
            with hub.lock:
                hub.lfs[m.group(1)] = self._body()
            return self._send(200)

        def _resolve(self):
            m = re.match(r"^/(?:models/)?(.+?/.+?)/resolve/([^/]+)/(.+)$", unquote(urlparse(self.path).path))
            if not m:
                return self._json({"error": "not found"}, 404)
            repo, _, fname = m.groups()
            f = hub.repo_dir(repo) / fname
            if not f.is_file():
                return self._send(404, b"{}", {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"})
            data = f.read_bytes()
            etag = hashlib.sha256(data).hexdigest()
            headers = {"X-Repo-Commit": hub.commits.get(repo, "0" * 40), "ETag": f'"{etag}"'}
            return self._send(200, data, headers, ctype="application/octet-stream")

        def do_HEAD(self):  # noqa: N802
            return self._resolve()

        def do_GET(self):  # noqa: N802
            path = unquote(urlparse(self.path).path)
            m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$", path)
            if m:
                repo = m.group(1)
                d = hub.repo_dir(repo)
                if not d.exists():
                    return self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"})
                files = [str(p.relative_to(d)) for p in sorted(d.rglob("*")) if p.is_file()]
                return self._json({"id": repo, "modelId": repo, "sha": hub.commits.get(repo, "0" * 40),
                                   "siblings": [{"rfilename": f} for f in files], "private": False})  # fmt: skip
            m = re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$", path)
            if m:
                d = hub.repo_dir(m.group(1))
                if m.group(3):
                    d = d / m.group(3)
                    if not d.is_dir():
                        return self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"})
                files = [p for p in sorted(d.rglob("*")) if p.is_file()] if d.exists() else []
                return self._json([{"type": "file", "path": str(p.relative_to(d)), "size": p.stat().st_size,
                                    "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for p in files])  # fmt: skip
            return self._resolve()

    return Handler


@contextlib.contextmanager
def mock_hub(root: Path):
    """Serve a mock Hub on 127.0.0.1 (random port) for the duration of the block; yield its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(_Hub(Path(root))))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def run_with_hub(code: str, endpoint: str, home: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python with huggingface_hub pointed at ``endpoint`` (read at import time)."""
    env = dict(os.environ, HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1", HF_TOKEN="dummy", HF_HOME=str(home),
               HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1")  # fmt: skip
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
