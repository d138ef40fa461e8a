"""A small Hugging Face Hub-compatible HTTP server for tests (standard library only, in memory).

It implements the endpoints the real `huggingface_hub` client uses to create a repo, validate a card, upload
files (regular and LFS, "basic" transfer) in one commit, and download them again through `/resolve/`, and those
`datasets` uses to read a dataset repo:

    GET  /api/whoami-v2
    GET  /api/agent-harnesses                                (empty registry)
    POST /api/repos/create                                   409 when the repo exists
    POST /api/validate-yaml                                  400 with the reason when the metadata is invalid
    GET  /api/models/{repo}[/revision/{rev}]                 model info with siblings
    GET  /api/models/{repo}/tree/{rev}[/{path}]
    GET  /api/models/{repo}/refs
    POST /api/models/{repo}/preupload/{rev}                  upload mode per file (lfs for binary / large)
    POST /api/models/{repo}/branch/{branch}                  409 when the branch exists
    POST /api/models/{repo}/commit/{rev}                     NDJSON: header, file, lfsFile, deletedFile, deletedFolder
    POST /{repo}.git/info/lfs/objects/batch                  LFS batch API, basic transfer
    PUT  /_lfs/{repo}/{oid}                                  the LFS bytes (sha256 checked)
    POST /_lfs/{repo}/verify
    HEAD/GET /{repo}/resolve/{rev}/{path}                    X-Repo-Commit, ETag / X-Linked-Etag, X-Error-Code
    GET  /api/datasets/{repo}[/revision/{rev}|/tree/{rev}]   dataset repos (read-only, from `add_repo_files`)
    HEAD/GET /datasets/{repo}/resolve/{rev}/{path}           what `datasets.load_dataset("owner/name")` reads

Repo ids must be `namespace/name`. Writes need `Authorization: Bearer <token>` with a token the server knows;
private repos are invisible (404 RepoNotFound) without one. `fail_next()` injects transient errors. The server
listens on 127.0.0.1 on a random port, runs in a daemon thread and stops on `stop()` or after `max_lifetime_s`.

Usage:
    with LocalHubServer() as hub:          # hub.url, hub.token
        ...
    python tests/hub_server.py --max-lifetime 600      # standalone, prints its URL
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_THRESHOLD = 10 * 1024 * 1024
LFS_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".gguf",
    ".onnx",
    ".h5",
    ".msgpack",
    ".npz",
    ".zip",
)
REPO_ID_RE = re.compile(r"^[\w][\w.\-]{0,95}/[\w][\w.\-]{0,95}$")
ZERO_SHA = "0" * 40


def git_blob_sha(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


@dataclass
class StoredFile:
    content: bytes
    lfs_oid: str | None = None  # sha256 when stored through LFS

    @property
    def git_oid(self) -> str:
        if self.lfs_oid:
            return git_blob_sha(lfs_pointer(self.lfs_oid, len(self.content)))
        return git_blob_sha(self.content)


@dataclass
class Commit:
    oid: str
    files: dict[str, StoredFile]
    parent: str | None
    summary: str
    description: str = ""


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N -> commit oid
    num_prs: int = 0

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.refs:
            return self.commits[self.refs[revision]]
        if revision in self.commits:
            return self.commits[revision]
        matches = [c for oid, c in self.commits.items() if len(revision) >= 7 and oid.startswith(revision)]
        return matches[0] if len(matches) == 1 else None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def validate_card_metadata(content: str) -> list[str]:
    """Errors the Hub would report for a model card's YAML metadata (a useful subset of its checks)."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, flags=re.S)
    if match is None:
        return []  # a card without metadata is accepted
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as error:
        return [f"YAML metadata does not parse: {error}"]
    if data is None:
        return []
    if not isinstance(data, dict):
        return ["YAML metadata must be a mapping"]
    errors = []
    for key in ("license", "library_name", "pipeline_tag"):
        if key in data and not isinstance(data[key], str):
            errors.append(f'"{key}" must be a string')
    base = data.get("base_model")
    if base is not None:
        for item in base if isinstance(base, list) else [base]:
            if not isinstance(item, str) or not re.fullmatch(r"[\w][\w.\-]*(/[\w][\w.\-]*)?", item):
                errors.append(f'"base_model" must be a Hub model id, got {item!r}')
    tags = data.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        errors.append('"tags" must be a list of strings')
    index = data.get("model-index")
    if index is not None:
        if not isinstance(index, list):
            errors.append('"model-index" must be a list')
        else:
            for entry in index:
                if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                    errors.append('"model-index[]" needs a "name"')
                    continue
                for result in entry.get("results") or []:
                    if not isinstance(result.get("task"), dict) or "type" not in result["task"]:
                        errors.append('"model-index[].results[].task.type" is required')
                    dataset = result.get("dataset")
                    if not isinstance(dataset, dict) or not {"name", "type"} <= set(dataset):
                        errors.append('"model-index[].results[].dataset" needs "name" and "type"')
                    metrics = result.get("metrics")
                    if not isinstance(metrics, list) or not metrics:
                        errors.append('"model-index[].results[].metrics" must be a non-empty list')
                        continue
                    for metric in metrics:
                        if not isinstance(metric, dict) or "type" not in metric or "value" not in metric:
                            errors.append('"model-index[].results[].metrics[]" needs "type" and "value"')
    return errors


