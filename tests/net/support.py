"""For the outbound policy tests: real HTTP(S) servers on loopback addresses, their certificates, a stub resolver."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from typing import Any

import anyio
import anyio.abc
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSListener
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bastion.net.outbound import IPAddress

MAX_REQUEST_HEAD_BYTES = 16 * 1024


@dataclass(frozen=True)
class Tls:
    """A CA and a server certificate it signed for ``names`` (DNS names only: no IP address is in it)."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def client_context(self) -> ssl.SSLContext:
        """What a client trusts: this CA only."""
        return ssl.create_default_context(cadata=self.ca_pem.decode("ascii"))


def make_tls(*names: str) -> Tls:
    """A throwaway CA and a certificate for ``names`` signed by it."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bastion test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return Tls(
        ca_pem=ca.public_bytes(serialization.Encoding.PEM),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


@dataclass(frozen=True)
class Seen:
    """One request as the server received it."""

    path: str
    host_header: str
    sni: str | None
    authorization: str | None = None


Route = Callable[[str], tuple[int, dict[str, str]]]
"""``path -> (status, headers)``; every response body is ``ok``."""


@dataclass
class LocalServer:
    """A server's port and every request it answered."""

    port: int = 0
    seen: list[Seen] = field(default_factory=list[Seen])


async def _answer(stream: anyio.abc.ByteStream, route: Route, server: LocalServer, sni: str | None) -> None:
    head = b""
    with anyio.fail_after(5):
        while b"\r\n\r\n" not in head and len(head) < MAX_REQUEST_HEAD_BYTES:
            head += await stream.receive()
    lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    path = lines[0].split(" ")[1]
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    server.seen.append(Seen(path, headers.get("host", ""), sni, headers.get("authorization")))
    status, extra = route(path)
    response = f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\nConnection: close\r\n"
    response += "".join(f"{k}: {v}\r\n" for k, v in extra.items()) + "\r\nok"
    await stream.send(response.encode("latin-1"))
    await stream.aclose()


@contextlib.asynccontextmanager
async def serve(
    address: str, route: Route, *, tls: Tls | None = None, tmp: str | None = None, port: int = 0
) -> AsyncIterator[LocalServer]:
    """An HTTP (or, with ``tls``, HTTPS) server on ``address``; stops when the block ends."""
    server = LocalServer()
    tcp = await anyio.create_tcp_listener(local_host=address, local_port=port)
    server.port = tcp.extra(SocketAttribute.local_port)  # noqa: S610  anyio typed attribute, not Django
    snis: list[str | None] = []
    listener: anyio.abc.Listener[Any] = tcp
    if tls is not None:
        assert tmp is not None
        cert_file, key_file = f"{tmp}/cert-{server.port}.pem", f"{tmp}/key-{server.port}.pem"
        await anyio.Path(cert_file).write_bytes(tls.cert_pem)
        await anyio.Path(key_file).write_bytes(tls.key_pem)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_file, key_file)

        def remember_sni(_socket: ssl.SSLObject, name: str | None, _context: ssl.SSLContext) -> None:
            snis.append(name)

        context.sni_callback = remember_sni  # type: ignore[assignment]
        listener = TLSListener(tcp, context, standard_compatible=False)

    async def handle(stream: anyio.abc.ByteStream) -> None:
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, ssl.SSLError, OSError):
            await _answer(stream, route, server, snis[-1] if snis else None)

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        try:
            yield server
        finally:
            tg.cancel_scope.cancel()


class StubResolver:
    """Answers from a script, one answer per lookup (the last one repeats); counts the lookups."""

    def __init__(self, **answers: list[list[str]]) -> None:
        self.answers = {name.replace("_", "."): script for name, script in answers.items()}
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> list[IPAddress]:
        self.lookups.append(host)
        script = self.answers.get(host)
        if script is None:
            raise OSError(f"stub: no such host {host}")
        answer = script[min(self.lookups.count(host), len(script)) - 1]
        return [ip_address(a) for a in answer]
