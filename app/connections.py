"""Connection hygiene for uvicorn's httptools protocol: head deadline, head size, connection cap.

Stock uvicorn (0.54) with httptools holds a socket that never sends a byte forever (its keep-alive timer is
armed only after a first response), lets a client trickle a request head a byte at a time forever (every byte
cancels that timer), buffers a request head of any size (httptools concatenates header bytes, uvicorn the URL),
and accepts connections until the process runs out of file descriptors; `limit_concurrency` only answers 503
once a request's headers are complete, so idle sockets beyond it still hold their descriptor.

`GuardedHttpToolsProtocol` closes the four in the protocol itself, without a watchdog thread:

* a request head must be complete within `HEAD_TIMEOUT_S` (10 s) of the connection opening or of the
  request's first byte on a kept-alive connection; trickling does not extend it (Go's ReadHeaderTimeout);
* a request head is at most `MAX_HEAD_BYTES` (64 KiB) and `MAX_HEADERS` (100 fields), else 431;
* at most `ConnectionLimits.max_connections` connections are open; the next one is answered a prebuilt 503
  at once, before anything is parsed, and closed;
* a request body must arrive within `BODY_BASE_S` plus its declared length (or the largest body the API takes)
  at `BODY_MIN_RATE` bytes/s, else 408 and close; a body still arriving after the response was sent (a 401
  before any body byte is read, a 413) is not read to its end: the connection closes.

Refusals half-close and discard what the client still sends for `REFUSE_LINGER_S`, so the client reads the
status instead of a reset; beyond `REFUSING_MAX` such sockets a new excess connection is dropped outright.
A request costs a few attribute writes and two extra calls (the head timer is re-armed lazily, not per
request); response streaming is untouched.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import resource
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from app.api.errors import error_body
from app.config import MAX_BODY_BYTES

log = logging.getLogger(__name__)

HEAD_TIMEOUT_S = 10.0
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
# A request body trickled forever would hold its socket: 10 s, plus the body at 64 KiB/s (8 MiB, the API's
# largest body, in 138 s). Uvicorn reads a body the app left unread (a 401 sent first) to its end, so a keyless
# client could trickle one forever too; that connection is closed once its response is out.
BODY_BASE_S = 10.0
BODY_MIN_RATE = 64 * 1024
# Descriptors kept back from connections for everything else: stdio, the listener, the event loop, the model
# file, logs, ClearML's and Hugging Face's HTTP sessions, psutil and NVML probes.
FD_RESERVE = 128
# Even with a huge descriptor limit, a single-model server has no use for more open connections than this:
# requests beyond `parallel + max_queue` are refused by the engine anyway.
MAX_CONNECTIONS = 4096
REFUSE_LINGER_S = 2.0
# Refused sockets still lingering; half of FD_RESERVE, so a flood of refusals cannot eat the other half.
REFUSING_MAX = FD_RESERVE // 2
WARN_INTERVAL_S = 60.0
UNLIMITED_FDS = 1 << 20


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (a common 1024 soft limit is a lockout) and return it.

    An unlimited limit counts as UNLIMITED_FDS, Linux's default ceiling (fs.nr_open).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    was = soft
    target = UNLIMITED_FDS if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # fs.nr_open can be below an unlimited hard limit
            log.warning("file descriptors: cannot raise the soft limit %d to %d: %s", soft, target, exc)
    soft = UNLIMITED_FDS if soft == resource.RLIM_INFINITY else soft
    log.info("file descriptors: soft limit %d (was %s, hard %s)", soft, _limit_text(was), _limit_text(hard))
    return int(soft)


def _limit_text(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def connection_cap(fd_limit: int) -> int:
    """Connections allowed under `fd_limit`: FD_RESERVE below it, at most MAX_CONNECTIONS (1024 gives 896)."""
    return max(1, min(MAX_CONNECTIONS, fd_limit - FD_RESERVE))


@dataclass(frozen=True)
class ConnectionLimits:
    """What one server tolerates from its clients; the defaults are the module's constants."""

    max_connections: int = MAX_CONNECTIONS
    head_timeout_s: float = HEAD_TIMEOUT_S
    max_head_bytes: int = MAX_HEAD_BYTES
    max_headers: int = MAX_HEADERS
    body_base_s: float = BODY_BASE_S
    body_min_rate: float = BODY_MIN_RATE
    max_body_bytes: int = MAX_BODY_BYTES

    def body_timeout_s(self, declared: int | None) -> float:
        """How long a body of `declared` bytes (None: chunked, up to the largest) may take to arrive."""
        size = self.max_body_bytes if declared is None else min(declared, self.max_body_bytes)
        return self.body_base_s + size / self.body_min_rate

    @classmethod
    def for_this_process(cls) -> ConnectionLimits:
        """Raise the descriptor limit and cap connections below it."""
        return cls(max_connections=connection_cap(raise_fd_limit()))


