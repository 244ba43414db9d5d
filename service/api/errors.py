"""Errors mapped to gRPC status in one place: a decorator for unary and streaming handlers."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from service.dataplane import (
    CannotMove,
    EngineClosed,
    InvalidRequest,
    NotReady,
    SessionCapError,
    StoreUnavailable,
    UnknownModel,
)
from service.metrics import Metrics

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class ServiceError(Exception):
    """A whole-call failure with the status code and message the client should see."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class ClientGone(Exception):
    """The call ended from the client's side (cancelled, disconnected) while we answered."""


class Undecodable:
    """A message that did not parse; its handler answers INVALID_ARGUMENT.

    Parsing happens in gRPC before a handler runs; a parser that raised would be
    logged by gRPC as an unexpected error, with a traceback, for every hostile message.
    """

    def __init__(self, type_name: str):
        self.type_name = type_name

    def error(self) -> ServiceError:
        return ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT, f"the message is not a valid {self.type_name}"
        )


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a client sees for an exception; never a traceback."""
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    if isinstance(exc, EngineClosed):
        return grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica"
    if isinstance(exc, NotReady):
        return grpc.StatusCode.UNAVAILABLE, "the model is still loading"
    if isinstance(exc, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, UnknownModel):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, CannotMove):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, StoreUnavailable):
        return grpc.StatusCode.UNAVAILABLE, "the state store is unavailable; retry later"
    if isinstance(exc, SessionCapError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    return grpc.StatusCode.INTERNAL, "internal error (logged on the server)"


def rpc(method: str, api: str = "native") -> Callable[[F], F]:
    """Wrap a servicer coroutine: map exceptions to status, count and time the call.

    The servicer provides ``self.metrics``, ``self.auth`` (an ``Authenticator``) and
    ``self.last_call_at`` (set here, so a draining server can tell when calls have
    stopped arriving). The handler gets the caller's tenant ("" with auth off) as a
    fourth argument. Handlers raise; only this wrapper aborts.
    """

    async def fail(metrics: Metrics, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        code, message = status_of(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.error("%s failed", method, exc_info=exc)
        metrics.rpcs.labels(api, method, code.name).inc()
        await context.abort(code, message)

    def decorate(handler: F) -> F:
        @functools.wraps(handler)
        async def wrapper(self: Any, request: Any, context: Any) -> Any:
            start = time.perf_counter()
            self.last_call_at = time.monotonic()
            try:
                tenant = self.auth.tenant(context)  # UNAUTHENTICATED before anything else
                if isinstance(request, Undecodable):
                    raise request.error()
                response = await handler(self, request, context, tenant)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                if isinstance(exc, ClientGone) or context.cancelled():
                    self.metrics.rpcs.labels(api, method, "CANCELLED").inc()
                    return None  # nobody to answer; not a server error
                await fail(self.metrics, context, exc)
            except BaseException:
                self.metrics.rpcs.labels(api, method, "CANCELLED").inc()
                raise
            self.metrics.rpc_seconds.labels(api, method).observe(time.perf_counter() - start)
            self.metrics.rpcs.labels(api, method, "OK").inc()
            return response

        return wrapper  # type: ignore[return-value]

    return decorate
