"""A local stand-in for the Hugging Face Hub on 127.0.0.1, for huggingface_hub's real client (`HF_ENDPOINT`).

The public Hub is not reachable from the test machines, so the tests start this server and point the
client at it. It serves what `hf_hub_download`, `HfApi.create_repo`, `create_branch`, `create_commit`
(`upload_file`) and `list_repo_files` ask for, laid out as the Hub serves it:

- `HEAD|GET /{repo}/resolve/{revision}/{path}`: revision a branch or a 40-hex commit; headers
  `X-Repo-Commit`, `ETag` (git blob sha1 for small files, sha256 for `.safetensors`, as the Hub gives LFS
  files), `X-Linked-Etag` and `X-Linked-Size` for those LFS-like files, `Content-Length`; 404s carry
  `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`) as the Hub's do, and the
  commit header when the revision exists (the client caches the file's absence by it).
- `POST /api/validate-yaml` (the README front matter `create_commit` checks first),
  `POST /api/repos/create` (409 when it exists), `POST /api/models/{repo}/branch/{branch}`,
  `POST /api/models/{repo}/preupload/{revision}` (every file "regular": sent inline in the commit),
  `POST /api/models/{repo}/commit/{revision}` (the NDJSON commit payload),
  `GET /api/models/{repo}/tree/{revision}[/{path}]`, `GET /api/models/{repo}/revision/{revision}`.

Private repos answer 404 `RepoNotFound` (as the Hub does) to requests without the owner's token.
Every request is recorded (`hub.requests`: method, path, Authorization header) so tests can check what
the client sent.
"""
import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote, urlsplit


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    def __init__(self, private: bool = False) -> None:
        self.private = private
        self.commits: Dict[str, Dict[str, bytes]] = {}
        self.refs: Dict[str, str] = {}
        self.commit({}, "main", "initial commit")

    def commit(self, files: Dict[str, bytes], branch: str, summary: str,
               deleted: Tuple[str, ...] = ()) -> str:
        parent = self.commits.get(self.refs.get(branch, ""), {})
        tree = {**parent, **files}
        for d in deleted:
            tree.pop(d, None)
        sha = hashlib.sha1(f"{summary}|{time.time_ns()}|{len(self.commits)}".encode()).hexdigest()
        self.commits[sha] = tree
        self.refs[branch] = sha
        return sha

    def resolve(self, revision: str) -> Optional[str]:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


