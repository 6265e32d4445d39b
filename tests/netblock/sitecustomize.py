"""Refuse every network connection that would leave this machine, and report it.

Tests put this folder on a child process's PYTHONPATH and set NETBLOCK_LOG to a file; Python
imports `sitecustomize` at start-up, so the scripts under test (and the processes they start,
such as torchrun's workers) run with the block in place from their first line. The pytest
process itself calls `install()` through the fixture in conftest.py.

Allowed: loopback (127.0.0.0/8, ::1, "localhost"), this machine's own host name, and Unix
sockets. Anything else raises `ConnectionRefusedError` (an OSError, so libraries take the path
they take for a dead network) and appends one line to NETBLOCK_LOG, which the fixture reads to
fail the test. The proxy variables are removed from the environment first: a proxy listening on
loopback is allowed by the rule above and would carry any request out.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket

_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", ""}
# Every spelling that urllib, requests, httpx and aiohttp read (they take either case).
PROXY_VARS = tuple(
    spelling
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "WS_PROXY", "WSS_PROXY", "FTP_PROXY")
    for spelling in (name, name.lower())
)


def _local_names() -> set[str]:
    names = set(_LOCAL_NAMES)
    with contextlib.suppress(OSError):
        names.add(socket.gethostname().lower())
    return names


def _is_loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def install(log_path: str) -> dict:
    """Patch socket in this process; return the originals so a caller can undo it."""
    originals = {
        "connect": socket.socket.connect,
        "connect_ex": socket.socket.connect_ex,
        "getaddrinfo": socket.getaddrinfo,
        "gethostbyname": socket.gethostbyname,
        "gethostbyname_ex": socket.gethostbyname_ex,
    }
    local = _local_names()
    own_ips: set[str] = set()
    with contextlib.suppress(OSError):
        own_ips = {info[4][0] for info in originals["getaddrinfo"](socket.gethostname(), None)}

    def report(what: str) -> None:
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"pid {os.getpid()}: {what}\n")

    def allowed_host(host) -> bool:
        if host is None:
            return True
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        host = str(host).lower().rstrip(".")
        return host in local or _is_loopback_ip(host) or host in own_ips

    def check_address(sock, address, call: str) -> None:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return  # Unix sockets and the like never leave the machine
        host = address[0] if isinstance(address, tuple) else address
        if not allowed_host(host):
            report(f"{call} to {address!r}")
            raise ConnectionRefusedError(f"network blocked by the test suite: {address!r}")

    def connect(self, address):
        check_address(self, address, "connect")
        return originals["connect"](self, address)

    def connect_ex(self, address):
        check_address(self, address, "connect_ex")
        return originals["connect_ex"](self, address)

    def getaddrinfo(host, *args, **kwargs):
        if not allowed_host(host):
            report(f"name lookup of {host!r}")
            raise socket.gaierror(socket.EAI_NONAME, f"name lookup blocked by tests: {host!r}")
        return originals["getaddrinfo"](host, *args, **kwargs)

    def gethostbyname(host):
        if not allowed_host(host):
            report(f"name lookup of {host!r}")
            raise socket.gaierror(socket.EAI_NONAME, f"name lookup blocked by tests: {host!r}")
        return originals["gethostbyname"](host)

    def gethostbyname_ex(host):
        if not allowed_host(host):
            report(f"name lookup of {host!r}")
            raise socket.gaierror(socket.EAI_NONAME, f"name lookup blocked by tests: {host!r}")
        return originals["gethostbyname_ex"](host)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.getaddrinfo = getaddrinfo
    socket.gethostbyname = gethostbyname
    socket.gethostbyname_ex = gethostbyname_ex
    return originals


def uninstall(originals: dict) -> None:
    socket.socket.connect = originals["connect"]
    socket.socket.connect_ex = originals["connect_ex"]
    socket.getaddrinfo = originals["getaddrinfo"]
    socket.gethostbyname = originals["gethostbyname"]
    socket.gethostbyname_ex = originals["gethostbyname_ex"]


if os.environ.get("NETBLOCK_LOG"):
    for _name in PROXY_VARS:
        os.environ.pop(_name, None)
    install(os.environ["NETBLOCK_LOG"])
