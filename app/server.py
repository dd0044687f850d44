"""Run uvicorn in the main thread until asked to stop (signal, idle watchdog, UI abort)."""

from __future__ import annotations

import errno
import logging
import signal
import socket
import time
from types import FrameType

import uvicorn

from app.connections import ConnectionLimits, guarded_protocol
from app.lifecycle import Lifecycle
from app.telemetry.stats import RequestStats

log = logging.getLogger(__name__)

# uvicorn closes a kept-alive connection idle this long after its last response.
KEEP_ALIVE_S = 5


def bind_socket(host: str, port: int, any_free_port: bool = False) -> socket.socket:
    """Bind before serving so port 0 resolves to a real port we can report.

    With `any_free_port` (under an agent, where one machine may run several instances on host networking) a
    taken port falls back to a free one, said in one line; the caller publishes the port actually bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if not (any_free_port and port and exc.errno == errno.EADDRINUSE):
                raise
            sock.bind((host, 0))
            log.warning("port %d is taken on this machine: listening on free port %d instead", port,
                        sock.getsockname()[1])
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


# After a timed-out drain, how long aborted streams get to send their error event and [DONE].
ABORT_GRACE_S = 3.0


class AppServer(uvicorn.Server):
    """uvicorn's server, stopped by the lifecycle's flag (signal, idle watchdog, UI abort) with a drain.

    Once a stop is requested the server keeps listening but answers new API requests with 503 (the lifecycle
    is `stopping`) while in-flight requests finish, for at most `drain_timeout_s`; then uvicorn shuts down.
    A second Ctrl-C forces the exit. Signals are not re-raised afterwards: the exit code is the app's.
    """

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, stats: RequestStats,
                 drain_timeout_s: float) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.stats = stats
        self.drain_timeout_s = drain_timeout_s
        self._drain_deadline: float | None = None
        self._abort_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.lifecycle.stop_requested.is_set() and sig == signal.SIGINT:
            self.force_exit = True
            self.should_exit = True
            return
        self.lifecycle.request_stop(f"signal {signal.Signals(sig).name}")

    async def on_tick(self, counter: int) -> bool:
        if self.lifecycle.stop_requested.is_set():
            now = time.monotonic()
            if self._drain_deadline is None:
                self._drain_deadline = now + self.drain_timeout_s
                self.lifecycle.begin_stopping()
                log.info("stopping (%s): draining %d in-flight request(s) for up to %.0f s",
                         self.lifecycle.shutdown_reason, self.stats.in_flight, self.drain_timeout_s)
            if self.stats.in_flight == 0:
                return True
            if now >= self._drain_deadline:
                return self._end_drain(now)
        return await super().on_tick(counter)

    def _end_drain(self, now: float) -> bool:
        """The drain timed out: end what still runs with a 503 / an error event and [DONE], then exit.

        Cutting the connections instead would end streams with no finish reason and no [DONE],
        indistinguishable from a network fault. The engine's abort reaches every stream within one step;
        after ABORT_GRACE_S the server exits whatever is left.
        """
        if self._abort_deadline is None:
            self._abort_deadline = now + ABORT_GRACE_S
            log.warning("drain timed out: ending %d request(s) still running", self.stats.in_flight)
            if self.lifecycle.engine is not None:
                self.lifecycle.engine.abort("The server is shutting down: the request was ended before it completed.")
        return now >= self._abort_deadline


def serve(app: object, lifecycle: Lifecycle, stats: RequestStats, sock: socket.socket, drain_timeout_s: float,
          limits: ConnectionLimits | None = None) -> None:
    """Serve `app` on `sock` until the lifecycle asks to stop; blocks.

    Connections go through `app.connections.GuardedHttpToolsProtocol`: a request head within HEAD_TIMEOUT_S
    (10 s), of at most MAX_HEAD_BYTES (64 KiB) and MAX_HEADERS (100 fields); kept-alive connections closed after
    KEEP_ALIVE_S idle; open connections capped FD_RESERVE below the descriptor limit, which is raised to the hard
    limit here. `limits` replaces those limits (tests use a small cap) and leaves the descriptor limit alone.
    """
    if limits is None:
        limits = ConnectionLimits.for_this_process()
    log.info("connections: at most %d open; request heads within %g s, %d bytes, %d fields; keep-alive %d s",
             limits.max_connections, limits.head_timeout_s, limits.max_head_bytes, limits.max_headers, KEEP_ALIVE_S)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", log_config=None,  # type: ignore[arg-type]
                            http=guarded_protocol(limits), timeout_graceful_shutdown=5,
                            timeout_keep_alive=KEEP_ALIVE_S)
    AppServer(config, lifecycle, stats, drain_timeout_s).run(sockets=[sock])
