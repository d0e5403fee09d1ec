"""The loopback mock Hub: raw protocol, the huggingface_hub client, and push_to_hub -> from_pretrained(repo_id)."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import socket

import pytest
import torch
from helpers.hub_server import MockHub, assert_ok, git_sha1, mock_hub, run_in_hub_subprocess


def _request(url: str, method: str, path: str, body=None, headers=None):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


AUTH = {"Authorization": "Bearer dummy"}


def test_raw_protocol_and_shutdown(tmp_path):
    with MockHub(tmp_path / "hub") as hub:
        url = hub.url
        assert url.startswith("http://127.0.0.1:")
        assert hub._server.server_address[0] == "127.0.0.1"  # loopback only

        # writes need a token; repo creation; 409 when it exists
        assert _request(url, "POST", "/api/repos/create", {"name": "tiny", "organization": "me"})[0] == 401
        status, _, body = _request(url, "POST", "/api/repos/create", {"name": "tiny", "organization": "me"}, AUTH)
        assert status == 200 and json.loads(body)["url"] == f"{url}/me/tiny"
        assert _request(url, "POST", "/api/repos/create", {"name": "me/tiny"}, AUTH)[0] == 409

        # missing things: the X-Error-Code huggingface_hub maps to its exceptions
        for path, code in [
            ("/me/tiny/resolve/main/config.json", "EntryNotFound"),
            ("/me/other/resolve/main/config.json", "RepoNotFound"),
            ("/me/tiny/resolve/v9/.gitattributes", "RevisionNotFound"),
        ]:
            status, headers, _ = _request(url, "HEAD", path)
            assert (status, headers.get("X-Error-Code")) == (404, code), path

        # LFS: batch -> PUT (sha256 checked) -> commit; regular file inline (base64)
        blob = bytes(range(256)) * 8
        oid = hashlib.sha256(blob).hexdigest()
        batch = {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": len(blob)}]}
        status, _, body = _request(url, "POST", "/me/tiny.git/info/lfs/objects/batch", batch, AUTH)
        href = json.loads(body)["objects"][0]["actions"]["upload"]["href"]
        assert status == 200 and href.startswith(url)
        assert _request(url, "PUT", href.removeprefix(url), blob[:-1])[0] == 400  # content does not match the oid
        assert _request(url, "PUT", href.removeprefix(url), blob)[0] == 200
        status, _, body = _request(url, "POST", "/me/tiny.git/info/lfs/objects/batch", batch, AUTH)
        assert "actions" not in json.loads(body)["objects"][0]  # already uploaded
        lines = [
            {"key": "header", "value": {"summary": "add", "description": ""}},
            {"key": "file", "value": {"path": "config.json", "content": base64.b64encode(b"{}").decode(),
                                      "encoding": "base64"}},
            {"key": "lfsFile", "value": {"path": "w/model.safetensors", "algo": "sha256", "oid": oid,
                                         "size": len(blob)}},
        ]  # fmt: skip
        ndjson = "\n".join(json.dumps(x) for x in lines).encode()
        status, _, body = _request(url, "POST", "/api/models/me/tiny/commit/main", ndjson, AUTH)
        commit = json.loads(body)["commitOid"]
        assert status == 200 and len(commit) == 40

        # resolve: headers, body, ranges, by branch or by commit id
        status, headers, body = _request(url, "HEAD", "/me/tiny/resolve/main/w/model.safetensors")
        assert status == 200 and body == b""
        assert headers["Content-Length"] == str(len(blob)) and headers["X-Repo-Commit"] == commit
        assert headers["ETag"] == f'"{oid}"'
        status, headers, body = _request(url, "GET", f"/me/tiny/resolve/{commit}/config.json")
        assert (status, body, headers["ETag"]) == (200, b"{}", f'"{git_sha1(b"{}")}"')
        status, headers, body = _request(url, "GET", "/me/tiny/resolve/main/w/model.safetensors", headers={
            "Range": "bytes=10-19"})  # fmt: skip
        assert (status, body, headers["Content-Range"]) == (206, blob[10:20], f"bytes 10-19/{len(blob)}")

        # info and tree
        status, _, body = _request(url, "GET", "/api/models/me/tiny")
        info = json.loads(body)
        assert info["sha"] == commit
        assert [s["rfilename"] for s in info["siblings"]] == [".gitattributes", "config.json", "w/model.safetensors"]
        status, _, body = _request(url, "GET", "/api/models/me/tiny/tree/main/w")
        assert [(e["path"], e["lfs"]["oid"]) for e in json.loads(body)] == [("w/model.safetensors", oid)]
        assert hub.read("me/tiny", "w/model.safetensors") == blob

        # an LFS commit whose object was never uploaded is refused; unknown routes are recorded
        bad = lines[:1] + [{"key": "lfsFile", "value": {"path": "x.bin", "algo": "sha256", "oid": "0" * 64}}]
        status, _, _ = _request(url, "POST", "/api/models/me/tiny/commit/main",
                                "\n".join(json.dumps(x) for x in bad).encode(), AUTH)  # fmt: skip
        assert status == 422
        assert _request(url, "GET", "/api/spaces-of-nothing")[0] == 404
        assert hub.unhandled == [("GET", "/api/spaces-of-nothing")] and not hub.errors
    with pytest.raises(OSError):  # stopped: nothing listens any more
        socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=2).close()
    with mock_hub() as url:  # the plain context manager: a temporary store, yields the endpoint
        assert _request(url, "GET", "/api/models/me/tiny")[1]["X-Error-Code"] == "RepoNotFound"


def test_huggingface_hub_client(tmp_path):
    script = """
        import os
        from huggingface_hub import HfApi, file_exists, hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

        api = HfApi()
        assert api.whoami()["name"] == "me"
        assert api.create_repo("me/data").repo_id == "me/data"
        api.create_repo("me/data", exist_ok=True)
        c1 = api.upload_file(path_or_fileobj=b'{"a": 1}', path_in_repo="config.json", repo_id="me/data")
        big = os.urandom(3000)
        c2 = api.upload_file(path_or_fileobj=big, path_in_repo="w/model.safetensors", repo_id="me/data")
        assert api.model_info("me/data").sha == c2.oid
        assert sorted(api.list_repo_files("me/data")) == [".gitattributes", "config.json", "w/model.safetensors"]
        assert open(hf_hub_download("me/data", "w/model.safetensors"), "rb").read() == big
        api.upload_file(path_or_fileobj=b'{"a": 2}', path_in_repo="config.json", repo_id="me/data")
        assert open(hf_hub_download("me/data", "config.json", revision=c1.oid)).read() == '{"a": 1}'
        assert open(hf_hub_download("me/data", "config.json")).read() == '{"a": 2}'
        assert not file_exists("me/data", "missing.txt")
        for call, exc in [
            (lambda: hf_hub_download("me/data", "missing.txt"), EntryNotFoundError),
            (lambda: hf_hub_download("me/data", "config.json", revision="nope"), RevisionNotFoundError),
            (lambda: api.model_info("me/none"), RepositoryNotFoundError),
        ]:
            try:
                call()
                raise AssertionError(f"expected {exc.__name__}")
            except exc:
                pass
        tree = {e.path: type(e).__name__ for e in api.list_repo_tree("me/data")}
        assert tree == {".gitattributes": "RepoFile", "config.json": "RepoFile", "w": "RepoFolder"}, tree
        head = api.model_info("me/data").sha
        assert api.upload_file(path_or_fileobj=big, path_in_repo="w/model.safetensors", repo_id="me/data").oid == head
        api.delete_file("w/model.safetensors", "me/data")
        assert "w/model.safetensors" not in api.list_repo_files("me/data")
        api.delete_repo("me/data")
        assert not api.repo_exists("me/data")
        print("client OK")
    """
    with MockHub(tmp_path / "hub") as hub:
        assert_ok(run_in_hub_subprocess(script, hub.url, tmp_path), "client OK")
        assert not hub.unhandled and not hub.errors
        assert any(m == "PUT" and p.startswith("/lfs-upload/") for m, p, _ in hub.requests)  # LFS went through


def test_push_to_hub_then_from_pretrained_and_pipeline(tmp_path):
    expected = tmp_path / "expected.pt"
    push = f"""
        import torch
        from helpers.tokenizer import make_tiny_tokenizer
        from transformers import MixtralConfig, MixtralForCausalLM

        tok = make_tiny_tokenizer()
        cfg = MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                            max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        torch.manual_seed(0)
        model = MixtralForCausalLM(cfg).eval()
        ids = tok("def add(a, b): return a + b", return_tensors="pt").input_ids
        with torch.no_grad():
            torch.save({{"ids": ids, "logits": model(ids).logits}}, {str(expected)!r})
        model.push_to_hub("me/tiny")
        tok.push_to_hub("me/tiny")
        print("pushed")
    """
    pull = f"""
        import torch
        from transformers import AutoModelForCausalLM, pipeline

        ref = torch.load({str(expected)!r})
        model = AutoModelForCausalLM.from_pretrained("me/tiny").eval()
        assert type(model).__name__ == "MixtralForCausalLM"
        with torch.no_grad():
            assert torch.equal(model(ref["ids"]).logits, ref["logits"]), "logits differ"
        out = pipeline("text-generation", model="me/tiny")("def add", max_new_tokens=5, do_sample=False)
        assert out[0]["generated_text"].startswith("def add"), out
        print("pulled", repr(out[0]["generated_text"]))
    """
    with MockHub(tmp_path / "hub") as hub:
        assert_ok(run_in_hub_subprocess(push, hub.url, tmp_path), "pushed")
        files = hub.list_files("me/tiny")
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
        assert files["model.safetensors"].lfs and not files["config.json"].lfs
        assert_ok(run_in_hub_subprocess(pull, hub.url, tmp_path), "pulled 'def add")  # fresh HF_HOME: real downloads
        assert not hub.unhandled and not hub.errors, (hub.unhandled, hub.errors)
    assert torch.load(expected)["logits"].shape[-1] == 320
