"""lstm-stream's API: the client (``Client``, ``AsyncClient``) and the generated stubs (``v1``)."""

from lstm_stream.client import (
    AsyncClient,
    Client,
    LstmError,
    Results,
    ShardedClient,
    Unreachable,
    rendezvous,
)

__all__ = [
    "AsyncClient",
    "Client",
    "LstmError",
    "Results",
    "ShardedClient",
    "Unreachable",
    "rendezvous",
]
