"""Channels to agentcg servers: the broker's options for one address or every replica of a
broker (``ipv4:A:port,B:port``; one serves, the others stand by, broker/leadership.py), and
how a client proves who it is (``ClientSecurity``: TLS, a client certificate, a bearer token).
Used by the SDK (and so the CLI) and by the node agent's uplink."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

__all__ = [
    "ClientSecurity",
    "broker_channel_options",
    "broker_interceptors",
    "node_channel_options",
]

RECONNECT_BACKOFF_MS = (100, 500)  # (first and least, most)

# Calls that give the same result when sent twice: with several brokers one that fails with
# UNAVAILABLE (the leader died with it in flight) is sent again, to the new leader; with one,
# once it is back from a restart (``broker_interceptors``). A Reserve
# is one of them because the SDK sends every Reserve with an idempotency key (sdk.reserve):
# sent again it returns the lease the first attempt got if that one was committed. Not
# DeleteTenant (sent again: NOT_FOUND) nor the node's Connect stream (it reconnects itself).
RESENT = {
    "agentcg.v1.Broker": (
        "Reserve",
        "ReserveBatch",
        "Release",
        "ReleaseBatch",
        "Renew",
        "GetLease",
        "ListLeases",
        "Ping",
        "WhoAmI",
    ),
    "agentcg.v1.TenantAdmin": ("SetTenant", "GetTenant", "ListTenants"),
    "agentcg.v1.NodeAdmin": ("ListNodes", "GetNode", "CordonNode", "UncordonNode"),
    "agentcg.v1.AuditLog": ("ListAudit",),
    # Forgetting twice: the same.
    "agentcg.v1.Sizing": ("ListProfiles", "ForgetProfile", "ForgetSessionProfile"),
}
RESEND_POLICY = {
    "maxAttempts": 5,  # gRPC's cap
    "initialBackoff": "0.1s",
    "maxBackoff": "0.5s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def broker_channel_options(broker: str) -> list[tuple[str, Any]]:
    """gRPC channel options for the broker target ``broker``.

    A target naming several brokers (``ipv4:A:port,B:port``: replicas of which one serves and
    the others stand by without listening, see broker/leadership.py) gets, through gRPC's
    service config:

    - ``waitForReady``: a call made while the leader is being replaced waits, within its
      deadline, for the new one to listen instead of failing at once with UNAVAILABLE;
    - a ``retryPolicy`` for the calls in ``RESENT``: one that fails with UNAVAILABLE (in flight
      when the leader died) is sent again, up to 5 attempts within its deadline.

    A single address keeps failing fast while nothing listens (a wrong address is an error at
    once, not at the deadline); ``broker_interceptors`` rides through its restarts instead.
    Either way the channel tries to connect again every 0.1-0.5 s."""
    # gRPC's reconnect backoff starts at 1 s and grows 1.6x: a client then saw the new leader
    # up to ~1.3 s after it served (`agentcg bench failover`). Retry connecting sooner.
    options = _fast_reconnect()
    if "," not in broker:
        return options
    resent = [{"service": s, "method": m} for s, methods in RESENT.items() for m in methods]
    config = {
        "methodConfig": [
            {"name": [{}], "waitForReady": True},
            {"name": resent, "waitForReady": True, "retryPolicy": RESEND_POLICY},
        ]
    }
    return [("grpc.service_config", json.dumps(config)), *options]


def node_channel_options() -> list[tuple[str, Any]]:
    """gRPC channel options for a node agent: connect again every 0.1-0.5 s (a caller following
    a call resumes it as soon as a restarted agent listens)."""
    return _fast_reconnect()


def _fast_reconnect() -> list[tuple[str, Any]]:
    return [
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
        ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
    ]


def broker_interceptors(broker: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors for the broker target ``broker``: with a single address, one that
    rides through a restart of the broker (``_ResendOnceReached``); none with several (their
    service config waits and resends, ``broker_channel_options``)."""
    return [] if "," in broker else [_ResendOnceReached()]


_RESENT_PATHS = frozenset(f"/{s}/{m}" for s, methods in RESENT.items() for m in methods)
# Codes a call can end with while no broker ever answered it.
_NO_ANSWER = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)


class _ResendOnceReached(grpc.aio.UnaryUnaryClientInterceptor):
    """A call in ``RESENT`` that fails with UNAVAILABLE on a channel that has reached the
    broker before is sent again once, waiting for the broker (``wait_for_ready``) within what
    is left of its deadline: the broker is restarting (an upgrade, systemd's Restart=, a
    crash), its calls ride through. If the broker is not back by the deadline the caller gets
    the first UNAVAILABLE. Until a call has had any answer the channel keeps failing fast: a
    wrong address, or a broker not started, is an error at once."""

    def __init__(self) -> None:
        self.reached = False

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        started = time.monotonic()
        call = await continuation(details, request)
        code = await call.code()
        if code not in _NO_ANSWER:
            self.reached = True
        if code != grpc.StatusCode.UNAVAILABLE:
            return call
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        if not self.reached or details.wait_for_ready or method not in _RESENT_PATHS:
            return call
        left_s = None if details.timeout is None else details.timeout - (time.monotonic() - started)
        if left_s is not None and left_s <= 0:
            return call
        again = await continuation(details._replace(timeout=left_s, wait_for_ready=True), request)
        if await again.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return call  # not back in time: what the caller should hear is that it was down
        return again


