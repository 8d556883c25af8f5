"""The gRPC front of the public port: TLS (Serve's gRPC proxy has none) and a bound on slow consumers.

The front is a `grpc.aio` server, with TLS credentials when given (a server certificate and key; with a client CA,
mutual TLS: a client without a certificate that CA signed is refused in the handshake), plaintext otherwise. It
forwards `Recognizer/Recognize`, `grpc.health.v1.Health/Check` and server reflection to the proxy's plaintext port
on loopback as raw bytes (nothing is parsed twice),
with the client's metadata (`authorization`, anything else a client sends), and hands the proxy's status, details
and trailing metadata back. A client that goes away cancels the forwarded call, so the ingress sees the same
cancel it would see on the plaintext port (the session stays resumable). Anything else is UNIMPLEMENTED.

A client that keeps sending but stops reading is ended here with RESOURCE_EXHAUSTED once `max_backlog` responses
wait for it beyond its HTTP/2 window: Serve's proxy and replica queue a stream's responses without bound, and the
front is the one hop that sees what the client has taken.

The front runs inside `qwen3-stream serve` (a thread of its own, `FrontThread`; with `--tls-cert/--tls-key` it
speaks TLS), and as a sidecar container of the Kubernetes pods (`qwen3-stream tls-front`, k8s/).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import grpc

from deployments.client import _FirstStatus
from deployments.grpc_service import SERVICE

log = logging.getLogger(__name__)

RECOGNIZE = f"/{SERVICE}/Recognize"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
REFLECTION = ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
              "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")  # fmt: skip
#: The largest message the front accepts from a client: the proxy's own limit (deployments/server.py).
MAX_REQUEST_BYTES = 4 * 2**20
#: Responses a stream may leave unread (beyond its HTTP/2 window) before it is ended with RESOURCE_EXHAUSTED: a
#: live stream gets one Result per 1.92 s block, so 256 is minutes of audio a client has not looked at.
MAX_BACKLOG = 256
#: Metadata the transport owns: never forwarded as the client's (the upstream call makes its own).
_TRANSPORT_KEYS = frozenset({"user-agent", "te", "content-type", "grpc-accept-encoding", "grpc-encoding", "grpc-timeout"})


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of the front: its certificate chain and key, and (mutual TLS) the CA its clients' certificates
    must be signed by."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        """The server credentials; raises ValueError naming a file that is missing or is not PEM."""
        chain = _pem(self.cert, "certificate")
        key = _pem(self.key, "private key")
        roots = None if self.client_ca is None else _pem(self.client_ca, "client CA certificate")
        return grpc.ssl_server_credentials([(key, chain)], root_certificates=roots, require_client_auth=roots is not None)


def _pem(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"{what} file {path}: {error.strerror}; expected a readable PEM file") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what} file {path} holds no PEM block; expected a PEM file (-----BEGIN ...)")
    return data


def _forwarded(metadata: Sequence[tuple[str, str | bytes]] | None) -> tuple[tuple[str, str | bytes], ...]:
    """The metadata of a call, less what the transport owns (pseudo-headers, grpc-*, user-agent)."""
    return tuple(
        (key, value)
        for key, value in metadata or ()
        if not key.startswith(":") and not key.startswith("grpc-") and key not in _TRANSPORT_KEYS
    )


class SlowConsumer(RuntimeError):
    """A client left too many responses unread."""

    def __init__(self, max_backlog: int) -> None:
        super().__init__(
            f"the client left {max_backlog} responses unread while sending on; read the responses as they come "
            "(the session stays resumable)"
        )


class _Forwarder(grpc.GenericRpcHandler):
    """The front's handlers: each call becomes one call of the same method on the upstream channel."""

    def __init__(self, channel: grpc.aio.Channel, max_backlog: int) -> None:
        self.channel, self.max_backlog = channel, max_backlog
        self.peak_backlog = 0  # the most responses any stream has left unread at once (beyond its window)
        self.handlers = {
            method: grpc.stream_stream_rpc_method_handler(self._stream(method)) for method in (RECOGNIZE, *REFLECTION)
        }
        self.handlers[HEALTH_CHECK] = grpc.unary_unary_rpc_method_handler(self._unary(HEALTH_CHECK))

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self.handlers.get(handler_call_details.method)

    def _stream(self, method: str) -> Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext], Awaitable[None]]:
        upstream = self.channel.stream_stream(method)  # no serializers: bytes in, bytes out

        async def forward(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
            call = upstream(metadata=_forwarded(context.invocation_metadata()), timeout=context.time_remaining())
            status = _FirstStatus(call)  # the proxy's own status, should a write in flight mask it (grpc#36066)

            async def pump() -> None:
                try:
                    async for request in requests:
                        await call.write(request)
                    await call.done_writing()
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    return  # the upstream call ended: its status goes back below

            # Responses the client has not taken (beyond what its HTTP/2 window already holds) wait here, at most
            # `max_backlog`; one more ends the stream. Upstream keeps producing while a client reads nothing
            # (Serve queues a replica's responses without bound), so this is where a slow consumer is stopped.
            backlog: asyncio.Queue[bytes | None] = asyncio.Queue(self.max_backlog)

            async def deliver() -> None:
                while (response := await backlog.get()) is not None:
                    await context.write(response)

            writer, deliverer = asyncio.create_task(pump()), asyncio.create_task(deliver())
            try:
                try:
                    async for response in call:
                        if backlog.full():
                            raise SlowConsumer(self.max_backlog)
                        backlog.put_nowait(response)
                        self.peak_backlog = max(self.peak_backlog, backlog.qsize())
                    upstream_error = None
                except grpc.aio.AioRpcError as error:
                    upstream_error = await status.unmask(error)
                await backlog.put(None)  # what the proxy sent before its status reaches the client first
                await deliverer
                if upstream_error is not None:
                    await context.abort(
                        upstream_error.code(), upstream_error.details(), _forwarded(upstream_error.trailing_metadata())
                    )
            except SlowConsumer as error:
                log.info("stream ended: %s", error)
                # Upstream first (the ingress sees a cancel: its slots are freed, the session stays resumable), and
                # no more audio is taken from the client; its status reaches it behind the responses in its window,
                # once it reads them.
                writer.cancel()
                call.cancel()
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
            finally:
                writer.cancel()
                deliverer.cancel()
                call.cancel()  # a no-op once it ended; a client that went away cancels the upstream call
            context.set_trailing_metadata(_forwarded(await call.trailing_metadata()))

        return forward

    def _unary(self, method: str) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]:
        upstream = self.channel.unary_unary(method)

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                return await upstream(
                    request, metadata=_forwarded(context.invocation_metadata()), timeout=context.time_remaining()
                )
            except grpc.aio.AioRpcError as error:
                await context.abort(error.code(), error.details(), _forwarded(error.trailing_metadata()))
                raise  # abort raises; never reached

        return forward


