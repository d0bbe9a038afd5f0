"""SSRF-safe HTTP GET for agents: ``await fetch_url("https://example.com/")``.

What a model may fetch is decided by :class:`FetchPolicy`; everything else is refused
with a :class:`FetchRefused` whose message names the rule:

* only ``http``/``https``, no ``user:password@`` in the URL, an optional host allow-list;
* the host (an IP literal in any form ``getaddrinfo`` accepts, or a name) must resolve
  only to globally routable addresses: loopback, private, link-local (cloud metadata),
  carrier-grade NAT, multicast, reserved, unspecified, site-local and IPv4-mapped /
  6to4 / NAT64 forms of those are refused (see :func:`check_address`);
* DNS rebinding is defeated by :class:`SafeResolver`: the connection goes to the exact
  addresses that were validated, never to a second resolution;
* redirects are followed by hand and every ``Location`` is validated again;
* the body is streamed and cut at ``max_bytes``; the whole fetch runs under a timeout.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from nimbus.exceptions import ToolError

GetAddrInfo = Callable[..., Awaitable[list[tuple[Any, ...]]]]
"""An async ``getaddrinfo(host, port, *, family, type, proto, flags)`` like the loop's."""

BLOCKED_HOSTNAMES = frozenset(
    {"metadata", "metadata.google.internal", "metadata.goog", "instance-data.ec2.internal"}
)
"""Cloud metadata host names, refused whatever they resolve to."""

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_NUMERIC_FLAGS = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
_PRIVATE = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_SITE_LOCAL = ipaddress.IPv6Network("fec0::/10")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# A DNS name as getaddrinfo accepts it: labels of 1 to 63 letters, digits, "-" or "_" (IDNA
# already applied by yarl), up to 253 characters in all. Anything else would fail only later,
# some of it with exceptions that are not OSError (UnicodeError for a label over 63).
_HOST_NAME = re.compile(r"[a-z0-9_-]{1,63}(?:\.[a-z0-9_-]{1,63})*\.?")
_HOST_NAME_MAX = 253


class FetchError(ToolError):
    """The fetch failed (timeout, connection error, too many redirects, ...)."""


class FetchRefused(FetchError):
    """The URL or an address it resolves to is not allowed by the fetch policy."""


@dataclass(frozen=True)
class FetchPolicy:
    """Limits and rules for :func:`fetch_url`.

    ``allowed_hosts``, when set, limits fetches to those host names and their
    subdomains. ``allow_private`` lets loopback and private (RFC 1918, fc00::/7)
    addresses through, for tests against a local server only; link-local (cloud
    metadata) and the other special ranges stay refused even then.
    """

    max_bytes: int = 1_000_000
    timeout_s: float = 10.0
    max_redirects: int = 5
    allowed_hosts: frozenset[str] | None = None
    allow_private: bool = False
    user_agent: str = "nimbus-http-fetch/0.1"

    def __post_init__(self) -> None:
        if self.max_bytes < 0 or self.max_redirects < 0 or self.timeout_s <= 0:
            raise ValueError("max_bytes and max_redirects must be >= 0, timeout_s > 0")


@dataclass(frozen=True)
class FetchResult:
    """A fetched response: final ``url``, ``status``, ``content_type`` and decoded ``text``.

    ``bytes_read`` counts the body bytes kept; ``truncated`` says the body was longer
    than ``max_bytes`` and was cut there.
    """

    url: str
    status: int
    content_type: str
    text: str
    truncated: bool
    bytes_read: int


def _address_problem(ip: str, allow_private: bool) -> str | None:
    """Why ``ip`` may not be fetched from, or ``None`` when it may."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 scope id
    except ValueError:
        return "not a valid IP address"
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = addr.ipv4_mapped or addr.sixtofour
        if embedded is None and addr in _NAT64:
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if embedded is not None:
            problem = _address_problem(str(embedded), allow_private)
            return None if problem is None else f"{problem} (embedded IPv4 {embedded})"
    if addr.is_unspecified:
        return "an unspecified address"
    if addr.is_loopback:
        return None if allow_private else "a loopback address"
    if addr.is_link_local:
        return "a link-local address (cloud metadata endpoints live there)"
    if addr.is_multicast:
        return "a multicast address"
    if addr in _CGNAT:
        return "a carrier-grade NAT (shared) address"
    if addr in _SITE_LOCAL:
        return "a site-local address"
    if addr.version == 6 and int(addr) >> 32 == 0:
        return "an IPv4-compatible IPv6 address (deprecated)"
    if any(addr in net for net in _PRIVATE):
        return None if allow_private else "a private address"
    if addr.is_reserved:
        return "a reserved address"
    if not addr.is_global:
        return "not a globally routable address"
    return None


def check_address(ip: str, *, allow_private: bool = False) -> None:
    """Raise :class:`FetchRefused` unless ``ip`` is a globally routable unicast address.

    IPv4-mapped, 6to4 and NAT64 IPv6 addresses are judged by the IPv4 address they
    embed. ``allow_private`` admits loopback and private ranges only (for tests).
    """
    problem = _address_problem(ip, allow_private)
    if problem is not None:
        raise FetchRefused(f"refused: {ip} is {problem}")


def _normalize_host(host: str) -> str:
    name = host.strip().lower().rstrip(".")
    try:
        return (URL.build(scheme="http", host=name).raw_host or name).lower()
    except (ValueError, TypeError):
        return name


def _literal_ip(host: str) -> str | None:
    """The address an IP-literal host means, in any form getaddrinfo accepts, else None."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return host
    except ValueError:
        pass
    if not host or not all(c in "0123456789abcdefx." for c in host):
        return None
    try:  # legacy numeric IPv4 forms: 2130706433, 0x7f.1, 0177.0.0.1, 127.1
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return None


