"""gRPC calls prove the cluster secret: a client interceptor signs every call, a server interceptor
checks it.

Each call (unary or streaming) carries the metadata `METADATA_KEY`: an `auth.Credential` for purpose
"grpc", bound to the full method name, so a proof made for GetState cannot be replayed for
SetFaults. The controller refuses a call without a valid one with UNAUTHENTICATED and says why,
counts it in `auth.REFUSED["grpc"]` and logs it (rate-limited). The call never reaches the servicer.
"""

from __future__ import annotations

import collections
import logging

import grpc

from resilient_moe import auth

log = logging.getLogger("resilient_moe.controller.auth")

PURPOSE = "grpc"
METADATA_KEY = "x-rmoe-credential"


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                                            "compression")),
    grpc.ClientCallDetails,
):
    pass


class ClientAuth(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                 grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds a fresh credential to every call made on the channel it wraps (`authenticated_channel`)."""

    def _sign(self, details: grpc.ClientCallDetails) -> _CallDetails:
        credential = auth.Credential.make(PURPOSE, details.method)
        metadata = list(details.metadata or []) + [(METADATA_KEY, credential.to_header())]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._sign(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._sign(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._sign(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._sign(client_call_details), request_iterator)


# gRPC's default reconnect backoff starts at 1 s: a channel that first dials a controller still starting,
# or one restarting after a crash, would sit out a whole second. The controller is local or one hop
# away, so retrying every 50 ms (backing off to 1 s) costs nothing.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
                     ("grpc.max_reconnect_backoff_ms", 1000)]


def authenticated_channel(address: str) -> grpc.Channel:
    """A channel to `address` whose every call proves this process's cluster secret."""
    return grpc.intercept_channel(grpc.insecure_channel(address, options=RECONNECT_OPTIONS), ClientAuth())


class ServerAuth(grpc.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, every call whose credential is missing or wrong."""

    def __init__(self) -> None:
        self._verifier = auth.Verifier(PURPOSE)

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        header = next((value for key, value in handler_call_details.invocation_metadata or ()
                       if key == METADATA_KEY), None)
        try:
            self._verifier.verify_header(header, method)
        except auth.AuthError as e:
            auth.log_refusal(log, PURPOSE, f"refused a gRPC call to {method}: {e}")
            return _refusal(continuation(handler_call_details), f"authentication failed: {e}")
        return continuation(handler_call_details)


def _refusal(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler | None:
    """A handler of the same kind as `handler` that aborts with UNAUTHENTICATED."""
    if handler is None:
        return None  # an unknown method: gRPC answers UNIMPLEMENTED

    def abort(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(abort, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
