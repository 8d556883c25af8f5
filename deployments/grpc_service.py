"""How `qwen3stream.v1.Recognizer` is registered on Serve's gRPC proxy: requests stay bytes until the ingress.

With the generated `add_RecognizerServicer_to_server`, the proxy parses every request itself, and a message that
does not parse (invalid UTF-8 in a string field, plain garbage) ends the ingress's input the way a client's
cancel does: the stream would end quietly, or with a Final of the audio before it. Registered here with no
request deserializer, the proxy forwards the bytes and the ingress parses them, so such a message gets
INVALID_ARGUMENT naming it. Responses are serialized as usual.
"""

from __future__ import annotations

import grpc

from protos.qwen3stream.v1 import asr_pb2

SERVICE = "qwen3stream.v1.Recognizer"


def add_recognizer_to_server(servicer, server) -> None:  # noqa: ANN001 (grpc's servicer and server objects)
    """The `add_*Servicer_to_server` shape Serve's `grpc_servicer_functions` expects."""
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.Recognize,
        request_deserializer=None,
        response_serializer=asr_pb2.RecognizeResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Recognize": handler}),))
