"""TLS credentials that reload on SIGHUP, and bearer tokens (or client certificates) to tenants."""

from __future__ import annotations

import hmac
import logging
import threading
from pathlib import Path

import grpc

from service.api.errors import ServiceError
from service.dataplane import TENANT_SEP

log = logging.getLogger(__name__)

MAX_TENANT_BYTES = 64


class SecurityConfigError(ValueError):
    """A certificate, key or token file that cannot be used; the message names it, never a token."""


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc
    if not data.strip():
        raise SecurityConfigError(f"{what} {path} is empty")
    return data


class TlsFiles:
    """The server's certificate, key and (for mutual TLS) client CA; re-read by ``reload``.

    gRPC asks for the configuration at every new connection: a reload applies to
    connections made after it, and live connections and streams go on.
    """

    def __init__(self, cert: str, key: str, client_ca: str | None):
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._lock = threading.Lock()
        self._initial = self._configuration()

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        cert = _read(self.cert, "TLS certificate")
        key = _read(self.key, "TLS key")
        if b"PRIVATE KEY" not in key:
            raise SecurityConfigError(f"TLS key {self.key} holds no PEM private key")
        if b"CERTIFICATE" not in cert:
            raise SecurityConfigError(f"TLS certificate {self.cert} holds no PEM certificate")
        ca = _read(self.client_ca, "client CA") if self.client_ca else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial,
            self._fetch,  # type: ignore[arg-type]  # gRPC documents None as "keep the current"
            require_client_authentication=self.client_ca is not None,
        )

    def reload(self) -> None:
        """Re-read the files; on a problem, log it and keep serving with the previous ones."""
        try:
            configuration = self._configuration()
        except SecurityConfigError as exc:
            log.error("TLS files not reloaded, keeping the previous ones: %s", exc)
            return
        with self._lock:
            self._pending = configuration
        log.info("TLS files reloaded; new connections use them")

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC for each new connection, from its own thread; None keeps the current.
        with self._lock:
            pending, self._pending = self._pending, None
        return pending


class TokenFile:
    """``TOKEN TENANT`` lines (``#`` comments and blank lines allowed), re-read by ``reload``."""

    def __init__(self, path: str):
        self.path = path
        self._tokens: list[tuple[bytes, str]] = self._parse()

    def _parse(self) -> list[tuple[bytes, str]]:
        text = _read(self.path, "token file").decode("utf-8", "replace")
        tokens = []
        for number, line in enumerate(text.splitlines(), 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            where = f"token file {self.path} line {number}"
            if len(words) != 2:
                raise SecurityConfigError(f"{where}: expected 'TOKEN TENANT'")
            token, tenant = words
            if len(token) < 16:
                raise SecurityConfigError(f"{where}: the token is shorter than 16 characters")
            if len(tenant.encode()) > MAX_TENANT_BYTES or TENANT_SEP in tenant:
                raise SecurityConfigError(
                    f"{where}: a tenant name is at most {MAX_TENANT_BYTES} bytes"
                )
            tokens.append((token.encode(), tenant))
        if not tokens:
            raise SecurityConfigError(f"token file {self.path} has no tokens")
        return tokens

    def reload(self) -> None:
        try:
            tokens = self._parse()
        except SecurityConfigError as exc:
            log.error("token file not reloaded, keeping the previous tokens: %s", exc)
            return
        self._tokens = tokens
        log.info("token file reloaded: %d tokens", len(tokens))

    def tenant_of(self, token: bytes) -> str | None:
        """The token's tenant, or None; every token is compared, in constant time each."""
        found = None
        for known, tenant in self._tokens:
            if hmac.compare_digest(known, token):
                found = tenant
        return found


def _unauthenticated(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, message)


class Authenticator:
    """Finds the tenant of a call: a bearer token, or the client certificate's common name."""

    def __init__(self, tokens: TokenFile | None, tenant_from_cert: bool):
        self.tokens = tokens
        self.tenant_from_cert = tenant_from_cert

    @property
    def enabled(self) -> bool:
        return self.tokens is not None or self.tenant_from_cert

    def tenant(self, context: grpc.aio.ServicerContext) -> str:
        """The caller's tenant ("" with auth off); it namespaces the caller's session ids.

        Raises UNAUTHENTICATED without valid credentials. A token, when sent, decides
        the tenant; otherwise (``--tenant-from-cert``) the verified client certificate.
        """
        if not self.enabled:
            return ""
        header = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                header = value
        if header is not None:
            scheme, _, token = str(header).partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise _unauthenticated("the authorization header must be 'Bearer TOKEN'")
            tenant = self.tokens.tenant_of(token.strip().encode()) if self.tokens else None
            if tenant is None:
                raise _unauthenticated("unknown or revoked token")
            return tenant
        if self.tenant_from_cert:
            names = list(context.auth_context().get("x509_common_name") or [])
            if names:
                tenant = names[0].decode("utf-8", "replace")
                if tenant and TENANT_SEP not in tenant and len(names[0]) <= MAX_TENANT_BYTES:
                    return tenant
            raise _unauthenticated("no client certificate with a common name")
        raise _unauthenticated("missing credentials: send 'authorization: Bearer TOKEN' metadata")

    def reload(self) -> None:
        if self.tokens is not None:
            self.tokens.reload()