def _parse(url: str | URL) -> URL:
    """``url`` parsed; :class:`FetchRefused` if it is malformed (its port included)."""
    try:
        parsed = url if isinstance(url, URL) else URL(url)
        # Touch every part used later, so that a malformed one fails here.
        _ = (parsed.scheme, parsed.raw_user, parsed.raw_password, parsed.raw_host, parsed.port)
    except Exception:
        # yarl answers malformed input with ValueError, TypeError, UnicodeError and, for some
        # (``http://[::1]:18080@/``), IndexError: for untrusted input each means the same.
        raise FetchRefused("refused: not a valid URL") from None
    return parsed


def _valid_host(host: str) -> bool:
    """Whether ``host`` (a raw, lower-case URL host) is an IPv6 literal or a DNS name."""
    if ":" in host:
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            return False
        return True
    return len(host.rstrip(".")) <= _HOST_NAME_MAX and _HOST_NAME.fullmatch(host) is not None


def check_url(url: str | URL, policy: FetchPolicy | None = None) -> URL:
    """Validate ``url`` without any network access and return it parsed.

    Checks the form of the URL and its host, the scheme, credentials, host presence,
    blocked metadata names, the allow-list and IP-literal hosts (every numeric form).
    Raises :class:`FetchRefused`, and nothing else, whatever the string.
    """
    policy = policy or FetchPolicy()
    parsed = _parse(url)
    host = parsed.raw_host
    if parsed.scheme.lower() not in ("http", "https"):
        shown = parsed.scheme or "(none)"
        raise FetchRefused(f"refused: scheme {shown!r} is not allowed; use http:// or https://")
    if parsed.raw_user is not None or parsed.raw_password is not None:
        raise FetchRefused("refused: credentials in the URL (user:password@) are not allowed")
    if not host:
        raise FetchRefused("refused: the URL has no host")
    if not _valid_host(host.lower()):
        raise FetchRefused("refused: not a valid URL (malformed host)")
    name = host.lower().rstrip(".")
    if name in BLOCKED_HOSTNAMES:
        raise FetchRefused(f"refused: {name} is a cloud metadata host")
    if policy.allowed_hosts is not None:
        allowed = {_normalize_host(h) for h in policy.allowed_hosts}
        if not any(name == a or name.endswith("." + a) for a in allowed):
            raise FetchRefused(f"refused: host {name!r} is not in the allowed hosts list")
    ip = _literal_ip(name)
    problem = None if ip is None else _address_problem(ip, policy.allow_private)
    if problem is not None:
        shown = name if ip == name else f"{name} (= {ip})"
        raise FetchRefused(f"refused: {shown} is {problem}")
    return parsed


async def _resolve_checked(
    host: str, port: int, family: int, allow_private: bool, getaddrinfo: GetAddrInfo
) -> list[ResolveResult]:
    """Resolve ``host`` and validate every address; refuse if any one is bad."""
    try:
        infos = await getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
    except OSError:
        raise FetchError(f"could not resolve host {host!r}") from None
    results: list[ResolveResult] = []
    for fam, _type, proto, _canon, sockaddr in infos:
        if fam not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = str(sockaddr[0])
        problem = _address_problem(ip, allow_private)
        if problem is not None:
            raise FetchRefused(f"refused: host {host!r} resolves to {ip}, which is {problem}")
        results.append(
            ResolveResult(
                hostname=host,
                host=ip,
                port=int(sockaddr[1]),
                family=fam,
                proto=proto,
                flags=_NUMERIC_FLAGS,
            )
        )
    if not results:
        raise FetchError(f"could not resolve host {host!r}: no usable address")
    return results