class _Bearer:
    """Adds ``authorization: Bearer <token>`` to a call's metadata. grpc.aio files each
    interceptor under one kind of call only: one subclass per kind (``_bearer``)."""

    def __init__(self, token: str) -> None:
        self._entry = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._entry)
        return details._replace(metadata=metadata)  # type: ignore[attr-defined,no-any-return]


class _BearerUnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerUnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerStreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _BearerStreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def _bearer(token: str) -> list[grpc.aio.ClientInterceptor]:
    kinds = (_BearerUnaryUnary, _BearerUnaryStream, _BearerStreamUnary, _BearerStreamStream)
    return [kind(token) for kind in kinds]


@dataclass(frozen=True)
class ClientSecurity:
    """How a client connects: plaintext (the default) or TLS, and with which credentials.

    - ``ca``: PEM file of the CA that signed the server's certificate; with it (or with a
      client certificate) the channel is TLS. ``server_name`` overrides the name checked
      against the certificate (when the address is an IP the certificate does not name).
    - ``cert`` and ``key``: the client's certificate and key, for a server that requires them
      (mutual TLS).
    - ``token``: sent as ``authorization: Bearer <token>`` on every call, for a server with an
      access file (agentcg.access); or ``token_file``, a file holding it, read each time a
      channel is made (a long-lived client, the node agent, makes a new one at SIGHUP: the
      token rotates without a restart). Files are read when a channel is made, not before.
    """

    token: str = ""
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str = ""
    token_file: Path | None = None

    ENV = {
        "token": "AGENTCG_TOKEN",
        "ca": "AGENTCG_TLS_CA",
        "cert": "AGENTCG_TLS_CERT",
        "key": "AGENTCG_TLS_KEY",
        "server_name": "AGENTCG_TLS_SERVER_NAME",
    }

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientSecurity:
        """Read from ``AGENTCG_TOKEN`` (or the file ``AGENTCG_TOKEN_FILE`` names),
        ``AGENTCG_TLS_CA``, ``AGENTCG_TLS_CERT``, ``AGENTCG_TLS_KEY`` and
        ``AGENTCG_TLS_SERVER_NAME`` (all unset: plaintext, no token)."""
        env = os.environ if environ is None else environ

        def path(name: str) -> Path | None:
            value = env.get(cls.ENV[name], "")
            return Path(value) if value else None

        token = env.get(cls.ENV["token"], "")
        # A file keeps the token out of the environment of children, and can be rotated.
        token_file = env.get("AGENTCG_TOKEN_FILE", "")
        return cls(
            token=token,
            ca=path("ca"),
            cert=path("cert"),
            key=path("key"),
            server_name=env.get(cls.ENV["server_name"], ""),
            token_file=Path(token_file) if token_file and not token else None,
        )

    def bearer(self) -> str:
        """The token to send now: ``token``, or what ``token_file`` holds ("" for none)."""
        if self.token or self.token_file is None:
            return self.token
        return self.token_file.read_text().strip()

    def files_version(self) -> tuple[int, ...]:
        """When the files (token file, CA, certificate, key) last changed (-1: none there): a
        client whose version changed makes its channels anew (a renewed certificate)."""
        out: list[int] = []
        for path in (self.token_file, self.ca, self.cert, self.key):
            try:
                out.append(path.stat().st_mtime_ns if path is not None else -1)
            except OSError:
                out.append(-1)
        return tuple(out)

    @property
    def tls(self) -> bool:
        return self.ca is not None or self.cert is not None

    def credentials(self) -> grpc.ChannelCredentials:
        """TLS channel credentials from the files (read now: a missing file fails here)."""
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes() if self.ca else None,
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )

    def aio_channel(
        self,
        target: str,
        options: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> grpc.aio.Channel:
        """A grpc.aio channel to ``target`` with these credentials."""
        # The token goes in by an interceptor, over TLS too: gRPC's own call credentials
        # (access_token_call_credentials) cost the broker ~35% more CPU per Reserve+Release
        # pair (`agentcg bench access`: 1,172-1,314 against 906-968 us).
        token = self.bearer()
        chain = [*interceptors, *_bearer(token)] if token else list(interceptors)
        opts = list(options)
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        if self.tls:
            return grpc.aio.secure_channel(
                target, self.credentials(), options=opts, interceptors=chain or None
            )
        return grpc.aio.insecure_channel(target, options=opts, interceptors=chain or None)
