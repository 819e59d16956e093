"""A TLS + SASL/SCRAM front for the embedded broker (tansu speaks neither): the gateway
terminates TLS, runs the SCRAM exchange itself (shared/scram.py), and only then pipes the
client's bytes to the broker and back. Before authentication it forwards ApiVersions (clients ask
it first) and answers SaslHandshake / SaslAuthenticate; any other request closes the connection.

The broker is started with the gateway's address as its advertised listener, so its Metadata
responses send clients back through the gateway: nothing in the responses is rewritten.

Production does not use this: Apache Kafka terminates TLS and SCRAM itself (docs/security.md).

    python -m flashrecovery.shared.kafka_gateway --listen 127.0.0.1:9093 --upstream 127.0.0.1:9092 \\
        --certfile server.pem --keyfile server.key --users users.json
    python -m flashrecovery.shared.kafka_gateway add-users users.json detector=pw1 planner=pw2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import signal
import ssl
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from . import kafka_wire as W
from .logging import configure, get_logger
from .scram import (
    MECHANISMS,
    Mechanism,
    ScramCredential,
    ScramError,
    ScramServer,
    Users,
    load_users_file,
    write_users_file,
)

# A request before authentication is small (ApiVersions, SASL tokens): a larger frame is an
# attack on memory, not a client.
MAX_UNAUTHENTICATED_FRAME = 64 * 1024
# Time a client has for each step before it is authenticated (a slow client holds no socket
# forever).
STEP_TIMEOUT_S = 10.0
# What the client is told on any refusal: the same words for a wrong password and an unknown user.
REFUSED = "Authentication failed: invalid credentials with SASL mechanism {}"


class Refused(Exception):
    """The connection is refused: the message says why (logged, not told to the client)."""


@dataclass
class Gateway:
    upstream: tuple[str, int]
    ssl_context: ssl.SSLContext | None
    users: Users
    # made when the gateway is, after logging is configured (a logger bound earlier keeps the
    # default console set-up)
    log: structlog.stdlib.BoundLogger = field(default_factory=lambda: get_logger("kafka-gateway"))

    async def serve(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(
            self._client,
            host,
            port,
            ssl=self.ssl_context,
            ssl_handshake_timeout=STEP_TIMEOUT_S if self.ssl_context else None,
        )

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        peer_s = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        up: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            up = await self._authenticate(reader, writer, peer_s)
            if up is None:
                up = await asyncio.open_connection(*self.upstream)
            await _pipe(reader, writer, *up)
        except (Refused, W.WireError) as exc:
            self.log.warning("kafka_auth", outcome="refused", peer=peer_s, reason=str(exc))
        except (_Closed, OSError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the client or the broker went away: nothing to decide
        finally:
            for w in (writer, up[1] if up else None):
                if w is not None:
                    w.close()
                    with contextlib.suppress(Exception):
                        await w.wait_closed()

    async def _authenticate(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """Serve requests until SCRAM succeeds -> the broker connection if one was opened for
        ApiVersions. Raises Refused (or _Closed, already answered and logged) otherwise."""
        up: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        mechanism: str | None = None
        scram: ScramServer | None = None
        while True:
            frame = await asyncio.wait_for(_read_frame(reader, MAX_UNAUTHENTICATED_FRAME), STEP_TIMEOUT_S)
            head = W.parse_request_header(frame)
            if head.api_key == W.API_VERSIONS:
                if up is None:
                    up = await asyncio.open_connection(*self.upstream)
                up[1].write(W.frame(frame))
                reply = await asyncio.wait_for(_read_frame(up[0], 1 << 20), STEP_TIMEOUT_S)
                writer.write(W.frame(W.with_sasl_apis(reply, head.api_version)))
            elif head.api_key == W.SASL_HANDSHAKE:
                asked = W.handshake_mechanism(frame, head)
                lo, hi = W.HANDSHAKE_VERSIONS
                error = (
                    W.UNSUPPORTED_VERSION
                    if not lo <= head.api_version <= hi
                    else W.NONE
                    if asked in MECHANISMS
                    else W.UNSUPPORTED_SASL_MECHANISM
                )
                writer.write(W.handshake_response(head.correlation_id, error, MECHANISMS))
                await writer.drain()
                if error:
                    raise Refused(f"SaslHandshake v{head.api_version} for {asked!r}: error {error}")
                mechanism = asked
            elif head.api_key == W.SASL_AUTHENTICATE and mechanism is not None:
                lo, hi = W.AUTHENTICATE_VERSIONS
                if not lo <= head.api_version <= hi:
                    raise Refused(f"SaslAuthenticate v{head.api_version} not supported")
                token = W.authenticate_bytes(frame, head)
                try:
                    if scram is None:
                        mech = next(m for m in MECHANISMS if m == mechanism)
                        scram = ScramServer(mech, _lookup(self.users, mech), secrets.token_urlsafe(24))
                        reply_bytes = scram.first(token)
                    else:
                        reply_bytes = scram.final(token)
                except ScramError as exc:
                    writer.write(
                        W.authenticate_response(head, W.SASL_AUTHENTICATION_FAILED, REFUSED.format(mechanism), b"")
                    )
                    await writer.drain()
                    self.log.warning(
                        "kafka_auth",
                        outcome="refused",
                        principal=scram.user if scram else None,
                        mechanism=mechanism,
                        peer=peer,
                        reason=str(exc),
                    )
                    raise _Closed from None
                writer.write(W.authenticate_response(head, W.NONE, None, reply_bytes))
                await writer.drain()
                if scram.done:
                    self.log.info("kafka_auth", outcome="ok", principal=scram.user, mechanism=mechanism, peer=peer)
                    return up
            else:
                what = "SaslAuthenticate before SaslHandshake" if head.api_key == W.SASL_AUTHENTICATE else ""
                raise Refused(what or f"unauthenticated request (api_key {head.api_key}) before SASL")
            await writer.drain()


def _lookup(users: Users, mech: Mechanism) -> Callable[[str], ScramCredential | None]:
    def find(user: str) -> ScramCredential | None:
        return users.get(user, {}).get(mech)

    return find


class _Closed(Exception):
    """Already answered and logged: just close."""


async def _read_frame(reader: asyncio.StreamReader, limit: int) -> bytes:
    (n,) = struct.unpack(">i", await reader.readexactly(4))
    if not 0 < n <= limit:
        raise W.WireError(f"frame of {n} bytes")
    return await reader.readexactly(n)


async def _copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    while data := await src.read(1 << 16):
        dst.write(data)
        await dst.drain()


async def _pipe(
    c_reader: asyncio.StreamReader,
    c_writer: asyncio.StreamWriter,
    u_reader: asyncio.StreamReader,
    u_writer: asyncio.StreamWriter,
) -> None:
    """Both directions until either side closes."""
    tasks = [asyncio.create_task(_copy(c_reader, u_writer)), asyncio.create_task(_copy(u_reader, c_writer))]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if not t.cancelled() and (exc := t.exception()) is not None and not isinstance(exc, OSError):
                raise exc
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def server_ssl_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    return ctx


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


async def _serve(args: argparse.Namespace) -> None:
    ctx = server_ssl_context(args.certfile, args.keyfile) if args.certfile else None
    gw = Gateway(_hostport(args.upstream), ctx, load_users_file(args.users))
    host, port = _hostport(args.listen)
    server = await gw.serve(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gw.log.info(
        "kafka_gateway_listening",
        listen=f"{host}:{port}",
        upstream=args.upstream,
        tls=ctx is not None,
        users=len(gw.users),
    )
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["add-users"]:
        p = argparse.ArgumentParser(prog="kafka_gateway add-users", description="write a SCRAM users file")
        p.add_argument("path")
        p.add_argument("pairs", nargs="+", metavar="USER=PASSWORD")
        a = p.parse_args(argv[1:])
        write_users_file(a.path, dict(pair.split("=", 1) for pair in a.pairs))
        return 0
    p = argparse.ArgumentParser(prog="kafka_gateway", description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", required=True, help="HOST:PORT clients connect to")
    p.add_argument("--upstream", required=True, help="HOST:PORT of the broker (never told to clients)")
    p.add_argument("--certfile", default=None, help="server certificate (PEM); without it: SASL_PLAINTEXT")
    p.add_argument("--keyfile", default=None)
    p.add_argument("--users", required=True, help="SCRAM users file (shared/scram.py)")
    p.add_argument("--log-format", default="json", choices=["json", "console"])
    a = p.parse_args(argv)
    if bool(a.certfile) != bool(a.keyfile):
        p.error("--certfile and --keyfile go together")
    configure(a.log_format)
    asyncio.run(_serve(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
