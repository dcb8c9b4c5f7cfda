"""A small stand-in for the Hugging Face Hub on 127.0.0.1, for push / pull tests without a network.

It answers what huggingface_hub 2.x calls for `create_repo`, `create_branch`, `upload_folder` (validate-yaml,
preupload with every file "regular", and the ndjson commit with base64 contents) and `hf_hub_download`
(HEAD/GET `/{repo}/resolve/{revision}/{file}` with ETag, X-Repo-Commit and Content-Length). Every request is
recorded (method, path, authorization header) so tests can check what arrived. Only `token` is accepted.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_REV = r"(?P<rev>[^/]+)"
ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/branch/{_REV}$"), "create_branch"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/{_REV}$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/{_REV}$"), "commit"),
    ("GET", re.compile(rf"^/api/models/{_REPO}$"), "repo_info"),
    ("GET", re.compile(rf"^/{_REPO}/resolve/{_REV}/(?P<file>.+)$"), "resolve"),
    ("HEAD", re.compile(rf"^/{_REPO}/resolve/{_REV}/(?P<file>.+)$"), "resolve"),
]


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    trees: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha -> {path: content}
    commits: list[dict] = field(default_factory=list)  # what each commit request carried


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None
    body: bytes


class HubServer:
    """`with HubServer(token="hf_test") as hub:` then point HF_ENDPOINT at `hub.url`."""

    # huggingface_hub fetches this registry (without a token) to describe its caller in the user agent
    PUBLIC_PATHS = {"/api/agent-harnesses": {"standardEnvVars": [], "harnesses": {}}}

    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._counter = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    # ------------------------------------------------------------------------------------------ state
    def _new_commit(self, repo: Repo, tree: dict[str, bytes]) -> str:
        self._counter += 1
        sha = hashlib.sha1(f"commit-{self._counter}-{sorted(tree)}".encode()).hexdigest()
        repo.trees[sha] = tree
        return sha

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.trees[repo.branches[revision]]

    # ------------------------------------------------------------------------------------------ handlers
    def create_repo(self, body: dict, **_) -> tuple[int, dict]:
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        repo = Repo(private=body.get("visibility") == "private" or bool(body.get("private")))
        repo.branches["main"] = self._new_commit(repo, {".gitattributes": b"*.safetensors filter=lfs\n"})
        self.repos[repo_id] = repo
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def validate_yaml(self, body: dict, **_) -> tuple[int, dict]:
        return 200, {"errors": [], "warnings": []}

    def create_branch(self, body: dict, repo: str, rev: str) -> tuple[int, dict]:
        hub_repo = self.repos.get(repo)
        if hub_repo is None:
            return 404, {"error": "Repository not found"}
        if rev in hub_repo.branches:
            return 409, {"error": "Reference already exists"}
        start = body.get("startingPoint") or "main"
        hub_repo.branches[rev] = hub_repo.branches[start]
        return 200, {}

    def preupload(self, body: dict, repo: str, rev: str) -> tuple[int, dict]:
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in body["files"]]
        return 200, {"files": files}

    def commit(self, lines: list[dict], repo: str, rev: str) -> tuple[int, dict]:
        hub_repo = self.repos.get(repo)
        if hub_repo is None or rev not in hub_repo.branches:
            return 404, {"error": f"Invalid rev id: {rev}"}
        tree = dict(hub_repo.trees[hub_repo.branches[rev]])
        for line in lines:
            if line["key"] == "file":
                value = line["value"]
                assert value["encoding"] == "base64", value
                tree[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] in ("deletedFile", "deletedFolder"):
                tree.pop(line["value"]["path"], None)
            elif line["key"] != "header":
                return 400, {"error": f"this test server only takes regular files, got {line['key']}"}
        sha = self._new_commit(hub_repo, tree)
        hub_repo.branches[rev] = sha
        hub_repo.commits.append({"revision": rev, "header": lines[0]["value"], "paths": sorted(
            line["value"]["path"] for line in lines if line["key"] == "file")})
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}

    def repo_info(self, repo: str, **_) -> tuple[int, dict]:
        hub_repo = self.repos.get(repo)
        if hub_repo is None:
            return 404, {"error": "Repository not found"}
        return 200, {"id": repo, "sha": hub_repo.branches["main"], "private": hub_repo.private}

    def resolve(self, repo: str, rev: str, file: str) -> tuple[int, dict | bytes, dict]:
        hub_repo = self.repos.get(repo)
        if hub_repo is None:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        sha = hub_repo.branches.get(rev) or (rev if rev in hub_repo.trees else None)
        if sha is None:
            return 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"}
        tree = hub_repo.trees[sha]
        if file not in tree:
            return 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}
        content = tree[file]
        etag = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
        return 200, content, {"ETag": f'"{etag}"', "X-Repo-Commit": sha}


def _handler_for(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            path = urlsplit(self.path).path
            auth = self.headers.get("authorization")
            with hub._lock:
                hub.requests.append(Request(method, path, auth, body))
                if path in hub.PUBLIC_PATHS:
                    self._reply(method, 200, hub.PUBLIC_PATHS[path], {})
                    return
                if auth != f"Bearer {hub.token}":
                    self._reply(method, 401, {"error": "Invalid credentials in Authorization header"},
                                {"X-Error-Message": "Invalid credentials in Authorization header"})
                    return
                for route_method, pattern, name in ROUTES:
                    match = pattern.match(path) if route_method == method else None
                    if match:
                        params = {k: unquote(v) for k, v in match.groupdict().items()}
                        self._reply(method, *self._call(name, body, params))
                        return
                self._reply(method, 404, {"error": f"no route for {method} {path}"}, {})

        def _call(self, name: str, body: bytes, params: dict):
            if name == "commit":
                payload = [json.loads(line) for line in body.splitlines() if line.strip()]
            else:
                payload = json.loads(body) if body else {}
            result = getattr(hub, name)(payload, **params) if name != "resolve" else hub.resolve(**params)
            return result if len(result) == 3 else (*result, {})

        def _reply(self, method: str, status: int, content, headers: dict) -> None:
            data = content if isinstance(content, bytes) else json.dumps(content).encode()
            self.send_response(status)
            if not isinstance(content, bytes):
                self.send_header("Content-Type", "application/json")
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(data)

        def do_GET(self) -> None:
            self._serve("GET")

        def do_HEAD(self) -> None:
            self._serve("HEAD")

        def do_POST(self) -> None:
            self._serve("POST")

    return Handler
