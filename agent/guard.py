"""Every request is checked before a servicer sees it: decodable, sane strings, finite numbers.

Why here and not in each RPC: a hostile or broken client can send anything,
to any method. Without this, random bytes become UNKNOWN with a traceback in
the agent log (grpc's own deserializer failure), a NUL in an interface name
becomes a ValueError deep in netlink code, a NUL in a filter silently
truncates it (C strings), and a NaN duration compares false with every limit
and never ends. One interceptor, wrapping the deserializer and the handler of
every method (Agent and Probe), answers all of these with INVALID_ARGUMENT,
one log line, and a message that names the field but never echoes its value
(an echo of a 1 MB value would itself exceed the status size).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

log = logging.getLogger(__name__)

MAX_STRING = 256  # interface names, addresses, sections, ids: all far shorter
LONG_STRINGS = {"filter": 4096}  # field name -> its own limit (capture filter)
MAX_REPEATED = 4096
FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)


class Undecodable:
    """What the safe deserializer returns for bytes that are not the request message."""

    def __init__(self, size: int, reason: str) -> None:
        self.size = size
        self.reason = reason


def problem(msg: Message, prefix: str = "") -> str | None:
    """What is wrong with ``msg`` (a field path and why), or None when every field is sane."""
    for field, value in msg.ListFields():
        path = f"{prefix}{field.name}"
        repeated = bool(field.is_repeated)
        values = list(value) if repeated else [value]
        if repeated and len(values) > MAX_REPEATED:
            return f"{path}: at most {MAX_REPEATED} items (got {len(values)})"
        for i, item in enumerate(values):
            where = f"{path}[{i}]" if repeated else path
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                found = problem(item, f"{where}.")
                if found:
                    return found
            elif field.type == FieldDescriptor.TYPE_STRING:
                limit = LONG_STRINGS.get(field.name, MAX_STRING)
                if len(item) > limit:
                    return f"{where}: at most {limit} characters (got {len(item)})"
                if not item.isprintable():
                    return f"{where}: control or non-printable characters (NUL, newline...)"
            elif field.type in FLOATS and not math.isfinite(item):
                return f"{where}: must be a finite number (got {item})"
    return None


Behaviour = Callable[[Any, Any], Any]
if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]


async def _refuse(method: str, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Abort with INVALID_ARGUMENT when the request is undecodable or has a bad field."""
    if isinstance(request, Undecodable):
        log.warning("%s: undecodable request (%d bytes): %s", method, request.size, request.reason)
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request body ({request.size} bytes) is not a valid {method} request",
        )
    found = problem(request)
    if found:
        log.warning("%s: refused: %s", method, found)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid request: {found}")


class RequestGuard(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps every method's deserializer and behaviour with the checks above."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = str(handler_call_details.method).rsplit("/", 1)[-1]
        decode = handler.request_deserializer

        def safe_decode(data: bytes) -> Any:
            try:
                return decode(data)
            except Exception as exc:  # DecodeError, UnicodeDecodeError, ...
                return Undecodable(len(data), type(exc).__name__)

        if handler.unary_unary is not None:
            inner_uu: Behaviour = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                await _refuse(method, request, context)
                return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=safe_decode,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_us: Behaviour = handler.unary_stream

            async def stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                await _refuse(method, request, context)
                # aclosing: a cancelled stream closes the servicer's generator now (its
                # finally stops captures and watchers), not whenever it is collected.
                async with contextlib.aclosing(inner_us(request, context)) as items:
                    async for item in items:
                        yield item

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=safe_decode,
                response_serializer=handler.response_serializer,
            )
        return handler  # no client-streaming methods in our protos
