"""``python -m service.healthcheck``: exit 0 when the server reports SERVING (Docker's HEALTHCHECK).

Asks ``grpc.health.v1`` on 127.0.0.1 at the port the server itself would use
(``--port``, else ``LSTM_PORT``, else 50051). With ``--tls-ca`` (or the server's
own ``LSTM_TLS_CERT`` as the trusted certificate) it connects over TLS.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, timeout: float, tls_ca: str | None, server_name: str) -> str:
    """The serving status's name, or the RPC's error."""
    if tls_ca:
        with open(tls_ca, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        options = [("grpc.ssl_target_name_override", server_name)]
        channel = grpc.secure_channel(address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.healthcheck", description=__doc__, allow_abbrev=False
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("LSTM_PORT") or 50051))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--tls-ca", default=os.environ.get("LSTM_TLS_CERT") or None)
    parser.add_argument("--server-name", default="localhost", help="the name its certificate has")
    args = parser.parse_args(argv)
    status = check(f"{args.host}:{args.port}", args.timeout, args.tls_ca, args.server_name)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
