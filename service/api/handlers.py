"""Servicers registered with gRPC: parsers that never raise, serializers that pass bytes on."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import grpc
from google.protobuf.message import DecodeError, Message

from service.api.errors import Undecodable


def register(servicer: object, server: grpc.aio.Server, module: ModuleType, service: str) -> None:
    """Register ``servicer``'s methods for ``service`` of a generated ``*_pb2`` module,
    like the generated ``add_*Servicer_to_server``, with parsers that turn undecodable
    messages into ``Undecodable``."""
    descriptor = module.DESCRIPTOR.services_by_name[service]
    handlers = {}
    for method in descriptor.methods:
        request_type = getattr(module, method.input_type.name)
        response_type = getattr(module, method.output_type.name)
        kind = (
            grpc.stream_stream_rpc_method_handler
            if method.client_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=_parser(request_type),
            response_serializer=_serializer(response_type),
        )
    generic = grpc.method_handlers_generic_handler(descriptor.full_name, handlers)
    server.add_generic_rpc_handlers((generic,))


def _serializer(message_type: type[Message]) -> Callable[[object], bytes]:
    """``SerializeToString``, except for answers the servicer has already written as bytes."""
    serialize = message_type.SerializeToString

    def write(message: object) -> bytes:
        return message if isinstance(message, bytes) else serialize(message)  # type: ignore[arg-type]

    return write


def _parser(message_type: type[Message]) -> Callable[[bytes], object]:
    name = message_type.DESCRIPTOR.full_name

    def parse(data: bytes) -> object:
        try:
            return message_type.FromString(data)
        except DecodeError:
            return Undecodable(name)

    return parse
