"""Outbound URL policy (SSRF defence): which URLs Bastion may fetch on someone's behalf, and a client that obeys it.

Two checks, and both are needed:

- ``check_url`` reads the URL alone: https only (http only to loopback, when tests or development opt in), no
  userinfo, a sane port, and a host that is not an internal address in any spelling (decimal ``2130706433``,
  octal ``0177.0.0.1``, hex ``0x7f.1``, short ``127.1``, IPv6 with an IPv4 address inside).
- ``client()`` connections resolve the host once, check every address it resolves to, and connect to a checked
  address (DNS pinning): a name that resolves, or re-resolves, to an internal address is refused too. The
  Host header, TLS SNI and certificate verification still use the hostname.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv6Address, ip_address, ip_network
from typing import TYPE_CHECKING, Any, ClassVar, Final, cast

import anyio
import httpcore2
import httpx2

from bastion.errors import ValidationFailed
from bastion.net import addresses
from bastion.net.addresses import IPAddress, IPNetwork

if TYPE_CHECKING:
    from bastion.settings import Settings

Resolver = Callable[[str, int], Awaitable[Sequence[IPAddress]]]
"""``(host, port) -> addresses``; the system resolver by default, a stub in tests."""

MAX_URL_CHARS: Final = 8192
_LOOPBACK_SETTING: Final = "BASTION_OUTBOUND_ALLOW_LOOPBACK"
_NETWORKS_SETTING: Final = "BASTION_OUTBOUND_ALLOWED_NETWORKS"


class UrlRefused(ValidationFailed):
    """The outbound policy refused a URL or the address it resolves to; ``rule`` names the rule."""

    code: ClassVar[str] = "url_refused"
    title: ClassVar[str] = "URL refused by the outbound policy"

    def __init__(self, reason: str, *, rule: str, field: str | None = None) -> None:
        super().__init__(f"refused by the outbound URL policy: {reason}", field=field)
        self.reason: Final = reason
        self.rule: Final = rule


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to, looked up off the event loop (anyio runs getaddrinfo in a thread).

    Raises:
        OSError: the name does not resolve.
    """
    try:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except UnicodeError as exc:  # a name IDNA 2008 refuses
        raise OSError(f"cannot resolve {host!r}: {exc}") from None
    # IPv6 scope ids ("fe80::1%eth0") are dropped: the address alone decides.
    return list(dict.fromkeys(ip_address(str(info[4][0]).partition("%")[0]) for info in infos))