class RefusalLog:
    """One warning per kind of refusal per WARN_INTERVAL_S, with the count since: a flood must not flood logs."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def note(self, kind: str, detail: str) -> None:
        self._counts[kind] = self._counts.get(kind, 0) + 1
        now = time.monotonic()
        if now - self._last.get(kind, -WARN_INTERVAL_S) >= WARN_INTERVAL_S:
            log.warning("%s: refused %d connection(s) since the last such warning (%s)", kind,
                        self._counts[kind], detail)
            self._last[kind] = now
            self._counts[kind] = 0


class _HeadTooLarge(Exception):
    """Raised from a parser callback; httptools wraps it, `data_received` recognises it as the cause."""


@functools.cache
def refusal(status: int, message: str, code: str) -> bytes:
    """A complete `Connection: close` response in OpenAI's error shape, built once per distinct refusal."""
    error_type = "service_unavailable" if status == 503 else "invalid_request_error"
    body = json.dumps(error_body(message, error_type, None, code)).encode()
    head = (b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n" % len(body))
    if status == 503:
        head += b"retry-after: 1\r\n"
    return STATUS_LINE[status] + head + b"\r\n" + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a request-head deadline, a head size bound and a connection cap.

    Use `guarded_protocol(limits)` for a class bound to one server's limits; uvicorn builds one instance per
    connection with a fixed signature, so the limits travel on the class.
    """

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    refusals: ClassVar[RefusalLog] = RefusalLog()

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # The current head's deadline, None between heads. A request only sets and clears this float; the
        # timer checking it is re-armed lazily, so a busy kept-alive connection costs one timer per deadline
        # period rather than a call_later and a cancel per request.
        self._head_deadline: float | None = None
        self._head_begun = False  # some of the current head has arrived: a timeout earns a 408, not silence
        self._head_bytes = 0
        self._timer: asyncio.TimerHandle | None = None  # the head check, or the end of a refusal's linger
        self._refused = False
        self._body_deadline: float | None = None  # set while a request's body is still arriving
        self._body_timer: asyncio.TimerHandle | None = None  # armed lazily: a request without a body costs none

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        open_now = len(self.connections)
        cap = self.limits.max_connections
        if open_now > cap:
            self.refusals.note("connection cap", f"{open_now} open, at most {cap}")
            if open_now > cap + REFUSING_MAX:
                transport.abort()  # even a refusal would cost a descriptor we keep for the rest of the app
                return
            self._refuse(refusal(503, f"The server has {cap} open connections, its limit; retry shortly.",
                                 "too_many_connections"))
            return
        # uvicorn arms no keep-alive timer before a first response: this deadline is all an idle socket gets.
        self._start_head_clock()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # uvicorn's own data_received, plus the head bounds; parse errors still get uvicorn's 400.
        if self._refused:
            return  # lingering after a refusal: drain and drop
        if self._head_deadline is not None:
            self._head_bytes += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._refuse_head(str(exc.__context__))
            else:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserError:
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        # Checked after parsing so that a head ending inside a large read (a POST body behind it) passes;
        # httptools then holds at most the bound plus one read (256 KiB).
        if self._head_deadline is not None and self._head_bytes > self.limits.max_head_bytes:
            self._refuse_head(f"more than {self.limits.max_head_bytes} bytes")
        elif self._body_deadline is not None and self._body_timer is None:
            self._body_timer = self.loop.call_later(max(0.0, self._body_deadline - self.loop.time()),
                                                    self._check_body)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_begun = True
        if self._head_deadline is None:  # on a fresh connection the clock already runs from its opening
            self._start_head_clock()

    def on_headers_complete(self) -> None:
        # Counted here rather than per header, which would cost a call per field on every request; the
        # byte bound already caps what a long list can hold.
        if len(self.headers) > self.limits.max_headers:
            raise _HeadTooLarge(f"more than {self.limits.max_headers} header fields")
        self._head_deadline = None
        self._head_begun = False
        self._head_bytes = 0
        super().on_headers_complete()
        declared = next((value for name, value in self.headers if name == b"content-length"), None)
        if declared != b"0" and (declared is not None or any(
                name == b"transfer-encoding" for name, _ in self.headers)):
            size = int(declared) if declared is not None and declared.isdigit() else None
            self._body_deadline = self.loop.time() + self.limits.body_timeout_s(size)

    def on_message_complete(self) -> None:
        self._body_deadline = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._body_deadline is not None and not self.transport.is_closing():
            self._linger_close()  # answered before its body arrived (a 401, a 413): nothing left to read it for

    def _check_body(self) -> None:
        self._body_timer = None
        deadline = self._body_deadline
        if deadline is None or self.transport.is_closing():
            return
        remaining = deadline - self.loop.time()
        if remaining > 0:
            self._body_timer = self.loop.call_later(remaining, self._check_body)
            return
        self._body_deadline = None
        self.refusals.note("request body timeout", "the request body arrived too slowly")
        cycle = self.cycle
        if cycle is not None:
            started = cycle.response_started
            cycle.disconnected = True  # the app's receive() says http.disconnect and its sends are dropped
            cycle.message_event.set()
            if started:
                self.transport.close()
                return
        self._refuse(refusal(408, "The request body did not arrive in time: at least "
                                  f"{self.limits.body_min_rate / 1024:g} KiB/s after {self.limits.body_base_s:g} s.",
                             "request_timeout"))

    def _start_head_clock(self) -> None:
        self._head_deadline = self.loop.time() + self.limits.head_timeout_s
        if self._timer is None:  # a pending check fires no later than this deadline and re-arms itself
            self._timer = self.loop.call_later(self.limits.head_timeout_s, self._check_head)

    def _check_head(self) -> None:
        self._timer = None
        deadline = self._head_deadline
        if deadline is None or self.transport.is_closing():
            return
        remaining = deadline - self.loop.time()
        if remaining > 0:
            self._timer = self.loop.call_later(remaining, self._check_head)
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head is late: finish the response in flight, then close. The deadline stays set,
            # so the head's bytes are still counted against the size bound meanwhile.
            self.cycle.keep_alive = False
            return
        self._head_deadline = None
        self.refusals.note("request head timeout", f"no complete request head within {self.limits.head_timeout_s:g} s")
        if self._head_begun:
            self._refuse(refusal(408, f"The request head was not complete within {self.limits.head_timeout_s:g} s.",
                                 "request_timeout"))
        else:
            self.transport.close()  # never sent a byte: nothing to answer

    def _refuse_head(self, detail: str) -> None:
        self.refusals.note("request head too large", detail)
        self._refuse(refusal(431, f"The request head is too large: at most {self.limits.max_head_bytes} bytes "
                                  f"and {self.limits.max_headers} header fields.", "request_header_fields_too_large"))

    def _refuse(self, response: bytes) -> None:
        """Answer, half-close, and drop what still comes for REFUSE_LINGER_S: closing on unread data resets."""
        self.transport.write(response)
        self._linger_close()

    def _linger_close(self) -> None:
        """Half-close, drop what the client still sends for REFUSE_LINGER_S, then close."""
        self._refused = True
        self._head_deadline = None
        self._body_deadline = None
        for timer in (self._timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._body_timer = None
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._timer = self.loop.call_later(REFUSE_LINGER_S, self.transport.close)


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedHttpToolsProtocol]:
    """A protocol class bound to `limits`, for `uvicorn.Config(http=...)`."""

    class BoundGuardedHttpToolsProtocol(GuardedHttpToolsProtocol):
        pass

    BoundGuardedHttpToolsProtocol.limits = limits
    BoundGuardedHttpToolsProtocol.refusals = RefusalLog()
    return BoundGuardedHttpToolsProtocol
