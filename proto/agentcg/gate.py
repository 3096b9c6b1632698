"""How an agentcg server checks who calls it: TLS (``ServerSecurity``), and the access gate.

``AccessGate`` is a grpc.aio server interceptor, installed only when the server has an access
file (agentcg.access). For every call it reads ``authorization: Bearer <token>``, refuses an
unknown token with UNAUTHENTICATED and a method the principal's role does not list with
PERMISSION_DENIED (before the request is even read), and otherwise runs the method with the
principal in ``current_principal()``, for the servicer to check the tenant or node it names.
A call without a token, when the access file knows principals by client certificate
(``cert_names``), is judged the same way inside the call, where gRPC shows the verified peer
certificate (``context.auth_context()``). Health checks and server reflection stay open: load
balancers and probes carry no token.

``ServerSecurity`` holds a server's flags (``--access``, ``--tls-cert``, ``--tls-key``,
``--tls-client-ca``): it reads the files at start-up, so a bad one stops the server before it
listens, and binds the listener with TLS (mutual TLS with a client CA) or without. SIGHUP
reads them again (``reload_on_sighup``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import grpc

from agentcg.access import OPEN, Access, AccessFileError, Principal, parse_access

__all__ = [
    "OPEN_METHOD_PREFIXES",
    "AccessGate",
    "ServerCertificates",
    "ServerSecurity",
    "ServerSecurityError",
    "bearer_token",
    "current_principal",
    "reload_on_sighup",
]

log = logging.getLogger(__name__)

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"

_principal: ContextVar[Principal] = ContextVar("agentcg_principal", default=OPEN)


def current_principal() -> Principal:
    """Who makes the call being served (``OPEN`` on a server without an access file)."""
    return _principal.get()


def bearer_token(metadata: Any) -> str:
    """The token of an ``authorization: Bearer <token>`` entry, or ""."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return ""


