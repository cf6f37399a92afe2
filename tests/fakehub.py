"""A small in-memory Hugging Face Hub for tests: the endpoints huggingface_hub 1.17 uses to push.

Endpoints (read from huggingface_hub's ``hf_api.py`` / ``_commit_api.py``):

- ``POST /api/repos/create``                          create_repo (409 + ``url`` when it exists)
- ``GET  /api/whoami-v2``                              whoami
- ``POST /api/validate-yaml``                          README metadata check done by create_commit
- ``GET  /api/models/{repo}`` and ``.../revision/{rev}`` repo_info / model_info
- ``GET  /api/models/{repo}/refs``                     list_repo_refs
- ``GET  /api/models/{repo}/tree/{rev}``               list_repo_tree (recursive only, one page)
- ``POST /api/models/{repo}/preupload/{rev}``          every file is ``uploadMode: "regular"``
- ``POST /api/models/{repo}/commit/{rev}``             ndjson: header, file (base64), deletedFile,
                                                      deletedFolder; ``lfsFile`` is refused (400)
- ``POST /api/models/{repo}/branch/{branch}``          create_branch
- ``POST /api/models/{repo}/tag/{rev}``                create_tag (409 when the tag exists)

Every request must carry ``Authorization: Bearer <token>``; anything else is a 401 with the
Hub's ``X-Error-Message: Invalid credentials in Authorization header``. Each request is
recorded (method, path, Authorization header) so tests can count them and check the token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

_REPO_API = re.compile(
    r"^/api/models/(?P<ns>[^/]+)/(?P<name>[^/]+)"
    r"(?:/(?P<op>preupload|commit|tag|branch|tree|refs|revision)(?:/(?P<rest>.*))?)?$"
)


@dataclass
class FakeRepo:
    repo_id: str
    private: bool
    commits: dict[str, dict[str, Any]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def files(self, revision: str = "main") -> dict[str, bytes]:
        oid = self.resolve(revision)
        return dict(self.commits[oid]["files"]) if oid else {}

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.tags:
            return self.tags[revision]
        if revision in self.commits:
            return revision
        return None

    def add_commit(self, files: dict[str, bytes], parent: str | None, summary: str) -> str:
        h = hashlib.sha1()
        h.update((parent or "").encode())
        h.update(summary.encode())
        for path in sorted(files):
            h.update(path.encode() + b"\0" + hashlib.sha1(files[path]).digest())
        h.update(str(len(self.commits)).encode())
        oid = h.hexdigest()
        self.commits[oid] = {"files": files, "parent": parent, "summary": summary}
        return oid


@dataclass
class Recorded:
    method: str
    path: str
    authorization: str | None


class _Reply(Exception):
    def __init__(self, status: int, body: Any = None, headers: dict[str, str] | None = None):
        self.status = status
        self.body = body if body is not None else {}
        self.headers = headers or {}


class FakeHub:
    """``with FakeHub(token) as hub:`` then ``HfApi(endpoint=hub.url)``."""

    def __init__(self, token: str = "hf_SECRETabc123", *, user: str = "tester"):
        self.token = token
        self.user = user
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[Recorded] = []
        self.forbidden_namespaces: set[str] = set()  # create_repo there answers 403
        self.after_commit = None  # optional callable(repo, oid): simulate a concurrent client
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                hub._handle(self, "GET")

            def do_POST(self):  # noqa: N802
                hub._handle(self, "POST")

            def do_DELETE(self):  # noqa: N802
                hub._handle(self, "DELETE")

            def do_PUT(self):  # noqa: N802
                hub._handle(self, "PUT")

            def log_message(self, format, *args):  # keep test output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    # -- lifecycle

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    # -- request handling

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        split = urlsplit(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        auth = h.headers.get("Authorization")
        with self._lock:
            self.requests.append(Recorded(method, split.path, auth))
            try:
                if auth != f"Bearer {self.token}":
                    raise _Reply(
                        401,
                        {"error": "Invalid credentials in Authorization header"},
                        {"X-Error-Message": "Invalid credentials in Authorization header"},
                    )
                status, payload, headers = 200, self._route(method, split.path, parse_qs(split.query), body), {}
            except _Reply as reply:
                status, payload, headers = reply.status, reply.body, reply.headers
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.send_header("X-Request-Id", f"fake-{len(self.requests)}")
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def _route(self, method: str, path: str, query: dict, body: bytes) -> Any:
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body or b"{}"))
        if method == "GET" and path == "/api/whoami-v2":
            return {"type": "user", "name": self.user, "auth": {"type": "access_token"}}
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body or b"{}"))
        m = _REPO_API.match(path)
        if not m:
            raise _Reply(404, {"error": f"fake hub: no route for {method} {path}"})
        repo = self._repo(f"{unquote(m['ns'])}/{unquote(m['name'])}")
        op, rest = m["op"], unquote(m["rest"] or "")
        if method == "GET" and op is None:
            return self._info(repo, "main")
        if method == "GET" and op == "revision":
            return self._info(repo, rest)
        if method == "GET" and op == "refs":
            return self._refs(repo)
        if method == "GET" and op == "tree":
            return self._tree(repo, rest)
        if method == "POST" and op == "preupload":
            return self._preupload(repo, rest, json.loads(body))
        if method == "POST" and op == "commit":
            return self._commit(repo, rest, body)
        if method == "POST" and op == "branch":
            return self._branch(repo, rest, json.loads(body or b"{}"))
        if method == "POST" and op == "tag":
            return self._tag(repo, rest, json.loads(body))
        raise _Reply(404, {"error": f"fake hub: no route for {method} {path}"})

    # -- endpoints

    def _repo(self, repo_id: str) -> FakeRepo:
        if repo_id not in self.repos:
            raise _Reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        return self.repos[repo_id]

    def _oid(self, repo: FakeRepo, revision: str) -> str:
        oid = repo.resolve(revision)
        if oid is None:
            raise _Reply(
                404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"}
            )
        return oid

    def _create_repo(self, payload: dict) -> dict:
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        url = f"{self.url}/{repo_id}"
        if payload.get("type", "model") != "model":
            raise _Reply(400, {"error": "fake hub: only model repos"})
        if repo_id.split("/")[0] in self.forbidden_namespaces:
            raise _Reply(
                403,
                {"error": "You don't have the rights to create a model under this namespace"},
                {"X-Error-Message": "You don't have the rights to create a model under this namespace"},
            )
        if repo_id in self.repos:
            raise _Reply(409, {"error": "You already created this model repo", "url": url})
        repo = FakeRepo(repo_id, private=payload.get("visibility") == "private")
        initial = repo.add_commit({".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                                  None, "initial commit")
        repo.branches["main"] = initial
        self.repos[repo_id] = repo
        return {"url": url, "name": repo_id, "id": repo_id}

    def _validate_yaml(self, payload: dict) -> dict:
        content = payload.get("content", "")
        m = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
        if not m:
            return {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]}
        try:
            data = yaml.safe_load(m[1])
        except yaml.YAMLError as e:
            raise _Reply(400, {"errors": [{"message": f"invalid YAML: {e}"}], "warnings": []})
        if not isinstance(data, dict):
            raise _Reply(400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
        return {"errors": [], "warnings": []}

    def _info(self, repo: FakeRepo, revision: str) -> dict:
        oid = self._oid(repo, revision)
        return {
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": oid,
            "private": repo.private,
            "siblings": [{"rfilename": p} for p in sorted(repo.commits[oid]["files"])],
        }

    def _refs(self, repo: FakeRepo) -> dict:
        def ref(kind, name, oid):
            return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": oid}

        return {
            "branches": [ref("heads", n, o) for n, o in sorted(repo.branches.items())],
            "tags": [ref("tags", n, o) for n, o in sorted(repo.tags.items())],
            "converts": [],
            "pullRequests": [],
        }

    def _tree(self, repo: FakeRepo, rest: str) -> list:
        revision, _, prefix = rest.partition("/")
        files = repo.commits[self._oid(repo, revision)]["files"]
        return [
            {"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
            for p, b in sorted(files.items())
            if not prefix or p.startswith(prefix.rstrip("/") + "/")
        ]

    def _preupload(self, repo: FakeRepo, revision: str, payload: dict) -> dict:
        self._oid(repo, revision)
        return {
            "files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                for f in payload["files"]
            ]
        }

    def _commit(self, repo: FakeRepo, revision: str, body: bytes) -> dict:
        if revision not in repo.branches:
            raise _Reply(404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"})
        head = repo.branches[revision]
        files = dict(repo.commits[head]["files"])
        summary = ""
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
                parent = value.get("parentCommit")
                if parent is not None and parent != head:
                    raise _Reply(412, {"error": "A commit has happened since. Please refresh and try again."})
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise _Reply(400, {"error": "fake hub: only base64 file content"})
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise _Reply(404, {"error": "A file with this name doesn't exist"},
                                 {"X-Error-Code": "EntryNotFound"})
                del files[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: b for p, b in files.items() if not p.startswith(prefix)}
            else:
                raise _Reply(400, {"error": f"fake hub: unsupported commit operation {key!r}"})
        oid = repo.add_commit(files, head, summary)
        repo.branches[revision] = oid
        if self.after_commit is not None:
            self.after_commit(repo, oid)
        return {
            "success": True,
            "commitOid": oid,
            "commitUrl": f"{self.url}/{repo.repo_id}/commit/{oid}",
            "hookOutput": "",
        }

    def _branch(self, repo: FakeRepo, branch: str, payload: dict) -> dict:
        if branch in repo.branches:
            raise _Reply(409, {"error": f"Reference already exists: refs/heads/{branch}"})
        repo.branches[branch] = self._oid(repo, payload.get("startingPoint") or "main")
        return {}

    def _tag(self, repo: FakeRepo, revision: str, payload: dict) -> dict:
        tag = payload["tag"]
        if tag in repo.tags:
            raise _Reply(409, {"error": f"Tag {tag} already exists"})
        repo.tags[tag] = self._oid(repo, revision)
        return {}
