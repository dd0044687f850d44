"""Connection hygiene through app.server.serve: idle and slowloris sockets, huge heads, the connection cap.

The server runs as main() runs it (serve, AppServer, the guarded protocol) in a thread around the fake
engine; uvicorn installs no signal handlers off the main thread, so the lifecycle's stop flag ends it.
"""

from __future__ import annotations

import json
import resource
import socket
import threading
import time
from typing import Any

import httpx
import psutil
import pytest

from app.api.app import create_app
from app.api.context import ServingContext
from app.connections import FD_RESERVE, HEAD_TIMEOUT_S, MAX_HEAD_BYTES, ConnectionLimits, connection_cap, raise_fd_limit
from app.server import KEEP_ALIVE_S, bind_socket, serve
from tests.conftest import API_KEY
from tests.fake_engine import FakeEngine

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
MARGIN_S = 3.0  # scheduling slack on a loaded 2-core machine: the server and this test share one GIL
IDLE = 300
TRICKLING = 100
LATE_HEAD_S = 2.0  # within the keep-alive timeout, past the fresh connections' clock start


class ServedApp:
    """`app.server.serve` in a thread on a free port, around a fake engine; stopped by the lifecycle's flag."""

    def __init__(self, limits: ConnectionLimits | None = None) -> None:
        engine = FakeEngine()
        self.context = ServingContext.serving(engine, API_KEY)
        sock = bind_socket("127.0.0.1", 0)
        self.port = int(sock.getsockname()[1])
        self.thread = threading.Thread(target=serve, args=(create_app(self.context), self.context.lifecycle,
                                                        self.context.stats, sock, 1.0),
                                       kwargs={"limits": limits}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5)

    def __enter__(self) -> ServedApp:
        self.thread.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("the server did not start")

    def __exit__(self, *exc: Any) -> None:
        self.context.lifecycle.request_stop("test over")
        self.thread.join(15)
        assert not self.thread.is_alive()