def _refusing(handler: Handler, code: grpc.StatusCode, message: str) -> Handler:
    async def unary(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, message)

    async def streaming(
        request: object, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        await context.abort(code, message)
        yield  # pragma: no cover - abort raises

    if handler.response_streaming:
        field = "stream_stream" if handler.request_streaming else "unary_stream"
        return handler._replace(**{field: streaming})  # type: ignore[attr-defined,no-any-return]
    field = "stream_unary" if handler.request_streaming else "unary_unary"
    return handler._replace(**{field: unary})  # type: ignore[attr-defined,no-any-return]


class _Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _as(
    resolve: Callable[[Any], Principal], handler: Handler, on_refused: Callable[[str], None]
) -> Handler:
    """``handler`` with its behaviour run as the principal ``resolve(context)`` gives (it
    raises _Refusal to refuse the call). A streaming behaviour must be an async generator (as
    every agentcg servicer's is), not one writing with ``context.write``."""
    if handler.response_streaming:
        field = "stream_stream" if handler.request_streaming else "unary_stream"
        inner_gen: Callable[..., AsyncIterator[Any]] = getattr(handler, field)

        async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                _principal.set(resolve(context))
            except _Refusal as refusal:
                await context.abort(refusal.code, refusal.message)
            try:
                async for response in inner_gen(request, context):
                    yield response
            except grpc.aio.AbortError:
                _count_scope_refusal(context, on_refused)
                raise

        return handler._replace(**{field: streaming})  # type: ignore[attr-defined,no-any-return]
    field = "stream_unary" if handler.request_streaming else "unary_unary"
    inner: Callable[..., Awaitable[Any]] = getattr(handler, field)

    async def unary(request: Any, context: Any) -> Any:
        try:
            _principal.set(resolve(context))
        except _Refusal as refusal:
            await context.abort(refusal.code, refusal.message)
        try:
            return await inner(request, context)
        except grpc.aio.AbortError:
            _count_scope_refusal(context, on_refused)
            raise

    return handler._replace(**{field: unary})  # type: ignore[attr-defined,no-any-return]


def _count_scope_refusal(context: Any, on_refused: Callable[[str], None]) -> None:
    """The servicer refused the call: a tenant, lease or node outside the caller's scope?"""
    if context.code() == grpc.StatusCode.PERMISSION_DENIED:
        on_refused("scope")


def _ignore(reason: str) -> None:
    pass


class AccessGate(grpc.aio.ServerInterceptor):
    """The interceptor (module docstring). What it hands gRPC for a (token, method) is the same
    every time, so it is kept: a call whose token and method were seen before costs a lookup,
    not a hash of the token and a new handler (at most ``CACHED`` pairs; unknown tokens are not
    kept, so a caller trying tokens cannot fill it)."""

    CACHED = 4096
    LOG_EVERY_S = 10.0

    def __init__(self, access: Access, on_refused: Callable[[str], None] = _ignore) -> None:
        """``on_refused(reason)``, reason one of ``agentcg.access.REFUSALS``, counts each
        refusal (a metric)."""
        self._access = access
        self._on_refused = on_refused
        self._handlers: dict[tuple[str, str], Handler] = {}
        self._logged_at: dict[str, float] = {}  # refusal message -> when last logged
        self._unlogged: dict[str, int] = {}  # refusals not logged since

    def _log_refusal(self, message: str) -> None:
        """Log a refusal, the same one at most every LOG_EVERY_S with how many were not: a
        client retrying with a bad token does not flood the log (the metric counts each)."""
        now = time.monotonic()
        if now - self._logged_at.get(message, -self.LOG_EVERY_S) < self.LOG_EVERY_S:
            self._unlogged[message] = self._unlogged.get(message, 0) + 1
            return
        if len(self._logged_at) >= self.CACHED:
            self._logged_at.clear()
        self._logged_at[message] = now
        more = self._unlogged.pop(message, 0)
        log.warning("refused %s%s", message, f" (and {more} more like it)" if more else "")

    def _refusal(self, principal: Principal | None, method: str, unknown: str) -> _Refusal | None:
        """Why ``principal`` (None: not known, for the reason ``unknown``) may not call
        ``method``, logged and counted; None if it may."""
        if principal is None:
            message = f"{method}: {unknown}"
            code, reason = grpc.StatusCode.UNAUTHENTICATED, "unauthenticated"
        elif not principal.may_call(method):
            message = f"{principal.name} (role {principal.role.value}) may not call {method}"
            code, reason = grpc.StatusCode.PERMISSION_DENIED, "role"
        else:
            return None
        self._log_refusal(message)
        self._on_refused(reason)
        return _Refusal(code, message)

    def _by_certificate(self, context: Any, method: str) -> Principal:
        """The principal of the call's verified client certificate (a call without a token)."""
        auth = context.auth_context()
        names = [
            raw.decode(errors="replace")
            for key in ("x509_common_name", "x509_subject_alternative_name")
            for raw in auth.get(key, ())
        ]
        principal = self._access.identify(names)
        if names:
            unknown = f"no token, and no principal has the client certificate's names {names}"
        else:
            unknown = "no token (authorization: Bearer <token>) and no client certificate"
        refusal = self._refusal(principal, method, unknown)
        if refusal is not None:
            raise refusal
        assert principal is not None
        return principal

    def reload(self, access: Access) -> None:
        """Judge calls from now on by ``access`` (what was decided by the old file is dropped)."""
        self._access = access
        self._handlers = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        gated = self._handlers.get((token, method))
        if gated is not None:
            return gated
        if not token and self._access.by_cert_name:
            # Known (or not) by its client certificate, seen only inside the call.
            gated = _as(
                functools.partial(self._by_certificate, method=method), handler, self._on_refused
            )
        else:
            principal = self._access.authenticate(token) if token else None
            why = "an unknown token" if token else "no token (authorization: Bearer <token>)"
            refusal = self._refusal(principal, method, why)
            if refusal is not None:
                return _refusing(handler, refusal.code, refusal.message)
            assert principal is not None
            gated = _as(lambda _: principal, handler, self._on_refused)
        if len(self._handlers) < self.CACHED:
            self._handlers[(token, method)] = gated
        return gated


def reload_on_sighup(
    security: ServerSecurity,
    interceptors: list[grpc.aio.ServerInterceptor],
    certificates: ServerCertificates | None = None,
    *,
    then: Callable[[], object] | None = None,
) -> None:
    """From a composition root: SIGHUP reads the access file again and hands it to the gate in
    ``interceptors`` (tokens added or revoked take effect for the next call), and the TLS files
    (``certificates``: new connections get the new certificate and client CA). A file that
    does not load is logged and what was read before stays. ``then`` runs after (the node
    agent reconnects to the broker with its own credentials read again). With none of these,
    SIGHUP is ignored (its default would end the process)."""
    gates = [i for i in interceptors if isinstance(i, AccessGate)]

    def reload() -> None:
        if certificates is not None:
            certificates.reload()
        if gates:
            reload_access()
        if then is not None:
            then()

    def reload_access() -> None:
        try:
            access = security.load_access()
        except ServerSecurityError as exc:
            log.error("SIGHUP: access file not reloaded, the one read before stays: %s", exc)
            return
        assert access is not None
        for gate in gates:
            gate.reload(access)
        log.info(
            "SIGHUP: access file %s reloaded: %d principals",
            security.access,
            access.principals,
        )

    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)
    except (NotImplementedError, RuntimeError):
        pass  # not the main thread (a server started by a test): no signal handlers