@dataclass(frozen=True, slots=True)
class OutboundPolicy:
    """Which hosts Bastion may reach; strict by default.

    Args:
        allow_loopback: tests and local development only: http:// and loopback addresses are allowed.
        allowed_networks: networks an admin trusts (internal upstreams); they are allowed even if private.
        resolver: how hostnames become addresses; injectable for tests.
    """

    allow_loopback: bool = False
    allowed_networks: tuple[IPNetwork, ...] = ()
    resolver: Resolver = field(default=system_resolver, repr=False, compare=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> OutboundPolicy:
        """The policy ``BASTION_OUTBOUND_*`` settings describe (their CIDRs were validated with the settings)."""
        return cls(
            allow_loopback=settings.outbound_allow_loopback,
            allowed_networks=tuple(ip_network(cidr) for cidr in settings.outbound_allowed_networks),
        )

    def check_url(self, url: str, *, field: str | None = None) -> str:
        """``url`` unchanged if the URL alone passes the policy (the address it resolves to is checked on connect).

        Raises:
            UrlRefused: naming the rule the URL breaks (and ``field``, the input it came from, if given).
        """
        try:
            return self._check_url(url)
        except UrlRefused as exc:
            if field is None:
                raise
            raise UrlRefused(exc.reason, rule=exc.rule, field=field) from None

    def _check_url(self, url: str) -> str:
        if len(url) > MAX_URL_CHARS or any(ord(ch) <= 0x20 or ch in "\x7f\\" for ch in url):
            raise UrlRefused(
                f"a URL must be at most {MAX_URL_CHARS} characters without spaces, control characters or backslashes",
                rule="syntax",
            )
        try:
            # The client's own parser: what is checked is what will be connected to.
            parsed = httpx2.URL(url)
            port = parsed.port
        except (httpx2.InvalidURL, ValueError, TypeError):
            raise UrlRefused("not a valid URL", rule="syntax") from None
        scheme = parsed.scheme
        if scheme not in ("https", "http"):
            raise UrlRefused(f"scheme {scheme or '(none)'!r} is not allowed; use https", rule="scheme")
        if parsed.userinfo:
            raise UrlRefused("a URL must not carry a user name or password", rule="userinfo")
        if port is not None and not 0 < port < 65536:
            raise UrlRefused(f"port {port} is not valid", rule="port")
        host = parsed.raw_host.decode("ascii", "replace").lower()
        literal = self._check_host(host)
        loopback = addresses.is_loopback_name(host) if literal is None else addresses.is_loopback(literal)
        if scheme == "http" and not (self.allow_loopback and loopback):
            raise UrlRefused(
                f"http is allowed only to loopback, with {_LOOPBACK_SETTING} (tests and development); use https",
                rule="scheme",
            )
        return url

    def check_address(self, address: IPAddress, *, host: str | None = None) -> None:
        """Refuse an address the policy does not allow (``host`` names it in the message).

        Raises:
            UrlRefused: naming the address, the rule and how an admin could allow it.
        """
        refusal = self._refusal(address)
        if refusal is None:
            return
        rule, what = refusal
        named = f"host {host!r} resolves to {address}, which" if host and host != str(address) else f"{address}"
        hint = (
            f"set {_LOOPBACK_SETTING}=true for tests and development"
            if rule == addresses.LOOPBACK
            else f"an admin may allow its network with {_NETWORKS_SETTING}"
        )
        raise UrlRefused(f"{named} is {what} ({hint})", rule=rule)

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """Every address of ``host``, each checked; an IP literal is not looked up.

        Raises:
            UrlRefused: any address is refused (one bad answer refuses them all: a resolver that mixes a public
                and an internal answer is not trusted with either).
            OSError: the name does not resolve.
        """
        host = host.lower()
        literal = self._check_host(host)
        found = [literal] if literal is not None else list(await self.resolver(host.rstrip("."), port))
        if not found:
            raise OSError(f"{host!r} resolved to no address")
        for address in found:
            self.check_address(address, host=host)
        return found

    async def resolve_url(self, url: str) -> list[IPAddress]:
        """Check ``url`` and every address its host resolves to now: a clear error before a connection is tried.

        Connections made by ``client()`` check again (the answer may change); this only refuses early.

        Raises:
            UrlRefused: the URL or an address is refused.
            OSError: the host does not resolve.
        """
        parsed = httpx2.URL(self.check_url(url))
        return await self.resolve(
            parsed.raw_host.decode("ascii"), parsed.port or (443 if parsed.scheme == "https" else 80)
        )

    def transport(self, *, ssl_context: ssl.SSLContext | None = None) -> httpx2.AsyncBaseTransport:
        """An httpx2 transport whose every request and connection passes this policy."""
        return PolicyTransport(self, ssl_context=ssl_context)

    def client(
        self,
        *,
        timeout: float | httpx2.Timeout = 10.0,
        headers: Mapping[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> httpx2.AsyncClient:
        """An HTTP client that checks each request's URL and pins each connection to a checked address.

        Redirects are not followed (use ``fetch`` to follow them hop by hop), and proxy settings from the
        environment are ignored: a proxy would connect to a host the policy never saw.
        """
        return httpx2.AsyncClient(
            transport=self.transport(ssl_context=ssl_context),
            timeout=timeout,
            headers=dict(headers or {}),
            follow_redirects=False,
            trust_env=False,
        )

    def _check_host(self, host: str) -> IPAddress | None:
        """The IP address ``host`` spells (checked), or None for a name; refuse hosts that are neither."""
        if not host:
            raise UrlRefused("a URL must name a host", rule="syntax")
        if "%" in host or "[" in host or "]" in host:
            raise UrlRefused("a host must not be percent-encoded or carry an IPv6 zone", rule="syntax")
        name = host[:-1] if host.endswith(".") else host
        if ":" not in name and "" in name.split("."):
            raise UrlRefused(f"host {host!r} has an empty label", rule="syntax")
        if ":" in name:
            try:
                literal: IPAddress | None = IPv6Address(name)
            except ValueError:
                raise UrlRefused(f"{host!r} is not a valid IPv6 address", rule="syntax") from None
        else:
            try:
                literal = addresses.ipv4_literal(name)
            except ValueError:
                raise UrlRefused(f"{host!r} is neither a hostname nor a valid IPv4 address", rule="syntax") from None
        if literal is not None:
            self.check_address(literal)
        elif addresses.is_loopback_name(name) and not self.allow_loopback:
            raise UrlRefused(
                f"host {host!r} is a loopback name (set {_LOOPBACK_SETTING}=true for tests and development)",
                rule=addresses.LOOPBACK,
            )
        return literal

    def _refusal(self, address: IPAddress) -> tuple[str, str] | None:
        return addresses.refusal(address, allow_loopback=self.allow_loopback, allowed=self.allowed_networks)


class _PinnedBackend(httpcore2.AsyncNetworkBackend):
    """Resolves once, checks every address, then connects to a checked one (never resolving again)."""

    def __init__(self, policy: OutboundPolicy) -> None:
        self._policy = policy
        # httpcore2 declares AnyIOBackend conditionally (on anyio being installed, which it is: we import it).
        self._inner = cast(httpcore2.AsyncNetworkBackend, httpcore2.AnyIOBackend())

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109  httpcore's backend interface
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        try:
            with anyio.fail_after(timeout):
                checked = await self._policy.resolve(host, port)
        except TimeoutError:
            raise httpcore2.ConnectTimeout(f"resolving {host!r} timed out") from None
        except OSError as exc:
            raise httpcore2.ConnectError(str(exc)) from None
        failure: httpcore2.ConnectError | httpcore2.ConnectTimeout | None = None
        for address in checked:
            try:
                # TLS is started afterwards by the connection with server_hostname=host: SNI and the certificate
                # check still name the host, while the socket goes to the address checked above.
                return await self._inner.connect_tcp(
                    str(address), port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore2.ConnectError, httpcore2.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None  # noqa: S101  resolve() never returns an empty list
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109  httpcore's backend interface
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        raise UrlRefused("unix sockets are not reachable through the outbound policy", rule="scheme")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class PolicyTransport(httpx2.AsyncHTTPTransport):
    """httpx2's transport with a connection pool whose connections go through ``_PinnedBackend``."""

    def __init__(self, policy: OutboundPolicy, *, ssl_context: ssl.SSLContext | None = None) -> None:
        context = ssl_context or httpx2.create_ssl_context(trust_env=False)
        super().__init__(verify=context, trust_env=False)
        self._policy = policy
        self._pool = httpcore2.AsyncConnectionPool(ssl_context=context, network_backend=_PinnedBackend(policy))

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        self._policy.check_url(str(request.url))
        response = await super().handle_async_request(request)
        response.stream = _ReadToEndOnClose(cast(httpx2.AsyncByteStream, response.stream))
        return response


# How long, and how much, a response closed before its end is still read so that its connection stays open.
CLOSE_DRAIN_S: Final = 0.05
CLOSE_DRAIN_BYTES: Final = 64 * 1024


class _ReadToEndOnClose(httpx2.AsyncByteStream):
    """A response body that, closed before its end, is first read to its end (briefly, and not much of it).

    An MCP client closes an SSE answer as soon as its JSON-RPC response has arrived, a few bytes before the
    stream's end: the connection would be dropped, and every call would open a new one. Read to the end, the
    connection goes back to the pool. A body that does not end at once is not waited for: it is closed as before.
    """

    def __init__(self, inner: httpx2.AsyncByteStream) -> None:
        self._inner = inner
        self._chunks: AsyncIterator[bytes] | None = None
        self._ended = False

    def _iterator(self) -> AsyncIterator[bytes]:
        if self._chunks is None:
            self._chunks = aiter(self._inner)
        return self._chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunks = self._iterator()
        while True:
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                self._ended = True
                return
            yield chunk

    async def aclose(self) -> None:
        try:
            if not self._ended and self._chunks is not None:
                read = 0
                # A failure here is not the caller's: it closed a body it was done with (the connection goes).
                with anyio.move_on_after(CLOSE_DRAIN_S), contextlib.suppress(httpx2.HTTPError, RuntimeError, OSError):
                    while read < CLOSE_DRAIN_BYTES:
                        try:
                            read += len(await anext(self._chunks))
                        except StopAsyncIteration:
                            self._ended = True
                            break
        finally:
            try:
                if self._chunks is not None and hasattr(self._chunks, "aclose"):
                    with contextlib.suppress(httpx2.HTTPError, RuntimeError, OSError):
                        await cast(AsyncGenerator[bytes], self._chunks).aclose()
            finally:
                await self._inner.aclose()


async def fetch(
    client: httpx2.AsyncClient,
    policy: OutboundPolicy,
    method: str,
    url: str,
    *,
    max_redirects: int = 0,
    auth: httpx2.Auth | None = None,
    **kwargs: Any,
) -> httpx2.Response:
    """Send a request, following at most ``max_redirects`` redirects, each hop checked by ``policy``.

    ``client`` should come from ``policy.client()`` (which also pins connections). ``kwargs`` are
    ``httpx2.AsyncClient.build_request`` arguments (``headers``, ``json``, ``data``, ``timeout``...). Redirects
    change the method and drop credentials across origins as httpx2 does; ``auth`` applies to the first hop only.

    Raises:
        UrlRefused: the URL or a redirect target is refused, or a redirect comes after ``max_redirects`` of them
            (with the default 0: any redirect).
    """
    request = client.build_request(method, policy.check_url(url), **kwargs)
    hops = 0
    while True:
        response = await client.send(
            request, auth=auth if auth is not None and hops == 0 else httpx2.USE_CLIENT_DEFAULT
        )
        if not response.has_redirect_location:
            return response
        next_request = response.next_request
        await response.aclose()
        if hops == max_redirects:
            limit = f"at most {max_redirects} are followed" if max_redirects else "none are followed"
            raise UrlRefused(f"the server answered with a redirect ({limit} here)", rule="redirect")
        if next_request is None:  # httpx2 could not build the hop: say why when the scheme is the reason
            location = response.headers.get("Location", "")
            if ":" in location.split("/", 1)[0]:
                policy.check_url(location)
            raise UrlRefused("the server redirected to an invalid Location", rule="redirect")
        policy.check_url(str(next_request.url))
        request = next_request
        hops += 1


# What the most permissive settings allow: anything they would refuse, every setting refuses.
_ANY_SETTINGS: Final = OutboundPolicy(
    allow_loopback=True, allowed_networks=(ip_network("0.0.0.0/0"), ip_network("::/0"))
)


def check_url_shape(url: str, *, field: str = "url", policy: OutboundPolicy | None = None) -> str:
    """``url`` unchanged unless ``policy`` (the install's) refuses it as a connection would, without resolving it.

    Registration gives the same verdict as connecting for everything the URL alone decides: the scheme, userinfo,
    the port, and a host that spells an address (in any notation) the policy refuses. A hostname's addresses are
    checked on connect. Without a policy (input checks that have no settings), only what no setting could ever
    allow is refused.

    Raises:
        UrlRefused: with ``field`` set, for a field error.
    """
    return (policy or _ANY_SETTINGS).check_url(url, field=field)