class FakeHub:
    """Start with `FakeHub(token="hf_...")`; `hub.url` is the endpoint; `hub.close()` stops it."""

    def __init__(self, token: Optional[str] = None) -> None:
        self.token = token
        self.repos: Dict[str, Repo] = {}
        self.requests: List[Tuple[str, str, Optional[str]]] = []
        self.validated: List[dict] = []  # README front matters checked by /api/validate-yaml
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---------------------------------------------------------------- set up by tests
    def add_repo(self, repo_id: str, files: Dict[str, bytes], private: bool = False,
                 branch: str = "main") -> str:
        """Create (or extend) a repo; returns the new commit's sha."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(private))
            if branch not in repo.refs:
                repo.refs[branch] = repo.refs["main"]
            return repo.commit(files, branch, "add files")

    # ---------------------------------------------------------------- HTTP
    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: bytes = b"", headers: Optional[Dict[str, str]] = None,
                      head: bool = False, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, status: int, obj, headers=None):
                self._send(status, json.dumps(obj).encode(), headers)

            def _error(self, status: int, code: str, message: str, headers=None, head=False):
                self._send(status, json.dumps({"error": message}).encode(),
                           {"X-Error-Code": code, "X-Error-Message": message, **(headers or {})}, head=head)

            def _authorised(self, repo: Repo) -> bool:
                return not repo.private or self.headers.get("Authorization") == f"Bearer {hub.token}"

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _record(self):
                hub.requests.append((self.command, self.path, self.headers.get("Authorization")))

            # ---------------------------------------------------- downloads
            def _resolve(self, head: bool):
                path = urlsplit(self.path).path
                parts = path.lstrip("/").split("/")
                # /{org}/{name}/resolve/{revision}/{file...}; the revision is URL-quoted (refs%2Fpr%2F1)
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._error(404, "EntryNotFound", "not a resolve URL", head=head)
                repo_id, revision, filename = f"{parts[0]}/{parts[1]}", unquote(parts[3]), unquote("/".join(parts[4:]))
                with hub.lock:
                    repo = hub.repos.get(repo_id)
                    if repo is None or not self._authorised(repo):
                        return self._error(404, "RepoNotFound", f"Repository not found: {repo_id}", head=head)
                    sha = repo.resolve(revision)
                    if sha is None:
                        return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
                    data = repo.commits[sha].get(filename)
                if data is None:
                    return self._error(404, "EntryNotFound", f"{filename} does not exist at {revision}",
                                       {"X-Repo-Commit": sha}, head=head)
                headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
                if filename.endswith(".safetensors"):  # stored as the Hub stores LFS files
                    digest = hashlib.sha256(data).hexdigest()
                    headers.update({"ETag": f'"{digest}"', "X-Linked-Etag": f'"{digest}"',
                                    "X-Linked-Size": str(len(data))})
                else:
                    headers["ETag"] = f'"{_git_sha1(data)}"'
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes=") and not head:
                    start = int(rng[6:].split("-")[0] or 0)
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                    return self._send(206, data[start:], headers, ctype="application/octet-stream")
                self._send(200, data, headers, head=head, ctype="application/octet-stream")

            def do_HEAD(self):
                self._record()
                self._resolve(head=True)

            def do_GET(self):
                self._record()
                path = urlsplit(self.path).path
                if not path.startswith("/api/"):
                    return self._resolve(head=False)
                parts = path.split("/")  # ['', 'api', 'models', org, name, 'tree'|'revision', rev, ...]
                if len(parts) >= 7 and parts[2] == "models":
                    repo_id, what, revision = f"{parts[3]}/{parts[4]}", parts[5], unquote(parts[6])
                    with hub.lock:
                        repo = hub.repos.get(repo_id)
                        if repo is None or not self._authorised(repo):
                            return self._error(404, "RepoNotFound", f"Repository not found: {repo_id}")
                        sha = repo.resolve(revision)
                        if sha is None:
                            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                        tree = repo.commits[sha]
                    if what == "tree":
                        prefix = unquote("/".join(parts[7:]))
                        items = [{"type": "file", "path": p, "size": len(d), "oid": _git_sha1(d)}
                                 for p, d in sorted(tree.items()) if p.startswith(prefix)]
                        return self._json(200, items)
                    if what == "revision":
                        return self._json(200, {"id": repo_id, "sha": sha, "private": repo.private,
                                                "siblings": [{"rfilename": p} for p in sorted(tree)]})
                self._error(404, "EntryNotFound", f"no route {path}")

            # ---------------------------------------------------- uploads
            def do_POST(self):
                self._record()
                path = urlsplit(self.path).path
                body = self._body()
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
                if path == "/api/validate-yaml":  # the README's front matter, checked before a commit
                    content = json.loads(body)["content"]
                    try:
                        import yaml

                        meta = yaml.safe_load(content.split("---", 2)[1]) if content.startswith("---") else {}
                        if not isinstance(meta, dict):
                            raise ValueError("front matter is not a mapping")
                    except Exception as e:  # noqa: BLE001
                        return self._json(400, {"errors": [{"message": f"invalid YAML: {e}"}]},
                                          {"X-Error-Code": "BadRequest"})
                    hub.validated.append(meta)
                    return self._json(200, {"warnings": []})
                if path == "/api/repos/create":
                    req = json.loads(body)
                    repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    with hub.lock:
                        if repo_id in hub.repos:
                            return self._json(409, {"error": "You already created this model repo",
                                                    "url": f"{hub.url}/{repo_id}"})
                        private = req.get("visibility") == "private" or bool(req.get("private"))
                        hub.repos[repo_id] = Repo(private=private)
                    return self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
                parts = path.split("/")  # ['', 'api', 'models', org, name, op, revision...]
                if len(parts) < 7 or parts[2] != "models":
                    return self._error(404, "EntryNotFound", f"no route {path}")
                repo_id, op, revision = f"{parts[3]}/{parts[4]}", parts[5], unquote("/".join(parts[6:]))
                with hub.lock:
                    repo = hub.repos.get(repo_id)
                    if repo is None:
                        return self._error(404, "RepoNotFound", f"Repository not found: {repo_id}")
                    if op == "branch":
                        if revision in repo.refs:
                            return self._json(409, {"error": f"Reference already exists: {revision}"})
                        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
                        repo.refs[revision] = repo.resolve(start)
                        return self._json(200, {})
                    if op == "preupload":
                        files = json.loads(body)["files"]
                        return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                           "shouldIgnore": False} for f in files]})
                    if op == "commit":
                        if repo.resolve(revision) is None:
                            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                        files, deleted, summary = {}, [], "commit"
                        for line in body.decode().splitlines():
                            item = json.loads(line)
                            if item["key"] == "header":
                                summary = item["value"].get("summary", summary)
                            elif item["key"] == "file":
                                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                            elif item["key"] == "deletedFile":
                                deleted.append(item["value"]["path"])
                            else:
                                return self._error(400, "BadRequest", f"unsupported commit entry {item['key']}")
                        sha = repo.commit(files, revision, summary, tuple(deleted))
                        return self._json(200, {"success": True, "commitOid": sha,
                                                "commitUrl": f"{hub.url}/{repo_id}/commit/{sha}"})
                self._error(404, "EntryNotFound", f"no route {path}")

        return Handler
