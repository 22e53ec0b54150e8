"""A small Hugging Face Hub look-alike on 127.0.0.1, for testing push/download code without the Hub.

It implements exactly the part of the Hub HTTP API that ``huggingface_hub`` (2.x) uses for
``create_repo``, ``create_branch``, ``upload_folder``/``create_commit``, ``model_info``/``repo_info``,
``list_repo_tree``, ``snapshot_download`` and ``hf_hub_download``; nothing else answers (404 with a message naming the
route, so a client change shows up as a clear failure, not a hang).

Design choices, each mirroring what the real Hub does for small files:

* ``preupload`` answers ``"regular"`` for every file, so the client sends file contents inline,
  base64-encoded, in the NDJSON commit payload. No LFS batch API, no Xet: those need storage
  services this server does not emulate, and ``lfsFile`` entries in a commit are rejected.
* Every commit is a full snapshot (path -> git blob id); blobs are stored on disk, content-addressed
  by their git SHA-1 under ``root/blobs``. Downloads answer ``X-Repo-Commit`` and an ``ETag`` equal to
  the blob id, which is what ``hf_hub_download`` requires to populate its cache.
* Requests are bounded (body size, socket timeout) and the server binds an ephemeral port, so many
  test sessions can run side by side.
* ``hub.fail[<endpoint>] = <status>`` makes an endpoint fail, to test error paths, and
  ``hub.fail["<endpoint>:<repo id>"]`` only for one repo (so one client process can meet several
  failures); endpoints are ``create``, ``branch``, ``validate-yaml``, ``preupload``, ``commit``, ``info``,
  ``tree``, ``resolve``, ``whoami``.
  ``hub.requests`` records ``(method, endpoint, path)`` for every request.

Usage::

    with FakeHub(tmp_path / "hub", token="hf_fake") as hub:
        env = {"HF_ENDPOINT": hub.url, ...}   # huggingface_hub reads HF_ENDPOINT at import
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

__all__ = ["FakeHub", "git_blob_id"]

MAX_BODY_BYTES = 64 * 1024 * 1024
SOCKET_TIMEOUT_S = 15.0
DEFAULT_USER = "fake-user"

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPO = rf"(?:{_NAME}/)?{_NAME}"
_API_REPO = re.compile(
    rf"^/api/(?P<type>models|datasets|spaces)/(?P<repo>{_REPO})"
    r"(?:/(?P<op>preupload|commit|tree|revision|branch)(?:/(?P<rest>.*))?)?$"
)
_RESOLVE = re.compile(rf"^/(?P<repo>{_REPO})/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob, which the Hub uses as the oid/ETag of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()


@dataclass
class _Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, str]  # path -> blob id


@dataclass
class _Repo:
    repo_id: str
    repo_type: str
    private: bool
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> _Commit | None:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)


class _HubError(Exception):
    """An HTTP error the handler turns into a Hub-style response (status, X-Error-Code, JSON body)."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class FakeHub:
    """Start/stop a Hub-compatible server storing repos under ``root``; see the module docstring."""

    def __init__(self, root: str | Path, token: str | None = None, user: str = DEFAULT_USER):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.token = token
        self.user = user
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.fail: dict[str, int] = {}
        self.requests: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._counter = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeHub is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True  # a client that keeps a connection open must not block shutdown
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ inspection helpers for tests

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The content of every file of ``repo_id`` at ``revision``."""
        repo = self.repos[(repo_type, repo_id)]
        commit = repo.resolve(revision)
        if commit is None:
            raise KeyError(revision)
        return {path: self._read_blob(blob) for path, blob in commit.files.items()}

    def endpoints_called(self) -> set[str]:
        with self._lock:
            return {endpoint for _, endpoint, _ in self.requests}

    # ------------------------------------------------------------------ storage

    def _write_blob(self, data: bytes) -> str:
        blob = git_blob_id(data)
        path = self.root / "blobs" / blob
        if not path.exists():
            path.write_bytes(data)
        return blob

    def _read_blob(self, blob: str) -> bytes:
        return (self.root / "blobs" / blob).read_bytes()

    def _new_commit(self, repo: _Repo, parent: _Commit | None, message: str, files: dict[str, str]) -> _Commit:
        self._counter += 1
        seed = json.dumps([repo.repo_id, parent.oid if parent else None, message, sorted(files.items()), self._counter])
        commit = _Commit(hashlib.sha1(seed.encode()).hexdigest(), parent.oid if parent else None, message, files)
        repo.commits[commit.oid] = commit
        return commit


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT_S  # bounds a stalled client: the handler thread gives up instead of hanging
    server_version = "FakeHub/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        pass  # keep pytest output clean; `hub.requests` records what happened

    # ------------------------------------------------------------------ dispatch

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        path, query = split.path, parse_qs(split.query)
        endpoint = "unknown"
        try:
            body = self._read_body()
            route = self._route(method, path)
            if route is None:
                raise _HubError(404, f"FakeHub does not implement {method} {path}")
            endpoint, handler, kwargs = route
            repo_id = kwargs.get("repo_id") or self._repo_id_in_create(endpoint, body)
            with self.hub._lock:
                self.hub.requests.append((method, endpoint, path))
                status = self.hub.fail.get(f"{endpoint}:{self._full_id(repo_id)}" if repo_id else endpoint)
                status = status or self.hub.fail.get(endpoint)
            if status is not None:
                raise _HubError(status, f"FakeHub: simulated failure of {endpoint!r}")
            with self.hub._lock:
                handler(method=method, body=body, query=query, **kwargs)
        except _HubError as err:
            with self.hub._lock:
                if endpoint == "unknown":
                    self.hub.requests.append((method, endpoint, path))
            headers = dict(err.headers)
            if err.code:
                headers["X-Error-Code"] = err.code
            headers["X-Error-Message"] = err.message
            self._send_json({"error": err.message}, status=err.status, headers=headers, head=method == "HEAD")
        except Exception as err:  # a bug in the fake must surface as a 500 the client reports, not a hang
            self._send_json({"error": f"FakeHub internal error: {err!r}"}, status=500, head=method == "HEAD")

    def _route(self, method: str, path: str):
        if path == "/api/repos/create" and method == "POST":
            return "create", self._create_repo, {}
        if path == "/api/validate-yaml" and method == "POST":
            return "validate-yaml", self._validate_yaml, {}
        if path == "/api/whoami-v2" and method == "GET":
            return "whoami", self._whoami, {}
        if path == "/api/agent-harnesses" and method == "GET":
            return "agent-harnesses", self._agent_harnesses, {}
        m = _API_REPO.match(path)
        if m:
            repo_type = m["type"][:-1]
            repo_id, op, rest = m["repo"], m["op"], m["rest"]
            if op is None and method == "GET":
                return "info", self._info, {"repo_type": repo_type, "repo_id": repo_id, "revision": "main"}
            if op == "revision" and method == "GET" and rest:
                return "info", self._info, {"repo_type": repo_type, "repo_id": repo_id, "revision": unquote(rest)}
            if op == "preupload" and method == "POST" and rest:
                return (
                    "preupload",
                    self._preupload,
                    {"repo_type": repo_type, "repo_id": repo_id, "revision": unquote(rest)},
                )
            if op == "branch" and method == "POST" and rest:
                return "branch", self._create_branch, {"repo_type": repo_type, "repo_id": repo_id, "branch": unquote(rest)}
            if op == "commit" and method == "POST" and rest:
                return "commit", self._commit, {"repo_type": repo_type, "repo_id": repo_id, "revision": unquote(rest)}
            if op == "tree" and method == "GET" and rest:
                revision, _, sub = rest.partition("/")
                return (
                    "tree",
                    self._tree,
                    {
                        "repo_type": repo_type,
                        "repo_id": repo_id,
                        "revision": unquote(revision),
                        "sub": unquote(sub),
                    },
                )
        m = _RESOLVE.match(path)
        if m and method in ("GET", "HEAD"):
            return (
                "resolve",
                self._resolve,
                {
                    "repo_type": "model",
                    "repo_id": m["repo"],
                    "revision": unquote(m["rev"]),
                    "file": unquote(m["path"]),
                },
            )
        return None

    def _repo_id_in_create(self, endpoint: str, body: bytes) -> str | None:
        if endpoint != "create":
            return None
        try:
            payload = json.loads(body or b"{}")
        except json.JSONDecodeError:
            return None
        org, name = payload.get("organization"), payload.get("name")
        return f"{org}/{name}" if org and name else name

    # ------------------------------------------------------------------ I/O helpers

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise _HubError(411, "FakeHub needs a Content-Length (chunked request bodies are not supported)")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise _HubError(413, f"request body of {length} bytes exceeds the FakeHub limit of {MAX_BODY_BYTES}")
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, data: bytes, headers: dict[str, str], head: bool = False) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _send_json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None, head: bool = False):
        data = json.dumps(payload).encode()
        self._send(status, data, {"Content-Type": "application/json", **(headers or {})}, head=head)

    def _authorized(self) -> bool:
        if self.hub.token is None:
            return True
        return self.headers.get("Authorization", "") == f"Bearer {self.hub.token}"

    def _require_write(self) -> None:
        if not self._authorized():
            raise _HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self.hub.repos.get((repo_type, self._full_id(repo_id)))
        if repo is None or (repo.private and not self._authorized()):
            # The Hub answers the same for "does not exist" and "private and you may not see it".
            raise _HubError(404, f"Repository Not Found for {repo_type} {repo_id!r}", code="RepoNotFound")
        return repo

    def _commit_of(self, repo: _Repo, revision: str) -> _Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HubError(404, f"Revision Not Found: {revision!r}", code="RevisionNotFound")
        return commit

    def _full_id(self, repo_id: str) -> str:
        return repo_id if "/" in repo_id else f"{self.hub.user}/{repo_id}"

    def _base(self) -> str:
        return self.hub.url

    # ------------------------------------------------------------------ endpoints

    def _whoami(self, **_: Any) -> None:
        if not self._authorized() or self.hub.token is None:
            raise _HubError(401, "Invalid credentials in Authorization header")
        self._send_json({"type": "user", "name": self.hub.user, "orgs": [], "auth": {"type": "access_token"}})

    def _agent_harnesses(self, **_: Any) -> None:
        # huggingface_hub fetches this registry (best effort, for its user agent); an empty one detects nothing.
        self._send_json({"standardEnvVars": [], "harnesses": {}})

    def _create_repo(self, body: bytes, **_: Any) -> None:
        self._require_write()
        payload = json.loads(body or b"{}")
        name, org = payload.get("name"), payload.get("organization")
        repo_type = payload.get("type") or "model"
        if not name or not re.fullmatch(_NAME, name):
            raise _HubError(400, f"Invalid repo name {name!r}")
        repo_id = f"{org or self.hub.user}/{name}"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self._base()}/{prefix}{repo_id}"
        if (repo_type, repo_id) in self.hub.repos:
            self._send_json({"error": "You already created this model repo", "url": url}, status=409)
            return
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = _Repo(repo_id, repo_type, private)
        # Like the Hub, a new repo has one commit holding a .gitattributes file.
        blob = self.hub._write_blob(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
        repo.branches["main"] = self.hub._new_commit(repo, None, "initial commit", {".gitattributes": blob}).oid
        self.hub.repos[(repo_type, repo_id)] = repo
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, body: bytes, **_: Any) -> None:
        content = json.loads(body or b"{}").get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, flags=re.DOTALL)
        errors = []
        if match:
            try:
                data = yaml.safe_load(match.group(1))
                if data is not None and not isinstance(data, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
            except yaml.YAMLError as err:
                errors.append({"message": f"YAML parse error: {err}"})
        status = 400 if errors else 200
        self._send_json({"errors": errors, "warnings": []}, status=status)

    def _info(self, repo_type: str, repo_id: str, revision: str, **_: Any) -> None:
        repo = self._repo(repo_type, repo_id)
        commit = self._commit_of(repo, revision)
        self._send_json(
            {
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit.oid,
                "private": repo.private,
                "tags": [],
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            }
        )

    def _tree(self, repo_type: str, repo_id: str, revision: str, sub: str, query: dict, **_: Any) -> None:
        repo = self._repo(repo_type, repo_id)
        commit = self._commit_of(repo, revision)
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        entries: dict[str, dict] = {}
        for path in sorted(commit.files):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            # Folders on the way to the file (all of them when recursive, the first level otherwise).
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folder = prefix + "/".join(parts[:depth])
                entries.setdefault(folder, {"type": "directory", "oid": git_blob_id(folder.encode()), "path": folder})
            if recursive or len(parts) == 1:
                blob = commit.files[path]
                size = (self.hub.root / "blobs" / blob).stat().st_size
                entries[path] = {"type": "file", "oid": blob, "size": size, "path": path}
        if prefix and not entries:
            raise _HubError(404, f"Entry Not Found: {sub!r}", code="EntryNotFound")
        self._send_json(list(entries.values()))

    def _preupload(self, repo_type: str, repo_id: str, revision: str, body: bytes, **_: Any) -> None:
        self._require_write()
        repo = self._repo(repo_type, repo_id)
        commit = repo.resolve(revision)
        files = json.loads(body or b"{}").get("files", [])
        self._send_json(
            {
                "files": [
                    {
                        "path": f["path"],
                        "uploadMode": "regular",  # never LFS/Xet: the content comes inline in the commit payload
                        "shouldIgnore": False,
                        "oid": commit.files.get(f["path"]) if commit else None,
                    }
                    for f in files
                ],
                "commitOid": commit.oid if commit else None,
            }
        )

    def _create_branch(self, repo_type: str, repo_id: str, branch: str, body: bytes, **_: Any) -> None:
        self._require_write()
        repo = self._repo(repo_type, repo_id)
        if branch in repo.branches:
            raise _HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        repo.branches[branch] = self._commit_of(repo, start).oid
        self._send_json({})

    def _commit(self, repo_type: str, repo_id: str, revision: str, body: bytes, query: dict, **_: Any) -> None:
        self._require_write()
        repo = self._repo(repo_type, repo_id)
        if query.get("create_pr"):
            raise _HubError(400, "FakeHub does not support pull requests")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        parent = repo.resolve(revision)
        if parent is None and revision in repo.commits:
            raise _HubError(400, "cannot commit on top of a commit id; use a branch")
        if revision not in repo.branches:  # as the Hub: a branch must exist (create_branch) before a commit to it
            raise _HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        if header.get("parentCommit") and parent is not None and header["parentCommit"] != parent.oid:
            raise _HubError(412, "parentCommit is not the head of the branch")
        files = dict(parent.files) if parent else {}
        for item in lines[1:]:
            key, value = item.get("key"), item.get("value", {})
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = self.hub._write_blob(base64.b64decode(value["content"]))
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise _HubError(404, f"cannot delete missing file {value['path']!r}", code="EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: b for p, b in files.items() if not p.startswith(prefix)}
            elif key == "lfsFile":
                raise _HubError(400, "FakeHub does not store LFS files; preupload always answers 'regular'")
            else:
                raise _HubError(400, f"unknown commit operation {key!r}")
        commit = self.hub._new_commit(repo, parent, header.get("summary", ""), files)
        repo.branches[revision] = commit.oid
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        self._send_json(
            {
                "commitUrl": f"{self._base()}/{prefix}{repo.repo_id}/commit/{commit.oid}",
                "commitOid": commit.oid,
                "success": True,
                "pullRequestUrl": None,
            }
        )

    def _resolve(self, method: str, repo_type: str, repo_id: str, revision: str, file: str, **_: Any) -> None:
        repo = self._repo(repo_type, repo_id)
        commit = self._commit_of(repo, revision)
        blob = commit.files.get(file)
        if blob is None:
            # X-Repo-Commit on a 404 lets the client cache the non-existence of the file for this commit.
            raise _HubError(
                404, f"Entry Not Found: {file!r}", code="EntryNotFound", headers={"X-Repo-Commit": commit.oid}
            )
        data = self.hub._read_blob(blob)
        self._send(
            HTTPStatus.OK,
            data,
            {
                "Content-Type": "application/octet-stream",
                "X-Repo-Commit": commit.oid,
                "ETag": f'"{blob}"',
                "Accept-Ranges": "bytes",
                "Last-Modified": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime()),
            },
            head=method == "HEAD",
        )