class LocalHubServer:
    """In-memory Hub for tests. See the module docstring for the endpoints."""

    def __init__(self, token: str = "hf_local_test_token", user: str = "me", max_lifetime_s: float = 600.0):
        self.token, self.user, self.max_lifetime_s = token, user, max_lifetime_s
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, dict[str, bytes]] = {}  # repo -> oid -> bytes
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self._failures: list[list[Any]] = []  # [method, path regex, remaining, status]
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    # ---------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LocalHubServer:
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="local-hub", daemon=True
        )
        self._thread.start()
        # Stops by itself even if a test forgets to: no server outlives its lifetime.
        self._timer = threading.Timer(self.max_lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if self._timer is not None:
            self._timer.cancel()
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> LocalHubServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---------------------------------------------------------------- test helpers

    def fail_next(self, method: str, path_pattern: str, times: int = 1, status: int = 503) -> None:
        """Answer the next `times` requests matching `method` and the regex `path_pattern` with `status`."""
        with self._lock:
            self._failures.append([method.upper(), re.compile(path_pattern), times, status])

    def file(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        commit = self.repos[repo_id].resolve(revision)
        assert commit is not None
        return commit.files[path].content

    def add_repo_files(
        self, repo_id: str, files: dict[str, bytes], private: bool = False, repo_type: str = "model"
    ) -> str:
        """Create (or update) a repo directly, without HTTP; returns the commit oid. Dataset repos are read-only
        over HTTP (served under /api/datasets/ and /datasets/, as the Hub does) and stored as `datasets/{id}`."""
        repo_id = repo_id if repo_type == "model" else f"{repo_type}s/{repo_id}"
        with self._lock:
            repo = self.repos.get(repo_id) or self._create_repo(repo_id, private)
            head = repo.commits[repo.refs["main"]]
            new_files = dict(head.files)
            for path, content in files.items():
                lfs = path.endswith(LFS_SUFFIXES)
                new_files[path] = StoredFile(content, hashlib.sha256(content).hexdigest() if lfs else None)
            return self._add_commit(repo, "main", new_files, "Add files", "")

    # ---------------------------------------------------------------- storage

    def _create_repo(self, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_id, private)
        self.repos[repo_id] = repo
        self.lfs[repo_id] = {}
        gitattributes = (
            b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
        )
        self._add_commit(
            repo, "main", {".gitattributes": StoredFile(gitattributes)}, "initial commit", "", parent=None
        )
        return repo

    def _add_commit(
        self,
        repo: Repo,
        ref: str,
        files: dict[str, StoredFile],
        summary: str,
        description: str,
        parent: Any = ...,
    ) -> str:
        if parent is ...:
            parent = repo.refs.get(ref)
        digest = hashlib.sha1()
        digest.update(f"{parent}\n{summary}\n{time.time_ns()}\n".encode())
        for path in sorted(files):
            digest.update(f"{path}:{files[path].git_oid}\n".encode())
        oid = digest.hexdigest()
        repo.commits[oid] = Commit(oid, files, parent, summary, description)
        repo.refs[ref] = oid
        return oid


class _Handler(BaseHTTPRequestHandler):
    server_hub: LocalHubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    # ---------------------------------------------------------------- plumbing

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            return self.rfile.read(length)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return b""

    def _send(
        self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, method: str = "GET"
    ) -> None:
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method != "HEAD" and body:
            self.wfile.write(body)

    def _json(
        self, status: int, data: Any, method: str = "GET", headers: dict[str, str] | None = None
    ) -> None:
        self._send(status, json.dumps(data).encode(), headers, method)

    def _authorized(self) -> bool | None:
        """True for the server's token, False for a wrong one, None when no token was sent."""
        value = self.headers.get("Authorization")
        if not value:
            return None
        return value == f"Bearer {self.server_hub.token}"

    def _require_write(self) -> None:
        auth = self._authorized()
        if auth is None:
            raise HubError(401, "Unauthorized: a write token is required")
        if auth is False:
            raise HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str, *, write: bool = False) -> Repo:
        hub = self.server_hub
        repo = hub.repos.get(repo_id)
        if write:
            self._require_write()
        if repo is None or (repo.private and self._authorized() is not True):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Revision {revision} not found", "RevisionNotFound")
        return commit

    def _dispatch(self, method: str) -> None:
        hub = self.server_hub
        split = urlsplit(self.path)
        raw_parts = [p for p in split.path.split("/") if p]
        parts = [unquote(p) for p in raw_parts]
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        body = self._body() if method in ("POST", "PUT") else b""
        with hub._lock:
            hub.requests.append((method, split.path))
            for failure in hub._failures:
                if failure[0] == method and failure[2] > 0 and failure[1].search(split.path):
                    failure[2] -= 1
                    self._json(failure[3], {"error": "injected transient failure"}, method)
                    return
        try:
            with hub._lock:
                handled = self._route(method, parts, query, body)
            if not handled:
                hub.unhandled.append((method, split.path))
                raise HubError(404, f"Not handled by the local test hub: {method} {split.path}")
        except HubError as error:
            headers = {"X-Error-Message": error.message}
            if error.code:
                headers["X-Error-Code"] = error.code
            self._json(error.status, {"error": error.message}, method, headers)

    # ---------------------------------------------------------------- routes

    def _route(self, method: str, parts: list[str], query: dict[str, str], body: bytes) -> bool:
        hub = self.server_hub
        if parts[:1] == ["api"]:
            rest = parts[1:]
            if method == "GET" and rest == ["whoami-v2"]:
                if self._authorized() is not True:
                    raise HubError(401, "Invalid credentials in Authorization header")
                self._json(
                    200,
                    {
                        "type": "user",
                        "name": hub.user,
                        "fullname": hub.user,
                        "orgs": [],
                        "auth": {"type": "access_token", "accessToken": {"role": "write"}},
                    },
                )
                return True
            if method == "GET" and rest == ["agent-harnesses"]:  # huggingface_hub's user-agent detection
                self._json(200, {"standardEnvVars": [], "harnesses": {}})
                return True
            if method == "POST" and rest == ["repos", "create"]:
                return self._create_repo(json.loads(body or b"{}"))
            if method == "POST" and rest == ["validate-yaml"]:
                content = json.loads(body or b"{}").get("content", "")
                errors = validate_card_metadata(content)
                if errors:
                    self._send(400, "; ".join(errors).encode(), {"Content-Type": "text/plain"})
                else:
                    self._json(200, {"errors": [], "warnings": []})
                return True
            if len(rest) >= 3 and rest[0] == "models":
                repo_id, tail = f"{rest[1]}/{rest[2]}", rest[3:]
                return self._model_api(method, repo_id, tail, query, body)
            if len(rest) >= 3 and rest[0] == "datasets" and method == "GET":
                repo_id, tail = f"datasets/{rest[1]}/{rest[2]}", rest[3:]
                return self._model_api(method, repo_id, tail, query, body)
            return False
        if (
            method == "POST"
            and len(parts) == 6
            and parts[1].endswith(".git")
            and parts[2:] == ["info", "lfs", "objects", "batch"]
        ):
            return self._lfs_batch(f"{parts[0]}/{parts[1][:-4]}", json.loads(body))
        if parts[:1] == ["_lfs"] and len(parts) == 4:
            repo_id = f"{parts[1]}/{parts[2]}"
            if method == "PUT":
                return self._lfs_put(repo_id, parts[3], body)
            if method == "POST" and parts[3] == "verify":
                payload = json.loads(body)
                if payload["oid"] not in hub.lfs.get(repo_id, {}):
                    raise HubError(404, "LFS object not found")
                self._json(200, {"success": True})
                return True
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(method, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        if method in ("GET", "HEAD") and len(parts) >= 6 and parts[0] == "datasets" and parts[3] == "resolve":
            return self._resolve(method, "/".join(parts[:3]), parts[4], "/".join(parts[5:]))
        return False

    def _create_repo(self, payload: dict[str, Any]) -> bool:
        hub = self.server_hub
        self._require_write()
        if payload.get("type") not in (None, "model"):
            raise HubError(400, "The local test hub only hosts model repos")
        repo_id = f"{payload.get('organization') or hub.user}/{payload['name']}"
        if not REPO_ID_RE.match(repo_id):
            raise HubError(400, f"Invalid repo name {repo_id!r}")
        url = f"http://{self.headers.get('Host')}/{repo_id}"
        if repo_id in hub.repos:
            self._json(
                409,
                {"error": "You already created this model repo", "url": url},
                headers={"X-Error-Message": "You already created this model repo"},
            )
            return True
        hub._create_repo(repo_id, payload.get("visibility") == "private" or bool(payload.get("private")))
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})
        return True

    def _model_api(
        self, method: str, repo_id: str, tail: list[str], query: dict[str, str], body: bytes
    ) -> bool:
        if method == "GET" and (not tail or tail[0] == "revision"):
            repo = self._repo(repo_id)
            commit = self._commit(repo, tail[1] if len(tail) > 1 else "main")
            card_data = None
            if "README.md" in commit.files:
                match = re.match(
                    r"^---\s*\n(.*?)\n---", commit.files["README.md"].content.decode("utf-8", "replace"), re.S
                )
                card_data = yaml.safe_load(match.group(1)) if match else None
            self._json(
                200,
                {
                    "id": repo_id.removeprefix("datasets/"),
                    "modelId": repo_id,
                    "sha": commit.oid,
                    "private": repo.private,
                    "disabled": False,
                    "gated": False,
                    "downloads": 0,
                    "likes": 0,
                    "tags": (card_data or {}).get("tags", []),
                    "cardData": card_data,
                    "lastModified": "2026-01-01T00:00:00.000Z",
                    "siblings": [{"rfilename": path} for path in sorted(commit.files)],
                },
            )
            return True
        if method == "GET" and tail[:1] == ["tree"] and len(tail) >= 2:
            repo = self._repo(repo_id)
            commit = self._commit(repo, tail[1])
            prefix = "/".join(tail[2:])
            recursive = query.get("recursive") in ("1", "true", "True")
            self._json(200, self._tree(commit, prefix, recursive))
            return True
        if method == "GET" and tail == ["refs"]:
            repo = self._repo(repo_id)
            branches = [
                {"name": n, "ref": f"refs/heads/{n}", "targetCommit": o}
                for n, o in repo.refs.items()
                if not n.startswith("refs/")
            ]
            prs = [
                {"name": n, "ref": n, "targetCommit": o}
                for n, o in repo.refs.items()
                if n.startswith("refs/pr/")
            ]
            self._json(200, {"branches": branches, "converts": [], "tags": [], "pullRequests": prs})
            return True
        if method == "POST" and len(tail) == 2 and tail[0] == "preupload":
            repo = self._repo(repo_id, write=True)
            commit = repo.resolve(tail[1])
            files = []
            for item in json.loads(body)["files"]:
                sample = base64.b64decode(item.get("sample", ""))
                binary = (
                    b"\0" in sample or item["path"].endswith(LFS_SUFFIXES) or item["size"] >= LFS_THRESHOLD
                )
                existing = commit.files.get(item["path"]) if commit else None
                files.append(
                    {
                        "path": item["path"],
                        "uploadMode": "lfs" if binary else "regular",
                        "shouldIgnore": False,
                        "oid": existing.git_oid if existing else None,
                    }
                )
            self._json(200, {"files": files, "commitOid": commit.oid if commit else ZERO_SHA})
            return True
        if method == "POST" and len(tail) == 2 and tail[0] == "branch":
            repo = self._repo(repo_id, write=True)
            branch = tail[1]
            if branch in repo.refs:
                raise HubError(409, f"Branch {branch} already exists")
            start = json.loads(body or b"{}").get("startingPoint") or "main"
            repo.refs[branch] = self._commit(repo, start).oid
            self._json(200, {})
            return True
        if method == "POST" and len(tail) == 2 and tail[0] == "commit":
            return self._commit_endpoint(self._repo(repo_id, write=True), tail[1], query, body)
        return False

    def _tree(self, commit: Commit, prefix: str, recursive: bool) -> list[dict[str, Any]]:
        entries, folders = [], set()
        base = f"{prefix}/" if prefix else ""
        for path in sorted(commit.files):
            if not path.startswith(base):
                continue
            rest = path[len(base) :]
            if "/" in rest and not recursive:
                folders.add(base + rest.split("/")[0])
                continue
            stored = commit.files[path]
            entry = {"type": "file", "path": path, "size": len(stored.content), "oid": stored.git_oid}
            if stored.lfs_oid:
                entry["lfs"] = {
                    "oid": stored.lfs_oid,
                    "size": len(stored.content),
                    "pointerSize": len(lfs_pointer(stored.lfs_oid, len(stored.content))),
                }
            entries.append(entry)
        if prefix and not entries and not folders:
            raise HubError(404, f"{prefix} not found", "EntryNotFound")
        return [
            {"type": "directory", "path": f, "oid": ZERO_SHA, "size": 0} for f in sorted(folders)
        ] + entries

    def _commit_endpoint(self, repo: Repo, revision: str, query: dict[str, str], body: bytes) -> bool:
        hub = self.server_hub
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        create_pr = query.get("create_pr") in ("1", "true")
        base = self._commit(repo, revision)
        parent = header.get("parentCommit")
        if parent and not create_pr and not base.oid.startswith(parent):
            raise HubError(412, "A commit has happened since the parent commit. Please pull and retry.")
        files = dict(base.files)
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                content = (
                    base64.b64decode(value["content"])
                    if value.get("encoding") == "base64"
                    else value["content"].encode()
                )
                files[value["path"]] = StoredFile(content)
            elif key == "lfsFile":
                data = hub.lfs[repo.repo_id].get(value["oid"])
                if data is None:
                    raise HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                files[value["path"]] = StoredFile(data, value["oid"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, f"{value['path']} does not exist", "EntryNotFound")
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                for path in [p for p in files if p.startswith(folder)]:
                    del files[path]
            elif key != "header":
                raise HubError(400, f"Unknown commit line key {key!r}")
        host = f"http://{self.headers.get('Host')}"
        if create_pr:
            repo.num_prs += 1
            ref = f"refs/pr/{repo.num_prs}"
            oid = hub._add_commit(
                repo, ref, files, header.get("summary", ""), header.get("description", ""), parent=base.oid
            )
            pr_url = f"{host}/{repo.repo_id}/discussions/{repo.num_prs}"
        else:
            oid = hub._add_commit(
                repo,
                revision,
                files,
                header.get("summary", ""),
                header.get("description", ""),
                parent=base.oid,
            )
            pr_url = None
        self._json(
            200,
            {
                "commitUrl": f"{host}/{repo.repo_id}/commit/{oid}",
                "commitOid": oid,
                "pullRequestUrl": pr_url,
                "success": True,
            },
        )
        return True

    def _lfs_batch(self, repo_id: str, payload: dict[str, Any]) -> bool:
        hub = self.server_hub
        self._repo(repo_id, write=payload.get("operation") == "upload")
        host = f"http://{self.headers.get('Host')}"
        objects = []
        for obj in payload.get("objects", []):
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if payload.get("operation") == "upload" and obj["oid"] not in hub.lfs[repo_id]:
                item["actions"] = {
                    "upload": {"href": f"{host}/_lfs/{repo_id}/{obj['oid']}", "header": {}},
                    "verify": {"href": f"{host}/_lfs/{repo_id}/verify", "header": {}},
                }
            objects.append(item)
        self._json(
            200,
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            headers={"Content-Type": "application/vnd.git-lfs+json"},
        )
        return True

    def _lfs_put(self, repo_id: str, oid: str, body: bytes) -> bool:
        hub = self.server_hub
        if repo_id not in hub.repos:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "LFS upload does not match its sha256 oid")
        hub.lfs[repo_id][oid] = body
        self._send(200)
        return True

    def _resolve(self, method: str, repo_id: str, revision: str, path: str) -> bool:
        repo = self._repo(repo_id)
        commit = self._commit(repo, revision)
        stored = commit.files.get(path)
        if stored is None:
            raise HubError(404, f"Entry {path} not found", "EntryNotFound")
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{stored.lfs_oid or stored.git_oid}"',
            "Accept-Ranges": "bytes",
        }
        if stored.lfs_oid:
            headers["X-Linked-Etag"] = f'"{stored.lfs_oid}"'
            headers["X-Linked-Size"] = str(len(stored.content))
        content = stored.content
        range_header = self.headers.get("Range")
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header or "")
        if match and method == "GET":
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(content) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            self._send(206, content[start : end + 1], headers, method)
            return True
        self._send(200, content, headers, method)
        return True


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the local Hub-compatible test server.")
    parser.add_argument(
        "--max-lifetime", type=float, default=600.0, help="Seconds before it stops by itself."
    )
    args = parser.parse_args()
    hub = LocalHubServer(max_lifetime_s=args.max_lifetime).start()
    print(f"HF_ENDPOINT={hub.url} HF_TOKEN={hub.token} HF_HUB_DISABLE_XET=1", flush=True)
    deadline = time.monotonic() + args.max_lifetime
    try:
        while hub._server is not None and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        hub.stop()
