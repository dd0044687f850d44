"""Run uvicorn in the main thread until asked to stop (signal, idle watchdog, UI abort)."""

from __future__ import annotations

import logging
import signal
import socket
import time
from types import FrameType
from typing import Optional

import uvicorn

from app.runtime import Runtime

log = logging.getLogger(__name__)


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before serving so port 0 resolves to a real port we can report."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


class AppServer(uvicorn.Server):
    """uvicorn's server, stopped by the runtime's flag (signal, idle watchdog, UI abort) with a drain.

    Once a stop is requested the server keeps listening but answers new API requests with 503 (the runtime
    is `stopping`) while in-flight requests finish, for at most `drain_timeout_s`; then uvicorn shuts down.
    A second Ctrl-C forces the exit. Signals are not re-raised afterwards: the exit code is the app's.
    """

    def __init__(self, config: uvicorn.Config, runtime: Runtime, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.drain_timeout_s = drain_timeout_s
        self._drain_deadline: Optional[float] = None

    def handle_exit(self, sig: int, frame: Optional[FrameType]) -> None:
        if self.runtime.stop_requested.is_set() and sig == signal.SIGINT:
            self.force_exit = True
            self.should_exit = True
            return
        self.runtime.request_stop(f"signal {signal.Signals(sig).name}")

    async def on_tick(self, counter: int) -> bool:
        if self.runtime.stop_requested.is_set():
            now = time.monotonic()
            if self._drain_deadline is None:
                self._drain_deadline = now + self.drain_timeout_s
                self.runtime.state = "stopping"
                log.info("stopping (%s): draining %d in-flight request(s) for up to %.0f s",
                         self.runtime.shutdown_reason, self.runtime.stats.in_flight, self.drain_timeout_s)
            if self.runtime.stats.in_flight == 0 or now >= self._drain_deadline:
                return True
        return await super().on_tick(counter)


def serve(app: object, runtime: Runtime, sock: socket.socket, drain_timeout_s: float) -> None:
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", log_config=None,  # type: ignore[arg-type]
                            timeout_graceful_shutdown=5, timeout_keep_alive=5)
    AppServer(config, runtime, drain_timeout_s).run(sockets=[sock])