class GrpcFront:
    """The front on `host:port`, forwarding to `upstream` (HOST:PORT of Serve's plaintext gRPC proxy); TLS with
    `tls`, plaintext without."""

    def __init__(
        self, upstream: str, tls: TlsFiles | None, port: int, host: str = "[::]", max_backlog: int = MAX_BACKLOG
    ) -> None:
        if max_backlog < 1:
            raise ValueError(f"max_backlog is {max_backlog}; expected at least 1 response")
        self.upstream, self.tls, self.host, self.port, self.max_backlog = upstream, tls, host, port, max_backlog
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None
        self._forwarder: _Forwarder | None = None

    @property
    def peak_backlog(self) -> int:
        """The most responses one stream has left unread at once (beyond its HTTP/2 window) since the start."""
        return 0 if self._forwarder is None else self._forwarder.peak_backlog

    async def start(self) -> int:
        """Listen; returns the port (the one asked for, or the one picked for port 0)."""
        credentials = None if self.tls is None else self.tls.credentials()  # a bad file fails before anything listens
        # Unlimited toward the proxy (it enforces its own limit); a Final of a long stream can be large.
        self._channel = grpc.aio.insecure_channel(
            self.upstream, options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        )
        self._server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)])
        self._forwarder = _Forwarder(self._channel, self.max_backlog)
        self._server.add_generic_rpc_handlers((self._forwarder,))
        address = f"{self.host}:{self.port}"
        if credentials is None:
            bound = self._server.add_insecure_port(address)
        else:
            bound = self._server.add_secure_port(address, credentials)
        if bound == 0:
            raise OSError(f"the gRPC front cannot listen on {address}; expected a free port")
        self.port = bound
        await self._server.start()
        security = "plaintext" if self.tls is None else "mutual TLS" if self.tls.client_ca is not None else "TLS"
        log.info("gRPC front on %s:%d -> %s (%s)", self.host, bound, self.upstream, security)
        return bound

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def serve_until_cancelled(self) -> None:
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.shield(self.stop())


class FrontThread:
    """A `GrpcFront` on an event loop of its own thread, for a process whose main thread does other things."""

    def __init__(self, front: GrpcFront) -> None:
        self.front = front
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-front", daemon=True)

    def start(self) -> int:
        """Start the loop and the front; returns its port (raises what starting it raised)."""
        self._thread.start()
        return self._run(self.front.start())

    def stop(self) -> None:
        self._run(self.front.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _run(self, coroutine: Awaitable[int | None]) -> int | None:
        future: Future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result()