def ensure_fd_limit(needed: int) -> None:
    """Both ends of every socket live in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} file descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def read_until_closed(sock: socket.socket, received: bytearray) -> bool:
    """Collect what has arrived without blocking; True once the server has closed its side."""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
            received += data
    except BlockingIOError:
        return False
    except OSError:  # a reset is a close too
        return True


def test_idle_and_trickling_sockets_are_closed_at_the_deadline_and_lock_no_one_out() -> None:
    ensure_fd_limit(2 * (IDLE + TRICKLING) + 256)
    with ServedApp() as served:
        opened = time.monotonic()
        idle = [served.connect() for _ in range(IDLE)]
        trickling = [served.connect() for _ in range(TRICKLING)]
        kept = served.connect()  # one request, then idle: uvicorn's keep-alive timeout
        late = served.connect()  # one request, then a second head trickled from LATE_HEAD_S on
        socks = idle + trickling + [kept, late]
        try:
            for s in trickling:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nX-Slow: ")
            for s in (kept, late):
                s.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
                assert s.recv(65536).startswith(b"HTTP/1.1 200")
            kept_idle_since = time.monotonic()
            late_began = 0.0

            # 401 sockets held open against the server; a normal client still gets through.
            reply = httpx.post(served.url + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=10)
            assert reply.status_code == 200, reply.text

            for s in socks:
                s.setblocking(False)
            received = {s: bytearray() for s in socks}
            closed_at: dict[socket.socket, float] = {}
            give_up = opened + LATE_HEAD_S + HEAD_TIMEOUT_S + MARGIN_S
            while len(closed_at) < len(socks) and time.monotonic() < give_up:
                if not late_began and time.monotonic() >= opened + LATE_HEAD_S:
                    late.send(b"GET /health HTTP/1.1\r\nHost: test\r\nX-Slow: ")
                    late_began = time.monotonic()
                for s in trickling + ([late] if late_began else []):
                    if s not in closed_at:
                        try:
                            s.send(b"a")  # one byte every 0.2 s: slowloris
                        except OSError:
                            pass
                for s in socks:
                    if s not in closed_at and read_until_closed(s, received[s]):
                        closed_at[s] = time.monotonic()
                time.sleep(0.2)

            assert len(closed_at) == len(socks), f"{len(socks) - len(closed_at)} socket(s) still open"
            heads = [closed_at[s] - opened for s in idle + trickling]
            # Not earlier than the deadline (it is the deadline closing them), and not much later.
            assert HEAD_TIMEOUT_S - 0.5 <= min(heads) and max(heads) <= HEAD_TIMEOUT_S + MARGIN_S, (min(heads),
                                                                                                 max(heads))
            assert all(received[s] == b"" for s in idle)  # never sent a byte: closed without an answer
            assert all(received[s].startswith(b"HTTP/1.1 408") for s in trickling)
            kept_closed = closed_at[kept] - kept_idle_since
            assert KEEP_ALIVE_S - 0.5 <= kept_closed <= KEEP_ALIVE_S + MARGIN_S, kept_closed
            # A later request's head gets its own full deadline from its first byte, and trickling no more.
            late_closed = closed_at[late] - late_began
            assert HEAD_TIMEOUT_S - 0.5 <= late_closed <= HEAD_TIMEOUT_S + MARGIN_S, late_closed
            assert b"HTTP/1.1 408" in received[late]

            reply = httpx.get(served.url + "/v1/models", headers=AUTH, timeout=5)
            assert reply.status_code == 200
        finally:
            for s in socks:
                s.close()


def test_a_huge_request_head_is_refused_at_once_without_memory_growth() -> None:
    with ServedApp() as served:
        # Ordinary requests with many or long headers still pass.
        many = {f"x-extra-{i}": "v" for i in range(80)}
        assert httpx.get(served.url + "/v1/models", headers={**AUTH, **many}, timeout=5).status_code == 200
        long = {"x-long": "a" * (MAX_HEAD_BYTES // 2)}
        assert httpx.get(served.url + "/v1/models", headers={**AUTH, **long}, timeout=5).status_code == 200

        process = psutil.Process()
        rss_before = process.memory_info().rss
        peak = rss_before
        sock = served.connect()
        try:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer " + API_KEY.encode()
                         + b"\r\nX-Big: ")
            sock.setblocking(False)
            chunk = b"a" * 65536
            sent, received = 0, bytearray()
            started = time.monotonic()
            # Up to 64 MiB, which stock uvicorn buffers whole (it grew by 105 MB for 100 MiB).
            while sent < 64 * 2**20 and not received and time.monotonic() - started < 10:
                try:
                    sent += sock.send(chunk)
                except BlockingIOError:
                    time.sleep(0.01)
                except OSError:
                    break
                read_until_closed(sock, received)
                if sent % 2**20 < len(chunk):
                    peak = max(peak, process.memory_info().rss)
            elapsed = time.monotonic() - started
        finally:
            sock.close()
        peak = max(peak, process.memory_info().rss)
        assert received.startswith(b"HTTP/1.1 431"), received[:100]
        assert b'"code":"request_header_fields_too_large"' in received.replace(b" ", b"")
        assert elapsed < 2, elapsed
        assert peak - rss_before < 5 * 2**20, (peak - rss_before) / 2**20

        sock = served.connect()
        try:
            fields = b"".join(b"X-%d: v\r\n" % i for i in range(1000))
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: test\r\n" + fields + b"\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 431")
        finally:
            sock.close()


def test_connections_beyond_the_cap_get_a_cheap_503_and_are_closed() -> None:
    cap = 8
    with ServedApp(ConnectionLimits(max_connections=cap)) as served:
        time.sleep(0.2)  # the readiness probe's connection is gone
        held = [served.connect() for _ in range(cap)]
        try:
            time.sleep(0.3)
            for s in held:  # all within the cap: none refused
                s.setblocking(False)
                assert not read_until_closed(s, bytearray())

            sock = served.connect()  # refused before it sends anything, then closed
            try:
                started = time.monotonic()
                sock.settimeout(2)
                answer = bytearray()
                while data := sock.recv(65536):
                    answer += data
                assert time.monotonic() - started < 1
            finally:
                sock.close()
            assert answer.startswith(b"HTTP/1.1 503"), answer[:100]

            for _ in range(3):
                reply = httpx.get(served.url + "/v1/models", headers=AUTH, timeout=5)
                assert reply.status_code == 503
                assert reply.json()["error"]["code"] == "too_many_connections"
                assert reply.headers["retry-after"] == "1"

            held.pop().close()
            deadline = time.monotonic() + 3
            while (status := httpx.get(served.url + "/v1/models", headers=AUTH, timeout=5).status_code) == 503:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert status == 200
        finally:
            for s in held:
                s.close()


def test_the_descriptor_limit_is_raised_and_the_cap_kept_below_it() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard > 1024:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        assert raise_fd_limit() == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard or hard == resource.RLIM_INFINITY
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]), hard))
    assert connection_cap(1024) == 1024 - FD_RESERVE == 896
    assert connection_cap(100) == 1
    assert connection_cap(10**6) == 4096


def test_a_taken_port_falls_back_to_a_free_one_only_when_asked() -> None:
    import pytest

    from app.server import bind_socket

    taken = bind_socket("127.0.0.1", 0)
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            bind_socket("127.0.0.1", port)
        fallback = bind_socket("127.0.0.1", port, any_free_port=True)
        assert fallback.getsockname()[1] not in (0, port)
        fallback.close()
    finally:
        taken.close()


def trickle_body(served: ServedApp, sock: socket.socket, headers: str, length: int, give_up_s: float
                 ) -> tuple[bytes, float]:
    """Send a POST head declaring `length` body bytes, then one body byte every 0.2 s: (what came back, the
    seconds until the server closed its side)."""
    sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {length}\r\n{headers}\r\n").encode())
    began = time.monotonic()
    sock.setblocking(False)
    received = bytearray()
    while time.monotonic() - began < give_up_s:
        try:
            sock.send(b" ")
        except OSError:
            pass
        if read_until_closed(sock, received):
            return bytes(received), time.monotonic() - began
        time.sleep(0.2)
    return bytes(received), float("inf")


def test_a_trickled_body_is_cut_at_its_deadline_and_a_keyless_one_after_its_401() -> None:
    from app.connections import REFUSE_LINGER_S

    # 1 s plus 2,000 bytes at 1,000 bytes/s: a body declared bigger than that has 3 s.
    limits = ConnectionLimits(body_base_s=1.0, body_min_rate=1000, max_body_bytes=2000)
    assert limits.body_timeout_s(100_000) == limits.body_timeout_s(None) == 3.0
    with ServedApp(limits) as served:
        keyless, keyed = served.connect(), served.connect()
        try:
            # No key: the 401 goes out before any body byte is read, and the connection does not wait for the rest.
            received, took = trickle_body(served, keyless, "", 100_000, 30)
            assert received.startswith(b"HTTP/1.1 401"), received[:80]
            assert took <= REFUSE_LINGER_S + MARGIN_S, took
            # With the key, the app waits for the body: 408 at the deadline, never forever.
            received, took = trickle_body(served, keyed, f"Authorization: Bearer {API_KEY}\r\n", 100_000, 30)
            assert received.startswith(b"HTTP/1.1 408") and b"request_timeout" in received, received[:200]
            assert 3.0 - 0.5 <= took <= 3.0 + REFUSE_LINGER_S + MARGIN_S, took
        finally:
            keyless.close()
            keyed.close()
        # A body slower than a single write but within its deadline is served; so is everything after.
        with served.connect() as slow:
            body = json.dumps(CHAT).encode()
            slow.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\nAuthorization: Bearer {API_KEY}\r\n\r\n").encode())
            slow.sendall(body[:10])
            time.sleep(0.5)
            slow.sendall(body[10:])
            assert slow.recv(65536).startswith(b"HTTP/1.1 200")
        assert httpx.post(served.url + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=10).status_code == 200
