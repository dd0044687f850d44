"""python -m app.rpc_worker: lend this machine's CPU to a leader app over llama.cpp's RPC protocol.

    python -m app.rpc_worker --host 127.0.0.1 --port 50052 [--threads N] [--leader TASK_ID]

The leader (`python -m app` with `rpc_servers`, or the worker tasks `app.instances launch --rpc-workers K`
created) registers each worker as a llama.cpp device and loads part of the model's layers onto it.

Under a ClearML agent (or with --leader) the worker is a ClearML task: it publishes its `host:port` and free
memory as properties, and exits when its leader stops, or when the leader has not been running for the idle
limit. The RPC protocol has no authentication: the worker binds a private or loopback address only, and never
asks ClearML's gateway for a public route.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("app.rpc_worker")

DEFAULT_PORT = 50052
LEADER_POLL_S = 10.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app.rpc_worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=None,
                        help="private or loopback address to bind (default: 127.0.0.1 locally, the machine's "
                             "private address under an agent)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for the computations (0 = all cores)")
    parser.add_argument("--leader", default="", help="the leader app's ClearML task ID (exit when it stops)")
    parser.add_argument("--idle-time-limit-hours", type=float, default=1.0,
                        help="exit when the leader has not been running for this long (0 = never)")
    parser.add_argument("--leader-poll-sec", type=float, default=LEADER_POLL_S,
                        help=f"how often the leader's status is read (default {LEADER_POLL_S:g})")
    parser.add_argument("--cache-dir", default=None, help="keep tensors sent by the leader here (faster reloads)")
    parser.add_argument("--offline", action="store_true", help="ClearML offline mode (with --leader)")
    parser.add_argument("--log-level", default="INFO")
    return parser


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host.strip("[]"), port))
        except OSError:
            return False
    return True


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host.strip("[]"), 0))
        return int(s.getsockname()[1])


def wait_listening(host: str, port: int, server: threading.Thread, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and server.is_alive():
        try:
            with socket.create_connection((host.strip("[]"), port), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.1)
    return False


class Worker:
    """One RPC server on a thread of its own (llama.cpp's accept loop never returns) and, with a leader, the
    ClearML task that publishes it and watches the leader."""

    def __init__(self, host: str, port: int, threads: int, cache_dir: str | None) -> None:
        self.host, self.port, self.threads, self.cache_dir = host, port, threads, cache_dir
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, name="rpc-server", daemon=True)

    def _serve(self) -> None:
        from app.engine import rpc

        try:
            rpc.serve(self.host, self.port, self.threads, self.cache_dir)
        except BaseException as exc:  # reported by start()
            self.failure = exc

    def start(self) -> None:
        self.thread.start()
        if not wait_listening(self.host, self.port, self.thread):
            raise RuntimeError(f"the RPC server did not start on {self.endpoint}: {self.failure or 'no answer'}")

    @property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"


def watch_leader(leader: str, idle_limit_s: float, stop: threading.Event, poll_s: float = LEADER_POLL_S) -> str:
    """Wait until the leader ends (or never ran for `idle_limit_s`): the reason to exit."""
    from app.clearml.workers import LEADER_ENDED, leader_status

    last_running = time.monotonic()
    while not stop.wait(poll_s):
        status = leader_status(leader)
        now = time.monotonic()
        if status in LEADER_ENDED:
            return f"the leader task {leader} is {status}"
        if status == "in_progress":
            last_running = now
        elif idle_limit_s > 0 and now - last_running > idle_limit_s:
            return f"the leader task {leader} has not been running for {idle_limit_s / 3600:g} h"
    return "stopped"


def run(args: argparse.Namespace) -> int:
    from app.engine import rpc

    under_agent = bool(os.environ.get("CLEARML_TASK_ID"))
    with_clearml = under_agent or bool(args.leader)
    task: Any = None
    values = {"leader": args.leader, "host": args.host or "", "port": args.port, "threads": args.threads,
              "idle_time_limit_hours": args.idle_time_limit_hours}
    if with_clearml:
        from app.clearml.session import AppTask
        from app.clearml.workers import WORKER_SECTION

        task = AppTask.start(args.offline, "llama.cpp Model Deployment", "llama.cpp RPC worker")
        values.update(task.task.connect(values, name=WORKER_SECTION) or {})
    host = str(values["host"] or "")
    if not host:
        if under_agent:
            from app.clearml.session import private_host

            host = private_host()
        else:
            host = "127.0.0.1"
    threads = int(values["threads"]) or (os.cpu_count() or 1)
    port = int(values["port"])
    rpc.check_bind(host)
    if not rpc.supported():
        raise rpc.RPCError(rpc.BUILD_HINT)
    if not port_free(host, port):
        if not under_agent:
            raise rpc.RPCError(f"port {port} on {host} is taken")
        taken, port = port, free_port(host)
        log.warning("port %d is taken on this machine: serving on %d instead", taken, port)

    worker = Worker(host, port, threads, args.cache_dir)
    worker.start()
    free, total = rpc.cpu_memory()
    log.info("RPC worker serving this machine's CPU (%d threads, %d of %d MiB free) at %s; the RPC protocol has "
             "no authentication, keep this address private", threads, free // 2**20, total // 2**20,
             worker.endpoint)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if task is not None:
        from app.clearml.workers import ENDPOINT_PROPERTY, FREE_MEMORY_PROPERTY

        task.set_properties(**{ENDPOINT_PROPERTY: worker.endpoint, FREE_MEMORY_PROPERTY: free // 2**20,
                               "status": "serving", "Leader": values["leader"]})
    reason = "stopped"
    if values["leader"]:
        reason = watch_leader(str(values["leader"]), float(values["idle_time_limit_hours"]) * 3600, stop,
                              args.leader_poll_sec)
    else:
        stop.wait()
    log.info("RPC worker exiting: %s", reason)
    if task is not None:
        task.set_properties(status="stopped")
        task.close()
    sys.stdout.flush()
    os._exit(0)  # llama.cpp's accept loop holds its thread for good


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from app.engine.rpc import RPCError

    try:
        return run(args)
    except RPCError as exc:
        log.error("%s", exc)
        return 2
    except Exception as exc:
        log.error("RPC worker failed: %s: %s", type(exc).__name__, exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
