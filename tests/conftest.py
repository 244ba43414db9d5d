"""Shared fixtures: settings -> server (real grpc.aio on 127.0.0.1:0) -> channel -> stub."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from lstm_stream.v1 import lstm_stream_pb2_grpc as pb_grpc
from service.server import Server
from service.settings import Settings

DEVICE = os.environ.get("LSTM_TEST_DEVICE", "cpu")
"""``make test-gpu`` sets cuda; the default suite runs on the CPU."""


def make_settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "device": DEVICE,
        "grace": 2.0,
        "log_format": "text",
        "max_batch": 256,
    }
    base.update(overrides)
    return Settings(**base)


ServerFactory = Callable[..., Awaitable[Server]]


@pytest.fixture
async def start_server() -> AsyncIterator[ServerFactory]:
    """``await start_server(**settings)`` returns a started server; all stop at the end."""
    servers: list[Server] = []

    async def start(**overrides: Any) -> Server:
        server = Server(make_settings(**overrides), registry=CollectorRegistry())
        servers.append(server)
        await server.start()
        return server

    yield start
    for server in servers:
        await server.stop(grace=1.0)


@pytest.fixture
async def server(start_server: ServerFactory) -> Server:
    return await start_server()


@pytest.fixture
async def channel(server: Server) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.LstmStreamStub:
    return pb_grpc.LstmStreamStub(channel)
