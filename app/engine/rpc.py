"""llama.cpp's RPC backend, reached through ggml's backend registry (llama-cpp-python binds none of it).

Two sides of one protocol, both from the llama-cpp-python build the app runs on, so they always speak the same
RPC protocol version:
- a worker serves this machine's CPU (or GPU) device to one leader: `serve` (blocks; `python -m app.rpc_worker`);
- the leader registers each worker as a llama.cpp device before the model loads (`add_servers`), and llama.cpp
  then splits the layers across the devices it has.

The protocol has no authentication and no encryption: workers bind private addresses only (see `check_bind`).
"""

from __future__ import annotations

import ctypes
import logging
import re
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import llama_cpp

from app.engine.params import ggml_libraries
from app.engine.rpc_endpoints import BUILD_HINT, RPCError, build_supports_rpc, check_bind

log = logging.getLogger(__name__)

GGML_BACKEND_DEVICE_TYPE_CPU = 0
RPC_REG = b"RPC"


@dataclass(frozen=True)
class Device:
    """One llama.cpp device as the registry lists it."""

    name: str
    description: str
    free: int
    total: int


def supported() -> bool:
    return build_supports_rpc()


class _Ggml:
    """The few ggml backend-registry functions the RPC setup needs, from the libraries beside libllama."""

    def __init__(self) -> None:
        self.ggml = self._open("ggml_backend_reg_by_name")
        g = self.ggml
        g.ggml_backend_reg_by_name.restype = ctypes.c_void_p
        g.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
        g.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
        g.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        g.ggml_backend_register.restype = None
        g.ggml_backend_register.argtypes = [ctypes.c_void_p]
        g.ggml_backend_dev_count.restype = ctypes.c_size_t
        g.ggml_backend_dev_get.restype = ctypes.c_void_p
        g.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        g.ggml_backend_dev_name.restype = ctypes.c_char_p
        g.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
        g.ggml_backend_dev_description.restype = ctypes.c_char_p
        g.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
        g.ggml_backend_dev_memory.restype = None
        g.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                              ctypes.POINTER(ctypes.c_size_t)]
        g.ggml_backend_dev_by_type.restype = ctypes.c_void_p
        g.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]

    @staticmethod
    def _open(symbol: str) -> ctypes.CDLL:
        for path in ggml_libraries():  # the copies libllama loaded, not their twins (see ggml_libraries)
            lib = ctypes.CDLL(str(path))  # already loaded with libllama: this only looks symbols up
            if hasattr(lib, symbol):
                return lib
        raise RPCError(f"no ggml library beside llama_cpp exports {symbol}")

    def rpc_proc(self, name: str) -> int:
        reg = self.ggml.ggml_backend_reg_by_name(RPC_REG)
        if not reg:
            raise RPCError(BUILD_HINT)
        proc = self.ggml.ggml_backend_reg_get_proc_address(reg, name.encode())
        if not proc:
            raise RPCError(f"the RPC backend of this build has no {name}")
        return int(proc)

    def devices(self) -> list[Device]:
        out = []
        for i in range(self.ggml.ggml_backend_dev_count()):
            dev = self.ggml.ggml_backend_dev_get(i)
            free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
            self.ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            out.append(Device((self.ggml.ggml_backend_dev_name(dev) or b"").decode(),
                              (self.ggml.ggml_backend_dev_description(dev) or b"").decode(), free.value, total.value))
        return out


def devices() -> list[Device]:
    """Every device llama.cpp will place layers on (CPU included)."""
    llama_cpp.llama_backend_init()
    return _Ggml().devices()


def rpc_devices(endpoints: list[str], listed: list[Device] | None = None) -> list[Device]:
    """The registered devices served by these endpoints, in the order given (llama.cpp describes each RPC device
    by its endpoint). Listing asks every RPC device for its memory over the network: pass `listed` to reuse one."""
    listed = devices() if listed is None else listed
    return [d for endpoint in endpoints for d in listed if d.name.startswith("RPC") and d.description == endpoint]


