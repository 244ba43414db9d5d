"""Servicers registered with gRPC: parsers that never raise, serializers that pass bytes on."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import ModuleType

import grpc
from google.protobuf.message import DecodeError, Message

from service.api.errors import Undecodable


def register(
    servicer: object,
    server: grpc.aio.Server,
    module: ModuleType,
    service: str,
    readers: Mapping[str, Callable[[bytes], object | None]] | None = None,
    written: Sequence[str] = (),
) -> None:
    """Register ``servicer``'s methods for ``service`` of a generated ``*_pb2`` module,
    like the generated ``add_*Servicer_to_server``, with parsers that turn undecodable
    messages into ``Undecodable``. ``readers`` maps a request type's name to a reader
    of its bytes used instead of protobuf's parser (None: not such a message);
    ``written`` names methods whose handlers answer with the response's bytes only
    (gRPC sends them as they are)."""
    descriptor = module.DESCRIPTOR.services_by_name[service]
    handlers = {}
    readers = readers or {}
    for method in descriptor.methods:
        request_type = getattr(module, method.input_type.name)
        response_type = getattr(module, method.output_type.name)
        kind = (
            grpc.stream_stream_rpc_method_handler
            if method.client_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        reader = readers.get(method.input_type.name)
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=(
                _parser(request_type) if reader is None else _reading(reader, request_type)
            ),
            response_serializer=None if method.name in written else _serializer(response_type),
        )
    generic = grpc.method_handlers_generic_handler(descriptor.full_name, handlers)
    server.add_generic_rpc_handlers((generic,))


def _serializer(message_type: type[Message]) -> Callable[[object], bytes]:
    """``SerializeToString``, except for answers the servicer has already written as bytes."""
    serialize = message_type.SerializeToString

    def write(message: object) -> bytes:
        return message if isinstance(message, bytes) else serialize(message)  # type: ignore[arg-type]

    return write


def _reading(
    reader: Callable[[bytes], object | None], message_type: type[Message]
) -> Callable[[bytes], object]:
    name = message_type.DESCRIPTOR.full_name

    def parse(data: bytes) -> object:
        request = reader(data)
        return Undecodable(name) if request is None else request

    return parse


def _parser(message_type: type[Message]) -> Callable[[bytes], object]:
    name = message_type.DESCRIPTOR.full_name

    def parse(data: bytes) -> object:
        try:
            return message_type.FromString(data)
        except DecodeError:
            return Undecodable(name)

    return parse
