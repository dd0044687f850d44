"""A local double of the Hugging Face Hub's resolve URLs, for the real huggingface_hub client.

It answers HEAD and GET on /{owner}/{repo}/resolve/{revision}/{path} the way
the Hub does for plain (non-Xet) files: X-Repo-Commit, ETag and
Content-Length headers, byte ranges for resumed downloads, 401 with
X-Error-Code: GatedRepo for a gated repository without the right token, and
404 with X-Error-Code: EntryNotFound for a missing file. It records every
request so tests can check what the client sent.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


@dataclass
class Seen:
    method: str
    path: str
    authorization: str | None
    range: str | None


@dataclass
class FakeHub:
    files: dict[tuple[str, str], Path] = field(default_factory=dict)
    gated: dict[str, str] = field(default_factory=dict)  # repo -> the token that opens it
    cut_first_get: set[str] = field(default_factory=set)  # paths whose first GET breaks off halfway
    requests: list[Seen] = field(default_factory=list)
    _etags: dict[Path, str] = field(default_factory=dict)

    def add(self, repo: str, path: str, source: Path) -> None:
        self.files[(repo, path)] = source

    def etag(self, source: Path) -> str:
        if source not in self._etags:
            digest = hashlib.sha256()
            with open(source, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            self._etags[source] = digest.hexdigest()
        return self._etags[source]

    def gets(self, path: str) -> list[Seen]:
        return [r for r in self.requests if r.method == "GET" and r.path.endswith("/" + path)]

    def serve(self) -> RunningHub:
        return RunningHub(self)


class RunningHub:
    def __init__(self, hub: FakeHub) -> None:
        self.hub = hub
        handler = _make_handler(hub)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> RunningHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            return

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _error(self, status: int, code: str) -> None:
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _answer(self, body: bool) -> None:
            hub.requests.append(Seen(self.command, self.path, self.headers.get("authorization"),
                                     self.headers.get("range")))
            m = _RESOLVE.match(self.path.split("?", 1)[0])
            if not m:
                self._error(404, "RepoNotFound")
                return
            repo, path = m.group("repo"), m.group("path")
            if repo in hub.gated and self.headers.get("authorization") != f"Bearer {hub.gated[repo]}":
                self._error(401, "GatedRepo")
                return
            source = hub.files.get((repo, path))
            if source is None:
                self._error(404, "EntryNotFound")
                return
            size = source.stat().st_size
            start = 0
            rng = self.headers.get("range")
            if rng:
                start = int(re.match(r"bytes=(\d+)-", rng).group(1))  # type: ignore[union-attr]
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hub.etag(source)}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(size - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.end_headers()
            if not body:
                return
            cut = path in hub.cut_first_get and len(hub.gets(path)) == 1
            limit = (size - start) // 2 if cut else size - start
            with open(source, "rb") as fh:
                fh.seek(start)
                sent = 0
                while sent < limit:
                    chunk = fh.read(min(1 << 16, limit - sent))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    sent += len(chunk)
            if cut:
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)

    return Handler
