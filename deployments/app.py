"""The Serve application: Ingress -> FeatureExtractor, CausalEncoder, Decoder, each a deployment scaled on its own.

`build_app` is a Serve application builder, so the checked-in config (`deployments/serve_config.yaml`) works with
Ray's own tools (`serve run deployments/serve_config.yaml`, `serve deploy`, KubeRay's `serveConfigV2`) and with
`qwen3-stream serve`, which reads the same file. The config's `args` choose the model and the stage sizes; its
`deployments` entries set replicas or autoscaling, `max_ongoing_requests` and resources per deployment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from deployments.ingress import Ingress
from deployments.stage_replicas import CausalEncoder, Decoder, FeatureExtractor, ModelSpec
from pipeline.checkpoint import DEFAULT_MODEL_ID, DEFAULT_TOWER_ID
from pipeline.options import SessionOptions

#: The checked-in Serve config: `qwen3-stream serve` and `serve run` read it.
DEFAULT_CONFIG = Path(__file__).with_name("serve_config.yaml")
#: The application's name in that config.
APP_NAME = "qwen3-stream"
#: gRPC servicers on Serve's proxy: the API and the standard health service.
GRPC_SERVICERS = (
    "deployments.grpc_service.add_recognizer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
)

#: Sticky routing of a stream's stage calls: consistent hashing over `session_id` ("<stream>/<segment>"), with
#: no fallback replica (strict affinity: another replica would only answer with a miss).
STICKY = RequestRouterConfig(
    request_router_class="ray.serve.experimental.consistent_hash_router.ConsistentHashRouter",
    request_router_kwargs={"num_virtual_nodes": 100, "num_fallback_replicas": 0},
)


def build_app(args: dict[str, Any]) -> Application:
    """The application from the config's `args` (all optional): model, tower ("none": the offline tower),
    device, dtype, slots (K/V slots per encoder/decoder replica), encoder_batch, decoder_batch, batch_wait_ms (how
    long a call to an idle stage waits for others to join its batch, and how long, after a batch, the stage waits
    for those of its callers that come straight back; raise it on CPU, where a forward takes seconds),
    session (the streams' default `SessionOptions` in their nested form, e.g. {decode: {max_new_tokens: 64}}), store (the session store's
    Redis URL; else the `REDIS_URL` environment variable; neither: no resume), session_ttl_s (how long an idle
    session's state is kept), max_streams_per_ingress (streams one ingress replica admits; more are refused at
    once), idle_timeout_s (a silent client is ended), api_keys_file (`authorization: Bearer` keys with quotas,
    `deployments.auth`; else `QWEN3_STREAM_API_KEYS`; neither: open). (Serve applies the config's per-deployment settings on top.)"""
    return application(args, {})


def application(args: dict[str, Any], deployment_options: dict[str, dict[str, Any]]) -> Application:
    """`build_app`, with each deployment's options (the config's `deployments` entries, by name) applied here."""
    known = {
        "model", "tower", "device", "dtype", "slots", "encoder_batch", "decoder_batch", "batch_wait_ms", "session",
        "store", "session_ttl_s", "max_streams_per_ingress", "idle_timeout_s", "api_keys_file",
    }  # fmt: skip
    unknown = set(args) - known
    if unknown:
        raise ValueError(f"unknown application args {sorted(unknown)}; expected some of {sorted(known)}")
    tower = args.get("tower", DEFAULT_TOWER_ID)
    spec = ModelSpec(
        model=str(args.get("model", DEFAULT_MODEL_ID)),
        tower=None if tower in (None, "none") else str(tower),
        device=str(args.get("device", "cpu")),
        dtype=args.get("dtype"),
    )
    slots = int(args.get("slots", 64))
    wait_s = float(args.get("batch_wait_ms", 2)) / 1000
    unknown = set(deployment_options) - {"Ingress", "FeatureExtractor", "CausalEncoder", "Decoder"}
    if unknown:
        raise ValueError(f"options for unknown deployments {sorted(unknown)}")

    def configured(deployment, **options):  # noqa: ANN001, ANN202
        return deployment.options(**options, **deployment_options.get(deployment.name, {}))

    defaults = SessionOptions.from_dict(args.get("session", {}))
    encoder_batch, decoder_batch = int(args.get("encoder_batch", 64)), int(args.get("decoder_batch", 64))
    encoder = configured(CausalEncoder, request_router_config=STICKY).bind(spec, slots, encoder_batch, wait_s)
    decoder = configured(Decoder, request_router_config=STICKY).bind(spec, slots, decoder_batch, wait_s, defaults)
    ingress = configured(Ingress).bind(
        configured(FeatureExtractor).bind(),
        encoder,
        decoder,
        spec,
        defaults,
        store=args.get("store"),
        session_ttl_s=float(args.get("session_ttl_s", 3600)),
        max_streams=int(args.get("max_streams_per_ingress", 256)),
        idle_timeout_s=float(args.get("idle_timeout_s", 30)),
        api_keys_file=args.get("api_keys_file"),
    )
    return ingress