class SafeResolver(AbstractResolver):
    """An aiohttp resolver that returns only validated addresses.

    aiohttp connects to exactly what :meth:`resolve` returns, so a DNS answer that
    changes between validation and connection (DNS rebinding) cannot reach a private
    address. Any bad address in the answer refuses the whole host.
    """

    def __init__(
        self, *, allow_private: bool = False, getaddrinfo: GetAddrInfo | None = None
    ) -> None:
        self._allow_private = allow_private
        self._getaddrinfo = getaddrinfo

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve ``host`` and return its addresses, all of them validated."""
        gai = self._getaddrinfo or asyncio.get_running_loop().getaddrinfo
        return await _resolve_checked(host, port, family, self._allow_private, gai)

    async def close(self) -> None:
        """Nothing to release."""


async def fetch_url(
    url: str,
    *,
    policy: FetchPolicy | None = None,
    session: aiohttp.ClientSession | None = None,
    _getaddrinfo: GetAddrInfo | None = None,
) -> FetchResult:
    """GET ``url`` under ``policy`` and return the (possibly truncated) decoded body.

    Without ``session`` a private session pinned to validated addresses is used. With a
    caller's ``session`` every hop is still validated (URL and resolved addresses)
    before the request, but rebinding protection then depends on that session's
    resolver (use :class:`SafeResolver`). ``_getaddrinfo`` replaces the event loop's
    resolver (tests).

    Raises:
        FetchRefused: the URL, a redirect target or a resolved address is not allowed.
        FetchError: timeout, connection failure, too many redirects, bad response.
    """
    policy = policy or FetchPolicy()
    target = check_url(url, policy)
    gai = _getaddrinfo or asyncio.get_running_loop().getaddrinfo
    try:
        async with asyncio.timeout(policy.timeout_s):
            if session is not None:
                return await _fetch(session, target, policy, gai, precheck=True)
            connector = aiohttp.TCPConnector(
                resolver=SafeResolver(allow_private=policy.allow_private, getaddrinfo=gai),
                use_dns_cache=False,
            )
            async with aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=None), trust_env=False
            ) as own:
                return await _fetch(own, target, policy, gai, precheck=False)
    except TimeoutError:
        raise FetchError(f"timed out after {policy.timeout_s:g}s") from None


async def _fetch(
    session: aiohttp.ClientSession,
    url: URL,
    policy: FetchPolicy,
    gai: GetAddrInfo,
    *,
    precheck: bool,
) -> FetchResult:
    headers = {"User-Agent": policy.user_agent, "Accept-Encoding": "identity"}
    for _hop in range(policy.max_redirects + 1):
        host = url.raw_host or ""
        if precheck:
            await _resolve_checked(host, url.port or 0, 0, policy.allow_private, gai)
        try:
            async with session.get(url, allow_redirects=False, headers=headers) as resp:
                location = resp.headers.get("Location")
                if resp.status in _REDIRECT_STATUSES and location:
                    url = _redirect_target(url, location, policy)
                    continue
                return await _read(resp, url, policy)
        except aiohttp.ClientError as exc:
            raise FetchError(_describe(exc, host)) from None
    raise FetchError(f"too many redirects (more than {policy.max_redirects})")


def _redirect_target(current: URL, location: str, policy: FetchPolicy) -> URL:
    try:
        target = current.join(URL(location))
    except Exception:  # as in _parse: yarl's errors on malformed input are of many types
        raise FetchRefused("refused: the redirect Location is not a valid URL") from None
    try:
        return check_url(target, policy)
    except FetchRefused as exc:
        raise FetchRefused(f"{exc} (redirect from {current.raw_host})") from None


async def _read(resp: aiohttp.ClientResponse, url: URL, policy: FetchPolicy) -> FetchResult:
    body = bytearray()
    truncated = False
    while True:
        chunk = await resp.content.read(min(65_536, policy.max_bytes + 1 - len(body)))
        if not chunk:
            break
        body += chunk
        if len(body) > policy.max_bytes:
            del body[policy.max_bytes :]
            truncated = True
            break
    try:  # an unknown or non-text charset ("base64") falls back to UTF-8
        text = bytes(body).decode(resp.charset or "utf-8", errors="replace")
    except LookupError:
        text = bytes(body).decode("utf-8", errors="replace")
    return FetchResult(
        url=str(url),
        status=resp.status,
        content_type=resp.content_type,
        text=text,
        truncated=truncated,
        bytes_read=len(body),
    )


def _describe(exc: aiohttp.ClientError, host: str) -> str:
    """A short, secret-free description of an aiohttp failure."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"could not resolve host {host!r}"
    if isinstance(exc, aiohttp.ClientSSLError):
        return f"TLS error talking to {host}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.os_error.strerror or type(exc.os_error).__name__
        return f"could not connect to {host}: {reason}"
    if isinstance(exc, aiohttp.InvalidURL):
        return "invalid URL"
    return f"request to {host} failed ({type(exc).__name__})"