def add_servers(endpoints: list[str]) -> list[Device]:
    """Register each RPC server as llama.cpp device(s) before a model loads: llama.cpp asks each worker for its
    devices and free memory here (RPCError when one does not answer) and puts its layers on them (RPC devices
    first, by free memory). An endpoint already registered in this process is not added twice."""
    if not supported():
        raise RPCError(BUILD_HINT)
    llama_cpp.llama_backend_init()
    ggml = _Ggml()
    add = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(ggml.rpc_proc("ggml_backend_rpc_add_server"))
    known = {d.description for d in rpc_devices(endpoints, ggml.devices())}
    for endpoint in endpoints:
        if endpoint in known:
            continue
        reachable(endpoint)  # llama.cpp aborts the whole process on a worker it cannot connect to
        reg = add(endpoint.encode())
        if not reg:
            raise RPCError(f"RPC server {endpoint}: llama.cpp could not add it")
        ggml.ggml.ggml_backend_register(reg)
    registered = rpc_devices(endpoints, ggml.devices())
    for endpoint in endpoints:
        if not any(d.description == endpoint for d in registered):
            raise RPCError(f"RPC server {endpoint}: no device (is a worker listening there?)")
    for device in registered:
        if device.total == 0:
            raise RPCError(f"RPC server {device.description or device.name}: no answer (is a worker listening "
                           "there, from the same llama-cpp-python version?)")
    return registered


def reachable(endpoint: str, timeout_s: float = 5.0) -> None:
    """RPCError unless something accepts a TCP connection at `endpoint` (host:port, IPv6 as [addr]:port)."""
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise RPCError(f"RPC server {endpoint}: cannot connect ({exc.strerror or exc}); is "
                       "`python -m app.rpc_worker` running there?") from None


def serve(host: str, port: int, threads: int, cache_dir: str | None = None) -> None:
    """Serve this machine's CPU device over llama.cpp's RPC protocol on host:port; blocks for good (run it on a
    thread the process does not wait for). `cache_dir` lets the worker keep tensors it was sent (a faster second
    load)."""
    check_bind(host)
    if not supported():
        raise RPCError(BUILD_HINT)
    llama_cpp.llama_backend_init()
    ggml = _Ggml()
    start = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                             ctypes.POINTER(ctypes.c_void_p))(ggml.rpc_proc("ggml_backend_rpc_start_server"))
    cpu = ggml.ggml.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    if not cpu:
        raise RPCError("no CPU device in this llama.cpp build")
    devs = (ctypes.c_void_p * 1)(cpu)
    endpoint = f"{host}:{port}"
    start(endpoint.encode(), cache_dir.encode() if cache_dir else None, threads, 1, devs)


def cpu_memory() -> tuple[int, int]:
    """(free, total) bytes of this machine's CPU device, as a worker reports it to its leader."""
    llama_cpp.llama_backend_init()
    ggml = _Ggml()
    dev = ggml.ggml.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    ggml.ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return free.value, total.value


_LAYER_LINE = re.compile(r"layer\s+(\d+) assigned to device (\S+?),")


@contextmanager
def layer_placement() -> Iterator[dict[str, int]]:
    """Counts, while a model loads, how many layers llama.cpp assigns to each device (from its own debug log
    lines), then gives llama-cpp-python its log callback back."""
    counts: dict[str, int] = {}

    def on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        match = _LAYER_LINE.search(text.decode("utf-8", errors="replace"))
        if match:
            counts[match.group(2)] = counts.get(match.group(2), 0) + 1

    callback = llama_cpp.llama_log_callback(on_log)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield counts
    finally:
        restore: Callable[..., None] | None = getattr(getattr(llama_cpp, "_logger", None), "llama_log_callback",
                                                      None)
        if restore is not None:
            llama_cpp.llama_log_set(restore, ctypes.c_void_p(0))
