"""A stand-in Hugging Face Hub on 127.0.0.1: just the endpoints `HfFileSystem` reads through.

Test infrastructure only. Enters: model repositories as `{repo_id: {revision: local folder}}`.
Leaves: a loopback HTTP server whose URL is what users of a Hub mirror put in `HF_ENDPOINT`,
and a record of every request it answered (method, path, status, Authorization header), so
that tests can count downloads and check what credentials reached the server.

Endpoints, as huggingface_hub calls them (`hf_api.py`, `hf_file_system.py`):
- GET  /api/models/{repo}[/revision/{rev}]          repository and revision exist (`repo_info`)
- GET  /api/models/{repo}/tree/{rev}[/{path}]        a folder's entries (`list_repo_tree`)
- POST /api/models/{repo}/paths-info/{rev}           entries of given paths (`get_paths_info`)
- GET/HEAD /{repo}/resolve/{rev}/{path}              a file's bytes, with `Range` support
A missing repository, revision or path is a 404 with the Hub's `X-Error-Code` header
(RepoNotFound, RevisionNotFound, EntryNotFound), which huggingface_hub turns into its errors.
Anything else is a 404 recorded with status 404, so a test can assert there was none.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    status: int
    authorization: str | None


def _oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class StandInHub:
    """`StandInHub({"org/tiny": {"main": folder, "v1": folder}})`; `url` once started."""

    def __init__(self, repos: dict[str, dict[str, Path]]) -> None:
        self.repos = {
            repo: {rev: self._files(Path(folder)) for rev, folder in revisions.items()}
            for repo, revisions in repos.items()
        }
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @staticmethod
    def _files(folder: Path) -> dict[str, bytes]:
        return {
            p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> StandInHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def downloads(self) -> list[str]:
        """The paths of the file reads answered (one per GET of /resolve/, ranges included)."""
        return [r.path for r in self.requests if r.method == "GET" and "/resolve/" in r.path]

    # --- what a repository holds ---------------------------------------------------------

    def _entries(self, files: dict[str, bytes], folder: str, recursive: bool) -> list[dict]:
        prefix = f"{folder}/" if folder else ""
        entries: dict[str, dict[str, Any]] = {}
        for path, data in files.items():
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                sub = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries[sub] = {"type": "directory", "path": sub, "oid": _oid(sub.encode())}
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "path": path, "size": len(data), "oid": _oid(data)}
        return [entries[k] for k in sorted(entries)]

    def _entry(self, files: dict[str, bytes], path: str) -> dict[str, Any] | None:
        if path in files:
            data = files[path]
            return {"type": "file", "path": path, "size": len(data), "oid": _oid(data)}
        if any(p.startswith(path + "/") for p in files):
            return {"type": "directory", "path": path, "oid": _oid(path.encode())}
        return None

    # --- HTTP ----------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _send(
                self,
                status: int,
                body: bytes = b"",
                headers: dict[str, str] | None = None,
                content_type: str = "application/json",
            ) -> None:
                with hub._lock:
                    hub.requests.append(
                        Request(self.command, self.path, status, self.headers.get("Authorization"))
                    )
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, status: int, value: Any, error_code: str | None = None) -> None:
                headers = {"X-Error-Code": error_code} if error_code else {}
                if error_code:
                    headers["X-Error-Message"] = error_code
                self._send(status, json.dumps(value).encode(), headers)

            def _files(self, repo: str, rev: str) -> dict[str, bytes] | None:
                if repo not in hub.repos:
                    self._json(404, {"error": "Repository not found"}, "RepoNotFound")
                    return None
                if rev not in hub.repos[repo]:
                    self._json(404, {"error": f"Invalid rev id: {rev}"}, "RevisionNotFound")
                    return None
                return hub.repos[repo][rev]

            def _route(self) -> None:
                url = urlsplit(self.path)
                raw = url.path
                if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", raw):
                    repo, rev = match[1], unquote(match[2] or "main")
                    if self._files(repo, rev) is not None:
                        sha = hashlib.sha1(f"{repo}@{rev}".encode()).hexdigest()
                        self._json(200, {"id": repo, "modelId": repo, "sha": sha})
                elif match := re.fullmatch(
                    r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/([^/]+))?", raw
                ):
                    repo, rev, folder = match[1], unquote(match[2]), unquote(match[3] or "")
                    files = self._files(repo, rev)
                    if files is None:
                        return
                    entry = hub._entry(files, folder) if folder else None
                    if folder and (entry is None or entry["type"] != "directory"):
                        self._json(404, {"error": "Entry not found"}, "EntryNotFound")
                        return
                    recursive = parse_qs(url.query).get("recursive", [""])[0].lower() == "true"
                    self._json(200, hub._entries(files, folder, recursive))
                elif match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/paths-info/([^/]+)", raw):
                    repo, rev = match[1], unquote(match[2])
                    length = int(self.headers.get("Content-Length") or 0)
                    form = parse_qs(self.rfile.read(length).decode())
                    files = self._files(repo, rev)
                    if files is not None:
                        entries = [hub._entry(files, p) for p in form.get("paths", [])]
                        self._json(200, [e for e in entries if e is not None])
                elif match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", raw):
                    repo, rev, path = match[1], unquote(match[2]), unquote(match[3])
                    files = self._files(repo, rev)
                    if files is None:
                        return
                    if path not in files:
                        self._json(404, {"error": "Entry not found"}, "EntryNotFound")
                        return
                    self._file(files[path], repo, rev)
                else:
                    self._json(404, {"error": "not served by the stand-in Hub"})

            def _file(self, data: bytes, repo: str, rev: str) -> None:
                headers = {
                    "ETag": f'"{_oid(data)}"',
                    "X-Repo-Commit": hashlib.sha1(f"{repo}@{rev}".encode()).hexdigest(),
                    "Accept-Ranges": "bytes",
                }
                ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if ranged is None:
                    self._send(200, data, headers, "application/octet-stream")
                    return
                start = int(ranged[1])
                end = min(int(ranged[2]) if ranged[2] else len(data) - 1, len(data) - 1)
                if start >= len(data):
                    headers["Content-Range"] = f"bytes */{len(data)}"
                    self._send(416, b"", headers, "application/octet-stream")
                    return
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                self._send(206, data[start : end + 1], headers, "application/octet-stream")

            def do_GET(self) -> None:
                self._route()

            def do_HEAD(self) -> None:
                self._route()

            def do_POST(self) -> None:
                self._route()

        return Handler
