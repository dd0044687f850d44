"""RPC endpoint settings, checked without loading llama.cpp (the configuration imports this)."""

from __future__ import annotations

import ipaddress

BUILD_HINT = ('this llama-cpp-python build has no RPC backend: rebuild it with CMAKE_ARGS="-DGGML_RPC=on" '
              '(make install does: CMAKE_ARGS="-DGGML_RPC=on" pip install --no-cache-dir --force-reinstall '
              '--no-deps llama-cpp-python==0.3.36)')


class RPCError(ValueError):
    """An RPC setting or worker llama.cpp cannot use: one line saying why."""


def build_supports_rpc() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_rpc())


def parse_endpoints(text: str) -> list[str]:
    """`host:port,host:port` (IPv6 as [addr]:port) into a list; RPCError naming a malformed entry."""
    out: list[str] = []
    for raw in (p.strip() for p in text.split(",")):
        if not raw:
            continue
        host, sep, port = raw.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise RPCError(f"RPC server {raw!r}: expected host:port")
        out.append(raw)
    if len(out) != len(set(out)):
        raise RPCError("an RPC server is listed twice")
    return out


def check_bind(host: str) -> None:
    """Workers bind a loopback or private address only: anyone who reaches the RPC protocol can run computations
    and read or write the worker's memory."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise RPCError(f"RPC worker host {host!r}: give an IP address (a private or loopback one)") from None
    if address.is_unspecified or not (address.is_private or address.is_loopback):
        raise RPCError(f"RPC worker host {host}: the RPC protocol has no authentication, so a worker binds only a "
                       "private or loopback address (not a public or wildcard one)")
