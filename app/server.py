"""Run uvicorn in the main thread until asked to stop (signal, idle watchdog, UI abort)."""

from __future__ import annotations

import logging
import socket

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
    """uvicorn's server, which also exits when the runtime's stop flag is set."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime

    async def on_tick(self, counter: int) -> bool:
        if self.runtime.stop_requested.is_set():
            self.runtime.state = "stopping"
            return True
        should_exit = await super().on_tick(counter)
        if self.should_exit:
            # A signal arrived: refuse new work on open connections while in-flight requests drain.
            self.runtime.request_stop("signal")
            self.runtime.state = "stopping"
        return should_exit


def serve(app: object, runtime: Runtime, sock: socket.socket, drain_timeout_s: float) -> None:
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", log_config=None,  # type: ignore[arg-type]
                            timeout_graceful_shutdown=drain_timeout_s, timeout_keep_alive=5)
    AppServer(config, runtime).run(sockets=[sock])