class ServerSecurityError(ValueError):
    """A server's security flags or files are wrong; the message names the flag."""


def _read(flag: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ServerSecurityError(f"{flag} {path}: {exc.strerror}") from None


class ServerCertificates:
    """A server's TLS files: read at start, and again at ``reload`` (SIGHUP). gRPC asks for
    them before each new connection's handshake (``dynamic_ssl_server_credentials``): a
    reloaded certificate, key or client CA serves the connections made after the reload;
    those already open keep theirs. Rotating a certificate needs no restart."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        self._cert, self._key, self._client_ca = cert, key, client_ca
        self._initial = self._load()
        self._fresh: grpc.ServerCertificateConfiguration | None = None

    def _load(self) -> grpc.ServerCertificateConfiguration:
        ca = self._client_ca
        return grpc.ssl_server_certificate_configuration(
            [(_read("--tls-key", self._key), _read("--tls-cert", self._cert))],
            root_certificates=_read("--tls-client-ca", ca) if ca else None,
        )

    def reload(self) -> bool:
        """Read the files again for the next handshakes; False (logged) if one cannot be read:
        the ones read before stay. (A key that does not match its certificate shows only at
        the next handshake, which then fails.)"""
        try:
            self._fresh = self._load()
        except ServerSecurityError as exc:
            log.error("TLS files not reloaded, the ones read before stay: %s", exc)
            return False
        log.info("TLS files %s, %s reloaded", self._cert, self._key)
        return True

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's callback, before each handshake: the reloaded files once, then None (keep)."""
        fresh, self._fresh = self._fresh, None
        return fresh

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial,
            self._fetch,  # type: ignore[arg-type]  # the stubs omit None (keep the current)
            require_client_authentication=self._client_ca is not None,
        )


@dataclass(frozen=True)
class ServerSecurity:
    access: Path | None = None  # the access file (agentcg.access); None: every caller is OPEN
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key: serve TLS
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # require client certificates signed by this CA (mTLS)

    def load_access(self) -> Access | None:
        if self.access is None:
            return None
        try:
            access = parse_access(self.access.read_text())
        except OSError as exc:
            raise ServerSecurityError(f"--access {self.access}: {exc.strerror}") from None
        except AccessFileError as exc:
            raise ServerSecurityError(f"--access {self.access}: {exc}") from None
        if access.by_cert_name and self.tls_client_ca is None:
            who = sorted({p.name for p in access.by_cert_name.values()})[0]
            raise ServerSecurityError(
                f"--access {self.access}: {who} is known by its client certificate "
                "(cert_names): that needs --tls-client-ca (mutual TLS)"
            )
        return access

    def check(self) -> None:
        """Read every file now: raise ServerSecurityError naming the flag of a bad one."""
        self.load_access()
        self.certificates()

    def interceptors(
        self, on_refused: Callable[[str], None] = _ignore
    ) -> list[grpc.aio.ServerInterceptor]:
        """The access gate if there is an access file (read now), else nothing."""
        access = self.load_access()
        return [] if access is None else [AccessGate(access, on_refused)]

    def certificates(self) -> ServerCertificates | None:
        """The TLS files (read now), or None to serve plaintext."""
        if self.tls_cert is None and self.tls_key is None:
            if self.tls_client_ca is not None:
                raise ServerSecurityError("--tls-client-ca needs --tls-cert and --tls-key")
            return None
        if self.tls_cert is None or self.tls_key is None:
            raise ServerSecurityError("--tls-cert and --tls-key go together")
        return ServerCertificates(self.tls_cert, self.tls_key, self.tls_client_ca)

    @staticmethod
    def bind(server: grpc.aio.Server, listen: str, certificates: ServerCertificates | None) -> int:
        """Add the listener (TLS with ``certificates``); the port bound, 0 if it could not be."""
        if certificates is None:
            return server.add_insecure_port(listen)
        return server.add_secure_port(listen, certificates.credentials())

    def describe(self) -> str:
        tls = "mutual TLS" if self.tls_client_ca else "TLS" if self.tls_cert else "plaintext"
        return f"{tls}, {'access file ' + str(self.access) if self.access else 'open to all'}"
